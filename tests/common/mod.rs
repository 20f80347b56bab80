//! What the tests that run the real binaries as processes share: one deployment's settings for
//! them (`test_support` starts, waits for and stops them), and the HTTP calls every such test
//! makes.
//!
//! The binaries are the ones `cargo test` builds for the workspace's packages, found beside
//! the test's own executable.

// Each test binary that includes this module uses a part of it.
#![allow(dead_code)]

pub mod mail;
pub mod sessions;
pub mod standalone;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::PgPool;
use test_support::{ALL_SERVICES, Deployment, Services};

/// A deployment on the database at `url` with the settings every test of processes runs with,
/// its logs in a temp directory named after `name`.
pub fn new_deployment(name: &str, url: &str) -> Deployment {
    Deployment::new(name, url)
        .unwrap()
        .with_setting("IDENTITY__LOG__FILTER", "warn")
        // Cheap hashes: these tests are about processes, not password cost.
        .with_setting("IDENTITY__PASSWORD__MEMORY_KIB", "1024")
        .with_setting("IDENTITY__PASSWORD__ITERATIONS", "1")
        .with_setting("IDENTITY__AGGREGATOR__LOCK_RETRY_MS", "200")
        .with_setting("IDENTITY__QUERY__MAX_WAIT_MS", "10000")
}

/// Migrates, starts the three services and waits until they are ready.
pub async fn start_all_services(deployment: &Deployment, client: &reqwest::Client) -> Services {
    start_services(deployment, client, &ALL_SERVICES).await
}

/// Migrates, starts the services that `which` names and waits until they are ready.
pub async fn start_services(
    deployment: &Deployment,
    client: &reqwest::Client,
    which: &[&str],
) -> Services {
    // Info logs: what the services say about losing and finding the database is the story of
    // a failed run.
    let log = ("IDENTITY__LOG__FILTER", "info,sqlx=warn".to_owned());
    deployment
        .start_services(client, which, &[log])
        .await
        .unwrap()
}

/// The password [`register`] gives every account.
pub const PASSWORD: &str = "correct horse battery";

pub async fn register(client: &reqwest::Client, port: u16, email: &str) -> (String, u64) {
    let response = client
        .post(format!("http://127.0.0.1:{port}/users"))
        .json(&json!({ "email": email, "password": PASSWORD }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201, "registering {email}");
    let body: Value = response.json().await.unwrap();
    (
        body["id"].as_str().unwrap().to_owned(),
        body["position"].as_u64().unwrap(),
    )
}

pub async fn login(
    client: &reqwest::Client,
    port: u16,
    email: &str,
    password: &str,
) -> reqwest::Response {
    client
        .post(format!("http://127.0.0.1:{port}/login"))
        .json(&json!({ "email": email, "password": password }))
        .send()
        .await
        .unwrap()
}

pub async fn token(client: &reqwest::Client, port: u16, email: &str, password: &str) -> String {
    let response = login(client, port, email, password).await;
    assert_eq!(response.status(), 200, "logging in {email}");
    let body: Value = response.json().await.unwrap();
    body["access_token"].as_str().unwrap().to_owned()
}

/// The users projection's checkpoint, from the read model at `url`.
pub async fn checkpoint(url: &str) -> u64 {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let position: Option<i64> = sqlx::query_scalar(
        "SELECT position FROM projection_checkpoints WHERE projection = 'users'",
    )
    .fetch_optional(&pool)
    .await
    .unwrap();
    pool.close().await;
    position.map_or(0, |position| u64::try_from(position).unwrap())
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// The highest global position in the store: with every writer finished, what the projection
/// must reach.
pub async fn store_head(pool: &PgPool) -> u64 {
    let head: Option<i64> = sqlx::query_scalar("SELECT max(global_position) FROM messages")
        .fetch_one(pool)
        .await
        .unwrap();
    head.map_or(0, |head| u64::try_from(head).unwrap())
}

/// Waits until the live projection's checkpoint has reached `position`.
pub async fn wait_for_checkpoint(url: &str, position: u64, timeout: Duration, logs: &Path) {
    let deadline = Instant::now() + timeout;
    loop {
        let reached = checkpoint(url).await;
        if reached >= position {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the aggregator stayed at {reached}, short of {position}, for {timeout:?}; \
             its log is in {}",
            logs.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What `GET path` on `port` answers.
pub async fn get(client: &reqwest::Client, port: u16, path: &str) -> reqwest::Response {
    client
        .get(format!("http://127.0.0.1:{port}{path}"))
        .send()
        .await
        .unwrap()
}

/// What `GET path` on `port` answers the holder of `token`, once the read model holds
/// `min_position` when one is given (read your own write).
pub async fn get_as(
    client: &reqwest::Client,
    port: u16,
    path: &str,
    token: &str,
    min_position: Option<u64>,
) -> reqwest::Response {
    let mut request = client
        .get(format!("http://127.0.0.1:{port}{path}"))
        .bearer_auth(token);
    if let Some(position) = min_position {
        request = request.header("X-Min-Position", position.to_string());
    }
    request.send().await.unwrap()
}

/// The JSON body of `GET path` on `port` as [`get_as`] sends it, which must answer 200.
pub async fn get_json_as(
    client: &reqwest::Client,
    port: u16,
    path: &str,
    token: &str,
    min_position: Option<u64>,
) -> Value {
    let response = get_as(client, port, path, token, min_position).await;
    assert_eq!(response.status(), 200, "GET {path}");
    response.json().await.unwrap()
}

/// The JSON body of `GET path` on `port`.
pub async fn get_json(client: &reqwest::Client, port: u16, path: &str) -> Value {
    get(client, port, path).await.json().await.unwrap()
}

/// The `/metrics` text of the process serving `port`.
pub async fn metrics_text(client: &reqwest::Client, port: u16) -> String {
    get(client, port, "/metrics").await.text().await.unwrap()
}

/// The value of one series (`name{labels}`, as rendered) on the `/metrics` of the process
/// serving `port`; `None` when it has not recorded that series.
pub async fn metric(client: &reqwest::Client, port: u16, series: &str) -> Option<f64> {
    let text = metrics_text(client, port).await;
    text.lines().find_map(|line| {
        line.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .map(|value| value.trim().parse().unwrap())
    })
}

/// The global position an answer carries in `X-Position`.
pub fn x_position(response: &reqwest::Response) -> u64 {
    response.headers()["x-position"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}
