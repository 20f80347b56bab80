//! `soak`: the split deployment under minutes of mixed traffic, run by hand, not in CI. The
//! three release binaries run as processes of their own with their default settings against a
//! fresh PostgreSQL database, while concurrent clients register, log in (with the right
//! password, a wrong one, or an unknown email), and read their own profile, their history, and,
//! as an administrator, other people's profiles, lookups by email and pages of accounts.
//!
//! Every answer is checked against the one that request should get: anything else, a transport
//! error included, is an error, and the run fails on a single one. It also fails when the read
//! model does not catch up at the end (the aggregator's checkpoint at the store's head, every
//! registered account in the view once, every granted login counted), or when a process does
//! not stop cleanly on SIGTERM. The resident memory of each process is sampled throughout, to
//! show whether it levels off.
//!
//! Password checks (argon2id, some 20 ms of a core each) are paced at fixed rates rather than
//! drawn from the mix: on two cores, a mix where one request in five hashes would measure
//! argon2 and nothing else. Reads fill whatever the clients have left.
//!
//! A 429 from the login's load shedding counts as an error, shown apart: at most
//! `--concurrency` password checks are ever in flight, well below the 64 the command API lets
//! wait for a core (`login.max_waiting_hashes`), so at the default settings a 429 is load the
//! service refused although it should have carried it.
//!
//! The binaries are the release builds beside this one: `scripts/soak` builds them and runs it.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::SecondsFormat;
use hdrhistogram::Histogram;
use platform::clock::{Clock, SystemClock};
use reqwest::header::HeaderMap;
use reqwest::{RequestBuilder, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use test_support::TestDatabase;
use tokens::{Algorithm, SigningKey};
use uuid::Uuid;

use crate::report::{mib, proc_status_kib};

#[derive(clap::Args)]
pub struct Options {
    /// Seconds of measured traffic, after the warm-up.
    #[arg(long, default_value_t = 180)]
    seconds: u64,
    /// Concurrent clients, each with one request in flight at a time.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Logins per second; one in five with a wrong password or an unknown email.
    #[arg(long, default_value_t = 10.0)]
    logins_per_second: f64,
    /// Registrations per second.
    #[arg(long, default_value_t = 4.0)]
    registrations_per_second: f64,
    /// Accounts registered before the traffic starts, for the logins and reads to use (and a
    /// tenth as many more that only ever get wrong passwords).
    #[arg(long, default_value_t = 500)]
    accounts: usize,
    /// Seconds of the same traffic before the measuring starts, so that pools, caches and
    /// allocators have settled when the resident memory at the start is read.
    #[arg(long, default_value_t = 15)]
    warmup: u64,
    /// The processes' log filter. Their logs go to files; the default, the deployment's, logs
    /// every request.
    #[arg(long, default_value = "info,sqlx=warn")]
    log_filter: String,
    /// Seconds between scrapes of each process's `/metrics`, as the Prometheus the manifests
    /// ask for would do; 0 leaves them unscraped.
    #[arg(long, default_value_t = 15)]
    scrape_every: u64,
    /// Keep the processes' logs after a run that passed (a failed run always keeps them).
    #[arg(long)]
    keep_logs: bool,
}

/// The password of every account that logs in successfully.
const PASSWORD: &str = "a soak test's password";
const ADMIN_EMAIL: &str = "root@soak.example.com";
const ADMIN_PASSWORD: &str = "the soak administrator's password";
/// Sessions (tokens from logins) the reads draw from; the oldest is replaced by each new one.
const SESSIONS: usize = 500;
/// A token is used no longer than this; the default lifetime is 15 minutes.
const TOKEN_USE: Duration = Duration::from_secs(600);
/// How long the read model may take to catch up once the traffic stops.
const CATCH_UP: Duration = Duration::from_secs(60);
const SAMPLE_EVERY: Duration = Duration::from_millis(500);

pub async fn run(options: Options) -> anyhow::Result<()> {
    anyhow::ensure!(options.concurrency > 0, "--concurrency must be at least 1");
    anyhow::ensure!(options.seconds > 0, "--seconds must be at least 1");
    if !soak(options).await? {
        // Everything is stopped and dropped by now; the summary stays the last line.
        std::process::exit(1);
    }
    Ok(())
}

/// Runs the soak; `false` when it found an error.
async fn soak(options: Options) -> anyhow::Result<bool> {
    let binaries = std::env::current_exe()?
        .parent()
        .context("the bench executable has no directory")?
        .to_owned();
    for name in ["command-api", "query-api", "aggregator"] {
        anyhow::ensure!(
            binaries.join(name).is_file(),
            "{} is missing: `scripts/soak` builds it (or `cargo build --release -p {name}` with \
             the same target directory)",
            binaries.join(name).display()
        );
    }
    let deployment = Deployment::new(binaries, &options).await?;
    println!(
        "database {}; the processes' logs are in {}",
        deployment.database.name(),
        deployment.logs.display()
    );
    let outcome = soak_deployment(&deployment, &options).await;
    match outcome {
        Ok(true) if !options.keep_logs => {
            let _ = std::fs::remove_dir_all(&deployment.logs);
        }
        // The report has said so already, before its last line.
        Ok(_) => {}
        Err(_) => println!("logs kept in {}", deployment.logs.display()),
    }
    outcome
}

async fn soak_deployment(deployment: &Deployment, options: &Options) -> anyhow::Result<bool> {
    // The migration Job, then the Deployments.
    deployment.run("command-api", &["migrate"], None).await?;
    deployment.run("aggregator", &["migrate"], None).await?;
    let (command_port, query_port, aggregator_port) = (free_port()?, free_port()?, free_port()?);
    let mut services = [
        deployment.start(
            "command-api",
            (
                "IDENTITY__HTTP__ADDRESS",
                format!("127.0.0.1:{command_port}"),
            ),
        )?,
        deployment.start(
            "query-api",
            ("IDENTITY__HTTP__ADDRESS", format!("127.0.0.1:{query_port}")),
        )?,
        deployment.start(
            "aggregator",
            (
                "IDENTITY__AGGREGATOR__HTTP__ADDRESS",
                format!("127.0.0.1:{aggregator_port}"),
            ),
        )?,
    ];
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    for (service, port) in services
        .iter_mut()
        .zip([command_port, query_port, aggregator_port])
    {
        service.wait_until_healthy(&client, port).await?;
    }
    let pids = services.each_ref().map(Service::pid);
    let rest_rss = rss(pids)?;

    // The first administrator, created by an operator, for the reads of other accounts.
    deployment
        .run(
            "command-api",
            &["admin", "create", "--email", ADMIN_EMAIL],
            Some(ADMIN_PASSWORD),
        )
        .await?;

    let setup = Arc::new(Stats::new()?);
    let traffic = Arc::new(Traffic {
        client,
        command: format!("http://127.0.0.1:{command_port}"),
        query: format!("http://127.0.0.1:{query_port}"),
        aggregator: format!("http://127.0.0.1:{aggregator_port}"),
        scrape_every: (options.scrape_every > 0).then(|| Duration::from_secs(options.scrape_every)),
        max_lag: AtomicU64::new(0),
        accounts: RwLock::default(),
        decoys: RwLock::default(),
        sessions: Mutex::default(),
        admin: Mutex::new(None),
        admin_refresh: tokio::sync::Mutex::new(()),
        confirmed: AtomicU64::new(0),
        cursor: Mutex::new(None),
        next_email: AtomicU64::new(0),
        granted_logins: AtomicU64::new(0),
        registrations: Pacer::new(options.registrations_per_second),
        logins: Pacer::new(options.logins_per_second),
    });
    let seeding = Instant::now();
    traffic.admin_token(&setup).await;
    seed(&traffic, &setup, options.accounts).await?;
    anyhow::ensure!(
        setup.totals().errors == 0,
        "the setup's requests failed:\n{}",
        setup.failures().join("\n")
    );
    println!(
        "seeded {} accounts, {} that only get wrong passwords and {} sessions in {:.1} s",
        read(&traffic.accounts).len(),
        read(&traffic.decoys).len(),
        lock(&traffic.sessions).len(),
        seeding.elapsed().as_secs_f64()
    );

    let warmup = Arc::new(Stats::new()?);
    let warmup_elapsed = drive(
        &traffic,
        &warmup,
        options.concurrency,
        Duration::from_secs(options.warmup),
    )
    .await?;
    for service in &mut services {
        service.ensure_running()?;
    }

    // The measured run, with the resident memory sampled throughout.
    let start_rss = rss(pids)?;
    let samples = Arc::new(Mutex::new(vec![(Duration::ZERO, start_rss)]));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (samples, sampling) = (samples.clone(), sampling.clone());
        let started = Instant::now();
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                tokio::time::sleep(SAMPLE_EVERY).await;
                match rss(pids) {
                    Ok(now) => lock(&samples).push((started.elapsed(), now)),
                    Err(_) => break,
                }
            }
        })
    };
    let stats = Arc::new(Stats::new()?);
    let elapsed = drive(
        &traffic,
        &stats,
        options.concurrency,
        Duration::from_secs(options.seconds),
    )
    .await?;
    sampling.store(false, Ordering::Relaxed);
    sampler.await?;
    let mut problems = Vec::new();
    for service in &mut services {
        if let Err(error) = service.ensure_running() {
            problems.push(format!("{error:#}"));
        }
    }
    let end_rss = rss(pids).unwrap_or([0; 3]);
    lock(&samples).push((elapsed, end_rss));

    // The read model must catch up with everything the traffic wrote.
    let pool = deployment
        .database
        .pool_with(PgPoolOptions::new().max_connections(2))
        .await;
    let caught_up = catch_up(&pool).await;
    let view_problems = match &caught_up {
        Ok(_) => check_read_model(&pool, &traffic).await?,
        Err(error) => vec![format!("{error:#}")],
    };
    let view_agrees = view_problems.is_empty();
    problems.extend(view_problems);
    pool.close().await;

    // SIGTERM stops each process cleanly.
    for service in &mut services {
        match service.terminate().await {
            Ok(status) if status.success() => {}
            Ok(status) => {
                problems.push(format!("{} exited with {status} on SIGTERM", service.name))
            }
            Err(error) => problems.push(format!("{error:#}")),
        }
    }
    let log_lines = services
        .each_ref()
        .map(|service| LogScan::of(&deployment.logs.join(format!("{}.log", service.name))));

    // The report.
    let totals = stats.totals();
    let warmup_totals = warmup.totals();
    let errors = totals.errors + warmup_totals.errors;
    println!(
        "warm-up: {} requests in {:.0} s, {} errors",
        warmup_totals.requests,
        warmup_elapsed.as_secs_f64(),
        warmup_totals.errors
    );
    for (label, failed) in [("warm-up", &warmup), ("measured", &stats)] {
        for failure in failed.failures() {
            println!("{label} error: {failure}");
        }
    }
    println!();
    stats.print_table(elapsed);
    println!();
    print_memory(&services, rest_rss, &lock(&samples), options.seconds);
    println!();
    for (service, scan) in services.iter().zip(&log_lines) {
        scan.print(service.name);
    }
    match caught_up {
        Ok((position, waited)) => println!(
            "read model: caught up {} ms after the traffic stopped, checkpoint = head = {position}; \
             {} accounts and {} granted logins, {}; at most {} messages behind at a scrape",
            waited.as_millis(),
            read(&traffic.accounts).len() + read(&traffic.decoys).len() + 1,
            traffic.granted_logins.load(Ordering::Relaxed),
            if view_agrees {
                "each account in the view once and every login counted"
            } else {
                "the view disagrees (below)"
            },
            traffic.max_lag.load(Ordering::Relaxed)
        ),
        Err(_) => println!("read model: did not catch up"),
    }
    for problem in &problems {
        println!("FAILED: {problem}");
    }
    let passed = errors == 0 && problems.is_empty();
    if !passed || options.keep_logs {
        println!("logs kept in {}", deployment.logs.display());
    }
    let growth = |index: usize| mib(end_rss[index]) - mib(start_rss[index]);
    println!(
        "soak: {:.0} req/s over {:.0} s, {errors} errors{}, RSS growth command-api {:+.1} MiB, \
         query-api {:+.1} MiB, aggregator {:+.1} MiB{}",
        totals.requests as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64(),
        if warmup_totals.errors > 0 {
            format!(" ({} in the warm-up)", warmup_totals.errors)
        } else {
            String::new()
        },
        growth(0),
        growth(1),
        growth(2),
        if problems.is_empty() {
            String::new()
        } else {
            format!(", {} failed checks", problems.len())
        }
    );
    Ok(passed)
}

/// Registers the accounts (and the decoys, a tenth as many) and logs some in, a few at a time.
async fn seed(traffic: &Arc<Traffic>, stats: &Arc<Stats>, accounts: usize) -> anyhow::Result<()> {
    let decoys = (accounts / 10).max(10);
    let sessions = accounts.min(100);
    let next = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (traffic, stats, next) = (traffic.clone(), stats.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let n = usize::try_from(next.fetch_add(1, Ordering::Relaxed))?;
                    if n < accounts {
                        traffic.register(&stats, false).await;
                    } else if n < accounts + decoys {
                        traffic.register(&stats, true).await;
                    } else {
                        break;
                    }
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for worker in workers {
        worker.await??;
    }
    let picked: Vec<Account> = read(&traffic.accounts)
        .iter()
        .take(sessions)
        .cloned()
        .collect();
    let workers: Vec<_> = picked
        .chunks(sessions.div_ceil(8).max(1))
        .map(|chunk| {
            let (traffic, stats, chunk) = (traffic.clone(), stats.clone(), chunk.to_vec());
            tokio::spawn(async move {
                for account in chunk {
                    if let Some((session, _)) = traffic.log_in(&stats, &account).await {
                        traffic.keep(session);
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await?;
    }
    Ok(())
}

/// Runs `concurrency` clients of the mix for `duration`; answers how long it took until the
/// last request in flight finished.
async fn drive(
    traffic: &Arc<Traffic>,
    stats: &Arc<Stats>,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let deadline = started + duration;
    let scraper = traffic.scrape_every.map(|every| {
        let (traffic, stats) = (traffic.clone(), stats.clone());
        tokio::spawn(async move {
            while Instant::now() + every < deadline {
                tokio::time::sleep(every).await;
                traffic.scrape(&stats).await;
            }
        })
    });
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (traffic, stats) = (traffic.clone(), stats.clone());
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    traffic.step(&stats).await;
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await?;
    }
    if let Some(scraper) = scraper {
        scraper.await?;
    }
    Ok(started.elapsed())
}

/// What the traffic knows of the deployment: the accounts it registered, the tokens it got,
/// and how far the read model is known to have come.
struct Traffic {
    client: reqwest::Client,
    command: String,
    query: String,
    /// The aggregator's own port: `/healthz`, `/readyz`, `/metrics`.
    aggregator: String,
    scrape_every: Option<Duration>,
    /// The most messages the aggregator reported behind the store at a scrape.
    max_lag: AtomicU64,
    accounts: RwLock<Vec<Account>>,
    /// Accounts that only ever get wrong passwords (and end up locked).
    decoys: RwLock<Vec<String>>,
    sessions: Mutex<VecDeque<Session>>,
    /// The administrator's token and when it was issued.
    admin: Mutex<Option<(Arc<str>, Instant)>>,
    /// One administrator login at a time when the token needs replacing.
    admin_refresh: tokio::sync::Mutex<()>,
    /// The highest `X-Min-Position` a read was answered for: the read model holds every event
    /// up to it, so an account registered at or below it is readable without waiting.
    confirmed: AtomicU64,
    /// Where the administrator's paging through the accounts is.
    cursor: Mutex<Option<String>>,
    next_email: AtomicU64,
    granted_logins: AtomicU64,
    registrations: Pacer,
    logins: Pacer,
}

#[derive(Clone)]
struct Account {
    id: Uuid,
    email: String,
    /// The global position of the registration.
    position: u64,
}

#[derive(Clone)]
struct Session {
    id: Uuid,
    token: Arc<str>,
    /// The account's registration: the read model must have it before `/users/me` answers.
    position: u64,
    issued: Instant,
}

impl Traffic {
    /// One request of the mix (two for a login: it is followed by the profile it leads to).
    async fn step(&self, stats: &Stats) {
        if self.registrations.take() {
            self.register(stats, false).await;
        } else if self.logins.take() {
            if fastrand::u32(..5) == 0 {
                self.refused_login(stats).await;
            } else {
                self.login_and_read(stats).await;
            }
        } else {
            match fastrand::u32(..100) {
                0..40 => self.read_me(stats).await,
                40..62 => self.read_own_profile(stats).await,
                62..75 => self.read_profile_as_admin(stats).await,
                75..84 => self.read_history(stats).await,
                84..94 => self.find_by_email(stats).await,
                _ => self.page_through(stats).await,
            }
        }
    }

    async fn register(&self, stats: &Stats, decoy: bool) {
        let n = self.next_email.fetch_add(1, Ordering::Relaxed);
        let email = if decoy {
            format!("decoy-{n}@soak.example.com")
        } else {
            format!("user-{n}@soak.example.com")
        };
        let request = self
            .client
            .post(format!("{}/users", self.command))
            .json(&json!({ "email": email, "password": PASSWORD }));
        let registered = stats
            .exchange(Route::Register, request, |headers, body| {
                let id = body["id"].as_str().context("no id")?.parse()?;
                let position = body["position"].as_u64().context("no position")?;
                anyhow::ensure!(
                    x_position(headers) == Some(position),
                    "X-Position is not the body's position"
                );
                Ok((id, position))
            })
            .await;
        if let Some((id, position)) = registered {
            if decoy {
                write(&self.decoys).push(email);
            } else {
                write(&self.accounts).push(Account {
                    id,
                    email,
                    position,
                });
            }
        }
    }

    /// A login with the right password: a session and the login's position.
    async fn log_in(&self, stats: &Stats, account: &Account) -> Option<(Session, u64)> {
        let request = self
            .client
            .post(format!("{}/login", self.command))
            .json(&json!({ "email": account.email, "password": PASSWORD }));
        let (token, position) = stats
            .exchange(Route::Login, request, |headers, body| {
                anyhow::ensure!(body["token_type"] == "Bearer", "token_type is not Bearer");
                let token = body["access_token"].as_str().context("no access_token")?;
                let position = x_position(headers).context("no X-Position")?;
                Ok((Arc::<str>::from(token), position))
            })
            .await?;
        self.granted_logins.fetch_add(1, Ordering::Relaxed);
        let session = Session {
            id: account.id,
            token,
            position: account.position,
            issued: Instant::now(),
        };
        Some((session, position))
    }

    /// A login, then the profile it leads to, read as soon as the read model has the login.
    async fn login_and_read(&self, stats: &Stats) {
        // Often the newest account: a sign-up followed by a first login.
        let account = {
            let accounts = read(&self.accounts);
            let index = if fastrand::u32(..10) < 3 {
                accounts.len().checked_sub(1)
            } else {
                (!accounts.is_empty()).then(|| fastrand::usize(..accounts.len()))
            };
            index.and_then(|index| accounts.get(index).cloned())
        };
        let Some(account) = account else {
            return;
        };
        let Some((session, position)) = self.log_in(stats, &account).await else {
            return;
        };
        self.keep(session.clone());
        let request = self
            .client
            .get(format!("{}/users/me", self.query))
            .bearer_auth(&*session.token)
            .header("x-min-position", position);
        let answered = stats
            .exchange(Route::Me, request, |_, body| {
                anyhow::ensure!(body["id"] == session.id.to_string(), "another account");
                anyhow::ensure!(
                    body["login_count"].as_u64() >= Some(1) && body["last_login_at"].is_string(),
                    "the login is not in the profile"
                );
                Ok(())
            })
            .await;
        if answered.is_some() {
            self.confirmed.fetch_max(position, Ordering::Relaxed);
        }
    }

    /// A wrong password for an account that never gets the right one, or an unknown email.
    async fn refused_login(&self, stats: &Stats) {
        let decoy = {
            let decoys = read(&self.decoys);
            (fastrand::u32(..4) != 0 && !decoys.is_empty())
                .then(|| decoys[fastrand::usize(..decoys.len())].clone())
        };
        let email = decoy.unwrap_or_else(|| {
            format!(
                "nobody-{}@soak.example.com",
                self.next_email.fetch_add(1, Ordering::Relaxed)
            )
        });
        let request = self
            .client
            .post(format!("{}/login", self.command))
            .json(&json!({ "email": email, "password": "not the password" }));
        stats
            .exchange(Route::LoginRefused, request, |_, body| {
                anyhow::ensure!(body["code"] == "invalid_credentials", "another code");
                Ok(())
            })
            .await;
    }

    async fn read_me(&self, stats: &Stats) {
        let Some(session) = self.session() else {
            return self.login_and_read(stats).await;
        };
        let min_position = self.min_position(session.position);
        let request = self
            .with_min_position(
                self.client.get(format!("{}/users/me", self.query)),
                min_position,
            )
            .bearer_auth(&*session.token);
        let answered = stats
            .exchange(Route::Me, request, |_, body| {
                anyhow::ensure!(body["id"] == session.id.to_string(), "another account");
                Ok(())
            })
            .await;
        self.confirm(answered, min_position);
    }

    /// The caller's own profile; one in twenty as it stood a moment ago (`as_of`).
    async fn read_own_profile(&self, stats: &Stats) {
        let Some(session) = self.session() else {
            return self.login_and_read(stats).await;
        };
        let min_position = self.min_position(session.position);
        let mut request = self
            .with_min_position(
                self.client
                    .get(format!("{}/users/{}", self.query, session.id)),
                min_position,
            )
            .bearer_auth(&*session.token);
        if fastrand::u32(..20) == 0 {
            let now = SystemClock
                .now()
                .to_rfc3339_opts(SecondsFormat::Millis, true);
            request = request.query(&[("as_of", now)]);
        }
        let answered = stats
            .exchange(Route::Profile, request, |_, body| {
                anyhow::ensure!(body["id"] == session.id.to_string(), "another account");
                Ok(())
            })
            .await;
        self.confirm(answered, min_position);
    }

    async fn read_profile_as_admin(&self, stats: &Stats) {
        let (Some(account), Some(admin)) = (self.account(), self.admin_token(stats).await) else {
            return;
        };
        let min_position = self.min_position(account.position);
        let request = self
            .with_min_position(
                self.client
                    .get(format!("{}/users/{}", self.query, account.id)),
                min_position,
            )
            .bearer_auth(&*admin);
        let answered = stats
            .exchange(Route::Profile, request, |_, body| {
                anyhow::ensure!(body["id"] == account.id.to_string(), "another account");
                Ok(())
            })
            .await;
        self.confirm(answered, min_position);
    }

    /// The caller's own history, from the message store.
    async fn read_history(&self, stats: &Stats) {
        let Some(session) = self.session() else {
            return self.login_and_read(stats).await;
        };
        let request = self
            .client
            .get(format!("{}/users/{}/events", self.query, session.id))
            .bearer_auth(&*session.token);
        stats
            .exchange(Route::Events, request, |_, body| {
                let items = body["items"].as_array().context("no items")?;
                anyhow::ensure!(!items.is_empty(), "no events");
                Ok(())
            })
            .await;
    }

    async fn find_by_email(&self, stats: &Stats) {
        let (Some(account), Some(admin)) = (self.account(), self.admin_token(stats).await) else {
            return;
        };
        let min_position = self.min_position(account.position);
        let request = self
            .with_min_position(
                self.client.get(format!("{}/users", self.query)),
                min_position,
            )
            .query(&[("email", &account.email)])
            .bearer_auth(&*admin);
        let answered = stats
            .exchange(Route::List, request, |_, body| {
                let items = body["items"].as_array().context("no items")?;
                anyhow::ensure!(
                    items.len() == 1 && items[0]["id"] == account.id.to_string(),
                    "not exactly the account"
                );
                Ok(())
            })
            .await;
        self.confirm(answered, min_position);
    }

    /// The administrator pages through the active accounts, 50 at a time, and starts over.
    async fn page_through(&self, stats: &Stats) {
        let Some(admin) = self.admin_token(stats).await else {
            return;
        };
        let cursor = lock(&self.cursor).clone();
        let mut query = vec![("status", "active".to_owned()), ("limit", "50".to_owned())];
        if let Some(cursor) = &cursor {
            query.push(("cursor", cursor.clone()));
        }
        let request = self
            .client
            .get(format!("{}/users", self.query))
            .query(&query)
            .bearer_auth(&*admin);
        let next = stats
            .exchange(Route::List, request, |_, body| {
                let items = body["items"].as_array().context("no items")?;
                anyhow::ensure!(
                    cursor.is_some() || !items.is_empty(),
                    "the first page is empty"
                );
                Ok(body["next_cursor"].as_str().map(str::to_owned))
            })
            .await;
        if let Some(next) = next {
            *lock(&self.cursor) = next;
        }
    }

    /// What Prometheus does: `/metrics` of each process; the aggregator's says how far the
    /// read model is behind.
    async fn scrape(&self, stats: &Stats) {
        for base in [&self.command, &self.query, &self.aggregator] {
            let request = self.client.get(format!("{base}/metrics"));
            let lag = stats
                .exchange_text(Route::Metrics, request, |text| {
                    anyhow::ensure!(text.contains("# TYPE"), "not the Prometheus text format");
                    Ok(text
                        .lines()
                        .filter(|line| line.starts_with("projection_lag_events"))
                        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
                        .fold(0.0, f64::max))
                })
                .await;
            if let Some(lag) = lag {
                self.max_lag.fetch_max(lag as u64, Ordering::Relaxed);
            }
        }
    }

    fn account(&self) -> Option<Account> {
        let accounts = read(&self.accounts);
        (!accounts.is_empty()).then(|| accounts[fastrand::usize(..accounts.len())].clone())
    }

    /// A session of the recent logins; `None` when there is none young enough.
    fn session(&self) -> Option<Session> {
        let mut sessions = lock(&self.sessions);
        if sessions.is_empty() {
            return None;
        }
        let index = fastrand::usize(..sessions.len());
        if sessions[index].issued.elapsed() > TOKEN_USE {
            sessions.remove(index);
            return None;
        }
        sessions.get(index).cloned()
    }

    fn keep(&self, session: Session) {
        let mut sessions = lock(&self.sessions);
        if sessions.len() >= SESSIONS {
            sessions.pop_front();
        }
        sessions.push_back(session);
    }

    /// The administrator's token, replaced by a new login when it has been used long enough.
    async fn admin_token(&self, stats: &Stats) -> Option<Arc<str>> {
        if let Some(token) = self.fresh_admin_token() {
            return Some(token);
        }
        let _one_at_a_time = self.admin_refresh.lock().await;
        if let Some(token) = self.fresh_admin_token() {
            return Some(token);
        }
        let request = self
            .client
            .post(format!("{}/login", self.command))
            .json(&json!({ "email": ADMIN_EMAIL, "password": ADMIN_PASSWORD }));
        let token = stats
            .exchange(Route::Login, request, |_, body| {
                Ok(Arc::<str>::from(
                    body["access_token"].as_str().context("no access_token")?,
                ))
            })
            .await?;
        self.granted_logins.fetch_add(1, Ordering::Relaxed);
        *lock(&self.admin) = Some((token.clone(), Instant::now()));
        Some(token)
    }

    fn fresh_admin_token(&self) -> Option<Arc<str>> {
        lock(&self.admin)
            .as_ref()
            .filter(|(_, issued)| issued.elapsed() < TOKEN_USE)
            .map(|(token, _)| token.clone())
    }

    /// Whether to send `X-Min-Position`: always when the read model may not hold the account
    /// yet, and one read in ten anyway.
    fn min_position(&self, needed: u64) -> Option<u64> {
        (needed > self.confirmed.load(Ordering::Relaxed) || fastrand::u32(..10) == 0)
            .then_some(needed)
    }

    fn with_min_position(&self, request: RequestBuilder, position: Option<u64>) -> RequestBuilder {
        match position {
            Some(position) => request.header("x-min-position", position),
            None => request,
        }
    }

    fn confirm(&self, answered: Option<()>, min_position: Option<u64>) {
        if let (Some(()), Some(position)) = (answered, min_position) {
            self.confirmed.fetch_max(position, Ordering::Relaxed);
        }
    }
}

/// Lets an operation through at a steady rate, whichever client asks; a backlog of more than a
/// second (the clients were all busy) is dropped rather than caught up in a burst.
struct Pacer {
    interval: Option<Duration>,
    next: Mutex<Instant>,
}

impl Pacer {
    fn new(per_second: f64) -> Self {
        let interval = (per_second > 0.0).then(|| Duration::from_secs_f64(1.0 / per_second));
        Self {
            interval,
            next: Mutex::new(Instant::now()),
        }
    }

    fn take(&self) -> bool {
        let Some(interval) = self.interval else {
            return false;
        };
        let now = Instant::now();
        let mut next = lock(&self.next);
        if now < *next {
            return false;
        }
        if now > *next + Duration::from_secs(1) {
            *next = now;
        }
        *next += interval;
        true
    }
}

/// The rows of the report: a route template and the status every request to it should get.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Route {
    Register,
    Login,
    LoginRefused,
    Me,
    Profile,
    Events,
    List,
    Metrics,
}

impl Route {
    const ALL: [Route; 8] = [
        Route::Register,
        Route::Login,
        Route::LoginRefused,
        Route::Me,
        Route::Profile,
        Route::Events,
        Route::List,
        Route::Metrics,
    ];

    fn name(self) -> &'static str {
        match self {
            Route::Register => "POST /users",
            Route::Login | Route::LoginRefused => "POST /login",
            Route::Me => "GET /users/me",
            Route::Profile => "GET /users/{id}",
            Route::Events => "GET /users/{id}/events",
            Route::List => "GET /users",
            Route::Metrics => "GET /metrics",
        }
    }

    fn expected(self) -> StatusCode {
        match self {
            Route::Register => StatusCode::CREATED,
            Route::LoginRefused => StatusCode::UNAUTHORIZED,
            _ => StatusCode::OK,
        }
    }
}

/// Counts and latencies per route, and what went wrong.
struct Stats {
    started: Instant,
    routes: Vec<Mutex<RouteStats>>,
    /// By route and kind of failure: how many, when the first was, and what it looked like.
    failures: Mutex<BTreeMap<(Route, String), Failure>>,
}

struct RouteStats {
    requests: u64,
    errors: u64,
    throttled: u64,
    /// Microseconds, request sent to body read.
    latencies: Histogram<u64>,
}

struct Failure {
    count: u64,
    first_at: Duration,
    example: String,
}

#[derive(Default)]
struct Totals {
    requests: u64,
    errors: u64,
    throttled: u64,
}

impl Stats {
    fn new() -> anyhow::Result<Self> {
        let routes = Route::ALL
            .iter()
            .map(|_| {
                Ok(Mutex::new(RouteStats {
                    requests: 0,
                    errors: 0,
                    throttled: 0,
                    latencies: Histogram::new_with_bounds(1, 60_000_000, 3)?,
                }))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self {
            started: Instant::now(),
            routes,
            failures: Mutex::default(),
        })
    }

    /// Sends `request` and records the answer: one with the route's status whose JSON body
    /// `check` accepts is a success, anything else an error.
    async fn exchange<T>(
        &self,
        route: Route,
        request: RequestBuilder,
        check: impl FnOnce(&HeaderMap, &Value) -> anyhow::Result<T>,
    ) -> Option<T> {
        self.exchange_bytes(route, request, |headers, body| {
            check(headers, &serde_json::from_slice(body)?)
        })
        .await
    }

    /// [`Stats::exchange`] for a text body.
    async fn exchange_text<T>(
        &self,
        route: Route,
        request: RequestBuilder,
        check: impl FnOnce(&str) -> anyhow::Result<T>,
    ) -> Option<T> {
        self.exchange_bytes(route, request, |_, body| check(std::str::from_utf8(body)?))
            .await
    }

    async fn exchange_bytes<T>(
        &self,
        route: Route,
        request: RequestBuilder,
        check: impl FnOnce(&HeaderMap, &[u8]) -> anyhow::Result<T>,
    ) -> Option<T> {
        let started = Instant::now();
        let answer = async {
            let response = request.send().await?;
            let status = response.status();
            let headers = response.headers().clone();
            let body = response.bytes().await?;
            Ok::<_, reqwest::Error>((status, headers, body))
        }
        .await;
        let elapsed = started.elapsed();
        let outcome = match answer {
            Err(error) => Err(("transport error".to_owned(), error_chain(&error))),
            Ok((status, _, body)) if status != route.expected() => {
                Err((format!("status {}", status.as_u16()), excerpt(&body)))
            }
            Ok((_, headers, body)) => check(&headers, &body).map_err(|error| {
                (
                    "unexpected body".to_owned(),
                    format!("{error:#}: {}", excerpt(&body)),
                )
            }),
        };
        if let Some(row) = self.routes.get(route as usize) {
            let mut row = lock(row);
            row.requests += 1;
            row.latencies
                .saturating_record(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX));
            if let Err((kind, _)) = &outcome {
                row.errors += 1;
                if kind == "status 429" {
                    row.throttled += 1;
                }
            }
        }
        match outcome {
            Ok(value) => Some(value),
            Err((kind, example)) => {
                let at = self.started.elapsed();
                lock(&self.failures)
                    .entry((route, kind))
                    .or_insert(Failure {
                        count: 0,
                        first_at: at,
                        example,
                    })
                    .count += 1;
                None
            }
        }
    }

    fn totals(&self) -> Totals {
        self.routes
            .iter()
            .fold(Totals::default(), |mut totals, row| {
                let row = lock(row);
                totals.requests += row.requests;
                totals.errors += row.errors;
                totals.throttled += row.throttled;
                totals
            })
    }

    fn failures(&self) -> Vec<String> {
        lock(&self.failures)
            .iter()
            .map(|((route, kind), failure)| {
                format!(
                    "{} (expecting {}): {kind} x{}, first after {:.1} s: {}",
                    route.name(),
                    route.expected().as_u16(),
                    failure.count,
                    failure.first_at.as_secs_f64(),
                    failure.example
                )
            })
            .collect()
    }

    fn print_table(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        println!(
            "{:<24} {:>6} {:>9} {:>8} {:>7} {:>5} {:>8} {:>8}",
            "route", "expect", "requests", "req/s", "errors", "429", "p50 ms", "p99 ms"
        );
        let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).ok();
        for (route, row) in Route::ALL.iter().zip(&self.routes) {
            let row = lock(row);
            if let Some(all) = all.as_mut() {
                let _ = all.add(&row.latencies);
            }
            println!(
                "{:<24} {:>6} {:>9} {:>8.1} {:>7} {:>5} {:>8.2} {:>8.2}",
                route.name(),
                route.expected().as_u16(),
                row.requests,
                row.requests as f64 / seconds,
                row.errors,
                row.throttled,
                millis(row.latencies.value_at_quantile(0.5)),
                millis(row.latencies.value_at_quantile(0.99)),
            );
        }
        let totals = self.totals();
        let (p50, p99) = all.map_or((0, 0), |all| {
            (all.value_at_quantile(0.5), all.value_at_quantile(0.99))
        });
        println!(
            "{:<24} {:>6} {:>9} {:>8.1} {:>7} {:>5} {:>8.2} {:>8.2}",
            "all",
            "",
            totals.requests,
            totals.requests as f64 / seconds,
            totals.errors,
            totals.throttled,
            millis(p50),
            millis(p99),
        );
    }
}

fn millis(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

fn x_position(headers: &HeaderMap) -> Option<u64> {
    headers.get("x-position")?.to_str().ok()?.parse().ok()
}

/// The start of a body, for the report of a failure.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut excerpt: String = text.chars().take(300).collect();
    if text.chars().nth(300).is_some() {
        excerpt.push_str("...");
    }
    excerpt
}

/// An error with its causes: reqwest's own message rarely says what failed underneath.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

/// The resident memory of the three processes, in kB.
fn rss(pids: [u32; 3]) -> anyhow::Result<[u64; 3]> {
    let [a, b, c] = pids;
    Ok([
        proc_status_kib(a, "VmRSS")?,
        proc_status_kib(b, "VmRSS")?,
        proc_status_kib(c, "VmRSS")?,
    ])
}

/// Resident memory per process: at rest before any traffic, at the start and the end of the
/// measured run, its peak, and its course over the run in sixths.
fn print_memory(
    services: &[Service; 3],
    rest: [u64; 3],
    samples: &[(Duration, [u64; 3])],
    seconds: u64,
) {
    let step = Duration::from_secs_f64(seconds as f64 / 6.0);
    println!(
        "{:<12} {:>8} {:>8} {:>8} {:>8} {:>8}   RSS every {:.0} s (MiB)",
        "RSS (MiB)",
        "at rest",
        "start",
        "end",
        "peak",
        "growth",
        step.as_secs_f64()
    );
    for (index, service) in services.iter().enumerate() {
        let at = |sample: &(Duration, [u64; 3])| sample.1[index];
        let start = samples.first().map_or(0, at);
        let end = samples.last().map_or(0, at);
        let peak = samples.iter().map(at).max().unwrap_or(0);
        let course: Vec<String> = (0..=6)
            .filter_map(|sixth| {
                let wanted = step * sixth;
                samples
                    .iter()
                    .min_by_key(|(when, _)| when.abs_diff(wanted))
                    .map(|sample| format!("{:.1}", mib(at(sample))))
            })
            .collect();
        println!(
            "{:<12} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>+8.1}   {}",
            service.name,
            mib(rest[index]),
            mib(start),
            mib(end),
            mib(peak),
            mib(end) - mib(start),
            course.join(" ")
        );
    }
}

/// Waits until the aggregator's checkpoint has reached the last message in the store; answers
/// that position and how long it took.
async fn catch_up(pool: &PgPool) -> anyhow::Result<(u64, Duration)> {
    let started = Instant::now();
    loop {
        let head: i64 =
            sqlx::query_scalar("SELECT coalesce(max(global_position), 0) FROM messages")
                .fetch_one(pool)
                .await?;
        let checkpoint: Option<i64> = sqlx::query_scalar(
            "SELECT position FROM projection_checkpoints WHERE projection = 'users'",
        )
        .fetch_optional(pool)
        .await?;
        let checkpoint = checkpoint.unwrap_or(0);
        if checkpoint >= head {
            return Ok((u64::try_from(head)?, started.elapsed()));
        }
        anyhow::ensure!(
            started.elapsed() < CATCH_UP,
            "the aggregator's checkpoint {checkpoint} is still behind the store's head {head} \
             {} s after the traffic stopped",
            CATCH_UP.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the read model must hold once caught up: every account registered, once, and every
/// granted login counted.
async fn check_read_model(pool: &PgPool, traffic: &Traffic) -> anyhow::Result<Vec<String>> {
    let mut problems = Vec::new();
    let ids: Vec<Uuid> = read(&traffic.accounts)
        .iter()
        .map(|account| account.id)
        .collect();
    let distinct: HashSet<Uuid> = ids.iter().copied().collect();
    if distinct.len() != ids.len() {
        problems.push(format!(
            "the command API gave out {} ids for {} registrations",
            distinct.len(),
            ids.len()
        ));
    }
    let (rows, emails, found, logins, inactive): (i64, i64, i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT email_normalized), \
                count(*) FILTER (WHERE id = ANY($1)), coalesce(sum(login_count), 0)::bigint, \
                count(*) FILTER (WHERE status <> 'active') \
         FROM users",
    )
    .bind(&ids)
    .fetch_one(pool)
    .await
    .context("reading the users view")?;
    let registered = ids.len() + read(&traffic.decoys).len() + 1;
    if usize::try_from(rows)? != registered {
        problems.push(format!(
            "the users view has {rows} rows for {registered} registered accounts \
             (the administrator included)"
        ));
    }
    if emails != rows {
        problems.push(format!(
            "the users view has {rows} rows but {emails} distinct emails"
        ));
    }
    if usize::try_from(found)? != distinct.len() {
        problems.push(format!(
            "the users view holds {found} of the {} accounts registered with the right password",
            distinct.len()
        ));
    }
    let granted = traffic.granted_logins.load(Ordering::Relaxed);
    if u64::try_from(logins)? != granted {
        problems.push(format!(
            "the users view counts {logins} logins; {granted} were granted"
        ));
    }
    if inactive != 0 {
        problems.push(format!("{inactive} accounts are not active in the view"));
    }
    Ok(problems)
}

/// One deployment: its database, its signing key (as a Secret would give it) and the
/// directory its processes log into.
struct Deployment {
    binaries: PathBuf,
    database: TestDatabase,
    signing_key: String,
    logs: PathBuf,
    log_filter: String,
}

impl Deployment {
    async fn new(binaries: PathBuf, options: &Options) -> anyhow::Result<Self> {
        let logs = std::env::temp_dir().join(format!("identity-soak-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
        Ok(Self {
            binaries,
            database: TestDatabase::new().await,
            signing_key: SigningKey::generate(Algorithm::EdDSA)?
                .to_pem()?
                .expose_secret()
                .clone(),
            logs,
            log_filter: options.log_filter.clone(),
        })
    }

    /// The binary with this deployment's settings and none of this shell's, its output (logs
    /// are on stdout) in `<label>.log`.
    fn command(&self, binary: &str, label: &str) -> anyhow::Result<Command> {
        let mut command = Command::new(self.binaries.join(binary));
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("IDENTITY") {
                command.env_remove(name);
            }
        }
        let path = self.logs.join(format!("{label}.log"));
        let log = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        command
            .env_remove("RUST_LOG")
            .env("IDENTITY__DATABASE__URL", self.database.url())
            .env("IDENTITY__TOKENS__SIGNING_KEY", &self.signing_key)
            .env("IDENTITY__LOG__FILTER", &self.log_filter)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        Ok(command)
    }

    /// Runs an operator's command to its end, `input` on its stdin; answers its output.
    async fn run(
        &self,
        binary: &str,
        args: &[&str],
        input: Option<&str>,
    ) -> anyhow::Result<String> {
        let label = format!("{binary}-{}", args.join("-"));
        let mut command = self.command(binary, &label)?;
        command.args(args);
        if input.is_some() {
            command.stdin(Stdio::piped());
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {binary} {}", args.join(" ")))?;
        if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
            writeln!(stdin, "{input}")?;
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!("{binary} {} did not finish within 120 s", args.join(" "));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let path = self.logs.join(format!("{label}.log"));
        let output = std::fs::read_to_string(&path).unwrap_or_default();
        anyhow::ensure!(
            status.success(),
            "{binary} {} failed ({status}): see {}",
            args.join(" "),
            path.display()
        );
        Ok(output)
    }

    fn start(&self, name: &'static str, (key, value): (&str, String)) -> anyhow::Result<Service> {
        let child = self
            .command(name, name)?
            .env(key, value)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Service { name, child })
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A running binary, killed if the soak ends without stopping it.
struct Service {
    name: &'static str,
    child: Child,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Service {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            anyhow::bail!("{} exited during the run: {status}", self.name);
        }
        Ok(())
    }

    async fn wait_until_healthy(
        &mut self,
        client: &reqwest::Client,
        port: u16,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!("{} exited before it served /healthz: {status}", self.name);
            }
            let answer = client
                .get(format!("http://127.0.0.1:{port}/healthz"))
                .send()
                .await;
            if answer.is_ok_and(|response| response.status() == StatusCode::OK) {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} did not serve /healthz within 30 s",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends SIGTERM and waits for the process to exit by itself.
    async fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        let signalled = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()?;
        anyhow::ensure!(signalled.success(), "kill -TERM {} failed", self.name);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} did not stop within 20 s of SIGTERM",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The log lines of a process at WARN and ERROR, with the first few of them.
struct LogScan {
    lines: u64,
    warnings: u64,
    errors: u64,
    first: Vec<String>,
}

impl LogScan {
    fn of(path: &Path) -> Self {
        let mut scan = LogScan {
            lines: 0,
            warnings: 0,
            errors: 0,
            first: Vec::new(),
        };
        let Ok(file) = File::open(path) else {
            return scan;
        };
        for line in BufReader::new(file).lines().map_while(Result::ok) {
            scan.lines += 1;
            let level = if line.contains(r#""level":"ERROR""#) {
                &mut scan.errors
            } else if line.contains(r#""level":"WARN""#) {
                &mut scan.warnings
            } else {
                continue;
            };
            *level += 1;
            if scan.first.len() < 3 {
                scan.first.push(line.chars().take(400).collect());
            }
        }
        scan
    }

    fn print(&self, name: &str) {
        println!(
            "{name} log: {} lines, {} at WARN, {} at ERROR",
            self.lines, self.warnings, self.errors
        );
        for line in &self.first {
            println!("  {line}");
        }
    }
}
