//! Profiles the query API has read, kept in memory and as fresh as the read model (ADR 6).
//!
//! A profile read is the hot path: each request reads the caller's row (is the account still
//! active?) and usually nothing else. Going to PostgreSQL for it costs more CPU than the rest of
//! the request, so rows once read are kept here, and a follower keeps them current: whenever the
//! users view's checkpoint moves, it reads the rows whose `position` (the last event applied to
//! the row) is past the position it had synced to, and updates the ones it holds.
//!
//! Freshness: a cached answer is as new as the last sync, at most `query.cache_sync_ms` behind
//! the read model; a request with `X-Min-Position` syncs first, so read-your-writes holds.
//! A row read from the database is kept only if no sync ran while it was being read: a sync
//! that ran meanwhile may have skipped a newer version of it (the row was not held yet).

use std::collections::HashMap;
use std::sync::{PoisonError, RwLock};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::read_model::{Profile, ReadModel};

/// A profile and the position of the last event applied to it.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned {
    pub profile: Profile,
    pub position: u64,
}

pub struct ProfileCache {
    state: RwLock<State>,
    capacity: usize,
    /// Past this long without a successful sync, nothing is answered from memory: the reads
    /// go to the read model, and fail there if it is out of reach, rather than serve rows of
    /// unknown age (a deactivation could be missed).
    max_staleness: Duration,
    /// One sync at a time: two would only repeat each other's reads.
    syncing: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    /// The checkpoint of the users view that every held row is at least as new as.
    synced: u64,
    /// The projection version the held rows were built by.
    version: i32,
    /// When a sync last succeeded.
    last_sync: Option<Instant>,
    rows: HashMap<Uuid, Versioned>,
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

    /// The read model position the held rows are current to.
    pub fn synced(&self) -> u64 {
        self.read().synced
    }

    /// The profiles of `ids` the view holds: from memory, and the rest from the read model in
    /// one round trip.
    pub async fn profiles(
        &self,
        read_model: &ReadModel,
        ids: &[Uuid],
    ) -> Result<Vec<Profile>, sqlx::Error> {
        let (mut found, missing) = self.lookup(ids);
        if missing.is_empty() {
            return Ok(found);
        }
        let synced_before = self.synced();
        let read = read_model.versioned_profiles(&missing).await?;
        self.keep(synced_before, &read);
        found.extend(read.into_iter().map(|versioned| versioned.profile));
        Ok(found)
    }

    /// The held profiles of `ids`, and the ids to read from the read model: all of them when
    /// the last successful sync is too old.
    fn lookup(&self, ids: &[Uuid]) -> (Vec<Profile>, Vec<Uuid>) {
        let state = self.read();
        let fresh = state
            .last_sync
            .is_some_and(|at| at.elapsed() <= self.max_staleness);
        let mut found = Vec::with_capacity(ids.len());
        let mut missing = Vec::new();
        for id in ids {
            match state.rows.get(id).filter(|_| fresh) {
                Some(held) => found.push(held.profile.clone()),
                None => missing.push(*id),
            }
        }
        (found, missing)
    }

    /// Brings the held rows up to the view's checkpoint and returns it.
    pub async fn sync(&self, read_model: &ReadModel) -> Result<u64, sqlx::Error> {
        let _one_at_a_time = self.syncing.lock().await;
        let (version, checkpoint) = read_model.checkpoint().await?;
        let (synced, held_version, empty) = {
            let state = self.read();
            (state.synced, state.version, state.rows.is_empty())
        };
        if checkpoint == synced && version == held_version {
            self.write().last_sync = Some(Instant::now());
            return Ok(synced);
        }
        // Nothing held means nothing to update; a checkpoint that went back is a reset, and a
        // new version a rebuild whose rows may differ at the same positions.
        let changed = if empty || checkpoint < synced || version != held_version {
            vec![]
        } else {
            read_model.changed_since(synced).await?
        };
        self.apply(version, checkpoint, changed);
        Ok(checkpoint)
    }

    /// Syncs every `interval` until the process ends; a failure is logged once, when it
    /// starts, and retried.
    pub async fn follow(&self, read_model: ReadModel, interval: Duration) {
        let mut failing = false;
        loop {
            match self.sync(&read_model).await {
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

    /// Applies the rows changed up to `checkpoint`: the held ones take the newer version.
    fn apply(&self, version: i32, checkpoint: u64, changed: Vec<Versioned>) {
        let mut state = self.write();
        if checkpoint < state.synced || version != state.version {
            // The view was reset or rebuilt by another version: what is held may be wrong.
            state.rows.clear();
            state.version = version;
        }
        for row in changed {
            if let Some(held) = state.rows.get_mut(&row.profile.id)
                && held.position < row.position
            {
                *held = row;
            }
        }
        state.synced = checkpoint;
        state.last_sync = Some(Instant::now());
    }

    /// Keeps rows read from the database, if no sync ran since `synced_before`.
    fn keep(&self, synced_before: u64, rows: &[Versioned]) {
        if self.capacity == 0 || rows.is_empty() {
            return;
        }
        let mut state = self.write();
        if state.synced != synced_before {
            return;
        }
        if state.rows.len() + rows.len() > self.capacity {
            // Crude but bounded: start over rather than track recency on every read.
            state.rows.clear();
        }
        for row in rows {
            state.rows.insert(row.profile.id, row.clone());
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

    fn row(id: Uuid, status: &str, position: u64) -> Versioned {
        Versioned {
            profile: Profile {
                id,
                email: "ann@example.com".into(),
                status: status.into(),
                registered_at: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
                activated_at: None,
                deactivated_at: None,
                last_login_at: None,
                login_count: 0,
                roles: vec![],
            },
            position,
        }
    }

    fn held(cache: &ProfileCache, id: Uuid) -> Option<Versioned> {
        cache.read().rows.get(&id).cloned()
    }

    #[test]
    fn a_sync_updates_held_rows_to_their_newer_version_and_ignores_others() {
        let cache = ProfileCache::new(10, Duration::from_secs(60));
        let (ann, bob) = (Uuid::new_v4(), Uuid::new_v4());
        cache.keep(0, &[row(ann, "active", 5)]);
        cache.apply(
            0,
            9,
            vec![row(ann, "deactivated", 8), row(bob, "active", 9)],
        );
        assert_eq!(held(&cache, ann), Some(row(ann, "deactivated", 8)));
        assert_eq!(held(&cache, bob), None, "a row nobody read is not loaded");
        assert_eq!(cache.synced(), 9);
        // An older version never replaces a newer one.
        cache.apply(0, 12, vec![row(ann, "active", 7)]);
        assert_eq!(held(&cache, ann).unwrap().position, 8);
    }

    #[test]
    fn a_row_read_while_a_sync_ran_is_not_kept() {
        let cache = ProfileCache::new(10, Duration::from_secs(60));
        let ann = Uuid::new_v4();
        let synced_before = cache.synced();
        // A sync passes Ann's deactivation while her old row is on its way from the database.
        cache.apply(0, 9, vec![row(ann, "deactivated", 8)]);
        cache.keep(synced_before, &[row(ann, "active", 5)]);
        assert_eq!(held(&cache, ann), None);
    }

    #[test]
    fn a_checkpoint_that_goes_back_empties_the_cache() {
        let cache = ProfileCache::new(10, Duration::from_secs(60));
        let ann = Uuid::new_v4();
        cache.apply(0, 9, vec![]);
        cache.keep(9, &[row(ann, "active", 5)]);
        cache.apply(0, 0, vec![]);
        assert_eq!(held(&cache, ann), None);
        assert_eq!(cache.synced(), 0);
    }

    #[test]
    fn held_rows_are_answered_only_while_syncs_succeed() {
        let ann = Uuid::new_v4();
        let cache = ProfileCache::new(10, Duration::from_secs(60));
        cache.keep(0, &[row(ann, "active", 5)]);
        assert_eq!(cache.lookup(&[ann]).1, [ann], "never synced");
        cache.apply(0, 9, vec![]);
        assert_eq!(cache.lookup(&[ann]).0.len(), 1);

        let stale = ProfileCache::new(10, Duration::ZERO);
        stale.apply(0, 9, vec![]);
        stale.keep(9, &[row(ann, "active", 5)]);
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(stale.lookup(&[ann]).1, [ann], "the last sync is too old");
    }

    #[test]
    fn a_new_projection_version_empties_the_cache() {
        let cache = ProfileCache::new(10, Duration::from_secs(60));
        let ann = Uuid::new_v4();
        cache.apply(1, 9, vec![]);
        cache.keep(9, &[row(ann, "active", 5)]);
        cache.apply(2, 9, vec![]);
        assert_eq!(held(&cache, ann), None);
    }

    #[test]
    fn the_cache_never_holds_more_than_its_capacity_and_none_when_zero() {
        let cache = ProfileCache::new(3, Duration::from_secs(60));
        for n in 0..10 {
            cache.keep(0, &[row(Uuid::new_v4(), "active", n)]);
            assert!(cache.read().rows.len() <= 3);
        }
        let none = ProfileCache::new(0, Duration::from_secs(60));
        none.keep(0, &[row(Uuid::new_v4(), "active", 1)]);
        assert!(none.read().rows.is_empty());
    }
}
