//! The user account aggregate: its state, the commands on it and the rules that decide them.
//!
//! [`decide`] holds every rule; [`evolve`] only records what the events say. Events are facts
//! already decided, so `evolve` never refuses one.

use chrono::{DateTime, Utc};

use crate::email::Email;
use crate::events::{
    EmailChanged, EmailVerified, PasswordChanged, PasswordRehashed, PasswordReset, SessionsEnded,
    UserActivated, UserDeactivated, UserErased, UserEvent, UserRegistered,
};
use crate::password::PasswordHash;
use crate::personal::Personal;
use crate::values::{AccountStatus, InitialStatus, Role, UserId};

/// A user stream folded into what the rules need: nothing yet, the registered account, or an
/// account whose person was erased.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum UserAccount {
    #[default]
    NotRegistered,
    Registered(Account),
    Erased(ErasedAccount),
}

/// What remains of an erased account: the facts that say what happened and when, none that
/// says who. Nothing can be done with it any more; its id stays taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErasedAccount {
    pub id: UserId,
    pub registered_at: DateTime<Utc>,
    /// When, by its [`UserErased`] event. `None` while only its data was found erased: a
    /// reader that read the stream just before the erasure was appended and the key just after
    /// it was deleted.
    pub erased_at: Option<DateTime<Utc>>,
}

/// A registered account as its events left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub id: UserId,
    pub email: Email,
    pub email_normalized: String,
    /// Whether the owner proved control of `email` through a mailed link (a verification, or
    /// the change of email that moved the account to it).
    pub email_verified: bool,
    pub password_hash: PasswordHash,
    /// How many times the user has chosen a new password since registering. A rehash (the
    /// same password, hashed again with stronger parameters) leaves it as it is: a proof of the
    /// password made against the older hash still stands, and a password change decided on
    /// such a proof must not be refused because a login upgraded the hash meanwhile.
    pub password_changes: u64,
    /// How many times every session of the account was ended at once: by a deactivation, a
    /// password change, or an administrator ([`SessionsEnded`]). A session remembers the epoch
    /// it started in, and is over once the account has moved past it. One number rather than a
    /// list of sessions to end, so that ending them costs the same however many there are, and
    /// a login racing the change cannot leave a session behind it.
    pub session_epoch: u64,
    pub status: AccountStatus,
    pub roles: Vec<Role>,
    pub registered_at: DateTime<Utc>,
}

impl Account {
    pub fn is_active(&self) -> bool {
        self.status == AccountStatus::Active
    }

    pub fn has_role(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }
}

impl UserAccount {
    /// The state after a whole user stream, oldest event first. Folding only the events up to
    /// an instant gives the account as it stood then.
    pub fn fold<'a>(events: impl IntoIterator<Item = &'a UserEvent>) -> Self {
        events.into_iter().fold(Self::NotRegistered, evolve)
    }

    /// The account, while it is registered and not erased.
    pub fn account(&self) -> Option<&Account> {
        match self {
            Self::NotRegistered | Self::Erased(_) => None,
            Self::Registered(account) => Some(account),
        }
    }

    pub fn is_erased(&self) -> bool {
        matches!(self, Self::Erased(_))
    }
}

/// The account a `UserRegistered` creates, or the erased account it was when any of its
/// personal fields is gone.
fn registered(registered: &UserRegistered) -> UserAccount {
    let (Personal::Known(email), Personal::Known(email_normalized), Personal::Known(hash)) = (
        &registered.email,
        &registered.email_normalized,
        &registered.password_hash,
    ) else {
        return UserAccount::Erased(ErasedAccount {
            id: registered.user_id,
            registered_at: registered.registered_at,
            erased_at: None,
        });
    };
    UserAccount::Registered(Account {
        id: registered.user_id,
        email: email.clone(),
        email_normalized: email_normalized.clone(),
        email_verified: false,
        password_hash: hash.clone(),
        password_changes: 0,
        session_epoch: 0,
        status: registered.status,
        roles: registered.roles.clone(),
        registered_at: registered.registered_at,
    })
}

/// The account as erased: by its event, or because one of its events' personal fields is gone.
fn erased(account: &Account, erased_at: Option<DateTime<Utc>>) -> UserAccount {
    UserAccount::Erased(ErasedAccount {
        id: account.id,
        registered_at: account.registered_at,
        erased_at,
    })
}

/// Applies one event. An event that cannot apply (anything before `UserRegistered`, or a
/// second `UserRegistered`) leaves the state as it is: `decide` never produces one, and a reader
/// must not fail on history it cannot change.
///
/// An erased account stays erased, and only the time of its erasure is added to it.
pub fn evolve(state: UserAccount, event: &UserEvent) -> UserAccount {
    let mut account = match (state, event) {
        (UserAccount::NotRegistered, UserEvent::UserRegistered(event)) => {
            return registered(event);
        }
        (UserAccount::Erased(mut erased), UserEvent::UserErased(UserErased { at, .. })) => {
            erased.erased_at = Some(*at);
            return UserAccount::Erased(erased);
        }
        (UserAccount::Registered(account), _) => account,
        (state @ (UserAccount::NotRegistered | UserAccount::Erased(_)), _) => return state,
    };
    match event {
        UserEvent::UserRegistered(_) => {}
        UserEvent::UserActivated(_) => account.status = AccountStatus::Active,
        UserEvent::UserDeactivated(_) => {
            account.status = AccountStatus::Deactivated;
            account.session_epoch += 1;
        }
        UserEvent::PasswordChanged(PasswordChanged { password_hash, .. })
        | UserEvent::PasswordReset(PasswordReset { password_hash, .. }) => {
            let Personal::Known(hash) = password_hash else {
                return erased(&account, None);
            };
            account.password_hash = hash.clone();
            account.password_changes += 1;
            account.session_epoch += 1;
        }
        UserEvent::EmailVerified(_) => account.email_verified = true,
        UserEvent::EmailChanged(EmailChanged {
            email,
            email_normalized,
            ..
        }) => {
            let (Personal::Known(email), Personal::Known(normalized)) = (email, email_normalized)
            else {
                return erased(&account, None);
            };
            account.email = email.clone();
            account.email_normalized = normalized.clone();
            account.email_verified = true;
        }
        UserEvent::SessionsEnded(_) => account.session_epoch += 1,
        UserEvent::PasswordRehashed(PasswordRehashed { password_hash, .. }) => {
            let Personal::Known(hash) = password_hash else {
                return erased(&account, None);
            };
            account.password_hash = hash.clone();
        }
        UserEvent::UserErased(UserErased { at, .. }) => return erased(&account, Some(*at)),
    }
    UserAccount::Registered(account)
}

/// What can be asked of a user account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserCommand {
    Register(Register),
    Activate,
    Deactivate,
    /// A new password chosen by the user. The caller has already checked the current password
    /// (with a login-style check, so that wrong guesses count towards the lockout).
    ChangePassword {
        new_password_hash: PasswordHash,
    },
    /// The same password hashed with stronger parameters, after a successful login.
    RehashPassword {
        new_password_hash: PasswordHash,
    },
    /// End every session of the account (an administrator's decision).
    EndAllSessions,
    /// The owner confirmed a verification link. `activate_pending` says whether a pending
    /// account becomes active by it (the `verify` registration mode) or stays for an
    /// administrator (`approval`). A link asked for by registering the address again carries
    /// that registration's password, `new_password_hash`, which the account takes: whoever
    /// proves the mailbox keeps the password they chose, not a stranger's who registered first.
    VerifyEmail {
        activate_pending: bool,
        new_password_hash: Option<PasswordHash>,
    },
    /// A new password set through a reset link: the link stands for the old password.
    ResetPassword {
        new_password_hash: PasswordHash,
    },
    /// The owner confirmed the link mailed to the new address. The caller moves the email
    /// reservation in the same append.
    ChangeEmail {
        new_email: Email,
    },
    /// Forget the person: `by` is the account itself (which proved its password) or an
    /// administrator. The caller releases the address in the same append, and deletes the
    /// person's key once it is written.
    Erase {
        by: UserId,
    },
}

/// Create an account. The caller chose the id (a client-chosen id makes retries safe), hashed
/// the password and reserves `email.normalized()` atomically with the `UserRegistered` event:
/// the uniqueness of emails is decided by the store, not here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Register {
    pub user_id: UserId,
    pub email: Email,
    pub password_hash: PasswordHash,
    pub roles: Vec<Role>,
    pub initial_status: InitialStatus,
}

impl From<Register> for UserCommand {
    fn from(register: Register) -> Self {
        Self::Register(register)
    }
}

/// Why a command was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the account is already registered")]
    AlreadyRegistered,
    #[error("there is no such account")]
    NotFound,
    #[error("the account is deactivated")]
    AccountInactive,
    /// See [`crate::administrators`].
    #[error("the account is the last active administrator")]
    LastAdministrator,
    /// The account's person was erased: nothing can be done with it any more.
    #[error("the account was erased")]
    Erased,
}

/// Decides a command against the account's current state; `now` stamps the new events.
pub fn decide(
    state: &UserAccount,
    command: UserCommand,
    now: DateTime<Utc>,
) -> Result<Vec<UserEvent>, Refusal> {
    let account = match state {
        UserAccount::NotRegistered => {
            return match command {
                UserCommand::Register(register) => Ok(vec![register_account(register, now)]),
                _ => Err(Refusal::NotFound),
            };
        }
        UserAccount::Registered(account) => account,
        UserAccount::Erased(_) => {
            return Err(match command {
                // Its id stays taken: a new account never reuses an erased one's history.
                UserCommand::Register(_) => Refusal::AlreadyRegistered,
                _ => Refusal::Erased,
            });
        }
    };
    let status = account.status;
    match command {
        UserCommand::Register(_) => Err(Refusal::AlreadyRegistered),
        // Repeating an operator's click is harmless: already there, nothing to record.
        UserCommand::Activate if status == AccountStatus::Active => Ok(vec![]),
        UserCommand::Activate => Ok(vec![UserActivated { at: now }.into()]),
        UserCommand::Deactivate if status == AccountStatus::Deactivated => Ok(vec![]),
        UserCommand::Deactivate => Ok(vec![UserDeactivated { at: now }.into()]),
        UserCommand::ChangePassword { .. } if status == AccountStatus::Deactivated => {
            Err(Refusal::AccountInactive)
        }
        UserCommand::ChangePassword { new_password_hash } => Ok(vec![
            PasswordChanged {
                password_hash: new_password_hash.into(),
                at: now,
            }
            .into(),
        ]),
        // No status rule: a rehash follows a login that was just granted, and if an operator
        // deactivated the account in between, a stronger hash of the same password does no harm.
        UserCommand::RehashPassword { new_password_hash } => Ok(vec![
            PasswordRehashed {
                password_hash: new_password_hash.into(),
                at: now,
            }
            .into(),
        ]),
        // Recorded even when no session is live: the command side keeps no list of sessions,
        // and one event more in a rare administrator's action costs nothing.
        UserCommand::EndAllSessions => Ok(vec![SessionsEnded { at: now }.into()]),
        UserCommand::VerifyEmail {
            activate_pending,
            new_password_hash,
        } => {
            let mut events = Vec::new();
            if !account.email_verified {
                events.push(EmailVerified { at: now }.into());
            }
            if let Some(password_hash) = new_password_hash {
                events.push(
                    PasswordReset {
                        password_hash: password_hash.into(),
                        at: now,
                    }
                    .into(),
                );
            }
            if activate_pending && status == AccountStatus::Pending {
                events.push(UserActivated { at: now }.into());
            }
            Ok(events)
        }
        // A reset or a change of email is offered to active accounts only (the mail is sent to
        // no other), and a link made before a deactivation must not work after it.
        UserCommand::ResetPassword { .. } | UserCommand::ChangeEmail { .. }
            if status != AccountStatus::Active =>
        {
            Err(Refusal::AccountInactive)
        }
        UserCommand::ResetPassword { new_password_hash } => Ok(vec![
            PasswordReset {
                password_hash: new_password_hash.into(),
                at: now,
            }
            .into(),
        ]),
        UserCommand::ChangeEmail { new_email } => Ok(vec![
            EmailChanged {
                email_normalized: new_email.normalized().to_owned().into(),
                email: new_email.into(),
                at: now,
            }
            .into(),
        ]),
        // Whatever its status: a person may ask to be forgotten whether or not an operator
        // deactivated them. The last administrator is the caller's rule, as for a deactivation.
        UserCommand::Erase { by } => Ok(vec![
            UserErased {
                erased_by: by,
                at: now,
            }
            .into(),
        ]),
    }
}

fn register_account(register: Register, now: DateTime<Utc>) -> UserEvent {
    let Register {
        user_id,
        email,
        password_hash,
        mut roles,
        initial_status,
    } = register;
    roles.sort();
    roles.dedup();
    UserRegistered {
        user_id,
        email_normalized: email.normalized().to_owned().into(),
        email: email.into(),
        password_hash: password_hash.into(),
        status: initial_status.into(),
        roles,
        registered_at: now,
    }
    .into()
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;

    use super::*;
    use crate::given::{deactivated, given, hash, registered, registration, t0, user};

    fn change_password(hash_name: &str) -> UserCommand {
        UserCommand::ChangePassword {
            new_password_hash: hash(hash_name),
        }
    }

    #[test]
    fn registering_a_new_account_records_who_it_is_and_its_email_key() {
        given([])
            .when(
                Register {
                    email: Email::parse("Ann@Example.com").unwrap(),
                    ..registration(InitialStatus::Active)
                }
                .into(),
                t0(),
            )
            .then([UserRegistered {
                user_id: user(),
                email: Email::parse("Ann@Example.com").unwrap().into(),
                email_normalized: "ann@example.com".into(),
                password_hash: hash("first").into(),
                status: AccountStatus::Active,
                roles: vec![Role::User],
                registered_at: t0(),
            }
            .into()]);
    }

    #[test]
    fn registering_an_account_that_already_exists_is_refused() {
        given([registered(AccountStatus::Pending)])
            .when(
                Register {
                    email: Email::parse("other@example.com").unwrap(),
                    password_hash: hash("other"),
                    ..registration(InitialStatus::Pending)
                }
                .into(),
                t0(),
            )
            .then_refused(Refusal::AlreadyRegistered);
    }

    #[test]
    fn roles_given_twice_are_recorded_once() {
        let events = decide(
            &UserAccount::NotRegistered,
            Register {
                roles: vec![Role::Admin, Role::User, Role::Admin],
                ..registration(InitialStatus::Active)
            }
            .into(),
            t0(),
        )
        .unwrap();
        let UserAccount::Registered(account) = UserAccount::fold(&events) else {
            panic!("not registered: {events:?}");
        };
        assert_eq!(account.roles, vec![Role::User, Role::Admin]);
    }

    #[test]
    fn every_command_on_an_account_that_does_not_exist_is_refused_as_not_found() {
        for command in [
            UserCommand::Activate,
            UserCommand::Deactivate,
            change_password("new"),
            UserCommand::RehashPassword {
                new_password_hash: hash("new"),
            },
        ] {
            given([])
                .when(command, t0())
                .then_refused(Refusal::NotFound);
        }
    }

    #[test]
    fn activating_a_pending_account_records_its_activation() {
        let later = t0() + TimeDelta::hours(1);
        given([registered(AccountStatus::Pending)])
            .when(UserCommand::Activate, later)
            .then([UserActivated { at: later }.into()]);
    }

    #[test]
    fn activating_an_active_account_changes_nothing() {
        given([registered(AccountStatus::Active)])
            .when(UserCommand::Activate, t0())
            .then([]);
    }

    #[test]
    fn deactivating_an_active_account_records_its_deactivation() {
        given([registered(AccountStatus::Active)])
            .when(UserCommand::Deactivate, t0())
            .then([UserDeactivated { at: t0() }.into()]);
    }

    #[test]
    fn a_pending_account_can_be_deactivated() {
        given([registered(AccountStatus::Pending)])
            .when(UserCommand::Deactivate, t0())
            .then([UserDeactivated { at: t0() }.into()]);
    }

    #[test]
    fn deactivating_a_deactivated_account_changes_nothing() {
        given(deactivated())
            .when(UserCommand::Deactivate, t0())
            .then([]);
    }

    #[test]
    fn a_deactivated_account_can_be_activated_again() {
        given(deactivated())
            .when(UserCommand::Activate, t0())
            .then([UserActivated { at: t0() }.into()]);
    }

    #[test]
    fn changing_the_password_records_the_new_hash() {
        given([registered(AccountStatus::Active)])
            .when(change_password("second"), t0())
            .then([PasswordChanged {
                password_hash: hash("second").into(),
                at: t0(),
            }
            .into()]);
    }

    #[test]
    fn changing_the_password_of_a_deactivated_account_is_refused() {
        given(deactivated())
            .when(change_password("second"), t0())
            .then_refused(Refusal::AccountInactive);
    }

    #[test]
    fn rehashing_the_password_records_the_stronger_hash() {
        given([registered(AccountStatus::Active)])
            .when(
                UserCommand::RehashPassword {
                    new_password_hash: hash("stronger"),
                },
                t0(),
            )
            .then([PasswordRehashed {
                password_hash: hash("stronger").into(),
                at: t0(),
            }
            .into()]);
    }

    #[test]
    fn folding_a_history_gives_the_account_as_its_last_events_left_it() {
        let history = [
            registered(AccountStatus::Pending),
            UserActivated { at: t0() }.into(),
            PasswordChanged {
                password_hash: hash("second").into(),
                at: t0(),
            }
            .into(),
            PasswordRehashed {
                password_hash: hash("third").into(),
                at: t0(),
            }
            .into(),
            UserDeactivated { at: t0() }.into(),
        ];
        let account = UserAccount::fold(&history);
        let account = account.account().unwrap();
        assert_eq!(account.status, AccountStatus::Deactivated);
        assert_eq!(account.password_hash, hash("third"));
        assert_eq!(account.email_normalized, "ann@example.com");
        assert!(!account.is_active());
        assert!(account.has_role(Role::User));
    }

    #[test]
    fn a_changed_password_counts_as_a_new_one_and_a_rehashed_password_does_not() {
        let rehashed = PasswordRehashed {
            password_hash: hash("stronger").into(),
            at: t0(),
        };
        let changed = PasswordChanged {
            password_hash: hash("second").into(),
            at: t0(),
        };
        let changes = |history: Vec<UserEvent>| {
            UserAccount::fold(&history)
                .account()
                .map(|account| account.password_changes)
        };
        let start = registered(AccountStatus::Active);
        assert_eq!(changes(vec![start.clone()]), Some(0));
        assert_eq!(
            changes(vec![start.clone(), rehashed.clone().into()]),
            Some(0)
        );
        assert_eq!(
            changes(vec![start.clone(), changed.clone().into()]),
            Some(1)
        );
        assert_eq!(
            changes(vec![
                start,
                rehashed.into(),
                changed.clone().into(),
                changed.into()
            ]),
            Some(2)
        );
    }

    #[test]
    fn a_deactivation_a_password_change_and_an_end_of_all_sessions_each_move_the_session_epoch() {
        let epoch = |history: Vec<UserEvent>| {
            UserAccount::fold(&history)
                .account()
                .map(|account| account.session_epoch)
        };
        let start = registered(AccountStatus::Active);
        assert_eq!(epoch(vec![start.clone()]), Some(0));
        let rehashed = PasswordRehashed {
            password_hash: hash("stronger").into(),
            at: t0(),
        };
        assert_eq!(
            epoch(vec![
                start.clone(),
                rehashed.into(),
                UserActivated { at: t0() }.into()
            ]),
            Some(0)
        );
        let changed = PasswordChanged {
            password_hash: hash("second").into(),
            at: t0(),
        };
        assert_eq!(
            epoch(vec![
                start,
                UserDeactivated { at: t0() }.into(),
                UserActivated { at: t0() }.into(),
                changed.into(),
                SessionsEnded { at: t0() }.into(),
            ]),
            Some(3)
        );
    }

    #[test]
    fn ending_all_sessions_is_recorded_whatever_the_status_and_refused_for_no_account() {
        for status in [AccountStatus::Active, AccountStatus::Deactivated] {
            given([registered(status)])
                .when(UserCommand::EndAllSessions, t0())
                .then([SessionsEnded { at: t0() }.into()]);
        }
        given([])
            .when(UserCommand::EndAllSessions, t0())
            .then_refused(Refusal::NotFound);
    }

    #[test]
    fn folding_only_the_earlier_events_gives_the_account_as_it_stood_then() {
        let history = [
            registered(AccountStatus::Pending),
            UserActivated { at: t0() }.into(),
        ];
        let then = UserAccount::fold(&history[..1]);
        assert_eq!(then.account().unwrap().status, AccountStatus::Pending);
    }

    #[test]
    fn events_that_cannot_apply_leave_the_state_unchanged() {
        let before_registration = UserAccount::fold(&[UserActivated { at: t0() }.into()]);
        assert_eq!(before_registration, UserAccount::NotRegistered);

        let once = UserAccount::fold(&[registered(AccountStatus::Pending)]);
        let twice = evolve(once.clone(), &registered(AccountStatus::Active));
        assert_eq!(twice, once);
    }

    fn verify(activate_pending: bool) -> UserCommand {
        UserCommand::VerifyEmail {
            activate_pending,
            new_password_hash: None,
        }
    }

    fn ann_new() -> Email {
        Email::parse("Ann@Example.org").unwrap()
    }

    #[test]
    fn a_verification_records_the_address_verified_once() {
        given([registered(AccountStatus::Active)])
            .when(verify(true), t0())
            .then([EmailVerified { at: t0() }.into()]);
        given([
            registered(AccountStatus::Active),
            EmailVerified { at: t0() }.into(),
        ])
        .when(verify(true), t0())
        .then([]);
    }

    #[test]
    fn a_verification_activates_a_pending_account_only_when_the_mode_says_so() {
        given([registered(AccountStatus::Pending)])
            .when(verify(true), t0())
            .then([
                EmailVerified { at: t0() }.into(),
                UserActivated { at: t0() }.into(),
            ]);
        given([registered(AccountStatus::Pending)])
            .when(verify(false), t0())
            .then([EmailVerified { at: t0() }.into()]);
        // A deactivation is an operator's decision: proving the address does not undo it.
        given(deactivated())
            .when(verify(true), t0())
            .then([EmailVerified { at: t0() }.into()]);
    }

    #[test]
    fn a_reset_sets_the_password_and_ends_every_session_like_a_change() {
        let history = [registered(AccountStatus::Active)];
        given(history.clone())
            .when(
                UserCommand::ResetPassword {
                    new_password_hash: hash("reset"),
                },
                t0(),
            )
            .then([PasswordReset {
                password_hash: hash("reset").into(),
                at: t0(),
            }
            .into()]);
        let before = UserAccount::fold(&history);
        let after = evolve(
            before.clone(),
            &PasswordReset {
                password_hash: hash("reset").into(),
                at: t0(),
            }
            .into(),
        );
        let (before, after) = (before.account().unwrap(), after.account().unwrap());
        assert_eq!(after.password_hash, hash("reset"));
        assert_eq!(after.session_epoch, before.session_epoch + 1);
        assert_eq!(after.password_changes, before.password_changes + 1);
    }

    #[test]
    fn a_change_of_email_moves_the_account_to_a_verified_new_address() {
        let changed = EmailChanged {
            email: ann_new().into(),
            email_normalized: "ann@example.org".into(),
            at: t0(),
        };
        given([registered(AccountStatus::Active)])
            .when(
                UserCommand::ChangeEmail {
                    new_email: ann_new(),
                },
                t0(),
            )
            .then([changed.clone().into()]);
        let account = UserAccount::fold(&[registered(AccountStatus::Active), changed.into()]);
        let account = account.account().unwrap();
        assert_eq!(account.email, ann_new());
        assert_eq!(account.email_normalized, "ann@example.org");
        assert!(account.email_verified);
    }

    #[test]
    fn neither_a_reset_nor_a_change_of_email_is_taken_for_an_account_that_is_not_active() {
        for history in [
            vec![registered(AccountStatus::Pending)],
            deactivated().to_vec(),
        ] {
            for command in [
                UserCommand::ResetPassword {
                    new_password_hash: hash("reset"),
                },
                UserCommand::ChangeEmail {
                    new_email: ann_new(),
                },
            ] {
                given(history.clone())
                    .when(command, t0())
                    .then_refused(Refusal::AccountInactive);
            }
        }
    }

    #[test]
    fn a_verification_asked_for_by_registering_again_sets_that_registrations_password() {
        given([registered(AccountStatus::Pending)])
            .when(
                UserCommand::VerifyEmail {
                    activate_pending: true,
                    new_password_hash: Some(hash("second")),
                },
                t0(),
            )
            .then([
                EmailVerified { at: t0() }.into(),
                PasswordReset {
                    password_hash: hash("second").into(),
                    at: t0(),
                }
                .into(),
                UserActivated { at: t0() }.into(),
            ]);
    }

    fn erased_by_owner() -> UserEvent {
        UserErased {
            erased_by: user(),
            at: t0() + TimeDelta::hours(2),
        }
        .into()
    }

    #[test]
    fn erasing_an_account_records_who_asked_whatever_its_status() {
        let admin = UserId::from_uuid(uuid::Uuid::from_u128(77));
        for history in [
            vec![registered(AccountStatus::Active)],
            vec![registered(AccountStatus::Pending)],
            deactivated().to_vec(),
        ] {
            given(history)
                .when(UserCommand::Erase { by: admin }, t0())
                .then([UserErased {
                    erased_by: admin,
                    at: t0(),
                }
                .into()]);
        }
    }

    #[test]
    fn an_erased_account_keeps_when_it_was_registered_and_erased_and_nothing_of_who() {
        let state = UserAccount::fold(&[registered(AccountStatus::Active), erased_by_owner()]);
        assert_eq!(
            state,
            UserAccount::Erased(ErasedAccount {
                id: user(),
                registered_at: t0(),
                erased_at: Some(t0() + TimeDelta::hours(2)),
            })
        );
        assert_eq!(state.account(), None);
    }

    #[test]
    fn every_command_on_an_erased_account_is_refused_and_registering_its_id_again_too() {
        for command in [
            UserCommand::Activate,
            UserCommand::Deactivate,
            change_password("new"),
            UserCommand::EndAllSessions,
            UserCommand::ResetPassword {
                new_password_hash: hash("new"),
            },
            UserCommand::Erase { by: user() },
        ] {
            given([registered(AccountStatus::Active), erased_by_owner()])
                .when(command, t0())
                .then_refused(Refusal::Erased);
        }
        given([registered(AccountStatus::Active), erased_by_owner()])
            .when(registration(InitialStatus::Active).into(), t0())
            .then_refused(Refusal::AlreadyRegistered);
    }

    #[test]
    fn an_account_whose_personal_data_is_gone_is_erased_even_before_its_erasure_is_read() {
        // A reader that read the stream just before the erasure, and the key just after it.
        let UserEvent::UserRegistered(mut unreadable) = registered(AccountStatus::Active) else {
            unreachable!()
        };
        unreadable.email = Personal::Erased;
        unreadable.email_normalized = Personal::Erased;
        unreadable.password_hash = Personal::Erased;
        let state = UserAccount::fold(&[unreadable.into()]);
        assert!(state.is_erased());
        given([
            registered(AccountStatus::Active),
            PasswordChanged {
                password_hash: Personal::Erased,
                at: t0(),
            }
            .into(),
        ])
        .when(UserCommand::Activate, t0())
        .then_refused(Refusal::Erased);
        // Its erasure, read later, adds when.
        let later = evolve(state, &erased_by_owner());
        assert!(matches!(
            later,
            UserAccount::Erased(ErasedAccount {
                erased_at: Some(_),
                ..
            })
        ));
    }
}
