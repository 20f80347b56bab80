//! The users view and the sessions view as plain values, and how events change them. Pure: no
//! I/O.
//!
//! The read-model adapters load the rows a batch touches, fold the batch into them here, and
//! write back the rows that changed, so the rules live in one place for PostgreSQL and SQLite.
//! Both views belong to one projection (ADR 11): one checkpoint, one transaction per commit.
//!
//! **Erased accounts** (ADR 13). An account's row becomes erased when its `UserErased` is
//! applied, or when any personal field of its events reads erased (its key is gone: a rebuild
//! from zero after the erasure reads its registration so): `status` `erased`, no address,
//! `erased_at` from the event (none while only the data was found erased). Every other fact
//! stays and goes on following its events (activation and deactivation times, logins, the
//! verified flag, the session epoch), but the status stays `erased` and no address comes back.
//! `UserErased` moves the session epoch, as the end of every session. An erased account has no
//! sessions rows: they hold user agents, so a commit that writes an erased row deletes them,
//! and a session event of an erased account changes nothing. Each event changes a row alike
//! whether its personal fields read known or erased, so the live worker, which read the
//! account's data before its erasure, and a rebuild, which reads it erased from the start, end
//! with the same row.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use identity::{
    AccountStatus, EventDecodeError, LOGIN_CATEGORY, LoginEvent, SESSION_CATEGORY, SessionEvent,
    SessionStarted, USER_CATEGORY, UserEvent, UserRegistered, event_version, user_id_of_stream,
};
use message_store::{GlobalPosition, RecordedMessage};
use read_model_schema::{ERASED_STATUS, signed};
use uuid::Uuid;

/// One row of the users view. See the schema in [`crate::read_model`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRow {
    pub id: Uuid,
    /// `None` once the account is erased.
    pub email: Option<String>,
    pub email_normalized: Option<String>,
    /// Whether the owner proved control of `email` (`identity::Account::email_verified`):
    /// false at registration, true after a verification or a change of email.
    pub email_verified: bool,
    /// `pending`, `active`, `deactivated` or `erased` ([`ERASED_STATUS`]).
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
    /// The account's session epoch (`identity::Account::session_epoch`): a session is live only
    /// while its own epoch is this one.
    pub session_epoch: i64,
    /// When the account was erased, by its `UserErased`; `None` while it is not, or while only
    /// its data was found erased.
    pub erased_at: Option<DateTime<Utc>>,
    /// The global position of the last event applied to this row.
    pub position: i64,
}

impl UserRow {
    pub fn is_erased(&self) -> bool {
        self.status == ERASED_STATUS
    }

    /// The row as erased: no address, the status `erased`, and `at` as the time of the erasure
    /// when the event says it.
    fn erase(&mut self, at: Option<DateTime<Utc>>) {
        self.status = ERASED_STATUS.to_owned();
        self.email = None;
        self.email_normalized = None;
        if at.is_some() {
            self.erased_at = at;
        }
    }
}

/// One row of the sessions view. See the schema in [`crate::read_model`].
///
/// Whether the session is live is not here: its account's epoch and status decide that too,
/// and the query API joins the two views (ADR 11). A change of epoch writes one users row, never
/// one row per session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    pub id: Uuid,
    pub user_id: Uuid,
    /// The account's session epoch the session started in.
    pub session_epoch: i64,
    pub started_at: DateTime<Utc>,
    /// The last rotation of its refresh token; `None` until the first.
    pub last_refreshed_at: Option<DateTime<Utc>>,
    pub expires_at: DateTime<Utc>,
    pub idle_expires_at: DateTime<Utc>,
    pub user_agent: Option<String>,
    /// The generation of its current refresh token.
    pub generation: i64,
    pub ended_at: Option<DateTime<Utc>>,
    /// `identity::SessionEndReason::name`.
    pub end_reason: Option<String>,
    /// The global position of the last event applied to this row.
    pub position: i64,
}

/// Which row of which view an event changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RowId {
    /// A users row, by user id: user and login events.
    User(Uuid),
    /// A sessions row, by session id: session events.
    Session(Uuid),
}

/// The rows of both views that a worker holds: loaded for a batch, or kept between batches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rows {
    pub users: HashMap<Uuid, UserRow>,
    pub sessions: HashMap<Uuid, SessionRow>,
}

impl Rows {
    pub fn len(&self) -> usize {
        self.users.len() + self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn clear(&mut self) {
        self.users.clear();
        self.sessions.clear();
    }

    pub fn contains(&self, id: RowId) -> bool {
        match id {
            RowId::User(id) => self.users.contains_key(&id),
            RowId::Session(id) => self.sessions.contains_key(&id),
        }
    }

    /// Adds `loaded` rows to these, keeping the ones held already.
    pub fn extend(&mut self, loaded: Rows) {
        for (id, row) in loaded.users {
            self.users.entry(id).or_insert(row);
        }
        for (id, row) in loaded.sessions {
            self.sessions.entry(id).or_insert(row);
        }
    }

    /// The rows named by `ids` that these hold, users and sessions apart, each in the order of
    /// `ids`: what a commit writes.
    pub fn select<'a>(&self, ids: impl IntoIterator<Item = &'a RowId>) -> Changed<'_> {
        let mut changed = Changed::default();
        for id in ids {
            match id {
                RowId::User(id) => changed.users.extend(self.users.get(id)),
                RowId::Session(id) => changed.sessions.extend(self.sessions.get(id)),
            }
        }
        changed
    }
}

/// The rows a commit writes, by view.
#[derive(Debug, Default)]
pub struct Changed<'a> {
    pub users: Vec<&'a UserRow>,
    pub sessions: Vec<&'a SessionRow>,
}

impl Changed<'_> {
    pub fn len(&self) -> usize {
        self.users.len() + self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An event of a projected category, read and attributed to the row it changes.
#[derive(Debug, Clone)]
pub struct Change {
    pub position: GlobalPosition,
    pub event: ProjectedEvent,
}

#[derive(Debug, Clone)]
pub enum ProjectedEvent {
    /// An event of the user's stream, `user-<id>`: the stream names the user.
    User { user_id: Uuid, event: UserEvent },
    /// An event of the user's login stream, `userLogin-<id>`: the stream names the user.
    Login { user_id: Uuid, event: LoginEvent },
    /// An event of a session stream: it names its session (and its user) itself.
    Session(SessionEvent),
}

impl Change {
    /// The row the event changes.
    pub fn row(&self) -> RowId {
        match &self.event {
            ProjectedEvent::User { user_id, .. } | ProjectedEvent::Login { user_id, .. } => {
                RowId::User(*user_id)
            }
            ProjectedEvent::Session(event) => RowId::Session(*event.session_id().as_uuid()),
        }
    }

    /// The rows applying the event reads: the one it changes, and for a session event its
    /// account's too (an erased account's sessions are not kept).
    pub fn rows(&self) -> impl Iterator<Item = RowId> {
        let account = match &self.event {
            ProjectedEvent::Session(event) => Some(RowId::User(*event.user_id().as_uuid())),
            ProjectedEvent::User { .. } | ProjectedEvent::Login { .. } => None,
        };
        std::iter::once(self.row()).chain(account)
    }

    /// The account this change erases, if it is a `UserErased`.
    pub fn erases(&self) -> Option<Uuid> {
        match &self.event {
            ProjectedEvent::User {
                user_id,
                event: UserEvent::UserErased(_),
            } => Some(*user_id),
            _ => None,
        }
    }
}

/// A batch of messages sorted into what the views apply, what they skip, and where they must
/// stop.
#[derive(Debug, Default)]
pub struct Prepared {
    /// The changes before the first poison message (all of them when there is none).
    pub changes: Vec<Change>,
    /// Messages of an unknown type in a projected category: counted and passed over.
    pub skipped: usize,
    /// The first message the projection knows but cannot read: its position and why.
    pub poison: Option<(GlobalPosition, String)>,
}

/// Whether the projection reads messages of `category`: the user, login and session streams.
/// Others (for example the command side's email reservations) pass silently.
pub fn is_projected(category: &str) -> bool {
    [USER_CATEGORY, LOGIN_CATEGORY, SESSION_CATEGORY].contains(&category)
}

/// Sorts a batch (in global order).
pub fn prepare(messages: &[RecordedMessage]) -> Prepared {
    let mut prepared = Prepared::default();
    for message in messages {
        if !is_projected(message.stream.category()) {
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
    let (type_, data) = (message.message_type.as_str(), &message.data);
    let category = message.stream.category();
    if category == SESSION_CATEGORY {
        // A session event names its session (and its user) in its data.
        return Ok(Change {
            position: message.global_position,
            event: ProjectedEvent::Session(SessionEvent::from_stored(type_, version, data)?),
        });
    }
    // Login events do not name their user: the stream does, and so for user events.
    let user_id =
        user_id_of_stream(message.stream.as_str()).ok_or_else(|| EventDecodeError::Malformed {
            event_type: message.message_type.clone(),
            version,
            reason: format!("stream {} does not name a user id", message.stream),
        })?;
    let user_id = *user_id.as_uuid();
    let event = if category == USER_CATEGORY {
        ProjectedEvent::User {
            user_id,
            event: UserEvent::from_stored(type_, version, data)?,
        }
    } else {
        ProjectedEvent::Login {
            user_id,
            event: LoginEvent::from_stored(type_, version, data)?,
        }
    };
    Ok(Change {
        position: message.global_position,
        event,
    })
}

/// Applies one change to the rows loaded for a batch. Returns whether a row changed, or why the
/// change cannot be applied (a poison event: the projection stops).
///
/// A change at or below its row's position was applied before and is passed over: the
/// checkpoint already prevents that, this is the second guard.
pub fn apply(rows: &mut Rows, change: &Change) -> Result<bool, String> {
    let position = signed(change.position);
    match &change.event {
        ProjectedEvent::User {
            user_id,
            event: UserEvent::UserRegistered(registered),
        } => insert_registered(&mut rows.users, *user_id, change, registered, position),
        ProjectedEvent::User { user_id, event } => {
            let Some(row) = user_row_after(&mut rows.users, *user_id, change, position)? else {
                return Ok(false);
            };
            update_user(row, event);
            row.position = position;
            Ok(true)
        }
        ProjectedEvent::Login { user_id, event } => {
            let Some(row) = user_row_after(&mut rows.users, *user_id, change, position)? else {
                return Ok(false);
            };
            update_logins(row, event);
            row.position = position;
            Ok(true)
        }
        ProjectedEvent::Session(event) => {
            let account = rows.users.get(event.user_id().as_uuid());
            if account.is_some_and(UserRow::is_erased) {
                // Any row of it held in memory was deleted when the erased row was written, or
                // is deleted with it.
                rows.sessions.remove(event.session_id().as_uuid());
                return Ok(false);
            }
            apply_to_session(&mut rows.sessions, event, change)
        }
    }
}

/// The users row an event after the registration changes: `None` when the row is already past
/// the event, an error when the view has no such user.
fn user_row_after<'r>(
    users: &'r mut HashMap<Uuid, UserRow>,
    user_id: Uuid,
    change: &Change,
    position: i64,
) -> Result<Option<&'r mut UserRow>, String> {
    let Some(row) = users.get_mut(&user_id) else {
        return Err(format!(
            "an event for user {user_id} at global position {} but the view has no such user",
            change.position
        ));
    };
    Ok((row.position < position).then_some(row))
}

/// A registration creates its user's row. One for a user the view already has is poison,
/// unless it lies at or below the row's position (it was applied before).
fn insert_registered(
    users: &mut HashMap<Uuid, UserRow>,
    user_id: Uuid,
    change: &Change,
    registered: &UserRegistered,
    position: i64,
) -> Result<bool, String> {
    if let Some(existing) = users.get(&user_id) {
        if existing.position >= position {
            return Ok(false);
        }
        return Err(format!(
            "a second UserRegistered for user {user_id} at global position {}",
            change.position
        ));
    }
    let mut row = UserRow {
        id: user_id,
        email: registered
            .email
            .known()
            .map(|email| email.as_str().to_owned()),
        email_normalized: registered.email_normalized.known().cloned(),
        email_verified: false,
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
        session_epoch: 0,
        erased_at: None,
        position,
    };
    if registered.email.is_erased()
        || registered.email_normalized.is_erased()
        || registered.password_hash.is_erased()
    {
        row.erase(None);
    }
    users.insert(user_id, row);
    Ok(true)
}

/// What an event of the user stream after the registration changes in its row (all but the
/// position). The session epoch and the verified flag move as `identity::evolve` moves the
/// account's; they and the times go on moving on an erased row, whose status and address stay
/// as the erasure left them (see the module documentation).
fn update_user(row: &mut UserRow, event: &UserEvent) {
    match event {
        UserEvent::UserRegistered(_) => {}
        UserEvent::UserActivated(e) => {
            set_status(row, AccountStatus::Active);
            row.activated_at = Some(e.at);
        }
        UserEvent::UserDeactivated(e) => {
            set_status(row, AccountStatus::Deactivated);
            row.deactivated_at = Some(e.at);
            row.session_epoch += 1;
        }
        // Nothing of a password is in the view, but a change or a reset ends every session.
        UserEvent::PasswordChanged(e) => {
            row.session_epoch += 1;
            erase_if(row, e.password_hash.is_erased());
        }
        UserEvent::PasswordReset(e) => {
            row.session_epoch += 1;
            erase_if(row, e.password_hash.is_erased());
        }
        UserEvent::SessionsEnded(_) => row.session_epoch += 1,
        UserEvent::EmailVerified(_) => row.email_verified = true,
        // The new address was proven by the link mailed to it.
        UserEvent::EmailChanged(e) => {
            row.email_verified = true;
            match (e.email.known(), e.email_normalized.known()) {
                (Some(email), Some(normalized)) if !row.is_erased() => {
                    row.email = Some(email.as_str().to_owned());
                    row.email_normalized = Some(normalized.clone());
                }
                _ => row.erase(None),
            }
        }
        // The row's position still moves.
        UserEvent::PasswordRehashed(e) => erase_if(row, e.password_hash.is_erased()),
        // Every session ends with it.
        UserEvent::UserErased(e) => {
            row.session_epoch += 1;
            row.erase(Some(e.at));
        }
    }
}

/// An account's status, unless it is erased: an erasure is for good.
fn set_status(row: &mut UserRow, status: AccountStatus) {
    if !row.is_erased() {
        row.status = status.name().to_owned();
    }
}

/// A personal field read erased: the account's key is gone, its `UserErased` is in the store
/// (at this event's position or after it), and the row is erased from here on.
fn erase_if(row: &mut UserRow, erased: bool) {
    if erased {
        row.erase(None);
    }
}

/// Login events carry the running state: the view copies it, it never counts.
fn update_logins(row: &mut UserRow, event: &LoginEvent) {
    match event {
        LoginEvent::LoginSucceeded(e) => {
            row.last_login_at = Some(e.at);
            row.login_count = signed(e.login_count);
            row.failed_logins = 0;
            row.locked_until = None;
        }
        LoginEvent::LoginFailed(e) => {
            row.login_count = signed(e.login_count);
            row.failed_logins = i32::try_from(e.failed_in_a_row).unwrap_or(i32::MAX);
            row.locked_until = e.locked_until;
        }
        LoginEvent::LockoutLifted(e) => {
            row.login_count = signed(e.login_count);
            row.failed_logins = 0;
            row.locked_until = None;
        }
    }
}

/// A session event: a start creates the row, a refresh moves its token and idle limit, an end
/// closes it. Only the first end counts: a session ends once.
fn apply_to_session(
    sessions: &mut HashMap<Uuid, SessionRow>,
    event: &SessionEvent,
    change: &Change,
) -> Result<bool, String> {
    let position = signed(change.position);
    let id = *event.session_id().as_uuid();
    match event {
        SessionEvent::SessionStarted(started) => {
            insert_started(sessions, id, change, started, position)
        }
        SessionEvent::SessionRefreshed(refreshed) => {
            let Some(row) = session_row_after(sessions, id, change, position)? else {
                return Ok(false);
            };
            row.last_refreshed_at = Some(refreshed.rotated_at);
            row.idle_expires_at = refreshed.idle_expires_at;
            row.generation = signed(refreshed.generation);
            row.position = position;
            Ok(true)
        }
        SessionEvent::SessionEnded(ended) => {
            let Some(row) = session_row_after(sessions, id, change, position)?
                .filter(|row| row.ended_at.is_none())
            else {
                return Ok(false);
            };
            row.ended_at = Some(ended.ended_at);
            row.end_reason = Some(ended.reason.name().to_owned());
            row.position = position;
            Ok(true)
        }
    }
}

/// The sessions row an event after the start changes: `None` when the row is already past the
/// event, an error when the view has no such session.
fn session_row_after<'r>(
    sessions: &'r mut HashMap<Uuid, SessionRow>,
    id: Uuid,
    change: &Change,
    position: i64,
) -> Result<Option<&'r mut SessionRow>, String> {
    let Some(row) = sessions.get_mut(&id) else {
        return Err(format!(
            "an event for session {id} at global position {} but the view has no such session",
            change.position
        ));
    };
    Ok((row.position < position).then_some(row))
}

/// A start creates its session's row. One for a session the view already has is poison, unless
/// it lies at or below the row's position (it was applied before).
fn insert_started(
    sessions: &mut HashMap<Uuid, SessionRow>,
    id: Uuid,
    change: &Change,
    started: &SessionStarted,
    position: i64,
) -> Result<bool, String> {
    if let Some(existing) = sessions.get(&id) {
        if existing.position >= position {
            return Ok(false);
        }
        return Err(format!(
            "a second SessionStarted for session {id} at global position {}",
            change.position
        ));
    }
    sessions.insert(
        id,
        SessionRow {
            id,
            user_id: *started.user_id.as_uuid(),
            session_epoch: signed(started.session_epoch),
            started_at: started.started_at,
            last_refreshed_at: None,
            expires_at: started.expires_at,
            idle_expires_at: started.idle_expires_at,
            user_agent: started
                .user_agent
                .as_ref()
                .map(|agent| agent.as_str().to_owned()),
            generation: signed(started.generation),
            ended_at: None,
            end_reason: None,
            position,
        },
    );
    Ok(true)
}

/// Folds `changes` into `rows` and returns the rows that changed, or the index of the first
/// change that cannot be applied and why.
pub fn apply_all(rows: &mut Rows, changes: &[Change]) -> Result<Vec<RowId>, (usize, String)> {
    let mut changed = Vec::new();
    for (index, change) in changes.iter().enumerate() {
        if apply(rows, change).map_err(|reason| (index, reason))? {
            changed.push(change.row());
        }
    }
    changed.sort_unstable();
    changed.dedup();
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use identity::{
        Email, EmailChanged, EmailVerified, LockoutLifted, LoginFailed, LoginSucceeded,
        PasswordChanged, PasswordHash, PasswordRehashed, PasswordReset, Personal, RefreshNonce,
        Role, SessionEndReason, SessionEnded, SessionId, SessionRefreshed, SessionsEnded,
        UserAccount, UserActivated, UserAgent, UserDeactivated, UserErased, UserId,
    };

    use super::*;

    fn at(seconds: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + chrono::Duration::seconds(seconds)
    }

    fn id() -> Uuid {
        Uuid::from_u128(7)
    }

    fn session() -> Uuid {
        Uuid::from_u128(8)
    }

    fn user_event(position: u64, event: impl Into<UserEvent>) -> Change {
        Change {
            position,
            event: ProjectedEvent::User {
                user_id: id(),
                event: event.into(),
            },
        }
    }

    fn registered(position: u64) -> Change {
        user_event(
            position,
            UserRegistered {
                user_id: UserId::from_uuid(id()),
                email: Email::parse("Ann@Example.com").unwrap().into(),
                email_normalized: "ann@example.com".into(),
                password_hash: PasswordHash::parse("$argon2id$v=19$x").unwrap().into(),
                status: AccountStatus::Pending,
                roles: vec![Role::User, Role::Admin],
                registered_at: at(0),
            },
        )
    }

    fn login(position: u64, count: u64) -> Change {
        Change {
            position,
            event: ProjectedEvent::Login {
                user_id: id(),
                event: LoginSucceeded {
                    at: at(position as i64),
                    login_count: count,
                }
                .into(),
            },
        }
    }

    fn login_event(position: u64, event: impl Into<LoginEvent>) -> Change {
        Change {
            position,
            event: ProjectedEvent::Login {
                user_id: id(),
                event: event.into(),
            },
        }
    }

    fn email_changed(position: u64, email: &str) -> Change {
        let email = Email::parse(email).unwrap();
        user_event(
            position,
            EmailChanged {
                email_normalized: email.normalized().into(),
                email: email.into(),
                at: at(position as i64),
            },
        )
    }

    fn session_event(position: u64, event: impl Into<SessionEvent>) -> Change {
        Change {
            position,
            event: ProjectedEvent::Session(event.into()),
        }
    }

    fn started(position: u64) -> Change {
        session_event(
            position,
            SessionStarted {
                session_id: SessionId::from_uuid(session()),
                user_id: UserId::from_uuid(id()),
                session_epoch: 2,
                started_at: at(100),
                expires_at: at(10_000),
                idle_expires_at: at(1_000),
                user_agent: Some(UserAgent::new("curl/8.5")),
                generation: 0,
                nonce: RefreshNonce::from_bytes([1; RefreshNonce::LEN]),
            },
        )
    }

    fn refreshed(position: u64, generation: u64) -> Change {
        let rotated_at = at(100 + position as i64);
        session_event(
            position,
            SessionRefreshed {
                session_id: SessionId::from_uuid(session()),
                user_id: UserId::from_uuid(id()),
                session_epoch: 2,
                started_at: at(100),
                expires_at: at(10_000),
                idle_expires_at: rotated_at + chrono::Duration::seconds(900),
                user_agent: Some(UserAgent::new("curl/8.5")),
                generation,
                nonce: RefreshNonce::from_bytes([2; RefreshNonce::LEN]),
                rotated_at,
                previous_nonce: RefreshNonce::from_bytes([1; RefreshNonce::LEN]),
            },
        )
    }

    fn ended(position: u64, reason: SessionEndReason) -> Change {
        session_event(
            position,
            SessionEnded {
                session_id: SessionId::from_uuid(session()),
                user_id: UserId::from_uuid(id()),
                ended_at: at(position as i64),
                reason,
            },
        )
    }

    #[test]
    fn a_registration_creates_the_row_and_later_events_change_it() {
        let mut rows = Rows::default();
        let activated = user_event(20, UserActivated { at: at(5) });
        let changed = apply_all(&mut rows, &[registered(10), activated, login(30, 4)]).unwrap();
        assert_eq!(changed, vec![RowId::User(id())]);
        let row = &rows.users[&id()];
        assert_eq!(row.status, "active");
        assert_eq!(row.activated_at, Some(at(5)));
        assert_eq!(row.login_count, 4);
        assert_eq!(row.roles, ["user", "admin"]);
        assert_eq!(row.session_epoch, 0);
        assert_eq!(row.position, 30);
    }

    #[test]
    fn an_event_at_or_below_the_rows_position_is_not_applied_again() {
        let mut rows = Rows::default();
        apply_all(&mut rows, &[registered(10), login(30, 4), started(40)]).unwrap();
        assert_eq!(apply(&mut rows, &registered(10)), Ok(false));
        assert_eq!(apply(&mut rows, &login(20, 3)), Ok(false));
        assert_eq!(apply(&mut rows, &started(40)), Ok(false));
        assert_eq!(rows.users[&id()].login_count, 4);
    }

    #[test]
    fn an_event_for_a_user_the_view_does_not_have_cannot_be_applied() {
        let mut rows = Rows::default();
        let error = apply_all(&mut rows, &[login(30, 1)]).unwrap_err();
        assert_eq!(error.0, 0);
        assert!(error.1.contains("no such user"));
    }

    #[test]
    fn a_deactivation_a_password_change_and_an_end_of_all_sessions_move_the_session_epoch() {
        let mut rows = Rows::default();
        let hash = PasswordHash::parse("$argon2id$v=19$y").unwrap();
        let history = [
            registered(10),
            user_event(11, UserActivated { at: at(1) }),
            user_event(12, UserDeactivated { at: at(2) }),
            user_event(13, UserActivated { at: at(3) }),
            user_event(
                14,
                PasswordChanged {
                    password_hash: hash.clone().into(),
                    at: at(4),
                },
            ),
            user_event(
                15,
                PasswordRehashed {
                    password_hash: hash.into(),
                    at: at(5),
                },
            ),
            user_event(16, SessionsEnded { at: at(6) }),
        ];
        apply_all(&mut rows, &history).unwrap();
        assert_eq!(rows.users[&id()].session_epoch, 3);
        assert_eq!(rows.users[&id()].position, 16);
    }

    #[test]
    fn a_verification_marks_the_address_verified_and_changes_nothing_else() {
        let mut rows = Rows::default();
        apply_all(&mut rows, &[registered(10)]).unwrap();
        assert!(
            !rows.users[&id()].email_verified,
            "unverified at registration"
        );
        let before = rows.users[&id()].clone();
        let verified = user_event(11, EmailVerified { at: at(1) });
        assert_eq!(apply(&mut rows, &verified), Ok(true));
        assert_eq!(
            rows.users[&id()],
            UserRow {
                email_verified: true,
                position: 11,
                ..before
            }
        );
    }

    #[test]
    fn a_change_of_email_moves_the_row_to_the_new_address_verified() {
        let mut rows = Rows::default();
        // Never verified before: the change proves the new address.
        apply_all(
            &mut rows,
            &[registered(10), email_changed(11, "Bo@Example.ORG")],
        )
        .unwrap();
        let row = &rows.users[&id()];
        assert_eq!(
            (
                row.email.as_deref(),
                row.email_normalized.as_deref(),
                row.email_verified,
                row.session_epoch,
                row.position
            ),
            (Some("Bo@Example.ORG"), Some("bo@example.org"), true, 0, 11)
        );
    }

    #[test]
    fn a_password_reset_ends_every_session_as_a_password_change_does() {
        let mut rows = Rows::default();
        let reset = PasswordReset {
            password_hash: PasswordHash::parse("$argon2id$v=19$z").unwrap().into(),
            at: at(2),
        };
        apply_all(&mut rows, &[registered(10), user_event(12, reset)]).unwrap();
        assert_eq!(rows.users[&id()].session_epoch, 1);
        assert_eq!(rows.users[&id()].position, 12);
    }

    #[test]
    fn a_lifted_lockout_forgets_the_failures_and_keeps_the_logins() {
        let mut rows = Rows::default();
        let locked = LoginFailed {
            at: at(40),
            failed_in_a_row: 5,
            locked_until: Some(at(940)),
            login_count: 4,
        };
        let lifted = LockoutLifted {
            at: at(50),
            login_count: 4,
        };
        apply_all(
            &mut rows,
            &[registered(10), login(30, 4), login_event(40, locked)],
        )
        .unwrap();
        assert_eq!(
            (
                rows.users[&id()].failed_logins,
                rows.users[&id()].locked_until
            ),
            (5, Some(at(940)))
        );
        assert_eq!(apply(&mut rows, &login_event(50, lifted)), Ok(true));
        let row = &rows.users[&id()];
        assert_eq!((row.failed_logins, row.locked_until), (0, None));
        assert_eq!((row.login_count, row.last_login_at), (4, Some(at(30))));
        assert_eq!(row.position, 50);
    }

    #[test]
    fn the_address_its_verification_and_the_session_epoch_follow_the_domains_fold() {
        let hash = PasswordHash::parse("$argon2id$v=19$y").unwrap();
        let history = [
            registered(10),
            user_event(11, UserActivated { at: at(1) }),
            user_event(12, EmailVerified { at: at(2) }),
            email_changed(13, "second@example.com"),
            user_event(
                14,
                PasswordReset {
                    password_hash: hash.clone().into(),
                    at: at(4),
                },
            ),
            email_changed(15, "Third@Example.com"),
            user_event(
                16,
                PasswordChanged {
                    password_hash: hash.into(),
                    at: at(6),
                },
            ),
        ];
        let mut rows = Rows::default();
        let mut account = UserAccount::default();
        for change in &history {
            apply(&mut rows, change).unwrap();
            let ProjectedEvent::User { event, .. } = &change.event else {
                unreachable!("a user event");
            };
            account = identity::evolve(account, event);
            let (row, folded) = (&rows.users[&id()], account.account().unwrap());
            assert_eq!(
                (
                    row.email.as_deref(),
                    row.email_normalized.as_deref(),
                    row.email_verified,
                    row.session_epoch
                ),
                (
                    Some(folded.email.as_str()),
                    Some(folded.email_normalized.as_str()),
                    folded.email_verified,
                    i64::try_from(folded.session_epoch).unwrap()
                ),
                "after the event at {}",
                change.position
            );
        }
    }

    #[test]
    fn a_session_is_started_refreshed_and_ended_once() {
        let mut rows = Rows::default();
        let changed = apply_all(
            &mut rows,
            &[
                registered(10),
                started(20),
                refreshed(21, 1),
                refreshed(22, 2),
                ended(23, SessionEndReason::LoggedOut),
                ended(24, SessionEndReason::RefreshTokenReused),
            ],
        )
        .unwrap();
        assert_eq!(changed, vec![RowId::User(id()), RowId::Session(session())]);
        assert_eq!(
            rows.sessions[&session()],
            SessionRow {
                id: session(),
                user_id: id(),
                session_epoch: 2,
                started_at: at(100),
                last_refreshed_at: Some(at(122)),
                expires_at: at(10_000),
                idle_expires_at: at(1_022),
                user_agent: Some("curl/8.5".into()),
                generation: 2,
                ended_at: Some(at(23)),
                end_reason: Some("logged_out".into()),
                position: 23,
            }
        );
        // Session events leave the users row alone.
        assert_eq!(rows.users[&id()].position, 10);
    }

    #[test]
    fn a_session_event_before_its_start_or_a_second_start_cannot_be_applied() {
        let mut rows = Rows::default();
        let error = apply_all(&mut rows, &[refreshed(21, 1)]).unwrap_err();
        assert!(error.1.contains("no such session"), "{}", error.1);
        let error = apply_all(&mut rows, &[started(20), started(25)]).unwrap_err();
        assert_eq!(error.0, 1);
        assert!(error.1.contains("second SessionStarted"), "{}", error.1);
    }

    fn erased(position: u64) -> Change {
        user_event(
            position,
            UserErased {
                erased_by: UserId::from_uuid(id()),
                at: at(position as i64),
            },
        )
    }

    /// `change` as read once its account's key is gone: every personal field erased.
    fn read_after_the_erasure(change: &Change) -> Change {
        let mut change = change.clone();
        if let ProjectedEvent::User { event, .. } = &mut change.event {
            match event {
                UserEvent::UserRegistered(e) => {
                    e.email = Personal::Erased;
                    e.email_normalized = Personal::Erased;
                    e.password_hash = Personal::Erased;
                }
                UserEvent::PasswordChanged(PasswordChanged { password_hash, .. })
                | UserEvent::PasswordRehashed(PasswordRehashed { password_hash, .. })
                | UserEvent::PasswordReset(PasswordReset { password_hash, .. }) => {
                    *password_hash = Personal::Erased;
                }
                UserEvent::EmailChanged(e) => {
                    e.email = Personal::Erased;
                    e.email_normalized = Personal::Erased;
                }
                _ => {}
            }
        }
        change
    }

    /// An account's life up to its erasure, with a login decided before the erasure and
    /// appended after it, and an end of its session after it.
    fn a_life_then_its_erasure() -> Vec<Change> {
        let hash = PasswordHash::parse("$argon2id$v=19$y").unwrap();
        vec![
            registered(10),
            user_event(11, UserActivated { at: at(11) }),
            login(12, 1),
            started(13),
            email_changed(14, "Moved@Example.org"),
            user_event(
                16,
                PasswordChanged {
                    password_hash: hash.clone().into(),
                    at: at(16),
                },
            ),
            user_event(
                17,
                PasswordRehashed {
                    password_hash: hash.into(),
                    at: at(17),
                },
            ),
            user_event(18, UserDeactivated { at: at(18) }),
            refreshed(19, 1),
            erased(20),
            login(21, 2),
            user_event(22, UserActivated { at: at(22) }),
            ended(23, SessionEndReason::LoggedOut),
        ]
    }

    #[test]
    fn an_erasure_drops_the_address_keeps_every_other_fact_and_moves_past_every_session() {
        let mut rows = Rows::default();
        apply_all(&mut rows, &a_life_then_its_erasure()).unwrap();
        assert_eq!(
            rows.users[&id()],
            UserRow {
                id: id(),
                email: None,
                email_normalized: None,
                email_verified: true,
                status: "erased".into(),
                registered_at: at(0),
                activated_at: Some(at(22)),
                deactivated_at: Some(at(18)),
                last_login_at: Some(at(21)),
                login_count: 2,
                failed_logins: 0,
                locked_until: None,
                roles: vec!["user".into(), "admin".into()],
                // The password change, the deactivation and the erasure.
                session_epoch: 3,
                erased_at: Some(at(20)),
                position: 22,
            }
        );
        assert!(
            !rows.sessions.contains_key(&session()),
            "a session event after the erasure drops the row it finds"
        );
    }

    #[test]
    fn a_history_read_after_the_erasure_folds_into_the_row_the_live_worker_ends_with() {
        let life = a_life_then_its_erasure();
        let mut live = Rows::default();
        apply_all(&mut live, &life).unwrap();

        let read_erased: Vec<Change> = life.iter().map(read_after_the_erasure).collect();
        let mut rebuilt = Rows::default();
        apply_all(&mut rebuilt, &read_erased).unwrap();
        assert_eq!(rebuilt.users, live.users);
        assert!(
            rebuilt.sessions.is_empty(),
            "an erased account's session is never kept"
        );

        // A live worker that read the first events before the key was deleted, the rest after.
        for known in 0..life.len() {
            let mixed: Vec<Change> = life[..known]
                .iter()
                .cloned()
                .chain(read_erased[known..].iter().cloned())
                .collect();
            let mut rows = Rows::default();
            apply_all(&mut rows, &mixed).unwrap();
            assert_eq!(
                rows.users, live.users,
                "{known} events read before the erasure"
            );
        }
    }

    #[test]
    fn a_registration_read_erased_is_an_erased_row_whose_time_comes_with_its_erasure() {
        let mut rows = Rows::default();
        let registration = read_after_the_erasure(&registered(10));
        apply_all(
            &mut rows,
            &[registration, user_event(11, UserActivated { at: at(11) })],
        )
        .unwrap();
        let row = &rows.users[&id()];
        assert_eq!(
            (
                row.status.as_str(),
                row.email.as_deref(),
                row.email_normalized.as_deref(),
                row.activated_at,
                row.erased_at
            ),
            ("erased", None, None, Some(at(11)), None)
        );
        assert_eq!(apply(&mut rows, &started(12)), Ok(false), "no session kept");
        assert!(rows.sessions.is_empty());
        apply(&mut rows, &erased(20)).unwrap();
        assert_eq!(rows.users[&id()].erased_at, Some(at(20)));
        assert_eq!(rows.users[&id()].session_epoch, 1);
    }

    #[test]
    fn a_session_event_reads_its_accounts_row_too() {
        let change = started(20);
        assert_eq!(
            change.rows().collect::<Vec<_>>(),
            [RowId::Session(session()), RowId::User(id())]
        );
        assert_eq!(
            registered(10).rows().collect::<Vec<_>>(),
            [RowId::User(id())]
        );
        assert_eq!(erased(30).erases(), Some(id()));
        assert_eq!(registered(10).erases(), None);
    }
}
