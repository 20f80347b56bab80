//! Erasure end to end (ADR 13), in both ways the service runs: the split deployment (the real
//! command-api, query-api and aggregator processes on one PostgreSQL database) and the
//! standalone process (one SQLite file).
//!
//! A person registers with an address in mixed case, changes their password and moves to
//! another address through the mailed link, and is erased with `DELETE /users/{id}`: by
//! themself with their password in the split deployment, by an administrator in the standalone.
//! Once the projection has applied the erasure, what the service stores is dumped, the way an
//! attacker or a backup would take it: `pg_dump` of the whole database (message store, key
//! table, read model), and the SQLite file with its write-ahead log byte for byte while the
//! process runs, then again, and every row of it, once the process has stopped. No dump holds
//! any address the person ever had, in any form (as typed, as the service normalised it,
//! lower-cased, its unkeyed SHA-256, base64, hexadecimal), nor any password hash at all (every
//! hash is sealed, the administrator's too); each dump does hold the erased account (its id,
//! `UserErased`, the erased row, the key's tombstone), so an empty dump cannot pass.
//!
//! Logging in with either address answers exactly what an address never registered answers;
//! the first address registers again as a new account, and the old one stays erased for an
//! administrator and is never found by a lookup.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot go on panics with the cause

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};
use sqlx::{Connection, Row};
use test_support::process::free_port;
use test_support::{Launch, Process, Signal, SmtpCatcher, TestDatabase};

use common::mail::{LINK_BASE, link_token, mails_to};
use common::sessions::REVOCATION_BOUND;
use common::{
    PASSWORD, client, new_deployment, start_all_services, wait_for_checkpoint, x_position,
};

/// The address the person registers with: mixed case, a sub-address, so that each form
/// (as typed, normalised, lower-cased) is a string of its own.
const ADDRESS: &str = "Erin.Example+Tag@Example.COM";
/// The address the person moves to through the mailed link.
const NEW_ADDRESS: &str = "Erin.Moved+Elsewhere@Example.NET";
const NEW_PASSWORD: &str = "a brand new passphrase";
const NEVER_REGISTERED: &str = "nobody-ever@example.com";
const ADMIN_EMAIL: &str = "root@example.com";
const ADMIN_PASSWORD: &str = "an operator's long password";

/// Where a client sends commands and queries: two processes in the split deployment, the same
/// one in the standalone.
#[derive(Clone, Copy)]
struct Ports {
    command: u16,
    query: u16,
}

/// The person whose account is erased, as they were just before.
struct Person {
    id: String,
    /// An access token of their last login, at the last address with the last password.
    token: String,
    /// Every address the service gave back to them in their export (`GET /users/me/export`):
    /// as typed and as normalised by the service.
    addresses: BTreeSet<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_erasure_a_pg_dump_of_the_split_deployment_holds_no_trace_of_the_person_and_the_address_registers_again()
 {
    let database = TestDatabase::new().await;
    let smtp = SmtpCatcher::start().await.unwrap();
    let deployment = new_deployment("erasure-split", database.url())
        .with_setting("IDENTITY__MAIL__SMTP_URL", smtp.url())
        .with_setting("IDENTITY__MAIL__FROM", "Identity <identity@example.net>")
        .with_setting("IDENTITY__MAIL__LINK_BASE_URL", LINK_BASE);
    let client = client();
    let services = start_all_services(&deployment, &client).await;
    let ports = Ports {
        command: services.command_port,
        query: services.query_port,
    };
    deployment
        .run(
            "command-api",
            &["admin", "create", "--email", ADMIN_EMAIL],
            Some(ADMIN_PASSWORD),
        )
        .await
        .unwrap();
    let admin = common::token(&client, ports.command, ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let unknown = login_answer(&client, ports, NEVER_REGISTERED, PASSWORD).await;

    let erin = live_a_little(&client, ports, &smtp).await;
    let traces = traces_of(&erin.addresses);
    // Before the erasure the users view holds the current address in clear, to look it up:
    // the search finds it there, so it would find what an erasure left.
    let before = pg_dump(database.url());
    let found = traces_in(&before, "pg_dump", &traces, &|offset| {
        copy_block_at(&before, offset)
    });
    assert_found_in_the_users_view(&found, "COPY public.users");

    // The person asks to be forgotten, proving it is them with their password.
    let response = client
        .delete(format!(
            "http://127.0.0.1:{}/users/{}",
            ports.command, erin.id
        ))
        .bearer_auth(&erin.token)
        .json(&json!({ "password": NEW_PASSWORD }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204, "{}", describe(response).await);
    let erased_at = x_position(&response);
    wait_for_checkpoint(
        database.url(),
        erased_at,
        Duration::from_secs(30),
        &deployment.logs,
    )
    .await;
    assert_erased_for_everyone(&client, ports, &admin, &erin, erased_at, &unknown).await;

    let dump = pg_dump(database.url());
    let mut findings = traces_in(&dump, "pg_dump", &traces, &|offset| {
        copy_block_at(&dump, offset)
    });
    findings.extend(argon2_hashes_in(&dump, "pg_dump"));
    assert!(
        findings.is_empty(),
        "the dump of the database still holds the person's data (logs in {}):\n{}",
        deployment.logs.display(),
        findings.join("\n")
    );
    // The dump is the whole database, the erased account in it: an empty or partial dump
    // would have passed the assertion above.
    let text = String::from_utf8_lossy(&dump);
    for expected in [erin.id.as_str(), "UserErased", "aes256gcm"] {
        assert!(text.contains(expected), "the dump holds no {expected}");
    }
    let users = copy_rows(&text, "public.users");
    assert_erased_row(&users, "users", &erin.id);
    let keys = copy_rows(&text, "public.personal_keys");
    assert_key_tombstone(&keys, &erin.id);

    address_registers_again_as_a_new_account(&client, ports, &admin, &erin.id).await;
    services.shut_down().await.unwrap();
    let _ = std::fs::remove_dir_all(&deployment.logs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_erasure_the_standalone_sqlite_file_and_its_log_hold_no_trace_of_the_person_byte_for_byte_and_the_address_registers_again()
 {
    let smtp = SmtpCatcher::start().await.unwrap();
    let directory =
        std::env::temp_dir().join(format!("erasure-standalone-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&directory).unwrap();
    let port = free_port().unwrap();
    let ports = Ports {
        command: port,
        query: port,
    };
    let client = client();
    let running = start_standalone(&client, &directory, port, &smtp).await;
    common::standalone::create_admin(&directory, ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let admin = common::token(&client, port, ADMIN_EMAIL, ADMIN_PASSWORD).await;
    let unknown = login_answer(&client, ports, NEVER_REGISTERED, PASSWORD).await;

    let erin = live_a_little(&client, ports, &smtp).await;
    let traces = traces_of(&erin.addresses);
    let database = directory.join("data/identity.db");
    let log = directory.join("data/identity.db-wal");
    // Before the erasure the users view holds the current address in clear, to look it up:
    // the search finds it there, so it would find what an erasure left.
    let rows = render_rows(&sqlite_rows(&database).await);
    let found = traces_in(rows.as_bytes(), "every row", &traces, &|offset| {
        line_at(&rows, offset)
    });
    assert_found_in_the_users_view(&found, "users: ");

    // An administrator erases the account, without its password.
    let response = client
        .delete(format!("http://127.0.0.1:{port}/users/{}", erin.id))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204, "{}", describe(response).await);
    let erased_at = x_position(&response);
    wait_for_sqlite_checkpoint(&directory, erased_at).await;
    assert_erased_for_everyone(&client, ports, &admin, &erin, erased_at, &unknown).await;

    let owners = page_owners(&database).await;
    // While the process runs: the file and its write-ahead log, as a copy of the data
    // directory would take them.
    let mut findings = Vec::new();
    let mut running_files = Vec::new();
    for (path, layout) in [(&database, FileLayout::Database), (&log, FileLayout::Log)] {
        let (found, bytes) = raw_findings(path, layout, "running", &traces, &owners).unwrap();
        findings.extend(found);
        running_files.extend(bytes);
    }
    assert_holds_the_erased_account(&running_files, "the file and its log", &erin.id);
    // Stopped: whatever the process left in the file and the log once it closed them (a clean
    // stop is when a copy of the data directory is most often taken), and every row of every
    // table.
    interrupt(running).await;
    for (path, layout) in [(&database, FileLayout::Database), (&log, FileLayout::Log)] {
        if let Some((found, _)) = raw_findings(path, layout, "stopped", &traces, &owners) {
            findings.extend(found);
        }
    }
    let tables = sqlite_rows(&database).await;
    let rows = render_rows(&tables);
    findings.extend(traces_in(
        rows.as_bytes(),
        "every row of the file",
        &traces,
        &|offset| line_at(&rows, offset),
    ));
    findings.extend(argon2_hashes_in(rows.as_bytes(), "every row of the file"));
    assert!(
        findings.is_empty(),
        "the standalone's data still holds the person's data (data in {}):\n{}",
        directory.display(),
        findings.join("\n")
    );
    assert_holds_the_erased_account(rows.as_bytes(), "every row of the file", &erin.id);
    assert_erased_row(&tables["users"], "users", &erin.id);
    assert_key_tombstone(&tables["personal_keys"], &erin.id);

    // The data outlives the process: started again on the same file, the address is free.
    let running = start_standalone(&client, &directory, port, &smtp).await;
    let admin = common::token(&client, port, ADMIN_EMAIL, ADMIN_PASSWORD).await;
    address_registers_again_as_a_new_account(&client, ports, &admin, &erin.id).await;
    interrupt(running).await;
    let _ = std::fs::remove_dir_all(&directory);
}

/// Registers the person at [`ADDRESS`], changes their password, moves them to [`NEW_ADDRESS`]
/// through the link mailed there, and reads their export: everything a person leaves behind.
async fn live_a_little(client: &reqwest::Client, ports: Ports, smtp: &SmtpCatcher) -> Person {
    let (id, _) = common::register(client, ports.command, ADDRESS).await;
    let token = common::token(client, ports.command, ADDRESS, PASSWORD).await;

    let response = client
        .post(format!(
            "http://127.0.0.1:{}/users/{id}/password",
            ports.command
        ))
        .bearer_auth(&token)
        .json(&json!({ "current_password": PASSWORD, "new_password": NEW_PASSWORD }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", describe(response).await);
    // The change ended the session: log in again, with the new password only.
    let refused = common::login(client, ports.command, ADDRESS, PASSWORD).await;
    assert_eq!(refused.status(), 401);
    let token = common::token(client, ports.command, ADDRESS, NEW_PASSWORD).await;

    let response = client
        .post(format!("http://127.0.0.1:{}/users/me/email", ports.command))
        .bearer_auth(&token)
        .json(&json!({ "email": NEW_ADDRESS, "password": NEW_PASSWORD }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202, "{}", describe(response).await);
    let link = mails_to(smtp, NEW_ADDRESS, 1).await.remove(0);
    let link_token = link_token(&link, "/email-change");
    let response = client
        .post(format!(
            "http://127.0.0.1:{}/email-change/confirm",
            ports.command
        ))
        .json(&json!({ "token": link_token }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204, "{}", describe(response).await);

    let login = common::login(client, ports.command, NEW_ADDRESS, NEW_PASSWORD).await;
    assert_eq!(login.status(), 200, "logging in at the new address");
    let position = x_position(&login);
    let body: Value = login.json().await.unwrap();
    let token = body["access_token"].as_str().unwrap().to_owned();
    let export = common::get_json_as(
        client,
        ports.query,
        "/users/me/export",
        &token,
        Some(position),
    )
    .await;
    assert_eq!(export["profile"]["id"], id.as_str());
    assert_eq!(export["profile"]["email"], NEW_ADDRESS);
    let mut addresses = BTreeSet::new();
    collect_addresses(&export, &mut addresses);
    // The export gives the person both addresses as typed, and the service's normalised form
    // of each (the events' `email_normalized`), which must be forgotten like the rest.
    let normalised: BTreeSet<&str> = export["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|event| event["data"]["email_normalized"].as_str())
        .collect();
    assert_eq!(normalised.len(), 2, "{export:#}");
    for address in [ADDRESS, NEW_ADDRESS] {
        assert!(
            addresses.contains(address),
            "{address} is not in {export:#}"
        );
    }
    Person {
        id,
        token,
        addresses,
    }
}

/// Every string in `value` that looks like an address.
fn collect_addresses(value: &Value, addresses: &mut BTreeSet<String>) {
    match value {
        Value::String(text) if text.contains('@') => {
            addresses.insert(text.clone());
        }
        Value::Array(items) => items
            .iter()
            .for_each(|item| collect_addresses(item, addresses)),
        Value::Object(fields) => fields
            .values()
            .for_each(|field| collect_addresses(field, addresses)),
        _ => {}
    }
}

/// Once the erasure at `position` is applied: the account reads as erased to an administrator,
/// neither address is found by a lookup, the person's session is over, and logging in with
/// either address, with either password, answers exactly what `unknown` (an address never
/// registered) got.
async fn assert_erased_for_everyone(
    client: &reqwest::Client,
    ports: Ports,
    admin: &str,
    person: &Person,
    position: u64,
    unknown: &(u16, Value),
) {
    let path = format!("/users/{}", person.id);
    let profile = common::get_json_as(client, ports.query, &path, admin, Some(position)).await;
    assert_eq!(profile["status"], "erased", "{profile}");
    assert_eq!(profile["email"], Value::Null, "{profile}");
    assert!(profile["erased_at"].is_string(), "{profile}");
    for address in [ADDRESS, NEW_ADDRESS] {
        let page = lookup(client, ports, admin, address, position).await;
        assert_eq!(page, Vec::<String>::new(), "a lookup of {address}");
        for password in [PASSWORD, NEW_PASSWORD] {
            let answer = login_answer(client, ports, address, password).await;
            assert_eq!(
                &answer, unknown,
                "{address} with {password:?} is told apart from an unknown address"
            );
        }
    }
    assert_eq!(unknown.0, 401);
    assert_eq!(unknown.1["code"], "invalid_credentials");
    // The erasure ended the person's session; the query side sees it within the bound.
    tokio::time::sleep(REVOCATION_BOUND).await;
    let own = common::get_as(client, ports.query, "/users/me", &person.token, None).await;
    assert_eq!(
        own.status(),
        401,
        "the erased person's session is still served"
    );
}

/// [`ADDRESS`] registers again (201, a new id) and logs in; the old account is still erased
/// for an administrator, and a lookup of the address finds the new one only.
async fn address_registers_again_as_a_new_account(
    client: &reqwest::Client,
    ports: Ports,
    admin: &str,
    old: &str,
) {
    let (again, position) = common::register(client, ports.command, ADDRESS).await;
    assert_ne!(again, old, "the erased account's id came back");
    let token = common::token(client, ports.command, ADDRESS, PASSWORD).await;
    let own = common::get_json_as(client, ports.query, "/users/me", &token, Some(position)).await;
    assert_eq!(own["id"], again.as_str());
    let profile = common::get_json_as(
        client,
        ports.query,
        &format!("/users/{old}"),
        admin,
        Some(position),
    )
    .await;
    assert_eq!(
        (profile["status"].as_str(), &profile["email"]),
        (Some("erased"), &Value::Null),
        "{profile}"
    );
    for address in [ADDRESS, &ADDRESS.to_lowercase()] {
        assert_eq!(
            lookup(client, ports, admin, address, position).await,
            std::slice::from_ref(&again),
            "a lookup of {address}"
        );
    }
    assert_eq!(
        lookup(client, ports, admin, NEW_ADDRESS, position).await,
        Vec::<String>::new()
    );
}

/// The ids `GET /users?email=` finds for `address`, once the view holds `position`.
async fn lookup(
    client: &reqwest::Client,
    ports: Ports,
    admin: &str,
    address: &str,
    position: u64,
) -> Vec<String> {
    let response = client
        .get(format!("http://127.0.0.1:{}/users", ports.query))
        .query(&[("email", address)])
        .bearer_auth(admin)
        .header("X-Min-Position", position.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "looking {address} up");
    let page: Value = response.json().await.unwrap();
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["id"].as_str().unwrap().to_owned())
        .collect()
}

/// What a login answers: its status and body.
async fn login_answer(
    client: &reqwest::Client,
    ports: Ports,
    email: &str,
    password: &str,
) -> (u16, Value) {
    let response = common::login(client, ports.command, email, password).await;
    (response.status().as_u16(), response.json().await.unwrap())
}

/// A form of an address that must not be stored: what it is, and its bytes.
struct Trace {
    form: String,
    text: String,
    /// Searched in any case: a local part, or hexadecimal, which a dump may print in capitals.
    any_case: bool,
}

/// Every form of every address in `addresses` a dump must not hold: as given, lower-cased
/// (for these ASCII addresses also what the service's normalisation makes), the unkeyed
/// SHA-256 of each, the standard and URL-safe base64 of each (without padding, which finds
/// the padded form too), its hexadecimal, and the local part up to the sub-address in any
/// case (which finds it URL-encoded, or quoted).
fn traces_of(addresses: &BTreeSet<String>) -> Vec<Trace> {
    assert_eq!(
        sha256_hex("abc"),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        "sha256sum does not give SHA-256"
    );
    let forms: BTreeSet<String> = addresses
        .iter()
        .flat_map(|address| [address.clone(), address.to_lowercase()])
        .collect();
    let mut traces = Vec::new();
    for form in &forms {
        let bytes = form.as_bytes();
        let encoded = [
            ("as stored", form.clone(), false),
            ("SHA-256", sha256_hex(form), true),
            (
                "base64",
                base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes),
                false,
            ),
            (
                "URL-safe base64",
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes),
                false,
            ),
            ("hexadecimal", hex(bytes), true),
        ];
        for (what, text, any_case) in encoded {
            traces.push(Trace {
                form: format!("{what} of {form:?}"),
                text,
                any_case,
            });
        }
        let local = form.split(['+', '@']).next().unwrap();
        traces.push(Trace {
            form: format!("the local part of {form:?}"),
            text: local.to_owned(),
            any_case: true,
        });
    }
    traces
}

/// The SHA-256 of `text` in hexadecimal, by coreutils' `sha256sum`: no SHA-256 crate is a
/// dependency of this package, and the tool is on every machine that runs these tests.
fn sha256_hex(text: &str) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("running sha256sum");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    String::from_utf8(output.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Where each trace occurs in `dump` (called `name`), each with what `locate` says of its
/// offset.
fn traces_in(
    dump: &[u8],
    name: &str,
    traces: &[Trace],
    locate: &dyn Fn(usize) -> String,
) -> Vec<String> {
    let lowered = dump.to_ascii_lowercase();
    let mut findings = Vec::new();
    for trace in traces {
        let (haystack, needle): (&[u8], String) = if trace.any_case {
            (&lowered, trace.text.to_ascii_lowercase())
        } else {
            (dump, trace.text.clone())
        };
        for offset in occurrences(haystack, needle.as_bytes()) {
            findings.push(format!(
                "{name}: {} ({:?}) at byte {offset}, {}",
                trace.form,
                trace.text,
                locate(offset)
            ));
        }
    }
    findings
}

/// Where a password hash in the PHC format occurs: none may, since every hash is stored
/// sealed (the person's erased, the administrator's still there, encrypted).
fn argon2_hashes_in(dump: &[u8], name: &str) -> Vec<String> {
    occurrences(dump, b"$argon2")
        .map(|offset| format!("{name}: a password hash at byte {offset}"))
        .collect()
}

fn occurrences<'a>(haystack: &'a [u8], needle: &'a [u8]) -> impl Iterator<Item = usize> + 'a {
    haystack
        .windows(needle.len())
        .enumerate()
        .filter(move |(_, window)| *window == needle)
        .map(|(offset, _)| offset)
}

/// `findings` (in a dump taken before the erasure) include the person's current address in
/// the users view, which `view` marks.
fn assert_found_in_the_users_view(findings: &[String], view: &str) {
    assert!(
        findings
            .iter()
            .any(|finding| finding.contains(NEW_ADDRESS) && finding.contains(view)),
        "the search did not find {NEW_ADDRESS} in the users view before the erasure: {findings:#?}"
    );
}

/// A raw dump that holds the erased account: its id, its erasure, and sealed data (the
/// administrator's), so that a file of nothing could not pass for one without a trace.
fn assert_holds_the_erased_account(dump: &[u8], name: &str, id: &str) {
    for expected in [id, "UserErased", "aes256gcm", "erased"] {
        assert!(
            occurrences(dump, expected.as_bytes()).next().is_some(),
            "{name} holds no {expected}: not the data of this service"
        );
    }
}

/// The row of the users view for `id` says erased, without an address.
fn assert_erased_row(rows: &[BTreeMap<String, Option<String>>], table: &str, id: &str) {
    let row = rows
        .iter()
        .find(|row| row["id"].as_deref() == Some(id))
        .unwrap_or_else(|| panic!("no row for {id} in {table}: {rows:?}"));
    assert_eq!(row["status"].as_deref(), Some("erased"), "{row:?}");
    assert_eq!(
        (&row["email"], &row["email_normalized"]),
        (&None, &None),
        "{row:?}"
    );
    assert!(row["erased_at"].is_some(), "{row:?}");
}

/// The key of `id` is gone, its row a tombstone.
fn assert_key_tombstone(rows: &[BTreeMap<String, Option<String>>], id: &str) {
    let row = rows
        .iter()
        .find(|row| row["person_id"].as_deref() == Some(id))
        .unwrap_or_else(|| panic!("no key row for {id}: {rows:?}"));
    assert_eq!(
        (&row["wrapped_key"], &row["master_key_id"]),
        (&None, &None),
        "{row:?}"
    );
    assert!(row["erased_at"].is_some(), "{row:?}");
}

// The split deployment's dump.

/// `pg_dump` of the whole database at `url`, in plain SQL.
fn pg_dump(url: &str) -> Vec<u8> {
    let binary = pg_dump_binary();
    let output = Command::new(&binary)
        .args(["--format=plain", "--no-owner", "--dbname", &libpq_url(url)])
        .output()
        .unwrap_or_else(|error| panic!("running {}: {error}", binary.display()));
    assert!(
        output.status.success(),
        "pg_dump failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

/// `pg_dump`: the distribution's wrapper, which picks the server's version, else on PATH, else
/// the newest beside the PostgreSQL binaries the test clusters use.
fn pg_dump_binary() -> std::path::PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("pg_dump"))
            .find(|binary| binary.exists())
    });
    let mut installed: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("bin/pg_dump"))
        .filter(|binary| binary.exists())
        .collect();
    installed.sort();
    [
        Some(Path::new("/usr/bin/pg_dump").to_path_buf()),
        on_path,
        installed.pop(),
    ]
    .into_iter()
    .flatten()
    .find(|binary| binary.exists())
    .expect(
        "pg_dump is not installed: install PostgreSQL's client programs \
             (postgresql-client on Debian and Ubuntu), the version of the test server or newer",
    )
}

/// `url` as libpq reads it: without the parameters only sqlx knows, which libpq refuses.
fn libpq_url(url: &str) -> String {
    let Some((base, query)) = url.split_once('?') else {
        return url.to_owned();
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|parameter| !parameter.starts_with("statement-cache-capacity="))
        .collect();
    if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    }
}

/// The table whose `COPY` block holds `offset` of a plain dump, and the line there.
fn copy_block_at(dump: &[u8], offset: usize) -> String {
    let text = String::from_utf8_lossy(&dump[..offset]);
    let block = text
        .lines()
        .rev()
        .find(|line| line.starts_with("COPY ") || line.starts_with("CREATE "))
        .unwrap_or("before any table");
    let line = line_at(&String::from_utf8_lossy(dump), offset);
    format!("in {block}\n    {line}")
}

/// The rows of `table` in a plain dump's `COPY` block, by column; `\N` is none.
fn copy_rows(dump: &str, table: &str) -> Vec<BTreeMap<String, Option<String>>> {
    let header = format!("COPY {table} (");
    let mut lines = dump.lines().skip_while(|line| !line.starts_with(&header));
    let columns: Vec<String> = lines
        .next()
        .unwrap_or_else(|| panic!("no COPY of {table} in the dump"))
        .trim_start_matches(&header)
        .split(')')
        .next()
        .unwrap()
        .split(", ")
        .map(|column| column.trim_matches('"').to_owned())
        .collect();
    lines
        .take_while(|line| *line != "\\.")
        .map(|line| {
            columns
                .iter()
                .cloned()
                .zip(
                    line.split('\t')
                        .map(|value| (value != "\\N").then(|| value.to_owned())),
                )
                .collect()
        })
        .collect()
}

/// The line of `text` around `offset`.
fn line_at(text: &str, offset: usize) -> String {
    let start = text[..offset].rfind('\n').map_or(0, |newline| newline + 1);
    let end = text[offset..]
        .find('\n')
        .map_or(text.len(), |end| offset + end);
    text[start..end].chars().take(600).collect()
}

// The standalone's files.

/// The standalone process in `directory`, its data under `data/` there, on `port`, sending
/// mail to `smtp`.
async fn start_standalone(
    client: &reqwest::Client,
    directory: &Path,
    port: u16,
    smtp: &SmtpCatcher,
) -> Process {
    let mut process = Launch::new(
        "the standalone process",
        env!("CARGO_BIN_EXE_identity-service"),
    )
    .current_dir(directory)
    .env("IDENTITY__HTTP__ADDRESS", format!("127.0.0.1:{port}"))
    .env("IDENTITY__PASSWORD__MEMORY_KIB", "1024")
    .env("IDENTITY__PASSWORD__ITERATIONS", "1")
    .env("IDENTITY__MAIL__SMTP_URL", smtp.url())
    .env("IDENTITY__MAIL__FROM", "Identity <identity@example.net>")
    .env("IDENTITY__MAIL__LINK_BASE_URL", LINK_BASE)
    .env("IDENTITY__LOG__FILTER", "warn")
    .env("IDENTITY__LOG__FORMAT", "json")
    .log_to(directory.join(format!("service-{}.log", uuid::Uuid::new_v4())))
    .spawn()
    .unwrap();
    process
        .wait_until_serves(client, port, "/readyz")
        .await
        .unwrap();
    process
}

/// Ctrl-C: SIGINT, and the process closes its file and exits by itself.
async fn interrupt(mut running: Process) {
    let status = running.stop(Signal::Interrupt).await.unwrap();
    assert!(
        status.success(),
        "the process exited with {status} on Ctrl-C"
    );
}

/// A read-only connection to the SQLite file at `path`.
async fn open_read_only(path: &Path) -> sqlx::SqliteConnection {
    sqlx::SqliteConnection::connect_with(
        &sqlx::sqlite::SqliteConnectOptions::new()
            .filename(path)
            .read_only(true),
    )
    .await
    .unwrap()
}

/// Waits until the users projection of the standalone in `directory` has a checkpoint at or
/// after `position`.
async fn wait_for_sqlite_checkpoint(directory: &Path, position: u64) {
    let mut file = open_read_only(&directory.join("data/identity.db")).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let reached: Option<i64> = sqlx::query_scalar(
            "SELECT position FROM projection_checkpoints WHERE projection = 'users'",
        )
        .fetch_optional(&mut file)
        .await
        .unwrap();
        let reached = reached.map_or(0, |reached| u64::try_from(reached).unwrap());
        if reached >= position {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the projection stayed at {reached}, short of {position}; its log is in {}",
            directory.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    file.close().await.unwrap();
}

/// Which table or index owns each page of the SQLite file, by its `dbstat` table: to say where
/// a trace found in the raw bytes is. Empty if the library lacks `dbstat`.
async fn page_owners(path: &Path) -> HashMap<u32, String> {
    let mut file = open_read_only(path).await;
    let rows = sqlx::query("SELECT pageno, name FROM dbstat")
        .fetch_all(&mut file)
        .await
        .unwrap_or_default();
    file.close().await.unwrap();
    rows.iter()
        .map(|row| (row.get::<i64, _>(0) as u32, row.get::<String, _>(1)))
        .collect()
}

/// The two files SQLite keeps, each made of pages in its own way.
#[derive(Clone, Copy)]
enum FileLayout {
    /// `identity.db`: pages from the start, their size in the header.
    Database,
    /// `identity.db-wal`: a 32-byte header, then frames of a 24-byte header (starting with the
    /// page's number) and a page.
    Log,
}

impl FileLayout {
    /// The page of the database an offset of the file belongs to, and who owns that page.
    fn locate(self, bytes: &[u8], offset: usize, owners: &HashMap<u32, String>) -> String {
        let be32 = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
        let page = match self {
            Self::Database => {
                let size = match u16::from_be_bytes([bytes[16], bytes[17]]) {
                    1 => 65536,
                    size => usize::from(size),
                };
                u32::try_from(offset / size + 1).unwrap()
            }
            Self::Log => {
                let frame = 24 + be32(8) as usize;
                if offset < 32 {
                    return "in the log's header".to_owned();
                }
                let start = 32 + (offset - 32) / frame * frame;
                be32(start)
            }
        };
        let owner = owners
            .get(&page)
            .map_or("no table now (a free page)", String::as_str);
        let around = String::from_utf8_lossy(
            &bytes[offset.saturating_sub(80)..(offset + 120).min(bytes.len())],
        )
        .replace(|c: char| c.is_control(), ".");
        format!("on page {page}, owned by {owner}: …{around}…")
    }
}

/// The traces and password hashes in the raw bytes of the SQLite file at `path`, read `when`,
/// and the bytes; none if there is no such file.
fn raw_findings(
    path: &Path,
    layout: FileLayout,
    when: &str,
    traces: &[Trace],
    owners: &HashMap<u32, String>,
) -> Option<(Vec<String>, Vec<u8>)> {
    let bytes = std::fs::read(path).ok()?;
    let name = format!("{} ({when})", path.file_name().unwrap().to_string_lossy());
    let mut findings = traces_in(&bytes, &name, traces, &|offset| {
        layout.locate(&bytes, offset, owners)
    });
    findings.extend(argon2_hashes_in(&bytes, &name));
    Some((findings, bytes))
}

/// Every row of every table of the SQLite file at `path`, by table, each value as SQLite's
/// `quote()` writes it (text unquoted), none for NULL.
async fn sqlite_rows(path: &Path) -> BTreeMap<String, Vec<BTreeMap<String, Option<String>>>> {
    let mut file = open_read_only(path).await;
    let tables: Vec<String> =
        sqlx::query_scalar("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")
            .fetch_all(&mut file)
            .await
            .unwrap();
    let mut dump = BTreeMap::new();
    for table in tables {
        let columns: Vec<String> =
            sqlx::query_scalar("SELECT name FROM pragma_table_info(?) ORDER BY cid")
                .bind(&table)
                .fetch_all(&mut file)
                .await
                .unwrap();
        let values = columns
            .iter()
            .map(|column| {
                format!(
                    "CASE WHEN \"{column}\" IS NULL THEN NULL \
                          WHEN typeof(\"{column}\") = 'text' THEN \"{column}\" \
                          ELSE quote(\"{column}\") END"
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let rows = sqlx::query(&format!("SELECT {values} FROM \"{table}\""))
            .fetch_all(&mut file)
            .await
            .unwrap();
        let rows = rows
            .iter()
            .map(|row| {
                columns
                    .iter()
                    .enumerate()
                    .map(|(index, column)| (column.clone(), row.get::<Option<String>, _>(index)))
                    .collect()
            })
            .collect();
        dump.insert(table, rows);
    }
    file.close().await.unwrap();
    dump
}

/// The rows as lines of text, `table: column=value ...`, for searching.
fn render_rows(tables: &BTreeMap<String, Vec<BTreeMap<String, Option<String>>>>) -> String {
    let mut text = String::new();
    for (table, rows) in tables {
        for row in rows {
            let values: Vec<String> = row
                .iter()
                .map(|(column, value)| format!("{column}={}", value.as_deref().unwrap_or("NULL")))
                .collect();
            text.push_str(&format!("{table}: {}\n", values.join(" ")));
        }
    }
    text
}

async fn describe(response: reqwest::Response) -> String {
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    format!("{status} {body}")
}
