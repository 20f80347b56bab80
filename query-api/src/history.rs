//! An account's past and present, read from the message store rather than the read model: its
//! events, its profile as it stood at any instant (the fold of its streams up to then), the
//! account as its stream says now, for when the read model cannot be trusted to, and a session
//! as its stream says now, which the read model is never trusted to (ADR 11).

use chrono::{DateTime, Utc};
use identity::{
    Account, AccountStatus, EventDecodeError, LoginEvent, LoginState, SessionEvent, SessionId,
    SessionState, UserAccount, UserEvent, UserId, event_version, login_stream_name,
    session_stream_name, user_stream_name,
};
use message_store::{MessageStore, RecordedMessage, StoreError, StreamName};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::read_model::Profile;

/// How many messages one store read fetches.
const BATCH: usize = 500;

/// One entry of an account's history, without secrets.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct HistoryEntry {
    /// The event type, e.g. `UserRegistered`.
    pub r#type: String,
    pub version: u32,
    /// When it happened.
    pub time: DateTime<Utc>,
    /// Its global position in the message store.
    pub position: u64,
    /// The event's fields, password hashes removed; null for a type this build does not know.
    #[schema(value_type = Object)]
    pub data: Value,
}

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stored event {position} cannot be read: {source}")]
    Undecodable {
        position: u64,
        #[source]
        source: EventDecodeError,
    },
}

/// Every message of `stream`, in order.
async fn read_whole_stream(
    store: &dyn MessageStore,
    stream: &StreamName,
) -> Result<Vec<RecordedMessage>, StoreError> {
    let mut messages = Vec::new();
    loop {
        let from = messages
            .last()
            .map_or(0, |last: &RecordedMessage| last.position + 1);
        let batch = store.read_stream(stream, from, BATCH).await?;
        let done = batch.len() < BATCH;
        messages.extend(batch);
        if done {
            return Ok(messages);
        }
    }
}

fn streams(id: UserId) -> Result<(StreamName, StreamName), StoreError> {
    let corrupt = |error: message_store::InvalidStreamName| StoreError::Corrupt {
        id: id.to_string(),
        reason: error.to_string(),
    };
    Ok((
        StreamName::parse(user_stream_name(id)).map_err(corrupt)?,
        StreamName::parse(login_stream_name(id)).map_err(corrupt)?,
    ))
}

fn decode_user(message: &RecordedMessage) -> Result<UserEvent, HistoryError> {
    decode(message, UserEvent::from_stored)
}

fn decode_login(message: &RecordedMessage) -> Result<LoginEvent, HistoryError> {
    decode(message, LoginEvent::from_stored)
}

/// The event in `message`, read by `from_stored` of its stream's event type at the schema
/// version its metadata names.
fn decode<Event>(
    message: &RecordedMessage,
    from_stored: impl FnOnce(&str, u32, &Value) -> Result<Event, EventDecodeError>,
) -> Result<Event, HistoryError> {
    let undecodable = |source| HistoryError::Undecodable {
        position: message.global_position,
        source,
    };
    let version = event_version(&message.metadata).map_err(undecodable)?;
    from_stored(&message.message_type, version, &message.data).map_err(undecodable)
}

/// The account's events after global position `after`, oldest first, at most `limit`.
pub async fn events(
    store: &dyn MessageStore,
    id: UserId,
    after: u64,
    limit: usize,
) -> Result<Vec<HistoryEntry>, HistoryError> {
    let (user_stream, login_stream) = streams(id)?;
    let mut messages = read_whole_stream(store, &user_stream).await?;
    messages.extend(read_whole_stream(store, &login_stream).await?);
    messages.retain(|message| message.global_position > after);
    messages.sort_by_key(|message| message.global_position);
    messages.truncate(limit);
    messages.iter().map(entry).collect()
}

fn entry(message: &RecordedMessage) -> Result<HistoryEntry, HistoryError> {
    let version = event_version(&message.metadata).unwrap_or(1);
    let decoded = if message.stream.category() == identity::LOGIN_CATEGORY {
        decode_login(message).map(|event| (event.occurred_at(), event.to_json()))
    } else {
        decode_user(message).map(|event| (event.occurred_at(), event.to_json()))
    };
    let (time, data) = match decoded {
        Ok((time, mut data)) => {
            if let Some(fields) = data.as_object_mut() {
                // Of a registration, a password change, a rehash and a reset alike.
                fields.remove("password_hash");
            }
            (time, data)
        }
        // A newer writer's event: show that it happened, not what it holds.
        Err(HistoryError::Undecodable {
            source: EventDecodeError::UnknownType { .. },
            ..
        }) => (message.time, Value::Null),
        Err(error) => return Err(error),
    };
    Ok(HistoryEntry {
        r#type: message.message_type.clone(),
        version,
        time,
        position: message.global_position,
        data,
    })
}

/// The account as its stream says now (strongly consistent, as the command side decides with
/// it): `None` if it was never registered. The user stream holds registration, status and
/// password changes, never logins, so it stays short.
pub async fn current_account(
    store: &dyn MessageStore,
    id: UserId,
) -> Result<Option<Account>, HistoryError> {
    let (user_stream, _) = streams(id)?;
    let events = read_whole_stream(store, &user_stream)
        .await?
        .iter()
        .map(decode_user)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(match UserAccount::fold(&events) {
        UserAccount::Registered(account) => Some(account),
        UserAccount::NotRegistered => None,
    })
}

/// The session as its stream says now: its last message carries the whole session (ADR 10), so
/// this reads one message however often it was refreshed. An empty stream is
/// [`SessionState::Unknown`].
pub async fn current_session(
    store: &dyn MessageStore,
    id: SessionId,
) -> Result<SessionState, HistoryError> {
    let stream =
        StreamName::parse(session_stream_name(id)).map_err(|error| StoreError::Corrupt {
            id: id.to_string(),
            reason: error.to_string(),
        })?;
    let last = store
        .last_message(&stream)
        .await?
        .map(|message| decode(&message, SessionEvent::from_stored))
        .transpose()?;
    Ok(SessionState::from_last(last.as_ref()))
}

/// The profile as it stood at `at`: `None` if the account did not exist yet.
pub async fn profile_as_of(
    store: &dyn MessageStore,
    id: UserId,
    at: DateTime<Utc>,
) -> Result<Option<Profile>, HistoryError> {
    let (user_stream, login_stream) = streams(id)?;
    let mut account = UserAccount::default();
    let (mut activated_at, mut deactivated_at) = (None, None);
    for message in read_whole_stream(store, &user_stream).await? {
        let event = decode_user(&message)?;
        if event.occurred_at() > at {
            break;
        }
        match &event {
            // As the users view has it: an account registered active was activated then.
            UserEvent::UserRegistered(registered) if registered.status == AccountStatus::Active => {
                activated_at = Some(registered.registered_at);
            }
            UserEvent::UserActivated(activated) => activated_at = Some(activated.at),
            UserEvent::UserDeactivated(deactivated) => deactivated_at = Some(deactivated.at),
            _ => {}
        }
        account = identity::evolve(account, &event);
    }
    let Some(account) = account.account() else {
        return Ok(None);
    };

    // Each login event carries the login state after it, so the last one before `at` gives
    // the count; the last success before `at` gives the last login.
    let (mut last_event, mut last_login_at) = (None, None);
    for message in read_whole_stream(store, &login_stream).await? {
        let event = decode_login(&message)?;
        if event.occurred_at() > at {
            break;
        }
        if let LoginEvent::LoginSucceeded(succeeded) = &event {
            last_login_at = Some(succeeded.at);
        }
        last_event = Some(event);
    }
    let state = LoginState::from_last(last_event.as_ref());
    Ok(Some(Profile {
        id: *account.id.as_uuid(),
        email: account.email.as_str().to_owned(),
        email_verified: account.email_verified,
        status: account.status.name().to_owned(),
        registered_at: account.registered_at,
        activated_at,
        deactivated_at,
        last_login_at,
        login_count: state.login_count(),
        roles: account
            .roles
            .iter()
            .map(|role| role.name().to_owned())
            .collect(),
    }))
}
