//! How recent the users view is, as an instant: what lets a row of it say whether an account is
//! still active.
//!
//! A row of the view answers for its account as of the view's checkpoint, and the checkpoint says
//! nothing about time: after a reset the view replays from zero, a projection halted on a poison
//! event stays where it stopped, and a stopped aggregator leaves it where it was, while the rows
//! look like any others. So the query API measures it against the message store: every
//! `max_view_lag / 10` it reads the store's last written position, and remembers when it asked.
//! A sample `(t, p)` means every message committed before `t` lies at or below `p`; a view whose
//! checkpoint is at least `p` has applied them all (the global order never skips, ADR 2), so a
//! deactivation committed before `t` shows in its rows.
//!
//! A row is trusted only when a sample taken within the last `max_view_lag` is covered by the
//! checkpoint the row was read at: the view then holds every deactivation older than
//! `max_view_lag`. Otherwise the account's stream decides (see [`crate::auth`]). Nothing here
//! waits on the store: a request costs a look at the samples, and a store out of reach only
//! lets the samples age, which makes the rule stricter, never looser.

use std::collections::VecDeque;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use message_store::MessageStore;

/// The samples of the store's last position within the window, oldest first.
pub struct ViewFreshness {
    samples: RwLock<VecDeque<Sample>>,
    max_lag: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Taken before the store was asked, so everything committed before it is counted.
    at: Instant,
    last_position: u64,
}

impl ViewFreshness {
    /// Samples kept at most, whatever the interval: dropping the oldest only makes the rule
    /// stricter.
    const CAPACITY: usize = 64;

    /// Rows are trusted while their view holds everything committed `max_lag` ago; zero trusts
    /// none, and every status is read from the store.
    pub fn new(max_lag: Duration) -> Self {
        Self {
            samples: RwLock::default(),
            max_lag,
        }
    }

    /// How often [`Self::follow`] samples: ten samples per window, so a view that keeps up
    /// within most of the window is trusted.
    pub fn interval(&self) -> Duration {
        (self.max_lag / 10).max(Duration::from_millis(1))
    }

    /// Whether a view at `checkpoint` holds every message committed before `now - max_lag`.
    pub fn covers(&self, checkpoint: u64, now: Instant) -> bool {
        let oldest = now.checked_sub(self.max_lag);
        let samples = self.samples.read().unwrap_or_else(PoisonError::into_inner);
        // The oldest sample within the window has the lowest position of them; that the view
        // holds it is the weakest claim that still keeps the bound.
        samples
            .iter()
            .find(|sample| oldest.is_none_or(|oldest| sample.at >= oldest))
            .is_some_and(|sample| sample.last_position <= checkpoint)
    }

    /// Records that the store's last position was `last_position` at `at`, as a sample would.
    #[cfg(test)]
    pub(crate) fn sampled(&self, at: Instant, last_position: u64) {
        self.record(Sample { at, last_position });
    }

    fn record(&self, sample: Sample) {
        let mut samples = self.samples.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(oldest) = sample.at.checked_sub(self.max_lag) {
            while samples.front().is_some_and(|kept| kept.at < oldest) {
                samples.pop_front();
            }
        }
        if samples.len() >= Self::CAPACITY {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    /// Samples the store every [`Self::interval`] until `shutdown` completes; a failure is
    /// logged once, when it starts, and retried.
    pub async fn follow(&self, store: Arc<dyn MessageStore>, shutdown: impl Future<Output = ()>) {
        tokio::select! {
            () = shutdown => {}
            () = self.keep_sampling(store.as_ref()) => {}
        }
    }

    async fn keep_sampling(&self, store: &dyn MessageStore) {
        let mut failing = false;
        loop {
            let at = Instant::now();
            match store.last_position().await {
                Ok(last_position) => {
                    if failing {
                        tracing::info!("sampling the message store's position works again");
                        failing = false;
                    }
                    self.record(Sample { at, last_position });
                }
                Err(error) if !failing => {
                    tracing::warn!(
                        %error,
                        "sampling the message store's position failed; account statuses are \
                         read from the store until it answers, and refused while it does not"
                    );
                    failing = true;
                }
                Err(_) => {}
            }
            tokio::time::sleep(self.interval()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(1);

    fn sampled(samples: &[(Duration, u64)], start: Instant) -> ViewFreshness {
        let freshness = ViewFreshness::new(WINDOW);
        for (after, last_position) in samples {
            freshness.record(Sample {
                at: start + *after,
                last_position: *last_position,
            });
        }
        freshness
    }

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    #[test]
    fn a_view_holding_what_was_written_within_the_window_is_trusted() {
        let start = Instant::now();
        let freshness = sampled(&[(ms(0), 10), (ms(500), 20), (ms(900), 30)], start);
        // At 1.2 s the window starts at 0.2 s: the sample at 0.5 s (position 20) is the oldest.
        let now = start + ms(1200);
        assert!(freshness.covers(20, now));
        assert!(freshness.covers(25, now));
        assert!(
            !freshness.covers(19, now),
            "a deactivation at 19..20 may be missing"
        );
    }

    #[test]
    fn a_view_behind_every_sample_of_the_window_is_not_trusted() {
        let start = Instant::now();
        // Halted, replaying or stopped at 10 while the store moved on.
        let freshness = sampled(&[(ms(0), 10), (ms(100), 11), (ms(200), 12)], start);
        assert!(freshness.covers(10, start + ms(900)));
        assert!(!freshness.covers(10, start + ms(1101)));
    }

    #[test]
    fn without_a_recent_sample_nothing_is_trusted() {
        let start = Instant::now();
        assert!(!ViewFreshness::new(WINDOW).covers(u64::MAX, start));
        // The store stopped answering: the samples age out, however current the view.
        let freshness = sampled(&[(ms(0), 10)], start);
        assert!(freshness.covers(10, start + ms(1000)));
        assert!(!freshness.covers(u64::MAX, start + ms(1001)));
    }

    #[test]
    fn with_no_window_no_row_is_trusted() {
        let freshness = ViewFreshness::new(Duration::ZERO);
        let at = Instant::now();
        freshness.record(Sample {
            at,
            last_position: 0,
        });
        assert!(!freshness.covers(u64::MAX, at + ms(1)));
    }

    #[test]
    fn the_samples_kept_are_bounded_and_leave_the_rule_stricter() {
        let start = Instant::now();
        let freshness = ViewFreshness::new(Duration::from_secs(3600));
        for n in 0..1000 {
            freshness.record(Sample {
                at: start + ms(n),
                last_position: n,
            });
        }
        let kept = freshness.samples.read().unwrap().len();
        assert_eq!(kept, ViewFreshness::CAPACITY);
        assert!(!freshness.covers(900, start + ms(1000)));
        assert!(freshness.covers(999, start + ms(1000)));
    }
}
