//! What other services see of the accounts (DESIGN decision 17, docs/adr/0014): integration
//! events, a public contract apart from the internal events, and the rules every deliverer of
//! them shares.
//!
//! - [`event`]: the integration event types (`identity.user.registered.v1`, ...), each a
//!   CloudEvents 1.0 JSON document made from one stored message, and which types are published.
//!   `docs/integration-events.schema.json` describes them; a test checks it against what this
//!   crate makes.
//! - [`address`]: where a webhook endpoint may point: its URL parsed, and every address its
//!   host resolves to checked against the network policy (no private, loopback or link-local
//!   address unless the configuration allows its network).
//! - [`settings`]: the `integration` and `webhooks` settings the command API and the aggregator
//!   both read.
//!
//! The internal events may change; an integration event type changes only by a new version
//! beside the old one. Nothing secret is ever in one (no password hash, token, nonce or lockout
//! state); the only personal data is the address, where the schema says so, and it is `null`
//! once its person was erased (ADR 13): events are made from messages opened by the `Sealer`.

#![forbid(unsafe_code)]

pub mod address;
pub mod event;
pub mod settings;

pub use address::{EndpointUrl, NetworkPolicy, UrlRefusal};
pub use event::{EventType, IntegrationEvent, PERSONAL_FIELDS_READ, Published, UnknownEventType};
pub use settings::{IntegrationSettings, WebhookSettings};
