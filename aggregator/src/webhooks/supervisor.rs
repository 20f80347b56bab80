//! The supervisor of webhook delivery: which endpoints there are, and one consumer task for
//! each that receives.
//!
//! It reads the store's `webhook` category from its first message on every start of the
//! process and folds each endpoint's stream with `WebhookState`; it keeps no checkpoint of its
//! own (the streams are few and short, and the fold is the whole truth). Every replica of the
//! aggregator runs one: each starts a task per live, enabled endpoint, and the tasks of one
//! endpoint share its lock, so one replica delivers and the others stand by.
//!
//! [`WebhookSupervisor::step`] reads what is new and brings the tasks in line with it: starts
//! one for an endpoint registered or enabled (its checkpoint created first, at the
//! registration's position, if it has none), hands a running one the endpoint's new state (a
//! rotated secret), and stops one whose endpoint was disabled or deleted. A task stops between
//! two deliveries, never in the middle of one; a task started again for the same endpoint
//! waits for the one stopping. Every task also stops with the process.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use identity::{
    WEBHOOK_CATEGORY, WebhookEvent, WebhookId, WebhookState, WebhookStatus, evolve_webhook,
};
use integration::{EventType, IntegrationSettings, NetworkPolicy, Published, WebhookSettings};
use message_store::{GlobalPosition, MessageStore, RecordedMessage, Subscription};
use personal_data::Sealer;
use platform::clock::Clock;
use tokens::{WebhookSecret, WebhookSecretKey};
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;

use super::attempts;
use super::endpoint::{EndpointConfig, EndpointConsumer, Shared};
use super::{
    EndpointStats, STREAM_READ, WEBHOOK_CONSUMER_VERSION, WebhookError, WebhookOptions,
    consumer_name, decode, endpoint_of_stream,
};
use crate::consumer::LockTiming;
use crate::read_model::ReadModelWriter;

/// What delivery is configured with, besides the stores: the key secrets are derived with,
/// what is published and under which `source`, where receivers may be, and the timings.
pub struct DeliverySettings {
    pub key: WebhookSecretKey,
    pub published: Published,
    pub source: String,
    pub policy: NetworkPolicy,
    pub options: WebhookOptions,
}

impl DeliverySettings {
    /// From the `webhooks` and `integration` settings, the webhook secret key (read with
    /// [`secret_key`]) and the consumers' lock timing and batch size (the `aggregator`
    /// settings).
    pub fn from_settings(
        webhooks: &WebhookSettings,
        integration: &IntegrationSettings,
        key: WebhookSecretKey,
        lock: LockTiming,
        batch_size: usize,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            key,
            published: integration
                .published()
                .context("reading integration.events")?,
            source: integration.source.clone(),
            policy: webhooks
                .network_policy()
                .context("reading webhooks.allowed_networks")?,
            options: WebhookOptions::from_settings(webhooks, lock, batch_size),
        })
    }
}

/// The webhook secret key the `webhooks` settings name, as the command API reads it.
pub fn secret_key(webhooks: &WebhookSettings) -> anyhow::Result<WebhookSecretKey> {
    WebhookSecretKey::configured(
        webhooks.secret_key.as_deref(),
        webhooks.secret_key_file.as_deref(),
        webhooks.create_key_if_missing,
    )
    .context("loading the webhook secret key")
}

/// What one step of the supervisor did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SupervisorOutcome {
    /// Messages of the `webhook` category read.
    pub messages: usize,
    /// Endpoint tasks running after it.
    pub running: usize,
}

/// One endpoint's stream, folded, with what the supervisor needs beside its state.
struct Followed {
    state: WebhookState,
    registered_at: GlobalPosition,
    enabled_since: DateTime<Utc>,
    /// The global position of the last message applied.
    version: GlobalPosition,
    /// A message of its stream could not be read: it is not delivered to.
    unreadable: bool,
}

impl Followed {
    fn receives(&self) -> bool {
        !self.unreadable
            && self
                .state
                .live()
                .is_some_and(|endpoint| endpoint.status == WebhookStatus::Enabled)
    }
}

struct Running {
    endpoint: watch::Sender<Option<Arc<EndpointConfig>>>,
    version: GlobalPosition,
    handle: JoinHandle<()>,
}

/// What a test or a status page can see of delivery while the supervisor runs.
#[derive(Clone, Default)]
pub struct WebhookWatch(Arc<Mutex<Watched>>);

#[derive(Default)]
struct Watched {
    stats: HashMap<WebhookId, Arc<EndpointStats>>,
    running: BTreeSet<WebhookId>,
}

impl WebhookWatch {
    /// The counters of endpoint `id`, once its delivery has started in this process.
    pub fn stats(&self, id: WebhookId) -> Option<Arc<EndpointStats>> {
        self.lock().stats.get(&id).cloned()
    }

    /// The endpoints with a task running.
    pub fn running(&self) -> BTreeSet<WebhookId> {
        self.lock().running.clone()
    }

    fn stats_for(&self, id: WebhookId) -> Arc<EndpointStats> {
        self.lock().stats.entry(id).or_default().clone()
    }

    fn set_running(&self, running: BTreeSet<WebhookId>) {
        self.lock().running = running;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Watched> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

pub struct WebhookSupervisor {
    shared: Arc<Shared>,
    key: WebhookSecretKey,
    published: Published,
    /// The last message of the `webhook` category read.
    position: GlobalPosition,
    endpoints: BTreeMap<WebhookId, Followed>,
    running: HashMap<WebhookId, Running>,
    /// Tasks told to stop that may not have yet.
    stopping: HashMap<WebhookId, JoinHandle<()>>,
    /// Set (or dropped, with the supervisor) to stop every task.
    stop_all: watch::Sender<bool>,
    watch: WebhookWatch,
}

impl WebhookSupervisor {
    /// Delivery from `store` (its messages opened by `sealer`), keeping checkpoints and
    /// attempts in `read_model`.
    pub fn new(
        settings: DeliverySettings,
        store: Arc<dyn MessageStore>,
        sealer: Sealer,
        read_model: ReadModelWriter,
        clock: Arc<dyn Clock>,
    ) -> Self {
        let DeliverySettings {
            key,
            published,
            source,
            policy,
            options,
        } = settings;
        Self {
            shared: Arc::new(Shared {
                store,
                sealer,
                read_model,
                clock,
                policy,
                source,
                options,
                wake_ups: WakeUps::default(),
            }),
            key,
            published,
            position: 0,
            endpoints: BTreeMap::new(),
            running: HashMap::new(),
            stopping: HashMap::new(),
            stop_all: watch::channel(false).0,
            watch: WebhookWatch::default(),
        }
    }

    pub fn watch(&self) -> WebhookWatch {
        self.watch.clone()
    }

    /// Follows the endpoints and keeps their tasks until `shutdown` completes; then stops
    /// every task and returns once they have stopped (each after the delivery in flight).
    /// Never returns early on errors.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        // One listener for every endpoint's loop and this one; it goes with this future, even
        // one dropped rather than stopped.
        let _forwarder = AbortOnDrop(tokio::spawn(
            self.shared
                .wake_ups
                .clone()
                .forward(self.shared.store.subscribe()),
        ));
        let mut subscription = self.shared.wake_ups.subscribe();
        let first = self.shared.options.retry.first.min(Duration::from_secs(1));
        let max = Duration::from_secs(30).max(first);
        let mut backoff = first;
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                () = std::future::ready(()) => {}
            }
            match self.step().await {
                Ok(outcome) if outcome.messages > 0 => backoff = first,
                Ok(_) => {
                    backoff = first;
                    tokio::select! {
                        _ = subscription.next() => {}
                        () = &mut shutdown => break,
                    }
                }
                Err(error) => {
                    log_failure(&error, backoff);
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = &mut shutdown => break,
                    }
                    backoff = (backoff * 2).min(max);
                }
            }
        }
        self.stop_everything().await;
    }

    /// Reads what is new in the `webhook` category, then starts, updates and stops endpoint
    /// tasks to match.
    pub async fn step(&mut self) -> Result<SupervisorOutcome, WebhookError> {
        let messages = self.read_endpoints().await?;
        self.reconcile().await?;
        Ok(SupervisorOutcome {
            messages,
            running: self.running.len(),
        })
    }

    /// A consumer of endpoint `id`, as a task of it would run, for a caller to step by hand
    /// ([`EndpointConsumer::process_next`]); `None` unless the endpoint is live and enabled as
    /// far as this supervisor has read. It is told of no later change of the endpoint.
    pub fn consumer_for(&self, id: WebhookId) -> Option<EndpointConsumer> {
        let followed = self
            .endpoints
            .get(&id)
            .filter(|followed| followed.receives())?;
        let config = self.config(id, followed)?;
        let (_, endpoint) = watch::channel(Some(Arc::new(config)));
        Some(EndpointConsumer::new(
            id,
            self.shared.clone(),
            endpoint,
            self.watch.stats_for(id),
        ))
    }

    /// Applies every message of the category after the last one read, starting and stopping
    /// nothing (what [`Self::step`] does next); how many there were. For a caller that then
    /// steps an endpoint's consumer by hand ([`Self::consumer_for`]).
    pub async fn read_endpoints(&mut self) -> Result<usize, WebhookError> {
        let mut read = 0;
        loop {
            let messages = self
                .shared
                .store
                .read_category(WEBHOOK_CATEGORY, self.position, STREAM_READ)
                .await?;
            for message in &messages {
                self.apply(message);
                self.position = message.global_position;
            }
            read += messages.len();
            if messages.len() < STREAM_READ {
                return Ok(read);
            }
        }
    }

    fn apply(&mut self, message: &RecordedMessage) {
        let Some(id) = endpoint_of_stream(message) else {
            tracing::warn!(
                stream = message.stream.as_str(),
                "a webhook stream without an endpoint id; passed over"
            );
            return;
        };
        let followed = self.endpoints.entry(id).or_insert_with(|| Followed {
            state: WebhookState::Unregistered,
            registered_at: 0,
            enabled_since: message.time,
            version: 0,
            unreadable: false,
        });
        followed.version = message.global_position;
        if followed.unreadable {
            return;
        }
        match decode(id, message) {
            Ok(Some(event)) => {
                match &event {
                    WebhookEvent::WebhookRegistered(registered)
                        if followed.state == WebhookState::Unregistered =>
                    {
                        followed.registered_at = message.global_position;
                        followed.enabled_since = registered.at;
                    }
                    WebhookEvent::WebhookEnabled(enabled) => {
                        followed.enabled_since = enabled.at;
                    }
                    _ => {}
                }
                followed.state = evolve_webhook(std::mem::take(&mut followed.state), &event);
            }
            Ok(None) => tracing::warn!(
                endpoint = %id,
                message_type = message.message_type,
                "a webhook endpoint event of a type this build does not know; passed over"
            ),
            Err(error) => {
                let cause = std::error::Error::source(&error);
                tracing::error!(
                    %error,
                    ?cause,
                    position = message.global_position,
                    "nothing is delivered to this endpoint until a build that reads it runs"
                );
                followed.unreadable = true;
            }
        }
    }

    /// Brings the tasks in line with the endpoints read.
    async fn reconcile(&mut self) -> Result<(), WebhookError> {
        self.stopping.retain(|_, handle| !handle.is_finished());
        let ids: Vec<WebhookId> = self.endpoints.keys().copied().collect();
        for id in ids {
            let Some(followed) = self.endpoints.get(&id) else {
                continue;
            };
            let receives = followed.receives();
            let version = followed.version;
            let (finished, outdated) = self.running.get(&id).map_or((false, false), |running| {
                (running.handle.is_finished(), running.version != version)
            });
            match (receives, self.running.contains_key(&id)) {
                (true, true) if finished => {
                    // It ended on its own (a panic): start it again.
                    tracing::error!(
                        consumer = consumer_name(id),
                        "the task ended; restarting it"
                    );
                    self.running.remove(&id);
                    self.start(id).await?;
                }
                (true, true) if outdated => match self.config(id, followed) {
                    Some(config) => {
                        if let Some(running) = self.running.get_mut(&id) {
                            running.endpoint.send_replace(Some(Arc::new(config)));
                            running.version = version;
                        }
                    }
                    None => self.stop(id),
                },
                (true, true) | (false, false) => {}
                (true, false) => self.start(id).await?,
                (false, true) => self.stop(id),
            }
        }
        let running: BTreeSet<WebhookId> = self.running.keys().copied().collect();
        metrics::gauge!("webhook_endpoints_running").set(running.len() as f64);
        self.watch.set_running(running);
        Ok(())
    }

    /// Starts endpoint `id`'s task, its checkpoint created at its registration first if it
    /// has none (before the task takes the lock, which would create it at 0).
    async fn start(&mut self, id: WebhookId) -> Result<(), WebhookError> {
        let Some(followed) = self.endpoints.get(&id) else {
            return Ok(());
        };
        let Some(config) = self.config(id, followed) else {
            return Ok(());
        };
        let version = followed.version;
        attempts::ensure_checkpoint_at(
            &self.shared.read_model,
            &consumer_name(id),
            WEBHOOK_CONSUMER_VERSION,
            followed.registered_at,
        )
        .await?;
        let (sender, endpoint) = watch::channel(Some(Arc::new(config)));
        let consumer = EndpointConsumer::new(
            id,
            self.shared.clone(),
            endpoint.clone(),
            self.watch.stats_for(id),
        );
        let stop = stop_signal(self.stop_all.subscribe(), endpoint);
        let previous = self.stopping.remove(&id);
        let handle = tokio::spawn(async move {
            if let Some(previous) = previous {
                // The task this one replaces ends its delivery in flight first.
                let _ = previous.await;
            }
            consumer.run(stop).await;
        });
        tracing::info!(
            consumer = consumer_name(id),
            "webhook endpoint delivery started"
        );
        self.running.insert(
            id,
            Running {
                endpoint: sender,
                version,
                handle,
            },
        );
        Ok(())
    }

    /// Tells endpoint `id`'s task to stop, after the delivery in flight.
    fn stop(&mut self, id: WebhookId) {
        if let Some(running) = self.running.remove(&id) {
            running.endpoint.send_replace(None);
            tracing::info!(
                consumer = consumer_name(id),
                "webhook endpoint delivery stopped"
            );
            self.stopping.insert(id, running.handle);
        }
    }

    async fn stop_everything(&mut self) {
        self.stop_all.send_replace(true);
        let handles: Vec<JoinHandle<()>> = self
            .running
            .drain()
            .map(|(_, running)| running.handle)
            .chain(self.stopping.drain().map(|(_, handle)| handle))
            .collect();
        for handle in handles {
            let _ = handle.await;
        }
        self.watch.set_running(BTreeSet::new());
        metrics::gauge!("webhook_endpoints_running").set(0.0);
    }

    /// Endpoint `id` as its consumer delivers to it: its secrets derived, its subscription
    /// narrowed to what is published. `None` (and said why) when it is not live, or its secret
    /// cannot be derived.
    fn config(&self, id: WebhookId, followed: &Followed) -> Option<EndpointConfig> {
        let endpoint = followed.state.live()?;
        let derive = |nonce: &identity::WebhookNonce| {
            WebhookSecret::derive(&self.key, *id.as_uuid(), nonce.as_bytes())
        };
        let secrets = derive(&endpoint.secret_nonce).and_then(|secret| {
            let previous = match &endpoint.previous_secret {
                Some((nonce, replaced_at)) => Some((derive(nonce)?, *replaced_at)),
                None => None,
            };
            Ok((secret, previous))
        });
        let (secret, previous) = match secrets {
            Ok(secrets) => secrets,
            Err(error) => {
                tracing::error!(
                    consumer = consumer_name(id),
                    %error,
                    "the endpoint's secret could not be derived; nothing is delivered to it"
                );
                return None;
            }
        };
        Some(EndpointConfig {
            url: endpoint.url.clone(),
            events: endpoint
                .events
                .iter()
                .filter_map(|name| name.parse::<EventType>().ok())
                .filter(|kind| self.published.contains(*kind))
                .collect(),
            secret,
            previous,
            registered_at: followed.registered_at,
            enabled_since: followed.enabled_since,
            version: followed.version,
        })
    }
}

/// The store's wake-ups, fanned out from one subscription to every endpoint's loop: a
/// subscription of the PostgreSQL store holds a connection of its pool for its listener, and
/// one per endpoint would take the pool from the readers.
#[derive(Clone, Default)]
pub(crate) struct WakeUps(Arc<Mutex<Vec<Weak<Notify>>>>);

impl WakeUps {
    /// Wake-ups for one loop: each one the store's subscription gives (its signals and its
    /// polls) while [`Self::forward`] runs, and at least every [`WAKE_UP_BACKSTOP`] without it.
    pub(crate) fn subscribe(&self) -> Subscription {
        let signal = Arc::new(Notify::new());
        self.lock().push(Arc::downgrade(&signal));
        Subscription::from_signal(signal, WAKE_UP_BACKSTOP)
    }

    /// Passes every wake-up of `subscription` on to every loop subscribed, until dropped.
    async fn forward(self, mut subscription: Subscription) {
        loop {
            subscription.next().await;
            self.lock().retain(|signal| match signal.upgrade() {
                Some(signal) => {
                    signal.notify_one();
                    true
                }
                // Its loop has stopped.
                None => false,
            });
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Weak<Notify>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Aborts its task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How long a loop waits without a wake-up passed on: only matters while nothing forwards
/// them (an endpoint's consumer run outside [`WebhookSupervisor::run`]).
const WAKE_UP_BACKSTOP: Duration = Duration::from_secs(5);

fn log_failure(error: &WebhookError, backoff: Duration) {
    let cause = std::error::Error::source(error);
    tracing::error!(
        %error,
        ?cause,
        "following the webhook endpoints failed; retrying after {backoff:?}"
    );
}

/// Completes when every task is to stop (or the supervisor is gone), or when this task's
/// endpoint no longer receives.
async fn stop_signal(
    mut all: watch::Receiver<bool>,
    mut endpoint: watch::Receiver<Option<Arc<EndpointConfig>>>,
) {
    tokio::select! {
        _ = all.wait_for(|stop| *stop) => {}
        _ = endpoint.wait_for(Option::is_none) => {}
    }
}
