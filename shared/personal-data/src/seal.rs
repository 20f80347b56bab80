//! Sealing the personal fields of a message's data, and opening them again.
//!
//! A sealed field's value is an envelope that names its person, so a reader unseals any message
//! without knowing whose stream it came from, fetching the keys of a whole batch at once
//! ([`sealed_persons`], then [`crate::KeyVault::keys`]):
//!
//! ```json
//! {"sealed_for": "<person uuid>", "aes256gcm": "<base64url of nonce || ciphertext>"}
//! ```
//!
//! The plaintext is the field's value as JSON; the associated data binds the person and the
//! field's name, so an envelope copied to another field or relabelled for another person does
//! not open. Only top-level fields are sealed: that is all a message's personal fields are.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::keys::PersonKey;

/// The envelope's member naming its person.
const SEALED_FOR: &str = "sealed_for";
/// The envelope's member holding the ciphertext, named after the cipher so that a later one can
/// sit beside it.
const CIPHERTEXT: &str = "aes256gcm";

/// Put in front of a field's associated data, so that a field's ciphertext and a wrapped key can
/// never stand in for each other.
const FIELD_DOMAIN: &[u8] = b"personal-data field v1\0";

impl PersonKey {
    /// `value` sealed for `person` as field `field`: an envelope that only this key opens, and
    /// only as that person's field of that name.
    pub fn seal(&self, person: Uuid, field: &str, value: &Value) -> Value {
        let plaintext = Zeroizing::new(value.to_string().into_bytes());
        let sealed = self.encrypt(&field_aad(person, field), &plaintext);
        let mut envelope = Map::new();
        envelope.insert(SEALED_FOR.to_owned(), Value::String(person.to_string()));
        envelope.insert(
            CIPHERTEXT.to_owned(),
            Value::String(URL_SAFE_NO_PAD.encode(sealed)),
        );
        Value::Object(envelope)
    }

    /// The value [`Self::seal`] sealed in `envelope` for `person` as field `field`.
    pub fn open(&self, person: Uuid, field: &str, envelope: &Value) -> Result<Value, SealError> {
        let malformed = || SealError::Malformed {
            field: field.to_owned(),
        };
        let ciphertext = envelope
            .get(CIPHERTEXT)
            .and_then(Value::as_str)
            .ok_or_else(malformed)?;
        let sealed = URL_SAFE_NO_PAD
            .decode(ciphertext)
            .map_err(|_| malformed())?;
        let plaintext = self
            .decrypt(&field_aad(person, field), &sealed)
            .ok_or_else(|| SealError::DoesNotAuthenticate {
                person,
                field: field.to_owned(),
            })?;
        serde_json::from_slice(&plaintext).map_err(|_| malformed())
    }
}

/// Seals, for `person` under `key`, each of `fields` that `data` (a JSON object) has and that is
/// neither null nor sealed already. Null stays null: it says the field has no value, which is no
/// personal data, and readers need not tell it from an erased one.
pub fn seal_fields(key: &PersonKey, person: Uuid, data: &mut Value, fields: &[&str]) {
    let Some(object) = data.as_object_mut() else {
        return;
    };
    for &field in fields {
        if let Some(value) = object.get_mut(field)
            && !value.is_null()
            && !is_envelope(value)
        {
            *value = key.seal(person, field, value);
        }
    }
}

/// Whether `value` is an envelope [`PersonKey::seal`] made: an object of exactly its two
/// members, naming a person by UUID. Personal fields hold no such objects of their own.
pub fn is_envelope(value: &Value) -> bool {
    envelope_person(value).is_some()
}

/// The persons whose envelopes are top-level fields of `data`, each once, in the order their
/// first field comes: whose keys a reader needs to unseal it.
pub fn sealed_persons(data: &Value) -> Vec<Uuid> {
    sealed_persons_of(data, Fields::Every)
}

/// The persons the envelopes of `fields` in `data` are sealed for.
pub fn sealed_persons_of(data: &Value, fields: Fields<'_>) -> Vec<Uuid> {
    let mut persons = Vec::new();
    for person in data
        .as_object()
        .into_iter()
        .flat_map(Map::iter)
        .filter(|(field, _)| fields.includes(field))
        .filter_map(|(_, value)| envelope_person(value))
    {
        if !persons.contains(&person) {
            persons.push(person);
        }
    }
    persons
}

/// Which sealed fields a reader opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fields<'a> {
    /// Every sealed field: a reader that needs the whole event (a projection, the command side).
    Every,
    /// These fields alone; every other sealed field becomes null unopened, as if erased. A
    /// reader that publishes one field (the relays of integration events, which publish the
    /// address and never a password hash) then never holds the others in clear, and pays
    /// nothing to open them.
    Only(&'a [&'a str]),
}

impl Fields<'_> {
    fn includes(self, field: &str) -> bool {
        match self {
            Self::Every => true,
            Self::Only(fields) => fields.contains(&field),
        }
    }
}

/// What [`unseal_fields`] did to a message's data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Unsealed {
    /// Some field's person had no key: erased, and the field is now null.
    pub erased: bool,
    /// How many fields were opened.
    pub opened: usize,
}

/// Replaces each top-level envelope in `data` by the value sealed in it, opened with the key
/// `key_of` gives for its person, or by null when it gives none: the person was erased.
///
/// An envelope that does not open under a key that is there is an error, never taken for an
/// erasure: it was altered or the wrong key was handed in, and reading it as erased would lose
/// the field in every view built from it. On an error `data` is left as it was.
pub fn unseal_fields<'k>(
    data: &mut Value,
    key_of: impl Fn(Uuid) -> Option<&'k PersonKey>,
) -> Result<Unsealed, SealError> {
    unseal_fields_of(data, Fields::Every, key_of)
}

/// [`unseal_fields`] for `fields` only: every other envelope becomes null unopened (it counts
/// neither as opened nor as erased).
pub fn unseal_fields_of<'k>(
    data: &mut Value,
    fields: Fields<'_>,
    key_of: impl Fn(Uuid) -> Option<&'k PersonKey>,
) -> Result<Unsealed, SealError> {
    let Some(object) = data.as_object_mut() else {
        return Ok(Unsealed::default());
    };
    let mut unsealed = Unsealed::default();
    let mut opened = Vec::new();
    for (field, value) in object.iter() {
        let Some(person) = envelope_person(value) else {
            continue;
        };
        if !fields.includes(field) {
            opened.push((field.clone(), Value::Null));
            continue;
        }
        match key_of(person) {
            Some(key) => {
                opened.push((field.clone(), key.open(person, field, value)?));
                unsealed.opened += 1;
            }
            None => {
                opened.push((field.clone(), Value::Null));
                unsealed.erased = true;
            }
        }
    }
    for (field, value) in opened {
        object.insert(field, value);
    }
    Ok(unsealed)
}

/// Why a sealed field did not open.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("field {field:?} is not an envelope of a sealed value")]
    Malformed { field: String },
    #[error(
        "field {field:?} sealed for {person} does not open under their key: it was altered, \
         moved from another field or person, or sealed under another key"
    )]
    DoesNotAuthenticate { person: Uuid, field: String },
}

/// The person an envelope is sealed for, or `None` when `value` is no envelope.
fn envelope_person(value: &Value) -> Option<Uuid> {
    let envelope = value.as_object()?;
    if envelope.len() != 2 || !envelope.get(CIPHERTEXT)?.is_string() {
        return None;
    }
    Uuid::parse_str(envelope.get(SEALED_FOR)?.as_str()?).ok()
}

/// The associated data of a field: the domain, the person's 16 bytes, then the field's name (last,
/// so its length needs no prefix).
fn field_aad(person: Uuid, field: &str) -> Vec<u8> {
    [FIELD_DOMAIN, person.as_bytes(), field.as_bytes()].concat()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn key() -> PersonKey {
        PersonKey::generate().unwrap()
    }

    #[test]
    fn sealed_values_of_every_json_kind_open_to_themselves() {
        let (key, person) = (key(), Uuid::new_v4());
        for value in [
            json!("ann@example.com"),
            json!({"pending": [{"kind": "verify", "email": "ann@example.com"}], "n": 2}),
            json!(["a", 1, null]),
            json!(42),
            json!(true),
            json!(""),
        ] {
            let envelope = key.seal(person, "email", &value);
            assert!(is_envelope(&envelope));
            assert_eq!(envelope[SEALED_FOR], json!(person.to_string()));
            assert!(!envelope.to_string().contains("ann@example.com"));
            assert_eq!(key.open(person, "email", &envelope).unwrap(), value);
        }
    }

    #[test]
    fn sealing_the_same_value_twice_gives_different_ciphertexts() {
        let (key, person) = (key(), Uuid::new_v4());
        let value = json!("ann@example.com");
        assert_ne!(
            key.seal(person, "email", &value),
            key.seal(person, "email", &value)
        );
    }

    #[test]
    fn an_envelope_does_not_open_for_another_person_field_or_key() {
        let (key, person) = (key(), Uuid::new_v4());
        let envelope = key.seal(person, "email", &json!("ann@example.com"));
        let refused = |result: Result<Value, SealError>| {
            matches!(result, Err(SealError::DoesNotAuthenticate { .. }))
        };
        assert!(refused(key.open(Uuid::new_v4(), "email", &envelope)));
        assert!(refused(key.open(person, "email_normalized", &envelope)));
        assert!(refused(self::key().open(person, "email", &envelope)));
    }

    #[test]
    fn a_tampered_ciphertext_does_not_open() {
        let (key, person) = (key(), Uuid::new_v4());
        let envelope = key.seal(person, "email", &json!("ann@example.com"));
        let ciphertext = envelope[CIPHERTEXT].as_str().unwrap();
        let mut bytes = URL_SAFE_NO_PAD.decode(ciphertext).unwrap();
        for index in [0, 30, bytes.len() - 1] {
            bytes[index] ^= 0x01;
            let mut tampered = envelope.clone();
            tampered[CIPHERTEXT] = json!(URL_SAFE_NO_PAD.encode(&bytes));
            assert!(matches!(
                key.open(person, "email", &tampered),
                Err(SealError::DoesNotAuthenticate { .. })
            ));
            bytes[index] ^= 0x01;
        }
        let mut truncated = envelope.clone();
        truncated[CIPHERTEXT] = json!(&ciphertext[..20]);
        assert!(key.open(person, "email", &truncated).is_err());
        let mut not_base64 = envelope;
        not_base64[CIPHERTEXT] = json!("not base64!");
        assert!(matches!(
            key.open(person, "email", &not_base64),
            Err(SealError::Malformed { .. })
        ));
    }

    #[test]
    fn seal_fields_seals_the_named_fields_present_and_not_null_and_leaves_the_rest() {
        let (key, person) = (key(), Uuid::new_v4());
        let mut data = json!({
            "email": "ann@example.com",
            "password_hash": null,
            "registered_at": "2026-12-01T00:00:00Z",
        });
        seal_fields(
            &key,
            person,
            &mut data,
            &["email", "password_hash", "absent"],
        );
        assert!(is_envelope(&data["email"]));
        assert_eq!(data["password_hash"], Value::Null);
        assert_eq!(data["registered_at"], json!("2026-12-01T00:00:00Z"));
        assert!(data.get("absent").is_none());

        // Sealing again changes nothing: a sealed field is not sealed twice.
        let once = data.clone();
        seal_fields(&key, person, &mut data, &["email"]);
        assert_eq!(data, once);

        let mut not_an_object = json!(["ann@example.com"]);
        seal_fields(&key, person, &mut not_an_object, &["email"]);
        assert_eq!(not_an_object, json!(["ann@example.com"]));
    }

    #[test]
    fn only_the_fields_named_are_opened_and_the_others_become_null_unopened() {
        let (ann, ann_key) = (Uuid::new_v4(), key());
        let mut data = json!({
            "email": "ann@example.com",
            "password_hash": "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA",
            "status": "active",
        });
        seal_fields(&ann_key, ann, &mut data, &["email", "password_hash"]);
        let only = Fields::Only(&["email"]);
        assert_eq!(sealed_persons_of(&data, only), [ann]);
        let mut hash_alone = json!({"password_hash": "$argon2id$"});
        seal_fields(&ann_key, ann, &mut hash_alone, &["password_hash"]);
        assert!(sealed_persons_of(&hash_alone, only).is_empty());

        let unsealed = unseal_fields_of(&mut data, only, |person| {
            (person == ann).then_some(&ann_key)
        })
        .unwrap();
        assert_eq!(
            data,
            json!({"email": "ann@example.com", "password_hash": null, "status": "active"})
        );
        assert_eq!(
            unsealed,
            Unsealed {
                erased: false,
                opened: 1
            }
        );
    }

    #[test]
    fn unseal_fields_opens_every_envelope_with_its_persons_key() {
        let (ann, ann_key) = (Uuid::new_v4(), key());
        let (bob, bob_key) = (Uuid::new_v4(), key());
        let original = json!({
            "email": "ann@example.com",
            "pending": {"email": "ann@example.org"},
            "referee": "bob@example.com",
            "kind": "registered",
        });
        let mut data = original.clone();
        seal_fields(&ann_key, ann, &mut data, &["email", "pending"]);
        seal_fields(&bob_key, bob, &mut data, &["referee"]);
        assert_eq!(sealed_persons(&data), [ann, bob]);

        let unsealed = unseal_fields(&mut data, |person| {
            (person == ann)
                .then_some(&ann_key)
                .or((person == bob).then_some(&bob_key))
        })
        .unwrap();
        assert_eq!(data, original);
        assert_eq!(
            unsealed,
            Unsealed {
                erased: false,
                opened: 3
            }
        );
        assert!(sealed_persons(&data).is_empty());
    }

    #[test]
    fn the_fields_of_a_person_without_a_key_read_as_null_and_say_so() {
        let (ann, ann_key) = (Uuid::new_v4(), key());
        let (bob, bob_key) = (Uuid::new_v4(), key());
        let mut data = json!({"email": "ann@example.com", "referee": "bob@example.com", "n": 1});
        seal_fields(&ann_key, ann, &mut data, &["email"]);
        seal_fields(&bob_key, bob, &mut data, &["referee"]);

        let unsealed =
            unseal_fields(&mut data, |person| (person == bob).then_some(&bob_key)).unwrap();
        assert_eq!(
            data,
            json!({"email": null, "referee": "bob@example.com", "n": 1})
        );
        assert_eq!(
            unsealed,
            Unsealed {
                erased: true,
                opened: 1
            }
        );
    }

    #[test]
    fn an_envelope_that_does_not_open_under_a_key_that_is_there_is_an_error_not_an_erasure() {
        let (ann, ann_key) = (Uuid::new_v4(), key());
        let mut data = json!({"email": "ann@example.com", "email_normalized": "ann@example.com"});
        seal_fields(&ann_key, ann, &mut data, &["email", "email_normalized"]);
        // Swap the two envelopes: each is now under the other field's name.
        let email = data["email"].take();
        data["email"] = data["email_normalized"].take();
        data["email_normalized"] = email;
        let stored = data.clone();

        let result = unseal_fields(&mut data, |_| Some(&ann_key));
        assert!(matches!(
            result,
            Err(SealError::DoesNotAuthenticate { person, .. }) if person == ann
        ));
        assert_eq!(data, stored, "data is left as it was on an error");

        let wrong_key = key();
        assert!(unseal_fields(&mut data, |_| Some(&wrong_key)).is_err());
    }

    #[test]
    fn only_objects_of_exactly_the_envelope_members_are_envelopes() {
        let person = Uuid::new_v4().to_string();
        assert!(is_envelope(
            &json!({"sealed_for": person, "aes256gcm": "AAAA"})
        ));
        for value in [
            json!({"sealed_for": "ann", "aes256gcm": "AAAA"}),
            json!({"sealed_for": person, "aes256gcm": 1}),
            json!({"sealed_for": person}),
            json!({"sealed_for": person, "aes256gcm": "AAAA", "more": 1}),
            json!("ann@example.com"),
            json!(null),
        ] {
            assert!(!is_envelope(&value), "{value}");
        }
        let mut data = json!({"email": {"sealed_for": "ann", "aes256gcm": "AAAA"}});
        let untouched = data.clone();
        assert_eq!(
            unseal_fields(&mut data, |_| None).unwrap(),
            Unsealed::default()
        );
        assert_eq!(data, untouched);
    }
}
