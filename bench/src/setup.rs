//! Setting up a benchmark's subject before it measures: a fresh store, and requests whose
//! answer must be what the benchmark expects.

use message_store::PostgresMessageStore;
use reqwest::RequestBuilder;
use serde_json::Value;
use sqlx::PgPool;
use test_support::TestDatabase;

/// A fresh database with the message store's tables, and a pool of it; the database is
/// dropped with the returned handle.
pub async fn store_database() -> anyhow::Result<(TestDatabase, PgPool)> {
    let database = TestDatabase::new().await;
    let pool = database.pool().await;
    PostgresMessageStore::migrate(&pool).await?;
    Ok((database, pool))
}

/// Sends `request` and reads the JSON body of its answer, which must have `status`; otherwise
/// the error names `what` was asked and the status that came.
pub async fn expect_json(
    request: RequestBuilder,
    status: u16,
    what: &str,
) -> anyhow::Result<Value> {
    let response = request.send().await?;
    anyhow::ensure!(response.status() == status, "{what}: {}", response.status());
    Ok(response.json().await?)
}
