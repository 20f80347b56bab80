//! The read model's schema, written once for the process that writes it (the aggregator) and
//! the one that reads it (the query API): its migrations, the name and version of the users
//! projection, and how a projection's checkpoint is read and decoded. Each side keeps its own
//! pool and its own statements over the views; what both must agree on about the schema lives
//! here.

#![forbid(unsafe_code)]

use sqlx::migrate::Migrator;

/// Runs `$body` on the pool of `$value`, a value of the enum `$engines` whose variants
/// `Postgres` and `Sqlite` each hold that engine's pool, bound to `$pool`: a statement both
/// engines run alike is written once and compiles for each pool type (sqlx's pools share no
/// trait to write it against without a page of bounds). The read model's writer and reader
/// each have such an enum.
#[macro_export]
macro_rules! on_either_pool {
    ($engines:ident, $value:expr, |$pool:ident| $body:expr) => {
        match $value {
            $engines::Postgres($pool) => $body,
            $engines::Sqlite($pool) => $body,
        }
    };
}

/// The projection that keeps the `users` view; its checkpoint says how far the view has got.
pub const USERS_PROJECTION: &str = "users";

/// The version of the users projection that this build's aggregator folds and its query API
/// reads, as the view's checkpoint records it. Bump it when what the projection writes
/// changes, and rebuild. During an upgrade a view of another version can be live for a while
/// (older aggregators keep folding it until `aggregator rebuild` swaps a new one in, ADR 8):
/// the aggregator writes nothing into it, and the query API takes from it only what that
/// version kept.
///
/// 2: the sessions view and `users.session_epoch` (ADR 11). A view of version 1 has neither:
/// its worker passed over session events and `SessionsEnded`, and left every account's epoch at
/// the column's default, 0, whatever its stream says; so it must be folded again, and until
/// then its epochs are not the accounts'.
///
/// Still 2 with `users.email_verified` and the events of account recovery (`EmailVerified`,
/// `EmailChanged`, `PasswordReset`, `LockoutLifted`): a view folded before those events
/// existed holds no account that any of them changed, so every row of it is right with the
/// new column's default, false, and needs no second fold. That rests on no aggregator of an
/// older build having passed over one of them (it skips types it does not know): upgrade the
/// aggregators, with the migration, before the command API that appends them, or `rebuild`
/// after.
///
/// Still 2 with erased accounts (ADR 13: `users.erased_at`, `status` `erased`, a null address,
/// no sessions rows): no view folded before `UserErased` existed holds an erased account, so
/// every row of it is right with the new column's default, null. The same order holds: the
/// aggregators (and their migration) before the query API that reads erased rows, and both
/// before the command API that erases: an aggregator of an older build passes over a
/// `UserErased` (a type it does not know) and would keep the address in the row; it halts
/// before a sealed event (it cannot read the envelope as an address) rather than fold it wrong.
pub const USERS_VERSION: i32 = 2;

/// The `status` of a users row whose account was erased (ADR 13); the other statuses are
/// `identity::AccountStatus` names. Not an account status: the domain's erased account has
/// none, and the view keeps the row so that its facts (registration, logins, erasure) stay.
pub const ERASED_STATUS: &str = "erased";

/// The read model's migrations on PostgreSQL (`migrations/read_model/postgres`).
pub fn postgres_migrations() -> Migrator {
    sharing_the_database(sqlx::migrate!("../../migrations/read_model/postgres"))
}

/// The read model's migrations on SQLite (`migrations/read_model/sqlite`).
pub fn sqlite_migrations() -> Migrator {
    sharing_the_database(sqlx::migrate!("../../migrations/read_model/sqlite"))
}

/// The message store may share the read model's database, and with it the migrations table:
/// its migrations are applied there too, and are no error here.
fn sharing_the_database(mut migrator: Migrator) -> Migrator {
    migrator.set_ignore_missing(true);
    migrator
}

/// A projection's stored checkpoint: every event up to `position` is in its view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// The version of the projection that folded the view.
    pub version: i32,
    pub position: u64,
    /// Bumped by every worker that takes the projection's lock; never by `reset` or `rebuild`
    /// (docs/adr/0008).
    pub epoch: i64,
}

/// The columns of a checkpoint as stored: version, position and epoch.
pub type StoredCheckpoint = (i32, i64, i64);

impl Checkpoint {
    /// Reads the checkpoint of the projection named `$1`, on either engine, as a
    /// [`StoredCheckpoint`].
    pub const READ: &'static str =
        "SELECT version, position, epoch FROM projection_checkpoints WHERE projection = $1";

    /// The checkpoint from its stored columns (the database's integers are signed).
    pub fn from_stored((version, position, epoch): StoredCheckpoint) -> Self {
        Self {
            version,
            position: unsigned(position),
            epoch,
        }
    }

    /// The same checkpoint, moved to `position`.
    pub fn at(self, position: u64) -> Self {
        Self { position, ..self }
    }
}

/// A position or a count as the database stores it (signed), read back; never negative.
pub fn unsigned(stored: i64) -> u64 {
    u64::try_from(stored).unwrap_or(0)
}

/// A position or a count as the database stores it (signed).
pub fn signed(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_checkpoint_decodes_with_its_position_unsigned() {
        let checkpoint = Checkpoint::from_stored((2, 9, 3));
        assert_eq!(
            checkpoint,
            Checkpoint {
                version: 2,
                position: 9,
                epoch: 3
            }
        );
        assert_eq!(checkpoint.at(12).position, 12);
        assert_eq!(unsigned(-1), 0);
        assert_eq!(signed(u64::MAX), i64::MAX);
    }
}
