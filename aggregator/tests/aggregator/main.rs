//! The aggregator against real PostgreSQL (and SQLite for the standalone mode): one test
//! binary, one fresh database per test.

// Helpers outside #[test] functions panic on failure too: this is test code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod admin;
mod erasure;
mod jetstream;
mod mailer;
mod recovery;
mod sessions;
mod support;
mod webhooks;
mod worker;
