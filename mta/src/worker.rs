//! The dispatcher: leases due mail while the ready queues have room, routes each message to
//! its path (egress source × provider) and site (the domain's MX hosts), and queues it
//! there; connections are started per site as the path's limits allow (`delivery.rs`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sluice_events::EventLog;
use sluice_rules::{Classify, Reply, Stage};
use sluice_spool::{now_ms, LeaseRequest, Leased, Spool, SuppressionList};
use tokio::sync::{Notify, Semaphore};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::MtaConfig;
use crate::delivery::{connect_more, wake_all};
use crate::dkim::DkimSigning;
use crate::outcome::{for_all_pending, release, settle, settle_failure, untried_until, Via};
use crate::route::Router;
use crate::shaping::{Egress, Explanation, Shaping, ShapingDataError};

/// Why the MTA could not start.
#[derive(Debug, thiserror::Error)]
pub enum MtaSetupError {
    /// A configuration value is invalid (the message names the key).
    #[error("invalid configuration: mta.{0}")]
    Config(String),
    #[error("cannot set up the DNS resolver: {0} (check mta.resolver.nameservers or /etc/resolv.conf)")]
    Resolver(String),
    #[error("cannot set up TLS: {0}")]
    Tls(String),
    #[error("{0}")]
    Shaping(#[from] ShapingDataError),
}

/// Everything delivery shares.
pub(crate) struct Ctx {
    pub config: MtaConfig,
    pub spool: Arc<dyn Spool>,
    pub events: EventLog,
    pub classify: Arc<dyn Classify>,
    /// Where recipients hard-bounced by a rule with `suppress = true` go (none: not kept).
    pub suppressions: Option<Arc<dyn SuppressionList>>,
    pub router: Router,
    pub tls: TlsConnector,
    /// Signs each message once, before its first attempt.
    pub dkim: Arc<DkimSigning>,
    pub shaping: Arc<Shaping>,
    /// One permit per open connection, over all paths.
    pub slots: Arc<Semaphore>,
    /// Set when a path wanted a connection and no slot was free.
    pub slot_wanted: AtomicBool,
    /// Messages leased and not yet handed back to the spool.
    pub held: AtomicUsize,
    /// Wakes the dispatcher when ready queues drain.
    pub room: Notify,
    /// Connections and routing tasks, waited for at shutdown.
    pub tasks: TaskTracker,
    pub cancel: CancellationToken,
}

impl Ctx {
    /// A message left the MTA's hands (settled, released or rescheduled).
    pub fn done_with(&self, n: usize) {
        self.held.fetch_sub(n, Ordering::Relaxed);
        self.room.notify_one();
    }
}

/// The delivery workers of one node.
pub struct Mta {
    ctx: Arc<Ctx>,
    waker: Arc<Notify>,
}

impl Mta {
    pub fn new(config: MtaConfig, spool: Arc<dyn Spool>, events: EventLog, classify: Arc<dyn Classify>) -> Result<Mta, MtaSetupError> {
        config.validate().map_err(MtaSetupError::Config)?;
        config.egress.check_addresses().map_err(MtaSetupError::Config)?;
        let router = Router::new(&config)?;
        let tls = crate::tls::connector(&config.tls)?;
        let slots = Arc::new(Semaphore::new(config.max_concurrent_deliveries));
        let dkim = Arc::new(DkimSigning::disabled());
        let egress = Egress::new(&config.egress, &config.ehlo_hostname);
        let shaping = Arc::new(Shaping::load(config.base_limits(), config.shaping.clone(), egress, classify.clone())?);
        let ctx = Ctx {
            config,
            spool,
            events,
            classify,
            suppressions: None,
            router,
            tls,
            dkim,
            shaping,
            slots,
            slot_wanted: AtomicBool::new(false),
            held: AtomicUsize::new(0),
            room: Notify::new(),
            tasks: TaskTracker::new(),
            cancel: CancellationToken::new(),
        };
        Ok(Mta { ctx: Arc::new(ctx), waker: Arc::new(Notify::new()) })
    }

    /// Adds hard-bounced recipients whose rule says `suppress` to `list`, so the edge drops
    /// later sends to them. Call before [`Mta::run`].
    pub fn with_suppressions(mut self, list: Arc<dyn SuppressionList>) -> Self {
        Arc::get_mut(&mut self.ctx).expect("not running yet").suppressions = Some(list);
        self
    }

    /// DKIM-signs outgoing mail with `dkim` (the default signs nothing). Call before [`Mta::run`].
    pub fn with_dkim(mut self, dkim: Arc<DkimSigning>) -> Mta {
        Arc::get_mut(&mut self.ctx).expect("not running yet").dkim = dkim;
        self
    }

    /// Notify this when new mail was accepted, so idle workers look at once instead of at
    /// the next `idle_poll`.
    pub fn waker(&self) -> Arc<Notify> {
        self.waker.clone()
    }

    /// The traffic shaping state and controls (for the admin API).
    pub fn control(&self) -> MtaControl {
        MtaControl { ctx: self.ctx.clone() }
    }

    /// Delivers until `cancel` fires, then stops leasing, lets every connection finish the
    /// message it is sending, puts leased but unstarted messages back (due now, not counted
    /// as an attempt), and returns.
    pub async fn run(self, cancel: CancellationToken) {
        let ctx = self.ctx;
        let config = &ctx.config;
        tracing::info!(
            slots = config.max_concurrent_deliveries,
            backend = ctx.spool.backend(),
            shaping = %ctx.shaping.version(),
            "MTA delivering"
        );
        let stop = ctx.cancel.clone();
        let forward = tokio::spawn({
            let stop = stop.clone();
            async move {
                cancel.cancelled().await;
                stop.cancel();
            }
        });
        let sweeper = tokio::spawn(sweep(ctx.clone()));
        let max_ready = config.shaping.max_ready;
        while !stop.is_cancelled() {
            let held = ctx.held.load(Ordering::Relaxed);
            // Lease only what the ready queues can hold; wait for room otherwise.
            let room = max_ready.saturating_sub(held);
            if room < config.lease_batch.min(max_ready).div_ceil(4) {
                tokio::select! {
                    _ = ctx.room.notified() => {}
                    _ = tokio::time::sleep(config.idle_poll) => {}
                    _ = stop.cancelled() => break,
                }
                continue;
            }
            let req = LeaseRequest {
                max: config.lease_batch.min(room),
                max_per_queue: config.max_messages_per_connection.min(config.lease_batch),
                lease_for: config.lease_for,
                filter: Some(ctx.shaping.lease_filter()),
            };
            let leased = match ctx.spool.lease(req).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot lease from the spool; retrying");
                    if sleep_or_cancel(config.idle_poll, &stop).await {
                        break;
                    }
                    continue;
                }
            };
            if leased.is_empty() {
                tokio::select! {
                    _ = self.waker.notified() => {}
                    _ = ctx.room.notified() => {}
                    _ = tokio::time::sleep(config.idle_poll) => {}
                    _ = stop.cancelled() => break,
                }
                continue;
            }
            ctx.held.fetch_add(leased.len(), Ordering::Relaxed);
            for (domain, msgs) in by_domain(leased) {
                // Routing waits for DNS: one task per domain, so a slow lookup holds up
                // nobody else.
                ctx.tasks.spawn(route(ctx.clone(), domain, msgs));
            }
        }
        tracing::info!(connections = ctx.tasks.len(), "MTA stopping: finishing messages in flight");
        ctx.tasks.close();
        ctx.tasks.wait().await;
        sweeper.abort();
        forward.abort();
        // Whatever still waits in a ready queue goes back to the spool, due now.
        for path in ctx.shaping.paths() {
            for msg in path.drain() {
                release(&ctx, msg).await;
            }
        }
        tracing::info!("MTA stopped");
    }
}

/// The admin side of a running MTA: shaping state, suspensions, explanations, reloads.
#[derive(Clone)]
pub struct MtaControl {
    ctx: Arc<Ctx>,
}

impl MtaControl {
    pub fn shaping(&self) -> &Arc<Shaping> {
        &self.ctx.shaping
    }

    /// Suspends paths (see [`Shaping::suspend`]); mail waiting for them goes back to the
    /// spool. Returns how many paths were suspended now.
    pub async fn suspend(&self, provider: Option<&str>, source: Option<&str>, duration: Duration, reason: &str) -> usize {
        let paths = self.ctx.shaping.suspend(provider, source, duration, reason);
        for p in &paths {
            crate::delivery::hand_back_suspended(&self.ctx, p).await;
        }
        paths.len()
    }

    /// Lifts suspensions and throttles; returns how many paths had one.
    pub fn resume(&self, provider: Option<&str>, source: Option<&str>) -> usize {
        let paths = self.ctx.shaping.resume(provider, source);
        for p in &paths {
            connect_more(&self.ctx, p);
        }
        self.ctx.room.notify_one();
        paths.len()
    }

    /// Which limits apply to mail for `domain`; looks up its MX unless `mx` is given.
    pub async fn explain(&self, domain: &str, mx: Option<&str>, pool: Option<&str>) -> Explanation {
        let domain = domain.trim().trim_end_matches('.').to_ascii_lowercase();
        let mx = match mx {
            Some(m) => Some(m.to_string()),
            None => self.ctx.router.hops(&domain).await.ok().and_then(|h| h.first().map(|h| h.name.clone())),
        };
        self.ctx.shaping.explain(&domain, mx.as_deref(), pool)
    }

    /// Re-reads the shaping data; the old data stays when the new one is broken.
    pub async fn reload(&self) -> Result<String, ShapingDataError> {
        let shaping = self.ctx.shaping.clone();
        let result = tokio::task::spawn_blocking(move || shaping.reload()).await.expect("reload does not panic");
        wake_all(&self.ctx);
        result
    }
}

/// Which limits would apply to mail for `domain` under `config`, without a running MTA
/// (`sluice shaping explain --offline`): looks up the MX with the configured resolver
/// unless `mx` is given.
pub async fn explain_offline(
    config: &MtaConfig,
    classify: Arc<dyn Classify>,
    domain: &str,
    mx: Option<&str>,
    pool: Option<&str>,
) -> Result<Explanation, MtaSetupError> {
    config.validate().map_err(MtaSetupError::Config)?;
    let egress = Egress::new(&config.egress, &config.ehlo_hostname);
    let shaping = Shaping::load(config.base_limits(), config.shaping.clone(), egress, classify)?;
    let domain = domain.trim().trim_end_matches('.').to_ascii_lowercase();
    let mx = match mx {
        Some(m) => Some(m.to_string()),
        None => Router::new(config)?.hops(&domain).await.ok().and_then(|h| h.first().map(|h| h.name.clone())),
    };
    Ok(shaping.explain(&domain, mx.as_deref(), pool))
}

/// Every second: ends throttles and suspensions that ran out, hands back mail whose lease
/// is about to end before it could be sent, updates gauges, and starts connections a path
/// is owed (a safety net: pushes and closing connections normally do that).
async fn sweep(ctx: Arc<Ctx>) {
    let margin = ctx.config.timeouts.message_budget() + crate::config::SPOOL_MARGIN;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = ctx.cancel.cancelled() => return,
        }
        let now = now_ms();
        ctx.shaping.sweep(now);
        for path in ctx.shaping.paths() {
            let stale = path.take_expiring(now + margin.as_millis() as u64);
            if !stale.is_empty() {
                tracing::debug!(provider = %path.provider, n = stale.len(), "handing back mail that waited too long in a ready queue");
                metrics::counter!("sluice_shaping_released_total", "provider" => path.metric_label().to_string()).increment(stale.len() as u64);
            }
            for msg in stale {
                release(&ctx, msg).await;
            }
            if path.queued() > 0 {
                connect_more(&ctx, &path);
            }
        }
        ctx.room.notify_one();
    }
}

/// Routes the leased messages of one domain to their paths and sites.
async fn route(ctx: Arc<Ctx>, domain: String, msgs: Vec<Leased>) {
    let hops = match ctx.router.hops(&domain).await {
        Ok(h) => h,
        Err(reply) => {
            for msg in msgs {
                let replies = for_all_pending(&msg.meta, &reply, Stage::Connect);
                settle(&ctx, msg, replies, &Via::default()).await;
            }
            return;
        }
    };
    let site_key: String = hops.iter().map(|h| format!("{}:{}", h.name, h.port)).collect::<Vec<_>>().join(",");
    let mx = hops.first().map(|h| h.name.as_str());
    let (provider, known) = ctx.shaping.provider_for(mx, &domain);
    let egress = ctx.shaping.egress();
    let now = now_ms();
    for msg in msgs {
        if let Some(expired) = expired_reply(&ctx, &msg, now) {
            let replies = for_all_pending(&msg.meta, &expired, Stage::Connect);
            settle(&ctx, msg, replies, &Via::default()).await;
            continue;
        }
        let (pool, unknown_pool) = egress.pool_of(&msg.meta);
        if unknown_pool {
            metrics::counter!("sluice_egress_unknown_pool_total").increment(1);
            tracing::debug!(id = %msg.meta.id, pool = ?msg.meta.ip_pool, "message names an IP pool that does not exist; using {pool}");
        }
        let source = egress.choose(pool);
        let path = ctx.shaping.path(&source, &provider, known);
        ctx.shaping.note_route(&domain, &path);
        if let Some(until) = path.suspended_until(now) {
            hold_for_suspension(&ctx, msg, &path, until).await;
            continue;
        }
        let site = path.site(&site_key, &hops);
        if site.backing_off(now).is_some() && site.unreachable() {
            // A dead destination: defer with the reason the last attempt failed, without
            // another connection attempt per message.
            if let Some(f) = site.last_failure() {
                settle_failure(&ctx, msg, &f, &path).await;
                continue;
            }
        }
        path.push(&site, msg);
        connect_more(&ctx, &path);
    }
}

/// Mail for a suspended path goes back to the spool. When the lease filter skips its domain
/// anyway (all the domain's paths are blocked) it goes back due now, so it is not leased
/// again while the suspension lasts and a resume sends it at once. Otherwise (its domain is
/// also sent over paths that are open) it is due when the suspension ends, or when the
/// message expires if that is sooner: never re-checked in between.
pub(crate) async fn hold_for_suspension(ctx: &Ctx, msg: Leased, path: &crate::shaping::Path, until: u64) {
    let now = now_ms();
    if ctx.shaping.domain_blocked(&msg.meta.queue, now) {
        release(ctx, msg).await;
        return;
    }
    // A suspension longer than the message's life: it comes back when it expires, and bounces then.
    let due = until.min(crate::outcome::expires_at(ctx, &msg.meta));
    untried_until(ctx, msg, due, &format!("delivery to {} suspended", path.provider)).await;
}

/// The reply for a message that expired while it waited (in the spool or a ready queue).
fn expired_reply(ctx: &Ctx, msg: &Leased, now: u64) -> Option<Reply> {
    let expires = crate::outcome::expires_at(ctx, &msg.meta);
    (now >= expires).then(|| {
        let age_h = now.saturating_sub(msg.meta.created_at) as f64 / 3_600_000.0;
        crate::synthetic::expired_in_queue(age_h)
    })
}

pub(crate) fn is_expired(ctx: &Ctx, msg: &Leased) -> Option<Reply> {
    expired_reply(ctx, msg, now_ms())
}

/// Sleeps; returns true if cancelled meanwhile.
async fn sleep_or_cancel(d: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = cancel.cancelled() => true,
    }
}

fn by_domain(leased: Vec<Leased>) -> BTreeMap<String, Vec<Leased>> {
    let mut by_domain: BTreeMap<String, Vec<Leased>> = BTreeMap::new();
    for l in leased {
        by_domain.entry(l.meta.queue.clone()).or_default().push(l);
    }
    by_domain
}
