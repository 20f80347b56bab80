//! The HTTP surface of account recovery (ADR 12): confirming an address, resetting a forgotten
//! password, changing the email. The commands are in `recovery.rs`; every link that does not
//! confirm is one 400 `invalid_link`.

use std::fmt;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use identity::UserId;
use platform::ApiJson;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::ApiError;
use crate::routes::{
    AppState, BearerRefusals, BodyRefusals, Caller, ProblemBody, StoreOutOfReach, command_response,
    with_position,
};

/// The recovery routes, merged into the command routes.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/users/verify-email", post(verify_email))
        .route("/users/me/verify-email", post(request_verification))
        .route("/password-reset", post(request_password_reset))
        .route("/password-reset/confirm", post(reset_password))
        .route("/users/me/email", post(request_email_change))
        .route("/email-change/confirm", post(confirm_email_change))
}

/// The token of a link from a mail.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LinkRequest {
    /// The `token` parameter of the link.
    #[schema(max_length = 113)]
    token: String,
}

impl fmt::Debug for LinkRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LinkRequest { token: [redacted] }")
    }
}

/// `POST /password-reset`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordResetRequest {
    #[schema(format = IdnEmail, max_length = 254)]
    email: String,
}

/// `POST /password-reset/confirm`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPasswordRequest {
    /// The `token` parameter of the link.
    #[schema(max_length = 113)]
    token: String,
    /// At least 8 and at most 128 characters (Unicode code points) by default.
    #[schema(format = Password, min_length = 8, max_length = 128)]
    password: String,
}

impl fmt::Debug for NewPasswordRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NewPasswordRequest { token: [redacted], password: [redacted] }")
    }
}

/// `POST /users/me/email`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EmailChangeRequest {
    /// The address to move to; a link goes there.
    #[schema(format = IdnEmail, max_length = 254)]
    email: String,
    /// The account's current password.
    #[schema(format = Password)]
    password: String,
}

impl fmt::Debug for EmailChangeRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmailChangeRequest")
            .field("email", &self.email)
            .field("password", &"[redacted]")
            .finish()
    }
}

/// A request whose mail is on its way, if there is one to send.
#[derive(Debug, Serialize, ToSchema)]
pub struct Accepted {
    detail: &'static str,
}

#[utoipa::path(post, path = "/users/verify-email", request_body = LinkRequest,
    responses(
        (status = 204, description = "The address is verified; in `verify` mode a pending account is active from now on",
            headers(("X-Position" = u64, description = "global position of the last event"))),
        (status = 400, description = "`invalid_link`, one body for every link that does not confirm: malformed, forged, used, replaced by a newer one, or expired", body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "Unknown or missing fields", body = ProblemBody, content_type = "application/problem+json"),
        BodyRefusals,
        StoreOutOfReach,
    ))]
pub(crate) async fn verify_email(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<LinkRequest>,
) -> Result<Response, ApiError> {
    let done = state.commands.verify_email(&request.token).await?;
    Ok(no_content(done.position))
}

#[utoipa::path(post, path = "/users/me/verify-email",
    security(("bearer" = [])),
    responses(
        (status = 202, description = "A new link that verifies the caller's address is on its way (unless the address is verified already, or the account had `mail.max_per_account_per_hour` already); it replaces any earlier one", body = crate::routes::CommandResult,
            headers(("X-Position" = u64, description = "global position of the request's event, or of the account's last event when none was recorded"))),
        BearerRefusals,
        StoreOutOfReach,
    ))]
pub(crate) async fn request_verification(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Response, ApiError> {
    let id = UserId::from_uuid(caller.0.sub);
    let done = state.commands.request_verification(id).await?;
    Ok(command_response(
        StatusCode::ACCEPTED,
        done,
        HeaderMap::new(),
    ))
}

#[utoipa::path(post, path = "/password-reset", request_body = PasswordResetRequest,
    responses(
        (status = 202, description = "The same answer, after the same delay (`mail.answer_after_ms`), for every address: a known, active account gets a mail with a link, unless it had `mail.max_per_account_per_hour` already", body = Accepted),
        (status = 422, description = "Not an email address, or unknown fields", body = ProblemBody, content_type = "application/problem+json"),
        BodyRefusals,
        StoreOutOfReach,
    ))]
pub(crate) async fn request_password_reset(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<PasswordResetRequest>,
) -> Result<Response, ApiError> {
    state
        .commands
        .request_password_reset(&request.email)
        .await?;
    Ok(accepted(
        "if the address belongs to an active account, a link to reset its password is on its way",
    ))
}

#[utoipa::path(post, path = "/password-reset/confirm", request_body = NewPasswordRequest,
    responses(
        (status = 204, description = "The password is set, every session of the account has ended, and a lockout is lifted",
            headers(("X-Position" = u64, description = "global position of the last event"))),
        (status = 400, description = "`invalid_link`, one body for every link that does not confirm: malformed, forged, used, replaced by a newer one, expired, or of an account no longer active", body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "The password breaks the policy, or unknown fields", body = ProblemBody, content_type = "application/problem+json"),
        (status = 429, description = "Too many password hashes waiting", body = ProblemBody, content_type = "application/problem+json"),
        BodyRefusals,
        StoreOutOfReach,
    ))]
pub(crate) async fn reset_password(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<NewPasswordRequest>,
) -> Result<Response, ApiError> {
    let done = state
        .commands
        .reset_password(&request.token, request.password)
        .await?;
    Ok(no_content(done.position))
}

#[utoipa::path(post, path = "/users/me/email", request_body = EmailChangeRequest,
    security(("bearer" = [])),
    responses(
        (status = 202, description = "A link is on its way to the new address (unless the account had `mail.max_per_account_per_hour` already) and a notice to the current one; the change happens when the link is confirmed", body = crate::routes::CommandResult,
            headers(("X-Position" = u64, description = "global position of the request's event"))),
        (status = 401, description = "`invalid_credentials`: the password is wrong, or the account is locked", body = ProblemBody, content_type = "application/problem+json"),
        (status = 409, description = "`account_inactive`", body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "Not an email address, the account's own address, or unknown fields", body = ProblemBody, content_type = "application/problem+json"),
        BearerRefusals,
        BodyRefusals,
        StoreOutOfReach,
    ))]
pub(crate) async fn request_email_change(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(request): ApiJson<EmailChangeRequest>,
) -> Result<Response, ApiError> {
    let id = UserId::from_uuid(caller.0.sub);
    let done = state
        .commands
        .request_email_change(id, &request.email, request.password)
        .await?;
    Ok(command_response(
        StatusCode::ACCEPTED,
        done,
        HeaderMap::new(),
    ))
}

#[utoipa::path(post, path = "/email-change/confirm", request_body = LinkRequest,
    responses(
        (status = 204, description = "The account has moved to the new address: the old one is free, the new one taken",
            headers(("X-Position" = u64, description = "global position of the last event"))),
        (status = 400, description = "`invalid_link`, one body for every link that does not confirm: malformed, forged, used, replaced by a newer one, expired, or of an account no longer active", body = ProblemBody, content_type = "application/problem+json"),
        (status = 409, description = "`email_taken`: another account took the new address meanwhile", body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "Unknown or missing fields", body = ProblemBody, content_type = "application/problem+json"),
        BodyRefusals,
        StoreOutOfReach,
    ))]
pub(crate) async fn confirm_email_change(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<LinkRequest>,
) -> Result<Response, ApiError> {
    let done = state.commands.confirm_email_change(&request.token).await?;
    Ok(no_content(done.position))
}

fn no_content(position: message_store::GlobalPosition) -> Response {
    with_position(StatusCode::NO_CONTENT.into_response(), position)
}

fn accepted(detail: &'static str) -> Response {
    (StatusCode::ACCEPTED, ApiJson(Accepted { detail })).into_response()
}
