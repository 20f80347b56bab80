//! `aggregator`: the projection worker (`run`, the default) and its admin commands.

use aggregator::{Application, Settings, admin};
use clap::Subcommand;
use platform::cli::CommandLine;

#[derive(Subcommand)]
enum Command {
    /// Run the projection, the mailer, (with `nats.url`) the JetStream relay and the delivery to
    /// webhook endpoints, and serve /healthz, /readyz and /metrics (the default).
    Run,
    /// Apply the read model's migrations and exit (idempotent).
    Migrate,
    /// Per consumer (the users projection, the mailer, the JetStream relay, each webhook
    /// endpoint's delivery `webhook:<id>`): checkpoint, head,
    /// lag and which worker holds it; then how many persons' keys each master key wraps, and how
    /// many persons are erased (a retired master key that wraps none can be dropped).
    Status,
    /// Empty a projection's view and checkpoint, so the worker replays it from zero; or move the
    /// mailer back to the start, so it sends every mail again (`reset mailer`); or the relay, so
    /// it publishes every event again with the same ids (`reset jetstream`); or a webhook
    /// endpoint's delivery back to its registration (`reset webhook:<id>`).
    Reset {
        /// `users`, `mailer`, `jetstream` or `webhook:<id>`.
        #[arg(required_unless_present = "projection", conflicts_with = "projection")]
        name: Option<String>,
        #[arg(long)]
        projection: Option<String>,
    },
    /// Replay a projection into fresh tables and switch over atomically.
    Rebuild {
        #[arg(long)]
        projection: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = CommandLine::<Command>::parse(
        "aggregator",
        "Projects the message store's events into the read model, sends the mails they call for, \
         and publishes them to NATS JetStream and webhooks",
    );
    let settings: Settings = cli.config.load()?;
    platform::telemetry::init(&settings.log);
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => {
            let application = Application::build(settings).await?;
            tracing::info!(address = %application.local_addr()?, "aggregator started");
            application
                .run_until_stopped(platform::shutdown::signal())
                .await
        }
        Command::Migrate => aggregator::migrate(&settings).await,
        Command::Status => {
            let store = settings.connect_store().await?;
            let read_model = settings.connect_read_model().await?;
            for status in admin::status(&store, &read_model).await? {
                println!("{}", serde_json::to_string(&status)?);
            }
            let vault = settings.connect_vault().await?;
            let keys = admin::personal_keys(&vault, &settings.master_keys()?).await?;
            println!(
                "{}",
                serde_json::to_string(&serde_json::json!({ "personal_keys": keys }))?
            );
            Ok(())
        }
        Command::Reset { name, projection } => {
            let projection = name.or(projection).unwrap_or_default();
            let store = settings.connect_store().await?;
            let read_model = settings.connect_read_model().await?;
            read_model.migrate().await?;
            admin::reset_consumer(&store, &read_model, &projection).await?;
            println!("{projection}: reset; the worker replays it from the start");
            Ok(())
        }
        Command::Rebuild { projection } => {
            let store = settings.connect_store().await?;
            let sealer = settings.sealer().await?;
            let read_model = settings.connect_read_model().await?;
            read_model.migrate().await?;
            let rebuilt = admin::rebuild(
                &store,
                &sealer,
                &read_model,
                &projection,
                settings.aggregator.batch_size.max(1),
            )
            .await?;
            println!(
                "{projection}: rebuilt from {} events, up to position {}",
                rebuilt.events, rebuilt.position
            );
            Ok(())
        }
    }
}
