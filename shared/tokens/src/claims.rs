//! What a token says (its claims) and what every token of this service agrees on (its settings).

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The claims of an access token, as signed and as returned by a successful verification.
///
/// Times are JWT NumericDates: whole seconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Who issued the token; a verifier accepts only its configured issuer.
    pub iss: String,
    /// The user id. It is typed as a UUID so that an email, which can change hands and is
    /// personal data, cannot be put here by mistake; a token whose `sub` is not a UUID is
    /// malformed.
    pub sub: Uuid,
    /// Who the token is for; a verifier accepts only its configured audience.
    pub aud: String,
    pub exp: i64,
    pub iat: i64,
    pub nbf: i64,
    /// A unique id per token, so a token can be told apart in audit logs (and denied if a
    /// deny-list is ever needed).
    pub jti: Uuid,
    /// The session the token was issued in (OpenID Connect's `sid`): a verifier that follows
    /// sessions refuses the token once its session has ended. Every access token has one.
    pub sid: Uuid,
    pub roles: Vec<String>,
    /// Whether the owner had proved control of the account's address when the token was issued
    /// (OpenID Connect's claim of the same name). A token without it, issued before the claim
    /// existed, reads as `false`.
    #[serde(default)]
    pub email_verified: bool,
}

impl Claims {
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|held| held == role)
    }

    /// `None` only for an `exp` outside chrono's range, which a verified token cannot have.
    pub fn expires_at(&self) -> Option<DateTime<Utc>> {
        DateTime::from_timestamp(self.exp, 0)
    }

    pub fn issued_at(&self) -> Option<DateTime<Utc>> {
        DateTime::from_timestamp(self.iat, 0)
    }
}

/// What the issuer and every verifier of this service must agree on.
///
/// The same value configures both sides; a verifier ignores `lifetime`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSettings {
    /// The `iss` claim, usually the service's public URL.
    pub issuer: String,
    /// The `aud` claim: the family of services the token is meant for.
    pub audience: String,
    /// How long a token is valid. Short, because a token cannot be revoked: a deactivated user
    /// keeps access until it expires.
    pub lifetime: Duration,
    /// The clock difference tolerated between issuer and verifier, on `exp` and on `nbf`.
    pub leeway: Duration,
}

impl TokenSettings {
    pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(15 * 60);
    /// Small, since every second of leeway extends the life of a stolen token.
    pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);

    pub fn new(issuer: impl Into<String>, audience: impl Into<String>) -> Self {
        TokenSettings {
            issuer: issuer.into(),
            audience: audience.into(),
            lifetime: Self::DEFAULT_LIFETIME,
            leeway: Self::DEFAULT_LEEWAY,
        }
    }

    pub fn with_lifetime(self, lifetime: Duration) -> Self {
        TokenSettings { lifetime, ..self }
    }

    pub fn with_leeway(self, leeway: Duration) -> Self {
        TokenSettings { leeway, ..self }
    }

    /// Whole seconds, saturated: a lifetime beyond `i64::MAX` seconds is not a real setting.
    pub(crate) fn lifetime_seconds(&self) -> i64 {
        i64::try_from(self.lifetime.as_secs()).unwrap_or(i64::MAX)
    }

    pub(crate) fn leeway_seconds(&self) -> i64 {
        i64::try_from(self.leeway.as_secs()).unwrap_or(i64::MAX)
    }
}
