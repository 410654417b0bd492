//! An SMTP server that accepts mail and remembers it: the mock remote MX that sluice's MTA
//! delivers to in tests and load runs.
//!
//! It speaks ESMTP with PIPELINING, optional STARTTLS (self-signed), SIZE, 8BITMIME and
//! SMTPUTF8, answers according to a [`Scenario`] after a per-stage [`Latency`], enforces
//! per-client-IP [`Limits`] with 421 replies, and records every accepted message (the
//! envelope, the raw data, the connection it came over and whether that was TLS) plus
//! counters per stage. A [`Tracker`] follows the Message-IDs (duplicates, a ledger),
//! end-to-end latency and DKIM of what arrives; a [`Fleet`] runs several providers, each
//! described by a [`Profile`] file, sharing one tracker.

mod fleet;
mod limits;
mod profile;
mod scenario;
mod session;
mod tls;
mod tracker;

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rustls_pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

pub use fleet::{Fleet, FleetConfig, FleetError, FleetOptions, FleetReport, ProviderConfig, ProviderReport, ReplyClasses};
pub use limits::{Limits, Rate};
use limits::Limiter;
pub use profile::{Profile, ProfileError};
pub use scenario::{Action, Envelope, Latency, Match, ReplySpec, Rule, Scenario, Stage};
use scenario::ScenarioState;
pub use tls::TlsSetupError;
pub use tracker::{DkimCounts, DkimSampler, Observation, Tracker, TrackerReport};

/// How the sink presents itself.
#[derive(Clone, Debug)]
pub struct SinkConfig {
    /// The name in the banner and EHLO reply, and in the certificate.
    pub hostname: String,
    /// Offer STARTTLS with a self-signed certificate.
    pub starttls: bool,
    /// Advertise PIPELINING.
    pub pipelining: bool,
    /// Advertised as SIZE; larger messages are refused with `552 5.3.4`.
    pub max_message_bytes: usize,
    /// Keep accepted messages in memory (turn off for long load runs; counters still count).
    pub record_messages: bool,
    pub scenario: Scenario,
    /// How long each reply takes.
    pub latency: Latency,
    /// Per-client-IP limits, enforced with 421.
    pub limits: Limits,
    /// Where accepted messages are tracked; a sink makes its own when `None`. Sinks of one
    /// fleet share one, so a message delivered twice to different providers is a duplicate.
    pub tracker: Option<Arc<Tracker>>,
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            hostname: "sink.test".into(),
            starttls: false,
            pipelining: true,
            max_message_bytes: 50 << 20,
            record_messages: true,
            scenario: Scenario::standard(),
            latency: Latency::default(),
            limits: Limits::default(),
            tracker: None,
        }
    }
}

/// One message the sink accepted.
#[derive(Clone, Debug)]
pub struct ReceivedMessage {
    /// The connection it came over (1, 2, ... in order of acceptance).
    pub connection: u64,
    pub peer: SocketAddr,
    /// Whether the connection had switched to TLS.
    pub tls: bool,
    /// The EHLO/HELO name the client gave.
    pub helo: String,
    pub mail_from: String,
    /// The recipients that were accepted.
    pub rcpt_to: Vec<String>,
    /// The message as received, dot-unstuffed, ending with CRLF.
    pub data: Bytes,
    /// When the sink accepted it (after the end-of-data reply was chosen).
    pub at: std::time::Instant,
}

/// Counters since start.
#[derive(Clone, Debug, Default)]
pub struct SinkStats {
    pub connections: u64,
    pub tls_connections: u64,
    pub messages: u64,
    /// Recipients of accepted messages.
    pub recipients: u64,
    /// Accepted messages whose Message-ID had arrived before.
    pub duplicates: u64,
    /// Connections and messages refused by the [`Limits`].
    pub limited: u64,
    /// RSET commands received.
    pub rsets: u64,
    /// Commands received, per stage (`connect` counts connections that got this far).
    pub commands: HashMap<Stage, u64>,
    /// Replies sent, per stage and code.
    pub replies: HashMap<(Stage, u16), u64>,
}

impl SinkStats {
    pub fn commands_at(&self, stage: Stage) -> u64 {
        self.commands.get(&stage).copied().unwrap_or(0)
    }

    /// Replies sent at `stage` whose code is in `codes` (e.g. `400..500`).
    pub fn replies_at(&self, stage: Stage, codes: std::ops::Range<u16>) -> u64 {
        self.replies.iter().filter(|((s, c), _)| *s == stage && codes.contains(c)).map(|(_, n)| n).sum()
    }
}

/// State shared by the sink's connections.
pub(crate) struct Shared {
    config: SinkConfig,
    scenario: Mutex<Arc<ScenarioState>>,
    limiter: Limiter,
    tracker: Arc<Tracker>,
    tls: Option<TlsAcceptor>,
    messages: Mutex<Vec<ReceivedMessage>>,
    stats: Mutex<SinkStats>,
    next_connection: AtomicU64,
    changed: Notify,
}

impl Shared {
    fn scenario(&self) -> Arc<ScenarioState> {
        self.scenario.lock().expect("sink lock").clone()
    }

    fn count(&self, f: impl FnOnce(&mut SinkStats)) {
        f(&mut self.stats.lock().expect("sink lock"));
        self.changed.notify_waiters();
    }

    fn record(&self, msg: ReceivedMessage) {
        tracing::debug!(
            connection = msg.connection,
            tls = msg.tls,
            from = %msg.mail_from,
            to = ?msg.rcpt_to,
            bytes = msg.data.len(),
            "sink accepted a message"
        );
        let rcpts = msg.rcpt_to.len() as u64;
        let seen = self.tracker.observe_quietly(&msg.data);
        if self.config.record_messages {
            self.messages.lock().expect("sink lock").push(msg);
        }
        self.count(|s| {
            s.messages += 1;
            s.recipients += rcpts;
            s.duplicates += u64::from(seen.duplicate);
        });
        self.tracker.notify_changed();
    }
}

/// A running sink. Stops accepting and closes its connections when dropped.
pub struct Sink {
    addr: SocketAddr,
    shared: Arc<Shared>,
    certificate: Option<CertificateDer<'static>>,
    cancel: CancellationToken,
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    #[error("invalid sink configuration: {0}")]
    Config(String),
}

impl Sink {
    /// Starts a sink on 127.0.0.1 with a free port.
    pub async fn start(config: SinkConfig) -> Result<Sink, SinkError> {
        Sink::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), config).await
    }

    pub async fn bind(addr: SocketAddr, config: SinkConfig) -> Result<Sink, SinkError> {
        config.scenario.validate().map_err(SinkError::Config)?;
        config.limits.validate().map_err(|e| SinkError::Config(format!("limits.{e}")))?;
        let (tls, certificate) = if config.starttls {
            let (acceptor, cert) = tls::self_signed_acceptor(&config.hostname)?;
            (Some(acceptor), Some(cert))
        } else {
            (None, None)
        };
        let listener = TcpListener::bind(addr).await.map_err(|source| SinkError::Bind { addr, source })?;
        let addr = listener.local_addr().map_err(|source| SinkError::Bind { addr, source })?;
        let shared = Arc::new(Shared {
            scenario: Mutex::new(Arc::new(ScenarioState::new(config.scenario.clone()))),
            limiter: Limiter::new(config.limits.clone()),
            tracker: config.tracker.clone().unwrap_or_default(),
            config,
            tls,
            messages: Mutex::new(Vec::new()),
            stats: Mutex::new(SinkStats::default()),
            next_connection: AtomicU64::new(1),
            changed: Notify::new(),
        });
        let cancel = CancellationToken::new();
        tokio::spawn(accept_loop(listener, shared.clone(), cancel.clone()));
        Ok(Sink { addr, shared, certificate, cancel })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The self-signed certificate offered with STARTTLS, if enabled.
    pub fn certificate(&self) -> Option<&CertificateDer<'static>> {
        self.certificate.as_ref()
    }

    /// Replaces the scenario (and forgets the `times` counters of the old one).
    pub fn set_scenario(&self, scenario: Scenario) {
        *self.shared.scenario.lock().expect("sink lock") = Arc::new(ScenarioState::new(scenario));
    }

    /// The messages accepted so far, in order.
    pub fn messages(&self) -> Vec<ReceivedMessage> {
        self.shared.messages.lock().expect("sink lock").clone()
    }

    pub fn stats(&self) -> SinkStats {
        self.shared.stats.lock().expect("sink lock").clone()
    }

    /// The most connections each client IP had open at once (refused ones not counted).
    pub fn peak_connections(&self) -> HashMap<std::net::IpAddr, u32> {
        self.shared.limiter.peaks()
    }

    /// Where this sink's accepted messages are tracked (shared with its fleet).
    pub fn tracker(&self) -> &Arc<Tracker> {
        &self.shared.tracker
    }

    pub fn hostname(&self) -> &str {
        &self.shared.config.hostname
    }

    /// Waits until `done(stats)` holds or `timeout` passes; returns whether it holds.
    pub async fn wait_for(&self, timeout: Duration, done: impl Fn(&SinkStats) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if done(&self.stats()) {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return done(&self.stats());
            }
        }
    }

    /// Waits until at least `n` messages were accepted (or `timeout` passes).
    pub async fn wait_for_messages(&self, n: u64, timeout: Duration) -> bool {
        self.wait_for(timeout, |s| s.messages >= n).await
    }

    /// Stops the sink: no new connections, open ones are closed.
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, cancel: CancellationToken) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "sink accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = cancel.cancelled() => return,
        };
        let id = shared.next_connection.fetch_add(1, Ordering::Relaxed);
        shared.count(|s| s.connections += 1);
        let (shared, cancel) = (shared.clone(), cancel.clone());
        tokio::spawn(async move {
            tokio::select! {
                r = session::serve(stream, peer, id, shared) => {
                    if let Err(e) = r {
                        tracing::debug!(connection = id, error = %e, "sink connection ended with an error");
                    }
                }
                _ = cancel.cancelled() => {}
            }
        });
    }
}
