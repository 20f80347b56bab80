//! The resident memory of the services' processes, sampled through the run.

use std::time::Duration;

use test_support::Process;
use test_support::process::proc_status_kib;

use crate::report::mib;

/// The resident memory of each process, in kB.
pub(super) fn rss(pids: &[u32]) -> anyhow::Result<Vec<u64>> {
    pids.iter()
        .map(|pid| proc_status_kib(*pid, "VmRSS"))
        .collect()
}

/// Resident memory per process: at rest before any traffic, at the start and the end of the
/// measured run, its peak, and its course over the run in sixths.
pub(super) fn print_memory(
    processes: &[Process],
    rest: &[u64],
    samples: &[(Duration, Vec<u64>)],
    seconds: u64,
) {
    let step = Duration::from_secs_f64(seconds as f64 / 6.0);
    println!(
        "{:<12} {:>8} {:>8} {:>8} {:>8} {:>8}   RSS every {:.0} s (MiB)",
        "RSS (MiB)",
        "at rest",
        "start",
        "end",
        "peak",
        "growth",
        step.as_secs_f64()
    );
    for (index, process) in processes.iter().enumerate() {
        let at = |sample: &(Duration, Vec<u64>)| sample.1[index];
        let start = samples.first().map_or(0, at);
        let end = samples.last().map_or(0, at);
        let peak = samples.iter().map(at).max().unwrap_or(0);
        let course: Vec<String> = (0..=6)
            .filter_map(|sixth| {
                let wanted = step * sixth;
                samples
                    .iter()
                    .min_by_key(|(when, _)| when.abs_diff(wanted))
                    .map(|sample| format!("{:.1}", mib(at(sample))))
            })
            .collect();
        println!(
            "{:<12} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>+8.1}   {}",
            process.name(),
            mib(rest[index]),
            mib(start),
            mib(end),
            mib(peak),
            mib(end) - mib(start),
            course.join(" ")
        );
    }
}
