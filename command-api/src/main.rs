//! `command-api [--config FILE] [serve | migrate | admin create --email EMAIL]`.

use std::io::BufRead;
use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use command_api::{Application, Settings};
use platform::clock::SystemClock;

#[derive(Parser)]
#[command(about = "The identity service's command API")]
struct Cli {
    /// A TOML settings file; `IDENTITY__SECTION__KEY` variables override it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve HTTP (the default).
    Serve,
    /// Apply the message store's migrations and exit (a Kubernetes Job).
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
    let cli = Cli::parse();
    let settings: Settings = platform::settings::load(cli.config.as_deref())?;
    platform::telemetry::init(&settings.log);
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            let application = Application::build(settings, Arc::new(SystemClock)).await?;
            application
                .run_until_stopped(platform::shutdown::signal())
                .await
        }
        Command::Migrate => Ok(message_store::migrate(settings.database.url.expose()).await?),
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
