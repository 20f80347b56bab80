//! Benchmarks. Each scenario measures the service against a baseline that stands for the
//! hardware's limit, in the same run on the same machine, and ends with one line:
//! `<scenario>: <rate>, <ratio>x <baseline>`. Absolute figures do not compare between runs on
//! shared machines; the ratios do. The exception is `soak`, a run of the whole split deployment
//! that looks for errors and memory growth rather than measuring against a baseline.
//!
//! The database is a fresh one on the server the tests use (`DATABASE_URL`, else
//! 127.0.0.1:5432, else a throwaway cluster), dropped at the end.

#![forbid(unsafe_code)]

mod append;
mod lag;
mod login;
mod mail;
mod query;
mod read;
mod rebuild;
mod refresh;
mod relay;
mod report;
mod scale;
mod setup;
mod soak;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Benchmarks of the identity service, each against a same-run baseline")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Single-message appends to distinct streams from concurrent tasks, against plain INSERTs.
    Append(append::Options),
    /// Reading every message in batches, against a plain keyset SELECT of the same rows.
    Read(read::Options),
    /// Logins over HTTP with the default argon2 parameters, against argon2 verification alone.
    Login(login::Options),
    /// Rebuilding the users view from a million events, against one set-based SQL statement.
    Rebuild(rebuild::Options),
    /// Time from an append returning to its row being visible in the read model, against a
    /// plain LISTEN client copying the same events into a table.
    Lag(lag::Options),
    /// Refresh-token rotations over HTTP from 8 clients, against single-message appends with an
    /// expected version from 8 writers to the same store.
    Refresh(refresh::Options),
    /// `GET /users/{id}` from the query API in its own process, against a plain prepared SELECT.
    Query(query::Options),
    /// Mails delivered from recovery events to a real SMTP server by the mailer, against the
    /// same mails sent straight with the same SMTP client.
    Mail(mail::Options),
    /// Integration events delivered to NATS JetStream from the store by the relay, against the
    /// same events published straight with async-nats; and the lag from commit to JetStream's
    /// acknowledgement at a steady rate.
    Relay(relay::Options),
    /// Logins over HTTP against one command API process and against two sharing the same
    /// cores and database.
    Scale(scale::Options),
    /// The command API, from the environment's settings: a replica `scale` starts.
    #[command(hide = true)]
    ServeCommandApi,
    /// The split deployment (three release binaries) under minutes of mixed traffic: errors,
    /// latencies per route and resident memory over time. Run by hand, not in CI.
    Soak(soak::Options),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().scenario {
        Scenario::Append(options) => append::run(options).await,
        Scenario::Read(options) => read::run(options).await,
        Scenario::Login(options) => login::run(options).await,
        Scenario::Rebuild(options) => rebuild::run(options).await,
        Scenario::Lag(options) => lag::run(options).await,
        Scenario::Refresh(options) => refresh::run(options).await,
        Scenario::Query(options) => query::run(options).await,
        Scenario::Mail(options) => mail::run(options).await,
        Scenario::Relay(options) => relay::run(options).await,
        Scenario::Scale(options) => scale::run(options).await,
        Scenario::ServeCommandApi => scale::serve_command_api().await,
        Scenario::Soak(options) => soak::run(options).await,
    }
}
