//! A path: one egress source sending to one provider (or, for destinations no provider
//! claims, one recipient domain). It holds the limits in force, the adaptive state the rules
//! put on it (throttles, suspensions, threshold counters), and its ready queues: one per
//! site (a set of MX hosts), because a connection can carry mail only for the hosts it is
//! connected to.

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::Serialize;
use sluice_rules::{Rate, Reply, ShapingAction, Stage};
use sluice_spool::{now_ms, Leased};
use tokio::sync::Notify;

use super::data::{Limits, Resolved};
use super::egress::Source;
use crate::outcome::Via;
use crate::route::Hop;

/// How much of a rate may be used at once: 100 ms worth, so a limit holds over any window
/// longer than that, while a connection that was scheduled late can still catch up a little.
const BURST: Duration = Duration::from_millis(100);

/// A ready queue holds about this much sending time at the path's message rate: enough to
/// keep its connections busy, little enough that leases do not run out while mail waits.
const READY_SECONDS: f64 = 30.0;

/// Who or what put a throttle or suspension on a path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Cause {
    /// `rule:<id>` or `admin`.
    pub by: String,
    /// The reply that triggered it, or the operator's reason.
    pub reason: String,
    /// When it began (ms since the epoch).
    pub since: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Suspension {
    /// When it ends (ms since the epoch).
    pub until: u64,
    pub cause: Cause,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Throttle {
    pub until: u64,
    pub messages_per_minute: Option<u32>,
    pub connections: Option<u32>,
    pub cause: Cause,
}

#[derive(Default)]
struct Adaptive {
    suspension: Option<Suspension>,
    throttle: Option<Throttle>,
    /// Per rule id, the times it matched within its threshold window.
    matches: HashMap<String, VecDeque<u64>>,
}

/// The limits in force right now, with their rate limiters.
pub(crate) struct Effective {
    pub limits: Limits,
    pub messages: Option<DefaultDirectRateLimiter>,
    pub connects: Option<DefaultDirectRateLimiter>,
    /// Most messages the path's ready queues hold.
    pub capacity: usize,
}

fn limiter(rate: &Rate) -> DefaultDirectRateLimiter {
    let burst = (rate.per_second() * BURST.as_secs_f64()).floor().clamp(1.0, f64::from(rate.count)) as u32;
    let quota = Quota::with_period(rate.interval()).expect("interval > 0").allow_burst(NonZeroU32::new(burst).expect(">= 1"));
    RateLimiter::direct(quota)
}

/// How long until `limiter` allows one more (zero: it allowed it, and counted it).
pub(crate) fn take(limiter: &DefaultDirectRateLimiter) -> Duration {
    match limiter.check() {
        Ok(()) => Duration::ZERO,
        Err(not_until) => not_until.wait_time_from(DefaultClock::default().now()).max(Duration::from_millis(1)),
    }
}

impl Effective {
    fn new(configured: &Limits, throttle: Option<&Throttle>, max_ready: usize) -> Effective {
        let mut limits = configured.clone();
        if let Some(t) = throttle {
            if let Some(c) = t.connections {
                limits.max_connections = limits.max_connections.min(c.max(1));
            }
            if let Some(m) = t.messages_per_minute.and_then(|m| Rate::new(m, Duration::from_secs(60))) {
                limits.message_rate = Some(limits.message_rate.map_or(m, |r| r.min(m)));
            }
        }
        let capacity = match &limits.message_rate {
            Some(r) => ((r.per_second() * READY_SECONDS) as usize).clamp(16, max_ready.max(16)),
            None => max_ready,
        };
        Effective {
            messages: limits.message_rate.as_ref().map(limiter),
            connects: limits.connection_rate.as_ref().map(limiter),
            limits,
            capacity,
        }
    }
}

/// Why a connection could not be made, kept so mail for a dead destination can be deferred
/// with the real reason while the site backs off.
#[derive(Clone, Debug)]
pub(crate) struct ConnectFailure {
    pub reply: Reply,
    pub stage: Stage,
    pub via: Via,
}

/// One site of a path: its hosts and the mail waiting for a connection to them.
pub(crate) struct Site {
    pub key: Arc<str>,
    pub hops: Vec<Hop>,
    queue: Mutex<VecDeque<Leased>>,
    ready: Notify,
    /// Connections waiting for mail.
    pub idle: AtomicU32,
    /// Connections being set up.
    pub connecting: AtomicU32,
    /// Connections set up and not yet closed.
    pub open: AtomicU32,
    /// Connection attempts that failed in a row; reset by a success.
    failures: AtomicU32,
    /// No new connection before this (ms since the epoch): the back-off after failures.
    retry_at: AtomicU64,
    last_failure: Mutex<Option<ConnectFailure>>,
    last_used: AtomicU64,
}

/// Back-off after `n` connection failures in a row: 1 s, 2 s, 4 s, ... up to 5 minutes.
fn connect_backoff(n: u32) -> Duration {
    Duration::from_secs(1u64 << n.saturating_sub(1).min(9)).min(Duration::from_secs(300))
}

impl Site {
    fn new(key: Arc<str>, hops: Vec<Hop>) -> Site {
        Site {
            key,
            hops,
            queue: Mutex::new(VecDeque::new()),
            ready: Notify::new(),
            idle: AtomicU32::new(0),
            connecting: AtomicU32::new(0),
            open: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            retry_at: AtomicU64::new(0),
            last_failure: Mutex::new(None),
            last_used: AtomicU64::new(now_ms()),
        }
    }

    pub fn queued(&self) -> usize {
        self.queue.lock().expect("site lock").len()
    }

    /// Whether new connections must wait (after failures), and until when.
    pub fn backing_off(&self, now: u64) -> Option<u64> {
        let at = self.retry_at.load(Ordering::Relaxed);
        (at > now).then_some(at)
    }

    /// The failure that started the current back-off.
    pub fn last_failure(&self) -> Option<ConnectFailure> {
        self.last_failure.lock().expect("site lock").clone()
    }

    pub fn connected(&self) {
        self.failures.store(0, Ordering::Relaxed);
        self.retry_at.store(0, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a failed connection attempt and starts (or extends) the back-off.
    pub fn failed(&self, failure: ConnectFailure) -> u32 {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        self.retry_at.store(now_ms() + connect_backoff(n).as_millis() as u64, Ordering::Relaxed);
        *self.last_failure.lock().expect("site lock") = Some(failure);
        n
    }

    /// Whether no connection to the site is open or being set up.
    pub fn unreachable(&self) -> bool {
        self.open.load(Ordering::Relaxed) == 0 && self.connecting.load(Ordering::Relaxed) == 0
    }

    fn push(&self, msg: Leased) {
        self.queue.lock().expect("site lock").push_back(msg);
        self.last_used.store(now_ms(), Ordering::Relaxed);
        self.ready.notify_one();
    }

    fn push_front(&self, msg: Leased) {
        self.queue.lock().expect("site lock").push_front(msg);
        self.ready.notify_one();
    }

    fn try_pop(&self) -> Option<Leased> {
        self.queue.lock().expect("site lock").pop_front()
    }

    fn drain(&self) -> Vec<Leased> {
        self.queue.lock().expect("site lock").drain(..).collect()
    }

    /// Takes the messages whose lease ends before `before` (ms since the epoch).
    fn take_expiring(&self, before: u64) -> Vec<Leased> {
        let mut q = self.queue.lock().expect("site lock");
        if !q.iter().any(|m| m.lease.until < before) {
            return Vec::new();
        }
        let (expiring, keep): (VecDeque<Leased>, VecDeque<Leased>) = q.drain(..).partition(|m| m.lease.until < before);
        *q = keep;
        expiring.into()
    }
}

/// One (egress source, provider) path.
pub struct Path {
    pub source: Arc<Source>,
    /// The provider id, or the recipient domain when no provider claims the destination.
    pub provider: Arc<str>,
    /// Whether `provider` is a provider of the rules data (not just a domain).
    pub known: bool,
    configured: ArcSwap<Resolved>,
    effective: ArcSwap<Effective>,
    adaptive: Mutex<Adaptive>,
    /// When the current suspension ends (ms since the epoch; 0: none). Read on every
    /// decision, so kept outside the lock.
    suspended_until: AtomicU64,
    sites: Mutex<HashMap<Arc<str>, Arc<Site>>>,
    /// Messages in the ready queues of all sites.
    queued: AtomicUsize,
    /// Connections open or being set up.
    pub(crate) connections: AtomicU32,
    /// Set while a timer will look for connection work again (after a rate limit or back-off).
    pub(crate) wake_pending: AtomicBool,
    /// Transactions attempted, for the current rate.
    pub(crate) sent: AtomicU64,
    /// `(time, sent)` samples, one per sweep, for the rate over the last minute.
    history: Mutex<VecDeque<(u64, u64)>>,
    last_used: AtomicU64,
    max_ready: usize,
}

/// What a shaping action did, for logs and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Applied {
    Nothing,
    /// A match counted toward a threshold that is not reached yet.
    Counted,
    Throttled(Throttle),
    Suspended(Suspension),
}

impl Path {
    pub(crate) fn new(source: Arc<Source>, provider: Arc<str>, known: bool, resolved: Resolved, max_ready: usize) -> Path {
        let effective = Effective::new(&resolved.limits, None, max_ready);
        Path {
            source,
            provider,
            known,
            configured: ArcSwap::from_pointee(resolved),
            effective: ArcSwap::from_pointee(effective),
            adaptive: Mutex::new(Adaptive::default()),
            suspended_until: AtomicU64::new(0),
            sites: Mutex::new(HashMap::new()),
            queued: AtomicUsize::new(0),
            connections: AtomicU32::new(0),
            wake_pending: AtomicBool::new(false),
            sent: AtomicU64::new(0),
            history: Mutex::new(VecDeque::new()),
            last_used: AtomicU64::new(now_ms()),
            max_ready,
        }
    }

    /// The provider label for metrics: the provider id, or `other` for plain domains (whose
    /// number has no bound).
    pub fn metric_label(&self) -> &str {
        if self.known {
            &self.provider
        } else {
            "other"
        }
    }

    pub(crate) fn effective(&self) -> arc_swap::Guard<Arc<Effective>> {
        self.effective.load()
    }

    pub fn configured(&self) -> Arc<Resolved> {
        self.configured.load_full()
    }

    /// New configured limits (the shaping data was reloaded).
    pub(crate) fn set_configured(&self, resolved: Resolved) {
        let changed = self.configured.load().limits != resolved.limits;
        self.configured.store(Arc::new(resolved));
        if changed {
            self.recompute();
        }
    }

    fn recompute(&self) {
        let adaptive = self.adaptive.lock().expect("path lock");
        let configured = self.configured.load();
        self.effective.store(Arc::new(Effective::new(&configured.limits, adaptive.throttle.as_ref(), self.max_ready)));
    }

    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// The end of the current suspension, if any.
    pub fn suspended_until(&self, now: u64) -> Option<u64> {
        let until = self.suspended_until.load(Ordering::Relaxed);
        (until > now).then_some(until)
    }

    /// Whether the dispatcher should stop feeding this path: suspended, or its ready queues full.
    pub fn blocked(&self, now: u64) -> bool {
        self.suspended_until(now).is_some() || self.queued() >= self.effective().capacity
    }

    pub fn suspension(&self) -> Option<Suspension> {
        let now = now_ms();
        self.adaptive.lock().expect("path lock").suspension.clone().filter(|s| s.until > now)
    }

    pub fn throttle(&self) -> Option<Throttle> {
        let now = now_ms();
        self.adaptive.lock().expect("path lock").throttle.clone().filter(|t| t.until > now)
    }

    /// Suspends the path until `until` (a longer suspension already in place stays).
    pub(crate) fn suspend(&self, until: u64, cause: Cause) -> Suspension {
        let mut a = self.adaptive.lock().expect("path lock");
        let s = match &a.suspension {
            Some(s) if s.until >= until => s.clone(),
            _ => Suspension { until, cause },
        };
        a.suspension = Some(s.clone());
        self.suspended_until.store(s.until, Ordering::Relaxed);
        s
    }

    /// Lifts a suspension and a throttle. Returns whether there was anything to lift.
    pub(crate) fn resume(&self) -> bool {
        let mut a = self.adaptive.lock().expect("path lock");
        let had = a.suspension.take().is_some() | a.throttle.take().is_some();
        a.matches.clear();
        self.suspended_until.store(0, Ordering::Relaxed);
        drop(a);
        self.recompute();
        had
    }

    /// Counts a match of a rule's shaping action and applies it when its threshold is
    /// reached (at once without one).
    pub(crate) fn apply(&self, rule_id: &str, action: &ShapingAction, reply: &str) -> Applied {
        let now = now_ms();
        let threshold = match action {
            ShapingAction::None => return Applied::Nothing,
            ShapingAction::Throttle { threshold, .. } | ShapingAction::Suspend { threshold, .. } => *threshold,
        };
        let mut a = self.adaptive.lock().expect("path lock");
        if let Some(t) = threshold {
            let window = t.window.as_millis() as u64;
            let seen = a.matches.entry(rule_id.to_string()).or_default();
            seen.push_back(now);
            while seen.front().is_some_and(|&at| at + window < now) {
                seen.pop_front();
            }
            if (seen.len() as u32) < t.count {
                return Applied::Counted;
            }
            seen.clear();
        }
        let cause = Cause { by: format!("rule:{rule_id}"), reason: reply.to_string(), since: now };
        match action {
            ShapingAction::None => Applied::Nothing,
            ShapingAction::Suspend { duration, .. } => {
                let until = now + duration.as_millis() as u64;
                drop(a);
                Applied::Suspended(self.suspend(until, cause))
            }
            ShapingAction::Throttle { messages_per_minute, connections, duration, .. } => {
                let until = now + duration.as_millis() as u64;
                // Two throttles at once: the stricter of each limit, until the later end.
                let t = match a.throttle.take().filter(|t| t.until > now) {
                    Some(old) => Throttle {
                        until: old.until.max(until),
                        messages_per_minute: min_opt(old.messages_per_minute, *messages_per_minute),
                        connections: min_opt(old.connections, *connections),
                        cause,
                    },
                    None => Throttle { until, messages_per_minute: *messages_per_minute, connections: *connections, cause },
                };
                a.throttle = Some(t.clone());
                drop(a);
                self.recompute();
                Applied::Throttled(t)
            }
        }
    }

    /// Ends what ran out: a throttle (limits go back up) or a suspension; forgets old
    /// threshold matches. Called by the sweeper.
    pub(crate) fn expire(&self, now: u64) {
        let mut a = self.adaptive.lock().expect("path lock");
        let throttle_over = a.throttle.as_ref().is_some_and(|t| t.until <= now);
        if throttle_over {
            a.throttle = None;
        }
        if a.suspension.as_ref().is_some_and(|s| s.until <= now) {
            a.suspension = None;
            self.suspended_until.store(0, Ordering::Relaxed);
        }
        // Keep the last hour: no sensible threshold window is longer.
        a.matches.retain(|_, seen| {
            while seen.front().is_some_and(|&at| at + 3_600_000 < now) {
                seen.pop_front();
            }
            !seen.is_empty()
        });
        drop(a);
        if throttle_over {
            self.recompute();
        }
    }

    /// The site for `key`, made on first use.
    pub(crate) fn site(&self, key: &str, hops: &[Hop]) -> Arc<Site> {
        let mut sites = self.sites.lock().expect("path lock");
        if let Some(s) = sites.get(key) {
            return s.clone();
        }
        let key: Arc<str> = key.into();
        let site = Arc::new(Site::new(key.clone(), hops.to_vec()));
        sites.insert(key, site.clone());
        site
    }

    pub(crate) fn sites(&self) -> Vec<Arc<Site>> {
        self.sites.lock().expect("path lock").values().cloned().collect()
    }

    pub(crate) fn push(&self, site: &Site, msg: Leased) {
        self.queued.fetch_add(1, Ordering::Relaxed);
        self.last_used.store(now_ms(), Ordering::Relaxed);
        site.push(msg);
    }

    /// Puts a message that was taken but not tried back at the head of its queue.
    pub(crate) fn push_front(&self, site: &Site, msg: Leased) {
        self.queued.fetch_add(1, Ordering::Relaxed);
        site.push_front(msg);
    }

    /// The next message for `site`, waiting up to `idle` for one. `None` after the wait, or
    /// when `stop` fires.
    pub(crate) async fn pop(&self, site: &Site, idle: Duration, stop: &tokio_util::sync::CancellationToken) -> Option<Leased> {
        let took = |m: Leased| {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            m
        };
        if let Some(m) = site.try_pop() {
            return Some(took(m));
        }
        if idle.is_zero() {
            return None;
        }
        site.idle.fetch_add(1, Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + idle;
        let got = loop {
            let notified = site.ready.notified();
            if let Some(m) = site.try_pop() {
                break Some(m);
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(deadline) => break site.try_pop(),
                _ = stop.cancelled() => break None,
            }
        };
        site.idle.fetch_sub(1, Ordering::Relaxed);
        got.map(took)
    }

    /// Every message waiting on the path.
    pub(crate) fn drain(&self) -> Vec<Leased> {
        let all: Vec<Leased> = self.sites().iter().flat_map(|s| s.drain()).collect();
        self.queued.fetch_sub(all.len(), Ordering::Relaxed);
        all
    }

    /// The messages of one site.
    pub(crate) fn drain_site(&self, site: &Site) -> Vec<Leased> {
        let all = site.drain();
        self.queued.fetch_sub(all.len(), Ordering::Relaxed);
        all
    }

    /// Waiting messages whose lease ends before `before`.
    pub(crate) fn take_expiring(&self, before: u64) -> Vec<Leased> {
        let all: Vec<Leased> = self.sites().iter().flat_map(|s| s.take_expiring(before)).collect();
        self.queued.fetch_sub(all.len(), Ordering::Relaxed);
        all
    }

    /// Samples the transaction counter; returns the rate over the last minute (per second).
    pub(crate) fn sample_rate(&self, now: u64) -> f64 {
        let sent = self.sent.load(Ordering::Relaxed);
        let mut h = self.history.lock().expect("path lock");
        h.push_back((now, sent));
        while h.len() > 2 && h.front().is_some_and(|&(at, _)| at + 60_000 < now) {
            h.pop_front();
        }
        rate_of(&h)
    }

    pub fn rate(&self) -> f64 {
        rate_of(&self.history.lock().expect("path lock"))
    }

    /// Forgets sites without mail or connections that were not used for `idle_ms`.
    pub(crate) fn prune_sites(&self, now: u64, idle_ms: u64) {
        self.sites.lock().expect("path lock").retain(|_, s| {
            s.queued() > 0
                || s.open.load(Ordering::Relaxed) > 0
                || s.connecting.load(Ordering::Relaxed) > 0
                || s.last_used.load(Ordering::Relaxed) + idle_ms > now
                || s.backing_off(now).is_some()
        });
    }

    /// Whether nothing about the path is worth keeping (it is made again when needed).
    pub(crate) fn forgettable(&self, now: u64, idle_ms: u64) -> bool {
        if self.queued() > 0 || self.connections.load(Ordering::Relaxed) > 0 || self.last_used.load(Ordering::Relaxed) + idle_ms > now {
            return false;
        }
        let a = self.adaptive.lock().expect("path lock");
        a.suspension.is_none() && a.throttle.is_none() && a.matches.is_empty()
    }
}

fn rate_of(h: &VecDeque<(u64, u64)>) -> f64 {
    match (h.front(), h.back()) {
        (Some(&(t0, n0)), Some(&(t1, n1))) if t1 > t0 => (n1 - n0) as f64 * 1000.0 / (t1 - t0) as f64,
        _ => 0.0,
    }
}

fn min_opt(a: Option<u32>, b: Option<u32>) -> Option<u32> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TlsMode;
    use crate::shaping::data::Origin;
    use sluice_rules::Threshold;

    fn path(rate: Option<&str>, connections: u32) -> Path {
        let limits = Limits {
            max_connections: connections,
            connection_rate: None,
            message_rate: rate.map(|r| r.parse().unwrap()),
            max_messages_per_connection: 100,
            max_recipients_per_transaction: 100,
            idle_timeout: Duration::from_secs(5),
            tls: TlsMode::Opportunistic,
        };
        let source = Arc::new(Source { id: "default".into(), bind: None, ehlo: "mta.test".into() });
        Path::new(source, "yahoo".into(), true, Resolved { limits, origins: Vec::<Origin>::new() }, 1000)
    }

    #[test]
    fn a_threshold_counts_matches_within_its_window_before_acting() {
        let p = path(None, 10);
        let action = ShapingAction::Suspend {
            duration: Duration::from_secs(600),
            threshold: Some(Threshold { count: 3, window: Duration::from_secs(60) }),
        };
        assert_eq!(p.apply("yahoo.tss04", &action, "421 TSS04"), Applied::Counted);
        assert_eq!(p.apply("yahoo.tss04", &action, "421 TSS04"), Applied::Counted);
        assert!(p.suspended_until(now_ms()).is_none());
        let Applied::Suspended(s) = p.apply("yahoo.tss04", &action, "421 4.7.0 [TSS04] deferred") else { panic!("third match suspends") };
        assert_eq!(s.cause.by, "rule:yahoo.tss04");
        assert!(s.cause.reason.contains("TSS04"));
        assert!(p.blocked(now_ms()));
        assert!(p.resume());
        assert!(!p.blocked(now_ms()));
    }

    #[test]
    fn throttles_lower_limits_combine_and_expire() {
        let p = path(Some("100/s"), 10);
        let throttle = |mpm: Option<u32>, conns: Option<u32>| ShapingAction::Throttle {
            messages_per_minute: mpm,
            connections: conns,
            duration: Duration::from_secs(60),
            threshold: None,
        };
        assert!(matches!(p.apply("a", &throttle(Some(600), None), "421 slow down"), Applied::Throttled(_)));
        assert_eq!(p.effective().limits.message_rate.unwrap().to_string(), "600/min");
        assert_eq!(p.effective().limits.max_connections, 10);
        p.apply("b", &throttle(Some(1200), Some(2)), "421 too many connections");
        let e = p.effective();
        assert_eq!((e.limits.message_rate.unwrap().to_string(), e.limits.max_connections), ("600/min".to_string(), 2));
        assert_eq!(e.capacity, 300, "30 s of sending at 10/s");
        drop(e);
        p.expire(now_ms() + 61_000);
        assert_eq!(p.effective().limits.message_rate.unwrap().to_string(), "100/s");
        assert_eq!(p.effective().limits.max_connections, 10);
        assert!(p.throttle().is_none());
    }

    #[test]
    fn a_longer_suspension_is_not_shortened() {
        let p = path(None, 1);
        let cause = Cause { by: "admin".into(), reason: "maintenance".into(), since: 0 };
        let now = now_ms();
        p.suspend(now + 600_000, cause.clone());
        let s = p.suspend(now + 60_000, Cause { by: "rule:x".into(), ..cause });
        assert_eq!((s.until, s.cause.by.as_str()), (now + 600_000, "admin"));
    }

    #[test]
    fn the_rate_limiter_allows_a_burst_of_a_tenth_of_a_second() {
        let l = limiter(&"50/s".parse().unwrap());
        let passed = (0..20).filter(|_| take(&l).is_zero()).count();
        assert_eq!(passed, 5);
        let l = limiter(&"1/s".parse().unwrap());
        assert!(take(&l).is_zero());
        assert!(!take(&l).is_zero(), "a slow rate still allows one at a time");
    }

    #[test]
    fn connection_backoff_doubles_up_to_five_minutes() {
        assert_eq!(connect_backoff(1), Duration::from_secs(1));
        assert_eq!(connect_backoff(4), Duration::from_secs(8));
        assert_eq!(connect_backoff(40), Duration::from_secs(300));
    }
}
