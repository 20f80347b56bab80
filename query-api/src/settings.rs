//! The query API's settings: defaults here, then a TOML file, then `IDENTITY__...` variables.

use platform::settings::{
    DatabaseSettings, HttpSettings, LogSettings, PersonalDataSettings, ReadModelSettings,
};
use serde::Deserialize;
use tokens::TokenConfig;

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// The message store: read for an account's history and its state at a past instant.
    pub database: DatabaseSettings,
    /// The read model the aggregator builds; may be a read replica. Defaults to `database.url`.
    pub read_model: ReadModelSettings,
    pub http: HttpSettings,
    pub log: LogSettings,
    /// Only the keys to verify tokens with are needed: a signing key's public half or
    /// `published_keys`.
    pub tokens: TokenConfig,
    pub query: QuerySettings,
    /// The master keys that unwrap each person's key, kept in the message store's database
    /// (ADR 13): history, `as_of`, the export and the check of an account's status open
    /// personal fields with them. Only the master keys are read (`master_key_id`,
    /// `master_key` or `master_key_file`, `retired_master_keys`): the query API never creates,
    /// erases or rewraps a key, and names no reservation stream, so it needs no lookup key.
    pub personal_data: PersonalDataSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            database: DatabaseSettings::default(),
            read_model: ReadModelSettings::default(),
            http: HttpSettings::on("0.0.0.0:8081"),
            log: LogSettings::default(),
            tokens: TokenConfig::default(),
            query: QuerySettings::default(),
            personal_data: PersonalDataSettings::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(default)]
pub struct QuerySettings {
    /// The longest a request with `X-Min-Position` waits for the read model.
    pub max_wait_ms: u64,
    /// The page size of lists when the client names none, and the largest it may name.
    pub default_page_size: u32,
    pub max_page_size: u32,
    /// Profiles kept in memory (ADR 6); 0 reads every profile from the read model.
    pub cache_profiles: usize,
    /// How often the kept profiles are brought up to the read model.
    pub cache_sync_ms: u64,
    /// The longest a deactivation, or the end of a session, takes to reach every route,
    /// whatever state the users view is in: a caller's own row says whether their account is
    /// active (and in which session epoch) only while the view holds everything written this
    /// long ago; otherwise (the aggregator stopped or slow, a replay after a reset, a projection
    /// halted on a poison event, the read model or the message store out of reach) the
    /// account's stream in the message store decides. Administrators acting on others are
    /// always checked in the store, an answer that they are active taken at its word for this
    /// long; a session's stream saying it is live is taken at its word for this long too, or
    /// for as long as the query API's follower of session ends is current (ADR 11). 0 reads the
    /// store on every request.
    pub max_view_lag_ms: u64,
}

impl Default for QuerySettings {
    fn default() -> Self {
        Self {
            max_wait_ms: 5_000,
            default_page_size: 20,
            max_page_size: 100,
            cache_profiles: 100_000,
            cache_sync_ms: 5,
            max_view_lag_ms: 1_000,
        }
    }
}

impl Settings {
    /// The read model's pool: its own size, else the message store's.
    pub fn read_model_connections(&self) -> u32 {
        self.read_model
            .max_connections
            .unwrap_or(self.database.max_connections)
    }
}
