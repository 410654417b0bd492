//! What the sinks learn from the mail itself, across all providers of a fleet: which
//! Message-IDs arrived (duplicates are counted), the end-to-end latency from the generator's
//! `X-Load-Sent` header, a ledger of received ids, and DKIM results for a sample.

use std::collections::HashSet;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::Resolver;
use mail_auth::{AuthenticatedMessage, DkimResult, MessageAuthenticator, Parameters};
use serde::Serialize;
use tokio::sync::{Notify, Semaphore};

use crate::ledger::{Ledger, LedgerError};
use crate::stamp;
use crate::stats::{latency_histogram, record, Percentiles};

/// What the tracker knows, at one moment.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct TrackerReport {
    /// Messages with a Message-ID not seen before.
    pub unique: u64,
    /// Messages whose Message-ID had arrived before (on any provider of the fleet).
    pub duplicates: u64,
    /// Messages without a Message-ID (not counted as unique or duplicate).
    pub without_message_id: u64,
    /// From `X-Load-Sent` to the end of DATA, for messages that carry it.
    pub end_to_end: Percentiles,
    pub dkim: DkimCounts,
}

/// DKIM verification results of the sampled messages.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DkimCounts {
    pub checked: u64,
    /// At least one signature verified.
    pub pass: u64,
    /// Signed, but no signature verified (bad signature, key not found, malformed).
    pub fail: u64,
    /// The key lookup failed temporarily.
    pub temperror: u64,
    /// No DKIM-Signature header.
    pub unsigned: u64,
    /// Sampled but skipped because too many verifications were already running.
    pub skipped: u64,
}

struct Seen {
    /// 64-bit hashes of the Message-IDs: 8 bytes per message instead of the id itself. Two
    /// distinct ids collide with probability ~n²/2⁶⁵ (about 3·10⁻⁶ at ten million messages);
    /// the ledger keeps the full ids for exact comparison.
    ids: HashSet<u64>,
    unique: u64,
    duplicates: u64,
    without_id: u64,
    latency: Histogram<u64>,
}

/// The received mail of one sink or a whole fleet. Cheap to share (`Arc`).
pub struct Tracker {
    seen: Mutex<Seen>,
    ledger: Option<Ledger>,
    /// Replaceable while running: a benchmark verifies only the rows that sign.
    dkim: Mutex<Option<Arc<DkimSampler>>>,
    changed: Notify,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker").field("ledger", &self.ledger).field("dkim", &self.dkim_sampler().is_some()).finish()
    }
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker::new()
    }
}

/// What the tracker made of one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observation {
    pub duplicate: bool,
}

impl Tracker {
    pub fn new() -> Tracker {
        Tracker {
            seen: Mutex::new(Seen {
                ids: HashSet::new(),
                unique: 0,
                duplicates: 0,
                without_id: 0,
                latency: latency_histogram(),
            }),
            ledger: None,
            dkim: Mutex::new(None),
            changed: Notify::new(),
        }
    }

    /// Writes every received Message-ID (duplicates too) to `ledger`.
    pub fn with_ledger(mut self, ledger: Ledger) -> Tracker {
        self.ledger = Some(ledger);
        self
    }

    /// Verifies the DKIM signatures of a sample of the messages.
    pub fn with_dkim(self, dkim: DkimSampler) -> Tracker {
        self.set_dkim(Some(dkim));
        self
    }

    /// Starts verifying a sample with `dkim` (its counts start at zero), or stops (`None`);
    /// returns the sampler it replaces, whose [`settled`](DkimSampler::settled) counts are
    /// that sampler's final results.
    pub fn set_dkim(&self, dkim: Option<DkimSampler>) -> Option<Arc<DkimSampler>> {
        std::mem::replace(&mut *self.dkim.lock().expect("tracker lock"), dkim.map(Arc::new))
    }

    /// The sampler verifying DKIM now, if any.
    pub fn dkim_sampler(&self) -> Option<Arc<DkimSampler>> {
        self.dkim.lock().expect("tracker lock").clone()
    }

    /// Takes note of one accepted message (the data as received, dot-unstuffed) and wakes
    /// the waiters.
    pub fn observe(&self, data: &Bytes) -> Observation {
        let seen = self.observe_quietly(data);
        self.changed.notify_waiters();
        seen
    }

    /// [`observe`](Self::observe) without waking the waiters: a sink first updates its own
    /// counters, so that whoever waits on the tracker finds them up to date.
    pub(crate) fn observe_quietly(&self, data: &Bytes) -> Observation {
        let stamp = stamp::scan(data);
        let now = stamp::now_micros();
        let duplicate = {
            let mut seen = self.seen.lock().expect("tracker lock");
            if let Some(sent) = stamp.sent_micros {
                record(&mut seen.latency, Duration::from_micros(now.saturating_sub(sent)));
            }
            match stamp.message_id {
                None => {
                    seen.without_id += 1;
                    false
                }
                Some(id) => {
                    let mut h = DefaultHasher::new();
                    id.hash(&mut h);
                    if seen.ids.insert(h.finish()) {
                        seen.unique += 1;
                        false
                    } else {
                        seen.duplicates += 1;
                        true
                    }
                }
            }
        };
        if let (Some(ledger), Some(id)) = (&self.ledger, stamp.message_id) {
            if let Err(e) = ledger.record([id]) {
                tracing::error!(error = %e, "received ledger");
            }
        }
        if let Some(dkim) = self.dkim_sampler() {
            dkim.maybe_verify(data);
        }
        Observation { duplicate }
    }

    pub(crate) fn notify_changed(&self) {
        self.changed.notify_waiters();
    }

    pub fn report(&self) -> TrackerReport {
        let seen = self.seen.lock().expect("tracker lock");
        TrackerReport {
            unique: seen.unique,
            duplicates: seen.duplicates,
            without_message_id: seen.without_id,
            end_to_end: Percentiles::of(&seen.latency),
            dkim: self.dkim_sampler().map(|d| d.counts()).unwrap_or_default(),
        }
    }

    /// Messages with a new Message-ID so far.
    pub fn unique(&self) -> u64 {
        self.seen.lock().expect("tracker lock").unique
    }

    /// Returns the end-to-end latencies recorded so far and starts a new histogram (one per
    /// benchmark phase).
    pub fn take_latency(&self) -> Histogram<u64> {
        std::mem::replace(&mut self.seen.lock().expect("tracker lock").latency, latency_histogram())
    }

    /// Waits until at least `n` unique messages arrived or `timeout` passed; returns whether
    /// they did.
    pub async fn wait_unique(&self, n: u64, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.unique() >= n {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.unique() >= n;
            }
        }
    }

    pub fn ledger(&self) -> Option<&Ledger> {
        self.ledger.as_ref()
    }

    /// Flushes the ledger.
    pub fn flush(&self) -> Result<(), LedgerError> {
        self.ledger.as_ref().map_or(Ok(()), |l| l.flush())
    }
}

/// Verifies DKIM on every n-th message, with the keys looked up in DNS (the test DNS server),
/// in background tasks so the SMTP replies are not delayed; when too many verifications
/// are running, samples are skipped rather than queued.
pub struct DkimSampler {
    authenticator: MessageAuthenticator,
    every: u64,
    counter: AtomicU64,
    running: Arc<Semaphore>,
    counts: Arc<Mutex<DkimCounts>>,
}

/// Verifications running at once, at most.
const DKIM_CONCURRENCY: usize = 8;

impl DkimSampler {
    /// Verifies a `sample` (0 < sample ≤ 1) of the messages, asking the DNS server at `dns`.
    pub fn new(dns: SocketAddr, sample: f64) -> Result<DkimSampler, String> {
        if !(sample > 0.0 && sample <= 1.0) {
            return Err(format!("dkim_sample: {sample} must be more than 0 and at most 1"));
        }
        let mut udp = ConnectionConfig::udp();
        udp.port = dns.port();
        let mut tcp = ConnectionConfig::tcp();
        tcp.port = dns.port();
        let ns = NameServerConfig::new(dns.ip(), true, vec![udp, tcp]);
        let mut opts = ResolverOpts::default();
        opts.timeout = Duration::from_secs(2);
        opts.attempts = 2;
        let resolver =
            Resolver::builder_with_config(ResolverConfig::from_parts(None, vec![], vec![ns]), TokioRuntimeProvider::default())
                .with_options(opts)
                .build()
                .map_err(|e| format!("dkim: cannot build a resolver for {dns}: {e}"))?;
        Ok(DkimSampler {
            authenticator: MessageAuthenticator(resolver),
            every: (1.0 / sample).round().max(1.0) as u64,
            counter: AtomicU64::new(0),
            running: Arc::new(Semaphore::new(DKIM_CONCURRENCY)),
            counts: Arc::new(Mutex::new(DkimCounts::default())),
        })
    }

    pub fn counts(&self) -> DkimCounts {
        self.counts.lock().expect("dkim lock").clone()
    }

    /// The counts once the verifications already started have finished (or `timeout`
    /// passed; the unfinished ones are then left out).
    pub async fn settled(&self, timeout: Duration) -> DkimCounts {
        let _all = tokio::time::timeout(timeout, self.running.acquire_many(DKIM_CONCURRENCY as u32)).await;
        self.counts()
    }

    fn maybe_verify(&self, data: &Bytes) {
        if !self.counter.fetch_add(1, Ordering::Relaxed).is_multiple_of(self.every) {
            return;
        }
        let Ok(permit) = self.running.clone().try_acquire_owned() else {
            self.counts.lock().expect("dkim lock").skipped += 1;
            return;
        };
        let (authenticator, counts, data) = (self.authenticator.clone(), self.counts.clone(), data.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let result = verify(&authenticator, &data).await;
            let mut c = counts.lock().expect("dkim lock");
            c.checked += 1;
            match result {
                Verdict::Pass => c.pass += 1,
                Verdict::Fail => c.fail += 1,
                Verdict::TempError => c.temperror += 1,
                Verdict::Unsigned => c.unsigned += 1,
            }
        });
    }
}

enum Verdict {
    Pass,
    Fail,
    TempError,
    Unsigned,
}

async fn verify(authenticator: &MessageAuthenticator, data: &[u8]) -> Verdict {
    let Some(message) = AuthenticatedMessage::parse(data) else { return Verdict::Fail };
    let outputs = authenticator.verify_dkim(Parameters::new(&message)).await;
    if outputs.is_empty() {
        Verdict::Unsigned
    } else if outputs.iter().any(|o| *o.result() == DkimResult::Pass) {
        Verdict::Pass
    } else if outputs.iter().any(|o| matches!(o.result(), DkimResult::TempError(_))) {
        Verdict::TempError
    } else {
        Verdict::Fail
    }
}
