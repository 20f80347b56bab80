//! The layers every HTTP router of the service wears: a request id on every response and log
//! line, request metrics by route and status, a body size limit, problem answers for unknown
//! routes and panics, and the `/healthz` and `/metrics` routes.
//!
//! What a request writes to the log: nothing at `info` when it went well. A line per request
//! cost the query API about a sixth of its CPU per profile read (a soak's query API wrote
//! 820,000 lines in 90 s) and tells nothing the metrics do not (`http_requests_total` and
//! `http_request_duration_seconds`, by route and status). A server error is logged at `error`,
//! a request slower than [`SLOW_REQUEST`] at `warn`, every other response at `debug` (turned on
//! with the `log.filter` setting, e.g. `info,platform::http=debug`); every line a request causes,
//! at any level, carries its request id.

use std::collections::HashMap;
use std::sync::{LazyLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderMap, HeaderName, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::{OnResponse, TraceLayer};
use tracing::Span;

use crate::problem::Problem;

/// The request id header: kept from the client when it sends one, created otherwise.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The largest request body any route accepts.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// A request that takes this long is logged at `warn`, whatever its answer. Longer than any
/// route should take but a password check under load or an `X-Min-Position` wait.
pub const SLOW_REQUEST: Duration = Duration::from_secs(1);

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
        // One stack, applied to the routes once: each `Router::layer` call would box every
        // route again, and a request would clone and box through each of them.
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(REQUEST_ID, RandomRequestId))
                .layer(PropagateRequestIdLayer::new(REQUEST_ID))
                .layer(
                    TraceLayer::new_for_http()
                        // Server errors are logged by the layer's default `on_failure`, at
                        // error.
                        .on_response(LogResponse)
                        .make_span_with(request_span),
                )
                // Outside the limit and the panic catcher, so that their answers are counted
                // too.
                .layer(middleware::from_fn(record_metrics))
                // Outside the limit, so that the limit's own 413 is reshaped too.
                .layer(middleware::from_fn(oversized_as_problem))
                .layer(RequestBodyLimitLayer::new(MAX_BODY_BYTES))
                .layer(CatchPanicLayer::custom(|_| {
                    tracing::error!("a request handler panicked");
                    Problem::internal().into_response()
                })),
        )
}

/// The span every line a request causes is written in. The path only: a query string may
/// carry an email address. At error level so that the span, and with it the request id,
/// exists under any log filter that lets a line through at all.
fn request_span<B>(request: &axum::http::Request<B>) -> Span {
    let request_id = request
        .headers()
        .get(&REQUEST_ID)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    tracing::error_span!(
        "request",
        request_id,
        method = %request.method(),
        path = request.uri().path(),
    )
}

/// The response's line: at `warn` when the request was slow, else at `debug`.
#[derive(Clone, Copy)]
struct LogResponse;

impl<B> OnResponse<B> for LogResponse {
    fn on_response(self, response: &Response<B>, latency: Duration, _: &Span) {
        let status = response.status().as_u16();
        let latency_ms = latency.as_secs_f64() * 1000.0;
        if latency >= SLOW_REQUEST {
            tracing::warn!(status, latency_ms, "slow request");
        } else {
            tracing::debug!(status, latency_ms, "finished processing request");
        }
    }
}

/// A random (version 4) UUID for each request without a system call: tower-http's
/// `MakeRequestUuid` asks the kernel for 16 random bytes on every request. The id only has to
/// be unique, not unguessable; `fastrand` draws it from a per-thread generator seeded at random.
#[derive(Clone, Copy)]
struct RandomRequestId;

impl MakeRequestId for RandomRequestId {
    fn make_request_id<B>(&mut self, _: &Request<B>) -> Option<RequestId> {
        let id = uuid::Builder::from_random_bytes(fastrand::u128(..).to_le_bytes()).into_uuid();
        let mut text = [0; uuid::fmt::Hyphenated::LENGTH];
        let text = id.hyphenated().encode_lower(&mut text);
        axum::http::HeaderValue::from_str(text)
            .ok()
            .map(RequestId::new)
    }
}

/// The body limit refuses a body announced as too large before any extractor runs, with a
/// plain-text 413; this gives it the problem+json shape of every other error.
async fn oversized_as_problem(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
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
    let route = request.extensions().get::<MatchedPath>().cloned();
    let method = method_label(request.method());
    let started = Instant::now();
    let response = next.run(request).await;
    let route = route.as_ref().map_or("unmatched", MatchedPath::as_str);
    RequestSeries::record(route, method, response.status(), started.elapsed());
    response
}

/// A method as a label: the standard ones by name, any other a client sends as `other`, so
/// that no client can add series at will.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "other",
    }
}

/// The request metrics of each route, method and status, registered once each: building
/// their labels and looking them up in the registry on every request cost a dozen
/// allocations. Bounded by the routes, methods and statuses there are.
struct RequestSeries;

/// A route's series, by method and status.
type RouteSeries = HashMap<(&'static str, u16), (metrics::Counter, metrics::Histogram)>;

static REQUEST_SERIES: LazyLock<RwLock<HashMap<String, RouteSeries>>> =
    LazyLock::new(RwLock::default);

impl RequestSeries {
    fn record(route: &str, method: &'static str, status: StatusCode, elapsed: Duration) {
        let status = status.as_u16();
        let seconds = elapsed.as_secs_f64();
        let known = REQUEST_SERIES
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some((count, duration)) = known
            .get(route)
            .and_then(|series| series.get(&(method, status)))
        {
            count.increment(1);
            duration.record(seconds);
            return;
        }
        drop(known);
        let labels = [
            ("route", route.to_owned()),
            ("method", method.to_owned()),
            ("status", status.to_string()),
        ];
        let count = metrics::counter!("http_requests_total", &labels);
        let duration = metrics::histogram!("http_request_duration_seconds", &labels);
        count.increment(1);
        duration.record(seconds);
        REQUEST_SERIES
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(route.to_owned())
            .or_default()
            .insert((method, status), (count, duration));
    }
}

/// The token of an `Authorization: Bearer <token>` header (RFC 6750 section 2.1), the scheme in
/// any case (RFC 9110 section 11.1: `bearer` and `BEARER` are the same scheme); `None` when
/// there is no such header, another scheme, or no token.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The answer of `/.well-known/jwks.json`: the key set, which verifiers may cache for five
/// minutes (a new key is published a key lifetime before it signs, so this is safe).
pub fn jwks_response(jwks: serde_json::Value) -> Response {
    (
        [(header::CACHE_CONTROL, "public, max-age=300")],
        axum::Json(jwks),
    )
        .into_response()
}

/// The answer of `/readyz` from a check of each dependency: `ready` when all answer, else a
/// 503 naming those that did not (each logged at `warn` with its error).
pub fn readiness<E: std::fmt::Display>(
    checks: impl IntoIterator<Item = (&'static str, Result<(), E>)>,
) -> Response {
    let mut failed = vec![];
    for (dependency, checked) in checks {
        if let Err(error) = checked {
            tracing::warn!(%error, "readiness: the {dependency} does not answer");
            failed.push(dependency);
        }
    }
    if failed.is_empty() {
        return "ready".into_response();
    }
    Problem::unavailable()
        .with_detail(format!("not answering: the {}", failed.join(", the ")))
        .into_response()
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

    fn authorization(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, value.parse().unwrap());
        headers
    }

    #[test]
    fn a_bearer_token_is_read_whatever_the_case_of_the_scheme() {
        for value in [
            "Bearer abc.def",
            "bearer abc.def",
            "BEARER abc.def",
            "BeArEr  abc.def ",
        ] {
            assert_eq!(
                bearer_token(&authorization(value)),
                Some("abc.def"),
                "{value}"
            );
        }
    }

    #[test]
    fn another_scheme_a_missing_token_or_no_header_is_no_bearer_token() {
        for value in ["Basic abc", "Bearer", "Bearer ", "Bearerabc.def", "abc.def"] {
            assert_eq!(bearer_token(&authorization(value)), None, "{value}");
        }
        assert_eq!(bearer_token(&HeaderMap::new()), None);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn readiness_is_a_503_that_names_each_dependency_that_did_not_answer() {
        let ready = readiness([("message store", Ok::<(), String>(()))]);
        assert_eq!(ready.status(), StatusCode::OK);
        let refused = readiness([
            ("message store", Err("connection refused".to_owned())),
            ("read model", Ok(())),
        ]);
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = axum::body::to_bytes(refused.into_body(), 4096)
            .await
            .unwrap();
        let body = String::from_utf8(body.to_vec()).unwrap();
        assert!(body.contains("not answering: the message store"), "{body}");
        assert!(!body.contains("read model"), "{body}");
    }
}
