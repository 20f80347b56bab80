//! A database restart that no request notices once the server is back: every connection that
//! died in the read model's pool is replaced by the request that meets it.

use test_support::{PrivateCluster, StopMode};

use crate::harness::spawn_on_cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_database_restart_no_request_fails_on_a_connection_that_died_in_the_pool() {
    let cluster = PrivateCluster::start().await;
    let pool_size = 4;
    let (app, state) = spawn_on_cluster(&cluster, |settings| {
        settings.read_model.max_connections = Some(pool_size);
        // Every request reads its row from the read model, and the kept profiles' follower,
        // having synced once, does not use the dead connections up before the requests do.
        settings.query.cache_profiles = 0;
        settings.query.cache_sync_ms = 3_600_000;
    })
    .await;
    let ann = app.seed_user("ann@example.com", "active", &["user"]).await;
    let root = app
        .seed_user("root@example.com", "active", &["admin", "user"])
        .await;
    let requests = [
        ("/users/me", app.token_for(ann.id, &["user"]).await),
        (
            "/users?status=active",
            app.token_for(root.id, &["admin", "user"]).await,
        ),
    ];
    for (path, token) in &requests {
        assert_eq!(app.get(path, Some(token)).await.status(), 200, "{path}");
    }
    // Fill the read model's pool: every connection in use at once, then idle.
    let query_api::UsersView::Postgres(pool) = state.read_model.clone() else {
        panic!("the read model is on PostgreSQL");
    };
    let warming: Vec<_> = (0..pool_size)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                sqlx::query("SELECT pg_sleep(0.2)")
                    .execute(&pool)
                    .await
                    .unwrap();
            })
        })
        .collect();
    for warm in warming {
        warm.await.unwrap();
    }
    assert_eq!(pool.size(), pool_size);

    cluster.stop(StopMode::Fast).await;
    cluster.restart().await;

    // Every idle connection in the pool is dead now; each request must still succeed.
    let mut answers = Vec::new();
    for n in 0..2 * pool_size as usize {
        let (path, token) = &requests[n % 2];
        answers.push((n, *path, app.get(path, Some(token)).await.status().as_u16()));
    }
    assert!(
        answers.iter().all(|(_, _, status)| *status == 200),
        "requests failed after the restart: {answers:?}"
    );
}
