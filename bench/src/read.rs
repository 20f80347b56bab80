//! `read`: reading every message in batches through the store against a plain keyset SELECT
//! of the same rows, decoded into the same values.

use std::time::{Duration, Instant};

use message_store::{
    ExpectedVersion, MessageStore, NewMessage, PostgresMessageStore, StreamAppend, StreamName,
};
use serde_json::{Value, json};
use sqlx::Row;
use sqlx::types::Json;
use test_support::TestDatabase;
use uuid::Uuid;

use crate::report::median;

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
    let database = TestDatabase::new().await;
    let pool = database.pool().await;
    PostgresMessageStore::migrate(&pool).await?;
    let store = PostgresMessageStore::new(pool.clone(), Duration::from_secs(1));

    let per_append = 1_000;
    for chunk in 0..options.messages.div_ceil(per_append) {
        let appends = (0..per_append.min(options.messages - chunk * per_append))
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
    sqlx::query("VACUUM ANALYZE messages")
        .execute(&pool)
        .await?;

    let (mut plain_rates, mut store_rates) = (Vec::new(), Vec::new());
    for round in 1..=options.rounds {
        let started = Instant::now();
        let mut after = 0i64;
        let mut read = 0usize;
        loop {
            let rows = sqlx::query(
                "SELECT global_position, id, stream_name, position, type, data, metadata, time \
                 FROM messages WHERE global_position > $1 ORDER BY global_position LIMIT $2",
            )
            .bind(after)
            .bind(options.batch as i64)
            .fetch_all(&pool)
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
        let plain = read as f64 / started.elapsed().as_secs_f64();

        let started = Instant::now();
        let mut after = 0;
        let mut read = 0usize;
        loop {
            let batch = store.read_all(after, options.batch).await?;
            let Some(last) = batch.last() else { break };
            after = last.global_position;
            read += batch.len();
        }
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
