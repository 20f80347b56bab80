//! The projection worker: reads the message store in global order, in batches, and writes each
//! batch into the read model together with its checkpoint, in one transaction.
//!
//! - [`Projector::process_next_batch`] is one step, for tests and for the loop.
//! - [`Projector::run`] is the loop: take the projection's advisory lock (PostgreSQL), work
//!   through the backlog, then sleep on the store's subscription until a wake-up or the poll
//!   interval. It never exits on a database error: it logs, backs off and resumes from the
//!   stored checkpoint. It stops on shutdown, between batches: a batch in flight commits or
//!   rolls back as a whole.
//!
//! Several replicas may run. Exactly one holds the session-level advisory lock on a dedicated
//! connection and works; the others retry every `lock_retry` and take over when its connection
//! closes. The lock saves work but correctness does not rest on it: every commit moves the
//! checkpoint by compare-and-set, so a worker that lost its lock without noticing writes nothing.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use message_store::{GlobalPosition, MessageStore};
use sqlx::{Connection, PgConnection};
use tokio::sync::watch;

use crate::read_model::{Committed, ReadModel, Target};
use crate::view::prepare;

/// The version of the users projection. Bump it when what it writes changes, and rebuild.
pub const USERS_VERSION: i32 = 1;

/// What one step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A batch was committed: `events` applied, `skipped` of unknown types passed over, the
    /// checkpoint now at `position`.
    Applied {
        events: usize,
        skipped: usize,
        position: GlobalPosition,
    },
    /// Nothing new to read.
    Idle,
    /// The projection met an event it cannot apply and stopped before it.
    Halted { reason: String },
}

/// Errors a step can meet; all of them are retried by [`Projector::run`].
#[derive(Debug, thiserror::Error)]
pub enum ProjectorError {
    #[error("reading the message store")]
    Store(#[from] message_store::StoreError),
    #[error("writing the read model")]
    ReadModel(#[from] sqlx::Error),
}

/// Counters a caller (a test, the status page) can watch while the worker runs.
#[derive(Debug, Default)]
pub struct ProjectorStats {
    pub events_applied: AtomicU64,
    pub batches: AtomicU64,
    pub holds_lock: AtomicBool,
}

#[derive(Debug, Clone)]
pub struct ProjectorOptions {
    pub batch_size: usize,
    /// How often a standby replica tries to take the projection's lock.
    pub lock_retry: Duration,
}

impl Default for ProjectorOptions {
    fn default() -> Self {
        Self {
            batch_size: 1000,
            lock_retry: Duration::from_secs(1),
        }
    }
}

/// One projection's worker.
pub struct Projector {
    store: Arc<dyn MessageStore>,
    read_model: ReadModel,
    target: Target,
    options: ProjectorOptions,
    checkpoint: Option<GlobalPosition>,
    halted: Option<String>,
    stats: Arc<ProjectorStats>,
    position: watch::Sender<GlobalPosition>,
    lag_measured_at: Option<Instant>,
}

impl Projector {
    pub fn new(
        store: Arc<dyn MessageStore>,
        read_model: ReadModel,
        target: Target,
        options: ProjectorOptions,
    ) -> Self {
        Self {
            store,
            read_model,
            target,
            options,
            checkpoint: None,
            halted: None,
            stats: Arc::default(),
            position: watch::channel(0).0,
            lag_measured_at: None,
        }
    }

    /// The live users projection.
    pub fn users(
        store: Arc<dyn MessageStore>,
        read_model: ReadModel,
        options: ProjectorOptions,
    ) -> Self {
        Self::new(store, read_model, Target::USERS, options)
    }

    pub fn name(&self) -> &'static str {
        self.target.checkpoint
    }

    pub fn stats(&self) -> Arc<ProjectorStats> {
        self.stats.clone()
    }

    /// The committed checkpoint, as it moves: for read-your-writes waits in the same process.
    pub fn positions(&self) -> watch::Receiver<GlobalPosition> {
        self.position.subscribe()
    }

    /// Reads the next batch after the checkpoint and commits it with the checkpoint.
    pub async fn process_next_batch(&mut self) -> Result<Outcome, ProjectorError> {
        if let Some(reason) = &self.halted {
            return Ok(Outcome::Halted {
                reason: reason.clone(),
            });
        }
        loop {
            let from = match self.checkpoint {
                Some(position) => position,
                None => {
                    let checkpoint = self
                        .read_model
                        .ensure_checkpoint(self.target.checkpoint, USERS_VERSION)
                        .await?;
                    self.checkpoint = Some(checkpoint.position);
                    checkpoint.position
                }
            };
            let started = Instant::now();
            let messages = self.store.read_all(from, self.options.batch_size).await?;
            let Some(last) = messages.last() else {
                // Nothing new after our checkpoint. A commit would notice that a reset or a
                // rebuild moved it; with nothing to commit, look.
                let stored = self.read_model.checkpoint(self.target.checkpoint).await?;
                if stored.is_some_and(|stored| stored.position != from) {
                    self.checkpoint = None;
                    continue;
                }
                metrics::gauge!("projection_lag_events", "projection" => self.name()).set(0.0);
                return Ok(Outcome::Idle);
            };
            let mut prepared = prepare(&messages);
            let mut to = match &prepared.poison {
                Some((position, _)) => position.saturating_sub(1).max(from),
                None => last.global_position,
            };
            let mut poison = prepared.poison.take().map(|(_, reason)| reason);
            let committed = loop {
                match self
                    .read_model
                    .commit(&self.target, from, to, &prepared.changes)
                    .await?
                {
                    Committed::Poison { index, reason } => {
                        // Commit what comes before it, and stop there.
                        to = prepared.changes[index].position.saturating_sub(1).max(from);
                        prepared.changes.truncate(index);
                        poison = Some(reason);
                    }
                    other => break other,
                }
            };
            if committed == Committed::CheckpointMoved {
                tracing::warn!(
                    projection = self.name(),
                    "the checkpoint moved under this worker (another replica, a reset or a \
                     rebuild); reloading it"
                );
                self.checkpoint = None;
                continue;
            }
            self.checkpoint = Some(to);
            let events = prepared.changes.len();
            let name = self.name();
            metrics::histogram!("projection_batch_seconds", "projection" => name)
                .record(started.elapsed().as_secs_f64());
            metrics::counter!("projection_events_applied_total", "projection" => name)
                .increment(events as u64);
            metrics::counter!("projection_events_skipped_total", "projection" => name)
                .increment(prepared.skipped as u64);
            metrics::gauge!("projection_position", "projection" => name).set(to as f64);
            self.stats
                .events_applied
                .fetch_add(events as u64, Ordering::Relaxed);
            self.stats.batches.fetch_add(1, Ordering::Relaxed);
            self.position.send_replace(to);
            self.measure_lag(to).await;
            if let Some(reason) = poison {
                tracing::error!(
                    projection = name,
                    checkpoint = to,
                    %reason,
                    "projection halted: an event it knows cannot be applied; the checkpoint \
                     stays before it. Fix the event's reader (an upcaster) or the data, then \
                     restart the aggregator"
                );
                metrics::gauge!("projection_halted", "projection" => name).set(1.0);
                self.halted = Some(reason.clone());
                return Ok(Outcome::Halted { reason });
            }
            return Ok(Outcome::Applied {
                events,
                skipped: prepared.skipped,
                position: to,
            });
        }
    }

    /// `projection_lag_events`, at most once a second: counting the backlog is not free.
    async fn measure_lag(&mut self, checkpoint: GlobalPosition) {
        if self
            .lag_measured_at
            .is_some_and(|at| at.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        self.lag_measured_at = Some(Instant::now());
        if let Ok(lag) = self.store.count_after(checkpoint).await {
            metrics::gauge!("projection_lag_events", "projection" => self.name()).set(lag as f64);
        }
    }

    /// Works until `shutdown` completes. Never returns early on errors.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        metrics::gauge!("projection_halted", "projection" => self.name()).set(0.0);
        let mut subscription = self.store.subscribe();
        let mut backoff = Duration::from_millis(100);
        'holding: loop {
            let mut lock = match &self.read_model {
                ReadModel::Postgres(pool) => {
                    let pool = pool.clone();
                    tokio::select! {
                        lock = ProjectionLock::acquire(&pool, self.name(), self.options.lock_retry) => Some(lock),
                        () = &mut shutdown => break 'holding,
                    }
                }
                // SQLite is the single-process mode: there is one worker.
                ReadModel::Sqlite(_) => None,
            };
            self.stats.holds_lock.store(true, Ordering::Relaxed);
            // The checkpoint may have moved while another replica held the lock.
            self.checkpoint = None;
            tracing::info!(projection = self.name(), "projecting");
            loop {
                tokio::select! {
                    biased;
                    () = &mut shutdown => break 'holding,
                    () = std::future::ready(()) => {}
                }
                if let Some(held) = &mut lock
                    && !held.still_held().await
                {
                    tracing::warn!(
                        projection = self.name(),
                        "lost the projection lock's connection; taking it again"
                    );
                    self.stats.holds_lock.store(false, Ordering::Relaxed);
                    continue 'holding;
                }
                match self.process_next_batch().await {
                    Ok(Outcome::Applied { .. }) => backoff = Duration::from_millis(100),
                    Ok(Outcome::Idle) => {
                        backoff = Duration::from_millis(100);
                        tokio::select! {
                            _ = subscription.next() => {}
                            () = &mut shutdown => break 'holding,
                        }
                    }
                    Ok(Outcome::Halted { .. }) => {
                        // Keep the lock (a standby would only halt too) and keep serving
                        // health and metrics until told to stop.
                        (&mut shutdown).await;
                        break 'holding;
                    }
                    Err(error) => {
                        tracing::error!(
                            projection = self.name(),
                            error = %error,
                            cause = ?std::error::Error::source(&error),
                            "projection batch failed; retrying after {backoff:?}"
                        );
                        self.checkpoint = None;
                        tokio::select! {
                            () = tokio::time::sleep(backoff) => {}
                            () = &mut shutdown => break 'holding,
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
        self.stats.holds_lock.store(false, Ordering::Relaxed);
        tracing::info!(projection = self.name(), "projector stopped");
    }
}

/// The advisory lock key of a projection: one namespace, apart from the store's stream locks.
pub const LOCK_KEY_SQL: &str = "hashtextextended('aggregator projection ' || $1, 0)";

/// A session-level advisory lock held on a connection of its own: it lasts as long as the
/// connection, so a worker that dies (or loses the network) releases it.
struct ProjectionLock {
    connection: PgConnection,
    checked_at: Instant,
}

impl ProjectionLock {
    /// Waits until the lock is ours, trying every `retry`.
    async fn acquire(pool: &sqlx::PgPool, projection: &str, retry: Duration) -> Self {
        let mut waiting_logged = false;
        loop {
            match Self::try_acquire(pool, projection).await {
                Ok(Some(lock)) => return lock,
                Ok(None) => {
                    if !waiting_logged {
                        tracing::info!(
                            projection,
                            "another worker holds the projection; standing by"
                        );
                        waiting_logged = true;
                    }
                }
                Err(error) => {
                    tracing::warn!(projection, %error, "could not try the projection lock");
                }
            }
            tokio::time::sleep(retry).await;
        }
    }

    async fn try_acquire(
        pool: &sqlx::PgPool,
        projection: &str,
    ) -> Result<Option<Self>, sqlx::Error> {
        let options = pool
            .connect_options()
            .as_ref()
            .clone()
            .application_name(&format!(
                "aggregator {} pid {}",
                projection,
                std::process::id()
            ));
        let mut connection = PgConnection::connect_with(&options).await?;
        let locked: bool =
            sqlx::query_scalar(&format!("SELECT pg_try_advisory_lock({LOCK_KEY_SQL})"))
                .bind(projection)
                .fetch_one(&mut connection)
                .await?;
        if locked {
            Ok(Some(Self {
                connection,
                checked_at: Instant::now(),
            }))
        } else {
            connection.close().await.ok();
            Ok(None)
        }
    }

    /// Whether the lock's connection still answers (checked at most once a second; the
    /// checkpoint compare-and-set covers the moments between).
    async fn still_held(&mut self) -> bool {
        if self.checked_at.elapsed() < Duration::from_secs(1) {
            return true;
        }
        self.checked_at = Instant::now();
        self.connection.ping().await.is_ok()
    }
}
