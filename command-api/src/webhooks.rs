//! Webhook endpoints (docs/adr/0014), without HTTP: an administrator registers one, rotates its
//! signing secret, enables one the delivery disabled, or deletes one.
//!
//! An endpoint is its stream, `webhook-<id>`; each command reads it, lets the domain
//! (`identity::decide_webhook`) decide, and appends at the version it read, so of two commands
//! on one endpoint at once the second decides again on what the first did (a rotation racing a
//! deletion finds the endpoint gone).
//!
//! The signing secret is never stored (DESIGN decision 15): the registration and each rotation
//! keep a random nonce, and the secret is the HMAC of the endpoint's id and that nonce under
//! `webhooks.secret_key`, which the aggregator holds too and signs with. It is derived here
//! once, for the answer that shows it; nothing else ever shows it again, so a copy of the
//! database forges no delivery, and whoever lost the answer rotates the secret to get another.
//!
//! What an endpoint may point at is checked here, before anything is appended: the URL parsed
//! (`integration::EndpointUrl`), its host resolved within [`RESOLVE_WITHIN`] and every address
//! checked against `webhooks.allowed_networks` (`integration::NetworkPolicy`), so an
//! administrator's token cannot aim deliveries at the service's own network. The delivery checks
//! the addresses again at every connection, as a name may later resolve elsewhere.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, TimeDelta, Utc};
use identity::{
    UserId, WebhookCommand, WebhookEndpoint, WebhookEvent, WebhookId, WebhookNonce, WebhookRefusal,
    WebhookState, decide_webhook, event_version, evolve_webhook, webhook_stream_name,
};
use integration::{
    EndpointUrl, EventType, IntegrationSettings, NetworkPolicy, Published, UrlRefusal,
    WebhookSettings,
};
use message_store::{
    AppendError, GlobalPosition, MessageStore, StoreError, StreamAppend, StreamName, StreamPosition,
};
use platform::FieldError;
use platform::clock::Clock;
use tokens::{WebhookSecret, WebhookSecretKey, random_nonce};
use uuid::Uuid;

use crate::service::{CommandError, MAX_ATTEMPTS, append_failed, expected, versioned_message};

/// The longest an endpoint's description may be, in characters: a note for administrators.
pub const MAX_DESCRIPTION_CHARS: usize = 500;

/// How long resolving an endpoint's host may take at registration. A name that does not
/// resolve by then is refused as unresolvable: the administrator learns at once, and a request
/// holds no connection for the resolver's own timeouts.
pub const RESOLVE_WITHIN: Duration = Duration::from_secs(2);

/// Why a command on an endpoint was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// Fields of the registration that are not acceptable, each with why, all at once.
    #[error("some fields are not acceptable")]
    Validation(Vec<FieldError>),
    /// A registration named the id of an endpoint that exists or existed. Refused whatever its
    /// body, so that no request shows an existing endpoint's secret again.
    #[error("an endpoint with this id exists or existed")]
    Exists,
    /// No endpoint has this id, or it was deleted.
    #[error("no such webhook endpoint")]
    NotFound,
    /// The message store is out of reach: nothing was decided, and the same command may well
    /// succeed shortly.
    #[error("the message store is out of reach")]
    StoreUnavailable(#[source] anyhow::Error),
    /// A fault of the service or of its data; the cause is for the log.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<CommandError> for WebhookError {
    /// The store's failures, as the account commands tell an outage from a fault.
    fn from(error: CommandError) -> Self {
        match error {
            CommandError::StoreUnavailable(error) => Self::StoreUnavailable(error),
            CommandError::Internal(error) => Self::Internal(error),
            other => Self::Internal(anyhow::Error::new(other)),
        }
    }
}

impl From<StoreError> for WebhookError {
    fn from(error: StoreError) -> Self {
        CommandError::from(error).into()
    }
}

impl From<WebhookRefusal> for WebhookError {
    fn from(refusal: WebhookRefusal) -> Self {
        match refusal {
            WebhookRefusal::AlreadyRegistered => Self::Exists,
            WebhookRefusal::NotFound => Self::NotFound,
        }
    }
}

/// A registration as an administrator asked for it, not yet checked.
#[derive(Debug, Clone)]
pub struct Registration {
    pub url: String,
    pub events: Vec<String>,
    pub description: Option<String>,
    /// Chosen by the client, so that a retried request registers no second endpoint.
    pub id: Option<Uuid>,
}

/// A registered endpoint, with its secret: the one time it is shown.
#[derive(Debug)]
pub struct Registered {
    pub endpoint: WebhookEndpoint,
    pub secret: WebhookSecret,
    pub position: GlobalPosition,
}

/// A rotated secret: the new one, shown this once, and until when the previous one still
/// signs beside it.
#[derive(Debug)]
pub struct Rotated {
    pub id: WebhookId,
    pub secret: WebhookSecret,
    pub previous_secret_expires_at: DateTime<Utc>,
    pub position: GlobalPosition,
}

/// A command on an endpoint carried out: the position of the endpoint's last event (the one
/// appended, or, for a command that changed nothing, the one it already had).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WebhookDone {
    pub id: WebhookId,
    pub position: GlobalPosition,
}

/// The webhook commands, with what they need; shared by every request.
pub struct Webhooks {
    store: Arc<dyn MessageStore>,
    clock: Arc<dyn Clock>,
    key: WebhookSecretKey,
    policy: NetworkPolicy,
    published: Published,
    /// How long after a rotation the previous secret still signs (`webhooks.previous_secret_ms`;
    /// the delivery signs with both meanwhile).
    previous_secret_for: Duration,
}

/// An endpoint's stream folded, with where it ends.
struct Loaded {
    stream: StreamName,
    state: WebhookState,
    version: Option<StreamPosition>,
    last_global: GlobalPosition,
}

/// A command carried out: the endpoint after it, the position answered, and the instant it
/// was decided at.
struct Executed {
    state: WebhookState,
    position: GlobalPosition,
    at: DateTime<Utc>,
}

impl Webhooks {
    /// The commands over `store`, with the key, the networks and the published types the
    /// settings name. Refuses settings it cannot use: no secret key, a network that is not
    /// CIDR, an event type that does not exist.
    pub fn new(
        store: Arc<dyn MessageStore>,
        clock: Arc<dyn Clock>,
        webhooks: &WebhookSettings,
        integration: &IntegrationSettings,
    ) -> anyhow::Result<Self> {
        let key = WebhookSecretKey::configured(
            webhooks.secret_key.as_deref(),
            webhooks.secret_key_file.as_deref(),
            webhooks.create_key_if_missing,
        )
        .context("loading the webhook secret key")?;
        let policy = webhooks
            .network_policy()
            .context("reading webhooks.allowed_networks (CIDR networks, say 10.2.0.0/16)")?;
        let published = integration
            .published()
            .context("reading integration.events")?;
        Ok(Self {
            store,
            clock,
            key,
            policy,
            published,
            previous_secret_for: webhooks.previous_secret_for(),
        })
    }

    /// Registers an endpoint; its secret, derived from the registration's nonce, is in the
    /// answer and nowhere else.
    ///
    /// Refused with [`WebhookError::Validation`] for a URL, event types or a description that
    /// are not acceptable (nothing is appended), and [`WebhookError::Exists`] when the id is
    /// an endpoint's already, or was.
    pub async fn register(
        &self,
        by: UserId,
        registration: Registration,
    ) -> Result<Registered, WebhookError> {
        let checked = self.check(registration).await?;
        let secret_nonce = new_nonce()?;
        let id = checked.id;
        let command = WebhookCommand::Register {
            id,
            url: checked.url.as_str().to_owned(),
            events: checked.events,
            description: checked.description,
            secret_nonce,
            by,
        };
        let executed = self.execute(id, &command).await?;
        let Some(endpoint) = executed.state.live().cloned() else {
            return Err(
                anyhow::anyhow!("a registered webhook endpoint folded to no endpoint").into(),
            );
        };
        Ok(Registered {
            secret: self.secret(id, &secret_nonce)?,
            endpoint,
            position: executed.position,
        })
    }

    /// Gives the endpoint a new secret, shown in the answer only. The previous one keeps
    /// signing beside it for `webhooks.previous_secret_ms`, so that receivers can switch
    /// without losing a delivery.
    pub async fn rotate_secret(&self, id: WebhookId, by: UserId) -> Result<Rotated, WebhookError> {
        let secret_nonce = new_nonce()?;
        let command = WebhookCommand::RotateSecret { secret_nonce, by };
        let executed = self.execute(id, &command).await?;
        let grace = TimeDelta::from_std(self.previous_secret_for).unwrap_or(TimeDelta::MAX);
        Ok(Rotated {
            id,
            secret: self.secret(id, &secret_nonce)?,
            previous_secret_expires_at: executed
                .at
                .checked_add_signed(grace)
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
            position: executed.position,
        })
    }

    /// Enables an endpoint the delivery disabled; deliveries resume where they stopped. An
    /// enabled one stays as it is.
    pub async fn enable(&self, id: WebhookId, by: UserId) -> Result<WebhookDone, WebhookError> {
        let executed = self.execute(id, &WebhookCommand::Enable { by }).await?;
        Ok(WebhookDone {
            id,
            position: executed.position,
        })
    }

    /// Deletes an endpoint: nothing is sent to it again, and its id is never registered again.
    pub async fn delete(&self, id: WebhookId, by: UserId) -> Result<WebhookDone, WebhookError> {
        let executed = self.execute(id, &WebhookCommand::Delete { by }).await?;
        Ok(WebhookDone {
            id,
            position: executed.position,
        })
    }

    /// The secret endpoint `id` signs with for `nonce`.
    fn secret(&self, id: WebhookId, nonce: &WebhookNonce) -> Result<WebhookSecret, WebhookError> {
        WebhookSecret::derive(&self.key, *id.as_uuid(), nonce.as_bytes())
            .context("deriving a webhook secret")
            .map_err(WebhookError::Internal)
    }

    /// The registration's fields, or what is wrong with each, all at once. The URL's host is
    /// resolved only once the URL parses, and within [`RESOLVE_WITHIN`].
    async fn check(&self, registration: Registration) -> Result<Checked, WebhookError> {
        let mut errors = Vec::new();
        let url = EndpointUrl::parse(&registration.url)
            .map_err(|refusal| errors.push(FieldError::new("url", refusal)))
            .ok();
        let events = self.events(&registration.events).map_err(|problem| {
            errors.push(FieldError::new("events", problem));
        });
        let description = registration.description.unwrap_or_default();
        if description.chars().count() > MAX_DESCRIPTION_CHARS {
            errors.push(FieldError::new(
                "description",
                format!("is longer than {MAX_DESCRIPTION_CHARS} characters"),
            ));
        }
        if let Some(url) = &url
            && let Err(refusal) = self.reachable(url).await
        {
            errors.push(FieldError::new("url", refusal));
        }
        match (url, events) {
            (Some(url), Ok(events)) if errors.is_empty() => Ok(Checked {
                id: WebhookId::from_uuid(registration.id.unwrap_or_else(Uuid::now_v7)),
                url,
                events,
                description,
            }),
            _ => Err(WebhookError::Validation(errors)),
        }
    }

    /// Whether deliveries may reach `url`: every address its host resolves to is in a network
    /// they may reach, and it resolves in time.
    async fn reachable(&self, url: &EndpointUrl) -> Result<(), UrlRefusal> {
        match tokio::time::timeout(RESOLVE_WITHIN, self.policy.resolve(url)).await {
            Ok(resolved) => resolved.map(|_| ()),
            Err(_) => Err(UrlRefusal::Unresolvable { host: url.host() }),
        }
    }

    /// The event types an endpoint subscribes to: at least one, each once, each a type this
    /// deployment publishes (`integration.events`).
    fn events(&self, names: &[String]) -> Result<Vec<String>, String> {
        if names.is_empty() {
            return Err("must name at least one event type".into());
        }
        let mut seen = BTreeSet::new();
        let mut problems = Vec::new();
        for name in names {
            match name.parse::<EventType>() {
                Err(unknown) => problems.push(unknown.to_string()),
                Ok(kind) if !self.published.contains(kind) => problems.push(format!(
                    "{name} is not published by this deployment (integration.events); the \
                     published types are {}",
                    self.published
                        .iter()
                        .map(EventType::name)
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
                Ok(_) if !seen.insert(name.as_str()) => {
                    problems.push(format!("{name} is named more than once"));
                }
                Ok(_) => {}
            }
        }
        if problems.is_empty() {
            Ok(names.to_vec())
        } else {
            Err(problems.join("; "))
        }
    }

    /// Read, decide, append at the version read; again when another command on the endpoint
    /// got there first. A command that decides nothing (enabling an enabled endpoint) answers
    /// the position of the endpoint's last event.
    async fn execute(
        &self,
        id: WebhookId,
        command: &WebhookCommand,
    ) -> Result<Executed, WebhookError> {
        for _ in 0..MAX_ATTEMPTS {
            let loaded = self.load(id).await?;
            let at = self.clock.now();
            let events = decide_webhook(&loaded.state, command.clone(), at)?;
            if events.is_empty() {
                return Ok(Executed {
                    state: loaded.state,
                    position: loaded.last_global,
                    at,
                });
            }
            let messages = events
                .iter()
                .map(|event| {
                    versioned_message(event.event_type(), event.to_json(), event.version())
                })
                .collect();
            let append = StreamAppend::new(loaded.stream, expected(loaded.version), messages);
            match self.store.append(vec![append]).await {
                Ok(appended) => {
                    return Ok(Executed {
                        state: events.iter().fold(loaded.state, evolve_webhook),
                        position: appended.last_global_position(),
                        at,
                    });
                }
                Err(AppendError::WrongExpectedVersion { .. }) => {}
                Err(error) => {
                    return Err(append_failed(error, "appending to a webhook endpoint").into());
                }
            }
        }
        Err(
            anyhow::anyhow!("a command on a webhook endpoint lost the race {MAX_ATTEMPTS} times")
                .into(),
        )
    }

    /// Folds the endpoint's stream: a handful of events, one per administrator's command and
    /// per disabling.
    async fn load(&self, id: WebhookId) -> Result<Loaded, WebhookError> {
        const BATCH: usize = 100;
        let stream =
            StreamName::parse(webhook_stream_name(id)).context("naming a webhook stream")?;
        let mut events = Vec::new();
        let (mut version, mut last_global) = (None, 0);
        loop {
            let from = version.map_or(0, |read: StreamPosition| read + 1);
            let batch = self.store.read_stream(&stream, from, BATCH).await?;
            for message in &batch {
                let event = event_version(&message.metadata)
                    .and_then(|v| {
                        WebhookEvent::from_stored(&message.message_type, v, &message.data)
                    })
                    .context("reading a webhook endpoint's event")?;
                events.push(event);
                version = Some(message.position);
                last_global = message.global_position;
            }
            if batch.len() < BATCH {
                break;
            }
        }
        Ok(Loaded {
            stream,
            state: WebhookState::fold(&events),
            version,
            last_global,
        })
    }
}

/// A registration whose fields passed every check.
struct Checked {
    id: WebhookId,
    url: EndpointUrl,
    events: Vec<String>,
    description: String,
}

/// A secret's nonce, from the operating system's random source.
fn new_nonce() -> Result<WebhookNonce, WebhookError> {
    let bytes = random_nonce().context("drawing a webhook nonce")?;
    Ok(WebhookNonce::from_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_of_the_domain_is_a_conflict_or_an_unknown_endpoint() {
        assert!(matches!(
            WebhookError::from(WebhookRefusal::AlreadyRegistered),
            WebhookError::Exists
        ));
        assert!(matches!(
            WebhookError::from(WebhookRefusal::NotFound),
            WebhookError::NotFound
        ));
    }

    #[test]
    fn a_store_out_of_reach_stays_an_outage_and_anything_else_a_fault() {
        let unreachable = StoreError::Database(sqlx::Error::PoolTimedOut);
        assert!(matches!(
            WebhookError::from(unreachable),
            WebhookError::StoreUnavailable(_)
        ));
        assert!(matches!(
            WebhookError::from(CommandError::NotFound),
            WebhookError::Internal(_)
        ));
    }
}
