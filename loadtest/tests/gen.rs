//! The generator against the sink: counting, ledgers, warm-up, open loop, STARTTLS, the
//! scenario percentages and the per-IP limits seen from the client side.

use std::sync::Arc;
use std::time::Duration;

use sluice_load::gen::{self, GenConfig, Pace, SmtpTarget, Stop, Target, Weighted, Workload};
use sluice_load::ledger::{self, Ledger};
use sluice_load::sink::{Limits, Rule, Scenario, Sink, SinkConfig, Stage, Tracker};
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
    GenConfig {
        target: Target::Smtp(SmtpTarget {
            addr: sink.addr(),
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
