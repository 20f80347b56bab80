//! The caller's sessions, as the read model lists them (ADR 11): the sessions view, kept by the
//! users projection under the users view's checkpoint, so `X-Min-Position` and the freshness of
//! the caller's row mean the same for both. Whether the token's own session is live is never
//! read here: [`crate::auth`] checks it in the message store before anything is listed.

use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::AppState;
use crate::auth::AuthenticatedCaller;
use crate::error::ApiError;
use crate::read_model::SessionRow;
use crate::routes::{MinPositionHeader, ReadRefusals, ensure_own_account_active};

/// The most sessions one answer lists, newest first. A person has a handful; an account that
/// logs in by script may have thousands, and the answer (and the read behind it) should not
/// grow with them. The older ones are still live, and end with the others when the account's
/// sessions are all ended.
pub const MAX_LISTED: u32 = 100;

/// One of the caller's live sessions.
#[derive(Debug, Serialize, ToSchema)]
pub struct OwnSession {
    pub id: Uuid,
    pub started_at: DateTime<Utc>,
    /// Its refresh token's last rotation; null before the first.
    pub last_refreshed_at: Option<DateTime<Utc>>,
    /// When it ends unless refreshed before: the earlier of its idle limit (which each refresh
    /// moves) and its absolute limit.
    pub expires_at: DateTime<Utc>,
    /// The `User-Agent` of the login that started it, cut to 256 characters; null without one.
    pub user_agent: Option<String>,
    /// The session of the access token that asked.
    pub current: bool,
}

impl OwnSession {
    fn listed(row: SessionRow, current: Uuid) -> Self {
        Self {
            current: row.id == current,
            id: row.id,
            started_at: row.started_at,
            last_refreshed_at: row.last_refreshed_at,
            expires_at: row.expires_at,
            user_agent: row.user_agent,
        }
    }
}

/// The caller's live sessions, newest first, at most 100 (the newest): not ended, not expired,
/// and not ended with all of the account's sessions (a deactivation, a password change, an
/// administrator). As the read model holds them: send `X-Min-Position` to see a login or a
/// logout just made.
#[utoipa::path(get, path = "/users/me/sessions", tag = "sessions",
    params(MinPositionHeader),
    responses(
        (status = 200, body = [OwnSession], description = "the caller's live sessions, newest first, at most 100"),
        ReadRefusals,
        (status = 400, description = "a bad X-Min-Position"),
    ),
    security(("bearer" = [])))]
pub async fn own_sessions(
    State(state): State<AppState>,
    caller: AuthenticatedCaller,
) -> Result<Json<Vec<OwnSession>>, ApiError> {
    ensure_own_account_active(&state, &caller).await?;
    let rows = state
        .read_model
        .live_sessions(caller.id, state.clock.now(), MAX_LISTED)
        .await?;
    Ok(Json(
        rows.into_iter()
            .map(|row| OwnSession::listed(row, caller.session))
            .collect(),
    ))
}
