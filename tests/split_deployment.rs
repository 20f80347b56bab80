//! The split deployment end to end: the three real binaries as separate processes against one
//! fresh PostgreSQL database, as docker-compose and Kubernetes run them.
//!
//! The binaries are the ones `cargo test` builds for the workspace's packages, found beside
//! this test's own executable.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot go on panics with the cause

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use test_support::TestDatabase;
use tokens::{Algorithm, SigningKey};

/// Where cargo put the binaries: `target/<profile>/`, the parent of `deps/` holding this test.
fn binary(name: &str) -> PathBuf {
    let deps = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_owned();
    let path = deps.parent().unwrap().join(name);
    assert!(
        path.exists(),
        "{} is missing: `cargo test --workspace` builds it (or run `cargo build --workspace`)",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One deployment's shared configuration, as a ConfigMap and a Secret would give it.
struct Deployment {
    database: TestDatabase,
    signing_key: String,
    logs: PathBuf,
}

/// A running binary, killed if the test ends without stopping it.
struct Process {
    name: String,
    child: Child,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {}", self.name);
    }

    /// Sends SIGTERM and waits for the process to exit by itself.
    fn terminate(mut self) -> ExitStatus {
        self.signal("TERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "{} ignored SIGTERM", self.name);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Deployment {
    async fn new() -> Self {
        let logs = std::env::temp_dir().join(format!("split-deployment-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&logs).unwrap();
        Self {
            database: TestDatabase::new().await,
            signing_key: SigningKey::generate(Algorithm::EdDSA)
                .unwrap()
                .to_pem()
                .unwrap()
                .expose_secret()
                .clone(),
            logs,
        }
    }

    fn command(&self, binary_name: &str, label: &str, extra: &[(&str, String)]) -> Command {
        let mut command = Command::new(binary(binary_name));
        command
            .env("IDENTITY__DATABASE__URL", self.database.url())
            .env("IDENTITY__TOKENS__SIGNING_KEY", &self.signing_key)
            .env("IDENTITY__LOG__FILTER", "warn")
            // Cheap hashes: this test is about processes, not password cost.
            .env("IDENTITY__PASSWORD__MEMORY_KIB", "1024")
            .env("IDENTITY__PASSWORD__ITERATIONS", "1")
            .env("IDENTITY__AGGREGATOR__LOCK_RETRY_MS", "200")
            .env("IDENTITY__QUERY__MAX_WAIT_MS", "10000")
            .stdout(log_file(&self.logs, label))
            .stderr(log_file(&self.logs, &format!("{label}.err")));
        for (key, value) in extra {
            command.env(key, value);
        }
        command
    }

    fn run_to_completion(&self, binary_name: &str, args: &[&str]) {
        let status = self
            .command(
                binary_name,
                &format!("{binary_name}-{}", args.join("-")),
                &[],
            )
            .args(args)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "{binary_name} {args:?} failed: see {}",
            self.logs.display()
        );
    }

    fn start(&self, binary_name: &str, label: &str, extra: &[(&str, String)]) -> Process {
        Process {
            name: label.to_owned(),
            child: self.command(binary_name, label, extra).spawn().unwrap(),
        }
    }
}

fn log_file(directory: &Path, label: &str) -> Stdio {
    Stdio::from(std::fs::File::create(directory.join(format!("{label}.log"))).unwrap())
}

async fn wait_until_healthy(client: &reqwest::Client, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = client
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .await;
        if answer.is_ok_and(|response| response.status() == 200) {
            return;
        }
        assert!(Instant::now() < deadline, "nothing healthy on port {port}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn register(client: &reqwest::Client, port: u16, email: &str) -> (String, u64) {
    let response = client
        .post(format!("http://127.0.0.1:{port}/users"))
        .json(&json!({ "email": email, "password": "correct horse battery" }))
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

async fn login(
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

async fn token(client: &reqwest::Client, port: u16, email: &str, password: &str) -> String {
    let response = login(client, port, email, password).await;
    assert_eq!(response.status(), 200, "logging in {email}");
    let body: Value = response.json().await.unwrap();
    body["access_token"].as_str().unwrap().to_owned()
}

/// The projection's checkpoint, from the read model.
async fn checkpoint(database: &TestDatabase) -> u64 {
    let pool = database.pool().await;
    let position: Option<i64> = sqlx::query_scalar(
        "SELECT position FROM projection_checkpoints WHERE projection = 'users'",
    )
    .fetch_optional(&pool)
    .await
    .unwrap();
    pool.close().await;
    position.map_or(0, |position| u64::try_from(position).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_three_binaries_serve_survive_a_killed_aggregator_and_stop_cleanly() {
    let deployment = Deployment::new().await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let (command_port, query_port) = (free_port(), free_port());
    let (first_port, second_port) = (free_port(), free_port());

    // The migration Job, then the Deployments.
    deployment.run_to_completion("command-api", &["migrate"]);
    deployment.run_to_completion("aggregator", &["migrate"]);
    let command_api = deployment.start(
        "command-api",
        "command-api",
        &[(
            "IDENTITY__HTTP__ADDRESS",
            format!("127.0.0.1:{command_port}"),
        )],
    );
    let query_api = deployment.start(
        "query-api",
        "query-api",
        &[("IDENTITY__HTTP__ADDRESS", format!("127.0.0.1:{query_port}"))],
    );
    let first_aggregator = deployment.start(
        "aggregator",
        "aggregator-1",
        &[(
            "IDENTITY__AGGREGATOR__HTTP__ADDRESS",
            format!("127.0.0.1:{first_port}"),
        )],
    );
    for port in [command_port, query_port, first_port] {
        wait_until_healthy(&client, port).await;
    }

    // Register, log in, read the profile as soon as the read model has the registration.
    let (ann, position) = register(&client, command_port, "ann@example.com").await;
    let ann_token = token(
        &client,
        command_port,
        "ann@example.com",
        "correct horse battery",
    )
    .await;
    let response = client
        .get(format!("http://127.0.0.1:{query_port}/users/me"))
        .bearer_auth(&ann_token)
        .header("X-Min-Position", position.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let profile: Value = response.json().await.unwrap();
    assert_eq!(
        (profile["id"].as_str(), profile["status"].as_str()),
        (Some(ann.as_str()), Some("active"))
    );

    // The first administrator, created by an operator; deactivating Ann refuses her login.
    let mut create = deployment
        .command("command-api", "admin-create", &[])
        .args(["admin", "create", "--email", "root@example.com"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        writeln!(create.stdin.take().unwrap(), "an operator's long password").unwrap();
    }
    assert!(create.wait().unwrap().success(), "admin create failed");
    let admin_token = token(
        &client,
        command_port,
        "root@example.com",
        "an operator's long password",
    )
    .await;
    let response = client
        .post(format!(
            "http://127.0.0.1:{command_port}/users/{ann}/deactivate"
        ))
        .bearer_auth(&admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let refused = login(
        &client,
        command_port,
        "ann@example.com",
        "correct horse battery",
    )
    .await;
    assert_eq!(refused.status(), 401);

    // A standby aggregator; the active one is killed in the middle of a burst of registrations.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second_aggregator = deployment.start(
        "aggregator",
        "aggregator-2",
        &[(
            "IDENTITY__AGGREGATOR__HTTP__ADDRESS",
            format!("127.0.0.1:{second_port}"),
        )],
    );
    wait_until_healthy(&client, second_port).await;
    let burst: Vec<_> = (0..60)
        .map(|n| {
            let client = client.clone();
            tokio::spawn(async move {
                register(&client, command_port, &format!("burst{n}@example.com")).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(150)).await;
    first_aggregator.signal("KILL");
    let mut last_position = 0;
    for registration in burst {
        last_position = last_position.max(registration.await.unwrap().1);
    }
    drop(first_aggregator);

    // The query API answers whatever the aggregators do.
    let response = client
        .get(format!("http://127.0.0.1:{query_port}/users/{ann}"))
        .bearer_auth(&admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // The standby takes over and the read model ends complete.
    let deadline = Instant::now() + Duration::from_secs(60);
    while checkpoint(&deployment.database).await < last_position {
        assert!(
            Instant::now() < deadline,
            "the standby aggregator never caught up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let response = client
        .get(format!(
            "http://127.0.0.1:{query_port}/users?status=active&limit=100"
        ))
        .bearer_auth(&admin_token)
        .header("X-Min-Position", last_position.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let page: Value = response.json().await.unwrap();
    let emails: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|user| user["email"].as_str().unwrap())
        .collect();
    for n in 0..60 {
        let email = format!("burst{n}@example.com");
        assert!(
            emails.contains(&email.as_str()),
            "{email} is missing from the read model"
        );
    }
    let pool = deployment.database.pool().await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        rows, 62,
        "every account once: Ann, the administrator and the burst"
    );
    pool.close().await;

    // SIGTERM stops each process cleanly; with no aggregator left, the query API still answers.
    let status = second_aggregator.terminate();
    assert!(
        status.success(),
        "the aggregator exited with {status} on SIGTERM"
    );
    let response = client
        .get(format!("http://127.0.0.1:{query_port}/users/{ann}"))
        .bearer_auth(&admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        200,
        "the query API stopped answering without an aggregator"
    );
    for process in [query_api, command_api] {
        let name = process.name.clone();
        let status = process.terminate();
        assert!(status.success(), "{name} exited with {status} on SIGTERM");
    }
    let _ = std::fs::remove_dir_all(&deployment.logs);
}
