//! Account recovery by email: verifying an address, resetting a forgotten password and changing
//! the email, each through a link mailed to an address (ADR 12).
//!
//! A link token is `<kind>.<account id>.<secret>`. As with refresh tokens, the secret is derived
//! outside the domain: an HMAC under the mail token key over the kind, the account id and the
//! request's [`RecoveryNonce`] (32 random bytes the caller chose, kept in the request's event).
//! The store holds nonces only, so a copy of the database cannot make a usable link. The domain
//! sees neither secrets nor keys, and makes no randomness.
//!
//! Why a stream of its own, `userRecovery-<account id>`: the user stream is read by every login
//! and must stay short, and anyone can ask for a reset of any address, as often as they like.
//! Requests, and the mails that count toward their limit, land here and never make a login
//! slower.
//!
//! Why the whole state in every event: a request and a confirmation read the stream's last
//! message only ([`RecoveryState::from_last`]), like a login or a refresh, so they cost the same
//! after a thousand requests as after none. The state is small: at most one pending request per
//! [`RecoveryKind`] and the instants of the mails of the last hour (the rate limit's window),
//! older ones pruned whenever the state is written.
//!
//! What the caller does around [`decide_recovery`]:
//! - Before a request, it chooses the nonce at random. A request over the hourly limit
//!   ([`RecoveryDecision::OverLimit`]) records nothing, and the caller answers exactly as if a
//!   mail had gone (and as it answers for an unknown address).
//! - Before a confirmation, it authenticates the link: it derives the secret again with its key
//!   from the pending request's nonce ([`RecoveryState::pending`]) and compares. A link that does
//!   not authenticate never reaches the domain. The domain then checks that the nonce is still
//!   the pending one of its kind (not used, not replaced by a newer request) and not expired.
//!   Every refusal is the same 400 to the client.
//! - After a confirmation, it appends [`RecoveryCompleted`] in the same atomic append as the
//!   effect (a new password, a verified address, the moved email reservation), each stream at
//!   the version it read (ADR 12, decision 3): a link is used once, or not at all.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

use crate::email::Email;
use crate::events::{RecoveryCompleted, RecoveryEvent, RecoveryRequested, RegistrationAttempted};
use crate::password::PasswordHash;
use crate::time::add_saturating;
use crate::values::hex_nonce;

/// What a link mail is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecoveryKind {
    /// Prove control of the account's address.
    VerifyEmail,
    /// Set a new password without the old one.
    ResetPassword,
    /// Move the account to a new address, proven by a link mailed to it.
    ChangeEmail,
}

impl RecoveryKind {
    /// Every kind, in the order of [`RecoveryState`]'s fields.
    pub const ALL: [Self; 3] = [Self::VerifyEmail, Self::ResetPassword, Self::ChangeEmail];

    /// The kind's name wherever it is written out (the same spelling as its serialized form).
    pub const fn name(self) -> &'static str {
        match self {
            Self::VerifyEmail => "verify_email",
            Self::ResetPassword => "reset_password",
            Self::ChangeEmail => "change_email",
        }
    }

    /// Every kind's name, in the order of [`Self::ALL`]: the kinds a link token may name.
    pub const NAMES: [&'static str; 3] = [
        Self::VerifyEmail.name(),
        Self::ResetPassword.name(),
        Self::ChangeEmail.name(),
    ];
}

/// How long a link lasts, and how many mails an account gets in an hour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecoveryPolicy {
    /// A link is refused from this long after its request (`mail.token_seconds`).
    pub token_lifetime: Duration,
    /// Mails recorded for an account within any hour, notices included
    /// (`mail.max_per_account_per_hour`).
    pub max_mails_per_hour: u32,
}

impl Default for RecoveryPolicy {
    fn default() -> Self {
        Self {
            token_lifetime: Duration::from_secs(30 * 60),
            max_mails_per_hour: 5,
        }
    }
}

hex_nonce! {
    /// The random input of one request's link secret: 32 bytes, stored as 64 lowercase hexadecimal
    /// digits, made as [`crate::session::RefreshNonce`] is.
    ///
    /// Not a secret on its own (the secret needs the mail token key too), so it may be stored and
    /// printed.
    RecoveryNonce, InvalidRecoveryNonce, "recovery nonce"
}

/// A request whose link has not been used yet. It may have expired meanwhile
/// ([`Self::is_expired_at`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRecovery {
    /// The link's secret is derived from it.
    pub nonce: RecoveryNonce,
    pub requested_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// For a change of email, the address the account moves to; `None` for the other kinds.
    pub new_email: Option<Email>,
    /// The account's session epoch when the link was asked for
    /// ([`crate::account::Account::session_epoch`]). A reset or a change of email is refused
    /// once the account has moved past it: a password change or reset, a deactivation, or every
    /// session ended since, each means its owner took it back, and a link mailed before must
    /// not undo that.
    #[serde(default)]
    pub account_epoch: u64,
    /// For a verification asked for by registering an address again while its account still
    /// waits for its first verification: that registration's password, set when the link is
    /// confirmed. Whoever proves the mailbox gets the password of the registration whose link
    /// they confirm, so a stranger who registered the address first keeps nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<PasswordHash>,
}

impl PendingRecovery {
    pub fn is_expired_at(&self, now: DateTime<Utc>) -> bool {
        now >= self.expires_at
    }
}

/// A recovery stream as its last event left it; every recovery event carries it whole.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RecoveryState {
    pub verify_email: Option<PendingRecovery>,
    pub reset_password: Option<PendingRecovery>,
    pub change_email: Option<PendingRecovery>,
    /// When each link mail of the last hour (at the time of the event) was recorded, oldest
    /// first: the hourly limit's window. A mail recorded at `t` counts until `t` plus one hour.
    pub recent_mails: Vec<DateTime<Utc>>,
    /// The same for notices, which have a limit of their own: otherwise anyone could spend an
    /// account's mails on notices (registering its address in `verify` mode) and leave its
    /// owner no reset link.
    #[serde(default)]
    pub recent_notices: Vec<DateTime<Utc>>,
}

impl RecoveryState {
    /// How long a recorded mail counts toward the limit.
    pub const WINDOW: TimeDelta = TimeDelta::hours(1);

    /// The state after the last event of a recovery stream (`None`: the stream is empty).
    ///
    /// An erased state holds no pending request: the links of an erased person are dead with
    /// it (and every command on the account is refused before this is asked).
    pub fn from_last(last: Option<&RecoveryEvent>) -> Self {
        last.and_then(|event| event.state().known().cloned())
            .unwrap_or_default()
    }

    /// The pending request of `kind`, if any (expired or not).
    pub fn pending(&self, kind: RecoveryKind) -> Option<&PendingRecovery> {
        match kind {
            RecoveryKind::VerifyEmail => self.verify_email.as_ref(),
            RecoveryKind::ResetPassword => self.reset_password.as_ref(),
            RecoveryKind::ChangeEmail => self.change_email.as_ref(),
        }
    }

    /// The link mails that still count toward the limit at `now`.
    pub fn mails_within_the_hour_at(&self, now: DateTime<Utc>) -> usize {
        Self::within_the_hour(&self.recent_mails, now)
    }

    fn within_the_hour(sent: &[DateTime<Utc>], now: DateTime<Utc>) -> usize {
        sent.iter().filter(|at| Self::counts_at(**at, now)).count()
    }

    fn counts_at(mail_at: DateTime<Utc>, now: DateTime<Utc>) -> bool {
        mail_at
            .checked_add_signed(Self::WINDOW)
            .is_none_or(|until| now < until)
    }

    fn is_over_limit_at(
        sent: &[DateTime<Utc>],
        now: DateTime<Utc>,
        policy: &RecoveryPolicy,
    ) -> bool {
        let limit = usize::try_from(policy.max_mails_per_hour).unwrap_or(usize::MAX);
        Self::within_the_hour(sent, now) >= limit
    }

    fn pending_mut(&mut self, kind: RecoveryKind) -> &mut Option<PendingRecovery> {
        match kind {
            RecoveryKind::VerifyEmail => &mut self.verify_email,
            RecoveryKind::ResetPassword => &mut self.reset_password,
            RecoveryKind::ChangeEmail => &mut self.change_email,
        }
    }

    /// The state as written at `now`: the mails that no longer count are dropped.
    fn pruned_at(mut self, now: DateTime<Utc>) -> Self {
        self.recent_mails.retain(|at| Self::counts_at(*at, now));
        self.recent_notices.retain(|at| Self::counts_at(*at, now));
        self
    }

    /// The state at `now` with one more link mail recorded.
    fn with_mail_at(self, now: DateTime<Utc>) -> Self {
        let mut state = self.pruned_at(now);
        state.recent_mails.push(now);
        state
    }

    /// The state at `now` with one more notice recorded.
    fn with_notice_at(self, now: DateTime<Utc>) -> Self {
        let mut state = self.pruned_at(now);
        state.recent_notices.push(now);
        state
    }
}

/// What can be asked of an account's recovery stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryCommand {
    /// Mail a link of `kind` to the account's address `to`. The caller chose `nonce` at
    /// random. A change of email names the address it moves to in `new_email`: its link goes
    /// there, and `to` gets a notice; the other kinds leave it `None`.
    ///
    /// `account_epoch` is the account's session epoch as the caller read it;
    /// `password_hash`, for a verification only, the password a registration of the address
    /// chose (see [`PendingRecovery::password_hash`]).
    Request {
        kind: RecoveryKind,
        to: Email,
        new_email: Option<Email>,
        nonce: RecoveryNonce,
        account_epoch: u64,
        password_hash: Option<PasswordHash>,
    },
    /// Mail the owner of `to` that someone tried to register with their address.
    NoticeRegistrationAttempt { to: Email },
    /// Use the pending request of `kind` whose link the caller has authenticated with `nonce`,
    /// on the account as it is now (its session epoch, `account_epoch`).
    Complete {
        kind: RecoveryKind,
        nonce: RecoveryNonce,
        account_epoch: u64,
    },
}

/// What follows from a recovery command, with the event to append, if any
/// ([`Self::into_event`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryDecision {
    Requested(RecoveryRequested),
    Noticed(RegistrationAttempted),
    Completed(RecoveryCompleted),
    /// The account already had its mails for the hour: nothing is recorded, no mail goes, and
    /// the caller answers as if it had, so the answer tells nobody about the limit.
    OverLimit,
}

impl RecoveryDecision {
    /// The event to append, if any.
    pub fn into_event(self) -> Option<RecoveryEvent> {
        match self {
            Self::Requested(requested) => Some(requested.into()),
            Self::Noticed(noticed) => Some(noticed.into()),
            Self::Completed(completed) => Some(completed.into()),
            Self::OverLimit => None,
        }
    }
}

/// Why a recovery command was refused. Nothing is recorded for any of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecoveryRefusal {
    /// No request of the kind is pending with the presented nonce: there was none, it was used
    /// already, or a newer request replaced it. One refusal, because the client gets one 400.
    #[error("no request of this kind is pending with this link")]
    NoPendingRequest,
    #[error("the link has expired")]
    Expired,
    /// A reset or a change of email asked for before the account's password changed, it was
    /// deactivated, or its sessions were all ended.
    #[error("the account changed since the link was sent")]
    AccountChanged,
    /// A change of email without the address it moves to, another kind with one, or a password
    /// with another kind than a verification: a mistake of the caller, not of the client.
    #[error("only a change of email names a new address, and only a verification a password")]
    MalformedRequest,
}

/// Decides a command against the account's recovery state, read from the stream's last event;
/// `now` stamps the new event and is the instant the window and the expiry are measured at.
pub fn decide_recovery(
    state: &RecoveryState,
    command: RecoveryCommand,
    now: DateTime<Utc>,
    policy: &RecoveryPolicy,
) -> Result<RecoveryDecision, RecoveryRefusal> {
    match command {
        RecoveryCommand::Request {
            kind,
            to,
            new_email,
            nonce,
            account_epoch,
            password_hash,
        } => {
            if (kind == RecoveryKind::ChangeEmail) != new_email.is_some()
                || (kind != RecoveryKind::VerifyEmail && password_hash.is_some())
            {
                return Err(RecoveryRefusal::MalformedRequest);
            }
            if RecoveryState::is_over_limit_at(&state.recent_mails, now, policy) {
                return Ok(RecoveryDecision::OverLimit);
            }
            let expires_at = add_saturating(now, policy.token_lifetime);
            let mut after = state.clone().with_mail_at(now);
            *after.pending_mut(kind) = Some(PendingRecovery {
                nonce,
                requested_at: now,
                expires_at,
                new_email: new_email.clone(),
                account_epoch,
                password_hash,
            });
            Ok(RecoveryDecision::Requested(RecoveryRequested {
                kind,
                to: to.into(),
                new_email,
                nonce,
                requested_at: now,
                expires_at,
                state: after.into(),
            }))
        }
        RecoveryCommand::NoticeRegistrationAttempt { to } => {
            if RecoveryState::is_over_limit_at(&state.recent_notices, now, policy) {
                return Ok(RecoveryDecision::OverLimit);
            }
            Ok(RecoveryDecision::Noticed(RegistrationAttempted {
                to: to.into(),
                at: now,
                state: state.clone().with_notice_at(now).into(),
            }))
        }
        RecoveryCommand::Complete {
            kind,
            nonce,
            account_epoch,
        } => {
            let pending = state
                .pending(kind)
                .filter(|pending| pending.nonce == nonce)
                .ok_or(RecoveryRefusal::NoPendingRequest)?;
            if pending.is_expired_at(now) {
                return Err(RecoveryRefusal::Expired);
            }
            // A verification proves an address, whatever happened to the account since.
            if kind != RecoveryKind::VerifyEmail && pending.account_epoch != account_epoch {
                return Err(RecoveryRefusal::AccountChanged);
            }
            let new_email = pending.new_email.clone();
            let mut after = state.clone().pruned_at(now);
            *after.pending_mut(kind) = None;
            // The other links went to the address the account has just left.
            if kind == RecoveryKind::ChangeEmail {
                after.verify_email = None;
                after.reset_password = None;
            }
            Ok(RecoveryDecision::Completed(RecoveryCompleted {
                kind,
                new_email,
                at: now,
                state: after.into(),
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::given::{given_recovery, recovery_nonce, t0};
    use crate::personal::Personal;

    fn mins(n: i64) -> TimeDelta {
        TimeDelta::minutes(n)
    }

    fn secs(n: i64) -> TimeDelta {
        TimeDelta::seconds(n)
    }

    fn ann() -> Email {
        Email::parse("ann@example.com").unwrap()
    }

    fn ann_new() -> Email {
        Email::parse("ann@example.org").unwrap()
    }

    fn reset(n: u64) -> RecoveryCommand {
        RecoveryCommand::Request {
            kind: RecoveryKind::ResetPassword,
            to: ann(),
            new_email: None,
            nonce: recovery_nonce(n),
            account_epoch: 0,
            password_hash: None,
        }
    }

    fn change(n: u64) -> RecoveryCommand {
        RecoveryCommand::Request {
            kind: RecoveryKind::ChangeEmail,
            to: ann(),
            new_email: Some(ann_new()),
            nonce: recovery_nonce(n),
            account_epoch: 0,
            password_hash: None,
        }
    }

    fn complete(kind: RecoveryKind, n: u64) -> RecoveryCommand {
        RecoveryCommand::Complete {
            kind,
            nonce: recovery_nonce(n),
            account_epoch: 0,
        }
    }

    fn notice() -> RecoveryCommand {
        RecoveryCommand::NoticeRegistrationAttempt { to: ann() }
    }

    fn pending(n: u64, at: DateTime<Utc>) -> PendingRecovery {
        PendingRecovery {
            nonce: recovery_nonce(n),
            requested_at: at,
            expires_at: at + mins(30),
            new_email: None,
            account_epoch: 0,
            password_hash: None,
        }
    }

    /// The event of `reset(n)` decided at `at` on the empty stream.
    fn reset_requested(n: u64, at: DateTime<Utc>) -> RecoveryEvent {
        given_recovery([])
            .when(reset(n), at)
            .decision()
            .unwrap()
            .into_event()
            .unwrap()
    }

    /// Runs `commands` at the given instants from the empty stream, each on the event before,
    /// and returns the last event.
    fn after(
        commands: impl IntoIterator<Item = (RecoveryCommand, DateTime<Utc>)>,
    ) -> Option<RecoveryEvent> {
        let mut last: Option<RecoveryEvent> = None;
        for (command, at) in commands {
            let decision = given_recovery(last.clone())
                .when(command, at)
                .decision()
                .unwrap();
            if let Some(event) = decision.into_event() {
                last = Some(event);
            }
        }
        last
    }

    #[test]
    fn a_request_records_a_pending_link_that_expires_after_the_token_lifetime() {
        given_recovery([])
            .when(reset(1), t0())
            .then(RecoveryDecision::Requested(RecoveryRequested {
                kind: RecoveryKind::ResetPassword,
                to: ann().into(),
                new_email: None,
                nonce: recovery_nonce(1),
                requested_at: t0(),
                expires_at: t0() + mins(30),
                state: Personal::Known(RecoveryState {
                    reset_password: Some(pending(1, t0())),
                    recent_mails: vec![t0()],
                    ..RecoveryState::default()
                }),
            }));
    }

    #[test]
    fn a_newer_request_replaces_the_pending_one_of_its_kind_and_the_older_link_fails() {
        let replaced = after([(reset(1), t0()), (reset(2), t0() + mins(1))]).unwrap();
        assert_eq!(
            replaced.state().known().unwrap().reset_password,
            Some(pending(2, t0() + mins(1)))
        );
        given_recovery([replaced.clone()])
            .when(complete(RecoveryKind::ResetPassword, 1), t0() + mins(2))
            .then_refused(RecoveryRefusal::NoPendingRequest);
        given_recovery([replaced])
            .when(complete(RecoveryKind::ResetPassword, 2), t0() + mins(2))
            .then(RecoveryDecision::Completed(RecoveryCompleted {
                kind: RecoveryKind::ResetPassword,
                new_email: None,
                at: t0() + mins(2),
                state: Personal::Known(RecoveryState {
                    recent_mails: vec![t0(), t0() + mins(1)],
                    ..RecoveryState::default()
                }),
            }));
    }

    #[test]
    fn a_request_leaves_the_pending_requests_of_other_kinds_alone() {
        let both = after([(reset(1), t0()), (change(2), t0() + mins(1))]).unwrap();
        assert_eq!(
            both.state().known().unwrap().reset_password,
            Some(pending(1, t0()))
        );
        given_recovery([both])
            .when(complete(RecoveryKind::ResetPassword, 1), t0() + mins(2))
            .decision()
            .unwrap();
    }

    #[test]
    fn a_link_is_used_once() {
        let used = after([
            (reset(1), t0()),
            (complete(RecoveryKind::ResetPassword, 1), t0() + mins(1)),
        ]);
        given_recovery(used)
            .when(complete(RecoveryKind::ResetPassword, 1), t0() + mins(2))
            .then_refused(RecoveryRefusal::NoPendingRequest);
    }

    #[test]
    fn a_link_without_a_request_or_of_another_kind_completes_nothing() {
        given_recovery([])
            .when(complete(RecoveryKind::ResetPassword, 1), t0())
            .then_refused(RecoveryRefusal::NoPendingRequest);
        given_recovery([reset_requested(1, t0())])
            .when(complete(RecoveryKind::VerifyEmail, 1), t0() + mins(1))
            .then_refused(RecoveryRefusal::NoPendingRequest);
    }

    #[test]
    fn a_link_expires_at_exactly_its_expiry() {
        given_recovery([reset_requested(1, t0())])
            .when(
                complete(RecoveryKind::ResetPassword, 1),
                t0() + mins(30) - secs(1),
            )
            .decision()
            .unwrap();
        given_recovery([reset_requested(1, t0())])
            .when(complete(RecoveryKind::ResetPassword, 1), t0() + mins(30))
            .then_refused(RecoveryRefusal::Expired);
    }

    #[test]
    fn the_fifth_mail_within_an_hour_goes_and_the_sixth_records_nothing() {
        let four = after((1..=4).map(|n| (reset(n), t0() + mins(n as i64))));
        let fifth = given_recovery(four)
            .when(reset(5), t0() + mins(5))
            .decision()
            .unwrap()
            .into_event()
            .unwrap();
        assert_eq!(fifth.state().known().unwrap().recent_mails.len(), 5);
        assert_eq!(
            fifth.state().known().unwrap().reset_password,
            Some(pending(5, t0() + mins(5)))
        );
        given_recovery([fifth.clone()])
            .when(reset(6), t0() + mins(6))
            .then(RecoveryDecision::OverLimit);
        // The first mail, at t0 + 1 min, counts until t0 + 61 min, exclusive.
        given_recovery([fifth.clone()])
            .when(reset(6), t0() + mins(61) - secs(1))
            .then(RecoveryDecision::OverLimit);
        given_recovery([fifth])
            .when(reset(6), t0() + mins(61))
            .then(RecoveryDecision::Requested(RecoveryRequested {
                kind: RecoveryKind::ResetPassword,
                to: ann().into(),
                new_email: None,
                nonce: recovery_nonce(6),
                requested_at: t0() + mins(61),
                expires_at: t0() + mins(91),
                state: Personal::Known(RecoveryState {
                    reset_password: Some(pending(6, t0() + mins(61))),
                    recent_mails: (2..=5)
                        .map(|n| t0() + mins(n))
                        .chain([t0() + mins(61)])
                        .collect(),
                    ..RecoveryState::default()
                }),
            }));
    }

    #[test]
    fn over_the_limit_the_pending_link_stays_usable() {
        let five = after((1..=5).map(|n| (reset(n), t0() + mins(n as i64))));
        given_recovery(five.clone())
            .when(reset(6), t0() + mins(6))
            .then(RecoveryDecision::OverLimit);
        given_recovery(five)
            .when(complete(RecoveryKind::ResetPassword, 5), t0() + mins(7))
            .decision()
            .unwrap();
    }

    #[test]
    fn notices_have_a_limit_of_their_own_and_leave_the_link_mails_alone() {
        let five_notices = after((0..5).map(|n| (notice(), t0() + mins(n))));
        assert_eq!(
            five_notices
                .as_ref()
                .map(|event| event.state().known().unwrap().recent_notices.len()),
            Some(5)
        );
        given_recovery(five_notices.clone())
            .when(notice(), t0() + mins(5))
            .then(RecoveryDecision::OverLimit);
        // Anyone may register an address in `verify` mode: its owner still gets a reset link.
        let RecoveryDecision::Requested(requested) = given_recovery(five_notices)
            .when(reset(2), t0() + mins(5))
            .decision()
            .unwrap()
        else {
            panic!("the notices used up the link mails");
        };
        assert_eq!(
            requested.state.known().unwrap().recent_mails,
            vec![t0() + mins(5)]
        );
    }

    #[test]
    fn a_notice_records_the_address_and_the_mail_and_no_link() {
        let requested = reset_requested(1, t0());
        given_recovery([requested])
            .when(notice(), t0() + mins(1))
            .then(RecoveryDecision::Noticed(RegistrationAttempted {
                to: ann().into(),
                at: t0() + mins(1),
                state: Personal::Known(RecoveryState {
                    reset_password: Some(pending(1, t0())),
                    recent_mails: vec![t0()],
                    recent_notices: vec![t0() + mins(1)],
                    ..RecoveryState::default()
                }),
            }));
    }

    #[test]
    fn the_state_is_read_from_the_last_event_alone() {
        let last = after([(reset(1), t0()), (notice(), t0() + mins(1))]).unwrap();
        // An earlier event in the history changes nothing: only the last one's state counts.
        let unrelated = reset_requested(9, t0() - mins(10));
        given_recovery([unrelated, last.clone()])
            .when(complete(RecoveryKind::ResetPassword, 1), t0() + mins(2))
            .decision()
            .unwrap();
        assert_eq!(
            RecoveryState::from_last(Some(&last)),
            last.state().known().unwrap().clone()
        );
        assert_eq!(RecoveryState::from_last(None), RecoveryState::default());
    }

    #[test]
    fn completing_a_change_of_email_hands_back_the_new_address() {
        let requested = given_recovery([])
            .when(change(1), t0())
            .decision()
            .unwrap()
            .into_event()
            .unwrap();
        let RecoveryEvent::RecoveryRequested(request) = &requested else {
            panic!("{requested:?}");
        };
        assert_eq!(
            (&request.to, &request.new_email),
            (&ann().into(), &Some(ann_new()))
        );
        assert_eq!(
            requested
                .state()
                .known()
                .unwrap()
                .change_email
                .as_ref()
                .and_then(|pending| pending.new_email.clone()),
            Some(ann_new())
        );
        given_recovery([requested])
            .when(complete(RecoveryKind::ChangeEmail, 1), t0() + mins(1))
            .then(RecoveryDecision::Completed(RecoveryCompleted {
                kind: RecoveryKind::ChangeEmail,
                new_email: Some(ann_new()),
                at: t0() + mins(1),
                state: Personal::Known(RecoveryState {
                    recent_mails: vec![t0()],
                    ..RecoveryState::default()
                }),
            }));
    }

    #[test]
    fn only_a_change_of_email_names_a_new_address() {
        given_recovery([])
            .when(
                RecoveryCommand::Request {
                    kind: RecoveryKind::ChangeEmail,
                    to: ann_new(),
                    new_email: None,
                    nonce: recovery_nonce(1),
                    account_epoch: 0,
                    password_hash: None,
                },
                t0(),
            )
            .then_refused(RecoveryRefusal::MalformedRequest);
        given_recovery([])
            .when(
                RecoveryCommand::Request {
                    kind: RecoveryKind::VerifyEmail,
                    to: ann(),
                    new_email: Some(ann_new()),
                    nonce: recovery_nonce(1),
                    account_epoch: 0,
                    password_hash: None,
                },
                t0(),
            )
            .then_refused(RecoveryRefusal::MalformedRequest);
    }

    #[test]
    fn a_completion_prunes_the_mails_that_no_longer_count() {
        let requested = reset_requested(1, t0());
        let RecoveryDecision::Completed(completed) = given_recovery([requested])
            .when(complete(RecoveryKind::ResetPassword, 1), t0() + mins(29))
            .decision()
            .unwrap()
        else {
            panic!("not completed");
        };
        assert_eq!(completed.state.known().unwrap().recent_mails, vec![t0()]);
        let noticed = after([(notice(), t0()), (notice(), t0() + mins(60))]).unwrap();
        assert_eq!(
            noticed.state().known().unwrap().recent_notices,
            vec![t0() + mins(60)]
        );
    }

    #[test]
    fn a_nonce_is_stored_as_64_lowercase_hexadecimal_digits() {
        let mut bytes = [0; RecoveryNonce::LEN];
        bytes[0] = 0xab;
        bytes[31] = 0x0f;
        let nonce = RecoveryNonce::from_bytes(bytes);
        let hex = format!("ab{}0f", "00".repeat(30));
        assert_eq!(serde_json::to_value(nonce).unwrap(), hex.as_str());
        assert_eq!(RecoveryNonce::from_hex(&hex), Ok(nonce));
        assert_eq!(nonce.as_bytes(), &bytes);
        for bad in [
            &hex[2..],
            &hex.to_uppercase(),
            &format!("zz{}", &hex[2..]),
            "",
        ] {
            assert_eq!(
                RecoveryNonce::from_hex(bad),
                Err(InvalidRecoveryNonce),
                "{bad}"
            );
        }
        assert!(serde_json::from_value::<RecoveryNonce>(hex[2..].into()).is_err());
    }

    #[test]
    fn the_names_of_kinds_are_their_serialized_form() {
        for kind in RecoveryKind::ALL {
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.name());
        }
    }

    fn completed_on(kind: RecoveryKind, account_epoch: u64) -> RecoveryCommand {
        RecoveryCommand::Complete {
            kind,
            nonce: recovery_nonce(1),
            account_epoch,
        }
    }

    #[test]
    fn a_reset_or_a_change_asked_for_before_the_account_moved_on_is_refused() {
        let requested = [
            (RecoveryKind::ResetPassword, reset(1)),
            (RecoveryKind::ChangeEmail, change(1)),
        ];
        for (kind, request) in requested {
            let event = after([(request, t0())]);
            // The password changed, the account was deactivated, or its sessions all ended.
            given_recovery(event.clone())
                .when(completed_on(kind, 1), t0() + mins(1))
                .then_refused(RecoveryRefusal::AccountChanged);
            let RecoveryDecision::Completed(_) = given_recovery(event)
                .when(completed_on(kind, 0), t0() + mins(1))
                .decision()
                .unwrap()
            else {
                panic!("{kind:?} refused on the epoch it was asked on");
            };
        }
    }

    #[test]
    fn a_verification_proves_the_address_whatever_happened_to_the_account_since() {
        let verify = RecoveryCommand::Request {
            kind: RecoveryKind::VerifyEmail,
            to: ann(),
            new_email: None,
            nonce: recovery_nonce(1),
            account_epoch: 0,
            password_hash: None,
        };
        let event = after([(verify, t0())]);
        let RecoveryDecision::Completed(_) = given_recovery(event)
            .when(completed_on(RecoveryKind::VerifyEmail, 3), t0() + mins(1))
            .decision()
            .unwrap()
        else {
            panic!("refused");
        };
    }

    #[test]
    fn a_completed_change_of_email_voids_the_links_mailed_to_the_old_address() {
        let verify = RecoveryCommand::Request {
            kind: RecoveryKind::VerifyEmail,
            to: ann(),
            new_email: None,
            nonce: recovery_nonce(2),
            account_epoch: 0,
            password_hash: None,
        };
        let last = after([(reset(3), t0()), (verify, t0()), (change(1), t0())]);
        let RecoveryDecision::Completed(completed) = given_recovery(last)
            .when(completed_on(RecoveryKind::ChangeEmail, 0), t0() + mins(1))
            .decision()
            .unwrap()
        else {
            panic!("refused");
        };
        assert_eq!(completed.state.known().unwrap().verify_email, None);
        assert_eq!(completed.state.known().unwrap().reset_password, None);
        let after_change = Some(RecoveryEvent::from(completed));
        given_recovery(after_change)
            .when(complete(RecoveryKind::ResetPassword, 3), t0() + mins(2))
            .then_refused(RecoveryRefusal::NoPendingRequest);
    }

    #[test]
    fn only_a_verification_carries_a_password() {
        let mut request = reset(1);
        if let RecoveryCommand::Request { password_hash, .. } = &mut request {
            *password_hash = Some(crate::given::hash("squatter"));
        }
        given_recovery([])
            .when(request, t0())
            .then_refused(RecoveryRefusal::MalformedRequest);
    }
}
