//! The mailer in the real aggregator process of the split deployment, sending to a real SMTP
//! server (`test_support::SmtpCatcher`): killed between the server having a mail and the mailer
//! learning it was accepted, it sends the mail again once restarted, with the same Message-ID;
//! a refused recipient is passed over; and its logs carry neither addresses nor links.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test that cannot go on panics with the cause

mod common;

use std::time::{Duration, Instant};

use test_support::{Signal, SmtpCatcher, TestDatabase};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregator_killed_before_it_learns_its_mail_was_accepted_sends_it_again_with_the_same_message_id()
 {
    let database = TestDatabase::new().await;
    let catcher = SmtpCatcher::start().await.unwrap();
    let deployment = new_deployment("mailer-killed", database.url())
        .with_setting("IDENTITY__MAIL__SMTP_URL", catcher.url())
        .with_setting("IDENTITY__MAIL__FROM", "Identity <identity@example.net>")
        .with_setting("IDENTITY__MAIL__LINK_BASE_URL", "https://id.example.net");
    let client = client();
    let mut services = start_services(&deployment, &client, &["command-api", "aggregator"]).await;

    // Every registration mails a verification link; the server keeps it and holds its answer.
    catcher.hold();
    let (_, registered) = register(&client, services.command_port, "ann@example.com").await;
    let first = catcher.wait_for_count(1, WAIT).await.unwrap();
    let aggregator = services.processes.last_mut().unwrap();
    aggregator.stop(Signal::Kill).await.unwrap();
    catcher.release();
    assert!(
        mailer_checkpoint(database.url()).await < registered,
        "killed before the answer, the mailer has not checkpointed the mail"
    );

    let (_restarted, _) = deployment
        .start_service(&client, "aggregator", "aggregator-restarted", &[])
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
    let deadline = Instant::now() + WAIT;
    while mailer_checkpoint(database.url()).await < registered {
        assert!(
            Instant::now() < deadline,
            "the mailer did not checkpoint; logs in {}",
            deployment.logs.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(catcher.received().len(), 2);

    // A recipient the server refuses is passed over, and said so in the log without the
    // address; no log line carries an address or a link.
    catcher.refuse("bob@example.com");
    register(&client, services.command_port, "bob@example.com").await;
    register(&client, services.command_port, "cat@example.com").await;
    let received = catcher.wait_for_count(3, WAIT).await.unwrap();
    assert_eq!(received[2].envelope_to, ["cat@example.com"]);
    let logs = ["aggregator", "aggregator-restarted"]
        .map(|label| std::fs::read_to_string(deployment.log(label)).unwrap())
        .join("\n");
    assert!(
        logs.contains("refused a mail for good"),
        "the refusal is logged: {logs}"
    );
    for secret in ["@example.com", "token=", "verify_email."] {
        assert!(!logs.contains(secret), "{secret} in the logs: {logs}");
    }
}
