//! The command handlers without HTTP: read the streams, let the domain decide, append.
//!
//! A command that does not succeed answers a [`CommandError`], which says what happened in the
//! service's terms; what a client is told for each is decided in one place, `error.rs`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use identity::{
    ADMINISTRATORS_STREAM, Account, Administrators, AdministratorsEvent,
    AdministratorsFromAccounts, EVENT_VERSION_KEY, Email, EventDecodeError, InitialStatus,
    LOGIN_CATEGORY, LockoutPolicy, LoginDecision, LoginEvent, LoginRefusal, LoginState, Password,
    PasswordHash, PasswordPolicy, RecoveryPolicy, Register, Role, SessionPolicy, SessionStarted,
    USER_CATEGORY, UserAccount, UserAgent, UserCommand, UserEvent, UserId, change_of, decide,
    decide_administrators, decide_login, event_version, login_stream_name, user_id_of_stream,
    user_stream_name,
};
use message_store::{
    AppendError, ExpectedVersion, GlobalPosition, MessageStore, NewMessage, RecordedMessage,
    StoreError, StreamAppend, StreamName, StreamPosition,
};
use personal_data::{LookupKey, Sealer};
use platform::FieldError;
use platform::clock::Clock;
use serde_json::{Value, json};
use tokens::{MailTokenKey, RefreshTokenKey, TokenIssuer};
use uuid::Uuid;

use crate::hashing::{HashError, Hasher};
use crate::personal::{WritingKey, erased_is, hold_personal_data, user_messages};
use crate::reservation::{EmailReserved, Reservation, email_stream};
use crate::sessions::SessionTokens;
use crate::settings::RegistrationMode;

/// How often a read-decide-append is tried again when another writer got there first.
pub(crate) const MAX_ATTEMPTS: usize = 10;

/// Why a command was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// Fields of the command that are not acceptable, each with why, all at once.
    #[error("some fields are not acceptable")]
    Validation(Vec<FieldError>),
    #[error("the email is taken")]
    EmailTaken,
    /// A registration repeated with the id of an account registered with another email.
    #[error("the id is taken by another account")]
    IdTaken,
    /// Any failed login or password proof (an unknown email, a wrong password, an inactive or
    /// a locked account): one error, so that nobody learns which.
    #[error("invalid credentials")]
    InvalidCredentials,
    /// Any refresh token that does not refresh (malformed, forged, of an unknown, ended or
    /// expired session, of an account deactivated or whose sessions were all ended, or reused):
    /// one error, so that nobody learns which.
    #[error("invalid refresh token")]
    InvalidRefreshToken,
    /// Any link token that does not confirm (malformed, forged, used, replaced by a newer one,
    /// expired, or of an account that can no longer use it): one error, so that nobody learns
    /// which.
    #[error("invalid or expired link")]
    InvalidLink,
    /// No session of this id belongs to the caller: unknown, or another person's, alike.
    #[error("no such session")]
    SessionNotFound,
    #[error("no such account")]
    NotFound,
    /// An administrator asked to erase an account erased already: nothing more was recorded
    /// (its key was deleted again, in case an earlier erasure stopped short of it).
    #[error("the account was erased")]
    AccountErased,
    #[error("the account is deactivated")]
    AccountInactive,
    /// The account is the last active administrator: without it nobody could activate anyone.
    #[error("the account is the last active administrator")]
    LastAdministrator,
    /// Too many password checks wait for a core, or too many logins to one account at once:
    /// the same command may well succeed shortly.
    #[error("too busy to check a password now")]
    Busy,
    /// The message store is out of reach (down, restarting, overloaded, read-only after a
    /// failover): nothing was decided, and the same command may well succeed shortly.
    #[error("the message store is out of reach")]
    StoreUnavailable(#[source] anyhow::Error),
    /// A fault of the service or of its data; the cause is for the log.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<HashError> for CommandError {
    fn from(error: HashError) -> Self {
        match error {
            HashError::Busy => Self::Busy,
            HashError::Failed(_) => Self::Internal(error.into()),
        }
    }
}

impl From<identity::Refusal> for CommandError {
    fn from(refusal: identity::Refusal) -> Self {
        match refusal {
            // An erased account answers as an unknown one: nothing of it can be done or learnt.
            identity::Refusal::NotFound | identity::Refusal::Erased => Self::NotFound,
            identity::Refusal::AccountInactive => Self::AccountInactive,
            identity::Refusal::LastAdministrator => Self::LastAdministrator,
            // Only a registration can meet it, and a registration decides on no account.
            identity::Refusal::AlreadyRegistered => Self::Internal(anyhow::anyhow!(
                "a command on an account decided a registration"
            )),
        }
    }
}

impl From<StoreError> for CommandError {
    fn from(error: StoreError) -> Self {
        store_failed(error, "using the message store")
    }
}

/// What the commands need; shared by every request.
pub struct Commands {
    pub store: Arc<dyn MessageStore>,
    pub hasher: Hasher,
    pub issuer: TokenIssuer,
    /// Derives refresh token secrets (ADR 10).
    pub refresh_key: RefreshTokenKey,
    pub session_policy: SessionPolicy,
    pub clock: Arc<dyn Clock>,
    pub password_policy: PasswordPolicy,
    pub lockout: LockoutPolicy,
    /// See `login.refusal_padding_ms`.
    pub refusal_padding: Duration,
    pub registration_mode: RegistrationMode,
    /// Authenticates the links of recovery mails (ADR 12).
    pub mail_key: MailTokenKey,
    pub recovery_policy: RecoveryPolicy,
    /// See `mail.answer_after_ms`.
    pub answer_after: Duration,
    /// Seals the personal fields of the events written and opens those of the messages read,
    /// with the keys of the vault (ADR 13).
    pub sealer: Sealer,
    /// Names the email reservation streams (ADR 13).
    pub lookup_key: Arc<LookupKey>,
}

/// A successful command: the account and the global position of its last event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    pub id: UserId,
    pub position: GlobalPosition,
}

/// A user stream folded, with where it ends.
pub(crate) struct Loaded {
    pub(crate) account: UserAccount,
    pub(crate) version: Option<StreamPosition>,
    pub(crate) last_global: GlobalPosition,
    first_global: GlobalPosition,
}

impl Commands {
    /// Registers an account (an operator's, from the command line); `id` makes a retry safe.
    pub async fn register(
        &self,
        email: &str,
        password: String,
        id: Option<Uuid>,
        roles: Vec<Role>,
        status: InitialStatus,
    ) -> Result<Done, CommandError> {
        let (email, password) = self.registration_fields(email, password)?;
        let id = UserId::from_uuid(id.unwrap_or_else(Uuid::now_v7));
        self.register_valid(id, &email, password, roles, status, |_, _, _| Ok(vec![]))
            .await
    }

    /// Registers `id` with fields already checked, appending what `also` makes of the new
    /// account and the instant in the same atomic append (the request of a verification mail).
    pub(crate) async fn register_valid(
        &self,
        id: UserId,
        email: &Email,
        password: Password,
        roles: Vec<Role>,
        status: InitialStatus,
        also: impl Fn(UserId, DateTime<Utc>, &WritingKey) -> Result<Vec<StreamAppend>, CommandError>,
    ) -> Result<Done, CommandError> {
        // A retry with the same id is answered without hashing again.
        if let Some(done) = self.existing_registration(id, email).await? {
            return Ok(done);
        }
        let password_hash = self.hasher.hash(password).await?;
        let registration = Register {
            user_id: id,
            email: email.clone(),
            password_hash,
            roles,
            initial_status: status,
        };
        self.register_new(registration, also).await
    }

    /// Registers an account whose password is hashed already and whose id the caller found
    /// unregistered (a registration racing it is met by the append's expected versions). Its
    /// events, and what `also` makes with the account's key, are sealed with a key made for it
    /// now; an id whose account was erased meanwhile is `IdTaken`, as the erased account is.
    pub(crate) async fn register_new(
        &self,
        registration: Register,
        also: impl Fn(UserId, DateTime<Utc>, &WritingKey) -> Result<Vec<StreamAppend>, CommandError>,
    ) -> Result<Done, CommandError> {
        let (id, email) = (registration.user_id, registration.email.clone());
        let now = self.clock.now();
        let command = UserCommand::Register(registration);
        let events = decide(&UserAccount::NotRegistered, command, now)
            .context("registering a new account was refused")?;
        let key = self
            .writing_key(id)
            .await
            .map_err(erased_is(|| CommandError::IdTaken))?;
        let messages = user_messages(Some(&key), &events)?;
        self.append_registration(id, &email, &events, messages, also(id, now, &key)?)
            .await
    }

    /// The email and the password of a registration; or what is wrong with either, both at
    /// once, so that a client can correct them in one go.
    pub(crate) fn registration_fields(
        &self,
        email: &str,
        password: String,
    ) -> Result<(Email, Password), CommandError> {
        let mut errors = Vec::new();
        let email =
            Email::parse(email).map_err(|error| errors.push(FieldError::new("email", error)));
        let password = Password::new(password, &self.password_policy)
            .map_err(|error| errors.push(FieldError::new("password", error)));
        match (email, password) {
            (Ok(email), Ok(password)) => Ok((email, password)),
            _ => Err(CommandError::Validation(errors)),
        }
    }

    /// Appends a registration, its email's reservation and `also`, in one atomic append: the
    /// account's stream on "no stream", the reservation on "no stream" or, for an address
    /// released by a change of email, at the release; so that of two registrations of one
    /// email exactly one succeeds. Again when the administrators changed meanwhile.
    async fn append_registration(
        &self,
        id: UserId,
        email: &Email,
        events: &[UserEvent],
        messages: Vec<NewMessage>,
        also: Vec<StreamAppend>,
    ) -> Result<Done, CommandError> {
        let reservation = self.email_stream(email)?;
        // Most addresses were never reserved: the first attempt expects nothing, with no read.
        let mut reservation_expected = ExpectedVersion::NoStream;
        for _ in 0..MAX_ATTEMPTS {
            // An active administrator joins the administrators in the same append. It goes
            // first, so that the email reservation stays the last message, as a repeated
            // registration answers.
            let mut appends = self
                .administrators_append(&UserAccount::NotRegistered, events)
                .await?;
            appends.push(StreamAppend::new(
                user_stream(id)?,
                ExpectedVersion::NoStream,
                messages.clone(),
            ));
            appends.extend(also.iter().cloned());
            appends.push(StreamAppend::new(
                reservation.clone(),
                reservation_expected,
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
                Err(AppendError::WrongExpectedVersion { stream, .. }) if stream == reservation => {
                    match self.reservation(email).await? {
                        Reservation::Free { expected } if expected != reservation_expected => {
                            reservation_expected = expected;
                            continue;
                        }
                        _ => self
                            .existing_registration(id, email)
                            .await?
                            .ok_or(CommandError::EmailTaken),
                    }
                }
                // The account or the email exists: this registration again, or another one.
                Err(AppendError::WrongExpectedVersion { .. }) => self
                    .existing_registration(id, email)
                    .await?
                    .ok_or(CommandError::EmailTaken),
                Err(error) => Err(append_failed(error, "appending a registration")),
            };
        }
        Err(lost_every_race("registering"))
    }

    /// The answer to a repeated registration of `id` with `email`, if `id` is registered:
    /// the first answer again for the same email, `IdTaken` for another, or for an erased
    /// account (whose address is unknown now, and whose id is never used again).
    pub(crate) async fn existing_registration(
        &self,
        id: UserId,
        email: &Email,
    ) -> Result<Option<Done>, CommandError> {
        let loaded = self.load(id).await?;
        if loaded.account.is_erased() {
            return Err(CommandError::IdTaken);
        }
        let Some(account) = loaded.account.account() else {
            return Ok(None);
        };
        if account.email_normalized != email.normalized() {
            return Err(CommandError::IdTaken);
        }
        // The first answer's position was the later of the messages appended together.
        let reserved_at = match self.reservation(email).await? {
            Reservation::HeldBy {
                user_id,
                global_position,
                ..
            } if user_id == id => global_position,
            _ => 0,
        };
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
    ///
    /// A granted login starts a session (with the client's `user_agent`, so that its owner can
    /// tell it from their others), recorded in the same atomic append as the login's event.
    pub async fn login(
        &self,
        email: &str,
        password: String,
        user_agent: Option<UserAgent>,
    ) -> Result<SessionTokens, CommandError> {
        let (Ok(email), Ok(password)) = (Email::parse(email), Password::for_verification(password))
        else {
            count_login("malformed");
            return Err(CommandError::InvalidCredentials);
        };
        let started = Instant::now();
        let mut check = PasswordCheck::new(password);
        match self.try_login(&email, &mut check, user_agent).await {
            Ok(logged_in) => {
                count_login("granted");
                Ok(logged_in)
            }
            Err(failed) => {
                let answer_at = started + check.counted + self.refusal_padding;
                tokio::time::sleep_until(answer_at.into()).await;
                count_login(failed.outcome);
                Err(failed.error)
            }
        }
    }

    /// [`Self::login`] without the padding: find the account, decide on the password and the
    /// last login, record the decision (with the session a granted login starts) and, for a
    /// granted login, issue the tokens. Decided again when another login to the same account
    /// recorded itself first.
    async fn try_login(
        &self,
        email: &Email,
        check: &mut PasswordCheck,
        user_agent: Option<UserAgent>,
    ) -> Result<SessionTokens, Failed> {
        let streams = LoginStreams::of(self.find_user(email).await?)?;
        for _ in 0..MAX_ATTEMPTS {
            let attempt = self.decide_login_attempt(&streams, check).await?;
            let session = self.session_of(&attempt, user_agent.clone())?;
            let recorded = self.record_login_attempt(&streams, &attempt, session.as_ref());
            let Some(position) = recorded.await? else {
                continue;
            };
            if let Some(outcome) = refusal_outcome(&attempt.decision) {
                return Err(Failed::refused(outcome));
            }
            let Some(session) = session else {
                return Err(Failed::refused("unknown_account"));
            };
            return self.grant(&attempt, &session, check, position).await;
        }
        Err(Failed::contended(check))
    }

    /// Reads what a login is decided on, the account and its last login event, checks the
    /// password against the hash read, and lets the domain decide.
    async fn decide_login_attempt(
        &self,
        streams: &LoginStreams,
        check: &mut PasswordCheck,
    ) -> Result<LoginAttempt, Failed> {
        let loaded = self.load_for_login(streams).await?;
        let stored = loaded
            .account
            .account()
            .map(|account| &account.password_hash);
        let matches = check.matches(&self.hasher, stored).await?;
        let (state, login_version) = self.login_state(&streams.login).await?;
        let now = self.clock.now();
        let decision = decide_login(&loaded.account, &state, matches, now, &self.lockout);
        Ok(LoginAttempt {
            loaded,
            login_version,
            decision,
            now,
        })
    }

    /// The account a login decides on. An unknown email's stand-in stream is read too, and
    /// the vault for keys, as opening a known account's stream reads them, so that it costs
    /// what a known one does; whatever it may hold, no account is found.
    async fn load_for_login(&self, streams: &LoginStreams) -> Result<Loaded, CommandError> {
        let loaded = self.load_stream(&streams.user).await?;
        if streams.known {
            return Ok(loaded);
        }
        self.read_no_key().await?;
        Ok(Loaded::empty())
    }

    /// The session a granted attempt starts; none for a refusal.
    fn session_of(
        &self,
        attempt: &LoginAttempt,
        user_agent: Option<UserAgent>,
    ) -> Result<Option<SessionStarted>, CommandError> {
        match attempt.loaded.account.account() {
            Some(account) if attempt.decision.is_granted() => self
                .start_session(account, user_agent, attempt.now)
                .map(Some),
            _ => Ok(None),
        }
    }

    /// Appends the attempt's login event at the version of the login stream it was decided on,
    /// if it has one (a refusal of a locked or inactive account leaves no trace), and the start
    /// of the session a granted login opens, in one atomic append: the position the answer
    /// reports, or `None` when another login to the account recorded itself first and the
    /// attempt must be decided again.
    async fn record_login_attempt(
        &self,
        streams: &LoginStreams,
        attempt: &LoginAttempt,
        session: Option<&SessionStarted>,
    ) -> Result<Option<GlobalPosition>, CommandError> {
        let Some(event) = attempt.decision.event() else {
            return Ok(Some(attempt.loaded.last_global));
        };
        let mut appends = vec![StreamAppend::new(
            streams.login.clone(),
            expected(attempt.login_version),
            vec![login_message(event)],
        )];
        if let Some(started) = session {
            appends.push(Self::session_start_append(started)?);
        }
        self.append_if_current(appends, "appending a login event")
            .await
    }

    /// The tokens of a granted login, in the session it started. An account whose hash is
    /// older than the parameters gets a stronger one now, while the password is at hand; the
    /// answer's position covers it, so that the client can read its own write.
    async fn grant(
        &self,
        attempt: &LoginAttempt,
        session: &SessionStarted,
        check: &PasswordCheck,
        position: GlobalPosition,
    ) -> Result<SessionTokens, Failed> {
        let loaded = &attempt.loaded;
        let Some(account) = loaded.account.account() else {
            return Err(Failed::refused("unknown_account"));
        };
        let mut tokens = self.started_session_tokens(account, session, position)?;
        if self.hasher.needs_rehash(&account.password_hash)
            && let Some(rehashed) = self.rehash(loaded, check.password.clone()).await?
        {
            tokens.position = tokens.position.max(rehashed);
        }
        Ok(tokens)
    }

    /// Stores a stronger hash of the password just verified. It is appended at the version the
    /// login read, so it never lands on a password changed since (the new password would be
    /// replaced by the old one); losing that race is fine: the next login tries again.
    async fn rehash(
        &self,
        loaded: &Loaded,
        password: Password,
    ) -> Result<Option<GlobalPosition>, CommandError> {
        let Some(account) = loaded.account.account() else {
            return Ok(None);
        };
        let new_password_hash = match self.hasher.hash(password).await {
            Ok(hash) => hash,
            // A busy hasher is no reason to refuse a granted login.
            Err(HashError::Busy) => return Ok(None),
            Err(error) => return Err(error.into()),
        };
        let command = UserCommand::RehashPassword { new_password_hash };
        let events =
            decide(&loaded.account, command, self.clock.now()).context("rehashing was refused")?;
        // An account erased since the login was granted keeps no password, stronger or not.
        let key = match self.writing_key(account.id).await {
            Ok(key) => key,
            Err(CommandError::AccountErased) => return Ok(None),
            Err(error) => return Err(error),
        };
        let append = StreamAppend::new(
            user_stream(account.id)?,
            expected(loaded.version),
            user_messages(Some(&key), &events)?,
        );
        self.append_if_current(vec![append], "appending a rehashed password")
            .await
    }

    /// Activates or deactivates; repeating one records nothing and answers the current position.
    pub async fn set_active(&self, id: UserId, active: bool) -> Result<Done, CommandError> {
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
    ) -> Result<Done, CommandError> {
        let new = Password::new(new, &self.password_policy).map_err(|error| {
            CommandError::Validation(vec![FieldError::new("new_password", error)])
        })?;
        let loaded = self.load(id).await?;
        let Some(account) = loaded.account.account() else {
            return Err(CommandError::NotFound);
        };
        self.prove_password(account, current).await?;
        let new_password_hash = self.hasher.hash(new).await?;
        // The caller proved the password the account had when it was loaded; if the user has
        // chosen another one meanwhile, that proof no longer stands. A login that upgraded the
        // hash meanwhile stored the same password again: the proof still stands, and the new
        // password replaces the upgraded hash.
        let proven = account.password_changes;
        let unchanged = |account: &UserAccount| match account.account() {
            Some(now) if now.password_changes == proven => Ok(()),
            Some(_) => Err(CommandError::InvalidCredentials),
            None => Err(CommandError::NotFound),
        };
        self.update_if(id, unchanged, || UserCommand::ChangePassword {
            new_password_hash: new_password_hash.clone(),
        })
        .await
    }

    /// Checks `password` against the account's, as a login does: a wrong one is recorded as a
    /// failed login (so that guessing through another route meets the same lockout), and a
    /// locked account is refused either way.
    pub(crate) async fn prove_password(
        &self,
        account: &Account,
        password: String,
    ) -> Result<(), CommandError> {
        let password =
            Password::for_verification(password).map_err(|_| CommandError::InvalidCredentials)?;
        let stored = Some(account.password_hash.clone());
        let matches = self.hasher.verify(password, stored).await?.matches;
        let state = UserAccount::Registered(account.clone());
        self.confirm_proof(account.id, &state, matches).await
    }

    /// Lets a password proof stand if it `matches` and the account is not locked. A wrong
    /// password is recorded as a failed login, as a login's would be, so that guessing through
    /// a password change meets the same lockout.
    async fn confirm_proof(
        &self,
        id: UserId,
        account: &UserAccount,
        matches: bool,
    ) -> Result<(), CommandError> {
        let stream = login_stream(id)?;
        for _ in 0..MAX_ATTEMPTS {
            let (state, login_version) = self.login_state(&stream).await?;
            let now = self.clock.now();
            if state.locked_until(now).is_some() {
                return Err(CommandError::InvalidCredentials);
            }
            if matches {
                return Ok(());
            }
            let decision = decide_login(account, &state, false, now, &self.lockout);
            if let Some(event) = decision.into_event() {
                let appended = self.append_login_event(&stream, login_version, &event);
                if appended.await?.is_none() {
                    // Another login to the account recorded itself first: decide again.
                    continue;
                }
            }
            return Err(CommandError::InvalidCredentials);
        }
        Err(CommandError::InvalidCredentials)
    }

    /// Read, decide, append to the user stream; again when another writer got there first.
    pub(crate) async fn update(
        &self,
        id: UserId,
        command: impl Fn() -> UserCommand,
    ) -> Result<Done, CommandError> {
        self.update_if(id, |_| Ok(()), command).await
    }

    /// [`Self::update`], provided `still_holds` accepts the account as it is loaded for each
    /// attempt: for a command decided on something the caller proved against an earlier
    /// state. The account's key is read once, by the first attempt whose events need it.
    async fn update_if(
        &self,
        id: UserId,
        still_holds: impl Fn(&UserAccount) -> Result<(), CommandError>,
        command: impl Fn() -> UserCommand,
    ) -> Result<Done, CommandError> {
        let mut key = None;
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
            if key.is_none() && hold_personal_data(&events) {
                // Erased since it was loaded: answered as the erased account would be.
                let read = self.writing_key(id).await;
                key = Some(read.map_err(erased_is(|| CommandError::NotFound))?);
            }
            // The administrators' change first, so that the account's event is the last
            // message and a repeated command answers the same position.
            let mut appends = self.administrators_append(&loaded.account, &events).await?;
            appends.push(StreamAppend::new(
                user_stream(id)?,
                expected(loaded.version),
                user_messages(key.as_ref(), &events)?,
            ));
            let appended = self.append_if_current(appends, "appending to a user stream");
            if let Some(position) = appended.await? {
                return Ok(Done { id, position });
            }
        }
        Err(lost_every_race("updating an account"))
    }

    /// Appends a login event at the version of the login stream its decision read; `None` when
    /// another login to the account recorded itself first, and the decision must be made again.
    async fn append_login_event(
        &self,
        stream: &StreamName,
        version: Option<StreamPosition>,
        event: &LoginEvent,
    ) -> Result<Option<GlobalPosition>, CommandError> {
        let append = StreamAppend::new(
            stream.clone(),
            expected(version),
            vec![login_message(event)],
        );
        self.append_if_current(vec![append], "appending a login event")
            .await
    }

    /// Appends, provided every stream is still at the version the decision read: the position
    /// of the last message, or `None` when another writer got there first.
    pub(crate) async fn append_if_current(
        &self,
        appends: Vec<StreamAppend>,
        appending: &'static str,
    ) -> Result<Option<GlobalPosition>, CommandError> {
        match self.store.append(appends).await {
            Ok(appended) => Ok(Some(appended.last_global_position())),
            Err(AppendError::WrongExpectedVersion { .. }) => Ok(None),
            Err(error) => Err(append_failed(error, appending)),
        }
    }

    /// The append to the administrators' stream that `events`, decided on `before`, call for:
    /// none when they leave the set of active administrators as it is, else the new set with
    /// the exact version it was decided on, or the refusal to let the last one go.
    pub(crate) async fn administrators_append(
        &self,
        before: &UserAccount,
        events: &[UserEvent],
    ) -> Result<Vec<StreamAppend>, CommandError> {
        let Some(change) = change_of(before, events) else {
            return Ok(vec![]);
        };
        let (administrators, version) = self.administrators().await?;
        let event = decide_administrators(&administrators, change, self.clock.now())?;
        let message = versioned_message(event.event_type(), event.to_json(), event.version());
        Ok(vec![StreamAppend::new(
            administrators_stream()?,
            version,
            vec![message],
        )])
    }

    /// The active administrators and the version of their stream, from its last message; on a
    /// store written before that stream existed, folded from the accounts, to be appended with
    /// "no stream" expected (of two first changes at once, one wins and the other reads it).
    async fn administrators(&self) -> Result<(Administrators, ExpectedVersion), CommandError> {
        let Some(last) = self.store.last_message(&administrators_stream()?).await? else {
            return Ok((
                self.administrators_from_accounts().await?,
                ExpectedVersion::NoStream,
            ));
        };
        let event = stored_event(
            &last,
            AdministratorsEvent::from_stored,
            "reading the administrators",
        )?;
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
    async fn administrators_from_accounts(&self) -> Result<Administrators, CommandError> {
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
            let mut batch = self
                .store
                .read_category(USER_CATEGORY, after, BATCH)
                .await?;
            self.unseal(&mut batch).await?;
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
    pub(crate) async fn find_user(&self, email: &Email) -> Result<Option<UserId>, CommandError> {
        Ok(self.reservation(email).await?.holder())
    }

    /// Who holds `email`, from the last message of its reservation stream.
    pub(crate) async fn reservation(&self, email: &Email) -> Result<Reservation, CommandError> {
        let last = self.store.last_message(&self.email_stream(email)?).await?;
        Reservation::from_last(last.as_ref()).map_err(|error| CommandError::Internal(error.into()))
    }

    /// The reservation stream of `email`, named by the lookup key's hash.
    pub(crate) fn email_stream(&self, email: &Email) -> anyhow::Result<StreamName> {
        email_stream(&self.lookup_key, email)
    }

    /// Folds a user stream, its personal fields opened (an erased account's read as erased, so
    /// that it folds into `UserAccount::Erased`). It holds registration, status and password
    /// changes only (never logins), so it stays short.
    pub(crate) async fn load(&self, id: UserId) -> Result<Loaded, CommandError> {
        self.load_stream(&user_stream(id)?).await
    }

    async fn load_stream(&self, stream: &StreamName) -> Result<Loaded, CommandError> {
        const BATCH: usize = 1000;
        let mut loaded = Loaded::empty();
        let mut events = Vec::new();
        let mut from = 0;
        loop {
            let mut batch = self.store.read_stream(stream, from, BATCH).await?;
            self.unseal(&mut batch).await?;
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
    pub(crate) async fn login_state(
        &self,
        stream: &StreamName,
    ) -> Result<(LoginState, Option<StreamPosition>), CommandError> {
        let Some(last) = self.store.last_message(stream).await? else {
            return Ok((LoginState::default(), None));
        };
        let event = stored_event(&last, LoginEvent::from_stored, "reading a login event")?;
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
    /// Whether the streams are an account's, rather than the stand-ins of an unknown email.
    known: bool,
}

impl LoginStreams {
    const NOBODY: &'static str = "nobody";

    fn of(user: Option<UserId>) -> anyhow::Result<Self> {
        Ok(match user {
            Some(id) => Self {
                user: user_stream(id)?,
                login: login_stream(id)?,
                known: true,
            },
            None => Self {
                user: StreamName::for_entity(USER_CATEGORY, Self::NOBODY)?,
                login: StreamName::for_entity(LOGIN_CATEGORY, Self::NOBODY)?,
                known: false,
            },
        })
    }
}

/// One attempt at a login: the decision, and what it was decided on.
struct LoginAttempt {
    loaded: Loaded,
    login_version: Option<StreamPosition>,
    decision: LoginDecision,
    now: DateTime<Utc>,
}

/// A login's check of its password, kept across the login's attempts: an attempt that lost the
/// race to record itself reads the account again, and hashes again only if its stored hash
/// changed meanwhile.
struct PasswordCheck {
    password: Password,
    /// The stored hash last checked against (none for an unknown email), and whether the
    /// password matched it.
    verdict: Option<(Option<PasswordHash>, bool)>,
    /// How long the checks count for, which a refusal's padding starts after: the time they
    /// took, and for a hash older than the parameters, as long again as they fell short of a
    /// check at today's parameters.
    counted: Duration,
}

impl PasswordCheck {
    fn new(password: Password) -> Self {
        Self {
            password,
            verdict: None,
            counted: Duration::ZERO,
        }
    }

    /// Whether the password matches `stored`; an unknown email (no hash) costs a check too.
    async fn matches(
        &mut self,
        hasher: &Hasher,
        stored: Option<&PasswordHash>,
    ) -> Result<bool, HashError> {
        if let Some((checked, matched)) = &self.verdict
            && checked.as_ref() == stored
        {
            return Ok(*matched);
        }
        let started = Instant::now();
        let verified = hasher.verify(self.password.clone(), stored.cloned()).await;
        // A check that was refused a thread took its time too.
        self.counted += started.elapsed();
        let verified = verified?;
        // A hash older than the parameters checks faster than the dummy hash of an unknown
        // email; it counts as long as a check at today's parameters.
        self.counted += verified.shortfall;
        self.verdict = Some((stored.cloned(), verified.matches));
        Ok(verified.matches)
    }

    /// Whether the last check found the password wrong; `None` before any check.
    fn was_wrong(&self) -> Option<bool> {
        self.verdict.as_ref().map(|(_, matched)| !matched)
    }
}

/// A login that did not succeed: its error, and the outcome it is counted under in
/// `logins_total`.
struct Failed {
    outcome: &'static str,
    error: CommandError,
}

impl Failed {
    /// A refusal: one error whatever the reason, so that nobody learns which.
    fn refused(outcome: &'static str) -> Self {
        Self {
            outcome,
            error: CommandError::InvalidCredentials,
        }
    }

    /// Every attempt lost the race to record itself: many logins to one account at once. A
    /// wrong password is refused like any other, so that contention, which only a known
    /// account meets, does not show; the right one is told to come back shortly.
    fn contended(check: &PasswordCheck) -> Self {
        if check.was_wrong() == Some(true) {
            Self::refused("contended")
        } else {
            CommandError::Busy.into()
        }
    }
}

impl<E: Into<CommandError>> From<E> for Failed {
    fn from(error: E) -> Self {
        let error = error.into();
        let outcome = match error {
            CommandError::Busy => "throttled",
            _ => "error",
        };
        Self { outcome, error }
    }
}

/// The outcome a refused login is counted under in `logins_total`; `None` for a granted one.
fn refusal_outcome(decision: &LoginDecision) -> Option<&'static str> {
    let LoginDecision::Refused { reason, .. } = decision else {
        return None;
    };
    Some(match reason {
        LoginRefusal::UnknownAccount => "unknown_account",
        LoginRefusal::WrongPassword => "wrong_password",
        LoginRefusal::NotActive => "not_active",
        LoginRefusal::Locked { .. } => "locked",
    })
}

/// A store error: the store out of reach, which the caller may retry, or a fault.
fn store_failed(error: StoreError, doing: &'static str) -> CommandError {
    let unavailable = error.is_unavailable();
    let error = anyhow::Error::new(error).context(doing);
    if unavailable {
        CommandError::StoreUnavailable(error)
    } else {
        CommandError::Internal(error)
    }
}

/// An append that failed for another reason than a race.
pub(crate) fn append_failed(error: AppendError, appending: &'static str) -> CommandError {
    match error {
        AppendError::Store(error) => store_failed(error, appending),
        error => CommandError::Internal(anyhow::Error::new(error).context(appending)),
    }
}

/// A read-decide-append that lost every attempt to other writers of the same streams.
pub(crate) fn lost_every_race(doing: &str) -> CommandError {
    anyhow::anyhow!("{doing} lost the race {MAX_ATTEMPTS} times").into()
}

/// A stored event, read with its stream enum's `from_stored` at the version its metadata names.
pub(crate) fn stored_event<E>(
    message: &RecordedMessage,
    from_stored: impl Fn(&str, u32, &Value) -> Result<E, EventDecodeError>,
    reading: &'static str,
) -> Result<E, CommandError> {
    let event = event_version(&message.metadata)
        .and_then(|version| from_stored(&message.message_type, version, &message.data))
        .context(reading)?;
    Ok(event)
}

fn user_event(message: &RecordedMessage) -> Result<UserEvent, CommandError> {
    stored_event(message, UserEvent::from_stored, "reading a user event")
}

/// An event as a message, its version in the metadata, where every reader looks for it.
pub(crate) fn versioned_message(event_type: &'static str, data: Value, version: u32) -> NewMessage {
    NewMessage::new(event_type, data).with_metadata(json!({ EVENT_VERSION_KEY: version }))
}

/// A login event as a message for the login stream.
pub fn login_message(event: &LoginEvent) -> NewMessage {
    versioned_message(event.event_type(), event.to_json(), event.version())
}

pub(crate) fn expected(version: Option<StreamPosition>) -> ExpectedVersion {
    version.map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact)
}

pub(crate) fn user_stream(id: UserId) -> anyhow::Result<StreamName> {
    Ok(StreamName::parse(user_stream_name(id))?)
}

fn administrators_stream() -> anyhow::Result<StreamName> {
    Ok(StreamName::parse(ADMINISTRATORS_STREAM)?)
}

/// `userLogin-<id>`.
pub fn login_stream(id: UserId) -> anyhow::Result<StreamName> {
    Ok(StreamName::parse(login_stream_name(id))?)
}

fn count_login(outcome: &'static str) {
    metrics::counter!("logins_total", "outcome" => outcome).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unreachable_store() -> StoreError {
        StoreError::Database(sqlx::Error::PoolTimedOut)
    }

    #[test]
    fn a_store_out_of_reach_is_an_outage_whether_reading_or_appending_and_a_fault_is_not() {
        assert!(matches!(
            CommandError::from(unreachable_store()),
            CommandError::StoreUnavailable(_)
        ));
        let append = AppendError::Store(unreachable_store());
        assert!(matches!(
            append_failed(append, "appending"),
            CommandError::StoreUnavailable(_)
        ));
        let invalid = AppendError::Invalid("no messages".into());
        assert!(matches!(
            append_failed(invalid, "appending"),
            CommandError::Internal(_)
        ));
        let corrupt = StoreError::Database(sqlx::Error::RowNotFound);
        assert!(matches!(
            CommandError::from(corrupt),
            CommandError::Internal(_)
        ));
    }
}
