//! `X-Min-Position`: a read waits until the read model has applied the client's last write.

use std::time::{Duration, Instant};

use crate::harness::{TestApp, assert_refused, problem, spawn, spawn_with};

/// Ann, active, with a token of hers, and a position written that the read model is one short
/// of.
async fn ann_and_a_position_not_reached(app: &TestApp) -> (String, u64) {
    let ann = app.seed_user("ann@example.com", "active", &["user"]).await;
    // Before the position: her session is written too, and `written` must stay the last.
    let token = app.token_for(ann.id, &["user"]).await;
    let written = app.written_position().await;
    app.set_checkpoint(written - 1).await;
    (token, written)
}

/// `/users/me` for `token`, answered once the read model has reached `position`.
async fn me_at_position(app: &TestApp, token: &str, position: u64) -> reqwest::Response {
    app.get_with_min_position("/users/me", token, Some(position))
        .await
}

/// Sends `/users/me` with every value in `values` as an `X-Min-Position` header of its own.
async fn me_at(app: &TestApp, token: &str, values: &[&str]) -> reqwest::Response {
    let mut request = app.client.get(app.url("/users/me")).bearer_auth(token);
    for value in values {
        request = request.header("X-Min-Position", *value);
    }
    request.send().await.unwrap()
}

/// Asserts that what began at `started` was answered well before the 5 s these tests let a
/// read wait; `refusal` says what waited otherwise.
fn assert_answered_without_waiting(started: Instant, refusal: &str) {
    assert!(started.elapsed() < Duration::from_secs(4), "{refusal}");
}

#[tokio::test]
async fn a_read_at_a_reached_position_answers_at_once() {
    let app = spawn().await;
    let (token, written) = ann_and_a_position_not_reached(&app).await;
    // Reached before the request comes.
    app.set_checkpoint(written).await;
    let response = me_at_position(&app, &token, written).await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn a_read_waits_until_the_read_model_reaches_the_position() {
    let app = spawn().await;
    let (token, written) = ann_and_a_position_not_reached(&app).await;
    let started = Instant::now();
    let request = me_at_position(&app, &token, written);
    let catch_up = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        app.set_checkpoint(written).await;
    };
    let (response, ()) = tokio::join!(request, catch_up);
    assert_eq!(response.status(), 200);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "it answered before the read model caught up"
    );
}

#[tokio::test]
async fn a_read_that_waits_too_long_gets_a_retryable_answer() {
    let app = spawn_with(|settings| settings.query.max_wait_ms = 200).await;
    let (token, written) = ann_and_a_position_not_reached(&app).await;
    let response = me_at_position(&app, &token, written).await;
    assert_eq!(response.headers()["retry-after"], "1");
    assert_refused(&problem(response).await, 503, "not_yet_consistent", written);
}

#[tokio::test]
async fn a_position_beyond_the_last_one_written_is_refused_at_once() {
    let app = spawn_with(|settings| settings.query.max_wait_ms = 5_000).await;
    let (token, written) = ann_and_a_position_not_reached(&app).await;
    let started = Instant::now();
    for beyond in [written + 1, u64::MAX] {
        let answer = problem(me_at_position(&app, &token, beyond).await).await;
        assert_refused(&answer, 400, "unknown_position", beyond);
    }
    assert_answered_without_waiting(started, "it waited for a position nobody wrote");
}

#[tokio::test]
async fn a_request_without_a_valid_token_is_refused_before_it_waits() {
    let app = spawn_with(|settings| settings.query.max_wait_ms = 5_000).await;
    app.set_checkpoint(10).await;
    let started = Instant::now();
    let response = app
        .client
        .get(app.url("/users/me"))
        .header("X-Min-Position", "18446744073709551615")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_answered_without_waiting(started, "it waited before checking the token");
}

#[tokio::test]
async fn a_deactivated_caller_is_refused_before_it_waits() {
    let app = spawn_with(|settings| settings.query.max_wait_ms = 5_000).await;
    // One the view shows deactivated, and one the view has not seen at all: the account's
    // stream says so.
    let shown = app
        .seed_user("ann@example.com", "deactivated", &["user"])
        .await;
    let unseen = app.register("bob@example.com", &["user"]).await;
    app.deactivate(unseen).await;
    let written = app.written_position().await;
    app.set_checkpoint(written - 1).await;
    let started = Instant::now();
    for id in [shown.id, unseen] {
        let token = app.token_for(id, &["user"]).await;
        let answer = problem(me_at_position(&app, &token, written).await).await;
        assert_refused(&answer, 401, "invalid_token", id);
    }
    assert_answered_without_waiting(started, "it waited before checking the account");
}

#[tokio::test]
async fn a_malformed_min_position_is_a_bad_request() {
    let app = spawn().await;
    let user = app.seed_user("ann@example.com", "active", &["user"]).await;
    let token = app.token_for(user.id, &["user"]).await;
    for value in ["-1", "soon", "1.5"] {
        let answer = problem(me_at(&app, &token, &[value]).await).await;
        assert_refused(&answer, 400, "invalid_header", value);
    }
}

#[tokio::test]
async fn an_x_min_position_that_is_not_one_plain_number_is_a_bad_request_at_once() {
    let app = spawn_with(|settings| settings.query.max_wait_ms = 5_000).await;
    // Behind by one: any of these read as `written` would wait, then answer 503.
    let (token, written) = ann_and_a_position_not_reached(&app).await;
    let (plus, repeated_last) = (format!("+{written}"), written.to_string());
    let started = Instant::now();
    for values in [
        vec![""],
        vec![plus.as_str()],
        vec!["18446744073709551616"],
        vec!["99999999999999999999999999"],
        vec!["0x10"],
        vec!["1 2"],
        vec!["1", repeated_last.as_str()],
        vec![repeated_last.as_str(), repeated_last.as_str()],
    ] {
        let answer = problem(me_at(&app, &token, &values).await).await;
        assert_refused(&answer, 400, "invalid_header", format!("{values:?}"));
        let (_, body) = answer;
        assert!(
            body["detail"].as_str().unwrap().contains("X-Min-Position"),
            "{values:?}: {body}"
        );
    }
    assert_answered_without_waiting(started, "a malformed X-Min-Position waited");
}

#[tokio::test]
async fn an_x_min_position_with_leading_zeros_or_surrounding_whitespace_is_the_same_position() {
    let app = spawn_with(|settings| settings.query.max_wait_ms = 200).await;
    let (token, written) = ann_and_a_position_not_reached(&app).await;
    let forms = [
        format!("0{written}"),
        format!("000{written}"),
        format!(" {written}"),
        format!("{written}\t"),
    ];
    // Not reached: each form waits for `written`, as the plain number does.
    for form in &forms {
        let answer = problem(me_at(&app, &token, &[form.as_str()]).await).await;
        assert_refused(&answer, 503, "not_yet_consistent", format!("{form:?}"));
    }
    app.set_checkpoint(written).await;
    for form in &forms {
        let response = me_at(&app, &token, &[form.as_str()]).await;
        assert_eq!(response.status(), 200, "{form:?}");
    }
}
