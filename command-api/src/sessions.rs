//! The session commands without HTTP: start (with a login), refresh, log out, end one's own
//! session, end all of an account's, and whether a bearer token's session is still live.
//!
//! A session is the stream `session-<id>`, decided by the pure domain (`identity::session`);
//! every event carries the whole session, so each command reads the stream's last message, and
//! its cost does not grow with the number of refreshes (ADR 10). A refresh token is checked
//! before anything is decided: parsed without hashing, then authenticated with the nonce of the
//! generation it names (the current and previous ones are in the last message; an older one is
//! the stream's message at the position of that generation). A token that fails either check is
//! refused and nothing is appended, so knowing a session id (it is in every access token's
//! `sid`) is not enough to end a session as reused.
//!
//! Ending all of an account's sessions (a deactivation, a password change, an administrator)
//! appends nothing here: it moves the account's session epoch (ADR 11), and every check below
//! reads the account's stream too.

use anyhow::Context;
use chrono::{DateTime, Utc};
use identity::{
    Account, RefreshNonce, SessionAccount, SessionCommand, SessionDecision, SessionEndReason,
    SessionEvent, SessionId, SessionStarted, SessionState, UserAgent, UserCommand, UserId,
    decide_session, session_stream_name,
};
use message_store::{ExpectedVersion, GlobalPosition, StreamAppend, StreamName, StreamPosition};
use tokens::{IssuedToken, RefreshToken, random_nonce};
use uuid::Uuid;

use crate::service::{
    CommandError, Commands, Done, MAX_ATTEMPTS, lost_every_race, stored_event, versioned_message,
};

/// What a granted login or a refresh answers: a fresh access token in the session, the
/// session's current refresh token, and the position of the session's last event.
pub struct SessionTokens {
    pub session_id: SessionId,
    pub access: IssuedToken,
    pub refresh: RefreshToken,
    /// Seconds until the session can no longer be refreshed: the earlier of its idle and
    /// absolute limits.
    pub refresh_expires_in: u64,
    /// The global position of the last event the command wrote or, for a repeated answer, read.
    pub position: GlobalPosition,
}

/// A session stream as its last message left it.
struct ReadSession {
    stream: StreamName,
    state: SessionState,
    /// The stream's last position: `None` for an empty stream.
    version: Option<StreamPosition>,
    last_global: GlobalPosition,
}

impl ReadSession {
    fn expected(&self) -> ExpectedVersion {
        self.version
            .map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact)
    }
}

/// What ending one session came to.
enum Ending {
    /// Ended now, or already over (ended, or expired): nothing more to do. The global position
    /// of the `SessionEnded` appended, or, when nothing was, of the stream's last message: what
    /// a view must reach to show the session as it is.
    Done(GlobalPosition),
    /// No session of this id belongs to the account.
    NotTheirs,
}

impl Commands {
    /// The start of a session for a login about to be granted to `account`: a random id, a
    /// random nonce for generation 0, the account's session epoch. Appended by the caller with
    /// the login's own event, in one atomic append.
    pub(crate) fn start_session(
        &self,
        account: &Account,
        user_agent: Option<UserAgent>,
        now: DateTime<Utc>,
    ) -> Result<SessionStarted, CommandError> {
        let command = SessionCommand::Start {
            session_id: SessionId::from_uuid(Uuid::new_v4()),
            user_id: account.id,
            session_epoch: account.session_epoch,
            user_agent,
            nonce: new_nonce()?,
        };
        match decide_session(&SessionState::Unknown, command, now, &self.session_policy) {
            Ok(SessionDecision::Started(started)) => Ok(started),
            other => Err(anyhow::anyhow!("starting a session decided {other:?}").into()),
        }
    }

    /// The append of a new session's start: its stream must not exist yet.
    pub(crate) fn session_start_append(
        started: &SessionStarted,
    ) -> Result<StreamAppend, CommandError> {
        let event = SessionEvent::from(started.clone());
        Ok(StreamAppend::new(
            session_stream(started.session_id)?,
            ExpectedVersion::NoStream,
            vec![session_message(&event)],
        ))
    }

    /// The tokens of a session just started by a login, whose events were appended at
    /// `position`.
    pub(crate) fn started_session_tokens(
        &self,
        account: &Account,
        started: &SessionStarted,
        position: GlobalPosition,
    ) -> Result<SessionTokens, CommandError> {
        let usable_until = started.expires_at.min(started.idle_expires_at);
        self.session_tokens(
            account,
            started.session_id,
            (started.generation, started.nonce),
            usable_until,
            started.started_at,
            position,
        )
    }

    /// Exchanges a refresh token for a fresh access token and the session's next refresh token
    /// (rotation); the previous token again within the grace gets the current pair again.
    ///
    /// Every refusal is one error, [`CommandError::InvalidRefreshToken`], whatever the reason:
    /// a malformed or forged token, an unknown, ended or expired session, an account
    /// deactivated or moved to a later session epoch, or a reuse (which ends the session).
    pub async fn refresh(&self, presented: &str) -> Result<SessionTokens, CommandError> {
        let Ok(token) = RefreshToken::parse(presented) else {
            count_refresh("malformed");
            return Err(CommandError::InvalidRefreshToken);
        };
        let outcome = self.try_refresh(&token).await;
        count_refresh(match &outcome {
            Ok((outcome, _)) => outcome,
            Err(CommandError::InvalidRefreshToken) => "refused",
            Err(_) => "error",
        });
        outcome.map(|(_, tokens)| tokens)
    }

    /// [`Self::refresh`] of a well-formed token, with the outcome it is counted under.
    async fn try_refresh(
        &self,
        token: &RefreshToken,
    ) -> Result<(&'static str, SessionTokens), CommandError> {
        let session_id = SessionId::from_uuid(token.session());
        for _ in 0..MAX_ATTEMPTS {
            let read = self.read_session(session_id).await?;
            let Some(live) = read.state.live() else {
                return Err(CommandError::InvalidRefreshToken);
            };
            if !self.authenticates(token, &read).await? {
                return Err(CommandError::InvalidRefreshToken);
            }
            let loaded = self.load(live.user_id).await?;
            let Some(account) = loaded.account.account() else {
                return Err(CommandError::InvalidRefreshToken);
            };
            let now = self.clock.now();
            let command = SessionCommand::Refresh {
                presented_generation: token.generation(),
                new_nonce: new_nonce()?,
                account: SessionAccount::from(account),
            };
            let decision = decide_session(&read.state, command, now, &self.session_policy)
                .map_err(|_| CommandError::InvalidRefreshToken)?;
            match decision {
                SessionDecision::Rotated(refreshed) => {
                    let usable_until = refreshed.expires_at.min(refreshed.idle_expires_at);
                    let current = (refreshed.generation, refreshed.nonce);
                    let Some(position) = self.append_session_event(&read, refreshed.into()).await?
                    else {
                        // Another refresh or an end got there first: decide again on it. The
                        // loser of two racing refreshes of one token finds it is the previous
                        // one now, and repeats the winner's answer.
                        continue;
                    };
                    let tokens = self.session_tokens(
                        account,
                        session_id,
                        current,
                        usable_until,
                        now,
                        position,
                    )?;
                    return Ok(("rotated", tokens));
                }
                SessionDecision::RepeatCurrent { generation, nonce } => {
                    let tokens = self.session_tokens(
                        account,
                        session_id,
                        (generation, nonce),
                        live.usable_until(),
                        now,
                        read.last_global,
                    )?;
                    return Ok(("repeated", tokens));
                }
                SessionDecision::ReuseDetected(ended) => {
                    if self
                        .append_session_event(&read, ended.into())
                        .await?
                        .is_none()
                    {
                        continue;
                    }
                    metrics::counter!("refresh_token_reuses_total").increment(1);
                    return Err(CommandError::InvalidRefreshToken);
                }
                other => {
                    return Err(anyhow::anyhow!("a refresh decided {other:?}").into());
                }
            }
        }
        Err(lost_every_race("refreshing a session"))
    }

    /// Ends the session of a refresh token (a logout by a client whose access token expired),
    /// and answers the position a view must reach to show it over. A session already over is
    /// fine: logging out twice succeeds twice, with the same position. A token that does not
    /// authenticate is [`CommandError::InvalidRefreshToken`].
    pub async fn log_out_with_refresh_token(
        &self,
        presented: &str,
    ) -> Result<GlobalPosition, CommandError> {
        let token =
            RefreshToken::parse(presented).map_err(|_| CommandError::InvalidRefreshToken)?;
        let session_id = SessionId::from_uuid(token.session());
        let read = self.read_session(session_id).await?;
        if !self.authenticates(&token, &read).await? {
            return Err(CommandError::InvalidRefreshToken);
        }
        let Some(owner) = owner_of(&read.state) else {
            return Err(CommandError::InvalidRefreshToken);
        };
        match self
            .end_session(session_id, owner, SessionEndReason::LoggedOut)
            .await?
        {
            Ending::Done(position) => Ok(position),
            // A session's owner never changes: the stream read above is theirs.
            Ending::NotTheirs => Err(CommandError::InvalidRefreshToken),
        }
    }

    /// Ends the session of a verified access token (`sid`) of `user`, and answers the position
    /// a view must reach to show it over. A session already over is fine: logging out twice
    /// succeeds twice, with the same position.
    pub async fn log_out(
        &self,
        user: UserId,
        session: SessionId,
    ) -> Result<GlobalPosition, CommandError> {
        match self
            .end_session(session, user, SessionEndReason::LoggedOut)
            .await?
        {
            Ending::Done(position) => Ok(position),
            // A verified token's session is the user's; if it is not found, there is nothing
            // to end, and nothing for a view to wait for.
            Ending::NotTheirs => Ok(0),
        }
    }

    /// Ends one of `user`'s own sessions, and answers the position a view must reach to show
    /// it over. Another person's session, or an unknown one, is
    /// [`CommandError::SessionNotFound`], alike, so that nobody learns which ids exist.
    pub async fn end_own_session(
        &self,
        user: UserId,
        session: SessionId,
    ) -> Result<GlobalPosition, CommandError> {
        match self
            .end_session(session, user, SessionEndReason::EndedByOwner)
            .await?
        {
            Ending::Done(position) => Ok(position),
            Ending::NotTheirs => Err(CommandError::SessionNotFound),
        }
    }

    /// Ends every session of the account at once (an administrator's decision): one event in
    /// the account's stream, which moves its session epoch, however many sessions it has.
    pub async fn end_all_sessions(&self, id: UserId) -> Result<Done, CommandError> {
        self.update(id, || UserCommand::EndAllSessions).await
    }

    /// Whether the session `session` of a verified access token of `user` is live: started by
    /// `user`, not ended, not expired, and not ended by the account (deactivated, or moved to a
    /// later session epoch). Read in the store, never in a view (ADR 11): an access token of a
    /// session that has ended changes nothing.
    pub async fn session_is_live(
        &self,
        user: UserId,
        session: SessionId,
    ) -> Result<bool, CommandError> {
        let read = self.read_session(session).await?;
        let Some(live) = read.state.live() else {
            return Ok(false);
        };
        if live.user_id != user || live.is_expired_at(self.clock.now()) {
            return Ok(false);
        }
        let loaded = self.load(user).await?;
        Ok(loaded
            .account
            .account()
            .is_some_and(|account| !live.is_ended_by(SessionAccount::from(account))))
    }

    /// Ends `session` if it is `user`'s; again when another writer got there first.
    async fn end_session(
        &self,
        session: SessionId,
        user: UserId,
        reason: SessionEndReason,
    ) -> Result<Ending, CommandError> {
        for _ in 0..MAX_ATTEMPTS {
            let read = self.read_session(session).await?;
            if owner_of(&read.state) != Some(user) {
                return Ok(Ending::NotTheirs);
            }
            let command = SessionCommand::End { reason };
            let now = self.clock.now();
            let decision = decide_session(&read.state, command, now, &self.session_policy)
                .context("ending a session was refused")?;
            let Some(event) = decision.into_event() else {
                return Ok(Ending::Done(read.last_global));
            };
            if let Some(position) = self.append_session_event(&read, event).await? {
                return Ok(Ending::Done(position));
            }
        }
        Err(lost_every_race("ending a session"))
    }

    /// Whether `token`'s secret is the one derived from its generation's nonce. Costs one HMAC,
    /// and one more read when the generation is older than the last message's two.
    async fn authenticates(
        &self,
        token: &RefreshToken,
        read: &ReadSession,
    ) -> Result<bool, CommandError> {
        let Some(nonce) = self.nonce_of(token.generation(), read).await? else {
            return Ok(false);
        };
        Ok(token.authenticates_with(&self.refresh_key, nonce.as_bytes()))
    }

    /// The nonce generation `generation` of the session was issued with, if it was issued:
    /// from the last message for the current and the previous generation, else from the
    /// message that issued it, the stream's message at the position of that generation.
    async fn nonce_of(
        &self,
        generation: u64,
        read: &ReadSession,
    ) -> Result<Option<RefreshNonce>, CommandError> {
        if let Some(live) = read.state.live() {
            if let Some(nonce) = live.nonce_of(generation) {
                return Ok(Some(nonce));
            }
            if generation > live.generation {
                return Ok(None);
            }
        }
        // Every generation issued has its message before the last one (an ended session's last
        // message is its end); nothing is read for a generation beyond the stream.
        match read.version {
            Some(last) if generation < last => {}
            _ => return Ok(None),
        }
        let messages = self.store.read_stream(&read.stream, generation, 1).await?;
        let Some(message) = messages.first().filter(|m| m.position == generation) else {
            return Ok(None);
        };
        let event = stored_event(
            message,
            SessionEvent::from_stored,
            "reading a session event",
        )?;
        Ok(match event {
            SessionEvent::SessionStarted(started) if started.generation == generation => {
                Some(started.nonce)
            }
            SessionEvent::SessionRefreshed(refreshed) if refreshed.generation == generation => {
                Some(refreshed.nonce)
            }
            _ => None,
        })
    }

    /// The session's state from its stream's last message.
    async fn read_session(&self, session: SessionId) -> Result<ReadSession, CommandError> {
        let stream = session_stream(session)?;
        let last = self.store.last_message(&stream).await?;
        let Some(last) = last else {
            return Ok(ReadSession {
                stream,
                state: SessionState::Unknown,
                version: None,
                last_global: 0,
            });
        };
        let event = stored_event(&last, SessionEvent::from_stored, "reading a session event")?;
        Ok(ReadSession {
            stream,
            state: SessionState::from_last(Some(&event)),
            version: Some(last.position),
            last_global: last.global_position,
        })
    }

    /// Appends `event` at the version `read` found: its position, or `None` when another
    /// writer got there first.
    async fn append_session_event(
        &self,
        read: &ReadSession,
        event: SessionEvent,
    ) -> Result<Option<GlobalPosition>, CommandError> {
        let append = StreamAppend::new(
            read.stream.clone(),
            read.expected(),
            vec![session_message(&event)],
        );
        self.append_if_current(vec![append], "appending a session event")
            .await
    }

    /// A fresh access token of `account` in `session`, and the refresh token of `current`
    /// (generation and nonce), usable until `usable_until`.
    fn session_tokens(
        &self,
        account: &Account,
        session: SessionId,
        current: (u64, RefreshNonce),
        usable_until: DateTime<Utc>,
        now: DateTime<Utc>,
        position: GlobalPosition,
    ) -> Result<SessionTokens, CommandError> {
        let roles = account.roles.iter().map(|role| role.name().to_owned());
        let access = self
            .issuer
            .issue(
                *account.id.as_uuid(),
                *session.as_uuid(),
                roles.collect(),
                account.email_verified,
                now,
            )
            .context("issuing an access token")?;
        let (generation, nonce) = current;
        let refresh = RefreshToken::issue(
            &self.refresh_key,
            *session.as_uuid(),
            generation,
            nonce.as_bytes(),
        )
        .context("deriving a refresh token")?;
        let refresh_expires_in = u64::try_from((usable_until - now).num_seconds()).unwrap_or(0);
        Ok(SessionTokens {
            session_id: session,
            access,
            refresh,
            refresh_expires_in,
            position,
        })
    }
}

/// Whose session it is, if it exists.
fn owner_of(state: &SessionState) -> Option<UserId> {
    match state {
        SessionState::Unknown => None,
        SessionState::Live(live) => Some(live.user_id),
        SessionState::Ended(ended) => Some(ended.user_id),
    }
}

/// A generation's nonce, from the operating system's random source.
fn new_nonce() -> Result<RefreshNonce, CommandError> {
    let bytes = random_nonce().context("drawing a refresh nonce")?;
    Ok(RefreshNonce::from_bytes(bytes))
}

fn session_message(event: &SessionEvent) -> message_store::NewMessage {
    versioned_message(event.event_type(), event.to_json(), event.version())
}

/// `session-<id>`.
fn session_stream(id: SessionId) -> anyhow::Result<StreamName> {
    Ok(StreamName::parse(session_stream_name(id))?)
}

fn count_refresh(outcome: &'static str) {
    metrics::counter!("refreshes_total", "outcome" => outcome).increment(1);
}
