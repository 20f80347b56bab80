//! The users view as plain values, and how events change it. Pure: no I/O.
//!
//! The read-model adapters load the rows a batch touches, fold the batch into them here, and
//! write back the rows that changed, so the rules live in one place for PostgreSQL and SQLite.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use identity::{
    AccountStatus, EventDecodeError, LOGIN_CATEGORY, LoginEvent, USER_CATEGORY, UserEvent,
    UserRegistered, event_version, user_id_of_stream,
};
use message_store::{GlobalPosition, RecordedMessage};
use uuid::Uuid;

/// One row of the users view. See the schema in [`crate::read_model`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRow {
    pub id: Uuid,
    pub email: String,
    pub email_normalized: String,
    /// `pending`, `active` or `deactivated`.
    pub status: String,
    pub registered_at: DateTime<Utc>,
    pub activated_at: Option<DateTime<Utc>>,
    pub deactivated_at: Option<DateTime<Utc>>,
    pub last_login_at: Option<DateTime<Utc>>,
    pub login_count: i64,
    /// Failed logins since the last successful one.
    pub failed_logins: i32,
    pub locked_until: Option<DateTime<Utc>>,
    /// `user`, `admin`.
    pub roles: Vec<String>,
    /// The global position of the last event applied to this row.
    pub position: i64,
}

/// An event of a projected category, read and attributed to its user.
#[derive(Debug, Clone)]
pub struct Change {
    pub position: GlobalPosition,
    pub user_id: Uuid,
    pub event: ProjectedEvent,
}

#[derive(Debug, Clone)]
pub enum ProjectedEvent {
    User(UserEvent),
    Login(LoginEvent),
}

/// A batch of messages sorted into what the view applies, what it skips, and where it must stop.
#[derive(Debug, Default)]
pub struct Prepared {
    /// The changes before the first poison message (all of them when there is none).
    pub changes: Vec<Change>,
    /// Messages of an unknown type in a projected category: counted and passed over.
    pub skipped: usize,
    /// The first message the projection knows but cannot read: its position and why.
    pub poison: Option<(GlobalPosition, String)>,
}

/// Sorts a batch (in global order). Categories other than `user` and `userLogin` (for example
/// the command side's email reservations) are not projected and pass silently.
pub fn prepare(messages: &[RecordedMessage]) -> Prepared {
    let mut prepared = Prepared::default();
    for message in messages {
        let category = message.stream.category();
        if category != USER_CATEGORY && category != LOGIN_CATEGORY {
            continue;
        }
        match decode(message) {
            Ok(change) => prepared.changes.push(change),
            Err(EventDecodeError::UnknownType { .. }) => prepared.skipped += 1,
            Err(error) => {
                prepared.poison = Some((
                    message.global_position,
                    format!(
                        "message {} ({} in {} at global position {}): {error}",
                        message.id, message.message_type, message.stream, message.global_position
                    ),
                ));
                break;
            }
        }
    }
    prepared
}

fn decode(message: &RecordedMessage) -> Result<Change, EventDecodeError> {
    let version = event_version(&message.metadata)?;
    let user_id =
        user_id_of_stream(message.stream.as_str()).ok_or_else(|| EventDecodeError::Malformed {
            event_type: message.message_type.clone(),
            version,
            reason: format!("stream {} does not name a user id", message.stream),
        })?;
    let event = if message.stream.category() == USER_CATEGORY {
        ProjectedEvent::User(UserEvent::from_stored(
            &message.message_type,
            version,
            &message.data,
        )?)
    } else {
        ProjectedEvent::Login(LoginEvent::from_stored(
            &message.message_type,
            version,
            &message.data,
        )?)
    };
    Ok(Change {
        position: message.global_position,
        user_id: *user_id.as_uuid(),
        event,
    })
}

/// Applies one change to the rows loaded for a batch. Returns whether the row changed, or why
/// the change cannot be applied (a poison event: the projection stops).
///
/// A change at or below the row's position was applied before and is passed over: the
/// checkpoint already prevents that, this is the second guard.
pub fn apply(rows: &mut HashMap<Uuid, UserRow>, change: &Change) -> Result<bool, String> {
    let position = i64::try_from(change.position).unwrap_or(i64::MAX);
    if let ProjectedEvent::User(UserEvent::UserRegistered(registered)) = &change.event {
        return insert_registered(rows, change, registered, position);
    }
    let Some(row) = rows.get_mut(&change.user_id) else {
        return Err(format!(
            "an event for user {} at global position {} but the view has no such user",
            change.user_id, change.position
        ));
    };
    if row.position >= position {
        return Ok(false);
    }
    update_row(row, &change.event);
    row.position = position;
    Ok(true)
}

/// A registration creates its user's row. One for a user the view already has is poison,
/// unless it lies at or below the row's position (it was applied before).
fn insert_registered(
    rows: &mut HashMap<Uuid, UserRow>,
    change: &Change,
    registered: &UserRegistered,
    position: i64,
) -> Result<bool, String> {
    if let Some(existing) = rows.get(&change.user_id) {
        if existing.position >= position {
            return Ok(false);
        }
        return Err(format!(
            "a second UserRegistered for user {} at global position {}",
            change.user_id, change.position
        ));
    }
    rows.insert(
        change.user_id,
        UserRow {
            id: change.user_id,
            email: registered.email.as_str().to_owned(),
            email_normalized: registered.email_normalized.clone(),
            status: registered.status.name().to_owned(),
            registered_at: registered.registered_at,
            activated_at: (registered.status == AccountStatus::Active)
                .then_some(registered.registered_at),
            deactivated_at: None,
            last_login_at: None,
            login_count: 0,
            failed_logins: 0,
            locked_until: None,
            roles: registered
                .roles
                .iter()
                .map(|role| role.name().to_owned())
                .collect(),
            position,
        },
    );
    Ok(true)
}

/// What an event after the registration changes in its user's row (all but the position).
fn update_row(row: &mut UserRow, event: &ProjectedEvent) {
    match event {
        ProjectedEvent::User(event) => match event {
            UserEvent::UserRegistered(_) => {}
            UserEvent::UserActivated(e) => {
                row.status = AccountStatus::Active.name().to_owned();
                row.activated_at = Some(e.at);
            }
            UserEvent::UserDeactivated(e) => {
                row.status = AccountStatus::Deactivated.name().to_owned();
                row.deactivated_at = Some(e.at);
            }
            // Nothing of a password is in the view; the row's position still moves.
            UserEvent::PasswordChanged(_) | UserEvent::PasswordRehashed(_) => {}
        },
        // Login events carry the running state: the view copies it, it never counts.
        ProjectedEvent::Login(LoginEvent::LoginSucceeded(e)) => {
            row.last_login_at = Some(e.at);
            row.login_count = i64::try_from(e.login_count).unwrap_or(i64::MAX);
            row.failed_logins = 0;
            row.locked_until = None;
        }
        ProjectedEvent::Login(LoginEvent::LoginFailed(e)) => {
            row.login_count = i64::try_from(e.login_count).unwrap_or(i64::MAX);
            row.failed_logins = i32::try_from(e.failed_in_a_row).unwrap_or(i32::MAX);
            row.locked_until = e.locked_until;
        }
    }
}

/// Folds `changes` into `rows` and returns the ids of the rows that changed, or the index of
/// the first change that cannot be applied and why.
pub fn apply_all(
    rows: &mut HashMap<Uuid, UserRow>,
    changes: &[Change],
) -> Result<Vec<Uuid>, (usize, String)> {
    let mut changed = Vec::new();
    for (index, change) in changes.iter().enumerate() {
        if apply(rows, change).map_err(|reason| (index, reason))? {
            changed.push(change.user_id);
        }
    }
    changed.sort_unstable();
    changed.dedup();
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use identity::{Email, LoginSucceeded, PasswordHash, Role, UserActivated, UserId};

    use super::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + chrono::Duration::seconds(seconds)
    }

    fn id() -> Uuid {
        Uuid::from_u128(7)
    }

    fn registered(position: u64) -> Change {
        Change {
            position,
            user_id: id(),
            event: ProjectedEvent::User(
                UserRegistered {
                    user_id: UserId::from_uuid(id()),
                    email: Email::parse("Ann@Example.com").unwrap(),
                    email_normalized: "ann@example.com".into(),
                    password_hash: PasswordHash::parse("$argon2id$v=19$x").unwrap(),
                    status: AccountStatus::Pending,
                    roles: vec![Role::User, Role::Admin],
                    registered_at: at(0),
                }
                .into(),
            ),
        }
    }

    fn login(position: u64, count: u64) -> Change {
        Change {
            position,
            user_id: id(),
            event: ProjectedEvent::Login(
                LoginSucceeded {
                    at: at(position as i64),
                    login_count: count,
                }
                .into(),
            ),
        }
    }

    #[test]
    fn a_registration_creates_the_row_and_later_events_change_it() {
        let mut rows = HashMap::new();
        let activated = Change {
            position: 20,
            user_id: id(),
            event: ProjectedEvent::User(UserActivated { at: at(5) }.into()),
        };
        let changed = apply_all(&mut rows, &[registered(10), activated, login(30, 4)]).unwrap();
        assert_eq!(changed, vec![id()]);
        let row = &rows[&id()];
        assert_eq!(row.status, "active");
        assert_eq!(row.activated_at, Some(at(5)));
        assert_eq!(row.login_count, 4);
        assert_eq!(row.roles, ["user", "admin"]);
        assert_eq!(row.position, 30);
    }

    #[test]
    fn an_event_at_or_below_the_rows_position_is_not_applied_again() {
        let mut rows = HashMap::new();
        apply_all(&mut rows, &[registered(10), login(30, 4)]).unwrap();
        assert_eq!(apply(&mut rows, &registered(10)), Ok(false));
        assert_eq!(apply(&mut rows, &login(20, 3)), Ok(false));
        assert_eq!(rows[&id()].login_count, 4);
    }

    #[test]
    fn an_event_for_a_user_the_view_does_not_have_cannot_be_applied() {
        let mut rows = HashMap::new();
        let error = apply_all(&mut rows, &[login(30, 1)]).unwrap_err();
        assert_eq!(error.0, 0);
        assert!(error.1.contains("no such user"));
    }
}
