//! An erased account (ADR 13) as the query API shows it: its history keeps every event with its
//! personal fields null, a past profile has no address and says the account is erased now, an
//! administrator reads its profile as erased, no lookup by its address finds it, and the account
//! itself can call nothing. Events are appended with their personal fields sealed in a real key
//! vault, erased as the command API erases (the event, then the key), and the real aggregator
//! projects them.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use identity::{
    Email, EmailChanged, LoginEvent, LoginSucceeded, PasswordChanged, UserId, user_stream_name,
};
use message_store::StreamName;
use serde_json::Value;
use uuid::Uuid;

use crate::harness::{Aggregator, TestApp, a_password_hash, each, now, refused_everywhere, spawn};

/// Ann's address as she typed it; her later one.
const ANN: &str = "Ann.Lee@Example.com";
const ANN_LATER: &str = "Ann.Lee@Example.org";

/// Asserts that `text` holds nothing of Ann's addresses (in any case: her name is in both),
/// no password hash and no envelope of a sealed field.
fn assert_no_trace_of_ann(text: &str) {
    let lower = text.to_lowercase();
    for trace in ["ann.lee", "argon2", "sealed_for", "aes256gcm"] {
        assert!(!lower.contains(trace), "{trace} in {text}");
    }
}

/// Ann's account with a history: registered, logged in, moved to another address, her password
/// changed. Root, an administrator, with a token. The aggregator has projected everything.
struct Lived {
    app: TestApp,
    aggregator: Aggregator,
    ann: Uuid,
    root: Uuid,
    root_token: String,
    /// An instant between Ann's change of address and her password change.
    between: DateTime<Utc>,
}

async fn lived() -> Lived {
    let app = spawn().await;
    let ann = app.register(ANN, &["user"]).await;
    let root = app.register("root@example.com", &["admin", "user"]).await;
    app.append_login_event(
        ann,
        LoginEvent::LoginSucceeded(LoginSucceeded {
            at: now(),
            login_count: 1,
        }),
    )
    .await;
    let later = Email::parse(ANN_LATER).unwrap();
    let changed = EmailChanged {
        email_normalized: later.normalized().to_owned().into(),
        email: later.into(),
        at: now(),
    };
    app.append_user_event(ann, changed.into()).await;
    let between = an_instant_between_events().await;
    let changed = PasswordChanged {
        password_hash: a_password_hash().into(),
        at: now(),
    };
    app.append_user_event(ann, changed.into()).await;
    let mut aggregator = Aggregator::over(&app, 1000).await;
    aggregator.catch_up(&app).await;
    Lived {
        root_token: app.token_for(root, &["admin", "user"]).await,
        app,
        aggregator,
        ann,
        root,
        between,
    }
}

/// Now, between two events: later than the one just written, earlier than the next.
async fn an_instant_between_events() -> DateTime<Utc> {
    tokio::time::sleep(Duration::from_millis(20)).await;
    let between = now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    between
}

/// `/users/{id}?as_of=` the instant `at`.
fn as_of(id: Uuid, at: DateTime<Utc>) -> String {
    let at = at
        .to_rfc3339_opts(SecondsFormat::Micros, true)
        .replace('+', "%2B");
    format!("/users/{id}?as_of={at}")
}

impl Lived {
    /// The text `path` answers Root with once the view holds `position` (a 200).
    async fn read_text(&self, path: &str, position: Option<u64>) -> String {
        let response = self
            .app
            .get_with_min_position(path, &self.root_token, position)
            .await;
        assert_eq!(response.status(), 200, "{path}");
        response.text().await.unwrap()
    }

    async fn events_text(&self) -> String {
        self.read_text(&format!("/users/{}/events", self.ann), None)
            .await
    }
}

#[tokio::test]
async fn an_erased_accounts_history_keeps_every_event_with_its_personal_fields_null() {
    let lived = lived().await;
    let (app, ann) = (&lived.app, lived.ann);
    // Sealed in the store, as the command API leaves it: no address in clear.
    let stream = StreamName::parse(user_stream_name(UserId::from_uuid(ann))).unwrap();
    let stored = app.store.read_stream(&stream, 0, 10).await.unwrap();
    assert!(personal_data::is_envelope(&stored[0].data["email"]));
    // Before the erasure, the history has the addresses in clear.
    let before: Value = serde_json::from_str(&lived.events_text().await).unwrap();
    assert_eq!(before["items"][0]["data"]["email"], ANN);

    let erased = app.erase(ann, ann).await;

    let text = lived.events_text().await;
    assert_no_trace_of_ann(&text);
    let body: Value = serde_json::from_str(&text).unwrap();
    let types = each(&body["items"], |entry| entry["type"].as_str().unwrap());
    assert_eq!(
        types,
        [
            "UserRegistered",
            "LoginSucceeded",
            "EmailChanged",
            "PasswordChanged",
            "UserErased"
        ]
    );
    let registered = &body["items"][0]["data"];
    assert_eq!(registered["email"], Value::Null, "{registered}");
    assert_eq!(registered["email_normalized"], Value::Null, "{registered}");
    assert_eq!(registered["user_id"], ann.to_string(), "the facts stay");
    assert_eq!(registered["roles"], serde_json::json!(["user"]));
    assert!(registered.get("password_hash").is_none(), "{registered}");
    let changed = &body["items"][2]["data"];
    assert_eq!(changed["email"], Value::Null, "{changed}");
    assert!(changed["at"].is_string(), "{changed}");
    let erasure = &body["items"][4];
    assert_eq!(erasure["position"], erased);
    assert_eq!(erasure["data"]["erased_by"], ann.to_string());

    // Every page of it alike.
    let first = body["items"][0]["position"].as_u64().unwrap();
    let page = lived
        .read_text(&format!("/users/{ann}/events?after={first}&limit=2"), None)
        .await;
    assert_no_trace_of_ann(&page);
    let page: Value = serde_json::from_str(&page).unwrap();
    assert_eq!(page["items"][1]["type"], "EmailChanged");
    assert_eq!(page["items"][1]["data"]["email"], Value::Null);
}

#[tokio::test]
async fn an_erasure_whose_key_is_not_deleted_yet_is_already_shown_erased() {
    // The command API died between appending the erasure and deleting the key.
    let lived = lived().await;
    lived.app.append_erasure(lived.ann, lived.root).await;

    let text = lived.events_text().await;
    assert_no_trace_of_ann(&text);
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["items"][0]["data"]["email"], Value::Null);
    let past = lived
        .read_text(&as_of(lived.ann, lived.between), None)
        .await;
    assert_no_trace_of_ann(&past);
}

#[tokio::test]
async fn a_past_profile_of_an_erased_account_has_no_address_and_says_it_is_erased() {
    let lived = lived().await;
    let ann = lived.ann;
    let past: Value =
        serde_json::from_str(&lived.read_text(&as_of(ann, lived.between), None).await).unwrap();
    assert_eq!(past["email"], ANN_LATER, "before the erasure: {past}");
    assert_eq!(past["erased_at"], Value::Null);

    lived.app.erase(ann, lived.root).await;

    let text = lived.read_text(&as_of(ann, lived.between), None).await;
    assert_no_trace_of_ann(&text);
    let past: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(past["status"], "active", "the status it had then: {past}");
    assert_eq!(past["email"], Value::Null);
    assert_eq!(past["email_verified"], true, "a fact, not personal data");
    assert_eq!(past["login_count"], 1);
    let erased_at = past["erased_at"]
        .as_str()
        .expect("erased now, and since when");
    let erased_at: DateTime<Utc> = erased_at.parse().unwrap();
    assert!(erased_at > lived.between);

    let since = lived.read_text(&as_of(ann, now()), None).await;
    assert_no_trace_of_ann(&since);
    let since: Value = serde_json::from_str(&since).unwrap();
    assert_eq!(since["status"], "erased");
    assert_eq!(since["erased_at"], past["erased_at"]);
    // Before it existed, as before.
    let before = as_of(ann, erased_at - TimeDelta::days(1));
    let response = lived.app.get(&before, Some(&lived.root_token)).await;
    assert_eq!(response.status(), 404);
}

#[tokio::test]
async fn an_administrator_reads_an_erased_profile_and_no_lookup_by_its_address_finds_it() {
    let mut lived = lived().await;
    let (ann, root) = (lived.ann, lived.root);
    let ann_token = lived.app.token_for(ann, &["user"]).await;
    lived.aggregator.catch_up(&lived.app).await;
    let position = lived.aggregator.checkpoint().await;
    // Read once before: kept in memory, which must follow the erasure.
    let profile = lived
        .read_text(&format!("/users/{ann}"), Some(position))
        .await;
    assert!(profile.contains(ANN_LATER), "{profile}");
    let response = lived
        .app
        .get_with_min_position("/users/me/sessions", &ann_token, Some(position))
        .await;
    let sessions: Value = response.json().await.unwrap();
    assert_eq!(sessions.as_array().unwrap().len(), 1, "{sessions}");

    let erased = lived.app.erase(ann, root).await;
    lived.aggregator.catch_up(&lived.app).await;

    let text = lived
        .read_text(&format!("/users/{ann}"), Some(erased))
        .await;
    assert_no_trace_of_ann(&text);
    let profile: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(profile["id"], ann.to_string());
    assert_eq!(profile["status"], "erased");
    assert_eq!(profile["email"], Value::Null);
    assert!(profile["erased_at"].is_string(), "{profile}");
    assert!(profile["registered_at"].is_string(), "{profile}");

    for lookup in [
        "/users?email=ann.lee%40example.org",
        "/users?email=Ann.Lee%40Example.com",
    ] {
        let found: Value = serde_json::from_str(&lived.read_text(lookup, None).await).unwrap();
        assert_eq!(found["items"], serde_json::json!([]), "{lookup}");
    }
    let listed = lived.read_text("/users?status=erased", None).await;
    assert_no_trace_of_ann(&listed);
    let listed: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(
        each(&listed["items"], |item| item["id"].as_str().unwrap()),
        [ann.to_string()]
    );
    let everyone = lived.read_text("/users", None).await;
    assert_no_trace_of_ann(&everyone);
    let active = lived.read_text("/users?status=active", None).await;
    assert!(!active.contains(&ann.to_string()), "{active}");

    // The account itself can call nothing: its sessions ended with it, a new one too.
    let own_routes = [
        "/users/me".to_owned(),
        "/users/me/sessions".to_owned(),
        "/users/me/export".to_owned(),
        format!("/users/{ann}"),
        format!("/users/{ann}/events"),
    ];
    refused_everywhere(&lived.app, &ann_token, &own_routes, None).await;
    let new_token = lived.app.token_for(ann, &["user"]).await;
    refused_everywhere(&lived.app, &new_token, &own_routes, Some(erased)).await;
    let sessions: i64 = sqlx::query_scalar("SELECT count(*) FROM sessions WHERE user_id = $1")
        .bind(ann)
        .fetch_one(&lived.app.pool)
        .await
        .unwrap();
    assert_eq!(
        sessions, 0,
        "its sessions' rows, with their user agents, are gone"
    );
}
