//! The command handlers without HTTP: read the streams, let the domain decide, append.

use std::sync::Arc;
use std::time::{Duration, Instant};

use identity::{
    ADMINISTRATORS_STREAM, Administrators, AdministratorsEvent, AdministratorsFromAccounts,
    EVENT_VERSION_KEY, Email, InitialStatus, LOGIN_CATEGORY, LockoutPolicy, LoginDecision,
    LoginEvent, LoginRefusal, LoginState, Password, PasswordHash, PasswordPolicy, Register, Role,
    USER_CATEGORY, UserAccount, UserCommand, UserEvent, UserId, change_of, decide,
    decide_administrators, decide_login, event_version, login_stream_name, user_id_of_stream,
    user_stream_name,
};
use message_store::{
    AppendError, ExpectedVersion, GlobalPosition, MessageStore, NewMessage, RecordedMessage,
    StreamAppend, StreamName, StreamPosition,
};
use platform::FieldError;
use platform::clock::Clock;
use serde_json::json;
use tokens::{IssuedToken, TokenIssuer};
use uuid::Uuid;

use crate::error::ApiError;
use crate::hashing::Hasher;
use crate::reservation::{EmailReserved, email_stream};

/// How often a read-decide-append is tried again when another writer got there first.
const MAX_ATTEMPTS: usize = 10;

/// What the commands need; shared by every request.
pub struct Commands {
    pub store: Arc<dyn MessageStore>,
    pub hasher: Hasher,
    pub issuer: TokenIssuer,
    pub clock: Arc<dyn Clock>,
    pub password_policy: PasswordPolicy,
    pub lockout: LockoutPolicy,
    /// See `login.refusal_padding_ms`.
    pub refusal_padding: Duration,
    pub initial_status: InitialStatus,
}

/// A successful command: the account and the global position of its last event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    pub id: UserId,
    pub position: GlobalPosition,
}

/// A granted login.
pub struct LoggedIn {
    pub token: IssuedToken,
    pub position: GlobalPosition,
}

/// A user stream folded, with where it ends.
struct Loaded {
    account: UserAccount,
    version: Option<StreamPosition>,
    last_global: GlobalPosition,
    first_global: GlobalPosition,
}

impl Commands {
    /// Registers an account; `id` makes a retry safe.
    pub async fn register(
        &self,
        email: &str,
        password: String,
        id: Option<Uuid>,
        roles: Vec<Role>,
        status: InitialStatus,
    ) -> Result<Done, ApiError> {
        let mut errors = Vec::new();
        let email =
            Email::parse(email).map_err(|error| errors.push(FieldError::new("email", error)));
        let password = Password::new(password, &self.password_policy)
            .map_err(|error| errors.push(FieldError::new("password", error)));
        let (Ok(email), Ok(password)) = (email, password) else {
            return Err(ApiError::Validation(errors));
        };
        let id = UserId::from_uuid(id.unwrap_or_else(Uuid::now_v7));
        // A retry with the same id is answered without hashing again.
        if let Some(done) = self.existing_registration(id, &email).await? {
            return Ok(done);
        }
        let password_hash = self.hasher.hash(password).await?;
        let events = decide(
            &UserAccount::NotRegistered,
            UserCommand::Register(Register {
                user_id: id,
                email: email.clone(),
                password_hash,
                roles,
                initial_status: status,
            }),
            self.clock.now(),
        )
        .map_err(|refusal| anyhow::anyhow!("registering a new account was refused: {refusal}"))?;
        for _ in 0..MAX_ATTEMPTS {
            // An active administrator joins the administrators in the same append. It goes
            // first, so that the email reservation stays the last message, as a repeated
            // registration answers.
            let mut appends = self
                .administrators_append(&UserAccount::NotRegistered, &events)
                .await?;
            appends.push(StreamAppend::new(
                user_stream(id)?,
                ExpectedVersion::NoStream,
                messages(&events),
            ));
            appends.push(StreamAppend::new(
                email_stream(&email)?,
                ExpectedVersion::NoStream,
                vec![EmailReserved { user_id: id }.to_message()],
            ));
            return match self.store.append(appends).await {
                Ok(appended) => Ok(Done {
                    id,
                    position: appended.last_global_position(),
                }),
                Err(AppendError::WrongExpectedVersion { stream, .. })
                    if stream.as_str() == ADMINISTRATORS_STREAM =>
                {
                    continue;
                }
                Err(AppendError::WrongExpectedVersion { .. }) => {
                    match self.existing_registration(id, &email).await? {
                        Some(done) => Ok(done),
                        None => Err(ApiError::EmailTaken),
                    }
                }
                Err(error) => Err(anyhow::Error::new(error)
                    .context("appending a registration")
                    .into()),
            };
        }
        Err(anyhow::anyhow!("registering lost the race {MAX_ATTEMPTS} times").into())
    }

    /// The answer to a repeated registration of `id` with `email`, if `id` is registered:
    /// the first answer again for the same email, `id_taken` for another.
    async fn existing_registration(
        &self,
        id: UserId,
        email: &Email,
    ) -> Result<Option<Done>, ApiError> {
        let loaded = self.load(id).await?;
        let Some(account) = loaded.account.account() else {
            return Ok(None);
        };
        if account.email_normalized != email.normalized() {
            return Err(ApiError::IdTaken);
        }
        // The first answer's position was the later of the two messages appended together.
        let reservation = self.store.last_message(&email_stream(email)?).await?;
        let reserved_at = reservation
            .filter(|message| EmailReserved::from_message(message).is_some_and(|r| r.user_id == id))
            .map_or(0, |message| message.global_position);
        Ok(Some(Done {
            id,
            position: reserved_at.max(loaded.first_global),
        }))
    }

    /// Logs in: the same store reads and one password check for every email, then the decision
    /// on the account's last login event.
    ///
    /// Every answer but a success (a refusal, a full hash queue, the store out of reach) comes
    /// `refusal_padding` after the password check ends, or after the start when there was none:
    /// the store work only a known account costs happens within it, so neither the answer nor
    /// its timing tells a known email from an unknown one.
    pub async fn login(&self, email: &str, password: String) -> Result<LoggedIn, ApiError> {
        let (Ok(email), Ok(password)) = (Email::parse(email), Password::for_verification(password))
        else {
            record_login("malformed");
            return Err(ApiError::InvalidCredentials);
        };
        let started = Instant::now();
        let mut hashing = Duration::ZERO;
        match self.try_login(&email, password, &mut hashing).await {
            Ok(logged_in) => {
                record_login("granted");
                Ok(logged_in)
            }
            Err(failed) => {
                tokio::time::sleep_until((started + hashing + self.refusal_padding).into()).await;
                record_login(failed.outcome);
                Err(failed.error)
            }
        }
    }

    /// [`Self::login`] without the padding; adds the time its password check counts for to
    /// `hashing`.
    async fn try_login(
        &self,
        email: &Email,
        password: Password,
        hashing: &mut Duration,
    ) -> Result<LoggedIn, Failed> {
        let user = self.find_user(email).await?;
        let streams = LoginStreams::of(user)?;
        // The verdict on one stored hash is kept across retries: a retry re-reads the streams,
        // and hashes again only if the password changed meanwhile.
        let mut verdict: Option<(Option<PasswordHash>, bool)> = None;
        for _ in 0..MAX_ATTEMPTS {
            let mut loaded = self.load_stream(&streams.user).await?;
            if user.is_none() {
                // Whatever the stream no account has may hold, no account is found.
                loaded = Loaded::empty();
            }
            let stored = loaded.account.account().map(|a| a.password_hash.clone());
            let matches = match &verdict {
                Some((hash, matches)) if *hash == stored => *matches,
                _ => {
                    let hashing_started = Instant::now();
                    let verified = self.hasher.verify(password.clone(), stored.clone()).await;
                    *hashing += hashing_started.elapsed();
                    let verified = verified.map_err(ApiError::from)?;
                    // A hash older than the parameters checks faster than the dummy hash of an
                    // unknown email; it counts as long as a check at today's parameters.
                    *hashing += verified.shortfall;
                    verdict = Some((stored.clone(), verified.matches));
                    verified.matches
                }
            };
            let (state, login_version) = self.login_state(&streams.login).await?;
            let now = self.clock.now();
            let decision = decide_login(&loaded.account, &state, matches, now, &self.lockout);
            let refused = match &decision {
                LoginDecision::Granted { .. } => None,
                LoginDecision::Refused { reason, .. } => Some(match reason {
                    LoginRefusal::UnknownAccount => "unknown_account",
                    LoginRefusal::WrongPassword => "wrong_password",
                    LoginRefusal::NotActive => "not_active",
                    LoginRefusal::Locked { .. } => "locked",
                }),
            };
            let mut position = loaded.last_global;
            if let Some(event) = decision.into_event() {
                let append = StreamAppend::new(
                    streams.login.clone(),
                    expected(login_version),
                    vec![login_message(&event)],
                );
                match self.store.append(vec![append]).await {
                    Ok(appended) => position = appended.last_global_position(),
                    Err(AppendError::WrongExpectedVersion { .. }) => continue,
                    Err(error) => {
                        let error = anyhow::Error::new(error).context("appending a login event");
                        return Err(ApiError::from(error).into());
                    }
                }
            }
            if let Some(outcome) = refused {
                return Err(Failed::refused(outcome));
            }
            let Some(account) = loaded.account.account() else {
                return Err(Failed::refused("unknown_account"));
            };
            let roles = account.roles.iter().copied().map(role_name).collect();
            let token = self
                .issuer
                .issue(*account.id.as_uuid(), roles, now)
                .map_err(|error| anyhow::Error::new(error).context("issuing a token"))
                .map_err(ApiError::from)?;
            if self.hasher.needs_rehash(&account.password_hash)
                && let Some(rehashed) = self.rehash(&loaded, password.clone()).await?
            {
                position = position.max(rehashed);
            }
            return Ok(LoggedIn { token, position });
        }
        // Every attempt lost the race to record it: many logins to one account at once.
        match verdict {
            // A wrong password is refused like any other, so contention, which only a known
            // account meets, does not show.
            Some((_, false)) => Err(Failed::refused("contended")),
            _ => Err(ApiError::Throttled.into()),
        }
    }

    /// Stores a stronger hash of the password just verified. It is appended at the version the
    /// login read, so it never lands on a password changed since (the new password would be
    /// replaced by the old one); losing that race is fine: the next login tries again.
    async fn rehash(
        &self,
        loaded: &Loaded,
        password: Password,
    ) -> Result<Option<GlobalPosition>, ApiError> {
        let Some(account) = loaded.account.account() else {
            return Ok(None);
        };
        let new_password_hash = match self.hasher.hash(password).await {
            Ok(hash) => hash,
            // A busy hasher is no reason to refuse a granted login.
            Err(crate::hashing::HashError::Busy) => return Ok(None),
            Err(error) => return Err(error.into()),
        };
        let events = decide(
            &loaded.account,
            UserCommand::RehashPassword { new_password_hash },
            self.clock.now(),
        )
        .map_err(|refusal| anyhow::anyhow!("rehashing was refused: {refusal}"))?;
        let append = StreamAppend::new(
            user_stream(account.id)?,
            expected(loaded.version),
            messages(&events),
        );
        match self.store.append(vec![append]).await {
            Ok(appended) => Ok(Some(appended.last_global_position())),
            Err(AppendError::WrongExpectedVersion { .. }) => Ok(None),
            Err(error) => Err(anyhow::Error::new(error)
                .context("appending a rehashed password")
                .into()),
        }
    }

    /// Activates or deactivates; repeating one records nothing and answers the current position.
    pub async fn set_active(&self, id: UserId, active: bool) -> Result<Done, ApiError> {
        self.update(id, || {
            if active {
                UserCommand::Activate
            } else {
                UserCommand::Deactivate
            }
        })
        .await
    }

    /// Changes the password after proving the current one, which counts as a login attempt: a
    /// wrong one is recorded as a failed login and a locked account is refused.
    pub async fn change_password(
        &self,
        id: UserId,
        current: String,
        new: String,
    ) -> Result<Done, ApiError> {
        let new = Password::new(new, &self.password_policy)
            .map_err(|error| ApiError::Validation(vec![FieldError::new("new_password", error)]))?;
        let current =
            Password::for_verification(current).map_err(|_| ApiError::InvalidCredentials)?;
        let loaded = self.load(id).await?;
        let Some(account) = loaded.account.account() else {
            return Err(ApiError::NotFound);
        };
        let matches = self
            .hasher
            .verify(current, Some(account.password_hash.clone()))
            .await?
            .matches;
        for _ in 0..MAX_ATTEMPTS {
            let (state, login_version) = self.login_state(&login_stream(id)?).await?;
            let now = self.clock.now();
            if state.locked_until(now).is_some() {
                return Err(ApiError::InvalidCredentials);
            }
            if matches {
                break;
            }
            let decision = decide_login(&loaded.account, &state, false, now, &self.lockout);
            if let Some(event) = decision.into_event() {
                let append = StreamAppend::new(
                    login_stream(id)?,
                    expected(login_version),
                    vec![login_message(&event)],
                );
                match self.store.append(vec![append]).await {
                    Ok(_) => {}
                    Err(AppendError::WrongExpectedVersion { .. }) => continue,
                    Err(error) => {
                        return Err(anyhow::Error::new(error)
                            .context("appending a failed password proof")
                            .into());
                    }
                }
            }
            return Err(ApiError::InvalidCredentials);
        }
        if !matches {
            return Err(ApiError::InvalidCredentials);
        }
        let new_password_hash = self.hasher.hash(new).await?;
        // The caller proved the password the account had when it was loaded; if the user has
        // chosen another one meanwhile, that proof no longer stands. A login that upgraded the
        // hash meanwhile stored the same password again: the proof still stands, and the new
        // password replaces the upgraded hash.
        let proven = account.password_changes;
        let unchanged = |account: &UserAccount| match account.account() {
            Some(now) if now.password_changes == proven => Ok(()),
            Some(_) => Err(ApiError::InvalidCredentials),
            None => Err(ApiError::NotFound),
        };
        self.update_if(id, unchanged, || UserCommand::ChangePassword {
            new_password_hash: new_password_hash.clone(),
        })
        .await
    }

    /// Read, decide, append to the user stream; again when another writer got there first.
    async fn update(
        &self,
        id: UserId,
        command: impl Fn() -> UserCommand,
    ) -> Result<Done, ApiError> {
        self.update_if(id, |_| Ok(()), command).await
    }

    /// [`Self::update`], provided `still_holds` accepts the account as it is loaded for each
    /// attempt: for a command decided on something the caller proved against an earlier
    /// state.
    async fn update_if(
        &self,
        id: UserId,
        still_holds: impl Fn(&UserAccount) -> Result<(), ApiError>,
        command: impl Fn() -> UserCommand,
    ) -> Result<Done, ApiError> {
        for _ in 0..MAX_ATTEMPTS {
            let loaded = self.load(id).await?;
            still_holds(&loaded.account)?;
            let events = decide(&loaded.account, command(), self.clock.now())?;
            if events.is_empty() {
                return Ok(Done {
                    id,
                    position: loaded.last_global,
                });
            }
            // The administrators' change first, so that the account's event is the last
            // message and a repeated command answers the same position.
            let mut appends = self.administrators_append(&loaded.account, &events).await?;
            appends.push(StreamAppend::new(
                user_stream(id)?,
                expected(loaded.version),
                messages(&events),
            ));
            match self.store.append(appends).await {
                Ok(appended) => {
                    return Ok(Done {
                        id,
                        position: appended.last_global_position(),
                    });
                }
                Err(AppendError::WrongExpectedVersion { .. }) => continue,
                Err(error) => {
                    return Err(anyhow::Error::new(error)
                        .context("appending to a user stream")
                        .into());
                }
            }
        }
        Err(anyhow::anyhow!("updating an account lost the race {MAX_ATTEMPTS} times").into())
    }

    /// The append to the administrators' stream that `events`, decided on `before`, call for:
    /// none when they leave the set of active administrators as it is, else the new set with
    /// the exact version it was decided on, or the refusal to let the last one go.
    async fn administrators_append(
        &self,
        before: &UserAccount,
        events: &[UserEvent],
    ) -> Result<Vec<StreamAppend>, ApiError> {
        let Some(change) = change_of(before, events) else {
            return Ok(vec![]);
        };
        let (administrators, version) = self.administrators().await?;
        let event = decide_administrators(&administrators, change, self.clock.now())?;
        let message = NewMessage::new(event.event_type(), event.to_json())
            .with_metadata(json!({ EVENT_VERSION_KEY: event.version() }));
        Ok(vec![StreamAppend::new(
            administrators_stream()?,
            version,
            vec![message],
        )])
    }

    /// The active administrators and the version of their stream, from its last message; on a
    /// store written before that stream existed, folded from the accounts, to be appended with
    /// "no stream" expected (of two first changes at once, one wins and the other reads it).
    async fn administrators(&self) -> Result<(Administrators, ExpectedVersion), ApiError> {
        let Some(last) = self.store.last_message(&administrators_stream()?).await? else {
            return Ok((
                self.administrators_from_accounts().await?,
                ExpectedVersion::NoStream,
            ));
        };
        let version = event_version(&last.metadata)
            .map_err(|error| anyhow::Error::new(error).context("reading the administrators"))?;
        let event = AdministratorsEvent::from_stored(&last.message_type, version, &last.data)
            .map_err(|error| anyhow::Error::new(error).context("reading the administrators"))?;
        Ok((
            Administrators::from_last(&event),
            ExpectedVersion::Exact(last.position),
        ))
    }

    /// Folds every user stream into the set of active administrators: once, on the first change
    /// of an administrator after an upgrade from a build without the administrators' stream.
    ///
    /// Readers of a category stop at the transaction horizon (ADR 2), so it first waits until
    /// they see everything already written: an account change committed just before, behind an
    /// older transaction, would otherwise be missed.
    async fn administrators_from_accounts(&self) -> Result<Administrators, ApiError> {
        const BATCH: usize = 1000;
        const HORIZON_WAIT: Duration = Duration::from_secs(5);
        let written = self.store.last_position().await?;
        let deadline = Instant::now() + HORIZON_WAIT;
        while self.store.head_position().await? < written {
            if Instant::now() > deadline {
                return Err(anyhow::anyhow!(
                    "a long transaction keeps the accounts from being read"
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut folding = AdministratorsFromAccounts::default();
        let mut after = 0;
        loop {
            let batch = self
                .store
                .read_category(USER_CATEGORY, after, BATCH)
                .await?;
            for message in &batch {
                after = message.global_position;
                let Some(user) = user_id_of_stream(message.stream.as_str()) else {
                    continue;
                };
                folding.apply(user, &user_event(message)?);
            }
            if batch.len() < BATCH {
                return Ok(folding.finish());
            }
        }
    }

    /// The account an email is reserved for, read from the reservation stream.
    async fn find_user(&self, email: &Email) -> Result<Option<UserId>, ApiError> {
        let last = self.store.last_message(&email_stream(email)?).await?;
        Ok(last
            .as_ref()
            .and_then(EmailReserved::from_message)
            .map(|r| r.user_id))
    }

    /// Whether the account `id` exists and is active, from its own stream (strongly
    /// consistent): for commands whose caller's token may outlive a deactivation.
    pub async fn is_active(&self, id: UserId) -> Result<bool, ApiError> {
        Ok(self
            .load(id)
            .await?
            .account
            .account()
            .is_some_and(|account| account.is_active()))
    }

    /// Folds a user stream. It holds registration, status and password changes only (never
    /// logins), so it stays short.
    async fn load(&self, id: UserId) -> Result<Loaded, ApiError> {
        self.load_stream(&user_stream(id)?).await
    }

    async fn load_stream(&self, stream: &StreamName) -> Result<Loaded, ApiError> {
        const BATCH: usize = 1000;
        let mut loaded = Loaded::empty();
        let mut events = Vec::new();
        let mut from = 0;
        loop {
            let batch = self.store.read_stream(stream, from, BATCH).await?;
            for message in &batch {
                events.push(user_event(message)?);
                if loaded.version.is_none() {
                    loaded.first_global = message.global_position;
                }
                loaded.version = Some(message.position);
                loaded.last_global = message.global_position;
            }
            if batch.len() < BATCH {
                break;
            }
            from = loaded.version.map_or(0, |v| v + 1);
        }
        loaded.account = UserAccount::fold(&events);
        Ok(loaded)
    }

    /// The login state and the login stream's version, from its last message only.
    async fn login_state(
        &self,
        stream: &StreamName,
    ) -> Result<(LoginState, Option<StreamPosition>), ApiError> {
        let last = self.store.last_message(stream).await?;
        let Some(last) = last else {
            return Ok((LoginState::default(), None));
        };
        let version = event_version(&last.metadata)
            .map_err(|error| anyhow::Error::new(error).context("reading a login event"))?;
        let event = LoginEvent::from_stored(&last.message_type, version, &last.data)
            .map_err(|error| anyhow::Error::new(error).context("reading a login event"))?;
        Ok((LoginState::from_last(Some(&event)), Some(last.position)))
    }
}

impl Loaded {
    fn empty() -> Self {
        Self {
            account: UserAccount::NotRegistered,
            version: None,
            last_global: 0,
            first_global: 0,
        }
    }
}

/// The streams a login reads: the account's own, or for an unknown email two that no account
/// has ("nobody" is not a UUID, so no registration can name them). Reading the same kinds of
/// streams for every email makes a slow or failing store meet a known and an unknown email
/// alike: both have read the reservation and a user stream before their password check, and
/// both read a login stream after it.
struct LoginStreams {
    user: StreamName,
    login: StreamName,
}

impl LoginStreams {
    const NOBODY: &'static str = "nobody";

    fn of(user: Option<UserId>) -> anyhow::Result<Self> {
        Ok(match user {
            Some(id) => Self {
                user: user_stream(id)?,
                login: login_stream(id)?,
            },
            None => Self {
                user: StreamName::for_entity(USER_CATEGORY, Self::NOBODY)?,
                login: StreamName::for_entity(LOGIN_CATEGORY, Self::NOBODY)?,
            },
        })
    }
}

/// A login that did not succeed: its answer, and the outcome counted in the metrics.
struct Failed {
    outcome: &'static str,
    error: ApiError,
}

impl Failed {
    fn refused(outcome: &'static str) -> Self {
        Self {
            outcome,
            error: ApiError::InvalidCredentials,
        }
    }
}

impl From<ApiError> for Failed {
    fn from(error: ApiError) -> Self {
        let outcome = match error {
            ApiError::Throttled => "throttled",
            _ => "error",
        };
        Self { outcome, error }
    }
}

impl From<anyhow::Error> for Failed {
    fn from(error: anyhow::Error) -> Self {
        ApiError::from(error).into()
    }
}

fn user_event(message: &RecordedMessage) -> Result<UserEvent, ApiError> {
    let version = event_version(&message.metadata)
        .map_err(|error| anyhow::Error::new(error).context("reading a user event"))?;
    Ok(
        UserEvent::from_stored(&message.message_type, version, &message.data)
            .map_err(|error| anyhow::Error::new(error).context("reading a user event"))?,
    )
}

fn expected(version: Option<StreamPosition>) -> ExpectedVersion {
    version.map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact)
}

fn messages(events: &[UserEvent]) -> Vec<NewMessage> {
    events
        .iter()
        .map(|event| {
            NewMessage::new(event.event_type(), event.to_json())
                .with_metadata(json!({ EVENT_VERSION_KEY: event.version() }))
        })
        .collect()
}

/// A login event as a message for the login stream.
pub fn login_message(event: &LoginEvent) -> NewMessage {
    NewMessage::new(event.event_type(), event.to_json())
        .with_metadata(json!({ EVENT_VERSION_KEY: event.version() }))
}

fn user_stream(id: UserId) -> anyhow::Result<StreamName> {
    Ok(StreamName::parse(user_stream_name(id))?)
}

fn administrators_stream() -> anyhow::Result<StreamName> {
    Ok(StreamName::parse(ADMINISTRATORS_STREAM)?)
}

/// `userLogin-<id>`.
pub fn login_stream(id: UserId) -> anyhow::Result<StreamName> {
    Ok(StreamName::parse(login_stream_name(id))?)
}

/// The name of a role in the token's `roles` claim.
pub fn role_name(role: Role) -> String {
    match role {
        Role::User => "user".into(),
        Role::Admin => "admin".into(),
    }
}

fn record_login(outcome: &'static str) {
    metrics::counter!("logins_total", "outcome" => outcome).increment(1);
}
