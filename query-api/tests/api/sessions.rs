//! A token is served only while its session is live, and `/users/me/sessions` lists the live
//! ones.
//!
//! The session is checked in the message store, never in the users view (ADR 11), so a logout
//! is refused within `query.max_view_lag_ms` of its commit whatever state the view is in: live,
//! with the aggregator standing still, replaying after a reset. An end of all of an account's
//! sessions (its session epoch moved by `SessionsEnded` or `PasswordChanged`) is refused within
//! the same bound as a deactivation. Sessions are started and ended with real events in the
//! message store, and the real aggregator projects them (or does not).

use std::time::{Duration, Instant};

use aggregator::Outcome;
use chrono::{DateTime, SecondsFormat, SubsecRound, TimeDelta, Utc};
use identity::{
    PasswordChanged, SessionEvent, SessionId, SessionStarted, SessionsEnded, UserEvent,
};
use read_model_schema::USERS_VERSION;
use serde_json::Value;
use uuid::Uuid;

use crate::harness::{
    Aggregator, TestApp, a_password_hash, admin_routes_on, each, now, problem, refused_everywhere,
    spawn_with,
};

const MAX_VIEW_LAG: Duration = Duration::from_millis(300);

async fn app_with_lag(lag: Duration) -> TestApp {
    let lag = u64::try_from(lag.as_millis()).unwrap();
    spawn_with(|settings| settings.query.max_view_lag_ms = lag).await
}

async fn app() -> TestApp {
    app_with_lag(MAX_VIEW_LAG).await
}

/// Ann (a user, with two sessions), Root (an administrator) and Bob (a user), registered in
/// that order, each with a token in a session of their own.
struct People {
    ann: Uuid,
    root: Uuid,
    bob: Uuid,
    ann_session: Uuid,
    root_session: Uuid,
    ann_token: String,
    /// Ann's token in her other session.
    ann_other_token: String,
    root_token: String,
    bob_token: String,
}

async fn people(app: &TestApp) -> People {
    let ann = app.register("ann@example.com", &["user"]).await;
    let root = app.register("root@example.com", &["admin", "user"]).await;
    let bob = app.register("bob@example.com", &["user"]).await;
    let ann_session = app.start_session(ann, now()).await;
    let root_session = app.start_session(root, now()).await;
    People {
        ann,
        root,
        bob,
        ann_session,
        root_session,
        ann_token: app.token_in(ann, ann_session, &["user"], now()),
        ann_other_token: app.token_for(ann, &["user"]).await,
        root_token: app.token_in(root, root_session, &["admin", "user"], now()),
        bob_token: app.token_for(bob, &["user"]).await,
    }
}

/// An app whose view is live, the three of them projected and served on every route; and the
/// aggregator (batches of `batch_size`), to project what comes next, or not.
async fn live_view(batch_size: usize) -> (TestApp, People, Aggregator) {
    let app = app().await;
    let people = people(&app).await;
    let mut aggregator = Aggregator::over(&app, batch_size).await;
    aggregator.catch_up(&app).await;
    people.all_served(&app).await;
    (app, people, aggregator)
}

impl People {
    /// Every route a user takes: on their own account, and on others' (403 while served).
    fn own_routes(&self, id: Uuid) -> Vec<String> {
        let as_of = now().to_rfc3339_opts(SecondsFormat::Millis, true);
        vec![
            "/users/me".to_owned(),
            "/users/me/sessions".to_owned(),
            format!("/users/{id}"),
            format!("/users/{id}?as_of={as_of}"),
            format!("/users/{id}/events"),
            "/users?status=active".to_owned(),
            format!("/users/{}", self.bob),
        ]
    }

    /// Every route an administrator takes on others.
    fn admin_routes(&self) -> Vec<String> {
        admin_routes_on(self.bob)
    }

    /// Before anything ends, every route serves them: a refusal later is the session's end.
    async fn all_served(&self, app: &TestApp) {
        for (token, path, status) in [
            (&self.ann_token, "/users/me".to_owned(), 200),
            (&self.ann_token, "/users/me/sessions".to_owned(), 200),
            (&self.ann_token, format!("/users/{}/events", self.ann), 200),
            (&self.ann_token, format!("/users/{}", self.bob), 403),
            (&self.ann_other_token, "/users/me".to_owned(), 200),
            (&self.root_token, "/users?status=active".to_owned(), 200),
            (&self.root_token, format!("/users/{}", self.bob), 200),
            (&self.root_token, "/users/me".to_owned(), 200),
            (&self.bob_token, "/users/me".to_owned(), 200),
        ] {
            let response = app.get(&path, Some(token)).await;
            assert_eq!(response.status(), status, "{path}");
        }
    }

    /// Ann's first session and Root's are refused on every route they take.
    async fn ann_and_root_refused_everywhere(&self, app: &TestApp, min_position: Option<u64>) {
        let routes = self.admin_routes();
        refused_everywhere(app, &self.root_token, &routes, min_position).await;
        let routes = self.own_routes(self.root);
        refused_everywhere(app, &self.root_token, &routes, min_position).await;
        let routes = self.own_routes(self.ann);
        refused_everywhere(app, &self.ann_token, &routes, min_position).await;
    }

    /// Sessions that did not end are still served, Ann's other one included: the refusals are
    /// the ended sessions', not the account's or the view's. `me` is what `/users/me` answers
    /// with the view in its state (404 without the row).
    async fn others_served(&self, app: &TestApp, me: u16) {
        for (token, id) in [
            (&self.ann_other_token, self.ann),
            (&self.bob_token, self.bob),
        ] {
            let path = format!("/users/{id}/events");
            let response = app.get(&path, Some(token)).await;
            assert_eq!(response.status(), 200, "{path} in a live session");
        }
        let response = app.get("/users/me", Some(&self.bob_token)).await;
        assert_eq!(response.status(), me, "/users/me in a live session");
    }
}

/// Ann and Root log out, as the command API records it, and returns when the later one was
/// committed (at the latest) and its position.
async fn log_out_ann_and_root(app: &TestApp, people: &People) -> (Instant, u64) {
    app.end_session(people.ann, people.ann_session).await;
    let position = app.end_session(people.root, people.root_session).await;
    (Instant::now(), position)
}

/// Ends all of Ann's sessions (an end of all, as an administrator or Ann herself asks it) and
/// all of Root's (a password change), and returns when the later one was committed and its
/// position.
async fn end_all_of_ann_and_root(app: &TestApp, people: &People) -> (Instant, u64) {
    let ended = UserEvent::SessionsEnded(SessionsEnded { at: now() });
    app.append_user_event(people.ann, ended).await;
    let changed = UserEvent::PasswordChanged(PasswordChanged {
        password_hash: a_password_hash().into(),
        at: now(),
    });
    let position = app.append_user_event(people.root, changed).await;
    (Instant::now(), position)
}

async fn past_the_bound(committed: Instant) {
    tokio::time::sleep_until((committed + MAX_VIEW_LAG).into()).await;
}

#[tokio::test]
async fn in_the_live_view_a_logout_is_refused_on_every_route_within_the_bound() {
    let (app, people, mut aggregator) = live_view(1000).await;

    let (committed, position) = log_out_ann_and_root(&app, &people).await;
    aggregator.catch_up(&app).await;
    past_the_bound(committed).await;
    people
        .ann_and_root_refused_everywhere(&app, Some(position))
        .await;
    people.others_served(&app, 200).await;
}

#[tokio::test]
async fn while_the_aggregator_stands_still_a_logout_is_refused_on_every_route_within_the_bound() {
    let (app, people, _standing_still) = live_view(1000).await;

    let (committed, _) = log_out_ann_and_root(&app, &people).await;
    past_the_bound(committed).await;
    people.ann_and_root_refused_everywhere(&app, None).await;
    people.others_served(&app, 200).await;
}

#[tokio::test]
async fn while_the_view_replays_after_a_reset_a_logout_is_refused_on_every_route_within_the_bound()
{
    let (app, people, mut aggregator) = live_view(2).await;
    let (committed, _) = log_out_ann_and_root(&app, &people).await;
    aggregator.catch_up(&app).await;

    aggregator::admin::reset(&aggregator.read_model, "users")
        .await
        .unwrap();
    // The view is empty: no row for anyone, no session either.
    past_the_bound(committed).await;
    people.ann_and_root_refused_everywhere(&app, None).await;
    people.others_served(&app, 404).await;

    // The first batch replays Ann's and Root's registrations, nothing after them.
    let outcome = aggregator.projector.process_next_batch().await.unwrap();
    assert!(
        matches!(outcome, Outcome::Applied { events: 2, .. }),
        "{outcome:?}"
    );
    people.ann_and_root_refused_everywhere(&app, None).await;
    people.others_served(&app, 404).await;

    aggregator.catch_up(&app).await;
    people.ann_and_root_refused_everywhere(&app, None).await;
    people.others_served(&app, 200).await;
}

/// Waits on the aggregator projecting `users.session_epoch`: in a live view the caller's row
/// is trusted, and it is the row's epoch that ends the sessions.
#[tokio::test]
async fn in_the_live_view_an_end_of_all_of_an_accounts_sessions_is_refused_on_every_route_within_the_bound()
 {
    let (app, people, mut aggregator) = live_view(1000).await;

    let (committed, position) = end_all_of_ann_and_root(&app, &people).await;
    aggregator.catch_up(&app).await;
    past_the_bound(committed).await;
    people
        .ann_and_root_refused_everywhere(&app, Some(position))
        .await;
    let routes = people.own_routes(people.ann);
    refused_everywhere(&app, &people.ann_other_token, &routes, None).await;
    bob_and_a_new_session_of_ann_served(&app, &people, &mut Some(aggregator)).await;
}

#[tokio::test]
async fn while_the_aggregator_stands_still_an_end_of_all_of_an_accounts_sessions_is_refused_on_every_route_within_the_bound()
 {
    let (app, people, _standing_still) = live_view(1000).await;

    let (committed, _) = end_all_of_ann_and_root(&app, &people).await;
    past_the_bound(committed).await;
    people.ann_and_root_refused_everywhere(&app, None).await;
    let routes = people.own_routes(people.ann);
    refused_everywhere(&app, &people.ann_other_token, &routes, None).await;
    bob_and_a_new_session_of_ann_served(&app, &people, &mut None).await;
}

/// Bob is still served, and so is a session Ann starts after the end of all of hers (a login
/// in her account's new epoch), projected first if an aggregator is given: the account is
/// not what was refused.
async fn bob_and_a_new_session_of_ann_served(
    app: &TestApp,
    people: &People,
    aggregator: &mut Option<Aggregator>,
) {
    let logged_in_again = app.token_for(people.ann, &["user"]).await;
    if let Some(aggregator) = aggregator {
        aggregator.catch_up(app).await;
    }
    for (token, path) in [
        (&logged_in_again, "/users/me".to_owned()),
        (&logged_in_again, format!("/users/{}/events", people.ann)),
        (&people.bob_token, "/users/me".to_owned()),
    ] {
        let response = app.get(&path, Some(token)).await;
        assert_eq!(response.status(), 200, "{path} in a live session");
    }
}

/// During an upgrade, aggregators of the older build may keep folding a view of version 1 of
/// the projection, fresh, until a rebuild swaps in this build's (ADR 8). Version 1 never wrote
/// `users.session_epoch`: every row says 0, whatever the account's stream says. Ann changed her
/// password after her first session started (epoch 1): that session is refused on her own
/// routes within the bound, and one she starts after the change is served.
#[tokio::test]
async fn while_older_aggregators_keep_a_view_of_version_1_fresh_the_accounts_stream_decides_which_sessions_are_over()
 {
    let app = app().await;
    let ann = app
        .seed_user("ann@example.com", "active", &["user"])
        .await
        .id;
    let bob = app
        .seed_user("bob@example.com", "active", &["user"])
        .await
        .id;
    app.set_checkpoint_version(USERS_VERSION - 1).await;
    let before = app.token_for(ann, &["user"]).await;
    assert_eq!(app.get("/users/me", Some(&before)).await.status(), 200);

    let changed = UserEvent::PasswordChanged(PasswordChanged {
        password_hash: a_password_hash().into(),
        at: now(),
    });
    app.append_user_event(ann, changed).await;
    let committed = Instant::now();
    let after = app.token_for(ann, &["user"]).await;
    assert_eq!(app.session_epoch(ann).await, 1);
    // The older aggregators keep up: the checkpoint holds everything written, Ann's row still
    // holds the epoch it always had.
    let last = app.store.last_position().await.unwrap();
    app.set_checkpoint(last).await;
    let (version, epoch): (i32, i64) = sqlx::query_as(
        "SELECT version, session_epoch FROM projection_checkpoints, users \
         WHERE projection = 'users' AND id = $1",
    )
    .bind(ann)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!((version, epoch), (USERS_VERSION - 1, 0));

    past_the_bound(committed).await;
    let as_of = now().to_rfc3339_opts(SecondsFormat::Millis, true);
    // Each of Ann's routes, and what it answers her while she is served (lists and others'
    // accounts are an administrator's).
    let own_routes = [
        ("/users/me".to_owned(), 200),
        ("/users/me/sessions".to_owned(), 200),
        (format!("/users/{ann}"), 200),
        (format!("/users/{ann}?as_of={as_of}"), 200),
        (format!("/users/{ann}/events"), 200),
        ("/users?status=active".to_owned(), 403),
        (format!("/users/{bob}"), 403),
    ];
    let paths: Vec<String> = own_routes.iter().map(|(path, _)| path.clone()).collect();
    // With the checkpoint's position the view is known to be fresh: its row is what would be
    // trusted, were its version this build's.
    for min_position in [Some(last), None] {
        refused_everywhere(&app, &before, &paths, min_position).await;
        for (path, served) in &own_routes {
            let response = app.get_with_min_position(path, &after, min_position).await;
            assert_eq!(
                response.status(),
                *served,
                "{path} in the session after the change"
            );
        }
    }
}

#[tokio::test]
async fn a_token_whose_session_is_unknown_or_another_persons_is_refused_and_the_refusal_is_not_remembered()
 {
    // A long bound: whatever was remembered would show.
    let app = app_with_lag(Duration::from_secs(60)).await;
    let ann = app
        .seed_user("ann@example.com", "active", &["user"])
        .await
        .id;
    let bob = app
        .seed_user("bob@example.com", "active", &["user"])
        .await
        .id;
    let bobs_session = app.start_session(bob, now()).await;
    let routes = ["/users/me".to_owned(), format!("/users/{ann}/events")];

    let unknown = Uuid::now_v7();
    let in_an_unknown_session = app.token_in(ann, unknown, &["user"], now());
    refused_everywhere(&app, &in_an_unknown_session, &routes, None).await;
    let in_bobs_session = app.token_in(ann, bobs_session, &["user"], now());
    refused_everywhere(&app, &in_bobs_session, &routes, None).await;

    // Bob's token in his session is served; and once the unknown session starts, so is Ann's
    // token in it, at once.
    let bobs_token = app.token_in(bob, bobs_session, &["user"], now());
    assert_eq!(app.get("/users/me", Some(&bobs_token)).await.status(), 200);
    let mut started = app.session_started(ann, now()).await;
    started.session_id = SessionId::from_uuid(unknown);
    app.append_session_event(SessionEvent::SessionStarted(started))
        .await;
    for path in &routes {
        let response = app.get(path, Some(&in_an_unknown_session)).await;
        assert_eq!(response.status(), 200, "{path}");
    }
}

#[tokio::test]
async fn a_session_past_its_idle_or_its_absolute_limit_is_refused() {
    let app = app_with_lag(Duration::from_secs(60)).await;
    let ann = app
        .seed_user("ann@example.com", "active", &["user"])
        .await
        .id;
    let routes = ["/users/me".to_owned(), format!("/users/{ann}/events")];

    // Not refreshed for 15 days: past the 14-day idle limit.
    let idle = app.session_started(ann, now() - TimeDelta::days(15)).await;
    // Refreshed an hour ago, but past its absolute limit a second ago.
    let mut absolute = app.session_started(ann, now() - TimeDelta::days(2)).await;
    absolute.idle_expires_at = now() + TimeDelta::days(13);
    absolute.expires_at = now() - TimeDelta::seconds(1);
    for expired in [idle, absolute] {
        let session = *expired.session_id.as_uuid();
        app.append_session_event(SessionEvent::SessionStarted(expired))
            .await;
        // The token itself is fresh: only its session is over.
        let token = app.token_in(ann, session, &["user"], now());
        refused_everywhere(&app, &token, &routes, None).await;
    }
}

#[tokio::test]
async fn a_remembered_session_is_refused_once_it_expires() {
    // Remembered far longer than the session has left.
    let app = app_with_lag(Duration::from_secs(60)).await;
    let ann = app
        .seed_user("ann@example.com", "active", &["user"])
        .await
        .id;
    let mut started = app.session_started(ann, now()).await;
    started.idle_expires_at = now() + TimeDelta::seconds(1);
    let (session, limit) = (*started.session_id.as_uuid(), started.idle_expires_at);
    app.append_session_event(SessionEvent::SessionStarted(started))
        .await;
    let token = app.token_in(ann, session, &["user"], now());

    assert_eq!(app.get("/users/me", Some(&token)).await.status(), 200);
    let left = (limit - now()).to_std().unwrap_or_default();
    tokio::time::sleep(left + Duration::from_millis(10)).await;
    let (status, _) = app.get_problem("/users/me", &token).await;
    assert_eq!(status, 401, "served past the session's idle limit");
}

/// Remembered a moment before its logout, within the time rule's bound: refused once the
/// bound has passed, whether the follower of session ends has dropped it by then or not
/// (`session_ends.rs` has the follower's part).
#[tokio::test]
async fn a_session_remembered_just_before_its_logout_is_refused_once_the_bound_has_passed() {
    let bound = Duration::from_secs(2);
    let app = app_with_lag(bound).await;
    let ann = app
        .seed_user("ann@example.com", "active", &["user"])
        .await
        .id;
    let session = app.start_session(ann, now()).await;
    let token = app.token_in(ann, session, &["user"], now());
    assert_eq!(app.get("/users/me", Some(&token)).await.status(), 200);

    app.end_session(ann, session).await;
    let committed = Instant::now();
    tokio::time::sleep_until((committed + bound).into()).await;
    let routes = ["/users/me".to_owned(), "/users/me/sessions".to_owned()];
    refused_everywhere(&app, &token, &routes, None).await;
}

#[tokio::test]
async fn with_no_bound_a_logout_is_refused_at_once() {
    let app = app_with_lag(Duration::ZERO).await;
    let ann = app
        .seed_user("ann@example.com", "active", &["user"])
        .await
        .id;
    let session = app.start_session(ann, now()).await;
    let token = app.token_in(ann, session, &["user"], now());
    assert_eq!(app.get("/users/me", Some(&token)).await.status(), 200);

    app.end_session(ann, session).await;
    let routes = ["/users/me".to_owned(), "/users/me/sessions".to_owned()];
    refused_everywhere(&app, &token, &routes, None).await;
}

/// The ids of a session list, in its order, and which of them is `current`.
fn ids_and_current(list: &Value) -> Vec<(Uuid, bool)> {
    each(list, |session| {
        (
            session["id"].as_str().unwrap().parse().unwrap(),
            session["current"].as_bool().unwrap(),
        )
    })
}

fn instant(value: &Value) -> DateTime<Utc> {
    value.as_str().unwrap().parse().unwrap()
}

async fn sessions_of(app: &TestApp, token: &str, min_position: Option<u64>) -> Value {
    let response = app
        .get_with_min_position("/users/me/sessions", token, min_position)
        .await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

#[tokio::test]
async fn the_list_holds_only_the_callers_live_sessions_newest_first_with_the_current_one_marked() {
    let app = spawn_with(|_| {}).await;
    let ann = app
        .seed_user("ann@example.com", "active", &["user"])
        .await
        .id;
    let bob = app
        .seed_user("bob@example.com", "active", &["user"])
        .await
        .id;
    // The database keeps microseconds.
    let t = now().trunc_subsecs(3);
    let started = |at: DateTime<Utc>| {
        let app = &app;
        async move { app.session_started(ann, at).await }
    };

    // Of an earlier epoch: Ann ended all her sessions after it started.
    let earlier_epoch = started(t - TimeDelta::minutes(50)).await;
    app.seed_session_row(&earlier_epoch, None, None).await;
    let ended_all = UserEvent::SessionsEnded(SessionsEnded { at: t });
    let position = app.append_user_event(ann, ended_all).await;
    sqlx::query("UPDATE users SET session_epoch = 1, position = $2 WHERE id = $1")
        .bind(ann)
        .bind(i64::try_from(position).unwrap())
        .execute(&app.pool)
        .await
        .unwrap();
    app.set_checkpoint(position).await;

    let oldest = started(t - TimeDelta::minutes(40)).await;
    app.seed_session_row(&oldest, None, None).await;
    // Refreshed five minutes ago; its idle limit is the earlier one.
    let mut refreshed = started(t - TimeDelta::minutes(30)).await;
    refreshed.idle_expires_at = t + TimeDelta::minutes(10);
    let refreshed_at = t - TimeDelta::minutes(5);
    app.seed_session_row(&refreshed, Some(refreshed_at), None)
        .await;
    let logged_out = started(t - TimeDelta::minutes(20)).await;
    app.seed_session_row(&logged_out, None, Some(t - TimeDelta::minutes(1)))
        .await;
    let idle = started(t - TimeDelta::days(15)).await;
    app.seed_session_row(&idle, None, None).await;
    let mut absolute = started(t - TimeDelta::days(2)).await;
    absolute.expires_at = t - TimeDelta::minutes(1);
    app.seed_session_row(&absolute, None, None).await;
    let bobs = app.session_started(bob, t - TimeDelta::minutes(10)).await;
    app.seed_session_row(&bobs, None, None).await;
    // The session of Ann's token, in the store (its token is checked there) and in the view.
    let current = started(t - TimeDelta::minutes(3)).await;
    app.seed_session_row(&current, None, None).await;
    let current_id = *current.session_id.as_uuid();
    app.append_session_event(SessionEvent::SessionStarted(current.clone()))
        .await;
    let token = app.token_in(ann, current_id, &["user"], now());

    let list = sessions_of(&app, &token, None).await;
    let id = |started: &SessionStarted| *started.session_id.as_uuid();
    assert_eq!(
        ids_and_current(&list),
        [
            (current_id, true),
            (id(&refreshed), false),
            (id(&oldest), false)
        ],
        "{list}"
    );
    let listed = &list[1];
    assert_eq!(instant(&listed["started_at"]), refreshed.started_at);
    assert_eq!(instant(&listed["last_refreshed_at"]), refreshed_at);
    assert_eq!(instant(&listed["expires_at"]), refreshed.idle_expires_at);
    assert_eq!(listed["user_agent"], "query-api tests");
    assert_eq!(list[0]["last_refreshed_at"], Value::Null);
    assert_eq!(instant(&list[0]["expires_at"]), current.idle_expires_at);
}

#[tokio::test]
async fn the_list_holds_the_hundred_newest_sessions_at_most() {
    let app = spawn_with(|_| {}).await;
    let ann = app
        .seed_user("ann@example.com", "active", &["user"])
        .await
        .id;
    let t = now().trunc_subsecs(3);
    let mut newest_first = Vec::new();
    for minutes in 1..=105 {
        let started = app
            .session_started(ann, t - TimeDelta::minutes(minutes))
            .await;
        app.seed_session_row(&started, None, None).await;
        newest_first.push(*started.session_id.as_uuid());
    }
    let current = app.session_started(ann, t).await;
    app.seed_session_row(&current, None, None).await;
    let current_id = *current.session_id.as_uuid();
    app.append_session_event(SessionEvent::SessionStarted(current))
        .await;
    newest_first.insert(0, current_id);
    let token = app.token_in(ann, current_id, &["user"], now());

    let list = sessions_of(&app, &token, None).await;
    let listed: Vec<Uuid> = ids_and_current(&list)
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(listed, newest_first[..100]);
}

#[tokio::test]
async fn the_list_waits_for_x_min_position() {
    let app = spawn_with(|_| {}).await;
    let ann = app
        .seed_user("ann@example.com", "active", &["user"])
        .await
        .id;
    let session = app.start_session(ann, now().trunc_subsecs(3)).await;
    let token = app.token_in(ann, session, &["user"], now());
    // A login the view has not applied yet.
    let login = app.session_started(ann, now().trunc_subsecs(3)).await;
    let position = app
        .append_session_event(SessionEvent::SessionStarted(login.clone()))
        .await;

    let listing = sessions_of(&app, &token, Some(position));
    let projected = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        app.seed_session_row(&login, None, None).await;
        app.set_checkpoint(position).await;
    };
    let (list, ()) = tokio::join!(listing, projected);
    let listed: Vec<Uuid> = ids_and_current(&list)
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(listed, [*login.session_id.as_uuid()], "{list}");
}

/// Waits on the aggregator projecting sessions into the read model.
#[tokio::test]
async fn a_login_and_a_logout_show_in_the_list_once_projected_and_an_end_of_all_empties_it() {
    let app = app().await;
    let ann = app.register("ann@example.com", &["user"]).await;
    let bob = app.register("bob@example.com", &["user"]).await;
    let mut aggregator = Aggregator::over(&app, 1000).await;
    let first = app.start_session(ann, now() - TimeDelta::minutes(1)).await;
    let second = app.start_session(ann, now()).await;
    app.start_session(bob, now()).await;
    let token = app.token_in(ann, second, &["user"], now());
    let position = app.store.last_position().await.unwrap();
    aggregator.catch_up(&app).await;

    let list = sessions_of(&app, &token, Some(position)).await;
    assert_eq!(
        ids_and_current(&list),
        [(second, true), (first, false)],
        "{list}"
    );

    let ended = app.end_session(ann, first).await;
    aggregator.catch_up(&app).await;
    let list = sessions_of(&app, &token, Some(ended)).await;
    assert_eq!(ids_and_current(&list), [(second, true)], "{list}");

    let ended_all = UserEvent::SessionsEnded(SessionsEnded { at: now() });
    app.append_user_event(ann, ended_all).await;
    let third = app.start_session(ann, now()).await;
    let token = app.token_in(ann, third, &["user"], now());
    let position = app.store.last_position().await.unwrap();
    aggregator.catch_up(&app).await;
    let list = sessions_of(&app, &token, Some(position)).await;
    assert_eq!(ids_and_current(&list), [(third, true)], "{list}");
}

/// What every refusal in this file is: the 401 of an invalid token, with its problem body.
#[tokio::test]
async fn a_refused_session_gets_the_same_answer_as_a_missing_token() {
    let app = app().await;
    let ann = app
        .seed_user("ann@example.com", "active", &["user"])
        .await
        .id;
    let session = app.start_session(ann, now()).await;
    app.end_session(ann, session).await;
    let token = app.token_in(ann, session, &["user"], now());

    let (_, reference) = problem(app.get("/users/me", None).await).await;
    let response = app.get("/users/me", Some(&token)).await;
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    let (status, body) = problem(response).await;
    assert_eq!((status, body), (401, reference));
}
