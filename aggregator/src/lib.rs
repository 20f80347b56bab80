//! The aggregator: the consumers of the message store (the worker that projects its events into
//! the read model, the mailer, the JetStream relay and the delivery to each webhook endpoint),
//! and the operator's commands around them (`migrate`, `status`, `reset`, `rebuild`).
//!
//! - [`view`]: the users and sessions views as values and how each event changes them (pure).
//! - [`read_model`]: the read model's database (PostgreSQL or SQLite), its schema, and the
//!   one-transaction batch commit with the checkpoint.
//! - [`consumer`]: what every consumer shares: the loop, the lock and the takeover between
//!   replicas.
//! - [`projector`]: the users projection's worker, one batch at a time or as a loop.
//! - [`mailer`]: the mailer, which sends the mails recovery events call for.
//! - [`jetstream`]: the relay, which publishes integration events to NATS JetStream (when
//!   `nats.url` is set).
//! - [`webhooks`]: a consumer per webhook endpoint, started and stopped as endpoints are
//!   registered, enabled, disabled and deleted.
//! - [`admin`]: status, reset and rebuild.
//!
//! [`Application`] wires them to settings and a small HTTP port (`/healthz`, `/readyz`,
//! `/metrics`); the standalone binary runs the same [`Projector`], [`Mailer`], [`Relay`] and
//! [`WebhookSupervisor`] inside its own process.
//!
//! Every consumer reads personal data (ADR 13): each batch they read from the store goes through
//! a [`Sealer`] over the key vault in the message store's database, one key query per batch,
//! before any event is decoded; fields of an erased person read as erased.

#![forbid(unsafe_code)]

pub mod admin;
pub mod consumer;
pub mod jetstream;
pub mod mailer;
pub mod projector;
pub mod read_model;
pub mod view;
pub mod webhooks;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::routing::get;
use integration::{IntegrationSettings, WebhookSettings};
use message_store::{ConnectOptions, MessageStore};
use personal_data::{KeyVault, MasterKeys, Sealer};
use platform::clock::{Clock, SystemClock};
use platform::settings::{
    DatabaseSettings, HttpSettings, LogSettings, MailSettings, PersonalDataSettings,
    ReadModelSettings, RedactedUrl,
};
use platform::shutdown::Shutdown;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::watch;

use consumer::Backoff;
use mailer::mails::Letters;
use mailer::postman::{self, Postman};

pub use jetstream::{NatsSettings, Relay, RelayOptions, RelayOutcome, RelayStats};
pub use mailer::{MailOutcome, Mailer, MailerOptions, MailerStats};
pub use projector::{Outcome, Projector, ProjectorOptions, ProjectorStats};
pub use read_model::{ReadModelWriter, Target};
pub use webhooks::{WebhookSupervisor, WebhookWatch};

/// Every setting of the aggregator. Environment variables override them as
/// `IDENTITY__SECTION__KEY`, for example `IDENTITY__READ_MODEL__URL`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// The message store.
    pub database: DatabaseSettings,
    pub read_model: ReadModelSettings,
    pub aggregator: AggregatorSettings,
    /// Where the mailer sends, from whom, its links and their key (shared with the command
    /// API).
    pub mail: MailSettings,
    /// The master keys the persons' keys are wrapped with (shared with the command API and the
    /// query API). The aggregator reads no lookup key: it looks no address up.
    pub personal_data: PersonalDataSettings,
    /// Where the JetStream relay publishes; without `nats.url` there is no relay.
    pub nats: NatsSettings,
    /// What is published (shared with the command API): the CloudEvents `source` and the event
    /// types.
    pub integration: IntegrationSettings,
    /// How webhook endpoints are delivered to, and the key their secrets are derived with
    /// (shared with the command API).
    pub webhooks: WebhookSettings,
    pub log: LogSettings,
}

/// Connections of the key vault's pool: a key query per batch of the projection (and of its
/// read ahead) and of the mailer, and readiness.
const VAULT_CONNECTIONS: u32 = 4;

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct AggregatorSettings {
    pub http: HttpSettings,
    /// Messages read and committed per batch.
    pub batch_size: usize,
    /// How often a standby replica tries to take a projection.
    pub lock_retry_ms: u64,
    /// How long the server keeps a projection's lock for a holder that has gone silent without
    /// closing its connection (docs/adr/0008): a standby takes over within
    /// `lock_lease_ms + lock_retry_ms`.
    pub lock_lease_ms: u64,
    pub mailer: MailerSettings,
    pub relay: RelaySettings,
}

impl Default for AggregatorSettings {
    fn default() -> Self {
        Self {
            http: HttpSettings::on("0.0.0.0:8082"),
            batch_size: 1000,
            lock_retry_ms: 1000,
            lock_lease_ms: 5000,
            mailer: MailerSettings::default(),
            relay: RelaySettings::default(),
        }
    }
}

/// How the mailer works (what it sends, and where, is `mail`, shared with the command API).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct MailerSettings {
    /// Recovery messages read per step: a crash sends at most one batch's mails again.
    pub batch_size: usize,
    /// The wait before a transient failure (the SMTP server down, a 4xx) is tried again,
    /// doubled after each failure in a row up to `retry_max_ms`.
    pub retry_first_ms: u64,
    pub retry_max_ms: u64,
    /// How long a mail's exchange with the SMTP server may take, and so may opening a
    /// connection to it (greeting, TLS and login).
    pub smtp_timeout_ms: u64,
}

impl Default for MailerSettings {
    fn default() -> Self {
        Self {
            batch_size: 100,
            retry_first_ms: 1000,
            retry_max_ms: 60_000,
            smtp_timeout_ms: 30_000,
        }
    }
}

/// How the JetStream relay works (where it publishes is `nats`, what is `integration`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct RelaySettings {
    /// Messages read per step; the events among them are published as one pipelined batch.
    pub batch_size: usize,
    /// The wait before a failed step (NATS down, an acknowledgement missing) is tried again,
    /// doubled after each failure in a row up to `retry_max_ms`.
    pub retry_first_ms: u64,
    pub retry_max_ms: u64,
}

impl Default for RelaySettings {
    fn default() -> Self {
        let options = RelayOptions::default();
        Self {
            batch_size: options.batch_size,
            retry_first_ms: options.retry.first.as_millis() as u64,
            retry_max_ms: options.retry.max.as_millis() as u64,
        }
    }
}

impl Settings {
    /// The read model's pool: its own size, else 8 (the worker writes on one connection at a
    /// time; the rest serve `status`, readiness and rebuilds).
    pub fn read_model_connections(&self) -> u32 {
        self.read_model.max_connections.unwrap_or(8)
    }

    pub fn projector_options(&self) -> ProjectorOptions {
        ProjectorOptions {
            batch_size: self.aggregator.batch_size.max(1),
            lock_retry: Duration::from_millis(self.aggregator.lock_retry_ms.max(10)),
            lock_lease: Duration::from_millis(self.aggregator.lock_lease_ms.max(100)),
            ..ProjectorOptions::default()
        }
    }

    pub fn mailer_options(&self) -> MailerOptions {
        let mailer = &self.aggregator.mailer;
        let first = Duration::from_millis(mailer.retry_first_ms.max(1));
        MailerOptions {
            batch_size: mailer.batch_size.max(1),
            lock_retry: Duration::from_millis(self.aggregator.lock_retry_ms.max(10)),
            lock_lease: Duration::from_millis(self.aggregator.lock_lease_ms.max(100)),
            retry: Backoff {
                first,
                max: Duration::from_millis(mailer.retry_max_ms).max(first),
            },
        }
    }

    /// The mailer over `store` (its messages opened by `sealer`) and `read_model`: SMTP to
    /// `mail.smtp_url`, or the outbox without one. Fails without a mail token key: the links
    /// could not be made.
    pub fn mailer(
        &self,
        store: Arc<dyn MessageStore>,
        sealer: Sealer,
        read_model: ReadModelWriter,
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<Mailer> {
        let mail = &self.mail;
        let key = tokens::MailTokenKey::configured(
            mail.token_key.as_deref(),
            mail.token_key_file.as_deref(),
            mail.create_key_if_missing,
        )
        .context("loading the mail token key")?;
        let letters = Letters::new(postman::sender(mail)?, &mail.link_base_url, key);
        let timeout = Duration::from_millis(self.aggregator.mailer.smtp_timeout_ms.max(1));
        let postman = Postman::from_settings(mail, timeout)?;
        if let Postman::Outbox(directory) = &postman {
            tracing::info!(
                directory = %directory.display(),
                "no mail.smtp_url: mails are written to the outbox, and their links logged"
            );
        }
        Ok(Mailer::new(
            store,
            sealer,
            read_model,
            postman,
            letters,
            clock,
            self.mailer_options(),
        ))
    }

    pub fn relay_options(&self) -> RelayOptions {
        let relay = &self.aggregator.relay;
        let first = Duration::from_millis(relay.retry_first_ms.max(1));
        RelayOptions {
            batch_size: relay.batch_size.max(1),
            lock_retry: Duration::from_millis(self.aggregator.lock_retry_ms.max(10)),
            lock_lease: Duration::from_millis(self.aggregator.lock_lease_ms.max(100)),
            retry: Backoff {
                first,
                max: Duration::from_millis(relay.retry_max_ms).max(first),
            },
        }
    }

    /// The JetStream relay over `store` (its messages opened by `sealer`) and `read_model`, or
    /// `None` without `nats.url`. Connects in the background: NATS need not answer yet. Fails
    /// on settings it cannot use (an unknown event type, a bad URL, unreadable credentials).
    pub async fn relay(
        &self,
        store: Arc<dyn MessageStore>,
        sealer: Sealer,
        read_model: ReadModelWriter,
    ) -> anyhow::Result<Option<Relay>> {
        if self.nats.url.as_ref().is_none_or(RedactedUrl::is_empty) {
            return Ok(None);
        }
        let published = self
            .integration
            .published()
            .context("reading integration.events")?;
        let jetstream = jetstream::JetStream::connect(&self.nats)
            .await
            .context("setting up the NATS client")?;
        tracing::info!(
            url = %self.nats.url.as_ref().map(ToString::to_string).unwrap_or_default(),
            stream = %self.nats.stream,
            types = ?published.iter().map(integration::EventType::name).collect::<Vec<_>>(),
            "the JetStream relay publishes integration events"
        );
        Ok(Some(Relay::new(
            store,
            sealer,
            read_model,
            jetstream,
            self.integration.source.clone(),
            published,
            self.relay_options(),
        )))
    }

    /// The delivery to webhook endpoints over `store` (its messages opened by `sealer`), its
    /// checkpoints and attempts in `read_model`. Fails without a webhook secret key, or on
    /// settings it cannot use (an unknown event type, a network that is not one).
    pub fn webhook_supervisor(
        &self,
        store: Arc<dyn MessageStore>,
        sealer: Sealer,
        read_model: ReadModelWriter,
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<WebhookSupervisor> {
        let lock = consumer::LockTiming {
            retry: Duration::from_millis(self.aggregator.lock_retry_ms.max(10)),
            lease: Duration::from_millis(self.aggregator.lock_lease_ms.max(100)),
        };
        let delivery = webhooks::DeliverySettings::from_settings(
            &self.webhooks,
            &self.integration,
            webhooks::secret_key(&self.webhooks)?,
            lock,
            self.aggregator.batch_size.max(1),
        )?;
        Ok(WebhookSupervisor::new(
            delivery, store, sealer, read_model, clock,
        ))
    }

    /// Opens the message store (applying its migrations, as every store client does).
    pub async fn connect_store(&self) -> anyhow::Result<Arc<dyn MessageStore>> {
        message_store::connect(
            self.database.url.expose(),
            ConnectOptions {
                max_connections: self.database.max_connections,
                poll_interval: self.database.poll_interval(),
            },
        )
        .await
        .context("connecting to the message store")
    }

    /// The master keys `personal_data` names (the current one, and those retired by a rotation
    /// whose keys may not all be rewrapped yet).
    pub fn master_keys(&self) -> anyhow::Result<MasterKeys> {
        personal_data::master_keys(&self.personal_data).context("loading the master keys")
    }

    /// Opens the key vault in the message store's database (applying its migrations, as every
    /// client of it does), under the master keys `personal_data` names.
    pub async fn connect_vault(&self) -> anyhow::Result<Arc<dyn KeyVault>> {
        personal_data::connect(
            self.database.url.expose(),
            self.master_keys()?,
            VAULT_CONNECTIONS,
        )
        .await
        .context("opening the personal key vault")
    }

    /// The sealer the consumers open the messages they read with.
    pub async fn sealer(&self) -> anyhow::Result<Sealer> {
        Ok(Sealer::new(self.connect_vault().await?))
    }

    /// Opens the read model. Does not migrate: see [`migrate`].
    pub async fn connect_read_model(&self) -> anyhow::Result<ReadModelWriter> {
        ReadModelWriter::connect(
            self.read_model.url_or(&self.database).expose(),
            self.read_model_connections(),
        )
        .await
        .context("connecting to the read model")
    }
}

/// Applies the read model's migrations (`aggregator migrate`); idempotent.
pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let read_model = settings.connect_read_model().await?;
    read_model
        .migrate()
        .await
        .context("applying the read model migrations")
}

/// The running aggregator: the users projector, the mailer, the JetStream relay (when NATS is
/// configured) and its HTTP port.
pub struct Application {
    listener: TcpListener,
    store: Arc<dyn MessageStore>,
    sealer: Sealer,
    read_model: ReadModelWriter,
    projector: Projector,
    mailer: Mailer,
    relay: Option<Relay>,
    webhooks: WebhookSupervisor,
}

impl Application {
    /// Connects to both databases, applies the read model's migrations and binds the port.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        // Install the recorder before the first metric is recorded, not at the first scrape.
        platform::metrics::handle();
        let store = settings.connect_store().await?;
        let sealer = settings.sealer().await?;
        let read_model = settings.connect_read_model().await?;
        read_model
            .migrate()
            .await
            .context("applying the read model migrations")?;
        let listener = TcpListener::bind(&settings.aggregator.http.address)
            .await
            .with_context(|| format!("binding {}", settings.aggregator.http.address))?;
        let projector = Projector::users(
            store.clone(),
            sealer.clone(),
            read_model.clone(),
            settings.projector_options(),
        );
        let mailer = settings.mailer(
            store.clone(),
            sealer.clone(),
            read_model.clone(),
            Arc::new(SystemClock),
        )?;
        let relay = settings
            .relay(store.clone(), sealer.clone(), read_model.clone())
            .await?;
        let webhooks = settings.webhook_supervisor(
            store.clone(),
            sealer.clone(),
            read_model.clone(),
            Arc::new(SystemClock),
        )?;
        Ok(Self {
            listener,
            store,
            sealer,
            read_model,
            projector,
            mailer,
            relay,
            webhooks,
        })
    }

    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    pub fn port(&self) -> anyhow::Result<u16> {
        Ok(self.local_addr()?.port())
    }

    pub fn projector_stats(&self) -> Arc<ProjectorStats> {
        self.projector.stats()
    }

    /// The users projection's committed checkpoint as it moves.
    pub fn positions(&self) -> watch::Receiver<u64> {
        self.projector.positions()
    }

    pub fn mailer_stats(&self) -> Arc<MailerStats> {
        self.mailer.stats()
    }

    /// What the webhook delivery is doing: its endpoints' counters and which run here.
    pub fn webhook_watch(&self) -> WebhookWatch {
        self.webhooks.watch()
    }

    /// The relay's counters; `None` without `nats.url`.
    pub fn relay_stats(&self) -> Option<Arc<RelayStats>> {
        self.relay.as_ref().map(Relay::stats)
    }

    /// Serves HTTP, projects, mails and relays until `shutdown` completes; then lets the batch
    /// in flight finish (commit or roll back; the mails of a step in flight are sent, the
    /// events of a relay's step acknowledged or not) and returns.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let shutdown = Shutdown::on(shutdown);
        let router = router_for(
            self.store.clone(),
            self.sealer.vault().clone(),
            self.read_model.clone(),
        );
        let server = axum::serve(self.listener, router)
            .with_graceful_shutdown(shutdown.stopped())
            .into_future();
        let worker = self.projector.run(shutdown.stopped());
        let mailer = self.mailer.run(shutdown.stopped());
        let relay = async {
            if let Some(relay) = self.relay {
                relay.run(shutdown.stopped()).await;
            }
        };
        let webhooks = self.webhooks.run(shutdown.stopped());
        let (served, (), (), (), ()) = tokio::join!(server, worker, mailer, relay, webhooks);
        served.context("serving HTTP")
    }
}

#[derive(Clone)]
struct Readiness {
    store: Arc<dyn MessageStore>,
    vault: Arc<dyn KeyVault>,
    read_model: ReadModelWriter,
}

/// `/healthz` (alive), `/readyz` (both databases and the key vault answer) and `/metrics`.
pub fn router_for(
    store: Arc<dyn MessageStore>,
    vault: Arc<dyn KeyVault>,
    read_model: ReadModelWriter,
) -> Router {
    platform::http::with_common_layers(Router::new().route("/readyz", get(ready)).with_state(
        Readiness {
            store,
            vault,
            read_model,
        },
    ))
}

async fn ready(State(readiness): State<Readiness>) -> axum::response::Response {
    let (store, vault, read_model) = tokio::join!(
        readiness.store.ping(),
        readiness.vault.ping(),
        readiness.read_model.ping()
    );
    platform::http::readiness([
        ("message store", store.map_err(|error| error.to_string())),
        (
            "personal key vault",
            vault.map_err(|error| error.to_string()),
        ),
        ("read model", read_model.map_err(|error| error.to_string())),
    ])
}
