//! Personal data that can be forgotten while history stays (DESIGN decision 16,
//! docs/adr/0013): the personal fields of events are sealed with a key of their person's, kept
//! outside the messages, and erasing the person deletes the key (crypto-shredding).
//!
//! This crate knows nothing of users, events or the message store: a person is a [`Uuid`], a
//! message's data is a [`serde_json::Value`], and the caller says which fields are personal.
//!
//! - **Envelopes** ([`seal_fields`], [`unseal_fields`]): a sealed top-level field becomes
//!   `{"sealed_for": "<person>", "aes256gcm": "<base64url of nonce || ciphertext>"}`,
//!   the field's JSON encrypted with AES-256-GCM under the person's [`PersonKey`], a
//!   random nonce per field, the person and the field's name bound as associated data (a
//!   ciphertext moved to another field or person does not open). The envelope names its person,
//!   so a reader unseals any message, or a whole batch with one query for the keys
//!   ([`sealed_persons`], [`KeyVault::keys`]). A field whose person has no key reads as null;
//!   one that does not open under a key that is there is an error, never taken for an erasure.
//! - **Wrapping** ([`KeyVault`]): each person's key is stored in the `personal_keys` table of the
//!   message store's own database (PostgreSQL or the SQLite file), encrypted under a
//!   [`MasterKey`] from the configuration, with the person and the master key's id as associated
//!   data. A copy of the database alone opens nothing.
//! - **Tombstones**: erasing a person deletes the wrapped key and keeps the row, with its
//!   `erased_at`, so that no writer ever makes the person a new key: their old fields could not
//!   be read with it, but new ones would be, and the erasure would quietly stop holding.
//! - **Rotation** ([`MasterKeys`]): each row names the master key that wraps it. A new master key
//!   is configured as current with the old one retired; rows under either are read;
//!   [`KeyVault::rewrap`] moves every row to the current key in batches while the service runs;
//!   then the retired key can go. A row under a master key that is not configured is an error
//!   ([`VaultError::UnknownMasterKey`]), never read as erased.
//! - **Lookups** ([`LookupKey`]): values that must be found again (an address's reservation
//!   stream) are named by a keyed hash, which reveals nothing without the key.
//!
//! What an erasure does not reach: backups taken before it still hold the wrapped key, and the
//! database keeps the deleted bytes in its files until it reuses the space (PostgreSQL until a
//! VACUUM; SQLite in its write-ahead log until a checkpoint, since the vault's own connection
//! overwrites deleted content in the table). A logical dump made after the erasure holds nothing.

#![forbid(unsafe_code)]

mod keys;
mod lookup;
pub mod postgres;
mod seal;
mod sealer;
pub mod sqlite;

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use message_store::database::LostConnection;
use uuid::Uuid;

pub use keys::{KEY_BYTES, KeyError, MasterKey, MasterKeys, PersonKey};
pub use lookup::LookupKey;
pub use postgres::PostgresKeyVault;
pub use seal::{
    Fields, SealError, Unsealed, is_envelope, seal_fields, sealed_persons, sealed_persons_of,
    unseal_fields, unseal_fields_of,
};
pub use sealer::{PersonalData, Sealer, lookup_key, master_keys};
pub use sqlite::SqliteKeyVault;

/// The port: where the keys of persons are kept, made and erased.
///
/// What every adapter guarantees, and the conformance suite in `tests/vault/` checks:
/// - a person has at most one key, ever: concurrent first writers get the same one;
/// - an erased person has no key and never gets one again;
/// - a key is stored only wrapped under a configured master key, and read under whichever
///   configured master key its row names.
#[async_trait]
pub trait KeyVault: Send + Sync + 'static {
    /// The key to seal `person`'s fields with, made on first use (random, wrapped under the
    /// current master key). Refused with [`VaultError::Erased`] once the person is erased.
    async fn key_for_writing(&self, person: Uuid) -> Result<PersonKey, VaultError>;

    /// The keys of those of `persons` that have one, read in one query: a person erased or never
    /// given a key is absent, and their fields read as erased.
    async fn keys(&self, persons: &[Uuid]) -> Result<HashMap<Uuid, PersonKey>, VaultError>;

    /// Deletes `person`'s key for good, leaving a tombstone so that none is made again, and
    /// returns whether there was a key. Erasing again, or erasing a person who never had a key,
    /// changes nothing more and returns false (the tombstone is written either way).
    async fn erase(&self, person: Uuid) -> Result<bool, VaultError>;

    /// Whether `person` was erased.
    async fn is_erased(&self, person: Uuid) -> Result<bool, VaultError>;

    /// Rewraps every key that is not under the current master key under it, in batches of
    /// [`REWRAP_BATCH`] per transaction, and returns how many it rewrapped. Safe while the
    /// service runs: each batch locks its rows, so an erasure or a reader never meets a
    /// half-written one. Run after a rotation, before the retired key is dropped.
    async fn rewrap(&self) -> Result<u64, VaultError>;

    /// How many keys each master key wraps, and how many persons are erased: what a rotation's
    /// operator checks before dropping a retired key.
    async fn count_by_master_key(&self) -> Result<KeyCounts, VaultError>;

    /// Whether the vault's database answers.
    async fn ping(&self) -> Result<(), VaultError>;
}

/// How many rows [`KeyVault::rewrap`] rewraps in one transaction: few enough that the locks are
/// short, many enough that a million keys take a thousand transactions.
pub const REWRAP_BATCH: usize = 1000;

/// What [`KeyVault::count_by_master_key`] counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyCounts {
    /// Each master key id that wraps some key, with how many, in id order.
    pub by_master_key: Vec<(String, u64)>,
    /// How many persons were erased (their tombstones).
    pub erased: u64,
}

/// Why the vault did not answer with a key.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// The person was erased: their key is gone, and no new one is made.
    #[error("the person was erased")]
    Erased,
    /// A key is wrapped under a master key that is not configured: a rotation dropped the retired
    /// key before every key was rewrapped, or this process was given the wrong keys. Never read
    /// as an erasure.
    #[error(
        "a person's key is wrapped under master key {0:?}, which is not configured (current or \
         retired)"
    )]
    UnknownMasterKey(String),
    /// A stored key does not unwrap under the master key it names, or its row is not one the
    /// vault writes: the database was altered, or a different key was configured under that id.
    #[error("the stored key of person {person} is corrupt: {reason}")]
    Corrupt {
        person: String,
        reason: &'static str,
    },
    /// A sealed field of a stored message does not open under its person's key, which is
    /// there: the message was altered, or another key was configured.
    #[error("a sealed field of message {message} does not open: {reason}")]
    Unreadable { message: String, reason: String },
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("running the personal key migrations")]
    Migration(#[from] sqlx::migrate::MigrateError),
}

impl VaultError {
    /// Whether the database was out of reach (down, restarting, out of connections, busy, or
    /// read-only after a failover) rather than the data being wrong: worth retrying shortly, a
    /// 503 not a 500. The same judgement as the message store's.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Database(error) => message_store::database::unavailable(error),
            _ => false,
        }
    }
}

impl LostConnection for VaultError {
    fn lost_its_connection(&self) -> bool {
        matches!(self, Self::Database(error) if error.lost_its_connection())
    }

    fn met_a_read_only_server(&self) -> bool {
        matches!(self, Self::Database(error) if error.met_a_read_only_server())
    }
}

/// Opens the vault at `url`, the message store's database: `postgres://...` (or
/// `postgresql://`) or `sqlite://path` (the file is created on first use), with at most
/// `max_connections` connections (on SQLite, readers beside the one writer). Applies the
/// vault's migrations first, which is a no-op when they are applied already.
pub async fn connect(
    url: &str,
    master_keys: MasterKeys,
    max_connections: u32,
) -> Result<Arc<dyn KeyVault>, VaultError> {
    if url.starts_with("sqlite:") {
        let vault = SqliteKeyVault::open_url(url, master_keys, max_connections).await?;
        return Ok(Arc::new(vault));
    }
    let vault = PostgresKeyVault::connect(url, master_keys, max_connections).await?;
    Ok(Arc::new(vault))
}

/// Applies the vault's migrations to the database at `url` and returns: what a deployment's
/// migration Job runs, beside the message store's. Applying them twice changes nothing.
pub async fn migrate(url: &str) -> Result<(), VaultError> {
    if url.starts_with("sqlite:") {
        let pool = sqlite::writer_pool(url).await?;
        SqliteKeyVault::migrate(&pool).await?;
        pool.close().await;
        return Ok(());
    }
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await?;
    PostgresKeyVault::migrate(&pool).await?;
    pool.close().await;
    Ok(())
}

/// A stored row as both adapters read it: a wrapped key, or a tombstone.
enum StoredKey {
    Wrapped {
        master_key_id: String,
        wrapped: Vec<u8>,
    },
    Erased,
}

impl StoredKey {
    /// Reads the row's two nullable columns, which the table's CHECK keeps both set or both
    /// null.
    fn from_columns(
        person: &str,
        wrapped: Option<Vec<u8>>,
        master_key_id: Option<String>,
    ) -> Result<Self, VaultError> {
        match (wrapped, master_key_id) {
            (Some(wrapped), Some(master_key_id)) => Ok(Self::Wrapped {
                master_key_id,
                wrapped,
            }),
            (None, None) => Ok(Self::Erased),
            _ => Err(VaultError::Corrupt {
                person: person.to_owned(),
                reason: "its row has a wrapped key without a master key id, or an id without a key",
            }),
        }
    }

    /// The person's key, unwrapped under the master key the row names.
    fn open(self, person: Uuid, master_keys: &MasterKeys) -> Result<PersonKey, VaultError> {
        match self {
            Self::Wrapped {
                master_key_id,
                wrapped,
            } => master_keys.unwrap(person, &master_key_id, &wrapped),
            Self::Erased => Err(VaultError::Erased),
        }
    }
}

/// The counts of [`KeyVault::count_by_master_key`] from rows of (master key id, count), where a
/// null id counts the tombstones.
fn key_counts(rows: Vec<(Option<String>, i64)>) -> KeyCounts {
    let mut counts = KeyCounts::default();
    for (master_key_id, count) in rows {
        let count = u64::try_from(count).unwrap_or_default();
        match master_key_id {
            Some(id) => counts.by_master_key.push((id, count)),
            None => counts.erased += count,
        }
    }
    counts.by_master_key.sort();
    counts
}

#[cfg(test)]
mod tests {
    /// The services keep the vault and its keys in shared application state, across threads.
    #[test]
    fn vaults_keys_and_errors_can_be_shared_between_threads() {
        fn shareable<T: Send + Sync + 'static>() {}
        shareable::<std::sync::Arc<dyn super::KeyVault>>();
        shareable::<super::MasterKeys>();
        shareable::<super::PersonKey>();
        shareable::<super::LookupKey>();
        shareable::<super::VaultError>();
        shareable::<super::SealError>();
    }

    #[test]
    fn only_database_outages_are_unavailable() {
        assert!(super::VaultError::Database(sqlx::Error::PoolTimedOut).is_unavailable());
        assert!(!super::VaultError::Erased.is_unavailable());
        assert!(!super::VaultError::UnknownMasterKey("a".into()).is_unavailable());
    }
}
