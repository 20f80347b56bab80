//! Wake-ups for consumers that tail the store.
//!
//! A wake-up is only a hint that new messages may be there; it never carries them. Consumers
//! read from their own position after every wake-up, so a lost or duplicated hint costs at most
//! one poll interval or one empty read, never a message.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// Why a consumer was woken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// A writer signalled that it committed new messages.
    Signalled,
    /// The poll interval passed without a signal.
    Poll,
}

/// A stream of wake-ups. Dropping it stops whatever listens on its behalf.
pub struct Subscription {
    signal: Arc<Notify>,
    poll_interval: Duration,
    listener: Option<JoinHandle<()>>,
}

impl Subscription {
    pub(crate) fn new(
        signal: Arc<Notify>,
        poll_interval: Duration,
        listener: Option<JoinHandle<()>>,
    ) -> Self {
        Self {
            signal,
            poll_interval,
            listener,
        }
    }

    /// Wake-ups from `signal`, or every `poll_interval` without one: for a process that fans
    /// one subscription of the store out to many consumers (each holding a listener would
    /// hold a database connection each), notifying each consumer's `signal` on every wake-up.
    pub fn from_signal(signal: Arc<Notify>, poll_interval: Duration) -> Self {
        Self::new(signal, poll_interval, None)
    }

    /// Waits for the next signal, or for the poll interval to pass.
    pub async fn next(&mut self) -> Wake {
        tokio::select! {
            () = self.signal.notified() => Wake::Signalled,
            () = tokio::time::sleep(self.poll_interval) => Wake::Poll,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(listener) = self.listener.take() {
            listener.abort();
        }
    }
}

/// Aborts a background task when the last owner goes away.
#[derive(Debug)]
pub(crate) struct AbortOnDrop(pub JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
