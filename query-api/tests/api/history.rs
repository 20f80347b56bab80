//! History and time travel, read from the message store.

use chrono::{DateTime, FixedOffset, SecondsFormat, TimeDelta, Utc};
use serde_json::Value;
use uuid::Uuid;

use crate::harness::{TestApp, assert_field_refused, each, now, problem, spawn};

/// An account whose history began at `registered` (see [`TestApp::account_with_history`]),
/// and an administrator's token to read it with.
async fn an_account_and_an_admin(registered: DateTime<Utc>) -> (TestApp, Uuid, String) {
    let app = spawn().await;
    let id = app.account_with_history(registered).await;
    let (_, token) = app.seed_admin().await;
    (app, id, token)
}

#[tokio::test]
async fn a_profile_as_of_an_instant_is_the_fold_of_the_events_until_then() {
    let registered = now() - TimeDelta::hours(1);
    let (app, id, token) = an_account_and_an_admin(registered).await;
    let as_of = |at: DateTime<Utc>| {
        let at = at
            .to_rfc3339_opts(SecondsFormat::Millis, true)
            .replace('+', "%2B");
        format!("/users/{id}?as_of={at}")
    };

    let (status, _) = app
        .get_problem(&as_of(registered - TimeDelta::seconds(1)), &token)
        .await;
    assert_eq!(status, 404, "before the registration");

    let profile_at = async |at| -> Value {
        let response = app.get(&as_of(at), Some(&token)).await;
        response.json().await.unwrap()
    };
    let body = profile_at(registered + TimeDelta::minutes(1)).await;
    assert_eq!(body["status"], "active");
    // Registered active: activated then, as the users view says too.
    assert!(body["activated_at"].is_string(), "{body}");
    assert_eq!(body["activated_at"], body["registered_at"], "{body}");
    assert_eq!(body["login_count"].as_u64(), Some(0));
    assert!(body["last_login_at"].is_null());

    let body = profile_at(registered + TimeDelta::minutes(15)).await;
    assert_eq!(body["status"], "deactivated");
    assert_eq!(body["login_count"].as_u64(), Some(1));
    assert!(body["last_login_at"].is_string());

    let body = profile_at(now()).await;
    assert_eq!(body["status"], "active");

    let yesterday = format!("/users/{id}?as_of=yesterday");
    assert_field_refused(
        &app.get_problem(&yesterday, &token).await,
        "as_of",
        yesterday,
    );
}

#[tokio::test]
async fn the_history_lists_every_event_in_order_without_secrets() {
    let app = spawn().await;
    let id = app.account_with_history(now() - TimeDelta::hours(1)).await;
    let token = app.token_for(id, &["user"]).await;

    let response = app.get(&format!("/users/{id}/events"), Some(&token)).await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(!text.contains("argon2"), "a password hash leaked: {text}");
    let body: serde_json::Value = serde_json::from_str(&text).unwrap();
    let types = each(&body["items"], |e| e["type"].as_str().unwrap());
    assert_eq!(
        types,
        [
            "UserRegistered",
            "LoginSucceeded",
            "UserDeactivated",
            "UserActivated"
        ]
    );
    let positions = each(&body["items"], |e| e["position"].as_u64().unwrap());
    assert!(positions.windows(2).all(|pair| pair[0] < pair[1]));

    let response = app
        .get(
            &format!("/users/{id}/events?after={}&limit=2", positions[0]),
            Some(&token),
        )
        .await;
    let body: serde_json::Value = response.json().await.unwrap();
    let page = each(&body["items"], |e| e["position"].as_u64().unwrap());
    assert_eq!(page, positions[1..3]);

    let other = app.seed_user("bob@example.com", "active", &["user"]).await;
    let (status, _) = problem(
        app.get(
            &format!("/users/{id}/events"),
            Some(&app.token_for(other.id, &["user"]).await),
        )
        .await,
    )
    .await;
    assert_eq!(status, 403);
    for query in ["limit=0", "after=%2B1", "after="] {
        let (status, body) = app
            .get_problem(&format!("/users/{id}/events?{query}"), &token)
            .await;
        assert_eq!(status, 422, "{query}: {body}");
    }
}

/// The account's status as of `at`, written as given (percent-encoded for a query string).
async fn status_as_of(app: &TestApp, token: &str, id: Uuid, at: &str) -> (u16, Value) {
    let at = at.replace('+', "%2B");
    let response = app
        .get(&format!("/users/{id}?as_of={at}"), Some(token))
        .await;
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

#[tokio::test]
async fn an_as_of_with_an_offset_is_the_same_instant_as_its_utc_form() {
    // Registered, deactivated 10 minutes later, activated again 10 minutes after that.
    let registered = now() - TimeDelta::days(1);
    let (app, id, token) = an_account_and_an_admin(registered).await;

    // Between the deactivation and the activation. Read with its offset ignored, or the
    // offset's sign reversed, the instant moves by hours: past the activation, or before the
    // registration.
    let between = registered + TimeDelta::minutes(15);
    let forms = [
        between.to_rfc3339_opts(SecondsFormat::Millis, true),
        between
            .with_timezone(&FixedOffset::east_opt(2 * 3600).unwrap())
            .to_rfc3339_opts(SecondsFormat::Millis, false),
        between
            .with_timezone(&FixedOffset::west_opt(5 * 3600 + 30 * 60).unwrap())
            .to_rfc3339_opts(SecondsFormat::Secs, false),
    ];
    assert!(forms[1].ends_with("+02:00") && forms[2].ends_with("-05:30"));
    for form in &forms {
        let (status, body) = status_as_of(&app, &token, id, form).await;
        assert_eq!(
            (status, body["status"].as_str()),
            (200, Some("deactivated")),
            "as_of={form}"
        );
    }

    // A `+` sent bare in a query string is a space: refused, with the field named, rather
    // than read as some other instant.
    let bare = format!("/users/{id}?as_of={}", forms[1]);
    assert_field_refused(&app.get_problem(&bare, &token).await, "as_of", bare);
}

#[tokio::test]
async fn an_as_of_in_the_future_is_refused_with_the_field_named() {
    let (app, id, token) = an_account_and_an_admin(now() - TimeDelta::hours(1)).await;

    let just_past = (now() - TimeDelta::seconds(1)).to_rfc3339_opts(SecondsFormat::Millis, true);
    let (status, body) = status_as_of(&app, &token, id, &just_past).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("active")));

    let in_a_minute = now() + TimeDelta::minutes(1);
    for future in [
        in_a_minute.to_rfc3339_opts(SecondsFormat::Millis, true),
        in_a_minute
            .with_timezone(&FixedOffset::west_opt(3 * 3600).unwrap())
            .to_rfc3339_opts(SecondsFormat::Millis, false),
        "9999-12-31T23:59:59Z".to_owned(),
    ] {
        let answer = status_as_of(&app, &token, id, &future).await;
        assert_field_refused(&answer, "as_of", format!("as_of={future}"));
    }
}
