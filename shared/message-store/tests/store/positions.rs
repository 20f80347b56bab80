//! Positions above every stored one whatever the cluster's transaction counter, on PostgreSQL
//! (docs/adr/0007). A store copied into a younger cluster is played here by one message stored
//! far above the counter, as a restore from an older cluster leaves them; the whole dump and
//! restore runs in the root package's `tests/restore.rs`.

use std::time::Duration;

use message_store::{AppendError, MessageStore, PostgresMessageStore, StoreError};
use uuid::Uuid;

use crate::fixtures::one_message;
use crate::harness::{NO_POLLING, Postgres};

/// Transactions between the counter and the message stored ahead of it.
const AHEAD: i64 = 1_000_000;

/// Stores one message at a position a million transactions ahead of the cluster's counter and
/// returns that position.
async fn store_a_message_ahead_of_the_counter(harness: &Postgres) -> u64 {
    let position: i64 = sqlx::query_scalar(
        "INSERT INTO messages (global_position, id, stream_name, category, position, type, data) \
         VALUES ((pg_current_xact_id()::text::bigint + $1) << 16, $2, $3, 'copied', 0, \
                 'Copied', '{}') \
         RETURNING global_position",
    )
    .bind(AHEAD)
    .bind(Uuid::new_v4())
    .bind(format!("copied-{}", Uuid::new_v4()))
    .fetch_one(&harness.pool)
    .await
    .unwrap();
    u64::try_from(position).unwrap()
}

async fn message_count(harness: &Postgres) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM messages")
        .fetch_one(&harness.pool)
        .await
        .unwrap()
}

async fn position_offset(harness: &Postgres) -> i64 {
    sqlx::query_scalar("SELECT transactions FROM message_store_position_offset")
        .fetch_one(&harness.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_whose_counter_is_behind_its_positions_refuses_to_write_and_says_why() {
    let harness = Postgres::new().await;
    let ahead = store_a_message_ahead_of_the_counter(&harness).await;
    let before = message_count(&harness).await;

    let mut transaction = harness.pool.begin().await.unwrap();
    let refused = harness
        .store
        .append_within(&mut transaction, one_message())
        .await;
    transaction.commit().await.unwrap();

    let Err(AppendError::Store(StoreError::PositionsBehind { stored, floor })) = refused else {
        panic!("an append below the stored positions must be refused, got {refused:?}");
    };
    assert_eq!(stored, ahead);
    assert!(floor <= stored);
    let said = StoreError::PositionsBehind { stored, floor }.to_string();
    assert!(
        said.contains("transaction counter is behind") && said.contains("migrate"),
        "the refusal must say why and what to do: {said}"
    );
    assert_eq!(message_count(&harness).await, before, "nothing was written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_on_a_store_whose_counter_fell_behind_writes_above_every_stored_position() {
    let harness = Postgres::new().await;
    let ahead = store_a_message_ahead_of_the_counter(&harness).await;

    let appended = harness.store.append(one_message()).await.unwrap();

    let written = appended.last_global_position();
    assert!(
        written > ahead,
        "the new message at {written} is not above the stored {ahead}"
    );
    assert!(position_offset(&harness).await >= AHEAD);
    // A consumer that had read up to the copied message finds the new one after it.
    let after = wait_for_messages_after(&harness.store, ahead, 1).await;
    assert_eq!(after[0].global_position, written);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starting_the_store_advances_its_offset_once_and_only_when_it_must() {
    let harness = Postgres::new().await;
    PostgresMessageStore::migrate(&harness.pool).await.unwrap();
    assert_eq!(
        position_offset(&harness).await,
        0,
        "a store in its own cluster needs no offset"
    );
    let ahead = store_a_message_ahead_of_the_counter(&harness).await;

    PostgresMessageStore::migrate(&harness.pool).await.unwrap();
    let offset = position_offset(&harness).await;
    assert!(offset >= AHEAD, "the offset was not advanced: {offset}");
    PostgresMessageStore::migrate(&harness.pool).await.unwrap();
    assert_eq!(position_offset(&harness).await, offset, "advanced twice");

    let fresh = PostgresMessageStore::new(harness.pool.clone(), NO_POLLING);
    let mut transaction = harness.pool.begin().await.unwrap();
    let appended = fresh
        .append_within(&mut transaction, one_message())
        .await
        .unwrap();
    transaction.commit().await.unwrap();
    assert!(appended.last_global_position() > ahead);
}

async fn wait_for_messages_after(
    store: &PostgresMessageStore,
    after: u64,
    count: usize,
) -> Vec<message_store::RecordedMessage> {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let read = store.read_all(after, 100).await.unwrap();
            if read.len() >= count {
                break read;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the new message never became visible after the stored one")
}
