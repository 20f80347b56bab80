//! Refresh tokens: their form, `<session id>.<generation>.<secret>`, and the key their secrets
//! are derived with (docs/adr/0010).
//!
//! The secret is HMAC-SHA-256, under a [`RefreshTokenKey`] from the configuration, of the
//! session id, the generation and that generation's nonce (32 random bytes kept in the session's
//! event). Nothing about a token is stored but the nonce, which is useless without the key: a
//! copy of the database refreshes no session (DESIGN decision 15). Because the secret can be
//! derived again, a racing duplicate refresh is answered with the very token the first one got.
//!
//! A presented token is parsed strictly and cheaply before anything else: one spelling per
//! token, bounded in length before any work, and no hashing at all for a malformed one, so a
//! flood of garbage costs a few comparisons each. Checking a well-formed one is one HMAC and a
//! constant-time comparison ([`RefreshToken::authenticates_with`]).

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::Mac;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::derivation_key::{DerivationKey, HmacSha256, KeyPurpose};
use crate::keys::{KeyError, fill_random};
use crate::secret::Secret;

/// The length of a generation's nonce, in bytes.
pub const NONCE_LEN: usize = 32;

/// The length of a token's secret, in bytes: an HMAC-SHA-256.
pub(crate) const SECRET_LEN: usize = 32;

/// A secret in base64url without padding: `ceil(32 * 4 / 3)` characters.
pub(crate) const SECRET_CHARS: usize = 43;

/// A UUID in its hyphenated form.
pub(crate) const UUID_CHARS: usize = 36;

/// `u64::MAX` has 20 decimal digits.
const MAX_GENERATION_DIGITS: usize = 20;

/// Refresh token keys' purpose: the fields after its domain string all have a fixed width, so
/// the MAC input is unambiguous.
pub enum RefreshTokens {}

impl KeyPurpose for RefreshTokens {
    const NAME: &'static str = "refresh token key";
    const TYPE_NAME: &'static str = "RefreshTokenKey";
    const DOMAIN: &'static [u8] = b"identity-service refresh token v1\0";
    const READING: &'static str = "reading the refresh token key at";
    const MAKING_DIRECTORY: &'static str = "creating the directory of the refresh token key";
    const WRITING: &'static str = "writing the refresh token key to";
}

/// Draws a generation's nonce from the operating system's random source.
pub fn random_nonce() -> Result<[u8; NONCE_LEN], KeyError> {
    let mut nonce = [0; NONCE_LEN];
    fill_random(&mut nonce)?;
    Ok(nonce)
}

/// The key refresh token secrets are derived with: a secret of the command API alone.
pub type RefreshTokenKey = DerivationKey<RefreshTokens>;

impl RefreshTokenKey {
    /// The secret of the token of `session` at `generation`, derived from that generation's
    /// `nonce`.
    pub fn derive(
        &self,
        session: Uuid,
        generation: u64,
        nonce: &[u8; NONCE_LEN],
    ) -> Result<Secret<[u8; SECRET_LEN]>, KeyError> {
        let bytes = self
            .refresh_mac(session, generation, nonce)?
            .finalize()
            .into_bytes();
        Ok(Secret::new(bytes.into()))
    }

    /// The MAC over the token's fields, ready to be finished or compared.
    fn refresh_mac(
        &self,
        session: Uuid,
        generation: u64,
        nonce: &[u8; NONCE_LEN],
    ) -> Result<HmacSha256, KeyError> {
        let mut mac = self.mac()?;
        mac.update(session.as_bytes());
        mac.update(&generation.to_be_bytes());
        mac.update(nonce);
        Ok(mac)
    }
}

/// A refresh token: `<session id>.<generation>.<secret>`, the session id in lowercase
/// hyphenated form, the generation in decimal without leading zeros, the secret in base64url
/// without padding (43 characters).
///
/// It is a bearer credential: `Debug` shows the session and the generation but never the
/// secret, and its text is only had through [`Self::text`], wrapped.
pub struct RefreshToken {
    session: Uuid,
    generation: u64,
    secret: Secret<[u8; SECRET_LEN]>,
}

/// A presented refresh token that is not one: malformed, truncated, too long, or spelt in
/// another way than the one this service writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not a refresh token")]
pub struct InvalidRefreshToken;

impl RefreshToken {
    /// The longest token there can be; anything longer is refused before it is looked at.
    pub const MAX_CHARS: usize = UUID_CHARS + 1 + MAX_GENERATION_DIGITS + 1 + SECRET_CHARS;

    /// The token of `session` at `generation`, derived with `key` from that generation's
    /// `nonce`.
    pub fn issue(
        key: &RefreshTokenKey,
        session: Uuid,
        generation: u64,
        nonce: &[u8; NONCE_LEN],
    ) -> Result<Self, KeyError> {
        Ok(Self {
            session,
            generation,
            secret: key.derive(session, generation, nonce)?,
        })
    }

    /// Reads a presented token, refusing every other spelling than the one [`Self::text`]
    /// writes. Costs no hashing.
    pub fn parse(text: &str) -> Result<Self, InvalidRefreshToken> {
        if text.len() > Self::MAX_CHARS {
            return Err(InvalidRefreshToken);
        }
        let mut parts = text.split('.');
        let (Some(session), Some(generation), Some(secret), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(InvalidRefreshToken);
        };
        Ok(Self {
            session: parse_uuid(session).ok_or(InvalidRefreshToken)?,
            generation: parse_generation(generation)?,
            secret: parse_secret(secret).ok_or(InvalidRefreshToken)?,
        })
    }

    pub fn session(&self) -> Uuid {
        self.session
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether the token's secret is the one `key` derives from its session, its generation
    /// and `nonce`, compared in constant time.
    pub fn authenticates_with(&self, key: &RefreshTokenKey, nonce: &[u8; NONCE_LEN]) -> bool {
        key.refresh_mac(self.session, self.generation, nonce)
            .is_ok_and(|mac| mac.verify_slice(self.secret.expose_secret()).is_ok())
    }

    /// The token as the client holds it and sends it back, for the one place that answers it.
    /// A method rather than `Display`, so that it cannot reach a log by a stray `{}`.
    pub fn text(&self) -> Secret<String> {
        let mut text = String::with_capacity(Self::MAX_CHARS);
        write_uuid(self.session, &mut text);
        text.push('.');
        text.push_str(&self.generation.to_string());
        text.push('.');
        write_secret(&self.secret, &mut text);
        Secret::new(text)
    }
}

impl fmt::Debug for RefreshToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshToken")
            .field("session", &self.session)
            .field("generation", &self.generation)
            .field("secret", &self.secret)
            .finish()
    }
}

/// A UUID in lowercase hyphenated form only: `Uuid::parse_str` also reads upper case, braces,
/// `urn:uuid:` and the simple form, and a token has one spelling.
pub(crate) fn parse_uuid(text: &str) -> Option<Uuid> {
    if text.len() != UUID_CHARS {
        return None;
    }
    let id = Uuid::try_parse(text).ok()?;
    let canonical = write_uuid(id, &mut String::new()) == text;
    canonical.then_some(id)
}

/// Appends `id` in lowercase hyphenated form to `text`, and returns what it appended.
pub(crate) fn write_uuid(id: Uuid, text: &mut String) -> &str {
    let start = text.len();
    text.push_str(id.hyphenated().encode_lower(&mut Uuid::encode_buffer()));
    &text[start..]
}

/// Appends `secret` in base64url without padding to `text`.
pub(crate) fn write_secret(secret: &Secret<[u8; SECRET_LEN]>, text: &mut String) {
    URL_SAFE_NO_PAD.encode_string(secret.expose_secret(), text);
}

/// Decimal digits without a sign or a leading zero (`0` itself aside), within `u64`.
fn parse_generation(text: &str) -> Result<u64, InvalidRefreshToken> {
    let digits_only = !text.is_empty()
        && text.len() <= MAX_GENERATION_DIGITS
        && text.bytes().all(|byte| byte.is_ascii_digit());
    if !digits_only || (text.len() > 1 && text.starts_with('0')) {
        return Err(InvalidRefreshToken);
    }
    text.parse().map_err(|_| InvalidRefreshToken)
}

/// 43 characters of base64url without padding, whose unused last bits are zero (the engine
/// refuses others), so that one secret has one spelling.
pub(crate) fn parse_secret(text: &str) -> Option<Secret<[u8; SECRET_LEN]>> {
    if text.len() != SECRET_CHARS {
        return None;
    }
    let mut secret = Zeroizing::new([0; SECRET_LEN]);
    match URL_SAFE_NO_PAD.decode_slice(text, secret.as_mut()) {
        Ok(SECRET_LEN) => Some(Secret::new(*secret)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> RefreshTokenKey {
        RefreshTokenKey::from_hex(&"2a".repeat(32)).unwrap()
    }

    fn session() -> Uuid {
        Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef)
    }

    fn nonce(n: u8) -> [u8; NONCE_LEN] {
        [n; NONCE_LEN]
    }

    fn issued(generation: u64) -> RefreshToken {
        RefreshToken::issue(&key(), session(), generation, &nonce(7)).unwrap()
    }

    /// A well-formed token's text with one of its three parts replaced.
    fn with_part(index: usize, part: &str) -> String {
        let text = issued(12).text().expose_secret().clone();
        let mut parts: Vec<&str> = text.split('.').collect();
        parts[index] = part;
        parts.join(".")
    }

    #[test]
    fn a_token_reads_back_from_its_text_and_authenticates() {
        for generation in [0, 1, 12, u64::MAX] {
            let token = issued(generation);
            let text = token.text();
            assert!(text.expose_secret().len() <= RefreshToken::MAX_CHARS);
            let read = RefreshToken::parse(text.expose_secret()).unwrap();
            assert_eq!(read.session(), session());
            assert_eq!(read.generation(), generation);
            assert_eq!(read.text().expose_secret(), text.expose_secret());
            assert!(read.authenticates_with(&key(), &nonce(7)));
        }
    }

    #[test]
    fn a_token_is_the_session_id_the_generation_and_43_characters_of_secret() {
        let text = issued(12).text().expose_secret().clone();
        let parts: Vec<&str> = text.split('.').collect();
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[0], "01234567-89ab-cdef-0123-456789abcdef");
        assert_eq!(parts[1], "12");
        assert_eq!(parts[2].len(), 43);
        assert!(
            parts[2]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
    }

    #[test]
    fn the_same_inputs_derive_the_same_token_and_any_other_input_another() {
        let text = |key: &RefreshTokenKey, session: Uuid, generation: u64, nonce: [u8; 32]| {
            RefreshToken::issue(key, session, generation, &nonce)
                .unwrap()
                .text()
                .expose_secret()
                .rsplit('.')
                .next()
                .unwrap()
                .to_owned()
        };
        let original = text(&key(), session(), 3, nonce(7));
        assert_eq!(text(&key(), session(), 3, nonce(7)), original);
        let other_key = RefreshTokenKey::generate().unwrap();
        for other in [
            text(&other_key, session(), 3, nonce(7)),
            text(&key(), Uuid::from_u128(1), 3, nonce(7)),
            text(&key(), session(), 4, nonce(7)),
            text(&key(), session(), 3, nonce(8)),
        ] {
            assert_ne!(other, original);
        }
    }

    #[test]
    fn a_token_does_not_authenticate_with_another_nonce_or_key() {
        let token = issued(3);
        assert!(token.authenticates_with(&key(), &nonce(7)));
        assert!(!token.authenticates_with(&key(), &nonce(8)));
        assert!(!token.authenticates_with(&RefreshTokenKey::generate().unwrap(), &nonce(7)));
    }

    #[test]
    fn a_token_moved_to_another_session_or_generation_does_not_authenticate() {
        let secret = issued(3)
            .text()
            .expose_secret()
            .rsplit('.')
            .next()
            .unwrap()
            .to_owned();
        for moved in [
            format!("00000000-0000-0000-0000-000000000001.3.{secret}"),
            format!("{}.4.{secret}", session()),
            format!("{}.2.{secret}", session()),
        ] {
            let token = RefreshToken::parse(&moved).unwrap();
            assert!(!token.authenticates_with(&key(), &nonce(7)), "{moved}");
        }
    }

    #[test]
    fn a_forged_secret_does_not_authenticate() {
        let zeros = URL_SAFE_NO_PAD.encode([0_u8; 32]);
        let forged = RefreshToken::parse(&format!("{}.3.{zeros}", session())).unwrap();
        assert!(!forged.authenticates_with(&key(), &nonce(7)));
        // One bit off in the last byte of the real secret.
        let mut secret = issued(3).secret.expose_secret().to_owned();
        secret[31] ^= 1;
        let flipped = format!("{}.3.{}", session(), URL_SAFE_NO_PAD.encode(secret));
        let flipped = RefreshToken::parse(&flipped).unwrap();
        assert!(!flipped.authenticates_with(&key(), &nonce(7)));
    }

    #[test]
    fn every_malformed_shape_is_refused() {
        let good = issued(12).text().expose_secret().clone();
        let secret = good.rsplit('.').next().unwrap().to_owned();
        let id = session().to_string();
        let malformed = [
            String::new(),
            ".".into(),
            "..".into(),
            "...".into(),
            // Parts missing, truncated, or extra.
            id.clone(),
            format!("{id}.12"),
            format!("{id}.12."),
            format!(".12.{secret}"),
            format!("{id}..{secret}"),
            good[..good.len() - 1].to_owned(),
            good[1..].to_owned(),
            format!("{good}."),
            format!("{good}.x"),
            format!(".{good}"),
            // Whitespace anywhere.
            format!(" {good}"),
            format!("{good}\n"),
            with_part(1, " 12"),
        ];
        for text in malformed {
            assert_eq!(
                RefreshToken::parse(&text).err(),
                Some(InvalidRefreshToken),
                "{text:?}"
            );
        }
    }

    #[test]
    fn a_session_id_in_any_other_spelling_is_refused() {
        let id = session();
        for spelling in [
            id.hyphenated().to_string().to_uppercase(),
            "01234567-89AB-cdef-0123-456789abcdef".to_owned(),
            id.simple().to_string(),
            id.braced().to_string(),
            id.urn().to_string(),
            "01234567-89ab-cdef-0123-456789abcdeg".to_owned(),
            "0123456789ab-cdef-0123-456789abcdef-".to_owned(),
            "01234567-89ab-cdef-0123-456789abcde".to_owned(),
            "".to_owned(),
        ] {
            assert!(
                RefreshToken::parse(&with_part(0, &spelling)).is_err(),
                "{spelling}"
            );
        }
    }

    #[test]
    fn a_generation_in_any_other_spelling_or_beyond_u64_is_refused() {
        for spelling in [
            "012",
            "00",
            "+12",
            "-12",
            "12 ",
            "1_2",
            "0x1",
            "1e3",
            "１２",
            "18446744073709551616",
            "99999999999999999999",
            "000000000000000000012",
        ] {
            assert!(
                RefreshToken::parse(&with_part(1, spelling)).is_err(),
                "{spelling}"
            );
        }
        let max = with_part(1, "18446744073709551615");
        assert_eq!(RefreshToken::parse(&max).unwrap().generation(), u64::MAX);
        assert_eq!(
            RefreshToken::parse(&with_part(1, "0"))
                .unwrap()
                .generation(),
            0
        );
    }

    #[test]
    fn a_secret_in_any_other_spelling_or_length_is_refused() {
        let secret = issued(12)
            .text()
            .expose_secret()
            .rsplit('.')
            .next()
            .unwrap()
            .to_owned();
        let standard = base64::engine::general_purpose::STANDARD_NO_PAD.encode([0xfb_u8; 32]);
        assert!(standard.contains('+') || standard.contains('/'));
        // The last character carries two unused bits; only the spelling with them zero counts.
        let last = secret.as_bytes()[42];
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let index = alphabet.iter().position(|&c| c == last).unwrap();
        let unused_bits_set = format!("{}{}", &secret[..42], alphabet[index ^ 1] as char);
        for spelling in [
            secret[..42].to_owned(),
            format!("{secret}A"),
            format!("{secret}="),
            format!("{}=", &secret[..42]),
            standard,
            unused_bits_set,
            format!("{}*", &secret[..42]),
            String::new(),
        ] {
            assert!(
                RefreshToken::parse(&with_part(2, &spelling)).is_err(),
                "{spelling}"
            );
        }
    }

    #[test]
    fn an_oversized_token_is_refused_before_it_is_read() {
        let long = format!(
            "{}.{}",
            issued(1).text().expose_secret(),
            "1".repeat(10_000)
        );
        assert!(RefreshToken::parse(&long).is_err());
        // The longest token there is still reads.
        let longest = issued(u64::MAX).text();
        assert_eq!(longest.expose_secret().len(), RefreshToken::MAX_CHARS);
        assert!(RefreshToken::parse(longest.expose_secret()).is_ok());
        assert!(RefreshToken::parse(&format!("{}0", longest.expose_secret())).is_err());
    }

    #[test]
    fn a_token_and_a_key_never_show_their_secret_in_debug() {
        let token = issued(12);
        let text = token.text().expose_secret().clone();
        let secret = text.rsplit('.').next().unwrap();
        let debug = format!("{token:?}");
        assert!(debug.contains("[redacted]"), "{debug}");
        assert!(!debug.contains(secret), "{debug}");
        let key = key();
        assert_eq!(format!("{key:?}"), "RefreshTokenKey([redacted])");
        assert!(!format!("{key:#?}").contains("2a2a"));
    }

    #[test]
    fn a_key_reads_from_hexadecimal_text_of_at_least_32_bytes() {
        let key = RefreshTokenKey::generate().unwrap();
        let hex = key.to_hex();
        assert_eq!(hex.expose_secret().len(), 64);
        let read = RefreshTokenKey::from_hex(&format!("  {}\n", hex.expose_secret())).unwrap();
        let token = RefreshToken::issue(&key, session(), 0, &nonce(1)).unwrap();
        assert!(token.authenticates_with(&read, &nonce(1)));
        let upper = RefreshTokenKey::from_hex(&hex.expose_secret().to_uppercase()).unwrap();
        assert!(token.authenticates_with(&upper, &nonce(1)));
        // Longer keys are fine.
        assert!(RefreshTokenKey::from_hex(&"ab".repeat(64)).is_ok());
        for bad in [
            "".to_owned(),
            "ab".repeat(31),
            format!("{}a", "ab".repeat(32)),
            "zz".repeat(32),
            format!("0x{}", "ab".repeat(32)),
        ] {
            assert!(
                matches!(
                    RefreshTokenKey::from_hex(&bad),
                    Err(KeyError::InvalidDerivationKey("refresh token key"))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn nonces_and_keys_are_drawn_at_random() {
        assert_ne!(random_nonce().unwrap(), random_nonce().unwrap());
        let (a, b) = (
            RefreshTokenKey::generate().unwrap(),
            RefreshTokenKey::generate().unwrap(),
        );
        assert_ne!(a.to_hex().expose_secret(), b.to_hex().expose_secret());
    }
}
