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
//! connection and works; the others retry every `lock_retry` and take over when its session
//! ends. A holder keeps its session alive with a heartbeat, and the server ends a session that
//! stays silent for the `lock_lease` (`idle_session_timeout`), so a holder that is cut off
//! without its connection closing (a partition, a frozen node) loses the lock within the lease
//! too (docs/adr/0008). The lock saves work but correctness does not rest on it: every commit
//! moves the checkpoint by compare-and-set on its position, the projection's version and the
//! takeover epoch, which each new holder bumps; a worker that lost its lock, even one that has
//! not noticed yet and whose connection heals, writes nothing.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use std::collections::HashSet;

use message_store::{GlobalPosition, MessageStore, RecordedMessage, StoreError, Subscription};
use read_model_schema::USERS_VERSION;
use sqlx::{Connection, PgConnection};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::read_model::{Checkpoint, Committed, ReadModelWriter, Target, pg_take_over};
use crate::view::{Change, RowId, Rows, apply, prepare};

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
    /// The view was built by another version of the projection (a rebuild by a newer build, or
    /// a view an older build left): this worker writes nothing into it.
    #[error(
        "the view holds version {stored} of the projection and this worker folds version \
         {ours}; it writes nothing until a rebuild or reset at its version"
    )]
    OtherVersion { stored: i32, ours: i32 },
    /// Another worker took the projection's lock (and bumped its epoch) since this one took it.
    #[error("another worker took the projection over")]
    TakenOver,
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
    /// Messages per read of the store.
    pub batch_size: usize,
    /// How often a standby replica tries to take the projection's lock.
    pub lock_retry: Duration,
    /// How long the server keeps the lock of a holder that has gone silent (docs/adr/0008):
    /// the lock's session ends after this long without a statement (the holder's heartbeat
    /// sends one every fifth of it), and so does a batch transaction of the holder that sits
    /// idle this long. A standby takes over within `lock_lease + lock_retry` of a holder being
    /// cut off.
    pub lock_lease: Duration,
    /// Keep reading and folding batches in memory until this many rows wait to be written (or
    /// the backlog is drained), then write them with the checkpoint in one transaction. A row
    /// changed by many events of those batches is written once. 0: one transaction per batch
    /// read (the live worker: the lowest lag). Bounds the rows held for one commit.
    pub fold_rows: usize,
    /// The rows kept in memory between commits (see [`Projector`]): cleared when it grows past
    /// this, and whenever the checkpoint moved under the worker.
    pub cache_rows: usize,
}

impl Default for ProjectorOptions {
    fn default() -> Self {
        Self {
            batch_size: 1000,
            lock_retry: Duration::from_secs(1),
            lock_lease: Duration::from_secs(5),
            fold_rows: 0,
            cache_rows: 500_000,
        }
    }
}

/// One projection's worker.
///
/// It keeps the rows it has read or written in memory between batches (`cache`), so a batch
/// reads from the view only the rows it has not met. Those rows are the view as of the worker's
/// checkpoint: they are loaded together with the checkpoint in one statement, and every commit
/// moves the checkpoint by compare-and-set from the position the rows belong to. Whenever the
/// checkpoint turns out to have moved under the worker (another replica, a reset, a rebuild),
/// or a step fails, the cache is dropped and reloaded. Rows are a function of the events up to
/// the checkpoint, so a cache that matches the stored checkpoint matches the stored rows.
pub struct Projector {
    store: Arc<dyn MessageStore>,
    read_model: ReadModelWriter,
    target: Target,
    version: i32,
    options: ProjectorOptions,
    checkpoint: Option<Checkpoint>,
    /// The epoch this worker set when it took the projection's lock; `None` when it works
    /// without the lock (stepped by a test or a rebuild, or on SQLite), and then it follows
    /// whichever epoch it finds.
    fence: Option<i64>,
    halted: Option<String>,
    stats: Arc<ProjectorStats>,
    position: watch::Sender<GlobalPosition>,
    lag_measured_at: Option<Instant>,
    cache: Rows,
    prefetch: Option<Prefetch>,
}

/// What [`Projector::fold_batches`] found after the checkpoint.
enum Folded {
    /// Nothing new.
    Nothing,
    /// The checkpoint moved under the worker while it loaded rows: nothing is to be written.
    CheckpointMoved,
    Batches(Fold),
}

/// Batches folded into the cached rows, waiting to be committed with the checkpoint `to`.
struct Fold {
    to: GlobalPosition,
    events: usize,
    skipped: usize,
    /// Why the event after `to` cannot be applied, when one cannot.
    poison: Option<String>,
    /// The rows the fold changed.
    dirty: HashSet<RowId>,
}

/// A read of the next batch, started while the current one is folded and committed.
struct Prefetch {
    from: GlobalPosition,
    task: JoinHandle<Result<Vec<RecordedMessage>, StoreError>>,
}

impl Drop for Projector {
    fn drop(&mut self) {
        if let Some(prefetch) = self.prefetch.take() {
            prefetch.task.abort();
        }
    }
}

impl Projector {
    pub fn new(
        store: Arc<dyn MessageStore>,
        read_model: ReadModelWriter,
        target: Target,
        options: ProjectorOptions,
    ) -> Self {
        Self {
            store,
            read_model,
            target,
            version: USERS_VERSION,
            options,
            checkpoint: None,
            fence: None,
            halted: None,
            stats: Arc::default(),
            position: watch::channel(0).0,
            lag_measured_at: None,
            cache: Rows::default(),
            prefetch: None,
        }
    }

    /// The live users projection.
    pub fn users(
        store: Arc<dyn MessageStore>,
        read_model: ReadModelWriter,
        options: ProjectorOptions,
    ) -> Self {
        Self::new(store, read_model, Target::USERS, options)
    }

    /// A projector that folds as `version` of the projection rather than this build's: what a
    /// replica of an older or newer build does, for tests of upgrades.
    pub fn with_version(mut self, version: i32) -> Self {
        self.version = version;
        self
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

    /// Reads the next batch after the checkpoint and commits it with the checkpoint (or, with
    /// [`ProjectorOptions::fold_rows`], several batches folded in memory into one commit).
    pub async fn process_next_batch(&mut self) -> Result<Outcome, ProjectorError> {
        if let Some(reason) = &self.halted {
            return Ok(Outcome::Halted {
                reason: reason.clone(),
            });
        }
        let outcome = self.step().await;
        if outcome.is_err() {
            // The cache may hold folds that never committed.
            self.forget();
        }
        outcome
    }

    /// Drops everything remembered about the read model: the checkpoint, the cached rows and
    /// a read ahead. The next step starts again from the stored checkpoint.
    fn forget(&mut self) {
        self.checkpoint = None;
        self.cache.clear();
        if let Some(prefetch) = self.prefetch.take() {
            prefetch.task.abort();
        }
    }

    /// The messages after `from`: the read started ahead of time if it was for `from` and found
    /// something, else a fresh read. A read ahead that found nothing is not trusted: it may
    /// predate the wake-up being handled.
    async fn read(&mut self, from: GlobalPosition) -> Result<Vec<RecordedMessage>, ProjectorError> {
        if let Some(prefetch) = self.prefetch.take() {
            if prefetch.from == from {
                if let Ok(Ok(messages)) = prefetch.task.await
                    && !messages.is_empty()
                {
                    return Ok(messages);
                }
            } else {
                prefetch.task.abort();
            }
        }
        Ok(self.store.read_all(from, self.options.batch_size).await?)
    }

    /// Starts reading the batch after `from` while this one is folded and committed.
    fn read_ahead(&mut self, from: GlobalPosition) {
        let store = self.store.clone();
        let max = self.options.batch_size;
        self.prefetch = Some(Prefetch {
            from,
            task: tokio::spawn(async move { store.read_all(from, max).await }),
        });
    }

    async fn step(&mut self) -> Result<Outcome, ProjectorError> {
        loop {
            let checkpoint = self.current_checkpoint().await?;
            let started = Instant::now();
            let fold = match self.fold_batches(&checkpoint).await? {
                Folded::CheckpointMoved => {
                    self.checkpoint_moved();
                    continue;
                }
                Folded::Nothing => match self.idle(&checkpoint).await? {
                    Some(outcome) => return Ok(outcome),
                    None => continue,
                },
                Folded::Batches(fold) => fold,
            };
            if !self.commit(&checkpoint, &fold).await? {
                self.checkpoint_moved();
                continue;
            }
            self.record(&fold, started).await;
            if let Some(reason) = fold.poison {
                let reason = format!(
                    "an event it knows cannot be applied ({reason}); the checkpoint stays before \
                     it. Fix the event's reader (an upcaster) or the data, then restart the \
                     aggregator"
                );
                return Ok(self.halt(fold.to, reason));
            }
            return Ok(Outcome::Applied {
                events: fold.events,
                skipped: fold.skipped,
                position: fold.to,
            });
        }
    }

    /// The checkpoint this worker writes on top of: the one it committed last, or the stored one
    /// (created at 0 if there is none) once it has forgotten it.
    async fn current_checkpoint(&mut self) -> Result<Checkpoint, ProjectorError> {
        if let Some(checkpoint) = self.checkpoint {
            return Ok(checkpoint);
        }
        self.cache.clear();
        let mut checkpoint = self
            .read_model
            .ensure_checkpoint(self.target.checkpoint, self.version)
            .await?;
        if checkpoint.version < self.version
            && matches!(self.read_model, ReadModelWriter::Sqlite(_))
        {
            checkpoint = self.replay_older_view(checkpoint).await?;
        }
        self.may_write_after(&checkpoint)?;
        self.checkpoint = Some(checkpoint);
        Ok(checkpoint)
    }

    /// Empties a view an older version of the projection folded, so that this worker replays
    /// it from the start. Only on SQLite, the standalone mode: one process, one worker, no
    /// replica of the older build still serving the view, and no `rebuild` (docs/adr/0008 says
    /// how PostgreSQL deployments switch versions: the newer build's `rebuild`).
    async fn replay_older_view(&self, older: Checkpoint) -> Result<Checkpoint, ProjectorError> {
        tracing::warn!(
            projection = self.name(),
            stored = older.version,
            ours = self.version,
            "the view was folded by an older version of the projection; replaying it from the \
             start"
        );
        self.read_model.reset(&self.target, self.version).await?;
        Ok(self
            .read_model
            .ensure_checkpoint(self.target.checkpoint, self.version)
            .await?)
    }

    /// Reads, decodes and folds batches into the cached rows until enough rows wait to be
    /// written (one batch unless `fold_rows` says more), the backlog is drained, or an event
    /// cannot be applied. Nothing is written, so no transaction is open meanwhile.
    async fn fold_batches(&mut self, checkpoint: &Checkpoint) -> Result<Folded, ProjectorError> {
        let mut fold = Fold {
            to: checkpoint.position,
            events: 0,
            skipped: 0,
            poison: None,
            dirty: HashSet::new(),
        };
        let mut read_any = false;
        loop {
            let messages = self.read(fold.to).await?;
            let Some(last) = messages.last() else { break };
            read_any = true;
            let last_position = last.global_position;
            let full = messages.len() >= self.options.batch_size;
            if full {
                self.read_ahead(last_position);
            }
            let prepared = prepare(&messages);
            drop(messages);
            fold.skipped += prepared.skipped;
            if !self
                .load_missing_rows(checkpoint, &prepared.changes)
                .await?
            {
                return Ok(Folded::CheckpointMoved);
            }
            let mut batch_to = last_position;
            if let Some((position, reason)) = prepared.poison {
                batch_to = position.saturating_sub(1).max(fold.to);
                fold.poison = Some(reason);
            }
            for change in &prepared.changes {
                match apply(&mut self.cache, change) {
                    Ok(changed) => {
                        if changed {
                            fold.dirty.insert(change.row());
                        }
                        fold.events += 1;
                    }
                    Err(reason) => {
                        // Commit what comes before it, and stop there.
                        batch_to = change.position.saturating_sub(1).max(fold.to);
                        fold.poison = Some(reason);
                        break;
                    }
                }
            }
            fold.to = batch_to;
            if fold.poison.is_some() || !full || fold.dirty.len() >= self.options.fold_rows {
                break;
            }
        }
        Ok(if read_any {
            Folded::Batches(fold)
        } else {
            Folded::Nothing
        })
    }

    /// Brings the rows `changes` touch and the cache does not hold into it, as of `checkpoint`
    /// (this step has written nothing yet). False when the checkpoint has moved meanwhile.
    async fn load_missing_rows(
        &mut self,
        checkpoint: &Checkpoint,
        changes: &[Change],
    ) -> Result<bool, ProjectorError> {
        let mut missing: Vec<RowId> = changes
            .iter()
            .map(Change::row)
            .filter(|id| !self.cache.contains(*id))
            .collect();
        if missing.is_empty() {
            return Ok(true);
        }
        missing.sort_unstable();
        missing.dedup();
        let Some(rows) = self
            .read_model
            .load_rows(&self.target, checkpoint, &missing)
            .await?
        else {
            return Ok(false);
        };
        self.cache.extend(rows);
        Ok(true)
    }

    /// Nothing new after the checkpoint. A commit would notice that a reset or a rebuild moved
    /// it; with nothing to commit, look (`None`: it moved, start over). And a view ahead of its
    /// store must not go on.
    async fn idle(&mut self, checkpoint: &Checkpoint) -> Result<Option<Outcome>, ProjectorError> {
        let stored = self.read_model.checkpoint(self.target.checkpoint).await?;
        if stored.is_some_and(|stored| stored != *checkpoint) {
            self.forget();
            return Ok(None);
        }
        if let Some(reason) = self.store_behind(checkpoint.position).await? {
            return Ok(Some(self.halt(checkpoint.position, reason)));
        }
        metrics::gauge!("projection_lag_events", "projection" => self.name()).set(0.0);
        Ok(Some(Outcome::Idle))
    }

    /// Writes the rows a fold changed with the checkpoint it reached, in one transaction. False
    /// when the checkpoint was no longer where the fold started: nothing was written.
    async fn commit(
        &mut self,
        checkpoint: &Checkpoint,
        fold: &Fold,
    ) -> Result<bool, ProjectorError> {
        let mut ids: Vec<RowId> = fold.dirty.iter().copied().collect();
        ids.sort_unstable();
        let rows = self.cache.select(&ids);
        let idle_limit = Some(self.options.lock_lease);
        let committed = self
            .read_model
            .write_rows(&self.target, checkpoint, fold.to, &rows, idle_limit)
            .await?;
        if committed == Committed::CheckpointMoved {
            return Ok(false);
        }
        self.checkpoint = Some(checkpoint.at(fold.to));
        if self.cache.len() > self.options.cache_rows {
            self.cache.clear();
        }
        Ok(true)
    }

    /// What a committed fold tells the metrics, the stats and the read-your-writes waiters.
    async fn record(&mut self, fold: &Fold, started: Instant) {
        let name = self.name();
        metrics::histogram!("projection_batch_seconds", "projection" => name)
            .record(started.elapsed().as_secs_f64());
        metrics::counter!("projection_events_applied_total", "projection" => name)
            .increment(fold.events as u64);
        metrics::counter!("projection_events_skipped_total", "projection" => name)
            .increment(fold.skipped as u64);
        metrics::gauge!("projection_position", "projection" => name).set(fold.to as f64);
        self.stats
            .events_applied
            .fetch_add(fold.events as u64, Ordering::Relaxed);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.position.send_replace(fold.to);
        self.measure_lag(fold.to).await;
    }

    /// Stops the projection where it is, until the process restarts, and says why.
    fn halt(&mut self, checkpoint: GlobalPosition, reason: String) -> Outcome {
        let name = self.name();
        tracing::error!(projection = name, checkpoint, %reason, "projection halted");
        metrics::gauge!("projection_halted", "projection" => name).set(1.0);
        self.halted = Some(reason.clone());
        self.forget();
        Outcome::Halted { reason }
    }

    /// Why the projection must not go on from `checkpoint`, when the store's last message lies
    /// below it: the view holds events the store no longer has (a restore from an older point,
    /// or a failover that lost commits the read model had applied), and new messages could be
    /// written at positions the checkpoint has passed, where this worker would never see them.
    async fn store_behind(
        &self,
        checkpoint: GlobalPosition,
    ) -> Result<Option<String>, ProjectorError> {
        let last = self.store.last_position().await?;
        Ok((last < checkpoint).then(|| {
            format!(
                "the read model has applied events up to position {checkpoint}, but the message \
                 store's last position is {last}: the store was restored from an older point, or \
                 a failover lost commits. Rebuild the view from the store (`aggregator rebuild \
                 --projection {}`), then restart the aggregator",
                self.target.checkpoint
            )
        }))
    }

    /// Whether this worker may write on top of `stored`: it folds the view's version, and no
    /// other worker took the projection over since this one took its lock.
    fn may_write_after(&self, stored: &Checkpoint) -> Result<(), ProjectorError> {
        if stored.version != self.version {
            return Err(ProjectorError::OtherVersion {
                stored: stored.version,
                ours: self.version,
            });
        }
        if self.fence.is_some_and(|epoch| epoch != stored.epoch) {
            return Err(ProjectorError::TakenOver);
        }
        Ok(())
    }

    fn checkpoint_moved(&mut self) {
        tracing::warn!(
            projection = self.name(),
            "the checkpoint moved under this worker (another replica, a reset or a rebuild); \
             reloading it"
        );
        self.forget();
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
        while let Some(lock) = self.take_lock(shutdown.as_mut()).await {
            let held = self
                .work_while_holding(lock, &mut subscription, shutdown.as_mut())
                .await;
            if held == Held::UntilShutdown {
                break;
            }
        }
        self.stats.holds_lock.store(false, Ordering::Relaxed);
        tracing::info!(projection = self.name(), "projector stopped");
    }

    /// Waits until this worker holds the projection's lock (`Some(None)` on SQLite, the
    /// single-process mode, where there is one worker); `None` when `shutdown` came first.
    async fn take_lock<S: Future<Output = ()>>(
        &mut self,
        mut shutdown: std::pin::Pin<&mut S>,
    ) -> Option<Option<ProjectionLock>> {
        let lock = match &self.read_model {
            ReadModelWriter::Postgres(pool) => {
                let acquire = ProjectionLock::acquire(
                    pool.clone(),
                    self.name(),
                    self.version,
                    &self.options,
                    self.stats.clone(),
                );
                tokio::select! {
                    lock = acquire => Some(lock),
                    () = &mut shutdown => return None,
                }
            }
            ReadModelWriter::Sqlite(_) => None,
        };
        self.fence = lock.as_ref().map(|lock| lock.epoch);
        self.stats.holds_lock.store(true, Ordering::Relaxed);
        // The checkpoint may have moved while another replica held the lock.
        self.forget();
        tracing::info!(projection = self.name(), "projecting");
        Some(lock)
    }

    /// Projects batch after batch while `lock` holds, sleeping on `subscription` when idle, and
    /// backing off on errors. Returns when told to stop, or when the lock is lost or must be let
    /// go (another holder, or a view of another version), to be taken again or waited for.
    async fn work_while_holding<S: Future<Output = ()>>(
        &mut self,
        mut lock: Option<ProjectionLock>,
        subscription: &mut Subscription,
        mut shutdown: std::pin::Pin<&mut S>,
    ) -> Held {
        let mut backoff = Duration::from_millis(100);
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => return Held::UntilShutdown,
                () = std::future::ready(()) => {}
            }
            if lock.as_ref().is_some_and(ProjectionLock::is_lost) {
                // The heartbeat has said so; take it again, or stand by.
                return Held::UntilLost;
            }
            // A batch in flight when the lock is lost is not cut short: its commit compares the
            // epoch, which the next holder has bumped, and writes nothing.
            match self.process_next_batch().await {
                Ok(Outcome::Applied { .. }) => backoff = Duration::from_millis(100),
                Ok(Outcome::Idle) => {
                    backoff = Duration::from_millis(100);
                    tokio::select! {
                        _ = subscription.next() => {}
                        () = lost(&mut lock) => {}
                        () = &mut shutdown => return Held::UntilShutdown,
                    }
                }
                Ok(Outcome::Halted { .. }) => {
                    // Keep the lock (a standby would only halt too) and keep serving health
                    // and metrics until told to stop.
                    shutdown.await;
                    return Held::UntilShutdown;
                }
                Err(error) => {
                    // Another holder, or a view of another version: let go of the lock, so a
                    // worker that may write (a newer build's, say) can take it.
                    let let_go = matches!(
                        error,
                        ProjectorError::TakenOver | ProjectorError::OtherVersion { .. }
                    );
                    tracing::error!(
                        projection = self.name(),
                        error = %error,
                        cause = ?std::error::Error::source(&error),
                        "projection batch failed; retrying after {backoff:?}"
                    );
                    self.forget();
                    if let_go {
                        drop(lock.take());
                        self.stats.holds_lock.store(false, Ordering::Relaxed);
                    }
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = &mut shutdown => return Held::UntilShutdown,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    if let_go {
                        return Held::UntilLost;
                    }
                }
            }
        }
    }
}

/// How long a worker held the projection's lock.
#[derive(Debug, PartialEq, Eq)]
enum Held {
    /// Until it was told to stop.
    UntilShutdown,
    /// Until it lost the lock or let it go.
    UntilLost,
}

/// Completes when the heartbeat of `lock` finds it lost; never without a lock.
async fn lost(lock: &mut Option<ProjectionLock>) {
    match lock {
        Some(lock) => {
            let _ = lock.lost.wait_for(|lost| *lost).await;
        }
        None => std::future::pending().await,
    }
}

/// The advisory lock key of a projection: one namespace, apart from the store's stream locks.
pub const LOCK_KEY_SQL: &str = "hashtextextended('aggregator projection ' || $1, 0)";

/// A session-level advisory lock held on a connection of its own, kept alive by a heartbeat.
///
/// The lock lasts as long as its session. A worker that dies or closes the connection releases
/// it at once; one that goes silent with the connection open (a partition, a frozen node)
/// releases it when the server's `idle_session_timeout` (the lease, set on this session only)
/// ends the session: the heartbeat sends a statement every fifth of the lease, so a live holder
/// never comes near it. The heartbeat also tells the holder when its session stops answering,
/// before the server can have given the lock away. Dropping the lock closes the connection.
struct ProjectionLock {
    /// The takeover epoch this holder wrote into the checkpoint.
    epoch: i64,
    lost: watch::Receiver<bool>,
    heartbeat: JoinHandle<()>,
}

impl Drop for ProjectionLock {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

impl ProjectionLock {
    /// Waits until the lock is ours, trying every `lock_retry`, and takes the projection over.
    async fn acquire(
        pool: sqlx::PgPool,
        projection: &'static str,
        version: i32,
        options: &ProjectorOptions,
        stats: Arc<ProjectorStats>,
    ) -> Self {
        let mut waiting_logged = false;
        loop {
            match Self::try_acquire(&pool, projection, version, options.lock_lease, &stats).await {
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
            tokio::time::sleep(options.lock_retry).await;
        }
    }

    async fn try_acquire(
        pool: &sqlx::PgPool,
        projection: &'static str,
        version: i32,
        lease: Duration,
        stats: &Arc<ProjectorStats>,
    ) -> Result<Option<Self>, sqlx::Error> {
        let lease_ms = lease.as_millis().max(1).to_string();
        let options = pool
            .connect_options()
            .as_ref()
            .clone()
            .application_name(&format!(
                "aggregator {} pid {}",
                projection,
                std::process::id()
            ))
            .options([("idle_session_timeout", lease_ms.as_str())]);
        let mut connection = PgConnection::connect_with(&options).await?;
        let locked: bool =
            sqlx::query_scalar(&format!("SELECT pg_try_advisory_lock({LOCK_KEY_SQL})"))
                .bind(projection)
                .fetch_one(&mut connection)
                .await?;
        if !locked {
            connection.close().await.ok();
            return Ok(None);
        }
        // Waits for a commit of the previous holder in flight on the checkpoint row; an error
        // drops the connection, and the lock with it.
        let checkpoint = pg_take_over(&mut connection, projection, version).await?;
        tracing::info!(
            projection,
            epoch = checkpoint.epoch,
            "took the projection over"
        );
        let (lost_sender, lost) = watch::channel(false);
        let heartbeat = tokio::spawn(heartbeat(
            connection,
            projection,
            lease,
            lost_sender,
            stats.clone(),
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
    projection: &'static str,
    lease: Duration,
    lost: watch::Sender<bool>,
    stats: Arc<ProjectorStats>,
) {
    let every = lease / 5;
    loop {
        tokio::time::sleep(every).await;
        match tokio::time::timeout(lease - every, connection.ping()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(projection, %error, "lost the projection lock's connection");
                break;
            }
            Err(_) => {
                tracing::warn!(
                    projection,
                    "the projection lock's connection did not answer within the lease; the \
                     server ends such a session and another worker may take over"
                );
                break;
            }
        }
    }
    stats.holds_lock.store(false, Ordering::Relaxed);
    lost.send_replace(true);
}
