use std::sync::Arc;

use chrono::TimeDelta;
use identity::{LoginEvent, UserEvent};
use serde_json::{Value, json};
use tokens::{TokenSettings, TokenVerifier};

use crate::helpers::{PASSWORD, TestApp, problem, spawn_app, spawn_on, spawn_with};
use crate::timing::{MAX_Z, slowdown_z};

#[tokio::test]
async fn login_with_the_right_password_gives_a_token_that_verifies_against_the_published_jwks() {
    let app = spawn_app().await;
    let id = app.user("ann@example.com").await;
    let response = app.login("Ann@Example.com", PASSWORD).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["cache-control"], "no-store");
    assert!(response.headers().contains_key("x-position"));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 900);

    let jwks = app.get_json("/.well-known/jwks.json").await;
    let verifier =
        TokenVerifier::from_jwks(&jwks, TokenSettings::new("https://identity.test", "tests"))
            .unwrap();
    let claims = verifier
        .verify(body["access_token"].as_str().unwrap(), app.clock_now())
        .unwrap();
    assert_eq!(claims.sub.to_string(), id);
    assert_eq!(claims.roles, ["user"]);
    assert!(matches!(
        app.login_events().await[..],
        [LoginEvent::LoginSucceeded(_)]
    ));
}

impl TestApp {
    fn clock_now(&self) -> chrono::DateTime<chrono::Utc> {
        use platform::clock::Clock;
        self.clock.now()
    }
}

#[tokio::test]
async fn every_failed_login_gets_the_same_401_body() {
    let app = spawn_with(|settings| settings.login.max_failures = 2).await;
    let admin = app.admin_token().await;
    app.user("ann@example.com").await;
    let bob = app.user("bob@example.com").await;
    app.deactivate(&bob, &admin).await;
    let carl = app.user("carl@example.com").await;
    let _ = carl;
    // Carl gets locked.
    app.login("carl@example.com", "wrong password 1").await;
    app.login("carl@example.com", "wrong password 2").await;

    let mut bodies = Vec::new();
    for (email, password) in [
        ("nobody@example.com", PASSWORD),
        ("ann@example.com", "wrong password"),
        ("bob@example.com", PASSWORD),
        ("carl@example.com", PASSWORD),
        ("not an email", PASSWORD),
    ] {
        let response = app.login(email, password).await;
        assert_eq!(response.status(), 401, "{email}");
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
        bodies.push(problem(response).await);
    }
    assert_eq!(bodies[0]["code"], "invalid_credentials");
    assert!(bodies.iter().all(|body| *body == bodies[0]), "{bodies:?}");
}

#[tokio::test]
async fn refused_logins_other_than_a_wrong_password_leave_the_store_unchanged() {
    let app = spawn_with(|settings| settings.login.max_failures = 1).await;
    let admin = app.admin_token().await;
    let bob = app.user("bob@example.com").await;
    app.deactivate(&bob, &admin).await;
    app.user("carl@example.com").await;
    app.login("carl@example.com", "wrong password").await;
    let before = app.message_count().await;
    for (email, password) in [
        ("nobody@example.com", PASSWORD),
        ("bob@example.com", PASSWORD),
        ("carl@example.com", PASSWORD),
        ("carl@example.com", "wrong again"),
    ] {
        assert_eq!(app.login(email, password).await.status(), 401);
    }
    assert_eq!(app.message_count().await, before);
}

#[tokio::test]
async fn the_lockout_engages_after_max_failures_refuses_the_right_password_and_expires() {
    let app = spawn_with(|settings| {
        settings.login.max_failures = 3;
        settings.login.lockout_base_seconds = 60;
    })
    .await;
    app.user("ann@example.com").await;
    for _ in 0..3 {
        assert_eq!(
            app.login("ann@example.com", "wrong password")
                .await
                .status(),
            401
        );
    }
    // Locked: even the right password is refused.
    assert_eq!(app.login("ann@example.com", PASSWORD).await.status(), 401);
    app.clock.advance(TimeDelta::seconds(59));
    assert_eq!(app.login("ann@example.com", PASSWORD).await.status(), 401);
    app.clock.advance(TimeDelta::seconds(2));
    assert_eq!(app.login("ann@example.com", PASSWORD).await.status(), 200);
    let events = app.login_events().await;
    assert!(matches!(
        &events[..],
        [LoginEvent::LoginFailed(_), LoginEvent::LoginFailed(_), LoginEvent::LoginFailed(third), LoginEvent::LoginSucceeded(_)]
            if third.locked_until.is_some()
    ));
}

#[tokio::test]
async fn a_deactivated_account_cannot_log_in_until_it_is_activated_again() {
    let app = spawn_app().await;
    let admin = app.admin_token().await;
    let id = app.user("ann@example.com").await;
    assert_eq!(app.login("ann@example.com", PASSWORD).await.status(), 200);
    assert_eq!(app.deactivate(&id, &admin).await.status(), 200);
    assert_eq!(app.login("ann@example.com", PASSWORD).await.status(), 401);
    assert_eq!(app.activate(&id, &admin).await.status(), 200);
    assert_eq!(app.login("ann@example.com", PASSWORD).await.status(), 200);
}

#[tokio::test]
async fn a_hash_weaker_than_configured_is_upgraded_on_the_next_successful_login() {
    let weak = spawn_app().await;
    weak.user("ann@example.com").await;
    let mut stronger = weak.settings.clone();
    stronger.password.memory_kib = 2048;
    stronger.password.iterations = 2;
    let app = spawn_on(Arc::clone(&weak.database), stronger, weak.clock.clone()).await;

    assert_eq!(
        app.login("ann@example.com", "wrong password")
            .await
            .status(),
        401
    );
    assert_eq!(
        app.user_events().await.len(),
        1,
        "a failed login upgrades nothing"
    );
    assert_eq!(app.login("ann@example.com", PASSWORD).await.status(), 200);
    let events = app.user_events().await;
    let [
        UserEvent::UserRegistered(_),
        UserEvent::PasswordRehashed(rehashed),
    ] = &events[..]
    else {
        panic!("expected a rehash, got {events:?}");
    };
    assert!(
        rehashed
            .password_hash
            .known()
            .unwrap()
            .as_str()
            .starts_with("$argon2id$v=19$m=2048,t=2,p=1$")
    );
    // The new hash verifies, and needs no further upgrade.
    assert_eq!(app.login("ann@example.com", PASSWORD).await.status(), 200);
    assert_eq!(app.user_events().await.len(), 2);
}

#[tokio::test]
async fn login_history_older_than_the_retention_is_pruned_but_the_last_login_is_kept() {
    let app = spawn_app().await;
    app.user("ann@example.com").await;
    for _ in 0..4 {
        assert_eq!(app.login("ann@example.com", PASSWORD).await.status(), 200);
    }
    app.clock.advance(TimeDelta::days(91));
    // A restart prunes at once.
    let restarted = spawn_on(
        Arc::clone(&app.database),
        app.settings.clone(),
        app.clock.clone(),
    )
    .await;
    // What stays: the stream's first message and its last login (the last of each kind).
    let mut remaining = 4;
    for _ in 0..50 {
        remaining = restarted.login_events().await.len();
        if remaining == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(remaining, 2);
    let events = restarted.login_events().await;
    assert!(matches!(
        &events[..],
        [LoginEvent::LoginSucceeded(first), LoginEvent::LoginSucceeded(last)]
            if first.login_count == 1 && last.login_count == 4
    ));
    assert_eq!(
        restarted.login("ann@example.com", PASSWORD).await.status(),
        200
    );
}

#[tokio::test]
async fn a_burst_beyond_the_waiting_bound_is_throttled_with_retry_after() {
    let app = spawn_with(|settings| {
        // Two hashes at a time whatever the machine's cores, and none may wait for one.
        settings.login.hashing_threads = Some(2);
        settings.login.max_waiting_hashes = 0;
        settings.password.memory_kib = 32 * 1024;
        settings.password.iterations = 3;
    })
    .await;
    app.user("ann@example.com").await;
    let attempts = (0..16).map(|_| app.login("ann@example.com", PASSWORD));
    let responses = futures::future::join_all(attempts).await;
    let (throttled, others): (Vec<_>, Vec<_>) =
        responses.into_iter().partition(|r| r.status() == 429);
    assert!(
        !throttled.is_empty(),
        "16 logins at once on two hashing threads, none waiting allowed"
    );
    for response in others {
        assert_eq!(response.status(), 200);
    }
    for response in throttled {
        assert_eq!(response.headers()["retry-after"], "1");
        assert_eq!(problem(response).await["code"], "throttled");
    }
}

/// Bob's logins may take this many times as long while Ann is attacked as while she is not:
/// the attack shares the machine and the hashing threads, so some slowdown is physics; a
/// lockout that held anything Bob needs would cost far more.
const ATTACK_SLOWDOWN: f64 = 3.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_locked_and_still_attacked_does_not_slow_the_logins_of_others() {
    let app = spawn_with(|settings| {
        settings.login.max_failures = 3;
        settings.login.hashing_threads = Some(2);
    })
    .await;
    let z = bob_slowdown_z(&app, 1, "Bob's logins while Ann is attacked").await;
    assert!(
        z < MAX_Z,
        "Bob's logins slowed more than {ATTACK_SLOWDOWN}x while Ann was locked: z = {z:.2}"
    );
}

/// The control of the test above: the same procedure where the attack does hold what Bob
/// needs (one hashing thread, 24 attackers and a costlier hash, so Bob's check waits behind
/// theirs). The test must see that slowdown, or it could not fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attack_that_holds_the_hashing_thread_is_seen_to_slow_the_logins_of_others() {
    let app = spawn_with(|settings| {
        settings.login.max_failures = 3;
        settings.login.hashing_threads = Some(1);
        settings.password.memory_kib = 4 * 1024;
        settings.password.iterations = 4;
    })
    .await;
    let z = bob_slowdown_z(&app, 24, "Bob's logins behind the attack").await;
    assert!(
        z >= MAX_Z,
        "a slowdown the attack truly causes was not seen: z = {z:.2}"
    );
}

/// How far beyond [`ATTACK_SLOWDOWN`] Bob's logins slow while `attackers` clients keep
/// guessing Ann's password (the z score of [`slowdown_z`], printed under `name`).
async fn bob_slowdown_z(app: &TestApp, attackers: usize, name: &str) -> f64 {
    let (quiet, attacked) = bob_logs_in_while_ann_is_attacked(app, attackers).await;
    slowdown_z(name, &attacked, &quiet, ATTACK_SLOWDOWN)
}

/// Bob's login times (ms) while nobody attacks Ann's locked account, and while `attackers`
/// clients keep guessing her password; in alternating windows, so that whatever else the
/// machine does falls on both alike.
async fn bob_logs_in_while_ann_is_attacked(
    app: &TestApp,
    attackers: usize,
) -> (Vec<f64>, Vec<f64>) {
    const ROUNDS: usize = 10;
    const PER_WINDOW: usize = 4;
    app.user("ann@example.com").await;
    app.user("bob@example.com").await;
    for _ in 0..3 {
        app.login("ann@example.com", "wrong password").await;
    }
    assert_eq!(
        app.login("ann@example.com", PASSWORD).await.status(),
        401,
        "Ann is not locked"
    );
    let bob_logs_in = || async {
        let started = std::time::Instant::now();
        let response = app.login("bob@example.com", PASSWORD).await;
        assert_eq!(response.status(), 200, "Bob was refused");
        started.elapsed().as_secs_f64() * 1000.0
    };
    bob_logs_in().await;
    let (mut quiet, mut attacked) = (vec![], vec![]);
    for round in 0..ROUNDS {
        for attack in [round % 2 == 0, round % 2 == 1] {
            if !attack {
                for _ in 0..PER_WINDOW {
                    quiet.push(bob_logs_in().await);
                }
                continue;
            }
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (started, mut running) = tokio::sync::mpsc::unbounded_channel();
            let attack: Vec<_> = (0..attackers)
                .map(|_| {
                    let (client, url) = (app.client.clone(), app.url("/login"));
                    let (stop, started) = (stop.clone(), started.clone());
                    tokio::spawn(async move {
                        let body = json!({ "email": "ann@example.com", "password": "a guess" });
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                            let response = client.post(&url).json(&body).send().await.unwrap();
                            assert_eq!(response.status(), 401, "Ann was not refused");
                            let _ = started.send(());
                        }
                    })
                })
                .collect();
            // Every attacker has been answered once: the attack is under way.
            for _ in 0..attackers {
                running.recv().await.unwrap();
            }
            for _ in 0..PER_WINDOW {
                attacked.push(bob_logs_in().await);
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            for attacker in attack {
                attacker.await.unwrap();
            }
        }
    }
    (quiet, attacked)
}
