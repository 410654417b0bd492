//! Where mail for a domain goes: configured routes, a smart host, or the domain's MX hosts
//! resolved per RFC 5321 §5.1 (preference order, equal preferences shuffled, the domain's
//! own address when it has no MX, RFC 7505 null MX as a permanent failure).
//!
//! Failures come back as synthetic replies so they go through the same classification as
//! real ones: 5xx where the answer is authoritative (NXDOMAIN, null MX), 4xx otherwise.
//! Answers are cached by hickory's resolver cache for their TTL (negative answers for the
//! SOA minimum), so a burst of mail to one domain costs one lookup.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use hickory_resolver::config::{ConnectionConfig, LookupIpStrategy, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::{Resolver, TokioResolver};
use rand::seq::SliceRandom;
use sluice_rules::Reply;

use crate::config::{HostPort, MtaConfig};
use crate::synthetic;
use crate::MtaSetupError;

/// One next hop: a host to connect to, in order of preference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Hop {
    /// The host name without a trailing dot (or the IP as text), for TLS names and logs.
    pub name: String,
    /// Known address (IP routes and address literals); otherwise looked up.
    pub ip: Option<IpAddr>,
    pub port: u16,
}

/// Resolves destinations to hops and hops to addresses.
pub(crate) struct Router {
    resolver: TokioResolver,
    routes: HashMap<String, Vec<HostPort>>,
    smart_host: Vec<HostPort>,
    port: u16,
    /// Upper bound for one lookup, over all attempts and servers.
    lookup_timeout: Duration,
}

/// `name` as an absolute name, so no search domains are appended.
fn fqdn(name: &str) -> String {
    if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    }
}

impl Router {
    pub fn new(config: &MtaConfig) -> Result<Router, MtaSetupError> {
        let r = &config.resolver;
        let ours = |opts: &mut ResolverOpts| {
            opts.timeout = r.timeout;
            opts.attempts = r.attempts;
            opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        };
        let resolver = if r.nameservers.is_empty() {
            let mut builder = TokioResolver::builder_tokio().map_err(|e| MtaSetupError::Resolver(e.to_string()))?;
            ours(builder.options_mut());
            builder.build()
        } else {
            let servers = r
                .nameservers
                .iter()
                .map(|ns| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = ns.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = ns.port();
                    NameServerConfig::new(ns.ip(), true, vec![udp, tcp])
                })
                .collect();
            let cfg = ResolverConfig::from_parts(None, vec![], servers);
            let mut opts = ResolverOpts::default();
            ours(&mut opts);
            Resolver::builder_with_config(cfg, TokioRuntimeProvider::default()).with_options(opts).build()
        }
        .map_err(|e| MtaSetupError::Resolver(e.to_string()))?;
        let parse = |hops: &[String]| hops.iter().map(|h| HostPort::parse(h)).collect::<Result<Vec<_>, _>>();
        let routes = config
            .routes
            .iter()
            .map(|(d, hops)| Ok((d.trim_end_matches('.').to_ascii_lowercase(), parse(hops)?)))
            .collect::<Result<_, String>>()
            .map_err(MtaSetupError::Config)?;
        let smart_host = parse(&config.smart_host).map_err(MtaSetupError::Config)?;
        let servers = r.nameservers.len().max(1) as u32;
        let lookup_timeout = r.timeout * (r.attempts as u32 * servers + 1);
        Ok(Router { resolver, routes, smart_host, port: config.port, lookup_timeout })
    }

    fn configured(&self, hops: &[HostPort]) -> Vec<Hop> {
        hops.iter().map(|h| Hop { name: h.host.clone(), ip: h.ip, port: h.port.unwrap_or(self.port) }).collect()
    }

    /// The hops for mail to `domain`, most preferred first.
    pub async fn hops(&self, domain: &str) -> Result<Vec<Hop>, Reply> {
        if let Some(hops) = self.routes.get(domain) {
            return Ok(self.configured(hops));
        }
        if !self.smart_host.is_empty() {
            return Ok(self.configured(&self.smart_host));
        }
        if let Some(literal) = domain.strip_prefix('[').and_then(|d| d.strip_suffix(']')) {
            let ip = literal.strip_prefix("IPv6:").unwrap_or(literal).parse::<IpAddr>().map_err(|_| {
                synthetic::invalid_address_literal(domain)
            })?;
            return Ok(vec![Hop { name: ip.to_string(), ip: Some(ip), port: self.port }]);
        }
        self.mx_hops(domain).await
    }

    async fn mx_hops(&self, domain: &str) -> Result<Vec<Hop>, Reply> {
        let lookup = tokio::time::timeout(self.lookup_timeout, self.resolver.mx_lookup(fqdn(domain))).await;
        let mut mx: Vec<(u16, String)> = match lookup {
            Err(_) => return Err(synthetic::dns_failure(domain, "MX", &format!("no answer within {}s", self.lookup_timeout.as_secs()))),
            Ok(Ok(answer)) => answer
                .answers()
                .iter()
                .filter_map(|rec| match &rec.data {
                    RData::MX(m) => Some((m.preference, m.exchange.to_ascii())),
                    _ => None,
                })
                .collect(),
            Ok(Err(e)) if e.is_nx_domain() => {
                return Err(synthetic::nxdomain(domain));
            }
            // No MX records: the domain itself is the mail host (RFC 5321 §5.1 implicit MX).
            Ok(Err(e)) if e.is_no_records_found() => Vec::new(),
            Ok(Err(e)) => return Err(synthetic::dns_failure(domain, "MX", &e.to_string())),
        };
        if mx.is_empty() {
            return Ok(vec![Hop { name: domain.to_string(), ip: None, port: self.port }]);
        }
        // RFC 7505: a lone "0 ." says the domain accepts no mail.
        let is_null = |(_, host): &(u16, String)| host == "." || host.is_empty();
        if mx.iter().all(is_null) {
            return Err(synthetic::null_mx(domain));
        }
        mx.retain(|m| !is_null(m));
        mx.shuffle(&mut rand::rng());
        mx.sort_by_key(|(pref, _)| *pref); // stable: equal preferences stay shuffled
        Ok(mx
            .into_iter()
            .map(|(_, host)| Hop { name: host.trim_end_matches('.').to_string(), ip: None, port: self.port })
            .collect())
    }

    /// The addresses of `hop`. An error says whether the name definitely has none (5xx) or
    /// the lookup failed (4xx).
    pub async fn addresses(&self, hop: &Hop) -> Result<Vec<IpAddr>, Reply> {
        if let Some(ip) = hop.ip {
            return Ok(vec![ip]);
        }
        match tokio::time::timeout(self.lookup_timeout, self.resolver.lookup_ip(fqdn(&hop.name))).await {
            Err(_) => Err(synthetic::dns_failure(&hop.name, "A/AAAA", &format!("no answer within {}s", self.lookup_timeout.as_secs()))),
            Ok(Ok(ips)) => {
                // IPv4 first: hosts without IPv6 connectivity fail fast on v6 anyway, but a
                // v4 success should not wait behind v6 attempts.
                let (mut v4, v6): (Vec<IpAddr>, Vec<IpAddr>) = ips.iter().partition(|ip| ip.is_ipv4());
                v4.extend(v6);
                Ok(v4)
            }
            Ok(Err(e)) if e.is_no_records_found() => Err(synthetic::no_address(&hop.name, e.is_nx_domain())),
            Ok(Err(e)) => Err(synthetic::dns_failure(&hop.name, "A/AAAA", &e.to_string())),
        }
    }
}
