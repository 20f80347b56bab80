//! `migrate`, `reset` and `rebuild`, and workers of another version meeting a rebuilt view.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use aggregator::read_model::Checkpoint;
use aggregator::{Outcome, Projector, Target, admin};
use read_model_schema::USERS_VERSION;

use crate::support::{
    Env, Views, Writer, concurrent_writers, drain, env, options, settle, wait_for_rows,
};

#[tokio::test]
async fn migrations_apply_twice_beside_the_message_store() {
    let env = env().await;
    env.read_model.migrate().await.unwrap();
    env.read_model.migrate().await.unwrap();
    message_store::migrate(env.db.url()).await.unwrap();
}

/// What `writers` writers wrote at once (`users` accounts, `ops` changes each), projected by a
/// live worker: the writer, the worker, the views it built (all that was written) and its
/// checkpoint.
async fn projected_live(
    env: &Env,
    writers: usize,
    users: usize,
    ops: usize,
) -> (Writer, Projector, Views, Checkpoint) {
    let writer = concurrent_writers(&env.store, &env.sealer, writers, users, ops).await;
    let mut live = Projector::users(
        env.store.clone(),
        env.sealer.clone(),
        env.read_model.clone(),
        options(13),
    );
    drain(&mut live, &env.read_model, writer.last()).await;
    let views = env.views().await;
    assert_eq!(views, writer.expected_views());
    assert!(!views.sessions.is_empty(), "the history has sessions");
    (writer, live, views, env.users_checkpoint().await)
}

#[tokio::test]
async fn reset_and_rebuild_give_the_users_and_sessions_the_live_worker_built() {
    let env = env().await;
    let (writer, mut projector, live, checkpoint) = projected_live(&env, 3, 10, 5).await;

    rebuild_and_expect_the_same_view(&env, &live, checkpoint).await;
    // The indexes carry the migrations' names again.
    let indexes = |table: &'static str| {
        let pool = env.read_model.as_postgres().unwrap().clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT indexname FROM pg_indexes WHERE tablename = $1 ORDER BY 1",
            )
            .bind(table)
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(
        indexes("users").await,
        [
            "users_email_normalized_idx",
            "users_pkey",
            "users_position_idx",
            "users_status_id_idx"
        ]
    );
    assert_eq!(
        indexes("sessions").await,
        ["sessions_pkey", "sessions_user_started_idx"]
    );

    admin::reset(&env.read_model, "users").await.unwrap();
    let emptied = env.views().await;
    assert!(emptied.users.is_empty() && emptied.sessions.is_empty());
    assert_eq!(env.users_checkpoint().await.position, 0);
    // The same worker notices that its checkpoint moved and replays from zero.
    drain(&mut projector, &env.read_model, writer.last()).await;
    assert_eq!(env.views().await, live);
}

/// Rebuilds the views while nothing is appended, and checks that the live views come out as
/// they went in: the same rows of users and sessions at the same `checkpoint`, and no
/// rebuild's checkpoint or table left.
async fn rebuild_and_expect_the_same_view(env: &Env, rows: &Views, checkpoint: Checkpoint) {
    admin::rebuild(&env.store, &env.sealer, &env.read_model, "users", 11)
        .await
        .unwrap();
    assert_eq!(&env.views().await, rows);
    assert_eq!(env.users_checkpoint().await, checkpoint);
    let left: Vec<String> = sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE tablename LIKE '%rebuild%'",
    )
    .fetch_all(env.read_model.as_postgres().unwrap())
    .await
    .unwrap();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(
        env.read_model.checkpoint("users:rebuild").await.unwrap(),
        None
    );
}

#[tokio::test]
async fn a_rebuild_while_writers_keep_appending_and_the_live_worker_runs_catches_up() {
    let env = env().await;
    let writer = Writer::with_random_history(env.store.clone(), env.sealer.clone(), 20, 3).await;
    let live = Projector::users(
        env.store.clone(),
        env.sealer.clone(),
        env.read_model.clone(),
        options(25),
    );
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
        admin::rebuild(&env.store, &env.sealer, &env.read_model, "users", 7)
            .await
            .unwrap();
    }
    writing.store(false, Ordering::Relaxed);
    background.await.unwrap();

    // The rebuilt view is swapped in under the live worker, which carries on from its checkpoint.
    wait_for_rows(&env, &writer).await;
    live_task.abort();
}

#[tokio::test]
async fn folding_several_batches_per_commit_with_a_small_cache_gives_the_same_view() {
    let env = env().await;
    let writer = concurrent_writers(&env.store, &env.sealer, 3, 10, 5).await;
    // Commits every few changed rows, and drops its cached rows after nearly every commit, so
    // rows are reloaded from the view (as of the checkpoint) again and again.
    let mut projector = Projector::users(
        env.store.clone(),
        env.sealer.clone(),
        env.read_model.clone(),
        aggregator::ProjectorOptions {
            fold_rows: 4,
            cache_rows: 3,
            ..options(5)
        },
    );
    drain(&mut projector, &env.read_model, writer.last()).await;
    assert_eq!(env.views().await, writer.expected_views());
}

#[tokio::test]
async fn a_worker_of_an_older_version_writes_nothing_into_a_view_rebuilt_at_the_newer_one() {
    let env = env().await;
    let writer = Writer::with_random_history(env.store.clone(), env.sealer.clone(), 8, 3).await;
    // A replica of the previous build keeps the live view.
    let mut old = Projector::users(
        env.store.clone(),
        env.sealer.clone(),
        env.read_model.clone(),
        options(5),
    )
    .with_version(USERS_VERSION - 1);
    drain(&mut old, &env.read_model, writer.last()).await;
    let before = env.users_checkpoint().await;
    assert_eq!(before.version, USERS_VERSION - 1);

    // This build rebuilds the view; nothing was appended meanwhile, so the rebuild ends exactly
    // at the old worker's checkpoint, and a compare-and-set on the position alone would pass.
    let rebuilt = admin::rebuild(&env.store, &env.sealer, &env.read_model, "users", 7)
        .await
        .unwrap();
    assert_eq!(rebuilt.position, before.position);
    let rows = env.views().await;
    let checkpoint = env.users_checkpoint().await;
    assert_eq!(checkpoint.version, USERS_VERSION);

    // More events: the old worker, its rows and checkpoint cached, must not fold them into the
    // view of the newer version.
    for row in writer.expected_rows().iter().take(4) {
        writer.login(row.id, 50_000).await;
    }
    settle(&env.store, writer.last()).await;
    for _ in 0..3 {
        let outcome = old.process_next_batch().await;
        assert!(
            !matches!(outcome, Ok(Outcome::Applied { .. })),
            "the old worker applied a batch: {outcome:?}"
        );
    }
    assert_eq!(env.views().await, rows);
    assert_eq!(env.users_checkpoint().await, checkpoint);

    // A worker of this build carries on.
    let mut current = Projector::users(
        env.store.clone(),
        env.sealer.clone(),
        env.read_model.clone(),
        options(5),
    );
    drain(&mut current, &env.read_model, writer.last()).await;
    assert_eq!(env.views().await, writer.expected_views());
}

#[tokio::test]
async fn a_rebuild_killed_after_some_of_its_commits_and_run_again_gives_the_live_view() {
    let env = env().await;
    let (writer, mut live, rows, checkpoint) = projected_live(&env, 3, 20, 6).await;

    // A rebuild that commits every few rows, killed once several of its commits are in.
    let rebuilding = {
        let (store, sealer, read_model) = (
            env.store.clone(),
            env.sealer.clone(),
            env.read_model.clone(),
        );
        tokio::spawn(async move {
            admin::rebuild_with(
                &store,
                &sealer,
                &read_model,
                "users",
                admin::RebuildOptions {
                    batch_size: 2,
                    fold_rows: 2,
                },
            )
            .await
        })
    };
    let mut commits_seen = std::collections::BTreeSet::new();
    while commits_seen.len() < 3 {
        assert!(
            !rebuilding.is_finished(),
            "the rebuild finished before it could be killed"
        );
        if let Some(rebuild) = env.read_model.checkpoint("users:rebuild").await.unwrap()
            && rebuild.position > 0
        {
            commits_seen.insert(rebuild.position);
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    rebuilding.abort();
    assert!(
        rebuilding.await.unwrap_err().is_cancelled(),
        "the rebuild ended by itself before it was killed"
    );
    let left = env
        .read_model
        .checkpoint("users:rebuild")
        .await
        .unwrap()
        .unwrap();
    assert!(left.position > 0 && left.position < checkpoint.position);
    let half_built = env.read_model.rows(&Target::USERS_REBUILD).await.unwrap();
    assert!(!half_built.is_empty() && half_built.len() < rows.users.len());
    // The live views are untouched.
    assert_eq!(env.views().await, rows);
    assert_eq!(env.users_checkpoint().await, checkpoint);

    rebuild_and_expect_the_same_view(&env, &rows, checkpoint).await;
    // The live worker carries on from there.
    writer.random_history(2, 2).await;
    drain(&mut live, &env.read_model, writer.last()).await;
    assert_eq!(env.views().await, writer.expected_views());
}
