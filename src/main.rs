//! `identity-service`: the whole service in one process (see the library's documentation).

#![forbid(unsafe_code)]

use std::sync::Arc;

use clap::Parser;
use identity_service::{Application, Settings};
use platform::clock::SystemClock;
use platform::settings::ConfigFile;

#[derive(Parser)]
#[command(
    version,
    about = "The identity service in one process (command, query and projector)"
)]
struct Cli {
    #[command(flatten)]
    config: ConfigFile,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = Settings::load(cli.config.path.as_deref())?;
    platform::telemetry::init(&settings.commands.log);
    let application = Application::build(settings, Arc::new(SystemClock)).await?;
    let address = application.local_addr()?;
    println!("identity service listening on http://{address}");
    println!(
        "try: curl -si -X POST http://{address}/users -H 'content-type: application/json' \
         -d '{{\"email\":\"ann@example.com\",\"password\":\"correct horse battery\"}}'"
    );
    application
        .run_until_stopped(platform::shutdown::signal())
        .await
}
