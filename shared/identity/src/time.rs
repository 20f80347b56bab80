//! Arithmetic on instants that a misconfigured policy cannot make panic.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};

/// `now + duration`, or the end of time when a misconfigured policy would overflow.
pub(crate) fn add_saturating(now: DateTime<Utc>, duration: Duration) -> DateTime<Utc> {
    TimeDelta::from_std(duration)
        .ok()
        .and_then(|delta| now.checked_add_signed(delta))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}
