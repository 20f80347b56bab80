//! Settings in layers: the defaults in each settings type, then an optional file, then
//! environment variables named `IDENTITY__SECTION__KEY` (for example
//! `IDENTITY__DATABASE__URL`), so a Kubernetes ConfigMap or Secret can set any of them.

use std::fmt;
use std::path::Path;

use serde::Deserialize;
use serde::de::DeserializeOwned;

/// The environment variable prefix of every setting.
pub const ENV_PREFIX: &str = "IDENTITY";

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
                // (PEM text has no commas).
                .list_separator(",")
                .with_list_parse_key("tokens.published_keys")
                .source(environment),
        )
        .build()?
        .try_deserialize()
}

/// Where a database is and how to use it.
#[derive(Clone, Deserialize)]
#[serde(default)]
pub struct DatabaseSettings {
    /// `postgres://...` or `sqlite://path`.
    pub url: String,
    pub max_connections: u32,
    /// How often consumers look for new messages when no wake-up came.
    pub poll_interval_ms: u64,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: "sqlite://data/identity.db".into(),
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

impl fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("url", &redact_url(&self.url))
            .field("max_connections", &self.max_connections)
            .field("poll_interval_ms", &self.poll_interval_ms)
            .finish()
    }
}

/// A database URL with its password replaced, fit for a log line.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((credentials, host)) => {
            let user = credentials.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:[redacted]@{host}")
        }
        None => url.to_owned(),
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
        assert!(
            !format!(
                "{:?}",
                DatabaseSettings {
                    url: "postgres://app:hunter2@db/identity".into(),
                    ..DatabaseSettings::default()
                }
            )
            .contains("hunter2")
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
        assert_eq!(example.database.url, "postgres://db/identity");
        assert_eq!(example.database.max_connections, 3);
        assert_eq!(
            example.database.poll_interval_ms, 500,
            "a default the environment left alone"
        );
        assert_eq!(example.tokens.published_keys, ["first.pem", "second.pem"]);
        assert_eq!(example.tokens.issuer, "https://issuer.example");
    }

    #[test]
    fn a_url_without_credentials_is_kept() {
        assert_eq!(
            redact_url("sqlite://data/identity.db"),
            "sqlite://data/identity.db"
        );
    }
}
