//! The recovery commands without HTTP (ADR 12): registration in each mode with its verification
//! mail, verifying an address, resetting a forgotten password, and changing the email.
//!
//! A mail is never sent from here: a command appends the request's event to the account's
//! recovery stream (`userRecovery-<id>`), and the mailer, a consumer of the store in the
//! aggregator process, writes and sends the mail. The link's token is derived by both with the
//! mail token key from the request's nonce; the store holds the nonce only.
//!
//! Confirming a link reads the recovery stream's last message, authenticates the token against
//! the pending request's nonce, and appends the request's use in the same atomic append as its
//! effect, each stream at the version read: a link is used once, or not at all. A reset or a
//! change of email is bound to the account's session epoch when it was asked for, so a password
//! change or reset, a deactivation, or every session ended since voids it. Every token that
//! does not confirm (malformed, forged, used, replaced, expired, voided) is one error,
//! [`CommandError::InvalidLink`].
//!
//! `POST /password-reset` and a `verify`-mode registration answer alike for a known and an
//! unknown address: the same answer, `mail.answer_after_ms` after the request began (for a
//! registration, after its password was hashed, which both do), whatever was done meanwhile.

use std::time::Instant;

use chrono::{DateTime, Utc};
use identity::{
    Account, AccountStatus, Email, Password, PasswordHash, RecoveryCommand, RecoveryCompleted,
    RecoveryDecision, RecoveryEvent, RecoveryKind, RecoveryNonce, RecoveryState, Register, Role,
    UserAccount, UserCommand, UserEvent, UserId, decide, decide_recovery, recovery_stream_name,
};
use message_store::{ExpectedVersion, GlobalPosition, StreamAppend, StreamName, StreamPosition};
use platform::FieldError;
use tokens::{LinkToken, random_nonce};
use uuid::Uuid;

use crate::personal::{WritingKey, erased_is, user_messages};
use crate::reservation::{EmailReleased, EmailReserved, Reservation};
use crate::service::{
    CommandError, Commands, Done, Loaded, MAX_ATTEMPTS, expected, login_message, login_stream,
    lost_every_race, stored_event, user_stream,
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
    fn append(&self, key: &WritingKey, event: RecoveryEvent) -> StreamAppend {
        StreamAppend::new(
            self.stream.clone(),
            expected(self.version),
            vec![key.recovery_message(&event)],
        )
    }
}

/// What confirming a link of each kind does to the account.
enum LinkEffect {
    /// The address is verified; `activate_pending` in the `verify` mode.
    Verify {
        activate_pending: bool,
    },
    /// The password is set to the one hashed here.
    Reset {
        new_password_hash: PasswordHash,
    },
    ChangeEmail,
}

impl LinkEffect {
    fn kind(&self) -> RecoveryKind {
        match self {
            Self::Verify { .. } => RecoveryKind::VerifyEmail,
            Self::Reset { .. } => RecoveryKind::ResetPassword,
            Self::ChangeEmail => RecoveryKind::ChangeEmail,
        }
    }
}

/// A link authenticated against its account's recovery stream and decided on: the request's
/// use, to append with the effect, and the account the effect is decided on.
struct Confirmed {
    recovery: ReadRecovery,
    completed: RecoveryCompleted,
    /// What the pending request carried for a verification (see
    /// `identity::PendingRecovery::password_hash`).
    password_hash: Option<PasswordHash>,
    loaded: Loaded,
    account: Account,
}

impl Confirmed {
    /// The append that uses the link.
    fn use_of_link(&self, key: &WritingKey) -> StreamAppend {
        self.recovery.append(key, self.completed.clone().into())
    }

    /// The account's `events` at the version they were decided on; none when there are none.
    fn account_append(
        &self,
        key: &WritingKey,
        events: &[UserEvent],
    ) -> Result<Option<StreamAppend>, CommandError> {
        if events.is_empty() {
            return Ok(None);
        }
        Ok(Some(StreamAppend::new(
            user_stream(self.account.id)?,
            expected(self.loaded.version),
            user_messages(Some(key), events)?,
        )))
    }
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
        let verification =
            |id, now, key: &WritingKey| self.first_verification(id, &email, now, key);
        if self.registration_mode != RegistrationMode::Verify {
            let registered =
                self.register_valid(id, &email, password, vec![Role::User], status, verification);
            return Ok(SignUp::Registered(registered.await?));
        }
        // Both a free and a taken address hash the password; the delay runs from there, so a
        // wait for a hashing thread cannot use it up.
        let password_hash = self.hasher.hash(password).await?;
        let started = Instant::now();
        let registration = Register {
            user_id: id,
            email: email.clone(),
            password_hash: password_hash.clone(),
            roles: vec![Role::User],
            initial_status: status,
        };
        let registered = match self.existing_registration(id, &email).await {
            Ok(Some(done)) => Ok(done),
            Ok(None) => self.register_new(registration, verification).await,
            Err(error) => Err(error),
        };
        let answer = match registered {
            // An id registered with another address is answered alike: otherwise registering
            // an address with an id and then the id with another address would tell whether
            // the first registration created an account.
            Ok(_) | Err(CommandError::IdTaken) => Ok(SignUp::Accepted { id }),
            Err(CommandError::EmailTaken) => self
                .notice_taken_address(&email, password_hash)
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
        key: &WritingKey,
    ) -> Result<Vec<StreamAppend>, CommandError> {
        let command = link_request(RecoveryKind::VerifyEmail, email, 0)?;
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
            vec![key.recovery_message(&event)],
        )])
    }

    /// A `verify`-mode registration of a taken address: its owner is told someone tried, or,
    /// if the account there still waits for its first verification, a new link goes out that
    /// gives the account this registration's password (the person registering again may be
    /// its owner, who lost the first mail; if they are not, they cannot read the link).
    async fn notice_taken_address(
        &self,
        email: &Email,
        password_hash: PasswordHash,
    ) -> Result<(), CommandError> {
        let Some(holder) = self.find_user(email).await? else {
            return Ok(());
        };
        let Some(account) = self.load(holder).await?.account.account().cloned() else {
            return Ok(());
        };
        let unverified = !account.email_verified && account.status == AccountStatus::Pending;
        self.record_request(holder, || {
            if !unverified {
                return Ok(RecoveryCommand::NoticeRegistrationAttempt {
                    to: account.email.clone(),
                });
            }
            let mut command = link_request(RecoveryKind::VerifyEmail, &account.email, 0)?;
            if let RecoveryCommand::Request {
                password_hash: with,
                ..
            } = &mut command
            {
                *with = Some(password_hash.clone());
            }
            Ok(command)
        })
        .await
        .map(|_| ())
        // Erased meanwhile: nobody is left to tell.
        .or_else(nothing_if_erased)
    }

    /// `POST /password-reset`: a known, active account gets a mail with a link; every address
    /// gets the same answer after `mail.answer_after_ms`.
    pub async fn request_password_reset(&self, email: &str) -> Result<(), CommandError> {
        let email = email_field(email)?;
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
        self.record_request(id, || {
            link_request(
                RecoveryKind::ResetPassword,
                &account.email,
                account.session_epoch,
            )
        })
        .await
        .map(|_| ())
        // Erased meanwhile: answered as for an address nobody has.
        .or_else(nothing_if_erased)
    }

    /// `POST /users/me/verify-email`: a new verification link for the caller's address, unless
    /// it is verified already.
    pub async fn request_verification(&self, id: UserId) -> Result<Done, CommandError> {
        let loaded = self.load(id).await?;
        let Some(account) = loaded.account.account() else {
            return Err(CommandError::NotFound);
        };
        let position = if account.email_verified {
            None
        } else {
            self.record_request(id, || {
                link_request(
                    RecoveryKind::VerifyEmail,
                    &account.email,
                    account.session_epoch,
                )
            })
            .await
            .map_err(erased_is(|| CommandError::NotFound))?
        };
        Ok(Done {
            id,
            position: position.unwrap_or(loaded.last_global),
        })
    }

    /// `POST /users/me/email`: after the current password is proven (a wrong one counts toward
    /// the lockout, as in a password change), a link to the new address and a notice to the
    /// current one. Whether the new address is free is decided when the link is confirmed, so
    /// asking tells nothing about it.
    pub async fn request_email_change(
        &self,
        id: UserId,
        new_email: &str,
        password: String,
    ) -> Result<Done, CommandError> {
        let new_email = email_field(new_email)?;
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
        self.prove_password(account, password).await?;
        if !account.is_active() {
            return Err(CommandError::AccountInactive);
        }
        let position = self
            .record_request(id, || {
                let mut command = link_request(
                    RecoveryKind::ChangeEmail,
                    &account.email,
                    account.session_epoch,
                )?;
                if let RecoveryCommand::Request {
                    new_email: moving_to,
                    ..
                } = &mut command
                {
                    *moving_to = Some(new_email.clone());
                }
                Ok(command)
            })
            .await
            .map_err(erased_is(|| CommandError::NotFound))?;
        Ok(Done {
            id,
            position: position.unwrap_or(loaded.last_global),
        })
    }

    /// `POST /users/verify-email`: the address is verified; in `verify` mode a pending account
    /// becomes active with it.
    pub async fn verify_email(&self, token: &str) -> Result<Done, CommandError> {
        let activate_pending = self.registration_mode == RegistrationMode::Verify;
        self.confirm_link(token, &LinkEffect::Verify { activate_pending })
            .await
    }

    /// `POST /password-reset/confirm`: the new password replaces the old one, every session of
    /// the account ends (a new session epoch) and a lockout is lifted.
    pub async fn reset_password(
        &self,
        token: &str,
        password: String,
    ) -> Result<Done, CommandError> {
        let password = Password::new(password, &self.password_policy)
            .map_err(|error| CommandError::Validation(vec![FieldError::new("password", error)]))?;
        // Authenticated before the hash, so that a forged link costs no hashing.
        let link = parse_link(token, RecoveryKind::ResetPassword)?;
        self.authenticate_link(&link, RecoveryKind::ResetPassword)
            .await?;
        let new_password_hash = self.hasher.hash(password).await?;
        self.confirm_link(token, &LinkEffect::Reset { new_password_hash })
            .await
    }

    /// `POST /email-change/confirm`: the account moves to the new address, whose reservation it
    /// takes while the old one is released, in one append with the account's event. A
    /// registration racing for the new address and this confirmation cannot both win: each
    /// appends to the reservation stream at the version it read.
    pub async fn confirm_email_change(&self, token: &str) -> Result<Done, CommandError> {
        self.confirm_link(token, &LinkEffect::ChangeEmail).await
    }

    /// The one way every link is confirmed: authenticated and decided on the streams as they
    /// are, then its effect and its use appended at the versions read; again when another
    /// writer got to one of them first.
    ///
    /// The account's key is read once the link is authenticated (a forged link reads none);
    /// an account erased meanwhile makes it an invalid link, as its erasure does.
    async fn confirm_link(&self, token: &str, effect: &LinkEffect) -> Result<Done, CommandError> {
        let kind = effect.kind();
        let link = parse_link(token, kind)?;
        let mut key = None;
        for _ in 0..MAX_ATTEMPTS {
            let confirmed = self.authenticate_link(&link, kind).await?;
            let key = match &mut key {
                Some(key) => key,
                None => {
                    let read = self.writing_key(confirmed.account.id).await;
                    key.insert(read.map_err(erased_is(|| CommandError::InvalidLink))?)
                }
            };
            let mut appends = self.effect_of(effect, &confirmed, key).await?;
            appends.push(confirmed.use_of_link(key));
            let appended = self
                .append_if_current(appends, "appending a confirmed link")
                .await?;
            if let Some(position) = appended {
                return Ok(Done {
                    id: confirmed.account.id,
                    position,
                });
            }
        }
        Err(lost_every_race("confirming a link"))
    }

    /// What a confirmed link does, as the appends that do it.
    async fn effect_of(
        &self,
        effect: &LinkEffect,
        confirmed: &Confirmed,
        key: &WritingKey,
    ) -> Result<Vec<StreamAppend>, CommandError> {
        match effect {
            LinkEffect::Verify { activate_pending } => {
                let command = UserCommand::VerifyEmail {
                    activate_pending: *activate_pending,
                    new_password_hash: confirmed.password_hash.clone(),
                };
                let events = self.decide_on(confirmed, command)?;
                let before = UserAccount::Registered(confirmed.account.clone());
                let mut appends = self.administrators_append(&before, &events).await?;
                appends.extend(confirmed.account_append(key, &events)?);
                Ok(appends)
            }
            LinkEffect::Reset { new_password_hash } => {
                let command = UserCommand::ResetPassword {
                    new_password_hash: new_password_hash.clone(),
                };
                let events = self.decide_on(confirmed, command)?;
                let mut appends: Vec<_> = confirmed
                    .account_append(key, &events)?
                    .into_iter()
                    .collect();
                appends.extend(self.lockout_lift(confirmed.account.id).await?);
                Ok(appends)
            }
            LinkEffect::ChangeEmail => self.moved_address(confirmed, key).await,
        }
    }

    /// A change of email's appends: the old address released and the new one reserved, each at
    /// the version read, with the account's event.
    async fn moved_address(
        &self,
        confirmed: &Confirmed,
        key: &WritingKey,
    ) -> Result<Vec<StreamAppend>, CommandError> {
        let id = confirmed.account.id;
        let old_email = &confirmed.account.email;
        let Some(new_email) = confirmed.completed.new_email.clone() else {
            return Err(CommandError::Internal(anyhow::anyhow!(
                "a change of email without its address"
            )));
        };
        let moving_out = self.reservation(old_email).await?;
        if moving_out.holder() != Some(id) {
            return Err(CommandError::Internal(anyhow::anyhow!(
                "the account's address is not reserved for it"
            )));
        }
        let moving_in = match self.reservation(&new_email).await? {
            Reservation::Free { expected } => expected,
            Reservation::HeldBy { .. } => return Err(CommandError::EmailTaken),
        };
        let command = UserCommand::ChangeEmail {
            new_email: new_email.clone(),
        };
        let events = self.decide_on(confirmed, command)?;
        let mut appends = vec![
            StreamAppend::new(
                self.email_stream(old_email)?,
                moving_out.expected(),
                vec![EmailReleased { user_id: id }.to_message()],
            ),
            StreamAppend::new(
                self.email_stream(&new_email)?,
                moving_in,
                vec![EmailReserved { user_id: id }.to_message()],
            ),
        ];
        appends.extend(confirmed.account_append(key, &events)?);
        Ok(appends)
    }

    /// Reads the recovery stream of the link's account, checks the token against its pending
    /// request of `kind`, and decides the request's use on the account as it is now.
    async fn authenticate_link(
        &self,
        link: &LinkToken,
        kind: RecoveryKind,
    ) -> Result<Confirmed, CommandError> {
        let id = UserId::from_uuid(link.account());
        let recovery = self.read_recovery(id).await?;
        let pending = recovery
            .state
            .pending(kind)
            .ok_or(CommandError::InvalidLink)?;
        if !link.authenticates_with(&self.mail_key, pending.nonce.as_bytes()) {
            return Err(CommandError::InvalidLink);
        }
        let loaded = self.load(id).await?;
        let account = loaded
            .account
            .account()
            .cloned()
            .ok_or(CommandError::InvalidLink)?;
        let command = RecoveryCommand::Complete {
            kind,
            nonce: pending.nonce,
            account_epoch: account.session_epoch,
        };
        let now = self.clock.now();
        let decision = decide_recovery(&recovery.state, command, now, &self.recovery_policy)
            .map_err(|_| CommandError::InvalidLink)?;
        let RecoveryDecision::Completed(completed) = decision else {
            return Err(CommandError::Internal(anyhow::anyhow!(
                "completing a link decided something else"
            )));
        };
        let password_hash = pending.password_hash.clone();
        Ok(Confirmed {
            recovery,
            completed,
            password_hash,
            loaded,
            account,
        })
    }

    /// The account's events for `command`; a refusal (the account can no longer use the link)
    /// is the link's refusal.
    fn decide_on(
        &self,
        confirmed: &Confirmed,
        command: UserCommand,
    ) -> Result<Vec<UserEvent>, CommandError> {
        decide(&confirmed.loaded.account, command, self.clock.now())
            .map_err(|_| CommandError::InvalidLink)
    }

    /// The lifting of a lockout that a reset brings, at the login stream's version, if there is
    /// anything to lift.
    async fn lockout_lift(&self, id: UserId) -> Result<Option<StreamAppend>, CommandError> {
        let stream = login_stream(id)?;
        let (state, version) = self.login_state(&stream).await?;
        let Some(lifted) = state.lift_lockout(self.clock.now()) else {
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
    /// [`CommandError::AccountErased`] when the account was erased since the caller read it.
    async fn record_request(
        &self,
        id: UserId,
        command: impl Fn() -> Result<RecoveryCommand, CommandError>,
    ) -> Result<Option<GlobalPosition>, CommandError> {
        let key = self.writing_key(id).await?;
        for _ in 0..MAX_ATTEMPTS {
            let recovery = self.read_recovery(id).await?;
            let command = command()?;
            let kind = mail_kind(&command);
            let now = self.clock.now();
            let decision = decide_recovery(&recovery.state, command, now, &self.recovery_policy)
                .map_err(refused)?;
            let Some(event) = decision.into_event() else {
                count_mail_request(kind, "over_limit");
                return Ok(None);
            };
            let appended = self
                .append_if_current(
                    vec![recovery.append(&key, event)],
                    "appending a recovery request",
                )
                .await?;
            if let Some(position) = appended {
                count_mail_request(kind, "recorded");
                return Ok(Some(position));
            }
        }
        Err(lost_every_race("recording a recovery request"))
    }

    /// The recovery stream's state from its last message, opened: an erased account's reads
    /// as no pending request, so every link of it is an invalid link.
    async fn read_recovery(&self, id: UserId) -> Result<ReadRecovery, CommandError> {
        let stream = recovery_stream(id)?;
        let Some(last) = self.store.last_message(&stream).await? else {
            return Ok(ReadRecovery {
                stream,
                state: RecoveryState::default(),
                version: None,
            });
        };
        let mut last = [last];
        self.unseal(&mut last).await?;
        let [last] = last;
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
}

/// A request of a link of `kind` mailed to `to`, on the account's session epoch
/// `account_epoch`, with a fresh nonce; a change names its new address and a re-registration
/// its password after this.
fn link_request(
    kind: RecoveryKind,
    to: &Email,
    account_epoch: u64,
) -> Result<RecoveryCommand, CommandError> {
    let bytes = random_nonce().map_err(|error| CommandError::Internal(error.into()))?;
    Ok(RecoveryCommand::Request {
        kind,
        to: to.clone(),
        new_email: None,
        nonce: RecoveryNonce::from_bytes(bytes),
        account_epoch,
        password_hash: None,
    })
}

/// The email field of a request, or the 422 naming it.
fn email_field(email: &str) -> Result<Email, CommandError> {
    Email::parse(email)
        .map_err(|error| CommandError::Validation(vec![FieldError::new("email", error)]))
}

/// A presented link token of `kind`, or the one refusal every bad link gets.
fn parse_link(text: &str, kind: RecoveryKind) -> Result<LinkToken, CommandError> {
    LinkToken::parse(text, &[kind.name()]).map_err(|_| CommandError::InvalidLink)
}

/// A refusal of a request the service itself made wrongly (a change without its address).
fn refused(refusal: identity::RecoveryRefusal) -> CommandError {
    CommandError::Internal(anyhow::anyhow!("a recovery request was refused: {refusal}"))
}

fn recovery_stream(id: UserId) -> anyhow::Result<StreamName> {
    Ok(StreamName::parse(recovery_stream_name(id))?)
}

/// For `or_else`: a request for an account erased meanwhile records nothing, and the caller
/// answers as it answers for an address nobody has.
fn nothing_if_erased(error: CommandError) -> Result<(), CommandError> {
    match error {
        CommandError::AccountErased => Ok(()),
        error => Err(error),
    }
}

/// The kind of mail a command asks for, as the metrics name it.
fn mail_kind(command: &RecoveryCommand) -> &'static str {
    match command {
        RecoveryCommand::Request { kind, .. } | RecoveryCommand::Complete { kind, .. } => {
            kind.name()
        }
        RecoveryCommand::NoticeRegistrationAttempt { .. } => "registration_notice",
    }
}

/// Counts the mails asked for, by kind and outcome (`recorded`, `over_limit`).
fn count_mail_request(kind: &'static str, outcome: &'static str) {
    metrics::counter!("recovery_mail_requests_total", "kind" => kind, "outcome" => outcome)
        .increment(1);
}
