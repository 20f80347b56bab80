//! The mailer in the real aggregator process of the split deployment, sending to a real SMTP
//! server (`test_support::SmtpCatcher`): killed between the server having a mail and the mailer
//! learning it was accepted, it sends the mail again once restarted, with the same Message-ID;
//! a refused recipient is passed over, and its logs carry neither addresses nor links; the
//! operator's `status` lists it and `reset mailer` sends everything again.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot go on panics with the cause

mod common;

use std::time::{Duration, Instant};

use test_support::{Deployment, ReceivedMail, Services, Signal, SmtpCatcher, TestDatabase};

use common::{client, new_deployment, register, start_services};

const WAIT: Duration = Duration::from_secs(30);

/// The mailer's checkpoint, from the read model at `url`.
async fn mailer_checkpoint(url: &str) -> u64 {
    let pool = sqlx::PgPool::connect(url).await.unwrap();
    let position: Option<i64> = sqlx::query_scalar(
        "SELECT position FROM projection_checkpoints WHERE projection = 'mailer'",
    )
    .fetch_optional(&pool)
    .await
    .unwrap();
    pool.close().await;
    position.map_or(0, |position| u64::try_from(position).unwrap())
}

/// command-api and the aggregator of a split deployment on a fresh database, the aggregator
/// sending to a fresh SMTP server.
struct Mailing {
    catcher: SmtpCatcher,
    deployment: Deployment,
    services: Services,
    client: reqwest::Client,
    // Dropped last.
    database: TestDatabase,
}

impl Mailing {
    async fn start(name: &str) -> Self {
        let database = TestDatabase::new().await;
        let catcher = SmtpCatcher::start().await.unwrap();
        let deployment = new_deployment(name, database.url())
            .with_setting("IDENTITY__MAIL__SMTP_URL", catcher.url())
            .with_setting("IDENTITY__MAIL__FROM", "Identity <identity@example.net>")
            .with_setting("IDENTITY__MAIL__LINK_BASE_URL", "https://id.example.net");
        let client = client();
        let services = start_services(&deployment, &client, &["command-api", "aggregator"]).await;
        Self {
            catcher,
            deployment,
            services,
            client,
            database,
        }
    }

    /// Registers `email`, which mails it a verification link; the registration's position.
    async fn register(&self, email: &str) -> u64 {
        register(&self.client, self.services.command_port, email)
            .await
            .1
    }

    /// Waits until the mailer's checkpoint has passed `position`.
    async fn wait_for_mailer(&self, position: u64) {
        let deadline = Instant::now() + WAIT;
        while mailer_checkpoint(self.database.url()).await < position {
            assert!(
                Instant::now() < deadline,
                "the mailer did not checkpoint; logs in {}",
                self.deployment.logs.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn message_ids(mails: &[ReceivedMail]) -> Vec<String> {
    mails
        .iter()
        .map(|mail| mail.message_id.clone().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregator_killed_before_it_learns_its_mail_was_accepted_sends_it_again_with_the_same_message_id()
 {
    let mut mailing = Mailing::start("mailer-killed").await;
    let catcher = &mailing.catcher;

    // Every registration mails a verification link; the server keeps it and holds its answer.
    catcher.hold();
    let registered = mailing.register("ann@example.com").await;
    let first = catcher.wait_for_count(1, WAIT).await.unwrap();
    let aggregator = mailing.services.processes.last_mut().unwrap();
    aggregator.stop(Signal::Kill).await.unwrap();
    catcher.release();
    assert!(
        mailer_checkpoint(mailing.database.url()).await < registered,
        "killed before the answer, the mailer has not checkpointed the mail"
    );

    let (_restarted, _) = mailing
        .deployment
        .start_service(&mailing.client, "aggregator", "aggregator-restarted", &[])
        .await
        .unwrap();
    let received = catcher.wait_for_count(2, WAIT).await.unwrap();
    assert_eq!(received.len(), 2, "{received:?}");
    assert_eq!(received[1].envelope_to, ["ann@example.com"]);
    assert_eq!(
        received[1].subject.as_deref(),
        Some("Confirm your email address")
    );
    let message_id = first[0].message_id.clone().unwrap();
    assert!(
        message_id.ends_with("@example.net>"),
        "derived from the event, at the sender's domain: {message_id}"
    );
    assert_eq!(
        received[1].message_id.as_ref(),
        Some(&message_id),
        "sent again, recognisably the same mail"
    );

    // Accepted this time, and checkpointed: not sent a third time.
    mailing.wait_for_mailer(registered).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(catcher.received().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_aggregator_passes_a_refused_recipient_logs_no_address_or_link_and_answers_status_and_reset_mailer()
 {
    let mailing = Mailing::start("mailer-refused").await;
    let catcher = &mailing.catcher;
    catcher.refuse("bob@example.com");
    mailing.register("ann@example.com").await;
    mailing.register("bob@example.com").await;
    let last = mailing.register("cat@example.com").await;
    let received = catcher.wait_for_count(2, WAIT).await.unwrap();
    mailing.wait_for_mailer(last).await;
    let to: Vec<_> = received
        .iter()
        .map(|mail| mail.envelope_to.clone())
        .collect();
    assert_eq!(to, [["ann@example.com"], ["cat@example.com"]]);

    // The refusal is in the log, without the address; no line carries an address or a link.
    let logs = std::fs::read_to_string(mailing.deployment.log("aggregator")).unwrap();
    assert!(
        logs.contains("refused a mail for good"),
        "the refusal is logged: {logs}"
    );
    for secret in ["@example.com", "token=", "verify_email."] {
        assert!(!logs.contains(secret), "{secret} in the logs: {logs}");
    }

    // `status` lists the mailer; `reset mailer` sends everything again (the refused address is
    // refused again), each mail with the Message-ID it had.
    let deployment = &mailing.deployment;
    deployment
        .run("aggregator", &["status"], None)
        .await
        .unwrap();
    let status = std::fs::read_to_string(deployment.log("aggregator-status")).unwrap();
    assert!(status.contains(r#""projection":"mailer""#), "{status}");
    deployment
        .run("aggregator", &["reset", "mailer"], None)
        .await
        .unwrap();
    let replayed = catcher.wait_for_count(4, WAIT).await.unwrap();
    assert_eq!(message_ids(&replayed[2..]), message_ids(&received));
}
