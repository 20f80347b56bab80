//! The worker: ordering, crashes, takeover, unknown and poison events, two databases, SQLite.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use aggregator::{Application, Outcome, Projector, ProjectorOptions, Settings};
use serde_json::json;
use test_support::FreezingProxy;

use crate::support::{
    Stores, Writer, append_raw, append_to_user, clean_rebuild, concurrent_writers, connect_store,
    drain, env, env_apart, http_get, options, projection_metric, read_model, settle,
    users_view_named, views, wait_for_rows,
};

#[tokio::test]
async fn concurrent_writers_committing_out_of_order_end_in_the_fold_of_every_event() {
    let env = env().await;
    let mut projector = Projector::users(
        env.store.clone(),
        env.sealer.clone(),
        env.read_model.clone(),
        options(17),
    );
    let (store, sealer) = (env.store.clone(), env.sealer.clone());
    let writing = tokio::spawn(async move { concurrent_writers(&store, &sealer, 6, 15, 6).await });
    // Project while the writers commit, so batches end at every kind of interleaving.
    while !writing.is_finished() {
        projector.process_next_batch().await.unwrap();
    }
    let writer = writing.await.unwrap();
    drain(&mut projector, &env.read_model, writer.last()).await;

    let views = env.views().await;
    assert_eq!(views.users.len(), 6 * 15);
    assert!(!views.sessions.is_empty());
    assert_eq!(views, writer.expected_views());
}

#[tokio::test]
async fn a_worker_killed_at_random_points_resumes_to_the_view_of_a_clean_rebuild() {
    let env = env().await;
    let (store, sealer) = (env.store.clone(), env.sealer.clone());
    let writing = tokio::spawn(async move { concurrent_writers(&store, &sealer, 4, 10, 8).await });
    let mut runs = 0;
    while !writing.is_finished() || runs < 20 {
        runs += 1;
        let projector = Projector::users(
            env.store.clone(),
            env.sealer.clone(),
            env.read_model.clone(),
            options(1 + fastrand::usize(..9)),
        );
        let task = tokio::spawn(projector.run(std::future::pending()));
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..60))).await;
        task.abort();
        let _ = task.await;
    }
    let writer = writing.await.unwrap();
    let mut projector = Projector::users(
        env.store.clone(),
        env.sealer.clone(),
        env.read_model.clone(),
        options(50),
    );
    drain(&mut projector, &env.read_model, writer.last()).await;

    let views = env.views().await;
    assert_eq!(views, writer.expected_views());
    assert_eq!(views, clean_rebuild(&env, writer.last()).await);
}

#[tokio::test]
async fn of_two_workers_on_one_projection_one_works_and_the_other_takes_over_when_it_stops() {
    let env = env().await;
    let writer = Writer::new(env.store.clone(), env.sealer.clone());
    let first = Projector::users(
        env.store.clone(),
        env.sealer.clone(),
        env.read_model.clone(),
        options(10),
    );
    let second = Projector::users(
        env.store.clone(),
        env.sealer.clone(),
        env.read_model.clone(),
        options(10),
    );
    let (first_stats, second_stats) = (first.stats(), second.stats());
    let (stop_first, first_stopped) = tokio::sync::oneshot::channel::<()>();
    let first_task = tokio::spawn(first.run(async move {
        let _ = first_stopped.await;
    }));
    wait_until(|| first_stats.holds_lock.load(Relaxed)).await;
    let second_task = tokio::spawn(second.run(std::future::pending()));

    writer.random_history(10, 3).await;
    wait_for_rows(&env, &writer).await;
    let status = aggregator::admin::status(&env.store, &env.read_model)
        .await
        .unwrap();
    assert!(
        status[0]
            .held_by
            .as_deref()
            .unwrap()
            .starts_with("aggregator users")
    );
    assert_eq!(status[0].lag, 0);
    assert!(first_stats.events_applied.load(Relaxed) > 0);
    assert_eq!(second_stats.events_applied.load(Relaxed), 0);
    assert!(!second_stats.holds_lock.load(Relaxed));

    stop_first.send(()).unwrap();
    first_task.await.unwrap();
    writer.random_history(10, 3).await;
    wait_for_rows(&env, &writer).await;
    assert!(second_stats.holds_lock.load(Relaxed));
    assert!(second_stats.events_applied.load(Relaxed) > 0);
    second_task.abort();
}

async fn wait_until(condition: impl Fn() -> bool) {
    for _ in 0..500 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out");
}

#[tokio::test]
async fn unknown_event_types_are_counted_and_skipped_and_other_categories_pass_unnoticed() {
    let env = env().await;
    let writer = Writer::with_random_history(env.store.clone(), env.sealer.clone(), 2, 2).await;
    let id = writer.expected_rows()[0].id;
    append_to_user(&env.store, id, "UserRenamed", 1, json!({ "name": "x" })).await;
    let last = append_raw(
        &env.store,
        "userEmail-5f2b",
        "EmailReserved",
        json!({ "user_id": id }),
        json!({}),
    )
    .await;
    settle(&env.store, last).await;
    let target = users_view_named("users-skipping");
    let skipped = || projection_metric("projection_events_skipped_total", target.checkpoint);
    let before = skipped().unwrap_or(0.0);
    let mut projector = Projector::new(
        env.store.clone(),
        env.sealer.clone(),
        env.read_model.clone(),
        target.clone(),
        options(1000),
    );
    let outcome = projector.process_next_batch().await.unwrap();
    assert!(
        matches!(outcome, Outcome::Applied { skipped: 1, position, .. } if position == last),
        "{outcome:?}"
    );
    assert_eq!(projector.process_next_batch().await.unwrap(), Outcome::Idle);
    assert_eq!(
        views(&env.read_model, &target).await,
        writer.expected_views()
    );
    assert_eq!(
        skipped().map(|after| after - before),
        Some(1.0),
        "projection_events_skipped_total counts the one unknown event, and nothing else"
    );
}

#[tokio::test]
async fn a_poison_event_halts_the_projection_before_it_and_the_checkpoint_stays_there() {
    let env = env().await;
    let writer = Writer::with_random_history(env.store.clone(), env.sealer.clone(), 3, 2).await;
    let id = writer.expected_rows()[0].id;
    let before = env.store.head_position().await.unwrap();
    // A known type at a version this build cannot read.
    let poison = append_to_user(
        &env.store,
        id,
        "UserActivated",
        2,
        json!({ "at": "2026-01-01T00:00:00Z" }),
    )
    .await;
    let after = writer.expected_views();
    writer.random_history(1, 1).await;
    settle(&env.store, writer.last()).await;

    let target = users_view_named("users-poisoned");
    let halted = || projection_metric("projection_halted", target.checkpoint);
    let worker = |store, read_model| {
        Projector::new(
            store,
            env.sealer.clone(),
            read_model,
            target.clone(),
            options(1000),
        )
    };
    assert_eq!(halted(), None, "nothing has halted this projection yet");
    let mut projector = worker(env.store.clone(), env.read_model.clone());
    let outcome = projector.process_next_batch().await.unwrap();
    let Outcome::Halted { reason } = outcome else {
        panic!("{outcome:?}")
    };
    assert!(reason.contains("UserActivated version 2"), "{reason}");
    assert_eq!(halted(), Some(1.0), "projection_halted says so");
    let checkpoint = env
        .read_model
        .checkpoint(target.checkpoint)
        .await
        .unwrap()
        .unwrap();
    assert!(checkpoint.position >= before && checkpoint.position < poison);
    assert_eq!(views(&env.read_model, &target).await, after);

    // Halted stays halted, and a fresh worker halts at the same place.
    assert!(matches!(
        projector.process_next_batch().await.unwrap(),
        Outcome::Halted { .. }
    ));
    let mut again = worker(env.store.clone(), env.read_model.clone());
    assert!(matches!(
        again.process_next_batch().await.unwrap(),
        Outcome::Halted { .. }
    ));
    assert_eq!(
        env.read_model
            .checkpoint(target.checkpoint)
            .await
            .unwrap()
            .unwrap(),
        checkpoint
    );
    assert_eq!(halted(), Some(1.0));
}

#[tokio::test]
async fn a_login_for_a_user_the_view_does_not_have_is_poison_too() {
    let env = env().await;
    let writer = Writer::with_random_history(env.store.clone(), env.sealer.clone(), 2, 1).await;
    let stranger = uuid::Uuid::now_v7();
    let poison = append_raw(
        &env.store,
        &format!("userLogin-{stranger}"),
        "LoginSucceeded",
        json!({ "at": "2026-01-01T00:00:00Z", "login_count": 1 }),
        json!({ "schemaVersion": 1 }),
    )
    .await;
    settle(&env.store, poison).await;
    let mut projector = Projector::users(
        env.store.clone(),
        env.sealer.clone(),
        env.read_model.clone(),
        options(1000),
    );
    let outcome = projector.process_next_batch().await.unwrap();
    assert!(
        matches!(&outcome, Outcome::Halted { reason } if reason.contains("no such user")),
        "{outcome:?}"
    );
    // What came before it is applied.
    assert_eq!(env.views().await, writer.expected_views());
}

#[tokio::test]
async fn the_application_projects_into_a_read_model_in_another_database_and_serves_its_probes() {
    let env = env_apart().await;
    let mut settings = Settings::default();
    settings.database.url = env.db.url().into();
    settings.database.poll_interval_ms = 200;
    settings.read_model.url = Some(env.read_model_url.as_str().into());
    settings.aggregator.http.address = "127.0.0.1:0".into();
    settings.aggregator.batch_size = 7;
    settings.mail.token_key = Some("ab".repeat(32));
    settings.webhooks.secret_key = Some("5e".repeat(32));
    // The master key of the tests' vaults, which sealed what the writer below appends.
    settings.personal_data.master_key_id = "test".into();
    settings.personal_data.master_key = Some("4d".repeat(32));
    let application = Application::build(settings).await.unwrap();
    let port = application.port().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(application.run_until_stopped(async move {
        let _ = stopped.await;
    }));

    let writer = Writer::with_random_history(env.store.clone(), env.sealer.clone(), 5, 4).await;
    wait_for_rows(&env, &writer).await;
    // Nothing of the view is in the store's database.
    let in_store: Option<String> = sqlx::query_scalar("SELECT to_regclass('users')::text")
        .fetch_one(&env.db.pool().await)
        .await
        .unwrap();
    assert_eq!(in_store, None);

    assert_eq!(http_get(port, "/healthz").await.0, 200);
    assert_eq!(http_get(port, "/readyz").await.0, 200);
    let (status, metrics) = http_get(port, "/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "projection_events_applied_total",
        "projection_batch_seconds",
        "projection_position",
        "projection_lag_events",
    ] {
        assert!(metrics.contains(name), "{name} missing from {metrics}");
    }
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn the_worker_runs_on_sqlite_for_the_standalone_mode() {
    let stores = Stores::sqlite().await;
    let (store, read_model) = (&stores.store, &stores.read_model);
    let writer = Writer::with_random_history(store.clone(), stores.sealer.clone(), 5, 4).await;
    // A session whatever the random history holds.
    let session = writer
        .start_session(writer.expected_rows()[0].id, 50_000)
        .await;
    writer.refresh_session(session, 50_001).await;
    let mut projector = Projector::users(
        store.clone(),
        stores.sealer.clone(),
        read_model.clone(),
        options(6),
    );
    drain(&mut projector, read_model, writer.last()).await;
    let live = stores.views().await;
    assert_eq!(live, writer.expected_views());

    aggregator::admin::reset(read_model, "users").await.unwrap();
    let emptied = stores.views().await;
    assert!(emptied.users.is_empty() && emptied.sessions.is_empty());
    drain(&mut projector, read_model, writer.last()).await;
    assert_eq!(stores.views().await, live);
}

#[tokio::test]
async fn a_holder_cut_off_without_a_fin_loses_the_projection_within_its_lease_and_writes_nothing_after()
 {
    let env = env().await;
    let writer = Writer::with_random_history(env.store.clone(), env.sealer.clone(), 6, 2).await;
    let lease = Duration::from_millis(1000);
    let lock_retry = Duration::from_millis(50);
    let options = ProjectorOptions {
        lock_lease: lease,
        lock_retry,
        ..options(50)
    };

    // The holder reads the store directly, but reaches the read model (its lock, its commits)
    // through a link that can be cut without closing anything.
    let holder_link = FreezingProxy::start(&env.read_model_url).await;
    let holder = Projector::users(
        env.store.clone(),
        env.sealer.clone(),
        read_model(holder_link.url()).await,
        options.clone(),
    );
    let holder_stats = holder.stats();
    let holder_task = tokio::spawn(holder.run(std::future::pending()));
    wait_until(|| holder_stats.holds_lock.load(Relaxed)).await;
    wait_for_rows(&env, &writer).await;

    // The standby reaches the read model directly and the store through a link of its own, cut
    // too: once it takes over it holds the projection without moving the checkpoint, so
    // nothing but the takeover itself stops the holder's held-back commit from matching.
    let standby_link = FreezingProxy::start(env.db.url()).await;
    let standby = Projector::users(
        connect_store(standby_link.url()).await,
        env.sealer.clone(),
        env.read_model.clone(),
        options.clone(),
    );
    let standby_stats = standby.stats();
    let standby_task = tokio::spawn(standby.run(std::future::pending()));
    tokio::time::sleep(lease).await;
    assert!(!standby_stats.holds_lock.load(Relaxed));

    let applied_by_holder = holder_stats.events_applied.load(Relaxed);
    let rows = env.users_view().await;
    let checkpoint = env.users_checkpoint().await;
    standby_link.freeze();
    holder_link.freeze();
    let cut_at = Instant::now();
    // Events the holder reads, folds and tries to commit through its cut link.
    for row in writer.expected_rows().iter().take(3) {
        writer.login(row.id, 60_000).await;
    }

    let deadline = cut_at + Duration::from_secs(30);
    while !standby_stats.holds_lock.load(Relaxed) {
        assert!(
            Instant::now() < deadline,
            "the standby did not take over within 30 s of the holder being cut off"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = cut_at.elapsed();
    println!("the standby took over {took:?} after the holder was cut off");
    // The server ends the silent holder's lock session one lease after its last heartbeat;
    // the standby tries every `lock_retry`; a second covers connecting on a busy machine.
    assert!(
        took <= lease + lock_retry + Duration::from_secs(1),
        "the standby took over {took:?} after the cut"
    );
    // The holder noticed: its heartbeat went unanswered.
    wait_until(|| !holder_stats.holds_lock.load(Relaxed)).await;

    // The holder's link heals: what it held back reaches the server, and writes nothing.
    holder_link.thaw();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(env.users_view().await, rows);
    assert_eq!(env.users_checkpoint().await.position, checkpoint.position);

    // The standby gets the store back and projects what the holder could not.
    standby_link.thaw();
    wait_for_rows(&env, &writer).await;
    assert_eq!(holder_stats.events_applied.load(Relaxed), applied_by_holder);
    assert!(standby_stats.events_applied.load(Relaxed) > 0);
    assert!(!holder_stats.holds_lock.load(Relaxed));
    holder_task.abort();
    standby_task.abort();
}

#[tokio::test]
async fn a_view_ahead_of_its_store_halts_the_projection_and_says_to_rebuild() {
    // A read model on a server of its own, and a store restored from a point before its last
    // messages: the view holds events the store no longer has.
    let env = env_apart().await;
    let writer = Writer::with_random_history(env.store.clone(), env.sealer.clone(), 3, 2).await;
    settle(&env.store, writer.last()).await;
    let mut projector = Projector::users(
        env.store.clone(),
        env.sealer.clone(),
        env.read_model.clone(),
        options(1000),
    );
    drain(&mut projector, &env.read_model, writer.last()).await;
    let store_pool = env.db.pool().await;
    sqlx::query(
        "DELETE FROM messages WHERE global_position > \
         (SELECT min(global_position) FROM messages)",
    )
    .execute(&store_pool)
    .await
    .unwrap();

    let outcome = projector.process_next_batch().await.unwrap();

    let Outcome::Halted { reason } = outcome else {
        panic!("a view ahead of its store must halt the projection: {outcome:?}")
    };
    assert!(
        reason.contains("aggregator rebuild") && reason.contains(&writer.last().to_string()),
        "{reason}"
    );
    let checkpoint = env.users_checkpoint().await;
    assert_eq!(checkpoint.position, writer.last(), "the checkpoint moved");
}
