//! Key rotation: announce the next key, switch to it, retire the old one.

use std::collections::BTreeSet;

use tokens::{
    Algorithm, KeyError, KeySet, TokenError, TokenIssuer, TokenVerifier, VerificationKey,
};
use uuid::Uuid;

use crate::support::*;

fn published_kids(jwks: &serde_json::Value) -> BTreeSet<String> {
    let kids = tokens::published_kids(jwks).expect("a JWKS whose every key has a kid");
    kids.into_iter().map(str::to_owned).collect()
}

#[test]
fn a_rotation_keeps_every_live_token_valid_from_announcement_to_retirement() {
    let old = new_key(Algorithm::EdDSA);
    let next = new_key(Algorithm::EdDSA);
    let before = issuer_with(old.clone());
    let old_token = issue(&before);

    // 1. Announce: the old key still signs, the next one is published.
    let announcing = TokenIssuer::new(
        KeySet::new(old.clone(), vec![next.verification_key().clone()]).unwrap(),
        settings(),
    );
    let announced = announcing.jwks();
    assert_eq!(
        published_kids(&announced),
        BTreeSet::from([old.kid().to_owned(), next.kid().to_owned()])
    );
    let announced_token = issue(&announcing);
    assert!(announced_token.token.expose_secret().contains('.'));

    // 2. Switch: the next key signs, the old one stays published.
    let switched = TokenIssuer::new(
        KeySet::new(next.clone(), vec![old.verification_key().clone()]).unwrap(),
        settings(),
    );
    let new_token = issue(&switched);
    assert_eq!(published_kids(&switched.jwks()), published_kids(&announced));

    // A service that fetched the JWKS during the announcement accepts tokens of both keys...
    let cached = TokenVerifier::from_jwks(&announced, settings()).unwrap();
    assert!(verify_now(&cached, &new_token).is_ok());
    assert!(verify_now(&cached, &old_token).is_ok());
    // ...and so does the issuer's own verifier after the switch.
    let verifier = switched.verifier();
    assert!(verify_now(&verifier, &old_token).is_ok());
    assert!(verify_now(&verifier, &announced_token).is_ok());
    assert!(verify_now(&verifier, &new_token).is_ok());

    // 3. Retire: only the next key is left, and the old key's tokens are refused.
    let retired = issuer_with(next.clone());
    assert_eq!(
        published_kids(&retired.jwks()),
        BTreeSet::from([next.kid().to_owned()])
    );
    assert_eq!(
        verify_now(&retired.verifier(), &old_token),
        Err(TokenError::UnknownKey)
    );
}

#[test]
fn keys_of_both_algorithms_can_be_published_side_by_side() {
    let eddsa = new_key(Algorithm::EdDSA);
    let es256 = new_key(Algorithm::ES256);
    let es256_token = issuer_with(es256.clone())
        .issue(Uuid::new_v4(), Uuid::new_v4(), vec![], false, now())
        .unwrap();
    let keys = KeySet::new(eddsa, vec![es256.verification_key().clone()]).unwrap();
    let verifier = TokenVerifier::from_jwks(&keys.jwks(), settings()).unwrap();
    assert!(verify_now(&verifier, &es256_token).is_ok());
}

#[test]
fn the_published_keys_are_read_from_public_or_private_pems() {
    let current = new_key(Algorithm::EdDSA);
    let retired_private = new_key(Algorithm::ES256);
    let published_public = fixture("openssl-ed25519.pub.pem");

    let keys = KeySet::from_pems(
        current.to_pem().unwrap().expose_secret(),
        &[
            retired_private.to_pem().unwrap().expose_secret().clone(),
            published_public.clone(),
        ],
    )
    .unwrap();

    assert_eq!(keys.current().kid(), current.kid());
    let kids: Vec<&str> = keys.published().iter().map(|key| key.kid()).collect();
    let openssl_kid = VerificationKey::from_pem(&published_public).unwrap();
    assert_eq!(kids, [retired_private.kid(), openssl_kid.kid()]);
    assert_eq!(published_kids(&keys.jwks()).len(), 3);
}

#[test]
fn a_key_set_needs_a_private_key_to_sign_with() {
    let public = fixture("openssl-ed25519.pub.pem");
    assert!(matches!(
        KeySet::from_pems(&public, &[] as &[String]),
        Err(KeyError::NotAPrivateKey)
    ));
}

#[test]
fn listing_a_key_twice_or_the_current_key_as_published_collapses_to_one_entry() {
    let current = new_key(Algorithm::EdDSA);
    let other = new_key(Algorithm::EdDSA);
    let keys = KeySet::new(
        current.clone(),
        vec![
            current.verification_key().clone(),
            other.verification_key().clone(),
            other.verification_key().clone(),
        ],
    )
    .unwrap();
    assert_eq!(keys.published(), [other.verification_key().clone()]);
    assert_eq!(keys.jwks()["keys"].as_array().unwrap().len(), 2);
}

#[test]
fn two_different_keys_under_one_kid_are_refused() {
    let current = new_key(Algorithm::EdDSA);
    let mut impostor = new_key(Algorithm::EdDSA).verification_key().to_jwk();
    impostor["kid"] = current.kid().into();
    let impostor = VerificationKey::from_jwk(&impostor).unwrap();

    assert!(matches!(
        KeySet::new(current.clone(), vec![impostor.clone()]),
        Err(KeyError::DuplicateKeyId(kid)) if kid == current.kid()
    ));
    assert!(matches!(
        TokenVerifier::new(
            vec![current.verification_key().clone(), impostor],
            settings()
        ),
        Err(KeyError::DuplicateKeyId(_))
    ));
}

#[test]
fn a_verifier_without_keys_is_a_configuration_error() {
    assert!(matches!(
        TokenVerifier::new(vec![], settings()),
        Err(KeyError::NoKeys)
    ));
    assert!(matches!(
        TokenVerifier::from_jwks(&serde_json::json!({ "keys": [] }), settings()),
        Err(KeyError::NoKeys)
    ));
}
