//! The keyed hash that names lookups by a personal value (the reservation stream of an email
//! address, docs/adr/0013): a name the store can find a value by, which reveals nothing about
//! the value to a reader of the store who lacks the key. An unkeyed hash would not do: a
//! dictionary of addresses reverses it.

use std::fmt;

use hmac::{Hmac, Mac};
use rand_core::{OsRng, RngCore};
use sha2::Sha256;
use tokens::Secret;
use zeroize::Zeroizing;

use crate::keys::{KEY_BYTES, KeyError};

/// Put in front of every digest's input, so that a digest under this key never equals a MAC the
/// same bytes might make for another purpose.
const DOMAIN: &[u8] = b"personal-data lookup v1\0";

/// The key of [`LookupKey::digest`]: at least 32 random bytes, written as hexadecimal digits in
/// the configuration. It cannot be rotated: every stored name was made with it. `Debug` prints
/// `[redacted]`, and the bytes are wiped from memory when the key is dropped.
#[derive(Clone)]
pub struct LookupKey {
    bytes: Secret<Vec<u8>>,
}

impl LookupKey {
    /// 256 bits, as many as the digest.
    pub const MIN_BYTES: usize = KEY_BYTES;

    /// A fresh random key, for the standalone mode's first start and for tests.
    pub fn generate() -> Result<Self, KeyError> {
        let mut fresh = Zeroizing::new(vec![0; Self::MIN_BYTES]);
        OsRng
            .try_fill_bytes(&mut fresh)
            .map_err(|error| KeyError::Randomness(error.into()))?;
        let bytes = Secret::new(std::mem::take(&mut *fresh));
        Ok(Self { bytes })
    }

    /// Reads the key from hexadecimal digits (either case, surrounding whitespace ignored), at
    /// least [`Self::MIN_BYTES`] bytes' worth.
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        let bytes = Secret::new(hex::decode(text.trim()).map_err(|_| KeyError::InvalidLookupKey)?);
        if bytes.expose_secret().len() < Self::MIN_BYTES {
            return Err(KeyError::InvalidLookupKey);
        }
        Ok(Self { bytes })
    }

    /// The key as lowercase hexadecimal digits, as [`Self::from_hex`] reads them.
    pub fn to_hex(&self) -> Secret<String> {
        Secret::new(hex::encode(self.bytes.expose_secret()))
    }

    /// The name `value` is looked up by: lowercase hexadecimal HMAC-SHA-256 under this key of a
    /// domain string followed by `value`. The same value always gives the same name, so the
    /// caller normalises it first.
    pub fn digest(&self, value: &str) -> String {
        let Ok(mac) = <Hmac<Sha256> as Mac>::new_from_slice(self.bytes.expose_secret()) else {
            unreachable!("HMAC takes a key of any length");
        };
        hex::encode(
            mac.chain_update(DOMAIN)
                .chain_update(value)
                .finalize()
                .into_bytes(),
        )
    }
}

impl fmt::Debug for LookupKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LookupKey([redacted])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    #[test]
    fn the_digest_is_the_hmac_of_the_domain_and_the_value() {
        let key = LookupKey::from_hex(HEX).unwrap();
        let expected = {
            let mut mac = Hmac::<Sha256>::new_from_slice(&hex::decode(HEX).unwrap()).unwrap();
            mac.update(b"personal-data lookup v1\0ann@example.com");
            hex::encode(mac.finalize().into_bytes())
        };
        assert_eq!(key.digest("ann@example.com"), expected);
        assert_eq!(expected.len(), 64);
        assert_eq!(expected, expected.to_lowercase());
    }

    #[test]
    fn digests_depend_on_the_value_and_on_the_key() {
        let key = LookupKey::from_hex(HEX).unwrap();
        let other_key = LookupKey::generate().unwrap();
        assert_eq!(key.digest("ann@example.com"), key.digest("ann@example.com"));
        assert_ne!(key.digest("ann@example.com"), key.digest("bob@example.com"));
        assert_ne!(
            key.digest("ann@example.com"),
            other_key.digest("ann@example.com")
        );
    }

    #[test]
    fn a_lookup_key_is_at_least_32_bytes_of_hex_and_written_back_the_same() {
        assert!(matches!(
            LookupKey::from_hex(&HEX[..62]),
            Err(KeyError::InvalidLookupKey)
        ));
        assert!(LookupKey::from_hex("not hex").is_err());
        let long = format!("{HEX}{HEX}");
        assert_eq!(
            LookupKey::from_hex(&format!(" {long}\n"))
                .unwrap()
                .to_hex()
                .expose_secret(),
            &long
        );
        let generated = LookupKey::generate().unwrap();
        assert_eq!(generated.to_hex().expose_secret().len(), 64);
        assert_ne!(generated.to_hex().expose_secret(), &"0".repeat(64));
    }

    #[test]
    fn debug_never_shows_the_key() {
        let key = LookupKey::from_hex(HEX).unwrap();
        assert_eq!(format!("{key:?}"), "LookupKey([redacted])");
        assert_eq!(format!("{:?}", key.to_hex()), "[redacted]");
    }
}
