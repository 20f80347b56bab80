//! A given/when/then helper, so that domain tests read like the rules they check.
//!
//! ```text
//! given([registered(Active)]).when(UserCommand::Deactivate, t0()).then([UserDeactivated { .. }])
//! given_session([started]).when(SessionCommand::End { .. }, t0()).then(SessionDecision::Ended(..))
//! given_recovery([requested]).when(RecoveryCommand::Complete { .. }, t0()).then_refused(..)
//! ```

use chrono::{DateTime, TimeZone, Utc};
use uuid::Uuid;

use crate::account::{Refusal, Register, UserAccount, UserCommand, decide};
use crate::email::Email;
use crate::events::{RecoveryEvent, SessionEvent, UserDeactivated, UserEvent, UserRegistered};
use crate::password::PasswordHash;
use crate::recovery::{
    RecoveryCommand, RecoveryDecision, RecoveryNonce, RecoveryPolicy, RecoveryRefusal,
    RecoveryState, decide_recovery,
};
use crate::session::{
    RefreshNonce, SessionCommand, SessionDecision, SessionPolicy, SessionRefusal, SessionState,
    decide_session,
};
use crate::values::{AccountStatus, InitialStatus, Role, SessionId, UserId};

/// The history the rule is tested against, oldest first.
pub fn given(history: impl IntoIterator<Item = UserEvent>) -> Given {
    let history: Vec<UserEvent> = history.into_iter().collect();
    Given {
        state: UserAccount::fold(&history),
    }
}

pub struct Given {
    state: UserAccount,
}

impl Given {
    pub fn when(self, command: UserCommand, now: DateTime<Utc>) -> When {
        When {
            outcome: decide(&self.state, command.clone(), now),
            command,
        }
    }
}

pub struct When {
    command: UserCommand,
    outcome: Result<Vec<UserEvent>, Refusal>,
}

impl When {
    /// The command is accepted and records exactly these events (none: a harmless no-op).
    #[track_caller]
    pub fn then(self, expected: impl IntoIterator<Item = UserEvent>) {
        let expected: Vec<UserEvent> = expected.into_iter().collect();
        assert_eq!(self.outcome, Ok(expected), "when {:?}", self.command);
    }

    #[track_caller]
    pub fn then_refused(self, refusal: Refusal) {
        assert_eq!(self.outcome, Err(refusal), "when {:?}", self.command);
    }
}

/// A session stream's history, oldest first. As in the command API, only its last event counts.
pub fn given_session(history: impl IntoIterator<Item = SessionEvent>) -> GivenSession {
    let last = history.into_iter().last();
    GivenSession {
        state: SessionState::from_last(last.as_ref()),
    }
}

pub struct GivenSession {
    state: SessionState,
}

impl GivenSession {
    /// Decides under the default [`SessionPolicy`].
    pub fn when(self, command: SessionCommand, now: DateTime<Utc>) -> WhenSession {
        WhenSession {
            outcome: decide_session(&self.state, command.clone(), now, &SessionPolicy::default()),
            command,
        }
    }
}

pub struct WhenSession {
    command: SessionCommand,
    outcome: Result<SessionDecision, SessionRefusal>,
}

impl WhenSession {
    #[track_caller]
    pub fn then(self, expected: SessionDecision) {
        assert_eq!(self.outcome, Ok(expected), "when {:?}", self.command);
    }

    #[track_caller]
    pub fn then_refused(self, refusal: SessionRefusal) {
        assert_eq!(self.outcome, Err(refusal), "when {:?}", self.command);
    }

    /// The outcome itself, to feed its event back as the next `given`.
    pub fn decision(self) -> Result<SessionDecision, SessionRefusal> {
        self.outcome
    }
}

/// A recovery stream's history, oldest first. As in the command API, only its last event counts.
pub fn given_recovery(history: impl IntoIterator<Item = RecoveryEvent>) -> GivenRecovery {
    let last = history.into_iter().last();
    GivenRecovery {
        state: RecoveryState::from_last(last.as_ref()),
    }
}

pub struct GivenRecovery {
    state: RecoveryState,
}

impl GivenRecovery {
    /// Decides under the default [`RecoveryPolicy`].
    pub fn when(self, command: RecoveryCommand, now: DateTime<Utc>) -> WhenRecovery {
        WhenRecovery {
            outcome: decide_recovery(
                &self.state,
                command.clone(),
                now,
                &RecoveryPolicy::default(),
            ),
            command,
        }
    }
}

pub struct WhenRecovery {
    command: RecoveryCommand,
    outcome: Result<RecoveryDecision, RecoveryRefusal>,
}

impl WhenRecovery {
    #[track_caller]
    pub fn then(self, expected: RecoveryDecision) {
        assert_eq!(self.outcome, Ok(expected), "when {:?}", self.command);
    }

    #[track_caller]
    pub fn then_refused(self, refusal: RecoveryRefusal) {
        assert_eq!(self.outcome, Err(refusal), "when {:?}", self.command);
    }

    /// The outcome itself, to feed its event back as the next `given`.
    pub fn decision(self) -> Result<RecoveryDecision, RecoveryRefusal> {
        self.outcome
    }
}

/// A recovery nonce told apart by `n`, so that a test can name each request's as
/// `recovery_nonce(n)`.
pub fn recovery_nonce(n: u64) -> RecoveryNonce {
    let mut bytes = [0x7c; RecoveryNonce::LEN];
    bytes[RecoveryNonce::LEN - 8..].copy_from_slice(&n.to_be_bytes());
    RecoveryNonce::from_bytes(bytes)
}

/// The test user.
pub fn user() -> UserId {
    UserId::from_uuid(Uuid::from_u128(0x0190_f1aa_0000_7000_8000_0000_0000_0001))
}

/// The test user's session.
pub fn session() -> SessionId {
    SessionId::from_uuid(Uuid::from_u128(0x0190_f1aa_0000_7000_8000_0000_0000_0051))
}

/// A nonce told apart by `n`, so that a test can name each generation's as `nonce(generation)`.
pub fn nonce(n: u64) -> RefreshNonce {
    let mut bytes = [0x5e; RefreshNonce::LEN];
    bytes[RefreshNonce::LEN - 8..].copy_from_slice(&n.to_be_bytes());
    RefreshNonce::from_bytes(bytes)
}

/// A fixed instant; tests move from it with `TimeDelta`.
pub fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 3, 14, 9, 26, 53).unwrap()
}

/// A PHC-shaped hash told apart by `name` (printable ASCII, no `$`).
pub fn hash(name: &str) -> PasswordHash {
    PasswordHash::parse(format!("$argon2id$v=19$m=19456,t=2,p=1$c2FsdA${name}")).unwrap()
}

/// The command that registers the test user, `ann@example.com` with the role `user`; a test
/// changes the fields its rule is about.
pub fn registration(initial_status: InitialStatus) -> Register {
    Register {
        user_id: user(),
        email: Email::parse("ann@example.com").unwrap(),
        password_hash: hash("first"),
        roles: vec![Role::User],
        initial_status,
    }
}

/// The test user's registration, `ann@example.com` with the role `user`.
pub fn registered(status: AccountStatus) -> UserEvent {
    UserRegistered {
        user_id: user(),
        email: Email::parse("ann@example.com").unwrap().into(),
        email_normalized: "ann@example.com".into(),
        password_hash: hash("first").into(),
        status,
        roles: vec![Role::User],
        registered_at: t0(),
    }
    .into()
}

/// The history of the test user's account once it is deactivated: registered active, then
/// deactivated, both at [`t0`].
pub fn deactivated() -> [UserEvent; 2] {
    [
        registered(AccountStatus::Active),
        UserDeactivated { at: t0() }.into(),
    ]
}
