//! Interoperability with real SMTP clients: Python's smtplib (STARTTLS + AUTH PLAIN and
//! LOGIN), swaks (`--tls --auth`), and Postfix's smtp-source (many concurrent sessions).
//!
//! A missing tool fails the test with instructions; it never passes silently.

mod smtp_support;

use std::process::Output;
use std::time::Duration;

use sluice_edge::smtp::SmtpConfig;
use smtp_support::*;

/// Bound on one client run, so a hung client fails the test instead of blocking it.
const TOOL_TIMEOUT: Duration = Duration::from_secs(300);

/// Fails with an actionable message when `program` cannot be run.
fn require_tool(program: &str, probe_args: &[&str], package: &str) {
    let runs = std::process::Command::new(program)
        .args(probe_args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok();
    assert!(
        runs,
        "{program} is not installed: run the project's test command, which installs it (Debian package `{package}`)"
    );
}

async fn run(program: &str, args: &[String]) -> Output {
    let child = tokio::process::Command::new(program).args(args).kill_on_drop(true).output();
    tokio::time::timeout(TOOL_TIMEOUT, child)
        .await
        .unwrap_or_else(|_| panic!("{program} did not finish within {TOOL_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("running {program}: {e}"))
}

fn describe(output: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Only authenticated clients may relay in these tests (127.0.0.1 is not a relay network),
/// so a client that skipped AUTH would be refused.
fn auth_only_config() -> SmtpConfig {
    SmtpConfig { relay_networks: vec![], ..config() }
}

const PYTHON_CLIENT: &str = r#"
import smtplib, ssl, sys

host, port, api_key, user, password = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
# Trust no certificate: the relay's is self-signed.
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE

def session():
    s = smtplib.SMTP(host, port, local_hostname="python.test", timeout=30)
    s.ehlo()
    assert s.has_extn("starttls"), "STARTTLS not offered"
    assert not s.has_extn("auth"), "AUTH offered before TLS"
    s.starttls(context=ctx)
    s.ehlo()
    assert s.has_extn("auth"), "AUTH not offered after STARTTLS"
    mechanisms = s.esmtp_features["auth"].split()
    assert "PLAIN" in mechanisms and "LOGIN" in mechanisms, mechanisms
    return s

cases = [("PLAIN", True, "apikey", api_key), ("PLAIN", False, user, password),
         ("LOGIN", True, user, password), ("LOGIN", False, "apikey", api_key)]
for mechanism, initial_response, u, p in cases:
    s = session()
    s.user, s.password = u, p
    code, text = s.auth(mechanism, getattr(s, "auth_" + mechanism.lower()), initial_response_ok=initial_response)
    assert code == 235, (mechanism, code, text)
    tag = f"{mechanism}-{'ir' if initial_response else 'noir'}"
    message = (f"From: python@example.org\nTo: rcpt@example.net\nSubject: smtplib {tag}\n\n"
               f"Line one.\n.a line that starts with a dot\nLast line.\n")
    code, text = s.mail(f"{tag}@example.org")
    assert code == 250, (code, text)
    code, text = s.rcpt("rcpt@example.net")
    assert code == 250, (code, text)
    code, text = s.data(message)
    assert code == 250 and text.startswith(b"2.0.0 Ok: queued as "), (code, text)
    print(tag, text.decode())
    s.quit()

s = session()
s.user, s.password = "apikey", "SG.wrong"
try:
    s.auth("PLAIN", s.auth_plain)
    raise SystemExit("a wrong API key was accepted")
except smtplib.SMTPAuthenticationError as e:
    assert e.smtp_code == 535, e
    print("wrong key refused:", e.smtp_code, e.smtp_error.decode())
try:
    s.sendmail("python@example.org", ["rcpt@example.net"], "Subject: x\n\nx\n")
    raise SystemExit("relayed without authentication")
except smtplib.SMTPRecipientsRefused as e:
    code, text = e.recipients["rcpt@example.net"]
    assert code == 530 and text.startswith(b"5.7.0 Authentication required"), e
    print("unauthenticated RCPT refused:", code, text.decode())
s.quit()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_smtplib_starttls_with_auth_plain_and_login() {
    require_tool("python3", &["--version"], "python3");
    // The server generates its own certificate here, as it does without tls_cert/tls_key.
    let server = start_self_signed(auth_only_config()).await;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("client.py");
    std::fs::write(&script, PYTHON_CLIENT).unwrap();
    let args = [
        script.display().to_string(),
        server.addr.ip().to_string(),
        server.addr.port().to_string(),
        API_KEY.to_string(),
        USER.to_string(),
        PASSWORD.to_string(),
    ];
    let output = run("python3", &args).await;
    assert!(output.status.success(), "python client failed:\n{}", describe(&output));

    let messages = server.messages().await;
    assert_eq!(messages.len(), 4, "one message per AUTH variant");
    let tenants: Vec<(&str, &str)> =
        messages.iter().map(|m| (m.meta.mail_from.as_str(), m.meta.tenant.as_str())).collect();
    assert_eq!(
        tenants,
        [
            ("LOGIN-ir@example.org", "smtp:billing"),
            ("LOGIN-noir@example.org", "apikey:acme"),
            ("PLAIN-ir@example.org", "apikey:acme"),
            ("PLAIN-noir@example.org", "smtp:billing"),
        ]
    );
    for m in &messages {
        let received = header(m, "Received").unwrap();
        assert!(received.starts_with("from python.test ([127.0.0.1])"), "{received}");
        assert!(received.contains("with ESMTPSA id"), "{received}");
        // smtplib sent bare LFs and a dot-stuffed line; the relay stored CRLF and unstuffed it.
        let body = body_text(m);
        assert!(body.ends_with("Line one.\r\n.a line that starts with a dot\r\nLast line.\r\n"), "{body}");
        assert!(header(m, "Subject").unwrap().starts_with("smtplib "));
        assert_eq!(m.meta.smtp_id, header(m, "Message-ID").unwrap());
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaks_with_tls_and_auth() {
    require_tool("swaks", &["--version"], "swaks");
    let server = start(auth_only_config()).await;
    let swaks = |auth: &str, user: &str, password: &str, subject: &str| -> Vec<String> {
        [
            "--server",
            &server.addr.ip().to_string(),
            "--port",
            &server.addr.port().to_string(),
            "--ehlo",
            "swaks.test",
            "--from",
            "swaks@example.org",
            "--to",
            "rcpt@example.net",
            "--tls",
            "--auth",
            auth,
            "--auth-user",
            user,
            "--auth-password",
            password,
            "--header",
            &format!("Subject: {subject}"),
            "--body",
            "Sent by swaks.",
            "--timeout",
            "30",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };

    let plain = run("swaks", &swaks("PLAIN", "apikey", API_KEY, "swaks plain")).await;
    assert!(plain.status.success(), "swaks PLAIN failed:\n{}", describe(&plain));
    let transcript = String::from_utf8_lossy(&plain.stdout);
    assert!(transcript.contains("<~  235 2.7.0"), "{transcript}");
    assert!(transcript.contains("<~  250 2.0.0 Ok: queued as"), "{transcript}");

    let login = run("swaks", &swaks("LOGIN", USER, PASSWORD, "swaks login")).await;
    assert!(login.status.success(), "swaks LOGIN failed:\n{}", describe(&login));

    let wrong = run("swaks", &swaks("LOGIN", USER, "wrong password", "swaks wrong")).await;
    assert!(!wrong.status.success(), "a wrong password was accepted:\n{}", describe(&wrong));
    assert!(String::from_utf8_lossy(&wrong.stdout).contains("535 5.7.8"), "{}", describe(&wrong));

    let messages = server.messages().await;
    let mut subjects: Vec<(String, String)> =
        messages.iter().map(|m| (header(m, "Subject").unwrap(), m.meta.tenant.clone())).collect();
    subjects.sort();
    assert_eq!(
        subjects,
        [
            ("swaks login".to_string(), "smtp:billing".to_string()),
            ("swaks plain".to_string(), "apikey:acme".to_string())
        ]
    );
    for m in &messages {
        assert!(header(m, "Received").unwrap().contains("with ESMTPSA id"));
        // swaks writes its own Message-Id and Date; the relay keeps them and adds no second one.
        assert_eq!(
            body_text(m).matches("\r\nMessage-Id: ").count() + body_text(m).matches("\r\nMessage-ID: ").count(),
            1
        );
        assert_eq!(m.meta.smtp_id, header(m, "Message-ID").unwrap());
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaks_without_auth_is_refused_outside_relay_networks() {
    require_tool("swaks", &["--version"], "swaks");
    let server = start(auth_only_config()).await;
    let args: Vec<String> = [
        "--server",
        &server.addr.ip().to_string(),
        "--port",
        &server.addr.port().to_string(),
        "--from",
        "swaks@example.org",
        "--to",
        "rcpt@example.net",
        "--timeout",
        "30",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let output = run("swaks", &args).await;
    assert!(!output.status.success(), "relayed without authentication:\n{}", describe(&output));
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("530 5.7.0 Authentication required"),
        "{}",
        describe(&output)
    );
    assert!(server.messages().await.is_empty());
    server.stop().await;
}

/// 20 concurrent sessions sending 500 messages in all (25 per session on average, several per
/// connection): the spool holds exactly 500 messages afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postfix_smtp_source_concurrent_sessions() {
    const SMTP_SOURCE: &str = "/usr/sbin/smtp-source";
    assert!(
        std::path::Path::new(SMTP_SOURCE).exists(),
        "{SMTP_SOURCE} is not installed: run the project's test command, which installs it (Debian package `postfix`)"
    );
    const SESSIONS: usize = 20;
    const MESSAGES: usize = SESSIONS * 25;
    // smtp-source speaks neither TLS nor AUTH: it relays from 127.0.0.1, a relay network.
    let server = start(config()).await;
    let args: Vec<String> = [
        "-s",
        &SESSIONS.to_string(),
        "-m",
        &MESSAGES.to_string(),
        "-d",
        "-l",
        "2000",
        "-M",
        "source.test",
        "-f",
        "load@example.org",
        "-t",
        "sink@example.net",
        "-S",
        "smtp-source load",
        &format!("127.0.0.1:{}", server.addr.port()),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let output = run(SMTP_SOURCE, &args).await;
    assert!(output.status.success(), "smtp-source failed:\n{}", describe(&output));

    let counts = server.spool.counts().await.unwrap();
    assert_eq!(counts.queued, MESSAGES as u64, "spool counts: {counts:?}");
    let messages = server.messages().await;
    assert_eq!(messages.len(), MESSAGES);
    let mut smtp_ids = std::collections::HashSet::new();
    for m in &messages {
        assert_eq!(m.meta.tenant, "net:127.0.0.1");
        assert_eq!(m.meta.mail_from, "load@example.org");
        assert_eq!(m.meta.recipients.len(), 1);
        assert_eq!(header(m, "Subject").as_deref(), Some("smtp-source load"));
        assert!(header(m, "Received").unwrap().starts_with("from source.test ([127.0.0.1])"));
        assert!(m.body.len() > 2000);
        smtp_ids.insert(m.meta.smtp_id.clone());
    }
    assert_eq!(smtp_ids.len(), MESSAGES, "every message has its own Message-ID");
    server.stop().await;
}
