//! The split deployment end to end: the three real binaries as separate processes against one
//! fresh PostgreSQL database, as docker-compose and Kubernetes run them.
//!
//! The binaries are the ones `cargo test` builds for the workspace's packages, found beside
//! this test's own executable (`common`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot go on panics with the cause

mod common;

use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use serde_json::Value;
use sqlx::PgPool;
use test_support::{Process, Signal, TestDatabase};

use common::sessions::{REVOCATION_BOUND, walk_a_session_through_its_life};
use common::{
    PASSWORD, checkpoint, client, get_as, get_json_as, login, metric, new_deployment, register,
    start_all_services, store_head, token, wait_for_checkpoint,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_three_binaries_serve_survive_a_killed_aggregator_and_stop_cleanly() {
    let database = TestDatabase::new().await;
    let deployment = new_deployment("split-deployment", database.url());
    let client = client();
    let start = |binary, label| deployment.start_service(&client, binary, label, &[]);

    // The migration Job, then the Deployments.
    deployment.migrate().await.unwrap();
    let (mut command_api, command_port) = start("command-api", "command-api").await.unwrap();
    let (mut query_api, query_port) = start("query-api", "query-api").await.unwrap();
    let (mut first_aggregator, _) = start("aggregator", "aggregator-1").await.unwrap();

    // Register, log in, read the profile as soon as the read model has the registration.
    let (ann, position) = register(&client, command_port, "ann@example.com").await;
    let ann_token = token(&client, command_port, "ann@example.com", PASSWORD).await;
    let profile = get_json_as(&client, query_port, "/users/me", &ann_token, Some(position)).await;
    assert_eq!(
        (profile["id"].as_str(), profile["status"].as_str()),
        (Some(ann.as_str()), Some("active"))
    );

    // The first administrator, created by an operator; deactivating Ann refuses her login.
    deployment
        .run(
            "command-api",
            &["admin", "create", "--email", "root@example.com"],
            Some("an operator's long password"),
        )
        .await
        .unwrap();
    let admin_token = token(
        &client,
        command_port,
        "root@example.com",
        "an operator's long password",
    )
    .await;
    let response = client
        .post(format!(
            "http://127.0.0.1:{command_port}/users/{ann}/deactivate"
        ))
        .bearer_auth(&admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let refused = login(&client, command_port, "ann@example.com", PASSWORD).await;
    assert_eq!(refused.status(), 401);
    // The deactivation ended her sessions: her access token is refused by the query API
    // within the bound, and its session is refused by the command API at once.
    tokio::time::sleep(REVOCATION_BOUND).await;
    let own = get_as(&client, query_port, "/users/me", &ann_token, None).await;
    assert_eq!(
        own.status(),
        401,
        "a deactivated account's session is still served"
    );

    // Sessions: a login opens one, a refresh rotates it, a logout ends it everywhere.
    walk_a_session_through_its_life(&client, command_port, query_port, "cleo@example.com").await;

    // A standby aggregator beside the one that holds the projection.
    let pool = database.pool().await;
    wait_for_holder(&pool, &first_aggregator).await;
    let (mut second_aggregator, second_port) = start("aggregator", "aggregator-2").await.unwrap();
    // It stands by: it tries for the lock every 200 ms, and has applied nothing.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        holder_pid(&pool).await,
        Some(first_aggregator.id()),
        "the standby took the projection from a live holder"
    );
    assert_eq!(events_applied(&client, second_port).await, 0.0);

    // The holder is frozen (a stalled node) in the middle of a burst of registrations, so that
    // it is surely behind when it is killed: whatever the view holds after that, the standby
    // applied it.
    first_aggregator.signal(Signal::Stop).unwrap();
    let burst: Vec<_> = (0..60)
        .map(|n| {
            let client = client.clone();
            tokio::spawn(async move {
                register(&client, command_port, &format!("burst{n}@example.com")).await
            })
        })
        .collect();
    let mut burst = burst.into_iter();
    let mut last_position = 0;
    for registration in burst.by_ref().take(30) {
        last_position = last_position.max(registration.await.unwrap().1);
    }
    let at_kill = checkpoint(database.url()).await;
    assert!(
        at_kill < last_position,
        "the holder had applied everything ({at_kill} >= {last_position}) before it was \
         killed: the takeover below would prove nothing"
    );
    assert_eq!(
        holder_pid(&pool).await,
        Some(first_aggregator.id()),
        "the holder lost the projection before it was killed"
    );
    let killed = first_aggregator.stop(Signal::Kill).await.unwrap();
    assert_eq!(killed.signal(), Some(9), "the first aggregator: {killed}");
    for registration in burst {
        last_position = last_position.max(registration.await.unwrap().1);
    }

    // The query API answers whatever the aggregators do.
    let ann_profile = format!("/users/{ann}");
    let response = get_as(&client, query_port, &ann_profile, &admin_token, None).await;
    assert_eq!(response.status(), 200);

    // The standby takes over and the read model ends complete: the standby holds the lock,
    // and moved the checkpoint from where the killed holder left it to the head.
    let head = store_head(&pool).await;
    assert_eq!(head, last_position);
    let standby_position = || {
        metric(
            &client,
            second_port,
            "projection_position{projection=\"users\"}",
        )
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while checkpoint(database.url()).await < head || standby_position().await != Some(head as f64) {
        assert!(
            Instant::now() < deadline,
            "the standby aggregator never caught up: the view's checkpoint is at {}, the \
             standby's at {:?}, the head at {head}",
            checkpoint(database.url()).await,
            standby_position().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        holder_pid(&pool).await,
        Some(second_aggregator.id()),
        "the standby does not hold the projection"
    );
    // Every event after the killed holder's checkpoint was applied by the standby, once.
    let missed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM messages \
          WHERE category IN ('user', 'userLogin') AND global_position > $1",
    )
    .bind(i64::try_from(at_kill).unwrap())
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        missed >= 30,
        "only {missed} events after the holder's checkpoint"
    );
    assert_eq!(
        events_applied(&client, second_port).await,
        missed as f64,
        "the standby applied other events than those the killed holder had not"
    );
    let page = get_json_as(
        &client,
        query_port,
        "/users?status=active&limit=100",
        &admin_token,
        Some(last_position),
    )
    .await;
    let emails: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|user| user["email"].as_str().unwrap())
        .collect();
    for n in 0..60 {
        let email = format!("burst{n}@example.com");
        assert!(
            emails.contains(&email.as_str()),
            "{email} is missing from the read model"
        );
    }
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        rows, 63,
        "every account once: Ann, Cleo, the administrator and the burst"
    );
    pool.close().await;

    // SIGTERM stops each process cleanly; with no aggregator left, the query API still answers.
    let status = second_aggregator.stop(Signal::Terminate).await.unwrap();
    assert!(
        status.success(),
        "the aggregator exited with {status} on SIGTERM"
    );
    let response = get_as(&client, query_port, &ann_profile, &admin_token, None).await;
    assert_eq!(
        response.status(),
        200,
        "the query API stopped answering without an aggregator"
    );
    for process in [&mut query_api, &mut command_api] {
        process.shut_down().await.unwrap();
    }
    let _ = std::fs::remove_dir_all(&deployment.logs);
}

/// The operating-system pid of the aggregator holding the users projection's lock, from the
/// `application_name` of the lock's session (`aggregator users pid <pid>`).
async fn holder_pid(pool: &PgPool) -> Option<u32> {
    let holder = aggregator::admin::lock_holder(pool, "users")
        .await
        .unwrap()?;
    let pid = holder
        .strip_prefix("aggregator users pid ")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("a lock holder named {holder:?}"));
    Some(pid.parse().unwrap())
}

async fn wait_for_holder(pool: &PgPool, process: &Process) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while holder_pid(pool).await != Some(process.id()) {
        assert!(
            Instant::now() < deadline,
            "{} never took the projection",
            process.name()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What the aggregator on `port` has applied to the users view, by its own `/metrics`.
async fn events_applied(client: &reqwest::Client, port: u16) -> f64 {
    metric(
        client,
        port,
        "projection_events_applied_total{projection=\"users\"}",
    )
    .await
    .unwrap_or(0.0)
}

/// Every table of the database's public schema, rows and all, and the schema itself (columns,
/// constraints, indexes, functions): what a migration that "changes nothing" must leave as it
/// was.
async fn database_contents(pool: &PgPool) -> Vec<(String, String)> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables \
          WHERE table_schema = 'public' ORDER BY table_name",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut contents = Vec::new();
    for table in tables {
        let rows: String = sqlx::query_scalar(&format!(
            "SELECT coalesce(jsonb_agg(to_jsonb(t) ORDER BY to_jsonb(t)::text), '[]')::text \
               FROM \"{table}\" t"
        ))
        .fetch_one(pool)
        .await
        .unwrap();
        contents.push((format!("table {table}"), rows));
    }
    for (what, query) in [
        (
            "columns",
            "SELECT string_agg(concat_ws(' ', table_name, column_name, data_type, \
                    column_default, is_nullable), E'\\n' ORDER BY table_name, column_name) \
               FROM information_schema.columns WHERE table_schema = 'public'",
        ),
        (
            "constraints",
            "SELECT string_agg(conname || ' ' || pg_get_constraintdef(oid), E'\\n' \
                    ORDER BY conname) \
               FROM pg_constraint WHERE connamespace = 'public'::regnamespace",
        ),
        (
            "indexes",
            "SELECT string_agg(indexdef, E'\\n' ORDER BY indexname) \
               FROM pg_indexes WHERE schemaname = 'public'",
        ),
        (
            "functions",
            "SELECT string_agg(pg_get_functiondef(p.oid), E'\\n' ORDER BY p.proname) \
               FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace",
        ),
    ] {
        let text: Option<String> = sqlx::query_scalar(query).fetch_one(pool).await.unwrap();
        contents.push((what.to_owned(), text.unwrap_or_default()));
    }
    contents
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrating_a_database_with_data_again_changes_nothing_and_the_services_go_on() {
    let database = TestDatabase::new().await;
    let deployment = new_deployment("split-migrate-again", database.url());
    let client = client();
    // Migrated once, as the first release's Job did, and running.
    let services = start_all_services(&deployment, &client).await;
    let (command_port, query_port) = (services.command_port, services.query_port);
    let mut tokens = Vec::new();
    for n in 0..5 {
        let email = format!("user{n}@example.com");
        register(&client, command_port, &email).await;
        tokens.push(token(&client, command_port, &email, PASSWORD).await);
    }
    let pool = database.pool().await;
    let head = store_head(&pool).await;
    wait_for_checkpoint(
        database.url(),
        head,
        Duration::from_secs(60),
        &deployment.logs,
    )
    .await;
    let before = database_contents(&pool).await;
    assert!(
        before
            .iter()
            .any(|(what, rows)| what == "table users" && rows.matches("\"email\"").count() == 5),
        "the view does not hold the five accounts: {before:?}"
    );

    // The next release's Job, twice (a retried Job), while the services run.
    for _ in 0..2 {
        deployment.migrate().await.unwrap();
    }
    let after = database_contents(&pool).await;
    for ((what, was), (_, is)) in before.iter().zip(&after) {
        assert_eq!(is, was, "migrating again changed the {what}");
    }
    assert_eq!(
        after.len(),
        before.len(),
        "migrating again added tables: {after:?}"
    );

    // The services go on: a new account, its login, and the old tokens' profiles, read once
    // the view has them.
    let (id, _) = register(&client, command_port, "after@example.com").await;
    let response = login(&client, command_port, "after@example.com", PASSWORD).await;
    assert_eq!(response.status(), 200);
    let position: u64 = response.headers()["x-position"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(position > head, "a position at or below the old head");
    let body: Value = response.json().await.unwrap();
    let fresh = body["access_token"].as_str().unwrap().to_owned();
    for (token, expected) in tokens
        .iter()
        .map(|token| (token, None))
        .chain([(&fresh, Some(&id))])
    {
        let profile = get_json_as(&client, query_port, "/users/me", token, Some(position)).await;
        assert_eq!(profile["login_count"], 1, "{profile}");
        if let Some(id) = expected {
            assert_eq!(profile["id"].as_str(), Some(id.as_str()));
        }
    }
    pool.close().await;
    services.shut_down().await.unwrap();
    let _ = std::fs::remove_dir_all(&deployment.logs);
}
