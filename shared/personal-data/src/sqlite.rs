//! The SQLite adapter: the vault in the embedded default's file, beside the message store.
//!
//! SQLite has one writer at a time, so every write goes through one connection in an IMMEDIATE
//! transaction, which takes the file's write lock first (waiting for the message store's writer
//! under the busy timeout): a key is made, or a person erased, by reading and writing under that
//! lock, and no two writers can race. Reads go through read-only connections that WAL lets run
//! beside the writer.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqlitePool, SqlitePoolOptions};
use sqlx::{Connection, Row};
use uuid::Uuid;

use crate::{
    KeyCounts, KeyVault, MasterKeys, PersonKey, REWRAP_BATCH, StoredKey, VaultError, key_counts,
};

/// The vault in an SQLite file.
#[derive(Clone)]
pub struct SqliteKeyVault {
    /// One connection: queueing here is cheaper than retrying on SQLITE_BUSY.
    writer: SqlitePool,
    readers: SqlitePool,
    master_keys: Arc<MasterKeys>,
}

/// The message store's settings for the file (WAL, full synchronous, the busy timeout, and
/// `secure_delete`: an erased key's bytes are overwritten in the table's pages rather than left
/// in free space).
fn writer_options(path: &Path) -> SqliteConnectOptions {
    message_store::sqlite::connect_options(path)
}

/// The writer's pool on the file a `sqlite://path` URL names.
pub(crate) async fn writer_pool(url: &str) -> Result<SqlitePool, VaultError> {
    let options = SqliteConnectOptions::from_str(url)?;
    Ok(SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(writer_options(options.get_filename()))
        .await?)
}

impl SqliteKeyVault {
    /// Opens (creating if needed) the vault in the file at `path`, with up to `max_readers`
    /// reading connections, and applies its migrations.
    pub async fn open(
        path: &Path,
        master_keys: MasterKeys,
        max_readers: u32,
    ) -> Result<Self, VaultError> {
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(writer_options(path))
            .await?;
        Self::migrate(&writer).await?;
        let readers = SqlitePoolOptions::new()
            .max_connections(max_readers.max(1))
            .connect_with(message_store::sqlite::connect_options(path).read_only(true))
            .await?;
        Ok(Self {
            writer,
            readers,
            master_keys: Arc::new(master_keys),
        })
    }

    /// Opens the vault at a `sqlite://path` URL.
    pub async fn open_url(
        url: &str,
        master_keys: MasterKeys,
        max_readers: u32,
    ) -> Result<Self, VaultError> {
        let options = SqliteConnectOptions::from_str(url)?;
        Self::open(options.get_filename(), master_keys, max_readers).await
    }

    /// Creates or updates the vault's table. Applying it again changes nothing.
    pub async fn migrate(pool: &SqlitePool) -> Result<(), VaultError> {
        let mut migrator = sqlx::migrate!("../../migrations/personal_keys/sqlite");
        // The message store and the read model keep their migrations in the same table.
        migrator.set_ignore_missing(true);
        migrator.run(pool).await?;
        Ok(())
    }

    /// Runs `write` in one IMMEDIATE transaction on the writer, committing when it succeeds.
    async fn write<T>(
        &self,
        write: impl AsyncFnOnce(&mut SqliteConnection) -> Result<T, VaultError>,
    ) -> Result<T, VaultError> {
        let mut connection = self.writer.acquire().await?;
        let mut transaction = connection.begin_with("BEGIN IMMEDIATE").await?;
        let outcome = write(&mut transaction).await?;
        transaction.commit().await?;
        Ok(outcome)
    }
}

/// The row of `person`, if there is one.
async fn stored(
    connection: &mut SqliteConnection,
    person: Uuid,
) -> Result<Option<StoredKey>, VaultError> {
    let row: Option<(Option<Vec<u8>>, Option<String>)> =
        sqlx::query_as("SELECT wrapped_key, master_key_id FROM personal_keys WHERE person_id = ?")
            .bind(person.to_string())
            .fetch_optional(connection)
            .await?;
    row.map(|(wrapped, master_key_id)| {
        StoredKey::from_columns(&person.to_string(), wrapped, master_key_id)
    })
    .transpose()
}

/// A person id as stored: hyphenated UUID text.
fn stored_person(text: &str) -> Result<Uuid, VaultError> {
    Uuid::parse_str(text).map_err(|_| VaultError::Corrupt {
        person: text.to_owned(),
        reason: "its person id is not a UUID",
    })
}

#[async_trait]
impl KeyVault for SqliteKeyVault {
    async fn key_for_writing(&self, person: Uuid) -> Result<PersonKey, VaultError> {
        let mut reader = self.readers.acquire().await?;
        if let Some(stored) = stored(&mut reader, person).await? {
            return stored.open(person, &self.master_keys);
        }
        drop(reader);
        self.write(async |connection| {
            // Made by another writer since the read above, or erased: under the write lock now.
            if let Some(stored) = stored(connection, person).await? {
                return stored.open(person, &self.master_keys);
            }
            let key = PersonKey::generate()?;
            let current = self.master_keys.current();
            sqlx::query(
                "INSERT INTO personal_keys (person_id, wrapped_key, master_key_id) \
                 VALUES (?, ?, ?)",
            )
            .bind(person.to_string())
            .bind(current.wrap(person, &key))
            .bind(current.id())
            .execute(connection)
            .await?;
            Ok(key)
        })
        .await
    }

    async fn keys(&self, persons: &[Uuid]) -> Result<HashMap<Uuid, PersonKey>, VaultError> {
        if persons.is_empty() {
            return Ok(HashMap::new());
        }
        // One statement for any number of persons: the ids go in as one JSON array.
        let ids = serde_json::Value::from(
            persons
                .iter()
                .map(|person| person.to_string())
                .collect::<Vec<_>>(),
        );
        let rows: Vec<(String, Vec<u8>, String)> = sqlx::query_as(
            "SELECT person_id, wrapped_key, master_key_id FROM personal_keys \
             WHERE person_id IN (SELECT value FROM json_each(?)) AND wrapped_key IS NOT NULL",
        )
        .bind(ids.to_string())
        .fetch_all(&self.readers)
        .await?;
        rows.into_iter()
            .map(|(person, wrapped, master_key_id)| {
                let person = stored_person(&person)?;
                let key = self.master_keys.unwrap(person, &master_key_id, &wrapped)?;
                Ok((person, key))
            })
            .collect()
    }

    async fn erase(&self, person: Uuid) -> Result<bool, VaultError> {
        let had_key = self
            .write(async |connection| {
                let had_key = matches!(
                    stored(connection, person).await?,
                    Some(StoredKey::Wrapped { .. })
                );
                sqlx::query(
                    "INSERT INTO personal_keys (person_id, erased_at) \
                 VALUES (?1, strftime('%Y-%m-%dT%H:%M:%fZ', 'now')) \
                 ON CONFLICT (person_id) DO UPDATE SET wrapped_key = NULL, master_key_id = NULL, \
                     erased_at = coalesce(erased_at, excluded.erased_at)",
                )
                .bind(person.to_string())
                .execute(connection)
                .await?;
                Ok(had_key)
            })
            .await?;
        // The key's earlier page versions are in the write-ahead log until it is emptied (the
        // projection empties it again once the account's row is erased).
        if had_key && !message_store::sqlite::truncate_write_ahead_log(&self.writer).await? {
            tracing::warn!(
                "the write-ahead log is still read: the erased key's earlier pages stay in it \
                 until the next checkpoint"
            );
        }
        Ok(had_key)
    }

    async fn is_erased(&self, person: Uuid) -> Result<bool, VaultError> {
        let erased: Option<bool> = sqlx::query_scalar(
            "SELECT erased_at IS NOT NULL FROM personal_keys WHERE person_id = ?",
        )
        .bind(person.to_string())
        .fetch_optional(&self.readers)
        .await?;
        Ok(erased.unwrap_or(false))
    }

    async fn rewrap(&self) -> Result<u64, VaultError> {
        let current = self.master_keys.current();
        let mut total = 0;
        loop {
            let rewrapped = self
                .write(async |connection| {
                    let rows = sqlx::query(
                        "SELECT person_id, wrapped_key, master_key_id FROM personal_keys \
                         WHERE master_key_id <> ? ORDER BY person_id LIMIT ?",
                    )
                    .bind(current.id())
                    .bind(i64::try_from(REWRAP_BATCH).unwrap_or(i64::MAX))
                    .fetch_all(&mut *connection)
                    .await?;
                    for row in &rows {
                        let person = stored_person(row.try_get("person_id")?)?;
                        let key = self.master_keys.unwrap(
                            person,
                            row.try_get("master_key_id")?,
                            row.try_get("wrapped_key")?,
                        )?;
                        sqlx::query(
                            "UPDATE personal_keys SET wrapped_key = ?, master_key_id = ? \
                             WHERE person_id = ?",
                        )
                        .bind(current.wrap(person, &key))
                        .bind(current.id())
                        .bind(person.to_string())
                        .execute(&mut *connection)
                        .await?;
                    }
                    Ok(rows.len() as u64)
                })
                .await?;
            if rewrapped == 0 {
                return Ok(total);
            }
            total += rewrapped;
        }
    }

    async fn count_by_master_key(&self) -> Result<KeyCounts, VaultError> {
        let rows: Vec<(Option<String>, i64)> = sqlx::query_as(
            "SELECT master_key_id, count(*) FROM personal_keys GROUP BY master_key_id",
        )
        .fetch_all(&self.readers)
        .await?;
        Ok(key_counts(rows))
    }

    async fn ping(&self) -> Result<(), VaultError> {
        sqlx::query("SELECT 1").execute(&self.readers).await?;
        Ok(())
    }
}
