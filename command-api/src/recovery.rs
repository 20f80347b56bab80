//! The recovery commands without HTTP (ADR 12): registration in each mode with its verification
//! mail, verifying an address, resetting a forgotten password, and changing the email.
//!
//! A mail is never sent from here: a command appends the request's event to the account's
//! recovery stream (`userRecovery-<id>`), and the mailer, a consumer of the store in the
//! aggregator process, writes and sends the mail. The link's token is derived by both with the
//! mail token key from the request's nonce; the store holds the nonce only.
//!
//! Confirming a link reads the recovery stream's last message, authenticates the token against
//! the pending request's nonce, and appends the consumption in the same atomic append as its
//! effect, each stream at the version read: a link is used once, or not at all. Every token
//! that does not confirm (malformed, forged, used, replaced, expired, of an account that can no
//! longer use it) is one error, [`CommandError::InvalidLink`].
//!
//! `POST /password-reset` and a `verify`-mode registration answer alike for a known and an
//! unknown address: the same answer, `mail.answer_after_ms` after the request began, whatever
//! was done meanwhile (the work a known address costs is done within that delay).

use std::time::Instant;

use chrono::{DateTime, Utc};
use identity::{
    Email, Password, RecoveryCommand, RecoveryCompleted, RecoveryDecision, RecoveryEvent,
    RecoveryKind, RecoveryNonce, RecoveryState, Role, UserAccount, UserCommand, UserId, decide,
    decide_recovery, recovery_stream_name,
};
use message_store::{ExpectedVersion, GlobalPosition, StreamAppend, StreamName, StreamPosition};
use platform::FieldError;
use tokens::{LinkToken, random_nonce};
use uuid::Uuid;

use crate::reservation::{EmailReleased, EmailReserved, Reservation, email_stream};
use crate::service::{
    CommandError, Commands, Done, Loaded, MAX_ATTEMPTS, expected, login_message, login_stream,
    lost_every_race, stored_event, user_messages, user_stream, versioned_message,
};
use crate::settings::RegistrationMode;

/// What `POST /users` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignUp {
    /// `open` and `approval` modes: the account exists (201).
    Registered(Done),
    /// `verify` mode, for a new and a taken address alike (202): `id` is the account's if the
    /// registration created one.
    Accepted { id: UserId },
}

/// A recovery stream as its last message left it.
struct ReadRecovery {
    stream: StreamName,
    state: RecoveryState,
    version: Option<StreamPosition>,
}

impl ReadRecovery {
    fn append(&self, event: &RecoveryEvent) -> StreamAppend {
        StreamAppend::new(
            self.stream.clone(),
            expected(self.version),
            vec![recovery_message(event)],
        )
    }
}

/// A link confirmed against the recovery stream: the consumption to append, and what the
/// account's command is decided on.
struct Confirmed {
    recovery: ReadRecovery,
    completed: RecoveryCompleted,
    loaded: Loaded,
}

impl Commands {
    /// `POST /users` in the configured mode. Every mode records a verification mail for the new
    /// account, in the registration's own append.
    pub async fn sign_up(
        &self,
        email: &str,
        password: String,
        id: Option<Uuid>,
    ) -> Result<SignUp, CommandError> {
        let (email, password) = self.registration_fields(email, password)?;
        let id = UserId::from_uuid(id.unwrap_or_else(Uuid::now_v7));
        let status = self.registration_mode.initial_status();
        if self.registration_mode != RegistrationMode::Verify {
            let done = self
                .register_valid(id, &email, password, vec![Role::User], status, |id, now| {
                    self.first_verification(id, &email, now)
                })
                .await?;
            return Ok(SignUp::Registered(done));
        }
        let started = Instant::now();
        let registered = self
            .register_valid(id, &email, password, vec![Role::User], status, |id, now| {
                self.first_verification(id, &email, now)
            })
            .await;
        let answer = match registered {
            Ok(_) => Ok(SignUp::Accepted { id }),
            Err(CommandError::EmailTaken) => self
                .notice_taken_address(&email)
                .await
                .map(|()| SignUp::Accepted { id }),
            Err(error) => Err(error),
        };
        tokio::time::sleep_until((started + self.answer_after).into()).await;
        answer
    }

    /// The request of the verification mail of a new account, for its registration's append:
    /// its recovery stream is new too.
    fn first_verification(
        &self,
        id: UserId,
        email: &Email,
        now: DateTime<Utc>,
    ) -> Result<Vec<StreamAppend>, CommandError> {
        let command = RecoveryCommand::Request {
            kind: RecoveryKind::VerifyEmail,
            to: email.clone(),
            new_email: None,
            nonce: new_nonce()?,
        };
        let decided = decide_recovery(
            &RecoveryState::default(),
            command,
            now,
            &self.recovery_policy,
        );
        let Some(event) = decided.map_err(refused)?.into_event() else {
            return Ok(vec![]);
        };
        Ok(vec![StreamAppend::new(
            recovery_stream(id)?,
            ExpectedVersion::NoStream,
            vec![recovery_message(&event)],
        )])
    }

    /// A `verify`-mode registration of a taken address: its owner is told someone tried, or,
    /// if their own account still waits for its verification, gets a new link instead (they
    /// may be registering again because the first mail was lost).
    async fn notice_taken_address(&self, email: &Email) -> Result<(), CommandError> {
        let Some(holder) = self.find_user(email).await? else {
            return Ok(());
        };
        let loaded = self.load(holder).await?;
        let Some(account) = loaded.account.account() else {
            return Ok(());
        };
        let awaiting_verification = !account.email_verified && !account.is_active();
        let to = account.email.clone();
        self.record_request(holder, || {
            Ok(if awaiting_verification {
                RecoveryCommand::Request {
                    kind: RecoveryKind::VerifyEmail,
                    to: to.clone(),
                    new_email: None,
                    nonce: new_nonce()?,
                }
            } else {
                RecoveryCommand::NoticeRegistrationAttempt { to: to.clone() }
            })
        })
        .await
        .map(|_| ())
    }

    /// `POST /password-reset`: a known, active account gets a mail with a link; every address
    /// gets the same answer after `mail.answer_after_ms`.
    pub async fn request_password_reset(&self, email: &str) -> Result<(), CommandError> {
        let email = Email::parse(email)
            .map_err(|error| CommandError::Validation(vec![FieldError::new("email", error)]))?;
        let started = Instant::now();
        let requested = self.mail_reset_link(&email).await;
        tokio::time::sleep_until((started + self.answer_after).into()).await;
        requested
    }

    async fn mail_reset_link(&self, email: &Email) -> Result<(), CommandError> {
        let Some(id) = self.find_user(email).await? else {
            return Ok(());
        };
        let loaded = self.load(id).await?;
        let Some(account) = loaded.account.account().filter(|a| a.is_active()) else {
            return Ok(());
        };
        let to = account.email.clone();
        self.record_request(id, || {
            Ok(RecoveryCommand::Request {
                kind: RecoveryKind::ResetPassword,
                to: to.clone(),
                new_email: None,
                nonce: new_nonce()?,
            })
        })
        .await
        .map(|_| ())
    }

    /// `POST /users/me/email`: after the current password is proven (a wrong one counts toward
    /// the lockout, as in a password change), a link to the new address and a notice to the
    /// current one. Whether the new address is free is decided when the link is confirmed.
    pub async fn request_email_change(
        &self,
        id: UserId,
        new_email: &str,
        password: String,
    ) -> Result<Done, CommandError> {
        let new_email = Email::parse(new_email)
            .map_err(|error| CommandError::Validation(vec![FieldError::new("email", error)]))?;
        let loaded = self.load(id).await?;
        let Some(account) = loaded.account.account() else {
            return Err(CommandError::NotFound);
        };
        if new_email.normalized() == account.email_normalized {
            return Err(CommandError::Validation(vec![FieldError::new(
                "email",
                "is the account's address already",
            )]));
        }
        self.prove_password(id, &loaded.account, password).await?;
        if !account.is_active() {
            return Err(CommandError::AccountInactive);
        }
        let to = account.email.clone();
        let position = self
            .record_request(id, || {
                Ok(RecoveryCommand::Request {
                    kind: RecoveryKind::ChangeEmail,
                    to: to.clone(),
                    new_email: Some(new_email.clone()),
                    nonce: new_nonce()?,
                })
            })
            .await?;
        Ok(Done {
            id,
            position: position.unwrap_or(loaded.last_global),
        })
    }

    /// `POST /users/verify-email`: the address is verified; in `verify` mode a pending account
    /// becomes active with it.
    pub async fn verify_email(&self, token: &str) -> Result<Done, CommandError> {
        let token = parse_link(token, RecoveryKind::VerifyEmail)?;
        let activate_pending = self.registration_mode == RegistrationMode::Verify;
        for _ in 0..MAX_ATTEMPTS {
            let confirmed = self.confirm(&token, RecoveryKind::VerifyEmail).await?;
            let command = UserCommand::VerifyEmail { activate_pending };
            let events = decide(&confirmed.loaded.account, command, self.clock.now())
                .map_err(|_| CommandError::InvalidLink)?;
            let mut appends = self
                .administrators_append(&confirmed.loaded.account, &events)
                .await?;
            // Verified already and nothing to activate: the link is used all the same.
            if !events.is_empty() {
                appends.push(self.user_append(&confirmed.loaded, &events)?);
            }
            appends.push(
                confirmed
                    .recovery
                    .append(&confirmed.completed.clone().into()),
            );
            if let Some(done) = self.append_confirmed(&confirmed, appends).await? {
                return Ok(done);
            }
        }
        Err(lost_every_race("verifying an email"))
    }

    /// `POST /password-reset/confirm`: the new password replaces the old one, every session of
    /// the account ends (a new session epoch) and a lockout is lifted.
    pub async fn reset_password(
        &self,
        token: &str,
        password: String,
    ) -> Result<Done, CommandError> {
        let token = parse_link(token, RecoveryKind::ResetPassword)?;
        let password = Password::new(password, &self.password_policy)
            .map_err(|error| CommandError::Validation(vec![FieldError::new("password", error)]))?;
        // Authenticated before the hash, so that a forged link costs no hashing.
        self.confirm(&token, RecoveryKind::ResetPassword).await?;
        let new_password_hash = self.hasher.hash(password).await?;
        for _ in 0..MAX_ATTEMPTS {
            let confirmed = self.confirm(&token, RecoveryKind::ResetPassword).await?;
            let id = UserId::from_uuid(token.account());
            let command = UserCommand::ResetPassword {
                new_password_hash: new_password_hash.clone(),
            };
            let now = self.clock.now();
            let events = decide(&confirmed.loaded.account, command, now)
                .map_err(|_| CommandError::InvalidLink)?;
            let mut appends = vec![self.user_append(&confirmed.loaded, &events)?];
            appends.push(
                confirmed
                    .recovery
                    .append(&confirmed.completed.clone().into()),
            );
            appends.extend(self.lockout_lift(id, now).await?);
            if let Some(done) = self.append_confirmed(&confirmed, appends).await? {
                return Ok(done);
            }
        }
        Err(lost_every_race("resetting a password"))
    }

    /// `POST /email-change/confirm`: the account moves to the new address, whose reservation it
    /// takes while the old one is released, in one append with the account's event. A
    /// registration racing for the new address and this confirmation cannot both win: each
    /// appends to the reservation stream at the version it read.
    pub async fn confirm_email_change(&self, token: &str) -> Result<Done, CommandError> {
        let token = parse_link(token, RecoveryKind::ChangeEmail)?;
        for _ in 0..MAX_ATTEMPTS {
            let confirmed = self.confirm(&token, RecoveryKind::ChangeEmail).await?;
            let id = UserId::from_uuid(token.account());
            let (Some(account), Some(new_email)) = (
                confirmed.loaded.account.account(),
                confirmed.completed.new_email.clone(),
            ) else {
                return Err(CommandError::InvalidLink);
            };
            let moving_out = self.reservation(&account.email).await?;
            let moving_in = match self.reservation(&new_email).await? {
                Reservation::Free { expected } => expected,
                Reservation::HeldBy { .. } => return Err(CommandError::EmailTaken),
            };
            let command = UserCommand::ChangeEmail {
                new_email: new_email.clone(),
            };
            let events = decide(&confirmed.loaded.account, command, self.clock.now())
                .map_err(|_| CommandError::InvalidLink)?;
            let appends = vec![
                StreamAppend::new(
                    email_stream(&account.email)?,
                    moving_out.expected(),
                    vec![EmailReleased { user_id: id }.to_message()],
                ),
                StreamAppend::new(
                    email_stream(&new_email)?,
                    moving_in,
                    vec![EmailReserved { user_id: id }.to_message()],
                ),
                confirmed
                    .recovery
                    .append(&confirmed.completed.clone().into()),
                self.user_append(&confirmed.loaded, &events)?,
            ];
            if let Some(done) = self.append_confirmed(&confirmed, appends).await? {
                return Ok(done);
            }
        }
        Err(lost_every_race("changing an email"))
    }

    /// Reads the recovery stream of the token's account and confirms the token against its
    /// pending request of `kind`; then loads the account.
    async fn confirm(
        &self,
        token: &LinkToken,
        kind: RecoveryKind,
    ) -> Result<Confirmed, CommandError> {
        let id = UserId::from_uuid(token.account());
        let recovery = self.read_recovery(id).await?;
        let pending = recovery
            .state
            .pending(kind)
            .ok_or(CommandError::InvalidLink)?;
        if !token.authenticates_with(&self.mail_key, pending.nonce.as_bytes()) {
            return Err(CommandError::InvalidLink);
        }
        let command = RecoveryCommand::Complete {
            kind,
            nonce: pending.nonce,
        };
        let decision = decide_recovery(
            &recovery.state,
            command,
            self.clock.now(),
            &self.recovery_policy,
        )
        .map_err(|_| CommandError::InvalidLink)?;
        let RecoveryDecision::Completed(completed) = decision else {
            return Err(lost_every_race("completing a recovery request"));
        };
        let loaded = self.load(id).await?;
        if loaded.account.account().is_none() {
            return Err(CommandError::InvalidLink);
        }
        Ok(Confirmed {
            recovery,
            completed,
            loaded,
        })
    }

    /// Appends a confirmation's effect: the account's last position, or `None` when another
    /// writer got to one of the streams first and the confirmation must be decided again.
    async fn append_confirmed(
        &self,
        confirmed: &Confirmed,
        appends: Vec<StreamAppend>,
    ) -> Result<Option<Done>, CommandError> {
        let id = match confirmed.loaded.account.account() {
            Some(account) => account.id,
            None => return Err(CommandError::InvalidLink),
        };
        let position = self
            .append_if_current(appends, "appending a confirmed recovery")
            .await?;
        Ok(position.map(|position| Done { id, position }))
    }

    /// The account's events at the version they were decided on.
    fn user_append(
        &self,
        loaded: &Loaded,
        events: &[identity::UserEvent],
    ) -> Result<StreamAppend, CommandError> {
        let Some(account) = loaded.account.account() else {
            return Err(CommandError::InvalidLink);
        };
        Ok(StreamAppend::new(
            user_stream(account.id)?,
            expected(loaded.version),
            user_messages(events),
        ))
    }

    /// The lifting of a lockout that a reset brings, at the login stream's version, if there is
    /// anything to lift.
    async fn lockout_lift(
        &self,
        id: UserId,
        now: DateTime<Utc>,
    ) -> Result<Option<StreamAppend>, CommandError> {
        let stream = login_stream(id)?;
        let (state, version) = self.login_state(&stream).await?;
        let Some(lifted) = state.lift_lockout(now) else {
            return Ok(None);
        };
        Ok(Some(StreamAppend::new(
            stream,
            expected(version),
            vec![login_message(&lifted.into())],
        )))
    }

    /// Decides `command` on the account's recovery stream and appends its event, again when
    /// another request got there first: the event's position, or `None` when the account's
    /// hourly limit held the mail back (the caller answers the same either way).
    async fn record_request(
        &self,
        id: UserId,
        command: impl Fn() -> Result<RecoveryCommand, CommandError>,
    ) -> Result<Option<GlobalPosition>, CommandError> {
        for _ in 0..MAX_ATTEMPTS {
            let recovery = self.read_recovery(id).await?;
            let decision = decide_recovery(
                &recovery.state,
                command()?,
                self.clock.now(),
                &self.recovery_policy,
            )
            .map_err(refused)?;
            let Some(event) = decision.into_event() else {
                count_mail_request("over_limit");
                return Ok(None);
            };
            let appended = self
                .append_if_current(
                    vec![recovery.append(&event)],
                    "appending a recovery request",
                )
                .await?;
            if let Some(position) = appended {
                count_mail_request(event.event_type());
                return Ok(Some(position));
            }
        }
        Err(lost_every_race("recording a recovery request"))
    }

    async fn read_recovery(&self, id: UserId) -> Result<ReadRecovery, CommandError> {
        let stream = recovery_stream(id)?;
        let Some(last) = self.store.last_message(&stream).await? else {
            return Ok(ReadRecovery {
                stream,
                state: RecoveryState::default(),
                version: None,
            });
        };
        let event = stored_event(
            &last,
            RecoveryEvent::from_stored,
            "reading a recovery event",
        )?;
        Ok(ReadRecovery {
            stream,
            state: RecoveryState::from_last(Some(&event)),
            version: Some(last.position),
        })
    }

    /// Proves the current password as a password change does.
    async fn prove_password(
        &self,
        id: UserId,
        account: &UserAccount,
        password: String,
    ) -> Result<(), CommandError> {
        let password =
            Password::for_verification(password).map_err(|_| CommandError::InvalidCredentials)?;
        let stored = account
            .account()
            .map(|account| account.password_hash.clone());
        let matches = self.hasher.verify(password, stored).await?.matches;
        self.confirm_proof(id, account, matches).await
    }
}

/// A presented link token of `kind`, or the one refusal every bad link gets.
fn parse_link(text: &str, kind: RecoveryKind) -> Result<LinkToken, CommandError> {
    LinkToken::parse(text, &[kind.name()]).map_err(|_| CommandError::InvalidLink)
}

fn new_nonce() -> Result<RecoveryNonce, CommandError> {
    let bytes = random_nonce().map_err(|error| CommandError::Internal(error.into()))?;
    Ok(RecoveryNonce::from_bytes(bytes))
}

/// A refusal of a request the service itself made wrongly (a change without its address).
fn refused(refusal: identity::RecoveryRefusal) -> CommandError {
    CommandError::Internal(anyhow::anyhow!("a recovery request was refused: {refusal}"))
}

fn recovery_stream(id: UserId) -> anyhow::Result<StreamName> {
    Ok(StreamName::parse(recovery_stream_name(id))?)
}

fn recovery_message(event: &RecoveryEvent) -> message_store::NewMessage {
    versioned_message(event.event_type(), event.to_json(), event.version())
}

/// Counts the mails asked for, by the event recorded (`RecoveryRequested`,
/// `RegistrationAttempted`) or `over_limit`.
fn count_mail_request(outcome: &'static str) {
    metrics::counter!("recovery_mail_requests_total", "outcome" => outcome).increment(1);
}
