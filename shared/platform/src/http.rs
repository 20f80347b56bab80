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
    response
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request as HttpRequest;
    use tower::ServiceExt;

    use super::*;

    // What the layers log is tested in tests/request_logs.rs, a process of its own: tracing's
    // callsite interest is global, so subscribers of tests running at once interfere.

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
