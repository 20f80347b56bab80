//! Webhook endpoints: where an administrator asks for integration events to be posted, and the
//! rules of their life (docs/adr/0014).
//!
//! An endpoint is a stream, `webhook-<id>`: registered, its secret rotated, disabled by the
//! delivery that found it failing for too long, enabled again by an administrator, deleted.
//! Its signing secret is never in an event: each registration and rotation keeps a random
//! nonce, and the secret is derived from it with a key from the configuration.
//!
//! What the endpoint's URL may point at, and which event types exist, are the API's to check:
//! the domain takes the URL and the types as given, and knows neither networks nor the public
//! event contract.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

use crate::events::{
    WebhookDeleted, WebhookDisabled, WebhookEnabled, WebhookEvent, WebhookRegistered,
    WebhookSecretRotated,
};
use crate::values::{UserId, hex_nonce, uuid_id};

/// The category of webhook endpoint streams.
pub const WEBHOOK_CATEGORY: &str = "webhook";

uuid_id! {
    /// The identity of a webhook endpoint, the id part of its stream (`webhook-<id>`).
    WebhookId
}

hex_nonce! {
    /// The random input an endpoint's signing secret is derived from: 32 bytes, stored as 64
    /// lowercase hexadecimal digits. Not a secret on its own (the secret needs the webhook
    /// secret key too), so it may be stored and printed.
    WebhookNonce, InvalidWebhookNonce, "webhook nonce"
}

/// The stream of endpoint `id`.
pub fn webhook_stream_name(id: WebhookId) -> String {
    format!("{WEBHOOK_CATEGORY}-{id}")
}

/// Whether an endpoint is sent to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookStatus {
    Enabled,
    /// Disabled after failing since `failing_since`, at `at`, for `reason`.
    Disabled {
        reason: String,
        failing_since: DateTime<Utc>,
        at: DateTime<Utc>,
    },
}

/// An endpoint as its stream has made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookEndpoint {
    pub id: WebhookId,
    pub url: String,
    pub events: Vec<String>,
    pub description: String,
    pub status: WebhookStatus,
    /// The nonce of the current secret.
    pub secret_nonce: WebhookNonce,
    /// The nonce of the secret before the last rotation, and when it was rotated.
    pub previous_secret: Option<(WebhookNonce, DateTime<Utc>)>,
    pub registered_by: UserId,
    pub registered_at: DateTime<Utc>,
}

impl WebhookEndpoint {
    /// Whether it receives events of `event_type`.
    pub fn subscribes_to(&self, event_type: &str) -> bool {
        self.events
            .iter()
            .any(|subscribed| subscribed == event_type)
    }
}

/// A webhook endpoint's stream, folded.
// Unboxed: a state is made per command or per endpoint read, never kept in bulk.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum WebhookState {
    #[default]
    Unregistered,
    Live(WebhookEndpoint),
    Deleted,
}

impl WebhookState {
    /// The state after `history`, oldest first.
    pub fn fold<'a>(history: impl IntoIterator<Item = &'a WebhookEvent>) -> Self {
        history.into_iter().fold(Self::default(), evolve_webhook)
    }

    pub fn live(&self) -> Option<&WebhookEndpoint> {
        match self {
            Self::Live(endpoint) => Some(endpoint),
            Self::Unregistered | Self::Deleted => None,
        }
    }
}

/// What may be done to an endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookCommand {
    Register {
        id: WebhookId,
        url: String,
        events: Vec<String>,
        description: String,
        secret_nonce: WebhookNonce,
        by: UserId,
    },
    RotateSecret {
        secret_nonce: WebhookNonce,
        by: UserId,
    },
    /// The delivery gives up on it: it has failed since `failing_since`.
    Disable {
        reason: String,
        failing_since: DateTime<Utc>,
    },
    Enable {
        by: UserId,
    },
    Delete {
        by: UserId,
    },
}

/// Why a command on an endpoint was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WebhookRefusal {
    #[error("an endpoint with this id exists or existed")]
    AlreadyRegistered,
    #[error("no such endpoint")]
    NotFound,
}

/// The events that follow from `command` on an endpoint in `state`, at `now`. Disabling a
/// disabled endpoint and enabling an enabled one decide nothing: both are safe to retry.
pub fn decide_webhook(
    state: &WebhookState,
    command: WebhookCommand,
    now: DateTime<Utc>,
) -> Result<Vec<WebhookEvent>, WebhookRefusal> {
    if let WebhookCommand::Register {
        id,
        url,
        events,
        description,
        secret_nonce,
        by,
    } = command
    {
        return match state {
            WebhookState::Unregistered => Ok(vec![
                WebhookRegistered {
                    webhook_id: id,
                    url,
                    events,
                    description,
                    secret_nonce,
                    registered_by: by,
                    at: now,
                }
                .into(),
            ]),
            WebhookState::Live(_) | WebhookState::Deleted => Err(WebhookRefusal::AlreadyRegistered),
        };
    }
    let endpoint = state.live().ok_or(WebhookRefusal::NotFound)?;
    let event: Option<WebhookEvent> = match command {
        WebhookCommand::Register { .. } => None,
        WebhookCommand::RotateSecret { secret_nonce, by } => Some(
            WebhookSecretRotated {
                secret_nonce,
                previous_nonce: endpoint.secret_nonce,
                by,
                at: now,
            }
            .into(),
        ),
        WebhookCommand::Disable {
            reason,
            failing_since,
        } => matches!(endpoint.status, WebhookStatus::Enabled).then(|| {
            WebhookDisabled {
                reason,
                failing_since,
                at: now,
            }
            .into()
        }),
        WebhookCommand::Enable { by } => matches!(endpoint.status, WebhookStatus::Disabled { .. })
            .then(|| WebhookEnabled { by, at: now }.into()),
        WebhookCommand::Delete { by } => Some(WebhookDeleted { by, at: now }.into()),
    };
    Ok(event.into_iter().collect())
}

/// The state after `event`. Records only: every rule is in [`decide_webhook`].
pub fn evolve_webhook(state: WebhookState, event: &WebhookEvent) -> WebhookState {
    match (state, event) {
        (WebhookState::Unregistered, WebhookEvent::WebhookRegistered(e)) => {
            WebhookState::Live(WebhookEndpoint {
                id: e.webhook_id,
                url: e.url.clone(),
                events: e.events.clone(),
                description: e.description.clone(),
                status: WebhookStatus::Enabled,
                secret_nonce: e.secret_nonce,
                previous_secret: None,
                registered_by: e.registered_by,
                registered_at: e.at,
            })
        }
        (WebhookState::Live(mut endpoint), event) => match event {
            WebhookEvent::WebhookRegistered(_) => WebhookState::Live(endpoint),
            WebhookEvent::WebhookSecretRotated(e) => {
                endpoint.previous_secret = Some((e.previous_nonce, e.at));
                endpoint.secret_nonce = e.secret_nonce;
                WebhookState::Live(endpoint)
            }
            WebhookEvent::WebhookDisabled(e) => {
                endpoint.status = WebhookStatus::Disabled {
                    reason: e.reason.clone(),
                    failing_since: e.failing_since,
                    at: e.at,
                };
                WebhookState::Live(endpoint)
            }
            WebhookEvent::WebhookEnabled(_) => {
                endpoint.status = WebhookStatus::Enabled;
                WebhookState::Live(endpoint)
            }
            WebhookEvent::WebhookDeleted(_) => WebhookState::Deleted,
        },
        (state, _) => state,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(seconds: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + seconds, 0).unwrap()
    }

    fn admin() -> UserId {
        UserId::from_uuid(Uuid::from_u128(1))
    }

    fn nonce(byte: u8) -> WebhookNonce {
        WebhookNonce::from_bytes([byte; WebhookNonce::LEN])
    }

    fn register() -> WebhookCommand {
        WebhookCommand::Register {
            id: WebhookId::from_uuid(Uuid::from_u128(7)),
            url: "https://hooks.example.com/identity".into(),
            events: vec!["identity.user.registered.v1".into()],
            description: "provisioning".into(),
            secret_nonce: nonce(1),
            by: admin(),
        }
    }

    fn after(commands: Vec<WebhookCommand>) -> WebhookState {
        let mut history = Vec::new();
        for (at, command) in commands.into_iter().enumerate() {
            let state = WebhookState::fold(&history);
            history.extend(decide_webhook(&state, command, t(at as i64)).unwrap());
        }
        WebhookState::fold(&history)
    }

    #[test]
    fn a_registered_endpoint_is_enabled_and_receives_what_it_subscribed_to() {
        let state = after(vec![register()]);
        let endpoint = state.live().unwrap();
        assert_eq!(endpoint.status, WebhookStatus::Enabled);
        assert!(endpoint.subscribes_to("identity.user.registered.v1"));
        assert!(!endpoint.subscribes_to("identity.user.erased.v1"));
    }

    #[test]
    fn an_id_is_registered_once_even_after_a_deletion() {
        for state in [
            after(vec![register()]),
            after(vec![register(), WebhookCommand::Delete { by: admin() }]),
        ] {
            assert_eq!(
                decide_webhook(&state, register(), t(9)),
                Err(WebhookRefusal::AlreadyRegistered)
            );
        }
    }

    #[test]
    fn nothing_but_a_registration_is_accepted_for_an_unknown_or_deleted_endpoint() {
        let deleted = after(vec![register(), WebhookCommand::Delete { by: admin() }]);
        for state in [WebhookState::Unregistered, deleted] {
            for command in [
                WebhookCommand::Delete { by: admin() },
                WebhookCommand::Enable { by: admin() },
                WebhookCommand::RotateSecret {
                    secret_nonce: nonce(2),
                    by: admin(),
                },
            ] {
                assert_eq!(
                    decide_webhook(&state, command, t(9)),
                    Err(WebhookRefusal::NotFound)
                );
            }
        }
    }

    #[test]
    fn a_rotation_keeps_the_previous_secret_with_the_time_it_was_replaced() {
        let state = after(vec![
            register(),
            WebhookCommand::RotateSecret {
                secret_nonce: nonce(2),
                by: admin(),
            },
        ]);
        let endpoint = state.live().unwrap();
        assert_eq!(endpoint.secret_nonce, nonce(2));
        assert_eq!(endpoint.previous_secret, Some((nonce(1), t(1))));
    }

    #[test]
    fn disabling_and_enabling_are_safe_to_repeat() {
        let disable = || WebhookCommand::Disable {
            reason: "HTTP 500".into(),
            failing_since: t(0),
        };
        let disabled = after(vec![register(), disable()]);
        assert!(matches!(
            disabled.live().unwrap().status,
            WebhookStatus::Disabled { .. }
        ));
        assert_eq!(decide_webhook(&disabled, disable(), t(5)), Ok(vec![]));
        let enabled = after(vec![
            register(),
            disable(),
            WebhookCommand::Enable { by: admin() },
        ]);
        assert_eq!(enabled.live().unwrap().status, WebhookStatus::Enabled);
        assert_eq!(
            decide_webhook(&enabled, WebhookCommand::Enable { by: admin() }, t(5)),
            Ok(vec![])
        );
    }
}
