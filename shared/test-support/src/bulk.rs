//! Many user events at once, written straight into the message store's table for benchmarks
//! and tests that need a store a rebuild takes a while over.
//!
//! The events are the identity crate's own, encoded as the command side encodes them (type,
//! data and version from the event), and their positions come from the store's own
//! `message_store_position_base()`: a change to either reaches these rows too.
//!
//! [`write_sealed_user_events`] writes them as the command side does since ADR 13, each
//! personal field sealed with its account's key from a real vault, so that a benchmark can set a
//! rebuild of a sealed store beside one of a store written in clear.

use std::collections::HashMap;

use anyhow::Context;
use chrono::{DateTime, TimeZone, Utc};
use identity::{
    AccountStatus, EVENT_VERSION_KEY, Email, LoginEvent, LoginSucceeded, PasswordHash, Role,
    UserEvent, UserId, UserRegistered, login_stream_name, user_stream_name,
};
use personal_data::{PersonKey, Sealer, seal_fields};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::task::JoinSet;
use uuid::Uuid;

/// Messages per INSERT: each is one transaction, and a transaction's messages share its id in
/// the upper bits of their positions, with 16 bits for the index (docs/adr/0002).
const CHUNK: usize = 50_000;

/// Writes up to [`CHUNK`] messages in one transaction, at positions drawn the store's way.
const INSERT: &str = "
INSERT INTO messages (global_position, id, stream_name, category, position, type, data, metadata)
SELECT message_store_position_base() + r.ordinal - 1, gen_random_uuid(), r.stream,
       r.category, r.position, r.type, r.data, r.metadata
  FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::jsonb[], $6::jsonb[])
       WITH ORDINALITY AS r(stream, category, position, type, data, metadata, ordinal)";

/// A well-formed Argon2id hash of a password nobody logs in with: for accounts that are only
/// written, projected and read, never logged in to.
pub const PASSWORD_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$RdescudvJCsgt3ub+b+dWRWJTmaaJObG";

/// What [`write_user_events`] writes.
pub struct BulkUsers<'a> {
    /// Makes these accounts' emails differ from other runs' (their ids are new every time).
    pub seed: &'a str,
    pub users: i64,
    /// Rounds of successful logins after the registrations.
    pub login_rounds: i64,
    /// After the first round, every third account logs in no more (histories of unequal length).
    pub uneven_logins: bool,
    /// The stored hash of every account.
    pub password_hash: &'a str,
}

/// Registrations (every other account active), then rounds of logins, every field in clear.
/// Returns how many messages it wrote.
pub async fn write_user_events(pool: &PgPool, bulk: &BulkUsers<'_>) -> anyhow::Result<i64> {
    write(pool, bulk, None).await
}

/// [`write_user_events`], each registration's personal fields sealed with its account's key
/// from `sealer`'s vault (made for each account here, as a command would make it), as the
/// command side writes them.
pub async fn write_sealed_user_events(
    pool: &PgPool,
    bulk: &BulkUsers<'_>,
    sealer: &Sealer,
) -> anyhow::Result<i64> {
    write(pool, bulk, Some(sealer)).await
}

/// How many accounts' keys are made at once, each a round trip to the vault.
const KEYS_AT_ONCE: usize = 16;

/// The keys of `accounts`, made in `KEYS_AT_ONCE` concurrent streams.
async fn keys_of(sealer: &Sealer, accounts: &[UserId]) -> anyhow::Result<HashMap<Uuid, PersonKey>> {
    let mut tasks = JoinSet::new();
    let per_task = accounts.len().div_ceil(KEYS_AT_ONCE).max(1);
    for part in accounts.chunks(per_task) {
        let (sealer, part) = (sealer.clone(), part.to_vec());
        tasks.spawn(async move {
            let mut keys = Vec::with_capacity(part.len());
            for id in part {
                let person = *id.as_uuid();
                keys.push((person, sealer.key_for_writing(person).await?));
            }
            Ok::<_, personal_data::VaultError>(keys)
        });
    }
    let mut keys = HashMap::with_capacity(accounts.len());
    while let Some(made) = tasks.join_next().await {
        keys.extend(
            made.context("a task making keys")?
                .context("making a key")?,
        );
    }
    Ok(keys)
}

async fn write(
    pool: &PgPool,
    bulk: &BulkUsers<'_>,
    sealer: Option<&Sealer>,
) -> anyhow::Result<i64> {
    let hash = PasswordHash::parse(bulk.password_hash).context("the bulk accounts' hash")?;
    let registered_at = at(Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0))?;
    let users: Vec<(UserId, usize)> = (0..usize::try_from(bulk.users)?)
        .map(|n| (UserId::from(Uuid::now_v7()), n))
        .collect();
    let mut written = 0;
    for chunk in users.chunks(CHUNK) {
        let keys = match sealer {
            Some(sealer) => {
                let ids: Vec<UserId> = chunk.iter().map(|(id, _)| *id).collect();
                keys_of(sealer, &ids).await?
            }
            None => HashMap::new(),
        };
        let mut rows = Rows::default();
        for (id, n) in chunk {
            let email = Email::parse(&format!("{}{n}@Example.com", bulk.seed))
                .context("a bulk account's email")?;
            let event = UserEvent::UserRegistered(UserRegistered {
                user_id: *id,
                email_normalized: email.normalized().into(),
                email: email.into(),
                password_hash: hash.clone().into(),
                status: if n % 2 == 0 {
                    AccountStatus::Active
                } else {
                    AccountStatus::Pending
                },
                roles: vec![Role::User],
                registered_at,
            });
            let mut data = event.to_json();
            if let Some(key) = keys.get(id.as_uuid()) {
                seal_fields(key, *id.as_uuid(), &mut data, event.personal_fields());
            }
            rows.push(
                user_stream_name(*id),
                0,
                event.event_type(),
                data,
                event.version(),
            );
        }
        written += rows.insert(pool).await?;
    }
    for round in 1..=u64::try_from(bulk.login_rounds)? {
        let logged_in_at = at(Utc.with_ymd_and_hms(2026, 1, 2, 0, (round % 60) as u32, 0))?;
        for chunk in users.chunks(CHUNK) {
            let mut rows = Rows::default();
            for (id, n) in chunk {
                if bulk.uneven_logins && round > 1 && n % 3 == 0 {
                    continue;
                }
                let event = LoginEvent::LoginSucceeded(LoginSucceeded {
                    at: logged_in_at,
                    login_count: round,
                });
                rows.push(
                    login_stream_name(*id),
                    i64::try_from(round)? - 1,
                    event.event_type(),
                    event.to_json(),
                    event.version(),
                );
            }
            written += rows.insert(pool).await?;
        }
    }
    sqlx::query("ANALYZE messages").execute(pool).await?;
    Ok(written)
}

fn at(instant: chrono::LocalResult<DateTime<Utc>>) -> anyhow::Result<DateTime<Utc>> {
    instant.single().context("a fixed instant")
}

/// One INSERT's messages, as parallel arrays.
#[derive(Default)]
struct Rows {
    streams: Vec<String>,
    categories: Vec<String>,
    positions: Vec<i64>,
    types: Vec<&'static str>,
    data: Vec<Value>,
    metadata: Vec<Value>,
}

impl Rows {
    fn push(
        &mut self,
        stream: String,
        position: i64,
        kind: &'static str,
        data: Value,
        version: u32,
    ) {
        let category = message_store::StreamName::parse(stream.as_str())
            .map(|name| name.category().to_owned())
            .unwrap_or_default();
        self.categories.push(category);
        self.streams.push(stream);
        self.positions.push(position);
        self.types.push(kind);
        self.data.push(data);
        self.metadata.push(json!({ EVENT_VERSION_KEY: version }));
    }

    async fn insert(self, pool: &PgPool) -> anyhow::Result<i64> {
        if self.streams.is_empty() {
            return Ok(0);
        }
        let written = sqlx::query(INSERT)
            .bind(&self.streams)
            .bind(&self.categories)
            .bind(&self.positions)
            .bind(&self.types)
            .bind(&self.data)
            .bind(&self.metadata)
            .execute(pool)
            .await?
            .rows_affected();
        Ok(i64::try_from(written)?)
    }
}
