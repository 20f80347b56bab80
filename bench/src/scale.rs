//! `scale`: logins over HTTP against one command API process, and against two processes
//! sharing the same cores and the same database, in the same run.
//!
//! Logins are where a deployment's CPU goes (argon2id at OWASP's parameters), so the command
//! API is the Deployment that scales out with load. Two replicas share nothing but the message
//! store: a login reads the account's stream and the last message of its login stream, and
//! appends its event, with no lock, cache or leader between replicas. On the same cores, two
//! processes can then do no more than one, and must do no less: the ratio is the coordination
//! cost between replicas, and the goal is at least 0.9x (docs/capacity.md).
//!
//! The processes are this benchmark's own executable serving the command API
//! (`bench serve-command-api`, the very `command_api::Application` the command API binary runs),
//! so `cargo run --release -p bench -- scale` needs no other build. Each hashes on as many
//! threads as the machine has cores, as every replica does by default; the clients are the same
//! number in both measurements, and rounds alternate so drift on a shared machine falls on both.

use std::sync::Arc;
use std::time::Duration;

use message_store::ConnectOptions;
use personal_data::{LookupKey, MasterKey};
use platform::clock::SystemClock;
use serde_json::json;
use test_support::TestDatabase;
use test_support::process::{Launch, Process, free_port};
use tokens::{Algorithm, MailTokenKey, RefreshTokenKey, SigningKey, WebhookSecretKey};

use crate::report::{median, rate};
use crate::setup::expect_json;

#[derive(clap::Args)]
pub struct Options {
    /// Concurrent clients in both measurements (default: four times the cores).
    #[arg(long)]
    clients: Option<usize>,
    /// Seconds per round; rounds alternate between one replica and two.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

const PASSWORD: &str = "benchmark password";

pub async fn run(options: Options) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let clients = options.clients.unwrap_or(4 * cores);
    let database = TestDatabase::new().await;
    // The message store's tables, before two processes race to create them.
    message_store::connect(
        database.url(),
        ConnectOptions {
            max_connections: 1,
            poll_interval: Duration::from_secs(1),
        },
    )
    .await?;
    let environment = Environment::new(database.url(), clients)?;
    let client = reqwest::Client::new();
    let mut replicas = Vec::new();
    for replica in 1..=2 {
        replicas.push(environment.start(&client, replica).await?);
    }
    let bases: Arc<Vec<String>> = Arc::new(
        replicas
            .iter()
            .map(|(_, port)| format!("http://127.0.0.1:{port}"))
            .collect(),
    );
    for worker in 0..clients {
        let request = client
            .post(format!("{}/users", bases[0]))
            .json(&json!({ "email": email(worker), "password": PASSWORD }));
        expect_json(request, 201, "registering").await?;
    }

    let duration = Duration::from_secs(options.seconds);
    let (mut one, mut two) = (Vec::new(), Vec::new());
    for round in 1..=options.rounds {
        let single = logins(&client, &bases, clients, duration, 1).await?;
        let both = logins(&client, &bases, clients, duration, 2).await?;
        println!("round {round}: one replica {single:.1}/s, two replicas {both:.1}/s");
        one.push(single);
        two.push(both);
    }
    for (mut process, _) in replicas {
        process.shut_down().await?;
    }

    let (one, two) = (median(one), median(two));
    println!(
        "logins over HTTP, one command API process: {one:.1}/s ({cores} cores, {clients} clients)"
    );
    println!("logins over HTTP, two processes on the same cores: {two:.1}/s ({clients} clients)");
    println!(
        "scale: {two:.1}/s with 2 replicas, {:.2}x one replica",
        two / one
    );
    Ok(())
}

fn email(worker: usize) -> String {
    format!("scale-{worker}@example.com")
}

/// Logins per second from `clients` clients for `duration`, worker `n` sending to replica
/// `n % replicas`.
async fn logins(
    client: &reqwest::Client,
    bases: &Arc<Vec<String>>,
    clients: usize,
    duration: Duration,
    replicas: usize,
) -> anyhow::Result<f64> {
    let (client, bases) = (client.clone(), bases.clone());
    rate(clients, duration, move |worker, _| {
        let (client, base) = (client.clone(), bases[worker % replicas].clone());
        async move {
            let response = client
                .post(format!("{base}/login"))
                .json(&json!({ "email": email(worker), "password": PASSWORD }))
                .send()
                .await?;
            anyhow::ensure!(response.status() == 200, "login: {}", response.status());
            Ok(())
        }
    })
    .await
}

/// The settings both replicas share, as a Deployment's ConfigMap and Secret give them: one
/// database, one set of keys.
struct Environment(Vec<(&'static str, String)>);

impl Environment {
    fn new(url: &str, clients: usize) -> anyhow::Result<Self> {
        Ok(Self(vec![
            ("IDENTITY__DATABASE__URL", url.to_owned()),
            (
                "IDENTITY__TOKENS__SIGNING_KEY",
                SigningKey::generate(Algorithm::EdDSA)?
                    .to_pem()?
                    .expose_secret()
                    .clone(),
            ),
            (
                "IDENTITY__TOKENS__REFRESH_TOKEN_KEY",
                RefreshTokenKey::generate()?
                    .to_hex()
                    .expose_secret()
                    .clone(),
            ),
            (
                "IDENTITY__MAIL__TOKEN_KEY",
                MailTokenKey::generate()?.to_hex().expose_secret().clone(),
            ),
            (
                "IDENTITY__WEBHOOKS__SECRET_KEY",
                WebhookSecretKey::generate()?
                    .to_hex()
                    .expose_secret()
                    .clone(),
            ),
            (
                "IDENTITY__PERSONAL_DATA__MASTER_KEY",
                MasterKey::generate("1")?.to_hex().expose_secret().clone(),
            ),
            (
                "IDENTITY__PERSONAL_DATA__LOOKUP_KEY",
                LookupKey::generate()?.to_hex().expose_secret().clone(),
            ),
            // Room for every client's login to wait for a hashing thread on one replica.
            (
                "IDENTITY__LOGIN__MAX_WAITING_HASHES",
                (2 * clients).to_string(),
            ),
            ("IDENTITY__LOG__FILTER", "warn".to_owned()),
        ]))
    }

    /// Replica `n`: this executable serving the command API on a free port, once it is ready.
    async fn start(&self, client: &reqwest::Client, n: usize) -> anyhow::Result<(Process, u16)> {
        let port = free_port()?;
        let mut launch = Launch::new(format!("command-api-{n}"), std::env::current_exe()?)
            .args(["serve-command-api"])
            .env("IDENTITY__HTTP__ADDRESS", format!("127.0.0.1:{port}"))
            .discard_logs();
        for (variable, value) in &self.0 {
            launch = launch.env(variable, value);
        }
        let mut process = launch.spawn()?;
        process.wait_until_serves(client, port, "/readyz").await?;
        Ok((process, port))
    }
}

/// `bench serve-command-api`: the command API, with its settings from the environment, until
/// SIGTERM; a replica of the `scale` benchmark.
pub async fn serve_command_api() -> anyhow::Result<()> {
    let settings: command_api::Settings = platform::settings::load(None)?;
    platform::telemetry::init(&settings.log);
    command_api::Application::build(settings, Arc::new(SystemClock))
        .await?
        .run_until_stopped(platform::shutdown::signal())
        .await
}
