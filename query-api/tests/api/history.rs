//! History and time travel, read from the message store.

use chrono::{SecondsFormat, TimeDelta};

use crate::harness::{now, problem, spawn};

#[tokio::test]
async fn a_profile_as_of_an_instant_is_the_fold_of_the_events_until_then() {
    let app = spawn().await;
    let registered = now() - TimeDelta::hours(1);
    let id = app.account_with_history(registered).await;
    let admin = app
        .seed_user("root@example.com", "active", &["admin"])
        .await;
    let token = app.token_for(admin.id, &["admin"]);
    let as_of = |at: chrono::DateTime<chrono::Utc>| {
        let at = at
            .to_rfc3339_opts(SecondsFormat::Millis, true)
            .replace('+', "%2B");
        format!("/users/{id}?as_of={at}")
    };

    let (status, _) = problem(
        app.get(&as_of(registered - TimeDelta::seconds(1)), Some(&token))
            .await,
    )
    .await;
    assert_eq!(status, 404, "before the registration");

    let response = app
        .get(&as_of(registered + TimeDelta::minutes(1)), Some(&token))
        .await;
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        (body["status"].as_str(), body["login_count"].as_u64()),
        (Some("active"), Some(0))
    );
    assert!(body["last_login_at"].is_null());

    let response = app
        .get(&as_of(registered + TimeDelta::minutes(15)), Some(&token))
        .await;
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        (body["status"].as_str(), body["login_count"].as_u64()),
        (Some("deactivated"), Some(1))
    );
    assert!(body["last_login_at"].is_string());

    let response = app.get(&as_of(now()), Some(&token)).await;
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["status"], "active");

    let (status, body) = problem(
        app.get(&format!("/users/{id}?as_of=yesterday"), Some(&token))
            .await,
    )
    .await;
    assert_eq!(
        (status, body["errors"][0]["field"].as_str()),
        (422, Some("as_of"))
    );
}

#[tokio::test]
async fn the_history_lists_every_event_in_order_without_secrets() {
    let app = spawn().await;
    let id = app.account_with_history(now() - TimeDelta::hours(1)).await;
    let token = app.token_for(id, &["user"]);

    let response = app.get(&format!("/users/{id}/events"), Some(&token)).await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(!text.contains("argon2"), "a password hash leaked: {text}");
    let body: serde_json::Value = serde_json::from_str(&text).unwrap();
    let types: Vec<_> = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        types,
        [
            "UserRegistered",
            "LoginSucceeded",
            "UserDeactivated",
            "UserActivated"
        ]
    );
    let positions: Vec<u64> = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["position"].as_u64().unwrap())
        .collect();
    assert!(positions.windows(2).all(|pair| pair[0] < pair[1]));

    let response = app
        .get(
            &format!("/users/{id}/events?after={}&limit=2", positions[0]),
            Some(&token),
        )
        .await;
    let body: serde_json::Value = response.json().await.unwrap();
    let page: Vec<u64> = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["position"].as_u64().unwrap())
        .collect();
    assert_eq!(page, positions[1..3]);

    let other = app.seed_user("bob@example.com", "active", &["user"]).await;
    let (status, _) = problem(
        app.get(
            &format!("/users/{id}/events"),
            Some(&app.token_for(other.id, &["user"])),
        )
        .await,
    )
    .await;
    assert_eq!(status, 403);
    for query in ["limit=0", "after=%2B1", "after="] {
        let (status, body) = problem(
            app.get(&format!("/users/{id}/events?{query}"), Some(&token))
                .await,
        )
        .await;
        assert_eq!(status, 422, "{query}: {body}");
    }
}
