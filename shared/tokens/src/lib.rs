//! Access tokens (JWT) that other services verify offline: signing keys, the JWKS that
//! publishes them, issuing, and verification (design decision 7); and the form of refresh
//! tokens with the key their secrets are derived with ([`RefreshToken`], docs/adr/0010).
//!
//! The side that logs users in holds a [`KeySet`] and a [`TokenIssuer`]; every other side holds
//! a [`TokenVerifier`], which needs public keys only (from the [`KeySet`], a JWKS or public
//! PEMs). Both serve the same JWKS.
//!
//! RFC 8725 is the checklist, and the choices follow from it:
//! - **Algorithms are an allow-list of asymmetric ones** ([`Algorithm`]: EdDSA, ES256). `none`
//!   and HMAC cannot be named, and the verifier takes the algorithm from the key the `kid`
//!   selects, never from the token. RS256 is not supported: nothing here needs it, and
//!   RSA keys are large and slow to generate.
//! - **Every token names its key** (`kid`, the RFC 7638 thumbprint of the public key) and the
//!   keys are rotated by publishing the next one before signing with it ([`KeySet`]).
//! - **Tokens are explicitly typed** (`typ: at+jwt`, RFC 9068), and `iss`, `aud`, `exp` and `nbf`
//!   are always checked. `sub` is the user id, typed as a UUID so an email cannot be put there.
//! - **Time is a parameter**: issuing and verifying take `now`, so no clock is read here.
//! - **Secrets never reach a log** (decision 11): private keys and tokens print as their `kid` or
//!   `[redacted]`, and are wiped from memory when dropped ([`Secret`]).
//!
//! ```
//! use chrono::{TimeZone, Utc};
//! use tokens::{Algorithm, KeySet, SigningKey, TokenIssuer, TokenSettings, TokenVerifier};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let settings = TokenSettings::new("https://identity.example", "family-services");
//! let issuer = TokenIssuer::new(KeySet::from(SigningKey::generate(Algorithm::EdDSA)?), settings.clone());
//! let now = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
//! let (user, session) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
//! let issued = issuer.issue(user, session, vec!["administrator".to_owned()], false, now)?;
//!
//! // Another service, holding nothing but the published JWKS:
//! let verifier = TokenVerifier::from_jwks(&issuer.jwks(), settings)?;
//! let claims = verifier.verify(issued.token.expose_secret(), now)?;
//! assert_eq!(claims.sub, user);
//! assert_eq!(claims.sid, session);
//! assert!(claims.has_role("administrator"));
//! # Ok(())
//! # }
//! ```
//!
//! jsonwebtoken does the JWS encoding and the signature checks, with its pure-Rust
//! (`rust_crypto`) backend; ed25519-dalek and p256 make, read and write the keys.

mod algorithm;
mod claims;
mod config;
mod derivation_key;
mod issuer;
mod key_file;
mod key_set;
mod keys;
mod link;
mod refresh;
mod secret;
mod verifier;
mod webhook_secret;

pub use algorithm::{Algorithm, UnsupportedAlgorithm};
pub use claims::{Claims, TokenSettings};
pub use config::{KeyConfigError, TokenConfig, configured_key};
pub use derivation_key::{DerivationKey, KeyPurpose};
pub use issuer::{IssueError, IssuedToken, TokenIssuer};
pub use key_set::KeySet;
pub use keys::{KeyError, SigningKey, VerificationKey, published_kids};
pub use link::{InvalidLinkToken, LinkToken, MailLinks, MailTokenKey};
pub use refresh::{
    InvalidRefreshToken, NONCE_LEN, RefreshToken, RefreshTokenKey, RefreshTokens, random_nonce,
};
pub use secret::Secret;
pub use verifier::{MAX_TOKEN_BYTES, TokenError, TokenVerifier};
pub use webhook_secret::{WebhookSecret, WebhookSecretKey, WebhookSecrets};

#[cfg(test)]
mod tests {
    /// The API crates keep these in shared application state, across threads.
    #[test]
    fn issuers_verifiers_and_keys_can_be_shared_between_threads() {
        fn shareable<T: Send + Sync + 'static>() {}
        shareable::<super::TokenIssuer>();
        shareable::<super::TokenVerifier>();
        shareable::<super::KeySet>();
        shareable::<super::TokenError>();
        shareable::<super::KeyError>();
        shareable::<super::IssueError>();
        shareable::<super::RefreshTokenKey>();
        shareable::<super::RefreshToken>();
    }
}
