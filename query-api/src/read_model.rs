//! Reads of the read model the aggregator builds: the `users` view, the `sessions` view kept by
//! the same projection, the projections' checkpoints, and the webhook delivery's attempts and
//! checkpoints (schema in migrations/read_model). The query side never writes here.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions, SqliteRow};
use sqlx::{Database, Pool, Postgres, Row, Sqlite, Transaction};
use utoipa::ToSchema;
use uuid::Uuid;

use read_model_schema::{
    Checkpoint, ERASED_STATUS, StoredCheckpoint, USERS_PROJECTION, on_either_pool,
};

/// The columns of a profile, the account's session epoch and the row's position.
macro_rules! columns {
    () => {
        "id, email, email_verified, status, registered_at, activated_at, deactivated_at, \
         last_login_at, login_count, roles, erased_at, session_epoch, position"
    };
}

/// The rows the projection changed past a position, one more than wanted to tell whether
/// there were more.
const CHANGED_SINCE: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM users WHERE position > $1 LIMIT $2"
);

/// An erased account's row has no address (ADR 13); its status is compared too, so that no
/// lookup by address can ever answer with an erased account, whatever a row holds.
const BY_EMAIL: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM users WHERE email_normalized = $1 AND status <> $2 ORDER BY id"
);

/// A page in id order, of one status or all.
const LIST: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM users WHERE ($1 IS NULL OR status = $1) AND ($2 IS NULL OR id > $2) \
     ORDER BY id LIMIT $3"
);

/// Profiles with the users view's version and checkpoint, read in the same statement (one
/// snapshot, whichever server answers it) and with one look at the checkpoint: the checkpoint
/// every row is known to be current at. Written out whole, not formatted per request.
macro_rules! profiles_with_checkpoint {
    ($filter:literal) => {
        concat!(
            "SELECT ",
            columns!(),
            ", checkpoint_version, checkpoint_position \
             FROM users LEFT JOIN (SELECT version AS checkpoint_version, \
                                          position AS checkpoint_position \
                                   FROM projection_checkpoints WHERE projection = 'users') \
                                  AS checkpoint ON true \
             WHERE ",
            $filter
        )
    };
}

const PROFILE_WITH_CHECKPOINT: &str = profiles_with_checkpoint!("id = $1");
const PROFILES_WITH_CHECKPOINT: &str = profiles_with_checkpoint!("id = ANY($1)");

/// A user's live sessions, newest first, at most `$3` (ADR 11): not ended, `$2` before both
/// limits, and of the session epoch the user's row holds. The epoch is compared in the join, so
/// that a change of epoch (a deactivation, a password change, an administrator ending them all)
/// is one row written, not one per session. The row and the sessions come from one statement,
/// under the one checkpoint they share.
macro_rules! live_sessions_sql {
    ($after_now:literal, $newest_first:literal) => {
        concat!(
            "SELECT s.id, s.started_at, s.last_refreshed_at, s.expires_at, s.idle_expires_at, \
                    s.user_agent \
             FROM sessions AS s \
             JOIN users AS u ON u.id = s.user_id AND u.session_epoch = s.session_epoch \
             WHERE s.user_id = $1 AND s.ended_at IS NULL AND ",
            $after_now,
            " ORDER BY ",
            $newest_first,
            " DESC, s.id DESC LIMIT $3"
        )
    };
}

/// The sessions index (user, started) gives them newest first.
const LIVE_SESSIONS_POSTGRES: &str = live_sessions_sql!(
    "s.expires_at > $2 AND s.idle_expires_at > $2",
    "s.started_at"
);

/// SQLite stores times as text: they are compared as instants (`julianday`), never as strings,
/// which would misorder two spellings of RFC 3339 (`Z` and `+00:00`, or fractions of different
/// lengths).
const LIVE_SESSIONS_SQLITE: &str = live_sessions_sql!(
    "julianday(s.expires_at) > julianday($2) AND julianday(s.idle_expires_at) > julianday($2)",
    "julianday(s.started_at)"
);

/// Every session of a user, live or over, newest first, with whether it belongs to the account's
/// current session epoch (it ended with all the others when it does not).
macro_rules! every_session_sql {
    ($newest_first:literal) => {
        concat!(
            "SELECT s.id, s.started_at, s.last_refreshed_at, s.expires_at, s.idle_expires_at, \
                    s.user_agent, s.ended_at, s.end_reason, \
                    CASE WHEN u.session_epoch = s.session_epoch THEN 1 ELSE 0 END \
                        AS in_account_epoch \
             FROM sessions AS s \
             LEFT JOIN users AS u ON u.id = s.user_id \
             WHERE s.user_id = $1 \
             ORDER BY ",
            $newest_first,
            " DESC, s.id DESC"
        )
    };
}

const EVERY_SESSION_POSTGRES: &str = every_session_sql!("s.started_at");

/// Ordered as instants, as [`LIVE_SESSIONS_SQLITE`] is.
const EVERY_SESSION_SQLITE: &str = every_session_sql!("julianday(s.started_at)");

/// The newest delivery attempts to one webhook endpoint, at most `$2`, newest first (the
/// delivery inserts them in the order it makes them).
const WEBHOOK_ATTEMPTS: &str = "SELECT message_id, event_type, position, attempt, attempted_at, \
                                       latency_ms, status_code, error, delivered \
                                FROM webhook_attempts WHERE webhook_id = $1 \
                                ORDER BY id DESC LIMIT $2";

/// The checkpoint of every webhook endpoint's delivery: each is a consumer of its own, named
/// `webhook:<id>`.
const WEBHOOK_CHECKPOINTS: &str =
    "SELECT projection, position FROM projection_checkpoints WHERE projection LIKE 'webhook:%'";

/// What the name of a webhook endpoint's delivery checkpoint starts with.
const WEBHOOK_CHECKPOINT_PREFIX: &str = "webhook:";

/// One attempt to deliver an event to a webhook endpoint, as the delivery recorded it.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptRow {
    pub message_id: Uuid,
    pub event_type: String,
    pub position: u64,
    /// 1 for the event's first attempt.
    pub attempt: u32,
    pub attempted_at: DateTime<Utc>,
    pub latency_ms: u64,
    /// None when no answer came (refused, timed out, an address the policy forbids).
    pub status_code: Option<u16>,
    pub error: Option<String>,
    pub delivered: bool,
}

/// A user's profile as the users view holds it.
///
/// An erased account (ADR 13) keeps its profile's facts (when it registered, was activated,
/// last logged in, with which roles) and loses its address: `status` is `erased`, `email` is
/// null and `erased_at` says when.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq)]
pub struct Profile {
    pub id: Uuid,
    /// The account's address: as registered, or as last changed; null once the account is
    /// erased.
    pub email: Option<String>,
    /// Whether the owner has proved control of `email` through the link mailed to it (a
    /// verification, or the change of email that moved the account there). OpenID Connect's
    /// name, as in the access token.
    pub email_verified: bool,
    /// `pending`, `active`, `deactivated` or `erased`.
    pub status: String,
    #[serde(serialize_with = "rfc3339::instant")]
    pub registered_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339::optional")]
    pub activated_at: Option<DateTime<Utc>>,
    #[serde(serialize_with = "rfc3339::optional")]
    pub deactivated_at: Option<DateTime<Utc>>,
    #[serde(serialize_with = "rfc3339::optional")]
    pub last_login_at: Option<DateTime<Utc>>,
    pub login_count: u64,
    pub roles: Vec<String>,
    /// When the account was erased: its personal data is gone for good. Null for an account
    /// that was not, and, for a moment, for one whose data was found gone before its erasure
    /// was read.
    #[serde(serialize_with = "rfc3339::optional")]
    pub erased_at: Option<DateTime<Utc>>,
}

/// A row of the users view: a profile, the account's session epoch, and the position of the
/// last event applied to it, which the projection writes with the row, so that whatever changes
/// the row later has a larger one.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileRow {
    pub profile: Profile,
    /// The account's session epoch (`identity::Account::session_epoch`): a session of another
    /// epoch is over. Not part of the profile a client reads.
    pub session_epoch: u64,
    pub position: u64,
}

/// A live session of a user, as the sessions view lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRow {
    pub id: Uuid,
    pub started_at: DateTime<Utc>,
    /// Its last refresh; none before the first.
    pub last_refreshed_at: Option<DateTime<Utc>>,
    /// The earlier of its two limits (absolute and idle): it cannot be refreshed from then on.
    pub expires_at: DateTime<Utc>,
    /// The `User-Agent` it started with.
    pub user_agent: Option<String>,
}

/// A session of a user, live or over, as the sessions view holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRecord {
    pub session: SessionRow,
    /// When something ended it on its own (a logout, its owner, an administrator, its refresh
    /// token used twice); none otherwise.
    pub ended_at: Option<DateTime<Utc>>,
    /// Why, with `ended_at`.
    pub end_reason: Option<String>,
    /// Whether it belongs to the account's current session epoch: it ended with every session
    /// of the account (a deactivation, a password change) when it does not.
    pub in_account_epoch: bool,
}

/// A row read with the view's projection version and checkpoint in the same snapshot: the
/// checkpoint the row is known to be current at.
#[derive(Debug, Clone, PartialEq)]
pub struct RowAtCheckpoint {
    pub row: ProfileRow,
    pub version: i32,
    pub checkpoint: u64,
}

/// The rows the view changed since a position, with its projection version and checkpoint, seen
/// in one snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangedRows {
    pub version: i32,
    pub checkpoint: u64,
    pub rows: Vec<ProfileRow>,
    /// False when there were more changed rows than asked for (`rows` is then empty).
    pub complete: bool,
}

/// Instants in a profile exactly as chrono's own `Serialize` writes them (RFC 3339 with `Z`,
/// fractional seconds only as far as needed), but formatted into a string first: chrono
/// hands them to serde_json through `collect_str` a character at a time, each escaped on its
/// own, which cost a tenth of a profile read's instructions.
mod rfc3339 {
    use chrono::{DateTime, SecondsFormat, Utc};
    use serde::Serializer;

    pub fn instant<S: Serializer>(at: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&at.to_rfc3339_opts(SecondsFormat::AutoSi, true))
    }

    pub fn optional<S: Serializer>(
        at: &Option<DateTime<Utc>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match at {
            Some(at) => instant(at, serializer),
            None => serializer.serialize_none(),
        }
    }

    #[cfg(test)]
    mod tests {
        use chrono::{TimeDelta, TimeZone};
        use serde::Serialize;

        use super::*;

        #[derive(Serialize)]
        struct Chrono {
            at: DateTime<Utc>,
            maybe: Option<DateTime<Utc>>,
        }

        #[derive(Serialize)]
        struct Ours {
            #[serde(serialize_with = "instant")]
            at: DateTime<Utc>,
            #[serde(serialize_with = "optional")]
            maybe: Option<DateTime<Utc>>,
        }

        #[test]
        fn instants_are_written_as_chrono_writes_them() {
            let second = Utc.with_ymd_and_hms(2026, 12, 1, 9, 5, 7).unwrap();
            for at in [
                second,
                second + TimeDelta::milliseconds(120),
                second + TimeDelta::microseconds(123_400),
                second + TimeDelta::nanoseconds(123_456_789),
                second + TimeDelta::nanoseconds(1),
                Utc.with_ymd_and_hms(1970, 1, 1, 0, 0, 0).unwrap(),
            ] {
                for maybe in [None, Some(at)] {
                    let chrono = serde_json::to_string(&Chrono { at, maybe }).unwrap();
                    let ours = serde_json::to_string(&Ours { at, maybe }).unwrap();
                    assert_eq!(ours, chrono);
                }
            }
        }
    }
}

/// The users view and its checkpoint, read only, on PostgreSQL (deployments, possibly a replica)
/// or SQLite (standalone). The aggregator's `ReadModelWriter` is what writes them.
#[derive(Clone)]
pub enum UsersView {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

impl UsersView {
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, sqlx::Error> {
        if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)?
                .read_only(true)
                .busy_timeout(Duration::from_secs(5));
            let pool = SqlitePoolOptions::new()
                .max_connections(max_connections)
                .connect_with(options)
                .await?;
            return Ok(Self::Sqlite(pool));
        }
        // Generic plans: these lookups have one good plan, and PostgreSQL would otherwise plan
        // the `id = ANY($1)` lookup anew on every call (as it does the store's append, ADR 4).
        let options =
            PgConnectOptions::from_str(url)?.options([("plan_cache_mode", "force_generic_plan")]);
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            // No ping before each lookup: that is a round trip per request. A connection that
            // died in the pool fails its query and leaves it, and the read is run again on
            // another ([`retrying`]).
            .test_before_acquire(false)
            .connect_with(options)
            .await?;
        Ok(Self::Postgres(pool))
    }

    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        on_either_pool!(UsersView, self, |pool| {
            retrying(pool, || sqlx::query("SELECT 1").execute(pool)).await?;
        });
        Ok(())
    }

    /// The profiles of the accounts in `ids` that the view holds, in one round trip, each with
    /// the view's version and checkpoint read in the same statement: the checkpoint the row is
    /// known to be current at.
    pub async fn read_profiles(&self, ids: &[Uuid]) -> Result<Vec<RowAtCheckpoint>, sqlx::Error> {
        match self {
            Self::Postgres(pool) => {
                let sql = if ids.len() == 1 {
                    PROFILE_WITH_CHECKPOINT
                } else {
                    PROFILES_WITH_CHECKPOINT
                };
                let rows = retrying(pool, || {
                    let query = sqlx::query(sql);
                    let query = match ids {
                        [id] => query.bind(*id),
                        _ => query.bind(ids),
                    };
                    query.fetch_all(pool)
                })
                .await?;
                rows.iter().map(UsersRow::row_at_checkpoint).collect()
            }
            // SQLite has no arrays: one lookup per id, each in a local file.
            Self::Sqlite(pool) => {
                let mut found = Vec::with_capacity(ids.len());
                for id in ids {
                    let row = retrying(pool, || {
                        sqlx::query(PROFILE_WITH_CHECKPOINT)
                            .bind(pool.id_parameter(*id))
                            .fetch_optional(pool)
                    })
                    .await?;
                    if let Some(row) = row {
                        found.push(row.row_at_checkpoint()?);
                    }
                }
                Ok(found)
            }
        }
    }

    /// The view's version and checkpoint and, seen in the same snapshot, the rows whose last
    /// event is past `position` (what the projection changed since then), unless there are
    /// more than `limit`.
    pub async fn changes_since(
        &self,
        position: u64,
        limit: usize,
    ) -> Result<ChangedRows, sqlx::Error> {
        let after = i64::try_from(position).unwrap_or(i64::MAX);
        let one_more = i64::try_from(limit).unwrap_or(i64::MAX).saturating_add(1);
        let (checkpoint, rows) = on_either_pool!(UsersView, self, |pool| {
            let (checkpoint, rows) = retrying(pool, || async {
                let mut snapshot = pool.snapshot().await?;
                let checkpoint: Option<StoredCheckpoint> = sqlx::query_as(Checkpoint::READ)
                    .bind(USERS_PROJECTION)
                    .fetch_optional(&mut *snapshot)
                    .await?;
                let rows = sqlx::query(CHANGED_SINCE)
                    .bind(after)
                    .bind(one_more)
                    .fetch_all(&mut *snapshot)
                    .await?;
                snapshot.commit().await?;
                Ok((checkpoint, rows))
            })
            .await?;
            let rows = rows.iter().map(UsersRow::profile_row);
            (checkpoint, rows.collect::<Result<Vec<_>, _>>()?)
        });
        let (version, checkpoint) = to_checkpoint(checkpoint);
        let complete = rows.len() <= limit;
        Ok(ChangedRows {
            version,
            checkpoint,
            rows: if complete { rows } else { vec![] },
            complete,
        })
    }

    /// The accounts whose normalised email is `normalized`, by the address each has in the
    /// view: one, unless the view lags behind a change of address (an account that moved away
    /// is found under its old one until the view has the change). Never an erased account.
    pub async fn by_email(&self, normalized: &str) -> Result<Vec<Profile>, sqlx::Error> {
        on_either_pool!(UsersView, self, |pool| {
            let rows = retrying(pool, || {
                sqlx::query(BY_EMAIL)
                    .bind(normalized)
                    .bind(ERASED_STATUS)
                    .fetch_all(pool)
            })
            .await?;
            rows.iter().map(UsersRow::profile).collect()
        })
    }

    /// Up to `limit` accounts after `after` in id order, of one status or all.
    pub async fn list(
        &self,
        status: Option<&str>,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<Profile>, sqlx::Error> {
        on_either_pool!(UsersView, self, |pool| {
            let rows = retrying(pool, || {
                sqlx::query(LIST)
                    .bind(status)
                    .bind(after.map(|id| pool.id_parameter(id)))
                    .bind(i64::from(limit))
                    .fetch_all(pool)
            })
            .await?;
            rows.iter().map(UsersRow::profile).collect()
        })
    }

    /// The live sessions of `user` at `now`, newest first, at most `limit` (see
    /// [`LIVE_SESSIONS_POSTGRES`]).
    pub async fn live_sessions(
        &self,
        user: Uuid,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<SessionRow>, sqlx::Error> {
        on_either_pool!(UsersView, self, |pool| {
            let rows = retrying(pool, || {
                sqlx::query(pool.live_sessions())
                    .bind(pool.id_parameter(user))
                    .bind(now)
                    .bind(i64::from(limit))
                    .fetch_all(pool)
            })
            .await?;
            rows.iter().map(SessionsRow::session).collect()
        })
    }

    /// Every session of `user` the view holds, live or over, newest first: what their export
    /// lists. A person has a few hundred at most; an account that logs in by script may have
    /// many more, and its export lists them all, as the right of access asks.
    pub async fn every_session(&self, user: Uuid) -> Result<Vec<SessionRecord>, sqlx::Error> {
        on_either_pool!(UsersView, self, |pool| {
            let rows = retrying(pool, || {
                sqlx::query(pool.every_session())
                    .bind(pool.id_parameter(user))
                    .fetch_all(pool)
            })
            .await?;
            rows.iter()
                .map(|row| {
                    Ok(SessionRecord {
                        session: row.session()?,
                        ended_at: row.try_get("ended_at")?,
                        end_reason: row.try_get("end_reason")?,
                        in_account_epoch: row.try_get::<i32, _>("in_account_epoch")? == 1,
                    })
                })
                .collect()
        })
    }

    /// The newest `limit` attempts to deliver to webhook endpoint `webhook`, newest first.
    pub async fn webhook_attempts(
        &self,
        webhook: Uuid,
        limit: u32,
    ) -> Result<Vec<AttemptRow>, sqlx::Error> {
        on_either_pool!(UsersView, self, |pool| {
            let rows = retrying(pool, || {
                sqlx::query(WEBHOOK_ATTEMPTS)
                    .bind(pool.id_parameter(webhook))
                    .bind(i64::from(limit))
                    .fetch_all(pool)
            })
            .await?;
            rows.iter().map(AttemptsRow::attempt).collect()
        })
    }

    /// How far each webhook endpoint's delivery has got: the position of its checkpoint, by
    /// endpoint. An endpoint whose delivery has not started has none.
    pub async fn webhook_checkpoints(&self) -> Result<HashMap<Uuid, u64>, sqlx::Error> {
        let rows: Vec<(String, i64)> = on_either_pool!(UsersView, self, |pool| {
            retrying(pool, || sqlx::query_as(WEBHOOK_CHECKPOINTS).fetch_all(pool)).await?
        });
        Ok(rows
            .into_iter()
            .filter_map(|(name, position)| {
                let id = name.strip_prefix(WEBHOOK_CHECKPOINT_PREFIX)?.parse().ok()?;
                Some((id, read_model_schema::unsigned(position)))
            })
            .collect())
    }

    /// The users view's projection version and checkpoint (0 and 0 before any).
    pub async fn checkpoint(&self) -> Result<(i32, u64), sqlx::Error> {
        let row: Option<StoredCheckpoint> = on_either_pool!(UsersView, self, |pool| {
            retrying(pool, || {
                sqlx::query_as(Checkpoint::READ)
                    .bind(USERS_PROJECTION)
                    .fetch_optional(pool)
            })
            .await?
        });
        Ok(to_checkpoint(row))
    }
}

/// Runs `read` again when its pooled connection had died in a database restart, as the
/// message store does ([`message_store::database::retrying_lost_connections`]). On SQLite, a
/// file, connections do not die that way: a read runs once, unless it fails with an I/O error.
async fn retrying<DB, T, Reading, Fut>(pool: &Pool<DB>, read: Reading) -> Result<T, sqlx::Error>
where
    DB: Database,
    Reading: FnMut() -> Fut,
    Fut: Future<Output = Result<T, sqlx::Error>>,
{
    message_store::database::retrying_lost_connections(pool.options().get_max_connections(), read)
        .await
}

/// What the two engines do their own way, besides decoding rows ([`UsersRow`]).
trait ViewPool {
    type Database: Database;
    /// An account id as a query parameter.
    type Id;

    /// `id` as the users view stores it: a uuid on PostgreSQL, text on SQLite.
    fn id_parameter(&self, id: Uuid) -> Self::Id;

    /// The statement that lists a user's live sessions, which compares times each its own way.
    fn live_sessions(&self) -> &'static str;

    /// The statement that lists every session of a user, ordered each its own way.
    fn every_session(&self) -> &'static str;

    /// A read-only transaction that sees one snapshot of the view.
    async fn snapshot(&self) -> Result<Transaction<'static, Self::Database>, sqlx::Error>;
}

impl ViewPool for PgPool {
    type Database = Postgres;
    type Id = Uuid;

    fn id_parameter(&self, id: Uuid) -> Uuid {
        id
    }

    fn live_sessions(&self) -> &'static str {
        LIVE_SESSIONS_POSTGRES
    }

    fn every_session(&self) -> &'static str {
        EVERY_SESSION_POSTGRES
    }

    async fn snapshot(&self) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        let mut transaction = self.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *transaction)
            .await?;
        Ok(transaction)
    }
}

impl ViewPool for SqlitePool {
    type Database = Sqlite;
    type Id = String;

    fn id_parameter(&self, id: Uuid) -> String {
        id.to_string()
    }

    fn live_sessions(&self) -> &'static str {
        LIVE_SESSIONS_SQLITE
    }

    fn every_session(&self) -> &'static str {
        EVERY_SESSION_SQLITE
    }

    /// A read transaction in WAL mode is one snapshot (and the pool's connections only read).
    async fn snapshot(&self) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
        self.begin().await
    }
}

/// The users view's version and checkpoint; 0 and 0 before it has any.
fn to_checkpoint(row: Option<StoredCheckpoint>) -> (i32, u64) {
    row.map(Checkpoint::from_stored)
        .map_or((0, 0), |checkpoint| {
            (checkpoint.version, checkpoint.position)
        })
}

/// A position or a count, which the database stores signed; none (no checkpoint yet) is 0.
fn unsigned(stored: Option<i64>) -> u64 {
    stored.map_or(0, read_model_schema::unsigned)
}

/// A row of the users view, on either engine.
trait UsersRow {
    fn profile(&self) -> Result<Profile, sqlx::Error>;

    fn profile_row(&self) -> Result<ProfileRow, sqlx::Error>;

    /// The row with the view's version and checkpoint, read in the same statement.
    fn row_at_checkpoint(&self) -> Result<RowAtCheckpoint, sqlx::Error>;
}

/// [`UsersRow`] for one engine's rows: the columns are decoded alike on both but for the two
/// that `id` and `roles` decode, which SQLite stores as text.
macro_rules! impl_users_row {
    ($row:ty, id: $id:expr, roles: $roles:expr) => {
        impl UsersRow for $row {
            fn profile(&self) -> Result<Profile, sqlx::Error> {
                Ok(Profile {
                    id: $id(self)?,
                    email: self.try_get("email")?,
                    email_verified: self.try_get("email_verified")?,
                    status: self.try_get("status")?,
                    registered_at: self.try_get("registered_at")?,
                    activated_at: self.try_get("activated_at")?,
                    deactivated_at: self.try_get("deactivated_at")?,
                    last_login_at: self.try_get("last_login_at")?,
                    login_count: unsigned(self.try_get("login_count")?),
                    roles: $roles(self)?,
                    erased_at: self.try_get("erased_at")?,
                })
            }

            fn profile_row(&self) -> Result<ProfileRow, sqlx::Error> {
                Ok(ProfileRow {
                    profile: self.profile()?,
                    session_epoch: unsigned(self.try_get("session_epoch")?),
                    position: unsigned(self.try_get("position")?),
                })
            }

            fn row_at_checkpoint(&self) -> Result<RowAtCheckpoint, sqlx::Error> {
                Ok(RowAtCheckpoint {
                    row: self.profile_row()?,
                    version: self
                        .try_get::<Option<i32>, _>("checkpoint_version")?
                        .unwrap_or(0),
                    checkpoint: unsigned(self.try_get("checkpoint_position")?),
                })
            }
        }
    };
}

impl_users_row!(
    PgRow,
    id: |row: &PgRow| row.try_get("id"),
    roles: |row: &PgRow| row.try_get("roles")
);
impl_users_row!(SqliteRow, id: sqlite_id, roles: sqlite_roles);

/// A row of the live sessions, on either engine.
trait SessionsRow {
    fn session(&self) -> Result<SessionRow, sqlx::Error>;
}

/// [`SessionsRow`] for one engine's rows, whose `id` decodes its own way.
macro_rules! impl_sessions_row {
    ($row:ty, id: $id:expr) => {
        impl SessionsRow for $row {
            fn session(&self) -> Result<SessionRow, sqlx::Error> {
                let expires_at: DateTime<Utc> = self.try_get("expires_at")?;
                let idle_expires_at: DateTime<Utc> = self.try_get("idle_expires_at")?;
                Ok(SessionRow {
                    id: $id(self)?,
                    started_at: self.try_get("started_at")?,
                    last_refreshed_at: self.try_get("last_refreshed_at")?,
                    expires_at: expires_at.min(idle_expires_at),
                    user_agent: self.try_get("user_agent")?,
                })
            }
        }
    };
}

impl_sessions_row!(PgRow, id: |row: &PgRow| row.try_get("id"));
impl_sessions_row!(SqliteRow, id: sqlite_id);

/// A row of the webhook delivery's attempts, on either engine.
trait AttemptsRow {
    fn attempt(&self) -> Result<AttemptRow, sqlx::Error>;
}

/// [`AttemptsRow`] for one engine's rows, whose `message_id` decodes its own way.
macro_rules! impl_attempts_row {
    ($row:ty, message_id: $id:expr) => {
        impl AttemptsRow for $row {
            fn attempt(&self) -> Result<AttemptRow, sqlx::Error> {
                let status_code: Option<i32> = self.try_get("status_code")?;
                Ok(AttemptRow {
                    message_id: $id(self)?,
                    event_type: self.try_get("event_type")?,
                    position: unsigned(self.try_get("position")?),
                    attempt: u32::try_from(self.try_get::<i32, _>("attempt")?).unwrap_or(0),
                    attempted_at: self.try_get("attempted_at")?,
                    latency_ms: u64::try_from(self.try_get::<i32, _>("latency_ms")?).unwrap_or(0),
                    status_code: status_code.and_then(|code| u16::try_from(code).ok()),
                    error: self.try_get("error")?,
                    delivered: self.try_get("delivered")?,
                })
            }
        }
    };
}

impl_attempts_row!(PgRow, message_id: |row: &PgRow| row.try_get("message_id"));
impl_attempts_row!(SqliteRow, message_id: |row: &SqliteRow| sqlite_uuid(row, "message_id"));

fn sqlite_id(row: &SqliteRow) -> Result<Uuid, sqlx::Error> {
    sqlite_uuid(row, "id")
}

/// A uuid SQLite keeps as hyphenated text, in column `column`.
fn sqlite_uuid(row: &SqliteRow, column: &str) -> Result<Uuid, sqlx::Error> {
    let id: String = row.try_get(column)?;
    Uuid::parse_str(&id).map_err(|error| sqlx::Error::Decode(Box::new(error)))
}

/// A JSON array in text.
fn sqlite_roles(row: &SqliteRow) -> Result<Vec<String>, sqlx::Error> {
    let roles: String = row.try_get("roles")?;
    serde_json::from_str(&roles).map_err(|error| sqlx::Error::Decode(Box::new(error)))
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    /// The view on an SQLite file holding Ann's row (her address verified) at position 7 and the
    /// checkpoint at 9 of projection version 2, as the aggregator writes them; and the file, to
    /// remove.
    async fn sqlite_view(ann: Uuid) -> (UsersView, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!("users-view-{}.db", Uuid::new_v4()));
        let url = format!("sqlite://{}", path.display());
        let writer = SqlitePool::connect(&format!("{url}?mode=rwc"))
            .await
            .unwrap();
        read_model_schema::sqlite_migrations()
            .run(&writer)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO users (id, email, email_normalized, email_verified, status, \
                                registered_at, login_count, roles, position) \
             VALUES ($1, 'Ann@example.com', 'ann@example.com', 1, 'active', \
                     '2026-01-01T00:00:00Z', 3, '[\"user\"]', 7)",
        )
        .bind(ann.to_string())
        .execute(&writer)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO projection_checkpoints (projection, version, position) \
             VALUES ('users', 2, 9)",
        )
        .execute(&writer)
        .await
        .unwrap();
        writer.close().await;
        (UsersView::connect(&url, 2).await.unwrap(), path)
    }

    /// Writes a session row of `user` into the SQLite view at `path`, its times as given (text).
    async fn sqlite_session(
        path: &std::path::Path,
        user: Uuid,
        epoch: i64,
        [started_at, expires_at, idle_expires_at]: [&str; 3],
        ended_at: Option<&str>,
    ) -> Uuid {
        let id = Uuid::new_v4();
        let writer = SqlitePool::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO sessions (id, user_id, session_epoch, started_at, expires_at, \
                                   idle_expires_at, user_agent, generation, ended_at, position) \
             VALUES ($1, $2, $3, $4, $5, $6, 'curl/8', 0, $7, 1)",
        )
        .bind(id.to_string())
        .bind(user.to_string())
        .bind(epoch)
        .bind(started_at)
        .bind(expires_at)
        .bind(idle_expires_at)
        .bind(ended_at)
        .execute(&writer)
        .await
        .unwrap();
        writer.close().await;
        id
    }

    #[tokio::test]
    async fn live_sessions_are_listed_on_sqlite_by_instant_whatever_the_spelling_of_their_times() {
        let ann = Uuid::new_v4();
        let (view, path) = sqlite_view(ann).await;
        let later = "2027-01-01T00:00:00Z";
        // Both spellings of RFC 3339 the writer might use, which as text sort the wrong way:
        // 10:00:00.5+00:00 is after 10:00:00Z, and "." sorts before "Z".
        let plain = sqlite_session(
            &path,
            ann,
            0,
            ["2026-12-01T10:00:00Z", later, "2026-12-15T10:00:00Z"],
            None,
        )
        .await;
        let newer = sqlite_session(
            &path,
            ann,
            0,
            ["2026-12-01T10:00:00.5+00:00", later, later],
            None,
        )
        .await;
        // Ended; of an earlier epoch than the account's (0); past its idle limit; another's.
        let ended = "2026-12-01T11:00:00Z";
        let times = ["2026-12-01T09:00:00Z", later, later];
        sqlite_session(&path, ann, 0, times, Some(ended)).await;
        sqlite_session(&path, ann, 1, times, None).await;
        let idle = [
            "2026-11-01T09:00:00Z",
            later,
            "2026-12-01T11:59:59.999+00:00",
        ];
        sqlite_session(&path, ann, 0, idle, None).await;
        sqlite_session(&path, Uuid::new_v4(), 0, times, None).await;
        let now = Utc.with_ymd_and_hms(2026, 12, 1, 12, 0, 0).unwrap();

        let live = view.live_sessions(ann, now, 10).await.unwrap();
        let ids: Vec<Uuid> = live.iter().map(|session| session.id).collect();
        assert_eq!(ids, [newer, plain]);
        let first = Utc.with_ymd_and_hms(2026, 12, 1, 10, 0, 0).unwrap();
        assert_eq!(
            live[1],
            SessionRow {
                id: plain,
                started_at: first,
                last_refreshed_at: None,
                expires_at: Utc.with_ymd_and_hms(2026, 12, 15, 10, 0, 0).unwrap(),
                user_agent: Some("curl/8".to_owned()),
            }
        );
        let newest = view.live_sessions(ann, now, 1).await.unwrap();
        assert_eq!(
            newest.iter().map(|session| session.id).collect::<Vec<_>>(),
            [newer]
        );

        drop(view);
        for file in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{file}", path.display()));
        }
    }

    #[tokio::test]
    async fn every_read_of_the_view_works_on_sqlite_as_on_postgresql() {
        let ann = Uuid::new_v4();
        let (view, path) = sqlite_view(ann).await;

        view.ping().await.unwrap();
        assert_eq!(view.checkpoint().await.unwrap(), (2, 9));
        let read = view.read_profiles(&[ann, Uuid::new_v4()]).await.unwrap();
        assert_eq!(read.len(), 1, "{read:?}");
        let (row, version, checkpoint) = (&read[0].row, read[0].version, read[0].checkpoint);
        assert_eq!((version, checkpoint, row.position), (2, 9, 7));
        assert_eq!(
            (
                row.profile.id,
                row.profile.email_verified,
                row.profile.login_count,
                &row.profile.roles[..]
            ),
            (ann, true, 3, &["user".to_owned()][..])
        );

        let changed = view.changes_since(6, 10).await.unwrap();
        assert_eq!((changed.version, changed.checkpoint), (2, 9));
        assert_eq!((changed.rows, changed.complete), (vec![row.clone()], true));
        assert!(view.changes_since(7, 10).await.unwrap().rows.is_empty());
        let too_many = view.changes_since(0, 0).await.unwrap();
        assert_eq!((too_many.rows.len(), too_many.complete), (0, false));

        let by_email = view.by_email("ann@example.com").await.unwrap();
        assert_eq!(by_email, std::slice::from_ref(&row.profile));
        let active = view.list(Some("active"), None, 10).await.unwrap();
        assert_eq!(active, std::slice::from_ref(&row.profile));
        assert!(
            view.list(Some("active"), Some(ann), 10)
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            view.list(Some("pending"), None, 10)
                .await
                .unwrap()
                .is_empty()
        );

        drop(view);
        for file in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{file}", path.display()));
        }
    }

    #[tokio::test]
    async fn webhook_attempts_and_checkpoints_are_read_on_sqlite_newest_first() {
        let (view, path) = sqlite_view(Uuid::new_v4()).await;
        let (endpoint, other) = (Uuid::new_v4(), Uuid::new_v4());
        let (first, second) = (Uuid::new_v4(), Uuid::new_v4());
        let writer = SqlitePool::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        // As the delivery writes them: ids and times as text, `delivered` 0 or 1.
        for (webhook, message, attempt, at, status, error, delivered) in [
            (
                endpoint,
                first,
                1,
                "2026-12-06T10:00:00Z",
                None,
                Some("timed out"),
                0,
            ),
            (
                endpoint,
                first,
                2,
                "2026-12-06T10:00:01.5+00:00",
                Some(200),
                None,
                1,
            ),
            (
                other,
                first,
                1,
                "2026-12-06T10:00:02Z",
                Some(500),
                Some("HTTP 500"),
                0,
            ),
            (
                endpoint,
                second,
                1,
                "2026-12-06T10:00:03Z",
                Some(204),
                None,
                1,
            ),
        ] {
            sqlx::query(
                "INSERT INTO webhook_attempts (webhook_id, message_id, event_type, position, \
                                               attempt, attempted_at, latency_ms, status_code, \
                                               error, delivered) \
                 VALUES ($1, $2, 'identity.user.registered.v1', 12, $3, $4, 35, $5, $6, $7)",
            )
            .bind(webhook.to_string())
            .bind(message.to_string())
            .bind(attempt)
            .bind(at)
            .bind(status)
            .bind(error)
            .bind(delivered)
            .execute(&writer)
            .await
            .unwrap();
        }
        sqlx::query(
            "INSERT INTO projection_checkpoints (projection, version, position) \
             VALUES ($1, 1, 40), ('webhook:not-an-endpoint', 1, 3)",
        )
        .bind(format!("webhook:{endpoint}"))
        .execute(&writer)
        .await
        .unwrap();
        writer.close().await;

        let attempts = view.webhook_attempts(endpoint, 2).await.unwrap();
        let listed: Vec<(Uuid, u32, Option<u16>, bool)> = attempts
            .iter()
            .map(|a| (a.message_id, a.attempt, a.status_code, a.delivered))
            .collect();
        assert_eq!(
            listed,
            [(second, 1, Some(204), true), (first, 2, Some(200), true)]
        );
        assert_eq!(
            attempts[1].attempted_at,
            Utc.with_ymd_and_hms(2026, 12, 6, 10, 0, 1).unwrap()
                + chrono::TimeDelta::milliseconds(500)
        );
        assert_eq!((attempts[1].position, attempts[1].latency_ms), (12, 35));
        let oldest = &view.webhook_attempts(endpoint, 10).await.unwrap()[2];
        assert_eq!(
            (
                oldest.status_code,
                oldest.error.as_deref(),
                oldest.delivered
            ),
            (None, Some("timed out"), false)
        );
        let checkpoints = view.webhook_checkpoints().await.unwrap();
        assert_eq!(checkpoints, HashMap::from([(endpoint, 40)]));

        drop(view);
        for file in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{file}", path.display()));
        }
    }

    /// Writes Bob's row into the SQLite view at `path` as the aggregator keeps an erased
    /// account: status `erased`, no address, the time of its erasure; and returns his id.
    /// `normalized` stands for a row that kept its address however it came to.
    async fn sqlite_erased(path: &std::path::Path, normalized: Option<&str>) -> Uuid {
        let bob = Uuid::new_v4();
        let writer = SqlitePool::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO users (id, email, email_normalized, status, registered_at, login_count, \
                                roles, erased_at, position) \
             VALUES ($1, NULL, $2, 'erased', '2026-01-01T00:00:00Z', 2, '[\"user\"]', \
                     '2026-02-01T00:00:00Z', 8)",
        )
        .bind(bob.to_string())
        .bind(normalized)
        .execute(&writer)
        .await
        .unwrap();
        writer.close().await;
        bob
    }

    #[tokio::test]
    async fn an_erased_row_is_read_without_an_address_and_never_found_by_one() {
        let ann = Uuid::new_v4();
        let (view, path) = sqlite_view(ann).await;
        let bob = sqlite_erased(&path, None).await;
        let kept_address = sqlite_erased(&path, Some("ann@example.com")).await;

        let read = view.read_profiles(&[bob]).await.unwrap();
        let profile = &read[0].row.profile;
        assert_eq!(
            (profile.email.as_deref(), profile.status.as_str()),
            (None, "erased")
        );
        assert_eq!(
            profile.erased_at,
            Some(Utc.with_ymd_and_hms(2026, 2, 1, 0, 0, 0).unwrap())
        );
        let by_email = view.by_email("ann@example.com").await.unwrap();
        let found: Vec<Uuid> = by_email.iter().map(|profile| profile.id).collect();
        assert_eq!(found, [ann], "never the erased row, whatever it holds");
        let erased = view.list(Some(ERASED_STATUS), None, 10).await.unwrap();
        let mut listed: Vec<Uuid> = erased.iter().map(|profile| profile.id).collect();
        listed.sort();
        let mut expected = vec![bob, kept_address];
        expected.sort();
        assert_eq!(listed, expected);

        drop(view);
        for file in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{file}", path.display()));
        }
    }
}
