//! `POST /v3/mail/send` end to end against a router backed by a temporary LocalSpool:
//! authentication, what is spooled (envelope, meta, MIME), sandbox mode, size limits,
//! spool failures, routing and the server's lifecycle.

mod http_support;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use base64::Engine;
use http_support::{header_section, mail_send_request, minimal, structure, FailingSpool, Harness, HOSTNAME, KEY};
use mail_parser::{MessageParser, MimeHeaders};
use serde_json::{json, Value};
use sluice_edge::http::{router, serve, HttpConfig, HttpEdge, UNAUTHORIZED_MESSAGE};
use sluice_edge::Ingest;
use sluice_events::EventLog;
use sluice_spool::{LeaseRequest, Message, Spool, SpoolError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn with(mut base: Value, f: impl FnOnce(&mut Value)) -> Value {
    f(&mut base);
    base
}

fn parse(m: &Message) -> mail_parser::Message<'_> {
    MessageParser::default().parse(&m.body[..]).expect("spooled body is MIME")
}

/// Posts `body`, expects 202, and returns what was spooled, ordered by queue.
async fn spooled(h: &Harness, body: &Value) -> Vec<Message> {
    let r = h.post(body).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", String::from_utf8_lossy(&r.body));
    let mut messages = h.enqueued();
    messages.sort_by(|a, b| (a.meta.queue.as_str(), a.meta.smtp_id.as_str()).cmp(&(b.meta.queue.as_str(), b.meta.smtp_id.as_str())));
    messages
}

#[tokio::test]
async fn accepts_with_202_and_x_message_id_once_durable() {
    let h = Harness::new();
    let r = h.post(&minimal()).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert!(r.body.is_empty());
    let x_message_id = r.headers["x-message-id"].to_str().unwrap().to_string();
    assert_eq!(x_message_id.len(), 22);

    let spooled = h.enqueued();
    assert_eq!(spooled.len(), 1);
    let meta = &spooled[0].meta;
    assert_eq!(meta.tenant, "apikey:acme");
    assert_eq!(meta.mail_from, "sender@example.org");
    assert_eq!(meta.queue, "example.com");
    assert_eq!(meta.recipients.iter().map(|r| r.address.as_str()).collect::<Vec<_>>(), ["rcpt@example.com"]);
    assert_eq!(meta.x_message_id, x_message_id);
    assert!(meta.smtp_id.starts_with('<') && meta.smtp_id.ends_with(&format!("@{HOSTNAME}>")), "{}", meta.smtp_id);
    assert!(meta.smtp_id[1..27].parse::<ulid::Ulid>().is_ok(), "Message-ID is <ULID@host>: {}", meta.smtp_id);

    let msg = parse(&spooled[0]);
    assert_eq!(msg.message_id(), Some(&meta.smtp_id[1..meta.smtp_id.len() - 1]));
    assert_eq!(msg.subject(), Some("Hello"));
    assert_eq!(msg.from().unwrap().first().unwrap().address(), Some("sender@example.org"));
    assert!(msg.date().is_some());
    assert_eq!(msg.body_text(0).unwrap().trim_end(), "Hi there");

    // It really is in the LocalSpool, not just recorded.
    let leased = h.spool.lease(LeaseRequest::new(10, Duration::from_secs(60))).await.unwrap();
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0].body, spooled[0].body);
}

#[tokio::test]
async fn requires_a_valid_bearer_key() {
    let h = Harness::new();
    let exact = format!(r#"{{"errors":[{{"message":"{UNAUTHORIZED_MESSAGE}","field":null,"help":null}}]}}"#);
    let body = serde_json::to_vec(&minimal()).unwrap();
    for req in [
        mail_send_request(None, body.clone()),
        mail_send_request(Some("SG.wrong"), body.clone()),
        mail_send_request(Some(""), body.clone()),
        Request::post("/v3/mail/send").header("authorization", format!("Basic {KEY}")).body(Body::from(body.clone())).unwrap(),
        Request::post("/v3/mail/send").header("authorization", KEY).body(Body::from(body.clone())).unwrap(),
    ] {
        let r = h.send(req).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
        assert_eq!(r.headers["content-type"], "application/json");
        assert_eq!(String::from_utf8(r.body).unwrap(), exact);
    }
    // Auth comes before the body is looked at, as at SendGrid.
    let r = h.send(mail_send_request(Some("SG.wrong"), b"not json".to_vec())).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(h.enqueued().is_empty());

    let lower = Request::post("/v3/mail/send").header("authorization", format!("bearer {KEY}")).body(Body::from(body)).unwrap();
    assert_eq!(h.send(lower).await.status, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn cc_is_a_header_bcc_only_an_envelope_recipient() {
    let h = Harness::new();
    let body = with(minimal(), |b| {
        b["personalizations"][0] = json!({
            "to": [{"email": "to@example.com", "name": "To Person"}],
            "cc": [{"email": "cc@example.com"}, {"email": "cc2@other.example"}],
            "bcc": [{"email": "hidden@example.com"}, {"email": "hidden2@third.example"}]
        });
    });
    let messages = spooled(&h, &body).await;
    // One personalization, split by recipient domain; every part carries the same body.
    let queues: Vec<&str> = messages.iter().map(|m| m.meta.queue.as_str()).collect();
    assert_eq!(queues, ["example.com", "other.example", "third.example"]);
    let all: Vec<&str> = messages.iter().flat_map(|m| m.meta.recipients.iter().map(|r| r.address.as_str())).collect();
    assert_eq!(all, ["to@example.com", "cc@example.com", "hidden@example.com", "cc2@other.example", "hidden2@third.example"]);
    assert!(messages.iter().all(|m| m.body == messages[0].body && m.meta.x_message_id == messages[0].meta.x_message_id));

    let msg = parse(&messages[0]);
    let to = msg.to().unwrap().first().unwrap();
    assert_eq!((to.name(), to.address()), (Some("To Person"), Some("to@example.com")));
    let cc: Vec<&str> = msg.cc().unwrap().iter().filter_map(|a| a.address()).collect();
    assert_eq!(cc, ["cc@example.com", "cc2@other.example"]);
    assert!(msg.bcc().is_none());
    let raw = String::from_utf8_lossy(&messages[0].body);
    assert!(!raw.contains("hidden"), "bcc addresses must not appear in the message:\n{raw}");
}

#[tokio::test]
async fn one_message_per_personalization_with_its_overrides() {
    let h = Harness::new();
    let body = with(minimal(), |b| {
        b["personalizations"] = json!([
            {"to": [{"email": "a@example.com"}]},
            {"to": [{"email": "b@example.com"}], "subject": "Own subject", "from": {"email": "other@example.org", "name": "Other"}},
        ]);
    });
    let messages = spooled(&h, &body).await;
    assert_eq!(messages.len(), 2);
    assert_ne!(messages[0].meta.smtp_id, messages[1].meta.smtp_id);
    assert_eq!(messages[0].meta.x_message_id, messages[1].meta.x_message_id);
    let by_rcpt = |addr: &str| messages.iter().find(|m| m.meta.recipients[0].address == addr).unwrap();
    let a = by_rcpt("a@example.com");
    let b = by_rcpt("b@example.com");
    assert_eq!(a.meta.mail_from, "sender@example.org");
    assert_eq!(parse(a).subject(), Some("Hello"));
    assert_eq!(b.meta.mail_from, "other@example.org");
    let pb = parse(b);
    assert_eq!(pb.subject(), Some("Own subject"));
    assert_eq!(pb.from().unwrap().first().unwrap().name(), Some("Other"));
}

#[tokio::test]
async fn substitutions_apply_to_subject_content_and_headers_per_personalization() {
    let h = Harness::new();
    let body = json!({
        "personalizations": [
            {"to": [{"email": "ada@example.com"}], "substitutions": {"-name-": "Ada", "-code-": "A1"}},
            {"to": [{"email": "bob@example.com"}], "substitutions": {"-name-": "Bob", "-code-": "B2"},
             "headers": {"X-Who": "personal -name-"}},
        ],
        "from": {"email": "sender@example.org"},
        "subject": "Hello -name-",
        "headers": {"X-Code": "-code-", "X-Who": "global -name-"},
        "content": [
            {"type": "text/plain", "value": "Dear -name-, your code is -code-."},
            {"type": "text/html", "value": "<p>Dear -name-, your code is <b>-code-</b>.</p>"}
        ]
    });
    let messages = spooled(&h, &body).await;
    let by_rcpt = |addr: &str| messages.iter().find(|m| m.meta.recipients[0].address == addr).unwrap();

    let ada = parse(by_rcpt("ada@example.com"));
    assert_eq!(ada.subject(), Some("Hello Ada"));
    assert_eq!(ada.body_text(0).unwrap().trim_end(), "Dear Ada, your code is A1.");
    assert_eq!(ada.body_html(0).unwrap().trim_end(), "<p>Dear Ada, your code is <b>A1</b>.</p>");
    assert_eq!(ada.header_raw("X-Code").unwrap().trim(), "A1");
    assert_eq!(ada.header_raw("X-Who").unwrap().trim(), "global Ada");

    let bob = parse(by_rcpt("bob@example.com"));
    assert_eq!(bob.subject(), Some("Hello Bob"));
    assert_eq!(bob.body_text(0).unwrap().trim_end(), "Dear Bob, your code is B2.");
    assert_eq!(bob.header_raw("X-Code").unwrap().trim(), "B2");
    assert_eq!(bob.header_raw("X-Who").unwrap().trim(), "personal Bob", "the personalization's header wins");
}

#[tokio::test]
async fn categories_custom_args_send_at_and_ip_pool_go_into_the_meta() {
    let h = Harness::new();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let body = with(minimal(), |b| {
        b["personalizations"] = json!([
            {"to": [{"email": "a@example.com"}], "custom_args": {"user": "42", "campaign": "override"}, "send_at": now + 7200},
            {"to": [{"email": "b@example.com"}]},
        ]);
        b["categories"] = json!(["welcome", "onboarding"]);
        b["custom_args"] = json!({"campaign": "spring", "tenant": "acme"});
        b["send_at"] = json!(now + 3600);
        b["ip_pool_name"] = json!("transactional");
        b["batch_id"] = json!("BATCH123");
        b["asm"] = json!({"group_id": 12345});
    });
    let messages = spooled(&h, &body).await;
    let by_rcpt = |addr: &str| messages.iter().find(|m| m.meta.recipients[0].address == addr).unwrap();
    let a = &by_rcpt("a@example.com").meta;
    let b = &by_rcpt("b@example.com").meta;
    for m in [a, b] {
        assert_eq!(m.categories, ["welcome", "onboarding"]);
        assert_eq!(m.ip_pool.as_deref(), Some("transactional"));
    }
    assert_eq!(a.custom_args, [("campaign", "override"), ("tenant", "acme"), ("user", "42")].map(|(k, v)| (k.to_string(), v.to_string())).into());
    assert_eq!(b.custom_args, [("campaign", "spring"), ("tenant", "acme")].map(|(k, v)| (k.to_string(), v.to_string())).into());
    assert_eq!(a.due_at, (now + 7200) * 1000, "the personalization's send_at wins");
    assert_eq!(b.due_at, (now + 3600) * 1000, "the message's send_at applies otherwise");
    // Scheduled for later: nothing is due yet.
    assert!(h.spool.lease(LeaseRequest::new(10, Duration::from_secs(60))).await.unwrap().is_empty());
}

#[tokio::test]
async fn mime_structure_follows_the_content() {
    let h = Harness::new();
    let plain = minimal();
    let alt = with(minimal(), |b| {
        b["content"] = json!([{"type": "text/plain", "value": "plain"}, {"type": "text/html", "value": "<p>html</p>"}])
    });
    let pdf = b"%PDF-1.4 fake pdf \x00\x01\x02\xff";
    let png = b"\x89PNG\r\n\x1a\n fake image";
    let mixed = with(alt.clone(), |b| {
        b["attachments"] = json!([{"content": b64(pdf), "filename": "invoice.pdf", "type": "application/pdf"}])
    });
    let related = with(alt.clone(), |b| {
        b["attachments"] = json!([{"content": b64(png), "filename": "logo.png", "type": "image/png", "disposition": "inline", "content_id": "logo"}])
    });
    let both = with(alt.clone(), |b| {
        b["attachments"] = json!([
            {"content": b64(png), "filename": "logo.png", "type": "image/png", "disposition": "inline", "content_id": "logo"},
            {"content": b64(pdf), "filename": "Rechnung März.pdf", "type": "application/pdf"},
        ])
    });
    let cases = [
        (plain, "text/plain"),
        (alt, "multipart/alternative[text/plain,text/html]"),
        (mixed, "multipart/mixed[multipart/alternative[text/plain,text/html],application/pdf]"),
        (related, "multipart/related[multipart/alternative[text/plain,text/html],image/png]"),
        (both, "multipart/mixed[multipart/related[multipart/alternative[text/plain,text/html],image/png],application/pdf]"),
    ];
    let mut seen = 0;
    for (body, expected) in cases {
        let r = h.post(&body).await;
        assert_eq!(r.status, StatusCode::ACCEPTED);
        let all = h.enqueued();
        assert_eq!(structure(&all.last().unwrap().body), expected);
        seen += 1;
        assert_eq!(all.len(), seen);
    }

    let last = h.enqueued().pop().unwrap();
    let msg = parse(&last);
    assert_eq!(msg.body_text(0).unwrap().trim_end(), "plain");
    assert_eq!(msg.body_html(0).unwrap().trim_end(), "<p>html</p>");
    let attachments: Vec<_> = msg.attachments().collect();
    assert_eq!(attachments.len(), 2);
    let logo = attachments.iter().find(|a| a.content_id().is_some()).unwrap();
    assert_eq!(logo.content_id(), Some("logo"));
    assert_eq!(logo.contents(), png);
    assert!(logo.content_disposition().unwrap().is_inline());
    let invoice = attachments.iter().find(|a| a.content_id().is_none()).unwrap();
    assert_eq!(invoice.attachment_name(), Some("Rechnung März.pdf"));
    assert_eq!(invoice.contents(), pdf);
    assert!(invoice.content_disposition().unwrap().is_attachment());
}

#[tokio::test]
async fn headers_reply_to_and_line_endings() {
    let h = Harness::new();
    let unsubscribe = "<https://example.org/unsubscribe?list=spring-campaign&user=0123456789abcdef0123456789abcdef>, <mailto:unsub@example.org>";
    let body = with(minimal(), |b| {
        b["headers"] = json!({"X-Campaign": "spring", "List-Unsubscribe": unsubscribe, "X-Umlaut": "Grüße"});
        b["reply_to_list"] = json!([{"email": "r1@example.org", "name": "One"}, {"email": "r2@example.org"}]);
        b["content"] = json!([{"type": "text/plain", "value": "line one\nline two\rline three\r\n"}]);
    });
    let messages = spooled(&h, &body).await;
    let msg = parse(&messages[0]);
    assert_eq!(msg.header_raw("X-Campaign").unwrap().trim(), "spring");
    // Structured headers are passed on as written, not RFC 2047-encoded.
    let raw_unsub: String = msg.header_raw("List-Unsubscribe").unwrap().split_whitespace().collect::<Vec<_>>().join(" ");
    assert_eq!(raw_unsub, unsubscribe);
    // Non-ASCII values are RFC 2047-encoded (decoded here by reading them as a Subject).
    let umlaut = msg.header_raw("X-Umlaut").unwrap().trim().to_string();
    assert!(umlaut.starts_with("=?utf-8?"), "{umlaut}");
    let raw_subject = format!("Subject: {umlaut}\r\n\r\n");
    let decoded = MessageParser::default().parse_headers(raw_subject.as_bytes()).unwrap();
    assert_eq!(decoded.subject(), Some("Grüße"));
    let reply_to: Vec<&str> = msg.reply_to().unwrap().iter().filter_map(|a| a.address()).collect();
    assert_eq!(reply_to, ["r1@example.org", "r2@example.org"]);
    assert_eq!(msg.body_text(0).unwrap(), "line one\r\nline two\r\nline three\r\n");

    let raw = &messages[0].body;
    for (i, &b) in raw.iter().enumerate() {
        if b == b'\n' {
            assert_eq!(raw[i - 1], b'\r', "bare LF at byte {i}");
        }
    }
    let headers = header_section(raw);
    assert!(headers.contains("MIME-Version: 1.0"));
    assert!(!headers.to_ascii_lowercase().contains("\nbcc:"));
}

#[tokio::test]
async fn a_message_id_or_date_in_the_request_replaces_ours() {
    let h = Harness::new();
    let body = with(minimal(), |b| {
        b["headers"] = json!({"Message-ID": "<custom-123@app.example>", "Date": "Tue, 1 Apr 2025 10:00:00 +0000"});
    });
    let messages = spooled(&h, &body).await;
    assert_eq!(messages[0].meta.smtp_id, "<custom-123@app.example>");
    let headers = header_section(&messages[0].body);
    assert_eq!(headers.matches("Message-ID:").count(), 1, "{headers}");
    assert_eq!(headers.matches("Date:").count(), 1, "{headers}");
    assert!(headers.contains("Message-ID: <custom-123@app.example>"));
}

#[tokio::test]
async fn sandbox_mode_validates_and_sends_nothing() {
    let h = Harness::new();
    let sandbox = with(minimal(), |b| b["mail_settings"] = json!({"sandbox_mode": {"enable": true}, "footer": {"enable": false}}));
    let r = h.post(&sandbox).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.is_empty());
    assert!(h.enqueued().is_empty());
    assert_eq!(h.spool.counts().await.unwrap().queued, 0);

    let invalid = with(sandbox.clone(), |b| b["from"] = json!({"email": "nope"}));
    let r = h.post(&invalid).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    r.error_on("from.email");

    let disabled = with(minimal(), |b| b["mail_settings"] = json!({"sandbox_mode": {"enable": false}}));
    assert_eq!(h.post(&disabled).await.status, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn oversized_bodies_and_messages_get_413() {
    let config = HttpConfig { max_body_bytes: 4096, max_message_bytes: 4096, max_request_message_bytes: 16 * 1024, ..Default::default() };
    let h = Harness::with_config(config);

    // Announced too large: refused before reading.
    let big = serde_json::to_vec(&with(minimal(), |b| b["content"][0]["value"] = json!("x".repeat(5000)))).unwrap();
    let req = Request::post("/v3/mail/send")
        .header("authorization", format!("Bearer {KEY}"))
        .header("content-length", big.len())
        .body(Body::from(big.clone()))
        .unwrap();
    let r = h.send(req).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(r.errors()[0].1.starts_with("content too large"));
    // Not announced (chunked): refused while reading.
    let r = h.post_raw(big).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.headers["content-type"], "application/json");

    // The body fits, the message it makes does not (base64 and MIME overhead).
    let r = h.post(&with(minimal(), |b| b["attachments"] = json!([{"content": b64(&[7u8; 2900]), "filename": "a.bin"}]))).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.errors()[0].1.contains("once encoded"));

    // Each message fits, all personalizations together do not.
    let many = with(minimal(), |b| {
        b["content"][0]["value"] = json!("y".repeat(1000));
        b["personalizations"] = json!((0..12).map(|i| json!({"to": [{"email": format!("r{i}@example.com")}]})).collect::<Vec<_>>());
    });
    let r = h.post(&many).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", String::from_utf8_lossy(&r.body));
    assert!(h.enqueued().is_empty());
}

#[tokio::test]
async fn large_requests_are_built_off_the_reactor_intact() {
    let h = Harness::new();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let body = with(minimal(), |b| b["attachments"] = json!([{"content": b64(&data), "filename": "big.bin", "type": "application/octet-stream"}]));
    let messages = spooled(&h, &body).await;
    let msg = parse(&messages[0]);
    assert_eq!(msg.attachments().next().unwrap().contents(), &data[..]);
}

#[tokio::test]
async fn spool_failures_are_never_acknowledged() {
    for (error, status, retry_after) in [
        ((|| SpoolError::Unavailable("ceph below min_size".into())) as fn() -> SpoolError, StatusCode::SERVICE_UNAVAILABLE, Some("5")),
        (|| SpoolError::Closed, StatusCode::SERVICE_UNAVAILABLE, Some("5")),
        (|| SpoolError::Storage("disk on fire".into()), StatusCode::INTERNAL_SERVER_ERROR, None),
    ] {
        let spool: Arc<dyn Spool> = Arc::new(FailingSpool(error));
        let edge = HttpEdge::new(
            HttpConfig::default(),
            Ingest::new(spool, EventLog::disabled(), Duration::from_secs(60)),
            http_support::api_keys(),
            HOSTNAME,
        );
        let response = router(edge).oneshot(mail_send_request(Some(KEY), serde_json::to_vec(&minimal()).unwrap())).await.unwrap();
        assert_eq!(response.status(), status);
        assert!(response.headers().get("x-message-id").is_none());
        assert_eq!(response.headers().get("retry-after").map(|v| v.to_str().unwrap()), retry_after);
        assert_eq!(response.headers()["content-type"], "application/json");
        let body = http_body_util::BodyExt::collect(response.into_body()).await.unwrap().to_bytes();
        let v: Value = serde_json::from_slice(&body).unwrap();
        let message = v["errors"][0]["message"].as_str().unwrap();
        assert!(message.contains("not") && message.contains("Retry"), "{message}");
        assert!(!message.contains("disk on fire"), "internal details stay in the log");
    }
}

#[tokio::test]
async fn routing_errors_are_sendgrid_shaped() {
    let h = Harness::new();
    let r = h.send(Request::get("/v3/mail/send").body(Body::empty()).unwrap()).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.headers["allow"], "POST");
    assert!(r.errors()[0].1.starts_with("method not allowed"));

    for path in ["/v3/mail/sent", "//v3/mail/send", "/"] {
        let r = h.send(mail_send_request(Some(KEY), b"{}".to_vec()).map(|b| b).tap_uri(path)).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}");
        assert!(r.errors()[0].1.starts_with("not found"));
    }

    let r = h.send(Request::get("/healthz").body(Body::empty()).unwrap()).await;
    assert_eq!((r.status, r.body.as_slice()), (StatusCode::OK, &b"ok"[..]));

    let gz = Request::post("/v3/mail/send")
        .header("authorization", format!("Bearer {KEY}"))
        .header("content-encoding", "gzip")
        .body(Body::from(vec![0x1f, 0x8b]))
        .unwrap();
    let r = h.send(gz).await;
    assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(r.errors()[0].1.contains("uncompressed"));
}

trait TapUri {
    fn tap_uri(self, path: &str) -> Self;
}

impl TapUri for Request<Body> {
    fn tap_uri(mut self, path: &str) -> Self {
        *self.uri_mut() = path.parse().unwrap();
        self
    }
}

/// Sends one raw HTTP/1.1 request and reads the whole answer (the server closes).
async fn raw_http(addr: std::net::SocketAddr, request: String) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer)).await.expect("server answers").unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn serve_answers_over_tcp_and_stops_on_cancel() {
    let h = Harness::new();
    let (addr, cancel, server) = serve_harness(&h).await;

    let body = serde_json::to_string(&minimal()).unwrap();
    let answer = raw_http(
        addr,
        format!(
            "POST /v3/mail/send HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 202 Accepted\r\n"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("\r\nx-message-id: "), "{answer}");
    assert_eq!(h.enqueued().len(), 1);

    let answer = raw_http(addr, format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n") && answer.ends_with("ok"), "{answer}");

    // An idle keep-alive connection must not hold up shutdown.
    let idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(30), server).await.expect("serve returns after cancel").unwrap().unwrap();
    drop(idle);
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "the listener is closed");
}

/// Serves `h` on a fresh port until the returned token is cancelled.
async fn serve_harness(h: &Harness) -> (std::net::SocketAddr, CancellationToken, tokio::task::JoinHandle<std::io::Result<()>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cancel = CancellationToken::new();
    let server = tokio::spawn(serve(listener, h.edge.clone(), cancel.clone()));
    (addr, cancel, server)
}

#[tokio::test]
async fn clients_that_never_finish_their_headers_and_idle_connections_are_disconnected() {
    let h = Harness::with_config(HttpConfig { header_read_timeout: Duration::from_millis(200), ..Default::default() });
    let (addr, cancel, server) = serve_harness(&h).await;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(b"POST /v3/mail/send HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut rest)).await.expect("server closes the connection").unwrap();

    // An idle keep-alive connection is closed the same way once its request was answered.
    let answer = raw_http(addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".to_string()).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n") && answer.ends_with("ok"), "{answer}");
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(30), server).await.unwrap().unwrap().unwrap();
}

#[tokio::test]
async fn bodies_that_never_finish_get_408() {
    let h = Harness::with_config(HttpConfig { request_timeout: Duration::from_millis(200), ..Default::default() });
    let (addr, cancel, server) = serve_harness(&h).await;
    let answer = raw_http(
        addr,
        format!("POST /v3/mail/send HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 100\r\n\r\n{{\"personalizations\""),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    assert!(answer.contains("Timed out reading the request body"), "{answer}");
    assert!(h.enqueued().is_empty());
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(30), server).await.unwrap().unwrap().unwrap();
}
