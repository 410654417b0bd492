//! The benchmark harness (`sluice-load bench`, run by `scripts/bench.sh`): in one run, on one
//! machine, it measures
//!
//! 1. the ceiling of the tools themselves: generator → mock ISP, and against Postfix's
//!    smtp-source and smtp-sink, so we know the tools are not the bottleneck;
//! 2. sluice on the local spool, injected over SMTP, over HTTP with one message per request
//!    and with many, and HTTP at a fixed rate of half the maximum for the 202 latency;
//! 3. sluice on the local spool with DKIM signing (RSA-2048, and RSA-2048 + Ed25519), next to
//!    `openssl speed rsa2048` (the signing ceiling), the mock ISPs verifying a sample;
//! 4. sluice on a Ceph spool, when a cluster's conf is given (and `rados bench` on it): one
//!    process, and two edges + two MTAs sharing the pool;
//! 5. Postfix relaying the same SMTP workload to the same mock ISPs;
//!
//! and reports injected/s, delivered/s (to the N-th unique arrival at the mock ISPs),
//! end-to-end latency (from the generator's `X-Load-Sent` stamp), CPU seconds per message and
//! peak memory (PSS) of the system under test (summed over its processes), as text, JSON and
//! a Markdown section for docs/benchmarks.md. Every system runs alone with the same generator and sinks, phase after
//! phase; each phase has a warm-up that is delivered before measuring starts.

mod markdown;
mod procfs;
mod servers;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rand::Rng;
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::dns::TestDns;
use crate::gen::{self, GenConfig, HttpTarget, Pace, SizeMix, SmtpTarget, Stop, Target, Weighted, Workload};
use crate::sink::{DkimCounts, DkimSampler, Fleet, FleetConfig, FleetOptions};
use crate::stats::Percentiles;
pub use servers::{dkim_keygen, sluice_config, DkimKey, SluiceSetup, SpoolChoice};
use servers::{Postfix, Sluice};

/// The groups of phases `--only` picks from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Group {
    /// The tools' own ceilings (generator → mock ISP; smtp-source and smtp-sink).
    Tools,
    /// sluice on the local spool: SMTP, HTTP, the open-loop HTTP row.
    Local,
    /// sluice on the local spool with DKIM (plus the no-DKIM SMTP row and `openssl speed`).
    Dkim,
    /// sluice on the Ceph spool (needs --ceph-conf): one process, and 2 edges + 2 MTAs.
    Rados,
    /// Postfix.
    Postfix,
}

/// The domain that signs in the DKIM rows (`fallback = "platform"`).
const DKIM_DOMAIN: &str = "dkim.bench.test";

/// `sluice-load bench` options.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {
    /// The sluice binary to measure (a release build).
    #[arg(long, default_value = "target/release/sluice")]
    pub sluice: PathBuf,
    /// Measured messages per phase (default 50,000; 5,000 with --quick).
    #[arg(long)]
    pub messages: Option<u64>,
    /// Warm-up messages per phase, delivered before measuring (default 2,000; 500 with --quick).
    #[arg(long)]
    pub warmup: Option<u64>,
    /// Injecting connections.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Message size or mix (`5k`; `2k:60,20k:30,100k:10`).
    #[arg(long, default_value = "5k")]
    pub size: SizeMix,
    /// Messages per request in the bulk HTTP phase.
    #[arg(long, default_value_t = 10)]
    pub personalizations: u32,
    /// Run the Ceph phase against the cluster with this conf (`scripts/ceph-cluster.sh start`
    /// prints it); the sluice binary must be built with `--features rados`.
    #[arg(long, env = "SLUICE_CEPH_CONF")]
    pub ceph_conf: Option<PathBuf>,
    #[arg(long, default_value = "sluice")]
    pub ceph_pool: String,
    /// Leave out Postfix.
    #[arg(long)]
    pub no_postfix: bool,
    /// Leave out the DKIM rows.
    #[arg(long)]
    pub no_dkim: bool,
    /// Share of the messages of the DKIM rows whose signatures the mock ISPs verify.
    #[arg(long, default_value_t = 0.1)]
    pub dkim_sample: f64,
    /// Run only these groups of phases (comma-separated); all by default.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub only: Vec<Group>,
    /// Fewer messages and phases: no open-loop phase, no bulk HTTP, no smtp-source/smtp-sink
    /// ceilings.
    #[arg(long)]
    pub quick: bool,
    /// Keep the run's files (configs, logs, spools) here instead of a removed temp directory.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Replace the results section of this Markdown file (docs/benchmarks.md).
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// Write all results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// The command line to record with the results.
    #[arg(long, default_value = "sluice-load bench")]
    pub command_line: String,
    /// The revision measured (e.g. `git rev-parse --short HEAD`).
    #[arg(long, default_value = "")]
    pub revision: String,
}

/// The machine the run was on.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub kernel: String,
    pub memory_gib: f64,
    /// /proc/loadavg at the start: other work on the machine.
    pub load_average: String,
}

impl Machine {
    fn probe() -> Machine {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpuinfo = read("/proc/cpuinfo");
        let meminfo = read("/proc/meminfo");
        let mem_kb: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0);
        Machine {
            cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            cpu_model: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim().to_string()))
                .unwrap_or_else(|| "unknown".into()),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            memory_gib: mem_kb / 1024.0 / 1024.0,
            load_average: read("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        }
    }
}

/// One measured phase.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Phase {
    /// `generator → sink`, `sluice`, `Postfix 3.7.11`, ...
    pub system: String,
    /// `local`, `rados`, `queue files`, or empty.
    pub spool: String,
    /// `SMTP`, `HTTP ×1`, `HTTP ×10`, ...
    pub injection: String,
    /// What sets the row apart from the plain one of its system and spool: `DKIM RSA-2048`,
    /// `2 edges + 2 MTAs`; empty for the plain rows.
    pub variant: String,
    /// Processes of the system under test whose CPU and memory are summed.
    pub processes: usize,
    /// Measured messages acknowledged by the system.
    pub messages: u64,
    pub injected_per_s: f64,
    /// Unique messages that reached the mock ISPs.
    pub delivered: u64,
    /// Delivered messages per second, from the first measured injection to the last arrival.
    pub delivered_per_s: Option<f64>,
    /// From the generator's stamp to the end of DATA at the mock ISP.
    pub end_to_end: Option<Percentiles>,
    /// Injection latency (per SMTP message or HTTP request).
    pub inject_latency: Percentiles,
    /// CPU seconds of the system under test during the measured part.
    pub cpu_seconds: Option<f64>,
    /// CPU seconds of this harness (generator, sinks, DNS) during the measured part.
    pub harness_cpu_seconds: f64,
    /// Peak memory of the system under test: the highest sampled sum of the proportional set
    /// sizes of its processes (sampled every 200 ms).
    pub peak_memory_mib: Option<f64>,
    /// DKIM verification by the mock ISPs of a sample of the measured messages (DKIM rows).
    pub dkim: Option<DkimCounts>,
    pub errors: BTreeMap<String, u64>,
    pub notes: Vec<String>,
}

impl Phase {
    /// The system column: the system and, in parentheses, the variant.
    pub fn label(&self) -> String {
        if self.variant.is_empty() {
            self.system.clone()
        } else {
            format!("{} ({})", self.system, self.variant)
        }
    }

    /// CPU seconds of the system under test per delivered message.
    pub fn cpu_per_message(&self) -> Option<f64> {
        let cpu = self.cpu_seconds?;
        (self.delivered > 0).then(|| cpu / self.delivered as f64)
    }

    /// Delivered messages per CPU-second of the system under test.
    pub fn messages_per_cpu_second(&self) -> Option<f64> {
        let cpu = self.cpu_seconds?;
        (cpu > 0.0).then(|| self.delivered as f64 / cpu)
    }
}

/// Everything one run measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BenchReport {
    pub date: String,
    pub command: String,
    pub revision: String,
    pub machine: Machine,
    pub messages_per_phase: u64,
    pub warmup_per_phase: u64,
    pub concurrency: usize,
    pub sizes: Vec<(usize, f64)>,
    pub personalizations: u32,
    pub phases: Vec<Phase>,
    /// `rados bench` 4 KiB writes per second (16 in flight) on the Ceph cluster, if used.
    pub rados_bench_writes_per_s: Option<f64>,
    /// `openssl speed -seconds 3 rsa2048` signatures per second (one core), before and after
    /// the DKIM rows: the machine's RSA-2048 signing ceiling.
    pub openssl_rsa2048_sign_per_s: Vec<f64>,
    pub notes: Vec<String>,
}

/// The shared pieces of a run.
struct Bench {
    args: BenchArgs,
    work: PathBuf,
    dns: TestDns,
    fleet: Fleet,
    api_key: String,
    run_id: String,
    cancel: CancellationToken,
    phase_no: AtomicU64,
}

/// Samples the peak memory (PSS) of process trees until dropped: every 200 ms the sum over
/// all of them, and the highest sum.
struct RssSampler {
    peak_kb: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl RssSampler {
    fn start(pids: Vec<u32>) -> RssSampler {
        let (peak_kb, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let (p, s) = (peak_kb.clone(), stop.clone());
        tokio::task::spawn_blocking(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(pids.iter().map(|pid| procfs::tree_pss_kb(*pid)).sum(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        RssSampler { peak_kb, stop }
    }

    fn peak_kb(&self) -> u64 {
        self.peak_kb.load(Ordering::Relaxed)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// How a phase injects.
#[derive(Clone, Debug)]
enum Inject {
    Smtp(SocketAddr),
    Http { addr: SocketAddr, personalizations: u32 },
}

impl Inject {
    fn label(&self) -> String {
        match self {
            Inject::Smtp(_) => "SMTP".into(),
            Inject::Http { personalizations, .. } => format!("HTTP ×{personalizations}"),
        }
    }
}

/// One measurement: what runs, how it is injected, which processes are measured.
struct Measure {
    system: String,
    spool: String,
    variant: String,
    /// Several targets of one kind: the connections are spread over them.
    inject: Vec<Inject>,
    pace: Pace,
    /// The system under test (empty for the tools' own rows).
    pids: Vec<u32>,
    /// Verify the DKIM signatures of a sample of the measured messages at the mock ISPs.
    dkim: bool,
}

/// The processes of a CPU measurement, summed; `None` when one of them is gone.
fn cpu_seconds(pids: &[u32]) -> Option<f64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|p| procfs::tree_cpu_seconds(*p)).sum()
}

/// The sign/s column of `openssl speed rsa2048`:
/// `rsa 2048 bits 0.000244s 0.000007s   4097.0 136000.0`.
fn parse_openssl_rsa2048(text: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        match f.as_slice() {
            ["rsa", "2048", "bits", _, _, sign, _, ..] => sign.parse().ok(),
            _ => None,
        }
    })
}

impl BenchArgs {
    fn wants(&self, group: Group) -> bool {
        self.only.is_empty() || self.only.contains(&group)
    }

    fn messages(&self) -> u64 {
        self.messages.unwrap_or(if self.quick { 5_000 } else { 50_000 })
    }

    fn warmup(&self) -> u64 {
        self.warmup.unwrap_or(if self.quick { 500 } else { 2_000 })
    }
}

impl Bench {
    fn workload(&self) -> Workload {
        Workload {
            sizes: self.args.size.clone(),
            attachments: 0,
            attachment_bytes: 0,
            recipients: 1,
            domains: Weighted::new(self.fleet.config().domain_weights()).expect("the fleet has weights"),
            sender: "load@gen.load.test".into(),
            run_id: format!("{}-{}", self.run_id, self.phase_no.fetch_add(1, Ordering::Relaxed)),
        }
    }

    fn target(&self, inject: &Inject) -> Target {
        let timeout = Duration::from_secs(60);
        match inject {
            Inject::Smtp(addr) => Target::Smtp(SmtpTarget {
                addr: *addr,
                helo: "gen.load.test".into(),
                starttls: false,
                tls_name: "localhost".into(),
                auth: None,
                messages_per_connection: 100,
                timeout,
            }),
            Inject::Http { addr, personalizations } => Target::Http(HttpTarget {
                addr: *addr,
                api_key: self.api_key.clone(),
                personalizations: *personalizations,
                timeout,
            }),
        }
    }

    /// Runs the generator against `inject` (its connections spread over several targets).
    async fn generate(&self, inject: &[Inject], pace: Pace, stop: Stop) -> Result<gen::Report> {
        let (first, more) = inject.split_first().context("a phase needs a target")?;
        let more = more.iter().map(|i| self.target(i)).collect();
        Ok(gen::run_spread(self.gen_config(first, pace, stop), more, self.cancel.clone()).await?)
    }

    fn gen_config(&self, inject: &Inject, pace: Pace, stop: Stop) -> GenConfig {
        GenConfig {
            target: self.target(inject),
            pace,
            concurrency: self.args.concurrency,
            stop,
            warmup: Duration::ZERO,
            workload: self.workload(),
            ledger: None,
            progress: true,
        }
    }

    /// Waits until `n` unique messages arrived in total; returns whether they did.
    async fn wait_delivered(&self, n: u64, generous_for: u64) -> bool {
        let timeout = Duration::from_secs(120 + generous_for / 50);
        tokio::select! {
            ok = self.fleet.tracker().wait_unique(n, timeout) => ok,
            _ = self.cancel.cancelled() => false,
        }
    }

    /// Injects, waits for delivery, and measures the system's processes (if any).
    async fn measure(&self, m: Measure) -> Result<Phase> {
        let injection = m.inject.first().context("a phase needs a target")?.label();
        let label = match m.pace {
            Pace::Closed => injection,
            Pace::Open { rate } => format!("{injection} at {} msgs/s", crate::stats::thousands(rate)),
        };
        let variant = if m.variant.is_empty() { String::new() } else { format!(" · {}", m.variant) };
        eprintln!("== {} · {} · {label}{variant}", m.system, m.spool);
        let tracker = self.fleet.tracker().clone();
        if self.args.warmup() > 0 {
            let base = tracker.unique();
            let warm = self.generate(&m.inject, Pace::Closed, Stop::Count(self.args.warmup())).await?;
            if warm.messages.acknowledged == 0 {
                bail!("{}: no message of the warm-up was accepted ({:?})", m.system, warm.errors);
            }
            // The warm-up's mail drains before measuring starts (its ids are new, so the
            // unique count rises by exactly what was acknowledged).
            self.wait_delivered(base + warm.messages.acknowledged, self.args.warmup()).await;
        }
        if m.dkim {
            let sampler = DkimSampler::new(self.dns.addr(), self.args.dkim_sample).map_err(anyhow::Error::msg)?;
            tracker.set_dkim(Some(sampler));
        }
        let stop = match m.pace {
            Pace::Closed => Stop::Count(self.args.messages()),
            // Ten seconds at the rate, at most the phase's message count.
            Pace::Open { rate } => Stop::Count(((rate * 10.0) as u64).clamp(1, self.args.messages())),
        };
        let before_unique = tracker.unique();
        tracker.take_latency();
        let cpu0 = cpu_seconds(&m.pids);
        let self0 = procfs::self_cpu_seconds();
        let rss = (!m.pids.is_empty()).then(|| RssSampler::start(m.pids.clone()));
        let t0 = Instant::now();
        let report = self.generate(&m.inject, m.pace, stop).await;
        let report = match report {
            Ok(r) => r,
            Err(e) => {
                tracker.set_dkim(None);
                return Err(e);
            }
        };
        let acked = report.messages.acknowledged;
        let all_delivered = self.wait_delivered(before_unique + acked, acked).await;
        let elapsed = t0.elapsed();
        let cpu1 = cpu_seconds(&m.pids);
        let harness = procfs::self_cpu_seconds() - self0;
        let delivered = tracker.unique() - before_unique;
        let peak_kb = rss.as_ref().map(|r| r.peak_kb()).unwrap_or(0);
        let dkim = match tracker.set_dkim(None) {
            Some(sampler) if m.dkim => Some(sampler.settled(Duration::from_secs(30)).await),
            _ => None,
        };
        let mut notes = Vec::new();
        if !all_delivered {
            notes.push(format!("only {delivered} of {acked} acknowledged messages were delivered in time"));
        }
        if let Some(d) = &dkim {
            if d.fail + d.unsigned + d.temperror > 0 || d.pass == 0 {
                notes.push(format!(
                    "DKIM verification of the sample: {} passed, {} failed, {} unsigned, {} temporary errors",
                    d.pass, d.fail, d.unsigned, d.temperror
                ));
            }
        }
        let phase = Phase {
            system: m.system,
            spool: m.spool,
            injection: label,
            variant: m.variant,
            processes: m.pids.len(),
            messages: acked,
            injected_per_s: report.throughput,
            delivered,
            delivered_per_s: Some(crate::stats::rate(delivered, elapsed)),
            end_to_end: Some(Percentiles::of(&tracker.take_latency())),
            inject_latency: report.latency.clone(),
            cpu_seconds: cpu0.zip(cpu1).map(|(a, b)| b - a),
            harness_cpu_seconds: harness,
            peak_memory_mib: rss.map(|_| peak_kb as f64 / 1024.0),
            dkim,
            errors: report.errors.clone(),
            notes,
        };
        eprintln!("{}", markdown::phase_line(&phase));
        Ok(phase)
    }

    fn phase_dir(&self, name: &str) -> PathBuf {
        self.work.join(format!("{:02}-{name}", self.phase_no.load(Ordering::Relaxed)))
    }

    /// Starts sluice as `setup` says, runs one measurement, stops it.
    async fn sluice_phase(&self, setup: &SluiceSetup, variant: &str, inject: impl Fn(&Sluice) -> Inject, pace: Pace) -> Result<Phase> {
        let dir = self.phase_dir(&format!("sluice-{}", setup.spool.name()));
        let config = sluice_config(&dir, &self.api_key, self.fleet.port(), self.dns.addr(), setup);
        let sluice = Sluice::start(&self.args.sluice, &dir, &config).await?;
        let m = Measure {
            system: "sluice".into(),
            spool: setup.spool.name().into(),
            variant: variant.into(),
            inject: vec![inject(&sluice)],
            pace,
            pids: vec![sluice.pid],
            dkim: !setup.dkim.is_empty(),
        };
        let result = self.measure(m).await;
        sluice.stop().await?;
        result
    }

    /// Two `role = "edge"` and two `role = "mta"` processes on one RADOS pool (a namespace of
    /// their own), the generator's connections spread over both edges; CPU and memory are
    /// summed over the four.
    async fn rados_nodes_phase(&self, conf: &Path) -> Result<Phase> {
        let spool = SpoolChoice::Rados {
            conf: conf.to_path_buf(),
            pool: self.args.ceph_pool.clone(),
            namespace: format!("bench-{}-nodes", self.run_id),
        };
        let base = self.phase_dir("sluice-rados-nodes");
        let mut nodes: Vec<Sluice> = Vec::new();
        // One after the other: the first one initialises the empty namespace.
        for (i, role) in ["mta", "mta", "edge", "edge"].into_iter().enumerate() {
            let dir = base.join(format!("{role}-{i}"));
            let setup = SluiceSetup { role: Some(role), ..SluiceSetup::new(spool.clone()) };
            let config = sluice_config(&dir, &self.api_key, self.fleet.port(), self.dns.addr(), &setup);
            match Sluice::start(&self.args.sluice, &dir, &config).await {
                Ok(s) => nodes.push(s),
                Err(e) => {
                    for n in nodes {
                        n.stop().await?;
                    }
                    return Err(e.context(format!("starting the {role} node {i}")));
                }
            }
        }
        let m = Measure {
            system: "sluice".into(),
            spool: "rados".into(),
            variant: "2 edges + 2 MTAs".into(),
            inject: nodes.iter().filter_map(|n| n.smtp).map(Inject::Smtp).collect(),
            pace: Pace::Closed,
            pids: nodes.iter().map(|n| n.pid).collect(),
            dkim: false,
        };
        let result = self.measure(m).await;
        for n in nodes {
            n.stop().await?;
        }
        result
    }

    async fn postfix_phase(&self) -> Result<Phase> {
        let dir = self.phase_dir("postfix");
        let port = free_port()?;
        let postfix = Postfix::start(&dir, SocketAddr::from(([127, 0, 0, 1], port)), self.fleet.config(), self.fleet.port()).await?;
        let m = Measure {
            system: format!("Postfix {}", postfix.version),
            spool: "queue files".into(),
            variant: String::new(),
            inject: vec![Inject::Smtp(postfix.smtp)],
            pace: Pace::Closed,
            pids: vec![postfix.master_pid],
            dkim: false,
        };
        let result = self.measure(m).await;
        postfix.stop();
        result
    }

    /// `openssl speed -seconds 3 rsa2048`: RSA-2048 signatures per second on one core.
    async fn openssl_speed(&self) -> Option<f64> {
        eprintln!("== openssl speed -seconds 3 rsa2048");
        let run = tokio::process::Command::new("openssl").args(["speed", "-seconds", "3", "rsa2048"]).stderr(Stdio::null()).output();
        let out = match tokio::time::timeout(Duration::from_secs(120), run).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot run openssl speed");
                return None;
            }
            Err(_) => {
                tracing::warn!("openssl speed did not finish within 120 s");
                return None;
            }
        };
        let sign = parse_openssl_rsa2048(&String::from_utf8_lossy(&out.stdout));
        match sign {
            Some(s) => eprintln!("   {} RSA-2048 signatures/s", crate::stats::thousands(s)),
            None => tracing::warn!("openssl speed printed no rsa 2048 line"),
        }
        sign
    }

    /// The signing keys of the DKIM rows, made by the sluice under test and published in the
    /// test DNS: an RSA-2048 and an Ed25519 key of the platform domain.
    async fn dkim_keys(&self) -> Result<(DkimKey, DkimKey)> {
        let dir = self.work.join("dkim");
        let rsa = dkim_keygen(&self.args.sluice, &dir, DKIM_DOMAIN, "rsa2048", false).await?;
        let ed = dkim_keygen(&self.args.sluice, &dir, DKIM_DOMAIN, "ed25519", true).await?;
        for k in [&rsa, &ed] {
            self.dns.add_txt(&k.record_name, &k.record_value)?;
        }
        Ok((rsa, ed))
    }

    /// sluice on the local spool signing every message: RSA-2048, then RSA-2048 + Ed25519.
    async fn dkim_phases(&self, report: &mut BenchReport) -> Result<()> {
        let (rsa, ed) = self.dkim_keys().await?;
        report.openssl_rsa2048_sign_per_s.extend(self.openssl_speed().await);
        for (variant, keys) in [("DKIM RSA-2048", vec![rsa.clone()]), ("DKIM RSA-2048 + Ed25519", vec![rsa, ed])] {
            let setup = SluiceSetup { dkim: keys, ..SluiceSetup::new(SpoolChoice::Local) };
            report.phases.push(self.sluice_phase(&setup, variant, |s| Inject::Smtp(s.smtp()), Pace::Closed).await?);
        }
        report.openssl_rsa2048_sign_per_s.extend(self.openssl_speed().await);
        Ok(())
    }

    /// smtp-source (Postfix's injector) straight into a mock ISP: the sink's own ceiling.
    async fn smtp_source_phase(&self) -> Result<Option<Phase>> {
        if !Path::new("/usr/sbin/smtp-source").exists() {
            return Ok(None);
        }
        eprintln!("== smtp-source → sink");
        let sink = self.fleet.sinks().next().expect("a fleet has providers").1;
        let size = self.args.size.0.items()[0];
        let before = sink.stats().messages;
        let self0 = procfs::self_cpu_seconds();
        let t0 = Instant::now();
        let status = tokio::process::Command::new("/usr/sbin/smtp-source")
            .args(["-d", "-s", &self.args.concurrency.to_string(), "-m", &self.args.messages().to_string()])
            .args(["-l", &size.to_string(), "-f", "load@gen.load.test", "-t", "user@gmail.load.test"])
            .arg(sink.addr().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await?;
        let elapsed = t0.elapsed();
        let delivered = sink.stats().messages - before;
        let mut phase = Phase {
            system: "smtp-source → sink".into(),
            injection: "SMTP".into(),
            messages: delivered,
            injected_per_s: crate::stats::rate(delivered, elapsed),
            delivered,
            delivered_per_s: Some(crate::stats::rate(delivered, elapsed)),
            harness_cpu_seconds: procfs::self_cpu_seconds() - self0,
            ..Phase::default()
        };
        if !status.success() {
            phase.notes.push(format!("smtp-source exited with {status}"));
        }
        eprintln!("{}", markdown::phase_line(&phase));
        Ok(Some(phase))
    }

    /// The generator into Postfix's smtp-sink: the generator's own ceiling.
    async fn smtp_sink_phase(&self) -> Result<Option<Phase>> {
        if !Path::new("/usr/sbin/smtp-sink").exists() {
            return Ok(None);
        }
        eprintln!("== generator → smtp-sink");
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let mut command = tokio::process::Command::new("/usr/sbin/smtp-sink");
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            command.args(["-u", "postfix"]); // it refuses to run as root otherwise
        }
        let mut child = command
            .arg(addr.to_string())
            .arg("1000")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            if Instant::now() > deadline {
                bail!("smtp-sink did not listen on {addr}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let self0 = procfs::self_cpu_seconds();
        let report = gen::run(self.gen_config(&Inject::Smtp(addr), Pace::Closed, Stop::Count(self.args.messages())), self.cancel.clone()).await;
        let _ = child.kill().await;
        let report = report?;
        let phase = Phase {
            system: "generator → smtp-sink".into(),
            injection: "SMTP".into(),
            messages: report.messages.acknowledged,
            injected_per_s: report.throughput,
            inject_latency: report.latency.clone(),
            harness_cpu_seconds: procfs::self_cpu_seconds() - self0,
            errors: report.errors.clone(),
            ..Phase::default()
        };
        eprintln!("{}", markdown::phase_line(&phase));
        Ok(Some(phase))
    }

    /// `rados bench` 4 KiB writes with 16 in flight for 10 s: the cluster's own ceiling.
    async fn rados_bench(&self, conf: &Path) -> Option<f64> {
        eprintln!("== rados bench (4 KiB writes, 16 in flight, 10 s)");
        let out = tokio::process::Command::new("rados")
            .arg("-c")
            .arg(conf)
            .args(["-p", &self.args.ceph_pool, "bench", "10", "write", "-b", "4096", "-t", "16"])
            .output()
            .await
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let iops = text.lines().find_map(|l| l.strip_prefix("Average IOPS:")).and_then(|v| v.trim().parse().ok());
        if iops.is_none() {
            tracing::warn!(stderr = %String::from_utf8_lossy(&out.stderr), "rados bench gave no IOPS");
        }
        iops
    }
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("no free port")?;
    Ok(l.local_addr()?.port())
}

/// Runs the whole benchmark.
pub async fn run(args: BenchArgs, cancel: CancellationToken) -> Result<()> {
    if !args.sluice.exists() {
        bail!("{} does not exist: build it with `cargo build --release -p sluice` (scripts/bench.sh does)", args.sluice.display());
    }
    if !(args.dkim_sample > 0.0 && args.dkim_sample <= 1.0) {
        bail!("--dkim-sample {}: must be more than 0 and at most 1", args.dkim_sample);
    }
    if args.only.contains(&Group::Rados) && args.ceph_conf.is_none() {
        bail!("--only rados needs --ceph-conf (scripts/ceph-cluster.sh start prints it)");
    }
    let temp;
    let work = match &args.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            temp = tempfile::Builder::new().prefix("sluice-bench.").tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let machine = Machine::probe();
    let dns = TestDns::start().await?;
    let mut fleet_config = FleetConfig::builtin("accept-all").expect("built-in fleet");
    fleet_config.port = 0;
    let fleet = Fleet::start(fleet_config, FleetOptions::default()).await?;
    fleet.config().add_records(&dns)?;
    let bench = Bench {
        api_key: format!("SG.bench.{:016x}", rand::rng().random::<u64>()),
        run_id: Workload::new_run_id(),
        args: args.clone(),
        work,
        dns,
        fleet,
        cancel: cancel.clone(),
        phase_no: AtomicU64::new(0),
    };
    let mut report = BenchReport {
        date: time::OffsetDateTime::now_utc()
            .format(&time::macros::format_description!("[year]-[month]-[day] [hour]:[minute] UTC"))
            .unwrap_or_default(),
        command: args.command_line.clone(),
        revision: args.revision.clone(),
        machine,
        messages_per_phase: args.messages(),
        warmup_per_phase: args.warmup(),
        concurrency: args.concurrency,
        sizes: args.size.0.shares().map(|(s, w)| (*s, w)).collect(),
        personalizations: args.personalizations,
        ..BenchReport::default()
    };

    // 1. The tools' own ceilings.
    if args.wants(Group::Tools) {
        let sink_addr = bench.fleet.sinks().next().expect("providers").1.addr();
        let m = Measure {
            system: "generator → sink".into(),
            spool: String::new(),
            variant: String::new(),
            inject: vec![Inject::Smtp(sink_addr)],
            pace: Pace::Closed,
            pids: Vec::new(),
            dkim: false,
        };
        report.phases.push(bench.measure(m).await?);
        if !args.quick {
            for (name, phase) in [("generator → smtp-sink", bench.smtp_sink_phase().await), ("smtp-source → sink", bench.smtp_source_phase().await)] {
                match phase {
                    Ok(p) => report.phases.extend(p),
                    Err(e) => report.notes.push(format!("{name} failed: {e:#}")),
                }
            }
        }
    }
    // 2. sluice, local spool (the SMTP row is also the DKIM rows' baseline).
    let local = SluiceSetup::new(SpoolChoice::Local);
    let dkim = args.wants(Group::Dkim) && !args.no_dkim;
    if args.wants(Group::Local) || dkim {
        report.phases.push(bench.sluice_phase(&local, "", |s| Inject::Smtp(s.smtp()), Pace::Closed).await?);
    }
    // 3. The same with DKIM, next to the signing ceiling.
    if dkim {
        if let Err(e) = bench.dkim_phases(&mut report).await {
            report.notes.push(format!("DKIM phase failed: {e:#}"));
        }
    }
    if args.wants(Group::Local) {
        let http1 = bench.sluice_phase(&local, "", |s| Inject::Http { addr: s.http(), personalizations: 1 }, Pace::Closed).await?;
        let half = http1.injected_per_s / 2.0;
        report.phases.push(http1);
        if !args.quick {
            let p = args.personalizations;
            report.phases.push(bench.sluice_phase(&local, "", |s| Inject::Http { addr: s.http(), personalizations: p }, Pace::Closed).await?);
            if half >= 1.0 {
                let open = Pace::Open { rate: half.round() };
                report.phases.push(bench.sluice_phase(&local, "", |s| Inject::Http { addr: s.http(), personalizations: 1 }, open).await?);
            }
        }
    }
    // 4. sluice, Ceph spool: one process, then two edges and two MTAs on one pool.
    if let Some(conf) = args.ceph_conf.as_ref().filter(|_| args.wants(Group::Rados)) {
        report.rados_bench_writes_per_s = bench.rados_bench(conf).await;
        let rados = SpoolChoice::Rados {
            conf: conf.clone(),
            pool: args.ceph_pool.clone(),
            namespace: format!("bench-{}", bench.run_id),
        };
        match bench.sluice_phase(&SluiceSetup::new(rados), "", |s| Inject::Smtp(s.smtp()), Pace::Closed).await {
            Ok(p) => report.phases.push(p),
            Err(e) => report.notes.push(format!("Ceph phase failed: {e:#}")),
        }
        match bench.rados_nodes_phase(conf).await {
            Ok(p) => report.phases.push(p),
            Err(e) => report.notes.push(format!("Ceph phase with 2 edges + 2 MTAs failed: {e:#}")),
        }
    }
    // 5. Postfix.
    if !args.no_postfix && args.wants(Group::Postfix) {
        if Postfix::available() {
            match bench.postfix_phase().await {
                Ok(p) => report.phases.push(p),
                Err(e) => report.notes.push(format!("Postfix phase failed: {e:#}")),
            }
        } else {
            report.notes.push("Postfix is not installed (apt-get install postfix): no Postfix row".into());
        }
    }
    let text = markdown::section(&report);
    println!("{text}");
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.markdown {
        markdown::update_file(path, &text)?;
        eprintln!("results written to {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openssl_speed_output_gives_the_sign_rate() {
        let out = "\
Doing 2048 bits private rsa's for 3s: 12291 2048 bits private RSA's in 3.00s
version: 3.0.19
options: bn(64,64)
                  sign    verify    sign/s verify/s
rsa 2048 bits 0.000244s 0.000007s   4097.0 136000.0
";
        assert_eq!(parse_openssl_rsa2048(out), Some(4097.0));
        assert_eq!(parse_openssl_rsa2048("rsa 4096 bits 0.001s 0.0001s 600.0 20000.0\n"), None);
        assert_eq!(parse_openssl_rsa2048(""), None);
    }

    #[test]
    fn only_picks_groups_and_phase_labels_name_the_variant() {
        let args = |only: Vec<Group>| BenchArgs {
            sluice: "s".into(),
            messages: None,
            warmup: None,
            concurrency: 1,
            size: "5k".parse().unwrap(),
            personalizations: 10,
            ceph_conf: None,
            ceph_pool: "sluice".into(),
            no_postfix: false,
            no_dkim: false,
            dkim_sample: 0.1,
            only,
            quick: true,
            work_dir: None,
            markdown: None,
            json: None,
            command_line: String::new(),
            revision: String::new(),
        };
        assert!(args(vec![]).wants(Group::Rados));
        let a = args(vec![Group::Dkim, Group::Tools]);
        assert!(a.wants(Group::Dkim) && a.wants(Group::Tools) && !a.wants(Group::Local));
        assert_eq!((a.messages(), a.warmup()), (5_000, 500), "--quick defaults");
        let p = Phase { system: "sluice".into(), variant: "DKIM RSA-2048".into(), ..Phase::default() };
        assert_eq!(p.label(), "sluice (DKIM RSA-2048)");
        assert_eq!(Phase { system: "sluice".into(), ..Phase::default() }.label(), "sluice");
    }
}
