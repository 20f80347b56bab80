//! Sessions: what a login opens, each refresh rotates, and a logout, the owner, an administrator,
//! a change to the account or a detected reuse ends.
//!
//! A refresh token is `<session id>.<generation>.<secret>`. The secret is derived outside the
//! domain, by the command API: an HMAC under a configured key over the session id, the
//! generation and that generation's [`RefreshNonce`] (32 random bytes the caller chose, kept in
//! the event that issued the generation). The domain sees neither secrets nor keys, and makes
//! no randomness. The caller authenticates a presented token first, by deriving its secret
//! again from the nonce of the generation it names: the current and the previous generation's
//! are in the state ([`LiveSession::nonce_of`]); an older one is in the event that issued it,
//! the stream's message at the position of that generation (counting from 0). A token that
//! does not authenticate is refused there, and never reaches [`decide_session`]: a forged token
//! naming an old generation must not end someone's session.
//!
//! Rotation with reuse detection (RFC 9700, 4.14.2): each refresh replaces the token with the
//! next generation's. A token presented after it was replaced is in two hands, the owner's and
//! a thief's, and the domain cannot tell which hand presents it, so the session ends
//! ([`SessionEndReason::RefreshTokenReused`]) and both parties' next refresh fails. One
//! exception: the token replaced last, presented again within a few seconds
//! ([`SessionPolicy::reuse_grace`]), is a lost answer or a double click rather than a theft,
//! and gets the current token again ([`SessionDecision::RepeatCurrent`]). Two refreshes racing
//! with the same token are settled by the store: the caller appends at the version it read, the
//! loser reads again and finds its token is now the previous one.
//!
//! Every session event carries the whole session state after it, so [`SessionState::from_last`]
//! needs the stream's last message only, and a refresh costs the same after a thousand refreshes
//! as after none. Expiry records nothing: a session past its limits refuses to refresh, and a
//! view tells it from a live one by its limits.
//!
//! A session belongs to one account and to one of its session epochs
//! ([`crate::account::Account::session_epoch`]). A deactivation, a password change or an
//! administrator ending them all moves the account to its next epoch, and every session of an
//! earlier one is over at once, with nothing appended to the sessions themselves: a refresh
//! shows the account's standing ([`SessionAccount`], read from its stream) and is refused if the
//! account is not active or has moved on.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::account::Account;
use crate::events::{SessionEnded, SessionEvent, SessionRefreshed, SessionStarted};
use crate::time::add_saturating;
use crate::values::{SessionId, UserId, hex_nonce};

/// How long a session lasts, and how long the token it replaced last is still answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionPolicy {
    /// A session not refreshed for this long expires.
    pub idle: Duration,
    /// No session lasts longer than this after it started, however often it is refreshed: the
    /// user logs in again.
    pub max: Duration,
    /// How long after a rotation the replaced token is taken for a racing duplicate rather than
    /// a reuse. Short, because a thief who presents the token within it gets a valid pair too.
    pub reuse_grace: Duration,
}

impl Default for SessionPolicy {
    fn default() -> Self {
        Self {
            idle: Duration::from_secs(14 * 24 * 60 * 60),
            max: Duration::from_secs(90 * 24 * 60 * 60),
            reuse_grace: Duration::from_secs(10),
        }
    }
}

hex_nonce! {
    /// The random input of one generation's refresh token secret: 32 bytes, stored as 64 lowercase
    /// hexadecimal digits.
    ///
    /// Not a secret on its own (the secret needs the command API's key too), so it may be stored
    /// and printed.
    RefreshNonce, InvalidRefreshNonce, "refresh nonce"
}

/// The client's `User-Agent`, so that a user can tell their sessions apart, cut to
/// [`UserAgent::MAX_CHARS`] characters: the client chooses it, and every event of the session
/// repeats it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UserAgent(String);

impl UserAgent {
    pub const MAX_CHARS: usize = 256;

    /// Keeps the first [`Self::MAX_CHARS`] characters.
    pub fn new(user_agent: &str) -> Self {
        Self(user_agent.chars().take(Self::MAX_CHARS).collect())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionEndReason {
    /// The client logged out with this session's token.
    LoggedOut,
    /// The user ended it from another of their sessions.
    EndedByOwner,
    EndedByAdministrator,
    /// A refresh token was presented after it had been replaced (see the module's docs).
    RefreshTokenReused,
    /// The account was deactivated, which ends all its sessions.
    AccountDeactivated,
    /// The password was changed, which ends all the account's sessions.
    PasswordChanged,
}

impl SessionEndReason {
    /// The reason's name wherever it is written out (the same spelling as its serialized form).
    pub const fn name(self) -> &'static str {
        match self {
            Self::LoggedOut => "logged_out",
            Self::EndedByOwner => "ended_by_owner",
            Self::EndedByAdministrator => "ended_by_administrator",
            Self::RefreshTokenReused => "refresh_token_reused",
            Self::AccountDeactivated => "account_deactivated",
            Self::PasswordChanged => "password_changed",
        }
    }
}

/// A session stream as its last event left it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SessionState {
    /// No such session: the stream is empty.
    #[default]
    Unknown,
    /// Started and not ended; it may have expired meanwhile ([`LiveSession::is_expired_at`]).
    Live(LiveSession),
    Ended(EndedSession),
}

/// A session that has not ended, and the generation of refresh token it is at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveSession {
    pub session_id: SessionId,
    pub user_id: UserId,
    pub session_epoch: u64,
    pub started_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub idle_expires_at: DateTime<Utc>,
    pub user_agent: Option<UserAgent>,
    /// The generation of the one refresh token that rotates.
    pub generation: u64,
    pub nonce: RefreshNonce,
    /// The generation before the current one (`generation - 1`), when the current one came from
    /// a refresh.
    pub previous: Option<PreviousGeneration>,
}

/// The generation a refresh replaced, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreviousGeneration {
    pub nonce: RefreshNonce,
    pub rotated_at: DateTime<Utc>,
}

/// A session that has ended: none of its refresh tokens is accepted any more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndedSession {
    pub session_id: SessionId,
    pub user_id: UserId,
    pub ended_at: DateTime<Utc>,
    pub reason: SessionEndReason,
}

impl SessionState {
    /// The state after the last event of a session stream (`None`: the stream is empty).
    pub fn from_last(last: Option<&SessionEvent>) -> Self {
        match last {
            None => Self::Unknown,
            Some(SessionEvent::SessionStarted(started)) => Self::Live(LiveSession {
                session_id: started.session_id,
                user_id: started.user_id,
                session_epoch: started.session_epoch,
                started_at: started.started_at,
                expires_at: started.expires_at,
                idle_expires_at: started.idle_expires_at,
                user_agent: started.user_agent.clone(),
                generation: started.generation,
                nonce: started.nonce,
                previous: None,
            }),
            Some(SessionEvent::SessionRefreshed(refreshed)) => Self::Live(LiveSession {
                session_id: refreshed.session_id,
                user_id: refreshed.user_id,
                session_epoch: refreshed.session_epoch,
                started_at: refreshed.started_at,
                expires_at: refreshed.expires_at,
                idle_expires_at: refreshed.idle_expires_at,
                user_agent: refreshed.user_agent.clone(),
                generation: refreshed.generation,
                nonce: refreshed.nonce,
                previous: Some(PreviousGeneration {
                    nonce: refreshed.previous_nonce,
                    rotated_at: refreshed.rotated_at,
                }),
            }),
            Some(SessionEvent::SessionEnded(ended)) => Self::Ended(EndedSession {
                session_id: ended.session_id,
                user_id: ended.user_id,
                ended_at: ended.ended_at,
                reason: ended.reason,
            }),
        }
    }

    /// The session, if it has not ended.
    pub fn live(&self) -> Option<&LiveSession> {
        match self {
            Self::Live(session) => Some(session),
            Self::Unknown | Self::Ended(_) => None,
        }
    }
}

impl LiveSession {
    /// The earlier of its two limits: from then on it cannot be refreshed.
    pub fn usable_until(&self) -> DateTime<Utc> {
        self.expires_at.min(self.idle_expires_at)
    }

    pub fn is_expired_at(&self, now: DateTime<Utc>) -> bool {
        now >= self.usable_until()
    }

    /// Whether the account's standing ends the session: it is no longer active, or it has
    /// moved past the session's epoch.
    pub fn is_ended_by(&self, account: SessionAccount) -> bool {
        !account.active || account.session_epoch != self.session_epoch
    }

    /// The nonce the refresh token of `generation` was derived from, when the state holds it:
    /// the current generation's and the previous one's. An older one is in the event that
    /// issued it (see the module's docs).
    pub fn nonce_of(&self, generation: u64) -> Option<RefreshNonce> {
        if generation == self.generation {
            return Some(self.nonce);
        }
        self.previous
            .filter(|_| Some(generation) == self.generation.checked_sub(1))
            .map(|previous| previous.nonce)
    }

    fn end(&self, reason: SessionEndReason, now: DateTime<Utc>) -> SessionEnded {
        SessionEnded {
            session_id: self.session_id,
            user_id: self.user_id,
            ended_at: now,
            reason,
        }
    }
}

/// What a session needs to know of its account, read from the account's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionAccount {
    pub active: bool,
    pub session_epoch: u64,
}

impl From<&Account> for SessionAccount {
    fn from(account: &Account) -> Self {
        Self {
            active: account.is_active(),
            session_epoch: account.session_epoch,
        }
    }
}

/// What can be asked of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionCommand {
    /// Open a session after a granted login. The caller chose the id and the nonce at random.
    Start {
        session_id: SessionId,
        user_id: UserId,
        /// The account's session epoch, read with the login.
        session_epoch: u64,
        user_agent: Option<UserAgent>,
        nonce: RefreshNonce,
    },
    /// Exchange a refresh token, already authenticated by the caller, that names
    /// `presented_generation`. `new_nonce` is used only if the token rotates.
    Refresh {
        presented_generation: u64,
        new_nonce: RefreshNonce,
        account: SessionAccount,
    },
    End {
        reason: SessionEndReason,
    },
}

/// What follows from a session command, with the event to append, if any ([`Self::into_event`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionDecision {
    Started(SessionStarted),
    /// The presented token was the current one: the next generation is issued.
    Rotated(SessionRefreshed),
    /// The presented token is the one replaced last, again within the grace: answer with the
    /// current generation's token again, derived from `nonce`. Nothing is recorded.
    RepeatCurrent {
        generation: u64,
        nonce: RefreshNonce,
    },
    /// The presented token had been replaced: append the end, and refuse the refresh (401).
    ReuseDetected(SessionEnded),
    Ended(SessionEnded),
    /// The session had already ended, expired or never existed: nothing to record, so ending
    /// twice (a repeated logout) is harmless. The state tells the cases apart if the caller
    /// must (an administrator's 404 for an unknown session).
    NothingToEnd,
}

impl SessionDecision {
    /// The event to append, if any.
    pub fn into_event(self) -> Option<SessionEvent> {
        match self {
            Self::Started(started) => Some(started.into()),
            Self::Rotated(refreshed) => Some(refreshed.into()),
            Self::ReuseDetected(ended) | Self::Ended(ended) => Some(ended.into()),
            Self::RepeatCurrent { .. } | Self::NothingToEnd => None,
        }
    }
}

/// Why a session command was refused. Nothing is recorded for any of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SessionRefusal {
    #[error("the session already exists")]
    AlreadyStarted,
    /// Unknown, ended, or asked for a generation never issued.
    #[error("the session is not live")]
    NotLive,
    #[error("the session has expired")]
    Expired,
    /// The account was deactivated, or all its sessions were ended, since the session started.
    #[error("the session ended with the account's sessions")]
    EndedWithAccount,
}

/// Decides a command against the session's state, read from its last event; `now` stamps the
/// new event.
pub fn decide_session(
    state: &SessionState,
    command: SessionCommand,
    now: DateTime<Utc>,
    policy: &SessionPolicy,
) -> Result<SessionDecision, SessionRefusal> {
    match command {
        SessionCommand::Start {
            session_id,
            user_id,
            session_epoch,
            user_agent,
            nonce,
        } => match state {
            SessionState::Unknown => Ok(SessionDecision::Started(SessionStarted {
                session_id,
                user_id,
                session_epoch,
                started_at: now,
                expires_at: add_saturating(now, policy.max),
                idle_expires_at: add_saturating(now, policy.idle),
                user_agent,
                generation: 0,
                nonce,
            })),
            SessionState::Live(_) | SessionState::Ended(_) => Err(SessionRefusal::AlreadyStarted),
        },
        SessionCommand::Refresh {
            presented_generation,
            new_nonce,
            account,
        } => match state {
            SessionState::Live(session) if session.is_ended_by(account) => {
                Err(SessionRefusal::EndedWithAccount)
            }
            SessionState::Live(session) => {
                refresh(session, presented_generation, new_nonce, now, policy)
            }
            SessionState::Unknown | SessionState::Ended(_) => Err(SessionRefusal::NotLive),
        },
        SessionCommand::End { reason } => match state {
            SessionState::Live(session) if !session.is_expired_at(now) => {
                Ok(SessionDecision::Ended(session.end(reason, now)))
            }
            SessionState::Live(_) | SessionState::Unknown | SessionState::Ended(_) => {
                Ok(SessionDecision::NothingToEnd)
            }
        },
    }
}

fn refresh(
    session: &LiveSession,
    presented: u64,
    new_nonce: RefreshNonce,
    now: DateTime<Utc>,
    policy: &SessionPolicy,
) -> Result<SessionDecision, SessionRefusal> {
    if session.is_expired_at(now) {
        return Err(SessionRefusal::Expired);
    }
    let current = session.generation;
    if presented > current {
        return Err(SessionRefusal::NotLive);
    }
    if presented == current {
        // A session refreshed u64::MAX times has nowhere to go; it can only end.
        let generation = current.checked_add(1).ok_or(SessionRefusal::Expired)?;
        return Ok(SessionDecision::Rotated(SessionRefreshed {
            session_id: session.session_id,
            user_id: session.user_id,
            session_epoch: session.session_epoch,
            started_at: session.started_at,
            expires_at: session.expires_at,
            idle_expires_at: add_saturating(now, policy.idle),
            user_agent: session.user_agent.clone(),
            generation,
            nonce: new_nonce,
            rotated_at: now,
            previous_nonce: session.nonce,
        }));
    }
    let racing_duplicate = session.previous.is_some_and(|previous| {
        Some(presented) == current.checked_sub(1)
            && now <= add_saturating(previous.rotated_at, policy.reuse_grace)
    });
    if racing_duplicate {
        Ok(SessionDecision::RepeatCurrent {
            generation: current,
            nonce: session.nonce,
        })
    } else {
        Ok(SessionDecision::ReuseDetected(
            session.end(SessionEndReason::RefreshTokenReused, now),
        ))
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;

    use super::*;
    use crate::given::{given_session, nonce, session, t0, user};

    fn secs(n: i64) -> TimeDelta {
        TimeDelta::seconds(n)
    }

    fn days(n: i64) -> TimeDelta {
        TimeDelta::days(n)
    }

    fn start() -> SessionCommand {
        SessionCommand::Start {
            session_id: session(),
            user_id: user(),
            session_epoch: 2,
            user_agent: Some(UserAgent::new("Firefox/140.0")),
            nonce: nonce(0),
        }
    }

    /// The account of the test session, active and still in the session's epoch.
    fn account() -> SessionAccount {
        SessionAccount {
            active: true,
            session_epoch: 2,
        }
    }

    /// Presents the token of `generation`; a rotation would use `nonce(generation + 1)`.
    fn refresh(generation: u64) -> SessionCommand {
        refresh_with(generation, account())
    }

    fn refresh_with(generation: u64, account: SessionAccount) -> SessionCommand {
        SessionCommand::Refresh {
            presented_generation: generation,
            new_nonce: nonce(generation + 1),
            account,
        }
    }

    fn end(reason: SessionEndReason) -> SessionCommand {
        SessionCommand::End { reason }
    }

    /// The test session as [`start`] opens it at [`t0`] under the default policy.
    fn started() -> SessionStarted {
        SessionStarted {
            session_id: session(),
            user_id: user(),
            session_epoch: 2,
            started_at: t0(),
            expires_at: t0() + days(90),
            idle_expires_at: t0() + days(14),
            user_agent: Some(UserAgent::new("Firefox/140.0")),
            generation: 0,
            nonce: nonce(0),
        }
    }

    /// The test session rotated to `generation` at `at` by [`refresh`].
    fn refreshed(generation: u64, at: DateTime<Utc>) -> SessionRefreshed {
        SessionRefreshed {
            session_id: session(),
            user_id: user(),
            session_epoch: 2,
            started_at: t0(),
            expires_at: t0() + days(90),
            idle_expires_at: at + days(14),
            user_agent: Some(UserAgent::new("Firefox/140.0")),
            generation,
            nonce: nonce(generation),
            rotated_at: at,
            previous_nonce: nonce(generation - 1),
        }
    }

    fn ended(reason: SessionEndReason, at: DateTime<Utc>) -> SessionEnded {
        SessionEnded {
            session_id: session(),
            user_id: user(),
            ended_at: at,
            reason,
        }
    }

    #[test]
    fn starting_a_session_issues_generation_zero_with_both_limits() {
        given_session([])
            .when(start(), t0())
            .then(SessionDecision::Started(started()));
    }

    #[test]
    fn starting_a_session_that_exists_is_refused_even_once_it_ended() {
        given_session([started().into()])
            .when(start(), t0() + secs(1))
            .then_refused(SessionRefusal::AlreadyStarted);
        given_session([
            started().into(),
            ended(SessionEndReason::LoggedOut, t0()).into(),
        ])
        .when(start(), t0() + secs(1))
        .then_refused(SessionRefusal::AlreadyStarted);
    }

    #[test]
    fn refreshing_the_current_token_issues_the_next_generation_and_moves_the_idle_expiry() {
        given_session([started().into()])
            .when(refresh(0), t0() + days(3))
            .then(SessionDecision::Rotated(refreshed(1, t0() + days(3))));
        given_session([started().into(), refreshed(1, t0() + days(3)).into()])
            .when(refresh(1), t0() + days(10))
            .then(SessionDecision::Rotated(refreshed(2, t0() + days(10))));
    }

    #[test]
    fn the_token_replaced_last_presented_again_within_the_grace_gets_the_current_one_again() {
        for after in [secs(0), secs(10)] {
            given_session([started().into(), refreshed(1, t0() + days(1)).into()])
                .when(refresh(0), t0() + days(1) + after)
                .then(SessionDecision::RepeatCurrent {
                    generation: 1,
                    nonce: nonce(1),
                });
        }
    }

    #[test]
    fn the_token_replaced_last_presented_after_the_grace_is_a_reuse_that_ends_the_session() {
        let now = t0() + days(1) + secs(11);
        given_session([started().into(), refreshed(1, t0() + days(1)).into()])
            .when(refresh(0), now)
            .then(SessionDecision::ReuseDetected(ended(
                SessionEndReason::RefreshTokenReused,
                now,
            )));
    }

    #[test]
    fn an_older_token_is_a_reuse_that_ends_the_session_even_within_the_grace() {
        let now = t0() + days(2) + secs(1);
        given_session([refreshed(5, t0() + days(2)).into()])
            .when(refresh(3), now)
            .then(SessionDecision::ReuseDetected(ended(
                SessionEndReason::RefreshTokenReused,
                now,
            )));
    }

    #[test]
    fn after_a_reuse_no_token_of_the_session_refreshes_any_more() {
        let now = t0() + days(2);
        let reuse = ended(SessionEndReason::RefreshTokenReused, now);
        for generation in [0, 1, 2] {
            given_session([refreshed(2, t0() + days(1)).into(), reuse.clone().into()])
                .when(refresh(generation), now + secs(1))
                .then_refused(SessionRefusal::NotLive);
        }
    }

    #[test]
    fn a_generation_never_issued_is_refused_without_an_event() {
        given_session([started().into()])
            .when(refresh(1), t0() + secs(1))
            .then_refused(SessionRefusal::NotLive);
        given_session([refreshed(4, t0()).into()])
            .when(refresh(u64::MAX - 1), t0() + secs(1))
            .then_refused(SessionRefusal::NotLive);
    }

    #[test]
    fn a_session_not_refreshed_for_the_idle_limit_has_expired() {
        given_session([started().into()])
            .when(refresh(0), t0() + days(14) - secs(1))
            .then(SessionDecision::Rotated(refreshed(
                1,
                t0() + days(14) - secs(1),
            )));
        given_session([started().into()])
            .when(refresh(0), t0() + days(14))
            .then_refused(SessionRefusal::Expired);
    }

    #[test]
    fn a_session_at_its_absolute_limit_has_expired_however_recently_it_was_refreshed() {
        let last = refreshed(40, t0() + days(89));
        assert_eq!(last.idle_expires_at, t0() + days(103));
        given_session([last.into()])
            .when(refresh(40), t0() + days(90))
            .then_refused(SessionRefusal::Expired);
    }

    #[test]
    fn an_expired_session_refuses_even_an_old_token_without_ending() {
        given_session([refreshed(3, t0()).into()])
            .when(refresh(1), t0() + days(14))
            .then_refused(SessionRefusal::Expired);
    }

    #[test]
    fn an_ended_or_unknown_session_refuses_to_refresh() {
        given_session([])
            .when(refresh(0), t0())
            .then_refused(SessionRefusal::NotLive);
        given_session([
            started().into(),
            ended(SessionEndReason::LoggedOut, t0() + secs(5)).into(),
        ])
        .when(refresh(0), t0() + secs(6))
        .then_refused(SessionRefusal::NotLive);
    }

    #[test]
    fn a_session_of_an_account_deactivated_or_moved_to_a_later_epoch_refuses_to_refresh() {
        let deactivated = SessionAccount {
            active: false,
            ..account()
        };
        let moved_on = SessionAccount {
            session_epoch: 3,
            ..account()
        };
        for standing in [deactivated, moved_on] {
            given_session([refreshed(2, t0()).into()])
                .when(refresh_with(2, standing), t0() + secs(1))
                .then_refused(SessionRefusal::EndedWithAccount);
            // Even a replaced token, which would otherwise end the session as a reuse.
            given_session([refreshed(2, t0()).into()])
                .when(refresh_with(0, standing), t0() + secs(1))
                .then_refused(SessionRefusal::EndedWithAccount);
        }
    }

    #[test]
    fn ending_a_live_session_records_why() {
        for reason in [
            SessionEndReason::LoggedOut,
            SessionEndReason::EndedByOwner,
            SessionEndReason::EndedByAdministrator,
            SessionEndReason::AccountDeactivated,
            SessionEndReason::PasswordChanged,
        ] {
            given_session([refreshed(2, t0()).into()])
                .when(end(reason), t0() + secs(1))
                .then(SessionDecision::Ended(ended(reason, t0() + secs(1))));
        }
    }

    #[test]
    fn ending_a_session_twice_records_the_end_once() {
        let first = given_session([started().into()])
            .when(end(SessionEndReason::LoggedOut), t0() + secs(1))
            .decision()
            .unwrap();
        let event = first.into_event().unwrap();
        given_session([started().into(), event])
            .when(end(SessionEndReason::LoggedOut), t0() + secs(2))
            .then(SessionDecision::NothingToEnd);
    }

    #[test]
    fn ending_an_unknown_or_expired_session_records_nothing() {
        given_session([])
            .when(end(SessionEndReason::LoggedOut), t0())
            .then(SessionDecision::NothingToEnd);
        given_session([started().into()])
            .when(end(SessionEndReason::AccountDeactivated), t0() + days(14))
            .then(SessionDecision::NothingToEnd);
    }

    #[test]
    fn only_rotations_starts_and_ends_have_an_event_to_append() {
        assert_eq!(
            SessionDecision::Rotated(refreshed(1, t0())).into_event(),
            Some(refreshed(1, t0()).into())
        );
        let repeat = SessionDecision::RepeatCurrent {
            generation: 1,
            nonce: nonce(1),
        };
        assert_eq!(repeat.into_event(), None);
        assert_eq!(SessionDecision::NothingToEnd.into_event(), None);
    }

    #[test]
    fn the_state_needs_only_the_last_event() {
        let state = SessionState::from_last(Some(&refreshed(10_000, t0() + days(1)).into()));
        let live = state.live().unwrap();
        assert_eq!(live.generation, 10_000);
        assert_eq!(live.usable_until(), t0() + days(15));
        assert_eq!(live.nonce_of(10_000), Some(nonce(10_000)));
        assert_eq!(live.nonce_of(9_999), Some(nonce(9_999)));
        assert_eq!(live.nonce_of(9_998), None);
        assert_eq!(live.nonce_of(10_001), None);
        let fresh = SessionState::from_last(Some(&started().into()));
        assert_eq!(fresh.live().unwrap().nonce_of(0), Some(nonce(0)));
        assert_eq!(SessionState::from_last(None), SessionState::Unknown);
    }

    #[test]
    fn the_user_agent_is_cut_to_its_bound_on_a_character_boundary() {
        let long = "é".repeat(UserAgent::MAX_CHARS + 10);
        let user_agent = UserAgent::new(&long);
        assert_eq!(user_agent.as_str().chars().count(), UserAgent::MAX_CHARS);
        assert_eq!(user_agent.as_str(), "é".repeat(UserAgent::MAX_CHARS));
        assert_eq!(UserAgent::new("curl/8.5").as_str(), "curl/8.5");
    }

    #[test]
    fn a_nonce_is_stored_as_64_lowercase_hexadecimal_digits() {
        let mut bytes = [0; RefreshNonce::LEN];
        bytes[0] = 0xab;
        bytes[31] = 0x0f;
        let nonce = RefreshNonce::from_bytes(bytes);
        let hex = format!("ab{}0f", "00".repeat(30));
        assert_eq!(serde_json::to_value(nonce).unwrap(), hex.as_str());
        assert_eq!(RefreshNonce::from_hex(&hex), Ok(nonce));
        assert_eq!(
            serde_json::from_value::<RefreshNonce>(hex.clone().into()).unwrap(),
            nonce
        );
        for bad in [
            &hex[2..],
            &hex.to_uppercase(),
            &format!("zz{}", &hex[2..]),
            "",
        ] {
            assert_eq!(
                RefreshNonce::from_hex(bad),
                Err(InvalidRefreshNonce),
                "{bad}"
            );
        }
        assert!(serde_json::from_value::<RefreshNonce>(hex[2..].into()).is_err());
    }

    #[test]
    fn the_names_of_end_reasons_are_their_serialized_form() {
        for reason in [
            SessionEndReason::LoggedOut,
            SessionEndReason::EndedByOwner,
            SessionEndReason::EndedByAdministrator,
            SessionEndReason::RefreshTokenReused,
            SessionEndReason::AccountDeactivated,
            SessionEndReason::PasswordChanged,
        ] {
            assert_eq!(serde_json::to_value(reason).unwrap(), reason.name());
        }
    }
}
