//! Where mail goes: MX preference and fallback, implicit MX, null MX, NXDOMAIN, DNS
//! failures, routes and smart hosts.

mod common;

use std::net::SocketAddr;

use common::{loopback, Bench, WAIT};
use sluice_load::dns::RecordType;
use sluice_load::sink::{Rule, Scenario, Sink, SinkConfig, Stage};

/// A second sink on another loopback address but the same port as the bench's sink, so
/// both can be MX hosts of one configuration (the port is global).
async fn second_sink(bench: &Bench, last_octet: u8) -> Sink {
    let addr = SocketAddr::new(loopback(last_octet), bench.sink.addr().port());
    Sink::bind(addr, SinkConfig::default()).await.expect("127.0.0.x is loopback on Linux")
}

#[tokio::test]
async fn the_most_preferred_mx_gets_the_mail() {
    let bench = Bench::new(SinkConfig::default()).await;
    let other = second_sink(&bench, 2).await;
    // first.test prefers the bench sink, second.test prefers the other one.
    bench.dns.add_mx("first.test", 20, "mx-b.test").unwrap();
    bench.dns.add_mx("first.test", 10, "mx-a.test").unwrap();
    bench.dns.add_mx("second.test", 10, "mx-b.test").unwrap();
    bench.dns.add_mx("second.test", 20, "mx-a.test").unwrap();
    bench.dns.add_ip("mx-a.test", loopback(1)).unwrap();
    bench.dns.add_ip("mx-b.test", loopback(2)).unwrap();
    bench.enqueue("first.test", &["a@first.test"], "Subject: 1\r\n\r\nb\r\n").await;
    bench.enqueue("second.test", &["b@second.test"], "Subject: 2\r\n\r\nb\r\n").await;
    let mta = bench.start(bench.config());
    bench.events(2).await;
    mta.stop().await;

    assert_eq!(bench.sink.messages().iter().map(|m| m.rcpt_to[0].clone()).collect::<Vec<_>>(), ["a@first.test"]);
    assert_eq!(other.messages().iter().map(|m| m.rcpt_to[0].clone()).collect::<Vec<_>>(), ["b@second.test"]);
}

#[tokio::test]
async fn falls_back_to_the_next_mx_when_the_first_refuses_connections() {
    let bench = Bench::new(SinkConfig::default()).await;
    bench.dns.add_mx("dest.test", 10, "mx-dead.dest.test").unwrap();
    bench.dns.add_mx("dest.test", 20, "mx-live.dest.test").unwrap();
    bench.dns.add_ip("mx-dead.dest.test", loopback(3)).unwrap(); // nothing listens there
    bench.dns.add_ip("mx-live.dest.test", loopback(1)).unwrap();
    bench.enqueue("dest.test", &["a@dest.test"], "Subject: s\r\n\r\nb\r\n").await;
    let mta = bench.start(bench.config());
    let e = bench.event_for(1, "a@dest.test").await;
    mta.stop().await;
    assert_eq!(e["event"], "delivered");
    assert_eq!(e["mx"], "mx-live.dest.test");
}

#[tokio::test]
async fn falls_back_to_the_next_mx_after_a_421_greeting() {
    let scenario = Scenario::standard().first(Rule::at(Stage::Connect).reply("421 4.7.0 Too busy, try later").times(1));
    let bench = Bench::new(SinkConfig { scenario, ..SinkConfig::default() }).await;
    bench.dns.add_mx("dest.test", 10, "mx1.dest.test").unwrap();
    bench.dns.add_mx("dest.test", 20, "mx2.dest.test").unwrap();
    bench.dns.add_ip("mx1.dest.test", loopback(1)).unwrap();
    bench.dns.add_ip("mx2.dest.test", loopback(1)).unwrap();
    bench.enqueue("dest.test", &["a@dest.test"], "Subject: s\r\n\r\nb\r\n").await;
    let mta = bench.start(bench.config());
    let e = bench.event_for(1, "a@dest.test").await;
    mta.stop().await;
    assert_eq!(e["event"], "delivered");
    assert_eq!(e["mx"], "mx2.dest.test");
    assert_eq!(bench.sink.stats().connections, 2);
}

/// RFC 5321 §5.1: hosts of equal preference are tried in random order (spreading the load),
/// and always before any host of a higher preference value.
#[tokio::test]
async fn equal_preferences_are_shuffled_and_tried_before_lower_ones() {
    const DOMAINS: usize = 40;
    let bench = Bench::new(SinkConfig::default()).await;
    let b = second_sink(&bench, 2).await;
    let backup = second_sink(&bench, 3).await;
    bench.dns.add_ip("mx-a.test", loopback(1)).unwrap();
    bench.dns.add_ip("mx-b.test", loopback(2)).unwrap();
    bench.dns.add_ip("mx-backup.test", loopback(3)).unwrap();
    // Each domain is resolved (and shuffled) on its own. The list order in DNS is the same
    // for all of them, the least preferred first.
    for i in 0..DOMAINS {
        let domain = format!("d{i}.test");
        bench.dns.add_mx(&domain, 20, "mx-backup.test").unwrap();
        bench.dns.add_mx(&domain, 10, "mx-a.test").unwrap();
        bench.dns.add_mx(&domain, 10, "mx-b.test").unwrap();
        bench.enqueue(&domain, &[&format!("r@{domain}")], "Subject: s\r\n\r\nb\r\n").await;
    }
    let mta = bench.start(bench.config());
    let events = bench.events(DOMAINS).await;
    mta.stop().await;

    assert!(events.iter().all(|e| e["event"] == "delivered"), "{events:?}");
    let (to_a, to_b) = (bench.sink.messages().len(), b.messages().len());
    assert_eq!(to_a + to_b, DOMAINS);
    // With a fair shuffle, all 40 going to one host has a chance of 2 in 2^40.
    assert!(to_a > 0 && to_b > 0, "equal preferences not shuffled: {to_a} to mx-a, {to_b} to mx-b");
    assert!(backup.messages().is_empty(), "the preference-20 host got mail while both preference-10 hosts were up");
    assert_eq!(backup.stats().connections, 0);
}

/// No MX and only an AAAA record: the domain itself is the mail host, reached over IPv6.
#[tokio::test]
async fn implicit_mx_reaches_an_ipv6_only_host() {
    let bench = Bench::new(SinkConfig::default()).await;
    let v6 = SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), bench.sink.addr().port());
    let sink6 = Sink::bind(v6, SinkConfig::default()).await.expect("::1 is configured on loopback");
    bench.dns.add_aaaa("v6only.test", std::net::Ipv6Addr::LOCALHOST).unwrap();
    bench.enqueue("v6only.test", &["a@v6only.test"], "Subject: s\r\n\r\nb\r\n").await;
    let mta = bench.start(bench.config());
    let e = bench.event_for(1, "a@v6only.test").await;
    mta.stop().await;
    assert_eq!(e["event"], "delivered", "{e}");
    assert_eq!(e["mx"], "v6only.test");
    assert_eq!(e["ip"], "::1", "sent from the IPv6 loopback");
    assert_eq!(sink6.messages()[0].rcpt_to, ["a@v6only.test"]);
    assert!(bench.sink.messages().is_empty());
    assert_eq!(bench.dns.queries_for("v6only.test", RecordType::MX), 1);
    assert_eq!(bench.dns.queries_for("v6only.test", RecordType::AAAA), 1);
}

/// MX answers are cached for their TTL: a second delivery to the domain within it costs no
/// lookup, and once the TTL has run out the next delivery asks again.
#[tokio::test]
async fn mx_answers_are_cached_for_their_ttl() {
    let bench = Bench::new(SinkConfig::default()).await;
    bench.dns.set_ttl(3600);
    bench.mx_to_sink("cached.test");
    let mut config = bench.config();
    config.idle_poll = std::time::Duration::from_millis(20);
    let mta = bench.start(config);
    let deliver = |n: u64| {
        let bench = &bench;
        let waker = mta.waker.clone();
        async move {
            bench.enqueue("cached.test", &[&format!("r{n}@cached.test")], "Subject: s\r\n\r\nb\r\n").await;
            waker.notify_one();
            assert!(bench.sink.wait_for_messages(n, WAIT).await, "message {n} delivered");
        }
    };
    deliver(1).await;
    assert_eq!(bench.dns.queries_for("cached.test", RecordType::MX), 1);
    let queries = bench.dns.query_count();
    deliver(2).await;
    assert_eq!(bench.dns.queries_for("cached.test", RecordType::MX), 1, "the cached MX answer was used");
    assert_eq!(bench.dns.query_count(), queries, "no lookup at all within the TTL (MX and A cached)");
    mta.stop().await;

    // A one-second TTL: after it has run out, the MX is asked for again.
    bench.dns.set_ttl(1);
    bench.mx_to_sink("short.test");
    let mta = bench.start(bench.config());
    bench.enqueue("short.test", &["a@short.test"], "Subject: s\r\n\r\nb\r\n").await;
    assert!(bench.sink.wait_for_messages(3, WAIT).await);
    assert_eq!(bench.dns.queries_for("short.test", RecordType::MX), 1);
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    bench.enqueue("short.test", &["b@short.test"], "Subject: s\r\n\r\nb\r\n").await;
    mta.waker.notify_one();
    assert!(bench.sink.wait_for_messages(4, WAIT).await);
    mta.stop().await;
    assert_eq!(bench.dns.queries_for("short.test", RecordType::MX), 2, "asked again once the TTL ran out");
}

#[tokio::test]
async fn a_domain_without_mx_is_its_own_mail_host() {
    let bench = Bench::new(SinkConfig::default()).await;
    bench.dns.add_ip("plain.test", loopback(1)).unwrap();
    bench.enqueue("plain.test", &["a@plain.test"], "Subject: s\r\n\r\nb\r\n").await;
    let mta = bench.start(bench.config());
    let e = bench.event_for(1, "a@plain.test").await;
    mta.stop().await;
    assert_eq!(e["event"], "delivered");
    assert_eq!(e["mx"], "plain.test");
}

#[tokio::test]
async fn null_mx_and_nxdomain_bounce_without_connecting() {
    let bench = Bench::new(SinkConfig::default()).await;
    bench.dns.add_null_mx("nomail.test").unwrap();
    bench.enqueue("nomail.test", &["a@nomail.test"], "Subject: s\r\n\r\nb\r\n").await;
    bench.enqueue("missing.test", &["b@missing.test"], "Subject: s\r\n\r\nb\r\n").await;
    let mta = bench.start(bench.config());
    let events = bench.events(2).await;
    mta.stop().await;

    let null = events.iter().find(|e| e["email"] == "a@nomail.test").unwrap();
    assert_eq!((null["event"].as_str(), null["status"].as_str()), (Some("bounce"), Some("5.1.10")), "{null}");
    assert!(null["reason"].as_str().unwrap().starts_with("556 5.1.10"));
    let nx = events.iter().find(|e| e["email"] == "b@missing.test").unwrap();
    assert_eq!((nx["event"].as_str(), nx["status"].as_str()), (Some("bounce"), Some("5.1.2")), "{nx}");
    assert_eq!(nx["bounce_classification"], "Invalid Address");
    assert_eq!(bench.sink.stats().connections, 0);
}

#[tokio::test]
async fn an_unreachable_dns_server_defers() {
    let bench = Bench::new(SinkConfig::default()).await;
    bench.enqueue("dest.test", &["a@dest.test"], "Subject: s\r\n\r\nb\r\n").await;
    let mut config = bench.config();
    config.resolver.nameservers = vec![common::dead_udp_port().await];
    config.resolver.timeout = std::time::Duration::from_millis(300);
    let mta = bench.start(config);
    let e = bench.event_for(1, "a@dest.test").await;
    mta.stop().await;
    assert_eq!(e["event"], "deferred");
    assert!(e["response"].as_str().unwrap().starts_with("451 4.4.3 DNS lookup of MX for dest.test failed"), "{e}");
    assert!(e.get("ip").is_none() && e.get("tls").is_none(), "no session, no ip or tls: {e}");
}

#[tokio::test]
async fn a_servfail_defers() {
    let bench = Bench::new(SinkConfig::default()).await;
    bench.mx_to_sink("dest.test");
    bench.dns.set_servfail("dest.test", true).unwrap();
    bench.enqueue("dest.test", &["a@dest.test"], "Subject: s\r\n\r\nb\r\n").await;
    let mta = bench.start(bench.config());
    let e = bench.event_for(1, "a@dest.test").await;
    mta.stop().await;
    assert_eq!(e["event"], "deferred");
    assert!(e["response"].as_str().unwrap().starts_with("451 4.4.3"), "{e}");
}

#[tokio::test]
async fn routes_and_smart_hosts_bypass_mx() {
    let bench = Bench::new(SinkConfig::default()).await;
    let sink_addr = bench.sink.addr().to_string();
    // Neither domain exists in DNS; the configured next hops are used instead.
    bench.enqueue("routed.test", &["a@routed.test"], "Subject: s\r\n\r\nb\r\n").await;
    let mut config = bench.config();
    config.port = 1; // proves the route's own port is used
    config.routes.insert("routed.test".into(), vec![sink_addr.clone()]);
    let mta = bench.start(config);
    assert!(bench.sink.wait_for_messages(1, WAIT).await);
    mta.stop().await;

    bench.enqueue("anywhere.test", &["b@anywhere.test"], "Subject: s\r\n\r\nb\r\n").await;
    let mut config = bench.config();
    config.smart_host = vec![sink_addr];
    let mta = bench.start(config);
    assert!(bench.sink.wait_for_messages(2, WAIT).await);
    mta.stop().await;

    let rcpts: Vec<String> = bench.sink.messages().iter().map(|m| m.rcpt_to[0].clone()).collect();
    assert_eq!(rcpts, ["a@routed.test", "b@anywhere.test"]);
    assert_eq!(bench.dns.query_count(), 0, "no DNS for configured hops with IP addresses");
}
