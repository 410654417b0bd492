//! Every SendGrid request rule: a violation is a 400 in SendGrid's error shape, with a
//! dotted field path, every violation reported at once, and nothing spooled.

mod http_support;

use axum::http::StatusCode;
use http_support::{minimal, Harness, Reply};
use serde_json::{json, Value};

/// Posts `body`, expects a 400 with a JSON error body, and checks nothing was spooled.
async fn rejected(body: Value) -> Reply {
    let h = Harness::new();
    let reply = h.post(&body).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "body: {}", String::from_utf8_lossy(&reply.body));
    assert_eq!(reply.headers["content-type"], "application/json");
    for e in reply.json()["errors"].as_array().unwrap() {
        assert!(e.get("help").is_some(), "every error has a help key: {e}");
    }
    assert!(h.enqueued().is_empty(), "a rejected request must not spool anything");
    reply
}

async fn accepted(body: Value) {
    let h = Harness::new();
    let reply = h.post(&body).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "body: {}", String::from_utf8_lossy(&reply.body));
    assert!(!h.enqueued().is_empty());
}

fn with(mut base: Value, f: impl FnOnce(&mut Value)) -> Value {
    f(&mut base);
    base
}

fn addresses(n: usize, domain: &str) -> Vec<Value> {
    (0..n).map(|i| json!({"email": format!("r{i}@{domain}")})).collect()
}

#[tokio::test]
async fn personalizations_are_required() {
    const REQUIRED: &str = "The personalizations field is required and must have at least one personalization.";
    let r = rejected(with(minimal(), |b| {
        b.as_object_mut().unwrap().remove("personalizations");
    }))
    .await;
    assert_eq!(r.errors(), vec![(Some("personalizations".into()), REQUIRED.into())]);
    let r = rejected(with(minimal(), |b| b["personalizations"] = json!([]))).await;
    assert_eq!(r.error_on("personalizations"), REQUIRED);
}

#[tokio::test]
async fn at_most_1000_personalizations() {
    let many = |n: usize| {
        with(minimal(), |b| b["personalizations"] = json!((0..n).map(|i| json!({"to": [{"email": format!("r{i}@example.com")}]})).collect::<Vec<_>>()))
    };
    let r = rejected(many(1001)).await;
    let m = r.error_on("personalizations");
    assert!(m.starts_with("The personalization block is limited to 1000 personalizations per API request. You have provided 1001 personalizations."), "{m}");
    accepted(many(1000)).await;
}

#[tokio::test]
async fn every_personalization_needs_a_to_address() {
    const TO: &str = "The to array is required for all personalization objects, and must have at least one email object with a valid email address.";
    let r = rejected(with(minimal(), |b| {
        b["personalizations"] = json!([{"to": [{"email": "a@example.com"}]}, {"cc": [{"email": "c@example.com"}]}, {"to": []}])
    }))
    .await;
    assert_eq!(r.error_on("personalizations.1.to"), TO);
    assert_eq!(r.error_on("personalizations.2.to"), TO);
    assert_eq!(r.errors().len(), 2, "{:?}", r.errors());

    let r = rejected(with(minimal(), |b| b["personalizations"][0]["to"] = json!([{"name": "No Address"}]))).await;
    assert_eq!(r.error_on("personalizations.0.to.0.email"), "The to email parameter is required.");
}

#[tokio::test]
async fn at_most_1000_recipients_in_total() {
    let r = rejected(with(minimal(), |b| {
        b["personalizations"] = json!([
            {"to": addresses(400, "a.example"), "cc": addresses(100, "b.example")},
            {"to": addresses(400, "c.example"), "bcc": addresses(101, "d.example")},
        ])
    }))
    .await;
    assert!(r.error_on("personalizations").contains("limit of 1000 total recipients (to + cc + bcc)"));
    accepted(with(minimal(), |b| {
        b["personalizations"] = json!([{"to": addresses(600, "a.example"), "bcc": addresses(400, "b.example")}])
    }))
    .await;
}

#[tokio::test]
async fn every_address_must_be_valid() {
    let r = rejected(with(minimal(), |b| {
        b["personalizations"][0] = json!({
            "to": [{"email": "ok@example.com"}, {"email": "not-an-address"}],
            "cc": [{"email": "Name <x@example.com>"}],
            "bcc": [{"email": "a b@example.com"}],
            "from": {"email": "@example.com"}
        });
        b["from"] = json!({"email": "sender@localhost"});
        b["reply_to"] = json!({"email": "reply@"});
    }))
    .await;
    for field in [
        "personalizations.0.to.1.email",
        "personalizations.0.cc.0.email",
        "personalizations.0.bcc.0.email",
        "personalizations.0.from.email",
        "from.email",
        "reply_to.email",
    ] {
        assert!(r.error_on(field).starts_with("Does not contain a valid address"), "{field}");
    }
    assert_eq!(r.errors().len(), 6, "{:#?}", r.errors());
}

#[tokio::test]
async fn from_is_required() {
    let r = rejected(with(minimal(), |b| {
        b.as_object_mut().unwrap().remove("from");
    }))
    .await;
    assert!(r.error_on("from").contains("from object is required"));
    let r = rejected(with(minimal(), |b| b["from"] = json!({"name": "Nobody"}))).await;
    assert_eq!(r.error_on("from.email"), "The from email parameter is required.");
}

#[tokio::test]
async fn subject_is_required_at_the_top_or_in_every_personalization() {
    let no_subject = with(minimal(), |b| {
        b.as_object_mut().unwrap().remove("subject");
    });
    let r = rejected(no_subject.clone()).await;
    assert!(r.error_on("subject").starts_with("The subject is required"));

    let r = rejected(with(no_subject.clone(), |b| {
        b["personalizations"] = json!([{"to": [{"email": "a@example.com"}], "subject": "A"}, {"to": [{"email": "b@example.com"}]}])
    }))
    .await;
    assert!(r.error_on("subject").starts_with("The subject is required"));

    accepted(with(no_subject.clone(), |b| {
        b["personalizations"] = json!([{"to": [{"email": "a@example.com"}], "subject": "A"}, {"to": [{"email": "b@example.com"}], "subject": "B"}])
    }))
    .await;

    let r = rejected(with(minimal(), |b| b["subject"] = json!(""))).await;
    assert!(r.error_on("subject").contains("at least one character"));
}

#[tokio::test]
async fn a_template_id_is_refused_with_one_error_on_it() {
    let r = rejected(with(minimal(), |b| {
        let o = b.as_object_mut().unwrap();
        o.remove("subject");
        o.remove("content");
        o.insert("template_id".into(), json!("d-0123456789abcdef"));
    }))
    .await;
    assert!(r.error_on("template_id").contains("does not store or render templates"));
    assert_eq!(r.errors().len(), 1, "only the template error, not missing subject and content: {:?}", r.errors());

    let r = rejected(with(minimal(), |b| b["template_id"] = json!("d-0123456789abcdef"))).await;
    assert!(r.error_on("template_id").contains("send it as subject and content"));
}

#[tokio::test]
async fn content_is_required_and_each_block_complete() {
    let r = rejected(with(minimal(), |b| {
        b.as_object_mut().unwrap().remove("content");
    }))
    .await;
    assert!(r.error_on("content").starts_with("Unless a template_id is provided, the content parameter is required"));
    rejected(with(minimal(), |b| b["content"] = json!([]))).await;

    let r = rejected(with(minimal(), |b| {
        b["content"] = json!([{"type": "text/plain", "value": ""}, {"type": "", "value": "x"}, {"value": "y"}, {"type": "text/html"}])
    }))
    .await;
    assert_eq!(r.error_on("content.0.value"), "The content value must be a string at least one character in length.");
    assert!(r.error_on("content.1.type").contains("required"));
    assert!(r.error_on("content.2.type").contains("required"));
    assert_eq!(r.error_on("content.3.value"), "The content value must be a string at least one character in length.");

    let r = rejected(with(minimal(), |b| b["content"] = json!([{"type": "html", "value": "x"}]))).await;
    assert!(r.error_on("content.0.type").contains("not a valid MIME type"));
}

#[tokio::test]
async fn text_plain_comes_before_text_html() {
    let ordered = "If present, text/plain must be first, followed by text/html, followed by any other content.";
    let r = rejected(with(minimal(), |b| {
        b["content"] = json!([{"type": "text/html", "value": "<p>x</p>"}, {"type": "text/plain", "value": "x"}])
    }))
    .await;
    assert_eq!(r.error_on("content"), ordered);
    let r = rejected(with(minimal(), |b| {
        b["content"] = json!([{"type": "text/calendar", "value": "BEGIN:VCALENDAR"}, {"type": "text/html", "value": "<p>x</p>"}])
    }))
    .await;
    assert_eq!(r.error_on("content"), ordered);
    let r = rejected(with(minimal(), |b| {
        b["content"] = json!([{"type": "text/plain", "value": "x"}, {"type": "text/plain", "value": "y"}])
    }))
    .await;
    assert!(r.error_on("content").contains("only once"));
    accepted(with(minimal(), |b| {
        b["content"] = json!([{"type": "text/plain", "value": "x"}, {"type": "text/html", "value": "<p>x</p>"}, {"type": "text/calendar; method=REQUEST", "value": "BEGIN:VCALENDAR"}])
    }))
    .await;
}

#[tokio::test]
async fn reply_to_and_reply_to_list_are_mutually_exclusive() {
    let r = rejected(with(minimal(), |b| {
        b["reply_to"] = json!({"email": "r@example.com"});
        b["reply_to_list"] = json!([{"email": "s@example.com"}]);
    }))
    .await;
    assert!(r.error_on("reply_to").contains("mutually exclusive"));
    let r = rejected(with(minimal(), |b| b["reply_to_list"] = json!([{"email": "s@example.com"}, {"email": "S@example.com"}]))).await;
    assert!(r.error_on("reply_to_list.1.email").contains("twice"));
}

#[tokio::test]
async fn categories_at_most_ten_unique_and_short() {
    let r = rejected(with(minimal(), |b| b["categories"] = json!((0..11).map(|i| format!("c{i}")).collect::<Vec<_>>()))).await;
    assert_eq!(r.error_on("categories"), "You may not use more than 10 categories per email.");
    let r = rejected(with(minimal(), |b| b["categories"] = json!(["a", "b", "a"]))).await;
    assert!(r.error_on("categories.2").contains("unique"));
    let r = rejected(with(minimal(), |b| b["categories"] = json!(["x".repeat(256)]))).await;
    assert!(r.error_on("categories.0").contains("255"));
    accepted(with(minimal(), |b| b["categories"] = json!((0..10).map(|_| "y".repeat(255)).enumerate().map(|(i, s)| format!("{i}{}", &s[1..])).collect::<Vec<_>>()))).await;
}

#[tokio::test]
async fn custom_args_at_most_10000_bytes() {
    let big = json!({"k": "v".repeat(10_000)});
    let r = rejected(with(minimal(), |b| b["custom_args"] = big.clone())).await;
    assert!(r.error_on("custom_args").starts_with("The total length of custom arguments must be less than 10000 bytes"));
    let r = rejected(with(minimal(), |b| {
        b["custom_args"] = json!({"a": "v".repeat(6000)});
        b["personalizations"][0]["custom_args"] = json!({"b": "w".repeat(6000)});
    }))
    .await;
    assert!(r.error_on("personalizations.0.custom_args").contains("10000 bytes"));
    let r = rejected(with(minimal(), |b| b["custom_args"] = json!({"n": 5}))).await;
    assert_eq!(r.error_on("custom_args.n"), "Invalid type. Expected: string, given: integer.");
}

#[tokio::test]
async fn send_at_at_most_72_hours_ahead() {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let r = rejected(with(minimal(), |b| b["send_at"] = json!(now + 73 * 3600))).await;
    assert!(r.error_on("send_at").contains("72 hours"));
    let r = rejected(with(minimal(), |b| b["personalizations"][0]["send_at"] = json!(now + 73 * 3600))).await;
    assert!(r.error_on("personalizations.0.send_at").contains("72 hours"));
    accepted(with(minimal(), |b| b["send_at"] = json!(now + 71 * 3600))).await;
}

#[tokio::test]
async fn the_same_address_twice_in_one_personalization() {
    let r = rejected(with(minimal(), |b| {
        b["personalizations"][0] = json!({"to": [{"email": "dup@example.com"}], "cc": [{"email": "other@example.com"}, {"email": "DUP@example.com"}]})
    }))
    .await;
    assert_eq!(
        r.error_on("personalizations.0.cc.1.email"),
        "Each unique email address in the personalizations array should only be included once. You have included DUP@example.com more than once."
    );
    let r = rejected(with(minimal(), |b| b["personalizations"][0] = json!({"to": [{"email": "d@example.com"}, {"email": "d@example.com"}]}))).await;
    r.error_on("personalizations.0.to.1.email");
    // The same address in two personalizations is two separate messages: fine.
    accepted(with(minimal(), |b| {
        b["personalizations"] = json!([{"to": [{"email": "d@example.com"}]}, {"to": [{"email": "d@example.com"}]}])
    }))
    .await;
}

#[tokio::test]
async fn reserved_headers_cannot_be_set() {
    for name in [
        "x-sg-id",
        "X-SG-EID",
        "Received",
        "DKIM-Signature",
        "Content-Type",
        "content-transfer-encoding",
        "To",
        "FROM",
        "Subject",
        "Reply-To",
        "CC",
        "Bcc",
    ] {
        let r = rejected(with(minimal(), |b| b["headers"] = json!({ name: "x" }))).await;
        assert!(r.error_on(&format!("headers.{name}")).contains("reserved"), "{name}");
        let r = rejected(with(minimal(), |b| b["personalizations"][0]["headers"] = json!({ name: "x" }))).await;
        assert!(r.error_on(&format!("personalizations.0.headers.{name}")).contains("reserved"), "{name}");
    }
    let r = rejected(with(minimal(), |b| b["headers"] = json!({"Bad Name": "x"}))).await;
    r.error_on("headers.Bad Name");
}

#[tokio::test]
async fn attachments_must_be_base64_and_named() {
    let r = rejected(with(minimal(), |b| {
        b["attachments"] = json!([
            {"content": "not base64 at all!", "filename": "a.txt"},
            {"content": "aGVsbG8=", "type": "text/plain"},
            {"filename": "c.txt"},
            {"content": "aGVsbG8=", "filename": "d.txt", "disposition": "sideways"},
            {"content": "aGVsbG8=", "filename": "e.txt", "type": "nonsense"},
        ])
    }))
    .await;
    assert_eq!(r.error_on("attachments.0.content"), "The attachment content must be base64 encoded.");
    assert!(r.error_on("attachments.1.filename").contains("required"));
    assert!(r.error_on("attachments.2.content").contains("required"));
    assert!(r.error_on("attachments.3.disposition").contains("inline"));
    assert!(r.error_on("attachments.4.type").contains("MIME type"));
    assert_eq!(r.errors().len(), 5, "{:#?}", r.errors());
}

#[tokio::test]
async fn line_breaks_never_reach_a_header() {
    let r = rejected(with(minimal(), |b| {
        b["subject"] = json!("Hello\r\nBcc: victim@example.net");
        b["from"]["name"] = json!("Evil\nX-Injected: 1");
        b["headers"] = json!({"X-Tag": "a\rb"});
        b["personalizations"][0]["to"][0]["name"] = json!("A\r\nB");
        b["personalizations"][0]["headers"] = json!({"X-Other": "line\nbreak"});
        b["attachments"] = json!([{"content": "aGVsbG8=", "filename": "a.txt\r\nContent-Type: text/html"}]);
    }))
    .await;
    for field in [
        "subject",
        "from.name",
        "headers.X-Tag",
        "personalizations.0.to.0.name",
        "personalizations.0.headers.X-Other",
        "attachments.0.filename",
    ] {
        r.error_on(field);
    }

    let r = rejected(with(minimal(), |b| b["personalizations"][0]["subject"] = json!("Hi\nthere"))).await;
    r.error_on("personalizations.0.subject");
    let r = rejected(with(minimal(), |b| b["content"][0]["type"] = json!("text/plain\r\nX-Evil: 1"))).await;
    r.error_on("content.0.type");

    // A substitution value must not smuggle one in either.
    let r = rejected(with(minimal(), |b| {
        b["subject"] = json!("Hello -name-");
        b["personalizations"][0]["substitutions"] = json!({"-name-": "Ada\r\nBcc: victim@example.net"});
    }))
    .await;
    assert!(r.error_on("personalizations.0.substitutions").contains("line break"));
    let r = rejected(with(minimal(), |b| {
        b["headers"] = json!({"X-Who": "-name-"});
        b["personalizations"][0]["substitutions"] = json!({"-name-": "Ada\nX-Evil: 1"});
    }))
    .await;
    r.error_on("personalizations.0.substitutions");
    // ... while line breaks in content are fine.
    accepted(with(minimal(), |b| {
        b["content"][0]["value"] = json!("Dear -name-,\n\nhello");
        b["personalizations"][0]["substitutions"] = json!({"-name-": "Ada\r\nLovelace"});
    }))
    .await;
}

#[tokio::test]
async fn substitutions_and_ip_pool_limits() {
    let r = rejected(with(minimal(), |b| b["personalizations"][0]["substitutions"] = json!({"": "x"}))).await;
    assert!(r.error_on("personalizations.0.substitutions").contains("empty"));
    let r = rejected(with(minimal(), |b| b["personalizations"][0]["substitutions"] = json!({"-k-": "v".repeat(10_001)}))).await;
    assert!(r.error_on("personalizations.0.substitutions").contains("10000 bytes"));
    let r = rejected(with(minimal(), |b| b["ip_pool_name"] = json!("x"))).await;
    r.error_on("ip_pool_name");
}

#[tokio::test]
async fn type_errors_carry_a_dotted_path() {
    let r = rejected(with(minimal(), |b| b["personalizations"][0]["to"] = json!(["rcpt@example.com"]))).await;
    assert_eq!(
        r.errors(),
        vec![(Some("personalizations.0.to.0".into()), "Invalid type. Expected: object, given: string.".into())]
    );
    let r = rejected(with(minimal(), |b| b["from"] = json!("sender@example.org"))).await;
    assert_eq!(r.error_on("from"), "Invalid type. Expected: object, given: string.");
    let r = rejected(with(minimal(), |b| b["personalizations"] = json!([null]))).await;
    assert_eq!(r.error_on("personalizations.0"), "Invalid type. Expected: object, given: null.");
    let r = rejected(with(minimal(), |b| b["personalizations"][0]["send_at"] = json!("tomorrow"))).await;
    assert_eq!(r.error_on("personalizations.0.send_at"), "Invalid type. Expected: integer, given: string.");
    let r = rejected(with(minimal(), |b| b["attachments"] = json!({"content": "x"}))).await;
    assert_eq!(r.error_on("attachments"), "Invalid type. Expected: array, given: object.");
    let r = rejected(with(minimal(), |b| b["mail_settings"] = json!({"sandbox_mode": {"enable": "yes"}}))).await;
    assert_eq!(r.error_on("mail_settings.sandbox_mode.enable"), "Invalid type. Expected: boolean, given: string.");
}

#[tokio::test]
async fn bad_json_gets_a_clear_message() {
    let h = Harness::new();
    for body in [&b"{\"personalizations\": ["[..], b"not json", b"", b"{}{}"] {
        let r = h.post_raw(body.to_vec()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST);
        let errors = r.errors();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].0, None);
        assert!(errors[0].1.contains("not valid JSON"), "{}", errors[0].1);
    }
    assert!(h.enqueued().is_empty());
}

#[tokio::test]
async fn all_errors_are_reported_at_once() {
    let r = rejected(json!({
        "personalizations": [{"to": [{"email": "bad"}]}],
        "from": {"email": "also bad"},
        "content": [{"type": "text/plain", "value": ""}],
        "categories": ["a", "a"],
    }))
    .await;
    let fields: Vec<String> = r.errors().into_iter().filter_map(|(f, _)| f).collect();
    for f in ["personalizations.0.to.0.email", "from.email", "subject", "content.0.value", "categories.1"] {
        assert!(fields.contains(&f.to_string()), "{f} missing from {fields:?}");
    }
}
