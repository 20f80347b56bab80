//! `login`: logins over HTTP against argon2 verification alone (the hardware's limit for a
//! login), and the latency of a login after 10,000 earlier logins of the same account.
//!
//! The baseline is the service's own best case: the same verification code on the service's
//! own hashing threads (one per core, each reusing its argon2 memory), called directly with no
//! HTTP, no store and no token. A baseline that allocated a fresh buffer per verification, or ran
//! on other threads, would be slower than the service and put logins above the hardware's limit;
//! a ratio above 1.0 therefore means the baseline is wrong, and the run fails saying so.

use std::time::{Duration, Instant};

use chrono::TimeDelta;
use command_api::service::{login_message, login_stream};
use identity::{LoginEvent, LoginSucceeded, Password, UserId};
use message_store::{ExpectedVersion, StreamAppend};
use platform::clock::{Clock, SystemClock};
use serde_json::json;
use test_support::TestDatabase;

use crate::report::{median, rate};
use crate::setup::{CommandApi, expect_json};

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

const PASSWORD: &str = "benchmark password";

pub async fn run(options: Options) -> anyhow::Result<()> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let clients = options.clients.unwrap_or(2 * cores);
    let database = TestDatabase::new().await;
    // Room for every client's login to wait for a hashing thread.
    let service = CommandApi::start(&database, |settings| {
        settings.login.max_waiting_hashes = clients * 2;
    })
    .await?;
    for worker in 0..clients {
        service
            .register(format!("bench-{worker}@example.com"))
            .await?;
    }
    let (argon_rates, login_rates) = service.measure_rates(&options, clients).await?;
    let (before, after) = service.measure_latencies(&options).await?;
    service.stop().await?;

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

/// What the login benchmark does with the command API: accounts, and the two measurements.
impl CommandApi {
    async fn register(&self, email: String) -> anyhow::Result<UserId> {
        let request = self
            .client
            .post(format!("{}/users", self.base))
            .json(&json!({ "email": email, "password": PASSWORD }));
        let body = expect_json(request, 201, "registering").await?;
        Ok(body["id"].as_str().unwrap_or_default().parse()?)
    }

    /// Rounds of verifications alone and of logins over HTTP, alternately; answers the rates
    /// of each.
    async fn measure_rates(
        &self,
        options: &Options,
        clients: usize,
    ) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
        // The baseline: verifications alone, of a hash made with the service's parameters, on
        // the service's hashing threads.
        let password = Password::for_verification(PASSWORD.into())?;
        let hash = self
            .hasher
            .hash(password.clone())
            .await
            .map_err(|error| anyhow::anyhow!("hashing the baseline's password: {error}"))?;

        let duration = Duration::from_secs(options.seconds);
        let (mut argon_rates, mut login_rates) = (Vec::new(), Vec::new());
        for round in 1..=options.rounds {
            let (hasher, password, hash) = (self.hasher.clone(), password.clone(), hash.clone());
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
            let (client, base) = (self.client.clone(), self.base.clone());
            let logins = rate(clients, duration, move |worker, _| {
                let (client, base) = (client.clone(), base.clone());
                async move {
                    log_in(&client, &base, &format!("bench-{worker}@example.com")).await?;
                    Ok(())
                }
            })
            .await?;
            println!("round {round}: argon2 verify {argon:.1}/s, login over HTTP {logins:.1}/s");
            argon_rates.push(argon);
            login_rates.push(logins);
        }
        Ok((argon_rates, login_rates))
    }

    /// Latency of sequential logins of an account with no earlier login and of one with
    /// `earlier_logins` of them, measured alternately so that drift on a shared machine falls
    /// on both alike; medians, so that one stalled login does not decide.
    async fn measure_latencies(&self, options: &Options) -> anyhow::Result<(f64, f64)> {
        let fresh = "fresh@example.com";
        let busy = "busy@example.com";
        self.register(fresh.into()).await?;
        let id = self.register(busy.into()).await?;
        self.write_earlier_logins(id, options.earlier_logins)
            .await?;
        let login_once = |email: &'static str| async move {
            let started = Instant::now();
            log_in(&self.client, &self.base, email).await?;
            anyhow::Ok(started.elapsed().as_secs_f64() * 1000.0)
        };
        login_once(fresh).await?;
        login_once(busy).await?;
        let (mut fresh_samples, mut busy_samples) = (Vec::new(), Vec::new());
        for _ in 0..options.samples {
            fresh_samples.push(login_once(fresh).await?);
            busy_samples.push(login_once(busy).await?);
        }
        Ok((median(fresh_samples), median(busy_samples)))
    }

    /// Appends `count` successful logins of account `id` from an hour ago, a thousand at a time.
    async fn write_earlier_logins(&self, id: UserId, count: usize) -> anyhow::Result<()> {
        let stream = login_stream(id)?;
        let start = SystemClock.now() - TimeDelta::hours(1);
        let mut written = 0;
        while written < count {
            let batch = (count - written).min(1000);
            let messages = (0..batch)
                .map(|i| {
                    let n = (written + i) as u64;
                    login_message(&LoginEvent::from(LoginSucceeded {
                        at: start + TimeDelta::milliseconds(n as i64),
                        login_count: n + 1,
                    }))
                })
                .collect();
            self.store
                .append(vec![StreamAppend::new(
                    stream.clone(),
                    ExpectedVersion::Any,
                    messages,
                )])
                .await?;
            written += batch;
        }
        Ok(())
    }
}

/// Logs `email` in with the benchmark's password; an error unless it succeeds.
async fn log_in(client: &reqwest::Client, base: &str, email: &str) -> anyhow::Result<()> {
    let response = client
        .post(format!("{base}/login"))
        .json(&json!({ "email": email, "password": PASSWORD }))
        .send()
        .await?;
    anyhow::ensure!(response.status() == 200, "login: {}", response.status());
    Ok(())
}
