//! The JetStream relay in the real aggregator process of the split deployment, publishing to a
//! real NATS server (`test_support::NatsServer`): accounts registered, their passwords changed
//! and some erased through the command API while the aggregator is killed (SIGKILL) at random
//! points and started again; every event still reaches the stream once, in order, as the
//! public schema says, and a plain subscriber sees a duplicate only as the same event with the
//! same id. `status` lists the relay; `reset jetstream` publishes everything again, which the
//! stream drops as duplicates.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot go on panics with the cause

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};
use test_support::integration_schema::check_integration_event;
use test_support::{NatsServer, Signal, TestDatabase};
use uuid::Uuid;

use common::{PASSWORD, client, new_deployment, register, start_services, token};

const WAIT: Duration = Duration::from_secs(60);
const NEW_PASSWORD: &str = "another long passphrase";

/// One message as received, from the stream or a plain subscription.
#[derive(Debug, Clone)]
struct Received {
    subject: String,
    msg_id: String,
    event: Value,
}

impl Received {
    fn id(&self) -> &str {
        self.event["id"].as_str().unwrap()
    }
}

/// Every message the stream holds, in its order.
async fn stream_messages(client: &async_nats::Client, stream: &str) -> Vec<Received> {
    let jetstream = async_nats::jetstream::new(client.clone());
    let Ok(stream) = jetstream.get_stream(stream).await else {
        return Vec::new();
    };
    let state = &stream.cached_info().state;
    let mut received = Vec::new();
    if state.messages == 0 {
        return received;
    }
    for sequence in state.first_sequence..=state.last_sequence {
        let message = stream.get_raw_message(sequence).await.unwrap();
        received.push(Received {
            subject: message.subject.to_string(),
            msg_id: message
                .headers
                .get("Nats-Msg-Id")
                .map(|id| id.as_str().to_owned())
                .unwrap_or_default(),
            event: serde_json::from_slice(&message.payload).unwrap(),
        });
    }
    received
}

/// The lifecycle events the store holds, in its order: (message id, public type, account).
async fn expected(pool: &sqlx::PgPool) -> Vec<(String, &'static str, String)> {
    let rows: Vec<(Uuid, String, String)> = sqlx::query_as(
        "SELECT id, stream_name, type FROM messages WHERE stream_name LIKE 'user-%' \
         ORDER BY global_position",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter()
        .filter_map(|(id, stream, kind)| {
            let public = match kind.as_str() {
                "UserRegistered" => "identity.user.registered.v1",
                "PasswordChanged" => "identity.user.password_changed.v1",
                "UserErased" => "identity.user.erased.v1",
                "UserActivated" => "identity.user.activated.v1",
                "UserDeactivated" => "identity.user.deactivated.v1",
                _ => return None,
            };
            let account = stream.strip_prefix("user-")?.to_owned();
            Some((id.to_string(), public, account))
        })
        .collect()
}

/// `again` is `first` published again: the same event, but for an address that may have become
/// null since (its account erased meanwhile).
fn assert_same_event(first: &Value, again: &Value) {
    let without_address = |event: &Value| {
        let mut event = event.clone();
        if let Some(email) = event["data"].get_mut("email") {
            *email = Value::Null;
        }
        event
    };
    assert_eq!(
        without_address(first),
        without_address(again),
        "a duplicate is the same event"
    );
    let address = &again["data"]["email"];
    assert!(
        address.is_null() || *address == first["data"]["email"],
        "an address published again is the one published first: {again}"
    );
}

async fn relay_checkpoint(pool: &sqlx::PgPool) -> u64 {
    let position: Option<i64> = sqlx::query_scalar(
        "SELECT position FROM projection_checkpoints WHERE projection = 'jetstream'",
    )
    .fetch_optional(pool)
    .await
    .unwrap();
    position.map_or(0, |position| u64::try_from(position).unwrap())
}

/// Registers an account, changes its password, and erases every third one: the lifecycle
/// written the way clients write it.
async fn live(client: &reqwest::Client, port: u16, n: usize) {
    let email = format!("person{n}@example.com");
    let (id, _) = register(client, port, &email).await;
    let token = token(client, port, &email, PASSWORD).await;
    let response = client
        .post(format!("http://127.0.0.1:{port}/users/{id}/password"))
        .bearer_auth(&token)
        .json(&json!({ "current_password": PASSWORD, "new_password": NEW_PASSWORD }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    if n.is_multiple_of(3) {
        let token = common::token(client, port, &email, NEW_PASSWORD).await;
        let response = client
            .delete(format!("http://127.0.0.1:{port}/users/{id}"))
            .bearer_auth(&token)
            .json(&json!({ "password": NEW_PASSWORD }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 204);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregator_killed_at_random_points_still_publishes_every_event_once_in_order() {
    let database = TestDatabase::new().await;
    let nats = NatsServer::shared().await;
    let tag = Uuid::now_v7().simple().to_string();
    let (stream, prefix) = (format!("T{tag}"), format!("t{tag}."));
    let deployment = new_deployment("jetstream-killed", database.url())
        .with_setting("IDENTITY__NATS__URL", nats.url())
        .with_setting("IDENTITY__NATS__STREAM", &stream)
        .with_setting("IDENTITY__NATS__SUBJECT_PREFIX", &prefix)
        .with_setting("IDENTITY__INTEGRATION__SOURCE", "/identity-split")
        // Small batches: more points between a publication and its checkpoint to die at.
        .with_setting("IDENTITY__AGGREGATOR__RELAY__BATCH_SIZE", "3")
        .with_setting("IDENTITY__AGGREGATOR__RELAY__RETRY_FIRST_MS", "100");
    let http = client();
    let mut services = start_services(&deployment, &http, &["command-api", "aggregator"]).await;
    let port = services.command_port;

    // A plain subscriber: it gets every publication, those JetStream drops as duplicates too.
    let nats_client = async_nats::connect(nats.url()).await.unwrap();
    let mut subscription = nats_client
        .subscribe(format!("{prefix}identity.>"))
        .await
        .unwrap();
    nats_client.flush().await.unwrap();
    let seen: Arc<Mutex<Vec<Received>>> = Arc::default();
    let subscriber = tokio::spawn({
        let seen = seen.clone();
        async move {
            while let Some(message) = subscription.next().await {
                let msg_id = message
                    .headers
                    .as_ref()
                    .and_then(|headers| headers.get("Nats-Msg-Id"))
                    .map(|id| id.as_str().to_owned())
                    .unwrap_or_default();
                seen.lock().unwrap().push(Received {
                    subject: message.subject.to_string(),
                    msg_id,
                    event: serde_json::from_slice(&message.payload).unwrap(),
                });
            }
        }
    });

    let writing = tokio::spawn({
        let http = http.clone();
        async move {
            for n in 0..24 {
                live(&http, port, n).await;
            }
        }
    });
    let mut kills = 0;
    while !writing.is_finished() || kills < 4 {
        let pause = 50 + (Uuid::new_v4().as_u128() % 650) as u64;
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let aggregator = services.processes.last_mut().unwrap();
        aggregator.stop(Signal::Kill).await.unwrap();
        kills += 1;
        let (restarted, _) = deployment
            .start_service(&http, "aggregator", &format!("aggregator-{kills}"), &[])
            .await
            .unwrap();
        *services.processes.last_mut().unwrap() = restarted;
    }
    writing.await.unwrap();

    let pool = database.pool().await;
    let expected = expected(&pool).await;
    assert_eq!(expected.len(), 24 * 2 + 8);
    let deadline = Instant::now() + WAIT;
    let received = loop {
        let received = stream_messages(&nats_client, &stream).await;
        if received.len() >= expected.len() {
            break received;
        }
        assert!(
            Instant::now() < deadline,
            "the stream holds {} of {} events; logs in {}",
            received.len(),
            expected.len(),
            deployment.logs.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // Once each, in the store's order, as the schema says, Nats-Msg-Id the CloudEvents id.
    let ids: Vec<&str> = received.iter().map(Received::id).collect();
    let want: Vec<&str> = expected.iter().map(|(id, _, _)| id.as_str()).collect();
    assert_eq!(
        ids,
        want,
        "{kills} kills; logs in {}",
        deployment.logs.display()
    );
    for (message, (_, kind, account)) in received.iter().zip(&expected) {
        check_integration_event(&message.event).unwrap();
        assert_eq!(message.msg_id, message.id());
        assert_eq!(message.event["type"], *kind);
        assert_eq!(message.event["subject"], account.as_str());
        assert_eq!(message.event["source"], "/identity-split");
        assert_eq!(message.subject, format!("{prefix}{kind}"));
    }

    // A duplicate a plain subscriber saw is the same event with the same id (its address
    // gone, if its account was erased in between).
    let check_duplicates = |seen: &[Received]| {
        let mut copies: HashMap<&str, &Value> = HashMap::new();
        for message in seen {
            assert_eq!(message.msg_id, message.id());
            let first = copies.entry(message.id()).or_insert(&message.event);
            assert_same_event(first, &message.event);
        }
        copies.len()
    };
    let wanted: HashSet<&str> = want.iter().copied().collect();
    let deadline = Instant::now() + WAIT;
    loop {
        let seen = seen.lock().unwrap().clone();
        let ids: HashSet<&str> = seen.iter().map(Received::id).collect();
        if wanted.is_subset(&ids) {
            assert_eq!(check_duplicates(&seen), wanted.len());
            break;
        }
        assert!(Instant::now() < deadline, "the subscriber missed events");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // `status` lists the relay; `reset jetstream` publishes everything again, each event with
    // its id, and the stream drops them all as duplicates.
    deployment
        .run("aggregator", &["status"], None)
        .await
        .unwrap();
    let status = std::fs::read_to_string(deployment.log("aggregator-status")).unwrap();
    assert!(status.contains(r#""projection":"jetstream""#), "{status}");
    let before_reset = seen.lock().unwrap().len();
    deployment
        .run("aggregator", &["reset", "jetstream"], None)
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while seen.lock().unwrap().len() < before_reset + expected.len() {
        assert!(
            Instant::now() < deadline,
            "the reset relay did not publish again; logs in {}",
            deployment.logs.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(check_duplicates(&seen.lock().unwrap()), wanted.len());
    let head: i64 = sqlx::query_scalar("SELECT max(global_position) FROM messages")
        .fetch_one(&pool)
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while relay_checkpoint(&pool).await < u64::try_from(head).unwrap() {
        assert!(
            Instant::now() < deadline,
            "the relay did not checkpoint again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        stream_messages(&nats_client, &stream).await.len(),
        expected.len(),
        "nothing twice in the stream"
    );

    subscriber.abort();
    services.shut_down().await.unwrap();
    let jetstream = async_nats::jetstream::new(nats_client);
    let _ = jetstream.delete_stream(&stream).await;
}
