//! What webhook delivery keeps in the read model: every attempt in `webhook_attempts` (the
//! newest `webhooks.attempts_kept` per endpoint, and the first failure since its last success),
//! and its endpoints' checkpoints in `projection_checkpoints`, created at the registration's
//! position rather than at 0.
//!
//! Each statement is written once for both engines; only the binding of ids, times and flags
//! differs (PostgreSQL's uuid, timestamptz and boolean are SQLite's text and integer: see the
//! SQLite migration).

use chrono::{DateTime, SecondsFormat, Utc};
use read_model_schema::{on_either_pool, signed, unsigned};
use sqlx::Row;
use uuid::Uuid;

use crate::read_model::{Checkpoint, ReadModelWriter};

/// One attempt to deliver one event, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub webhook_id: Uuid,
    /// The event's id, its `webhook-id`: the stored message's id.
    pub message_id: Uuid,
    pub event_type: String,
    pub position: u64,
    pub attempted_at: DateTime<Utc>,
    pub latency_ms: i32,
    /// The receiver's status code; `None` when it gave none (refused, timed out, or an address
    /// the network policy forbids: nothing was sent).
    pub status_code: Option<i32>,
    /// What went wrong, in a few words, without the URL.
    pub error: Option<String>,
    pub delivered: bool,
}

/// An attempt as stored, with its number among the attempts of its event (1 for the first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedAttempt {
    pub attempt: i32,
    pub recorded: Attempt,
}

/// The first failed attempt since the endpoint's last success, made at or after
/// `not_before`: the time it has been failing since. The row is kept by the pruning of
/// [`record`], so the time survives restarts.
const FAILING_SINCE: &str = "SELECT MIN(attempted_at) FROM webhook_attempts \
     WHERE webhook_id = $1 AND NOT delivered AND attempted_at >= $2 \
       AND id > COALESCE((SELECT MAX(id) FROM webhook_attempts \
                          WHERE webhook_id = $1 AND delivered), 0)";

/// Records `attempt`, numbered after the event's earlier attempts, and prunes the endpoint's
/// attempts to the newest `keep`, keeping also the first failure since its last success (what
/// its failing time is measured from, [`failing_since`]).
pub async fn record(
    read_model: &ReadModelWriter,
    attempt: &Attempt,
    keep: u32,
) -> Result<(), sqlx::Error> {
    let insert = "INSERT INTO webhook_attempts (webhook_id, message_id, event_type, position, \
                  attempt, attempted_at, latency_ms, status_code, error, delivered) \
                  VALUES ($1, $2, $3, $4, \
                      (SELECT COALESCE(MAX(attempt), 0) + 1 FROM webhook_attempts \
                       WHERE webhook_id = $1 AND message_id = $2), \
                      $5, $6, $7, $8, $9)";
    let prune = "DELETE FROM webhook_attempts WHERE webhook_id = $1 \
                 AND id <= (SELECT id FROM webhook_attempts WHERE webhook_id = $1 \
                            ORDER BY id DESC LIMIT 1 OFFSET $2) \
                 AND id <> COALESCE((SELECT MIN(id) FROM webhook_attempts \
                     WHERE webhook_id = $1 AND NOT delivered \
                       AND id > COALESCE((SELECT MAX(id) FROM webhook_attempts \
                                          WHERE webhook_id = $1 AND delivered), 0)), 0)";
    let keep = i64::from(keep.max(1));
    match read_model {
        ReadModelWriter::Postgres(pool) => {
            sqlx::query(insert)
                .bind(attempt.webhook_id)
                .bind(attempt.message_id)
                .bind(&attempt.event_type)
                .bind(signed(attempt.position))
                .bind(attempt.attempted_at)
                .bind(attempt.latency_ms)
                .bind(attempt.status_code)
                .bind(&attempt.error)
                .bind(attempt.delivered)
                .execute(pool)
                .await?;
            sqlx::query(prune)
                .bind(attempt.webhook_id)
                .bind(keep)
                .execute(pool)
                .await?;
        }
        ReadModelWriter::Sqlite(pool) => {
            sqlx::query(insert)
                .bind(sqlite_id(attempt.webhook_id))
                .bind(sqlite_id(attempt.message_id))
                .bind(&attempt.event_type)
                .bind(signed(attempt.position))
                .bind(sqlite_time(attempt.attempted_at))
                .bind(attempt.latency_ms)
                .bind(attempt.status_code)
                .bind(&attempt.error)
                .bind(attempt.delivered)
                .execute(pool)
                .await?;
            sqlx::query(prune)
                .bind(sqlite_id(attempt.webhook_id))
                .bind(keep)
                .execute(pool)
                .await?;
        }
    }
    Ok(())
}

/// Since when endpoint `webhook` has failed without a success, counting only attempts made at
/// or after `not_before` (when it was last enabled: an enable starts the count afresh). `None`
/// when its last attempt succeeded, or it has made none since.
pub async fn failing_since(
    read_model: &ReadModelWriter,
    webhook: Uuid,
    not_before: DateTime<Utc>,
) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    match read_model {
        ReadModelWriter::Postgres(pool) => {
            sqlx::query_scalar(FAILING_SINCE)
                .bind(webhook)
                .bind(not_before)
                .fetch_one(pool)
                .await
        }
        ReadModelWriter::Sqlite(pool) => {
            let since: Option<String> = sqlx::query_scalar(FAILING_SINCE)
                .bind(sqlite_id(webhook))
                .bind(sqlite_time(not_before))
                .fetch_one(pool)
                .await?;
            since.map(parse_sqlite_time).transpose()
        }
    }
}

/// The attempts kept for endpoint `webhook`, newest first.
pub async fn attempts(
    read_model: &ReadModelWriter,
    webhook: Uuid,
) -> Result<Vec<RecordedAttempt>, sqlx::Error> {
    let select = "SELECT webhook_id, message_id, event_type, position, attempt, attempted_at, \
                  latency_ms, status_code, error, delivered FROM webhook_attempts \
                  WHERE webhook_id = $1 ORDER BY id DESC";
    match read_model {
        ReadModelWriter::Postgres(pool) => {
            let rows = sqlx::query(select).bind(webhook).fetch_all(pool).await?;
            rows.iter()
                .map(|row| {
                    Ok(RecordedAttempt {
                        attempt: row.try_get("attempt")?,
                        recorded: Attempt {
                            webhook_id: row.try_get("webhook_id")?,
                            message_id: row.try_get("message_id")?,
                            event_type: row.try_get("event_type")?,
                            position: unsigned(row.try_get("position")?),
                            attempted_at: row.try_get("attempted_at")?,
                            latency_ms: row.try_get("latency_ms")?,
                            status_code: row.try_get("status_code")?,
                            error: row.try_get("error")?,
                            delivered: row.try_get("delivered")?,
                        },
                    })
                })
                .collect()
        }
        ReadModelWriter::Sqlite(pool) => {
            let rows = sqlx::query(select)
                .bind(sqlite_id(webhook))
                .fetch_all(pool)
                .await?;
            rows.iter()
                .map(|row| {
                    Ok(RecordedAttempt {
                        attempt: row.try_get("attempt")?,
                        recorded: Attempt {
                            webhook_id: parse_sqlite_id(row.try_get("webhook_id")?)?,
                            message_id: parse_sqlite_id(row.try_get("message_id")?)?,
                            event_type: row.try_get("event_type")?,
                            position: unsigned(row.try_get("position")?),
                            attempted_at: parse_sqlite_time(row.try_get("attempted_at")?)?,
                            latency_ms: row.try_get("latency_ms")?,
                            status_code: row.try_get("status_code")?,
                            error: row.try_get("error")?,
                            delivered: row.try_get("delivered")?,
                        },
                    })
                })
                .collect()
        }
    }
}

/// The checkpoint of consumer `name`, created at `position` (at `version`) if it has none: an
/// endpoint's consumer starts after its registration, once; later starts find the stored one.
pub async fn ensure_checkpoint_at(
    read_model: &ReadModelWriter,
    name: &str,
    version: i32,
    position: u64,
) -> Result<Checkpoint, sqlx::Error> {
    let insert = "INSERT INTO projection_checkpoints (projection, version, position) \
                  VALUES ($1, $2, $3) ON CONFLICT (projection) DO NOTHING";
    on_either_pool!(ReadModelWriter, read_model, |pool| sqlx::query(insert)
        .bind(name)
        .bind(version)
        .bind(signed(position))
        .execute(pool)
        .await
        .map(drop))?;
    read_model
        .checkpoint(name)
        .await?
        .ok_or(sqlx::Error::RowNotFound)
}

/// Sets the checkpoint of consumer `name` to `position` at `version` (creating it if there is
/// none), keeping its epoch: the worker holding it notices and goes on from there.
pub async fn set_checkpoint(
    read_model: &ReadModelWriter,
    name: &str,
    version: i32,
    position: u64,
) -> Result<(), sqlx::Error> {
    let upsert = "INSERT INTO projection_checkpoints (projection, version, position) \
                  VALUES ($1, $2, $3) ON CONFLICT (projection) DO UPDATE \
                  SET version = excluded.version, position = excluded.position";
    on_either_pool!(ReadModelWriter, read_model, |pool| sqlx::query(upsert)
        .bind(name)
        .bind(version)
        .bind(signed(position))
        .execute(pool)
        .await
        .map(drop))
}

fn sqlite_id(id: Uuid) -> String {
    id.hyphenated().to_string()
}

fn parse_sqlite_id(text: String) -> Result<Uuid, sqlx::Error> {
    Uuid::parse_str(&text).map_err(|error| sqlx::Error::Decode(Box::new(error)))
}

/// As the read model's other SQLite times: RFC 3339 with microseconds, so they sort as text.
fn sqlite_time(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn parse_sqlite_time(text: String) -> Result<DateTime<Utc>, sqlx::Error> {
    DateTime::parse_from_rfc3339(&text)
        .map(|time| time.with_timezone(&Utc))
        .map_err(|error| sqlx::Error::Decode(Box::new(error)))
}
