//! The process as operators see it: bad config refuses to start and says why; SIGTERM stops
//! cleanly; queued mail survives a restart; kill -9 loses nothing that was acknowledged.

mod support;

use std::collections::{HashMap, HashSet};
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
fn the_annotated_example_config_is_valid() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/sluice.example.toml");
    let out = Command::new(binary()).args(["config", "check", example]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
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
