//! A query API on port 0 with its own database, a signing key, and helpers to seed the read
//! model and the message store, or to run the real aggregator over it. Every token it issues
//! belongs to a session started in the message store, as a login starts one: the query API
//! refuses a token whose session its stream does not show live. Personal fields of the events
//! it appends are sealed with their person's key in a real key vault, under the master key the
//! query API is given, so the store looks as the command API leaves it (ADR 13).

use std::fmt::Display;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aggregator::{Outcome, Projector, ProjectorOptions, ReadModelWriter};

use chrono::{DateTime, TimeDelta, Utc};
use identity::{
    AccountStatus, Email, LoginEvent, LoginSucceeded, PasswordHash, RefreshNonce, Role,
    SessionEndReason, SessionEnded, SessionEvent, SessionId, SessionPolicy, SessionStarted,
    UserAccount, UserActivated, UserAgent, UserDeactivated, UserErased, UserEvent, UserId,
    UserRegistered, event_version, login_stream_name, session_stream_name, user_stream_name,
};
use message_store::{ExpectedVersion, MessageStore, NewMessage, StreamAppend, StreamName};
use personal_data::Sealer;
use platform::clock::{Clock, SystemClock};
use query_api::Settings;
use read_model_schema::USERS_VERSION;
use serde_json::{Value, json};
use sqlx::PgPool;
use test_support::{FreezingProxy, PrivateCluster, TestDatabase};
use tokens::{Algorithm, KeySet, SigningKey, TokenIssuer};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    /// The read model's database.
    pub pool: PgPool,
    pub read_model_url: String,
    pub store: Arc<dyn MessageStore>,
    /// The key vault in the store's database, under the query API's master key: seals what the
    /// test appends, and erases.
    pub sealer: Sealer,
    pub issuer: TokenIssuer,
    /// The key the query API verifies with, to forge tokens the issuer would never make.
    pub signing_key: SigningKey,
    /// What the query API was built with.
    pub settings: Settings,
    /// The `application_name` of every connection the query API opens, to find them on the
    /// server.
    pub application_name: String,
    /// The read model's own database, when it is not the store's.
    pub read_model_database: Option<TestDatabase>,
    /// Completes the shutdown signal the application runs until (so does dropping it).
    stop: Option<oneshot::Sender<()>>,
    running: Option<JoinHandle<anyhow::Result<()>>>,
    /// The store's database on the shared server; none on a private cluster.
    _database: Option<TestDatabase>,
}

pub async fn spawn() -> TestApp {
    spawn_with(|_| {}).await
}

pub async fn spawn_with(configure: impl FnOnce(&mut Settings)) -> TestApp {
    spawn_on(TestDatabase::new().await, None, configure).await
}

/// The read model in a database of its own, beside the store's, as a deployment may have it.
pub async fn spawn_apart(configure: impl FnOnce(&mut Settings)) -> TestApp {
    let database = TestDatabase::new().await;
    let read_model = database.sibling("rm").await;
    spawn_on(database, Some(read_model), configure).await
}

/// The query API with its message store behind a proxy the test can freeze (a network cut, as
/// the server sees it); its read model, and the test's own connections, reach the server
/// directly.
pub async fn spawn_with_store_behind_proxy(
    configure: impl FnOnce(&mut Settings),
) -> (TestApp, FreezingProxy) {
    let database = TestDatabase::new().await;
    let proxy = FreezingProxy::start(database.url()).await;
    let (direct, proxied) = (database.url().to_owned(), proxy.url().to_owned());
    let app = spawn_on(database, None, |settings| {
        // The URL the query API was given, with its parameters, through the proxy.
        let given = settings.database.url.expose().to_owned();
        let parameters = given.strip_prefix(&direct).unwrap();
        let parameters = match parameters.strip_prefix('?') {
            Some(rest) if proxied.contains('?') => format!("&{rest}"),
            _ => parameters.to_owned(),
        };
        settings.database.url = format!("{proxied}{parameters}").into();
        configure(settings);
    })
    .await;
    (app, proxy)
}

/// Store and read model in one database of `cluster`, a server the test may stop and restart;
/// and the running query API's state, to reach its pools (holding it keeps them open).
pub async fn spawn_on_cluster(
    cluster: &PrivateCluster,
    configure: impl FnOnce(&mut Settings),
) -> (TestApp, query_api::AppState) {
    let url = cluster.create_database("identity").await;
    let pool = PgPool::connect(&url).await.unwrap();
    start(url.clone(), url, pool, None, None, configure).await
}

async fn spawn_on(
    database: TestDatabase,
    read_model_database: Option<TestDatabase>,
    configure: impl FnOnce(&mut Settings),
) -> TestApp {
    let read_model = read_model_database.as_ref().unwrap_or(&database);
    let (read_model_url, pool) = (read_model.url().to_owned(), read_model.pool().await);
    start(
        database.url().to_owned(),
        read_model_url,
        pool,
        Some(database),
        read_model_database,
        configure,
    )
    .await
    .0
}

async fn start(
    database_url: String,
    read_model_url: String,
    pool: PgPool,
    database: Option<TestDatabase>,
    read_model_database: Option<TestDatabase>,
    configure: impl FnOnce(&mut Settings),
) -> (TestApp, query_api::AppState) {
    let mut migrator = sqlx::migrate!("../migrations/read_model/postgres");
    migrator.set_ignore_missing(true);
    migrator.run(&pool).await.unwrap();
    let store = message_store::connect(&database_url, message_store::ConnectOptions::default())
        .await
        .unwrap();
    // A master key of this test's own; the vault's table is made here, before the query API
    // opens it, as a deployment's migration Job makes it.
    let master_key = personal_data::MasterKey::generate("test").unwrap();
    let master_key_hex = master_key.to_hex().expose_secret().clone();
    let vault = personal_data::connect(
        &database_url,
        personal_data::MasterKeys::new(master_key, vec![]).unwrap(),
        2,
    )
    .await
    .unwrap();
    let sealer = Sealer::new(vault);

    let key = SigningKey::generate(Algorithm::EdDSA).unwrap();
    let application_name = format!("query-api-{}", Uuid::new_v4().simple());
    let named = |url: &str| {
        let separator = if url.contains('?') { '&' } else { '?' };
        format!("{url}{separator}application_name={application_name}")
    };
    let mut settings = Settings::default();
    settings.database.url = named(&database_url).into();
    settings.read_model.url = Some(named(&read_model_url).into());
    settings.http.address = "127.0.0.1:0".into();
    settings.tokens.signing_key = Some(key.to_pem().unwrap().expose_secret().clone());
    settings.query.max_wait_ms = 2_000;
    settings.personal_data.master_key_id = "test".into();
    settings.personal_data.master_key = Some(master_key_hex);
    configure(&mut settings);
    let issuer = TokenIssuer::new(KeySet::from(key.clone()), settings.tokens.settings());

    let application = query_api::Application::build(settings.clone(), Arc::new(SystemClock))
        .await
        .unwrap();
    let address = format!("http://127.0.0.1:{}", application.port());
    let state = application.state().clone();
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(application.run_until_stopped(async {
        let _ = stopped.await;
    }));
    let app = TestApp {
        address,
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap(),
        pool,
        read_model_url,
        store,
        sealer,
        issuer,
        signing_key: key,
        settings,
        application_name,
        read_model_database,
        stop: Some(stop),
        running: Some(running),
        _database: database,
    };
    (app, state)
}

pub fn now() -> DateTime<Utc> {
    SystemClock.now()
}

/// A user as the users view holds it.
pub struct Seeded {
    pub id: Uuid,
}

impl TestApp {
    /// Gives the application its shutdown signal and waits, up to `within`, until it has
    /// stopped: what it returned, or `None` if it was still running.
    pub async fn stop_within(&mut self, within: Duration) -> Option<anyhow::Result<()>> {
        drop(self.stop.take());
        let running = self.running.take()?;
        tokio::time::timeout(within, running)
            .await
            .ok()
            .map(|joined| joined.unwrap())
    }

    /// The connections the query API holds open on the server, counted there.
    pub async fn open_connections(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1")
            .bind(&self.application_name)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    /// A token for `id`, in a session of its own started now.
    pub async fn token_for(&self, id: Uuid, roles: &[&str]) -> String {
        self.token_at(id, roles, now()).await
    }

    /// A token for `id` issued at `at`, in a session of its own started then.
    pub async fn token_at(&self, id: Uuid, roles: &[&str], at: DateTime<Utc>) -> String {
        let session = self.start_session(id, at).await;
        self.token_in(id, session, roles, at)
    }

    /// A token for `id` in `session`, issued at `at`; nothing is appended.
    pub fn token_in(&self, id: Uuid, session: Uuid, roles: &[&str], at: DateTime<Utc>) -> String {
        let roles = roles.iter().map(|role| (*role).to_owned()).collect();
        self.issuer
            .issue(id, session, roles, false, at)
            .unwrap()
            .token
            .expose_secret()
            .clone()
    }

    /// Starts a session of `id` at `at` with the default limits, as a login does, in the
    /// account's current session epoch (0 for an account the store does not hold), and returns
    /// its id.
    pub async fn start_session(&self, id: Uuid, at: DateTime<Utc>) -> Uuid {
        let started = self.session_started(id, at).await;
        let session = *started.session_id.as_uuid();
        self.append_session_event(SessionEvent::SessionStarted(started))
            .await;
        session
    }

    /// The event a login appends to start a session of `id` at `at` (the default limits, the
    /// account's current epoch, a user agent naming these tests), for a test to change before
    /// appending it.
    pub async fn session_started(&self, id: Uuid, at: DateTime<Utc>) -> SessionStarted {
        let policy = SessionPolicy::default();
        SessionStarted {
            session_id: SessionId::from_uuid(Uuid::now_v7()),
            user_id: UserId::from_uuid(id),
            session_epoch: self.session_epoch(id).await,
            started_at: at,
            expires_at: at + TimeDelta::from_std(policy.max).unwrap(),
            idle_expires_at: at + TimeDelta::from_std(policy.idle).unwrap(),
            user_agent: Some(UserAgent::new("query-api tests")),
            generation: 0,
            nonce: RefreshNonce::from_bytes([7; RefreshNonce::LEN]),
        }
    }

    /// Ends `session` of `user` now, as a logout does, and returns the event's position.
    pub async fn end_session(&self, user: Uuid, session: Uuid) -> u64 {
        self.append_session_event(SessionEvent::SessionEnded(SessionEnded {
            session_id: SessionId::from_uuid(session),
            user_id: UserId::from_uuid(user),
            ended_at: now(),
            reason: SessionEndReason::LoggedOut,
        }))
        .await
    }

    /// The account's session epoch, as its stream in the message store says (0 without one).
    pub async fn session_epoch(&self, id: Uuid) -> u64 {
        let stream = StreamName::parse(user_stream_name(UserId::from_uuid(id))).unwrap();
        let mut messages = self.store.read_stream(&stream, 0, 10_000).await.unwrap();
        self.sealer.unseal_messages(&mut messages).await.unwrap();
        let events: Vec<UserEvent> = messages
            .iter()
            .map(|message| {
                let version = event_version(&message.metadata).unwrap();
                UserEvent::from_stored(&message.message_type, version, &message.data).unwrap()
            })
            .collect();
        UserAccount::fold(&events)
            .account()
            .map_or(0, |account| account.session_epoch)
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> reqwest::Response {
        let mut request = self.client.get(self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.unwrap()
    }

    /// `path` for `token`, answered once the read model has reached `min_position`, if given.
    pub async fn get_with_min_position(
        &self,
        path: &str,
        token: &str,
        min_position: Option<u64>,
    ) -> reqwest::Response {
        let mut request = self.client.get(self.url(path)).bearer_auth(token);
        if let Some(position) = min_position {
            request = request.header("X-Min-Position", position.to_string());
        }
        request.send().await.unwrap()
    }

    /// The status and problem `path` answers `token` with (see [`problem`]).
    pub async fn get_problem(&self, path: &str, token: &str) -> (u16, serde_json::Value) {
        problem(self.get(path, Some(token)).await).await
    }

    /// An account in the store (its registration, and its deactivation when `status` says so)
    /// and its row in the users view, written as the aggregator would: at the position of its
    /// last event, with the checkpoint moved there.
    pub async fn seed_user(&self, email: &str, status: &str, roles: &[&str]) -> Seeded {
        self.seed_user_with_id(Uuid::now_v7(), email, status, roles)
            .await
    }

    /// Root, an active administrator, and a token of theirs.
    pub async fn seed_admin(&self) -> (Seeded, String) {
        let admin = self
            .seed_user("root@example.com", "active", &["admin"])
            .await;
        let token = self.token_for(admin.id, &["admin"]).await;
        (admin, token)
    }

    pub async fn seed_user_with_id(
        &self,
        id: Uuid,
        email: &str,
        status: &str,
        roles: &[&str],
    ) -> Seeded {
        let parsed = Email::parse(email).unwrap();
        let initial = match status {
            "pending" => AccountStatus::Pending,
            _ => AccountStatus::Active,
        };
        let mut position = self
            .append_user_event(id, registration(id, email, initial, roles, now()))
            .await;
        if status == "deactivated" {
            position = self.deactivate(id).await;
        }
        let session_epoch = i64::try_from(self.session_epoch(id).await).unwrap();
        let roles: Vec<String> = roles.iter().map(|role| (*role).to_owned()).collect();
        let position = i64::try_from(position).unwrap();
        let mut transaction = self.pool.begin().await.unwrap();
        sqlx::query(
            "INSERT INTO users (id, email, email_normalized, status, registered_at, login_count, roles, \
                                session_epoch, position) \
             VALUES ($1, $2, $3, $4, $5, 3, $6, $7, $8)",
        )
        .bind(id)
        .bind(parsed.as_str())
        .bind(parsed.normalized())
        .bind(status)
        .bind(now())
        .bind(&roles)
        .bind(session_epoch)
        .bind(position)
        .execute(&mut *transaction)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO projection_checkpoints (projection, version, position) VALUES ('users', $2, $1) \
             ON CONFLICT (projection) DO UPDATE \
             SET position = greatest(projection_checkpoints.position, excluded.position)",
        )
        .bind(position)
        .bind(USERS_VERSION)
        .execute(&mut *transaction)
        .await
        .unwrap();
        transaction.commit().await.unwrap();
        Seeded { id }
    }

    /// Registers an account in the message store only, as the command API does; the users view
    /// has it once an aggregator projects it.
    pub async fn register(&self, email: &str, roles: &[&str]) -> Uuid {
        let id = Uuid::now_v7();
        self.append_user_event(
            id,
            registration(id, email, AccountStatus::Active, roles, now()),
        )
        .await;
        id
    }

    /// Deactivates an account in the message store, as the command API does, and returns the
    /// event's position.
    pub async fn deactivate(&self, id: Uuid) -> u64 {
        self.append_user_event(
            id,
            UserEvent::UserDeactivated(UserDeactivated { at: now() }),
        )
        .await
    }

    /// The row of the session `started` in the sessions view, as the aggregator writes it: with
    /// its last refresh and its end, when given.
    pub async fn seed_session_row(
        &self,
        started: &SessionStarted,
        last_refreshed_at: Option<DateTime<Utc>>,
        ended_at: Option<DateTime<Utc>>,
    ) {
        sqlx::query(
            "INSERT INTO sessions (id, user_id, session_epoch, started_at, last_refreshed_at, \
                                   expires_at, idle_expires_at, user_agent, generation, ended_at, \
                                   end_reason, position) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 0, $9, $10, 1)",
        )
        .bind(started.session_id.as_uuid())
        .bind(started.user_id.as_uuid())
        .bind(i64::try_from(started.session_epoch).unwrap())
        .bind(started.started_at)
        .bind(last_refreshed_at)
        .bind(started.expires_at)
        .bind(started.idle_expires_at)
        .bind(started.user_agent.as_ref().map(UserAgent::as_str))
        .bind(ended_at)
        .bind(ended_at.map(|_| SessionEndReason::LoggedOut.name()))
        .execute(&self.pool)
        .await
        .unwrap();
    }

    /// Makes the read model's database refuse every connection and drops the open ones, as if
    /// its server were gone; the message store's stays up.
    pub async fn take_read_model_down(&self) {
        let (name, admin) = self.allow_read_model_connections(false).await;
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&name)
        .execute(&admin)
        .await
        .unwrap();
    }

    pub async fn bring_read_model_back(&self) {
        self.allow_read_model_connections(true).await;
    }

    /// Lets the read model's database take connections, or not; returns its name, and a pool
    /// of the store's database to administer it from.
    async fn allow_read_model_connections(&self, allowed: bool) -> (String, PgPool) {
        let name = self.read_model_database.as_ref().unwrap().name().to_owned();
        let admin = self._database.as_ref().unwrap().pool().await;
        sqlx::query(&format!(
            r#"ALTER DATABASE "{name}" ALLOW_CONNECTIONS {allowed}"#
        ))
        .execute(&admin)
        .await
        .unwrap();
        (name, admin)
    }

    /// Moves the users view's checkpoint to `position`, at the version it has (this build's
    /// when it has none yet).
    pub async fn set_checkpoint(&self, position: u64) {
        sqlx::query(
            "INSERT INTO projection_checkpoints (projection, version, position) VALUES ('users', $2, $1) \
             ON CONFLICT (projection) DO UPDATE SET position = excluded.position",
        )
        .bind(i64::try_from(position).unwrap())
        .bind(USERS_VERSION)
        .execute(&self.pool)
        .await
        .unwrap();
    }

    /// Marks the users view as folded by `version` of the projection, as a view an older
    /// build's aggregators keep folding during an upgrade until a rebuild swaps in this
    /// build's (ADR 8); the rows stay as they are.
    pub async fn set_checkpoint_version(&self, version: i32) {
        sqlx::query("UPDATE projection_checkpoints SET version = $1 WHERE projection = 'users'")
            .bind(version)
            .execute(&self.pool)
            .await
            .unwrap();
    }

    /// Appends a message of no interest to the read model and returns its position: a position
    /// a client could have been given by a command.
    pub async fn written_position(&self) -> u64 {
        let stream = StreamName::parse(format!("other-{}", Uuid::new_v4())).unwrap();
        self.append(stream, "Happened", 1, json!({})).await
    }

    /// Appends one user event to the message store, as the command API would: its personal
    /// fields sealed with the account's key.
    pub async fn append_user_event(&self, id: Uuid, event: UserEvent) -> u64 {
        let stream = StreamName::parse(user_stream_name(UserId::from_uuid(id))).unwrap();
        let data = self
            .sealed(id, event.personal_fields(), event.to_json())
            .await;
        self.append(stream, event.event_type(), event.version(), data)
            .await
    }

    /// `data` with `fields` sealed with `person`'s key, made on first use.
    pub async fn sealed(&self, person: Uuid, fields: &[&str], mut data: Value) -> Value {
        self.sealer.seal(person, fields, &mut data).await.unwrap();
        data
    }

    /// Erases `id` as the command API does, on behalf of `by`: appends `UserErased`, then
    /// deletes the account's key; returns the event's position.
    pub async fn erase(&self, id: Uuid, by: Uuid) -> u64 {
        let position = self.append_erasure(id, by).await;
        assert!(self.sealer.vault().erase(id).await.unwrap());
        position
    }

    /// Appends `UserErased` without deleting the key: the command API died in between.
    pub async fn append_erasure(&self, id: Uuid, by: Uuid) -> u64 {
        let erased = UserErased {
            erased_by: UserId::from_uuid(by),
            at: now(),
        };
        self.append_user_event(id, erased.into()).await
    }

    /// Appends one session event to its session's stream, as the command API would.
    pub async fn append_session_event(&self, event: SessionEvent) -> u64 {
        let stream = StreamName::parse(session_stream_name(event.session_id())).unwrap();
        self.append(stream, event.event_type(), event.version(), event.to_json())
            .await
    }

    pub async fn append_login_event(&self, id: Uuid, event: LoginEvent) -> u64 {
        let stream = StreamName::parse(login_stream_name(UserId::from_uuid(id))).unwrap();
        self.append(stream, event.event_type(), event.version(), event.to_json())
            .await
    }

    async fn append(
        &self,
        stream: StreamName,
        event_type: &str,
        version: u32,
        data: serde_json::Value,
    ) -> u64 {
        let message =
            NewMessage::new(event_type, data).with_metadata(json!({ "schemaVersion": version }));
        self.store
            .append(vec![StreamAppend::new(
                stream,
                ExpectedVersion::Any,
                vec![message],
            )])
            .await
            .unwrap()
            .last_global_position()
    }

    /// Registers, later activates nothing, and deactivates: the life of an account in events.
    pub async fn account_with_history(&self, registered: DateTime<Utc>) -> Uuid {
        let id = Uuid::now_v7();
        self.append_user_event(
            id,
            registration(
                id,
                "history@example.com",
                AccountStatus::Active,
                &["user"],
                registered,
            ),
        )
        .await;
        self.append_login_event(
            id,
            LoginEvent::LoginSucceeded(LoginSucceeded {
                at: registered + TimeDelta::minutes(5),
                login_count: 1,
            }),
        )
        .await;
        self.append_user_event(
            id,
            UserEvent::UserDeactivated(UserDeactivated {
                at: registered + TimeDelta::minutes(10),
            }),
        )
        .await;
        self.append_user_event(
            id,
            UserEvent::UserActivated(UserActivated {
                at: registered + TimeDelta::minutes(20),
            }),
        )
        .await;
        id
    }
}

/// The event the command API appends when `id` registers.
pub fn registration(
    id: Uuid,
    email: &str,
    status: AccountStatus,
    roles: &[&str],
    at: DateTime<Utc>,
) -> UserEvent {
    let email = Email::parse(email).unwrap();
    UserEvent::UserRegistered(UserRegistered {
        user_id: UserId::from_uuid(id),
        email_normalized: email.normalized().to_owned().into(),
        email: email.into(),
        password_hash: a_password_hash().into(),
        status,
        roles: roles
            .iter()
            .map(|role| match *role {
                "admin" => Role::Admin,
                _ => Role::User,
            })
            .collect(),
        registered_at: at,
    })
}

/// A password hash as the command API stores one (of no password anyone knows).
pub fn a_password_hash() -> PasswordHash {
    PasswordHash::parse("$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA")
        .unwrap()
}

pub async fn problem(response: reqwest::Response) -> (u16, serde_json::Value) {
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|value| value.to_str().unwrap().to_owned())
        .unwrap_or_default();
    assert_eq!(content_type, "application/problem+json", "status {status}");
    (status, response.json().await.unwrap())
}

/// Asserts that `answer` (see [`problem`]) is a `status` with the problem code `code`; `case`
/// names the input in a failure.
pub fn assert_refused(answer: &(u16, Value), status: u16, code: &str, case: impl Display) {
    let (actual, body) = answer;
    assert_eq!(
        (*actual, body["code"].as_str()),
        (status, Some(code)),
        "{case}: {body}"
    );
}

/// Every route an administrator takes on others, each reading `bob`, an account with the
/// email `bob@example.com`.
pub fn admin_routes_on(bob: Uuid) -> Vec<String> {
    let as_of = now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    vec![
        "/users?status=active".to_owned(),
        "/users?email=bob%40example.com".to_owned(),
        format!("/users/{bob}"),
        format!("/users/{bob}?as_of={as_of}"),
        format!("/users/{bob}/events"),
    ]
}

/// Asserts that every route of `routes` answers `token` (with `X-Min-Position` when given) with
/// the 401 an invalid token gets.
pub async fn refused_everywhere(
    app: &TestApp,
    token: &str,
    routes: &[String],
    min_position: Option<u64>,
) {
    let mut answers = Vec::new();
    for path in routes {
        let response = app.get_with_min_position(path, token, min_position).await;
        let status = response.status().as_u16();
        let code = if status == 200 {
            None
        } else {
            problem(response).await.1["code"]
                .as_str()
                .map(str::to_owned)
        };
        answers.push((path.as_str(), status, code));
    }
    assert!(
        answers
            .iter()
            .all(|(_, status, code)| *status == 401 && code.as_deref() == Some("invalid_token")),
        "not every route refused the token: {answers:?}"
    );
}

/// Asserts that `answer` is a 422 whose first error names `field`; `case` names the input in a
/// failure.
pub fn assert_field_refused(answer: &(u16, Value), field: &str, case: impl Display) {
    let (status, body) = answer;
    assert_eq!(
        (*status, body["errors"][0]["field"].as_str()),
        (422, Some(field)),
        "{case}: {body}"
    );
}

/// `read` of each element of the JSON array `list`, such as a page's `items`.
pub fn each<'a, T>(list: &'a Value, read: impl FnMut(&'a Value) -> T) -> Vec<T> {
    list.as_array().unwrap().iter().map(read).collect()
}

/// The real projection worker over the app's store and read model.
pub struct Aggregator {
    pub read_model: ReadModelWriter,
    pub projector: Projector,
}

impl Aggregator {
    pub async fn over(app: &TestApp, batch_size: usize) -> Self {
        let read_model = ReadModelWriter::connect(&app.read_model_url, 4)
            .await
            .unwrap();
        let projector = Projector::users(
            app.store.clone(),
            app.sealer.clone(),
            read_model.clone(),
            ProjectorOptions {
                batch_size,
                ..ProjectorOptions::default()
            },
        );
        Self {
            read_model,
            projector,
        }
    }

    pub async fn checkpoint(&self) -> u64 {
        self.read_model
            .checkpoint("users")
            .await
            .unwrap()
            .map_or(0, |checkpoint| checkpoint.position)
    }

    /// Projects everything written so far, or up to a poison event: the last step's outcome.
    pub async fn catch_up(&mut self, app: &TestApp) -> Outcome {
        let last = app.store.last_position().await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let outcome = self.projector.process_next_batch().await.unwrap();
            if matches!(outcome, Outcome::Halted { .. }) || self.checkpoint().await >= last {
                return outcome;
            }
            assert!(Instant::now() < deadline, "the projection never caught up");
            if outcome == Outcome::Idle {
                // Written but not readable yet (an older transaction still open).
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
}
