//! The sessions view and the account's session epoch, kept by the users projection under its
//! checkpoint (ADR 11), on PostgreSQL and on SQLite alike.

use aggregator::projector::ProjectorError;
use aggregator::{Outcome, admin};
use chrono::Duration;
use identity::SessionEndReason;
use read_model_schema::USERS_VERSION;
use uuid::Uuid;

use crate::support::{Stores, Writer, at, on_both_engines};

/// A writer over `stores` with one active account, registered at 0.
async fn ann(stores: &Stores) -> (Writer, Uuid) {
    let writer = Writer::new(stores.store.clone(), stores.sealer.clone());
    let ann = Uuid::now_v7();
    writer.register(ann, true, 0).await;
    (writer, ann)
}

on_both_engines!(
    sessions_started_refreshed_and_ended_show_in_the_view_with_every_column,
    sessions_show_in_the_view
);
async fn sessions_show_in_the_view(stores: Stores) {
    let (writer, ann) = ann(&stores).await;
    let mut projector = stores.projector();
    let first = writer.start_session(ann, 100).await;
    let started_at = writer.last() as i64;
    let second = writer.start_session(ann, 110).await;
    stores.drain(&mut projector, &writer).await;
    let views = stores.views().await;
    assert_eq!(views.sessions, writer.expected_sessions());
    let row = views.sessions.iter().find(|row| row.id == first).unwrap();
    assert_eq!(
        (
            row.user_id,
            row.session_epoch,
            row.started_at,
            row.generation
        ),
        (ann, 0, at(100), 0)
    );
    assert_eq!(row.expires_at, at(100) + Duration::days(90));
    assert_eq!(row.idle_expires_at, at(100) + Duration::days(14));
    assert!(row.user_agent.as_deref().unwrap().starts_with("agent "));
    assert_eq!(
        (
            row.last_refreshed_at,
            row.ended_at,
            row.end_reason.as_deref()
        ),
        (None, None, None)
    );
    assert_eq!(row.position, started_at);
    let second_row = views
        .sessions
        .iter()
        .find(|row| row.id == second)
        .unwrap()
        .clone();

    writer.refresh_session(first, 200).await;
    writer.refresh_session(first, 300).await;
    let refreshed_at = writer.last() as i64;
    stores.drain(&mut projector, &writer).await;
    let views = stores.views().await;
    assert_eq!(views.sessions, writer.expected_sessions());
    let row = views.sessions.iter().find(|row| row.id == first).unwrap();
    assert_eq!(row.last_refreshed_at, Some(at(300)));
    assert_eq!(row.idle_expires_at, at(300) + Duration::days(14));
    assert_eq!(
        row.expires_at,
        at(100) + Duration::days(90),
        "the absolute limit stays"
    );
    assert_eq!((row.generation, row.position), (2, refreshed_at));
    // A refresh changes its own session's row only.
    assert!(views.sessions.contains(&second_row));

    writer
        .end_session(second, SessionEndReason::EndedByOwner, 400)
        .await;
    let ended_at = writer.last() as i64;
    stores.drain(&mut projector, &writer).await;
    let views = stores.views().await;
    assert_eq!(views.sessions, writer.expected_sessions());
    let row = views.sessions.iter().find(|row| row.id == second).unwrap();
    assert_eq!(
        (row.ended_at, row.end_reason.as_deref(), row.position),
        (Some(at(400)), Some("ended_by_owner"), ended_at)
    );
    // Session events leave the account's row as it was.
    assert_eq!(views.users, writer.expected_rows());
    assert!(views.users[0].position < started_at);
}

on_both_engines!(
    only_the_first_end_of_a_session_counts,
    only_the_first_end_counts
);
async fn only_the_first_end_counts(stores: Stores) {
    let (writer, ann) = ann(&stores).await;
    let mut projector = stores.projector();
    let in_one_batch = writer.start_session(ann, 100).await;
    let in_two_batches = writer.start_session(ann, 110).await;
    writer
        .end_session(in_one_batch, SessionEndReason::LoggedOut, 200)
        .await;
    let first_end = writer.last() as i64;
    writer
        .end_session(in_one_batch, SessionEndReason::RefreshTokenReused, 210)
        .await;
    writer
        .end_session(in_two_batches, SessionEndReason::RefreshTokenReused, 220)
        .await;
    let other_first_end = writer.last() as i64;
    stores.drain(&mut projector, &writer).await;
    writer
        .end_session(in_two_batches, SessionEndReason::EndedByAdministrator, 230)
        .await;
    stores.drain(&mut projector, &writer).await;

    let views = stores.views().await;
    let ended = |id: Uuid| {
        let row = views.sessions.iter().find(|row| row.id == id).unwrap();
        (row.ended_at, row.end_reason.clone(), row.position)
    };
    assert_eq!(
        ended(in_one_batch),
        (Some(at(200)), Some("logged_out".into()), first_end)
    );
    assert_eq!(
        ended(in_two_batches),
        (
            Some(at(220)),
            Some("refresh_token_reused".into()),
            other_first_end
        )
    );
    assert_eq!(views.sessions, writer.expected_sessions());
}

on_both_engines!(
    the_session_epoch_moves_on_deactivation_password_change_and_sessions_ended_only,
    the_session_epoch_moves
);
async fn the_session_epoch_moves(stores: Stores) {
    let writer = Writer::new(stores.store.clone(), stores.sealer.clone());
    let ann = Uuid::now_v7();
    writer.register(ann, false, 0).await;
    let mut projector = stores.projector();
    let mut epoch_after = async |step: &str| {
        stores.drain(&mut projector, &writer).await;
        let views = stores.views().await;
        assert_eq!(views.users, writer.expected_rows(), "after {step}");
        assert_eq!(
            views.users[0].position,
            writer.last() as i64,
            "{step} moves the row's position"
        );
        views.users[0].session_epoch
    };
    assert_eq!(epoch_after("the registration").await, 0);
    writer.activate(ann, 1).await;
    assert_eq!(epoch_after("an activation").await, 0);
    writer.deactivate(ann, 2).await;
    assert_eq!(epoch_after("a deactivation").await, 1);
    writer.activate(ann, 3).await;
    assert_eq!(epoch_after("an activation").await, 1);
    writer.change_password(ann, 4).await;
    assert_eq!(epoch_after("a password change").await, 2);
    writer.rehash_password(ann, 5).await;
    assert_eq!(epoch_after("a rehash").await, 2);
    writer.end_all_sessions(ann, 6).await;
    assert_eq!(epoch_after("an end of all sessions").await, 3);
    // A session started now belongs to the new epoch.
    writer.start_session(ann, 7).await;
    stores.drain(&mut projector, &writer).await;
    assert_eq!(stores.views().await.sessions[0].session_epoch, 3);
}

on_both_engines!(
    a_refresh_of_a_session_the_worker_holds_reads_nothing_from_the_view,
    a_refresh_reads_nothing
);
async fn a_refresh_reads_nothing(stores: Stores) {
    let (writer, ann) = ann(&stores).await;
    let mut projector = stores.projector();
    let session = writer.start_session(ann, 100).await;
    stores.drain(&mut projector, &writer).await;
    // The row goes from the table behind the worker's back, the checkpoint staying: a worker
    // that read the row for the refresh would find no such session and halt.
    stores.execute("DELETE FROM sessions").await;
    writer.refresh_session(session, 200).await;
    stores.drain(&mut projector, &writer).await;
    // The worker held the row, refreshed it and wrote it whole.
    assert_eq!(stores.views().await.sessions, writer.expected_sessions());
}

/// What the previous version of the projection left: no sessions, every epoch 0, and its
/// version in the checkpoint.
async fn as_the_previous_version_left_it(stores: &Stores) {
    stores
        .execute(&format!(
            "DELETE FROM sessions; UPDATE users SET session_epoch = 0; \
             UPDATE projection_checkpoints SET version = {} WHERE projection = 'users'",
            USERS_VERSION - 1
        ))
        .await;
}

#[tokio::test]
async fn a_view_of_the_previous_version_gets_its_sessions_and_epochs_from_a_rebuild() {
    let stores = Stores::postgres().await;
    let writer =
        Writer::with_random_history(stores.store.clone(), stores.sealer.clone(), 8, 6).await;
    let mut projector = stores.projector();
    stores.drain(&mut projector, &writer).await;
    let live = stores.views().await;
    assert_eq!(live, writer.expected_views());
    assert!(live.users.iter().any(|row| row.session_epoch > 0));
    as_the_previous_version_left_it(&stores).await;

    // This build's worker leaves the older view alone (the older build's replicas may still
    // serve it, docs/adr/0008) until the rebuild swaps in its own.
    let mut current = stores.projector();
    let refused = current.process_next_batch().await;
    assert!(
        matches!(refused, Err(ProjectorError::OtherVersion { stored, ours })
            if stored == USERS_VERSION - 1 && ours == USERS_VERSION),
        "{refused:?}"
    );
    admin::rebuild(
        &stores.store,
        &stores.sealer,
        &stores.read_model,
        "users",
        7,
    )
    .await
    .unwrap();
    assert_eq!(stores.views().await, live);
    writer.random_history(2, 3).await;
    stores.drain(&mut current, &writer).await;
    assert_eq!(stores.views().await, writer.expected_views());
}

#[tokio::test]
async fn a_view_of_the_previous_version_on_sqlite_is_replayed_by_the_next_worker() {
    let stores = Stores::sqlite().await;
    let writer =
        Writer::with_random_history(stores.store.clone(), stores.sealer.clone(), 8, 6).await;
    let mut projector = stores.projector();
    stores.drain(&mut projector, &writer).await;
    let live = stores.views().await;
    assert!(live.users.iter().any(|row| row.session_epoch > 0));
    as_the_previous_version_left_it(&stores).await;

    // The standalone process's next worker (there is one, and no rebuild on SQLite).
    let mut next = stores.projector();
    let outcome = next.process_next_batch().await.unwrap();
    assert!(matches!(outcome, Outcome::Applied { .. }), "{outcome:?}");
    stores.drain(&mut next, &writer).await;
    assert_eq!(stores.views().await, live);
    let checkpoint = stores
        .read_model
        .checkpoint("users")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(checkpoint.version, USERS_VERSION);
}
