//! Account recovery through the command API (ADR 12): registration modes, verification,
//! password reset and change of email, each confirmed with the link the mailer would write.
//!
//! The mailer is not running here: a test derives a link's token from the request's event in
//! the store with the mail token key, exactly as the mailer does (`tokens::LinkToken`). That the
//! mails really go out with those links is tested end to end with a real SMTP server in the
//! root package's `tests/recovery_by_mail.rs`.

use chrono::TimeDelta;
use command_api::settings::RegistrationMode;
use identity::{RecoveryEvent, RecoveryKind};
use serde_json::{Value, json};
use tokens::{LinkToken, MailTokenKey};
use uuid::Uuid;

use crate::helpers::{PASSWORD, TestApp, claims_of, position_of, problem, spawn_with};

const NEW_PASSWORD: &str = "a brand new passphrase";

/// A service in `mode` whose recovery answers wait 20 ms (the timing tests set their own).
async fn spawn_in(mode: RegistrationMode) -> TestApp {
    spawn_with(|settings| {
        settings.registration.mode = mode;
        settings.mail.answer_after_ms = 20;
    })
    .await
}

/// Every recovery event in the store with its account, oldest first.
async fn recovery_events(app: &TestApp) -> Vec<(Uuid, RecoveryEvent)> {
    let pool = app.database.pool().await;
    let rows: Vec<(String, String, Value, Value)> = sqlx::query_as(
        "SELECT stream_name, type, data, metadata FROM messages WHERE category = 'userRecovery' \
         ORDER BY global_position",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    let mut events = Vec::new();
    for (stream, kind, mut data, metadata) in rows {
        app.unseal(&mut data).await;
        events.push((stream, kind, data, metadata));
    }
    events
        .into_iter()
        .map(|(stream, kind, data, metadata)| {
            let account = stream
                .strip_prefix("userRecovery-")
                .unwrap()
                .parse()
                .unwrap();
            let version = identity::event_version(&metadata).unwrap();
            (
                account,
                RecoveryEvent::from_stored(&kind, version, &data).unwrap(),
            )
        })
        .collect()
}

/// The requests of `kind` recorded so far, oldest first, with their accounts.
async fn requests(app: &TestApp, kind: RecoveryKind) -> Vec<(Uuid, identity::RecoveryRequested)> {
    recovery_events(app)
        .await
        .into_iter()
        .filter_map(|(account, event)| match event {
            RecoveryEvent::RecoveryRequested(request) if request.kind == kind => {
                Some((account, request))
            }
            _ => None,
        })
        .collect()
}

/// The token of the link the mailer writes for the last request of `kind`.
async fn last_link(app: &TestApp, kind: RecoveryKind) -> String {
    let (account, request) = requests(app, kind).await.pop().expect("no request");
    link_for(app, kind, account, &request)
}

fn link_for(
    app: &TestApp,
    kind: RecoveryKind,
    account: Uuid,
    request: &identity::RecoveryRequested,
) -> String {
    let key = MailTokenKey::from_hex(app.settings.mail.token_key.as_deref().unwrap()).unwrap();
    let token = LinkToken::issue(&key, kind.name(), account, request.nonce.as_bytes()).unwrap();
    token.text().expose_secret().clone()
}

async fn verify(app: &TestApp, token: &str) -> reqwest::Response {
    app.post("/users/verify-email", json!({ "token": token }))
        .await
}

async fn ask_reset(app: &TestApp, email: &str) -> reqwest::Response {
    app.post("/password-reset", json!({ "email": email })).await
}

async fn confirm_reset(app: &TestApp, token: &str, password: &str) -> reqwest::Response {
    app.post(
        "/password-reset/confirm",
        json!({ "token": token, "password": password }),
    )
    .await
}

async fn ask_change(app: &TestApp, token: &str, email: &str, password: &str) -> reqwest::Response {
    app.post_as(
        "/users/me/email",
        token,
        json!({ "email": email, "password": password }),
    )
    .await
}

async fn confirm_change(app: &TestApp, token: &str) -> reqwest::Response {
    app.post("/email-change/confirm", json!({ "token": token }))
        .await
}

/// The one 400 every link that does not confirm gets.
async fn assert_invalid_link(response: reqwest::Response) -> Value {
    assert_eq!(response.status(), 400);
    let body = problem(response).await;
    assert_eq!(body["code"], "invalid_link");
    body
}

#[tokio::test]
async fn in_open_mode_a_registration_is_active_at_once_and_its_address_verified_by_its_link() {
    let app = spawn_in(RegistrationMode::Open).await;
    let id = app.user("ann@example.com").await;
    let token = app.token("ann@example.com", PASSWORD).await;
    assert_eq!(claims_of(&token)["email_verified"], false);

    let requested = requests(&app, RecoveryKind::VerifyEmail).await;
    assert_eq!(requested.len(), 1);
    assert_eq!(requested[0].0.to_string(), id);
    assert_eq!(
        requested[0].1.to.known().unwrap().as_str(),
        "ann@example.com"
    );

    let link = last_link(&app, RecoveryKind::VerifyEmail).await;
    let response = verify(&app, &link).await;
    assert_eq!(response.status(), 204);
    assert!(position_of(&response) > 0);
    let token = app.token("ann@example.com", PASSWORD).await;
    assert_eq!(claims_of(&token)["email_verified"], true);
    // Used once.
    assert_invalid_link(verify(&app, &link).await).await;
}

#[tokio::test]
async fn in_verify_mode_an_account_logs_in_only_once_its_link_is_confirmed() {
    let app = spawn_in(RegistrationMode::Verify).await;
    let response = app.register("ann@example.com", PASSWORD).await;
    assert_eq!(response.status(), 202);
    assert!(response.headers().get("x-position").is_none());
    assert_eq!(app.login("ann@example.com", PASSWORD).await.status(), 401);

    let link = last_link(&app, RecoveryKind::VerifyEmail).await;
    assert_eq!(verify(&app, &link).await.status(), 204);
    let token = app.token("ann@example.com", PASSWORD).await;
    assert_eq!(claims_of(&token)["email_verified"], true);
}

#[tokio::test]
async fn in_verify_mode_a_taken_address_gets_the_same_answer_and_its_owner_a_notice() {
    let app = spawn_in(RegistrationMode::Verify).await;
    let (ann, bob) = (Uuid::now_v7(), Uuid::now_v7());
    let first = app.register_with_id("ann@example.com", ann).await;
    assert_eq!(first.status(), 202);
    // Ann confirms; then someone registers her address again.
    let link = last_link(&app, RecoveryKind::VerifyEmail).await;
    assert_eq!(verify(&app, &link).await.status(), 204);
    let second = app.register_with_id("Ann@Example.com", bob).await;
    assert_eq!(second.status(), 202);

    let (first, second): (Value, Value) =
        (first.json().await.unwrap(), second.json().await.unwrap());
    assert_eq!(first["id"], ann.to_string());
    assert_eq!(second["id"], bob.to_string());
    let without_id = |mut body: Value| {
        body.as_object_mut().unwrap().remove("id");
        body
    };
    assert_eq!(without_id(first), without_id(second));

    let notices: Vec<_> = recovery_events(&app)
        .await
        .into_iter()
        .filter(|(_, event)| matches!(event, RecoveryEvent::RegistrationAttempted(_)))
        .collect();
    assert_eq!(notices.len(), 1);
    assert_eq!(notices[0].0, ann);
    // Bob's registration created nothing; Ann still logs in with her password.
    assert_eq!(app.user_events().await.len(), 3);
    assert_eq!(app.login("ann@example.com", PASSWORD).await.status(), 200);
}

#[tokio::test]
async fn in_verify_mode_registering_again_before_confirming_sends_a_new_link_that_replaces_the_first()
 {
    let app = spawn_in(RegistrationMode::Verify).await;
    app.register("ann@example.com", PASSWORD).await;
    let first = last_link(&app, RecoveryKind::VerifyEmail).await;
    assert_eq!(
        app.register("ann@example.com", PASSWORD).await.status(),
        202
    );
    let second = last_link(&app, RecoveryKind::VerifyEmail).await;
    assert_ne!(first, second);
    assert_invalid_link(verify(&app, &first).await).await;
    assert_eq!(verify(&app, &second).await.status(), 204);
}

#[tokio::test]
async fn in_approval_mode_a_confirmed_address_still_waits_for_an_administrator() {
    let app = spawn_in(RegistrationMode::Approval).await;
    let id = app.user("ann@example.com").await;
    let link = last_link(&app, RecoveryKind::VerifyEmail).await;
    assert_eq!(verify(&app, &link).await.status(), 204);
    assert_eq!(app.login("ann@example.com", PASSWORD).await.status(), 401);
    let admin = app.admin_token().await;
    assert_eq!(app.activate(&id, &admin).await.status(), 200);
    let token = app.token("ann@example.com", PASSWORD).await;
    assert_eq!(claims_of(&token)["email_verified"], true);
}

#[tokio::test]
async fn a_reset_sets_the_password_ends_every_session_and_lifts_a_lockout() {
    let app = spawn_with(|settings| {
        settings.mail.answer_after_ms = 20;
        settings.login.max_failures = 3;
    })
    .await;
    app.user("ann@example.com").await;
    let session = app.login_body("ann@example.com", PASSWORD).await;
    for _ in 0..3 {
        app.login("ann@example.com", "a wrong guess").await;
    }
    assert_eq!(app.login("ann@example.com", PASSWORD).await.status(), 401);

    let response = ask_reset(&app, "ann@example.com").await;
    assert_eq!(response.status(), 202);
    let link = last_link(&app, RecoveryKind::ResetPassword).await;
    let response = confirm_reset(&app, &link, NEW_PASSWORD).await;
    assert_eq!(response.status(), 204);
    assert!(position_of(&response) > 0);

    assert_eq!(app.login("ann@example.com", PASSWORD).await.status(), 401);
    assert_eq!(
        app.login("ann@example.com", NEW_PASSWORD).await.status(),
        200
    );
    let refresh_token = session["refresh_token"].as_str().unwrap();
    assert_eq!(app.refresh(refresh_token).await.status(), 401);
    assert_invalid_link(confirm_reset(&app, &link, "yet another passphrase").await).await;
}

#[tokio::test]
async fn a_reset_with_a_weak_password_is_refused_and_leaves_the_link_usable() {
    let app = spawn_in(RegistrationMode::Open).await;
    app.user("ann@example.com").await;
    ask_reset(&app, "ann@example.com").await;
    let link = last_link(&app, RecoveryKind::ResetPassword).await;
    assert_eq!(confirm_reset(&app, &link, "short").await.status(), 422);
    assert_eq!(confirm_reset(&app, &link, NEW_PASSWORD).await.status(), 204);
}

#[tokio::test]
async fn a_reset_is_mailed_only_to_a_known_active_account_and_answered_alike_for_every_address() {
    let app = spawn_in(RegistrationMode::Open).await;
    app.user("ann@example.com").await;
    let gone = app.user("gone@example.com").await;
    let admin = app.admin_token().await;
    assert_eq!(app.deactivate(&gone, &admin).await.status(), 200);

    let mut bodies = vec![];
    for email in ["ann@example.com", "nobody@example.com", "gone@example.com"] {
        let response = ask_reset(&app, email).await;
        assert_eq!(response.status(), 202, "{email}");
        assert!(response.headers().get("x-position").is_none());
        bodies.push(response.text().await.unwrap());
    }
    assert!(
        bodies.windows(2).all(|pair| pair[0] == pair[1]),
        "{bodies:?}"
    );
    let requested = requests(&app, RecoveryKind::ResetPassword).await;
    assert_eq!(requested.len(), 1);
    assert_eq!(
        requested[0].1.to.known().unwrap().as_str(),
        "ann@example.com"
    );
}

#[tokio::test]
async fn every_link_that_does_not_confirm_gets_one_answer() {
    let app = spawn_in(RegistrationMode::Open).await;
    let ann = app.user("ann@example.com").await;
    ask_reset(&app, "ann@example.com").await;
    let replaced = last_link(&app, RecoveryKind::ResetPassword).await;
    ask_reset(&app, "ann@example.com").await;
    let current = last_link(&app, RecoveryKind::ResetPassword).await;
    let (_, request) = requests(&app, RecoveryKind::ResetPassword)
        .await
        .pop()
        .unwrap();

    let other_key = MailTokenKey::generate().unwrap();
    let forged = LinkToken::issue(
        &other_key,
        RecoveryKind::ResetPassword.name(),
        ann.parse().unwrap(),
        request.nonce.as_bytes(),
    )
    .unwrap()
    .text()
    .expose_secret()
    .clone();
    let other_kind = current.replacen("reset_password", "verify_email", 1);
    let unknown_account = current.replacen(&ann, &Uuid::now_v7().to_string(), 1);

    let mut bodies = vec![];
    for token in [
        replaced.as_str(),
        forged.as_str(),
        other_kind.as_str(),
        unknown_account.as_str(),
        "not a token",
        "",
    ] {
        bodies.push(assert_invalid_link(confirm_reset(&app, token, NEW_PASSWORD).await).await);
    }
    assert!(
        bodies.windows(2).all(|pair| pair[0] == pair[1]),
        "{bodies:?}"
    );

    // Expired: the clock moves past the link's lifetime (30 minutes by default).
    app.clock.advance(TimeDelta::minutes(30));
    bodies.push(assert_invalid_link(confirm_reset(&app, &current, NEW_PASSWORD).await).await);
    assert!(
        bodies.windows(2).all(|pair| pair[0] == pair[1]),
        "{bodies:?}"
    );
    assert_eq!(app.login("ann@example.com", PASSWORD).await.status(), 200);
}

#[tokio::test]
async fn no_usable_token_is_in_the_store() {
    let app = spawn_in(RegistrationMode::Open).await;
    app.user("ann@example.com").await;
    ask_reset(&app, "ann@example.com").await;
    let link = last_link(&app, RecoveryKind::ResetPassword).await;
    let secret = link.rsplit('.').next().unwrap().to_owned();

    let pool = app.database.pool().await;
    let everything: Vec<(String, String)> =
        sqlx::query_as("SELECT data::text, metadata::text FROM messages")
            .fetch_all(&pool)
            .await
            .unwrap();
    pool.close().await;
    for (data, metadata) in everything {
        assert!(
            !data.contains(&secret) && !metadata.contains(&secret),
            "{data}"
        );
    }
}

#[tokio::test]
async fn an_account_gets_at_most_the_hourly_limit_of_mails_and_the_same_answer_beyond_it() {
    let app = spawn_with(|settings| {
        settings.mail.answer_after_ms = 20;
        settings.mail.max_per_account_per_hour = 3;
    })
    .await;
    app.user("ann@example.com").await; // the verification mail: one of the three
    let mut bodies = vec![];
    for _ in 0..4 {
        let response = ask_reset(&app, "ann@example.com").await;
        assert_eq!(response.status(), 202);
        bodies.push(response.text().await.unwrap());
    }
    assert!(bodies.windows(2).all(|pair| pair[0] == pair[1]));
    assert_eq!(requests(&app, RecoveryKind::ResetPassword).await.len(), 2);

    // An hour on, the window has moved.
    app.clock.advance(TimeDelta::minutes(61));
    ask_reset(&app, "ann@example.com").await;
    assert_eq!(requests(&app, RecoveryKind::ResetPassword).await.len(), 3);
}

#[tokio::test]
async fn a_change_of_email_needs_the_password_and_moves_the_reservation_when_confirmed() {
    let app = spawn_in(RegistrationMode::Open).await;
    let (id, token) = app.signed_in("ann@example.com").await;
    let wrong = ask_change(&app, &token, "ann@example.org", "not the password").await;
    assert_eq!(wrong.status(), 401);
    let same = ask_change(&app, &token, "Ann@Example.com", PASSWORD).await;
    assert_eq!(same.status(), 422);

    let response = ask_change(&app, &token, "ann@example.org", PASSWORD).await;
    assert_eq!(response.status(), 202);
    let (account, request) = requests(&app, RecoveryKind::ChangeEmail)
        .await
        .pop()
        .unwrap();
    assert_eq!(account.to_string(), id);
    assert_eq!(request.to.known().unwrap().as_str(), "ann@example.com");
    assert_eq!(
        request.new_email.as_ref().unwrap().as_str(),
        "ann@example.org"
    );
    // Nothing has moved yet.
    assert_eq!(app.login("ann@example.com", PASSWORD).await.status(), 200);

    let link = link_for(&app, RecoveryKind::ChangeEmail, account, &request);
    assert_eq!(confirm_change(&app, &link).await.status(), 204);
    assert_eq!(app.login("ann@example.com", PASSWORD).await.status(), 401);
    let token = app.token("ann@example.org", PASSWORD).await;
    assert_eq!(claims_of(&token)["email_verified"], true);
    assert_invalid_link(confirm_change(&app, &link).await).await;
    // The old address is free for anyone.
    let bob = app.register("ann@example.com", PASSWORD).await;
    assert_eq!(bob.status(), 201);
    assert_eq!(app.login("ann@example.com", PASSWORD).await.status(), 200);
}

#[tokio::test]
async fn a_registration_racing_a_change_of_email_for_the_address_and_the_change_never_both_win() {
    let app = spawn_in(RegistrationMode::Open).await;
    for round in 0..8 {
        let (from, to) = (
            format!("from{round}@example.com"),
            format!("to{round}@example.com"),
        );
        let (_, token) = app.signed_in(&from).await;
        assert_eq!(ask_change(&app, &token, &to, PASSWORD).await.status(), 202);
        let link = last_link(&app, RecoveryKind::ChangeEmail).await;
        let (registered, changed) =
            tokio::join!(app.register(&to, PASSWORD), confirm_change(&app, &link));
        let (registered, changed) = (registered.status(), changed.status());
        let winners = usize::from(registered == 201) + usize::from(changed == 204);
        assert_eq!(winners, 1, "round {round}: {registered} and {changed}");
        if registered == 201 {
            assert_eq!(changed, 409, "round {round}");
            assert_eq!(app.login(&from, PASSWORD).await.status(), 200);
        } else {
            assert_eq!(registered, 409, "round {round}");
            assert_eq!(app.login(&from, PASSWORD).await.status(), 401);
        }
        assert_eq!(app.login(&to, PASSWORD).await.status(), 200);
    }
}

#[tokio::test]
async fn a_link_made_before_a_deactivation_no_longer_resets_the_password() {
    let app = spawn_in(RegistrationMode::Open).await;
    let id = app.user("ann@example.com").await;
    ask_reset(&app, "ann@example.com").await;
    let link = last_link(&app, RecoveryKind::ResetPassword).await;
    let admin = app.admin_token().await;
    assert_eq!(app.deactivate(&id, &admin).await.status(), 200);
    assert_invalid_link(confirm_reset(&app, &link, NEW_PASSWORD).await).await;
}

#[tokio::test]
async fn a_change_of_email_asked_for_before_a_reset_no_longer_moves_the_account() {
    let app = spawn_in(RegistrationMode::Open).await;
    let (_, token) = app.signed_in("ann@example.com").await;
    // Someone who knows Ann's password asks to move her account to their address ...
    let asked = ask_change(&app, &token, "mallory@example.net", PASSWORD).await;
    assert_eq!(asked.status(), 202);
    let change = last_link(&app, RecoveryKind::ChangeEmail).await;
    // ... Ann, warned by the notice, resets her password ...
    ask_reset(&app, "ann@example.com").await;
    let reset = last_link(&app, RecoveryKind::ResetPassword).await;
    assert_eq!(
        confirm_reset(&app, &reset, NEW_PASSWORD).await.status(),
        204
    );
    // ... and the change link is void.
    assert_invalid_link(confirm_change(&app, &change).await).await;
    assert_eq!(
        app.login("ann@example.com", NEW_PASSWORD).await.status(),
        200
    );
}

#[tokio::test]
async fn a_reset_link_mailed_to_the_old_address_is_void_once_the_account_moved() {
    let app = spawn_in(RegistrationMode::Open).await;
    let (_, token) = app.signed_in("ann@example.com").await;
    ask_reset(&app, "ann@example.com").await;
    let reset = last_link(&app, RecoveryKind::ResetPassword).await;
    ask_change(&app, &token, "ann@example.org", PASSWORD).await;
    let change = last_link(&app, RecoveryKind::ChangeEmail).await;
    assert_eq!(confirm_change(&app, &change).await.status(), 204);
    assert_invalid_link(confirm_reset(&app, &reset, NEW_PASSWORD).await).await;
    assert_eq!(app.login("ann@example.org", PASSWORD).await.status(), 200);
}

#[tokio::test]
async fn a_reset_link_from_before_a_deactivation_stays_void_after_a_reactivation() {
    let app = spawn_in(RegistrationMode::Open).await;
    let id = app.user("ann@example.com").await;
    ask_reset(&app, "ann@example.com").await;
    let link = last_link(&app, RecoveryKind::ResetPassword).await;
    let admin = app.admin_token().await;
    assert_eq!(app.deactivate(&id, &admin).await.status(), 200);
    assert_eq!(app.activate(&id, &admin).await.status(), 200);
    assert_invalid_link(confirm_reset(&app, &link, NEW_PASSWORD).await).await;
}

#[tokio::test]
async fn in_verify_mode_whoever_confirms_the_mailbox_keeps_their_own_password() {
    let app = spawn_in(RegistrationMode::Verify).await;
    // A stranger registers Ann's address first, with a password of their own.
    let squatter = app
        .post(
            "/users",
            json!({ "email": "ann@example.com", "password": "the squatter's password" }),
        )
        .await;
    assert_eq!(squatter.status(), 202);
    // Ann registers; her link replaces the first and carries her password.
    assert_eq!(
        app.register("ann@example.com", PASSWORD).await.status(),
        202
    );
    let link = last_link(&app, RecoveryKind::VerifyEmail).await;
    assert_eq!(verify(&app, &link).await.status(), 204);
    assert_eq!(app.login("ann@example.com", PASSWORD).await.status(), 200);
    let squatting = app
        .login("ann@example.com", "the squatter's password")
        .await;
    assert_eq!(squatting.status(), 401);
}

#[tokio::test]
async fn in_verify_mode_an_id_taken_by_another_address_gets_the_same_answer() {
    let app = spawn_in(RegistrationMode::Verify).await;
    let id = Uuid::now_v7();
    let first = app.register_with_id("ann@example.com", id).await;
    assert_eq!(first.status(), 202);
    // Had the first address been taken, the id would be free: the answers must not differ.
    let second = app.register_with_id("bob@example.com", id).await;
    assert_eq!(second.status(), 202);
    let (first, second): (Value, Value) =
        (first.json().await.unwrap(), second.json().await.unwrap());
    assert_eq!(first, second);
}

#[tokio::test]
async fn registering_an_address_over_and_over_leaves_its_owner_a_reset_link() {
    let app = spawn_with(|settings| {
        settings.registration.mode = RegistrationMode::Verify;
        settings.mail.answer_after_ms = 20;
        settings.mail.max_per_account_per_hour = 3;
    })
    .await;
    app.register("ann@example.com", PASSWORD).await;
    let link = last_link(&app, RecoveryKind::VerifyEmail).await;
    assert_eq!(verify(&app, &link).await.status(), 204);
    for _ in 0..5 {
        app.register("ann@example.com", "someone else's password")
            .await;
    }
    let notices = recovery_events(&app)
        .await
        .into_iter()
        .filter(|(_, event)| matches!(event, RecoveryEvent::RegistrationAttempted(_)))
        .count();
    assert_eq!(notices, 3);
    ask_reset(&app, "ann@example.com").await;
    assert_eq!(requests(&app, RecoveryKind::ResetPassword).await.len(), 1);
}

#[tokio::test]
async fn a_new_verification_link_can_be_asked_for_and_replaces_the_first() {
    let app = spawn_in(RegistrationMode::Open).await;
    let (_, token) = app.signed_in("ann@example.com").await;
    let first = last_link(&app, RecoveryKind::VerifyEmail).await;
    let asked = app
        .post_as("/users/me/verify-email", &token, json!({}))
        .await;
    assert_eq!(asked.status(), 202);
    let second = last_link(&app, RecoveryKind::VerifyEmail).await;
    assert_ne!(first, second);
    assert_invalid_link(verify(&app, &first).await).await;
    assert_eq!(verify(&app, &second).await.status(), 204);
    // Verified: nothing more is sent.
    let again = app
        .post_as("/users/me/verify-email", &token, json!({}))
        .await;
    assert_eq!(again.status(), 202);
    assert_eq!(requests(&app, RecoveryKind::VerifyEmail).await.len(), 2);
}
