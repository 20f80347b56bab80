//! The layers every HTTP router of the service wears: a request id on every response and log
//! line, request metrics by route and status, a body size limit, problem answers for unknown
//! routes and panics, and the `/healthz` and `/metrics` routes.

use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderName, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};

use crate::problem::Problem;

/// The request id header: kept from the client when it sends one, created otherwise.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The largest request body any route accepts.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// Wraps `router` in the common layers and adds `/healthz` and `/metrics`.
pub fn with_common_layers(router: Router) -> Router {
    // Install the recorder now: metrics recorded before it exists are lost.
    crate::metrics::handle();
    router
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics_text))
        .fallback(|| async { Problem::not_found().with_detail("no such route") })
        .method_not_allowed_fallback(|| async {
            Problem::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
        })
        .layer(middleware::from_fn(record_metrics))
        .layer(CatchPanicLayer::custom(|_| {
            tracing::error!("a request handler panicked");
            Problem::internal().into_response()
        }))
        .layer(RequestBodyLimitLayer::new(MAX_BODY_BYTES))
        // Outside the limit, so that the limit's own 413 is reshaped too.
        .layer(middleware::map_response(oversized_as_problem))
        .layer(
            TraceLayer::new_for_http()
                // One line per request at info: status and latency, in the request's span.
                .on_response(DefaultOnResponse::new().level(tracing::Level::INFO))
                .make_span_with(|request: &Request| {
                    let request_id = request
                        .headers()
                        .get(&REQUEST_ID)
                        .and_then(|value| value.to_str().ok())
                        .unwrap_or_default();
                    // The path only: a query string may carry an email address. At error level so
                    // that the span, and with it the request id, exists under any log filter that
                    // lets a line through at all.
                    tracing::error_span!(
                        "request",
                        request_id,
                        method = %request.method(),
                        path = request.uri().path(),
                    )
                }),
        )
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
}

/// The body limit refuses a body announced as too large before any extractor runs, with a
/// plain-text 413; this gives it the problem+json shape of every other error.
async fn oversized_as_problem(response: Response) -> Response {
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/problem+json"));
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE && !is_problem {
        return Problem::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
            .with_detail("the body is larger than this endpoint accepts")
            .into_response();
    }
    response
}

async fn metrics_text() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(),
    )
}

/// `http_requests_total` and `http_request_duration_seconds`, labelled by route template (not
/// the raw path, which would make one series per user id), method and status.
async fn record_metrics(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let method = request.method().to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    let labels = [("route", route), ("method", method), ("status", status)];
    metrics::counter!("http_requests_total", &labels).increment(1);
    metrics::histogram!("http_request_duration_seconds", &labels)
        .record(started.elapsed().as_secs_f64());
    if response.status().is_server_error() {
        tracing::error!(status = response.status().as_u16(), "request failed");
    }
    response
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use axum::body::Body;
    use axum::http::Request as HttpRequest;
    use tower::ServiceExt;

    use super::*;

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

    /// Runs one request through the common layers and returns the JSON log lines it caused
    /// under `filter`. The tests log at warn or above: tracing's global level hint is shared by
    /// tests running at once, so an info line may be skipped when another test filters warn.
    async fn logged_lines(
        router: Router,
        request: HttpRequest<Body>,
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
    async fn every_log_line_of_a_request_carries_its_request_id() {
        let router = Router::new().route(
            "/fail",
            get(|| async {
                tracing::warn!("something the handler noticed");
                Problem::internal()
            }),
        );
        for filter in ["info", "warn"] {
            let request = HttpRequest::get("/fail?email=ann%40example.com")
                .header("x-request-id", "req-42")
                .body(Body::empty())
                .unwrap();
            let (response, lines) = logged_lines(router.clone(), request, filter).await;

            assert_eq!(response.headers()["x-request-id"], "req-42");
            assert!(!lines.is_empty(), "nothing was logged under {filter}");
            for line in &lines {
                assert_eq!(
                    line["span"]["request_id"], "req-42",
                    "under {filter}: {line}"
                );
                assert!(
                    !line.to_string().contains("ann%40example.com"),
                    "a query string was logged"
                );
            }
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_request_without_an_id_gets_one_in_its_answer_and_its_log() {
        let router = Router::new().route(
            "/ok",
            get(|| async {
                tracing::warn!("something the handler noticed");
                "ok"
            }),
        );
        let request = HttpRequest::get("/ok").body(Body::empty()).unwrap();
        let (response, lines) = logged_lines(router, request, "warn").await;

        let id = response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(!id.is_empty());
        assert!(
            lines
                .iter()
                .any(|line| line["span"]["request_id"] == id.as_str()),
            "{lines:?}"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_oversized_body_is_a_413_problem() {
        let router = Router::new().route(
            "/echo",
            axum::routing::post(|body: String| async move { body }),
        );
        let request = HttpRequest::post("/echo")
            .header("content-length", (MAX_BODY_BYTES + 1).to_string())
            .body(Body::from(vec![b'x'; MAX_BODY_BYTES + 1]))
            .unwrap();
        let response = with_common_layers(router).oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
    }
}
