//! Signing and verification keys: PEM in and out, the JWK a verifier needs, and the `kid`.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::pkcs8::EncodePrivateKey;
use p256::elliptic_curve::sec1::{Coordinates, EncodedPoint};
use p256::pkcs8::der::zeroize::Zeroizing;
use p256::pkcs8::spki::SubjectPublicKeyInfoRef;
use p256::pkcs8::{AssociatedOid, LineEnding, ObjectIdentifier, PrivateKeyInfo, SecretDocument};
use rand_core::{OsRng, RngCore};
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::algorithm::Algorithm;
use crate::secret::Secret;

/// Why a key could not be made, read or written.
///
/// The messages never contain key material: they end up in startup logs.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "expected a PEM-encoded PKCS#8 private key (-----BEGIN PRIVATE KEY-----) or SPKI public \
         key (-----BEGIN PUBLIC KEY-----); `openssl pkcs8 -topk8 -nocrypt` converts other private \
         key formats"
    )]
    NotPem,
    #[error("expected a private key, but the PEM holds a public key")]
    NotAPrivateKey,
    #[error("unsupported key type: only Ed25519 (EdDSA) and P-256 (ES256) keys are accepted")]
    UnsupportedKeyType,
    #[error("the key is not a valid {0} key")]
    InvalidKey(&'static str),
    #[error("invalid JWK: {0}")]
    InvalidJwk(&'static str),
    #[error("two different keys have the key id {0}")]
    DuplicateKeyId(String),
    #[error("no verification key was given")]
    NoKeys,
    #[error(
        "a {0} is at least 32 bytes written as hexadecimal digits (64 or more); `openssl rand \
         -hex 32` makes one"
    )]
    InvalidDerivationKey(&'static str),
    #[error("the operating system's random number source failed")]
    Randomness(#[source] std::io::Error),
    #[error("{action} {}", path.display())]
    Io {
        action: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A private key that signs tokens, with the `kid` and algorithm that go into their header.
///
/// The `kid` is the RFC 7638 thumbprint of the public key, so it follows from the key alone:
/// every replica that loads the same PEM announces the same `kid`, and a new key can never
/// collide with an old one by accident of naming.
#[derive(Clone)]
pub struct SigningKey {
    private: PrivateKey,
    /// jsonwebtoken's own form of the same key, made once rather than on every token.
    encoding: jsonwebtoken::EncodingKey,
    public: VerificationKey,
}

#[derive(Clone)]
enum PrivateKey {
    Ed25519(ed25519_dalek::SigningKey),
    P256(p256::ecdsa::SigningKey),
}

impl SigningKey {
    /// A fresh key from the operating system's random source, for the standalone mode's first
    /// start and for tests. A failing random source is an error rather than a panic.
    pub fn generate(algorithm: Algorithm) -> Result<Self, KeyError> {
        let mut seed = Zeroizing::new([0_u8; 32]);
        let private = match algorithm {
            Algorithm::EdDSA => {
                fill_random(seed.as_mut())?;
                PrivateKey::Ed25519(ed25519_dalek::SigningKey::from_bytes(&seed))
            }
            Algorithm::ES256 => {
                // A random 32-byte string is a valid P-256 scalar unless it is zero or not below
                // the group order, which happens with probability about 2^-32 per draw.
                let mut key = None;
                for _ in 0..8 {
                    fill_random(seed.as_mut())?;
                    if let Ok(found) = p256::ecdsa::SigningKey::from_slice(seed.as_ref()) {
                        key = Some(found);
                        break;
                    }
                }
                PrivateKey::P256(key.ok_or(KeyError::InvalidKey("P-256"))?)
            }
        };
        Self::from_private(private)
    }

    /// Reads a PKCS#8 private key (`-----BEGIN PRIVATE KEY-----`), as `openssl genpkey` writes
    /// it; the algorithm follows from the key itself, so configuration cannot contradict it.
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        match parse_pem(pem)? {
            ParsedPem::Private(private) => Self::from_private(private),
            ParsedPem::Public(_) => Err(KeyError::NotAPrivateKey),
        }
    }

    /// The key as PKCS#8 PEM, for the standalone mode to keep it in a file across restarts.
    pub fn to_pem(&self) -> Result<Secret<String>, KeyError> {
        let mut pem = match &self.private {
            PrivateKey::Ed25519(key) => key.to_pkcs8_pem(LineEnding::LF),
            PrivateKey::P256(key) => key.to_pkcs8_pem(LineEnding::LF),
        }
        .map_err(|_| KeyError::InvalidKey(self.algorithm().as_str()))?;
        // Move the text out instead of copying it, so no unzeroed copy is left behind.
        Ok(Secret::new(std::mem::take(&mut *pem)))
    }

    pub fn kid(&self) -> &str {
        self.public.kid()
    }

    pub fn algorithm(&self) -> Algorithm {
        self.public.algorithm()
    }

    /// The public half, to publish and to verify with.
    pub fn verification_key(&self) -> &VerificationKey {
        &self.public
    }

    pub(crate) fn encoding_key(&self) -> &jsonwebtoken::EncodingKey {
        &self.encoding
    }

    fn from_private(private: PrivateKey) -> Result<Self, KeyError> {
        let (der, public) = match &private {
            PrivateKey::Ed25519(key) => {
                (key.to_pkcs8_der(), PublicKey::ed25519(key.verifying_key())?)
            }
            PrivateKey::P256(key) => (key.to_pkcs8_der(), PublicKey::p256(*key.verifying_key())?),
        };
        let algorithm = public.algorithm();
        let der = der.map_err(|_| KeyError::InvalidKey(algorithm.as_str()))?;
        let encoding = match algorithm {
            Algorithm::EdDSA => jsonwebtoken::EncodingKey::from_ed_der(der.as_bytes()),
            Algorithm::ES256 => jsonwebtoken::EncodingKey::from_ec_der(der.as_bytes()),
        };
        Ok(SigningKey {
            private,
            encoding,
            public: VerificationKey::with_thumbprint(public),
        })
    }
}

/// Only the `kid` and the algorithm: the private key must never reach a log.
impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid())
            .field("algorithm", &self.algorithm())
            .finish_non_exhaustive()
    }
}

/// A public key that verifies tokens, with its `kid`.
///
/// This is all a service needs to check a token, so the query side can be built from public keys
/// (a JWKS or public PEMs) without ever holding a private key.
#[derive(Clone)]
pub struct VerificationKey {
    kid: String,
    public: PublicKey,
    /// jsonwebtoken's own form of the same key, made once rather than on every token.
    decoding: jsonwebtoken::DecodingKey,
}

/// The public key and its JWK coordinates, base64url-encoded once at construction so that
/// publishing and thumbprinting cannot fail later.
#[derive(Clone, PartialEq)]
enum PublicKey {
    Ed25519 {
        key: ed25519_dalek::VerifyingKey,
        x: String,
    },
    P256 {
        key: p256::ecdsa::VerifyingKey,
        x: String,
        y: String,
    },
}

impl VerificationKey {
    /// Reads an SPKI public key (`-----BEGIN PUBLIC KEY-----`). A PKCS#8 private key is accepted
    /// too and only its public half kept, so an operator retiring a key can move the old private
    /// PEM to the list of published keys as it is.
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        match parse_pem(pem)? {
            ParsedPem::Public(public) => Ok(Self::with_thumbprint(public)),
            ParsedPem::Private(private) => Ok(SigningKey::from_private(private)?.public),
        }
    }

    /// Reads one JWK as found in a JWKS. The point is checked to be on its curve (and an Ed25519
    /// key not to be of small order) before it is used, and a JWK carrying a private part (`d`)
    /// is refused: it has no place in a published set. Without a `kid` the thumbprint is used.
    pub fn from_jwk(jwk: &Value) -> Result<Self, KeyError> {
        let fields = JwkFields::deserialize(jwk)
            .map_err(|_| KeyError::InvalidJwk("not a JSON object with a string kty"))?;
        if fields.d.is_some() {
            return Err(KeyError::InvalidJwk("it holds a private key (d)"));
        }
        if fields.public_key_use.as_deref().is_some_and(|u| u != "sig") {
            return Err(KeyError::InvalidJwk(
                "it is not a signature key (use is not sig)",
            ));
        }
        let public = match (fields.kty.as_str(), fields.crv.as_deref()) {
            ("OKP", Some("Ed25519")) => {
                let x: [u8; 32] = decode_coordinate(fields.x.as_deref())?;
                let key = ed25519_dalek::VerifyingKey::from_bytes(&x)
                    .map_err(|_| KeyError::InvalidKey("Ed25519"))?;
                PublicKey::ed25519(key)?
            }
            ("EC", Some("P-256")) => {
                let x: [u8; 32] = decode_coordinate(fields.x.as_deref())?;
                let y: [u8; 32] = decode_coordinate(fields.y.as_deref())?;
                let point = EncodedPoint::<p256::NistP256>::from_affine_coordinates(
                    &x.into(),
                    &y.into(),
                    false,
                );
                let key = p256::ecdsa::VerifyingKey::from_encoded_point(&point)
                    .map_err(|_| KeyError::InvalidKey("P-256"))?;
                PublicKey::p256(key)?
            }
            _ => return Err(KeyError::UnsupportedKeyType),
        };
        if let Some(alg) = fields.alg.as_deref()
            && alg.parse::<Algorithm>().ok() != Some(public.algorithm())
        {
            return Err(KeyError::InvalidJwk("its alg does not match its key type"));
        }
        Ok(match fields.kid {
            Some(kid) if !kid.is_empty() => Self::new(kid, public),
            _ => Self::with_thumbprint(public),
        })
    }

    /// Reads every key of a JWKS (`{"keys": [...]}`). Keys of a type this crate does not support
    /// are skipped, as RFC 7517 §5 asks, so a set shared with other issuers still loads; a
    /// malformed key of a supported type is an error.
    pub fn from_jwks(jwks: &Value) -> Result<Vec<Self>, KeyError> {
        let keys = jwks
            .get("keys")
            .and_then(Value::as_array)
            .ok_or(KeyError::InvalidJwk(
                "a JWKS is an object with a keys array",
            ))?;
        let mut found = Vec::with_capacity(keys.len());
        for jwk in keys {
            match Self::from_jwk(jwk) {
                Ok(key) => found.push(key),
                Err(KeyError::UnsupportedKeyType) => {}
                Err(error) => return Err(error),
            }
        }
        Ok(found)
    }

    /// The JWK to publish: `kty`/`crv`/`x`(/`y`), plus `kid`, `alg` and `use: "sig"` so that
    /// verifiers select the key by `kid` and pin its algorithm instead of trusting the token's.
    pub fn to_jwk(&self) -> Value {
        let mut jwk = self.public.thumbprint_members();
        jwk["kid"] = json!(self.kid);
        jwk["alg"] = json!(self.algorithm().as_str());
        jwk["use"] = json!("sig");
        jwk
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn algorithm(&self) -> Algorithm {
        self.public.algorithm()
    }

    /// The RFC 7638 JWK thumbprint (SHA-256, base64url), which is the `kid` of every key this
    /// crate makes from a PEM.
    pub fn thumbprint(&self) -> String {
        self.public.thumbprint()
    }

    pub(crate) fn decoding_key(&self) -> &jsonwebtoken::DecodingKey {
        &self.decoding
    }

    pub(crate) fn same_key_as(&self, other: &VerificationKey) -> bool {
        self.public == other.public
    }

    fn with_thumbprint(public: PublicKey) -> Self {
        Self::new(public.thumbprint(), public)
    }

    fn new(kid: String, public: PublicKey) -> Self {
        let decoding = match &public {
            PublicKey::Ed25519 { key, .. } => {
                jsonwebtoken::DecodingKey::from_ed_der(key.as_bytes())
            }
            PublicKey::P256 { key, .. } => {
                jsonwebtoken::DecodingKey::from_ec_der(key.to_encoded_point(false).as_bytes())
            }
        };
        VerificationKey {
            kid,
            public,
            decoding,
        }
    }
}

/// The `kid` of every key a JWKS (`{"keys": [...]}`) publishes, in order, as written: unlike
/// [`VerificationKey::from_jwks`], no key is parsed and none is given its thumbprint, so this
/// shows what a verifier fetching the set is offered. `None` when the value is not a JWKS or a
/// key has no `kid`.
pub fn published_kids(jwks: &Value) -> Option<Vec<&str>> {
    jwks.get("keys")?
        .as_array()?
        .iter()
        .map(|key| key.get("kid")?.as_str())
        .collect()
}

/// Two keys are equal when they have the same `kid` and the same public key.
impl PartialEq for VerificationKey {
    fn eq(&self, other: &Self) -> bool {
        self.kid == other.kid && self.public == other.public
    }
}

impl Eq for VerificationKey {}

/// The `kid` and algorithm identify the key in logs; the key itself adds nothing there.
impl fmt::Debug for VerificationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerificationKey")
            .field("kid", &self.kid)
            .field("algorithm", &self.algorithm())
            .finish_non_exhaustive()
    }
}

impl PublicKey {
    fn ed25519(key: ed25519_dalek::VerifyingKey) -> Result<Self, KeyError> {
        // A small-order point verifies signatures over many messages; no honest key is one.
        if key.is_weak() {
            return Err(KeyError::InvalidKey("Ed25519"));
        }
        let x = URL_SAFE_NO_PAD.encode(key.as_bytes());
        Ok(PublicKey::Ed25519 { key, x })
    }

    fn p256(key: p256::ecdsa::VerifyingKey) -> Result<Self, KeyError> {
        match key.to_encoded_point(false).coordinates() {
            Coordinates::Uncompressed { x, y } => Ok(PublicKey::P256 {
                key,
                x: URL_SAFE_NO_PAD.encode(x),
                y: URL_SAFE_NO_PAD.encode(y),
            }),
            _ => Err(KeyError::InvalidKey("P-256")),
        }
    }

    fn algorithm(&self) -> Algorithm {
        match self {
            PublicKey::Ed25519 { .. } => Algorithm::EdDSA,
            PublicKey::P256 { .. } => Algorithm::ES256,
        }
    }

    /// The required members of the JWK, the ones RFC 7638 hashes.
    fn thumbprint_members(&self) -> Value {
        match self {
            PublicKey::Ed25519 { x, .. } => json!({ "kty": "OKP", "crv": "Ed25519", "x": x }),
            PublicKey::P256 { x, y, .. } => json!({ "kty": "EC", "crv": "P-256", "x": x, "y": y }),
        }
    }

    fn thumbprint(&self) -> String {
        // RFC 7638 §3: the required members in lexicographic order, no whitespace. The values
        // are base64url, which needs no JSON escaping, so the text can be written directly.
        let canonical = match self {
            PublicKey::Ed25519 { x, .. } => format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#),
            PublicKey::P256 { x, y, .. } => {
                format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#)
            }
        };
        URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
    }
}

/// The JWK members this crate reads; the others (`key_ops`, `x5c`, ...) are ignored.
#[derive(Deserialize)]
struct JwkFields {
    kty: String,
    crv: Option<String>,
    x: Option<String>,
    y: Option<String>,
    kid: Option<String>,
    alg: Option<String>,
    #[serde(rename = "use")]
    public_key_use: Option<String>,
    d: Option<IgnoredAny>,
}

fn decode_coordinate(encoded: Option<&str>) -> Result<[u8; 32], KeyError> {
    let encoded = encoded.ok_or(KeyError::InvalidJwk("a coordinate is missing"))?;
    URL_SAFE_NO_PAD
        .decode(encoded)
        .ok()
        .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
        .ok_or(KeyError::InvalidJwk(
            "a coordinate is not 32 bytes of base64url",
        ))
}

enum ParsedPem {
    Private(PrivateKey),
    Public(PublicKey),
}

/// Reads either kind of PEM, telling the algorithm from the key's own OIDs so that an
/// unsupported key (RSA, P-384) gets a clear error instead of a parse failure.
fn parse_pem(pem: &str) -> Result<ParsedPem, KeyError> {
    // A secret document is wiped on drop, which matters when this is a private key.
    let (label, document) = SecretDocument::from_pem(pem.trim()).map_err(|_| KeyError::NotPem)?;
    match label {
        "PRIVATE KEY" => {
            let info =
                PrivateKeyInfo::try_from(document.as_bytes()).map_err(|_| KeyError::NotPem)?;
            match key_algorithm(info.algorithm.oid, info.algorithm.parameters_oid().ok())? {
                Algorithm::EdDSA => ed25519_dalek::SigningKey::try_from(info)
                    .map(|key| ParsedPem::Private(PrivateKey::Ed25519(key)))
                    .map_err(|_| KeyError::InvalidKey("Ed25519")),
                Algorithm::ES256 => p256::ecdsa::SigningKey::try_from(info)
                    .map(|key| ParsedPem::Private(PrivateKey::P256(key)))
                    .map_err(|_| KeyError::InvalidKey("P-256")),
            }
        }
        "PUBLIC KEY" => {
            let info = SubjectPublicKeyInfoRef::try_from(document.as_bytes())
                .map_err(|_| KeyError::NotPem)?;
            match key_algorithm(info.algorithm.oid, info.algorithm.parameters_oid().ok())? {
                Algorithm::EdDSA => ed25519_dalek::VerifyingKey::try_from(info)
                    .map_err(|_| KeyError::InvalidKey("Ed25519"))
                    .and_then(PublicKey::ed25519)
                    .map(ParsedPem::Public),
                Algorithm::ES256 => p256::ecdsa::VerifyingKey::try_from(info)
                    .map_err(|_| KeyError::InvalidKey("P-256"))
                    .and_then(PublicKey::p256)
                    .map(ParsedPem::Public),
            }
        }
        _ => Err(KeyError::NotPem),
    }
}

fn key_algorithm(
    oid: ObjectIdentifier,
    curve: Option<ObjectIdentifier>,
) -> Result<Algorithm, KeyError> {
    if oid == ed25519_dalek::pkcs8::ALGORITHM_OID {
        Ok(Algorithm::EdDSA)
    } else if oid == p256::elliptic_curve::ALGORITHM_OID && curve == Some(p256::NistP256::OID) {
        Ok(Algorithm::ES256)
    } else {
        Err(KeyError::UnsupportedKeyType)
    }
}

pub(crate) fn fill_random(buffer: &mut [u8]) -> Result<(), KeyError> {
    OsRng
        .try_fill_bytes(buffer)
        .map_err(|error| KeyError::Randomness(error.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kid_of_the_rfc_8037_example_key_is_its_published_thumbprint() {
        // RFC 8037 appendix A.2 and A.3.
        let jwk = json!({
            "kty": "OKP",
            "crv": "Ed25519",
            "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo",
        });
        let key = VerificationKey::from_jwk(&jwk).unwrap();
        assert_eq!(key.kid(), "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k");
        assert_eq!(key.thumbprint(), key.kid());
    }
}
