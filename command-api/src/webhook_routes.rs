//! The HTTP surface of webhook endpoints (docs/adr/0014), for administrators: registering one,
//! rotating its secret, enabling one the delivery disabled, deleting one. The commands are in
//! `webhooks.rs`; listing endpoints and their deliveries is the query API's.
//!
//! A secret is in two answers only, a registration's and a rotation's, each marked
//! `Cache-Control: no-store`; the service keeps no copy to show again.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use chrono::{DateTime, Utc};
use identity::{UserId, WebhookId};
use integration::EventType;
use platform::ApiJson;
use serde::{Deserialize, Serialize};
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Schema, Type};
use utoipa::openapi::{Ref, RefOr, Response as DocumentedResponse};
use utoipa::{IntoResponses, PartialSchema, ToSchema};
use uuid::Uuid;

use crate::error::ApiError;
use crate::routes::{
    Admin, AppState, BodyRefusals, ProblemBody, StoreOutOfReach, problem_responses, with_position,
};
use crate::webhooks::{Registration, WebhookError};

/// The webhook routes, merged into the command routes.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/webhooks", post(register_webhook))
        .route("/webhooks/{id}", delete(delete_webhook))
        .route("/webhooks/{id}/rotate-secret", post(rotate_webhook_secret))
        .route("/webhooks/{id}/enable", post(enable_webhook))
}

/// `POST /webhooks`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookRegistration {
    /// Where events are posted: an absolute `http` or `https` URL with a host, without a user
    /// name, a password or a fragment. Its host must resolve, within two seconds, to public
    /// addresses only: private, loopback, link-local and other internal networks are refused
    /// unless `webhooks.allowed_networks` names them.
    #[schema(max_length = 2000, example = "https://hooks.example.com/identity")]
    url: String,
    /// The integration event types to receive: at least one, each once, each published by this
    /// deployment (`identity.user.logged_in.v1` only where `integration.events` names it).
    #[schema(schema_with = event_type_list)]
    events: Vec<String>,
    /// A note for administrators, at most 500 characters.
    #[serde(default)]
    #[schema(max_length = 500)]
    description: Option<String>,
    /// Chosen by the client, so that a retried request registers no second endpoint: a
    /// registration with the id of an endpoint that exists or existed is a 409, whatever its
    /// body. The server picks one otherwise.
    #[serde(default)]
    id: Option<Uuid>,
}

/// The `events` of a registration: at least one type, each once.
fn event_type_list() -> ArrayBuilder {
    ArrayBuilder::new()
        .items(Ref::from_schema_name(EventTypeName::name()))
        .min_items(Some(1))
        .unique_items(true)
        .description(Some(
            "The integration event types to receive: at least one, each once, each published by \
             this deployment (`identity.user.logged_in.v1` only where `integration.events` names \
             it)",
        ))
}

/// The name of an integration event type, as `docs/integration-events.schema.json` lists them.
pub struct EventTypeName;

impl PartialSchema for EventTypeName {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(EventType::ALL.map(EventType::name)))
            .into()
    }
}

impl ToSchema for EventTypeName {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("EventTypeName")
    }
}

/// A registered endpoint, with its signing secret.
#[derive(Serialize, ToSchema)]
pub struct RegisteredWebhook {
    id: Uuid,
    /// The URL as it will be posted to (normalised: a path of `/` when it had none).
    url: String,
    events: Vec<String>,
    description: String,
    /// Always `enabled`: deliveries start with the next event of a subscribed type.
    status: &'static str,
    registered_at: DateTime<Utc>,
    /// `whsec_` and the secret in base64, as Standard Webhooks libraries take it: shown this
    /// once. The service keeps no copy; a lost secret is replaced by rotating it.
    secret: String,
    /// The global position of the registration.
    position: u64,
}

impl fmt::Debug for RegisteredWebhook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegisteredWebhook")
            .field("id", &self.id)
            .field("secret", &"[redacted]")
            .field("position", &self.position)
            .finish_non_exhaustive()
    }
}

/// A new signing secret.
#[derive(Serialize, ToSchema)]
pub struct RotatedWebhookSecret {
    id: Uuid,
    /// The new secret, shown this once: deliveries are signed with it from now on.
    secret: String,
    /// Until then deliveries carry a signature with the previous secret too
    /// (`webhooks.previous_secret_ms` after the rotation), so that a receiver can switch
    /// without refusing a delivery.
    previous_secret_expires_at: DateTime<Utc>,
    /// The global position of the rotation.
    position: u64,
}

impl fmt::Debug for RotatedWebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RotatedWebhookSecret")
            .field("id", &self.id)
            .field("secret", &"[redacted]")
            .field("position", &self.position)
            .finish_non_exhaustive()
    }
}

/// A command on an endpoint: the endpoint and the global position of its last event.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookCommandResult {
    id: Uuid,
    position: u64,
}

/// The answers of a webhook route to a caller who may not use it, for the document.
struct WebhookAdminRefusals;

impl IntoResponses for WebhookAdminRefusals {
    fn responses() -> BTreeMap<String, RefOr<DocumentedResponse>> {
        problem_responses([
            (
                "401",
                "`invalid_token`: no or an invalid bearer token, its session no longer live, or an administrator deactivated since it was issued",
            ),
            ("403", "The token lacks the admin role"),
        ])
    }
}

/// The 404 of a route on one endpoint, for the document.
struct NoSuchWebhook;

impl IntoResponses for NoSuchWebhook {
    fn responses() -> BTreeMap<String, RefOr<DocumentedResponse>> {
        problem_responses([("404", "No such webhook endpoint, or it was deleted")])
    }
}

#[utoipa::path(post, path = "/webhooks", request_body = WebhookRegistration, tag = "webhooks",
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Registered and enabled. The body holds the signing secret, shown this once", body = RegisteredWebhook,
            headers(("Location" = String, description = "/webhooks/{id}"), ("Cache-Control" = String, description = "no-store"), ("X-Position" = u64, description = "global position of the registration"))),
        (status = 409, description = "`webhook_exists`: an endpoint with this id exists or existed (a retry whose first answer was lost: rotate its secret to get one)", body = ProblemBody, content_type = "application/problem+json"),
        (status = 422, description = "A URL that is malformed, too long, carries credentials or a fragment, does not resolve, or reaches a network webhooks may not; event types that are missing, unknown, not published or named twice; a description that is too long; or unknown fields. Each error names its field", body = ProblemBody, content_type = "application/problem+json"),
        WebhookAdminRefusals,
        BodyRefusals,
        StoreOutOfReach,
    ))]
pub(crate) async fn register_webhook(
    State(state): State<AppState>,
    Admin(admin): Admin,
    ApiJson(request): ApiJson<WebhookRegistration>,
) -> Result<Response, ApiError> {
    let registration = Registration {
        url: request.url,
        events: request.events,
        description: request.description,
        id: request.id,
    };
    let registered = state
        .webhooks
        .register(UserId::from_uuid(admin.sub), registration)
        .await?;
    let endpoint = registered.endpoint;
    let body = RegisteredWebhook {
        id: *endpoint.id.as_uuid(),
        url: endpoint.url,
        events: endpoint.events,
        description: endpoint.description,
        status: "enabled",
        registered_at: endpoint.registered_at,
        secret: registered.secret.text().expose_secret().clone(),
        position: registered.position,
    };
    let mut response = (StatusCode::CREATED, ApiJson(body)).into_response();
    let headers = response.headers_mut();
    if let Ok(location) = HeaderValue::from_str(&format!("/webhooks/{}", endpoint.id)) {
        headers.insert(header::LOCATION, location);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(with_position(response, registered.position))
}

#[utoipa::path(post, path = "/webhooks/{id}/rotate-secret", tag = "webhooks",
    params(("id" = Uuid, Path, description = "The endpoint")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A new signing secret, shown this once. The previous one keeps signing beside it until `previous_secret_expires_at`", body = RotatedWebhookSecret,
            headers(("Cache-Control" = String, description = "no-store"), ("X-Position" = u64, description = "global position of the rotation"))),
        NoSuchWebhook,
        WebhookAdminRefusals,
        StoreOutOfReach,
    ))]
pub(crate) async fn rotate_webhook_secret(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let rotated = state
        .webhooks
        .rotate_secret(parse_id(&id)?, UserId::from_uuid(admin.sub))
        .await?;
    let body = RotatedWebhookSecret {
        id: *rotated.id.as_uuid(),
        secret: rotated.secret.text().expose_secret().clone(),
        previous_secret_expires_at: rotated.previous_secret_expires_at,
        position: rotated.position,
    };
    let mut response = ApiJson(body).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(with_position(response, rotated.position))
}

#[utoipa::path(post, path = "/webhooks/{id}/enable", tag = "webhooks",
    params(("id" = Uuid, Path, description = "The endpoint")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Enabled: deliveries resume from where they stopped. Enabling an enabled endpoint changes nothing and answers its current position", body = WebhookCommandResult,
            headers(("X-Position" = u64, description = "global position of the endpoint's last event"))),
        NoSuchWebhook,
        WebhookAdminRefusals,
        StoreOutOfReach,
    ))]
pub(crate) async fn enable_webhook(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let done = state
        .webhooks
        .enable(parse_id(&id)?, UserId::from_uuid(admin.sub))
        .await?;
    let body = WebhookCommandResult {
        id: *done.id.as_uuid(),
        position: done.position,
    };
    Ok(with_position(ApiJson(body).into_response(), done.position))
}

#[utoipa::path(delete, path = "/webhooks/{id}", tag = "webhooks",
    params(("id" = Uuid, Path, description = "The endpoint")),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Deleted: nothing is sent to it again, and its id is never registered again",
            headers(("X-Position" = u64, description = "global position of the deletion"))),
        NoSuchWebhook,
        WebhookAdminRefusals,
        StoreOutOfReach,
    ))]
pub(crate) async fn delete_webhook(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let done = state
        .webhooks
        .delete(parse_id(&id)?, UserId::from_uuid(admin.sub))
        .await?;
    Ok(with_position(
        StatusCode::NO_CONTENT.into_response(),
        done.position,
    ))
}

/// A path id that is not a UUID names no endpoint.
fn parse_id(id: &str) -> Result<WebhookId, ApiError> {
    let id = id.parse::<Uuid>().map_err(|_| WebhookError::NotFound)?;
    Ok(WebhookId::from_uuid(id))
}
