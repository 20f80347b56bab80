//! Who is asking: the bearer token, verified offline with the configured keys (RFC 8725
//! checks live in the `tokens` crate), whether the account behind it is still active, and
//! whether the session the token was issued in is still live: a token outlives both a
//! deactivation and the end of its session by up to its lifetime.
//!
//! - A caller reading their own account is checked against their row in the users view, read
//!   with the request's own read (from memory, usually), as long as that view is known to hold
//!   every deactivation older than `query.max_view_lag_ms` ([`crate::freshness`]). When the view
//!   has no row for them, or cannot be trusted (the aggregator stopped or slow, a replay after a
//!   reset, a projection halted on a poison event, the store out of reach), the account's stream
//!   decides, as on the command side.
//! - An administrator acting on others is checked in the account's stream, never in the view:
//!   what they reveal is everyone's. A check that found the account active and an administrator
//!   is remembered for `query.max_view_lag_ms`, the bound own routes already have, so an
//!   administrator's requests cost a store read each that long, not each one; a deactivation
//!   committed before a check began is always seen by it, so one is refused on these routes
//!   within that bound of its commit, whatever state the view is in.
//! - Every token names its session (`sid`), and the session is checked in the message store,
//!   never in the view (ADR 11): its stream's last message must show it live (started, not
//!   ended, not past its limits by this API's clock) and of the account's current session epoch,
//!   taken where the account's status is taken above (the trusted row, the remembered
//!   administrator, or the same read of the account's stream). A row gives the epoch only when
//!   its view is of this build's projection version
//!   ([`read_model_schema::USERS_VERSION`]): during an upgrade older aggregators may keep a
//!   view of version 1 fresh, whose every epoch is 0, and then the stream decides the epoch,
//!   as it does when the row is not trusted. A session found live is
//!   remembered ([`crate::session_ends`]): for `query.max_view_lag_ms` from an instant taken
//!   before its stream was read, or for as long as the follower of session ends is current, so
//!   a logout is refused within that bound of its commit, and an end by the account's epoch (a
//!   deactivation, a password change, an administrator ending them all) within the bound a
//!   deactivation has; the view is on neither path.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use chrono::{DateTime, Utc};
use identity::{
    Account, AccountStatus, LiveSession, Role, SessionAccount, SessionId, SessionState, UserId,
};
use read_model_schema::USERS_VERSION;
use tokens::{Claims, TokenError, TokenVerifier};
use uuid::Uuid;

use crate::AppState;
use crate::cache::ProfilesAtCheckpoint;
use crate::error::ApiError;
use crate::history;

/// A caller whose bearer token verified: who they are, the session the token was issued in,
/// and whether the token says they are an administrator. Not yet whether their account is
/// still active or their session still live, which a token outlives: routes ask that of
/// [`Self::ensure_active`] or [`Self::ensure_admin`].
#[derive(Debug, Clone)]
pub struct AuthenticatedCaller {
    pub id: Uuid,
    /// The token's `sid`.
    pub session: Uuid,
    /// The token carries the admin role; the account's stream has the last word.
    pub is_admin: bool,
}

impl AuthenticatedCaller {
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.is_admin {
            Ok(())
        } else {
            Err(ApiError::Forbidden)
        }
    }

    /// Refuses a caller whose account is not active or whose session is over. `held` is what
    /// the users view holds for the caller: their row decides the account's status and session
    /// epoch if the view it was read at is recent enough; without a row, or with one that may
    /// predate a change, the account's stream decides (read beside the session's, when that
    /// one is not remembered). Every projection version keeps the status, so a recent row of
    /// an inactive account is refused at once; only [`USERS_VERSION`] keeps the epoch, so a
    /// recent row of another version says nothing of it, and the stream decides both.
    pub async fn ensure_active(
        &self,
        state: &AppState,
        held: &ProfilesAtCheckpoint,
    ) -> Result<(), ApiError> {
        let own = held.rows.iter().find(|row| row.profile.id == self.id);
        let recent = own.filter(|_| state.freshness.covers(held.checkpoint, Instant::now()));
        let vouched = match recent {
            Some(row) if row.profile.status != AccountStatus::Active.name() => {
                return Err(ApiError::Unauthenticated);
            }
            Some(row) if held.version == USERS_VERSION => Some(SessionAccount {
                active: true,
                session_epoch: row.session_epoch,
            }),
            Some(_) | None => None,
        };
        let (standing, session) = match vouched {
            Some(standing) => (Some(standing), self.live_session(state).await?),
            None => {
                let (account, session) =
                    tokio::try_join!(self.account(state), self.live_session(state))?;
                (account.as_ref().map(SessionAccount::from), session)
            }
        };
        self.admit(state, standing, session.as_deref())
    }

    /// Lets a caller act as an administrator: the token must carry the role (else 403), and
    /// the account's stream must say it is active and an administrator (else 401), read from
    /// the message store as the command API does, never from a row that may be missing or
    /// stale; a stream that said so less than `query.max_view_lag_ms` ago is taken at its
    /// word ([`VerifiedAdministrators`]), its session epoch with it. The token's session must
    /// be live in that epoch (else 401). While the store is out of reach this is a 503 once
    /// what was remembered is that old.
    pub async fn ensure_admin(&self, state: &AppState) -> Result<(), ApiError> {
        self.require_admin()?;
        let asked = Instant::now();
        let (standing, session) = match state.administrators.vouch_for(self.id, asked) {
            Some(session_epoch) => {
                let standing = SessionAccount {
                    active: true,
                    session_epoch,
                };
                (Some(standing), self.live_session(state).await?)
            }
            None => {
                let (account, session) =
                    tokio::try_join!(self.account(state), self.live_session(state))?;
                let administrator =
                    account.filter(|account| account.is_active() && account.has_role(Role::Admin));
                if let Some(administrator) = &administrator {
                    let epoch = administrator.session_epoch;
                    state.administrators.remember(self.id, epoch, asked);
                }
                (administrator.as_ref().map(SessionAccount::from), session)
            }
        };
        self.admit(state, standing, session.as_deref())
    }

    /// The caller's account as its stream says now; none once it is erased.
    async fn account(&self, state: &AppState) -> Result<Option<Account>, ApiError> {
        let id = UserId::from_uuid(self.id);
        Ok(history::current_account(state.store.as_ref(), &state.sealer, id).await?)
    }

    /// The token's session if its stream said it is live: remembered, or read from the store
    /// (and then remembered). An ended or unknown session is `None`, and never remembered.
    async fn live_session(&self, state: &AppState) -> Result<Option<Arc<LiveSession>>, ApiError> {
        let asked = Instant::now();
        if let Some(session) = state
            .sessions
            .vouch_for(self.session, asked, state.clock.now())
        {
            return Ok(Some(session));
        }
        let id = SessionId::from_uuid(self.session);
        match history::current_session(state.store.as_ref(), id).await? {
            SessionState::Live(session) => {
                let session = Arc::new(session);
                let now = state.clock.now();
                state
                    .sessions
                    .remember(self.session, session.clone(), asked, now);
                Ok(Some(session))
            }
            SessionState::Unknown | SessionState::Ended(_) => Ok(None),
        }
    }

    /// Admits the caller if their account is active and their session is theirs, live in the
    /// account's current epoch and not past its limits; every refusal is the same 401.
    fn admit(
        &self,
        state: &AppState,
        standing: Option<SessionAccount>,
        session: Option<&LiveSession>,
    ) -> Result<(), ApiError> {
        let admitted = standing.zip(session).is_some_and(|(standing, session)| {
            standing.active
                && *session.user_id.as_uuid() == self.id
                && !session.is_ended_by(standing)
                && !session.is_expired_at(state.clock.now())
        });
        if admitted {
            Ok(())
        } else {
            Err(ApiError::Unauthenticated)
        }
    }
}

impl FromRequestParts<AppState> for AuthenticatedCaller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token =
            platform::http::bearer_token(&parts.headers).ok_or(ApiError::Unauthenticated)?;
        let claims = state
            .tokens
            .verify(&state.verifier, token, state.clock.now())
            .map_err(|error| {
                tracing::debug!(reason = %error, "a bearer token was refused");
                ApiError::Unauthenticated
            })?;
        Ok(Self {
            id: claims.sub,
            session: claims.sid,
            is_admin: claims.has_role(Role::Admin.name()),
        })
    }
}

/// Tokens that verified, so a client sending the same token again costs a map lookup instead
/// of a signature check (an EdDSA verification is the largest part of a profile read). Only
/// the whole token is a key, and its expiry is checked again on every use. Bounded: when full,
/// it starts over.
#[derive(Default)]
pub struct VerifiedTokens {
    /// Shared claims: a request takes a reference count, not a copy of their strings.
    verified: Mutex<HashMap<String, Arc<Claims>>>,
}

impl VerifiedTokens {
    const CAPACITY: usize = 10_000;

    pub fn verify(
        &self,
        verifier: &TokenVerifier,
        token: &str,
        now: DateTime<Utc>,
    ) -> Result<Arc<Claims>, TokenError> {
        let known = self
            .verified
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(token)
            .cloned();
        if let Some(claims) = known {
            verifier.check_time(&claims, now)?;
            return Ok(claims);
        }
        let claims = Arc::new(verifier.verify(token, now)?);
        let mut verified = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
        if verified.len() >= Self::CAPACITY {
            verified.clear();
        }
        verified.insert(token.to_owned(), claims.clone());
        Ok(claims)
    }
}

/// Administrators whose account stream said, at an instant, that they are active and hold the
/// role, with the account's session epoch it said: for `max_age` after that instant (taken
/// before the stream was read, so that every event committed before it was in what the read
/// saw) their requests on others need no store read of their own. A deactivation, or a change
/// of epoch, is then seen within `max_age` of its commit; 0 remembers nothing. Only what the
/// stream vouched for is remembered, never a refusal. Bounded: when full, it starts over.
pub struct VerifiedAdministrators {
    /// When the stream was asked, and the session epoch it answered.
    verified: Mutex<HashMap<Uuid, (Instant, u64)>>,
    max_age: Duration,
}

impl VerifiedAdministrators {
    const CAPACITY: usize = 1_000;

    pub fn new(max_age: Duration) -> Self {
        Self {
            verified: Mutex::default(),
            max_age,
        }
    }

    /// The session epoch of `id`'s account, if its stream said they were an active
    /// administrator less than `max_age` before `now`.
    pub fn vouch_for(&self, id: Uuid, now: Instant) -> Option<u64> {
        self.verified
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .filter(|(asked, _)| now.saturating_duration_since(*asked) < self.max_age)
            .map(|(_, session_epoch)| *session_epoch)
    }

    /// Remembers that `id`'s stream, read after `asked`, said they are an active administrator
    /// in `session_epoch`.
    pub fn remember(&self, id: Uuid, session_epoch: u64, asked: Instant) {
        if self.max_age.is_zero() {
            return;
        }
        let mut verified = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
        if verified.len() >= Self::CAPACITY && !verified.contains_key(&id) {
            verified.clear();
        }
        let kept = verified.entry(id).or_insert((asked, session_epoch));
        // An older answer arriving late never replaces a newer one.
        if kept.0 < asked {
            *kept = (asked, session_epoch);
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::{TimeDelta, TimeZone};
    use tokens::{Algorithm, KeySet, SigningKey, TokenIssuer, TokenSettings};

    use super::*;

    /// A verifier, a token it accepts, and the instant it was issued at.
    fn token_issued_now() -> (TokenVerifier, String, DateTime<Utc>) {
        let issuer = TokenIssuer::new(
            KeySet::from(SigningKey::generate(Algorithm::EdDSA).unwrap()),
            TokenSettings::new("https://issuer.test", "tests"),
        );
        let now = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let token = issuer
            .issue(Uuid::new_v4(), Uuid::new_v4(), vec![], false, now)
            .unwrap()
            .token;
        (issuer.verifier(), token.expose_secret().clone(), now)
    }

    #[test]
    fn a_remembered_token_still_expires() {
        let (verifier, token, now) = token_issued_now();
        let remembered = VerifiedTokens::default();

        assert!(remembered.verify(&verifier, &token, now).is_ok());
        assert!(remembered.verify(&verifier, &token, now).is_ok());
        let later = now + TimeDelta::hours(1);
        assert_eq!(
            remembered.verify(&verifier, &token, later),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn an_administrator_is_vouched_for_only_within_the_bound_after_the_stream_was_asked() {
        let administrators = VerifiedAdministrators::new(Duration::from_millis(1_000));
        let (root, other) = (Uuid::new_v4(), Uuid::new_v4());
        let asked = Instant::now();
        assert_eq!(
            administrators.vouch_for(root, asked),
            None,
            "nobody asked yet"
        );

        administrators.remember(root, 3, asked);
        let just_within = asked + Duration::from_millis(999);
        assert_eq!(administrators.vouch_for(root, just_within), Some(3));
        let at_the_bound = asked + Duration::from_millis(1_000);
        assert_eq!(administrators.vouch_for(root, at_the_bound), None);
        assert_eq!(administrators.vouch_for(other, asked), None);
        // An older answer arriving late does not push back a newer one's expiry, nor bring
        // back the epoch it saw.
        let later = asked + Duration::from_millis(500);
        administrators.remember(root, 4, later);
        administrators.remember(root, 3, asked);
        let within_the_later = later + Duration::from_millis(999);
        assert_eq!(administrators.vouch_for(root, within_the_later), Some(4));
    }

    #[test]
    fn with_no_bound_no_administrator_is_remembered() {
        let administrators = VerifiedAdministrators::new(Duration::ZERO);
        let (root, asked) = (Uuid::new_v4(), Instant::now());
        administrators.remember(root, 0, asked);
        assert_eq!(administrators.vouch_for(root, asked), None);
    }

    #[test]
    fn the_administrators_remembered_are_bounded() {
        let administrators = VerifiedAdministrators::new(Duration::from_secs(60));
        let asked = Instant::now();
        for _ in 0..=VerifiedAdministrators::CAPACITY {
            administrators.remember(Uuid::new_v4(), 0, asked);
        }
        let held = administrators
            .verified
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        assert!(held <= VerifiedAdministrators::CAPACITY, "{held}");
    }

    #[test]
    fn a_tampered_copy_of_a_remembered_token_is_checked_afresh() {
        let (verifier, token, now) = token_issued_now();
        let remembered = VerifiedTokens::default();
        remembered.verify(&verifier, &token, now).unwrap();

        let mut tampered = token.clone();
        tampered.insert(tampered.len() - 3, 'x');
        assert!(remembered.verify(&verifier, &tampered, now).is_err());
    }
}
