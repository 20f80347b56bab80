//! API tests: the real router over real HTTP, against a fresh PostgreSQL database per test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod admin;
mod enumeration;
mod erasure;
mod helpers;
mod last_administrator;
mod login;
mod meta;
mod password;
mod recovery;
mod recovery_enumeration;
mod register;
mod seal_history;
mod secrets;
mod sessions;
mod timing;
mod webhooks;
