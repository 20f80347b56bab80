//! What a database's failures mean to its callers: which ones a client should retry later
//! (a 503), and which ones a call may retry at once on another pooled connection. Shared by the
//! message store and every other reader with a pool of its own (the query API's read model).

use std::future::Future;

use crate::{AppendError, RenameStreamError, StoreError};

/// Whether the database was out of reach (down, restarting, out of connections, busy, or
/// read-only after a failover) rather than the request or the data being wrong: worth retrying
/// shortly, a 503 not a 500.
pub fn unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(error) => {
            if error
                .try_downcast_ref::<sqlx::sqlite::SqliteError>()
                .is_some()
            {
                // SQLITE_BUSY and SQLITE_LOCKED, with their extended codes: another writer
                // held the file for longer than the busy timeout.
                return error
                    .code()
                    .and_then(|code| code.parse::<i32>().ok())
                    .is_some_and(|code| matches!(code & 0xff, 5 | 6));
            }
            // A FATAL error ends the session: the server would not keep this connection (a
            // database closed to connections, say), whatever the code.
            if error
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .is_some_and(|error| {
                    matches!(
                        error.severity(),
                        sqlx::postgres::PgSeverity::Fatal | sqlx::postgres::PgSeverity::Panic
                    )
                })
            {
                return true;
            }
            // SQLSTATE classes 08 (connection exception) and 53 (insufficient resources),
            // 57P01-57P03 (the server shutting down, crashed, or not yet accepting
            // connections), and 25006: a read-only transaction, as a server demoted to a
            // standby by a failover answers until the connection finds the new primary.
            error.code().is_some_and(|code| {
                code.starts_with("08")
                    || code.starts_with("53")
                    || matches!(code.as_ref(), "57P01" | "57P02" | "57P03" | "25006")
            })
        }
        _ => false,
    }
}

/// Errors that say whether their call met a connection that is of no more use: one that died
/// while it sat idle in the pool (the server restarted or closed it), or one to a server a
/// failover made read-only. The same call on another connection may well work.
pub trait LostConnection {
    /// The pooled connection had died. Not a refused connection: a server that is down refuses
    /// every new one, and trying again at once would only repeat the refusal.
    fn lost_its_connection(&self) -> bool;

    /// The server answered as a read-only standby (SQLSTATE 25006): the connection reaches a
    /// server a failover demoted, and a new one may reach the new primary.
    fn met_a_read_only_server(&self) -> bool;
}

impl LostConnection for sqlx::Error {
    fn lost_its_connection(&self) -> bool {
        match self {
            sqlx::Error::Io(io) => io.kind() != std::io::ErrorKind::ConnectionRefused,
            sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed => true,
            sqlx::Error::Database(error) => error.code().is_some_and(|code| {
                code.starts_with("08") || matches!(code.as_ref(), "57P01" | "57P02")
            }),
            _ => false,
        }
    }

    fn met_a_read_only_server(&self) -> bool {
        matches!(self, sqlx::Error::Database(error) if error.code().as_deref() == Some("25006"))
    }
}

impl LostConnection for StoreError {
    fn lost_its_connection(&self) -> bool {
        matches!(self, Self::Database(error) if error.lost_its_connection())
    }

    fn met_a_read_only_server(&self) -> bool {
        matches!(self, Self::Database(error) if error.met_a_read_only_server())
    }
}

impl LostConnection for AppendError {
    fn lost_its_connection(&self) -> bool {
        matches!(self, Self::Store(error) if error.lost_its_connection())
    }

    fn met_a_read_only_server(&self) -> bool {
        matches!(self, Self::Store(error) if error.met_a_read_only_server())
    }
}

impl LostConnection for RenameStreamError {
    fn lost_its_connection(&self) -> bool {
        matches!(self, Self::Store(error) if error.lost_its_connection())
    }

    fn met_a_read_only_server(&self) -> bool {
        matches!(self, Self::Store(error) if error.met_a_read_only_server())
    }
}

/// Runs `call` again when it failed because its pooled connection had died: after a database
/// restart every idle connection in a pool is dead, and without this each of them would fail
/// one request. At most `pool_size` times, since each failure discards one dead connection; a
/// server that is down refuses new connections, which ends it at once.
pub async fn retrying_lost_connections<T, E, Call, Fut>(
    pool_size: u32,
    mut call: Call,
) -> Result<T, E>
where
    E: LostConnection,
    Call: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut retries_left = pool_size;
    loop {
        match call().await {
            Err(error) if retries_left > 0 && error.lost_its_connection() => {
                retries_left -= 1;
                tracing::debug!("a pooled database connection had died; retrying");
            }
            outcome => return outcome,
        }
    }
}
