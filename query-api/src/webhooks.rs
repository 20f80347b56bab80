//! Webhook endpoints for administrators (docs/adr/0014): the live endpoints, each folded from
//! its stream in the message store, and the recent attempts to deliver to one, from the read
//! model's `webhook_attempts`, which the delivery in the aggregator keeps.
//!
//! Endpoints are read from the store, not from a view: they are few (an installation has a
//! handful), their streams short, and there is no projection to wait for. The list reads the
//! `webhook` category, which, like every reader of the global order, sees a message only once
//! the transactions older than it have ended (ADR 2); an administrator who must see their own
//! change sends its `X-Position` as `X-Min-Position`, and the answer waits (bounded) until the
//! store's readers see it. How far an endpoint's delivery has got is its consumer's
//! checkpoint, `webhook:<id>` in `projection_checkpoints`.
//!
//! Neither a secret nor a nonce is ever shown: the secret is derived from a nonce with a key
//! only the command API and the aggregator hold, and shown once, by the command API.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use identity::{
    EventDecodeError, WEBHOOK_CATEGORY, WebhookEndpoint, WebhookEvent, WebhookId, WebhookState,
    WebhookStatus, event_version, webhook_stream_name,
};
use message_store::{MessageStore, RecordedMessage, StoreError, StreamName};
use platform::problem::ApiQuery;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::AppState;
use crate::auth::AuthenticatedCaller;
use crate::error::ApiError;
use crate::read_model::AttemptRow;
use crate::routes::{authorize_admin, min_position, page_size};

/// How many messages one store read fetches.
const BATCH: usize = 500;

/// The webhook routes, merged into the query routes (outside the `X-Min-Position` wait: they
/// read the store itself, and the attempts' table, which the users view's position says
/// nothing about).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/webhooks", get(list))
        .route("/webhooks/{id}", get(one))
        .route("/webhooks/{id}/deliveries", get(deliveries))
}

/// Why the endpoints could not be read.
#[derive(Debug, thiserror::Error)]
pub enum EndpointsError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored event no reader of this build understands: a fault, never skipped silently.
    #[error("stored webhook event {position} cannot be read: {source}")]
    Undecodable {
        position: u64,
        #[source]
        source: EventDecodeError,
    },
}

/// A live webhook endpoint.
#[derive(Debug, Serialize, ToSchema)]
pub struct Webhook {
    pub id: Uuid,
    /// Where events are posted.
    pub url: String,
    /// The integration event types it receives.
    pub events: Vec<String>,
    pub description: String,
    /// `enabled`, or `disabled`: the delivery gave up on it after it failed for longer than
    /// `webhooks.disable_after_ms`; nothing is sent until an administrator enables it again
    /// (`POST /webhooks/{id}/enable` on the command API), and then deliveries resume where they
    /// stopped.
    #[schema(pattern = "^(enabled|disabled)$")]
    pub status: &'static str,
    /// Why it was disabled: what the last attempt met. Null while enabled.
    pub disabled_reason: Option<String>,
    /// When it was disabled; null while enabled.
    pub disabled_at: Option<DateTime<Utc>>,
    /// Since when its deliveries had been failing when it was disabled; null while enabled.
    pub failing_since: Option<DateTime<Utc>>,
    pub registered_at: DateTime<Utc>,
    /// The administrator who registered it.
    pub registered_by: Uuid,
    /// When its secret was last rotated; null if never.
    pub secret_rotated_at: Option<DateTime<Utc>>,
    /// How far its delivery has got: the global position of its checkpoint (every event up to
    /// it was delivered, or was not of a type it receives). Null until its delivery first
    /// checkpointed.
    pub delivery_position: Option<u64>,
}

impl Webhook {
    fn of(endpoint: WebhookEndpoint, checkpoint: Option<u64>) -> Self {
        let (status, disabled_reason, disabled_at, failing_since) = match endpoint.status {
            WebhookStatus::Enabled => ("enabled", None, None, None),
            WebhookStatus::Disabled {
                reason,
                failing_since,
                at,
            } => ("disabled", Some(reason), Some(at), Some(failing_since)),
        };
        Self {
            id: *endpoint.id.as_uuid(),
            url: endpoint.url,
            events: endpoint.events,
            description: endpoint.description,
            status,
            disabled_reason,
            disabled_at,
            failing_since,
            registered_at: endpoint.registered_at,
            registered_by: *endpoint.registered_by.as_uuid(),
            secret_rotated_at: endpoint.previous_secret.map(|(_, at)| at),
            delivery_position: checkpoint,
        }
    }
}

/// The live endpoints.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookList {
    /// Oldest registration first.
    items: Vec<Webhook>,
}

/// One attempt to deliver an event to an endpoint.
#[derive(Debug, Serialize, ToSchema)]
pub struct Delivery {
    /// The event's id: its CloudEvents `id` and its `webhook-id` header, the same on every
    /// attempt.
    pub message_id: Uuid,
    pub event_type: String,
    /// The event's global position.
    pub position: u64,
    /// 1 for the event's first attempt, 2 for its first retry, and so on.
    pub attempt: u32,
    pub attempted_at: DateTime<Utc>,
    /// How long the attempt took, connecting included.
    pub latency_ms: u64,
    /// The receiver's answer; null when none came (refused, timed out, or an address the
    /// network policy forbids).
    pub status_code: Option<u16>,
    /// What went wrong, in a few words; null for a delivery.
    pub error: Option<String>,
    /// Whether the receiver took it (a 2xx).
    pub delivered: bool,
}

impl From<AttemptRow> for Delivery {
    fn from(row: AttemptRow) -> Self {
        Self {
            message_id: row.message_id,
            event_type: row.event_type,
            position: row.position,
            attempt: row.attempt,
            attempted_at: row.attempted_at,
            latency_ms: row.latency_ms,
            status_code: row.status_code,
            error: row.error,
            delivered: row.delivered,
        }
    }
}

/// The newest attempts to deliver to an endpoint.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryList {
    /// Newest first.
    items: Vec<Delivery>,
}

/// The read-your-writes header of the endpoints' reads.
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)] // read from the raw headers; here for the document
pub struct StoreMinPositionHeader {
    /// Answer only once the message store's readers see everything up to this global position
    /// (the `X-Position` of a command on an endpoint): waits up to `query.max_wait_ms`, then 503
    /// with Retry-After. Decimal digits, sent once; a position beyond the last one written is a
    /// 400 at once.
    #[param(rename = "X-Min-Position", minimum = 0, nullable = false)]
    x_min_position: Option<u64>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct DeliveriesQuery {
    /// At most this many, from 1 to `query.max_page_size` (100 by default), which is also how
    /// many are listed without it. The delivery keeps the newest `webhooks.attempts_kept` per
    /// endpoint (100 by default).
    limit: Option<String>,
}

/// The live webhook endpoints (not deleted), enabled and disabled, without their secrets
/// (administrators only).
#[utoipa::path(get, path = "/webhooks", tag = "webhooks",
    params(StoreMinPositionHeader),
    responses(
        (status = 200, body = WebhookList),
        (status = 400, description = "a bad X-Min-Position, or one beyond the last position written"),
        (status = 401, description = "no valid bearer token, or the account behind it is no longer active, or the session it was issued in has ended or expired"),
        (status = 403, description = "not an administrator"),
        (status = 503, description = "the message store or the read model is unreachable, or its readers did not reach X-Min-Position in time"),
    ),
    security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    caller: AuthenticatedCaller,
    headers: HeaderMap,
) -> Result<Json<WebhookList>, ApiError> {
    authorize_admin(&state, &caller).await?;
    wait_until_readable(&state, &headers).await?;
    let endpoints = live_endpoints(state.store.as_ref()).await?;
    let checkpoints = state.read_model.webhook_checkpoints().await?;
    let mut items: Vec<Webhook> = endpoints
        .into_iter()
        .map(|endpoint| {
            let checkpoint = checkpoints.get(endpoint.id.as_uuid()).copied();
            Webhook::of(endpoint, checkpoint)
        })
        .collect();
    items.sort_by_key(|webhook| (webhook.registered_at, webhook.id));
    Ok(Json(WebhookList { items }))
}

/// One live webhook endpoint, without its secret (administrators only).
#[utoipa::path(get, path = "/webhooks/{id}", tag = "webhooks",
    params(("id" = Uuid, Path, description = "The endpoint"), StoreMinPositionHeader),
    responses(
        (status = 200, body = Webhook),
        (status = 400, description = "a bad X-Min-Position, or one beyond the last position written"),
        (status = 401, description = "no valid bearer token, or the account behind it is no longer active, or the session it was issued in has ended or expired"),
        (status = 403, description = "not an administrator"),
        (status = 404, description = "no such endpoint, or it was deleted"),
        (status = 503, description = "the message store or the read model is unreachable, or its readers did not reach X-Min-Position in time"),
    ),
    security(("bearer" = [])))]
pub async fn one(
    State(state): State<AppState>,
    caller: AuthenticatedCaller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Webhook>, ApiError> {
    authorize_admin(&state, &caller).await?;
    wait_until_readable(&state, &headers).await?;
    let endpoint = live_endpoint(&state, &id).await?;
    let checkpoints = state.read_model.webhook_checkpoints().await?;
    let checkpoint = checkpoints.get(endpoint.id.as_uuid()).copied();
    Ok(Json(Webhook::of(endpoint, checkpoint)))
}

/// The newest attempts to deliver events to a live endpoint, newest first, with each one's
/// answer and latency (administrators only). As the delivery recorded them: an attempt in
/// flight is listed once it is over.
#[utoipa::path(get, path = "/webhooks/{id}/deliveries", tag = "webhooks",
    params(("id" = Uuid, Path, description = "The endpoint"), DeliveriesQuery),
    responses(
        (status = 200, body = DeliveryList),
        (status = 400, description = "an unknown query parameter"),
        (status = 401, description = "no valid bearer token, or the account behind it is no longer active, or the session it was issued in has ended or expired"),
        (status = 403, description = "not an administrator"),
        (status = 404, description = "no such endpoint, or it was deleted"),
        (status = 422, description = "a bad limit"),
        (status = 503, description = "the message store or the read model is unreachable"),
    ),
    security(("bearer" = [])))]
pub async fn deliveries(
    State(state): State<AppState>,
    caller: AuthenticatedCaller,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<DeliveriesQuery>,
) -> Result<Json<DeliveryList>, ApiError> {
    authorize_admin(&state, &caller).await?;
    let limit = page_size(query.limit.as_deref(), state.settings.max_page_size, &state)?;
    let endpoint = live_endpoint(&state, &id).await?;
    let attempts = state
        .read_model
        .webhook_attempts(*endpoint.id.as_uuid(), limit)
        .await?;
    Ok(Json(DeliveryList {
        items: attempts.into_iter().map(Delivery::from).collect(),
    }))
}

/// Waits, up to `query.max_wait_ms`, until the store's readers see the position
/// `X-Min-Position` names, if the request names one. A position nobody wrote is refused at
/// once rather than waited for.
async fn wait_until_readable(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(wanted) = min_position(headers)? else {
        return Ok(());
    };
    if state.store.head_position().await? >= wanted {
        return Ok(());
    }
    if wanted > state.store.last_position().await? {
        return Err(ApiError::UnknownPosition(wanted));
    }
    let deadline = Instant::now() + Duration::from_millis(state.settings.max_wait_ms);
    let mut pause = Duration::from_millis(1);
    loop {
        tokio::time::sleep(pause).await;
        if state.store.head_position().await? >= wanted {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(ApiError::StoreNotYetReadable(wanted));
        }
        pause = (pause * 2).min(Duration::from_millis(25));
    }
}

/// The live endpoint a path's id names, from its stream; a 404 for an id that is not a UUID,
/// an unknown endpoint and a deleted one alike.
async fn live_endpoint(state: &AppState, id: &str) -> Result<WebhookEndpoint, ApiError> {
    let id = WebhookId::from_uuid(Uuid::parse_str(id).map_err(|_| ApiError::NoSuchWebhook)?);
    let stream =
        StreamName::parse(webhook_stream_name(id)).map_err(|error| StoreError::Corrupt {
            id: id.to_string(),
            reason: error.to_string(),
        })?;
    let mut messages = Vec::new();
    loop {
        let from = messages
            .last()
            .map_or(0, |last: &RecordedMessage| last.position + 1);
        let batch = state.store.read_stream(&stream, from, BATCH).await?;
        let done = batch.len() < BATCH;
        messages.extend(batch);
        if done {
            break;
        }
    }
    let events = messages.iter().map(decode).collect::<Result<Vec<_>, _>>()?;
    match WebhookState::fold(&events) {
        WebhookState::Live(endpoint) => Ok(endpoint),
        WebhookState::Unregistered | WebhookState::Deleted => Err(ApiError::NoSuchWebhook),
    }
}

/// Every live endpoint, folded from the `webhook` category.
async fn live_endpoints(store: &dyn MessageStore) -> Result<Vec<WebhookEndpoint>, EndpointsError> {
    let mut streams: BTreeMap<String, Vec<WebhookEvent>> = BTreeMap::new();
    let mut after = 0;
    loop {
        let batch = store.read_category(WEBHOOK_CATEGORY, after, BATCH).await?;
        for message in &batch {
            after = message.global_position;
            streams
                .entry(message.stream.as_str().to_owned())
                .or_default()
                .push(decode(message)?);
        }
        if batch.len() < BATCH {
            break;
        }
    }
    Ok(streams
        .values()
        .filter_map(|events| WebhookState::fold(events).live().cloned())
        .collect())
}

fn decode(message: &RecordedMessage) -> Result<WebhookEvent, EndpointsError> {
    event_version(&message.metadata)
        .and_then(|version| {
            WebhookEvent::from_stored(&message.message_type, version, &message.data)
        })
        .map_err(|source| EndpointsError::Undecodable {
            position: message.global_position,
            source,
        })
}
