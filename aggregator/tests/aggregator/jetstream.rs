//! The JetStream relay against a real NATS server with JetStream (`test_support::NatsServer`)
//! and real databases: account histories appended as the command API appends them, events read
//! back from the stream as a subscriber replaying it receives them, and from a plain NATS
//! subscription, which also sees what JetStream drops as duplicates.
//!
//! Tests on the shared server keep apart with a stream and a subject prefix of their own.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aggregator::admin;
use aggregator::consumer::Backoff;
use aggregator::jetstream::{
    JETSTREAM, JetStream, NatsSettings, Relay, RelayOptions, RelayOutcome,
};
use aggregator::{ReadModelWriter, RelayStats};
use async_nats::jetstream::stream;
use futures::StreamExt;
use integration::Published;
use message_store::MessageStore;
use serde_json::{Value, json};
use test_support::NatsServer;
use test_support::integration_schema::check_integration_event;
use uuid::Uuid;

use crate::support::{Stores, Writer, append_to_user, concurrent_writers, on_both_engines, settle};

const WAIT: Duration = Duration::from_secs(30);
const SOURCE: &str = "/identity-test";

/// Settings for a stream and subjects of the test's own on the server at `url`.
fn isolated(url: &str) -> NatsSettings {
    let tag = Uuid::now_v7().simple().to_string();
    NatsSettings {
        url: Some(url.into()),
        stream: format!("T{tag}"),
        subject_prefix: format!("t{tag}."),
        publish_timeout_ms: 2000,
        ..NatsSettings::default()
    }
}

fn options() -> RelayOptions {
    RelayOptions {
        batch_size: 50,
        lock_retry: Duration::from_millis(20),
        retry: Backoff {
            first: Duration::from_millis(50),
            max: Duration::from_millis(400),
        },
        ..RelayOptions::default()
    }
}

async fn relay_with(stores: &Stores, nats: &NatsSettings, published: Published) -> Relay {
    Relay::new(
        stores.store.clone(),
        stores.sealer.clone(),
        stores.read_model.clone(),
        JetStream::connect(nats).await.unwrap(),
        SOURCE,
        published,
        options(),
    )
}

async fn relay(stores: &Stores, nats: &NatsSettings) -> Relay {
    relay_with(stores, nats, Published::default()).await
}

fn every_type() -> Published {
    let names: Vec<String> = integration::EventType::ALL
        .iter()
        .map(|kind| kind.name().to_owned())
        .collect();
    Published::from_names(Some(&names)).unwrap()
}

async fn checkpoint(read_model: &ReadModelWriter) -> u64 {
    read_model
        .checkpoint(JETSTREAM)
        .await
        .unwrap()
        .map_or(0, |checkpoint| checkpoint.position)
}

/// What the steps of a drain published.
#[derive(Debug, Default, PartialEq, Eq)]
struct Drained {
    published: usize,
    duplicates: usize,
}

/// Steps `relay` until its checkpoint has reached `until`. A step may fail while the client
/// is still connecting: it is stepped again, as the loop does.
async fn drain(relay: &mut Relay, read_model: &ReadModelWriter, until: u64) -> Drained {
    let mut drained = Drained::default();
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        match relay.process_next_batch().await {
            Ok(RelayOutcome::Published {
                published,
                duplicates,
                ..
            }) => {
                drained.published += published;
                drained.duplicates += duplicates;
            }
            Ok(RelayOutcome::Idle) => {
                if checkpoint(read_model).await >= until {
                    return drained;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok(RelayOutcome::Halted { reason }) => panic!("halted: {reason}"),
            Err(error) => {
                eprintln!("a step failed, stepping again: {error:#}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    panic!("the relay did not reach {until}");
}

async fn client(nats: &NatsSettings) -> async_nats::Client {
    let url = nats.url.as_ref().unwrap().expose().to_owned();
    async_nats::connect(url).await.unwrap()
}

/// One message of the stream, as a subscriber receives it.
#[derive(Debug, Clone)]
struct Received {
    subject: String,
    msg_id: String,
    event: Value,
}

impl Received {
    fn kind(&self) -> &str {
        self.event["type"].as_str().unwrap()
    }

    fn account(&self) -> &str {
        self.event["subject"].as_str().unwrap()
    }

    fn id(&self) -> &str {
        self.event["id"].as_str().unwrap()
    }
}

/// Every message the stream holds, in its order (none while there is no stream).
async fn stream_messages(nats: &NatsSettings) -> Vec<Received> {
    let jetstream = async_nats::jetstream::new(client(nats).await);
    let Ok(stream) = jetstream.get_stream(&nats.stream).await else {
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

/// A plain NATS subscription to every subject the relay publishes on: it receives every
/// publication, those JetStream drops as duplicates too.
struct Subscriber {
    received: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    async fn start(nats: &NatsSettings) -> Self {
        let client = client(nats).await;
        let mut subscription = client
            .subscribe(format!("{}identity.>", nats.subject_prefix))
            .await
            .unwrap();
        client.flush().await.unwrap();
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let task = tokio::spawn({
            let received = received.clone();
            async move {
                let _client = client;
                while let Some(message) = subscription.next().await {
                    let msg_id = message
                        .headers
                        .as_ref()
                        .and_then(|headers| headers.get("Nats-Msg-Id"))
                        .map(|id| id.as_str().to_owned())
                        .unwrap_or_default();
                    received.lock().unwrap().push(Received {
                        subject: message.subject.to_string(),
                        msg_id,
                        event: serde_json::from_slice(&message.payload).unwrap(),
                    });
                }
            }
        });
        Self { received, task }
    }

    /// What it has received once it has at least one copy of each of `ids`.
    async fn wait_for(&self, ids: &HashSet<String>) -> Vec<Received> {
        let deadline = Instant::now() + WAIT;
        loop {
            let received = self.received.lock().unwrap().clone();
            let seen: HashSet<String> = received.iter().map(|r| r.msg_id.clone()).collect();
            if ids.is_subset(&seen) {
                return received;
            }
            assert!(
                Instant::now() < deadline,
                "the subscriber has {} of {} events",
                ids.intersection(&seen).count(),
                ids.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
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

async fn delete_stream(nats: &NatsSettings) {
    let jetstream = async_nats::jetstream::new(client(nats).await);
    let _ = jetstream.delete_stream(&nats.stream).await;
}

/// The public type an internal event of `message_type` is published as, if any: the contract
/// as the schema file documents it, written out here apart from the relay's code.
fn public_type(message_type: &str) -> Option<&'static str> {
    Some(match message_type {
        "UserRegistered" => "identity.user.registered.v1",
        "UserActivated" => "identity.user.activated.v1",
        "UserDeactivated" => "identity.user.deactivated.v1",
        "EmailVerified" => "identity.user.email_verified.v1",
        "EmailChanged" => "identity.user.email_changed.v1",
        "PasswordChanged" | "PasswordReset" => "identity.user.password_changed.v1",
        "UserErased" => "identity.user.erased.v1",
        "LoginSucceeded" => "identity.user.logged_in.v1",
        _ => return None,
    })
}

/// An event the store says must be published: its message id, public type and account.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Expected {
    id: String,
    kind: &'static str,
    account: String,
}

/// What the relay must publish of everything in the store up to `until`, in global order,
/// `logins` included or not.
async fn expected(store: &Arc<dyn MessageStore>, until: u64, logins: bool) -> Vec<Expected> {
    settle(store, until).await;
    let mut expected = Vec::new();
    let mut after = 0;
    loop {
        let messages = store.read_all(after, 500).await.unwrap();
        let Some(last) = messages.last() else {
            return expected;
        };
        after = last.global_position;
        for message in &messages {
            let stream = message.stream.as_str();
            let account = stream
                .strip_prefix("user-")
                .or_else(|| stream.strip_prefix("userLogin-"));
            let (Some(account), Some(kind)) = (account, public_type(&message.message_type)) else {
                continue;
            };
            if kind == "identity.user.logged_in.v1" && !logins {
                continue;
            }
            expected.push(Expected {
                id: message.id.to_string(),
                kind,
                account: account.to_owned(),
            });
        }
    }
}

/// Checks each received event against the public schema, its `Nats-Msg-Id` against its `id`,
/// and its subject against its type.
fn check_each(received: &[Received], nats: &NatsSettings) {
    for message in received {
        check_integration_event(&message.event)
            .unwrap_or_else(|error| panic!("{error}: {}", message.event));
        assert_eq!(
            message.msg_id,
            message.id(),
            "Nats-Msg-Id is the CloudEvents id"
        );
        assert_eq!(
            message.subject,
            format!("{}{}", nats.subject_prefix, message.kind())
        );
        assert_eq!(message.event["source"], SOURCE);
    }
}

/// The stream holds every expected event once, in order per account (and in the store's
/// order, which a relay keeps however often it publishes again).
fn assert_each_once_in_order(received: &[Received], expected: &[Expected]) {
    let ids: Vec<&str> = received.iter().map(Received::id).collect();
    let unique: HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "no event twice in the stream");
    let by_account = |events: Vec<(&str, &str, &str)>| {
        let mut accounts: HashMap<String, Vec<(String, String)>> = HashMap::new();
        for (account, id, kind) in events {
            accounts
                .entry(account.to_owned())
                .or_default()
                .push((id.to_owned(), kind.to_owned()));
        }
        accounts
    };
    let got = by_account(
        received
            .iter()
            .map(|r| (r.account(), r.id(), r.kind()))
            .collect(),
    );
    let want = by_account(
        expected
            .iter()
            .map(|e| (e.account.as_str(), e.id.as_str(), e.kind))
            .collect(),
    );
    assert_eq!(got, want, "every event once, in order per account");
    let expected_ids: Vec<&str> = expected.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, expected_ids, "and in the store's order");
}

/// An account's whole lifecycle, at times from `t` on; an erasure (with its key deleted) if
/// `erase`. Logins and a rehash between, which are not lifecycle events.
async fn lifecycle(writer: &Writer, id: Uuid, t: i64, erase: bool) {
    writer.register(id, false, t).await;
    writer.login(id, t + 1).await;
    writer.verify_email(id, t + 2).await;
    writer.activate(id, t + 3).await;
    writer.rehash_password(id, t + 4).await;
    writer.fail_login(id, t + 5).await;
    writer.change_email(id, t + 6).await;
    writer.change_password(id, t + 7).await;
    writer.login(id, t + 8).await;
    writer.reset_password(id, t + 9).await;
    writer.deactivate(id, t + 10).await;
    if erase {
        writer.erase(id, t + 11, true).await;
    }
}

on_both_engines!(
    every_lifecycle_event_arrives_once_in_order_per_account_with_its_id_as_nats_msg_id,
    every_lifecycle_event_arrives
);
async fn every_lifecycle_event_arrives(stores: Stores) {
    let nats = NatsServer::shared().await;
    let settings = isolated(&nats.url());
    let writer = Writer::new(stores.store.clone(), stores.sealer.clone());
    let accounts: Vec<Uuid> = (0..6).map(|_| Uuid::now_v7()).collect();
    for (n, id) in accounts.iter().enumerate() {
        lifecycle(&writer, *id, n as i64 * 100, n % 3 == 0).await;
    }

    let mut relay = relay(&stores, &settings).await;
    let drained = drain(&mut relay, &stores.read_model, writer.last()).await;
    let received = stream_messages(&settings).await;
    let expected = expected(&stores.store, writer.last(), false).await;
    assert_eq!(
        expected.len(),
        6 * 7 + 2,
        "seven per account, and two erasures"
    );
    assert_eq!(
        drained,
        Drained {
            published: expected.len(),
            duplicates: 0
        }
    );
    check_each(&received, &settings);
    assert_each_once_in_order(&received, &expected);

    // The lifecycle as the types say it, for each account; no login, no rehash.
    for (n, id) in accounts.iter().enumerate() {
        let of_account: Vec<&Received> = received
            .iter()
            .filter(|r| r.account() == id.to_string())
            .collect();
        let mut types = vec![
            "registered",
            "email_verified",
            "activated",
            "email_changed",
            "password_changed",
            "password_changed",
            "deactivated",
        ];
        let erased = n % 3 == 0;
        if erased {
            types.push("erased");
        }
        let got: Vec<&str> = of_account
            .iter()
            .map(|r| {
                r.kind()
                    .strip_prefix("identity.user.")
                    .and_then(|kind| kind.strip_suffix(".v1"))
                    .unwrap()
            })
            .collect();
        assert_eq!(got, types);
        assert_eq!(of_account[4].event["data"]["reason"], "changed");
        assert_eq!(of_account[5].event["data"]["reason"], "reset");
        // An address is published only while its account is not erased.
        let registered = &of_account[0].event["data"];
        let changed = &of_account[3].event["data"];
        if erased {
            assert_eq!(registered["email"], Value::Null);
            assert_eq!(changed["email"], Value::Null);
            assert_eq!(of_account[7].event["data"]["by"], "self");
        } else {
            assert_eq!(
                registered["email"],
                format!("User.{}@Example.com", id.simple())
            );
            assert_eq!(registered["status"], "pending");
            assert_eq!(registered["roles"], json!(["user"]));
            assert!(changed["email"].as_str().unwrap().starts_with("Moved."));
        }
    }
    assert_eq!(
        relay
            .stats()
            .published
            .load(std::sync::atomic::Ordering::Relaxed),
        44
    );
    delete_stream(&settings).await;
}

#[tokio::test]
async fn logins_are_published_only_when_configured() {
    let stores = Stores::postgres().await;
    let nats = NatsServer::shared().await;
    let writer = Writer::new(stores.store.clone(), stores.sealer.clone());
    let id = Uuid::now_v7();
    writer.register(id, true, 0).await;
    writer.login(id, 1).await;
    writer.fail_login(id, 2).await;
    writer.login(id, 3).await;

    let by_default = isolated(&nats.url());
    let mut relay = relay(&stores, &by_default).await;
    drain(&mut relay, &stores.read_model, writer.last()).await;
    let received = stream_messages(&by_default).await;
    let kinds: Vec<&str> = received.iter().map(Received::kind).collect();
    assert_eq!(kinds, ["identity.user.registered.v1"]);

    // Configured to: the same history again, from a reset, into another stream.
    admin::reset(&stores.read_model, JETSTREAM).await.unwrap();
    let with_logins = isolated(&nats.url());
    let mut relay = relay_with(&stores, &with_logins, every_type()).await;
    drain(&mut relay, &stores.read_model, writer.last()).await;
    let received = stream_messages(&with_logins).await;
    check_each(&received, &with_logins);
    assert_each_once_in_order(
        &received,
        &expected(&stores.store, writer.last(), true).await,
    );
    let logins: Vec<&Value> = received
        .iter()
        .filter(|r| r.kind() == "identity.user.logged_in.v1")
        .map(|r| &r.event["data"])
        .collect();
    assert_eq!(
        logins,
        [&json!({"login_count": 1}), &json!({"login_count": 2})]
    );
    delete_stream(&by_default).await;
    delete_stream(&with_logins).await;
}

#[tokio::test]
async fn the_stream_is_created_when_missing_with_the_configured_retention() {
    let stores = Stores::postgres().await;
    let nats = NatsServer::shared().await;
    let settings = NatsSettings {
        max_age_secs: 3 * 24 * 3600,
        duplicate_window_secs: 90,
        ..isolated(&nats.url())
    };
    let writer = Writer::new(stores.store.clone(), stores.sealer.clone());
    writer.register(Uuid::now_v7(), true, 0).await;
    let mut relay = relay(&stores, &settings).await;
    drain(&mut relay, &stores.read_model, writer.last()).await;

    let jetstream = async_nats::jetstream::new(client(&settings).await);
    let mut stream = jetstream.get_stream(&settings.stream).await.unwrap();
    let config = stream.info().await.unwrap().config.clone();
    assert_eq!(
        config.subjects,
        [format!("{}identity.>", settings.subject_prefix)]
    );
    assert_eq!(config.storage, stream::StorageType::File);
    assert_eq!(config.retention, stream::RetentionPolicy::Limits);
    assert_eq!(config.max_age, Duration::from_secs(3 * 24 * 3600));
    assert_eq!(config.duplicate_window, Duration::from_secs(90));
    assert_eq!(config.num_replicas, 1);
    assert_eq!(stream.info().await.unwrap().state.messages, 1);
    delete_stream(&settings).await;
}

#[tokio::test]
async fn an_existing_stream_is_used_as_it_is() {
    let stores = Stores::postgres().await;
    let nats = NatsServer::shared().await;
    let settings = isolated(&nats.url());
    let jetstream = async_nats::jetstream::new(client(&settings).await);
    // The operator's: memory storage, an hour, and a wider subject space than the relay's.
    let subjects = vec![format!("{}>", settings.subject_prefix)];
    jetstream
        .create_stream(stream::Config {
            name: settings.stream.clone(),
            subjects: subjects.clone(),
            storage: stream::StorageType::Memory,
            max_age: Duration::from_secs(3600),
            duplicate_window: Duration::from_secs(60),
            ..stream::Config::default()
        })
        .await
        .unwrap();
    let writer = Writer::new(stores.store.clone(), stores.sealer.clone());
    writer.register(Uuid::now_v7(), true, 0).await;
    let mut relay = relay(&stores, &settings).await;
    drain(&mut relay, &stores.read_model, writer.last()).await;

    let mut stream = jetstream.get_stream(&settings.stream).await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.config.subjects, subjects);
    assert_eq!(info.config.storage, stream::StorageType::Memory);
    assert_eq!(info.config.max_age, Duration::from_secs(3600));
    assert_eq!(info.state.messages, 1);
    delete_stream(&settings).await;
}

#[tokio::test]
async fn an_erased_accounts_address_is_never_published_after_its_erasure() {
    let stores = Stores::postgres().await;
    let nats = NatsServer::shared().await;
    let settings = isolated(&nats.url());
    let subscriber = Subscriber::start(&settings).await;
    let writer = Writer::new(stores.store.clone(), stores.sealer.clone());
    let (ann, bob) = (Uuid::now_v7(), Uuid::now_v7());
    let address = |id: Uuid| format!("User.{}@Example.com", id.simple());
    writer.register(ann, true, 0).await;
    let mut relay = relay(&stores, &settings).await;
    drain(&mut relay, &stores.read_model, writer.last()).await;
    assert_eq!(
        stream_messages(&settings).await[0].event["data"]["email"],
        address(ann).as_str(),
        "published while the account lived"
    );

    writer.erase(ann, 1, true).await;
    drain(&mut relay, &stores.read_model, writer.last()).await;
    // Bob is registered and erased before the relay reads either, and his key is not deleted
    // yet (the command API stopped in between): the relay has read the erasure, so his
    // registration goes out without the address all the same.
    writer.register(bob, true, 2).await;
    writer.erase(bob, 3, false).await;
    drain(&mut relay, &stores.read_model, writer.last()).await;
    let ids: HashSet<String> = expected(&stores.store, writer.last(), false)
        .await
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids.len(), 4);
    let first_time = subscriber.wait_for(&ids).await.len();
    assert_eq!(first_time, 4);

    // A reset relay publishes everything again: Ann's registration now without her address.
    admin::reset(&stores.read_model, JETSTREAM).await.unwrap();
    let mut replaying = relay_with(&stores, &settings, Published::default()).await;
    let replayed = drain(&mut replaying, &stores.read_model, writer.last()).await;
    assert_eq!(
        replayed,
        Drained {
            published: 4,
            duplicates: 4
        },
        "JetStream dropped every event published again, within its window"
    );
    let deadline = Instant::now() + WAIT;
    while subscriber.received.lock().unwrap().len() < 8 {
        assert!(Instant::now() < deadline, "the replay did not arrive");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let received = subscriber.received.lock().unwrap().clone();
    let after_ann_erased = &received[1..];
    for message in after_ann_erased {
        let text = message.event.to_string();
        assert!(!text.contains(&address(ann)), "{text}");
        assert!(!text.contains(&address(bob)), "{text}");
    }
    let registrations: Vec<&Value> = after_ann_erased
        .iter()
        .filter(|r| r.kind() == "identity.user.registered.v1")
        .map(|r| &r.event["data"]["email"])
        .collect();
    assert_eq!(
        registrations,
        [&Value::Null; 3],
        "Bob's, then Ann's and Bob's replayed"
    );
    check_each(&received, &settings);
    delete_stream(&settings).await;
}

#[tokio::test]
async fn a_message_it_cannot_read_halts_the_relay_after_what_precedes_it() {
    let stores = Stores::postgres().await;
    let nats = NatsServer::shared().await;
    let settings = isolated(&nats.url());
    let writer = Writer::new(stores.store.clone(), stores.sealer.clone());
    let id = Uuid::now_v7();
    writer.register(id, false, 0).await;
    let before = writer.last();
    let poison = append_to_user(
        &stores.store,
        id,
        "UserActivated",
        1,
        json!({ "at": "not a time" }),
    )
    .await;
    writer.deactivate(id, 2).await;
    settle(&stores.store, writer.last().max(poison)).await;

    let mut relay = relay(&stores, &settings).await;
    let deadline = Instant::now() + WAIT;
    let reason = loop {
        match relay.process_next_batch().await {
            Ok(RelayOutcome::Halted { reason }) => break reason,
            Ok(_) | Err(_) => {
                assert!(Instant::now() < deadline, "the relay did not halt");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert!(reason.contains(&poison.to_string()), "{reason}");
    assert_eq!(checkpoint(&stores.read_model).await, before);
    let kinds: Vec<String> = stream_messages(&settings)
        .await
        .iter()
        .map(|r| r.kind().to_owned())
        .collect();
    assert_eq!(kinds, ["identity.user.registered.v1"], "nothing after it");
    assert!(matches!(
        relay.process_next_batch().await,
        Ok(RelayOutcome::Halted { .. })
    ));
    delete_stream(&settings).await;
}

/// Waits until `stats` says a step has failed `more` times since `retried`.
async fn wait_for_failures(stats: &RelayStats, retried: u64, more: u64) {
    let deadline = Instant::now() + WAIT;
    while stats.retried.load(std::sync::atomic::Ordering::Relaxed) < retried + more {
        assert!(Instant::now() < deadline, "no step failed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the stream holds `count` messages.
async fn wait_for_stream(settings: &NatsSettings, count: usize) -> Vec<Received> {
    let deadline = Instant::now() + WAIT;
    loop {
        let received = stream_messages(settings).await;
        if received.len() >= count {
            return received;
        }
        assert!(
            Instant::now() < deadline,
            "the stream holds {} of {count}",
            received.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn with_nats_down_for_a_while_nothing_is_lost_and_everything_arrives_after() {
    let stores = Stores::postgres().await;
    let nats = NatsServer::private().await.unwrap();
    let settings = isolated(&nats.url());
    // Down before the relay even connects: it starts all the same.
    nats.stop();
    let writer = Writer::new(stores.store.clone(), stores.sealer.clone());
    let relay = relay(&stores, &settings).await;
    let stats = relay.stats();
    let running = tokio::spawn(relay.run(std::future::pending()));
    let first: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
    for (n, id) in first.iter().enumerate() {
        lifecycle(&writer, *id, n as i64 * 100, false).await;
    }
    wait_for_failures(&stats, 0, 2).await;
    assert_eq!(checkpoint(&stores.read_model).await, 0, "nothing passed");

    nats.start().await.unwrap();
    let received = wait_for_stream(&settings, 3 * 7).await;
    assert_each_once_in_order(
        &received,
        &expected(&stores.store, writer.last(), false).await,
    );

    // Down again, with the stream holding events: those written meanwhile wait, then follow.
    nats.stop();
    let retried = stats.retried.load(std::sync::atomic::Ordering::Relaxed);
    for (n, id) in first.iter().enumerate() {
        writer.activate(*id, 1000 + n as i64).await;
    }
    lifecycle(&writer, Uuid::now_v7(), 2000, true).await;
    wait_for_failures(&stats, retried, 2).await;
    nats.start().await.unwrap();
    let received = wait_for_stream(&settings, 3 * 7 + 3 + 8).await;
    check_each(&received, &settings);
    assert_each_once_in_order(
        &received,
        &expected(&stores.store, writer.last(), false).await,
    );
    running.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_at_random_points_publishes_every_event_and_duplicates_only_with_the_same_id()
 {
    let stores = Stores::postgres().await;
    let nats = NatsServer::shared().await;
    let settings = isolated(&nats.url());
    let subscriber = Subscriber::start(&settings).await;
    let (store, sealer) = (stores.store.clone(), stores.sealer.clone());
    let writing = tokio::spawn(async move { concurrent_writers(&store, &sealer, 3, 8, 8).await });
    let mut runs = 0;
    let mut published = 0;
    while !writing.is_finished() || runs < 20 {
        runs += 1;
        let relay = Relay::new(
            stores.store.clone(),
            stores.sealer.clone(),
            stores.read_model.clone(),
            JetStream::connect(&settings).await.unwrap(),
            SOURCE,
            Published::default(),
            RelayOptions {
                batch_size: 1 + fastrand::usize(..30),
                ..options()
            },
        );
        let stats = relay.stats();
        let task = tokio::spawn(relay.run(std::future::pending()));
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..80))).await;
        task.abort();
        let _ = task.await;
        published += stats.published.load(std::sync::atomic::Ordering::Relaxed);
    }
    let writer = writing.await.unwrap();
    let mut relay = relay(&stores, &settings).await;
    drain(&mut relay, &stores.read_model, writer.last()).await;

    let expected = expected(&stores.store, writer.last(), false).await;
    let received = stream_messages(&settings).await;
    check_each(&received, &settings);
    assert_each_once_in_order(&received, &expected);

    // What was published more than once (by a relay killed before its checkpoint) reached a
    // plain subscriber again, always with the same id and the same event.
    let ids: HashSet<String> = expected.iter().map(|e| e.id.clone()).collect();
    let seen = subscriber.wait_for(&ids).await;
    let mut copies: HashMap<&str, &Value> = HashMap::new();
    for message in &seen {
        assert_eq!(message.msg_id, message.id());
        let first = copies.entry(message.id()).or_insert(&message.event);
        assert_same_event(first, &message.event);
    }
    assert_eq!(copies.len(), ids.len(), "nothing else was published");
    eprintln!(
        "{runs} relays killed; {} publications for {} events",
        seen.len(),
        ids.len()
    );
    assert!(published as usize <= seen.len());
    delete_stream(&settings).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_stopping_in_the_middle_of_a_backlog_loses_nothing_and_the_stream_holds_each_event_once()
 {
    let stores = Stores::postgres().await;
    let nats = NatsServer::private().await.unwrap();
    let settings = isolated(&nats.url());
    let writer = Writer::new(stores.store.clone(), stores.sealer.clone());
    for n in 0..30 {
        lifecycle(&writer, Uuid::now_v7(), n * 100, n % 4 == 0).await;
    }
    let expected = expected(&stores.store, writer.last(), false).await;
    // Small batches read ahead, many to a step: the backlog goes out as the aggregator sends
    // a large one.
    let mut relay = Relay::new(
        stores.store.clone(),
        stores.sealer.clone(),
        stores.read_model.clone(),
        JetStream::connect(&settings).await.unwrap(),
        SOURCE,
        Published::default(),
        RelayOptions {
            batch_size: 7,
            ..options()
        },
    );
    // One step: some of the backlog out, the reader ahead of it with the next batches.
    let deadline = Instant::now() + WAIT;
    let first = loop {
        match relay.process_next_batch().await {
            Ok(RelayOutcome::Published { published, .. }) => break published,
            other => {
                assert!(Instant::now() < deadline, "{other:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert!(first > 7 && first < expected.len(), "{first}");
    nats.stop();
    let stats = relay.stats();
    let running = tokio::spawn(relay.run(std::future::pending()));
    wait_for_failures(&stats, 0, 2).await;
    let held = checkpoint(&stores.read_model).await;
    assert!(held < writer.last(), "stopped part way: {held}");
    nats.start().await.unwrap();

    let received = wait_for_stream(&settings, expected.len()).await;
    check_each(&received, &settings);
    assert_each_once_in_order(&received, &expected);
    running.abort();
}
