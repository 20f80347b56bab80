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
mod locks;
mod logs;
mod memory;
mod routes;
mod scenario;
mod stats;
mod traffic;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::postgres::PgPoolOptions;
use test_support::process::built_binary;
use test_support::{ALL_SERVICES, Deployment, Process, TestDatabase};

use crate::report::mib;
use checks::{catch_up, check_read_model};
use locks::{lock, read};
use logs::LogScan;
use memory::{print_memory, rss};
use scenario::{ADMIN_EMAIL, ADMIN_PASSWORD, SAMPLE_EVERY};
use stats::Stats;
use traffic::{Account, Traffic};

pub use scenario::Options;

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
    for name in ALL_SERVICES {
        let binary = built_binary(name)?;
        anyhow::ensure!(
            binary.is_file(),
            "{} is missing: `scripts/soak` builds it (or `cargo build --release -p {name}` with \
             the same target directory)",
            binary.display()
        );
    }
    let database = TestDatabase::new().await;
    let deployment = Deployment::new("identity-soak", database.url())?
        .with_setting("IDENTITY__LOG__FILTER", &options.log_filter);
    println!(
        "database {}; the processes' logs are in {}",
        database.name(),
        deployment.logs.display()
    );
    let outcome = soak_deployment(&deployment, &database, &options).await;
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

async fn soak_deployment(
    deployment: &Deployment,
    database: &TestDatabase,
    options: &Options,
) -> anyhow::Result<bool> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    // The migration Job, then the Deployments.
    let mut services = deployment
        .start_services(&client, &ALL_SERVICES, &[])
        .await?;
    let rest_rss = rss(&pids(&services.processes))?;
    // The first administrator, created by an operator, for the reads of other accounts.
    deployment
        .run(
            "command-api",
            &["admin", "create", "--email", ADMIN_EMAIL],
            Some(ADMIN_PASSWORD),
        )
        .await?;
    let traffic = Arc::new(Traffic::new(client, &services, options));
    seed_and_report(&traffic, options.accounts).await?;

    let warmup = Arc::new(Stats::new()?);
    let warmup_elapsed = drive(
        &traffic,
        &warmup,
        options.concurrency,
        Duration::from_secs(options.warmup),
    )
    .await?;
    for process in &mut services.processes {
        process.ensure_running()?;
    }
    let measured = measure(&traffic, &mut services.processes, options).await?;
    let view = ViewCheck::of(database, &traffic).await?;
    // SIGTERM stops each process cleanly.
    let mut stopped = Vec::new();
    for process in &mut services.processes {
        if let Err(error) = process.shut_down().await {
            stopped.push(format!("{error:#}"));
        }
    }
    let report = Report {
        options,
        deployment,
        services: &services.processes,
        traffic: &traffic,
        rest_rss,
        warmup: &warmup,
        warmup_elapsed,
        measured,
        view,
        stopped,
    };
    Ok(report.print())
}

fn pids(processes: &[Process]) -> Vec<u32> {
    processes.iter().map(Process::id).collect()
}

/// The measured run: its requests, and the resident memory of each process sampled throughout.
struct Measured {
    stats: Arc<Stats>,
    elapsed: Duration,
    /// Since the start, kB per process.
    samples: Vec<(Duration, Vec<u64>)>,
    start_rss: Vec<u64>,
    end_rss: Vec<u64>,
    /// The processes that did not last the run.
    exited: Vec<String>,
}

async fn measure(
    traffic: &Arc<Traffic>,
    processes: &mut [Process],
    options: &Options,
) -> anyhow::Result<Measured> {
    let pids = pids(processes);
    let start_rss = rss(&pids)?;
    let samples = Arc::new(Mutex::new(vec![(Duration::ZERO, start_rss.clone())]));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (samples, sampling, pids) = (samples.clone(), sampling.clone(), pids.clone());
        let started = Instant::now();
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                tokio::time::sleep(SAMPLE_EVERY).await;
                match rss(&pids) {
                    Ok(now) => lock(&samples).push((started.elapsed(), now)),
                    Err(_) => break,
                }
            }
        })
    };
    let stats = Arc::new(Stats::new()?);
    let elapsed = drive(
        traffic,
        &stats,
        options.concurrency,
        Duration::from_secs(options.seconds),
    )
    .await?;
    sampling.store(false, Ordering::Relaxed);
    sampler.await?;
    let exited = processes
        .iter_mut()
        .filter_map(|process| process.ensure_running().err())
        .map(|error| format!("during the run, {error:#}"))
        .collect();
    let end_rss = rss(&pids).unwrap_or_else(|_| vec![0; pids.len()]);
    let mut samples = std::mem::take(&mut *lock(&samples));
    samples.push((elapsed, end_rss.clone()));
    Ok(Measured {
        stats,
        elapsed,
        samples,
        start_rss,
        end_rss,
        exited,
    })
}

/// Whether the read model caught up with everything the traffic wrote, and holds it.
struct ViewCheck {
    /// The position caught up to, and how long it took after the traffic stopped.
    caught_up: anyhow::Result<(u64, Duration)>,
    problems: Vec<String>,
}

impl ViewCheck {
    async fn of(database: &TestDatabase, traffic: &Traffic) -> anyhow::Result<Self> {
        let pool = database
            .pool_with(PgPoolOptions::new().max_connections(2))
            .await;
        let caught_up = catch_up(&pool).await;
        let problems = match &caught_up {
            Ok(_) => check_read_model(&pool, traffic).await?,
            Err(error) => vec![format!("{error:#}")],
        };
        pool.close().await;
        Ok(Self {
            caught_up,
            problems,
        })
    }
}

/// Everything the run found, printed at its end.
struct Report<'a> {
    options: &'a Options,
    deployment: &'a Deployment,
    services: &'a [Process],
    traffic: &'a Traffic,
    /// Resident memory before any traffic, kB per process.
    rest_rss: Vec<u64>,
    warmup: &'a Stats,
    warmup_elapsed: Duration,
    measured: Measured,
    view: ViewCheck,
    /// The processes that did not stop cleanly on SIGTERM.
    stopped: Vec<String>,
}

impl Report<'_> {
    /// Prints the report, the summary last; whether the run passed.
    fn print(self) -> bool {
        let Measured { stats, elapsed, .. } = &self.measured;
        let warmup_totals = self.warmup.totals();
        println!(
            "warm-up: {} requests in {:.0} s, {} errors",
            warmup_totals.requests,
            self.warmup_elapsed.as_secs_f64(),
            warmup_totals.errors
        );
        for (label, failed) in [("warm-up", self.warmup), ("measured", &**stats)] {
            for failure in failed.failures() {
                println!("{label} error: {failure}");
            }
        }
        println!();
        stats.print_table(*elapsed);
        println!();
        print_memory(
            self.services,
            &self.rest_rss,
            &self.measured.samples,
            self.options.seconds,
        );
        println!();
        for process in self.services {
            LogScan::of(&self.deployment.log(process.name())).print(process.name());
        }
        self.print_view();
        let problems: Vec<&String> = self
            .measured
            .exited
            .iter()
            .chain(&self.view.problems)
            .chain(&self.stopped)
            .collect();
        for problem in &problems {
            println!("FAILED: {problem}");
        }
        let errors = stats.totals().errors + warmup_totals.errors;
        let passed = errors == 0 && problems.is_empty();
        if !passed || self.options.keep_logs {
            println!("logs kept in {}", self.deployment.logs.display());
        }
        self.print_summary(errors, problems.len());
        passed
    }

    fn print_view(&self) {
        let traffic = self.traffic;
        match &self.view.caught_up {
            Ok((position, waited)) => println!(
                "read model: caught up {} ms after the traffic stopped, checkpoint = head = \
                 {position}; {} accounts and {} granted logins, {}; at most {} messages behind \
                 at a scrape",
                waited.as_millis(),
                read(&traffic.accounts).len() + read(&traffic.decoys).len() + 1,
                traffic.granted_logins.load(Ordering::Relaxed),
                if self.view.problems.is_empty() {
                    "each account in the view once and every login counted"
                } else {
                    "the view disagrees (below)"
                },
                traffic.max_lag.load(Ordering::Relaxed)
            ),
            Err(_) => println!("read model: did not catch up"),
        }
    }

    /// The one line the run ends with.
    fn print_summary(&self, errors: u64, failed_checks: usize) {
        let Measured {
            stats,
            elapsed,
            start_rss,
            end_rss,
            ..
        } = &self.measured;
        let warmup_errors = self.warmup.totals().errors;
        let growth = |index: usize| mib(end_rss[index]) - mib(start_rss[index]);
        println!(
            "soak: {:.0} req/s over {:.0} s, {errors} errors{}, RSS growth command-api {:+.1} MiB, \
             query-api {:+.1} MiB, aggregator {:+.1} MiB{}",
            stats.totals().requests as f64 / elapsed.as_secs_f64(),
            elapsed.as_secs_f64(),
            if warmup_errors > 0 {
                format!(" ({warmup_errors} in the warm-up)")
            } else {
                String::new()
            },
            growth(0),
            growth(1),
            growth(2),
            if failed_checks == 0 {
                String::new()
            } else {
                format!(", {failed_checks} failed checks")
            }
        );
    }
}

/// Seeds the accounts and sessions the traffic uses, and says how many.
async fn seed_and_report(traffic: &Arc<Traffic>, accounts: usize) -> anyhow::Result<()> {
    let setup = Arc::new(Stats::new()?);
    let seeding = Instant::now();
    traffic.admin_token(&setup).await;
    seed(traffic, &setup, accounts).await?;
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
    Ok(())
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
