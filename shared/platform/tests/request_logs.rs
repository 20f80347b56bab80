//! What the common layers write to the log for a request: nothing at info when it went well,
//! a server error at error, a slow request at warn, everything at debug; every line with the
//! request's id.
//!
//! One test function on purpose: tracing decides once per callsite, for every subscriber in the
//! process, whether the callsite is enabled. Subscribers of tests running at once on other
//! threads race with that decision (a span could be judged disabled by a subscriber that was
//! being replaced), so the cases run one after another in this process of their own.

#![allow(clippy::unwrap_used)] // a test that cannot go on panics with the cause

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::Request;
use axum::response::Response;
use axum::routing::get;
use platform::http::{SLOW_REQUEST, with_common_layers};
use platform::problem::Problem;
use tower::ServiceExt;

/// Collects what the JSON formatter writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs one request through the common layers and returns the JSON log lines it caused under
/// `filter`, formatted as the services format them.
async fn logged_lines(
    router: Router,
    request: Request<Body>,
    filter: &str,
) -> (Response, Vec<serde_json::Value>) {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(true)
        .with_span_list(false)
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let response = with_common_layers(router).oneshot(request).await.unwrap();
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let lines = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    (response, lines)
}

#[tokio::test(flavor = "current_thread")]
async fn request_logs() {
    every_log_line_of_a_request_carries_its_request_id().await;
    a_request_that_went_well_writes_nothing_at_info().await;
    a_slow_request_is_logged_at_warn().await;
    a_request_without_an_id_gets_one_in_its_answer_and_its_log().await;
}

async fn every_log_line_of_a_request_carries_its_request_id() {
    let router = Router::new().route(
        "/fail",
        get(|| async {
            tracing::warn!("something the handler noticed");
            Problem::internal()
        }),
    );
    for (filter, expected) in [
        // The request's start and end at debug, the handler's warning, the failure at error.
        ("debug", 4),
        ("info", 2),
        ("warn", 2),
    ] {
        let request = Request::get("/fail?email=ann%40example.com")
            .header("x-request-id", "req-42")
            .body(Body::empty())
            .unwrap();
        let (response, lines) = logged_lines(router.clone(), request, filter).await;

        assert_eq!(response.headers()["x-request-id"], "req-42");
        assert_eq!(lines.len(), expected, "under {filter}: {lines:?}");
        assert!(
            lines.iter().any(|line| line["level"] == "ERROR"),
            "under {filter}, the server error was not logged: {lines:?}"
        );
        for line in &lines {
            assert_eq!(
                line["span"]["request_id"], "req-42",
                "under {filter}: {line}"
            );
            assert_eq!(line["span"]["path"], "/fail", "under {filter}: {line}");
            assert!(
                !line.to_string().contains("ann%40example.com"),
                "a query string was logged: {line}"
            );
        }
    }
}

async fn a_request_that_went_well_writes_nothing_at_info() {
    let router = Router::new().route("/ok", get(|| async { "ok" }));
    let request = || Request::get("/ok").body(Body::empty()).unwrap();

    let (response, lines) = logged_lines(router.clone(), request(), "info").await;
    assert_eq!(response.status(), 200);
    assert!(lines.is_empty(), "{lines:?}");

    // Still there for whoever asks.
    let (_, lines) = logged_lines(router, request(), "debug").await;
    let finished = lines
        .iter()
        .find(|line| line["message"] == "finished processing request")
        .unwrap_or_else(|| panic!("no response line at debug: {lines:?}"));
    assert_eq!(finished["status"], 200, "{finished}");
    assert!(finished["latency_ms"].is_number(), "{finished}");
}

async fn a_slow_request_is_logged_at_warn() {
    let router = Router::new().route(
        "/slow",
        get(|| async {
            tokio::time::sleep(SLOW_REQUEST + Duration::from_millis(10)).await;
            "ok"
        }),
    );
    let request = Request::get("/slow")
        .header("x-request-id", "req-slow")
        .body(Body::empty())
        .unwrap();
    let (_, lines) = logged_lines(router, request, "warn").await;

    assert_eq!(lines.len(), 1, "{lines:?}");
    let line = &lines[0];
    assert_eq!(line["level"], "WARN", "{line}");
    assert_eq!(line["status"], 200, "{line}");
    assert!(
        line["latency_ms"].as_f64().unwrap() >= SLOW_REQUEST.as_secs_f64() * 1000.0,
        "{line}"
    );
    assert_eq!(line["span"]["request_id"], "req-slow", "{line}");
}

async fn a_request_without_an_id_gets_one_in_its_answer_and_its_log() {
    let router = Router::new().route(
        "/ok",
        get(|| async {
            tracing::warn!("something the handler noticed");
            "ok"
        }),
    );
    let request = Request::get("/ok").body(Body::empty()).unwrap();
    let (response, lines) = logged_lines(router, request, "warn").await;

    let id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "not a UUID: {id}");
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["span"]["request_id"], id.as_str(), "{lines:?}");
}
