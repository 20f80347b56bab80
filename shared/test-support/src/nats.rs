//! A NATS server with JetStream for the tests of the JetStream relay, found or started the same
//! way on every machine:
//! 1. the one answering on 127.0.0.1:4222, if it has JetStream;
//! 2. else one this harness starts from the local `nats-server` binary (`nats-server -js`) on
//!    a free port, with its store in a temporary directory, shared by the tests of one process
//!    while any of them holds it, and killed (its store deleted) when the last lets it go;
//! 3. else the test fails with a message saying what to install.
//!
//! Tests on the shared server keep apart by a stream name and a subject prefix of their own
//! (JetStream refuses two streams whose subjects overlap).
//!
//! A test that stops NATS for a while gets a [`NatsServer::private`] one of its own, which it
//! can [`stop`](NatsServer::stop) and [`start`](NatsServer::start) again on the same port with
//! the same store.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::process::free_port;

/// Where a NATS server usually runs.
const USUAL: (&str, u16) = ("127.0.0.1", 4222);

/// What to install when there is no NATS to test against.
pub const INSTALL: &str = "install nats-server (Debian and Ubuntu: `apt-get install \
     nats-server`; elsewhere a release of github.com/nats-io/nats-server on the PATH), or run \
     one with JetStream on 127.0.0.1:4222 (`nats-server -js`)";

/// A NATS server with JetStream, started by this harness (killed on drop) or found running.
pub struct NatsServer {
    port: u16,
    /// The server's store and log; `None` for a server found running.
    directory: Option<PathBuf>,
    child: Mutex<Option<Child>>,
}

impl NatsServer {
    /// The shared server for this test process (see the module documentation).
    pub async fn shared() -> Arc<NatsServer> {
        static SHARED: tokio::sync::Mutex<Weak<NatsServer>> =
            tokio::sync::Mutex::const_new(Weak::new());
        let mut shared = SHARED.lock().await;
        if let Some(server) = shared.upgrade() {
            return server;
        }
        let server = if tokio::task::spawn_blocking(|| has_jetstream(USUAL.1))
            .await
            .unwrap_or(false)
        {
            NatsServer {
                port: USUAL.1,
                directory: None,
                child: Mutex::new(None),
            }
        } else {
            NatsServer::private()
                .await
                .unwrap_or_else(|error| panic!("no NATS server for the tests: {error:#}"))
        };
        let server = Arc::new(server);
        *shared = Arc::downgrade(&server);
        server
    }

    /// A server of the caller's own, started from the local binary on a free port.
    pub async fn private() -> anyhow::Result<NatsServer> {
        let binary = find_binary().ok_or_else(|| {
            anyhow::anyhow!(
                "no NATS server with JetStream answers on {}:{} and no nats-server binary was \
                 found to start one: {INSTALL}",
                USUAL.0,
                USUAL.1
            )
        })?;
        let port = free_port()?;
        let directory = std::env::temp_dir().join(format!(
            "identity-service-test-nats-{}-{port}",
            std::process::id()
        ));
        std::fs::create_dir_all(&directory)
            .with_context(|| format!("creating {}", directory.display()))?;
        let server = NatsServer {
            port,
            directory: Some(directory),
            child: Mutex::new(None),
        };
        server.spawn(&binary)?;
        server.wait_until_ready().await?;
        Ok(server)
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://{}:{}", USUAL.0, self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server (a server found running is not the harness's to stop: that panics).
    /// Its store stays for [`Self::start`].
    pub fn stop(&self) {
        let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let Some(mut running) = child.take() else {
            panic!("only a server this harness started can be stopped");
        };
        let _ = running.kill();
        let _ = running.wait();
    }

    /// Starts the stopped server again, on the same port with the same store, and waits until
    /// it answers with JetStream.
    pub async fn start(&self) -> anyhow::Result<()> {
        let binary = find_binary().ok_or_else(|| anyhow::anyhow!("no nats-server: {INSTALL}"))?;
        self.spawn(&binary)?;
        self.wait_until_ready().await
    }

    fn spawn(&self, binary: &Path) -> anyhow::Result<()> {
        let Some(directory) = &self.directory else {
            bail!("only a server this harness started can be started again");
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(directory.join("server.log"))?;
        let child = Command::new(binary)
            .args(["-js", "-a", USUAL.0, "-p", &self.port.to_string(), "-sd"])
            .arg(directory)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        *self.child.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
        Ok(())
    }

    async fn wait_until_ready(&self) -> anyhow::Result<()> {
        let port = self.port;
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if tokio::task::spawn_blocking(move || has_jetstream(port)).await? {
                return Ok(());
            }
            let exited = {
                let mut child = self.child.lock().unwrap_or_else(|e| e.into_inner());
                child
                    .as_mut()
                    .is_some_and(|child| child.try_wait().ok().flatten().is_some())
            };
            if exited {
                bail!("nats-server exited; see {}", self.log().display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "nats-server did not answer with JetStream on port {port}; see {}",
            self.log().display()
        )
    }

    /// The server's log (empty path for a server found running).
    pub fn log(&self) -> PathBuf {
        self.directory
            .as_ref()
            .map(|directory| directory.join("server.log"))
            .unwrap_or_default()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some(mut child) = child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(directory) = &self.directory {
            let _ = std::fs::remove_dir_all(directory);
        }
    }
}

/// Whether a NATS server answers on 127.0.0.1:`port` and says it has JetStream (its `INFO`
/// greeting, the first line it sends).
fn has_jetstream(port: u16) -> bool {
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(stream) = TcpStream::connect_timeout(&address, Duration::from_secs(1)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut line = String::new();
    if BufReader::new(stream).read_line(&mut line).is_err() {
        return false;
    }
    line.strip_prefix("INFO ")
        .and_then(|info| serde_json::from_str::<serde_json::Value>(info.trim()).ok())
        .is_some_and(|info| info["jetstream"] == true)
}

/// `nats-server` on the PATH, or where packages put it.
fn find_binary() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(["/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|directory| directory.join("nats-server"))
        .find(|candidate| candidate.is_file())
}
