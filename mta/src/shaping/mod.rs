//! Traffic shaping: which limits apply to each sending path (egress IP × provider), the
//! adaptive throttles and suspensions the rules engine asks for, and the ready queues that
//! let a worker feed every path at its own pace.
//!
//! The dispatcher leases due mail from the spool, routes each message to a path and a site
//! (the MX hosts of its domain), and queues it there; connections per site take messages
//! from their queue at the path's limits. A path whose queues are full, or which is
//! suspended, is skipped when leasing (the spool's queue filter), so one slow or blocked
//! provider never holds up the others and its backlog stays in the spool, untouched.
//!
//! See docs/shaping.md.

mod data;
mod egress;
mod path;
mod status;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use dashmap::DashMap;
use serde::Deserialize;
use sluice_rules::Classify;
use sluice_spool::{now_ms, QueueFilter};

pub use data::{read_shaping_sources, LimitSet, Limits, Origin, Resolved, ShapingData, ShapingDataError, ShapingSource, DEFAULT_SHAPING};
pub use egress::{Egress, EgressConfig, PoolConfig, Source, SourceConfig, DEFAULT_SOURCE};
pub(crate) use path::{take, Applied, ConnectFailure, Site};
pub use path::{Cause, Path, Suspension, Throttle};
pub use status::{Explanation, ExplainedPath, PathStatus, ShapingStatus};

/// `[mta.shaping]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShapingSettings {
    /// The shaping data, in order (later files override earlier ones key by key): files and
    /// `"@default"`, the data shipped in the binary.
    pub files: Vec<PathBuf>,
    /// Most messages held in memory, over all ready queues.
    pub max_ready: usize,
    /// Most messages in one path's ready queues (less when the path has a message rate:
    /// about 30 seconds of sending).
    pub max_ready_per_path: usize,
    /// While a destination is skipped (suspended, or its queues full), its oldest mail is
    /// still looked at this often, so what expires meanwhile bounces on time.
    #[serde(with = "humantime_serde")]
    pub expiry_check: Duration,
}

impl Default for ShapingSettings {
    fn default() -> Self {
        ShapingSettings {
            files: vec![PathBuf::from(DEFAULT_SHAPING)],
            max_ready: 10_000,
            max_ready_per_path: 1_000,
            expiry_check: Duration::from_secs(300),
        }
    }
}

impl ShapingSettings {
    pub fn validate(&self) -> Result<(), String> {
        if self.files.is_empty() {
            return Err(format!("shaping.files: name at least one file (the shipped data is \"{DEFAULT_SHAPING}\")"));
        }
        for (i, f) in self.files.iter().enumerate() {
            if f.as_os_str() != DEFAULT_SHAPING && !f.exists() {
                return Err(format!("shaping.files: {} (files[{i}]) does not exist", f.display()));
            }
        }
        if self.max_ready == 0 || self.max_ready_per_path == 0 {
            return Err("shaping.max_ready and shaping.max_ready_per_path: must be at least 1".into());
        }
        if self.expiry_check.is_zero() {
            return Err("shaping.expiry_check: must be longer than 0s".into());
        }
        Ok(())
    }
}

/// An operator's suspension, kept so paths made later are suspended too.
#[derive(Clone, Debug)]
struct AdminSuspension {
    provider: Option<String>,
    source: Option<String>,
    until: u64,
    reason: String,
}

impl AdminSuspension {
    fn covers(&self, path: &Path) -> bool {
        self.provider.as_deref().is_none_or(|p| p == &*path.provider) && self.source.as_deref().is_none_or(|s| s == &*path.source.id)
    }
}

/// Which paths a domain's mail went to: the dispatcher skips the domain while all are blocked.
#[derive(Default)]
struct Gate {
    paths: Mutex<Vec<Arc<Path>>>,
    /// When the lease filter last let the blocked domain through for an expiry check.
    probed_at: std::sync::atomic::AtomicU64,
}



type PathKey = (Arc<str>, Arc<str>);

/// The shaping state of one MTA process.
pub struct Shaping {
    base: Limits,
    files: Vec<PathBuf>,
    settings: ShapingSettings,
    data: ArcSwap<ShapingData>,
    egress: Egress,
    rules: Arc<dyn Classify>,
    paths: DashMap<PathKey, Arc<Path>>,
    gates: DashMap<Box<str>, Arc<Gate>>,
    admin: Mutex<Vec<AdminSuspension>>,
    /// One reload at a time.
    reloading: Mutex<()>,
}

/// Sweeps forget paths and sites unused for this long.
const FORGET_AFTER_MS: u64 = 10 * 60_000;

impl Shaping {
    /// Reads the shaping data named by `settings` and checks it against the providers the
    /// rules data defines.
    pub fn load(base: Limits, settings: ShapingSettings, egress: Egress, rules: Arc<dyn Classify>) -> Result<Shaping, ShapingDataError> {
        let sources = read_shaping_sources(&settings.files)?;
        let data = ShapingData::parse(&sources, &|id| rules.has_provider(id))?;
        Ok(Shaping {
            base,
            files: settings.files.clone(),
            settings,
            data: ArcSwap::from_pointee(data),
            egress,
            rules,
            paths: DashMap::new(),
            gates: DashMap::new(),
            admin: Mutex::new(Vec::new()),
            reloading: Mutex::new(()),
        })
    }

    pub fn egress(&self) -> &Egress {
        &self.egress
    }

    pub fn version(&self) -> String {
        self.data.load().version.clone()
    }

    pub fn settings(&self) -> &ShapingSettings {
        &self.settings
    }

    /// Re-reads the files; on success the new limits apply to every path at once. A broken
    /// file is refused and the old data stays. Blocking (file reads): call off the reactor.
    pub fn reload(&self) -> Result<String, ShapingDataError> {
        let _one = self.reloading.lock().expect("reload lock");
        let sources = read_shaping_sources(&self.files)?;
        let data = ShapingData::parse(&sources, &|id| self.rules.has_provider(id))?;
        let version = data.version.clone();
        for p in self.paths.iter() {
            let provider = p.known.then_some(&*p.provider);
            p.set_configured(data.resolve(&self.base, provider, &p.source.id));
        }
        self.data.store(Arc::new(data));
        Ok(version)
    }

    /// Who runs mail for `domain` (whose first MX host is `mx`): a provider of the rules
    /// data, or else the domain itself.
    pub fn provider_for(&self, mx: Option<&str>, domain: &str) -> (Arc<str>, bool) {
        match self.rules.provider_of(mx, Some(domain)) {
            Some(id) => (id.into(), true),
            None => (domain.into(), false),
        }
    }

    /// The path from `source` to `provider`, made on first use (with any operator
    /// suspension that covers it).
    pub fn path(&self, source: &Arc<Source>, provider: &Arc<str>, known: bool) -> Arc<Path> {
        let key = (source.id.clone(), provider.clone());
        if let Some(p) = self.paths.get(&key) {
            return p.clone();
        }
        self.paths
            .entry(key)
            .or_insert_with(|| {
                let resolved = self.data.load().resolve(&self.base, known.then_some(&**provider), &source.id);
                let path = Arc::new(Path::new(source.clone(), provider.clone(), known, resolved, self.settings.max_ready_per_path));
                for a in self.admin.lock().expect("admin lock").iter().filter(|a| a.covers(&path)) {
                    path.suspend(a.until, Cause { by: "admin".into(), reason: a.reason.clone(), since: now_ms() });
                }
                path
            })
            .clone()
    }

    /// Remembers that mail for `domain` goes over `path`.
    pub(crate) fn note_route(&self, domain: &str, path: &Arc<Path>) {
        let gate = match self.gates.get(domain) {
            Some(g) => g.clone(),
            None => self.gates.entry(domain.into()).or_default().clone(),
        };
        let mut paths = gate.paths.lock().expect("gate lock");
        if !paths.iter().any(|p| Arc::ptr_eq(p, path)) {
            paths.push(path.clone());
        }
    }

    /// Whether every path `domain`'s mail went to is blocked (suspended or full).
    pub fn domain_blocked(&self, domain: &str, now: u64) -> bool {
        let Some(gate) = self.gates.get(domain).map(|g| g.clone()) else { return false };
        let paths = gate.paths.lock().expect("gate lock");
        !paths.is_empty() && paths.iter().all(|p| p.blocked(now))
    }

    /// The spool filter: lease only from domains with room on some path. A blocked domain is
    /// still let through once per `expiry_check`, so mail that expires while it waits
    /// bounces at its time rather than when the block ends: one lease's worth of its oldest
    /// mail each time, never a scan of the backlog.
    pub fn lease_filter(self: &Arc<Self>) -> QueueFilter {
        let me = self.clone();
        let now = now_ms();
        let probe_ms = self.settings.expiry_check.as_millis() as u64;
        Arc::new(move |queue: &str| {
            if !me.domain_blocked(queue, now) {
                return true;
            }
            let Some(gate) = me.gates.get(queue).map(|g| g.clone()) else { return true };
            let last = gate.probed_at.load(Ordering::Relaxed);
            if last == 0 {
                // The first time it is blocked, the probe clock starts.
                gate.probed_at.store(now, Ordering::Relaxed);
                return false;
            }
            now.saturating_sub(last) >= probe_ms && gate.probed_at.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        })
    }

    pub fn paths(&self) -> Vec<Arc<Path>> {
        let mut all: Vec<Arc<Path>> = self.paths.iter().map(|p| p.clone()).collect();
        all.sort_by(|a, b| (&a.provider, &a.source.id).cmp(&(&b.provider, &b.source.id)));
        all
    }

    /// Messages waiting in all ready queues.
    pub fn queued(&self) -> usize {
        self.paths.iter().map(|p| p.queued()).sum()
    }

    /// Suspends every path to `provider` (all providers when `None`) from `source` (all
    /// sources when `None`) for `duration`, including paths first used later. Returns the
    /// paths suspended now.
    pub fn suspend(&self, provider: Option<&str>, source: Option<&str>, duration: Duration, reason: &str) -> Vec<Arc<Path>> {
        let until = now_ms() + duration.as_millis() as u64;
        let a = AdminSuspension { provider: provider.map(String::from), source: source.map(String::from), until, reason: reason.to_string() };
        let hit: Vec<Arc<Path>> = self.paths.iter().filter(|p| a.covers(p)).map(|p| p.clone()).collect();
        for p in &hit {
            p.suspend(until, Cause { by: "admin".into(), reason: reason.to_string(), since: now_ms() });
        }
        self.admin.lock().expect("admin lock").push(a);
        hit
    }

    /// Lifts suspensions and throttles (by rules or operators) on the matching paths.
    /// Returns the paths that had one.
    pub fn resume(&self, provider: Option<&str>, source: Option<&str>) -> Vec<Arc<Path>> {
        let probe = AdminSuspension { provider: provider.map(String::from), source: source.map(String::from), until: 0, reason: String::new() };
        self.admin.lock().expect("admin lock").retain(|a| {
            // An operator's suspension goes when the resume covers everything it covered.
            let wider = probe.provider.as_ref().is_none_or(|p| a.provider.as_ref() == Some(p))
                && probe.source.as_ref().is_none_or(|s| a.source.as_ref() == Some(s));
            !wider
        });
        self.paths.iter().filter(|p| probe.covers(p)).filter(|p| p.resume()).map(|p| p.clone()).collect()
    }

    /// Ends expired throttles and suspensions, samples rates, updates the per-provider
    /// gauges and forgets what is no longer used.
    pub(crate) fn sweep(&self, now: u64) {
        self.admin.lock().expect("admin lock").retain(|a| a.until > now);
        let mut gauges: HashMap<(String, String), [f64; 5]> = HashMap::new();
        for p in self.paths.iter() {
            p.expire(now);
            p.sample_rate(now);
            p.prune_sites(now, FORGET_AFTER_MS);
            let g = gauges.entry((p.metric_label().to_string(), p.source.id.to_string())).or_default();
            g[0] += p.queued() as f64;
            g[1] += f64::from(p.connections.load(Ordering::Relaxed));
            g[2] = g[2].max(f64::from(u8::from(p.suspended_until(now).is_some())));
            g[3] = g[3].max(f64::from(u8::from(p.throttle().is_some())));
            g[4] += p.rate();
        }
        for ((provider, source), g) in gauges {
            let labels = [("provider", provider), ("source", source)];
            metrics::gauge!("sluice_shaping_ready_messages", &labels).set(g[0]);
            metrics::gauge!("sluice_shaping_connections", &labels).set(g[1]);
            metrics::gauge!("sluice_shaping_suspended", &labels).set(g[2]);
            metrics::gauge!("sluice_shaping_throttled", &labels).set(g[3]);
            metrics::gauge!("sluice_shaping_rate_per_second", &labels).set(g[4]);
        }
        self.paths.retain(|_, p| !p.forgettable(now, FORGET_AFTER_MS));
        self.gates.retain(|_, g| {
            let mut paths = g.paths.lock().expect("gate lock");
            paths.retain(|p| Arc::strong_count(p) > 1 || p.blocked(now));
            !paths.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TlsMode;
    use sluice_rules::Engine;

    fn shaping(extra: &str) -> Arc<Shaping> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("shaping.toml");
        std::fs::write(&file, extra).unwrap();
        let base = Limits {
            max_connections: 20,
            connection_rate: None,
            message_rate: None,
            max_messages_per_connection: 100,
            max_recipients_per_transaction: 100,
            idle_timeout: Duration::from_secs(5),
            tls: TlsMode::Opportunistic,
        };
        let settings = ShapingSettings { files: vec![DEFAULT_SHAPING.into(), file], ..ShapingSettings::default() };
        let rules: Arc<dyn Classify> = Arc::new(Engine::load(vec!["@default".into()]).unwrap());
        let egress = Egress::new(&EgressConfig::default(), "mta.test");
        let s = Shaping::load(base, settings, egress, rules).unwrap();
        std::mem::forget(dir); // the files are read at load; keep the path valid for reload tests
        Arc::new(s)
    }

    #[test]
    fn providers_come_from_the_rules_data_and_unknown_domains_stand_alone() {
        let s = shaping("");
        assert_eq!(s.provider_for(Some("gmail-smtp-in.l.google.com"), "customer.example"), ("google".into(), true));
        assert_eq!(s.provider_for(None, "yahoo.co.uk"), ("yahoo".into(), true));
        assert_eq!(s.provider_for(Some("mx.example.net"), "example.net"), ("example.net".into(), false));
    }

    #[test]
    fn paths_get_their_providers_limits_and_operator_suspensions() {
        let s = shaping("[provider.yahoo]\nmax_connections = 3\n");
        let source = s.egress().choose(s.egress().default_pool());
        let yahoo = s.path(&source, &"yahoo".into(), true);
        assert_eq!(yahoo.effective().limits.max_connections, 3);
        let other = s.path(&source, &"example.net".into(), false);
        assert_eq!(other.effective().limits.max_connections, 20);

        s.suspend(Some("google"), None, Duration::from_secs(600), "incident 42");
        let google = s.path(&source, &"google".into(), true);
        let susp = google.suspension().expect("a path made after the suspension is suspended too");
        assert_eq!((susp.cause.by.as_str(), susp.cause.reason.as_str()), ("admin", "incident 42"));
        assert!(yahoo.suspension().is_none());
        assert_eq!(s.resume(Some("google"), None).len(), 1);
        assert!(google.suspension().is_none());
        let later = s.path(&source, &"google".into(), true);
        assert!(later.suspension().is_none());
    }

    #[test]
    fn a_domain_is_skipped_only_while_all_its_paths_are_blocked() {
        let s = shaping("");
        let source = s.egress().choose(s.egress().default_pool());
        let p = s.path(&source, &"yahoo".into(), true);
        s.note_route("yahoo.com", &p);
        let filter = s.lease_filter();
        assert!(filter("yahoo.com") && filter("never-seen.example"));
        s.suspend(Some("yahoo"), None, Duration::from_secs(60), "test");
        assert!(!s.lease_filter()("yahoo.com"));
        assert!(s.lease_filter()("gmail.com"));
    }
}
