//! TestDns answers a real hickory resolver: MX, null MX, A/AAAA, TXT (over TCP when large),
//! NXDOMAIN, NODATA, SERVFAIL, and records changed while it runs.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::{Resolver, TokioResolver};
use sluice_load::dns::TestDns;

fn resolver(dns: &TestDns) -> TokioResolver {
    let mut udp = ConnectionConfig::udp();
    udp.port = dns.addr().port();
    let mut tcp = ConnectionConfig::tcp();
    tcp.port = dns.addr().port();
    let ns = NameServerConfig::new(dns.addr().ip(), true, vec![udp, tcp]);
    let mut opts = ResolverOpts::default();
    opts.attempts = 1;
    opts.cache_size = 0;
    Resolver::builder_with_config(ResolverConfig::from_parts(None, vec![], vec![ns]), TokioRuntimeProvider::default())
        .with_options(opts)
        .build()
        .unwrap()
}

async fn mx(r: &TokioResolver, domain: &str) -> Vec<(u16, String)> {
    let lookup = r.mx_lookup(domain).await.unwrap();
    let mut out: Vec<(u16, String)> = lookup
        .answers()
        .iter()
        .filter_map(|rec| match &rec.data {
            RData::MX(m) => Some((m.preference, m.exchange.to_ascii())),
            _ => None,
        })
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn answers_mx_a_aaaa_and_null_mx() {
    let dns = TestDns::start().await.unwrap();
    dns.add_mx("Dest.test", 20, "mx2.dest.test").unwrap();
    dns.add_mx("dest.test", 10, "mx1.dest.test").unwrap();
    dns.add_a("mx1.dest.test", Ipv4Addr::new(127, 0, 0, 1)).unwrap();
    dns.add_aaaa("mx1.dest.test", Ipv6Addr::LOCALHOST).unwrap();
    dns.add_null_mx("nomail.test").unwrap();
    let r = resolver(&dns);

    assert_eq!(mx(&r, "dest.test.").await, [(10, "mx1.dest.test.".to_string()), (20, "mx2.dest.test.".to_string())]);
    let mut ips: Vec<IpAddr> = r.lookup_ip("MX1.dest.test.").await.unwrap().iter().collect();
    ips.sort();
    assert_eq!(ips, [IpAddr::from(Ipv4Addr::new(127, 0, 0, 1)), IpAddr::from(Ipv6Addr::LOCALHOST)]);
    assert_eq!(mx(&r, "nomail.test.").await, [(0, ".".to_string())]);
    assert!(dns.query_count() >= 3);
}

#[tokio::test]
async fn unknown_names_are_nxdomain_and_missing_types_nodata() {
    let dns = TestDns::start().await.unwrap();
    dns.add_a("only-a.test", Ipv4Addr::new(127, 0, 0, 1)).unwrap();
    let r = resolver(&dns);

    let err = r.mx_lookup("missing.test.").await.unwrap_err();
    assert!(err.is_nx_domain(), "{err}");
    let err = r.mx_lookup("only-a.test.").await.unwrap_err();
    assert!(err.is_no_records_found() && !err.is_nx_domain(), "{err}");
}

#[tokio::test]
async fn servfail_and_changes_while_running() {
    let dns = TestDns::start().await.unwrap();
    dns.add_mx("flaky.test", 10, "mx.flaky.test").unwrap();
    let r = resolver(&dns);
    assert_eq!(mx(&r, "flaky.test.").await.len(), 1);

    dns.set_servfail("flaky.test", true).unwrap();
    let err = r.mx_lookup("flaky.test.").await.unwrap_err();
    assert!(!err.is_no_records_found(), "SERVFAIL is not a negative answer: {err}");

    dns.set_servfail("flaky.test", false).unwrap();
    dns.remove("flaky.test").unwrap();
    assert!(r.mx_lookup("flaky.test.").await.unwrap_err().is_nx_domain());
}

#[tokio::test]
async fn large_txt_records_are_served_over_tcp() {
    let dns = TestDns::start().await.unwrap();
    let key = "v=DKIM1; k=rsa; p=".to_string() + &"A".repeat(3000);
    dns.add_txt("s1._domainkey.dest.test", &key).unwrap();
    let r = resolver(&dns);
    let lookup = r.txt_lookup("s1._domainkey.dest.test.").await.unwrap();
    let text: String = lookup
        .answers()
        .iter()
        .filter_map(|rec| match &rec.data {
            RData::TXT(t) => Some(t.txt_data.iter().map(|s| String::from_utf8_lossy(s).into_owned()).collect::<String>()),
            _ => None,
        })
        .collect();
    assert_eq!(text, key);
}

#[test]
fn invalid_names_are_refused() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dns = rt.block_on(TestDns::start()).unwrap();
    assert!(dns.add_a("bad..name", Ipv4Addr::LOCALHOST).is_err());
    assert!(dns.add_mx("ok.test", 10, &"x".repeat(300)).is_err());
}
