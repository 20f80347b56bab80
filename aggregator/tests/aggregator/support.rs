//! Writers that append real domain events through the message store and keep, beside them,
//! the rows the users and sessions views must end with: the fold of every event they appended.
//!
//! The events are written as the command API writes them: each personal field sealed with its
//! account's key from a real key vault in the store's database ([`sealer`]), so every test reads
//! a store like the deployed one, through the sealer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aggregator::read_model::Checkpoint;
use aggregator::view::{SessionRow, UserRow};
use aggregator::{Outcome, Projector, ProjectorOptions, ReadModelWriter, Target};
use chrono::{DateTime, Duration, TimeZone, Utc};
use identity::{
    AccountStatus, Email, EmailChanged, EmailVerified, LockoutLifted, LoginEvent, LoginFailed,
    LoginSucceeded, PasswordChanged, PasswordHash, PasswordRehashed, PasswordReset, RefreshNonce,
    Role, SessionEndReason, SessionEnded, SessionEvent, SessionId, SessionRefreshed,
    SessionStarted, SessionsEnded, UserActivated, UserAgent, UserDeactivated, UserErased,
    UserEvent, UserId, UserRegistered, login_stream_name, session_stream_name, user_stream_name,
};
use message_store::{
    ConnectOptions, ExpectedVersion, MessageStore, NewMessage, StreamAppend, StreamName,
};
use personal_data::{MasterKey, MasterKeys, Sealer};
use serde_json::json;
use test_support::TestDatabase;
use uuid::Uuid;

/// Runs the async fn `$test` (taking [`Stores`]) as two tests, `$name::on_postgresql` and
/// `$name::on_sqlite`.
macro_rules! on_both_engines {
    ($name:ident, $test:ident) => {
        mod $name {
            use crate::support::Stores;

            #[tokio::test]
            async fn on_postgresql() {
                super::$test(Stores::postgres().await).await;
            }

            #[tokio::test]
            async fn on_sqlite() {
                super::$test(Stores::sqlite().await).await;
            }
        }
    };
}
pub(crate) use on_both_engines;

pub struct Env {
    pub store: Arc<dyn MessageStore>,
    /// The key vault in the store's database, as the services open it.
    pub sealer: Sealer,
    pub read_model: ReadModelWriter,
    pub read_model_url: String,
    // Dropped last: the databases go when the test ends.
    pub _read_model_db: Option<TestDatabase>,
    pub db: TestDatabase,
}

impl Env {
    /// The rows of the live users view.
    pub async fn users_view(&self) -> Vec<UserRow> {
        self.read_model.rows(&Target::USERS).await.unwrap()
    }

    /// Both live views: what the live path built, to compare with a rebuild's or a replay's.
    pub async fn views(&self) -> Views {
        views(&self.read_model, &Target::USERS).await
    }

    /// The live users view's checkpoint, which the test expects to exist.
    pub async fn users_checkpoint(&self) -> Checkpoint {
        self.read_model.checkpoint("users").await.unwrap().unwrap()
    }
}

/// The store and the read model in one database.
pub async fn env() -> Env {
    env_with_read_model(ReadModelDatabase::TheStores).await
}

/// The read model in a database of its own.
pub async fn env_apart() -> Env {
    env_with_read_model(ReadModelDatabase::ItsOwn).await
}

enum ReadModelDatabase {
    TheStores,
    ItsOwn,
}

async fn env_with_read_model(database: ReadModelDatabase) -> Env {
    platform::metrics::handle();
    let db = TestDatabase::new().await;
    let read_model_db = match database {
        ReadModelDatabase::TheStores => None,
        ReadModelDatabase::ItsOwn => Some(db.sibling("rm").await),
    };
    let read_model_url = read_model_db.as_ref().unwrap_or(&db).url().to_owned();
    Env {
        store: connect_store(db.url()).await,
        sealer: sealer(db.url()).await,
        read_model: read_model(&read_model_url).await,
        read_model_url,
        _read_model_db: read_model_db,
        db,
    }
}

/// A message store and a read model on one engine, for tests that run on both.
pub struct Stores {
    pub store: Arc<dyn MessageStore>,
    /// The key vault in the store's database (the same SQLite file on SQLite).
    pub sealer: Sealer,
    pub read_model: ReadModelWriter,
    _keep: Keep,
}

/// What holds a [`Stores`]' data, removed when the test ends.
enum Keep {
    Postgres { _db: TestDatabase },
    Sqlite(std::path::PathBuf),
}

impl Drop for Keep {
    fn drop(&mut self) {
        if let Keep::Sqlite(dir) = self {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Stores {
    /// Both in a fresh PostgreSQL database.
    pub async fn postgres() -> Self {
        platform::metrics::handle();
        let db = TestDatabase::new().await;
        Self {
            store: connect_store(db.url()).await,
            sealer: sealer(db.url()).await,
            read_model: read_model(db.url()).await,
            _keep: Keep::Postgres { _db: db },
        }
    }

    /// Both in a fresh SQLite file, as the standalone mode keeps them.
    pub async fn sqlite() -> Self {
        platform::metrics::handle();
        let dir = std::env::temp_dir().join(format!("aggregator-{}", Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("sqlite://{}", dir.join("identity.db").display());
        Self {
            store: connect_store(&url).await,
            sealer: sealer(&url).await,
            read_model: read_model(&url).await,
            _keep: Keep::Sqlite(dir),
        }
    }

    /// The live users projection's worker, one batch at a time.
    pub fn projector(&self) -> Projector {
        Projector::users(
            self.store.clone(),
            self.sealer.clone(),
            self.read_model.clone(),
            options(1000),
        )
    }

    /// Steps `projector` until it has applied everything `writer` appended.
    pub async fn drain(&self, projector: &mut Projector, writer: &Writer) {
        drain(projector, &self.read_model, writer.last()).await;
    }

    pub async fn views(&self) -> Views {
        views(&self.read_model, &Target::USERS).await
    }

    /// Runs `sql`, the same on both engines, on the read model: for a test that changes the
    /// view behind the worker's back.
    pub async fn execute(&self, sql: &str) {
        match &self.read_model {
            ReadModelWriter::Postgres(pool) => sqlx::raw_sql(sql).execute(pool).await.map(drop),
            ReadModelWriter::Sqlite(pool) => sqlx::raw_sql(sql).execute(pool).await.map(drop),
        }
        .unwrap();
    }

    /// The ids of the accounts the live users view finds under the normalised email
    /// `normalized`, as the query API looks an address up.
    pub async fn ids_by_email(&self, normalized: &str) -> Vec<Uuid> {
        let lookup = "SELECT id FROM users WHERE email_normalized = $1 ORDER BY id";
        match &self.read_model {
            ReadModelWriter::Postgres(pool) => sqlx::query_scalar(lookup)
                .bind(normalized)
                .fetch_all(pool)
                .await
                .unwrap(),
            ReadModelWriter::Sqlite(pool) => {
                let ids: Vec<String> = sqlx::query_scalar(lookup)
                    .bind(normalized)
                    .fetch_all(pool)
                    .await
                    .unwrap();
                ids.iter().map(|id| Uuid::parse_str(id).unwrap()).collect()
            }
        }
    }

    /// Folds the views again from every event up to what `writer` appended, the way the
    /// operator does on each engine: `rebuild` beside the live views on PostgreSQL, `reset` and
    /// a replay by the next worker on SQLite.
    pub async fn rebuild(&self, writer: &Writer) {
        match &self.read_model {
            ReadModelWriter::Postgres(_) => {
                aggregator::admin::rebuild(&self.store, &self.sealer, &self.read_model, "users", 3)
                    .await
                    .unwrap();
            }
            ReadModelWriter::Sqlite(_) => {
                aggregator::admin::reset(&self.read_model, "users")
                    .await
                    .unwrap();
                assert!(self.views().await.users.is_empty(), "the reset emptied it");
                self.drain(&mut self.projector(), writer).await;
            }
        }
    }
}

pub async fn connect_store(url: &str) -> Arc<dyn MessageStore> {
    message_store::connect(
        url,
        ConnectOptions {
            max_connections: 20,
            poll_interval: std::time::Duration::from_millis(100),
        },
    )
    .await
    .unwrap()
}

/// The master keys of every test's vault.
pub fn master_keys() -> MasterKeys {
    MasterKeys::new(
        MasterKey::from_hex("test", &"4d".repeat(32)).unwrap(),
        vec![],
    )
    .unwrap()
}

/// A sealer over the key vault in the message store's database at `url`.
pub async fn sealer(url: &str) -> Sealer {
    Sealer::new(personal_data::connect(url, master_keys(), 4).await.unwrap())
}

pub async fn read_model(url: &str) -> ReadModelWriter {
    let read_model = ReadModelWriter::connect(url, 8).await.unwrap();
    read_model.migrate().await.unwrap();
    read_model
}

/// Every row of both views of a projection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Views {
    pub users: Vec<UserRow>,
    pub sessions: Vec<SessionRow>,
}

pub async fn views(read_model: &ReadModelWriter, target: &Target) -> Views {
    Views {
        users: read_model.rows(target).await.unwrap(),
        sessions: read_model.sessions(target).await.unwrap(),
    }
}

pub fn options(batch_size: usize) -> ProjectorOptions {
    ProjectorOptions {
        batch_size,
        lock_retry: std::time::Duration::from_millis(20),
        ..ProjectorOptions::default()
    }
}

/// Steps the projector until its checkpoint has reached `until`; returns the events applied.
///
/// A message becomes readable once every transaction that started before it has ended, on
/// the whole server (docs/adr/0002): tests running beside this one can hold it back a moment,
/// so "idle" alone does not mean "done".
pub async fn drain(projector: &mut Projector, read_model: &ReadModelWriter, until: u64) -> usize {
    let mut applied = 0;
    for _ in 0..2000 {
        match projector.process_next_batch().await.unwrap() {
            Outcome::Applied { events, .. } => applied += events,
            Outcome::Idle => {
                let reached = read_model
                    .checkpoint(projector.name())
                    .await
                    .unwrap()
                    .is_some_and(|checkpoint| checkpoint.position >= until);
                if reached {
                    return applied;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            Outcome::Halted { reason } => panic!("halted: {reason}"),
        }
    }
    panic!("the projector did not reach {until}");
}

/// Waits until readers of the global order can see position `until`.
pub async fn settle(store: &Arc<dyn MessageStore>, until: u64) {
    for _ in 0..2000 {
        if store.head_position().await.unwrap() >= until {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("position {until} did not become readable");
}

/// Waits until the live views hold the rows `writer` expects (a worker running beside the test
/// brings them), and fails if they do not within ten seconds.
pub async fn wait_for_rows(env: &Env, writer: &Writer) {
    let expected = writer.expected_views();
    for _ in 0..500 {
        if env.views().await == expected {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(env.views().await, expected);
}

/// The views' rows after draining a fresh projector over the store of `env` into a fresh
/// database: what a clean rebuild gives.
pub async fn clean_rebuild(env: &Env, until: u64) -> Views {
    let fresh = env.db.sibling(&format!("clean{}", fastrand::u32(..))).await;
    let read_model = read_model(fresh.url()).await;
    let mut projector = Projector::users(
        env.store.clone(),
        env.sealer.clone(),
        read_model.clone(),
        options(97),
    );
    drain(&mut projector, &read_model, until).await;
    views(&read_model, &Target::USERS).await
}

pub fn at(seconds: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + Duration::seconds(seconds)
}

fn hash() -> PasswordHash {
    PasswordHash::parse(test_support::bulk::PASSWORD_HASH).unwrap()
}

/// How long a test session lasts: its absolute and idle limits after its start or refresh.
const SESSION_MAX: Duration = Duration::days(90);
const SESSION_IDLE: Duration = Duration::days(14);

/// Appends events for users it owns and folds them, independently of the aggregator's code,
/// into the rows the views must hold.
#[derive(Clone)]
pub struct Writer {
    store: Arc<dyn MessageStore>,
    sealer: Sealer,
    pub expected: Arc<Mutex<HashMap<Uuid, UserRow>>>,
    pub expected_sessions: Arc<Mutex<HashMap<Uuid, SessionRow>>>,
    /// The sessions of erased accounts, which the view no longer holds: for the session events
    /// that race an erasure.
    sessions_of_erased: Arc<Mutex<HashMap<Uuid, SessionRow>>>,
    last: Arc<AtomicU64>,
}

impl Writer {
    /// A writer into `store` that seals personal fields with `sealer`.
    pub fn new(store: Arc<dyn MessageStore>, sealer: Sealer) -> Self {
        Self {
            store,
            sealer,
            expected: Arc::default(),
            expected_sessions: Arc::default(),
            sessions_of_erased: Arc::default(),
            last: Arc::default(),
        }
    }

    /// A writer that has written a [`random_history`](Self::random_history) already.
    pub async fn with_random_history(
        store: Arc<dyn MessageStore>,
        sealer: Sealer,
        users: usize,
        ops: usize,
    ) -> Self {
        let writer = Self::new(store, sealer);
        writer.random_history(users, ops).await;
        writer
    }

    /// The highest global position this writer (and its clones) appended.
    pub fn last(&self) -> u64 {
        self.last.load(Ordering::SeqCst)
    }

    pub fn expected_rows(&self) -> Vec<UserRow> {
        let mut rows: Vec<_> = self.expected.lock().unwrap().values().cloned().collect();
        rows.sort_by_key(|row| row.id);
        rows
    }

    pub fn expected_sessions(&self) -> Vec<SessionRow> {
        let mut rows: Vec<_> = self
            .expected_sessions
            .lock()
            .unwrap()
            .values()
            .cloned()
            .collect();
        rows.sort_by_key(|row| row.id);
        rows
    }

    pub fn expected_views(&self) -> Views {
        Views {
            users: self.expected_rows(),
            sessions: self.expected_sessions(),
        }
    }

    async fn append(&self, stream: String, message_type: &str, data: serde_json::Value) -> i64 {
        let message =
            NewMessage::new(message_type, data).with_metadata(json!({ "schemaVersion": 1 }));
        let appended = self
            .store
            .append(vec![StreamAppend::new(
                StreamName::parse(stream).unwrap(),
                ExpectedVersion::Any,
                vec![message],
            )])
            .await
            .unwrap();
        self.last
            .fetch_max(appended.last_global_position(), Ordering::SeqCst);
        appended.last_global_position() as i64
    }

    /// Appends `event` to the user's stream, its personal fields sealed with the account's
    /// key, and returns its position.
    pub async fn user_event(&self, id: Uuid, event: UserEvent) -> i64 {
        let mut data = event.to_json();
        self.sealer
            .seal(id, event.personal_fields(), &mut data)
            .await
            .unwrap();
        self.append(
            user_stream_name(UserId::from_uuid(id)),
            event.event_type(),
            data,
        )
        .await
    }

    /// Appends `event` to the user's stream, and `change`s the user's expected row with it.
    async fn user_event_changing(
        &self,
        id: Uuid,
        event: UserEvent,
        change: impl FnOnce(&mut UserRow),
    ) {
        let position = self.user_event(id, event).await;
        self.update(id, position, change);
    }

    /// Appends `event` to the user's login stream, and `change`s the user's expected row with it.
    async fn login_event_changing(
        &self,
        id: Uuid,
        event: LoginEvent,
        change: impl FnOnce(&mut UserRow),
    ) {
        let position = self
            .append(
                login_stream_name(UserId::from_uuid(id)),
                event.event_type(),
                event.to_json(),
            )
            .await;
        self.update(id, position, change);
    }

    pub async fn register(&self, id: Uuid, active: bool, t: i64) {
        let email = format!("User.{}@Example.com", id.simple());
        let status = if active {
            AccountStatus::Active
        } else {
            AccountStatus::Pending
        };
        let position = self
            .user_event(
                id,
                UserRegistered {
                    user_id: UserId::from_uuid(id),
                    email: Email::parse(&email).unwrap().into(),
                    email_normalized: email.to_lowercase().into(),
                    password_hash: hash().into(),
                    status,
                    roles: vec![Role::User],
                    registered_at: at(t),
                }
                .into(),
            )
            .await;
        self.expected.lock().unwrap().insert(
            id,
            UserRow {
                id,
                email: Some(email.clone()),
                email_normalized: Some(email.to_lowercase()),
                email_verified: false,
                status: if active { "active" } else { "pending" }.into(),
                registered_at: at(t),
                activated_at: active.then(|| at(t)),
                deactivated_at: None,
                last_login_at: None,
                login_count: 0,
                failed_logins: 0,
                locked_until: None,
                roles: vec!["user".into()],
                session_epoch: 0,
                erased_at: None,
                position,
            },
        );
    }

    fn update(&self, id: Uuid, position: i64, change: impl FnOnce(&mut UserRow)) {
        let mut expected = self.expected.lock().unwrap();
        let row = expected.get_mut(&id).unwrap();
        change(row);
        row.position = row.position.max(position);
    }

    fn row(&self, id: Uuid) -> UserRow {
        self.expected.lock().unwrap()[&id].clone()
    }

    pub async fn activate(&self, id: Uuid, t: i64) {
        self.user_event_changing(id, UserActivated { at: at(t) }.into(), |row| {
            row.status = "active".into();
            row.activated_at = Some(at(t));
        })
        .await;
    }

    pub async fn deactivate(&self, id: Uuid, t: i64) {
        self.user_event_changing(id, UserDeactivated { at: at(t) }.into(), |row| {
            row.status = "deactivated".into();
            row.deactivated_at = Some(at(t));
            row.session_epoch += 1;
        })
        .await;
    }

    pub async fn change_password(&self, id: Uuid, t: i64) {
        let changed = PasswordChanged {
            password_hash: hash().into(),
            at: at(t),
        };
        self.user_event_changing(id, changed.into(), |row| row.session_epoch += 1)
            .await;
    }

    pub async fn rehash_password(&self, id: Uuid, t: i64) {
        let rehashed = PasswordRehashed {
            password_hash: hash().into(),
            at: at(t),
        };
        self.user_event_changing(id, rehashed.into(), |_| {}).await;
    }

    /// A password set through a reset link: it ends every session, as a change does.
    pub async fn reset_password(&self, id: Uuid, t: i64) {
        let reset = PasswordReset {
            password_hash: hash().into(),
            at: at(t),
        };
        self.user_event_changing(id, reset.into(), |row| row.session_epoch += 1)
            .await;
    }

    /// The owner confirms the address through the link mailed to it.
    pub async fn verify_email(&self, id: Uuid, t: i64) {
        self.user_event_changing(id, EmailVerified { at: at(t) }.into(), |row| {
            row.email_verified = true;
        })
        .await;
    }

    /// The account moves to a new address of its own, confirmed through the link mailed to
    /// it; returns the new address as given.
    pub async fn change_email(&self, id: Uuid, t: i64) -> String {
        let email = format!("Moved.{t}.{}@Example.org", id.simple());
        let changed = EmailChanged {
            email: Email::parse(&email).unwrap().into(),
            email_normalized: email.to_lowercase().into(),
            at: at(t),
        };
        self.user_event_changing(id, changed.into(), |row| {
            row.email = Some(email.clone());
            row.email_normalized = Some(email.to_lowercase());
            row.email_verified = true;
        })
        .await;
        email
    }

    /// An administrator ends every session of the account.
    pub async fn end_all_sessions(&self, id: Uuid, t: i64) {
        self.user_event_changing(id, SessionsEnded { at: at(t) }.into(), |row| {
            row.session_epoch += 1;
        })
        .await;
    }

    /// Appends `event` to its session's stream and returns its position.
    async fn session_event(&self, event: SessionEvent) -> i64 {
        self.append(
            session_stream_name(event.session_id()),
            event.event_type(),
            event.to_json(),
        )
        .await
    }

    /// Starts a session of user `id` in the account's current epoch; returns its id.
    pub async fn start_session(&self, id: Uuid, t: i64) -> Uuid {
        let session = Uuid::now_v7();
        let epoch = self.row(id).session_epoch;
        let user_agent = format!("agent {}", fastrand::u16(..));
        let started = SessionStarted {
            session_id: SessionId::from_uuid(session),
            user_id: UserId::from_uuid(id),
            session_epoch: epoch as u64,
            started_at: at(t),
            expires_at: at(t) + SESSION_MAX,
            idle_expires_at: at(t) + SESSION_IDLE,
            user_agent: Some(UserAgent::new(&user_agent)),
            generation: 0,
            nonce: nonce(0),
        };
        let position = self.session_event(started.into()).await;
        let erased = self.row(id).status == "erased";
        let mut sessions = if erased {
            // A login that raced the erasure: the view keeps no session of an erased account.
            self.sessions_of_erased.lock().unwrap()
        } else {
            self.expected_sessions.lock().unwrap()
        };
        sessions.insert(
            session,
            SessionRow {
                id: session,
                user_id: id,
                session_epoch: epoch,
                started_at: at(t),
                last_refreshed_at: None,
                expires_at: at(t) + SESSION_MAX,
                idle_expires_at: at(t) + SESSION_IDLE,
                user_agent: Some(user_agent),
                generation: 0,
                ended_at: None,
                end_reason: None,
                position,
            },
        );
        session
    }

    fn session(&self, session: Uuid) -> SessionRow {
        let expected = self
            .expected_sessions
            .lock()
            .unwrap()
            .get(&session)
            .cloned();
        expected.unwrap_or_else(|| self.sessions_of_erased.lock().unwrap()[&session].clone())
    }

    /// Rotates the session's refresh token at `t`.
    pub async fn refresh_session(&self, session: Uuid, t: i64) {
        let before = self.session(session);
        let generation = before.generation as u64 + 1;
        let refreshed = SessionRefreshed {
            session_id: SessionId::from_uuid(session),
            user_id: UserId::from_uuid(before.user_id),
            session_epoch: before.session_epoch as u64,
            started_at: before.started_at,
            expires_at: before.expires_at,
            idle_expires_at: at(t) + SESSION_IDLE,
            user_agent: before.user_agent.as_deref().map(UserAgent::new),
            generation,
            nonce: nonce(generation),
            rotated_at: at(t),
            previous_nonce: nonce(generation - 1),
        };
        let position = self.session_event(refreshed.into()).await;
        let mut sessions = self.expected_sessions.lock().unwrap();
        let Some(row) = sessions.get_mut(&session) else {
            return; // Of an erased account: the view has no row.
        };
        row.last_refreshed_at = Some(at(t));
        row.idle_expires_at = at(t) + SESSION_IDLE;
        row.generation = generation as i64;
        row.position = position;
    }

    /// Ends the session at `t`; an end after the first changes nothing in the view.
    pub async fn end_session(&self, session: Uuid, reason: SessionEndReason, t: i64) {
        let user_id = self.session(session).user_id;
        let ended = SessionEnded {
            session_id: SessionId::from_uuid(session),
            user_id: UserId::from_uuid(user_id),
            ended_at: at(t),
            reason,
        };
        let position = self.session_event(ended.into()).await;
        let mut sessions = self.expected_sessions.lock().unwrap();
        let Some(row) = sessions.get_mut(&session) else {
            return; // Of an erased account: the view has no row.
        };
        if row.ended_at.is_none() {
            row.ended_at = Some(at(t));
            row.end_reason = Some(reason.name().into());
            row.position = position;
        }
    }

    /// Erases account `id` at `t` as the command API does: appends its `UserErased`, then, if
    /// `delete_key`, deletes its key from the vault (a command API that stops in between leaves
    /// the key for the projection to delete). The expected row becomes erased, and its sessions
    /// leave the expected view.
    pub async fn erase(&self, id: Uuid, t: i64, delete_key: bool) {
        let erased = UserErased {
            erased_by: UserId::from_uuid(id),
            at: at(t),
        };
        self.user_event_changing(id, erased.into(), |row| {
            row.status = "erased".into();
            row.email = None;
            row.email_normalized = None;
            row.erased_at = Some(at(t));
            row.session_epoch += 1;
        })
        .await;
        self.move_sessions_of_erased(id);
        if delete_key {
            self.sealer.vault().erase(id).await.unwrap();
        }
    }

    /// Moves the expected sessions of the erased account `id` out of the expected view.
    fn move_sessions_of_erased(&self, id: Uuid) {
        let mut sessions = self.expected_sessions.lock().unwrap();
        let of_account: Vec<Uuid> = sessions
            .values()
            .filter(|row| row.user_id == id)
            .map(|row| row.id)
            .collect();
        let mut of_erased = self.sessions_of_erased.lock().unwrap();
        for session in of_account {
            of_erased.extend(sessions.remove_entry(&session));
        }
    }

    /// The sessions of user `id` this writer started.
    fn sessions_of(&self, id: Uuid) -> Vec<Uuid> {
        let sessions = self.expected_sessions.lock().unwrap();
        let mut of: Vec<Uuid> = sessions
            .values()
            .filter(|row| row.user_id == id)
            .map(|row| row.id)
            .collect();
        of.sort_unstable();
        of
    }

    pub async fn login(&self, id: Uuid, t: i64) {
        let count = self.row(id).login_count as u64 + 1;
        let succeeded = LoginSucceeded {
            at: at(t),
            login_count: count,
        };
        self.login_event_changing(id, succeeded.into(), |row| {
            row.last_login_at = Some(at(t));
            row.login_count = count as i64;
            row.failed_logins = 0;
            row.locked_until = None;
        })
        .await;
    }

    pub async fn fail_login(&self, id: Uuid, t: i64) {
        let before = self.row(id);
        let failed = before.failed_logins as u32 + 1;
        let locked_until = (failed >= 3).then(|| at(t + 300));
        let failure = LoginFailed {
            at: at(t),
            failed_in_a_row: failed,
            locked_until,
            login_count: before.login_count as u64,
        };
        self.login_event_changing(id, failure.into(), |row| {
            row.failed_logins = failed as i32;
            row.locked_until = locked_until;
        })
        .await;
    }

    /// A reset lifts the account's lockout: its failures are forgotten, its logins kept.
    pub async fn lift_lockout(&self, id: Uuid, t: i64) {
        let login_count = self.row(id).login_count as u64;
        let lifted = LockoutLifted {
            at: at(t),
            login_count,
        };
        self.login_event_changing(id, lifted.into(), |row| {
            row.failed_logins = 0;
            row.locked_until = None;
        })
        .await;
    }

    /// `users` new users, each followed by `ops` random events of theirs: status and password
    /// changes, verifications, changes of email, resets and lifted lockouts, logins, and
    /// sessions started, refreshed and ended (some ended twice).
    pub async fn random_history(&self, users: usize, ops: usize) {
        let ids: Vec<Uuid> = (0..users).map(|_| Uuid::now_v7()).collect();
        for (n, id) in ids.iter().enumerate() {
            self.register(*id, fastrand::bool(), n as i64).await;
        }
        for t in 0..ops * users {
            let id = ids[fastrand::usize(..ids.len())];
            let t = 1000 + t as i64;
            let sessions = self.sessions_of(id);
            let session =
                (!sessions.is_empty()).then(|| sessions[fastrand::usize(..sessions.len())]);
            match (fastrand::u8(..16), session) {
                (0, _) => self.activate(id, t).await,
                (1, _) => self.deactivate(id, t).await,
                (2 | 3, _) => self.login(id, t).await,
                (4, _) => self.fail_login(id, t).await,
                (5, _) => self.change_password(id, t).await,
                (6, _) => self.rehash_password(id, t).await,
                (7, _) => self.end_all_sessions(id, t).await,
                (11, _) => self.verify_email(id, t).await,
                (12, _) => {
                    self.change_email(id, t).await;
                }
                (13, _) => self.reset_password(id, t).await,
                (14, _) => self.lift_lockout(id, t).await,
                (8, Some(session)) => {
                    let reason = if fastrand::bool() {
                        SessionEndReason::LoggedOut
                    } else {
                        SessionEndReason::RefreshTokenReused
                    };
                    self.end_session(session, reason, t).await;
                }
                // The domain refreshes only a session that has not ended.
                (9 | 10, Some(session)) if self.session(session).ended_at.is_none() => {
                    self.refresh_session(session, t).await;
                }
                _ => {
                    self.start_session(id, t).await;
                }
            }
        }
    }
}

/// The refresh nonce of a test session's `generation`.
fn nonce(generation: u64) -> RefreshNonce {
    let mut bytes = [0; RefreshNonce::LEN];
    bytes[..8].copy_from_slice(&generation.to_be_bytes());
    RefreshNonce::from_bytes(bytes)
}

/// Runs `writers` concurrent writers, each with its own users; returns one writer whose
/// `expected` holds every user's row.
pub async fn concurrent_writers(
    store: &Arc<dyn MessageStore>,
    sealer: &Sealer,
    writers: usize,
    users: usize,
    ops: usize,
) -> Writer {
    let writer = Writer::new(store.clone(), sealer.clone());
    let tasks: Vec<_> = (0..writers)
        .map(|_| {
            let writer = writer.clone();
            tokio::spawn(async move { writer.random_history(users, ops).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    writer
}

/// A raw message, for types and categories the domain does not write.
pub async fn append_raw(
    store: &Arc<dyn MessageStore>,
    stream: &str,
    message_type: &str,
    data: serde_json::Value,
    metadata: serde_json::Value,
) -> u64 {
    store
        .append(vec![StreamAppend::new(
            StreamName::parse(stream).unwrap(),
            ExpectedVersion::Any,
            vec![NewMessage::new(message_type, data).with_metadata(metadata)],
        )])
        .await
        .unwrap()
        .last_global_position()
}

/// A raw event of `message_type` at `schema_version` in account `id`'s stream, for types and
/// versions this build does not know.
pub async fn append_to_user(
    store: &Arc<dyn MessageStore>,
    id: Uuid,
    message_type: &str,
    schema_version: u32,
    data: serde_json::Value,
) -> u64 {
    let metadata = json!({ "schemaVersion": schema_version });
    append_raw(store, &format!("user-{id}"), message_type, data, metadata).await
}

/// A minimal HTTP/1.1 GET: status code and body.
pub async fn http_get(port: u16, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The users view under a projection name of the test's own. Projections label their metrics
/// with their name, and every test of this binary records into the one process-wide registry,
/// so a metric labelled `users` moves with whatever the tests beside this one do (and a worker
/// starting anywhere sets `projection_halted{projection="users"}` back to 0). Under a name no
/// other test uses, a value read after the test's step is that step's alone.
pub fn users_view_named(projection: &'static str) -> Target {
    Target {
        checkpoint: projection,
        ..Target::USERS
    }
}

/// The value `metric` has for `projection` in this process's registry, as `/metrics` renders
/// it; `None` while nothing has recorded it for that projection.
pub fn projection_metric(metric: &str, projection: &str) -> Option<f64> {
    let series = format!("{metric}{{projection=\"{projection}\"}} ");
    platform::metrics::render().lines().find_map(|line| {
        line.strip_prefix(&series)
            .map(|value| value.trim().parse().unwrap())
    })
}
