//! Who may relay through the SMTP edge. This is the one place that decides it, so that the
//! server can never become an open relay by accident.

use std::net::IpAddr;

use ipnet::IpNet;

/// The outcome of the relay policy for one client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RelayDecision {
    /// The client may send; its messages belong to `tenant`.
    Allowed { tenant: String },
    /// The client must authenticate first (`530 5.7.0`).
    AuthenticationRequired,
}

/// Decides whether a client may relay: an authenticated client always may (as its own
/// tenant); an unauthenticated one only from `relay_networks` (tenant `net:<ip>`).
///
/// IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`, as a dual-stack listener reports IPv4
/// clients) are matched as the IPv4 address they are.
pub fn relay_decision(authenticated_tenant: Option<&str>, client: IpAddr, relay_networks: &[IpNet]) -> RelayDecision {
    if let Some(tenant) = authenticated_tenant {
        return RelayDecision::Allowed { tenant: tenant.to_string() };
    }
    let client = client.to_canonical();
    if relay_networks.iter().any(|net| net.contains(&client)) {
        RelayDecision::Allowed { tenant: format!("net:{client}") }
    } else {
        RelayDecision::AuthenticationRequired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn unauthenticated_clients_relay_only_from_listed_networks() {
        let networks = nets(&["10.1.0.0/16", "2001:db8::/32"]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            relay_decision(None, ip("10.1.2.3"), &networks),
            RelayDecision::Allowed { tenant: "net:10.1.2.3".into() }
        );
        assert_eq!(
            relay_decision(None, ip("::ffff:10.1.2.3"), &networks),
            RelayDecision::Allowed { tenant: "net:10.1.2.3".into() }
        );
        assert!(matches!(relay_decision(None, ip("2001:db8::7"), &networks), RelayDecision::Allowed { .. }));
        for outsider in ["10.2.0.1", "127.0.0.1", "::1", "::ffff:192.0.2.1", "203.0.113.9"] {
            assert_eq!(
                relay_decision(None, ip(outsider), &networks),
                RelayDecision::AuthenticationRequired,
                "{outsider}"
            );
        }
        assert_eq!(relay_decision(None, ip("10.1.2.3"), &[]), RelayDecision::AuthenticationRequired);
    }

    #[test]
    fn authenticated_clients_relay_as_their_tenant_from_anywhere() {
        let decision = relay_decision(Some("apikey:billing"), "203.0.113.9".parse().unwrap(), &[]);
        assert_eq!(decision, RelayDecision::Allowed { tenant: "apikey:billing".into() });
    }
}
