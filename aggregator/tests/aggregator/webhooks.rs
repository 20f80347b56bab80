//! Webhook delivery against real HTTP receivers (small axum servers on 127.0.0.1:0 inside the
//! test): account events appended as the command API appends them (sealed, `support::Writer`),
//! endpoints registered, rotated, enabled and deleted by appending what `decide_webhook`
//! decides, and every delivery checked as a receiver would check it: its signature with the
//! endpoint's secret, its body against the public schema.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aggregator::ReadModelWriter;
use aggregator::consumer::Backoff;
use aggregator::webhooks::attempts::{self, RecordedAttempt};
use aggregator::webhooks::{
    self, DeliverySettings, EndpointOutcome, WebhookError, WebhookOptions, WebhookSupervisor,
    WebhookWatch,
};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use chrono::{DateTime, TimeDelta, Utc};
use identity::{
    EVENT_VERSION_KEY, UserId, WebhookCommand, WebhookEvent, WebhookId, WebhookNonce, WebhookState,
    decide_webhook, event_version, webhook_stream_name,
};
use integration::{NetworkPolicy, Published};
use message_store::{
    ConnectOptions, ExpectedVersion, MessageStore, NewMessage, StreamAppend, StreamName,
};
use platform::clock::{Clock, ManualClock, SystemClock};
use serde_json::{Value, json};
use tokens::{WebhookSecret, WebhookSecretKey};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::support::{Env, Stores, Writer, on_both_engines, settle};

const WAIT: Duration = Duration::from_secs(90);
const REGISTERED: &str = "identity.user.registered.v1";
const DEACTIVATED: &str = "identity.user.deactivated.v1";
const ERASED: &str = "identity.user.erased.v1";
const LOGGED_IN: &str = "identity.user.logged_in.v1";

fn key() -> WebhookSecretKey {
    WebhookSecretKey::from_hex(&"7e".repeat(32)).unwrap()
}

fn options() -> WebhookOptions {
    WebhookOptions {
        batch_size: 100,
        lock_retry: Duration::from_millis(20),
        lock_lease: Duration::from_secs(5),
        retry: Backoff {
            first: Duration::from_millis(20),
            max: Duration::from_millis(200),
        },
        timeout: Duration::from_secs(10),
        disable_after: Duration::from_secs(3600),
        previous_secret_for: Duration::from_secs(3600),
        attempts_kept: 100,
    }
}

/// The tests' receivers listen on loopback, which the default policy refuses.
fn loopback() -> NetworkPolicy {
    NetworkPolicy::allowing(&["127.0.0.0/8".into()]).unwrap()
}

fn every_published_type() -> Vec<&'static str> {
    Published::default()
        .iter()
        .map(|kind| kind.name())
        .collect()
}

fn supervisor(
    stores: &Stores,
    options: WebhookOptions,
    policy: NetworkPolicy,
    clock: Arc<dyn Clock>,
) -> WebhookSupervisor {
    WebhookSupervisor::new(
        DeliverySettings {
            key: key(),
            published: Published::default(),
            source: "/identity".into(),
            policy,
            options,
        },
        stores.store.clone(),
        stores.sealer.clone(),
        stores.read_model.clone(),
        clock,
    )
}

fn live_supervisor(stores: &Stores, options: WebhookOptions) -> WebhookSupervisor {
    supervisor(stores, options, loopback(), Arc::new(SystemClock))
}

/// A supervisor running in the background, as the aggregator runs it.
struct Running {
    watch: WebhookWatch,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

fn run(supervisor: WebhookSupervisor) -> Running {
    let watch = supervisor.watch();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(supervisor.run(async {
        let _ = stopped.await;
    }));
    Running {
        watch,
        stop: Some(stop),
        task,
    }
}

impl Running {
    /// Stops it, and fails unless it and every endpoint task stop.
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("the supervisor and its tasks stop")
            .unwrap();
        assert!(self.watch.running().is_empty());
    }

    async fn wait_until_stopped(&self, endpoint: &Endpoint) {
        wait_until("the endpoint's task stopped", || async {
            !self.watch.running().contains(&endpoint.id)
        })
        .await;
    }

    async fn wait_for_failures(&self, endpoint: &Endpoint, failures: u64) {
        wait_until("failed attempts", || async {
            self.watch.stats(endpoint.id).is_some_and(|stats| {
                stats.failed.load(std::sync::atomic::Ordering::Relaxed) >= failures
            })
        })
        .await;
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Polls `condition` until it holds, for at most [`WAIT`].
async fn wait_until<F, Fut>(what: &str, condition: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !condition().await {
        assert!(tokio::time::Instant::now() < deadline, "waited for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Endpoints, as the command API registers and changes them.

/// A message store and a read model, whichever way the test got them.
trait Stored {
    fn store(&self) -> &Arc<dyn MessageStore>;
    fn read_model(&self) -> &ReadModelWriter;
}

impl Stored for Stores {
    fn store(&self) -> &Arc<dyn MessageStore> {
        &self.store
    }

    fn read_model(&self) -> &ReadModelWriter {
        &self.read_model
    }
}

impl Stored for Env {
    fn store(&self) -> &Arc<dyn MessageStore> {
        &self.store
    }

    fn read_model(&self) -> &ReadModelWriter {
        &self.read_model
    }
}

fn admin() -> UserId {
    UserId::from_uuid(Uuid::from_u128(1))
}

fn random_nonce() -> WebhookNonce {
    let mut bytes = [0; WebhookNonce::LEN];
    bytes.iter_mut().for_each(|byte| *byte = fastrand::u8(..));
    WebhookNonce::from_bytes(bytes)
}

#[derive(Debug, Clone, Copy)]
struct Endpoint {
    id: WebhookId,
    nonce: WebhookNonce,
    /// The registration's global position.
    position: u64,
}

impl Endpoint {
    fn secret(&self) -> WebhookSecret {
        secret_of(self.id, &self.nonce)
    }

    fn name(&self) -> String {
        webhooks::consumer_name(self.id)
    }
}

fn secret_of(id: WebhookId, nonce: &WebhookNonce) -> WebhookSecret {
    WebhookSecret::derive(&key(), *id.as_uuid(), nonce.as_bytes()).unwrap()
}

/// The endpoint's events so far.
async fn endpoint_events(stores: &impl Stored, id: WebhookId) -> Vec<WebhookEvent> {
    let stream = StreamName::parse(webhook_stream_name(id)).unwrap();
    let messages = stores.store().read_stream(&stream, 0, 1000).await.unwrap();
    messages
        .iter()
        .map(|message| {
            let version = event_version(&message.metadata).unwrap();
            WebhookEvent::from_stored(&message.message_type, version, &message.data).unwrap()
        })
        .collect()
}

/// Decides `command` on endpoint `id`'s stream at `now` and appends what follows at the
/// stream's exact version; returns the global position of the last message appended, readable.
async fn decide(
    stores: &impl Stored,
    id: WebhookId,
    command: WebhookCommand,
    now: DateTime<Utc>,
) -> u64 {
    let stream = StreamName::parse(webhook_stream_name(id)).unwrap();
    let history = endpoint_events(stores, id).await;
    let last = stores.store().last_message(&stream).await.unwrap();
    let expected = last.map_or(ExpectedVersion::NoStream, |message| {
        ExpectedVersion::Exact(message.position)
    });
    let events = decide_webhook(&WebhookState::fold(&history), command, now).unwrap();
    assert!(!events.is_empty(), "the command changes the endpoint");
    let messages = events
        .iter()
        .map(|event| {
            NewMessage::new(event.event_type(), event.to_json())
                .with_metadata(json!({ EVENT_VERSION_KEY: event.version() }))
        })
        .collect();
    let appended = stores
        .store()
        .append(vec![StreamAppend::new(stream, expected, messages)])
        .await
        .unwrap();
    let position = appended.last_global_position();
    settle(stores.store(), position).await;
    position
}

async fn register_at(
    stores: &impl Stored,
    url: &str,
    events: &[&str],
    now: DateTime<Utc>,
) -> Endpoint {
    let id = WebhookId::from_uuid(Uuid::now_v7());
    let nonce = random_nonce();
    let command = WebhookCommand::Register {
        id,
        url: url.into(),
        events: events.iter().map(|name| (*name).to_owned()).collect(),
        description: "a test receiver".into(),
        secret_nonce: nonce,
        by: admin(),
    };
    let position = decide(stores, id, command, now).await;
    Endpoint {
        id,
        nonce,
        position,
    }
}

async fn register(stores: &impl Stored, url: &str, events: &[&str]) -> Endpoint {
    register_at(stores, url, events, SystemClock.now()).await
}

async fn enable(stores: &impl Stored, endpoint: &Endpoint, now: DateTime<Utc>) -> u64 {
    decide(
        stores,
        endpoint.id,
        WebhookCommand::Enable { by: admin() },
        now,
    )
    .await
}

async fn delete(stores: &impl Stored, endpoint: &Endpoint) -> u64 {
    let command = WebhookCommand::Delete { by: admin() };
    decide(stores, endpoint.id, command, SystemClock.now()).await
}

async fn checkpoint(stores: &impl Stored, endpoint: &Endpoint) -> Option<u64> {
    stores
        .read_model()
        .checkpoint(&endpoint.name())
        .await
        .unwrap()
        .map(|checkpoint| checkpoint.position)
}

async fn wait_for_checkpoint(stores: &impl Stored, endpoint: &Endpoint, position: u64) {
    wait_until("the endpoint's checkpoint", || async {
        checkpoint(stores, endpoint)
            .await
            .is_some_and(|at| at >= position)
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Receivers.

/// How a receiver answers.
#[derive(Debug, Clone)]
enum Answer {
    Ok,
    Status(u16),
    /// Keeps the request unanswered until released, then answers 200.
    Hold,
    /// A 302 to this URL.
    Redirect(String),
}

/// A request a receiver got, and what it answered (0: nothing yet, held).
#[derive(Debug, Clone)]
struct Received {
    id: String,
    timestamp: i64,
    signature: String,
    content_type: String,
    body: Vec<u8>,
    answered: u16,
}

impl Received {
    fn event(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    fn event_type(&self) -> String {
        self.event()["type"].as_str().unwrap().to_owned()
    }

    fn subject(&self) -> Uuid {
        self.event()["subject"].as_str().unwrap().parse().unwrap()
    }

    fn delivered(&self) -> bool {
        (200..300).contains(&self.answered)
    }
}

struct ReceiverState {
    answer: Mutex<Answer>,
    received: Mutex<Vec<Received>>,
    count: watch::Sender<usize>,
    released: watch::Sender<bool>,
}

/// An HTTP receiver on 127.0.0.1 that keeps what it receives. Every answer closes its
/// connection, so that a receiver that stops listening is unreachable at once.
struct Receiver {
    port: u16,
    state: Arc<ReceiverState>,
    server: Option<JoinHandle<()>>,
}

impl Receiver {
    async fn start(answer: Answer) -> Self {
        let mut receiver = Self::not_listening(answer).await;
        receiver.listen().await;
        receiver
    }

    /// A receiver whose port nothing listens on yet.
    async fn not_listening(answer: Answer) -> Self {
        let reserved = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = reserved.local_addr().unwrap().port();
        drop(reserved);
        Self {
            port,
            state: Arc::new(ReceiverState {
                answer: Mutex::new(answer),
                received: Mutex::new(Vec::new()),
                count: watch::channel(0).0,
                released: watch::channel(false).0,
            }),
            server: None,
        }
    }

    async fn listen(&mut self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .unwrap();
        let app = Router::new()
            .route("/hook", post(receive))
            .with_state(self.state.clone());
        self.server = Some(tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        }));
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    fn answer(&self, answer: Answer) {
        *self.state.answer.lock().unwrap() = answer;
    }

    /// Answers every held request, and every later one at once.
    fn release(&self) {
        self.state.released.send_replace(true);
    }

    fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// The requests it answered with a 2xx.
    fn delivered(&self) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(Received::delivered)
            .collect()
    }

    /// Waits until it has received `count` requests.
    async fn wait_for_requests(&self, count: usize) -> Vec<Received> {
        let mut counted = self.state.count.subscribe();
        let waited = tokio::time::timeout(WAIT, counted.wait_for(|n| *n >= count)).await;
        assert!(
            waited.is_ok(),
            "waited for {count} requests, got {:#?}",
            self.received()
        );
        self.received()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

async fn receive(
    State(state): State<Arc<ReceiverState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let answer = state.answer.lock().unwrap().clone();
    let index = {
        let mut received = state.received.lock().unwrap();
        received.push(Received {
            id: header("webhook-id"),
            timestamp: header("webhook-timestamp").parse().unwrap_or(-1),
            signature: header("webhook-signature"),
            content_type: header("content-type"),
            body: body.to_vec(),
            answered: 0,
        });
        received.len() - 1
    };
    state.count.send_modify(|count| *count += 1);
    let close = [(header::CONNECTION, "close")];
    let (status, response) = match answer {
        Answer::Ok => (200, (close, StatusCode::OK).into_response()),
        Answer::Status(code) => {
            let status = StatusCode::from_u16(code).unwrap();
            (code, (close, status).into_response())
        }
        Answer::Hold => {
            let mut released = state.released.subscribe();
            let _ = released.wait_for(|released| *released).await;
            (200, (close, StatusCode::OK).into_response())
        }
        Answer::Redirect(to) => (
            302,
            (close, [(header::LOCATION, to)], StatusCode::FOUND).into_response(),
        ),
    };
    state.received.lock().unwrap()[index].answered = status;
    response
}

// ---------------------------------------------------------------------------------------------
// Accounts, and what their events must come to.

/// Writes the whole lifecycle of `accounts` new accounts, their steps interleaved (a
/// registration, an activation, a verified and a changed address, a password change, a login,
/// a rehash, a deactivation, a reset, an erasure); returns, per account, the public types its
/// events make, in order (logins are not published by default; rehashes make none).
async fn lifecycles(
    stores: &impl Stored,
    writer: &Writer,
    accounts: usize,
) -> BTreeMap<Uuid, Vec<&'static str>> {
    let ids: Vec<Uuid> = (0..accounts).map(|_| Uuid::now_v7()).collect();
    let mut expected: BTreeMap<Uuid, Vec<&'static str>> = BTreeMap::new();
    for step in 0..10 {
        for (n, id) in ids.iter().enumerate() {
            let t = (step * 100 + n) as i64;
            let kind = match step {
                0 => {
                    writer.register(*id, false, t).await;
                    Some(REGISTERED)
                }
                1 => {
                    writer.activate(*id, t).await;
                    Some("identity.user.activated.v1")
                }
                2 => {
                    writer.verify_email(*id, t).await;
                    Some("identity.user.email_verified.v1")
                }
                3 => {
                    writer.change_email(*id, t).await;
                    Some("identity.user.email_changed.v1")
                }
                4 => {
                    writer.change_password(*id, t).await;
                    Some("identity.user.password_changed.v1")
                }
                5 => {
                    writer.login(*id, t).await;
                    None
                }
                6 => {
                    writer.rehash_password(*id, t).await;
                    None
                }
                7 => {
                    writer.deactivate(*id, t).await;
                    Some(DEACTIVATED)
                }
                8 => {
                    writer.reset_password(*id, t).await;
                    Some("identity.user.password_changed.v1")
                }
                _ => {
                    writer.erase(*id, t, true).await;
                    Some(ERASED)
                }
            };
            expected.entry(*id).or_default().extend(kind);
        }
    }
    settle(stores.store(), writer.last()).await;
    expected
}

/// Only the types of `expected` among `types`.
fn only(
    expected: &BTreeMap<Uuid, Vec<&'static str>>,
    types: &[&str],
) -> BTreeMap<Uuid, Vec<&'static str>> {
    expected
        .iter()
        .map(|(id, kinds)| {
            let kept = kinds
                .iter()
                .copied()
                .filter(|kind| types.contains(kind))
                .collect();
            (*id, kept)
        })
        .filter(|(_, kinds): &(Uuid, Vec<&str>)| !kinds.is_empty())
        .collect()
}

fn total(expected: &BTreeMap<Uuid, Vec<&'static str>>) -> usize {
    expected.values().map(Vec::len).sum()
}

/// Checks what a receiver took as a receiver would: each signed by `endpoint`'s secret over
/// its `webhook-id`, `webhook-timestamp` and body, the id the event's, JSON as the public
/// schema says; each event once; per account, exactly the `expected` types in order.
fn check_deliveries(
    delivered: &[Received],
    endpoint: &Endpoint,
    expected: &BTreeMap<Uuid, Vec<&'static str>>,
) {
    let secret = endpoint.secret();
    let mut ids = BTreeSet::new();
    let mut per_account: BTreeMap<Uuid, Vec<String>> = BTreeMap::new();
    for received in delivered {
        assert!(
            secret.verifies(
                &received.signature,
                &received.id,
                received.timestamp,
                &received.body
            ),
            "signed with the endpoint's secret: {received:?}"
        );
        assert_eq!(received.content_type, "application/json");
        let event = received.event();
        assert_eq!(event["id"].as_str(), Some(received.id.as_str()));
        test_support::integration_schema::check_integration_event(&event)
            .unwrap_or_else(|errors| panic!("{errors}: {event}"));
        assert!(ids.insert(received.id.clone()), "once: {received:?}");
        per_account
            .entry(received.subject())
            .or_default()
            .push(received.event_type());
    }
    let expected: BTreeMap<Uuid, Vec<String>> = expected
        .iter()
        .map(|(id, kinds)| (*id, kinds.iter().map(|kind| (*kind).to_owned()).collect()))
        .collect();
    assert_eq!(per_account, expected);
}

// ---------------------------------------------------------------------------------------------
// The tests.

on_both_engines!(
    every_lifecycle_event_arrives_once_per_endpoint_in_order_signed_and_as_the_schema_says,
    every_event_arrives
);
async fn every_event_arrives(stores: Stores) {
    let writer = Writer::new(stores.store.clone(), stores.sealer.clone());
    // An account registered before the endpoints: none of its events are theirs.
    writer.register(Uuid::now_v7(), true, 0).await;
    let (first, second) = (
        Receiver::start(Answer::Ok).await,
        Receiver::start(Answer::Ok).await,
    );
    let endpoints = [
        register(&stores, &first.url(), &every_published_type()).await,
        register(&stores, &second.url(), &every_published_type()).await,
    ];
    let running = run(live_supervisor(&stores, options()));
    let expected = lifecycles(&stores, &writer, 3).await;

    for (receiver, endpoint) in [&first, &second].into_iter().zip(&endpoints) {
        wait_for_checkpoint(&stores, endpoint, writer.last()).await;
        // Everything is checkpointed: what it received is all it will.
        check_deliveries(&receiver.received(), endpoint, &expected);
        let stats = running.watch.stats(endpoint.id).unwrap();
        assert_eq!(
            stats.delivered.load(std::sync::atomic::Ordering::Relaxed),
            total(&expected) as u64
        );
    }
    // Each attempt recorded once, delivered at the first try.
    let recorded = attempts::attempts(&stores.read_model, *endpoints[0].id.as_uuid())
        .await
        .unwrap();
    assert_eq!(recorded.len(), total(&expected));
    assert!(recorded.iter().all(|attempt| attempt.attempt == 1
        && attempt.recorded.delivered
        && attempt.recorded.status_code == Some(200)
        && attempt.recorded.error.is_none()));
    running.stop().await;
    let rendered = platform::metrics::render();
    let series = format!("webhook_delivered_total{{webhook=\"{}\"}}", endpoints[0].id);
    assert!(rendered.contains(&series), "{series} in {rendered}");
}

#[tokio::test]
async fn each_endpoint_gets_only_the_types_it_subscribed_to_among_those_published() {
    let stores = Stores::postgres().await;
    let writer = Writer::new(stores.store.clone(), stores.sealer.clone());
    let receivers = [
        Receiver::start(Answer::Ok).await,
        Receiver::start(Answer::Ok).await,
        Receiver::start(Answer::Ok).await,
    ];
    let subscriptions: [&[&str]; 3] = [&[REGISTERED], &[DEACTIVATED, ERASED], &[LOGGED_IN]];
    let mut endpoints = Vec::new();
    for (receiver, events) in receivers.iter().zip(subscriptions) {
        endpoints.push(register(&stores, &receiver.url(), events).await);
    }
    let running = run(live_supervisor(&stores, options()));
    let expected = lifecycles(&stores, &writer, 2).await;

    for ((receiver, endpoint), events) in receivers.iter().zip(&endpoints).zip(subscriptions) {
        wait_for_checkpoint(&stores, endpoint, writer.last()).await;
        check_deliveries(&receiver.received(), endpoint, &only(&expected, events));
    }
    // Logins are not published by default: subscribing to them brings nothing.
    assert!(receivers[2].received().is_empty());
    running.stop().await;
}

on_both_engines!(
    a_receiver_answering_503_for_a_while_loses_nothing_and_every_attempt_is_recorded,
    a_receiver_down_for_a_while
);
async fn a_receiver_down_for_a_while(stores: Stores) {
    let writer = Writer::new(stores.store.clone(), stores.sealer.clone());
    let receiver = Receiver::start(Answer::Status(503)).await;
    let endpoint = register(&stores, &receiver.url(), &every_published_type()).await;
    let running = run(live_supervisor(&stores, options()));
    let expected = lifecycles(&stores, &writer, 2).await;

    running.wait_for_failures(&endpoint, 3).await;
    // Held before the first event, which is tried again and again, alone.
    let tried = receiver.received();
    let first = tried[0].id.clone();
    assert!(
        tried.iter().all(|received| received.id == first),
        "{tried:#?}"
    );
    assert!(checkpoint(&stores, &endpoint).await.unwrap() < writer.last());

    receiver.answer(Answer::Ok);
    wait_for_checkpoint(&stores, &endpoint, writer.last()).await;
    check_deliveries(&receiver.delivered(), &endpoint, &expected);
    running.stop().await;

    let recorded = attempts::attempts(&stores.read_model, *endpoint.id.as_uuid())
        .await
        .unwrap();
    let of_first: Vec<&RecordedAttempt> = recorded
        .iter()
        .rev()
        .filter(|attempt| attempt.recorded.message_id.to_string() == first)
        .collect();
    let failures = of_first.len() - 1;
    assert!(failures >= 3, "{recorded:#?}");
    for (n, attempt) in of_first.iter().enumerate() {
        assert_eq!(attempt.attempt, n as i32 + 1);
        let last = n == failures;
        assert_eq!(attempt.recorded.delivered, last);
        assert_eq!(
            attempt.recorded.status_code,
            Some(if last { 200 } else { 503 })
        );
        assert_eq!(
            attempt.recorded.error.as_deref(),
            (!last).then_some("HTTP 503")
        );
    }
    // Every other event went at its first attempt.
    assert_eq!(recorded.len(), failures + total(&expected));
}

#[tokio::test]
async fn a_receiver_not_listening_for_a_while_loses_nothing_once_it_listens() {
    let stores = Stores::postgres().await;
    let writer = Writer::new(stores.store.clone(), stores.sealer.clone());
    let mut receiver = Receiver::not_listening(Answer::Ok).await;
    let endpoint = register(&stores, &receiver.url(), &every_published_type()).await;
    let running = run(live_supervisor(&stores, options()));
    let expected = lifecycles(&stores, &writer, 2).await;

    running.wait_for_failures(&endpoint, 2).await;
    let recorded = attempts::attempts(&stores.read_model, *endpoint.id.as_uuid())
        .await
        .unwrap();
    for attempt in &recorded {
        assert_eq!(attempt.recorded.status_code, None);
        let error = attempt.recorded.error.as_deref().unwrap();
        assert!(error.starts_with("could not connect"), "{error}");
        assert!(!error.contains("127.0.0.1:"), "no URL in {error}");
    }

    receiver.listen().await;
    wait_for_checkpoint(&stores, &endpoint, writer.last()).await;
    check_deliveries(&receiver.delivered(), &endpoint, &expected);
    running.stop().await;
}

#[tokio::test]
async fn a_receiver_that_hangs_does_not_delay_another() {
    let stores = Stores::postgres().await;
    let writer = Writer::new(stores.store.clone(), stores.sealer.clone());
    let hanging = Receiver::start(Answer::Hold).await;
    let healthy = Receiver::start(Answer::Ok).await;
    let stuck = register(&stores, &hanging.url(), &every_published_type()).await;
    let flowing = register(&stores, &healthy.url(), &every_published_type()).await;
    let options = WebhookOptions {
        timeout: Duration::from_secs(120),
        ..options()
    };
    let running = run(live_supervisor(&stores, options));
    let expected = lifecycles(&stores, &writer, 3).await;

    wait_for_checkpoint(&stores, &flowing, writer.last()).await;
    check_deliveries(&healthy.received(), &flowing, &expected);
    // Meanwhile the other is still waiting for its first answer.
    let held = hanging.received();
    assert_eq!(held.len(), 1, "{held:#?}");
    assert_eq!(held[0].answered, 0, "still unanswered");
    assert!(checkpoint(&stores, &stuck).await.unwrap() < writer.last());

    // Once it answers, it gets everything too.
    hanging.release();
    wait_for_checkpoint(&stores, &stuck, writer.last()).await;
    check_deliveries(&hanging.received(), &stuck, &expected);
    running.stop().await;
}

#[tokio::test]
async fn an_endpoint_failing_longer_than_the_limit_is_disabled_and_an_enable_resumes_where_it_stopped()
 {
    let stores = Stores::postgres().await;
    let writer = Writer::new(stores.store.clone(), stores.sealer.clone());
    let receiver = Receiver::start(Answer::Status(500)).await;
    let endpoint = register(&stores, &receiver.url(), &every_published_type()).await;
    let options = WebhookOptions {
        disable_after: Duration::from_millis(300),
        retry: Backoff {
            first: Duration::from_millis(20),
            max: Duration::from_millis(50),
        },
        ..options()
    };
    let running = run(live_supervisor(&stores, options));
    let before = lifecycles(&stores, &writer, 1).await;

    wait_until("the endpoint disabled", || async {
        endpoint_events(&stores, endpoint.id)
            .await
            .iter()
            .any(|event| matches!(event, WebhookEvent::WebhookDisabled(_)))
    })
    .await;
    running.wait_until_stopped(&endpoint).await;
    let events = endpoint_events(&stores, endpoint.id).await;
    let Some(WebhookEvent::WebhookDisabled(disabled)) = events.last() else {
        panic!("{events:?}");
    };
    assert!(disabled.reason.contains("HTTP 500"), "{}", disabled.reason);
    let recorded = attempts::attempts(&stores.read_model, *endpoint.id.as_uuid())
        .await
        .unwrap();
    let first_failure = recorded.last().unwrap().recorded.attempted_at;
    assert_eq!(
        disabled.failing_since.timestamp_micros(),
        first_failure.timestamp_micros()
    );
    assert!(disabled.at - disabled.failing_since >= TimeDelta::milliseconds(300));
    assert!(recorded.iter().all(|attempt| !attempt.recorded.delivered));
    assert!(receiver.delivered().is_empty());
    let stats = running.watch.stats(endpoint.id).unwrap();
    assert!(stats.disabled.load(std::sync::atomic::Ordering::Relaxed));
    let series = format!("webhook_disabled_total{{webhook=\"{}\"}} 1", endpoint.id);
    assert!(platform::metrics::render().contains(&series));

    // Written while it is disabled: delivered after the enable, in order after the rest.
    let after = lifecycles(&stores, &writer, 1).await;
    let failed_so_far = receiver.received().len();
    receiver.answer(Answer::Ok);
    enable(&stores, &endpoint, SystemClock.now()).await;
    wait_for_checkpoint(&stores, &endpoint, writer.last()).await;
    let mut expected = before;
    expected.extend(after);
    check_deliveries(&receiver.delivered(), &endpoint, &expected);
    assert_eq!(
        receiver.received().len(),
        failed_so_far + total(&expected),
        "nothing was sent while it was disabled"
    );
    running.stop().await;
}

/// What one step of `consumer` comes to, once the store shows everything written.
async fn step(consumer: &mut webhooks::EndpointConsumer) -> Result<EndpointOutcome, WebhookError> {
    consumer.process_next().await
}

#[tokio::test]
async fn the_time_an_endpoint_has_been_failing_survives_a_restart_and_an_enable_starts_it_afresh() {
    let stores = Stores::postgres().await;
    let clock = ManualClock::new(SystemClock.now());
    let receiver = Receiver::start(Answer::Status(503)).await;
    let endpoint = register_at(
        &stores,
        &receiver.url(),
        &every_published_type(),
        clock.now(),
    )
    .await;
    let writer = Writer::new(stores.store.clone(), stores.sealer.clone());
    writer.register(Uuid::now_v7(), true, 0).await;
    settle(&stores.store, writer.last()).await;
    let options = WebhookOptions {
        disable_after: Duration::from_secs(3600),
        ..options()
    };
    let started =
        |stores: &Stores| supervisor(stores, options.clone(), loopback(), Arc::new(clock.clone()));

    let mut first = started(&stores);
    first.read_endpoints().await.unwrap();
    let mut consumer = first.consumer_for(endpoint.id).unwrap();
    assert!(matches!(
        step(&mut consumer).await,
        Err(WebhookError::Delivery { .. })
    ));
    let failing_since = clock.now();
    drop((consumer, first));

    // The process restarts two hours later, and the receiver still fails: disabled at once,
    // failing since the first attempt.
    clock.advance(TimeDelta::hours(2));
    let mut second = started(&stores);
    second.read_endpoints().await.unwrap();
    let mut consumer = second.consumer_for(endpoint.id).unwrap();
    let outcome = step(&mut consumer).await.unwrap();
    assert!(
        matches!(outcome, EndpointOutcome::Disabled { .. }),
        "{outcome:?}"
    );
    let events = endpoint_events(&stores, endpoint.id).await;
    let Some(WebhookEvent::WebhookDisabled(disabled)) = events.last() else {
        panic!("{events:?}");
    };
    assert_eq!(
        disabled.failing_since.timestamp_micros(),
        failing_since.timestamp_micros()
    );
    // It sends nothing more.
    assert_eq!(step(&mut consumer).await.unwrap(), EndpointOutcome::Stopped);
    assert_eq!(receiver.received().len(), 2);

    // Enabled again: a failure now is the first of a new count.
    clock.advance(TimeDelta::minutes(1));
    enable(&stores, &endpoint, clock.now()).await;
    clock.advance(TimeDelta::minutes(1));
    let mut third = started(&stores);
    third.read_endpoints().await.unwrap();
    let mut consumer = third.consumer_for(endpoint.id).unwrap();
    assert!(matches!(
        step(&mut consumer).await,
        Err(WebhookError::Delivery { .. })
    ));
    assert!(matches!(
        endpoint_events(&stores, endpoint.id).await.last(),
        Some(WebhookEvent::WebhookEnabled(_))
    ));
}

#[tokio::test]
async fn after_a_rotation_deliveries_are_signed_with_both_secrets_for_the_overlap_then_the_new_one()
{
    let stores = Stores::postgres().await;
    let clock = ManualClock::new(SystemClock.now());
    let receiver = Receiver::start(Answer::Ok).await;
    let endpoint = register_at(
        &stores,
        &receiver.url(),
        &every_published_type(),
        clock.now(),
    )
    .await;
    let rotated = random_nonce();
    let rotate = WebhookCommand::RotateSecret {
        secret_nonce: rotated,
        by: admin(),
    };
    decide(&stores, endpoint.id, rotate, clock.now()).await;
    let (old, new) = (endpoint.secret(), secret_of(endpoint.id, &rotated));
    let writer = Writer::new(stores.store.clone(), stores.sealer.clone());
    writer.register(Uuid::now_v7(), true, 0).await;
    writer.register(Uuid::now_v7(), true, 1).await;
    settle(&stores.store, writer.last()).await;
    let options = WebhookOptions {
        previous_secret_for: Duration::from_secs(3600),
        ..options()
    };
    let mut signing = supervisor(&stores, options, loopback(), Arc::new(clock.clone()));
    signing.read_endpoints().await.unwrap();
    let mut consumer = signing.consumer_for(endpoint.id).unwrap();

    clock.advance(TimeDelta::minutes(59));
    let outcome = step(&mut consumer).await.unwrap();
    assert!(
        matches!(outcome, EndpointOutcome::Delivered { .. }),
        "{outcome:?}"
    );
    let during = &receiver.received()[0];
    let signatures: Vec<&str> = during.signature.split(' ').collect();
    assert_eq!(signatures.len(), 2, "{}", during.signature);
    for (secret, signature) in [(&new, signatures[0]), (&old, signatures[1])] {
        assert!(secret.verifies(signature, &during.id, during.timestamp, &during.body));
    }
    assert!(!old.verifies(signatures[0], &during.id, during.timestamp, &during.body));

    clock.advance(TimeDelta::minutes(2));
    let outcome = step(&mut consumer).await.unwrap();
    assert!(
        matches!(outcome, EndpointOutcome::Delivered { .. }),
        "{outcome:?}"
    );
    let after = &receiver.received()[1];
    assert!(!after.signature.contains(' '), "{}", after.signature);
    assert!(new.verifies(&after.signature, &after.id, after.timestamp, &after.body));
    assert!(!old.verifies(&after.signature, &after.id, after.timestamp, &after.body));
    assert_eq!(after.timestamp, clock.now().timestamp());
}

#[tokio::test]
async fn a_deleted_endpoint_gets_nothing_written_after_its_deletion() {
    let stores = Stores::postgres().await;
    let writer = Writer::new(stores.store.clone(), stores.sealer.clone());
    let (doomed, kept) = (
        Receiver::start(Answer::Ok).await,
        Receiver::start(Answer::Ok).await,
    );
    let deleted = register(&stores, &doomed.url(), &every_published_type()).await;
    let control = register(&stores, &kept.url(), &every_published_type()).await;
    let running = run(live_supervisor(&stores, options()));
    let before = lifecycles(&stores, &writer, 1).await;
    wait_for_checkpoint(&stores, &deleted, writer.last()).await;

    delete(&stores, &deleted).await;
    // Written at once, before the supervisor may have read the deletion.
    let after = lifecycles(&stores, &writer, 2).await;
    running.wait_until_stopped(&deleted).await;
    wait_for_checkpoint(&stores, &control, writer.last()).await;

    check_deliveries(&doomed.received(), &deleted, &before);
    let mut everything = before;
    everything.extend(after);
    check_deliveries(&kept.received(), &control, &everything);
    assert_eq!(
        webhooks::consumer_names(&stores.store).await.unwrap(),
        [control.name()],
        "status lists live endpoints"
    );
    running.stop().await;
}

#[tokio::test]
async fn with_the_default_network_policy_an_endpoint_on_loopback_is_never_posted_to_nor_a_redirect_followed()
 {
    let stores = Stores::postgres().await;
    let receiver = Receiver::start(Answer::Ok).await;
    let endpoint = register(&stores, &receiver.url(), &every_published_type()).await;
    let writer = Writer::new(stores.store.clone(), stores.sealer.clone());
    writer.register(Uuid::now_v7(), true, 0).await;
    settle(&stores.store, writer.last()).await;

    let mut refusing = supervisor(
        &stores,
        options(),
        NetworkPolicy::default(),
        Arc::new(SystemClock),
    );
    refusing.read_endpoints().await.unwrap();
    let mut consumer = refusing.consumer_for(endpoint.id).unwrap();
    for _ in 0..2 {
        let Err(WebhookError::Delivery { reason, .. }) = step(&mut consumer).await else {
            panic!("refused");
        };
        assert!(reason.starts_with("not sent"), "{reason}");
        consumer = refusing.consumer_for(endpoint.id).unwrap();
    }
    assert!(receiver.received().is_empty(), "never posted to");
    let recorded = attempts::attempts(&stores.read_model, *endpoint.id.as_uuid())
        .await
        .unwrap();
    assert_eq!(recorded.len(), 2);
    for attempt in &recorded {
        assert_eq!(attempt.recorded.status_code, None);
        assert!(!attempt.recorded.delivered);
        let error = attempt.recorded.error.as_deref().unwrap();
        assert!(error.contains("127.0.0.1"), "{error}");
    }

    // Allowed to reach loopback, an endpoint that redirects is a failure: the address it
    // points at was never checked, and gets nothing.
    let elsewhere = Receiver::start(Answer::Ok).await;
    let redirecting = Receiver::start(Answer::Redirect(elsewhere.url())).await;
    let moved = register(&stores, &redirecting.url(), &every_published_type()).await;
    writer.register(Uuid::now_v7(), true, 1).await;
    settle(&stores.store, writer.last()).await;
    let mut allowing = supervisor(&stores, options(), loopback(), Arc::new(SystemClock));
    allowing.read_endpoints().await.unwrap();
    let mut consumer = allowing.consumer_for(moved.id).unwrap();
    let Err(WebhookError::Delivery { reason, .. }) = step(&mut consumer).await else {
        panic!("a redirect fails");
    };
    assert!(reason.contains("302"), "{reason}");
    assert_eq!(redirecting.received().len(), 1);
    assert!(elsewhere.received().is_empty());
}

#[tokio::test]
async fn a_consumer_stopped_between_the_receivers_answer_and_its_checkpoint_delivers_again_with_the_same_webhook_id()
 {
    let stores = Stores::postgres().await;
    let receiver = Receiver::start(Answer::Hold).await;
    let endpoint = register(&stores, &receiver.url(), &every_published_type()).await;
    let writer = Writer::new(stores.store.clone(), stores.sealer.clone());
    writer.register(Uuid::now_v7(), true, 0).await;
    settle(&stores.store, writer.last()).await;
    let mut supervisor = live_supervisor(&stores, options());
    supervisor.read_endpoints().await.unwrap();

    let mut consumer = supervisor.consumer_for(endpoint.id).unwrap();
    let stepping = tokio::spawn(async move { consumer.process_next().await });
    // The receiver has the event; the consumer waits for its answer, and is stopped.
    let first = receiver.wait_for_requests(1).await;
    stepping.abort();
    let _ = stepping.await;
    receiver.release();
    assert_eq!(
        checkpoint(&stores, &endpoint).await,
        Some(endpoint.position),
        "nothing acknowledged, nothing checkpointed"
    );

    let mut restarted = supervisor.consumer_for(endpoint.id).unwrap();
    let outcome = step(&mut restarted).await.unwrap();
    let EndpointOutcome::Delivered { event, position } = outcome else {
        panic!("{outcome:?}");
    };
    let received = receiver.received();
    assert_eq!(received.len(), 2);
    assert_eq!(received[1].id, first[0].id, "the same webhook-id");
    assert_eq!(received[1].id, event.to_string());
    assert_eq!(received[1].body, first[0].body);
    assert!(endpoint.secret().verifies(
        &received[1].signature,
        &received[1].id,
        received[1].timestamp,
        &received[1].body
    ));
    assert_eq!(checkpoint(&stores, &endpoint).await, Some(position));

    // Once acknowledged and checkpointed, never again.
    let mut later = supervisor.consumer_for(endpoint.id).unwrap();
    assert_eq!(step(&mut later).await.unwrap(), EndpointOutcome::Idle);
    assert_eq!(receiver.received().len(), 2);
}

#[tokio::test]
async fn a_reset_delivers_everything_since_the_registration_again_with_the_same_webhook_ids() {
    let stores = Stores::postgres().await;
    let receiver = Receiver::start(Answer::Ok).await;
    let writer = Writer::new(stores.store.clone(), stores.sealer.clone());
    writer.register(Uuid::now_v7(), true, 0).await;
    let endpoint = register(&stores, &receiver.url(), &every_published_type()).await;
    let expected = lifecycles(&stores, &writer, 1).await;
    let running = run(live_supervisor(&stores, options()));
    wait_for_checkpoint(&stores, &endpoint, writer.last()).await;
    let once: Vec<String> = receiver.received().iter().map(|r| r.id.clone()).collect();
    assert_eq!(once.len(), total(&expected));

    assert_eq!(
        webhooks::consumer_names(&stores.store).await.unwrap(),
        [endpoint.name()]
    );
    webhooks::reset(&stores.store, &stores.read_model, &endpoint.name())
        .await
        .unwrap();
    // The running consumer notices, and sends it all again.
    receiver.wait_for_requests(2 * once.len()).await;
    wait_for_checkpoint(&stores, &endpoint, writer.last()).await;
    let ids: Vec<String> = receiver.received().iter().map(|r| r.id.clone()).collect();
    assert_eq!(ids, [once.clone(), once].concat());
    assert!(matches!(
        webhooks::reset(&stores.store, &stores.read_model, "webhook:nothing").await,
        Err(WebhookError::NotAnEndpoint(_))
    ));
    assert!(matches!(
        webhooks::reset(
            &stores.store,
            &stores.read_model,
            &webhooks::consumer_name(WebhookId::from_uuid(Uuid::now_v7()))
        )
        .await,
        Err(WebhookError::NotRegistered(_))
    ));
    running.stop().await;
}

#[tokio::test]
async fn of_two_replicas_one_delivers_each_endpoint_and_every_event_arrives_once() {
    let stores = Stores::postgres().await;
    let writer = Writer::new(stores.store.clone(), stores.sealer.clone());
    let receiver = Receiver::start(Answer::Ok).await;
    let endpoint = register(&stores, &receiver.url(), &every_published_type()).await;
    let replicas = [
        run(live_supervisor(&stores, options())),
        run(live_supervisor(&stores, options())),
    ];
    let expected = lifecycles(&stores, &writer, 3).await;
    wait_for_checkpoint(&stores, &endpoint, writer.last()).await;
    check_deliveries(&receiver.received(), &endpoint, &expected);
    let holders = replicas
        .iter()
        .filter(|replica| {
            replica
                .watch
                .stats(endpoint.id)
                .is_some_and(|stats| stats.holds_lock.load(std::sync::atomic::Ordering::Relaxed))
        })
        .count();
    assert_eq!(holders, 1, "one replica holds the endpoint");
    for replica in replicas {
        replica.stop().await;
    }
}

#[tokio::test]
async fn endpoints_share_one_wake_up_listener_so_a_small_store_pool_still_serves_many() {
    let env = crate::support::env().await;
    // The delivery's store has a pool of three: a listener of its own for each endpoint would
    // hold every connection, and no endpoint could read.
    let small = message_store::connect(
        env.db.url(),
        ConnectOptions {
            max_connections: 3,
            poll_interval: Duration::from_millis(100),
        },
    )
    .await
    .unwrap();
    let mut receivers = Vec::new();
    let mut endpoints = Vec::new();
    for _ in 0..6 {
        let receiver = Receiver::start(Answer::Ok).await;
        endpoints.push(register(&env, &receiver.url(), &every_published_type()).await);
        receivers.push(receiver);
    }
    let supervisor = WebhookSupervisor::new(
        DeliverySettings {
            key: key(),
            published: Published::default(),
            source: "/identity".into(),
            policy: loopback(),
            options: options(),
        },
        small,
        env.sealer.clone(),
        env.read_model.clone(),
        Arc::new(SystemClock),
    );
    let running = run(supervisor);
    let writer = Writer::new(env.store.clone(), env.sealer.clone());
    let expected = lifecycles(&env, &writer, 2).await;
    for (receiver, endpoint) in receivers.iter().zip(&endpoints) {
        wait_for_checkpoint(&env, endpoint, writer.last()).await;
        check_deliveries(&receiver.received(), endpoint, &expected);
    }
    running.stop().await;
}
