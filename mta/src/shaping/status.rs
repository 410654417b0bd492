//! What the admin API and `sluice shaping` show: the state of every path, and which limits
//! apply to a domain and why.

use std::sync::atomic::Ordering;

use serde::Serialize;
use sluice_spool::now_ms;

use super::data::{Limits, Origin};
use super::path::{Suspension, Throttle};
use super::Shaping;

/// One path, as the admin API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct PathStatus {
    /// The egress source (its IP, or `default`).
    pub source: String,
    /// The provider id, or the recipient domain for destinations no provider claims.
    pub provider: String,
    pub known_provider: bool,
    /// Messages waiting in the path's ready queues.
    pub ready: usize,
    /// Connections open or being set up.
    pub connections: u32,
    /// Transactions per second over the last minute.
    pub rate_per_second: f64,
    /// The limits in force now (configured, lowered by a throttle).
    pub limits: Limits,
    /// Where each configured limit comes from.
    pub configured_from: Vec<Origin>,
    pub suspension: Option<Suspension>,
    pub throttle: Option<Throttle>,
    /// Sites (MX host sets) backing off after connection failures, with when they retry.
    pub backing_off: Vec<(String, u64)>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ShapingStatus {
    /// The version (content hash) of the shaping data.
    pub version: String,
    /// Messages in all ready queues.
    pub ready: usize,
    pub paths: Vec<PathStatus>,
}

/// The limits that apply to one source for a domain.
#[derive(Clone, Debug, Serialize)]
pub struct ExplainedPath {
    pub source: String,
    pub ehlo: String,
    pub weight: u32,
    pub limits: Limits,
    pub from: Vec<Origin>,
    /// Set when the path is in use and something adaptive applies now.
    pub suspension: Option<Suspension>,
    pub throttle: Option<Throttle>,
}

/// Why a domain gets the limits it gets.
#[derive(Clone, Debug, Serialize)]
pub struct Explanation {
    pub domain: String,
    /// The MX host the provider was recognised by (the first one), if looked up.
    pub mx: Option<String>,
    /// The provider id, or the domain itself when no provider claims it.
    pub provider: String,
    pub known_provider: bool,
    pub pool: String,
    pub paths: Vec<ExplainedPath>,
}

impl Shaping {
    pub fn status(&self) -> ShapingStatus {
        let now = now_ms();
        let paths: Vec<PathStatus> = self
            .paths()
            .iter()
            .map(|p| PathStatus {
                source: p.source.id.to_string(),
                provider: p.provider.to_string(),
                known_provider: p.known,
                ready: p.queued(),
                connections: p.connections.load(Ordering::Relaxed),
                rate_per_second: (p.rate() * 10.0).round() / 10.0,
                limits: p.effective().limits.clone(),
                configured_from: p.configured().origins.clone(),
                suspension: p.suspension(),
                throttle: p.throttle(),
                backing_off: p.sites().iter().filter_map(|s| s.backing_off(now).map(|t| (s.key.to_string(), t))).collect(),
            })
            .collect();
        ShapingStatus { version: self.version(), ready: paths.iter().map(|p| p.ready).sum(), paths }
    }

    /// The limits for mail to `domain` (whose first MX host is `mx`, if known) from each
    /// source of `pool` (the default pool when `None`).
    pub fn explain(&self, domain: &str, mx: Option<&str>, pool: Option<&str>) -> Explanation {
        let (provider, known) = self.provider_for(mx, domain);
        let pool = pool.unwrap_or(self.egress.default_pool()).to_string();
        let data = self.data.load();
        let paths = self
            .egress
            .pool_sources(&pool)
            .into_iter()
            .map(|(source, weight)| {
                let live = self.paths.get(&(source.id.clone(), provider.clone())).map(|p| p.clone());
                let resolved = data.resolve(&self.base, known.then_some(&*provider), &source.id);
                let limits = live.as_ref().map(|p| p.effective().limits.clone()).unwrap_or_else(|| resolved.limits.clone());
                ExplainedPath {
                    source: source.id.to_string(),
                    ehlo: source.ehlo.clone(),
                    weight,
                    limits,
                    from: resolved.origins,
                    suspension: live.as_ref().and_then(|p| p.suspension()),
                    throttle: live.as_ref().and_then(|p| p.throttle()),
                }
            })
            .collect();
        Explanation { domain: domain.to_string(), mx: mx.map(String::from), provider: provider.to_string(), known_provider: known, pool, paths }
    }
}
