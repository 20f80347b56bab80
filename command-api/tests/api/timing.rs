//! Deciding on latencies measured on a shared machine: a rank test between samples taken
//! interleaved, so that whatever else the machine does falls on every sample alike.
//!
//! The Mann–Whitney rank-sum test looks only at the order of the times, not their size, so a
//! few logins stalled by a burst of load move it no more than any other few logins that came
//! last; and its threshold is far beyond what samples of one distribution reach by chance.
//! `the_rank_test_*` below check both halves of that on simulated latencies; the API tests
//! that use it each have a control that runs the same procedure on the real service with a
//! difference known to be there (`enumeration.rs`, `login.rs`), and must see it.

/// Far beyond what identical distributions reach by chance (p ≈ 7·10⁻⁶), so that noise on a
/// shared machine does not fail a test; a real difference of a few milliseconds in every
/// answer still does.
pub const MAX_Z: f64 = 4.5;

/// Fails when any two kinds' times are told apart by the rank test; prints every z score.
pub fn assert_alike(names: &[&str], times: &[Vec<f64>]) {
    let mut apart = vec![];
    for a in 0..names.len() {
        for b in a + 1..names.len() {
            let z = rank_sum_z(&times[a], &times[b]);
            let line = format!(
                "{} (median {:.2} ms) against {} (median {:.2} ms): z = {z:.2}",
                names[a],
                median(&times[a]),
                names[b],
                median(&times[b]),
            );
            println!("{line}");
            if z.abs() >= MAX_Z {
                apart.push(line);
            }
        }
    }
    assert!(apart.is_empty(), "told apart: {apart:#?}");
}

/// The z score of `slow` against `fast` times `factor`: at or above [`MAX_Z`] when `slow` is
/// beyond doubt more than `factor` times slower. Prints it.
pub fn slowdown_z(name: &str, slow: &[f64], fast: &[f64], factor: f64) -> f64 {
    let scaled: Vec<f64> = fast.iter().map(|time| time * factor).collect();
    let z = rank_sum_z(slow, &scaled);
    println!(
        "{name}: median {:.2} ms against {:.2} ms, z against {factor}x = {z:.2}",
        median(slow),
        median(fast),
    );
    z
}

pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// The Mann–Whitney rank-sum statistic of `a` against `b`, as a z score (normal
/// approximation, ties given their average rank): positive when `a` tends to be larger.
pub fn rank_sum_z(a: &[f64], b: &[f64]) -> f64 {
    let mut all: Vec<(f64, bool)> = a
        .iter()
        .map(|&value| (value, true))
        .chain(b.iter().map(|&value| (value, false)))
        .collect();
    all.sort_by(|x, y| x.0.total_cmp(&y.0));
    let mut rank_sum_a = 0.0;
    let mut i = 0;
    while i < all.len() {
        let mut j = i;
        while j + 1 < all.len() && all[j + 1].0 == all[i].0 {
            j += 1;
        }
        let average_rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum_a += all[i..=j].iter().filter(|entry| entry.1).count() as f64 * average_rank;
        i = j + 1;
    }
    let (n1, n2) = (a.len() as f64, b.len() as f64);
    let u = rank_sum_a - n1 * (n1 + 1.0) / 2.0;
    let mean = n1 * n2 / 2.0;
    let deviation = (n1 * n2 * (n1 + n2 + 1.0) / 12.0).sqrt();
    (u - mean) / deviation
}

/// Latencies as a loaded machine makes them: a floor, jitter, and now and then a stall of up
/// to 200 ms; from a fixed seed, so the checks below are the same on every run.
struct Latencies(u64);

impl Latencies {
    /// splitmix64, as a fraction in [0, 1).
    fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    /// One latency in milliseconds, `shift` later than the distribution's own; rounded to
    /// `resolution`, which makes ties.
    fn draw(&mut self, shift: f64, resolution: f64) -> f64 {
        let jitter = -5.0 * (1.0 - self.uniform()).ln();
        let stall = if self.uniform() < 0.05 {
            200.0 * self.uniform()
        } else {
            0.0
        };
        let value = 100.0 + jitter + stall + shift;
        (value / resolution).round() * resolution
    }

    fn sample(&mut self, n: usize, shift: f64, resolution: f64) -> Vec<f64> {
        (0..n).map(|_| self.draw(shift, resolution)).collect()
    }
}

#[test]
fn the_rank_test_scores_samples_of_one_distribution_as_a_standard_normal_and_never_past_the_bound()
{
    const TRIALS: usize = 4000;
    let mut latencies = Latencies(7);
    // Finely measured times, and times rounded to whole milliseconds (many ties).
    for resolution in [0.001, 1.0] {
        let scores: Vec<f64> = (0..TRIALS)
            .map(|_| {
                let a = latencies.sample(40, 0.0, resolution);
                let b = latencies.sample(40, 0.0, resolution);
                rank_sum_z(&a, &b)
            })
            .collect();
        let mean = scores.iter().sum::<f64>() / TRIALS as f64;
        let deviation =
            (scores.iter().map(|z| (z - mean).powi(2)).sum::<f64>() / TRIALS as f64).sqrt();
        let largest = scores.iter().fold(0.0_f64, |m, z| m.max(z.abs()));
        println!(
            "resolution {resolution} ms: mean {mean:.3}, sd {deviation:.3}, max |z| {largest:.2}"
        );
        // A wrong mean or variance in the statistic shows here before it shows in a test.
        assert!(mean.abs() < 0.1, "mean {mean}");
        assert!((0.9..1.1).contains(&deviation), "sd {deviation}");
        assert!(largest < MAX_Z, "{largest}");
    }
}

#[test]
fn the_rank_test_tells_apart_samples_a_few_milliseconds_apart_through_stalls() {
    let mut latencies = Latencies(11);
    // Complete separation, the most 40 against 40 can show.
    let low: Vec<f64> = (0..40).map(|n| n as f64).collect();
    let high: Vec<f64> = (40..80).map(|n| n as f64).collect();
    assert!((rank_sum_z(&low, &high) + 7.70).abs() < 0.01);
    assert!((rank_sum_z(&high, &low) - 7.70).abs() < 0.01);
    // Every answer 10 ms later (twice the typical jitter), among the same stalls.
    const TRIALS: usize = 1000;
    let told_apart = (0..TRIALS)
        .filter(|_| {
            let a = latencies.sample(40, 0.0, 0.001);
            let b = latencies.sample(40, 10.0, 0.001);
            rank_sum_z(&b, &a) >= MAX_Z
        })
        .count();
    println!("a 10 ms shift told apart in {told_apart} of {TRIALS}");
    assert!(told_apart >= TRIALS * 95 / 100, "{told_apart}");
    // And a slowdown is measured against the factor it is given.
    let a = latencies.sample(40, 0.0, 0.001);
    let doubled: Vec<f64> = latencies
        .sample(40, 0.0, 0.001)
        .iter()
        .map(|t| t * 2.0)
        .collect();
    assert!(slowdown_z("doubled", &doubled, &a, 1.0) >= MAX_Z);
    assert!(slowdown_z("doubled", &doubled, &a, 3.0) < -MAX_Z);
}
