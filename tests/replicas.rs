//! Several replicas of each binary behave as one service: two command APIs, two query APIs and
//! two aggregators against one PostgreSQL database, the client spreading its requests across
//! them as a load balancer would.
//!
//! Nothing in a replica's memory decides anything another replica must agree with: logins,
//! lockouts and sessions are decided from the message store, reads wait for the position the
//! write answered, and one aggregator holds each consumer while the other stands by. Each test
//! below would fail if some state lived in one replica only.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot go on panics with the cause

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use test_support::{Deployment, Process, Signal, TestDatabase};
use tokens::{Algorithm, SigningKey};
use uuid::Uuid;

use common::sessions::REVOCATION_BOUND;
use common::{PASSWORD, client, get_as, login, new_deployment, register, token, x_position};

/// The wrong passwords that lock an account, spread over both command APIs.
const MAX_FAILURES: u32 = 4;

/// One test at a time: six processes each, with their pools, are as many connections as a
/// PostgreSQL server allows by default (100), and more would make the tests about that.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Clients registering while replicas are killed, and the registrations each makes.
const WRITERS: usize = 4;
const REGISTRATIONS_EACH: usize = 40;

/// Two of each service, on ports of their own.
struct Replicas {
    command: [u16; 2],
    query: [u16; 2],
    processes: BTreeMap<String, Process>,
}

async fn start_replicas(
    deployment: &Deployment,
    client: &reqwest::Client,
    settings: &[(&str, String)],
) -> Replicas {
    deployment.migrate().await.unwrap();
    let mut processes = BTreeMap::new();
    let mut ports = BTreeMap::new();
    for binary in ["aggregator", "command-api", "query-api"] {
        for replica in 1..=2 {
            let label = format!("{binary}-{replica}");
            let (process, port) = deployment
                .start_service(client, binary, &label, settings)
                .await
                .unwrap();
            ports.insert(label.clone(), port);
            processes.insert(label, process);
        }
    }
    Replicas {
        command: [ports["command-api-1"], ports["command-api-2"]],
        query: [ports["query-api-1"], ports["query-api-2"]],
        processes,
    }
}

fn replica_deployment(name: &str, url: &str) -> Deployment {
    new_deployment(name, url)
        .with_setting("IDENTITY__LOGIN__MAX_FAILURES", MAX_FAILURES.to_string())
        .with_setting("IDENTITY__LOGIN__LOCKOUT_BASE_SECONDS", "300")
}

async fn create_administrator(
    deployment: &Deployment,
    client: &reqwest::Client,
    port: u16,
) -> String {
    deployment
        .run(
            "command-api",
            &["admin", "create", "--email", "root@example.com"],
            Some("an operator's long password"),
        )
        .await
        .unwrap();
    token(
        client,
        port,
        "root@example.com",
        "an operator's long password",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_of_each_service_decide_and_answer_as_one() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let database = TestDatabase::new().await;
    let deployment = replica_deployment("replicas", database.url());
    let client = client();
    let replicas = start_replicas(&deployment, &client, &[]).await;
    let [c1, c2] = replicas.command;
    let [q1, q2] = replicas.query;

    // A registration on one command API and a login on the other at once: a login reads the
    // store, which the registration has committed to before it answered.
    for n in 0..10 {
        let email = format!("at-once{n}@example.com");
        let (id, position) = register(&client, [c1, c2][n % 2], &email).await;
        let response = login(&client, [c2, c1][n % 2], &email, PASSWORD).await;
        assert_eq!(
            response.status(),
            200,
            "a login on the other replica of {email}"
        );
        let access: Value = response.json().await.unwrap();
        let access = access["access_token"].as_str().unwrap();
        // Read your write on the query replica the other command API did not answer from.
        let own = get_as(
            &client,
            [q2, q1][n % 2],
            "/users/me",
            access,
            Some(position),
        )
        .await;
        assert_eq!(own.status(), 200, "{email} read on the other query replica");
        let own: Value = own.json().await.unwrap();
        assert_eq!(own["id"], json!(id));
    }

    // Wrong passwords spread over both command APIs lock the account at `max_failures`, the
    // count kept in the store, not in either replica.
    register(&client, c1, "locked@example.com").await;
    for attempt in 0..MAX_FAILURES {
        let port = [c1, c2][attempt as usize % 2];
        let refused = login(&client, port, "locked@example.com", "a wrong password!").await;
        assert_eq!(refused.status(), 401);
    }
    for port in [c1, c2] {
        let locked = login(&client, port, "locked@example.com", PASSWORD).await;
        assert_eq!(
            locked.status(),
            401,
            "the right password after {MAX_FAILURES} wrong ones spread over two replicas"
        );
    }
    // One wrong password fewer locks nothing: the count above is what locked it.
    register(&client, c2, "almost@example.com").await;
    for attempt in 0..MAX_FAILURES - 1 {
        let port = [c2, c1][attempt as usize % 2];
        login(&client, port, "almost@example.com", "a wrong password!").await;
    }
    assert_eq!(
        login(&client, c1, "almost@example.com", PASSWORD)
            .await
            .status(),
        200
    );

    // A deactivation on one command API, and a logout on the other, are refused by both query
    // replicas within the stated bound.
    let admin = create_administrator(&deployment, &client, c1).await;
    let (dee, _) = register(&client, c1, "dee@example.com").await;
    let dee_token = token(&client, c2, "dee@example.com", PASSWORD).await;
    register(&client, c2, "eve@example.com").await;
    let eve_token = token(&client, c1, "eve@example.com", PASSWORD).await;
    for port in [q1, q2] {
        for access in [&dee_token, &eve_token] {
            assert_eq!(
                get_as(&client, port, "/users/me", access, None)
                    .await
                    .status(),
                200
            );
        }
    }
    let deactivated = client
        .post(format!("http://127.0.0.1:{c2}/users/{dee}/deactivate"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(deactivated.status(), 200);
    let logged_out = client
        .post(format!("http://127.0.0.1:{c1}/logout"))
        .bearer_auth(&eve_token)
        .send()
        .await
        .unwrap();
    assert!(logged_out.status().is_success(), "{}", logged_out.status());
    tokio::time::sleep(REVOCATION_BOUND).await;
    for port in [q1, q2] {
        for (who, access) in [
            ("a deactivated account", &dee_token),
            ("a logged-out session", &eve_token),
        ] {
            let served = get_as(&client, port, "/users/me", access, None).await;
            assert_eq!(
                served.status(),
                401,
                "{who} is still served by the query replica on {port} {REVOCATION_BOUND:?} later"
            );
        }
    }

    let mut processes = replicas.processes;
    for process in processes.values_mut() {
        process.shut_down().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotated_in_on_one_command_replica_is_accepted_by_every_replica() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let database = TestDatabase::new().await;
    let deployment = replica_deployment("replicas-keys", database.url());
    let old_key = deployment.signing_key.clone();
    let new_key = SigningKey::generate(Algorithm::EdDSA)
        .unwrap()
        .to_pem()
        .unwrap()
        .expose_secret()
        .clone();
    // Step 1 of a rotation, everywhere: the next key is published beside the old one.
    let published = deployment.logs.join("published.pem");
    std::fs::write(&published, &new_key).unwrap();
    let publish = (
        "IDENTITY__TOKENS__PUBLISHED_KEYS",
        published.display().to_string(),
    );
    let client = client();
    let mut replicas = start_replicas(&deployment, &client, &[publish]).await;
    let [c1, c2] = replicas.command;
    register(&client, c1, "ann@example.com").await;

    // Step 2 on one replica only (a rolling restart half done): it signs with the next key,
    // and publishes the old one.
    replicas
        .processes
        .get_mut("command-api-1")
        .unwrap()
        .shut_down()
        .await
        .unwrap();
    let old_published = deployment.logs.join("old.pem");
    std::fs::write(&old_published, &old_key).unwrap();
    let (restarted, c1) = deployment
        .start_service(
            &client,
            "command-api",
            "command-api-1-next-key",
            &[
                ("IDENTITY__TOKENS__SIGNING_KEY", new_key.clone()),
                (
                    "IDENTITY__TOKENS__PUBLISHED_KEYS",
                    old_published.display().to_string(),
                ),
            ],
        )
        .await
        .unwrap();
    replicas.processes.insert("command-api-1".into(), restarted);

    let by_new_key = token(&client, c1, "ann@example.com", PASSWORD).await;
    let by_old_key = token(&client, c2, "ann@example.com", PASSWORD).await;
    assert_ne!(
        kid(&by_new_key),
        kid(&by_old_key),
        "both replicas sign with the same key"
    );
    for access in [&by_new_key, &by_old_key] {
        for port in replicas.query {
            let own = get_as(&client, port, "/users/me", access, None).await;
            assert_eq!(
                own.status(),
                200,
                "a token of key {} on query replica {port}",
                kid(access)
            );
        }
        // The command side checks tokens too: ending a session that does not exist is a 404
        // to a caller whose token is accepted, a 401 to one whose is not.
        for port in [c1, c2] {
            let answer = client
                .delete(format!(
                    "http://127.0.0.1:{port}/users/me/sessions/{}",
                    Uuid::new_v4()
                ))
                .bearer_auth(access)
                .send()
                .await
                .unwrap();
            assert_eq!(
                answer.status(),
                404,
                "a token of key {} on command replica {port}",
                kid(access)
            );
        }
    }

    for process in replicas.processes.values_mut() {
        process.shut_down().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_of_each_service_killed_mid_traffic_loses_no_acknowledged_write() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let database = TestDatabase::new().await;
    let deployment = replica_deployment("replicas-killed", database.url());
    let client = client();
    let mut replicas = start_replicas(&deployment, &client, &[]).await;
    let [c1, c2] = replicas.command;
    let [q1, q2] = replicas.query;
    let admin = create_administrator(&deployment, &client, c2).await;

    // Clients register with ids of their own (so a retry is safe), alternating replicas, and
    // retry a request whose replica died on the other one, as a client behind a load balancer
    // does. Every 201 is an acknowledged write.
    let written = Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let (client, written) = (client.clone(), written.clone());
            tokio::spawn(async move {
                let mut acknowledged = Vec::new();
                for n in 0..REGISTRATIONS_EACH {
                    let id = Uuid::new_v4();
                    let email = format!("w{writer}-{n}@example.com");
                    let body = json!({ "id": id, "email": email, "password": PASSWORD });
                    let mut ports = [c1, c2];
                    ports.rotate_left((writer + n) % 2);
                    for port in ports.iter().cycle().take(6) {
                        let sent = client
                            .post(format!("http://127.0.0.1:{port}/users"))
                            .json(&body)
                            .send()
                            .await;
                        match sent {
                            Ok(response) if response.status() == 201 => {
                                acknowledged.push((id, x_position(&response)));
                                written.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                            // A retry of a registration whose first answer was lost with
                            // its replica: the store has it under this id.
                            Ok(response) if response.status() == 409 => break,
                            Ok(response) if response.status().is_server_error() => {}
                            Ok(response) => panic!("{email}: {}", response.status()),
                            Err(_) => {}
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                acknowledged
            })
        })
        .collect();

    // Mid-traffic, one replica of each dies without a chance to finish anything.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let before_kill = written.load(Ordering::Relaxed);
    for label in ["command-api-1", "query-api-1", "aggregator-1"] {
        let process = replicas.processes.get_mut(label).unwrap();
        process.stop(Signal::Kill).await.unwrap();
    }
    assert!(
        0 < before_kill && before_kill < WRITERS * REGISTRATIONS_EACH / 2,
        "{before_kill} registrations were acknowledged before the kill: it was not mid-traffic"
    );

    let mut acknowledged = Vec::new();
    for writer in writers {
        acknowledged.extend(writer.await.unwrap());
    }
    assert!(
        acknowledged.len() >= 100,
        "only {} registrations were acknowledged",
        acknowledged.len()
    );
    let last = acknowledged
        .iter()
        .map(|(_, position)| *position)
        .max()
        .unwrap();

    // Every acknowledged registration is in the store, and the surviving aggregator brings the
    // view to it: the surviving query replica serves each.
    let pool = database.pool().await;
    for (id, _) in &acknowledged {
        let stored: i64 =
            sqlx::query_scalar("SELECT count(*) FROM messages WHERE stream_name = $1")
                .bind(format!("user-{id}"))
                .fetch_one(&pool)
                .await
                .unwrap();
        assert!(
            stored >= 1,
            "acknowledged registration {id} is not in the store"
        );
    }
    for (id, _) in &acknowledged {
        let profile = get_as(&client, q2, &format!("/users/{id}"), &admin, Some(last)).await;
        assert_eq!(
            profile.status(),
            200,
            "acknowledged registration {id} on the surviving query replica"
        );
    }
    // The killed query replica served until it died; the surviving one answers for both.
    assert!(
        client
            .get(format!("http://127.0.0.1:{q1}/healthz"))
            .send()
            .await
            .is_err(),
        "the killed query replica still answers"
    );

    for process in replicas.processes.values_mut() {
        if process.is_running() {
            process.shut_down().await.unwrap();
        }
    }
}

/// The `kid` in an access token's header.
fn kid(token: &str) -> String {
    use base64::Engine;
    let header = token.split('.').next().unwrap();
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .unwrap();
    let header: Value = serde_json::from_slice(&header).unwrap();
    header["kid"].as_str().unwrap().to_owned()
}
