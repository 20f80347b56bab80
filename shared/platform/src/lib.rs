//! What every binary of the service shares and none of them owns: layered settings, JSON logs
//! with a request id, Prometheus metrics, RFC 9457 problem responses, and shutdown on SIGTERM.

#![forbid(unsafe_code)]

pub mod cli;
pub mod clock;
pub mod http;
pub mod metrics;
pub mod openapi;
pub mod problem;
pub mod settings;
pub mod shutdown;
pub mod telemetry;

pub use problem::{ApiJson, FieldError, Problem};
