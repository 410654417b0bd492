//! What the generator writes into every message and the sink reads back: a Message-ID that
//! names the message in both ledgers, and `X-Load-Sent`, the send time in microseconds since
//! the Unix epoch, from which the sink measures end-to-end latency (same machine, same clock).

use std::time::{SystemTime, UNIX_EPOCH};

/// The header carrying the send time.
pub const SENT_HEADER: &str = "X-Load-Sent";

/// Microseconds since the Unix epoch, now.
pub fn now_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// A Message-ID as the ledgers store it: without the angle brackets and surrounding space.
pub fn normalize_id(id: &str) -> &str {
    id.trim().trim_start_matches('<').trim_end_matches('>').trim()
}

/// The two headers the sink needs, found in a message's header section.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stamp<'a> {
    /// The Message-ID, normalized (see [`normalize_id`]).
    pub message_id: Option<&'a str>,
    /// The `X-Load-Sent` time, microseconds since the epoch.
    pub sent_micros: Option<u64>,
}

/// Finds Message-ID and X-Load-Sent in the header section of `message` (up to the first
/// empty line). Written by hand rather than with a MIME parser because the sink runs this
/// for every message and needs two unfolded headers, not a parse of the whole message.
pub fn scan(message: &[u8]) -> Stamp<'_> {
    let mut stamp = Stamp::default();
    let mut rest = message;
    while !rest.is_empty() {
        let end = rest.iter().position(|&b| b == b'\n').map(|i| i + 1).unwrap_or(rest.len());
        let line = &rest[..end];
        rest = &rest[end..];
        let line = trim_eol(line);
        if line.is_empty() {
            break;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            continue; // continuation of a header we do not need (ours are never folded)
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let Ok(value) = std::str::from_utf8(value) else { continue };
        if name.eq_ignore_ascii_case(b"message-id") {
            stamp.message_id = Some(normalize_id(value)).filter(|v| !v.is_empty());
        } else if name.eq_ignore_ascii_case(SENT_HEADER.as_bytes()) {
            stamp.sent_micros = value.trim().parse().ok();
        }
        if stamp.message_id.is_some() && stamp.sent_micros.is_some() {
            break;
        }
    }
    stamp
}

fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_both_headers_in_any_case_and_stops_at_the_body() {
        let msg = b"Received: from x\r\n  by y\r\nmessage-id:  <a.1@gen.test> \r\nX-LOAD-SENT: 1700000000123456\r\n\r\nMessage-ID: <body@x>\r\n";
        let s = scan(msg);
        assert_eq!(s.message_id, Some("a.1@gen.test"));
        assert_eq!(s.sent_micros, Some(1_700_000_000_123_456));
    }

    #[test]
    fn missing_or_malformed_headers_are_none() {
        assert_eq!(scan(b"Subject: x\r\n\r\nX-Load-Sent: 5\r\n"), Stamp::default());
        assert_eq!(scan(b"X-Load-Sent: soon\nMessage-ID: <>\n\n").sent_micros, None);
        assert_eq!(scan(b"X-Load-Sent: soon\nMessage-ID: <>\n\n").message_id, None);
        assert_eq!(scan(b"").message_id, None);
    }
}
