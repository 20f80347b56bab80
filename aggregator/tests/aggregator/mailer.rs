//! The mailer against a real SMTP server in a process of its own (`test_support::SmtpCatcher`):
//! recovery events appended as the command API appends them, mails read as the server received
//! them.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use aggregator::consumer::Backoff;
use aggregator::mailer::mails::Letters;
use aggregator::mailer::postman::Postman;
use aggregator::mailer::{MAILER, MailOutcome, Mailer, MailerOptions};
use aggregator::{ReadModelWriter, admin};
use chrono::{DateTime, TimeDelta, Utc};
use identity::{
    Email, RecoveryCommand, RecoveryEvent, RecoveryKind, RecoveryNonce, RecoveryPolicy,
    RecoveryState, UserId, decide_recovery, event_version, recovery_stream_name,
};
use message_store::{ExpectedVersion, NewMessage, StreamAppend, StreamName};
use platform::clock::{Clock, SystemClock};
use platform::settings::MailSettings;
use serde_json::json;
use test_support::{ReceivedMail, SmtpCatcher};
use tokens::{LinkToken, MailTokenKey};
use uuid::Uuid;

use crate::support::{Stores, on_both_engines, settle};

const WAIT: Duration = Duration::from_secs(20);
const DOMAIN: &str = "id.example.net";
const BASE: &str = "https://id.example.net";

fn key() -> MailTokenKey {
    MailTokenKey::from_hex(&"5a".repeat(32)).unwrap()
}

fn options() -> MailerOptions {
    MailerOptions {
        batch_size: 100,
        lock_retry: Duration::from_millis(20),
        retry: Backoff {
            first: Duration::from_millis(50),
            max: Duration::from_millis(400),
        },
        ..MailerOptions::default()
    }
}

fn smtp(catcher: &SmtpCatcher) -> Postman {
    let settings = MailSettings {
        smtp_url: Some(catcher.url().into()),
        ..MailSettings::default()
    };
    Postman::from_settings(&settings, Duration::from_secs(10)).unwrap()
}

fn mailer_with(stores: &Stores, postman: Postman, options: MailerOptions) -> Mailer {
    Mailer::new(
        stores.store.clone(),
        stores.sealer.clone(),
        stores.read_model.clone(),
        postman,
        Letters::new(
            format!("Identity <no-reply@{DOMAIN}>").parse().unwrap(),
            BASE,
            key(),
        ),
        Arc::new(SystemClock),
        options,
    )
}

fn mailer(stores: &Stores, catcher: &SmtpCatcher) -> Mailer {
    mailer_with(stores, smtp(catcher), options())
}

fn email(address: &str) -> Email {
    Email::parse(address).unwrap()
}

/// A recovery event as the command API appends it: decided on the stream's last message
/// (unsealed), with its version in the metadata and its personal fields sealed with the
/// account's key.
struct Appended {
    message_id: Uuid,
    position: u64,
    nonce: RecoveryNonce,
}

async fn append(
    stores: &Stores,
    account: Uuid,
    command: RecoveryCommand,
    now: DateTime<Utc>,
) -> Appended {
    let store = &stores.store;
    let stream = StreamName::parse(recovery_stream_name(UserId::from_uuid(account))).unwrap();
    let mut last = store.last_message(&stream).await.unwrap();
    if let Some(message) = &mut last {
        stores.sealer.unseal(&mut message.data).await.unwrap();
    }
    let last_event = last.as_ref().map(|message| {
        let version = event_version(&message.metadata).unwrap();
        RecoveryEvent::from_stored(&message.message_type, version, &message.data).unwrap()
    });
    let state = RecoveryState::from_last(last_event.as_ref());
    let event = decide_recovery(&state, command, now, &RecoveryPolicy::default())
        .unwrap()
        .into_event()
        .unwrap();
    let nonce = match &event {
        RecoveryEvent::RecoveryRequested(requested) => requested.nonce,
        _ => RecoveryNonce::from_bytes([0; RecoveryNonce::LEN]),
    };
    let mut data = event.to_json();
    stores
        .sealer
        .seal(account, event.personal_fields(), &mut data)
        .await
        .unwrap();
    let message = NewMessage::new(event.event_type(), data)
        .with_metadata(json!({ "schemaVersion": event.version() }));
    let message_id = message.id;
    let appended = store
        .append(vec![StreamAppend::new(
            stream,
            ExpectedVersion::Any,
            vec![message],
        )])
        .await
        .unwrap();
    let position = appended.last_global_position();
    settle(store, position).await;
    Appended {
        message_id,
        position,
        nonce,
    }
}

fn random_nonce() -> RecoveryNonce {
    let mut bytes = [0; RecoveryNonce::LEN];
    bytes.iter_mut().for_each(|byte| *byte = fastrand::u8(..));
    RecoveryNonce::from_bytes(bytes)
}

/// A request of `kind` for `account`, mailed to `to` (a change moves it to `new_email`), made
/// `ago` before now.
async fn request(
    stores: &Stores,
    account: Uuid,
    kind: RecoveryKind,
    to: &str,
    new_email: Option<&str>,
    ago: TimeDelta,
) -> Appended {
    let command = RecoveryCommand::Request {
        kind,
        to: email(to),
        new_email: new_email.map(email),
        nonce: random_nonce(),
        account_epoch: 0,
        password_hash: None,
    };
    // The mailer under test reads the real clock.
    let now = SystemClock.now() - ago;
    append(stores, account, command, now).await
}

async fn reset_request(stores: &Stores, account: Uuid, to: &str) -> Appended {
    request(
        stores,
        account,
        RecoveryKind::ResetPassword,
        to,
        None,
        TimeDelta::zero(),
    )
    .await
}

/// Steps `mailer` until its checkpoint has reached `until`; returns what the steps handled.
async fn drain(mailer: &mut Mailer, read_model: &ReadModelWriter, until: u64) -> Handled {
    let mut handled = Handled::default();
    for _ in 0..1000 {
        match mailer.process_next_batch().await.unwrap() {
            MailOutcome::Handled {
                events,
                sent,
                refused,
                expired,
                erased,
                ..
            } => {
                handled.events += events;
                handled.sent += sent;
                handled.refused += refused;
                handled.expired += expired;
                handled.erased += erased;
            }
            MailOutcome::Idle => {
                if checkpoint(read_model).await >= until {
                    return handled;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            MailOutcome::Halted { reason } => panic!("halted: {reason}"),
        }
    }
    panic!("the mailer did not reach {until}");
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Handled {
    events: usize,
    sent: usize,
    refused: usize,
    expired: usize,
    erased: usize,
}

async fn checkpoint(read_model: &ReadModelWriter) -> u64 {
    read_model
        .checkpoint(MAILER)
        .await
        .unwrap()
        .map_or(0, |checkpoint| checkpoint.position)
}

fn message_id(appended: &Appended, index: u8) -> String {
    format!("<{}.{index}@{DOMAIN}>", appended.message_id)
}

/// The link token in a received mail's text, after `path`.
fn token_in(mail: &ReceivedMail, path: &str) -> LinkToken {
    let text = mail.text.as_deref().unwrap();
    let prefix = format!("{BASE}{path}?token=");
    let start = text.find(&prefix).unwrap_or_else(|| panic!("{text}")) + prefix.len();
    let token = text[start..].split_whitespace().next().unwrap();
    let html = mail.html.as_deref().unwrap();
    assert!(html.contains(token), "the HTML has the same link: {html}");
    LinkToken::parse(token, &RecoveryKind::NAMES).unwrap()
}

fn by_message_id(received: &[ReceivedMail]) -> HashMap<String, &ReceivedMail> {
    received
        .iter()
        .map(|mail| (mail.message_id.clone().unwrap(), mail))
        .collect()
}

on_both_engines!(
    each_mail_arrives_with_its_recipient_subject_message_id_and_a_link_that_authenticates,
    each_mail_arrives
);
async fn each_mail_arrives(stores: Stores) {
    let catcher = SmtpCatcher::start().await.unwrap();
    let (ann, bob, cat) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    let verify = request(
        &stores,
        ann,
        RecoveryKind::VerifyEmail,
        "ann@example.com",
        None,
        TimeDelta::zero(),
    )
    .await;
    let reset = reset_request(&stores, bob, "bob@example.com").await;
    let change = request(
        &stores,
        cat,
        RecoveryKind::ChangeEmail,
        "cat@example.com",
        Some("cat@example.org"),
        TimeDelta::zero(),
    )
    .await;
    let attempt = append(
        &stores,
        ann,
        RecoveryCommand::NoticeRegistrationAttempt {
            to: email("ann@example.com"),
        },
        SystemClock.now(),
    )
    .await;

    let mut mailer = mailer(&stores, &catcher);
    let handled = drain(&mut mailer, &stores.read_model, attempt.position).await;
    assert_eq!(
        handled,
        Handled {
            events: 4,
            sent: 5,
            refused: 0,
            expired: 0,
            erased: 0,
        }
    );

    let received = catcher.wait_for_count(5, WAIT).await.unwrap();
    assert_eq!(received.len(), 5, "{received:?}");
    let mails = by_message_id(&received);
    let expect = |appended: &Appended, index: u8, to: &str, subject: &str| {
        let mail = mails[&message_id(appended, index)];
        assert_eq!(mail.envelope_to, [to]);
        assert_eq!(mail.to, [to]);
        assert_eq!(mail.envelope_from, format!("no-reply@{DOMAIN}"));
        assert_eq!(mail.subject.as_deref(), Some(subject));
        mail
    };
    let verified = expect(&verify, 0, "ann@example.com", "Confirm your email address");
    let token = token_in(verified, "/verify-email");
    assert_eq!((token.kind(), token.account()), ("verify_email", ann));
    assert!(token.authenticates_with(&key(), verify.nonce.as_bytes()));

    let reset_mail = expect(&reset, 0, "bob@example.com", "Reset your password");
    let token = token_in(reset_mail, "/password-reset");
    assert_eq!((token.kind(), token.account()), ("reset_password", bob));
    assert!(token.authenticates_with(&key(), reset.nonce.as_bytes()));
    assert!(
        !token.authenticates_with(&key(), verify.nonce.as_bytes()),
        "a link is bound to its own request's nonce"
    );

    // A change: the link to the new address, a notice without it to the old one.
    let link = expect(
        &change,
        0,
        "cat@example.org",
        "Confirm your new email address",
    );
    let token = token_in(link, "/email-change");
    assert_eq!((token.kind(), token.account()), ("change_email", cat));
    assert!(token.authenticates_with(&key(), change.nonce.as_bytes()));
    let notice = expect(
        &change,
        1,
        "cat@example.com",
        "A change of your email address was requested",
    );
    for body in [notice.text.as_deref(), notice.html.as_deref()] {
        let body = body.unwrap();
        assert!(!body.contains("token="), "{body}");
        assert!(body.contains("cat@example.org"), "{body}");
    }

    let noticed = expect(
        &attempt,
        0,
        "ann@example.com",
        "Someone tried to register with your email address",
    );
    assert!(!noticed.text.as_deref().unwrap().contains("token="));

    // Done: a fresh mailer from the checkpoint sends nothing more.
    let mut again = self::mailer(&stores, &catcher);
    assert_eq!(again.process_next_batch().await.unwrap(), MailOutcome::Idle);
    assert_eq!(catcher.received().len(), 5);
}

on_both_engines!(
    no_mail_is_sent_about_a_person_erased_before_the_mailer_reached_their_requests,
    nothing_for_an_erased_person
);
async fn nothing_for_an_erased_person(stores: Stores) {
    let catcher = SmtpCatcher::start().await.unwrap();
    let (ann, bob) = (Uuid::now_v7(), Uuid::now_v7());
    request(
        &stores,
        ann,
        RecoveryKind::ChangeEmail,
        "ann@example.com",
        Some("ann@example.org"),
        TimeDelta::zero(),
    )
    .await;
    append(
        &stores,
        ann,
        RecoveryCommand::NoticeRegistrationAttempt {
            to: email("ann@example.com"),
        },
        SystemClock.now(),
    )
    .await;
    let last = reset_request(&stores, bob, "bob@example.com").await;
    // Ann is erased before the mailer reaches her requests: her key is gone.
    assert!(stores.sealer.vault().erase(ann).await.unwrap());

    let mut mailer = mailer(&stores, &catcher);
    let stats = mailer.stats();
    let handled = drain(&mut mailer, &stores.read_model, last.position).await;
    assert_eq!(
        handled,
        Handled {
            events: 3,
            sent: 1,
            refused: 0,
            expired: 0,
            erased: 3,
        },
        "the change's link and notice and the registration notice are not sent"
    );
    assert_eq!(stats.erased.load(Relaxed), 3);
    let received = catcher.wait_for_count(1, WAIT).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(catcher.received(), received, "nothing else arrives");
    assert_eq!(received[0].envelope_to, ["bob@example.com"]);
    assert_eq!(received[0].message_id, Some(message_id(&last, 0)));
    let rendered = platform::metrics::render();
    for kind in ["change_email", "change_notice", "registration_attempt"] {
        let series = format!("mail_erased_total{{kind=\"{kind}\"}}");
        assert!(
            rendered.contains(&series),
            "{series} missing from {rendered}"
        );
    }
}

#[tokio::test]
async fn a_mailer_killed_between_the_servers_acceptance_and_its_checkpoint_sends_the_mail_again_with_the_same_message_id()
 {
    let stores = Stores::postgres().await;
    let catcher = SmtpCatcher::start().await.unwrap();
    let reset = reset_request(&stores, Uuid::now_v7(), "ann@example.com").await;
    catcher.hold();

    let running = tokio::spawn(mailer(&stores, &catcher).run(std::future::pending()));
    // The server has the mail; the mailer waits for its answer, and is killed.
    let first = catcher.wait_for_count(1, WAIT).await.unwrap();
    running.abort();
    let _ = running.await;
    catcher.release();
    assert!(
        checkpoint(&stores.read_model).await < reset.position,
        "nothing acknowledged, nothing checkpointed"
    );

    let mut restarted = mailer(&stores, &catcher);
    drain(&mut restarted, &stores.read_model, reset.position).await;
    let received = catcher.wait_for_count(2, WAIT).await.unwrap();
    assert_eq!(received.len(), 2, "{received:?}");
    assert_eq!(received[0], first[0]);
    let ids: Vec<_> = received
        .iter()
        .map(|mail| mail.message_id.clone())
        .collect();
    assert_eq!(
        ids,
        [Some(message_id(&reset, 0)), Some(message_id(&reset, 0))],
        "sent again, recognisably the same mail"
    );
    assert_eq!(received[0].text, received[1].text, "with the same link");

    // Once acknowledged and checkpointed, never again.
    let mut later = mailer(&stores, &catcher);
    assert_eq!(later.process_next_batch().await.unwrap(), MailOutcome::Idle);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(catcher.received().len(), 2);
}

#[tokio::test]
async fn mails_asked_for_while_the_smtp_server_is_down_all_arrive_once_it_is_back() {
    let stores = Stores::postgres().await;
    let mut catcher = SmtpCatcher::start().await.unwrap();
    let before = reset_request(&stores, Uuid::now_v7(), "first@example.com").await;
    let mailer = mailer(&stores, &catcher);
    let stats = mailer.stats();
    let running = tokio::spawn(mailer.run(std::future::pending()));
    catcher.wait_for_count(1, WAIT).await.unwrap();

    catcher.stop().await.unwrap();
    let mut requests = Vec::new();
    for n in 0..6 {
        let to = format!("user{n}@example.com");
        requests.push(reset_request(&stores, Uuid::now_v7(), &to).await);
    }
    // The mailer keeps trying, holding its checkpoint before the first mail it could not send.
    for _ in 0..500 {
        if stats.retried.load(Relaxed) >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(stats.retried.load(Relaxed) >= 2, "it retried");
    assert!(checkpoint(&stores.read_model).await < requests[0].position);

    catcher.restart().await.unwrap();
    let received = catcher.wait_for_count(7, WAIT).await.unwrap();
    for _ in 0..500 {
        if checkpoint(&stores.read_model).await >= requests[5].position {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(checkpoint(&stores.read_model).await >= requests[5].position);
    running.abort();
    let _ = running.await;

    let received_ids: Vec<String> = catcher
        .received()
        .iter()
        .map(|mail| mail.message_id.clone().unwrap())
        .collect();
    let expected: BTreeSet<String> = std::iter::once(&before)
        .chain(&requests)
        .map(|appended| message_id(appended, 0))
        .collect();
    assert_eq!(
        received_ids.iter().cloned().collect::<BTreeSet<_>>(),
        expected,
        "none lost"
    );
    // The server was down, not cut off mid-mail: nothing it accepted is sent twice.
    assert_eq!(received_ids.len(), expected.len(), "{received:?}");
    assert_eq!(stats.sent.load(Relaxed), 7);
    let rendered = platform::metrics::render();
    for series in [
        "mail_sent_total{kind=\"reset_password\"}",
        "mail_retried_total",
        "mail_lag_messages",
    ] {
        assert!(
            rendered.contains(series),
            "{series} missing from {rendered}"
        );
    }
}

on_both_engines!(
    a_refused_recipient_is_counted_and_recorded_and_the_mails_after_it_still_go,
    a_refused_recipient_does_not_block
);
async fn a_refused_recipient_does_not_block(stores: Stores) {
    let catcher = SmtpCatcher::start().await.unwrap();
    catcher.refuse("gone@example.com");
    let (ann, gone, cat) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    reset_request(&stores, ann, "ann@example.com").await;
    let refused = reset_request(&stores, gone, "gone@example.com").await;
    let last = reset_request(&stores, cat, "cat@example.com").await;

    let mut mailer = mailer(&stores, &catcher);
    let stats = mailer.stats();
    let handled = drain(&mut mailer, &stores.read_model, last.position).await;
    assert_eq!((handled.sent, handled.refused), (2, 1));
    assert_eq!(stats.refused.load(Relaxed), 1);

    let received = catcher.wait_for_count(2, WAIT).await.unwrap();
    let to: Vec<_> = received
        .iter()
        .map(|mail| mail.envelope_to.clone())
        .collect();
    assert_eq!(to, [["ann@example.com"], ["cat@example.com"]]);
    let refusals = stores.read_model.mail_refusals().await.unwrap();
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    let refusal = &refusals[0];
    assert_eq!(
        (
            refusal.message_id,
            refusal.mail_index,
            refusal.account_id,
            refusal.kind.as_str(),
            refusal.reply_code
        ),
        (refused.message_id, 0, gone, "reset_password", Some(550))
    );
    let rendered = platform::metrics::render();
    assert!(
        rendered.contains("mail_refused_total{kind=\"reset_password\"}"),
        "{rendered}"
    );
}

#[tokio::test]
async fn a_deferred_recipient_is_retried_holding_the_checkpoint_and_nothing_accepted_is_sent_twice()
{
    let stores = Stores::postgres().await;
    let catcher = SmtpCatcher::start().await.unwrap();
    let first = reset_request(&stores, Uuid::now_v7(), "ann@example.com").await;
    // A change: its link to the new address goes, its notice to the old one is deferred.
    let change = request(
        &stores,
        Uuid::now_v7(),
        RecoveryKind::ChangeEmail,
        "busy@example.com",
        Some("new@example.org"),
        TimeDelta::zero(),
    )
    .await;
    let after = reset_request(&stores, Uuid::now_v7(), "cat@example.com").await;
    catcher.defer("busy@example.com");

    let mut mailer = mailer(&stores, &catcher);
    let stats = mailer.stats();
    for attempt in 0..2 {
        let error = mailer.process_next_batch().await.unwrap_err();
        assert!(
            error.to_string().contains("451"),
            "attempt {attempt}: {error}"
        );
        // Everything before the failing event is done and checkpointed; it and after wait.
        assert_eq!(checkpoint(&stores.read_model).await, first.position);
    }
    assert_eq!(stats.retried.load(Relaxed), 2);
    assert_eq!(
        catcher.received().len(),
        2,
        "the first mail and the change's link"
    );

    catcher.accept("busy@example.com");
    drain(&mut mailer, &stores.read_model, after.position).await;
    let received = catcher.wait_for_count(4, WAIT).await.unwrap();
    let ids: Vec<_> = received
        .iter()
        .map(|mail| mail.message_id.clone().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            message_id(&first, 0),
            message_id(&change, 0),
            message_id(&change, 1),
            message_id(&after, 0)
        ],
        "the change's link, accepted before the deferral, was not sent again"
    );
}

#[tokio::test]
async fn a_request_whose_link_expired_before_the_mailer_reached_it_is_not_sent() {
    let stores = Stores::postgres().await;
    let catcher = SmtpCatcher::start().await.unwrap();
    // Asked for two hours ago, its link lived thirty minutes: the mailer was down meanwhile.
    request(
        &stores,
        Uuid::now_v7(),
        RecoveryKind::ChangeEmail,
        "old@example.com",
        Some("new@example.org"),
        TimeDelta::hours(2),
    )
    .await;
    let fresh = reset_request(&stores, Uuid::now_v7(), "ann@example.com").await;

    let mut mailer = mailer(&stores, &catcher);
    let stats = mailer.stats();
    let handled = drain(&mut mailer, &stores.read_model, fresh.position).await;
    assert_eq!(
        handled,
        Handled {
            events: 2,
            sent: 1,
            refused: 0,
            expired: 2,
            erased: 0,
        },
        "the change's link and its notice are not sent"
    );
    assert_eq!(stats.expired.load(Relaxed), 2);
    let received = catcher.wait_for_count(1, WAIT).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(catcher.received(), received);
    assert_eq!(received[0].message_id, Some(message_id(&fresh, 0)));
}

on_both_engines!(
    without_an_smtp_server_each_mail_is_written_whole_to_the_outbox,
    the_outbox
);
async fn the_outbox(stores: Stores) {
    let directory = std::env::temp_dir().join(format!("outbox-{}", Uuid::now_v7()));
    let outbox = directory.join("mail");
    let account = Uuid::now_v7();
    let change = request(
        &stores,
        account,
        RecoveryKind::ChangeEmail,
        "ann@example.com",
        Some("ann@example.org"),
        TimeDelta::zero(),
    )
    .await;
    let settings = MailSettings {
        outbox_dir: outbox.clone(),
        ..MailSettings::default()
    };
    let postman = Postman::from_settings(&settings, Duration::from_secs(1)).unwrap();
    assert!(matches!(postman, Postman::Outbox(_)));
    let mut mailer = mailer_with(&stores, postman, options());
    let handled = drain(&mut mailer, &stores.read_model, change.position).await;
    assert_eq!(handled.sent, 2);

    let mut names: Vec<String> = std::fs::read_dir(&outbox)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            format!("{}.0.eml", change.message_id),
            format!("{}.1.eml", change.message_id)
        ],
        "one file per mail, none left half written"
    );
    let link_mail = read(&outbox, &format!("{}.0.eml", change.message_id));
    assert!(link_mail.contains(&format!("Message-ID: {}", message_id(&change, 0))));
    assert!(link_mail.contains("To: ann@example.org"), "{link_mail}");
    assert!(link_mail.contains("change_email."), "the link is in it");
    let notice = read(&outbox, &format!("{}.1.eml", change.message_id));
    assert!(notice.contains("To: ann@example.com"), "{notice}");
    std::fs::remove_dir_all(&directory).unwrap();
}

fn read(directory: &std::path::Path, name: &str) -> String {
    let path: PathBuf = directory.join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

#[tokio::test]
async fn status_lists_the_mailer_and_a_reset_sends_everything_again_with_the_same_message_ids() {
    let stores = Stores::postgres().await;
    let catcher = SmtpCatcher::start().await.unwrap();
    let first = reset_request(&stores, Uuid::now_v7(), "ann@example.com").await;
    let second = reset_request(&stores, Uuid::now_v7(), "bob@example.com").await;
    let mut mailer = mailer(&stores, &catcher);
    drain(&mut mailer, &stores.read_model, second.position).await;
    catcher.wait_for_count(2, WAIT).await.unwrap();

    let statuses = admin::status(&stores.store, &stores.read_model)
        .await
        .unwrap();
    let status = statuses
        .iter()
        .find(|status| status.projection == MAILER)
        .unwrap();
    assert!(status.checkpoint >= second.position, "{status:?}");
    assert_eq!(status.lag, 0);
    assert_eq!(status.version, Some(1));

    // A request the running mailer has not reached yet shows as lag.
    let third = reset_request(&stores, Uuid::now_v7(), "cat@example.com").await;
    let statuses = admin::status(&stores.store, &stores.read_model)
        .await
        .unwrap();
    let status = statuses
        .iter()
        .find(|status| status.projection == MAILER)
        .unwrap();
    assert_eq!(status.lag, 1, "{status:?}");
    drain(&mut mailer, &stores.read_model, third.position).await;
    catcher.wait_for_count(3, WAIT).await.unwrap();

    admin::reset(&stores.read_model, MAILER).await.unwrap();
    assert_eq!(checkpoint(&stores.read_model).await, 0);
    // The same worker notices the reset and replays.
    drain(&mut mailer, &stores.read_model, third.position).await;
    let received = catcher.wait_for_count(6, WAIT).await.unwrap();
    let ids: Vec<_> = received
        .iter()
        .map(|mail| mail.message_id.clone().unwrap())
        .collect();
    let once = [
        message_id(&first, 0),
        message_id(&second, 0),
        message_id(&third, 0),
    ];
    assert_eq!(ids, [once.clone(), once].concat());
    assert!(
        admin::rebuild(
            &stores.store,
            &stores.sealer,
            &stores.read_model,
            MAILER,
            10
        )
        .await
        .is_err(),
        "the mailer keeps no view to rebuild"
    );
}

#[tokio::test]
async fn of_two_mailers_one_sends_and_the_other_stands_by() {
    let stores = Stores::postgres().await;
    let catcher = SmtpCatcher::start().await.unwrap();
    let (first, second) = (mailer(&stores, &catcher), mailer(&stores, &catcher));
    let (first_stats, second_stats) = (first.stats(), second.stats());
    let running = [
        tokio::spawn(first.run(std::future::pending())),
        tokio::spawn(second.run(std::future::pending())),
    ];
    let mut requests = Vec::new();
    for n in 0..5 {
        let to = format!("user{n}@example.com");
        requests.push(reset_request(&stores, Uuid::now_v7(), &to).await);
    }
    catcher.wait_for_count(5, WAIT).await.unwrap();
    for _ in 0..500 {
        if checkpoint(&stores.read_model).await >= requests[4].position {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(catcher.received().len(), 5, "each mail once");
    let holders = [&first_stats, &second_stats]
        .iter()
        .filter(|stats| stats.holds_lock.load(Relaxed))
        .count();
    assert_eq!(holders, 1);
    assert_eq!(
        first_stats.sent.load(Relaxed) + second_stats.sent.load(Relaxed),
        5
    );
    for task in running {
        task.abort();
        let _ = task.await;
    }
}
