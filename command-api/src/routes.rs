//! The HTTP surface: handlers, the bearer-token check and the OpenAPI document.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use identity::{Role, UserId};
use platform::ApiJson;
use platform::http::{bearer_token, jwks_response, readiness};
use platform::openapi::BearerAuth;
use serde::{Deserialize, Serialize};
use tokens::{Claims, TokenVerifier};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{IntoResponses, OpenApi, ToSchema};
use uuid::Uuid;

use crate::error::ApiError;
use crate::service::{CommandError, Commands, Done};

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub commands: Arc<Commands>,
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

/// A command's result: the account and the global position of its last event.
#[derive(Debug, Serialize, ToSchema)]
pub struct CommandResult {
    id: Uuid,
    position: u64,
}

/// An OAuth 2 style token response.
#[derive(Serialize, ToSchema)]
pub struct TokenResponse {
    access_token: String,
    /// Always `Bearer`.
    token_type: &'static str,
    /// Seconds until the token expires.
    expires_in: u64,
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
struct BodyRefusals;

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
                "`invalid_token`: no or an invalid bearer token, or an administrator deactivated since it was issued",
            ),
            ("403", "The token lacks the admin role"),
            ("404", "No such account"),
        ])
    }
}

/// The 503 of a command the message store was out of reach for, for the document.
struct StoreOutOfReach;

impl IntoResponses for StoreOutOfReach {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::Response>> {
        problem_responses([(
            "503",
            "The message store is out of reach; retry after `Retry-After`",
        )])
    }
}

/// Problem answers as the document describes them: a `ProblemBody` each, by status.
fn problem_responses<const N: usize>(
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

/// The X-Position header: the global position of the command's last event.
fn command_response(status: StatusCode, done: Done, extra: HeaderMap) -> Response {
    let mut response = (
        status,
        ApiJson(CommandResult {
            id: *done.id.as_uuid(),
            position: done.position,
        }),
    )
        .into_response();
    response.headers_mut().extend(extra);
    response
        .headers_mut()
        .insert("x-position", HeaderValue::from(done.position));
    response
}

#[utoipa::path(post, path = "/users", request_body = RegisterRequest,
    responses(
        (status = 201, description = "Registered (or the same request repeated with the same id)", body = CommandResult,
            headers(("Location" = String, description = "/users/{id}"), ("X-Position" = u64, description = "global position of the last event"))),
        (status = 409, description = "`email_taken`, or `id_taken` (the id is registered with another email)", body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "Invalid email or password, or unknown fields", body = ProblemBody, content_type = "application/problem+json"),
        (status = 429, description = "Too many password hashes waiting", body = ProblemBody, content_type = "application/problem+json"),
        BodyRefusals,
        StoreOutOfReach,
    ))]
async fn register(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<RegisterRequest>,
) -> Result<Response, ApiError> {
    let commands = &state.commands;
    let done = commands
        .register(
            &request.email,
            request.password,
            request.id,
            vec![Role::User],
            commands.initial_status,
        )
        .await?;
    let mut headers = HeaderMap::new();
    if let Ok(location) = HeaderValue::from_str(&format!("/users/{}", done.id)) {
        headers.insert(header::LOCATION, location);
    }
    Ok(command_response(StatusCode::CREATED, done, headers))
}

#[utoipa::path(post, path = "/login", request_body = LoginRequest,
    responses(
        (status = 200, description = "A signed access token", body = TokenResponse,
            headers(("Cache-Control" = String, description = "no-store"), ("X-Position" = u64, description = "global position of the login event"))),
        (status = 401, description = "`invalid_credentials`, one body for every failure: unknown email, wrong password, inactive or locked account", body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "Unknown or missing fields", body = ProblemBody, content_type = "application/problem+json"),
        (status = 429, description = "`throttled`: too many password checks waiting; see Retry-After. Answered like a refusal, for a known and an unknown email alike", body = ProblemBody, content_type = "application/problem+json"),
        (status = 503, description = "The message store is out of reach; retry after `Retry-After`. Answered like a refusal, for a known and an unknown email alike", body = ProblemBody, content_type = "application/problem+json"),
        BodyRefusals,
    ))]
async fn login(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<LoginRequest>,
) -> Result<Response, ApiError> {
    let logged_in = state
        .commands
        .login(&request.email, request.password)
        .await?;
    let token = logged_in.token;
    let mut response = ApiJson(TokenResponse {
        access_token: token.token.expose_secret().clone(),
        token_type: "Bearer",
        expires_in: token.expires_in,
    })
    .into_response();
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert("x-position", HeaderValue::from(logged_in.position));
    Ok(response)
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
        (status = 200, description = "Changed", body = CommandResult,
            headers(("X-Position" = u64, description = "global position of the PasswordChanged event"))),
        (status = 401, description = "`invalid_token`, or `invalid_credentials` when the current password is wrong (counted as a failed login) or the account is locked", body = ProblemBody, content_type = "application/problem+json"),
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
        (status = 200, description = "The message store answers"),
        (status = 503, description = "The message store does not answer", body = ProblemBody, content_type = "application/problem+json"),
    ))]
async fn readyz(State(state): State<AppState>) -> Response {
    readiness([("message store", state.commands.store.ping().await)])
}

#[utoipa::path(get, path = "/openapi.json", responses((status = 200, description = "This document")))]
async fn openapi() -> Response {
    ApiJson(ApiDoc::openapi()).into_response()
}

/// The OpenAPI document, generated from the handlers' annotations.
#[derive(OpenApi)]
#[openapi(
    info(title = "identity command API", description = "Registration, login, activation and password change."),
    paths(register, login, activate, deactivate, change_password, jwks, readyz, openapi),
    components(schemas(RegisterRequest, LoginRequest, ChangePasswordRequest, CommandResult, TokenResponse, ProblemBody, FieldErrorBody)),
    modifiers(&BearerAuth),
)]
pub struct ApiDoc;

/// A path id that is not a UUID names no account.
fn parse_id(id: &str) -> Result<UserId, ApiError> {
    let id = id.parse::<Uuid>().map_err(|_| CommandError::NotFound)?;
    Ok(UserId::from_uuid(id))
}

/// The verified claims of the request's bearer token.
pub struct Caller(pub Claims);

impl FromRequestParts<AppState> for Caller {
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

/// A caller whose token carries the admin role.
pub struct Admin(pub Claims);

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Caller(claims) = Caller::from_request_parts(parts, state).await?;
        if !claims.has_role(Role::Admin.name()) {
            return Err(ApiError::Forbidden);
        }
        // A token outlives a deactivation by up to its lifetime; an administrator deactivated
        // meanwhile must not act on its strength.
        if !state
            .commands
            .is_active(UserId::from_uuid(claims.sub))
            .await?
        {
            return Err(ApiError::InvalidToken);
        }
        Ok(Self(claims))
    }
}
