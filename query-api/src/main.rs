//! `query-api`: serves profiles, lookups and history from the read model.

use std::sync::Arc;

use clap::Subcommand;
use platform::cli::CommandLine;
use platform::clock::SystemClock;

#[derive(Subcommand)]
enum Command {
    /// Serve the API (the default).
    Serve,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli =
        CommandLine::<Command>::parse("query-api", "The identity service's read side over HTTP");
    let settings: query_api::Settings = cli.config.load()?;
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
