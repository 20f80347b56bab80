//! `command-api seal-history` (ADR 13, point 8) over a store as the builds before personal data
//! was sealed left it: every personal field in clear, reservation streams named by the unkeyed
//! SHA-256 of the address, no keys. The command API refuses to serve it; a check counts what is
//! left and changes nothing; a run seals every field (nulls those of a person already erased)
//! and renames the streams, after which nothing of the addresses is stored, every account
//! works as before, and a second run finds nothing to do.

use std::sync::Arc;

use command_api::Application;
use command_api::history_sealing::{SealingReport, is_sealed, seal_history};
use identity::{RECOVERY_CATEGORY, USER_CATEGORY};
use message_store::{MessageStore, StreamName};
use personal_data::{PersonalData, is_envelope};
use serde_json::json;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::erasure::{stored_rows, traces_of};
use crate::helpers::{PASSWORD, TestApp, spawn_app, spawn_on};

const ANN: &str = "Ann.Lee@Example.com";
const BOB: &str = "Bob.Stone@Example.net";
const NEW_PASSWORD: &str = "a brand new secret";

/// The personal data the application opens and seals with.
fn personal_data(app: &TestApp) -> PersonalData {
    PersonalData {
        sealer: app.state.commands.sealer.clone(),
        lookup_key: app.state.commands.lookup_key.clone(),
    }
}

/// The name the builds before ADR 13 gave the reservation stream of `address`.
fn unkeyed_stream(address: &str) -> StreamName {
    let digest = Sha256::digest(address.to_lowercase().as_bytes());
    StreamName::parse(format!("userEmail-{}", hex::encode(digest))).unwrap()
}

fn keyed_stream(app: &TestApp, address: &str) -> StreamName {
    let email = identity::Email::parse(address).unwrap();
    command_api::reservation::email_stream(&app.state.commands.lookup_key, &email).unwrap()
}

/// Turns what `app` wrote into what an older build would have written: every sealed field of a
/// user or recovery message opened in place, every reservation stream under its unkeyed name,
/// no key left but erased persons' tombstones. Answers how many user and recovery messages
/// there are, and how many of them it opened.
async fn as_the_older_build_wrote_it(app: &TestApp, accounts: &[(&str, &str)]) -> (u64, u64) {
    let store = &app.state.commands.store;
    let (mut read, mut opened) = (0, 0);
    let streams = accounts.iter().flat_map(|(id, _)| {
        [USER_CATEGORY, RECOVERY_CATEGORY]
            .map(|category| StreamName::parse(format!("{category}-{id}")).unwrap())
    });
    for stream in streams {
        for mut message in store.read_stream(&stream, 0, 1000).await.unwrap() {
            read += 1;
            let sealed = message.data.as_object().unwrap().values().any(is_envelope);
            if !sealed {
                continue;
            }
            app.state
                .commands
                .sealer
                .unseal(&mut message.data)
                .await
                .unwrap();
            assert!(store.rewrite_data(message.id, message.data).await.unwrap());
            opened += 1;
        }
    }
    for (_, address) in accounts {
        let moved = store
            .rename_stream(&keyed_stream(app, address), &unkeyed_stream(address))
            .await
            .unwrap();
        assert_eq!(moved, 1, "{address}'s reservation");
    }
    let pool = app.database.pool().await;
    sqlx::query("DELETE FROM personal_keys WHERE erased_at IS NULL")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    (read, opened)
}

#[tokio::test]
async fn sealing_the_history_of_an_older_build_leaves_no_address_in_clear_and_every_account_working()
 {
    let app = spawn_app().await;
    let (ann, token) = app.signed_in(ANN).await;
    let changed = app
        .post_as(
            &format!("/users/{ann}/password"),
            &token,
            json!({ "current_password": PASSWORD, "new_password": NEW_PASSWORD }),
        )
        .await;
    assert!(changed.status().is_success(), "{}", changed.status());
    let token = app.token(ANN, NEW_PASSWORD).await;
    let mailed = app
        .post_as("/users/me/verify-email", &token, json!({}))
        .await;
    assert!(mailed.status().is_success(), "{}", mailed.status());
    let bob = app.user(BOB).await;
    let (read, in_clear) = as_the_older_build_wrote_it(&app, &[(&ann, ANN), (&bob, BOB)]).await;
    assert!(
        in_clear >= 4,
        "two registrations, a password change, a link mailed"
    );
    // Bob asked to be forgotten, and only his key's tombstone says so: his clear fields are
    // what the run must not seal but null.
    let bob_id: Uuid = bob.parse().unwrap();
    app.state
        .commands
        .sealer
        .vault()
        .erase(bob_id)
        .await
        .unwrap();
    let pool = app.database.pool().await;
    // His registration, and the verification link it mailed him.
    let bobs_messages: i64 =
        sqlx::query_scalar("SELECT count(*) FROM messages WHERE stream_name IN ($1, $2)")
            .bind(format!("user-{bob}"))
            .bind(format!("userRecovery-{bob}"))
            .fetch_one(&pool)
            .await
            .unwrap();
    pool.close().await;
    assert!(bobs_messages >= 1);
    let rows = stored_rows(&app).await;
    assert!(rows.contains(ANN) && rows.contains(BOB), "{rows}");
    let (database, settings, clock) = (
        app.database.clone(),
        app.settings.clone(),
        app.clock.clone(),
    );
    let personal = personal_data(&app);
    let store: Arc<dyn MessageStore> = app.state.commands.store.clone();
    drop(app);

    let refused = Application::build(settings.clone(), Arc::new(clock.clone())).await;
    let error = format!("{:#}", refused.err().expect("a store in clear is refused"));
    assert!(error.contains("seal-history"), "{error}");
    assert!(!is_sealed(store.as_ref(), &personal.sealer).await.unwrap());

    let expected = SealingReport {
        messages_read: read,
        messages_in_clear: in_clear,
        messages_of_erased_persons: 0,
        streams_to_rename: 2,
    };
    let checked = seal_history(store.as_ref(), &personal, true).await.unwrap();
    assert_eq!(checked, expected);
    let pool = database.pool().await;
    let keys: i64 =
        sqlx::query_scalar("SELECT count(*) FROM personal_keys WHERE erased_at IS NULL")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(keys, 0, "a check makes no key");
    pool.close().await;

    let sealed = seal_history(store.as_ref(), &personal, false)
        .await
        .unwrap();
    assert_eq!(
        sealed,
        SealingReport {
            messages_of_erased_persons: u64::try_from(bobs_messages).unwrap(),
            ..expected
        }
    );
    let again = seal_history(store.as_ref(), &personal, false)
        .await
        .unwrap();
    assert!(again.is_sealed(), "{again:?}");
    assert!(is_sealed(store.as_ref(), &personal.sealer).await.unwrap());

    let app = spawn_on(database, settings, clock).await;
    let rows = stored_rows(&app).await;
    for address in [ANN, BOB] {
        for trace in traces_of(address) {
            assert!(!rows.contains(&trace), "{trace} of {address} in {rows}");
        }
        assert!(
            app.state
                .commands
                .store
                .last_message(&unkeyed_stream(address))
                .await
                .unwrap()
                .is_none()
        );
    }
    // Ann logs in with her password, her address is still hers, and her registration opens to
    // what she registered with.
    assert_eq!(app.login(ANN, NEW_PASSWORD).await.status(), 200);
    assert_eq!(app.register(ANN, PASSWORD).await.status(), 409);
    let stream = StreamName::parse(format!("user-{ann}")).unwrap();
    let mut messages = app
        .state
        .commands
        .store
        .read_stream(&stream, 0, 10)
        .await
        .unwrap();
    assert!(
        is_envelope(&messages[0].data["email"]),
        "sealed in the store"
    );
    app.state
        .commands
        .sealer
        .unseal_messages(&mut messages)
        .await
        .unwrap();
    assert_eq!(messages[0].data["email"], ANN);
}
