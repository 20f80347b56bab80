//! The PostgreSQL adapter: the vault for deployments, in the message store's database.
//!
//! Every call is one or two autocommit statements, except a rewrap batch. A key is made with
//! `INSERT ... ON CONFLICT DO NOTHING`, so of two first writers one inserts and the other reads
//! the winner's row; an erasure turns the row into a tombstone the same way, so a writer racing
//! it either made its key first (and the erasure deletes it) or finds the tombstone.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use message_store::postgres::Reconnect;
use sqlx::postgres::PgPool;
use uuid::Uuid;

use crate::{
    KeyCounts, KeyVault, MasterKeys, PersonKey, REWRAP_BATCH, StoredKey, VaultError, key_counts,
};

/// The vault on PostgreSQL.
#[derive(Clone)]
pub struct PostgresKeyVault {
    pool: PgPool,
    /// Replaces the pool's connections once its server answers as read-only (a failover), as
    /// the message store's does.
    reconnect: Arc<Reconnect>,
    master_keys: Arc<MasterKeys>,
}

impl PostgresKeyVault {
    /// A vault on `pool`, whose database has the vault's migrations applied
    /// ([`Self::migrate`]).
    pub fn new(pool: PgPool, master_keys: MasterKeys) -> Self {
        Self::with_reconnect(pool, master_keys, Arc::default())
    }

    fn with_reconnect(pool: PgPool, master_keys: MasterKeys, reconnect: Arc<Reconnect>) -> Self {
        Self {
            pool,
            reconnect,
            master_keys: Arc::new(master_keys),
        }
    }

    /// Connects a pool of `max_connections` to `url` as the message store does (its connection
    /// settings, no ping before each use: a call that meets a connection that died in the pool
    /// runs again on another, and one that meets a server a failover made read-only replaces
    /// every connection), applies the migrations and opens the vault.
    pub async fn connect(
        url: &str,
        master_keys: MasterKeys,
        max_connections: u32,
    ) -> Result<Self, VaultError> {
        let reconnect = Arc::new(Reconnect::default());
        let pool = reconnect
            .pool_options(max_connections)
            .connect_with(message_store::postgres::connect_options(url)?)
            .await?;
        Self::migrate(&pool).await?;
        Ok(Self::with_reconnect(pool, master_keys, reconnect))
    }

    /// Creates or updates the vault's table. Applying it again changes nothing.
    pub async fn migrate(pool: &PgPool) -> Result<(), VaultError> {
        let mut migrator = sqlx::migrate!("../../migrations/personal_keys/postgres");
        // The message store and the read model keep their migrations in the same table.
        migrator.set_ignore_missing(true);
        migrator.run(pool).await?;
        Ok(())
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Runs `call` again when its pooled connection had died (a database restart leaves every
    /// idle one dead). Every call here is safe to repeat: a repeated key creation finds the row
    /// the first one wrote.
    async fn retrying<T, Call, Fut>(&self, call: Call) -> Result<T, VaultError>
    where
        Call: FnMut() -> Fut,
        Fut: Future<Output = Result<T, VaultError>>,
    {
        self.reconnect
            .retrying(&self.pool, "the key vault", call)
            .await
    }

    async fn stored(&self, person: Uuid) -> Result<Option<StoredKey>, VaultError> {
        let row: Option<(Option<Vec<u8>>, Option<String>)> = sqlx::query_as(
            "SELECT wrapped_key, master_key_id FROM personal_keys WHERE person_id = $1",
        )
        .bind(person)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|(wrapped, master_key_id)| {
            StoredKey::from_columns(&person.to_string(), wrapped, master_key_id)
        })
        .transpose()
    }

    async fn key_for_writing_once(&self, person: Uuid) -> Result<PersonKey, VaultError> {
        if let Some(stored) = self.stored(person).await? {
            return stored.open(person, &self.master_keys);
        }
        let key = PersonKey::generate()?;
        let current = self.master_keys.current();
        loop {
            let inserted = sqlx::query(
                "INSERT INTO personal_keys (person_id, wrapped_key, master_key_id) \
                 VALUES ($1, $2, $3) ON CONFLICT (person_id) DO NOTHING",
            )
            .bind(person)
            .bind(current.wrap(person, &key))
            .bind(current.id())
            .execute(&self.pool)
            .await?
            .rows_affected();
            if inserted == 1 {
                return Ok(key);
            }
            // Another writer made the person's key first, or an erasure left its tombstone:
            // theirs is the row that counts. Rows are never deleted, so it is there to read.
            if let Some(stored) = self.stored(person).await? {
                return stored.open(person, &self.master_keys);
            }
        }
    }

    async fn erase_once(&self, person: Uuid) -> Result<bool, VaultError> {
        let tombstone_written = sqlx::query(
            "INSERT INTO personal_keys (person_id, erased_at) VALUES ($1, now()) \
             ON CONFLICT (person_id) DO NOTHING",
        )
        .bind(person)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if tombstone_written == 1 {
            return Ok(false);
        }
        let key_deleted = sqlx::query(
            "UPDATE personal_keys SET wrapped_key = NULL, master_key_id = NULL, erased_at = now() \
             WHERE person_id = $1 AND erased_at IS NULL",
        )
        .bind(person)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(key_deleted == 1)
    }

    /// Rewraps up to [`REWRAP_BATCH`] keys in one transaction, their rows locked from reading
    /// to writing, and returns how many.
    async fn rewrap_batch(&self) -> Result<u64, VaultError> {
        let current = self.master_keys.current();
        let mut transaction = self.pool.begin().await?;
        let rows: Vec<(Uuid, Vec<u8>, String)> = sqlx::query_as(
            "SELECT person_id, wrapped_key, master_key_id FROM personal_keys \
             WHERE master_key_id <> $1 ORDER BY person_id LIMIT $2 FOR UPDATE",
        )
        .bind(current.id())
        .bind(i64::try_from(REWRAP_BATCH).unwrap_or(i64::MAX))
        .fetch_all(&mut *transaction)
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut persons = Vec::with_capacity(rows.len());
        let mut rewrapped = Vec::with_capacity(rows.len());
        for (person, wrapped, master_key_id) in rows {
            let key = self.master_keys.unwrap(person, &master_key_id, &wrapped)?;
            rewrapped.push(current.wrap(person, &key));
            persons.push(person);
        }
        let updated = sqlx::query(
            "UPDATE personal_keys AS stored SET wrapped_key = new.wrapped_key, master_key_id = $3 \
             FROM unnest($1::uuid[], $2::bytea[]) AS new(person_id, wrapped_key) \
             WHERE stored.person_id = new.person_id",
        )
        .bind(&persons)
        .bind(&rewrapped)
        .bind(current.id())
        .execute(&mut *transaction)
        .await?
        .rows_affected();
        transaction.commit().await?;
        Ok(updated)
    }
}

#[async_trait]
impl KeyVault for PostgresKeyVault {
    async fn key_for_writing(&self, person: Uuid) -> Result<PersonKey, VaultError> {
        self.retrying(|| self.key_for_writing_once(person)).await
    }

    async fn keys(&self, persons: &[Uuid]) -> Result<HashMap<Uuid, PersonKey>, VaultError> {
        if persons.is_empty() {
            return Ok(HashMap::new());
        }
        let rows: Vec<(Uuid, Vec<u8>, String)> = self
            .retrying(|| async {
                Ok(sqlx::query_as(
                    "SELECT person_id, wrapped_key, master_key_id FROM personal_keys \
                     WHERE person_id = ANY($1) AND wrapped_key IS NOT NULL",
                )
                .bind(persons)
                .fetch_all(&self.pool)
                .await?)
            })
            .await?;
        rows.into_iter()
            .map(|(person, wrapped, master_key_id)| {
                let key = self.master_keys.unwrap(person, &master_key_id, &wrapped)?;
                Ok((person, key))
            })
            .collect()
    }

    async fn erase(&self, person: Uuid) -> Result<bool, VaultError> {
        self.retrying(|| self.erase_once(person)).await
    }

    async fn is_erased(&self, person: Uuid) -> Result<bool, VaultError> {
        self.retrying(|| async {
            let erased: Option<bool> = sqlx::query_scalar(
                "SELECT erased_at IS NOT NULL FROM personal_keys WHERE person_id = $1",
            )
            .bind(person)
            .fetch_optional(&self.pool)
            .await?;
            Ok(erased.unwrap_or(false))
        })
        .await
    }

    async fn rewrap(&self) -> Result<u64, VaultError> {
        let mut total = 0;
        loop {
            let rewrapped = self.retrying(|| self.rewrap_batch()).await?;
            if rewrapped == 0 {
                return Ok(total);
            }
            total += rewrapped;
        }
    }

    async fn count_by_master_key(&self) -> Result<KeyCounts, VaultError> {
        let rows: Vec<(Option<String>, i64)> = self
            .retrying(|| async {
                Ok(sqlx::query_as(
                    "SELECT master_key_id, count(*) FROM personal_keys GROUP BY master_key_id",
                )
                .fetch_all(&self.pool)
                .await?)
            })
            .await?;
        Ok(key_counts(rows))
    }

    async fn ping(&self) -> Result<(), VaultError> {
        self.retrying(|| async {
            sqlx::query("SELECT 1").execute(&self.pool).await?;
            Ok(())
        })
        .await
    }
}
