//! The three release binaries as processes of their own, with one deployment's settings.

use super::*;

/// One deployment: its database, its signing key (as a Secret would give it) and the
/// directory its processes log into.
pub(super) struct Deployment {
    pub(super) binaries: PathBuf,
    pub(super) database: TestDatabase,
    pub(super) signing_key: String,
    pub(super) logs: PathBuf,
    pub(super) log_filter: String,
}

impl Deployment {
    pub(super) async fn new(binaries: PathBuf, options: &Options) -> anyhow::Result<Self> {
        let logs = std::env::temp_dir().join(format!("identity-soak-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
        Ok(Self {
            binaries,
            database: TestDatabase::new().await,
            signing_key: SigningKey::generate(Algorithm::EdDSA)?
                .to_pem()?
                .expose_secret()
                .clone(),
            logs,
            log_filter: options.log_filter.clone(),
        })
    }

    /// The binary with this deployment's settings and none of this shell's, its output (logs
    /// are on stdout) in `<label>.log`.
    pub(super) fn command(&self, binary: &str, label: &str) -> anyhow::Result<Command> {
        let mut command = Command::new(self.binaries.join(binary));
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("IDENTITY") {
                command.env_remove(name);
            }
        }
        let path = self.logs.join(format!("{label}.log"));
        let log = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        command
            .env_remove("RUST_LOG")
            .env("IDENTITY__DATABASE__URL", self.database.url())
            .env("IDENTITY__TOKENS__SIGNING_KEY", &self.signing_key)
            .env("IDENTITY__LOG__FILTER", &self.log_filter)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        Ok(command)
    }

    /// Runs an operator's command to its end, `input` on its stdin; answers its output.
    pub(super) async fn run(
        &self,
        binary: &str,
        args: &[&str],
        input: Option<&str>,
    ) -> anyhow::Result<String> {
        let label = format!("{binary}-{}", args.join("-"));
        let mut command = self.command(binary, &label)?;
        command.args(args);
        if input.is_some() {
            command.stdin(Stdio::piped());
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {binary} {}", args.join(" ")))?;
        if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
            writeln!(stdin, "{input}")?;
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!("{binary} {} did not finish within 120 s", args.join(" "));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let path = self.logs.join(format!("{label}.log"));
        let output = std::fs::read_to_string(&path).unwrap_or_default();
        anyhow::ensure!(
            status.success(),
            "{binary} {} failed ({status}): see {}",
            args.join(" "),
            path.display()
        );
        Ok(output)
    }

    pub(super) fn start(
        &self,
        name: &'static str,
        (key, value): (&str, String),
    ) -> anyhow::Result<Service> {
        let child = self
            .command(name, name)?
            .env(key, value)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Service { name, child })
    }
}

pub(super) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A running binary, killed if the soak ends without stopping it.
pub(super) struct Service {
    pub(super) name: &'static str,
    pub(super) child: Child,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Service {
    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(super) fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            anyhow::bail!("{} exited during the run: {status}", self.name);
        }
        Ok(())
    }

    pub(super) async fn wait_until_healthy(
        &mut self,
        client: &reqwest::Client,
        port: u16,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!("{} exited before it served /healthz: {status}", self.name);
            }
            let answer = client
                .get(format!("http://127.0.0.1:{port}/healthz"))
                .send()
                .await;
            if answer.is_ok_and(|response| response.status() == StatusCode::OK) {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} did not serve /healthz within 30 s",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends SIGTERM and waits for the process to exit by itself.
    pub(super) async fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        let signalled = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()?;
        anyhow::ensure!(signalled.success(), "kill -TERM {} failed", self.name);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} did not stop within 20 s of SIGTERM",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
