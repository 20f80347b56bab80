//! `command-api seal-history`: the one sanctioned rewrite of history (ADR 13, point 8).
//!
//! A store written before personal data was sealed holds addresses, password hashes and
//! recovery states in clear, and names its reservation streams by an unkeyed SHA-256 of the
//! address, which a dictionary of addresses reverses. An erasure deletes a key; it cannot reach
//! a field no key sealed. So, once, with no command API of the older build running:
//!
//! 1. every reservation stream named by the unkeyed hash of an address some account had takes
//!    its keyed name (`MessageStore::rename_stream`, which keeps every position);
//! 2. every personal field still in clear in a user or recovery message is sealed with its
//!    person's key (`MessageStore::rewrite_data`: ids, positions, types and times unchanged);
//!    a field of a person already erased is nulled instead, which is what their erasure means;
//! 3. the oldest user message is sealed last: it is the mark that a run went to its end, which
//!    the command API checks with one read when it starts ([`ensure_sealed`]).
//!
//! Each step reads what the last one left, so a run that was interrupted is simply run again;
//! a run over a sealed store changes nothing.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::Context;
use identity::{
    EventDecodeError, Personal, RECOVERY_CATEGORY, RecoveryEvent, USER_CATEGORY, UserEvent,
    event_version, user_id_of_stream,
};
use message_store::{MessageStore, RecordedMessage, RenameStreamError, StreamName};
use personal_data::{PersonalData, Sealer, VaultError, is_envelope};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::reservation::EMAIL_CATEGORY;

/// How many messages one read of a category fetches.
const BATCH: usize = 1000;

/// How long a run waits for every message written to be visible to its reads.
const VISIBLE_WITHIN: Duration = Duration::from_secs(60);

/// What a run found, and did unless it only looked.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SealingReport {
    /// User and recovery messages read.
    pub messages_read: u64,
    /// Messages with a personal field in clear: sealed (or nulled), or to be.
    pub messages_in_clear: u64,
    /// Of those, the messages of persons already erased, whose clear fields were nulled (not
    /// counted when the run only looks: finding out would make the keys it must not make).
    pub messages_of_erased_persons: u64,
    /// Reservation streams under their unkeyed name: renamed, or to be.
    pub streams_to_rename: u64,
}

impl SealingReport {
    /// Whether the store holds nothing in clear any more.
    pub fn is_sealed(&self) -> bool {
        self.messages_in_clear == 0 && self.streams_to_rename == 0
    }
}

/// Seals the history of `store` (or, when `dry_run`, only counts what a run would change).
pub async fn seal_history(
    store: &dyn MessageStore,
    personal: &PersonalData,
    dry_run: bool,
) -> anyhow::Result<SealingReport> {
    wait_until_everything_written_is_visible(store).await?;
    let mut report = SealingReport::default();
    let mut addresses = BTreeSet::new();
    let mut oldest_user_message = None;
    for category in [USER_CATEGORY, RECOVERY_CATEGORY] {
        let mut after = 0;
        loop {
            let batch = store
                .read_category(category, after, BATCH)
                .await
                .with_context(|| format!("reading the {category} messages after {after}"))?;
            let Some(last) = batch.last() else { break };
            after = last.global_position;
            for message in batch {
                report.messages_read += 1;
                let clear = ClearFields::of(&personal.sealer, &message, &mut addresses).await?;
                if clear.fields.is_empty() {
                    continue;
                }
                report.messages_in_clear += 1;
                if category == USER_CATEGORY && oldest_user_message.is_none() {
                    // Sealed last: see the module's comment.
                    oldest_user_message = Some((message, clear));
                    continue;
                }
                if seal(store, personal, &message, &clear, dry_run).await? {
                    report.messages_of_erased_persons += 1;
                }
            }
        }
    }

    // Whether the mark is clear or not, the streams come first: a run that stops after them
    // leaves the mark clear, and the next run finds the streams renamed.
    for address in &addresses {
        let old = unkeyed_email_stream(address)?;
        // The keyed name of the normalised address as stored, as `email_stream` names it: not
        // parsed again, so no change to the rules of addresses can stop a run halfway.
        let new = StreamName::for_entity(EMAIL_CATEGORY, personal.lookup_key.digest(address))?;
        if store.last_message(&old).await?.is_none() {
            continue;
        }
        report.streams_to_rename += 1;
        if dry_run {
            continue;
        }
        match store.rename_stream(&old, &new).await {
            Ok(_) => {}
            Err(RenameStreamError::TargetNotEmpty { to }) => anyhow::bail!(
                "the reservation stream {old} and its keyed name {to} both have messages: a \
                 command API of this build reserved the address while one of the older build \
                 ran. Stop every command API and resolve the two by hand (the later \
                 reservation wins only if the earlier account was released)"
            ),
            Err(RenameStreamError::Store(error)) => return Err(error.into()),
        }
    }

    if let Some((message, clear)) = oldest_user_message
        && seal(store, personal, &message, &clear, dry_run).await?
    {
        report.messages_of_erased_persons += 1;
    }
    Ok(report)
}

/// Waits until a read of a category sees every message written: reads only see below the
/// oldest transaction still running on the server (ADR 2), and a message a run did not see
/// would stay in clear behind a sealed mark. Nothing writes meanwhile (the command API is
/// stopped), so this is the time the transactions in flight take to end.
async fn wait_until_everything_written_is_visible(store: &dyn MessageStore) -> anyhow::Result<()> {
    let written = store.last_position().await?;
    let deadline = Instant::now() + VISIBLE_WITHIN;
    while store.head_position().await? < written {
        anyhow::ensure!(
            Instant::now() < deadline,
            "messages up to position {written} are written but not yet visible after {}s: a \
             transaction on the database server holds them back; end it and run again",
            VISIBLE_WITHIN.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Whether the history holds no personal data in clear (as far as one read tells: the oldest
/// user message, which `seal-history` seals last and every build since ADR 13 writes sealed).
pub async fn is_sealed(store: &dyn MessageStore, sealer: &Sealer) -> anyhow::Result<bool> {
    let oldest = store
        .read_category(USER_CATEGORY, 0, 1)
        .await
        .context("reading the oldest user message")?;
    let Some(oldest) = oldest.into_iter().next() else {
        return Ok(true);
    };
    let clear = ClearFields::of(sealer, &oldest, &mut BTreeSet::new()).await?;
    Ok(clear.fields.is_empty())
}

/// Refuses to serve a store whose history holds personal data in clear: its erasures could not
/// reach it.
pub async fn ensure_sealed(store: &dyn MessageStore, sealer: &Sealer) -> anyhow::Result<()> {
    anyhow::ensure!(
        is_sealed(store, sealer).await?,
        "the message store holds personal data written in clear by a build before personal \
         data was sealed (docs/adr/0013): stop every command API of the older build and run \
         `command-api seal-history` once, then start this one"
    );
    Ok(())
}

/// The personal fields of one stored message that are in clear, and whose they are.
struct ClearFields {
    person: uuid::Uuid,
    fields: Vec<&'static str>,
}

impl ClearFields {
    /// The fields of `message` still in clear; the normalised addresses its event reserved
    /// (a registration's, a change of email's new one) are added to `addresses`, sealed or
    /// not, so that their streams can be renamed by a later run too.
    async fn of(
        sealer: &Sealer,
        message: &RecordedMessage,
        addresses: &mut BTreeSet<String>,
    ) -> anyhow::Result<Self> {
        let person = *user_id_of_stream(message.stream.as_str())
            .with_context(|| format!("{} names no account", message.stream))?
            .as_uuid();
        let mut opened = message.data.clone();
        sealer
            .unseal(&mut opened)
            .await
            .with_context(|| format!("opening message {}", message.id))?;
        let version = event_version(&message.metadata)?;
        let fields = if message.stream.category() == USER_CATEGORY {
            match UserEvent::from_stored(&message.message_type, version, &opened) {
                Ok(event) => {
                    if let Some(address) = reserved_address(&event) {
                        addresses.insert(address);
                    }
                    event.personal_fields()
                }
                Err(EventDecodeError::UnknownType { .. }) => &[],
                Err(error) => return Err(undecodable(message, error)),
            }
        } else {
            match RecoveryEvent::from_stored(&message.message_type, version, &opened) {
                Ok(event) => event.personal_fields(),
                Err(EventDecodeError::UnknownType { .. }) => &[],
                Err(error) => return Err(undecodable(message, error)),
            }
        };
        let in_clear = |field: &&str| {
            message
                .data
                .get(*field)
                .is_some_and(|value| !value.is_null() && !is_envelope(value))
        };
        Ok(Self {
            person,
            fields: fields.iter().copied().filter(in_clear).collect(),
        })
    }
}

fn undecodable(message: &RecordedMessage, error: EventDecodeError) -> anyhow::Error {
    anyhow::Error::new(error).context(format!("decoding message {}", message.id))
}

/// The normalised address an event reserved for its account, if it did and it is known.
fn reserved_address(event: &UserEvent) -> Option<String> {
    let normalized = match event {
        UserEvent::UserRegistered(registered) => &registered.email_normalized,
        UserEvent::EmailChanged(changed) => &changed.email_normalized,
        _ => return None,
    };
    match normalized {
        Personal::Known(normalized) => Some(normalized.clone()),
        Personal::Erased => None,
    }
}

/// Seals the clear fields of `message` in the store (unless `dry_run`: then nothing is
/// written, not even a key); answers whether its person is erased, whose fields are nulled
/// instead.
async fn seal(
    store: &dyn MessageStore,
    personal: &PersonalData,
    message: &RecordedMessage,
    clear: &ClearFields,
    dry_run: bool,
) -> anyhow::Result<bool> {
    if dry_run {
        return Ok(false);
    }
    let mut data = message.data.clone();
    let erased = match personal
        .sealer
        .seal(clear.person, &clear.fields, &mut data)
        .await
    {
        Ok(()) => false,
        Err(VaultError::Erased) => {
            if let Some(object) = data.as_object_mut() {
                for field in &clear.fields {
                    object.insert((*field).to_owned(), Value::Null);
                }
            }
            true
        }
        Err(error) => {
            return Err(error).with_context(|| format!("sealing message {}", message.id));
        }
    };
    let found = store.rewrite_data(message.id, data).await?;
    anyhow::ensure!(
        found,
        "message {} disappeared while it was sealed",
        message.id
    );
    Ok(erased)
}

/// The name the builds before ADR 13 gave the reservation stream of `normalized`: the unkeyed
/// SHA-256 of the normalised address, in hexadecimal.
fn unkeyed_email_stream(normalized: &str) -> anyhow::Result<StreamName> {
    let digest = Sha256::digest(normalized.as_bytes());
    Ok(StreamName::for_entity(EMAIL_CATEGORY, hex::encode(digest))?)
}
