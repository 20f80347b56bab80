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

mod checks;
mod deployment;
mod logs;
mod memory;
mod stats;
mod traffic;

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
use checks::{catch_up, check_read_model};
use deployment::{Deployment, Service, free_port};
use logs::LogScan;
use memory::{print_memory, rss};
use stats::{Stats, lock, read, write, x_position};
use traffic::{Account, Pacer, Route, Traffic};

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
