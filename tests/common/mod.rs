//! What the tests that run the real binaries as processes share: finding the binaries, starting
//! them with one deployment's configuration, and the HTTP calls every such test makes.
//!
//! The binaries are the ones `cargo test` builds for the workspace's packages, found beside
//! the test's own executable.

// Each test binary that includes this module uses a part of it.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::PgPool;
use tokens::{Algorithm, SigningKey};

/// Where cargo put the binaries: `target/<profile>/`, the parent of `deps/` holding this test.
pub fn binary(name: &str) -> PathBuf {
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

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One deployment's shared configuration, as a ConfigMap and a Secret would give it.
pub struct Deployment {
    pub url: String,
    /// The read model's database, when it is not the message store's.
    pub read_model_url: Option<String>,
    pub signing_key: String,
    pub logs: PathBuf,
}

/// A running binary, killed if the test ends without stopping it.
pub struct Process {
    pub name: String,
    child: Child,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([format!("-{signal}"), self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {}", self.name);
    }

    /// Whether the process is still running (it has not exited or been killed).
    /// The operating system's process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_for_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM and waits for the process to exit by itself.
    pub fn terminate(mut self) -> ExitStatus {
        self.signal("TERM");
        let name = self.name.clone();
        self.wait_for_exit(Duration::from_secs(20))
            .unwrap_or_else(|| panic!("{name} ignored SIGTERM"))
    }

    /// SIGKILL, and waits until the process is gone.
    pub fn kill(mut self) -> ExitStatus {
        self.signal("KILL");
        let name = self.name.clone();
        self.wait_for_exit(Duration::from_secs(20))
            .unwrap_or_else(|| panic!("{name} survived SIGKILL"))
    }
}

impl Deployment {
    /// A deployment on the database at `url`, with a fresh signing key and its processes'
    /// logs in a temp directory named after `name`.
    pub fn new(name: &str, url: &str) -> Self {
        let logs = std::env::temp_dir().join(format!("{name}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&logs).unwrap();
        Self {
            url: url.to_owned(),
            read_model_url: None,
            signing_key: SigningKey::generate(Algorithm::EdDSA)
                .unwrap()
                .to_pem()
                .unwrap()
                .expose_secret()
                .clone(),
            logs,
        }
    }

    /// The same deployment with its read model in the database at `url`.
    pub fn with_read_model(mut self, url: &str) -> Self {
        self.read_model_url = Some(url.to_owned());
        self
    }

    pub fn command(&self, binary_name: &str, label: &str, extra: &[(&str, String)]) -> Command {
        let mut command = Command::new(binary(binary_name));
        command
            .env("IDENTITY__DATABASE__URL", &self.url)
            .env("IDENTITY__TOKENS__SIGNING_KEY", &self.signing_key)
            .env("IDENTITY__LOG__FILTER", "warn")
            // Cheap hashes: these tests are about processes, not password cost.
            .env("IDENTITY__PASSWORD__MEMORY_KIB", "1024")
            .env("IDENTITY__PASSWORD__ITERATIONS", "1")
            .env("IDENTITY__AGGREGATOR__LOCK_RETRY_MS", "200")
            .env("IDENTITY__QUERY__MAX_WAIT_MS", "10000")
            .stdout(log_file(&self.logs, label))
            .stderr(log_file(&self.logs, &format!("{label}.err")));
        if let Some(url) = &self.read_model_url {
            command.env("IDENTITY__READ_MODEL__URL", url);
        }
        for (key, value) in extra {
            command.env(key, value);
        }
        command
    }

    pub fn run_to_completion(&self, binary_name: &str, args: &[&str]) {
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

    pub fn start(&self, binary_name: &str, label: &str, extra: &[(&str, String)]) -> Process {
        Process {
            name: label.to_owned(),
            child: self.command(binary_name, label, extra).spawn().unwrap(),
        }
    }

    /// Starts `binary_name` with `args` (an admin command, say) and its output in `label`'s logs.
    pub fn start_with_args(
        &self,
        binary_name: &str,
        label: &str,
        args: &[&str],
        extra: &[(&str, String)],
    ) -> Process {
        Process {
            name: label.to_owned(),
            child: self
                .command(binary_name, label, extra)
                .args(args)
                .spawn()
                .unwrap(),
        }
    }

    /// The log file a process labelled `label` writes to (its stderr: `{label}.err`).
    pub fn log(&self, label: &str) -> PathBuf {
        self.logs.join(format!("{label}.log"))
    }
}

fn log_file(directory: &Path, label: &str) -> Stdio {
    Stdio::from(std::fs::File::create(directory.join(format!("{label}.log"))).unwrap())
}

pub async fn wait_until_healthy(client: &reqwest::Client, port: u16) {
    wait_for_status(client, port, "/healthz", 200, Duration::from_secs(30)).await;
}

/// Polls `path` on `port` until it answers `status`; panics after `timeout`.
pub async fn wait_for_status(
    client: &reqwest::Client,
    port: u16,
    path: &str,
    status: u16,
    timeout: Duration,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let answer = client
            .get(format!("http://127.0.0.1:{port}{path}"))
            .send()
            .await;
        if answer.is_ok_and(|response| response.status() == status) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{path} on port {port} did not answer {status} within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn register(client: &reqwest::Client, port: u16, email: &str) -> (String, u64) {
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

/// The three services of a split deployment, each on a port of its own.
pub struct Services {
    pub command_port: u16,
    pub query_port: u16,
    pub aggregator_port: u16,
    pub processes: Vec<Process>,
}

/// Migrates, starts the services that `which` names and waits until they are ready.
pub async fn start_services(
    deployment: &Deployment,
    client: &reqwest::Client,
    which: &[&str],
) -> Services {
    deployment.run_to_completion("command-api", &["migrate"]);
    deployment.run_to_completion("aggregator", &["migrate"]);
    let mut services = Services {
        command_port: free_port(),
        query_port: free_port(),
        aggregator_port: free_port(),
        processes: Vec::new(),
    };
    // Info logs: what the services say about losing and finding the database is the story of
    // a failed run.
    let log = ("IDENTITY__LOG__FILTER", "info,sqlx=warn".to_owned());
    for name in which {
        let (variable, port) = match *name {
            "command-api" => ("IDENTITY__HTTP__ADDRESS", services.command_port),
            "query-api" => ("IDENTITY__HTTP__ADDRESS", services.query_port),
            _ => (
                "IDENTITY__AGGREGATOR__HTTP__ADDRESS",
                services.aggregator_port,
            ),
        };
        services.processes.push(deployment.start(
            name,
            name,
            &[(variable, format!("127.0.0.1:{port}")), log.clone()],
        ));
        wait_until_healthy(client, port).await;
        wait_for_status(client, port, "/readyz", 200, Duration::from_secs(30)).await;
    }
    services
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

/// The JSON body of `GET path` on `port`.
pub async fn get_json(client: &reqwest::Client, port: u16, path: &str) -> Value {
    client
        .get(format!("http://127.0.0.1:{port}{path}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The `/metrics` text of the process serving `port`.
pub async fn metrics_text(client: &reqwest::Client, port: u16) -> String {
    client
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
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
