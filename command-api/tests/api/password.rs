use identity::LoginEvent;
use serde_json::json;

use crate::helpers::{PASSWORD, problem, spawn_app};

#[tokio::test]
async fn a_user_changes_their_own_password_and_only_the_new_one_works_afterwards() {
    let app = spawn_app().await;
    let id = app.user("ann@example.com").await;
    let token = app.token("ann@example.com", PASSWORD).await;
    let response = app
        .post_as(
            &format!("/users/{id}/password"),
            &token,
            json!({ "current_password": PASSWORD, "new_password": "a brand new secret" }),
        )
        .await;
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("x-position"));
    assert_eq!(app.login("ann@example.com", PASSWORD).await.status(), 401);
    assert_eq!(
        app.login("ann@example.com", "a brand new secret")
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn nobody_changes_another_users_password() {
    let app = spawn_app().await;
    let ann = app.user("ann@example.com").await;
    app.user("bob@example.com").await;
    let bob = app.token("bob@example.com", PASSWORD).await;
    let admin = app.admin_token().await;
    let before = app.message_count().await;
    for token in [&bob, &admin] {
        let response = app
            .post_as(
                &format!("/users/{ann}/password"),
                token,
                json!({ "current_password": PASSWORD, "new_password": "a brand new secret" }),
            )
            .await;
        assert_eq!(response.status(), 403);
    }
    let response = app
        .client
        .post(app.url(&format!("/users/{ann}/password")))
        .json(&json!({ "current_password": PASSWORD, "new_password": "a brand new secret" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(app.message_count().await, before);
}

#[tokio::test]
async fn a_wrong_current_password_is_refused_and_counts_as_a_failed_login() {
    let app = spawn_app().await;
    let id = app.user("ann@example.com").await;
    let token = app.token("ann@example.com", PASSWORD).await;
    let response = app
        .post_as(
            &format!("/users/{id}/password"),
            &token,
            json!({ "current_password": "not my password", "new_password": "a brand new secret" }),
        )
        .await;
    assert_eq!(response.status(), 401);
    assert_eq!(problem(response).await["code"], "invalid_credentials");
    let event = app.login_events().await.pop().unwrap();
    assert!(matches!(event, LoginEvent::LoginFailed(failed) if failed.failed_in_a_row == 1));
    assert_eq!(app.login("ann@example.com", PASSWORD).await.status(), 200);
}

#[tokio::test]
async fn a_new_password_that_breaks_the_policy_is_a_422_naming_the_field() {
    let app = spawn_app().await;
    let id = app.user("ann@example.com").await;
    let token = app.token("ann@example.com", PASSWORD).await;
    let before = app.message_count().await;
    let response = app
        .post_as(
            &format!("/users/{id}/password"),
            &token,
            json!({ "current_password": PASSWORD, "new_password": "short" }),
        )
        .await;
    assert_eq!(response.status(), 422);
    let body = problem(response).await;
    assert_eq!(body["errors"][0]["field"], "new_password");
    let response = app
        .post_as(
            &format!("/users/{id}/password"),
            &token,
            json!({ "current_password": PASSWORD, "new_password": "long enough", "extra": 1 }),
        )
        .await;
    assert_eq!(response.status(), 422);
    assert_eq!(app.message_count().await, before);
}
