//! A command API replica hashes passwords on as many threads as the CPUs it may use, not as
//! the node has cores (`login.hashing_threads` unset): what a container's CPU limit gives it.
//!
//! `std::thread::available_parallelism` counts them, reading both the cgroup's CPU quota and
//! the process's CPU affinity mask on Linux. Setting a cgroup quota needs privileges a test
//! does not have; the affinity mask (`taskset`) goes through the same function, and is what
//! this test sets.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot go on panics with the cause

mod common;

use std::process::Command;

use test_support::TestDatabase;

use common::{client, metric, new_deployment};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hashing_threads_follow_the_cpus_the_process_may_use() {
    let cores = std::thread::available_parallelism().unwrap().get();
    if Command::new("taskset").arg("--version").output().is_err() {
        panic!("taskset is missing: install util-linux (it sets the CPU affinity of a process)");
    }
    let database = TestDatabase::new().await;
    let deployment = new_deployment("cpu-limit", database.url());
    let client = client();
    deployment.migrate().await.unwrap();

    let (mut unlimited, port) = deployment
        .start_service(&client, "command-api", "command-api", &[])
        .await
        .unwrap();
    let threads = metric(&client, port, "login_hashing_threads").await;
    assert_eq!(threads, Some(cores as f64), "without a limit, one per core");
    unlimited.shut_down().await.unwrap();

    // The same binary, allowed one CPU.
    let (mut limited, port) = deployment
        .start_service_under(
            &client,
            &["taskset", "-c", "0"],
            "command-api",
            "command-api-one-cpu",
            &[],
        )
        .await
        .unwrap();
    let threads = metric(&client, port, "login_hashing_threads").await;
    assert_eq!(threads, Some(1.0), "allowed one CPU of {cores}");
    limited.shut_down().await.unwrap();
}
