//! The personal data of the events the command side writes and reads (ADR 13).
//!
//! Every `UserEvent` and `RecoveryEvent` written has its personal fields sealed with its
//! account's key, which is read from the vault (or made, on the account's first write) once per
//! command that writes any ([`WritingKey`]); an event with personal fields is never turned into
//! a message without one, so nothing reaches the store in clear by omission. Every user and
//! recovery message read is opened before it is decoded ([`Commands::unseal`]), with one read of
//! the vault per batch; the fields of an erased person read as erased, so their account folds
//! into `UserAccount::Erased` and every command on it is refused.
//!
//! Once a person is erased the vault makes no key for them again: a command that would write
//! their personal data meets [`CommandError::AccountErased`] here, and answers as it answers for
//! an account it found erased (each caller says how, with [`erased_is`]).

use identity::{RecoveryEvent, UserEvent, UserId};
use message_store::{NewMessage, RecordedMessage};
use personal_data::{PersonKey, VaultError, seal_fields};
use serde_json::Value;
use uuid::Uuid;

use crate::service::{CommandError, Commands, versioned_message};

/// One account's key, read from the vault once for the writes of one command.
pub(crate) struct WritingKey {
    person: Uuid,
    key: PersonKey,
}

impl WritingKey {
    /// `data` with `fields` sealed for the key's account.
    fn sealed(&self, fields: &[&str], mut data: Value) -> Value {
        seal_fields(&self.key, self.person, &mut data, fields);
        data
    }

    /// A recovery event of the key's account as a message, its personal fields sealed.
    pub(crate) fn recovery_message(&self, event: &RecoveryEvent) -> NewMessage {
        let data = self.sealed(event.personal_fields(), event.to_json());
        versioned_message(event.event_type(), data, event.version())
    }
}

/// Whether any of `events` has personal fields: whether writing them takes the account's key.
pub(crate) fn hold_personal_data(events: &[UserEvent]) -> bool {
    events
        .iter()
        .any(|event| !event.personal_fields().is_empty())
}

/// User events as messages for their account's stream, each personal field sealed with `key`.
/// Events with personal fields and no key are refused, never written in clear.
pub(crate) fn user_messages(
    key: Option<&WritingKey>,
    events: &[UserEvent],
) -> Result<Vec<NewMessage>, CommandError> {
    events
        .iter()
        .map(|event| {
            let fields = event.personal_fields();
            let data = match key {
                Some(key) => key.sealed(fields, event.to_json()),
                None if fields.is_empty() => event.to_json(),
                None => {
                    return Err(CommandError::Internal(anyhow::anyhow!(
                        "a {} event was about to be written without its account's key",
                        event.event_type()
                    )));
                }
            };
            Ok(versioned_message(event.event_type(), data, event.version()))
        })
        .collect()
}

impl Commands {
    /// The key to seal `id`'s personal fields with, made on the account's first write;
    /// [`CommandError::AccountErased`] once the account is erased.
    pub(crate) async fn writing_key(&self, id: UserId) -> Result<WritingKey, CommandError> {
        let person = *id.as_uuid();
        match self.sealer.key_for_writing(person).await {
            Ok(key) => Ok(WritingKey { person, key }),
            Err(VaultError::Erased) => Err(CommandError::AccountErased),
            Err(error) => Err(vault_failed(error, "reading an account's key")),
        }
    }

    /// Opens the sealed fields of `messages` in place, the fields of an erased person as null.
    pub(crate) async fn unseal(
        &self,
        messages: &mut [RecordedMessage],
    ) -> Result<(), CommandError> {
        self.sealer
            .unseal_messages(messages)
            .await
            .map_err(|error| vault_failed(error, "opening the personal fields of messages"))
    }

    /// Reads the keys of a person nobody is: what opening a stream of an account costs, for a
    /// login with an unknown email, which has no account's messages to open.
    pub(crate) async fn read_no_key(&self) -> Result<(), CommandError> {
        self.sealer
            .vault()
            .keys(&[Uuid::nil()])
            .await
            .map(drop)
            .map_err(|error| vault_failed(error, "reading the keys of nobody"))
    }

    /// Deletes `id`'s key for good (again, if it is gone already): every personal field of the
    /// account's reads as erased from now on.
    pub(crate) async fn erase_key(&self, id: UserId) -> Result<(), CommandError> {
        self.sealer
            .vault()
            .erase(*id.as_uuid())
            .await
            .map(drop)
            .map_err(|error| vault_failed(error, "deleting an erased account's key"))
    }
}

/// A vault error: its database out of reach, which the caller may retry, or a fault (a key
/// under a master key not configured, a field that does not open).
pub(crate) fn vault_failed(error: VaultError, doing: &'static str) -> CommandError {
    let unavailable = error.is_unavailable();
    let error = anyhow::Error::new(error).context(doing);
    if unavailable {
        CommandError::StoreUnavailable(error)
    } else {
        CommandError::Internal(error)
    }
}

/// For `map_err`: an account found erased by the vault answers `instead`, what the command
/// answers for an account it read as erased; any other error is left as it is.
pub(crate) fn erased_is(
    instead: fn() -> CommandError,
) -> impl FnOnce(CommandError) -> CommandError {
    move |error| match error {
        CommandError::AccountErased => instead(),
        error => error,
    }
}

#[cfg(test)]
mod tests {
    use identity::{PasswordChanged, UserActivated};

    use super::*;

    fn hash() -> identity::PasswordHash {
        identity::PasswordHash::parse("$argon2id$v=19$m=1024,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo")
            .unwrap()
    }

    #[test]
    fn events_with_personal_fields_are_never_written_without_a_key() {
        let now = chrono::DateTime::UNIX_EPOCH;
        let plain: UserEvent = UserActivated { at: now }.into();
        assert!(!hold_personal_data(std::slice::from_ref(&plain)));
        assert_eq!(user_messages(None, &[plain]).unwrap().len(), 1);
        let personal: UserEvent = PasswordChanged {
            password_hash: hash().into(),
            at: now,
        }
        .into();
        assert!(hold_personal_data(std::slice::from_ref(&personal)));
        assert!(matches!(
            user_messages(None, &[personal]),
            Err(CommandError::Internal(_))
        ));
    }

    #[test]
    fn a_written_personal_field_is_an_envelope_for_its_account() {
        let person = Uuid::now_v7();
        let key = WritingKey {
            person,
            key: PersonKey::generate().unwrap(),
        };
        let event: UserEvent = PasswordChanged {
            password_hash: hash().into(),
            at: chrono::DateTime::UNIX_EPOCH,
        }
        .into();
        let messages = user_messages(Some(&key), &[event]).unwrap();
        let sealed = &messages[0].data["password_hash"];
        assert!(personal_data::is_envelope(sealed));
        assert_eq!(personal_data::sealed_persons(&messages[0].data), [person]);
        assert!(!messages[0].data.to_string().contains("argon2"));
    }
}
