//! The load generator: workers that inject over SMTP or the SendGrid v3 HTTP API, either as
//! fast as their connections allow (closed loop) or at a fixed rate (open loop), for a count
//! of messages or a duration, after a warm-up that is left out of the results.
//!
//! In the open loop, every request has an intended send time (`start + i × interval`); its
//! latency is measured from that time, not from when a worker got round to sending it, so a
//! stalled server shows up in the percentiles instead of silently lowering the send rate
//! (coordinated omission). The `X-Load-Sent` stamp carries the same time.

mod http;
pub mod report;
mod smtp;
mod workload;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use http::HttpTarget;
pub use report::{Counts, Report, RunInfo, Tally};
pub use smtp::{ErrorClass, SmtpTarget};
pub use workload::{is_test_domain, parse_size, Draft, Factory, SizeMix, Weighted, Workload};

use crate::ledger::{Ledger, LedgerError};
use crate::stamp;
use http::HttpSender;
use smtp::SmtpSender;

/// Where to inject.
#[derive(Clone, Debug)]
pub enum Target {
    Smtp(SmtpTarget),
    Http(HttpTarget),
}

/// How fast.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pace {
    /// Each connection sends its next request as soon as the previous one is answered.
    Closed,
    /// A fixed rate in messages per second, spread evenly; the connections share the work.
    Open { rate: f64 },
}

/// When to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// After this many measured messages (the warm-up comes on top).
    Count(u64),
    /// After the warm-up plus this long.
    Duration(Duration),
}

#[derive(Clone, Debug)]
pub struct GenConfig {
    pub target: Target,
    pub pace: Pace,
    /// Connections (workers).
    pub concurrency: usize,
    pub stop: Stop,
    /// Sent first and left out of the throughput and latency figures.
    pub warmup: Duration,
    pub workload: Workload,
    /// Write the Message-ID of every acknowledged message here.
    pub ledger: Option<PathBuf>,
    /// Show a live progress bar on the terminal.
    pub progress: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum GenError {
    #[error("invalid generator settings: {0}")]
    Config(String),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

impl GenConfig {
    fn messages_per_request(&self) -> u32 {
        match &self.target {
            Target::Smtp(_) => 1,
            Target::Http(h) => h.personalizations,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.concurrency == 0 {
            return Err("concurrency: must be at least 1".into());
        }
        match self.stop {
            Stop::Count(0) => return Err("count: must be at least 1".into()),
            Stop::Duration(d) if d.is_zero() => return Err("duration: must be more than zero".into()),
            _ => {}
        }
        if let Pace::Open { rate } = self.pace {
            if !(rate > 0.0 && rate.is_finite()) {
                return Err(format!("rate: {rate} must be more than zero"));
            }
        }
        match &self.target {
            Target::Http(h) if !(1..=1000).contains(&h.personalizations) => {
                return Err(format!("personalizations: {} must be from 1 to 1000 (the SendGrid limit)", h.personalizations));
            }
            Target::Http(h) if h.personalizations * self.workload.recipients > 1000 => {
                return Err("personalizations × recipients: a SendGrid request carries at most 1000 recipients".into());
            }
            Target::Smtp(s) if s.messages_per_connection == 0 => {
                return Err("messages_per_connection: must be at least 1".into());
            }
            _ => {}
        }
        self.workload.validate()
    }
}

/// One unit of work a worker claimed.
struct Claim {
    /// Open loop: when it is due.
    intended: Option<Instant>,
    warmup: bool,
    /// Messages in it (fewer than a full request at the very end of a count).
    messages: u32,
}

/// The schedule all workers share.
struct Plan {
    pace: Pace,
    stop: Stop,
    per_request: u32,
    start: Instant,
    warm_end: Instant,
    /// Open loop: time between requests, and how many of them fall in the warm-up.
    interval: Duration,
    warm_requests: u64,
    next_request: AtomicU64,
    measured_claimed: AtomicU64,
    cancel: CancellationToken,
}

impl Plan {
    fn claim(&self) -> Option<Claim> {
        if self.cancel.is_cancelled() {
            return None;
        }
        let per = self.per_request as u64;
        match self.pace {
            Pace::Closed => {
                let now = Instant::now();
                if let Stop::Duration(d) = self.stop {
                    if now >= self.warm_end + d {
                        return None;
                    }
                }
                if now < self.warm_end {
                    return Some(Claim { intended: None, warmup: true, messages: self.per_request });
                }
                let messages = match self.stop {
                    Stop::Count(n) => {
                        let m = self.measured_claimed.fetch_add(per, Ordering::Relaxed);
                        if m >= n {
                            return None;
                        }
                        per.min(n - m) as u32
                    }
                    Stop::Duration(_) => self.per_request,
                };
                Some(Claim { intended: None, warmup: false, messages })
            }
            Pace::Open { .. } => {
                let i = self.next_request.fetch_add(1, Ordering::Relaxed);
                let intended = self.start + self.interval.mul_f64(i as f64);
                if i < self.warm_requests {
                    return Some(Claim { intended: Some(intended), warmup: true, messages: self.per_request });
                }
                let k = i - self.warm_requests;
                let messages = match self.stop {
                    Stop::Count(n) => {
                        if k * per >= n {
                            return None;
                        }
                        per.min(n - k * per) as u32
                    }
                    Stop::Duration(d) => {
                        if intended >= self.warm_end + d {
                            return None;
                        }
                        self.per_request
                    }
                };
                Some(Claim { intended: Some(intended), warmup: false, messages })
            }
        }
    }
}

/// Counters the progress bar reads.
#[derive(Default)]
struct Live {
    acked: AtomicU64,
    failed: AtomicU64,
    measured_done: AtomicU64,
}

/// A worker's connection.
enum Conn {
    Smtp(SmtpSender),
    Http(HttpSender),
}

struct Shared {
    plan: Plan,
    factory: Arc<Factory>,
    next_seq: AtomicU64,
    live: Live,
    ledger: Option<Ledger>,
}

/// The outcome of one claim.
struct Sent {
    acked_ids: Vec<String>,
    failed: u64,
    errors: Vec<ErrorClass>,
}

impl Conn {
    async fn send(&mut self, factory: &Factory, drafts: Vec<Draft>, sent_micros: u64) -> Sent {
        match self {
            Conn::Smtp(s) => {
                let mut out = Sent { acked_ids: Vec::new(), failed: 0, errors: Vec::new() };
                for d in drafts {
                    let r = s.send(&d, sent_micros).await;
                    if r.acked {
                        out.acked_ids.push(d.message_id);
                    } else {
                        out.failed += 1;
                    }
                    out.errors.extend(r.errors);
                }
                out
            }
            Conn::Http(h) => {
                let body = factory.http_request(&drafts, sent_micros);
                match h.send(body).await {
                    Ok(()) => Sent { acked_ids: drafts.into_iter().map(|d| d.message_id).collect(), failed: 0, errors: Vec::new() },
                    Err(e) => Sent { acked_ids: Vec::new(), failed: drafts.len() as u64, errors: vec![e] },
                }
            }
        }
    }

    async fn close(&mut self) {
        if let Conn::Smtp(s) = self {
            s.close().await;
        }
    }
}

async fn worker(shared: Arc<Shared>, mut conn: Conn) -> (Tally, Tally) {
    let (mut measured, mut warm) = (Tally::default(), Tally::default());
    while let Some(claim) = shared.plan.claim() {
        if let Some(at) = claim.intended {
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                _ = shared.plan.cancel.cancelled() => break,
            }
        }
        let began = claim.intended.unwrap_or_else(Instant::now);
        // The stamp is the intended (open loop) or actual (closed loop) send time in wall-clock
        // microseconds.
        let sent_micros = stamp::now_micros().saturating_sub(began.elapsed().as_micros() as u64);
        let drafts: Vec<Draft> = {
            let mut rng = rand::rng();
            (0..claim.messages)
                .map(|_| shared.factory.random_draft(shared.next_seq.fetch_add(1, Ordering::Relaxed), &mut rng))
                .collect()
        };
        let sent = conn.send(&shared.factory, drafts, sent_micros).await;
        let done = Instant::now();
        if let Some(ledger) = &shared.ledger {
            if let Err(e) = ledger.record(sent.acked_ids.iter().map(String::as_str)) {
                tracing::error!(error = %e, "sent ledger");
            }
        }
        let acked = sent.acked_ids.len() as u64;
        shared.live.acked.fetch_add(acked, Ordering::Relaxed);
        shared.live.failed.fetch_add(sent.failed, Ordering::Relaxed);
        let tally = if claim.warmup { &mut warm } else { &mut measured };
        if !claim.warmup {
            shared.live.measured_done.fetch_add(acked + sent.failed, Ordering::Relaxed);
        }
        tally.record(acked, sent.failed, sent.errors, done - began, done.into_std());
    }
    conn.close().await;
    (measured, warm)
}

/// Runs the generator until its stop condition or `cancel`; returns the report.
pub async fn run(config: GenConfig, cancel: CancellationToken) -> Result<Report, GenError> {
    run_spread(config, Vec::new(), cancel).await
}

/// [`run`] with the connections spread round-robin over `config.target` and `more` (all of
/// one transport), as a load balancer would spread them over several edge nodes: connection
/// i goes to target i mod n. One schedule, one report.
pub async fn run_spread(config: GenConfig, more: Vec<Target>, cancel: CancellationToken) -> Result<Report, GenError> {
    config.validate().map_err(GenError::Config)?;
    let targets: Vec<Target> = std::iter::once(config.target.clone()).chain(more).collect();
    for (i, t) in targets.iter().enumerate().skip(1) {
        let same_kind = match (&config.target, t) {
            (Target::Smtp(_), Target::Smtp(_)) => true,
            (Target::Http(a), Target::Http(b)) => a.personalizations == b.personalizations,
            _ => false,
        };
        if !same_kind {
            return Err(GenError::Config(format!(
                "targets[{i}]: every target must use the transport (and personalizations) of the first"
            )));
        }
        GenConfig { target: t.clone(), ..config.clone() }.validate().map_err(|e| GenError::Config(format!("targets[{i}]: {e}")))?;
    }
    if targets.len() > config.concurrency {
        return Err(GenError::Config(format!(
            "concurrency: {} connections cannot spread over {} targets; use at least one per target",
            config.concurrency,
            targets.len()
        )));
    }
    let factory = Factory::new(config.workload.clone()).map_err(GenError::Config)?;
    let ledger = config.ledger.as_ref().map(Ledger::create).transpose()?;
    let per_request = config.messages_per_request();
    let interval = match config.pace {
        Pace::Open { rate } => Duration::from_secs_f64(per_request as f64 / rate),
        Pace::Closed => Duration::ZERO,
    };
    let warm_requests = if interval.is_zero() { 0 } else { (config.warmup.as_secs_f64() / interval.as_secs_f64()).ceil() as u64 };
    let start = Instant::now();
    let shared = Arc::new(Shared {
        plan: Plan {
            pace: config.pace,
            stop: config.stop,
            per_request,
            start,
            warm_end: start + config.warmup,
            interval,
            warm_requests,
            next_request: AtomicU64::new(0),
            measured_claimed: AtomicU64::new(0),
            cancel: cancel.child_token(),
        },
        factory: factory.clone(),
        next_seq: AtomicU64::new(1),
        live: Live::default(),
        ledger,
    });
    let progress = config.progress.then(|| start_progress(&config, shared.clone()));
    let mut workers = Vec::new();
    for i in 0..config.concurrency {
        let conn = match &targets[i % targets.len()] {
            Target::Smtp(t) => Conn::Smtp(SmtpSender::new(Arc::new(t.clone()), factory.clone())),
            Target::Http(t) => Conn::Http(HttpSender::new(Arc::new(t.clone()))),
        };
        workers.push(tokio::spawn(worker(shared.clone(), conn)));
    }
    let (mut measured, mut warm) = (Tally::default(), Tally::default());
    for w in workers {
        let (m, wu) = w.await.expect("generator worker panicked");
        measured.merge(m);
        warm.merge(wu);
    }
    if let Some((bar, ticker)) = progress {
        ticker.abort();
        bar.finish_and_clear();
    }
    if let Some(l) = &shared.ledger {
        l.flush()?;
    }
    let w = &config.workload;
    let run = RunInfo {
        transport: match config.target {
            Target::Smtp(_) => "smtp",
            Target::Http(_) => "http",
        }
        .into(),
        mode: match config.pace {
            Pace::Closed => "closed",
            Pace::Open { .. } => "open",
        }
        .into(),
        concurrency: config.concurrency,
        target_rate: match config.pace {
            Pace::Open { rate } => Some(rate),
            Pace::Closed => None,
        },
        messages_per_request: per_request,
        sizes: w.sizes.0.shares().map(|(s, share)| (*s, share)).collect(),
        attachments: w.attachments,
        recipients_per_message: w.recipients,
        run_id: w.run_id.clone(),
        warmup_seconds: config.warmup.as_secs_f64(),
        ledger: shared.ledger.as_ref().map(|l| l.path().display().to_string()),
    };
    let measured_from = match config.pace {
        Pace::Open { .. } => start + interval.mul_f64(warm_requests as f64),
        Pace::Closed => start + config.warmup,
    };
    Ok(Report::build(run, &measured, &warm, measured_from.into_std()))
}

/// A progress bar (on stderr, hidden when that is not a terminal) with the current rate and
/// the errors so far, and the task that updates it.
fn start_progress(config: &GenConfig, shared: Arc<Shared>) -> (ProgressBar, tokio::task::JoinHandle<()>) {
    let (bar, by_count) = match config.stop {
        Stop::Count(n) => (ProgressBar::new(n), true),
        Stop::Duration(d) => (ProgressBar::new(d.as_secs().max(1)), false),
    };
    let template = if by_count {
        "{spinner} {elapsed_precise} [{bar:30}] {pos}/{len} msgs  {msg}"
    } else {
        "{spinner} {elapsed_precise} [{bar:30}] {pos}/{len} s  {msg}"
    };
    bar.set_style(ProgressStyle::with_template(template).expect("valid template").progress_chars("=> "));
    let (b, warmup) = (bar.clone(), config.warmup);
    let ticker = tokio::spawn(async move {
        let mut last = (Instant::now(), 0u64);
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            let now = Instant::now();
            let acked = shared.live.acked.load(Ordering::Relaxed);
            let failed = shared.live.failed.load(Ordering::Relaxed);
            let rate = (acked - last.1) as f64 / now.duration_since(last.0).as_secs_f64().max(1e-3);
            last = (now, acked);
            let phase = if now < shared.plan.warm_end { "warming up · " } else { "" };
            b.set_message(format!("{phase}{:.0} msgs/s · {acked} acked · {failed} errors", rate));
            if by_count {
                b.set_position(shared.live.measured_done.load(Ordering::Relaxed));
            } else {
                b.set_position(now.saturating_duration_since(shared.plan.start + warmup).as_secs());
            }
        }
    });
    (bar, ticker)
}
