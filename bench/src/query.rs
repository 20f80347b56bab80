//! `query`: `GET /users/{id}` over HTTP, served by the query API in a process of its own, against
//! the same lookup as a plain prepared SELECT through a pool of as many connections as the query
//! API gives its read model (the limit), across a read model of 100,000 users. Also the p99 of
//! the requests and the query API's peak resident memory.
//!
//! Two query APIs run side by side and are measured in the same rounds, on the same ids and
//! tokens, each against the same baseline: one with `query.cache_profiles = 0`, so that every
//! request reads its row (and the view's checkpoint) from PostgreSQL, the same work as the
//! baseline plus HTTP, and one with the kept profiles of ADR 6, which answers from memory and so
//! does less database work than the baseline. Only the first is a like-for-like comparison: a
//! ratio above 1.0 there means the baseline is wrong, and the run fails saying so.
//!
//! Before the rounds each process sees every token once (a client keeps its token for its
//! lifetime, so a signature check is rare, not one per few requests) and the kept-profiles
//! process has read the rows once.
//!
//! The query API is the release binary next to this one (`cargo build --release -p query-api`),
//! or the one `--query-api` names (to compare two builds under the same benchmark).

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, TimeDelta, Utc};
use hdrhistogram::Histogram;
use identity::{
    AccountStatus, EVENT_VERSION_KEY, Email, PasswordHash, RefreshNonce, Role, SessionEvent,
    SessionId, SessionPolicy, SessionStarted, UserAgent, UserEvent, UserId, UserRegistered,
    session_stream_name, user_stream_name,
};
use message_store::{
    ExpectedVersion, MessageStore, NewMessage, PostgresMessageStore, StreamAppend, StreamName,
};
use personal_data::{MasterKey, MasterKeys, Sealer};
use platform::clock::{Clock, SystemClock};
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use test_support::process::{built_binary, free_port, proc_status_kib};
use test_support::{Launch, Process, TestDatabase};
use tokens::{Algorithm, KeySet, SigningKey, TokenConfig, TokenIssuer};
use uuid::Uuid;

use crate::report::{median, mib, rate};
use crate::setup::expect_json;

#[derive(clap::Args)]
pub struct Options {
    /// Concurrent clients, the same number for the requests and for the SELECTs.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Users in the read model.
    #[arg(long, default_value_t = 100_000)]
    users: u32,
    /// Connections to the read model, for the query API and the baseline's pool alike (the
    /// query API's default).
    #[arg(long, default_value_t = 16)]
    connections: u32,
    /// Profiles the second query API keeps in memory (`query.cache_profiles`, ADR 6); the
    /// first always keeps none, so that every request reads its row from PostgreSQL.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    cache_profiles: u64,
    /// `query.max_view_lag_ms` for both query APIs (their default unless given): 0 makes every
    /// request read the caller's account stream in the message store.
    #[arg(long)]
    max_view_lag_ms: Option<u64>,
    /// Seconds per measurement; each round measures the baseline, then each query API.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Who reads: `owner`, each request a user reading their own profile with their own token
    /// (the common case: one row), or `admin`, an administrator reading random users (the
    /// query API then also checks the administrator's account stream in the message store, as
    /// it checks every administrator acting on others, at most once per `max_view_lag_ms`).
    #[arg(long, value_enum, default_value_t = Reader::Owner)]
    reader: Reader,
    /// The query API binary to measure (default: `query-api` next to this executable).
    #[arg(long)]
    query_api: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Reader {
    Owner,
    Admin,
}

/// Users whose profiles the requests read (with their own tokens, or the administrator's),
/// drawn at random from the seeded ones; the baseline reads the same ones.
const READ: usize = 5_000;

/// Who reads which profile, with which token.
type Readers = Arc<Vec<(Uuid, Arc<String>)>>;

/// Tokens are issued again, and shown to each process once more, when this old (their default
/// lifetime is 15 minutes).
const REISSUE_AFTER: Duration = Duration::from_secs(600);

/// The columns the query API reads for a profile, in its order.
const SELECT_PROFILE: &str = "SELECT id, email, status, registered_at, activated_at, \
                              deactivated_at, last_login_at, login_count, roles \
                              FROM users WHERE id = $1";

/// A profile row, decoded as the query API decodes it.
type ProfileRow = (
    Uuid,
    String,
    String,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
    i64,
    Vec<String>,
);

/// One latency histogram (microseconds) per client, so that clients do not contend for it.
struct Latencies(Vec<Mutex<Histogram<u64>>>);

impl Latencies {
    fn new(clients: usize) -> anyhow::Result<Self> {
        let histograms = (0..clients)
            .map(|_| Ok(Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3)?)))
            .collect::<anyhow::Result<_>>()?;
        Ok(Self(histograms))
    }

    fn record(&self, client: usize, elapsed: Duration) {
        if let Some(histogram) = self.0.get(client) {
            let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
            histogram
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .saturating_record(micros);
        }
    }

    fn p99_ms(&self) -> anyhow::Result<f64> {
        let mut total = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        for histogram in &self.0 {
            total.add(&*histogram.lock().unwrap_or_else(PoisonError::into_inner))?;
        }
        Ok(total.value_at_quantile(0.99) as f64 / 1000.0)
    }
}

/// Appends the registration of an active administrator `id` to the message store, as the
/// command API writes it (its personal fields sealed), and returns its global position.
async fn register_administrator(pool: &PgPool, sealer: &Sealer, id: Uuid) -> anyhow::Result<u64> {
    let store = PostgresMessageStore::new(pool.clone(), Duration::from_secs(1));
    let email = Email::parse("Admin@example.com")?;
    let event = UserEvent::UserRegistered(UserRegistered {
        user_id: UserId::from_uuid(id),
        email_normalized: email.normalized().to_owned().into(),
        email: email.into(),
        // Nobody logs in with it: the benchmark issues the tokens itself.
        password_hash: PasswordHash::parse(
            "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
        )?
        .into(),
        status: AccountStatus::Active,
        roles: vec![Role::User, Role::Admin],
        registered_at: SystemClock.now(),
    });
    let mut data = event.to_json();
    sealer.seal(id, event.personal_fields(), &mut data).await?;
    let message = NewMessage::new(event.event_type(), data)
        .with_metadata(json!({ EVENT_VERSION_KEY: event.version() }));
    let appended = store
        .append(vec![StreamAppend::new(
            StreamName::parse(user_stream_name(UserId::from_uuid(id)))?,
            ExpectedVersion::NoStream,
            vec![message],
        )])
        .await
        .context("registering the administrator in the message store")?;
    Ok(appended.last_global_position())
}

/// CPU time, in clock ticks (10 ms), spent by each party to a lookup: this process (the
/// client), the query API, and the PostgreSQL backends serving this benchmark's database (found
/// when the server runs on this machine; other sessions on a shared server are left out).
#[derive(Clone, Copy, Default)]
struct Cpu {
    client: u64,
    query_api: u64,
    postgres: u64,
}

/// The CPU ticks of each party at one instant.
struct CpuSnapshot {
    client: u64,
    query_api: u64,
    backends: HashMap<i32, u64>,
}

impl CpuSnapshot {
    async fn take(query_api: u32, pool: &PgPool) -> anyhow::Result<Self> {
        let ticks = |pid: &str| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| process_ticks(&stat))
        };
        let pids: Vec<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()",
        )
        .fetch_all(pool)
        .await?;
        let backends = pids
            .into_iter()
            .filter_map(|pid| Some((pid, ticks(&pid.to_string())?)))
            .collect();
        Ok(Self {
            client: ticks("self").unwrap_or(0),
            query_api: ticks(&query_api.to_string()).unwrap_or(0),
            backends,
        })
    }
}

impl Cpu {
    /// Adds what was spent between `before` and `after` (a backend started since counts whole).
    fn add(&mut self, before: &CpuSnapshot, after: &CpuSnapshot) {
        self.client += after.client.saturating_sub(before.client);
        self.query_api += after.query_api.saturating_sub(before.query_api);
        self.postgres += after
            .backends
            .iter()
            .map(|(pid, ticks)| {
                ticks.saturating_sub(before.backends.get(pid).copied().unwrap_or(0))
            })
            .sum::<u64>();
    }
}

/// The user plus system time of a `/proc/<pid>/stat` line.
fn process_ticks(stat: &str) -> Option<u64> {
    // After the command in parentheses: state, 10 more fields, then utime and stime.
    let mut fields = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(user + system)
}

/// Microseconds of CPU per operation.
fn micros_each(ticks: u64, operations: u64) -> f64 {
    ticks as f64 * 10_000.0 / operations.max(1) as f64
}

/// What one party's lookups measured over the rounds: the baseline's, or a query API's.
struct Figures {
    rates: Vec<f64>,
    latencies: Arc<Latencies>,
    count: Arc<AtomicU64>,
    cpu: Cpu,
}

impl Figures {
    fn new(clients: usize) -> anyhow::Result<Self> {
        Ok(Self {
            rates: Vec::new(),
            latencies: Arc::new(Latencies::new(clients)?),
            count: Arc::new(AtomicU64::new(0)),
            cpu: Cpu::default(),
        })
    }

    /// One round: `clients` copies of `lookup` for `duration`, each timed and counted. Records
    /// and answers the rate, and records the CPU each party spent, the process `query_api`
    /// being the query API.
    async fn round<F, Fut>(
        &mut self,
        clients: usize,
        duration: Duration,
        (query_api, pool): (u32, &PgPool),
        lookup: F,
    ) -> anyhow::Result<f64>
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send,
    {
        let (latencies, count) = (self.latencies.clone(), self.count.clone());
        let before = CpuSnapshot::take(query_api, pool).await?;
        let per_second = rate(clients, duration, move |client, _| {
            let (latencies, count) = (latencies.clone(), count.clone());
            let lookup = lookup();
            async move {
                let started = Instant::now();
                lookup.await?;
                latencies.record(client, started.elapsed());
                count.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        })
        .await;
        self.cpu
            .add(&before, &CpuSnapshot::take(query_api, pool).await?);
        let per_second = per_second?;
        self.rates.push(per_second);
        Ok(per_second)
    }
}

/// The keys the query APIs are given: the one that verifies tokens, in PEM, and the master key
/// that opens personal fields (ADR 13), in hexadecimal.
struct ServiceKeys {
    signing_pem: String,
    master_key: String,
}

/// One of the query APIs under measurement, and what its requests measured.
struct Measured {
    /// How it serves, for the result lines.
    label: &'static str,
    process: Process,
    base: String,
    figures: Figures,
    peak_rss: Arc<AtomicU64>,
}

impl Measured {
    /// Starts the query API with its default settings (its log filter included: its logs are
    /// written, to nowhere, as a deployment writes them) but for the database, the address, the
    /// key, the connections and `cache_profiles`, and waits until it serves.
    async fn start(
        label: &'static str,
        binary: &Path,
        database: &TestDatabase,
        keys: &ServiceKeys,
        options: &Options,
        cache_profiles: u64,
        http: &reqwest::Client,
    ) -> anyhow::Result<Self> {
        let port = free_port()?;
        let mut launch = Launch::new("query-api", binary)
            .env("IDENTITY__DATABASE__URL", database.url())
            .env(
                "IDENTITY__DATABASE__MAX_CONNECTIONS",
                options.connections.to_string(),
            )
            .env("IDENTITY__HTTP__ADDRESS", format!("127.0.0.1:{port}"))
            .env("IDENTITY__TOKENS__SIGNING_KEY", &keys.signing_pem)
            .env("IDENTITY__PERSONAL_DATA__MASTER_KEY", &keys.master_key)
            .env(
                "IDENTITY__QUERY__CACHE_PROFILES",
                cache_profiles.to_string(),
            )
            .discard_logs();
        if let Some(lag) = options.max_view_lag_ms {
            launch = launch.env("IDENTITY__QUERY__MAX_VIEW_LAG_MS", lag.to_string());
        }
        let mut process = launch.spawn()?;
        process.wait_until_serves(http, port, "/healthz").await?;
        let idle_rss = proc_status_kib(process.id(), "VmRSS")?;
        Ok(Self {
            label,
            process,
            base: format!("http://127.0.0.1:{port}"),
            figures: Figures::new(options.clients)?,
            peak_rss: Arc::new(AtomicU64::new(idle_rss)),
        })
    }

    fn pid(&self) -> u32 {
        self.process.id()
    }

    /// One round of `GET /users/{id}` by random readers, with the process's resident memory
    /// sampled for its peak; answers the rate.
    async fn round(
        &mut self,
        client: &reqwest::Client,
        readers: &Readers,
        pool: &PgPool,
        clients: usize,
        duration: Duration,
    ) -> anyhow::Result<f64> {
        let pid = self.pid();
        let sampler = {
            let peak = self.peak_rss.clone();
            tokio::spawn(async move {
                while let Ok(rss) = proc_status_kib(pid, "VmRSS") {
                    peak.fetch_max(rss, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        let (client, base, readers) = (client.clone(), self.base.clone(), readers.clone());
        let rate = self
            .figures
            .round(clients, duration, (pid, pool), move || {
                let client = client.clone();
                let (id, token) = readers[fastrand::usize(..readers.len())].clone();
                let url = format!("{base}/users/{id}");
                async move { get_ok(&client, url, &token).await }
            })
            .await;
        sampler.abort();
        rate
    }
}

/// Reads `path` as `token` and insists on a 200 with a body.
async fn get_ok(client: &reqwest::Client, url: String, token: &str) -> anyhow::Result<()> {
    let response = client.get(url).bearer_auth(token).send().await?;
    let status = response.status();
    let body = response.bytes().await?;
    anyhow::ensure!(
        status == 200 && !body.is_empty(),
        "GET /users/{{id}}: {status}"
    );
    Ok(())
}

/// Sends every reader's request once, `clients` at a time, so that the measured rounds find
/// their tokens verified (and, where profiles are kept, their rows in memory).
async fn show_once(
    client: &reqwest::Client,
    base: &str,
    readers: &Readers,
    clients: usize,
) -> anyhow::Result<()> {
    let tasks: Vec<_> = (0..clients)
        .map(|worker| {
            let (client, base, readers) = (client.clone(), base.to_owned(), readers.clone());
            tokio::spawn(async move {
                for (id, token) in readers.iter().skip(worker).step_by(clients) {
                    get_ok(&client, format!("{base}/users/{id}"), token).await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok(())
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    let binary = query_api_binary(&options)?;
    let database = TestDatabase::new().await;
    let pool = database
        // The baseline at its best: no ping before each lookup, as the query API does.
        .pool_with(
            PgPoolOptions::new()
                .max_connections(options.connections)
                .test_before_acquire(false),
        )
        .await;
    // Personal fields sealed, as the command API writes them (ADR 13).
    let master_key = MasterKey::generate("1")?;
    let sealer = Sealer::new(
        personal_data::connect(
            database.url(),
            MasterKeys::new(master_key.clone(), vec![])?,
            1,
        )
        .await?,
    );
    let (admin, ids) = seed_read_model(&pool, &sealer, options.users).await?;

    // The query APIs, each in its own process.
    let key = SigningKey::generate(Algorithm::EdDSA)?;
    let keys = ServiceKeys {
        signing_pem: key.to_pem()?.expose_secret().clone(),
        master_key: master_key.to_hex().expose_secret().clone(),
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let mut measured = Vec::new();
    for (label, cache_profiles) in [
        ("every read from PostgreSQL", 0),
        (
            "from kept profiles, no database read",
            options.cache_profiles,
        ),
    ] {
        measured.push(
            Measured::start(
                label,
                &binary,
                &database,
                &keys,
                &options,
                cache_profiles,
                &client,
            )
            .await?,
        );
    }
    let tokens = Tokens {
        issuer: TokenIssuer::new(KeySet::from(key), TokenConfig::default().settings()),
        admin,
        reader: options.reader,
        // Who reads what, the same for the baseline and both query APIs.
        targets: Arc::new(
            (0..READ.min(ids.len()))
                .map(|_| ids[fastrand::usize(..ids.len())])
                .collect(),
        ),
    };
    check_one_request(&client, &measured, ids[0], &tokens, &pool).await?;
    let baseline = run_rounds(&options, &client, &pool, &tokens, &mut measured).await?;
    report(&options, baseline, measured)
}

/// The query API binary to measure: the one `--query-api` names, else the release build beside
/// this one.
fn query_api_binary(options: &Options) -> anyhow::Result<PathBuf> {
    let binary = match &options.query_api {
        Some(binary) => binary.clone(),
        None => built_binary("query-api")?,
    };
    anyhow::ensure!(
        binary.is_file(),
        "{} is missing: run `cargo build --release -p query-api` first (with the same target directory)",
        binary.display()
    );
    Ok(binary)
}

/// Migrates the store and the read model, and fills the view as the aggregator would have
/// built it; answers the administrator the requests are made as and the other users' ids.
async fn seed_read_model(
    pool: &PgPool,
    sealer: &Sealer,
    users: u32,
) -> anyhow::Result<(Uuid, Vec<Uuid>)> {
    PostgresMessageStore::migrate(pool).await?;
    read_model_schema::postgres_migrations().run(pool).await?;
    let seeding = Instant::now();
    seed_users(pool, users).await?;
    let admin = seed_administrator(pool, sealer, users).await?;
    sqlx::query("ANALYZE users").execute(pool).await?;
    let ids: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM users WHERE id <> $1")
        .bind(admin)
        .fetch_all(pool)
        .await?;
    anyhow::ensure!(!ids.is_empty(), "no users were seeded");
    println!(
        "seeded {} users in {:.1} s",
        ids.len(),
        seeding.elapsed().as_secs_f64()
    );
    Ok((admin, ids))
}

/// Active users with a login history, at positions 1 to `users`.
async fn seed_users(pool: &PgPool, users: u32) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO users (id, email, email_normalized, status, registered_at, activated_at, \
                            last_login_at, login_count, roles, position) \
         SELECT gen_random_uuid(), email, lower(email), 'active', registered_at, \
                registered_at + interval '4 minutes', registered_at + (n % 97) * interval '1 hour', \
                n % 200, ARRAY['user'], n \
         FROM (SELECT n, \
                      (ARRAY['Alice', 'Bruno', 'Chen', 'Dana', 'Emeka', 'Farah', 'Giulia', 'Hiro', \
                             'Ines', 'Jonas'])[1 + n % 10] \
                      || '.' || \
                      (ARRAY['Smith', 'Okafor', 'Rossi', 'Tanaka', 'Garcia', 'Novak', 'Mueller', \
                             'Singh', 'Kim', 'Dubois'])[1 + (n / 10) % 10] \
                      || n || '@' || \
                      (ARRAY['example.com', 'example.org', 'mail.example.net'])[1 + n % 3] AS email, \
                      now() - n * interval '5 minutes' AS registered_at \
               FROM generate_series(1, $1::integer) AS n) AS seeded",
    )
    .bind(i32::try_from(users)?)
    .execute(pool)
    .await?;
    Ok(())
}

/// The administrator the requests are made as, registered in the message store as the command
/// API registers one (the query API checks an administrator acting on others in the account's
/// stream) and projected into the view beside `users` others.
async fn seed_administrator(pool: &PgPool, sealer: &Sealer, users: u32) -> anyhow::Result<Uuid> {
    let admin = Uuid::now_v7();
    let registered = register_administrator(pool, sealer, admin).await?;
    sqlx::query(
        "INSERT INTO users (id, email, email_normalized, status, registered_at, activated_at, \
                            login_count, roles, position) \
         VALUES ($1, 'Admin@example.com', 'admin@example.com', 'active', now(), now(), 1, \
                 ARRAY['user', 'admin'], $2)",
    )
    .bind(admin)
    .bind(i64::try_from(registered)?)
    .execute(pool)
    .await?;
    // And its checkpoint, past every row and at the store's last position, as the aggregator
    // commits it with them: the view holds everything written, so the query API trusts its
    // rows to say an account is active (`query.max_view_lag_ms`); at the projection version
    // it reads, as a view of an older one is not trusted to say which sessions are over.
    sqlx::query(
        "INSERT INTO projection_checkpoints (projection, version, position) VALUES ('users', $1, $2)",
    )
    .bind(read_model_schema::USERS_VERSION)
    .bind(i64::try_from(registered.max(u64::from(users) + 1))?)
    .execute(pool)
    .await?;
    Ok(admin)
}

/// The tokens the requests are made with, issued as the command API issues them.
struct Tokens {
    issuer: TokenIssuer,
    admin: Uuid,
    reader: Reader,
    /// The users whose profiles are read.
    targets: Arc<Vec<Uuid>>,
}

impl Tokens {
    async fn admin(&self, pool: &PgPool) -> anyhow::Result<Arc<String>> {
        let mut sessions = Vec::new();
        let roles = vec!["user".to_owned(), "admin".to_owned()];
        let token = self.issue(self.admin, roles, &mut sessions)?;
        start_sessions(pool, sessions).await?;
        Ok(token)
    }

    /// Each target with the token that reads it: its own, or the administrator's.
    async fn readers(&self, pool: &PgPool) -> anyhow::Result<Readers> {
        let readers = match self.reader {
            Reader::Admin => {
                let token = self.admin(pool).await?;
                self.targets.iter().map(|id| (*id, token.clone())).collect()
            }
            Reader::Owner => {
                let mut sessions = Vec::with_capacity(self.targets.len());
                let readers = self
                    .targets
                    .iter()
                    .map(|id| {
                        Ok((
                            *id,
                            self.issue(*id, vec!["user".to_owned()], &mut sessions)?,
                        ))
                    })
                    .collect::<anyhow::Result<_>>()?;
                start_sessions(pool, sessions).await?;
                readers
            }
        };
        Ok(Arc::new(readers))
    }

    /// A token for `user`, in a session of its own whose start is added to `sessions`, as a
    /// login issues one.
    fn issue(
        &self,
        user: Uuid,
        roles: Vec<String>,
        sessions: &mut Vec<SessionStarted>,
    ) -> anyhow::Result<Arc<String>> {
        let now = SystemClock.now();
        let policy = SessionPolicy::default();
        let session = Uuid::now_v7();
        sessions.push(SessionStarted {
            session_id: SessionId::from_uuid(session),
            user_id: UserId::from_uuid(user),
            session_epoch: 0,
            started_at: now,
            expires_at: now + TimeDelta::from_std(policy.max)?,
            idle_expires_at: now + TimeDelta::from_std(policy.idle)?,
            user_agent: Some(UserAgent::new("bench")),
            generation: 0,
            nonce: RefreshNonce::from_bytes(std::array::from_fn(|_| fastrand::u8(..))),
        });
        let issued = self.issuer.issue(user, session, roles, false, now)?;
        Ok(Arc::new(issued.token.expose_secret().clone()))
    }
}

/// Appends each session's start to the message store, as a login does, and projects them as
/// the aggregator would: a row each in `sessions`, and the users projection's checkpoint moved
/// to the store's last position, so the view still holds everything written and the query API
/// trusts its rows (`query.max_view_lag_ms`).
async fn start_sessions(pool: &PgPool, sessions: Vec<SessionStarted>) -> anyhow::Result<()> {
    let store = PostgresMessageStore::new(pool.clone(), Duration::from_secs(1));
    for chunk in sessions.chunks(1000) {
        let appends = chunk
            .iter()
            .map(|started| {
                let event = SessionEvent::from(started.clone());
                let message = NewMessage::new(event.event_type(), event.to_json())
                    .with_metadata(json!({ EVENT_VERSION_KEY: event.version() }));
                Ok(StreamAppend::new(
                    StreamName::parse(session_stream_name(started.session_id))?,
                    ExpectedVersion::NoStream,
                    vec![message],
                ))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let appended = store
            .append(appends)
            .await
            .context("starting the readers' sessions in the message store")?;
        let ids: Vec<Uuid> = chunk.iter().map(|s| *s.session_id.as_uuid()).collect();
        let users: Vec<Uuid> = chunk.iter().map(|s| *s.user_id.as_uuid()).collect();
        let started: Vec<DateTime<Utc>> = chunk.iter().map(|s| s.started_at).collect();
        let expires: Vec<DateTime<Utc>> = chunk.iter().map(|s| s.expires_at).collect();
        let idle: Vec<DateTime<Utc>> = chunk.iter().map(|s| s.idle_expires_at).collect();
        let positions = appended
            .messages
            .iter()
            .map(|message| i64::try_from(message.global_position))
            .collect::<Result<Vec<_>, _>>()?;
        sqlx::query(
            "INSERT INTO sessions (id, user_id, session_epoch, started_at, expires_at, \
                                   idle_expires_at, user_agent, generation, position) \
             SELECT id, user_id, 0, started_at, expires_at, idle_expires_at, 'bench', 0, position \
             FROM UNNEST($1::uuid[], $2::uuid[], $3::timestamptz[], $4::timestamptz[], \
                         $5::timestamptz[], $6::bigint[]) \
                  AS started(id, user_id, started_at, expires_at, idle_expires_at, position)",
        )
        .bind(ids)
        .bind(users)
        .bind(started)
        .bind(expires)
        .bind(idle)
        .bind(positions)
        .execute(pool)
        .await?;
    }
    sqlx::query(
        "UPDATE projection_checkpoints \
         SET position = (SELECT max(global_position) FROM messages) WHERE projection = 'users'",
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// One request to each query API checked in full before the measuring.
async fn check_one_request(
    client: &reqwest::Client,
    measured: &[Measured],
    sample: Uuid,
    tokens: &Tokens,
    pool: &PgPool,
) -> anyhow::Result<()> {
    for api in measured {
        let request = client
            .get(format!("{}/users/{sample}", api.base))
            .bearer_auth(tokens.admin(pool).await?.as_str());
        let body = expect_json(request, 200, "GET /users/{id}").await?;
        anyhow::ensure!(
            body["id"] == sample.to_string() && body["status"] == "active",
            "GET /users/{{id}} answered {body}"
        );
    }
    Ok(())
}

/// The measured rounds: in each, the baseline, then each query API; answers the baseline's
/// figures.
async fn run_rounds(
    options: &Options,
    client: &reqwest::Client,
    pool: &PgPool,
    tokens: &Tokens,
    measured: &mut [Measured],
) -> anyhow::Result<Figures> {
    let (clients, duration) = (options.clients, Duration::from_secs(options.seconds));
    let mut readers = tokens.readers(pool).await?;
    let mut issued = Instant::now();
    for api in measured.iter() {
        show_once(client, &api.base, &readers, clients).await?;
    }
    let mut baseline = Figures::new(clients)?;
    for round in 1..=options.rounds {
        if issued.elapsed() > REISSUE_AFTER {
            readers = tokens.readers(pool).await?;
            issued = Instant::now();
            for api in measured.iter() {
                show_once(client, &api.base, &readers, clients).await?;
            }
        }
        let (pool_for_round, targets) = (pool.clone(), tokens.targets.clone());
        let plain = baseline
            .round(clients, duration, (measured[0].pid(), pool), move || {
                let pool = pool_for_round.clone();
                let id = targets[fastrand::usize(..targets.len())];
                async move {
                    let row: ProfileRow = sqlx::query_as(SELECT_PROFILE)
                        .bind(id)
                        .fetch_one(&pool)
                        .await?;
                    anyhow::ensure!(row.0 == id && row.2 == "active", "SELECT found another row");
                    Ok(())
                }
            })
            .await?;
        let mut line = format!("round {round}: plain SELECT {plain:.0}/s");
        for api in measured.iter_mut() {
            let http = api.round(client, &readers, pool, clients, duration).await?;
            line.push_str(&format!(", {} {http:.0} req/s", api.label));
        }
        println!("{line}");
    }
    Ok(baseline)
}

/// Prints the figures, each query API's result line last; an error when the comparison is
/// broken.
fn report(options: &Options, baseline: Figures, measured: Vec<Measured>) -> anyhow::Result<()> {
    let clients = options.clients;
    let plain = median(baseline.rates);
    let plain_n = baseline.count.load(Ordering::Relaxed);
    println!(
        "plain SELECT: {plain:.0}/s, p99 {:.2} ms ({clients} clients, {} connections); \
         CPU per lookup: client {:.0} us, PostgreSQL {:.0} us",
        baseline.latencies.p99_ms()?,
        options.connections,
        micros_each(baseline.cpu.client, plain_n),
        micros_each(baseline.cpu.postgres, plain_n),
    );
    let reader = match options.reader {
        Reader::Owner => "owner",
        Reader::Admin => "admin",
    };
    let mut results = Vec::new();
    let mut ratios = Vec::new();
    for api in &measured {
        let Figures {
            rates,
            latencies,
            count,
            cpu,
        } = &api.figures;
        let http = median(rates.clone());
        let n = count.load(Ordering::Relaxed);
        let hwm = proc_status_kib(api.pid(), "VmHWM")?;
        println!(
            "GET /users/{{id}} {}: {http:.0} req/s ({clients} clients over keep-alive, {} \
             read-model connections); CPU per request: client {:.0} us, query-api {:.0} us, \
             PostgreSQL {:.0} us; query-api peak RSS {:.1} MiB, VmHWM {:.1} MiB",
            api.label,
            options.connections,
            micros_each(cpu.client, n),
            micros_each(cpu.query_api, n),
            micros_each(cpu.postgres, n),
            mib(api.peak_rss.load(Ordering::Relaxed)),
            mib(hwm),
        );
        let ratio = http / plain;
        ratios.push(ratio);
        results.push(format!(
            "query {reader}, {}: {http:.0} req/s, p99 {:.2} ms, {ratio:.2}x plain SELECT",
            api.label,
            latencies.p99_ms()?,
        ));
    }
    drop(measured);
    for result in &results {
        println!("{result}");
    }
    // The requests that read PostgreSQL do the baseline's work and more: above 1.0, the
    // baseline is not the hardware's best (or the requests skipped the read).
    let from_postgres = ratios[0];
    if from_postgres > 1.0 {
        anyhow::bail!(
            "broken comparison: requests that read PostgreSQL measured {from_postgres:.2}x the plain \
             SELECT they include; the baseline is wrong"
        );
    }
    Ok(())
}
