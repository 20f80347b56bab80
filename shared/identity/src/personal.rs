//! Personal data in events, which a person can have forgotten (DESIGN decision 16, ADR 13).
//!
//! An event's personal fields (an address, a password hash, what a pending request holds) are
//! stored sealed with a key of their person's, outside this crate; erasing the person deletes
//! the key, and from then on those fields read as [`Personal::Erased`] while the event's other
//! facts (what happened, when) stay. The domain only says which fields are personal
//! ([`crate::EventData::PERSONAL_FIELDS`]) and what an account whose data is gone may still do
//! (nothing): it never sees a key.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A personal field of an event: its value, or nothing because its person was erased.
///
/// Stored as the value itself while it is known; an erased field reads as JSON `null`, which
/// no personal field's value is (an optional one is `Option<T>` outside, never inside).
#[derive(Clone, PartialEq, Eq)]
pub enum Personal<T> {
    Known(T),
    Erased,
}

impl<T> Personal<T> {
    /// The value, unless it was erased.
    pub fn known(&self) -> Option<&T> {
        match self {
            Self::Known(value) => Some(value),
            Self::Erased => None,
        }
    }

    pub fn into_known(self) -> Option<T> {
        match self {
            Self::Known(value) => Some(value),
            Self::Erased => None,
        }
    }

    pub fn is_erased(&self) -> bool {
        matches!(self, Self::Erased)
    }
}

impl<T> From<T> for Personal<T> {
    fn from(value: T) -> Self {
        Self::Known(value)
    }
}

impl From<&str> for Personal<String> {
    fn from(value: &str) -> Self {
        Self::Known(value.to_owned())
    }
}

/// The value's own `Debug` (which redacts what must not reach a log), or `Erased`.
impl<T: std::fmt::Debug> std::fmt::Debug for Personal<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Known(value) => value.fmt(f),
            Self::Erased => f.write_str("Erased"),
        }
    }
}

impl<T: Serialize> Serialize for Personal<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Known(value) => value.serialize(serializer),
            Self::Erased => serializer.serialize_none(),
        }
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Personal<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(Option::<T>::deserialize(deserializer)?.map_or(Self::Erased, Self::Known))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::email::Email;

    #[test]
    fn a_known_field_is_stored_as_its_value_and_an_erased_one_as_null() {
        let email = Email::parse("ann@example.com").unwrap();
        let known = Personal::Known(email.clone());
        assert_eq!(
            serde_json::to_value(&known).unwrap(),
            json!("ann@example.com")
        );
        assert_eq!(
            serde_json::from_value::<Personal<Email>>(json!("ann@example.com")).unwrap(),
            known
        );
        let erased = Personal::<Email>::Erased;
        assert_eq!(serde_json::to_value(&erased).unwrap(), json!(null));
        assert_eq!(
            serde_json::from_value::<Personal<Email>>(json!(null)).unwrap(),
            erased
        );
        assert!(serde_json::from_value::<Personal<Email>>(json!("not an address")).is_err());
        assert_eq!(known.known(), Some(&email));
        assert_eq!(erased.known(), None);
    }
}
