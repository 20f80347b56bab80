//! Keys: generated or read from PEM, published as JWKs, identified by their thumbprint.

use serde_json::{Value, json};
use tokens::{Algorithm, KeyError, SigningKey, VerificationKey};

use crate::support::*;

#[test]
fn a_generated_key_survives_its_pem_with_the_same_kid_and_algorithm() {
    for algorithm in ALGORITHMS {
        let key = new_key(algorithm);
        let pem = key.to_pem().unwrap();
        assert!(
            pem.expose_secret()
                .starts_with("-----BEGIN PRIVATE KEY-----")
        );

        let reloaded = SigningKey::from_pem(pem.expose_secret()).unwrap();
        assert_eq!(reloaded.kid(), key.kid());
        assert_eq!(reloaded.algorithm(), algorithm);
    }
}

#[test]
fn two_generated_keys_differ() {
    for algorithm in ALGORITHMS {
        assert_ne!(new_key(algorithm).kid(), new_key(algorithm).kid());
    }
}

#[test]
fn the_kid_is_the_jwk_thumbprint_however_the_public_key_is_read() {
    for algorithm in ALGORITHMS {
        let key = new_key(algorithm);
        let public = key.verification_key();
        assert_eq!(public.thumbprint(), key.kid());
        assert_eq!(
            VerificationKey::from_jwk(&public.to_jwk()).unwrap(),
            *public
        );
        let from_private_pem =
            VerificationKey::from_pem(key.to_pem().unwrap().expose_secret()).unwrap();
        assert_eq!(from_private_pem, *public);

        let mut without_kid = public.to_jwk();
        without_kid.as_object_mut().unwrap().remove("kid");
        assert_eq!(
            VerificationKey::from_jwk(&without_kid).unwrap().kid(),
            key.kid()
        );
    }
}

#[test]
fn keys_made_by_openssl_are_read_and_their_public_pems_give_the_same_kid() {
    for (private, public, algorithm) in [
        (
            "openssl-ed25519.pem",
            "openssl-ed25519.pub.pem",
            Algorithm::EdDSA,
        ),
        ("openssl-p256.pem", "openssl-p256.pub.pem", Algorithm::ES256),
    ] {
        let key = SigningKey::from_pem(&fixture(private)).unwrap();
        assert_eq!(key.algorithm(), algorithm);
        let public = VerificationKey::from_pem(&fixture(public)).unwrap();
        assert_eq!(public.kid(), key.kid());
        // Surrounding whitespace, as an environment variable or a mounted file may have.
        let padded = format!("\n  {}\n\n", fixture(private));
        assert_eq!(SigningKey::from_pem(&padded).unwrap().kid(), key.kid());
        // Windows line endings, as a file edited on Windows has.
        let crlf = fixture(private).replace('\n', "\r\n");
        assert_eq!(SigningKey::from_pem(&crlf).unwrap().kid(), key.kid());
    }
}

#[test]
fn rsa_and_p384_keys_are_refused_as_unsupported() {
    for name in ["openssl-rsa.pem", "openssl-p384.pem"] {
        assert!(
            matches!(
                SigningKey::from_pem(&fixture(name)),
                Err(KeyError::UnsupportedKeyType)
            ),
            "{name}"
        );
    }
}

#[test]
fn a_sec1_ec_private_key_is_refused_with_a_hint_to_convert_it() {
    let error = SigningKey::from_pem(&fixture("openssl-p256-sec1.pem")).unwrap_err();
    assert!(matches!(error, KeyError::NotPem));
    assert!(error.to_string().contains("openssl pkcs8 -topk8 -nocrypt"));
}

#[test]
fn text_that_is_not_a_pem_key_is_refused() {
    for text in [
        "",
        "hello",
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----",
    ] {
        assert!(
            matches!(SigningKey::from_pem(text), Err(KeyError::NotPem)),
            "{text}"
        );
        assert!(
            matches!(VerificationKey::from_pem(text), Err(KeyError::NotPem)),
            "{text}"
        );
    }
}

#[test]
fn a_public_pem_cannot_sign() {
    assert!(matches!(
        SigningKey::from_pem(&fixture("openssl-p256.pub.pem")),
        Err(KeyError::NotAPrivateKey)
    ));
}

#[test]
fn an_eddsa_jwk_has_exactly_the_published_members() {
    let key = new_key(Algorithm::EdDSA);
    let jwk = key.verification_key().to_jwk();
    let x = jwk["x"].as_str().unwrap().to_owned();
    assert_eq!(x.len(), 43, "32 bytes of unpadded base64url");
    assert_eq!(
        jwk,
        json!({ "kty": "OKP", "crv": "Ed25519", "x": x, "kid": key.kid(), "alg": "EdDSA", "use": "sig" })
    );
}

#[test]
fn an_es256_jwk_has_exactly_the_published_members() {
    let key = new_key(Algorithm::ES256);
    let jwk = key.verification_key().to_jwk();
    let x = jwk["x"].as_str().unwrap().to_owned();
    let y = jwk["y"].as_str().unwrap().to_owned();
    assert_eq!((x.len(), y.len()), (43, 43));
    assert_eq!(
        jwk,
        json!({ "kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": key.kid(), "alg": "ES256", "use": "sig" })
    );
}

/// Whether reading `jwk` fails because it is not a JWK this crate accepts.
fn is_refused_as_invalid(jwk: &Value) -> bool {
    matches!(VerificationKey::from_jwk(jwk), Err(KeyError::InvalidJwk(_)))
}

#[test]
fn a_jwk_with_a_private_part_is_refused() {
    let mut jwk = new_key(Algorithm::EdDSA).verification_key().to_jwk();
    jwk["d"] = json!("nhbSHFbiaeAuBXy3CUZ_RAwN8-Lh3a8HmhlQjYrcpDM");
    assert!(is_refused_as_invalid(&jwk));
}

#[test]
fn a_jwk_for_encryption_or_with_a_contradicting_alg_is_refused() {
    let jwk = new_key(Algorithm::ES256).verification_key().to_jwk();
    for (member, value) in [
        ("use", "enc"),
        ("alg", "EdDSA"),
        ("alg", "ES384"),
        ("alg", "none"),
    ] {
        let mut changed = jwk.clone();
        changed[member] = json!(value);
        assert!(is_refused_as_invalid(&changed), "{member}: {value}");
    }
}

#[test]
fn a_jwk_whose_point_is_not_on_its_curve_is_refused() {
    let mut jwk = new_key(Algorithm::ES256).verification_key().to_jwk();
    jwk["y"] = jwk["x"].clone();
    assert!(matches!(
        VerificationKey::from_jwk(&jwk),
        Err(KeyError::InvalidKey("P-256"))
    ));
}

#[test]
fn a_jwk_with_coordinates_of_the_wrong_length_is_refused_without_panicking() {
    for jwk in [
        json!({ "kty": "OKP", "crv": "Ed25519", "x": "AAAA" }),
        json!({ "kty": "OKP", "crv": "Ed25519", "x": "" }),
        json!({ "kty": "OKP", "crv": "Ed25519" }),
        json!({ "kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA" }),
        json!({ "kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo=" }),
    ] {
        assert!(is_refused_as_invalid(&jwk), "{jwk}");
    }
}

#[test]
fn a_small_order_ed25519_key_is_refused() {
    // The identity point, which "verifies" forged signatures for many messages.
    let mut identity = [0_u8; 32];
    identity[0] = 1;
    let jwk = json!({
        "kty": "OKP",
        "crv": "Ed25519",
        "x": base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, identity),
    });
    assert!(matches!(
        VerificationKey::from_jwk(&jwk),
        Err(KeyError::InvalidKey("Ed25519"))
    ));
}

#[test]
fn a_jwks_loads_its_supported_keys_and_skips_the_others() {
    let key = new_key(Algorithm::EdDSA);
    let jwks = json!({ "keys": [
        { "kty": "RSA", "n": "AQAB", "e": "AQAB", "kid": "rsa", "alg": "RS256" },
        { "kty": "OKP", "crv": "X25519", "x": "AAAA", "kid": "ecdh" },
        key.verification_key().to_jwk(),
    ]});
    let keys = VerificationKey::from_jwks(&jwks).unwrap();
    assert_eq!(keys, [key.verification_key().clone()]);
    assert!(matches!(
        VerificationKey::from_jwks(&json!([])),
        Err(KeyError::InvalidJwk(_))
    ));
}

#[test]
fn the_kids_a_jwks_publishes_are_read_as_written() {
    let key = new_key(Algorithm::ES256);
    let jwks = json!({ "keys": [
        { "kty": "RSA", "n": "AQAB", "e": "AQAB", "kid": "rsa", "alg": "RS256" },
        key.verification_key().to_jwk(),
    ]});
    assert_eq!(tokens::published_kids(&jwks), Some(vec!["rsa", key.kid()]));
    let mut without_kid = key.verification_key().to_jwk();
    without_kid.as_object_mut().unwrap().remove("kid");
    assert_eq!(
        tokens::published_kids(&json!({ "keys": [without_kid] })),
        None
    );
    assert_eq!(tokens::published_kids(&json!([])), None);
}
