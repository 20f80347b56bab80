//! Webhook endpoints through the command API: registered, their secrets rotated, enabled and
//! deleted by administrators, each a stream in the real store; and everything that is refused
//! (bad URLs, internal networks, unknown or unpublished event types, other callers), with
//! nothing appended.

use std::collections::BTreeSet;

use identity::{
    WebhookCommand, WebhookEvent, WebhookId, WebhookState, decide_webhook, webhook_stream_name,
};
use message_store::{ExpectedVersion, StreamAppend, StreamName};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokens::{WebhookSecret, WebhookSecretKey};
use uuid::Uuid;

use platform::clock::Clock;

use crate::helpers::{PASSWORD, TestApp, position_of, problem, spawn_with};

/// A receiver on the loopback interface, which these tests allow (the service's default
/// refuses it). Nothing listens there: registering never connects.
const RECEIVER: &str = "http://127.0.0.1:9/identity-events";

const REGISTERED: &str = "identity.user.registered.v1";
const ERASED: &str = "identity.user.erased.v1";
const LOGGED_IN: &str = "identity.user.logged_in.v1";

/// An application whose webhooks may reach loopback addresses, as in a test or on one host.
async fn spawn_allowing_loopback() -> TestApp {
    spawn_with(|settings| {
        settings.webhooks.allowed_networks = vec!["127.0.0.0/8".into(), "::1/128".into()];
    })
    .await
}

impl TestApp {
    async fn register_webhook(&self, token: &str, body: Value) -> reqwest::Response {
        self.post_as("/webhooks", token, body).await
    }

    /// Registers an endpoint at [`RECEIVER`] for registrations and erasures: its answer.
    async fn webhook(&self, token: &str) -> Value {
        let response = self
            .register_webhook(
                token,
                json!({ "url": RECEIVER, "events": [REGISTERED, ERASED], "description": "provisioning" }),
            )
            .await;
        assert_eq!(response.status(), StatusCode::CREATED);
        response.json().await.unwrap()
    }

    /// The events of endpoint `id`'s stream, oldest first.
    async fn webhook_events(&self, id: &str) -> Vec<WebhookEvent> {
        let stream = format!("webhook-{id}");
        let pool = self.database.pool().await;
        let rows: Vec<(String, Value, Value)> = sqlx::query_as(
            "SELECT type, data, metadata FROM messages WHERE stream_name = $1 \
             ORDER BY position",
        )
        .bind(&stream)
        .fetch_all(&pool)
        .await
        .unwrap();
        pool.close().await;
        rows.iter()
            .map(|(kind, data, metadata)| {
                let version = identity::event_version(metadata).unwrap();
                WebhookEvent::from_stored(kind, version, data).unwrap()
            })
            .collect()
    }

    /// How many messages the `webhook` category holds.
    async fn webhook_messages(&self) -> usize {
        self.messages("webhook").await.len()
    }

    /// The secret endpoint `id` signs with for `nonce`, derived as the aggregator derives it:
    /// from the configured key.
    fn derived_secret(&self, id: &str, nonce: &identity::WebhookNonce) -> String {
        let key = WebhookSecretKey::from_hex(self.settings.webhooks.secret_key.as_ref().unwrap())
            .unwrap();
        WebhookSecret::derive(&key, id.parse().unwrap(), nonce.as_bytes())
            .unwrap()
            .text()
            .expose_secret()
            .clone()
    }

    /// Disables endpoint `id` as the delivery does when it has failed for too long.
    async fn disable_webhook(&self, id: &str) {
        let events = self.webhook_events(id).await;
        let state = WebhookState::fold(&events);
        let now = self.clock.now();
        let command = WebhookCommand::Disable {
            reason: "HTTP 503".into(),
            failing_since: now,
        };
        let disabled = decide_webhook(&state, command, now).unwrap();
        let webhook = WebhookId::from_uuid(id.parse().unwrap());
        let messages = disabled
            .iter()
            .map(|event| {
                message_store::NewMessage::new(event.event_type(), event.to_json())
                    .with_metadata(json!({ identity::EVENT_VERSION_KEY: event.version() }))
            })
            .collect();
        let stream = StreamName::parse(webhook_stream_name(webhook)).unwrap();
        let expected = ExpectedVersion::Exact(events.len() as u64 - 1);
        self.state
            .commands
            .store
            .append(vec![StreamAppend::new(stream, expected, messages)])
            .await
            .unwrap();
    }
}

/// The field each error of a 422 names.
async fn refused_fields(response: reqwest::Response) -> Vec<String> {
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body = problem(response).await;
    assert_eq!(body["code"], "validation_failed");
    body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|error| error["field"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_registration_shows_the_secret_derived_from_its_event_s_nonce_once() {
    let app = spawn_allowing_loopback().await;
    let admin = app.admin_token().await;
    let response = app
        .register_webhook(
            &admin,
            json!({ "url": RECEIVER, "events": [REGISTERED, ERASED], "description": "provisioning" }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(response.headers()["cache-control"], "no-store");
    let position = position_of(&response);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let body: Value = response.json().await.unwrap();
    let id = body["id"].as_str().unwrap();
    assert_eq!(location, format!("/webhooks/{id}"));
    assert_eq!(body["url"], RECEIVER);
    assert_eq!(body["events"], json!([REGISTERED, ERASED]));
    assert_eq!(body["description"], "provisioning");
    assert_eq!(body["status"], "enabled");
    assert_eq!(body["position"], position);
    let secret = body["secret"].as_str().unwrap();
    assert!(secret.starts_with("whsec_"), "{secret}");

    // The store holds the nonce, never the secret, and the secret is the one derived from it.
    let events = app.webhook_events(id).await;
    let [WebhookEvent::WebhookRegistered(registered)] = events.as_slice() else {
        panic!("one registration expected: {events:?}");
    };
    assert_eq!(registered.url, RECEIVER);
    assert_eq!(
        registered.registered_by.to_string(),
        app.id_of_token(&admin)
    );
    assert_eq!(app.derived_secret(id, &registered.secret_nonce), secret);
    let stored = app.messages("webhook").await;
    let encoded = secret.strip_prefix("whsec_").unwrap();
    assert!(
        !serde_json::to_string(&stored).unwrap().contains(encoded),
        "the secret is in the store"
    );
}

#[tokio::test]
async fn an_endpoint_registered_without_a_description_or_an_id_gets_an_empty_one_and_a_new_id() {
    let app = spawn_allowing_loopback().await;
    let admin = app.admin_token().await;
    let (first, second) = tokio::join!(
        app.register_webhook(&admin, json!({ "url": RECEIVER, "events": [REGISTERED] })),
        app.register_webhook(&admin, json!({ "url": RECEIVER, "events": [REGISTERED] })),
    );
    let first: Value = first.json().await.unwrap();
    let second: Value = second.json().await.unwrap();
    assert_eq!(first["description"], "");
    assert_ne!(first["id"], second["id"]);
    assert_ne!(first["secret"], second["secret"]);
}

#[tokio::test]
async fn a_registration_retried_with_its_id_is_refused_and_registers_no_second_endpoint() {
    let app = spawn_allowing_loopback().await;
    let admin = app.admin_token().await;
    let id = Uuid::new_v4();
    let body = json!({ "url": RECEIVER, "events": [REGISTERED], "id": id });
    let first = app.register_webhook(&admin, body.clone()).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let first: Value = first.json().await.unwrap();
    assert_eq!(first["id"], id.to_string());

    let again = app.register_webhook(&admin, body).await;
    assert_eq!(again.status(), StatusCode::CONFLICT);
    let again = problem(again).await;
    assert_eq!(again["code"], "webhook_exists");
    assert!(again.get("secret").is_none());
    assert_eq!(app.webhook_events(&id.to_string()).await.len(), 1);
}

#[tokio::test]
async fn a_rotation_gives_another_secret_and_says_until_when_the_previous_one_signs() {
    let app = spawn_with(|settings| {
        settings.webhooks.allowed_networks = vec!["127.0.0.0/8".into()];
        settings.webhooks.previous_secret_ms = 90 * 60 * 1000;
    })
    .await;
    let admin = app.admin_token().await;
    let registered = app.webhook(&admin).await;
    let id = registered["id"].as_str().unwrap();

    let response = app
        .post_as(&format!("/webhooks/{id}/rotate-secret"), &admin, json!({}))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["cache-control"], "no-store");
    let position = position_of(&response);
    let rotated: Value = response.json().await.unwrap();
    assert_eq!(rotated["id"], id);
    assert_eq!(rotated["position"], position);
    let secret = rotated["secret"].as_str().unwrap();
    assert_ne!(secret, registered["secret"].as_str().unwrap());

    let events = app.webhook_events(id).await;
    let [
        WebhookEvent::WebhookRegistered(first),
        WebhookEvent::WebhookSecretRotated(rotation),
    ] = events.as_slice()
    else {
        panic!("a registration and a rotation expected: {events:?}");
    };
    assert_eq!(rotation.previous_nonce, first.secret_nonce);
    assert_eq!(app.derived_secret(id, &rotation.secret_nonce), secret);
    let expires: chrono::DateTime<chrono::Utc> = rotated["previous_secret_expires_at"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(expires, rotation.at + chrono::TimeDelta::minutes(90));
}

#[tokio::test]
async fn concurrent_rotations_each_decide_on_the_one_before() {
    let app = spawn_allowing_loopback().await;
    let admin = app.admin_token().await;
    let registered = app.webhook(&admin).await;
    let id = registered["id"].as_str().unwrap();
    let path = format!("/webhooks/{id}/rotate-secret");

    let rotations =
        futures::future::join_all((0..6).map(|_| app.post_as(&path, &admin, json!({})))).await;
    let mut secrets = BTreeSet::new();
    for response in rotations {
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.unwrap();
        secrets.insert(body["secret"].as_str().unwrap().to_owned());
    }
    assert_eq!(secrets.len(), 6);

    // Each rotation replaced the secret the one before it set: none decided on a stale state.
    let events = app.webhook_events(id).await;
    let mut current = match &events[0] {
        WebhookEvent::WebhookRegistered(registered) => registered.secret_nonce,
        other => panic!("a registration first: {other:?}"),
    };
    for event in &events[1..] {
        let WebhookEvent::WebhookSecretRotated(rotation) = event else {
            panic!("rotations only: {event:?}");
        };
        assert_eq!(rotation.previous_nonce, current);
        assert!(secrets.contains(&app.derived_secret(id, &rotation.secret_nonce)));
        current = rotation.secret_nonce;
    }
    assert_eq!(events.len(), 7);
}

#[tokio::test]
async fn an_endpoint_the_delivery_disabled_is_enabled_again_once() {
    let app = spawn_allowing_loopback().await;
    let admin = app.admin_token().await;
    let id = app.webhook(&admin).await["id"].as_str().unwrap().to_owned();
    let path = format!("/webhooks/{id}/enable");

    // Enabled already: nothing to record, the registration's position answered.
    let unchanged = app.post_as(&path, &admin, json!({})).await;
    assert_eq!(unchanged.status(), StatusCode::OK);
    assert_eq!(app.webhook_events(&id).await.len(), 1);

    app.disable_webhook(&id).await;
    let enabled = app.post_as(&path, &admin, json!({})).await;
    assert_eq!(enabled.status(), StatusCode::OK);
    let position = position_of(&enabled);
    let body: Value = enabled.json().await.unwrap();
    assert_eq!(
        (body["id"].as_str(), body["position"].as_u64()),
        (Some(id.as_str()), Some(position))
    );
    let events = app.webhook_events(&id).await;
    assert!(matches!(
        events.as_slice(),
        [
            _,
            WebhookEvent::WebhookDisabled(_),
            WebhookEvent::WebhookEnabled(_)
        ]
    ));
    assert_eq!(position, app.last_position().await as u64);

    let again = app.post_as(&path, &admin, json!({})).await;
    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(position_of(&again), position);
    assert_eq!(app.webhook_events(&id).await.len(), 3);
}

#[tokio::test]
async fn a_deleted_endpoint_answers_404_to_every_command_and_its_id_is_not_registered_again() {
    let app = spawn_allowing_loopback().await;
    let admin = app.admin_token().await;
    let id = app.webhook(&admin).await["id"].as_str().unwrap().to_owned();

    let deleted = app.delete_as(&format!("/webhooks/{id}"), &admin).await;
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    assert_eq!(position_of(&deleted), app.last_position().await as u64);
    assert!(matches!(
        app.webhook_events(&id).await.as_slice(),
        [_, WebhookEvent::WebhookDeleted(_)]
    ));

    let before = app.message_count().await;
    for response in [
        app.delete_as(&format!("/webhooks/{id}"), &admin).await,
        app.post_as(&format!("/webhooks/{id}/rotate-secret"), &admin, json!({}))
            .await,
        app.post_as(&format!("/webhooks/{id}/enable"), &admin, json!({}))
            .await,
    ] {
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(problem(response).await["code"], "not_found");
    }
    let again = app
        .register_webhook(
            &admin,
            json!({ "url": RECEIVER, "events": [REGISTERED], "id": id }),
        )
        .await;
    assert_eq!(again.status(), StatusCode::CONFLICT);
    assert_eq!(app.message_count().await, before);
}

#[tokio::test]
async fn an_unknown_endpoint_answers_404_to_every_command() {
    let app = spawn_allowing_loopback().await;
    let admin = app.admin_token().await;
    for id in [Uuid::new_v4().to_string(), "not-a-uuid".to_owned()] {
        for response in [
            app.delete_as(&format!("/webhooks/{id}"), &admin).await,
            app.post_as(&format!("/webhooks/{id}/rotate-secret"), &admin, json!({}))
                .await,
            app.post_as(&format!("/webhooks/{id}/enable"), &admin, json!({}))
                .await,
        ] {
            assert_eq!(response.status(), StatusCode::NOT_FOUND, "{id}");
        }
    }
    assert_eq!(app.webhook_messages().await, 0);
}

#[tokio::test]
async fn malformed_urls_are_refused_naming_the_url_and_nothing_is_appended() {
    let app = spawn_allowing_loopback().await;
    let admin = app.admin_token().await;
    let too_long = format!("http://127.0.0.1/{}", "a".repeat(2000));
    for url in [
        "127.0.0.1/identity-events",
        "//127.0.0.1/identity-events",
        "ftp://127.0.0.1/identity-events",
        "file:///etc/passwd",
        "http://me:secret@127.0.0.1/identity-events",
        "http://127.0.0.1/identity-events#fragment",
        "not a url",
        "",
        too_long.as_str(),
    ] {
        let response = app
            .register_webhook(&admin, json!({ "url": url, "events": [REGISTERED] }))
            .await;
        assert_eq!(refused_fields(response).await, ["url"], "{url}");
    }
    assert_eq!(app.webhook_messages().await, 0);
}

#[tokio::test]
async fn private_loopback_and_link_local_addresses_are_refused_by_default() {
    let app = spawn_with(|_| {}).await;
    let admin = app.admin_token().await;
    for url in [
        "http://127.0.0.1:8080/hook",
        "http://10.1.2.3/hook",
        "http://172.16.0.1/hook",
        "http://192.168.1.1/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://100.64.0.1/hook",
        "http://0.0.0.0/hook",
        "http://[::1]/hook",
        "http://[fd00::1]/hook",
        "http://[fe80::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        // A name, resolved: every address it gives is checked.
        "http://localhost:8080/hook",
    ] {
        let response = app
            .register_webhook(&admin, json!({ "url": url, "events": [REGISTERED] }))
            .await;
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY, "{url}");
        let body = problem(response).await;
        assert_eq!(body["errors"][0]["field"], "url", "{url}");
        let message = body["errors"][0]["message"].as_str().unwrap();
        assert!(
            message.contains("network webhooks may not reach"),
            "{url}: {message}"
        );
    }
    assert_eq!(app.webhook_messages().await, 0);
}

#[tokio::test]
async fn loopback_is_accepted_where_allowed_networks_names_it_and_nothing_else_is() {
    let app = spawn_with(|settings| {
        settings.webhooks.allowed_networks = vec!["127.0.0.0/8".into()];
    })
    .await;
    let admin = app.admin_token().await;
    let accepted = app
        .register_webhook(
            &admin,
            json!({ "url": "http://127.0.0.1:4000/hook", "events": [REGISTERED] }),
        )
        .await;
    assert_eq!(accepted.status(), StatusCode::CREATED);
    for url in [
        "http://10.1.2.3/hook",
        "http://169.254.169.254/",
        "http://[::1]/hook",
    ] {
        let refused = app
            .register_webhook(&admin, json!({ "url": url, "events": [REGISTERED] }))
            .await;
        assert_eq!(refused_fields(refused).await, ["url"], "{url}");
    }
    assert_eq!(app.webhook_messages().await, 1);
}

#[tokio::test]
async fn a_name_that_does_not_resolve_is_refused() {
    let app = spawn_allowing_loopback().await;
    let admin = app.admin_token().await;
    // `.invalid` never resolves (RFC 2606).
    let response = app
        .register_webhook(
            &admin,
            json!({ "url": "https://hooks.example.invalid/x", "events": [REGISTERED] }),
        )
        .await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body = problem(response).await;
    assert_eq!(body["errors"][0]["field"], "url");
    let message = body["errors"][0]["message"].as_str().unwrap();
    assert!(message.contains("could not be resolved"), "{message}");
    assert_eq!(app.webhook_messages().await, 0);
}

#[tokio::test]
async fn event_types_must_be_published_known_and_each_named_once() {
    let app = spawn_allowing_loopback().await;
    let admin = app.admin_token().await;
    for events in [
        json!([]),
        json!(["identity.user.born.v1"]),
        json!([REGISTERED, "UserRegistered"]),
        json!([REGISTERED, ERASED, REGISTERED]),
        // Logins are not published unless `integration.events` names them.
        json!([LOGGED_IN]),
    ] {
        let response = app
            .register_webhook(&admin, json!({ "url": RECEIVER, "events": events }))
            .await;
        assert_eq!(refused_fields(response).await, ["events"], "{events}");
    }
    assert_eq!(app.webhook_messages().await, 0);
}

#[tokio::test]
async fn logins_may_be_subscribed_to_where_the_deployment_publishes_them() {
    let app = spawn_with(|settings| {
        settings.webhooks.allowed_networks = vec!["127.0.0.0/8".into()];
        settings.integration.events = Some(vec![REGISTERED.into(), LOGGED_IN.into()]);
    })
    .await;
    let admin = app.admin_token().await;
    let accepted = app
        .register_webhook(&admin, json!({ "url": RECEIVER, "events": [LOGGED_IN] }))
        .await;
    assert_eq!(accepted.status(), StatusCode::CREATED);
    // Erasures exist, but this deployment does not publish them.
    let refused = app
        .register_webhook(&admin, json!({ "url": RECEIVER, "events": [ERASED] }))
        .await;
    assert_eq!(refused_fields(refused).await, ["events"]);
}

#[tokio::test]
async fn every_bad_field_is_named_at_once_and_a_long_description_is_one() {
    let app = spawn_allowing_loopback().await;
    let admin = app.admin_token().await;
    let response = app
        .register_webhook(
            &admin,
            json!({ "url": "ftp://127.0.0.1/", "events": [], "description": "é".repeat(501) }),
        )
        .await;
    assert_eq!(
        refused_fields(response).await,
        ["url", "events", "description"]
    );
    let longest = app
        .register_webhook(
            &admin,
            json!({ "url": RECEIVER, "events": [REGISTERED], "description": "é".repeat(500) }),
        )
        .await;
    assert_eq!(longest.status(), StatusCode::CREATED);
    let unknown_field = app
        .register_webhook(
            &admin,
            json!({ "url": RECEIVER, "events": [REGISTERED], "secret": "whsec_mine" }),
        )
        .await;
    assert_eq!(unknown_field.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(app.webhook_messages().await, 1);
}

#[tokio::test]
async fn only_administrators_manage_endpoints() {
    let app = spawn_allowing_loopback().await;
    let admin = app.admin_token().await;
    let id = app.webhook(&admin).await["id"].as_str().unwrap().to_owned();
    let (_, user) = app.signed_in("ann@example.com").await;
    let before = app.message_count().await;
    let register = json!({ "url": RECEIVER, "events": [REGISTERED] });

    for (token, status) in [(Some(user.as_str()), 403), (None, 401)] {
        let send = |request: reqwest::RequestBuilder| async {
            let request = match token {
                Some(token) => request.bearer_auth(token),
                None => request,
            };
            request.send().await.unwrap()
        };
        let client = &app.client;
        for response in [
            send(client.post(app.url("/webhooks")).json(&register)).await,
            send(client.delete(app.url(&format!("/webhooks/{id}")))).await,
            send(client.post(app.url(&format!("/webhooks/{id}/rotate-secret")))).await,
            send(client.post(app.url(&format!("/webhooks/{id}/enable")))).await,
        ] {
            assert_eq!(response.status().as_u16(), status);
            let body = problem(response).await;
            assert!(body.get("secret").is_none());
        }
    }
    assert_eq!(app.message_count().await, before);
    // The user can still log in: nothing about them changed either.
    assert_eq!(app.login("ann@example.com", PASSWORD).await.status(), 200);
}

#[tokio::test]
async fn the_document_describes_the_webhook_routes() {
    let app = spawn_allowing_loopback().await;
    let document = app.get_json("/openapi.json").await;
    let paths = &document["paths"];
    for (path, method) in [
        ("/webhooks", "post"),
        ("/webhooks/{id}", "delete"),
        ("/webhooks/{id}/rotate-secret", "post"),
        ("/webhooks/{id}/enable", "post"),
    ] {
        let operation = &paths[path][method];
        assert!(operation.is_object(), "{method} {path} is not documented");
        for status in ["401", "403"] {
            assert!(
                operation["responses"][status].is_object(),
                "{method} {path}: {status}"
            );
        }
    }
    let events = &document["components"]["schemas"]["WebhookRegistration"]["properties"]["events"];
    assert_eq!(events["uniqueItems"], true);
    assert_eq!(events["minItems"], 1);
    let names = &document["components"]["schemas"]["EventTypeName"]["enum"];
    assert!(names.as_array().unwrap().contains(&json!(LOGGED_IN)));
}
