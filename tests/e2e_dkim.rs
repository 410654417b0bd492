//! DKIM end to end through the real binary: keys made with `sluice dkim keygen`, published
//! in the test DNS server, mail injected with the SendGrid SDK and smtplib, and the message
//! as the MX received it verified by dkimpy. Mail no key can sign is refused at ingestion.

mod support;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;
use sluice_load::sink::SinkConfig;
use support::*;

/// Runs `sluice dkim keygen`, publishes the record it prints, returns the config lines.
fn keygen(dir: &Path, peers: &Peers, domain: &str, selector: &str, ed25519: bool) -> String {
    let mut cmd = Command::new(binary());
    cmd.args(["dkim", "keygen", "--domain", domain, "--selector", selector, "--out"]).arg(dir);
    if ed25519 {
        cmd.arg("--ed25519");
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "keygen: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let field = |prefix: &str| text.lines().find_map(|l| l.trim().strip_prefix(prefix)).unwrap_or_else(|| panic!("{prefix} in {text}"));
    peers.dns.add_txt(field("name:").trim(), field("value:").trim()).unwrap();
    let config = &text[text.find("[[dkim.keys]]").expect("config lines")..];
    let key_file = dir.join(format!("{selector}._domainkey.{domain}.pem"));
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key_file).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the key file is private");
    config.to_string()
}

fn dkimpy(message: &[u8], peers: &Peers) -> Vec<String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/dkim_verify.py");
    let mut child = Command::new("python3")
        .arg(script)
        .args(["--dns", &peers.dns.addr().to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(message).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "dkim_verify.py (needs dkimpy, dnspython, pynacl: scripts/test.sh): {}", String::from_utf8_lossy(&out.stderr));
    let mut lines: Vec<String> = String::from_utf8(out.stdout).unwrap().lines().map(String::from).collect();
    lines.sort();
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_and_smtp_mail_is_dual_signed_and_unsignable_mail_is_refused() {
    let peers = Peers::start(SinkConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let mut extra = String::from("\n[dkim]\nfallback = \"refuse\"\nmax_parallel_signing = 2\n\n");
    extra.push_str(&keygen(&keys, &peers, "sender.test", "rsa2026", false));
    extra.push('\n');
    extra.push_str(&keygen(&keys, &peers, "sender.test", "ed2026", true));
    let s = Sluice::start_with(dir.path(), &config(dir.path(), &peers, &extra));

    let request = |from: &str, to: &str| {
        json!({
            "personalizations": [{"to": [{"email": to}]}],
            "from": {"email": from, "name": "News"},
            "reply_to": {"email": "help@sender.test"},
            "subject": "Signed by sluice",
            "content": [{"type": "text/plain", "value": "Hello from the SDK."}, {"type": "text/html", "value": "<p>Hello</p>"}],
            "headers": {"List-Unsubscribe": "<mailto:unsub@sender.test>", "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}
        })
    };
    let out = inject(
        &["http", "--host", &s.http_base(), "--key", API_KEY],
        &json!([request("news@sender.test", "alice@gmail.test"), request("news@nokey.test", "bob@gmail.test")]),
    );
    assert!(out[0].starts_with("ACK 0 "), "{out:?}");
    let refused = out[1].strip_prefix("ERR 1 400 ").unwrap_or_else(|| panic!("refused with 400: {out:?}"));
    let body: serde_json::Value = serde_json::from_str(refused).unwrap();
    assert_eq!(body["errors"][0]["field"], "from.email");
    assert!(body["errors"][0]["message"].as_str().unwrap().contains("nokey.test has no DKIM signing key"), "{body}");

    let smtp = json!([
        {"from": "app@sender.test", "to": ["carol@yahoo.test"],
         "data": "From: App <app@sender.test>\r\nTo: carol@yahoo.test\r\nSubject: via smtplib\r\n\r\n.dot line\r\nbody\r\n"},
        {"from": "app@nokey.test", "to": ["dave@yahoo.test"],
         "data": "From: app@nokey.test\r\nTo: dave@yahoo.test\r\nSubject: unsignable\r\n\r\nbody\r\n"}
    ]);
    let out = inject(&["smtp", "--port", &s.smtp.port().to_string()], &smtp);
    assert_eq!(out[0], "ACK 0 {}");
    assert!(out[1].starts_with("ERR 1 550 5.7.1 "), "{out:?}");

    assert!(peers.sink.wait_for_messages(2, Duration::from_secs(60)).await);
    let msgs = peers.sink.messages();
    assert_eq!(msgs.len(), 2, "only the signable mail was delivered");
    for m in &msgs {
        assert_eq!(
            dkimpy(&m.data, &peers),
            ["pass d=sender.test s=ed2026 a=ed25519-sha256", "pass d=sender.test s=rsa2026 a=rsa-sha256"],
            "{}",
            String::from_utf8_lossy(&m.data)
        );
        // Changed in transit: every signature breaks.
        let altered = String::from_utf8_lossy(&m.data).replacen("Subject: ", "Subject: [changed] ", 1);
        assert!(dkimpy(altered.as_bytes(), &peers).iter().all(|v| v.starts_with("fail ")));
    }
    let ev = wait_events(&s, "2 delivered", |e| count(e, "delivered") == 2).await;
    assert_eq!(count(&ev, "processed"), 2, "refused mail was never accepted: {ev:#?}");
    assert!(s.stop());
}

#[test]
fn config_check_reads_the_key_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.toml");
    let missing = dir.path().join("missing.pem");
    std::fs::write(
        &path,
        format!("[[dkim.keys]]\ndomain = \"example.com\"\nselector = \"s1\"\nprivate_key = {:?}\n", missing.display().to_string()),
    )
    .unwrap();
    let out = Command::new(binary()).args(["config", "check"]).arg(&path).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("dkim.keys[0].private_key") && err.contains("missing.pem"), "{err}");

    std::fs::write(&path, "[dkim]\nfallback = \"platform\"\n").unwrap();
    let out = Command::new(binary()).args(["config", "check"]).arg(&path).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("dkim.fallback"), "{}", String::from_utf8_lossy(&out.stderr));
}
