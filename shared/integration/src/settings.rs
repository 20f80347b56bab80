//! The settings of integration events and webhooks. The command API reads them to accept
//! webhook endpoints (which types exist, which networks they may reach, the key their secrets
//! are derived with); the aggregator to deliver.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::address::NetworkPolicy;
use crate::event::{Published, UnknownEventType};

/// `integration`: what is published, whatever the destination.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct IntegrationSettings {
    /// The CloudEvents `source` of every event: a URI reference naming this installation.
    pub source: String,
    /// The event types published (to NATS, and the ones webhooks may subscribe to). Unset: all
    /// but `identity.user.logged_in.v1`.
    pub events: Option<Vec<String>>,
}

impl Default for IntegrationSettings {
    fn default() -> Self {
        Self {
            source: "/identity".into(),
            events: None,
        }
    }
}

impl IntegrationSettings {
    pub fn published(&self) -> Result<Published, UnknownEventType> {
        Published::from_names(self.events.as_deref())
    }
}

/// `webhooks`: endpoints and their deliveries.
#[derive(Clone, Deserialize)]
#[serde(default)]
pub struct WebhookSettings {
    /// The key endpoints' signing secrets are derived with: 64 or more hexadecimal digits
    /// (`openssl rand -hex 32`), the same in the command API and the aggregator; wins over
    /// `secret_key_file`.
    pub secret_key: Option<String>,
    pub secret_key_file: Option<PathBuf>,
    /// Create `secret_key_file` when it does not exist (the standalone mode's first start).
    pub create_key_if_missing: bool,
    /// Networks (CIDR) endpoints may reach although they are not public, say `10.2.0.0/16`
    /// for receivers inside the cluster. Empty: public addresses only.
    pub allowed_networks: Vec<String>,
    /// How long one delivery may take, connecting included.
    pub timeout_ms: u64,
    /// The wait before a failed delivery is tried again, doubled after each failure in a row
    /// up to `retry_max_ms`.
    pub retry_first_ms: u64,
    pub retry_max_ms: u64,
    /// An endpoint whose deliveries have failed without a success for this long is disabled.
    pub disable_after_ms: u64,
    /// After a secret's rotation, how long deliveries are signed with the previous secret too.
    pub previous_secret_ms: u64,
    /// Delivery attempts kept per endpoint for `GET /webhooks/{id}/deliveries`.
    pub attempts_kept: u32,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        Self {
            secret_key: None,
            secret_key_file: None,
            create_key_if_missing: false,
            allowed_networks: Vec::new(),
            timeout_ms: 10_000,
            retry_first_ms: 1_000,
            retry_max_ms: 5 * 60 * 1000,
            disable_after_ms: 24 * 60 * 60 * 1000,
            previous_secret_ms: 24 * 60 * 60 * 1000,
            attempts_kept: 100,
        }
    }
}

impl WebhookSettings {
    pub fn network_policy(&self) -> Result<NetworkPolicy, ipnet::AddrParseError> {
        NetworkPolicy::allowing(&self.allowed_networks)
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.max(1))
    }

    pub fn disable_after(&self) -> Duration {
        Duration::from_millis(self.disable_after_ms)
    }

    pub fn previous_secret_for(&self) -> Duration {
        Duration::from_millis(self.previous_secret_ms)
    }
}

impl fmt::Debug for WebhookSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookSettings")
            .field(
                "secret_key",
                &self.secret_key.as_ref().map(|_| "[redacted]"),
            )
            .field("secret_key_file", &self.secret_key_file)
            .field("create_key_if_missing", &self.create_key_if_missing)
            .field("allowed_networks", &self.allowed_networks)
            .field("timeout_ms", &self.timeout_ms)
            .field("retry_first_ms", &self.retry_first_ms)
            .field("retry_max_ms", &self.retry_max_ms)
            .field("disable_after_ms", &self.disable_after_ms)
            .field("previous_secret_ms", &self.previous_secret_ms)
            .field("attempts_kept", &self.attempts_kept)
            .finish()
    }
}
