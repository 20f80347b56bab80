//! The JetStream relay: a consumer of the message store (DESIGN decision 13) that publishes the
//! account lifecycle to NATS JetStream as integration events (decision 17), for the services
//! that follow accounts.
//!
//! It reads the store's global order from its own checkpoint (`jetstream` in
//! `projection_checkpoints`), one replica at a time, with the loop, the lock and the takeover
//! every consumer shares ([`crate::consumer`]). [`Relay::process_next_batch`] is one step: read
//! a batch after the checkpoint, open its personal fields with the [`Sealer`] (one key query
//! for the batch), make each message's integration event
//! ([`IntegrationEvent::from_message`]), keep those of the published types
//! (`integration.events`), and publish each on subject `<nats.subject_prefix><type>` (say
//! `identity.user.registered.v1`) with its CloudEvents JSON as the payload.
//!
//! **At least once; exactly once inside JetStream's duplicate window.** Every event carries
//! its message id as `Nats-Msg-Id` (the CloudEvents `id` too), and the checkpoint moves only
//! past what JetStream acknowledged. A batch is published pipelined (every event sent, then
//! the acknowledgements awaited in order); if one fails, the checkpoint moves to the last event
//! acknowledged before it and the step fails, so the loop retries from there with backoff. An
//! event published again (after a crash, a failed acknowledgement, a takeover) has the same
//! `Nats-Msg-Id`, which the stream drops as a duplicate within its `duplicate_window`; later
//! than that a subscriber sees it twice, with the same `id`.
//!
//! **A backlog** (a start after a while, a reset) goes out as fast as JetStream takes it: while
//! a batch is published, a reader of its own reads the next batches, opens them and makes their
//! publications (two stages: the store reads the next while one is opened), and a step
//! publishes up to [`BATCHES_PER_STEP`] batches back to back, each one's checkpoint written
//! while the next is published. Caught up, a step is one read of what is new.
//!
//! **NATS down** is part of operation: the client reconnects by itself, the step fails fast
//! while it is not connected (nothing is queued in the client meanwhile), the loop logs at
//! `warn` and retries with backoff; nothing is skipped. The process starts whether NATS answers
//! or not.
//!
//! **The stream** (`nats.stream`, `IDENTITY` by default) is created when missing, on subjects
//! `<prefix>identity.>`, file storage, `max_age` (7 days by default: the retention a subscriber
//! that was away can still catch up within), `duplicate_window` (2 minutes) and `replicas`. An
//! existing stream is used as it is, and what it is is logged: its operator owns it.
//!
//! **Erased persons** (ADR 13). Messages are opened by the `Sealer` before an event is made,
//! the address alone ([`PERSONAL_FIELDS_READ`]: the relay never opens a password hash); an
//! erased person's address reads as `null`, so a reset relay replays an erased account's
//! registration without it. Within a batch, an event of an account whose erasure comes later in
//! the same batch (the key not deleted yet when it was read) is published without its address
//! too: no address is published once the relay has read that account's erasure.
//!
//! **Halting.** A message it cannot read (an event of a known type that does not decode) stops
//! the relay before it, as the mailer stops; it stays there until an upcaster or the data is
//! fixed and the process restarts.
//!
//! Metrics: `relay_published_total` (by `type`), `relay_duplicates_total`,
//! `relay_retried_total`, `relay_position`, `relay_lag_messages` (messages of any stream after
//! the checkpoint) and `relay_halted`.

use std::collections::HashSet;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::jetstream::{self, message::PublishMessage, stream};
use async_nats::{ConnectOptions, ServerAddr};
use async_trait::async_trait;
use bytes::Bytes;
use integration::{EventType, IntegrationEvent, PERSONAL_FIELDS_READ, Published};
use message_store::{GlobalPosition, MessageStore, RecordedMessage, StoreError};
use personal_data::{Fields, Sealer, VaultError};
use platform::settings::RedactedUrl;
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::watch;

use crate::consumer::{self, Backoff, Consumer, LockTiming, Progress};
use crate::read_model::{Checkpoint, ReadModelWriter};

/// How long a step waits for a client that is not connected (yet, or again) before it fails.
const CONNECTING_GRACE: Duration = Duration::from_secs(1);

/// The relay's checkpoint and lock.
pub const JETSTREAM: &str = "jetstream";

/// The version of the relay's checkpoint. A relay of another version writes nothing on top of
/// it, as projections do.
pub const JETSTREAM_VERSION: i32 = 1;

/// `nats`: the server the relay publishes to, and the stream it publishes into. Without `url`
/// there is no relay.
#[derive(Clone, Deserialize)]
#[serde(default)]
pub struct NatsSettings {
    /// `nats://host:4222` (or `tls://...`); several servers of one cluster separated by
    /// commas. A `user:password@` (or `token@`) in the URL is used when `user`/`token` are not
    /// set.
    pub url: Option<RedactedUrl>,
    /// A `.creds` file (a user JWT and its nkey seed), as NATS accounts issue them.
    pub credentials_file: Option<PathBuf>,
    pub token: Option<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    /// The JetStream stream, created when missing.
    pub stream: String,
    /// Put before every subject: `prod.` publishes `prod.identity.user.registered.v1`. Empty or
    /// ending with a dot.
    pub subject_prefix: String,
    /// How long the stream keeps an event (a stream created by the relay; 0: for ever).
    pub max_age_secs: u64,
    /// How long the stream remembers a `Nats-Msg-Id` to drop a duplicate.
    pub duplicate_window_secs: u64,
    /// The stream's replicas in a NATS cluster (1 for a single server; 3 for a cluster).
    pub replicas: usize,
    /// How long a publication may wait for JetStream's acknowledgement, and a stream request
    /// for its answer.
    pub publish_timeout_ms: u64,
}

impl Default for NatsSettings {
    fn default() -> Self {
        Self {
            url: None,
            credentials_file: None,
            token: None,
            user: None,
            password: None,
            stream: "IDENTITY".into(),
            subject_prefix: String::new(),
            max_age_secs: 7 * 24 * 60 * 60,
            duplicate_window_secs: 120,
            replicas: 1,
            publish_timeout_ms: 5000,
        }
    }
}

impl fmt::Debug for NatsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = |secret: &Option<String>| secret.as_ref().map(|_| "[redacted]");
        f.debug_struct("NatsSettings")
            .field("url", &self.url)
            .field("credentials_file", &self.credentials_file)
            .field("token", &redacted(&self.token))
            .field("user", &self.user)
            .field("password", &redacted(&self.password))
            .field("stream", &self.stream)
            .field("subject_prefix", &self.subject_prefix)
            .field("max_age_secs", &self.max_age_secs)
            .field("duplicate_window_secs", &self.duplicate_window_secs)
            .field("replicas", &self.replicas)
            .field("publish_timeout_ms", &self.publish_timeout_ms)
            .finish()
    }
}

/// What the `nats` settings cannot be used as: a fault of the configuration, which stops the
/// process at start (unlike NATS being down, which never does).
#[derive(Debug, thiserror::Error)]
pub enum NatsSettingsError {
    #[error("nats.url is not set")]
    NoUrl,
    #[error("nats.url is not a NATS server URL")]
    Url(#[source] std::io::Error),
    #[error("reading nats.credentials_file {}", .0.display())]
    Credentials(PathBuf, #[source] std::io::Error),
    #[error("nats.subject_prefix {0:?} must be empty or end with a dot")]
    SubjectPrefix(String),
    #[error("nats.stream {0:?} is no JetStream stream name (letters, digits, - and _)")]
    StreamName(String),
    #[error("nats.replicas must be between 1 and 5")]
    Replicas,
    #[error("connecting to NATS")]
    Connect(#[from] async_nats::ConnectError),
}

/// What talking to JetStream can meet; each is retried by the loop.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("NATS is not connected (the client reconnects by itself)")]
    NotConnected,
    #[error("JetStream did not answer about stream {stream}")]
    Stream {
        stream: String,
        #[source]
        source: async_nats::Error,
    },
    #[error("publishing on {subject}")]
    Publish {
        subject: String,
        #[source]
        source: jetstream::context::PublishError,
    },
    #[error("JetStream did not acknowledge the event {id} published on {subject}")]
    Ack {
        subject: String,
        id: uuid::Uuid,
        #[source]
        source: jetstream::context::PublishError,
    },
}

/// Errors a step can meet; all of them are retried by the loop.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("reading the message store")]
    Store(#[from] StoreError),
    #[error("writing the read model")]
    ReadModel(#[from] sqlx::Error),
    /// The key vault did not answer, or a sealed field did not open under its key: retried,
    /// never read as an erasure.
    #[error("opening the personal data of the messages read")]
    Vault(#[from] VaultError),
    #[error("JetStream has not acknowledged every event, which are published again: {0}")]
    Nats(#[from] NatsError),
    #[error(
        "the relay's checkpoint is of version {stored} and this relay is version {ours}; it \
         publishes nothing until a reset at its version"
    )]
    OtherVersion { stored: i32, ours: i32 },
    #[error("another worker took the relay over")]
    TakenOver,
}

/// The JetStream side of the relay: a client that reconnects by itself, the stream the events
/// go to (made sure of before the first publication), and the subjects.
pub struct JetStream {
    client: async_nats::Client,
    context: jetstream::Context,
    stream: stream::Config,
    subject_prefix: String,
    /// Whether the stream was found or made since the last time a publication found no stream.
    stream_ready: bool,
}

impl JetStream {
    /// Connects to `settings.url` with the credentials the settings name, in the background:
    /// this returns at once even when no server answers, and the client keeps trying.
    pub async fn connect(settings: &NatsSettings) -> Result<Self, NatsSettingsError> {
        let url = settings.url.as_ref().ok_or(NatsSettingsError::NoUrl)?;
        let prefix = &settings.subject_prefix;
        if !(prefix.is_empty() || prefix.ends_with('.')) || prefix.contains([' ', '*', '>']) {
            return Err(NatsSettingsError::SubjectPrefix(prefix.clone()));
        }
        let name_ok = !settings.stream.is_empty()
            && settings
                .stream
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !name_ok {
            return Err(NatsSettingsError::StreamName(settings.stream.clone()));
        }
        if !(1..=5).contains(&settings.replicas) {
            return Err(NatsSettingsError::Replicas);
        }
        let servers = url
            .expose()
            .split(',')
            .map(str::trim)
            .filter(|server| !server.is_empty())
            .map(str::parse::<ServerAddr>)
            .collect::<Result<Vec<_>, _>>()
            .map_err(NatsSettingsError::Url)?;
        let first = servers
            .first()
            .ok_or_else(|| NatsSettingsError::Url(std::io::Error::other("no server in the URL")))?;
        let mut options = ConnectOptions::new()
            .name(format!("identity aggregator {}", std::process::id()))
            .retry_on_initial_connect();
        if let Some(file) = &settings.credentials_file {
            options = options
                .credentials_file(file)
                .await
                .map_err(|error| NatsSettingsError::Credentials(file.clone(), error))?;
        }
        // async-nats does not read credentials from the URL itself.
        let (url_user, url_password) = (first.username(), first.password());
        if let Some(token) = &settings.token {
            options = options.token(token.clone());
        } else if let Some(user) = &settings.user {
            let password = settings.password.clone().unwrap_or_default();
            options = options.user_and_password(user.clone(), password);
        } else if let (Some(user), Some(password)) = (url_user, url_password) {
            options = options.user_and_password(user.to_owned(), password.to_owned());
        } else if let Some(token) = url_user {
            options = options.token(token.to_owned());
        }
        let client = options.connect(servers).await?;
        let timeout = Duration::from_millis(settings.publish_timeout_ms.max(1));
        let context = jetstream::ContextBuilder::new()
            .timeout(timeout)
            .build(client.clone());
        let max_age = Duration::from_secs(settings.max_age_secs);
        let mut duplicate_window = Duration::from_secs(settings.duplicate_window_secs);
        if !max_age.is_zero() {
            // JetStream refuses a window longer than the stream keeps messages.
            duplicate_window = duplicate_window.min(max_age);
        }
        Ok(Self {
            client,
            context,
            stream: stream::Config {
                name: settings.stream.clone(),
                description: Some(
                    "The identity service's integration events (CloudEvents 1.0 JSON), one \
                     subject per type"
                        .into(),
                ),
                subjects: vec![format!("{prefix}identity.>")],
                storage: stream::StorageType::File,
                retention: stream::RetentionPolicy::Limits,
                discard: stream::DiscardPolicy::Old,
                max_age,
                duplicate_window,
                num_replicas: settings.replicas,
                ..stream::Config::default()
            },
            subject_prefix: prefix.clone(),
            stream_ready: false,
        })
    }

    /// The subject events of `kind` are published on.
    pub fn subject(&self, kind: EventType) -> String {
        format!("{}{}", self.subject_prefix, kind.name())
    }

    /// The stream the relay publishes into, as it creates it when missing.
    pub fn stream_config(&self) -> &stream::Config {
        &self.stream
    }

    /// The client, for whoever wants to see its connection (a test, readiness).
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// Whether the client is connected, waiting a moment for it ([`CONNECTING_GRACE`]): at
    /// start, or through a brief reconnection, a step need not fail.
    async fn connected(&self) -> Result<(), NatsError> {
        let deadline = Instant::now() + CONNECTING_GRACE;
        loop {
            if self.client.connection_state() == State::Connected {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(NatsError::NotConnected);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Finds the stream, or creates it; says what it is.
    async fn ensure_stream(&mut self) -> Result<(), NatsError> {
        if self.stream_ready {
            return Ok(());
        }
        self.connected().await?;
        let name = self.stream.name.clone();
        let stream_error = |source: async_nats::Error| NatsError::Stream {
            stream: name.clone(),
            source,
        };
        let found = match self.context.get_stream(&name).await {
            Ok(stream) => Some(stream),
            Err(error) if is_stream_not_found(&error) => None,
            Err(error) => return Err(stream_error(error.into())),
        };
        let info = match found {
            Some(stream) => {
                let info = stream.cached_info();
                tracing::info!(
                    stream = %name,
                    subjects = ?info.config.subjects,
                    storage = ?info.config.storage,
                    retention = ?info.config.retention,
                    max_age = ?info.config.max_age,
                    max_bytes = info.config.max_bytes,
                    max_messages = info.config.max_messages,
                    duplicate_window = ?info.config.duplicate_window,
                    replicas = info.config.num_replicas,
                    messages = info.state.messages,
                    "publishing into the existing stream, as it is"
                );
                info.config.clone()
            }
            None => {
                let created = self
                    .context
                    .get_or_create_stream(self.stream.clone())
                    .await
                    .map_err(|error| stream_error(error.into()))?;
                let config = created.cached_info().config.clone();
                tracing::info!(
                    stream = %name,
                    subjects = ?config.subjects,
                    max_age = ?config.max_age,
                    duplicate_window = ?config.duplicate_window,
                    replicas = config.num_replicas,
                    "created the stream"
                );
                config
            }
        };
        if info.duplicate_window.is_zero() {
            tracing::warn!(
                stream = %name,
                "the stream drops no duplicates: an event published again reaches subscribers twice"
            );
        }
        self.stream_ready = true;
        Ok(())
    }

    /// The publication of `event`: its subject, its id and its CloudEvents JSON.
    pub fn publication(&self, event: &IntegrationEvent) -> Publication {
        Publication::of(event, &self.subject_prefix)
    }

    /// Publishes `events` pipelined, in order: sends them all, then awaits the
    /// acknowledgements in order. Returns how many, from the first, JetStream acknowledged,
    /// how many of those were duplicates it dropped, and what stopped it, if anything.
    pub async fn publish(&mut self, events: &[Publication]) -> Sent {
        let mut sent = Sent::default();
        if let Err(error) = self.ensure_stream().await {
            sent.failure = Some(error);
            return sent;
        }
        if let Err(error) = self.connected().await {
            sent.failure = Some(error);
            return sent;
        }
        let mut pending = Vec::with_capacity(events.len());
        for event in events {
            let message = PublishMessage::build()
                .message_id(&event.msg_id)
                .payload(event.payload.clone());
            match self
                .context
                .send_publish(event.subject.clone(), message)
                .await
            {
                Ok(ack) => pending.push(ack),
                Err(source) => {
                    let subject = event.subject.clone();
                    sent.failure = Some(NatsError::Publish { subject, source });
                    break;
                }
            }
        }
        for (ack, event) in pending.into_iter().zip(events) {
            match ack.await {
                Ok(ack) => {
                    sent.acknowledged += 1;
                    sent.duplicates += usize::from(ack.duplicate);
                }
                Err(source) => {
                    if source.kind() == jetstream::context::PublishErrorKind::StreamNotFound {
                        // Deleted under the relay, or never covering these subjects: look
                        // again before the next publication.
                        self.stream_ready = false;
                    }
                    sent.failure = Some(NatsError::Ack {
                        subject: event.subject.clone(),
                        id: event.id,
                        source,
                    });
                    break;
                }
            }
        }
        sent
    }
}

fn is_stream_not_found(error: &jetstream::context::GetStreamError) -> bool {
    matches!(
        error.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(error)
            if error.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

/// An integration event as it is published: ready before the publishing starts, so that the
/// batch goes out as fast as the client sends.
#[derive(Debug, Clone)]
pub struct Publication {
    pub kind: EventType,
    /// The CloudEvents `id`: the stored message's id.
    pub id: uuid::Uuid,
    /// `Nats-Msg-Id`: the same id, as text.
    pub msg_id: String,
    /// `<prefix><type>`.
    pub subject: String,
    /// The CloudEvents JSON document.
    pub payload: Bytes,
}

impl Publication {
    pub fn of(event: &IntegrationEvent, subject_prefix: &str) -> Self {
        Self {
            kind: event.kind,
            id: event.id,
            msg_id: event.id.to_string(),
            subject: format!("{subject_prefix}{}", event.kind.name()),
            payload: event.to_json().into(),
        }
    }
}

/// What [`JetStream::publish`] did with a batch.
#[derive(Debug, Default)]
pub struct Sent {
    /// Events JetStream acknowledged, from the first on, without a gap.
    pub acknowledged: usize,
    /// Of those, the ones it had already (the same `Nats-Msg-Id` within its window).
    pub duplicates: usize,
    /// What stopped it before the end, if anything.
    pub failure: Option<NatsError>,
}

#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// Messages (of every stream) per read of the store; the events among them are published
    /// as one pipelined batch. A crash publishes at most one batch again (dropped by JetStream
    /// as duplicates within its window).
    pub batch_size: usize,
    pub lock_retry: Duration,
    pub lock_lease: Duration,
    /// The wait before a failed step is tried again, doubled each time.
    pub retry: Backoff,
}

impl Default for RelayOptions {
    fn default() -> Self {
        Self {
            batch_size: 1000,
            lock_retry: Duration::from_secs(1),
            lock_lease: Duration::from_secs(5),
            retry: Backoff {
                first: Duration::from_millis(500),
                max: Duration::from_secs(30),
            },
        }
    }
}

/// Counters a caller (a test, the status page) can watch while the relay runs; this relay's
/// alone, where the metrics are the process's.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Events JetStream acknowledged, duplicates included.
    pub published: AtomicU64,
    /// Events JetStream acknowledged as duplicates of ones it had (published again).
    pub duplicates: AtomicU64,
    /// Steps that failed, each retried.
    pub retried: AtomicU64,
    /// Shared with the lock's heartbeat, which clears it the moment the lock is lost.
    pub holds_lock: Arc<AtomicBool>,
}

/// What one step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayOutcome {
    /// The checkpoint moved to `position`: `messages` read, `published` events acknowledged
    /// by JetStream, `duplicates` of them dropped by it as published before.
    Published {
        messages: usize,
        published: usize,
        duplicates: usize,
        position: GlobalPosition,
    },
    /// Nothing new to read.
    Idle,
    /// The relay met a message it cannot read and stopped before it.
    Halted { reason: String },
}

/// How a relay makes its publications: the CloudEvents `source`, the types it publishes, and
/// the subjects' prefix.
struct MadeAs {
    source: String,
    published: Published,
    subject_prefix: String,
}

/// Opens the personal fields of `messages`, read after `after`, and makes their publications.
async fn open_batch(
    sealer: &Sealer,
    made_as: &MadeAs,
    after: GlobalPosition,
    mut messages: Vec<RecordedMessage>,
    batch_size: usize,
) -> Result<Batch, RelayError> {
    sealer
        .unseal_messages_of(&mut messages, Fields::Only(PERSONAL_FIELDS_READ))
        .await?;
    let mut batch = Batch::of(&messages, after, made_as);
    batch.full = messages.len() >= batch_size;
    Ok(batch)
}

/// Batches read ahead while there is a backlog: a task of its own (on another core, where there
/// is one) reads, opens and makes the events of the batches after a position, up to
/// [`READ_AHEAD`] batches ahead of the step that publishes them, and stops at the head of the
/// store (a batch less than full), at a message that cannot be read, or at an error. Aborted
/// when dropped: whenever the checkpoint does not move as it expects.
struct Reader {
    batches: tokio::sync::mpsc::Receiver<(GlobalPosition, Batch)>,
    task: tokio::task::JoinHandle<()>,
}

/// Batches one step publishes at most, back to back, before the loop looks at its lock and the
/// shutdown again.
pub const BATCHES_PER_STEP: usize = 16;

/// Batches a [`Reader`] holds ready: enough to keep the publisher busy while the store, the
/// vault and the decoding take their turn.
const READ_AHEAD: usize = 2;

impl Reader {
    fn start(relay: &Relay, after: GlobalPosition) -> Self {
        let (store, sealer) = (relay.store.clone(), relay.sealer.clone());
        let made_as = relay.made_as.clone();
        let batch_size = relay.options.batch_size;
        // Two stages, so that the store reads the next batch while this one is opened and
        // made into events.
        let (read_sender, mut read) = tokio::sync::mpsc::channel(1);
        let reading = AbortOnDrop(tokio::spawn(async move {
            let mut after = after;
            while let Ok(messages) = store.read_all(after, batch_size).await {
                let Some(last) = messages.last() else {
                    return;
                };
                let (end, full) = (last.global_position, messages.len() >= batch_size);
                if read_sender.send((after, messages)).await.is_err() || !full {
                    return;
                }
                after = end;
            }
        }));
        let (sender, batches) = tokio::sync::mpsc::channel(READ_AHEAD);
        let task = tokio::spawn(async move {
            let _reading = reading;
            while let Some((after, messages)) = read.recv().await {
                let Ok(batch) = open_batch(&sealer, &made_as, after, messages, batch_size).await
                else {
                    return;
                };
                let poison = batch.poison.is_some();
                if sender.send((after, batch)).await.is_err() || poison {
                    return;
                }
            }
        });
        Self { batches, task }
    }

    /// The batch after `after`, if it is the next one this reader has (or will have).
    async fn next(&mut self, after: GlobalPosition) -> Option<Batch> {
        match self.batches.recv().await {
            Some((from, batch)) if from == after => Some(batch),
            _ => None,
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A task aborted when this is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The integration events of one batch read, ready to publish.
struct Batch {
    /// Messages read.
    messages: usize,
    /// Whether the read was a full batch: more are likely waiting.
    full: bool,
    events: Vec<Publication>,
    /// For each event, the position the checkpoint may move to once everything before it is
    /// acknowledged: the message before it in the batch, or the checkpoint.
    before: Vec<GlobalPosition>,
    /// The position every message read (up to a poison one) takes the checkpoint to.
    end: GlobalPosition,
    /// A message that cannot be read: where the relay halts, after what comes before it.
    poison: Option<String>,
}

impl Batch {
    fn of(messages: &[RecordedMessage], after: GlobalPosition, made_as: &MadeAs) -> Self {
        let mut end = after;
        let mut poison = None;
        // Every event the batch makes, published or not: an erasure blanks what precedes it
        // even when erasures themselves are not published.
        let mut made = Vec::new();
        for message in messages {
            match IntegrationEvent::from_message(message, &made_as.source) {
                Ok(Some(event)) => made.push((end, event)),
                Ok(None) => {}
                Err(error) => {
                    poison = Some(format!(
                        "message {} at position {}: {error}",
                        message.id, message.global_position
                    ));
                    break;
                }
            }
            end = message.global_position;
        }
        forget_addresses_of_the_erased(&mut made);
        let (before, events) = made
            .into_iter()
            .filter(|(_, event)| made_as.published.contains(event.kind))
            .map(|(before, event)| (before, Publication::of(&event, &made_as.subject_prefix)))
            .unzip();
        Self {
            messages: messages.len(),
            full: false,
            events,
            before,
            end,
            poison,
        }
    }
}

/// Blanks the address of every event whose account is erased later in the batch: its key may
/// not be deleted yet, but the relay has read the erasure (see the module documentation).
fn forget_addresses_of_the_erased(events: &mut [(GlobalPosition, IntegrationEvent)]) {
    let mut erased: HashSet<String> = HashSet::new();
    for (_, event) in events.iter_mut().rev() {
        if event.kind == EventType::Erased {
            erased.insert(event.subject.clone());
            continue;
        }
        if erased.contains(&event.subject)
            && let Some(email) = event.data.get_mut("email")
        {
            *email = Value::Null;
        }
    }
}

/// The relay: one worker of the `jetstream` consumer.
pub struct Relay {
    store: Arc<dyn MessageStore>,
    sealer: Sealer,
    read_model: ReadModelWriter,
    jetstream: JetStream,
    made_as: Arc<MadeAs>,
    options: RelayOptions,
    checkpoint: Option<Checkpoint>,
    /// The epoch this worker set when it took the lock; `None` without the lock (stepped by a
    /// test, or on SQLite), and then it follows whichever epoch it finds.
    fence: Option<i64>,
    halted: Option<String>,
    stats: Arc<RelayStats>,
    /// Everything up to this position is acknowledged by JetStream (set before the checkpoint
    /// is written, so it may run a little ahead of it).
    acknowledged: watch::Sender<GlobalPosition>,
    lag_measured_at: Option<Instant>,
    /// The batches after the checkpoint, read while the ones before them are published.
    reader: Option<Reader>,
    /// A batch the reader had ready when a step ended, and the position it follows.
    ready: Option<(GlobalPosition, Batch)>,
}

impl Relay {
    /// A relay that reads `store`, opening personal fields with `sealer`, keeps its checkpoint
    /// in `read_model`, and publishes the `published` types to `jetstream` with `source` as
    /// their CloudEvents source.
    pub fn new(
        store: Arc<dyn MessageStore>,
        sealer: Sealer,
        read_model: ReadModelWriter,
        jetstream: JetStream,
        source: impl Into<String>,
        published: Published,
        options: RelayOptions,
    ) -> Self {
        let subject_prefix = jetstream.subject_prefix.clone();
        Self {
            store,
            sealer,
            read_model,
            jetstream,
            made_as: Arc::new(MadeAs {
                source: source.into(),
                published,
                subject_prefix,
            }),
            options,
            checkpoint: None,
            fence: None,
            halted: None,
            stats: Arc::default(),
            acknowledged: watch::channel(0).0,
            lag_measured_at: None,
            reader: None,
            ready: None,
        }
    }

    pub fn stats(&self) -> Arc<RelayStats> {
        self.stats.clone()
    }

    /// The position up to which JetStream has acknowledged every published event, as it
    /// moves.
    pub fn acknowledged(&self) -> watch::Receiver<GlobalPosition> {
        self.acknowledged.subscribe()
    }

    pub fn jetstream(&self) -> &JetStream {
        &self.jetstream
    }

    /// Works until `shutdown` completes, one replica at a time (see [`crate::consumer`]).
    /// Never returns early on errors.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        metrics::gauge!("relay_halted").set(0.0);
        consumer::run(self, shutdown).await;
    }

    /// Reads after the checkpoint, publishes the integration events and moves the checkpoint
    /// past what JetStream acknowledged: one batch, or with a backlog up to
    /// [`BATCHES_PER_STEP`] batches back to back, each one's checkpoint written while the next
    /// one is published.
    pub async fn process_next_batch(&mut self) -> Result<RelayOutcome, RelayError> {
        if let Some(reason) = &self.halted {
            return Ok(RelayOutcome::Halted {
                reason: reason.clone(),
            });
        }
        'step: loop {
            let checkpoint = self.current_checkpoint().await?;
            let Some(mut batch) = self.next_batch(checkpoint.position).await? else {
                match self.idle(&checkpoint).await? {
                    Some(outcome) => return Ok(outcome),
                    None => continue,
                }
            };
            let mut from = checkpoint;
            let mut moving: Option<GlobalPosition> = None;
            let (mut messages, mut published, mut duplicates) = (0, 0, 0);
            for round in 1..=BATCHES_PER_STEP {
                // With a backlog, the batches after this one are read, opened and made into
                // events while it is published and acknowledged.
                if self.reader.is_none() && batch.full && batch.poison.is_none() {
                    self.reader = Some(Reader::start(self, batch.end));
                }
                let (sent, moved) = match moving.take() {
                    Some(to) => {
                        let (sent, moved) = tokio::join!(
                            self.jetstream.publish(&batch.events),
                            self.read_model.move_checkpoint(JETSTREAM, &from, to)
                        );
                        (sent, Some(moved.map(|moved| (moved, to))))
                    }
                    None => (self.jetstream.publish(&batch.events).await, None),
                };
                match moved {
                    None => {}
                    Some(Ok((true, to))) => from = self.moved(from, to).await,
                    Some(Ok((false, _))) => {
                        // What this round published comes again, and JetStream drops it.
                        self.checkpoint_moved();
                        continue 'step;
                    }
                    Some(Err(error)) => {
                        self.reader = None;
                        return Err(error.into());
                    }
                }
                let done = match &sent.failure {
                    Some(_) => batch.before[sent.acknowledged],
                    None => batch.end,
                };
                self.record(&batch, &sent, done);
                messages += batch.messages;
                published += sent.acknowledged;
                duplicates += sent.duplicates;
                if sent.failure.is_some() || batch.poison.is_some() {
                    let moved = self.advance(&from, done).await?;
                    if !moved {
                        self.checkpoint_moved();
                    }
                    if let Some(failure) = sent.failure {
                        self.reader = None;
                        self.stats.retried.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("relay_retried_total").increment(1);
                        return Err(failure.into());
                    }
                    let reason = format!(
                        "a message it cannot read ({}); the checkpoint stays before it. Fix \
                         the event's reader (an upcaster) or the data, then restart the \
                         aggregator",
                        batch.poison.unwrap_or_default()
                    );
                    return Ok(self.halt(done, reason));
                }
                if done != from.position {
                    moving = Some(done);
                }
                // The next batch only if the reader has it (or is reading it).
                let Some(reader) = self.reader.as_mut() else {
                    break;
                };
                match reader.next(done).await {
                    Some(next) if round < BATCHES_PER_STEP => batch = next,
                    Some(next) => {
                        self.ready = Some((done, next));
                        break;
                    }
                    None => {
                        self.reader = None;
                        break;
                    }
                }
            }
            let position = moving.unwrap_or(from.position);
            if !self.advance(&from, position).await? {
                self.checkpoint_moved();
                continue;
            }
            return Ok(RelayOutcome::Published {
                messages,
                published,
                duplicates,
                position,
            });
        }
    }

    /// The batch after `after`: the one the reader left ready, or the reader's next, or read
    /// now; `None` when there is nothing to read.
    async fn next_batch(&mut self, after: GlobalPosition) -> Result<Option<Batch>, RelayError> {
        if let Some((from, batch)) = self.ready.take()
            && from == after
        {
            return Ok(Some(batch));
        }
        if let Some(reader) = self.reader.as_mut()
            && let Some(batch) = reader.next(after).await
        {
            return Ok(Some(batch));
        }
        self.reader = None;
        self.read(after).await
    }

    /// The batch after `after`, opened and made into events; `None` when there is nothing.
    async fn read(&self, after: GlobalPosition) -> Result<Option<Batch>, RelayError> {
        let batch_size = self.options.batch_size;
        let messages = self.store.read_all(after, batch_size).await?;
        if messages.is_empty() {
            return Ok(None);
        }
        let batch = open_batch(&self.sealer, &self.made_as, after, messages, batch_size).await?;
        Ok(Some(batch))
    }

    /// Counts what JetStream acknowledged, and says up to where.
    fn record(&self, batch: &Batch, sent: &Sent, done: GlobalPosition) {
        let mut by_type = [0u64; EventType::ALL.len()];
        for event in &batch.events[..sent.acknowledged] {
            if let Some(index) = EventType::ALL.iter().position(|kind| *kind == event.kind) {
                by_type[index] += 1;
            }
        }
        for (kind, count) in EventType::ALL.iter().zip(by_type) {
            if count > 0 {
                metrics::counter!("relay_published_total", "type" => kind.name()).increment(count);
            }
        }
        if sent.duplicates > 0 {
            metrics::counter!("relay_duplicates_total").increment(sent.duplicates as u64);
            tracing::debug!(
                duplicates = sent.duplicates,
                "JetStream had events published again, and dropped them"
            );
        }
        self.stats
            .published
            .fetch_add(sent.acknowledged as u64, Ordering::Relaxed);
        self.stats
            .duplicates
            .fetch_add(sent.duplicates as u64, Ordering::Relaxed);
        self.acknowledged.send_if_modified(|acknowledged| {
            let moves = done > *acknowledged;
            if moves {
                *acknowledged = done;
            }
            moves
        });
    }

    /// Moves the checkpoint from `from` to `to` (nothing when they are the same). False when
    /// it had moved under this worker: nothing was written.
    async fn advance(&mut self, from: &Checkpoint, to: GlobalPosition) -> Result<bool, RelayError> {
        if to == from.position {
            return Ok(true);
        }
        if !self.read_model.move_checkpoint(JETSTREAM, from, to).await? {
            return Ok(false);
        }
        self.moved(*from, to).await;
        Ok(true)
    }

    /// The checkpoint has moved from `from` to `to`: remembers it, and says so.
    async fn moved(&mut self, from: Checkpoint, to: GlobalPosition) -> Checkpoint {
        let checkpoint = from.at(to);
        self.checkpoint = Some(checkpoint);
        metrics::gauge!("relay_position").set(to as f64);
        self.measure_lag(to).await;
        checkpoint
    }

    /// The checkpoint this worker moves: the one it moved last, or the stored one (created at
    /// 0 if there is none) once it has forgotten it.
    async fn current_checkpoint(&mut self) -> Result<Checkpoint, RelayError> {
        if let Some(checkpoint) = self.checkpoint {
            return Ok(checkpoint);
        }
        let checkpoint = self
            .read_model
            .ensure_checkpoint(JETSTREAM, JETSTREAM_VERSION)
            .await?;
        if checkpoint.version != JETSTREAM_VERSION {
            return Err(RelayError::OtherVersion {
                stored: checkpoint.version,
                ours: JETSTREAM_VERSION,
            });
        }
        if self.fence.is_some_and(|epoch| epoch != checkpoint.epoch) {
            return Err(RelayError::TakenOver);
        }
        self.checkpoint = Some(checkpoint);
        Ok(checkpoint)
    }

    /// Nothing new after the checkpoint. A `reset` would go unnoticed with nothing to move, so
    /// look (`None`: it moved, start over). And a checkpoint ahead of its store must not go on.
    async fn idle(&mut self, checkpoint: &Checkpoint) -> Result<Option<RelayOutcome>, RelayError> {
        let stored = self.read_model.checkpoint(JETSTREAM).await?;
        if stored.is_some_and(|stored| stored != *checkpoint) {
            self.checkpoint_moved();
            return Ok(None);
        }
        let remedy = "Events written since then would never be published. Once the store is \
                      whole again, `aggregator reset jetstream` publishes what the store holds \
                      again (JetStream drops those it still remembers), then restart the \
                      aggregator";
        if let Some(reason) =
            consumer::store_behind(&self.store, checkpoint.position, remedy).await?
        {
            return Ok(Some(self.halt(checkpoint.position, reason)));
        }
        metrics::gauge!("relay_lag_messages").set(0.0);
        Ok(Some(RelayOutcome::Idle))
    }

    /// Stops the relay where it is, until the process restarts, and says why.
    fn halt(&mut self, checkpoint: GlobalPosition, reason: String) -> RelayOutcome {
        tracing::error!(consumer = JETSTREAM, checkpoint, %reason, "relay halted");
        metrics::gauge!("relay_halted").set(1.0);
        self.halted = Some(reason.clone());
        self.checkpoint = None;
        self.reader = None;
        self.ready = None;
        RelayOutcome::Halted { reason }
    }

    fn checkpoint_moved(&mut self) {
        tracing::warn!(
            consumer = JETSTREAM,
            "the checkpoint moved under this worker (another replica or a reset); reloading it"
        );
        self.checkpoint = None;
        self.reader = None;
        self.ready = None;
    }

    /// `relay_lag_messages`, at most once a second: counting the backlog is not free.
    async fn measure_lag(&mut self, checkpoint: GlobalPosition) {
        if self
            .lag_measured_at
            .is_some_and(|at| at.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        self.lag_measured_at = Some(Instant::now());
        if let Ok(lag) = self.store.count_after(checkpoint).await {
            metrics::gauge!("relay_lag_messages").set(lag as f64);
        }
    }
}

#[async_trait]
impl Consumer for Relay {
    type Error = RelayError;

    fn name(&self) -> &'static str {
        JETSTREAM
    }

    fn version(&self) -> i32 {
        JETSTREAM_VERSION
    }

    fn store(&self) -> &Arc<dyn MessageStore> {
        &self.store
    }

    fn read_model(&self) -> &ReadModelWriter {
        &self.read_model
    }

    fn lock_timing(&self) -> LockTiming {
        LockTiming {
            retry: self.options.lock_retry,
            lease: self.options.lock_lease,
        }
    }

    fn backoff(&self) -> Backoff {
        self.options.retry
    }

    fn holds_lock(&self) -> Arc<AtomicBool> {
        self.stats.holds_lock.clone()
    }

    async fn step(&mut self) -> Result<Progress, RelayError> {
        Ok(match self.process_next_batch().await? {
            RelayOutcome::Published { .. } => Progress::Worked,
            RelayOutcome::Idle => Progress::Idle,
            RelayOutcome::Halted { .. } => Progress::Halted,
        })
    }

    fn took_over(&mut self, fence: Option<i64>) {
        self.fence = fence;
        // The checkpoint may have moved while another replica held the lock.
        self.checkpoint = None;
        self.reader = None;
        self.ready = None;
    }

    fn forget(&mut self) {
        self.checkpoint = None;
        self.reader = None;
        self.ready = None;
    }

    fn must_let_go(&self, error: &RelayError) -> bool {
        matches!(
            error,
            RelayError::TakenOver | RelayError::OtherVersion { .. }
        )
    }

    /// NATS down for a while is part of operation, not a fault of this process.
    fn failure_is_an_error(&self, error: &RelayError) -> bool {
        !matches!(error, RelayError::Nats(_))
    }
}
