//! One webhook endpoint's consumer: its checkpoint `webhook:<id>`, the events after it, one
//! delivery per step (see the module documentation of [`crate::webhooks`]).
//!
//! A step posts at most one event, so that the loop looks at its stop signal (a deletion, a
//! disabling, the process stopping) between any two deliveries, and a test can stop it between
//! any two. The events of the batch read last wait in memory for their turn; the batch is read
//! again from the stored checkpoint after a failed step.
//!
//! Its endpoint's deletion is met in the global order too (the `webhook-<id>` stream is read
//! with everything else): nothing written after it is sent, however late the supervisor stops
//! the task.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use identity::{
    LOGIN_CATEGORY, USER_CATEGORY, WebhookCommand, WebhookEvent, WebhookId, WebhookState,
    decide_webhook, webhook_stream_name,
};
use integration::{EventType, IntegrationEvent, NetworkPolicy, PERSONAL_FIELDS_READ};
use message_store::{
    AppendError, ExpectedVersion, GlobalPosition, MessageStore, NewMessage, StreamAppend,
    Subscription,
};
use personal_data::{Fields, Sealer};
use platform::clock::Clock;
use serde_json::json;
use tokens::WebhookSecret;
use tokio::sync::watch;

use super::attempts::{self, Attempt};
use super::sender::{Answer, Delivery, Sender};
use super::supervisor::WakeUps;
use super::{
    EndpointStats, STREAM_READ, WEBHOOK_CONSUMER_VERSION, WebhookError, WebhookOptions,
    consumer_name, decode, endpoint_stream, failed_too_long,
};
use crate::consumer::{self, Backoff, Consumer, LockTiming, Progress};
use crate::read_model::{Checkpoint, ReadModelWriter};

/// What every endpoint's consumer shares.
pub(crate) struct Shared {
    pub store: Arc<dyn MessageStore>,
    pub sealer: Sealer,
    pub read_model: ReadModelWriter,
    pub clock: Arc<dyn Clock>,
    pub policy: NetworkPolicy,
    /// The CloudEvents `source` of every event.
    pub source: String,
    pub options: WebhookOptions,
    /// The store's wake-ups, shared by every endpoint's loop.
    pub wake_ups: WakeUps,
}

/// An endpoint as its consumer delivers to it, made by the supervisor from its stream.
pub(crate) struct EndpointConfig {
    pub url: String,
    /// The types it subscribed to that are published.
    pub events: BTreeSet<EventType>,
    pub secret: WebhookSecret,
    /// The secret before the last rotation, and when it was replaced.
    pub previous: Option<(WebhookSecret, DateTime<Utc>)>,
    /// Where its checkpoint is created: its registration's global position.
    pub registered_at: GlobalPosition,
    /// When it was registered or last enabled: its failing time counts from no earlier.
    pub enabled_since: DateTime<Utc>,
    /// The global position of the last message of its stream this was made from.
    pub version: GlobalPosition,
}

/// What one step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointOutcome {
    /// The receiver took the event, and the checkpoint moved to its position (or past the
    /// events after it that are not the endpoint's).
    Delivered {
        event: uuid::Uuid,
        position: GlobalPosition,
    },
    /// Nothing to send in what was read: the checkpoint moved past it.
    Passed { position: GlobalPosition },
    /// The checkpoint had moved under this worker (a reset, another replica): reloaded.
    Reloaded,
    /// Nothing new.
    Idle,
    /// The endpoint no longer receives: deleted or disabled, its task about to stop.
    Stopped,
    /// It had failed for too long: this step disabled it.
    Disabled { reason: String },
    /// It met something it must not go past, and stays before it until the process restarts.
    Halted { reason: String },
}

/// An event waiting for its turn, and where the checkpoint may stand while it waits: just
/// before it, past the messages in between that are not the endpoint's.
struct Pending {
    event: IntegrationEvent,
    before: GlobalPosition,
}

/// What is left to do of the batch read last.
struct Batch {
    pending: VecDeque<Pending>,
    /// Where the checkpoint goes once every pending event is delivered: the last message read,
    /// or, with `poison`, the last one before it.
    end: GlobalPosition,
    /// A message that cannot be read, with why.
    poison: Option<String>,
    /// The endpoint's deletion follows `end`.
    deleted: bool,
}

pub struct EndpointConsumer {
    name: String,
    id: WebhookId,
    shared: Arc<Shared>,
    /// The endpoint as the supervisor last saw it; `None` once it no longer receives.
    endpoint: watch::Receiver<Option<Arc<EndpointConfig>>>,
    sender: Sender,
    checkpoint: Option<Checkpoint>,
    fence: Option<i64>,
    batch: Option<Batch>,
    halted: Option<String>,
    /// The global position of the `WebhookDisabled` this consumer appended (or found): it
    /// delivers nothing until the supervisor shows it a later state of the endpoint (an enable
    /// read together with the disabling).
    disabled_at: Option<GlobalPosition>,
    /// It met its endpoint's deletion.
    deleted: bool,
    stats: Arc<EndpointStats>,
}

impl EndpointConsumer {
    pub(crate) fn new(
        id: WebhookId,
        shared: Arc<Shared>,
        endpoint: watch::Receiver<Option<Arc<EndpointConfig>>>,
        stats: Arc<EndpointStats>,
    ) -> Self {
        let sender = Sender::new(shared.policy.clone(), shared.options.timeout);
        Self {
            name: consumer_name(id),
            id,
            shared,
            endpoint,
            sender,
            checkpoint: None,
            fence: None,
            batch: None,
            halted: None,
            disabled_at: None,
            deleted: false,
            stats,
        }
    }

    pub fn id(&self) -> WebhookId {
        self.id
    }

    pub fn stats(&self) -> Arc<EndpointStats> {
        self.stats.clone()
    }

    /// Works until `shutdown` completes, one replica at a time (see [`crate::consumer`]).
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        consumer::run(self, shutdown).await;
    }

    /// One step: delivers the next event after the checkpoint, or moves past what is not the
    /// endpoint's. A failed delivery is an error (the loop retries it); the checkpoint stays
    /// before it.
    pub async fn process_next(&mut self) -> Result<EndpointOutcome, WebhookError> {
        if let Some(reason) = &self.halted {
            return Ok(EndpointOutcome::Halted {
                reason: reason.clone(),
            });
        }
        let Some(endpoint) = self.endpoint.borrow().clone() else {
            return Ok(EndpointOutcome::Stopped);
        };
        if self.deleted {
            return Ok(EndpointOutcome::Stopped);
        }
        if let Some(disabled_at) = self.disabled_at {
            if endpoint.version <= disabled_at {
                return Ok(EndpointOutcome::Stopped);
            }
            // Enabled again since.
            self.disabled_at = None;
        }
        let checkpoint = self.current_checkpoint(&endpoint).await?;
        let mut batch = match self.batch.take() {
            Some(batch) => batch,
            None => match self.read(&endpoint, &checkpoint).await? {
                Some(batch) => batch,
                None => return self.idle(&checkpoint).await,
            },
        };
        let Some(next) = batch.pending.front() else {
            return self.finish(&checkpoint, batch).await;
        };
        let answer = self.deliver(&endpoint, &next.event).await?;
        if answer.delivered() {
            let Some(delivered) = batch.pending.pop_front() else {
                return Ok(EndpointOutcome::Reloaded);
            };
            let event = delivered.event.id;
            if batch.pending.is_empty() {
                return match self.finish(&checkpoint, batch).await? {
                    EndpointOutcome::Passed { position } => {
                        Ok(EndpointOutcome::Delivered { event, position })
                    }
                    other => Ok(other),
                };
            }
            let position = delivered.event.position;
            if !self.advance(&checkpoint, position).await? {
                return Ok(self.checkpoint_moved());
            }
            self.batch = Some(batch);
            return Ok(EndpointOutcome::Delivered { event, position });
        }
        // Keep what was passed before the failed event.
        if !self.advance(&checkpoint, next.before).await? {
            return Ok(self.checkpoint_moved());
        }
        let reason = answer.error.unwrap_or_default();
        if let Some(outcome) = self.disable_if_failing_too_long(&endpoint, &reason).await? {
            return Ok(outcome);
        }
        Err(WebhookError::Delivery {
            event: next.event.id,
            event_type: next.event.kind.name(),
            reason,
        })
    }

    /// Reads the batch after `checkpoint`, opened and made into the endpoint's events; `None`
    /// when there is nothing after it.
    async fn read(
        &mut self,
        endpoint: &EndpointConfig,
        checkpoint: &Checkpoint,
    ) -> Result<Option<Batch>, WebhookError> {
        let shared = &self.shared;
        let mut messages = shared
            .store
            .read_all(checkpoint.position, shared.options.batch_size)
            .await?;
        let Some(mut end) = messages.last().map(|message| message.global_position) else {
            return Ok(None);
        };
        // Its own deletion, met in the global order: nothing after it is the endpoint's,
        // however late the supervisor stops this task.
        let own = webhook_stream_name(self.id);
        let deleted = messages.iter().position(|message| {
            message.stream.as_str() == own
                && matches!(
                    decode(self.id, message),
                    Ok(Some(WebhookEvent::WebhookDeleted(_)))
                )
        });
        if let Some(index) = deleted {
            end = messages[index]
                .global_position
                .saturating_sub(1)
                .max(checkpoint.position);
            messages.truncate(index);
        }
        // Only accounts' messages make integration events: open only those (one key query
        // for the batch), and only when the endpoint takes any.
        messages.retain(|message| {
            let category = message.stream.category();
            !endpoint.events.is_empty() && (category == USER_CATEGORY || category == LOGIN_CATEGORY)
        });
        shared
            .sealer
            .unseal_messages_of(&mut messages, Fields::Only(PERSONAL_FIELDS_READ))
            .await?;
        let mut batch = Batch {
            pending: VecDeque::new(),
            end,
            poison: None,
            deleted: deleted.is_some(),
        };
        let mut before = checkpoint.position;
        for message in &messages {
            match IntegrationEvent::from_message(message, &shared.source) {
                Ok(Some(event)) if endpoint.events.contains(&event.kind) => {
                    let position = event.position;
                    batch.pending.push_back(Pending { event, before });
                    before = position;
                }
                Ok(_) => {}
                Err(error) => {
                    batch.end = message.global_position.saturating_sub(1).max(before);
                    batch.poison = Some(format!(
                        "message {} at position {}: {error}",
                        message.id, message.global_position
                    ));
                    break;
                }
            }
        }
        Ok(Some(batch))
    }

    /// Every pending event of `batch` is delivered: moves to its end, and halts before a
    /// message that cannot be read.
    async fn finish(
        &mut self,
        checkpoint: &Checkpoint,
        batch: Batch,
    ) -> Result<EndpointOutcome, WebhookError> {
        if !self.advance(checkpoint, batch.end).await? {
            return Ok(self.checkpoint_moved());
        }
        if batch.deleted {
            tracing::info!(
                consumer = self.name,
                "the endpoint was deleted; nothing more is sent"
            );
            self.deleted = true;
            return Ok(EndpointOutcome::Stopped);
        }
        if let Some(poison) = batch.poison {
            let reason = format!(
                "a message it cannot read ({poison}); the checkpoint stays before it. Fix the \
                 event's reader (an upcaster) or the data, then restart the aggregator"
            );
            tracing::error!(consumer = self.name, %reason, "webhook endpoint halted");
            self.halted = Some(reason.clone());
            return Ok(EndpointOutcome::Halted { reason });
        }
        Ok(EndpointOutcome::Passed {
            position: batch.end,
        })
    }

    /// Posts `event`, and records the attempt.
    async fn deliver(
        &mut self,
        endpoint: &EndpointConfig,
        event: &IntegrationEvent,
    ) -> Result<Answer, WebhookError> {
        let now = self.shared.clock.now();
        let body = event.to_json();
        let id = event.id.to_string();
        let timestamp = now.timestamp();
        let mut signature = endpoint.secret.sign(&id, timestamp, &body);
        if let Some((previous, replaced_at)) = &endpoint.previous
            && within(now, *replaced_at, self.shared.options.previous_secret_for)
        {
            signature.push(' ');
            signature.push_str(&previous.sign(&id, timestamp, &body));
        }
        let answer = self
            .sender
            .post(Delivery {
                url: &endpoint.url,
                id,
                timestamp,
                signature,
                body,
            })
            .await;
        attempts::record(
            &self.shared.read_model,
            &Attempt {
                webhook_id: *self.id.as_uuid(),
                message_id: event.id,
                event_type: event.kind.name().to_owned(),
                position: event.position,
                attempted_at: now,
                latency_ms: i32::try_from(answer.latency.as_millis()).unwrap_or(i32::MAX),
                status_code: answer.status.map(i32::from),
                error: answer.error.clone(),
                delivered: answer.delivered(),
            },
            self.shared.options.attempts_kept,
        )
        .await?;
        let webhook = self.id.to_string();
        if answer.delivered() {
            self.stats.delivered.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("webhook_delivered_total", "webhook" => webhook).increment(1);
        } else {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("webhook_failed_total", "webhook" => webhook).increment(1);
        }
        Ok(answer)
    }

    /// After a failed attempt: disables the endpoint if it has failed without a success for
    /// `disable_after` (by the attempts recorded, so the time survives a restart).
    async fn disable_if_failing_too_long(
        &mut self,
        endpoint: &EndpointConfig,
        reason: &str,
    ) -> Result<Option<EndpointOutcome>, WebhookError> {
        let now = self.shared.clock.now();
        let since = attempts::failing_since(
            &self.shared.read_model,
            *self.id.as_uuid(),
            endpoint.enabled_since,
        )
        .await?
        .unwrap_or(now);
        if !failed_too_long(now, since, self.shared.options.disable_after) {
            return Ok(None);
        }
        let reason = format!("failing since {}: {reason}", since.to_rfc3339());
        let Some(disabled_at) = self.disable(&reason, since).await? else {
            // Deleted meanwhile: nothing to disable, and nothing more to send.
            return Ok(Some(EndpointOutcome::Stopped));
        };
        self.disabled_at = Some(disabled_at);
        self.checkpoint = None;
        self.batch = None;
        self.stats.disabled.store(true, Ordering::Relaxed);
        metrics::counter!("webhook_disabled_total", "webhook" => self.id.to_string()).increment(1);
        tracing::warn!(
            consumer = self.name,
            %reason,
            "webhook endpoint disabled; an administrator's enable resumes it where it stopped"
        );
        Ok(Some(EndpointOutcome::Disabled { reason }))
    }

    /// Appends `WebhookDisabled` to the endpoint's stream, as `decide_webhook` decides on it,
    /// at the stream's exact version (an administrator's change in between is decided on
    /// again). The global position of the endpoint's disabling (this one, or one found), or
    /// `None` when it has been deleted.
    async fn disable(
        &self,
        reason: &str,
        failing_since: DateTime<Utc>,
    ) -> Result<Option<GlobalPosition>, WebhookError> {
        let store = &self.shared.store;
        let stream = endpoint_stream(self.id)?;
        for _ in 0..5 {
            let messages = store.read_stream(&stream, 0, STREAM_READ).await?;
            let mut events = Vec::with_capacity(messages.len());
            for message in &messages {
                events.extend(decode(self.id, message)?);
            }
            let Some(last) = messages.last() else {
                return Ok(None);
            };
            let command = WebhookCommand::Disable {
                reason: reason.to_owned(),
                failing_since,
            };
            let decided = match decide_webhook(
                &WebhookState::fold(&events),
                command,
                self.shared.clock.now(),
            ) {
                Ok(decided) => decided,
                Err(_) => return Ok(None),
            };
            if decided.is_empty() {
                // Disabled already.
                return Ok(Some(last.global_position));
            }
            let new_messages = decided
                .iter()
                .map(|event| {
                    NewMessage::new(event.event_type(), event.to_json()).with_metadata(
                        json!({ identity::EVENT_VERSION_KEY: event.version(), "by": "aggregator" }),
                    )
                })
                .collect();
            match store
                .append(vec![StreamAppend::new(
                    stream.clone(),
                    ExpectedVersion::Exact(last.position),
                    new_messages,
                )])
                .await
            {
                Ok(appended) => return Ok(Some(appended.last_global_position())),
                Err(AppendError::WrongExpectedVersion { .. }) => continue,
                Err(error) => return Err(error.into()),
            }
        }
        Err(WebhookError::Contended)
    }

    /// Moves the checkpoint from `from` to `to` (nothing when `to` is not ahead). False when
    /// it had moved under this worker: nothing was written.
    async fn advance(
        &mut self,
        from: &Checkpoint,
        to: GlobalPosition,
    ) -> Result<bool, WebhookError> {
        if to <= from.position {
            return Ok(true);
        }
        if !self
            .shared
            .read_model
            .move_checkpoint(&self.name, from, to)
            .await?
        {
            return Ok(false);
        }
        self.checkpoint = Some(from.at(to));
        self.stats.position.store(to, Ordering::Relaxed);
        metrics::gauge!("webhook_position", "webhook" => self.id.to_string()).set(to as f64);
        Ok(true)
    }

    /// The checkpoint this worker moves: the one it moved last, or the stored one (created at
    /// the endpoint's registration if there is none).
    async fn current_checkpoint(
        &mut self,
        endpoint: &EndpointConfig,
    ) -> Result<Checkpoint, WebhookError> {
        if let Some(checkpoint) = self.checkpoint {
            return Ok(checkpoint);
        }
        let checkpoint = attempts::ensure_checkpoint_at(
            &self.shared.read_model,
            &self.name,
            WEBHOOK_CONSUMER_VERSION,
            endpoint.registered_at,
        )
        .await?;
        if checkpoint.version != WEBHOOK_CONSUMER_VERSION {
            return Err(WebhookError::OtherVersion {
                stored: checkpoint.version,
                ours: WEBHOOK_CONSUMER_VERSION,
            });
        }
        if self.fence.is_some_and(|epoch| epoch != checkpoint.epoch) {
            return Err(WebhookError::TakenOver);
        }
        self.checkpoint = Some(checkpoint);
        self.stats
            .position
            .store(checkpoint.position, Ordering::Relaxed);
        Ok(checkpoint)
    }

    /// Nothing after the checkpoint. A `reset` would go unnoticed with nothing to move, so
    /// look; and a checkpoint ahead of its store must not go on.
    async fn idle(&mut self, checkpoint: &Checkpoint) -> Result<EndpointOutcome, WebhookError> {
        let stored = self.shared.read_model.checkpoint(&self.name).await?;
        if stored.is_some_and(|stored| stored != *checkpoint) {
            return Ok(self.checkpoint_moved());
        }
        let remedy = format!(
            "Events written since then would never be delivered. Once the store is whole \
             again, `aggregator reset {}` delivers again what followed the endpoint's \
             registration; then restart the aggregator",
            self.name
        );
        if let Some(reason) =
            consumer::store_behind(&self.shared.store, checkpoint.position, &remedy).await?
        {
            tracing::error!(consumer = self.name, %reason, "webhook endpoint halted");
            self.halted = Some(reason.clone());
            return Ok(EndpointOutcome::Halted { reason });
        }
        Ok(EndpointOutcome::Idle)
    }

    fn checkpoint_moved(&mut self) -> EndpointOutcome {
        tracing::info!(
            consumer = self.name,
            "the checkpoint moved under this worker (a reset or another replica); reloading it"
        );
        self.checkpoint = None;
        self.batch = None;
        EndpointOutcome::Reloaded
    }
}

#[async_trait]
impl Consumer for EndpointConsumer {
    type Error = WebhookError;

    fn name(&self) -> &str {
        &self.name
    }

    fn version(&self) -> i32 {
        WEBHOOK_CONSUMER_VERSION
    }

    fn store(&self) -> &Arc<dyn MessageStore> {
        &self.shared.store
    }

    fn subscribe(&self) -> Subscription {
        self.shared.wake_ups.subscribe()
    }

    fn read_model(&self) -> &ReadModelWriter {
        &self.shared.read_model
    }

    fn lock_timing(&self) -> LockTiming {
        LockTiming {
            retry: self.shared.options.lock_retry,
            lease: self.shared.options.lock_lease,
        }
    }

    fn backoff(&self) -> Backoff {
        self.shared.options.retry
    }

    fn holds_lock(&self) -> Arc<AtomicBool> {
        self.stats.holds_lock.clone()
    }

    async fn step(&mut self) -> Result<Progress, WebhookError> {
        Ok(match self.process_next().await? {
            EndpointOutcome::Delivered { .. }
            | EndpointOutcome::Passed { .. }
            | EndpointOutcome::Reloaded => Progress::Worked,
            // Stopped and disabled: the supervisor stops the task once it reads why.
            EndpointOutcome::Idle | EndpointOutcome::Stopped | EndpointOutcome::Disabled { .. } => {
                Progress::Idle
            }
            EndpointOutcome::Halted { .. } => Progress::Halted,
        })
    }

    fn took_over(&mut self, fence: Option<i64>) {
        self.fence = fence;
        // The checkpoint may have moved while another replica held the lock.
        self.checkpoint = None;
        self.batch = None;
    }

    fn forget(&mut self) {
        self.checkpoint = None;
        self.batch = None;
    }

    fn must_let_go(&self, error: &WebhookError) -> bool {
        matches!(
            error,
            WebhookError::TakenOver | WebhookError::OtherVersion { .. }
        )
    }

    /// A receiver that fails is the receiver's business, not a fault of this process.
    fn failure_is_an_error(&self, error: &WebhookError) -> bool {
        !matches!(error, WebhookError::Delivery { .. })
    }
}

/// Whether `now` is less than `limit` after `then` (or before it: a clock behind another).
fn within(now: DateTime<Utc>, then: DateTime<Utc>, limit: std::time::Duration) -> bool {
    match (now - then).to_std() {
        Ok(since) => since < limit,
        Err(_) => true,
    }
}
