//! Where a webhook endpoint may point (server-side request forgery).
//!
//! An endpoint's URL is posted to by the aggregator, from inside the deployment's network. Left
//! unchecked, an administrator's token (or a stolen one) could make it post to the database,
//! a cloud metadata service or an internal admin port. So an endpoint may only point at public
//! addresses: loopback, private, link-local, shared (carrier-grade NAT), unspecified,
//! multicast, broadcast and documentation networks are refused, unless
//! `webhooks.allowed_networks` names a network that holds the address.
//!
//! The check runs twice: when the endpoint is registered (its host resolved, every address
//! checked), and at every delivery, on the addresses the connection is actually made to, so a
//! name that later resolves to an internal address (DNS rebinding) is refused then.
//! Redirects are not followed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;
use url::Url;

/// The longest URL an endpoint may have.
pub const MAX_URL_CHARS: usize = 2000;

/// Why an endpoint's URL is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlRefusal {
    #[error("not an absolute http or https URL with a host")]
    Malformed,
    #[error("a URL may not carry a user name or password, nor a fragment")]
    CredentialsOrFragment,
    #[error("longer than {MAX_URL_CHARS} characters")]
    TooLong,
    #[error("its host {host} resolves to {address}, in a network webhooks may not reach")]
    ForbiddenAddress { host: String, address: IpAddr },
    #[error("its host {host} could not be resolved")]
    Unresolvable { host: String },
}

/// An endpoint's URL, parsed: `http` or `https`, with a host, without credentials or a
/// fragment. Whether its addresses may be reached is [`NetworkPolicy`]'s to say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointUrl(Url);

impl EndpointUrl {
    pub fn parse(text: &str) -> Result<Self, UrlRefusal> {
        if text.chars().count() > MAX_URL_CHARS {
            return Err(UrlRefusal::TooLong);
        }
        let url = Url::parse(text).map_err(|_| UrlRefusal::Malformed)?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(UrlRefusal::Malformed);
        }
        if !url.username().is_empty() || url.password().is_some() || url.fragment().is_some() {
            return Err(UrlRefusal::CredentialsOrFragment);
        }
        Ok(Self(url))
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    pub fn url(&self) -> &Url {
        &self.0
    }

    /// The host as written, without the brackets of an IPv6 literal.
    pub fn host(&self) -> String {
        match self.0.host() {
            Some(url::Host::Ipv6(address)) => address.to_string(),
            Some(host) => host.to_string(),
            None => String::new(),
        }
    }

    pub fn port(&self) -> u16 {
        self.0.port_or_known_default().unwrap_or(80)
    }
}

/// Which addresses webhooks may reach: every public one, and those of `allowed` networks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkPolicy {
    allowed: Vec<IpNet>,
}

impl NetworkPolicy {
    /// A policy that also allows `networks` (CIDR, say `127.0.0.0/8` or `10.1.0.0/16`).
    pub fn allowing(networks: &[String]) -> Result<Self, ipnet::AddrParseError> {
        Ok(Self {
            allowed: networks
                .iter()
                .map(|network| network.trim().parse())
                .collect::<Result<_, _>>()?,
        })
    }

    /// Whether webhooks may connect to `address`.
    pub fn permits(&self, address: IpAddr) -> bool {
        let address = canonical(address);
        self.allowed
            .iter()
            .any(|network| network.contains(&address))
            || is_public(address)
    }

    /// Resolves `url`'s host and checks every address it gives: the addresses to connect to,
    /// or why none may be.
    pub async fn resolve(&self, url: &EndpointUrl) -> Result<Vec<SocketAddr>, UrlRefusal> {
        let host = url.host();
        let addresses: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(address) => vec![SocketAddr::new(address, url.port())],
            Err(_) => tokio::net::lookup_host((host.as_str(), url.port()))
                .await
                .map_err(|_| UrlRefusal::Unresolvable { host: host.clone() })?
                .collect(),
        };
        if addresses.is_empty() {
            return Err(UrlRefusal::Unresolvable { host });
        }
        // Every address, not just one: a connection may be made to any of them.
        if let Some(forbidden) = addresses.iter().find(|address| !self.permits(address.ip())) {
            return Err(UrlRefusal::ForbiddenAddress {
                host,
                address: forbidden.ip(),
            });
        }
        Ok(addresses)
    }
}

/// An IPv4 address written as IPv6 (`::ffff:10.0.0.1`) is checked as the IPv4 one it is.
fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

fn is_public(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(address: Ipv4Addr) -> bool {
    let [a, b, ..] = address.octets();
    !(address.is_loopback()
        || address.is_private()
        || address.is_link_local()
        || address.is_unspecified()
        || address.is_broadcast()
        || address.is_multicast()
        || address.is_documentation()
        || a == 0
        // Shared address space (carrier-grade NAT), RFC 6598.
        || (a == 100 && (64..128).contains(&b))
        // IETF protocol assignments and benchmarking, RFC 6890 and RFC 2544.
        || (a == 192 && b == 0 && address.octets()[2] == 0)
        || (a == 198 && (18..20).contains(&b))
        // Reserved for future use, 240.0.0.0/4.
        || a >= 240)
}

fn is_public_v6(address: Ipv6Addr) -> bool {
    let first = address.segments()[0];
    !(address.is_loopback()
        || address.is_unspecified()
        || address.is_multicast()
        // Unique local, fc00::/7.
        || (first & 0xfe00) == 0xfc00
        // Link-local, fe80::/10.
        || (first & 0xffc0) == 0xfe80
        // Site-local (deprecated), fec0::/10.
        || (first & 0xffc0) == 0xfec0
        // Documentation, 2001:db8::/32.
        || (first == 0x2001 && address.segments()[1] == 0x0db8)
        // NAT64 (64:ff9b::/96) reaches IPv4 addresses, private ones included.
        || (first == 0x0064 && address.segments()[1] == 0xff9b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_absolute_http_urls_with_a_host_and_nothing_secret_are_endpoints() {
        for bad in [
            "",
            "hooks.example.com/x",
            "ftp://hooks.example.com/x",
            "https://",
            "file:///etc/passwd",
            "javascript:alert(1)",
        ] {
            assert_eq!(EndpointUrl::parse(bad), Err(UrlRefusal::Malformed), "{bad}");
        }
        for secret in [
            "https://me:pw@hooks.example.com/",
            "https://hooks.example.com/#x",
        ] {
            assert_eq!(
                EndpointUrl::parse(secret),
                Err(UrlRefusal::CredentialsOrFragment)
            );
        }
        let long = format!("https://hooks.example.com/{}", "a".repeat(MAX_URL_CHARS));
        assert_eq!(EndpointUrl::parse(&long), Err(UrlRefusal::TooLong));
        let url = EndpointUrl::parse("https://[::1]:8443/in").unwrap();
        assert_eq!((url.host().as_str(), url.port()), ("::1", 8443));
    }

    #[test]
    fn internal_networks_are_refused_and_public_ones_reached() {
        let policy = NetworkPolicy::default();
        for internal in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
            "::ffff:127.0.0.1",
            "64:ff9b::a00:1",
        ] {
            assert!(!policy.permits(internal.parse().unwrap()), "{internal}");
        }
        for public in [
            "93.184.216.34",
            "8.8.8.8",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(policy.permits(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn a_network_the_configuration_allows_is_reached() {
        let policy = NetworkPolicy::allowing(&["127.0.0.0/8".into(), "::1/128".into()]).unwrap();
        assert!(policy.permits("127.0.0.1".parse().unwrap()));
        assert!(policy.permits("::1".parse().unwrap()));
        assert!(policy.permits("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!policy.permits("10.0.0.1".parse().unwrap()));
        assert!(NetworkPolicy::allowing(&["not a network".into()]).is_err());
    }

    #[tokio::test]
    async fn a_host_is_refused_when_any_of_its_addresses_is_internal() {
        let policy = NetworkPolicy::default();
        let url = EndpointUrl::parse("http://localhost:9/hook").unwrap();
        assert!(matches!(
            policy.resolve(&url).await,
            Err(UrlRefusal::ForbiddenAddress { .. })
        ));
        let literal = EndpointUrl::parse("http://169.254.169.254/latest/meta-data").unwrap();
        assert!(matches!(
            policy.resolve(&literal).await,
            Err(UrlRefusal::ForbiddenAddress { .. })
        ));
        let allowed = NetworkPolicy::allowing(&["127.0.0.0/8".into(), "::1/128".into()]).unwrap();
        assert!(!allowed.resolve(&url).await.unwrap().is_empty());
    }
}
