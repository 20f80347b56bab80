//! The checks at the end: the read model caught up, and holds every account and login once.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::PgPool;
use uuid::Uuid;

use super::locks::read;
use super::scenario::CATCH_UP;
use super::traffic::Traffic;

/// Waits until the aggregator's checkpoint has reached the last message in the store; answers
/// that position and how long it took.
pub(super) async fn catch_up(pool: &PgPool) -> anyhow::Result<(u64, Duration)> {
    let started = Instant::now();
    loop {
        let head: i64 =
            sqlx::query_scalar("SELECT coalesce(max(global_position), 0) FROM messages")
                .fetch_one(pool)
                .await?;
        let checkpoint: Option<i64> = sqlx::query_scalar(
            "SELECT position FROM projection_checkpoints WHERE projection = 'users'",
        )
        .fetch_optional(pool)
        .await?;
        let checkpoint = checkpoint.unwrap_or(0);
        if checkpoint >= head {
            return Ok((u64::try_from(head)?, started.elapsed()));
        }
        anyhow::ensure!(
            started.elapsed() < CATCH_UP,
            "the aggregator's checkpoint {checkpoint} is still behind the store's head {head} \
             {} s after the traffic stopped",
            CATCH_UP.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the read model must hold once caught up: every account registered, once, and every
/// granted login counted.
pub(super) async fn check_read_model(
    pool: &PgPool,
    traffic: &Traffic,
) -> anyhow::Result<Vec<String>> {
    let mut problems = Vec::new();
    let ids: Vec<Uuid> = read(&traffic.accounts)
        .iter()
        .map(|account| account.id)
        .collect();
    let distinct: HashSet<Uuid> = ids.iter().copied().collect();
    if distinct.len() != ids.len() {
        problems.push(format!(
            "the command API gave out {} ids for {} registrations",
            distinct.len(),
            ids.len()
        ));
    }
    let (rows, emails, found, logins, inactive): (i64, i64, i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT email_normalized), \
                count(*) FILTER (WHERE id = ANY($1)), coalesce(sum(login_count), 0)::bigint, \
                count(*) FILTER (WHERE status <> 'active') \
         FROM users",
    )
    .bind(&ids)
    .fetch_one(pool)
    .await
    .context("reading the users view")?;
    let registered = ids.len() + read(&traffic.decoys).len() + 1;
    if usize::try_from(rows)? != registered {
        problems.push(format!(
            "the users view has {rows} rows for {registered} registered accounts \
             (the administrator included)"
        ));
    }
    if emails != rows {
        problems.push(format!(
            "the users view has {rows} rows but {emails} distinct emails"
        ));
    }
    if usize::try_from(found)? != distinct.len() {
        problems.push(format!(
            "the users view holds {found} of the {} accounts registered with the right password",
            distinct.len()
        ));
    }
    let granted = traffic.granted_logins.load(Ordering::Relaxed);
    if u64::try_from(logins)? != granted {
        problems.push(format!(
            "the users view counts {logins} logins; {granted} were granted"
        ));
    }
    if inactive != 0 {
        problems.push(format!("{inactive} accounts are not active in the view"));
    }
    Ok(problems)
}
