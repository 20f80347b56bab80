//! A flood of concurrent logins cannot exhaust the command API's memory: each password check
//! holds `password.memory_kib` (19 MiB by default), but at most one runs per core and at most
//! `login.max_waiting_hashes` wait; the rest are refused with 429 before costing anything.
//! Without that bound, the 600 logins below would ask for over 11 GiB at once.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot go on panics with the cause

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use test_support::TestDatabase;
use test_support::process::proc_status_kib;

use common::{PASSWORD, new_deployment, register};

const MEMORY_KIB: u64 = 19 * 1024;
const LOGINS: usize = 600;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_hundred_concurrent_logins_hold_memory_to_one_hash_per_core() {
    let database = TestDatabase::new().await;
    let deployment = new_deployment("login-flood", database.url());
    deployment
        .run("command-api", &["migrate"], None)
        .await
        .unwrap();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let (command_api, port) = deployment
        .start_service(
            &client,
            "command-api",
            "command-api",
            &[
                // The production cost, which is what an attacker would multiply.
                ("IDENTITY__PASSWORD__MEMORY_KIB", MEMORY_KIB.to_string()),
                ("IDENTITY__PASSWORD__ITERATIONS", "2".to_owned()),
            ],
        )
        .await
        .unwrap();
    register(&client, port, "ann@example.com").await;
    register(&client, port, "bob@example.com").await;
    let at_rest = resident_kib(command_api.id());

    // Sample the resident memory while the flood lasts.
    let peak = Arc::new(AtomicU64::new(at_rest));
    let flooding = Arc::new(AtomicBool::new(true));
    let sampler = tokio::spawn({
        let (peak, flooding) = (peak.clone(), flooding.clone());
        let pid = command_api.id();
        async move {
            while flooding.load(Ordering::Relaxed) {
                peak.fetch_max(resident_kib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    let logins = (0..LOGINS).map(|n| {
        let client = client.clone();
        async move {
            let email = if n % 2 == 0 {
                "ann@example.com".to_owned()
            } else {
                format!("nobody{n}@example.com")
            };
            client
                .post(format!("http://127.0.0.1:{port}/login"))
                .json(&serde_json::json!({ "email": email, "password": "a guess at it" }))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    });
    let statuses = futures::future::join_all(logins).await;
    flooding.store(false, Ordering::Relaxed);
    sampler.await.unwrap();

    let throttled = statuses.iter().filter(|status| **status == 429).count();
    let refused = statuses.iter().filter(|status| **status == 401).count();
    assert_eq!(
        throttled + refused,
        LOGINS,
        "every login is refused or throttled: {statuses:?}"
    );
    assert!(
        throttled > 0,
        "nothing was throttled: the bound did not engage"
    );

    let cores = std::thread::available_parallelism().unwrap().get() as u64;
    let growth = peak.load(Ordering::Relaxed).saturating_sub(at_rest);
    // One hash per core, plus room for buffers and the connections of 600 clients.
    let bound = cores * MEMORY_KIB + 64 * 1024;
    assert!(
        growth <= bound,
        "resident memory grew by {} MiB under the flood; the bound is {} MiB",
        growth / 1024,
        bound / 1024
    );

    // And the service still serves a legitimate login afterwards (Ann's account is locked by
    // now, as it should be after so many wrong guesses).
    let response = client
        .post(format!("http://127.0.0.1:{port}/login"))
        .json(&serde_json::json!({ "email": "bob@example.com", "password": PASSWORD }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

/// VmRSS of a process, in KiB.
fn resident_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmRSS").unwrap()
}
