//! `append`: the message store's append rate against plain INSERTs into an identical table.

use std::sync::Arc;
use std::time::Duration;

use message_store::{
    ConnectOptions, ExpectedVersion, MessageStore, NewMessage, PostgresMessageStore, StreamAppend,
    StreamName,
};
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use test_support::TestDatabase;
use uuid::Uuid;

use crate::report::{median, rate};

#[derive(clap::Args)]
pub struct Options {
    /// Concurrent writers.
    #[arg(long, default_value_t = 8)]
    writers: usize,
    /// Seconds per round; rounds alternate between the baseline and the store.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    let database = TestDatabase::new().await;
    let connections = options.writers as u32 + 2;
    let pool = plain_table(&database, connections).await?;
    // The store as the services open it, with the subscription machinery running throughout:
    // the notifier inside the store and a listener.
    let store = Arc::new(
        PostgresMessageStore::connect(
            database.url(),
            &ConnectOptions {
                max_connections: connections,
                poll_interval: Duration::from_secs(1),
            },
        )
        .await?,
    );
    let mut subscription = store.subscribe();
    let listener = tokio::spawn(async move {
        loop {
            subscription.next().await;
        }
    });

    let duration = Duration::from_secs(options.seconds);
    let (mut plain_rates, mut store_rates) = (Vec::new(), Vec::new());
    for round in 1..=options.rounds {
        let pool = pool.clone();
        let plain = rate(options.writers, duration, move |_, _| {
            insert_plain(pool.clone())
        })
        .await?;
        let store = store.clone();
        let appended = rate(options.writers, duration, move |_, _| {
            append_to_store(store.clone())
        })
        .await?;
        println!("round {round}: plain insert {plain:.0} msg/s, store append {appended:.0} msg/s");
        plain_rates.push(plain);
        store_rates.push(appended);
    }
    listener.abort();

    let (plain, appended) = (median(plain_rates), median(store_rates));
    println!(
        "plain insert: {plain:.0} msg/s ({} writers)",
        options.writers
    );
    println!(
        "store append: {appended:.0} msg/s ({} writers)",
        options.writers
    );
    println!(
        "append: {appended:.0} msg/s, {:.2}x plain insert",
        appended / plain
    );
    Ok(())
}

/// Migrates the store and copies its table, with every index and default, for the baseline;
/// answers a pool of `connections` for the baseline's inserts.
async fn plain_table(database: &TestDatabase, connections: u32) -> anyhow::Result<PgPool> {
    let pool = database
        .pool_with(
            // The baseline at its best: no ping before each insert, as the store does.
            PgPoolOptions::new()
                .max_connections(connections)
                .test_before_acquire(false),
        )
        .await;
    PostgresMessageStore::migrate(&pool).await?;
    sqlx::query("CREATE TABLE plain_messages (LIKE messages INCLUDING ALL)")
        .execute(&pool)
        .await?;
    sqlx::query("CREATE SEQUENCE plain_positions")
        .execute(&pool)
        .await?;
    Ok(pool)
}

/// The baseline's operation: one message, to a stream of its own, in one INSERT.
async fn insert_plain(pool: PgPool) -> anyhow::Result<()> {
    let stream = format!("bench-{}", Uuid::new_v4());
    sqlx::query(
        "INSERT INTO plain_messages \
         (global_position, id, stream_name, category, position, type, data, metadata) \
         VALUES (nextval('plain_positions'), $1, $2, 'bench', 0, 'Benchmarked', $3, $4)",
    )
    .bind(Uuid::now_v7())
    .bind(stream)
    .bind(json!({ "email": "someone@example.com", "status": "active" }))
    .bind(json!({ "correlation_id": Uuid::new_v4() }))
    .execute(&pool)
    .await?;
    Ok(())
}

/// The store's operation: the same message appended to a new stream.
async fn append_to_store(store: Arc<PostgresMessageStore>) -> anyhow::Result<()> {
    let stream = StreamName::for_entity("bench", Uuid::new_v4())?;
    let message = NewMessage::new(
        "Benchmarked",
        json!({ "email": "someone@example.com", "status": "active" }),
    )
    .with_metadata(json!({ "correlation_id": Uuid::new_v4() }));
    store
        .append(vec![StreamAppend::new(
            stream,
            ExpectedVersion::NoStream,
            vec![message],
        )])
        .await?;
    Ok(())
}
