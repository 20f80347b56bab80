//! A session's life through the real processes, the same for the standalone process and the
//! split deployment: a login opens it, a refresh rotates it, the list shows it, a logout ends
//! it, and the query side refuses its access token within `query.max_view_lag_ms`.

use std::time::Duration;

use serde_json::{Value, json};

use super::{PASSWORD, get_as, login, register};

/// `query.max_view_lag_ms` at its default: how long an ended session's access token may still
/// be served by the query side.
pub const REVOCATION_BOUND: Duration = Duration::from_millis(1000);

/// What a login or a refresh answered.
pub struct Pair {
    pub access_token: String,
    pub refresh_token: String,
    pub session_id: String,
    /// `X-Position`: the view holds the session once it has applied this.
    pub position: u64,
}

impl Pair {
    async fn from(response: reqwest::Response, what: &str) -> Self {
        assert_eq!(response.status(), 200, "{what}");
        let position = response.headers()["x-position"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let body: Value = response.json().await.unwrap();
        let text = |field: &str| body[field].as_str().unwrap_or_default().to_owned();
        Self {
            access_token: text("access_token"),
            refresh_token: text("refresh_token"),
            session_id: text("session_id"),
            position,
        }
    }
}

async fn post(client: &reqwest::Client, port: u16, path: &str, body: Value) -> reqwest::Response {
    client
        .post(format!("http://127.0.0.1:{port}{path}"))
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn refresh(client: &reqwest::Client, port: u16, token: &str) -> reqwest::Response {
    post(
        client,
        port,
        "/token/refresh",
        json!({ "refresh_token": token }),
    )
    .await
}

/// The ids of the live sessions `token`'s holder lists on the query side, once it holds
/// `position`.
async fn listed(client: &reqwest::Client, port: u16, token: &str, position: u64) -> Vec<String> {
    let response = get_as(client, port, "/users/me/sessions", token, Some(position)).await;
    assert_eq!(response.status(), 200, "GET /users/me/sessions");
    let sessions: Vec<Value> = response.json().await.unwrap();
    sessions
        .iter()
        .map(|session| session["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Registers `email` on the command side (`command_port`) and walks two of its sessions
/// through their lives, reading on the query side (`query_port`; the same port standalone).
pub async fn walk_a_session_through_its_life(
    client: &reqwest::Client,
    command_port: u16,
    query_port: u16,
    email: &str,
) {
    register(client, command_port, email).await;
    let first = Pair::from(login(client, command_port, email, PASSWORD).await, "login").await;
    let second = Pair::from(login(client, command_port, email, PASSWORD).await, "login").await;
    let mut listed_now = listed(client, query_port, &first.access_token, second.position).await;
    listed_now.sort();
    let mut expected = vec![first.session_id.clone(), second.session_id.clone()];
    expected.sort();
    assert_eq!(listed_now, expected, "both sessions are listed");

    // A refresh rotates: a new refresh token, a new access token in the same session.
    let rotated = Pair::from(
        refresh(client, command_port, &first.refresh_token).await,
        "refresh",
    )
    .await;
    assert_eq!(rotated.session_id, first.session_id);
    assert_ne!(rotated.refresh_token, first.refresh_token);
    let own = get_as(client, query_port, "/users/me", &rotated.access_token, None).await;
    assert_eq!(own.status(), 200, "the refreshed access token is served");

    // A logout with the access token ends the session: at once on the command side ...
    let logout = client
        .post(format!("http://127.0.0.1:{command_port}/logout"))
        .bearer_auth(&rotated.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(logout.status(), 204, "logout");
    let after = refresh(client, command_port, &rotated.refresh_token).await;
    assert_eq!(after.status(), 401, "a refresh of a logged-out session");
    // ... and on the query side within the bound, for both access tokens of the session.
    tokio::time::sleep(REVOCATION_BOUND).await;
    for token in [&first.access_token, &rotated.access_token] {
        let own = get_as(client, query_port, "/users/me", token, None).await;
        assert_eq!(
            own.status(),
            401,
            "an access token of a session logged out {REVOCATION_BOUND:?} ago is still served"
        );
    }
    // The other session goes on, and is the only one listed.
    let position = second.position.max(rotated.position);
    assert_eq!(
        listed(client, query_port, &second.access_token, position).await,
        vec![second.session_id.clone()]
    );

    // A client whose access token expired logs out with its refresh token.
    let logout = post(
        client,
        command_port,
        "/logout",
        json!({ "refresh_token": second.refresh_token }),
    )
    .await;
    assert_eq!(logout.status(), 204, "logout with the refresh token");
    tokio::time::sleep(REVOCATION_BOUND).await;
    let own = get_as(client, query_port, "/users/me", &second.access_token, None).await;
    assert_eq!(own.status(), 401, "the second session's access token");
}
