//! The email address an account is registered and looked up by.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use unicode_normalization::UnicodeNormalization;

/// An email address that has passed [`Email::parse`].
///
/// It keeps two forms. [`Email::as_str`] is the address as the person typed it (trimmed and in
/// NFC, so the same text always has the same bytes), for display and for sending mail.
/// [`Email::normalized`] is the uniqueness key: NFKC and lower case, so that `Ann@Example.com`
/// and `ann@example.com`, or a composed and a decomposed `é`, are one account.
///
/// The key deliberately lower-cases the local part too, although RFC 5321 lets a server treat it
/// case-sensitively: no mainstream provider does, and two accounts differing only by case are
/// an impersonation risk, not a feature.
///
/// The check is structural, not RFC 5322: no quoted local parts, comments or IP literals. Only a
/// confirmation mail proves an address works.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Email {
    address: String,
    normalized: String,
}

/// Why a string is not an [`Email`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmailError {
    #[error("the email address is empty")]
    Empty,
    #[error("the email address is longer than {} characters", Email::MAX_CHARS)]
    TooLong,
    #[error("the email address contains whitespace or a control character")]
    InvalidCharacter,
    #[error("the email address must contain exactly one '@'")]
    NotExactlyOneAt,
    #[error("the email address has nothing before the '@'")]
    EmptyLocalPart,
    #[error("the email address has nothing after the '@'")]
    EmptyDomain,
    #[error(
        "the part before the '@' is longer than {} characters",
        Email::MAX_LOCAL_CHARS
    )]
    LocalPartTooLong,
    #[error("the domain of the email address has no dot")]
    DomainWithoutDot,
    #[error(
        "the domain of the email address has an empty label (two dots in a row, or a dot at an end)"
    )]
    EmptyDomainLabel,
}

impl Email {
    /// The longest address accepted, in Unicode scalar values (RFC 5321's path limit, less the
    /// angle brackets).
    pub const MAX_CHARS: usize = 254;
    /// The longest local part accepted, in Unicode scalar values (RFC 5321).
    pub const MAX_LOCAL_CHARS: usize = 64;

    /// Trims, normalises to NFC and checks the shape of an address.
    ///
    /// The uniqueness key is checked with the same rules, so a key is itself a valid address:
    /// NFKC can turn a full-width `＠` or `．` into an ASCII one, and a key with two `@` or an
    /// empty label must not slip through.
    pub fn parse(input: &str) -> Result<Self, EmailError> {
        let trimmed = input.trim();
        let (address, normalized) = if trimmed.is_ascii() {
            // ASCII text is its own NFC and NFKC, and its lower case is ASCII's: the common
            // case (every stored event is read through here) skips the Unicode tables, with
            // the same result (a test compares the two ways on every ASCII character).
            (trimmed.to_owned(), trimmed.to_ascii_lowercase())
        } else {
            let address: String = trimmed.nfc().collect();
            let normalized = normalize(&address);
            (address, normalized)
        };
        check_shape(&address)?;
        check_shape(&normalized)?;
        Ok(Self {
            address,
            normalized,
        })
    }

    /// The address as given (trimmed, NFC): what to show and where to send mail.
    pub fn as_str(&self) -> &str {
        &self.address
    }

    /// The uniqueness key: two addresses with the same key are the same account.
    pub fn normalized(&self) -> &str {
        &self.normalized
    }
}

/// NFKC, full Unicode lower case, then NFKC again.
///
/// Lower case is taken character by character (`char::to_lowercase`, which includes multi-char
/// mappings such as `İ` to `i̇`) rather than with `str::to_lowercase`, whose final-sigma rule
/// depends on the neighbouring letters: the key of an address should not. The second NFKC pass
/// makes the key a fixed point, so normalising a key gives the same key.
fn normalize(address: &str) -> String {
    let lowered: String = address.nfkc().flat_map(char::to_lowercase).collect();
    lowered.nfkc().collect()
}

fn check_shape(address: &str) -> Result<(), EmailError> {
    if address.is_empty() {
        return Err(EmailError::Empty);
    }
    if address.chars().count() > Email::MAX_CHARS {
        return Err(EmailError::TooLong);
    }
    if address.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(EmailError::InvalidCharacter);
    }
    let (local, domain) = match address.split_once('@') {
        Some((local, domain)) if !domain.contains('@') => (local, domain),
        _ => return Err(EmailError::NotExactlyOneAt),
    };
    if local.is_empty() {
        return Err(EmailError::EmptyLocalPart);
    }
    if domain.is_empty() {
        return Err(EmailError::EmptyDomain);
    }
    if local.chars().count() > Email::MAX_LOCAL_CHARS {
        return Err(EmailError::LocalPartTooLong);
    }
    if !domain.contains('.') {
        return Err(EmailError::DomainWithoutDot);
    }
    if domain.split('.').any(str::is_empty) {
        return Err(EmailError::EmptyDomainLabel);
    }
    Ok(())
}

impl fmt::Display for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.address)
    }
}

impl fmt::Debug for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Email({:?})", self.address)
    }
}

/// An email is stored as the address as given; the key is recomputed on reading.
impl Serialize for Email {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.address)
    }
}

/// Reading goes through [`Email::parse`], so a value that exists is valid. Events store emails,
/// so tightening `parse` later would make old events unreadable: do it with an upcaster, not by
/// editing the rules in place.
impl<'de> Deserialize<'de> for Email {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let address = String::deserialize(deserializer)?;
        Self::parse(&address).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ascii_addresses_are_read_as_the_unicode_rules_read_them() {
        let mut inputs: Vec<String> = (0u8..0x80)
            .map(|byte| format!("a{}B@Ex{}ample.COM", byte as char, byte as char))
            .collect();
        inputs.extend(
            [
                "  Ann.Lee+Tag@Example.ORG ",
                "A@B.C",
                "x@@y.z",
                "@a.b",
                "a@b",
                "a@.b",
                "\tq@w.e",
            ]
            .map(String::from),
        );
        for input in inputs {
            let by_the_tables = {
                let address: String = input.trim().nfc().collect();
                let normalized = normalize(&address);
                check_shape(&address)
                    .and(check_shape(&normalized))
                    .map(|()| (address, normalized))
            };
            let parsed = Email::parse(&input)
                .map(|email| (email.as_str().to_owned(), email.normalized().to_owned()));
            assert_eq!(parsed, by_the_tables, "{input:?}");
        }
    }

    fn key(input: &str) -> String {
        Email::parse(input).unwrap().normalized().to_owned()
    }

    #[test]
    fn an_address_is_trimmed_and_kept_as_typed_for_display() {
        let email = Email::parse("  Ann.Lee@Example.COM \n").unwrap();
        assert_eq!(email.as_str(), "Ann.Lee@Example.COM");
        assert_eq!(email.normalized(), "ann.lee@example.com");
        assert_eq!(email.to_string(), "Ann.Lee@Example.COM");
    }

    #[test]
    fn addresses_differing_only_in_case_have_the_same_key() {
        assert_eq!(key("Ann@Example.com"), key("ann@example.com"));
        assert_eq!(key("ÉLODIE@exemple.fr"), key("élodie@exemple.fr"));
    }

    #[test]
    fn a_composed_and_a_decomposed_accent_are_the_same_account() {
        let composed = "jos\u{e9}@example.com";
        let decomposed = "jose\u{301}@example.com";
        assert_eq!(key(composed), key(decomposed));
        // Display keeps NFC, so the same text always has the same bytes.
        assert_eq!(Email::parse(decomposed).unwrap().as_str(), composed);
    }

    #[test]
    fn compatibility_characters_fold_into_the_key_but_not_the_display_form() {
        let email = Email::parse("\u{FB01}le@example.com").unwrap(); // the "ﬁ" ligature
        assert_eq!(email.as_str(), "\u{FB01}le@example.com");
        assert_eq!(email.normalized(), "file@example.com");
    }

    #[test]
    fn a_full_width_at_sign_that_would_make_a_second_at_in_the_key_is_rejected() {
        assert_eq!(
            Email::parse("a\u{FF20}b@example.com"),
            Err(EmailError::NotExactlyOneAt)
        );
    }

    #[test]
    fn malformed_addresses_are_rejected_with_the_reason() {
        let long_local = format!("{}@example.com", "a".repeat(65));
        let long_address = format!("a@{}.com", "b".repeat(250));
        let cases: &[(EmailError, &[&str])] = &[
            (EmailError::Empty, &["", "   "]),
            (EmailError::TooLong, &[&long_address]),
            (
                EmailError::InvalidCharacter,
                &[
                    "ann lee@example.com",
                    "ann\u{0}@example.com",
                    "ann@exam\tple.com",
                ],
            ),
            (
                EmailError::NotExactlyOneAt,
                &["ann.example.com", "ann@lee@example.com"],
            ),
            (EmailError::EmptyLocalPart, &["@example.com"]),
            (EmailError::EmptyDomain, &["ann@"]),
            (EmailError::LocalPartTooLong, &[&long_local]),
            (EmailError::DomainWithoutDot, &["ann@localhost"]),
            (
                EmailError::EmptyDomainLabel,
                &["ann@example..com", "ann@.example.com", "ann@example.com."],
            ),
        ];
        for (expected, inputs) in cases {
            for input in *inputs {
                assert_eq!(Email::parse(input).as_ref(), Err(expected), "{input:?}");
            }
        }
    }

    #[test]
    fn the_longest_allowed_address_and_local_part_are_accepted() {
        let local = "a".repeat(Email::MAX_LOCAL_CHARS);
        let domain = format!("{}.com", "b".repeat(Email::MAX_CHARS - local.len() - 1 - 4));
        let address = format!("{local}@{domain}");
        assert_eq!(address.chars().count(), Email::MAX_CHARS);
        assert!(Email::parse(&address).is_ok());
    }

    #[test]
    fn an_email_serializes_as_the_address_and_deserializes_through_parse() {
        let email = Email::parse("Ann@Example.com").unwrap();
        let json = serde_json::to_value(&email).unwrap();
        assert_eq!(json, "Ann@Example.com");
        assert_eq!(serde_json::from_value::<Email>(json).unwrap(), email);
        assert!(serde_json::from_value::<Email>("not an email".into()).is_err());
    }

    /// Not a proof for every string, but every single character is where a normalisation
    /// surprise would show first.
    #[test]
    fn normalising_every_single_character_twice_changes_nothing() {
        for c in (0..=u32::from(char::MAX)).filter_map(char::from_u32) {
            let once = normalize(&c.to_string());
            assert_eq!(normalize(&once), once, "{c:?} (U+{:04X})", u32::from(c));
        }
    }
}
