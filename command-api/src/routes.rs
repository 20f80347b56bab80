//! The HTTP surface: handlers, the bearer-token checks (a verified token, and a verified token
//! whose session is live) and the OpenAPI document.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRequest, FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use identity::{Role, SessionId, UserAgent, UserId};
use message_store::GlobalPosition;
use platform::http::{bearer_token, jwks_response, readiness};
use platform::openapi::BearerAuth;
use platform::{ApiJson, FieldError};
use serde::{Deserialize, Serialize};
use tokens::{Claims, TokenVerifier};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{IntoResponses, OpenApi, ToSchema};
use uuid::Uuid;

use crate::erasure::Erasure;
use crate::error::ApiError;
use crate::recovery::SignUp;
use crate::recovery_routes;
use crate::service::{CommandError, Commands, Done};
use crate::sessions::SessionTokens;
use crate::webhook_routes;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub commands: Arc<Commands>,
    /// The webhook endpoints' commands (`webhooks.rs`).
    pub webhooks: Arc<crate::webhooks::Webhooks>,
    pub verifier: Arc<TokenVerifier>,
}

/// The command routes, without the common layers (the standalone process merges them with the
/// query routes and wraps the whole once).
pub fn router(state: AppState) -> Router {
    command_routes(state.clone()).merge(
        Router::new()
            .route("/.well-known/jwks.json", get(jwks))
            .route("/openapi.json", get(openapi))
            .route("/readyz", get(readyz))
            .with_state(state),
    )
}

/// The commands alone, for a process that serves them beside the query routes and answers
/// the keys, the document and readiness itself.
pub fn command_routes(state: AppState) -> Router {
    Router::new()
        .route("/users", post(register))
        .route("/login", post(login))
        .route("/users/{id}/activate", post(activate))
        .route("/users/{id}/deactivate", post(deactivate))
        .route("/users/{id}/password", post(change_password))
        .route("/token/refresh", post(refresh))
        .route("/logout", post(logout))
        .route("/users/me/sessions/{id}", delete(end_own_session))
        .route("/users/{id}/sessions", delete(end_all_sessions))
        .route("/users/{id}", delete(erase))
        .merge(recovery_routes::routes())
        .merge(webhook_routes::routes())
        .with_state(state)
}

/// `POST /users`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// Compared without regard to case or Unicode normalisation.
    #[schema(format = IdnEmail, max_length = 254)]
    email: String,
    /// At least 8 and at most 128 characters (Unicode code points) by default.
    #[schema(format = Password, min_length = 8, max_length = 128)]
    password: String,
    /// Chosen by the client to make a retry safe; the server picks one otherwise.
    #[serde(default)]
    id: Option<Uuid>,
}

impl fmt::Debug for RegisterRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegisterRequest")
            .field("email", &self.email)
            .field("password", &"[redacted]")
            .field("id", &self.id)
            .finish()
    }
}

/// `POST /login`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    email: String,
    #[schema(format = Password)]
    password: String,
}

impl fmt::Debug for LoginRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoginRequest")
            .field("email", &self.email)
            .field("password", &"[redacted]")
            .finish()
    }
}

/// `POST /users/{id}/password`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangePasswordRequest {
    #[schema(format = Password)]
    current_password: String,
    /// At least 8 and at most 128 characters (Unicode code points) by default.
    #[schema(format = Password, min_length = 8, max_length = 128)]
    new_password: String,
}

impl fmt::Debug for ChangePasswordRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "ChangePasswordRequest { current_password: [redacted], new_password: [redacted] }",
        )
    }
}

/// `DELETE /users/{id}` of one's own account.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EraseRequest {
    /// The account's current password. Required to erase one's own account (an administrator's
    /// own included); an administrator erasing another account sends no body.
    #[schema(format = Password)]
    password: String,
}

impl fmt::Debug for EraseRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EraseRequest { password: [redacted] }")
    }
}

/// `POST /token/refresh`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    /// The refresh token of the last login or refresh: `<session id>.<generation>.<secret>`.
    #[schema(max_length = 101)]
    refresh_token: String,
}

impl fmt::Debug for RefreshRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RefreshRequest { refresh_token: [redacted] }")
    }
}

/// `POST /logout` without an access token: the session's refresh token instead.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LogoutRequest {
    /// A refresh token of the session to end.
    #[schema(max_length = 101)]
    refresh_token: String,
}

impl fmt::Debug for LogoutRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LogoutRequest { refresh_token: [redacted] }")
    }
}

/// A `verify`-mode registration's answer: the same for a free and a taken address.
#[derive(Debug, Serialize, ToSchema)]
pub struct SignUpAccepted {
    /// The account's id if the registration created one (the one sent, or one chosen).
    id: Uuid,
    detail: &'static str,
}

impl SignUpAccepted {
    const DETAIL: &'static str =
        "check your mailbox: confirm the link in it to activate the account";
}

/// A command's result: the account and the global position of its last event.
#[derive(Debug, Serialize, ToSchema)]
pub struct CommandResult {
    id: Uuid,
    position: u64,
}

/// An OAuth 2 style token response, for a login and a refresh alike.
#[derive(Serialize, ToSchema)]
pub struct TokenResponse {
    access_token: String,
    /// Always `Bearer`.
    token_type: &'static str,
    /// Seconds until the access token expires.
    expires_in: u64,
    /// Exchanged at `POST /token/refresh` for a new pair; each refresh replaces it. Shown once:
    /// the service keeps no copy.
    refresh_token: String,
    /// Seconds until the session can no longer be refreshed (its idle or its absolute limit,
    /// whichever comes first); a refresh moves the idle one.
    refresh_expires_in: u64,
    /// The session, also in the access token's `sid` claim.
    session_id: Uuid,
}

impl fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenResponse")
            .field("access_token", &"[redacted]")
            .field("expires_in", &self.expires_in)
            .field("refresh_token", &"[redacted]")
            .field("refresh_expires_in", &self.refresh_expires_in)
            .field("session_id", &self.session_id)
            .finish()
    }
}

impl TokenResponse {
    /// The answer, with `Cache-Control: no-store` (it holds credentials) and the position of
    /// the session's last event.
    fn answer(tokens: SessionTokens) -> Response {
        let body = TokenResponse {
            access_token: tokens.access.token.expose_secret().clone(),
            token_type: "Bearer",
            expires_in: tokens.access.expires_in,
            refresh_token: tokens.refresh.text().expose_secret().clone(),
            refresh_expires_in: tokens.refresh_expires_in,
            session_id: *tokens.session_id.as_uuid(),
        };
        let mut response = ApiJson(body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        with_position(response, tokens.position)
    }
}

/// The problem+json shape of every error (RFC 9457).
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct ProblemBody {
    r#type: String,
    title: String,
    status: u16,
    /// Stable and machine-readable: `email_taken`, `invalid_credentials`, ...
    code: String,
    detail: Option<String>,
    /// For 422: which fields, and what is wrong with each.
    errors: Option<Vec<FieldErrorBody>>,
}

#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct FieldErrorBody {
    field: String,
    message: String,
}

/// The answers to a request whose JSON body the route could not take (400, 413, 415), for the
/// document: the same on every route that takes one.
pub(crate) struct BodyRefusals;

impl IntoResponses for BodyRefusals {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
        problem_responses([
            ("400", "Malformed JSON"),
            ("413", "Body over 16 KiB"),
            ("415", "Not application/json"),
        ])
    }
}

/// The answers of an administrator's route to a caller who may not use it (401, 403) or an
/// account it cannot find (404), for the document.
struct AdminRefusals;

impl IntoResponses for AdminRefusals {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
        problem_responses([
            (
                "401",
                "`invalid_token`: no or an invalid bearer token, its session no longer live, or an administrator deactivated since it was issued",
            ),
            ("403", "The token lacks the admin role"),
            ("404", "No such account"),
        ])
    }
}

/// The answers of a route that takes a bearer token to a caller without a usable one, for the
/// document.
pub(crate) struct BearerRefusals;

impl IntoResponses for BearerRefusals {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
        problem_responses([(
            "401",
            "`invalid_token`: no or an invalid bearer token, or its session is no longer live (logged out, ended, expired, or ended with the account)",
        )])
    }
}

/// The 503 of a command the message store was out of reach for, for the document.
pub(crate) struct StoreOutOfReach;

impl IntoResponses for StoreOutOfReach {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
        problem_responses([(
            "503",
            "The message store is out of reach; retry after `Retry-After`",
        )])
    }
}

/// Problem answers as the document describes them: a `ProblemBody` each, by status.
pub(crate) fn problem_responses<const N: usize>(
    answers: [(&str, &str); N],
) -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
    let body = Ref::from_schema_name(ProblemBody::name());
    answers
        .into_iter()
        .map(|(status, description)| {
            let content = ContentBuilder::new().schema(Some(body.clone())).build();
            let response = ResponseBuilder::new()
                .description(description)
                .content("application/problem+json", content);
            (status.to_owned(), RefOr::T(response.build()))
        })
        .collect()
}

/// A command's answer with its body and `extra` headers, and the X-Position of its last event.
pub(crate) fn command_response(status: StatusCode, done: Done, extra: HeaderMap) -> Response {
    let mut response = (
        status,
        ApiJson(CommandResult {
            id: *done.id.as_uuid(),
            position: done.position,
        }),
    )
        .into_response();
    response.headers_mut().extend(extra);
    with_position(response, done.position)
}

/// `response` with the X-Position header: the global position a client sends back as the query
/// API's `X-Min-Position` to read what the command did (DESIGN decision 8).
pub(crate) fn with_position(mut response: Response, position: GlobalPosition) -> Response {
    response
        .headers_mut()
        .insert("x-position", HeaderValue::from(position));
    response
}

#[utoipa::path(post, path = "/users", request_body = RegisterRequest,
    responses(
        (status = 201, description = "Registered (or the same request repeated with the same id), in the `open` and `approval` modes; a mail with a link that verifies the address is on its way", body = CommandResult,
            headers(("Location" = String, description = "/users/{id}"), ("X-Position" = u64, description = "global position of the last event"))),
        (status = 202, description = "`verify` mode: the same answer, after the same delay, whether the address was free or taken. A free one gets a link that activates the account; the owner of a taken one is told someone tried", body = SignUpAccepted),
        (status = 409, description = "Not in `verify` mode: `email_taken`, or `id_taken` (the id is registered with another email)", body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "Invalid email or password, or unknown fields", body = ProblemBody, content_type = "application/problem+json"),
        (status = 429, description = "Too many password hashes waiting", body = ProblemBody, content_type = "application/problem+json"),
        BodyRefusals,
        StoreOutOfReach,
    ))]
async fn register(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<RegisterRequest>,
) -> Result<Response, ApiError> {
    let signed_up = state
        .commands
        .sign_up(&request.email, request.password, request.id)
        .await?;
    let done = match signed_up {
        SignUp::Registered(done) => done,
        SignUp::Accepted { id } => {
            let body = SignUpAccepted {
                id: *id.as_uuid(),
                detail: SignUpAccepted::DETAIL,
            };
            return Ok((StatusCode::ACCEPTED, ApiJson(body)).into_response());
        }
    };
    let mut headers = HeaderMap::new();
    if let Ok(location) = HeaderValue::from_str(&format!("/users/{}", done.id)) {
        headers.insert(header::LOCATION, location);
    }
    Ok(command_response(StatusCode::CREATED, done, headers))
}

#[utoipa::path(post, path = "/login", request_body = LoginRequest,
    params(("User-Agent" = Option<String>, Header, description = "Kept with the session (its first 256 characters), so that its owner can tell their sessions apart")),
    responses(
        (status = 200, description = "A signed access token and the refresh token of the session the login started", body = TokenResponse,
            headers(("Cache-Control" = String, description = "no-store"), ("X-Position" = u64, description = "global position of the login event and the session's start"))),
        (status = 401, description = "`invalid_credentials`, one body for every failure: unknown email, wrong password, inactive or locked account", body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "Unknown or missing fields", body = ProblemBody, content_type = "application/problem+json"),
        (status = 429, description = "`throttled`: too many password checks waiting; see Retry-After. Answered like a refusal, for a known and an unknown email alike", body = ProblemBody, content_type = "application/problem+json"),
        (status = 503, description = "The message store is out of reach; retry after `Retry-After`. Answered like a refusal, for a known and an unknown email alike", body = ProblemBody, content_type = "application/problem+json"),
        BodyRefusals,
    ))]
async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiJson(request): ApiJson<LoginRequest>,
) -> Result<Response, ApiError> {
    let user_agent = headers
        .get(header::USER_AGENT)
        .map(|value| UserAgent::new(&String::from_utf8_lossy(value.as_bytes())));
    let tokens = state
        .commands
        .login(&request.email, request.password, user_agent)
        .await?;
    Ok(TokenResponse::answer(tokens))
}

#[utoipa::path(post, path = "/token/refresh", request_body = RefreshRequest,
    responses(
        (status = 200, description = "A fresh access token and the session's next refresh token, which replaces the one sent. The token replaced last, sent again within `sessions.reuse_grace_seconds` of its replacement (a lost answer, a double click), gets the same current refresh token again", body = TokenResponse,
            headers(("Cache-Control" = String, description = "no-store"), ("X-Position" = u64, description = "global position of the session's last event"))),
        (status = 401, description = "`invalid_refresh_token`, one body for every failure: malformed, forged, unknown, ended or expired session, account deactivated or its sessions ended. A token that had been replaced (a reuse) ends its session too", body = ProblemBody, content_type = "application/problem+json",
            headers(("WWW-Authenticate" = String, description = "Bearer"))),
        (status = 422, description = "Unknown or missing fields", body = ProblemBody, content_type = "application/problem+json"),
        BodyRefusals,
        StoreOutOfReach,
    ))]
async fn refresh(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<RefreshRequest>,
) -> Result<Response, ApiError> {
    let tokens = state.commands.refresh(&request.refresh_token).await?;
    Ok(TokenResponse::answer(tokens))
}

#[utoipa::path(post, path = "/logout", request_body = Option<LogoutRequest>,
    security((), ("bearer" = [])),
    responses(
        (status = 204, description = "The session is over: the access token's (`sid`), or, without one, the refresh token's. Ending a session that is already over is a 204 too, with the same position",
            headers(("X-Position" = u64, description = "global position of the SessionEnded event, or, for a session already over, of the session's last event"))),
        (status = 401, description = "`invalid_token`: an invalid bearer token, or neither a bearer token nor a body; `invalid_refresh_token`: a refresh token that is not valid", body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "Unknown or missing fields", body = ProblemBody, content_type = "application/problem+json"),
        BodyRefusals,
        StoreOutOfReach,
    ))]
async fn logout(State(state): State<AppState>, request: Request) -> Result<Response, Response> {
    let commands = &state.commands;
    let headers = request.headers();
    let position = if bearer_token(headers).is_some() {
        let (mut parts, _) = request.into_parts();
        let Bearer(claims) = Bearer::from_request_parts(&mut parts, &state)
            .await
            .map_err(IntoResponse::into_response)?;
        let (user, session) = (
            UserId::from_uuid(claims.sub),
            SessionId::from_uuid(claims.sid),
        );
        commands.log_out(user, session).await.map_err(refused)?
    } else if headers.contains_key(header::CONTENT_TYPE) {
        // The body's own refusals (400, 413, 415, 422) as every route answers them. A JSON
        // `null` is no body, as the document's optional body says.
        let ApiJson(body) = ApiJson::<Option<LogoutRequest>>::from_request(request, &state)
            .await
            .map_err(IntoResponse::into_response)?;
        let Some(body) = body else {
            return Err(ApiError::InvalidToken.into_response());
        };
        commands
            .log_out_with_refresh_token(&body.refresh_token)
            .await
            .map_err(refused)?
    } else {
        return Err(ApiError::InvalidToken.into_response());
    };
    Ok(with_position(
        StatusCode::NO_CONTENT.into_response(),
        position,
    ))
}

/// A command's error as its answer, for a handler that answers other refusals too.
fn refused(error: CommandError) -> Response {
    ApiError::from(error).into_response()
}

#[utoipa::path(delete, path = "/users/me/sessions/{id}",
    params(("id" = Uuid, Path, description = "One of the caller's sessions")),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "The session is over (or already was: the same position again)",
            headers(("X-Position" = u64, description = "global position of the SessionEnded event, or, for a session already over, of the session's last event"))),
        (status = 404, description = "No session of the caller has this id: unknown and another person's alike", body = ProblemBody, content_type = "application/problem+json"),
        BearerRefusals,
        StoreOutOfReach,
    ))]
async fn end_own_session(
    State(state): State<AppState>,
    Caller(claims): Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let session = id
        .parse::<Uuid>()
        .map_err(|_| CommandError::SessionNotFound)?;
    let position = state
        .commands
        .end_own_session(UserId::from_uuid(claims.sub), SessionId::from_uuid(session))
        .await?;
    Ok(with_position(
        StatusCode::NO_CONTENT.into_response(),
        position,
    ))
}

#[utoipa::path(delete, path = "/users/{id}/sessions",
    params(("id" = Uuid, Path, description = "The account")),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Every session of the account is over, its administrator's own included when it is theirs",
            headers(("X-Position" = u64, description = "global position of the SessionsEnded event"))),
        AdminRefusals,
        StoreOutOfReach,
    ))]
async fn end_all_sessions(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let done = state.commands.end_all_sessions(parse_id(&id)?).await?;
    Ok(with_position(
        StatusCode::NO_CONTENT.into_response(),
        done.position,
    ))
}

#[utoipa::path(delete, path = "/users/{id}", request_body = Option<EraseRequest>,
    params(("id" = Uuid, Path, description = "The account: the token's own subject, or any account for an administrator")),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Erased: the account's personal data (its address, its password hashes, its pending links) is unreadable for good, its address is free, every session of it is over and every command on it answers as for an unknown account. What happened and when stays in its history",
            headers(("X-Position" = u64, description = "global position of the UserErased event"))),
        (status = 401, description = "`invalid_token` (its session no longer live included), or `invalid_credentials` when erasing one's own account with a wrong password (counted as a failed login) or a locked account", body = ProblemBody, content_type = "application/problem+json"),
        (status = 403, description = "Another person's account, without the admin role", body = ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = "No such account", body = ProblemBody, content_type = "application/problem+json"),
        (status = 409, description = "`last_administrator`: no other administrator is active", body = ProblemBody, content_type = "application/problem+json"),
        (status = 410, description = "`account_erased`: an administrator's erasure of an account erased already; nothing more is recorded", body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "One's own account without the password, or unknown fields", body = ProblemBody, content_type = "application/problem+json"),
        (status = 429, description = "Too many password checks waiting", body = ProblemBody, content_type = "application/problem+json"),
        BodyRefusals,
        StoreOutOfReach,
    ))]
async fn erase(
    State(state): State<AppState>,
    Caller(claims): Caller,
    Path(id): Path<String>,
    request: Request,
) -> Result<Response, Response> {
    let id = parse_id(&id).map_err(IntoResponse::into_response)?;
    // The body's own refusals (400, 413, 415, 422) first, as every route answers them. No
    // body, or a JSON `null`, is none.
    let body = if request.headers().contains_key(header::CONTENT_TYPE) {
        let ApiJson(body) = ApiJson::<Option<EraseRequest>>::from_request(request, &state)
            .await
            .map_err(IntoResponse::into_response)?;
        body
    } else {
        None
    };
    let caller = UserId::from_uuid(claims.sub);
    let erasure = if caller == id {
        // An administrator erasing themself proves the password like anyone else: a stolen
        // token alone erases no account.
        let Some(EraseRequest { password }) = body else {
            let missing = FieldError::new("password", "is required to erase one's own account");
            return Err(refused(CommandError::Validation(vec![missing])));
        };
        Erasure::ByOwner { password }
    } else if claims.has_role(Role::Admin.name()) {
        Erasure::ByAdministrator {
            administrator: caller,
        }
    } else {
        return Err(ApiError::Forbidden.into_response());
    };
    let done = state.commands.erase(id, erasure).await.map_err(refused)?;
    Ok(with_position(
        StatusCode::NO_CONTENT.into_response(),
        done.position,
    ))
}

#[utoipa::path(post, path = "/users/{id}/activate",
    params(("id" = Uuid, Path, description = "The account")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Active; repeating it changes nothing and answers the current position", body = CommandResult,
            headers(("X-Position" = u64, description = "global position of the account's last event"))),
        AdminRefusals,
        StoreOutOfReach,
    ))]
async fn activate(
    State(state): State<AppState>,
    _admin: Admin,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let done = state.commands.set_active(parse_id(&id)?, true).await?;
    Ok(command_response(StatusCode::OK, done, HeaderMap::new()))
}

#[utoipa::path(post, path = "/users/{id}/deactivate",
    params(("id" = Uuid, Path, description = "The account")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Deactivated; repeating it changes nothing and answers the current position", body = CommandResult,
            headers(("X-Position" = u64, description = "global position of the account's last event"))),
        (status = 409, description = "`cannot_deactivate_self`: an administrator's own account; `last_administrator`: no other administrator is active (of two administrators deactivating each other at once, one gets it)", body = ProblemBody, content_type = "application/problem+json"),
        AdminRefusals,
        StoreOutOfReach,
    ))]
async fn deactivate(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    // The last administrator deactivating themselves would leave nobody to undo it.
    if admin.sub == *id.as_uuid() {
        return Err(ApiError::SelfDeactivation);
    }
    let done = state.commands.set_active(id, false).await?;
    Ok(command_response(StatusCode::OK, done, HeaderMap::new()))
}

#[utoipa::path(post, path = "/users/{id}/password", request_body = ChangePasswordRequest,
    params(("id" = Uuid, Path, description = "The account: the token's own subject")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Changed. Every session of the account is over, the caller's own included: log in again with the new password", body = CommandResult,
            headers(("X-Position" = u64, description = "global position of the PasswordChanged event"))),
        (status = 401, description = "`invalid_token` (its session no longer live included), or `invalid_credentials` when the current password is wrong (counted as a failed login) or the account is locked", body = ProblemBody, content_type = "application/problem+json"),
        (status = 403, description = "The token is another user's", body = ProblemBody, content_type = "application/problem+json"),
        (status = 404, description = "No such account", body = ProblemBody, content_type = "application/problem+json"),
        (status = 409, description = "`account_inactive`: the account is deactivated", body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "The new password breaks the policy, or unknown fields", body = ProblemBody, content_type = "application/problem+json"),
        (status = 429, description = "Too many password checks waiting", body = ProblemBody, content_type = "application/problem+json"),
        BodyRefusals,
        StoreOutOfReach,
    ))]
async fn change_password(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<ChangePasswordRequest>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    if caller.0.sub != *id.as_uuid() {
        return Err(ApiError::Forbidden);
    }
    let done = state
        .commands
        .change_password(id, request.current_password, request.new_password)
        .await?;
    Ok(command_response(StatusCode::OK, done, HeaderMap::new()))
}

#[utoipa::path(get, path = "/.well-known/jwks.json",
    responses((status = 200, description = "Every public key that may verify a live token (RFC 7517 JWK set)",
        headers(("Cache-Control" = String, description = "public, max-age=300")))))]
async fn jwks(State(state): State<AppState>) -> Response {
    jwks_response(state.commands.issuer.jwks())
}

#[utoipa::path(get, path = "/readyz",
    responses(
        (status = 200, description = "The message store and the key vault in its database answer"),
        (status = 503, description = "The message store or the key vault does not answer", body = ProblemBody, content_type = "application/problem+json"),
    ))]
async fn readyz(State(state): State<AppState>) -> Response {
    let store = state
        .commands
        .store
        .ping()
        .await
        .map_err(anyhow::Error::new);
    let vault = state.commands.sealer.vault().ping().await;
    readiness([
        ("message store", store),
        ("personal data key vault", vault.map_err(anyhow::Error::new)),
    ])
}

#[utoipa::path(get, path = "/openapi.json", responses((status = 200, description = "This document")))]
async fn openapi() -> Response {
    ApiJson(ApiDoc::openapi()).into_response()
}

/// The OpenAPI document, generated from the handlers' annotations.
#[derive(OpenApi)]
#[openapi(
    info(title = "identity command API", description = "Registration, login, sessions (refresh, logout, ending them), activation, password change, account recovery, erasure, and webhook endpoints."),
    paths(register, login, refresh, logout, end_own_session, end_all_sessions, erase, activate, deactivate, change_password,
        recovery_routes::verify_email, recovery_routes::request_verification, recovery_routes::request_password_reset, recovery_routes::reset_password,
        recovery_routes::request_email_change, recovery_routes::confirm_email_change,
        webhook_routes::register_webhook, webhook_routes::rotate_webhook_secret, webhook_routes::enable_webhook, webhook_routes::delete_webhook,
        jwks, readyz, openapi),
    components(schemas(RegisterRequest, SignUpAccepted, LoginRequest, RefreshRequest, LogoutRequest, ChangePasswordRequest, EraseRequest, CommandResult, TokenResponse, ProblemBody, FieldErrorBody,
        recovery_routes::LinkRequest, recovery_routes::PasswordResetRequest, recovery_routes::NewPasswordRequest, recovery_routes::EmailChangeRequest, recovery_routes::Accepted,
        webhook_routes::WebhookRegistration, webhook_routes::EventTypeName, webhook_routes::RegisteredWebhook, webhook_routes::RotatedWebhookSecret, webhook_routes::WebhookCommandResult)),
    modifiers(&BearerAuth),
)]
pub struct ApiDoc;

/// A path id that is not a UUID names no account.
fn parse_id(id: &str) -> Result<UserId, ApiError> {
    let id = id.parse::<Uuid>().map_err(|_| CommandError::NotFound)?;
    Ok(UserId::from_uuid(id))
}

/// The verified claims of the request's bearer token, whatever its session's state: for
/// logging out, which ending a session twice does no harm to.
pub struct Bearer(pub Claims);

impl FromRequestParts<AppState> for Bearer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer_token(&parts.headers).ok_or(ApiError::InvalidToken)?;
        let now = state.commands.clock.now();
        let claims = state.verifier.verify(token, now).map_err(|error| {
            tracing::debug!(reason = %error, "a bearer token was refused");
            ApiError::InvalidToken
        })?;
        Ok(Self(claims))
    }
}

/// The verified claims of the request's bearer token, whose session is live.
///
/// A token outlives its session by up to its lifetime (a logout, a detected reuse, an
/// administrator ending it, a deactivation, a password change); the command side checks the
/// session in the store on every use, so such a token changes nothing (ADR 11).
pub struct Caller(pub Claims);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Bearer(claims) = Bearer::from_request_parts(parts, state).await?;
        let user = UserId::from_uuid(claims.sub);
        let session = SessionId::from_uuid(claims.sid);
        if !state.commands.session_is_live(user, session).await? {
            tracing::debug!("a bearer token of a session no longer live was refused");
            return Err(ApiError::InvalidToken);
        }
        Ok(Self(claims))
    }
}

/// A caller whose token carries the admin role, in a live session. The session's check covers
/// an administrator deactivated since the token was issued: that ends their sessions.
pub struct Admin(pub Claims);

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Bearer(claims) = Bearer::from_request_parts(parts, state).await?;
        if !claims.has_role(Role::Admin.name()) {
            return Err(ApiError::Forbidden);
        }
        let user = UserId::from_uuid(claims.sub);
        let session = SessionId::from_uuid(claims.sid);
        if !state.commands.session_is_live(user, session).await? {
            return Err(ApiError::InvalidToken);
        }
        Ok(Self(claims))
    }
}
