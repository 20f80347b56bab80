//! The projection worker: reads the message store in global order, in batches, and writes each
//! batch into the read model together with its checkpoint, in one transaction.
//!
//! - [`Projector::process_next_batch`] is one step, for tests and for the loop.
//! - [`Projector::run`] is the loop of every consumer ([`crate::consumer`]): one replica works
//!   while the others stand by to take over (docs/adr/0008); it stops on shutdown between
//!   batches, so a batch in flight commits or rolls back as a whole.
//!
//! Correctness does not rest on the lock: every commit moves the checkpoint by compare-and-set
//! on its position, the projection's version and the takeover epoch, which each new holder
//! bumps; a worker that lost its lock, even one that has not noticed yet and whose connection
//! heals, writes nothing.
//!
//! Personal data (ADR 13): every batch read is unsealed ([`Sealer::unseal_messages`], one key
//! query for the batch) before it is decoded, so an erased person's fields decode as erased.
//! Before a commit that applies a `UserErased`, the worker deletes that account's key from the
//! vault (idempotent): the command that erased it appends the event and then deletes the key,
//! and if it stopped in between, this is where the key goes. A rebuild does the same.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use message_store::{GlobalPosition, MessageStore, RecordedMessage};
use personal_data::{KeyVault, Sealer, VaultError};
use read_model_schema::USERS_VERSION;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::consumer::{self, Consumer, LockTiming, Progress};
use crate::read_model::{Checkpoint, Committed, ReadModelWriter, Target};
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
    /// The key vault did not answer, or a sealed field did not open under its person's key
    /// (the message was altered, or the master keys configured are not the ones it was sealed
    /// under): retried, never read as an erasure.
    #[error("opening the personal data of the messages read")]
    Vault(#[from] VaultError),
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
    /// Shared with the lock's heartbeat, which clears it the moment the lock is lost.
    pub holds_lock: Arc<AtomicBool>,
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
    sealer: Sealer,
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
    /// The accounts whose `UserErased` the fold applied: their keys go before the commit.
    erased: Vec<Uuid>,
}

/// A read of the next batch, started while the current one is folded and committed.
struct Prefetch {
    from: GlobalPosition,
    task: JoinHandle<Result<Vec<RecordedMessage>, ProjectorError>>,
}

/// Up to `max` messages after `from`, their personal fields opened: one read of the store and
/// one key query for the batch.
pub(crate) async fn read_unsealed(
    store: &Arc<dyn MessageStore>,
    sealer: &Sealer,
    from: GlobalPosition,
    max: usize,
) -> Result<Vec<RecordedMessage>, ProjectorError> {
    let mut messages = store.read_all(from, max).await?;
    sealer.unseal_messages(&mut messages).await?;
    Ok(messages)
}

/// Deletes the keys of `accounts`, whose erasures a fold applied, before its commit. Each is
/// idempotent: the command that erased the account has usually deleted the key already.
pub(crate) async fn erase_keys(
    vault: &Arc<dyn KeyVault>,
    accounts: &[Uuid],
) -> Result<(), VaultError> {
    for account in accounts {
        if vault.erase(*account).await? {
            tracing::warn!(
                %account,
                "an erased account's key was still in the vault (the command that erased it \
                 stopped before deleting it); deleted now"
            );
            metrics::counter!("projection_keys_erased_total").increment(1);
        }
    }
    Ok(())
}

impl Drop for Projector {
    fn drop(&mut self) {
        if let Some(prefetch) = self.prefetch.take() {
            prefetch.task.abort();
        }
    }
}

impl Projector {
    /// A projector that reads `store`, opening personal fields with `sealer`, and writes the
    /// views of `target` in `read_model`.
    pub fn new(
        store: Arc<dyn MessageStore>,
        sealer: Sealer,
        read_model: ReadModelWriter,
        target: Target,
        options: ProjectorOptions,
    ) -> Self {
        Self {
            store,
            sealer,
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
        sealer: Sealer,
        read_model: ReadModelWriter,
        options: ProjectorOptions,
    ) -> Self {
        Self::new(store, sealer, read_model, Target::USERS, options)
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
        read_unsealed(&self.store, &self.sealer, from, self.options.batch_size).await
    }

    /// Starts reading (and unsealing) the batch after `from` while this one is folded and
    /// committed.
    fn read_ahead(&mut self, from: GlobalPosition) {
        let (store, sealer) = (self.store.clone(), self.sealer.clone());
        let max = self.options.batch_size;
        self.prefetch = Some(Prefetch {
            from,
            task: tokio::spawn(async move { read_unsealed(&store, &sealer, from, max).await }),
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
            erased: Vec::new(),
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
                        fold.erased.extend(change.erases());
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
            .flat_map(Change::rows)
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

    /// Writes the rows a fold changed with the checkpoint it reached, in one transaction, once
    /// the keys of the accounts it erased are gone. False when the checkpoint was no longer
    /// where the fold started: nothing was written.
    async fn commit(
        &mut self,
        checkpoint: &Checkpoint,
        fold: &Fold,
    ) -> Result<bool, ProjectorError> {
        erase_keys(self.sealer.vault(), &fold.erased).await?;
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
        if !fold.erased.is_empty() {
            self.read_model.empty_write_ahead_log().await?;
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
    /// below it: the view holds events the store no longer has.
    async fn store_behind(
        &self,
        checkpoint: GlobalPosition,
    ) -> Result<Option<String>, ProjectorError> {
        let remedy = format!(
            "The view holds events the store no longer has. Rebuild it from the store \
             (`aggregator rebuild --projection {}`), then restart the aggregator",
            self.target.checkpoint
        );
        Ok(consumer::store_behind(&self.store, checkpoint, &remedy).await?)
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

    /// Works until `shutdown` completes, one replica at a time (see [`crate::consumer`]).
    /// Never returns early on errors.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        metrics::gauge!("projection_halted", "projection" => self.name()).set(0.0);
        consumer::run(self, shutdown).await;
    }
}

#[async_trait]
impl Consumer for Projector {
    type Error = ProjectorError;

    fn name(&self) -> &'static str {
        self.target.checkpoint
    }

    fn version(&self) -> i32 {
        self.version
    }

    fn store(&self) -> &Arc<dyn MessageStore> {
        &self.store
    }

    fn read_model(&self) -> &ReadModelWriter {
        &self.read_model
    }

    fn lock_timing(&self) -> LockTiming {
        LockTiming {
            retry: self.options.lock_retry,
            lease: self.options.lock_lease,
        }
    }

    fn holds_lock(&self) -> Arc<AtomicBool> {
        self.stats.holds_lock.clone()
    }

    async fn step(&mut self) -> Result<Progress, ProjectorError> {
        Ok(match self.process_next_batch().await? {
            Outcome::Applied { .. } => Progress::Worked,
            Outcome::Idle => Progress::Idle,
            Outcome::Halted { .. } => Progress::Halted,
        })
    }

    fn took_over(&mut self, fence: Option<i64>) {
        self.fence = fence;
        // The checkpoint may have moved while another replica held the lock.
        self.forget();
    }

    fn forget(&mut self) {
        Projector::forget(self);
    }

    /// Another holder, or a view of another version: a worker that may write (a newer
    /// build's, say) must be able to take the lock.
    fn must_let_go(&self, error: &ProjectorError) -> bool {
        matches!(
            error,
            ProjectorError::TakenOver | ProjectorError::OtherVersion { .. }
        )
    }
}
