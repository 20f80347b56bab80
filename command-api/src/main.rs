//! `command-api [--config FILE] [serve | migrate | seal-history [--check] | rewrap-keys |
//! admin create --email EMAIL]`.

use std::io::BufRead;
use std::sync::Arc;

use clap::Subcommand;
use command_api::history_sealing::{self, SealingReport};
use command_api::{Application, Settings};
use platform::cli::CommandLine;
use platform::clock::SystemClock;

#[derive(Subcommand)]
enum Command {
    /// Serve HTTP (the default).
    Serve,
    /// Apply the message store's migrations and the key vault's, and exit (a Kubernetes Job).
    Migrate,
    /// Seal the personal fields that builds before ADR 13 wrote in clear, and rename their
    /// reservation streams; once, with every command API of the older build stopped.
    /// Idempotent: run it again if it was interrupted.
    SealHistory {
        /// Only count what is left to seal; exit with status 1 if anything is.
        #[arg(long)]
        check: bool,
    },
    /// Rewrap every person's key under the current master key (after a master key rotation),
    /// online, in batches; then print how many keys each master key wraps.
    RewrapKeys,
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
        Command::SealHistory { check } => seal_history(&settings, check).await,
        Command::RewrapKeys => rewrap_keys(&settings).await,
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

/// `seal-history`: seals the history, or with `check` only reports what is left.
async fn seal_history(settings: &Settings, check: bool) -> anyhow::Result<()> {
    let store = command_api::connect(settings).await?;
    let personal = command_api::open_personal_data(settings).await?;
    let report = history_sealing::seal_history(store.as_ref(), &personal, check).await?;
    let SealingReport {
        messages_read,
        messages_in_clear,
        messages_of_erased_persons,
        streams_to_rename,
    } = report;
    if check {
        println!(
            "{messages_read} user and recovery messages read: {messages_in_clear} hold personal \
             data in clear, {streams_to_rename} reservation streams have an unkeyed name"
        );
        if !report.is_sealed() {
            std::process::exit(1);
        }
    } else {
        println!(
            "{messages_read} user and recovery messages read: {messages_in_clear} sealed \
             ({messages_of_erased_persons} of erased persons, their fields nulled), \
             {streams_to_rename} reservation streams renamed"
        );
    }
    Ok(())
}

/// `rewrap-keys`: every key under the current master key, then the counts an operator checks
/// before dropping a retired one.
async fn rewrap_keys(settings: &Settings) -> anyhow::Result<()> {
    let personal = command_api::open_personal_data(settings).await?;
    let rewrapped = personal.vault().rewrap().await?;
    let counts = personal.vault().count_by_master_key().await?;
    println!(
        "{rewrapped} keys rewrapped under master key {}",
        settings.personal_data.master_key_id
    );
    for (id, keys) in &counts.by_master_key {
        println!("master key {id}: {keys} keys");
    }
    println!("erased persons: {}", counts.erased);
    Ok(())
}
