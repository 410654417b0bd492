//! Traffic shaping against mock ISPs that enforce per-client-IP limits with 421 replies:
//! configured limits hold at the sink, a rate-limited provider settles at its limit while a
//! healthy one runs at full speed, rule-triggered and operator suspensions stop and resume
//! delivery without touching the backlog, and nothing waits in a ready queue for ever.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::Value;
use sluice_events::EventLog;
use sluice_load::dns::TestDns;
use sluice_load::sink::{Limits, ReceivedMessage, ReplySpec, Rule, Scenario, Sink, SinkConfig, Stage};
use sluice_mta::{Mta, MtaConfig, MtaControl};
use sluice_rules::{default_sources, Engine, Source};
use sluice_spool::{
    Lease, LeaseRequest, Leased, LocalSpool, LocalSpoolOptions, Message, MessageId, MessageMeta, Spool, SpoolCounts, SpoolError,
};
use tokio_util::sync::CancellationToken;

use common::message;

/// Providers and rules of the test ISPs, in front of the shipped table.
const TEST_RULES: &str = r#"
[[provider]]
id = "slowisp"
name = "An ISP that takes 50 messages a second and 5 connections per client IP"
mx_suffixes = ["slowisp.test"]

[[provider]]
id = "fastisp"
name = "An ISP without limits"
mx_suffixes = ["fastisp.test"]

[[provider]]
id = "limited"
name = "An ISP whose limits the shaping data knows"
mx_suffixes = ["limited.test"]

[[provider]]
id = "blocky"
name = "An ISP that blocks senders for a while"
mx_suffixes = ["blocky.test"]

[[rule]]
id = "slowisp.rate"
description = "the test ISP's message-rate deferral (Gmail's 4.7.28 text)"
provider = "slowisp"
code = 421
text = "unusual rate of unsolicited mail"
classification = "Frequency or Volume Too High"
reason = "rate_limited"
disposition = "retry"
shaping = { action = "throttle", messages_per_minute = 2700, connections = 4, duration = "30m", threshold = { count = 3, window = "1m" } }
examples = [{ reply = "421 4.7.28 Gmail has detected an unusual rate of unsolicited mail originating from your IP address.", mx = "mx.slowisp.test" }]

[[rule]]
id = "slowisp.connections"
description = "the test ISP refuses a connection over its per-IP limit"
provider = "slowisp"
code = 421
text = "too many connections"
classification = "Frequency or Volume Too High"
reason = "too_many_connections"
disposition = "retry"
shaping = { action = "throttle", connections = 4, duration = "30m", threshold = { count = 3, window = "1m" } }
examples = [{ reply = "421 4.7.0 Too many connections from your IP, try again later", mx = "mx.slowisp.test", stage = "connect" }]

[[rule]]
id = "blocky.blocked"
description = "the test ISP blocks the sending IP for a while (Yahoo TS03-like)"
provider = "blocky"
code = 421
text = "\\[BLK01\\]"
classification = "Reputation"
reason = "ip_blocked"
disposition = "retry"
shaping = { action = "suspend", duration = "8s", threshold = { count = 3, window = "1m" } }
examples = [{ reply = "421 4.7.0 [BLK01] Messages from 127.0.0.1 temporarily deferred due to user complaints", mx = "mx.blocky.test" }]
"#;

fn engine() -> Arc<Engine> {
    let mut sources = vec![Source::new("test-rules.toml", TEST_RULES)];
    sources.extend(default_sources());
    Arc::new(Engine::from_sources(&sources).expect("the test rules compile"))
}

/// A spool that counts, per message, how often it was leased and put back: a backlog that
/// is "re-checked in a busy loop" shows up here.
struct CountingSpool {
    inner: Arc<dyn Spool>,
    leased: Mutex<HashMap<MessageId, u32>>,
    rescheduled: Mutex<HashMap<MessageId, u32>>,
    lease_calls: AtomicU64,
}

impl CountingSpool {
    fn new(inner: Arc<dyn Spool>) -> Arc<CountingSpool> {
        Arc::new(CountingSpool { inner, leased: Mutex::default(), rescheduled: Mutex::default(), lease_calls: AtomicU64::new(0) })
    }
    fn leases_of(&self, ids: &[MessageId]) -> u32 {
        let l = self.leased.lock().unwrap();
        ids.iter().map(|id| l.get(id).copied().unwrap_or(0)).sum()
    }
    fn reschedules_of(&self, ids: &[MessageId]) -> u32 {
        let r = self.rescheduled.lock().unwrap();
        ids.iter().map(|id| r.get(id).copied().unwrap_or(0)).sum()
    }
}

#[async_trait]
impl Spool for CountingSpool {
    async fn enqueue(&self, batch: Vec<Message>) -> Result<(), SpoolError> {
        self.inner.enqueue(batch).await
    }
    async fn lease(&self, req: LeaseRequest) -> Result<Vec<Leased>, SpoolError> {
        self.lease_calls.fetch_add(1, Ordering::Relaxed);
        let got = self.inner.lease(req).await?;
        let mut l = self.leased.lock().unwrap();
        for m in &got {
            *l.entry(m.meta.id).or_default() += 1;
        }
        Ok(got)
    }
    async fn reschedule(&self, lease: &Lease, meta: MessageMeta) -> Result<(), SpoolError> {
        *self.rescheduled.lock().unwrap().entry(lease.id).or_default() += 1;
        self.inner.reschedule(lease, meta).await
    }
    async fn complete(&self, lease: &Lease) -> Result<(), SpoolError> {
        self.inner.complete(lease).await
    }
    async fn get(&self, id: MessageId) -> Result<Option<MessageMeta>, SpoolError> {
        self.inner.get(id).await
    }
    async fn counts(&self) -> Result<SpoolCounts, SpoolError> {
        self.inner.counts().await
    }
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
}

/// Mock ISPs on their own loopback addresses (all on one port, as MX hosts are), a test DNS
/// server with their MX records, a spool and an event log.
struct Isps {
    dns: TestDns,
    port: u16,
    sinks: BTreeMap<&'static str, Sink>,
    spool: Arc<CountingSpool>,
    events: EventLog,
    events_path: PathBuf,
    dir: tempfile::TempDir,
}

impl Isps {
    /// `isps`: (name, loopback address, sink config). Domain `<name>.test` has MX `mx.<name>.test`.
    async fn start(isps: Vec<(&'static str, Ipv4Addr, SinkConfig)>) -> Isps {
        let dir = tempfile::tempdir().unwrap();
        let local: Arc<dyn Spool> = Arc::new(LocalSpool::open(LocalSpoolOptions::new(dir.path().join("spool"))).unwrap());
        let events_path = dir.path().join("events.jsonl");
        let events = EventLog::open(&events_path).await.unwrap();
        let dns = TestDns::start().await.unwrap();
        let mut sinks = BTreeMap::new();
        let mut port = 0;
        for (name, ip, config) in isps {
            let sink = Sink::bind(SocketAddr::new(IpAddr::V4(ip), port), config).await.unwrap();
            port = sink.addr().port();
            dns.add_mx(&format!("{name}.test"), 10, &format!("mx.{name}.test")).unwrap();
            dns.add_a(&format!("mx.{name}.test"), ip).unwrap();
            sinks.insert(name, sink);
        }
        Isps { dns, port, sinks, spool: CountingSpool::new(local), events, events_path, dir }
    }

    fn sink(&self, name: &str) -> &Sink {
        &self.sinks[name]
    }

    /// An MTA configuration for these ISPs with `shaping` as extra shaping data.
    fn config(&self, shaping: &str) -> MtaConfig {
        let file = self.dir.path().join(format!("shaping-{}.toml", rand_suffix()));
        std::fs::write(&file, shaping).unwrap();
        let mut c = MtaConfig {
            ehlo_hostname: "mta.test".into(),
            max_concurrent_deliveries: 50,
            lease_batch: 200,
            idle_poll: Duration::from_millis(50),
            port: self.port,
            ..MtaConfig::default()
        };
        c.shaping.files = vec!["@default".into(), file];
        c.resolver.nameservers = vec![self.dns.addr()];
        c.resolver.timeout = Duration::from_secs(2);
        c.resolver.attempts = 1;
        c.timeouts.idle = Duration::from_secs(2);
        c
    }

    fn run(&self, config: MtaConfig) -> (MtaControl, CancellationToken, tokio::task::JoinHandle<()>) {
        let spool: Arc<dyn Spool> = self.spool.clone();
        let mta = Mta::new(config, spool, self.events.clone(), engine()).unwrap();
        let control = mta.control();
        let cancel = CancellationToken::new();
        let handle = tokio::spawn(mta.run(cancel.clone()));
        (control, cancel, handle)
    }

    /// Enqueues `n` one-recipient messages to `<name>.test`, each with its own Message-ID.
    async fn enqueue(&self, name: &str, n: usize, rcpts_each: usize) -> Vec<MessageId> {
        let domain = format!("{name}.test");
        let mut ids = Vec::with_capacity(n);
        for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
            let batch: Vec<Message> = chunk
                .iter()
                .map(|i| {
                    let rcpts: Vec<String> = (0..rcpts_each).map(|r| format!("u{i}r{r}@{domain}")).collect();
                    let rcpt_refs: Vec<&str> = rcpts.iter().map(String::as_str).collect();
                    let body = format!("Message-ID: <{name}-{i}-{}@test>\r\nSubject: {i}\r\n\r\nhello\r\n", rand_suffix());
                    message(&domain, &rcpt_refs, &body)
                })
                .collect();
            ids.extend(batch.iter().map(|m| m.meta.id));
            self.spool.enqueue(batch).await.unwrap();
        }
        ids
    }

    fn events(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.events_path).unwrap_or_default();
        text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::AtomicU64;
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed) * 1_000_003 + std::process::id() as u64
}

async fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn by_ip(msgs: &[ReceivedMessage]) -> BTreeMap<IpAddr, Vec<&ReceivedMessage>> {
    let mut m: BTreeMap<IpAddr, Vec<&ReceivedMessage>> = BTreeMap::new();
    for msg in msgs {
        m.entry(msg.peer.ip()).or_default().push(msg);
    }
    m
}

/// Messages per second over the middle 80% of `msgs` (by arrival), away from ramp-up and tail.
fn steady_rate(msgs: &[&ReceivedMessage]) -> f64 {
    let mut at: Vec<Instant> = msgs.iter().map(|m| m.at).collect();
    at.sort();
    let (lo, hi) = (at.len() / 10, at.len() * 9 / 10);
    (hi - lo) as f64 / at[hi].duration_since(at[lo]).as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_limits_hold_when_measured_at_the_sink() {
    let isps = Isps::start(vec![("limited", Ipv4Addr::new(127, 0, 0, 2), SinkConfig::default())]).await;
    let mut config = isps.config(
        r#"
        [provider.limited]
        max_connections = 3
        message_rate = "40/s"
        max_messages_per_connection = 25
        max_recipients_per_transaction = 2
        "#,
    );
    config.egress = toml::from_str(
        r#"
        [pools.main]
        sources = [{ ip = "127.0.0.10", ehlo = "out10.mta.test" }, { ip = "127.0.0.11", ehlo = "out11.mta.test" }]
        "#,
    )
    .unwrap();
    let (control, cancel, handle) = isps.run(config);
    let singles = isps.enqueue("limited", 800, 1).await;
    let multis = isps.enqueue("limited", 20, 5).await;
    let sink = isps.sink("limited");
    // 800 + 20 × 3 transactions at 40/s from each of two IPs: about 11 s.
    assert!(sink.wait_for_messages(860, Duration::from_secs(120)).await, "all transactions arrive: {:?}", sink.stats());
    let msgs = sink.messages();
    assert_eq!(msgs.iter().map(|m| m.rcpt_to.len()).sum::<usize>(), singles.len() + multis.len() * 5, "every recipient arrives once");

    let peaks = sink.peak_connections();
    let per_ip = by_ip(&msgs);
    assert_eq!(per_ip.keys().copied().collect::<Vec<_>>(), ["127.0.0.10".parse::<IpAddr>().unwrap(), "127.0.0.11".parse().unwrap()]);
    for (ip, msgs) in &per_ip {
        assert_eq!(peaks[ip], 3, "{ip} used exactly its 3 connections at the peak");
        let rate = steady_rate(msgs);
        assert!((36.0..=44.0).contains(&rate), "{ip} sent at {rate:.1}/s, configured 40/s (±10%)");
        let ehlo = if ip.to_string() == "127.0.0.10" { "out10.mta.test" } else { "out11.mta.test" };
        assert!(msgs.iter().all(|m| m.helo == ehlo), "each source uses its own EHLO name");
    }
    let mut per_connection: HashMap<u64, usize> = HashMap::new();
    for m in &msgs {
        *per_connection.entry(m.connection).or_default() += 1;
    }
    assert!(per_connection.values().all(|&n| n <= 25), "at most 25 messages per connection: {per_connection:?}");
    assert!(msgs.iter().all(|m| m.rcpt_to.len() <= 2), "at most 2 recipients per transaction");
    assert_eq!(sink.stats().limited, 0);

    // The admin view knows both paths and their limits.
    let status = control.shaping().status();
    let limited: Vec<_> = status.paths.iter().filter(|p| p.provider == "limited").collect();
    assert_eq!(limited.len(), 2);
    assert!(limited.iter().all(|p| p.limits.max_connections == 3 && p.known_provider));
    cancel.cancel();
    handle.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_provider_settles_at_its_limit_while_a_healthy_one_gets_full_speed() {
    let gmail_rate_reply = "421-4.7.28 Gmail has detected an unusual rate of unsolicited mail originating\n421-4.7.28 from your IP address. To protect our users from spam, mail sent from\n421 4.7.28 your IP address has been temporarily rate limited. - gsmtp";
    let slow = SinkConfig {
        hostname: "mx.slowisp.test".into(),
        record_messages: true,
        scenario: Scenario::accept_all(),
        limits: Limits {
            max_connections: Some(5),
            message_rate: Some("50/s".parse().unwrap()),
            message_rate_reply: gmail_rate_reply.parse::<ReplySpec>().unwrap(),
            ..Limits::default()
        },
        ..SinkConfig::default()
    };
    let fast = SinkConfig { hostname: "mx.fastisp.test".into(), scenario: Scenario::accept_all(), ..SinkConfig::default() };
    let isps = Isps::start(vec![("slowisp", Ipv4Addr::new(127, 0, 0, 2), slow), ("fastisp", Ipv4Addr::new(127, 0, 0, 3), fast)]).await;
    let mut config = isps.config("");
    config.retry.initial = Duration::from_secs(5);
    config.retry.factor = 1.5;
    config.retry.max_interval = Duration::from_secs(30);
    let (control, cancel, handle) = isps.run(config);
    let t0 = Instant::now();
    let t0_epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let slow_ids = isps.enqueue("slowisp", 20_000, 1).await;
    let fast_ids = isps.enqueue("fastisp", 5_000, 1).await;
    let (slow_sink, fast_sink) = (isps.sink("slowisp"), isps.sink("fastisp"));

    // The healthy provider gets everything while the slow one has most of its backlog left.
    assert!(fast_sink.wait_for_messages(fast_ids.len() as u64, Duration::from_secs(300)).await, "the healthy ISP gets all its mail");
    let slow_when_fast_done = slow_sink.stats().messages;
    let fast_done = t0.elapsed();
    assert!(
        slow_when_fast_done < 5_000,
        "the healthy ISP's 5,000 messages arrived in {fast_done:?}, while the slow one had received {slow_when_fast_done} of 20,000"
    );

    let all = slow_sink.wait_for(Duration::from_secs(1200), |s| s.messages >= slow_ids.len() as u64).await;
    assert!(all, "every message reaches the rate-limited ISP: {:?}", slow_sink.stats());

    // After the first minute: its rate, and how much of it was deferred.
    let minute = Duration::from_secs(60);
    let msgs = slow_sink.messages();
    let late: Vec<&ReceivedMessage> = msgs.iter().filter(|m| m.at.duration_since(t0) > minute).collect();
    let rate = steady_rate(&late);
    assert!((40.0..=51.0).contains(&rate), "the slow ISP received {rate:.1} msgs/s after the first minute; its limit is 50/s");
    let events = isps.events();
    let after_first_minute = t0_epoch + 61;
    let slow_events: Vec<&Value> = events
        .iter()
        .filter(|e| e["email"].as_str().is_some_and(|a| a.ends_with("@slowisp.test")))
        .filter(|e| e["timestamp"].as_u64().is_some_and(|t| t >= after_first_minute))
        .collect();
    let deferred = slow_events.iter().filter(|e| e["event"] == "deferred").count();
    let delivered = slow_events.iter().filter(|e| e["event"] == "delivered").count();
    let share = deferred as f64 / (deferred + delivered).max(1) as f64;
    assert!(share < 0.02, "after the first minute {deferred} deferrals against {delivered} deliveries ({:.2}%)", share * 100.0);

    let status = control.shaping().status();
    let path = status.paths.iter().find(|p| p.provider == "slowisp").expect("a path to the slow ISP");
    let throttle = path.throttle.as_ref().expect("the rules throttled the path");
    assert!(throttle.cause.by.starts_with("rule:slowisp."), "{throttle:?}");
    assert!(path.limits.max_connections <= 4);
    assert!(slow_sink.peak_connections().values().all(|&n| n <= 5));
    assert_eq!(slow_sink.stats().duplicates + fast_sink.stats().duplicates, 0, "nothing arrived twice");
    cancel.cancel();
    handle.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_triggered_suspension_stops_delivery_for_its_duration_then_resumes() {
    let blocky = SinkConfig {
        hostname: "mx.blocky.test".into(),
        scenario: Scenario::accept_all()
            .rule(Rule::at(Stage::Mail).reply("421 4.7.0 [BLK01] Messages from 127.0.0.1 temporarily deferred due to user complaints").times(3)),
        ..SinkConfig::default()
    };
    let fast = SinkConfig { hostname: "mx.fastisp.test".into(), scenario: Scenario::accept_all(), ..SinkConfig::default() };
    let isps = Isps::start(vec![("blocky", Ipv4Addr::new(127, 0, 0, 2), blocky), ("fastisp", Ipv4Addr::new(127, 0, 0, 3), fast)]).await;
    let mut config = isps.config("[provider.blocky]\nmax_connections = 1\n");
    config.retry.initial = Duration::from_secs(1);
    config.retry.max_interval = Duration::from_secs(1);
    let (control, cancel, handle) = isps.run(config);
    let ids = isps.enqueue("blocky", 200, 1).await;
    let sink = isps.sink("blocky");

    // Three deferrals with the blocking text suspend the path for 8 s.
    let suspended_at = {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let status = control.shaping().status();
            if let Some(s) = status.paths.iter().find(|p| p.provider == "blocky").and_then(|p| p.suspension.clone()) {
                assert_eq!(s.cause.by, "rule:blocky.blocked");
                assert!(s.cause.reason.contains("[BLK01]"));
                break Instant::now();
            }
            assert!(Instant::now() < deadline, "the path is suspended after three [BLK01] replies");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    // A lease that began just before the suspension may still finish (and hand its mail
    // back): count from when the suspension is in effect, not from the instant it was seen.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let connections_at_start = sink.stats().connections;
    let leases_at_start = isps.spool.leases_of(&ids);
    // Meanwhile another provider gets its mail.
    let fast_ids = isps.enqueue("fastisp", 300, 1).await;
    assert!(isps.sink("fastisp").wait_for_messages(fast_ids.len() as u64, Duration::from_secs(6)).await, "a suspended provider does not hold up another");
    let until_end = Duration::from_secs(8).saturating_sub(suspended_at.elapsed()).saturating_sub(Duration::from_millis(700));
    tokio::time::sleep(until_end).await;
    assert_eq!(sink.stats().connections, connections_at_start, "no connection to the suspended provider during the suspension");
    assert_eq!(sink.stats().messages, 0);
    assert_eq!(isps.spool.leases_of(&ids), leases_at_start, "the backlog is not leased (re-checked) while the suspension lasts");

    // Then delivery resumes by itself; nothing bounced.
    assert!(sink.wait_for_messages(ids.len() as u64, Duration::from_secs(60)).await, "delivery resumes after the suspension: {:?}", sink.stats());
    let resumed_after = suspended_at.elapsed();
    assert!(resumed_after >= Duration::from_secs(7), "resumed only when the suspension ended ({resumed_after:?})");
    let events = isps.events();
    assert!(!events.iter().any(|e| e["event"] == "bounce"), "a suspension defers, never bounces");
    assert!(isps.spool.reschedules_of(&ids) <= ids.len() as u32 + 3 + 50, "each message went back to the spool at most about once");
    cancel.cancel();
    handle.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_suspends_and_resumes_a_provider() {
    let sink = SinkConfig { hostname: "mx.fastisp.test".into(), scenario: Scenario::accept_all(), ..SinkConfig::default() };
    let isps = Isps::start(vec![("fastisp", Ipv4Addr::new(127, 0, 0, 2), sink)]).await;
    let (control, cancel, handle) = isps.run(isps.config(""));
    assert_eq!(control.suspend(Some("fastisp"), None, Duration::from_secs(3600), "maintenance window").await, 0, "no path exists yet");
    let ids = isps.enqueue("fastisp", 100, 1).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sink = isps.sink("fastisp");
    assert_eq!(sink.stats().connections, 0, "suspended before its first message: nothing is sent");
    let status = control.shaping().status();
    let path = status.paths.iter().find(|p| p.provider == "fastisp").expect("the path exists once mail for it was routed");
    assert_eq!(path.suspension.as_ref().map(|s| s.cause.reason.as_str()), Some("maintenance window"));

    assert_eq!(control.resume(Some("fastisp"), None), 1);
    assert!(sink.wait_for_messages(ids.len() as u64, Duration::from_secs(20)).await, "a resume sends the held mail at once");
    let explained = control.explain("fastisp.test", None, None).await;
    assert_eq!((explained.provider.as_str(), explained.known_provider, explained.mx.as_deref()), ("fastisp", true, Some("mx.fastisp.test")));
    assert!(explained.paths[0].suspension.is_none());
    cancel.cancel();
    handle.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_that_expires_while_its_provider_is_suspended_bounces_on_time() {
    let sink = SinkConfig { hostname: "mx.fastisp.test".into(), scenario: Scenario::accept_all(), ..SinkConfig::default() };
    let isps = Isps::start(vec![("fastisp", Ipv4Addr::new(127, 0, 0, 2), sink)]).await;
    let mut config = isps.config("");
    config.shaping.expiry_check = Duration::from_secs(1);
    let (control, cancel, handle) = isps.run(config);
    // The path exists and is blocked: the lease filter skips the domain from now on.
    isps.enqueue("fastisp", 1, 1).await;
    assert!(isps.sink("fastisp").wait_for_messages(1, Duration::from_secs(20)).await);
    control.suspend(Some("fastisp"), None, Duration::from_secs(3600), "long incident").await;
    let mut msg = message("fastisp.test", &["late@fastisp.test"], "Subject: x\r\n\r\nx\r\n");
    msg.meta.expires_at = sluice_spool::now_ms() + 3_000;
    isps.spool.enqueue(vec![msg]).await.unwrap();
    wait_until("the expired message bounces", Duration::from_secs(30), || {
        isps.events().iter().any(|e| e["email"] == "late@fastisp.test" && e["event"] == "bounce" && e["status"] == "4.4.7")
    })
    .await;
    assert_eq!(isps.sink("fastisp").stats().messages, 1, "nothing was sent during the suspension");
    cancel.cancel();
    handle.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_never_waits_in_a_ready_queue_past_its_lease() {
    // One message a second, and leases of 30 s: most of the 40 messages cannot be sent
    // within their first lease, so they go back to the spool and come again.
    let sink = SinkConfig { hostname: "mx.limited.test".into(), scenario: Scenario::accept_all(), ..SinkConfig::default() };
    let isps = Isps::start(vec![("limited", Ipv4Addr::new(127, 0, 0, 2), sink)]).await;
    let mut config = isps.config("[provider.limited]\nmessage_rate = \"1/s\"\nmax_connections = 1\n");
    let t = Duration::from_secs(2);
    config.timeouts = sluice_mta::Timeouts { connect: t, tls: t, banner: t, ehlo: t, mail: t, rcpt: t, data: t, end_of_data: t, idle: t };
    config.lease_for = Duration::from_secs(30);
    let (_control, cancel, handle) = isps.run(config);
    let ids = isps.enqueue("limited", 40, 1).await;
    let sink = isps.sink("limited");
    assert!(sink.wait_for_messages(40, Duration::from_secs(120)).await, "all arrive: {:?}", sink.stats());
    assert!(isps.spool.leases_of(&ids) > 40, "some messages were handed back before their lease ran out and leased again");
    assert_eq!(sink.stats().duplicates, 0);
    cancel.cancel();
    handle.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_is_chosen_by_the_message_its_tenant_or_the_default() {
    let sink = SinkConfig { hostname: "mx.fastisp.test".into(), scenario: Scenario::accept_all(), ..SinkConfig::default() };
    let isps = Isps::start(vec![("fastisp", Ipv4Addr::new(127, 0, 0, 2), sink)]).await;
    let mut config = isps.config("");
    config.egress = toml::from_str(
        r#"
        default_pool = "bulk"
        [pools.bulk]
        sources = [{ ip = "127.0.0.10", ehlo = "bulk.mta.test" }]
        [pools.transactional]
        sources = [{ ip = "127.0.0.20", ehlo = "tx.mta.test" }]
        [tenants]
        "apikey:shop" = "transactional"
        "#,
    )
    .unwrap();
    let (_control, cancel, handle) = isps.run(config);
    let mut named = message("fastisp.test", &["named@fastisp.test"], "Message-ID: <named@t>\r\n\r\nx\r\n");
    named.meta.ip_pool = Some("transactional".into());
    let mut tenant = message("fastisp.test", &["tenant@fastisp.test"], "Message-ID: <tenant@t>\r\n\r\nx\r\n");
    tenant.meta.tenant = "apikey:shop".into();
    let plain = message("fastisp.test", &["plain@fastisp.test"], "Message-ID: <plain@t>\r\n\r\nx\r\n");
    let mut unknown = message("fastisp.test", &["unknown@fastisp.test"], "Message-ID: <unknown@t>\r\n\r\nx\r\n");
    unknown.meta.ip_pool = Some("no-such-pool".into());
    isps.spool.enqueue(vec![named, tenant, plain, unknown]).await.unwrap();
    let sink = isps.sink("fastisp");
    assert!(sink.wait_for_messages(4, Duration::from_secs(30)).await);
    let from: HashMap<String, (String, String)> =
        sink.messages().iter().map(|m| (m.rcpt_to[0].clone(), (m.peer.ip().to_string(), m.helo.clone()))).collect();
    assert_eq!(from["named@fastisp.test"], ("127.0.0.20".into(), "tx.mta.test".into()), "the pool the message names");
    assert_eq!(from["tenant@fastisp.test"], ("127.0.0.20".into(), "tx.mta.test".into()), "the tenant's pool");
    assert_eq!(from["plain@fastisp.test"], ("127.0.0.10".into(), "bulk.mta.test".into()), "the default pool");
    assert_eq!(from["unknown@fastisp.test"].0, "127.0.0.10", "a pool that does not exist falls back to the default");
    cancel.cancel();
    handle.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_path_follows_its_own_tls_policy() {
    // Both mock ISPs offer STARTTLS; `limited` has TLS disabled in the shaping data, `blocky`
    // requires it, and `fastisp` (no STARTTLS) requires it too: its mail is deferred.
    let tls_sink = |host: &str| SinkConfig { hostname: host.into(), starttls: true, scenario: Scenario::accept_all(), ..SinkConfig::default() };
    let plain = SinkConfig { hostname: "mx.fastisp.test".into(), scenario: Scenario::accept_all(), ..SinkConfig::default() };
    let isps = Isps::start(vec![
        ("limited", Ipv4Addr::new(127, 0, 0, 2), tls_sink("mx.limited.test")),
        ("blocky", Ipv4Addr::new(127, 0, 0, 3), tls_sink("mx.blocky.test")),
        ("fastisp", Ipv4Addr::new(127, 0, 0, 4), plain),
    ])
    .await;
    let config = isps.config("[provider.limited]\ntls = \"disabled\"\n[provider.blocky]\ntls = \"required\"\n[provider.fastisp]\ntls = \"required\"\n");
    let (_control, cancel, handle) = isps.run(config);
    isps.enqueue("limited", 2, 1).await;
    isps.enqueue("blocky", 2, 1).await;
    isps.enqueue("fastisp", 1, 1).await;
    assert!(isps.sink("limited").wait_for_messages(2, Duration::from_secs(30)).await);
    assert!(isps.sink("blocky").wait_for_messages(2, Duration::from_secs(30)).await);
    assert!(isps.sink("limited").messages().iter().all(|m| !m.tls), "tls = disabled: plain text although STARTTLS is offered");
    assert!(isps.sink("blocky").messages().iter().all(|m| m.tls), "tls = required: over TLS");
    wait_until("the message to the ISP without STARTTLS is deferred", Duration::from_secs(30), || {
        isps.events().iter().any(|e| e["email"].as_str().is_some_and(|a| a.ends_with("@fastisp.test")) && e["event"] == "deferred")
    })
    .await;
    assert_eq!(isps.sink("fastisp").stats().messages, 0);
    cancel.cancel();
    handle.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_destination_costs_a_few_connection_attempts_not_one_per_message() {
    // An MX that accepts TCP connections and closes them at once, counting them.
    let listener = tokio::net::TcpListener::bind("127.0.0.5:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicU64::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::Relaxed);
            drop(s);
        }
    });
    let dns = TestDns::start().await.unwrap();
    dns.add_mx("dead.test", 10, "mx.dead.test").unwrap();
    dns.add_a("mx.dead.test", Ipv4Addr::new(127, 0, 0, 5)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spool: Arc<dyn Spool> = Arc::new(LocalSpool::open(LocalSpoolOptions::new(dir.path().join("spool"))).unwrap());
    let events_path = dir.path().join("events.jsonl");
    let events = EventLog::open(&events_path).await.unwrap();
    let mut config = MtaConfig { ehlo_hostname: "mta.test".into(), idle_poll: Duration::from_millis(50), port, ..MtaConfig::default() };
    config.resolver.nameservers = vec![dns.addr()];
    config.retry.initial = Duration::from_secs(3600);
    let mta = Mta::new(config, spool.clone(), events, engine()).unwrap();
    let cancel = CancellationToken::new();
    let handle = tokio::spawn(mta.run(cancel.clone()));
    let batch: Vec<Message> = (0..300).map(|i| message("dead.test", &[&format!("u{i}@dead.test")], "Subject: x\r\n\r\nx\r\n")).collect();
    spool.enqueue(batch).await.unwrap();
    wait_until("all 300 are deferred", Duration::from_secs(60), || {
        let text = std::fs::read_to_string(&events_path).unwrap_or_default();
        text.lines().filter(|l| l.contains("\"deferred\"")).count() >= 300
    })
    .await;
    let attempts = accepted.load(Ordering::Relaxed);
    assert!(attempts <= 10, "{attempts} connection attempts for 300 messages to a dead destination");
    let text = std::fs::read_to_string(&events_path).unwrap();
    assert!(text.lines().all(|l| !l.contains("\"deferred\"") || l.contains("closed the connection")), "each deferral names the failure");
    cancel.cancel();
    handle.await.unwrap();
}
