//! `read`: reading every message in batches through the store against a plain keyset SELECT
//! of the same rows, decoded into the same values.

use std::time::{Duration, Instant};

use message_store::{
    ExpectedVersion, MessageStore, NewMessage, PostgresMessageStore, StreamAppend, StreamName,
};
use serde_json::{Value, json};
use sqlx::types::Json;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::report::median;
use crate::setup::store_database;

#[derive(clap::Args)]
pub struct Options {
    /// Messages to write, then read.
    #[arg(long, default_value_t = 200_000)]
    messages: usize,
    #[arg(long, default_value_t = 1_000)]
    batch: usize,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    let (_database, pool) = store_database().await?;
    let store = PostgresMessageStore::new(pool.clone(), Duration::from_secs(1));
    write_messages(&store, options.messages).await?;
    sqlx::query("VACUUM ANALYZE messages")
        .execute(&pool)
        .await?;

    let (mut plain_rates, mut store_rates) = (Vec::new(), Vec::new());
    for round in 1..=options.rounds {
        let started = Instant::now();
        let read = read_plain(&pool, options.batch).await?;
        let plain = read as f64 / started.elapsed().as_secs_f64();

        let started = Instant::now();
        let read = read_through_store(&store, options.batch).await?;
        let through_store = read as f64 / started.elapsed().as_secs_f64();
        anyhow::ensure!(
            read == options.messages,
            "read {read} of {} messages",
            options.messages
        );
        println!(
            "round {round}: plain select {plain:.0} msg/s, store read {through_store:.0} msg/s"
        );
        plain_rates.push(plain);
        store_rates.push(through_store);
    }

    let (plain, through_store) = (median(plain_rates), median(store_rates));
    println!(
        "plain select: {plain:.0} msg/s (batches of {})",
        options.batch
    );
    println!(
        "store read: {through_store:.0} msg/s (batches of {})",
        options.batch
    );
    println!(
        "read: {through_store:.0} msg/s, {:.2}x plain select",
        through_store / plain
    );
    Ok(())
}

/// Appends `count` messages, each to a stream of its own, a thousand per append.
async fn write_messages(store: &PostgresMessageStore, count: usize) -> anyhow::Result<()> {
    let per_append = 1_000;
    for chunk in 0..count.div_ceil(per_append) {
        let appends = (0..per_append.min(count - chunk * per_append))
            .map(|n| {
                let stream = StreamName::for_entity("bench", Uuid::new_v4())?;
                let message = NewMessage::new(
                    "Benchmarked",
                    json!({ "n": n, "email": "someone@example.com" }),
                );
                Ok(StreamAppend::new(
                    stream,
                    ExpectedVersion::NoStream,
                    vec![message],
                ))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        store.append(appends).await?;
    }
    Ok(())
}

/// The baseline: every message, `batch` at a time, by a keyset SELECT, each row decoded into
/// the values the store decodes; answers how many were read.
async fn read_plain(pool: &PgPool, batch: usize) -> anyhow::Result<usize> {
    let mut after = 0i64;
    let mut read = 0usize;
    loop {
        let rows = sqlx::query(
            "SELECT global_position, id, stream_name, position, type, data, metadata, time \
             FROM messages WHERE global_position > $1 ORDER BY global_position LIMIT $2",
        )
        .bind(after)
        .bind(batch as i64)
        .fetch_all(pool)
        .await?;
        let Some(last) = rows.last() else { break };
        after = last.try_get("global_position")?;
        for row in &rows {
            let _: (Uuid, String, i64, String, Json<Value>, Json<Value>) = (
                row.try_get("id")?,
                row.try_get("stream_name")?,
                row.try_get("position")?,
                row.try_get("type")?,
                row.try_get("data")?,
                row.try_get("metadata")?,
            );
        }
        read += rows.len();
    }
    Ok(read)
}

/// Every message, `batch` at a time, through the store; answers how many were read.
async fn read_through_store(store: &PostgresMessageStore, batch: usize) -> anyhow::Result<usize> {
    let mut after = 0;
    let mut read = 0usize;
    loop {
        let messages = store.read_all(after, batch).await?;
        let Some(last) = messages.last() else { break };
        after = last.global_position;
        read += messages.len();
    }
    Ok(read)
}
