//! Spawning the application on a database of its own, and talking to it.

use std::sync::{Arc, Mutex, OnceLock};

use command_api::{AppState, Application, Settings};
use platform::clock::{Clock, ManualClock, SystemClock};
use serde_json::{Value, json};
use test_support::TestDatabase;
use tokens::{Algorithm, MailTokenKey, RefreshTokenKey, SigningKey, WebhookSecretKey};
use tracing_subscriber::fmt::MakeWriter;
use uuid::Uuid;

pub const PASSWORD: &str = "correct horse battery";

pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    pub clock: ManualClock,
    pub settings: Settings,
    pub database: Arc<TestDatabase>,
    /// The running application's state: its sealer opens what tests read from the store.
    pub state: AppState,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

/// Cheap argon2 parameters (the tests about parameters set their own), fresh keys (the personal
/// data's master and lookup keys included).
pub fn test_settings(database: &TestDatabase) -> Settings {
    let mut settings = Settings::default();
    settings.database.url = database.url().into();
    settings.database.max_connections = 10;
    settings.http.address = "127.0.0.1:0".into();
    let key = SigningKey::generate(Algorithm::EdDSA).unwrap();
    settings.tokens.signing_key = Some(key.to_pem().unwrap().expose_secret().clone());
    let refresh_key = RefreshTokenKey::generate().unwrap();
    settings.tokens.refresh_token_key = Some(refresh_key.to_hex().expose_secret().clone());
    let mail_key = MailTokenKey::generate().unwrap();
    settings.mail.token_key = Some(mail_key.to_hex().expose_secret().clone());
    let webhook_key = WebhookSecretKey::generate().unwrap();
    settings.webhooks.secret_key = Some(webhook_key.to_hex().expose_secret().clone());
    let master_key = personal_data::MasterKey::generate("test-1").unwrap();
    settings.personal_data.master_key_id = "test-1".into();
    settings.personal_data.master_key = Some(master_key.to_hex().expose_secret().clone());
    let lookup_key = personal_data::LookupKey::generate().unwrap();
    settings.personal_data.lookup_key = Some(lookup_key.to_hex().expose_secret().clone());
    settings.tokens.issuer = "https://identity.test".into();
    settings.tokens.audience = "tests".into();
    settings.password.memory_kib = 1024;
    settings.password.iterations = 1;
    settings.login.max_waiting_hashes = 1000;
    settings
}

pub async fn spawn_app() -> TestApp {
    spawn_with(|_| {}).await
}

pub async fn spawn_with(configure: impl FnOnce(&mut Settings)) -> TestApp {
    let database = Arc::new(TestDatabase::new().await);
    let mut settings = test_settings(&database);
    configure(&mut settings);
    // Near the real time: the store stamps messages with the database's clock, and the login
    // history retention compares those stamps with this clock.
    let clock = ManualClock::new(SystemClock.now());
    spawn_on(database, settings, clock).await
}

/// Another application on the same database and clock (a restart, or a second replica).
pub async fn spawn_on(
    database: Arc<TestDatabase>,
    settings: Settings,
    clock: ManualClock,
) -> TestApp {
    capture_logs();
    let application = Application::build(settings.clone(), Arc::new(clock.clone()))
        .await
        .expect("building the application");
    let address = format!("http://127.0.0.1:{}", application.port());
    let state = application.state().clone();
    let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(application.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    TestApp {
        address,
        client: reqwest::Client::new(),
        clock,
        settings,
        database,
        state,
        _shutdown: shutdown,
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    pub async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub async fn post_as(&self, path: &str, token: &str, body: Value) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub async fn delete_as(&self, path: &str, token: &str) -> reqwest::Response {
        self.client
            .delete(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    /// The JSON body of `GET path`, whatever its status.
    pub async fn get_json(&self, path: &str) -> Value {
        self.get(path).await.json().await.unwrap()
    }

    pub async fn register(&self, email: &str, password: &str) -> reqwest::Response {
        self.post("/users", json!({ "email": email, "password": password }))
            .await
    }

    /// Registers with an id of the client's choosing, as a client that may retry does.
    pub async fn register_with_id(&self, email: &str, id: Uuid) -> reqwest::Response {
        self.post(
            "/users",
            json!({ "email": email, "password": PASSWORD, "id": id }),
        )
        .await
    }

    /// Registers and returns the new id.
    pub async fn user(&self, email: &str) -> String {
        let response = self.register(email, PASSWORD).await;
        assert_eq!(response.status(), 201);
        let body: Value = response.json().await.unwrap();
        body["id"].as_str().unwrap().to_owned()
    }

    pub async fn login(&self, email: &str, password: &str) -> reqwest::Response {
        self.post("/login", json!({ "email": email, "password": password }))
            .await
    }

    pub async fn token(&self, email: &str, password: &str) -> String {
        let response = self.login(email, password).await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        body["access_token"].as_str().unwrap().to_owned()
    }

    /// The body of a granted login: both tokens and the session.
    pub async fn login_body(&self, email: &str, password: &str) -> Value {
        let response = self.login(email, password).await;
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    /// `POST /token/refresh` with `refresh_token`.
    pub async fn refresh(&self, refresh_token: &str) -> reqwest::Response {
        self.post("/token/refresh", json!({ "refresh_token": refresh_token }))
            .await
    }

    /// Registers `email` with [`PASSWORD`] and logs in: the account's id and its access token.
    pub async fn signed_in(&self, email: &str) -> (String, String) {
        let id = self.user(email).await;
        (id, self.token(email, PASSWORD).await)
    }

    /// `POST /users/{id}/activate` with `token`.
    pub async fn activate(&self, id: &str, token: &str) -> reqwest::Response {
        self.post_as(&format!("/users/{id}/activate"), token, json!({}))
            .await
    }

    /// `POST /users/{id}/deactivate` with `token`.
    pub async fn deactivate(&self, id: &str, token: &str) -> reqwest::Response {
        self.post_as(&format!("/users/{id}/deactivate"), token, json!({}))
            .await
    }

    /// `POST /users/{id}/password` with `token`.
    pub async fn change_password(
        &self,
        id: &str,
        token: &str,
        current: &str,
        new: &str,
    ) -> reqwest::Response {
        let body = json!({ "current_password": current, "new_password": new });
        self.post_as(&format!("/users/{id}/password"), token, body)
            .await
    }

    /// An administrator made the way an operator makes one, and their token.
    pub async fn admin_token(&self) -> String {
        self.admin_token_for("admin@example.com").await
    }

    /// Creates an administrator as the operator does, and logs them in.
    pub async fn admin_token_for(&self, email: &str) -> String {
        command_api::create_admin(
            &self.settings,
            Arc::new(self.clock.clone()),
            email,
            PASSWORD.into(),
        )
        .await
        .unwrap();
        self.token(email, PASSWORD).await
    }

    /// The account id (`sub`) a token of this server names, read without verifying it.
    pub fn id_of_token(&self, token: &str) -> String {
        claims_of(token)["sub"].as_str().unwrap().to_owned()
    }

    /// Every message in the store, counted in SQL: the store's readers see a message only
    /// once no older transaction anywhere on the server is still open (docs/adr/0002), which
    /// other tests running at the same time can delay.
    pub async fn message_count(&self) -> i64 {
        let pool = self.database.pool().await;
        let count = sqlx::query_scalar("SELECT count(*) FROM messages")
            .fetch_one(&pool)
            .await
            .unwrap();
        pool.close().await;
        count
    }

    /// The type, data and metadata of every message of `category`, oldest first (in SQL, for
    /// the reason given at [`Self::message_count`]).
    pub async fn messages(&self, category: &str) -> Vec<(String, Value, Value)> {
        let pool = self.database.pool().await;
        let rows: Vec<(String, Value, Value)> = sqlx::query_as(
            "SELECT type, data, metadata FROM messages WHERE category = $1 ORDER BY global_position",
        )
        .bind(category)
        .fetch_all(&pool)
        .await
        .unwrap();
        pool.close().await;
        rows
    }

    /// [`Self::messages`] with their personal fields opened (an erased person's as null), as
    /// the service reads them.
    pub async fn unsealed_messages(&self, category: &str) -> Vec<(String, Value, Value)> {
        let mut messages = self.messages(category).await;
        for (_, data, _) in &mut messages {
            self.unseal(data).await;
        }
        messages
    }

    /// Opens the sealed fields of a message's data in place, with the application's vault.
    pub async fn unseal(&self, data: &mut Value) {
        self.state.commands.sealer.unseal(data).await.unwrap();
    }

    /// The lookup key the application names reservation streams with.
    pub fn lookup_key(&self) -> personal_data::LookupKey {
        self.state.commands.lookup_key.as_ref().clone()
    }

    /// The ids of the accounts that are active administrators, folded from their own streams
    /// (in SQL, for the reason given at [`Self::message_count`]).
    pub async fn active_administrators(&self) -> std::collections::BTreeSet<String> {
        let pool = self.database.pool().await;
        let rows: Vec<(String, String, Value, Value)> = sqlx::query_as(
            "SELECT stream_name, type, data, metadata FROM messages WHERE category = 'user' \
             ORDER BY global_position",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        pool.close().await;
        let mut accounts = std::collections::BTreeMap::<String, identity::UserAccount>::new();
        for (stream, kind, mut data, metadata) in rows {
            self.unseal(&mut data).await;
            let event = identity::UserEvent::from_stored(
                &kind,
                identity::event_version(&metadata).unwrap(),
                &data,
            )
            .unwrap();
            let account = accounts.entry(stream).or_default();
            *account = identity::evolve(std::mem::take(account), &event);
        }
        accounts
            .values()
            .filter_map(identity::UserAccount::account)
            .filter(|account| account.is_active() && account.has_role(identity::Role::Admin))
            .map(|account| account.id.to_string())
            .collect()
    }

    /// The global position of the last message in the store (0 for none), in SQL for the
    /// reason given at [`Self::message_count`].
    pub async fn last_position(&self) -> i64 {
        let pool = self.database.pool().await;
        let position = sqlx::query_scalar("SELECT coalesce(max(global_position), 0) FROM messages")
            .fetch_one(&pool)
            .await
            .unwrap();
        pool.close().await;
        position
    }

    pub async fn session_events(&self) -> Vec<identity::SessionEvent> {
        self.events("session", identity::SessionEvent::from_stored)
            .await
    }

    pub async fn login_events(&self) -> Vec<identity::LoginEvent> {
        self.events("userLogin", identity::LoginEvent::from_stored)
            .await
    }

    pub async fn user_events(&self) -> Vec<identity::UserEvent> {
        self.events("user", identity::UserEvent::from_stored).await
    }

    /// The events of `category`, oldest first, opened and read with their stream enum's
    /// `from_stored`.
    async fn events<E>(
        &self,
        category: &str,
        from_stored: impl Fn(&str, u32, &Value) -> Result<E, identity::EventDecodeError>,
    ) -> Vec<E> {
        self.unsealed_messages(category)
            .await
            .iter()
            .map(|(kind, data, metadata)| {
                from_stored(kind, identity::event_version(metadata).unwrap(), data).unwrap()
            })
            .collect()
    }
}

/// The claims of an access token of this server, read without verifying it.
pub fn claims_of(token: &str) -> Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}

/// Every log line of this test binary, at TRACE, for the test that looks for secrets in it.
pub fn logs() -> String {
    String::from_utf8_lossy(&LOGS.lock().unwrap()).into_owned()
}

static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

fn capture_logs() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(|| LOGS.make_writer())
            .try_init();
    });
}

/// The `X-Position` header of a command's answer.
pub fn position_of(response: &reqwest::Response) -> u64 {
    response.headers()["x-position"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

pub async fn problem(response: reqwest::Response) -> Value {
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json",
        "status {}",
        response.status()
    );
    response.json().await.unwrap()
}
