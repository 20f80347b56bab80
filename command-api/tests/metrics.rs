//! What `/metrics` counts, checked in a test process of its own.
//!
//! The metrics recorder is global to a process, and the API tests (`tests/api`) run side by
//! side in one: there, a counter only ever says "at least what this test did", which a login
//! the service forgot to count still passes. Here one test alone drives a service (the other
//! only parses text), so it sees exactly what it caused and checks exact differences.

#![allow(clippy::unwrap_used, clippy::expect_used)]

// The API tests' harness; this binary uses only part of it.
#[allow(dead_code)]
#[path = "api/helpers.rs"]
mod helpers;

use helpers::{PASSWORD, TestApp, spawn_app};

#[tokio::test]
async fn every_login_and_refresh_is_counted_once_under_its_outcome_and_every_password_check_is_timed()
 {
    let app = spawn_app().await;
    app.user("ann@example.com").await;
    let before = metrics(&app).await;
    for _ in 0..3 {
        assert_eq!(app.login("ann@example.com", PASSWORD).await.status(), 200);
    }
    for _ in 0..2 {
        let response = app.login("ann@example.com", "wrong password").await;
        assert_eq!(response.status(), 401);
    }
    assert_eq!(
        app.login("nobody@example.com", PASSWORD).await.status(),
        401
    );
    assert_eq!(app.login("not an email", PASSWORD).await.status(), 401);
    // Refreshes: a rotation, its repeat within the grace, a malformed and a forged token, and
    // the first token again after the grace, a reuse.
    let login = app.login_body("ann@example.com", PASSWORD).await;
    let first = login["refresh_token"].as_str().unwrap().to_owned();
    assert_eq!(app.refresh(&first).await.status(), 200);
    assert_eq!(app.refresh(&first).await.status(), 200);
    assert_eq!(app.refresh("malformed").await.status(), 401);
    let session = login["session_id"].as_str().unwrap();
    let forged = format!("{session}.1.{}", "A".repeat(43));
    assert_eq!(app.refresh(&forged).await.status(), 401);
    app.clock.advance(chrono::TimeDelta::seconds(11));
    assert_eq!(app.refresh(&first).await.status(), 401);
    let after = metrics(&app).await;

    let added = |name: &str, labels: &[(&str, &str)]| {
        sample(&after, name, labels) - sample(&before, name, labels)
    };
    for (outcome, logins) in [
        ("granted", 4.0),
        ("wrong_password", 2.0),
        ("unknown_account", 1.0),
        ("malformed", 1.0),
        ("locked", 0.0),
        ("not_active", 0.0),
    ] {
        assert_eq!(
            added("logins_total", &[("outcome", outcome)]),
            logins,
            "logins_total{{outcome=\"{outcome}\"}}\n{after}"
        );
    }
    for (outcome, refreshes) in [
        ("rotated", 1.0),
        ("repeated", 1.0),
        ("malformed", 1.0),
        ("refused", 2.0),
        ("error", 0.0),
    ] {
        assert_eq!(
            added("refreshes_total", &[("outcome", outcome)]),
            refreshes,
            "refreshes_total{{outcome=\"{outcome}\"}}\n{after}"
        );
    }
    assert_eq!(added("refresh_token_reuses_total", &[]), 1.0, "{after}");
    // One check per login with a well-formed email; the malformed one costs none; refreshes
    // cost none.
    assert_eq!(added("password_hash_seconds_count", &[]), 7.0, "{after}");
    for (status, requests) in [("200", 4.0), ("401", 4.0)] {
        assert_eq!(
            added(
                "http_requests_total",
                &[("route", "/login"), ("method", "POST"), ("status", status)]
            ),
            requests,
            "POST /login {status}\n{after}"
        );
    }
}

async fn metrics(app: &TestApp) -> String {
    let response = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.text().await.unwrap()
}

/// The sum of the series of metric `name` that carry every one of `labels` (0 when there is
/// none yet: a counter appears with its first increment), from the Prometheus text format.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, series_labels) = match series.split_once('{') {
                Some((series_name, rest)) => (series_name, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            let matches = series_name == name
                && labels.iter().all(|(key, wanted)| {
                    series_labels
                        .split("\",")
                        .any(|pair| pair.trim_end_matches('"') == format!("{key}=\"{wanted}"))
                });
            matches.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

#[test]
fn a_sample_is_read_by_name_and_labels_in_any_order() {
    let text = "# TYPE x counter\n\
                x{a=\"1\",b=\"/users/{id}\"} 2\n\
                x{a=\"2\",b=\"/users/{id}\"} 5\n\
                x_count 7\n";
    assert_eq!(sample(text, "x", &[("b", "/users/{id}"), ("a", "1")]), 2.0);
    assert_eq!(sample(text, "x", &[("b", "/users/{id}")]), 7.0);
    assert_eq!(sample(text, "x", &[("a", "3")]), 0.0);
    assert_eq!(sample(text, "x_count", &[]), 7.0);
    assert_eq!(sample(text, "y", &[]), 0.0);
}
