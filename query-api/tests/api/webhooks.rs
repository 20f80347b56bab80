//! Webhook endpoints through the query API: folded from their streams in the message store
//! (appended here as the command API and the delivery append them), with their delivery's
//! checkpoint and attempts read from the read model (written here as the delivery writes
//! them), for administrators only, and never with a secret or a nonce.

use chrono::{DateTime, Utc};
use identity::{
    UserId, WebhookCommand, WebhookEvent, WebhookId, WebhookNonce, WebhookState, decide_webhook,
    event_version, webhook_stream_name,
};
use message_store::{ExpectedVersion, NewMessage, StreamAppend, StreamName};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::harness::{TestApp, now, problem, spawn, spawn_with};

const REGISTERED: &str = "identity.user.registered.v1";
const ERASED: &str = "identity.user.erased.v1";

impl TestApp {
    /// Decides `command` on endpoint `id` as it stands in the store and appends what follows,
    /// at the version read, as the command API (or, for a disabling, the delivery) does.
    async fn webhook_command(&self, id: Uuid, command: WebhookCommand) -> Vec<WebhookEvent> {
        self.webhook_command_at(id, command).await.0
    }

    /// [`Self::webhook_command`], and the global position of what it appended.
    async fn webhook_command_at(
        &self,
        id: Uuid,
        command: WebhookCommand,
    ) -> (Vec<WebhookEvent>, u64) {
        let stream = StreamName::parse(webhook_stream_name(WebhookId::from_uuid(id))).unwrap();
        let stored = self.store.read_stream(&stream, 0, 1000).await.unwrap();
        let history: Vec<WebhookEvent> = stored
            .iter()
            .map(|message| {
                let version = event_version(&message.metadata).unwrap();
                WebhookEvent::from_stored(&message.message_type, version, &message.data).unwrap()
            })
            .collect();
        let events = decide_webhook(&WebhookState::fold(&history), command, now()).unwrap();
        let messages = events
            .iter()
            .map(|event| {
                NewMessage::new(event.event_type(), event.to_json())
                    .with_metadata(json!({ identity::EVENT_VERSION_KEY: event.version() }))
            })
            .collect();
        let expected = stored.last().map_or(ExpectedVersion::NoStream, |last| {
            ExpectedVersion::Exact(last.position)
        });
        let appended = self
            .store
            .append(vec![StreamAppend::new(stream, expected, messages)])
            .await
            .unwrap();
        (events, appended.last_global_position())
    }

    /// Registers endpoint `id` by `admin`, with the secret nonce `nonce`: the registration's
    /// position.
    async fn register_webhook(&self, id: Uuid, admin: Uuid, url: &str, nonce: u8) -> u64 {
        let command = WebhookCommand::Register {
            id: WebhookId::from_uuid(id),
            url: url.into(),
            events: vec![REGISTERED.into(), ERASED.into()],
            description: format!("receives at {url}"),
            secret_nonce: nonce_of(nonce),
            by: UserId::from_uuid(admin),
        };
        self.webhook_command_at(id, command).await.1
    }

    /// Moves the checkpoint of endpoint `id`'s delivery to `position`, as the delivery does.
    async fn set_delivery_checkpoint(&self, id: Uuid, position: i64) {
        sqlx::query(
            "INSERT INTO projection_checkpoints (projection, version, position) \
             VALUES ($1, 1, $2)",
        )
        .bind(format!("webhook:{id}"))
        .bind(position)
        .execute(&self.pool)
        .await
        .unwrap();
    }

    /// Records an attempt to deliver message `message` to endpoint `id`, as the delivery does.
    async fn record_attempt(
        &self,
        id: Uuid,
        message: Uuid,
        attempt: i32,
        status_code: Option<i32>,
        error: Option<&str>,
        latency_ms: i32,
    ) {
        sqlx::query(
            "INSERT INTO webhook_attempts (webhook_id, message_id, event_type, position, \
                                           attempt, attempted_at, latency_ms, status_code, \
                                           error, delivered) \
             VALUES ($1, $2, $3, 12, $4, $5, $6, $7, $8, $9)",
        )
        .bind(id)
        .bind(message)
        .bind(REGISTERED)
        .bind(attempt)
        .bind(now())
        .bind(latency_ms)
        .bind(status_code)
        .bind(error)
        .bind(status_code.is_some_and(|code| (200..300).contains(&code)))
        .execute(&self.pool)
        .await
        .unwrap();
    }

    async fn get_json(&self, path: &str, token: &str) -> Value {
        let response = self.get(path, Some(token)).await;
        assert_eq!(response.status(), 200, "{path}");
        response.json().await.unwrap()
    }

    /// `path` for `token`, answered once the store's readers see `position`.
    async fn get_json_after(&self, path: &str, token: &str, position: u64) -> Value {
        let response = self
            .get_with_min_position(path, token, Some(position))
            .await;
        assert_eq!(response.status(), 200, "{path}");
        response.json().await.unwrap()
    }
}

fn nonce_of(byte: u8) -> WebhookNonce {
    WebhookNonce::from_bytes([byte; WebhookNonce::LEN])
}

fn instant(value: &Value) -> DateTime<Utc> {
    value.as_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn administrators_list_the_live_endpoints_with_their_state_and_never_a_secret() {
    let app = spawn_with(|settings| settings.query.max_wait_ms = 30_000).await;
    let (admin, token) = app.seed_admin().await;
    let (failing, quiet, deleted) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    app.register_webhook(failing, admin.id, "https://a.example.com/in", 1)
        .await;
    app.register_webhook(quiet, admin.id, "https://b.example.com/in", 2)
        .await;
    app.register_webhook(deleted, admin.id, "https://c.example.com/in", 3)
        .await;
    let by = UserId::from_uuid(admin.id);
    let rotated = app
        .webhook_command(
            failing,
            WebhookCommand::RotateSecret {
                secret_nonce: nonce_of(4),
                by,
            },
        )
        .await;
    let failing_since = now();
    let disabled = app
        .webhook_command(
            failing,
            WebhookCommand::Disable {
                reason: "HTTP 503".into(),
                failing_since,
            },
        )
        .await;
    let (_, last) = app
        .webhook_command_at(deleted, WebhookCommand::Delete { by })
        .await;
    app.set_delivery_checkpoint(failing, 40).await;

    // Other tests' transactions on the server may hold the store's readers back (ADR 2): the
    // list is asked for as it stands once they see the last change.
    let body = app.get_json_after("/webhooks", &token, last).await;
    let items = body["items"].as_array().unwrap();
    let ids: Vec<&str> = items
        .iter()
        .map(|item| item["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [failing.to_string(), quiet.to_string()]);

    let first = &items[0];
    assert_eq!(first["url"], "https://a.example.com/in");
    assert_eq!(first["events"], json!([REGISTERED, ERASED]));
    assert_eq!(first["description"], "receives at https://a.example.com/in");
    assert_eq!(first["registered_by"], admin.id.to_string());
    assert_eq!(first["status"], "disabled");
    assert_eq!(first["disabled_reason"], "HTTP 503");
    assert_eq!(instant(&first["failing_since"]), failing_since);
    assert_eq!(instant(&first["disabled_at"]), disabled[0].occurred_at());
    assert_eq!(
        instant(&first["secret_rotated_at"]),
        rotated[0].occurred_at()
    );
    assert_eq!(first["delivery_position"], 40);

    let second = &items[1];
    assert_eq!(second["status"], "enabled");
    for field in [
        "disabled_reason",
        "disabled_at",
        "failing_since",
        "secret_rotated_at",
        "delivery_position",
    ] {
        assert!(second[field].is_null(), "{field}: {}", second[field]);
    }

    // Neither a secret nor the nonce it is derived from, under any name.
    let text = body.to_string();
    for nonce in [1, 2, 4] {
        assert!(
            !text.contains(&nonce_of(nonce).to_hex()),
            "a nonce is shown"
        );
    }
    for item in items {
        let fields: Vec<&String> = item.as_object().unwrap().keys().collect();
        assert!(
            fields
                .iter()
                .all(|field| !field.contains("nonce") && *field != "secret"),
            "{fields:?}"
        );
    }
}

#[tokio::test]
async fn one_endpoint_is_read_by_its_id_and_an_unknown_or_deleted_one_is_not_found() {
    let app = spawn().await;
    let (admin, token) = app.seed_admin().await;
    let (live, deleted) = (Uuid::now_v7(), Uuid::now_v7());
    app.register_webhook(live, admin.id, "https://a.example.com/in", 1)
        .await;
    app.register_webhook(deleted, admin.id, "https://b.example.com/in", 2)
        .await;
    app.webhook_command(
        deleted,
        WebhookCommand::Delete {
            by: UserId::from_uuid(admin.id),
        },
    )
    .await;
    app.set_delivery_checkpoint(live, 7).await;

    let one = app.get_json(&format!("/webhooks/{live}"), &token).await;
    assert_eq!(one["id"], live.to_string());
    assert_eq!(one["status"], "enabled");
    assert_eq!(one["delivery_position"], 7);
    assert!(!one.to_string().contains(&nonce_of(1).to_hex()));

    for id in [
        deleted.to_string(),
        Uuid::now_v7().to_string(),
        "nope".into(),
    ] {
        for path in [
            format!("/webhooks/{id}"),
            format!("/webhooks/{id}/deliveries"),
        ] {
            let (status, body) = app.get_problem(&path, &token).await;
            assert_eq!(
                (status, body["code"].as_str()),
                (404, Some("not_found")),
                "{path}"
            );
        }
    }
}

#[tokio::test]
async fn the_newest_deliveries_come_first_with_their_answers_and_latencies() {
    let app = spawn().await;
    let (admin, token) = app.seed_admin().await;
    let (endpoint, other) = (Uuid::now_v7(), Uuid::now_v7());
    app.register_webhook(endpoint, admin.id, "https://a.example.com/in", 1)
        .await;
    app.register_webhook(other, admin.id, "https://b.example.com/in", 2)
        .await;
    let (first, second) = (Uuid::now_v7(), Uuid::now_v7());
    app.record_attempt(endpoint, first, 1, None, Some("timed out"), 10_000)
        .await;
    app.record_attempt(endpoint, first, 2, Some(200), None, 48)
        .await;
    app.record_attempt(other, first, 1, Some(500), Some("HTTP 500"), 12)
        .await;
    app.record_attempt(endpoint, second, 1, Some(204), None, 31)
        .await;

    let path = format!("/webhooks/{endpoint}/deliveries");
    let all = app.get_json(&path, &token).await;
    let listed: Vec<(String, u64)> = all["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| {
            (
                item["message_id"].as_str().unwrap().to_owned(),
                item["attempt"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [
            (second.to_string(), 1),
            (first.to_string(), 2),
            (first.to_string(), 1)
        ]
    );
    let oldest = &all["items"][2];
    assert_eq!(oldest["event_type"], REGISTERED);
    assert_eq!(oldest["position"], 12);
    assert_eq!(oldest["latency_ms"], 10_000);
    assert!(oldest["status_code"].is_null());
    assert_eq!(oldest["error"], "timed out");
    assert_eq!(oldest["delivered"], false);
    instant(&oldest["attempted_at"]);
    let retried = &all["items"][1];
    assert_eq!(
        (
            &retried["status_code"],
            &retried["delivered"],
            &retried["error"]
        ),
        (&json!(200), &json!(true), &Value::Null)
    );

    let newest = app.get_json(&format!("{path}?limit=2"), &token).await;
    assert_eq!(newest["items"].as_array().unwrap().len(), 2);
    assert_eq!(newest["items"][0]["message_id"], second.to_string());

    for limit in ["0", "101", "-1", "two"] {
        let (status, body) = app
            .get_problem(&format!("{path}?limit={limit}"), &token)
            .await;
        assert_eq!(
            (status, body["errors"][0]["field"].as_str()),
            (422, Some("limit"))
        );
    }
    let (status, _) = app.get_problem(&format!("{path}?offset=2"), &token).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn only_administrators_read_webhook_endpoints() {
    let app = spawn().await;
    let (admin, _) = app.seed_admin().await;
    let endpoint = Uuid::now_v7();
    app.register_webhook(endpoint, admin.id, "https://a.example.com/in", 1)
        .await;
    app.record_attempt(endpoint, Uuid::now_v7(), 1, Some(200), None, 5)
        .await;
    let user = app.seed_user("ann@example.com", "active", &["user"]).await;
    let user_token = app.token_for(user.id, &["user"]).await;

    for path in [
        "/webhooks".to_owned(),
        format!("/webhooks/{endpoint}"),
        format!("/webhooks/{endpoint}/deliveries"),
    ] {
        let (status, body) = problem(app.get(&path, Some(&user_token)).await).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (403, Some("forbidden")),
            "{path}"
        );
        let (status, body) = problem(app.get(&path, None).await).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (401, Some("invalid_token")),
            "{path}"
        );
    }
}

#[tokio::test]
async fn the_document_describes_the_webhook_reads() {
    let app = spawn().await;
    let document: Value = app.get("/openapi.json", None).await.json().await.unwrap();
    for path in ["/webhooks", "/webhooks/{id}", "/webhooks/{id}/deliveries"] {
        let operation = &document["paths"][path]["get"];
        assert!(operation.is_object(), "GET {path} is not documented");
        assert!(operation["responses"]["403"].is_object(), "GET {path}");
    }
    let webhook = &document["components"]["schemas"]["Webhook"]["properties"];
    assert!(webhook["delivery_position"].is_object());
    assert!(webhook.get("secret").is_none());
}

#[tokio::test]
async fn a_list_asked_for_after_a_change_waits_until_the_store_s_readers_see_it() {
    let app = spawn().await;
    let (admin, token) = app.seed_admin().await;
    // A transaction that began before the registration and is still open: readers of the
    // global order do not see what was written after it began (ADR 2).
    let mut older = app.pool.begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *older)
        .await
        .unwrap();
    let endpoint = Uuid::now_v7();
    let position = app
        .register_webhook(endpoint, admin.id, "https://a.example.com/in", 1)
        .await;

    let held_back = app
        .get_with_min_position("/webhooks", &token, Some(position))
        .await;
    let (status, body) = problem(held_back).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("not_yet_consistent"))
    );
    // Its own stream is read directly, whatever the transactions around.
    let one = app.get_json(&format!("/webhooks/{endpoint}"), &token).await;
    assert_eq!(one["id"], endpoint.to_string());

    let waiting = app.get_json_after("/webhooks", &token, position);
    let committing = async { older.commit().await.unwrap() };
    let (listed, ()) = tokio::join!(waiting, committing);
    assert_eq!(listed["items"][0]["id"], endpoint.to_string());

    let beyond = app
        .get_with_min_position("/webhooks", &token, Some(position + 1_000_000))
        .await;
    let (status, body) = problem(beyond).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("unknown_position"))
    );
}
