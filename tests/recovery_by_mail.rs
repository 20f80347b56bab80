//! Account recovery end to end, through the mails a real SMTP server receives: the standalone
//! process (command API, mailer and query API in one) sending to `test_support::SmtpCatcher`.
//! Every link a test follows is read out of a received mail, as a person would click it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot go on panics with the cause

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use test_support::process::free_port;
use test_support::{Launch, Process, ReceivedMail, SmtpCatcher};

use common::PASSWORD;
use common::mail::{LINK_BASE, link_token, mails_to};

const NEW_PASSWORD: &str = "a brand new passphrase";

/// The standalone process in a data directory of its own, sending mail to `smtp`, in
/// `registration.mode` `mode`.
struct Service {
    /// Killed when the test ends.
    _process: Process,
    port: u16,
    directory: PathBuf,
    client: reqwest::Client,
}

impl Service {
    async fn start(smtp: &SmtpCatcher, mode: &str) -> Self {
        let directory = std::env::temp_dir().join(format!("mail-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&directory).unwrap();
        let port = free_port().unwrap();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let mut process = launch(&directory, port)
            .env("IDENTITY__MAIL__SMTP_URL", smtp.url())
            .env("IDENTITY__MAIL__FROM", "Identity <identity@example.net>")
            .env("IDENTITY__MAIL__LINK_BASE_URL", LINK_BASE)
            .env("IDENTITY__REGISTRATION__MODE", mode)
            .spawn()
            .unwrap();
        process
            .wait_until_serves(&client, port, "/readyz")
            .await
            .unwrap();
        Self {
            _process: process,
            port,
            directory,
            client,
        }
    }

    async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        self.post_as(path, None, body).await
    }

    async fn post_as(&self, path: &str, token: Option<&str>, body: Value) -> reqwest::Response {
        let mut request = self
            .client
            .post(format!("http://127.0.0.1:{}{path}", self.port))
            .json(&body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.unwrap()
    }

    async fn register(&self, email: &str) -> reqwest::StatusCode {
        self.post("/users", json!({ "email": email, "password": PASSWORD }))
            .await
            .status()
    }

    async fn login(&self, email: &str, password: &str) -> reqwest::Response {
        self.post("/login", json!({ "email": email, "password": password }))
            .await
    }

    async fn access_token(&self, email: &str, password: &str) -> String {
        let response = self.login(email, password).await;
        assert_eq!(response.status(), 200, "{email}");
        let body: Value = response.json().await.unwrap();
        body["access_token"].as_str().unwrap().to_owned()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.directory);
    }
}

/// The standalone process in `directory` on `port`, cheap hashes, answers to recovery requests
/// after 50 ms.
fn launch(directory: &Path, port: u16) -> Launch {
    Launch::new(
        "the standalone process",
        env!("CARGO_BIN_EXE_identity-service"),
    )
    .current_dir(directory)
    .env("IDENTITY__HTTP__ADDRESS", format!("127.0.0.1:{port}"))
    .env("IDENTITY__PASSWORD__MEMORY_KIB", "1024")
    .env("IDENTITY__PASSWORD__ITERATIONS", "1")
    .env("IDENTITY__MAIL__ANSWER_AFTER_MS", "50")
    .env("IDENTITY__LOG__FILTER", "warn")
    .env("IDENTITY__LOG__FORMAT", "json")
    .log_to(directory.join("service.log"))
}

fn assert_no_link(mail: &ReceivedMail) {
    let text = mail.text.as_deref().unwrap_or_default();
    assert!(!text.contains("token="), "a notice with a link: {text}");
}

#[tokio::test]
async fn in_open_mode_the_mailed_link_verifies_the_address() {
    let smtp = SmtpCatcher::start().await.unwrap();
    let service = Service::start(&smtp, "open").await;
    assert_eq!(service.register("ann@example.com").await, 201);
    let mail = mails_to(&smtp, "ann@example.com", 1).await.remove(0);
    assert_eq!(mail.envelope_from, "identity@example.net");
    assert!(mail.message_id.is_some());
    let token = link_token(&mail, "/verify-email");

    let response = service
        .post("/users/verify-email", json!({ "token": token }))
        .await;
    assert_eq!(response.status(), 204);
    let access = service.access_token("ann@example.com", PASSWORD).await;
    assert_eq!(claims(&access)["email_verified"], true);
}

#[tokio::test]
async fn in_verify_mode_an_account_is_active_once_its_mailed_link_is_confirmed_and_a_taken_address_is_told()
 {
    let smtp = SmtpCatcher::start().await.unwrap();
    let service = Service::start(&smtp, "verify").await;
    assert_eq!(service.register("ann@example.com").await, 202);
    assert_eq!(
        service.login("ann@example.com", PASSWORD).await.status(),
        401
    );
    let link = mails_to(&smtp, "ann@example.com", 1).await.remove(0);
    let token = link_token(&link, "/verify-email");
    let response = service
        .post("/users/verify-email", json!({ "token": token }))
        .await;
    assert_eq!(response.status(), 204);
    assert_eq!(
        service.login("ann@example.com", PASSWORD).await.status(),
        200
    );

    // Someone registers Ann's address: the same answer, and Ann is told, without a link.
    assert_eq!(service.register("ann@example.com").await, 202);
    let notice = mails_to(&smtp, "ann@example.com", 2).await.remove(1);
    assert_no_link(&notice);
    assert_ne!(notice.message_id, link.message_id);
}

#[tokio::test]
async fn in_approval_mode_the_mailed_link_verifies_but_an_administrator_still_activates() {
    let smtp = SmtpCatcher::start().await.unwrap();
    let service = Service::start(&smtp, "approval").await;
    assert_eq!(service.register("ann@example.com").await, 201);
    let mail = mails_to(&smtp, "ann@example.com", 1).await.remove(0);
    let token = link_token(&mail, "/verify-email");
    let response = service
        .post("/users/verify-email", json!({ "token": token }))
        .await;
    assert_eq!(response.status(), 204);
    assert_eq!(
        service.login("ann@example.com", PASSWORD).await.status(),
        401
    );
}

#[tokio::test]
async fn a_password_is_reset_through_the_mailed_link() {
    let smtp = SmtpCatcher::start().await.unwrap();
    let service = Service::start(&smtp, "open").await;
    assert_eq!(service.register("ann@example.com").await, 201);
    mails_to(&smtp, "ann@example.com", 1).await;

    for email in ["ann@example.com", "nobody@example.com"] {
        let response = service
            .post("/password-reset", json!({ "email": email }))
            .await;
        assert_eq!(response.status(), 202);
    }
    let mail = mails_to(&smtp, "ann@example.com", 2).await.remove(1);
    let token = link_token(&mail, "/password-reset");
    let response = service
        .post(
            "/password-reset/confirm",
            json!({ "token": token, "password": NEW_PASSWORD }),
        )
        .await;
    assert_eq!(response.status(), 204);
    assert_eq!(
        service.login("ann@example.com", PASSWORD).await.status(),
        401
    );
    assert_eq!(
        service
            .login("ann@example.com", NEW_PASSWORD)
            .await
            .status(),
        200
    );
    // Nothing went to the unknown address.
    assert!(
        smtp.received()
            .iter()
            .all(|mail| !mail.to.contains(&"nobody@example.com".to_owned()))
    );
}

#[tokio::test]
async fn an_email_is_changed_through_the_link_mailed_to_the_new_address_and_the_old_one_is_told() {
    let smtp = SmtpCatcher::start().await.unwrap();
    let service = Service::start(&smtp, "open").await;
    assert_eq!(service.register("ann@example.com").await, 201);
    mails_to(&smtp, "ann@example.com", 1).await;
    let access = service.access_token("ann@example.com", PASSWORD).await;

    let response = service
        .post_as(
            "/users/me/email",
            Some(&access),
            json!({ "email": "ann@example.org", "password": PASSWORD }),
        )
        .await;
    assert_eq!(response.status(), 202);
    let notice = mails_to(&smtp, "ann@example.com", 2).await.remove(1);
    assert_no_link(&notice);
    let link = mails_to(&smtp, "ann@example.org", 1).await.remove(0);
    let token = link_token(&link, "/email-change");

    let response = service
        .post("/email-change/confirm", json!({ "token": token }))
        .await;
    assert_eq!(response.status(), 204);
    assert_eq!(
        service.login("ann@example.com", PASSWORD).await.status(),
        401
    );
    let access = service.access_token("ann@example.org", PASSWORD).await;
    assert_eq!(claims(&access)["email_verified"], true);
}

/// The claims of an access token, read without verifying it.
fn claims(token: &str) -> Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}
