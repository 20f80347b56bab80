//! Shared measuring helpers: timed rounds and rates, their median, and memory for printing.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Runs `workers` copies of `operation` in a loop for `duration` and returns operations/second.
/// Every worker stops starting new operations when the time is up; the ones in flight finish.
pub async fn rate<F, Fut>(workers: usize, duration: Duration, operation: F) -> anyhow::Result<f64>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let operation = Arc::new(operation);
    let done = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..workers)
        .map(|worker| {
            let (operation, done, count) = (operation.clone(), done.clone(), count.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while !done.load(Ordering::Relaxed) {
                    operation(worker, n).await?;
                    n += 1;
                    count.fetch_add(1, Ordering::Relaxed);
                }
                anyhow::Ok(())
            })
        })
        .collect();
    tokio::time::sleep(duration).await;
    done.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok(count.load(Ordering::Relaxed) as f64 / elapsed)
}

/// The median of a few figures: one noisy round does not decide the result.
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// Kibibytes as mebibytes, for printing.
pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
