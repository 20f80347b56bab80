//! Delivery of integration events to webhook endpoints (issue 15, DESIGN decisions 13 and 17,
//! docs/adr/0014).
//!
//! **Each endpoint is a consumer** of the message store with its own checkpoint,
//! `webhook:<id>` in `projection_checkpoints`, run by the loop every consumer shares
//! ([`crate::consumer`]): one active replica per endpoint under its own advisory lock, takeover
//! by a standby, a step a test can drive, a place in `aggregator status` ([`consumer_names`]),
//! and replay by moving its checkpoint back ([`reset`]). One endpoint per consumer, rather than
//! one consumer posting to every endpoint, is what keeps one failing destination from holding
//! up another: each has its own position in the global order, its own retries and backoff, its
//! own task. A dead receiver holds only its own checkpoint back; a hanging one only its own
//! task, for at most `webhooks.timeout_ms` per attempt. The price is a read of the global order
//! per endpoint (a handful of endpoints is the expected case), and on PostgreSQL a connection
//! per running endpoint for its lock. The wake-ups are not per endpoint: one subscription of
//! the store is passed on to every endpoint's loop (a subscription holds a connection of the
//! store's pool for its listener, and one each would take the pool from the readers).
//!
//! - [`supervisor`]: follows the store's `webhook` category from its start on every start of
//!   the process (the endpoints' streams are few and short), folds each stream with
//!   `WebhookState`, and keeps one consumer task per live, enabled endpoint: started when one
//!   is registered or enabled, told of a rotated secret, stopped when one is disabled or
//!   deleted; every task stops with the process.
//! - [`endpoint`]: one endpoint's consumer. It reads the global order after its checkpoint
//!   (`read_all`), opens each batch with the [`personal_data::Sealer`] (an erased person's
//!   address reads as `null`, ADR 13), makes the integration events, keeps the types the
//!   endpoint subscribed to that are published, and posts them one at a time, in order.
//! - [`sender`]: the signed HTTP POST, and the network policy its connections obey.
//! - [`attempts`]: what is kept in the read model: every attempt, and the checkpoints.
//!
//! **Where an endpoint starts.** Its checkpoint is created, once, at the global position of its
//! registration: it receives what happens after it was registered. A later start (a restart,
//! an enable after a disable, a takeover) goes on from the stored checkpoint. `reset` moves it
//! back to the registration, and the endpoint receives everything since then again.
//!
//! **At least once, in order.** An event is posted, and only once the receiver answered 2xx
//! does the checkpoint move past it. Anything else (another status, a redirect, which is not
//! followed, no answer within `webhooks.timeout_ms`, a refused connection, an address the
//! network policy forbids) fails the step, and the loop tries the same event again with
//! exponential backoff from `webhooks.retry_first_ms` to `retry_max_ms`; nothing after it is
//! sent meanwhile. A crash between the receiver's answer and the checkpoint posts the event
//! again, with the same `webhook-id` (the stored message's id), so the receiver can tell.
//!
//! **Every attempt is recorded** in `webhook_attempts` (the query API shows them as
//! `GET /webhooks/{id}/deliveries`), the newest `webhooks.attempts_kept` per endpoint, and
//! also the first failure since the endpoint's last success, from which its failing time is
//! measured.
//!
//! **Disabling.** An endpoint whose attempts have failed without a success for
//! `webhooks.disable_after_ms` is disabled: its consumer appends `WebhookDisabled` (decided by
//! `decide_webhook` on its stream, at the stream's exact version: the aggregator's only write
//! to the store), and the supervisor, reading it, stops the task. The failing time survives a
//! restart because it is derived from the recorded attempts (the first failure after the last
//! success, not before the endpoint was last enabled), never kept in memory only. An
//! administrator's enable starts a task again from the held checkpoint, and the count afresh.
//!
//! **Signatures** follow the Standard Webhooks specification (see [`sender`]); the secret is
//! derived from the endpoint's nonce with the webhook secret key (`tokens::WebhookSecret`),
//! never stored. For `webhooks.previous_secret_ms` after a rotation a delivery carries a
//! signature under the previous secret too, so a receiver can move to the new one at its pace.
//!
//! **Expected failures are warnings.** A receiver that fails is the receiver's business: the
//! loop logs it at `warn` (with the endpoint, the event and what went wrong, never the URL, the
//! body or a secret). A failure of this process (the databases, the key vault) is an `error`.
//!
//! Metrics: `webhook_delivered_total`, `webhook_failed_total` (each failed attempt),
//! `webhook_disabled_total` and `webhook_position`, each by `webhook` (the endpoint's id, the
//! only label: event types and status codes would multiply the series for no decision anyone
//! takes on them; `webhook_attempts` has the details), and `webhook_endpoints_running`.

pub mod attempts;
pub mod endpoint;
pub mod sender;
pub mod supervisor;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Duration;

use chrono::{DateTime, Utc};
use identity::{
    EventDecodeError, WEBHOOK_CATEGORY, WebhookEvent, WebhookId, WebhookState, event_version,
    webhook_stream_name,
};
use message_store::{
    AppendError, GlobalPosition, InvalidStreamName, MessageStore, RecordedMessage, StoreError,
    StreamName,
};
use personal_data::VaultError;

use crate::consumer::{Backoff, LockTiming};
use crate::read_model::ReadModelWriter;

pub use endpoint::{EndpointConsumer, EndpointOutcome};
pub use supervisor::{
    DeliverySettings, SupervisorOutcome, WebhookSupervisor, WebhookWatch, secret_key,
};

/// What every endpoint consumer's name starts with: `webhook:<id>`.
pub const CONSUMER_PREFIX: &str = "webhook:";

/// The version of an endpoint consumer's checkpoint: one of another version (a build that
/// reads its position differently) is left alone, as the mailer's is.
pub const WEBHOOK_CONSUMER_VERSION: i32 = 1;

/// The name of endpoint `id`'s consumer: its checkpoint, its lock, its label in logs.
pub fn consumer_name(id: WebhookId) -> String {
    format!("{CONSUMER_PREFIX}{id}")
}

/// The endpoint a consumer name (`webhook:<id>`) names, if it names one.
pub fn endpoint_of_consumer(name: &str) -> Option<WebhookId> {
    name.strip_prefix(CONSUMER_PREFIX)?.parse().ok()
}

/// How webhook delivery works (the `webhooks` settings, and the lock and batch of the
/// `aggregator` ones).
#[derive(Debug, Clone)]
pub struct WebhookOptions {
    /// Messages read from the store per read (most of them are no endpoint's business).
    pub batch_size: usize,
    pub lock_retry: Duration,
    pub lock_lease: Duration,
    /// The wait before a failed delivery is tried again, doubled each time.
    pub retry: Backoff,
    /// How long one attempt may take, connecting included.
    pub timeout: Duration,
    pub disable_after: Duration,
    /// How long after a rotation deliveries are signed with the previous secret too.
    pub previous_secret_for: Duration,
    pub attempts_kept: u32,
}

impl WebhookOptions {
    /// From the `webhooks` settings, with the consumers' lock timing and batch size.
    pub fn from_settings(
        settings: &integration::WebhookSettings,
        lock: LockTiming,
        batch_size: usize,
    ) -> Self {
        let first = Duration::from_millis(settings.retry_first_ms.max(1));
        Self {
            batch_size: batch_size.max(1),
            lock_retry: lock.retry,
            lock_lease: lock.lease,
            retry: Backoff {
                first,
                max: Duration::from_millis(settings.retry_max_ms).max(first),
            },
            timeout: settings.timeout(),
            disable_after: settings.disable_after(),
            previous_secret_for: settings.previous_secret_for(),
            attempts_kept: settings.attempts_kept.max(1),
        }
    }
}

impl Default for WebhookOptions {
    fn default() -> Self {
        Self::from_settings(
            &integration::WebhookSettings::default(),
            LockTiming {
                retry: Duration::from_secs(1),
                lease: Duration::from_secs(5),
            },
            500,
        )
    }
}

/// Counters of one endpoint's delivery, for whoever watches it run (a test, a status page);
/// kept across the endpoint's tasks in this process, where the metrics are the process's.
#[derive(Debug, Default)]
pub struct EndpointStats {
    /// Events the receiver took (2xx).
    pub delivered: AtomicU64,
    /// Attempts that failed.
    pub failed: AtomicU64,
    /// Whether this process disabled it.
    pub disabled: AtomicBool,
    /// The checkpoint as this process last moved it.
    pub position: AtomicU64,
    /// Set while a worker of this process holds the endpoint's lock.
    pub holds_lock: Arc<AtomicBool>,
}

/// What webhook delivery can meet; the loop retries every one of them.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("reading the message store")]
    Store(#[from] StoreError),
    #[error("appending to the endpoint's stream")]
    Append(#[from] AppendError),
    #[error("writing the read model")]
    ReadModel(#[from] sqlx::Error),
    /// The key vault did not answer, or a sealed field did not open: retried, never read as an
    /// erasure.
    #[error("opening the personal data of the messages read")]
    Vault(#[from] VaultError),
    /// The receiver did not take the event: expected in operation, and retried.
    #[error("event {event} ({event_type}) was not delivered: {reason}")]
    Delivery {
        event: uuid::Uuid,
        event_type: &'static str,
        reason: String,
    },
    #[error("the stream of webhook endpoint {endpoint} holds a message this build cannot read")]
    Unreadable {
        endpoint: WebhookId,
        #[source]
        error: EventDecodeError,
    },
    #[error("no webhook endpoint consumer is named {0:?}; they are named webhook:<id>")]
    NotAnEndpoint(String),
    #[error("webhook endpoint {0} was never registered")]
    NotRegistered(WebhookId),
    #[error(
        "the checkpoint is of version {stored} and this consumer is version {ours}; it sends \
         nothing until a reset at its version"
    )]
    OtherVersion { stored: i32, ours: i32 },
    #[error(transparent)]
    StreamName(#[from] InvalidStreamName),
    #[error("another worker took the endpoint over")]
    TakenOver,
    #[error("the endpoint's stream kept changing under the disabling; tried again later")]
    Contended,
}

/// The names of every live endpoint's consumer (`webhook:<id>`, disabled ones included, not
/// deleted ones), for `aggregator status`: each has a checkpoint to show, once the aggregator
/// has started its consumer.
pub async fn consumer_names(store: &Arc<dyn MessageStore>) -> Result<Vec<String>, WebhookError> {
    let mut endpoints = std::collections::BTreeMap::new();
    let mut after = 0;
    loop {
        let messages = store
            .read_category(WEBHOOK_CATEGORY, after, STREAM_READ)
            .await?;
        for message in &messages {
            after = message.global_position;
            let Some(id) = endpoint_of_stream(message) else {
                continue;
            };
            let state: &mut WebhookState = endpoints.entry(id).or_default();
            if let Some(event) = decode(id, message)? {
                *state = identity::evolve_webhook(std::mem::take(state), &event);
            }
        }
        if messages.len() < STREAM_READ {
            break;
        }
    }
    Ok(endpoints
        .into_iter()
        .filter(|(_, state)| state.live().is_some())
        .map(|(id, _)| consumer_name(id))
        .collect())
}

/// `aggregator reset webhook:<id>`: moves the endpoint's checkpoint back to its registration,
/// so that it receives everything since then again (each event with the `webhook-id` it had).
/// A running consumer notices at its next step.
pub async fn reset(
    store: &Arc<dyn MessageStore>,
    read_model: &ReadModelWriter,
    name: &str,
) -> Result<(), WebhookError> {
    let id = endpoint_of_consumer(name).ok_or_else(|| WebhookError::NotAnEndpoint(name.into()))?;
    let registered = registration_position(store, id)
        .await?
        .ok_or(WebhookError::NotRegistered(id))?;
    attempts::set_checkpoint(read_model, name, WEBHOOK_CONSUMER_VERSION, registered).await?;
    Ok(())
}

/// Messages per read of an endpoint's stream or of the `webhook` category.
const STREAM_READ: usize = 1000;

/// The global position of endpoint `id`'s registration, if it was registered.
async fn registration_position(
    store: &Arc<dyn MessageStore>,
    id: WebhookId,
) -> Result<Option<GlobalPosition>, WebhookError> {
    let first = store.read_stream(&endpoint_stream(id)?, 0, 1).await?;
    let Some(message) = first.first() else {
        return Ok(None);
    };
    Ok(matches!(
        decode(id, message)?,
        Some(WebhookEvent::WebhookRegistered(_))
    )
    .then_some(message.global_position))
}

fn endpoint_stream(id: WebhookId) -> Result<StreamName, WebhookError> {
    Ok(StreamName::parse(webhook_stream_name(id))?)
}

/// The endpoint whose stream `message` is in.
fn endpoint_of_stream(message: &RecordedMessage) -> Option<WebhookId> {
    message.stream.id()?.parse().ok()
}

/// The endpoint event `message` holds; `None` for a type this build does not know (a newer
/// build wrote it).
fn decode(
    endpoint: WebhookId,
    message: &RecordedMessage,
) -> Result<Option<WebhookEvent>, WebhookError> {
    match event_version(&message.metadata).and_then(|version| {
        WebhookEvent::from_stored(&message.message_type, version, &message.data)
    }) {
        Ok(event) => Ok(Some(event)),
        Err(EventDecodeError::UnknownType { .. }) => Ok(None),
        Err(error) => Err(WebhookError::Unreadable { endpoint, error }),
    }
}

/// When an attempt made at `now` finds the endpoint failing since `since`, whether it has
/// failed for long enough to be disabled.
fn failed_too_long(now: DateTime<Utc>, since: DateTime<Utc>, limit: Duration) -> bool {
    (now - since).to_std().is_ok_and(|failing| failing >= limit)
}
