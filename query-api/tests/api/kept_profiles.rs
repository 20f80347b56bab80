//! Profiles the query API keeps in memory follow the read model: a change the aggregator
//! commits reaches the answers, at once for a read with `X-Min-Position` (ADR 6).

use std::time::{Duration, Instant};

use read_model_schema::USERS_VERSION;
use uuid::Uuid;

use crate::harness::{TestApp, problem, spawn, spawn_with};

/// Changes a row and moves the checkpoint in one transaction, as the aggregator does, to a
/// position just written to the store: returned, for a read to ask for.
async fn project(app: &TestApp, id: Uuid, status: &str, login_count: i64) -> u64 {
    let position = app.written_position().await;
    let mut transaction = app.pool.begin().await.unwrap();
    sqlx::query("UPDATE users SET status = $2, login_count = $3, position = $4 WHERE id = $1")
        .bind(id)
        .bind(status)
        .bind(login_count)
        .bind(i64::try_from(position).unwrap())
        .execute(&mut *transaction)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO projection_checkpoints (projection, version, position) VALUES ('users', $2, $1) \
         ON CONFLICT (projection) DO UPDATE SET position = excluded.position",
    )
    .bind(i64::try_from(position).unwrap())
    .bind(USERS_VERSION)
    .execute(&mut *transaction)
    .await
    .unwrap();
    transaction.commit().await.unwrap();
    position
}

async fn login_count(app: &TestApp, token: &str, min_position: Option<u64>) -> u64 {
    let response = app
        .get_with_min_position("/users/me", token, min_position)
        .await;
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    body["login_count"].as_u64().unwrap()
}

/// Ann, active, and her token, her profile read once: kept from then on, where profiles are
/// kept.
async fn ann_read_once(app: &TestApp) -> (Uuid, String) {
    let ann = app.seed_user("ann@example.com", "active", &["user"]).await;
    let token = app.token_for(ann.id, &["user"]).await;
    assert_eq!(login_count(app, &token, None).await, 3);
    (ann.id, token)
}

#[tokio::test]
async fn a_kept_profile_takes_each_change_the_read_model_commits() {
    let app = spawn().await;
    let (ann, token) = ann_read_once(&app).await;

    // With X-Min-Position the change is there at once.
    let first = project(&app, ann, "active", 4).await;
    assert_eq!(login_count(&app, &token, Some(first)).await, 4);

    // Without it, within the sync interval.
    project(&app, ann, "active", 5).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while login_count(&app, &token, None).await != 5 {
        assert!(
            Instant::now() < deadline,
            "the kept profile never took the change"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_deactivation_the_read_model_commits_refuses_a_token_read_from_memory_before() {
    let app = spawn().await;
    let (ann, token) = ann_read_once(&app).await;

    let position = project(&app, ann, "deactivated", 3).await;
    let response = app
        .get_with_min_position("/users/me", &token, Some(position))
        .await;
    let (status, _) = problem(response).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn with_no_profiles_kept_every_read_goes_to_the_read_model() {
    let app = spawn_with(|settings| settings.query.cache_profiles = 0).await;
    let (ann, token) = ann_read_once(&app).await;
    // Changed behind every checkpoint: only a read of the database can see it.
    sqlx::query("UPDATE users SET login_count = 9 WHERE id = $1")
        .bind(ann)
        .execute(&app.pool)
        .await
        .unwrap();
    assert_eq!(login_count(&app, &token, None).await, 9);
}
