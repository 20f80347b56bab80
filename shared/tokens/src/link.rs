//! The tokens in recovery mails' links: `<kind>.<account id>.<secret>` (docs/adr/0012).
//!
//! The secret is HMAC-SHA-256, under a [`MailTokenKey`] from the configuration, of the kind, the
//! account id and the request's nonce (32 random bytes kept in the request's event), as refresh
//! tokens are made. The command API, which checks links, and the mailer, which writes them, both
//! hold the key; the store holds nonces only, so a copy of the database resets no password
//! (DESIGN decision 15).
//!
//! The kinds are the caller's (the domain's names for verification, reset and change): this
//! module only insists that a token's kind is one of those the caller reads, spelt as given.
//! A presented token is parsed strictly and cheaply, as refresh tokens are.

use std::fmt;

use hmac::Mac;
use uuid::Uuid;

use crate::derivation_key::{DerivationKey, HmacSha256, KeyPurpose};
use crate::keys::KeyError;
use crate::refresh::{
    NONCE_LEN, SECRET_CHARS, SECRET_LEN, UUID_CHARS, parse_secret, parse_uuid, write_secret,
    write_uuid,
};
use crate::secret::Secret;

/// Mail token keys' purpose.
pub enum MailLinks {}

impl KeyPurpose for MailLinks {
    const NAME: &'static str = "mail token key";
    const TYPE_NAME: &'static str = "MailTokenKey";
    const DOMAIN: &'static [u8] = b"identity-service mail link v1\0";
    const READING: &'static str = "reading the mail token key at";
    const MAKING_DIRECTORY: &'static str = "creating the directory of the mail token key";
    const WRITING: &'static str = "writing the mail token key to";
}

/// The key the secrets of links in mails are derived with: a secret of the command API and of
/// the mailer.
pub type MailTokenKey = DerivationKey<MailLinks>;

/// The longest kind a link may have; a longer one is refused before it is looked at.
const MAX_KIND_CHARS: usize = 32;

/// A link's token. A bearer credential: `Debug` shows the kind and the account but never the
/// secret, and its text is only had through [`Self::text`], wrapped.
pub struct LinkToken {
    kind: &'static str,
    account: Uuid,
    secret: Secret<[u8; SECRET_LEN]>,
}

/// A presented link token that is not one: malformed, of a kind not read here, or spelt in
/// another way than the one this service writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not a link token")]
pub struct InvalidLinkToken;

impl LinkToken {
    /// The longest token there can be; anything longer is refused before it is looked at.
    pub const MAX_CHARS: usize = MAX_KIND_CHARS + 1 + UUID_CHARS + 1 + SECRET_CHARS;

    /// The token of a request of `kind` on `account`, derived with `key` from the request's
    /// `nonce`. `kind` is at most 32 characters of lowercase letters and underscores.
    pub fn issue(
        key: &MailTokenKey,
        kind: &'static str,
        account: Uuid,
        nonce: &[u8; NONCE_LEN],
    ) -> Result<Self, KeyError> {
        debug_assert!(is_kind_name(kind), "{kind}");
        let secret = mac(key, kind, account, nonce)?.finalize().into_bytes();
        Ok(Self {
            kind,
            account,
            secret: Secret::new(secret.into()),
        })
    }

    /// Reads a presented token whose kind is one of `kinds`, refusing every other spelling than
    /// the one [`Self::text`] writes. Costs no hashing.
    pub fn parse(text: &str, kinds: &[&'static str]) -> Result<Self, InvalidLinkToken> {
        if text.len() > Self::MAX_CHARS {
            return Err(InvalidLinkToken);
        }
        let mut parts = text.split('.');
        let (Some(kind), Some(account), Some(secret), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(InvalidLinkToken);
        };
        let kind = kinds
            .iter()
            .find(|known| **known == kind)
            .ok_or(InvalidLinkToken)?;
        Ok(Self {
            kind,
            account: parse_uuid(account).ok_or(InvalidLinkToken)?,
            secret: parse_secret(secret).ok_or(InvalidLinkToken)?,
        })
    }

    pub fn kind(&self) -> &'static str {
        self.kind
    }

    pub fn account(&self) -> Uuid {
        self.account
    }

    /// Whether the token's secret is the one `key` derives from its kind, its account and
    /// `nonce`, compared in constant time.
    pub fn authenticates_with(&self, key: &MailTokenKey, nonce: &[u8; NONCE_LEN]) -> bool {
        mac(key, self.kind, self.account, nonce)
            .is_ok_and(|mac| mac.verify_slice(self.secret.expose_secret()).is_ok())
    }

    /// The token as it is written into a link. A method rather than `Display`, so that it
    /// cannot reach a log by a stray `{}`.
    pub fn text(&self) -> Secret<String> {
        let mut text = String::with_capacity(Self::MAX_CHARS);
        text.push_str(self.kind);
        text.push('.');
        write_uuid(self.account, &mut text);
        text.push('.');
        write_secret(&self.secret, &mut text);
        Secret::new(text)
    }
}

impl fmt::Debug for LinkToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkToken")
            .field("kind", &self.kind)
            .field("account", &self.account)
            .field("secret", &self.secret)
            .finish()
    }
}

fn is_kind_name(kind: &str) -> bool {
    !kind.is_empty()
        && kind.len() <= MAX_KIND_CHARS
        && kind.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
}

/// The MAC over a link's fields. The kind is the one field of varying width, so its length goes
/// first: no two inputs read alike.
fn mac(
    key: &MailTokenKey,
    kind: &str,
    account: Uuid,
    nonce: &[u8; NONCE_LEN],
) -> Result<HmacSha256, KeyError> {
    let mut mac = key.mac()?;
    mac.update(&[u8::try_from(kind.len()).unwrap_or(u8::MAX)]);
    mac.update(kind.as_bytes());
    mac.update(account.as_bytes());
    mac.update(nonce);
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RefreshTokenKey;

    const KINDS: &[&str] = &["verify_email", "reset_password", "change_email"];

    fn key() -> MailTokenKey {
        MailTokenKey::from_hex(&"2a".repeat(32)).unwrap()
    }

    fn account() -> Uuid {
        Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef)
    }

    fn nonce(n: u8) -> [u8; NONCE_LEN] {
        [n; NONCE_LEN]
    }

    fn issued(kind: &'static str) -> LinkToken {
        LinkToken::issue(&key(), kind, account(), &nonce(7)).unwrap()
    }

    fn text_of(token: &LinkToken) -> String {
        token.text().expose_secret().clone()
    }

    #[test]
    fn a_token_reads_back_from_its_text_and_authenticates() {
        for kind in KINDS {
            let token = issued(kind);
            let text = text_of(&token);
            assert!(
                text.starts_with(&format!("{kind}.{}.", account())),
                "{text}"
            );
            assert!(text.len() <= LinkToken::MAX_CHARS);
            let read = LinkToken::parse(&text, KINDS).unwrap();
            assert_eq!((read.kind(), read.account()), (*kind, account()));
            assert_eq!(text_of(&read), text);
            assert!(read.authenticates_with(&key(), &nonce(7)));
        }
    }

    #[test]
    fn a_token_authenticates_with_its_own_nonce_kind_account_and_key_only() {
        let token = issued("reset_password");
        assert!(!token.authenticates_with(&key(), &nonce(8)));
        assert!(!token.authenticates_with(&MailTokenKey::generate().unwrap(), &nonce(7)));
        let text = text_of(&token);
        let as_other_kind = text.replacen("reset_password", "verify_email", 1);
        let moved = LinkToken::parse(&as_other_kind, KINDS).unwrap();
        assert!(!moved.authenticates_with(&key(), &nonce(7)));
        let other_account = text.replacen(&account().to_string(), &Uuid::nil().to_string(), 1);
        let moved = LinkToken::parse(&other_account, KINDS).unwrap();
        assert!(!moved.authenticates_with(&key(), &nonce(7)));
    }

    #[test]
    fn a_refresh_token_key_of_the_same_bytes_derives_other_secrets() {
        // The domain strings differ, so a MAC made for one purpose never passes for the other.
        let refresh = RefreshTokenKey::from_hex(&"2a".repeat(32)).unwrap();
        let as_refresh = refresh.derive(account(), 7, &nonce(7)).unwrap();
        let token = issued("reset_password");
        assert_ne!(as_refresh.expose_secret(), token.secret.expose_secret());
    }

    #[test]
    fn every_other_spelling_and_every_unknown_kind_is_refused() {
        let text = text_of(&issued("verify_email"));
        let secret = text.rsplit('.').next().unwrap().to_owned();
        let upper_account = account().to_string().to_uppercase();
        for bad in [
            String::new(),
            "verify_email".to_owned(),
            format!("verify_email.{}", account()),
            format!("{text}."),
            format!(".{text}"),
            format!("{text}.x"),
            format!("unknown.{}.{secret}", account()),
            format!("Verify_email.{}.{secret}", account()),
            format!("verify_email.{upper_account}.{secret}"),
            format!("verify_email.{}.{secret}", account().simple()),
            format!("verify_email.{}.{}", account(), &secret[1..]),
            format!("verify_email.{}.{secret}A", account()),
            format!("verify_email.{}.+{}", account(), &secret[1..]),
            "x".repeat(LinkToken::MAX_CHARS + 1),
        ] {
            assert_eq!(
                LinkToken::parse(&bad, KINDS).err(),
                Some(InvalidLinkToken),
                "{bad}"
            );
        }
        assert!(LinkToken::parse(&text, &["reset_password"]).is_err());
    }

    #[test]
    fn neither_a_token_nor_a_key_shows_its_secret_in_debug() {
        let token = issued("change_email");
        let text = text_of(&token);
        let secret = text.rsplit('.').next().unwrap();
        let debug = format!("{token:?}");
        assert!(
            debug.contains("[redacted]") && !debug.contains(secret),
            "{debug}"
        );
        assert_eq!(format!("{:?}", key()), "MailTokenKey([redacted])");
    }

    #[test]
    fn a_mail_token_key_too_short_is_refused_naming_itself() {
        let error = MailTokenKey::from_hex(&"ab".repeat(31)).unwrap_err();
        assert!(error.to_string().contains("mail token key"), "{error}");
    }
}
