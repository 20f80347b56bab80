//! Small value objects of the identity domain: the ids of users and sessions, their roles and
//! account status.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A value type for 32 random bytes kept in an event and stored as 64 lowercase hexadecimal
/// digits (the nonces that link and refresh token secrets are derived from), with its error.
/// One definition, so that every such nonce has the same one spelling.
macro_rules! hex_nonce {
    ($(#[$attribute:meta])* $nonce:ident, $error:ident, $what:literal) => {
        $(#[$attribute])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $nonce([u8; $nonce::LEN]);

        #[doc = concat!("A ", $what, " that is not 64 lowercase hexadecimal digits.")]
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub struct $error;

        impl std::fmt::Display for $error {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(concat!("a ", $what, " is 64 lowercase hexadecimal digits (32 bytes)"))
            }
        }

        impl std::error::Error for $error {}

        impl $nonce {
            /// Its length in bytes.
            pub const LEN: usize = 32;

            pub const fn from_bytes(bytes: [u8; Self::LEN]) -> Self {
                Self(bytes)
            }

            pub const fn as_bytes(&self) -> &[u8; Self::LEN] {
                &self.0
            }

            /// Reads the stored form, and only it: 64 lowercase hexadecimal digits.
            pub fn from_hex(hex: &str) -> Result<Self, $error> {
                // The `hex` crate reads upper case too; the stored form has one spelling.
                if hex.bytes().any(|digit| digit.is_ascii_uppercase()) {
                    return Err($error);
                }
                let mut bytes = [0; Self::LEN];
                hex::decode_to_slice(hex, &mut bytes).map_err(|_| $error)?;
                Ok(Self(bytes))
            }

            /// The stored form.
            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }
        }

        /// The stored form: 64 lowercase hexadecimal digits.
        impl std::fmt::Display for $nonce {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl std::fmt::Debug for $nonce {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, concat!(stringify!($nonce), "({})"), self)
            }
        }

        impl serde::Serialize for $nonce {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }

        impl<'de> serde::Deserialize<'de> for $nonce {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let hex = <String as serde::Deserialize>::deserialize(deserializer)?;
                Self::from_hex(&hex).map_err(serde::de::Error::custom)
            }
        }
    };
}

pub(crate) use hex_nonce;

/// Declares an id made of a UUID: its stored form is the bare hyphenated string, it parses from
/// that string (a URL path, the id part of a stream name) and prints as it. Written once so that
/// every id reads and writes alike.
macro_rules! uuid_id {
    ($(#[$attribute:meta])* $id:ident) => {
        $(#[$attribute])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $id(Uuid);

        impl $id {
            pub const fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }

            pub const fn as_uuid(&self) -> &Uuid {
                &self.0
            }
        }

        impl From<Uuid> for $id {
            fn from(uuid: Uuid) -> Self {
                Self(uuid)
            }
        }

        /// Parses the hyphenated form, as found in a URL path or after the category in a
        /// stream name.
        impl FromStr for $id {
            type Err = uuid::Error;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }

        impl fmt::Display for $id {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0.hyphenated(), f)
            }
        }

        impl fmt::Debug for $id {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($id), self.0.hyphenated())
            }
        }
    };
}

pub(crate) use uuid_id;

uuid_id! {
    /// The identity of an account, and the id part of its streams (`user-<id>`, `userLogin-<id>`).
    ///
    /// The domain never generates one: randomness, like time, comes from the caller, so that a
    /// client-chosen id makes a retried registration safe and tests are deterministic.
    UserId
}

uuid_id! {
    /// The identity of a session, the id part of its stream (`session-<id>`) and the first part
    /// of its refresh tokens (see [`crate::session`]). Chosen by the caller, at random: knowing
    /// it must not be enough to do anything with the session.
    SessionId
}

/// What a user may do; carried into the token's `roles` claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Admin,
}

/// Where an account stands. Only an `Active` account may log in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AccountStatus {
    /// Registered, waiting for an operator (or a later confirmation step) to activate it.
    Pending,
    Active,
    /// Switched off by an operator; it keeps its history and can be activated again.
    Deactivated,
}

/// The status a new account starts in. A separate type because an account cannot be born
/// deactivated: the type makes that impossible instead of a rule refusing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InitialStatus {
    Pending,
    Active,
}

impl Role {
    /// The role's name wherever it is written out: the token's `roles` claim, the users view,
    /// the history (the same spelling as its serialized form).
    pub const fn name(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Admin => "admin",
        }
    }
}

impl AccountStatus {
    /// The status's name wherever it is written out: the users view, the history, the status
    /// filter of lists (the same spelling as its serialized form).
    pub const fn name(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Active => "active",
            Self::Deactivated => "deactivated",
        }
    }
}

impl From<InitialStatus> for AccountStatus {
    fn from(status: InitialStatus) -> Self {
        match status {
            InitialStatus::Pending => Self::Pending,
            InitialStatus::Active => Self::Active,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_id_serializes_as_a_bare_uuid_string() {
        let id = UserId::from_uuid(Uuid::from_u128(0x0190_f1aa_0000_7000_8000_0000_0000_0001));
        let json = serde_json::to_value(id).unwrap();
        assert_eq!(json, "0190f1aa-0000-7000-8000-000000000001");
        assert_eq!(serde_json::from_value::<UserId>(json).unwrap(), id);
        assert_eq!(id.to_string().parse::<UserId>().unwrap(), id);
    }

    #[test]
    fn a_session_id_reads_and_writes_like_a_user_id() {
        let id = SessionId::from_uuid(Uuid::from_u128(7));
        let json = serde_json::to_value(id).unwrap();
        assert_eq!(json, "00000000-0000-0000-0000-000000000007");
        assert_eq!(serde_json::from_value::<SessionId>(json).unwrap(), id);
        assert_eq!(id.to_string().parse::<SessionId>().unwrap(), id);
        assert_eq!(
            format!("{id:?}"),
            "SessionId(00000000-0000-0000-0000-000000000007)"
        );
    }

    #[test]
    fn the_names_of_roles_and_statuses_are_their_serialized_form() {
        for role in [Role::User, Role::Admin] {
            assert_eq!(serde_json::to_value(role).unwrap(), role.name());
        }
        for status in [
            AccountStatus::Pending,
            AccountStatus::Active,
            AccountStatus::Deactivated,
        ] {
            assert_eq!(serde_json::to_value(status).unwrap(), status.name());
        }
    }

    #[test]
    fn roles_and_statuses_serialize_in_their_documented_spelling() {
        assert_eq!(serde_json::to_value(Role::Admin).unwrap(), "admin");
        assert_eq!(serde_json::to_value(Role::User).unwrap(), "user");
        assert_eq!(
            serde_json::to_value(AccountStatus::Deactivated).unwrap(),
            "deactivated"
        );
        assert_eq!(
            serde_json::to_value(AccountStatus::Pending).unwrap(),
            "pending"
        );
    }
}
