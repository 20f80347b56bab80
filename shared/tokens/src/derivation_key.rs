//! The keys that bearer secrets are derived with: refresh tokens (docs/adr/0010) and the links
//! of recovery mails (docs/adr/0012). One type for both, told apart by their [`KeyPurpose`], so
//! that a key of one purpose can never be handed where the other is expected, while reading,
//! writing and redacting them is written once.
//!
//! A secret is HMAC-SHA-256 under the key of a fixed-width input that starts with the purpose's
//! domain string: a MAC made for one purpose never passes for another's, even under one key.

use std::fmt;
use std::marker::PhantomData;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::keys::{KeyError, fill_random};
use crate::secret::Secret;

pub(crate) type HmacSha256 = Hmac<Sha256>;

/// What a [`DerivationKey`] is for: its name in messages and key files, and the domain string
/// every MAC under it starts with.
pub trait KeyPurpose {
    /// How messages name the key, say "refresh token key".
    const NAME: &'static str;
    /// How `Debug` names the key's type.
    const TYPE_NAME: &'static str;
    /// Put in front of every MAC input.
    const DOMAIN: &'static [u8];
    /// What the errors about the key's file say was being done.
    const READING: &'static str;
    const MAKING_DIRECTORY: &'static str;
    const WRITING: &'static str;
}

/// A key that bearer secrets of one [`KeyPurpose`] are derived with.
///
/// At least [`Self::MIN_BYTES`] random bytes, written as hexadecimal digits in the
/// configuration or in a key file. `Debug` prints `[redacted]` and the bytes are wiped from
/// memory when dropped.
pub struct DerivationKey<P> {
    bytes: Secret<Vec<u8>>,
    purpose: PhantomData<fn() -> P>,
}

impl<P: KeyPurpose> DerivationKey<P> {
    /// 256 bits: as many as the secrets it derives.
    pub const MIN_BYTES: usize = 32;

    /// A fresh key of [`Self::MIN_BYTES`] random bytes, for the standalone mode's first start
    /// and for tests.
    pub fn generate() -> Result<Self, KeyError> {
        let mut bytes = vec![0; Self::MIN_BYTES];
        fill_random(&mut bytes)?;
        Ok(Self::of(Secret::new(bytes)))
    }

    /// Reads the key from hexadecimal digits (either case), surrounding whitespace ignored, as
    /// found in a setting or a key file.
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        let invalid = || KeyError::InvalidDerivationKey(P::NAME);
        let bytes = Secret::new(hex::decode(text.trim()).map_err(|_| invalid())?);
        if bytes.expose_secret().len() < Self::MIN_BYTES {
            return Err(invalid());
        }
        Ok(Self::of(bytes))
    }

    /// The key as lowercase hexadecimal digits, as [`Self::from_hex`] reads them.
    pub fn to_hex(&self) -> Secret<String> {
        Secret::new(hex::encode(self.bytes.expose_secret()))
    }

    /// A MAC under the key, the purpose's domain already in it, for the caller to feed the
    /// rest of its input to.
    pub(crate) fn mac(&self) -> Result<HmacSha256, KeyError> {
        // HMAC takes a key of any length: this never fails, but the library's signature says it
        // could, and a refusal is better than a panic.
        let mut mac = <HmacSha256 as Mac>::new_from_slice(self.bytes.expose_secret())
            .map_err(|_| KeyError::InvalidDerivationKey(P::NAME))?;
        mac.update(P::DOMAIN);
        Ok(mac)
    }

    fn of(bytes: Secret<Vec<u8>>) -> Self {
        Self {
            bytes,
            purpose: PhantomData,
        }
    }
}

impl<P> Clone for DerivationKey<P> {
    fn clone(&self) -> Self {
        Self {
            bytes: self.bytes.clone(),
            purpose: PhantomData,
        }
    }
}

impl<P: KeyPurpose> fmt::Debug for DerivationKey<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}([redacted])", P::TYPE_NAME)
    }
}
