//! `mail`: mails delivered from recovery events to a real SMTP server by the mailer, against the
//! same mails sent straight with the same SMTP client in the same run.
//!
//! The events (one password reset request per account) are written to the store first; the
//! mailer then reads them from its checkpoint, derives each link, renders the templates, sends
//! and checkpoints, as in the aggregator process. The baseline hands the very messages the
//! mailer makes to the same transport (`Postman`, lettre's pooled async SMTP client), one after
//! the other as the mailer sends them: the SMTP exchange, which is the hardware's and the
//! server's limit here, and nothing else. It runs before and after the mailer, and the mean of
//! the two is the baseline, so that a machine that slows down during the run hits both alike.
//!
//! The server is `test_support::SmtpCatcher` (aiosmtpd in a process of its own), the one the
//! tests send to.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aggregator::mailer::mails::{Letters, Planned};
use aggregator::mailer::postman::{Delivery, Postman, sender};
use aggregator::{MailOutcome, Mailer, MailerOptions};
use identity::{
    Email, RecoveryCommand, RecoveryEvent, RecoveryKind, RecoveryNonce, RecoveryPolicy,
    RecoveryState, UserId, decide_recovery, recovery_stream_name,
};
use message_store::{ExpectedVersion, MessageStore, NewMessage, StreamAppend, StreamName};
use platform::clock::{Clock, SystemClock};
use platform::settings::MailSettings;
use serde_json::json;
use test_support::{SmtpCatcher, TestDatabase};
use tokens::MailTokenKey;
use uuid::Uuid;

#[derive(clap::Args)]
pub struct Options {
    /// Mails the mailer delivers; the baseline sends as many.
    #[arg(long, default_value_t = 1000)]
    mails: usize,
}

/// How long a delivery may take before the run gives up.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn run(options: Options) -> anyhow::Result<()> {
    let database = TestDatabase::new().await;
    let (store, read_model) = crate::setup::store_and_read_model(&database).await?;
    let smtp = SmtpCatcher::start().await?;
    let settings = MailSettings {
        smtp_url: Some(smtp.url().into()),
        from: "Identity <identity@bench.example>".into(),
        ..MailSettings::default()
    };
    let key = MailTokenKey::generate()?;
    let letters = || -> anyhow::Result<Letters> {
        Ok(Letters::new(
            sender(&settings)?,
            &settings.link_base_url,
            key.clone(),
        ))
    };

    let events = write_requests(store.as_ref(), options.mails).await?;
    let messages = baseline_messages(&letters()?, &events)?;
    let postman = Postman::from_settings(&settings, DELIVERY_TIMEOUT)?;
    let before = send_directly(&postman, &messages).await?;

    let mut mailer = Mailer::new(
        store.clone(),
        crate::setup::sealer(&database).await?,
        read_model,
        Postman::from_settings(&settings, DELIVERY_TIMEOUT)?,
        letters()?,
        Arc::new(SystemClock),
        MailerOptions::default(),
    );
    let started = Instant::now();
    let mut delivered = 0;
    while delivered < options.mails {
        match mailer.process_next_batch().await? {
            MailOutcome::Handled { sent, refused, .. } => {
                anyhow::ensure!(refused == 0, "the server refused {refused} mails");
                delivered += sent;
            }
            MailOutcome::Idle => anyhow::bail!("the mailer found {delivered} of the mails"),
            MailOutcome::Halted { reason } => anyhow::bail!("the mailer halted: {reason}"),
        }
    }
    let mailer_rate = rate(delivered, started.elapsed());

    let after = send_directly(&postman, &messages).await?;
    let received = smtp.received().len();
    anyhow::ensure!(
        received == 3 * options.mails,
        "the server received {received} mails, not {}",
        3 * options.mails
    );

    let direct = f64::midpoint(before, after);
    println!(
        "direct SMTP: {before:.0} and {after:.0} mails/s (before and after the mailer), {} mails each",
        options.mails
    );
    println!(
        "mailer: {mailer_rate:.0} mails/s from {} events",
        options.mails
    );
    let ratio = mailer_rate / direct;
    println!("mail: {mailer_rate:.0} mails/s, {ratio:.2}x direct SMTP");
    Ok(())
}

/// Appends one password reset request to each of `count` accounts' recovery streams, many
/// streams per append, as the command API records them one by one.
async fn write_requests(
    store: &dyn MessageStore,
    count: usize,
) -> anyhow::Result<Vec<(Uuid, Uuid, RecoveryEvent)>> {
    const PER_APPEND: usize = 100;
    let now = SystemClock.now();
    let mut events = Vec::with_capacity(count);
    for chunk in (0..count).collect::<Vec<_>>().chunks(PER_APPEND) {
        let mut appends = Vec::with_capacity(chunk.len());
        for n in chunk {
            let account = Uuid::now_v7();
            let event = reset_requested(*n, now)?;
            let message = NewMessage::new(event.event_type(), event.to_json())
                .with_metadata(json!({ identity::EVENT_VERSION_KEY: event.version() }));
            let id = message.id;
            let stream = recovery_stream_name(UserId::from_uuid(account));
            appends.push(StreamAppend::new(
                StreamName::parse(stream)?,
                ExpectedVersion::NoStream,
                vec![message],
            ));
            events.push((id, account, event));
        }
        store.append(appends).await?;
    }
    Ok(events)
}

fn reset_requested(n: usize, now: chrono::DateTime<chrono::Utc>) -> anyhow::Result<RecoveryEvent> {
    let mut nonce = [0; RecoveryNonce::LEN];
    nonce[..8].copy_from_slice(&u64::try_from(n)?.to_be_bytes());
    let command = RecoveryCommand::Request {
        kind: RecoveryKind::ResetPassword,
        to: Email::parse(&format!("person{n}@bench.example"))?,
        new_email: None,
        nonce: RecoveryNonce::from_bytes(nonce),
        account_epoch: 0,
        password_hash: None,
    };
    let decision = decide_recovery(
        &RecoveryState::default(),
        command,
        now,
        &RecoveryPolicy::default(),
    )?;
    decision
        .into_event()
        .ok_or_else(|| anyhow::anyhow!("a first request was held back"))
}

/// The messages the mailer makes of `events`, made once, for the baseline to send.
fn baseline_messages(
    letters: &Letters,
    events: &[(Uuid, Uuid, RecoveryEvent)],
) -> anyhow::Result<Vec<(aggregator::mailer::mails::Mail, lettre::Message)>> {
    let now = SystemClock.now();
    let mut messages = Vec::with_capacity(events.len());
    for (message, account, event) in events {
        let Planned::Mails(mails) = letters.plan(*message, *account, event, now)? else {
            anyhow::bail!("a fresh request planned no mail");
        };
        for mail in mails {
            let built = mail.to_message(letters.from())?;
            messages.push((mail, built));
        }
    }
    Ok(messages)
}

/// Sends `messages` one after the other with `postman`: mails per second.
async fn send_directly(
    postman: &Postman,
    messages: &[(aggregator::mailer::mails::Mail, lettre::Message)],
) -> anyhow::Result<f64> {
    let started = Instant::now();
    for (mail, message) in messages {
        match postman.deliver(mail, message).await? {
            Delivery::Accepted => {}
            Delivery::Refused { code } => anyhow::bail!("the server refused a mail: {code:?}"),
        }
    }
    Ok(rate(messages.len(), started.elapsed()))
}

fn rate(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64()
}
