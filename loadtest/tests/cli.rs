//! The `sluice-load` binary itself: `sink` with a ledger and a JSON report, `gen --json`
//! into it, `ledger compare` on the two ledgers (exit 0 on a match, 1 on a mismatch), `dns`
//! answering MX, A and TXT, and clear errors for bad input.

use std::path::Path;
use std::process::{ExitStatus, Output, Stdio};
use std::time::Duration;

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::Resolver;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStderr, Command};

const BIN: &str = env!("CARGO_BIN_EXE_sluice-load");
const T: Duration = Duration::from_secs(60);

async fn run(args: &[&str]) -> Output {
    let child = Command::new(BIN).args(args).stdin(Stdio::null()).output();
    tokio::time::timeout(T, child).await.expect("sluice-load finished in time").unwrap()
}

/// A long-running `sluice-load` (sink, dns) and the address it reports on stderr.
struct Server {
    child: Child,
    stderr: Lines<BufReader<ChildStderr>>,
}

impl Server {
    /// Starts `args` and waits for a stderr line containing `marker` followed by an address.
    async fn start(args: &[&str], marker: &str) -> (Server, std::net::SocketAddr) {
        let mut child = Command::new(BIN).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true).spawn().unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr = tokio::time::timeout(T, async {
            while let Some(line) = stderr.next_line().await.unwrap() {
                if let Some(rest) = line.split_once(marker).map(|(_, r)| r) {
                    return rest.split_whitespace().next().unwrap().parse().unwrap();
                }
            }
            panic!("sluice-load {args:?} exited before printing {marker:?}");
        })
        .await
        .expect("the server started in time");
        (Server { child, stderr }, addr)
    }

    /// SIGTERM, then the exit status and stdout.
    async fn stop(mut self) -> (ExitStatus, String) {
        let pid = self.child.id().unwrap() as i32;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        tokio::spawn(async move { while let Ok(Some(_)) = self.stderr.next_line().await {} });
        let out = tokio::time::timeout(T, self.child.wait_with_output()).await.expect("stopped in time").unwrap();
        (out.status, String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[tokio::test]
async fn sink_gen_and_ledger_compare_work_as_commands() {
    let dir = tempfile::tempdir().unwrap();
    let (received, report, sent) = (dir.path().join("received"), dir.path().join("report.json"), dir.path().join("sent"));
    let (sink, addr) = Server::start(
        &["sink", "--listen", "127.0.0.1:0", "--accept-all", "--ledger", path(&received), "--report", path(&report)],
        "sink listening on ",
    )
    .await;

    let addr = addr.to_string();
    let out = run(&[
        "gen", "--smtp", &addr, "--count", "25", "-c", "2", "--domain", "a.load.test=1", "--run-id", "cli", "--ledger", path(&sent), "--json",
    ])
    .await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: Value = serde_json::from_slice(&out.stdout).expect("gen --json prints JSON only");
    assert_eq!(json["messages"]["acknowledged"], 25);
    assert_eq!(json["messages"]["failed"], 0);
    assert_eq!(json["requests"], 25);
    assert_eq!(json["transport"], "smtp");
    assert_eq!(json["mode"], "closed");
    assert_eq!(json["latency"]["count"], 25);
    assert_eq!(json["errors"], serde_json::json!({}));

    let (status, stdout) = sink.stop().await;
    assert!(status.success(), "{status}");
    assert!(stdout.contains("messages 25"), "{stdout}");
    let report: Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!((report["unique"].as_u64(), report["duplicates"].as_u64()), (Some(25), Some(0)), "{report}");
    assert_eq!(report["end_to_end"]["count"], 25);

    let out = run(&["ledger", "compare", path(&sent), path(&received)]).await;
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("delivered 25"));

    // One id lost, one that was never sent: exit 1, and --json lists both.
    let ids = std::fs::read_to_string(&received).unwrap();
    let mut lines: Vec<&str> = ids.lines().collect();
    let lost = lines.pop().unwrap().to_string();
    lines.push("stranger@elsewhere.test");
    let bad = dir.path().join("bad");
    std::fs::write(&bad, lines.join("\n") + "\n").unwrap();
    let out = run(&["ledger", "compare", path(&sent), path(&bad), "--json"]).await;
    assert_eq!(out.status.code(), Some(1));
    let c: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(c["missing"], serde_json::json!([lost]));
    assert_eq!(c["unexpected"], serde_json::json!(["stranger@elsewhere.test"]));
    assert_eq!(c["delivered"], 24);
}

#[tokio::test]
async fn gen_fails_clearly() {
    // Nothing listens: every message fails, the report says why, the exit code is 1.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let out = run(&["gen", "--smtp", &closed, "--count", "3", "-c", "1", "--domain", "a.load.test=1", "--json", "--timeout", "5s"]).await;
    assert_eq!(out.status.code(), Some(1));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["messages"]["failed"], 3);
    assert_eq!(json["errors"]["connect: connection refused"], 3, "{json}");
    // A real domain is refused before anything is sent.
    let out = run(&["gen", "--smtp", &closed, "--count", "1", "--domain", "gmail.com=1"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("gmail.com"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run(&["gen", "--count", "1"]).await;
    assert_eq!(out.status.code(), Some(2), "no target");
}

#[tokio::test]
async fn dns_answers_the_records_given_on_the_command_line() {
    let txt = "v=DKIM1; k=ed25519; p=MCowBQYDK2VwAyEA";
    let (dns, addr) = Server::start(
        &[
            "dns",
            "--listen",
            "127.0.0.1:0",
            "--mx",
            "a.load.test=mx.a.load.test",
            "--a",
            "mx.a.load.test=127.0.0.9",
            "--txt",
            &format!("sel._domainkey.a.load.test={txt}"),
        ],
        "DNS server on ",
    )
    .await;
    let mut udp = ConnectionConfig::udp();
    udp.port = addr.port();
    let mut opts = ResolverOpts::default();
    opts.cache_size = 0;
    opts.timeout = Duration::from_secs(5);
    let ns = NameServerConfig::new(addr.ip(), true, vec![udp]);
    let r = Resolver::builder_with_config(ResolverConfig::from_parts(None, vec![], vec![ns]), TokioRuntimeProvider::default())
        .with_options(opts)
        .build()
        .unwrap();
    let mx = r.mx_lookup("a.load.test.").await.unwrap();
    let exchanges: Vec<(u16, String)> = mx
        .answers()
        .iter()
        .filter_map(|rec| match &rec.data {
            RData::MX(m) => Some((m.preference, m.exchange.to_ascii())),
            _ => None,
        })
        .collect();
    assert_eq!(exchanges, [(10, "mx.a.load.test.".to_string())]);
    let ips: Vec<_> = r.lookup_ip("mx.a.load.test.").await.unwrap().iter().collect();
    assert_eq!(ips, ["127.0.0.9".parse::<std::net::IpAddr>().unwrap()]);
    let answer = r.txt_lookup("sel._domainkey.a.load.test.").await.unwrap();
    let texts: Vec<String> = answer
        .answers()
        .iter()
        .filter_map(|rec| match &rec.data {
            RData::TXT(t) => Some(t.txt_data.iter().map(|s| String::from_utf8_lossy(s).into_owned()).collect::<String>()),
            _ => None,
        })
        .collect();
    assert_eq!(texts, [txt]);
    let (status, _) = dns.stop().await;
    assert!(status.success(), "{status}");

    let out = run(&["dns", "--listen", "127.0.0.1:0", "--mx", "no-equals-sign"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected NAME=VALUE"));
}
