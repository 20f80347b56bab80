//! The signing secrets of webhook endpoints, and the signatures of their deliveries, as the
//! Standard Webhooks specification has them (docs/adr/0014).
//!
//! An endpoint's secret is HMAC-SHA-256, under a [`WebhookSecretKey`] from the configuration,
//! of the endpoint's id and a nonce kept in its registration (or rotation) event, as refresh
//! tokens and mail links are made: the command API, which shows it once, and the aggregator,
//! which signs with it, both hold the key; the store holds nonces only, so a copy of the
//! database forges no delivery (DESIGN decision 15).
//!
//! A delivery is signed over `<webhook-id>.<webhook-timestamp>.<body>` with HMAC-SHA-256 under
//! the secret's bytes, and the signature header lists `v1,<base64>` for every secret the
//! endpoint currently signs with, separated by spaces.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::Mac;
use uuid::Uuid;

use crate::derivation_key::{DerivationKey, HmacSha256, KeyPurpose};
use crate::keys::KeyError;
use crate::refresh::NONCE_LEN;
use crate::secret::Secret;

/// Webhook secret keys' purpose.
pub enum WebhookSecrets {}

impl KeyPurpose for WebhookSecrets {
    const NAME: &'static str = "webhook secret key";
    const TYPE_NAME: &'static str = "WebhookSecretKey";
    const DOMAIN: &'static [u8] = b"identity-service webhook secret v1\0";
    const READING: &'static str = "reading the webhook secret key at";
    const MAKING_DIRECTORY: &'static str = "creating the directory of the webhook secret key";
    const WRITING: &'static str = "writing the webhook secret key to";
}

/// The key endpoints' signing secrets are derived with: a secret of the command API and of the
/// aggregator.
pub type WebhookSecretKey = DerivationKey<WebhookSecrets>;

/// The prefix of a secret's text, as Standard Webhooks libraries expect it.
const SECRET_PREFIX: &str = "whsec_";

/// The secret an endpoint's deliveries are signed with. `Debug` never shows it, and its text is
/// only had through [`Self::text`], wrapped.
#[derive(Clone)]
pub struct WebhookSecret {
    bytes: Secret<Vec<u8>>,
}

impl WebhookSecret {
    /// The secret of endpoint `endpoint` for `nonce`.
    pub fn derive(
        key: &WebhookSecretKey,
        endpoint: Uuid,
        nonce: &[u8; NONCE_LEN],
    ) -> Result<Self, KeyError> {
        let mut mac = key.mac()?;
        mac.update(endpoint.as_bytes());
        mac.update(nonce);
        Ok(Self {
            bytes: Secret::new(mac.finalize().into_bytes().to_vec()),
        })
    }

    /// Reads a secret's text (`whsec_<base64>` of 24 to 64 bytes, as the specification allows),
    /// as a receiver is given it.
    pub fn from_text(text: &str) -> Option<Self> {
        let bytes = Secret::new(STANDARD.decode(text.strip_prefix(SECRET_PREFIX)?).ok()?);
        (24..=64)
            .contains(&bytes.expose_secret().len())
            .then_some(Self { bytes })
    }

    /// `whsec_` and the secret's bytes in base64: what the administrator is shown once and
    /// gives the receiver. A method rather than `Display`, so that it cannot reach a log.
    pub fn text(&self) -> Secret<String> {
        Secret::new(format!(
            "{SECRET_PREFIX}{}",
            STANDARD.encode(self.bytes.expose_secret())
        ))
    }

    /// The `v1,<base64>` signature of a delivery with id `id`, sent at `timestamp` (seconds
    /// since the epoch), of `body`.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        format!("v1,{}", STANDARD.encode(self.mac(id, timestamp, body)))
    }

    /// Whether `header` (a `webhook-signature` value: signatures separated by spaces) holds a
    /// `v1` signature of this secret's over the delivery, compared in constant time. What a
    /// receiver does; here for the tests and the examples.
    pub fn verifies(&self, header: &str, id: &str, timestamp: i64, body: &[u8]) -> bool {
        header.split(' ').any(|signature| {
            signature
                .strip_prefix("v1,")
                .and_then(|encoded| STANDARD.decode(encoded).ok())
                .is_some_and(|presented| {
                    self.keyed()
                        .map(|mut mac| {
                            feed(&mut mac, id, timestamp, body);
                            mac.verify_slice(&presented).is_ok()
                        })
                        .unwrap_or(false)
                })
        })
    }

    fn mac(&self, id: &str, timestamp: i64, body: &[u8]) -> Vec<u8> {
        match self.keyed() {
            Some(mut mac) => {
                feed(&mut mac, id, timestamp, body);
                mac.finalize().into_bytes().to_vec()
            }
            None => Vec::new(),
        }
    }

    fn keyed(&self) -> Option<HmacSha256> {
        // HMAC takes a key of any length: this never fails.
        <HmacSha256 as Mac>::new_from_slice(self.bytes.expose_secret()).ok()
    }
}

fn feed(mac: &mut HmacSha256, id: &str, timestamp: i64, body: &[u8]) {
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret([redacted])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> WebhookSecretKey {
        WebhookSecretKey::from_hex(&"3c".repeat(32)).unwrap()
    }

    /// The example of the Standard Webhooks specification's reference libraries: this secret,
    /// id, timestamp and body sign to this value.
    #[test]
    fn a_signature_matches_the_specification_s_example() {
        let secret = WebhookSecret::from_text("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        let signature = secret.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(secret.verifies(
            &format!("v1,bm90IGl0 {signature}"),
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            body
        ));
        assert!(!secret.verifies(&signature, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265331, body));
    }

    #[test]
    fn a_secret_depends_on_the_key_the_endpoint_and_the_nonce() {
        let endpoint = Uuid::from_u128(1);
        let text = |key: &WebhookSecretKey, endpoint: Uuid, nonce: u8| {
            WebhookSecret::derive(key, endpoint, &[nonce; NONCE_LEN])
                .unwrap()
                .text()
                .expose_secret()
                .clone()
        };
        let one = text(&key(), endpoint, 1);
        assert_eq!(one, text(&key(), endpoint, 1));
        assert_ne!(one, text(&key(), endpoint, 2));
        assert_ne!(one, text(&key(), Uuid::from_u128(2), 1));
        assert_ne!(
            one,
            text(&WebhookSecretKey::generate().unwrap(), endpoint, 1)
        );
        let again = WebhookSecret::from_text(&one).unwrap();
        assert_eq!(again.text().expose_secret(), &one);
    }

    #[test]
    fn debug_output_never_shows_the_secret() {
        let secret = WebhookSecret::derive(&key(), Uuid::from_u128(1), &[1; NONCE_LEN]).unwrap();
        assert_eq!(format!("{secret:?}"), "WebhookSecret([redacted])");
        assert_eq!(format!("{:?}", key()), "WebhookSecretKey([redacted])");
    }
}
