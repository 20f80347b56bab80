//! `GET /users/me/export`, the right of access (GDPR article 15): the caller's own data, every
//! personal field in clear and no secret, and nothing of anyone else. Events are appended with
//! their personal fields sealed in a real key vault, and the real aggregator projects them
//! (the sessions come from its sessions view).

use chrono::{DateTime, TimeDelta, Utc};
use identity::{
    LoginEvent, LoginSucceeded, RecoveryEvent, RecoveryKind, RecoveryNonce, RecoveryRequested,
    RecoveryState, SessionEvent, UserAgent,
};
use serde_json::Value;
use uuid::Uuid;

use crate::harness::{Aggregator, TestApp, each, now, problem, spawn};

/// A person with an account lived in: registered, logged in, a verification link mailed, two
/// sessions (one ended), and a token in one of them.
struct Person {
    id: Uuid,
    session: Uuid,
    ended_session: Uuid,
    token: String,
}

/// The nonce of `name`'s verification link: a byte of their own, to look for.
fn nonce_of(byte: u8) -> RecoveryNonce {
    RecoveryNonce::from_bytes([byte; RecoveryNonce::LEN])
}

async fn person(app: &TestApp, email: &str, browser: &str, nonce: u8) -> Person {
    let id = app.register(email, &["user"]).await;
    app.append_login_event(
        id,
        LoginEvent::LoginSucceeded(LoginSucceeded {
            at: now(),
            login_count: 1,
        }),
    )
    .await;
    let requested = RecoveryRequested {
        kind: RecoveryKind::VerifyEmail,
        to: identity::Email::parse(email).unwrap().into(),
        new_email: None,
        nonce: nonce_of(nonce),
        requested_at: now(),
        expires_at: now() + TimeDelta::minutes(30),
        state: RecoveryState::default().into(),
    };
    app.append_recovery_event(id, RecoveryEvent::RecoveryRequested(requested))
        .await;
    let session = started(app, id, browser, now()).await;
    let ended_session = started(app, id, browser, now() - TimeDelta::hours(1)).await;
    app.end_session(id, ended_session).await;
    Person {
        id,
        session,
        ended_session,
        token: app.token_in(id, session, &["user"], now()),
    }
}

/// Starts a session of `id` at `at` from `browser`, as a login does.
async fn started(app: &TestApp, id: Uuid, browser: &str, at: DateTime<Utc>) -> Uuid {
    let mut started = app.session_started(id, at).await;
    started.user_agent = Some(UserAgent::new(browser));
    let session = *started.session_id.as_uuid();
    app.append_session_event(SessionEvent::SessionStarted(started))
        .await;
    session
}

/// Ann and Bob, each with their own life, projected.
async fn ann_and_bob() -> (TestApp, Person, Person) {
    let app = spawn().await;
    let ann = person(&app, "Ann.Lee@Example.com", "AnnBrowser/1.0", 0xa1).await;
    let bob = person(&app, "Bob.Stone@Example.net", "BobBrowser/2.0", 0xb2).await;
    let mut aggregator = Aggregator::over(&app, 1000).await;
    aggregator.catch_up(&app).await;
    (app, ann, bob)
}

/// The export `token` gets, once the view holds everything written: its text.
async fn export(app: &TestApp, token: &str) -> String {
    let position = app.store.last_position().await.unwrap();
    let response = app
        .get_with_min_position("/users/me/export", token, Some(position))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["cache-control"], "no-store");
    response.text().await.unwrap()
}

#[tokio::test]
async fn the_export_gives_the_caller_their_data_and_history_in_clear_without_secrets() {
    let (app, ann, _) = ann_and_bob().await;
    let before = now();

    let text = export(&app, &ann.token).await;
    let body: Value = serde_json::from_str(&text).unwrap();

    let exported_at: DateTime<Utc> = body["exported_at"].as_str().unwrap().parse().unwrap();
    assert!(exported_at >= before, "{body}");
    let profile = &body["profile"];
    assert_eq!(profile["id"], ann.id.to_string());
    assert_eq!(profile["email"], "Ann.Lee@Example.com");
    assert_eq!(profile["status"], "active");
    assert_eq!(profile["login_count"], 1);

    let types = each(&body["events"], |entry| entry["type"].as_str().unwrap());
    assert_eq!(types, ["UserRegistered", "LoginSucceeded"]);
    let registered = &body["events"][0]["data"];
    assert_eq!(registered["email"], "Ann.Lee@Example.com", "in clear");
    assert_eq!(registered["email_normalized"], "ann.lee@example.com");

    let recovery = &body["recovery"];
    assert_eq!(
        each(recovery, |entry| entry["type"].as_str().unwrap()),
        ["RecoveryRequested"]
    );
    assert_eq!(recovery[0]["data"]["to"], "Ann.Lee@Example.com");
    assert_eq!(recovery[0]["data"]["kind"], "verify_email");

    let sessions = &body["sessions"];
    let ids = each(sessions, |session| {
        session["id"].as_str().unwrap().to_owned()
    });
    assert_eq!(
        ids,
        [ann.session.to_string(), ann.ended_session.to_string()]
    );
    assert_eq!(sessions[0]["user_agent"], "AnnBrowser/1.0");
    assert_eq!(sessions[0]["live"], true);
    assert_eq!(sessions[1]["live"], false);
    assert_eq!(sessions[1]["end_reason"], "logged_out");
    assert!(sessions[1]["ended_at"].is_string(), "{sessions}");

    // No password hash, no link's nonce, no recovery state, no refresh nonce, no envelope.
    for secret in [
        "argon2",
        "password_hash",
        "nonce",
        "\"state\"",
        &"a1".repeat(RecoveryNonce::LEN),
        &"07".repeat(8),
        "sealed_for",
    ] {
        assert!(!text.contains(secret), "{secret} exported: {text}");
    }
}

#[tokio::test]
async fn the_export_holds_nothing_of_anyone_else() {
    let (app, ann, bob) = ann_and_bob().await;

    let text = export(&app, &ann.token).await.to_lowercase();
    for other in [
        "bob".to_owned(),
        "example.net".to_owned(),
        bob.id.to_string(),
        bob.session.to_string(),
        bob.ended_session.to_string(),
    ] {
        assert!(!text.contains(&other), "{other} in Ann's export: {text}");
    }
    // And Bob's is his own.
    let text = export(&app, &bob.token).await;
    assert!(text.contains("Bob.Stone@Example.net"), "{text}");
    assert!(!text.to_lowercase().contains("ann"), "{text}");
}

#[tokio::test]
async fn the_export_is_refused_without_a_valid_token_or_a_live_session() {
    let (app, ann, _) = ann_and_bob().await;
    for (case, token) in [("no token", None), ("garbage", Some("not.a.token"))] {
        let response = app.get("/users/me/export", token).await;
        assert_eq!(response.headers()["www-authenticate"], "Bearer", "{case}");
        let (status, body) = problem(response).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (401, Some("invalid_token")),
            "{case}"
        );
    }
    app.end_session(ann.id, ann.session).await;
    let (status, _) = app.get_problem("/users/me/export", &ann.token).await;
    assert_eq!(status, 401, "a token of an ended session");
    // A deactivated or erased account: deactivation.rs, erasure.rs.
}
