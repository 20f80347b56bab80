//! `query`: `GET /users/{id}` over HTTP, served by the query API in a process of its own, against
//! the same lookup as a plain prepared SELECT through a pool of as many connections as the query
//! API gives its read model (the limit), across a read model of 100,000 users. Also the p99 of
//! the requests and the query API's peak resident memory.
//!
//! The query API is the release binary next to this one: `cargo build --release -p query-api`.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use hdrhistogram::Histogram;
use identity::{
    AccountStatus, EVENT_VERSION_KEY, Email, PasswordHash, Role, UserEvent, UserId, UserRegistered,
    user_stream_name,
};
use message_store::{
    ExpectedVersion, MessageStore, NewMessage, PostgresMessageStore, StreamAppend, StreamName,
};
use platform::clock::{Clock, SystemClock};
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use test_support::TestDatabase;
use tokens::{Algorithm, KeySet, SigningKey, TokenConfig, TokenIssuer};
use uuid::Uuid;

use crate::report::{median, mib, proc_status_kib, rate};

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
    /// Profiles the query API keeps in memory (`query.cache_profiles`, ADR 6); 0 makes every
    /// request read its row from PostgreSQL.
    #[arg(long, default_value_t = 100_000)]
    cache_profiles: usize,
    /// Seconds per round; rounds alternate between the baseline and the requests.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Who reads: `owner`, each request a user reading their own profile with their own token
    /// (the common case: one row), or `admin`, an administrator reading random users (the
    /// query API then also reads the administrator's account stream in the message store, as
    /// it checks every administrator acting on others).
    #[arg(long, value_enum, default_value_t = Reader::Owner)]
    reader: Reader,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Reader {
    Owner,
    Admin,
}

/// Users whose own tokens the `owner` rounds use, drawn at random from the seeded ones.
const OWNERS: usize = 5_000;

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

/// The query API's process, killed when this is dropped (at the end, or on an error).
struct QueryApi {
    child: Child,
}

impl Drop for QueryApi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl QueryApi {
    fn start(
        binary: &Path,
        database_url: &str,
        port: u16,
        pem: &str,
        connections: u32,
        cache_profiles: usize,
    ) -> anyhow::Result<Self> {
        let mut command = Command::new(binary);
        // Only the settings given here: none of this shell's.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("IDENTITY__") {
                command.env_remove(name);
            }
        }
        let child = command
            .env_remove("RUST_LOG")
            .env("IDENTITY__DATABASE__URL", database_url)
            .env(
                "IDENTITY__DATABASE__MAX_CONNECTIONS",
                connections.to_string(),
            )
            .env("IDENTITY__HTTP__ADDRESS", format!("127.0.0.1:{port}"))
            .env("IDENTITY__TOKENS__SIGNING_KEY", pem)
            .env("IDENTITY__LOG__FILTER", "warn")
            .env(
                "IDENTITY__QUERY__CACHE_PROFILES",
                cache_profiles.to_string(),
            )
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(Self { child })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for `/healthz` to answer, or for the process to give up.
    async fn wait_until_healthy(
        &mut self,
        client: &reqwest::Client,
        base: &str,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!("query-api exited before it served /healthz: {status}");
            }
            if let Ok(response) = client.get(format!("{base}/healthz")).send().await
                && response.status() == 200
            {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "query-api did not serve /healthz within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Appends the registration of an active administrator `id` to the message store, as the
/// command API writes it, and returns its global position.
async fn register_administrator(pool: &PgPool, id: Uuid) -> anyhow::Result<u64> {
    let store = PostgresMessageStore::new(pool.clone(), Duration::from_secs(1));
    let email = Email::parse("Admin@example.com")?;
    let event = UserEvent::UserRegistered(UserRegistered {
        user_id: UserId::from_uuid(id),
        email_normalized: email.normalized().to_owned(),
        email,
        // Nobody logs in with it: the benchmark issues the tokens itself.
        password_hash: PasswordHash::parse(
            "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
        )?,
        status: AccountStatus::Active,
        roles: vec![Role::User, Role::Admin],
        registered_at: SystemClock.now(),
    });
    let message = NewMessage::new(event.event_type(), event.to_json())
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

pub async fn run(options: Options) -> anyhow::Result<()> {
    let binary = std::env::current_exe()?
        .parent()
        .context("the bench executable has no directory")?
        .join("query-api");
    anyhow::ensure!(
        binary.is_file(),
        "{} is missing: run `cargo build --release -p query-api` first (with the same target directory)",
        binary.display()
    );

    let database = TestDatabase::new().await;
    let pool = database
        // The baseline at its best: no ping before each lookup, as the query API does.
        .pool_with(
            PgPoolOptions::new()
                .max_connections(options.connections)
                .test_before_acquire(false),
        )
        .await;
    PostgresMessageStore::migrate(&pool).await?;
    let mut migrator = sqlx::migrate!("../migrations/read_model/postgres");
    migrator.set_ignore_missing(true);
    migrator.run(&pool).await?;

    // The read model as the aggregator would have built it: active users with a login history.
    let seeding = Instant::now();
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
    .bind(i32::try_from(options.users)?)
    .execute(&pool)
    .await?;
    // The administrator the requests are made as, registered in the message store as the
    // command API registers one (the query API checks an administrator acting on others in
    // the account's stream) and projected into the view.
    let admin = Uuid::now_v7();
    let registered = register_administrator(&pool, admin).await?;
    sqlx::query(
        "INSERT INTO users (id, email, email_normalized, status, registered_at, activated_at, \
                            login_count, roles, position) \
         VALUES ($1, 'Admin@example.com', 'admin@example.com', 'active', now(), now(), 1, \
                 ARRAY['user', 'admin'], $2)",
    )
    .bind(admin)
    .bind(i64::try_from(registered)?)
    .execute(&pool)
    .await?;
    // And its checkpoint, past every row and at the store's last position, as the aggregator
    // commits it with them: the view holds everything written, so the query API trusts its
    // rows to say an account is active (`query.max_view_lag_ms`).
    sqlx::query(
        "INSERT INTO projection_checkpoints (projection, version, position) VALUES ('users', 1, $1)",
    )
    .bind(i64::try_from(registered.max(u64::from(options.users) + 1))?)
    .execute(&pool)
    .await?;
    sqlx::query("ANALYZE users").execute(&pool).await?;
    let ids: Vec<Uuid> = sqlx::query_scalar("SELECT id FROM users WHERE id <> $1")
        .bind(admin)
        .fetch_all(&pool)
        .await?;
    anyhow::ensure!(!ids.is_empty(), "no users were seeded");
    let ids = Arc::new(ids);
    println!(
        "seeded {} users in {:.1} s",
        ids.len(),
        seeding.elapsed().as_secs_f64()
    );

    // The query API in its own process, on a port picked here.
    let key = SigningKey::generate(Algorithm::EdDSA)?;
    let pem = key.to_pem()?.expose_secret().clone();
    let issuer = TokenIssuer::new(KeySet::from(key), TokenConfig::default().settings());
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut query_api = QueryApi::start(
        &binary,
        database.url(),
        port,
        &pem,
        options.connections,
        options.cache_profiles,
    )?;
    let pid = query_api.pid();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    query_api.wait_until_healthy(&client, &base).await?;
    let admin_token = || -> anyhow::Result<Arc<String>> {
        let roles = vec!["user".to_owned(), "admin".to_owned()];
        let issued = issuer.issue(admin, roles, SystemClock.now())?;
        Ok(Arc::new(issued.token.expose_secret().clone()))
    };

    // One request checked in full before the measuring.
    let sample = ids[0];
    let response = client
        .get(format!("{base}/users/{sample}"))
        .bearer_auth(admin_token()?.as_str())
        .send()
        .await?;
    anyhow::ensure!(
        response.status() == 200,
        "GET /users/{{id}}: {}",
        response.status()
    );
    let body: Value = response.json().await?;
    anyhow::ensure!(
        body["id"] == sample.to_string() && body["status"] == "active",
        "GET /users/{{id}} answered {body}"
    );
    let idle_rss = proc_status_kib(pid, "VmRSS")?;

    let duration = Duration::from_secs(options.seconds);
    let clients = options.clients;
    let plain_latencies = Arc::new(Latencies::new(clients)?);
    let http_latencies = Arc::new(Latencies::new(clients)?);
    let peak_rss = Arc::new(AtomicU64::new(idle_rss));
    let (plain_count, http_count) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (mut plain_cpu, mut http_cpu) = (Cpu::default(), Cpu::default());
    let (mut plain_rates, mut http_rates) = (Vec::new(), Vec::new());
    for round in 1..=options.rounds {
        let (pool_for_round, ids_for_round) = (pool.clone(), ids.clone());
        let latencies = plain_latencies.clone();
        let count = plain_count.clone();
        let before = CpuSnapshot::take(pid, &pool).await?;
        let plain = rate(clients, duration, move |client, _| {
            let (pool, latencies, count) =
                (pool_for_round.clone(), latencies.clone(), count.clone());
            let id = ids_for_round[fastrand::usize(..ids_for_round.len())];
            async move {
                let started = Instant::now();
                let row: ProfileRow = sqlx::query_as(SELECT_PROFILE)
                    .bind(id)
                    .fetch_one(&pool)
                    .await?;
                latencies.record(client, started.elapsed());
                anyhow::ensure!(row.0 == id && row.2 == "active", "SELECT found another row");
                count.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        })
        .await?;
        plain_cpu.add(&before, &CpuSnapshot::take(pid, &pool).await?);

        // Fresh tokens each round: the default lifetime is 15 minutes.
        let readers: Arc<Vec<(Uuid, Arc<String>)>> = Arc::new(match options.reader {
            Reader::Admin => {
                let token = admin_token()?;
                (0..OWNERS.min(ids.len()))
                    .map(|_| (ids[fastrand::usize(..ids.len())], token.clone()))
                    .collect()
            }
            Reader::Owner => (0..OWNERS.min(ids.len()))
                .map(|_| {
                    let id = ids[fastrand::usize(..ids.len())];
                    let issued = issuer.issue(id, vec!["user".to_owned()], SystemClock.now())?;
                    Ok((id, Arc::new(issued.token.expose_secret().clone())))
                })
                .collect::<anyhow::Result<_>>()?,
        });
        let sampler = {
            let peak = peak_rss.clone();
            tokio::spawn(async move {
                while let Ok(rss) = proc_status_kib(pid, "VmRSS") {
                    peak.fetch_max(rss, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        };
        let (client_for_round, base_for_round) = (client.clone(), base.clone());
        let latencies = http_latencies.clone();
        let count = http_count.clone();
        let before = CpuSnapshot::take(pid, &pool).await?;
        let http = rate(clients, duration, move |worker, _| {
            let (client, latencies, count) =
                (client_for_round.clone(), latencies.clone(), count.clone());
            let (id, token) = readers[fastrand::usize(..readers.len())].clone();
            let url = format!("{base_for_round}/users/{id}");
            async move {
                let started = Instant::now();
                let response = client.get(url).bearer_auth(token.as_str()).send().await?;
                let status = response.status();
                let body = response.bytes().await?;
                latencies.record(worker, started.elapsed());
                anyhow::ensure!(
                    status == 200 && !body.is_empty(),
                    "GET /users/{{id}}: {status}"
                );
                count.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        })
        .await;
        http_cpu.add(&before, &CpuSnapshot::take(pid, &pool).await?);
        sampler.abort();
        let http = http?;
        println!(
            "round {round}: plain SELECT {plain:.0}/s, GET /users/{{id}} {http:.0} req/s, \
             query-api peak RSS so far {:.1} MiB",
            mib(peak_rss.load(Ordering::Relaxed))
        );
        plain_rates.push(plain);
        http_rates.push(http);
    }
    let hwm = proc_status_kib(pid, "VmHWM")?;
    drop(query_api);

    let (plain, http) = (median(plain_rates), median(http_rates));
    let (plain_p99, http_p99) = (plain_latencies.p99_ms()?, http_latencies.p99_ms()?);
    println!(
        "plain SELECT: {plain:.0}/s, p99 {plain_p99:.2} ms ({clients} clients, {} connections)",
        options.connections
    );
    println!(
        "GET /users/{{id}}: {http:.0} req/s, p99 {http_p99:.2} ms ({clients} clients over keep-alive, \
         query API with {} read-model connections, in its own process)",
        options.connections
    );
    let (plain_n, http_n) = (
        plain_count.load(Ordering::Relaxed),
        http_count.load(Ordering::Relaxed),
    );
    println!(
        "CPU per lookup: plain SELECT: client {:.0} us, PostgreSQL {:.0} us; \
         GET /users/{{id}}: client {:.0} us, query-api {:.0} us, PostgreSQL {:.0} us",
        micros_each(plain_cpu.client, plain_n),
        micros_each(plain_cpu.postgres, plain_n),
        micros_each(http_cpu.client, http_n),
        micros_each(http_cpu.query_api, http_n),
        micros_each(http_cpu.postgres, http_n),
    );
    println!(
        "query-api resident memory: peak {:.1} MiB sampled during the requests, VmHWM {:.1} MiB, \
         {:.1} MiB at rest after start",
        mib(peak_rss.load(Ordering::Relaxed)),
        mib(hwm),
        mib(idle_rss)
    );
    println!(
        "query: {http:.0} req/s, {:.2}x plain SELECT, p99 {http_p99:.2} ms",
        http / plain
    );
    Ok(())
}
