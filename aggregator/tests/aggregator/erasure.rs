//! Erased accounts (ADR 13) in the read model: the erased row the live worker and a rebuild both
//! fold, a read model with no trace of the address, the key the projection deletes when the
//! command side did not, and an erasure racing a rebuild. Every event is sealed with a real
//! vault, as the command API writes it.

use std::time::Duration;

use aggregator::read_model::MailRefusal;
use aggregator::{ReadModelWriter, admin};
use identity::SessionEndReason;
use uuid::Uuid;

use crate::support::{
    Stores, Writer, at, drain, env, on_both_engines, options, settle, wait_for_rows,
};

/// Ann's account, with a verified address, logins and two sessions; Bob's beside it.
async fn ann_and_bob(writer: &Writer) -> (Uuid, Uuid, [Uuid; 2]) {
    let (ann, bob) = (Uuid::now_v7(), Uuid::now_v7());
    writer.register(ann, true, 0).await;
    writer.register(bob, true, 0).await;
    writer.verify_email(ann, 10).await;
    writer.login(ann, 20).await;
    let first = writer.start_session(ann, 20).await;
    writer.login(ann, 30).await;
    let second = writer.start_session(ann, 30).await;
    writer.refresh_session(second, 40).await;
    writer.start_session(bob, 40).await;
    (ann, bob, [first, second])
}

on_both_engines!(
    a_registered_then_erased_account_is_an_erased_row_without_its_address_or_sessions_live_and_rebuilt,
    an_erased_account_in_the_view
);
async fn an_erased_account_in_the_view(stores: Stores) {
    let writer = Writer::new(stores.store.clone(), stores.sealer.clone());
    let (ann, bob, [first, second]) = ann_and_bob(&writer).await;
    let address = writer.expected.lock().unwrap()[&ann]
        .email_normalized
        .clone()
        .unwrap();
    let mut projector = stores.projector();
    stores.drain(&mut projector, &writer).await;
    let before = stores.views().await;
    assert_eq!(stores.ids_by_email(&address).await, [ann]);
    assert_eq!(
        before.sessions.iter().filter(|s| s.user_id == ann).count(),
        2
    );

    writer.erase(ann, 50, true).await;
    stores.drain(&mut projector, &writer).await;
    // A logout, a refresh and a login decided before the erasure, appended after it and
    // applied by later commits.
    writer
        .end_session(first, SessionEndReason::LoggedOut, 51)
        .await;
    writer.refresh_session(second, 52).await;
    stores.drain(&mut projector, &writer).await;
    assert_eq!(
        stores.views().await,
        writer.expected_views(),
        "a session event of an erased account brings back no row"
    );
    writer.login(ann, 53).await;
    stores.drain(&mut projector, &writer).await;
    let live = stores.views().await;
    assert_eq!(live, writer.expected_views());
    let row = live.users.iter().find(|row| row.id == ann).unwrap();
    assert_eq!(
        (
            row.status.as_str(),
            row.email.as_deref(),
            row.email_normalized.as_deref(),
            row.erased_at
        ),
        ("erased", None, None, Some(at(50)))
    );
    let was = before.users.iter().find(|row| row.id == ann).unwrap();
    assert_eq!(
        (
            row.registered_at,
            row.activated_at,
            row.email_verified,
            row.roles.clone()
        ),
        (
            was.registered_at,
            was.activated_at,
            was.email_verified,
            was.roles.clone()
        ),
        "the other facts stay"
    );
    assert_eq!(
        (row.login_count, row.last_login_at),
        (3, Some(at(53))),
        "a login appended after the erasure still counts"
    );
    assert_eq!(row.session_epoch, was.session_epoch + 1);
    assert!(
        live.sessions.iter().all(|session| session.user_id != ann),
        "no session of the erased account is left: {:?}",
        live.sessions
    );
    assert_eq!(
        live.sessions.iter().filter(|s| s.user_id == bob).count(),
        1,
        "Bob's session stays"
    );
    assert!(stores.ids_by_email(&address).await.is_empty());

    // From zero, the registration reads erased: the same rows.
    stores.rebuild(&writer).await;
    assert_eq!(stores.views().await, live, "a rebuild folds the same rows");
}

/// Every text column of every row of `tables`, one line a row, lower-cased: what a raw SELECT
/// of the read model shows.
async fn text_of(read_model: &ReadModelWriter, tables: &[&str]) -> String {
    let mut text = String::new();
    for table in tables {
        let lines: Vec<String> = match read_model {
            ReadModelWriter::Postgres(pool) => {
                sqlx::query_scalar(&format!("SELECT CAST(t AS text) FROM {table} t"))
                    .fetch_all(pool)
                    .await
                    .unwrap()
            }
            ReadModelWriter::Sqlite(pool) => {
                let columns: Vec<String> =
                    sqlx::query_scalar(&format!("SELECT name FROM pragma_table_info('{table}')"))
                        .fetch_all(pool)
                        .await
                        .unwrap();
                let row = columns
                    .iter()
                    .map(|column| format!("coalesce(CAST({column} AS TEXT), 'null')"))
                    .collect::<Vec<_>>()
                    .join(" || '|' || ");
                sqlx::query_scalar(&format!("SELECT {row} FROM {table}"))
                    .fetch_all(pool)
                    .await
                    .unwrap()
            }
        };
        assert!(!lines.is_empty(), "{table} has rows to look into");
        for line in lines {
            text.push_str(&line.to_lowercase());
            text.push('\n');
        }
    }
    text
}

on_both_engines!(
    after_an_erasure_no_text_column_of_the_read_model_holds_the_address,
    no_trace_of_the_address
);
async fn no_trace_of_the_address(stores: Stores) {
    let writer = Writer::new(stores.store.clone(), stores.sealer.clone());
    let (ann, _bob, _) = ann_and_bob(&writer).await;
    let registered_with = writer.expected.lock().unwrap()[&ann].email.clone().unwrap();
    let moved_to = writer.change_email(ann, 45).await;
    // A refusal of a mail to Ann, as the mailer records it.
    stores
        .read_model
        .record_mail_refusal(&MailRefusal {
            message_id: Uuid::now_v7(),
            mail_index: 0,
            account_id: ann,
            kind: "reset_password".into(),
            reply_code: Some(550),
            refused_at: at(46),
        })
        .await
        .unwrap();
    let mut projector = stores.projector();
    stores.drain(&mut projector, &writer).await;
    let tables = ["users", "sessions", "mail_refusals"];
    // The local parts of both addresses: each names the account, so nothing else holds them.
    let local_part = |address: &str| address.split('@').next().unwrap().to_lowercase();
    let traces = [local_part(&registered_with), local_part(&moved_to)];
    let before = text_of(&stores.read_model, &tables).await;
    assert!(
        before.contains(&traces[1]),
        "the search finds the address while the account lives: {before}"
    );

    writer.erase(ann, 50, true).await;
    stores.drain(&mut projector, &writer).await;
    let after = text_of(&stores.read_model, &tables).await;
    for trace in &traces {
        assert!(!after.contains(trace.as_str()), "{trace} in {after}");
    }
    assert!(
        after.contains(&ann.hyphenated().to_string()),
        "the account's row and refusal stay"
    );
}

on_both_engines!(
    the_projection_deletes_the_key_of_an_erased_account_the_command_side_left,
    the_projection_deletes_the_key
);
async fn the_projection_deletes_the_key(stores: Stores) {
    let writer = Writer::new(stores.store.clone(), stores.sealer.clone());
    let (ann, bob, _) = ann_and_bob(&writer).await;
    let vault = stores.sealer.vault();
    // The command API appended the erasure and stopped before deleting the key.
    writer.erase(ann, 50, false).await;
    assert!(!vault.is_erased(ann).await.unwrap());
    assert_eq!(
        vault.keys(&[ann]).await.unwrap().len(),
        1,
        "the key is there"
    );

    let mut projector = stores.projector();
    stores.drain(&mut projector, &writer).await;
    assert!(
        vault.is_erased(ann).await.unwrap(),
        "applying the erasure deleted the key"
    );
    assert!(vault.keys(&[ann]).await.unwrap().is_empty());
    assert!(!vault.is_erased(bob).await.unwrap(), "only Ann's");
    assert_eq!(stores.views().await, writer.expected_views());

    // Bob's erasure too is left with its key, and a rebuild (a replay on SQLite) is the first
    // to apply it: it deletes the key as the live worker does. Ann's events now read erased
    // from zero, and every row folds the same.
    writer.erase(bob, 60, false).await;
    settle(&stores.store, writer.last()).await;
    stores.rebuild(&writer).await;
    assert!(
        vault.is_erased(bob).await.unwrap(),
        "the rebuild deleted it"
    );
    assert_eq!(stores.views().await, writer.expected_views());
}

#[tokio::test]
async fn an_erasure_racing_a_rebuild_ends_erased() {
    let env = env().await;
    let writer = Writer::with_random_history(env.store.clone(), env.sealer.clone(), 20, 3).await;
    let live = aggregator::Projector::users(
        env.store.clone(),
        env.sealer.clone(),
        env.read_model.clone(),
        options(9),
    );
    let live_task = tokio::spawn(live.run(std::future::pending()));
    wait_for_rows(&env, &writer).await;

    let accounts: Vec<Uuid> = writer.expected_rows().iter().map(|row| row.id).collect();
    for (round, account) in accounts.iter().take(4).enumerate() {
        // A rebuild that reads and commits a little at a time, so that the erasure lands
        // while it catches up, or in its last stretch, or after its swap.
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
                        batch_size: 3,
                        fold_rows: 3,
                    },
                )
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..40) * round as u64)).await;
        writer.erase(*account, 60_000 + round as i64, true).await;
        rebuilding.await.unwrap().unwrap();
        settle(&env.store, writer.last()).await;
        wait_for_rows(&env, &writer).await;
        let row = env
            .users_view()
            .await
            .into_iter()
            .find(|row| row.id == *account)
            .unwrap();
        assert_eq!(
            (row.status.as_str(), row.email.as_deref()),
            ("erased", None),
            "round {round}"
        );
    }
    live_task.abort();
    let _ = live_task.await;

    // A replay of the whole store from zero agrees.
    admin::reset(&env.read_model, "users").await.unwrap();
    let mut replay = aggregator::Projector::users(
        env.store.clone(),
        env.sealer.clone(),
        env.read_model.clone(),
        options(50),
    );
    drain(&mut replay, &env.read_model, writer.last()).await;
    assert_eq!(env.views().await, writer.expected_views());
}

/// The names of the indexes of `users` on SQLite, the automatic one of its primary key too.
async fn sqlite_users_indexes(pool: &sqlx::SqlitePool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'users' ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn on_sqlite_the_migration_to_erasable_rows_keeps_every_row_and_index_of_users() {
    let dir = std::env::temp_dir().join(format!("aggregator-{}", Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}", dir.join("identity.db").display());
    let read_model = ReadModelWriter::connect(&url, 2).await.unwrap();
    let ReadModelWriter::Sqlite(pool) = &read_model else {
        unreachable!("an SQLite read model")
    };
    // The read model as the build before erasures left it, with an account in it.
    const ERASABLE: i64 = 20261205100001;
    let mut before = read_model_schema::sqlite_migrations();
    before.migrations = before
        .migrations
        .iter()
        .filter(|migration| migration.version < ERASABLE)
        .cloned()
        .collect::<Vec<_>>()
        .into();
    before.run(pool).await.unwrap();
    sqlx::query(
        "INSERT INTO users (id, email, email_normalized, status, registered_at, last_login_at, \
         login_count, roles, position, session_epoch, email_verified) \
         VALUES ($1, 'Ann@Example.com', 'ann@example.com', 'active', \
                 '2026-01-01T00:00:00.000000Z', '2026-01-02T00:00:00.000000Z', 3, \
                 '[\"user\",\"admin\"]', 42, 2, 1)",
    )
    .bind(Uuid::from_u128(7).hyphenated().to_string())
    .execute(pool)
    .await
    .unwrap();
    let indexes = sqlite_users_indexes(pool).await;
    assert_eq!(indexes.len(), 4, "{indexes:?}");

    read_model.migrate().await.unwrap();
    assert_eq!(sqlite_users_indexes(pool).await, indexes);
    let rows = read_model.rows(&aggregator::Target::USERS).await.unwrap();
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(
        (
            row.email.as_deref(),
            row.email_normalized.as_deref(),
            row.status.as_str(),
            row.last_login_at,
            row.login_count,
            row.roles.clone(),
            row.session_epoch,
            row.email_verified,
            row.erased_at,
            row.position
        ),
        (
            Some("Ann@Example.com"),
            Some("ann@example.com"),
            "active",
            Some(at(86_400)),
            3,
            vec!["user".to_owned(), "admin".to_owned()],
            2,
            true,
            None,
            42
        )
    );
    // Applying them again changes nothing.
    read_model.migrate().await.unwrap();
    assert_eq!(sqlite_users_indexes(pool).await, indexes);
    drop(read_model);
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn status_counts_the_persons_keys_each_master_key_wraps_and_the_erased() {
    use aggregator::admin::{MasterKeyStatus, PersonalKeysStatus};
    use personal_data::{MasterKey, MasterKeys};

    let env = env().await;
    let key = |id: &str, byte: &str| MasterKey::from_hex(id, &byte.repeat(32)).unwrap();
    let first = MasterKeys::new(key("1", "11"), vec![]).unwrap();
    let vault = personal_data::connect(env.db.url(), first, 2)
        .await
        .unwrap();
    let persons: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
    for person in &persons {
        vault.key_for_writing(*person).await.unwrap();
    }
    vault.erase(persons[0]).await.unwrap();

    // A rotation: key 2 is current, key 1 retired; a new person's key is wrapped under 2.
    let rotated = || MasterKeys::new(key("2", "22"), vec![key("1", "11")]).unwrap();
    let vault = personal_data::connect(env.db.url(), rotated(), 2)
        .await
        .unwrap();
    vault.key_for_writing(Uuid::now_v7()).await.unwrap();
    let status = |role_1: &'static str, keys_of_1: u64| PersonalKeysStatus {
        master_keys: vec![
            MasterKeyStatus {
                id: "2".into(),
                role: "current",
                keys: 1,
            },
            MasterKeyStatus {
                id: "1".into(),
                role: role_1,
                keys: keys_of_1,
            },
        ],
        erased: 1,
    };
    assert_eq!(
        admin::personal_keys(&vault, &rotated()).await.unwrap(),
        status("retired", 2),
        "key 1 still wraps two keys: it cannot go yet"
    );
    // Once every key is rewrapped, the retired key wraps none.
    vault.rewrap().await.unwrap();
    let after = admin::personal_keys(&vault, &rotated()).await.unwrap();
    assert_eq!(after.master_keys[0].keys, 3);
    assert_eq!(after.master_keys[1].keys, 0);
    // A configuration that dropped key 1 too soon shows its keys as under an unknown key.
    let vault = personal_data::connect(env.db.url(), rotated(), 2)
        .await
        .unwrap();
    let fresh = Uuid::now_v7();
    let old_only = MasterKeys::new(key("1", "11"), vec![]).unwrap();
    let old_vault = personal_data::connect(env.db.url(), old_only, 2)
        .await
        .unwrap();
    old_vault.key_for_writing(fresh).await.unwrap();
    let dropped = MasterKeys::new(key("2", "22"), vec![]).unwrap();
    let shown = admin::personal_keys(&vault, &dropped).await.unwrap();
    assert_eq!(
        shown.master_keys,
        [
            MasterKeyStatus {
                id: "2".into(),
                role: "current",
                keys: 3,
            },
            MasterKeyStatus {
                id: "1".into(),
                role: "unknown",
                keys: 1,
            },
        ]
    );
}

#[tokio::test]
async fn a_store_written_sealed_in_bulk_projects_the_rows_of_one_written_in_clear() {
    use test_support::bulk::{BulkUsers, PASSWORD_HASH};

    /// The users view (without ids, new each run, nor positions) of a store written in bulk,
    /// `sealed` or in clear, and the registrations as stored.
    async fn projected(sealed: bool) -> (Vec<(Option<String>, String, i64)>, String) {
        let env = env().await;
        let pool = env.db.pool().await;
        let bulk = BulkUsers {
            seed: "bulk",
            users: 40,
            login_rounds: 2,
            uneven_logins: true,
            password_hash: PASSWORD_HASH,
        };
        let written = if sealed {
            test_support::bulk::write_sealed_user_events(&pool, &bulk, &env.sealer).await
        } else {
            test_support::bulk::write_user_events(&pool, &bulk).await
        };
        let written = written.unwrap();
        let last: i64 = sqlx::query_scalar("SELECT max(global_position) FROM messages")
            .fetch_one(&pool)
            .await
            .unwrap();
        let stored: Vec<String> =
            sqlx::query_scalar("SELECT data::text FROM messages WHERE type = 'UserRegistered'")
                .fetch_all(&pool)
                .await
                .unwrap();
        assert_eq!(stored.len(), 40);
        assert!(written > 40);
        let mut projector = aggregator::Projector::users(
            env.store.clone(),
            env.sealer.clone(),
            env.read_model.clone(),
            options(17),
        );
        settle(&env.store, last as u64).await;
        drain(&mut projector, &env.read_model, last as u64).await;
        let mut rows: Vec<_> = env
            .users_view()
            .await
            .into_iter()
            .map(|row| (row.email, row.status, row.login_count))
            .collect();
        rows.sort();
        (rows, stored.join("\n").to_lowercase())
    }

    let (clear, clear_data) = projected(false).await;
    let (sealed, sealed_data) = projected(true).await;
    assert!(clear_data.contains("bulk0@example.com"));
    assert!(
        !sealed_data.contains("@example.com") && sealed_data.contains("aes256gcm"),
        "the sealed store holds envelopes, not addresses"
    );
    assert_eq!(sealed, clear);
    assert!(sealed.iter().all(|(email, ..)| email.is_some()));
}
