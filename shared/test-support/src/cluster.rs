//! A throwaway PostgreSQL cluster for machines without a running server.
//!
//! It lives under the system temp directory, listens only on 127.0.0.1, trusts local
//! connections, runs with fsync off (its data is disposable), and is left running so that the
//! next test process reuses it instead of paying for another start.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use fs2::FileExt;
use sqlx::postgres::PgConnectOptions;

/// A port unlikely to be taken; the cluster is found again there by later runs.
const PORT: u16 = 54_329;

pub(crate) async fn start_throwaway_cluster() -> anyhow::Result<PgConnectOptions> {
    let options = PgConnectOptions::new()
        .host("127.0.0.1")
        .port(PORT)
        .username("postgres")
        .database("postgres");
    if super::try_connect(&options).await.is_ok() {
        return Ok(options);
    }
    tokio::task::spawn_blocking(start_blocking)
        .await
        .context("starting the throwaway cluster")??;
    for _ in 0..100 {
        if super::try_connect(&options).await.is_ok() {
            return Ok(options);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the throwaway PostgreSQL cluster started but does not answer on 127.0.0.1:{PORT}")
}

fn start_blocking() -> anyhow::Result<()> {
    let bin = find_binaries().ok_or_else(|| {
        anyhow::anyhow!(
            "no PostgreSQL server answers (DATABASE_URL is not set, nothing on 127.0.0.1:5432) \
             and no PostgreSQL binaries were found to start one: install them \
             ({INSTALL}), or set DATABASE_URL"
        )
    })?;
    let root = std::env::temp_dir().join("identity-service-test-postgres");
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    // Test processes may start together: one of them starts the cluster, the others wait here.
    let lock = std::fs::File::create(root.join("lock"))?;
    lock.lock_exclusive()?;

    // initdb and postgres refuse to run as root; hand the cluster to the postgres user then.
    let run_as = running_as_root().then_some("postgres");
    if let Some(user) = run_as {
        chown(&root, user)?;
    }
    let data = root.join("data");
    if !data.join("PG_VERSION").exists() {
        initdb(run_as, &bin, &data)?;
    }
    if !pg_ctl_start(run_as, &bin, &root, &data, PORT, THROWAWAY_SETTINGS)? {
        // A server runs on this data directory but does not answer here: one started by an
        // earlier run in another network namespace, say. Stop it and start our own.
        let _ = pg_ctl_stop(run_as, &bin, &data, "fast");
        if !pg_ctl_start(run_as, &bin, &root, &data, PORT, THROWAWAY_SETTINGS)? {
            bail!(
                "pg_ctl could not start the throwaway cluster; see {}",
                root.join("server.log").display()
            );
        }
    }
    Ok(())
}

/// What the shared throwaway cluster trades for speed: its data is disposable, so it neither
/// flushes nor waits for commits to reach the log.
const THROWAWAY_SETTINGS: &str = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off \
     -c max_connections=300";

/// The package to install when the binaries are missing.
pub(crate) const INSTALL: &str = "Debian/Ubuntu: `apt-get install postgresql`";

/// Creates a cluster in `data`, trusting local connections, superuser `postgres`.
pub(crate) fn initdb(run_as: Option<&str>, bin: &Path, data: &Path) -> anyhow::Result<()> {
    let status = command(run_as, &bin.join("initdb"))
        .args([
            "--auth=trust",
            "--username=postgres",
            "--encoding=UTF8",
            "--no-sync",
        ])
        .arg("-D")
        .arg(data)
        .stdout(Stdio::null())
        .status()
        .context("running initdb")?;
    if !status.success() {
        bail!("initdb failed ({status}) for {}", data.display());
    }
    Ok(())
}

/// Starts the cluster on 127.0.0.1:`port` with its socket and log in `root`, and the server
/// `settings` (`-c name=value ...`); false when pg_ctl failed.
pub(crate) fn pg_ctl_start(
    run_as: Option<&str>,
    bin: &Path,
    root: &Path,
    data: &Path,
    port: u16,
    settings: &str,
) -> anyhow::Result<bool> {
    let status = command(run_as, &bin.join("pg_ctl"))
        .arg("-D")
        .arg(data)
        .arg("-l")
        .arg(root.join("server.log"))
        .arg("-o")
        .arg(format!(
            "-p {port} -c listen_addresses=127.0.0.1 -k {} {settings}",
            root.display()
        ))
        .args(["-w", "start"])
        .stdout(Stdio::null())
        .status()
        .context("running pg_ctl start")?;
    Ok(status.success())
}

/// Stops the cluster in `data` (`mode`: smart, fast or immediate) and waits until it is down;
/// false when pg_ctl failed (it was not running, say).
pub(crate) fn pg_ctl_stop(
    run_as: Option<&str>,
    bin: &Path,
    data: &Path,
    mode: &str,
) -> anyhow::Result<bool> {
    let status = command(run_as, &bin.join("pg_ctl"))
        .arg("-D")
        .arg(data)
        .args(["-m", mode, "-w", "stop"])
        .stdout(Stdio::null())
        .status()
        .context("running pg_ctl stop")?;
    Ok(status.success())
}

/// The directory holding `initdb` and `pg_ctl`: on PATH, else the newest under
/// /usr/lib/postgresql.
pub(crate) fn find_binaries() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .find(|dir| dir.join("initdb").exists() && dir.join("pg_ctl").exists())
    });
    if on_path.is_some() {
        return on_path;
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("bin"))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    versions.sort_by_key(|bin| {
        bin.parent()
            .and_then(Path::file_name)
            .and_then(|name| name.to_str())
            .and_then(|name| name.parse::<u32>().ok())
    });
    versions.pop()
}

pub(crate) fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|output| output.stdout.trim_ascii() == b"0")
}

pub(crate) fn chown(path: &Path, user: &str) -> anyhow::Result<()> {
    let status = Command::new("chown")
        .arg("-R")
        .arg(format!("{user}:"))
        .arg(path)
        .status()
        .context("running chown")?;
    if !status.success() {
        bail!("could not hand {} to the {user} user", path.display());
    }
    Ok(())
}

pub(crate) fn command(run_as: Option<&str>, program: &Path) -> Command {
    match run_as {
        Some(user) => {
            let mut command = Command::new("runuser");
            command.args(["-u", user, "--"]).arg(program);
            command
        }
        None => Command::new(program),
    }
}
