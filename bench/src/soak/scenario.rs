//! The scenario's settings: the options a run takes and the fixed values it works with.

use std::time::Duration;

#[derive(clap::Args)]
pub struct Options {
    /// Seconds of measured traffic, after the warm-up.
    #[arg(long, default_value_t = 180)]
    pub(super) seconds: u64,
    /// Concurrent clients, each with one request in flight at a time.
    #[arg(long, default_value_t = 16)]
    pub(super) concurrency: usize,
    /// Logins per second; one in five with a wrong password or an unknown email.
    #[arg(long, default_value_t = 10.0)]
    pub(super) logins_per_second: f64,
    /// Registrations per second.
    #[arg(long, default_value_t = 4.0)]
    pub(super) registrations_per_second: f64,
    /// Accounts registered before the traffic starts, for the logins and reads to use (and a
    /// tenth as many more that only ever get wrong passwords).
    #[arg(long, default_value_t = 500)]
    pub(super) accounts: usize,
    /// Seconds of the same traffic before the measuring starts, so that pools, caches and
    /// allocators have settled when the resident memory at the start is read.
    #[arg(long, default_value_t = 15)]
    pub(super) warmup: u64,
    /// The processes' log filter. Their logs go to files; the default, the deployment's, logs
    /// every request.
    #[arg(long, default_value = "info,sqlx=warn")]
    pub(super) log_filter: String,
    /// Seconds between scrapes of each process's `/metrics`, as the Prometheus the manifests
    /// ask for would do; 0 leaves them unscraped.
    #[arg(long, default_value_t = 15)]
    pub(super) scrape_every: u64,
    /// Keep the processes' logs after a run that passed (a failed run always keeps them).
    #[arg(long)]
    pub(super) keep_logs: bool,
}

/// The password of every account that logs in successfully.
pub(super) const PASSWORD: &str = "a soak test's password";
pub(super) const ADMIN_EMAIL: &str = "root@soak.example.com";
pub(super) const ADMIN_PASSWORD: &str = "the soak administrator's password";
/// Sessions (tokens from logins) the reads draw from; the oldest is replaced by each new one.
pub(super) const SESSIONS: usize = 500;
/// A token is used no longer than this; the default lifetime is 15 minutes.
pub(super) const TOKEN_USE: Duration = Duration::from_secs(600);
/// How long the read model may take to catch up once the traffic stops.
pub(super) const CATCH_UP: Duration = Duration::from_secs(60);
pub(super) const SAMPLE_EVERY: Duration = Duration::from_millis(500);
