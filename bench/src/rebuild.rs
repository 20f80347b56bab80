//! `rebuild`: the users projection rebuilt from a million events by the aggregator, against
//! one set-based SQL statement that builds the same view from the same messages; and the same
//! events with their personal fields sealed (ADR 13), as the command API writes them, rebuilt
//! in the same run.

use std::time::Instant;

use aggregator::{ReadModelWriter, admin};
use message_store::ConnectOptions;
use personal_data::Sealer;
use sqlx::PgPool;
use test_support::TestDatabase;
use test_support::bulk::PASSWORD_HASH;

use crate::setup::store_database;

#[derive(clap::Args)]
pub struct Options {
    /// Registered users; each gets `logins` login events after every registration is written.
    #[arg(long, default_value_t = 200_000)]
    users: i64,
    #[arg(long, default_value_t = 4)]
    logins: i64,
    /// Messages per projector batch.
    #[arg(long, default_value_t = 5000)]
    batch_size: usize,
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    let bulk = test_support::bulk::BulkUsers {
        seed: "bench-user-",
        users: options.users,
        login_rounds: options.logins,
        uneven_logins: false,
        password_hash: PASSWORD_HASH,
    };

    // The same events twice, each in a database of its own: every field in clear, as events
    // written before ADR 13 are, and each registration's personal fields sealed with its
    // account's key, as the command API writes them now.
    let (clear_database, clear_pool) = store_database().await?;
    let events = test_support::bulk::write_user_events(&clear_pool, &bulk).await?;
    let (sealed_database, sealed_pool) = store_database().await?;
    let sealer = crate::setup::sealer(&sealed_database).await?;
    let sealed_events =
        test_support::bulk::write_sealed_user_events(&sealed_pool, &bulk, &sealer).await?;
    anyhow::ensure!(
        sealed_events == events,
        "{sealed_events} sealed events, {events} in clear"
    );
    println!(
        "wrote {events} events ({} users), in clear and sealed",
        options.users
    );

    let sealed_seconds = rebuild(&sealed_database, &sealed_pool, &sealer, &options).await?;
    println!("projector rebuild, sealed: {events} events applied in {sealed_seconds:.2} s");
    let clear_seconds = rebuild(&clear_database, &clear_pool, &sealer, &options).await?;
    println!("projector rebuild, in clear: {events} events applied in {clear_seconds:.2} s");
    let emails: i64 = sqlx::query_scalar("SELECT count(*) FROM users WHERE email LIKE '%@%'")
        .fetch_one(&sealed_pool)
        .await?;
    anyhow::ensure!(
        emails == options.users,
        "{emails} of the sealed view's rows have their address"
    );

    // The baseline reads the fields in clear: SQL cannot open a sealed one.
    sqlx::query("CREATE TABLE users_setbased (LIKE users INCLUDING ALL)")
        .execute(&clear_pool)
        .await?;
    let started = Instant::now();
    set_based(&clear_pool).await?;
    let sql_seconds = started.elapsed().as_secs_f64();
    let differing: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT * FROM users EXCEPT SELECT * FROM users_setbased) d",
    )
    .fetch_one(&clear_pool)
    .await?;
    anyhow::ensure!(
        differing == 0,
        "{differing} rows differ from the set-based view"
    );
    println!("set-based SQL: {events} events in {sql_seconds:.2} s");

    let rate = |seconds: f64| events as f64 / seconds;
    println!(
        "rebuild in clear: {:.0} events/s, {:.2}x set-based SQL",
        rate(clear_seconds),
        sql_seconds / clear_seconds
    );
    println!(
        "rebuild: {:.0} events/s sealed, {:.2}x set-based SQL, {:.2}x the rebuild in clear",
        rate(sealed_seconds),
        sql_seconds / sealed_seconds,
        clear_seconds / sealed_seconds
    );
    Ok(())
}

/// Rebuilds the users view in `database` from its messages, as `aggregator rebuild` does, and
/// answers how long it took; checks the view has a row per user.
async fn rebuild(
    database: &TestDatabase,
    pool: &PgPool,
    sealer: &Sealer,
    options: &Options,
) -> anyhow::Result<f64> {
    let store = message_store::connect(database.url(), ConnectOptions::default()).await?;
    let read_model = ReadModelWriter::connect(database.url(), 4).await?;
    read_model.migrate().await?;
    let started = Instant::now();
    admin::rebuild(&store, sealer, &read_model, "users", options.batch_size).await?;
    let seconds = started.elapsed().as_secs_f64();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(pool)
        .await?;
    anyhow::ensure!(rows == options.users, "the view has {rows} rows");
    Ok(seconds)
}

/// The same view in one statement: every registration joined with the last login of its user,
/// found by reading every login message.
async fn set_based(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO users_setbased (id, email, email_normalized, status, registered_at, \
             activated_at, deactivated_at, last_login_at, login_count, failed_logins, \
             locked_until, roles, position) \
         SELECT (r.data->>'user_id')::uuid, r.data->>'email', r.data->>'email_normalized', \
                r.data->>'status', (r.data->>'registered_at')::timestamptz, \
                CASE WHEN r.data->>'status' = 'active' \
                     THEN (r.data->>'registered_at')::timestamptz END, \
                NULL, (l.data->>'at')::timestamptz, \
                coalesce((l.data->>'login_count')::bigint, 0), \
                coalesce((l.data->>'failed_in_a_row')::int, 0), \
                (l.data->>'locked_until')::timestamptz, \
                ARRAY(SELECT jsonb_array_elements_text(r.data->'roles')), \
                greatest(r.global_position, l.global_position) \
         FROM messages r \
         LEFT JOIN (SELECT DISTINCT ON (stream_name) stream_name, data, global_position \
                      FROM messages WHERE category = 'userLogin' \
                     ORDER BY stream_name, global_position DESC) l \
                ON l.stream_name = 'userLogin-' || (r.data->>'user_id') \
         WHERE r.category = 'user' AND r.type = 'UserRegistered'",
    )
    .execute(pool)
    .await?;
    Ok(())
}
