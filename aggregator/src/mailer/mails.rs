//! From a recovery event to the mails it calls for, rendered from the template files beside
//! this module (plain text and HTML per mail). Pure but for the clock it is handed: no I/O.
//!
//! | event | mails |
//! |---|---|
//! | `RecoveryRequested` `verify_email` | a link (`/verify-email?token=`) to `to` |
//! | `RecoveryRequested` `reset_password` | a link (`/password-reset?token=`) to `to` |
//! | `RecoveryRequested` `change_email` | a link (`/email-change?token=`) to `new_email`, then a notice (no link) to `to` |
//! | `RegistrationAttempted` | a notice to `to` |
//! | `RecoveryCompleted` | none |
//!
//! An event whose person was erased (its addresses read as [`identity::Personal::Erased`]: the
//! key is gone, ADR 13) calls for no mail: there is nobody to write to, and nothing to write.
//!
//! A mail's index among its event's mails is part of its identity ([`MailId`]) and of its
//! `Message-ID`, `<{message id}.{index}@{domain of From}>`: a mail sent again (after a crash
//! between sending and checkpointing, or a `reset`) carries the same `Message-ID`, so a
//! duplicate is recognisable.
//!
//! Templates are files with `{{name}}` placeholders, substituted here; what goes into HTML is
//! escaped. The first line of each text template is its `Subject:`.

use std::fmt;

use chrono::{DateTime, Utc};
use identity::{Email, RecoveryEvent, RecoveryKind, RecoveryRequested};
use lettre::Message;
use lettre::message::{Mailbox, MultiPart};
use tokens::{LinkToken, MailTokenKey, Secret};
use uuid::Uuid;

/// What a mail is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MailKind {
    /// A link that verifies the account's address.
    VerifyEmail,
    /// A link that sets a new password.
    ResetPassword,
    /// A link, to the new address, that confirms a change of email.
    ChangeEmail,
    /// A notice to the old address that a change of email was asked for.
    ChangeNotice,
    /// A notice that someone tried to register with the address.
    RegistrationAttempt,
}

impl MailKind {
    pub const ALL: [Self; 5] = [
        Self::VerifyEmail,
        Self::ResetPassword,
        Self::ChangeEmail,
        Self::ChangeNotice,
        Self::RegistrationAttempt,
    ];

    /// Its name in metrics, logs and the refusals table.
    pub const fn name(self) -> &'static str {
        match self {
            Self::VerifyEmail => "verify_email",
            Self::ResetPassword => "reset_password",
            Self::ChangeEmail => "change_email",
            Self::ChangeNotice => "change_notice",
            Self::RegistrationAttempt => "registration_attempt",
        }
    }

    fn template(self) -> Template {
        match self {
            Self::VerifyEmail => Template {
                text: include_str!("templates/verify_email.txt"),
                html: include_str!("templates/verify_email.html"),
            },
            Self::ResetPassword => Template {
                text: include_str!("templates/reset_password.txt"),
                html: include_str!("templates/reset_password.html"),
            },
            Self::ChangeEmail => Template {
                text: include_str!("templates/change_email.txt"),
                html: include_str!("templates/change_email.html"),
            },
            Self::ChangeNotice => Template {
                text: include_str!("templates/change_notice.txt"),
                html: include_str!("templates/change_notice.html"),
            },
            Self::RegistrationAttempt => Template {
                text: include_str!("templates/registration_attempt.txt"),
                html: include_str!("templates/registration_attempt.html"),
            },
        }
    }

    /// The link mail of a request of `kind`, and the path its link opens.
    fn link_of(kind: RecoveryKind) -> (Self, &'static str) {
        match kind {
            RecoveryKind::VerifyEmail => (Self::VerifyEmail, "/verify-email"),
            RecoveryKind::ResetPassword => (Self::ResetPassword, "/password-reset"),
            RecoveryKind::ChangeEmail => (Self::ChangeEmail, "/email-change"),
        }
    }
}

/// A mail's identity: the message (event) it was made for and its index among that event's
/// mails. The same event always makes the same mails in the same order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MailId {
    pub message: Uuid,
    pub index: u8,
}

/// One mail, ready to send. Its bodies and link are a bearer credential (the link resets a
/// password): `Debug` shows neither them nor the address.
pub struct Mail {
    pub id: MailId,
    pub kind: MailKind,
    /// The account it is about.
    pub account: Uuid,
    pub to: Email,
    /// `<{message}.{index}@{domain}>`.
    pub message_id: String,
    pub subject: String,
    text: Secret<String>,
    html: Secret<String>,
    link: Option<Secret<String>>,
}

impl fmt::Debug for Mail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mail")
            .field("id", &self.id)
            .field("kind", &self.kind)
            .field("account", &self.account)
            .field("message_id", &self.message_id)
            .finish_non_exhaustive()
    }
}

impl Mail {
    /// The link in the mail, if it has one. Only for the outbox mode's log line.
    pub fn link(&self) -> Option<&Secret<String>> {
        self.link.as_ref()
    }

    pub fn text(&self) -> &Secret<String> {
        &self.text
    }

    pub fn html(&self) -> &Secret<String> {
        &self.html
    }

    /// The message as sent: plain text and HTML alternatives, from `from` to [`Self::to`].
    /// An error when the address is one the mail library cannot write into an envelope.
    pub fn to_message(&self, from: &Mailbox) -> Result<Message, lettre::error::Error> {
        let to = self
            .to
            .as_str()
            .parse()
            .map_err(|_| lettre::error::Error::MissingTo)?;
        Message::builder()
            .from(from.clone())
            .to(Mailbox::new(None, to))
            .subject(&self.subject)
            .message_id(Some(self.message_id.clone()))
            .multipart(MultiPart::alternative_plain_html(
                self.text.expose_secret().clone(),
                self.html.expose_secret().clone(),
            ))
    }
}

/// What an event calls for.
#[derive(Debug)]
pub enum Planned {
    /// No mail (a completion).
    Nothing,
    /// A request whose link had expired when the mailer reached it: its `mails` are not sent.
    Expired {
        mails: Vec<MailKind>,
    },
    /// A request or notice whose person was erased (the key of its fields is gone): its `mails`
    /// have no address to go to, and are not sent.
    Erased {
        mails: Vec<MailKind>,
    },
    Mails(Vec<Mail>),
}

/// Everything a mail is made with besides its event: the sender, the links' base and the key
/// the links' secrets are derived with.
pub struct Letters {
    from: Mailbox,
    link_base_url: String,
    key: MailTokenKey,
}

/// Why the mails of an event could not be made.
#[derive(Debug, thiserror::Error)]
#[error("deriving a link's secret with the mail token key")]
pub struct LinkError;

impl Letters {
    /// `link_base_url` without its trailing `/`.
    pub fn new(from: Mailbox, link_base_url: &str, key: MailTokenKey) -> Self {
        Self {
            from,
            link_base_url: link_base_url.trim_end_matches('/').to_owned(),
            key,
        }
    }

    pub fn from(&self) -> &Mailbox {
        &self.from
    }

    /// The mails `event` (message `message` of account `account`'s recovery stream) calls for
    /// at `now`, in their fixed order.
    ///
    /// A request whose link has expired by `now` is not mailed: whoever asked has been told
    /// nothing would come after `mail.token_seconds`, the link would be refused anyway, and
    /// a mailer catching up after a long outage, or replaying after a `reset`, would otherwise
    /// send a pile of dead links. Its notice (for a change) goes with it: it announces a
    /// change that can no longer happen. A registration attempt's notice has no link and
    /// is always sent. Nothing is sent about an erased person, expired or not.
    pub fn plan(
        &self,
        message: Uuid,
        account: Uuid,
        event: &RecoveryEvent,
        now: DateTime<Utc>,
    ) -> Result<Planned, LinkError> {
        match event {
            RecoveryEvent::RecoveryRequested(requested) => {
                let Some(to) = requested.to.known() else {
                    return Ok(Planned::Erased {
                        mails: mail_kinds_of(requested),
                    });
                };
                if now >= requested.expires_at {
                    return Ok(Planned::Expired {
                        mails: mail_kinds_of(requested),
                    });
                }
                self.requested(message, account, requested, to)
                    .map(Planned::Mails)
            }
            RecoveryEvent::RegistrationAttempted(attempted) => {
                let Some(to) = attempted.to.known() else {
                    return Ok(Planned::Erased {
                        mails: vec![MailKind::RegistrationAttempt],
                    });
                };
                Ok(Planned::Mails(vec![self.render(
                    MailId { message, index: 0 },
                    MailKind::RegistrationAttempt,
                    account,
                    to,
                    &[("address", to.as_str())],
                    None,
                )]))
            }
            RecoveryEvent::RecoveryCompleted(_) => Ok(Planned::Nothing),
        }
    }

    /// The mails of a request to the account's address `to` (the request's, known).
    fn requested(
        &self,
        message: Uuid,
        account: Uuid,
        requested: &RecoveryRequested,
        to: &Email,
    ) -> Result<Vec<Mail>, LinkError> {
        let (kind, path) = MailKind::link_of(requested.kind);
        let token = LinkToken::issue(
            &self.key,
            requested.kind.name(),
            account,
            requested.nonce.as_bytes(),
        )
        .map_err(|_| LinkError)?;
        let link = Secret::new(format!(
            "{}{path}?token={}",
            self.link_base_url,
            token.text().expose_secret()
        ));
        let expires_at = requested
            .expires_at
            .format("%Y-%m-%d %H:%M UTC")
            .to_string();
        let old_address = to.as_str();
        // A change's link goes to the new address; a change without one (which the domain
        // never makes) mails the account's address, which cannot confirm anything but a
        // change to itself.
        let link_to = match (requested.kind, &requested.new_email) {
            (RecoveryKind::ChangeEmail, Some(new_email)) => new_email,
            _ => to,
        };
        let mut mails = vec![self.render(
            MailId { message, index: 0 },
            kind,
            account,
            link_to,
            &[
                ("address", link_to.as_str()),
                ("old_address", old_address),
                ("link", link.expose_secret()),
                ("expires_at", &expires_at),
            ],
            Some(link.clone()),
        )];
        if requested.kind == RecoveryKind::ChangeEmail {
            mails.push(self.render(
                MailId { message, index: 1 },
                MailKind::ChangeNotice,
                account,
                to,
                &[
                    ("address", old_address),
                    ("new_address", link_to.as_str()),
                    ("expires_at", &expires_at),
                ],
                None,
            ));
        }
        Ok(mails)
    }

    fn render(
        &self,
        id: MailId,
        kind: MailKind,
        account: Uuid,
        to: &Email,
        values: &[(&str, &str)],
        link: Option<Secret<String>>,
    ) -> Mail {
        let template = kind.template();
        let text = substitute(template.text, values, false);
        let (subject, text) = split_subject(&text);
        Mail {
            id,
            kind,
            account,
            to: to.clone(),
            message_id: message_id(id, self.from.email.domain()),
            subject,
            text: Secret::new(text),
            html: Secret::new(substitute(template.html, values, true)),
            link,
        }
    }
}

/// The mails a request makes, by kind: what an expired one does not send.
fn mail_kinds_of(requested: &RecoveryRequested) -> Vec<MailKind> {
    let (kind, _) = MailKind::link_of(requested.kind);
    if requested.kind == RecoveryKind::ChangeEmail {
        vec![kind, MailKind::ChangeNotice]
    } else {
        vec![kind]
    }
}

/// `<{message}.{index}@{domain}>`.
pub fn message_id(id: MailId, domain: &str) -> String {
    format!("<{}.{}@{domain}>", id.message, id.index)
}

struct Template {
    text: &'static str,
    html: &'static str,
}

/// `template` with each `{{name}}` of `values` replaced by its value, HTML-escaped when
/// `escape`. A placeholder without a value stays as written (the tests check that every
/// template's placeholders are given).
fn substitute(template: &str, values: &[(&str, &str)], escape: bool) -> String {
    let mut out = String::with_capacity(template.len() + 256);
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            rest = &rest[start..];
            break;
        };
        let name = after[..end].trim();
        match values.iter().find(|(key, _)| *key == name) {
            Some((_, value)) if escape => push_html_escaped(&mut out, value),
            Some((_, value)) => out.push_str(value),
            None => out.push_str(&rest[start..start + 2 + end + 2]),
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    out
}

fn push_html_escaped(out: &mut String, value: &str) {
    for character in value.chars() {
        match character {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            other => out.push(other),
        }
    }
}

/// A rendered text template's `Subject:` line, and the body after the blank line below it.
fn split_subject(rendered: &str) -> (String, String) {
    let (head, body) = rendered.split_once("\n\n").unwrap_or(("", rendered));
    let subject = head.strip_prefix("Subject:").unwrap_or(head).trim();
    (subject.to_owned(), body.to_owned())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use chrono::{TimeDelta, TimeZone};
    use identity::{
        Personal, RecoveryCommand, RecoveryDecision, RecoveryNonce, RecoveryPolicy, RecoveryState,
        decide_recovery,
    };

    use super::*;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 1, 10, 0, 0).unwrap()
    }

    fn key() -> MailTokenKey {
        MailTokenKey::from_hex(&"ab".repeat(32)).unwrap()
    }

    fn letters() -> Letters {
        Letters::new(
            "Identity <no-reply@id.example.net>".parse().unwrap(),
            "https://id.example.net/",
            key(),
        )
    }

    fn email(address: &str) -> Email {
        Email::parse(address).unwrap()
    }

    fn request(kind: RecoveryKind, to: &str, new_email: Option<&str>) -> RecoveryEvent {
        let decision = decide_recovery(
            &RecoveryState::default(),
            RecoveryCommand::Request {
                kind,
                to: email(to),
                new_email: new_email.map(email),
                nonce: RecoveryNonce::from_bytes([7; RecoveryNonce::LEN]),
                account_epoch: 0,
                password_hash: None,
            },
            now(),
            &RecoveryPolicy::default(),
        )
        .unwrap();
        let RecoveryDecision::Requested(requested) = decision else {
            panic!("{decision:?}")
        };
        requested.into()
    }

    fn mails(event: &RecoveryEvent) -> Vec<Mail> {
        match letters()
            .plan(Uuid::from_u128(5), Uuid::from_u128(9), event, now())
            .unwrap()
        {
            Planned::Mails(mails) => mails,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_reset_request_mails_a_link_whose_token_authenticates_with_the_events_nonce() {
        let [mail] = mails(&request(
            RecoveryKind::ResetPassword,
            "ann@example.com",
            None,
        ))
        .try_into()
        .unwrap();
        assert_eq!(mail.kind, MailKind::ResetPassword);
        assert_eq!(mail.to.as_str(), "ann@example.com");
        assert_eq!(mail.subject, "Reset your password");
        assert_eq!(
            mail.message_id,
            "<00000000-0000-0000-0000-000000000005.0@id.example.net>"
        );
        let link = mail.link().unwrap().expose_secret();
        let token = link
            .strip_prefix("https://id.example.net/password-reset?token=")
            .unwrap();
        let token = LinkToken::parse(token, &RecoveryKind::NAMES).unwrap();
        assert_eq!(token.account(), Uuid::from_u128(9));
        assert!(token.authenticates_with(&key(), &[7; RecoveryNonce::LEN]));
        assert!(mail.text().expose_secret().contains(link));
        assert!(mail.html().expose_secret().contains(link));
    }

    #[test]
    fn a_change_of_email_mails_the_link_to_the_new_address_and_a_notice_without_it_to_the_old() {
        let event = request(
            RecoveryKind::ChangeEmail,
            "ann@example.com",
            Some("ann@example.org"),
        );
        let [link, notice] = mails(&event).try_into().unwrap();
        assert_eq!(
            (link.kind, link.to.as_str(), link.id.index),
            (MailKind::ChangeEmail, "ann@example.org", 0)
        );
        assert!(
            link.link()
                .unwrap()
                .expose_secret()
                .starts_with("https://id.example.net/email-change?token=change_email.")
        );
        assert_eq!(
            (notice.kind, notice.to.as_str(), notice.id.index),
            (MailKind::ChangeNotice, "ann@example.com", 1)
        );
        assert!(notice.link().is_none());
        assert!(!notice.text().expose_secret().contains("token="));
        assert!(notice.text().expose_secret().contains("ann@example.org"));
        assert_ne!(link.message_id, notice.message_id);
    }

    #[test]
    fn a_registration_attempt_mails_a_notice_and_a_completion_mails_nothing() {
        let attempted = identity::RegistrationAttempted {
            to: email("ann@example.com").into(),
            at: now(),
            state: RecoveryState::default().into(),
        };
        let [notice] = mails(&attempted.into()).try_into().unwrap();
        assert_eq!(notice.kind, MailKind::RegistrationAttempt);
        assert!(notice.link().is_none());
        let completed = identity::RecoveryCompleted {
            kind: RecoveryKind::VerifyEmail,
            new_email: None,
            at: now(),
            state: RecoveryState::default().into(),
        };
        assert!(matches!(
            letters().plan(Uuid::nil(), Uuid::nil(), &completed.into(), now()),
            Ok(Planned::Nothing)
        ));
    }

    #[test]
    fn a_request_whose_link_has_expired_is_not_mailed() {
        let event = request(
            RecoveryKind::ChangeEmail,
            "ann@example.com",
            Some("ann@example.org"),
        );
        let later = now() + TimeDelta::minutes(30);
        let planned = letters()
            .plan(Uuid::nil(), Uuid::nil(), &event, later)
            .unwrap();
        let Planned::Expired { mails } = planned else {
            panic!("{planned:?}")
        };
        assert_eq!(mails, [MailKind::ChangeEmail, MailKind::ChangeNotice]);
    }

    #[test]
    fn a_request_or_notice_whose_person_was_erased_is_not_mailed_even_once_expired() {
        let RecoveryEvent::RecoveryRequested(mut requested) = request(
            RecoveryKind::ChangeEmail,
            "ann@example.com",
            Some("ann@example.org"),
        ) else {
            unreachable!("a request")
        };
        // As read once the key is gone: every sealed field erased.
        requested.to = Personal::Erased;
        requested.new_email = None;
        requested.state = Personal::Erased;
        let event = RecoveryEvent::from(requested);
        for at in [now(), now() + TimeDelta::hours(2)] {
            let planned = letters()
                .plan(Uuid::nil(), Uuid::nil(), &event, at)
                .unwrap();
            let Planned::Erased { mails } = planned else {
                panic!("{planned:?}")
            };
            assert_eq!(mails, [MailKind::ChangeEmail, MailKind::ChangeNotice]);
        }
        let attempted = identity::RegistrationAttempted {
            to: Personal::Erased,
            at: now(),
            state: Personal::Erased,
        };
        let planned = letters()
            .plan(Uuid::nil(), Uuid::nil(), &attempted.into(), now())
            .unwrap();
        assert!(
            matches!(&planned, Planned::Erased { mails } if mails == &[MailKind::RegistrationAttempt]),
            "{planned:?}"
        );
    }

    #[test]
    fn every_template_has_a_subject_and_every_placeholder_is_filled() {
        let events = [
            request(RecoveryKind::VerifyEmail, "ann@example.com", None),
            request(RecoveryKind::ResetPassword, "ann@example.com", None),
            request(
                RecoveryKind::ChangeEmail,
                "ann@example.com",
                Some("ann@example.org"),
            ),
            identity::RegistrationAttempted {
                to: email("ann@example.com").into(),
                at: now(),
                state: RecoveryState::default().into(),
            }
            .into(),
        ];
        let all: Vec<Mail> = events.iter().flat_map(mails).collect();
        let mut kinds: Vec<&str> = all.iter().map(|mail| mail.kind.name()).collect();
        kinds.sort_unstable();
        let mut every: Vec<&str> = MailKind::ALL.iter().map(|kind| kind.name()).collect();
        every.sort_unstable();
        assert_eq!(kinds, every);
        for mail in &all {
            assert!(!mail.subject.is_empty(), "{:?}", mail.kind);
            for body in [mail.text().expose_secret(), mail.html().expose_secret()] {
                assert!(!body.contains("{{"), "{:?}: {body}", mail.kind);
                assert!(!body.starts_with("Subject"), "{:?}", mail.kind);
            }
            let message = mail.to_message(letters().from()).unwrap();
            let raw = String::from_utf8(message.formatted()).unwrap();
            assert!(raw.contains(&format!("Message-ID: {}", mail.message_id)));
        }
    }

    #[test]
    fn values_put_into_html_are_escaped() {
        let html = substitute(
            "<p>{{address}} {{missing}}</p>",
            &[("address", "\"o'neil\"<b>&@example.com")],
            true,
        );
        assert_eq!(
            html,
            "<p>&quot;o&#39;neil&quot;&lt;b&gt;&amp;@example.com {{missing}}</p>"
        );
        let text = substitute("{{address}}", &[("address", "<b>")], false);
        assert_eq!(text, "<b>");
    }

    #[test]
    fn the_debug_output_shows_neither_the_address_nor_the_link() {
        let [mail] = mails(&request(
            RecoveryKind::ResetPassword,
            "ann@example.com",
            None,
        ))
        .try_into()
        .unwrap();
        let debug = format!("{mail:?}");
        assert!(!debug.contains("ann@"), "{debug}");
        assert!(!debug.contains("token"), "{debug}");
    }
}
