//! An account's past and present, read from the message store rather than the read model: its
//! events, its profile as it stood at any instant (the fold of its streams up to then), the
//! account as its stream says now, for when the read model cannot be trusted to, and a session
//! as its stream says now, which the read model is never trusted to (ADR 11).
//!
//! Personal fields are stored sealed with their person's key (ADR 13): every message of the
//! user stream is opened by the [`Sealer`] before it is decoded, one key query for
//! all the messages read. Once a person is erased their key is gone and those fields read as
//! null; their events stay, and say what happened and when. An account whose stream holds its
//! erasure is shown erased even while its key still exists (the command API deletes it just
//! after appending the erasure, and the projection again if it died in between).

use chrono::{DateTime, Utc};
use identity::{
    Account, AccountStatus, EventDecodeError, LoginEvent, LoginState, RecoveryEvent, SessionEvent,
    SessionId, SessionState, UserAccount, UserEvent, UserId, event_version, login_stream_name,
    recovery_stream_name, session_stream_name, user_stream_name,
};
use message_store::{MessageStore, RecordedMessage, StoreError, StreamName};
use personal_data::Sealer;
use read_model_schema::ERASED_STATUS;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::read_model::Profile;

/// How many messages one store read fetches.
const BATCH: usize = 500;

/// The secrets a user event may hold, never shown: a password hash (of a registration, a
/// change, a rehash or a reset).
const SECRET_FIELDS: &[&str] = &["password_hash"];

/// The secrets a recovery event holds, never shown: the nonce its link's secret derives from,
/// and the recovery state, which holds the pending links' nonces and a registration's password
/// hash.
const RECOVERY_SECRET_FIELDS: &[&str] = &["nonce", "state"];

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
    /// The event's fields, without password hashes; null for a type this build does not know. Of an erased account, every personal field (an
    /// address, its normalised form) is null: the events stay, who they were about does not.
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
    /// The personal fields of a message could not be opened: the key vault is out of reach, or
    /// a field is not what its person's key sealed.
    #[error("personal data cannot be opened: {0}")]
    Sealed(#[from] personal_data::VaultError),
}

/// Every message of `stream`, in order.
async fn read_whole_stream(
    store: &dyn MessageStore,
    stream: &StreamName,
) -> Result<Vec<RecordedMessage>, StoreError> {
    read_stream_from(store, stream, 0).await
}

/// Every message of `stream` from stream position `from`, in order.
async fn read_stream_from(
    store: &dyn MessageStore,
    stream: &StreamName,
    from: u64,
) -> Result<Vec<RecordedMessage>, StoreError> {
    let mut messages = Vec::new();
    loop {
        let from = messages
            .last()
            .map_or(from, |last: &RecordedMessage| last.position + 1);
        let batch = store.read_stream(stream, from, BATCH).await?;
        let done = batch.len() < BATCH;
        messages.extend(batch);
        if done {
            return Ok(messages);
        }
    }
}

/// Every message of `stream`, in order, its personal fields opened (null where their person is
/// erased).
async fn read_personal_stream(
    store: &dyn MessageStore,
    sealer: &Sealer,
    stream: &StreamName,
) -> Result<Vec<RecordedMessage>, HistoryError> {
    let mut messages = read_whole_stream(store, stream).await?;
    sealer.unseal_messages(&mut messages).await?;
    Ok(messages)
}

/// The names of an account's streams.
struct Streams {
    user: StreamName,
    login: StreamName,
    recovery: StreamName,
}

impl Streams {
    fn of(id: UserId) -> Result<Self, StoreError> {
        let parse = |name: String| {
            StreamName::parse(name).map_err(|error| StoreError::Corrupt {
                id: id.to_string(),
                reason: error.to_string(),
            })
        };
        Ok(Self {
            user: parse(user_stream_name(id))?,
            login: parse(login_stream_name(id))?,
            recovery: parse(recovery_stream_name(id))?,
        })
    }
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

/// The events of `messages` this build knows, each read by `decode`, in order: a newer
/// writer's event is passed over, as the users view passes over it.
fn known_events<Event>(
    messages: &[RecordedMessage],
    decode: impl Fn(&RecordedMessage) -> Result<Event, HistoryError>,
) -> Result<Vec<Event>, HistoryError> {
    let mut events = Vec::with_capacity(messages.len());
    for message in messages {
        match decode(message) {
            Ok(event) => events.push(event),
            Err(HistoryError::Undecodable {
                source: EventDecodeError::UnknownType { .. },
                ..
            }) => {}
            Err(error) => return Err(error),
        }
    }
    Ok(events)
}

/// Whether the account the user stream's `events` make was erased: by its erasure event, or
/// because its personal data is gone (the key deleted just after a read of the stream that
/// came too early to see the event).
fn is_erased(events: &[UserEvent]) -> bool {
    UserAccount::fold(events).is_erased()
}

/// The account's events after global position `after`, oldest first, at most `limit`.
pub async fn events(
    store: &dyn MessageStore,
    sealer: &Sealer,
    id: UserId,
    after: u64,
    limit: usize,
) -> Result<Vec<HistoryEntry>, HistoryError> {
    let streams = Streams::of(id)?;
    // The whole user stream (it stays short: logins are elsewhere), so that whether the
    // account is erased is known on every page.
    let mut messages = read_personal_stream(store, sealer, &streams.user).await?;
    let erased = is_erased(&known_events(&messages, decode_user)?);
    messages.extend(read_whole_stream(store, &streams.login).await?);
    messages.retain(|message| message.global_position > after);
    messages.sort_by_key(|message| message.global_position);
    messages.truncate(limit);
    messages
        .iter()
        .map(|message| account_entry(message, erased))
        .collect()
}

/// A message of the user or the login stream as an entry of the account's history: its
/// personal fields null if the account is `erased`.
fn account_entry(message: &RecordedMessage, erased: bool) -> Result<HistoryEntry, HistoryError> {
    if message.stream.category() == identity::LOGIN_CATEGORY {
        entry(message, SECRET_FIELDS, |message| {
            decode_login(message).map(|event| (event.occurred_at(), event.to_json(), &[][..]))
        })
    } else {
        entry(message, SECRET_FIELDS, |message| {
            decode_user(message).map(|event| {
                let personal = if erased { event.personal_fields() } else { &[] };
                (event.occurred_at(), event.to_json(), personal)
            })
        })
    }
}

/// A message of the recovery stream as an entry: without its nonce and state, its personal
/// fields null if the account is `erased`.
fn recovery_entry(message: &RecordedMessage, erased: bool) -> Result<HistoryEntry, HistoryError> {
    entry(message, RECOVERY_SECRET_FIELDS, |message| {
        decode(message, RecoveryEvent::from_stored).map(|event| {
            let personal = if erased { event.personal_fields() } else { &[] };
            (event.occurred_at(), event.to_json(), personal)
        })
    })
}

/// `message` as an entry: `decode` gives the event's time, its fields and the personal ones to
/// show as null; the `secrets` are removed. An event of a type this build does not know shows
/// that it happened, not what it holds.
fn entry(
    message: &RecordedMessage,
    secrets: &[&str],
    decode: impl FnOnce(
        &RecordedMessage,
    ) -> Result<(DateTime<Utc>, Value, &'static [&'static str]), HistoryError>,
) -> Result<HistoryEntry, HistoryError> {
    let version = event_version(&message.metadata).unwrap_or(1);
    let (time, data) = match decode(message) {
        Ok((time, mut data, erased)) => {
            if let Some(fields) = data.as_object_mut() {
                for secret in secrets {
                    fields.remove(*secret);
                }
                for personal in erased {
                    if let Some(field) = fields.get_mut(*personal) {
                        *field = Value::Null;
                    }
                }
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

/// Everything the message store holds of an account, its personal fields opened: what its
/// person's export gives them.
#[derive(Debug)]
pub struct AccountRecord {
    /// The profile its events make at the time asked; `None` if it was never registered.
    pub profile: Option<Profile>,
    /// Its user and login events, oldest first, as [`events`] lists them.
    pub events: Vec<HistoryEntry>,
    /// Its recovery events (each link or notice mailed, each link used), oldest first, without
    /// nonces and recovery states.
    pub recovery: Vec<HistoryEntry>,
}

/// Everything the message store holds of the account, with its profile as it is at `now`.
pub async fn account_record(
    store: &dyn MessageStore,
    sealer: &Sealer,
    id: UserId,
    now: DateTime<Utc>,
) -> Result<AccountRecord, HistoryError> {
    let streams = Streams::of(id)?;
    let user = read_personal_stream(store, sealer, &streams.user).await?;
    let logins = read_whole_stream(store, &streams.login).await?;
    let recovery = read_personal_stream(store, sealer, &streams.recovery).await?;
    let user_events = known_events(&user, decode_user)?;
    let login_events = known_events(&logins, decode_login)?;
    let erased = is_erased(&user_events);

    let mut account: Vec<&RecordedMessage> = user.iter().chain(&logins).collect();
    account.sort_by_key(|message| message.global_position);
    Ok(AccountRecord {
        profile: past_profile(&user_events, &login_events, now),
        events: account
            .into_iter()
            .map(|message| account_entry(message, erased))
            .collect::<Result<_, _>>()?,
        recovery: recovery
            .iter()
            .map(|message| recovery_entry(message, erased))
            .collect::<Result<_, _>>()?,
    })
}

/// The account as its stream says now (strongly consistent, as the command side decides with
/// it): `None` if it was never registered, or was erased. The user stream holds registration,
/// status and password changes, never logins, so it stays short.
pub async fn current_account(
    store: &dyn MessageStore,
    sealer: &Sealer,
    id: UserId,
) -> Result<Option<Account>, HistoryError> {
    let streams = Streams::of(id)?;
    let events = read_personal_stream(store, sealer, &streams.user)
        .await?
        .iter()
        .map(decode_user)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(match UserAccount::fold(&events) {
        UserAccount::Registered(account) => Some(account),
        UserAccount::NotRegistered | UserAccount::Erased(_) => None,
    })
}

/// The session as its stream says now: its last message carries the whole session (ADR 10), so
/// this reads one message however often it was refreshed. An empty stream is
/// [`SessionState::Unknown`]. Session events hold no personal data.
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
///
/// Of an account erased since (even after `at`), the profile as it stood then without its
/// personal data, which is gone: `email` null, and `erased_at` saying when it was erased; its
/// `status` is the one it had at `at` (`erased` from its erasure on).
pub async fn profile_as_of(
    store: &dyn MessageStore,
    sealer: &Sealer,
    id: UserId,
    at: DateTime<Utc>,
) -> Result<Option<Profile>, HistoryError> {
    let streams = Streams::of(id)?;
    let mut user = read_personal_stream(store, sealer, &streams.user).await?;
    let mut events = user
        .iter()
        .map(decode_user)
        .collect::<Result<Vec<_>, _>>()?;
    if is_erased(&events) && erasure_time(&events).is_none() {
        // Its data is gone but its erasure was not read: the key was deleted after the stream
        // was read, and the erasure, appended before the deletion, is there now.
        let from = user.last().map_or(0, |last| last.position + 1);
        let mut rest = read_stream_from(store, &streams.user, from).await?;
        sealer.unseal_messages(&mut rest).await?;
        events.extend(
            rest.iter()
                .map(decode_user)
                .collect::<Result<Vec<_>, _>>()?,
        );
        user.extend(rest);
    }
    let logins = read_whole_stream(store, &streams.login)
        .await?
        .iter()
        .map(decode_login)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(past_profile(&events, &logins, at))
}

/// When the account was erased, by its erasure event.
fn erasure_time(events: &[UserEvent]) -> Option<DateTime<Utc>> {
    events.iter().find_map(|event| match event {
        UserEvent::UserErased(erased) => Some(erased.at),
        _ => None,
    })
}

/// The profile the account's user and login events make at `at`, as the users view makes the
/// present one (aggregator/src/view.rs), so that a past profile reads like a current one;
/// `None` before the registration. The domain's fold is not used: it knows nothing of an
/// erased account's past, only that it is erased.
fn past_profile(
    user_events: &[UserEvent],
    login_events: &[LoginEvent],
    at: DateTime<Utc>,
) -> Option<Profile> {
    let mut profile: Option<Profile> = None;
    for event in user_events
        .iter()
        .take_while(|event| event.occurred_at() <= at)
    {
        match (&mut profile, event) {
            (None, UserEvent::UserRegistered(registered)) => {
                profile = Some(Profile {
                    id: *registered.user_id.as_uuid(),
                    email: registered
                        .email
                        .known()
                        .map(|email| email.as_str().to_owned()),
                    email_verified: false,
                    status: registered.status.name().to_owned(),
                    registered_at: registered.registered_at,
                    // As the users view has it: an account registered active was activated
                    // then.
                    activated_at: (registered.status == AccountStatus::Active)
                        .then_some(registered.registered_at),
                    deactivated_at: None,
                    last_login_at: None,
                    login_count: 0,
                    roles: registered
                        .roles
                        .iter()
                        .map(|role| role.name().to_owned())
                        .collect(),
                    erased_at: None,
                });
            }
            // Nothing applies before the registration, nor a second one.
            (None, _) | (Some(_), UserEvent::UserRegistered(_)) => {}
            (Some(profile), UserEvent::UserActivated(activated)) => {
                profile.status = AccountStatus::Active.name().to_owned();
                profile.activated_at = Some(activated.at);
            }
            (Some(profile), UserEvent::UserDeactivated(deactivated)) => {
                profile.status = AccountStatus::Deactivated.name().to_owned();
                profile.deactivated_at = Some(deactivated.at);
            }
            (Some(profile), UserEvent::EmailVerified(_)) => profile.email_verified = true,
            // The new address was proven by the link mailed to it.
            (Some(profile), UserEvent::EmailChanged(changed)) => {
                profile.email = changed.email.known().map(|email| email.as_str().to_owned());
                profile.email_verified = true;
            }
            (Some(profile), UserEvent::UserErased(erased)) => {
                profile.status = ERASED_STATUS.to_owned();
                profile.erased_at = Some(erased.at);
            }
            // Nothing of a password or a session is in a profile.
            (
                Some(_),
                UserEvent::PasswordChanged(_)
                | UserEvent::PasswordRehashed(_)
                | UserEvent::PasswordReset(_)
                | UserEvent::SessionsEnded(_),
            ) => {}
        }
    }
    let mut profile = profile?;
    if is_erased(user_events) {
        // Erased now, whenever `at` is: its data is gone, and the answer says since when.
        profile.email = None;
        profile.erased_at = erasure_time(user_events);
    }

    // Each login event carries the login state after it, so the last one before `at` gives
    // the count; the last success before `at` gives the last login.
    let until_then = || {
        login_events
            .iter()
            .take_while(|event| event.occurred_at() <= at)
    };
    profile.last_login_at = until_then()
        .filter_map(|event| match event {
            LoginEvent::LoginSucceeded(succeeded) => Some(succeeded.at),
            _ => None,
        })
        .last();
    profile.login_count = LoginState::from_last(until_then().last()).login_count();
    Some(profile)
}

#[cfg(test)]
mod tests {
    use chrono::{TimeDelta, TimeZone};
    use identity::{
        Email, EmailChanged, LoginSucceeded, PasswordHash, Personal, Role, UserActivated,
        UserDeactivated, UserErased, UserRegistered,
    };
    use uuid::Uuid;

    use super::*;

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 1, 9, 0, 0).unwrap()
    }

    fn minutes(n: i64) -> DateTime<Utc> {
        t0() + TimeDelta::minutes(n)
    }

    fn ann() -> UserId {
        UserId::from_uuid(Uuid::from_u128(7))
    }

    /// Ann's registration, her personal fields known or gone.
    fn registered(known: bool) -> UserEvent {
        let email = Email::parse("Ann@Example.com").unwrap();
        let hash = PasswordHash::parse(
            "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
        )
        .unwrap();
        let (email, email_normalized, password_hash) = if known {
            (
                Personal::Known(email.clone()),
                Personal::Known(email.normalized().to_owned()),
                Personal::Known(hash),
            )
        } else {
            (Personal::Erased, Personal::Erased, Personal::Erased)
        };
        UserRegistered {
            user_id: ann(),
            email,
            email_normalized,
            password_hash,
            status: AccountStatus::Pending,
            roles: vec![Role::User],
            registered_at: t0(),
        }
        .into()
    }

    fn history(known: bool, erased: bool) -> Vec<UserEvent> {
        let mut events = vec![
            registered(known),
            UserActivated { at: minutes(10) }.into(),
            UserDeactivated { at: minutes(20) }.into(),
        ];
        if erased {
            events.push(
                UserErased {
                    erased_by: ann(),
                    at: minutes(30),
                }
                .into(),
            );
        }
        events
    }

    fn logged_in(at: DateTime<Utc>, login_count: u64) -> LoginEvent {
        LoginEvent::LoginSucceeded(LoginSucceeded { at, login_count })
    }

    #[test]
    fn a_past_profile_is_the_fold_of_the_events_until_then() {
        let logins = [logged_in(minutes(12), 1), logged_in(minutes(15), 2)];
        let events = history(true, false);
        assert_eq!(past_profile(&events, &logins, minutes(-1)), None);

        let pending = past_profile(&events, &logins, minutes(5)).unwrap();
        assert_eq!(pending.status, "pending");
        assert_eq!(pending.email.as_deref(), Some("Ann@Example.com"));
        assert_eq!((pending.activated_at, pending.login_count), (None, 0));

        let active = past_profile(&events, &logins, minutes(13)).unwrap();
        assert_eq!(active.status, "active");
        assert_eq!(active.activated_at, Some(minutes(10)));
        assert_eq!(
            (active.last_login_at, active.login_count),
            (Some(minutes(12)), 1)
        );

        let deactivated = past_profile(&events, &logins, minutes(25)).unwrap();
        assert_eq!(deactivated.status, "deactivated");
        assert_eq!(deactivated.login_count, 2);
        assert_eq!(deactivated.erased_at, None);
    }

    #[test]
    fn a_past_profile_of_an_account_erased_since_has_no_address_and_says_it_is_erased() {
        // The key deleted, or not yet: the erasure event decides alike.
        for known in [false, true] {
            let events = history(known, true);
            let before = past_profile(&events, &[], minutes(15)).unwrap();
            assert_eq!(before.status, "active", "the status it had then");
            assert_eq!(before.email, None);
            assert_eq!(before.erased_at, Some(minutes(30)));

            let after = past_profile(&events, &[], minutes(31)).unwrap();
            assert_eq!(after.status, ERASED_STATUS);
            assert_eq!((after.email, after.erased_at), (None, Some(minutes(30))));
        }
        // Its data gone, its erasure not read: erased, since an unknown instant.
        let gone = past_profile(&history(false, false), &[], minutes(15)).unwrap();
        assert_eq!(
            (gone.status.as_str(), gone.email, gone.erased_at),
            ("active", None, None)
        );
    }

    #[test]
    fn a_change_of_email_moves_the_past_profile_to_the_new_verified_address() {
        let mut events = history(true, false);
        let new = Email::parse("ann@example.org").unwrap();
        events.push(
            EmailChanged {
                email_normalized: Personal::Known(new.normalized().to_owned()),
                email: Personal::Known(new),
                at: minutes(40),
            }
            .into(),
        );
        let profile = past_profile(&events, &[], minutes(41)).unwrap();
        assert_eq!(profile.email.as_deref(), Some("ann@example.org"));
        assert!(profile.email_verified);
    }
}
