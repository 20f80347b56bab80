//! The command-api service.

#![forbid(unsafe_code)]

use axum::{Router, routing::get};

/// The routes this service answers.
pub fn router() -> Router {
    Router::new().route("/healthz", get(|| async { "ok" }))
}
