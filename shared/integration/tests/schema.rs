//! The public schema file describes exactly what this crate makes: every integration event
//! type, made from the golden fixture of each internal event (what stores hold), validates
//! against `docs/integration-events.schema.json`, and nothing secret gets through.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::PathBuf;

use chrono::{TimeZone, Utc};
use identity::{EVENT_VERSION_KEY, LoginEvent, UserEvent};
use integration::{EventType, IntegrationEvent, PERSONAL_FIELDS_READ, Published};
use message_store::{RecordedMessage, StreamName};
use serde_json::{Value, json};
use test_support::integration_schema::check_integration_event;
use uuid::Uuid;

const ACCOUNT: &str = "0195a8f2-6c1e-7b3a-9d4f-2e8b5c7a1f03";

fn fixture(event_type: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../identity/tests/fixtures")
        .join(format!("{event_type}.v1.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn message(category: &str, event_type: &str, data: Value) -> RecordedMessage {
    RecordedMessage {
        id: Uuid::now_v7(),
        stream: StreamName::parse(format!("{category}-{ACCOUNT}")).unwrap(),
        position: 0,
        global_position: 42,
        message_type: event_type.into(),
        data,
        metadata: json!({ EVENT_VERSION_KEY: 1 }),
        time: Utc.with_ymd_and_hms(2026, 12, 2, 8, 0, 0).unwrap(),
    }
}

/// Every internal event of the user and login streams, from its fixture.
fn every_internal_message() -> Vec<RecordedMessage> {
    let users = UserEvent::TYPES
        .iter()
        .map(|event_type| message("user", event_type, fixture(event_type)));
    let logins = LoginEvent::TYPES
        .iter()
        .map(|event_type| message("userLogin", event_type, fixture(event_type)));
    users.chain(logins).collect()
}

fn integration_event(message: &RecordedMessage) -> Option<Value> {
    IntegrationEvent::from_message(message, "/identity")
        .unwrap()
        .map(|event| serde_json::from_slice(&event.to_json()).unwrap())
}

#[test]
fn every_integration_event_type_is_made_and_matches_the_schema() {
    let mut made = BTreeSet::new();
    for message in every_internal_message() {
        let Some(event) = integration_event(&message) else {
            continue;
        };
        check_integration_event(&event).unwrap();
        assert_eq!(event["id"], json!(message.id));
        assert_eq!(event["subject"], json!(ACCOUNT));
        assert_eq!(event["time"], json!("2026-12-02T08:00:00.000000Z"));
        made.insert(event["type"].as_str().unwrap().to_owned());
    }
    let every: BTreeSet<String> = EventType::ALL
        .iter()
        .map(|kind| kind.name().into())
        .collect();
    assert_eq!(made, every);
}

#[test]
fn nothing_secret_or_internal_reaches_an_integration_event() {
    for message in every_internal_message() {
        let Some(event) = integration_event(&message) else {
            continue;
        };
        let text = event.to_string();
        for secret in [
            "argon2",
            "password_hash",
            "nonce",
            "locked_until",
            "failed_in_a_row",
        ] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert!(
            !text.contains("ann.lee@example.com"),
            "the normalised key in {text}"
        );
    }
}

#[test]
fn opening_only_the_fields_read_makes_the_same_events() {
    for message in every_internal_message() {
        let Some(event) = integration_event(&message) else {
            continue;
        };
        // What a deliverer reads: every personal field but those it opens is null unopened.
        let (kind, data) = (&message.message_type, &message.data);
        let personal = match message.stream.category() {
            "user" => UserEvent::from_stored(kind, 1, data)
                .unwrap()
                .personal_fields(),
            _ => LoginEvent::from_stored(kind, 1, data)
                .unwrap()
                .personal_fields(),
        };
        let mut partly_opened = message.clone();
        for field in personal {
            if !PERSONAL_FIELDS_READ.contains(field) && partly_opened.data.get(*field).is_some() {
                partly_opened.data[*field] = Value::Null;
            }
        }
        assert_eq!(
            integration_event(&partly_opened),
            Some(event),
            "{}",
            message.message_type
        );
    }
}

#[test]
fn internal_bookkeeping_makes_no_integration_event() {
    for (category, event_type) in [
        ("user", "PasswordRehashed"),
        ("user", "SessionsEnded"),
        ("userLogin", "LoginFailed"),
        ("userLogin", "LockoutLifted"),
    ] {
        let message = message(category, event_type, fixture(event_type));
        assert_eq!(integration_event(&message), None, "{event_type}");
    }
    let session = message("session", "SessionStarted", fixture("SessionStarted"));
    assert_eq!(integration_event(&session), None);
}

#[test]
fn an_erased_person_s_address_is_null_and_still_matches_the_schema() {
    for event_type in ["UserRegistered", "EmailChanged"] {
        let mut data = fixture(event_type);
        for field in ["email", "email_normalized", "password_hash"] {
            if data.get(field).is_some() {
                data[field] = Value::Null;
            }
        }
        let event = integration_event(&message("user", event_type, data)).unwrap();
        assert_eq!(event["data"]["email"], Value::Null);
        check_integration_event(&event).unwrap();
    }
}

#[test]
fn a_password_reset_and_a_change_are_one_public_type_told_apart_by_reason() {
    let changed = integration_event(&message(
        "user",
        "PasswordChanged",
        fixture("PasswordChanged"),
    ));
    let reset = integration_event(&message("user", "PasswordReset", fixture("PasswordReset")));
    assert_eq!(
        changed.as_ref().unwrap()["type"],
        reset.as_ref().unwrap()["type"]
    );
    assert_eq!(changed.unwrap()["data"]["reason"], "changed");
    assert_eq!(reset.unwrap()["data"]["reason"], "reset");
}

#[test]
fn the_schema_refuses_what_is_not_an_integration_event() {
    let message = message("user", "UserRegistered", fixture("UserRegistered"));
    let good = integration_event(&message).unwrap();
    let mut unknown_type = good.clone();
    unknown_type["type"] = json!("identity.user.registered.v9");
    let mut extra_field = good.clone();
    extra_field["data"]["password_hash"] = json!("x");
    let mut no_subject = good;
    no_subject.as_object_mut().unwrap().remove("subject");
    for bad in [unknown_type, extra_field, no_subject] {
        assert!(check_integration_event(&bad).is_err(), "{bad}");
    }
}

#[test]
fn logins_are_not_published_unless_configured() {
    let default = Published::default();
    assert!(!default.contains(EventType::LoggedIn));
    assert!(default.contains(EventType::Registered));
    let chosen = Published::from_names(Some(&["identity.user.logged_in.v1".into()])).unwrap();
    assert!(chosen.contains(EventType::LoggedIn));
    assert!(!chosen.contains(EventType::Registered));
    let error = Published::from_names(Some(&["identity.user.loggedin".into()])).unwrap_err();
    assert!(error.to_string().contains("identity.user.logged_in.v1"));
}
