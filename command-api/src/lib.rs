//! The command API: the write side of the identity service over HTTP.
//!
//! Registration, login with a signed JWT, activation, deactivation and password change. Each
//! command reads the streams it needs from the message store, lets the pure domain
//! (`identity`) decide, and appends what it decided; nothing here reads the read model.
//!
//! - [`settings`]: what can be configured, with defaults.
//! - [`service`]: the commands without HTTP.
//! - [`routes`]: the handlers, the bearer-token check and the OpenAPI document.
//! - [`hashing`]: argon2id off the runtime, on a bounded set of threads (one per core).
//! - [`reservation`]: email uniqueness through reservation streams.
//! - [`error`]: the one API error type and its status table.

#![forbid(unsafe_code)]

pub mod error;
pub mod hashing;
pub mod reservation;
pub mod routes;
pub mod service;
pub mod settings;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use identity::{InitialStatus, Role};
use message_store::{ConnectOptions, MessageStore};
use platform::clock::Clock;
use tokens::TokenIssuer;
use tokio::net::TcpListener;

pub use routes::{ApiDoc, AppState, command_routes, router};
pub use service::{Commands, Done};
pub use settings::Settings;

use crate::hashing::Hasher;
use crate::service::CommandError;

/// The command API, bound to its port and ready to serve.
pub struct Application {
    listener: TcpListener,
    port: u16,
    state: AppState,
    retention: Duration,
    prune_interval: Duration,
}

impl Application {
    /// Connects to the store, loads the keys, makes the hasher and binds the listener.
    pub async fn build(settings: Settings, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        // Installs the Prometheus recorder now, so the first logins are counted.
        platform::metrics::handle();
        let state = build_state(&settings, clock).await?;
        let listener = TcpListener::bind(&settings.http.address)
            .await
            .with_context(|| format!("binding {}", settings.http.address))?;
        let port = listener.local_addr()?.port();
        Ok(Self {
            listener,
            port,
            state,
            retention: Duration::from_secs(
                u64::from(settings.login.history_retention_days) * 24 * 3600,
            ),
            prune_interval: Duration::from_secs(settings.login.prune_interval_seconds.max(1)),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` completes, pruning the login history meanwhile.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let pruning = tokio::spawn(prune_login_history(
            self.state.commands.clone(),
            self.retention,
            self.prune_interval,
        ));
        let app = platform::http::with_common_layers(router(self.state));
        tracing::info!(port = self.port, "the command API is listening");
        let served = axum::serve(self.listener, app)
            .with_graceful_shutdown(shutdown)
            .await;
        pruning.abort();
        served.context("serving HTTP")
    }
}

/// Everything the routes need, from settings: the store, the keys, the hasher.
pub async fn build_state(settings: &Settings, clock: Arc<dyn Clock>) -> anyhow::Result<AppState> {
    let store = connect(settings).await?;
    state_with_store(settings, clock, store)
}

/// The routes' state on a store opened elsewhere (the standalone process shares one store
/// between its parts, so that appends wake its projector in-process).
pub fn state_with_store(
    settings: &Settings,
    clock: Arc<dyn Clock>,
    store: Arc<dyn MessageStore>,
) -> anyhow::Result<AppState> {
    let keys = settings
        .tokens
        .key_set()
        .context("loading the signing keys")?;
    let issuer = TokenIssuer::new(keys, settings.tokens.settings());
    let verifier = Arc::new(issuer.verifier());
    let hasher = Hasher::new(
        &settings.password,
        settings.login.hashing_threads(),
        settings.login.max_waiting_hashes,
    )?;
    let commands = Arc::new(Commands {
        store,
        hasher,
        issuer,
        clock,
        password_policy: settings.password.policy(),
        lockout: settings.login.lockout_policy(),
        refusal_padding: settings.login.refusal_padding(),
        initial_status: settings.registration.initial_status.into(),
    });
    Ok(AppState { commands, verifier })
}

async fn connect(settings: &Settings) -> anyhow::Result<Arc<dyn MessageStore>> {
    let options = ConnectOptions {
        max_connections: settings.database.max_connections,
        poll_interval: settings.database.poll_interval(),
    };
    message_store::connect(settings.database.url.expose(), options)
        .await
        .with_context(|| {
            format!(
                "connecting to the message store at {}",
                settings.database.url
            )
        })
}

/// Deletes login events older than `retention` (each account's last one stays: it is the
/// login state), at once and then every `interval`.
pub async fn prune_login_history(commands: Arc<Commands>, retention: Duration, interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    loop {
        ticks.tick().await;
        let Ok(retention) = chrono::TimeDelta::from_std(retention) else {
            return;
        };
        let older_than = commands.clock.now() - retention;
        match commands
            .store
            .prune_category(identity::LOGIN_CATEGORY, older_than)
            .await
        {
            Ok(deleted) => tracing::info!(deleted, "pruned the login history"),
            Err(error) => tracing::warn!(error = %error, "pruning the login history failed"),
        }
    }
}

/// Creates an active administrator (roles admin and user): the operator's first account.
pub async fn create_admin(
    settings: &Settings,
    clock: Arc<dyn Clock>,
    email: &str,
    password: String,
) -> anyhow::Result<Done> {
    let state = build_state(settings, clock).await?;
    let created = state
        .commands
        .register(
            email,
            password,
            None,
            vec![Role::Admin, Role::User],
            InitialStatus::Active,
        )
        .await;
    created.map_err(|error| match error {
        CommandError::EmailTaken => anyhow::anyhow!("an account with this email exists already"),
        CommandError::Validation(errors) => {
            let reasons: Vec<_> = errors
                .iter()
                .map(|e| format!("{}: {}", e.field, e.message))
                .collect();
            anyhow::anyhow!("{}", reasons.join("; "))
        }
        other => other.into(),
    })
}
