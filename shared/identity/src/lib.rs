//! The identity domain: accounts, logins, sessions and their events, as pure decisions.
//!
//! No I/O, no async, no clock and no randomness: a command, the current state (folded from past
//! events) and `now` go in; new events or a typed refusal come out. The command API stores what
//! comes out, the aggregator projects it, and both read events back through the stream enums'
//! `from_stored` ([`UserEvent::from_stored`], [`LoginEvent::from_stored`],
//! [`SessionEvent::from_stored`], [`RecoveryEvent::from_stored`]).
//!
//! - [`values`], [`email`], [`password`]: value objects that are valid once they exist.
//! - [`events`]: the stored contract, with versions and upcasting.
//! - [`personal`]: a personal field of an event, known or erased with its person (ADR 13).
//! - [`streams`]: stream names and where the event version is kept.
//! - [`account`]: the user aggregate, [`decide`] and [`evolve`].
//! - [`login`]: deciding a login from the last login event, with lockout.
//! - [`administrators`]: the set of active administrators, which never becomes empty.
//! - [`session`]: deciding on a session from its last event: started, refreshed with rotation
//!   and reuse detection, ended.
//! - [`recovery`]: deciding on an account's email links (verify, reset, change) from the last
//!   recovery event: requested with an hourly limit, used once, expired, replaced.

#![forbid(unsafe_code)]

pub mod account;
pub mod administrators;
pub mod email;
pub mod events;
pub mod login;
pub mod password;
pub mod personal;
pub mod recovery;
pub mod session;
pub mod streams;
mod time;
pub mod values;
pub mod webhook;

#[cfg(test)]
mod given;

pub use account::{
    Account, ErasedAccount, Refusal, Register, UserAccount, UserCommand, decide, evolve,
};
pub use administrators::{
    AdministratorChange, Administrators, AdministratorsFromAccounts, change_of,
    decide_administrators,
};
pub use email::{Email, EmailError};
pub use events::{
    AdministratorsChanged, AdministratorsEvent, EmailChanged, EmailVerified, EventData,
    EventDecodeError, LockoutLifted, LoginEvent, LoginFailed, LoginSucceeded, PasswordChanged,
    PasswordRehashed, PasswordReset, RecoveryCompleted, RecoveryEvent, RecoveryRequested,
    RegistrationAttempted, SessionEnded, SessionEvent, SessionRefreshed, SessionStarted,
    SessionsEnded, UserActivated, UserDeactivated, UserErased, UserEvent, UserRegistered,
    WebhookDeleted, WebhookDisabled, WebhookEnabled, WebhookEvent, WebhookRegistered,
    WebhookSecretRotated,
};
pub use login::{LockoutPolicy, LoginDecision, LoginRefusal, LoginState, decide_login};
pub use password::{Password, PasswordError, PasswordHash, PasswordHashError, PasswordPolicy};
pub use personal::Personal;
pub use recovery::{
    InvalidRecoveryNonce, PendingRecovery, RecoveryCommand, RecoveryDecision, RecoveryKind,
    RecoveryNonce, RecoveryPolicy, RecoveryRefusal, RecoveryState, decide_recovery,
};
pub use session::{
    EndedSession, InvalidRefreshNonce, LiveSession, PreviousGeneration, RefreshNonce,
    SessionAccount, SessionCommand, SessionDecision, SessionEndReason, SessionPolicy,
    SessionRefusal, SessionState, UserAgent, decide_session,
};
pub use streams::{
    ADMINISTRATORS_STREAM, EVENT_VERSION_KEY, LOGIN_CATEGORY, RECOVERY_CATEGORY, SESSION_CATEGORY,
    USER_CATEGORY, event_version, login_stream_name, recovery_stream_name, session_stream_name,
    user_id_of_stream, user_stream_name,
};
pub use values::{AccountStatus, InitialStatus, Role, SessionId, UserId};
pub use webhook::{
    InvalidWebhookNonce, WEBHOOK_CATEGORY, WebhookCommand, WebhookEndpoint, WebhookId,
    WebhookNonce, WebhookRefusal, WebhookState, WebhookStatus, decide_webhook, evolve_webhook,
    webhook_stream_name,
};
