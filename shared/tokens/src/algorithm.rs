//! The signature algorithms a token may use: an allow-list, so `none` and HMAC cannot be named.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A JWS algorithm this service signs with and accepts.
///
/// It is a closed list rather than a string because the classic JWT attacks (RFC 8725 §2.1) are
/// all a verifier trusting the token's own `alg`: `none`, or HS256 keyed with the public key.
/// Neither can be expressed here. Only asymmetric algorithms are listed, so any service holding
/// the published keys can verify a token but none can forge one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Algorithm {
    /// Ed25519 signatures (RFC 8037): small keys, deterministic signatures, no nonce to get wrong.
    EdDSA,
    /// ECDSA on P-256 with SHA-256, for verifiers whose libraries lack EdDSA.
    ES256,
}

impl Algorithm {
    /// The `alg` value in a JWS header and a JWK.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::EdDSA => "EdDSA",
            Algorithm::ES256 => "ES256",
        }
    }

    pub(crate) fn to_jsonwebtoken(self) -> jsonwebtoken::Algorithm {
        match self {
            Algorithm::EdDSA => jsonwebtoken::Algorithm::EdDSA,
            Algorithm::ES256 => jsonwebtoken::Algorithm::ES256,
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `alg` names are case-sensitive (RFC 7515 §4.1.1), so this is an exact match.
impl FromStr for Algorithm {
    type Err = UnsupportedAlgorithm;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name {
            "EdDSA" => Ok(Algorithm::EdDSA),
            "ES256" => Ok(Algorithm::ES256),
            _ => Err(UnsupportedAlgorithm),
        }
    }
}

/// An algorithm name outside the allow-list. It does not echo the name: it may come from a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unsupported signature algorithm: only EdDSA and ES256 are allowed")]
pub struct UnsupportedAlgorithm;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_serde_and_from_str() {
        for algorithm in [Algorithm::EdDSA, Algorithm::ES256] {
            let json = serde_json::to_string(&algorithm).unwrap();
            assert_eq!(json, format!("\"{}\"", algorithm.as_str()));
            assert_eq!(serde_json::from_str::<Algorithm>(&json).unwrap(), algorithm);
            assert_eq!(algorithm.as_str().parse::<Algorithm>(), Ok(algorithm));
        }
    }

    #[test]
    fn none_hmac_rsa_and_other_spellings_are_not_algorithms() {
        for name in [
            "none", "None", "HS256", "HS512", "RS256", "eddsa", "es256", "",
        ] {
            assert_eq!(
                name.parse::<Algorithm>(),
                Err(UnsupportedAlgorithm),
                "{name}"
            );
        }
    }
}
