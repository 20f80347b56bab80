//! Integration events: what happened to an account, as other services are told it.
//!
//! Each is a CloudEvents 1.0 document in JSON ("structured mode"): `id` is the id of the stored
//! message it was made from, so a delivery sent twice carries the same id; `type` names the
//! public type and its version; `subject` is the account's id; `time` is when the message was
//! written; `data` holds the type's fields, and only those the schema lists.
//!
//! Made from messages of the `user` and `userLogin` categories, opened by the `Sealer` first.
//! Internal events with nothing to tell another service (a rehash, a failed login, a lifted
//! lockout, sessions ended) make none; a password change and a reset are one public type.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, SecondsFormat, Utc};
use identity::{
    EventDecodeError, LOGIN_CATEGORY, LoginEvent, Personal, Role, USER_CATEGORY, UserEvent, UserId,
    event_version, user_id_of_stream,
};
use message_store::RecordedMessage;
use serde::Serialize;
use serde_json::{Value, json};
use uuid::Uuid;

/// The CloudEvents version of every integration event.
pub const SPEC_VERSION: &str = "1.0";

/// The sealed (personal) fields of the internal events that integration events are made from:
/// the address. A deliverer opens these alone (`Sealer::unseal_messages_of`): it never holds a
/// password hash or a uniqueness key in clear, and does not pay to open them. A test checks
/// that every event made with only these opened is the one made with everything opened.
pub const PERSONAL_FIELDS_READ: &[&str] = &["email"];

/// The public event types, each with its version in its name. A new version is a new variant
/// beside the old one; an existing one never changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventType {
    Registered,
    Activated,
    Deactivated,
    EmailVerified,
    EmailChanged,
    PasswordChanged,
    Erased,
    LoggedIn,
}

impl EventType {
    pub const ALL: [Self; 8] = [
        Self::Registered,
        Self::Activated,
        Self::Deactivated,
        Self::EmailVerified,
        Self::EmailChanged,
        Self::PasswordChanged,
        Self::Erased,
        Self::LoggedIn,
    ];

    /// The CloudEvents `type`, and the NATS subject it is published on.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Registered => "identity.user.registered.v1",
            Self::Activated => "identity.user.activated.v1",
            Self::Deactivated => "identity.user.deactivated.v1",
            Self::EmailVerified => "identity.user.email_verified.v1",
            Self::EmailChanged => "identity.user.email_changed.v1",
            Self::PasswordChanged => "identity.user.password_changed.v1",
            Self::Erased => "identity.user.erased.v1",
            Self::LoggedIn => "identity.user.logged_in.v1",
        }
    }

    /// Whether it is published when the configuration does not say: every type but logins,
    /// which are many and are the business of few.
    pub const fn published_by_default(self) -> bool {
        !matches!(self, Self::LoggedIn)
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is no integration event type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an integration event type; the types are {types}", types = type_list())]
pub struct UnknownEventType(pub String);

fn type_list() -> String {
    EventType::ALL.map(EventType::name).join(", ")
}

impl FromStr for EventType {
    type Err = UnknownEventType;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.name() == name)
            .ok_or_else(|| UnknownEventType(name.to_owned()))
    }
}

/// The event types a deployment publishes (`integration.events`): NATS gets these, and a
/// webhook endpoint may subscribe to these only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published(BTreeSet<EventType>);

impl Published {
    /// The types named, or the default ones when `names` is `None`.
    pub fn from_names(names: Option<&[String]>) -> Result<Self, UnknownEventType> {
        match names {
            None => Ok(Self::default()),
            Some(names) => names
                .iter()
                .map(|name| name.parse())
                .collect::<Result<_, _>>()
                .map(Self),
        }
    }

    pub fn contains(&self, kind: EventType) -> bool {
        self.0.contains(&kind)
    }

    pub fn iter(&self) -> impl Iterator<Item = EventType> + '_ {
        self.0.iter().copied()
    }
}

impl Default for Published {
    fn default() -> Self {
        Self(
            EventType::ALL
                .into_iter()
                .filter(|kind| kind.published_by_default())
                .collect(),
        )
    }
}

/// One integration event, ready to be sent.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IntegrationEvent {
    pub specversion: &'static str,
    /// The stored message's id.
    pub id: Uuid,
    pub source: String,
    #[serde(rename = "type")]
    pub kind: EventType,
    /// The account's id.
    pub subject: String,
    #[serde(serialize_with = "rfc3339")]
    pub time: DateTime<Utc>,
    pub datacontenttype: &'static str,
    pub data: Value,
    /// The message's global position: not sent, but what a deliverer checkpoints.
    #[serde(skip)]
    pub position: u64,
}

impl Serialize for EventType {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

fn rfc3339<S: serde::Serializer>(time: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&time.to_rfc3339_opts(SecondsFormat::Micros, true))
}

impl IntegrationEvent {
    /// The integration event `message` makes, if any, with `source` as its CloudEvents
    /// `source`. `message` must have been opened by the `Sealer`: an erased person's address
    /// reads as `null`. A message of another category, or of a type that tells other services
    /// nothing, makes none; one of a type this build does not know makes none either (a newer
    /// build wrote it); one that cannot be read is an error, never skipped silently.
    pub fn from_message(
        message: &RecordedMessage,
        source: &str,
    ) -> Result<Option<Self>, EventDecodeError> {
        let category = message.stream.category();
        if category != USER_CATEGORY && category != LOGIN_CATEGORY {
            return Ok(None);
        }
        let Some(account) = user_id_of_stream(message.stream.as_str()) else {
            return Ok(None);
        };
        let version = event_version(&message.metadata)?;
        let made = if category == USER_CATEGORY {
            UserEvent::from_stored(&message.message_type, version, &message.data)
                .map(|event| of_user_event(&event, account))
        } else {
            LoginEvent::from_stored(&message.message_type, version, &message.data)
                .map(|event| of_login_event(&event))
        };
        let (kind, data) = match made {
            Ok(Some(made)) => made,
            Ok(None) | Err(EventDecodeError::UnknownType { .. }) => return Ok(None),
            Err(error) => return Err(error),
        };
        Ok(Some(Self {
            specversion: SPEC_VERSION,
            id: message.id,
            source: source.to_owned(),
            kind,
            subject: account.to_string(),
            time: message.time,
            datacontenttype: "application/json",
            data,
            position: message.global_position,
        }))
    }

    /// The CloudEvents JSON document, as sent.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain strings, numbers and a `Value` cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

fn email(email: &Personal<identity::Email>) -> Value {
    email
        .known()
        .map_or(Value::Null, |email| Value::from(email.as_str()))
}

fn of_user_event(event: &UserEvent, account: UserId) -> Option<(EventType, Value)> {
    Some(match event {
        UserEvent::UserRegistered(e) => (
            EventType::Registered,
            json!({
                "email": email(&e.email),
                "status": e.status,
                "roles": e.roles.iter().map(|role| match role {
                    Role::User => "user",
                    Role::Admin => "admin",
                }).collect::<Vec<_>>(),
            }),
        ),
        UserEvent::UserActivated(_) => (EventType::Activated, json!({})),
        UserEvent::UserDeactivated(_) => (EventType::Deactivated, json!({})),
        UserEvent::EmailVerified(_) => (EventType::EmailVerified, json!({})),
        UserEvent::EmailChanged(e) => {
            (EventType::EmailChanged, json!({ "email": email(&e.email) }))
        }
        UserEvent::PasswordChanged(_) => {
            (EventType::PasswordChanged, json!({ "reason": "changed" }))
        }
        UserEvent::PasswordReset(_) => (EventType::PasswordChanged, json!({ "reason": "reset" })),
        UserEvent::UserErased(e) => (
            EventType::Erased,
            json!({ "by": if e.erased_by == account { "self" } else { "administrator" } }),
        ),
        UserEvent::PasswordRehashed(_) | UserEvent::SessionsEnded(_) => return None,
    })
}

fn of_login_event(event: &LoginEvent) -> Option<(EventType, Value)> {
    match event {
        LoginEvent::LoginSucceeded(e) => {
            Some((EventType::LoggedIn, json!({ "login_count": e.login_count })))
        }
        LoginEvent::LoginFailed(_) | LoginEvent::LockoutLifted(_) => None,
    }
}
