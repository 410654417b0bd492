//! The `[smtp]` configuration section.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

/// Configuration of the SMTP relay (`[smtp]`).
///
/// ```toml
/// [smtp]
/// listen = "0.0.0.0:587"
/// hostname = "relay.example.com"
/// relay_networks = ["10.0.0.0/8"]
/// tls_cert = "/etc/sluice/relay.crt"
/// tls_key = "/etc/sluice/relay.key"
/// users = [{ name = "billing", password_sha256 = "<64 hex digits>" }]
/// ```
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpConfig {
    /// Address and port the relay listens on.
    pub listen: SocketAddr,
    /// The name the server announces in its greeting, its EHLO reply, `Received:` headers and
    /// generated `Message-ID`s, and the name in the self-signed certificate. Defaults to the
    /// machine's hostname.
    pub hostname: String,
    /// Largest message accepted, in bytes (advertised as `SIZE`). Larger messages get `552`.
    pub max_message_bytes: usize,
    /// Longest line of message data accepted, in bytes, not counting the line ending. RFC
    /// 5321 §4.5.3.1.6 allows 998 (1000 with CRLF), and receivers may refuse or break longer
    /// lines, so a message with a longer line is refused with `550 5.6.0` after its final dot
    /// (naming the line) and nothing is queued: the client should encode such content as
    /// quoted-printable or base64. Raise it to pass long lines on unchanged. (Command lines
    /// have their own fixed limit of 4096 bytes, smtp-proto's, answered with `500 5.5.2`.)
    pub max_line_length: usize,
    /// Most recipients in one transaction; further `RCPT`s get `452 4.5.3` (the client sends
    /// them in a second transaction).
    pub max_recipients: usize,
    /// Most concurrent sessions; a connection beyond this gets `421` and is closed.
    pub max_connections: usize,
    /// After this many error replies (5xx) in one session, the server answers `421` and
    /// closes the connection.
    pub max_errors: u32,
    /// How long the server waits for each command line before it answers `421 4.4.2` and
    /// closes (RFC 5321 asks for at least 5 minutes). Also bounds writing each reply, the
    /// STARTTLS handshake, and the spool's confirmation of a message (`451` when exceeded).
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// How long one message's data may take to arrive, from the `354` to the final dot.
    #[serde(with = "humantime_serde")]
    pub data_timeout: Duration,
    /// On shutdown, how long sessions may take to finish the transaction in progress before
    /// their connections are dropped.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Client networks allowed to relay without authenticating (tenant `net:<ip>`). Everyone
    /// else must authenticate. Keep this to networks you control: never `0.0.0.0/0`.
    pub relay_networks: Vec<IpNet>,
    /// Offer and accept `AUTH` only on a TLS-protected session (after `STARTTLS`), so that
    /// passwords never cross the network in clear text.
    pub auth_requires_tls: bool,
    /// PEM file with the certificate chain for `STARTTLS`. When both `tls_cert` and `tls_key`
    /// are absent, a self-signed certificate for `hostname` is generated at startup.
    pub tls_cert: Option<PathBuf>,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1) matching `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Accounts that may authenticate besides `apikey` (whose password is an API key).
    pub users: Vec<SmtpUser>,
}

/// One SMTP account: `{ name = "billing", password_sha256 = "<64 hex digits>" }`. Messages it
/// submits belong to tenant `smtp:<name>`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SmtpUser {
    /// The user name given in `AUTH`. `apikey` is reserved for API keys.
    pub name: String,
    /// Lower-case hex SHA-256 of the password (`printf %s PASSWORD | sha256sum`); the
    /// password itself is never configured. Use long random passwords: an unsalted hash only
    /// resists guessing when the password has high entropy.
    pub password_sha256: String,
}

/// RFC 5321's limit on a line of message data, without its CRLF.
pub const RFC5321_MAX_LINE: usize = 998;

/// The user name under which an API key authenticates, as with SendGrid.
pub const API_KEY_USER: &str = "apikey";

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 2525)),
            hostname: machine_hostname(),
            max_message_bytes: 30 * 1024 * 1024,
            max_line_length: RFC5321_MAX_LINE,
            max_recipients: 1000,
            max_connections: 1000,
            max_errors: 10,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(600),
            shutdown_timeout: Duration::from_secs(30),
            relay_networks: vec!["127.0.0.1/32".parse().expect("literal"), "::1/128".parse().expect("literal")],
            auth_requires_tls: true,
            tls_cert: None,
            tls_key: None,
            users: Vec::new(),
        }
    }
}

impl SmtpConfig {
    /// Checks every key; the error names the key relative to `[smtp]`.
    pub fn validate(&self) -> Result<(), String> {
        if !is_valid_hostname(&self.hostname) {
            return Err(format!(
                "hostname: {:?} is not a valid host name (letters, digits, '-' and '.', labels of 1-63 characters)",
                self.hostname
            ));
        }
        if self.max_message_bytes < 1024 {
            return Err("max_message_bytes: must be at least 1024".into());
        }
        // The spool keeps whole messages in memory while writing them.
        if self.max_message_bytes > 1024 * 1024 * 1024 {
            return Err("max_message_bytes: must be at most 1073741824 (1 GiB)".into());
        }
        if self.max_line_length < RFC5321_MAX_LINE {
            return Err(format!(
                "max_line_length: must be at least {RFC5321_MAX_LINE} (RFC 5321 lets clients send lines that long)"
            ));
        }
        if self.max_recipients == 0 {
            return Err("max_recipients: must be at least 1".into());
        }
        if self.max_connections == 0 {
            return Err("max_connections: must be at least 1".into());
        }
        if self.max_errors == 0 {
            return Err("max_errors: must be at least 1".into());
        }
        for (key, value) in [
            ("command_timeout", self.command_timeout),
            ("data_timeout", self.data_timeout),
            ("shutdown_timeout", self.shutdown_timeout),
        ] {
            if value < Duration::from_secs(1) {
                return Err(format!("{key}: must be at least 1s"));
            }
        }
        for (index, net) in self.relay_networks.iter().enumerate() {
            if net.prefix_len() == 0 {
                return Err(format!(
                    "relay_networks[{index}]: {net} would let anyone relay (an open relay); list only networks you control"
                ));
            }
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => return Err("tls_key: must be set when tls_cert is set".into()),
            (None, Some(_)) => return Err("tls_cert: must be set when tls_key is set".into()),
            _ => {}
        }
        let mut names = HashSet::new();
        for (index, user) in self.users.iter().enumerate() {
            let name = user.name.trim();
            if name.is_empty() || name != user.name || user.name.chars().any(char::is_control) {
                return Err(format!(
                    "users[{index}].name: must be non-empty, without surrounding spaces or control characters"
                ));
            }
            if name.eq_ignore_ascii_case(API_KEY_USER) {
                return Err(format!(
                    "users[{index}].name: \"{API_KEY_USER}\" is reserved for API keys (configure those under [[api_keys]])"
                ));
            }
            if !names.insert(name) {
                return Err(format!("users[{index}].name: {name:?} is configured twice"));
            }
            if parse_sha256(&user.password_sha256).is_none() {
                return Err(format!(
                    "users[{index}].password_sha256: must be 64 hex digits, the SHA-256 of the password (never the password itself)"
                ));
            }
        }
        Ok(())
    }
}

/// Decodes a hex SHA-256 digest as configured (case-insensitive, surrounding spaces ignored).
pub(crate) fn parse_sha256(hex_digest: &str) -> Option<[u8; 32]> {
    let mut digest = [0u8; 32];
    hex::decode_to_slice(hex_digest.trim().to_ascii_lowercase(), &mut digest).ok()?;
    Some(digest)
}

/// A DNS host name as it may appear in a greeting, a `Received:` header and a certificate.
fn is_valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// The kernel's host name; `localhost` when it cannot be read. Read from `/proc` (Linux, where
/// sluice runs) so no `unsafe` `gethostname` call is needed.
fn machine_hostname() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .map(|name| name.trim().to_string())
        .find(|name| is_valid_hostname(name))
        .unwrap_or_else(|| "localhost".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_local_only() {
        let config = SmtpConfig::default();
        config.validate().unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:2525");
        assert_eq!(config.max_message_bytes, 30 * 1024 * 1024);
        assert_eq!(config.max_recipients, 1000);
        assert_eq!(config.max_line_length, 998);
        assert!(config.auth_requires_tls);
        assert_eq!(config.relay_networks.len(), 2);
        assert!(config.relay_networks.iter().all(|n| n.addr().is_loopback()));
    }

    #[test]
    fn parses_humantime_and_rejects_unknown_keys() {
        let config: SmtpConfig = serde_json::from_value(serde_json::json!({
            "hostname": "relay.example.com",
            "command_timeout": "30s",
            "data_timeout": "2m",
            "relay_networks": ["10.0.0.0/8"],
            "users": [{ "name": "billing", "password_sha256": "a".repeat(64) }],
        }))
        .unwrap();
        assert_eq!(config.command_timeout, Duration::from_secs(30));
        assert_eq!(config.data_timeout, Duration::from_secs(120));
        config.validate().unwrap();
        let unknown = serde_json::from_value::<SmtpConfig>(serde_json::json!({ "max_size": 10 }));
        assert!(unknown.unwrap_err().to_string().contains("unknown field"));
    }

    #[test]
    fn validation_names_the_key() {
        let check = |f: &dyn Fn(&mut SmtpConfig)| {
            let mut config = SmtpConfig { hostname: "relay.example.com".into(), ..Default::default() };
            f(&mut config);
            config.validate().unwrap_err()
        };
        assert!(check(&|c| c.max_message_bytes = 10).starts_with("max_message_bytes:"));
        assert!(check(&|c| c.max_recipients = 0).starts_with("max_recipients:"));
        assert!(check(&|c| c.max_line_length = 997).starts_with("max_line_length:"));
        assert!(check(&|c| c.max_errors = 0).starts_with("max_errors:"));
        assert!(check(&|c| c.command_timeout = Duration::ZERO).starts_with("command_timeout:"));
        assert!(check(&|c| c.hostname = "bad host".into()).starts_with("hostname:"));
        assert!(check(&|c| c.relay_networks = vec!["0.0.0.0/0".parse().unwrap()]).contains("open relay"));
        assert!(check(&|c| c.tls_cert = Some("/x.pem".into())).starts_with("tls_key:"));
        let user = |name: &str, hash: &str| SmtpUser { name: name.into(), password_sha256: hash.into() };
        let good = "b".repeat(64);
        assert!(check(&|c| c.users = vec![user("apikey", &good)]).contains("reserved"));
        assert!(check(&|c| c.users = vec![user("a", "secret")]).starts_with("users[0].password_sha256:"));
        assert!(check(&|c| c.users = vec![user("a", &good), user("a", &good)]).starts_with("users[1].name:"));
    }
}
