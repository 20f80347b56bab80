//! The split deployment as a test or a benchmark runs it: the service's binaries as processes
//! of their own against one database, each with the settings a ConfigMap and a Secret would give
//! it, and their logs in a directory of the run's own.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use personal_data::{LookupKey, MasterKey, MasterKeys, Sealer};
use tokens::{Algorithm, MailTokenKey, RefreshTokenKey, SigningKey, WebhookSecretKey};

use crate::process::{Launch, Process, built_binary, free_port};

/// The services of the split deployment, in the order they start.
pub const ALL_SERVICES: [&str; 3] = ["command-api", "query-api", "aggregator"];

/// How long an operator's command (a migration, `admin create`, a rebuild) may run.
const OPERATOR_COMMAND_WITHIN: Duration = Duration::from_secs(120);

/// One deployment's shared configuration.
pub struct Deployment {
    /// The message store's database.
    pub url: String,
    /// The read model's database, when it is not the message store's.
    pub read_model_url: Option<String>,
    pub signing_key: String,
    /// The command API's refresh token key, in hexadecimal.
    pub refresh_token_key: String,
    /// The mail token key of the command API and the aggregator's mailer, in hexadecimal.
    pub mail_token_key: String,
    /// The key webhook endpoints' signing secrets are derived with, in hexadecimal: the command
    /// API shows a secret, the aggregator signs with it.
    pub webhook_secret_key: String,
    /// The master key that wraps each person's key (ADR 13), in hexadecimal, under id `1`:
    /// every service reads it.
    pub master_key: String,
    /// The key of the hash that names email reservation streams, in hexadecimal.
    pub lookup_key: String,
    /// Where each process writes its output: `<label>.log`.
    pub logs: PathBuf,
    /// Settings every process gets besides the databases and the key, as environment
    /// variables.
    settings: Vec<(String, String)>,
}

/// The services [`Deployment::start_services`] started, each on a port of its own.
pub struct Services {
    pub command_port: u16,
    pub query_port: u16,
    pub aggregator_port: u16,
    /// In the order they were named.
    pub processes: Vec<Process>,
}

impl Services {
    /// Stops every process with SIGTERM; an error naming each that did not exit successfully.
    pub async fn shut_down(mut self) -> anyhow::Result<()> {
        let mut failures = Vec::new();
        for process in &mut self.processes {
            if let Err(error) = process.shut_down().await {
                failures.push(format!("{error:#}"));
            }
        }
        anyhow::ensure!(failures.is_empty(), "{}", failures.join("; "));
        Ok(())
    }
}

impl Deployment {
    /// A deployment on the database at `url`, with fresh keys and its processes' logs
    /// in a new temp directory named after `name`.
    pub fn new(name: &str, url: &str) -> anyhow::Result<Self> {
        let logs = std::env::temp_dir().join(format!("{name}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
        Ok(Self {
            url: url.to_owned(),
            read_model_url: None,
            signing_key: SigningKey::generate(Algorithm::EdDSA)?
                .to_pem()?
                .expose_secret()
                .clone(),
            refresh_token_key: RefreshTokenKey::generate()?
                .to_hex()
                .expose_secret()
                .clone(),
            mail_token_key: MailTokenKey::generate()?.to_hex().expose_secret().clone(),
            webhook_secret_key: WebhookSecretKey::generate()?
                .to_hex()
                .expose_secret()
                .clone(),
            master_key: MasterKey::generate("1")?.to_hex().expose_secret().clone(),
            lookup_key: LookupKey::generate()?.to_hex().expose_secret().clone(),
            logs,
            settings: Vec::new(),
        })
    }

    /// The same deployment with `other`'s keys, as a restore or a move of an installation keeps
    /// its secrets: the restored persons' keys are wrapped under `other`'s master key.
    pub fn with_keys_of(mut self, other: &Deployment) -> Self {
        self.signing_key.clone_from(&other.signing_key);
        self.refresh_token_key.clone_from(&other.refresh_token_key);
        self.mail_token_key.clone_from(&other.mail_token_key);
        self.webhook_secret_key
            .clone_from(&other.webhook_secret_key);
        self.master_key.clone_from(&other.master_key);
        self.lookup_key.clone_from(&other.lookup_key);
        self
    }

    /// The same deployment with its read model in the database at `url`.
    pub fn with_read_model(mut self, url: &str) -> Self {
        self.read_model_url = Some(url.to_owned());
        self
    }

    /// The same deployment with `variable` set in every process it starts (unless the
    /// settings given for one process set it too).
    pub fn with_setting(mut self, variable: &str, value: impl Into<String>) -> Self {
        self.settings.push((variable.to_owned(), value.into()));
        self
    }

    /// A sealer over the deployment's key vault, with its master key: how a test opens the
    /// personal fields of the messages it reads from the store, as the services do.
    pub async fn sealer(&self) -> anyhow::Result<Sealer> {
        let master_keys = MasterKeys::new(MasterKey::from_hex("1", &self.master_key)?, vec![])?;
        let vault = personal_data::connect(&self.url, master_keys, 2).await?;
        Ok(Sealer::new(vault))
    }

    /// The file a process labelled `label` writes its output to.
    pub fn log(&self, label: &str) -> PathBuf {
        self.logs.join(format!("{label}.log"))
    }

    /// The binary cargo built beside the running executable, with this deployment's settings,
    /// its output in `label`'s log.
    pub fn launch(&self, binary: &str, label: &str) -> anyhow::Result<Launch> {
        self.launch_under(&[], binary, label)
    }

    /// [`Self::launch`], the binary run by the `wrapper` command line (see [`Launch::under`]).
    pub fn launch_under(
        &self,
        wrapper: &[&str],
        binary: &str,
        label: &str,
    ) -> anyhow::Result<Launch> {
        let mut launch = Launch::under(wrapper, label, built_binary(binary)?)
            .env("IDENTITY__DATABASE__URL", &self.url)
            .env("IDENTITY__TOKENS__SIGNING_KEY", &self.signing_key)
            .env(
                "IDENTITY__TOKENS__REFRESH_TOKEN_KEY",
                &self.refresh_token_key,
            )
            .env("IDENTITY__MAIL__TOKEN_KEY", &self.mail_token_key)
            .env("IDENTITY__WEBHOOKS__SECRET_KEY", &self.webhook_secret_key)
            .env("IDENTITY__PERSONAL_DATA__MASTER_KEY_ID", "1")
            .env("IDENTITY__PERSONAL_DATA__MASTER_KEY", &self.master_key)
            .env("IDENTITY__PERSONAL_DATA__LOOKUP_KEY", &self.lookup_key)
            // Without an SMTP server (the default), the aggregator's mails are files: in the
            // run's directory rather than under the working directory's `data/`.
            .env("IDENTITY__MAIL__OUTBOX_DIR", self.logs.join("mail"))
            .log_to(self.log(label));
        if let Some(url) = &self.read_model_url {
            launch = launch.env("IDENTITY__READ_MODEL__URL", url);
        }
        for (variable, value) in &self.settings {
            launch = launch.env(variable, value);
        }
        Ok(launch)
    }

    /// Starts `binary` with this deployment's settings and `settings` on top.
    pub fn start(
        &self,
        binary: &str,
        label: &str,
        settings: &[(&str, String)],
    ) -> anyhow::Result<Process> {
        self.start_under(&[], binary, label, settings)
    }

    /// [`Self::start`], the binary run by the `wrapper` command line (see [`Launch::under`]).
    pub fn start_under(
        &self,
        wrapper: &[&str],
        binary: &str,
        label: &str,
        settings: &[(&str, String)],
    ) -> anyhow::Result<Process> {
        let mut launch = self.launch_under(wrapper, binary, label)?;
        for (variable, value) in settings {
            launch = launch.env(variable, value);
        }
        launch.spawn()
    }

    /// Runs an operator's command to its end, `input` on its stdin; an error when it fails.
    pub async fn run(
        &self,
        binary: &str,
        args: &[&str],
        input: Option<&str>,
    ) -> anyhow::Result<()> {
        let label = format!("{binary}-{}", args.join("-"));
        self.launch(binary, &label)?
            .args(args)
            .run(input, OPERATOR_COMMAND_WITHIN)
            .await
            .with_context(|| format!("{binary} {}", args.join(" ")))
    }

    /// The migration Job: both migrations, as a release runs them before its services.
    pub async fn migrate(&self) -> anyhow::Result<()> {
        self.run("command-api", &["migrate"], None).await?;
        self.run("aggregator", &["migrate"], None).await
    }

    /// Starts `binary` on a free port with `settings` on top of the deployment's, and waits
    /// until it is alive (`/healthz`) and ready (`/readyz`: its databases answer).
    pub async fn start_service(
        &self,
        client: &reqwest::Client,
        binary: &str,
        label: &str,
        settings: &[(&str, String)],
    ) -> anyhow::Result<(Process, u16)> {
        self.start_service_under(client, &[], binary, label, settings)
            .await
    }

    /// [`Self::start_service`], the binary run by the `wrapper` command line (see
    /// [`Launch::under`]).
    pub async fn start_service_under(
        &self,
        client: &reqwest::Client,
        wrapper: &[&str],
        binary: &str,
        label: &str,
        settings: &[(&str, String)],
    ) -> anyhow::Result<(Process, u16)> {
        let port = free_port()?;
        let address = if binary == "aggregator" {
            "IDENTITY__AGGREGATOR__HTTP__ADDRESS"
        } else {
            "IDENTITY__HTTP__ADDRESS"
        };
        let mut settings = settings.to_vec();
        settings.push((address, format!("127.0.0.1:{port}")));
        let mut process = self.start_under(wrapper, binary, label, &settings)?;
        process.wait_until_serves(client, port, "/healthz").await?;
        process.wait_until_serves(client, port, "/readyz").await?;
        Ok((process, port))
    }

    /// Migrates, then starts the services `which` names (`command-api`, `query-api`,
    /// `aggregator`), each labelled with its name, and waits until each is ready.
    pub async fn start_services(
        &self,
        client: &reqwest::Client,
        which: &[&str],
        settings: &[(&str, String)],
    ) -> anyhow::Result<Services> {
        self.migrate().await?;
        let mut services = Services {
            command_port: 0,
            query_port: 0,
            aggregator_port: 0,
            processes: Vec::new(),
        };
        for &name in which {
            let (process, port) = self.start_service(client, name, name, settings).await?;
            match name {
                "command-api" => services.command_port = port,
                "query-api" => services.query_port = port,
                _ => services.aggregator_port = port,
            }
            services.processes.push(process);
        }
        Ok(services)
    }
}
