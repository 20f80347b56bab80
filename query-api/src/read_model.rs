//! Reads of the read model the aggregator builds: the `users` view and the projections'
//! checkpoints (schema in migrations/read_model). The query side never writes here.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions, SqliteRow};
use utoipa::ToSchema;
use uuid::Uuid;

/// The projection whose checkpoint tells how far the users view has got.
pub const USERS_PROJECTION: &str = "users";

/// The columns of a profile and the row's position.
macro_rules! columns {
    () => {
        "id, email, status, registered_at, activated_at, deactivated_at, last_login_at, \
         login_count, roles, position"
    };
}

const COLUMNS: &str = columns!();

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

/// A user's profile as the users view holds it.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq)]
pub struct Profile {
    pub id: Uuid,
    pub email: String,
    /// `pending`, `active` or `deactivated`.
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
}

/// A row of the users view: a profile and the position of the last event applied to it, which
/// the projection writes with the row, so that whatever changes the row later has a larger one.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileRow {
    pub profile: Profile,
    pub position: u64,
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
        match self {
            Self::Postgres(pool) => retrying(pool, || sqlx::query("SELECT 1").execute(pool))
                .await
                .map(drop),
            Self::Sqlite(pool) => sqlx::query("SELECT 1").execute(pool).await.map(drop),
        }
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
                rows.iter()
                    .map(|row| {
                        Ok(RowAtCheckpoint {
                            row: pg_profile_row(row)?,
                            version: row
                                .try_get::<Option<i32>, _>("checkpoint_version")?
                                .unwrap_or(0),
                            checkpoint: to_position(row.try_get("checkpoint_position")?),
                        })
                    })
                    .collect()
            }
            Self::Sqlite(pool) => {
                let mut found = Vec::with_capacity(ids.len());
                for id in ids {
                    let row = sqlx::query(PROFILE_WITH_CHECKPOINT)
                        .bind(id.to_string())
                        .fetch_optional(pool)
                        .await?;
                    if let Some(row) = row {
                        found.push(RowAtCheckpoint {
                            row: sqlite_profile_row(&row)?,
                            version: row
                                .try_get::<Option<i32>, _>("checkpoint_version")?
                                .unwrap_or(0),
                            checkpoint: to_position(row.try_get("checkpoint_position")?),
                        });
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
        let sql = format!("SELECT {COLUMNS} FROM users WHERE position > $1 LIMIT $2");
        let after = i64::try_from(position).unwrap_or(i64::MAX);
        let one_more = i64::try_from(limit).unwrap_or(i64::MAX).saturating_add(1);
        let ((version, checkpoint), rows) = match self {
            Self::Postgres(pool) => {
                let (checkpoint, rows) = retrying(pool, || async {
                    let mut transaction = pool.begin().await?;
                    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                        .execute(&mut *transaction)
                        .await?;
                    let checkpoint: Option<(i32, i64)> = sqlx::query_as(CHECKPOINT)
                        .bind(USERS_PROJECTION)
                        .fetch_optional(&mut *transaction)
                        .await?;
                    let rows = sqlx::query(&sql)
                        .bind(after)
                        .bind(one_more)
                        .fetch_all(&mut *transaction)
                        .await?;
                    transaction.commit().await?;
                    Ok((checkpoint, rows))
                })
                .await?;
                let rows = rows
                    .iter()
                    .map(pg_profile_row)
                    .collect::<Result<Vec<_>, _>>()?;
                (to_checkpoint(checkpoint), rows)
            }
            Self::Sqlite(pool) => {
                // A read transaction in WAL mode is one snapshot.
                let mut transaction = pool.begin().await?;
                let checkpoint: Option<(i32, i64)> = sqlx::query_as(CHECKPOINT)
                    .bind(USERS_PROJECTION)
                    .fetch_optional(&mut *transaction)
                    .await?;
                let rows = sqlx::query(&sql)
                    .bind(after)
                    .bind(one_more)
                    .fetch_all(&mut *transaction)
                    .await?;
                transaction.commit().await?;
                let rows = rows
                    .iter()
                    .map(sqlite_profile_row)
                    .collect::<Result<Vec<_>, _>>()?;
                (to_checkpoint(checkpoint), rows)
            }
        };
        let complete = rows.len() <= limit;
        Ok(ChangedRows {
            version,
            checkpoint,
            rows: if complete { rows } else { vec![] },
            complete,
        })
    }

    /// The accounts whose normalised email is `normalized` (one, unless the view lags behind
    /// a change of address).
    pub async fn by_email(&self, normalized: &str) -> Result<Vec<Profile>, sqlx::Error> {
        let sql = format!("SELECT {COLUMNS} FROM users WHERE email_normalized = $1 ORDER BY id");
        match self {
            Self::Postgres(pool) => {
                let rows =
                    retrying(pool, || sqlx::query(&sql).bind(normalized).fetch_all(pool)).await?;
                rows.iter().map(pg_profile).collect()
            }
            Self::Sqlite(pool) => {
                let rows = sqlx::query(&sql).bind(normalized).fetch_all(pool).await?;
                rows.iter().map(sqlite_profile).collect()
            }
        }
    }

    /// Up to `limit` accounts after `after` in id order, of one status or all.
    pub async fn list(
        &self,
        status: Option<&str>,
        after: Option<Uuid>,
        limit: u32,
    ) -> Result<Vec<Profile>, sqlx::Error> {
        let sql = format!(
            "SELECT {COLUMNS} FROM users \
             WHERE ($1 IS NULL OR status = $1) AND ($2 IS NULL OR id > $2) \
             ORDER BY id LIMIT $3"
        );
        match self {
            Self::Postgres(pool) => {
                let rows = retrying(pool, || {
                    sqlx::query(&sql)
                        .bind(status)
                        .bind(after)
                        .bind(i64::from(limit))
                        .fetch_all(pool)
                })
                .await?;
                rows.iter().map(pg_profile).collect()
            }
            Self::Sqlite(pool) => {
                let rows = sqlx::query(&sql)
                    .bind(status)
                    .bind(after.map(|id| id.to_string()))
                    .bind(i64::from(limit))
                    .fetch_all(pool)
                    .await?;
                rows.iter().map(sqlite_profile).collect()
            }
        }
    }

    /// The users view's projection version and checkpoint (0 and 0 before any).
    pub async fn checkpoint(&self) -> Result<(i32, u64), sqlx::Error> {
        let row: Option<(i32, i64)> = match self {
            Self::Postgres(pool) => {
                retrying(pool, || {
                    sqlx::query_as(CHECKPOINT)
                        .bind(USERS_PROJECTION)
                        .fetch_optional(pool)
                })
                .await?
            }
            Self::Sqlite(pool) => {
                sqlx::query_as(CHECKPOINT)
                    .bind(USERS_PROJECTION)
                    .fetch_optional(pool)
                    .await?
            }
        };
        Ok(to_checkpoint(row))
    }
}

/// Runs `read` again when its pooled connection had died in a database restart, as the
/// message store does ([`message_store::database::retrying_lost_connections`]).
async fn retrying<T, Reading, Fut>(pool: &PgPool, read: Reading) -> Result<T, sqlx::Error>
where
    Reading: FnMut() -> Fut,
    Fut: Future<Output = Result<T, sqlx::Error>>,
{
    message_store::database::retrying_lost_connections(pool.options().get_max_connections(), read)
        .await
}

fn pg_profile(row: &PgRow) -> Result<Profile, sqlx::Error> {
    Ok(Profile {
        id: row.try_get("id")?,
        email: row.try_get("email")?,
        status: row.try_get("status")?,
        registered_at: row.try_get("registered_at")?,
        activated_at: row.try_get("activated_at")?,
        deactivated_at: row.try_get("deactivated_at")?,
        last_login_at: row.try_get("last_login_at")?,
        login_count: u64::try_from(row.try_get::<i64, _>("login_count")?).unwrap_or(0),
        roles: row.try_get("roles")?,
    })
}

const CHECKPOINT: &str =
    "SELECT version, position FROM projection_checkpoints WHERE projection = $1";

fn to_checkpoint(row: Option<(i32, i64)>) -> (i32, u64) {
    row.map_or((0, 0), |(version, position)| {
        (version, to_position(Some(position)))
    })
}

fn to_position(position: Option<i64>) -> u64 {
    position.map_or(0, |position| u64::try_from(position).unwrap_or(0))
}

fn pg_profile_row(row: &PgRow) -> Result<ProfileRow, sqlx::Error> {
    Ok(ProfileRow {
        profile: pg_profile(row)?,
        position: u64::try_from(row.try_get::<i64, _>("position")?).unwrap_or(0),
    })
}

fn sqlite_profile_row(row: &SqliteRow) -> Result<ProfileRow, sqlx::Error> {
    Ok(ProfileRow {
        profile: sqlite_profile(row)?,
        position: u64::try_from(row.try_get::<i64, _>("position")?).unwrap_or(0),
    })
}

fn sqlite_profile(row: &SqliteRow) -> Result<Profile, sqlx::Error> {
    let id: String = row.try_get("id")?;
    let roles: String = row.try_get("roles")?;
    Ok(Profile {
        id: Uuid::parse_str(&id).map_err(|error| sqlx::Error::Decode(Box::new(error)))?,
        email: row.try_get("email")?,
        status: row.try_get("status")?,
        registered_at: row.try_get("registered_at")?,
        activated_at: row.try_get("activated_at")?,
        deactivated_at: row.try_get("deactivated_at")?,
        last_login_at: row.try_get("last_login_at")?,
        login_count: u64::try_from(row.try_get::<i64, _>("login_count")?).unwrap_or(0),
        roles: serde_json::from_str(&roles)
            .map_err(|error| sqlx::Error::Decode(Box::new(error)))?,
    })
}
