//! Sessions over HTTP: a login starts one, a refresh rotates its token (a racing duplicate gets
//! the same pair, a reuse ends it), logout, ending one's own or, as an administrator, all of an
//! account's; and every route that takes an access token refuses one whose session is over.

use chrono::TimeDelta;
use identity::{SessionEndReason, SessionEvent, UserEvent};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{PASSWORD, TestApp, claims_of, position_of, problem, spawn_app, spawn_with};

/// What a login or a refresh answers.
struct Pair {
    access: String,
    refresh: String,
    session: String,
}

impl Pair {
    fn of(body: &Value) -> Self {
        Self {
            access: body["access_token"].as_str().unwrap().to_owned(),
            refresh: body["refresh_token"].as_str().unwrap().to_owned(),
            session: body["session_id"].as_str().unwrap().to_owned(),
        }
    }
}

/// Registers `email` and logs in: the account's id and its first session.
async fn signed_in(app: &TestApp, email: &str) -> (String, Pair) {
    let id = app.user(email).await;
    (id, Pair::of(&app.login_body(email, PASSWORD).await))
}

/// A refresh that must succeed: the new pair.
async fn refreshed(app: &TestApp, refresh_token: &str) -> Pair {
    let response = app.refresh(refresh_token).await;
    assert_eq!(response.status(), 200, "the refresh was refused");
    Pair::of(&response.json().await.unwrap())
}

/// A refresh that must be refused, with the one body every refusal gets.
async fn assert_refresh_refused(app: &TestApp, refresh_token: &str) {
    let response = app.refresh(refresh_token).await;
    assert_eq!(response.status(), 401, "{refresh_token:?} refreshed");
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    assert_eq!(problem(response).await, refused_body());
}

/// The body of every refused refresh, whatever the reason.
fn refused_body() -> Value {
    json!({
        "type": "about:blank",
        "title": "Unauthorized",
        "status": 401,
        "code": "invalid_refresh_token",
        "detail": "the refresh token is not valid, or its session has ended or expired: log in again",
    })
}

/// The reason of the session's end, if its stream ends with one.
async fn end_of(app: &TestApp, session: &str) -> Option<SessionEndReason> {
    let events = app.session_events().await;
    let last = events
        .iter()
        .rfind(|event| event.session_id().to_string() == session)?;
    match last {
        SessionEvent::SessionEnded(ended) => Some(ended.reason),
        _ => None,
    }
}

/// The type and global position of each message of the session's stream, oldest first, read
/// in the store.
async fn stream_of(app: &TestApp, session: &str) -> Vec<(String, u64)> {
    let pool = app.database.pool().await;
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT type, global_position FROM messages WHERE stream_name = $1 ORDER BY position",
    )
    .bind(format!("session-{session}"))
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    rows.into_iter()
        .map(|(kind, position)| (kind, u64::try_from(position).unwrap()))
        .collect()
}

/// The global position of the session's one `SessionEnded`, read in the store.
async fn ended_at(app: &TestApp, session: &str) -> u64 {
    let ends: Vec<u64> = stream_of(app, session)
        .await
        .into_iter()
        .filter(|(kind, _)| kind == "SessionEnded")
        .map(|(_, position)| position)
        .collect();
    let [position] = ends[..] else {
        panic!("the session's ends: {ends:?}");
    };
    position
}

async fn logout_with_access_token(app: &TestApp, access: &str) -> reqwest::Response {
    app.client
        .post(app.url("/logout"))
        .bearer_auth(access)
        .send()
        .await
        .unwrap()
}

async fn logout_with_refresh_token(app: &TestApp, refresh: &str) -> reqwest::Response {
    app.post("/logout", json!({ "refresh_token": refresh }))
        .await
}

#[tokio::test]
async fn a_login_starts_a_session_recorded_in_the_same_append_as_the_login() {
    let app = spawn_app().await;
    let id = app.user("ann@example.com").await;
    let response = app
        .client
        .post(app.url("/login"))
        .header("user-agent", "Firefox/140.0")
        .json(&json!({ "email": "ann@example.com", "password": PASSWORD }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["cache-control"], "no-store");
    let position = position_of(&response);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["refresh_expires_in"], 14 * 24 * 3600);
    let pair = Pair::of(&body);
    assert_eq!(claims_of(&pair.access)["sid"], pair.session.as_str());
    assert!(pair.refresh.starts_with(&format!("{}.0.", pair.session)));

    let events = app.session_events().await;
    let [SessionEvent::SessionStarted(started)] = &events[..] else {
        panic!("{events:?}");
    };
    assert_eq!(started.session_id.to_string(), pair.session);
    assert_eq!(started.user_id.to_string(), id);
    assert_eq!(started.session_epoch, 0);
    assert_eq!(
        started.user_agent.as_ref().unwrap().as_str(),
        "Firefox/140.0"
    );
    // One transaction: a global position is the transaction's id times 65,536 plus the
    // message's index (docs/adr/0002), and the answer's position is the last of the two.
    let pool = app.database.pool().await;
    let positions: Vec<(String, i64)> = sqlx::query_as(
        "SELECT type, global_position FROM messages \
         WHERE type IN ('LoginSucceeded', 'SessionStarted') ORDER BY global_position",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    let [(_, login), (session_type, session)] = &positions[..] else {
        panic!("{positions:?}");
    };
    assert_eq!(session_type, "SessionStarted");
    assert_eq!(login >> 16, session >> 16, "two transactions");
    assert_eq!(u64::try_from(*session).unwrap(), position);
}

#[tokio::test]
async fn a_refresh_rotates_the_refresh_token_and_answers_a_fresh_access_token_in_the_session() {
    let app = spawn_app().await;
    let (id, first) = signed_in(&app, "ann@example.com").await;
    app.clock.advance(TimeDelta::seconds(60));

    let response = app.refresh(&first.refresh).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["cache-control"], "no-store");
    let position = position_of(&response);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 900);
    assert_eq!(body["refresh_expires_in"], 14 * 24 * 3600);
    let second = Pair::of(&body);
    assert_eq!(second.session, first.session);
    assert!(second.refresh.starts_with(&format!("{}.1.", first.session)));
    assert_ne!(second.access, first.access);
    let claims = claims_of(&second.access);
    assert_eq!(claims["sid"], first.session.as_str());
    assert_eq!(claims["sub"], id.as_str());
    assert_eq!(position, u64::try_from(app.last_position().await).unwrap());

    // The new access token works, and so does the new refresh token.
    // (An unknown session is a 404 to a caller the route accepts, where a refused token is 401.)
    let unknown = format!("/users/me/sessions/{}", Uuid::new_v4());
    assert_eq!(app.delete_as(&unknown, &second.access).await.status(), 404);
    let third = refreshed(&app, &second.refresh).await;
    assert!(third.refresh.starts_with(&format!("{}.2.", first.session)));
    let refreshes = app.session_events().await.into_iter();
    let refreshes = refreshes.filter(|e| matches!(e, SessionEvent::SessionRefreshed(_)));
    assert_eq!(refreshes.count(), 2);
}

#[tokio::test]
async fn the_replaced_token_again_within_the_grace_gets_the_current_pair_and_after_it_ends_the_session()
 {
    let app = spawn_app().await;
    let (_, first) = signed_in(&app, "ann@example.com").await;
    let second = refreshed(&app, &first.refresh).await;

    // A lost answer: the client sends the old token again, within the grace.
    app.clock.advance(TimeDelta::seconds(10));
    let before = app.last_position().await;
    let again = refreshed(&app, &first.refresh).await;
    assert_eq!(again.refresh, second.refresh);
    assert_eq!(again.session, second.session);
    assert_eq!(app.last_position().await, before, "a repeat appended");

    // After the grace it is a reuse: the session ends, for whoever holds either token.
    app.clock.advance(TimeDelta::seconds(1));
    assert_refresh_refused(&app, &first.refresh).await;
    assert_eq!(
        end_of(&app, &first.session).await,
        Some(SessionEndReason::RefreshTokenReused)
    );
    assert_refresh_refused(&app, &second.refresh).await;
}

#[tokio::test]
async fn a_token_older_than_the_previous_one_is_a_reuse_that_ends_the_session_for_thief_and_owner()
{
    let app = spawn_app().await;
    let (_, first) = signed_in(&app, "ann@example.com").await;
    let second = refreshed(&app, &first.refresh).await;
    let third = refreshed(&app, &second.refresh).await;

    // A thief replays the first token, at once: even within the grace, it is two generations
    // old, and it is authenticated from the message that issued it.
    assert_refresh_refused(&app, &first.refresh).await;
    assert_eq!(
        end_of(&app, &first.session).await,
        Some(SessionEndReason::RefreshTokenReused)
    );
    let ends = app.session_events().await.into_iter();
    let ends = ends.filter(|e| matches!(e, SessionEvent::SessionEnded(_)));
    assert_eq!(ends.count(), 1);

    // The owner's next refresh fails too, and their access token no longer acts.
    assert_refresh_refused(&app, &third.refresh).await;
    let path = format!("/users/me/sessions/{}", third.session);
    assert_eq!(app.delete_as(&path, &third.access).await.status(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_refreshes_of_one_token_racing_both_get_the_same_new_pair_and_one_rotation_is_recorded()
{
    const ROUNDS: usize = 10;
    let app = spawn_app().await;
    let (_, mut pair) = signed_in(&app, "ann@example.com").await;
    for round in 0..ROUNDS {
        let (a, b) = tokio::join!(app.refresh(&pair.refresh), app.refresh(&pair.refresh));
        assert_eq!(
            (a.status().as_u16(), b.status().as_u16()),
            (200, 200),
            "round {round}"
        );
        let a = Pair::of(&a.json().await.unwrap());
        let b = Pair::of(&b.json().await.unwrap());
        assert_eq!(a.refresh, b.refresh, "round {round}");
        assert!(
            a.refresh
                .starts_with(&format!("{}.{}.", pair.session, round + 1)),
            "round {round}"
        );
        pair = a;
    }
    let refreshes = app.session_events().await.into_iter();
    let refreshes = refreshes.filter(|e| matches!(e, SessionEvent::SessionRefreshed(_)));
    assert_eq!(refreshes.count(), ROUNDS);
    // The pair the race settled on refreshes on.
    refreshed(&app, &pair.refresh).await;
}

#[tokio::test]
async fn logging_out_with_the_access_token_ends_its_session_and_again_is_fine() {
    let app = spawn_app().await;
    let (_, pair) = signed_in(&app, "ann@example.com").await;
    let other = Pair::of(&app.login_body("ann@example.com", PASSWORD).await);

    let response = logout_with_access_token(&app, &pair.access).await;
    assert_eq!(response.status(), 204);
    assert_eq!(
        end_of(&app, &pair.session).await,
        Some(SessionEndReason::LoggedOut)
    );
    // The position a read of the sessions waits for to see it gone.
    let ended = ended_at(&app, &pair.session).await;
    assert_eq!(position_of(&response), ended);
    assert_refresh_refused(&app, &pair.refresh).await;

    let before = app.last_position().await;
    let again = logout_with_access_token(&app, &pair.access).await;
    assert_eq!(again.status(), 204);
    assert_eq!(position_of(&again), ended);
    assert_eq!(app.last_position().await, before);
    // The account's other session is untouched.
    refreshed(&app, &other.refresh).await;
    // A token that does not verify is refused, with no position.
    let response = logout_with_access_token(&app, "not.a.token").await;
    assert_eq!(response.status(), 401);
    assert!(!response.headers().contains_key("x-position"));
    assert_eq!(problem(response).await["code"], "invalid_token");
}

#[tokio::test]
async fn logging_out_with_the_refresh_token_ends_its_session_and_again_is_fine() {
    let app = spawn_app().await;
    let (_, first) = signed_in(&app, "ann@example.com").await;
    // The client's access token expired meanwhile; it holds a refresh token of generation 1.
    let second = refreshed(&app, &first.refresh).await;
    app.clock.advance(TimeDelta::seconds(3600));

    let response = logout_with_refresh_token(&app, &second.refresh).await;
    assert_eq!(response.status(), 204);
    assert_eq!(
        end_of(&app, &second.session).await,
        Some(SessionEndReason::LoggedOut)
    );
    let ended = ended_at(&app, &second.session).await;
    assert_eq!(position_of(&response), ended);
    assert_refresh_refused(&app, &second.refresh).await;
    let before = app.last_position().await;
    let again = logout_with_refresh_token(&app, &second.refresh).await;
    assert_eq!(again.status(), 204);
    assert_eq!(position_of(&again), ended);
    // A token that does not authenticate is refused, even for a session that has ended.
    let forged = format!("{}.1.{}", second.session, "A".repeat(43));
    let response = logout_with_refresh_token(&app, &forged).await;
    assert_eq!(response.status(), 401);
    assert!(!response.headers().contains_key("x-position"));
    assert_eq!(problem(response).await["code"], "invalid_refresh_token");
    // No credentials at all: no body, or a JSON null (the document's body is optional).
    let response = app.client.post(app.url("/logout")).send().await.unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    let response = app
        .client
        .post(app.url("/logout"))
        .header("content-type", "application/json")
        .body("null")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(problem(response).await["code"], "invalid_token");
    assert_eq!(app.last_position().await, before);
}

#[tokio::test]
async fn a_logged_out_access_token_cannot_deactivate_anyone_nor_change_a_password() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let (ann, pair) = signed_in(&app, "ann@example.com").await;
    assert_eq!(logout_with_access_token(&app, &admin).await.status(), 204);
    assert_eq!(
        logout_with_access_token(&app, &pair.access).await.status(),
        204
    );

    let before = app.last_position().await;
    let response = app.deactivate(&ann, &admin).await;
    assert_eq!(response.status(), 401);
    assert_eq!(problem(response).await["code"], "invalid_token");
    let response = app
        .change_password(&ann, &pair.access, PASSWORD, "a brand new secret")
        .await;
    assert_eq!(response.status(), 401);
    let response = app
        .delete_as(&format!("/users/{ann}/sessions"), &admin)
        .await;
    assert_eq!(response.status(), 401);
    assert_eq!(app.last_position().await, before);
    // Logged in again, the administrator acts.
    let admin = app.token("admin@example.com", PASSWORD).await;
    assert_eq!(app.deactivate(&ann, &admin).await.status(), 200);
}

#[tokio::test]
async fn a_user_ends_one_of_their_own_sessions_from_another() {
    let app = spawn_app().await;
    let (_, phone) = signed_in(&app, "ann@example.com").await;
    let laptop = Pair::of(&app.login_body("ann@example.com", PASSWORD).await);

    let path = format!("/users/me/sessions/{}", phone.session);
    let response = app.delete_as(&path, &laptop.access).await;
    assert_eq!(response.status(), 204);
    assert_eq!(
        end_of(&app, &phone.session).await,
        Some(SessionEndReason::EndedByOwner)
    );
    let ended = ended_at(&app, &phone.session).await;
    assert_eq!(position_of(&response), ended);
    assert_refresh_refused(&app, &phone.refresh).await;
    let response = app.delete_as(&path, &phone.access).await;
    assert_eq!(
        response.status(),
        401,
        "the ended session's token still acts"
    );
    assert!(!response.headers().contains_key("x-position"));
    // Again: it is over already, at the same position.
    let before = app.last_position().await;
    let again = app.delete_as(&path, &laptop.access).await;
    assert_eq!(again.status(), 204);
    assert_eq!(position_of(&again), ended);
    assert_eq!(app.last_position().await, before);
    refreshed(&app, &laptop.refresh).await;
}

#[tokio::test]
async fn another_persons_session_is_a_404_like_an_unknown_one_and_stays_live() {
    let app = spawn_app().await;
    let (_, ann) = signed_in(&app, "ann@example.com").await;
    let (_, bob) = signed_in(&app, "bob@example.com").await;
    let before = app.last_position().await;

    let mut bodies = Vec::new();
    for session in [
        ann.session.clone(),
        Uuid::new_v4().to_string(),
        "not-an-id".into(),
    ] {
        let response = app
            .delete_as(&format!("/users/me/sessions/{session}"), &bob.access)
            .await;
        assert_eq!(response.status(), 404, "{session}");
        assert!(!response.headers().contains_key("x-position"));
        bodies.push(problem(response).await);
    }
    assert_eq!(bodies[0], bodies[1]);
    assert_eq!(bodies[0]["detail"], "no such session");
    assert_eq!(app.last_position().await, before);
    refreshed(&app, &ann.refresh).await;
    // Without a token, nothing at all.
    let response = app
        .client
        .delete(app.url(&format!("/users/me/sessions/{}", ann.session)))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
}

#[tokio::test]
async fn an_administrator_ends_every_session_of_an_account_at_once() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let (ann, phone) = signed_in(&app, "ann@example.com").await;
    let laptop = Pair::of(&app.login_body("ann@example.com", PASSWORD).await);
    let (_, bob) = signed_in(&app, "bob@example.com").await;
    let path = format!("/users/{ann}/sessions");

    // Not for anyone else.
    let before = app.last_position().await;
    assert_eq!(app.delete_as(&path, &bob.access).await.status(), 403);
    let unknown = format!("/users/{}/sessions", Uuid::new_v4());
    assert_eq!(app.delete_as(&unknown, &admin).await.status(), 404);
    assert_eq!(app.last_position().await, before);

    let response = app.delete_as(&path, &admin).await;
    assert_eq!(response.status(), 204);
    let position = position_of(&response);
    assert_eq!(position, u64::try_from(app.last_position().await).unwrap());
    assert!(matches!(
        app.user_events().await.last(),
        Some(UserEvent::SessionsEnded(_))
    ));
    for pair in [&phone, &laptop] {
        assert_refresh_refused(&app, &pair.refresh).await;
        let response = app
            .change_password(&ann, &pair.access, PASSWORD, "a brand new secret")
            .await;
        assert_eq!(response.status(), 401);
    }
    // Other accounts keep theirs, and Ann logs in again.
    refreshed(&app, &bob.refresh).await;
    let again = Pair::of(&app.login_body("ann@example.com", PASSWORD).await);
    refreshed(&app, &again.refresh).await;
}

#[tokio::test]
async fn a_deactivation_ends_every_session_and_an_activation_does_not_bring_them_back() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let (ann, pair) = signed_in(&app, "ann@example.com").await;

    assert_eq!(app.deactivate(&ann, &admin).await.status(), 200);
    assert_refresh_refused(&app, &pair.refresh).await;
    assert_eq!(app.activate(&ann, &admin).await.status(), 200);
    assert_refresh_refused(&app, &pair.refresh).await;
    let path = format!("/users/me/sessions/{}", pair.session);
    assert_eq!(app.delete_as(&path, &pair.access).await.status(), 401);

    let again = Pair::of(&app.login_body("ann@example.com", PASSWORD).await);
    refreshed(&app, &again.refresh).await;
}

#[tokio::test]
async fn a_password_change_ends_every_session_of_the_account_the_callers_own_too() {
    let app = spawn_app().await;
    let (ann, phone) = signed_in(&app, "ann@example.com").await;
    let laptop = Pair::of(&app.login_body("ann@example.com", PASSWORD).await);

    let response = app
        .change_password(&ann, &laptop.access, PASSWORD, "a brand new secret")
        .await;
    assert_eq!(response.status(), 200);
    for pair in [&phone, &laptop] {
        assert_refresh_refused(&app, &pair.refresh).await;
        let response = app
            .change_password(&ann, &pair.access, "a brand new secret", "another secret")
            .await;
        assert_eq!(response.status(), 401);
        assert_eq!(problem(response).await["code"], "invalid_token");
    }
    let again = Pair::of(
        &app.login_body("ann@example.com", "a brand new secret")
            .await,
    );
    refreshed(&app, &again.refresh).await;
}

#[tokio::test]
async fn a_session_not_refreshed_for_the_idle_limit_expires_and_its_access_token_stops_acting() {
    let app = spawn_with(|settings| {
        settings.sessions.idle_seconds = 60;
        settings.sessions.max_seconds = 3600;
    })
    .await;
    let (_, first) = signed_in(&app, "ann@example.com").await;
    app.clock.advance(TimeDelta::seconds(59));
    let response = app.refresh(&first.refresh).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    // The refresh moved the idle limit: 60 seconds from now.
    assert_eq!(body["refresh_expires_in"], 60);
    let second = Pair::of(&body);

    app.clock.advance(TimeDelta::seconds(60));
    let before = app.last_position().await;
    assert_refresh_refused(&app, &second.refresh).await;
    // The access token itself lives 15 minutes, but its session is over.
    let path = format!("/users/me/sessions/{}", second.session);
    assert_eq!(app.delete_as(&path, &second.access).await.status(), 401);
    // Logging out of it appends nothing, and answers the position of its last event: the view
    // shows it expired from there.
    let response = logout_with_refresh_token(&app, &second.refresh).await;
    assert_eq!(response.status(), 204);
    let stream = stream_of(&app, &second.session).await;
    assert_eq!(stream.last().unwrap().0, "SessionRefreshed");
    assert_eq!(position_of(&response), stream.last().unwrap().1);
    assert_eq!(app.last_position().await, before);
    assert_eq!(end_of(&app, &second.session).await, None);
}

#[tokio::test]
async fn a_session_at_its_absolute_limit_expires_however_often_it_was_refreshed() {
    let app = spawn_with(|settings| {
        settings.sessions.idle_seconds = 60;
        settings.sessions.max_seconds = 150;
    })
    .await;
    let (_, mut pair) = signed_in(&app, "ann@example.com").await;
    for (after, expires_in) in [(50, 60), (50, 50), (49, 1)] {
        app.clock.advance(TimeDelta::seconds(after));
        let response = app.refresh(&pair.refresh).await;
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["refresh_expires_in"], expires_in);
        pair = Pair::of(&body);
    }
    app.clock.advance(TimeDelta::seconds(1));
    assert_refresh_refused(&app, &pair.refresh).await;
}

#[tokio::test]
async fn malformed_unknown_truncated_oversized_and_forged_refresh_tokens_get_401_and_append_nothing()
 {
    let app = spawn_app().await;
    let (_, first) = signed_in(&app, "ann@example.com").await;
    let second = refreshed(&app, &first.refresh).await;
    let third = refreshed(&app, &second.refresh).await;
    let session = &third.session;
    let secret = third.refresh.rsplit('.').next().unwrap().to_owned();
    let forged_secret = "A".repeat(43);
    let before = app.last_position().await;

    let refused = [
        String::new(),
        "garbage".into(),
        third.refresh[..third.refresh.len() - 1].to_owned(),
        format!("{}A", third.refresh),
        third.refresh.to_uppercase(),
        format!("{session}.02.{secret}"),
        format!("{session}.+2.{secret}"),
        format!(" {}", third.refresh),
        // An unknown session.
        format!("{}.2.{secret}", Uuid::new_v4()),
        // Forged secrets for the current, the previous and an older generation: none may end
        // the session as a reuse.
        format!("{session}.2.{forged_secret}"),
        format!("{session}.1.{forged_secret}"),
        format!("{session}.0.{forged_secret}"),
        // The current secret under another generation, and generations never issued.
        format!("{session}.0.{secret}"),
        format!("{session}.3.{secret}"),
        format!("{session}.18446744073709551615.{secret}"),
        // Oversized, but within the body limit.
        "x".repeat(10_000),
        format!("{}{}", third.refresh, "0".repeat(10_000)),
    ];
    for token in &refused {
        assert_refresh_refused(&app, token).await;
        let response = logout_with_refresh_token(&app, token).await;
        assert_eq!(response.status(), 401, "{token:?} logged out");
    }
    assert_eq!(app.last_position().await, before, "something was appended");
    // The session was not ended by any of them.
    refreshed(&app, &third.refresh).await;
}

#[tokio::test]
async fn a_refresh_body_that_is_not_json_or_too_large_is_refused_as_any_body_is() {
    let app = spawn_app().await;
    let post_raw = |body: String| {
        app.client
            .post(app.url("/token/refresh"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let oversized = json!({ "refresh_token": "x".repeat(20_000) }).to_string();
    assert_eq!(post_raw(oversized).await.unwrap().status(), 413);
    assert_eq!(post_raw("{".into()).await.unwrap().status(), 400);
    for body in [
        json!({}),
        json!({ "refresh_token": 7 }),
        json!({ "refresh_token": "a", "x": 1 }),
    ] {
        let response = app.post("/token/refresh", body.clone()).await;
        assert_eq!(response.status(), 422, "{body}");
    }
    let response = app
        .client
        .post(app.url("/token/refresh"))
        .body("refresh_token=x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 415);
}

#[tokio::test]
async fn a_deactivated_account_gets_the_same_refusal_as_a_forged_token() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let (ann, pair) = signed_in(&app, "ann@example.com").await;
    let forged = format!("{}.0.{}", pair.session, "A".repeat(43));
    let forged_answer = app.refresh(&forged).await;
    let forged_headers = forged_answer.headers().clone();
    let forged_body = problem(forged_answer).await;

    assert_eq!(app.deactivate(&ann, &admin).await.status(), 200);
    let answer = app.refresh(&pair.refresh).await;
    assert_eq!(answer.status(), 401);
    assert_eq!(
        answer.headers()["www-authenticate"],
        forged_headers["www-authenticate"]
    );
    assert_eq!(problem(answer).await, forged_body);
}

#[tokio::test]
async fn the_openapi_document_lists_the_session_routes() {
    let app = spawn_app().await;
    let doc = app.get_json("/openapi.json").await;
    let paths = &doc["paths"];
    for (path, method, statuses) in [
        (
            "/token/refresh",
            "post",
            &["200", "400", "401", "413", "415", "422", "503"][..],
        ),
        (
            "/logout",
            "post",
            &["204", "401", "400", "413", "415", "422"][..],
        ),
        (
            "/users/me/sessions/{id}",
            "delete",
            &["204", "401", "404"][..],
        ),
        (
            "/users/{id}/sessions",
            "delete",
            &["204", "401", "403", "404"][..],
        ),
    ] {
        let responses = &paths[path][method]["responses"];
        for status in statuses {
            assert!(
                responses.get(status).is_some(),
                "{method} {path} {status} missing"
            );
        }
    }
    // Ending a session answers the position to read it with, as every command does.
    for (path, method) in [
        ("/logout", "post"),
        ("/users/me/sessions/{id}", "delete"),
        ("/users/{id}/sessions", "delete"),
    ] {
        let headers = &paths[path][method]["responses"]["204"]["headers"];
        assert!(
            headers.get("X-Position").is_some(),
            "{method} {path} 204 without X-Position"
        );
    }
    let login = &paths["/login"]["post"]["responses"]["200"]["content"]["application/json"];
    assert_eq!(
        login["schema"]["$ref"],
        "#/components/schemas/TokenResponse"
    );
    let token = &doc["components"]["schemas"]["TokenResponse"]["properties"];
    for field in ["refresh_token", "refresh_expires_in", "session_id"] {
        assert!(token.get(field).is_some(), "{field} missing");
    }
    assert_eq!(
        paths["/logout"]["post"]["requestBody"]["required"],
        Value::Null
    );
}
