//! What every process serves: keys, the OpenAPI document, health and metrics.

use crate::harness::spawn;

#[tokio::test]
async fn the_jwks_publishes_the_verification_key() {
    let app = spawn().await;
    let response = app.get("/.well-known/jwks.json", None).await;
    assert_eq!(response.status(), 200);
    let jwks: serde_json::Value = response.json().await.unwrap();
    assert_eq!(jwks, app.issuer.jwks());
    assert!(
        jwks.to_string().find("\"d\"").is_none(),
        "a private key was published"
    );
}

#[tokio::test]
async fn the_openapi_document_describes_every_route() {
    let app = spawn().await;
    let document: serde_json::Value = app.get("/openapi.json", None).await.json().await.unwrap();
    for path in [
        "/users/me",
        "/users/me/sessions",
        "/users/{id}",
        "/users",
        "/users/{id}/events",
        "/.well-known/jwks.json",
    ] {
        assert!(
            document["paths"].get(path).is_some(),
            "{path} is not documented"
        );
    }
}

#[tokio::test]
async fn health_readiness_and_metrics_answer() {
    let app = spawn().await;
    assert_eq!(app.get("/healthz", None).await.status(), 200);
    assert_eq!(app.get("/readyz", None).await.status(), 200);
    app.get("/users/me", None).await;
    let metrics = app.get("/metrics", None).await.text().await.unwrap();
    assert!(metrics.contains("http_requests_total"), "{metrics}");
}
