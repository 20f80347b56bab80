//! The standalone process (`cargo run`): everything on one port and one SQLite file, which
//! outlives the process.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot go on panics with the cause

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::Connection;

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(directory: &Path, port: u16) -> Running {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(directory.join("service.log"))
        .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_identity-service"))
        .current_dir(directory)
        .env("IDENTITY__HTTP__ADDRESS", format!("127.0.0.1:{port}"))
        .env("IDENTITY__PASSWORD__MEMORY_KIB", "1024")
        .env("IDENTITY__PASSWORD__ITERATIONS", "1")
        .env("IDENTITY__LOG__FILTER", "warn")
        .env("IDENTITY__LOG__FORMAT", "json")
        // Logs (JSON lines) beside the data, for a look when the test fails.
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    Running(child)
}

async fn wait_until_ready(client: &reqwest::Client, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = client
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .send()
            .await;
        if answer.is_ok_and(|response| response.status() == 200) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the standalone process never became ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Ctrl-C: SIGINT, and the process exits by itself.
fn interrupt(mut running: Running) {
    let status = Command::new("kill")
        .args(["-INT", &running.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = running.0.try_wait().unwrap() {
            assert!(
                status.success(),
                "the process exited with {status} on Ctrl-C"
            );
            return;
        }
        assert!(Instant::now() < deadline, "the process ignored Ctrl-C");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn a_restart_after_ctrl_c_keeps_accounts_keys_and_the_read_model() {
    let directory = std::env::temp_dir().join(format!("standalone-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&directory).unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let url = |path: &str| format!("http://127.0.0.1:{port}{path}");
    let credentials = json!({ "email": "ann@example.com", "password": "correct horse battery" });

    let running = start(&directory, port);
    wait_until_ready(&client, port).await;
    let registered = client
        .post(url("/users"))
        .json(&credentials)
        .send()
        .await
        .unwrap();
    assert_eq!(registered.status(), 201);
    let position = registered.headers()["x-position"]
        .to_str()
        .unwrap()
        .to_owned();
    let login = client
        .post(url("/login"))
        .json(&credentials)
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 200);
    // The login's own position: the view counts the login once it has applied this one, which
    // lies after the registration's.
    let login_position = login.headers()["x-position"].to_str().unwrap().to_owned();
    assert!(
        login_position.parse::<u64>().unwrap() > position.parse::<u64>().unwrap(),
        "the login's position {login_position} is not after the registration's {position}"
    );
    let login: Value = login.json().await.unwrap();
    let token = login["access_token"].as_str().unwrap().to_owned();
    let profile = client
        .get(url("/users/me"))
        .bearer_auth(&token)
        .header("X-Min-Position", &position)
        .send()
        .await
        .unwrap();
    assert_eq!(
        profile.status(),
        200,
        "read your own write through X-Min-Position"
    );
    let jwks: Value = client
        .get(url("/.well-known/jwks.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    interrupt(running);

    assert!(directory.join("data/identity.db").exists());
    assert!(directory.join("data/signing-key.pem").exists());

    let running = start(&directory, port);
    wait_until_ready(&client, port).await;
    let again: Value = client
        .get(url("/.well-known/jwks.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(again, jwks, "the signing key changed across the restart");
    let profile = client
        .get(url("/users/me"))
        .bearer_auth(&token)
        .header("X-Min-Position", &login_position)
        .send()
        .await
        .unwrap();
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
    let login = client
        .post(url("/login"))
        .json(&credentials)
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 200);
    let duplicate = client
        .post(url("/users"))
        .json(&credentials)
        .send()
        .await
        .unwrap();
    assert_eq!(duplicate.status(), 409, "the email reservation was lost");
    interrupt(running);
    let _ = std::fs::remove_dir_all(&directory);
}

#[tokio::test]
async fn a_data_file_locked_by_another_program_answers_503_with_retry_after_and_heals() {
    let directory = std::env::temp_dir().join(format!("standalone-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&directory).unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let url = |path: &str| format!("http://127.0.0.1:{port}{path}");
    let register = |email: &str| {
        client
            .post(url("/users"))
            .json(&json!({ "email": email, "password": "correct horse battery" }))
            .send()
    };
    let _running = start(&directory, port);
    wait_until_ready(&client, port).await;

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
    let refused = register("locked@example.com").await.unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(
        refused.headers()["retry-after"],
        "1",
        "a 503 must say when to retry"
    );
    let problem: Value = refused.json().await.unwrap();
    assert_eq!(problem["code"], "unavailable");

    sqlx::query("ROLLBACK").execute(&mut other).await.unwrap();
    let registered = register("locked@example.com").await.unwrap();
    assert_eq!(registered.status(), 201, "the service did not heal");
}
