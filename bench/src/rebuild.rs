//! `rebuild`: the users projection rebuilt from a million events by the aggregator, against
//! one set-based SQL statement that builds the same view from the same messages.

use std::time::Instant;

use aggregator::{ReadModel, admin};
use message_store::{ConnectOptions, PostgresMessageStore};
use sqlx::PgPool;
use test_support::TestDatabase;

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

/// Rows per INSERT: each is one transaction, and a transaction's messages share its id in the
/// upper bits of their positions, with 16 bits for the index (docs/adr/0002).
const CHUNK: i64 = 50_000;

const HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHQ$RdescudvJCsgt3ub+b+dWRWJTmaaJObG";

pub async fn run(options: Options) -> anyhow::Result<()> {
    let database = TestDatabase::new().await;
    let pool = database.pool().await;
    PostgresMessageStore::migrate(&pool).await?;
    let events = write_events(&pool, &options).await?;
    println!("wrote {events} events ({} users)", options.users);

    let store = message_store::connect(database.url(), ConnectOptions::default()).await?;
    let read_model = ReadModel::connect(database.url(), 4).await?;
    read_model.migrate().await?;

    let started = Instant::now();
    let rebuilt = admin::rebuild(&store, &read_model, "users", options.batch_size).await?;
    let projector_seconds = started.elapsed().as_secs_f64();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(&pool)
        .await?;
    anyhow::ensure!(rows == options.users, "the view has {rows} rows");
    println!(
        "projector rebuild: {} events applied in {projector_seconds:.2} s",
        rebuilt.events
    );

    sqlx::query("CREATE TABLE users_setbased (LIKE users INCLUDING ALL)")
        .execute(&pool)
        .await?;
    let started = Instant::now();
    set_based(&pool).await?;
    let sql_seconds = started.elapsed().as_secs_f64();
    let differing: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT * FROM users EXCEPT SELECT * FROM users_setbased) d",
    )
    .fetch_one(&pool)
    .await?;
    anyhow::ensure!(
        differing == 0,
        "{differing} rows differ from the set-based view"
    );
    println!("set-based SQL: {events} events in {sql_seconds:.2} s");

    let rate = events as f64 / projector_seconds;
    println!(
        "rebuild: {rate:.0} events/s, {:.2}x set-based SQL",
        sql_seconds / projector_seconds
    );
    Ok(())
}

/// Registrations first, then rounds of logins, written straight into the store's table with
/// positions made the way the store makes them.
async fn write_events(pool: &PgPool, options: &Options) -> anyhow::Result<i64> {
    let position = "(pg_current_xact_id()::text::bigint << 16) + (g - $1)";
    let user = "md5('bench-user-' || g)::uuid";
    for start in (0..options.users).step_by(CHUNK as usize) {
        let end = (start + CHUNK).min(options.users) - 1;
        sqlx::query(&format!(
            "INSERT INTO messages (global_position, id, stream_name, category, position, type, \
                                   data, metadata) \
             SELECT {position}, gen_random_uuid(), 'user-' || {user}, 'user', 0, \
                    'UserRegistered', \
                    jsonb_build_object('user_id', {user}, \
                        'email', 'user' || g || '@example.com', \
                        'email_normalized', 'user' || g || '@example.com', \
                        'password_hash', $3::text, \
                        'status', CASE WHEN g % 2 = 0 THEN 'active' ELSE 'pending' END, \
                        'roles', jsonb_build_array('user'), \
                        'registered_at', '2026-01-01T00:00:00Z'), \
                    '{{\"schemaVersion\": 1}}'::jsonb \
             FROM generate_series($1::bigint, $2::bigint) AS g"
        ))
        .bind(start)
        .bind(end)
        .bind(HASH)
        .execute(pool)
        .await?;
    }
    for round in 1..=options.logins {
        for start in (0..options.users).step_by(CHUNK as usize) {
            let end = (start + CHUNK).min(options.users) - 1;
            sqlx::query(&format!(
                "INSERT INTO messages (global_position, id, stream_name, category, position, \
                                       type, data, metadata) \
                 SELECT {position}, gen_random_uuid(), 'userLogin-' || {user}, 'userLogin', \
                        $3 - 1, 'LoginSucceeded', \
                        jsonb_build_object('at', '2026-01-02T00:00:00Z', 'login_count', $3), \
                        '{{\"schemaVersion\": 1}}'::jsonb \
                 FROM generate_series($1::bigint, $2::bigint) AS g"
            ))
            .bind(start)
            .bind(end)
            .bind(round)
            .execute(pool)
            .await?;
        }
    }
    sqlx::query("ANALYZE messages").execute(pool).await?;
    Ok(options.users * (1 + options.logins))
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
