//! A PostgreSQL cluster of one test's own, for tests that stop, crash or otherwise disturb the
//! server: the shared test server must stay up for every other test running beside them.
//!
//! It is started from the same binaries, the same way (as the `postgres` user when running as
//! root), as the shared throwaway cluster, on a free port, with its data under the system temp
//! directory; it is stopped and deleted when the [`PrivateCluster`] is dropped.
//!
//! Unlike the shared cluster it keeps `synchronous_commit` on: a commit is acknowledged only
//! once its log record is written, so what a test saw committed must survive an immediate stop
//! (a crash of the server; the machine itself keeps running, so `fsync` stays off).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Executor};

use crate::cluster::{self, INSTALL};
use crate::process::free_port;

/// Server settings: disposable data, enough connections for three services and a test.
const SETTINGS: &str = "-c fsync=off -c full_page_writes=off -c max_connections=200";

/// Where private clusters live, one directory each.
const PARENT: &str = "identity-service-private-postgres";

/// Clusters older than this were left by a killed test run and are removed by the next one.
const STALE_AFTER: Duration = Duration::from_secs(3600);

/// How a cluster is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Connections are closed, running transactions rolled back, and a checkpoint written.
    Fast,
    /// Every server process is killed at once: a crash. The next start recovers from the log.
    Immediate,
}

impl StopMode {
    fn pg_ctl_mode(self) -> &'static str {
        match self {
            Self::Fast => "fast",
            Self::Immediate => "immediate",
        }
    }
}

/// A running PostgreSQL cluster that belongs to one test. Connect as `postgres` to the
/// `postgres` database ([`Self::url`]) or to databases made with [`Self::create_database`].
pub struct PrivateCluster {
    bin: PathBuf,
    root: PathBuf,
    data: PathBuf,
    run_as: Option<&'static str>,
    port: u16,
    /// Whether the server was last started rather than stopped.
    running: AtomicBool,
}

impl PrivateCluster {
    /// Creates and starts a cluster. Panics, naming what to install, when the PostgreSQL
    /// server binaries are missing: a test that needs one must not pass without it.
    pub async fn start() -> Self {
        tokio::task::spawn_blocking(Self::start_blocking)
            .await
            .expect("the thread starting a private cluster panicked")
            .unwrap_or_else(|error| panic!("no private PostgreSQL cluster: {error:#}"))
    }

    fn start_blocking() -> anyhow::Result<Self> {
        let bin = cluster::find_binaries().with_context(|| {
            format!(
                "this test starts a PostgreSQL cluster of its own and needs the server binaries \
                 (initdb, pg_ctl) on PATH or under /usr/lib/postgresql: install them ({INSTALL})"
            )
        })?;
        let parent = std::env::temp_dir().join(PARENT);
        std::fs::create_dir_all(&parent)
            .with_context(|| format!("creating {}", parent.display()))?;
        let run_as = cluster::running_as_root().then_some("postgres");
        remove_stale(&parent, &bin, run_as);
        let seconds = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let root = parent.join(format!("{seconds}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        if let Some(user) = run_as {
            cluster::chown(&root, user)?;
        }
        let data = root.join("data");
        let mut this = Self {
            bin,
            root,
            data,
            run_as,
            port: 0,
            running: AtomicBool::new(false),
        };
        cluster::initdb(run_as, &this.bin, &this.data)?;
        // A free port can be taken by someone else before the server binds it: try another.
        for _ in 0..5 {
            this.port = free_port()?;
            if this.pg_ctl_start()? {
                this.running.store(true, Ordering::SeqCst);
                return Ok(this);
            }
        }
        bail!(
            "pg_ctl could not start a private cluster; see {}",
            this.root.join("server.log").display()
        )
    }

    fn pg_ctl_start(&self) -> anyhow::Result<bool> {
        cluster::pg_ctl_start(
            self.run_as,
            &self.bin,
            &self.root,
            &self.data,
            self.port,
            SETTINGS,
        )
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The `postgres` database, as superuser `postgres`.
    pub fn url(&self) -> String {
        self.options("postgres").to_url_lossy().to_string()
    }

    fn options(&self, database: &str) -> PgConnectOptions {
        PgConnectOptions::new()
            .host("127.0.0.1")
            .port(self.port)
            .username("postgres")
            .database(database)
    }

    /// Creates an empty database and returns its URL.
    pub async fn create_database(&self, name: &str) -> String {
        let mut admin = self
            .options("postgres")
            .connect()
            .await
            .expect("connecting to the private cluster");
        admin
            .execute(format!(r#"CREATE DATABASE "{name}""#).as_str())
            .await
            .expect("creating a database in the private cluster");
        self.options(name).to_url_lossy().to_string()
    }

    /// Copies database `name` into a new database of the same name on `target`, the way a
    /// move to a new server or a restore from a backup does (`pg_dump`, then `pg_restore`), and
    /// returns the copy's URL. The copy lives in `target`'s transaction counter, not this one's.
    pub async fn copy_database_to(&self, name: &str, target: &PrivateCluster) -> String {
        let url = target.create_database(name).await;
        let dump = self.root.join(format!("{name}.dump"));
        let (pg_dump, pg_restore) = (self.program("pg_dump"), self.program("pg_restore"));
        let (source, destination) = (self.port, target.port);
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || {
            let connection = |port: u16| {
                [
                    "-h".to_owned(),
                    "127.0.0.1".to_owned(),
                    "-p".to_owned(),
                    port.to_string(),
                ]
                .into_iter()
                .chain(["-U".to_owned(), "postgres".to_owned()])
                .collect::<Vec<_>>()
            };
            run(std::process::Command::new(pg_dump)
                .args(connection(source))
                .args(["--format=custom", "--file"])
                .arg(&dump)
                .arg(&name))?;
            run(std::process::Command::new(pg_restore)
                .args(connection(destination))
                .args(["--exit-on-error", "--dbname", &name])
                .arg(&dump))
        })
        .await
        .expect("the thread copying a database panicked")
        .unwrap_or_else(|error| panic!("copying a database between private clusters: {error:#}"));
        url
    }

    /// A client program of the same PostgreSQL installation as the server: beside `initdb`, or
    /// beside the file it links to (a `PATH` may hold links to the server programs only).
    fn program(&self, name: &str) -> PathBuf {
        let beside_initdb = std::fs::canonicalize(self.bin.join("initdb"))
            .ok()
            .and_then(|initdb| initdb.parent().map(|bin| bin.join(name)));
        [Some(self.bin.join(name)), beside_initdb]
            .into_iter()
            .flatten()
            .find(|path| path.exists())
            .unwrap_or_else(|| PathBuf::from(name))
    }

    /// The server's log file, for a failing test's message.
    pub fn log(&self) -> PathBuf {
        self.root.join("server.log")
    }

    /// Stops the server and waits until it is down.
    pub async fn stop(&self, mode: StopMode) {
        let (run_as, bin, data) = (self.run_as, self.bin.clone(), self.data.clone());
        let stopped = tokio::task::spawn_blocking(move || {
            cluster::pg_ctl_stop(run_as, &bin, &data, mode.pg_ctl_mode())
        })
        .await
        .expect("the thread stopping the private cluster panicked")
        .expect("running pg_ctl stop");
        self.running.store(false, Ordering::SeqCst);
        assert!(
            stopped,
            "pg_ctl could not stop the private cluster ({mode:?}); see {}",
            self.log().display()
        );
    }

    /// Starts the stopped server again on the same port and waits until it accepts
    /// connections (after an immediate stop, once it has recovered from the log).
    pub async fn restart(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let (run_as, bin, root, data, port) = (
                self.run_as,
                self.bin.clone(),
                self.root.clone(),
                self.data.clone(),
                self.port,
            );
            let started = tokio::task::spawn_blocking(move || {
                cluster::pg_ctl_start(run_as, &bin, &root, &data, port, SETTINGS)
            })
            .await
            .expect("the thread starting the private cluster panicked")
            .expect("running pg_ctl start");
            if started {
                self.running.store(true, Ordering::SeqCst);
                return;
            }
            // The port may be held a moment by someone who found it free meanwhile.
            assert!(
                std::time::Instant::now() < deadline,
                "the private cluster did not start again on port {}; see {}",
                self.port,
                self.log().display()
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        if self.running.load(Ordering::SeqCst) {
            let _ = cluster::pg_ctl_stop(self.run_as, &self.bin, &self.data, "immediate");
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Stops and deletes the clusters of test runs that were killed before they could.
fn remove_stale(parent: &Path, bin: &Path, run_as: Option<&str>) {
    let cutoff = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_sub(STALE_AFTER)
        .as_secs();
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let created = entry
            .file_name()
            .to_str()
            .and_then(|name| name.split('-').next())
            .and_then(|seconds| seconds.parse::<u64>().ok());
        if created.is_some_and(|created| created < cutoff) {
            let root = entry.path();
            let _ = cluster::pg_ctl_stop(run_as, bin, &root.join("data"), "immediate");
            let _ = std::fs::remove_dir_all(root);
        }
    }
}

/// Runs a client program to its end; an error carries what it printed.
fn run(command: &mut std::process::Command) -> anyhow::Result<()> {
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}
