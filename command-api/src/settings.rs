//! The command API's settings: defaults here, then a TOML file, then `IDENTITY__...` variables.

use std::time::Duration;

use identity::{InitialStatus, LockoutPolicy, PasswordPolicy, RecoveryPolicy, SessionPolicy};
use platform::settings::{
    DatabaseSettings, HttpSettings, LogSettings, MailSettings, PersonalDataSettings,
};
use serde::Deserialize;

/// Everything the command API can be told. Every field has a default, so an empty file works
/// (with a signing key given one way or another).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub http: HttpSettings,
    pub log: LogSettings,
    pub tokens: tokens::TokenConfig,
    pub password: PasswordSettings,
    pub login: LoginSettings,
    pub registration: RegistrationSettings,
    pub sessions: SessionSettings,
    pub mail: MailSettings,
    /// The master key that wraps each person's key, and the lookup key that names the email
    /// reservation streams (ADR 13); required, like the signing key.
    pub personal_data: PersonalDataSettings,
    /// Webhook endpoints: the key their secrets are derived with (required, like the signing
    /// key; the same in the aggregator, which signs with it), the networks they may reach
    /// besides public ones, and how long a rotated secret still signs.
    pub webhooks: integration::WebhookSettings,
    /// Which integration event types are published: an endpoint may subscribe to these only.
    pub integration: integration::IntegrationSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            database: DatabaseSettings::default(),
            http: HttpSettings::on("0.0.0.0:8080"),
            log: LogSettings::default(),
            tokens: tokens::TokenConfig::default(),
            password: PasswordSettings::default(),
            login: LoginSettings::default(),
            registration: RegistrationSettings::default(),
            sessions: SessionSettings::default(),
            mail: MailSettings::default(),
            personal_data: PersonalDataSettings::default(),
            webhooks: integration::WebhookSettings::default(),
            integration: integration::IntegrationSettings::default(),
        }
    }
}

/// The password policy and the argon2id cost of new hashes.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(default)]
pub struct PasswordSettings {
    pub min_length: usize,
    pub max_length: usize,
    /// argon2id memory cost in KiB (OWASP minimum: 19456, 19 MiB).
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl Default for PasswordSettings {
    fn default() -> Self {
        Self {
            min_length: 8,
            max_length: 128,
            memory_kib: 19_456,
            iterations: 2,
            parallelism: 1,
        }
    }
}

impl PasswordSettings {
    pub fn policy(&self) -> PasswordPolicy {
        PasswordPolicy {
            min_chars: self.min_length,
            max_chars: self.max_length,
        }
    }
}

/// Lockout, login history retention and the bound on waiting password checks.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(default)]
pub struct LoginSettings {
    pub max_failures: u32,
    pub lockout_base_seconds: u64,
    pub lockout_max_seconds: u64,
    /// Login events older than this are deleted, except each account's last one.
    pub history_retention_days: u32,
    /// How often the retention runs.
    pub prune_interval_seconds: u64,
    /// Threads that hash passwords, each holding `password.memory_kib` for good; `None` (the
    /// default) is one per core. Fewer leave cores to the rest of the service; a test sets it
    /// to know how many hashes run at once whatever machine it runs on.
    pub hashing_threads: Option<usize>,
    /// Password hashes that may wait for a hashing thread; beyond that a request gets 429. Each
    /// running hash holds `password.memory_kib`; waiting ones hold nothing but a task.
    pub max_waiting_hashes: usize,
    /// A login that does not succeed is answered this long after its password check ends (or
    /// after it started, when a full queue or the store kept it from one), whatever the reason:
    /// the store reads and writes that only a known account costs happen within it, so the
    /// answer's timing does not tell a known email from an unknown one.
    pub refusal_padding_ms: u64,
}

impl Default for LoginSettings {
    fn default() -> Self {
        Self {
            max_failures: 5,
            lockout_base_seconds: 30,
            lockout_max_seconds: 900,
            history_retention_days: 90,
            prune_interval_seconds: 3600,
            hashing_threads: None,
            max_waiting_hashes: 64,
            refusal_padding_ms: 25,
        }
    }
}

impl LoginSettings {
    pub fn lockout_policy(&self) -> LockoutPolicy {
        LockoutPolicy {
            max_failures: self.max_failures,
            base_lockout: Duration::from_secs(self.lockout_base_seconds),
            max_lockout: Duration::from_secs(self.lockout_max_seconds),
        }
    }

    pub fn refusal_padding(&self) -> Duration {
        Duration::from_millis(self.refusal_padding_ms)
    }

    /// How long login events are kept (an account's last one always stays).
    pub fn history_retention(&self) -> Duration {
        Duration::from_secs(u64::from(self.history_retention_days) * 24 * 3600)
    }

    /// How often old login events are pruned; at least every second.
    pub fn prune_interval(&self) -> Duration {
        Duration::from_secs(self.prune_interval_seconds.max(1))
    }

    /// `hashing_threads`, or the cores when it is not set: the CPUs this process may use, as
    /// the standard library's `available_parallelism` counts them on Linux, which reads the
    /// container's CPU limit (the cgroup's `cpu.max` quota, v2, or `cpu.cfs_quota_us`, v1) and
    /// the CPU affinity mask, not the node's cores. A pod limited to 2 CPUs on a 64-core node
    /// hashes on 2 threads (rounded up from a fractional limit); `tests/cpu_limit.rs` checks
    /// the affinity mask, which the same function reads.
    pub fn hashing_threads(&self) -> usize {
        self.hashing_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from))
    }
}

/// How long sessions last, and how long a replaced refresh token is still answered (ADR 10).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(default)]
pub struct SessionSettings {
    /// A session not refreshed for this long expires.
    pub idle_seconds: u64,
    /// No session lasts longer than this after its login, however often it is refreshed.
    pub max_seconds: u64,
    /// How long after a refresh the token it replaced, presented again, is taken for a racing
    /// duplicate (and answered with the current pair) rather than a reuse (which ends the
    /// session). Short: whoever holds the replaced token gets the current one within it.
    pub reuse_grace_seconds: u64,
}

impl Default for SessionSettings {
    fn default() -> Self {
        let policy = SessionPolicy::default();
        Self {
            idle_seconds: policy.idle.as_secs(),
            max_seconds: policy.max.as_secs(),
            reuse_grace_seconds: policy.reuse_grace.as_secs(),
        }
    }
}

impl SessionSettings {
    pub fn policy(&self) -> SessionPolicy {
        SessionPolicy {
            idle: Duration::from_secs(self.idle_seconds),
            max: Duration::from_secs(self.max_seconds),
            reuse_grace: Duration::from_secs(self.reuse_grace_seconds),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct RegistrationSettings {
    pub mode: RegistrationMode,
    /// The setting `mode` replaced. Read only to refuse it: a deployment that still says
    /// `pending` would otherwise start in `open` mode and activate every new account.
    initial_status: Option<String>,
}

impl RegistrationSettings {
    pub fn new(mode: RegistrationMode) -> Self {
        Self {
            mode,
            initial_status: None,
        }
    }

    /// Refuses the settings while the replaced `registration.initial_status` is set.
    pub fn check(&self) -> anyhow::Result<()> {
        match self.initial_status.as_deref() {
            None => Ok(()),
            Some(status) => anyhow::bail!(
                "registration.initial_status ({status}) was replaced by registration.mode: \
                 `pending` is `approval`, `active` is `open`, and `verify` activates an account \
                 when its address is confirmed; set registration.mode and remove \
                 registration.initial_status"
            ),
        }
    }
}

/// How `POST /users` treats a new account (ADR 12). Every mode mails a link that verifies the
/// address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegistrationMode {
    /// Active at once; a taken email is a 409.
    #[default]
    Open,
    /// Pending until the link in the mail is confirmed. Every registration is answered 202 with
    /// one body, after one delay, whether the address was taken or not; the owner of a taken
    /// address is mailed that someone tried. For public sign-up: nobody learns who has an
    /// account.
    Verify,
    /// Pending until an administrator activates it; a taken email is a 409.
    Approval,
}

impl RegistrationMode {
    /// The status an account registered in this mode starts with.
    pub fn initial_status(self) -> InitialStatus {
        match self {
            Self::Open => InitialStatus::Active,
            Self::Verify | Self::Approval => InitialStatus::Pending,
        }
    }
}

/// The links' lifetime and the hourly limit of mails, from the `mail` section.
pub fn recovery_policy(mail: &MailSettings) -> RecoveryPolicy {
    RecoveryPolicy {
        token_lifetime: mail.token_lifetime(),
        max_mails_per_hour: mail.max_per_account_per_hour,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_follow_owasp_and_the_issue() {
        let settings = Settings::default();
        assert_eq!(settings.password.memory_kib, 19_456);
        assert_eq!(settings.password.iterations, 2);
        assert_eq!(settings.password.parallelism, 1);
        assert_eq!(settings.tokens.lifetime_seconds, 900);
        assert_eq!(settings.registration.mode, RegistrationMode::Open);
        assert_eq!(settings.mail.token_seconds, 30 * 60);
        assert_eq!(settings.mail.max_per_account_per_hour, 5);
        assert_eq!(settings.http.address, "0.0.0.0:8080");
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        assert_eq!(settings.login.hashing_threads(), cores);
    }

    #[test]
    fn sessions_last_14_days_idle_90_days_at_most_and_a_replaced_token_10_seconds() {
        let sessions = Settings::default().sessions;
        assert_eq!(sessions.idle_seconds, 14 * 24 * 3600);
        assert_eq!(sessions.max_seconds, 90 * 24 * 3600);
        assert_eq!(sessions.reuse_grace_seconds, 10);
        let policy = SessionSettings {
            idle_seconds: 60,
            max_seconds: 3600,
            reuse_grace_seconds: 2,
        }
        .policy();
        assert_eq!(policy.idle, Duration::from_secs(60));
        assert_eq!(policy.max, Duration::from_secs(3600));
        assert_eq!(policy.reuse_grace, Duration::from_secs(2));
    }

    #[test]
    fn the_replaced_initial_status_setting_is_refused_rather_than_ignored() {
        let replaced: RegistrationSettings =
            serde_json::from_value(serde_json::json!({ "initial_status": "pending" })).unwrap();
        let error = replaced.check().unwrap_err().to_string();
        assert!(error.contains("registration.mode"), "{error}");
        assert!(error.contains("approval"), "{error}");
        assert!(
            RegistrationSettings::new(RegistrationMode::Verify)
                .check()
                .is_ok()
        );
    }
}
