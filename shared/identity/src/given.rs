//! A given/when/then helper, so that domain tests read like the rules they check.
//!
//! ```text
//! given([registered(Active)]).when(UserCommand::Deactivate, t0()).then([UserDeactivated { .. }])
//! ```

use chrono::{DateTime, TimeZone, Utc};
use uuid::Uuid;

use crate::account::{Refusal, Register, UserAccount, UserCommand, decide};
use crate::email::Email;
use crate::events::{UserDeactivated, UserEvent, UserRegistered};
use crate::password::PasswordHash;
use crate::values::{AccountStatus, InitialStatus, Role, UserId};

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

/// The test user.
pub fn user() -> UserId {
    UserId::from_uuid(Uuid::from_u128(0x0190_f1aa_0000_7000_8000_0000_0000_0001))
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
        email: Email::parse("ann@example.com").unwrap(),
        email_normalized: "ann@example.com".into(),
        password_hash: hash("first"),
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
