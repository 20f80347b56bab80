//! Keys and tokens never reach a log through `Debug` (design decision 11).

use tokens::{Algorithm, KeySet, TokenIssuer};

use crate::support::*;

/// The base64 body of a PEM, which is the key material.
fn pem_body(pem: &str) -> String {
    pem.lines()
        .filter(|line| !line.starts_with("-----"))
        .collect()
}

#[test]
fn the_debug_of_a_signing_key_shows_its_kid_and_algorithm_and_no_key_material() {
    for algorithm in ALGORITHMS {
        let key = new_key(algorithm);
        let pem = key.to_pem().unwrap();
        let body = pem_body(pem.expose_secret());
        let issuer = TokenIssuer::new(KeySet::from(key.clone()), settings());

        for debug in [
            format!("{key:?}"),
            format!("{key:#?}"),
            format!("{:?}", KeySet::from(key.clone())),
            format!("{issuer:?}"),
            format!("{:?}", issuer.verifier()),
            format!("{:?}", key.verification_key()),
        ] {
            assert!(debug.contains(key.kid()), "{debug}");
            assert!(debug.contains(algorithm.as_str()), "{debug}");
            // No 8-character piece of the encoded key, nor the public coordinate.
            for piece in body.as_bytes().chunks(8) {
                assert!(
                    !debug.contains(std::str::from_utf8(piece).unwrap()),
                    "{debug}"
                );
            }
            let jwk = key.verification_key().to_jwk();
            assert!(!debug.contains(jwk["x"].as_str().unwrap()), "{debug}");
        }
    }
}

#[test]
fn the_debug_of_a_pem_and_of_an_issued_token_is_redacted() {
    let key = new_key(Algorithm::EdDSA);
    assert_eq!(format!("{:?}", key.to_pem().unwrap()), "[redacted]");

    let issued = issue(&issuer_with(key));
    let debug = format!("{issued:?}");
    assert!(debug.contains("[redacted]"), "{debug}");
    for part in issued.token.expose_secret().split('.') {
        assert!(!debug.contains(part), "{debug}");
    }
}

#[test]
fn a_refusal_says_why_without_quoting_the_token() {
    let issuer = issuer_with(new_key(Algorithm::ES256));
    let issued = issue(&issuer);
    let token = issued.token.expose_secret();
    let error = issuer
        .verifier()
        .verify(token, now() + seconds(3600))
        .unwrap_err();
    for text in [error.to_string(), format!("{error:?}")] {
        for part in token.split('.') {
            assert!(!text.contains(part), "{text}");
        }
    }
}
