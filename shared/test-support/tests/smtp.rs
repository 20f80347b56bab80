//! The SMTP catcher as a mailer's tests will use it: mail sent with lettre, over plain SMTP to
//! the catcher's URL, arrives as it was sent; a refused or deferred recipient gets the error a
//! real server gives; a server that is down refuses connections, and takes mail again on the
//! same port once restarted.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use lettre::message::{Mailbox, MultiPart};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use test_support::SmtpCatcher;

const WAIT: Duration = Duration::from_secs(10);

fn transport(catcher: &SmtpCatcher) -> AsyncSmtpTransport<Tokio1Executor> {
    AsyncSmtpTransport::<Tokio1Executor>::from_url(&catcher.url())
        .unwrap()
        .timeout(Some(Duration::from_secs(5)))
        .build()
}

fn mail(to: &str, subject: &str, text: &str) -> Message {
    Message::builder()
        .from("Identity <no-reply@identity.test>".parse().unwrap())
        .to(to.parse::<Mailbox>().unwrap())
        .subject(subject)
        .message_id(Some(format!("<{subject}@identity.test>").replace(' ', "-")))
        .body(text.to_owned())
        .unwrap()
}

#[tokio::test]
async fn a_sent_mail_arrives_with_its_envelope_message_id_and_body() {
    let catcher = SmtpCatcher::start().await.unwrap();
    assert_eq!(
        catcher.url(),
        format!("smtp://127.0.0.1:{}", catcher.port())
    );
    let text = "Bonjour Zoë,\nconfirm your address: https://id.test/verify?token=verify.1.abc\n";
    let message = Message::builder()
        .from("Identity <no-reply@identity.test>".parse().unwrap())
        .to("Zoë <zoe@example.com>".parse().unwrap())
        .subject("Confirm your address ✓")
        .message_id(Some("<0192-event@identity.test>".to_owned()))
        .multipart(MultiPart::alternative_plain_html(
            text.to_owned(),
            "<p>Bonjour Zoë</p>".to_owned(),
        ))
        .unwrap();

    transport(&catcher).send(message).await.unwrap();

    let received = catcher.wait_for_count(1, WAIT).await.unwrap();
    assert_eq!(received.len(), 1, "{received:?}");
    let mail = &received[0];
    assert_eq!(mail.envelope_from, "no-reply@identity.test");
    assert_eq!(mail.envelope_to, ["zoe@example.com"]);
    assert_eq!(mail.to, ["zoe@example.com"]);
    assert_eq!(
        mail.message_id.as_deref(),
        Some("<0192-event@identity.test>")
    );
    assert_eq!(mail.subject.as_deref(), Some("Confirm your address ✓"));
    assert_eq!(mail.text.as_deref(), Some(text));
    assert_eq!(
        mail.html.as_deref().map(str::trim_end),
        Some("<p>Bonjour Zoë</p>")
    );
    let raw = String::from_utf8_lossy(&mail.raw);
    assert!(
        raw.contains("Message-ID: <0192-event@identity.test>"),
        "{raw}"
    );
    assert_eq!(catcher.received(), received);
}

#[tokio::test]
async fn a_refused_recipient_is_a_permanent_failure_and_others_are_still_delivered() {
    let catcher = SmtpCatcher::start().await.unwrap();
    catcher.refuse("gone@example.com");
    let transport = transport(&catcher);

    let error = transport
        .send(mail("gone@example.com", "reset for gone", "a link"))
        .await
        .unwrap_err();
    assert!(error.is_permanent(), "{error:?}");
    assert_eq!(
        error.status().map(|code| code.to_string()).as_deref(),
        Some("550")
    );

    transport
        .send(mail("ann@example.com", "reset for ann", "a link"))
        .await
        .unwrap();
    let received = catcher.wait_for_count(1, WAIT).await.unwrap();
    // Only the accepted one, even a moment later.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let received_later = catcher.received();
    assert_eq!(received_later, received);
    assert_eq!(received[0].envelope_to, ["ann@example.com"]);
    assert_eq!(received[0].subject.as_deref(), Some("reset for ann"));
}

#[tokio::test]
async fn a_deferred_recipient_is_a_transient_failure_until_accepted_again() {
    let catcher = SmtpCatcher::start().await.unwrap();
    catcher.defer("busy@example.com");
    let transport = transport(&catcher);

    let error = transport
        .send(mail("busy@example.com", "verify busy", "a link"))
        .await
        .unwrap_err();
    assert!(error.is_transient(), "{error:?}");
    assert!(!error.is_permanent(), "{error:?}");

    catcher.accept("busy@example.com");
    transport
        .send(mail("busy@example.com", "verify busy", "a link"))
        .await
        .unwrap();
    let received = catcher.wait_for_count(1, WAIT).await.unwrap();
    assert_eq!(received[0].envelope_to, ["busy@example.com"]);
}

#[tokio::test]
async fn a_stopped_server_refuses_connections_and_takes_mail_again_on_the_same_port_once_restarted()
{
    let mut catcher = SmtpCatcher::start().await.unwrap();
    let (port, url) = (catcher.port(), catcher.url());
    // One transport throughout, with its pool of connections, as a mailer keeps one.
    let transport = transport(&catcher);
    transport
        .send(mail("ann@example.com", "before", "first"))
        .await
        .unwrap();

    catcher.stop().await.unwrap();
    let error = transport
        .send(mail("ann@example.com", "during", "second"))
        .await
        .unwrap_err();
    // Neither a permanent nor a transient SMTP answer: no server answered. A mailer retries it.
    assert!(!error.is_permanent(), "{error:?}");
    assert!(!error.is_transient(), "{error:?}");
    assert_eq!(error.status(), None, "{error:?}");
    assert!(
        io_error_kinds(&error).contains(&std::io::ErrorKind::ConnectionRefused),
        "{error:?}"
    );

    catcher.restart().await.unwrap();
    assert_eq!((catcher.port(), catcher.url()), (port, url));
    transport
        .send(mail("ann@example.com", "after", "third"))
        .await
        .unwrap();
    let received = catcher.wait_for_count(2, WAIT).await.unwrap();
    let subjects: Vec<_> = received
        .iter()
        .map(|mail| mail.subject.as_deref())
        .collect();
    assert_eq!(subjects, [Some("before"), Some("after")]);
}

#[tokio::test]
async fn a_held_reply_keeps_the_sender_waiting_with_the_mail_already_kept_until_released() {
    let catcher = SmtpCatcher::start().await.unwrap();
    catcher.hold();
    let transport = transport(&catcher);
    let sending = tokio::spawn(async move {
        transport
            .send(mail("ann@example.com", "held", "a link"))
            .await
    });

    let received = catcher.wait_for_count(1, WAIT).await.unwrap();
    assert_eq!(received[0].subject.as_deref(), Some("held"));
    // The server has the mail; the sender has not heard so.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!sending.is_finished());

    catcher.release();
    tokio::time::timeout(WAIT, sending)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(catcher.received().len(), 1);
}

#[tokio::test]
async fn waiting_for_mail_that_never_comes_says_what_did_arrive() {
    let catcher = SmtpCatcher::start().await.unwrap();
    transport(&catcher)
        .send(mail("ann@example.com", "only one", "body"))
        .await
        .unwrap();
    let error = catcher
        .wait_for_count(2, Duration::from_millis(500))
        .await
        .unwrap_err();
    let message = format!("{error:#}");
    assert!(message.contains("1 of 2 messages"), "{message}");
    assert!(message.contains("only one"), "{message}");
}

#[tokio::test]
async fn a_dropped_catcher_stops_its_server_and_removes_its_directory() {
    let catcher = SmtpCatcher::start().await.unwrap();
    let (port, directory) = (catcher.port(), catcher.directory().to_owned());
    assert!(directory.join("mail").is_dir());
    drop(catcher);
    assert!(!directory.exists(), "{}", directory.display());
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
    );
}

fn io_error_kinds(error: &(dyn std::error::Error + 'static)) -> Vec<std::io::ErrorKind> {
    let mut kinds = vec![];
    let mut source = Some(error);
    while let Some(error) = source {
        if let Some(io) = error.downcast_ref::<std::io::Error>() {
            kinds.push(io.kind());
        }
        source = error.source();
    }
    kinds
}
