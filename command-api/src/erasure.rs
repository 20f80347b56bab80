//! Erasing an account (ADR 13, `DELETE /users/{id}`), without HTTP.
//!
//! The person, proving their current password, or an administrator asks; `UserErased` (who
//! asked, when) is appended to the account's stream and `EmailReleased` to its address's
//! reservation stream, each at the version read, in one atomic append (with the administrators'
//! stream when an active administrator goes, so that the last one cannot); then the account's
//! key is deleted. From the append on, every reader folds the account as erased: its sessions
//! are over, its links invalid, every command on it refused as on an unknown account, and its
//! address free. From the key's deletion on, its personal fields are gone from every copy of
//! the store made after.
//!
//! A process that dies between the append and the deletion leaves the key behind: the users
//! projection deletes it when it applies the erasure, and an administrator's repeated erasure
//! (answered [`CommandError::AccountErased`]) deletes it again.

use std::fmt;

use identity::{Account, UserAccount, UserCommand, UserId, decide};
use message_store::StreamAppend;

use crate::personal::user_messages;
use crate::reservation::EmailReleased;
use crate::service::{
    CommandError, Commands, Done, MAX_ATTEMPTS, expected, lost_every_race, user_stream,
};

/// Who asks for an erasure.
pub enum Erasure {
    /// The account's own person, with its current password: a stolen access token alone
    /// erases nothing. A wrong password counts toward the lockout, as a login's.
    ByOwner { password: String },
    /// An administrator, who need not know the account's password.
    ByAdministrator { administrator: UserId },
}

impl fmt::Debug for Erasure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ByOwner { .. } => f.write_str("ByOwner { password: [redacted] }"),
            Self::ByAdministrator { administrator } => f
                .debug_struct("ByAdministrator")
                .field("administrator", administrator)
                .finish(),
        }
    }
}

impl Commands {
    /// Erases the account `id` (see the module's documentation): the position of its
    /// `UserErased`.
    ///
    /// Refused with [`CommandError::NotFound`] for an unknown account (and for an erased one
    /// when its owner asks, which nobody can: an erased account has no live session),
    /// [`CommandError::AccountErased`] when an administrator asks for an erased one (its key is
    /// deleted again), [`CommandError::InvalidCredentials`] for a wrong password or a locked
    /// account, and [`CommandError::LastAdministrator`] for the last active administrator.
    pub async fn erase(&self, id: UserId, erasure: Erasure) -> Result<Done, CommandError> {
        let loaded = self.load(id).await?;
        let by_administrator = matches!(erasure, Erasure::ByAdministrator { .. });
        let account = self.erasable(id, &loaded.account, by_administrator).await?;
        let (by, proven) = match erasure {
            Erasure::ByOwner { password } => {
                self.prove_password(account, password).await?;
                (id, Some(account.password_changes))
            }
            Erasure::ByAdministrator { administrator } => (administrator, None),
        };
        let mut loaded = Some(loaded);
        for _ in 0..MAX_ATTEMPTS {
            // The first attempt decides on the stream as the password was proven on.
            let loaded = match loaded.take() {
                Some(loaded) => loaded,
                None => self.load(id).await?,
            };
            let account = self.erasable(id, &loaded.account, by_administrator).await?;
            // A password chosen since the proof was made voids it, as for a password change.
            if proven.is_some_and(|proven| proven != account.password_changes) {
                return Err(CommandError::InvalidCredentials);
            }
            let events = decide(&loaded.account, UserCommand::Erase { by }, self.clock.now())?;
            // The administrators' change first and the account's event last, as in every
            // update of an account.
            let mut appends = self.administrators_append(&loaded.account, &events).await?;
            appends.extend(self.release_of(account).await?);
            appends.push(StreamAppend::new(
                user_stream(id)?,
                expected(loaded.version),
                user_messages(None, &events)?,
            ));
            let appended = self.append_if_current(appends, "appending an erasure");
            if let Some(position) = appended.await? {
                // The operator's record of erasures, to erase again after restoring a backup
                // older than this one: the account's id alone, nothing personal.
                tracing::info!(account = %id, position, "account erased");
                // The erasure has happened: every reader folds the account as erased from the
                // appended event on. A key the vault could not delete now is deleted by the
                // projection when it applies the event, so the answer is the erasure's.
                if let Err(error) = self.erase_key(id).await {
                    tracing::warn!(
                        account = %id,
                        error = format!("{error:#}"),
                        "an erased account's key could not be deleted yet; the projection will"
                    );
                }
                return Ok(Done { id, position });
            }
        }
        Err(lost_every_race("erasing an account"))
    }

    /// The account `state` holds, if it can be erased. An administrator asking for an account
    /// erased already deletes its key again, in case the erasure that was appended stopped
    /// short of it.
    async fn erasable<'a>(
        &self,
        id: UserId,
        state: &'a UserAccount,
        by_administrator: bool,
    ) -> Result<&'a Account, CommandError> {
        match state {
            UserAccount::Registered(account) => Ok(account),
            UserAccount::NotRegistered => Err(CommandError::NotFound),
            UserAccount::Erased(_) if by_administrator => {
                self.erase_key(id).await?;
                Err(CommandError::AccountErased)
            }
            UserAccount::Erased(_) => Err(CommandError::NotFound),
        }
    }

    /// The release of `account`'s address, at the version of its reservation stream read now.
    /// None when the address is not reserved for the account (an inconsistency no erasure
    /// should wait on: the person is forgotten all the same, and the address's stream is left
    /// as it is).
    async fn release_of(&self, account: &Account) -> Result<Option<StreamAppend>, CommandError> {
        let reservation = self.reservation(&account.email).await?;
        if reservation.holder() != Some(account.id) {
            tracing::warn!(
                account = %account.id,
                "an erased account's address was not reserved for it; nothing to release"
            );
            return Ok(None);
        }
        Ok(Some(StreamAppend::new(
            self.email_stream(&account.email)?,
            reservation.expected(),
            vec![
                EmailReleased {
                    user_id: account.id,
                }
                .to_message(),
            ],
        )))
    }
}
