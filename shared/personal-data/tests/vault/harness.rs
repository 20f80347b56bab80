//! One way per adapter to get a fresh database for the vault, to open vaults on it with given
//! master keys, and to read what it stores as a dump would.

use std::sync::Arc;

use async_trait::async_trait;
use personal_data::{KeyVault, MasterKeys};
use test_support::TestDatabase;

#[async_trait]
pub trait Harness: Send + Sync {
    /// The database's URL, as the services are configured with it.
    fn url(&self) -> String;

    /// Every byte the database holds of the vault's table, as a copy of the database would.
    async fn stored_bytes(&self) -> Vec<u8>;

    /// A vault on the database, opened as the services open it.
    async fn vault(&self, master_keys: &MasterKeys) -> Arc<dyn KeyVault> {
        personal_data::connect(&self.url(), master_keys.clone(), 4)
            .await
            .unwrap()
    }
}

pub struct Postgres {
    pub database: TestDatabase,
}

impl Postgres {
    pub async fn new() -> Self {
        Self {
            database: TestDatabase::new().await,
        }
    }
}

#[async_trait]
impl Harness for Postgres {
    fn url(&self) -> String {
        self.database.url().to_owned()
    }

    /// Each row as text (what `pg_dump` writes: bytea in hex), then its wrapped key's raw bytes.
    async fn stored_bytes(&self) -> Vec<u8> {
        let pool = self.database.pool().await;
        let rows: Vec<(String, Option<Vec<u8>>)> =
            sqlx::query_as("SELECT stored::text, wrapped_key FROM personal_keys stored")
                .fetch_all(&pool)
                .await
                .unwrap();
        pool.close().await;
        rows.into_iter()
            .flat_map(|(text, wrapped)| [text.into_bytes(), wrapped.unwrap_or_default()].concat())
            .collect()
    }
}

pub struct Sqlite {
    directory: TempDirectory,
}

impl Sqlite {
    pub fn new() -> Self {
        Self {
            directory: TempDirectory::new(),
        }
    }
}

#[async_trait]
impl Harness for Sqlite {
    fn url(&self) -> String {
        format!("sqlite://{}", self.directory.0.join("store.db").display())
    }

    /// The database file and its write-ahead log, byte for byte.
    async fn stored_bytes(&self) -> Vec<u8> {
        ["store.db", "store.db-wal"]
            .iter()
            .flat_map(|name| std::fs::read(self.directory.0.join(name)).unwrap_or_default())
            .collect()
    }
}

pub struct TempDirectory(pub std::path::PathBuf);

impl TempDirectory {
    pub fn new() -> Self {
        let path =
            std::env::temp_dir().join(format!("personal-data-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDirectory {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
