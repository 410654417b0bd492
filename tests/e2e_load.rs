//! The load tools end to end: sluice-load's generator injects into a real sluice over SMTP
//! (STARTTLS, AUTH, pipelining) and over the SendGrid v3 API (several personalizations per
//! request); sluice resolves MX through the test DNS and delivers to the mock ISPs of a
//! fleet; the sent and received ledgers match. Small counts, no timing assertions.

mod support;

use std::time::Duration;

use sluice_load::dns::TestDns;
use sluice_load::gen::{self, GenConfig, HttpTarget, Pace, SmtpTarget, Stop, Target, Weighted, Workload};
use sluice_load::ledger;
use sluice_load::sink::{Fleet, FleetConfig, FleetOptions};
use support::{Sluice, API_KEY};
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(60);

fn workload(fleet: &Fleet, run_id: &str) -> Workload {
    Workload {
        sizes: "2k:3,20k:1".parse().unwrap(),
        attachments: 1,
        attachment_bytes: 3000,
        recipients: 1,
        domains: Weighted::new(fleet.config().domain_weights()).unwrap(),
        sender: "load@gen.load.test".into(),
        run_id: run_id.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generator_through_sluice_to_the_mock_isps() {
    let dir = tempfile::tempdir().unwrap();
    let dns = TestDns::start().await.unwrap();
    let mut fleet_config = FleetConfig::builtin("accept-all").unwrap();
    fleet_config.port = 0;
    let received = dir.path().join("received.ledger");
    let fleet = Fleet::start(fleet_config, FleetOptions { ledger: Some(received.clone()), ..FleetOptions::default() }).await.unwrap();
    fleet.config().add_records(&dns).unwrap();
    let config = format!(
        r#"data_dir = "{dir}"

[admin]
listen = "127.0.0.1:0"

[[api_keys]]
name = "load"
sha256 = "{hash}"

[http]
listen = "127.0.0.1:0"

[smtp]
listen = "127.0.0.1:0"
hostname = "sluice.test"

[mta]
ehlo_hostname = "sluice.test"
port = {port}
idle_poll = "100ms"

[mta.resolver]
nameservers = ["{dns}"]
timeout = "2s"
"#,
        dir = dir.path().join("data").display(),
        hash = sluice_edge::auth::hash_key(API_KEY),
        port = fleet.port(),
        dns = dns.addr(),
    );
    let sluice = Sluice::start_with(&dir.path().join("sluice"), &config);

    let sent_smtp = dir.path().join("sent-smtp.ledger");
    let smtp = GenConfig {
        target: Target::Smtp(SmtpTarget {
            addr: sluice.smtp,
            helo: "gen.load.test".into(),
            starttls: true,
            tls_name: "sluice.test".into(),
            auth: Some(("apikey".into(), API_KEY.into())),
            messages_per_connection: 7,
            timeout: T,
        }),
        pace: Pace::Closed,
        concurrency: 2,
        stop: Stop::Count(30),
        warmup: Duration::ZERO,
        workload: workload(&fleet, "e2e-smtp"),
        ledger: Some(sent_smtp.clone()),
        progress: false,
    };
    let report = gen::run(smtp, CancellationToken::new()).await.unwrap();
    assert_eq!((report.messages.acknowledged, report.messages.failed), (30, 0), "{:?}", report.errors);

    let sent_http = dir.path().join("sent-http.ledger");
    let http = GenConfig {
        target: Target::Http(HttpTarget { addr: sluice.http, api_key: API_KEY.into(), personalizations: 5, timeout: T }),
        pace: Pace::Open { rate: 200.0 },
        concurrency: 2,
        stop: Stop::Count(42),
        warmup: Duration::ZERO,
        workload: workload(&fleet, "e2e-http"),
        ledger: Some(sent_http.clone()),
        progress: false,
    };
    let report = gen::run(http, CancellationToken::new()).await.unwrap();
    assert_eq!((report.messages.acknowledged, report.messages.failed), (42, 0), "{:?}", report.errors);
    assert_eq!(report.requests, 9, "eight full requests of 5 and one of 2");

    assert!(fleet.tracker().wait_unique(72, T).await, "{}", fleet.report().text());
    let report = fleet.report();
    assert_eq!(report.messages, 72);
    assert_eq!(report.tracker.duplicates, 0);
    assert_eq!(report.tracker.end_to_end.count, 72, "the send stamp survived sluice");
    fleet.tracker().flush().unwrap();
    let mut sent = ledger::read(&sent_smtp).unwrap();
    sent.extend(ledger::read(&sent_http).unwrap());
    let comparison = ledger::compare(&sent, &ledger::read(&received).unwrap());
    assert!(comparison.is_clean(), "{}", comparison.summary(5));
    assert_eq!(comparison.delivered, 72);
    assert!(sluice.stop(), "sluice exits cleanly");
}
