//! Email reservations: the command side's proof that an email belongs to one account.
//!
//! Registering appends `UserRegistered` to `user-<id>` and [`EmailReserved`] to
//! `userEmail-<sha256 of the normalised email>`, both with expected version "no stream", in one
//! atomic append: of many concurrent registrations of one email exactly one can succeed
//! (DESIGN decision 5). Logging in finds the account through the same stream, so it is strongly
//! consistent and never reads the read model.
//!
//! The message is the command side's bookkeeping rather than a fact about the account (the
//! account's email is in `UserRegistered`), so it lives here and not in the domain crate. The
//! stream is named after a hash so the address never appears in a stream name, which reaches
//! logs and metrics.

use identity::{EVENT_VERSION_KEY, Email, UserId};
use message_store::{NewMessage, RecordedMessage, StreamName};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

/// The category of the reservation streams.
pub const EMAIL_CATEGORY: &str = "userEmail";

/// The email of the stream is taken by `user_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmailReserved {
    pub user_id: UserId,
}

impl EmailReserved {
    pub const TYPE: &'static str = "EmailReserved";
    pub const VERSION: u32 = 1;

    pub fn to_message(&self) -> NewMessage {
        NewMessage::new(Self::TYPE, json!({ "user_id": self.user_id }))
            .with_metadata(json!({ EVENT_VERSION_KEY: Self::VERSION }))
    }

    /// The reservation a stored message records, if it is one.
    pub fn from_message(message: &RecordedMessage) -> Option<Self> {
        (message.message_type == Self::TYPE)
            .then(|| serde_json::from_value(message.data.clone()).ok())
            .flatten()
    }
}

/// `userEmail-<hex sha256 of email.normalized()>`.
pub fn email_stream(email: &Email) -> anyhow::Result<StreamName> {
    let digest = Sha256::digest(email.normalized().as_bytes());
    Ok(StreamName::for_entity(EMAIL_CATEGORY, hex::encode(digest))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_that_normalise_alike_share_one_reservation_stream() {
        let a = email_stream(&Email::parse("Ann@Example.com").unwrap()).unwrap();
        let b = email_stream(&Email::parse(" ann@example.COM ").unwrap()).unwrap();
        let c = email_stream(&Email::parse("bob@example.com").unwrap()).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.category(), EMAIL_CATEGORY);
        assert!(!a.as_str().contains("ann"));
    }
}
