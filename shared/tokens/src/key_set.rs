//! The keys of one issuer: the one it signs with and the others it still publishes.

use serde_json::{Value, json};

use crate::keys::{KeyError, SigningKey, VerificationKey};

/// The key that signs, and the public keys published beside it.
///
/// A published key verifies tokens but never signs. Rotation uses it in both directions:
///
/// 1. **Announce** the next key: `current` = old, `published` = [next]. Wait until every
///    verifier has refetched the JWKS (its cache lifetime), so none meets a token with an
///    unknown `kid`.
/// 2. **Switch**: `current` = next, `published` = [old]. Tokens signed with the old key before
///    the switch still verify.
/// 3. **Retire**: once the last token signed with the old key has expired (the token lifetime
///    plus the leeway after the switch), `published` = [].
///
/// So "published" holds both the upcoming key and the previous ones; they are treated alike,
/// and [`KeySet::jwks`] lists every key that may verify a live token.
#[derive(Debug, Clone)]
pub struct KeySet {
    current: SigningKey,
    published: Vec<VerificationKey>,
}

impl KeySet {
    /// Refuses two different keys under one `kid`, which would make verification depend on
    /// which one is tried first. Listing the current key among the published ones, or one key
    /// twice, is harmless and collapses to one entry.
    pub fn new(current: SigningKey, published: Vec<VerificationKey>) -> Result<Self, KeyError> {
        let all = std::iter::once(current.verification_key().clone()).chain(published);
        // The current key comes first and is always kept, so skipping one leaves the others.
        let published = distinct_keys(all)?.into_iter().skip(1).collect();
        Ok(KeySet { current, published })
    }

    /// Loads the keys from configuration: the private PEM to sign with and the PEMs of the other
    /// published keys, which may be public (SPKI) or private (PKCS#8, only its public half kept).
    pub fn from_pems<S: AsRef<str>>(
        current_pem: &str,
        published_pems: &[S],
    ) -> Result<Self, KeyError> {
        let current = SigningKey::from_pem(current_pem)?;
        let published = published_pems
            .iter()
            .map(|pem| VerificationKey::from_pem(pem.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(current, published)
    }

    pub fn current(&self) -> &SigningKey {
        &self.current
    }

    pub fn published(&self) -> &[VerificationKey] {
        &self.published
    }

    /// Every key a token may be verified with, the current one first.
    pub fn verification_keys(&self) -> Vec<VerificationKey> {
        std::iter::once(self.current.verification_key().clone())
            .chain(self.published.iter().cloned())
            .collect()
    }

    /// The JWKS to serve at `/.well-known/jwks.json`: the current key and every published one.
    pub fn jwks(&self) -> Value {
        jwks(&self.verification_keys())
    }
}

/// A single key signs and is the only one published: the standalone mode's first start.
impl From<SigningKey> for KeySet {
    fn from(current: SigningKey) -> Self {
        KeySet {
            current,
            published: Vec::new(),
        }
    }
}

pub(crate) fn jwks(keys: &[VerificationKey]) -> Value {
    json!({ "keys": keys.iter().map(VerificationKey::to_jwk).collect::<Vec<_>>() })
}

/// Keeps the first of each `kid`, in order; the same key twice is dropped, two different keys
/// under one `kid` are an error.
pub(crate) fn distinct_keys(
    keys: impl IntoIterator<Item = VerificationKey>,
) -> Result<Vec<VerificationKey>, KeyError> {
    let mut distinct: Vec<VerificationKey> = Vec::new();
    for key in keys {
        match distinct.iter().find(|known| known.kid() == key.kid()) {
            None => distinct.push(key),
            Some(known) if known.same_key_as(&key) => {}
            Some(_) => return Err(KeyError::DuplicateKeyId(key.kid().to_owned())),
        }
    }
    Ok(distinct)
}
