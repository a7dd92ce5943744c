//! Who a request comes from behind a load balancer: the client's address is taken from
//! `Forwarded` (RFC 7239) or `X-Forwarded-For` only when the connection itself comes from a
//! proxy named in `server.trusted_proxies`; from anyone else those headers are ignored, so a
//! client cannot pick the address its rate limits are counted under.

use std::net::IpAddr;

use actix_web::http::header::HeaderMap;
use ipnet::IpNet;

/// The proxies whose forwarding headers are believed.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// From `server.trusted_proxies`: addresses (`10.0.0.5`, `::1`) or CIDRs (`10.0.0.0/8`).
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        entries
            .iter()
            .map(|entry| {
                let entry = entry.trim();
                entry
                    .parse::<IpNet>()
                    .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("`{entry}` is neither an IP address nor a CIDR"))
            })
            .collect::<Result<_, _>>()
            .map(Self)
    }

    fn trusts(&self, address: IpAddr) -> bool {
        let address = canonical(address);
        self.0.iter().any(|net| net.contains(&address))
    }

    /// The client's address: `peer` itself unless it is a trusted proxy; then the hops its
    /// forwarding header lists, read from the nearest: the first one not trusted is the
    /// client. A hop that is not an address (`unknown`, an obfuscated name, garbage) ends
    /// the walk at the proxy that wrote it: nothing further out can be vouched for.
    pub fn client_address(&self, peer: Option<IpAddr>, headers: &HeaderMap) -> Option<IpAddr> {
        let peer = peer.map(canonical)?;
        if !self.trusts(peer) {
            return Some(peer);
        }
        let mut client = peer;
        for hop in forwarded_hops(headers).into_iter().rev() {
            match hop {
                Some(address) => {
                    client = address;
                    if !self.trusts(address) {
                        break;
                    }
                }
                None => break,
            }
        }
        Some(client)
    }
}

/// The hops a request passed through, farthest first: from `Forwarded`'s `for=` when the
/// request carries one, else from `X-Forwarded-For`; every instance of the header in order.
fn forwarded_hops(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    let forwarded: Vec<&str> = headers
        .get_all("forwarded")
        .filter_map(|v| v.to_str().ok())
        .collect();
    if !forwarded.is_empty() {
        return forwarded
            .iter()
            .flat_map(|v| v.split(','))
            .map(|element| {
                element
                    .split(';')
                    .filter_map(|pair| pair.split_once('='))
                    .find(|(name, _)| name.trim().eq_ignore_ascii_case("for"))
                    .and_then(|(_, value)| node_address(value))
            })
            .collect();
    }
    headers
        .get_all("x-forwarded-for")
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(node_address)
        .collect()
}

/// An address as proxies write it: `192.0.2.1`, `192.0.2.1:4711`, `2001:db8::1`,
/// `"[2001:db8::1]:4711"`.
fn node_address(text: &str) -> Option<IpAddr> {
    let text = text.trim().trim_matches('"');
    if let Ok(address) = text.parse::<IpAddr>() {
        return Some(canonical(address));
    }
    if let Some(rest) = text.strip_prefix('[') {
        let (inside, _port) = rest.split_once(']')?;
        return inside.parse::<IpAddr>().ok().map(canonical);
    }
    let (host, port) = text.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

/// IPv4 addresses seen through an IPv6 socket (`::ffff:10.0.0.1`) as the IPv4 they are.
fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::{HeaderName, HeaderValue};

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        map
    }

    fn ip(text: &str) -> Option<IpAddr> {
        Some(text.parse().unwrap())
    }

    fn trusted(entries: &[&str]) -> TrustedProxies {
        TrustedProxies::parse(&entries.iter().map(|e| e.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn headers_from_an_untrusted_peer_are_ignored() {
        let h = headers(&[("x-forwarded-for", "203.0.113.7")]);
        assert_eq!(
            trusted(&[]).client_address(ip("198.51.100.2"), &h),
            ip("198.51.100.2")
        );
        assert_eq!(
            trusted(&["10.0.0.0/8"]).client_address(ip("198.51.100.2"), &h),
            ip("198.51.100.2")
        );
    }

    #[test]
    fn the_nearest_untrusted_hop_is_the_client() {
        let proxies = trusted(&["10.0.0.0/8", "127.0.0.1"]);
        // The client wrote a forged first hop; the trusted proxy appended the real one.
        let h = headers(&[("x-forwarded-for", "1.2.3.4, 203.0.113.7, 10.1.1.1")]);
        assert_eq!(
            proxies.client_address(ip("127.0.0.1"), &h),
            ip("203.0.113.7")
        );
        // Every hop trusted: the farthest is the client.
        let h = headers(&[("x-forwarded-for", "10.0.0.9, 10.1.1.1")]);
        assert_eq!(proxies.client_address(ip("127.0.0.1"), &h), ip("10.0.0.9"));
        // No header: the proxy itself.
        assert_eq!(
            proxies.client_address(ip("127.0.0.1"), &HeaderMap::new()),
            ip("127.0.0.1")
        );
        // Several header lines are one list, in order.
        let h = headers(&[
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-for", "10.2.2.2"),
        ]);
        assert_eq!(
            proxies.client_address(ip("::ffff:127.0.0.1"), &h),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn forwarded_wins_over_x_forwarded_for_and_takes_ports_and_brackets() {
        let proxies = trusted(&["10.0.0.0/8"]);
        let h = headers(&[
            ("x-forwarded-for", "198.51.100.1"),
            (
                "forwarded",
                "for=\"[2001:db8::17]:4711\";proto=https, for=10.0.0.3:80;by=10.0.0.1",
            ),
        ]);
        assert_eq!(
            proxies.client_address(ip("10.0.0.2"), &h),
            ip("2001:db8::17")
        );
    }

    #[test]
    fn a_hop_that_is_no_address_stops_the_walk() {
        let proxies = trusted(&["10.0.0.0/8"]);
        let h = headers(&[("x-forwarded-for", "203.0.113.7, unknown, 10.0.0.4")]);
        assert_eq!(proxies.client_address(ip("10.0.0.2"), &h), ip("10.0.0.4"));
        let h = headers(&[("forwarded", "for=_hidden, for=10.0.0.4")]);
        assert_eq!(proxies.client_address(ip("10.0.0.2"), &h), ip("10.0.0.4"));
    }

    #[test]
    fn entries_must_be_addresses_or_cidrs() {
        assert!(TrustedProxies::parse(&["10.0.0.0/8".into(), "::1".into()]).is_ok());
        let err = TrustedProxies::parse(&["nginx".into()]).unwrap_err();
        assert!(err.contains("`nginx`"), "{err}");
    }
}
