//! Rotating the signing key end to end, with the real binaries as processes, in the order
//! README gives: publish the next key everywhere, then sign with it, then drop the old one
//! once the tokens it signed have expired. A token of either key is accepted while both are
//! published, and the old key's tokens are refused once it is dropped.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot go on panics with the cause

mod common;

use std::collections::HashSet;

use serde_json::Value;
use test_support::TestDatabase;
use tokens::{Algorithm, SigningKey};

use common::{PASSWORD, client, get_as, get_json, new_deployment, register, token};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_in_key_signs_tokens_the_query_api_accepts_and_the_old_key_works_until_dropped() {
    let database = TestDatabase::new().await;
    let deployment = new_deployment("key-rotation", database.url());
    let old_key = deployment.signing_key.clone();
    let new_key = SigningKey::generate(Algorithm::EdDSA)
        .unwrap()
        .to_pem()
        .unwrap()
        .expose_secret()
        .clone();
    let keys = |signing: &str, published: Option<&str>| {
        let mut settings = vec![("IDENTITY__TOKENS__SIGNING_KEY", signing.to_owned())];
        if let Some(published) = published {
            let file = deployment
                .logs
                .join(format!("published-{}.pem", uuid::Uuid::new_v4()));
            std::fs::write(&file, published).unwrap();
            settings.push((
                "IDENTITY__TOKENS__PUBLISHED_KEYS",
                file.display().to_string(),
            ));
        }
        settings
    };
    let client = client();
    // Each process logs to a file of its own, labelled with the step it belongs to.
    let start =
        |binary, label, settings| deployment.start_service(&client, binary, label, settings);
    deployment.migrate().await.unwrap();
    let _aggregator = start("aggregator", "aggregator", &[]).await.unwrap();

    // 1. The next key is published everywhere; the old one still signs.
    let both = keys(&old_key, Some(&new_key));
    let (command_api, command_port) = start("command-api", "command-api-1", &both).await.unwrap();
    let (query_api, query_port) = start("query-api", "query-api-1", &both).await.unwrap();
    let (_, registered) = register(&client, command_port, "ann@example.com").await;
    let signed_by_old = token(&client, command_port, "ann@example.com", PASSWORD).await;
    let jwks = key_ids(&client, command_port).await;
    assert_eq!(jwks.len(), 2, "both keys are published before the switch");

    // 2. The command API signs with the next key and keeps publishing the old one.
    drop(command_api);
    let switched = keys(&new_key, Some(&old_key));
    let (_command_api, command_port) = start("command-api", "command-api-2", &switched)
        .await
        .unwrap();
    let signed_by_new = token(&client, command_port, "ann@example.com", PASSWORD).await;
    assert_ne!(
        key_id(&signed_by_old),
        key_id(&signed_by_new),
        "the token after the switch must be signed by the new key"
    );
    assert_eq!(key_ids(&client, command_port).await, jwks);
    assert_eq!(
        profile(&client, query_port, &signed_by_new, registered).await,
        200
    );
    assert_eq!(
        profile(&client, query_port, &signed_by_old, registered).await,
        200
    );

    // 3. The old key's tokens have expired: the query API drops it.
    drop(query_api);
    let dropped = keys(&new_key, None);
    let (_query_api, query_port) = start("query-api", "query-api-2", &dropped).await.unwrap();
    assert_eq!(
        profile(&client, query_port, &signed_by_new, registered).await,
        200
    );
    assert_eq!(
        profile(&client, query_port, &signed_by_old, registered).await,
        401,
        "a token of a dropped key must be refused"
    );
}

/// The status of `GET /users/me` with `token`, once the view has the registration.
async fn profile(client: &reqwest::Client, port: u16, token: &str, registered: u64) -> u16 {
    get_as(client, port, "/users/me", token, Some(registered))
        .await
        .status()
        .as_u16()
}

async fn key_ids(client: &reqwest::Client, port: u16) -> HashSet<String> {
    let jwks = get_json(client, port, "/.well-known/jwks.json").await;
    let kids = tokens::published_kids(&jwks).expect("a JWKS whose every key has a kid");
    kids.into_iter().map(str::to_owned).collect()
}

/// The `kid` in a token's header.
fn key_id(token: &str) -> String {
    use base64::Engine as _;
    let header = token.split('.').next().unwrap();
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .unwrap();
    let header: Value = serde_json::from_slice(&header).unwrap();
    header["kid"].as_str().unwrap().to_owned()
}
