//! The PostgreSQL adapter: the store for deployments.
//!
//! Appends are one call of the `append_messages` function (one round trip, one transaction).
//! Readers of the global order stop at the transaction horizon (docs/adr/0002). Wake-ups are
//! sent after commit by a background notifier, never inside the append transaction: a NOTIFY
//! takes a cluster-wide lock at commit and would serialise every writer (docs/adr/0003).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use sqlx::Row;
use sqlx::postgres::{PgListener, PgPool, PgRow};
use sqlx::types::Json;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::subscription::AbortOnDrop;
use crate::{
    AppendError, Appended, AppendedMessage, ExpectedVersion, GlobalPosition, MessageStore,
    RecordedMessage, StoreError, StreamAppend, StreamName, StreamPosition, Subscription,
};

/// The LISTEN/NOTIFY channel that carries wake-ups. NOTIFY is scoped to one database, so
/// stores in different databases of one server do not wake each other.
const CHANNEL: &str = "message_store";

/// How often an append that lost a race on a stream position or an id is tried again before
/// the conflict is reported.
const APPEND_ATTEMPTS: usize = 10;

/// The message store on PostgreSQL.
#[derive(Clone)]
pub struct PostgresMessageStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    poll_interval: Duration,
    /// Signalled after every committed append; the notifier turns it into one NOTIFY.
    committed: Arc<Notify>,
    _notifier: AbortOnDrop,
}

impl PostgresMessageStore {
    /// A store on `pool`. Consumers that miss a wake-up find new messages within
    /// `poll_interval`. Must be called inside a Tokio runtime: it starts the notifier.
    pub fn new(pool: PgPool, poll_interval: Duration) -> Self {
        let committed = Arc::new(Notify::new());
        let notifier = tokio::spawn(notify_after_commits(pool.clone(), committed.clone()));
        Self {
            inner: Arc::new(Inner {
                pool,
                poll_interval,
                committed,
                _notifier: AbortOnDrop(notifier),
            }),
        }
    }

    /// Creates or updates the message store's tables. Applying them again changes nothing.
    pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
        let mut migrator = sqlx::migrate!("../../migrations/message_store/postgres");
        // The read model may share this database and keep its own migrations in the same table.
        migrator.set_ignore_missing(true);
        migrator.run(pool).await?;
        Ok(())
    }

    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    async fn append_once(&self, call: &AppendCall) -> Result<Vec<PgRow>, sqlx::Error> {
        sqlx::query(
            "SELECT id, stream_name, position, global_position \
             FROM append_messages($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&call.streams)
        .bind(&call.expected)
        .bind(&call.stream_index)
        .bind(&call.ids)
        .bind(&call.types)
        .bind(&call.data)
        .bind(&call.metadata)
        .fetch_all(&self.inner.pool)
        .await
    }
}

/// The arguments of `append_messages`, as parallel arrays.
struct AppendCall {
    streams: Vec<String>,
    expected: Vec<i64>,
    stream_index: Vec<i32>,
    ids: Vec<Uuid>,
    types: Vec<String>,
    data: Vec<Json<Value>>,
    metadata: Vec<Json<Value>>,
    expectations: Vec<(StreamName, ExpectedVersion)>,
}

impl AppendCall {
    fn new(appends: Vec<StreamAppend>) -> Self {
        let mut call = Self {
            streams: Vec::new(),
            expected: Vec::new(),
            stream_index: Vec::new(),
            ids: Vec::new(),
            types: Vec::new(),
            data: Vec::new(),
            metadata: Vec::new(),
            expectations: Vec::new(),
        };
        for (index, append) in appends.into_iter().enumerate() {
            call.streams.push(append.stream.as_str().to_owned());
            call.expected.push(match append.expected {
                ExpectedVersion::Any => -2,
                ExpectedVersion::NoStream => -1,
                ExpectedVersion::Exact(position) => to_i64(position),
            });
            for message in append.messages {
                // PostgreSQL arrays are 1-based; the count is bounded by validate().
                call.stream_index
                    .push(i32::try_from(index + 1).unwrap_or(i32::MAX));
                call.ids.push(message.id);
                call.types.push(message.message_type);
                call.data.push(Json(message.data));
                call.metadata.push(Json(message.metadata));
            }
            call.expectations.push((append.stream, append.expected));
        }
        call
    }

    fn expectation(&self, stream: &str) -> Option<&(StreamName, ExpectedVersion)> {
        self.expectations
            .iter()
            .find(|(name, _)| name.as_str() == stream)
    }
}

#[async_trait]
impl MessageStore for PostgresMessageStore {
    async fn append(&self, appends: Vec<StreamAppend>) -> Result<Appended, AppendError> {
        crate::validate(&appends)?;
        let call = AppendCall::new(appends);
        let mut attempt = 0;
        let rows = loop {
            attempt += 1;
            match self.append_once(&call).await {
                Ok(rows) => break rows,
                // Another writer took the same stream position or id between our check and our
                // insert. The next attempt sees its commit and answers precisely: a version
                // conflict, an idempotent success, or (for ExpectedVersion::Any) a write.
                Err(error) if is_unique_violation(&error) && attempt < APPEND_ATTEMPTS => continue,
                Err(error) => return Err(refusal(&call, error)),
            }
        };
        self.inner.committed.notify_one();

        let mut by_id = HashMap::with_capacity(rows.len());
        for row in rows {
            let id: Uuid = row.try_get("id").map_err(StoreError::from)?;
            let stream: String = row.try_get("stream_name").map_err(StoreError::from)?;
            by_id.insert(
                id,
                AppendedMessage {
                    id,
                    stream: parse_stored_stream(&id, stream)?,
                    position: to_u64(row.try_get("position").map_err(StoreError::from)?),
                    global_position: to_u64(
                        row.try_get("global_position").map_err(StoreError::from)?,
                    ),
                },
            );
        }
        let messages = call
            .ids
            .iter()
            .map(|id| {
                by_id.remove(id).ok_or_else(|| StoreError::Corrupt {
                    id: id.to_string(),
                    reason: "the append did not return this message".into(),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Appended { messages })
    }

    async fn read_stream(
        &self,
        stream: &StreamName,
        from: StreamPosition,
        max: usize,
    ) -> Result<Vec<RecordedMessage>, StoreError> {
        let rows = sqlx::query(
            "SELECT global_position, id, stream_name, position, type, data, metadata, time \
             FROM messages WHERE stream_name = $1 AND position >= $2 \
             ORDER BY position LIMIT $3",
        )
        .bind(stream.as_str())
        .bind(to_i64(from))
        .bind(to_i64(max as u64))
        .fetch_all(&self.inner.pool)
        .await?;
        rows.iter().map(recorded).collect()
    }

    async fn last_message(
        &self,
        stream: &StreamName,
    ) -> Result<Option<RecordedMessage>, StoreError> {
        let row = sqlx::query(
            "SELECT global_position, id, stream_name, position, type, data, metadata, time \
             FROM messages WHERE stream_name = $1 ORDER BY position DESC LIMIT 1",
        )
        .bind(stream.as_str())
        .fetch_optional(&self.inner.pool)
        .await?;
        row.as_ref().map(recorded).transpose()
    }

    async fn read_category(
        &self,
        category: &str,
        after: GlobalPosition,
        max: usize,
    ) -> Result<Vec<RecordedMessage>, StoreError> {
        let rows = sqlx::query(
            "SELECT global_position, id, stream_name, position, type, data, metadata, time \
             FROM messages \
             WHERE category = $1 AND global_position > $2 \
               AND global_position < message_store_horizon() \
             ORDER BY global_position LIMIT $3",
        )
        .bind(category)
        .bind(to_i64(after))
        .bind(to_i64(max as u64))
        .fetch_all(&self.inner.pool)
        .await?;
        rows.iter().map(recorded).collect()
    }

    async fn read_all(
        &self,
        after: GlobalPosition,
        max: usize,
    ) -> Result<Vec<RecordedMessage>, StoreError> {
        let rows = sqlx::query(
            "SELECT global_position, id, stream_name, position, type, data, metadata, time \
             FROM messages \
             WHERE global_position > $1 AND global_position < message_store_horizon() \
             ORDER BY global_position LIMIT $2",
        )
        .bind(to_i64(after))
        .bind(to_i64(max as u64))
        .fetch_all(&self.inner.pool)
        .await?;
        rows.iter().map(recorded).collect()
    }

    async fn head_position(&self) -> Result<GlobalPosition, StoreError> {
        let head: Option<i64> = sqlx::query_scalar(
            "SELECT max(global_position) FROM messages \
             WHERE global_position < message_store_horizon()",
        )
        .fetch_one(&self.inner.pool)
        .await?;
        Ok(head.map_or(0, to_u64))
    }

    async fn count_after(&self, after: GlobalPosition) -> Result<u64, StoreError> {
        let count: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM messages \
             WHERE global_position > $1 AND global_position < message_store_horizon()",
        )
        .bind(to_i64(after))
        .fetch_one(&self.inner.pool)
        .await?;
        Ok(to_u64(count))
    }

    fn subscribe(&self) -> Subscription {
        let signal = Arc::new(Notify::new());
        let listener = tokio::spawn(listen(self.inner.pool.clone(), signal.clone()));
        Subscription::new(signal, self.inner.poll_interval, Some(listener))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.inner.pool).await?;
        Ok(())
    }
}

/// Sends one NOTIFY for any number of appends committed since the last one. While a NOTIFY is
/// on its way, further commits only leave a permit in `committed`, so a busy writer sends far
/// fewer notifications than it commits appends.
async fn notify_after_commits(pool: PgPool, committed: Arc<Notify>) {
    loop {
        committed.notified().await;
        if let Err(error) = sqlx::query("SELECT pg_notify($1, '')")
            .bind(CHANNEL)
            .execute(&pool)
            .await
        {
            // Consumers still poll; the next commit tries again.
            tracing::warn!(%error, "could not send the message store wake-up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Turns notifications on `CHANNEL` into wake-ups, reconnecting as needed. After a lost
/// connection it wakes the consumer once, since notifications may have been missed meanwhile.
async fn listen(pool: PgPool, signal: Arc<Notify>) {
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::warn!(%error, "could not connect the message store listener");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        if let Err(error) = listener.listen(CHANNEL).await {
            tracing::warn!(%error, "could not listen for message store wake-ups");
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        signal.notify_one();
        loop {
            match listener.try_recv().await {
                Ok(Some(_)) => signal.notify_one(),
                // The connection was lost; the next try_recv reconnects and listens again.
                Ok(None) => {
                    tracing::info!("message store listener reconnecting");
                    signal.notify_one();
                }
                Err(error) => {
                    tracing::warn!(%error, "message store listener failed; starting over");
                    signal.notify_one();
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    break;
                }
            }
        }
    }
}

fn is_unique_violation(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .is_some_and(|error| error.code().as_deref() == Some("23505"))
}

/// Maps the refusals raised by `append_messages` to typed errors.
fn refusal(call: &AppendCall, error: sqlx::Error) -> AppendError {
    let Some(database_error) = error.as_database_error() else {
        return AppendError::Store(error.into());
    };
    let detail = database_error
        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        .and_then(|error| error.detail())
        .unwrap_or_default()
        .to_owned();
    match database_error.code().as_deref() {
        Some("ES001") => {
            let (stream, actual) = detail.split_once('\n').unwrap_or((&detail, ""));
            match call.expectation(stream) {
                Some((stream, expected)) => AppendError::WrongExpectedVersion {
                    stream: stream.clone(),
                    expected: *expected,
                    actual: actual.parse().ok(),
                },
                None => AppendError::Store(error.into()),
            }
        }
        Some("ES002") => match detail.parse() {
            Ok(id) => AppendError::DuplicateMessageId { id },
            Err(_) => AppendError::Store(error.into()),
        },
        _ => AppendError::Store(error.into()),
    }
}

fn recorded(row: &PgRow) -> Result<RecordedMessage, StoreError> {
    let id: Uuid = row.try_get("id")?;
    let Json(data): Json<Value> = row.try_get("data")?;
    let Json(metadata): Json<Value> = row.try_get("metadata")?;
    Ok(RecordedMessage {
        stream: parse_stored_stream(&id, row.try_get("stream_name")?)?,
        position: to_u64(row.try_get("position")?),
        global_position: to_u64(row.try_get("global_position")?),
        message_type: row.try_get("type")?,
        data,
        metadata,
        time: row.try_get("time")?,
        id,
    })
}

pub(crate) fn parse_stored_stream(id: &Uuid, name: String) -> Result<StreamName, StoreError> {
    StreamName::parse(name).map_err(|error| StoreError::Corrupt {
        id: id.to_string(),
        reason: error.to_string(),
    })
}

/// Positions are stored as `bigint`; every one the store writes is non-negative.
pub(crate) fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

pub(crate) fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}
