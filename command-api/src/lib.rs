//! The command API: the write side of the identity service over HTTP.
//!
//! Registration, login with a signed JWT and a session, refresh, logout, ending sessions,
//! activation, deactivation, password change, account recovery and erasure. Each command reads
//! the streams it needs from the message store, lets the pure domain (`identity`) decide, and
//! appends what it decided; nothing here reads the read model. The personal fields of what it
//! writes are sealed with a key per person, and those of what it reads opened (ADR 13).
//!
//! - [`settings`]: what can be configured, with defaults.
//! - [`service`]: the commands without HTTP.
//! - [`sessions`]: the session commands without HTTP, and the check of a bearer token's session.
//! - [`recovery`]: registration by mode, verification, password reset and change of email,
//!   without HTTP; their routes are in `recovery_routes.rs`.
//! - [`erasure`]: erasing an account (its key deleted, its address released), without HTTP.
//! - [`webhooks`]: registering, rotating, enabling and deleting webhook endpoints, without
//!   HTTP; their routes are in `webhook_routes.rs`.
//! - `personal.rs`: sealing the personal fields written and opening those read, with the vault.
//! - [`routes`]: the handlers, the bearer-token check and the OpenAPI document.
//! - [`hashing`]: argon2id off the runtime, on a bounded set of threads (one per core).
//! - [`reservation`]: email uniqueness through reservation streams named by a keyed hash.
//! - [`error`]: the one API error type and its status table.

#![forbid(unsafe_code)]

pub mod erasure;
pub mod error;
pub mod hashing;
pub mod history_sealing;
mod personal;
pub mod recovery;
mod recovery_routes;
pub mod reservation;
pub mod routes;
pub mod service;
pub mod sessions;
pub mod settings;
mod webhook_routes;
pub mod webhooks;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use identity::{InitialStatus, Role};
use message_store::{ConnectOptions, MessageStore};
use personal_data::PersonalData;
use platform::clock::Clock;
use platform::shutdown::Shutdown;
use tokens::TokenIssuer;
use tokio::net::TcpListener;

pub use routes::{ApiDoc, AppState, command_routes, router};
pub use service::{Commands, Done};
pub use settings::{LoginSettings, SessionSettings, Settings};

use crate::hashing::Hasher;
use crate::service::CommandError;

/// The command API, bound to its port and ready to serve.
pub struct Application {
    listener: TcpListener,
    port: u16,
    state: AppState,
    login: LoginSettings,
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
            login: settings.login,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` completes, running the background work meanwhile; returns once
    /// the requests in flight are answered and the background work has stopped.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let shutdown = Shutdown::on(shutdown);
        let background = tokio::spawn(run_background(
            self.state.clone(),
            self.login,
            shutdown.clone(),
        ));
        let app = platform::http::with_common_layers(router(self.state));
        tracing::info!(port = self.port, "the command API is listening");
        let served = axum::serve(self.listener, app)
            .with_graceful_shutdown(shutdown.stopped())
            .await;
        background
            .await
            .context("stopping the command API's background work")?;
        served.context("serving HTTP")
    }
}

/// The command API's background work, until `shutdown`: pruning the login history. A process
/// that serves [`command_routes`] beside other parts runs it too.
pub async fn run_background(state: AppState, login: LoginSettings, shutdown: Shutdown) {
    prune_login_history(
        state.commands,
        login.history_retention(),
        login.prune_interval(),
        shutdown,
    )
    .await;
}

/// Everything the routes need, from settings: the store, the key vault and the lookup key, the
/// signing keys, the hasher. Refuses a store whose history holds personal data in clear
/// (`command-api seal-history`).
pub async fn build_state(settings: &Settings, clock: Arc<dyn Clock>) -> anyhow::Result<AppState> {
    let store = connect(settings).await?;
    let personal = open_personal_data(settings).await?;
    history_sealing::ensure_sealed(store.as_ref(), &personal.sealer).await?;
    state_with_store(settings, clock, store, personal)
}

/// The key vault, in the message store's database (`database.url`), and the lookup key, with the
/// keys `personal_data` names. Applies the vault's migrations when they are not yet.
pub async fn open_personal_data(settings: &Settings) -> anyhow::Result<PersonalData> {
    let url = &settings.database.url;
    PersonalData::open(
        url.expose(),
        &settings.personal_data,
        settings.database.max_connections,
    )
    .await
    .with_context(|| format!("opening the personal data key vault at {url}"))
}

/// The routes' state on a store and a vault opened elsewhere (the standalone process shares one
/// store between its parts, so that appends wake its projector in-process, and one vault).
pub fn state_with_store(
    settings: &Settings,
    clock: Arc<dyn Clock>,
    store: Arc<dyn MessageStore>,
    personal: PersonalData,
) -> anyhow::Result<AppState> {
    let keys = settings
        .tokens
        .key_set()
        .context("loading the signing keys")?;
    let issuer = TokenIssuer::new(keys, settings.tokens.settings());
    let refresh_key = settings
        .tokens
        .refresh_token_key()
        .context("loading the refresh token key")?;
    settings.registration.check()?;
    let mail = &settings.mail;
    let mail_key = tokens::MailTokenKey::configured(
        mail.token_key.as_deref(),
        mail.token_key_file.as_deref(),
        mail.create_key_if_missing,
    )
    .context("loading the mail token key")?;
    let webhooks = webhooks::Webhooks::new(
        store.clone(),
        clock.clone(),
        &settings.webhooks,
        &settings.integration,
    )?;
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
        refresh_key,
        session_policy: settings.sessions.policy(),
        clock,
        password_policy: settings.password.policy(),
        lockout: settings.login.lockout_policy(),
        refusal_padding: settings.login.refusal_padding(),
        registration_mode: settings.registration.mode,
        mail_key,
        recovery_policy: settings::recovery_policy(&settings.mail),
        answer_after: settings.mail.answer_after(),
        sealer: personal.sealer,
        lookup_key: personal.lookup_key,
    });
    Ok(AppState {
        commands,
        webhooks: Arc::new(webhooks),
        verifier,
    })
}

pub async fn connect(settings: &Settings) -> anyhow::Result<Arc<dyn MessageStore>> {
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
/// login state), at once and then every `interval`, until `shutdown`.
async fn prune_login_history(
    commands: Arc<Commands>,
    retention: Duration,
    interval: Duration,
    shutdown: Shutdown,
) {
    let Ok(retention) = chrono::TimeDelta::from_std(retention) else {
        return;
    };
    let stopped = shutdown.stopped();
    tokio::pin!(stopped);
    let mut ticks = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = &mut stopped => return,
        }
        let older_than = commands.clock.now() - retention;
        let pruned = commands
            .store
            .prune_category(identity::LOGIN_CATEGORY, older_than);
        // A prune cut off by the shutdown rolls back; the next start prunes again.
        let pruned = tokio::select! {
            pruned = pruned => pruned,
            () = &mut stopped => return,
        };
        match pruned {
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
