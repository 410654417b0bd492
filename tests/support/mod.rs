//! Harness for the end-to-end tests: a real `sluice` process, a test DNS server and a mock
//! MX (both from `sluice-load`, in the test process), and the real clients in tests/python.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_load::dns::TestDns;
use sluice_load::sink::{Sink, SinkConfig};

pub const API_KEY: &str = "SG.e2e-test-key.0123456789abcdefghijklmnopqrstuvwxyz";

/// Domains the test DNS server routes to the sink (MX mx.sink.test → 127.0.0.1).
pub const DOMAINS: [&str; 3] = ["gmail.test", "yahoo.test", "example.test"];

pub struct Peers {
    pub dns: TestDns,
    pub sink: Sink,
}

impl Peers {
    pub async fn start(config: SinkConfig) -> Peers {
        let dns = TestDns::start().await.expect("start test DNS");
        let sink = Sink::start(config).await.expect("start sink");
        for d in DOMAINS {
            dns.add_mx(d, 10, "mx.sink.test").unwrap();
        }
        dns.add_a("mx.sink.test", "127.0.0.1".parse().unwrap()).unwrap();
        Peers { dns, sink }
    }
}

/// A running sluice process.
pub struct Sluice {
    child: Option<Child>,
    pub dir: PathBuf,
    pub http: SocketAddr,
    pub smtp: SocketAddr,
    pub admin: SocketAddr,
    pub output: mpsc::Receiver<String>,
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_sluice")
}

/// The config every e2e run uses: ephemeral ports, the test DNS server, the sink's port,
/// short retries; `extra` is appended (new tables only).
pub fn config(dir: &Path, peers: &Peers, extra: &str) -> String {
    config_with(dir, peers, "", "", extra)
}

/// Like [`config`], with `top` (top-level keys such as `role`) and `mta` (more keys of the
/// `[mta]` table) inserted where they belong.
pub fn config_with(dir: &Path, peers: &Peers, top: &str, mta: &str, extra: &str) -> String {
    format!(
        r#"data_dir = "{dir}"
{top}

[admin]
listen = "127.0.0.1:0"

[[api_keys]]
name = "e2e"
sha256 = "{hash}"

[http]
listen = "127.0.0.1:0"

[smtp]
listen = "127.0.0.1:0"
hostname = "sluice.test"

[mta]
ehlo_hostname = "sluice.test"
port = {port}
idle_poll = "100ms"
{mta}

[mta.resolver]
nameservers = ["{dns}"]
timeout = "2s"

[mta.retry]
initial = "1s"
factor = 1.0
max_interval = "1s"
max_age = "1h"
{extra}"#,
        dir = dir.display(),
        hash = sluice_edge::auth::hash_key(API_KEY),
        port = peers.sink.addr().port(),
        dns = peers.dns.addr(),
    )
}

impl Sluice {
    /// Starts `sluice serve --config <dir>/sluice.toml` with `config_text` and waits until it
    /// prints its ready line.
    pub fn start_with(dir: &Path, config_text: &str) -> Sluice {
        Self::start_with_args(dir, config_text, &[])
    }

    /// Like [`Sluice::start_with`], with more arguments for `serve` (e.g. `--role edge`).
    pub fn start_with_args(dir: &Path, config_text: &str, args: &[&str]) -> Sluice {
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join("sluice.toml");
        std::fs::write(&path, config_text).unwrap();
        let mut command = Command::new(binary());
        command.args(["serve", "--config"]).arg(&path).args(args);
        Self::spawn(command, dir)
    }

    /// `sluice serve` with no config at all, in working directory `cwd`: the quick start.
    /// Its data lives in `cwd/sluice-data`.
    pub fn start_zero_config(cwd: &Path) -> Sluice {
        let mut command = Command::new(binary());
        command.arg("serve").current_dir(cwd);
        Self::spawn(command, &cwd.join("sluice-data"))
    }

    fn spawn(mut command: Command, dir: &Path) -> Sluice {
        let mut child = command
            .env("SLUICE_LOG", "info,sluice_mta=debug")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start sluice");
        let (tx, rx) = mpsc::channel();
        for stream in [Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>, Box::new(child.stderr.take().unwrap())] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        drop(tx); // so an early exit ends the wait below at once
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix("sluice: ready (") {
                        // An MTA-only node has no http/smtp listener: those stay 0.0.0.0:0.
                        let addr = |name: &str| -> SocketAddr {
                            rest.trim_end_matches(')')
                                .split(' ')
                                .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                                .map(|a| a.parse().unwrap())
                                .unwrap_or_else(|| "0.0.0.0:0".parse().unwrap())
                        };
                        let (http, smtp, admin) = (addr("http"), addr("smtp"), addr("admin"));
                        return Sluice { child: Some(child), dir: dir.to_path_buf(), http, smtp, admin, output: rx };
                    }
                    seen.push(line);
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("sluice did not get ready; output:\n{}", seen.join("\n"));
                }
            }
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// SIGTERM, then wait; returns whether it exited successfully.
    pub fn stop(mut self) -> bool {
        let mut child = self.child.take().unwrap();
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                if !status.success() {
                    let tail: Vec<String> = self.output.try_iter().collect();
                    eprintln!("sluice exited with {status}; last output:\n{}", tail[tail.len().saturating_sub(30)..].join("\n"));
                }
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("sluice did not exit within 60 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// kill -9: no chance to flush or clean up.
    pub fn kill9(mut self) {
        let mut child = self.child.take().unwrap();
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let _ = child.wait();
    }

    pub fn events(&self) -> Vec<Value> {
        read_events(&self.dir.join("events.jsonl"))
    }

    pub fn http_base(&self) -> String {
        format!("http://{}", self.http)
    }
}

impl Drop for Sluice {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn read_events(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("event is JSON"))
        .collect()
}

/// Waits until `cond(events)` holds (events are flushed asynchronously).
pub async fn wait_events(s: &Sluice, what: &str, cond: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ev = s.events();
        if cond(&ev) {
            return ev;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}; events: {ev:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn count(events: &[Value], kind: &str) -> usize {
    events.iter().filter(|e| e["event"] == kind).count()
}

fn python() -> &'static str {
    let ok = Command::new("python3")
        .args(["-c", "import sendgrid"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(ok, "python3 with the `sendgrid` package is required: run scripts/test.sh, which installs it");
    "python3"
}

/// Runs tests/python/inject.py to the end; returns its output lines (`ACK ...` / `ERR ...`).
pub fn inject(args: &[&str], input: &Value) -> Vec<String> {
    let (mut child, lines) = inject_spawn(args, input);
    let out: Vec<String> = lines.iter().collect();
    assert!(child.wait().unwrap().success(), "inject.py failed");
    out
}

/// A spawned inject.py whose output can be read while it runs.
pub fn inject_spawn(args: &[&str], input: &Value) -> (Child, mpsc::Receiver<String>) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/inject.py");
    let mut child = Command::new(python())
        .arg(&script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run inject.py");
    child.stdin.take().unwrap().write_all(input.to_string().as_bytes()).unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

pub fn require_tool(name: &str) -> String {
    for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p.display().to_string();
        }
    }
    panic!("{name} is required: run scripts/test.sh, which installs it");
}

/// `GET path` on the admin listener; returns the body.
pub async fn admin_get(s: &Sluice, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(s.admin).await.unwrap();
    c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).await.unwrap();
    out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string()
}

/// The value of the sample `series` (a metric name, with its labels as rendered, e.g.
/// `sluice_queue_depth{state="queued"}`) in a Prometheus text exposition.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}
