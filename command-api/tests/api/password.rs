use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use identity::LoginEvent;
use serde_json::json;

use crate::helpers::{PASSWORD, problem, spawn_app, spawn_on};

#[tokio::test]
async fn a_user_changes_their_own_password_and_only_the_new_one_works_afterwards() {
    let app = spawn_app().await;
    let (id, token) = app.signed_in("ann@example.com").await;
    let response = app
        .change_password(&id, &token, PASSWORD, "a brand new secret")
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
            .change_password(&ann, token, PASSWORD, "a brand new secret")
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
    let (id, token) = app.signed_in("ann@example.com").await;
    let response = app
        .change_password(&id, &token, "not my password", "a brand new secret")
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
    let (id, token) = app.signed_in("ann@example.com").await;
    let before = app.message_count().await;
    let response = app.change_password(&id, &token, PASSWORD, "short").await;
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

/// A password change and a login that upgrades the old hash, at the same time, landing in
/// both orders: a login that verified the old password and stores it hashed again must never
/// overwrite the new password, and the change, proven with the right password, must not be
/// refused because the hash was upgraded meanwhile. Over HTTP, on PostgreSQL, many times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_change_racing_a_login_that_upgrades_the_old_hash_always_wins() {
    const ROUNDS: usize = 20;
    const NEW_PASSWORD: &str = "a brand new secret";
    // Accounts registered while hashes were cheap (the test settings) ...
    let weak = spawn_app().await;
    // ... and logged in on a service with stronger parameters, whose login upgrades the old
    // hash, which takes a while. It hashes on one thread, in the order hashes are asked for.
    let mut stronger = weak.settings.clone();
    stronger.password.memory_kib = 8 * 1024;
    stronger.password.iterations = 16;
    stronger.login.hashing_threads = Some(1);
    let app = spawn_on(Arc::clone(&weak.database), stronger, weak.clock.clone()).await;
    let pool = app.database.pool().await;
    let stream_length = |stream: String| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM messages WHERE stream_name = $1")
                .bind(stream)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };

    let mut seen = BTreeMap::<&str, usize>::new();
    for round in 0..ROUNDS {
        let email = format!("racer{round}@example.com");
        let id = weak.user(&email).await;
        // A token from the cheap service, whose login upgrades nothing.
        let token = weak.token(&email, PASSWORD).await;
        let logins_before = stream_length(format!("userLogin-{id}")).await;
        // The change starts once the login has read the account, checked the old password and
        // recorded itself: it is hashing the upgrade. Made on the cheap service, the change
        // checks the current password and hashes the new one in a moment, and lands first.
        // Made on the strong one, it reads the account at once, but its check of the current
        // password waits for the upgrade's hash, and its new password takes as long again: it
        // lands second.
        let (changer, intended) = if round % 2 == 0 {
            (&weak, "the change, then the upgrade refused")
        } else {
            (&app, "the upgrade, then the change")
        };
        let login = app.login(&email, PASSWORD);
        let change = async {
            while stream_length(format!("userLogin-{id}")).await == logins_before {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            changer
                .change_password(&id, &token, PASSWORD, NEW_PASSWORD)
                .await
        };
        let (login, change) = tokio::join!(login, change);
        assert_eq!(login.status(), 200, "round {round}: the login was refused");
        assert_eq!(
            change.status(),
            200,
            "round {round} ({intended}): the change was refused"
        );

        let events: Vec<String> = sqlx::query_scalar(
            "SELECT type FROM messages WHERE stream_name = $1 ORDER BY position",
        )
        .bind(format!("user-{id}"))
        .fetch_all(&pool)
        .await
        .unwrap();
        let events: Vec<&str> = events.iter().map(String::as_str).collect();
        let order = match &events[..] {
            ["UserRegistered", "PasswordRehashed", "PasswordChanged"] => {
                "the upgrade, then the change"
            }
            ["UserRegistered", "PasswordChanged"] => "the change, then the upgrade refused",
            _ => "unexpected",
        };
        *seen.entry(order).or_default() += 1;
        if order != intended {
            println!("round {round}: meant {intended}, landed {order}");
        }
        assert_eq!(
            app.login(&email, NEW_PASSWORD).await.status(),
            200,
            "round {round} ({order}): the new password does not work; {events:?}"
        );
        assert_eq!(
            app.login(&email, PASSWORD).await.status(),
            401,
            "round {round} ({order}): the old password still works; {events:?}"
        );
        assert_ne!(order, "unexpected", "round {round}: {events:?}");
    }
    println!("orders seen: {seen:?}");
    // Both races happened, not only one of them.
    for order in [
        "the upgrade, then the change",
        "the change, then the upgrade refused",
    ] {
        assert!(seen.contains_key(order), "never {order}: {seen:?}");
    }
}
