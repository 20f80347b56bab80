use serde_json::Value;
use tokens::{Algorithm, SigningKey, TokenIssuer, TokenSettings};

use crate::helpers::{spawn_app, spawn_with};

#[tokio::test]
async fn the_jwks_is_public_and_cacheable_for_five_minutes() {
    let app = spawn_app().await;
    let response = app.get("/.well-known/jwks.json").await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["cache-control"], "public, max-age=300");
    let jwks: Value = response.json().await.unwrap();
    let keys = jwks["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    assert!(keys[0]["kid"].is_string());
    assert!(keys[0].get("d").is_none(), "no private part");
}

#[tokio::test]
async fn after_a_rotation_a_token_signed_with_the_previous_key_still_verifies() {
    let old = SigningKey::generate(Algorithm::EdDSA).unwrap();
    let old_pem = old.to_pem().unwrap().expose_secret().clone();
    let app = spawn_with(|settings| settings.tokens.published_keys = vec![old_pem.clone()]).await;
    let admin_id = {
        app.admin_token().await;
        let jwks = app.get_json("/.well-known/jwks.json").await;
        assert_eq!(jwks["keys"].as_array().unwrap().len(), 2);
        let registered = app.messages("user").await;
        registered[0].1["user_id"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    // The session the administrator's login started (the command API checks it is live).
    let session = app.messages("session").await[0].1["session_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    // A token the old key signed before the switch, still live.
    let old_issuer = TokenIssuer::new(
        old.into(),
        TokenSettings::new("https://identity.test", "tests"),
    );
    let now = {
        use platform::clock::Clock;
        app.clock.now()
    };
    let token = old_issuer
        .issue(admin_id, session, vec!["admin".into()], false, now)
        .unwrap();
    let id = app.user("ann@example.com").await;
    let response = app.deactivate(&id, token.token.expose_secret()).await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn the_openapi_document_lists_every_route_and_its_statuses() {
    let app = spawn_app().await;
    let doc = app.get_json("/openapi.json").await;
    let paths = &doc["paths"];
    for path in [
        "/users",
        "/login",
        "/users/{id}/activate",
        "/users/{id}/deactivate",
        "/users/{id}/password",
        "/.well-known/jwks.json",
        "/readyz",
    ] {
        assert!(paths.get(path).is_some(), "{path} missing");
    }
    let login = &paths["/login"]["post"]["responses"];
    for status in ["200", "400", "401", "413", "415", "422", "429"] {
        assert!(login.get(status).is_some(), "/login {status} missing");
    }
}

/// What the metrics count is checked in `tests/metrics.rs`, a process of its own: here every
/// test running at the same time adds to the same process-wide counters.
#[tokio::test]
async fn health_readiness_and_metrics_answer() {
    let app = spawn_app().await;
    for path in ["/healthz", "/readyz", "/metrics"] {
        let response = app.get(path).await;
        assert_eq!(response.status(), 200, "{path}");
    }
}

#[tokio::test]
async fn readiness_is_a_503_problem_when_the_store_is_down() {
    let app = spawn_app().await;
    // Take the database away under the running app.
    // From another database: PostgreSQL refuses to lock out the database one is connected to.
    let other = app.database.sibling("control").await;
    let pool = other.pool().await;
    let name = app.database.name().to_owned();
    sqlx::query(&format!(
        "ALTER DATABASE \"{name}\" WITH ALLOW_CONNECTIONS false"
    ))
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}' AND pid <> pg_backend_pid()"
    ))
    .execute(&pool)
    .await
    .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let response = app.get("/readyz").await;
    let status = response.status();
    sqlx::query(&format!(
        "ALTER DATABASE \"{name}\" WITH ALLOW_CONNECTIONS true"
    ))
    .execute(&pool)
    .await
    .ok();
    assert_eq!(status, 503);
}
