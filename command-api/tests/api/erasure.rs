//! Erasure (ADR 13): `DELETE /users/{id}` by the person with their password or by an
//! administrator; afterwards the address answers like one never registered and is free again,
//! the account refuses everything, and no stored row holds a trace of the address. Every
//! personal field is stored sealed, and a rotation of the master key keeps every account
//! readable.

use std::collections::BTreeSet;
use std::sync::Arc;

use base64::Engine;
use identity::{Personal, RecoveryEvent, UserEvent};
use message_store::{ExpectedVersion, NewMessage, StreamAppend, StreamName};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::helpers::{PASSWORD, TestApp, position_of, problem, spawn_app, spawn_on, spawn_with};

/// `DELETE /users/{id}` with `token`, and `body` as JSON if there is one.
async fn erase(app: &TestApp, id: &str, token: &str, body: Option<Value>) -> reqwest::Response {
    let request = app
        .client
        .delete(app.url(&format!("/users/{id}")))
        .bearer_auth(token);
    let request = match body {
        Some(body) => request.json(&body),
        None => request,
    };
    request.send().await.unwrap()
}

/// The person's own erasure, with their password.
async fn erase_own(app: &TestApp, id: &str, token: &str) -> reqwest::Response {
    erase(app, id, token, Some(json!({ "password": PASSWORD }))).await
}

/// What a login with an address nobody registered answers: status and body.
async fn unknown_address_answer(app: &TestApp) -> (u16, Value) {
    let response = app.login("nobody-ever@example.com", PASSWORD).await;
    (response.status().as_u16(), response.json().await.unwrap())
}

/// Registers `email` and logs in: the account's id and the login's body (both tokens).
async fn signed_in(app: &TestApp, email: &str) -> (String, Value) {
    let id = app.user(email).await;
    (id, app.login_body(email, PASSWORD).await)
}

fn access(login: &Value) -> &str {
    login["access_token"].as_str().unwrap()
}

fn refresh(login: &Value) -> &str {
    login["refresh_token"].as_str().unwrap()
}

/// Whether the access token of `login` is refused by a route that checks its session.
async fn access_refused(app: &TestApp, login: &Value) -> bool {
    let response = app
        .post_as("/users/me/verify-email", access(login), json!({}))
        .await;
    response.status() == 401 && problem(response).await["code"] == "invalid_token"
}

/// The personal key row of `id`: whether it holds a wrapped key, and whether it is erased.
async fn key_row(app: &TestApp, id: &str) -> Option<(bool, bool)> {
    let pool = app.database.pool().await;
    let row: Option<(bool, bool)> = sqlx::query_as(
        "SELECT wrapped_key IS NOT NULL, erased_at IS NOT NULL FROM personal_keys \
         WHERE person_id = $1",
    )
    .bind(id.parse::<Uuid>().unwrap())
    .fetch_optional(&pool)
    .await
    .unwrap();
    pool.close().await;
    row
}

/// Every stored row as text: each message's stream, type, data and metadata, and each personal
/// key row, as a dump of the database would show them.
pub(crate) async fn stored_rows(app: &TestApp) -> String {
    let pool = app.database.pool().await;
    let messages: Vec<(String,)> = sqlx::query_as(
        "SELECT concat_ws(' ', stream_name, type, data::text, metadata::text) FROM messages",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let keys: Vec<(String,)> = sqlx::query_as(
        "SELECT concat_ws(' ', person_id::text, encode(wrapped_key, 'hex'), master_key_id, \
         erased_at::text) FROM personal_keys",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    messages
        .into_iter()
        .chain(keys)
        .map(|(row,)| row)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The forms of `address` a dump must not hold: as typed, normalised, their SHA-256 and the
/// base64 of each of these.
pub(crate) fn traces_of(address: &str) -> Vec<String> {
    let mut plain = vec![address.to_owned(), address.to_lowercase()];
    plain.extend(
        plain
            .clone()
            .iter()
            .map(|form| hex::encode(Sha256::digest(form.as_bytes()))),
    );
    let engines = [
        base64::engine::general_purpose::STANDARD,
        base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ];
    let mut traces = plain.clone();
    for form in &plain {
        for engine in &engines {
            traces.push(engine.encode(form.as_bytes()));
        }
    }
    traces
}

/// The accounts the store holds as registered (not erased) with `address`, by id: from every
/// user stream, opened and folded as the service folds them.
async fn live_accounts_with(app: &TestApp, address: &str) -> BTreeSet<String> {
    let pool = app.database.pool().await;
    let rows: Vec<(String, String, Value, Value)> = sqlx::query_as(
        "SELECT stream_name, type, data, metadata FROM messages WHERE category = 'user' \
         ORDER BY global_position",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    let mut accounts = std::collections::BTreeMap::<String, identity::UserAccount>::new();
    for (stream, kind, mut data, metadata) in rows {
        app.unseal(&mut data).await;
        let version = identity::event_version(&metadata).unwrap();
        let event = UserEvent::from_stored(&kind, version, &data).unwrap();
        let account = accounts.entry(stream).or_default();
        *account = identity::evolve(std::mem::take(account), &event);
    }
    accounts
        .values()
        .filter_map(identity::UserAccount::account)
        .filter(|account| account.email_normalized == address.to_lowercase())
        .map(|account| account.id.to_string())
        .collect()
}

#[tokio::test]
async fn a_person_erases_their_own_account_with_their_password_and_the_address_is_as_if_never_registered()
 {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let (ann, login) = signed_in(&app, "ann@example.com").await;
    let unknown = unknown_address_answer(&app).await;

    let response = erase_own(&app, &ann, access(&login)).await;
    assert_eq!(response.status(), 204);
    assert_eq!(
        position_of(&response),
        u64::try_from(app.last_position().await).unwrap()
    );
    let Some(UserEvent::UserErased(erased)) = app.user_events().await.pop() else {
        panic!("no UserErased last");
    };
    assert_eq!(erased.erased_by.to_string(), ann);
    let reservations = app.messages("userEmail").await;
    let (kind, data, _) = reservations.last().unwrap();
    assert_eq!(
        (kind.as_str(), data["user_id"].as_str()),
        ("EmailReleased", Some(ann.as_str()))
    );

    // Logging in with the address answers exactly as with one never registered.
    let response = app.login("ann@example.com", PASSWORD).await;
    let answer = (response.status().as_u16(), response.json().await.unwrap());
    assert_eq!(answer, unknown);
    // The session it had is over: its access token and its refresh token alike.
    assert!(access_refused(&app, &login).await);
    let response = app.refresh(refresh(&login)).await;
    assert_eq!(problem(response).await["code"], "invalid_refresh_token");

    // The address is free: it registers again, as a new account.
    let (again, again_login) = signed_in(&app, "Ann@Example.com").await;
    assert_ne!(again, ann);
    assert_eq!(app.id_of_token(access(&again_login)), again);
    // The old id stays erased: an administrator's commands on it find no account, a repeated
    // erasure says it is gone, and a registration retried with it is another account's id.
    for path in ["activate", "deactivate"] {
        let response = app
            .post_as(&format!("/users/{ann}/{path}"), &admin, json!({}))
            .await;
        assert_eq!(response.status(), 404, "{path}");
        assert_eq!(problem(response).await["code"], "not_found");
    }
    let response = app
        .delete_as(&format!("/users/{ann}/sessions"), &admin)
        .await;
    assert_eq!(response.status(), 404);
    let response = erase(&app, &ann, &admin, None).await;
    assert_eq!(response.status(), 410);
    assert_eq!(problem(response).await["code"], "account_erased");
    let response = app
        .register_with_id("someone@example.com", ann.parse().unwrap())
        .await;
    assert_eq!(response.status(), 409);
    assert_eq!(problem(response).await["code"], "id_taken");
    assert_eq!(
        live_accounts_with(&app, "ann@example.com").await,
        BTreeSet::from([again])
    );
}

#[tokio::test]
async fn an_administrator_erases_an_account_without_its_password() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let (bob, login) = signed_in(&app, "bob@example.com").await;
    let response = erase(&app, &bob, &admin, None).await;
    assert_eq!(response.status(), 204);
    let Some(UserEvent::UserErased(erased)) = app.user_events().await.pop() else {
        panic!("no UserErased last");
    };
    assert_eq!(erased.erased_by.to_string(), app.id_of_token(&admin));
    assert!(access_refused(&app, &login).await);
    assert_eq!(key_row(&app, &bob).await, Some((false, true)));
    assert_eq!(app.login("bob@example.com", PASSWORD).await.status(), 401);
}

#[tokio::test]
async fn after_an_erasure_no_stored_row_holds_a_trace_of_the_address_and_its_key_is_a_tombstone() {
    let app = spawn_app().await;
    let address = "Ann.Unmistakable-7f3e@Example.com";
    let (ann, login) = signed_in(&app, address).await;
    // More personal data: a new password, a reset asked for, a change of email asked for.
    let response = app
        .change_password(&ann, access(&login), PASSWORD, "another long password")
        .await;
    assert_eq!(response.status(), 200);
    let login = app.login_body(address, "another long password").await;
    let response = app
        .post("/password-reset", json!({ "email": address }))
        .await;
    assert_eq!(response.status(), 202);
    let response = app
        .post_as(
            "/users/me/email",
            access(&login),
            json!({ "email": "ann.next-7f3e@example.com", "password": "another long password" }),
        )
        .await;
    assert_eq!(response.status(), 202);
    assert_eq!(key_row(&app, &ann).await, Some((true, false)));
    let traces = traces_of(address);
    // Sealed already: nothing of the address in clear, but it opens with the key.
    let rows = stored_rows(&app).await;
    for trace in &traces {
        assert!(!rows.contains(trace.as_str()), "{trace} stored in clear");
    }
    let Some(UserEvent::UserRegistered(registered)) = app.user_events().await.into_iter().next()
    else {
        panic!("no registration");
    };
    assert_eq!(
        registered
            .email
            .known()
            .map(|email| email.as_str().to_owned()),
        Some(address.to_owned())
    );

    let response = erase(
        &app,
        &ann,
        access(&login),
        Some(json!({ "password": "another long password" })),
    )
    .await;
    assert_eq!(response.status(), 204);
    let rows = stored_rows(&app).await;
    for trace in traces.iter().chain(&traces_of("ann.next-7f3e@example.com")) {
        assert!(!rows.contains(trace.as_str()), "{trace} left in a row");
    }
    assert_eq!(key_row(&app, &ann).await, Some((false, true)));
    // What was sealed for Ann reads as erased now, the facts around it stay.
    let Some(UserEvent::UserRegistered(registered)) = app.user_events().await.into_iter().next()
    else {
        panic!("no registration");
    };
    assert_eq!(registered.email, Personal::Erased);
    assert_eq!(registered.password_hash, Personal::Erased);
    let recovery: Vec<_> = app
        .unsealed_messages("userRecovery")
        .await
        .into_iter()
        .map(|(kind, data, metadata)| {
            let version = identity::event_version(&metadata).unwrap();
            RecoveryEvent::from_stored(&kind, version, &data).unwrap()
        })
        .collect();
    assert!(recovery.len() >= 3, "{recovery:?}");
    for event in recovery {
        if let RecoveryEvent::RecoveryRequested(requested) = event {
            assert_eq!(requested.to, Personal::Erased);
            assert_eq!(requested.new_email, None);
        }
    }
}

#[tokio::test]
async fn every_personal_field_of_a_stored_user_or_recovery_message_is_an_envelope_for_its_account()
{
    let app = spawn_app().await;
    let (ann, login) = signed_in(&app, "ann@example.com").await;
    let response = app
        .change_password(&ann, access(&login), PASSWORD, "another long password")
        .await;
    assert_eq!(response.status(), 200);
    app.post("/password-reset", json!({ "email": "ann@example.com" }))
        .await;
    let mut checked = 0;
    for category in ["user", "userRecovery"] {
        for (kind, raw, metadata) in app.messages(category).await {
            let mut data = raw.clone();
            app.unseal(&mut data).await;
            let version = identity::event_version(&metadata).unwrap();
            let fields = match category {
                "user" => UserEvent::from_stored(&kind, version, &data)
                    .unwrap()
                    .personal_fields(),
                _ => RecoveryEvent::from_stored(&kind, version, &data)
                    .unwrap()
                    .personal_fields(),
            };
            for field in fields {
                let value = &raw[field];
                if value.is_null() {
                    continue;
                }
                assert!(
                    personal_data::is_envelope(value),
                    "{kind}.{field} is stored in clear"
                );
                assert_eq!(value["sealed_for"], ann.as_str());
                checked += 1;
            }
            let text = raw.to_string();
            assert!(!text.contains("ann@example.com") && !text.contains("$argon2"));
        }
    }
    // The registration's three fields, the new password, and each recovery request's.
    assert!(checked >= 6, "only {checked} sealed fields");
    let pool = app.database.pool().await;
    let streams: Vec<(String,)> =
        sqlx::query_as("SELECT DISTINCT stream_name FROM messages WHERE category = 'userEmail'")
            .fetch_all(&pool)
            .await
            .unwrap();
    pool.close().await;
    let keyed = format!("userEmail-{}", app.lookup_key().digest("ann@example.com"));
    assert_eq!(streams, [(keyed,)]);
}

#[tokio::test]
async fn a_refused_erasure_appends_nothing_and_says_why() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let (ann, ann_login) = signed_in(&app, "ann@example.com").await;
    let (bob, _) = signed_in(&app, "bob@example.com").await;
    let (gone, gone_login) = signed_in(&app, "gone@example.com").await;
    assert_eq!(
        erase_own(&app, &gone, access(&gone_login)).await.status(),
        204
    );
    let ann_token = access(&ann_login);
    let before = app.last_position().await;
    let cases: Vec<(&str, reqwest::Response, u16, &str)> = vec![
        (
            "an unknown id",
            erase(&app, &Uuid::new_v4().to_string(), &admin, None).await,
            404,
            "not_found",
        ),
        (
            "not an id",
            erase(&app, "not-a-uuid", &admin, None).await,
            404,
            "not_found",
        ),
        (
            "an account erased already",
            erase(&app, &gone, &admin, None).await,
            410,
            "account_erased",
        ),
        (
            "another person's account without the admin role",
            erase_own(&app, &bob, ann_token).await,
            403,
            "forbidden",
        ),
        (
            "one's own without the password",
            erase(&app, &ann, ann_token, None).await,
            422,
            "validation_failed",
        ),
        (
            "one's own with an empty body",
            erase(&app, &ann, ann_token, Some(json!({}))).await,
            422,
            "validation_failed",
        ),
        (
            "an unknown field",
            erase(
                &app,
                &ann,
                ann_token,
                Some(json!({ "password": PASSWORD, "why": "x" })),
            )
            .await,
            422,
            "validation_failed",
        ),
        (
            "no token",
            app.client
                .delete(app.url(&format!("/users/{ann}")))
                .json(&json!({ "password": PASSWORD }))
                .send()
                .await
                .unwrap(),
            401,
            "invalid_token",
        ),
        (
            "malformed JSON",
            app.client
                .delete(app.url(&format!("/users/{ann}")))
                .bearer_auth(ann_token)
                .header("content-type", "application/json")
                .body("{\"password\": ")
                .send()
                .await
                .unwrap(),
            400,
            "malformed_json",
        ),
    ];
    for (case, response, status, code) in cases {
        assert_eq!(response.status(), status, "{case}");
        let body = problem(response).await;
        if status == 400 {
            assert_eq!(body["status"], 400, "{case}");
        } else {
            assert_eq!(body["code"], code, "{case}");
        }
        if case == "one's own without the password" {
            assert_eq!(body["errors"][0]["field"], "password");
        }
    }
    assert_eq!(app.last_position().await, before);

    // A wrong password is refused and counted as a failed login, nothing else is written.
    let response = erase(
        &app,
        &ann,
        ann_token,
        Some(json!({ "password": "wrong guess" })),
    )
    .await;
    assert_eq!(response.status(), 401);
    assert_eq!(problem(response).await["code"], "invalid_credentials");
    let pool = app.database.pool().await;
    let written: Vec<(String, String)> =
        sqlx::query_as("SELECT category, type FROM messages WHERE global_position > $1")
            .bind(before)
            .fetch_all(&pool)
            .await
            .unwrap();
    pool.close().await;
    assert_eq!(
        written,
        [("userLogin".to_owned(), "LoginFailed".to_owned())]
    );
    assert_eq!(key_row(&app, &ann).await, Some((true, false)));
    assert_eq!(app.login("ann@example.com", PASSWORD).await.status(), 200);
}

#[tokio::test]
async fn wrong_passwords_given_to_an_erasure_lock_the_account_like_failed_logins() {
    let app = spawn_with(|settings| settings.login.max_failures = 3).await;
    let (ann, login) = signed_in(&app, "ann@example.com").await;
    for _ in 0..3 {
        let response = erase(
            &app,
            &ann,
            access(&login),
            Some(json!({ "password": "wrong" })),
        )
        .await;
        assert_eq!(response.status(), 401);
    }
    // Locked: even the right password erases nothing, and logs in nowhere.
    let response = erase_own(&app, &ann, access(&login)).await;
    assert_eq!(response.status(), 401);
    assert_eq!(problem(response).await["code"], "invalid_credentials");
    assert_eq!(app.login("ann@example.com", PASSWORD).await.status(), 401);
    assert!(
        app.user_events()
            .await
            .iter()
            .all(|event| !matches!(event, UserEvent::UserErased(_)))
    );
}

#[tokio::test]
async fn the_last_active_administrator_cannot_be_erased_but_another_can() {
    let app = spawn_app().await;
    let ann = app.admin_token_for("ann@example.com").await;
    let ann_id = app.id_of_token(&ann);
    // An administrator erasing themself proves the password like anyone.
    let response = erase(&app, &ann_id, &ann, None).await;
    assert_eq!(response.status(), 422);
    let before = app.last_position().await;
    let response = erase_own(&app, &ann_id, &ann).await;
    assert_eq!(response.status(), 409);
    assert_eq!(problem(response).await["code"], "last_administrator");
    assert_eq!(app.last_position().await, before);

    let bob = app.admin_token_for("bob@example.com").await;
    let bob_id = app.id_of_token(&bob);
    assert_eq!(erase(&app, &bob_id, &ann, None).await.status(), 204);
    assert_eq!(
        app.active_administrators().await,
        BTreeSet::from([ann_id.clone()])
    );
    let carl = app.admin_token_for("carl@example.com").await;
    assert_eq!(erase_own(&app, &ann_id, &ann).await.status(), 204);
    assert_eq!(
        app.active_administrators().await,
        BTreeSet::from([app.id_of_token(&carl)])
    );
}

#[tokio::test]
async fn an_erasure_that_stopped_before_deleting_the_key_is_finished_by_an_administrator_asking_again()
 {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let (ann, _) = signed_in(&app, "ann@example.com").await;
    // The erasure's append, as a process that died before deleting the key left it.
    let id: identity::UserId = ann.parse().unwrap();
    let erased = UserEvent::from(identity::UserErased {
        erased_by: id,
        at: {
            use platform::clock::Clock;
            app.clock.now()
        },
    });
    let stream = StreamName::parse(identity::user_stream_name(id)).unwrap();
    app.state
        .commands
        .store
        .append(vec![StreamAppend::new(
            stream,
            // Ann's stream holds her registration only.
            ExpectedVersion::Exact(0),
            vec![
                NewMessage::new(erased.event_type(), erased.to_json())
                    .with_metadata(json!({ identity::EVENT_VERSION_KEY: erased.version() })),
            ],
        )])
        .await
        .unwrap();
    assert_eq!(key_row(&app, &ann).await, Some((true, false)));
    let before = app.last_position().await;

    let response = erase(&app, &ann, &admin, None).await;
    assert_eq!(response.status(), 410);
    assert_eq!(app.last_position().await, before);
    assert_eq!(key_row(&app, &ann).await, Some((false, true)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_racing_an_erasure_succeed_before_it_or_are_refused_like_an_unknown_address() {
    const ROUNDS: usize = 4;
    const LOGINS: usize = 24;
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let unknown = unknown_address_answer(&app).await;
    let (mut granted, mut refused) = (0, 0);
    for round in 0..ROUNDS {
        let address = format!("racer{round}@example.com");
        let id = app.user(&address).await;
        let logins = (0..LOGINS).map(|_| app.login(&address, PASSWORD));
        let erasure = erase(&app, &id, &admin, None);
        let (responses, erased) = tokio::join!(futures::future::join_all(logins), erasure);
        assert_eq!(erased.status(), 204);
        for response in responses {
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap();
            match status {
                200 => {
                    granted += 1;
                    // Whatever session it opened is over now.
                    assert!(
                        access_refused(&app, &body).await,
                        "a session outlived the erasure"
                    );
                    let refreshed = app.refresh(refresh(&body)).await;
                    assert_eq!(refreshed.status(), 401);
                }
                401 => {
                    refused += 1;
                    assert_eq!((status, body), unknown);
                }
                other => panic!("a login racing an erasure answered {other}: {body}"),
            }
        }
        assert_eq!(app.login(&address, PASSWORD).await.status(), 401);
    }
    println!("logins racing erasures: {granted} granted, {refused} refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_racing_the_erasure_of_their_address_leave_it_held_by_at_most_one_account() {
    const ROUNDS: usize = 6;
    const REGISTRATIONS: usize = 6;
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let mut won_total = 0;
    for round in 0..ROUNDS {
        let address = format!("contested{round}@example.com");
        let old = app.user(&address).await;
        let registrations =
            (0..REGISTRATIONS).map(|_| app.register_with_id(&address, Uuid::now_v7()));
        let erasure = erase(&app, &old, &admin, None);
        let (responses, erased) = tokio::join!(futures::future::join_all(registrations), erasure);
        assert_eq!(erased.status(), 204);
        let mut winners = BTreeSet::new();
        for response in responses {
            match response.status().as_u16() {
                201 => {
                    let body: Value = response.json().await.unwrap();
                    winners.insert(body["id"].as_str().unwrap().to_owned());
                }
                409 => assert_eq!(problem(response).await["code"], "email_taken"),
                other => panic!("a registration racing an erasure answered {other}"),
            }
        }
        assert!(winners.len() <= 1, "{winners:?}");
        assert_eq!(live_accounts_with(&app, &address).await, winners);
        // The address logs in to the one that won, or to nobody.
        let response = app.login(&address, PASSWORD).await;
        match winners.first() {
            Some(winner) => {
                assert_eq!(response.status(), 200);
                let body: Value = response.json().await.unwrap();
                assert_eq!(&app.id_of_token(access(&body)), winner);
                won_total += 1;
            }
            None => {
                assert_eq!(response.status(), 401);
                // Free: it registers now.
                app.user(&address).await;
            }
        }
    }
    println!("registrations that won the address back: {won_total} of {ROUNDS} rounds");
}

#[tokio::test]
async fn a_rotation_of_the_master_key_keeps_every_account_able_to_log_in() {
    let first = spawn_app().await;
    first.user("ann@example.com").await;
    let key_a = first.settings.personal_data.master_key.clone().unwrap();
    let id_a = first.settings.personal_data.master_key_id.clone();
    let count = |app: &TestApp| {
        let vault = Arc::clone(app.state.commands.sealer.vault());
        async move { vault.count_by_master_key().await.unwrap().by_master_key }
    };
    assert_eq!(count(&first).await, [(id_a.clone(), 1)]);

    // B is current, A retired: Ann's key is still read, and a new account's is wrapped by B.
    let key_b = personal_data::MasterKey::generate("test-2").unwrap();
    let mut rotated = first.settings.clone();
    rotated.personal_data.master_key_id = "test-2".into();
    rotated.personal_data.master_key = Some(key_b.to_hex().expose_secret().clone());
    rotated.personal_data.retired_master_keys = Some(format!("{id_a}:{key_a}"));
    let second = spawn_on(
        Arc::clone(&first.database),
        rotated.clone(),
        first.clock.clone(),
    )
    .await;
    assert_eq!(
        second.login("ann@example.com", PASSWORD).await.status(),
        200
    );
    second.user("bob@example.com").await;
    assert_eq!(
        count(&second).await,
        [(id_a.clone(), 1), ("test-2".to_owned(), 1)]
    );
    let rewrapped = second.state.commands.sealer.vault().rewrap().await.unwrap();
    assert_eq!(rewrapped, 1);
    assert_eq!(count(&second).await, [("test-2".to_owned(), 2)]);

    // Only B now: everyone still logs in.
    let mut only_b = rotated;
    only_b.personal_data.retired_master_keys = None;
    let third = spawn_on(Arc::clone(&first.database), only_b, first.clock.clone()).await;
    for address in ["ann@example.com", "bob@example.com"] {
        assert_eq!(
            third.login(address, PASSWORD).await.status(),
            200,
            "{address}"
        );
    }
}
