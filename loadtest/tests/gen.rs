//! The generator against the sink: counting, ledgers, warm-up, open loop, STARTTLS, the
//! scenario percentages and the per-IP limits seen from the client side.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_load::gen::{self, GenConfig, HttpTarget, Pace, SmtpTarget, Stop, Target, Weighted, Workload};
use sluice_load::ledger::{self, Ledger};
use sluice_load::sink::{Latency, Limits, Match, Rule, Scenario, Sink, SinkConfig, Stage, Tracker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(30);

fn workload(run_id: &str) -> Workload {
    Workload {
        sizes: "2k:1,20k:1".parse().unwrap(),
        attachments: 0,
        attachment_bytes: 0,
        recipients: 1,
        domains: Weighted::new([("a.load.test".to_string(), 1.0), ("b.load.test".to_string(), 1.0)]).unwrap(),
        sender: "load@gen.load.test".into(),
        run_id: run_id.into(),
    }
}

fn smtp(sink: &Sink, concurrency: usize, stop: Stop) -> GenConfig {
    smtp_to(sink.addr(), concurrency, stop)
}

fn smtp_to(addr: SocketAddr, concurrency: usize, stop: Stop) -> GenConfig {
    GenConfig {
        target: Target::Smtp(SmtpTarget {
            addr,
            helo: "gen.test".into(),
            starttls: false,
            tls_name: "localhost".into(),
            auth: None,
            messages_per_connection: 10,
            timeout: T,
        }),
        pace: Pace::Closed,
        concurrency,
        stop,
        warmup: Duration::ZERO,
        workload: workload("run1"),
        ledger: None,
        progress: false,
    }
}

async fn accept_all(tracker: Option<Arc<Tracker>>) -> Sink {
    Sink::start(SinkConfig { scenario: Scenario::accept_all(), record_messages: false, tracker, ..SinkConfig::default() })
        .await
        .unwrap()
}

#[tokio::test]
async fn every_acknowledged_message_is_counted_and_in_both_ledgers() {
    let dir = tempfile::tempdir().unwrap();
    let received = dir.path().join("received");
    let sent = dir.path().join("sent");
    let sink = accept_all(Some(Arc::new(Tracker::new().with_ledger(Ledger::create(&received).unwrap())))).await;
    let mut config = smtp(&sink, 4, Stop::Count(250));
    config.ledger = Some(sent.clone());
    let report = gen::run(config, CancellationToken::new()).await.unwrap();
    assert_eq!(report.messages.acknowledged, 250);
    assert_eq!(report.messages.failed, 0);
    assert_eq!(report.requests, 250);
    assert_eq!(report.latency.count, 250);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(sink.wait_for_messages(250, T).await);
    let stats = sink.stats();
    assert_eq!(stats.messages, 250);
    // 10 messages per connection: at least 25 connections, one more per worker at most.
    assert!((25..=29).contains(&stats.connections), "{}", stats.connections);
    let t = sink.tracker().report();
    assert_eq!((t.unique, t.duplicates, t.without_message_id), (250, 0, 0));
    assert_eq!(t.end_to_end.count, 250, "every message carried the send stamp");
    sink.tracker().flush().unwrap();
    let c = ledger::compare_files(&sent, &received).unwrap();
    assert!(c.is_clean(), "{}", c.summary(5));
    assert_eq!(c.delivered, 250);
}

#[tokio::test]
async fn a_second_run_with_the_same_ids_is_all_duplicates() {
    let sink = accept_all(None).await;
    for _ in 0..2 {
        let report = gen::run(smtp(&sink, 2, Stop::Count(40)), CancellationToken::new()).await.unwrap();
        assert_eq!(report.messages.acknowledged, 40);
    }
    let t = sink.tracker().report();
    assert_eq!((t.unique, t.duplicates), (40, 40));
    assert_eq!(sink.stats().duplicates, 40);
}

#[tokio::test]
async fn warm_up_messages_are_sent_but_not_measured() {
    let sink = accept_all(None).await;
    let mut config = smtp(&sink, 2, Stop::Count(30));
    config.warmup = Duration::from_millis(300);
    let report = gen::run(config, CancellationToken::new()).await.unwrap();
    assert_eq!(report.messages.acknowledged, 30, "the count is of measured messages");
    assert_eq!(report.latency.count, 30);
    let total = 30 + report.warmup.acknowledged;
    assert!(sink.wait_for_messages(total, T).await);
    assert_eq!(sink.stats().messages, total);
}

#[tokio::test]
async fn open_loop_and_duration_runs_complete() {
    let sink = accept_all(None).await;
    let mut config = smtp(&sink, 4, Stop::Count(60));
    config.pace = Pace::Open { rate: 400.0 };
    let report = gen::run(config, CancellationToken::new()).await.unwrap();
    assert_eq!(report.run.mode, "open");
    assert_eq!(report.run.target_rate, Some(400.0));
    assert_eq!(report.messages.acknowledged, 60);

    let report = gen::run(smtp(&sink, 2, Stop::Duration(Duration::from_millis(300))), CancellationToken::new()).await.unwrap();
    assert!(report.messages.acknowledged > 0);
    assert_eq!(report.messages.failed, 0);
}

#[tokio::test]
async fn a_cancelled_run_stops_and_reports_what_it_did() {
    let sink = accept_all(None).await;
    let cancel = CancellationToken::new();
    cancel.cancel();
    let report = gen::run(smtp(&sink, 2, Stop::Count(1_000_000)), cancel).await.unwrap();
    assert_eq!(report.messages.attempted, 0);
}

#[tokio::test]
async fn starttls_sessions_deliver() {
    let sink = Sink::start(SinkConfig { starttls: true, scenario: Scenario::accept_all(), ..SinkConfig::default() }).await.unwrap();
    let mut config = smtp(&sink, 2, Stop::Count(12));
    if let Target::Smtp(t) = &mut config.target {
        t.starttls = true;
    }
    let report = gen::run(config, CancellationToken::new()).await.unwrap();
    assert_eq!(report.messages.acknowledged, 12, "{:?}", report.errors);
    assert!(sink.messages().iter().all(|m| m.tls));
    // A server without STARTTLS fails the connection with a clear class.
    let plain = accept_all(None).await;
    let mut config = smtp(&plain, 1, Stop::Count(2));
    if let Target::Smtp(t) = &mut config.target {
        t.starttls = true;
    }
    let report = gen::run(config, CancellationToken::new()).await.unwrap();
    assert_eq!(report.messages.failed, 2);
    assert_eq!(report.errors["starttls: not offered"], 2);
}

#[tokio::test]
async fn scenario_percentages_hold_over_many_messages() {
    // Seeded, and one connection so the RCPT and end-of-data draws interleave the same way:
    // the counts are the same on every run.
    let scenario = Scenario::accept_all()
        .rule(Rule::at(Stage::Rcpt).percent(10.0).reply("550-5.1.1 The email account that you tried to reach does not exist.\n550 5.1.1 gsmtp"))
        .rule(Rule::at(Stage::Rcpt).percent(20.0).reply("451 4.7.1 Try again later"))
        .rule(Rule::at(Stage::EndOfData).percent(5.0).reply("554 5.7.9 Message not accepted for policy reasons"))
        .seeded(1);
    let sink = Sink::start(SinkConfig { scenario, record_messages: false, ..SinkConfig::default() }).await.unwrap();
    let n = 2000u64;
    let report = gen::run(smtp(&sink, 1, Stop::Count(n)), CancellationToken::new()).await.unwrap();
    let count = |class: &str| report.errors.get(class).copied().unwrap_or(0) as f64;
    // Binomial standard deviations at n = 2,000: 13.4 for 10%, 17.9 for 20%; at the ~1,400
    // messages that reach DATA, 8.2 for 5%. The bounds are five of them.
    assert!((count("rcpt 550 5.1.1") - 200.0).abs() < 67.0, "{:?}", report.errors);
    assert!((count("rcpt 451 4.7.1") - 400.0).abs() < 90.0, "{:?}", report.errors);
    let reached_data = n as f64 - count("rcpt 550 5.1.1") - count("rcpt 451 4.7.1");
    assert!((count("end_of_data 554 5.7.9") - reached_data * 0.05).abs() < 41.0, "{:?}", report.errors);
    // What the client saw is what the sink counted.
    let stats = sink.stats();
    assert_eq!(stats.replies_at(Stage::Rcpt, 500..600) as f64, count("rcpt 550 5.1.1"));
    assert_eq!(stats.replies_at(Stage::Rcpt, 400..500) as f64, count("rcpt 451 4.7.1"));
    assert_eq!(stats.messages, report.messages.acknowledged);
    assert_eq!(report.messages.acknowledged + report.messages.failed, n);
}

#[tokio::test]
async fn message_rate_limits_refuse_with_421_and_close() {
    let limits = Limits { message_rate: Some("5/h".parse().unwrap()), ..Limits::default() };
    let sink = Sink::start(SinkConfig { limits, scenario: Scenario::accept_all(), ..SinkConfig::default() }).await.unwrap();
    let report = gen::run(smtp(&sink, 1, Stop::Count(9)), CancellationToken::new()).await.unwrap();
    assert_eq!(report.messages.acknowledged, 5);
    assert_eq!(report.messages.failed, 4);
    assert_eq!(report.errors["mail 421 4.7.0"], 4);
    let stats = sink.stats();
    assert_eq!(stats.limited, 4);
    assert_eq!(stats.replies_at(Stage::Mail, 421..422), 4);
    // Each 421 closed the connection: the first carried five messages and the first
    // refusal, each later refusal came on a new one.
    assert_eq!(stats.connections, 4);
}

#[tokio::test]
async fn per_connection_limits_refuse_with_421_and_the_client_reconnects() {
    let limits = Limits { max_messages_per_connection: Some(3), ..Limits::default() };
    let sink = Sink::start(SinkConfig { limits, scenario: Scenario::accept_all(), ..SinkConfig::default() }).await.unwrap();
    let report = gen::run(smtp(&sink, 1, Stop::Count(8)), CancellationToken::new()).await.unwrap();
    // 1-3 accepted, 4 refused (connection closed), 5-7 accepted, 8 refused.
    assert_eq!((report.messages.acknowledged, report.messages.failed), (6, 2));
    assert!(report.errors["mail 421 4.7.0"] == 2, "{:?}", report.errors);
    assert_eq!(sink.stats().connections, 2);
}

#[tokio::test]
async fn open_loop_latency_counts_from_the_intended_send_time() {
    // Coordinated omission: a server that answers every message after 100 ms, two
    // connections, so at most 20 messages a second get through; the generator is asked for
    // three times that. Measured from the intended send time, the latency grows with the
    // backlog; measured from when a connection got round to sending (which is what a closed
    // loop sees) it would stay near 100 ms.
    let delay = Duration::from_millis(100);
    let latency = Latency { end_of_data: Some(delay), ..Latency::default() };
    let sink = Sink::start(SinkConfig { latency, scenario: Scenario::accept_all(), record_messages: false, ..SinkConfig::default() })
        .await
        .unwrap();
    let (connections, n) = (2usize, 90u64);
    let capacity = connections as f64 / delay.as_secs_f64();
    let rate = 3.0 * capacity;
    let mut config = smtp(&sink, connections, Stop::Count(n));
    config.pace = Pace::Open { rate };
    let report = gen::run(config, CancellationToken::new()).await.unwrap();
    assert_eq!((report.messages.acknowledged, report.messages.failed), (n, 0), "{:?}", report.errors);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    assert!(report.latency.p99_ms >= 5.0 * ms(delay), "p99 {} ms at 3× capacity", report.latency.p99_ms);
    // A lower bound whatever the machine's speed: each connection finishes at most one
    // message per `delay`, so the last of the n is answered no earlier than n/connections ×
    // delay after the start, while it was due at (n − 1)/rate.
    let backlog = ms(delay) * (n as f64 / connections as f64) - 1000.0 * (n - 1) as f64 / rate;
    assert!(backlog > 2500.0, "the setup builds a backlog of {backlog} ms");
    assert!(report.latency.max_ms >= 0.99 * backlog, "max {} ms, below the backlog's {backlog} ms", report.latency.max_ms);
    // The X-Load-Sent stamp carries the intended time too: the sink sees the same backlog.
    let e2e = sink.tracker().report().end_to_end;
    assert_eq!(e2e.count, n);
    assert!(e2e.p99_ms >= 5.0 * ms(delay), "end-to-end p99 {} ms", e2e.p99_ms);
}

/// A TCP relay that records every chunk the client writes: what went out in one write.
async fn recording_relay(to: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let chunks = Arc::new(Mutex::new(Vec::new()));
    let c = chunks.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let chunks = c.clone();
            tokio::spawn(async move {
                let _ = client.set_nodelay(true);
                let server = TcpStream::connect(to).await.unwrap();
                let _ = server.set_nodelay(true);
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                tokio::spawn(async move { tokio::io::copy(&mut sr, &mut cw).await });
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match cr.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    chunks.lock().unwrap().push(buf[..n].to_vec());
                    if sw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = sw.shutdown().await;
            });
        }
    });
    (addr, chunks)
}

fn commands_in(chunk: &[u8]) -> usize {
    let text = String::from_utf8_lossy(chunk);
    text.matches("MAIL FROM:").count() + text.matches("RCPT TO:").count()
}

#[tokio::test]
async fn without_pipelining_the_generator_waits_for_each_reply() {
    let scenario = Scenario::accept_all()
        .rule(Rule::at(Stage::Rcpt).when(Match::Domain("bounce.load.test".into())).reply("550 5.1.1 No such user"))
        .rule(Rule::at(Stage::Rcpt).when(Match::Domain("defer.load.test".into())).reply("451 4.7.1 Try again later"));
    let sink = Sink::start(SinkConfig { pipelining: false, scenario: scenario.clone(), record_messages: false, ..SinkConfig::default() })
        .await
        .unwrap();
    let (relay, chunks) = recording_relay(sink.addr()).await;
    let n = 90;
    let mut config = smtp_to(relay, 2, Stop::Count(n));
    config.workload.domains = Weighted::new(["ok.load.test", "bounce.load.test", "defer.load.test"].map(|d| (d.to_string(), 1.0))).unwrap();
    let report = gen::run(config, CancellationToken::new()).await.unwrap();
    let class = |c: &str| report.errors.get(c).copied().unwrap_or(0);
    let (bounced, deferred) = (class("rcpt 550 5.1.1"), class("rcpt 451 4.7.1"));
    assert_eq!(report.errors.len(), 2, "only the two scenario replies: {:?}", report.errors);
    assert!(bounced > 0 && deferred > 0 && report.messages.acknowledged > 0, "{report:?}");
    assert_eq!(report.messages.failed, bounced + deferred);
    assert_eq!(report.messages.acknowledged + report.messages.failed, n);
    assert!(sink.wait_for_messages(report.messages.acknowledged, T).await);
    let stats = sink.stats();
    assert_eq!(stats.messages, report.messages.acknowledged);
    assert_eq!(stats.replies_at(Stage::Rcpt, 550..551), bounced);
    assert_eq!(stats.replies_at(Stage::Rcpt, 451..452), deferred);
    assert_eq!(stats.commands_at(Stage::Mail), n);
    // One command per write, and DATA only after an accepted recipient (a pipelining client
    // sends DATA blindly and has it refused).
    assert_eq!(stats.commands_at(Stage::Data), report.messages.acknowledged);
    let written = chunks.lock().unwrap().clone();
    assert!(written.iter().all(|c| commands_in(c) <= 1), "a write carried several commands");

    // The relay does see pipelining when the server offers it: the check above can fail.
    let pipelining = Sink::start(SinkConfig { scenario, record_messages: false, ..SinkConfig::default() }).await.unwrap();
    let (relay, chunks) = recording_relay(pipelining.addr()).await;
    let mut config = smtp_to(relay, 1, Stop::Count(5));
    config.workload.run_id = "pipelined".into();
    assert_eq!(gen::run(config, CancellationToken::new()).await.unwrap().messages.acknowledged, 5);
    assert!(chunks.lock().unwrap().iter().any(|c| commands_in(c) >= 2), "MAIL and RCPT in one write");
}

#[tokio::test]
async fn connections_spread_over_several_targets() {
    let (a, b) = (accept_all(None).await, accept_all(None).await);
    let config = smtp(&a, 4, Stop::Count(40));
    let other = Target::Smtp(SmtpTarget { addr: b.addr(), ..match &config.target {
        Target::Smtp(t) => t.clone(),
        Target::Http(_) => unreachable!("an SMTP config"),
    } });
    let report = gen::run_spread(config.clone(), vec![other.clone()], CancellationToken::new()).await.unwrap();
    assert_eq!((report.messages.acknowledged, report.messages.failed), (40, 0));
    assert!(a.wait_for_messages(1, T).await && b.wait_for_messages(1, T).await);
    let (sa, sb) = (a.stats(), b.stats());
    assert_eq!(sa.messages + sb.messages, 40);
    // Connections 0 and 2 go to the first target, 1 and 3 to the second.
    assert!(sa.connections >= 2 && sb.connections >= 2, "{} and {} connections", sa.connections, sb.connections);

    let http = Target::Http(HttpTarget { addr: b.addr(), api_key: "k".into(), personalizations: 1, timeout: T });
    let err = gen::run_spread(config.clone(), vec![http], CancellationToken::new()).await.unwrap_err().to_string();
    assert!(err.contains("targets[1]") && err.contains("transport"), "{err}");
    let mut one = config;
    one.concurrency = 1;
    let err = gen::run_spread(one, vec![other], CancellationToken::new()).await.unwrap_err().to_string();
    assert!(err.contains("concurrency") && err.contains("2 targets"), "{err}");
}
