//! End to end over SMTP with real clients (Python smtplib, swaks), and what each reply from
//! the MX leads to: delivered, deferred then delivered, bounced.

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::json;
use sluice_load::sink::{Match, Rule, Scenario, SinkConfig, Stage};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtplib_with_starttls_and_auth_and_swaks_from_localhost() {
    let peers = Peers::start(SinkConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let s = Sluice::start_with(dir.path(), &config(dir.path(), &peers, ""));
    let port = s.smtp.port().to_string();

    let msg = json!([{
        "from": "app@sender.test",
        "to": ["one@gmail.test", "two@gmail.test", "three@yahoo.test"],
        "data": "From: app@sender.test\r\nTo: one@gmail.test\r\nSubject: via smtplib\r\n\r\nline one\r\n.leading dot\r\n"
    }]);
    let out = inject(&["smtp", "--port", &port, "--starttls", "--user", "apikey", "--password", API_KEY], &msg);
    assert_eq!(out, vec!["ACK 0 {}"], "all recipients accepted");

    let swaks = require_tool("swaks");
    let st = Command::new(swaks)
        .args(["--server", &format!("127.0.0.1:{port}"), "--from", "legacy@sender.test", "--to", "four@example.test"])
        .args(["--header", "Subject: via swaks", "--body", "hello from swaks", "--helo", "legacy.test"])
        .output()
        .unwrap();
    assert!(st.status.success(), "swaks: {}", String::from_utf8_lossy(&st.stdout));

    assert!(peers.sink.wait_for_messages(3, Duration::from_secs(60)).await);
    let msgs = peers.sink.messages();
    let gmail = msgs.iter().find(|m| m.rcpt_to.len() == 2).expect("one gmail message with two recipients");
    assert_eq!(gmail.rcpt_to, vec!["one@gmail.test", "two@gmail.test"]);
    let text = String::from_utf8_lossy(&gmail.data);
    assert!(text.starts_with("Received: from client.test"), "a Received header is added: {text}");
    assert!(text.contains("ESMTPSA"), "TLS + AUTH noted in Received: {text}");
    assert!(text.contains("\r\nMessage-ID: <"), "a missing Message-ID is added");
    assert!(text.contains("\r\n.leading dot\r\n"), "dot-stuffing round-trips");
    let swaks_msg = msgs.iter().find(|m| m.rcpt_to == ["four@example.test"]).expect("swaks message");
    assert_eq!(swaks_msg.mail_from, "legacy@sender.test");
    assert!(String::from_utf8_lossy(&swaks_msg.data).contains("hello from swaks"));

    let ev = wait_events(&s, "4 delivered", |e| count(e, "delivered") == 4).await;
    assert_eq!(count(&ev, "processed"), 4);
    assert!(s.stop());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_replies_decide_delivered_deferred_and_bounced() {
    // "slow" is deferred twice, then accepted; "bounce-*" is unknown at the MX.
    let scenario = Scenario::standard().first(
        Rule::at(Stage::Rcpt).when(Match::LocalPartPrefix("slow".into())).reply("451 4.7.1 Greylisted, try again").times(2),
    );
    let peers = Peers::start(SinkConfig { scenario, ..Default::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let s = Sluice::start_with(dir.path(), &config(dir.path(), &peers, ""));
    let msg = json!([{
        "from": "app@sender.test",
        "to": ["ok@gmail.test", "slow@gmail.test", "bounce-me@gmail.test"],
        "data": "Subject: mixed outcomes\r\n\r\nbody\r\n"
    }]);
    let out = inject(&["smtp", "--port", &s.smtp.port().to_string()], &msg);
    assert_eq!(out, vec!["ACK 0 {}"]);

    let ev = wait_events(&s, "slow delivered after retries", |e| {
        e.iter().any(|x| x["event"] == "delivered" && x["email"] == "slow@gmail.test")
    })
    .await;
    let of = |email: &str, kind: &str| ev.iter().filter(|x| x["email"] == email && x["event"] == kind).cloned().collect::<Vec<_>>();
    assert_eq!(of("ok@gmail.test", "delivered").len(), 1);
    let deferred = of("slow@gmail.test", "deferred");
    assert_eq!(deferred.len(), 2, "two deferrals before delivery: {ev:#?}");
    assert_eq!(deferred[0]["attempt"], "1");
    assert!(deferred[0]["response"].as_str().unwrap().contains("4.7.1 Greylisted"));
    let bounce = of("bounce-me@gmail.test", "bounce");
    assert_eq!(bounce.len(), 1, "{ev:#?}");
    assert_eq!(bounce[0]["status"], "5.1.1");
    assert_eq!(bounce[0]["type"], "bounce");
    assert_eq!(bounce[0]["bounce_classification"], "Invalid Address");
    assert!(bounce[0]["reason"].as_str().unwrap().starts_with("550 5.1.1"));
    // delivered once each: the retry only went to the recipient still pending
    let delivered_rcpts: Vec<String> = peers.sink.messages().iter().flat_map(|m| m.rcpt_to.clone()).collect();
    assert_eq!(delivered_rcpts.iter().filter(|r| *r == "ok@gmail.test").count(), 1);
    assert_eq!(delivered_rcpts.iter().filter(|r| *r == "slow@gmail.test").count(), 1);
    let spool: serde_json::Value = serde_json::from_str(&admin_get(&s, "/admin/spool").await).unwrap();
    assert_eq!(spool["queued"], 0, "nothing left in the spool");

    // The same story in /metrics (counters are updated right after the events are written).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let text = loop {
        let text = admin_get(&s, "/metrics").await;
        let settled = metric(&text, "sluice_delivered_total") == Some(2.0) && metric(&text, "sluice_bounced_total") == Some(1.0);
        if settled {
            break text;
        }
        assert!(std::time::Instant::now() < deadline, "delivery counters never settled:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let value = |series: &str| metric(&text, series).unwrap_or_else(|| panic!("{series} missing from /metrics:\n{text}"));
    assert_eq!(value("sluice_received_messages_total"), 1.0, "one message spooled (one recipient domain)");
    assert_eq!(value("sluice_smtp_messages_accepted_total"), 1.0);
    assert_eq!(value("sluice_deferred_total"), 2.0);
    assert_eq!(value("sluice_events_total{event=\"processed\"}"), 3.0);
    assert_eq!(value("sluice_events_total{event=\"deferred\"}"), 2.0);
    assert!(value("sluice_spool_commit_seconds_count") >= 1.0, "the enqueue was a durable commit");
    assert!(value("sluice_spool_commit_messages_count") >= 1.0);
    for state in ["queued", "deferred", "leased"] {
        value(&format!("sluice_queue_depth{{state=\"{state}\"}}"));
    }
    // Inbound sessions and outbound deliveries are counted apart.
    assert_eq!(value("sluice_smtp_connections_total"), 1.0, "the one smtplib session");
    assert!(value("sluice_delivery_connections_total") >= 1.0, "sessions with the MX");
    assert!(value("sluice_delivery_attempt_seconds_count") >= 3.0, "the first attempt and two retries");
    assert!(s.stop());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_open_relay_for_unknown_networks() {
    let peers = Peers::start(SinkConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    // 127.0.0.1 is not a relay network here: it must authenticate like anyone else
    let text = config(dir.path(), &peers, "")
        .replace("[smtp]\nlisten = \"127.0.0.1:0\"\n", "[smtp]\nlisten = \"127.0.0.1:0\"\nrelay_networks = [\"10.99.0.0/16\"]\n");
    assert!(text.contains("relay_networks"));
    let s = Sluice::start_with(dir.path(), &text);
    let msg = json!([{"from": "spammer@evil.test", "to": ["victim@gmail.test"], "data": "Subject: spam\r\n\r\nx\r\n"}]);
    let out = inject(&["smtp", "--port", &s.smtp.port().to_string()], &msg);
    // Refused at RCPT: smtplib reports the recipient with its 530.
    assert!(out[0].starts_with("ERR 0 rcpt") && out[0].contains("530") && out[0].contains("victim@gmail.test"), "{out:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(peers.sink.stats().messages, 0);
    assert!(s.stop());
}
