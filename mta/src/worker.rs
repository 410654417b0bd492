//! The dispatcher: leases due messages while connection slots are free, groups them by
//! destination and hands each group to a delivery job.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sluice_events::EventLog;
use sluice_rules::Classify;
use sluice_spool::{LeaseRequest, Leased, Spool, SuppressionList};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use crate::config::MtaConfig;
use crate::delivery::{run_job, Job};
use crate::dkim::DkimSigning;
use crate::outcome::release;
use crate::route::Router;

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
}

/// Everything delivery jobs share.
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
    /// One permit per open connection.
    pub slots: Arc<Semaphore>,
    /// Jobs waiting for a slot; idle connections give theirs up when this is non-zero.
    pub waiting_jobs: AtomicUsize,
}

/// The delivery workers of one node.
pub struct Mta {
    ctx: Arc<Ctx>,
    waker: Arc<Notify>,
}

impl Mta {
    pub fn new(
        config: MtaConfig,
        spool: Arc<dyn Spool>,
        events: EventLog,
        classify: Arc<dyn Classify>,
    ) -> Result<Mta, MtaSetupError> {
        config.validate().map_err(MtaSetupError::Config)?;
        let router = Router::new(&config)?;
        let tls = crate::tls::connector(&config.tls)?;
        let slots = Arc::new(Semaphore::new(config.max_concurrent_deliveries));
        let dkim = Arc::new(DkimSigning::disabled());
        let ctx = Ctx { config, spool, events, classify, suppressions: None, router, tls, dkim, slots, waiting_jobs: AtomicUsize::new(0) };
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

    /// Delivers until `cancel` fires, then stops leasing, lets every connection finish the
    /// message it is sending, puts leased but unstarted messages back (due now, not counted
    /// as an attempt), and returns.
    pub async fn run(self, cancel: CancellationToken) {
        let ctx = self.ctx;
        let config = &ctx.config;
        let per_queue = config.max_messages_per_connection.min(config.lease_batch);
        let mut jobs = JoinSet::new();
        tracing::info!(
            slots = config.max_concurrent_deliveries,
            backend = ctx.spool.backend(),
            "MTA delivering"
        );
        while !cancel.is_cancelled() {
            while let Some(done) = jobs.try_join_next() {
                if let Err(e) = done {
                    tracing::error!(error = %e, "a delivery job panicked; its messages return when their leases run out");
                }
            }
            // Lease only with a free slot: leased mail must not wait long for a connection.
            let permit = tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                p = ctx.slots.clone().acquire_owned() => p.expect("the slot semaphore is never closed"),
            };
            let req = LeaseRequest { max: config.lease_batch, max_per_queue: per_queue, lease_for: config.lease_for, filter: None };
            let leased = match ctx.spool.lease(req).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot lease from the spool; retrying");
                    drop(permit);
                    if sleep_or_cancel(config.idle_poll, &cancel).await {
                        break;
                    }
                    continue;
                }
            };
            if leased.is_empty() {
                drop(permit);
                tokio::select! {
                    _ = self.waker.notified() => {}
                    _ = tokio::time::sleep(config.idle_poll) => {}
                    _ = cancel.cancelled() => break,
                }
                continue;
            }
            // The dispatcher waits for a slot per job itself, so it leases again only when
            // everything it leased before is under way.
            let mut permit = Some(permit);
            let mut groups = group_by_destination(leased, config.max_messages_per_connection).into_iter();
            while let Some(job) = groups.next() {
                let slot = match permit.take() {
                    Some(p) => Some(p),
                    None => {
                        ctx.waiting_jobs.fetch_add(1, Ordering::Relaxed);
                        let p = wait_for_slot(&ctx, &cancel).await;
                        ctx.waiting_jobs.fetch_sub(1, Ordering::Relaxed);
                        p
                    }
                };
                let Some(slot) = slot else {
                    for msg in std::iter::once(job).chain(groups.by_ref()).flat_map(|j| j.messages) {
                        release(&ctx, msg).await;
                    }
                    break;
                };
                jobs.spawn(run_job(ctx.clone(), job, slot, cancel.clone()));
            }
        }
        tracing::info!(jobs = jobs.len(), "MTA stopping: finishing messages in flight");
        while let Some(done) = jobs.join_next().await {
            if let Err(e) = done {
                tracing::error!(error = %e, "a delivery job panicked during shutdown");
            }
        }
        tracing::info!("MTA stopped");
    }
}

/// A connection slot, or `None` at shutdown.
async fn wait_for_slot(ctx: &Ctx, cancel: &CancellationToken) -> Option<OwnedSemaphorePermit> {
    tokio::select! {
        biased;
        _ = cancel.cancelled() => None,
        p = ctx.slots.clone().acquire_owned() => p.ok(),
    }
}

/// Sleeps; returns true if cancelled meanwhile.
async fn sleep_or_cancel(d: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = cancel.cancelled() => true,
    }
}

/// One job per destination domain and connection's worth of messages.
fn group_by_destination(leased: Vec<Leased>, per_connection: usize) -> Vec<Job> {
    let mut by_domain: BTreeMap<String, Vec<Leased>> = BTreeMap::new();
    for l in leased {
        by_domain.entry(l.meta.queue.clone()).or_default().push(l);
    }
    let mut jobs = Vec::new();
    for (domain, msgs) in by_domain {
        let mut msgs = msgs.into_iter().peekable();
        while msgs.peek().is_some() {
            let chunk: VecDeque<Leased> = msgs.by_ref().take(per_connection).collect();
            jobs.push(Job { domain: domain.clone(), messages: chunk });
        }
    }
    jobs
}
