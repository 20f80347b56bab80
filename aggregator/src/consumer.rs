//! What every follower of the message store in the aggregator shares (DESIGN decision 13): a
//! checkpoint in `projection_checkpoints`, a step function tests can drive, and the loop that
//! runs the steps with one active replica at a time. The users projection ([`crate::Projector`])
//! and the mailer ([`crate::Mailer`]) are its implementations; `aggregator status` lists them.
//!
//! The loop ([`run`]): take the consumer's advisory lock (PostgreSQL), step through the
//! backlog, then sleep on the store's subscription until a wake-up or the poll interval. It
//! never exits on an error: it logs, backs off (exponentially, within the consumer's bounds)
//! and steps again from the stored checkpoint. It stops on shutdown, between steps.
//!
//! Several replicas may run. Exactly one holds the session-level advisory lock on a dedicated
//! connection and works; the others retry every `lock_retry` and take over when its session
//! ends. A holder keeps its session alive with a heartbeat, and the server ends a session that
//! stays silent for the `lock_lease` (`idle_session_timeout`), so a holder that is cut off
//! without its connection closing (a partition, a frozen node) loses the lock within the lease
//! too (docs/adr/0008). The lock saves work but correctness does not rest on it: each consumer
//! moves its checkpoint by compare-and-set on its position, its version and the takeover epoch,
//! which each new holder bumps ([`ConsumerLock`]); a worker that lost its lock writes nothing.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use message_store::{GlobalPosition, MessageStore, Subscription};
use sqlx::{Connection, PgConnection};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::read_model::{ReadModelWriter, pg_take_over};

/// What one step of a consumer did, as its loop sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// It moved its checkpoint: step again at once.
    Worked,
    /// Nothing new: sleep until the store says there may be.
    Idle,
    /// It met something it must not go past, and stays where it is until the process restarts.
    Halted,
}

/// How a consumer's replicas share its lock (docs/adr/0008).
#[derive(Debug, Clone, Copy)]
pub struct LockTiming {
    /// How often a standby replica tries to take the lock.
    pub retry: Duration,
    /// How long the server keeps the lock of a holder that has gone silent.
    pub lease: Duration,
}

/// How long the loop waits before stepping again after a failed step: `first`, doubled after
/// each failure in a row, at most `max`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            first: Duration::from_millis(100),
            max: Duration::from_secs(5),
        }
    }
}

/// A follower of the message store with a checkpoint of its own, run by [`run`].
#[async_trait]
pub trait Consumer: Send {
    type Error: std::error::Error + Send + Sync + 'static;

    /// Its checkpoint's name in `projection_checkpoints`, its lock's name, and its label in
    /// logs and metrics. Fixed for a consumer's life; a webhook endpoint's names its endpoint.
    fn name(&self) -> &str;
    /// The version its checkpoint is created at when a new holder takes it over.
    fn version(&self) -> i32;
    fn store(&self) -> &Arc<dyn MessageStore>;
    /// Where its loop waits for new messages: the store's own subscription, unless the
    /// consumer shares one with others (webhook endpoints, many per process, each of which
    /// would otherwise hold a database connection for its listener).
    fn subscribe(&self) -> Subscription {
        self.store().subscribe()
    }
    fn read_model(&self) -> &ReadModelWriter;
    fn lock_timing(&self) -> LockTiming;
    fn backoff(&self) -> Backoff {
        Backoff::default()
    }
    /// Set while this worker holds the lock, for whoever watches it (a test, a status page);
    /// the lock's heartbeat clears it the moment it finds the lock lost.
    fn holds_lock(&self) -> Arc<AtomicBool>;

    /// One step: read after the checkpoint, act, move the checkpoint.
    async fn step(&mut self) -> Result<Progress, Self::Error>;
    /// This worker has just taken the lock (its epoch as `fence`; `None` without a lock, on
    /// SQLite): what it remembered of the checkpoint may be stale.
    fn took_over(&mut self, fence: Option<i64>);
    /// A step failed: drop whatever it may have left half done, so the next step starts from
    /// the stored checkpoint.
    fn forget(&mut self);
    /// Whether `error` means this worker must let go of the lock (another holder took over, or
    /// the checkpoint is of a version this worker does not write), so that a worker that may
    /// write can take it.
    fn must_let_go(&self, error: &Self::Error) -> bool;
    /// How the loop logs a failed step, at `error`: a consumer whose failures are expected in
    /// operation (an SMTP server down for a while) says `false` and the loop logs at `warn`.
    fn failure_is_an_error(&self, _error: &Self::Error) -> bool {
        true
    }
}

/// Works until `shutdown` completes. Never returns early on errors.
pub async fn run<C: Consumer>(mut consumer: C, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    let mut subscription = consumer.subscribe();
    while let Some(lock) = take_lock(&mut consumer, shutdown.as_mut()).await {
        let held =
            work_while_holding(&mut consumer, lock, &mut subscription, shutdown.as_mut()).await;
        if held == Held::UntilShutdown {
            break;
        }
    }
    consumer.holds_lock().store(false, Ordering::Relaxed);
    tracing::info!(consumer = consumer.name(), "stopped");
}

/// Waits until this worker holds the consumer's lock (`Some(None)` on SQLite, the
/// single-process mode, where there is one worker); `None` when `shutdown` came first.
async fn take_lock<C: Consumer, S: Future<Output = ()>>(
    consumer: &mut C,
    mut shutdown: Pin<&mut S>,
) -> Option<Option<ConsumerLock>> {
    let lock = match consumer.read_model() {
        ReadModelWriter::Postgres(pool) => {
            let acquire = ConsumerLock::acquire(
                pool.clone(),
                Arc::from(consumer.name()),
                consumer.version(),
                consumer.lock_timing(),
                consumer.holds_lock(),
            );
            tokio::select! {
                lock = acquire => Some(lock),
                () = &mut shutdown => return None,
            }
        }
        ReadModelWriter::Sqlite(_) => None,
    };
    consumer.took_over(lock.as_ref().map(|lock| lock.epoch));
    consumer.holds_lock().store(true, Ordering::Relaxed);
    tracing::info!(consumer = consumer.name(), "working");
    Some(lock)
}

/// Steps while `lock` holds, sleeping on `subscription` when idle, and backing off on errors.
/// Returns when told to stop, or when the lock is lost or must be let go (another holder, or
/// a checkpoint of another version), to be taken again or waited for.
async fn work_while_holding<C: Consumer, S: Future<Output = ()>>(
    consumer: &mut C,
    mut lock: Option<ConsumerLock>,
    subscription: &mut Subscription,
    mut shutdown: Pin<&mut S>,
) -> Held {
    let bounds = consumer.backoff();
    let mut backoff = bounds.first;
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => return Held::UntilShutdown,
            () = std::future::ready(()) => {}
        }
        if lock.as_ref().is_some_and(ConsumerLock::is_lost) {
            // The heartbeat has said so; take it again, or stand by.
            return Held::UntilLost;
        }
        // A step in flight when the lock is lost is not cut short: its checkpoint's
        // compare-and-set compares the epoch, which the next holder has bumped.
        match consumer.step().await {
            Ok(Progress::Worked) => backoff = bounds.first,
            Ok(Progress::Idle) => {
                backoff = bounds.first;
                tokio::select! {
                    _ = subscription.next() => {}
                    () = lost(&mut lock) => {}
                    () = &mut shutdown => return Held::UntilShutdown,
                }
            }
            Ok(Progress::Halted) => {
                // Keep the lock (a standby would only halt too) and keep serving health and
                // metrics until told to stop.
                shutdown.await;
                return Held::UntilShutdown;
            }
            Err(error) => {
                let let_go = consumer.must_let_go(&error);
                log_failure(consumer, &error, backoff);
                consumer.forget();
                if let_go {
                    drop(lock.take());
                    consumer.holds_lock().store(false, Ordering::Relaxed);
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = &mut shutdown => return Held::UntilShutdown,
                }
                backoff = (backoff * 2).min(bounds.max);
                if let_go {
                    return Held::UntilLost;
                }
            }
        }
    }
}

fn log_failure<C: Consumer>(consumer: &C, error: &C::Error, backoff: Duration) {
    let name = consumer.name();
    let cause = std::error::Error::source(error);
    if consumer.failure_is_an_error(error) {
        tracing::error!(consumer = name, %error, ?cause, "step failed; retrying after {backoff:?}");
    } else {
        tracing::warn!(consumer = name, %error, ?cause, "step failed; retrying after {backoff:?}");
    }
}

/// Why a consumer must not go on from `checkpoint`, when the store's last message lies below
/// it: the store was restored from an older point, or a failover lost commits, and new
/// messages could be written at positions the checkpoint has passed, where this consumer would
/// never see them. `remedy` says what the operator does about it.
pub async fn store_behind(
    store: &Arc<dyn MessageStore>,
    checkpoint: GlobalPosition,
    remedy: &str,
) -> Result<Option<String>, message_store::StoreError> {
    let last = store.last_position().await?;
    Ok((last < checkpoint).then(|| {
        format!(
            "the checkpoint is at position {checkpoint}, but the message store's last position \
             is {last}: the store was restored from an older point, or a failover lost \
             commits. {remedy}"
        )
    }))
}

/// How long a worker held the consumer's lock.
#[derive(Debug, PartialEq, Eq)]
enum Held {
    /// Until it was told to stop.
    UntilShutdown,
    /// Until it lost the lock or let it go.
    UntilLost,
}

/// Completes when the heartbeat of `lock` finds it lost; never without a lock.
async fn lost(lock: &mut Option<ConsumerLock>) {
    match lock {
        Some(lock) => {
            let _ = lock.lost.wait_for(|lost| *lost).await;
        }
        None => std::future::pending().await,
    }
}

/// The advisory lock key of a consumer: one namespace, apart from the store's stream locks.
/// (The namespace says "projection" for every consumer: it names the lock the users projection
/// has always taken, so replicas of older builds still exclude newer ones.)
pub const LOCK_KEY_SQL: &str = "hashtextextended('aggregator projection ' || $1, 0)";

/// A session-level advisory lock held on a connection of its own, kept alive by a heartbeat.
///
/// The lock lasts as long as its session. A worker that dies or closes the connection releases
/// it at once; one that goes silent with the connection open (a partition, a frozen node)
/// releases it when the server's `idle_session_timeout` (the lease, set on this session only)
/// ends the session: the heartbeat sends a statement every fifth of the lease, so a live holder
/// never comes near it. The heartbeat also tells the holder when its session stops answering,
/// before the server can have given the lock away. Dropping the lock closes the connection.
struct ConsumerLock {
    /// The takeover epoch this holder wrote into the checkpoint.
    epoch: i64,
    lost: watch::Receiver<bool>,
    heartbeat: JoinHandle<()>,
}

impl Drop for ConsumerLock {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

impl ConsumerLock {
    /// Waits until the lock is ours, trying every `timing.retry`, and takes the consumer over.
    async fn acquire(
        pool: sqlx::PgPool,
        consumer: Arc<str>,
        version: i32,
        timing: LockTiming,
        holds_lock: Arc<AtomicBool>,
    ) -> Self {
        let mut waiting_logged = false;
        loop {
            match Self::try_acquire(&pool, &consumer, version, timing.lease, &holds_lock).await {
                Ok(Some(lock)) => return lock,
                Ok(None) => {
                    if !waiting_logged {
                        tracing::info!(%consumer, "another worker holds it; standing by");
                        waiting_logged = true;
                    }
                }
                Err(error) => {
                    tracing::warn!(%consumer, %error, "could not try the lock");
                }
            }
            tokio::time::sleep(timing.retry).await;
        }
    }

    async fn try_acquire(
        pool: &sqlx::PgPool,
        consumer: &Arc<str>,
        version: i32,
        lease: Duration,
        holds_lock: &Arc<AtomicBool>,
    ) -> Result<Option<Self>, sqlx::Error> {
        let lease_ms = lease.as_millis().max(1).to_string();
        let options = pool
            .connect_options()
            .as_ref()
            .clone()
            .application_name(&format!(
                "aggregator {} pid {}",
                consumer,
                std::process::id()
            ))
            .options([("idle_session_timeout", lease_ms.as_str())]);
        let mut connection = PgConnection::connect_with(&options).await?;
        let locked: bool =
            sqlx::query_scalar(&format!("SELECT pg_try_advisory_lock({LOCK_KEY_SQL})"))
                .bind(consumer.as_ref())
                .fetch_one(&mut connection)
                .await?;
        if !locked {
            connection.close().await.ok();
            return Ok(None);
        }
        // Waits for a commit of the previous holder in flight on the checkpoint row; an error
        // drops the connection, and the lock with it.
        let checkpoint = pg_take_over(&mut connection, consumer, version).await?;
        tracing::info!(%consumer, epoch = checkpoint.epoch, "took over");
        let (lost_sender, lost) = watch::channel(false);
        let heartbeat = tokio::spawn(heartbeat(
            connection,
            consumer.clone(),
            lease,
            lost_sender,
            holds_lock.clone(),
        ));
        Ok(Some(Self {
            epoch: checkpoint.epoch,
            lost,
            heartbeat,
        }))
    }

    fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }
}

/// Keeps the lock's session busy enough that the server never finds it idle for the lease, and
/// says when it stops answering: an error, or no answer within four fifths of the lease. The
/// server cannot end the session sooner than a lease after the last heartbeat it answered, so a
/// holder learns of the loss before any other worker can take the lock.
async fn heartbeat(
    mut connection: PgConnection,
    consumer: Arc<str>,
    lease: Duration,
    lost: watch::Sender<bool>,
    holds_lock: Arc<AtomicBool>,
) {
    let every = lease / 5;
    loop {
        tokio::time::sleep(every).await;
        match tokio::time::timeout(lease - every, connection.ping()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(%consumer, %error, "lost the lock's connection");
                break;
            }
            Err(_) => {
                tracing::warn!(
                    %consumer,
                    "the lock's connection did not answer within the lease; the server ends \
                     such a session and another worker may take over"
                );
                break;
            }
        }
    }
    holds_lock.store(false, Ordering::Relaxed);
    lost.send_replace(true);
}
