//! The read model's database: the users and sessions views and the projections' checkpoints,
//! on PostgreSQL (deployments) or SQLite (the standalone mode). One enum, [`ReadModelWriter`],
//! so the worker is written once.
//!
//! # Schema (migrations/read_model/)
//!
//! `users`: one row per account, what the query API serves.
//!
//! | column | PostgreSQL | SQLite | meaning |
//! |---|---|---|---|
//! | `id` | uuid, primary key | text | the user id |
//! | `email` | text null | text null | as registered, or as last changed (`EmailChanged`); null once erased |
//! | `email_normalized` | text null, indexed | text null, indexed | lookup key (not unique here: the command side decides uniqueness); null once erased |
//! | `email_verified` | boolean, default false | integer 0 or 1, default 0 | the owner proved the address: set by `EmailVerified` and `EmailChanged` (the view of an account folded before those events existed is right with the default) |
//! | `status` | text | text | `pending`, `active`, `deactivated`, `erased`; indexed with `id` for paging |
//! | `registered_at` | timestamptz | RFC 3339 text | |
//! | `activated_at` | timestamptz null | text null | last activation (the registration time when registered active) |
//! | `deactivated_at` | timestamptz null | text null | last deactivation |
//! | `last_login_at` | timestamptz null | text null | last successful login |
//! | `login_count` | bigint | integer | successful logins |
//! | `failed_logins` | integer | integer | failed logins since the last success |
//! | `locked_until` | timestamptz null | text null | set by the failure that locked the account |
//! | `roles` | text[] | JSON array text | `user`, `admin` |
//! | `session_epoch` | bigint, default 0 | integer, default 0 | the account's session epoch: moved by a deactivation, a password change or reset, `SessionsEnded` and `UserErased` |
//! | `erased_at` | timestamptz null | text null | when the account was erased (`UserErased`, ADR 13); null while it is not, or while only its data was found erased |
//! | `position` | bigint | integer | global position of the last event applied to the row |
//!
//! `sessions`: one row per session (ADR 11), kept by the same projection as `users`, in the same
//! transactions, under the same checkpoint. A session is live while `ended_at` is null, it is
//! before both limits, and its `session_epoch` is its account's: the query API joins the two.
//! An erased account has no rows here (they hold user agents): a commit that writes an erased
//! users row deletes its account's sessions in the same transaction.
//!
//! | column | PostgreSQL | SQLite | meaning |
//! |---|---|---|---|
//! | `id` | uuid, primary key | text | the session id |
//! | `user_id` | uuid, indexed with `started_at` | text | whose session |
//! | `session_epoch` | bigint | integer | the account's session epoch it started in |
//! | `started_at` | timestamptz | RFC 3339 text | |
//! | `last_refreshed_at` | timestamptz null | text null | the last rotation of its refresh token |
//! | `expires_at` | timestamptz | text | the absolute limit |
//! | `idle_expires_at` | timestamptz | text | the idle limit, moved by each refresh |
//! | `user_agent` | text null | text null | as the login sent it |
//! | `generation` | bigint | integer | the generation of its current refresh token |
//! | `ended_at` | timestamptz null | text null | its (first) end |
//! | `end_reason` | text null | text null | `logged_out`, `ended_by_owner`, `ended_by_administrator`, `refresh_token_reused`, ... |
//! | `position` | bigint | integer | global position of the last event applied to the row |
//!
//! `projection_checkpoints (projection pk, version, position, epoch, updated_at)`: per
//! projection, the global position up to which its rows include every event, the version of the
//! projection that folded them, and the takeover epoch, which each worker that takes the
//! projection's lock bumps (docs/adr/0008). Rows and checkpoint are written in one transaction,
//! and the checkpoint is moved by compare-and-set on all three (`... WHERE position = old AND
//! version = mine AND epoch = mine`): a worker that lost its lock, raced a `reset` or a
//! `rebuild`, or folds another version than the view's, writes nothing. Consumers that keep no
//! view (the mailer) keep their checkpoint in the same table, moved by the same compare-and-set.
//!
//! `mail_refusals (message_id, mail_index, account_id, kind, reply_code, refused_at)`: the mails
//! an SMTP server refused for good, one row each, kept by the mailer ([`MailRefusal`]).

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::sqlite::{Sqlite, SqlitePool, SqlitePoolOptions, SqliteRow};
use sqlx::{PgConnection, Row, SqliteConnection, Transaction, ValueRef};
use uuid::Uuid;

pub use read_model_schema::Checkpoint;
use read_model_schema::{
    StoredCheckpoint, USERS_PROJECTION, on_either_pool, postgres_migrations, signed,
    sqlite_migrations,
};

use crate::view::{Change, Changed, RowId, Rows, SessionRow, UserRow, apply_all};

/// Rows per upsert statement when a commit writes many.
const UPSERT_ROWS: usize = 10_000;

/// A row of one of the projection's views: its table and columns, and how each database's row
/// decodes into it. Lets a read of either view be written once.
trait ViewRow: Sized {
    /// The columns, primary key first, in the order the upserts bind them.
    const COLUMNS: &'static str;
    fn table(target: &Target) -> &'static str;
    /// The primary key.
    fn id(&self) -> Uuid;
    fn decode<R: StoredRow>(row: &R) -> Result<Self, sqlx::Error>;
}

impl ViewRow for UserRow {
    const COLUMNS: &'static str = "id, email, email_normalized, email_verified, status, \
         registered_at, activated_at, deactivated_at, last_login_at, login_count, failed_logins, \
         locked_until, roles, session_epoch, erased_at, position";

    fn table(target: &Target) -> &'static str {
        target.users
    }

    fn id(&self) -> Uuid {
        self.id
    }

    fn decode<R: StoredRow>(row: &R) -> Result<Self, sqlx::Error> {
        row.user_row()
    }
}

impl ViewRow for SessionRow {
    const COLUMNS: &'static str = "id, user_id, session_epoch, started_at, last_refreshed_at, \
         expires_at, idle_expires_at, user_agent, generation, ended_at, end_reason, position";

    fn table(target: &Target) -> &'static str {
        target.sessions
    }

    fn id(&self) -> Uuid {
        self.id
    }

    fn decode<R: StoredRow>(row: &R) -> Result<Self, sqlx::Error> {
        row.session_row()
    }
}

/// The columns of `T`, each qualified with `alias`.
fn prefixed_columns<T: ViewRow>(alias: &str) -> String {
    T::COLUMNS
        .split(", ")
        .map(|column| format!("{alias}.{column}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// How an upsert of `T`'s rows treats a row that exists: every column takes the new value.
fn replace_on_conflict<T: ViewRow>() -> String {
    let set: Vec<String> = T::COLUMNS
        .split(", ")
        .skip(1)
        .map(|column| format!("{column} = excluded.{column}"))
        .collect();
    format!("ON CONFLICT (id) DO UPDATE SET {}", set.join(", "))
}

/// `INSERT INTO <T's table> (<T's columns>) <rows> <replace on conflict>`.
fn upsert<T: ViewRow>(target: &Target, rows: &str) -> String {
    format!(
        "INSERT INTO {} ({}) {rows} {}",
        T::table(target),
        T::COLUMNS,
        replace_on_conflict::<T>()
    )
}

/// Where a projection writes: its checkpoint row and its tables. Table names are fixed here,
/// never taken from input, since they are formatted into SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub checkpoint: &'static str,
    /// The users view.
    pub users: &'static str,
    /// The sessions view, kept under the same checkpoint (ADR 11).
    pub sessions: &'static str,
}

impl Target {
    /// The live views.
    pub const USERS: Target = Target {
        checkpoint: USERS_PROJECTION,
        users: "users",
        sessions: "sessions",
    };
    /// The views being rebuilt beside the live ones.
    pub const USERS_REBUILD: Target = Target {
        checkpoint: "users:rebuild",
        users: "users_rebuild",
        sessions: "sessions_rebuild",
    };

    /// Both tables, users first.
    pub fn tables(&self) -> [&'static str; 2] {
        [self.users, self.sessions]
    }
}

/// A mail an SMTP server refused for good, as `mail_refusals` keeps it: which mail of which
/// event (its `Message-ID` is `<message_id.mail_index@domain>`), about which account, of which
/// kind, the server's reply code (`None`: the address could not be written into an envelope)
/// and when. No address: the event has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailRefusal {
    pub message_id: Uuid,
    pub mail_index: i16,
    pub account_id: Uuid,
    pub kind: String,
    pub reply_code: Option<i32>,
    pub refused_at: DateTime<Utc>,
}

/// What became of a batch commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Committed {
    /// Rows and checkpoint are written.
    Written { rows: usize },
    /// The checkpoint was no longer the one the batch started from: another worker, a reset or
    /// a rebuild moved it, a rebuild changed its version, or another worker took the
    /// projection over. Nothing was written.
    CheckpointMoved,
    /// The change at `index` cannot be applied. Nothing was written.
    Poison { index: usize, reason: String },
}

/// The aggregator's side of the read model's database: it keeps the schema, writes the views
/// and the projections' checkpoints, and reads back only what the worker and the operator's
/// commands need. The query API reads the same tables through its own `ReadModel`.
#[derive(Debug, Clone)]
pub enum ReadModelWriter {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// `$body`, written once, run in a transaction `$tx` that writes to whichever database
/// `$read_model` is: see [`begin_writing`] for how it begins on SQLite.
macro_rules! in_write_transaction {
    ($read_model:expr, $tx:ident => $body:expr) => {
        match $read_model {
            ReadModelWriter::Postgres(pool) => {
                let mut $tx = pool.begin().await?;
                $body
            }
            ReadModelWriter::Sqlite(pool) => {
                let mut $tx = begin_writing(pool).await?;
                $body
            }
        }
    };
}

impl ReadModelWriter {
    /// Connects to `postgres://...` or `sqlite://path` (created if missing). Does not migrate.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, sqlx::Error> {
        if url.starts_with("sqlite:") {
            let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)?;
            let options = message_store::sqlite::connect_options(options.get_filename());
            let pool = SqlitePoolOptions::new()
                .max_connections(max_connections.max(1))
                .connect_with(options)
                .await?;
            return Ok(Self::Sqlite(pool));
        }
        let options = PgConnectOptions::from_str(url)?.application_name("aggregator");
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(2))
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await?;
        Ok(Self::Postgres(pool))
    }

    /// On SQLite, empties the file's write-ahead log into the file, where `secure_delete` has
    /// zeroed what was overwritten: the log keeps the earlier versions of the pages written (an
    /// erased account's row with its address) until it is emptied (ADR 13). Nothing to do on
    /// PostgreSQL, whose dumps never hold an earlier version of a row.
    pub async fn empty_write_ahead_log(&self) -> Result<(), sqlx::Error> {
        if let Self::Sqlite(pool) = self
            && !message_store::sqlite::truncate_write_ahead_log(pool).await?
        {
            tracing::warn!(
                "the write-ahead log is still read: an erased account's earlier row stays in \
                 it until the next checkpoint"
            );
        }
        Ok(())
    }

    /// Creates or updates the read model's tables; applying them again changes nothing.
    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        let migrator = match self {
            Self::Postgres(_) => postgres_migrations(),
            Self::Sqlite(_) => sqlite_migrations(),
        };
        on_either_pool!(ReadModelWriter, self, |pool| migrator.run(pool).await)
    }

    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        on_either_pool!(ReadModelWriter, self, |pool| sqlx::query("SELECT 1")
            .execute(pool)
            .await
            .map(drop))
    }

    /// The projection's checkpoint, created at position 0 if it has none.
    pub async fn ensure_checkpoint(
        &self,
        projection: &str,
        version: i32,
    ) -> Result<Checkpoint, sqlx::Error> {
        let insert = "INSERT INTO projection_checkpoints (projection, version, position) \
                      VALUES ($1, $2, 0) ON CONFLICT (projection) DO NOTHING";
        on_either_pool!(ReadModelWriter, self, |pool| {
            sqlx::query(insert)
                .bind(projection)
                .bind(version)
                .execute(pool)
                .await
                .map(drop)
        })?;
        self.checkpoint(projection)
            .await?
            .ok_or(sqlx::Error::RowNotFound)
    }

    pub async fn checkpoint(&self, projection: &str) -> Result<Option<Checkpoint>, sqlx::Error> {
        let row: Option<StoredCheckpoint> = on_either_pool!(ReadModelWriter, self, |pool| {
            sqlx::query_as(Checkpoint::READ)
                .bind(projection)
                .fetch_optional(pool)
                .await?
        });
        Ok(row.map(Checkpoint::from_stored))
    }

    /// The stored rows among `ids`, as of the projection's checkpoint. `None` when the
    /// checkpoint is no longer `at` (position, version and epoch): another worker, a reset or a
    /// rebuild moved it.
    ///
    /// One statement per view that `ids` name (none when they name none), each reading the
    /// checkpoint together with its rows, so each view's rows are exactly those as of `at`.
    /// Rows are a function of the events up to the checkpoint, and every write of either view
    /// moves the checkpoint, so two statements that both find it at `at` read one state.
    ///
    /// Reads only: it takes no transaction id, so it never holds back the store's horizon.
    pub async fn load_rows(
        &self,
        target: &Target,
        at: &Checkpoint,
        ids: &[RowId],
    ) -> Result<Option<Rows>, sqlx::Error> {
        let (mut users, mut sessions) = (Vec::new(), Vec::new());
        for id in ids {
            match id {
                RowId::User(id) => users.push(*id),
                RowId::Session(id) => sessions.push(*id),
            }
        }
        let mut rows = Rows::default();
        if !users.is_empty() {
            let Some(loaded) = self.load::<UserRow>(target, at, &users).await? else {
                return Ok(None);
            };
            rows.users = loaded.into_iter().map(|row| (row.id, row)).collect();
        }
        if !sessions.is_empty() {
            let Some(loaded) = self.load::<SessionRow>(target, at, &sessions).await? else {
                return Ok(None);
            };
            rows.sessions = loaded.into_iter().map(|row| (row.id, row)).collect();
        }
        Ok(Some(rows))
    }

    /// The stored rows of `T`'s view among `ids`, read in one statement with the checkpoint;
    /// `None` when the checkpoint is no longer `at`.
    async fn load<T: ViewRow>(
        &self,
        target: &Target,
        at: &Checkpoint,
        ids: &[Uuid],
    ) -> Result<Option<Vec<T>>, sqlx::Error> {
        let select = |rows_of_ids: &str| {
            format!(
                "SELECT c.version AS checkpoint_version, c.position AS checkpoint, \
                 c.epoch AS checkpoint_epoch, {} FROM projection_checkpoints c \
                 LEFT JOIN {} r ON {rows_of_ids} WHERE c.projection = $1",
                prefixed_columns::<T>("r"),
                T::table(target)
            )
        };
        let (checkpoint, rows) = match self {
            Self::Postgres(pool) => {
                let loaded = sqlx::query(&select("r.id = ANY($2)"))
                    .bind(target.checkpoint)
                    .bind(ids)
                    .fetch_all(pool)
                    .await?;
                rows_beside_checkpoint(&loaded)?
            }
            Self::Sqlite(pool) => {
                let loaded = sqlx::query(&select("r.id IN (SELECT value FROM json_each($2))"))
                    .bind(target.checkpoint)
                    .bind(sqlite_ids(ids))
                    .fetch_all(pool)
                    .await?;
                rows_beside_checkpoint(&loaded)?
            }
        };
        Ok((checkpoint.as_ref() == Some(at)).then_some(rows))
    }

    /// Writes `rows` (folded in memory from the rows as of `from`) and moves the checkpoint from
    /// `from` to `to` by compare-and-set, in one transaction. Nothing is written when the
    /// checkpoint is no longer `from` (position, version and epoch).
    ///
    /// On PostgreSQL, once the transaction holds the checkpoint row, the server ends its
    /// session if it sits idle for `idle_limit`: a writer cut off mid-commit then blocks the
    /// next holder of the projection for no longer than that (docs/adr/0008).
    pub async fn write_rows(
        &self,
        target: &Target,
        from: &Checkpoint,
        to: u64,
        rows: &Changed<'_>,
        idle_limit: Option<Duration>,
    ) -> Result<Committed, sqlx::Error> {
        match self {
            Self::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                if !pg_move_checkpoint(&mut tx, target.checkpoint, from, to, idle_limit).await? {
                    return Ok(Committed::CheckpointMoved);
                }
                pg_upsert(&mut tx, target, rows).await?;
                tx.commit().await?;
            }
            Self::Sqlite(pool) => {
                let mut tx = begin_writing(pool).await?;
                if !sqlite_move_checkpoint(&mut tx, target.checkpoint, from, to).await? {
                    return Ok(Committed::CheckpointMoved);
                }
                sqlite_upsert_users(&mut tx, target, &rows.users).await?;
                sqlite_upsert_sessions(&mut tx, target, &rows.sessions).await?;
                sqlite_delete_sessions_of(&mut tx, target, &erased_accounts(rows)).await?;
                tx.commit().await?;
            }
        }
        Ok(Committed::Written { rows: rows.len() })
    }

    /// Every row of the users view, ordered by id: for comparisons and tests.
    pub async fn rows(&self, target: &Target) -> Result<Vec<UserRow>, sqlx::Error> {
        self.all_rows(target).await
    }

    /// Every row of the sessions view, ordered by id: for comparisons and tests.
    pub async fn sessions(&self, target: &Target) -> Result<Vec<SessionRow>, sqlx::Error> {
        self.all_rows(target).await
    }

    async fn all_rows<T: ViewRow>(&self, target: &Target) -> Result<Vec<T>, sqlx::Error> {
        let query = format!(
            "SELECT {} FROM {} ORDER BY id",
            T::COLUMNS,
            T::table(target)
        );
        on_either_pool!(ReadModelWriter, self, |pool| {
            let rows = sqlx::query(&query).fetch_all(pool).await?;
            rows.iter().map(T::decode).collect()
        })
    }

    /// Empties the views and sets their checkpoint to 0 at `version`, in one transaction: the
    /// worker replays. The epoch stays: the worker holding the projection carries on.
    pub async fn reset(&self, target: &Target, version: i32) -> Result<(), sqlx::Error> {
        // The checkpoint row is locked first, as every batch commit does, so a batch in flight
        // either commits before the reset or finds the checkpoint moved and writes nothing.
        let upsert = "INSERT INTO projection_checkpoints (projection, version, position) \
                      VALUES ($1, $2, 0) ON CONFLICT (projection) DO UPDATE \
                      SET version = excluded.version, position = 0";
        in_write_transaction!(self, tx => {
            sqlx::query(upsert)
                .bind(target.checkpoint)
                .bind(version)
                .execute(&mut *tx)
                .await?;
            for table in target.tables() {
                sqlx::query(&format!("DELETE FROM {table}"))
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await
        })
    }

    /// Moves the checkpoint of a consumer that keeps no view (the mailer) from `from` to `to`,
    /// by compare-and-set on its position, version and epoch, as a batch commit moves a
    /// projection's. Whether it moved: false when another worker, a reset or a takeover moved
    /// it first.
    pub async fn move_checkpoint(
        &self,
        consumer: &str,
        from: &Checkpoint,
        to: u64,
    ) -> Result<bool, sqlx::Error> {
        match self {
            Self::Postgres(pool) => {
                let mut connection = pool.acquire().await?;
                pg_move_checkpoint(&mut connection, consumer, from, to, None).await
            }
            Self::Sqlite(pool) => {
                let mut connection = pool.acquire().await?;
                sqlite_move_checkpoint(&mut connection, consumer, from, to).await
            }
        }
    }

    /// Sets the checkpoint of a consumer that keeps no view to 0 at `version` (creating it if
    /// there is none): its worker starts again from the first message. The epoch stays, as in
    /// [`Self::reset`].
    pub async fn reset_checkpoint(&self, consumer: &str, version: i32) -> Result<(), sqlx::Error> {
        let upsert = "INSERT INTO projection_checkpoints (projection, version, position) \
                      VALUES ($1, $2, 0) ON CONFLICT (projection) DO UPDATE \
                      SET version = excluded.version, position = 0";
        on_either_pool!(ReadModelWriter, self, |pool| sqlx::query(upsert)
            .bind(consumer)
            .bind(version)
            .execute(pool)
            .await
            .map(drop))
    }

    /// Records that an SMTP server refused a mail for good (the mailer); a refusal recorded
    /// again (a mail sent again after a `reset`) replaces the earlier one.
    pub async fn record_mail_refusal(&self, refusal: &MailRefusal) -> Result<(), sqlx::Error> {
        let upsert = "INSERT INTO mail_refusals \
                      (message_id, mail_index, account_id, kind, reply_code, refused_at) \
                      VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (message_id, mail_index) \
                      DO UPDATE SET reply_code = excluded.reply_code, \
                      refused_at = excluded.refused_at";
        match self {
            Self::Postgres(pool) => {
                sqlx::query(upsert)
                    .bind(refusal.message_id)
                    .bind(refusal.mail_index)
                    .bind(refusal.account_id)
                    .bind(&refusal.kind)
                    .bind(refusal.reply_code)
                    .bind(refusal.refused_at)
                    .execute(pool)
                    .await?;
            }
            Self::Sqlite(pool) => {
                sqlx::query(upsert)
                    .bind(refusal.message_id.hyphenated().to_string())
                    .bind(refusal.mail_index)
                    .bind(refusal.account_id.hyphenated().to_string())
                    .bind(&refusal.kind)
                    .bind(refusal.reply_code)
                    .bind(sqlite_time(refusal.refused_at))
                    .execute(pool)
                    .await?;
            }
        }
        Ok(())
    }

    /// Every recorded refusal, oldest first.
    pub async fn mail_refusals(&self) -> Result<Vec<MailRefusal>, sqlx::Error> {
        let select = "SELECT message_id, mail_index, account_id, kind, reply_code, refused_at \
                      FROM mail_refusals ORDER BY refused_at, message_id, mail_index";
        match self {
            Self::Postgres(pool) => {
                let rows = sqlx::query(select).fetch_all(pool).await?;
                rows.iter()
                    .map(|row| {
                        Ok(MailRefusal {
                            message_id: row.try_get("message_id")?,
                            mail_index: row.try_get("mail_index")?,
                            account_id: row.try_get("account_id")?,
                            kind: row.try_get("kind")?,
                            reply_code: row.try_get("reply_code")?,
                            refused_at: row.try_get("refused_at")?,
                        })
                    })
                    .collect()
            }
            Self::Sqlite(pool) => {
                let rows = sqlx::query(select).fetch_all(pool).await?;
                rows.iter()
                    .map(|row| {
                        Ok(MailRefusal {
                            message_id: parse_sqlite_id(row.try_get("message_id")?)?,
                            mail_index: row.try_get("mail_index")?,
                            account_id: parse_sqlite_id(row.try_get("account_id")?)?,
                            kind: row.try_get("kind")?,
                            reply_code: row.try_get("reply_code")?,
                            refused_at: parse_sqlite_time(row.try_get("refused_at")?)?,
                        })
                    })
                    .collect()
            }
        }
    }

    pub fn as_postgres(&self) -> Option<&PgPool> {
        match self {
            Self::Postgres(pool) => Some(pool),
            Self::Sqlite(_) => None,
        }
    }
}

/// A transaction that writes to SQLite. It begins IMMEDIATE: it takes the write lock now rather
/// than fail to upgrade a read to a write later.
async fn begin_writing(pool: &SqlitePool) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
    pool.begin_with("BEGIN IMMEDIATE").await
}

/// Ids as SQLite stores them, in a JSON array for `json_each`.
fn sqlite_ids(ids: &[Uuid]) -> String {
    let ids: Vec<String> = ids.iter().map(|id| id.hyphenated().to_string()).collect();
    serde_json::to_string(&ids).unwrap_or_else(|_| "[]".into())
}

/// Loads the rows `changes` touch, folds the changes into them and writes back what changed,
/// after moving the checkpoint by compare-and-set. Runs inside the caller's transaction.
pub(crate) async fn pg_apply(
    connection: &mut PgConnection,
    target: &Target,
    from: &Checkpoint,
    to: u64,
    changes: &[Change],
) -> Result<Committed, sqlx::Error> {
    // First, so that this transaction holds the checkpoint row before it touches the views:
    // reset and rebuild lock the same row first, and nothing waits in the other order.
    if !pg_move_checkpoint(connection, target.checkpoint, from, to, None).await? {
        return Ok(Committed::CheckpointMoved);
    }
    if changes.is_empty() {
        return Ok(Committed::Written { rows: 0 });
    }
    let (mut users, mut sessions) = (Vec::new(), Vec::new());
    for row in changes.iter().flat_map(Change::rows) {
        match row {
            RowId::User(id) => users.push(id),
            RowId::Session(id) => sessions.push(id),
        }
    }
    let mut rows = Rows {
        users: pg_load_in(connection, target, users).await?,
        sessions: pg_load_in(connection, target, sessions).await?,
    };
    let changed = match apply_all(&mut rows, changes) {
        Ok(changed) => changed,
        Err((index, reason)) => return Ok(Committed::Poison { index, reason }),
    };
    let changed = rows.select(&changed);
    pg_upsert(connection, target, &changed).await?;
    Ok(Committed::Written {
        rows: changed.len(),
    })
}

/// The stored rows of `T`'s view among `ids`, read on `connection` (in the caller's
/// transaction), by id.
async fn pg_load_in<T: ViewRow>(
    connection: &mut PgConnection,
    target: &Target,
    mut ids: Vec<Uuid>,
) -> Result<HashMap<Uuid, T>, sqlx::Error> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    ids.sort_unstable();
    ids.dedup();
    let loaded = sqlx::query(&format!(
        "SELECT {} FROM {} WHERE id = ANY($1)",
        T::COLUMNS,
        T::table(target)
    ))
    .bind(&ids)
    .fetch_all(&mut *connection)
    .await?;
    loaded
        .iter()
        .map(|row| T::decode(row).map(|row| (row.id(), row)))
        .collect()
}

/// Moves a projection's checkpoint to `to` if it is still `from` (position, version and
/// epoch), locking its row until the transaction ends. Whether it moved.
///
/// With `idle_limit`, the same statement sets `idle_in_transaction_session_timeout` for the
/// rest of the transaction, only once the row is ours and without a round trip of its own.
async fn pg_move_checkpoint(
    connection: &mut PgConnection,
    projection: &str,
    from: &Checkpoint,
    to: u64,
    idle_limit: Option<Duration>,
) -> Result<bool, sqlx::Error> {
    let moved = sqlx::query(
        "UPDATE projection_checkpoints SET position = $3, updated_at = now() \
         WHERE projection = $1 AND position = $2 AND version = $4 AND epoch = $5 \
         RETURNING CASE WHEN $6::bigint > 0 \
             THEN set_config('idle_in_transaction_session_timeout', $6::text, true) END",
    )
    .bind(projection)
    .bind(signed(from.position))
    .bind(signed(to))
    .bind(from.version)
    .bind(from.epoch)
    .bind(idle_limit.map_or(0, |limit| {
        i64::try_from(limit.as_millis().max(1)).unwrap_or(i64::MAX)
    }))
    .fetch_optional(&mut *connection)
    .await?;
    Ok(moved.is_some())
}

/// Takes the projection over for the worker that has just taken its lock on `connection`:
/// bumps the checkpoint's epoch (creating the checkpoint at `version`, position 0, if there is
/// none) and returns the checkpoint. Every commit of an earlier holder compares the old epoch
/// and now writes nothing. The update waits for a commit in flight on the row, so an earlier
/// holder's last commit lands before the takeover or not at all.
pub(crate) async fn pg_take_over(
    connection: &mut PgConnection,
    projection: &str,
    version: i32,
) -> Result<Checkpoint, sqlx::Error> {
    let taken: StoredCheckpoint = sqlx::query_as(
        "INSERT INTO projection_checkpoints (projection, version, position, epoch) \
         VALUES ($1, $2, 0, 1) ON CONFLICT (projection) DO UPDATE \
         SET epoch = projection_checkpoints.epoch + 1 \
         RETURNING version, position, epoch",
    )
    .bind(projection)
    .bind(version)
    .fetch_one(connection)
    .await?;
    Ok(Checkpoint::from_stored(taken))
}

/// What a [`ReadModelWriter::load_rows`] statement returned: the checkpoint, read on every
/// row, and the rows found beside it (none when its one row has null row columns).
fn rows_beside_checkpoint<'r, R: StoredRow, T: ViewRow>(
    loaded: &'r [R],
) -> Result<(Option<Checkpoint>, Vec<T>), sqlx::Error>
where
    i32: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    &'r str: sqlx::ColumnIndex<R>,
{
    let mut checkpoint = None;
    let mut rows = Vec::with_capacity(loaded.len());
    for row in loaded {
        checkpoint = Some(Checkpoint::from_stored((
            row.try_get("checkpoint_version")?,
            row.try_get("checkpoint")?,
            row.try_get("checkpoint_epoch")?,
        )));
        if !row.try_get_raw("id")?.is_null() {
            rows.push(T::decode(row)?);
        }
    }
    Ok((checkpoint, rows))
}

/// Both views' changed rows, in multi-row upserts of [`UPSERT_ROWS`] each.
async fn pg_upsert(
    connection: &mut PgConnection,
    target: &Target,
    rows: &Changed<'_>,
) -> Result<(), sqlx::Error> {
    for piece in rows.users.chunks(UPSERT_ROWS) {
        pg_upsert_users(connection, target, piece).await?;
    }
    for piece in rows.sessions.chunks(UPSERT_ROWS) {
        pg_upsert_sessions(connection, target, piece).await?;
    }
    let erased = erased_accounts(rows);
    if !erased.is_empty() {
        sqlx::query(&format!(
            "DELETE FROM {} WHERE user_id = ANY($1)",
            target.sessions
        ))
        .bind(&erased)
        .execute(&mut *connection)
        .await?;
    }
    Ok(())
}

/// The accounts among `rows` whose users row is erased: their sessions' rows are deleted in
/// the same transaction, after the sessions' upserts (a session started and its account erased
/// in one commit leaves no row).
fn erased_accounts(rows: &Changed<'_>) -> Vec<Uuid> {
    rows.users
        .iter()
        .filter(|row| row.is_erased())
        .map(|row| row.id)
        .collect()
}

/// One multi-row upsert from parallel arrays: one round trip however large the batch.
async fn pg_upsert_users(
    connection: &mut PgConnection,
    target: &Target,
    rows: &[&UserRow],
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let sql = upsert::<UserRow>(
        target,
        "SELECT r.id, r.email, r.email_normalized, r.email_verified, r.status, \
                r.registered_at, r.activated_at, r.deactivated_at, r.last_login_at, \
                r.login_count, r.failed_logins, r.locked_until, string_to_array(r.roles, ','), \
                r.session_epoch, r.erased_at, r.position \
         FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::boolean[], $5::text[], \
                     $6::timestamptz[], $7::timestamptz[], $8::timestamptz[], $9::timestamptz[], \
                     $10::bigint[], $11::int[], $12::timestamptz[], $13::text[], $14::bigint[], \
                     $15::timestamptz[], $16::bigint[]) \
              AS r(id, email, email_normalized, email_verified, status, registered_at, \
                   activated_at, deactivated_at, last_login_at, login_count, failed_logins, \
                   locked_until, roles, session_epoch, erased_at, position)",
    );
    sqlx::query(&sql)
        .bind(rows.iter().map(|r| r.id).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.email.as_deref()).collect::<Vec<_>>())
        .bind(
            rows.iter()
                .map(|r| r.email_normalized.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(rows.iter().map(|r| r.email_verified).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.status.as_str()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.registered_at).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.activated_at).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.deactivated_at).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.last_login_at).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.login_count).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.failed_logins).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.locked_until).collect::<Vec<_>>())
        // Role names are lower-case words, so a comma list is a safe flat encoding.
        .bind(rows.iter().map(|r| r.roles.join(",")).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.session_epoch).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.erased_at).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.position).collect::<Vec<_>>())
        .execute(connection)
        .await?;
    Ok(())
}

/// The sessions' upsert, as the users': one statement from parallel arrays. A refresh or an end
/// replaces its one row.
async fn pg_upsert_sessions(
    connection: &mut PgConnection,
    target: &Target,
    rows: &[&SessionRow],
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let sql = upsert::<SessionRow>(
        target,
        "SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::bigint[], $4::timestamptz[], \
                              $5::timestamptz[], $6::timestamptz[], $7::timestamptz[], \
                              $8::text[], $9::bigint[], $10::timestamptz[], $11::text[], \
                              $12::bigint[])",
    );
    sqlx::query(&sql)
        .bind(rows.iter().map(|r| r.id).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.user_id).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.session_epoch).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.started_at).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.last_refreshed_at).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.expires_at).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.idle_expires_at).collect::<Vec<_>>())
        .bind(
            rows.iter()
                .map(|r| r.user_agent.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(rows.iter().map(|r| r.generation).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.ended_at).collect::<Vec<_>>())
        .bind(
            rows.iter()
                .map(|r| r.end_reason.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(rows.iter().map(|r| r.position).collect::<Vec<_>>())
        .execute(connection)
        .await?;
    Ok(())
}

async fn sqlite_move_checkpoint(
    connection: &mut SqliteConnection,
    projection: &str,
    from: &Checkpoint,
    to: u64,
) -> Result<bool, sqlx::Error> {
    let moved = sqlx::query(
        "UPDATE projection_checkpoints \
         SET position = $3, updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') \
         WHERE projection = $1 AND position = $2 AND version = $4 AND epoch = $5",
    )
    .bind(projection)
    .bind(signed(from.position))
    .bind(signed(to))
    .bind(from.version)
    .bind(from.epoch)
    .execute(&mut *connection)
    .await?;
    Ok(moved.rows_affected() == 1)
}

async fn sqlite_upsert_users(
    connection: &mut SqliteConnection,
    target: &Target,
    rows: &[&UserRow],
) -> Result<(), sqlx::Error> {
    let upsert = upsert::<UserRow>(
        target,
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
    );
    for row in rows {
        sqlx::query(&upsert)
            .bind(row.id.hyphenated().to_string())
            .bind(&row.email)
            .bind(&row.email_normalized)
            .bind(row.email_verified)
            .bind(&row.status)
            .bind(sqlite_time(row.registered_at))
            .bind(row.activated_at.map(sqlite_time))
            .bind(row.deactivated_at.map(sqlite_time))
            .bind(row.last_login_at.map(sqlite_time))
            .bind(row.login_count)
            .bind(row.failed_logins)
            .bind(row.locked_until.map(sqlite_time))
            .bind(serde_json::to_string(&row.roles).unwrap_or_else(|_| "[]".into()))
            .bind(row.session_epoch)
            .bind(row.erased_at.map(sqlite_time))
            .bind(row.position)
            .execute(&mut *connection)
            .await?;
    }
    Ok(())
}

/// Deletes every session row of `accounts` (erased ones).
async fn sqlite_delete_sessions_of(
    connection: &mut SqliteConnection,
    target: &Target,
    accounts: &[Uuid],
) -> Result<(), sqlx::Error> {
    if accounts.is_empty() {
        return Ok(());
    }
    sqlx::query(&format!(
        "DELETE FROM {} WHERE user_id IN (SELECT value FROM json_each($1))",
        target.sessions
    ))
    .bind(sqlite_ids(accounts))
    .execute(connection)
    .await?;
    Ok(())
}

async fn sqlite_upsert_sessions(
    connection: &mut SqliteConnection,
    target: &Target,
    rows: &[&SessionRow],
) -> Result<(), sqlx::Error> {
    let upsert = upsert::<SessionRow>(
        target,
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    );
    for row in rows {
        sqlx::query(&upsert)
            .bind(row.id.hyphenated().to_string())
            .bind(row.user_id.hyphenated().to_string())
            .bind(row.session_epoch)
            .bind(sqlite_time(row.started_at))
            .bind(row.last_refreshed_at.map(sqlite_time))
            .bind(sqlite_time(row.expires_at))
            .bind(sqlite_time(row.idle_expires_at))
            .bind(&row.user_agent)
            .bind(row.generation)
            .bind(row.ended_at.map(sqlite_time))
            .bind(&row.end_reason)
            .bind(row.position)
            .execute(&mut *connection)
            .await?;
    }
    Ok(())
}

/// A row of either view as a database stores it, decoded into the view's values, so that a
/// read of the views is written once for both databases.
trait StoredRow: Row {
    fn user_row(&self) -> Result<UserRow, sqlx::Error>;
    fn session_row(&self) -> Result<SessionRow, sqlx::Error>;
}

impl StoredRow for PgRow {
    fn user_row(&self) -> Result<UserRow, sqlx::Error> {
        Ok(UserRow {
            id: self.try_get("id")?,
            email: self.try_get("email")?,
            email_normalized: self.try_get("email_normalized")?,
            email_verified: self.try_get("email_verified")?,
            status: self.try_get("status")?,
            registered_at: self.try_get("registered_at")?,
            activated_at: self.try_get("activated_at")?,
            deactivated_at: self.try_get("deactivated_at")?,
            last_login_at: self.try_get("last_login_at")?,
            login_count: self.try_get("login_count")?,
            failed_logins: self.try_get("failed_logins")?,
            locked_until: self.try_get("locked_until")?,
            roles: self.try_get("roles")?,
            session_epoch: self.try_get("session_epoch")?,
            erased_at: self.try_get("erased_at")?,
            position: self.try_get("position")?,
        })
    }

    fn session_row(&self) -> Result<SessionRow, sqlx::Error> {
        Ok(SessionRow {
            id: self.try_get("id")?,
            user_id: self.try_get("user_id")?,
            session_epoch: self.try_get("session_epoch")?,
            started_at: self.try_get("started_at")?,
            last_refreshed_at: self.try_get("last_refreshed_at")?,
            expires_at: self.try_get("expires_at")?,
            idle_expires_at: self.try_get("idle_expires_at")?,
            user_agent: self.try_get("user_agent")?,
            generation: self.try_get("generation")?,
            ended_at: self.try_get("ended_at")?,
            end_reason: self.try_get("end_reason")?,
            position: self.try_get("position")?,
        })
    }
}

/// Ids, times and roles are text in SQLite.
impl StoredRow for SqliteRow {
    fn user_row(&self) -> Result<UserRow, sqlx::Error> {
        let roles: String = self.try_get("roles")?;
        Ok(UserRow {
            id: parse_sqlite_id(self.try_get("id")?)?,
            email: self.try_get("email")?,
            email_normalized: self.try_get("email_normalized")?,
            email_verified: self.try_get("email_verified")?,
            status: self.try_get("status")?,
            registered_at: parse_sqlite_time(self.try_get("registered_at")?)?,
            activated_at: parse_optional_sqlite_time(self.try_get("activated_at")?)?,
            deactivated_at: parse_optional_sqlite_time(self.try_get("deactivated_at")?)?,
            last_login_at: parse_optional_sqlite_time(self.try_get("last_login_at")?)?,
            login_count: self.try_get("login_count")?,
            failed_logins: self.try_get("failed_logins")?,
            locked_until: parse_optional_sqlite_time(self.try_get("locked_until")?)?,
            roles: serde_json::from_str(&roles)
                .map_err(|error| sqlx::Error::Decode(Box::new(error)))?,
            session_epoch: self.try_get("session_epoch")?,
            erased_at: parse_optional_sqlite_time(self.try_get("erased_at")?)?,
            position: self.try_get("position")?,
        })
    }

    fn session_row(&self) -> Result<SessionRow, sqlx::Error> {
        Ok(SessionRow {
            id: parse_sqlite_id(self.try_get("id")?)?,
            user_id: parse_sqlite_id(self.try_get("user_id")?)?,
            session_epoch: self.try_get("session_epoch")?,
            started_at: parse_sqlite_time(self.try_get("started_at")?)?,
            last_refreshed_at: parse_optional_sqlite_time(self.try_get("last_refreshed_at")?)?,
            expires_at: parse_sqlite_time(self.try_get("expires_at")?)?,
            idle_expires_at: parse_sqlite_time(self.try_get("idle_expires_at")?)?,
            user_agent: self.try_get("user_agent")?,
            generation: self.try_get("generation")?,
            ended_at: parse_optional_sqlite_time(self.try_get("ended_at")?)?,
            end_reason: self.try_get("end_reason")?,
            position: self.try_get("position")?,
        })
    }
}

fn parse_sqlite_id(text: String) -> Result<Uuid, sqlx::Error> {
    Uuid::parse_str(&text).map_err(|error| sqlx::Error::Decode(Box::new(error)))
}

/// Times in SQLite are RFC 3339 text with microseconds, so they sort as text.
fn sqlite_time(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn parse_sqlite_time(text: String) -> Result<DateTime<Utc>, sqlx::Error> {
    DateTime::parse_from_rfc3339(&text)
        .map(|time| time.with_timezone(&Utc))
        .map_err(|error| sqlx::Error::Decode(Box::new(error)))
}

fn parse_optional_sqlite_time(text: Option<String>) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    text.map(parse_sqlite_time).transpose()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use test_support::TestDatabase;

    use super::{ReadModelWriter, Target, pg_move_checkpoint};

    #[tokio::test]
    async fn a_commit_that_holds_the_checkpoint_and_goes_silent_loses_its_session_within_the_limit()
    {
        let db = TestDatabase::new().await;
        let read_model = ReadModelWriter::connect(db.url(), 4).await.unwrap();
        read_model.migrate().await.unwrap();
        let checkpoint = read_model.ensure_checkpoint("users", 1).await.unwrap();
        let pool = read_model.as_postgres().unwrap();

        let mut silent = pool.begin().await.unwrap();
        let limit = Duration::from_millis(300);
        assert!(
            pg_move_checkpoint(
                &mut silent,
                Target::USERS.checkpoint,
                &checkpoint,
                7,
                Some(limit)
            )
            .await
            .unwrap()
        );
        // The writer says nothing more, holding the checkpoint row.
        tokio::time::sleep(limit * 4).await;
        // Another writer gets the row (the next holder's takeover waits for exactly this).
        let mut next = pool.begin().await.unwrap();
        sqlx::query("SET LOCAL lock_timeout = '5s'")
            .execute(&mut *next)
            .await
            .unwrap();
        assert!(
            pg_move_checkpoint(&mut next, Target::USERS.checkpoint, &checkpoint, 9, None)
                .await
                .unwrap()
        );
        next.commit().await.unwrap();
        // The silent one's session is gone, and its move never committed.
        assert!(silent.commit().await.is_err());
        assert_eq!(
            read_model
                .checkpoint("users")
                .await
                .unwrap()
                .unwrap()
                .position,
            9
        );
    }
}
