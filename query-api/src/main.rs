//! `query-api`: serves profiles, lookups and history from the read model.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use platform::clock::SystemClock;

#[derive(Parser)]
#[command(version, about = "The identity service's read side over HTTP")]
struct Cli {
    /// A TOML settings file; IDENTITY__... environment variables override it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API (the default).
    Serve,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings: query_api::Settings = platform::settings::load(cli.config.as_deref())?;
    platform::telemetry::init(&settings.log);
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let application =
                query_api::Application::build(settings, Arc::new(SystemClock)).await?;
            application
                .run_until_stopped(platform::shutdown::signal())
                .await
        }
    }
}
