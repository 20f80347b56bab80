//! `lag`: how long after an append returns its event is visible in the read model, with the
//! aggregator woken by LISTEN/NOTIFY, at a steady moderate append rate.

use std::time::{Duration, Instant};

use aggregator::{Projector, ProjectorOptions, ReadModel};
use message_store::{ConnectOptions, ExpectedVersion, NewMessage, StreamAppend, StreamName};
use serde_json::json;
use test_support::TestDatabase;
use uuid::Uuid;

#[derive(clap::Args)]
pub struct Options {
    /// Appends per second.
    #[arg(long, default_value_t = 200)]
    rate: u64,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

const HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$RdescudvJCsgt3ub+b+dWRWJTmaaJObG";

pub async fn run(options: Options) -> anyhow::Result<()> {
    let database = TestDatabase::new().await;
    let store = message_store::connect(
        database.url(),
        ConnectOptions {
            max_connections: 8,
            poll_interval: Duration::from_millis(500),
        },
    )
    .await?;
    let read_model = ReadModel::connect(database.url(), 4).await?;
    read_model.migrate().await?;
    let projector = Projector::users(store.clone(), read_model, ProjectorOptions::default());
    // The committed checkpoint: an event's row is visible once the checkpoint passes it.
    let mut visible = projector.positions();
    let worker = tokio::spawn(projector.run(std::future::pending()));

    let (sent, mut appended) = tokio::sync::mpsc::unbounded_channel::<(u64, Instant)>();
    let total = options.rate * options.seconds;
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(Duration::from_micros(1_000_000 / options.rate));
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for n in 0..total {
                ticks.tick().await;
                let id = Uuid::now_v7();
                let message = NewMessage::new(
                    "UserRegistered",
                    json!({
                        "user_id": id, "email": format!("lag{n}@example.com"),
                        "email_normalized": format!("lag{n}@example.com"),
                        "password_hash": HASH, "status": "active", "roles": ["user"],
                        "registered_at": "2026-01-01T00:00:00Z",
                    }),
                )
                .with_metadata(json!({ "schemaVersion": 1 }));
                let appended = store
                    .append(vec![StreamAppend::new(
                        StreamName::for_entity("user", id)?,
                        ExpectedVersion::NoStream,
                        vec![message],
                    )])
                    .await?;
                let _ = sent.send((appended.last_global_position(), Instant::now()));
            }
            anyhow::Ok(())
        })
    };

    let mut lags = Vec::with_capacity(total as usize);
    while let Some((position, returned)) = appended.recv().await {
        visible
            .wait_for(|checkpoint| *checkpoint >= position)
            .await?;
        lags.push(returned.elapsed().as_secs_f64() * 1000.0);
    }
    writer.await??;
    worker.abort();

    lags.sort_by(f64::total_cmp);
    let percentile = |p: f64| lags[((lags.len() as f64 * p) as usize).min(lags.len() - 1)];
    println!(
        "{} events at {}/s; max {:.1} ms",
        lags.len(),
        options.rate,
        percentile(1.0)
    );
    println!(
        "lag: p50 {:.1} ms, p99 {:.1} ms",
        percentile(0.50),
        percentile(0.99)
    );
    Ok(())
}
