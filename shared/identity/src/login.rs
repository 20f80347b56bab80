//! Deciding a login: the password check's outcome, the account's status and the lockout.
//!
//! A login decision reads only the account and the LAST login event, never the login history,
//! so it costs the same after 10,000 logins as after none: every login event carries the state
//! that results from it.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::account::UserAccount;
use crate::events::{LockoutLifted, LoginEvent, LoginFailed, LoginSucceeded};
use crate::time::add_saturating;

/// When repeated wrong passwords lock an account, and for how long.
///
/// The lock is per account, not per IP address, so spreading guesses over many addresses does
/// not help an attacker. The price is that anyone can keep a known account locked; the growing
/// lockout stays short enough (15 minutes at most by default) that this is a nuisance rather
/// than a takeover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockoutPolicy {
    /// Wrong passwords in a row that lock the account.
    pub max_failures: u32,
    /// The first lock's length.
    pub base_lockout: Duration,
    /// No lock is longer than this.
    pub max_lockout: Duration,
}

impl Default for LockoutPolicy {
    fn default() -> Self {
        Self {
            max_failures: 5,
            base_lockout: Duration::from_secs(30),
            max_lockout: Duration::from_secs(15 * 60),
        }
    }
}

impl LockoutPolicy {
    /// How long the account is locked after this many wrong passwords in a row: nothing before
    /// `max_failures`, then `base_lockout`, doubled by each further failure, capped at
    /// `max_lockout`.
    pub fn lockout_after(&self, failed_in_a_row: u32) -> Option<Duration> {
        let doublings = failed_in_a_row.checked_sub(self.max_failures)?;
        let lockout = 2u32
            .checked_pow(doublings)
            .and_then(|factor| self.base_lockout.checked_mul(factor))
            .unwrap_or(self.max_lockout);
        Some(lockout.min(self.max_lockout))
    }
}

/// The login state of an account, as its last login event left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoginState {
    login_count: u64,
    failed_in_a_row: u32,
    locked_until: Option<DateTime<Utc>>,
}

impl LoginState {
    /// The state after the last event of a login stream (`None`: never tried to log in).
    pub fn from_last(last: Option<&LoginEvent>) -> Self {
        match last {
            None => Self::default(),
            Some(LoginEvent::LoginSucceeded(succeeded)) => Self {
                login_count: succeeded.login_count,
                failed_in_a_row: 0,
                locked_until: None,
            },
            Some(LoginEvent::LoginFailed(failed)) => Self {
                login_count: failed.login_count,
                failed_in_a_row: failed.failed_in_a_row,
                locked_until: failed.locked_until,
            },
            Some(LoginEvent::LockoutLifted(lifted)) => Self {
                login_count: lifted.login_count,
                failed_in_a_row: 0,
                locked_until: None,
            },
        }
    }

    /// The event that forgets the failures and lifts any lockout, after a password reset; `None`
    /// when there is nothing to lift.
    pub fn lift_lockout(&self, now: DateTime<Utc>) -> Option<LockoutLifted> {
        (self.failed_in_a_row > 0 || self.locked_until.is_some()).then_some(LockoutLifted {
            at: now,
            login_count: self.login_count,
        })
    }

    pub fn login_count(&self) -> u64 {
        self.login_count
    }

    pub fn failed_in_a_row(&self) -> u32 {
        self.failed_in_a_row
    }

    /// Until when the account is locked, if it still is at `now`: the `Retry-After`.
    pub fn locked_until(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.locked_until.filter(|until| *until > now)
    }
}

/// The outcome of a login attempt, with the event to append to the login stream, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginDecision {
    Granted {
        event: LoginEvent,
    },
    /// `event` is `None` when the attempt must leave no trace: an attacker hammering a locked
    /// or inactive account must not make its stream grow.
    Refused {
        reason: LoginRefusal,
        event: Option<LoginEvent>,
    },
}

impl LoginDecision {
    pub fn is_granted(&self) -> bool {
        matches!(self, Self::Granted { .. })
    }

    /// The event to append, if any.
    pub fn event(&self) -> Option<&LoginEvent> {
        match self {
            Self::Granted { event } => Some(event),
            Self::Refused { event, .. } => event.as_ref(),
        }
    }

    pub fn into_event(self) -> Option<LoginEvent> {
        match self {
            Self::Granted { event } => Some(event),
            Self::Refused { event, .. } => event,
        }
    }
}

/// Why a login was refused. For the log and the metrics only: the client gets one answer for
/// all of them, so that it cannot learn which accounts exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LoginRefusal {
    #[error("no account has this email")]
    UnknownAccount,
    #[error("wrong password")]
    WrongPassword,
    #[error("the account is not active")]
    NotActive,
    #[error("the account is locked until {until}")]
    Locked { until: DateTime<Utc> },
}

/// Decides a login attempt.
///
/// `password_matches` is the hasher's verdict; the caller must pay the same hashing work for an
/// unknown account (against a dummy hash) so that the time taken does not reveal which emails
/// are registered. The checks, in order: the account exists, it is active, it is not locked,
/// and only then the password counts.
pub fn decide_login(
    account: &UserAccount,
    state: &LoginState,
    password_matches: bool,
    now: DateTime<Utc>,
    policy: &LockoutPolicy,
) -> LoginDecision {
    let refused = |reason| LoginDecision::Refused {
        reason,
        event: None,
    };
    let Some(account) = account.account() else {
        return refused(LoginRefusal::UnknownAccount);
    };
    if !account.is_active() {
        return refused(LoginRefusal::NotActive);
    }
    if let Some(until) = state.locked_until(now) {
        return refused(LoginRefusal::Locked { until });
    }
    if password_matches {
        return LoginDecision::Granted {
            event: LoginSucceeded {
                at: now,
                login_count: state.login_count.saturating_add(1),
            }
            .into(),
        };
    }
    let failed_in_a_row = state.failed_in_a_row.saturating_add(1);
    let locked_until = policy
        .lockout_after(failed_in_a_row)
        .map(|lockout| add_saturating(now, lockout));
    LoginDecision::Refused {
        reason: LoginRefusal::WrongPassword,
        event: Some(
            LoginFailed {
                at: now,
                failed_in_a_row,
                locked_until,
                login_count: state.login_count,
            }
            .into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;

    use super::*;
    use crate::given::{registered, t0};
    use crate::values::AccountStatus;

    fn account(status: AccountStatus) -> UserAccount {
        UserAccount::fold(&[registered(status)])
    }

    /// The decision on an attempt with no login before it, under the default policy.
    fn first_attempt(account: &UserAccount, password_matches: bool) -> LoginDecision {
        decide_login(
            account,
            &LoginState::default(),
            password_matches,
            t0(),
            &LockoutPolicy::default(),
        )
    }

    /// A refusal that records no login event.
    fn refused_without_a_trace(reason: LoginRefusal) -> LoginDecision {
        LoginDecision::Refused {
            reason,
            event: None,
        }
    }

    fn secs(n: i64) -> TimeDelta {
        TimeDelta::seconds(n)
    }

    /// Plays attempts against an active account, feeding each decision's event (if any) back as
    /// the last login event, as the command API does. Returns every decision.
    fn play(attempts: &[(bool, DateTime<Utc>)]) -> Vec<LoginDecision> {
        let account = account(AccountStatus::Active);
        let policy = LockoutPolicy::default();
        let mut last: Option<LoginEvent> = None;
        attempts
            .iter()
            .map(|&(password_matches, now)| {
                let state = LoginState::from_last(last.as_ref());
                let decision = decide_login(&account, &state, password_matches, now, &policy);
                if let Some(event) = decision.event() {
                    last = Some(event.clone());
                }
                decision
            })
            .collect()
    }

    /// Plays five wrong passwords at `t0()`, which lock the account until `t0() + 30 s` under
    /// the default policy, then `attempts` (see [`play`]). Returns every decision, the lock's
    /// five first.
    fn play_after_a_lock(attempts: &[(bool, DateTime<Utc>)]) -> Vec<LoginDecision> {
        let mut all = vec![(false, t0()); 5];
        all.extend_from_slice(attempts);
        play(&all)
    }

    fn failed(
        at: DateTime<Utc>,
        failed_in_a_row: u32,
        locked_until: Option<DateTime<Utc>>,
    ) -> LoginEvent {
        LoginFailed {
            at,
            failed_in_a_row,
            locked_until,
            login_count: 0,
        }
        .into()
    }

    #[test]
    fn login_with_the_right_password_is_granted_and_counted() {
        let decisions = play(&[(true, t0()), (true, t0() + secs(1))]);
        assert_eq!(
            decisions[1],
            LoginDecision::Granted {
                event: LoginSucceeded {
                    at: t0() + secs(1),
                    login_count: 2
                }
                .into()
            }
        );
    }

    #[test]
    fn login_with_a_wrong_password_is_rejected_and_recorded() {
        let decisions = play(&[(false, t0())]);
        assert_eq!(
            decisions[0],
            LoginDecision::Refused {
                reason: LoginRefusal::WrongPassword,
                event: Some(failed(t0(), 1, None)),
            }
        );
    }

    #[test]
    fn login_to_an_unknown_account_is_rejected_without_a_trace() {
        assert_eq!(
            first_attempt(&UserAccount::NotRegistered, true),
            refused_without_a_trace(LoginRefusal::UnknownAccount)
        );
    }

    #[test]
    fn login_to_a_pending_or_deactivated_account_is_rejected_without_a_trace() {
        for status in [AccountStatus::Pending, AccountStatus::Deactivated] {
            for password_matches in [true, false] {
                assert_eq!(
                    first_attempt(&account(status), password_matches),
                    refused_without_a_trace(LoginRefusal::NotActive),
                    "{status:?}"
                );
            }
        }
    }

    #[test]
    fn five_wrong_passwords_in_a_row_lock_the_account_for_thirty_seconds() {
        let attempts: Vec<_> = (0..5).map(|i| (false, t0() + secs(i))).collect();
        let decisions = play(&attempts);
        assert_eq!(decisions[3].event(), Some(&failed(t0() + secs(3), 4, None)));
        assert_eq!(
            decisions[4].event(),
            Some(&failed(t0() + secs(4), 5, Some(t0() + secs(34))))
        );
    }

    #[test]
    fn a_locked_account_refuses_even_the_right_password_and_records_nothing() {
        let decisions = play_after_a_lock(&[(true, t0() + secs(29)), (false, t0() + secs(29))]);
        for decision in &decisions[5..] {
            assert_eq!(
                decision,
                &refused_without_a_trace(LoginRefusal::Locked {
                    until: t0() + secs(30)
                })
            );
        }
    }

    #[test]
    fn each_failure_after_a_lock_expires_doubles_the_lockout() {
        let decisions = play_after_a_lock(&[
            (false, t0() + secs(30)), // the 30 s lock has just expired
            (false, t0() + secs(90)), // and the 60 s one
        ]);
        assert_eq!(
            decisions[5].event(),
            Some(&failed(t0() + secs(30), 6, Some(t0() + secs(90))))
        );
        assert_eq!(
            decisions[6].event(),
            Some(&failed(t0() + secs(90), 7, Some(t0() + secs(210))))
        );
    }

    #[test]
    fn the_lockout_never_exceeds_its_maximum() {
        let policy = LockoutPolicy::default();
        assert_eq!(policy.lockout_after(4), None);
        assert_eq!(policy.lockout_after(5), Some(Duration::from_secs(30)));
        assert_eq!(policy.lockout_after(9), Some(Duration::from_secs(480)));
        assert_eq!(policy.lockout_after(10), Some(Duration::from_secs(900)));
        assert_eq!(
            policy.lockout_after(u32::MAX),
            Some(Duration::from_secs(900))
        );
    }

    #[test]
    fn a_successful_login_after_a_lock_expires_clears_the_failures() {
        let decisions = play_after_a_lock(&[(true, t0() + secs(30)), (false, t0() + secs(31))]);
        assert!(decisions[5].is_granted());
        assert_eq!(
            decisions[6].event(),
            Some(
                &LoginFailed {
                    at: t0() + secs(31),
                    failed_in_a_row: 1,
                    locked_until: None,
                    login_count: 1,
                }
                .into()
            )
        );
    }

    #[test]
    fn failures_keep_the_login_count_of_earlier_successes() {
        let decisions = play(&[(true, t0()), (false, t0()), (true, t0())]);
        let LoginEvent::LoginFailed(failure) = decisions[1].event().unwrap() else {
            panic!("not a failure: {:?}", decisions[1]);
        };
        assert_eq!(failure.login_count, 1);
        assert_eq!(
            decisions[2].event(),
            Some(
                &LoginSucceeded {
                    at: t0(),
                    login_count: 2
                }
                .into()
            )
        );
    }

    #[test]
    fn the_lock_is_reported_only_while_it_lasts() {
        let state = LoginState::from_last(Some(&failed(t0(), 5, Some(t0() + secs(30)))));
        assert_eq!(state.locked_until(t0() + secs(29)), Some(t0() + secs(30)));
        assert_eq!(state.locked_until(t0() + secs(30)), None);
        assert_eq!(LoginState::default().locked_until(t0()), None);
    }

    #[test]
    fn a_state_needs_only_the_last_login_event() {
        let state = LoginState::from_last(Some(
            &LoginSucceeded {
                at: t0(),
                login_count: 10_000,
            }
            .into(),
        ));
        assert_eq!(state.login_count(), 10_000);
        assert_eq!(state.failed_in_a_row(), 0);
        assert_eq!(state.locked_until(t0()), None);
    }

    #[test]
    fn a_reset_lifts_a_lockout_and_forgets_the_failures_but_not_the_logins() {
        let locked = LoginState::from_last(Some(&failed(t0(), 5, Some(t0() + secs(30)))));
        let lifted = locked.lift_lockout(t0() + secs(1)).unwrap();
        let after = LoginState::from_last(Some(&lifted.clone().into()));
        assert_eq!(after.locked_until(t0() + secs(1)), None);
        assert_eq!(after.failed_in_a_row(), 0);
        assert_eq!(after.login_count(), locked.login_count());

        let failed_once = LoginState::from_last(Some(&failed(t0(), 1, None)));
        assert!(failed_once.lift_lockout(t0()).is_some());
        let clean = LoginState::from_last(Some(&lifted.into()));
        assert_eq!(clean.lift_lockout(t0()), None);
        assert_eq!(LoginState::default().lift_lockout(t0()), None);
    }
}
