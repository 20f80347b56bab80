//! The message store: append-only streams of messages in one global order, modelled on
//! Eventide's message-db, behind one port ([`MessageStore`]) with two adapters: PostgreSQL for
//! deployments and SQLite for the embedded default.
//!
//! What every adapter guarantees, and the conformance suite in `tests/` checks:
//! - appends to one or several streams are atomic and check each stream's expected version;
//! - a message id is written once: appending it again with the same content is an idempotent
//!   success, with other content a refusal;
//! - a reader of "everything after position p" sees every committed message exactly once, in
//!   increasing global position, however writers interleave their commits (docs/adr/0002);
//! - a stored message changes only by the operator's one-time upgrade (`rewrite_data`,
//!   `rename_stream`: ids and positions stay) and leaves only by retention (`prune_category`);
//! - a [`Subscription`] wakes consumers when new messages may be there, and keeps doing so
//!   across dropped connections (a poll interval backs up every wake-up signal).

#![forbid(unsafe_code)]

/// A query for whole messages: the columns [`RecordedMessage`] is read from, then `$rest` (the
/// conditions and order). Both adapters read the same columns; building the text at compile time
/// keeps each query one static string.
macro_rules! select_messages {
    ($rest:literal) => {
        concat!(
            "SELECT global_position, id, stream_name, position, type, data, metadata, time \
             FROM messages ",
            $rest
        )
    };
}

pub mod database;
mod message;
pub mod postgres;
pub mod sqlite;
mod subscription;

use async_trait::async_trait;

pub use message::{
    Appended, AppendedMessage, ExpectedVersion, GlobalPosition, InvalidStreamName, NewMessage,
    RecordedMessage, StreamAppend, StreamName, StreamPosition,
};
pub use postgres::PostgresMessageStore;
pub use sqlite::SqliteMessageStore;
pub use subscription::{Subscription, Wake};

/// The most messages one append may carry. PostgreSQL positions reserve 16 bits for a
/// message's index within its transaction, and a bound keeps one append from holding the store.
pub const MAX_MESSAGES_PER_APPEND: usize = 10_000;

/// The port: what the rest of the service needs from a message store.
#[async_trait]
pub trait MessageStore: Send + Sync + 'static {
    /// Appends to every stream in `appends` in one transaction: all of it is written or none.
    async fn append(&self, appends: Vec<StreamAppend>) -> Result<Appended, AppendError>;

    /// Up to `max` messages of one stream, from stream position `from` on.
    async fn read_stream(
        &self,
        stream: &StreamName,
        from: StreamPosition,
        max: usize,
    ) -> Result<Vec<RecordedMessage>, StoreError>;

    /// The last message of a stream, if it has any.
    async fn last_message(
        &self,
        stream: &StreamName,
    ) -> Result<Option<RecordedMessage>, StoreError>;

    /// Up to `max` messages of every stream in `category`, after global position `after`.
    async fn read_category(
        &self,
        category: &str,
        after: GlobalPosition,
        max: usize,
    ) -> Result<Vec<RecordedMessage>, StoreError>;

    /// Up to `max` messages of all streams, after global position `after`, in global order.
    async fn read_all(
        &self,
        after: GlobalPosition,
        max: usize,
    ) -> Result<Vec<RecordedMessage>, StoreError>;

    /// The position of the last message a reader can see now (0 when there is none).
    async fn head_position(&self) -> Result<GlobalPosition, StoreError>;

    /// The position of the last message written, whether readers can see it yet or not (0 when
    /// there is none). Every position an append has returned is at most this, so a larger one
    /// names a message that does not exist.
    async fn last_position(&self) -> Result<GlobalPosition, StoreError>;

    /// How many messages a reader can see after `after`: the backlog of a consumer at `after`.
    async fn count_after(&self, after: GlobalPosition) -> Result<u64, StoreError>;

    /// Deletes the messages of `category` written before `older_than`, except the first
    /// message of each stream and the last of each message type in it, and returns how many it
    /// deleted. For categories whose messages carry their stream's state (login history): they
    /// need a retention bound, and the last message of each kind is what later decisions and
    /// rebuilds read; the first keeps "no stream" appends exact.
    async fn prune_category(
        &self,
        category: &str,
        older_than: chrono::DateTime<chrono::Utc>,
    ) -> Result<u64, StoreError>;

    /// Replaces the data of the message with id `id`, keeping everything else about it (its
    /// id, stream, positions, type, metadata and time), and returns whether such a message
    /// exists.
    ///
    /// The one sanctioned rewrite of history, beside the deletions of [`Self::prune_category`]:
    /// for the operator's upgrade command only, which seals once the personal fields of events
    /// written in clear (`command-api seal-history`, docs/adr/0013). Nothing else may call it;
    /// to the rest of the service a stored message never changes. Consumers are not told: one
    /// that has read the message keeps what it read, one that reads it later sees the new data.
    ///
    /// Idempotent appends compare against the stored data (ADR 4): after a rewrite, appending
    /// the message again with its original content is refused as
    /// [`AppendError::DuplicateMessageId`], and with the new content it is an idempotent success.
    async fn rewrite_data(
        &self,
        id: uuid::Uuid,
        data: serde_json::Value,
    ) -> Result<bool, StoreError>;

    /// Moves every message of stream `from` to stream `to`, in one transaction, keeping their
    /// ids, stream positions, global positions, types, data, metadata and times, and returns how
    /// many it moved (0 when `from` has none). When `to` has messages of its own it is refused
    /// with [`RenameStreamError::TargetNotEmpty`] and moves nothing: two messages would share a
    /// stream position.
    ///
    /// For the operator's upgrade command only, beside [`Self::rewrite_data`]: reservation
    /// streams named by an unkeyed hash of an address take their keyed name (docs/adr/0013).
    ///
    /// Atomic against appends: one to `from` lands before the rename and moves with it, or
    /// after it as the first message of a new stream `from`; one to `to` lands before it (and
    /// the rename is refused) or after the moved messages, at the next position. Global
    /// positions do not change, so a reader of everything has seen each moved message once
    /// under its old name or will see it once under its new one, never twice. A reader of a
    /// category is in the same position unless the rename crosses categories: a message moved
    /// into a category behind a reader that has passed its position is not seen there.
    async fn rename_stream(
        &self,
        from: &StreamName,
        to: &StreamName,
    ) -> Result<u64, RenameStreamError>;

    /// A stream of wake-ups for consumers that tail the store.
    fn subscribe(&self) -> Subscription;

    /// Whether the store answers.
    async fn ping(&self) -> Result<(), StoreError>;
}

/// How to open a store from a URL.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub max_connections: u32,
    /// How long a subscriber waits for a wake-up before it looks anyway.
    pub poll_interval: std::time::Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            max_connections: 16,
            poll_interval: std::time::Duration::from_millis(500),
        }
    }
}

/// Opens the store at `url`: `postgres://...` (or `postgresql://`) or `sqlite://path` (the
/// file is created on first use). Applies the store's migrations first, which is a no-op when
/// they are applied already.
pub async fn connect(
    url: &str,
    options: ConnectOptions,
) -> Result<std::sync::Arc<dyn MessageStore>, StoreError> {
    if url.starts_with("sqlite:") {
        let store = SqliteMessageStore::open_url(url, options.poll_interval).await?;
        return Ok(std::sync::Arc::new(store));
    }
    let store = PostgresMessageStore::connect(url, &options).await?;
    Ok(std::sync::Arc::new(store))
}

/// Applies the store's migrations to the database at `url` and returns: what a deployment's
/// migration Job runs. Applying them twice changes nothing.
pub async fn migrate(url: &str) -> Result<(), StoreError> {
    if url.starts_with("sqlite:") {
        SqliteMessageStore::open_url(url, std::time::Duration::from_secs(1)).await?;
        return Ok(());
    }
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await?;
    PostgresMessageStore::migrate(&pool).await?;
    pool.close().await;
    Ok(())
}

/// Why an append was not written.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error("stream {stream} was expected at version {expected}, but is at {}", display_version(.actual))]
    WrongExpectedVersion {
        stream: StreamName,
        expected: ExpectedVersion,
        actual: Option<StreamPosition>,
    },
    #[error("message id {id} is already stored with other content")]
    DuplicateMessageId { id: uuid::Uuid },
    #[error("invalid append: {0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a stream was not renamed.
#[derive(Debug, thiserror::Error)]
pub enum RenameStreamError {
    /// The new name is taken: `to` has messages, whose positions the moved ones would share.
    #[error("stream {to} already has messages: a stream is only renamed to a name without any")]
    TargetNotEmpty { to: StreamName },
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn display_version(version: &Option<StreamPosition>) -> String {
    version.map_or_else(|| "no stream".to_owned(), |position| position.to_string())
}

/// The store could not be reached or did not behave.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("running the message store migrations")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("stored message {id} is corrupt: {reason}")]
    Corrupt { id: String, reason: String },
    /// The database would give new messages positions at or below ones already stored: its
    /// transaction counter is behind the store (a restore from a dump, a logical-replication
    /// copy) and the position offset was not advanced. Writing would hide the new messages from
    /// every consumer already past them, so nothing is written (docs/adr/0007).
    #[error(
        "refusing to write: new positions would start at {floor}, at or below the stored \
         position {stored}; the database's transaction counter is behind the store (restored \
         from a dump or copied by logical replication?) and its position offset must be advanced \
         (every start and `migrate` do that)"
    )]
    PositionsBehind { stored: u64, floor: u64 },
}

impl StoreError {
    /// Whether the database was out of reach (down, restarting, out of connections, busy, or
    /// read-only after a failover) rather than the request or the data being wrong: worth
    /// retrying shortly, a 503 not a 500.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Database(error) => database::unavailable(error),
            _ => false,
        }
    }
}

/// Checks what every adapter refuses before touching the database.
fn validate(appends: &[StreamAppend]) -> Result<(), AppendError> {
    let total: usize = appends.iter().map(|append| append.messages.len()).sum();
    if total == 0 {
        return Err(AppendError::Invalid(
            "an append needs at least one message".into(),
        ));
    }
    if total > MAX_MESSAGES_PER_APPEND {
        return Err(AppendError::Invalid(format!(
            "an append may carry at most {MAX_MESSAGES_PER_APPEND} messages, not {total}"
        )));
    }
    for (index, append) in appends.iter().enumerate() {
        if appends[..index]
            .iter()
            .any(|earlier| earlier.stream == append.stream)
        {
            return Err(AppendError::Invalid(format!(
                "stream {} appears twice in one append",
                append.stream
            )));
        }
        if append
            .messages
            .iter()
            .any(|message| message.message_type.is_empty())
        {
            return Err(AppendError::Invalid(
                "a message type may not be empty".into(),
            ));
        }
    }
    let mut ids: Vec<_> = appends
        .iter()
        .flat_map(|append| append.messages.iter().map(|message| message.id))
        .collect();
    ids.sort_unstable();
    if ids.windows(2).any(|pair| pair[0] == pair[1]) {
        return Err(AppendError::Invalid(
            "a message id appears twice in one append".into(),
        ));
    }
    Ok(())
}
