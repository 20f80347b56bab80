//! The query API stops with its shutdown signal, its background tasks with it: nothing of it
//! keeps running, or keeps a connection, after it has stopped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use platform::clock::SystemClock;
use tokio::sync::oneshot;

use crate::harness::spawn_with;

#[tokio::test]
async fn once_stopped_the_query_api_runs_no_task_and_holds_no_connection() {
    let mut app = spawn_with(|settings| settings.query.max_view_lag_ms = 100).await;
    let user = app.seed_user("ann@example.com", "active", &["user"]).await;
    let token = app.token_for(user.id, &["user"]).await;
    // Served, so its background tasks run: the kept profiles sync, the store is sampled.
    assert_eq!(app.get("/users/me", Some(&token)).await.status(), 200);
    assert!(app.open_connections().await > 0);

    app.stop_within(Duration::from_secs(10))
        .await
        .expect("the query API did not stop within 10 s of its shutdown signal")
        .unwrap();

    // Its pools are gone once no task holds them, and their connections with them.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let open = app.open_connections().await;
        if open == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{open} connections of the query API were still open 10 s after it stopped: \
             something of it still runs"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_background_tasks_end_when_their_shutdown_signal_completes() {
    let app = spawn_with(|settings| settings.query.max_view_lag_ms = 100).await;
    let state = query_api::AppState::connect(&app.settings, Arc::new(SystemClock))
        .await
        .unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let tasks = state.spawn_background(async {
        let _ = stopped.await;
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!tasks.is_finished(), "the tasks ended before their signal");

    stop.send(()).unwrap();

    tokio::time::timeout(Duration::from_secs(10), tasks.stopped())
        .await
        .expect("the background tasks were still running 10 s after their shutdown signal")
        .unwrap();
}
