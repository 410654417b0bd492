//! The process as operators see it: bad config refuses to start and says why; SIGTERM stops
//! cleanly; queued mail survives a restart; kill -9 loses nothing that was acknowledged.

mod support;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use sluice_load::sink::SinkConfig;
use support::*;

fn check(config_text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, config_text).unwrap();
    let out = Command::new(binary()).args(["config", "check"]).arg(&path).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_config_refuses_to_start_and_names_the_key() {
    let cases = [
        ("[http]\nlisten2 = \"127.0.0.1:1\"\n", "unknown field `listen2`"),
        ("[smtp]\nmax_message_bytes = 10\n", "smtp.max_message_bytes"),
        ("[mta]\nlease_for = \"1s\"\n", "mta.lease_for"),
        ("[mta.retry]\nfactor = 0.5\n", "mta.retry.factor"),
        ("[[api_keys]]\nname = \"x\"\nsha256 = \"SG.clear-text-key\"\n", "api_keys[0].sha256"),
        ("[spool]\nbackend = \"rados\"\n", "spool.rados.conf"),
        ("[smtp]\nrelay_networks = [\"0.0.0.0/0\"]\n", "smtp.relay_networks"),
        ("data_dir = 5\n", "data_dir"),
    ];
    for (text, expect) in cases {
        let (ok, err) = check(text);
        assert!(!ok, "accepted a bad config: {text}");
        assert!(err.contains(expect), "error for {text:?} should mention {expect:?}: {err}");
    }
    // `serve` refuses the same way, before binding anything
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[mta]\nlease_for = \"1s\"\n").unwrap();
    let out = Command::new(binary()).args(["serve", "--config"]).arg(&path).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("mta.lease_for"));
}

#[test]
fn the_annotated_example_config_and_the_container_configs_are_valid() {
    for file in ["docs/sluice.example.toml", "docker/sluice.toml", "docker/sluice-rados.toml"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
        let out = Command::new(binary()).args(["config", "check"]).arg(&path).output().unwrap();
        assert!(out.status.success(), "{file}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn apikey_new_prints_a_key_and_its_config_hash() {
    let out = Command::new(binary()).args(["apikey", "new", "--name", "billing"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let key = text.lines().find_map(|l| l.strip_prefix("API key (shown once, store it safely): ")).unwrap();
    assert!(key.starts_with("SG."));
    assert!(text.contains(&format!("sha256 = \"{}\"", sluice_edge::auth::hash_key(key))));
    assert!(text.contains("name = \"billing\""));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_mail_survives_a_restart() {
    let peers = Peers::start(SinkConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    // First run: the MX port is closed, so everything is deferred and stays queued.
    let closed = config(dir.path(), &peers, "").replace(&format!("port = {}", peers.sink.addr().port()), &format!("port = {}", free_port()));
    let s = Sluice::start_with(dir.path(), &closed);
    let msgs: Vec<_> = (0..20)
        .map(|i| json!({"from": "app@sender.test", "to": [format!("user{i}@gmail.test")], "data": format!("Subject: restart-{i}\r\n\r\nbody {i}\r\n")}))
        .collect();
    let out = inject(&["smtp", "--port", &s.smtp.port().to_string()], &json!(msgs));
    assert_eq!(out.iter().filter(|l| l.starts_with("ACK")).count(), 20, "{out:?}");
    wait_events(&s, "a deferral per message", |e| count(e, "deferred") >= 20).await;
    assert!(s.stop(), "clean exit on SIGTERM");
    assert_eq!(peers.sink.stats().messages, 0);

    // Second run, MX reachable: the queued mail goes out, each message once.
    let s = Sluice::start_with(dir.path(), &config(dir.path(), &peers, ""));
    assert!(peers.sink.wait_for_messages(20, Duration::from_secs(60)).await, "queued mail delivered after restart");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let subjects: HashSet<String> = peers
        .sink
        .messages()
        .iter()
        .map(|m| String::from_utf8_lossy(&m.data).lines().find(|l| l.starts_with("Subject: ")).unwrap().to_string())
        .collect();
    assert_eq!(subjects.len(), 20);
    assert_eq!(peers.sink.stats().messages, 20, "no duplicates");
    assert!(s.stop());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_injection_loses_nothing_that_was_acknowledged() {
    let peers = Peers::start(SinkConfig { record_messages: true, ..Default::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    let s = Sluice::start_with(dir.path(), &config(dir.path(), &peers, ""));
    let requests: Vec<_> = (0..3000)
        .map(|i| {
            json!({
                "personalizations": [{"to": [{"email": format!("r{i}@gmail.test")}]}],
                "from": {"email": "app@sender.test"},
                "subject": format!("ledger-{i}"),
                "content": [{"type": "text/plain", "value": "x"}]
            })
        })
        .collect();
    let (mut client, lines) =
        inject_spawn(&["http", "--host", &s.http_base(), "--key", API_KEY, "--stop-on-connection-error"], &json!(requests));
    // Kill sluice without warning once it has acknowledged a good number of requests.
    let mut acked: HashSet<usize> = HashSet::new();
    let start = Instant::now();
    while acked.len() < 150 {
        let line = lines.recv_timeout(Duration::from_secs(60)).expect("injection stalled");
        if let Some(rest) = line.strip_prefix("ACK ") {
            acked.insert(rest.split(' ').next().unwrap().parse().unwrap());
        }
        assert!(start.elapsed() < Duration::from_secs(120));
    }
    s.kill9();
    let _ = client.wait();
    for line in lines.try_iter() {
        if let Some(rest) = line.strip_prefix("ACK ") {
            acked.insert(rest.split(' ').next().unwrap().parse().unwrap());
        }
    }

    let s = Sluice::start_with(dir.path(), &config(dir.path(), &peers, ""));
    let received = |peers: &Peers| -> HashMap<usize, usize> {
        let mut seen = HashMap::new();
        for m in peers.sink.messages() {
            let text = String::from_utf8_lossy(&m.data).into_owned();
            if let Some(n) = text.lines().find_map(|l| l.strip_prefix("Subject: ledger-")) {
                *seen.entry(n.trim().parse::<usize>().unwrap()).or_insert(0) += 1;
            }
        }
        seen
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let seen = received(&peers);
        let missing: Vec<_> = acked.iter().filter(|i| !seen.contains_key(i)).collect();
        if missing.is_empty() {
            let duplicates: usize = seen.values().map(|n| n - 1).sum();
            eprintln!(
                "kill -9 ledger: {} acknowledged, {} delivered, {} duplicates, 0 missing",
                acked.len(),
                seen.len(),
                duplicates
            );
            break;
        }
        assert!(Instant::now() < deadline, "{} acknowledged messages never delivered: {:?}", missing.len(), &missing[..missing.len().min(10)]);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(s.stop());
}

/// A supervisor may stop a node the moment it said it is ready: the signal handler is in
/// place before the ready line, so that is a clean shutdown too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_right_after_ready_is_a_clean_shutdown() {
    let peers = Peers::start(SinkConfig::default()).await;
    for _ in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let s = Sluice::start_with(dir.path(), &config(dir.path(), &peers, ""));
        assert!(s.stop(), "exit status 0 after an immediate SIGTERM");
    }
}

/// The README's quick start: `sluice serve` with no config file at all, in an empty working
/// directory. It uses the documented defaults (HTTP 127.0.0.1:8025, SMTP 127.0.0.1:2525,
/// admin 127.0.0.1:9025, data in ./sluice-data), so it needs those ports free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_config_serve_accepts_mail_with_the_quick_start_key() {
    for (port, what) in [(8025, "HTTP"), (2525, "SMTP"), (9025, "admin")] {
        if let Err(e) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            panic!(
                "this test runs `sluice serve` with its default ports, and 127.0.0.1:{port} ({what}) is taken ({e}): \
                 stop whatever listens there (another sluice?) and run it again"
            );
        }
    }
    let cwd = tempfile::tempdir().unwrap();
    let s = Sluice::start_zero_config(cwd.path());
    assert_eq!((s.http.port(), s.smtp.port(), s.admin.port()), (8025, 2525, 9025), "the documented default ports");
    assert!(s.http.ip().is_loopback() && s.smtp.ip().is_loopback() && s.admin.ip().is_loopback());

    let key_file = cwd.path().join("sluice-data/quickstart-api-key");
    let key = std::fs::read_to_string(&key_file).expect("quick-start key written to ./sluice-data").trim().to_string();
    assert!(key.starts_with("SG."), "{key}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777, 0o600);

    // `.invalid` (RFC 2606) can never resolve, so the MTA of this zero-config process, which
    // uses the system resolver, cannot deliver it anywhere.
    let request = json!({
        "personalizations": [{"to": [{"email": "someone@quickstart.invalid"}]}],
        "from": {"email": "me@example.org"}, "subject": "hello",
        "content": [{"type": "text/plain", "value": "hi"}]
    });
    let out = inject(&["http", "--host", "http://127.0.0.1:8025", "--key", &key], &json!([request]));
    assert!(out[0].starts_with("ACK 0 "), "{out:?}");
    let out = inject(&["http", "--host", "http://127.0.0.1:8025", "--key", "SG.not-the-key"], &json!([request]));
    assert!(out[0].starts_with("ERR 0 401"), "{out:?}");
    // Spooled: `processed` is written only once the message is durable.
    let events = wait_events(&s, "processed", |e| count(e, "processed") == 1).await;
    let processed = events.iter().find(|e| e["event"] == "processed").unwrap();
    assert_eq!(processed["email"], "someone@quickstart.invalid");
    assert!(cwd.path().join("sluice-data/spool").is_dir(), "the spool lives in ./sluice-data");
    assert!(s.stop(), "clean exit on SIGTERM");
}

/// `--role edge` accepts and spools but never delivers; `--role mta` on the same spool
/// delivers it and opens neither the HTTP nor the SMTP listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_and_mta_roles_split_accepting_from_delivering() {
    let peers = Peers::start(SinkConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let edge = Sluice::start_with_args(dir.path(), &config(dir.path(), &peers, ""), &["--role", "edge"]);
    let msgs = json!([{"from": "app@sender.test", "to": ["user@gmail.test"], "data": "Subject: roles\r\n\r\nbody\r\n"}]);
    let out = inject(&["smtp", "--port", &edge.smtp.port().to_string()], &msgs);
    assert_eq!(out, ["ACK 0 {}"]);
    wait_events(&edge, "processed", |e| count(e, "processed") == 1).await;
    // Time for a delivery that must not happen (the sink is a working MX for gmail.test).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spool: serde_json::Value = serde_json::from_str(&admin_get(&edge, "/admin/spool").await).unwrap();
    assert_eq!((spool["queued"].as_u64(), spool["leased"].as_u64()), (Some(1), Some(0)), "{spool}");
    assert_eq!(peers.sink.stats().connections, 0, "an edge never connects to an MX");
    assert_eq!(count(&edge.events(), "delivered") + count(&edge.events(), "deferred"), 0);
    assert!(edge.stop());

    // The MTA role, with HTTP and SMTP listen addresses it must not open.
    let (http_port, smtp_port) = (free_port(), free_port());
    let text = config(dir.path(), &peers, "")
        .replace("[http]\nlisten = \"127.0.0.1:0\"", &format!("[http]\nlisten = \"127.0.0.1:{http_port}\""))
        .replace("[smtp]\nlisten = \"127.0.0.1:0\"", &format!("[smtp]\nlisten = \"127.0.0.1:{smtp_port}\""));
    assert!(text.contains(&format!("127.0.0.1:{http_port}")) && text.contains(&format!("127.0.0.1:{smtp_port}")));
    let mta = Sluice::start_with_args(dir.path(), &text, &["--role", "mta"]);
    assert!(peers.sink.wait_for_messages(1, Duration::from_secs(60)).await, "the MTA delivers what the edge queued");
    assert_eq!(peers.sink.messages()[0].rcpt_to, ["user@gmail.test"]);
    for port in [http_port, smtp_port] {
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "an MTA-only node listens on {port}");
    }
    assert_eq!(mta.http.port(), 0, "no HTTP listener in the ready line");
    assert_eq!(mta.smtp.port(), 0, "no SMTP listener in the ready line");
    assert!(admin_get(&mta, "/healthz").await.contains("ok"), "the admin listener runs on every role");
    wait_events(&mta, "delivered", |e| count(e, "delivered") == 1).await;
    assert!(mta.stop());
}
