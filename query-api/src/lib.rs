//! The query API: profiles, lookups and history over HTTP, served from the read model the
//! aggregator builds, with the message store behind history and time travel.
//!
//! It never writes. It verifies tokens offline with public keys, and answers a request that
//! carries `X-Min-Position` only once the read model has applied that position (read your
//! own writes).

#![forbid(unsafe_code)]

pub mod auth;
pub mod cache;
mod error;
pub mod freshness;
mod history;
pub mod read_model;
mod routes;
pub mod settings;

use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::routing::get;
use message_store::MessageStore;
use platform::clock::Clock;
use tokens::TokenVerifier;
use tokio::net::TcpListener;

pub use read_model::{Profile, ReadModel};
pub use routes::ApiDoc;
pub use settings::Settings;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub read_model: ReadModel,
    /// Profiles already read, kept current by following the read model (ADR 6).
    pub profiles: Arc<cache::ProfileCache>,
    /// How recent the users view is, measured against the message store: whether a row may
    /// say an account is still active.
    pub freshness: Arc<freshness::ViewFreshness>,
    pub store: Arc<dyn MessageStore>,
    pub verifier: Arc<TokenVerifier>,
    /// Tokens already verified, shared by every request.
    pub tokens: Arc<auth::VerifiedTokens>,
    pub clock: Arc<dyn Clock>,
    pub settings: settings::QuerySettings,
}

impl AppState {
    /// The state over connections made elsewhere; starts following the read model for the
    /// kept profiles and sampling the store's position (for as long as the runtime runs).
    pub fn new(
        read_model: ReadModel,
        store: Arc<dyn MessageStore>,
        verifier: Arc<TokenVerifier>,
        clock: Arc<dyn Clock>,
        settings: settings::QuerySettings,
    ) -> Self {
        let interval = std::time::Duration::from_millis(settings.cache_sync_ms.max(1));
        let profiles = Arc::new(cache::ProfileCache::new(
            settings.cache_profiles,
            (interval * 10).max(std::time::Duration::from_secs(1)),
        ));
        tokio::spawn({
            let (profiles, read_model) = (profiles.clone(), read_model.clone());
            async move { profiles.follow(read_model, interval).await }
        });
        let freshness = Arc::new(freshness::ViewFreshness::new(
            std::time::Duration::from_millis(settings.max_view_lag_ms),
        ));
        if settings.max_view_lag_ms > 0 {
            tokio::spawn({
                let (freshness, store) = (freshness.clone(), store.clone());
                async move { freshness.follow(store).await }
            });
        }
        Self {
            read_model,
            profiles,
            freshness,
            store,
            verifier,
            tokens: Arc::default(),
            clock,
            settings,
        }
    }

    /// Connects to the read model and the message store and loads the verification keys.
    pub async fn connect(settings: &Settings, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        let read_model_url = settings.read_model_url();
        let read_model = ReadModel::connect(
            read_model_url,
            settings
                .read_model
                .max_connections
                .unwrap_or(settings.database.max_connections),
        )
        .await
        .with_context(|| {
            format!(
                "connecting to the read model at {}",
                platform::settings::redact_url(read_model_url)
            )
        })?;
        let store = message_store::connect(
            &settings.database.url,
            message_store::ConnectOptions {
                max_connections: settings.database.max_connections.min(4),
                poll_interval: settings.database.poll_interval(),
            },
        )
        .await
        .with_context(|| {
            format!(
                "connecting to the message store at {}",
                platform::settings::redact_url(&settings.database.url)
            )
        })?;
        let verifier = settings
            .tokens
            .verifier()
            .context("loading the keys that verify tokens")?;
        Ok(Self::new(
            read_model,
            store,
            Arc::new(verifier),
            clock,
            settings.query,
        ))
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
        .route("/users", get(routes::list))
        .route("/users/{id}", get(routes::profile))
        .route("/users/{id}/events", get(routes::events))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            routes::wait_for_min_position,
        ))
        .with_state(state)
}

/// A built query API, bound to its port, ready to run.
pub struct Application {
    listener: TcpListener,
    router: Router,
}

impl Application {
    pub async fn build(settings: Settings, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        let state = AppState::connect(&settings, clock).await?;
        let listener = TcpListener::bind(&settings.http.address)
            .await
            .with_context(|| format!("binding {}", settings.http.address))?;
        Ok(Self {
            listener,
            router: platform::http::with_common_layers(router(state)),
        })
    }

    pub fn port(&self) -> u16 {
        self.listener
            .local_addr()
            .map_or(0, |address| address.port())
    }

    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        tracing::info!(address = %self.listener.local_addr()?, "query API listening");
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(shutdown)
            .await
            .context("serving the query API")
    }
}
