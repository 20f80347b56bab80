use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{PASSWORD, TestApp, position_of, problem, spawn_app};

#[tokio::test]
async fn registering_answers_201_with_the_location_the_id_and_the_position() {
    let app = spawn_app().await;
    let response = app.register("ann@example.com", PASSWORD).await;
    assert_eq!(response.status(), 201);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let position = position_of(&response);
    let body: Value = response.json().await.unwrap();
    let id = body["id"].as_str().unwrap();
    assert_eq!(location, format!("/users/{id}"));
    assert_eq!(body["position"], position);
    assert!(position > 0);
    // The user event, the request of its verification mail and the email reservation, in one
    // append.
    assert_eq!(app.message_count().await, 3);
}

#[tokio::test]
async fn fifty_concurrent_registrations_of_one_email_create_exactly_one_account() {
    let app = spawn_app().await;
    let attempts = (0..50).map(|i| {
        // The same address, written differently: it is one account.
        let email = if i % 2 == 0 {
            "Race@Example.com"
        } else {
            "race@example.COM"
        };
        app.register(email, PASSWORD)
    });
    let responses = futures::future::join_all(attempts).await;
    let mut created = 0;
    let mut conflicts = 0;
    for response in responses {
        match response.status().as_u16() {
            201 => created += 1,
            409 => {
                assert_eq!(problem(response).await["code"], "email_taken");
                conflicts += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!((created, conflicts), (1, 49));
    assert_eq!(app.messages("user").await.len(), 1);
    assert_eq!(app.messages("userEmail").await.len(), 1);
}

/// Ann registered with an id of her choosing: the application, the id, and the body of its
/// 201.
async fn ann_registered_with_her_own_id() -> (TestApp, Uuid, Value) {
    let app = spawn_app().await;
    let id = Uuid::new_v4();
    let first = app.register_with_id("ann@example.com", id).await;
    assert_eq!(first.status(), 201);
    let body = first.json().await.unwrap();
    (app, id, body)
}

#[tokio::test]
async fn repeating_a_registration_with_the_same_id_gives_the_same_answer_and_one_account() {
    let (app, id, first) = ann_registered_with_her_own_id().await;
    let second = app.register_with_id("ann@example.com", id).await;
    assert_eq!(second.status(), 201);
    assert_eq!(
        second.headers()["location"],
        format!("/users/{id}").as_str()
    );
    let second: Value = second.json().await.unwrap();
    assert_eq!(first, second);
    assert_eq!(first["id"], id.to_string());
    assert_eq!(app.message_count().await, 3);
}

#[tokio::test]
async fn the_same_id_with_another_email_is_refused_as_id_taken() {
    let (app, id, _) = ann_registered_with_her_own_id().await;
    let before = app.message_count().await;
    let second = app.register_with_id("bob@example.com", id).await;
    assert_eq!(second.status(), 409);
    assert_eq!(problem(second).await["code"], "id_taken");
    assert_eq!(app.message_count().await, before);
}

#[tokio::test]
async fn an_email_taken_under_another_spelling_is_refused_and_the_store_is_unchanged() {
    let app = spawn_app().await;
    app.user("ann@example.com").await;
    let before = app.message_count().await;
    for spelling in [
        "  ANN@example.com ",
        "Ann@Example.COM",
        // A full-width "ａ", which NFKC folds to ASCII.
        "\u{ff41}nn@example.com",
    ] {
        let response = app.register(spelling, "another password").await;
        assert_eq!(response.status(), 409, "{spelling}");
        assert_eq!(problem(response).await["code"], "email_taken");
    }
    assert_eq!(app.message_count().await, before);
    // A composed and a decomposed "é" are one address too.
    app.user("r\u{e9}my@example.com").await;
    let before = app.message_count().await;
    let response = app
        .register("re\u{301}my@example.com", "another password")
        .await;
    assert_eq!(response.status(), 409);
    assert_eq!(app.message_count().await, before);
}

#[tokio::test]
async fn invalid_utf8_and_very_long_fields_are_refused_and_change_nothing() {
    let app = spawn_app().await;
    let response = app
        .client
        .post(app.url("/users"))
        .header("content-type", "application/json")
        .body(b"{\"email\": \"ann\xff@example.com\", \"password\": \"correct horse\"}".to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400, "invalid UTF-8");
    assert_eq!(problem(response).await["code"], "malformed_json");

    let long = "a".repeat(10_000);
    for (email, password) in [
        (format!("{long}@example.com"), PASSWORD.to_owned()),
        (format!("ann@{long}.com"), PASSWORD.to_owned()),
        ("ann@example.com".to_owned(), "x".repeat(129)),
    ] {
        let response = app.register(&email, &password).await;
        assert_eq!(response.status(), 422);
        assert_eq!(problem(response).await["code"], "validation_failed");
    }
    assert_eq!(app.message_count().await, 0);
}

#[tokio::test]
async fn invalid_fields_are_a_422_that_names_each_field() {
    let app = spawn_app().await;
    let response = app.register("not an email", "short").await;
    assert_eq!(response.status(), 422);
    let body = problem(response).await;
    assert_eq!(body["code"], "validation_failed");
    let fields: Vec<_> = body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|error| error["field"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(fields, ["email", "password"]);
    assert_eq!(app.message_count().await, 0);
}

#[tokio::test]
async fn unknown_fields_missing_fields_and_wrong_types_are_a_422() {
    let app = spawn_app().await;
    for body in [
        json!({ "email": "ann@example.com", "password": PASSWORD, "role": "admin" }),
        json!({ "email": "ann@example.com" }),
        json!({ "email": "ann@example.com", "password": 12345678 }),
        json!({ "email": "ann@example.com", "password": PASSWORD, "id": "not-a-uuid" }),
    ] {
        let response = app.post("/users", body.clone()).await;
        assert_eq!(response.status(), 422, "{body}");
        assert_eq!(problem(response).await["code"], "validation_failed");
    }
    assert_eq!(app.message_count().await, 0);
}

#[tokio::test]
async fn malformed_json_is_400_a_wrong_content_type_415_and_an_oversized_body_413() {
    let app = spawn_app().await;
    let send = |content_type: &'static str, body: String| {
        app.client
            .post(app.url("/users"))
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let response = send("application/json", "{\"email\": ".into())
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(problem(response).await["code"], "malformed_json");

    let response = send("text/plain", "{}".into()).await.unwrap();
    assert_eq!(response.status(), 415);
    assert_eq!(problem(response).await["code"], "unsupported_media_type");

    let huge = json!({ "email": "ann@example.com", "password": "x".repeat(20 * 1024) });
    let response = send("application/json", huge.to_string()).await.unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(problem(response).await["code"], "payload_too_large");

    for path in [
        "/login",
        "/users/00000000-0000-0000-0000-000000000001/password",
    ] {
        let response = app
            .client
            .post(app.url(path))
            .header("content-type", "application/json")
            .body("{")
            .send()
            .await
            .unwrap();
        assert!([400, 401].contains(&response.status().as_u16()), "{path}");
    }
    assert_eq!(app.message_count().await, 0);
}

#[tokio::test]
async fn accounts_start_pending_when_so_configured_and_cannot_log_in_until_activated() {
    let app = crate::helpers::spawn_with(|settings| {
        settings.registration.mode = command_api::settings::RegistrationMode::Approval;
    })
    .await;
    let admin = app.admin_token().await;
    let id = app.user("ann@example.com").await;
    assert_eq!(app.login("ann@example.com", PASSWORD).await.status(), 401);
    assert_eq!(app.activate(&id, &admin).await.status(), 200);
    assert_eq!(app.login("ann@example.com", PASSWORD).await.status(), 200);
}
