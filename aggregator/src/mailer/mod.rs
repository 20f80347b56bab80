//! The mailer: a consumer of the message store (ADR 12, decision 5) that turns the recovery
//! events calling for a mail into mails, sent by SMTP or written to the outbox.
//!
//! It reads the `userRecovery` category from its own checkpoint (`mailer` in
//! `projection_checkpoints`), one replica at a time, with the loop, the lock and the takeover
//! every consumer shares ([`crate::consumer`]). [`Mailer::process_next_batch`] is one step.
//!
//! **At least once.** A mail is handed to the server before the checkpoint passes its event,
//! and the checkpoint moves only once every mail of the events before it was accepted or
//! refused for good. A crash in between sends the mail again after the restart, with the same
//! `Message-ID` (derived from the event's message id, [`mails`]), so the duplicate is
//! recognisable. A step that fails part way keeps what it finished: the checkpoint moves to the
//! last event done, and the mails of a half-done event that were accepted are remembered, so a
//! retry in the same process does not send them twice.
//!
//! **Failures.** A transient one (a 4xx, the server down, a timeout: [`postman`] says which)
//! fails the step, holding the checkpoint at the event whose mail failed, and the loop retries
//! it with exponential backoff (`aggregator.mailer.retry_*`). A permanent refusal of one mail is
//! logged at `warn` (without the address or the link), counted, and recorded in
//! `mail_refusals`, and the mailer goes on: one refused address never holds up the others.
//!
//! **Expired links** are not sent (see [`mails::Letters::plan`]), and counted.
//!
//! **Erased persons** (ADR 13). Every batch read goes through the [`Sealer`], one key query for
//! the batch, before an event is decoded: the addresses are sealed with their person's key. A
//! request or notice whose person was erased meanwhile reads without its addresses, and its
//! mails are not sent: counted (`mail_erased_total`) and logged by account and kind, never by an
//! address, which is gone anyway.
//!
//! **Reading only its category**, the mailer learns nothing from a read about the messages of
//! other categories; so that its checkpoint (and `aggregator status`'s lag) does not stay at
//! its last recovery event, a read that returns less than a full batch moves the checkpoint up
//! to the store's head as read before it: every message up to that head was readable when the
//! read began (ADR 2), so no recovery event at or below it can still appear.
//!
//! Metrics: `mail_sent_total`, `mail_refused_total`, `mail_expired_total`, `mail_erased_total`
//! (each by `kind`),
//! `mail_retried_total`, `mail_lag_messages` (messages of any stream after the checkpoint) and
//! `mail_halted`.

pub mod mails;
pub mod postman;
pub mod relay;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use identity::{
    EventDecodeError, RECOVERY_CATEGORY, RecoveryEvent, event_version, user_id_of_stream,
};
use message_store::{GlobalPosition, MessageStore, RecordedMessage, StoreError};
use personal_data::{Sealer, VaultError};
use platform::clock::Clock;

use crate::consumer::{self, Backoff, Consumer, LockTiming, Progress};
use crate::read_model::{Checkpoint, MailRefusal, ReadModelWriter};
use mails::{Letters, LinkError, Mail, Planned};
use postman::{Delivery, DeliveryFailure, Postman};

/// The mailer's checkpoint and lock.
pub const MAILER: &str = "mailer";

/// The version of the mailer's checkpoint. A mailer of another version (a newer build that
/// reads its position differently) writes nothing on top of it, as projections do.
pub const MAILER_VERSION: i32 = 1;

#[derive(Debug, Clone)]
pub struct MailerOptions {
    /// Recovery messages per read of the store. A crash sends again at most the mails of one
    /// batch.
    pub batch_size: usize,
    pub lock_retry: Duration,
    pub lock_lease: Duration,
    /// The wait before a step that failed transiently is tried again, doubled each time.
    pub retry: Backoff,
}

impl Default for MailerOptions {
    fn default() -> Self {
        Self {
            batch_size: 100,
            lock_retry: Duration::from_secs(1),
            lock_lease: Duration::from_secs(5),
            retry: Backoff {
                first: Duration::from_secs(1),
                max: Duration::from_secs(60),
            },
        }
    }
}

/// Counters a caller (a test, the status page) can watch while the mailer runs; this mailer's
/// alone, where the metrics are the process's.
#[derive(Debug, Default)]
pub struct MailerStats {
    pub sent: AtomicU64,
    pub refused: AtomicU64,
    pub expired: AtomicU64,
    /// Mails not sent because their person was erased.
    pub erased: AtomicU64,
    /// Steps that failed transiently, each retried.
    pub retried: AtomicU64,
    /// Shared with the lock's heartbeat, which clears it the moment the lock is lost.
    pub holds_lock: Arc<AtomicBool>,
}

/// What one step did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MailOutcome {
    /// The checkpoint moved to `position`: `events` recovery events read (of types it knows),
    /// `sent` mails accepted, `refused` refused for good, `expired` and `erased` (their person
    /// was erased) not sent.
    Handled {
        events: usize,
        sent: usize,
        refused: usize,
        expired: usize,
        erased: usize,
        position: GlobalPosition,
    },
    /// Nothing new to read.
    Idle,
    /// The mailer met an event it cannot read and stopped before it.
    Halted { reason: String },
}

/// Errors a step can meet; all of them are retried by the loop.
#[derive(Debug, thiserror::Error)]
pub enum MailerError {
    #[error("reading the message store")]
    Store(#[from] StoreError),
    #[error("writing the read model")]
    ReadModel(#[from] sqlx::Error),
    /// The key vault did not answer, or a sealed field did not open under its key: retried,
    /// never read as an erasure.
    #[error("opening the personal data of the messages read")]
    Vault(#[from] VaultError),
    #[error("a mail could not be handed over, and is tried again: {0}")]
    Delivery(#[from] DeliveryFailure),
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error(
        "the mailer's checkpoint is of version {stored} and this mailer is version {ours}; it \
         sends nothing until a reset at its version"
    )]
    OtherVersion { stored: i32, ours: i32 },
    #[error("another worker took the mailer over")]
    TakenOver,
}

/// Why handling a message stopped the step.
enum Stop {
    /// Retry it later.
    Failed(MailerError),
    /// It cannot be read: halt before it.
    Poison(String),
}

impl<E: Into<MailerError>> From<E> for Stop {
    fn from(error: E) -> Self {
        Self::Failed(error.into())
    }
}

/// What the messages of one step came to.
#[derive(Debug, Default)]
struct Tally {
    events: usize,
    sent: usize,
    refused: usize,
    expired: usize,
    erased: usize,
}

pub struct Mailer {
    store: Arc<dyn MessageStore>,
    sealer: Sealer,
    read_model: ReadModelWriter,
    postman: Postman,
    letters: Letters,
    clock: Arc<dyn Clock>,
    options: MailerOptions,
    checkpoint: Option<Checkpoint>,
    /// The epoch this worker set when it took the lock; `None` without the lock (stepped by a
    /// test, or on SQLite), and then it follows whichever epoch it finds.
    fence: Option<i64>,
    halted: Option<String>,
    /// The mails handed over (accepted or refused) since the checkpoint, as (the event's
    /// position, the mail's index): a retried step does not send them again.
    delivered: BTreeSet<(GlobalPosition, u8)>,
    stats: Arc<MailerStats>,
    lag_measured_at: Option<Instant>,
}

impl Mailer {
    /// A mailer that reads `store`, opening the addresses with `sealer`, and keeps its
    /// checkpoint and refusals in `read_model`.
    pub fn new(
        store: Arc<dyn MessageStore>,
        sealer: Sealer,
        read_model: ReadModelWriter,
        postman: Postman,
        letters: Letters,
        clock: Arc<dyn Clock>,
        options: MailerOptions,
    ) -> Self {
        Self {
            store,
            sealer,
            read_model,
            postman,
            letters,
            clock,
            options,
            checkpoint: None,
            fence: None,
            halted: None,
            delivered: BTreeSet::new(),
            stats: Arc::default(),
            lag_measured_at: None,
        }
    }

    pub fn stats(&self) -> Arc<MailerStats> {
        self.stats.clone()
    }

    /// Works until `shutdown` completes, one replica at a time (see [`crate::consumer`]).
    /// Never returns early on errors.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        metrics::gauge!("mail_halted").set(0.0);
        consumer::run(self, shutdown).await;
    }

    /// Reads the recovery events after the checkpoint (one batch), sends the mails they call
    /// for, and moves the checkpoint past them.
    pub async fn process_next_batch(&mut self) -> Result<MailOutcome, MailerError> {
        if let Some(reason) = &self.halted {
            return Ok(MailOutcome::Halted {
                reason: reason.clone(),
            });
        }
        loop {
            let checkpoint = self.current_checkpoint().await?;
            // Read before the messages: everything up to it is readable by now (see the module
            // documentation).
            let head = self.store.head_position().await?;
            let mut messages = self
                .store
                .read_category(
                    RECOVERY_CATEGORY,
                    checkpoint.position,
                    self.options.batch_size,
                )
                .await?;
            self.sealer.unseal_messages(&mut messages).await?;
            let read_up_to_head = messages.len() < self.options.batch_size;
            let mut tally = Tally::default();
            let mut done = checkpoint.position;
            for message in &messages {
                match self.handle(message, &mut tally).await {
                    Ok(()) => done = message.global_position,
                    Err(stop) => return self.stop_at(&checkpoint, done, &tally, stop).await,
                }
            }
            if read_up_to_head {
                done = done.max(head);
            }
            if done == checkpoint.position {
                match self.idle(&checkpoint).await? {
                    Some(outcome) => return Ok(outcome),
                    None => continue,
                }
            }
            self.record(&tally);
            if !self.advance(&checkpoint, done).await? {
                self.checkpoint_moved();
                continue;
            }
            return Ok(MailOutcome::Handled {
                events: tally.events,
                sent: tally.sent,
                refused: tally.refused,
                expired: tally.expired,
                erased: tally.erased,
                position: done,
            });
        }
    }

    /// A step that stopped at a message: keep what was done before it, then retry later or
    /// halt.
    async fn stop_at(
        &mut self,
        checkpoint: &Checkpoint,
        done: GlobalPosition,
        tally: &Tally,
        stop: Stop,
    ) -> Result<MailOutcome, MailerError> {
        self.record(tally);
        if !self.advance(checkpoint, done).await? {
            self.checkpoint_moved();
        }
        match stop {
            Stop::Failed(error) => {
                if matches!(error, MailerError::Delivery(_)) {
                    self.stats.retried.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("mail_retried_total").increment(1);
                }
                Err(error)
            }
            Stop::Poison(reason) => {
                let reason = format!(
                    "a recovery event it cannot read ({reason}); the checkpoint stays before \
                     it. Fix the event's reader (an upcaster) or the data, then restart the \
                     aggregator"
                );
                Ok(self.halt(done, reason))
            }
        }
    }

    /// The mails of one message, each sent unless a retried step sent it already.
    async fn handle(&mut self, message: &RecordedMessage, tally: &mut Tally) -> Result<(), Stop> {
        let Some(account) = user_id_of_stream(message.stream.as_str()) else {
            return Ok(());
        };
        let event = match event_version(&message.metadata).and_then(|version| {
            RecoveryEvent::from_stored(&message.message_type, version, &message.data)
        }) {
            Ok(event) => event,
            // A type a newer build writes and this one does not mail about.
            Err(EventDecodeError::UnknownType { .. }) => return Ok(()),
            Err(error) => {
                return Err(Stop::Poison(format!(
                    "message {} at position {}: {error}",
                    message.id, message.global_position
                )));
            }
        };
        tally.events += 1;
        let planned =
            self.letters
                .plan(message.id, *account.as_uuid(), &event, self.clock.now())?;
        match planned {
            Planned::Nothing => {}
            Planned::Expired { mails } => {
                for kind in mails {
                    tally.expired += 1;
                    self.stats.expired.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("mail_expired_total", "kind" => kind.name()).increment(1);
                }
            }
            Planned::Erased { mails } => {
                for kind in mails {
                    tracing::info!(
                        kind = kind.name(),
                        account = %account,
                        message_id = %message.id,
                        "the person a mail was for was erased; nothing sent"
                    );
                    tally.erased += 1;
                    self.stats.erased.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("mail_erased_total", "kind" => kind.name()).increment(1);
                }
            }
            Planned::Mails(mails) => {
                for mail in &mails {
                    self.send(message.global_position, mail, tally).await?;
                }
            }
        }
        Ok(())
    }

    async fn send(
        &mut self,
        position: GlobalPosition,
        mail: &Mail,
        tally: &mut Tally,
    ) -> Result<(), MailerError> {
        let key = (position, mail.id.index);
        if self.delivered.contains(&key) {
            return Ok(());
        }
        let delivery = match mail.to_message(self.letters.from()) {
            Ok(message) => self.postman.deliver(mail, &message).await?,
            Err(_) => Delivery::Refused { code: None },
        };
        match delivery {
            Delivery::Accepted => {
                tally.sent += 1;
                self.stats.sent.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("mail_sent_total", "kind" => mail.kind.name()).increment(1);
            }
            Delivery::Refused { code } => {
                self.refused(mail, code).await?;
                tally.refused += 1;
            }
        }
        self.delivered.insert(key);
        Ok(())
    }

    /// Records a mail refused for good, and says so without the address or the link.
    async fn refused(&mut self, mail: &Mail, code: Option<u16>) -> Result<(), MailerError> {
        self.read_model
            .record_mail_refusal(&MailRefusal {
                message_id: mail.id.message,
                mail_index: i16::from(mail.id.index),
                account_id: mail.account,
                kind: mail.kind.name().to_owned(),
                reply_code: code.map(i32::from),
                refused_at: self.clock.now(),
            })
            .await?;
        tracing::warn!(
            kind = mail.kind.name(),
            account = %mail.account,
            message_id = %mail.id.message,
            index = mail.id.index,
            code,
            "the SMTP server refused a mail for good; recorded in mail_refusals, going on"
        );
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("mail_refused_total", "kind" => mail.kind.name()).increment(1);
        Ok(())
    }

    /// Moves the checkpoint from `from` to `to` (nothing when they are the same). False when
    /// it had moved under this worker: nothing was written.
    async fn advance(
        &mut self,
        from: &Checkpoint,
        to: GlobalPosition,
    ) -> Result<bool, MailerError> {
        if to == from.position {
            return Ok(true);
        }
        if !self.read_model.move_checkpoint(MAILER, from, to).await? {
            return Ok(false);
        }
        self.checkpoint = Some(from.at(to));
        // What is behind the checkpoint is never read again.
        self.delivered = self.delivered.split_off(&(to + 1, 0));
        metrics::gauge!("mail_position").set(to as f64);
        self.measure_lag(to).await;
        Ok(true)
    }

    /// The checkpoint this worker moves: the one it moved last, or the stored one (created at
    /// 0 if there is none) once it has forgotten it.
    async fn current_checkpoint(&mut self) -> Result<Checkpoint, MailerError> {
        if let Some(checkpoint) = self.checkpoint {
            return Ok(checkpoint);
        }
        let checkpoint = self
            .read_model
            .ensure_checkpoint(MAILER, MAILER_VERSION)
            .await?;
        if checkpoint.version != MAILER_VERSION {
            return Err(MailerError::OtherVersion {
                stored: checkpoint.version,
                ours: MAILER_VERSION,
            });
        }
        if self.fence.is_some_and(|epoch| epoch != checkpoint.epoch) {
            return Err(MailerError::TakenOver);
        }
        self.checkpoint = Some(checkpoint);
        Ok(checkpoint)
    }

    /// Nothing new after the checkpoint. A `reset` would go unnoticed with nothing to move, so
    /// look (`None`: it moved, start over). And a checkpoint ahead of its store must not go on.
    async fn idle(&mut self, checkpoint: &Checkpoint) -> Result<Option<MailOutcome>, MailerError> {
        let stored = self.read_model.checkpoint(MAILER).await?;
        if stored.is_some_and(|stored| stored != *checkpoint) {
            self.checkpoint_moved();
            return Ok(None);
        }
        let remedy = "Mails of requests made since then would never be sent. Once the store is \
                      whole again, `aggregator reset mailer` sends what the store holds again \
                      (expired links excepted), then restart the aggregator";
        if let Some(reason) =
            consumer::store_behind(&self.store, checkpoint.position, remedy).await?
        {
            return Ok(Some(self.halt(checkpoint.position, reason)));
        }
        metrics::gauge!("mail_lag_messages").set(0.0);
        Ok(Some(MailOutcome::Idle))
    }

    fn record(&self, tally: &Tally) {
        if tally.events > 0 {
            tracing::debug!(
                events = tally.events,
                sent = tally.sent,
                refused = tally.refused,
                expired = tally.expired,
                erased = tally.erased,
                "mails handled"
            );
        }
    }

    /// Stops the mailer where it is, until the process restarts, and says why.
    fn halt(&mut self, checkpoint: GlobalPosition, reason: String) -> MailOutcome {
        tracing::error!(consumer = MAILER, checkpoint, %reason, "mailer halted");
        metrics::gauge!("mail_halted").set(1.0);
        self.halted = Some(reason.clone());
        self.checkpoint = None;
        MailOutcome::Halted { reason }
    }

    fn checkpoint_moved(&mut self) {
        tracing::warn!(
            consumer = MAILER,
            "the checkpoint moved under this worker (another replica or a reset); reloading it"
        );
        self.checkpoint = None;
        self.delivered.clear();
    }

    /// `mail_lag_messages`, at most once a second: counting the backlog is not free.
    async fn measure_lag(&mut self, checkpoint: GlobalPosition) {
        if self
            .lag_measured_at
            .is_some_and(|at| at.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        self.lag_measured_at = Some(Instant::now());
        if let Ok(lag) = self.store.count_after(checkpoint).await {
            metrics::gauge!("mail_lag_messages").set(lag as f64);
        }
    }
}

#[async_trait]
impl Consumer for Mailer {
    type Error = MailerError;

    fn name(&self) -> &'static str {
        MAILER
    }

    fn version(&self) -> i32 {
        MAILER_VERSION
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

    fn backoff(&self) -> Backoff {
        self.options.retry
    }

    fn holds_lock(&self) -> Arc<AtomicBool> {
        self.stats.holds_lock.clone()
    }

    async fn step(&mut self) -> Result<Progress, MailerError> {
        Ok(match self.process_next_batch().await? {
            MailOutcome::Handled { .. } => Progress::Worked,
            MailOutcome::Idle => Progress::Idle,
            MailOutcome::Halted { .. } => Progress::Halted,
        })
    }

    fn took_over(&mut self, fence: Option<i64>) {
        self.fence = fence;
        // The checkpoint may have moved while another replica held the lock.
        self.checkpoint = None;
        self.delivered.clear();
    }

    /// Keeps what was delivered: the step is retried from the stored checkpoint, and the mails
    /// it handed over already are not sent again.
    fn forget(&mut self) {
        self.checkpoint = None;
    }

    fn must_let_go(&self, error: &MailerError) -> bool {
        matches!(
            error,
            MailerError::TakenOver | MailerError::OtherVersion { .. }
        )
    }

    /// An SMTP server down for a while is part of operation, not a fault of this process.
    fn failure_is_an_error(&self, error: &MailerError) -> bool {
        !matches!(error, MailerError::Delivery(_))
    }
}
