//! The HTTP surface: handlers, the read-your-writes wait, and the OpenAPI document.

use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{FromRequestParts, Path, Request, State};
use axum::http::HeaderName;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use identity::{AccountStatus, Email, UserId};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, IntoResponses, OpenApi as _, ToSchema};
use uuid::Uuid;

use platform::FieldError;
use platform::problem::ApiQuery;
use read_model_schema::ERASED_STATUS;

use crate::AppState;
use crate::auth::AuthenticatedCaller;
use crate::cache::ProfilesAtCheckpoint;
use crate::error::ApiError;
use crate::history::{self, HistoryEntry};
use crate::read_model::Profile;

/// Asks the query API to answer only once the read model has applied this global position
/// (the `X-Position` a command answered with).
pub const MIN_POSITION: HeaderName = HeaderName::from_static("x-min-position");

/// The read-your-writes header every read accepts (see [`wait_for_min_position`]).
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)] // read by the middleware from the raw headers; here for the document
pub struct MinPositionHeader {
    /// Answer only once the read model has applied this global position (a command's
    /// `X-Position`): waits up to a bound, then 503 with Retry-After. Decimal digits, sent
    /// once; leading zeros are allowed (`05` is 5) and whitespace around the value is not part
    /// of it (RFC 9110). An empty value, a sign, anything but digits, a number above
    /// 18446744073709551615, or the header sent twice is a 400 at once, as is a position
    /// beyond the last one written; a caller whose account is not active, or whose session is
    /// over, is refused (401) before any wait.
    #[param(rename = "X-Min-Position", minimum = 0, nullable = false)]
    x_min_position: Option<u64>,
}

/// What every read of accounts may answer besides its own answers, described once for the
/// document: a refused token or account, and a dependency out of reach or behind.
#[derive(IntoResponses)]
#[allow(dead_code)] // never built: `ApiError` gives these answers; this describes them
pub enum ReadRefusals {
    #[response(
        status = 401,
        description = "no valid bearer token, or the account behind it is no longer active, or \
                       the session it was issued in has ended or expired"
    )]
    Unauthenticated,
    #[response(
        status = 503,
        description = "the read model did not reach X-Min-Position in time, or is unreachable; \
                       or the message store is, when the answer needs it (the caller's account \
                       status, a history, a past state)"
    )]
    Unavailable,
}

/// Waits, up to `query.max_wait_ms`, until the read model has reached `X-Min-Position`.
///
/// Only a caller who may be served holds a connection while waiting: one with a valid token,
/// whose account is not known to be inactive and whose session is live, asking for a position
/// that was written. The account and the session are checked as the caller's own routes check
/// them
/// ([`AuthenticatedCaller::ensure_active`]), and only when there is something to wait for: from
/// memory while the view can vouch for the caller's row, else in the account's stream.
pub async fn wait_for_min_position(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    if !request.headers().contains_key(&MIN_POSITION) {
        return next.run(request).await;
    }
    let (mut parts, body) = request.into_parts();
    let caller = match AuthenticatedCaller::from_request_parts(&mut parts, &state).await {
        Ok(caller) => caller,
        Err(refused) => return refused.into_response(),
    };
    let request = Request::from_parts(parts, body);
    let wanted = match min_position(request.headers()) {
        Ok(Some(wanted)) => wanted,
        Ok(None) => return next.run(request).await,
        Err(refused) => return refused.into_response(),
    };
    let deadline = Instant::now() + Duration::from_millis(state.settings.max_wait_ms);
    let mut pause = Duration::from_millis(1);
    let mut may_wait = false;
    if state.profiles.synced() >= wanted {
        return next.run(request).await;
    }
    loop {
        // Synced, not just the view's checkpoint: the answer may come from the kept profiles.
        match state.profiles.sync(&state.read_model).await {
            Ok(reached) if reached >= wanted => return next.run(request).await,
            // Behind: first make sure the position exists at all, rather than wait for a
            // message nobody has written (a made-up number would hold a connection in vain),
            // and that the caller's account may still be active.
            Ok(_) if !may_wait => match state.store.last_position().await {
                Ok(last) if wanted > last => {
                    return ApiError::UnknownPosition(wanted).into_response();
                }
                Ok(_) => match ensure_own_account_active(&state, &caller).await {
                    Ok(()) => may_wait = true,
                    Err(refused) => return refused.into_response(),
                },
                Err(error) => return ApiError::from(error).into_response(),
            },
            Ok(_) if Instant::now() >= deadline => {
                return ApiError::NotYetConsistent(wanted).into_response();
            }
            Ok(_) => {}
            Err(error) => return ApiError::from(error).into_response(),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(25));
    }
}

/// The position `X-Min-Position` asks for, if it is there: decimal digits, in one header.
///
/// Only digits, because `u64::from_str` also takes a leading `+`, which no command answers
/// with; a header sent twice is refused rather than one of its values picked, since the client
/// meant one of them and the server cannot tell which. Whitespace around a field value is not
/// part of it (RFC 9110, section 5.5; hyper strips it already).
pub(crate) fn min_position(headers: &axum::http::HeaderMap) -> Result<Option<u64>, ApiError> {
    let mut values = headers.get_all(&MIN_POSITION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::InvalidHeader("X-Min-Position must be sent once"));
    }
    value
        .to_str()
        .ok()
        .and_then(|value| digits(value.trim_matches([' ', '\t'])))
        .map(Some)
        .ok_or(ApiError::InvalidHeader(
            "X-Min-Position must be a global position: decimal digits, at most \
             18446744073709551615",
        ))
}

/// A non-negative number written in decimal digits only: no sign, no spaces, nothing empty.
/// Leading zeros are harmless and taken. Too large for `T` is `None`.
fn digits<T: std::str::FromStr>(text: &str) -> Option<T> {
    if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ProfileQuery {
    /// An RFC 3339 instant with any offset (`2026-11-27T12:00:00Z`, or the same instant as
    /// `2026-11-27T14:00:00%2B02:00`: a bare `+` in a query string means a space, so send it
    /// as `%2B`): the profile as it stood then, folded from the account's events. An instant
    /// in the future is a 422: what holds then is not written yet, and an answer given now
    /// could change later; leave `as_of` out for the current profile. Of an account erased
    /// since, the profile as it stood then without its personal data, which is gone: `email`
    /// null and `erased_at` set (even for an instant before the erasure, which is how the
    /// answer says the account is erased now); `status` is the one it had then, `erased` from
    /// the erasure on.
    as_of: Option<String>,
}

/// The caller's own profile.
#[utoipa::path(get, path = "/users/me", tag = "users",
    params(MinPositionHeader),
    responses(
        (status = 200, body = Profile),
        ReadRefusals,
        (status = 400, description = "a bad X-Min-Position"),
        (status = 404, description = "the read model does not hold the account (yet)"),
    ),
    security(("bearer" = [])))]
pub async fn me(
    State(state): State<AppState>,
    caller: AuthenticatedCaller,
) -> Result<Json<Profile>, ApiError> {
    let own = own_profile(&state, &caller).await?;
    caller.ensure_active(&state, &own).await?;
    own.rows
        .into_iter()
        .next()
        .map(|row| Json(row.profile))
        .ok_or(ApiError::NotFound)
}

/// A profile: the caller's own, or anyone's for an administrator. With `as_of`, as it stood
/// at that instant. An erased account's profile (for an administrator: the account itself can
/// call nothing any more) has `status` `erased`, `erased_at`, and no `email`.
#[utoipa::path(get, path = "/users/{id}", tag = "users",
    params(("id" = Uuid, Path), ProfileQuery, MinPositionHeader),
    responses(
        (status = 200, body = Profile),
        ReadRefusals,
        (status = 400, description = "a bad X-Min-Position or an unknown query parameter"),
        (status = 403, description = "someone else's account, and not an administrator"),
        (status = 404, description = "no such account (at that instant)"),
        (status = 422, description = "a bad as_of, or one in the future"),
    ),
    security(("bearer" = [])))]
pub async fn profile(
    State(state): State<AppState>,
    caller: AuthenticatedCaller,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<ProfileQuery>,
) -> Result<Json<Profile>, ApiError> {
    let id = parse_id(&id)?;
    // The caller is checked before anything about `id` is read, so no one fills the kept
    // profiles with rows they cannot see.
    let own = authorize_read(&state, &caller, id).await?;
    let profile = match query.as_of {
        Some(as_of) => {
            let at = parse_as_of(&as_of, state.clock.now())?;
            let id = UserId::from_uuid(id);
            history::profile_as_of(state.store.as_ref(), &state.sealer, id, at).await?
        }
        None => match own {
            Some(own) => own.rows.into_iter().next(),
            None => state
                .profiles
                .profiles(&state.read_model, &[id])
                .await?
                .rows
                .into_iter()
                .next(),
        }
        .map(|row| row.profile),
    };
    profile.map(Json).ok_or(ApiError::NotFound)
}

/// The instant `as_of` names, in UTC, if it is not after `now`.
///
/// The future is refused rather than answered with the current profile: an `as_of` answer
/// is a fact about the past that no later event changes, and one about an instant still to
/// come would be the present mislabelled, different when asked again later.
fn parse_as_of(as_of: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, ApiError> {
    let at = DateTime::parse_from_rfc3339(as_of)
        .map_err(|_| {
            ApiError::invalid(
                "as_of",
                "must be an RFC 3339 instant such as 2026-11-27T12:00:00Z (send the + of an \
                 offset as %2B)",
            )
        })?
        .with_timezone(&Utc);
    if at > now {
        return Err(ApiError::invalid(
            "as_of",
            "must not be in the future; leave it out for the current profile",
        ));
    }
    Ok(at)
}

/// Lets the caller read the account `id`: their own while their account is active (the view's
/// row, already read, comes back), anyone's for an active administrator (checked in the store).
/// Anyone else's is 403, once the caller is known to be active: a deactivated caller gets the
/// same 401 everywhere.
async fn authorize_read(
    state: &AppState,
    caller: &AuthenticatedCaller,
    id: Uuid,
) -> Result<Option<ProfilesAtCheckpoint>, ApiError> {
    if id != caller.id && caller.is_admin {
        caller.ensure_admin(state).await?;
        return Ok(None);
    }
    let own = own_profile(state, caller).await?;
    caller.ensure_active(state, &own).await?;
    if id != caller.id {
        return Err(ApiError::Forbidden);
    }
    Ok(Some(own))
}

/// Lets the caller act as an administrator; a caller without the role gets 403 once their
/// account is known to be active, 401 otherwise.
pub(crate) async fn authorize_admin(
    state: &AppState,
    caller: &AuthenticatedCaller,
) -> Result<(), ApiError> {
    if caller.is_admin {
        return caller.ensure_admin(state).await;
    }
    ensure_own_account_active(state, caller).await?;
    Err(ApiError::Forbidden)
}

/// Refuses a caller whose account is not active or whose session is over, by the rule of
/// their own routes.
pub async fn ensure_own_account_active(
    state: &AppState,
    caller: &AuthenticatedCaller,
) -> Result<(), ApiError> {
    let own = own_profile(state, caller).await?;
    caller.ensure_active(state, &own).await
}

/// What the users view holds for the caller.
async fn own_profile(
    state: &AppState,
    caller: &AuthenticatedCaller,
) -> Result<ProfilesAtCheckpoint, ApiError> {
    Ok(state
        .profiles
        .profiles(&state.read_model, &[caller.id])
        .await?)
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Find the account with this email (any case or Unicode form). A lookup, not a list:
    /// with `status`, `limit` or `cursor` it is a 422.
    email: Option<String>,
    /// `pending`, `active`, `deactivated` or `erased`; all accounts when absent.
    status: Option<String>,
    /// At most this many (1 to the configured maximum).
    limit: Option<String>,
    /// From `next_cursor` of the previous page of the same list (the same `status`, or none):
    /// one from a list of another status, or not given out by this API, is a 422.
    cursor: Option<String>,
}

/// A page of accounts.
#[derive(Debug, Serialize, ToSchema)]
pub struct Page {
    items: Vec<Profile>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<String>,
}

/// Accounts by email, or by status a page at a time (administrators only). Pages follow the
/// account id, so accounts added meanwhile never shift a page or repeat an account. A lookup by
/// email never finds an erased account (it has no address any more); `status=erased` lists
/// them.
#[utoipa::path(get, path = "/users", tag = "users",
    params(ListQuery, MinPositionHeader),
    responses(
        (status = 200, body = Page),
        ReadRefusals,
        (status = 400, description = "a bad X-Min-Position or an unknown query parameter"),
        (status = 403, description = "not an administrator"),
        (status = 422, description = "a bad email, status, limit or cursor; a cursor from a list of another status; email with status, limit or cursor"),
    ),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    caller: AuthenticatedCaller,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<Page>, ApiError> {
    authorize_admin(&state, &caller).await?;
    if let Some(email) = &query.email {
        // One account or none: nothing to filter or page. Refused rather than ignored, so a
        // client that meant a filter learns it was not applied.
        let combined: Vec<FieldError> = [
            ("status", query.status.is_some()),
            ("limit", query.limit.is_some()),
            ("cursor", query.cursor.is_some()),
        ]
        .into_iter()
        .filter(|(_, given)| *given)
        .map(|(field, _)| FieldError::new(field, "cannot be combined with email"))
        .collect();
        if !combined.is_empty() {
            return Err(ApiError::Invalid(combined));
        }
        let email = Email::parse(email).map_err(|error| ApiError::invalid("email", error))?;
        let items = state.read_model.by_email(email.normalized()).await?;
        return Ok(Json(Page {
            items,
            next_cursor: None,
        }));
    }
    let status = StatusFilter::parse(query.status.as_deref())?;
    let limit = page_size(
        query.limit.as_deref(),
        state.settings.default_page_size,
        &state,
    )?;
    let after = query
        .cursor
        .as_deref()
        .map(|cursor| decode_cursor(cursor, status))
        .transpose()?;
    let mut items = state
        .read_model
        .list(status.name(), after, limit + 1)
        .await?;
    let next_cursor = if items.len() > limit as usize {
        items.truncate(limit as usize);
        items.last().map(|last| encode_cursor(status, last.id))
    } else {
        None
    };
    Ok(Json(Page { items, next_cursor }))
}

/// The `limit` a client asked for, from 1 to the configured maximum, or `default`.
pub(crate) fn page_size(
    limit: Option<&str>,
    default: u32,
    state: &AppState,
) -> Result<u32, ApiError> {
    let Some(limit) = limit else {
        return Ok(default);
    };
    let maximum = state.settings.max_page_size;
    digits::<u32>(limit)
        .filter(|limit| (1..=maximum).contains(limit))
        .ok_or_else(|| ApiError::invalid("limit", format!("must be from 1 to {maximum}")))
}

/// Which accounts a list holds. The discriminant is the filter's byte in a cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StatusFilter {
    All = 0,
    Pending = 1,
    Active = 2,
    Deactivated = 3,
    Erased = 4,
}

impl StatusFilter {
    const EVERY: [Self; 5] = [
        Self::All,
        Self::Pending,
        Self::Active,
        Self::Deactivated,
        Self::Erased,
    ];

    /// The filter a `status` parameter names; all accounts without one.
    fn parse(status: Option<&str>) -> Result<Self, ApiError> {
        let Some(status) = status else {
            return Ok(Self::All);
        };
        Self::EVERY
            .into_iter()
            .find(|filter| filter.name() == Some(status))
            .ok_or_else(|| {
                ApiError::invalid("status", "must be pending, active, deactivated or erased")
            })
    }

    /// The status the users view writes for the accounts of this filter; none for all.
    fn name(self) -> Option<&'static str> {
        let status = match self {
            Self::All => return None,
            // Not an account status: what the view keeps of an erased account (ADR 13).
            Self::Erased => return Some(ERASED_STATUS),
            Self::Pending => AccountStatus::Pending,
            Self::Active => AccountStatus::Active,
            Self::Deactivated => AccountStatus::Deactivated,
        };
        Some(status.name())
    }

    fn from_tag(tag: u8) -> Option<Self> {
        Self::EVERY.into_iter().find(|filter| *filter as u8 == tag)
    }
}

/// The first byte of every cursor: the layout below. Another layout gets another number.
const CURSOR_LAYOUT: u8 = 1;

/// Where the next page of a list starts: the layout, the list's status filter and the last
/// account id shown (18 bytes, base64url).
///
/// Bound to the filter by carrying it, not signed: every replica and every restart must
/// take the cursors of every other, so a key would be one more secret to share, and what a
/// cursor holds is no secret and grants nothing: where in id order a page starts, in a list
/// that only administrators read and may read whole. What the binding prevents is the silent
/// mistake: a cursor from a list of another status continuing this one from a place that
/// list chose.
fn encode_cursor(status: StatusFilter, after: Uuid) -> String {
    let mut bytes = Vec::with_capacity(18);
    bytes.extend([CURSOR_LAYOUT, status as u8]);
    bytes.extend_from_slice(after.as_bytes());
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The account id a cursor continues after, if this API made it for the list of `status`.
fn decode_cursor(cursor: &str, status: StatusFilter) -> Result<Uuid, ApiError> {
    let not_ours = || ApiError::invalid("cursor", "not a cursor this API gave out");
    let bytes = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| not_ours())?;
    let [CURSOR_LAYOUT, tag, after @ ..] = bytes.as_slice() else {
        return Err(not_ours());
    };
    let made_for = StatusFilter::from_tag(*tag).ok_or_else(not_ours)?;
    let after = Uuid::from_slice(after).map_err(|_| not_ours())?;
    if made_for != status {
        return Err(ApiError::invalid(
            "cursor",
            "belongs to a list of another status; use it with the status it came from, or \
             start again without a cursor",
        ));
    }
    Ok(after)
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Events after this global position (the last `position` of the previous page).
    after: Option<String>,
    /// At most this many (1 to the configured maximum).
    limit: Option<String>,
}

/// A page of an account's history.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventPage {
    items: Vec<HistoryEntry>,
}

/// The account's history, oldest first, without secrets (no password hash): the caller's own,
/// or anyone's for an administrator. An erased account's history keeps every event (what
/// happened, when), each personal field (an address, its normalised form) null.
#[utoipa::path(get, path = "/users/{id}/events", tag = "users",
    params(("id" = Uuid, Path), EventsQuery, MinPositionHeader),
    responses(
        (status = 200, body = EventPage),
        ReadRefusals,
        (status = 400, description = "a bad X-Min-Position or an unknown query parameter"),
        (status = 403, description = "someone else's account, and not an administrator"),
        (status = 404, description = "no such account"),
        (status = 422, description = "a bad after or limit"),
    ),
    security(("bearer" = [])))]
pub async fn events(
    State(state): State<AppState>,
    caller: AuthenticatedCaller,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<EventsQuery>,
) -> Result<Json<EventPage>, ApiError> {
    let id = parse_id(&id)?;
    authorize_read(&state, &caller, id).await?;
    let after = match query.after.as_deref() {
        None => 0,
        Some(after) => digits::<u64>(after)
            .ok_or_else(|| ApiError::invalid("after", "must be a non-negative integer"))?,
    };
    let limit = page_size(query.limit.as_deref(), state.settings.max_page_size, &state)?;
    let items = history::events(
        state.store.as_ref(),
        &state.sealer,
        UserId::from_uuid(id),
        after,
        limit as usize,
    )
    .await?;
    if items.is_empty() && after == 0 {
        return Err(ApiError::NotFound);
    }
    Ok(Json(EventPage { items }))
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    // An id that is not a UUID cannot name an account.
    Uuid::parse_str(id).map_err(|_| ApiError::NotFound)
}

/// The keys that verify tokens, for services that verify them offline.
#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "keys",
    responses((status = 200, description = "a JSON Web Key Set")))]
pub async fn jwks(State(state): State<AppState>) -> Response {
    platform::http::jwks_response(state.verifier.jwks())
}

/// Ready when the read model and the message store answer.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, description = "ready"), (status = 503, description = "a dependency is unreachable")))]
pub async fn readyz(State(state): State<AppState>) -> Response {
    let (read_model, store) = tokio::join!(state.read_model.ping(), state.store.ping());
    // As text: the two fail with errors of different types, and only their message is logged.
    platform::http::readiness([
        ("read model", read_model.map_err(|error| error.to_string())),
        ("message store", store.map_err(|error| error.to_string())),
    ])
}

pub async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(crate::ApiDoc::openapi())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_filter_is_read_back_from_its_name_and_from_its_tag() {
        for filter in StatusFilter::EVERY {
            assert_eq!(StatusFilter::parse(filter.name()).ok(), Some(filter));
            assert_eq!(StatusFilter::from_tag(filter as u8), Some(filter));
        }
        assert!(StatusFilter::parse(Some("sleeping")).is_err());
    }
}
