//! The mailer's connection to its SMTP server: lettre speaks SMTP on it, this opens it.
//!
//! Why not lettre's own transport: lettre 0.11.23 opens its connections with Nagle's algorithm
//! on, and writes a message's body and its final `.` in two writes. The second waits for the
//! server to acknowledge the first, which a server delays by up to 40 ms (delayed ACK): every
//! mail took 40 ms whatever the server, some 21 mails a second on one connection where the same
//! exchange takes 2 ms (`cargo run --release -p bench -- mail`). lettre fixed it upstream (its
//! pull request 1159) after the release this build can use. So the connection is opened here,
//! with `TCP_NODELAY`, and handed to lettre's `AsyncSmtpConnection`, which speaks SMTP on it,
//! STARTTLS and authentication included. TLS from the first byte (`smtps://`) is set up here
//! with rustls (the same library and the same root certificates lettre uses) before lettre
//! greets the server.
//!
//! One connection, kept between mails (the mailer sends one mail at a time), checked with a
//! `NOOP` when it has been idle, and dropped after any failure: the next mail opens a new one.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::Context;
use lettre::Message;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, AsyncTokioStream, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// How the connection is protected, from the URL's scheme and its `tls` parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Security {
    /// `smtp://…?tls=none`: plain.
    Plain,
    /// `smtp://…` (or `?tls=opportunistic`): STARTTLS when the server offers it.
    StartTlsWhenOffered,
    /// `smtp://…?tls=required`: STARTTLS, or no mail.
    StartTlsRequired,
    /// `smtps://…`: TLS from the first byte.
    Implicit,
}

/// A connection left unused this long is checked with a `NOOP` before the next mail: a server
/// closes idle sessions, and a mail must not fail because of it.
const CHECK_AFTER_IDLE: Duration = Duration::from_secs(5);

/// An SMTP server and the one connection to it.
pub struct SmtpRelay {
    host: String,
    port: u16,
    security: Security,
    credentials: Option<Credentials>,
    timeout: Duration,
    hello: ClientId,
    connection: Mutex<Option<Open>>,
}

struct Open {
    connection: AsyncSmtpConnection,
    last_used: Instant,
}

/// Why a mail did not reach an answer from the server, or what the server answered.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// lettre's error: a reply code, TLS, or the connection.
    #[error(transparent)]
    Smtp(#[from] lettre::transport::smtp::Error),
    #[error("connecting to the SMTP server")]
    Connect(#[source] io::Error),
    #[error("setting up TLS with the SMTP server")]
    Tls(#[source] io::Error),
    #[error("the SMTP server did not answer in time")]
    Timeout,
}

impl SmtpRelay {
    /// The server `url` names (`smtp://[user:password@]host[:port][?tls=none|opportunistic|
    /// required]` or `smtps://…`), with `username` and `password` when the URL has none.
    pub fn from_url(
        url: &str,
        username: Option<&str>,
        password: Option<&str>,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let parsed = url::Url::parse(url).context("not a URL")?;
        let implicit = match parsed.scheme() {
            "smtp" => false,
            "smtps" => true,
            other => anyhow::bail!("the scheme must be smtp or smtps, not {other}"),
        };
        let tls = parsed
            .query_pairs()
            .find(|(name, _)| name == "tls")
            .map(|(_, value)| value.into_owned());
        let security = match (implicit, tls.as_deref()) {
            (true, _) => Security::Implicit,
            (false, None | Some("opportunistic")) => Security::StartTlsWhenOffered,
            (false, Some("required")) => Security::StartTlsRequired,
            (false, Some("none")) => Security::Plain,
            (false, Some(other)) => anyhow::bail!("tls={other}: none, opportunistic or required"),
        };
        let host = parsed.host_str().context("no host")?.to_owned();
        let port = parsed.port().unwrap_or(if implicit { 465 } else { 587 });
        let in_url = (!parsed.username().is_empty()).then(|| {
            let decode = |text: &str| {
                percent_encoding::percent_decode_str(text)
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (
                decode(parsed.username()),
                decode(parsed.password().unwrap_or("")),
            )
        });
        let credentials = in_url
            .or_else(|| {
                username.map(|user| (user.to_owned(), password.unwrap_or_default().to_owned()))
            })
            .map(|(user, password)| Credentials::new(user, password));
        Ok(Self {
            host,
            port,
            security,
            credentials,
            timeout,
            hello: ClientId::default(),
            connection: Mutex::new(None),
        })
    }

    /// Sends `message` on the kept connection, or a new one.
    pub async fn send(&self, message: &Message) -> Result<(), RelayError> {
        let mut kept = self.connection.lock().await;
        let mut open = match kept.take() {
            Some(mut open) => {
                if self.still_usable(&mut open).await {
                    open
                } else {
                    open.connection.abort().await;
                    self.open().await?
                }
            }
            None => self.open().await?,
        };
        let envelope = message.envelope();
        let sent = tokio::time::timeout(
            self.timeout,
            open.connection.send(envelope, &message.formatted()),
        )
        .await;
        match sent {
            Ok(Ok(_)) => {
                open.last_used = Instant::now();
                *kept = Some(open);
                Ok(())
            }
            Ok(Err(error)) => {
                open.connection.abort().await;
                Err(error.into())
            }
            Err(_) => Err(RelayError::Timeout),
        }
    }

    async fn still_usable(&self, open: &mut Open) -> bool {
        if open.connection.has_broken() {
            return false;
        }
        open.last_used.elapsed() < CHECK_AFTER_IDLE
            || tokio::time::timeout(self.timeout, open.connection.test_connected())
                .await
                .unwrap_or(false)
    }

    /// A new connection, greeted, encrypted as the URL says, and logged in.
    async fn open(&self) -> Result<Open, RelayError> {
        let opening = async {
            let tcp = TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(RelayError::Connect)?;
            tcp.set_nodelay(true).map_err(RelayError::Connect)?;
            let mut connection = if self.security == Security::Implicit {
                let encrypted = Box::new(self.encrypt(tcp).await?);
                AsyncSmtpConnection::connect_with_transport(encrypted, &self.hello).await?
            } else {
                AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &self.hello).await?
            };
            let starttls = match self.security {
                Security::StartTlsRequired => true,
                Security::StartTlsWhenOffered => connection.can_starttls(),
                Security::Plain | Security::Implicit => false,
            };
            if starttls {
                connection
                    .starttls(self.tls_parameters()?, &self.hello)
                    .await?;
            }
            if let Some(credentials) = &self.credentials {
                connection
                    .auth(&[Mechanism::Plain, Mechanism::Login], credentials)
                    .await?;
            }
            Ok(Open {
                connection,
                last_used: Instant::now(),
            })
        };
        tokio::time::timeout(self.timeout, opening)
            .await
            .unwrap_or(Err(RelayError::Timeout))
    }

    fn tls_parameters(&self) -> Result<TlsParameters, RelayError> {
        Ok(TlsParameters::new(self.host.clone())?)
    }

    /// TLS over `tcp`, the server's certificate checked against the web's root certificates
    /// for the host name, as lettre checks it for STARTTLS.
    async fn encrypt(&self, tcp: TcpStream) -> Result<Encrypted, RelayError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots =
            rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|error| RelayError::Tls(io::Error::other(error)))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = ServerName::try_from(self.host.clone())
            .map_err(|error| RelayError::Tls(io::Error::new(io::ErrorKind::InvalidInput, error)))?;
        let stream = TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(RelayError::Tls)?;
        Ok(Encrypted(stream))
    }
}

/// A TLS connection, handed to lettre as a connection's transport.
#[derive(Debug)]
struct Encrypted(TlsStream<TcpStream>);

impl AsyncTokioStream for Encrypted {
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.0.get_ref().0.peer_addr()
    }
}

impl AsyncRead for Encrypted {
    fn poll_read(
        self: Pin<&mut Self>,
        context: &mut TaskContext<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(context, buffer)
    }
}

impl AsyncWrite for Encrypted {
    fn poll_write(
        self: Pin<&mut Self>,
        context: &mut TaskContext<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(context, bytes)
    }

    fn poll_flush(self: Pin<&mut Self>, context: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(context)
    }

    fn poll_shutdown(self: Pin<&mut Self>, context: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(context)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay(url: &str) -> SmtpRelay {
        SmtpRelay::from_url(url, None, None, Duration::from_secs(1)).unwrap()
    }

    #[test]
    fn the_url_says_how_the_connection_is_protected() {
        assert_eq!(
            relay("smtp://relay").security,
            Security::StartTlsWhenOffered
        );
        assert_eq!(relay("smtp://relay").port, 587);
        assert_eq!(relay("smtp://relay:25?tls=none").security, Security::Plain);
        let required = relay("smtp://relay:2525?tls=required");
        assert_eq!(
            (required.security, required.port),
            (Security::StartTlsRequired, 2525)
        );
        let implicit = relay("smtps://relay");
        assert_eq!(
            (implicit.security, implicit.port),
            (Security::Implicit, 465)
        );
        for bad in ["http://relay", "smtp://relay?tls=sometimes", "smtp://"] {
            assert!(
                SmtpRelay::from_url(bad, None, None, Duration::from_secs(1)).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn credentials_come_from_the_url_else_from_the_settings() {
        let second = Duration::from_secs(1);
        let in_url =
            SmtpRelay::from_url("smtp://ann:p%40ss@relay", Some("bob"), Some("x"), second).unwrap();
        assert!(in_url.credentials == Some(Credentials::new("ann".into(), "p@ss".into())));
        let from_settings =
            SmtpRelay::from_url("smtp://relay", Some("bob"), Some("x"), second).unwrap();
        assert!(from_settings.credentials == Some(Credentials::new("bob".into(), "x".into())));
        assert!(relay("smtp://relay").credentials.is_none());
    }
}
