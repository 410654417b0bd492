//! The distributed spool end to end: several `sluice` processes (edges and MTAs) on one Ceph
//! pool of the real cluster the test command starts, with faults: an MTA killed mid-delivery,
//! an OSD killed during injection, a cluster that cannot take writes.
//!
//! The tests share the cluster and kill parts of it, so they run one at a time.
#![cfg(feature = "rados")]

mod support;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
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

fn ceph_pool() -> String {
    std::env::var("SLUICE_CEPH_POOL").unwrap_or_else(|_| "sluice".into())
}

fn cluster_script(args: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ceph-cluster.sh");
    let out = Command::new(script).args(args).args(["--dir", &ceph_dir()]).output().unwrap();
    assert!(out.status.success(), "ceph-cluster.sh {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn ceph(args: &[&str]) {
    let out = Command::new("ceph").arg("-c").arg(ceph_conf()).args(args).output().expect("run the ceph CLI");
    assert!(out.status.success(), "ceph {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// An OSD this test stopped: restarted (and the cluster waited for) however the test ends,
/// so a failure midway does not leave the next test a degraded cluster.
struct DownOsd {
    id: &'static str,
    signal: &'static str,
    up: bool,
}

impl DownOsd {
    fn kill(id: &'static str, signal: &'static str) -> DownOsd {
        cluster_script(&["kill-osd", id, "--signal", signal]);
        DownOsd { id, signal, up: false }
    }

    fn restart(&mut self) {
        let signal = if self.signal == "STOP" { "CONT" } else { "KILL" };
        cluster_script(&["start-osd", self.id, "--signal", signal]);
        self.up = true;
    }
}

impl Drop for DownOsd {
    fn drop(&mut self) {
        if !self.up {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ceph-cluster.sh");
            let signal = if self.signal == "STOP" { "CONT" } else { "KILL" };
            let run = |args: &[&str]| Command::new(&script).args(args).args(["--dir", &ceph_dir()]).status();
            let _ = run(&["start-osd", self.id, "--signal", signal]);
            let _ = run(&["wait"]);
        }
    }
}

/// A pool of the test's own: its quota lifted and the pool removed however the test ends.
struct TempPool(String);

impl TempPool {
    fn create(name: String) -> TempPool {
        ceph(&["osd", "pool", "create", &name, "8", "8"]);
        ceph(&["osd", "pool", "application", "enable", &name, "rados"]);
        TempPool(name)
    }
}

impl Drop for TempPool {
    fn drop(&mut self) {
        let ceph = |args: &[&str]| Command::new("ceph").arg("-c").arg(ceph_conf()).args(args).output();
        let _ = ceph(&["osd", "pool", "set-quota", &self.0, "max_objects", "0"]);
        let _ = ceph(&["osd", "pool", "rm", &self.0, &self.0, "--yes-i-really-really-mean-it"]);
    }
}

/// Where test reports go: `<target dir>/test-reports`, next to the binary under test
/// (`<target dir>/debug/sluice`), so CARGO_TARGET_DIR is honoured.
fn report_path() -> PathBuf {
    let bin = Path::new(binary());
    let target = bin.parent().and_then(Path::parent).expect("the binary lives in <target>/<profile>/");
    target.join("test-reports").join("rados-faults.md")
}

static REPORT: std::sync::Mutex<BTreeMap<&'static str, String>> = std::sync::Mutex::new(BTreeMap::new());

/// Adds this test's section to the fault-test report (rewritten whole each time, so it holds
/// this run only) and echoes it to stderr.
fn report(test: &'static str, text: String) {
    eprintln!("{test}:\n{text}");
    let mut sections = REPORT.lock().unwrap_or_else(|e| e.into_inner());
    sections.insert(test, text);
    let when = Command::new("date").args(["-u", "+%Y-%m-%d %H:%M:%S UTC"]).output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let mut out = format!(
        "# RADOS fault tests (tests/e2e_rados.rs)\n\nRun {}, Ceph cluster {}, pool {}.\n",
        when.unwrap_or_default(),
        ceph_conf(),
        ceph_pool()
    );
    for (name, text) in sections.iter() {
        out.push_str(&format!("\n## {name}\n\n{text}\n"));
    }
    let path = report_path();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, out).unwrap();
}

/// GET over plain HTTP/1.0 (the admin listener), with timeouts.
fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The sum of a metric's series on a node's `/metrics` (0 when it has none yet).
fn metric(node: &Sluice, name: &str) -> f64 {
    metric_at(node.admin, name)
}

fn metric_at(admin: SocketAddr, name: &str) -> f64 {
    http_get(admin, "/metrics")
        .lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// How a node of the test deployment runs.
struct NodeSpec {
    pool: String,
    /// `mta.lease_for`: how long a leased message stays away if its MTA dies unnoticed.
    lease_for: &'static str,
    /// More tables or keys appended to the config.
    extra: String,
}

impl Default for NodeSpec {
    fn default() -> Self {
        NodeSpec { pool: ceph_pool(), lease_for: "60s", extra: String::new() }
    }
}

/// A node's config: `role` on the shared pool/namespace (named by `spool.url`, the one key a
/// node needs), short timeouts for tests.
fn node_config(dir: &Path, peers: &Peers, namespace: &str, role: &str, spec: &NodeSpec) -> String {
    let mta = format!("lease_for = \"{}\"\nmax_concurrent_deliveries = 20", spec.lease_for);
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
url = "rados://{pool}?conf={conf}&namespace={namespace}"

[spool.rados]
shards = {SHARDS}
shard_lease = "{lease}s"
op_timeout = "{op}s"
{extra}"#,
        conf = ceph_conf(),
        pool = spec.pool,
        lease = SHARD_LEASE.as_secs(),
        op = OP_TIMEOUT.as_secs(),
        extra = spec.extra,
    );
    config_with(dir, peers, &format!("role = \"{role}\""), &mta, &sections)
}

const SHARDS: u32 = 8;
const SHARD_LEASE: Duration = Duration::from_secs(3);
const OP_TIMEOUT: Duration = Duration::from_secs(4);
/// A refusal by a cluster that cannot write must come within the op timeout and this margin
/// (the edges' own request timeouts are far longer: a hang would show).
const REFUSAL_MARGIN: Duration = Duration::from_secs(11);

struct Cluster {
    edges: Vec<Sluice>,
    mtas: Vec<Sluice>,
    _dirs: Vec<tempfile::TempDir>,
}

fn new_namespace() -> String {
    format!("e2e-{}-{}", std::process::id(), sluice_spool::MessageId::new())
}

fn start_cluster(peers: &Peers, edges: usize, mtas: usize, spec: &NodeSpec) -> Cluster {
    let namespace = new_namespace();
    let mut dirs = Vec::new();
    let mut start = |role: &str| {
        let dir = tempfile::tempdir().unwrap();
        let s = Sluice::start_with(dir.path(), &node_config(dir.path(), peers, &namespace, role, spec));
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
    let c = start_cluster(&peers, 2, 2, &NodeSpec::default());
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
    report(
        "2 edges + 2 MTAs, no faults",
        format!(
            "10,000 recipients (5,000 over SMTP with smtp-source, 5,000 over HTTP with the SendGrid SDK) injected in {:.1} s, \
             all delivered {:.1} s after the start; {} distinct recipients delivered, {duplicates} duplicates (asserted: 0).",
            injected.as_secs_f64(),
            total.as_secs_f64(),
            d2.len(),
        ),
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

/// Waits until `cond` holds, polling; returns how long it took.
async fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mta_killed_mid_delivery_is_taken_over_within_the_lease_time() {
    let _serial = SERIAL.lock().await;
    // A slow MX keeps many deliveries in flight when the MTA dies.
    let scenario = Scenario::accept_all().rule(Rule::at(Stage::EndOfData).delay(Duration::from_millis(20)));
    let peers = Peers::start(SinkConfig { scenario, ..Default::default() }).await;
    // Leases far longer than the test may take: what the dead MTA held can only come back
    // through the take-over of its shards, not by its leases running out.
    let lease_for = Duration::from_secs(600);
    let mut c = start_cluster(&peers, 1, 2, &NodeSpec { lease_for: "600s", ..Default::default() });
    let owned = |n: &Sluice| metric(n, "sluice_spool_shards_owned") as u32;
    wait_for("the two MTAs to split the shards", Duration::from_secs(60), || {
        c.mtas.iter().all(|m| owned(m) == SHARDS / 2)
    })
    .await;
    let total = 5000;
    let mut src = smtp_source(c.edges[0].smtp.port(), total, "gmail.test");
    // Let delivery get going on both MTAs, then kill one without warning.
    wait_for("delivery to start on both MTAs", Duration::from_secs(120), || {
        peers.sink.stats().messages >= 500 && c.mtas.iter().all(|m| metric(m, "sluice_delivered_total") > 0.0)
    })
    .await;
    let victim = c.mtas.remove(0);
    let survivor = &c.mtas[0];
    let victim_delivered = metric(&victim, "sluice_delivered_total") as u64;
    let victim_shards = owned(&victim);
    victim.kill9();
    let killed_at = Instant::now();
    let sink_at_kill = peers.sink.stats().messages;

    // Take-over: the survivor owns every shard within about two shard leases (the dead
    // MTA's locks run out, and it stops counting as a live worker).
    let take_over_limit = 2 * SHARD_LEASE + Duration::from_secs(6);
    let take_over = wait_for("the survivor to own every shard", take_over_limit, || owned(survivor) == SHARDS).await;
    // The victim had deliveries in flight: the survivor finds its leases and makes them due
    // (right after taking each shard, so this may trail the ownership gauge a little).
    let since = Instant::now();
    let mut recovered = 0;
    while recovered == 0 && since.elapsed() < Duration::from_secs(10) {
        recovered = metric(survivor, "sluice_spool_leases_recovered_total") as u64;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    assert!(src.wait_with_output_ref(), "smtp-source failed");
    let limit = lease_for / 2;
    let d = wait_delivered(&peers, total, limit.saturating_sub(killed_at.elapsed())).await;
    let all_delivered = killed_at.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let d = deliveries(&peers).into_iter().filter(|(k, _)| d.contains_key(k)).collect::<HashMap<_, _>>();
    let duplicates: usize = d.values().map(|n| n - 1).sum();
    report(
        "an MTA killed with SIGKILL mid-delivery",
        format!(
            "| measurement | value | asserted |\n|---|---|---|\n\
             | messages injected (smtp-source, 1 edge, 2 MTAs, {SHARDS} shards) | {total} | |\n\
             | delivered by the victim before the kill | {victim_delivered} | > 0 |\n\
             | accepted by the sink at the kill | {sink_at_kill} | ≥ 500 |\n\
             | shards the victim owned | {victim_shards} | {} |\n\
             | survivor owned all shards after the kill | {:.1} s | ≤ {:.0} s (2 × shard_lease {:.0} s + 6 s) |\n\
             | leased messages of the victim made due by the take-over | {recovered} | > 0 |\n\
             | all messages delivered after the kill | {:.1} s | ≤ {:.0} s, lease_for is {:.0} s |\n\
             | distinct messages delivered | {} | {total} |\n\
             | duplicates | {duplicates} ({:.2} %) | < 1 % |",
            SHARDS / 2,
            take_over.as_secs_f64(),
            take_over_limit.as_secs_f64(),
            SHARD_LEASE.as_secs_f64(),
            all_delivered.as_secs_f64(),
            limit.as_secs_f64(),
            lease_for.as_secs_f64(),
            d.len(),
            100.0 * duplicates as f64 / total as f64,
        ),
    );
    assert!(victim_delivered > 0, "the victim was delivering when it was killed");
    assert_eq!(victim_shards, SHARDS / 2);
    assert!(recovered > 0, "the victim had leased messages when it was killed, and the survivor recovered them");
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
    let c = start_cluster(&peers, 1, 1, &NodeSpec::default());
    let (mut client, lines) = inject_spawn(
        &["http", "--host", &c.edges[0].http_base(), "--key", API_KEY],
        &http_requests(400, 5, "osd"),
    );
    let mut acked = Vec::new();
    let mut failed = Vec::new();
    let mut osd: Option<DownOsd> = None;
    let (mut acked_at_kill, mut acked_at_restart) = (0, 0);
    for line in lines.iter() {
        if let Some(rest) = line.strip_prefix("ACK ") {
            acked.push(rest.split(' ').next().unwrap().parse::<usize>().unwrap());
        } else {
            failed.push(line.clone());
        }
        if acked.len() == 80 && osd.is_none() {
            osd = Some(DownOsd::kill("1", "KILL"));
            acked_at_kill = acked.len();
        }
        if acked.len() == 240 {
            if let Some(o) = osd.as_mut().filter(|o| !o.up) {
                o.restart();
                acked_at_restart = acked.len();
            }
        }
    }
    let _ = client.wait();
    assert!(osd.as_ref().is_some_and(|o| o.up), "injection ended early: {} acknowledged, failures: {failed:?}", acked.len());
    // every personalization of every acknowledged request must arrive
    let expected: Vec<String> = acked.iter().flat_map(|i| (0..5).map(move |j| format!("osd-{i}-{j}@gmail.test"))).collect();
    let start = Instant::now();
    let delivered = loop {
        let rcpts: HashMap<String, usize> = peers.sink.messages().iter().flat_map(|m| m.rcpt_to.clone()).fold(HashMap::new(), |mut m, r| {
            *m.entry(r).or_insert(0) += 1;
            m
        });
        if expected.iter().all(|r| rcpts.contains_key(r)) || start.elapsed() > Duration::from_secs(300) {
            break rcpts;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let missing = expected.iter().filter(|r| !delivered.contains_key(*r)).count();
    let duplicates: usize = delivered.values().map(|n| n - 1).sum();
    report(
        "an OSD killed with SIGKILL during injection",
        format!(
            "| measurement | value | asserted |\n|---|---|---|\n\
             | HTTP requests sent (5 recipients each, SendGrid SDK, one at a time) | 400 | |\n\
             | acknowledged (202) | {} ({} recipients); OSD killed after {acked_at_kill}, restarted after {acked_at_restart} | |\n\
             | refused while degraded (503 or connection error) | {} | |\n\
             | distinct recipients delivered | {} | every acknowledged one |\n\
             | acknowledged recipients never delivered (lost) | {missing} | 0 |\n\
             | duplicates | {duplicates} | |",
            acked.len(),
            expected.len(),
            failed.len(),
            delivered.len(),
        ),
    );
    assert_eq!(missing, 0, "{missing} acknowledged recipients never delivered");
    cluster_script(&["wait"]);
    for n in c.edges.into_iter().chain(c.mtas) {
        assert!(n.stop());
    }
}

/// One HTTP request and one SMTP message to `edge`: (HTTP answer, its time, SMTP answer, its time).
fn try_both(edge: &Sluice, tag: &str) -> (String, Duration, String, Duration) {
    let started = Instant::now();
    let http = inject(&["http", "--host", &edge.http_base(), "--key", API_KEY], &http_requests(1, 1, tag)).remove(0);
    let http_took = started.elapsed();
    let started = Instant::now();
    let smtp = inject(
        &["smtp", "--port", &edge.smtp.port().to_string()],
        &json!([{"from": "a@sender.test", "to": [format!("{tag}@gmail.test")], "data": "Subject: x\r\n\r\nx\r\n"}]),
    )
    .remove(0);
    (http, http_took, smtp, started.elapsed())
}

/// An inject.py answer for the report: `ERR <i> <status> <JSON body>` as the status and the
/// error message of the body.
fn shown(answer: &str) -> String {
    let mut parts = answer.splitn(4, ' ');
    let (kind, _, status, body) = (parts.next(), parts.next(), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    match serde_json::from_str::<serde_json::Value>(body) {
        Ok(v) => format!("{} {status}: {}", kind.unwrap_or(""), v["errors"][0]["message"].as_str().unwrap_or(body)),
        Err(_) => answer.to_string(),
    }
}

/// Asserts a refusal of both protocols, each within the op timeout plus the margin, with a
/// clear error; returns a report line.
fn assert_refused(what: &str, answers: &(String, Duration, String, Duration)) -> String {
    let (http, http_took, smtp, smtp_took) = answers;
    let limit = OP_TIMEOUT + REFUSAL_MARGIN;
    let line = format!(
        "| {what} | HTTP `{}` after {:.1} s; SMTP `{}` after {:.1} s | 503 and 451, each ≤ {:.0} s (op_timeout {:.0} s + {:.0} s) |",
        shown(http),
        http_took.as_secs_f64(),
        smtp,
        smtp_took.as_secs_f64(),
        limit.as_secs_f64(),
        OP_TIMEOUT.as_secs_f64(),
        REFUSAL_MARGIN.as_secs_f64(),
    );
    eprintln!("{line}");
    assert!(http.starts_with("ERR 0 503") && http.contains("temporarily unavailable"), "HTTP 503 with a clear error: {http}");
    assert!(smtp.starts_with("ERR 0 451"), "SMTP 451: {smtp}");
    assert!(*http_took < limit, "HTTP refused after {http_took:?}, not within {limit:?}");
    assert!(*smtp_took < limit, "SMTP refused after {smtp_took:?}, not within {limit:?}");
    line
}

/// Retries both protocols until both accept again; returns how long that took.
async fn wait_resumed(edge: &Sluice, tag: &str) -> Duration {
    let start = Instant::now();
    loop {
        let (http, _, smtp, _) = try_both(edge, tag);
        if http.starts_with("ACK") && smtp.starts_with("ACK") {
            return start.elapsed();
        }
        assert!(start.elapsed() < Duration::from_secs(120), "edge did not resume by itself: HTTP {http}; SMTP {smtp}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_answer_503_and_451_when_pgs_are_below_min_size_then_recover() {
    let _serial = SERIAL.lock().await;
    let peers = Peers::start(SinkConfig::default()).await;
    let c = start_cluster(&peers, 1, 0, &NodeSpec::default());
    let edge = &c.edges[0];
    let ok = try_both(edge, "before");
    assert!(ok.0.starts_with("ACK") && ok.2.starts_with("ACK"), "{ok:?}");
    // Two of three OSDs hang: every PG drops below min_size and writes cannot complete.
    let mut osds = [DownOsd::kill("1", "STOP"), DownOsd::kill("2", "STOP")];
    let refused = try_both(edge, "degraded");
    let second = try_both(edge, "degraded-again");
    for o in &mut osds {
        o.restart();
    }
    let resumed = wait_resumed(edge, "after").await;
    report(
        "too few OSDs (2 of 3 hung with SIGSTOP)",
        format!(
            "| case | answers | asserted |\n|---|---|---|\n{}\n{}\n| OSDs continued | both accept again {:.1} s later | ≤ 120 s |",
            assert_refused("first try", &refused),
            assert_refused("second try", &second),
            resumed.as_secs_f64()
        ),
    );
    cluster_script(&["wait"]);
    for n in c.edges.into_iter().chain(c.mtas) {
        assert!(n.stop());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edges_answer_503_and_451_when_the_pool_is_full_then_recover() {
    let _serial = SERIAL.lock().await;
    let pool = TempPool::create(format!("sluice-e2e-full-{}", std::process::id()));
    let peers = Peers::start(SinkConfig::default()).await;
    let c = start_cluster(&peers, 1, 0, &NodeSpec { pool: pool.0.clone(), ..Default::default() });
    let edge = &c.edges[0];
    let ok = try_both(edge, "before");
    assert!(ok.0.starts_with("ACK") && ok.2.starts_with("ACK"), "{ok:?}");
    // A quota below what the pool holds (sluice.meta and the index shards written so far):
    // the cluster flags the pool full (POOL_FULL) once the mgr reports its stats. Bodies are
    // inline in omap entries, which a max_bytes quota would not see.
    ceph(&["osd", "pool", "set-quota", &pool.0, "max_objects", "1"]);
    let flagged = wait_for("the pool to be flagged full", Duration::from_secs(60), || {
        let out = Command::new("ceph").arg("-c").arg(ceph_conf()).args(["osd", "pool", "ls", "detail"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).lines().any(|l| l.contains(&format!("'{}'", pool.0)) && l.contains("full_quota"))
    })
    .await;
    let refused = try_both(edge, "full");
    let second = try_both(edge, "full-again");
    ceph(&["osd", "pool", "set-quota", &pool.0, "max_objects", "0"]);
    let resumed = wait_resumed(edge, "after").await;
    report(
        "a full pool (quota max_objects 1)",
        format!(
            "| case | answers | asserted |\n|---|---|---|\n| quota set | pool flagged full_quota {:.1} s later | |\n{}\n{}\n| quota lifted | both accept again {:.1} s later | ≤ 120 s |",
            flagged.as_secs_f64(),
            assert_refused("first try", &refused),
            assert_refused("second try", &second),
            resumed.as_secs_f64()
        ),
    );
    for n in c.edges.into_iter().chain(c.mtas) {
        assert!(n.stop());
    }
}

/// Runs `sluice` to its exit, or kills it after `limit` (a node that should have refused to
/// start, but runs).
fn run_to_exit(args: &[&str], limit: Duration) -> std::process::Output {
    let mut child = Command::new(binary()).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("sluice {args:?} still running after {limit:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_runs_with_one_flag_naming_the_pool_and_conf() {
    let _serial = SERIAL.lock().await;
    let peers = Peers::start(SinkConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    // The file says nothing about the spool; `--spool` alone makes this a RADOS MTA.
    let path = dir.path().join("sluice.toml");
    std::fs::write(&path, config_with(dir.path(), &peers, "role = \"mta\"", "", "")).unwrap();
    let url = format!("rados://{}?conf={}&namespace={}", ceph_pool(), ceph_conf(), new_namespace());
    let mut child = Command::new(binary())
        .args(["serve", "--config"])
        .arg(&path)
        .args(["--spool", &url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    for stream in [Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>, Box::new(child.stderr.take().unwrap())] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(std::io::BufReader::new(stream)).map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    drop(tx);
    let mut seen = Vec::new();
    let admin: SocketAddr = loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => {
                if let Some(a) = line.strip_prefix("sluice: ready (").and_then(|r| r.trim_end_matches(')').split(' ').find_map(|kv| kv.strip_prefix("admin="))) {
                    break a.parse().unwrap();
                }
                seen.push(line);
            }
            Err(_) => {
                let _ = child.kill();
                panic!("sluice --spool {url} did not get ready:\n{}", seen.join("\n"));
            }
        }
    };
    // a lone MTA on a fresh namespace owns every shard of the pool the flag named
    let start = Instant::now();
    while metric_at(admin, "sluice_spool_shards_owned") as u32 != 16 {
        assert!(start.elapsed() < Duration::from_secs(30), "the node does not own the shards: {}", http_get(admin, "/metrics"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(http_get(admin, "/admin/spool").contains("\"queued\":0"));
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");

    // A ceph.conf without the RADOS backend is a config error, not a node on a local spool.
    let stray = dir.path().join("stray.toml");
    std::fs::write(&stray, format!("data_dir = \"{}\"\n[spool.rados]\nconf = \"{}\"\n", dir.path().display(), ceph_conf())).unwrap();
    let out = run_to_exit(&["serve", "--config", stray.to_str().unwrap()], Duration::from_secs(30));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("spool.rados.conf") && err.contains("spool.backend"), "{err}");
    // A flag without a conf names the flag.
    let out = run_to_exit(&["serve", "--config", stray.to_str().unwrap(), "--spool", "rados://sluice"], Duration::from_secs(30));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--spool") && err.contains("conf"), "{err}");
}
