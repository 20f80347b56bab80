//! Settings in layers: the defaults in each settings type, then an optional file, then
//! environment variables named `IDENTITY__SECTION__KEY` (for example
//! `IDENTITY__DATABASE__URL`), so a Kubernetes ConfigMap or Secret can set any of them.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::DeserializeOwned;

/// The environment variable prefix of every setting.
pub const ENV_PREFIX: &str = "IDENTITY";

/// The settings file every binary takes: `--config FILE`, or `IDENTITY_CONFIG`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConfigFile {
    /// A TOML settings file; `IDENTITY__SECTION__KEY` environment variables override it.
    #[arg(
        long = "config",
        value_name = "FILE",
        env = "IDENTITY_CONFIG",
        global = true
    )]
    pub path: Option<std::path::PathBuf>,
}

impl ConfigFile {
    /// Settings of type `T`: its defaults, then this file, then the environment.
    pub fn load<T: DeserializeOwned>(&self) -> anyhow::Result<T> {
        let path = self.path.as_deref();
        load(path).map_err(|error| match path {
            Some(path) => anyhow::anyhow!("reading the settings ({}): {error}", path.display()),
            None => anyhow::anyhow!("reading the settings: {error}"),
        })
    }
}

/// Reads settings of type `T` from its defaults, the file (TOML) if given, and the environment.
pub fn load<T: DeserializeOwned>(file: Option<&Path>) -> Result<T, config::ConfigError> {
    load_with_defaults(file, &[])
}

/// Like [`load`], with `defaults` (dotted keys such as `http.address`) in place of the type's
/// own: for a process that runs the parts with other defaults (the standalone mode).
pub fn load_with_defaults<T: DeserializeOwned>(
    file: Option<&Path>,
    defaults: &[(&str, &str)],
) -> Result<T, config::ConfigError> {
    load_from(file, defaults, None)
}

/// The one way settings are read; `environment` replaces the process's variables in tests.
fn load_from<T: DeserializeOwned>(
    file: Option<&Path>,
    defaults: &[(&str, &str)],
    environment: Option<config::Map<String, String>>,
) -> Result<T, config::ConfigError> {
    let mut builder = config::Config::builder();
    for (key, value) in defaults {
        builder = builder.set_default(*key, *value)?;
    }
    if let Some(file) = file {
        builder = builder.add_source(config::File::from(file));
    }
    builder
        .add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                // A list from one variable: `IDENTITY__TOKENS__PUBLISHED_KEYS=<pem>,<pem>`
                // (PEM text has no commas), `IDENTITY__INTEGRATION__EVENTS=<type>,<type>`,
                // `IDENTITY__WEBHOOKS__ALLOWED_NETWORKS=10.0.0.0/8,fd00::/8`.
                .list_separator(",")
                .with_list_parse_key("tokens.published_keys")
                .with_list_parse_key("integration.events")
                .with_list_parse_key("webhooks.allowed_networks")
                .source(environment),
        )
        .build()?
        .try_deserialize()
}

/// A URL that may carry a password (a database's, an SMTP server's): it shows only redacted
/// (`Debug`, `Display`), so no settings dump or error message can leak it;
/// [`RedactedUrl::expose`] is for connecting.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct RedactedUrl(String);

impl RedactedUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL with its password, to connect with; never to log.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The file an `sqlite://` URL names, without its `?options`; `None` for a server.
    pub fn sqlite_file(&self) -> Option<&str> {
        let path = self.0.strip_prefix("sqlite://")?;
        path.split('?').next()
    }
}

impl From<&str> for RedactedUrl {
    fn from(url: &str) -> Self {
        Self::new(url)
    }
}

impl From<String> for RedactedUrl {
    fn from(url: String) -> Self {
        Self(url)
    }
}

impl fmt::Display for RedactedUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

impl fmt::Debug for RedactedUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedactedUrl({self})")
    }
}

/// Where a database is and how to use it.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct DatabaseSettings {
    /// `postgres://...` or `sqlite://path`.
    pub url: RedactedUrl,
    pub max_connections: u32,
    /// How often consumers look for new messages when no wake-up came.
    pub poll_interval_ms: u64,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: RedactedUrl::new("sqlite://data/identity.db"),
            max_connections: 16,
            poll_interval_ms: 500,
        }
    }
}

impl DatabaseSettings {
    pub fn poll_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.poll_interval_ms)
    }
}

/// Where the read model lives (the aggregator writes it, the query API reads it); by default
/// in the message store's database.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct ReadModelSettings {
    /// `postgres://...` or `sqlite://path`; unset or empty means `database.url`.
    pub url: Option<RedactedUrl>,
    /// The pool size; unset, each process's own default.
    pub max_connections: Option<u32>,
}

impl ReadModelSettings {
    /// The read model's URL: its own, else the message store's.
    pub fn url_or<'a>(&'a self, database: &'a DatabaseSettings) -> &'a RedactedUrl {
        self.url
            .as_ref()
            .filter(|url| !url.is_empty())
            .unwrap_or(&database.url)
    }
}

/// A process's HTTP listener.
#[derive(Debug, Clone, Deserialize)]
pub struct HttpSettings {
    /// Where to listen, `host:port`; port 0 picks a free one (tests).
    pub address: String,
}

impl HttpSettings {
    /// Listening on `address`: each process has its own default port.
    pub fn on(address: &str) -> Self {
        Self {
            address: address.to_owned(),
        }
    }
}

/// A URL with its password replaced, fit for a log line.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    // The last `@` before the path ends the credentials: a password may hold one itself.
    let authority = rest.split('/').next().unwrap_or(rest);
    match authority
        .rfind('@')
        .map(|at| (&rest[..at], &rest[at + 1..]))
    {
        Some((credentials, host)) => {
            let user = credentials.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:[redacted]@{host}")
        }
        None => url.to_owned(),
    }
}

/// Mail: the links in recovery mails and where the mailer sends them (ADR 12). Read by the
/// command API (which makes requests and checks links) and by the aggregator (whose mailer
/// writes and sends the mails); both need the same `token_key`.
#[derive(Clone, Deserialize)]
#[serde(default)]
pub struct MailSettings {
    /// `smtp://host:port` (STARTTLS when offered), `smtps://host:port` (TLS from the start), or
    /// `smtp://host:port?tls=required`; a user and password may be given in the URL or below.
    /// Unset: each mail is written as an `.eml` file under `outbox_dir` (the standalone default).
    pub smtp_url: Option<RedactedUrl>,
    pub smtp_username: Option<String>,
    /// Say from a Kubernetes Secret in `IDENTITY__MAIL__SMTP_PASSWORD`.
    pub smtp_password: Option<String>,
    /// Where mails go when there is no `smtp_url`.
    pub outbox_dir: PathBuf,
    /// The `From` of every mail.
    pub from: String,
    /// Links in mails are this base, a path per kind, and the token as `?token=`.
    pub link_base_url: String,
    /// A link is refused from this long after it was requested.
    pub token_seconds: u64,
    /// Reset, verification and change mails (notices included) an account gets in an hour.
    pub max_per_account_per_hour: u32,
    /// `POST /password-reset` and a `verify`-mode registration answer this long after they
    /// began, whatever the address, so that the timing tells nobody whether it has an account.
    pub answer_after_ms: u64,
    /// The key link secrets are derived with: 64 or more hexadecimal digits
    /// (`openssl rand -hex 32`), say from a Kubernetes Secret; wins over `token_key_file`.
    pub token_key: Option<String>,
    pub token_key_file: Option<PathBuf>,
    /// Create `token_key_file` when it does not exist (the standalone mode's first start).
    pub create_key_if_missing: bool,
}

impl Default for MailSettings {
    fn default() -> Self {
        Self {
            smtp_url: None,
            smtp_username: None,
            smtp_password: None,
            outbox_dir: PathBuf::from("data/mail"),
            from: "Identity <no-reply@localhost>".into(),
            link_base_url: "http://localhost:8080".into(),
            token_seconds: 30 * 60,
            max_per_account_per_hour: 5,
            answer_after_ms: 400,
            token_key: None,
            token_key_file: None,
            create_key_if_missing: false,
        }
    }
}

impl MailSettings {
    pub fn token_lifetime(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.token_seconds)
    }

    pub fn answer_after(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.answer_after_ms)
    }
}

impl fmt::Debug for MailSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = |value: &Option<String>| value.as_ref().map(|_| "[redacted]");
        f.debug_struct("MailSettings")
            .field("smtp_url", &self.smtp_url)
            .field("smtp_username", &self.smtp_username)
            .field("smtp_password", &redacted(&self.smtp_password))
            .field("outbox_dir", &self.outbox_dir)
            .field("from", &self.from)
            .field("link_base_url", &self.link_base_url)
            .field("token_seconds", &self.token_seconds)
            .field("max_per_account_per_hour", &self.max_per_account_per_hour)
            .field("answer_after_ms", &self.answer_after_ms)
            .field("token_key", &redacted(&self.token_key))
            .field("token_key_file", &self.token_key_file)
            .field("create_key_if_missing", &self.create_key_if_missing)
            .finish()
    }
}

/// The keys personal data is sealed and looked up with (docs/adr/0013), read by every binary
/// alike: the command API writes and erases, the aggregator projects, the query API shows
/// history.
#[derive(Clone, Deserialize)]
#[serde(default)]
pub struct PersonalDataSettings {
    /// The id the current master key is known by in the key table (letters, digits, `-`, `_`).
    pub master_key_id: String,
    /// The master key every person's key is wrapped with: 64 hexadecimal digits (`openssl rand
    /// -hex 32`), say from a Kubernetes Secret; wins over `master_key_file`.
    pub master_key: Option<String>,
    pub master_key_file: Option<PathBuf>,
    /// Master keys replaced by a rotation, still read until `command-api rewrap-keys` has
    /// rewrapped every person's key: `id:hex` pairs separated by commas.
    pub retired_master_keys: Option<String>,
    /// The key of the hash that names email reservation streams: 64 or more hexadecimal
    /// digits; wins over `lookup_key_file`.
    pub lookup_key: Option<String>,
    pub lookup_key_file: Option<PathBuf>,
    /// Create the key files when they do not exist (the standalone mode's first start).
    pub create_keys_if_missing: bool,
}

impl Default for PersonalDataSettings {
    fn default() -> Self {
        Self {
            master_key_id: "1".into(),
            master_key: None,
            master_key_file: None,
            retired_master_keys: None,
            lookup_key: None,
            lookup_key_file: None,
            create_keys_if_missing: false,
        }
    }
}

impl fmt::Debug for PersonalDataSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = |value: &Option<String>| value.as_ref().map(|_| "[redacted]");
        f.debug_struct("PersonalDataSettings")
            .field("master_key_id", &self.master_key_id)
            .field("master_key", &redacted(&self.master_key))
            .field("master_key_file", &self.master_key_file)
            .field("retired_master_keys", &redacted(&self.retired_master_keys))
            .field("lookup_key", &redacted(&self.lookup_key))
            .field("lookup_key_file", &self.lookup_key_file)
            .field("create_keys_if_missing", &self.create_keys_if_missing)
            .finish()
    }
}

/// How the logs look.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct LogSettings {
    /// `json` (one object per line, for collectors) or `pretty` (for a terminal).
    pub format: LogFormat,
    /// A tracing filter such as `info` or `info,sqlx=warn`; `RUST_LOG` overrides it.
    pub filter: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Json,
            filter: "info,sqlx=warn".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_in_a_database_url_is_redacted() {
        let redacted = redact_url("postgres://app:hunter2@db:5432/identity");
        assert_eq!(redacted, "postgres://app:[redacted]@db:5432/identity");
        // A password may hold an `@` of its own; an `@` after the host is not a password's.
        let redacted = redact_url("smtp://mailer:p@ss@smtp.example.com:587");
        assert_eq!(redacted, "smtp://mailer:[redacted]@smtp.example.com:587");
        let redacted = redact_url("https://host.example/path@here");
        assert_eq!(redacted, "https://host.example/path@here");
        let settings = DatabaseSettings {
            url: "postgres://app:hunter2@db/identity".into(),
            ..DatabaseSettings::default()
        };
        assert!(!format!("{settings:?}").contains("hunter2"));
        assert!(!settings.url.to_string().contains("hunter2"));
        assert_eq!(settings.url.expose(), "postgres://app:hunter2@db/identity");
    }

    #[test]
    fn the_read_model_is_in_the_message_store_unless_named() {
        let database = DatabaseSettings::default();
        let unset = ReadModelSettings::default();
        assert_eq!(unset.url_or(&database), &database.url);
        let empty = ReadModelSettings {
            url: Some("".into()),
            ..ReadModelSettings::default()
        };
        assert_eq!(empty.url_or(&database), &database.url);
        let named = ReadModelSettings {
            url: Some("postgres://replica/identity".into()),
            ..ReadModelSettings::default()
        };
        assert_eq!(
            named.url_or(&database).expose(),
            "postgres://replica/identity"
        );
    }

    #[derive(Debug, Deserialize)]
    struct Example {
        database: DatabaseSettings,
        tokens: ExampleTokens,
    }

    #[derive(Debug, Deserialize)]
    struct ExampleTokens {
        #[serde(default)]
        published_keys: Vec<String>,
        issuer: String,
    }

    #[test]
    fn environment_variables_override_defaults_and_lists_split_on_commas() {
        let environment = config::Map::from([
            (
                "IDENTITY__DATABASE__URL".to_owned(),
                "postgres://db/identity".to_owned(),
            ),
            (
                "IDENTITY__DATABASE__MAX_CONNECTIONS".to_owned(),
                "3".to_owned(),
            ),
            (
                "IDENTITY__TOKENS__PUBLISHED_KEYS".to_owned(),
                "first.pem,second.pem".to_owned(),
            ),
        ]);
        let example: Example = load_from(
            None,
            &[("tokens.issuer", "https://issuer.example")],
            Some(environment),
        )
        .unwrap();
        assert_eq!(example.database.url.expose(), "postgres://db/identity");
        assert_eq!(example.database.max_connections, 3);
        assert_eq!(
            example.database.poll_interval_ms, 500,
            "a default the environment left alone"
        );
        assert_eq!(example.tokens.published_keys, ["first.pem", "second.pem"]);
        assert_eq!(example.tokens.issuer, "https://issuer.example");
    }

    #[derive(Debug, Deserialize)]
    struct Lists {
        integration: Events,
        webhooks: Networks,
    }

    #[derive(Debug, Deserialize)]
    struct Events {
        events: Vec<String>,
    }

    #[derive(Debug, Deserialize)]
    struct Networks {
        allowed_networks: Vec<String>,
    }

    #[test]
    fn the_published_event_types_and_the_networks_webhooks_may_reach_are_lists_too() {
        let environment = config::Map::from([
            (
                "IDENTITY__INTEGRATION__EVENTS".to_owned(),
                "identity.user.registered.v1,identity.user.erased.v1".to_owned(),
            ),
            (
                "IDENTITY__WEBHOOKS__ALLOWED_NETWORKS".to_owned(),
                "127.0.0.0/8".to_owned(),
            ),
        ]);
        let lists: Lists = load_from(None, &[], Some(environment)).unwrap();
        assert_eq!(
            lists.integration.events,
            ["identity.user.registered.v1", "identity.user.erased.v1"]
        );
        assert_eq!(lists.webhooks.allowed_networks, ["127.0.0.0/8"]);
    }

    #[test]
    fn a_url_without_credentials_is_kept() {
        assert_eq!(
            redact_url("sqlite://data/identity.db"),
            "sqlite://data/identity.db"
        );
    }

    #[test]
    fn the_debug_output_of_mail_settings_hides_the_smtp_password_and_the_token_key() {
        let settings = MailSettings {
            smtp_url: Some("smtp://mailer:s3cret-url@smtp.example.com".into()),
            smtp_password: Some("s3cret-password".into()),
            token_key: Some("5ec12e7".repeat(10)),
            ..MailSettings::default()
        };
        let debug = format!("{settings:?}");
        for secret in ["s3cret-url", "s3cret-password", "5ec12e7"] {
            assert!(!debug.contains(secret), "{debug}");
        }
        assert!(debug.contains("smtp.example.com"), "{debug}");
    }
}
