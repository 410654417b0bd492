//! DKIM signing proven by verifiers sluice did not write: the MTA delivers to the sink, and
//! the message as received is checked by dkimpy (Python, keys looked up over DNS from the
//! test DNS server) and by mail-auth's verifier. Also: one signature per message, kept
//! across retries; policy refusals; keys made by OpenSSL.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::Resolver;
use mail_auth::{AuthenticatedMessage, DkimResult, MessageAuthenticator};
use sluice_load::dns::TestDns;
use sluice_load::sink::{Match, Rule, Scenario, SinkConfig, Stage};
use sluice_mta::dkim::{DkimConfig, DkimKeyConfig, DkimSigning, DnsRecord, Fallback, KeyAlgorithm, PrivateKey, TenantDkimConfig};

/// Generates a key per `(domain, selector, algorithm)` into `dir`, publishes its record in
/// `dns`, and returns the `[[dkim.keys]]` entries.
fn make_keys(dir: &Path, dns: &TestDns, specs: &[(&str, &str, KeyAlgorithm)]) -> Vec<DkimKeyConfig> {
    specs
        .iter()
        .map(|&(domain, selector, algorithm)| {
            let key = PrivateKey::generate(algorithm, 2048).unwrap();
            let path = dir.join(format!("{domain}.{selector}.pem"));
            key.write_new(&path).unwrap();
            let record = DnsRecord::new(domain, selector, &key);
            dns.add_txt(&record.name, &record.value).unwrap();
            DkimKeyConfig { domain: domain.into(), selector: selector.into(), private_key: path, tenants: vec![] }
        })
        .collect()
}

fn verifier_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python/dkim_verify.py")
}

/// dkimpy's verdict per signature: lines like `pass d=... s=... a=...`.
fn dkimpy(message: &[u8], dns: &TestDns) -> Vec<String> {
    let mut child = Command::new("python3")
        .arg(verifier_script())
        .args(["--dns", &dns.addr().to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 is required (scripts/test.sh installs dkimpy, dnspython and pynacl)");
    child.stdin.take().unwrap().write_all(message).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "dkim_verify.py failed (is dkimpy installed?): {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().map(String::from).collect()
}

/// mail-auth's verdict per signature, resolving keys through the test DNS server.
async fn mail_auth_results(message: &[u8], dns: &TestDns) -> Vec<DkimResult> {
    let mut udp = ConnectionConfig::udp();
    udp.port = dns.addr().port();
    let ns = NameServerConfig::new(dns.addr().ip(), true, vec![udp]);
    let resolver = Resolver::builder_with_config(ResolverConfig::from_parts(None, vec![], vec![ns]), TokioRuntimeProvider::default())
        .with_options(ResolverOpts::default())
        .build()
        .unwrap();
    let authenticator = MessageAuthenticator(resolver);
    let parsed = AuthenticatedMessage::parse(message).expect("the delivered message parses");
    authenticator.verify_dkim(&parsed).await.iter().map(|o| o.result().clone()).collect()
}

fn dkim_headers(message: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(message);
    let head = text.split("\r\n\r\n").next().unwrap();
    let mut out: Vec<String> = Vec::new();
    for line in head.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if let Some(last) = out.last_mut() {
                last.push_str("\r\n");
                last.push_str(line);
            }
        } else if line.to_ascii_lowercase().starts_with("dkim-signature:") {
            out.push(line.to_string());
        } else {
            out.push(String::new());
        }
    }
    out.into_iter().filter(|h| !h.is_empty()).collect()
}

/// The `h=` list of a DKIM-Signature header, lower-cased.
fn signed_headers(header: &str) -> Vec<String> {
    let unfolded: String = header.split("\r\n").map(|l| l.trim()).collect();
    let h = unfolded.split(';').map(str::trim).find_map(|t| t.strip_prefix("h=")).expect("h= tag");
    h.split(':').map(|n| n.trim().to_ascii_lowercase()).collect()
}

fn body(from: &str, extra_headers: &str) -> String {
    format!(
        "From: \"Sender\" <{from}>\r\nTo: rcpt@dest.test\r\nSubject: DKIM test for {from}\r\n\
         Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{from}.1@sluice.test>\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n{extra_headers}\r\n\
         Hello,\r\n.a line that starts with a dot (stuffed on the wire)\r\n\r\ntrailing  spaces   \r\n\r\n\r\n"
    )
}

async fn start_bench() -> Bench {
    let bench = Bench::new(SinkConfig::default()).await;
    bench.mx_to_sink("dest.test");
    bench
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_ed25519_and_dual_signatures_pass_dkimpy_and_mail_auth_and_break_when_altered() {
    let bench = start_bench().await;
    let dir = tempfile::tempdir().unwrap();
    let keys = make_keys(
        dir.path(),
        &bench.dns,
        &[
            ("rsa.test", "s2048", KeyAlgorithm::Rsa),
            ("ed.test", "ed1", KeyAlgorithm::Ed25519),
            ("dual.test", "rsa1", KeyAlgorithm::Rsa),
            ("dual.test", "ed1", KeyAlgorithm::Ed25519),
        ],
    );
    let dkim = DkimSigning::load(&DkimConfig { keys, ..DkimConfig::default() }).unwrap();
    let list = "Cc: copy@dest.test\r\nReply-To: replies@rsa.test\r\nList-Unsubscribe: <mailto:unsub@rsa.test>\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n";
    bench.enqueue("dest.test", &["a@dest.test"], &body("news@rsa.test", list)).await;
    bench.enqueue("dest.test", &["b@dest.test"], &body("news@ed.test", "")).await;
    // A header prepended by an earlier stage must be sent, and signed over, as it is.
    let mut with_prepend = message("dest.test", &["c@dest.test"], &body("news@mail.dual.test", ""));
    with_prepend.meta.prepend_headers = Some("X-Earlier-Stage: kept\r\n".into());
    bench.spool.enqueue(vec![with_prepend]).await.unwrap();
    // No key for this From: domain and the default fallback: unsigned.
    bench.enqueue("dest.test", &["d@dest.test"], &body("news@nokey.test", "")).await;

    let mta = bench.start_with_dkim(bench.config(), dkim);
    assert!(bench.sink.wait_for_messages(4, WAIT).await);
    let received = bench.sink.messages();
    let to = |r: &str| received.iter().find(|m| m.rcpt_to == [r]).unwrap_or_else(|| panic!("message to {r}")).data.clone();

    let rsa = to("a@dest.test");
    assert_eq!(dkimpy(&rsa, &bench.dns), ["pass d=rsa.test s=s2048 a=rsa-sha256"]);
    assert_eq!(mail_auth_results(&rsa, &bench.dns).await, [DkimResult::Pass]);
    let sig = &dkim_headers(&rsa)[0];
    assert!(sig.contains("c=relaxed/relaxed"), "{sig}");
    let h = signed_headers(sig);
    assert_eq!(h.iter().filter(|n| *n == "from").count(), 2, "From is over-signed: {h:?}");
    for name in ["to", "cc", "subject", "date", "message-id", "mime-version", "content-type", "reply-to", "list-unsubscribe", "list-unsubscribe-post"] {
        assert!(h.contains(&name.to_string()), "{name} is signed: {h:?}");
    }

    let ed = to("b@dest.test");
    assert_eq!(dkimpy(&ed, &bench.dns), ["pass d=ed.test s=ed1 a=ed25519-sha256"]);
    assert_eq!(mail_auth_results(&ed, &bench.dns).await, [DkimResult::Pass]);
    let h = signed_headers(&dkim_headers(&ed)[0]);
    assert!(!h.contains(&"cc".to_string()) && !h.contains(&"reply-to".to_string()), "absent headers are not listed: {h:?}");

    // Dual signing; a subdomain From: aligns with its parent's key.
    let dual = to("c@dest.test");
    assert!(String::from_utf8_lossy(&dual).contains("\r\nX-Earlier-Stage: kept\r\n"));
    let mut verdicts = dkimpy(&dual, &bench.dns);
    verdicts.sort();
    assert_eq!(verdicts, ["pass d=dual.test s=ed1 a=ed25519-sha256", "pass d=dual.test s=rsa1 a=rsa-sha256"]);
    assert_eq!(mail_auth_results(&dual, &bench.dns).await, [DkimResult::Pass, DkimResult::Pass]);

    assert_eq!(dkimpy(&to("d@dest.test"), &bench.dns), ["none"]);

    // Altered after signing: a signed header, or the body.
    for (name, msg) in [("rsa", &rsa), ("ed25519", &ed), ("dual", &dual)] {
        let text = String::from_utf8_lossy(msg).to_string();
        for altered in [text.replacen("Subject: DKIM test", "Subject: DKIM TEST", 1), text.replacen("Hello,", "Hello!", 1)] {
            assert_ne!(altered, text);
            let verdicts = dkimpy(altered.as_bytes(), &bench.dns);
            assert!(!verdicts.is_empty() && verdicts.iter().all(|v| v.starts_with("fail ")), "{name}: {verdicts:?}");
            let results = mail_auth_results(altered.as_bytes(), &bench.dns).await;
            assert!(results.iter().all(|r| *r != DkimResult::Pass), "{name}: {results:?}");
        }
    }
    mta.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_is_signed_once_for_all_recipients_and_attempts() {
    // "later" is greylisted once: the first attempt delivers to "now", the retry to "later".
    let scenario = Scenario::standard().first(
        Rule::at(Stage::Rcpt).when(Match::LocalPartPrefix("later".into())).reply("451 4.7.1 greylisted").times(1),
    );
    let bench = Bench::new(SinkConfig { scenario, ..Default::default() }).await;
    bench.mx_to_sink("dest.test");
    let dir = tempfile::tempdir().unwrap();
    let keys = make_keys(dir.path(), &bench.dns, &[("rsa.test", "s1", KeyAlgorithm::Rsa)]);
    let dkim = DkimSigning::load(&DkimConfig { keys, ..DkimConfig::default() }).unwrap();
    let id = bench.enqueue("dest.test", &["now@dest.test", "other@dest.test", "later@dest.test"], &body("a@rsa.test", "")).await;

    let mut config = bench.config();
    // At least 1.8 s between the attempts (±10% jitter), so a second signature would carry a
    // different t= timestamp (whole seconds) and could not equal the first.
    config.retry.initial = Duration::from_secs(2);
    config.retry.factor = 1.0;
    config.retry.max_interval = Duration::from_secs(2);
    let mta = bench.start_with_dkim(config, dkim);
    assert!(bench.sink.wait_for_messages(2, WAIT).await);
    let received = bench.sink.messages();
    assert_eq!(received[0].rcpt_to, ["now@dest.test", "other@dest.test"]);
    assert_eq!(received[1].rcpt_to, ["later@dest.test"]);
    let first = dkim_headers(&received[0].data);
    let retry = dkim_headers(&received[1].data);
    assert_eq!(first.len(), 1, "one signature for the whole message, not one per recipient");
    assert_eq!(first, retry, "the retry sends the stored signature");
    assert_eq!(received[0].data, received[1].data, "retries send the same bytes");
    assert_eq!(dkimpy(&received[1].data, &bench.dns), ["pass d=rsa.test s=s1 a=rsa-sha256"]);
    mta.stop().await;
    assert!(bench.meta(id).await.is_none(), "completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_tenant_bounces_instead_of_sending_unsigned_and_platform_signs_the_rest() {
    let bench = start_bench().await;
    let dir = tempfile::tempdir().unwrap();
    let keys = make_keys(dir.path(), &bench.dns, &[("esp.test", "p1", KeyAlgorithm::Ed25519)]);
    let mut config = DkimConfig { keys, fallback: Fallback::Platform, platform_domain: Some("esp.test".into()), ..DkimConfig::default() };
    config.tenants.insert("apikey:strict".into(), TenantDkimConfig { fallback: Some(Fallback::Refuse), platform_domain: None });
    let dkim = DkimSigning::load(&config).unwrap();

    // Accepted before the policy changed, say: the MTA still never sends it unsigned.
    let mut strict = message("dest.test", &["strict@dest.test"], &body("a@customer.test", ""));
    strict.meta.tenant = "apikey:strict".into();
    let platform = message("dest.test", &["platform@dest.test"], &body("a@customer.test", ""));
    bench.spool.enqueue(vec![strict, platform]).await.unwrap();

    let mta = bench.start_with_dkim(bench.config(), dkim);
    let bounce = bench.event_for(2, "strict@dest.test").await;
    assert_eq!(bounce["event"], "bounce");
    assert_eq!(bounce["status"], "5.7.1");
    assert!(bounce["reason"].as_str().unwrap().contains("customer.test has no DKIM signing key"), "{bounce}");
    assert!(bench.sink.wait_for_messages(1, WAIT).await);
    let received = bench.sink.messages();
    assert_eq!(received.len(), 1);
    assert_eq!(dkimpy(&received[0].data, &bench.dns), ["pass d=esp.test s=p1 a=ed25519-sha256"]);
    mta.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_made_by_openssl_load_and_sign() {
    let dns = TestDns::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let openssl = |args: &[&str]| {
        let st = Command::new("openssl").args(args).current_dir(dir.path()).output().expect("openssl is installed");
        assert!(st.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&st.stderr));
    };
    openssl(&["genrsa", "-traditional", "-out", "pkcs1.pem", "2048"]);
    openssl(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "pkcs8.pem"]);
    openssl(&["genpkey", "-algorithm", "ed25519", "-out", "ed.pem"]);
    let mut keys = Vec::new();
    for (file, selector, alg) in [("pkcs1.pem", "a", KeyAlgorithm::Rsa), ("pkcs8.pem", "b", KeyAlgorithm::Rsa), ("ed.pem", "c", KeyAlgorithm::Ed25519)] {
        let path = dir.path().join(file);
        let key = PrivateKey::read(&path).unwrap();
        assert_eq!(key.algorithm(), alg);
        let record = DnsRecord::new("openssl.test", selector, &key);
        dns.add_txt(&record.name, &record.value).unwrap();
        keys.push(DkimKeyConfig { domain: "openssl.test".into(), selector: selector.into(), private_key: path, tenants: vec![] });
    }
    let signing = Arc::new(DkimSigning::load(&DkimConfig { keys, ..DkimConfig::default() }).unwrap());
    // A body larger than the signer's hash buffer, with whitespace relaxed canonicalisation changes.
    let mut msg = body("x@openssl.test", "");
    for i in 0..2000 {
        msg.push_str(&format!("line {i}\t with  runs   of white space \r\n"));
    }
    let headers = signing.sign_message("t", msg.as_bytes()).unwrap().expect("signed");
    let signed = format!("{headers}{msg}");
    let mut verdicts = dkimpy(signed.as_bytes(), &dns);
    verdicts.sort();
    assert_eq!(
        verdicts,
        [
            "pass d=openssl.test s=a a=rsa-sha256",
            "pass d=openssl.test s=b a=rsa-sha256",
            "pass d=openssl.test s=c a=ed25519-sha256"
        ]
    );
}
