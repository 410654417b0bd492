//! What the generator sends: message sizes (one size or a weighted mix), attachments,
//! recipients per message, recipient domains by weight, and how each message is rendered for
//! SMTP (an RFC 5322 message) and for the SendGrid v3 API (one personalization).
//!
//! Bodies are made once per size at start-up and shared, so rendering a message costs a few
//! hundred bytes of headers, not a copy of its body.

use std::fmt::Write as _;
use std::str::FromStr;
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use rand::Rng;

use crate::stamp::SENT_HEADER;

/// Picks items by weight: `pick(u)` with `u` uniform in [0, 1).
#[derive(Clone, Debug, PartialEq)]
pub struct Weighted<T> {
    items: Vec<T>,
    /// Cumulative weights, normalized so the last is 1.
    cumulative: Vec<f64>,
}

impl<T> Weighted<T> {
    /// `None` when there are no items, a weight is negative or not finite, or all are zero.
    pub fn new(pairs: impl IntoIterator<Item = (T, f64)>) -> Option<Weighted<T>> {
        let (items, weights): (Vec<T>, Vec<f64>) = pairs.into_iter().unzip();
        if items.is_empty() || weights.iter().any(|w| !(w.is_finite() && *w >= 0.0)) {
            return None;
        }
        let total: f64 = weights.iter().sum();
        if total <= 0.0 {
            return None;
        }
        let mut acc = 0.0;
        let cumulative = weights.iter().map(|w| {
            acc += w / total;
            acc
        });
        Some(Weighted { cumulative: cumulative.collect(), items })
    }

    pub fn pick(&self, u: f64) -> &T {
        let i = self.cumulative.partition_point(|&c| c <= u).min(self.items.len() - 1);
        &self.items[i]
    }

    pub fn items(&self) -> &[T] {
        &self.items
    }

    /// Each item with its share (0 to 1).
    pub fn shares(&self) -> impl Iterator<Item = (&T, f64)> {
        self.items.iter().zip(self.cumulative.iter().scan(0.0, |prev, &c| {
            let share = c - *prev;
            *prev = c;
            Some(share)
        }))
    }
}

/// A byte size written `2000`, `2k`, `20KB`, `1m` (k = 1,000, m = 1,000,000: message sizes
/// are quoted in decimal units).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix('b').unwrap_or(&t);
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1_000.0),
        Some('m') => (&t[..t.len() - 1], 1_000_000.0),
        _ => (t, 1.0),
    };
    let n: f64 = num.trim().parse().map_err(|_| format!("size {s:?}: expected a number like 2000, 2k or 1.5m"))?;
    if !(n.is_finite() && n >= 0.0) {
        return Err(format!("size {s:?}: must be zero or more"));
    }
    Ok((n * mult).round() as usize)
}

/// Message sizes: one (`5k`) or a weighted mix (`2k:60,20k:30,100k:10`).
#[derive(Clone, Debug, PartialEq)]
pub struct SizeMix(pub Weighted<usize>);

impl FromStr for SizeMix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut pairs = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (size, weight) = match part.split_once(':') {
                Some((size, w)) => (size, w.trim().parse::<f64>().map_err(|_| format!("size mix {s:?}: weight {w:?} is not a number"))?),
                None => (part, 1.0),
            };
            pairs.push((parse_size(size)?, weight));
        }
        Weighted::new(pairs).map(SizeMix).ok_or_else(|| format!("size mix {s:?}: give at least one size with a weight above zero"))
    }
}

/// Recipient domains under the reserved test TLDs (RFC 2606/6761) only: the generator never
/// addresses real domains, whatever resolver the server under test uses.
pub fn is_test_domain(domain: &str) -> bool {
    let d = domain.trim_end_matches('.').to_ascii_lowercase();
    ["test", "example", "invalid", "localhost"].iter().any(|tld| d == *tld || d.ends_with(&format!(".{tld}")))
}

/// The workload, as configured.
#[derive(Clone, Debug)]
pub struct Workload {
    /// The size of each message's text (headers and attachments come on top).
    pub sizes: SizeMix,
    /// Attachments per message.
    pub attachments: u32,
    /// Bytes of each attachment before base64.
    pub attachment_bytes: usize,
    /// Recipients per message, all at one domain (so each message stays one delivery).
    pub recipients: u32,
    /// Recipient domains by weight.
    pub domains: Weighted<String>,
    /// The envelope and header sender.
    pub sender: String,
    /// Names this run in Message-IDs (`<run>.<seq>@gen.load.test`), so ledgers of different
    /// runs never share ids.
    pub run_id: String,
}

impl Workload {
    pub fn validate(&self) -> Result<(), String> {
        if self.recipients == 0 {
            return Err("recipients: must be at least 1".into());
        }
        if let Some(d) = self.domains.items().iter().find(|d| !is_test_domain(d)) {
            return Err(format!("domains: {d:?} is not under .test, .example, .invalid or .localhost; the generator only sends to test domains"));
        }
        if !self.sender.contains('@') {
            return Err(format!("sender: {:?} is not an address", self.sender));
        }
        if self.run_id.is_empty() || !self.run_id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(format!("run_id: {:?} must be letters, digits and dashes", self.run_id));
        }
        Ok(())
    }

    /// A fresh random run id (8 hex digits).
    pub fn new_run_id() -> String {
        format!("{:08x}", rand::rng().random::<u32>())
    }
}

/// One message to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Draft {
    pub seq: u64,
    /// Without angle brackets.
    pub message_id: String,
    pub recipients: Vec<String>,
    /// Index into the size mix.
    pub size: usize,
}

/// Makes and renders messages; shared by all workers.
pub struct Factory {
    workload: Workload,
    /// Per size of the mix: the text body (CRLF lines, ends with CRLF).
    bodies: Vec<Bytes>,
    /// Per size of the mix: the text as a JSON string literal (quotes included).
    json_bodies: Vec<Bytes>,
    /// One attachment, base64 in 76-character lines (SMTP) and unwrapped (JSON).
    attachment_mime: Bytes,
    attachment_json: Bytes,
}

/// Text that never starts a line with a dot, so it needs no dot-stuffing.
fn filler(len: usize) -> String {
    const WORDS: [&str; 16] = [
        "lorem", "ipsum", "dolor", "sit", "amet", "sluice", "queue", "spool", "deliver", "message",
        "relay", "inbox", "sender", "domain", "load", "test",
    ];
    let mut out = String::with_capacity(len + 80);
    let mut line = String::new();
    let mut i = 0usize;
    while out.len() < len {
        let w = WORDS[(i * 7 + i / 5) % WORDS.len()];
        i += 1;
        if line.len() + w.len() + 1 > 76 {
            out.push_str(&line);
            out.push_str("\r\n");
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(w);
    }
    let text_len = len.saturating_sub(2);
    out.truncate(text_len);
    while out.ends_with('\r') || out.ends_with('\n') {
        out.pop();
    }
    while out.len() < text_len {
        out.push('x');
    }
    out.push_str("\r\n");
    out
}

impl Factory {
    pub fn new(workload: Workload) -> Result<Arc<Factory>, String> {
        workload.validate()?;
        let bodies: Vec<String> = workload.sizes.0.items().iter().map(|&n| filler(n)).collect();
        let json_bodies = bodies.iter().map(|b| Bytes::from(serde_json::to_string(b).expect("strings serialize"))).collect();
        let mut raw = vec![0u8; workload.attachment_bytes];
        rand::rng().fill(&mut raw[..]);
        let b64 = base64::engine::general_purpose::STANDARD.encode(&raw);
        let mut wrapped = String::with_capacity(b64.len() + b64.len() / 76 * 2 + 2);
        for chunk in b64.as_bytes().chunks(76) {
            wrapped.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
            wrapped.push_str("\r\n");
        }
        Ok(Arc::new(Factory {
            bodies: bodies.into_iter().map(Bytes::from).collect(),
            json_bodies,
            attachment_mime: Bytes::from(wrapped),
            attachment_json: Bytes::from(b64),
            workload,
        }))
    }

    pub fn workload(&self) -> &Workload {
        &self.workload
    }

    /// The message with sequence number `seq`, its size picked by `u_size` and its domain
    /// by `u_domain` (both uniform in [0, 1)).
    pub fn draft(&self, seq: u64, u_size: f64, u_domain: f64) -> Draft {
        let w = &self.workload;
        let size = w.sizes.0.pick(u_size);
        let size = w.sizes.0.items().iter().position(|s| s == size).expect("picked from the items");
        let domain = w.domains.pick(u_domain);
        let recipients = (0..w.recipients)
            .map(|r| if w.recipients == 1 { format!("user{seq}@{domain}") } else { format!("user{seq}-{r}@{domain}") })
            .collect();
        Draft { seq, message_id: format!("{}.{}@gen.load.test", w.run_id, seq), recipients, size }
    }

    /// A random draft (for the workers).
    pub fn random_draft(&self, seq: u64, rng: &mut impl Rng) -> Draft {
        self.draft(seq, rng.random(), rng.random())
    }

    /// The RFC 5322 message for SMTP, as pieces to write in order (header block, shared
    /// body, ...). It ends with CRLF and no line starts with a dot.
    pub fn smtp_message(&self, d: &Draft, sent_micros: u64) -> Vec<Bytes> {
        let w = &self.workload;
        let date = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc2822)
            .unwrap_or_default();
        let mut h = String::with_capacity(512);
        let _ = write!(
            h,
            "Message-ID: <{}>\r\nDate: {date}\r\nFrom: Load Generator <{}>\r\nTo: {}\r\nSubject: sluice-load {} #{}\r\n{SENT_HEADER}: {sent_micros}\r\nMIME-Version: 1.0\r\n",
            d.message_id,
            w.sender,
            d.recipients.iter().map(|r| format!("<{r}>")).collect::<Vec<_>>().join(", "),
            w.run_id,
            d.seq,
        );
        let body = self.bodies[d.size].clone();
        if w.attachments == 0 {
            h.push_str("Content-Type: text/plain; charset=us-ascii\r\nContent-Transfer-Encoding: 7bit\r\n\r\n");
            return vec![Bytes::from(h), body];
        }
        let boundary = format!("=_sluice-load-{}", d.seq);
        let _ = write!(
            h,
            "Content-Type: multipart/mixed; boundary=\"{boundary}\"\r\n\r\n--{boundary}\r\nContent-Type: text/plain; charset=us-ascii\r\nContent-Transfer-Encoding: 7bit\r\n\r\n"
        );
        let mut parts = vec![Bytes::from(h), body];
        for i in 1..=w.attachments {
            parts.push(Bytes::from(format!(
                "--{boundary}\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; filename=\"attachment-{i}.bin\"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            )));
            parts.push(self.attachment_mime.clone());
        }
        parts.push(Bytes::from(format!("--{boundary}--\r\n")));
        parts
    }

    /// A SendGrid v3 `/v3/mail/send` request with one personalization per draft. The drafts
    /// share the request's content, so the first draft's size is used for all.
    pub fn http_request(&self, drafts: &[Draft], sent_micros: u64) -> Bytes {
        let w = &self.workload;
        let size = drafts.first().map(|d| d.size).unwrap_or(0);
        let body = &self.json_bodies[size];
        let attachments = w.attachments as usize * (self.attachment_json.len() + 100);
        let mut out = Vec::with_capacity(256 + drafts.len() * 160 + body.len() + attachments);
        out.extend_from_slice(b"{\"personalizations\":[");
        for (i, d) in drafts.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"to\":[");
            for (j, r) in d.recipients.iter().enumerate() {
                if j > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(format!("{{\"email\":\"{r}\"}}").as_bytes());
            }
            out.extend_from_slice(
                format!("],\"headers\":{{\"Message-ID\":\"<{}>\",\"{SENT_HEADER}\":\"{sent_micros}\"}}}}", d.message_id).as_bytes(),
            );
        }
        out.extend_from_slice(
            format!(
                "],\"from\":{{\"email\":\"{}\",\"name\":\"Load Generator\"}},\"subject\":\"sluice-load {}\",\"content\":[{{\"type\":\"text/plain\",\"value\":",
                w.sender, w.run_id
            )
            .as_bytes(),
        );
        out.extend_from_slice(body);
        out.extend_from_slice(b"}]");
        if w.attachments > 0 {
            out.extend_from_slice(b",\"attachments\":[");
            for i in 1..=w.attachments {
                if i > 1 {
                    out.push(b',');
                }
                out.extend_from_slice(b"{\"content\":\"");
                out.extend_from_slice(&self.attachment_json);
                out.extend_from_slice(
                    format!("\",\"filename\":\"attachment-{i}.bin\",\"type\":\"application/octet-stream\",\"disposition\":\"attachment\"}}").as_bytes(),
                );
            }
            out.push(b']');
        }
        out.push(b'}');
        Bytes::from(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(sizes: &str, attachments: u32) -> Workload {
        Workload {
            sizes: sizes.parse().unwrap(),
            attachments,
            attachment_bytes: 300,
            recipients: 1,
            domains: Weighted::new([("a.test".to_string(), 3.0), ("b.test".to_string(), 1.0)]).unwrap(),
            sender: "load@gen.load.test".into(),
            run_id: "r1".into(),
        }
    }

    #[test]
    fn weighted_picks_follow_the_weights() {
        let w = Weighted::new([("a", 1.0), ("b", 0.0), ("c", 3.0)]).unwrap();
        assert_eq!(*w.pick(0.0), "a");
        assert_eq!(*w.pick(0.2499), "a");
        assert_eq!(*w.pick(0.25), "c", "a zero weight is never picked");
        assert_eq!(*w.pick(0.9999), "c");
        let shares: Vec<f64> = w.shares().map(|(_, s)| s).collect();
        assert_eq!(shares, [0.25, 0.0, 0.75]);
        assert!(Weighted::<u8>::new([]).is_none());
        assert!(Weighted::new([("a", 0.0)]).is_none());
        assert!(Weighted::new([("a", -1.0), ("b", 2.0)]).is_none());
    }

    #[test]
    fn sizes_and_mixes_parse() {
        assert_eq!(parse_size("2000").unwrap(), 2000);
        assert_eq!(parse_size("2k").unwrap(), 2000);
        assert_eq!(parse_size("20KB").unwrap(), 20_000);
        assert_eq!(parse_size("1.5m").unwrap(), 1_500_000);
        assert!(parse_size("big").is_err());
        let mix: SizeMix = "2k:60, 20k:30, 100k:10".parse().unwrap();
        assert_eq!(mix.0.items(), [2000, 20_000, 100_000]);
        assert_eq!(*"5k".parse::<SizeMix>().unwrap().0.items(), [5000]);
        assert!("2k:x".parse::<SizeMix>().is_err());
        assert!("".parse::<SizeMix>().is_err());
    }

    #[test]
    fn only_test_domains_are_allowed() {
        assert!(is_test_domain("gmail.load.test"));
        assert!(is_test_domain("x.example."));
        assert!(!is_test_domain("gmail.com"));
        assert!(!is_test_domain("attest"));
        let mut w = workload("1k", 0);
        w.domains = Weighted::new([("gmail.com".to_string(), 1.0)]).unwrap();
        assert!(Factory::new(w).err().unwrap().contains("test domains"));
    }

    #[test]
    fn smtp_messages_have_the_size_ids_and_stamp() {
        let f = Factory::new(workload("2k:1,20k:1", 0)).unwrap();
        let d = f.draft(7, 0.9, 0.1);
        assert_eq!(d.recipients, ["user7@a.test"]);
        assert_eq!(d.message_id, "r1.7@gen.load.test");
        let msg: Vec<u8> = f.smtp_message(&d, 42).concat();
        let stamp = crate::stamp::scan(&msg);
        assert_eq!(stamp.message_id, Some("r1.7@gen.load.test"));
        assert_eq!(stamp.sent_micros, Some(42));
        let body = &msg[msg.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4..];
        assert_eq!(body.len(), 20_000);
        assert!(msg.ends_with(b"\r\n"));
        assert!(!msg.split(|&b| b == b'\n').any(|l| l.starts_with(b".")), "no line needs dot-stuffing");
        let parsed = mail_auth::AuthenticatedMessage::parse(&msg).expect("a well-formed message");
        assert!(parsed.from.iter().any(|f| f == "load@gen.load.test"));
    }

    #[test]
    fn attachments_make_a_multipart_message() {
        let f = Factory::new(workload("1k", 2)).unwrap();
        let msg = f.smtp_message(&f.draft(1, 0.0, 0.0), 1).concat();
        let text = String::from_utf8(msg).unwrap();
        assert!(text.contains("multipart/mixed"));
        assert_eq!(text.matches("Content-Disposition: attachment").count(), 2);
        assert!(text.ends_with("--\r\n"));
    }

    #[test]
    fn http_requests_are_sendgrid_json_with_one_personalization_per_draft() {
        let mut w = workload("1k", 1);
        w.recipients = 2;
        let f = Factory::new(w).unwrap();
        let drafts: Vec<Draft> = (0..3).map(|i| f.draft(i, 0.0, 0.99)).collect();
        let body = f.http_request(&drafts, 99);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let p = v["personalizations"].as_array().unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p[1]["to"][1]["email"], "user1-1@b.test");
        assert_eq!(p[2]["headers"]["Message-ID"], "<r1.2@gen.load.test>");
        assert_eq!(p[0]["headers"]["X-Load-Sent"], "99");
        assert_eq!(v["content"][0]["value"].as_str().unwrap().len(), 1000);
        assert_eq!(v["attachments"].as_array().unwrap().len(), 1);
        assert_eq!(v["from"]["email"], "load@gen.load.test");
    }
}
