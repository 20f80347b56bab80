//! Token settings as an operator writes them (file or `IDENTITY__TOKENS__...` variables), and
//! the keys they name. Shared by the side that signs and the sides that only verify, so that
//! both read keys the same way.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::{
    Algorithm, DerivationKey, KeyError, KeyPurpose, KeySet, MailTokenKey, RefreshTokenKey, Secret,
    SigningKey, TokenSettings, TokenVerifier, VerificationKey, WebhookSecretKey,
};

/// How tokens are signed and verified, and with which keys.
#[derive(Clone, Deserialize)]
#[serde(default)]
pub struct TokenConfig {
    /// The `iss` claim.
    pub issuer: String,
    /// The `aud` claim.
    pub audience: String,
    pub lifetime_seconds: u64,
    /// The algorithm of a key created by `create_key_if_missing` (`EdDSA` or `ES256`). A key
    /// that is loaded brings its own algorithm.
    pub algorithm: String,
    /// A PKCS#8 PEM file holding the signing key.
    pub signing_key_file: Option<PathBuf>,
    /// The signing key's PEM text itself (say from a Kubernetes Secret in an environment
    /// variable); wins over `signing_key_file`.
    pub signing_key: Option<String>,
    /// Further keys to publish in the JWKS and accept (the next key before a rotation, the
    /// previous one after it): each a PEM text or the path of a PEM file. A side that only
    /// verifies may be given its keys here alone, public halves only.
    pub published_keys: Vec<String>,
    /// The key refresh tokens are derived with (docs/adr/0010): at least 32 bytes as
    /// hexadecimal digits (`openssl rand -hex 32`), say from a Kubernetes Secret in an
    /// environment variable; wins over `refresh_token_key_file`. Only the side that logs users
    /// in needs it. A new key ends every session at its next refresh.
    pub refresh_token_key: Option<String>,
    /// A file holding the refresh token key as hexadecimal digits.
    pub refresh_token_key_file: Option<PathBuf>,
    /// Create `signing_key_file` and `refresh_token_key_file` when they do not exist (the
    /// standalone mode's first start).
    pub create_key_if_missing: bool,
}

impl Default for TokenConfig {
    fn default() -> Self {
        Self {
            issuer: "http://localhost:8080".into(),
            audience: "identity".into(),
            lifetime_seconds: 900,
            algorithm: "EdDSA".into(),
            signing_key_file: None,
            signing_key: None,
            published_keys: Vec::new(),
            refresh_token_key: None,
            refresh_token_key_file: None,
            create_key_if_missing: false,
        }
    }
}

impl fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenConfig")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("lifetime_seconds", &self.lifetime_seconds)
            .field("algorithm", &self.algorithm)
            .field("signing_key_file", &self.signing_key_file)
            .field(
                "signing_key",
                &self.signing_key.as_ref().map(|_| "[redacted]"),
            )
            .field("published_keys", &self.published_keys.len())
            .field(
                "refresh_token_key",
                &self.refresh_token_key.as_ref().map(|_| "[redacted]"),
            )
            .field("refresh_token_key_file", &self.refresh_token_key_file)
            .field("create_key_if_missing", &self.create_key_if_missing)
            .finish()
    }
}

/// Why the configured keys could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyConfigError {
    #[error("no signing key: set tokens.signing_key (PEM) or tokens.signing_key_file")]
    NoSigningKey,
    #[error(
        "no key to verify tokens with: set tokens.signing_key, tokens.signing_key_file or tokens.published_keys"
    )]
    NoVerificationKey,
    #[error(
        "no refresh token key: set tokens.refresh_token_key (64 or more hexadecimal digits) or \
         tokens.refresh_token_key_file"
    )]
    NoRefreshTokenKey,
    #[error(
        "no mail token key: set mail.token_key (64 or more hexadecimal digits, `openssl rand \
         -hex 32`, the same in the command API and the aggregator) or mail.token_key_file"
    )]
    NoMailTokenKey,
    #[error(
        "no webhook secret key: set webhooks.secret_key (64 or more hexadecimal digits, `openssl \
         rand -hex 32`, the same in the command API and the aggregator) or \
         webhooks.secret_key_file"
    )]
    NoWebhookSecretKey,
    #[error("tokens.algorithm must be EdDSA or ES256")]
    UnsupportedAlgorithm,
    #[error("reading {what} at {path}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} is not a usable key")]
    Key {
        what: &'static str,
        #[source]
        source: KeyError,
    },
}

impl TokenConfig {
    /// The claims' settings: issuer, audience, lifetime.
    pub fn settings(&self) -> TokenSettings {
        TokenSettings::new(self.issuer.clone(), self.audience.clone())
            .with_lifetime(Duration::from_secs(self.lifetime_seconds))
    }

    /// The signing key (PEM text, else the file, created if allowed) and the published keys.
    pub fn key_set(&self) -> Result<KeySet, KeyConfigError> {
        let current = self.signing_key()?.ok_or(KeyConfigError::NoSigningKey)?;
        KeySet::new(current, self.published()?).map_err(|source| KeyConfigError::Key {
            what: "the key set",
            source,
        })
    }

    /// A verifier of tokens from whatever keys are configured: the signing key's public half
    /// if one is given, and every published key.
    pub fn verifier(&self) -> Result<TokenVerifier, KeyConfigError> {
        let mut keys = self.published()?;
        if let Some(current) = self.signing_key()? {
            keys.insert(0, current.verification_key().clone());
        }
        if keys.is_empty() {
            return Err(KeyConfigError::NoVerificationKey);
        }
        TokenVerifier::new(keys, self.settings()).map_err(|source| KeyConfigError::Key {
            what: "the verification keys",
            source,
        })
    }

    /// The refresh token key: the hexadecimal text, else the file (created if allowed).
    pub fn refresh_token_key(&self) -> Result<RefreshTokenKey, KeyConfigError> {
        configured_key(
            self.refresh_token_key.as_deref(),
            self.refresh_token_key_file.as_deref(),
            self.create_key_if_missing,
            "tokens.refresh_token_key",
        )?
        .ok_or(KeyConfigError::NoRefreshTokenKey)
    }

    fn signing_key(&self) -> Result<Option<SigningKey>, KeyConfigError> {
        let key = match (&self.signing_key, &self.signing_key_file) {
            (Some(pem), _) => SigningKey::from_pem(pem),
            (None, Some(path)) if self.create_key_if_missing => {
                let algorithm: Algorithm = self
                    .algorithm
                    .parse()
                    .map_err(|_| KeyConfigError::UnsupportedAlgorithm)?;
                SigningKey::load_or_create(path, algorithm)
            }
            (None, Some(path)) => SigningKey::from_pem(&read(path, "the signing key")?),
            (None, None) => return Ok(None),
        };
        key.map(Some).map_err(|source| KeyConfigError::Key {
            what: "tokens.signing_key",
            source,
        })
    }

    fn published(&self) -> Result<Vec<VerificationKey>, KeyConfigError> {
        self.published_keys
            .iter()
            .map(|entry| {
                let pem = if entry.trim_start().starts_with("-----BEGIN") {
                    entry.clone()
                } else {
                    read(Path::new(entry), "a published key")?
                };
                VerificationKey::from_pem(&pem).map_err(|source| KeyConfigError::Key {
                    what: "a published key",
                    source,
                })
            })
            .collect()
    }
}

impl MailTokenKey {
    /// The mail token key from the `mail` settings: the hexadecimal `text`, else the `file`
    /// (created if `create` allows). The command API and the mailer read it alike.
    pub fn configured(
        text: Option<&str>,
        file: Option<&Path>,
        create: bool,
    ) -> Result<Self, KeyConfigError> {
        configured_key(text, file, create, "mail.token_key")?.ok_or(KeyConfigError::NoMailTokenKey)
    }
}

impl WebhookSecretKey {
    /// The webhook secret key from the `webhooks` settings, read as [`MailTokenKey::configured`]
    /// reads its key. The command API and the aggregator read it alike.
    pub fn configured(
        text: Option<&str>,
        file: Option<&Path>,
        create: bool,
    ) -> Result<Self, KeyConfigError> {
        configured_key(text, file, create, "webhooks.secret_key")?
            .ok_or(KeyConfigError::NoWebhookSecretKey)
    }
}

/// A key secrets are derived with, from its hexadecimal `text`, else its `file` (created if
/// `create` allows); `None` when neither is set. `what` names the setting in errors.
pub fn configured_key<P: KeyPurpose>(
    text: Option<&str>,
    file: Option<&Path>,
    create: bool,
    what: &'static str,
) -> Result<Option<DerivationKey<P>>, KeyConfigError> {
    let key = match (text, file) {
        (Some(hex), _) => DerivationKey::from_hex(hex),
        (None, Some(path)) if create => DerivationKey::load_or_create(path),
        (None, Some(path)) => {
            let hex = Secret::new(read(path, what)?);
            DerivationKey::from_hex(hex.expose_secret())
        }
        (None, None) => return Ok(None),
    };
    key.map(Some)
        .map_err(|source| KeyConfigError::Key { what, source })
}

fn read(path: &Path, what: &'static str) -> Result<String, KeyConfigError> {
    std::fs::read_to_string(path).map_err(|source| KeyConfigError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verifier_can_be_built_from_public_keys_alone() {
        let key = SigningKey::generate(Algorithm::EdDSA).unwrap();
        let public_pem = key.verification_key().to_jwk();
        assert!(public_pem.get("d").is_none());
        let private_pem = key.to_pem().unwrap();
        let config = TokenConfig {
            published_keys: vec![private_pem.expose_secret().clone()],
            ..TokenConfig::default()
        };
        let verifier = config.verifier().unwrap();
        assert_eq!(verifier.keys()[0].kid(), key.kid());
        assert!(matches!(
            config.key_set(),
            Err(KeyConfigError::NoSigningKey)
        ));
    }

    #[test]
    fn no_keys_at_all_is_a_clear_error() {
        assert!(matches!(
            TokenConfig::default().verifier(),
            Err(KeyConfigError::NoVerificationKey)
        ));
    }

    #[test]
    fn the_debug_output_hides_the_signing_key_and_the_refresh_token_key() {
        let config = TokenConfig {
            signing_key: Some("-----BEGIN PRIVATE KEY----- secret".into()),
            refresh_token_key: Some("5ec12e7".repeat(10)),
            ..TokenConfig::default()
        };
        let debug = format!("{config:?}");
        assert!(!debug.contains("secret"), "{debug}");
        assert!(!debug.contains("5ec12e7"), "{debug}");
        assert!(debug.contains("refresh_token_key"), "{debug}");
    }

    #[test]
    fn no_refresh_token_key_is_an_error_naming_both_settings() {
        let error = TokenConfig::default().refresh_token_key().unwrap_err();
        assert!(matches!(error, KeyConfigError::NoRefreshTokenKey));
        let message = error.to_string();
        assert!(message.contains("tokens.refresh_token_key "), "{message}");
        assert!(
            message.contains("tokens.refresh_token_key_file"),
            "{message}"
        );
    }

    #[test]
    fn the_refresh_token_key_text_wins_over_its_file() {
        let key = RefreshTokenKey::generate().unwrap();
        let config = TokenConfig {
            refresh_token_key: Some(key.to_hex().expose_secret().clone()),
            refresh_token_key_file: Some("/nonexistent/refresh.key".into()),
            ..TokenConfig::default()
        };
        let loaded = config.refresh_token_key().unwrap();
        assert_eq!(
            loaded.to_hex().expose_secret(),
            key.to_hex().expose_secret()
        );
    }

    #[test]
    fn a_missing_refresh_token_key_file_is_an_error_unless_it_may_be_created() {
        let directory =
            std::env::temp_dir().join(format!("tokens-config-{}", uuid::Uuid::new_v4()));
        let path = directory.join("keys/refresh.key");
        let config = TokenConfig {
            refresh_token_key_file: Some(path.clone()),
            ..TokenConfig::default()
        };
        assert!(matches!(
            config.refresh_token_key(),
            Err(KeyConfigError::Read { .. })
        ));
        let creating = TokenConfig {
            create_key_if_missing: true,
            ..config.clone()
        };
        let created = creating.refresh_token_key().unwrap();
        // Now it is there, both settings read the same key.
        let read = config.refresh_token_key().unwrap();
        assert_eq!(
            read.to_hex().expose_secret(),
            created.to_hex().expose_secret()
        );
        std::fs::remove_dir_all(&directory).unwrap();
    }

    #[test]
    fn a_refresh_token_key_too_short_is_refused() {
        let config = TokenConfig {
            refresh_token_key: Some("ab".repeat(16)),
            ..TokenConfig::default()
        };
        assert!(matches!(
            config.refresh_token_key(),
            Err(KeyConfigError::Key {
                source: KeyError::InvalidDerivationKey(_),
                ..
            })
        ));
    }
}
