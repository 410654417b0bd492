//! Traffic shaping of a running `sluice serve`, as an operator uses it: `sluice shaping
//! explain` (live and offline), `status`, `suspend` and `resume` of a source, `reload` (a broken
//! file is refused and the old data stays; SIGHUP reloads too), `check`, the admin API's
//! answers to bad requests, and the per-provider metrics.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_load::sink::SinkConfig;
use support::*;

fn sluice(args: &[&str]) -> (bool, String) {
    let out = Command::new(binary()).args(args).output().expect("run sluice");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// An HTTP/1.1 request to the admin listener; returns (status, body).
async fn admin(s: &Sluice, method: &str, path: &str, body: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(s.admin).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    c.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(60), c.read_to_string(&mut out)).await.expect("admin answers").unwrap();
    let status = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

fn json_of(body: &str) -> Value {
    // axum answers with a plain body here (Connection: close, no chunking).
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

async fn version(s: &Sluice) -> String {
    let (status, body) = admin(s, "GET", "/admin/shaping", "").await;
    assert_eq!(status, 200, "{body}");
    json_of(&body)["version"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_explain_suspend_resume_and_reload_shaping_of_a_running_server() {
    let peers = Peers::start(SinkConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let shaping = dir.path().join("shaping.toml");
    std::fs::write(&shaping, "[default]\nmax_connections = 2\n\n[provider.google]\nmax_connections = 7\n").unwrap();
    let config_text = config(dir.path(), &peers, &format!("\n[mta.shaping]\nfiles = [\"@default\", \"{}\"]\n", shaping.display()));
    let s = Sluice::start_with(dir.path(), &config_text);
    let config_file = dir.path().join("sluice.toml");
    let config_path = config_file.to_str().unwrap();
    let addr = s.admin.to_string();

    let (ok, out) = sluice(&["shaping", "check", "-c", config_path]);
    assert!(ok && out.contains("shaping data ok") && out.contains("egress sources: default"), "{out}");

    // A domain no provider claims: its own path, with the [default] level of our file.
    let (ok, out) = sluice(&["shaping", "explain", "gmail.test", "--admin", &addr]);
    assert!(ok, "{out}");
    assert!(out.contains("gmail.test: no provider claims it (MX mx.sink.test)"), "{out}");
    assert!(out.contains("max_connections                  2            from [default]"), "{out}");
    assert!(out.contains("max_messages_per_connection      100          from [mta]"), "{out}");

    // A Google domain, worked out from the config alone (no server, no DNS).
    let (ok, out) = sluice(&["shaping", "explain", "gmail.com", "--offline", "--mx", "gmail-smtp-in.l.google.com", "-c", config_path]);
    assert!(ok, "{out}");
    assert!(out.contains("gmail.com: provider google (MX gmail-smtp-in.l.google.com); egress pool default"), "{out}");
    assert!(out.contains("max_connections                  7            from [provider.google]"), "{out}");
    assert!(out.contains("tls                              required     from [provider.google]"), "{out}");

    // Suspend the one source: mail is accepted and held, not sent, not bounced.
    let (ok, out) = sluice(&["shaping", "suspend", "--source", "default", "--for", "1h", "--reason", "e2e maintenance", "--admin", &addr]);
    assert!(ok && out.contains("paths first used later are suspended too"), "{out}");
    let msgs = json!([{ "from": "sender@origin.test", "to": ["held@gmail.test"], "data": "Subject: held\r\n\r\nwait for it\r\n" }]);
    let out = inject(&["smtp", "--port", &s.smtp.port().to_string()], &msgs);
    assert!(out[0].starts_with("ACK 0"), "{out:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(peers.sink.stats().messages, 0, "nothing is sent while the source is suspended");
    let (ok, out) = sluice(&["shaping", "status", "--admin", &addr]);
    assert!(ok, "{out}");
    let line = out.lines().find(|l| l.starts_with("gmail.test")).unwrap_or_else(|| panic!("a gmail.test path in:\n{out}"));
    assert!(line.contains("SUSPENDED until") && line.contains("by admin (e2e maintenance)"), "{line}");

    let (ok, out) = sluice(&["shaping", "resume", "--source", "default", "--admin", &addr]);
    assert!(ok && out.contains("resumed 1 path(s)"), "{out}");
    assert!(peers.sink.wait_for_messages(1, Duration::from_secs(30)).await, "a resume sends the held mail");
    assert_eq!(count(&s.events(), "bounce"), 0);

    // Bad requests change nothing and say why.
    let (status, body) = admin(&s, "POST", "/admin/shaping/suspend", r#"{"provider": "google", "duration": "soon"}"#).await;
    assert_eq!(status, 400);
    assert!(json_of(&body)["error"].as_str().unwrap().contains("duration \"soon\""), "{body}");
    let (status, body) = admin(&s, "POST", "/admin/shaping/suspend", r#"{"duration": "1h"}"#).await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = admin(&s, "POST", "/admin/shaping/suspend", "not json").await;
    assert_eq!(status, 400);
    let (status, _) = admin(&s, "GET", "/admin/shaping/explain?domain=a%20b", "").await;
    assert_eq!(status, 400);
    let (ok, out) = sluice(&["shaping", "suspend", "--for", "1h", "--admin", &addr]);
    assert!(!ok && out.contains("name --provider, --source, or both"), "{out}");

    // A broken file is refused and the old data stays; a fixed one goes live; SIGHUP too.
    let before = version(&s).await;
    std::fs::write(&shaping, "[provider.nosuch]\nmax_connections = 1\n").unwrap();
    let (ok, out) = sluice(&["shaping", "reload", "--admin", &addr]);
    assert!(!ok && out.contains("[provider.nosuch]: the rules data defines no provider"), "{out}");
    assert_eq!(version(&s).await, before, "the old data keeps serving");
    std::fs::write(&shaping, "[default]\nmax_connections = 3\n").unwrap();
    let (ok, out) = sluice(&["shaping", "reload", "--admin", &addr]);
    assert!(ok && out.contains("shaping data reloaded"), "{out}");
    let after_cli = version(&s).await;
    assert_ne!(after_cli, before);
    let (_, out) = sluice(&["shaping", "explain", "gmail.test", "--admin", &addr]);
    assert!(out.contains("max_connections                  3            from [default]"), "{out}");
    std::fs::write(&shaping, "[default]\nmax_connections = 4\n").unwrap();
    unsafe { libc::kill(s.pid(), libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(30);
    while version(&s).await == after_cli {
        assert!(Instant::now() < deadline, "SIGHUP reloads the shaping data");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Per-provider metrics.
    tokio::time::sleep(Duration::from_millis(1500)).await; // one sweep updates the gauges
    let (_, metrics) = admin(&s, "GET", "/metrics", "").await;
    for want in [
        "sluice_provider_recipients_total{provider=\"other\",outcome=\"delivered\"} 1",
        "sluice_shaping_connections{provider=\"other\",source=\"default\"}",
        "sluice_shaping_suspended{provider=\"other\",source=\"default\"} 0",
    ] {
        assert!(metrics.contains(want), "missing {want:?} in /metrics:\n{metrics}");
    }
    assert!(s.stop(), "sluice exits cleanly");

    // An edge-only node has no shaping and says so.
    let edge_dir = tempfile::tempdir().unwrap();
    let edge = Sluice::start_with(edge_dir.path(), &config_with(edge_dir.path(), &peers, "role = \"edge\"", "", ""));
    let (status, body) = admin(&edge, "GET", "/admin/shaping", "").await;
    assert_eq!(status, 404);
    assert!(body.contains("this node runs no MTA"), "{body}");
    assert!(edge.stop());
}
