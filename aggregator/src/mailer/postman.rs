//! Where mails go: an SMTP server (`mail.smtp_url`, over [`SmtpRelay`]'s connection), or,
//! without one, `.eml` files in `mail.outbox_dir`.
//!
//! What the mailer needs to know of a delivery is one of three things: the server has the mail
//! ([`Delivery::Accepted`]), the server refused it for good ([`Delivery::Refused`]: record it and
//! move on), or nothing is known for sure ([`DeliveryFailure`]: try again later, holding the
//! checkpoint). Only a refusal that is about this mail is final: lettre's `is_permanent()` (a
//! 5xx reply), except the replies that say the session itself is refused (authentication), which
//! would refuse every mail alike and must not drop them all. Everything else (a 4xx, a
//! connection refused or cut, a timeout, a TLS failure) is transient: the server may well have
//! nothing wrong with the mail, and giving up would lose it.
//!
//! Nothing here logs or returns a server's reply text: it often repeats the address. Failures
//! carry the reply code, or the kind of I/O error.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use lettre::Message;
use lettre::message::Mailbox;
use platform::settings::MailSettings;

use super::mails::Mail;
use super::relay::{RelayError, SmtpRelay};

/// Where the mailer hands its mails.
pub enum Postman {
    Smtp(Box<SmtpRelay>),
    /// The mode for trying the service out without an SMTP server: each mail is a file, and its
    /// link is logged.
    Outbox(PathBuf),
}

/// What became of a mail that reached an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The server took responsibility for it (or, in the outbox mode, the file is written).
    Accepted,
    /// The server refused it for good, with this reply code (`None`: the address cannot even
    /// be written into an envelope).
    Refused { code: Option<u16> },
}

/// A delivery whose outcome is unknown or temporary: retry later.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryFailure {
    #[error("the SMTP server answered {code}, a temporary failure or one about the session")]
    Reply { code: u16 },
    #[error("the SMTP server did not answer in time")]
    Timeout,
    #[error("no usable connection to the SMTP server ({what}{})", io_kind(*.io))]
    Connection {
        what: &'static str,
        io: Option<std::io::ErrorKind>,
    },
    #[error("writing the mail into the outbox")]
    Outbox(#[source] std::io::Error),
}

fn io_kind(kind: Option<std::io::ErrorKind>) -> String {
    kind.map(|kind| format!(": {kind}")).unwrap_or_default()
}

/// Replies that refuse the session rather than the mail: authentication required or failed
/// (RFC 4954). Every mail would get them.
const SESSION_REFUSALS: [u16; 4] = [530, 534, 535, 538];

impl Postman {
    /// SMTP to `mail.smtp_url` when set, else the outbox.
    pub fn from_settings(settings: &MailSettings, timeout: Duration) -> anyhow::Result<Self> {
        let Some(url) = settings.smtp_url.as_ref().filter(|url| !url.is_empty()) else {
            return Ok(Self::Outbox(settings.outbox_dir.clone()));
        };
        let relay = SmtpRelay::from_url(
            url.expose(),
            settings.smtp_username.as_deref(),
            settings.smtp_password.as_deref(),
            timeout,
        )
        .with_context(|| format!("reading mail.smtp_url ({url})"))?;
        Ok(Self::Smtp(Box::new(relay)))
    }

    /// Hands `mail` (as `message`) over.
    pub async fn deliver(
        &self,
        mail: &Mail,
        message: &Message,
    ) -> Result<Delivery, DeliveryFailure> {
        match self {
            Self::Smtp(relay) => match relay.send(message).await {
                Ok(()) => Ok(Delivery::Accepted),
                Err(RelayError::Smtp(error)) => classify(&error),
                Err(RelayError::Connect(error)) => Err(DeliveryFailure::Connection {
                    what: "the connection",
                    io: Some(error.kind()),
                }),
                Err(RelayError::Tls(error)) => Err(DeliveryFailure::Connection {
                    what: "TLS",
                    io: Some(error.kind()),
                }),
                Err(RelayError::Timeout) => Err(DeliveryFailure::Timeout),
            },
            Self::Outbox(directory) => write_to_outbox(directory, mail, message).await,
        }
    }
}

/// Whether lettre's `error` is a refusal of the mail or a failure to retry.
fn classify(error: &lettre::transport::smtp::Error) -> Result<Delivery, DeliveryFailure> {
    if let Some(code) = error.status() {
        let code = u16::from(code);
        if error.is_permanent() && !SESSION_REFUSALS.contains(&code) {
            return Ok(Delivery::Refused { code: Some(code) });
        }
        return Err(DeliveryFailure::Reply { code });
    }
    if error.is_timeout() {
        return Err(DeliveryFailure::Timeout);
    }
    let what = if error.is_tls() {
        "TLS"
    } else if error.is_response() {
        "an unreadable reply"
    } else if error.is_client() {
        "the client"
    } else {
        "the connection"
    };
    Err(DeliveryFailure::Connection {
        what,
        io: io_error_kind(error),
    })
}

fn io_error_kind(error: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut source = error.source();
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        source = cause.source();
    }
    None
}

/// Writes the mail as `<outbox>/<message>.<index>.eml`, whole or not at all (written aside,
/// then renamed: a reader never sees half a mail, and a mail written again replaces itself),
/// and logs where it is and its link. The log line holds the link on purpose: this mode is for
/// trying the service out, with no SMTP server to read mails from.
async fn write_to_outbox(
    directory: &Path,
    mail: &Mail,
    message: &Message,
) -> Result<Delivery, DeliveryFailure> {
    let name = format!("{}.{}.eml", mail.id.message, mail.id.index);
    let path = directory.join(&name);
    let partial = directory.join(format!(".{name}.partial"));
    let bytes = message.formatted();
    let written = async {
        tokio::fs::create_dir_all(directory).await?;
        tokio::fs::write(&partial, &bytes).await?;
        tokio::fs::rename(&partial, &path).await
    }
    .await;
    written.map_err(DeliveryFailure::Outbox)?;
    tracing::info!(
        kind = mail.kind.name(),
        account = %mail.account,
        path = %path.display(),
        link = mail.link().map(|link| link.expose_secret().as_str()),
        "mail written to the outbox (no mail.smtp_url)"
    );
    Ok(Delivery::Accepted)
}

/// The `From` of every mail, from `mail.from`.
pub fn sender(settings: &MailSettings) -> anyhow::Result<Mailbox> {
    settings
        .from
        .parse()
        .with_context(|| format!("mail.from is not an address: {:?}", settings.from))
}
