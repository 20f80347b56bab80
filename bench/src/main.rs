//! Benchmarks. Each scenario measures the service against a baseline that stands for the
//! hardware's limit, in the same run on the same machine, and ends with one line:
//! `<scenario>: <rate>, <ratio>x <baseline>`. Absolute figures do not compare between runs on
//! shared machines; the ratios do.
//!
//! The database is a fresh one on the server the tests use (`DATABASE_URL`, else
//! 127.0.0.1:5432, else a throwaway cluster), dropped at the end.

#![forbid(unsafe_code)]

mod append;
mod read;
mod report;

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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().scenario {
        Scenario::Append(options) => append::run(options).await,
        Scenario::Read(options) => read::run(options).await,
    }
}
