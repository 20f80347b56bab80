//! What account recovery changes in what the query API serves: whether an address is verified,
//! on every profile (the view, the kept profiles, lookups, pages and `as_of`); the address an
//! account is found by after a change of email; the sessions a password reset ends; and the
//! new events in the history, without their secrets. The events are appended to the message
//! store as the command API appends them, each confirmation in one atomic append with the use
//! of its link, and the real aggregator projects them.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use identity::{
    Email, EmailChanged, EmailVerified, LockoutLifted, LoginEvent, LoginFailed, PasswordReset,
    RecoveryCompleted, RecoveryEvent, RecoveryKind, RecoveryState, UserEvent, UserId,
    login_stream_name, recovery_stream_name, user_stream_name,
};
use message_store::{ExpectedVersion, NewMessage, StreamAppend, StreamName};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::harness::{Aggregator, TestApp, a_password_hash, each, now, problem, spawn};

/// Ann (a user) and Root (an administrator), registered and projected, each with a token.
struct Served {
    app: TestApp,
    aggregator: Aggregator,
    ann: Uuid,
    ann_token: String,
    root_token: String,
}

async fn served() -> Served {
    let app = spawn().await;
    let ann = app.register("Ann@Example.com", &["user"]).await;
    let root = app.register("root@example.com", &["admin", "user"]).await;
    let mut aggregator = Aggregator::over(&app, 1000).await;
    aggregator.catch_up(&app).await;
    Served {
        ann_token: app.token_for(ann, &["user"]).await,
        root_token: app.token_for(root, &["admin", "user"]).await,
        app,
        aggregator,
        ann,
    }
}

impl Served {
    /// The JSON `path` answers `token` with once the view holds `position`, which must be a
    /// 200.
    async fn read(&self, path: &str, token: &str, position: u64) -> Value {
        let response = self
            .app
            .get_with_min_position(path, token, Some(position))
            .await;
        assert_eq!(response.status(), 200, "{path}");
        response.json().await.unwrap()
    }

    /// Appends the events of one confirmed link, as the command API does: the account's
    /// events and the link's use in its recovery stream, their personal fields sealed with the
    /// account's key, in one atomic append, with the lifting of a lockout when there is one.
    /// Projects them; returns the last position.
    async fn confirm(
        &mut self,
        kind: RecoveryKind,
        user_events: Vec<UserEvent>,
        login_event: Option<LoginEvent>,
    ) -> u64 {
        let id = UserId::from_uuid(self.ann);
        let new_email = user_events.iter().find_map(|event| match event {
            UserEvent::EmailChanged(changed) => changed.email.known().cloned(),
            _ => None,
        });
        let completed = RecoveryEvent::RecoveryCompleted(RecoveryCompleted {
            kind,
            new_email,
            at: now(),
            state: RecoveryState::default().into(),
        });
        let mut sealed_user_events = Vec::with_capacity(user_events.len());
        for event in &user_events {
            let data = self
                .app
                .sealed(self.ann, event.personal_fields(), event.to_json())
                .await;
            sealed_user_events.push(message(event.event_type(), event.version(), data));
        }
        let completed_data = self
            .app
            .sealed(self.ann, completed.personal_fields(), completed.to_json())
            .await;
        let mut appends = vec![
            append_to(user_stream_name(id), sealed_user_events),
            append_to(
                recovery_stream_name(id),
                [message(
                    completed.event_type(),
                    completed.version(),
                    completed_data,
                )],
            ),
        ];
        if let Some(event) = login_event {
            let lifted = message(event.event_type(), event.version(), event.to_json());
            appends.push(append_to(login_stream_name(id), [lifted]));
        }
        let position = self
            .app
            .store
            .append(appends)
            .await
            .unwrap()
            .last_global_position();
        self.aggregator.catch_up(&self.app).await;
        position
    }
}

fn message(event_type: &str, version: u32, data: Value) -> NewMessage {
    NewMessage::new(event_type, data).with_metadata(json!({ "schemaVersion": version }))
}

fn append_to(stream: String, messages: impl IntoIterator<Item = NewMessage>) -> StreamAppend {
    StreamAppend::new(
        StreamName::parse(stream).unwrap(),
        ExpectedVersion::Any,
        messages.into_iter().collect(),
    )
}

/// `/users/{id}?as_of=` the instant `at`.
fn as_of(id: Uuid, at: DateTime<Utc>) -> String {
    let at = at
        .to_rfc3339_opts(SecondsFormat::Micros, true)
        .replace('+', "%2B");
    format!("/users/{id}?as_of={at}")
}

/// Now, between two events: later than the one just written, earlier than the next.
async fn an_instant_between_events() -> DateTime<Utc> {
    tokio::time::sleep(Duration::from_millis(20)).await;
    let between = now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    between
}

/// The `email_verified` of every item of a page.
fn verified_in(page: &Value) -> Vec<(String, bool)> {
    each(&page["items"], |item| {
        (
            item["email"].as_str().unwrap().to_owned(),
            item["email_verified"].as_bool().unwrap(),
        )
    })
}

#[tokio::test]
async fn a_verified_address_shows_on_every_profile_route_and_as_of_its_time() {
    let mut served = served().await;
    let (ann, ann_token) = (served.ann, served.ann_token.clone());
    let root_token = served.root_token.clone();
    // Read once unverified: kept from then on, so the kept profile must follow the change.
    let position = served.aggregator.checkpoint().await;
    let me = served.read("/users/me", &ann_token, position).await;
    assert_eq!(me["email_verified"], false);
    let before = an_instant_between_events().await;

    let verified = EmailVerified { at: now() }.into();
    let position = served
        .confirm(RecoveryKind::VerifyEmail, vec![verified], None)
        .await;

    for path in ["/users/me".to_owned(), format!("/users/{ann}")] {
        let body = served.read(&path, &ann_token, position).await;
        assert_eq!(body["email_verified"], true, "{path}: {body}");
    }
    let body = served
        .read(&format!("/users/{ann}"), &root_token, position)
        .await;
    assert_eq!(body["email_verified"], true, "an administrator's read");
    let found = served
        .read("/users?email=ann%40example.com", &root_token, position)
        .await;
    assert_eq!(verified_in(&found), [("Ann@Example.com".to_owned(), true)]);
    let mut listed = verified_in(
        &served
            .read("/users?status=active", &root_token, position)
            .await,
    );
    listed.sort();
    assert_eq!(
        listed,
        [
            ("Ann@Example.com".to_owned(), true),
            ("root@example.com".to_owned(), false)
        ]
    );

    // As of an instant, from the account's events.
    let then = served
        .read(&as_of(ann, before), &root_token, position)
        .await;
    assert_eq!(then["email_verified"], false, "before the verification");
    let since = served.read(&as_of(ann, now()), &root_token, position).await;
    assert_eq!(since["email_verified"], true, "after it");
}

#[tokio::test]
async fn after_a_change_of_email_the_account_is_found_by_its_new_address_only() {
    let mut served = served().await;
    let (ann, ann_token) = (served.ann, served.ann_token.clone());
    let root_token = served.root_token.clone();
    let position = served.aggregator.checkpoint().await;
    // Read once at the old address: kept from then on, so the kept profile must follow.
    let me = served.read("/users/me", &ann_token, position).await;
    assert_eq!(me["email"], "Ann@Example.com");
    let found = served
        .read("/users?email=ann%40example.com", &root_token, position)
        .await;
    assert_eq!(
        each(&found["items"], |item| item["id"].clone()),
        [json!(ann)]
    );
    let before = an_instant_between_events().await;

    let new_email = Email::parse("Ann.Moved@Example.ORG").unwrap();
    let changed = EmailChanged {
        email_normalized: new_email.normalized().to_owned().into(),
        email: new_email.into(),
        at: now(),
    };
    let position = served
        .confirm(RecoveryKind::ChangeEmail, vec![changed.into()], None)
        .await;

    let old = served
        .read("/users?email=ANN%40example.com", &root_token, position)
        .await;
    assert_eq!(old["items"], json!([]), "the old address finds no one");
    let new = served
        .read(
            "/users?email=ann.moved%40example.org",
            &root_token,
            position,
        )
        .await;
    assert_eq!(
        verified_in(&new),
        [("Ann.Moved@Example.ORG".to_owned(), true)],
        "the new address finds the account, verified by the change"
    );
    assert_eq!(new["items"][0]["id"], json!(ann));
    let me = served.read("/users/me", &ann_token, position).await;
    assert_eq!(
        (&me["email"], &me["email_verified"]),
        (&json!("Ann.Moved@Example.ORG"), &json!(true))
    );
    let then = served
        .read(&as_of(ann, before), &root_token, position)
        .await;
    assert_eq!(
        (&then["email"], &then["email_verified"]),
        (&json!("Ann@Example.com"), &json!(false)),
        "as it stood before the change"
    );

    // The old address is free: whoever registers with it now is the only account found there.
    let bea = served.app.register("ann@example.com", &["user"]).await;
    served.aggregator.catch_up(&served.app).await;
    let position = served.aggregator.checkpoint().await;
    let old = served
        .read("/users?email=ann%40example.com", &root_token, position)
        .await;
    assert_eq!(each(&old["items"], |item| item["id"].clone()), [json!(bea)]);
}

#[tokio::test]
async fn a_password_reset_ends_the_sessions_before_it_and_the_history_shows_recovery_without_secrets()
 {
    let mut served = served().await;
    let ann = served.ann;
    let locked_until = now() + chrono::TimeDelta::minutes(15);
    let locked = LoginFailed {
        at: now(),
        failed_in_a_row: 5,
        locked_until: Some(locked_until),
        login_count: 0,
    };
    served.app.append_login_event(ann, locked.into()).await;
    let verified = EmailVerified { at: now() }.into();
    served
        .confirm(RecoveryKind::VerifyEmail, vec![verified], None)
        .await;
    let old_token = served.ann_token.clone();

    let reset = PasswordReset {
        password_hash: a_password_hash().into(),
        at: now(),
    };
    let lifted = LockoutLifted {
        at: now(),
        login_count: 0,
    };
    let position = served
        .confirm(
            RecoveryKind::ResetPassword,
            vec![reset.into()],
            Some(lifted.into()),
        )
        .await;

    // The session Ann had before the reset is over, on every route; one started after it works.
    let app = &served.app;
    for path in ["/users/me".to_owned(), format!("/users/{ann}/events")] {
        let response = app
            .get_with_min_position(&path, &old_token, Some(position))
            .await;
        let (status, body) = problem(response).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (401, Some("invalid_token")),
            "{path}"
        );
    }
    let token = app.token_for(ann, &["user"]).await;
    let response = app.get(&format!("/users/{ann}/events"), Some(&token)).await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(!text.contains("argon2"), "a password hash leaked: {text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    let types = each(&body["items"], |entry| entry["type"].as_str().unwrap());
    assert_eq!(
        types,
        [
            "UserRegistered",
            "LoginFailed",
            "EmailVerified",
            "PasswordReset",
            "LockoutLifted"
        ],
        "the recovery stream, with the links' nonces, is not the account's history"
    );
    let data = |kind: &str| {
        body["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|entry| entry["type"] == kind)
            .unwrap()["data"]
            .clone()
    };
    let fields = |value: Value| {
        let mut names: Vec<String> = value.as_object().unwrap().keys().cloned().collect();
        names.sort();
        names
    };
    assert_eq!(fields(data("PasswordReset")), ["at"], "no hash");
    assert_eq!(fields(data("EmailVerified")), ["at"]);
    assert_eq!(data("LockoutLifted")["login_count"], 0);
    assert_eq!(fields(data("LockoutLifted")), ["at", "login_count"]);
}

#[tokio::test]
async fn the_openapi_document_describes_email_verified_on_profiles() {
    let app = spawn().await;
    let document: Value = app.get("/openapi.json", None).await.json().await.unwrap();
    let profile = &document["components"]["schemas"]["Profile"];
    assert_eq!(
        profile["properties"]["email_verified"]["type"], "boolean",
        "{profile}"
    );
    assert!(
        profile["required"]
            .as_array()
            .unwrap()
            .contains(&json!("email_verified")),
        "{profile}"
    );
}
