//! Passwords as typed, the policy they must meet, and the hashes that are stored instead.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use unicode_normalization::UnicodeNormalization;

/// What a new password must meet. Lengths count Unicode code points as sent, before
/// normalisation (NIST SP 800-63B counts each code point as one character): closer to what a
/// person perceives than bytes, and the same count a client checks against the published
/// `minLength`/`maxLength`, which it cannot apply to a normalised form it never sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PasswordPolicy {
    pub min_chars: usize,
    pub max_chars: usize,
}

impl Default for PasswordPolicy {
    /// NIST SP 800-63B: at least 8 characters, and allow at least 64.
    fn default() -> Self {
        Self {
            min_chars: 8,
            max_chars: 128,
        }
    }
}

/// A password in clear text, on its way to the hasher.
///
/// It is normalised to NFKC on construction (NIST SP 800-63B asks for it when Unicode is
/// accepted), so the same password typed on two keyboards that compose `é` differently hashes
/// the same. Every password that is hashed or verified must therefore come through this type.
///
/// It has no `Display` and no `Serialize`, and its `Debug` is redacted, so it cannot reach a log
/// or an event by accident; [`Password::expose`] is the one deliberate way out.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

/// Why a string is not an acceptable [`Password`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PasswordError {
    #[error("the password must have at least {min_chars} characters")]
    TooShort { min_chars: usize },
    #[error("the password must have at most {max_chars} characters")]
    TooLong { max_chars: usize },
    #[error("the password must be at most {max_bytes} bytes long")]
    TooManyBytes { max_bytes: usize },
}

impl Password {
    /// The hard limit in UTF-8 bytes, whatever the policy: it bounds the work of normalising
    /// and hashing what an anonymous client sends.
    pub const MAX_BYTES: usize = 1024;

    /// A new password (at registration or when changing it), held to the policy.
    pub fn new(password: String, policy: &PasswordPolicy) -> Result<Self, PasswordError> {
        let chars = password.chars().count();
        if chars < policy.min_chars {
            return Err(PasswordError::TooShort {
                min_chars: policy.min_chars,
            });
        }
        if chars > policy.max_chars {
            return Err(PasswordError::TooLong {
                max_chars: policy.max_chars,
            });
        }
        Self::for_verification(password)
    }

    /// A password to check against a stored hash (logging in, or proving the current password).
    ///
    /// Only the byte limit applies: a password chosen under an older, looser policy must still
    /// be able to log in, and a too-short guess is simply a wrong password.
    pub fn for_verification(password: String) -> Result<Self, PasswordError> {
        let too_many_bytes = PasswordError::TooManyBytes {
            max_bytes: Self::MAX_BYTES,
        };
        if password.len() > Self::MAX_BYTES {
            return Err(too_many_bytes);
        }
        let normalized: String = password.nfkc().collect();
        if normalized.len() > Self::MAX_BYTES {
            return Err(too_many_bytes);
        }
        Ok(Self(normalized))
    }

    /// The normalised password, to hand to the hasher and to nothing else.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password([redacted])")
    }
}

/// A password hash in the PHC string format (`$argon2id$v=19$m=19456,t=2,p=1$salt$hash`),
/// produced by the hasher outside the domain.
///
/// It is stored in events, so it serializes as its string; its `Debug` is redacted all the same
/// (an offline attack on a leaked hash is still an attack). The check is only that it looks
/// like a PHC string; the hasher is the judge of the rest.
#[derive(Clone, PartialEq, Eq)]
pub struct PasswordHash(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a PHC password hash string (`$<algorithm>$...`, printable ASCII)")]
pub struct PasswordHashError;

impl PasswordHash {
    pub fn parse(phc: impl Into<String>) -> Result<Self, PasswordHashError> {
        let phc = phc.into();
        let algorithm = phc
            .strip_prefix('$')
            .and_then(|rest| rest.split('$').next())
            .unwrap_or_default();
        let algorithm_ok = !algorithm.is_empty()
            && algorithm
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if algorithm_ok && phc.bytes().all(|b| b.is_ascii_graphic()) {
            Ok(Self(phc))
        } else {
            Err(PasswordHashError)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PasswordHash([redacted])")
    }
}

impl Serialize for PasswordHash {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for PasswordHash {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let phc = String::deserialize(deserializer)?;
        Self::parse(phc).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str =
        "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$RdescudvJCsgt3ub+b+dWRWJTmaaJObG";

    #[test]
    fn a_password_within_the_policy_is_accepted() {
        let password = Password::new("correct horse".into(), &PasswordPolicy::default()).unwrap();
        assert_eq!(password.expose(), "correct horse");
    }

    #[test]
    fn a_password_shorter_than_the_policy_is_rejected() {
        assert_eq!(
            Password::new("short".into(), &PasswordPolicy::default()),
            Err(PasswordError::TooShort { min_chars: 8 })
        );
    }

    #[test]
    fn a_password_longer_than_the_policy_is_rejected() {
        assert_eq!(
            Password::new("a".repeat(129), &PasswordPolicy::default()),
            Err(PasswordError::TooLong { max_chars: 128 })
        );
    }

    #[test]
    fn length_counts_characters_not_bytes() {
        let policy = PasswordPolicy::default();
        assert!(Password::new("ééééééé".into(), &policy).is_err()); // 7 chars, 14 bytes
        assert!(Password::new("éééééééé".into(), &policy).is_ok()); // 8 chars
    }

    #[test]
    fn length_counts_code_points_as_sent_not_after_normalisation() {
        let policy = PasswordPolicy::default();
        // Eight code points that NFKC composes into four characters.
        let decomposed = "e\u{301}".repeat(4);
        assert!(Password::new(decomposed, &policy).is_ok());
        // Seven ligatures that NFKC expands into fourteen characters.
        assert!(Password::new("\u{fb00}".repeat(7), &policy).is_err());
    }

    #[test]
    fn a_password_over_the_byte_limit_is_rejected_whatever_the_policy() {
        let generous = PasswordPolicy {
            min_chars: 1,
            max_chars: 10_000,
        };
        assert_eq!(
            Password::new("€".repeat(400), &generous), // 400 chars, 1200 bytes
            Err(PasswordError::TooManyBytes { max_bytes: 1024 })
        );
        assert!(Password::for_verification("a".repeat(1025)).is_err());
    }

    #[test]
    fn a_password_to_verify_ignores_the_policy_lengths() {
        assert!(Password::for_verification("short".into()).is_ok());
    }

    #[test]
    fn differently_composed_passwords_are_the_same_password() {
        let composed = Password::for_verification("caf\u{e9}-latte".into()).unwrap();
        let decomposed = Password::for_verification("cafe\u{301}-latte".into()).unwrap();
        assert_eq!(composed.expose(), decomposed.expose());
    }

    #[test]
    fn a_password_never_shows_in_debug_output() {
        let password = Password::new("hunter2hunter2".into(), &PasswordPolicy::default()).unwrap();
        assert_eq!(format!("{password:?}"), "Password([redacted])");
    }

    #[test]
    fn a_password_hash_is_redacted_in_debug_but_stored_as_its_string() {
        let hash = PasswordHash::parse(HASH).unwrap();
        assert_eq!(format!("{hash:?}"), "PasswordHash([redacted])");
        assert_eq!(serde_json::to_value(&hash).unwrap(), HASH);
        assert_eq!(
            serde_json::from_value::<PasswordHash>(HASH.into()).unwrap(),
            hash
        );
    }

    #[test]
    fn a_string_that_is_not_a_phc_hash_is_rejected() {
        for bad in [
            "",
            "$",
            "plain",
            "$$v=19",
            "$Argon2id$x",
            "$argon2id$has space",
        ] {
            assert_eq!(PasswordHash::parse(bad), Err(PasswordHashError), "{bad:?}");
        }
    }
}
