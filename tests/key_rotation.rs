//! Rotating the signing key end to end, with the real binaries as processes, in the order
//! README gives: publish the next key everywhere, then sign with it, then drop the old one
//! once the tokens it signed have expired. A token of either key is accepted while both are
//! published, and the old key's tokens are refused once it is dropped.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot go on panics with the cause

mod common;

use std::collections::HashSet;
use std::time::Duration;

use serde_json::Value;
use test_support::TestDatabase;
use tokens::{Algorithm, SigningKey};

use common::{
    Deployment, Process, client, free_port, get_json, register, token, wait_for_status,
    wait_until_healthy,
};

const PASSWORD: &str = "correct horse battery";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_in_key_signs_tokens_the_query_api_accepts_and_the_old_key_works_until_dropped() {
    let database = TestDatabase::new().await;
    let deployment = Deployment::new("key-rotation", database.url());
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
                .join(format!("published-{}.pem", free_port()));
            std::fs::write(&file, published).unwrap();
            settings.push((
                "IDENTITY__TOKENS__PUBLISHED_KEYS",
                file.display().to_string(),
            ));
        }
        settings
    };
    let client = client();
    deployment.run_to_completion("command-api", &["migrate"]);
    deployment.run_to_completion("aggregator", &["migrate"]);
    let _aggregator = start(&deployment, &client, "aggregator", vec![]).await;

    // 1. The next key is published everywhere; the old one still signs.
    let (command_api, command_port) = start(
        &deployment,
        &client,
        "command-api",
        keys(&old_key, Some(&new_key)),
    )
    .await;
    let (query_api, query_port) = start(
        &deployment,
        &client,
        "query-api",
        keys(&old_key, Some(&new_key)),
    )
    .await;
    let (_, registered) = register(&client, command_port, "ann@example.com").await;
    let signed_by_old = token(&client, command_port, "ann@example.com", PASSWORD).await;
    let jwks = key_ids(&client, command_port).await;
    assert_eq!(jwks.len(), 2, "both keys are published before the switch");

    // 2. The command API signs with the next key and keeps publishing the old one.
    drop(command_api);
    let (_command_api, command_port) = start(
        &deployment,
        &client,
        "command-api",
        keys(&new_key, Some(&old_key)),
    )
    .await;
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
    let (_query_api, query_port) =
        start(&deployment, &client, "query-api", keys(&new_key, None)).await;
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

/// Starts `name` on a port of its own with `settings`, and waits until it is ready.
async fn start(
    deployment: &Deployment,
    client: &reqwest::Client,
    name: &str,
    mut settings: Vec<(&str, String)>,
) -> (Process, u16) {
    let port = free_port();
    let address = if name == "aggregator" {
        "IDENTITY__AGGREGATOR__HTTP__ADDRESS"
    } else {
        "IDENTITY__HTTP__ADDRESS"
    };
    settings.push((address, format!("127.0.0.1:{port}")));
    let process = deployment.start(name, &format!("{name}-{port}"), &settings);
    wait_until_healthy(client, port).await;
    wait_for_status(client, port, "/readyz", 200, Duration::from_secs(30)).await;
    (process, port)
}

/// The status of `GET /users/me` with `token`, once the view has the registration.
async fn profile(client: &reqwest::Client, port: u16, token: &str, registered: u64) -> u16 {
    client
        .get(format!("http://127.0.0.1:{port}/users/me"))
        .bearer_auth(token)
        .header("X-Min-Position", registered.to_string())
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn key_ids(client: &reqwest::Client, port: u16) -> HashSet<String> {
    let jwks = get_json(client, port, "/.well-known/jwks.json").await;
    jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|key| key["kid"].as_str().unwrap().to_owned())
        .collect()
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
