//! `POST /password-reset` and a `verify`-mode registration tell nobody whether an address has an
//! account: the same status, the same body, and answers whose timing the rank test of
//! `timing.rs` cannot tell apart, because each is answered `mail.answer_after_ms` after it began.
//! The control runs the same procedure without the delay and must tell them apart.

use std::time::Instant;

use command_api::settings::RegistrationMode;
use serde_json::{Value, json};

use crate::enumeration::lengthen_history;
use crate::helpers::{PASSWORD, TestApp, spawn_with};
use crate::timing::{MAX_Z, assert_alike, rank_sum_z};

/// Requests per kind, as in `enumeration.rs`.
const SAMPLES: usize = 40;

/// Generous, so that the store work of a known address stays inside it on a loaded machine.
const ANSWER_AFTER_MS: u64 = 150;

/// A service answering recovery requests after `answer_after_ms`, with no hourly limit in the
/// way of the samples.
async fn spawn_delayed(answer_after_ms: u64, mode: RegistrationMode) -> TestApp {
    spawn_with(|settings| {
        settings.mail.answer_after_ms = answer_after_ms;
        settings.mail.max_per_account_per_hour = 100_000;
        settings.registration.mode = mode;
    })
    .await
}

/// One request: its status, its body and its milliseconds.
async fn timed(app: &TestApp, path: &str, body: Value) -> (u16, String, f64) {
    let started = Instant::now();
    let response = app.post(path, body).await;
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, text, started.elapsed().as_secs_f64() * 1000.0)
}

/// The reset requests for `emails`, interleaved so that drift on the machine hits each alike;
/// asserts every answer is the same, and returns each email's times.
async fn interleaved_resets(app: &TestApp, emails: &[&str]) -> Vec<Vec<f64>> {
    let reset = |email: &str| json!({ "email": email });
    let _ = timed(app, "/password-reset", reset(emails[0])).await;
    let mut times = vec![vec![]; emails.len()];
    let mut answers = vec![];
    for n in 0..SAMPLES {
        for offset in 0..emails.len() {
            let kind = (n + offset) % emails.len();
            let (status, body, ms) = timed(app, "/password-reset", reset(emails[kind])).await;
            answers.push((status, body));
            times[kind].push(ms);
        }
    }
    assert!(
        answers.windows(2).all(|pair| pair[0] == pair[1]),
        "{answers:?}"
    );
    assert_eq!(answers[0].0, 202);
    times
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_requests_for_a_known_an_unknown_and_a_deactivated_address_look_and_time_alike() {
    let app = spawn_delayed(ANSWER_AFTER_MS, RegistrationMode::Open).await;
    app.user("ann@example.com").await;
    let gone = app.user("gone@example.com").await;
    let admin = app.admin_token().await;
    assert_eq!(app.deactivate(&gone, &admin).await.status(), 200);

    let emails = ["ann@example.com", "nobody@example.com", "gone@example.com"];
    let times = interleaved_resets(&app, &emails).await;
    for (email, times) in emails.iter().zip(&times) {
        let fastest = times.iter().copied().fold(f64::MAX, f64::min);
        assert!(fastest >= ANSWER_AFTER_MS as f64, "{email}: answered early");
    }
    assert_alike(&["known", "unknown", "deactivated"], &times);
}

/// The control: without the delay, the store work only a known address costs (its account's
/// stream read and folded, its recovery stream read, the request appended) shows, and the rank
/// test must see it. The account has a long history (1000 events), as in the login control, so
/// that the difference stands out of the noise of a loaded machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_delay_the_rank_test_tells_a_known_address_from_an_unknown_one() {
    let app = spawn_delayed(0, RegistrationMode::Open).await;
    let ann = app.user("ann@example.com").await;
    lengthen_history(&app, &ann, 1000).await;
    let times = interleaved_resets(&app, &["ann@example.com", "nobody@example.com"]).await;
    let z = rank_sum_z(&times[0], &times[1]);
    println!("known against unknown without the delay: z = {z:.2}");
    assert!(
        z >= MAX_Z,
        "the rank test cannot see the store work: z = {z:.2}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_mode_registrations_of_a_free_and_a_taken_address_look_and_time_alike() {
    let app = spawn_delayed(ANSWER_AFTER_MS, RegistrationMode::Verify).await;
    let register = |email: String| json!({ "email": email, "password": PASSWORD });
    let _ = timed(&app, "/users", register("taken@example.com".into())).await;
    let mut times = vec![vec![], vec![]];
    let mut answers = vec![];
    for n in 0..SAMPLES {
        for offset in 0..2 {
            let kind = (n + offset) % 2;
            let email = if kind == 0 {
                format!("free{n}@example.com")
            } else {
                "taken@example.com".to_owned()
            };
            let (status, body, ms) = timed(&app, "/users", register(email)).await;
            let mut body: Value = serde_json::from_str(&body).unwrap();
            body.as_object_mut().unwrap().remove("id");
            answers.push((status, body));
            times[kind].push(ms);
        }
    }
    assert!(
        answers.windows(2).all(|pair| pair[0] == pair[1]),
        "{answers:?}"
    );
    assert_eq!(answers[0].0, 202);
    assert_alike(&["free", "taken"], &times);
}
