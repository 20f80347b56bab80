//! Many user events at once, written straight into the message store's table for benchmarks
//! and tests that need a store a rebuild takes a while over.

use sqlx::PgPool;

/// Messages per INSERT: each is one transaction, and a transaction's messages share its id in
/// the upper bits of their positions, with 16 bits for the index (docs/adr/0002).
const CHUNK: i64 = 50_000;

/// What [`write_user_events`] writes.
pub struct BulkUsers<'a> {
    /// Makes these accounts' ids and emails differ from other runs'.
    pub seed: &'a str,
    pub users: i64,
    /// Rounds of successful logins after the registrations.
    pub login_rounds: i64,
    /// After the first round, every third account logs in no more (histories of unequal length).
    pub uneven_logins: bool,
    /// The stored hash of every account.
    pub password_hash: &'a str,
}

/// Registrations (every other account active), then rounds of logins, with positions made the
/// way the store makes them. Returns how many messages it wrote.
pub async fn write_user_events(pool: &PgPool, bulk: &BulkUsers<'_>) -> Result<i64, sqlx::Error> {
    let position = "(pg_current_xact_id()::text::bigint << 16) + (g - $1)";
    let user = "md5($4::text || g)::uuid";
    let mut written = 0;
    for start in (0..bulk.users).step_by(CHUNK as usize) {
        let end = (start + CHUNK).min(bulk.users) - 1;
        written += sqlx::query(&format!(
            "INSERT INTO messages (global_position, id, stream_name, category, position, type, \
                                   data, metadata) \
             SELECT {position}, gen_random_uuid(), 'user-' || {user}, 'user', 0, \
                    'UserRegistered', \
                    jsonb_build_object('user_id', {user}, \
                        'email', $4::text || g || '@Example.com', \
                        'email_normalized', lower($4::text || g || '@Example.com'), \
                        'password_hash', $3::text, \
                        'status', CASE WHEN g % 2 = 0 THEN 'active' ELSE 'pending' END, \
                        'roles', jsonb_build_array('user'), \
                        'registered_at', '2026-01-01T00:00:00Z'), \
                    '{{\"schemaVersion\": 1}}'::jsonb \
             FROM generate_series($1::bigint, $2::bigint) AS g"
        ))
        .bind(start)
        .bind(end)
        .bind(bulk.password_hash)
        .bind(bulk.seed)
        .execute(pool)
        .await?
        .rows_affected();
    }
    for round in 1..=bulk.login_rounds {
        for start in (0..bulk.users).step_by(CHUNK as usize) {
            let end = (start + CHUNK).min(bulk.users) - 1;
            written += sqlx::query(&format!(
                "INSERT INTO messages (global_position, id, stream_name, category, position, \
                                       type, data, metadata) \
                 SELECT {position}, gen_random_uuid(), 'userLogin-' || {user}, 'userLogin', \
                        $3 - 1, 'LoginSucceeded', \
                        jsonb_build_object('at', $5::text, 'login_count', $3), \
                        '{{\"schemaVersion\": 1}}'::jsonb \
                 FROM generate_series($1::bigint, $2::bigint) AS g \
                 WHERE NOT $6 OR g % 3 <> 0 OR $3 = 1"
            ))
            .bind(start)
            .bind(end)
            .bind(round)
            .bind(bulk.seed)
            .bind(format!("2026-01-02T00:{:02}:00Z", round % 60))
            .bind(bulk.uneven_logins)
            .execute(pool)
            .await?
            .rows_affected();
        }
    }
    sqlx::query("ANALYZE messages").execute(pool).await?;
    Ok(i64::try_from(written).unwrap_or(i64::MAX))
}
