//! Nobody can lock the administrators out: the last active administrator cannot be deactivated,
//! not even by two administrators deactivating each other at the same instant.

use std::collections::BTreeSet;
use std::sync::Arc;

use command_api::error::ApiError;
use command_api::hashing::{Memory, hash_now};
use command_api::reservation::{EmailReserved, email_stream};
use command_api::service::CommandError;
use identity::{
    AccountStatus, EVENT_VERSION_KEY, Email, Password, Role, UserDeactivated, UserEvent, UserId,
    UserRegistered, user_stream_name,
};
use message_store::{ConnectOptions, ExpectedVersion, NewMessage, StreamAppend, StreamName};
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{PASSWORD, TestApp, problem, spawn_app};

/// Rounds of the race, half with each administrator's request sent first.
const ROUNDS: usize = 40;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_administrators_deactivating_each_other_at_once_leave_exactly_one_active() {
    let app = spawn_app().await;
    app.admin_token_for("ann@example.com").await;
    app.admin_token_for("bob@example.com").await;
    race_deactivations(&app, "ann@example.com", "bob@example.com").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_store_written_before_the_administrators_stream_the_last_one_is_still_kept() {
    let app = spawn_app().await;
    // Accounts as an earlier build wrote them: no record of the administrators beside them.
    legacy_account(&app, "ann@example.com", Role::Admin, &[]).await;
    legacy_account(&app, "bob@example.com", Role::Admin, &[]).await;
    let gone = legacy_account(&app, "gone@example.com", Role::Admin, &["deactivated"]).await;
    legacy_account(&app, "user@example.com", Role::User, &[]).await;
    let ann = app.token("ann@example.com", PASSWORD).await;
    let bob = app.token("bob@example.com", PASSWORD).await;
    assert_eq!(
        app.active_administrators().await,
        BTreeSet::from([app.id_of_token(&ann), app.id_of_token(&bob)])
    );
    race_deactivations(&app, "ann@example.com", "bob@example.com").await;

    // The deactivated administrator of the old history is not counted, and activating them
    // again counts them again. (A deactivation in the race may have ended Ann's session.)
    let (ann_id, bob_id) = (app.id_of_token(&ann), app.id_of_token(&bob));
    let ann = app.token("ann@example.com", PASSWORD).await;
    let response = app.deactivate(&bob_id, &ann).await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        app.active_administrators().await,
        BTreeSet::from([ann_id.clone()])
    );
    let response = app.activate(&gone, &ann).await;
    assert_eq!(response.status(), 200);
    let gone_token = app.token("gone@example.com", PASSWORD).await;
    let response = app.deactivate(&ann_id, &gone_token).await;
    assert_eq!(response.status(), 200);
    assert_eq!(app.active_administrators().await, BTreeSet::from([gone]));
}

#[tokio::test]
async fn the_service_refuses_to_deactivate_the_only_active_administrator() {
    let app = spawn_app().await;
    let ann = app.admin_token_for("ann@example.com").await;
    let bob = app.admin_token_for("bob@example.com").await;
    let (ann, bob) = (app.id_of_token(&ann), app.id_of_token(&bob));
    // Below HTTP, where no rule about the caller's own account stands in the way.
    let state = command_api::build_state(&app.settings, Arc::new(app.clock.clone()))
        .await
        .unwrap();
    let commands = &state.commands;
    commands.set_active(id(&bob), false).await.unwrap();
    let before = app.message_count().await;
    let refused = commands.set_active(id(&ann), false).await;
    assert!(
        matches!(refused, Err(CommandError::LastAdministrator)),
        "{refused:?}"
    );
    assert_eq!(app.message_count().await, before, "the store changed");
    assert_eq!(
        app.active_administrators().await,
        BTreeSet::from([ann.clone()])
    );
    // Another administrator first, and then the first may go.
    commands.set_active(id(&bob), true).await.unwrap();
    commands.set_active(id(&ann), false).await.unwrap();
    assert_eq!(app.active_administrators().await, BTreeSet::from([bob]));
}

#[test]
fn the_refusal_is_a_409_with_its_own_code() {
    let problem = ApiError::from(CommandError::LastAdministrator).to_problem();
    assert_eq!(
        (problem.status().as_u16(), problem.code()),
        (409, "last_administrator")
    );
}

/// Ann and Bob, both active administrators, deactivate each other at once, again and again:
/// each time exactly one succeeds, and the one left is reactivated for the next round (and logs
/// in again: the deactivation ended their sessions).
async fn race_deactivations(app: &TestApp, ann_email: &str, bob_email: &str) {
    let mut ann = app.token(ann_email, PASSWORD).await;
    let mut bob = app.token(bob_email, PASSWORD).await;
    let (ann_id, bob_id) = (app.id_of_token(&ann), app.id_of_token(&bob));
    let mut refusals = std::collections::BTreeMap::<String, usize>::new();
    for round in 0..ROUNDS {
        let ann_deactivates_bob = app.deactivate(&bob_id, &ann);
        let bob_deactivates_ann = app.deactivate(&ann_id, &bob);
        // `join!` sends its first request first.
        let (by_ann, by_bob) = if round % 2 == 0 {
            tokio::join!(ann_deactivates_bob, bob_deactivates_ann)
        } else {
            let (by_bob, by_ann) = tokio::join!(bob_deactivates_ann, ann_deactivates_bob);
            (by_ann, by_bob)
        };
        let statuses = (by_ann.status().as_u16(), by_bob.status().as_u16());
        let (winner, loser, refused) = match statuses {
            (200, 409 | 401) => ((&ann_id, &ann), &bob_id, by_bob),
            (409 | 401, 200) => ((&bob_id, &bob), &ann_id, by_ann),
            other => panic!("round {round}: statuses {other:?}, expected one 200"),
        };
        // The loser either lost the race (409) or was deactivated before its own request was
        // checked (401).
        let code = problem(refused).await["code"].as_str().unwrap().to_owned();
        *refusals.entry(code).or_default() += 1;
        assert_eq!(
            app.active_administrators().await,
            BTreeSet::from([winner.0.clone()]),
            "round {round}"
        );
        let response = app.activate(loser, winner.1).await;
        assert_eq!(response.status(), 200, "round {round}: reactivating");
        if loser == &ann_id {
            ann = app.token(ann_email, PASSWORD).await;
        } else {
            bob = app.token(bob_email, PASSWORD).await;
        }
    }
    assert!(
        refusals
            .keys()
            .all(|code| code == "last_administrator" || code == "invalid_token"),
        "{refusals:?}"
    );
    println!("refusals seen over {ROUNDS} rounds: {refusals:?}");
}

fn id(text: &str) -> UserId {
    text.parse().unwrap()
}

/// Writes an account the way a build from before the administrators' roster did: its
/// registration (then any `deactivated`) and its email reservation, nothing else. Returns its id.
async fn legacy_account(app: &TestApp, email: &str, role: Role, then: &[&str]) -> String {
    let store = message_store::connect(app.database.url(), ConnectOptions::default())
        .await
        .unwrap();
    let id = UserId::from_uuid(Uuid::now_v7());
    let params = argon2::Params::new(
        app.settings.password.memory_kib,
        app.settings.password.iterations,
        app.settings.password.parallelism,
        None,
    )
    .unwrap();
    let password = Password::for_verification(PASSWORD.to_owned()).unwrap();
    let password_hash = hash_now(&params, &password, &mut Memory::default()).unwrap();
    let email = Email::parse(email).unwrap();
    let now = {
        use platform::clock::Clock;
        app.clock.now()
    };
    let mut events: Vec<UserEvent> = vec![
        UserRegistered {
            user_id: id,
            email: email.clone().into(),
            email_normalized: email.normalized().to_owned().into(),
            password_hash: password_hash.into(),
            status: AccountStatus::Active,
            roles: if role == Role::Admin {
                vec![Role::User, Role::Admin]
            } else {
                vec![Role::User]
            },
            registered_at: now,
        }
        .into(),
    ];
    for step in then {
        assert_eq!(*step, "deactivated");
        events.push(UserDeactivated { at: now }.into());
    }
    // Sealed, as every build since ADR 13 stores them (`seal-history` seals older ones).
    let mut messages = Vec::new();
    for event in &events {
        let mut data = event.to_json();
        app.state
            .commands
            .sealer
            .seal(*id.as_uuid(), event.personal_fields(), &mut data)
            .await
            .unwrap();
        messages.push(
            NewMessage::new(event.event_type(), data)
                .with_metadata(json!({ EVENT_VERSION_KEY: event.version() })),
        );
    }
    store
        .append(vec![
            StreamAppend::new(
                StreamName::parse(user_stream_name(id)).unwrap(),
                ExpectedVersion::NoStream,
                messages,
            ),
            StreamAppend::new(
                email_stream(&app.lookup_key(), &email).unwrap(),
                ExpectedVersion::NoStream,
                vec![EmailReserved { user_id: id }.to_message()],
            ),
        ])
        .await
        .unwrap();
    id.to_string()
}
