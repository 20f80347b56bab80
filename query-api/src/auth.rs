//! Who is asking: the bearer token, verified offline with the configured keys (RFC 8725
//! checks live in the `tokens` crate), and whether the account behind it is still active: a
//! token outlives a deactivation by up to its lifetime.
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

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use chrono::{DateTime, Utc};
use identity::{AccountStatus, Role, UserId};
use tokens::{Claims, TokenError, TokenVerifier};
use uuid::Uuid;

use crate::AppState;
use crate::cache::ProfilesAtCheckpoint;
use crate::error::ApiError;
use crate::history;

/// A caller whose bearer token verified: who they are, and whether the token says they are an
/// administrator. Not yet whether their account is still active, which a token outlives:
/// routes ask that of [`Self::ensure_active`] or [`Self::ensure_admin`].
#[derive(Debug, Clone)]
pub struct AuthenticatedCaller {
    pub id: Uuid,
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

    /// Refuses a caller whose account is not active. `held` is what the users view holds for
    /// the caller: their row decides if the view it was read at is recent enough; without a
    /// row, or with one that may predate a deactivation, the account's stream decides.
    pub async fn ensure_active(
        &self,
        state: &AppState,
        held: &ProfilesAtCheckpoint,
    ) -> Result<(), ApiError> {
        let own = held.profiles.iter().find(|profile| profile.id == self.id);
        let active = match own {
            Some(profile) if state.freshness.covers(held.checkpoint, Instant::now()) => {
                profile.status == AccountStatus::Active.name()
            }
            _ => history::current_account(state.store.as_ref(), UserId::from_uuid(self.id))
                .await?
                .is_some_and(|account| account.is_active()),
        };
        if active {
            Ok(())
        } else {
            Err(ApiError::Unauthenticated)
        }
    }

    /// Lets a caller act as an administrator: the token must carry the role (else 403), and
    /// the account's stream must say it is active and an administrator (else 401), read from
    /// the message store as the command API does, never from a row that may be missing or
    /// stale; a stream that said so less than `query.max_view_lag_ms` ago is taken at its
    /// word ([`VerifiedAdministrators`]). While the store is out of reach this is a 503 once
    /// that has passed.
    pub async fn ensure_admin(&self, state: &AppState) -> Result<(), ApiError> {
        self.require_admin()?;
        let now = Instant::now();
        if state.administrators.vouch_for(self.id, now) {
            return Ok(());
        }
        let account =
            history::current_account(state.store.as_ref(), UserId::from_uuid(self.id)).await?;
        if account.is_some_and(|account| account.is_active() && account.has_role(Role::Admin)) {
            state.administrators.remember(self.id, now);
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
/// role: for `max_age` after that instant (taken before the stream was read, so that every
/// event committed before it was in what the read saw) their requests on others need no store
/// read of their own. A deactivation is then refused within `max_age` of its commit; 0
/// remembers nothing. Only what the stream vouched for is remembered, never a refusal.
/// Bounded: when full, it starts over.
pub struct VerifiedAdministrators {
    verified: Mutex<HashMap<Uuid, Instant>>,
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

    /// Whether `id`'s stream said they were an active administrator less than `max_age`
    /// before `now`.
    pub fn vouch_for(&self, id: Uuid, now: Instant) -> bool {
        self.verified
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&id)
            .is_some_and(|asked| now.saturating_duration_since(*asked) < self.max_age)
    }

    /// Remembers that `id`'s stream, read after `asked`, said they are an active administrator.
    pub fn remember(&self, id: Uuid, asked: Instant) {
        if self.max_age.is_zero() {
            return;
        }
        let mut verified = self.verified.lock().unwrap_or_else(PoisonError::into_inner);
        if verified.len() >= Self::CAPACITY && !verified.contains_key(&id) {
            verified.clear();
        }
        let kept = verified.entry(id).or_insert(asked);
        *kept = (*kept).max(asked);
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
        let token = issuer.issue(Uuid::new_v4(), vec![], now).unwrap().token;
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
        assert!(!administrators.vouch_for(root, asked), "nobody asked yet");

        administrators.remember(root, asked);
        assert!(administrators.vouch_for(root, asked + Duration::from_millis(999)));
        assert!(!administrators.vouch_for(root, asked + Duration::from_millis(1_000)));
        assert!(!administrators.vouch_for(other, asked));
        // An older answer arriving late does not push back a newer one's expiry.
        let later = asked + Duration::from_millis(500);
        administrators.remember(root, later);
        administrators.remember(root, asked);
        assert!(administrators.vouch_for(root, later + Duration::from_millis(999)));
    }

    #[test]
    fn with_no_bound_no_administrator_is_remembered() {
        let administrators = VerifiedAdministrators::new(Duration::ZERO);
        let (root, asked) = (Uuid::new_v4(), Instant::now());
        administrators.remember(root, asked);
        assert!(!administrators.vouch_for(root, asked));
    }

    #[test]
    fn the_administrators_remembered_are_bounded() {
        let administrators = VerifiedAdministrators::new(Duration::from_secs(60));
        let asked = Instant::now();
        for _ in 0..=VerifiedAdministrators::CAPACITY {
            administrators.remember(Uuid::new_v4(), asked);
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
