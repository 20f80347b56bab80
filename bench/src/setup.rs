//! Setting up a benchmark's subject before it measures: a fresh store, the command API in this
//! process, and requests whose answer must be what the benchmark expects.

use std::sync::Arc;
use std::time::Duration;

use aggregator::ReadModelWriter;

use command_api::hashing::Hasher;
use command_api::{Application, Settings};
use message_store::{ConnectOptions, MessageStore, PostgresMessageStore};
use personal_data::{LookupKey, MasterKey, MasterKeys, Sealer};
use platform::clock::SystemClock;
use reqwest::RequestBuilder;
use serde_json::Value;
use sqlx::PgPool;
use test_support::TestDatabase;
use tokens::{Algorithm, MailTokenKey, RefreshTokenKey, SigningKey, WebhookSecretKey};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A fresh database with the message store's tables, and a pool of it; the database is
/// dropped with the returned handle.
pub async fn store_database() -> anyhow::Result<(TestDatabase, PgPool)> {
    let database = TestDatabase::new().await;
    let pool = database.pool().await;
    PostgresMessageStore::migrate(&pool).await?;
    Ok((database, pool))
}

/// A sealer over a key vault in `database` (its table created on opening), under a master key
/// made for the run: what every consumer opens personal fields with (ADR 13).
pub async fn sealer(database: &TestDatabase) -> anyhow::Result<Sealer> {
    let master_keys = MasterKeys::new(MasterKey::generate("1")?, vec![])?;
    Ok(Sealer::new(
        personal_data::connect(database.url(), master_keys, 4).await?,
    ))
}

/// A consumer's two sides on `database`: its message store (8 connections, polling every
/// 500 ms when no wake-up comes) and its migrated read model (4 connections).
pub async fn store_and_read_model(
    database: &TestDatabase,
) -> anyhow::Result<(Arc<dyn MessageStore>, ReadModelWriter)> {
    let options = ConnectOptions {
        max_connections: 8,
        poll_interval: Duration::from_millis(500),
    };
    let store = message_store::connect(database.url(), options).await?;
    let read_model = ReadModelWriter::connect(database.url(), 4).await?;
    read_model.migrate().await?;
    Ok((store, read_model))
}

/// Sends `request` and reads the JSON body of its answer, which must have `status`; otherwise
/// the error names `what` was asked and the status that came.
pub async fn expect_json(
    request: RequestBuilder,
    status: u16,
    what: &str,
) -> anyhow::Result<Value> {
    let response = request.send().await?;
    anyhow::ensure!(response.status() == status, "{what}: {}", response.status());
    Ok(response.json().await?)
}

/// The command API in this process, spoken to over HTTP on a port of its own, and what a
/// benchmark takes from it for its baseline: its store and its hasher.
pub struct CommandApi {
    pub base: String,
    pub client: reqwest::Client,
    pub store: Arc<dyn MessageStore>,
    /// The very hasher the service's logins verify with.
    pub hasher: Hasher,
    stop: oneshot::Sender<()>,
    server: JoinHandle<anyhow::Result<()>>,
}

impl CommandApi {
    /// Starts it on `database` with its defaults (OWASP's argon2id parameters among them) and
    /// fresh keys, after `configure` has changed the settings it wants.
    pub async fn start(
        database: &TestDatabase,
        configure: impl FnOnce(&mut Settings),
    ) -> anyhow::Result<Self> {
        let mut settings = Settings::default();
        settings.database.url = database.url().into();
        settings.http.address = "127.0.0.1:0".into();
        let key = SigningKey::generate(Algorithm::EdDSA)?;
        settings.tokens.signing_key = Some(key.to_pem()?.expose_secret().clone());
        let refresh_key = RefreshTokenKey::generate()?;
        settings.tokens.refresh_token_key = Some(refresh_key.to_hex().expose_secret().clone());
        let mail_key = MailTokenKey::generate()?;
        settings.mail.token_key = Some(mail_key.to_hex().expose_secret().clone());
        let webhook_key = WebhookSecretKey::generate()?;
        settings.webhooks.secret_key = Some(webhook_key.to_hex().expose_secret().clone());
        // Personal fields are sealed, as in every deployment (ADR 13).
        let master_key = MasterKey::generate("1")?;
        settings.personal_data.master_key = Some(master_key.to_hex().expose_secret().clone());
        let lookup_key = LookupKey::generate()?;
        settings.personal_data.lookup_key = Some(lookup_key.to_hex().expose_secret().clone());
        configure(&mut settings);

        let application = Application::build(settings, Arc::new(SystemClock)).await?;
        let base = format!("http://127.0.0.1:{}", application.port());
        let store = application.state().commands.store.clone();
        let hasher = application.state().commands.hasher.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(application.run_until_stopped(async move {
            let _ = stopped.await;
        }));
        Ok(Self {
            base,
            client: reqwest::Client::new(),
            store,
            hasher,
            stop,
            server,
        })
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.server.await?
    }
}
