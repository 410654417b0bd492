//! The `[http]` config section.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

/// Settings of the SendGrid v3 compatible HTTP API.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address the API listens on. The default only accepts local clients; use
    /// `0.0.0.0:8025` (behind TLS termination) to serve the network.
    pub listen: SocketAddr,
    /// Largest request body accepted, in bytes; larger requests get 413. SendGrid's limit
    /// is 30 MB.
    pub max_body_bytes: usize,
    /// Largest message one personalization may produce, in bytes of MIME (attachments
    /// base64-encoded); larger ones get 413. SendGrid: "the total size of your email,
    /// including attachments, must be less than 30MB".
    pub max_message_bytes: usize,
    /// Most MIME bytes one request may produce over all its personalizations (each
    /// personalization is its own copy of the message, attachments included); bounds the
    /// memory and spool space a single request can take. Larger requests get 413.
    pub max_request_message_bytes: usize,
    /// Time a client has to send the request headers, and the longest an idle keep-alive
    /// connection is kept open.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Time from the request headers to the answer: reading the body, building the
    /// messages and storing them durably. A slow body gets 408, a slow spool 503.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Most client connections served at once; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// On shutdown, how long requests already being served get to finish before their
    /// connections are dropped.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// The `Retry-After` sent with 503 answers (spool unavailable): how long a client should
    /// wait before it retries. Whole seconds.
    #[serde(with = "humantime_serde")]
    pub retry_after: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8025)),
            max_body_bytes: 30 * 1024 * 1024,
            max_message_bytes: 30 * 1024 * 1024,
            max_request_message_bytes: 256 * 1024 * 1024,
            header_read_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(60),
            max_connections: 1024,
            shutdown_grace: Duration::from_secs(30),
            retry_after: Duration::from_secs(5),
        }
    }
}

impl HttpConfig {
    /// Checks the values; the error reads `"<key>: <reason>"`.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_body_bytes < 1024 {
            return Err("max_body_bytes: must be at least 1024".into());
        }
        if self.max_message_bytes < 1024 {
            return Err("max_message_bytes: must be at least 1024".into());
        }
        if self.max_request_message_bytes < self.max_message_bytes {
            return Err("max_request_message_bytes: must be at least max_message_bytes".into());
        }
        for (key, value) in [
            ("header_read_timeout", self.header_read_timeout),
            ("request_timeout", self.request_timeout),
            ("shutdown_grace", self.shutdown_grace),
        ] {
            if value.is_zero() {
                return Err(format!("{key}: must be greater than zero (e.g. \"30s\")"));
            }
        }
        if self.max_connections == 0 {
            return Err("max_connections: must be at least 1".into());
        }
        if self.retry_after < Duration::from_secs(1) {
            return Err("retry_after: must be at least 1s (Retry-After is in whole seconds)".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_local() {
        let c = HttpConfig::default();
        c.validate().unwrap();
        assert!(c.listen.ip().is_loopback());
        assert_eq!(c.max_body_bytes, 31_457_280);
    }

    #[test]
    fn validate_names_the_key() {
        let c = HttpConfig { max_body_bytes: 10, ..Default::default() };
        assert!(c.validate().unwrap_err().starts_with("max_body_bytes: "));
        let c = HttpConfig { request_timeout: Duration::ZERO, ..Default::default() };
        assert!(c.validate().unwrap_err().starts_with("request_timeout: "));
        let c = HttpConfig { retry_after: Duration::from_millis(10), ..Default::default() };
        assert!(c.validate().unwrap_err().starts_with("retry_after: "));
    }
}
