//! A binary as a process of a test or a benchmark: started with the settings given and none of
//! this shell's, waited for until it serves HTTP, and stopped the way an orchestrator stops it
//! (a signal, then a wait for it to exit). Dropping a [`Process`] kills it, so that a failed
//! assertion or an error never leaves one behind.
//!
//! The waits poll: a process gives no sign that it is ready but its answers, and the standard
//! library's child has no exit to await.

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// How long a process may take to serve its first answer.
const READY_WITHIN: Duration = Duration::from_secs(30);
/// How long a process may take to exit once signalled.
const EXIT_WITHIN: Duration = Duration::from_secs(20);
const POLL_EVERY: Duration = Duration::from_millis(50);

/// A port nobody listens on at the moment, for a process to be told to serve on.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// Where cargo puts the binary `name` of a workspace package for the running executable: in
/// the same directory (a binary, such as the benchmarks) or in the one above (a test, which
/// cargo puts in `deps/`). The binary may not be built: [`Launch::spawn`] says so.
pub fn built_binary(name: &str) -> anyhow::Result<PathBuf> {
    let executable = std::env::current_exe().context("finding the running executable")?;
    let mut directory = executable
        .parent()
        .context("the running executable has no directory")?;
    if directory.ends_with("deps") {
        directory = directory
            .parent()
            .context("the deps directory has no parent")?;
    }
    Ok(directory.join(name))
}

/// A field of `/proc/<pid>/status` in kB, such as `VmRSS` (resident memory) or `VmHWM` (its
/// peak).
pub fn proc_status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| {
            let value = line.strip_prefix(field)?.strip_prefix(':')?;
            value.trim().trim_end_matches("kB").trim().parse().ok()
        })
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// The signals a test sends its processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGINT: Ctrl-C in a terminal.
    Interrupt,
    /// SIGTERM: how an orchestrator asks a process to stop.
    Terminate,
    /// SIGKILL: a crash, as far as the process can tell.
    Kill,
    /// SIGSTOP: a frozen process, as on a stalled node; its connections stay open.
    Stop,
}

impl Signal {
    fn name(self) -> &'static str {
        match self {
            Self::Interrupt => "INT",
            Self::Terminate => "TERM",
            Self::Kill => "KILL",
            Self::Stop => "STOP",
        }
    }
}

/// A binary to start: its arguments, its settings and where its output goes.
pub struct Launch {
    name: String,
    binary: PathBuf,
    command: Command,
    log: Option<PathBuf>,
}

impl Launch {
    /// `binary`, called `name` in messages, with none of this shell's settings (`IDENTITY*`,
    /// `RUST_LOG`) but the ones given here, as in a container: a developer's environment never
    /// changes what a test runs.
    pub fn new(name: impl Into<String>, binary: impl Into<PathBuf>) -> Self {
        Self::under(&[], name, binary)
    }

    /// `binary` run by the `wrapper` command line (say `taskset -c 0`, which lets it use one
    /// CPU), otherwise as [`Self::new`] runs it.
    pub fn under(wrapper: &[&str], name: impl Into<String>, binary: impl Into<PathBuf>) -> Self {
        let binary = binary.into();
        let mut command = match wrapper.split_first() {
            Some((program, arguments)) => {
                let mut command = Command::new(program);
                command.args(arguments).arg(&binary);
                command
            }
            None => Command::new(&binary),
        };
        for (variable, _) in std::env::vars_os() {
            if variable.to_string_lossy().starts_with("IDENTITY") {
                command.env_remove(variable);
            }
        }
        command.env_remove("RUST_LOG").stdin(Stdio::null());
        Self {
            name: name.into(),
            binary,
            command,
            log: None,
        }
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.command.env(key, value);
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.command.args(args);
        self
    }

    pub fn current_dir(mut self, directory: impl AsRef<Path>) -> Self {
        self.command.current_dir(directory);
        self
    }

    /// Appends the process's output (its logs, and whatever it writes to stderr) to `path`:
    /// a process started again under the same name writes on after its earlier self.
    pub fn log_to(mut self, path: impl Into<PathBuf>) -> Self {
        self.log = Some(path.into());
        self
    }

    /// Sends the process's logs (its stdout) nowhere; a panic, on stderr, still shows.
    pub fn discard_logs(mut self) -> Self {
        self.command.stdout(Stdio::null());
        self
    }

    pub fn spawn(self) -> anyhow::Result<Process> {
        self.spawn_with_input(None)
    }

    /// Runs the process to its end, `input` on its stdin (the password an operator's command
    /// asks for); an error, naming its log, when it fails or is still running after `timeout`.
    pub async fn run(self, input: Option<&str>, timeout: Duration) -> anyhow::Result<()> {
        let see = match &self.log {
            Some(log) => format!(": see {}", log.display()),
            None => String::new(),
        };
        let mut process = self.spawn_with_input(input)?;
        let status = process.wait_for_exit(timeout).await?;
        anyhow::ensure!(status.success(), "{} failed ({status}){see}", process.name);
        Ok(())
    }

    fn spawn_with_input(mut self, input: Option<&str>) -> anyhow::Result<Process> {
        anyhow::ensure!(
            self.binary.is_file(),
            "{} is missing: cargo builds it with its package (`cargo build --workspace`, into \
             the same target directory)",
            self.binary.display()
        );
        if let Some(path) = &self.log {
            let log = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?;
            self.command.stdout(log.try_clone()?).stderr(log);
        }
        if input.is_some() {
            self.command.stdin(Stdio::piped());
        }
        let child = self
            .command
            .spawn()
            .with_context(|| format!("starting {}", self.name))?;
        // Owned before the input is written: should writing fail, the process is killed.
        let mut process = Process {
            name: self.name,
            child,
        };
        if let (Some(input), Some(mut stdin)) = (input, process.child.stdin.take()) {
            writeln!(stdin, "{input}")
                .with_context(|| format!("writing to {}'s stdin", process.name))?;
        }
        Ok(process)
    }
}

/// A running binary, killed (and waited for) when dropped.
pub struct Process {
    name: String,
    child: Child,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The operating system's process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running: it has not exited, crashed or been killed.
    pub fn is_running(&mut self) -> bool {
        self.ensure_running().is_ok()
    }

    /// An error, with how it ended, when the process is no longer running.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited: {status}", self.name);
        }
        Ok(())
    }

    /// Waits until `path` on `port` answers 200; an error when the process exits first or
    /// 30 s go by.
    pub async fn wait_until_serves(
        &mut self,
        client: &reqwest::Client,
        port: u16,
        path: &str,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited before it served {path}: {status}", self.name);
            }
            let answer = client
                .get(format!("http://127.0.0.1:{port}{path}"))
                .send()
                .await;
            if answer.is_ok_and(|response| response.status() == reqwest::StatusCode::OK) {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} did not serve {path} on port {port} within {} s",
                self.name,
                READY_WITHIN.as_secs()
            );
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// Waits for the process to exit by itself; an error when it is still running after
    /// `timeout`.
    pub async fn wait_for_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        self.exit_within(timeout)
            .await?
            .with_context(|| format!("{} did not exit within {} s", self.name, timeout.as_secs()))
    }

    pub fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let sent = Command::new("kill")
            .args([format!("-{}", signal.name()), self.id().to_string()])
            .status()
            .context("running kill")?;
        anyhow::ensure!(
            sent.success(),
            "kill -{} {} failed",
            signal.name(),
            self.name
        );
        Ok(())
    }

    /// Sends `signal` and waits for the process to exit; an error when it is still running
    /// 20 s later.
    pub async fn stop(&mut self, signal: Signal) -> anyhow::Result<ExitStatus> {
        self.signal(signal)?;
        self.exit_within(EXIT_WITHIN).await?.with_context(|| {
            format!(
                "{} did not exit within {} s of SIG{}",
                self.name,
                EXIT_WITHIN.as_secs(),
                signal.name()
            )
        })
    }

    /// Stops the process as an orchestrator does, with SIGTERM; an error unless it exits
    /// successfully.
    pub async fn shut_down(&mut self) -> anyhow::Result<()> {
        let status = self.stop(Signal::Terminate).await?;
        anyhow::ensure!(
            status.success(),
            "{} exited with {status} on SIGTERM",
            self.name
        );
        Ok(())
    }

    /// How the process exited, or `None` when it is still running after `timeout`.
    async fn exit_within(&mut self, timeout: Duration) -> anyhow::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    fn shell(script: &str) -> Launch {
        Launch::new("the shell", "/bin/sh").args(["-c", script])
    }

    #[tokio::test]
    async fn a_process_stopped_with_a_signal_exits_by_it() {
        let mut process = shell("sleep 30").spawn().unwrap();
        assert!(process.is_running());
        let status = process.stop(Signal::Terminate).await.unwrap();
        assert_eq!(status.signal(), Some(15));
        assert!(!process.is_running());
    }

    #[tokio::test]
    async fn shutting_down_a_process_that_dies_of_sigterm_is_an_error() {
        let mut process = shell("sleep 30").spawn().unwrap();
        let error = process.shut_down().await.unwrap_err();
        assert!(format!("{error:#}").contains("on SIGTERM"), "{error:#}");
    }

    #[tokio::test]
    async fn a_run_gets_its_input_and_its_failure_names_the_log() {
        let log = std::env::temp_dir().join(format!("process-{}.log", uuid::Uuid::new_v4()));
        let script = r#"read line; echo "got $line"; test "$line" = secret"#;
        shell(script)
            .log_to(&log)
            .run(Some("secret"), Duration::from_secs(10))
            .await
            .unwrap();
        let error = shell(script)
            .log_to(&log)
            .run(Some("guess"), Duration::from_secs(10))
            .await
            .unwrap_err();
        assert!(
            format!("{error:#}").contains(&log.display().to_string()),
            "{error:#}"
        );
        // Both runs' output, the second after the first.
        let output = std::fs::read_to_string(&log).unwrap();
        assert_eq!(output, "got secret\ngot guess\n");
        let _ = std::fs::remove_file(log);
    }

    #[tokio::test]
    async fn waiting_for_a_process_that_exits_instead_of_serving_says_so() {
        let mut process = shell("exit 3").spawn().unwrap();
        let client = reqwest::Client::new();
        let error = process
            .wait_until_serves(&client, free_port().unwrap(), "/healthz")
            .await
            .unwrap_err();
        assert!(
            format!("{error:#}").contains("exited before it served /healthz"),
            "{error:#}"
        );
    }

    #[test]
    fn a_missing_binary_is_named() {
        let error = Launch::new("nothing", "/nonexistent/binary")
            .spawn()
            .err()
            .unwrap();
        assert!(
            format!("{error:#}").contains("/nonexistent/binary is missing"),
            "{error:#}"
        );
    }
}
