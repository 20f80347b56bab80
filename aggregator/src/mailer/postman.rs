//! Where mails go: an SMTP server (`mail.smtp_url`, with lettre), or, without one, `.eml` files
//! in `mail.outbox_dir`.
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
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use platform::settings::MailSettings;

use super::mails::Mail;

/// Where the mailer hands its mails.
pub enum Postman {
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
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
        let url = starttls_when_offered(url.expose());
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::from_url(&url)
            .with_context(|| format!("reading mail.smtp_url ({})", url_without_secrets(&url)))?;
        if let Some(username) = &settings.smtp_username {
            let password = settings.smtp_password.clone().unwrap_or_default();
            builder = builder.credentials(Credentials::new(username.clone(), password));
        }
        Ok(Self::Smtp(builder.timeout(Some(timeout)).build()))
    }

    /// Hands `mail` (as `message`) over.
    pub async fn deliver(
        &self,
        mail: &Mail,
        message: &Message,
    ) -> Result<Delivery, DeliveryFailure> {
        match self {
            Self::Smtp(transport) => match transport.send(message.clone()).await {
                Ok(_) => Ok(Delivery::Accepted),
                Err(error) => classify(&error),
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

/// `smtp://` URLs without a `tls` parameter, as lettre reads them, never encrypt; the setting
/// promises STARTTLS whenever the server offers it (README), so it is asked for.
fn starttls_when_offered(url: &str) -> String {
    let plain = url
        .get(..7)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("smtp://"));
    let has_tls = url
        .split_once('?')
        .is_some_and(|(_, query)| query.split('&').any(|pair| pair.starts_with("tls=")));
    match (plain, has_tls) {
        (true, false) if url.contains('?') => format!("{url}&tls=opportunistic"),
        (true, false) => format!("{url}?tls=opportunistic"),
        _ => url.to_owned(),
    }
}

/// The URL as far as an error may show it: no user or password.
fn url_without_secrets(url: &str) -> String {
    match (url.split_once("://"), url.rfind('@')) {
        (Some((scheme, _)), Some(at)) => format!("{scheme}://[redacted]@{}", &url[at + 1..]),
        _ => url.to_owned(),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_smtp_url_asks_for_starttls_when_offered_and_others_keep_their_choice() {
        assert_eq!(
            starttls_when_offered("smtp://relay:587"),
            "smtp://relay:587?tls=opportunistic"
        );
        assert_eq!(
            starttls_when_offered("smtp://relay:587?x=1"),
            "smtp://relay:587?x=1&tls=opportunistic"
        );
        for kept in [
            "smtp://relay:587?tls=required",
            "smtps://relay:465",
            "SMTP://relay?tls=opportunistic",
        ] {
            assert_eq!(starttls_when_offered(kept), kept);
        }
    }

    #[test]
    fn an_smtp_url_in_an_error_hides_its_credentials() {
        assert_eq!(
            url_without_secrets("smtp://user:hunter2@relay:587"),
            "smtp://[redacted]@relay:587"
        );
        assert_eq!(url_without_secrets("smtp://relay"), "smtp://relay");
    }
}
