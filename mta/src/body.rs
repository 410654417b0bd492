//! The DATA payload as it goes on the wire (RFC 5321 §4.5.2): every line ends in CRLF,
//! lines starting with a dot get a second one, and the terminating `.` line follows.

use bytes::{Bytes, BytesMut};

/// Bodies larger than this are encoded on the blocking pool, not on the reactor.
pub(crate) const INLINE_ENCODE_LIMIT: usize = 64 * 1024;

/// A message ready to send after `354`.
#[derive(Clone, Debug)]
pub(crate) struct WireBody {
    /// Dot-stuffed, CRLF-normalised, ending with `\r\n.\r\n`.
    pub bytes: Bytes,
    /// Whether any byte has the high bit set (worth `BODY=8BITMIME`).
    pub eight_bit: bool,
    /// The size of the message itself (for `SIZE=`): without stuffing and terminator.
    pub message_size: usize,
}

/// Encodes `prepend` (header lines added by the MTA, e.g. a DKIM signature) followed by
/// `body`. Bare CR and bare LF become CRLF; a missing final line break is added.
pub(crate) fn encode(prepend: Option<&str>, body: &[u8]) -> WireBody {
    // Prepended header lines must end their own line exactly once: a missing break would
    // swallow the message's first line, an extra one would end the header section.
    let prepend = prepend.map(|p| p.trim_end_matches(['\r', '\n'])).filter(|p| !p.is_empty());
    let mut out = BytesMut::with_capacity(prepend.map_or(0, |p| p.len() + 2) + body.len() + body.len() / 64 + 8);
    let mut at_line_start = true;
    let mut eight_bit = false;
    let mut stuffed = 0;
    let parts: [&[u8]; 3] = match prepend {
        Some(p) => [p.as_bytes(), b"\r\n", body],
        None => [b"", b"", body],
    };
    for part in parts {
        let mut rest = part;
        while let Some(&first) = rest.first() {
            if at_line_start && first == b'.' {
                out.extend_from_slice(b".");
                stuffed += 1;
            }
            // Copy up to the next line break, then write it as CRLF whatever it was.
            let (line, skip) = match rest.iter().position(|&b| b == b'\r' || b == b'\n') {
                Some(p) if rest[p] == b'\r' && rest.get(p + 1) == Some(&b'\n') => (&rest[..p], p + 2),
                Some(p) => (&rest[..p], p + 1),
                None => (rest, rest.len()),
            };
            eight_bit |= line.iter().any(|&b| b >= 0x80);
            out.extend_from_slice(line);
            at_line_start = skip > line.len();
            if at_line_start {
                out.extend_from_slice(b"\r\n");
            }
            rest = &rest[skip..];
        }
    }
    if !at_line_start {
        out.extend_from_slice(b"\r\n");
    }
    let message_size = out.len() - stuffed;
    out.extend_from_slice(b".\r\n");
    WireBody { bytes: out.freeze(), eight_bit, message_size }
}

/// [`encode`], on the blocking pool when the body is large.
pub(crate) async fn encode_off_reactor(prepend: Option<String>, body: Bytes) -> WireBody {
    if body.len() + prepend.as_ref().map_or(0, |p| p.len()) <= INLINE_ENCODE_LIMIT {
        return encode(prepend.as_deref(), &body);
    }
    let fallback = (prepend.clone(), body.clone());
    match tokio::task::spawn_blocking(move || encode(prepend.as_deref(), &body)).await {
        Ok(w) => w,
        // The blocking pool is shutting down: do the work here rather than lose the message.
        Err(_) => encode(fallback.0.as_deref(), &fallback.1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(prepend: Option<&str>, body: &str) -> String {
        String::from_utf8(encode(prepend, body.as_bytes()).bytes.to_vec()).unwrap()
    }

    #[test]
    fn stuffs_leading_dots_and_terminates() {
        assert_eq!(wire(None, "a\r\n.\r\n..b\r\n"), "a\r\n..\r\n...b\r\n.\r\n");
        assert_eq!(wire(None, ".first\r\n"), "..first\r\n.\r\n");
        assert_eq!(wire(None, ""), ".\r\n");
        assert_eq!(wire(None, "mid.dot\r\n"), "mid.dot\r\n.\r\n");
    }

    #[test]
    fn normalises_line_endings() {
        assert_eq!(wire(None, "a\nb\rc\r\nd"), "a\r\nb\r\nc\r\nd\r\n.\r\n");
        assert_eq!(wire(None, "x\n.\n"), "x\r\n..\r\n.\r\n");
    }

    #[test]
    fn prepends_headers_on_their_own_lines() {
        assert_eq!(wire(Some("X-A: 1\r\n"), "Subject: s\r\n\r\nb\r\n"), "X-A: 1\r\nSubject: s\r\n\r\nb\r\n.\r\n");
        assert_eq!(wire(Some("X-A: 1"), ".s\r\n"), "X-A: 1\r\n..s\r\n.\r\n");
        assert_eq!(wire(Some("X-A: 1\r\n\r\n"), "S: s\r\n"), "X-A: 1\r\nS: s\r\n.\r\n");
        assert_eq!(wire(Some(""), "S: s\r\n"), "S: s\r\n.\r\n");
    }

    #[test]
    fn reports_size_and_eight_bit() {
        let w = encode(None, "é.\n.x\r\n".as_bytes());
        assert!(w.eight_bit);
        assert_eq!(w.message_size, "é.\r\n.x\r\n".len());
        assert!(!encode(None, b"plain\r\n").eight_bit);
    }
}
