//! Shutdown: the message being sent is finished, everything else leased goes back to the
//! queue untouched.

mod common;

use std::time::Duration;

use common::{Bench, WAIT};
use sluice_load::sink::{Rule, Scenario, SinkConfig, Stage};

#[tokio::test]
async fn shutdown_finishes_the_current_message_and_releases_the_rest() {
    // Every MAIL waits a moment, so shutdown surely arrives mid-transaction.
    let scenario = Scenario::accept_all().rule(Rule::at(Stage::Mail).delay(Duration::from_millis(500)));
    let bench = Bench::new(SinkConfig { scenario, ..SinkConfig::default() }).await;
    bench.mx_to_sink("a.test");
    bench.mx_to_sink("b.test");
    let mut msgs: Vec<_> = (0..3).map(|i| common::message("a.test", &[&format!("r{i}@a.test")], "Subject: a\r\n\r\nb\r\n")).collect();
    msgs.extend((0..2).map(|i| common::message("b.test", &[&format!("r{i}@b.test")], "Subject: b\r\n\r\nb\r\n")));
    let ids: Vec<_> = msgs.iter().map(|m| m.meta.id).collect();
    bench.spool.enqueue(msgs).await.unwrap();

    // One slot: one destination's job runs, the other's waits for the slot.
    let mut config = bench.config();
    config.max_concurrent_deliveries = 1;
    let mta = bench.start(config);
    assert!(bench.sink.wait_for(WAIT, |s| s.commands_at(Stage::Mail) == 1).await);
    mta.stop().await;

    assert_eq!(bench.sink.messages().len(), 1, "the message in flight was finished");
    let events = bench.events(1).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["event"], "delivered");

    let before_check = sluice_spool::now_ms();
    let mut released = 0;
    for id in ids {
        if let Some(meta) = bench.meta(id).await {
            released += 1;
            assert_eq!(meta.attempts, 0, "a release is not an attempt");
            assert!(meta.due_at <= before_check, "released messages are due at once");
        }
    }
    assert_eq!(released, 4);
    let counts = bench.spool.counts().await.unwrap();
    assert_eq!((counts.leased, counts.queued), (0, 4));
}

#[tokio::test]
async fn rejects_invalid_configuration() {
    let bench = Bench::new(SinkConfig::default()).await;
    let mut config = bench.config();
    config.max_concurrent_deliveries = 0;
    let err = sluice_mta::Mta::new(config, bench.spool.clone(), bench.events.clone(), bench.classifier.clone()).err().unwrap();
    assert_eq!(err.to_string(), "invalid configuration: mta.max_concurrent_deliveries: must be at least 1");
}
