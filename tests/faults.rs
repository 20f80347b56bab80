//! Faults, with the real binaries as processes: PostgreSQL crashing under load, the aggregator
//! killed in the middle of a rebuild, and a slow transaction holding the message store open.
//!
//! The tests that disturb the server (a crash, a transaction held open for seconds, which holds
//! back every consumer of the whole server: docs/adr/0002) run on a PostgreSQL cluster of their
//! own, so that the tests running beside them on the shared server never notice.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot go on panics with the cause

mod common;

use std::collections::{HashMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aggregator::view::UserRow;
use aggregator::{Outcome, Projector, ProjectorOptions, ReadModelWriter, Target};
use personal_data::Sealer;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection, PgPool, Row};
use test_support::bulk::PASSWORD_HASH;
use test_support::{PrivateCluster, Signal, StopMode, TestDatabase};
use uuid::Uuid;

use common::{
    PASSWORD, checkpoint, client, login, new_deployment, register, start_all_services,
    start_services, store_head, wait_for_checkpoint,
};

/// How long the load runs before the crash, and at least after the restart.
const LOAD_PHASE: Duration = Duration::from_secs(3);

/// What a request came to.
enum Answer {
    /// The status the request succeeds with: its headers and JSON body.
    Success(reqwest::header::HeaderMap, Value),
    /// What SECURITY.md promises while a database is out of reach: a 503 problem+json with
    /// `Retry-After`, or a transport error while the server itself is down. A client retries.
    Failed(String),
    /// Anything else: a defect.
    Unexpected(String),
}

async fn answer(sent: reqwest::Result<reqwest::Response>, success: u16) -> Answer {
    let response = match sent {
        Ok(response) => response,
        Err(error) => return Answer::Failed(format!("transport: {error}")),
    };
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = match response.bytes().await {
        Ok(body) => body,
        Err(error) => return Answer::Failed(format!("transport, reading the body: {error}")),
    };
    let json: Option<Value> = serde_json::from_slice(&body).ok();
    let text = String::from_utf8_lossy(&body);
    if status == success {
        return match json {
            Some(json) => Answer::Success(headers, json),
            None => Answer::Unexpected(format!("{status} with a body that is not JSON: {text}")),
        };
    }
    let problem = headers
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/problem+json"));
    let code = json.as_ref().and_then(|json| json["code"].as_str());
    let retry_after = headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.parse::<u64>().is_ok());
    // Any other 5xx (a 500 above all) is a defect: the outage was reported as the service's
    // own fault, and the client is not told it may retry.
    match code {
        Some(code) if status == 503 && problem && retry_after => {
            Answer::Failed(format!("{status} {code}"))
        }
        _ => Answer::Unexpected(format!(
            "{status} (retry-after: {:?}): {text}",
            headers.get(reqwest::header::RETRY_AFTER)
        )),
    }
}

#[derive(Default, Clone, Copy, Debug)]
struct Counts {
    registrations: u64,
    logins: u64,
    reads: u64,
}

impl Counts {
    /// Whether every kind of request has succeeded a number of times: the load is going.
    fn all_kinds_succeeded(&self) -> bool {
        self.registrations >= 30 && self.logins >= 15 && self.reads >= 15
    }
}

/// What the clients were told, kept to check against the store and the read model.
#[derive(Default)]
struct Ledger {
    /// Registrations answered 201.
    registered: HashSet<Uuid>,
    /// Registrations that failed: each may or may not have been stored before it failed.
    unanswered: HashSet<Uuid>,
    /// Per account, logins answered 200 and logins that failed.
    logins: HashMap<Uuid, (u64, u64)>,
    /// Successes of requests sent before the crash and after the restart.
    before_crash: Counts,
    after_restart: Counts,
    failures: Vec<String>,
    /// Failures of requests sent after the restart: connections the pools kept from before the
    /// crash fail once each before they are dropped.
    failures_after_restart: usize,
    unexpected: Vec<String>,
}

/// The load: each worker registers an account, logs one of its accounts in, and reads that
/// account's profile as of its login, again and again.
struct Load {
    client: reqwest::Client,
    command_port: u16,
    query_port: u16,
    stop: AtomicBool,
    /// Set as the server is crashed; `restarted_at` once it runs again.
    crashed: AtomicBool,
    restarted_at: Mutex<Option<Instant>>,
    ledger: Mutex<Ledger>,
}

impl Load {
    /// Counts a success in the phase in which its request was sent.
    fn count(&self, sent: Instant, what: impl Fn(&mut Counts)) {
        let restarted = *self.restarted_at.lock().unwrap();
        let crashed = self.crashed.load(Ordering::SeqCst);
        let mut ledger = self.ledger.lock().unwrap();
        match restarted {
            Some(at) if sent >= at => what(&mut ledger.after_restart),
            None if !crashed => what(&mut ledger.before_crash),
            _ => {}
        }
    }

    fn record(&self, kind: &str, sent: Instant, answer: &Answer) {
        let restarted = *self.restarted_at.lock().unwrap();
        let mut ledger = self.ledger.lock().unwrap();
        match answer {
            Answer::Success(..) => {}
            Answer::Failed(why) => {
                ledger.failures.push(format!("{kind}: {why}"));
                if restarted.is_some_and(|at| sent >= at) {
                    ledger.failures_after_restart += 1;
                }
            }
            Answer::Unexpected(what) => ledger.unexpected.push(format!("{kind}: {what}")),
        }
    }

    async fn work(self: Arc<Self>, worker: usize) {
        let mut mine: Vec<(Uuid, String)> = Vec::new();
        let mut turn = 0usize;
        while !self.stop.load(Ordering::SeqCst) {
            turn += 1;
            let id = Uuid::new_v4();
            let email = format!("crash-{worker}-{id}@example.com");
            let sent = Instant::now();
            let registered = answer(
                self.client
                    .post(format!("http://127.0.0.1:{}/users", self.command_port))
                    .json(&json!({ "id": id, "email": email, "password": PASSWORD }))
                    .send()
                    .await,
                201,
            )
            .await;
            self.record("registration", sent, &registered);
            match &registered {
                Answer::Success(_, body) => {
                    if body["id"].as_str() != Some(id.to_string().as_str()) {
                        self.ledger
                            .lock()
                            .unwrap()
                            .unexpected
                            .push(format!("registration of {id} answered {body}"));
                    }
                    self.ledger.lock().unwrap().registered.insert(id);
                    self.count(sent, |counts| counts.registrations += 1);
                    mine.push((id, email));
                }
                _ => {
                    self.ledger.lock().unwrap().unanswered.insert(id);
                }
            }

            let Some((id, email)) = mine.get(turn % mine.len().max(1)).cloned() else {
                continue;
            };
            let sent = Instant::now();
            let logged_in = answer(
                self.client
                    .post(format!("http://127.0.0.1:{}/login", self.command_port))
                    .json(&json!({ "email": email, "password": PASSWORD }))
                    .send()
                    .await,
                200,
            )
            .await;
            self.record("login", sent, &logged_in);
            let Answer::Success(headers, body) = logged_in else {
                self.ledger.lock().unwrap().logins.entry(id).or_default().1 += 1;
                continue;
            };
            let successes = {
                let mut ledger = self.ledger.lock().unwrap();
                let logins = ledger.logins.entry(id).or_default();
                logins.0 += 1;
                logins.0
            };
            self.count(sent, |counts| counts.logins += 1);
            let token = body["access_token"].as_str().unwrap_or_default().to_owned();
            let position = headers
                .get("x-position")
                .and_then(|value| value.to_str().ok())
                .unwrap_or("0")
                .to_owned();

            // Read your own write: the profile as of this login counts it.
            let sent = Instant::now();
            let read = answer(
                self.client
                    .get(format!("http://127.0.0.1:{}/users/me", self.query_port))
                    .bearer_auth(&token)
                    .header("X-Min-Position", position)
                    .send()
                    .await,
                200,
            )
            .await;
            self.record("read", sent, &read);
            if let Answer::Success(_, profile) = read {
                let login_count = profile["login_count"].as_u64().unwrap_or(0);
                if profile["id"].as_str() != Some(id.to_string().as_str())
                    || login_count < successes
                {
                    self.ledger.lock().unwrap().unexpected.push(format!(
                        "read of {id} after {successes} successful logins answered {profile}"
                    ));
                }
                self.count(sent, |counts| counts.reads += 1);
            }
        }
    }
}

/// Polls until `condition` holds for the ledger; panics with `what` after `timeout`.
async fn wait_for_ledger(
    load: &Load,
    timeout: Duration,
    what: &str,
    logs: &Path,
    condition: impl Fn(&Ledger) -> bool,
) {
    let deadline = Instant::now() + timeout;
    loop {
        {
            let ledger = load.ledger.lock().unwrap();
            if condition(&ledger) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what} within {timeout:?}: before the crash {:?}, after the restart {:?}, \
                 {} failures (the last: {:?}), unexpected answers {:?}; the services' logs are \
                 in {}",
                ledger.before_crash,
                ledger.after_restart,
                ledger.failures.len(),
                ledger.failures.last(),
                ledger.unexpected,
                logs.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_postgres_crash_under_load_the_services_recover_by_themselves_and_lose_nothing() {
    let cluster = PrivateCluster::start().await;
    let url = cluster.create_database("identity").await;
    let deployment = new_deployment("faults-postgres-crash", &url);
    let client = client();
    let mut services = start_all_services(&deployment, &client).await;
    let logs = deployment.logs.clone();

    let load = Arc::new(Load {
        client: client.clone(),
        command_port: services.command_port,
        query_port: services.query_port,
        stop: AtomicBool::new(false),
        crashed: AtomicBool::new(false),
        restarted_at: Mutex::new(None),
        ledger: Mutex::default(),
    });
    let workers: Vec<_> = (0..4)
        .map(|worker| tokio::spawn(load.clone().work(worker)))
        .collect();

    // Load first, for a few seconds and until every kind of request has succeeded a number of
    // times.
    let loading = Instant::now();
    wait_for_ledger(
        &load,
        Duration::from_secs(60),
        "the load did not get going",
        &logs,
        |ledger| ledger.before_crash.all_kinds_succeeded(),
    )
    .await;
    tokio::time::sleep_until((loading + LOAD_PHASE).into()).await;

    // A crash: every server process killed at once, while requests are in flight. Whatever
    // was acknowledged must be in the log; the server recovers from it when it starts again.
    load.crashed.store(true, Ordering::SeqCst);
    cluster.stop(StopMode::Immediate).await;
    // Down until the services have answered the outage: a request waits for a connection up to
    // the pools' acquire timeout (5 s) and succeeds if the server is back by then, so a short
    // outage is never seen by a client and proves nothing about how one is reported.
    let down = Instant::now();
    wait_for_ledger(
        &load,
        Duration::from_secs(60),
        "no request was answered 503 while the server was down",
        &logs,
        |ledger| {
            ledger
                .failures
                .iter()
                .any(|failure| failure.contains(": 503 "))
        },
    )
    .await;
    println!("the services answered 503 after {:?} down", down.elapsed());
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.restart().await;
    let restarted = Instant::now();
    *load.restarted_at.lock().unwrap() = Some(restarted);

    // The services find the server again by themselves: requests sent after the restart
    // succeed again, every kind of them, while no process was restarted.
    wait_for_ledger(
        &load,
        Duration::from_secs(90),
        "the services did not recover from the restart by themselves",
        &logs,
        |ledger| ledger.after_restart.all_kinds_succeeded(),
    )
    .await;
    tokio::time::sleep_until((restarted + LOAD_PHASE).into()).await;
    load.stop.store(true, Ordering::SeqCst);
    for worker in workers {
        worker.await.unwrap();
    }
    // The processes in the order started, each with its port.
    let ports = [
        services.command_port,
        services.query_port,
        services.aggregator_port,
    ];
    for (process, port) in services.processes.iter_mut().zip(ports) {
        assert!(
            process.is_running(),
            "{} exited during the outage; see {}",
            process.name(),
            logs.display()
        );
        process
            .wait_until_serves(&client, port, "/readyz")
            .await
            .unwrap();
    }

    let ledger = std::mem::take(&mut *load.ledger.lock().unwrap());
    assert!(
        ledger.unexpected.is_empty(),
        "answers that are neither a success nor a retryable failure: {:?}",
        ledger.unexpected
    );
    assert!(
        !ledger.failures.is_empty(),
        "no request failed: the crash did not land under load, the test proves nothing"
    );

    // Every acknowledged registration is in the store; nothing is there that no client asked
    // for. A failed one may have been stored (the commit may have gone through before the
    // answer was lost): the client finds out by retrying with the same id.
    let pool = PgPool::connect(&url).await.unwrap();
    let stored: HashSet<Uuid> = sqlx::query_scalar(
        "SELECT (data->>'user_id')::uuid FROM messages \
          WHERE category = 'user' AND type = 'UserRegistered'",
    )
    .fetch_all(&pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    let lost: Vec<_> = ledger.registered.difference(&stored).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged registrations are not in the store after the crash: {lost:?}",
        lost.len()
    );
    let phantoms: Vec<_> = stored
        .iter()
        .filter(|id| !ledger.registered.contains(id) && !ledger.unanswered.contains(id))
        .collect();
    assert!(phantoms.is_empty(), "stored but never sent: {phantoms:?}");

    // The aggregator catches up, and the read model holds every stored account once, each as
    // the fold of its events gives it: no event lost, none applied twice.
    let head = store_head(&pool).await;
    wait_for_checkpoint(&url, head, Duration::from_secs(60), &logs).await;
    let read_model = ReadModelWriter::connect(&url, 2).await.unwrap();
    let rows = read_model.rows(&Target::USERS).await.unwrap();
    let ids: HashSet<Uuid> = rows.iter().map(|row| row.id).collect();
    assert_eq!(
        ids.len(),
        rows.len(),
        "an account is in the read model twice"
    );
    assert_eq!(
        ids, stored,
        "the read model and the store hold different accounts"
    );

    let successes: HashMap<Uuid, i64> = sqlx::query(
        "SELECT substr(stream_name, length('userLogin-') + 1)::uuid AS id, count(*) AS logins \
           FROM messages WHERE category = 'userLogin' AND type = 'LoginSucceeded' \
          GROUP BY stream_name",
    )
    .fetch_all(&pool)
    .await
    .unwrap()
    .iter()
    .map(|row| (row.get("id"), row.get("logins")))
    .collect();
    for row in &rows {
        let stored_logins = successes.get(&row.id).copied().unwrap_or(0);
        assert_eq!(
            row.login_count, stored_logins,
            "{}: the read model counts {} logins, the store holds {stored_logins}",
            row.id, row.login_count
        );
        let (answered, failed) = ledger.logins.get(&row.id).copied().unwrap_or_default();
        let (answered, failed) = (
            i64::try_from(answered).unwrap(),
            i64::try_from(failed).unwrap(),
        );
        assert!(
            (answered..=answered + failed).contains(&stored_logins),
            "{}: {answered} logins acknowledged and {failed} failed, but {stored_logins} stored",
            row.id
        );
    }
    let sealer = deployment.sealer().await.unwrap();
    let clean = clean_projection(&cluster, &url, sealer, head).await;
    assert_same_rows(
        &rows,
        &clean,
        "the read model built across the crash against a clean projection of the store",
    );
    println!(
        "before the crash {:?}, after the restart {:?}; {} failed requests, {} of them sent \
         after the restart (e.g. {:?})",
        ledger.before_crash,
        ledger.after_restart,
        ledger.failures.len(),
        ledger.failures_after_restart,
        ledger.failures.first()
    );

    pool.close().await;
    services.shut_down().await.unwrap();
    let _ = std::fs::remove_dir_all(&logs);
}

/// Compares two views (rows ordered by id), naming the first row that differs.
fn assert_same_rows(actual: &[UserRow], expected: &[UserRow], what: &str) {
    if actual == expected {
        return;
    }
    let first = actual
        .iter()
        .zip(expected)
        .find(|(actual, expected)| actual != expected);
    panic!(
        "{what}: {} rows against {}; the first that differs: {first:#?}",
        actual.len(),
        expected.len()
    );
}

/// The users view as a fresh projector builds it from the store at `store_url`, up to `until`,
/// in a database of its own on `cluster`.
async fn clean_projection(
    cluster: &PrivateCluster,
    store_url: &str,
    sealer: Sealer,
    until: u64,
) -> Vec<UserRow> {
    let url = cluster.create_database("clean").await;
    let store = message_store::connect(store_url, message_store::ConnectOptions::default())
        .await
        .unwrap();
    let read_model = ReadModelWriter::connect(&url, 2).await.unwrap();
    read_model.migrate().await.unwrap();
    let mut projector = Projector::users(
        store,
        sealer,
        read_model.clone(),
        ProjectorOptions {
            batch_size: 97,
            ..ProjectorOptions::default()
        },
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match projector.process_next_batch().await.unwrap() {
            Outcome::Applied { position, .. } if position >= until => break,
            Outcome::Applied { .. } => {}
            Outcome::Idle => {
                assert!(
                    Instant::now() < deadline,
                    "the clean projection never got to {until}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Outcome::Halted { reason } => panic!("the clean projection halted: {reason}"),
        }
    }
    read_model.rows(&Target::USERS).await.unwrap()
}

/// Accounts written straight into the store for the rebuild test, and rounds of logins (every
/// third account logs in once only).
const BULK_USERS: i64 = 25_000;
const BULK_LOGINS: i64 = 4;
/// Messages per read of the store in the rebuild that is killed (small, for a fine-grained
/// record of its progress), and how many reads that found messages it must have made before
/// the kill.
const REBUILD_BATCH: usize = 500;
const KILL_AFTER_READS: usize = 20;

/// Registrations, then rounds of logins, written straight into the store: enough events that a
/// rebuild takes a while. Returns how many messages the store holds.
async fn write_bulk_events(pool: &PgPool) -> i64 {
    test_support::bulk::write_user_events(
        pool,
        &test_support::bulk::BulkUsers {
            seed: "faults-rebuild-",
            users: BULK_USERS,
            login_rounds: BULK_LOGINS,
            uneven_logins: true,
            password_hash: PASSWORD_HASH,
        },
    )
    .await
    .unwrap();
    sqlx::query_scalar("SELECT count(*) FROM messages")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// How many reads of the store that found messages the process logging to `log` has made,
/// from its statement log (sqlx logs each statement with the rows it returned).
fn store_reads(log: &Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| {
            line["db.statement"]
                .as_str()
                .is_some_and(|sql| sql.contains("FROM messages"))
                && line["rows_returned"].as_u64().is_some_and(|rows| rows > 0)
        })
        .count()
}

async fn table_exists(pool: &PgPool, table: &str) -> bool {
    sqlx::query_scalar::<_, Option<String>>("SELECT to_regclass($1)::text")
        .bind(table)
        .fetch_one(pool)
        .await
        .unwrap()
        .is_some()
}

/// Registers an account through the API and logs it in once; the position of the login.
async fn register_and_log_in(client: &reqwest::Client, port: u16, email: &str) -> (Uuid, u64) {
    let (id, _) = register(client, port, email).await;
    let response = login(client, port, email, PASSWORD).await;
    assert_eq!(response.status(), 200, "logging in {email}");
    let position = response.headers()["x-position"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    (id.parse().unwrap(), position)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_killed_midway_and_run_again_ends_in_the_view_the_live_worker_built() {
    let database = TestDatabase::new().await;
    let url = database.url().to_owned();
    let deployment = new_deployment("faults-rebuild", &url);
    let logs = deployment.logs.clone();
    let client = client();
    let services = start_services(&deployment, &client, &["command-api", "aggregator"]).await;
    let pool = database.pool().await;
    let started = Instant::now();
    let bulk = write_bulk_events(&pool).await;
    println!("{bulk} events written in {:?}", started.elapsed());
    for n in 0..5 {
        register_and_log_in(
            &client,
            services.command_port,
            &format!("api{n}@example.com"),
        )
        .await;
    }

    // The live worker projects everything; its view is what every rebuild must give again.
    let started = Instant::now();
    let head = store_head(&pool).await;
    wait_for_checkpoint(&url, head, Duration::from_secs(120), &logs).await;
    println!("the live worker caught up in {:?}", started.elapsed());
    let read_model = ReadModelWriter::connect(&url, 2).await.unwrap();
    let live = read_model.rows(&Target::USERS).await.unwrap();
    assert_eq!(live.len(), usize::try_from(BULK_USERS).unwrap() + 5);
    let live_checkpoint = read_model.checkpoint("users").await.unwrap().unwrap();

    // A rebuild beside the live worker, killed once its log shows it well into the store.
    let label = "rebuild-killed";
    let mut killed = deployment
        .launch("aggregator", label)
        .unwrap()
        .args(["rebuild", "--projection", "users"])
        // RUST_LOG rather than the setting: it would override the setting if set.
        .env("RUST_LOG", "warn,sqlx::query=debug")
        .env(
            "IDENTITY__AGGREGATOR__BATCH_SIZE",
            REBUILD_BATCH.to_string(),
        )
        .spawn()
        .unwrap();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(60);
    loop {
        if store_reads(&deployment.log(label)) >= KILL_AFTER_READS {
            break;
        }
        assert!(
            killed.is_running(),
            "the rebuild ended before it had read {KILL_AFTER_READS} batches: it is too fast \
             for this test's data (make BULK_USERS larger), or it failed; see {}",
            logs.display()
        );
        assert!(
            Instant::now() < deadline,
            "the rebuild's statement log (sqlx::query at debug) shows no reads of the store; \
             see {}",
            logs.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = killed.stop(Signal::Kill).await.unwrap();
    let reads = store_reads(&deployment.log(label));
    assert_eq!(
        status.signal(),
        Some(9),
        "the rebuild ended by itself ({status}) before it could be killed"
    );
    println!(
        "rebuild killed after {:?} and {reads} reads of {REBUILD_BATCH} of {head_events} events",
        started.elapsed(),
        head_events = bulk + 5 * 4
    );
    // It was killed midway: its table and checkpoint are there, the swap never happened, and
    // the live view and checkpoint are as the live worker left them.
    assert!(table_exists(&pool, "users_rebuild").await);
    assert!(
        read_model
            .checkpoint("users:rebuild")
            .await
            .unwrap()
            .is_some(),
        "the killed rebuild's checkpoint is gone: it had finished"
    );
    assert_same_rows(
        &read_model.rows(&Target::USERS).await.unwrap(),
        &live,
        "the live view after the killed rebuild against the one before it",
    );
    assert_eq!(
        read_model.checkpoint("users").await.unwrap().unwrap(),
        live_checkpoint
    );

    // The live worker carries on beside what the killed rebuild left.
    let (_, position) =
        register_and_log_in(&client, services.command_port, "after-kill@example.com").await;
    wait_for_checkpoint(&url, position, Duration::from_secs(60), &logs).await;
    let live = read_model.rows(&Target::USERS).await.unwrap();
    let live_checkpoint = read_model.checkpoint("users").await.unwrap().unwrap();

    // Run again, to the end: the same view, the same checkpoint, nothing left over.
    let mut rerun = deployment
        .launch("aggregator", "rebuild-rerun")
        .unwrap()
        .args(["rebuild", "--projection", "users"])
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = rerun
        .wait_for_exit(Duration::from_secs(120))
        .await
        .expect("the rebuild did not finish within 120 s");
    assert!(
        status.success(),
        "the rebuild failed; see {}",
        logs.display()
    );
    println!("the rebuild ran again in {:?}", started.elapsed());
    let rebuilt = read_model.rows(&Target::USERS).await.unwrap();
    assert_same_rows(
        &rebuilt,
        &live,
        "the rebuilt view against the one the live worker built",
    );
    assert_eq!(
        read_model.checkpoint("users").await.unwrap().unwrap(),
        live_checkpoint
    );
    assert_eq!(read_model.checkpoint("users:rebuild").await.unwrap(), None);
    assert!(!table_exists(&pool, "users_rebuild").await);

    // The live worker goes on from the swapped-in view.
    let (id, position) =
        register_and_log_in(&client, services.command_port, "after-rebuild@example.com").await;
    wait_for_checkpoint(&url, position, Duration::from_secs(60), &logs).await;
    let rows = read_model.rows(&Target::USERS).await.unwrap();
    assert_eq!(rows.len(), live.len() + 1);
    let row = rows.iter().find(|row| row.id == id).unwrap();
    assert_eq!((row.login_count, row.status.as_str()), (1, "active"));

    pool.close().await;
    services.shut_down().await.unwrap();
    let _ = std::fs::remove_dir_all(&logs);
}

/// How long the slow writer holds its transaction open while others commit.
const SLOW_HOLD: Duration = Duration::from_secs(3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_committed_late_by_a_slow_transaction_is_applied_after_later_positions_committed()
{
    // A cluster of its own: a transaction held open for seconds holds back every consumer of
    // the server (docs/adr/0002), which the tests beside this one would feel.
    let cluster = PrivateCluster::start().await;
    let url = cluster.create_database("identity").await;
    let deployment = new_deployment("faults-slow-transaction", &url);
    let logs = deployment.logs.clone();
    let client = client();
    let services = start_services(&deployment, &client, &["command-api", "aggregator"]).await;
    let port = services.command_port;
    let (ann, position) = register_and_log_in(&client, port, "ann@example.com").await;
    wait_for_checkpoint(&url, position, Duration::from_secs(60), &logs).await;

    // The slow writer: in one transaction, as the store appends (positions from its
    // transaction id), a new account and the deactivation of Ann; then it waits.
    let slow_id = Uuid::new_v4();
    let mut slow = PgConnection::connect(&url).await.unwrap();
    let mut transaction = slow.begin().await.unwrap();
    let slow_positions: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO messages (global_position, id, stream_name, category, position, type, \
                               data, metadata) \
         SELECT (pg_current_xact_id()::text::bigint << 16) + m.n, gen_random_uuid(), m.stream, \
                split_part(m.stream, '-', 1), m.position, m.type, m.data, \
                '{\"schemaVersion\": 1}'::jsonb \
           FROM (VALUES \
                (0, 'user-' || $1::text, 0::bigint, 'UserRegistered', jsonb_build_object( \
                    'user_id', $1::uuid, 'email', 'Slow@Example.com', \
                    'email_normalized', 'slow@example.com', 'password_hash', $3::text, \
                    'status', 'active', 'roles', jsonb_build_array('user'), \
                    'registered_at', '2026-01-01T00:00:00Z')), \
                (1, 'user-' || $2::text, \
                    (SELECT max(position) + 1 FROM messages WHERE stream_name = 'user-' || $2::text), \
                    'UserDeactivated', jsonb_build_object('at', '2026-01-01T00:00:01Z')) \
                ) AS m(n, stream, position, type, data) \
         RETURNING global_position",
    )
    .bind(slow_id)
    .bind(ann)
    .bind(PASSWORD_HASH)
    .fetch_all(&mut *transaction)
    .await
    .unwrap();
    let slow_position = u64::try_from(*slow_positions.iter().max().unwrap()).unwrap();

    // Meanwhile other writers commit later positions: registrations, and logins of Ann, who
    // is still active for everyone until the slow transaction commits.
    let holding = Instant::now();
    let mut registered = Vec::new();
    let mut last = 0;
    let mut logins = 1;
    while holding.elapsed() < SLOW_HOLD || registered.len() < 10 {
        let email = format!("fast{}@example.com", registered.len());
        let (id, position) = register(&client, port, &email).await;
        assert!(
            position > slow_position,
            "a registration committed after the slow append has a smaller position"
        );
        registered.push(id.parse::<Uuid>().unwrap());
        let response = login(&client, port, "ann@example.com", PASSWORD).await;
        assert_eq!(response.status(), 200, "Ann logging in");
        logins += 1;
        last = last.max(position).max(
            response.headers()["x-position"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap(),
        );
    }
    // The aggregator waits behind the open transaction instead of moving past it.
    let waiting = checkpoint(&url).await;
    assert!(
        waiting < slow_position,
        "the aggregator moved past the open transaction's position ({waiting} >= {slow_position})"
    );
    transaction.commit().await.unwrap();
    slow.close().await.unwrap();

    // Once it commits, the aggregator goes on through the slow writer's events, then the
    // later ones: nothing skipped.
    wait_for_checkpoint(&url, last, Duration::from_secs(60), &logs).await;
    let read_model = ReadModelWriter::connect(&url, 2).await.unwrap();
    let rows = read_model.rows(&Target::USERS).await.unwrap();
    assert_eq!(rows.len(), 2 + registered.len());
    let slow_row = rows
        .iter()
        .find(|row| row.id == slow_id)
        .expect("the slow writer's registration is missing from the read model");
    assert_eq!(
        (slow_row.email.as_deref(), slow_row.status.as_str()),
        (Some("Slow@Example.com"), "active")
    );
    let ann_row = rows.iter().find(|row| row.id == ann).unwrap();
    assert_eq!(
        (ann_row.status.as_str(), ann_row.login_count),
        ("deactivated", logins),
        "Ann's row lacks the slow writer's deactivation or a login"
    );
    assert!(ann_row.deactivated_at.is_some());
    for id in &registered {
        assert!(rows.iter().any(|row| row.id == *id), "{id} is missing");
    }

    services.shut_down().await.unwrap();
    let _ = std::fs::remove_dir_all(&logs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_demoted_to_read_only_answers_503_with_retry_after_and_heals() {
    let database = TestDatabase::new().await;
    let deployment = new_deployment("faults-read-only", database.url());
    let client = client();
    let services = start_services(&deployment, &client, &["command-api"]).await;
    let port = services.command_port;
    register(&client, port, "before@example.com").await;

    // A failover demotes the server the command API is connected to.
    database.set_read_only(true).await;
    database.end_sessions().await;
    let refused = client
        .post(format!("http://127.0.0.1:{port}/users"))
        .json(&json!({ "email": "during@example.com", "password": PASSWORD }))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    let problem: Value = refused.json().await.unwrap();
    assert_eq!(problem["code"], "unavailable");

    // The new primary answers; the command API's old connections still reach the demoted one.
    database.set_read_only(false).await;
    register(&client, port, "after@example.com").await;
}
