//! The SQLite adapter: the embedded default, one file, no server.
//!
//! SQLite allows one writer at a time, so appends go through a single writer connection and
//! commit in the order their positions were drawn: readers need no horizon. Wake-ups are an
//! in-process signal; other processes on the same file find new messages by polling.

use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{Connection, Row};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::postgres::{parse_stored_stream, to_i64, to_u64};
use crate::{
    AppendError, Appended, AppendedMessage, GlobalPosition, MessageStore, RecordedMessage,
    RenameStreamError, StoreError, StreamAppend, StreamName, StreamPosition, Subscription,
};

/// A stream's messages from a position on, at most a limit
/// (see [`SqliteMessageStore::read_page`]).
const READ_STREAM: &str =
    select_messages!("WHERE stream_name = ? AND position >= ? ORDER BY position LIMIT ?");

/// A category's messages after a global position, at most a limit.
const READ_CATEGORY: &str =
    select_messages!("WHERE category = ? AND global_position > ? ORDER BY global_position LIMIT ?");

/// The message store in an SQLite file.
#[derive(Clone)]
pub struct SqliteMessageStore {
    inner: Arc<Inner>,
}

struct Inner {
    /// One connection: SQLite has one writer at a time, and queueing here is cheaper than
    /// retrying on SQLITE_BUSY.
    writer: SqlitePool,
    readers: SqlitePool,
    poll_interval: Duration,
    subscribers: Mutex<Vec<Weak<Notify>>>,
}

/// How long a statement waits for the file's lock before it fails as busy.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an emptying of the write-ahead log waits for readers in one attempt: while it
/// waits, no one writes.
const CHECKPOINT_BUSY_TIMEOUT_MS: u32 = 100;

/// Connection settings for an SQLite database file, shared by every component that opens one.
pub fn connect_options(path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // FULL: an acknowledged append survives a power loss, not only a process crash.
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(BUSY_TIMEOUT)
        .foreign_keys(true)
        // Deleted and overwritten content is zeroed in its page, not left in free space: the
        // file is the copy an erasure must reach (an erased key, an erased account's row and
        // its index entries, ADR 13).
        .pragma("secure_delete", "ON")
}

/// Copies the write-ahead log into the database file and empties the log, which otherwise
/// keeps earlier versions of the pages written (an erased account's row, an erased key) until
/// they are overwritten. A reader holding an older snapshot keeps the log from emptying, and
/// writers wait while the checkpoint waits for it: so each attempt waits a tenth of a second at
/// most, a few attempts apart, then the log is left for the next checkpoint. Answers whether
/// the log was emptied.
pub async fn truncate_write_ahead_log(pool: &SqlitePool) -> Result<bool, sqlx::Error> {
    const ATTEMPTS: u32 = 3;
    let mut connection = pool.acquire().await?;
    let waiting_briefly = format!("PRAGMA busy_timeout = {CHECKPOINT_BUSY_TIMEOUT_MS}");
    let waiting_as_usual = format!("PRAGMA busy_timeout = {}", BUSY_TIMEOUT.as_millis());
    sqlx::query(&waiting_briefly)
        .execute(&mut *connection)
        .await?;
    let mut emptied = Ok(false);
    for attempt in 1..=ATTEMPTS {
        // (busy, frames in the log, frames copied): busy is 1 while a reader needs the log.
        let checkpoint: Result<(i64, i64, i64), _> =
            sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)")
                .fetch_one(&mut *connection)
                .await;
        match checkpoint {
            Ok((0, _, _)) => emptied = Ok(true),
            Ok(_) if attempt < ATTEMPTS => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Ok(_) => {}
            Err(error) => emptied = Err(error),
        }
        break;
    }
    // The connection goes back to the pool with the busy timeout every statement expects.
    sqlx::query(&waiting_as_usual)
        .execute(&mut *connection)
        .await?;
    emptied
}

impl SqliteMessageStore {
    /// Opens (creating if needed) the store in the file at `path` and applies its migrations.
    pub async fn open(path: &Path, poll_interval: Duration) -> Result<Self, StoreError> {
        let options = connect_options(path);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        Self::migrate(&writer).await?;
        let readers = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(true))
            .await?;
        Ok(Self {
            inner: Arc::new(Inner {
                writer,
                readers,
                poll_interval,
                subscribers: Mutex::new(Vec::new()),
            }),
        })
    }

    /// Opens the store at a `sqlite://path` URL.
    pub async fn open_url(url: &str, poll_interval: Duration) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?;
        Self::open(options.get_filename(), poll_interval).await
    }

    /// Creates or updates the store's tables. Applying them again changes nothing.
    pub async fn migrate(pool: &SqlitePool) -> Result<(), StoreError> {
        let mut migrator = sqlx::migrate!("../../migrations/message_store/sqlite");
        migrator.set_ignore_missing(true);
        migrator.run(pool).await?;
        Ok(())
    }

    fn wake_subscribers(&self) {
        let Ok(mut subscribers) = self.inner.subscribers.lock() else {
            return;
        };
        subscribers.retain(|subscriber| match subscriber.upgrade() {
            Some(signal) => {
                signal.notify_one();
                true
            }
            None => false,
        });
    }

    /// One append in one IMMEDIATE transaction: an identical earlier append is answered with
    /// its stored positions, a reused id or a wrong version is refused, otherwise it writes.
    async fn append_in_transaction(
        &self,
        appends: &[StreamAppend],
    ) -> Result<Appended, AppendError> {
        let mut connection = self
            .inner
            .writer
            .acquire()
            .await
            .map_err(StoreError::from)?;
        // IMMEDIATE: take the write lock first, waiting for other writers to the same file (the
        // read model's projector) under the busy timeout. A deferred transaction that reads
        // first would fail at once with SQLITE_BUSY when it later tries to write.
        let mut tx = connection
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(StoreError::from)?;
        if let Some(answer) = answer_from_stored_ids(&mut tx, appends).await? {
            return answer;
        }
        let mut messages = Vec::new();
        for append in appends {
            let first = next_position(&mut tx, append).await?;
            messages.extend(insert(&mut tx, append, first).await?);
        }
        tx.commit().await.map_err(StoreError::from)?;
        Ok(Appended { messages })
    }

    async fn fetch(
        &self,
        sql: &str,
        binds: impl for<'a> FnOnce(
            sqlx::query::Query<'a, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'a>>,
        ) -> sqlx::query::Query<
            'a,
            sqlx::Sqlite,
            sqlx::sqlite::SqliteArguments<'a>,
        >,
    ) -> Result<Vec<RecordedMessage>, StoreError> {
        let rows = binds(sqlx::query(sql))
            .fetch_all(&self.inner.readers)
            .await?;
        rows.iter().map(recorded).collect()
    }

    /// Up to `max` messages of [`READ_STREAM`] or [`READ_CATEGORY`]: a query that takes a stream or
    /// category name, a position and the limit, in that order.
    async fn read_page(
        &self,
        sql: &'static str,
        name: &str,
        position: u64,
        max: usize,
    ) -> Result<Vec<RecordedMessage>, StoreError> {
        self.fetch(sql, |query| {
            query
                .bind(name.to_owned())
                .bind(to_i64(position))
                .bind(to_i64(max as u64))
        })
        .await
    }
}

/// What the messages already stored under the append's ids say: the positions of an identical
/// earlier append, or a reused id. `None` when no id is stored yet.
async fn answer_from_stored_ids(
    tx: &mut SqliteConnection,
    appends: &[StreamAppend],
) -> Result<Option<Result<Appended, AppendError>>, StoreError> {
    let mut stored = Vec::new();
    let mut count = 0;
    for append in appends {
        for message in &append.messages {
            count += 1;
            let row = sqlx::query(select_messages!("WHERE id = ?"))
                .bind(message.id.to_string())
                .fetch_optional(&mut *tx)
                .await?;
            if let Some(row) = row {
                let existing = recorded(&row)?;
                let same = existing.stream == append.stream
                    && existing.message_type == message.message_type
                    && existing.data == message.data;
                stored.push((existing, same, message.id));
            }
        }
    }
    if stored.is_empty() {
        return Ok(None);
    }
    if stored.len() == count && stored.iter().all(|(_, same, _)| *same) {
        let messages = stored
            .into_iter()
            .map(|(message, _, _)| AppendedMessage {
                id: message.id,
                stream: message.stream,
                position: message.position,
                global_position: message.global_position,
            })
            .collect();
        return Ok(Some(Ok(Appended { messages })));
    }
    let id = stored
        .iter()
        .find(|(_, same, _)| !same)
        .map_or(stored[0].2, |(message, _, _)| message.id);
    Ok(Some(Err(AppendError::DuplicateMessageId { id })))
}

/// The stream position the append's first message gets, once its expected version holds.
async fn next_position(
    tx: &mut SqliteConnection,
    append: &StreamAppend,
) -> Result<StreamPosition, AppendError> {
    let actual: Option<i64> =
        sqlx::query_scalar("SELECT max(position) FROM messages WHERE stream_name = ?")
            .bind(append.stream.as_str())
            .fetch_one(&mut *tx)
            .await
            .map_err(StoreError::from)?;
    let actual = actual.map(to_u64);
    if !append.expected.allows(actual) {
        return Err(AppendError::WrongExpectedVersion {
            stream: append.stream.clone(),
            expected: append.expected,
            actual,
        });
    }
    Ok(actual.map_or(0, |version| version + 1))
}

/// Writes one stream's messages from stream position `first` on.
async fn insert(
    tx: &mut SqliteConnection,
    append: &StreamAppend,
    first: StreamPosition,
) -> Result<Vec<AppendedMessage>, StoreError> {
    let mut messages = Vec::with_capacity(append.messages.len());
    for (position, message) in (first..).zip(&append.messages) {
        let global_position: i64 = sqlx::query_scalar(
            "INSERT INTO messages (id, stream_name, category, position, type, data, metadata) \
             VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING global_position",
        )
        .bind(message.id.to_string())
        .bind(append.stream.as_str())
        .bind(append.stream.category())
        .bind(to_i64(position))
        .bind(&message.message_type)
        .bind(message.data.to_string())
        .bind(message.metadata.to_string())
        .fetch_one(&mut *tx)
        .await?;
        messages.push(AppendedMessage {
            id: message.id,
            stream: append.stream.clone(),
            position,
            global_position: to_u64(global_position),
        });
    }
    Ok(messages)
}

#[async_trait]
impl MessageStore for SqliteMessageStore {
    async fn append(&self, appends: Vec<StreamAppend>) -> Result<Appended, AppendError> {
        crate::validate(&appends)?;
        let appended = self.append_in_transaction(&appends).await?;
        self.wake_subscribers();
        Ok(appended)
    }

    async fn read_stream(
        &self,
        stream: &StreamName,
        from: StreamPosition,
        max: usize,
    ) -> Result<Vec<RecordedMessage>, StoreError> {
        self.read_page(READ_STREAM, stream.as_str(), from, max)
            .await
    }

    async fn last_message(
        &self,
        stream: &StreamName,
    ) -> Result<Option<RecordedMessage>, StoreError> {
        let sql = select_messages!("WHERE stream_name = ? ORDER BY position DESC LIMIT 1");
        Ok(self
            .fetch(sql, |query| query.bind(stream.to_string()))
            .await?
            .pop())
    }

    async fn read_category(
        &self,
        category: &str,
        after: GlobalPosition,
        max: usize,
    ) -> Result<Vec<RecordedMessage>, StoreError> {
        self.read_page(READ_CATEGORY, category, after, max).await
    }

    async fn read_all(
        &self,
        after: GlobalPosition,
        max: usize,
    ) -> Result<Vec<RecordedMessage>, StoreError> {
        let sql = select_messages!("WHERE global_position > ? ORDER BY global_position LIMIT ?");
        self.fetch(sql, |query| {
            query.bind(to_i64(after)).bind(to_i64(max as u64))
        })
        .await
    }

    async fn head_position(&self) -> Result<GlobalPosition, StoreError> {
        let head: Option<i64> = sqlx::query_scalar("SELECT max(global_position) FROM messages")
            .fetch_one(&self.inner.readers)
            .await?;
        Ok(head.map_or(0, to_u64))
    }

    async fn last_position(&self) -> Result<GlobalPosition, StoreError> {
        // One writer at a time: what is committed is what readers see.
        self.head_position().await
    }

    async fn count_after(&self, after: GlobalPosition) -> Result<u64, StoreError> {
        let count: i64 =
            sqlx::query_scalar("SELECT count(*) FROM messages WHERE global_position > ?")
                .bind(to_i64(after))
                .fetch_one(&self.inner.readers)
                .await?;
        Ok(to_u64(count))
    }

    async fn prune_category(
        &self,
        category: &str,
        older_than: chrono::DateTime<chrono::Utc>,
    ) -> Result<u64, StoreError> {
        let deleted = sqlx::query(
            "DELETE FROM messages WHERE category = ? AND time < ? AND position > 0 \
               AND position < (SELECT max(last.position) FROM messages last \
                                WHERE last.stream_name = messages.stream_name \
                                  AND last.type = messages.type)",
        )
        .bind(category)
        .bind(older_than.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .execute(&self.inner.writer)
        .await?;
        Ok(deleted.rows_affected())
    }

    async fn rewrite_data(&self, id: Uuid, data: Value) -> Result<bool, StoreError> {
        let rewritten = sqlx::query("UPDATE messages SET data = ? WHERE id = ?")
            .bind(data.to_string())
            .bind(id.to_string())
            .execute(&self.inner.writer)
            .await?;
        Ok(rewritten.rows_affected() > 0)
    }

    async fn rename_stream(
        &self,
        from: &StreamName,
        to: &StreamName,
    ) -> Result<u64, RenameStreamError> {
        let mut connection = self
            .inner
            .writer
            .acquire()
            .await
            .map_err(StoreError::from)?;
        // IMMEDIATE, as an append: the check and the move happen under the file's one write
        // lock, so no append lands between them.
        let mut tx = connection
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(StoreError::from)?;
        let taken: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM messages WHERE stream_name = ?)")
                .bind(to.as_str())
                .fetch_one(&mut *tx)
                .await
                .map_err(StoreError::from)?;
        if taken {
            return Err(RenameStreamError::TargetNotEmpty { to: to.clone() });
        }
        let moved =
            sqlx::query("UPDATE messages SET stream_name = ?, category = ? WHERE stream_name = ?")
                .bind(to.as_str())
                .bind(to.category())
                .bind(from.as_str())
                .execute(&mut *tx)
                .await
                .map_err(StoreError::from)?;
        tx.commit().await.map_err(StoreError::from)?;
        Ok(moved.rows_affected())
    }

    fn subscribe(&self) -> Subscription {
        let signal = Arc::new(Notify::new());
        if let Ok(mut subscribers) = self.inner.subscribers.lock() {
            subscribers.push(Arc::downgrade(&signal));
        }
        Subscription::new(signal, self.inner.poll_interval, None)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.inner.readers).await?;
        Ok(())
    }
}

fn recorded(row: &SqliteRow) -> Result<RecordedMessage, StoreError> {
    let id_text: String = row.try_get("id")?;
    let id = Uuid::parse_str(&id_text).map_err(|error| StoreError::Corrupt {
        id: id_text.clone(),
        reason: error.to_string(),
    })?;
    let json = |column: &str| -> Result<Value, StoreError> {
        let text: String = row.try_get(column)?;
        serde_json::from_str(&text).map_err(|error| StoreError::Corrupt {
            id: id_text.clone(),
            reason: format!("{column}: {error}"),
        })
    };
    Ok(RecordedMessage {
        stream: parse_stored_stream(&id, row.try_get("stream_name")?)?,
        position: to_u64(row.try_get("position")?),
        global_position: to_u64(row.try_get("global_position")?),
        message_type: row.try_get("type")?,
        data: json("data")?,
        metadata: json("metadata")?,
        time: row.try_get("time")?,
        id,
    })
}
