//! The benchmark harness (`sluice-load bench`, run by `scripts/bench.sh`): in one run, on one
//! machine, it measures
//!
//! 1. the ceiling of the tools themselves: generator → mock ISP, and against Postfix's
//!    smtp-source and smtp-sink, so we know the tools are not the bottleneck;
//! 2. sluice on the local spool, injected over SMTP, over HTTP with one message per request
//!    and with many, and HTTP at a fixed rate of half the maximum for the 202 latency;
//! 3. sluice on a Ceph spool, when a cluster's conf is given (and `rados bench` on it);
//! 4. Postfix relaying the same SMTP workload to the same mock ISPs;
//!
//! and reports injected/s, delivered/s (to the N-th unique arrival at the mock ISPs),
//! end-to-end latency (from the generator's `X-Load-Sent` stamp), CPU seconds per message and
//! peak RSS of the system under test, as text, JSON and a Markdown section for
//! docs/benchmarks.md. Every system runs alone with the same generator and sinks, phase after
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
use crate::sink::{Fleet, FleetConfig, FleetOptions};
use crate::stats::Percentiles;
pub use servers::{sluice_config, SpoolChoice};
use servers::{Postfix, Sluice};

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
    pub errors: BTreeMap<String, u64>,
    pub notes: Vec<String>,
}

impl Phase {
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

/// Samples the peak memory (PSS) of a process tree until dropped.
struct RssSampler {
    peak_kb: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let (peak_kb, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let (p, s) = (peak_kb.clone(), stop.clone());
        tokio::task::spawn_blocking(move || {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(procfs::tree_pss_kb(pid), Ordering::Relaxed);
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

impl BenchArgs {
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

    fn gen_config(&self, inject: &Inject, pace: Pace, stop: Stop) -> GenConfig {
        let timeout = Duration::from_secs(60);
        let target = match inject {
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
        };
        GenConfig {
            target,
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

    /// Injects into `inject`, waits for delivery, and measures the system `pid` (if any).
    async fn measure(&self, system: &str, spool: &str, inject: Inject, pace: Pace, pid: Option<u32>) -> Result<Phase> {
        let label = match pace {
            Pace::Closed => inject.label(),
            Pace::Open { rate } => format!("{} at {} msgs/s", inject.label(), crate::stats::thousands(rate)),
        };
        eprintln!("== {system} · {spool} · {label}");
        let tracker = self.fleet.tracker().clone();
        if self.args.warmup() > 0 {
            let base = tracker.unique();
            let warm = gen::run(self.gen_config(&inject, Pace::Closed, Stop::Count(self.args.warmup())), self.cancel.clone()).await?;
            if warm.messages.acknowledged == 0 {
                bail!("{system}: no message of the warm-up was accepted ({:?})", warm.errors);
            }
            // The warm-up's mail drains before measuring starts (its ids are new, so the
            // unique count rises by exactly what was acknowledged).
            self.wait_delivered(base + warm.messages.acknowledged, self.args.warmup()).await;
        }
        let stop = match pace {
            Pace::Closed => Stop::Count(self.args.messages()),
            // Ten seconds at the rate, at most the phase's message count.
            Pace::Open { rate } => Stop::Count(((rate * 10.0) as u64).clamp(1, self.args.messages())),
        };
        let before_unique = tracker.unique();
        tracker.take_latency();
        let cpu0 = pid.and_then(procfs::tree_cpu_seconds);
        let self0 = procfs::self_cpu_seconds();
        let rss = pid.map(RssSampler::start);
        let t0 = Instant::now();
        let report = gen::run(self.gen_config(&inject, pace, stop), self.cancel.clone()).await?;
        let acked = report.messages.acknowledged;
        let all_delivered = self.wait_delivered(before_unique + acked, acked).await;
        let elapsed = t0.elapsed();
        let cpu1 = pid.and_then(procfs::tree_cpu_seconds);
        let harness = procfs::self_cpu_seconds() - self0;
        let delivered = tracker.unique() - before_unique;
        let peak_kb = rss.as_ref().map(|r| r.peak_kb()).unwrap_or(0);
        let mut notes = Vec::new();
        if !all_delivered {
            notes.push(format!("only {delivered} of {acked} acknowledged messages were delivered in time"));
        }
        let phase = Phase {
            system: system.into(),
            spool: spool.into(),
            injection: label,
            messages: acked,
            injected_per_s: report.throughput,
            delivered,
            delivered_per_s: Some(crate::stats::rate(delivered, elapsed)),
            end_to_end: Some(Percentiles::of(&tracker.take_latency())),
            inject_latency: report.latency.clone(),
            cpu_seconds: cpu0.zip(cpu1).map(|(a, b)| b - a),
            harness_cpu_seconds: harness,
            peak_memory_mib: pid.map(|_| peak_kb as f64 / 1024.0),
            errors: report.errors.clone(),
            notes,
        };
        eprintln!("{}", markdown::phase_line(&phase));
        Ok(phase)
    }

    fn phase_dir(&self, name: &str) -> PathBuf {
        self.work.join(format!("{:02}-{name}", self.phase_no.load(Ordering::Relaxed)))
    }

    /// Starts sluice on `spool`, runs one measurement, stops it.
    async fn sluice_phase(&self, spool: &SpoolChoice, inject: impl Fn(&Sluice) -> Inject, pace: Pace) -> Result<Phase> {
        let dir = self.phase_dir(&format!("sluice-{}", spool.name()));
        let config = sluice_config(&dir, &self.api_key, self.fleet.port(), self.dns.addr(), spool);
        let sluice = Sluice::start(&self.args.sluice, &dir, &config).await?;
        let result = self.measure("sluice", spool.name(), inject(&sluice), pace, Some(sluice.pid)).await;
        sluice.stop().await?;
        result
    }

    async fn postfix_phase(&self) -> Result<Phase> {
        let dir = self.phase_dir("postfix");
        let port = free_port()?;
        let postfix = Postfix::start(&dir, SocketAddr::from(([127, 0, 0, 1], port)), self.fleet.config(), self.fleet.port()).await?;
        let system = format!("Postfix {}", postfix.version);
        let (smtp, pid) = (postfix.smtp, postfix.master_pid);
        let result = self.measure(&system, "queue files", Inject::Smtp(smtp), Pace::Closed, Some(pid)).await;
        postfix.stop();
        result
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
    let sink_addr = bench.fleet.sinks().next().expect("providers").1.addr();
    report.phases.push(bench.measure("generator → sink", "", Inject::Smtp(sink_addr), Pace::Closed, None).await?);
    if !args.quick {
        for (name, phase) in [("generator → smtp-sink", bench.smtp_sink_phase().await), ("smtp-source → sink", bench.smtp_source_phase().await)] {
            match phase {
                Ok(p) => report.phases.extend(p),
                Err(e) => report.notes.push(format!("{name} failed: {e:#}")),
            }
        }
    }
    // 2. sluice, local spool.
    let local = SpoolChoice::Local;
    report.phases.push(bench.sluice_phase(&local, |s| Inject::Smtp(s.smtp), Pace::Closed).await?);
    let http1 = bench.sluice_phase(&local, |s| Inject::Http { addr: s.http, personalizations: 1 }, Pace::Closed).await?;
    let half = http1.injected_per_s / 2.0;
    report.phases.push(http1);
    if !args.quick {
        let p = args.personalizations;
        report.phases.push(bench.sluice_phase(&local, |s| Inject::Http { addr: s.http, personalizations: p }, Pace::Closed).await?);
        if half >= 1.0 {
            report.phases.push(bench.sluice_phase(&local, |s| Inject::Http { addr: s.http, personalizations: 1 }, Pace::Open { rate: half.round() }).await?);
        }
    }
    // 3. sluice, Ceph spool.
    if let Some(conf) = &args.ceph_conf {
        report.rados_bench_writes_per_s = bench.rados_bench(conf).await;
        let rados = SpoolChoice::Rados {
            conf: conf.clone(),
            pool: args.ceph_pool.clone(),
            namespace: format!("bench-{}", bench.run_id),
        };
        match bench.sluice_phase(&rados, |s| Inject::Smtp(s.smtp), Pace::Closed).await {
            Ok(p) => report.phases.push(p),
            Err(e) => report.notes.push(format!("Ceph phase failed: {e:#}")),
        }
    }
    // 4. Postfix.
    if !args.no_postfix {
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
