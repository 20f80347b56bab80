//! Verifying access tokens with public keys only, and the typed reasons a token is refused.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use jsonwebtoken::errors::ErrorKind;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::Value;

use crate::algorithm::Algorithm;
use crate::claims::{Claims, TokenSettings};
use crate::key_set::{KeySet, distinct_keys, jwks};
use crate::keys::{KeyError, VerificationKey};

/// The `typ` header of this service's tokens (RFC 9068 §2.1).
pub(crate) const ACCESS_TOKEN_TYPE: &str = "at+jwt";

/// Tokens longer than this are refused before any decoding. Ours are well under 1 KiB; the
/// bound keeps a hostile token from costing base64 and JSON work in proportion to its size.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Why a token was refused. Callers answer 401 to all of them alike; the variant is for logs
/// and tests. No variant carries any part of the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is longer than {MAX_TOKEN_BYTES} bytes")]
    TooLarge,
    /// Not three base64url parts, JSON that does not parse, claims missing or of the wrong
    /// type, or a `crit` header naming an extension (none is understood here).
    #[error("the token is malformed")]
    Malformed,
    /// The header's `alg` is outside the allow-list (`none`, HMAC, RSA...) or differs from the
    /// algorithm of the key its `kid` names.
    #[error("the token's algorithm is not accepted")]
    WrongAlgorithm,
    /// The header has no `kid`, or one that names no published key.
    #[error("the token names no known key")]
    UnknownKey,
    /// The header's `typ` is not `at+jwt`: some other kind of JWT.
    #[error("the token is not an access token")]
    WrongType,
    #[error("the token's signature is not valid")]
    BadSignature,
    #[error("the token was issued by another issuer")]
    WrongIssuer,
    #[error("the token is meant for another audience")]
    WrongAudience,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
}

/// Checks access tokens against public keys. It never holds a private key, so the query side
/// and any other service can build one from a JWKS or from public PEMs.
#[derive(Debug, Clone)]
pub struct TokenVerifier {
    keys: Vec<VerificationKey>,
    settings: TokenSettings,
}

/// The header members that decide whether a token is looked at further.
#[derive(Deserialize)]
struct JoseHeader {
    alg: String,
    kid: Option<String>,
    typ: Option<String>,
    crit: Option<IgnoredAny>,
}

impl TokenVerifier {
    /// Refuses an empty key list (it would refuse every token, which is a configuration
    /// mistake rather than a policy) and two different keys under one `kid`.
    pub fn new(keys: Vec<VerificationKey>, settings: TokenSettings) -> Result<Self, KeyError> {
        let keys = distinct_keys(keys)?;
        if keys.is_empty() {
            return Err(KeyError::NoKeys);
        }
        Ok(TokenVerifier { keys, settings })
    }

    /// Verifies with the current key and every published one.
    pub fn from_key_set(keys: &KeySet, settings: TokenSettings) -> Self {
        TokenVerifier {
            keys: keys.verification_keys(),
            settings,
        }
    }

    /// Verifies with the keys of a JWKS, as a service that trusts this one would.
    pub fn from_jwks(jwks: &Value, settings: TokenSettings) -> Result<Self, KeyError> {
        Self::new(VerificationKey::from_jwks(jwks)?, settings)
    }

    /// Checks, in this order: size; shape; `alg` in the allow-list; `kid` present and known;
    /// `alg` equal to that key's algorithm; no `crit`; `typ` is `at+jwt`; the signature; `iss`;
    /// `aud`; `exp` and `nbf` against `now`, with the configured leeway.
    ///
    /// The key is chosen by `kid` and its algorithm is pinned by the key, never taken from the
    /// token (RFC 8725 §3.1). `exp` and `nbf` are checked here rather than by jsonwebtoken,
    /// which would read the system clock.
    pub fn verify(&self, token: &str, now: DateTime<Utc>) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLarge);
        }
        let header = read_header(token)?;
        let algorithm: Algorithm = header.alg.parse().map_err(|_| TokenError::WrongAlgorithm)?;
        let kid = header.kid.ok_or(TokenError::UnknownKey)?;
        let key = self
            .keys
            .iter()
            .find(|key| key.kid() == kid)
            .ok_or(TokenError::UnknownKey)?;
        if key.algorithm() != algorithm {
            return Err(TokenError::WrongAlgorithm);
        }
        if header.crit.is_some() {
            return Err(TokenError::Malformed);
        }
        if !header.typ.as_deref().is_some_and(is_access_token_type) {
            return Err(TokenError::WrongType);
        }

        let mut validation = jsonwebtoken::Validation::new(algorithm.to_jsonwebtoken());
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        let claims = jsonwebtoken::decode::<Claims>(token, key.decoding_key(), &validation)
            .map_err(|error| match error.kind() {
                ErrorKind::InvalidSignature => TokenError::BadSignature,
                ErrorKind::InvalidAlgorithm => TokenError::WrongAlgorithm,
                _ => TokenError::Malformed,
            })?
            .claims;

        if claims.iss != self.settings.issuer {
            return Err(TokenError::WrongIssuer);
        }
        if claims.aud != self.settings.audience {
            return Err(TokenError::WrongAudience);
        }
        self.check_time(&claims, now)?;
        Ok(claims)
    }

    /// Whether verified claims are still current at `now`: `exp` not passed and `nbf`
    /// reached, with the configured leeway. For a caller that keeps verified claims and must
    /// not keep honouring them after they expire.
    pub fn check_time(&self, claims: &Claims, now: DateTime<Utc>) -> Result<(), TokenError> {
        let now = now.timestamp();
        let leeway = self.settings.leeway_seconds();
        if now >= claims.exp.saturating_add(leeway) {
            return Err(TokenError::Expired);
        }
        if claims.nbf > now.saturating_add(leeway) {
            return Err(TokenError::NotYetValid);
        }
        Ok(())
    }

    /// The JWKS of the keys this verifier accepts, so a service holding no private key can
    /// still serve `/.well-known/jwks.json`.
    pub fn jwks(&self) -> Value {
        jwks(&self.keys)
    }

    pub fn keys(&self) -> &[VerificationKey] {
        &self.keys
    }

    pub fn settings(&self) -> &TokenSettings {
        &self.settings
    }
}

fn read_header(token: &str) -> Result<JoseHeader, TokenError> {
    let mut parts = token.split('.');
    let (Some(header), Some(_payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let header = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| TokenError::Malformed)?;
    serde_json::from_slice(&header).map_err(|_| TokenError::Malformed)
}

/// Media types are case-insensitive, and RFC 9068 allows the long form too.
fn is_access_token_type(typ: &str) -> bool {
    typ.eq_ignore_ascii_case(ACCESS_TOKEN_TYPE) || typ.eq_ignore_ascii_case("application/at+jwt")
}
