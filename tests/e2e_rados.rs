//! The distributed spool end to end: several `sluice` processes (edges and MTAs) on one Ceph
//! pool of the real cluster the test command starts, with faults: an MTA killed mid-delivery,
//! an OSD killed during injection, a cluster that cannot take writes.
//!
//! The tests share the cluster and kill parts of it, so they run one at a time.
#![cfg(feature = "rados")]

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use sluice_load::sink::{Rule, Scenario, SinkConfig, Stage};
use support::*;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn ceph_conf() -> String {
    std::env::var("SLUICE_CEPH_CONF").expect("SLUICE_CEPH_CONF is not set: run scripts/test.sh, which starts a Ceph cluster")
}

fn ceph_dir() -> String {
    std::env::var("SLUICE_CEPH_DIR").expect("SLUICE_CEPH_DIR is not set: run scripts/test.sh, which starts a Ceph cluster")
}

fn cluster_script(args: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ceph-cluster.sh");
    let out = Command::new(script).args(args).args(["--dir", &ceph_dir()]).output().unwrap();
    assert!(out.status.success(), "ceph-cluster.sh {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A node's config: `role` on the shared pool/namespace, short timeouts for tests.
fn node_config(dir: &Path, peers: &Peers, namespace: &str, role: &str, extra: &str) -> String {
    let mta = r#"lease_for = "60s"
max_concurrent_deliveries = 20"#;
    let sections = format!(
        r#"
[mta.timeouts]
connect = "3s"
tls = "3s"
banner = "3s"
ehlo = "3s"
mail = "5s"
rcpt = "5s"
data = "5s"
end_of_data = "10s"
idle = "1s"

[spool]
backend = "rados"

[spool.rados]
conf = "{conf}"
pool = "{pool}"
namespace = "{namespace}"
shards = 8
shard_lease = "3s"
op_timeout = "4s"
{extra}"#,
        conf = ceph_conf(),
        pool = std::env::var("SLUICE_CEPH_POOL").unwrap_or_else(|_| "sluice".into()),
    );
    config_with(dir, peers, &format!("role = \"{role}\""), mta, &sections)
}

struct Cluster {
    edges: Vec<Sluice>,
    mtas: Vec<Sluice>,
    _dirs: Vec<tempfile::TempDir>,
}

fn start_cluster(peers: &Peers, edges: usize, mtas: usize, extra: &str) -> Cluster {
    let namespace = format!("e2e-{}-{}", std::process::id(), sluice_spool::MessageId::new());
    let mut dirs = Vec::new();
    let mut start = |role: &str| {
        let dir = tempfile::tempdir().unwrap();
        let s = Sluice::start_with(dir.path(), &node_config(dir.path(), peers, &namespace, role, extra));
        dirs.push(dir);
        s
    };
    let edges = (0..edges).map(|_| start("edge")).collect();
    let mtas = (0..mtas).map(|_| start("mta")).collect();
    Cluster { edges, mtas, _dirs: dirs }
}

/// Message-ID → times delivered, over everything the sink accepted.
fn deliveries(peers: &Peers) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for m in peers.sink.messages() {
        let text = String::from_utf8_lossy(&m.data);
        let id = text
            .lines()
            .take_while(|l| !l.is_empty())
            .find_map(|l| l.strip_prefix("Message-ID: ").or_else(|| l.strip_prefix("Message-Id: ")))
            .unwrap_or("<none>")
            .to_string();
        for r in &m.rcpt_to {
            *seen.entry(format!("{id} {r}")).or_insert(0) += 1;
        }
    }
    seen
}

fn smtp_source(port: u16, messages: usize, domain: &str) -> std::process::Child {
    Command::new(require_tool("smtp-source"))
        .args(["-s", "10", "-m", &messages.to_string(), "-l", "2000", "-N", "-d"])
        .args(["-f", "bulk@sender.test", "-t", &format!("user@{domain}"), "-M", "client.test"])
        .arg(format!("127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn http_requests(n: usize, per_request: usize, tag: &str) -> serde_json::Value {
    json!((0..n)
        .map(|i| json!({
            "personalizations": (0..per_request).map(|j| json!({"to": [{"email": format!("{tag}-{i}-{j}@gmail.test")}]})).collect::<Vec<_>>(),
            "from": {"email": "api@sender.test"},
            "subject": format!("{tag} {i}"),
            "content": [{"type": "text/plain", "value": "hello"}]
        }))
        .collect::<Vec<_>>())
}

async fn wait_delivered(peers: &Peers, distinct: usize, limit: Duration) -> HashMap<String, usize> {
    let start = Instant::now();
    loop {
        let d = deliveries(peers);
        if d.len() >= distinct {
            return d;
        }
        assert!(start.elapsed() < limit, "only {} of {distinct} recipients delivered after {limit:?}", d.len());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_edges_two_mtas_deliver_10000_messages_exactly_once() {
    let _serial = SERIAL.lock().await;
    let peers = Peers::start(SinkConfig { scenario: Scenario::accept_all(), ..Default::default() }).await;
    let c = start_cluster(&peers, 2, 2, "");
    let started = Instant::now();
    // 5,000 over SMTP (Postfix's smtp-source, 2,500 into each edge) ...
    let mut sources: Vec<_> = c.edges.iter().zip(["yahoo.test", "example.test"]).map(|(e, d)| smtp_source(e.smtp.port(), 2500, d)).collect();
    // ... and 5,000 over HTTP (the SendGrid SDK, 25 requests × 100 personalizations per edge).
    for (i, e) in c.edges.iter().enumerate() {
        let out = inject(&["http", "--host", &e.http_base(), "--key", API_KEY], &http_requests(25, 100, &format!("edge{i}")));
        assert_eq!(out.iter().filter(|l| l.starts_with("ACK")).count(), 25, "{out:?}");
    }
    for s in &mut sources {
        let out = s.wait_with_output_ref();
        assert!(out, "smtp-source failed");
    }
    let injected = started.elapsed();
    let d = wait_delivered(&peers, 10_000, Duration::from_secs(600)).await;
    let total = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let d2 = deliveries(&peers);
    let duplicates: usize = d2.values().map(|n| n - 1).sum();
    eprintln!(
        "2 edges + 2 MTAs on RADOS: 10000 recipients injected in {:.1}s, delivered in {:.1}s ({:.0}/s end to end), {} duplicates",
        injected.as_secs_f64(),
        total.as_secs_f64(),
        10_000.0 / total.as_secs_f64(),
        duplicates
    );
    assert_eq!(d.len(), 10_000);
    assert_eq!(d2.len(), 10_000, "no unexpected recipients");
    assert_eq!(duplicates, 0, "each recipient exactly once without faults");
    for n in c.edges.into_iter().chain(c.mtas) {
        assert!(n.stop());
    }
}

trait WaitRef {
    fn wait_with_output_ref(&mut self) -> bool;
}

impl WaitRef for std::process::Child {
    fn wait_with_output_ref(&mut self) -> bool {
        self.wait().map(|s| s.success()).unwrap_or(false)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mta_killed_mid_delivery_loses_nothing_and_duplicates_are_rare() {
    let _serial = SERIAL.lock().await;
    // A slow MX keeps many deliveries in flight when the MTA dies.
    let scenario = Scenario::accept_all().rule(Rule::at(Stage::EndOfData).delay(Duration::from_millis(5)));
    let peers = Peers::start(SinkConfig { scenario, ..Default::default() }).await;
    let mut c = start_cluster(&peers, 1, 2, "");
    let total = 5000;
    let mut src = smtp_source(c.edges[0].smtp.port(), total, "gmail.test");
    // Let delivery get going, then kill one MTA without warning.
    let start = Instant::now();
    while peers.sink.stats().messages < 500 {
        assert!(start.elapsed() < Duration::from_secs(120), "delivery did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let victim = c.mtas.remove(0);
    victim.kill9();
    let killed_at = Instant::now();
    assert!(src.wait_with_output_ref(), "smtp-source failed");
    let d = wait_delivered(&peers, total, Duration::from_secs(300)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let d = deliveries(&peers).into_iter().filter(|(k, _)| d.contains_key(k)).collect::<HashMap<_, _>>();
    let duplicates: usize = d.values().map(|n| n - 1).sum();
    eprintln!(
        "MTA killed mid-delivery: {total} injected, {} delivered, {duplicates} duplicates ({:.2}%), all delivered {:.1}s after the kill",
        d.len(),
        100.0 * duplicates as f64 / total as f64,
        killed_at.elapsed().as_secs_f64()
    );
    assert_eq!(d.len(), total, "every message delivered");
    assert!(duplicates * 100 < total, "duplicates under 1%: {duplicates}");
    for n in c.edges.into_iter().chain(c.mtas) {
        assert!(n.stop());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_osd_killed_during_injection_loses_nothing_acknowledged() {
    let _serial = SERIAL.lock().await;
    let peers = Peers::start(SinkConfig { scenario: Scenario::accept_all(), ..Default::default() }).await;
    let c = start_cluster(&peers, 1, 1, "");
    let (mut client, lines) = inject_spawn(
        &["http", "--host", &c.edges[0].http_base(), "--key", API_KEY],
        &http_requests(400, 5, "osd"),
    );
    let mut acked = Vec::new();
    let mut failed = Vec::new();
    let mut osd_killed = false;
    let mut osd_restarted = false;
    for line in lines.iter() {
        if let Some(rest) = line.strip_prefix("ACK ") {
            acked.push(rest.split(' ').next().unwrap().parse::<usize>().unwrap());
        } else {
            failed.push(line.clone());
        }
        if acked.len() == 80 && !osd_killed {
            cluster_script(&["kill-osd", "1"]);
            osd_killed = true;
        }
        if acked.len() == 240 && !osd_restarted {
            cluster_script(&["start-osd", "1"]);
            osd_restarted = true;
        }
    }
    let _ = client.wait();
    assert!(osd_killed && osd_restarted, "injection ended early: {} acknowledged, failures: {failed:?}", acked.len());
    // every personalization of every acknowledged request must arrive
    let expected: Vec<String> = acked.iter().flat_map(|i| (0..5).map(move |j| format!("osd-{i}-{j}@gmail.test"))).collect();
    let start = Instant::now();
    let delivered = loop {
        let rcpts: HashMap<String, usize> = peers.sink.messages().iter().flat_map(|m| m.rcpt_to.clone()).fold(HashMap::new(), |mut m, r| {
            *m.entry(r).or_insert(0) += 1;
            m
        });
        if expected.iter().all(|r| rcpts.contains_key(r)) {
            break rcpts;
        }
        let missing = expected.iter().filter(|r| !rcpts.contains_key(*r)).count();
        assert!(start.elapsed() < Duration::from_secs(300), "{missing} acknowledged recipients never delivered");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let duplicates: usize = delivered.values().map(|n| n - 1).sum();
    eprintln!(
        "OSD killed during injection: {} requests acknowledged ({} recipients), {} refused while degraded, {} delivered, {} duplicates, 0 lost",
        acked.len(),
        expected.len(),
        failed.len(),
        delivered.len(),
        duplicates
    );
    cluster_script(&["wait"]);
    for n in c.edges.into_iter().chain(c.mtas) {
        assert!(n.stop());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_answer_503_and_451_when_the_cluster_cannot_write_then_recover() {
    let _serial = SERIAL.lock().await;
    let peers = Peers::start(SinkConfig::default()).await;
    let c = start_cluster(&peers, 1, 0, "");
    let edge = &c.edges[0];
    let one = http_requests(1, 1, "avail");
    assert!(inject(&["http", "--host", &edge.http_base(), "--key", API_KEY], &one)[0].starts_with("ACK"));
    // Two of three OSDs hang: every PG drops below min_size and writes cannot complete.
    cluster_script(&["kill-osd", "1", "--signal", "STOP"]);
    cluster_script(&["kill-osd", "2", "--signal", "STOP"]);
    let started = Instant::now();
    let out = inject(&["http", "--host", &edge.http_base(), "--key", API_KEY], &one);
    let http_took = started.elapsed();
    let smtp = inject(
        &["smtp", "--port", &edge.smtp.port().to_string()],
        &json!([{"from": "a@sender.test", "to": ["b@gmail.test"], "data": "Subject: x\r\n\r\nx\r\n"}]),
    );
    cluster_script(&["start-osd", "1", "--signal", "CONT"]);
    cluster_script(&["start-osd", "2", "--signal", "CONT"]);
    eprintln!("cluster unable to write: HTTP answered {:?} after {:.1}s; SMTP answered {:?}", out, http_took.as_secs_f64(), smtp);
    assert!(out[0].starts_with("ERR 0 503"), "HTTP 503 while the cluster cannot write: {out:?}");
    assert!(smtp[0].starts_with("ERR 0 451"), "SMTP 451 while the cluster cannot write: {smtp:?}");
    assert!(http_took < Duration::from_secs(60), "answered within the timeout, not a hang");
    // resumes by itself
    let start = Instant::now();
    loop {
        let out = inject(&["http", "--host", &edge.http_base(), "--key", API_KEY], &one);
        if out[0].starts_with("ACK") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "edge did not recover: {out:?}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    cluster_script(&["wait"]);
    for n in c.edges.into_iter().chain(c.mtas) {
        assert!(n.stop());
    }
}
