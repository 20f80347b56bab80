//! Counts, latencies and failures per route, and the report printed at the end.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use reqwest::RequestBuilder;
use reqwest::header::HeaderMap;
use serde_json::Value;

use super::locks::lock;
use super::routes::Route;

/// Counts and latencies per route, and what went wrong.
pub(super) struct Stats {
    pub(super) started: Instant,
    pub(super) routes: Vec<Mutex<RouteStats>>,
    /// By route and kind of failure: how many, when the first was, and what it looked like.
    pub(super) failures: Mutex<BTreeMap<(Route, String), Failure>>,
}

pub(super) struct RouteStats {
    pub(super) requests: u64,
    pub(super) errors: u64,
    pub(super) throttled: u64,
    /// Microseconds, request sent to body read.
    pub(super) latencies: Histogram<u64>,
}

pub(super) struct Failure {
    pub(super) count: u64,
    pub(super) first_at: Duration,
    pub(super) example: String,
}

#[derive(Default)]
pub(super) struct Totals {
    pub(super) requests: u64,
    pub(super) errors: u64,
    pub(super) throttled: u64,
}

impl Stats {
    pub(super) fn new() -> anyhow::Result<Self> {
        let routes = Route::ALL
            .iter()
            .map(|_| {
                Ok(Mutex::new(RouteStats {
                    requests: 0,
                    errors: 0,
                    throttled: 0,
                    latencies: Histogram::new_with_bounds(1, 60_000_000, 3)?,
                }))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self {
            started: Instant::now(),
            routes,
            failures: Mutex::default(),
        })
    }

    /// Sends `request` and records the answer: one with the route's status whose JSON body
    /// `check` accepts is a success, anything else an error.
    pub(super) async fn exchange<T>(
        &self,
        route: Route,
        request: RequestBuilder,
        check: impl FnOnce(&HeaderMap, &Value) -> anyhow::Result<T>,
    ) -> Option<T> {
        self.exchange_bytes(route, request, |headers, body| {
            check(headers, &serde_json::from_slice(body)?)
        })
        .await
    }

    /// [`Stats::exchange`] for a text body.
    pub(super) async fn exchange_text<T>(
        &self,
        route: Route,
        request: RequestBuilder,
        check: impl FnOnce(&str) -> anyhow::Result<T>,
    ) -> Option<T> {
        self.exchange_bytes(route, request, |_, body| check(std::str::from_utf8(body)?))
            .await
    }

    pub(super) async fn exchange_bytes<T>(
        &self,
        route: Route,
        request: RequestBuilder,
        check: impl FnOnce(&HeaderMap, &[u8]) -> anyhow::Result<T>,
    ) -> Option<T> {
        let started = Instant::now();
        let answer = async {
            let response = request.send().await?;
            let status = response.status();
            let headers = response.headers().clone();
            let body = response.bytes().await?;
            Ok::<_, reqwest::Error>((status, headers, body))
        }
        .await;
        let elapsed = started.elapsed();
        let outcome = match answer {
            Err(error) => Err(("transport error".to_owned(), error_chain(&error))),
            Ok((status, _, body)) if status != route.expected() => {
                Err((format!("status {}", status.as_u16()), excerpt(&body)))
            }
            Ok((_, headers, body)) => check(&headers, &body).map_err(|error| {
                (
                    "unexpected body".to_owned(),
                    format!("{error:#}: {}", excerpt(&body)),
                )
            }),
        };
        if let Some(row) = self.routes.get(route as usize) {
            let mut row = lock(row);
            row.requests += 1;
            row.latencies
                .saturating_record(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX));
            if let Err((kind, _)) = &outcome {
                row.errors += 1;
                if kind == "status 429" {
                    row.throttled += 1;
                }
            }
        }
        match outcome {
            Ok(value) => Some(value),
            Err((kind, example)) => {
                let at = self.started.elapsed();
                lock(&self.failures)
                    .entry((route, kind))
                    .or_insert(Failure {
                        count: 0,
                        first_at: at,
                        example,
                    })
                    .count += 1;
                None
            }
        }
    }

    pub(super) fn totals(&self) -> Totals {
        self.routes
            .iter()
            .fold(Totals::default(), |mut totals, row| {
                let row = lock(row);
                totals.requests += row.requests;
                totals.errors += row.errors;
                totals.throttled += row.throttled;
                totals
            })
    }

    pub(super) fn failures(&self) -> Vec<String> {
        lock(&self.failures)
            .iter()
            .map(|((route, kind), failure)| {
                format!(
                    "{} (expecting {}): {kind} x{}, first after {:.1} s: {}",
                    route.name(),
                    route.expected().as_u16(),
                    failure.count,
                    failure.first_at.as_secs_f64(),
                    failure.example
                )
            })
            .collect()
    }

    pub(super) fn print_table(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        println!(
            "{:<24} {:>6} {:>9} {:>8} {:>7} {:>5} {:>8} {:>8}",
            "route", "expect", "requests", "req/s", "errors", "429", "p50 ms", "p99 ms"
        );
        let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).ok();
        for (route, row) in Route::ALL.iter().zip(&self.routes) {
            let row = lock(row);
            if let Some(all) = all.as_mut() {
                let _ = all.add(&row.latencies);
            }
            println!(
                "{:<24} {:>6} {:>9} {:>8.1} {:>7} {:>5} {:>8.2} {:>8.2}",
                route.name(),
                route.expected().as_u16(),
                row.requests,
                row.requests as f64 / seconds,
                row.errors,
                row.throttled,
                millis(row.latencies.value_at_quantile(0.5)),
                millis(row.latencies.value_at_quantile(0.99)),
            );
        }
        let totals = self.totals();
        let (p50, p99) = all.map_or((0, 0), |all| {
            (all.value_at_quantile(0.5), all.value_at_quantile(0.99))
        });
        println!(
            "{:<24} {:>6} {:>9} {:>8.1} {:>7} {:>5} {:>8.2} {:>8.2}",
            "all",
            "",
            totals.requests,
            totals.requests as f64 / seconds,
            totals.errors,
            totals.throttled,
            millis(p50),
            millis(p99),
        );
    }
}

pub(super) fn millis(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

/// The start of a body, for the report of a failure.
pub(super) fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut excerpt: String = text.chars().take(300).collect();
    if text.chars().nth(300).is_some() {
        excerpt.push_str("...");
    }
    excerpt
}

/// An error with its causes: reqwest's own message rarely says what failed underneath.
pub(super) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
