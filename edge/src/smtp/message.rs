//! Turns the data of one SMTP transaction into the message the spool stores: CRLF line
//! endings, a `Received:` trace header, `Message-ID:` and `Date:` when the client left them
//! out (as Postfix's cleanup does), and SendGrid's `X-SMTPAPI` header read and removed.

use std::collections::BTreeMap;
use std::net::IpAddr;

use bytes::Bytes;
use mail_parser::{HeaderName, MessageParser};
use serde::Deserialize;
use time::format_description::well_known::Rfc2822;
use time::OffsetDateTime;

/// How far ahead `send_at` may schedule a message (SendGrid's limit).
const MAX_SEND_AT_AHEAD_SECS: u64 = 72 * 3600;
/// SendGrid accepts at most this many categories per message.
const MAX_CATEGORIES: usize = 10;

/// What the `Received:` header records about the session.
pub(crate) struct Trace {
    /// The name the client gave in EHLO/HELO.
    pub helo: String,
    /// EHLO (ESMTP) rather than HELO (SMTP).
    pub extended: bool,
    pub client_ip: IpAddr,
    /// This server's name.
    pub hostname: String,
    /// The TLS protocol and cipher, when the session is encrypted.
    pub tls: Option<String>,
    pub authenticated: bool,
    pub recipients: Vec<String>,
    /// The queue id (`X-Message-Id`) the client is told.
    pub queue_id: String,
}

/// A message ready for `Ingest::accept`.
#[derive(Debug)]
pub(crate) struct PreparedMessage {
    pub body: Bytes,
    /// The Message-ID header value, `<...>`.
    pub smtp_id: String,
    pub categories: Vec<String>,
    pub custom_args: BTreeMap<String, String>,
    pub ip_pool: Option<String>,
    pub send_at: Option<u64>,
}

/// Why a message's content was refused. Retrying the same message cannot succeed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum ContentError {
    #[error("X-SMTPAPI header: {0}")]
    SmtpApi(String),
}

/// The part of SendGrid's `X-SMTPAPI` JSON that sluice honours.
#[derive(Deserialize)]
struct SmtpApi {
    #[serde(default)]
    category: Option<Categories>,
    #[serde(default)]
    unique_args: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    ip_pool: Option<String>,
    #[serde(default)]
    send_at: Option<u64>,
    /// These change who receives what; silently ignoring them would deliver the wrong mail.
    #[serde(default)]
    to: Option<serde_json::Value>,
    #[serde(default)]
    sub: Option<serde_json::Value>,
    #[serde(default)]
    section: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Categories {
    One(String),
    Many(Vec<String>),
}

/// Builds the stored message from the raw DATA (dot-unstuffed).
pub(crate) fn prepare(data: &[u8], trace: &Trace, now: OffsetDateTime) -> Result<PreparedMessage, ContentError> {
    let data = normalize_line_endings(data);
    let parsed = MessageParser::new().parse_headers(&data[..]);
    let headers = parsed.as_ref().map(|m| m.headers()).unwrap_or_default();
    // Text that does not start with a header block is all body: separate it from the
    // headers added here, or its first line would read as a (broken) header.
    let needs_separator = parsed.is_none() && !data.is_empty() && !data.starts_with(b"\r\n");

    let raw_value = |h: &mail_parser::Header<'_>| {
        String::from_utf8_lossy(&data[h.offset_start as usize..h.offset_end as usize])
            .replace("\r\n", "")
            .trim()
            .to_string()
    };
    let message_id = headers.iter().find(|h| h.name == HeaderName::MessageId).map(|h| match h.value.as_text() {
        Some(id) => format!("<{id}>"),
        None => raw_value(h),
    });
    let has_date = headers.iter().any(|h| h.name == HeaderName::Date);
    let smtpapi: Vec<_> = headers
        .iter()
        .filter(|h| matches!(&h.name, HeaderName::Other(name) if name.eq_ignore_ascii_case("X-SMTPAPI")))
        .collect();
    if smtpapi.len() > 1 {
        return Err(ContentError::SmtpApi("only one X-SMTPAPI header is allowed".into()));
    }
    let api = match smtpapi.first() {
        Some(h) => Some(parse_smtpapi(&raw_value(h), now)?),
        None => None,
    };
    // The header is an instruction to sluice, not part of the message.
    let removed = smtpapi.first().map(|h| h.offset_field as usize..h.offset_end as usize);

    let date = now.format(&Rfc2822).unwrap_or_default();
    let mut out = Vec::with_capacity(data.len() + 512);
    out.extend_from_slice(received_header(trace, &date).as_bytes());
    let smtp_id = match message_id {
        Some(id) => id,
        None => {
            let id = format!("<{}@{}>", trace.queue_id, trace.hostname);
            out.extend_from_slice(format!("Message-ID: {id}\r\n").as_bytes());
            id
        }
    };
    if !has_date {
        out.extend_from_slice(format!("Date: {date}\r\n").as_bytes());
    }
    if needs_separator {
        out.extend_from_slice(b"\r\n");
    }
    match removed {
        Some(range) => {
            out.extend_from_slice(&data[..range.start]);
            out.extend_from_slice(&data[range.end..]);
        }
        None => out.extend_from_slice(&data),
    }

    let api = api.unwrap_or_default();
    Ok(PreparedMessage {
        body: Bytes::from(out),
        smtp_id,
        categories: api.categories,
        custom_args: api.custom_args,
        ip_pool: api.ip_pool,
        send_at: api.send_at,
    })
}

/// The `X-SMTPAPI` settings, checked.
#[derive(Default)]
struct SmtpApiSettings {
    categories: Vec<String>,
    custom_args: BTreeMap<String, String>,
    ip_pool: Option<String>,
    send_at: Option<u64>,
}

fn parse_smtpapi(json: &str, now: OffsetDateTime) -> Result<SmtpApiSettings, ContentError> {
    let fail = |reason: String| Err(ContentError::SmtpApi(reason));
    let api: SmtpApi = match serde_json::from_str(json) {
        Ok(api) => api,
        Err(e) => return fail(format!("not valid JSON of the expected shape ({e})")),
    };
    for (field, value) in [("to", &api.to), ("sub", &api.sub), ("section", &api.section)] {
        if value.is_some() {
            return fail(format!(
                "\"{field}\" is not supported by this relay; send one message per recipient set, with recipients in RCPT TO"
            ));
        }
    }
    let categories = match api.category {
        None => Vec::new(),
        Some(Categories::One(c)) => vec![c],
        Some(Categories::Many(c)) => c,
    };
    if categories.len() > MAX_CATEGORIES {
        return fail(format!("at most {MAX_CATEGORIES} categories are allowed"));
    }
    let now_secs = now.unix_timestamp().max(0) as u64;
    if let Some(at) = api.send_at {
        if at > now_secs + MAX_SEND_AT_AHEAD_SECS {
            return fail("send_at may be at most 72 hours in the future".into());
        }
    }
    let custom_args = api
        .unique_args
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            (k, v)
        })
        .collect();
    Ok(SmtpApiSettings { categories, custom_args, ip_pool: api.ip_pool, send_at: api.send_at })
}

/// `Received: from <helo> ([ip]) by <host> (sluice) with ESMTPSA id <id> for <rcpt>; <date>`,
/// folded as RFC 5322 recommends. The protocol names are RFC 3848's.
fn received_header(trace: &Trace, date: &str) -> String {
    let protocol = match (trace.extended, trace.tls.is_some(), trace.authenticated) {
        (false, _, _) => "SMTP",
        (true, false, false) => "ESMTP",
        (true, false, true) => "ESMTPA",
        (true, true, false) => "ESMTPS",
        (true, true, true) => "ESMTPSA",
    };
    let helo: String = trace.helo.chars().map(|c| if c.is_control() { '?' } else { c }).collect();
    let mut header = format!("Received: from {helo} ([{}])\r\n\tby {}", trace.client_ip.to_canonical(), trace.hostname);
    if let Some(tls) = &trace.tls {
        header.push_str(&format!(" ({tls})"));
    }
    header.push_str(&format!(" (sluice) with {protocol} id {}", trace.queue_id));
    if let [only] = trace.recipients.as_slice() {
        header.push_str(&format!("\r\n\tfor <{only}>"));
    }
    header.push_str(&format!(";\r\n\t{date}\r\n"));
    header
}

/// Makes every line ending CRLF: a lone LF or a lone CR becomes CRLF. Bare line endings
/// are not allowed in RFC 5322 messages, and leaving them in would let a message smuggle an
/// end-of-data sequence to a next hop that accepts them (SMTP smuggling); with CRLF only,
/// the MTA's dot-stuffing on output covers every line.
pub(crate) fn normalize_line_endings(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 64);
    let mut i = 0;
    while i < data.len() {
        match data[i] {
            b'\r' if data.get(i + 1) == Some(&b'\n') => {
                out.extend_from_slice(b"\r\n");
                i += 2;
                continue;
            }
            b'\r' | b'\n' => out.extend_from_slice(b"\r\n"),
            b => out.push(b),
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn trace(recipients: &[String]) -> Trace {
        Trace {
            helo: "client.example".into(),
            extended: true,
            client_ip: "192.0.2.7".parse().unwrap(),
            hostname: "relay.example.com".into(),
            tls: None,
            authenticated: false,
            recipients: recipients.to_vec(),
            queue_id: "01JZ0000000000000000000000".into(),
        }
    }

    const NOW: OffsetDateTime = datetime!(2026-11-23 10:00:00 UTC);

    fn text(p: &PreparedMessage) -> &str {
        std::str::from_utf8(&p.body).unwrap()
    }

    #[test]
    fn line_endings_become_crlf() {
        assert_eq!(normalize_line_endings(b"a\nb\r\nc\rd\r\n\r\n"), b"a\r\nb\r\nc\r\nd\r\n\r\n");
        assert_eq!(normalize_line_endings(b"\n.\n"), b"\r\n.\r\n");
        assert_eq!(normalize_line_endings(b""), b"");
    }

    #[test]
    fn adds_received_message_id_and_date_when_missing() {
        let rcpts = vec!["a@example.net".to_string()];
        let p = prepare(b"Subject: hi\r\n\r\nbody\n", &trace(&rcpts), NOW).unwrap();
        let expected = "Received: from client.example ([192.0.2.7])\r\n\
            \tby relay.example.com (sluice) with ESMTP id 01JZ0000000000000000000000\r\n\
            \tfor <a@example.net>;\r\n\
            \tMon, 23 Nov 2026 10:00:00 +0000\r\n\
            Message-ID: <01JZ0000000000000000000000@relay.example.com>\r\n\
            Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n\
            Subject: hi\r\n\r\nbody\r\n";
        assert_eq!(text(&p), expected);
        assert_eq!(p.smtp_id, "<01JZ0000000000000000000000@relay.example.com>");
    }

    #[test]
    fn keeps_the_clients_message_id_and_date() {
        let rcpts = vec!["a@example.net".to_string(), "b@example.net".to_string()];
        let mut t = trace(&rcpts);
        t.tls = Some("using TLSv1_3".into());
        t.authenticated = true;
        let p = prepare(b"Message-ID: <x@y>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nhi\r\n", &t, NOW).unwrap();
        assert_eq!(p.smtp_id, "<x@y>");
        let body = text(&p);
        assert_eq!(body.matches("Message-ID:").count(), 1);
        assert_eq!(body.matches("Date:").count(), 1);
        assert!(body.contains("(using TLSv1_3) (sluice) with ESMTPSA id"));
        assert!(!body.contains("for <"), "no `for` clause with several recipients");
    }

    #[test]
    fn reads_and_removes_x_smtpapi() {
        let rcpts = vec!["a@example.net".to_string()];
        let data = b"Subject: s\r\nX-SMTPAPI: {\"category\": [\"news\", \"weekly\"],\r\n \"unique_args\": {\"customer\": \"42\", \"n\": 7},\r\n \"ip_pool\": \"marketing\", \"send_at\": 1795428000}\r\nFrom: a@b\r\n\r\nbody\r\n";
        let p = prepare(data, &trace(&rcpts), NOW).unwrap();
        assert_eq!(p.categories, vec!["news", "weekly"]);
        assert_eq!(p.custom_args.get("customer").map(String::as_str), Some("42"));
        assert_eq!(p.custom_args.get("n").map(String::as_str), Some("7"));
        assert_eq!(p.ip_pool.as_deref(), Some("marketing"));
        assert_eq!(p.send_at, Some(1795428000));
        assert!(!text(&p).contains("X-SMTPAPI"));
        assert!(text(&p).ends_with("Subject: s\r\nFrom: a@b\r\n\r\nbody\r\n"));
    }

    #[test]
    fn refuses_bad_or_unsupported_x_smtpapi() {
        let rcpts = vec!["a@example.net".to_string()];
        let t = trace(&rcpts);
        let err = |data: &[u8]| prepare(data, &t, NOW).unwrap_err().to_string();
        assert!(err(b"X-SMTPAPI: {nope\r\n\r\nx\r\n").contains("not valid JSON"));
        assert!(err(b"X-SMTPAPI: {\"to\": [\"x@y\"]}\r\n\r\nx\r\n").contains("\"to\" is not supported"));
        assert!(err(b"X-SMTPAPI: {\"send_at\": 4102444800}\r\n\r\nx\r\n").contains("72 hours"));
        assert!(err(b"X-SMTPAPI: {}\r\nX-SMTPAPI: {}\r\n\r\nx\r\n").contains("only one"));
    }

    #[test]
    fn received_names_the_protocol_used() {
        let rcpts = vec!["a@example.net".to_string()];
        let with = |extended: bool, tls: bool, authenticated: bool| {
            let mut t = trace(&rcpts);
            t.extended = extended;
            t.tls = tls.then(|| "using TLSv1_3".to_string());
            t.authenticated = authenticated;
            let p = prepare(b"Subject: x\r\n\r\nx\r\n", &t, NOW).unwrap();
            let body = String::from_utf8(p.body.to_vec()).unwrap();
            body.split(" with ").nth(1).unwrap().split(' ').next().unwrap().to_string()
        };
        assert_eq!(with(false, false, false), "SMTP");
        assert_eq!(with(true, false, false), "ESMTP");
        assert_eq!(with(true, false, true), "ESMTPA");
        assert_eq!(with(true, true, false), "ESMTPS");
        assert_eq!(with(true, true, true), "ESMTPSA");
    }

    #[test]
    fn a_message_without_headers_still_gets_trace_headers() {
        let rcpts = vec!["a@example.net".to_string()];
        let p = prepare(b"just text\r\n", &trace(&rcpts), NOW).unwrap();
        assert!(text(&p).starts_with("Received: "));
        assert!(text(&p).ends_with("Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n\r\njust text\r\n"));
    }
}
