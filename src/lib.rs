//! `identity-service`: the whole service in one process, for trying it out and for small
//! installations. It composes the parts, it does not re-wire them: each crate hands over its
//! routes and its background work, and this puts them on one port, over one message store and
//! one read model: an SQLite file under `data/` by default (created on first start, kept across
//! restarts), or PostgreSQL when `IDENTITY__DATABASE__URL` names one. A signing key, and the
//! keys that seal personal data (ADR 13), are created on first start and kept beside the
//! database. Mails are `.eml` files under `data/mail/`, their
//! links logged, unless `mail.smtp_url` names a server. Integration events are posted to the
//! webhook endpoints administrators register (their secrets derived with a key created on first
//! start too), and published to NATS JetStream when `nats.url` names a server.

#![forbid(unsafe_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use message_store::MessageStore;
use platform::clock::Clock;
use platform::shutdown::Shutdown;
use tokio::net::TcpListener;
use utoipa::OpenApi;

/// The standalone mode's defaults, where they differ from the split deployment's.
const STANDALONE_DEFAULTS: &[(&str, &str)] = &[
    ("database.url", "sqlite://data/identity.db"),
    ("http.address", "127.0.0.1:8080"),
    ("log.format", "pretty"),
    ("tokens.signing_key_file", "data/signing-key.pem"),
    ("tokens.refresh_token_key_file", "data/refresh-token-key"),
    ("tokens.create_key_if_missing", "true"),
    ("mail.token_key_file", "data/mail-token-key"),
    ("mail.create_key_if_missing", "true"),
    ("webhooks.secret_key_file", "data/webhook-secret-key"),
    ("webhooks.create_key_if_missing", "true"),
    (
        "personal_data.master_key_file",
        "data/personal-data-master-key",
    ),
    (
        "personal_data.lookup_key_file",
        "data/personal-data-lookup-key",
    ),
    ("personal_data.create_keys_if_missing", "true"),
];

/// The settings of each part, read from the same file and variables (each takes its own
/// sections; `database`, `http` and `log` are shared).
#[derive(Debug, Clone)]
pub struct Settings {
    pub commands: command_api::Settings,
    pub queries: query_api::Settings,
    pub projection: aggregator::Settings,
}

impl Settings {
    /// Defaults (the standalone ones), then `file`, then `IDENTITY__...` variables.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        Ok(Self {
            commands: platform::settings::load_with_defaults(file, STANDALONE_DEFAULTS)?,
            queries: platform::settings::load_with_defaults(file, STANDALONE_DEFAULTS)?,
            projection: platform::settings::load_with_defaults(file, STANDALONE_DEFAULTS)?,
        })
    }
}

/// The whole service, its databases open and its port bound, ready to serve.
pub struct Application {
    listener: TcpListener,
    settings: Settings,
    clock: Arc<dyn Clock>,
    store: Arc<dyn MessageStore>,
    read_model: aggregator::ReadModelWriter,
    /// One key vault for every part: the command side seals with it, the projector, the mailer
    /// and the query side open with it.
    personal_data: personal_data::PersonalData,
    mailer: aggregator::Mailer,
    /// The JetStream relay, when `nats.url` is set.
    relay: Option<aggregator::Relay>,
    webhooks: aggregator::WebhookSupervisor,
}

impl Application {
    /// Creates the data directory, opens the store and the read model (migrating both) and
    /// binds the port.
    pub async fn build(settings: Settings, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        platform::metrics::handle();
        create_parent_directories(&settings.commands)?;
        let store = settings.projection.connect_store().await?;
        // The vault's table lives in the store's database; opening it migrates it.
        let personal_data = command_api::open_personal_data(&settings.commands).await?;
        // A data file an older build wrote holds personal data in clear: sealed here, once (the
        // split deployment's operator runs `command-api seal-history`), by a process started in
        // the older build's place, so nothing writes in clear meanwhile.
        let sealer = &personal_data.sealer;
        if !command_api::history_sealing::is_sealed(store.as_ref(), sealer).await? {
            tracing::warn!("sealing the personal data an older build wrote in clear");
            let report =
                command_api::history_sealing::seal_history(store.as_ref(), &personal_data, false)
                    .await
                    .context("sealing the history")?;
            tracing::warn!(?report, "the history is sealed");
        }
        let read_model = settings.projection.connect_read_model().await?;
        read_model
            .migrate()
            .await
            .context("applying the read model migrations")?;
        // Without `mail.smtp_url` (the standalone default), mails are `.eml` files under
        // `mail.outbox_dir` and their links are logged.
        let mailer = settings.projection.mailer(
            store.clone(),
            personal_data.sealer.clone(),
            read_model.clone(),
            clock.clone(),
        )?;
        let relay = settings
            .projection
            .relay(
                store.clone(),
                personal_data.sealer.clone(),
                read_model.clone(),
            )
            .await?;
        // Made before the command side, which reads the same webhook secret key file: this
        // creates it on first start.
        let webhooks = settings.projection.webhook_supervisor(
            store.clone(),
            personal_data.sealer.clone(),
            read_model.clone(),
            clock.clone(),
        )?;
        let address = &settings.commands.http.address;
        let listener = TcpListener::bind(address)
            .await
            .with_context(|| format!("binding {address}"))?;
        Ok(Self {
            listener,
            settings,
            clock,
            store,
            read_model,
            personal_data,
            mailer,
            relay,
            webhooks,
        })
    }

    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Serves the command and query routes, projects, mails, relays and delivers to webhooks
    /// until `shutdown` completes; returns once the requests in flight are answered, the batch
    /// in flight is committed or rolled back, the mails of the mailer's step in flight are sent,
    /// the relay's step and each webhook delivery in flight have ended, and every background
    /// task has stopped.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let shutdown = Shutdown::on(shutdown);
        let Settings {
            commands,
            queries,
            projection,
        } = self.settings;
        let store = self.store;
        let sealer = self.personal_data.sealer.clone();

        let projector = aggregator::Projector::users(
            store.clone(),
            sealer.clone(),
            self.read_model,
            projection.projector_options(),
        );
        let projecting = tokio::spawn(projector.run(shutdown.stopped()));
        let mailing = tokio::spawn(self.mailer.run(shutdown.stopped()));
        let relaying = self
            .relay
            .map(|relay| tokio::spawn(relay.run(shutdown.stopped())));
        let delivering = tokio::spawn(self.webhooks.run(shutdown.stopped()));

        let command_state = command_api::state_with_store(
            &commands,
            self.clock.clone(),
            store.clone(),
            self.personal_data,
        )?;
        let pruning = tokio::spawn(command_api::run_background(
            command_state.clone(),
            commands.login,
            shutdown.clone(),
        ));

        let query_read_model = query_api::UsersView::connect(
            queries.read_model.url_or(&queries.database).expose(),
            queries.read_model_connections(),
        )
        .await
        .context("opening the read model for queries")?;
        let (query_state, following) = query_api::AppState::start(
            query_read_model,
            store.clone(),
            sealer,
            command_state.verifier.clone(),
            self.clock,
            queries.query,
            shutdown.stopped(),
        );

        let shared = Shared {
            jwks: command_state.commands.issuer.jwks(),
            store,
            read_model: query_state.read_model.clone(),
        };
        let app = platform::http::with_common_layers(
            command_api::command_routes(command_state)
                .merge(query_api::query_routes(query_state))
                .merge(
                    Router::new()
                        .route("/.well-known/jwks.json", get(jwks))
                        .route("/openapi.json", get(openapi))
                        .route("/readyz", get(readyz))
                        .with_state(shared),
                ),
        );
        let served = axum::serve(self.listener, app)
            .with_graceful_shutdown(shutdown.stopped())
            .await;
        projecting.await.context("stopping the projector")?;
        mailing.await.context("stopping the mailer")?;
        if let Some(relaying) = relaying {
            relaying.await.context("stopping the JetStream relay")?;
        }
        delivering.await.context("stopping the webhook delivery")?;
        pruning
            .await
            .context("stopping the login history pruning")?;
        following
            .stopped()
            .await
            .context("stopping the query side's background tasks")?;
        served.context("serving HTTP")
    }
}

/// The SQLite file and the keys live in a directory that may not exist yet.
fn create_parent_directories(settings: &command_api::Settings) -> anyhow::Result<()> {
    let database = settings.database.url.sqlite_file().map(PathBuf::from);
    let keys = [
        settings.tokens.signing_key_file.clone(),
        settings.tokens.refresh_token_key_file.clone(),
        settings.mail.token_key_file.clone(),
        settings.webhooks.secret_key_file.clone(),
        settings.personal_data.master_key_file.clone(),
        settings.personal_data.lookup_key_file.clone(),
    ];
    for file in database.into_iter().chain(keys.into_iter().flatten()) {
        if let Some(directory) = file.parent().filter(|parent| *parent != Path::new("")) {
            std::fs::create_dir_all(directory)
                .with_context(|| format!("creating {}", directory.display()))?;
        }
    }
    Ok(())
}

/// What the routes the parts do not each answer here need: one key set, one document, one
/// readiness over both databases.
#[derive(Clone)]
struct Shared {
    jwks: serde_json::Value,
    store: Arc<dyn MessageStore>,
    read_model: query_api::UsersView,
}

async fn jwks(State(shared): State<Shared>) -> Response {
    platform::http::jwks_response(shared.jwks)
}

/// Both APIs' documents as one.
async fn openapi() -> axum::Json<utoipa::openapi::OpenApi> {
    let mut document = command_api::ApiDoc::openapi();
    document.merge(query_api::ApiDoc::openapi());
    document.info.title = "Identity service".into();
    axum::Json(document)
}

async fn readyz(State(shared): State<Shared>) -> Response {
    let (store, read_model) = tokio::join!(shared.store.ping(), shared.read_model.ping());
    platform::http::readiness([
        ("message store", store.map_err(|error| error.to_string())),
        ("read model", read_model.map_err(|error| error.to_string())),
    ])
}
