//! Who can administer the service: the set of active administrators, and the rule that it never
//! becomes empty.
//!
//! Whether one account is an active administrator is in its own stream, but "at least one stays"
//! is a rule over every account, and many streams cannot be decided on atomically. So every
//! change of who is an active administrator is also recorded in one stream of its own
//! ([`crate::ADMINISTRATORS_STREAM`]), each message carrying the whole set after the change
//! ([`AdministratorsChanged`]), appended with the exact version the decision read, in the same
//! atomic append as the account's own events. Of two administrators deactivating each other at
//! once only one append can succeed; the other reads the new set and is refused
//! ([`Refusal::LastAdministrator`]).
//!
//! The decision on the account comes first ([`crate::decide`]); [`change_of`] says whether its
//! events change the set, and only then is the set read and [`decide_administrators`] asked.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};

use crate::account::{Refusal, UserAccount, evolve};
use crate::events::{AdministratorsChanged, AdministratorsEvent, UserEvent};
use crate::values::{Role, UserId};

/// The set of active administrators.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Administrators {
    active: BTreeSet<UserId>,
}

impl Administrators {
    /// The set after the stream's last event: each event carries the whole set.
    pub fn from_last(last: &AdministratorsEvent) -> Self {
        match last {
            AdministratorsEvent::AdministratorsChanged(changed) => Self {
                active: changed.active.iter().copied().collect(),
            },
        }
    }

    pub fn contains(&self, id: UserId) -> bool {
        self.active.contains(&id)
    }
}

/// How an account's events change its standing as an active administrator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdministratorChange {
    /// It becomes an active administrator: registered as one, or activated again.
    Joins(UserId),
    /// It stops being one: deactivated.
    Leaves(UserId),
}

/// Whether `events`, decided on `before`, change who is an active administrator. Looks only at
/// the account's state before and after, so every command that could change it (a role given
/// later, say) is covered without a rule of its own.
pub fn change_of(before: &UserAccount, events: &[UserEvent]) -> Option<AdministratorChange> {
    let after = events.iter().fold(before.clone(), evolve);
    let was = is_active_administrator(before);
    match (was, is_active_administrator(&after)) {
        (None, Some(id)) => Some(AdministratorChange::Joins(id)),
        (Some(id), None) => Some(AdministratorChange::Leaves(id)),
        _ => None,
    }
}

/// Decides a change of the set: the last active administrator cannot leave. Anything else is
/// recorded, even a change that leaves the set as it was, so that the append claims the
/// stream's version and a racing change has to decide again.
pub fn decide_administrators(
    administrators: &Administrators,
    change: AdministratorChange,
    now: DateTime<Utc>,
) -> Result<AdministratorsEvent, Refusal> {
    let mut active = administrators.active.clone();
    match change {
        AdministratorChange::Joins(id) => {
            active.insert(id);
        }
        AdministratorChange::Leaves(id) => {
            active.remove(&id);
            if active.is_empty() {
                return Err(Refusal::LastAdministrator);
            }
        }
    }
    Ok(AdministratorsChanged {
        active: active.into_iter().collect(),
        at: now,
    }
    .into())
}

/// The set folded from every user stream: for a store written before the administrators'
/// stream existed, whose first change has to start from what the accounts say.
///
/// Feed it every user event, each stream's in order (streams may interleave, as in the global
/// order). It keeps only the accounts registered as administrators, so a store of millions of
/// users costs memory for its administrators only.
#[derive(Debug, Default)]
pub struct AdministratorsFromAccounts {
    accounts: HashMap<UserId, UserAccount>,
}

impl AdministratorsFromAccounts {
    pub fn apply(&mut self, user: UserId, event: &UserEvent) {
        match event {
            // Roles are given at registration only: an account registered without the admin
            // role never becomes an administrator. (A later event that gives a role must be
            // followed here too.)
            UserEvent::UserRegistered(registered) => {
                if registered.roles.contains(&Role::Admin) {
                    self.accounts
                        .insert(user, evolve(UserAccount::NotRegistered, event));
                }
            }
            UserEvent::UserActivated(_)
            | UserEvent::UserDeactivated(_)
            | UserEvent::PasswordChanged(_)
            | UserEvent::PasswordRehashed(_)
            | UserEvent::SessionsEnded(_)
            | UserEvent::EmailVerified(_)
            | UserEvent::PasswordReset(_)
            | UserEvent::EmailChanged(_)
            | UserEvent::UserErased(_) => {
                if let Some(account) = self.accounts.get_mut(&user) {
                    *account = evolve(std::mem::take(account), event);
                }
            }
        }
    }

    pub fn finish(self) -> Administrators {
        Administrators {
            active: self
                .accounts
                .values()
                .filter_map(is_active_administrator)
                .collect(),
        }
    }
}

fn is_active_administrator(account: &UserAccount) -> Option<UserId> {
    account
        .account()
        .filter(|account| account.is_active() && account.has_role(Role::Admin))
        .map(|account| account.id)
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;
    use crate::account::{Register, UserCommand, decide};
    use crate::email::Email;
    use crate::events::{UserActivated, UserDeactivated, UserRegistered};
    use crate::given::{hash, registered, registration, t0, user};
    use crate::values::{AccountStatus, InitialStatus};

    fn other(n: u128) -> UserId {
        UserId::from_uuid(Uuid::from_u128(n))
    }

    fn set(ids: &[UserId]) -> Administrators {
        Administrators {
            active: ids.iter().copied().collect(),
        }
    }

    fn administrator(status: AccountStatus) -> UserEvent {
        let UserEvent::UserRegistered(mut registered) = registered(status) else {
            unreachable!()
        };
        registered.roles = vec![Role::User, Role::Admin];
        registered.into()
    }

    #[test]
    fn deactivating_an_active_administrator_makes_them_leave() {
        let before = UserAccount::fold(&[administrator(AccountStatus::Active)]);
        let events = decide(&before, UserCommand::Deactivate, t0()).unwrap();
        assert_eq!(
            change_of(&before, &events),
            Some(AdministratorChange::Leaves(user()))
        );
    }

    #[test]
    fn activating_an_administrator_again_or_registering_an_active_one_makes_them_join() {
        let deactivated = UserAccount::fold(&[
            administrator(AccountStatus::Active),
            UserDeactivated { at: t0() }.into(),
        ]);
        let events = decide(&deactivated, UserCommand::Activate, t0()).unwrap();
        assert_eq!(
            change_of(&deactivated, &events),
            Some(AdministratorChange::Joins(user()))
        );

        let register = Register {
            roles: vec![Role::Admin],
            ..registration(InitialStatus::Active)
        };
        let events = decide(&UserAccount::NotRegistered, register.into(), t0()).unwrap();
        assert_eq!(
            change_of(&UserAccount::NotRegistered, &events),
            Some(AdministratorChange::Joins(user()))
        );
    }

    #[test]
    fn users_pending_administrators_and_password_changes_change_nothing() {
        let user_account = UserAccount::fold(&[registered(AccountStatus::Active)]);
        let events = decide(&user_account, UserCommand::Deactivate, t0()).unwrap();
        assert_eq!(change_of(&user_account, &events), None);

        let pending = UserAccount::fold(&[administrator(AccountStatus::Pending)]);
        let events = decide(&pending, UserCommand::Deactivate, t0()).unwrap();
        assert_eq!(change_of(&pending, &events), None);

        let active = UserAccount::fold(&[administrator(AccountStatus::Active)]);
        let command = UserCommand::ChangePassword {
            new_password_hash: hash("second"),
        };
        let events = decide(&active, command, t0()).unwrap();
        assert_eq!(change_of(&active, &events), None);
    }

    #[test]
    fn the_last_active_administrator_cannot_leave() {
        assert_eq!(
            decide_administrators(&set(&[user()]), AdministratorChange::Leaves(user()), t0()),
            Err(Refusal::LastAdministrator)
        );
        // Nor when the set, out of step, does not even list them: nobody would be left.
        assert_eq!(
            decide_administrators(&set(&[]), AdministratorChange::Leaves(user()), t0()),
            Err(Refusal::LastAdministrator)
        );
    }

    #[test]
    fn an_administrator_may_leave_while_another_stays_and_the_set_records_who_is_left() {
        let decided = decide_administrators(
            &set(&[user(), other(1)]),
            AdministratorChange::Leaves(user()),
            t0(),
        );
        assert_eq!(
            decided,
            Ok(AdministratorsChanged {
                active: vec![other(1)],
                at: t0(),
            }
            .into())
        );
        let after = Administrators::from_last(&decided.unwrap());
        assert_eq!(after, set(&[other(1)]));
        assert!(!after.contains(user()));
    }

    #[test]
    fn joining_is_always_recorded_and_lists_each_administrator_once_in_order() {
        let decided = decide_administrators(
            &set(&[other(2)]),
            AdministratorChange::Joins(other(1)),
            t0(),
        );
        let expected = |active| Ok(AdministratorsChanged { active, at: t0() }.into());
        assert_eq!(decided, expected(vec![other(1), other(2)]));
        let again = decide_administrators(
            &set(&[other(1)]),
            AdministratorChange::Joins(other(1)),
            t0(),
        );
        assert_eq!(again, expected(vec![other(1)]));
    }

    #[test]
    fn the_set_folded_from_the_accounts_holds_the_active_administrators_only() {
        let registration = |id: UserId, roles: Vec<Role>, status| -> UserEvent {
            UserRegistered {
                user_id: id,
                email: Email::parse("x@example.com").unwrap().into(),
                email_normalized: "x@example.com".into(),
                password_hash: hash("first").into(),
                status,
                roles,
                registered_at: t0(),
            }
            .into()
        };
        let admin = vec![Role::User, Role::Admin];
        let mut folding = AdministratorsFromAccounts::default();
        // Interleaved streams, each in order.
        folding.apply(
            other(1),
            &registration(other(1), admin.clone(), AccountStatus::Active),
        );
        folding.apply(
            other(2),
            &registration(other(2), admin.clone(), AccountStatus::Active),
        );
        folding.apply(
            other(3),
            &registration(other(3), vec![Role::User], AccountStatus::Active),
        );
        folding.apply(
            other(4),
            &registration(other(4), admin, AccountStatus::Pending),
        );
        folding.apply(other(2), &UserDeactivated { at: t0() }.into());
        folding.apply(other(4), &UserActivated { at: t0() }.into());
        folding.apply(other(5), &UserActivated { at: t0() }.into());
        assert_eq!(folding.finish(), set(&[other(1), other(4)]));
    }
}
