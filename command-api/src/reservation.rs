//! Email reservations: the command side's proof that an email belongs to one account.
//!
//! Registering appends `UserRegistered` to `user-<id>` and [`EmailReserved`] to
//! `userEmail-<keyed hash of the normalised email>`, both with expected version "no stream", in
//! one atomic append: of many concurrent registrations of one email exactly one can succeed
//! (DESIGN decision 5). Logging in finds the account through the same stream, so it is strongly
//! consistent and never reads the read model.
//!
//! A change of email moves the reservation (ADR 12): [`EmailReleased`] ends the old address's,
//! and the new address's stream gets an [`EmailReserved`], each at the exact version read, in
//! the same append as the `EmailChanged` event. A released address is free again: whoever
//! reserves it next appends at the release's version, so of a registration and a change racing
//! for it exactly one wins.
//!
//! An erasure releases the address the same way, in the append of its `UserErased`: the address
//! is free for anyone, and logging in with it answers as for an address never registered.
//!
//! The messages are the command side's bookkeeping rather than a fact about the account (the
//! account's email is in `UserRegistered`), so it lives here and not in the domain crate. The
//! stream is named after an HMAC of the address under `personal_data.lookup_key` (ADR 13): the
//! address never appears in a stream name, which reaches logs and metrics, and the name cannot
//! be reversed with a dictionary of addresses, as an unkeyed hash could, by a reader of the
//! store who lacks the key.

use identity::{EVENT_VERSION_KEY, Email, UserId};
use message_store::{ExpectedVersion, GlobalPosition, NewMessage, RecordedMessage, StreamName};
use personal_data::LookupKey;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// The category of the reservation streams.
pub const EMAIL_CATEGORY: &str = "userEmail";

/// The email of the stream is taken by `user_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmailReserved {
    pub user_id: UserId,
}

/// The email of the stream is no longer `user_id`'s: the account moved to another address, or
/// was erased.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmailReleased {
    pub user_id: UserId,
}

impl EmailReserved {
    pub const TYPE: &'static str = "EmailReserved";

    pub fn to_message(&self) -> NewMessage {
        reservation_message(Self::TYPE, self.user_id)
    }

    /// The reservation a stored message records, if it is one.
    pub fn from_message(message: &RecordedMessage) -> Option<Self> {
        of_type(message, Self::TYPE)
    }
}

impl EmailReleased {
    pub const TYPE: &'static str = "EmailReleased";

    pub fn to_message(&self) -> NewMessage {
        reservation_message(Self::TYPE, self.user_id)
    }

    /// The release a stored message records, if it is one.
    pub fn from_message(message: &RecordedMessage) -> Option<Self> {
        of_type(message, Self::TYPE)
    }
}

/// `message`'s data, if it is of `message_type` and reads as `T`.
fn of_type<T: serde::de::DeserializeOwned>(
    message: &RecordedMessage,
    message_type: &str,
) -> Option<T> {
    (message.message_type == message_type)
        .then(|| serde_json::from_value(message.data.clone()).ok())
        .flatten()
}

/// Both messages of a reservation stream are version 1 and name the account.
const VERSION: u32 = 1;

fn reservation_message(message_type: &'static str, user_id: UserId) -> NewMessage {
    NewMessage::new(message_type, json!({ "user_id": user_id }))
        .with_metadata(json!({ EVENT_VERSION_KEY: VERSION }))
}

/// A reservation stream whose last message is neither a reservation nor a release this build
/// reads: nobody may take the address on its word (a newer writer's message, or damage).
#[derive(Debug, thiserror::Error)]
#[error("the last message of {stream} ({message_type}) is not a reservation this build reads")]
pub struct UnreadableReservation {
    stream: String,
    message_type: String,
}

/// Who holds an address, from the last message of its reservation stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// Nobody: never reserved, or released. Reserving it appends at `expected`.
    Free { expected: ExpectedVersion },
    /// The account `user_id`, since the message at `global_position`, the last of the stream
    /// at `expected`.
    HeldBy {
        user_id: UserId,
        expected: ExpectedVersion,
        global_position: GlobalPosition,
    },
}

impl Reservation {
    /// The reservation as `last` leaves it. Only an empty stream or a release this build reads
    /// frees the address: anything else is an error rather than a free address that two
    /// accounts could then take.
    pub fn from_last(last: Option<&RecordedMessage>) -> Result<Self, UnreadableReservation> {
        let Some(last) = last else {
            return Ok(Self::Free {
                expected: ExpectedVersion::NoStream,
            });
        };
        let expected = ExpectedVersion::Exact(last.position);
        if let Some(reserved) = EmailReserved::from_message(last) {
            return Ok(Self::HeldBy {
                user_id: reserved.user_id,
                expected,
                global_position: last.global_position,
            });
        }
        if EmailReleased::from_message(last).is_some() {
            return Ok(Self::Free { expected });
        }
        Err(UnreadableReservation {
            stream: last.stream.to_string(),
            message_type: last.message_type.clone(),
        })
    }

    pub fn holder(&self) -> Option<UserId> {
        match self {
            Self::Free { .. } => None,
            Self::HeldBy { user_id, .. } => Some(*user_id),
        }
    }

    /// The version the stream is at, for an append that must find it unchanged.
    pub fn expected(&self) -> ExpectedVersion {
        match self {
            Self::Free { expected } | Self::HeldBy { expected, .. } => *expected,
        }
    }
}

/// `userEmail-<hex HMAC-SHA-256 under lookup_key of email.normalized()>`.
pub fn email_stream(lookup_key: &LookupKey, email: &Email) -> anyhow::Result<StreamName> {
    let digest = lookup_key.digest(email.normalized());
    Ok(StreamName::for_entity(EMAIL_CATEGORY, digest)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream_of(key: &LookupKey, email: &str) -> StreamName {
        email_stream(key, &Email::parse(email).unwrap()).unwrap()
    }

    #[test]
    fn addresses_that_normalise_alike_share_one_reservation_stream() {
        let key = LookupKey::generate().unwrap();
        let a = stream_of(&key, "Ann@Example.com");
        let b = stream_of(&key, " ann@example.COM ");
        let c = stream_of(&key, "bob@example.com");
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.category(), EMAIL_CATEGORY);
        assert!(!a.as_str().contains("ann"));
    }

    #[test]
    fn the_stream_is_named_by_the_keyed_hash_never_by_the_plain_sha256() {
        use sha2::{Digest, Sha256};
        let key = LookupKey::generate().unwrap();
        let stream = stream_of(&key, "ann@example.com");
        assert_eq!(
            stream.as_str(),
            format!("userEmail-{}", key.digest("ann@example.com"))
        );
        let unkeyed = hex::encode(Sha256::digest(b"ann@example.com"));
        assert!(!stream.as_str().contains(&unkeyed));
        // Another key names another stream: without the key the name says nothing.
        let other = LookupKey::generate().unwrap();
        assert_ne!(stream, stream_of(&other, "ann@example.com"));
    }

    fn recorded(message: NewMessage, position: u64) -> RecordedMessage {
        RecordedMessage {
            id: message.id,
            stream: stream_of(&LookupKey::generate().unwrap(), "ann@example.com"),
            position,
            global_position: 10 + position,
            message_type: message.message_type,
            data: message.data,
            metadata: message.metadata,
            time: chrono::DateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn only_an_empty_stream_or_a_release_frees_an_address() {
        let ann = UserId::from_uuid(uuid::Uuid::now_v7());
        assert_eq!(
            Reservation::from_last(None).unwrap(),
            Reservation::Free {
                expected: ExpectedVersion::NoStream
            }
        );
        let reserved = recorded(EmailReserved { user_id: ann }.to_message(), 0);
        assert_eq!(
            Reservation::from_last(Some(&reserved)).unwrap().holder(),
            Some(ann)
        );
        let released = recorded(EmailReleased { user_id: ann }.to_message(), 1);
        assert_eq!(
            Reservation::from_last(Some(&released)).unwrap(),
            Reservation::Free {
                expected: ExpectedVersion::Exact(1)
            }
        );
        let unknown = recorded(NewMessage::new("EmailTransferred", json!({})), 2);
        assert!(Reservation::from_last(Some(&unknown)).is_err());
        let damaged = recorded(
            NewMessage::new(EmailReserved::TYPE, json!({ "user": 1 })),
            3,
        );
        assert!(Reservation::from_last(Some(&damaged)).is_err());
    }
}
