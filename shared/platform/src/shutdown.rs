//! Shutdown on SIGTERM (Kubernetes, docker stop) or Ctrl-C, and the one stop signal a process
//! hands to its server and its background tasks.

/// Completes when the process is asked to stop.
pub async fn signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    tracing::info!("shutting down");
}

/// A process's one stop signal, handed to its server and to every background task: each
/// [`Shutdown::stopped`] completes once the signal it was made from has completed, so that
/// nothing a process starts outlives it.
#[derive(Clone)]
pub struct Shutdown(tokio::sync::watch::Receiver<bool>);

impl Shutdown {
    /// Stops once `signal` completes (for a process, [`signal`]; in tests, a channel).
    pub fn on(signal: impl Future<Output = ()> + Send + 'static) -> Self {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            tokio::select! {
                () = signal => {
                    stop.send_replace(true);
                }
                // Everything that could wait for it is gone.
                () = stop.closed() => {}
            }
        });
        Self(stopped)
    }

    /// Completes once the process stops (or its runtime shuts down).
    pub fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut stopped = self.0.clone();
        async move {
            // An error means the signal's task is gone with the runtime: stop too.
            let _ = stopped.wait_for(|stopped| *stopped).await;
        }
    }

    /// Whether the process is stopping.
    pub fn is_stopping(&self) -> bool {
        *self.0.borrow()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn every_waiter_stops_once_the_signal_completes_and_not_before() {
        let (send, received) = tokio::sync::oneshot::channel::<()>();
        let shutdown = Shutdown::on(async {
            let _ = received.await;
        });
        let first = tokio::spawn(shutdown.stopped());
        let second = tokio::spawn(shutdown.clone().stopped());
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!first.is_finished() && !second.is_finished());
        assert!(!shutdown.is_stopping());
        send.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            first.await.unwrap();
            second.await.unwrap();
        })
        .await
        .expect("the waiters stop");
        assert!(shutdown.is_stopping());
        // One that starts waiting afterwards stops at once.
        tokio::time::timeout(Duration::from_secs(5), shutdown.stopped())
            .await
            .expect("a late waiter stops at once");
    }
}
