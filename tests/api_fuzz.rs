//! Both APIs fuzzed from their own live OpenAPI documents with Schemathesis, against the split
//! deployment: without a token, with a user's and with an administrator's. Every check it has
//! must pass: no 5xx, every status and body as documented, schema-valid data accepted and
//! schema-invalid data refused, authentication not ignored.
//!
//! Schemathesis is a Python tool. The test installs a pinned version into a virtual environment
//! under the target directory on first use, through `test_support::python_tool`
//! (`SCHEMATHESIS=<path to st>` uses another one), so the only thing a machine needs is
//! `python3` with `venv`. Settings: `tests/schemathesis.toml`.
//!
//! Whatever program runs, each run must have reached the service: its `/metrics` must show
//! hundreds of requests served during the run and at least one to every operation the document
//! lists, or the run fails however it exited.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot go on panics with the cause

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use test_support::{Deployment, TestDatabase};

use common::{
    PASSWORD, client, get_json, metrics_text, new_deployment, register, start_all_services, token,
};

const SCHEMATHESIS_VERSION: &str = "4.32.5";
/// Fixed, so a failure found here is found again by the next run and by `st replay`.
const SEED: &str = "20261127";
const ADMIN_PASSWORD: &str = "an operator's long password";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_apis_answer_generated_requests_as_their_documents_say() {
    let st = tokio::task::spawn_blocking(schemathesis).await.unwrap();
    let database = TestDatabase::new().await;
    let deployment = new_deployment("api-fuzz", database.url());
    let client = client();
    let services = start_all_services(&deployment, &client).await;
    let (command_port, query_port) = (services.command_port, services.query_port);

    create_admin(&deployment, "root@example.com").await;
    let admin = token(&client, command_port, "root@example.com", ADMIN_PASSWORD).await;
    register(&client, command_port, "ann@example.com").await;
    let user = token(&client, command_port, "ann@example.com", PASSWORD).await;
    // An administrator of their own for the webhook routes' run: the run of every route may
    // end the other's sessions or lock it out before it reaches them.
    create_admin(&deployment, "hooks@example.com").await;
    let hooks_admin = token(&client, command_port, "hooks@example.com", ADMIN_PASSWORD).await;

    // The query API first: the command API's runs change accounts (the administrator's too:
    // wrong current passwords lock it out for a while). The command API's runs with a token
    // leave out `POST /logout`, which would end the token's session at the first case and leave every
    // later request of the run a 401; the run without a token fuzzes it. The webhook routes get
    // a run of their own with an administrator's token, so that their checks meet generated
    // bodies rather than the 401 of a session ended meanwhile.
    let runs = [
        ("query API without a token", query_port, None, None),
        (
            "query API with a user's token",
            query_port,
            Some(&user),
            None,
        ),
        (
            "query API with an administrator's token",
            query_port,
            Some(&admin),
            None,
        ),
        ("command API without a token", command_port, None, None),
        (
            "command API with a user's token",
            command_port,
            Some(&user),
            None,
        ),
        (
            "command API's webhook routes with an administrator's token",
            command_port,
            Some(&hooks_admin),
            Some(WEBHOOKS),
        ),
        (
            "command API with an administrator's token",
            command_port,
            Some(&admin),
            None,
        ),
    ];
    let mut failed = vec![];
    for (name, port, bearer, only) in runs {
        let excluded: &[&str] = if bearer.is_some() && port == command_port {
            &[LOGOUT]
        } else {
            &[]
        };
        // What the service served before and after the run tells whether the fuzzer ran at
        // all, whatever program `SCHEMATHESIS` names: a run that exits 0 having sent nothing
        // must not pass.
        let operations: Vec<(String, String)> = documented_operations(&client, port)
            .await
            .into_iter()
            .filter(|(path, _)| only.is_none_or(|prefix| path.starts_with(prefix)))
            .collect();
        let before = requests_served(&client, port).await;
        let output = tokio::task::spawn_blocking({
            let st = st.clone();
            let logs = deployment.logs.clone();
            let bearer = bearer.cloned();
            move || run_schemathesis(&st, &logs, port, bearer.as_deref(), only, excluded)
        })
        .await
        .unwrap();
        let after = requests_served(&client, port).await;
        let calls = |operation: &(String, String)| {
            after.get(operation).copied().unwrap_or(0) - before.get(operation).copied().unwrap_or(0)
        };
        let total: u64 = after.keys().map(calls).sum();
        let missed: Vec<String> = operations
            .iter()
            .filter(|operation| calls(operation) == 0 && !excluded.contains(&operation.0.as_str()))
            .map(|(path, method)| format!("{method} {path}"))
            .collect();
        println!(
            "{name}: {total} requests served to {} documented operations",
            operations.len()
        );
        let fewest = MIN_CALLS_PER_RUN.min(MIN_CALLS_PER_OPERATION * operations.len() as u64);
        if total < fewest || !missed.is_empty() {
            failed.push(format!(
                "=== {name}: the service served {total} requests during the run (at least \
                 {fewest} expected), none to {missed:?}: the fuzzer did not run \
                 ({})\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
            continue;
        }
        if !output.status.success() {
            failed.push(format!(
                "=== {name}: {}\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
    }
    assert!(
        failed.is_empty(),
        "Schemathesis found failures (the services' logs are in {}):\n{}",
        deployment.logs.display(),
        failed.join("\n")
    );
}

/// The path of the logout, which ends the session of the token it is sent with.
const LOGOUT: &str = "/logout";

/// The fewest requests one run must make: Schemathesis generates many cases for each
/// operation with parameters or a body (hundreds per run here), and at least one for each.
const MIN_CALLS_PER_RUN: u64 = 300;

/// The fewest requests per operation a run of a few operations must make.
const MIN_CALLS_PER_OPERATION: u64 = 25;

/// The paths of the webhook routes, which one run fuzzes alone.
const WEBHOOKS: &str = "/webhooks";

/// The operations the service on `port` documents: (path template, method in capitals), as
/// its `http_requests_total` labels them.
async fn documented_operations(client: &reqwest::Client, port: u16) -> Vec<(String, String)> {
    let document = get_json(client, port, "/openapi.json").await;
    let methods = [
        "get", "put", "post", "delete", "options", "head", "patch", "trace",
    ];
    document["paths"]
        .as_object()
        .expect("the document has no paths")
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .into_iter()
                .flat_map(|item| item.keys())
                .filter(|method| methods.contains(&method.as_str()))
                .map(move |method| (path.clone(), method.to_uppercase()))
        })
        .collect()
}

/// Requests the service on `port` has answered, by (route template, method), from its
/// `/metrics` (scrapes of `/metrics` itself left out).
async fn requests_served(client: &reqwest::Client, port: u16) -> HashMap<(String, String), u64> {
    let text = metrics_text(client, port).await;
    let mut served = HashMap::new();
    for line in text.lines() {
        let Some(series) = line.strip_prefix("http_requests_total{") else {
            continue;
        };
        let (labels, value) = series.rsplit_once("} ").unwrap();
        let label = |name: &str| {
            labels
                .split("\",")
                .find_map(|pair| pair.strip_prefix(&format!("{name}=\"")))
                .map(|value| value.trim_end_matches('"').to_owned())
                .unwrap()
        };
        let (route, method) = (label("route"), label("method"));
        if route == "/metrics" {
            continue;
        }
        *served.entry((route, method)).or_default() += value.trim().parse::<u64>().unwrap();
    }
    served
}

async fn create_admin(deployment: &Deployment, email: &str) {
    deployment
        .run(
            "command-api",
            &["admin", "create", "--email", email],
            Some(ADMIN_PASSWORD),
        )
        .await
        .unwrap();
}

fn run_schemathesis(
    st: &Path,
    directory: &Path,
    port: u16,
    bearer: Option<&str>,
    only: Option<&str>,
    excluded_paths: &[&str],
) -> std::process::Output {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/schemathesis.toml");
    let mut command = Command::new(st);
    command
        .arg("--config-file")
        .arg(config)
        .args(["--no-color", "run"])
        .arg(format!("http://127.0.0.1:{port}/openapi.json"))
        .args(["--checks", "all", "--seed", SEED])
        // Its reports and caches go beside the services' logs, not into the checkout.
        .current_dir(directory);
    if let Some(token) = bearer {
        command.args(["--header", &format!("Authorization: Bearer {token}")]);
    }
    if let Some(prefix) = only {
        command.args(["--include-path-regex", &format!("^{prefix}")]);
    }
    for path in excluded_paths {
        command.args(["--exclude-path", path]);
    }
    command.output().unwrap()
}

/// The `st` executable: `SCHEMATHESIS` when set, else the pinned version in a virtual
/// environment under the target directory, installed on first use.
fn schemathesis() -> PathBuf {
    test_support::python_tool::installed("schemathesis", SCHEMATHESIS_VERSION, "st")
}
