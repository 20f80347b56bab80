//! The PostgreSQL adapter: the store for deployments.
//!
//! An append is first tried as one INSERT statement in its own transaction, with no lock: the
//! unique indexes on the message id and on (stream, position) catch every conflict. Only when
//! that fails does the adapter find out why, under a per-stream lock, and answer precisely (a
//! version conflict, a reused id, an idempotent retry) or write (docs/adr/0004). Readers of the
//! global order stop at the transaction horizon (docs/adr/0002). Wake-ups are sent after commit
//! by a background notifier, never inside the append transaction: a NOTIFY takes a
//! cluster-wide lock at commit and would serialise every writer (docs/adr/0003).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use sqlx::Row;
use sqlx::postgres::{PgConnection, PgListener, PgPool, PgRow};
use sqlx::types::Json;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::database::{LostConnection, retrying_lost_connections};
use crate::subscription::AbortOnDrop;
use crate::{
    AppendError, Appended, AppendedMessage, ExpectedVersion, GlobalPosition, MessageStore,
    RecordedMessage, RenameStreamError, StoreError, StreamAppend, StreamName, StreamPosition,
    Subscription,
};

/// The LISTEN/NOTIFY channel that carries wake-ups. NOTIFY is scoped to one database, so
/// stores in different databases of one server do not wake each other.
const CHANNEL: &str = "message_store";

/// The least time between two wake-ups sent by one writer process. Under load, commits that
/// arrive meanwhile share the next NOTIFY, so writers pay for at most one NOTIFY transaction per
/// spacing (100 a second, against thousands of appends); a consumer learns of a commit at most
/// this much later, well inside the 50 ms the projection lag may take.
const NOTIFY_SPACING: Duration = Duration::from_millis(10);

/// Up to `$3` messages of category `$1` written before `$2` that are neither the first of their
/// stream (which keeps "no stream" exact: ADR 4 finds an existing stream by its position 0) nor
/// the last of their type in it (so the last message of each kind, a success and a failure say,
/// still says what the stream's history ended with).
const PRUNE_CHUNK: &str = "
DELETE FROM messages
 WHERE global_position IN (
    SELECT m.global_position FROM messages m
     WHERE m.category = $1 AND m.time < $2 AND m.position > 0
       AND m.position < (SELECT max(last.position) FROM messages last
                          WHERE last.stream_name = m.stream_name AND last.type = m.type)
     LIMIT $3)";

const PRUNE_CHUNK_ROWS: i64 = 5_000;

/// A stream's messages from position `$2` on, at most `$3`
/// (see [`PostgresMessageStore::read_page`]).
const READ_STREAM: &str =
    select_messages!("WHERE stream_name = $1 AND position >= $2 ORDER BY position LIMIT $3");

/// A category's messages after global position `$2`, at most `$3`, stopping at the transaction
/// horizon (docs/adr/0002).
const READ_CATEGORY: &str = select_messages!(
    "WHERE category = $1 AND global_position > $2 \
       AND global_position < message_store_horizon() \
     ORDER BY global_position LIMIT $3"
);

/// How often an append that keeps losing races on a stream position is tried again under the
/// stream lock before the store gives up. Writers that do not take the lock (the first,
/// lock-free attempt of other appends) are the only ones that can still win such a race.
const APPEND_ATTEMPTS: usize = 10;

/// Writes an append in one statement, or nothing when an expected version does not hold.
///
/// Stream bases: `Any` continues after the stream's last position; `NoStream` starts at 0 and
/// `Exact(n)` at n + 1, where the unique (stream, position) index refuses the write if the
/// stream already has a message there. `Exact(n)` also needs n to be the stream's last
/// position: finding message n is not enough once retention has pruned the messages after it.
/// Positions encode the transaction id plus the store's offset (docs/adr/0002, 0007); the
/// statement writes nothing while a stored position lies at or above the lowest one a
/// transaction starting now could draw (the counter is behind the store: the slow path says so).
const APPEND: &str = "
WITH streams AS (
    SELECT s.i, s.name,
           CASE
               WHEN s.expected = -2 THEN coalesce(
                   (SELECT max(m.position) FROM messages m WHERE m.stream_name = s.name), -1) + 1
               WHEN s.expected = -1 THEN 0
               ELSE s.expected + 1
           END AS base,
           s.expected < 0 OR (
               SELECT max(m.position) FROM messages m WHERE m.stream_name = s.name
           ) = s.expected AS expected_holds
      FROM unnest($1::text[], $2::bigint[]) WITH ORDINALITY AS s(name, expected, i)
), position_offset AS (
    SELECT transactions FROM message_store_position_offset
)
INSERT INTO messages (global_position, id, stream_name, category, position, type, data, metadata)
SELECT ((pg_current_xact_id()::text::bigint + o.transactions) << 16) + r.ordinal - 1,
       r.id,
       s.name,
       split_part(s.name, '-', 1),
       s.base + row_number() OVER (PARTITION BY r.stream_index ORDER BY r.ordinal) - 1,
       r.type,
       r.data,
       r.metadata
  FROM unnest($3::int[], $4::uuid[], $5::text[], $6::jsonb[], $7::jsonb[])
       WITH ORDINALITY AS r(stream_index, id, type, data, metadata, ordinal)
  JOIN streams s ON s.i = r.stream_index
 CROSS JOIN position_offset o
 WHERE (SELECT bool_and(expected_holds) FROM streams)
   AND coalesce((SELECT max(m.global_position) FROM messages m), -1)
       < (pg_snapshot_xmax(pg_current_snapshot())::text::bigint
          + (SELECT transactions FROM position_offset)) << 16
RETURNING id, stream_name, position, global_position";

/// [`APPEND`] for the common case of one stream: the same rules, without matching messages to
/// streams (no join, no window, no aggregate over the streams). Logins and most commands append
/// to one stream.
const APPEND_ONE_STREAM: &str = "
WITH position_offset AS (
    SELECT transactions FROM message_store_position_offset
)
INSERT INTO messages (global_position, id, stream_name, category, position, type, data, metadata)
SELECT ((pg_current_xact_id()::text::bigint + o.transactions) << 16) + r.ordinal - 1,
       r.id,
       $1,
       split_part($1, '-', 1),
       CASE
           WHEN $2 = -2 THEN coalesce(
               (SELECT max(m.position) FROM messages m WHERE m.stream_name = $1), -1) + 1
           WHEN $2 = -1 THEN 0
           ELSE $2 + 1
       END + r.ordinal - 1,
       r.type,
       r.data,
       r.metadata
  FROM unnest($3::uuid[], $4::text[], $5::jsonb[], $6::jsonb[])
       WITH ORDINALITY AS r(id, type, data, metadata, ordinal)
 CROSS JOIN position_offset o
 WHERE ($2 < 0 OR (SELECT max(m.position) FROM messages m WHERE m.stream_name = $1) = $2)
   AND coalesce((SELECT max(m.global_position) FROM messages m), -1)
       < (pg_snapshot_xmax(pg_current_snapshot())::text::bigint
          + (SELECT transactions FROM position_offset)) << 16
RETURNING id, stream_name, position, global_position";

/// How the store's connections are set up: from `url`, with generic plans for prepared
/// statements. PostgreSQL otherwise plans the append statement anew for every call (it
/// estimates an array parameter at 100 elements, so the generic plan never looks as cheap as a
/// custom one), and that planning cost more than running it: 0.17 ms against 0.07 ms.
pub fn connect_options(url: &str) -> Result<sqlx::postgres::PgConnectOptions, sqlx::Error> {
    use std::str::FromStr;
    Ok(sqlx::postgres::PgConnectOptions::from_str(url)?
        .options([("plan_cache_mode", "force_generic_plan")]))
}

/// The message store on PostgreSQL.
#[derive(Clone)]
pub struct PostgresMessageStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    reconnect: Arc<Reconnect>,
    poll_interval: Duration,
    /// Signalled after every committed append; the notifier turns it into one NOTIFY.
    committed: Arc<Notify>,
    _notifier: AbortOnDrop,
}

impl PostgresMessageStore {
    /// A store on `pool`. Consumers that miss a wake-up find new messages within
    /// `poll_interval`. Must be called inside a Tokio runtime: it starts the notifier. The
    /// pool's connections should come from [`connect_options`]; others work, more slowly.
    pub fn new(pool: PgPool, poll_interval: Duration) -> Self {
        Self::start(pool, poll_interval, Arc::default())
    }

    fn start(pool: PgPool, poll_interval: Duration, reconnect: Arc<Reconnect>) -> Self {
        let committed = Arc::new(Notify::new());
        let notifier = tokio::spawn(notify_after_commits(pool.clone(), committed.clone()));
        Self {
            inner: Arc::new(Inner {
                pool,
                reconnect,
                poll_interval,
                committed,
                _notifier: AbortOnDrop(notifier),
            }),
        }
    }

    /// Connects a pool of `options.max_connections` to `url` with [`connect_options`], applies
    /// the migrations and starts the store.
    pub async fn connect(url: &str, options: &crate::ConnectOptions) -> Result<Self, StoreError> {
        let reconnect = Arc::new(Reconnect::default());
        let pool = reconnect
            .pool_options(options.max_connections)
            .connect_with(connect_options(url)?)
            .await?;
        Self::migrate(&pool).await?;
        Ok(Self::start(pool, options.poll_interval, reconnect))
    }

    /// Creates or updates the message store's tables. Applying them again changes nothing.
    pub async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
        let mut migrator = sqlx::migrate!("../../migrations/message_store/postgres");
        // The read model may share this database and keep its own migrations in the same table.
        migrator.set_ignore_missing(true);
        migrator.run(pool).await?;
        advance_position_offset(pool).await?;
        Ok(())
    }

    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// Appends inside the caller's transaction, holding the streams' locks until it ends.
    /// The caller commits (or rolls back) and then calls [`Self::notify_committed`]. For writes
    /// that must commit together with other tables, and for tests that hold transactions open.
    pub async fn append_within(
        &self,
        transaction: &mut PgConnection,
        appends: Vec<StreamAppend>,
    ) -> Result<Appended, AppendError> {
        crate::validate(&appends)?;
        let call = AppendCall::new(appends);
        append_locked(transaction, &call).await
    }

    /// Wakes the store's subscribers after a commit that [`Self::append_within`] was part of.
    pub fn notify_committed(&self) {
        self.inner.committed.notify_one();
    }

    /// One append: the lock-free attempt, then the locked path when it wrote nothing.
    async fn append_call(&self, call: &AppendCall) -> Result<Appended, AppendError> {
        if let Some(appended) = self.try_append(call).await? {
            self.inner.committed.notify_one();
            return Ok(appended);
        }
        let mut attempt = 0;
        let mut offset_advanced = false;
        loop {
            attempt += 1;
            let mut transaction = self.inner.pool.begin().await.map_err(StoreError::from)?;
            match append_locked(&mut transaction, call).await {
                Ok(appended) => {
                    transaction.commit().await.map_err(StoreError::from)?;
                    self.inner.committed.notify_one();
                    return Ok(appended);
                }
                // A lock-free writer took the position between our check and our insert.
                Err(AppendError::Store(StoreError::Database(error)))
                    if is_unique_violation(&error) && attempt < APPEND_ATTEMPTS =>
                {
                    continue;
                }
                // The database changed under a running process (a switchover to a restored or
                // logically replicated copy): advance as a start would, then write above.
                Err(AppendError::Store(StoreError::PositionsBehind { .. })) if !offset_advanced => {
                    drop(transaction);
                    advance_position_offset(&self.inner.pool).await?;
                    offset_advanced = true;
                }
                Err(refusal) => return Err(refusal),
            }
        }
    }

    /// Runs `call` again on another connection when its own was of no more use: it had died
    /// in the pool ([`crate::database::retrying_lost_connections`]), or it reaches a server a
    /// failover made read-only, in which case every connection opened before is replaced and
    /// the call runs once more.
    async fn retrying<T, E, Call, Fut>(&self, call: Call) -> Result<T, E>
    where
        E: LostConnection,
        Call: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.inner
            .reconnect
            .retrying(&self.inner.pool, "the message store", call)
            .await
    }

    /// The messages the query `build` makes returns, built anew for each try (see
    /// [`Self::retrying`]).
    async fn fetch<'q, Build>(&self, build: Build) -> Result<Vec<RecordedMessage>, StoreError>
    where
        Build: Fn() -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    {
        self.retrying(|| async {
            let rows = build().fetch_all(&self.inner.pool).await?;
            rows.iter().map(recorded).collect()
        })
        .await
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
        self.fetch(|| {
            sqlx::query(sql)
                .bind(name)
                .bind(to_i64(position))
                .bind(to_i64(max as u64))
        })
        .await
    }

    /// The lock-free attempt: `None` when it did not write and the slow path must find out why.
    async fn try_append(&self, call: &AppendCall) -> Result<Option<Appended>, AppendError> {
        match call.query().fetch_all(&self.inner.pool).await {
            Ok(rows) if rows.len() == call.ids.len() => Ok(Some(call.appended(rows)?)),
            Ok(_) => Ok(None),
            Err(error) if is_unique_violation(&error) => Ok(None),
            Err(error) => Err(StoreError::from(error).into()),
        }
    }
}

/// Raises the position offset when the cluster's transaction counter is behind the stored
/// positions (docs/adr/0007), and says so: that happens once after a restore or a
/// logical-replication switchover, never in a cluster the store has always lived in.
async fn advance_position_offset(pool: &PgPool) -> Result<(), StoreError> {
    let before: i64 = sqlx::query_scalar("SELECT transactions FROM message_store_position_offset")
        .fetch_one(pool)
        .await?;
    let after: i64 = sqlx::query_scalar("SELECT message_store_advance_offset()")
        .fetch_one(pool)
        .await?;
    if after != before {
        tracing::warn!(
            from = before,
            to = after,
            "the database's transaction counter is behind the stored positions (a restore or a \
             logical-replication copy); raised the position offset so new messages follow them"
        );
    }
    Ok(())
}

/// The refusal when a stored position lies at or above the lowest one a transaction starting
/// now could write, `None` while the store's positions are ahead of everything stored.
async fn positions_behind(connection: &mut PgConnection) -> Result<Option<StoreError>, StoreError> {
    let (stored, floor): (Option<i64>, i64) = sqlx::query_as(
        "SELECT (SELECT max(global_position) FROM messages), message_store_position_floor()",
    )
    .fetch_one(&mut *connection)
    .await?;
    Ok(stored
        .filter(|stored| *stored >= floor)
        .map(|stored| StoreError::PositionsBehind {
            stored: to_u64(stored),
            floor: to_u64(floor),
        }))
}

/// Connections opened before the mark are closed rather than used. The mark is set when the
/// server answers as a read-only standby (a failover demoted it while the pool's connections
/// stayed open to it, as a managed service's writer endpoint moving to another instance leaves
/// them): reconnecting reaches whatever the address names now, the new primary. Checked from
/// the connection's age as the pool hands it out, without a round trip. Every writer with a
/// pool of its own on the store's database (the key vault) holds one.
#[derive(Default)]
pub struct Reconnect {
    mark: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Reconnect {
    /// Pool settings for `max_connections` connections that replace, as they are handed out,
    /// those opened before the mark. No ping before each use: that is a round trip per call; a
    /// call that meets a connection that died in the pool runs again on another
    /// ([`Self::retrying`]).
    pub fn pool_options(self: &Arc<Self>, max_connections: u32) -> sqlx::postgres::PgPoolOptions {
        let before_acquire = self.clone();
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .test_before_acquire(false)
            .before_acquire(move |_, connection| {
                let keep = !before_acquire.opened_before_the_mark(connection.age);
                Box::pin(async move { Ok(keep) })
            })
    }

    /// Runs `call` again on another connection of `pool` when its own was of no more use: it
    /// had died in the pool ([`crate::database::retrying_lost_connections`]), or it reaches a
    /// server a failover made read-only, in which case every connection opened before is
    /// replaced and the call runs once more. `what` names the pool's owner in the warning.
    pub async fn retrying<T, E, Call, Fut>(
        &self,
        pool: &PgPool,
        what: &str,
        mut call: Call,
    ) -> Result<T, E>
    where
        E: LostConnection,
        Call: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let pool_size = pool.options().get_max_connections();
        match retrying_lost_connections(pool_size, &mut call).await {
            Err(error) if error.met_a_read_only_server() => {
                self.set_mark();
                tracing::warn!("the server of {what} is read-only (a failover?); reconnecting");
                retrying_lost_connections(pool_size, &mut call).await
            }
            outcome => outcome,
        }
    }

    fn set_mark(&self) {
        *self
            .mark
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(std::time::Instant::now());
    }

    fn opened_before_the_mark(&self, age: Duration) -> bool {
        let mark = *self
            .mark
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        mark.is_some_and(|mark| {
            std::time::Instant::now()
                .checked_sub(age)
                .is_some_and(|opened| opened < mark)
        })
    }
}

/// Takes the streams' locks, then answers from what is stored (an idempotent retry or a
/// refusal) or writes.
async fn append_locked(
    connection: &mut PgConnection,
    call: &AppendCall,
) -> Result<Appended, AppendError> {
    // In name order, so that two appends to the same streams cannot deadlock.
    let mut names: Vec<&str> = call.streams.iter().map(String::as_str).collect();
    names.sort_unstable();
    sqlx::query(
        "SELECT pg_advisory_xact_lock(hashtextextended(name, 0)) FROM unnest($1::text[]) AS name",
    )
    .bind(&names)
    .execute(&mut *connection)
    .await
    .map_err(StoreError::from)?;
    if let Some(refusal) = positions_behind(connection).await? {
        return Err(refusal.into());
    }
    if let Some(answer) = answer_from_stored(connection, call).await? {
        return answer;
    }
    let rows = call
        .query()
        .fetch_all(&mut *connection)
        .await
        .map_err(StoreError::from)?;
    if rows.len() != call.ids.len() {
        return Err(StoreError::Corrupt {
            id: call.ids.first().map(Uuid::to_string).unwrap_or_default(),
            reason: "an append that passed every check under its stream locks wrote nothing".into(),
        }
        .into());
    }
    call.appended(rows)
}

/// Renames stream `from` to `to` inside the caller's transaction (see
/// [`MessageStore::rename_stream`]).
///
/// The streams' advisory locks keep out appends on the locked path (ADR 4), taken first and in
/// name order as those appends take them, so neither waits for the other while holding what
/// the other needs. They do not keep out the lock-free first attempt of an append, which takes
/// no lock: one to `from` whose statement began before the rename's UPDATE and committed after
/// it would stay behind in `from`, at a position after messages that have moved away. So the
/// rename also locks the table against every writer (SHARE ROW EXCLUSIVE: readers go on):
/// appends already writing finish first and are moved, appends that come later wait, then see
/// the renamed streams (a statement takes its snapshot once it has its locks). Every append of
/// the store waits for the rename's one indexed UPDATE; it is an operator's one-time command.
async fn rename_locked(
    connection: &mut PgConnection,
    from: &StreamName,
    to: &StreamName,
) -> Result<u64, RenameStreamError> {
    let mut names = [from.as_str(), to.as_str()];
    names.sort_unstable();
    sqlx::query(
        "SELECT pg_advisory_xact_lock(hashtextextended(name, 0)) FROM unnest($1::text[]) AS name",
    )
    .bind(&names[..])
    .execute(&mut *connection)
    .await
    .map_err(StoreError::from)?;
    sqlx::query("LOCK TABLE messages IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *connection)
        .await
        .map_err(StoreError::from)?;
    let taken: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT FROM messages WHERE stream_name = $1)")
            .bind(to.as_str())
            .fetch_one(&mut *connection)
            .await
            .map_err(StoreError::from)?;
    if taken {
        return Err(RenameStreamError::TargetNotEmpty { to: to.clone() });
    }
    let moved =
        sqlx::query("UPDATE messages SET stream_name = $2, category = $3 WHERE stream_name = $1")
            .bind(from.as_str())
            .bind(to.as_str())
            .bind(to.category())
            .execute(&mut *connection)
            .await
            .map_err(StoreError::from)?;
    Ok(moved.rows_affected())
}

/// What the stored messages say about an append that could not be written as it is: the
/// positions of an identical earlier append, a reused id, or a version conflict. `None` when
/// nothing stands in its way (the race that stopped it is over).
async fn answer_from_stored(
    connection: &mut PgConnection,
    call: &AppendCall,
) -> Result<Option<Result<Appended, AppendError>>, StoreError> {
    let stored = sqlx::query(
        "SELECT id, stream_name, position, global_position, type, data FROM messages \
         WHERE id = ANY($1)",
    )
    .bind(&call.ids)
    .fetch_all(&mut *connection)
    .await?;
    if !stored.is_empty() {
        let mut same = stored.len() == call.ids.len();
        let mut reused = None;
        for row in &stored {
            let id: Uuid = row.try_get("id")?;
            let Json(data): Json<Value> = row.try_get("data")?;
            let matches = call.index_of(&id).is_some_and(|index| {
                row.try_get::<String, _>("stream_name").ok().as_deref()
                    == Some(call.stream_of(index))
                    && row.try_get::<String, _>("type").ok().as_deref()
                        == Some(call.types[index].as_str())
                    && data == call.data[index].0
            });
            if !matches {
                same = false;
                reused.get_or_insert(id);
            }
        }
        if same {
            return Ok(Some(call.appended(stored)));
        }
        let id = reused
            .or_else(|| call.ids.first().copied())
            .unwrap_or_default();
        return Ok(Some(Err(AppendError::DuplicateMessageId { id })));
    }

    let versions = sqlx::query(
        "SELECT stream_name, max(position) AS version FROM messages \
         WHERE stream_name = ANY($1) GROUP BY stream_name",
    )
    .bind(&call.streams)
    .fetch_all(&mut *connection)
    .await?;
    for (stream, expected) in &call.expectations {
        let actual = versions
            .iter()
            .find(|row| {
                row.try_get::<String, _>("stream_name").ok().as_deref() == Some(stream.as_str())
            })
            .map(|row| row.try_get::<i64, _>("version"))
            .transpose()?
            .map(to_u64);
        if !expected.allows(actual) {
            return Ok(Some(Err(AppendError::WrongExpectedVersion {
                stream: stream.clone(),
                expected: *expected,
                actual,
            })));
        }
    }
    Ok(None)
}

/// The arguments of the append statement, as parallel arrays.
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

    fn query(&self) -> sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments> {
        if let ([stream], [expected]) = (self.streams.as_slice(), self.expected.as_slice()) {
            return sqlx::query(APPEND_ONE_STREAM)
                .bind(stream)
                .bind(expected)
                .bind(&self.ids)
                .bind(&self.types)
                .bind(&self.data)
                .bind(&self.metadata);
        }
        sqlx::query(APPEND)
            .bind(&self.streams)
            .bind(&self.expected)
            .bind(&self.stream_index)
            .bind(&self.ids)
            .bind(&self.types)
            .bind(&self.data)
            .bind(&self.metadata)
    }

    fn index_of(&self, id: &Uuid) -> Option<usize> {
        self.ids.iter().position(|candidate| candidate == id)
    }

    fn stream_of(&self, message_index: usize) -> &str {
        let stream_index = usize::try_from(self.stream_index[message_index] - 1).unwrap_or(0);
        &self.streams[stream_index]
    }

    /// The written (or found) rows, in the order the messages were given.
    fn appended(&self, rows: Vec<PgRow>) -> Result<Appended, AppendError> {
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
        let messages = self
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
}

#[async_trait]
impl MessageStore for PostgresMessageStore {
    async fn append(&self, appends: Vec<StreamAppend>) -> Result<Appended, AppendError> {
        crate::validate(&appends)?;
        let call = AppendCall::new(appends);
        // Trying again is safe: an append that did commit is found by its ids and answered
        // with its stored positions.
        self.retrying(|| self.append_call(&call)).await
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
        self.retrying(|| async {
            let row = sqlx::query(select_messages!(
                "WHERE stream_name = $1 ORDER BY position DESC LIMIT 1"
            ))
            .bind(stream.as_str())
            .fetch_optional(&self.inner.pool)
            .await?;
            row.as_ref().map(recorded).transpose()
        })
        .await
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
        self.fetch(|| {
            sqlx::query(select_messages!(
                "WHERE global_position > $1 AND global_position < message_store_horizon() \
                 ORDER BY global_position LIMIT $2"
            ))
            .bind(to_i64(after))
            .bind(to_i64(max as u64))
        })
        .await
    }

    async fn head_position(&self) -> Result<GlobalPosition, StoreError> {
        self.retrying(|| async {
            let head: Option<i64> = sqlx::query_scalar(
                "SELECT max(global_position) FROM messages \
                 WHERE global_position < message_store_horizon()",
            )
            .fetch_one(&self.inner.pool)
            .await?;
            Ok(head.map_or(0, to_u64))
        })
        .await
    }

    async fn last_position(&self) -> Result<GlobalPosition, StoreError> {
        self.retrying(|| async {
            // Not bounded by the horizon: a committed message counts even while an older
            // transaction keeps it from the readers.
            let last: Option<i64> = sqlx::query_scalar("SELECT max(global_position) FROM messages")
                .fetch_one(&self.inner.pool)
                .await?;
            Ok(last.map_or(0, to_u64))
        })
        .await
    }

    async fn count_after(&self, after: GlobalPosition) -> Result<u64, StoreError> {
        self.retrying(|| async {
            let count: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM messages \
                 WHERE global_position > $1 AND global_position < message_store_horizon()",
            )
            .bind(to_i64(after))
            .fetch_one(&self.inner.pool)
            .await?;
            Ok(to_u64(count))
        })
        .await
    }

    async fn prune_category(
        &self,
        category: &str,
        older_than: chrono::DateTime<chrono::Utc>,
    ) -> Result<u64, StoreError> {
        // In chunks, each its own short transaction: a delete holds a transaction id, and a
        // long one would hold back the horizon of every reader on the server (ADR 2).
        let mut deleted = 0;
        loop {
            let chunk = self
                .retrying(|| async {
                    let deleted = sqlx::query(PRUNE_CHUNK)
                        .bind(category)
                        .bind(older_than)
                        .bind(PRUNE_CHUNK_ROWS)
                        .execute(&self.inner.pool)
                        .await?;
                    Ok::<_, StoreError>(deleted.rows_affected())
                })
                .await?;
            deleted += chunk;
            if chunk < PRUNE_CHUNK_ROWS as u64 {
                return Ok(deleted);
            }
        }
    }

    async fn rewrite_data(&self, id: Uuid, data: Value) -> Result<bool, StoreError> {
        // Trying again is safe: writing the same data twice leaves what writing it once does.
        self.retrying(|| async {
            let rewritten = sqlx::query("UPDATE messages SET data = $2 WHERE id = $1")
                .bind(id)
                .bind(Json(&data))
                .execute(&self.inner.pool)
                .await?;
            Ok(rewritten.rows_affected() > 0)
        })
        .await
    }

    async fn rename_stream(
        &self,
        from: &StreamName,
        to: &StreamName,
    ) -> Result<u64, RenameStreamError> {
        self.retrying(|| async {
            let mut transaction = self.inner.pool.begin().await.map_err(StoreError::from)?;
            let moved = rename_locked(&mut transaction, from, to).await?;
            transaction.commit().await.map_err(StoreError::from)?;
            Ok(moved)
        })
        .await
    }

    fn subscribe(&self) -> Subscription {
        let signal = Arc::new(Notify::new());
        let listener = tokio::spawn(listen(self.inner.pool.clone(), signal.clone()));
        Subscription::new(signal, self.inner.poll_interval, Some(listener))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.retrying(|| async {
            sqlx::query("SELECT 1").execute(&self.inner.pool).await?;
            Ok(())
        })
        .await
    }
}

/// Sends one NOTIFY for any number of appends committed since the last one. While a NOTIFY is
/// on its way, further commits only leave a permit in `committed`, so a busy writer sends far
/// fewer notifications than it commits appends.
///
/// A NOTIFY needs a transaction id and a commit record of its own. It does not need to wait
/// for that record to reach disk (a wake-up lost in a crash is covered by polling), so it
/// commits asynchronously and does not queue behind the appends' WAL flushes. The two
/// statements are sent as one simple query, which PostgreSQL runs as one transaction.
async fn notify_after_commits(pool: PgPool, committed: Arc<Notify>) {
    let notify = format!("SET LOCAL synchronous_commit = off; NOTIFY {CHANNEL}");
    loop {
        committed.notified().await;
        if let Err(error) = sqlx::raw_sql(&notify).execute(&pool).await {
            // Consumers still poll; the next commit tries again.
            tracing::warn!(%error, "could not send the message store wake-up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(NOTIFY_SPACING).await;
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
