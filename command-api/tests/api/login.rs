use std::sync::Arc;

use chrono::TimeDelta;
use identity::{LoginEvent, UserEvent};
use serde_json::{Value, json};
use tokens::{TokenSettings, TokenVerifier};

use crate::helpers::{PASSWORD, TestApp, problem, spawn_app, spawn_on, spawn_with};

#[tokio::test]
async fn login_with_the_right_password_gives_a_token_that_verifies_against_the_published_jwks() {
    let app = spawn_app().await;
    let id = app.user("ann@example.com").await;
    let response = app.login("Ann@Example.com", PASSWORD).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["cache-control"], "no-store");
    assert!(response.headers().contains_key("x-position"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 900);

    let jwks: Value = app
        .client
        .get(app.url("/.well-known/jwks.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let verifier =
        TokenVerifier::from_jwks(&jwks, TokenSettings::new("https://identity.test", "tests"))
            .unwrap();
    let claims = verifier
        .verify(body["access_token"].as_str().unwrap(), app.clock_now())
        .unwrap();
    assert_eq!(claims.sub.to_string(), id);
    assert_eq!(claims.roles, ["user"]);
    assert!(matches!(
        app.login_events().await[..],
        [LoginEvent::LoginSucceeded(_)]
    ));
}

impl TestApp {
    fn clock_now(&self) -> chrono::DateTime<chrono::Utc> {
        use platform::clock::Clock;
        self.clock.now()
    }
}

#[tokio::test]
async fn every_failed_login_gets_the_same_401_body() {
    let app = spawn_with(|settings| settings.login.max_failures = 2).await;
    let admin = app.admin_token().await;
    app.user("ann@example.com").await;
    let bob = app.user("bob@example.com").await;
    app.post_as(&format!("/users/{bob}/deactivate"), &admin, json!({}))
        .await;
    let carl = app.user("carl@example.com").await;
    let _ = carl;
    // Carl gets locked.
    app.login("carl@example.com", "wrong password 1").await;
    app.login("carl@example.com", "wrong password 2").await;

    let mut bodies = Vec::new();
    for (email, password) in [
        ("nobody@example.com", PASSWORD),
        ("ann@example.com", "wrong password"),
        ("bob@example.com", PASSWORD),
        ("carl@example.com", PASSWORD),
        ("not an email", PASSWORD),
    ] {
        let response = app.login(email, password).await;
        assert_eq!(response.status(), 401, "{email}");
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
        bodies.push(problem(response).await);
    }
    assert_eq!(bodies[0]["code"], "invalid_credentials");
    assert!(bodies.iter().all(|body| *body == bodies[0]), "{bodies:?}");
}

#[tokio::test]
async fn refused_logins_other_than_a_wrong_password_leave_the_store_unchanged() {
    let app = spawn_with(|settings| settings.login.max_failures = 1).await;
    let admin = app.admin_token().await;
    let bob = app.user("bob@example.com").await;
    app.post_as(&format!("/users/{bob}/deactivate"), &admin, json!({}))
        .await;
    app.user("carl@example.com").await;
    app.login("carl@example.com", "wrong password").await;
    let before = app.message_count().await;
    for (email, password) in [
        ("nobody@example.com", PASSWORD),
        ("bob@example.com", PASSWORD),
        ("carl@example.com", PASSWORD),
        ("carl@example.com", "wrong again"),
    ] {
        assert_eq!(app.login(email, password).await.status(), 401);
    }
    assert_eq!(app.message_count().await, before);
}

#[tokio::test]
async fn the_lockout_engages_after_max_failures_refuses_the_right_password_and_expires() {
    let app = spawn_with(|settings| {
        settings.login.max_failures = 3;
        settings.login.lockout_base_seconds = 60;
    })
    .await;
    app.user("ann@example.com").await;
    for _ in 0..3 {
        assert_eq!(
            app.login("ann@example.com", "wrong password")
                .await
                .status(),
            401
        );
    }
    // Locked: even the right password is refused.
    assert_eq!(app.login("ann@example.com", PASSWORD).await.status(), 401);
    app.clock.advance(TimeDelta::seconds(59));
    assert_eq!(app.login("ann@example.com", PASSWORD).await.status(), 401);
    app.clock.advance(TimeDelta::seconds(2));
    assert_eq!(app.login("ann@example.com", PASSWORD).await.status(), 200);
    let events = app.login_events().await;
    assert!(matches!(
        &events[..],
        [LoginEvent::LoginFailed(_), LoginEvent::LoginFailed(_), LoginEvent::LoginFailed(third), LoginEvent::LoginSucceeded(_)]
            if third.locked_until.is_some()
    ));
}

#[tokio::test]
async fn a_deactivated_account_cannot_log_in_until_it_is_activated_again() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let id = app.user("ann@example.com").await;
    assert_eq!(app.login("ann@example.com", PASSWORD).await.status(), 200);
    let response = app
        .post_as(&format!("/users/{id}/deactivate"), &admin, json!({}))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(app.login("ann@example.com", PASSWORD).await.status(), 401);
    let response = app
        .post_as(&format!("/users/{id}/activate"), &admin, json!({}))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(app.login("ann@example.com", PASSWORD).await.status(), 200);
}

#[tokio::test]
async fn a_hash_weaker_than_configured_is_upgraded_on_the_next_successful_login() {
    let weak = spawn_app().await;
    weak.user("ann@example.com").await;
    let mut stronger = weak.settings.clone();
    stronger.password.memory_kib = 2048;
    stronger.password.iterations = 2;
    let app = spawn_on(Arc::clone(&weak.database), stronger, weak.clock.clone()).await;

    assert_eq!(
        app.login("ann@example.com", "wrong password")
            .await
            .status(),
        401
    );
    assert_eq!(
        app.user_events().await.len(),
        1,
        "a failed login upgrades nothing"
    );
    assert_eq!(app.login("ann@example.com", PASSWORD).await.status(), 200);
    let events = app.user_events().await;
    let [
        UserEvent::UserRegistered(_),
        UserEvent::PasswordRehashed(rehashed),
    ] = &events[..]
    else {
        panic!("expected a rehash, got {events:?}");
    };
    assert!(
        rehashed
            .password_hash
            .as_str()
            .starts_with("$argon2id$v=19$m=2048,t=2,p=1$")
    );
    // The new hash verifies, and needs no further upgrade.
    assert_eq!(app.login("ann@example.com", PASSWORD).await.status(), 200);
    assert_eq!(app.user_events().await.len(), 2);
}

#[tokio::test]
async fn login_history_older_than_the_retention_is_pruned_but_the_last_login_is_kept() {
    let app = spawn_app().await;
    app.user("ann@example.com").await;
    for _ in 0..4 {
        assert_eq!(app.login("ann@example.com", PASSWORD).await.status(), 200);
    }
    app.clock.advance(TimeDelta::days(91));
    // A restart prunes at once.
    let restarted = spawn_on(
        Arc::clone(&app.database),
        app.settings.clone(),
        app.clock.clone(),
    )
    .await;
    // What stays: the stream's first message and its last login (the last of each kind).
    let mut remaining = 4;
    for _ in 0..50 {
        remaining = restarted.login_events().await.len();
        if remaining == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(remaining, 2);
    let events = restarted.login_events().await;
    assert!(matches!(
        &events[..],
        [LoginEvent::LoginSucceeded(first), LoginEvent::LoginSucceeded(last)]
            if first.login_count == 1 && last.login_count == 4
    ));
    assert_eq!(
        restarted.login("ann@example.com", PASSWORD).await.status(),
        200
    );
}

#[tokio::test]
async fn a_burst_beyond_the_waiting_bound_is_throttled_with_retry_after() {
    let app = spawn_with(|settings| {
        // Two hashes at a time whatever the machine's cores, and none may wait for one.
        settings.login.hashing_threads = Some(2);
        settings.login.max_waiting_hashes = 0;
        settings.password.memory_kib = 32 * 1024;
        settings.password.iterations = 3;
    })
    .await;
    app.user("ann@example.com").await;
    let attempts = (0..16).map(|_| app.login("ann@example.com", PASSWORD));
    let responses = futures::future::join_all(attempts).await;
    let (throttled, others): (Vec<_>, Vec<_>) =
        responses.into_iter().partition(|r| r.status() == 429);
    assert!(
        !throttled.is_empty(),
        "16 logins at once on two hashing threads, none waiting allowed"
    );
    for response in others {
        assert_eq!(response.status(), 200);
    }
    for response in throttled {
        assert_eq!(response.headers()["retry-after"], "1");
        assert_eq!(problem(response).await["code"], "throttled");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_locked_and_still_attacked_does_not_slow_the_logins_of_others() {
    let app = spawn_with(|settings| settings.login.max_failures = 3).await;
    app.user("ann@example.com").await;
    app.user("bob@example.com").await;
    let bob_logs_in = || async {
        let started = std::time::Instant::now();
        let response = app.login("bob@example.com", PASSWORD).await;
        assert_eq!(response.status(), 200, "Bob was refused");
        started.elapsed()
    };
    let median = |mut times: Vec<std::time::Duration>| {
        times.sort();
        times[times.len() / 2]
    };

    let mut before = vec![];
    for _ in 0..15 {
        before.push(bob_logs_in().await);
    }
    for _ in 0..3 {
        app.login("ann@example.com", "wrong password").await;
    }
    assert_eq!(
        app.login("ann@example.com", PASSWORD).await.status(),
        401,
        "Ann is not locked"
    );
    // An attacker keeps guessing Ann's password while Bob logs in.
    let attack = async {
        for _ in 0..30 {
            app.login("ann@example.com", "another guess").await;
        }
    };
    let bob = async {
        let mut during = vec![];
        for _ in 0..15 {
            during.push(bob_logs_in().await);
        }
        during
    };
    let ((), during) = tokio::join!(attack, bob);

    let (before, during) = (median(before), median(during));
    assert!(
        during <= before * 3 + std::time::Duration::from_millis(20),
        "Bob's logins went from {before:?} to {during:?} while Ann was locked"
    );
}
