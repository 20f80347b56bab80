//! The events of the user, login, administrators', session and recovery streams: a public
//! contract that every later build must read.
//!
//! Each event is a struct with a stable type name and a version ([`EventData`]); the stream
//! enums [`UserEvent`], [`LoginEvent`], [`AdministratorsEvent`], [`SessionEvent`] and
//! [`RecoveryEvent`] wrap them.
//! The store keeps the type name, the version (in the metadata, see [`crate::streams`]) and the
//! JSON of the struct, untagged.
//!
//! Changing an event: never edit what a version means. Bump `VERSION`, keep the old struct
//! (in a `v1` module, say) with a conversion to the new one, and add an `upcast` line to the
//! stream's `stream_event!` next to the comment that shows where. The golden fixtures in
//! `tests/fixtures/` fail until the old version is still read.

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::email::Email;
use crate::password::PasswordHash;
use crate::personal::Personal;
use crate::recovery::{RecoveryKind, RecoveryNonce, RecoveryState};
use crate::session::{RefreshNonce, SessionEndReason, UserAgent};
use crate::values::{AccountStatus, Role, SessionId, UserId};
use crate::webhook::{WebhookId, WebhookNonce};

/// The data of one kind of event: its stored type name and its current version.
pub trait EventData: Serialize + DeserializeOwned {
    /// The type name in the store. Never change it: stored events carry it forever.
    const TYPE: &'static str;
    /// The version this build writes.
    const VERSION: u32;
    /// The fields that hold personal data: stored sealed with a key of their person's, and read
    /// as [`Personal::Erased`] once the person is erased (ADR 13). Top-level fields only; an
    /// event with none says nothing about anyone but through its stream.
    const PERSONAL_FIELDS: &'static [&'static str] = &[];
}

/// Why a stored event could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventDecodeError {
    /// Not an event of this stream's enum. A projection that does not know a type skips it.
    #[error("unknown event type {event_type:?}")]
    UnknownType { event_type: String },
    /// A known type at a version this build cannot read: written by a newer build, or an
    /// upcaster is missing. Do not skip it, that would silently lose the event.
    #[error("{event_type} version {version} is not a version this build can read")]
    UnsupportedVersion { event_type: String, version: u32 },
    /// A known type and version whose data does not have the expected shape.
    #[error("cannot read {event_type} version {version}: {reason}")]
    Malformed {
        event_type: String,
        version: u32,
        reason: String,
    },
    /// The version in the metadata is not a positive whole number.
    #[error("the event version in the metadata is not a positive 32-bit number: {found}")]
    InvalidVersion { found: String },
}

/// Declares a stream's event enum, one variant per event struct of the same name, with what
/// every stream enum offers: its type names, each event's type, version and stored form,
/// `From` each struct, and `from_stored`. Written once, so that no list of the variants can
/// miss one.
///
/// `from_stored` reads the current version of each type. An older version is read through an
/// `upcast <Event> from <OldStruct>, version <n>;` line, where `OldStruct` deserializes the old
/// data and converts into `Event`.
macro_rules! stream_event {
    (
        $(#[$attribute:meta])*
        $stream:ident: $($event:ident),+;
        $(upcast $upcast_event:ident from $old:ty, version $old_version:literal;)*
    ) => {
        $(#[$attribute])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum $stream {
            $($event($event),)+
        }

        impl $stream {
            /// Every type name of this enum, so a reader can tell an unknown type from an
            /// unreadable one.
            pub const TYPES: &'static [&'static str] = &[$($event::TYPE),+];

            pub fn event_type(&self) -> &'static str {
                match self {
                    $(Self::$event(_) => $event::TYPE,)+
                }
            }

            /// The version [`Self::to_json`] writes: store it under [`crate::EVENT_VERSION_KEY`].
            pub fn version(&self) -> u32 {
                match self {
                    $(Self::$event(_) => $event::VERSION,)+
                }
            }

            /// The fields of this event that hold personal data ([`EventData::PERSONAL_FIELDS`]):
            /// the ones a writer seals with its person's key.
            pub fn personal_fields(&self) -> &'static [&'static str] {
                match self {
                    $(Self::$event(_) => $event::PERSONAL_FIELDS,)+
                }
            }

            /// The event's data as stored: the struct's fields, without a type tag.
            pub fn to_json(&self) -> Value {
                match self {
                    $(Self::$event(event) => encode(event),)+
                }
            }

            /// Reads a stored event of any version this build knows, upcasting old versions.
            pub fn from_stored(
                event_type: &str,
                version: u32,
                data: &Value,
            ) -> Result<Self, EventDecodeError> {
                match (event_type, version) {
                    $(($event::TYPE, $event::VERSION) => {
                        decode::<$event>(event_type, version, data).map(Self::$event)
                    })+
                    $(($upcast_event::TYPE, $old_version) => {
                        decode::<$old>(event_type, version, data)
                            .map(|old| Self::$upcast_event(old.into()))
                    })*
                    _ => Err(not_readable(Self::TYPES, event_type, version)),
                }
            }
        }

        $(impl From<$event> for $stream {
            fn from(event: $event) -> Self {
                Self::$event(event)
            }
        })+
    };
}

// ---------------------------------------------------------------------------------------------
// The user stream, `user-<id>`.

/// An account was created. It is the first event of every user stream.
///
/// `email_normalized` is stored although it can be computed from `email`: the key an account
/// was reserved under must not move if the normalisation rules ever change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRegistered {
    pub user_id: UserId,
    pub email: Personal<Email>,
    pub email_normalized: Personal<String>,
    pub password_hash: Personal<PasswordHash>,
    /// `pending` or `active`; never `deactivated`.
    pub status: AccountStatus,
    pub roles: Vec<Role>,
    pub registered_at: DateTime<Utc>,
}

impl EventData for UserRegistered {
    const TYPE: &'static str = "UserRegistered";
    const VERSION: u32 = 1;
    const PERSONAL_FIELDS: &'static [&'static str] =
        &["email", "email_normalized", "password_hash"];
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserActivated {
    pub at: DateTime<Utc>,
}

impl EventData for UserActivated {
    const TYPE: &'static str = "UserActivated";
    const VERSION: u32 = 1;
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserDeactivated {
    pub at: DateTime<Utc>,
}

impl EventData for UserDeactivated {
    const TYPE: &'static str = "UserDeactivated";
    const VERSION: u32 = 1;
}

/// The user chose a new password.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PasswordChanged {
    pub password_hash: Personal<PasswordHash>,
    pub at: DateTime<Utc>,
}

impl EventData for PasswordChanged {
    const TYPE: &'static str = "PasswordChanged";
    const VERSION: u32 = 1;
    const PERSONAL_FIELDS: &'static [&'static str] = &["password_hash"];
}

/// The same password, hashed again with stronger parameters after a successful login. Separate
/// from [`PasswordChanged`] because the user did nothing: a history view should not say they did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PasswordRehashed {
    pub password_hash: Personal<PasswordHash>,
    pub at: DateTime<Utc>,
}

impl EventData for PasswordRehashed {
    const TYPE: &'static str = "PasswordRehashed";
    const VERSION: u32 = 1;
    const PERSONAL_FIELDS: &'static [&'static str] = &["password_hash"];
}

/// An administrator ended every session of the account at once. Like a deactivation and a
/// password change, it moves the account to its next session epoch (see
/// [`crate::account::Account::session_epoch`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionsEnded {
    pub at: DateTime<Utc>,
}

impl EventData for SessionsEnded {
    const TYPE: &'static str = "SessionsEnded";
    const VERSION: u32 = 1;
}

/// The owner proved control of the account's address, through the link mailed to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmailVerified {
    pub at: DateTime<Utc>,
}

impl EventData for EmailVerified {
    const TYPE: &'static str = "EmailVerified";
    const VERSION: u32 = 1;
}

/// A new password set through a reset link, without the old one. Separate from
/// [`PasswordChanged`] because the history should say which way it was done; like it, it ends
/// every session of the account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PasswordReset {
    pub password_hash: Personal<PasswordHash>,
    pub at: DateTime<Utc>,
}

impl EventData for PasswordReset {
    const TYPE: &'static str = "PasswordReset";
    const VERSION: u32 = 1;
    const PERSONAL_FIELDS: &'static [&'static str] = &["password_hash"];
}

/// The account moved to a new address, proven through the link mailed to it (so the new address
/// is verified). Its reservation moved in the same append: the old address is free.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmailChanged {
    pub email: Personal<Email>,
    /// The key the new address is reserved under, as in [`UserRegistered`].
    pub email_normalized: Personal<String>,
    pub at: DateTime<Utc>,
}

impl EventData for EmailChanged {
    const TYPE: &'static str = "EmailChanged";
    const VERSION: u32 = 1;
    const PERSONAL_FIELDS: &'static [&'static str] = &["email", "email_normalized"];
}

/// The person asked to be forgotten, or an administrator erased the account: its key is
/// deleted, so every personal field of its events reads as erased from now on, its sessions are
/// over and its address is free. The last event of its stream: nothing follows an erasure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserErased {
    /// Who asked: the account itself, or an administrator.
    pub erased_by: UserId,
    pub at: DateTime<Utc>,
}

impl EventData for UserErased {
    const TYPE: &'static str = "UserErased";
    const VERSION: u32 = 1;
}

stream_event! {
    /// Everything that can happen in a user stream.
    UserEvent: UserRegistered, UserActivated, UserDeactivated, PasswordChanged, PasswordRehashed,
        SessionsEnded, EmailVerified, PasswordReset, EmailChanged, UserErased;
    // Older versions are upcast here, one line per type and old version. For example, once
    // `UserRegistered::VERSION` is 2:
    // upcast UserRegistered from v1::UserRegistered, version 1;
}

impl UserEvent {
    /// When it happened, by the clock of the command that decided it.
    pub fn occurred_at(&self) -> DateTime<Utc> {
        match self {
            Self::UserRegistered(e) => e.registered_at,
            Self::UserActivated(e) => e.at,
            Self::UserDeactivated(e) => e.at,
            Self::PasswordChanged(e) => e.at,
            Self::PasswordRehashed(e) => e.at,
            Self::SessionsEnded(e) => e.at,
            Self::EmailVerified(e) => e.at,
            Self::PasswordReset(e) => e.at,
            Self::EmailChanged(e) => e.at,
            Self::UserErased(e) => e.at,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The login stream, `userLogin-<id>`.
//
// Every login event carries the login state that results from it, so deciding the next login
// needs the last event only, never a fold of the whole history (see `LoginState::from_last`).

/// A login was granted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginSucceeded {
    pub at: DateTime<Utc>,
    /// Successful logins so far, this one included.
    pub login_count: u64,
}

impl EventData for LoginSucceeded {
    const TYPE: &'static str = "LoginSucceeded";
    const VERSION: u32 = 1;
}

/// A login with a wrong password. Attempts on a locked or inactive account record nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginFailed {
    pub at: DateTime<Utc>,
    /// Failures since the last successful login, this one included.
    pub failed_in_a_row: u32,
    /// Set when this failure locked the account: no login before then.
    pub locked_until: Option<DateTime<Utc>>,
    /// Successful logins so far (unchanged by a failure).
    pub login_count: u64,
}

impl EventData for LoginFailed {
    const TYPE: &'static str = "LoginFailed";
    const VERSION: u32 = 1;
}

/// The failures counted toward a lockout were forgotten and any lockout lifted, because the
/// password was reset: whoever guessed at the old one no longer holds the new owner out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockoutLifted {
    pub at: DateTime<Utc>,
    /// Successful logins so far (unchanged).
    pub login_count: u64,
}

impl EventData for LockoutLifted {
    const TYPE: &'static str = "LockoutLifted";
    const VERSION: u32 = 1;
}

stream_event! {
    /// Everything that can happen in a login stream.
    LoginEvent: LoginSucceeded, LoginFailed, LockoutLifted;
    // Older versions are upcast here, as in `UserEvent`.
}

impl LoginEvent {
    pub fn occurred_at(&self) -> DateTime<Utc> {
        match self {
            Self::LoginSucceeded(e) => e.at,
            Self::LoginFailed(e) => e.at,
            Self::LockoutLifted(e) => e.at,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The administrators' stream, `administrators-active` (see `crate::administrators`).

/// Who the active administrators are after a change of one of them.
///
/// It carries the whole set rather than the change, so that the set is read from the stream's
/// last message alone, however long the stream has grown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdministratorsChanged {
    /// In ascending order, each once.
    pub active: Vec<UserId>,
    pub at: DateTime<Utc>,
}

impl EventData for AdministratorsChanged {
    const TYPE: &'static str = "AdministratorsChanged";
    const VERSION: u32 = 1;
}

stream_event! {
    /// Everything that can happen in the administrators' stream.
    AdministratorsEvent: AdministratorsChanged;
    // Older versions are upcast here, as in `UserEvent`.
}

// ---------------------------------------------------------------------------------------------
// The session stream, `session-<id>` (see `crate::session`).
//
// Every session event carries the whole session state after it, so deciding a refresh needs
// the stream's last message only (see `SessionState::from_last`): its cost does not grow with
// the number of refreshes before it. A stream is one `SessionStarted`, then one
// `SessionRefreshed` per rotation, and at most one `SessionEnded`, last; so the event that
// issued generation g is the stream's message at position g (counting from 0).

/// A login opened a session: the refresh token of generation 0 is derived from `nonce`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionStarted {
    pub session_id: SessionId,
    pub user_id: UserId,
    /// The account's session epoch when the session started
    /// ([`crate::account::Account::session_epoch`]): once the account has moved past it, the
    /// session is over.
    pub session_epoch: u64,
    pub started_at: DateTime<Utc>,
    /// The absolute limit: no refresh at or after it, however active the session.
    pub expires_at: DateTime<Utc>,
    /// No refresh at or after it; each refresh moves it.
    pub idle_expires_at: DateTime<Utc>,
    pub user_agent: Option<UserAgent>,
    /// Always 0.
    pub generation: u64,
    pub nonce: RefreshNonce,
}

impl EventData for SessionStarted {
    const TYPE: &'static str = "SessionStarted";
    const VERSION: u32 = 1;
}

/// The refresh token of the current generation was presented and replaced by the next one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRefreshed {
    pub session_id: SessionId,
    pub user_id: UserId,
    pub session_epoch: u64,
    pub started_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// `rotated_at` plus the idle limit.
    pub idle_expires_at: DateTime<Utc>,
    pub user_agent: Option<UserAgent>,
    /// The generation issued now: the one presented, plus one.
    pub generation: u64,
    pub nonce: RefreshNonce,
    pub rotated_at: DateTime<Utc>,
    /// The nonce of the generation just replaced, kept so that a racing duplicate of its token
    /// can still be told from a forgery and answered with the current one.
    pub previous_nonce: RefreshNonce,
}

impl EventData for SessionRefreshed {
    const TYPE: &'static str = "SessionRefreshed";
    const VERSION: u32 = 1;
}

/// The session is over: no refresh token of it is accepted any more.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionEnded {
    pub session_id: SessionId,
    pub user_id: UserId,
    pub ended_at: DateTime<Utc>,
    pub reason: SessionEndReason,
}

impl EventData for SessionEnded {
    const TYPE: &'static str = "SessionEnded";
    const VERSION: u32 = 1;
}

stream_event! {
    /// Everything that can happen in a session stream.
    SessionEvent: SessionStarted, SessionRefreshed, SessionEnded;
    // Older versions are upcast here, as in `UserEvent`.
}

impl SessionEvent {
    /// When it happened, by the clock of the command that decided it.
    pub fn occurred_at(&self) -> DateTime<Utc> {
        match self {
            Self::SessionStarted(e) => e.started_at,
            Self::SessionRefreshed(e) => e.rotated_at,
            Self::SessionEnded(e) => e.ended_at,
        }
    }

    pub fn session_id(&self) -> SessionId {
        match self {
            Self::SessionStarted(e) => e.session_id,
            Self::SessionRefreshed(e) => e.session_id,
            Self::SessionEnded(e) => e.session_id,
        }
    }

    /// Whose session it is, so that a view can list a user's sessions and end them all.
    pub fn user_id(&self) -> UserId {
        match self {
            Self::SessionStarted(e) => e.user_id,
            Self::SessionRefreshed(e) => e.user_id,
            Self::SessionEnded(e) => e.user_id,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The recovery stream, `userRecovery-<id>` (see `crate::recovery`).
//
// Every recovery event carries the whole recovery state after it, so deciding a request or a
// confirmation needs the stream's last message only (see `RecoveryState::from_last`), however
// many requests came before. The mailer reads the events that call for a mail
// (`RecoveryRequested`, `RegistrationAttempted`); the account id is in the stream name.

/// A link mail to send: a request of `kind` is pending, and the link's secret is derived from
/// `nonce`. It replaces any earlier pending request of the same kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryRequested {
    pub kind: RecoveryKind,
    /// The account's address when the request was made. The link goes there, except for a
    /// change of email, whose link goes to `new_email` and which sends this address a notice.
    pub to: Personal<Email>,
    /// The address the account moves to once the link is confirmed: set for a change of email
    /// only.
    pub new_email: Option<Email>,
    pub nonce: RecoveryNonce,
    pub requested_at: DateTime<Utc>,
    /// The link is refused at or after it.
    pub expires_at: DateTime<Utc>,
    /// The recovery state after this request.
    pub state: Personal<RecoveryState>,
}

impl EventData for RecoveryRequested {
    const TYPE: &'static str = "RecoveryRequested";
    const VERSION: u32 = 1;
    /// The state too: its pending requests hold addresses and a registration's password hash.
    const PERSONAL_FIELDS: &'static [&'static str] = &["to", "new_email", "state"];
}

/// A notice to send to the owner of `to`: someone tried to register with their address. It
/// has no link, and counts toward the account's hourly limit of mails.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistrationAttempted {
    pub to: Personal<Email>,
    pub at: DateTime<Utc>,
    /// The recovery state after this notice.
    pub state: Personal<RecoveryState>,
}

impl EventData for RegistrationAttempted {
    const TYPE: &'static str = "RegistrationAttempted";
    const VERSION: u32 = 1;
    const PERSONAL_FIELDS: &'static [&'static str] = &["to", "state"];
}

/// The pending request of `kind` was confirmed through its link, and is consumed: its link is
/// refused from now on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryCompleted {
    pub kind: RecoveryKind,
    /// For a change of email, the address the account moves to (the request's), so that the
    /// caller can move the email reservation with the same append.
    pub new_email: Option<Email>,
    pub at: DateTime<Utc>,
    /// The recovery state after this confirmation.
    pub state: Personal<RecoveryState>,
}

impl EventData for RecoveryCompleted {
    const TYPE: &'static str = "RecoveryCompleted";
    const VERSION: u32 = 1;
    const PERSONAL_FIELDS: &'static [&'static str] = &["new_email", "state"];
}

stream_event! {
    /// Everything that can happen in a recovery stream.
    RecoveryEvent: RecoveryRequested, RegistrationAttempted, RecoveryCompleted;
    // Older versions are upcast here, as in `UserEvent`.
}

impl RecoveryEvent {
    /// When it happened, by the clock of the command that decided it.
    pub fn occurred_at(&self) -> DateTime<Utc> {
        match self {
            Self::RecoveryRequested(e) => e.requested_at,
            Self::RegistrationAttempted(e) => e.at,
            Self::RecoveryCompleted(e) => e.at,
        }
    }

    /// The recovery state after the event, unless its person was erased.
    pub fn state(&self) -> &Personal<RecoveryState> {
        match self {
            Self::RecoveryRequested(e) => &e.state,
            Self::RegistrationAttempted(e) => &e.state,
            Self::RecoveryCompleted(e) => &e.state,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The webhook endpoint stream, `webhook-<id>` (docs/adr/0014).

/// An administrator registered an endpoint to receive integration events by webhook.
///
/// The endpoint's signing secret is not stored: it is derived from `secret_nonce` with the
/// webhook secret key from the configuration, as refresh tokens are (DESIGN decision 15).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookRegistered {
    pub webhook_id: WebhookId,
    /// Where events are posted: an `http` or `https` URL, checked by the API that took it.
    pub url: String,
    /// The integration event types it receives (`identity.user.registered.v1`, ...).
    pub events: Vec<String>,
    pub description: String,
    pub secret_nonce: WebhookNonce,
    pub registered_by: UserId,
    pub at: DateTime<Utc>,
}

impl EventData for WebhookRegistered {
    const TYPE: &'static str = "WebhookRegistered";
    const VERSION: u32 = 1;
}

/// The endpoint signs with a new secret from now on; the previous one keeps signing beside it
/// for a while, so that a receiver can switch without losing a delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookSecretRotated {
    pub secret_nonce: WebhookNonce,
    pub previous_nonce: WebhookNonce,
    pub by: UserId,
    pub at: DateTime<Utc>,
}

impl EventData for WebhookSecretRotated {
    const TYPE: &'static str = "WebhookSecretRotated";
    const VERSION: u32 = 1;
}

/// Deliveries to the endpoint failed without a success for longer than the configured time;
/// nothing is sent to it until an administrator enables it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookDisabled {
    /// What the last attempt met, for the administrator (a status code, a timeout).
    pub reason: String,
    pub failing_since: DateTime<Utc>,
    pub at: DateTime<Utc>,
}

impl EventData for WebhookDisabled {
    const TYPE: &'static str = "WebhookDisabled";
    const VERSION: u32 = 1;
}

/// An administrator enabled a disabled endpoint: deliveries resume where they stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookEnabled {
    pub by: UserId,
    pub at: DateTime<Utc>,
}

impl EventData for WebhookEnabled {
    const TYPE: &'static str = "WebhookEnabled";
    const VERSION: u32 = 1;
}

/// The endpoint was deleted; nothing is sent to it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookDeleted {
    pub by: UserId,
    pub at: DateTime<Utc>,
}

impl EventData for WebhookDeleted {
    const TYPE: &'static str = "WebhookDeleted";
    const VERSION: u32 = 1;
}

stream_event! {
    /// Everything that can happen in a webhook endpoint's stream.
    WebhookEvent: WebhookRegistered, WebhookSecretRotated, WebhookDisabled, WebhookEnabled,
        WebhookDeleted;
    // Older versions are upcast here, as in `UserEvent`.
}

impl WebhookEvent {
    /// When it happened, by the clock of the command that decided it.
    pub fn occurred_at(&self) -> DateTime<Utc> {
        match self {
            Self::WebhookRegistered(e) => e.at,
            Self::WebhookSecretRotated(e) => e.at,
            Self::WebhookDisabled(e) => e.at,
            Self::WebhookEnabled(e) => e.at,
            Self::WebhookDeleted(e) => e.at,
        }
    }
}

fn encode<T: EventData>(event: &T) -> Value {
    match serde_json::to_value(event) {
        Ok(value) => value,
        // Serializing to a `Value` fails only for maps with non-string keys or for a failing
        // `Serialize` impl; events are plain structs of strings, numbers and lists. The golden
        // fixtures exercise every event type.
        Err(error) => unreachable!("{} cannot fail to serialize: {error}", T::TYPE),
    }
}

fn decode<T: DeserializeOwned>(
    event_type: &str,
    version: u32,
    data: &Value,
) -> Result<T, EventDecodeError> {
    T::deserialize(data).map_err(|error| EventDecodeError::Malformed {
        event_type: event_type.to_owned(),
        version,
        reason: error.to_string(),
    })
}

fn not_readable(known: &[&str], event_type: &str, version: u32) -> EventDecodeError {
    if known.contains(&event_type) {
        EventDecodeError::UnsupportedVersion {
            event_type: event_type.to_owned(),
            version,
        }
    } else {
        EventDecodeError::UnknownType {
            event_type: event_type.to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use serde_json::json;
    use uuid::Uuid;

    use super::*;
    use crate::account::UserAccount;

    fn at() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 3, 14, 9, 26, 53).unwrap()
    }

    fn hash() -> PasswordHash {
        PasswordHash::parse("$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo").unwrap()
    }

    /// One of each user event. The match makes a new variant fail to compile here, so it is
    /// added to the samples (and so to the checks below) too.
    fn user_samples() -> Vec<UserEvent> {
        let samples = vec![
            UserEvent::from(UserRegistered {
                user_id: UserId::from_uuid(Uuid::from_u128(1)),
                email: Email::parse("Ann@Example.com").unwrap().into(),
                email_normalized: "ann@example.com".into(),
                password_hash: hash().into(),
                status: AccountStatus::Pending,
                roles: vec![Role::User],
                registered_at: at(),
            }),
            UserActivated { at: at() }.into(),
            UserDeactivated { at: at() }.into(),
            PasswordChanged {
                password_hash: hash().into(),
                at: at(),
            }
            .into(),
            PasswordRehashed {
                password_hash: hash().into(),
                at: at(),
            }
            .into(),
            SessionsEnded { at: at() }.into(),
            EmailVerified { at: at() }.into(),
            PasswordReset {
                password_hash: hash().into(),
                at: at(),
            }
            .into(),
            EmailChanged {
                email: Email::parse("Ann@Example.org").unwrap().into(),
                email_normalized: "ann@example.org".into(),
                at: at(),
            }
            .into(),
            UserErased {
                erased_by: UserId::from_uuid(Uuid::from_u128(9)),
                at: at(),
            }
            .into(),
        ];
        for sample in &samples {
            match sample {
                UserEvent::UserRegistered(_)
                | UserEvent::UserActivated(_)
                | UserEvent::UserDeactivated(_)
                | UserEvent::PasswordChanged(_)
                | UserEvent::PasswordRehashed(_)
                | UserEvent::SessionsEnded(_)
                | UserEvent::EmailVerified(_)
                | UserEvent::PasswordReset(_)
                | UserEvent::EmailChanged(_)
                | UserEvent::UserErased(_) => {}
            }
        }
        samples
    }

    fn login_samples() -> Vec<LoginEvent> {
        vec![
            LoginSucceeded {
                at: at(),
                login_count: 3,
            }
            .into(),
            LoginFailed {
                at: at(),
                failed_in_a_row: 5,
                locked_until: Some(at()),
                login_count: 3,
            }
            .into(),
            LockoutLifted {
                at: at(),
                login_count: 3,
            }
            .into(),
        ]
    }

    /// One of each session event, with the match that makes a new variant fail to compile here.
    fn session_samples() -> Vec<SessionEvent> {
        let session_id = SessionId::from_uuid(Uuid::from_u128(2));
        let user_id = UserId::from_uuid(Uuid::from_u128(1));
        let nonce = |byte| RefreshNonce::from_bytes([byte; RefreshNonce::LEN]);
        let samples = vec![
            SessionEvent::from(SessionStarted {
                session_id,
                user_id,
                session_epoch: 1,
                started_at: at(),
                expires_at: at(),
                idle_expires_at: at(),
                user_agent: Some(UserAgent::new("curl/8.5")),
                generation: 0,
                nonce: nonce(1),
            }),
            SessionRefreshed {
                session_id,
                user_id,
                session_epoch: 1,
                started_at: at(),
                expires_at: at(),
                idle_expires_at: at(),
                user_agent: None,
                generation: 1,
                nonce: nonce(2),
                rotated_at: at(),
                previous_nonce: nonce(1),
            }
            .into(),
            SessionEnded {
                session_id,
                user_id,
                ended_at: at(),
                reason: SessionEndReason::RefreshTokenReused,
            }
            .into(),
        ];
        for sample in &samples {
            match sample {
                SessionEvent::SessionStarted(_)
                | SessionEvent::SessionRefreshed(_)
                | SessionEvent::SessionEnded(_) => {}
            }
            assert_eq!(
                (sample.session_id(), sample.user_id(), sample.occurred_at()),
                (session_id, user_id, at())
            );
        }
        samples
    }

    #[test]
    fn every_session_event_round_trips_and_names_its_session_user_and_time() {
        let samples = session_samples();
        let types: Vec<_> = samples.iter().map(SessionEvent::event_type).collect();
        assert_eq!(types, SessionEvent::TYPES);
        for event in samples {
            let decoded =
                SessionEvent::from_stored(event.event_type(), event.version(), &event.to_json());
            assert_eq!(decoded, Ok(event));
        }
        assert!(matches!(
            SessionEvent::from_stored("LoginSucceeded", 1, &json!({})),
            Err(EventDecodeError::UnknownType { .. })
        ));
    }

    /// One of each recovery event, with the match that makes a new variant fail to compile here.
    fn recovery_samples() -> Vec<RecoveryEvent> {
        let email = Email::parse("ann@example.com").unwrap();
        let nonce = RecoveryNonce::from_bytes([3; RecoveryNonce::LEN]);
        let state = RecoveryState {
            reset_password: Some(crate::recovery::PendingRecovery {
                nonce,
                requested_at: at(),
                expires_at: at(),
                new_email: None,
                account_epoch: 2,
                password_hash: None,
            }),
            recent_mails: vec![at()],
            ..RecoveryState::default()
        };
        let samples = vec![
            RecoveryEvent::from(RecoveryRequested {
                kind: RecoveryKind::ResetPassword,
                to: email.clone().into(),
                new_email: None,
                nonce,
                requested_at: at(),
                expires_at: at(),
                state: state.clone().into(),
            }),
            RegistrationAttempted {
                to: email.clone().into(),
                at: at(),
                state: state.clone().into(),
            }
            .into(),
            RecoveryCompleted {
                kind: RecoveryKind::ChangeEmail,
                new_email: Some(email),
                at: at(),
                state: state.clone().into(),
            }
            .into(),
        ];
        for sample in &samples {
            match sample {
                RecoveryEvent::RecoveryRequested(_)
                | RecoveryEvent::RegistrationAttempted(_)
                | RecoveryEvent::RecoveryCompleted(_) => {}
            }
            assert_eq!(
                (sample.occurred_at(), sample.state()),
                (at(), &Personal::Known(state.clone()))
            );
        }
        samples
    }

    #[test]
    fn every_recovery_event_round_trips_and_carries_its_time_and_state() {
        let samples = recovery_samples();
        let types: Vec<_> = samples.iter().map(RecoveryEvent::event_type).collect();
        assert_eq!(types, RecoveryEvent::TYPES);
        for event in samples {
            let decoded =
                RecoveryEvent::from_stored(event.event_type(), event.version(), &event.to_json());
            assert_eq!(decoded, Ok(event));
        }
        assert!(matches!(
            RecoveryEvent::from_stored("UserActivated", 1, &json!({})),
            Err(EventDecodeError::UnknownType { .. })
        ));
    }

    #[test]
    fn every_user_event_round_trips_through_its_stored_form() {
        for event in user_samples() {
            let decoded =
                UserEvent::from_stored(event.event_type(), event.version(), &event.to_json());
            assert_eq!(decoded, Ok(event));
        }
    }

    /// The stored form of `event` as a reader finds it once its person is erased: every
    /// personal field null.
    fn erased_form(personal_fields: &[&str], mut data: Value) -> Value {
        for field in personal_fields {
            assert!(
                data.get(*field).is_some(),
                "{field} is named personal but the event has no such field: {data}"
            );
            data[*field] = Value::Null;
        }
        data
    }

    #[test]
    fn every_personal_field_is_a_field_of_its_event_and_reads_as_erased_once_gone() {
        for event in user_samples() {
            let erased = erased_form(event.personal_fields(), event.to_json());
            let decoded = UserEvent::from_stored(event.event_type(), event.version(), &erased)
                .unwrap_or_else(|error| panic!("{}: {error}", event.event_type()));
            let has_personal_data = !event.personal_fields().is_empty();
            let history = match decoded {
                UserEvent::UserRegistered(_) => vec![decoded],
                _ => vec![registered_sample(), decoded],
            };
            let folded = UserAccount::fold(&history);
            assert_eq!(
                folded.is_erased(),
                has_personal_data || matches!(event, UserEvent::UserErased(_)),
                "{}",
                event.event_type()
            );
        }
        for event in recovery_samples() {
            assert!(
                !event.personal_fields().is_empty(),
                "{}",
                event.event_type()
            );
            let erased = erased_form(event.personal_fields(), event.to_json());
            let decoded = RecoveryEvent::from_stored(event.event_type(), event.version(), &erased)
                .unwrap_or_else(|error| panic!("{}: {error}", event.event_type()));
            assert!(decoded.state().is_erased());
            assert_eq!(
                RecoveryState::from_last(Some(&decoded)),
                RecoveryState::default()
            );
        }
        for event in login_samples() {
            assert!(event.personal_fields().is_empty());
        }
        for event in session_samples() {
            assert!(event.personal_fields().is_empty());
        }
    }

    fn registered_sample() -> UserEvent {
        user_samples().remove(0)
    }

    #[test]
    fn every_login_event_round_trips_through_its_stored_form() {
        for event in login_samples() {
            let decoded =
                LoginEvent::from_stored(event.event_type(), event.version(), &event.to_json());
            assert_eq!(decoded, Ok(event));
        }
    }

    #[test]
    fn the_type_lists_name_every_variant_exactly_once() {
        let user_types: Vec<_> = user_samples().iter().map(UserEvent::event_type).collect();
        assert_eq!(user_types, UserEvent::TYPES);
        let login_types: Vec<_> = login_samples().iter().map(LoginEvent::event_type).collect();
        assert_eq!(login_types, LoginEvent::TYPES);
    }

    #[test]
    fn the_administrators_event_round_trips_and_is_unknown_to_the_other_streams() {
        let event = AdministratorsEvent::from(AdministratorsChanged {
            active: vec![UserId::from_uuid(Uuid::from_u128(1))],
            at: at(),
        });
        let decoded =
            AdministratorsEvent::from_stored(event.event_type(), event.version(), &event.to_json());
        assert_eq!(decoded, Ok(event.clone()));
        assert_eq!(AdministratorsEvent::TYPES, [event.event_type()]);
        assert!(event.personal_fields().is_empty());
        assert!(matches!(
            UserEvent::from_stored(event.event_type(), 1, &event.to_json()),
            Err(EventDecodeError::UnknownType { .. })
        ));
        assert!(matches!(
            AdministratorsEvent::from_stored("UserActivated", 1, &json!({})),
            Err(EventDecodeError::UnknownType { .. })
        ));
    }

    #[test]
    fn stored_data_carries_no_type_tag() {
        let data = UserEvent::from(UserActivated { at: at() }).to_json();
        assert_eq!(data, json!({ "at": "2025-03-14T09:26:53Z" }));
    }

    #[test]
    fn an_unknown_type_is_told_apart_from_a_malformed_known_one() {
        assert_eq!(
            UserEvent::from_stored("UserRenamed", 1, &json!({})),
            Err(EventDecodeError::UnknownType {
                event_type: "UserRenamed".into()
            })
        );
        assert!(matches!(
            UserEvent::from_stored("UserActivated", 1, &json!({ "at": "yesterday" })),
            Err(EventDecodeError::Malformed { .. })
        ));
        assert!(matches!(
            LoginEvent::from_stored("LoginFailed", 1, &json!({ "at": "2025-03-14T09:26:53Z" })),
            Err(EventDecodeError::Malformed { .. })
        ));
    }

    #[test]
    fn a_login_event_is_unknown_to_the_user_stream_and_the_other_way_round() {
        assert!(matches!(
            UserEvent::from_stored("LoginSucceeded", 1, &json!({})),
            Err(EventDecodeError::UnknownType { .. })
        ));
        assert!(matches!(
            LoginEvent::from_stored("UserActivated", 1, &json!({})),
            Err(EventDecodeError::UnknownType { .. })
        ));
    }

    #[test]
    fn a_version_this_build_does_not_know_is_not_mistaken_for_an_unknown_type() {
        assert_eq!(
            UserEvent::from_stored("UserActivated", 2, &json!({ "at": "2025-03-14T09:26:53Z" })),
            Err(EventDecodeError::UnsupportedVersion {
                event_type: "UserActivated".into(),
                version: 2
            })
        );
    }

    /// A made-up event whose version 1 named its one field differently, to show that an
    /// `upcast` line reads the old version as the current one.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct Renamed {
        pub to: String,
    }

    impl EventData for Renamed {
        const TYPE: &'static str = "Renamed";
        const VERSION: u32 = 2;
    }

    #[derive(Deserialize)]
    pub struct RenamedV1 {
        name: String,
    }

    impl From<RenamedV1> for Renamed {
        fn from(old: RenamedV1) -> Self {
            Self { to: old.name }
        }
    }

    stream_event! {
        RenamingEvent: Renamed;
        upcast Renamed from RenamedV1, version 1;
    }

    #[test]
    fn an_upcast_line_reads_the_old_version_and_the_event_is_written_at_the_current_one() {
        let event = RenamingEvent::from_stored("Renamed", 1, &json!({ "name": "ann" })).unwrap();
        assert_eq!(event, Renamed { to: "ann".into() }.into());
        assert_eq!((event.event_type(), event.version()), ("Renamed", 2));
        assert!(event.personal_fields().is_empty());
        assert_eq!(event.to_json(), json!({ "to": "ann" }));
        assert_eq!(
            RenamingEvent::from_stored("Renamed", 2, &event.to_json()),
            Ok(event)
        );
        assert_eq!(
            RenamingEvent::from_stored("Renamed", 3, &json!({ "to": "ann" })),
            Err(EventDecodeError::UnsupportedVersion {
                event_type: "Renamed".into(),
                version: 3
            })
        );
    }

    #[test]
    fn debug_output_of_an_event_never_shows_the_password_hash() {
        for event in user_samples() {
            let debug = format!("{event:?}");
            assert!(!debug.contains("argon2id"), "{debug}");
        }
    }
}
