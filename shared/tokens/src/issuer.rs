//! Issuing access tokens: the claims for a user, signed with the current key.

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use crate::claims::{Claims, TokenSettings};
use crate::key_set::KeySet;
use crate::secret::Secret;
use crate::verifier::{ACCESS_TOKEN_TYPE, TokenVerifier};

/// Signs access tokens. It holds the private key, so only the side that logs users in (the
/// command API, or the standalone process) has one.
#[derive(Debug, Clone)]
pub struct TokenIssuer {
    keys: KeySet,
    settings: TokenSettings,
}

/// A freshly signed token and what the login response says about it.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    /// The compact JWT. It is a bearer credential, hence the redacting wrapper.
    pub token: Secret<String>,
    /// Seconds until it expires: the `expires_in` of the OAuth token response.
    pub expires_in: u64,
    pub expires_at: DateTime<Utc>,
    pub jti: Uuid,
}

/// Signing failed. Nothing a caller did causes it (the key was checked when it was loaded), so
/// it is an internal error; the message carries no key or claim.
#[derive(Debug, thiserror::Error)]
#[error("issuing a token failed: {reason}")]
pub struct IssueError {
    reason: &'static str,
    #[source]
    source: Option<jsonwebtoken::errors::Error>,
}

impl TokenIssuer {
    pub fn new(keys: KeySet, settings: TokenSettings) -> Self {
        TokenIssuer { keys, settings }
    }

    /// Signs a token for `subject` (the user id) in `session` with `roles`, saying whether the
    /// account's address is verified, valid from `now` for the configured lifetime. `now` is a
    /// parameter so tests and callers decide what time it is.
    pub fn issue(
        &self,
        subject: Uuid,
        session: Uuid,
        roles: Vec<String>,
        email_verified: bool,
        now: DateTime<Utc>,
    ) -> Result<IssuedToken, IssueError> {
        let issued_at = now.timestamp();
        let lifetime = self.settings.lifetime_seconds();
        let expires_at = issued_at
            .checked_add(lifetime)
            .and_then(|exp| DateTime::from_timestamp(exp, 0))
            .ok_or(IssueError {
                reason: "the expiry time is out of range",
                source: None,
            })?;
        let claims = Claims {
            iss: self.settings.issuer.clone(),
            sub: subject,
            aud: self.settings.audience.clone(),
            exp: expires_at.timestamp(),
            iat: issued_at,
            nbf: issued_at,
            jti: Uuid::new_v4(),
            sid: session,
            roles,
            email_verified,
        };

        let key = self.keys.current();
        let mut header = jsonwebtoken::Header::new(key.algorithm().to_jsonwebtoken());
        header.kid = Some(key.kid().to_owned());
        // RFC 9068 / RFC 8725 §3.11: an explicit type, so this token cannot pass for another
        // kind of JWT signed with the same key, nor another kind for this one.
        header.typ = Some(ACCESS_TOKEN_TYPE.to_owned());
        let token =
            jsonwebtoken::encode(&header, &claims, key.encoding_key()).map_err(|source| {
                IssueError {
                    reason: "signing failed",
                    source: Some(source),
                }
            })?;

        Ok(IssuedToken {
            token: Secret::new(token),
            expires_in: u64::try_from(lifetime).unwrap_or(0),
            expires_at,
            jti: claims.jti,
        })
    }

    /// The JWKS to serve at `/.well-known/jwks.json`.
    pub fn jwks(&self) -> Value {
        self.keys.jwks()
    }

    /// A verifier for this issuer's tokens, with the same settings and every published key.
    pub fn verifier(&self) -> TokenVerifier {
        TokenVerifier::from_key_set(&self.keys, self.settings.clone())
    }

    pub fn keys(&self) -> &KeySet {
        &self.keys
    }

    pub fn settings(&self) -> &TokenSettings {
        &self.settings
    }
}
