//! `lag`: how long after an append returns its event is visible in the read model, with the
//! aggregator woken by LISTEN/NOTIFY, at a steady moderate append rate.
//!
//! The baseline is the least a projection woken by LISTEN/NOTIFY can take: the same events
//! inserted by a writer that sends its NOTIFY inside the inserting transaction, and a plain
//! LISTEN client that, on each notification, copies the event's row into a view table in one
//! statement (read, write, commit). The service coalesces its wake-ups (at most one NOTIFY per
//! 10 ms, so that appends do not serialise on the NOTIFY lock: ADR 3) and commits a checkpoint
//! with each batch, so its lag is expected above the baseline's; the ratio says by how much.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use aggregator::{Projector, ProjectorOptions};
use message_store::{ExpectedVersion, NewMessage, StreamAppend, StreamName};
use serde_json::{Value, json};
use sqlx::postgres::PgListener;
use test_support::TestDatabase;
use test_support::bulk::PASSWORD_HASH;
use uuid::Uuid;

#[derive(clap::Args)]
pub struct Options {
    /// Appends per second.
    #[arg(long, default_value_t = 200)]
    rate: u64,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    let database = TestDatabase::new().await;
    let (store, read_model) = crate::setup::store_and_read_model(&database).await?;
    let sealer = crate::setup::sealer(&database).await?;
    let projector = Projector::users(
        store.clone(),
        sealer,
        read_model,
        ProjectorOptions::default(),
    );
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
                        "password_hash": PASSWORD_HASH, "status": "active", "roles": ["user"],
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

    let service = Percentiles::of(lags);
    let baseline = Percentiles::of(baseline(&database, &options).await?);
    println!(
        "{total} events at {}/s; service max {:.1} ms, baseline max {:.1} ms",
        options.rate, service.max, baseline.max
    );
    println!(
        "baseline (NOTIFY in the insert, a plain LISTEN client copying the row): p50 {:.1} ms, \
         p99 {:.1} ms",
        baseline.p50, baseline.p99
    );
    println!(
        "lag: p50 {:.1} ms, p99 {:.1} ms, {:.2}x the baseline's p50 speed",
        service.p50,
        service.p99,
        baseline.p50 / service.p50
    );
    Ok(())
}

struct Percentiles {
    p50: f64,
    p99: f64,
    max: f64,
}

impl Percentiles {
    fn of(mut milliseconds: Vec<f64>) -> Self {
        milliseconds.sort_by(f64::total_cmp);
        let at = |p: f64| {
            let index = ((milliseconds.len() as f64 * p) as usize).min(milliseconds.len() - 1);
            milliseconds.get(index).copied().unwrap_or(f64::NAN)
        };
        Self {
            p50: at(0.50),
            p99: at(0.99),
            max: at(1.0),
        }
    }
}

/// The same events at the same rate through the least machinery: returns each event's time
/// from its insert's commit returning to its row being committed in the view table.
async fn baseline(database: &TestDatabase, options: &Options) -> anyhow::Result<Vec<f64>> {
    let pool = database.pool().await;
    sqlx::raw_sql(
        "CREATE TABLE baseline_events (id uuid PRIMARY KEY, data jsonb NOT NULL); \
         CREATE TABLE baseline_view (id uuid PRIMARY KEY, email text NOT NULL)",
    )
    .execute(&pool)
    .await?;
    let mut listener = PgListener::connect_with(&pool).await?;
    listener.listen("baseline_events").await?;
    let total = options.rate * options.seconds;

    let (applied_tx, mut applied) = tokio::sync::mpsc::unbounded_channel::<(Uuid, Instant)>();
    let projector = {
        let pool = pool.clone();
        tokio::spawn(async move {
            for _ in 0..total {
                let notification = listener.recv().await?;
                let id: Uuid = notification.payload().parse()?;
                sqlx::query(
                    "INSERT INTO baseline_view (id, email) \
                     SELECT id, data->>'email' FROM baseline_events WHERE id = $1",
                )
                .bind(id)
                .execute(&pool)
                .await?;
                let _ = applied_tx.send((id, Instant::now()));
            }
            anyhow::Ok(())
        })
    };

    let mut returned = HashMap::with_capacity(total as usize);
    let mut ticks = tokio::time::interval(Duration::from_micros(1_000_000 / options.rate));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0..total {
        ticks.tick().await;
        let id = Uuid::now_v7();
        let data: Value = json!({
            "user_id": id, "email": format!("lag{n}@example.com"),
            "password_hash": PASSWORD_HASH, "status": "active", "roles": ["user"],
        });
        let mut transaction = pool.begin().await?;
        sqlx::query("INSERT INTO baseline_events (id, data) VALUES ($1, $2)")
            .bind(id)
            .bind(&data)
            .execute(&mut *transaction)
            .await?;
        sqlx::query("SELECT pg_notify('baseline_events', $1)")
            .bind(id.to_string())
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        returned.insert(id, Instant::now());
    }
    projector.await??;

    let mut lags = Vec::with_capacity(total as usize);
    while let Ok((id, at)) = applied.try_recv() {
        if let Some(committed) = returned.get(&id) {
            lags.push(at.saturating_duration_since(*committed).as_secs_f64() * 1000.0);
        }
    }
    anyhow::ensure!(
        lags.len() as u64 == total,
        "the baseline saw {} of {total} events",
        lags.len()
    );
    Ok(lags)
}
