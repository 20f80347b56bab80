//! Profiles the query API has read, kept in memory and as fresh as the read model (ADR 6).
//!
//! A profile read is the hot path: each request reads the caller's row (is the account still
//! active, and in which session epoch?) and usually nothing else. Going to PostgreSQL for it costs more CPU than the rest of
//! the request, so rows once read are kept here, and a follower keeps them current: whenever the
//! users view's checkpoint moves, it reads, in one snapshot, the checkpoint and the rows whose
//! `position` (the last event applied to the row) is past the one it had synced to, and updates
//! the ones it holds.
//!
//! Freshness: a kept answer is as new as the last sync, at most `query.cache_sync_ms` behind the
//! read model, and none is given once syncs have failed for a while; a request with
//! `X-Min-Position` syncs first, so read-your-writes holds. Each answer carries the checkpoint
//! it is current at, so that whether it may say a caller is still active is judged against the
//! message store ([`crate::freshness`]), not assumed from the read model; and the projection
//! version that folded it, so that a column an older version never kept is not read as if it
//! had.
//!
//! What makes a row safe to keep: it is read in the same statement as the view's version and
//! checkpoint, and kept only if that version is the one held and that checkpoint is not behind
//! the synced one (so every later change has a position the next sync reads), and never while
//! a sync runs.
//!
//! An erasure (ADR 13) is a change like the others: the account's row stays, at the erasure's
//! position, with status `erased` and no address, so the next sync replaces the held row, and
//! the address leaves memory with it; from then on the caller's own routes refuse the account
//! as they refuse a deactivated one.

use std::collections::HashMap;
use std::sync::{PoisonError, RwLock};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::read_model::{ChangedRows, ProfileRow, RowAtCheckpoint, UsersView};

/// Rows of the users view (profiles, with each account's session epoch), and the view's
/// checkpoint they are all current at (the lowest, when some come from memory and some from the
/// database): what [`crate::freshness`] needs to tell whether they can say an account is still
/// active, and which of its sessions are over.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfilesAtCheckpoint {
    pub rows: Vec<ProfileRow>,
    pub checkpoint: u64,
    /// The projection version that folded every row ([`Self::MIXED`] when they came from views
    /// of different versions): a row says only what its version kept, and a view of version 1,
    /// which older aggregators may keep fresh during an upgrade, never kept the session epoch.
    pub version: i32,
}

impl ProfilesAtCheckpoint {
    /// The version of rows that no single version folded: no projection's (versions start at 1,
    /// and a view without a checkpoint reads as 0 too).
    pub const MIXED: i32 = 0;

    /// Adds a row read from the database: the checkpoint becomes the lower one, and the version
    /// [`Self::MIXED`] unless the row's is the one the others have.
    fn push(&mut self, read: RowAtCheckpoint) {
        if self.rows.is_empty() {
            self.checkpoint = read.checkpoint;
            self.version = read.version;
        } else {
            self.checkpoint = self.checkpoint.min(read.checkpoint);
            if self.version != read.version {
                self.version = Self::MIXED;
            }
        }
        self.rows.push(read.row);
    }
}

pub struct ProfileCache {
    state: RwLock<State>,
    capacity: usize,
    /// Past this long without a successful sync, nothing is answered from memory: the reads
    /// go to the read model, and fail there if it is out of reach, rather than serve rows of
    /// unknown age (a deactivation could be missed).
    max_staleness: Duration,
    /// One sync at a time, and no row kept while one runs.
    syncing: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    /// The checkpoint of the users view that every held row is current at.
    synced: u64,
    /// The projection version the held rows were built by.
    version: i32,
    /// When the last successful sync started.
    last_sync: Option<Instant>,
    rows: HashMap<Uuid, ProfileRow>,
}

impl ProfileCache {
    /// Holds up to `capacity` profiles; 0 holds none, and every read goes to the database.
    /// Held profiles are answered only while a sync succeeded within `max_staleness`.
    pub fn new(capacity: usize, max_staleness: Duration) -> Self {
        Self {
            state: RwLock::default(),
            capacity,
            max_staleness,
            syncing: tokio::sync::Mutex::new(()),
        }
    }

    /// The read model position the held rows are current at; 0 when the cache holds none
    /// (`capacity` 0): nothing follows the read model then, so only a [`Self::sync`] can tell
    /// where it is.
    pub fn synced(&self) -> u64 {
        if self.capacity == 0 {
            return 0;
        }
        self.read().synced
    }

    /// The profiles of `ids` the view holds: from memory, and the rest from the read model in
    /// one round trip.
    pub async fn profiles(
        &self,
        view: &UsersView,
        ids: &[Uuid],
    ) -> Result<ProfilesAtCheckpoint, sqlx::Error> {
        let (mut found, missing) = self.lookup(ids);
        if missing.is_empty() {
            return Ok(found);
        }
        let rows = view.read_profiles(&missing).await?;
        if self.capacity > 0 {
            self.keep(&rows);
        }
        for read in rows {
            found.push(read);
        }
        Ok(found)
    }

    /// The held profiles of `ids` with the checkpoint they are current at, and the ids to read
    /// from the read model: all of them when the last successful sync is too old.
    fn lookup(&self, ids: &[Uuid]) -> (ProfilesAtCheckpoint, Vec<Uuid>) {
        let state = self.read();
        let fresh = state
            .last_sync
            .is_some_and(|at| at.elapsed() <= self.max_staleness);
        let mut found = ProfilesAtCheckpoint {
            rows: Vec::with_capacity(ids.len()),
            checkpoint: state.synced,
            version: state.version,
        };
        let mut missing = Vec::new();
        for id in ids {
            match state.rows.get(id).filter(|_| fresh) {
                Some(held) => found.rows.push(held.clone()),
                None => missing.push(*id),
            }
        }
        (found, missing)
    }

    /// Brings the held rows up to the view's checkpoint and returns it.
    pub async fn sync(&self, view: &UsersView) -> Result<u64, sqlx::Error> {
        let _one_at_a_time = self.syncing.lock().await;
        let started = Instant::now();
        let (synced, held_version, empty) = {
            let state = self.read();
            (state.synced, state.version, state.rows.is_empty())
        };
        let (version, checkpoint) = view.checkpoint().await?;
        // Nothing moved, or nothing held to update (and no row is kept while this runs).
        let changes = if empty || (version, checkpoint) == (held_version, synced) {
            ChangedRows {
                version,
                checkpoint,
                rows: vec![],
                complete: true,
            }
        } else {
            view.changes_since(synced, self.capacity.max(1_000)).await?
        };
        let checkpoint = changes.checkpoint;
        self.apply(changes, started);
        Ok(checkpoint)
    }

    /// Syncs every `interval` until `shutdown` completes; a failure is logged once, when it
    /// starts, and retried. A sync cut short by the shutdown leaves nothing half done: it only
    /// reads, and applies what it read in one step.
    pub async fn follow(
        &self,
        view: UsersView,
        interval: Duration,
        shutdown: impl Future<Output = ()>,
    ) {
        tokio::select! {
            () = shutdown => {}
            () = self.keep_syncing(&view, interval) => {}
        }
    }

    async fn keep_syncing(&self, view: &UsersView, interval: Duration) {
        let mut failing = false;
        loop {
            match self.sync(view).await {
                Ok(_) if failing => {
                    tracing::info!("syncing the kept profiles works again");
                    failing = false;
                }
                Ok(_) => {}
                Err(error) if !failing => {
                    tracing::warn!(%error, "syncing the kept profiles failed; retrying");
                    failing = true;
                }
                Err(_) => {}
            }
            tokio::time::sleep(interval).await;
        }
    }

    /// Applies what the view changed: the held rows take their newer versions. A checkpoint
    /// that went back (a reset), another projection version (a rebuild whose rows may differ
    /// at the same positions) or too many changes to read empty the cache instead.
    fn apply(&self, changes: ChangedRows, started: Instant) {
        let mut state = self.write();
        if changes.checkpoint < state.synced
            || changes.version != state.version
            || !changes.complete
        {
            state.rows.clear();
        }
        for row in changes.rows {
            if let Some(held) = state.rows.get_mut(&row.profile.id)
                && held.position < row.position
            {
                *held = row;
            }
        }
        state.synced = changes.checkpoint;
        state.version = changes.version;
        state.last_sync = Some(started);
    }

    /// Keeps rows read from the view, those that are safe to keep (see the module's doc).
    fn keep(&self, rows: &[RowAtCheckpoint]) {
        let Ok(_no_sync_running) = self.syncing.try_lock() else {
            return;
        };
        let mut state = self.write();
        if state.last_sync.is_none() {
            return;
        }
        let safe: Vec<&RowAtCheckpoint> = rows
            .iter()
            .filter(|read| read.version == state.version && read.checkpoint >= state.synced)
            .collect();
        if state.rows.len() + safe.len() > self.capacity {
            // Crude but bounded: start over rather than track recency on every read.
            state.rows.clear();
        }
        for read in safe {
            let newer = state
                .rows
                .get(&read.row.profile.id)
                .is_none_or(|held| held.position < read.row.position);
            if newer {
                state.rows.insert(read.row.profile.id, read.row.clone());
            }
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};

    use super::*;
    use crate::read_model::Profile;

    fn row(id: Uuid, status: &str, position: u64) -> ProfileRow {
        ProfileRow {
            session_epoch: 0,
            profile: Profile {
                id,
                email: Some("ann@example.com".into()),
                email_verified: false,
                status: status.into(),
                registered_at: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
                activated_at: None,
                deactivated_at: None,
                last_login_at: None,
                login_count: 0,
                roles: vec![],
                erased_at: None,
            },
            position,
        }
    }

    fn at_checkpoint(row: ProfileRow, version: i32, checkpoint: u64) -> RowAtCheckpoint {
        RowAtCheckpoint {
            row,
            version,
            checkpoint,
        }
    }

    fn changes(version: i32, checkpoint: u64, rows: Vec<ProfileRow>) -> ChangedRows {
        ChangedRows {
            version,
            checkpoint,
            rows,
            complete: true,
        }
    }

    /// A cache of ten that has synced to `checkpoint` of projection `version`.
    fn synced_to(version: i32, checkpoint: u64) -> ProfileCache {
        let cache = ProfileCache::new(10, Duration::from_secs(60));
        cache.apply(changes(version, checkpoint, vec![]), Instant::now());
        cache
    }

    fn cache() -> ProfileCache {
        synced_to(1, 0)
    }

    fn held(cache: &ProfileCache, id: Uuid) -> Option<ProfileRow> {
        cache.read().rows.get(&id).cloned()
    }

    #[test]
    fn a_sync_updates_held_rows_to_their_newer_version_and_ignores_others() {
        let cache = cache();
        let (ann, bob) = (Uuid::new_v4(), Uuid::new_v4());
        cache.keep(&[at_checkpoint(row(ann, "active", 5), 1, 5)]);
        let now = Instant::now();
        cache.apply(
            changes(
                1,
                9,
                vec![row(ann, "deactivated", 8), row(bob, "active", 9)],
            ),
            now,
        );
        assert_eq!(held(&cache, ann), Some(row(ann, "deactivated", 8)));
        assert_eq!(held(&cache, bob), None, "a row nobody read is not loaded");
        assert_eq!(cache.synced(), 9);
        // An older version never replaces a newer one.
        cache.apply(changes(1, 12, vec![row(ann, "active", 7)]), now);
        assert_eq!(held(&cache, ann).unwrap().position, 8);
    }

    #[test]
    fn a_held_row_whose_account_is_erased_keeps_nothing_of_its_address() {
        let cache = cache();
        let ann = Uuid::new_v4();
        cache.keep(&[at_checkpoint(row(ann, "active", 5), 1, 5)]);
        // The projection applies the erasure: the row stays, without its address.
        let mut erased = row(ann, read_model_schema::ERASED_STATUS, 8);
        erased.profile.email = None;
        erased.profile.erased_at = Some(Utc.with_ymd_and_hms(2026, 2, 1, 0, 0, 0).unwrap());
        cache.apply(changes(1, 9, vec![erased.clone()]), Instant::now());
        assert_eq!(held(&cache, ann), Some(erased));
        let (found, missing) = cache.lookup(&[ann]);
        assert!(missing.is_empty());
        assert_eq!(found.rows[0].profile.email, None);
    }

    #[test]
    fn a_row_read_at_a_checkpoint_behind_the_synced_one_is_not_kept() {
        let ann = Uuid::new_v4();
        // A sync passes Ann's deactivation while her old row is on its way from the database.
        let cache = synced_to(1, 9);
        cache.keep(&[at_checkpoint(row(ann, "active", 5), 1, 6)]);
        assert_eq!(held(&cache, ann), None);
        cache.keep(&[at_checkpoint(row(ann, "deactivated", 8), 1, 9)]);
        assert_eq!(held(&cache, ann), Some(row(ann, "deactivated", 8)));
    }

    #[test]
    fn a_row_of_another_projection_version_is_not_kept() {
        let ann = Uuid::new_v4();
        let cache = synced_to(2, 9);
        cache.keep(&[at_checkpoint(row(ann, "active", 5), 1, 9)]);
        assert_eq!(held(&cache, ann), None);
    }

    #[test]
    fn nothing_is_kept_while_a_sync_runs_or_before_the_first() {
        let ann = Uuid::new_v4();
        let never_synced = ProfileCache::new(10, Duration::from_secs(60));
        never_synced.keep(&[at_checkpoint(row(ann, "active", 5), 0, 5)]);
        assert_eq!(held(&never_synced, ann), None);

        let cache = cache();
        let syncing = cache.syncing.try_lock().unwrap();
        cache.keep(&[at_checkpoint(row(ann, "active", 5), 1, 5)]);
        assert_eq!(held(&cache, ann), None);
        drop(syncing);
        cache.keep(&[at_checkpoint(row(ann, "active", 5), 1, 5)]);
        assert!(held(&cache, ann).is_some());
    }

    #[test]
    fn a_reset_a_new_version_or_too_many_changes_empty_the_cache() {
        let ann = Uuid::new_v4();
        let now = Instant::now();
        for emptying in [
            changes(1, 3, vec![]),
            changes(2, 9, vec![]),
            ChangedRows {
                complete: false,
                ..changes(1, 12, vec![])
            },
        ] {
            let cache = synced_to(1, 9);
            cache.keep(&[at_checkpoint(row(ann, "active", 5), 1, 9)]);
            assert!(held(&cache, ann).is_some());
            cache.apply(emptying.clone(), now);
            assert_eq!(held(&cache, ann), None, "{emptying:?}");
        }
    }

    #[test]
    fn held_rows_are_answered_only_while_syncs_succeed() {
        let ann = Uuid::new_v4();
        let cache = cache();
        cache.keep(&[at_checkpoint(row(ann, "active", 5), 1, 5)]);
        assert_eq!(cache.lookup(&[ann]).0.rows.len(), 1);

        let stale = ProfileCache::new(10, Duration::ZERO);
        stale.apply(changes(1, 9, vec![]), Instant::now());
        stale.keep(&[at_checkpoint(row(ann, "active", 5), 1, 9)]);
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(stale.lookup(&[ann]).1, [ann], "the last sync is too old");
    }

    #[test]
    fn rows_read_from_views_of_different_versions_are_of_no_one_version() {
        let (ann, bob) = (Uuid::new_v4(), Uuid::new_v4());
        let cache = synced_to(1, 9);
        cache.keep(&[at_checkpoint(row(ann, "active", 5), 1, 9)]);
        let (mut found, missing) = cache.lookup(&[ann, bob]);
        assert_eq!((found.version, found.checkpoint), (1, 9), "as kept");
        assert_eq!(missing, [bob]);

        // Bob's row comes from the database, where a rebuild swapped in version 2.
        found.push(at_checkpoint(row(bob, "active", 11), 2, 12));
        assert_eq!(
            (found.version, found.checkpoint),
            (ProfilesAtCheckpoint::MIXED, 9)
        );

        // Read from the database alone, rows take their view's version.
        let (mut read, _) = synced_to(1, 9).lookup(&[bob]);
        read.push(at_checkpoint(row(bob, "active", 11), 2, 12));
        assert_eq!((read.version, read.checkpoint), (2, 12));
        read.push(at_checkpoint(row(ann, "active", 5), 2, 12));
        assert_eq!(read.version, 2);
    }

    #[test]
    fn the_cache_never_holds_more_than_its_capacity() {
        let cache = ProfileCache::new(3, Duration::from_secs(60));
        cache.apply(changes(1, 0, vec![]), Instant::now());
        for n in 0..10 {
            cache.keep(&[at_checkpoint(row(Uuid::new_v4(), "active", n), 1, n)]);
            assert!(cache.read().rows.len() <= 3);
        }
    }
}
