//! Shared test helpers: settings, a fixed clock, and a way to sign hand-made tokens.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, TimeZone, Utc};
use serde_json::{Value, json};
use tokens::{
    Algorithm, Claims, IssuedToken, KeySet, SigningKey, TokenError, TokenIssuer, TokenSettings,
    TokenVerifier,
};
use uuid::Uuid;

pub const ISSUER: &str = "https://identity.example.test";
pub const AUDIENCE: &str = "family-services";
pub const ALGORITHMS: [Algorithm; 2] = [Algorithm::EdDSA, Algorithm::ES256];

pub fn settings() -> TokenSettings {
    TokenSettings::new(ISSUER, AUDIENCE)
}

/// A fixed instant: no test reads the clock.
pub fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap()
}

pub fn seconds(n: i64) -> chrono::TimeDelta {
    chrono::TimeDelta::seconds(n)
}

pub fn new_key(algorithm: Algorithm) -> SigningKey {
    SigningKey::generate(algorithm).unwrap()
}

pub fn issuer_with(key: SigningKey) -> TokenIssuer {
    TokenIssuer::new(KeySet::from(key), settings())
}

/// The verifier of an issuer that signs with `key`.
pub fn verifier_for(key: &SigningKey) -> TokenVerifier {
    issuer_with(key.clone()).verifier()
}

/// A new key of `algorithm`, and the verifier of an issuer that signs with it.
pub fn key_and_verifier(algorithm: Algorithm) -> (SigningKey, TokenVerifier) {
    let key = new_key(algorithm);
    let verifier = verifier_for(&key);
    (key, verifier)
}

/// A token for a new user with no roles, issued at [`now`].
pub fn issue(issuer: &TokenIssuer) -> IssuedToken {
    issuer
        .issue(Uuid::new_v4(), Uuid::new_v4(), vec![], false, now())
        .unwrap()
}

/// What `verifier` makes of `issued` at [`now`].
pub fn verify_now(verifier: &TokenVerifier, issued: &IssuedToken) -> Result<Claims, TokenError> {
    verifier.verify(issued.token.expose_secret(), now())
}

pub fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(path).unwrap()
}

/// The header this service puts on its tokens.
pub fn header_for(key: &SigningKey) -> Value {
    json!({ "alg": key.algorithm().as_str(), "kid": key.kid(), "typ": "at+jwt" })
}

/// Claims that pass every check at [`now`].
pub fn valid_claims() -> Value {
    let now = now().timestamp();
    json!({
        "iss": ISSUER,
        "sub": Uuid::new_v4(),
        "aud": AUDIENCE,
        "exp": now + 900,
        "iat": now,
        "nbf": now,
        "jti": Uuid::new_v4(),
        "sid": Uuid::new_v4(),
        "roles": ["user"],
    })
}

pub fn b64_json(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap())
}

/// Signs any header and claims with `key`, bypassing the issuer, to make tokens the issuer
/// would never make.
pub fn sign_as(key: &SigningKey, header: &Value, claims: &Value) -> String {
    let pem = key.to_pem().unwrap();
    let pem = pem.expose_secret().as_bytes();
    let (encoding, algorithm) = match key.algorithm() {
        Algorithm::EdDSA => (
            jsonwebtoken::EncodingKey::from_ed_pem(pem).unwrap(),
            jsonwebtoken::Algorithm::EdDSA,
        ),
        Algorithm::ES256 => (
            jsonwebtoken::EncodingKey::from_ec_pem(pem).unwrap(),
            jsonwebtoken::Algorithm::ES256,
        ),
    };
    let message = format!("{}.{}", b64_json(header), b64_json(claims));
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &encoding, algorithm).unwrap();
    format!("{message}.{signature}")
}
