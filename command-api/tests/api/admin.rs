use serde_json::{Value, json};

use crate::helpers::{PASSWORD, position_of, problem, spawn_app};

#[tokio::test]
async fn only_administrators_may_activate_and_deactivate() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let (id, user) = app.signed_in("ann@example.com").await;
    let unknown = "00000000-0000-0000-0000-000000000001";

    for action in ["activate", "deactivate"] {
        let path = format!("/users/{id}/{action}");
        let before = app.message_count().await;

        let response = app.client.post(app.url(&path)).send().await.unwrap();
        assert_eq!(response.status(), 401, "no token");
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
        assert_eq!(problem(response).await["code"], "invalid_token");

        let response = app.post_as(&path, "not.a.token", json!({})).await;
        assert_eq!(response.status(), 401, "garbage token");

        let response = app.post_as(&path, &user, json!({})).await;
        assert_eq!(response.status(), 403, "a user's token");
        assert_eq!(problem(response).await["code"], "forbidden");

        for missing in [unknown, "not-a-uuid"] {
            let response = app
                .post_as(&format!("/users/{missing}/{action}"), &admin, json!({}))
                .await;
            assert_eq!(response.status(), 404, "unknown account {missing}");
        }
        assert_eq!(app.message_count().await, before, "4xx changed the store");
    }
}

#[tokio::test]
async fn a_token_from_another_issuer_key_is_refused() {
    let app = spawn_app().await;
    let other = crate::helpers::spawn_app().await;
    let foreign_admin = other.admin_token().await;
    let id = app.user("ann@example.com").await;
    let response = app.deactivate(&id, &foreign_admin).await;
    assert_eq!(response.status(), 401);
}

#[tokio::test]
async fn repeating_an_activation_or_deactivation_changes_nothing_and_answers_the_same_position() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let id = app.user("ann@example.com").await;

    let response = app.activate(&id, &admin).await;
    assert_eq!(
        response.status(),
        200,
        "activating an active account is harmless"
    );
    let unchanged: Value = response.json().await.unwrap();

    let first = app.deactivate(&id, &admin).await;
    assert_eq!(first.status(), 200);
    let header = position_of(&first);
    let first: Value = first.json().await.unwrap();
    assert_eq!(first["position"], header);
    assert!(first["position"].as_u64() > unchanged["position"].as_u64());
    let count = app.message_count().await;

    let again = app.deactivate(&id, &admin).await;
    assert_eq!(again.status(), 200);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again, first);
    assert_eq!(app.message_count().await, count);
}

#[tokio::test]
async fn the_operator_cannot_create_a_second_account_with_a_taken_email() {
    let app = spawn_app().await;
    app.admin_token().await;
    let error = command_api::create_admin(
        &app.settings,
        std::sync::Arc::new(app.clock.clone()),
        "Admin@Example.com",
        PASSWORD.into(),
    )
    .await
    .unwrap_err();
    assert!(error.to_string().contains("exists already"), "{error}");
}

#[tokio::test]
async fn a_deactivated_administrator_cannot_act_on_a_token_issued_before() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let other_admin = app.admin_token_for("second@example.com").await;
    let second_id = app.id_of_token(&other_admin);
    let ann = app.user("ann@example.com").await;

    let response = app.deactivate(&second_id, &admin).await;
    assert_eq!(response.status(), 200);
    let before = app.message_count().await;

    let response = app.deactivate(&ann, &other_admin).await;
    assert_eq!(response.status(), 401);
    assert_eq!(problem(response).await["code"], "invalid_token");
    assert_eq!(
        app.message_count().await,
        before,
        "the refused command changed the store"
    );
}

#[tokio::test]
async fn an_administrator_cannot_deactivate_their_own_account() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let own_id = app.id_of_token(&admin);
    let before = app.message_count().await;

    let response = app.deactivate(&own_id, &admin).await;
    assert_eq!(response.status(), 409);
    assert_eq!(problem(response).await["code"], "cannot_deactivate_self");
    assert_eq!(app.message_count().await, before, "the store changed");

    // Still an administrator who can act.
    let ann = app.user("ann@example.com").await;
    let response = app.deactivate(&ann, &admin).await;
    assert_eq!(response.status(), 200);
}
