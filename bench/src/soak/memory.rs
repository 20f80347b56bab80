//! The resident memory of the three processes, sampled through the run.

use super::*;

/// The resident memory of the three processes, in kB.
pub(super) fn rss(pids: [u32; 3]) -> anyhow::Result<[u64; 3]> {
    let [a, b, c] = pids;
    Ok([
        proc_status_kib(a, "VmRSS")?,
        proc_status_kib(b, "VmRSS")?,
        proc_status_kib(c, "VmRSS")?,
    ])
}

/// Resident memory per process: at rest before any traffic, at the start and the end of the
/// measured run, its peak, and its course over the run in sixths.
pub(super) fn print_memory(
    services: &[Service; 3],
    rest: [u64; 3],
    samples: &[(Duration, [u64; 3])],
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
    for (index, service) in services.iter().enumerate() {
        let at = |sample: &(Duration, [u64; 3])| sample.1[index];
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
            service.name,
            mib(rest[index]),
            mib(start),
            mib(end),
            mib(peak),
            mib(end) - mib(start),
            course.join(" ")
        );
    }
}
