//! End to end over HTTP: the official SendGrid Python SDK → sluice → MX found through the
//! test DNS server → the mock MX, and what arrived there.

mod support;

use base64::Engine;
use mail_parser::{MessageParser, MimeHeaders};
use serde_json::json;
use sluice_load::sink::SinkConfig;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sendgrid_sdk_mail_is_delivered_intact_to_each_domain() {
    let peers = Peers::start(SinkConfig { starttls: true, ..Default::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let s = Sluice::start_with(dir.path(), &config(dir.path(), &peers, ""));
    let attachment = b"quarterly report contents\r\n";
    let body = json!({
        "personalizations": [
            {
                "to": [{"email": "alice@gmail.test", "name": "Alice"}],
                "cc": [{"email": "carol@yahoo.test"}],
                "bcc": [{"email": "bob@example.test"}],
                "substitutions": {"-name-": "Alice"},
                "custom_args": {"user": "42"}
            },
            {"to": [{"email": "dave@gmail.test"}], "substitutions": {"-name-": "Dave"}}
        ],
        "from": {"email": "news@sender.test", "name": "News Desk"},
        "subject": "Hello -name-",
        "content": [
            {"type": "text/plain", "value": "Hi -name-, this is plain."},
            {"type": "text/html", "value": "<p>Hi -name-</p>"}
        ],
        "attachments": [{
            "content": base64::engine::general_purpose::STANDARD.encode(attachment),
            "filename": "report.txt", "type": "text/plain", "disposition": "attachment"
        }],
        "categories": ["newsletter"],
        "custom_args": {"campaign": "spring"},
        "headers": {"X-Campaign": "spring-2026"}
    });
    let out = inject(&["http", "--host", &s.http_base(), "--key", API_KEY], &json!([body]));
    assert_eq!(out.len(), 1);
    let x_message_id = out[0].strip_prefix("ACK 0 ").unwrap_or_else(|| panic!("not accepted: {out:?}")).to_string();

    // personalization 1 → gmail, yahoo, example (one message each); personalization 2 → gmail
    assert!(peers.sink.wait_for_messages(4, std::time::Duration::from_secs(60)).await, "4 messages at the MX");
    let msgs = peers.sink.messages();
    assert_eq!(msgs.len(), 4);
    let mut envelopes: Vec<Vec<String>> = msgs.iter().map(|m| m.rcpt_to.clone()).collect();
    envelopes.sort();
    assert_eq!(
        envelopes,
        vec![vec!["alice@gmail.test".to_string()], vec!["bob@example.test".into()], vec!["carol@yahoo.test".into()], vec!["dave@gmail.test".into()]]
    );
    for m in &msgs {
        assert_eq!(m.mail_from, "news@sender.test");
        assert!(m.tls, "STARTTLS offered by the MX was used");
        assert_eq!(m.helo, "sluice.test");
        let parsed = MessageParser::default().parse(&m.data[..]).expect("valid MIME");
        let to_dave = m.rcpt_to[0] == "dave@gmail.test";
        let name = if to_dave { "Dave" } else { "Alice" };
        assert_eq!(parsed.subject(), Some(format!("Hello {name}").as_str()));
        assert_eq!(parsed.from().unwrap().first().unwrap().address(), Some("news@sender.test"));
        assert!(parsed.header_raw("Bcc").is_none(), "Bcc never appears in the message");
        assert_eq!(parsed.header_raw("X-Campaign").map(str::trim), Some("spring-2026"));
        assert_eq!(parsed.body_text(0).unwrap().trim(), format!("Hi {name}, this is plain."));
        assert!(parsed.body_html(0).unwrap().contains(&format!("<p>Hi {name}</p>")));
        let att = parsed.attachments().next().expect("attachment");
        assert_eq!(att.attachment_name(), Some("report.txt"));
        assert_eq!(att.contents(), attachment);
        if !to_dave {
            // the To and Cc headers of personalization 1, whoever this copy is for
            assert_eq!(parsed.to().unwrap().first().unwrap().address(), Some("alice@gmail.test"));
            assert_eq!(parsed.cc().unwrap().first().unwrap().address(), Some("carol@yahoo.test"));
        }
    }

    let events = wait_events(&s, "4 delivered events", |e| count(e, "delivered") == 4).await;
    assert_eq!(count(&events, "processed"), 4);
    for e in events.iter().filter(|e| e["event"] == "delivered") {
        assert!(e["sg_message_id"].as_str().unwrap().starts_with(&format!("{x_message_id}.")), "{e}");
        assert_eq!(e["category"], json!(["newsletter"]));
        assert_eq!(e["campaign"], "spring", "custom args are merged into events");
        assert_eq!(e["tls"], 1);
        assert!(e["response"].as_str().unwrap().starts_with("250"));
        assert!(e["smtp-id"].as_str().unwrap().starts_with('<'));
        if e["email"] != "dave@gmail.test" {
            assert_eq!(e["user"], "42", "personalization custom args too");
        }
    }
    assert!(s.stop(), "clean exit on SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_key_and_bad_body_are_refused_and_nothing_is_sent() {
    let peers = Peers::start(SinkConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let s = Sluice::start_with(dir.path(), &config(dir.path(), &peers, ""));
    let good = json!({
        "personalizations": [{"to": [{"email": "a@gmail.test"}]}],
        "from": {"email": "s@sender.test"}, "subject": "x",
        "content": [{"type": "text/plain", "value": "x"}]
    });
    let out = inject(&["http", "--host", &s.http_base(), "--key", "SG.wrong"], &json!([good]));
    assert!(out[0].starts_with("ERR 0 401"), "{out:?}");
    assert!(out[0].contains("The provided authorization grant is invalid, expired, or revoked"));
    let bad = json!({"personalizations": [{"to": [{"email": "not-an-address"}]}], "from": {"email": "s@sender.test"}});
    let out = inject(&["http", "--host", &s.http_base(), "--key", API_KEY], &json!([bad]));
    assert!(out[0].starts_with("ERR 0 400"), "{out:?}");
    assert!(out[0].contains("personalizations.0.to.0.email"), "{out:?}");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(peers.sink.stats().messages, 0);
    assert_eq!(count(&s.events(), "processed"), 0);
    assert!(s.stop());
}
