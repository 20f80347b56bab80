//! What account recovery leaves in the users view: a verified address, a change of email, a
//! password reset and the lockout it lifts, folded by the live worker and again by a rebuild,
//! on PostgreSQL and on SQLite alike.

use uuid::Uuid;

use crate::support::{Stores, Writer, at, on_both_engines};

on_both_engines!(
    a_verification_a_change_of_email_a_reset_and_a_lifted_lockout_land_in_the_view_live_and_rebuilt,
    recovery_lands_in_the_view
);
async fn recovery_lands_in_the_view(stores: Stores) {
    let writer = Writer::new(stores.store.clone(), stores.sealer.clone());
    let (ann, bob) = (Uuid::now_v7(), Uuid::now_v7());
    // Another account beside Ann's, which none of her events changes.
    writer.register(bob, true, 0).await;
    writer.register(ann, true, 0).await;
    let ann_registered = writer.expected.lock().unwrap()[&ann]
        .email_normalized
        .clone()
        .unwrap();
    let mut projector = stores.projector();
    let mut row_after = async |step: &str| {
        stores.drain(&mut projector, &writer).await;
        let views = stores.views().await;
        assert_eq!(views, writer.expected_views(), "after {step}");
        let row = views.users.into_iter().find(|row| row.id == ann).unwrap();
        assert_eq!(
            row.position,
            writer.last() as i64,
            "{step} moves the row's position"
        );
        row
    };
    let registered = row_after("the registration").await;
    assert!(!registered.email_verified, "unverified at registration");

    writer.verify_email(ann, 10).await;
    let verified = row_after("a verification").await;
    assert!(verified.email_verified);
    assert_eq!(verified.session_epoch, 0, "a verification ends no session");

    // Locked out by failures, then a reset: every session ends and the lockout is lifted.
    writer.login(ann, 20).await;
    for t in 21..24 {
        writer.fail_login(ann, t).await;
    }
    let locked = row_after("the failures").await;
    assert_eq!(
        (locked.failed_logins, locked.locked_until),
        (3, Some(at(23 + 300)))
    );
    writer.reset_password(ann, 30).await;
    writer.lift_lockout(ann, 30).await;
    let reset = row_after("a reset").await;
    assert_eq!(reset.session_epoch, 1);
    assert_eq!((reset.failed_logins, reset.locked_until), (0, None));
    assert_eq!(
        (reset.login_count, reset.last_login_at),
        (1, Some(at(20))),
        "the logins stay"
    );

    let moved_to = writer.change_email(ann, 40).await;
    let changed = row_after("a change of email").await;
    assert_eq!(changed.email.as_deref(), Some(moved_to.as_str()));
    assert!(changed.email_verified);
    let ann_moved = changed.email_normalized.clone().unwrap();
    assert_eq!(ann_moved, moved_to.to_lowercase());
    assert_eq!(stores.ids_by_email(&ann_moved).await, [ann]);
    assert!(
        stores.ids_by_email(&ann_registered).await.is_empty(),
        "the old address no longer finds the account"
    );

    // Bob never verified his address: a change proves the new one through its link.
    writer.change_email(bob, 50).await;
    stores.drain(&mut projector, &writer).await;
    let live = stores.views().await;
    assert_eq!(live, writer.expected_views());
    let bob_row = live.users.iter().find(|row| row.id == bob).unwrap();
    assert!(bob_row.email_verified, "verified by the change alone");
    stores.rebuild(&writer).await;
    assert_eq!(
        stores.views().await,
        live,
        "the rebuild folds the same rows"
    );
    assert_eq!(stores.ids_by_email(&ann_moved).await, [ann]);
    assert!(stores.ids_by_email(&ann_registered).await.is_empty());
}

on_both_engines!(
    a_random_history_with_recovery_events_is_folded_alike_live_and_rebuilt,
    a_random_history_is_folded_alike
);
async fn a_random_history_is_folded_alike(stores: Stores) {
    let writer =
        Writer::with_random_history(stores.store.clone(), stores.sealer.clone(), 12, 10).await;
    let mut projector = stores.projector();
    stores.drain(&mut projector, &writer).await;
    let live = stores.views().await;
    assert_eq!(live, writer.expected_views());
    assert!(
        live.users.iter().any(|row| row.email_verified)
            && live.users.iter().any(|row| !row.email_verified),
        "the history verifies some addresses and not others"
    );
    assert!(
        live.users.iter().any(|row| row
            .email_normalized
            .as_deref()
            .is_some_and(|email| email.starts_with("moved."))),
        "the history changes some addresses"
    );
    stores.rebuild(&writer).await;
    assert_eq!(stores.views().await, live);
}
