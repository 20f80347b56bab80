//! The standalone process (`cargo run`): everything on one port and one SQLite file, which
//! outlives the process.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot go on panics with the cause

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::Connection;
use test_support::process::free_port;
use test_support::{Launch, Process, Signal};

use common::sessions::walk_a_session_through_its_life;
use common::{PASSWORD, x_position};

/// Starts the standalone process in `directory` (its data goes to `data/` there) on `port`,
/// and waits until it is ready.
async fn start(client: &reqwest::Client, directory: &Path, port: u16) -> Process {
    let mut process = Launch::new(
        "the standalone process",
        env!("CARGO_BIN_EXE_identity-service"),
    )
    .current_dir(directory)
    .env("IDENTITY__HTTP__ADDRESS", format!("127.0.0.1:{port}"))
    .env("IDENTITY__PASSWORD__MEMORY_KIB", "1024")
    .env("IDENTITY__PASSWORD__ITERATIONS", "1")
    .env("IDENTITY__LOG__FILTER", "warn")
    .env("IDENTITY__LOG__FORMAT", "json")
    // Logs (JSON lines) beside the data, for a look when the test fails.
    .log_to(directory.join("service.log"))
    .spawn()
    .unwrap();
    process
        .wait_until_serves(client, port, "/readyz")
        .await
        .unwrap();
    process
}

/// A new data directory of the test's own, and a free port.
fn data_directory_and_port() -> (PathBuf, u16) {
    let directory = std::env::temp_dir().join(format!("standalone-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&directory).unwrap();
    (directory, free_port().unwrap())
}

/// A client that waits `seconds` for an answer.
fn client(seconds: u64) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(seconds))
        .build()
        .unwrap()
}

/// Ctrl-C: SIGINT, and the process exits by itself.
async fn interrupt(mut running: Process) {
    let status = running.stop(Signal::Interrupt).await.unwrap();
    assert!(
        status.success(),
        "the process exited with {status} on Ctrl-C"
    );
}

/// What `POST path` on `port` with the JSON `body` answers.
async fn post(client: &reqwest::Client, port: u16, path: &str, body: &Value) -> reqwest::Response {
    client
        .post(format!("http://127.0.0.1:{port}{path}"))
        .json(body)
        .send()
        .await
        .unwrap()
}

/// What `GET /users/me` on `port` answers the holder of `token`, once the view holds
/// `position` (read your own write).
async fn own_profile(
    client: &reqwest::Client,
    port: u16,
    token: &str,
    position: u64,
) -> reqwest::Response {
    client
        .get(format!("http://127.0.0.1:{port}/users/me"))
        .bearer_auth(token)
        .header("X-Min-Position", position.to_string())
        .send()
        .await
        .unwrap()
}

/// The keys the process on `port` publishes.
async fn jwks(client: &reqwest::Client, port: u16) -> Value {
    client
        .get(format!("http://127.0.0.1:{port}/.well-known/jwks.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_restart_after_ctrl_c_keeps_accounts_keys_and_the_read_model() {
    let (directory, port) = data_directory_and_port();
    let client = client(30);
    let credentials = json!({ "email": "ann@example.com", "password": PASSWORD });

    let running = start(&client, &directory, port).await;
    let registered = post(&client, port, "/users", &credentials).await;
    assert_eq!(registered.status(), 201);
    let position = x_position(&registered);
    let login = post(&client, port, "/login", &credentials).await;
    assert_eq!(login.status(), 200);
    // The login's own position: the view counts the login once it has applied this one, which
    // lies after the registration's.
    let login_position = x_position(&login);
    assert!(
        login_position > position,
        "the login's position {login_position} is not after the registration's {position}"
    );
    let login: Value = login.json().await.unwrap();
    let token = login["access_token"].as_str().unwrap().to_owned();
    let profile = own_profile(&client, port, &token, position).await;
    assert_eq!(
        profile.status(),
        200,
        "read your own write through X-Min-Position"
    );
    let keys = jwks(&client, port).await;
    interrupt(running).await;

    assert!(directory.join("data/identity.db").exists());
    assert!(directory.join("data/signing-key.pem").exists());

    let running = start(&client, &directory, port).await;
    assert_eq!(
        jwks(&client, port).await,
        keys,
        "the signing key changed across the restart"
    );
    let profile = own_profile(&client, port, &token, login_position).await;
    assert_eq!(
        profile.status(),
        200,
        "a token from before the restart no longer works"
    );
    let profile: Value = profile.json().await.unwrap();
    assert_eq!(
        (profile["email"].as_str(), profile["login_count"].as_u64()),
        (Some("ann@example.com"), Some(1))
    );
    let login = post(&client, port, "/login", &credentials).await;
    assert_eq!(login.status(), 200);
    let duplicate = post(&client, port, "/users", &credentials).await;
    assert_eq!(duplicate.status(), 409, "the email reservation was lost");
    interrupt(running).await;
    let _ = std::fs::remove_dir_all(&directory);
}

#[tokio::test]
async fn a_session_lives_rotates_and_ends_through_the_one_port_and_a_restart_keeps_its_key() {
    let (directory, port) = data_directory_and_port();
    let client = client(30);
    let running = start(&client, &directory, port).await;
    walk_a_session_through_its_life(&client, port, port, "ann@example.com").await;

    // The refresh token key is kept beside the signing key: a session outlives a restart.
    let credentials = json!({ "email": "ann@example.com", "password": PASSWORD });
    let login: Value = post(&client, port, "/login", &credentials)
        .await
        .json()
        .await
        .unwrap();
    let refresh_token = login["refresh_token"].as_str().unwrap().to_owned();
    interrupt(running).await;
    assert!(directory.join("data/refresh-token-key").exists());
    let running = start(&client, &directory, port).await;
    let refreshed = post(
        &client,
        port,
        "/token/refresh",
        &json!({ "refresh_token": refresh_token }),
    )
    .await;
    assert_eq!(refreshed.status(), 200, "a session from before the restart");
    interrupt(running).await;
    let _ = std::fs::remove_dir_all(&directory);
}

#[tokio::test]
async fn a_data_file_locked_by_another_program_answers_503_with_retry_after_and_heals() {
    let (directory, port) = data_directory_and_port();
    let client = client(60);
    let registration = json!({ "email": "locked@example.com", "password": PASSWORD });
    let _running = start(&client, &directory, port).await;

    // Another program (a backup tool, a sqlite3 shell) holds the file's write lock for longer
    // than the service's busy timeout.
    let mut other = sqlx::SqliteConnection::connect_with(
        &sqlx::sqlite::SqliteConnectOptions::new().filename(directory.join("data/identity.db")),
    )
    .await
    .unwrap();
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut other)
        .await
        .unwrap();
    let refused = post(&client, port, "/users", &registration).await;
    assert_eq!(refused.status(), 503);
    assert_eq!(
        refused.headers()["retry-after"],
        "1",
        "a 503 must say when to retry"
    );
    let problem: Value = refused.json().await.unwrap();
    assert_eq!(problem["code"], "unavailable");

    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
    let registered = post(&client, port, "/users", &registration).await;
    assert_eq!(registered.status(), 201, "the service did not heal");
}

/// What the clients of [`drive`] were told.
#[derive(Default)]
struct Ledger {
    /// Accounts registered (201), with their emails.
    registered: HashMap<String, String>,
    /// Logins granted (200), per account id.
    logins: HashMap<String, i64>,
    /// The largest position any answer carried.
    last_position: u64,
    /// Every answer that was not the one its request should get.
    wrong: Vec<String>,
}

impl Ledger {
    fn position(&mut self, response: &reqwest::Response) -> u64 {
        let position = x_position(response);
        self.last_position = self.last_position.max(position);
        position
    }

    /// Every answer was the success its request should get, and `registrations` accounts were
    /// registered; the processes' logs are in `directory`.
    fn assert_all_succeeded(&self, registrations: usize, directory: &Path) {
        assert!(
            self.wrong.is_empty(),
            "{} answers were not the success expected (logs in {}): {:#?}",
            self.wrong.len(),
            directory.display(),
            self.wrong
        );
        assert_eq!(self.registered.len(), registrations);
    }
}

/// `workers` clients at once, each `rounds` times: registers an account through one of
/// `ports`, logs it in through the next, logs one of its earlier accounts in again through the
/// one after, and reads the new account's profile there at its login's position (read your
/// own write). Every answer must be the success its request should get.
async fn drive(client: &reqwest::Client, ports: &[u16], workers: usize, rounds: usize) -> Ledger {
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let tasks: Vec<_> = (0..workers)
        .map(|worker| {
            let (client, ports, ledger) = (client.clone(), ports.to_vec(), ledger.clone());
            tokio::spawn(async move {
                let port = |n: usize| ports[(worker + n) % ports.len()];
                let wrong = |what: String| ledger.lock().unwrap().wrong.push(what);
                let mut mine: Vec<(String, String)> = Vec::new();
                for round in 0..rounds {
                    let email = format!("w{worker}-r{round}@example.com");
                    let credentials = json!({ "email": email, "password": PASSWORD });
                    let response = post(&client, port(round), "/users", &credentials).await;
                    if response.status() != 201 {
                        wrong(format!("registering {email}: {}", describe(response).await));
                        continue;
                    }
                    ledger.lock().unwrap().position(&response);
                    let body: Value = response.json().await.unwrap();
                    let id = body["id"].as_str().unwrap().to_owned();
                    ledger
                        .lock()
                        .unwrap()
                        .registered
                        .insert(id.clone(), email.clone());
                    mine.push((id, email));

                    let earlier = mine[round * 7 % mine.len()].clone();
                    let mut new_login = None;
                    for (n, (id, email)) in [
                        (round + 1, mine[mine.len() - 1].clone()),
                        (round + 2, earlier),
                    ] {
                        let credentials = json!({ "email": email, "password": PASSWORD });
                        let response = post(&client, port(n), "/login", &credentials).await;
                        if response.status() != 200 {
                            wrong(format!("logging {email} in: {}", describe(response).await));
                            continue;
                        }
                        let position = {
                            let mut ledger = ledger.lock().unwrap();
                            *ledger.logins.entry(id.clone()).or_default() += 1;
                            ledger.position(&response)
                        };
                        let body: Value = response.json().await.unwrap();
                        let token = body["access_token"].as_str().unwrap().to_owned();
                        new_login.get_or_insert((id, email, token, position));
                    }
                    let Some((id, email, token, position)) = new_login else {
                        continue;
                    };
                    let response = own_profile(&client, port(round + 2), &token, position).await;
                    if response.status() != 200 {
                        wrong(format!("reading {email}: {}", describe(response).await));
                        continue;
                    }
                    let profile: Value = response.json().await.unwrap();
                    if profile["id"] != id.as_str() || profile["login_count"].as_i64() < Some(1) {
                        wrong(format!("{email} after its login at {position}: {profile}"));
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    Arc::try_unwrap(ledger).ok().unwrap().into_inner().unwrap()
}

/// Checks the SQLite file in `directory` against what the clients were told, once the view has
/// applied `ledger.last_position`: every acknowledged registration stored and projected once,
/// every granted login stored and counted, nothing else, and the checkpoint at the store's
/// last position.
async fn assert_file_holds(directory: &Path, ledger: &Ledger) {
    let mut file = sqlx::SqliteConnection::connect_with(
        &sqlx::sqlite::SqliteConnectOptions::new()
            .filename(directory.join("data/identity.db"))
            .read_only(true),
    )
    .await
    .unwrap();
    let registered: Vec<String> = sqlx::query_scalar(
        "SELECT json_extract(data, '$.user_id') FROM messages WHERE type = 'UserRegistered'",
    )
    .fetch_all(&mut file)
    .await
    .unwrap();
    let stored: HashSet<String> = registered.iter().cloned().collect();
    assert_eq!(
        stored.len(),
        registered.len(),
        "an account registered twice"
    );
    let expected: HashSet<String> = ledger.registered.keys().cloned().collect();
    assert_eq!(
        stored, expected,
        "the store and the acknowledged registrations differ"
    );
    let stored_logins: HashMap<String, i64> = sqlx::query_as(
        "SELECT substr(stream_name, length('userLogin-') + 1), count(*) FROM messages \
          WHERE type = 'LoginSucceeded' GROUP BY stream_name",
    )
    .fetch_all(&mut file)
    .await
    .unwrap()
    .into_iter()
    .collect();
    let rows: Vec<(String, i64, String)> =
        sqlx::query_as("SELECT id, login_count, email FROM users")
            .fetch_all(&mut file)
            .await
            .unwrap();
    assert_eq!(rows.len(), expected.len(), "the view holds other accounts");
    for (id, login_count, email) in &rows {
        assert!(expected.contains(id), "{email} ({id}) is in the view only");
        let granted = ledger.logins.get(id).copied().unwrap_or(0);
        let stored = stored_logins.get(id).copied().unwrap_or(0);
        assert_eq!(
            (stored, *login_count),
            (granted, granted),
            "{email}: logins stored and counted in the view against those granted"
        );
    }
    let (checkpoint, last): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT position FROM projection_checkpoints WHERE projection = 'users'), \
                (SELECT max(global_position) FROM messages)",
    )
    .fetch_one(&mut file)
    .await
    .unwrap();
    assert_eq!(
        checkpoint, last,
        "the view's checkpoint is not the store's last position"
    );
    assert!(u64::try_from(last).unwrap() >= ledger.last_position);
    file.close().await.unwrap();
}

/// Logs one of the ledger's accounts in through `port` (counted in the ledger) and reads its
/// profile there at that login's position, which lies after every answer the ledger holds:
/// then the view behind `port` has applied all of them.
async fn wait_for_view(client: &reqwest::Client, port: u16, ledger: &mut Ledger) {
    let (id, email) = ledger.registered.iter().next().unwrap();
    let (id, email) = (id.clone(), email.clone());
    let credentials = json!({ "email": email, "password": PASSWORD });
    let response = post(client, port, "/login", &credentials).await;
    assert_eq!(response.status(), 200, "{}", describe(response).await);
    let position = ledger.position(&response);
    *ledger.logins.entry(id).or_default() += 1;
    let token = response.json::<Value>().await.unwrap()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let response = own_profile(client, port, &token, position).await;
    assert_eq!(response.status(), 200, "{}", describe(response).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_registrations_and_logins_lose_nothing_while_the_projector_writes_the_same_file()
{
    let (directory, port) = data_directory_and_port();
    let client = client(60);
    let running = start(&client, &directory, port).await;

    // The store's appends and the projector's commits contend for the file's one write lock
    // the whole time.
    let started = Instant::now();
    let mut ledger = drive(&client, &[port], 8, 40).await;
    println!(
        "{} registrations and {} logins in {:?}",
        ledger.registered.len(),
        ledger.logins.values().sum::<i64>(),
        started.elapsed()
    );
    ledger.assert_all_succeeded(8 * 40, &directory);

    wait_for_view(&client, port, &mut ledger).await;
    interrupt(running).await;
    assert_file_holds(&directory, &ledger).await;
    let _ = std::fs::remove_dir_all(&directory);
}

async fn describe(response: reqwest::Response) -> String {
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    format!("{status} {body}")
}

/// Two processes on one file are supported (README): SQLite serialises their appends on the
/// file's write lock, so positions, expected versions and email reservations hold across
/// processes; both project, and the checkpoint's compare-and-set lets one commit per batch;
/// each finds the other's writes by polling (`database.poll_interval_ms`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_standalone_processes_on_one_data_file_serve_it_together_and_lose_nothing() {
    let (directory, first_port) = data_directory_and_port();
    let second_port = free_port().unwrap();
    let client = client(60);
    let first = start(&client, &directory, first_port).await;
    // The second finds the file and the signing key the first made.
    let second = start(&client, &directory, second_port).await;
    assert_eq!(
        jwks(&client, first_port).await,
        jwks(&client, second_port).await
    );

    // One email registered through both at once, many times over: one account.
    let contested: Vec<_> = (0..16)
        .map(|n| {
            let client = client.clone();
            let port = [first_port, second_port][n % 2];
            tokio::spawn(async move {
                let credentials = json!({ "email": "Contested@example.com", "password": PASSWORD });
                post(&client, port, "/users", &credentials).await
            })
        })
        .collect();
    let mut winners = Vec::new();
    for registration in contested {
        let response = registration.await.unwrap();
        match response.status().as_u16() {
            201 => winners.push(response.json::<Value>().await.unwrap()),
            409 => {}
            _ => panic!("a contested registration: {}", describe(response).await),
        }
    }
    assert_eq!(winners.len(), 1, "one email, several accounts: {winners:?}");

    // Clients spread over both processes: each account is registered through one, logged in
    // through the other, and read back through either at the login's position.
    let ports = [first_port, second_port];
    let mut ledger = drive(&client, &ports, 8, 20).await;
    ledger.assert_all_succeeded(8 * 20, &directory);
    ledger.registered.insert(
        winners[0]["id"].as_str().unwrap().to_owned(),
        "Contested@example.com".to_owned(),
    );
    for port in ports {
        wait_for_view(&client, port, &mut ledger).await;
    }
    interrupt(second).await;
    interrupt(first).await;
    assert_file_holds(&directory, &ledger).await;
    let _ = std::fs::remove_dir_all(&directory);
}
