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

/// `sluice-load bench`'s own arguments, parsed as on its command line.
#[derive(clap::Parser)]
struct BenchCli {
    #[command(flatten)]
    args: sluice_load::bench::BenchArgs,
}

fn bench_args(dir: &std::path::Path, extra: &[&str]) -> sluice_load::bench::BenchArgs {
    use clap::Parser;
    let path = |name: &str| dir.join(name).display().to_string();
    let mut argv = vec!["bench".to_string(), "--sluice".into(), support::binary().into(), "--quick".into(), "--no-postfix".into()];
    for (flag, value) in [("--messages", "40".to_string()), ("--warmup", "5".into()), ("--concurrency", "4".into())] {
        argv.extend([flag.to_string(), value]);
    }
    for (flag, name) in [("--work-dir", "run"), ("--json", "bench.json"), ("--markdown", "bench.md")] {
        argv.extend([flag.to_string(), path(name)]);
    }
    argv.extend(extra.iter().map(|s| s.to_string()));
    BenchCli::parse_from(argv).args
}

fn bench_phase<'a>(report: &'a serde_json::Value, spool: &str, variant: &str) -> &'a serde_json::Value {
    report["phases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["system"] == "sluice" && p["spool"] == spool && p["variant"] == variant)
        .unwrap_or_else(|| panic!("no {spool} {variant:?} row in {report:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bench_harness_measures_sluice_with_and_without_dkim() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bench.md"), "# Benchmarks\n").unwrap();
    let args = bench_args(dir.path(), &["--only", "dkim", "--dkim-sample", "1"]);
    sluice_load::bench::run(args, CancellationToken::new()).await.unwrap();
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join("bench.json")).unwrap()).unwrap();
    assert_eq!(report["phases"].as_array().unwrap().len(), 3, "the plain row and the two DKIM rows: {report:#}");
    let plain = bench_phase(&report, "local", "");
    assert!(plain["dkim"].is_null(), "no verification without signing");
    for variant in ["", "DKIM RSA-2048", "DKIM RSA-2048 + Ed25519"] {
        let p = bench_phase(&report, "local", variant);
        assert_eq!((p["messages"].as_u64(), p["delivered"].as_u64()), (Some(40), Some(40)), "{variant}: {p:#}");
        assert!(p["cpu_seconds"].as_f64().unwrap() > 0.0 && p["peak_memory_mib"].as_f64().unwrap() > 0.0, "{p:#}");
        if variant.is_empty() {
            continue;
        }
        // Every measured message was sampled: verified by the mock ISPs against the keys the
        // harness published in the test DNS, or skipped while eight verifications ran.
        let d = &p["dkim"];
        let n = |k: &str| d[k].as_u64().unwrap();
        assert!(n("pass") > 0, "{variant}: {d}");
        assert_eq!((n("fail"), n("unsigned"), n("temperror")), (0, 0, 0), "{variant}: {d}");
        assert_eq!(n("checked"), n("pass"));
        assert_eq!(n("checked") + n("skipped"), 40, "{variant}: {d}");
        assert!(p["notes"].as_array().unwrap().is_empty(), "{p:#}");
    }
    let openssl = report["openssl_rsa2048_sign_per_s"].as_array().unwrap();
    if std::process::Command::new("openssl").arg("version").output().is_ok() {
        assert_eq!(openssl.len(), 2, "openssl speed before and after the DKIM rows");
        assert!(openssl.iter().all(|x| x.as_f64().unwrap() > 0.0));
    }
    let md = std::fs::read_to_string(dir.path().join("bench.md")).unwrap();
    assert!(md.starts_with("# Benchmarks\n"), "the rest of the file is kept");
    assert!(md.contains("| sluice | local | SMTP | "), "{md}");
    assert!(md.contains("| sluice (DKIM RSA-2048) | local | SMTP | "), "{md}");
    assert!(md.contains("| sluice (DKIM RSA-2048 + Ed25519) | local | SMTP | "), "{md}");
    assert!(md.contains("| with DKIM RSA-2048: ≥ 60% of the signing ceiling"), "{md}");
    assert!(md.contains("| (for comparison) cost of DKIM RSA-2048 + Ed25519 |"), "{md}");
    assert!(md.contains("verified the DKIM signatures of"), "{md}");
}

/// Two edges and two MTAs on one pool of the test command's Ceph cluster.
#[cfg(feature = "rados")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bench_harness_runs_two_edges_and_two_mtas_on_one_pool() {
    let conf = std::env::var("SLUICE_CEPH_CONF").expect("SLUICE_CEPH_CONF is not set: run scripts/test.sh, which starts a Ceph cluster");
    let pool = std::env::var("SLUICE_CEPH_POOL").unwrap_or_else(|_| "sluice".into());
    let dir = tempfile::tempdir().unwrap();
    let args = bench_args(dir.path(), &["--only", "rados", "--ceph-conf", &conf, "--ceph-pool", &pool]);
    sluice_load::bench::run(args, CancellationToken::new()).await.unwrap();
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join("bench.json")).unwrap()).unwrap();
    assert!(report["notes"].as_array().unwrap().is_empty(), "{report:#}");
    let one = bench_phase(&report, "rados", "");
    let nodes = bench_phase(&report, "rados", "2 edges + 2 MTAs");
    assert_eq!((one["processes"].as_u64(), nodes["processes"].as_u64()), (Some(1), Some(4)));
    for p in [one, nodes] {
        assert_eq!((p["messages"].as_u64(), p["delivered"].as_u64()), (Some(40), Some(40)), "{p:#}");
        assert!(p["cpu_seconds"].as_f64().unwrap() > 0.0 && p["peak_memory_mib"].as_f64().unwrap() > 0.0, "{p:#}");
        assert!(p["errors"].as_object().unwrap().is_empty(), "{p:#}");
    }
    let md = std::fs::read_to_string(dir.path().join("bench.md")).unwrap();
    assert!(md.contains("| sluice (2 edges + 2 MTAs) | rados | SMTP | "), "{md}");
    if report["rados_bench_writes_per_s"].is_number() {
        assert!(md.contains("| Ceph spool, 2 edges + 2 MTAs: delivered ≥ 50% of `rados bench`"), "{md}");
    }
}
