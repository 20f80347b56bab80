//! The HTTP side of webhook delivery: one signed POST of one event, and what came of it.
//!
//! **Where it connects** (server-side request forgery, docs/adr/0014). The host is resolved
//! here, at every delivery, by the [`NetworkPolicy`], which refuses the whole endpoint when any
//! of its addresses lies in a network webhooks may not reach; the request then goes to exactly
//! those addresses (reqwest's `resolve_to_addrs`), never through reqwest's own resolver, so a
//! name that has come to resolve to an internal address (DNS rebinding) is refused before a
//! byte is sent. Redirects are not followed (a 3xx is a failure: following it would reach an
//! address nobody checked), and no proxy from the environment is used (it would make the
//! connection on our behalf, to wherever).
//!
//! A client is kept per endpoint while its addresses stay the same, so connections are reused
//! between deliveries; an address set that changes gets a new client.
//!
//! **Signatures**, as the Standard Webhooks specification has them: `webhook-id` (the event's
//! id, the same on every retry), `webhook-timestamp` (seconds) and `webhook-signature`
//! (`v1,<base64>` for each secret the endpoint signs with, separated by spaces).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use integration::{EndpointUrl, NetworkPolicy};
use reqwest::header::CONTENT_TYPE;

/// The `User-Agent` of every delivery.
const USER_AGENT: &str = concat!("identity-service-webhooks/", env!("CARGO_PKG_VERSION"));

/// One delivery, ready to post.
pub struct Delivery<'a> {
    pub url: &'a str,
    /// The `webhook-id`: the event's id.
    pub id: String,
    /// The `webhook-timestamp`: seconds since the epoch.
    pub timestamp: i64,
    /// The `webhook-signature` header's value.
    pub signature: String,
    /// The CloudEvents JSON document.
    pub body: Vec<u8>,
}

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The receiver's status code, if it answered.
    pub status: Option<u16>,
    /// Why it is not a delivery, in a few words without the URL; `None`: delivered (a 2xx).
    pub error: Option<String>,
    pub latency: Duration,
}

impl Answer {
    pub fn delivered(&self) -> bool {
        self.error.is_none()
    }
}

/// Posts deliveries to one endpoint.
pub struct Sender {
    policy: NetworkPolicy,
    timeout: Duration,
    /// The client of the last addresses the endpoint's host resolved to.
    client: Option<(String, Vec<SocketAddr>, reqwest::Client)>,
}

impl Sender {
    /// A sender that connects only where `policy` permits, and gives each attempt `timeout`
    /// (connecting included) to be answered.
    pub fn new(policy: NetworkPolicy, timeout: Duration) -> Self {
        Self {
            policy,
            timeout,
            client: None,
        }
    }

    /// Posts `delivery` once. Never an error: what went wrong is the answer.
    pub async fn post(&mut self, delivery: Delivery<'_>) -> Answer {
        let started = Instant::now();
        let answered = self.try_post(delivery).await;
        let latency = started.elapsed();
        match answered {
            Ok(status) if (200..300).contains(&status) => Answer {
                status: Some(status),
                error: None,
                latency,
            },
            Ok(status) if (300..400).contains(&status) => Answer {
                status: Some(status),
                error: Some(format!("HTTP {status}: a redirect, not followed")),
                latency,
            },
            Ok(status) => Answer {
                status: Some(status),
                error: Some(format!("HTTP {status}")),
                latency,
            },
            Err(error) => Answer {
                status: None,
                error: Some(error),
                latency,
            },
        }
    }

    async fn try_post(&mut self, delivery: Delivery<'_>) -> Result<u16, String> {
        let url = EndpointUrl::parse(delivery.url)
            .map_err(|refusal| format!("the endpoint's URL is refused: {refusal}"))?;
        let addresses = self
            .policy
            .resolve(&url)
            .await
            .map_err(|refusal| format!("not sent: {refusal}"))?;
        let client = self.client_for(&url, addresses)?;
        let response = client
            .post(url.url().clone())
            .header(CONTENT_TYPE, "application/json")
            .header("webhook-id", delivery.id)
            .header("webhook-timestamp", delivery.timestamp.to_string())
            .header("webhook-signature", delivery.signature)
            .body(delivery.body)
            .send()
            .await
            .map_err(|error| self.describe(&error))?;
        // The body is not read: nothing in it counts, and a receiver that trickles one would
        // hold the endpoint up.
        Ok(response.status().as_u16())
    }

    /// The client that connects `url`'s host to `addresses`: the kept one if they are the
    /// ones it was made for.
    fn client_for(
        &mut self,
        url: &EndpointUrl,
        mut addresses: Vec<SocketAddr>,
    ) -> Result<reqwest::Client, String> {
        let host = url.host();
        addresses.sort_unstable();
        if let Some((kept_host, kept, client)) = &self.client
            && *kept_host == host
            && *kept == addresses
        {
            return Ok(client.clone());
        }
        let client = reqwest::Client::builder()
            .use_rustls_tls()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(self.timeout)
            .connect_timeout(self.timeout)
            .user_agent(USER_AGENT)
            // An IP literal is connected to as it is (and was checked as it is); a name only
            // to the addresses checked.
            .resolve_to_addrs(&host, &addresses)
            .build()
            .map_err(|error| format!("could not make an HTTP client: {error}"))?;
        self.client = Some((host, addresses, client.clone()));
        Ok(client)
    }

    /// A failed request in a few words, without its URL (it may carry a token of the
    /// receiver's in its query).
    fn describe(&self, error: &reqwest::Error) -> String {
        if error.is_timeout() {
            return format!("no answer within {} ms", self.timeout.as_millis());
        }
        let cause = root_cause(error);
        if error.is_connect() {
            format!("could not connect: {cause}")
        } else {
            format!("the request failed: {cause}")
        }
    }
}

/// The innermost error of `error`'s chain, which says what actually happened (connection
/// refused, reset, a TLS alert), and carries no URL.
fn root_cause(error: &reqwest::Error) -> String {
    let mut innermost = None;
    let mut cause = std::error::Error::source(error);
    while let Some(found) = cause {
        innermost = Some(found);
        cause = found.source();
    }
    innermost.map_or_else(|| "no cause given".into(), ToString::to_string)
}
