//! `command-api [--config FILE] [serve | migrate | admin create --email EMAIL]`.

use std::io::BufRead;
use std::sync::Arc;

use clap::Subcommand;
use command_api::{Application, Settings};
use platform::cli::CommandLine;
use platform::clock::SystemClock;

#[derive(Subcommand)]
enum Command {
    /// Serve HTTP (the default).
    Serve,
    /// Apply the message store's migrations and the key vault's, and exit (a Kubernetes Job).
    Migrate,
    /// Operator commands.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Create an active administrator; the password is read from the first line of stdin.
    Create {
        #[arg(long)]
        email: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = CommandLine::<Command>::parse("command-api", "The identity service's command API");
    let settings: Settings = cli.config.load()?;
    platform::telemetry::init(&settings.log);
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let application = Application::build(settings, Arc::new(SystemClock)).await?;
            application
                .run_until_stopped(platform::shutdown::signal())
                .await
        }
        Command::Migrate => migrate(&settings).await,
        Command::Admin {
            command: AdminCommand::Create { email },
        } => {
            let mut password = String::new();
            std::io::stdin().lock().read_line(&mut password)?;
            let password = password.trim_end_matches(['\r', '\n']).to_owned();
            let done =
                command_api::create_admin(&settings, Arc::new(SystemClock), &email, password)
                    .await?;
            println!(
                "created administrator {} at position {}",
                done.id, done.position
            );
            Ok(())
        }
    }
}

/// The message store's migrations, then the key vault's, in the same database.
async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let url = settings.database.url.expose();
    message_store::migrate(url).await?;
    personal_data::migrate(url).await?;
    Ok(())
}
