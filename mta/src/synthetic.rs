//! The replies sluice writes itself for failures that had no reply (refused, timed out, TLS,
//! DNS, DKIM), so they go through the same rules as real replies. Every one is made here:
//! the default table's `sluice.*` rules (rules/default/05-synthetic.toml) match these texts,
//! and mta/tests/synthetic_rules.rs checks that they still do. Their list is in
//! docs/rules.md.

use std::fmt::Display;
use std::net::SocketAddr;

use sluice_rules::{EnhancedCode, Reply};

use crate::smtp_client::ClientError;

fn synthetic(code: u16, enhanced: (u8, u16, u16), text: String) -> Reply {
    Reply::synthetic(code, EnhancedCode::new(enhanced.0, enhanced.1, enhanced.2), &text)
}

/// No TCP connection to `host` at `addr`.
pub fn connect_failed(host: &str, addr: SocketAddr, error: impl Display) -> Reply {
    synthetic(421, (4, 4, 1), format!("cannot connect to {host} [{addr}]: {error}"))
}

/// A failure that produced no reply while waiting for `host` during `during` (a step such
/// as "the greeting", "RCPT TO").
pub fn client_failure(e: &ClientError, host: &str, during: &str) -> Reply {
    match e {
        ClientError::Timeout(d) => {
            synthetic(451, (4, 4, 2), format!("timed out after {}s waiting for {host} during {during}", d.as_secs_f64()))
        }
        ClientError::Closed => synthetic(421, (4, 4, 2), format!("{host} closed the connection during {during}")),
        ClientError::Io(err) => synthetic(421, (4, 4, 2), format!("network error with {host} during {during}: {err}")),
        ClientError::Malformed(m) => synthetic(451, (4, 5, 0), format!("{host} answered {during} with a malformed reply: {m}")),
        ClientError::Tls(err) => synthetic(421, (4, 7, 5), format!("TLS handshake with {host} failed: {err}")),
    }
}

/// The MX host name cannot be used to verify a certificate.
pub fn invalid_tls_name(host: &str) -> Reply {
    synthetic(451, (4, 7, 5), format!("{host:?} is not a valid TLS server name"))
}

/// TLS is required and `host` refused STARTTLS with `reply`.
pub fn starttls_refused(host: &str, reply: &Reply) -> Reply {
    synthetic(451, (4, 7, 10), format!("{host} refused STARTTLS ({reply}) and TLS is required"))
}

/// TLS is required and `host` does not offer STARTTLS.
pub fn starttls_missing(host: &str) -> Reply {
    synthetic(451, (4, 7, 10), format!("{host} does not offer STARTTLS and TLS is required"))
}

/// No host could be tried: none had an address the source IP can reach, or the setup time
/// ran out.
pub fn no_host() -> Reply {
    synthetic(451, (4, 4, 4), "no host to deliver to (no usable address, or the time for setting up a connection ran out)".to_string())
}

/// `host` refused the RSET between two transactions of one message.
pub fn rset_refused(host: &str) -> Reply {
    synthetic(421, (4, 4, 2), format!("{host} did not accept RSET between transactions"))
}

/// The connection broke before these recipients' transaction started.
pub fn broke_before_tried() -> Reply {
    synthetic(421, (4, 4, 2), "the connection broke before these recipients were tried".to_string())
}

/// The path's message rate did not leave room for this transaction within its lease.
pub fn rate_not_allowed() -> Reply {
    synthetic(451, (4, 4, 5), "not tried: the sending rate of this path did not allow it before the lease ended".to_string())
}

/// The message outlived `mta.retry.max_age` while it waited (in the spool, or behind a
/// suspended or throttled path); `hours` is its age.
pub fn expired_in_queue(hours: f64) -> Reply {
    synthetic(451, (4, 4, 7), format!("message expired in the queue after {hours:.1} hours"))
}

/// A non-ASCII address needs SMTPUTF8, which `host` does not offer.
pub fn smtputf8_unsupported(host: &str) -> Reply {
    synthetic(553, (5, 6, 7), format!("{host} does not support SMTPUTF8, which a non-ASCII address needs"))
}

/// The message is larger than the SIZE `host` advertises.
pub fn too_large(size: usize, limit: u64, host: &str) -> Reply {
    synthetic(552, (5, 3, 4), format!("message of {size} bytes exceeds the {limit}-byte limit of {host}"))
}

/// The transaction ended without a reply for the message.
pub fn no_final_reply() -> Reply {
    synthetic(451, (4, 4, 2), "transaction ended without a reply".to_string())
}

/// A domain such as `[300.1.2.3]` that is not an address literal.
pub fn invalid_address_literal(domain: &str) -> Reply {
    synthetic(550, (5, 1, 2), format!("{domain} is not a valid address literal"))
}

/// The recipient domain does not exist.
pub fn nxdomain(domain: &str) -> Reply {
    synthetic(550, (5, 1, 2), format!("{domain}: domain does not exist (NXDOMAIN)"))
}

/// The recipient domain publishes a null MX (RFC 7505).
pub fn null_mx(domain: &str) -> Reply {
    synthetic(556, (5, 1, 10), format!("{domain} does not accept mail (null MX)"))
}

/// A lookup of `what` (`MX`, `A/AAAA`) for `name` failed for now.
pub fn dns_failure(name: &str, what: &str, detail: &str) -> Reply {
    synthetic(451, (4, 4, 3), format!("DNS lookup of {what} for {name} failed: {detail}"))
}

/// The MX host `name` has no address: it does not exist (`nx`) or has no A/AAAA records.
pub fn no_address(name: &str, nx: bool) -> Reply {
    let why = if nx { "does not exist" } else { "has no A or AAAA records" };
    synthetic(550, (5, 4, 4), format!("{name} {why}"))
}

/// DKIM policy refuses the message (the tenant may not send unsigned mail); `reason` is
/// the policy's text for the client.
pub fn dkim_refused(reason: &str) -> Reply {
    synthetic(550, (5, 7, 1), format!("not sent: {reason}"))
}

/// Signing failed: a local problem worth retrying once an operator fixed it.
pub fn dkim_failed(error: impl Display) -> Reply {
    synthetic(451, (4, 3, 0), format!("not sent: {error}"))
}

/// Signing was interrupted by a shutdown.
pub fn dkim_interrupted() -> Reply {
    dkim_failed("DKIM signing was interrupted (shutdown)")
}
