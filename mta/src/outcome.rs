//! What an attempt means for a message: every reply is classified, recipients become
//! delivered, failed or stay pending, the spool is updated and events are written.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use serde_json::Value;
use sluice_events::{Event, EventKind};
use sluice_rules::{BounceType, Context, Disposition, Outcome, Reply, ShapingAction, Stage};
use sluice_spool::{now_ms, Leased, MessageMeta, RecipientState, SpoolError, Suppression};

use crate::config::RetrySettings;
use crate::worker::Ctx;

/// The reply one recipient got in an attempt, and the stage it answered.
#[derive(Clone, Debug)]
pub(crate) struct RcptReply {
    /// Index into `meta.recipients`.
    pub index: usize,
    pub reply: Reply,
    pub stage: Stage,
}

/// The connection an attempt used, as far as it got.
#[derive(Clone, Debug, Default)]
pub(crate) struct Via {
    pub mx_host: Option<String>,
    pub tls: bool,
    pub local_ip: Option<IpAddr>,
    /// The provider label of the path (for per-provider metrics).
    pub provider: Option<Arc<str>>,
}

/// A shaping action a rule asked for after a reply: the path it came from carries it out.
#[derive(Clone, Debug)]
pub(crate) struct Feedback {
    pub rule_id: String,
    pub action: ShapingAction,
    pub reply: String,
}

/// The wait before attempt `attempts + 1`: `initial × factor^(attempts-1)`, capped at
/// `max_interval`, with ±10% jitter so messages deferred together do not retry together.
pub(crate) fn backoff(retry: &RetrySettings, attempts: u32) -> Duration {
    let exponent = attempts.saturating_sub(1).min(64) as i32;
    let max = retry.max_interval.as_secs_f64();
    let secs = (retry.initial.as_secs_f64() * retry.factor.powi(exponent)).min(max);
    let jitter = rand::rng().random_range(0.9..=1.1);
    Duration::from_secs_f64(secs * jitter)
}

/// `reply` for every pending recipient of `meta`.
pub(crate) fn for_all_pending(meta: &MessageMeta, reply: &Reply, stage: Stage) -> Vec<RcptReply> {
    meta.recipients
        .iter()
        .enumerate()
        .filter(|(_, r)| r.state == RecipientState::Pending)
        .map(|(index, _)| RcptReply { index, reply: reply.clone(), stage })
        .collect()
}

/// The RFC 3463 status for events: the enhanced code as written, else one made from the
/// reply class.
fn status_of(reply: &Reply) -> String {
    reply.enhanced.map(|e| e.to_string()).unwrap_or_else(|| format!("{}.0.0", reply.class()))
}

struct Decided {
    index: usize,
    reply: Reply,
    outcome: Outcome,
}

/// When `meta` expires: the earlier of its own stamp and `created + retry.max_age`.
pub(crate) fn expires_at(ctx: &Ctx, meta: &MessageMeta) -> u64 {
    let max_age_ms = ctx.config.retry.max_age.as_millis() as u64;
    meta.expires_at.min(meta.created_at.saturating_add(max_age_ms))
}

/// Applies the replies of one attempt to a leased message and hands it back to the spool:
/// completed when every recipient is final, otherwise rescheduled with backoff, or bounced
/// with 4.4.7 when the next attempt would come after the message expires. Returns the
/// shaping actions the rules asked for (one per rule), for the path to carry out.
pub(crate) async fn settle(ctx: &Ctx, leased: Leased, replies: Vec<RcptReply>, via: &Via) -> Vec<Feedback> {
    let feedback = settle_inner(ctx, leased, replies, via).await;
    ctx.done_with(1);
    feedback
}

async fn settle_inner(ctx: &Ctx, leased: Leased, replies: Vec<RcptReply>, via: &Via) -> Vec<Feedback> {
    let Leased { lease, mut meta, .. } = leased;
    let domain = meta.queue.clone();
    let attempt = meta.attempts + 1;
    let mut decided = Vec::with_capacity(replies.len());
    for r in replies {
        let cx = Context { stage: Some(r.stage), mx_host: via.mx_host.as_deref(), domain: Some(&domain) };
        let outcome = ctx.classify.classify(&r.reply, &cx);
        decided.push(Decided { index: r.index, reply: r.reply, outcome });
    }

    let now = now_ms();
    let retrying: Vec<&Decided> = decided.iter().filter(|d| d.outcome.disposition == Disposition::Retry).collect();
    let next_due = now + backoff(&ctx.config.retry, attempt).as_millis() as u64;
    let expires = expires_at(ctx, &meta);
    let expired = !retrying.is_empty() && next_due > expires;
    let mut feedback: Vec<Feedback> = Vec::new();
    for d in &decided {
        if !d.outcome.shaping.is_none() && !feedback.iter().any(|f| f.rule_id == d.outcome.rule_id) {
            feedback.push(Feedback { rule_id: d.outcome.rule_id.clone(), action: d.outcome.shaping.clone(), reply: d.reply.to_string() });
        }
    }

    let mut events = Vec::with_capacity(decided.len());
    let mut suppress = Vec::new();
    let (mut delivered, mut deferred, mut bounced) = (0u64, 0u64, 0u64);
    for d in &decided {
        let text = d.reply.to_string();
        let rcpt = &mut meta.recipients[d.index];
        rcpt.last_reply = Some(text.clone());
        let address = rcpt.address.clone();
        let event = match d.outcome.disposition {
            Disposition::Delivered => {
                rcpt.state = RecipientState::Delivered;
                delivered += 1;
                let ev = Event::for_address(EventKind::Delivered, &meta, &address)
                    .with("response", text)
                    .with("tls", u8::from(via.tls))
                    .with("sluice_rule", d.outcome.rule_id.clone())
                    .with("sluice_rules_version", d.outcome.rules_version.to_string());
                let ev = match via.local_ip {
                    Some(ip) => ev.with("ip", ip.to_string()),
                    None => ev,
                };
                match &via.mx_host {
                    Some(mx) => ev.with("mx", mx.clone()),
                    None => ev,
                }
            }
            Disposition::Retry if !expired => {
                deferred += 1;
                Event::for_address(EventKind::Deferred, &meta, &address)
                    .with("response", text)
                    .with("attempt", attempt.to_string())
                    .with("sluice_rule", d.outcome.rule_id.clone())
                    .with("sluice_rules_version", d.outcome.rules_version.to_string())
            }
            Disposition::Retry => {
                rcpt.state = RecipientState::Failed;
                bounced += 1;
                let reason = format!("{domain}: retries expired after {attempt} attempts: {text}");
                // SendGrid reports deferrals that never cleared as blocks, and never suppresses them.
                bounce_event(&meta, &address, reason, "4.4.7".into(), BounceType::Blocked, &d.outcome)
            }
            Disposition::Bounce => {
                rcpt.state = RecipientState::Failed;
                bounced += 1;
                // The rules decide both (docs/rules.md): suppress is only ever set on a 5xx
                // bounce of type "bounce".
                if d.outcome.suppress {
                    suppress.push(Suppression::new(&meta.tenant, &address, text.clone(), d.outcome.rule_id.clone()));
                }
                bounce_event(&meta, &address, text, status_of(&d.reply), d.outcome.bounce_type, &d.outcome)
            }
        };
        let event = if d.outcome.disposition == Disposition::Delivered { event } else { with_session(event, via) };
        events.push((d.outcome.disposition == Disposition::Delivered, event));
    }

    meta.attempts = attempt;
    meta.last_reply = retrying.last().copied().or(decided.last()).map(|d| d.reply.to_string()).or(meta.last_reply.take());
    let still_pending = meta.recipients.iter().any(|r| r.state == RecipientState::Pending);
    let id = meta.id;
    let result = if still_pending {
        meta.due_at = next_due;
        ctx.spool.reschedule(&lease, meta).await
    } else {
        ctx.spool.complete(&lease).await
    };
    let keep_all = match result {
        Ok(()) => true,
        Err(SpoolError::LeaseLost(_)) => {
            tracing::warn!(%id, "lease lost before the outcome was stored; another worker owns the message now");
            false
        }
        Err(e) => {
            tracing::error!(%id, error = %e, "cannot store the delivery outcome; the message will be tried again when its lease runs out");
            false
        }
    };
    for (was_delivered, event) in events {
        // Deliveries happened whatever the spool says; decisions about the rest were not
        // stored, so whoever holds the message next will decide (and report) again.
        if keep_all || was_delivered {
            ctx.events.emit(event).await;
        }
    }
    if let (true, false, Some(list)) = (keep_all, suppress.is_empty(), &ctx.suppressions) {
        let n = suppress.len() as u64;
        match list.suppress(suppress).await {
            Ok(()) => metrics::counter!("sluice_suppressed_total").increment(n),
            Err(e) => tracing::error!(%id, error = %e, "cannot add hard-bounced recipients to the suppression list"),
        }
    }
    metrics::counter!("sluice_delivered_total").increment(delivered);
    if keep_all {
        metrics::counter!("sluice_deferred_total").increment(deferred);
        metrics::counter!("sluice_bounced_total").increment(bounced);
    }
    if let Some(p) = &via.provider {
        for (outcome, n) in [("delivered", delivered), ("deferred", deferred), ("bounced", bounced)] {
            if n > 0 {
                metrics::counter!("sluice_provider_recipients_total", "provider" => p.to_string(), "outcome" => outcome).increment(n);
            }
        }
    }
    feedback
}

/// `tls` and `ip` (the sending address) on deferred and bounce events, as SendGrid sends
/// them, when the attempt got as far as a session with the receiver.
fn with_session(event: Event, via: &Via) -> Event {
    match via.local_ip {
        Some(ip) => event.with("tls", u8::from(via.tls)).with("ip", ip.to_string()),
        None => event,
    }
}

fn bounce_event(meta: &MessageMeta, address: &str, reason: String, status: String, kind: BounceType, outcome: &Outcome) -> Event {
    Event::for_address(EventKind::Bounce, meta, address)
        .with("reason", reason)
        .with("status", status)
        .with("type", kind.as_str())
        .with("bounce_classification", outcome.classification.as_str())
        .with("sluice_rule", outcome.rule_id.clone())
        .with("sluice_rules_version", Value::String(outcome.rules_version.to_string()))
}

/// Puts a message back untouched and due now: it was leased but never tried (shutdown, or
/// too little lease time left), so it does not count as an attempt.
pub(crate) async fn release(ctx: &Ctx, leased: Leased) {
    put_back(ctx, leased, now_ms(), None).await;
}

/// Puts a message back untried, due at `due` (a suspension's end), noting why in its last reply.
pub(crate) async fn untried_until(ctx: &Ctx, leased: Leased, due: u64, why: &str) {
    put_back(ctx, leased, due, Some(why)).await;
}

async fn put_back(ctx: &Ctx, leased: Leased, due: u64, why: Option<&str>) {
    let Leased { lease, mut meta, .. } = leased;
    meta.due_at = due;
    if let Some(why) = why {
        meta.last_reply = Some(why.to_string());
    }
    match ctx.spool.reschedule(&lease, meta).await {
        Ok(()) | Err(SpoolError::LeaseLost(_)) => {}
        Err(e) => tracing::warn!(id = %lease.id, error = %e, "cannot release a leased message; it returns when its lease runs out"),
    }
    ctx.done_with(1);
}

/// Defers (or bounces, per the rules) a message with the failure that made its site
/// unreachable. The path's shaping is not fed again: that failure was counted once when it
/// happened.
pub(crate) async fn settle_failure(ctx: &Ctx, leased: Leased, failure: &crate::shaping::ConnectFailure, path: &crate::shaping::Path) {
    let replies = for_all_pending(&leased.meta, &failure.reply, failure.stage);
    let via = Via { provider: Some(path.metric_label().into()), ..failure.via.clone() };
    settle(ctx, leased, replies, &via).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let r = RetrySettings {
            initial: Duration::from_secs(60),
            factor: 2.0,
            max_interval: Duration::from_secs(300),
            max_age: Duration::from_secs(3600),
        };
        let within = |d: Duration, secs: f64| (d.as_secs_f64() - secs).abs() <= secs * 0.1 + 1e-9;
        assert!(within(backoff(&r, 1), 60.0));
        assert!(within(backoff(&r, 2), 120.0));
        assert!(within(backoff(&r, 3), 240.0));
        assert!(within(backoff(&r, 4), 300.0));
        assert!(within(backoff(&r, 1000), 300.0));
    }

    #[test]
    fn status_prefers_the_written_enhanced_code() {
        assert_eq!(status_of(&Reply::parse("550 5.7.606 banned").unwrap()), "5.7.606");
        assert_eq!(status_of(&Reply::parse("554 no").unwrap()), "5.0.0");
    }
}
