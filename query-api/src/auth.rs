//! Who is asking: the bearer token, verified offline with the configured keys (RFC 8725
//! checks live in the `tokens` crate), and the account behind it, which must still be active.

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use platform::Problem;
use uuid::Uuid;

use crate::AppState;
use crate::error::ApiError;

/// The verified caller of a request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub id: Uuid,
    pub is_admin: bool,
}

impl Caller {
    /// Whether the caller may see the account `id`: their own, or any as an administrator.
    pub fn may_read(&self, id: Uuid) -> bool {
        self.is_admin || self.id == id
    }

    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.is_admin {
            Ok(())
        } else {
            Err(ApiError::Forbidden)
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| {
                let (scheme, token) = value.split_once(' ')?;
                scheme
                    .eq_ignore_ascii_case("bearer")
                    .then_some(token.trim())
            })
            .ok_or(ApiError::Unauthenticated)?;
        let claims = state
            .verifier
            .verify(token, state.clock.now())
            .map_err(|error| {
                tracing::info!(reason = ?error, "refused a bearer token");
                ApiError::Unauthenticated
            })?;
        // A token outlives a deactivation by up to its lifetime; the read model knows sooner.
        // An account the view does not hold yet (it lags its registration) cannot have been
        // deactivated in it either.
        if let Some(profile) = state.read_model.profile(claims.sub).await?
            && profile.status != "active"
        {
            return Err(ApiError::Unauthenticated);
        }
        Ok(Self {
            id: claims.sub,
            is_admin: claims.has_role("admin"),
        })
    }
}

/// The problem every refused token gets: no hint of which check failed.
pub fn unauthenticated() -> Problem {
    Problem::unauthorized("invalid_token").with_detail("a valid bearer token is required")
}
