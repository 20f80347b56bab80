//! Every way a token is refused, each with its own typed reason.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::json;
use tokens::{
    Algorithm, KeySet, MAX_TOKEN_BYTES, TokenError, TokenIssuer, TokenSettings, TokenVerifier,
};
use uuid::Uuid;

use crate::support::*;

/// Builds a token from raw parts, signed or not.
fn compact(header: &serde_json::Value, claims: &serde_json::Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        b64_json(header),
        b64_json(claims),
        URL_SAFE_NO_PAD.encode(signature)
    )
}

/// Why `verifier` refuses `token` at [`now`]; panics when it accepts it.
fn refusal(verifier: &TokenVerifier, token: &str) -> TokenError {
    match verifier.verify(token, now()) {
        Ok(claims) => panic!("the token was accepted, with claims {claims:?}"),
        Err(error) => error,
    }
}

#[test]
fn a_token_with_alg_none_is_refused() {
    for algorithm in ALGORITHMS {
        let (key, verifier) = key_and_verifier(algorithm);
        for none in ["none", "None", "NONE"] {
            let header = json!({ "alg": none, "kid": key.kid(), "typ": "at+jwt" });
            for token in [
                compact(&header, &valid_claims(), b""),
                format!("{}.{}.", b64_json(&header), b64_json(&valid_claims())),
            ] {
                assert_eq!(refusal(&verifier, &token), TokenError::WrongAlgorithm);
            }
        }
    }
}

#[test]
fn an_hs256_token_keyed_with_the_public_key_is_refused() {
    for algorithm in ALGORITHMS {
        let (key, verifier) = key_and_verifier(algorithm);
        let jwk = key.verification_key().to_jwk();
        // Every form of the public key an attacker might try as the HMAC secret.
        let secrets = [
            serde_json::to_vec(&jwk).unwrap(),
            URL_SAFE_NO_PAD.decode(jwk["x"].as_str().unwrap()).unwrap(),
            jwk["x"].as_str().unwrap().as_bytes().to_vec(),
        ];
        for secret in secrets {
            for hmac in [
                jsonwebtoken::Algorithm::HS256,
                jsonwebtoken::Algorithm::HS512,
            ] {
                let mut header = jsonwebtoken::Header::new(hmac);
                header.kid = Some(key.kid().to_owned());
                header.typ = Some("at+jwt".to_owned());
                let token = jsonwebtoken::encode(
                    &header,
                    &valid_claims(),
                    &jsonwebtoken::EncodingKey::from_secret(&secret),
                )
                .unwrap();
                assert_eq!(refusal(&verifier, &token), TokenError::WrongAlgorithm);
            }
        }
    }
}

#[test]
fn a_token_whose_alg_differs_from_its_keys_algorithm_is_refused() {
    let eddsa = new_key(Algorithm::EdDSA);
    let es256 = new_key(Algorithm::ES256);
    let keys = KeySet::new(eddsa.clone(), vec![es256.verification_key().clone()]).unwrap();
    let verifier = TokenVerifier::from_key_set(&keys, settings());

    // Signed with the ES256 key but naming the EdDSA key.
    let header = json!({ "alg": "ES256", "kid": eddsa.kid(), "typ": "at+jwt" });
    let token = sign_as(&es256, &header, &valid_claims());
    assert_eq!(refusal(&verifier, &token), TokenError::WrongAlgorithm);
    // And the header claiming EdDSA for the ES256 key.
    let header = json!({ "alg": "EdDSA", "kid": es256.kid(), "typ": "at+jwt" });
    let token = sign_as(&eddsa, &header, &valid_claims());
    assert_eq!(refusal(&verifier, &token), TokenError::WrongAlgorithm);
}

#[test]
fn an_rsa_token_is_refused_as_a_wrong_algorithm() {
    let (key, verifier) = key_and_verifier(Algorithm::EdDSA);
    let header = json!({ "alg": "RS256", "kid": key.kid(), "typ": "at+jwt" });
    let token = compact(&header, &valid_claims(), &[0; 256]);
    assert_eq!(refusal(&verifier, &token), TokenError::WrongAlgorithm);
}

#[test]
fn an_expired_token_is_refused() {
    for algorithm in ALGORITHMS {
        let issuer = issuer_with(new_key(algorithm));
        let issued = issue(&issuer);
        let an_hour_later = now() + seconds(3600);
        assert_eq!(
            issuer
                .verifier()
                .verify(issued.token.expose_secret(), an_hour_later),
            Err(TokenError::Expired)
        );
    }
}

#[test]
fn a_token_used_before_its_nbf_is_refused_beyond_the_leeway() {
    let issuer = issuer_with(new_key(Algorithm::EdDSA));
    let verifier = issuer.verifier();
    let issued = issue(&issuer);
    let token = issued.token.expose_secret();

    // A verifier whose clock is 30 seconds behind still accepts it; 31 seconds is too many.
    assert!(verifier.verify(token, now() - seconds(30)).is_ok());
    assert_eq!(
        verifier.verify(token, now() - seconds(31)),
        Err(TokenError::NotYetValid)
    );
    assert_eq!(
        verifier.verify(token, now() - seconds(600)),
        Err(TokenError::NotYetValid)
    );
}

#[test]
fn a_token_from_another_issuer_is_refused() {
    let key = new_key(Algorithm::ES256);
    let other = TokenIssuer::new(
        KeySet::from(key.clone()),
        TokenSettings::new("https://impostor.example.test", AUDIENCE),
    );
    let issued = issue(&other);
    let verifier = verifier_for(&key);
    assert_eq!(verify_now(&verifier, &issued), Err(TokenError::WrongIssuer));
}

#[test]
fn a_token_for_another_audience_is_refused() {
    let key = new_key(Algorithm::EdDSA);
    let other = TokenIssuer::new(
        KeySet::from(key.clone()),
        TokenSettings::new(ISSUER, "some-other-service"),
    );
    let issued = issue(&other);
    let verifier = verifier_for(&key);
    assert_eq!(
        verify_now(&verifier, &issued),
        Err(TokenError::WrongAudience)
    );
}

#[test]
fn a_token_signed_by_an_unknown_key_under_its_own_kid_is_refused() {
    let verifier = verifier_for(&new_key(Algorithm::EdDSA));
    let stranger = issuer_with(new_key(Algorithm::EdDSA));
    let issued = issue(&stranger);
    assert_eq!(verify_now(&verifier, &issued), Err(TokenError::UnknownKey));
}

#[test]
fn a_token_naming_an_unknown_kid_is_refused() {
    let (key, verifier) = key_and_verifier(Algorithm::EdDSA);
    let header = json!({ "alg": "EdDSA", "kid": "no-such-key", "typ": "at+jwt" });
    let token = sign_as(&key, &header, &valid_claims());
    assert_eq!(refusal(&verifier, &token), TokenError::UnknownKey);
}

#[test]
fn a_token_without_a_kid_is_refused_even_when_its_signature_is_good() {
    for algorithm in ALGORITHMS {
        let (key, verifier) = key_and_verifier(algorithm);
        let header = json!({ "alg": algorithm.as_str(), "typ": "at+jwt" });
        let token = sign_as(&key, &header, &valid_claims());
        assert_eq!(refusal(&verifier, &token), TokenError::UnknownKey);
    }
}

#[test]
fn a_token_signed_by_an_unknown_key_under_a_known_kid_is_refused() {
    for algorithm in ALGORITHMS {
        let (key, verifier) = key_and_verifier(algorithm);
        let forger = new_key(algorithm);
        let token = sign_as(&forger, &header_for(&key), &valid_claims());
        assert_eq!(refusal(&verifier, &token), TokenError::BadSignature);
    }
}

#[test]
fn a_token_whose_payload_was_tampered_with_is_refused() {
    for algorithm in ALGORITHMS {
        let issuer = issuer_with(new_key(algorithm));
        let issued = issuer
            .issue(
                Uuid::new_v4(),
                Uuid::new_v4(),
                vec!["user".into()],
                false,
                now(),
            )
            .unwrap();
        let parts: Vec<&str> = issued.token.expose_secret().split('.').collect();

        let mut claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        claims["roles"] = json!(["administrator"]);
        let tampered = format!("{}.{}.{}", parts[0], b64_json(&claims), parts[2]);

        assert_eq!(
            refusal(&issuer.verifier(), &tampered),
            TokenError::BadSignature
        );
    }
}

#[test]
fn a_token_with_a_missing_or_altered_signature_is_refused() {
    let issuer = issuer_with(new_key(Algorithm::ES256));
    let verifier = issuer.verifier();
    let issued = issue(&issuer);
    let token = issued.token.expose_secret();
    let (message, signature) = token.rsplit_once('.').unwrap();

    let mut flipped = URL_SAFE_NO_PAD.decode(signature).unwrap();
    flipped[10] ^= 1;
    for signature in [
        String::new(),
        URL_SAFE_NO_PAD.encode(flipped),
        "AAAA".to_owned(),
    ] {
        let token = format!("{message}.{signature}");
        assert_eq!(refusal(&verifier, &token), TokenError::BadSignature);
    }
}

#[test]
fn a_token_over_8_kib_is_refused_before_it_is_read() {
    let (key, verifier) = key_and_verifier(Algorithm::EdDSA);
    let mut header = header_for(&key);
    header["padding"] = json!("x".repeat(MAX_TOKEN_BYTES));
    let token = sign_as(&key, &header, &valid_claims());
    assert!(token.len() > 8 * 1024);
    assert_eq!(refusal(&verifier, &token), TokenError::TooLarge);
}

#[test]
fn a_jwt_of_another_type_is_refused() {
    let (key, verifier) = key_and_verifier(Algorithm::EdDSA);
    let without_type = json!({ "alg": "EdDSA", "kid": key.kid() });
    for header in [
        json!({ "alg": "EdDSA", "kid": key.kid(), "typ": "JWT" }),
        json!({ "alg": "EdDSA", "kid": key.kid(), "typ": "id_token+jwt" }),
        without_type,
    ] {
        let token = sign_as(&key, &header, &valid_claims());
        assert_eq!(refusal(&verifier, &token), TokenError::WrongType);
    }
    // The media-type spelling of the access token type is accepted, in any case.
    let header = json!({ "alg": "EdDSA", "kid": key.kid(), "typ": "Application/AT+JWT" });
    let token = sign_as(&key, &header, &valid_claims());
    assert!(verifier.verify(&token, now()).is_ok());
}

#[test]
fn a_token_with_a_critical_header_extension_is_refused() {
    let (key, verifier) = key_and_verifier(Algorithm::EdDSA);
    let mut header = header_for(&key);
    header["crit"] = json!(["exp"]);
    let token = sign_as(&key, &header, &valid_claims());
    assert_eq!(refusal(&verifier, &token), TokenError::Malformed);
}

#[test]
fn a_signed_token_whose_subject_is_an_email_is_malformed() {
    let (key, verifier) = key_and_verifier(Algorithm::EdDSA);
    let mut claims = valid_claims();
    claims["sub"] = json!("someone@example.test");
    let token = sign_as(&key, &header_for(&key), &claims);
    assert_eq!(refusal(&verifier, &token), TokenError::Malformed);
}

#[test]
fn a_signed_token_missing_a_claim_is_malformed() {
    let (key, verifier) = key_and_verifier(Algorithm::EdDSA);
    for claim in [
        "iss", "sub", "aud", "exp", "iat", "nbf", "jti", "sid", "roles",
    ] {
        let mut claims = valid_claims();
        claims.as_object_mut().unwrap().remove(claim);
        let token = sign_as(&key, &header_for(&key), &claims);
        assert_eq!(refusal(&verifier, &token), TokenError::Malformed, "{claim}");
    }
}

#[test]
fn text_that_is_not_a_compact_jwt_is_malformed() {
    let (key, verifier) = key_and_verifier(Algorithm::EdDSA);
    let good = sign_as(&key, &header_for(&key), &valid_claims());
    let (_, rest) = good.split_once('.').unwrap();
    for token in [
        String::new(),
        "not a token".to_owned(),
        "a.b".to_owned(),
        format!("{good}.extra"),
        format!("!!!.{rest}"),
        format!("{}.{rest}", URL_SAFE_NO_PAD.encode("not json")),
        format!("{}.{rest}", URL_SAFE_NO_PAD.encode("[1,2]")),
        format!("{}=.{rest}", b64_json(&header_for(&key))),
    ] {
        assert_eq!(refusal(&verifier, &token), TokenError::Malformed, "{token}");
    }
}
