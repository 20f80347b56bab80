//! `login`: logins over HTTP against argon2 verification alone (the hardware's limit for a
//! login), and the latency of a login after 10,000 earlier logins of the same account.
//!
//! The baseline is the service's own best case: the same verification code on the service's
//! own hashing threads (one per core, each reusing its argon2 memory), called directly with no
//! HTTP, no store and no token. A baseline that allocated a fresh buffer per verification, or ran
//! on other threads, would be slower than the service and put logins above the hardware's limit;
//! a ratio above 1.0 therefore means the baseline is wrong, and the run fails saying so.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::TimeDelta;
use command_api::service::{login_message, login_stream};
use command_api::{Application, Settings};
use identity::{LoginEvent, LoginSucceeded, Password, UserId};
use message_store::{ExpectedVersion, StreamAppend};
use platform::clock::{Clock, SystemClock};
use serde_json::{Value, json};
use test_support::TestDatabase;
use tokens::{Algorithm, SigningKey};

use crate::report::{median, rate};

#[derive(clap::Args)]
pub struct Options {
    /// Concurrent clients (default: twice the cores).
    #[arg(long)]
    clients: Option<usize>,
    /// Seconds per round; rounds alternate between the baseline and the logins.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Earlier logins of one account before the second latency measurement.
    #[arg(long, default_value_t = 10_000)]
    earlier_logins: usize,
    /// Sequential logins per account for the latency figures (their median is reported).
    #[arg(long, default_value_t = 40)]
    samples: usize,
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let clients = options.clients.unwrap_or(2 * cores);
    let database = TestDatabase::new().await;
    // The defaults: OWASP's argon2id parameters (19 MiB, 2 iterations, 1 lane).
    let mut settings = Settings::default();
    settings.database.url = database.url().into();
    settings.http.address = "127.0.0.1:0".into();
    settings.login.max_waiting_hashes = clients * 2;
    let key = SigningKey::generate(Algorithm::EdDSA)?;
    settings.tokens.signing_key = Some(key.to_pem()?.expose_secret().clone());

    let application = Application::build(settings, Arc::new(SystemClock)).await?;
    let base = format!("http://127.0.0.1:{}", application.port());
    let store = application.state().commands.store.clone();
    // The baseline's hasher: the very one the service's logins verify with.
    let hasher = application.state().commands.hasher.clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(application.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::new();

    let register = |email: String| {
        let (client, base) = (client.clone(), base.clone());
        async move {
            let response = client
                .post(format!("{base}/users"))
                .json(&json!({ "email": email, "password": "benchmark password" }))
                .send()
                .await?;
            anyhow::ensure!(
                response.status() == 201,
                "registering: {}",
                response.status()
            );
            let body: Value = response.json().await?;
            let id: UserId = body["id"].as_str().unwrap_or_default().parse()?;
            anyhow::Ok(id)
        }
    };
    for worker in 0..clients {
        register(format!("bench-{worker}@example.com")).await?;
    }

    // The baseline: verifications alone, of a hash made with the service's parameters, on the
    // service's hashing threads.
    let password = Password::for_verification("benchmark password".into())?;
    let hash = hasher
        .hash(password.clone())
        .await
        .map_err(|error| anyhow::anyhow!("hashing the baseline's password: {error}"))?;

    let duration = Duration::from_secs(options.seconds);
    let (mut argon_rates, mut login_rates) = (Vec::new(), Vec::new());
    for round in 1..=options.rounds {
        let (hasher, password, hash) = (hasher.clone(), password.clone(), hash.clone());
        let argon = rate(clients, duration, move |_, _| {
            let (hasher, password, hash) = (hasher.clone(), password.clone(), hash.clone());
            async move {
                let verified = hasher
                    .verify(password, Some(hash))
                    .await
                    .map_err(|error| anyhow::anyhow!("the baseline's verification: {error}"))?;
                anyhow::ensure!(verified.matches, "the baseline's password did not verify");
                Ok(())
            }
        })
        .await?;
        let (client, base) = (client.clone(), base.clone());
        let logins = rate(clients, duration, move |worker, _| {
            let (client, base) = (client.clone(), base.clone());
            async move {
                let response = client
                    .post(format!("{base}/login"))
                    .json(&json!({
                        "email": format!("bench-{worker}@example.com"),
                        "password": "benchmark password",
                    }))
                    .send()
                    .await?;
                anyhow::ensure!(response.status() == 200, "login: {}", response.status());
                Ok(())
            }
        })
        .await?;
        println!("round {round}: argon2 verify {argon:.1}/s, login over HTTP {logins:.1}/s");
        argon_rates.push(argon);
        login_rates.push(logins);
    }

    // Latency of sequential logins of an account with no earlier login and of one with
    // `earlier_logins` of them, measured alternately so that drift on a shared machine falls
    // on both alike; medians, so that one stalled login does not decide.
    let fresh = "fresh@example.com";
    let busy = "busy@example.com";
    register(fresh.into()).await?;
    let id = register(busy.into()).await?;
    let stream = login_stream(id)?;
    let start = SystemClock.now() - TimeDelta::hours(1);
    let mut written = 0;
    while written < options.earlier_logins {
        let batch = (options.earlier_logins - written).min(1000);
        let messages = (0..batch)
            .map(|i| {
                let n = (written + i) as u64;
                login_message(&LoginEvent::from(LoginSucceeded {
                    at: start + TimeDelta::milliseconds(n as i64),
                    login_count: n + 1,
                }))
            })
            .collect();
        store
            .append(vec![StreamAppend::new(
                stream.clone(),
                ExpectedVersion::Any,
                messages,
            )])
            .await?;
        written += batch;
    }
    let login_once = |email: &'static str| {
        let (client, base) = (client.clone(), base.clone());
        async move {
            let started = Instant::now();
            let response = client
                .post(format!("{base}/login"))
                .json(&json!({ "email": email, "password": "benchmark password" }))
                .send()
                .await?;
            anyhow::ensure!(response.status() == 200, "login: {}", response.status());
            anyhow::Ok(started.elapsed().as_secs_f64() * 1000.0)
        }
    };
    login_once(fresh).await?;
    login_once(busy).await?;
    let (mut fresh_samples, mut busy_samples) = (Vec::new(), Vec::new());
    for _ in 0..options.samples {
        fresh_samples.push(login_once(fresh).await?);
        busy_samples.push(login_once(busy).await?);
    }
    let (before, after) = (median(fresh_samples), median(busy_samples));

    let _ = stop.send(());
    server.await??;

    let (argon, logins) = (median(argon_rates), median(login_rates));
    println!("argon2 verify alone: {argon:.1}/s ({cores} cores, {clients} clients)");
    println!("login over HTTP: {logins:.1}/s ({clients} clients)");
    println!(
        "login latency (median) after 0 logins: {before:.1} ms, after {}: {after:.1} ms, ratio {:.2}",
        options.earlier_logins,
        after / before
    );
    let ratio = logins / argon;
    println!("login: {logins:.1}/s, {ratio:.2}x argon2 limit");
    if ratio > 1.0 {
        println!(
            "WARNING: logins over HTTP came out faster than argon2 verification alone on the \
             same threads ({ratio:.2}x): the baseline is not the hardware's limit, so this \
             benchmark is broken"
        );
        anyhow::bail!("login ratio {ratio:.2} above 1.0: the baseline is wrong");
    }
    Ok(())
}
