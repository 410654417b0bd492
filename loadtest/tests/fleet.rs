//! A fleet of mock ISPs: one address per provider on one port, MX records in the test DNS,
//! counts per provider, duplicates across providers, and DKIM verification of a sample
//! with keys looked up in DNS.

use std::time::Duration;

use base64::Engine as _;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::{Resolver, TokioResolver};
use mail_auth::common::crypto::Ed25519Key;
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::DkimSigner;
use mail_send::smtp::message::Message;
use mail_send::SmtpClient;
use sluice_load::dns::TestDns;
use sluice_load::gen::{self, GenConfig, Pace, SmtpTarget, Stop, Target, Weighted, Workload};
use sluice_load::sink::{DkimSampler, Fleet, FleetConfig, FleetOptions, Profile, ProviderReport, ReplyClasses, Stage};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(30);

fn resolver(dns: &TestDns) -> TokioResolver {
    let mut udp = ConnectionConfig::udp();
    udp.port = dns.addr().port();
    let ns = NameServerConfig::new(dns.addr().ip(), true, vec![udp]);
    let mut opts = ResolverOpts::default();
    opts.cache_size = 0;
    Resolver::builder_with_config(ResolverConfig::from_parts(None, vec![], vec![ns]), TokioRuntimeProvider::default())
        .with_options(opts)
        .build()
        .unwrap()
}

async fn accept_all_fleet(options: FleetOptions) -> Fleet {
    let mut config = FleetConfig::builtin("accept-all").unwrap();
    config.port = 0;
    Fleet::start(config, options).await.unwrap()
}

fn gen_to(addr: std::net::SocketAddr, domain: &str, run_id: &str, count: u64) -> GenConfig {
    GenConfig {
        target: Target::Smtp(SmtpTarget {
            addr,
            helo: "gen.test".into(),
            starttls: false,
            tls_name: "localhost".into(),
            auth: None,
            messages_per_connection: 100,
            timeout: T,
        }),
        pace: Pace::Closed,
        concurrency: 2,
        stop: Stop::Count(count),
        warmup: Duration::ZERO,
        workload: Workload {
            sizes: "1k".parse().unwrap(),
            attachments: 1,
            attachment_bytes: 2000,
            recipients: 2,
            domains: Weighted::new([(domain.to_string(), 1.0)]).unwrap(),
            sender: "load@gen.load.test".into(),
            run_id: run_id.into(),
        },
        ledger: None,
        progress: false,
    }
}

#[tokio::test]
async fn providers_share_a_port_and_resolve_through_the_test_dns() {
    let fleet = accept_all_fleet(FleetOptions::default()).await;
    let dns = TestDns::start().await.unwrap();
    fleet.config().add_records(&dns).unwrap();
    let r = resolver(&dns);
    for (provider, sink) in fleet.sinks() {
        assert_eq!(sink.addr().ip(), provider.address);
        assert_eq!(sink.addr().port(), fleet.port(), "one port for all, like sluice's mta.port");
        for domain in &provider.domains {
            let mx = r.mx_lookup(format!("{domain}.")).await.unwrap();
            let exchange = mx
                .answers()
                .iter()
                .find_map(|rec| match &rec.data {
                    RData::MX(m) => Some(m.exchange.to_ascii()),
                    _ => None,
                })
                .unwrap();
            assert_eq!(exchange.trim_end_matches('.'), provider.mx_host());
            let ips: Vec<_> = r.lookup_ip(exchange).await.unwrap().iter().collect();
            assert_eq!(ips, [provider.address]);
        }
    }
}

#[tokio::test]
async fn counts_are_per_provider_and_duplicates_are_fleet_wide() {
    let fleet = accept_all_fleet(FleetOptions::default()).await;
    let gmail = fleet.sink("gmail").unwrap().addr();
    let yahoo = fleet.sink("yahoo").unwrap().addr();
    let a = gen::run(gen_to(gmail, "gmail.load.test", "fleet1", 30), CancellationToken::new()).await.unwrap();
    let b = gen::run(gen_to(yahoo, "yahoo.load.test", "fleet2", 20), CancellationToken::new()).await.unwrap();
    assert_eq!((a.messages.acknowledged, b.messages.acknowledged), (30, 20));
    // The same ids again, to another provider: duplicates of the fleet.
    let c = gen::run(gen_to(yahoo, "yahoo.load.test", "fleet1", 5), CancellationToken::new()).await.unwrap();
    assert_eq!(c.messages.acknowledged, 5);
    assert!(fleet.tracker().wait_unique(50, T).await);
    let report = fleet.report();
    let by_name = |n: &str| report.providers.iter().find(|p| p.name == n).unwrap().clone();
    assert_eq!((by_name("gmail").messages, by_name("gmail").recipients), (30, 60));
    assert_eq!((by_name("yahoo").messages, by_name("yahoo").duplicates), (25, 5));
    assert_eq!(by_name("microsoft").messages, 0);
    assert_eq!(by_name("gmail").rcpt.accepted, 60);
    assert_eq!(report.messages, 55);
    assert_eq!((report.tracker.unique, report.tracker.duplicates), (50, 5));
    assert!(report.text().contains("gmail"));
}

/// A message signed with the Ed25519 key `der` (PKCS#8) under `selector._domainkey.gen.load.test`.
fn signed(der: &[u8], selector: &str, n: u32) -> Vec<u8> {
    let msg = format!(
        "From: <load@gen.load.test>\r\nTo: <user{n}@gmail.load.test>\r\nSubject: signed {n}\r\nMessage-ID: <dkim.{n}@gen.load.test>\r\n\r\nbody {n}\r\n"
    );
    let signer = DkimSigner::from_key(Ed25519Key::from_pkcs8_der(der).unwrap())
        .domain("gen.load.test")
        .selector(selector)
        .headers(["From", "To", "Subject", "Message-ID"]);
    let signature = signer.sign(msg.as_bytes()).unwrap();
    let mut out = signature.to_header().into_bytes();
    out.extend_from_slice(msg.as_bytes());
    out
}

#[tokio::test]
async fn a_dkim_sample_is_verified_with_keys_from_dns() {
    let der = Ed25519Key::generate_pkcs8().unwrap();
    let key = Ed25519Key::from_pkcs8_der(&der).unwrap();
    let dns = TestDns::start().await.unwrap();
    let public = base64::engine::general_purpose::STANDARD.encode(key.public_key());
    dns.add_txt("good._domainkey.gen.load.test", &format!("v=DKIM1; k=ed25519; p={public}")).unwrap();
    let other = Ed25519Key::from_pkcs8_der(&Ed25519Key::generate_pkcs8().unwrap()).unwrap();
    let wrong = base64::engine::general_purpose::STANDARD.encode(other.public_key());
    dns.add_txt("wrong._domainkey.gen.load.test", &format!("v=DKIM1; k=ed25519; p={wrong}")).unwrap();

    let mut config = FleetConfig::builtin("accept-all").unwrap();
    config.port = 0;
    config.dkim_sample = 1.0;
    let fleet = Fleet::start(config, FleetOptions { dns: Some(dns.addr()), ..FleetOptions::default() }).await.unwrap();
    let mut client = SmtpClient::connect(fleet.sink("gmail").unwrap().addr(), T).await.unwrap();
    client.read().await.unwrap();
    client.ehlo("gen.test").await.unwrap();
    for n in 0..3 {
        client.send(Message::new("load@gen.load.test", ["x@gmail.load.test"], signed(&der, "good", n))).await.unwrap();
    }
    client.send(Message::new("load@gen.load.test", ["x@gmail.load.test"], signed(&der, "wrong", 3))).await.unwrap();
    client.send(Message::new("load@gen.load.test", ["x@gmail.load.test"], &b"Subject: plain\r\nMessage-ID: <p@x>\r\n\r\nx\r\n"[..])).await.unwrap();
    client.quit().await.unwrap();
    // Verification runs in the background: wait until all five are checked.
    let deadline = tokio::time::Instant::now() + T;
    let counts = loop {
        let c = fleet.report().tracker.dkim;
        if c.checked == 5 || tokio::time::Instant::now() > deadline {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!((counts.checked, counts.pass, counts.fail, counts.unsigned, counts.temperror), (5, 3, 1, 1, 0), "{counts:?}");
}

#[tokio::test]
async fn dkim_verification_can_be_switched_on_for_part_of_a_run() {
    let der = Ed25519Key::generate_pkcs8().unwrap();
    let key = Ed25519Key::from_pkcs8_der(&der).unwrap();
    let dns = TestDns::start().await.unwrap();
    let public = base64::engine::general_purpose::STANDARD.encode(key.public_key());
    dns.add_txt("good._domainkey.gen.load.test", &format!("v=DKIM1; k=ed25519; p={public}")).unwrap();
    // accept-all has no DKIM sample: a benchmark turns it on only for the rows that sign.
    let fleet = accept_all_fleet(FleetOptions::default()).await;
    let mut client = SmtpClient::connect(fleet.sink("gmail").unwrap().addr(), T).await.unwrap();
    client.read().await.unwrap();
    client.ehlo("gen.test").await.unwrap();
    let message = |n: u32| Message::new("load@gen.load.test", ["x@gmail.load.test"], signed(&der, "good", n));
    client.send(message(0)).await.unwrap();
    assert!(fleet.tracker().set_dkim(Some(DkimSampler::new(dns.addr(), 1.0).unwrap())).is_none());
    client.send(message(1)).await.unwrap();
    client.send(message(2)).await.unwrap();
    let sampler = fleet.tracker().set_dkim(None).expect("the sampler that was on");
    client.send(message(3)).await.unwrap();
    let counts = sampler.settled(T).await;
    assert_eq!((counts.checked, counts.pass, counts.fail), (2, 2, 0), "only the two sent while it was on: {counts:?}");
    assert_eq!(fleet.report().tracker.dkim.checked, 0, "off again");
    assert!(fleet.tracker().wait_unique(4, T).await);
}

/// Expected (deferred, rejected) shares at `stage` of a profile: its percentages by reply class.
fn shares(profile: &Profile, stage: Stage) -> (f64, f64) {
    let mut out = (0.0, 0.0);
    for r in profile.rules.iter().filter(|r| r.stage == stage) {
        let (Some(p), Some(reply)) = (r.percent, &r.reply) else { continue };
        match reply.code {
            400..=499 => out.0 += p / 100.0,
            500..=599 => out.1 += p / 100.0,
            _ => {}
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_realistic_fleet_defers_and_bounces_its_shares() {
    let mut config = FleetConfig::builtin("realistic").unwrap();
    config.port = 0;
    config.seed = Some(20261125);
    config.dkim_sample = 0.0;
    let fleet = Fleet::start(config.clone(), FleetOptions::default()).await.unwrap();
    // One connection per provider, the four at once: each provider answers its messages in
    // the same order on every run, so with the seed its counts are the same every time; the
    // tolerances below (four binomial standard deviations) hold for this seed by design.
    let n = 400u64;
    let mut runs = Vec::new();
    for (p, sink) in fleet.sinks() {
        let mut g = gen_to(sink.addr(), &p.domains[0], &format!("realistic-{}", p.name), n);
        g.concurrency = 1;
        g.workload.recipients = 1;
        g.workload.attachments = 0;
        runs.push((p.name.clone(), tokio::spawn(gen::run(g, CancellationToken::new()))));
    }
    let mut reports = Vec::new();
    for (name, run) in runs {
        reports.push((name, run.await.unwrap().unwrap()));
    }
    let fleet_report = fleet.report();
    for ((name, report), (provider, profile)) in reports.iter().zip(config.providers.iter().zip(config.profiles().unwrap())) {
        assert_eq!(name, &provider.name);
        let sink: &ProviderReport = fleet_report.providers.iter().find(|p| &p.name == name).unwrap();
        assert_eq!(report.messages.acknowledged + report.messages.failed, n, "{name}");
        assert!(fleet.sink(name).unwrap().wait_for_messages(report.messages.acknowledged, T).await);
        assert_eq!(fleet.sink(name).unwrap().stats().messages, report.messages.acknowledged, "{name}");
        // What the generator saw is what the provider answered.
        let seen = |prefix: &str| report.errors.iter().filter(|(c, _)| c.starts_with(prefix)).map(|(_, n)| n).sum::<u64>();
        let stats = fleet.sink(name).unwrap().stats();
        for (stage, label) in [(Stage::Mail, "mail"), (Stage::Rcpt, "rcpt"), (Stage::EndOfData, "end_of_data")] {
            assert_eq!(seen(&format!("{label} 4")), stats.replies_at(stage, 400..500), "{name} {label} deferrals");
            assert_eq!(seen(&format!("{label} 5")), stats.replies_at(stage, 500..600), "{name} {label} bounces");
        }
        assert_eq!(sink.limited, 0, "{name}: one connection stays under every limit");
        for (stage, classes) in [(Stage::Mail, &sink.mail), (Stage::Rcpt, &sink.rcpt), (Stage::EndOfData, &sink.end_of_data)] {
            let ReplyClasses { accepted, deferred, rejected } = classes.clone();
            let decided = (accepted + deferred + rejected) as f64;
            let (want_defer, want_bounce) = shares(&profile, stage);
            if want_defer + want_bounce == 0.0 {
                assert_eq!(deferred + rejected, 0, "{name} has no rules at {stage:?}");
                continue;
            }
            assert!(decided >= 0.9 * n as f64, "{name} {stage:?}: {decided} decisions");
            for (what, got, want) in [("deferred", deferred, want_defer), ("bounced", rejected, want_bounce)] {
                let share = got as f64 / decided;
                let tolerance = 4.0 * (want * (1.0 - want) / decided).sqrt();
                assert!((share - want).abs() <= tolerance, "{name} {stage:?} {what}: {share:.4} against {want:.4} ± {tolerance:.4}");
            }
        }
    }
    // Every provider bounced or deferred something: the shipped rules are in force.
    assert!(reports.iter().all(|(_, r)| r.messages.failed > 0), "{reports:?}");

    // A per-IP limit: `other` allows ten connections from one address; the eleventh gets the
    // profile's 421 and is closed, and so does every generator connection while ten are held.
    let (other, other_profile) = config.providers.iter().zip(config.profiles().unwrap()).find(|(p, _)| p.name == "other").unwrap();
    let max = other_profile.limits.max_connections.expect("other.toml limits connections") as usize;
    let addr = fleet.sink(&other.name).unwrap().addr();
    let mut held = Vec::new();
    for _ in 0..max {
        let mut c = BufReader::new(TcpStream::connect(addr).await.unwrap());
        let mut banner = String::new();
        c.read_line(&mut banner).await.unwrap();
        assert!(banner.starts_with("220 "), "{banner}");
        held.push(c);
    }
    let mut extra = BufReader::new(TcpStream::connect(addr).await.unwrap());
    let mut refused = String::new();
    extra.read_line(&mut refused).await.unwrap();
    assert_eq!(refused, other_profile.limits.connection_reply.to_wire());
    assert_eq!(extra.read_line(&mut String::new()).await.unwrap(), 0, "421 closes the connection");
    let mut g = gen_to(addr, &other.domains[0], "realistic-limited", 3);
    g.concurrency = 1;
    let report = gen::run(g, CancellationToken::new()).await.unwrap();
    assert_eq!((report.messages.acknowledged, report.messages.failed), (0, 3));
    assert_eq!(report.errors.get("connect 421 4.7.0"), Some(&3), "{:?}", report.errors);
    let stats = fleet.sink(&other.name).unwrap().stats();
    assert_eq!((stats.limited, stats.replies_at(Stage::Connect, 421..422)), (4, 4));
    drop(held);
}
