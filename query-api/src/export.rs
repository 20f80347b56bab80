//! The right of access (GDPR article 15): `GET /users/me/export` gives the caller everything
//! the service holds about their account, in one JSON document, their personal data in clear.
//!
//! The account's events come from the message store (its user, login and recovery streams,
//! their personal fields opened with the person's key, ADR 13), and its sessions from the
//! sessions view, which alone lists them by account. Secrets are never exported: no password
//! hash, no nonce of a link or of a refresh token (from which their tokens are derived), no
//! recovery state (which holds both); what they protect is the person's, what they are is not
//! data about the person. Only the caller's own streams and rows are read, so nobody else's data
//! can appear in it.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use identity::UserId;
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::AppState;
use crate::auth::AuthenticatedCaller;
use crate::error::ApiError;
use crate::history::{self, HistoryEntry};
use crate::read_model::{Profile, SessionRecord};
use crate::routes::{MinPositionHeader, ReadRefusals, ensure_own_account_active};

/// Everything the service holds about the caller's account.
#[derive(Debug, Serialize, ToSchema)]
pub struct AccountExport {
    /// When this export was made.
    pub exported_at: DateTime<Utc>,
    /// The account as its events make it now (the message store's, not the read model's).
    pub profile: Profile,
    /// Every event of the account and of its logins, oldest first, as `/users/{id}/events`
    /// lists them: addresses in clear, no password hash. Login history older than the
    /// retention bound is no longer held, and not here.
    pub events: Vec<HistoryEntry>,
    /// Every event of the account's recovery (each link or notice mailed, with the address it
    /// went to; each link used), oldest first, without the links' nonces and the recovery
    /// states.
    pub recovery: Vec<HistoryEntry>,
    /// Every session the sessions view holds of the account, live or over, newest first, with
    /// the user agent each began with; no refresh token or its nonce.
    pub sessions: Vec<ExportedSession>,
}

/// One of the caller's sessions, live or over.
#[derive(Debug, Serialize, ToSchema)]
pub struct ExportedSession {
    pub id: Uuid,
    pub started_at: DateTime<Utc>,
    /// Its refresh token's last rotation; null before the first.
    pub last_refreshed_at: Option<DateTime<Utc>>,
    /// The earlier of its idle and absolute limits: it cannot be refreshed from then on.
    pub expires_at: DateTime<Utc>,
    /// When it was ended by a logout, its owner, an administrator, or its refresh token being
    /// used twice; null if nothing ended it on its own (it may still be over: expired, or
    /// ended with every session of the account by a deactivation or a password change).
    pub ended_at: Option<DateTime<Utc>>,
    /// Why it was ended, with `ended_at`: `logged_out`, `ended_by_owner`,
    /// `ended_by_administrator`, `refresh_token_reused`, ...
    pub end_reason: Option<String>,
    /// The `User-Agent` of the login that started it, cut to 256 characters; null without one.
    pub user_agent: Option<String>,
    /// Whether it was live when the export was made: not ended, not expired, and of the
    /// account's current session epoch.
    pub live: bool,
}

impl ExportedSession {
    fn of(record: SessionRecord, now: DateTime<Utc>) -> Self {
        let SessionRecord {
            session,
            ended_at,
            end_reason,
            in_account_epoch,
        } = record;
        Self {
            live: ended_at.is_none() && in_account_epoch && session.expires_at > now,
            id: session.id,
            started_at: session.started_at,
            last_refreshed_at: session.last_refreshed_at,
            expires_at: session.expires_at,
            ended_at,
            end_reason,
            user_agent: session.user_agent,
        }
    }
}

/// The caller's own data (GDPR article 15, right of access): their profile, every event of
/// their account, their logins and their recovery links, and every session, their personal
/// fields in clear. Never a secret: no password hash, no nonce of a link or a session, no
/// recovery state. Sessions come from the read model: send `X-Min-Position` to see one just
/// started or ended.
#[utoipa::path(get, path = "/users/me/export", tag = "users",
    params(MinPositionHeader),
    responses(
        (status = 200, body = AccountExport, description = "the caller's data, with Cache-Control: no-store",
            headers(("Cache-Control" = String, description = "no-store"))),
        ReadRefusals,
        (status = 400, description = "a bad X-Min-Position"),
    ),
    security(("bearer" = [])))]
pub async fn own_export(
    State(state): State<AppState>,
    caller: AuthenticatedCaller,
) -> Result<Response, ApiError> {
    ensure_own_account_active(&state, &caller).await?;
    let now = state.clock.now();
    let (record, sessions) = tokio::try_join!(
        async {
            let id = UserId::from_uuid(caller.id);
            Ok::<_, ApiError>(
                history::account_record(state.store.as_ref(), &state.sealer, id, now).await?,
            )
        },
        async { Ok::<_, ApiError>(state.read_model.every_session(caller.id).await?) },
    )?;
    // An active caller's account is registered; none is a store that lost it.
    let profile = record.profile.ok_or(ApiError::NotFound)?;
    let export = AccountExport {
        exported_at: now,
        profile,
        events: record.events,
        recovery: record.recovery,
        sessions: sessions
            .into_iter()
            .map(|record| ExportedSession::of(record, now))
            .collect(),
    };
    let mut response = Json(export).into_response();
    // Personal data: no cache on the way keeps a copy.
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}
