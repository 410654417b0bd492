//! Per-client-IP limits of a mock ISP, enforced with 421 replies as real providers do:
//! concurrent connections and new connections per time (refused at connect), messages per
//! time and per connection (refused at MAIL, then the connection is closed).

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::Deserialize;

use super::scenario::ReplySpec;

pub use sluice_rules::Rate;

/// A token bucket that holds `count` tokens and refills one every `per / count`, so bursts of
/// up to `count` pass.
fn quota(rate: &Rate) -> Quota {
    let burst = NonZeroU32::new(rate.count).expect("a Rate's count is > 0");
    Quota::with_period(rate.interval()).expect("interval > 0").allow_burst(burst)
}

/// The limits of one mock ISP, per client IP. All are off by default.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Most connections open at once from one IP; more are refused with `connection_reply`.
    pub max_connections: Option<u32>,
    /// New connections per period from one IP; more are refused with `connection_reply`.
    pub connection_rate: Option<Rate>,
    /// Messages (MAIL commands) per period from one IP; more get `message_rate_reply` and the
    /// connection is closed.
    pub message_rate: Option<Rate>,
    /// Most messages over one connection; the next MAIL gets `per_connection_reply` and the
    /// connection is closed.
    pub max_messages_per_connection: Option<u32>,
    /// The reply to a connection over a connection limit.
    pub connection_reply: ReplySpec,
    /// The reply to a message over the message rate.
    pub message_rate_reply: ReplySpec,
    /// The reply to a message over the per-connection limit.
    pub per_connection_reply: ReplySpec,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: None,
            connection_rate: None,
            message_rate: None,
            max_messages_per_connection: None,
            connection_reply: ReplySpec::new(421, "4.7.0 Too many connections from your IP, try again later"),
            message_rate_reply: ReplySpec::new(421, "4.7.0 Message rate limit exceeded for your IP, try again later"),
            per_connection_reply: ReplySpec::new(421, "4.7.0 Too many messages on this connection, reconnect"),
        }
    }
}

impl Limits {
    pub fn validate(&self) -> Result<(), String> {
        if self.max_connections == Some(0) {
            return Err("max_connections: must be at least 1 (leave it out for no limit)".into());
        }
        if self.max_messages_per_connection == Some(0) {
            return Err("max_messages_per_connection: must be at least 1 (leave it out for no limit)".into());
        }
        for (key, reply) in [
            ("connection_reply", &self.connection_reply),
            ("message_rate_reply", &self.message_rate_reply),
            ("per_connection_reply", &self.per_connection_reply),
        ] {
            if reply.is_positive() {
                return Err(format!("{key}: {} is not a refusal; use a 4xx or 5xx code (421 closes the connection)", reply.code));
            }
        }
        Ok(())
    }
}

/// The live state of the limits: counters and token buckets per client IP.
pub(crate) struct Limiter {
    limits: Limits,
    open: Arc<Mutex<HashMap<IpAddr, u32>>>,
    /// The most connections each IP had open at once, for tests that check a sender's limits.
    peaks: Mutex<HashMap<IpAddr, u32>>,
    connections: Option<DefaultKeyedRateLimiter<IpAddr>>,
    messages: Option<DefaultKeyedRateLimiter<IpAddr>>,
}

/// Holds one open-connection slot of an IP; gives it back when dropped.
pub(crate) struct ConnectionSlot {
    ip: IpAddr,
    open: Arc<Mutex<HashMap<IpAddr, u32>>>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().expect("limits lock");
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

impl Limiter {
    pub fn new(limits: Limits) -> Limiter {
        Limiter {
            connections: limits.connection_rate.map(|r| RateLimiter::keyed(quota(&r))),
            messages: limits.message_rate.map(|r| RateLimiter::keyed(quota(&r))),
            open: Arc::new(Mutex::new(HashMap::new())),
            peaks: Mutex::new(HashMap::new()),
            limits,
        }
    }

    /// Admits a new connection from `ip`, or returns the refusal to send.
    pub fn admit_connection(&self, ip: IpAddr) -> Result<ConnectionSlot, &ReplySpec> {
        let now_open = {
            let mut open = self.open.lock().expect("limits lock");
            let n = open.entry(ip).or_insert(0);
            if self.limits.max_connections.is_some_and(|max| *n >= max) {
                return Err(&self.limits.connection_reply);
            }
            *n += 1;
            *n
        };
        let mut peaks = self.peaks.lock().expect("limits lock");
        let peak = peaks.entry(ip).or_insert(0);
        *peak = (*peak).max(now_open);
        drop(peaks);
        let slot = ConnectionSlot { ip, open: self.open.clone() };
        if let Some(rate) = &self.connections {
            if rate.check_key(&ip).is_err() {
                return Err(&self.limits.connection_reply); // the slot is given back on drop
            }
        }
        Ok(slot)
    }

    pub fn peaks(&self) -> HashMap<IpAddr, u32> {
        self.peaks.lock().expect("limits lock").clone()
    }

    /// Admits the `nth` message (1-based) of a connection from `ip`, or returns the refusal.
    pub fn admit_message(&self, ip: IpAddr, nth: u32) -> Result<(), &ReplySpec> {
        if self.limits.max_messages_per_connection.is_some_and(|max| nth > max) {
            return Err(&self.limits.per_connection_reply);
        }
        if let Some(rate) = &self.messages {
            if rate.check_key(&ip).is_err() {
                return Err(&self.limits.message_rate_reply);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_limits_count_open_connections_per_ip() {
        let limiter = Limiter::new(Limits { max_connections: Some(2), ..Limits::default() });
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.1".parse().unwrap(), "127.0.0.9".parse().unwrap());
        let s1 = limiter.admit_connection(a).unwrap();
        let _s2 = limiter.admit_connection(a).unwrap();
        assert_eq!(limiter.admit_connection(a).err().map(|r| r.code), Some(421));
        assert!(limiter.admit_connection(b).is_ok(), "another IP has its own count");
        drop(s1);
        assert!(limiter.admit_connection(a).is_ok(), "a closed connection frees its slot");
    }

    #[test]
    fn message_rate_and_per_connection_limits_refuse_with_their_replies() {
        let limits = Limits {
            message_rate: Some("3/h".parse().unwrap()),
            max_messages_per_connection: Some(10),
            ..Limits::default()
        };
        let limiter = Limiter::new(limits);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let results: Vec<bool> = (1..=5).map(|n| limiter.admit_message(ip, n).is_ok()).collect();
        assert_eq!(results, [true, true, true, false, false]);
        let refusal = limiter.admit_message(ip, 11).unwrap_err();
        assert!(refusal.lines[0].contains("Too many messages on this connection"));
    }

    #[test]
    fn validation_names_the_key() {
        let bad = Limits { connection_reply: ReplySpec::new(250, "ok"), ..Limits::default() };
        assert!(bad.validate().unwrap_err().starts_with("connection_reply:"));
        assert!(Limits { max_connections: Some(0), ..Limits::default() }.validate().unwrap_err().starts_with("max_connections:"));
        assert!(Limits::default().validate().is_ok());
    }
}
