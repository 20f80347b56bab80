//! `migrate`, `reset` and `rebuild`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use aggregator::{Projector, Target, admin};

use crate::support::{Writer, concurrent_writers, drain, env, options};

#[tokio::test]
async fn migrations_apply_twice_beside_the_message_store() {
    let env = env().await;
    env.read_model.migrate().await.unwrap();
    env.read_model.migrate().await.unwrap();
    message_store::migrate(env.db.url()).await.unwrap();
}

#[tokio::test]
async fn reset_and_rebuild_give_the_view_the_live_worker_built() {
    let env = env().await;
    let writer = concurrent_writers(&env.store, 3, 10, 5).await;
    let mut projector = Projector::users(env.store.clone(), env.read_model.clone(), options(13));
    drain(&mut projector, &env.read_model, writer.last()).await;
    let live = env.read_model.rows(&Target::USERS).await.unwrap();
    assert_eq!(live, writer.expected_rows());
    let checkpoint = env.read_model.checkpoint("users").await.unwrap().unwrap();

    admin::rebuild(&env.store, &env.read_model, "users", 11)
        .await
        .unwrap();
    assert_eq!(env.read_model.rows(&Target::USERS).await.unwrap(), live);
    assert_eq!(
        env.read_model.checkpoint("users").await.unwrap().unwrap(),
        checkpoint
    );
    assert_eq!(
        env.read_model.checkpoint("users:rebuild").await.unwrap(),
        None
    );
    // The indexes carry the migrations' names again.
    let indexes: Vec<String> =
        sqlx::query_scalar("SELECT indexname FROM pg_indexes WHERE tablename = 'users' ORDER BY 1")
            .fetch_all(env.read_model.as_postgres().unwrap())
            .await
            .unwrap();
    assert_eq!(
        indexes,
        [
            "users_email_normalized_idx",
            "users_pkey",
            "users_position_idx",
            "users_status_id_idx"
        ]
    );

    admin::reset(&env.read_model, "users").await.unwrap();
    assert!(
        env.read_model
            .rows(&Target::USERS)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        env.read_model
            .checkpoint("users")
            .await
            .unwrap()
            .unwrap()
            .position,
        0
    );
    // The same worker notices that its checkpoint moved and replays from zero.
    drain(&mut projector, &env.read_model, writer.last()).await;
    assert_eq!(env.read_model.rows(&Target::USERS).await.unwrap(), live);
}

#[tokio::test]
async fn a_rebuild_while_writers_keep_appending_and_the_live_worker_runs_catches_up() {
    let env = env().await;
    let writer = Writer::new(env.store.clone());
    writer.random_history(20, 3).await;
    let live = Projector::users(env.store.clone(), env.read_model.clone(), options(25));
    let live_task = tokio::spawn(live.run(std::future::pending()));

    let writing = Arc::new(AtomicBool::new(true));
    let background = {
        let (writer, writing) = (writer.clone(), writing.clone());
        tokio::spawn(async move {
            while writing.load(Ordering::Relaxed) {
                writer.random_history(3, 2).await;
            }
        })
    };
    for _ in 0..3 {
        admin::rebuild(&env.store, &env.read_model, "users", 7)
            .await
            .unwrap();
    }
    writing.store(false, Ordering::Relaxed);
    background.await.unwrap();

    // The rebuilt view is swapped in under the live worker, which carries on from its checkpoint.
    let expected = writer.expected_rows();
    let mut rows = Vec::new();
    for _ in 0..500 {
        rows = env.read_model.rows(&Target::USERS).await.unwrap();
        if rows == expected {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(rows, expected);
    live_task.abort();
}

#[tokio::test]
async fn folding_several_batches_per_commit_with_a_small_cache_gives_the_same_view() {
    let env = env().await;
    let writer = concurrent_writers(&env.store, 3, 10, 5).await;
    // Commits every few changed rows, and drops its cached rows after nearly every commit, so
    // rows are reloaded from the view (as of the checkpoint) again and again.
    let mut projector = Projector::users(
        env.store.clone(),
        env.read_model.clone(),
        aggregator::ProjectorOptions {
            fold_rows: 4,
            cache_rows: 3,
            ..options(5)
        },
    );
    drain(&mut projector, &env.read_model, writer.last()).await;
    assert_eq!(
        env.read_model.rows(&Target::USERS).await.unwrap(),
        writer.expected_rows()
    );
}
