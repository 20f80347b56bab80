//! Forged and misused tokens, over HTTP: each is refused with the same 401 a missing token
//! gets, so a refusal tells an attacker nothing about how close the forgery came.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use tokens::{Algorithm, SigningKey};
use uuid::Uuid;

use crate::harness::{Aggregator, TestApp, now, problem, spawn, spawn_apart};

fn b64_json(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap())
}

/// Signs any header and claims with `key`, as only the holder of the private key could.
fn sign(key: &SigningKey, header: &Value, claims: &Value) -> String {
    let pem = key.to_pem().unwrap();
    let encoding = jsonwebtoken::EncodingKey::from_ed_pem(pem.expose_secret().as_bytes()).unwrap();
    let message = format!("{}.{}", b64_json(header), b64_json(claims));
    let signature = jsonwebtoken::crypto::sign(
        message.as_bytes(),
        &encoding,
        jsonwebtoken::Algorithm::EdDSA,
    )
    .unwrap();
    format!("{message}.{signature}")
}

fn header(app: &TestApp) -> Value {
    json!({ "alg": "EdDSA", "kid": app.signing_key.kid(), "typ": "at+jwt" })
}

/// Claims the query API accepts for `id` in `session`, now.
fn claims(app: &TestApp, id: Uuid, session: Uuid) -> Value {
    let settings = app.issuer.settings();
    let now = now().timestamp();
    json!({
        "iss": settings.issuer,
        "aud": settings.audience,
        "sub": id,
        "exp": now + 900,
        "iat": now,
        "nbf": now,
        "jti": Uuid::new_v4(),
        "sid": session,
        "roles": ["user"],
    })
}

fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

#[tokio::test]
async fn forged_and_misused_tokens_are_refused_alike() {
    let app = spawn().await;
    let ann = app.seed_user("ann@example.com", "active", &["user"]).await;
    let path = format!("/users/{}", ann.id);
    let session = app.start_session(ann.id, now()).await;
    let (good_header, good_claims) = (header(&app), claims(&app, ann.id, session));
    let in_an_hour = now().timestamp() + 3600;
    let an_hour_ago = now().timestamp() - 3600;

    // The forgery is worth testing only if the genuine article gets in.
    let genuine = sign(&app.signing_key, &good_header, &good_claims);
    assert_eq!(app.get(&path, Some(&genuine)).await.status(), 200);

    let public_key = app.signing_key.verification_key().to_jwk();
    let hs256_with_public_key = {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        header.kid = Some(app.signing_key.kid().to_owned());
        header.typ = Some("at+jwt".to_owned());
        let secret = URL_SAFE_NO_PAD
            .decode(public_key["x"].as_str().unwrap())
            .unwrap();
        jsonwebtoken::encode(
            &header,
            &good_claims,
            &jsonwebtoken::EncodingKey::from_secret(&secret),
        )
        .unwrap()
    };
    let alg_none = {
        let header = json!({ "alg": "none", "kid": app.signing_key.kid(), "typ": "at+jwt" });
        format!("{}.{}.", b64_json(&header), b64_json(&good_claims))
    };
    let changed_payload = {
        let mut parts: Vec<String> = genuine.split('.').map(str::to_owned).collect();
        parts[1] = b64_json(&with(good_claims.clone(), "roles", json!(["admin"])));
        parts.join(".")
    };
    let unknown_kid = sign(
        &app.signing_key,
        &with(good_header.clone(), "kid", json!("no-such-key")),
        &good_claims,
    );
    let another_key = SigningKey::generate(Algorithm::EdDSA).unwrap();
    let signed_by_another_key_under_our_kid = sign(&another_key, &good_header, &good_claims);
    let huge_header = sign(
        &app.signing_key,
        &with(good_header.clone(), "padding", json!("x".repeat(64 * 1024))),
        &good_claims,
    );
    let signed = |claims: Value| sign(&app.signing_key, &good_header, &claims);

    let cases = [
        ("alg none", alg_none),
        ("HS256 keyed with the public key", hs256_with_public_key),
        (
            "exp in the past",
            signed(with(good_claims.clone(), "exp", json!(an_hour_ago))),
        ),
        (
            "nbf ahead",
            signed(with(good_claims.clone(), "nbf", json!(in_an_hour))),
        ),
        (
            "another issuer",
            signed(with(
                good_claims.clone(),
                "iss",
                json!("https://impostor.example.test"),
            )),
        ),
        (
            "another audience",
            signed(with(good_claims.clone(), "aud", json!("another-service"))),
        ),
        ("unknown kid", unknown_kid),
        (
            "another key under our kid",
            signed_by_another_key_under_our_kid,
        ),
        ("changed payload", changed_payload),
        ("a huge header", huge_header),
    ];

    let (_, reference) = problem(app.get(&path, None).await).await;
    for (case, token) in cases {
        let response = app.get(&path, Some(&token)).await;
        let status = response.status();
        let challenge = response.headers().get("www-authenticate").cloned();
        let (_, body) = problem(response).await;
        assert_eq!(status, 401, "{case}");
        assert_eq!(challenge.unwrap(), "Bearer", "{case}");
        assert_eq!(
            body, reference,
            "{case}: the refusal differs from a missing token's"
        );
    }
}

/// Ann's account goes from active to deactivated through the real path: her events in the
/// message store, the real aggregator projecting them into a read model of its own. The bound
/// on the view's lag is long, so her row decides (never the store's fallback): what refuses
/// her token is the projected deactivation.
#[tokio::test]
async fn a_valid_token_of_an_account_deactivated_since_is_refused() {
    let app = spawn_apart(|settings| settings.query.max_view_lag_ms = 600_000).await;
    let mut aggregator = Aggregator::over(&app, 1000).await;
    let ann = app.register("ann@example.com", &["user"]).await;
    aggregator.catch_up(&app).await;
    let registered = aggregator.checkpoint().await;
    // Issued while the account is active, and still within its lifetime afterwards.
    let token = app.token_for(ann, &["user"]).await;
    let paths = [
        "/users/me".to_owned(),
        format!("/users/{ann}"),
        format!("/users/{ann}/events"),
    ];
    // `X-Min-Position` only makes each read wait for the kept profiles to sync; the row read
    // then decides.
    let get = |path: &str, position: u64| {
        app.client
            .get(app.url(path))
            .bearer_auth(&token)
            .header("X-Min-Position", position.to_string())
            .send()
    };
    for path in &paths {
        let response = get(path, registered).await.unwrap();
        assert_eq!(response.status(), 200, "{path} before the deactivation");
    }

    let deactivated = app.deactivate(ann).await;
    aggregator.catch_up(&app).await;
    for path in &paths {
        let (status, body) = problem(get(path, deactivated).await.unwrap()).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (401, Some("invalid_token")),
            "{path}"
        );
    }
}
