//! The query API: profiles, lookups, history and the caller's sessions over HTTP, served from
//! the read model the aggregator builds, with the message store behind history, time travel and
//! the check that a token's session is still live.
//!
//! It never writes. It verifies tokens offline with public keys, and answers a request that
//! carries `X-Min-Position` only once the read model has applied that position (read your
//! own writes). Personal fields of events are sealed with a key per person (ADR 13): it opens
//! them with the key vault in the message store's database, which it only reads, and shows an
//! erased person's events with those fields null; the read model holds an erased account as a
//! row without an address, which no lookup by address finds.
//!
//! Administrators read the webhook endpoints here too (`webhooks.rs`): folded from their
//! streams in the message store, never with a secret, and the recent attempts to deliver to
//! each from the read model.

#![forbid(unsafe_code)]

pub mod auth;
pub mod cache;
mod error;
mod export;
pub mod freshness;
mod history;
pub mod read_model;
mod routes;
pub mod session_ends;
mod sessions;
pub mod settings;
mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::routing::get;
use message_store::MessageStore;
use personal_data::Sealer;
use platform::clock::Clock;
use platform::openapi::BearerAuth;
use platform::shutdown::Shutdown;
use tokens::TokenVerifier;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::{JoinError, JoinHandle};
use utoipa::OpenApi;

pub use read_model::{Profile, UsersView};
pub use settings::Settings;

/// The query API's OpenAPI document, from its handlers' annotations.
#[derive(OpenApi)]
#[openapi(
    info(title = "Identity query API", description = "Profiles, lookups, history and the caller's sessions, served from the read model; webhook endpoints and their deliveries, for administrators."),
    paths(routes::me, export::own_export, routes::profile, routes::list, routes::events, sessions::own_sessions,
        webhooks::list, webhooks::one, webhooks::deliveries, routes::jwks, routes::readyz),
    components(schemas(Profile, routes::Page, history::HistoryEntry, routes::EventPage, sessions::OwnSession, export::AccountExport, export::ExportedSession,
        webhooks::Webhook, webhooks::WebhookList, webhooks::Delivery, webhooks::DeliveryList)),
    modifiers(&BearerAuth),
)]
pub struct ApiDoc;

/// What every handler shares, behind one reference count: the router clones it for every
/// request (the state extractor, the read-your-writes middleware).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The parts of [`AppState`].
pub struct Shared {
    pub read_model: UsersView,
    /// Profiles already read, kept current by following the read model (ADR 6).
    pub profiles: Arc<cache::ProfileCache>,
    /// How recent the users view is, measured against the message store: whether a row may
    /// say an account is still active.
    pub freshness: Arc<freshness::ViewFreshness>,
    pub store: Arc<dyn MessageStore>,
    /// Opens the personal fields of the messages read from the store, with their person's key.
    pub sealer: Sealer,
    pub verifier: Arc<TokenVerifier>,
    /// Tokens already verified, shared by every request.
    pub tokens: Arc<auth::VerifiedTokens>,
    /// Administrators the message store said are active, for at most `max_view_lag_ms`.
    pub administrators: Arc<auth::VerifiedAdministrators>,
    /// Sessions the message store said are live: for `max_view_lag_ms`, or for as long as
    /// the follower of session ends is current.
    pub sessions: Arc<session_ends::VerifiedSessions>,
    pub clock: Arc<dyn Clock>,
    pub settings: settings::QuerySettings,
}

impl AppState {
    /// The state over connections made elsewhere, and its background tasks, which run until
    /// `shutdown` completes.
    pub fn start(
        read_model: UsersView,
        store: Arc<dyn MessageStore>,
        sealer: Sealer,
        verifier: Arc<TokenVerifier>,
        clock: Arc<dyn Clock>,
        settings: settings::QuerySettings,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> (Self, BackgroundTasks) {
        let state = Self::assemble(read_model, store, sealer, verifier, clock, settings);
        let tasks = state.spawn_background(shutdown);
        (state, tasks)
    }

    /// The state alone: nothing follows the read model or samples the store until
    /// [`Self::spawn_background`].
    fn assemble(
        read_model: UsersView,
        store: Arc<dyn MessageStore>,
        sealer: Sealer,
        verifier: Arc<TokenVerifier>,
        clock: Arc<dyn Clock>,
        settings: settings::QuerySettings,
    ) -> Self {
        let profiles = Arc::new(cache::ProfileCache::new(
            settings.cache_profiles,
            (sync_interval(&settings) * 10).max(Duration::from_secs(1)),
        ));
        let max_view_lag = Duration::from_millis(settings.max_view_lag_ms);
        let freshness = Arc::new(freshness::ViewFreshness::new(max_view_lag));
        let sessions = Arc::new(session_ends::VerifiedSessions::new(
            max_view_lag,
            freshness.clone(),
        ));
        Self(Arc::new(Shared {
            read_model,
            profiles,
            freshness,
            store,
            sealer,
            verifier,
            tokens: Arc::default(),
            administrators: Arc::new(auth::VerifiedAdministrators::new(max_view_lag)),
            sessions,
            clock,
            settings,
        }))
    }

    /// Starts what keeps the state current: the follower of the read model for the kept
    /// profiles (unless `cache_profiles` is 0: with nothing kept, it would read the checkpoint
    /// every `cache_sync_ms` for nothing), and the sampler of the store's position and the
    /// follower of session ends (unless `max_view_lag_ms` is 0, which trusts no row and
    /// remembers no session). Each stops once `shutdown` completes.
    pub fn spawn_background(
        &self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> BackgroundTasks {
        let shutdown = Shutdown::on(shutdown);
        let mut tasks = Vec::with_capacity(3);
        if self.settings.cache_profiles > 0 {
            tasks.push(tokio::spawn({
                let (profiles, read_model) = (self.profiles.clone(), self.read_model.clone());
                let interval = sync_interval(&self.settings);
                let stopped = shutdown.stopped();
                async move { profiles.follow(read_model, interval, stopped).await }
            }));
        }
        if self.settings.max_view_lag_ms > 0 {
            tasks.push(tokio::spawn({
                let (freshness, store) = (self.freshness.clone(), self.store.clone());
                let stopped = shutdown.stopped();
                async move { freshness.follow(store, stopped).await }
            }));
            tasks.push(tokio::spawn({
                let follower = session_ends::SessionEndsFollower::new(
                    self.sessions.clone(),
                    self.store.clone(),
                );
                let interval = self.freshness.interval();
                let stopped = shutdown.stopped();
                async move { follower.follow(interval, stopped).await }
            }));
        }
        BackgroundTasks(tasks)
    }

    /// Connects to the read model, the message store and its key vault, and loads the
    /// verification keys; the background tasks start with [`Self::spawn_background`].
    pub async fn connect(settings: &Settings, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        let read_model_url = settings.read_model.url_or(&settings.database);
        let read_model =
            UsersView::connect(read_model_url.expose(), settings.read_model_connections())
                .await
                .with_context(|| format!("connecting to the read model at {read_model_url}"))?;
        let store = message_store::connect(
            settings.database.url.expose(),
            message_store::ConnectOptions {
                max_connections: settings.database.max_connections.min(4),
                poll_interval: settings.database.poll_interval(),
            },
        )
        .await
        .with_context(|| {
            format!(
                "connecting to the message store at {}",
                settings.database.url
            )
        })?;
        let verifier = settings
            .tokens
            .verifier()
            .context("loading the keys that verify tokens")?;
        let sealer = open_sealer(settings).await?;
        Ok(Self::assemble(
            read_model,
            store,
            sealer,
            Arc::new(verifier),
            clock,
            settings.query,
        ))
    }
}

/// The sealer over the key vault in the message store's database, with the master keys alone:
/// the query API opens personal fields, and never names a reservation stream, so it needs no
/// lookup key.
async fn open_sealer(settings: &Settings) -> anyhow::Result<Sealer> {
    let master_keys = personal_data::master_keys(&settings.personal_data)
        .context("loading the personal data master keys")?;
    let vault = personal_data::connect(
        settings.database.url.expose(),
        master_keys,
        settings.database.max_connections.min(4),
    )
    .await
    .with_context(|| format!("opening the personal keys at {}", settings.database.url))?;
    Ok(Sealer::new(vault))
}

fn sync_interval(settings: &settings::QuerySettings) -> Duration {
    Duration::from_millis(settings.cache_sync_ms.max(1))
}

/// The query API's background tasks, each running until the shutdown signal they were started
/// with.
#[must_use = "dropping the handles detaches the tasks; they still stop with their signal"]
pub struct BackgroundTasks(Vec<JoinHandle<()>>);

impl BackgroundTasks {
    /// Whether every task has ended.
    pub fn is_finished(&self) -> bool {
        self.0.iter().all(JoinHandle::is_finished)
    }

    /// Waits until every task has ended.
    pub async fn stopped(self) -> Result<(), JoinError> {
        for task in self.0 {
            task.await?;
        }
        Ok(())
    }
}

/// The query routes, the keys, the document and readiness, without the common layers.
pub fn router(state: AppState) -> Router {
    query_routes(state.clone()).merge(
        Router::new()
            .route("/.well-known/jwks.json", get(routes::jwks))
            .route("/openapi.json", get(routes::openapi))
            .route("/readyz", get(routes::readyz))
            .with_state(state),
    )
}

/// The reads alone, for a process that serves them beside the command routes and answers the
/// keys, the document and readiness itself.
pub fn query_routes(state: AppState) -> Router {
    Router::new()
        .route("/users/me", get(routes::me))
        .route("/users/me/sessions", get(sessions::own_sessions))
        .route("/users/me/export", get(export::own_export))
        .route("/users", get(routes::list))
        .route("/users/{id}", get(routes::profile))
        .route("/users/{id}/events", get(routes::events))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            routes::wait_for_min_position,
        ))
        .merge(webhooks::routes())
        .with_state(state)
}

/// A built query API, bound to its port, ready to run.
pub struct Application {
    listener: TcpListener,
    state: AppState,
}

impl Application {
    pub async fn build(settings: Settings, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        let state = AppState::connect(&settings, clock).await?;
        let listener = TcpListener::bind(&settings.http.address)
            .await
            .with_context(|| format!("binding {}", settings.http.address))?;
        Ok(Self { listener, state })
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    pub fn port(&self) -> u16 {
        self.listener
            .local_addr()
            .map_or(0, |address| address.port())
    }

    /// Serves until `shutdown` completes, keeping the state current meanwhile; returns once
    /// the requests in flight are answered and the background tasks have ended (they serve
    /// those requests too, so they stop last).
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (served, serving_ended) = oneshot::channel::<()>();
        let background = self.state.spawn_background(async {
            let _ = serving_ended.await;
        });
        tracing::info!(address = %self.listener.local_addr()?, "query API listening");
        let router = platform::http::with_common_layers(router(self.state));
        let serving = axum::serve(self.listener, router)
            .with_graceful_shutdown(shutdown)
            .await
            .context("serving the query API");
        drop(served);
        background
            .stopped()
            .await
            .context("stopping the query API's background tasks")?;
        serving
    }
}
