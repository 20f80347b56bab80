//! Tokens the issuer signs verify, with the claims they were issued with.

use serde_json::Value;
use tokens::{KeySet, SigningKey, TokenError, TokenVerifier, VerificationKey};
use uuid::Uuid;

use crate::support::*;

fn header_of(token: &str) -> Value {
    let header = token.split('.').next().unwrap();
    serde_json::from_slice(
        &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, header).unwrap(),
    )
    .unwrap()
}

#[test]
fn a_token_verifies_and_carries_the_claims_it_was_issued_with_for_each_algorithm() {
    for algorithm in ALGORITHMS {
        let issuer = issuer_with(new_key(algorithm));
        let user = Uuid::new_v4();
        let session = Uuid::new_v4();
        let roles = vec!["user".to_owned(), "administrator".to_owned()];

        let issued = issuer
            .issue(user, session, roles.clone(), true, now())
            .unwrap();
        let claims = verify_now(&issuer.verifier(), &issued).unwrap();
        assert!(claims.email_verified);
        let unverified = issuer.issue(user, session, vec![], false, now()).unwrap();
        assert!(
            !verify_now(&issuer.verifier(), &unverified)
                .unwrap()
                .email_verified
        );

        assert_eq!(claims.iss, ISSUER);
        assert_eq!(claims.sub, user);
        assert_eq!(claims.aud, AUDIENCE);
        assert_eq!(claims.iat, now().timestamp());
        assert_eq!(claims.nbf, now().timestamp());
        assert_eq!(claims.exp, now().timestamp() + 15 * 60);
        assert_eq!(claims.jti, issued.jti);
        assert_eq!(claims.sid, session);
        assert_eq!(claims.roles, roles);
        assert!(claims.has_role("administrator"));
        assert_eq!(issued.expires_in, 15 * 60);
        assert_eq!(issued.expires_at, now() + seconds(15 * 60));
    }
}

#[test]
fn the_header_names_the_algorithm_the_key_id_and_the_access_token_type() {
    for algorithm in ALGORITHMS {
        let key = new_key(algorithm);
        let kid = key.kid().to_owned();
        let issued = issue(&issuer_with(key));

        let header = header_of(issued.token.expose_secret());
        assert_eq!(header["alg"], algorithm.as_str());
        assert_eq!(header["kid"], kid.as_str());
        assert_eq!(header["typ"], "at+jwt");
    }
}

#[test]
fn every_token_gets_its_own_jti() {
    let issuer = issuer_with(new_key(tokens::Algorithm::EdDSA));
    let (user, session) = (Uuid::new_v4(), Uuid::new_v4());
    let first = issuer.issue(user, session, vec![], false, now()).unwrap();
    let second = issuer.issue(user, session, vec![], false, now()).unwrap();
    assert_ne!(first.jti, second.jti);
}

#[test]
fn the_lifetime_comes_from_the_settings() {
    let settings = settings().with_lifetime(std::time::Duration::from_secs(60));
    let issuer =
        tokens::TokenIssuer::new(KeySet::from(new_key(tokens::Algorithm::ES256)), settings);
    let issued = issue(&issuer);
    assert_eq!(issued.expires_in, 60);
    let claims = verify_now(&issuer.verifier(), &issued).unwrap();
    assert_eq!(claims.exp, now().timestamp() + 60);
}

#[test]
fn a_token_verifies_until_its_expiry_plus_the_leeway_and_not_a_second_longer() {
    let issuer = issuer_with(new_key(tokens::Algorithm::EdDSA));
    let verifier = issuer.verifier();
    let issued = issue(&issuer);
    let token = issued.token.expose_secret();
    let leeway = seconds(30);

    assert!(
        verifier
            .verify(token, issued.expires_at - seconds(1))
            .is_ok()
    );
    assert!(verifier.verify(token, issued.expires_at).is_ok());
    assert!(
        verifier
            .verify(token, issued.expires_at + leeway - seconds(1))
            .is_ok()
    );
    assert_eq!(
        verifier.verify(token, issued.expires_at + leeway),
        Err(TokenError::Expired)
    );
}

#[test]
fn a_token_verifies_against_the_published_jwks_alone() {
    for algorithm in ALGORITHMS {
        let issuer = issuer_with(new_key(algorithm));
        let issued = issue(&issuer);
        // What another service fetches: JSON text, parsed with no access to the key set.
        let published = serde_json::to_string(&issuer.jwks()).unwrap();
        let fetched: Value = serde_json::from_str(&published).unwrap();

        let keys = VerificationKey::from_jwks(&fetched).unwrap();
        let verifier = TokenVerifier::new(keys, settings()).unwrap();
        assert!(verify_now(&verifier, &issued).is_ok());

        let verifier = TokenVerifier::from_jwks(&fetched, settings()).unwrap();
        assert!(verify_now(&verifier, &issued).is_ok());
    }
}

#[test]
fn a_verifier_built_from_a_public_pem_accepts_tokens_signed_with_an_openssl_key() {
    for (private, public) in [
        ("openssl-ed25519.pem", "openssl-ed25519.pub.pem"),
        ("openssl-p256.pem", "openssl-p256.pub.pem"),
    ] {
        let issuer = issuer_with(SigningKey::from_pem(&fixture(private)).unwrap());
        let issued = issue(&issuer);

        let public_key = VerificationKey::from_pem(&fixture(public)).unwrap();
        let verifier = TokenVerifier::new(vec![public_key], settings()).unwrap();
        assert!(verify_now(&verifier, &issued).is_ok());
    }
}

#[test]
fn a_verifier_serves_the_same_jwks_as_the_issuer() {
    let issuer = issuer_with(new_key(tokens::Algorithm::EdDSA));
    assert_eq!(issuer.verifier().jwks(), issuer.jwks());
}
