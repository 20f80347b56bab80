//! Test harness: every test gets a database of its own on a PostgreSQL server found (or
//! started) the same way on every machine.
//!
//! The server is, in order of preference:
//! 1. the one `DATABASE_URL` names;
//! 2. one answering on 127.0.0.1:5432 as user `postgres`;
//! 3. a throwaway cluster this harness starts from the local PostgreSQL binaries (`initdb`,
//!    `pg_ctl` on PATH or under /usr/lib/postgresql), kept under the system temp directory and
//!    reused by later test runs;
//! 4. otherwise the test fails with a message naming the package to install.
//!
//! Databases are named `idtest_<seconds>_<random>` and dropped when the [`TestDatabase`] is;
//! ones a crashed run left behind are dropped after an hour by the next run.
//!
//! A test that stops or crashes the server gets a [`PrivateCluster`] of its own instead, started
//! from the same local binaries: the shared server stays up for the tests running beside it.
//! A test that cuts a client off without closing its connection puts a [`FreezingProxy`]
//! between them.
//!
//! Tests and benchmarks that run the service's binaries start, wait for and stop them through
//! [`process`], and a whole split deployment through [`Deployment`].
//!
//! Tests of code that sends mail send it to a real SMTP server, an [`SmtpCatcher`]; it and the
//! API fuzzer are Python programs that [`python_tool`] installs under the target directory, so
//! a machine needs only `python3` with `venv` for them.
//!
//! Tests of the JetStream relay publish to a real NATS server with JetStream, a [`NatsServer`]:
//! the one on 127.0.0.1:4222, else one started from the local `nats-server` binary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod bulk;
mod cluster;
mod deployment;
pub mod integration_schema;
pub mod nats;
mod private;
pub mod process;
mod proxy;
pub mod python_tool;
pub mod smtp;

pub use deployment::{ALL_SERVICES, Deployment, Services};
pub use nats::NatsServer;
pub use private::{PrivateCluster, StopMode};
pub use process::{Launch, Process, Signal};
pub use proxy::FreezingProxy;
pub use smtp::{ReceivedMail, SmtpCatcher};

use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Executor, PgConnection};
use tokio::sync::OnceCell;

/// A database of one's own on the test server, dropped with this value.
pub struct TestDatabase {
    name: String,
    url: String,
    server: &'static Server,
}

struct Server {
    /// Connects to the maintenance database, from which test databases are created and dropped.
    admin: PgConnectOptions,
}

static SERVER: OnceCell<Server> = OnceCell::const_new();

impl Server {
    /// Creates an empty database `name`, dropped with the value returned.
    async fn create_database(&'static self, name: String) -> TestDatabase {
        self.execute(&format!(r#"CREATE DATABASE "{name}""#)).await;
        let url = self
            .admin
            .clone()
            .database(&name)
            .to_url_lossy()
            .to_string();
        TestDatabase {
            name,
            url,
            server: self,
        }
    }

    /// Runs `sql` on the maintenance database.
    async fn execute(&self, sql: &str) {
        let mut admin = self
            .admin
            .connect()
            .await
            .expect("connecting to the test server");
        admin
            .execute(sql)
            .await
            .unwrap_or_else(|error| panic!("running {sql}: {error}"));
        admin.close().await.ok();
    }
}

impl TestDatabase {
    /// Creates an empty database on the test server.
    pub async fn new() -> Self {
        let server = SERVER
            .get_or_try_init(find_or_start_server)
            .await
            .unwrap_or_else(|error| panic!("no PostgreSQL server for the tests: {error:#}"));
        let seconds = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let name = format!("idtest_{seconds}_{}", uuid::Uuid::new_v4().simple());
        server.create_database(name).await
    }

    /// The database's URL, for code under test that connects by itself (another process, say).
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The URL of a second database on the same server, dropped with this one. For tests that
    /// put the read model apart from the message store.
    pub async fn sibling(&self, suffix: &str) -> TestDatabase {
        self.server
            .create_database(format!("{}_{suffix}", self.name))
            .await
    }

    /// Makes the sessions that start from now on read-only, or writable again: what a server
    /// demoted to a standby by a failover answers (SQLSTATE 25006). Sessions already open keep
    /// what they had; [`Self::end_sessions`] ends them.
    pub async fn set_read_only(&self, read_only: bool) {
        self.server
            .execute(&format!(
                r#"ALTER DATABASE "{}" SET default_transaction_read_only = {read_only}"#,
                self.name
            ))
            .await;
    }

    /// Closes the database to new connections, or opens it again: an outage of this database
    /// alone, which a client sees as a FATAL error when it connects.
    pub async fn close_to_connections(&self, closed: bool) {
        self.server
            .execute(&format!(
                r#"ALTER DATABASE "{}" WITH ALLOW_CONNECTIONS {}"#,
                self.name, !closed
            ))
            .await;
    }

    /// Ends every session open on this database, as a server restart does to its clients.
    pub async fn end_sessions(&self) {
        self.server
            .execute(&format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{}'",
                self.name
            ))
            .await;
    }

    /// A pool on this database.
    pub async fn pool(&self) -> PgPool {
        self.pool_with(PgPoolOptions::new().max_connections(10))
            .await
    }

    pub async fn pool_with(&self, options: PgPoolOptions) -> PgPool {
        options
            .acquire_timeout(Duration::from_secs(30))
            .connect(&self.url)
            .await
            .expect("connecting to the test database")
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let admin = self.server.admin.clone();
        let name = self.name.clone();
        // Drop runs outside any runtime (or inside one that may be shutting down): drop the
        // database from a thread with a runtime of its own.
        let dropper = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let mut connection = admin.connect().await?;
                connection
                    .execute(format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#).as_str())
                    .await?;
                anyhow::Ok(())
            })
        });
        let _ = dropper.join();
    }
}

async fn find_or_start_server() -> anyhow::Result<Server> {
    let admin = if let Ok(url) = std::env::var("DATABASE_URL") {
        let options = PgConnectOptions::from_str(&url)?;
        // Test databases are created from the maintenance database, whatever DATABASE_URL names.
        let options = options.database("postgres");
        try_connect(&options)
            .await
            .map_err(|error| anyhow::anyhow!("DATABASE_URL={url} does not answer: {error}"))?;
        options
    } else {
        let local = PgConnectOptions::new()
            .host("127.0.0.1")
            .port(5432)
            .username("postgres")
            .database("postgres");
        if try_connect(&local).await.is_ok() {
            local
        } else {
            cluster::start_throwaway_cluster().await?
        }
    };
    let admin = admin.disable_statement_logging();
    drop_stale_databases(&admin).await;
    Ok(Server { admin })
}

async fn try_connect(options: &PgConnectOptions) -> Result<(), sqlx::Error> {
    let connect = PgConnection::connect_with(options);
    let connection = tokio::time::timeout(Duration::from_secs(3), connect)
        .await
        .map_err(|_| sqlx::Error::PoolTimedOut)??;
    connection.close().await
}

/// Drops the databases of test runs that ended without dropping their own (a killed run).
async fn drop_stale_databases(admin: &PgConnectOptions) {
    let Ok(mut connection) = admin.connect().await else {
        return;
    };
    let cutoff = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
        .saturating_sub(3600);
    let names: Vec<String> =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 'idtest\\_%'")
            .fetch_all(&mut connection)
            .await
            .unwrap_or_default();
    for name in names {
        let created = name
            .split('_')
            .nth(1)
            .and_then(|seconds| seconds.parse::<u64>().ok());
        if created.is_some_and(|created| created < cutoff) {
            let _ = connection
                .execute(format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#).as_str())
                .await;
        }
    }
}
