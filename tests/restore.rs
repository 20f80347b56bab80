//! Moving the message store to another server, with the real binaries as processes: a store
//! dumped and restored into a younger cluster (as a restore from a backup, or a
//! logical-replication copy for a major-version upgrade, makes one) goes on writing above its
//! stored positions, so the aggregator, `X-Min-Position` and a rebuild all see what is written
//! after the move (docs/adr/0007). Once with the read model moved along in the same database,
//! once with the read model staying on a server of its own, and once with that read model newer
//! than the backup: the aggregator halts it until it is rebuilt from the store.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot go on panics with the cause

mod common;

use std::time::Duration;

use serde_json::Value;
use sqlx::{Connection, PgConnection, PgPool};
use test_support::{Deployment, PrivateCluster};

use common::{
    PASSWORD, checkpoint, client, get_json_as, metric, new_deployment, register,
    start_all_services, start_services, store_head, token, wait_for_checkpoint,
};

/// Transactions the old cluster has run before the store is copied: far more than a young
/// cluster runs while it is created and restored into.
const OLD_CLUSTER_TRANSACTIONS: u32 = 50_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_restored_into_a_younger_cluster_goes_on_above_its_positions() {
    let old = AgedStore::start().await;
    let old_deployment = new_deployment("restore-old", &old.url);
    let before = write_before_the_move(&old_deployment, &old.url).await;

    let young = PrivateCluster::start().await;
    let url = old.cluster.copy_database_to("identity", &young).await;
    drop(old);

    let deployment = new_deployment("restore-young", &url).with_keys_of(&old_deployment);
    goes_on_above(&deployment, &url, &url, before, "third@example.com").await;

    // A rebuild from zero reads the old messages and the new ones in one order, and ends in the
    // view the live worker built.
    let pool = PgPool::connect(&url).await.unwrap();
    let live = view(&pool).await;
    deployment
        .run("aggregator", &["rebuild", "--projection", "users"], None)
        .await
        .unwrap();
    assert_eq!(
        view(&pool).await,
        live,
        "the rebuilt view differs from the live one"
    );
    assert_eq!(live.as_array().unwrap().len(), 3);
    assert!(checkpoint(&url).await >= store_head(&pool).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_restored_beside_a_read_model_on_another_server_goes_on_above_its_checkpoint() {
    let (old, _models, read_model_url) = an_aged_store_and_a_read_model_apart().await;
    let old_deployment = new_deployment("restore-old", &old.url).with_read_model(&read_model_url);
    let before = write_before_the_move(&old_deployment, &read_model_url).await;

    let young = PrivateCluster::start().await;
    let url = old.cluster.copy_database_to("identity", &young).await;
    drop(old);

    let deployment = new_deployment("restore-young", &url)
        .with_read_model(&read_model_url)
        .with_keys_of(&old_deployment);
    goes_on_above(
        &deployment,
        &url,
        &read_model_url,
        before,
        "third@example.com",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_model_newer_than_the_restored_store_halts_until_it_is_rebuilt() {
    let (old, _models, read_model_url) = an_aged_store_and_a_read_model_apart().await;
    let old_deployment = new_deployment("restore-old", &old.url).with_read_model(&read_model_url);
    write_before_the_move(&old_deployment, &read_model_url).await;
    // The backup is taken here; the old store goes on, and the read model with it.
    let young = PrivateCluster::start().await;
    let url = old.cluster.copy_database_to("identity", &young).await;
    let lost = write_after_the_backup(&old_deployment, &read_model_url).await;
    drop(old);

    let deployment = new_deployment("restore-young", &url)
        .with_read_model(&read_model_url)
        .with_keys_of(&old_deployment);
    let client = client();
    let services = start_all_services(&deployment, &client).await;
    wait_for_metric(
        &client,
        services.aggregator_port,
        "projection_halted{projection=\"users\"}",
        1.0,
    )
    .await;
    // What is written meanwhile lands above everything the read model has seen.
    let (_, registered) = register(&client, services.command_port, "third@example.com").await;
    assert!(
        registered > lost,
        "{registered} is not above the lost {lost}"
    );
    drop(services);

    deployment
        .run("aggregator", &["rebuild", "--projection", "users"], None)
        .await
        .unwrap();
    let pool = PgPool::connect(&read_model_url).await.unwrap();
    let emails: Vec<String> = sqlx::query_scalar("SELECT email FROM users ORDER BY email")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(
        emails,
        [
            "first@example.com",
            "second@example.com",
            "third@example.com"
        ],
        "the rebuilt view must hold what the store holds"
    );
    goes_on_above(
        &deployment,
        &url,
        &read_model_url,
        registered,
        "fourth@example.com",
    )
    .await;
}

/// Registers an account on the old store after the backup was taken, waits until the read
/// model has it, and returns the position it got.
async fn write_after_the_backup(deployment: &Deployment, read_model_url: &str) -> u64 {
    let client = client();
    let services = start_services(deployment, &client, &["command-api", "aggregator"]).await;
    let (_, position) = register(&client, services.command_port, "lost@example.com").await;
    wait_for_checkpoint(
        read_model_url,
        position,
        Duration::from_secs(30),
        &deployment.logs,
    )
    .await;
    position
}

async fn wait_for_metric(client: &reqwest::Client, port: u16, series: &str, value: f64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while metric(client, port, series).await != Some(value) {
        assert!(
            std::time::Instant::now() < deadline,
            "the aggregator's metrics never showed {series} {value}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A store in a cluster that has run many transactions, as a store in production has.
struct AgedStore {
    cluster: PrivateCluster,
    url: String,
}

impl AgedStore {
    async fn start() -> Self {
        let cluster = PrivateCluster::start().await;
        let url = cluster.create_database("identity").await;
        age(&url).await;
        Self { cluster, url }
    }
}

/// An aged store, and a read model on a cluster of its own (returned too, so it lives on).
async fn an_aged_store_and_a_read_model_apart() -> (AgedStore, PrivateCluster, String) {
    let models = PrivateCluster::start().await;
    let read_model_url = models.create_database("read_model").await;
    (AgedStore::start().await, models, read_model_url)
}

/// Runs enough transactions on the cluster of `url` that its transaction counter is far ahead
/// of a new cluster's.
async fn age(url: &str) {
    let mut connection = PgConnection::connect(url).await.unwrap();
    sqlx::raw_sql("SET synchronous_commit = off")
        .execute(&mut connection)
        .await
        .unwrap();
    // Alone in its query: a COMMIT inside DO is refused within a multi-statement one.
    sqlx::raw_sql(&format!(
        "DO $$ BEGIN FOR i IN 1..{OLD_CLUSTER_TRANSACTIONS} LOOP \
         PERFORM pg_current_xact_id(); COMMIT; END LOOP; END $$"
    ))
    .execute(&mut connection)
    .await
    .unwrap();
}

/// Registers two accounts and waits until the read model has them; returns the store's last
/// position, which the read model's checkpoint has reached.
async fn write_before_the_move(deployment: &Deployment, read_model_url: &str) -> u64 {
    let client = client();
    let services = start_services(deployment, &client, &["command-api", "aggregator"]).await;
    register(&client, services.command_port, "first@example.com").await;
    register(&client, services.command_port, "second@example.com").await;
    let pool = PgPool::connect(&deployment.url).await.unwrap();
    let head = store_head(&pool).await;
    wait_for_checkpoint(
        read_model_url,
        head,
        Duration::from_secs(30),
        &deployment.logs,
    )
    .await;
    drop(services);
    head
}

/// Registers and logs in on the moved store and checks that its positions lie above `before`,
/// that the aggregator projects them and that a read waiting for them sees them.
async fn goes_on_above(
    deployment: &Deployment,
    url: &str,
    read_model_url: &str,
    before: u64,
    email: &str,
) {
    let client = client();
    let services = start_all_services(deployment, &client).await;
    let (id, registered) = register(&client, services.command_port, email).await;
    assert!(
        registered > before,
        "a registration after the move got position {registered}, not above {before}"
    );
    let token = token(&client, services.command_port, email, PASSWORD).await;
    let pool = PgPool::connect(url).await.unwrap();
    let head = store_head(&pool).await;

    let profile = get_json_as(
        &client,
        services.query_port,
        "/users/me",
        &token,
        Some(head),
    )
    .await;
    assert_eq!(profile["id"], id.as_str());
    assert_eq!(
        profile["login_count"], 1,
        "the login after the move was not projected"
    );
    assert!(checkpoint(read_model_url).await >= head);
}

/// The users view, row by row.
async fn view(pool: &PgPool) -> Value {
    sqlx::query_scalar("SELECT coalesce(json_agg(u ORDER BY u.id), '[]') FROM users u")
        .fetch_one(pool)
        .await
        .unwrap()
}
