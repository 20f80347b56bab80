//! A TCP proxy between code under test and PostgreSQL that a test can freeze: a network cut
//! or a frozen node, as the server sees it.
//!
//! Killing a client, or closing its socket, sends a FIN and the server ends the session at once;
//! that is the easy case. A cable pulled, a partition or a paused virtual machine sends nothing:
//! the server keeps the session (and its locks) until something it does itself notices. While
//! frozen, this proxy forwards nothing either way, neither data nor the end of a stream, and
//! keeps every socket open; its kernel still acknowledges what arrives, so on loopback even TCP
//! keepalives get answered, as they would be by a middlebox that has lost the route. What it
//! read just before the freeze is held and forwarded after [`FreezingProxy::thaw`], like
//! packets a healed network finally delivers.

use std::net::SocketAddr;
use std::str::FromStr;

use sqlx::ConnectOptions;
use sqlx::postgres::PgConnectOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// A proxy in front of one PostgreSQL server, listening on a free port of 127.0.0.1. Dropping
/// it closes every connection through it.
pub struct FreezingProxy {
    url: String,
    frozen: watch::Sender<bool>,
    accepting: JoinHandle<()>,
}

impl FreezingProxy {
    /// A proxy to the server of `url` (a `postgres://` URL with a TCP host); [`Self::url`] is
    /// the same database through the proxy.
    pub async fn start(url: &str) -> Self {
        let options = PgConnectOptions::from_str(url).expect("a PostgreSQL URL");
        let host = options.get_host().to_owned();
        assert!(
            !host.starts_with('/'),
            "the proxy forwards TCP; {host} is a Unix socket directory"
        );
        let upstream = format!("{host}:{}", options.get_port());
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the proxy");
        let address: SocketAddr = listener.local_addr().expect("the proxy's address");
        let url = options
            .host("127.0.0.1")
            .port(address.port())
            .to_url_lossy()
            .to_string();
        let (frozen, _) = watch::channel(false);
        let accepting = tokio::spawn(accept(listener, upstream, frozen.clone()));
        Self {
            url,
            frozen,
            accepting,
        }
    }

    /// The database's URL through the proxy.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Stops forwarding, both ways, on every connection, and holds new ones the same way.
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    /// Forwards again, starting with whatever was held.
    pub fn thaw(&self) {
        self.frozen.send_replace(false);
    }
}

impl Drop for FreezingProxy {
    fn drop(&mut self) {
        // The accepting task owns the connections' tasks: aborting it closes them all.
        self.accepting.abort();
    }
}

async fn accept(listener: TcpListener, upstream: String, frozen: watch::Sender<bool>) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let upstream = upstream.clone();
        let frozen = frozen.clone();
        connections.spawn(async move {
            let Ok(server) = TcpStream::connect(&upstream).await else {
                return;
            };
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::join!(
                pump(client_read, server_write, frozen.subscribe()),
                pump(server_read, client_write, frozen.subscribe()),
            );
        });
        // Reap the connections that ended, so the set does not grow with every connection.
        while connections.try_join_next().is_some() {}
    }
}

/// Copies one direction until its end, holding whatever arrives while frozen.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut frozen: watch::Receiver<bool>) {
    let mut buffer = vec![0; 16 * 1024];
    loop {
        let read = from.read(&mut buffer).await;
        // Data, the end of the stream and a reset alike wait for the thaw.
        if frozen.wait_for(|frozen| !*frozen).await.is_err() {
            return;
        }
        match read {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => {
                if to.write_all(&buffer[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sqlx::{Connection, PgConnection};

    use super::FreezingProxy;
    use crate::TestDatabase;

    #[tokio::test]
    async fn a_frozen_proxy_answers_nothing_keeps_the_session_and_delivers_after_the_thaw() {
        let db = TestDatabase::new().await;
        let proxy = FreezingProxy::start(db.url()).await;
        let mut through = PgConnection::connect(proxy.url()).await.unwrap();
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut through)
            .await
            .unwrap();

        proxy.freeze();
        let query = sqlx::query_scalar::<_, i32>("SELECT 7").fetch_one(&mut through);
        tokio::pin!(query);
        assert!(
            tokio::time::timeout(Duration::from_millis(500), &mut query)
                .await
                .is_err(),
            "a frozen proxy forwarded a query or its answer"
        );
        // The server still has the session: nothing told it the client is gone.
        let mut direct = PgConnection::connect(db.url()).await.unwrap();
        let alive: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)")
                .bind(pid)
                .fetch_one(&mut direct)
                .await
                .unwrap();
        assert!(alive);

        proxy.thaw();
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(10), query)
                .await
                .unwrap()
                .unwrap(),
            7
        );
    }
}
