//! Profiles and who may read them.

use chrono::TimeDelta;
use uuid::Uuid;

use crate::harness::{now, problem, spawn};

#[tokio::test]
async fn a_user_reads_their_own_profile_by_id_and_as_me() {
    let app = spawn().await;
    let user = app.seed_user("Ann@Example.com", "active", &["user"]).await;
    let token = app.token_for(user.id, &["user"]).await;

    for path in [format!("/users/{}", user.id), "/users/me".to_owned()] {
        let response = app.get(&path, Some(&token)).await;
        assert_eq!(response.status(), 200, "{path}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["id"], user.id.to_string());
        assert_eq!(body["email"], "Ann@Example.com");
        assert_eq!(body["status"], "active");
        assert_eq!(body["login_count"], 3);
        assert_eq!(body["roles"], serde_json::json!(["user"]));
        assert!(body.get("password_hash").is_none());
    }
}

#[tokio::test]
async fn reading_someone_elses_profile_is_forbidden() {
    let app = spawn().await;
    let ann = app.seed_user("ann@example.com", "active", &["user"]).await;
    let bob = app.seed_user("bob@example.com", "active", &["user"]).await;

    let response = app
        .get(
            &format!("/users/{}", bob.id),
            Some(&app.token_for(ann.id, &["user"]).await),
        )
        .await;
    let (status, body) = problem(response).await;
    assert_eq!((status, body["code"].as_str()), (403, Some("forbidden")));

    // Whether an id exists is none of a non-administrator's business either.
    let response = app
        .get(
            &format!("/users/{}", Uuid::now_v7()),
            Some(&app.token_for(ann.id, &["user"]).await),
        )
        .await;
    assert_eq!(response.status(), 403);
}

#[tokio::test]
async fn an_administrator_reads_any_profile_and_learns_of_unknown_ones() {
    let app = spawn().await;
    let admin = app
        .seed_user("root@example.com", "active", &["admin", "user"])
        .await;
    let bob = app
        .seed_user("bob@example.com", "deactivated", &["user"])
        .await;
    let token = app.token_for(admin.id, &["admin", "user"]).await;

    let response = app.get(&format!("/users/{}", bob.id), Some(&token)).await;
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["status"], "deactivated");

    let (status, body) = app
        .get_problem(&format!("/users/{}", Uuid::now_v7()), &token)
        .await;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));
    let (status, _) = app.get_problem("/users/not-a-uuid", &token).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn requests_without_a_valid_token_are_refused_alike() {
    let app = spawn().await;
    let user = app.seed_user("ann@example.com", "active", &["user"]).await;
    let path = format!("/users/{}", user.id);

    let stranger = tokens::TokenIssuer::new(
        tokens::KeySet::from(tokens::SigningKey::generate(tokens::Algorithm::EdDSA).unwrap()),
        app.issuer.settings().clone(),
    );
    let unknown_key = stranger
        .issue(user.id, Uuid::new_v4(), vec![], false, now())
        .unwrap()
        .token
        .expose_secret()
        .clone();
    let expired = app
        .token_at(user.id, &["user"], now() - TimeDelta::hours(2))
        .await;
    let mut tampered = app.token_for(user.id, &["user"]).await;
    tampered.insert(tampered.len() - 3, 'x');

    let cases: [(&str, Option<&str>); 5] = [
        ("no token", None),
        ("garbage", Some("not.a.token")),
        ("expired", Some(&expired)),
        ("unknown key", Some(&unknown_key)),
        ("tampered", Some(&tampered)),
    ];
    let mut bodies = Vec::new();
    for (case, token) in cases {
        let response = app.get(&path, token).await;
        assert_eq!(response.status(), 401, "{case}");
        assert_eq!(response.headers()["www-authenticate"], "Bearer", "{case}");
        let (_, body) = problem(response).await;
        bodies.push(body);
    }
    assert!(
        bodies.windows(2).all(|pair| pair[0] == pair[1]),
        "the refusals differ: {bodies:?}"
    );
}

#[tokio::test]
async fn a_deactivated_administrator_can_no_longer_list_or_read_others() {
    let app = spawn().await;
    let admin = app
        .seed_user("root@example.com", "deactivated", &["admin"])
        .await;
    let bob = app.seed_user("bob@example.com", "active", &["user"]).await;
    let token = app.token_for(admin.id, &["admin"]).await;
    for path in [
        format!("/users/{}", bob.id),
        "/users?status=active".to_owned(),
        format!("/users/{}/events", bob.id),
    ] {
        let (status, _) = app.get_problem(&path, &token).await;
        assert_eq!(status, 401, "{path}");
    }
}
