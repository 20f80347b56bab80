//! The query API against a real PostgreSQL (message store and read model) over real HTTP.
//!
//! The read model's rows are written here the way the aggregator writes them (its own tests
//! prove the projection), or by the real aggregator where the view's states matter
//! (`deactivation.rs`, `sessions.rs`, `erasure.rs`); history and time travel read real events
//! from the message store, their personal fields sealed in a real key vault as the command API
//! seals them. Every token belongs to a session started in the message store (`harness.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot go on panics with the cause

mod deactivation;
mod erasure;
mod harness;
mod history;
mod kept_profiles;
mod lists;
mod profiles;
mod read_your_writes;
mod recovery;
mod restart;
mod service;
mod session_ends;
mod sessions;
mod shutdown;
mod token_attacks;
mod webhooks;
