//! A real SMTP server for the tests of code that sends mail, in a process of its own:
//! [`SmtpCatcher`] keeps what it accepts for the test to read, refuses or defers the recipients
//! the test names, holds back its final reply while a test kills the sender, and goes down and
//! comes back on the same port when told.
//!
//! Why a real server: what a mailer must get right is how it talks SMTP (the envelope, a 550
//! for one recipient, a server that is down for a while), and a stand-in transport would only
//! check what its author thought SMTP does. Why aiosmtpd: it is a complete RFC 5321 server
//! maintained by aio-libs, small, installed from PyPI in seconds by [`crate::python_tool`] (no
//! system package, no mail daemon with a configuration of its own), and its handler hooks make
//! refusing one address a few lines of Python. The handler (`smtp_catcher.py`, written into
//! the catcher's directory) stores each accepted message as files: the raw bytes, and the
//! envelope with the headers and bodies parsed by Python's email package (MIME, transfer
//! encodings and charsets decoded by a well-kept parser rather than by this harness).
//!
//! The server speaks plain SMTP on 127.0.0.1, no TLS: [`SmtpCatcher::url`] is
//! `smtp://127.0.0.1:<port>`, which lettre's `from_url` takes as an unencrypted connection.
//!
//! For a mailer's retries, note how lettre reports what this server does: a refused recipient
//! is a permanent error (`is_permanent()`, code 550), a deferred one a transient error
//! (`is_transient()`, code 451), and a server that is down neither: a connection error, with
//! no code. A mailer that retries only `is_transient()` errors would drop mail during an
//! outage; the safe rule is to give up only on `is_permanent()`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::process::{Launch, Process, Signal, free_port};
use crate::python_tool;

/// The pinned server, installed into `target/tools/aiosmtpd-<version>` (`AIOSMTPD=<path to
/// aiosmtpd>` uses another).
pub const AIOSMTPD_VERSION: &str = "1.4.6";
const HANDLER_MODULE: &str = "smtp_catcher";
const HANDLER: &str = include_str!("smtp_catcher.py");

/// How long the server may take to greet its first client.
const READY_WITHIN: Duration = Duration::from_secs(30);
const POLL_EVERY: Duration = Duration::from_millis(50);
/// Tries at a fresh port when the server exits before it greets (another process took the
/// port between [`free_port`] and the server's bind).
const PORT_TRIES: usize = 3;

/// A message the server accepted.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ReceivedMail {
    /// `MAIL FROM`.
    pub envelope_from: String,
    /// Every `RCPT TO` the server accepted for this message.
    pub envelope_to: Vec<String>,
    /// The `Message-ID` header as written, angle brackets included.
    pub message_id: Option<String>,
    /// The `Subject` header, decoded.
    pub subject: Option<String>,
    /// The addresses of the `To` header (`ann@example.com`, without display names).
    pub to: Vec<String>,
    /// The text/plain body (the message itself, or its part), decoded, lines ending in `\n`.
    pub text: Option<String>,
    /// The text/html body, decoded, lines ending in `\n`.
    pub html: Option<String>,
    /// The message as the client sent it after `DATA`.
    #[serde(skip)]
    pub raw: Vec<u8>,
}

/// An SMTP server on a free port of 127.0.0.1, killed with this value; its directory (the
/// handler, the messages, the server's log) is removed with it, or kept and named when a test
/// panics.
pub struct SmtpCatcher {
    port: u16,
    directory: PathBuf,
    aiosmtpd: PathBuf,
    server: Option<Process>,
}

impl SmtpCatcher {
    /// Installs aiosmtpd on first use (see [`crate::python_tool`]), then starts it and waits
    /// until it greets clients.
    pub async fn start() -> anyhow::Result<Self> {
        let aiosmtpd = tokio::task::spawn_blocking(|| {
            python_tool::installed("aiosmtpd", AIOSMTPD_VERSION, "aiosmtpd")
        })
        .await
        .context("installing aiosmtpd")?;
        let directory =
            std::env::temp_dir().join(format!("smtp-catcher-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(directory.join("mail"))
            .with_context(|| format!("creating {}", directory.display()))?;
        std::fs::write(directory.join(format!("{HANDLER_MODULE}.py")), HANDLER)
            .context("writing the SMTP handler")?;
        let mut catcher = Self {
            port: 0,
            directory,
            aiosmtpd,
            server: None,
        };
        let mut tries = 0;
        loop {
            tries += 1;
            catcher.port = free_port()?;
            match catcher.launch().await {
                Ok(()) => return Ok(catcher),
                Err(error) if tries < PORT_TRIES => {
                    eprintln!("the SMTP server did not start, trying another port: {error:#}");
                }
                Err(error) => return Err(error),
            }
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `smtp://127.0.0.1:<port>`: plain SMTP, as lettre's `SmtpTransport::from_url` and
    /// `AsyncSmtpTransport::from_url` read it.
    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    /// Where the server's log (`aiosmtpd.log`) and the messages (`mail/`) are.
    pub fn directory(&self) -> &Path {
        &self.directory
    }

    /// The messages accepted so far, in the order they arrived (across restarts too).
    pub fn received(&self) -> Vec<ReceivedMail> {
        self.read_mail()
            .unwrap_or_else(|error| panic!("reading the SMTP server's messages: {error:#}"))
    }

    /// Waits until at least `count` messages have arrived and returns them all; an error,
    /// listing what did arrive, after `timeout`.
    pub async fn wait_for_count(
        &self,
        count: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<ReceivedMail>> {
        let deadline = Instant::now() + timeout;
        loop {
            let received = self.read_mail()?;
            if received.len() >= count {
                return Ok(received);
            }
            if Instant::now() >= deadline {
                let summary: Vec<_> = received
                    .iter()
                    .map(|mail| (&mail.envelope_to, &mail.subject))
                    .collect();
                bail!(
                    "{} of {count} messages arrived within {} ms: {summary:?}",
                    received.len(),
                    timeout.as_millis()
                );
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// From now on the server refuses `address` at `RCPT TO` with 550 (a permanent failure);
    /// other recipients are still accepted.
    pub fn refuse(&self, address: &str) {
        self.answer(address, 550);
    }

    /// From now on the server defers `address` at `RCPT TO` with 451 (try again later).
    pub fn defer(&self, address: &str) {
        self.answer(address, 451);
    }

    /// From now on the server accepts `address` again, after [`Self::refuse`] or
    /// [`Self::defer`].
    pub fn accept(&self, address: &str) {
        self.answer(address, 250);
    }

    /// From now on the server keeps each message it receives (it shows in [`Self::received`])
    /// but holds back the reply that tells the client it was accepted, until [`Self::release`]:
    /// a test can kill the sender between the server having a mail and the sender learning
    /// it.
    pub fn hold(&self) {
        let path = self.directory.join("hold");
        std::fs::write(&path, b"")
            .unwrap_or_else(|error| panic!("writing {}: {error}", path.display()));
    }

    /// Sends the replies held back since [`Self::hold`], and holds no more.
    pub fn release(&self) {
        let path = self.directory.join("hold");
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => panic!("removing {}: {error}", path.display()),
        }
    }

    /// Kills the server: connections are cut and new ones refused until [`Self::restart`].
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut server) = self.server.take() {
            server.stop(Signal::Kill).await?;
        }
        Ok(())
    }

    /// Starts the server again on the same port, with the messages and the refusals it had.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await?;
        self.launch().await
    }

    /// Starts the server on `self.port` and waits for its greeting.
    async fn launch(&mut self) -> anyhow::Result<()> {
        let log = self.directory.join("aiosmtpd.log");
        let mut server = Launch::new("aiosmtpd", &self.aiosmtpd)
            .env("PYTHONPATH", &self.directory)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .args(["--nosetuid", "--smtputf8", "--listen"])
            .args([format!("127.0.0.1:{}", self.port)])
            .args(["--class", &format!("{HANDLER_MODULE}.Catcher")])
            .args([&self.directory])
            .current_dir(&self.directory)
            .log_to(&log)
            .spawn()?;
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Err(error) = server.ensure_running() {
                let output = std::fs::read_to_string(&log).unwrap_or_default();
                bail!(
                    "{error:#} before it greeted on port {}; its log:\n{output}",
                    self.port
                );
            }
            if greets(self.port).await {
                self.server = Some(server);
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "aiosmtpd did not greet on port {} within {} s (log: {})",
                self.port,
                READY_WITHIN.as_secs(),
                log.display()
            );
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// Adds a line for `address` to the file the handler reads at every `RCPT TO`; the last
    /// line for an address holds. Written aside then renamed, so the handler never reads half
    /// a file.
    fn answer(&self, address: &str, code: u16) {
        let path = self.directory.join("recipients");
        let mut rules = std::fs::read_to_string(&path).unwrap_or_default();
        rules.push_str(&format!("{code} {address}\n"));
        let partial = self.directory.join("recipients.partial");
        std::fs::write(&partial, rules)
            .and_then(|()| std::fs::rename(&partial, &path))
            .unwrap_or_else(|error| panic!("writing {}: {error}", path.display()));
    }

    fn read_mail(&self) -> anyhow::Result<Vec<ReceivedMail>> {
        let directory = self.directory.join("mail");
        let mut names: Vec<PathBuf> = std::fs::read_dir(&directory)
            .with_context(|| format!("listing {}", directory.display()))?
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|path| {
                path.extension()
                    .is_some_and(|extension| extension == "json")
            })
            .collect();
        names.sort();
        names
            .into_iter()
            .map(|json| {
                let text = std::fs::read_to_string(&json)
                    .with_context(|| format!("reading {}", json.display()))?;
                let mut mail: ReceivedMail = serde_json::from_str(&text)
                    .with_context(|| format!("parsing {}", json.display()))?;
                let eml = json.with_extension("eml");
                mail.raw =
                    std::fs::read(&eml).with_context(|| format!("reading {}", eml.display()))?;
                Ok(mail)
            })
            .collect()
    }
}

impl Drop for SmtpCatcher {
    fn drop(&mut self) {
        // Killed before its directory goes.
        drop(self.server.take());
        if std::thread::panicking() {
            eprintln!(
                "the SMTP server's messages and log are kept in {}",
                self.directory.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.directory);
        }
    }
}

/// Whether an SMTP server on `port` sends its 220 greeting.
async fn greets(port: u16) -> bool {
    let Ok(stream) = TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    let mut stream = BufReader::new(stream);
    let mut greeting = String::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_line(&mut greeting)).await;
    let greeted = matches!(read, Ok(Ok(_))) && greeting.starts_with("220");
    let _ = stream.get_mut().write_all(b"QUIT\r\n").await;
    greeted
}
