//! A refused login tells nothing about the account: an unknown email, a wrong password, a
//! deactivated and a locked account get the same status, the same body, and answers whose
//! timing a rank test cannot tell apart.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::helpers::{PASSWORD, TestApp, problem, spawn_with};

/// Logins per kind of refusal. Enough for a complete separation of two kinds (what leaving
/// out the padding gives: the unknown email skips the store work) to score |z| ≈ 7.7.
const SAMPLES: usize = 40;
/// Far beyond what identical distributions reach by chance (p ≈ 7·10⁻⁶), so that noise on a
/// shared machine does not fail the test; a real difference of a few milliseconds in every
/// answer still does.
const MAX_Z: f64 = 4.5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_wrong_deactivated_and_locked_refusals_look_and_time_alike() {
    let app = spawn_with(|settings| {
        settings.login.max_failures = 3;
        // Generous, so the store work of a known account stays inside it on a loaded machine.
        settings.login.refusal_padding_ms = 100;
    })
    .await;
    let admin = app.admin_token().await;
    // A fresh account per wrong-password login, so that none of them ends up locked.
    let mut wrong = vec![];
    for n in 0..SAMPLES + 2 {
        let email = format!("wrong{n}@example.com");
        app.user(&email).await;
        wrong.push(email);
    }
    let deactivated = app.user("gone@example.com").await;
    let response = app
        .post_as(
            &format!("/users/{deactivated}/deactivate"),
            &admin,
            json!({}),
        )
        .await;
    assert_eq!(response.status(), 200);
    app.user("locked@example.com").await;
    for _ in 0..3 {
        app.login("locked@example.com", "not the password").await;
    }

    let attempt = |kind: usize, n: usize| -> (String, &'static str) {
        match kind {
            0 => ("nobody@example.com".to_owned(), PASSWORD),
            1 => (wrong[n].clone(), "not the password"),
            2 => ("gone@example.com".to_owned(), PASSWORD),
            _ => ("locked@example.com".to_owned(), PASSWORD),
        }
    };
    let names = ["unknown email", "wrong password", "deactivated", "locked"];

    // Same status and body.
    let mut bodies = vec![];
    for (kind, name) in names.iter().enumerate() {
        let (email, password) = attempt(kind, SAMPLES);
        let response = app.login(&email, password).await;
        assert_eq!(response.status(), 401, "{name}");
        bodies.push(problem(response).await);
    }
    assert!(
        bodies.windows(2).all(|pair| pair[0] == pair[1]),
        "{bodies:?}"
    );

    // Same timing: the kinds interleaved, so that drift on the machine hits them alike.
    let _ = timed_login(&app, &attempt(0, SAMPLES + 1)).await;
    let mut times = vec![vec![]; names.len()];
    for n in 0..SAMPLES {
        for offset in 0..names.len() {
            let kind = (n + offset) % names.len();
            times[kind].push(timed_login(&app, &attempt(kind, n)).await);
        }
    }
    for a in 0..names.len() {
        for b in a + 1..names.len() {
            let z = rank_sum_z(&times[a], &times[b]);
            assert!(
                z.abs() < MAX_Z,
                "{} (median {:.2} ms) and {} (median {:.2} ms) are told apart: z = {z:.1}",
                names[a],
                median(&times[a]),
                names[b],
                median(&times[b]),
            );
        }
    }
}

/// Milliseconds for one refused login.
async fn timed_login(app: &TestApp, (email, password): &(String, &str)) -> f64 {
    let started = Instant::now();
    let response = app.login(email, password).await;
    let elapsed = started.elapsed();
    assert_eq!(response.status(), 401, "{email}");
    assert!(elapsed >= Duration::from_millis(100), "{email}: not padded");
    elapsed.as_secs_f64() * 1000.0
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// The Mann–Whitney rank-sum statistic of `a` against `b`, as a z score (normal
/// approximation, ties given their average rank).
fn rank_sum_z(a: &[f64], b: &[f64]) -> f64 {
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

#[test]
fn the_rank_test_tells_shifted_samples_apart_and_not_shuffled_ones() {
    let base: Vec<f64> = (0..SAMPLES).map(|n| 100.0 + (n * 7 % 13) as f64).collect();
    let shifted: Vec<f64> = base.iter().map(|value| value + 20.0).collect();
    assert!(rank_sum_z(&base, &shifted).abs() > MAX_Z);
    let mut shuffled = base.clone();
    shuffled.reverse();
    assert!(rank_sum_z(&base, &shuffled).abs() < 0.01);
}
