//! The rules engine end to end: the consultants' CLI on real files, hot reload of a running
//! `sluice serve` (admin API, SIGHUP; a broken table keeps the old one serving), the table
//! version and hit counters in events and /metrics, and suppression (bounce → suppressed →
//! the next send is dropped at the edge with a `dropped` event).

mod support;

use std::path::Path;
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

fn corpus() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/replies.tsv").display().to_string()
}

const LOCAL_RULE: &str = r#"
[[rule]]
id = "local.user_gone"
description = "Our own MX says 'gone away' for closed accounts (seen in our logs)."
code = "550"
text = "gone away"
classification = "Invalid Address"
reason = "user_gone"
disposition = "bounce"
suppress = true
examples = ["550 5.1.1 this user has gone away"]
"#;

#[test]
fn check_accepts_the_default_table_and_reports_problems_with_file_and_line() {
    let (ok, out) = sluice(&["rules", "check"]);
    assert!(ok, "{out}");
    assert!(out.contains("examples: all classify to their own rule") && out.contains("shadowed rules: none"), "{out}");

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[[rule]]\nid = \"x\"\ndescription = \"d\"\ncode = \"550\"\ntext = \"(broken\"\nclassification = \"Content\"\nreason = \"x\"\nexamples = [\"550 x\"]\n").unwrap();
    let (ok, out) = sluice(&["rules", "check", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(out.contains(&format!("{}:5: rule \"x\": text is not a valid regular expression", bad.display())), "{out}");

    // a local rule placed after a broader default rule can never match: reported as shadowed
    let shadowed = dir.path().join("late.toml");
    std::fs::write(&shadowed, "[[rule]]\nid = \"late\"\ndescription = \"d\"\ncode = \"550\"\nenhanced = \"5.1.1\"\nclassification = \"Content\"\nreason = \"x\"\nexamples = [\"550 5.1.1 no\"]\n").unwrap();
    let (ok, out) = sluice(&["rules", "check", "@default", shadowed.to_str().unwrap()]);
    assert!(!ok);
    assert!(out.contains("rule \"late\" can never match") && out.contains("shadowed rules: 1"), "{out}");
}

#[test]
fn explain_names_the_rule_the_reasons_the_outcome_and_the_runner_up() {
    let (ok, out) = sluice(&[
        "rules",
        "explain",
        "550-5.1.1 The email account that you tried to reach does not exist.\n550 5.1.1 https://support.google.com/mail/?p=NoSuchUser x - gsmtp",
        "--mx",
        "gmail-smtp-in.l.google.com",
        "--stage",
        "rcpt",
    ]);
    assert!(ok, "{out}");
    for want in [
        "matched:   google.no_such_user (@default/10-google.toml:",
        "code 550 matches 5xx",
        "enhanced code 5.1.1 matches 5.1.1",
        "provider google: MX host gmail-smtp-in.l.google.com ends with google.com",
        "outcome: bounce, Invalid Address (user_unknown), suppress the recipient",
        "runner-up: generic.invalid_address_code",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    let (ok, out) = sluice(&["rules", "explain", "421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to unexpected volume or user complaints", "--domain", "yahoo.com"]);
    assert!(ok && out.contains("yahoo.tss04_volume_or_complaints") && out.contains("shaping: throttle"), "{out}");
    let (ok, out) = sluice(&["rules", "explain", "hello"]);
    assert!(!ok && out.contains("is not an SMTP reply"), "{out}");
    let (ok, _) = sluice(&["rules", "explain", "550 x", "--mx", "a", "--domain", "b"]);
    assert!(!ok, "--mx and --domain are alternatives");
}

#[test]
fn eval_reports_accuracy_and_a_confusion_matrix_on_the_corpus() {
    let (ok, out) = sluice(&["rules", "eval", &corpus(), "--min-accuracy", "0.98"]);
    assert!(ok, "{out}");
    assert!(out.contains("classification accuracy:") && out.contains("disposition accuracy:"), "{out}");
    assert!(out.contains("expected \\ predicted") && out.contains("Frequency or Volume Too High"), "{out}");
    let (ok, out) = sluice(&["rules", "eval", &corpus(), "--min-accuracy", "1.0"]);
    if !out.contains("= 100.0%") {
        assert!(!ok && out.contains("is below the required 100.0%"), "{out}");
    }
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.tsv");
    std::fs::write(&bad, "# c\nInvalid Address\tbounce\n").unwrap();
    let (ok, out) = sluice(&["rules", "eval", bad.to_str().unwrap()]);
    assert!(!ok && out.contains("corpus line 2: expected 6 tab-separated columns"), "{out}");
}

#[test]
fn diff_lists_the_replies_a_change_would_classify_differently() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old.toml");
    let new = dir.path().join("new.toml");
    let rule = |class: &str| {
        format!("[[rule]]\nid = \"over-quota\"\ndescription = \"d\"\ntext = \"over quota\"\nclassification = \"{class}\"\nreason = \"mailbox_full\"\nexamples = [\"452 4.2.2 over quota\"]\n")
    };
    std::fs::write(&old, rule("Mailbox Unavailable")).unwrap();
    std::fs::write(&new, rule("Technical")).unwrap();
    let corpus = dir.path().join("c.tsv");
    std::fs::write(&corpus, "-\t-\trcpt\t-\t-\t452 4.2.2 Over quota\n-\t-\trcpt\t-\t-\t550 5.1.1 unknown\n-\t-\trcpt\t-\t-\t552 5.2.2 user is over quota\n").unwrap();
    let (ok, out) = sluice(&["rules", "diff", old.to_str().unwrap(), new.to_str().unwrap(), "--corpus", corpus.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(out.contains("line 1: 452 4.2.2 Over quota") && out.contains("line 3:") && !out.contains("line 2:"), "{out}");
    assert!(out.contains("classification Mailbox Unavailable → Technical"), "{out}");
    assert!(out.contains("2 of 3 replies are classified differently"), "{out}");
    // the shipped table against itself: nothing changes
    let (ok, out) = sluice(&["rules", "diff", "@default", "@default", "--corpus", &self::corpus()]);
    assert!(ok && out.contains("0 of "), "{out}");
}

/// An HTTP/1.1 request to the admin listener; returns (status, body).
async fn admin(s: &Sluice, method: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(s.admin).await.unwrap();
    c.write_all(format!("{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(60), c.read_to_string(&mut out)).await.expect("admin answers").unwrap();
    let status = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string())
}

async fn rules_version(s: &Sluice) -> String {
    let (status, body) = admin(s, "GET", "/admin/rules").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<Value>(&body).unwrap()["version"].as_str().unwrap().to_string()
}

fn smtp_send(s: &Sluice, to: &[&str]) -> Vec<String> {
    let msg = json!([{"from": "news@sender.test", "to": to, "data": "Subject: hello\r\nFrom: news@sender.test\r\n\r\nhi\r\n"}]);
    inject(&["smtp", "--port", &s.smtp.port().to_string()], &msg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_server_reloads_its_table_and_keeps_the_old_one_when_the_new_one_is_broken() {
    let peers = Peers::start(SinkConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("local.toml");
    std::fs::write(&local, "# nothing yet\n").unwrap();
    let extra = format!("\n[rules]\nfiles = [\"{}\", \"@default\"]\nwatch = false\n", local.display());
    let s = Sluice::start_with(dir.path(), &config(dir.path(), &peers, &extra));
    let v1 = rules_version(&s).await;
    let metrics = admin(&s, "GET", "/metrics").await.1;
    assert!(metrics.contains(&format!("sluice_rules_table_info{{version=\"{v1}\"}} 1")), "{metrics}");

    // broken: rejected with file:line, the old table keeps serving
    std::fs::write(&local, "[[rule]]\nid = \"local.x\"\ndescription = \"d\"\ntext = \"(\"\nclassification = \"Content\"\nreason = \"x\"\nexamples = [\"550 x\"]\n").unwrap();
    let (status, body) = admin(&s, "POST", "/admin/rules/reload").await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains(&format!("{}:4", local.display())), "{body}");
    assert_eq!(rules_version(&s).await, v1);

    // fixed, via the admin API
    std::fs::write(&local, LOCAL_RULE).unwrap();
    let (status, body) = admin(&s, "POST", "/admin/rules/reload").await;
    assert_eq!(status, 200, "{body}");
    let v2 = rules_version(&s).await;
    assert_ne!(v2, v1);

    // changed again, via SIGHUP
    std::fs::write(&local, LOCAL_RULE.replace("reason = \"user_gone\"", "reason = \"user_gone_away\"")).unwrap();
    unsafe { libc::kill(s.pid(), libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(60);
    let v3 = loop {
        let v = rules_version(&s).await;
        if v != v2 {
            break v;
        }
        assert!(Instant::now() < deadline, "SIGHUP did not reload the table");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // the new rule decides a real bounce; the event names it and the table version
    peers.sink.set_scenario(
        sluice_load::sink::Scenario::accept_all().rule(
            sluice_load::sink::Rule::at(sluice_load::sink::Stage::Rcpt)
                .when(sluice_load::sink::Match::LocalPartPrefix("closed".into()))
                .reply("550 5.1.1 this user has gone away"),
        ),
    );
    let out = smtp_send(&s, &["closed@example.test"]);
    assert!(out[0].starts_with("ACK"), "{out:?}");
    let events = wait_events(&s, "a bounce", |e| count(e, "bounce") == 1).await;
    let bounce = events.iter().find(|e| e["event"] == "bounce").unwrap();
    assert_eq!(bounce["sluice_rule"], "local.user_gone");
    assert_eq!(bounce["sluice_rules_version"], v3.as_str());
    assert_eq!(bounce["bounce_classification"], "Invalid Address");
    let metrics = admin(&s, "GET", "/metrics").await.1;
    assert!(metrics.contains("sluice_rules_hits_total{rule=\"local.user_gone\"} 1"), "{metrics}");
    assert!(metrics.contains(&format!("sluice_rules_table_info{{version=\"{v3}\"}} 1")), "{metrics}");
    assert!(metrics.contains(&format!("sluice_rules_table_info{{version=\"{v1}\"}} 0")), "{metrics}");
    assert!(metrics.contains("sluice_rules_reloads_total{result=\"error\"} 1"), "{metrics}");
    assert!(s.stop());
}

/// Polls `GET /admin/rules` until the version differs from `old` (a generous deadline: the
/// watcher waits for writes to settle, and the machine may be busy).
async fn wait_for_new_version(s: &Sluice, old: &str, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let v = rules_version(s).await;
        if v != old {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: the table was not reloaded (still {old})");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_watch_a_running_server_reloads_when_its_rules_file_changes() {
    let peers = Peers::start(SinkConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let rules_dir = dir.path().join("rules");
    std::fs::create_dir(&rules_dir).unwrap();
    let local = rules_dir.join("local.toml");
    std::fs::write(&local, "# nothing yet\n").unwrap();
    let extra = format!("\n[rules]\nfiles = [\"{}\", \"@default\"]\nwatch = true\n", local.display());
    let s = Sluice::start_with(dir.path(), &config(dir.path(), &peers, &extra));
    let v1 = rules_version(&s).await;

    // written in place
    std::fs::write(&local, LOCAL_RULE).unwrap();
    let v2 = wait_for_new_version(&s, &v1, "after writing the file").await;
    let (_, body) = admin(&s, "GET", "/admin/rules").await;
    assert!(body.contains(&v2), "{body}");

    // saved the way editors do: a temporary file renamed over the old one
    let tmp = rules_dir.join(".local.toml.swp");
    std::fs::write(&tmp, LOCAL_RULE.replace("reason = \"user_gone\"", "reason = \"user_gone_away\"")).unwrap();
    std::fs::rename(&tmp, &local).unwrap();
    let v3 = wait_for_new_version(&s, &v2, "after renaming a new file over it").await;
    assert_ne!(v3, v1);

    // a broken save is rejected and the table in use stays
    std::fs::write(&local, "[[rule]]\nid = \"local.x\"\ndescription = \"d\"\ntext = \"(\"\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let metrics = admin(&s, "GET", "/metrics").await.1;
        if metrics.contains("sluice_rules_reloads_total{result=\"error\"}") {
            break;
        }
        assert!(Instant::now() < deadline, "the broken file was not noticed: {metrics}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(rules_version(&s).await, v3, "a broken file never replaces the table in use");
    assert!(s.stop());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_bounced_recipient_is_suppressed_and_the_next_send_is_dropped() {
    // The standard scenario answers `550 5.1.1 ... does not exist` to local parts `bounce*`.
    let peers = Peers::start(SinkConfig::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let s = Sluice::start_with(dir.path(), &config(dir.path(), &peers, ""));
    let out = smtp_send(&s, &["Bounce1@gmail.test"]);
    assert!(out[0].starts_with("ACK"), "{out:?}");
    let events = wait_events(&s, "the hard bounce", |e| count(e, "bounce") == 1).await;
    let bounce = events.iter().find(|e| e["event"] == "bounce").unwrap();
    assert_eq!(bounce["bounce_classification"], "Invalid Address");
    assert_eq!(bounce["type"], "bounce");
    let rcpts_before = peers.sink.stats().commands_at(sluice_load::sink::Stage::Rcpt);

    // the same address (other case) and a good one: the bounced one is dropped, the other delivered
    let out = smtp_send(&s, &["bounce1@GMAIL.test", "friend@gmail.test"]);
    assert!(out[0].starts_with("ACK"), "{out:?}");
    let events = wait_events(&s, "a drop and a delivery", |e| count(e, "dropped") == 1 && count(e, "delivered") == 1).await;
    let dropped = events.iter().find(|e| e["event"] == "dropped").unwrap();
    assert_eq!(dropped["email"], "bounce1@GMAIL.test");
    assert_eq!(dropped["reason"], "Bounced Address");
    assert!(peers.sink.wait_for_messages(1, Duration::from_secs(60)).await);
    assert_eq!(peers.sink.messages()[0].rcpt_to, ["friend@gmail.test"]);

    // every recipient suppressed: still accepted, nothing reaches the MX
    let out = smtp_send(&s, &["bounce1@gmail.test"]);
    assert!(out[0].starts_with("ACK"), "accepted like SendGrid does: {out:?}");
    wait_events(&s, "a second drop", |e| count(e, "dropped") == 2).await;
    let rcpts_after = peers.sink.stats().commands_at(sluice_load::sink::Stage::Rcpt);
    assert_eq!(rcpts_after - rcpts_before, 1, "only friend@ was offered to the MX: {rcpts_before} → {rcpts_after}");
    assert_eq!(count(&s.events(), "bounce"), 1);
    assert!(s.stop());

    // persisted: a restarted server still drops it
    let s = Sluice::start_with(dir.path(), &config(dir.path(), &peers, ""));
    let out = smtp_send(&s, &["bounce1@gmail.test"]);
    assert!(out[0].starts_with("ACK"), "{out:?}");
    wait_events(&s, "a drop after restart", |e| count(e, "dropped") == 3).await;
    assert!(s.stop());
}
