//! A session found live is remembered past `query.max_view_lag_ms` while the follower of
//! session ends keeps up with the store, and a logout is still refused within that bound: by the
//! follower dropping the session, or, when the follower cannot be current (held back, or the
//! store out of reach), by the time rule alone (ADR 11).
//!
//! The tests that need the follower current run on a PostgreSQL server of their own: an open
//! write transaction anywhere on a server holds back what readers of the global order see
//! (ADR 2), and other tests on the shared server open them.

use std::time::{Duration, Instant};

use test_support::PrivateCluster;
use uuid::Uuid;

use crate::harness::{
    TestApp, now, refused_everywhere, spawn_on_cluster, spawn_with_store_behind_proxy,
};

const MAX_VIEW_LAG: Duration = Duration::from_millis(300);

fn lag_ms() -> u64 {
    u64::try_from(MAX_VIEW_LAG.as_millis()).unwrap()
}

async fn app_on(cluster: &PrivateCluster) -> TestApp {
    app_with_lag_on(cluster, MAX_VIEW_LAG).await
}

async fn app_with_lag_on(cluster: &PrivateCluster, lag: Duration) -> TestApp {
    let lag = u64::try_from(lag.as_millis()).unwrap();
    let (app, _state) = spawn_on_cluster(cluster, |settings| {
        settings.query.max_view_lag_ms = lag;
    })
    .await;
    app
}

/// Ann's session and her token in it.
struct Remembered {
    ann: Uuid,
    session: Uuid,
    token: String,
}

/// Ann, active, with a session the query API found live (and so remembered) several times
/// `lag` ago: by now only the follower can vouch for it, the time rule no longer does.
async fn remembered_long_ago(app: &TestApp, lag: Duration) -> Remembered {
    let ann = app
        .seed_user("ann@example.com", "active", &["user"])
        .await
        .id;
    let session = app.start_session(ann, now()).await;
    let token = app.token_in(ann, session, &["user"], now());
    assert_eq!(app.get("/users/me", Some(&token)).await.status(), 200);
    tokio::time::sleep(3 * lag).await;
    Remembered {
        ann,
        session,
        token,
    }
}

fn routes(ann: Uuid) -> Vec<String> {
    vec![
        "/users/me".to_owned(),
        "/users/me/sessions".to_owned(),
        format!("/users/{ann}"),
        format!("/users/{ann}/events"),
        "/users?status=active".to_owned(),
    ]
}

/// Deletes the messages of session `id` behind the query API's back: a read of its stream now
/// finds no session, and a token in it is refused by whoever reads it.
async fn delete_the_stream_of(app: &TestApp, id: Uuid) {
    let deleted = sqlx::query("DELETE FROM messages WHERE stream_name = $1")
        .bind(format!("session-{id}"))
        .execute(&app.pool)
        .await
        .unwrap();
    assert!(deleted.rows_affected() > 0);
}

async fn log_out(app: &TestApp, remembered: &Remembered) -> Instant {
    app.end_session(remembered.ann, remembered.session).await;
    Instant::now()
}

async fn past_the_bound(committed: Instant) {
    tokio::time::sleep_until((committed + MAX_VIEW_LAG).into()).await;
}

#[tokio::test]
async fn while_the_follower_keeps_up_a_session_remembered_long_ago_is_served_without_reading_its_stream_again()
 {
    // A longer bound than the other tests': on a loaded machine a follower that stalls for a
    // bound is rightly not trusted, and the session's stream is read again.
    let lag = Duration::from_secs(1);
    let cluster = PrivateCluster::start().await;
    let app = app_with_lag_on(&cluster, lag).await;
    let ann = remembered_long_ago(&app, lag).await;
    // Remembered again if the first answer came before the follower had started, which it
    // does not vouch for.
    assert_eq!(app.get("/users/me", Some(&ann.token)).await.status(), 200);
    // A session the query API has not read yet is refused once its stream is gone.
    let unread = app.start_session(ann.ann, now()).await;
    let token_in_unread = app.token_in(ann.ann, unread, &["user"], now());
    delete_the_stream_of(&app, unread).await;
    let (status, _) = app.get_problem("/users/me", &token_in_unread).await;
    assert_eq!(status, 401);

    delete_the_stream_of(&app, ann.session).await;
    for _ in 0..3 {
        tokio::time::sleep(lag).await;
        for path in ["/users/me".to_owned(), format!("/users/{}/events", ann.ann)] {
            let response = app.get(&path, Some(&ann.token)).await;
            assert_eq!(
                response.status(),
                200,
                "{path}: the session's stream was read again"
            );
        }
    }
}

#[tokio::test]
async fn while_the_follower_keeps_up_a_logout_of_a_session_remembered_long_ago_is_refused_on_every_route_within_the_bound()
 {
    let cluster = PrivateCluster::start().await;
    let app = app_on(&cluster).await;
    let ann = remembered_long_ago(&app, MAX_VIEW_LAG).await;
    assert_eq!(app.get("/users/me", Some(&ann.token)).await.status(), 200);

    let committed = log_out(&app, &ann).await;
    past_the_bound(committed).await;
    refused_everywhere(&app, &ann.token, &routes(ann.ann), None).await;
}

#[tokio::test]
async fn with_the_follower_held_back_a_logout_is_refused_on_every_route_within_the_bound_all_the_same()
 {
    let cluster = PrivateCluster::start().await;
    let app = app_on(&cluster).await;
    let ann = remembered_long_ago(&app, MAX_VIEW_LAG).await;

    // A write transaction left open holds back what readers of the global order see: the
    // follower reads nothing past it, while the store's last position moves on.
    let mut held_open = app.pool.begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *held_open)
        .await
        .unwrap();
    let committed = log_out(&app, &ann).await;
    past_the_bound(committed).await;
    refused_everywhere(&app, &ann.token, &routes(ann.ann), None).await;
    held_open.rollback().await.unwrap();
}

#[tokio::test]
async fn with_the_store_out_of_reach_a_session_remembered_long_ago_is_not_served_past_the_bound_of_its_logout()
 {
    let (app, proxy) =
        spawn_with_store_behind_proxy(|settings| settings.query.max_view_lag_ms = lag_ms()).await;
    let ann = remembered_long_ago(&app, MAX_VIEW_LAG).await;

    // The query API's store connections are cut; the logout reaches the store all the same.
    proxy.freeze();
    let committed = log_out(&app, &ann).await;
    past_the_bound(committed).await;
    let asking = tokio::spawn({
        let request = app.client.get(app.url("/users/me")).bearer_auth(&ann.token);
        async move { request.send().await.unwrap().status().as_u16() }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    if asking.is_finished() {
        let status = asking.await.unwrap();
        assert_ne!(status, 200, "served with the store out of reach");
    } else {
        // Waiting on the store, which answers once the cut heals: with the logout.
        proxy.thaw();
        assert_eq!(asking.await.unwrap(), 401);
    }
    proxy.thaw();
    refused_everywhere(&app, &ann.token, &routes(ann.ann), None).await;
}
