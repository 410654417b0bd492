//! Delivery through the whole stack: spool → MTA → TestDns → Sink, checked in the sink, the
//! spool and the event log.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Bench, WAIT};
use sluice_load::sink::{Match, Rule, Scenario, SinkConfig, Stage};
use sluice_rules::EnhancedCode;
use sluice_spool::{RecipientState, SuppressionList};

#[tokio::test]
async fn delivers_envelope_and_body_with_prepended_headers() {
    let bench = Bench::new(SinkConfig::default()).await;
    bench.mx_to_sink("dest.test");
    let body = "Subject: hi\r\nFrom: sender@origin.test\r\n\r\nline\r\n.\r\n..two\r\n.leading\nbare lf\r\nno final break";
    let mut msg = common::message("dest.test", &["a@dest.test", "b@dest.test"], body);
    msg.meta.prepend_headers = Some("DKIM-Signature: v=1; d=origin.test;\r\n b=abc\r\n".into());
    let id = msg.meta.id;
    bench.spool.enqueue(vec![msg]).await.unwrap();
    let mta = bench.start(bench.config());

    assert!(bench.sink.wait_for_messages(1, WAIT).await);
    let events = bench.events(2).await;
    mta.stop().await;

    let got = &bench.sink.messages()[0];
    assert_eq!(got.mail_from, "sender@origin.test");
    assert_eq!(got.rcpt_to, ["a@dest.test", "b@dest.test"]);
    assert_eq!(got.helo, "mta.test");
    assert_eq!(
        std::str::from_utf8(&got.data).unwrap(),
        "DKIM-Signature: v=1; d=origin.test;\r\n b=abc\r\nSubject: hi\r\nFrom: sender@origin.test\r\n\r\nline\r\n.\r\n..two\r\n.leading\r\nbare lf\r\nno final break\r\n"
    );
    for e in &events {
        assert_eq!(e["event"], "delivered");
        assert!(e["response"].as_str().unwrap().starts_with("250 2.0.0"), "{e}");
        assert_eq!(e["tls"], 0);
        assert_eq!(e["ip"], "127.0.0.1");
        assert_eq!(e["mx"], "mx.dest.test");
        assert!(e["sg_message_id"].as_str().unwrap().starts_with("XMSG."));
    }
    assert!(bench.meta(id).await.is_none(), "completed messages leave the spool");
}

#[tokio::test]
async fn mixed_recipient_outcomes_update_spool_and_events() {
    let bench = Bench::new(SinkConfig::default()).await;
    bench.mx_to_sink("dest.test");
    let id = bench.enqueue("dest.test", &["ok@dest.test", "bounce-x@dest.test", "defer-y@dest.test"], "Subject: s\r\n\r\nb\r\n").await;
    let mta = bench.start(bench.config());
    let events = bench.events(3).await;
    mta.stop().await;

    let by = |email: &str| events.iter().find(|e| e["email"] == email).unwrap().clone();
    assert_eq!(by("ok@dest.test")["event"], "delivered");
    let bounce = by("bounce-x@dest.test");
    assert_eq!(bounce["event"], "bounce");
    assert_eq!(bounce["status"], "5.1.1");
    assert_eq!(bounce["type"], "bounce");
    assert_eq!(bounce["bounce_classification"], "Invalid Address");
    assert_eq!(bounce["sluice_rule"], "builtin:rfc3463:x.1.1");
    assert_eq!(bounce["sluice_rules_version"], sluice_rules::Builtin::VERSION);
    assert!(bounce["reason"].as_str().unwrap().starts_with("550 5.1.1 The email account"));
    let deferred = by("defer-y@dest.test");
    assert_eq!(deferred["event"], "deferred");
    assert_eq!(deferred["attempt"], "1");
    assert_eq!(deferred["response"], "451 4.7.1 Try again later");
    // The session's TLS state and sending address, as on delivered events.
    for e in [&bounce, &deferred] {
        assert_eq!((e["tls"].as_u64(), e["ip"].as_str()), (Some(0), Some("127.0.0.1")), "{e}");
    }

    let meta = bench.meta(id).await.expect("still queued for the deferred recipient");
    let states: Vec<RecipientState> = meta.recipients.iter().map(|r| r.state).collect();
    assert_eq!(states, [RecipientState::Delivered, RecipientState::Failed, RecipientState::Pending]);
    assert_eq!(meta.attempts, 1);
    assert!(meta.due_at > sluice_spool::now_ms() + 60_000, "next attempt follows the retry interval");
    assert_eq!(meta.last_reply.as_deref(), Some("451 4.7.1 Try again later"));
    assert_eq!(meta.recipients[1].last_reply.as_deref().map(|r| &r[..9]), Some("550 5.1.1"));
    let got = bench.sink.messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].rcpt_to, ["ok@dest.test"]);
}

#[tokio::test]
async fn deferred_recipients_are_retried_until_delivered() {
    let scenario = Scenario::accept_all()
        .rule(Rule::at(Stage::Rcpt).when(Match::LocalPartPrefix("flaky".into())).reply("451 4.2.1 Mailbox busy").times(1));
    let bench = Bench::new(SinkConfig { scenario, ..SinkConfig::default() }).await;
    bench.mx_to_sink("dest.test");
    let id = bench.enqueue("dest.test", &["flaky@dest.test"], "Subject: s\r\n\r\nb\r\n").await;
    let mut config = bench.config();
    config.retry.initial = Duration::from_secs(1);
    let mta = bench.start(config);

    assert!(bench.sink.wait_for_messages(1, WAIT).await);
    let events = bench.events(2).await;
    mta.stop().await;
    let kinds: Vec<&str> = events.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["deferred", "delivered"]);
    assert!(bench.meta(id).await.is_none());
}

#[tokio::test]
async fn expired_messages_bounce_with_4_4_7() {
    let bench = Bench::new(SinkConfig::default()).await;
    bench.mx_to_sink("dest.test");
    let mut msg = common::message("dest.test", &["defer-1@dest.test"], "Subject: s\r\n\r\nb\r\n");
    msg.meta.expires_at = msg.meta.created_at + 1_000;
    let id = msg.meta.id;
    bench.spool.enqueue(vec![msg]).await.unwrap();
    let mta = bench.start(bench.config());
    let e = bench.event_for(1, "defer-1@dest.test").await;
    mta.stop().await;

    assert_eq!(e["event"], "bounce");
    assert_eq!(e["status"], "4.4.7");
    assert_eq!(e["type"], "blocked");
    let reason = e["reason"].as_str().unwrap();
    assert!(reason.contains("retries expired after 1 attempts") && reason.ends_with("451 4.7.1 Try again later"), "{reason}");
    assert!(bench.meta(id).await.is_none());
}

#[tokio::test]
async fn several_messages_share_one_connection() {
    let bench = Bench::new(SinkConfig::default()).await;
    bench.mx_to_sink("dest.test");
    let msgs: Vec<_> = (0..3).map(|i| common::message("dest.test", &[&format!("r{i}@dest.test")], "Subject: s\r\n\r\nb\r\n")).collect();
    bench.spool.enqueue(msgs).await.unwrap();
    let mta = bench.start(bench.config());
    assert!(bench.sink.wait_for_messages(3, WAIT).await);
    bench.events(3).await;
    mta.stop().await;

    let got = bench.sink.messages();
    assert!(got.iter().all(|m| m.connection == got[0].connection), "{got:?}");
    assert_eq!(bench.sink.stats().connections, 1);
}

#[tokio::test]
async fn an_idle_connection_picks_up_new_mail_for_its_destination() {
    let bench = Bench::new(SinkConfig::default()).await;
    bench.mx_to_sink("dest.test");
    let mut config = bench.config();
    // One slot: while the idle connection holds it, only that connection can lease.
    config.max_concurrent_deliveries = 1;
    config.timeouts.idle = Duration::from_secs(60);
    bench.enqueue("dest.test", &["first@dest.test"], "Subject: 1\r\n\r\nb\r\n").await;
    let mta = bench.start(config);
    assert!(bench.sink.wait_for_messages(1, WAIT).await);
    bench.enqueue("dest.test", &["second@dest.test"], "Subject: 2\r\n\r\nb\r\n").await;
    mta.waker.notify_one();
    assert!(bench.sink.wait_for_messages(2, WAIT).await);
    mta.stop().await;

    let got = bench.sink.messages();
    assert_eq!(got[0].connection, got[1].connection);
    assert_eq!(bench.sink.stats().connections, 1);
}

#[tokio::test]
async fn starttls_is_used_when_offered() {
    let bench = Bench::new(SinkConfig { starttls: true, ..SinkConfig::default() }).await;
    bench.mx_to_sink("dest.test");
    bench.enqueue("dest.test", &["a@dest.test"], "Subject: s\r\n\r\nb\r\n").await;
    let mta = bench.start(bench.config());
    assert!(bench.sink.wait_for_messages(1, WAIT).await);
    let e = bench.event_for(1, "a@dest.test").await;
    mta.stop().await;
    assert!(bench.sink.messages()[0].tls);
    assert_eq!(e["tls"], 1);
}

#[tokio::test]
async fn required_tls_defers_when_the_server_has_none() {
    let bench = Bench::new(SinkConfig::default()).await;
    bench.mx_to_sink("dest.test");
    bench.enqueue("dest.test", &["a@dest.test"], "Subject: s\r\n\r\nb\r\n").await;
    let mut config = bench.config();
    config.tls.mode = sluice_mta::TlsMode::Required;
    let mta = bench.start(config);
    let e = bench.event_for(1, "a@dest.test").await;
    mta.stop().await;
    assert_eq!(e["event"], "deferred");
    assert!(e["response"].as_str().unwrap().starts_with("451 4.7.10"), "{e}");
    assert!(bench.sink.messages().is_empty());
}

#[tokio::test]
async fn a_stalling_server_times_out_into_a_deferral() {
    let scenario = Scenario::accept_all().rule(Rule::at(Stage::Rcpt).delay(Duration::from_secs(600)));
    let bench = Bench::new(SinkConfig { scenario, ..SinkConfig::default() }).await;
    bench.mx_to_sink("dest.test");
    bench.enqueue("dest.test", &["a@dest.test"], "Subject: s\r\n\r\nb\r\n").await;
    let mut config = bench.config();
    config.timeouts.rcpt = Duration::from_millis(300);
    let mta = bench.start(config);
    let e = bench.event_for(1, "a@dest.test").await;
    mta.stop().await;
    assert_eq!(e["event"], "deferred");
    let response = e["response"].as_str().unwrap();
    assert!(response.starts_with("451 4.4.2 timed out") && response.contains("RCPT TO"), "{response}");
}

/// The deferral a stalled peer leads to, for the event of `email`.
async fn stalled(bench: &Bench, config: sluice_mta::MtaConfig, email: &str) -> serde_json::Value {
    let mta = bench.start(config);
    let e = bench.event_for(1, email).await;
    mta.stop().await;
    assert_eq!(e["event"], "deferred", "{e}");
    e
}

#[tokio::test]
async fn a_server_that_never_greets_times_out_into_a_deferral() {
    let scenario = Scenario::accept_all().rule(Rule::at(Stage::Connect).delay(Duration::from_secs(600)));
    let bench = Bench::new(SinkConfig { scenario, ..SinkConfig::default() }).await;
    bench.mx_to_sink("dest.test");
    bench.enqueue("dest.test", &["a@dest.test"], "Subject: s\r\n\r\nb\r\n").await;
    let mut config = bench.config();
    config.timeouts.banner = Duration::from_millis(300);
    let e = stalled(&bench, config, "a@dest.test").await;
    let response = e["response"].as_str().unwrap();
    assert!(response.starts_with("451 4.4.2 timed out after 0.3s waiting for mx.dest.test during the greeting"), "{response}");
    assert!(e.get("ip").is_none(), "no session, so no sending address: {e}");
    assert!(bench.sink.messages().is_empty());
}

#[tokio::test]
async fn a_server_that_never_answers_starttls_times_out_into_a_deferral() {
    let scenario = Scenario::accept_all().rule(Rule::at(Stage::StartTls).delay(Duration::from_secs(600)));
    let bench = Bench::new(SinkConfig { scenario, starttls: true, ..SinkConfig::default() }).await;
    bench.mx_to_sink("dest.test");
    bench.enqueue("dest.test", &["a@dest.test"], "Subject: s\r\n\r\nb\r\n").await;
    let mut config = bench.config();
    config.timeouts.tls = Duration::from_millis(300);
    let e = stalled(&bench, config, "a@dest.test").await;
    let response = e["response"].as_str().unwrap();
    assert!(response.starts_with("451 4.4.2 timed out") && response.contains("during STARTTLS"), "{response}");
    assert!(bench.sink.messages().is_empty());
}

/// A peer that says 220 to STARTTLS and then sends nothing: the handshake times out. (No
/// mock can stall a handshake on cue, so this peer is a raw TCP listener.)
#[tokio::test]
async fn a_stalled_tls_handshake_times_out_into_a_deferral() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let bench = Bench::new(SinkConfig::default()).await;
    let listener = tokio::net::TcpListener::bind((common::loopback(4), bench.sink.addr().port())).await.unwrap();
    let peer = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tcp = BufReader::new(tcp);
        tcp.get_mut().write_all(b"220 stall.test ESMTP\r\n").await.unwrap();
        let mut line = String::new();
        while tcp.read_line(&mut line).await.unwrap() > 0 {
            let command = line.trim_end().to_ascii_uppercase();
            line.clear();
            if command.starts_with("EHLO") {
                tcp.get_mut().write_all(b"250-stall.test\r\n250 STARTTLS\r\n").await.unwrap();
            } else if command == "STARTTLS" {
                tcp.get_mut().write_all(b"220 2.0.0 Ready to start TLS\r\n").await.unwrap();
                // Then nothing: read (and ignore) the ClientHello until the client gives up.
                let mut sink = Vec::new();
                let _ = tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut sink).await;
                return true;
            }
        }
        false
    });
    bench.dns.add_mx("dest.test", 10, "mx.dest.test").unwrap();
    bench.dns.add_ip("mx.dest.test", common::loopback(4)).unwrap();
    bench.enqueue("dest.test", &["a@dest.test"], "Subject: s\r\n\r\nb\r\n").await;
    let mut config = bench.config();
    config.timeouts.tls = Duration::from_millis(300);
    // Opportunistic TLS would retry in plain text; required TLS shows the handshake timeout.
    config.tls.mode = sluice_mta::TlsMode::Required;
    let e = stalled(&bench, config, "a@dest.test").await;
    let response = e["response"].as_str().unwrap();
    assert!(response.starts_with("451 4.4.2 timed out") && response.contains("during the TLS handshake"), "{response}");
    assert!(tokio::time::timeout(WAIT, peer).await.unwrap().unwrap(), "the peer saw STARTTLS");
}

/// No reply after the final dot: the message may or may not have been taken, so it is
/// deferred (a retry can duplicate it, never lose it).
#[tokio::test]
async fn a_server_stalling_after_the_data_times_out_into_a_deferral() {
    let scenario = Scenario::accept_all().rule(Rule::at(Stage::EndOfData).delay(Duration::from_secs(600)));
    let bench = Bench::new(SinkConfig { scenario, ..SinkConfig::default() }).await;
    bench.mx_to_sink("dest.test");
    let id = bench.enqueue("dest.test", &["a@dest.test"], "Subject: s\r\n\r\nb\r\n").await;
    let mut config = bench.config();
    config.timeouts.end_of_data = Duration::from_millis(300);
    let e = stalled(&bench, config, "a@dest.test").await;
    let response = e["response"].as_str().unwrap();
    assert!(response.starts_with("451 4.4.2 timed out") && response.contains("during the end of DATA"), "{response}");
    assert_eq!(e["ip"], "127.0.0.1", "the session had started: {e}");
    let meta = bench.meta(id).await.expect("still queued for a retry");
    assert_eq!(meta.attempts, 1);
}

#[tokio::test]
async fn vendor_enhanced_codes_reach_the_classifier_intact() {
    let scenario = Scenario::accept_all().rule(
        Rule::at(Stage::Rcpt).reply("550-5.7.606 Access denied, banned sending IP [127.0.0.1]\n550 5.7.606 To request removal, see https://example.test"),
    );
    let bench = Bench::new(SinkConfig { scenario, ..SinkConfig::default() }).await;
    bench.mx_to_sink("dest.test");
    bench.enqueue("dest.test", &["a@dest.test"], "Subject: s\r\n\r\nb\r\n").await;
    let mta = bench.start(bench.config());
    let e = bench.event_for(1, "a@dest.test").await;
    mta.stop().await;

    let seen = bench.classifier.seen.lock().unwrap().clone();
    let rcpt = seen.iter().find(|s| s.stage == Some(sluice_rules::Stage::Rcpt)).expect("the RCPT reply was classified");
    assert_eq!(rcpt.reply.enhanced, Some(EnhancedCode::new(5, 7, 606)));
    assert_eq!(
        rcpt.reply.lines,
        ["550-5.7.606 Access denied, banned sending IP [127.0.0.1]", "550 5.7.606 To request removal, see https://example.test"]
    );
    assert_eq!(rcpt.mx_host.as_deref(), Some("mx.dest.test"));
    assert_eq!(rcpt.domain.as_deref(), Some("dest.test"));
    assert_eq!(e["status"], "5.7.606");
    assert_eq!(e["type"], "bounce");
}

#[tokio::test]
async fn rset_only_after_a_transaction_the_server_did_not_end() {
    // One connection, three messages in due order: delivered, MAIL refused, delivered.
    // After a final dot was answered the transaction is over (no RSET); after a refused
    // MAIL sluice cannot tell, so it sends RSET once, before the third.
    let scenario = Scenario::accept_all().rule(Rule::at(Stage::Mail).when(Match::Sender("blocked@origin.test".into())).reply("451 4.7.0 Sender temporarily blocked"));
    let bench = Bench::new(SinkConfig { scenario, ..SinkConfig::default() }).await;
    bench.mx_to_sink("dest.test");
    let now = sluice_spool::now_ms();
    let mut batch = Vec::new();
    for (i, (rcpt, sender)) in [("a@dest.test", "sender@origin.test"), ("b@dest.test", "blocked@origin.test"), ("c@dest.test", "sender@origin.test")].into_iter().enumerate() {
        let mut m = common::message("dest.test", &[rcpt], "Subject: s\r\n\r\nb\r\n");
        m.meta.mail_from = sender.into();
        m.meta.due_at = now - 3_000 + 1_000 * i as u64;
        batch.push(m);
    }
    bench.spool.enqueue(batch).await.unwrap();
    let mut config = bench.config();
    config.max_connections_per_path = 1;
    let mta = bench.start(config);
    let events = bench.events(3).await;
    mta.stop().await;

    let event = |email: &str| events.iter().find(|e| e["email"] == email).unwrap()["event"].clone();
    assert_eq!([event("a@dest.test"), event("b@dest.test"), event("c@dest.test")], ["delivered", "deferred", "delivered"]);
    let stats = bench.sink.stats();
    assert_eq!(stats.connections, 1, "all three over one connection");
    assert_eq!(stats.messages, 2);
    assert_eq!(stats.rsets, 1, "RSET only after the refused MAIL");
}

#[tokio::test]
async fn transaction_replies_apply_to_every_recipient() {
    let scenario = Scenario::accept_all()
        .rule(Rule::at(Stage::EndOfData).when(Match::Domain("spam.test".into())).reply("554 5.7.1 Message rejected as spam"))
        .rule(Rule::at(Stage::Mail).when(Match::Sender("blocked@origin.test".into())).reply("451 4.7.0 Sender temporarily blocked"));
    let bench = Bench::new(SinkConfig { scenario, ..SinkConfig::default() }).await;
    bench.mx_to_sink("spam.test");
    bench.mx_to_sink("dest.test");
    bench.enqueue("spam.test", &["a@spam.test", "b@spam.test"], "Subject: s\r\n\r\nb\r\n").await;
    let mut blocked = common::message("dest.test", &["c@dest.test", "d@dest.test"], "Subject: s\r\n\r\nb\r\n");
    blocked.meta.mail_from = "blocked@origin.test".into();
    bench.spool.enqueue(vec![blocked]).await.unwrap();
    let mta = bench.start(bench.config());
    let events = bench.events(4).await;
    mta.stop().await;

    for email in ["a@spam.test", "b@spam.test"] {
        let e = events.iter().find(|e| e["email"] == email).unwrap();
        assert_eq!((e["event"].as_str(), e["status"].as_str()), (Some("bounce"), Some("5.7.1")), "{e}");
    }
    for email in ["c@dest.test", "d@dest.test"] {
        let e = events.iter().find(|e| e["email"] == email).unwrap();
        assert_eq!(e["event"], "deferred");
        assert_eq!(e["response"], "451 4.7.0 Sender temporarily blocked");
    }
}

#[tokio::test]
async fn helo_is_used_when_ehlo_is_refused() {
    let scenario = Scenario::standard().first(Rule::at(Stage::Ehlo).reply("500 5.5.1 Unrecognized command").times(1));
    let bench = Bench::new(SinkConfig { scenario, ..SinkConfig::default() }).await;
    bench.mx_to_sink("dest.test");
    bench.enqueue("dest.test", &["ok@dest.test", "bounce1@dest.test"], "Subject: s\r\n\r\nb\r\n").await;
    let mta = bench.start(bench.config());
    let events = bench.events(2).await;
    mta.stop().await;
    let kinds: Vec<(&str, &str)> = events.iter().map(|e| (e["email"].as_str().unwrap(), e["event"].as_str().unwrap())).collect();
    assert!(kinds.contains(&("ok@dest.test", "delivered")) && kinds.contains(&("bounce1@dest.test", "bounce")), "{kinds:?}");
    assert_eq!(bench.sink.messages().len(), 1);
}

#[tokio::test]
async fn an_untrusted_certificate_falls_back_to_plain_text_or_defers_when_tls_is_required() {
    // The sink's certificate is self-signed, so verification against the system roots fails.
    let bench = Bench::new(SinkConfig { starttls: true, ..SinkConfig::default() }).await;
    bench.mx_to_sink("dest.test");
    bench.enqueue("dest.test", &["a@dest.test"], "Subject: s\r\n\r\nb\r\n").await;
    let mut config = bench.config();
    config.tls.verify_certificates = true;
    let mta = bench.start(config.clone());
    let e = bench.event_for(1, "a@dest.test").await;
    mta.stop().await;
    assert_eq!((e["event"].as_str(), e["tls"].as_u64()), (Some("delivered"), Some(0)), "{e}");
    assert!(!bench.sink.messages()[0].tls);
    assert_eq!(bench.sink.stats().connections, 2, "a TLS attempt, then plain text");

    bench.enqueue("dest.test", &["b@dest.test"], "Subject: s\r\n\r\nb\r\n").await;
    config.tls.mode = sluice_mta::TlsMode::Required;
    let mta = bench.start(config);
    let e = bench.event_for(2, "b@dest.test").await;
    mta.stop().await;
    assert_eq!(e["event"], "deferred");
    assert!(e["response"].as_str().unwrap().starts_with("421 4.7.5 TLS handshake with mx.dest.test failed"), "{e}");
    assert_eq!(bench.sink.messages().len(), 1);
}

#[tokio::test]
async fn blocks_and_bounces_are_typed_by_the_rules_and_only_address_bounces_are_suppressed() {
    // The default table decides, as in production: a block-list refusal is a block (the
    // sender's fault) and never suppresses; an unknown user is a bounce and does.
    let scenario = Scenario::standard().rule(
        Rule::at(Stage::Rcpt)
            .when(Match::LocalPartPrefix("listed".into()))
            .reply("554 5.7.1 Service unavailable; Client host [127.0.0.1] blocked using zen.spamhaus.org; https://www.spamhaus.org/query/ip/127.0.0.1"),
    );
    let bench = Bench::new(SinkConfig { scenario, ..SinkConfig::default() }).await;
    bench.mx_to_sink("dest.test");
    bench.enqueue("dest.test", &["ok@dest.test", "listed@dest.test", "bounce-z@dest.test"], "Subject: s\r\n\r\nb\r\n").await;
    let engine = Arc::new(sluice_rules::Engine::load(vec![sluice_rules::DEFAULT_TABLE.into()]).unwrap());
    let version = engine.version().to_string();
    let mta = sluice_mta::Mta::new(bench.config(), bench.spool.clone(), bench.events.clone(), engine).unwrap().with_suppressions(bench.local.clone());
    let mta = Bench::run(mta);
    let events = bench.events(3).await;
    mta.stop().await;

    let by = |email: &str| events.iter().find(|e| e["email"] == email).unwrap().clone();
    let delivered = by("ok@dest.test");
    assert_eq!(delivered["event"], "delivered");
    assert_eq!(delivered["sluice_rules_version"], version.as_str(), "delivered events name the table too");
    let blocked = by("listed@dest.test");
    assert_eq!((blocked["event"].as_str(), blocked["type"].as_str()), (Some("bounce"), Some("blocked")), "{blocked}");
    assert_eq!(blocked["bounce_classification"], "Reputation");
    assert_eq!(blocked["sluice_rule"], "blocklist.spamhaus");
    let bounced = by("bounce-z@dest.test");
    assert_eq!((bounced["type"].as_str(), bounced["bounce_classification"].as_str()), (Some("bounce"), Some("Invalid Address")), "{bounced}");

    let list = &bench.local;
    let suppressed = list.check("test", &["listed@dest.test".to_string(), "bounce-z@dest.test".to_string()]).await.unwrap();
    assert_eq!(suppressed, [false, true], "only the address-level bounce is suppressed");
}
