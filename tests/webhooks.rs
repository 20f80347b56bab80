//! Webhooks end to end, through the real binaries: an administrator registers an endpoint on
//! the command API, accounts live their lives through the HTTP APIs, and a real HTTP receiver
//! gets each lifecycle event once, in order per account, signed with the secret it was shown,
//! as the public schema says; the query API lists the endpoint and its attempts. In the split
//! deployment (three processes on PostgreSQL) and in the standalone process (one process on
//! SQLite).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot go on panics with the cause

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};
use test_support::integration_schema::check_integration_event;
use test_support::process::free_port;
use test_support::{Launch, Process, Signal, TestDatabase};
use tokens::WebhookSecret;

use common::{PASSWORD, client, get_as, new_deployment, register, start_all_services, token};

const ADMIN_EMAIL: &str = "root@example.com";
const ADMIN_PASSWORD: &str = "an operator's long password";
const LOOPBACK: &str = "127.0.0.0/8";

/// What the receiver was sent: the signature headers and the body, as they came.
#[derive(Debug, Clone)]
struct Delivery {
    id: String,
    timestamp: i64,
    signature: String,
    body: Bytes,
}

impl Delivery {
    fn event(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// A webhook receiver on a port of its own, answering 204 to everything and keeping it.
struct Receiver {
    url: String,
    received: Arc<Mutex<Vec<Delivery>>>,
    server: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start() -> Self {
        let received = Arc::new(Mutex::new(Vec::new()));
        let kept = received.clone();
        let app = axum::Router::new().route(
            "/hooks/identity",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let kept = kept.clone();
                async move {
                    let header = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|value| value.to_str().ok())
                            .unwrap_or_default()
                            .to_owned()
                    };
                    kept.lock().unwrap().push(Delivery {
                        id: header("webhook-id"),
                        timestamp: header("webhook-timestamp").parse().unwrap_or(0),
                        signature: header("webhook-signature"),
                        body,
                    });
                    StatusCode::NO_CONTENT
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "http://127.0.0.1:{}/hooks/identity",
            listener.local_addr().unwrap().port()
        );
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            url,
            received,
            server,
        }
    }

    /// Waits until `count` deliveries have come, and answers every one so far.
    async fn wait_for(&self, count: usize) -> Vec<Delivery> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let received = self.received.lock().unwrap().clone();
            if received.len() >= count {
                return received;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {count} deliveries came: {received:?}",
                received.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// The ports of the command and the query side: one port for both in the standalone process.
#[derive(Clone, Copy)]
struct Ports {
    command: u16,
    query: u16,
}

/// An account's life through the APIs, with every public event type but logins: registered,
/// password changed, deactivated, activated, erased. Returns its id.
async fn live_a_life(client: &reqwest::Client, ports: Ports, admin: &str, email: &str) -> String {
    let (id, _) = register(client, ports.command, email).await;
    let own = token(client, ports.command, email, PASSWORD).await;
    let post = |path: String, token: String, body: Value| {
        let client = client.clone();
        async move {
            client
                .post(format!("http://127.0.0.1:{}{path}", ports.command))
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    let changed = post(
        format!("/users/{id}/password"),
        own,
        json!({ "current_password": PASSWORD, "new_password": "another long passphrase" }),
    )
    .await;
    assert!(changed.status().is_success(), "{}", changed.status());
    for action in ["deactivate", "activate"] {
        let done = post(format!("/users/{id}/{action}"), admin.to_owned(), json!({})).await;
        assert!(done.status().is_success(), "{action}: {}", done.status());
    }
    let erased = client
        .delete(format!("http://127.0.0.1:{}/users/{id}", ports.command))
        .bearer_auth(admin)
        .send()
        .await
        .unwrap();
    assert_eq!(erased.status(), 204);
    id
}

/// The types an account's life above publishes, in order.
const LIFE: [&str; 5] = [
    "identity.user.registered.v1",
    "identity.user.password_changed.v1",
    "identity.user.deactivated.v1",
    "identity.user.activated.v1",
    "identity.user.erased.v1",
];

/// Registers an endpoint for every type of [`LIFE`] and answers its id and its secret.
async fn register_endpoint(
    client: &reqwest::Client,
    ports: Ports,
    admin: &str,
    url: &str,
) -> (String, WebhookSecret) {
    let response = client
        .post(format!("http://127.0.0.1:{}/webhooks", ports.command))
        .bearer_auth(admin)
        .json(&json!({ "url": url, "events": LIFE, "description": "provisioning" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let body: Value = response.json().await.unwrap();
    let secret = WebhookSecret::from_text(body["secret"].as_str().unwrap()).unwrap();
    (body["id"].as_str().unwrap().to_owned(), secret)
}

/// Two accounts live their lives while an endpoint receives: each event comes once, in order
/// per account, signed with the secret the administrator was shown, as the schema says; the
/// query side lists the endpoint and an attempt for each delivery.
async fn every_lifecycle_event_arrives_signed_once_and_in_order(
    client: &reqwest::Client,
    ports: Ports,
    admin: &str,
) {
    let receiver = Receiver::start().await;
    let (endpoint, secret) = register_endpoint(client, ports, admin, &receiver.url).await;
    let (ann, bob) = tokio::join!(
        live_a_life(client, ports, admin, "ann@example.com"),
        live_a_life(client, ports, admin, "bob@example.com"),
    );

    let deliveries = receiver.wait_for(2 * LIFE.len()).await;
    // Nothing more comes: no duplicate, nothing unasked for.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.received.lock().unwrap().len(), 2 * LIFE.len());
    for delivery in &deliveries {
        assert!(
            secret.verifies(
                &delivery.signature,
                &delivery.id,
                delivery.timestamp,
                &delivery.body
            ),
            "a delivery not signed with the endpoint's secret: {delivery:?}"
        );
        let event = delivery.event();
        check_integration_event(&event).unwrap();
        assert_eq!(
            event["id"],
            json!(delivery.id),
            "webhook-id is the event's id"
        );
    }
    for account in [&ann, &bob] {
        let types: Vec<Value> = deliveries
            .iter()
            .map(Delivery::event)
            .filter(|event| event["subject"] == json!(account))
            .map(|event| event["type"].clone())
            .collect();
        assert_eq!(types, LIFE.map(Value::from).to_vec(), "account {account}");
    }
    // The address was sent before the erasure, never after: the registration carried it.
    let registered = deliveries
        .iter()
        .map(Delivery::event)
        .find(|event| event["subject"] == json!(ann) && event["type"] == json!(LIFE[0]))
        .unwrap();
    assert_eq!(registered["data"]["email"], json!("ann@example.com"));

    let listed = get_as(client, ports.query, "/webhooks", admin, None).await;
    assert_eq!(listed.status(), 200);
    let listed: Value = listed.json().await.unwrap();
    let listed = listed.to_string();
    assert!(listed.contains(&endpoint), "{listed}");
    assert!(!listed.contains("whsec_"), "a secret listed: {listed}");
    let attempts = get_as(
        client,
        ports.query,
        &format!("/webhooks/{endpoint}/deliveries"),
        admin,
        None,
    )
    .await;
    assert_eq!(attempts.status(), 200);
    let attempts: Value = attempts.json().await.unwrap();
    let text = attempts.to_string();
    for delivery in &deliveries {
        assert!(
            text.contains(&delivery.id),
            "no attempt of {}: {text}",
            delivery.id
        );
    }

    // A non-administrator sees none of it.
    register(client, ports.command, "eve@example.com").await;
    let eve = token(client, ports.command, "eve@example.com", PASSWORD).await;
    let refused = get_as(client, ports.query, "/webhooks", &eve, None).await;
    assert_eq!(refused.status(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_split_deployment_delivers_every_lifecycle_event_to_a_webhook() {
    let database = TestDatabase::new().await;
    let deployment = new_deployment("webhooks", database.url())
        .with_setting("IDENTITY__WEBHOOKS__ALLOWED_NETWORKS", LOOPBACK);
    let client = client();
    let services = start_all_services(&deployment, &client).await;
    let ports = Ports {
        command: services.command_port,
        query: services.query_port,
    };
    deployment
        .run(
            "command-api",
            &["admin", "create", "--email", ADMIN_EMAIL],
            Some(ADMIN_PASSWORD),
        )
        .await
        .unwrap();
    let admin = token(&client, ports.command, ADMIN_EMAIL, ADMIN_PASSWORD).await;
    every_lifecycle_event_arrives_signed_once_and_in_order(&client, ports, &admin).await;
    services.shut_down().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standalone_process_delivers_every_lifecycle_event_to_a_webhook() {
    let directory = std::env::temp_dir().join(format!("webhooks-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&directory).unwrap();
    let port = free_port().unwrap();
    let client = client();
    let mut standalone = start_standalone(&client, &directory, port).await;
    common::standalone::create_admin(&directory, ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let admin = token(&client, port, ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let ports = Ports {
        command: port,
        query: port,
    };
    every_lifecycle_event_arrives_signed_once_and_in_order(&client, ports, &admin).await;
    let status = standalone.stop(Signal::Interrupt).await.unwrap();
    assert!(
        status.success(),
        "the standalone process exited with {status}"
    );
    std::fs::remove_dir_all(&directory).ok();
}

/// The standalone process in `directory`, its webhooks allowed onto loopback.
async fn start_standalone(client: &reqwest::Client, directory: &Path, port: u16) -> Process {
    let mut process = Launch::new(
        "the standalone process",
        env!("CARGO_BIN_EXE_identity-service"),
    )
    .current_dir(directory)
    .env("IDENTITY__HTTP__ADDRESS", format!("127.0.0.1:{port}"))
    .env("IDENTITY__PASSWORD__MEMORY_KIB", "1024")
    .env("IDENTITY__PASSWORD__ITERATIONS", "1")
    .env("IDENTITY__WEBHOOKS__ALLOWED_NETWORKS", LOOPBACK)
    .env("IDENTITY__LOG__FILTER", "warn")
    .env("IDENTITY__LOG__FORMAT", "json")
    .log_to(directory.join("service.log"))
    .spawn()
    .unwrap();
    process
        .wait_until_serves(client, port, "/readyz")
        .await
        .unwrap();
    process
}
