//! Database faults the store answers as "unavailable, retry" rather than as faults of its own,
//! and a restart that no call notices once the server is back.

use std::time::Duration;

use message_store::{
    AppendError, Appended, ConnectOptions, MessageStore, PostgresMessageStore, SqliteMessageStore,
};
use sqlx::Connection;
use test_support::{PrivateCluster, StopMode, TestDatabase};

use crate::fixtures::one_message;
use crate::harness::{NO_POLLING, TempDirectory};

/// A store with a pool of `max_connections` to the database at `url`, as a deployment connects.
async fn connect(url: &str, max_connections: u32) -> PostgresMessageStore {
    let options = ConnectOptions {
        max_connections,
        poll_interval: NO_POLLING,
    };
    PostgresMessageStore::connect(url, &options).await.unwrap()
}

/// The append failed in the store as "unavailable, retry", not as a fault of its own.
#[track_caller]
fn assert_unavailable(refused: Result<Appended, AppendError>, cause: &str) {
    let Err(AppendError::Store(error)) = refused else {
        panic!("an append to {cause} must fail in the store: {refused:?}");
    };
    assert!(
        error.is_unavailable(),
        "{cause} must be unavailable, not a fault: {error:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_server_restart_no_call_fails_on_a_connection_that_died_in_the_pool() {
    let cluster = PrivateCluster::start().await;
    let url = cluster.create_database("store").await;
    let pool_size = 4;
    let store = connect(&url, pool_size).await;
    // Fill the pool: every connection is used at once, then goes back idle.
    let warm = (0..pool_size).map(|_| {
        let store = store.clone();
        async move {
            store.append(one_message()).await.unwrap();
            sqlx::query("SELECT pg_sleep(0.1)")
                .execute(store.pool())
                .await
                .unwrap();
        }
    });
    futures::future::join_all(warm).await;
    assert_eq!(store.pool().size(), pool_size);

    cluster.stop(StopMode::Fast).await;
    cluster.restart().await;

    // Every idle connection in the pool is dead now; each call must still succeed.
    for n in 0..2 * pool_size {
        if n % 2 == 0 {
            store
                .append(one_message())
                .await
                .unwrap_or_else(|error| panic!("append {n} after the restart failed: {error:?}"));
        } else {
            store
                .last_position()
                .await
                .unwrap_or_else(|error| panic!("read {n} after the restart failed: {error:?}"));
        }
    }
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM messages")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(stored, i64::from(pool_size) * 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_turned_read_only_is_unavailable_and_the_store_reconnects_once_it_is_not() {
    // What a primary demoted by a failover answers (25006) to connections that stayed open to
    // it, while new connections reach the new primary.
    let database = TestDatabase::new().await;
    let store = connect(database.url(), 4).await;
    store.append(one_message()).await.unwrap();
    database.set_read_only(true).await;
    // The store's connections were opened before: end them, so that it reopens them read-only.
    database.end_sessions().await;

    let refused = store.append(one_message()).await;

    assert_unavailable(refused, "a read-only server");

    // The failover completes: new connections reach a writable server, the pool's old ones
    // still reach the read-only one.
    database.set_read_only(false).await;
    store
        .append(one_message())
        .await
        .expect("the store kept using its connections to the read-only server");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sqlite_file_locked_by_another_writer_is_unavailable_not_a_fault() {
    let directory = TempDirectory::new();
    let path = directory.0.join("store.db");
    let store = SqliteMessageStore::open(&path, NO_POLLING).await.unwrap();
    let mut other_writer = sqlx::SqliteConnection::connect_with(
        &sqlx::sqlite::SqliteConnectOptions::new().filename(&path),
    )
    .await
    .unwrap();
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut other_writer)
        .await
        .unwrap();

    // The store waits its busy timeout (5 s) for the lock, then gives up.
    let refused = tokio::time::timeout(Duration::from_secs(30), store.append(one_message()))
        .await
        .expect("the append neither wrote nor gave up");

    assert_unavailable(refused, "a locked file");
    sqlx::query("ROLLBACK")
        .execute(&mut other_writer)
        .await
        .unwrap();
    store.append(one_message()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_closed_to_connections_is_unavailable_not_a_fault() {
    let database = TestDatabase::new().await;
    let store = connect(database.url(), 2).await;
    database.close_to_connections(true).await;
    database.end_sessions().await;

    let refused = store.append(one_message()).await;

    database.close_to_connections(false).await;
    assert_unavailable(refused, "a database closed to connections");
}
