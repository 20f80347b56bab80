//! One way per adapter to get a fresh store, and to disturb it.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use message_store::{MessageStore, PostgresMessageStore, SqliteMessageStore};
use sqlx::PgPool;
use test_support::TestDatabase;

/// Long enough that a wake-up seen in a test must have come from a signal, not from polling.
pub const NO_POLLING: Duration = Duration::from_secs(3600);

#[async_trait]
pub trait Harness: Send + Sync {
    fn store(&self) -> Arc<dyn MessageStore>;
}

pub struct Postgres {
    pub store: PostgresMessageStore,
    pub pool: PgPool,
    pub database: TestDatabase,
}

impl Postgres {
    pub async fn new() -> Self {
        let database = TestDatabase::new().await;
        let pool = database.pool().await;
        PostgresMessageStore::migrate(&pool).await.unwrap();
        let store = PostgresMessageStore::new(pool.clone(), NO_POLLING);
        Self {
            store,
            pool,
            database,
        }
    }

    /// Cuts the connections that carry wake-ups, as a network failure or a server restart would.
    pub async fn drop_connections(&self) {
        let dropped: i64 = sqlx::query_scalar(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = current_database() AND query LIKE 'LISTEN%'",
        )
        .fetch_one(&self.pool)
        .await
        .unwrap();
        assert!(dropped > 0, "no listener connection was found to drop");
    }
}

#[async_trait]
impl Harness for Postgres {
    fn store(&self) -> Arc<dyn MessageStore> {
        Arc::new(self.store.clone())
    }
}

pub struct Sqlite {
    pub store: SqliteMessageStore,
    _directory: TempDirectory,
}

impl Sqlite {
    pub async fn new() -> Self {
        let directory = TempDirectory::new();
        let store = SqliteMessageStore::open(&directory.0.join("store.db"), NO_POLLING)
            .await
            .unwrap();
        Self {
            store,
            _directory: directory,
        }
    }
}

#[async_trait]
impl Harness for Sqlite {
    fn store(&self) -> Arc<dyn MessageStore> {
        Arc::new(self.store.clone())
    }
}

pub struct TempDirectory(pub std::path::PathBuf);

impl TempDirectory {
    pub fn new() -> Self {
        let path =
            std::env::temp_dir().join(format!("message-store-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDirectory {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
