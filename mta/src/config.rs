//! The `[mta]` configuration section.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::shaping::{EgressConfig, Limits, ShapingSettings};

/// `[mta]`: how delivery workers lease, route and deliver mail.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MtaConfig {
    /// The name sent with EHLO/HELO. Set it to the FQDN your sending IPs' PTR records
    /// point to: many receivers reject or penalise a name that does not match.
    pub ehlo_hostname: String,
    /// Most SMTP connections open at once, over all destinations.
    pub max_concurrent_deliveries: usize,
    /// Most connections open at once on one path (egress IP × provider, or × recipient
    /// domain when no provider claims it), unless the shaping data says otherwise.
    pub max_connections_per_path: u32,
    /// Most recipients in one SMTP transaction (RFC 5321 requires servers to take 100);
    /// more are sent in further transactions over the same connection.
    pub max_recipients_per_transaction: u32,
    /// Most messages taken from the spool by one lease.
    pub lease_batch: usize,
    /// How long a worker holds leased messages. Must exceed the worst case of one
    /// connection setup plus one message (see `timeouts`); a worker releases what it cannot
    /// start in time, so this bounds how long a crashed worker's messages stay invisible.
    #[serde(with = "humantime_serde")]
    pub lease_for: Duration,
    /// Most messages delivered over one connection before it is closed (unless the shaping
    /// data says otherwise). One lease takes at most this many messages per destination, so
    /// one backlog cannot fill a whole lease.
    pub max_messages_per_connection: usize,
    /// How often idle workers look for due mail when not woken by the edge.
    #[serde(with = "humantime_serde")]
    pub idle_poll: Duration,
    /// Fixed next hops per recipient domain, bypassing MX: `"example.com" = ["relay:2525"]`.
    /// Each entry is `host`, `host:port`, `ip:port` or `[ipv6]:port`; tried in order.
    pub routes: BTreeMap<String, Vec<String>>,
    /// Next hops for all mail without a `routes` entry (a smart host), bypassing MX.
    pub smart_host: Vec<String>,
    /// The port MX hosts are contacted on (and routes without a port).
    pub port: u16,
    pub resolver: ResolverSettings,
    pub tls: TlsSettings,
    pub retry: RetrySettings,
    pub timeouts: Timeouts,
    /// Limits per provider and per egress IP (docs/shaping.md).
    pub shaping: ShapingSettings,
    /// Source IPs and pools.
    pub egress: EgressConfig,
}

impl Default for MtaConfig {
    fn default() -> Self {
        MtaConfig {
            ehlo_hostname: machine_hostname(),
            max_concurrent_deliveries: 100,
            max_connections_per_path: 20,
            max_recipients_per_transaction: 100,
            lease_batch: 200,
            lease_for: Duration::from_secs(600),
            max_messages_per_connection: 100,
            idle_poll: Duration::from_millis(500),
            routes: BTreeMap::new(),
            smart_host: Vec::new(),
            port: 25,
            resolver: ResolverSettings::default(),
            tls: TlsSettings::default(),
            retry: RetrySettings::default(),
            timeouts: Timeouts::default(),
            shaping: ShapingSettings::default(),
            egress: EgressConfig::default(),
        }
    }
}

/// `[mta.resolver]`: the DNS resolver used for MX and address lookups.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResolverSettings {
    /// Name servers as `ip:port` (e.g. `"127.0.0.1:53"`); empty means /etc/resolv.conf.
    pub nameservers: Vec<SocketAddr>,
    /// How long to wait for one answer from one name server.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// How many times a query is sent before the lookup fails.
    pub attempts: usize,
}

impl Default for ResolverSettings {
    fn default() -> Self {
        ResolverSettings { nameservers: Vec::new(), timeout: Duration::from_secs(5), attempts: 2 }
    }
}

/// Whether to use STARTTLS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    /// Use STARTTLS when offered; fall back to plain text when it is not, or when the
    /// handshake fails.
    #[default]
    Opportunistic,
    /// Deliver only over TLS; a host without working STARTTLS is a temporary failure.
    Required,
    /// Never use STARTTLS.
    Disabled,
}

/// `[mta.tls]`
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSettings {
    /// `opportunistic` (default), `required` or `disabled`.
    pub mode: TlsMode,
    /// Check the server certificate against the system's trusted roots and the host name.
    /// Off by default: MX certificates often do not match, and opportunistic TLS protects
    /// against passive listeners only anyway. With `opportunistic`, a certificate that fails
    /// the check makes the delivery fall back to plain text; with `required`, it defers.
    pub verify_certificates: bool,
}

/// `[mta.retry]`: when temporarily failed recipients are tried again.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrySettings {
    /// Wait before the first retry.
    #[serde(with = "humantime_serde")]
    pub initial: Duration,
    /// Each further wait is the previous one times this.
    pub factor: f64,
    /// Longest wait between two attempts.
    #[serde(with = "humantime_serde")]
    pub max_interval: Duration,
    /// Give up this long after the message was accepted (pending recipients bounce with
    /// 4.4.7). The edge stamps each message's expiry with it; the earlier of that stamp and
    /// `created + max_age` applies, so lowering it also affects queued mail.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            initial: Duration::from_secs(300),
            factor: 2.0,
            max_interval: Duration::from_secs(2 * 3600),
            max_age: Duration::from_secs(72 * 3600),
        }
    }
}

/// `[mta.timeouts]`: every network wait has one.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// TCP connect.
    #[serde(with = "humantime_serde")]
    pub connect: Duration,
    /// The STARTTLS reply, and the TLS handshake.
    #[serde(with = "humantime_serde")]
    pub tls: Duration,
    /// The server's greeting.
    #[serde(with = "humantime_serde")]
    pub banner: Duration,
    /// The EHLO/HELO reply.
    #[serde(with = "humantime_serde")]
    pub ehlo: Duration,
    /// The MAIL FROM reply (also RSET and QUIT).
    #[serde(with = "humantime_serde")]
    pub mail: Duration,
    /// Each RCPT TO reply.
    #[serde(with = "humantime_serde")]
    pub rcpt: Duration,
    /// The DATA reply, and each 64 KiB block of the message written.
    #[serde(with = "humantime_serde")]
    pub data: Duration,
    /// The reply after the final dot.
    #[serde(with = "humantime_serde")]
    pub end_of_data: Duration,
    /// How long a connection stays open after its last message, looking for more due mail
    /// to the same destination before it says QUIT. `0s` closes at once.
    #[serde(with = "humantime_serde")]
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        let s = Duration::from_secs;
        Timeouts {
            connect: s(30),
            tls: s(30),
            banner: s(30),
            ehlo: s(30),
            mail: s(60),
            rcpt: s(60),
            data: s(60),
            end_of_data: s(120),
            idle: s(5),
        }
    }
}

impl Timeouts {
    /// The longest one connection setup can take: connect, greeting, EHLO, STARTTLS, EHLO.
    pub fn setup_budget(&self) -> Duration {
        self.connect + self.banner + self.ehlo + self.tls * 2 + self.ehlo
    }

    /// The longest one message transaction can take with a single recipient and a body
    /// of one block. (Every wait is also cut short at the end of the lease, so this is the
    /// bar for starting a message, not a guarantee.)
    pub fn message_budget(&self) -> Duration {
        self.mail + self.rcpt + self.data * 2 + self.end_of_data
    }
}

/// Time kept in reserve at the end of every lease for writing the outcome to the spool.
pub(crate) const SPOOL_MARGIN: Duration = Duration::from_secs(5);

/// A next hop from `routes` or `smart_host`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HostPort {
    pub host: String,
    pub ip: Option<IpAddr>,
    pub port: Option<u16>,
}

impl HostPort {
    /// Parses `host`, `host:port`, `ip`, `ip:port` or `[ipv6]:port`.
    pub fn parse(s: &str) -> Result<HostPort, String> {
        let s = s.trim();
        if let Ok(sa) = s.parse::<SocketAddr>() {
            return Ok(HostPort { host: sa.ip().to_string(), ip: Some(sa.ip()), port: Some(sa.port()) });
        }
        if let Ok(ip) = s.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            return Ok(HostPort { host: ip.to_string(), ip: Some(ip), port: None });
        }
        let (host, port) = match s.rsplit_once(':') {
            Some((h, p)) => (h, Some(p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| format!("{s:?} has an invalid port"))?)),
            None => (s, None),
        };
        if !is_hostname(host) {
            return Err(format!("{s:?} is not host, host:port, ip:port or [ipv6]:port"));
        }
        Ok(HostPort { host: host.trim_end_matches('.').to_ascii_lowercase(), ip: None, port })
    }
}

/// A syntactically valid DNS host name (letters, digits, hyphens, underscores and dots).
/// The kernel's host name (the default EHLO name), `localhost` if unreadable or not a name.
fn machine_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|n| n.trim().to_string())
        .ok()
        .filter(|n| is_hostname(n))
        .unwrap_or_else(|| "localhost".into())
}

pub(crate) fn is_hostname(s: &str) -> bool {
    let s = s.trim_end_matches('.');
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

impl MtaConfig {
    /// Checks every key; the error names the key relative to `[mta]`.
    pub fn validate(&self) -> Result<(), String> {
        if !is_hostname(&self.ehlo_hostname) {
            return Err(format!("ehlo_hostname: {:?} is not a valid host name", self.ehlo_hostname));
        }
        for (key, v) in [
            ("max_concurrent_deliveries", self.max_concurrent_deliveries),
            ("lease_batch", self.lease_batch),
            ("max_messages_per_connection", self.max_messages_per_connection),
            ("max_connections_per_path", self.max_connections_per_path as usize),
            ("max_recipients_per_transaction", self.max_recipients_per_transaction as usize),
            ("resolver.attempts", self.resolver.attempts),
        ] {
            if v == 0 {
                return Err(format!("{key}: must be at least 1"));
            }
        }
        if self.port == 0 {
            return Err("port: must be between 1 and 65535".into());
        }
        let t = &self.timeouts;
        for (key, d) in [
            ("idle_poll", self.idle_poll),
            ("resolver.timeout", self.resolver.timeout),
            ("retry.initial", self.retry.initial),
            ("retry.max_age", self.retry.max_age),
            ("timeouts.connect", t.connect),
            ("timeouts.tls", t.tls),
            ("timeouts.banner", t.banner),
            ("timeouts.ehlo", t.ehlo),
            ("timeouts.mail", t.mail),
            ("timeouts.rcpt", t.rcpt),
            ("timeouts.data", t.data),
            ("timeouts.end_of_data", t.end_of_data),
        ] {
            if d.is_zero() {
                return Err(format!("{key}: must be greater than zero"));
            }
        }
        if !(self.retry.factor >= 1.0 && self.retry.factor <= 100.0) {
            return Err(format!("retry.factor: must be between 1 and 100, not {}", self.retry.factor));
        }
        if self.retry.max_interval < self.retry.initial {
            return Err("retry.max_interval: must not be shorter than retry.initial".into());
        }
        let needed = t.setup_budget() + t.message_budget() + SPOOL_MARGIN;
        if self.lease_for <= needed {
            return Err(format!(
                "lease_for: must exceed one connection setup plus one message with these timeouts ({}s); raise it or lower the timeouts",
                needed.as_secs()
            ));
        }
        for (domain, hops) in &self.routes {
            if !is_hostname(domain) {
                return Err(format!("routes: {domain:?} is not a domain name"));
            }
            if hops.is_empty() {
                return Err(format!("routes.{domain}: needs at least one host"));
            }
            for h in hops {
                HostPort::parse(h).map_err(|e| format!("routes.{domain}: {e}"))?;
            }
        }
        for h in &self.smart_host {
            HostPort::parse(h).map_err(|e| format!("smart_host: {e}"))?;
        }
        self.shaping.validate()?;
        self.egress.validate()?;
        Ok(())
    }

    /// The lowest level of shaping limits: what this section says.
    pub fn base_limits(&self) -> Limits {
        Limits {
            max_connections: self.max_connections_per_path,
            connection_rate: None,
            message_rate: None,
            max_messages_per_connection: self.max_messages_per_connection as u32,
            max_recipients_per_transaction: self.max_recipients_per_transaction,
            idle_timeout: self.timeouts.idle,
            tls: self.tls.mode,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        MtaConfig::default().validate().unwrap();
    }

    #[test]
    fn bad_values_name_their_key() {
        let err = |f: fn(&mut MtaConfig)| {
            let mut c = MtaConfig::default();
            f(&mut c);
            c.validate().unwrap_err()
        };
        assert!(err(|c| c.lease_batch = 0).starts_with("lease_batch:"));
        assert!(err(|c| c.ehlo_hostname = "bad name".into()).starts_with("ehlo_hostname:"));
        assert!(err(|c| c.lease_for = Duration::from_secs(60)).starts_with("lease_for:"));
        assert!(err(|c| c.retry.factor = 0.5).starts_with("retry.factor:"));
        assert!(err(|c| c.timeouts.rcpt = Duration::ZERO).starts_with("timeouts.rcpt:"));
        assert!(err(|c| {
            c.routes.insert("x.test".into(), vec!["host:notaport".into()]);
        })
        .starts_with("routes.x.test:"));
        assert!(err(|c| c.smart_host = vec!["a b".into()]).starts_with("smart_host:"));
    }

    #[test]
    fn host_ports_parse() {
        let hp = HostPort::parse("127.0.0.1:2525").unwrap();
        assert_eq!((hp.ip, hp.port), (Some("127.0.0.1".parse().unwrap()), Some(2525)));
        let hp = HostPort::parse("[::1]:25").unwrap();
        assert_eq!(hp.ip, Some("::1".parse().unwrap()));
        let hp = HostPort::parse("Relay.Example.com:587").unwrap();
        assert_eq!((hp.host.as_str(), hp.ip, hp.port), ("relay.example.com", None, Some(587)));
        assert_eq!(HostPort::parse("relay.example.com").unwrap().port, None);
        assert!(HostPort::parse("relay:0").is_err());
        assert!(HostPort::parse("").is_err());
    }

    #[test]
    fn parses_from_toml_with_humantime_durations() {
        let c: MtaConfig = toml::from_str(
            r#"
            ehlo_hostname = "mta1.example.com"
            smart_host = ["127.0.0.1:2525"]
            [routes]
            "example.org" = ["mx.example.org:25"]
            [resolver]
            nameservers = ["127.0.0.1:5300"]
            timeout = "2s"
            [tls]
            mode = "required"
            [retry]
            initial = "1s"
            [timeouts]
            end_of_data = "90s"
            [shaping]
            files = ["@default"]
            expiry_check = "1m"
            [egress.pools.main]
            sources = [{ ip = "127.0.0.2", ehlo = "out2.example.com" }]
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.shaping.expiry_check, Duration::from_secs(60));
        assert_eq!(c.egress.pools["main"].sources[0].ehlo.as_deref(), Some("out2.example.com"));
        let bad: MtaConfig = toml::from_str("[egress.pools.main]\nsources = []").unwrap();
        assert!(bad.validate().unwrap_err().starts_with("egress.pools.main.sources:"));
        let bad = MtaConfig { max_connections_per_path: 0, ..MtaConfig::default() };
        assert!(bad.validate().unwrap_err().starts_with("max_connections_per_path:"));
        assert_eq!(c.tls.mode, TlsMode::Required);
        assert_eq!(c.retry.initial, Duration::from_secs(1));
        assert_eq!(c.resolver.nameservers[0].port(), 5300);
        assert!(toml::from_str::<MtaConfig>("nonsense = 1").is_err());
    }
}
