//! Where the domain's events live in the message store: stream names and the version metadata.
//!
//! The domain knows no store, so these are plain strings; the store's own `StreamName::parse`
//! accepts every name made here.

use serde_json::Value;

use crate::events::EventDecodeError;
use crate::values::{SessionId, UserId};

/// The category of the user streams, `user-<id>`: registration, status and password changes.
pub const USER_CATEGORY: &str = "user";

/// The category of the login streams, `userLogin-<id>`.
///
/// Kept apart from the user stream so that logging in never makes the user stream longer: a
/// decision on an account costs the same after 10,000 logins as after none, and login history
/// can be trimmed without touching the account's history.
pub const LOGIN_CATEGORY: &str = "userLogin";

/// The category of the session streams, `session-<session id>` (see [`crate::session`]).
///
/// A stream per session rather than per user, so that refreshing one session never conflicts
/// with another's, and deciding a refresh reads one short stream's last message.
pub const SESSION_CATEGORY: &str = "session";

/// The category of the recovery streams, `userRecovery-<id>` (see [`crate::recovery`]): the
/// email links an account asked for, and the mails of the last hour.
///
/// Kept apart from the user stream for the same reason as logins: anyone can ask for a reset of
/// any address, and the user stream, read at every login, must not grow with those requests.
pub const RECOVERY_CATEGORY: &str = "userRecovery";

/// The one stream of the active administrators (see [`crate::administrators`]). Its category
/// is neither of the above, so nothing that projects users reads it.
pub const ADMINISTRATORS_STREAM: &str = "administrators-active";

/// The metadata key that holds an event's version; an event without it is version 1.
///
/// The message store has no version column, so the version travels in the metadata next to
/// correlation and causation ids (Eventide calls the same thing `schemaVersion`).
pub const EVENT_VERSION_KEY: &str = "schemaVersion";

/// `user-<id>`.
pub fn user_stream_name(id: UserId) -> String {
    format!("{USER_CATEGORY}-{id}")
}

/// `userLogin-<id>`.
pub fn login_stream_name(id: UserId) -> String {
    format!("{LOGIN_CATEGORY}-{id}")
}

/// `userRecovery-<id>`.
pub fn recovery_stream_name(id: UserId) -> String {
    format!("{RECOVERY_CATEGORY}-{id}")
}

/// `session-<session id>`.
pub fn session_stream_name(id: SessionId) -> String {
    format!("{SESSION_CATEGORY}-{id}")
}

/// The user id in a `user-<id>`, `userLogin-<id>` or `userRecovery-<id>` stream name. Login and
/// recovery events do not repeat the id in their data: the stream says whose they are.
pub fn user_id_of_stream(stream_name: &str) -> Option<UserId> {
    let (category, id) = stream_name.split_once('-')?;
    if [USER_CATEGORY, LOGIN_CATEGORY, RECOVERY_CATEGORY].contains(&category) {
        id.parse().ok()
    } else {
        None
    }
}

/// The version an event was written with, read from its metadata (absent means 1).
pub fn event_version(metadata: &Value) -> Result<u32, EventDecodeError> {
    match metadata.get(EVENT_VERSION_KEY) {
        None => Ok(1),
        Some(found) => found
            .as_u64()
            .and_then(|version| u32::try_from(version).ok())
            .filter(|version| *version > 0)
            .ok_or_else(|| EventDecodeError::InvalidVersion {
                found: found.to_string(),
            }),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use uuid::Uuid;

    use super::*;

    #[test]
    fn stream_names_put_the_category_before_the_user_id() {
        let id = UserId::from_uuid(Uuid::from_u128(7));
        assert_eq!(
            user_stream_name(id),
            "user-00000000-0000-0000-0000-000000000007"
        );
        assert_eq!(
            login_stream_name(id),
            "userLogin-00000000-0000-0000-0000-000000000007"
        );
        assert_eq!(user_id_of_stream(&user_stream_name(id)), Some(id));
        assert_eq!(user_id_of_stream(&login_stream_name(id)), Some(id));
        assert_eq!(
            recovery_stream_name(id),
            "userRecovery-00000000-0000-0000-0000-000000000007"
        );
        assert_eq!(user_id_of_stream(&recovery_stream_name(id)), Some(id));
        assert_eq!(
            user_id_of_stream("other-00000000-0000-0000-0000-000000000007"),
            None
        );
        assert_eq!(user_id_of_stream("user-not-a-uuid"), None);
        assert_eq!(
            session_stream_name(SessionId::from_uuid(Uuid::from_u128(7))),
            "session-00000000-0000-0000-0000-000000000007"
        );
        assert_eq!(
            user_id_of_stream(&session_stream_name(SessionId::from_uuid(*id.as_uuid()))),
            None
        );
    }

    #[test]
    fn an_event_without_a_version_in_its_metadata_is_version_one() {
        assert_eq!(event_version(&json!({})), Ok(1));
        assert_eq!(event_version(&json!({ "schemaVersion": 3 })), Ok(3));
        assert!(event_version(&json!({ "schemaVersion": "2" })).is_err());
        assert!(event_version(&json!({ "schemaVersion": 0 })).is_err());
    }
}
