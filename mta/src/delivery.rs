//! Connections: each serves one site (the MX hosts of a destination) of one path (egress
//! source × provider). It is set up from the path's source with the path's TLS policy, then
//! takes messages from the site's ready queue and sends them one after another (RSET
//! between them only when a transaction may still be open), at the path's message rate,
//! up to its messages per connection and recipients per transaction, until the queue stays
//! empty for the idle timeout.
//!
//! Connection-level trouble (refused, timeout, TLS failure, a 4xx greeting or EHLO) moves
//! on to the next address and MX host. When none works, the site backs off (1 s, doubling
//! up to 5 minutes) and, if no other connection to it is open, every message waiting for it
//! is deferred with that failure. Each wait is capped by the lease: a message whose lease
//! cannot cover a transaction is released untouched.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use sluice_rules::{Context, Reply, Stage};
use sluice_spool::{now_ms, Leased, MessageMeta, RecipientState};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use crate::body::{self, WireBody};
use crate::config::{TlsMode, SPOOL_MARGIN};
use crate::outcome::{for_all_pending, release, settle, Feedback, RcptReply, Via};
use crate::route::Hop;
use crate::shaping::{take, Applied, ConnectFailure, Path, Site, Source};
use crate::smtp_client::{ClientError, SmtpClient};
use crate::synthetic;
use crate::tls::server_name;
use crate::worker::{hold_for_suspension, is_expired, Ctx};

/// Most addresses tried per connection attempt, over all MX hosts (Postfix uses 5).
const MAX_ADDRESSES: usize = 10;

/// An open, greeted connection.
struct Session {
    client: SmtpClient,
    via: Via,
    /// Messages attempted over it so far.
    sent: usize,
    /// A transaction may still be open on the server: RSET before the next MAIL. Not
    /// needed after the server answered the final dot, which ends the transaction
    /// (RFC 5321 §4.1.1.4): that saves a round trip per message.
    dirty: bool,
}

/// Why no session could be opened, as the reply every message gets.
#[derive(Debug)]
struct Failure {
    reply: Reply,
    stage: Stage,
    via: Via,
    /// Worth trying the next host (connection trouble, 4xx); a 5xx greeting or HELO is not.
    try_next: bool,
    /// The TLS handshake failed: with opportunistic TLS, retry the host in plain text.
    tls_handshake: bool,
}

/// When the lease of `msg` must be handed back, with time to spare for the spool write.
fn deadline(msg: &Leased) -> Instant {
    let left = msg.lease.until.saturating_sub(now_ms());
    Instant::now() + Duration::from_millis(left).saturating_sub(SPOOL_MARGIN)
}

fn time_left(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// Starts connections for `path`'s waiting mail, as many as its limits and the free
/// connection slots allow: one per site at a time is being set up, and a site with an idle
/// connection gets none (that connection takes the mail).
pub(crate) fn connect_more(ctx: &Arc<Ctx>, path: &Arc<Path>) {
    if ctx.cancel.is_cancelled() || path.queued() == 0 {
        return;
    }
    let now = now_ms();
    if path.suspended_until(now).is_some() {
        return;
    }
    let mut wake_at: Option<u64> = None;
    for site in path.sites() {
        if site.queued() == 0 || site.idle.load(Ordering::Relaxed) > 0 || site.connecting.load(Ordering::Relaxed) > 0 {
            continue;
        }
        if let Some(at) = site.backing_off(now) {
            wake_at = Some(wake_at.map_or(at, |w| w.min(at)));
            continue;
        }
        let eff = path.effective();
        if path.connections.load(Ordering::Relaxed) >= eff.limits.max_connections {
            return; // a closing connection calls again
        }
        let Ok(permit) = ctx.slots.clone().try_acquire_owned() else {
            ctx.slot_wanted.store(true, Ordering::Relaxed);
            return;
        };
        if let Some(limiter) = &eff.connects {
            let wait = take(limiter);
            if !wait.is_zero() {
                let at = now + wait.as_millis() as u64;
                wake_at = Some(wake_at.map_or(at, |w| w.min(at)));
                break;
            }
        }
        path.connections.fetch_add(1, Ordering::Relaxed);
        site.connecting.fetch_add(1, Ordering::Relaxed);
        ctx.tasks.spawn(run_connection(ctx.clone(), path.clone(), site, permit));
    }
    if let Some(at) = wake_at {
        wake_later(ctx, path, at);
    }
}

/// Looks for connection work on `path` again at `at` (one timer per path at a time).
fn wake_later(ctx: &Arc<Ctx>, path: &Arc<Path>, at: u64) {
    if path.wake_pending.swap(true, Ordering::AcqRel) {
        return;
    }
    let (ctx, path) = (ctx.clone(), path.clone());
    tokio::spawn(async move {
        let wait = Duration::from_millis(at.saturating_sub(now_ms()));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = ctx.cancel.cancelled() => {}
        }
        path.wake_pending.store(false, Ordering::Release);
        connect_more(&ctx, &path);
    });
}

/// Gives every path with waiting mail a chance to connect (a slot came free, limits changed).
pub(crate) fn wake_all(ctx: &Arc<Ctx>) {
    for path in ctx.shaping.paths() {
        if path.queued() > 0 {
            connect_more(ctx, &path);
        }
    }
}

/// A path was just suspended: mail waiting for it goes back to the spool.
pub(crate) async fn hand_back_suspended(ctx: &Ctx, path: &Path) {
    let Some(until) = path.suspended_until(now_ms()) else { return };
    for msg in path.drain() {
        hold_for_suspension(ctx, msg, path, until).await;
    }
}

/// Carries out what the rules asked for after a reply on `path`.
async fn apply_feedback(ctx: &Arc<Ctx>, path: &Arc<Path>, feedback: Vec<Feedback>) {
    for f in feedback {
        match path.apply(&f.rule_id, &f.action, &f.reply) {
            Applied::Nothing | Applied::Counted => {}
            Applied::Throttled(t) => {
                tracing::info!(provider = %path.provider, source = %path.source.id, rule = %f.rule_id, throttle = ?t, "shaping: path throttled");
                metrics::counter!("sluice_shaping_actions_total", "provider" => path.metric_label().to_string(), "action" => "throttle", "rule" => f.rule_id.clone()).increment(1);
            }
            Applied::Suspended(s) => {
                tracing::warn!(provider = %path.provider, source = %path.source.id, rule = %f.rule_id, until = s.until, reply = %f.reply, "shaping: path suspended");
                metrics::counter!("sluice_shaping_actions_total", "provider" => path.metric_label().to_string(), "action" => "suspend", "rule" => f.rule_id.clone()).increment(1);
                hand_back_suspended(ctx, path).await;
            }
        }
    }
}

/// One connection's life: set up, then serve the site's queue.
async fn run_connection(ctx: Arc<Ctx>, path: Arc<Path>, site: Arc<Site>, permit: OwnedSemaphorePermit) {
    let tls_mode = path.effective().limits.tls;
    let setup = Instant::now() + ctx.config.timeouts.setup_budget();
    let result = connect(&ctx, &site.hops, &path.source, tls_mode, setup).await;
    site.connecting.fetch_sub(1, Ordering::Relaxed);
    match result {
        Err(f) => on_connect_failure(&ctx, &path, &site, f).await,
        Ok(mut session) => {
            site.connected();
            session.via.provider = Some(path.metric_label().into());
            let ended = serve(&ctx, &path, &site, &mut session).await;
            site.open.fetch_sub(1, Ordering::Relaxed);
            if ended != Ended::Broken {
                session.client.quit(ctx.config.timeouts.mail.min(Duration::from_secs(5))).await;
            }
            if ended == Ended::OverLimit {
                path.connections.fetch_add(1, Ordering::Relaxed); // taken back just below
            }
        }
    }
    path.connections.fetch_sub(1, Ordering::Relaxed);
    drop(permit);
    connect_more(&ctx, &path);
    if ctx.slot_wanted.swap(false, Ordering::Relaxed) {
        wake_all(&ctx);
    }
}

/// A connection could not be set up: back off, let the rules see the failure once, and if
/// nothing else reaches the site, defer everything that waits for it.
async fn on_connect_failure(ctx: &Arc<Ctx>, path: &Arc<Path>, site: &Site, f: Failure) {
    let failures = site.failed(ConnectFailure { reply: f.reply.clone(), stage: f.stage, via: f.via.clone() });
    tracing::debug!(provider = %path.provider, site = %site.key, failures, reply = %f.reply, "no host of the site accepted a connection");
    // The rules decide what the failure means for the path (a 421 "too many connections"
    // may throttle it); counted once per failed attempt, not once per waiting message.
    let cx = Context { stage: Some(f.stage), mx_host: f.via.mx_host.as_deref(), domain: (!path.known).then_some(&*path.provider) };
    let outcome = ctx.classify.classify(&f.reply, &cx);
    if !outcome.shaping.is_none() {
        let fb = Feedback { rule_id: outcome.rule_id.clone(), action: outcome.shaping.clone(), reply: f.reply.to_string() };
        apply_feedback(ctx, path, vec![fb]).await;
    }
    if !site.unreachable() {
        return; // other connections to the site carry its mail
    }
    let failure = ConnectFailure { reply: f.reply, stage: f.stage, via: Via { provider: Some(path.metric_label().into()), ..f.via } };
    for msg in path.drain_site(site) {
        crate::outcome::settle_failure(ctx, msg, &failure, path).await;
    }
}

/// Sends the site's mail over `session` until the queue stays empty for the idle time, the
/// connection's message limit is reached, the path is suspended or over its connection
/// limit, shutdown begins, or the connection breaks.
async fn serve(ctx: &Arc<Ctx>, path: &Arc<Path>, site: &Site, session: &mut Session) -> Ended {
    let t = &ctx.config.timeouts;
    loop {
        let (idle, max_messages, rcpts_per_tx) = {
            let eff = path.effective();
            (eff.limits.idle_timeout, eff.limits.max_messages_per_connection as usize, eff.limits.max_recipients_per_transaction as usize)
        };
        if ctx.cancel.is_cancelled() || session.sent >= max_messages || path.suspended_until(now_ms()).is_some() {
            return Ended::Done;
        }
        if over_limit(path) {
            return Ended::OverLimit;
        }
        let Some(msg) = path.pop(site, idle, &ctx.cancel).await else { return Ended::Done };
        ctx.room.notify_one();
        if let Some(reply) = is_expired(ctx, &msg) {
            let replies = for_all_pending(&msg.meta, &reply, Stage::Connect);
            settle(ctx, msg, replies, &session.via).await;
            continue;
        }
        let deadline = deadline(&msg);
        if time_left(deadline) < t.message_budget() {
            release(ctx, msg).await;
            continue;
        }
        // Signed before the transaction; the signature reaches the spool with the outcome.
        let mut msg = msg;
        if let Err(reply) = ctx.dkim.sign_once(&mut msg.meta, &msg.body).await {
            let replies = for_all_pending(&msg.meta, &reply, Stage::Data);
            settle(ctx, msg, replies, &Via { provider: session.via.provider.clone(), ..Via::default() }).await;
            continue;
        }
        let pending: Vec<usize> =
            msg.meta.recipients.iter().enumerate().filter(|(_, r)| r.state == RecipientState::Pending).map(|(i, _)| i).collect();
        let per_tx = rcpts_per_tx.max(1);
        let transactions = pending.len().div_ceil(per_tx).max(1);
        if session.sent > 0 && session.sent + transactions > max_messages {
            // Its transactions do not fit in what this connection may still carry: a new
            // connection takes it (one that has sent nothing takes any message).
            path.push_front(site, msg);
            return Ended::Done;
        }
        let started = std::time::Instant::now();
        let mut wire: Option<WireBody> = None;
        let mut replies = Vec::with_capacity(pending.len());
        let mut broken = false;
        for (n, chunk) in pending.chunks(per_tx).enumerate() {
            // Every transaction waits for the path's message rate (providers count MAIL commands).
            if !wait_for_rate(ctx, path, deadline).await {
                if n == 0 {
                    // Shutdown, a suspension, or the lease would run out first: not an attempt.
                    match path.suspended_until(now_ms()) {
                        Some(until) => hold_for_suspension(ctx, msg, path, until).await,
                        None => release(ctx, msg).await,
                    }
                    return Ended::Done;
                }
                let reply = synthetic::rate_not_allowed();
                replies.extend(chunk_replies(&pending[n * per_tx..], &reply, Stage::Mail));
                break;
            }
            if session.dirty {
                let host = session.via.mx_host.clone().unwrap_or_default();
                match session.client.command("RSET", t.mail.min(time_left(deadline))).await {
                    Ok(r) if r.class() == 2 => {}
                    outcome => {
                        tracing::debug!(host, ?outcome, "RSET failed; closing the connection");
                        if n == 0 {
                            // Nothing was tried: the message waits for the next connection.
                            path.push_front(site, msg);
                            return Ended::Broken;
                        }
                        let reply = synthetic::rset_refused(&host);
                        replies.extend(chunk_replies(&pending[n * per_tx..], &reply, Stage::Mail));
                        broken = true;
                        break;
                    }
                }
            }
            if wire.is_none() {
                wire = Some(body::encode_off_reactor(msg.meta.prepend_headers.clone(), msg.body.clone()).await);
            }
            let (r, b, ended) = transaction(ctx, session, &msg.meta, wire.as_ref().expect("encoded above"), chunk, deadline).await;
            session.sent += 1;
            session.dirty = !ended;
            path.sent.fetch_add(1, Ordering::Relaxed);
            replies.extend(r);
            if b {
                let rest = &pending[((n + 1) * per_tx).min(pending.len())..];
                if !rest.is_empty() {
                    let reply = synthetic::broke_before_tried();
                    replies.extend(chunk_replies(rest, &reply, Stage::Mail));
                }
                broken = true;
                break;
            }
        }
        metrics::histogram!("sluice_delivery_attempt_seconds").record(started.elapsed().as_secs_f64());
        let feedback = settle(ctx, msg, replies, &session.via).await;
        if !feedback.is_empty() {
            apply_feedback(ctx, path, feedback).await;
        }
        if broken {
            return Ended::Broken;
        }
    }
}

/// Whether this connection should close because a throttle lowered the path's connection
/// limit below the connections open. If so, it gives up its count at once, so only as many
/// connections close as needed.
fn over_limit(path: &Path) -> bool {
    let max = path.effective().limits.max_connections;
    path.connections.fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| (c > max).then(|| c - 1)).is_ok()
}

/// How a connection's work ended.
#[derive(PartialEq, Eq)]
enum Ended {
    /// Usable: say QUIT.
    Done,
    /// Usable, and it already gave up its count of the path's connections (over the limit).
    OverLimit,
    /// The connection broke.
    Broken,
}

/// Waits for the path's message rate to allow one more. False when the lease would run
/// out first, the path was suspended meanwhile, or shutdown began.
async fn wait_for_rate(ctx: &Ctx, path: &Path, deadline: Instant) -> bool {
    loop {
        if path.suspended_until(now_ms()).is_some() {
            return false;
        }
        let wait = match &path.effective().messages {
            None => return true,
            Some(limiter) => take(limiter),
        };
        if wait.is_zero() {
            return true;
        }
        if time_left(deadline) < wait + ctx.config.timeouts.message_budget() {
            return false;
        }
        // Re-checked after at most a second: a throttle that ends speeds the path up again.
        tokio::select! {
            _ = tokio::time::sleep(wait.min(Duration::from_secs(1))) => {}
            _ = ctx.cancel.cancelled() => return false,
        }
    }
}

fn chunk_replies(indices: &[usize], reply: &Reply, stage: Stage) -> Vec<RcptReply> {
    indices.iter().map(|&index| RcptReply { index, reply: reply.clone(), stage }).collect()
}

/// Opens a session with the first host that takes one, in order.
async fn connect(ctx: &Ctx, hops: &[Hop], source: &Source, tls: TlsMode, deadline: Instant) -> Result<Session, Failure> {
    let mut last: Option<Failure> = None;
    let mut lookup_failure: Option<Reply> = None;
    let mut tried = 0;
    'hops: for hop in hops {
        let addrs = match ctx.router.addresses(hop).await {
            Ok(a) => a,
            Err(reply) => {
                // A temporary lookup failure anywhere outweighs "no such host" elsewhere.
                if lookup_failure.as_ref().is_none_or(|r| r.class() != 4) {
                    lookup_failure = Some(reply);
                }
                continue;
            }
        };
        for ip in addrs {
            // An IPv4 source cannot reach an IPv6 host and the other way round.
            if source.bind.is_some_and(|b| b.is_ipv4() != ip.is_ipv4()) {
                continue;
            }
            if tried >= MAX_ADDRESSES || time_left(deadline).is_zero() {
                break 'hops;
            }
            tried += 1;
            let addr = SocketAddr::new(ip, hop.port);
            let mut attempt = open(ctx, hop, addr, source, tls, deadline, tls != TlsMode::Disabled).await;
            if let Err(f) = &attempt {
                if f.tls_handshake && tls == TlsMode::Opportunistic {
                    tracing::debug!(host = %hop.name, %addr, reply = %f.reply, "TLS failed; retrying in plain text");
                    attempt = open(ctx, hop, addr, source, tls, deadline, false).await;
                }
            }
            match attempt {
                Ok(session) => return Ok(session),
                Err(f) => {
                    tracing::debug!(host = %hop.name, %addr, reply = %f.reply, "host did not take a session");
                    let next = f.try_next;
                    last = Some(f);
                    if !next {
                        break 'hops;
                    }
                }
            }
        }
    }
    Err(last.unwrap_or_else(|| {
        let reply = lookup_failure.unwrap_or_else(synthetic::no_host);
        Failure { reply, stage: Stage::Connect, via: Via::default(), try_next: false, tls_handshake: false }
    }))
}

/// Connects to one address: greeting, EHLO (HELO as fallback), STARTTLS when wanted.
#[allow(clippy::too_many_arguments)]
async fn open(ctx: &Ctx, hop: &Hop, addr: SocketAddr, source: &Source, tls: TlsMode, deadline: Instant, use_tls: bool) -> Result<Session, Failure> {
    let t = &ctx.config.timeouts;
    let required = tls == TlsMode::Required;
    let host = hop.name.as_str();
    let via = Via { mx_host: Some(hop.name.clone()), tls: false, local_ip: source.bind, provider: None };
    let fail = |reply: Reply, stage: Stage, try_next: bool| Failure { reply, stage, via: via.clone(), try_next, tls_handshake: false };
    let wait = |d: Duration| d.min(time_left(deadline));

    let mut client = SmtpClient::connect_from(addr, source.bind, wait(t.connect))
        .await
        .map_err(|e| fail(synthetic::connect_failed(host, addr, e), Stage::Connect, true))?;
    metrics::counter!("sluice_delivery_connections_total").increment(1);
    let banner = client.read_reply(wait(t.banner)).await.map_err(|e| fail(synthetic::client_failure(&e, host, "the greeting"), Stage::Connect, true))?;
    match banner.class() {
        2 => {}
        4 => return Err(fail(banner, Stage::Connect, true)),
        _ => return Err(fail(banner, Stage::Connect, false)),
    }
    greet(ctx, &mut client, &source.ehlo, host, deadline).await.map_err(|(r, next)| fail(r, Stage::Ehlo, next))?;

    if use_tls && client.capabilities().starttls {
        let reply = client.command("STARTTLS", wait(t.tls)).await.map_err(|e| fail(synthetic::client_failure(&e, host, "STARTTLS"), Stage::StartTls, true))?;
        if reply.class() == 2 {
            let name = server_name(host)
                .ok_or_else(|| fail(synthetic::invalid_tls_name(host), Stage::StartTls, true))?;
            client = client.start_tls(&ctx.tls, name, wait(t.tls)).await.map_err(|e| Failure {
                tls_handshake: true,
                ..fail(synthetic::client_failure(&e, host, "the TLS handshake"), Stage::StartTls, true)
            })?;
            greet(ctx, &mut client, &source.ehlo, host, deadline).await.map_err(|(r, next)| fail(r, Stage::Ehlo, next))?;
        } else if required {
            return Err(fail(synthetic::starttls_refused(host, &reply), Stage::StartTls, true));
        }
    } else if use_tls && required {
        return Err(fail(synthetic::starttls_missing(host), Stage::StartTls, true));
    }
    let via = Via { mx_host: Some(hop.name.clone()), tls: client.is_tls(), local_ip: Some(client.local_addr().ip()), provider: None };
    Ok(Session { client, via, sent: 0, dirty: false })
}

/// EHLO, or HELO when EHLO is refused with 5xx. The error carries the reply and whether
/// the next host is worth trying.
async fn greet(ctx: &Ctx, client: &mut SmtpClient, name: &str, host: &str, deadline: Instant) -> Result<(), (Reply, bool)> {
    let wait = ctx.config.timeouts.ehlo.min(time_left(deadline));
    let reply = client.ehlo(name, wait).await.map_err(|e| (synthetic::client_failure(&e, host, "EHLO"), true))?;
    let reply = match reply.class() {
        2 => return Ok(()),
        4 => return Err((reply, true)),
        _ => client.helo(name, wait).await.map_err(|e| (synthetic::client_failure(&e, host, "HELO"), true))?,
    };
    match reply.class() {
        2 => Ok(()),
        4 => Err((reply, true)),
        _ => Err((reply, false)),
    }
}

/// Reads the reply to `cmd`, sending it first unless it was pipelined already.
async fn exchange(client: &mut SmtpClient, pipelined: bool, cmd: &str, timeout: Duration) -> Result<Reply, ClientError> {
    if !pipelined {
        client.send(cmd.as_bytes(), timeout).await?;
    }
    client.read_reply(timeout).await
}

/// One transaction: MAIL, RCPT for the recipients at `indices` (into `meta.recipients`),
/// DATA, body (pipelined when the server allows). Returns the reply each of them got,
/// whether the connection is broken afterwards, and whether no transaction is left open on
/// the server (nothing was sent, or the final dot was answered).
async fn transaction(ctx: &Ctx, session: &mut Session, meta: &MessageMeta, wire: &WireBody, indices: &[usize], deadline: Instant) -> (Vec<RcptReply>, bool, bool) {
    let t = &ctx.config.timeouts;
    let host = session.via.mx_host.clone().unwrap_or_default();
    let caps = session.client.capabilities().clone();
    let wait = |d: Duration| d.min(time_left(deadline));
    let rcpts: Vec<(usize, &str)> = indices.iter().map(|&i| (i, meta.recipients[i].address.as_str())).collect();

    if rcpts.is_empty() {
        // Nothing left to send (every recipient is final): settling completes it.
        return (Vec::new(), false, true);
    }
    let needs_utf8 = !meta.mail_from.is_ascii() || rcpts.iter().any(|(_, a)| !a.is_ascii());
    if needs_utf8 && !caps.smtputf8 {
        let reply = synthetic::smtputf8_unsupported(&host);
        return (chunk_replies(indices, &reply, Stage::Mail), false, true);
    }
    if let Some(limit) = caps.size.filter(|&l| l > 0 && wire.message_size as u64 > l) {
        let reply = synthetic::too_large(wire.message_size, limit, &host);
        return (chunk_replies(indices, &reply, Stage::Mail), false, true);
    }

    let mut mail = format!("MAIL FROM:<{}>", meta.mail_from);
    if caps.size.is_some() {
        mail.push_str(&format!(" SIZE={}", wire.message_size));
    }
    if wire.eight_bit && caps.eight_bit_mime {
        mail.push_str(" BODY=8BITMIME");
    }
    if needs_utf8 {
        mail.push_str(" SMTPUTF8");
    }
    mail.push_str("\r\n");
    let rcpt_cmds: Vec<String> = rcpts.iter().map(|(_, a)| format!("RCPT TO:<{a}>\r\n")).collect();

    let pipelined = caps.pipelining;
    let client = &mut session.client;
    let mut tx = Transaction::new(rcpts.iter().map(|(i, _)| *i).collect());
    if pipelined {
        let batch: String = std::iter::once(mail.as_str()).chain(rcpt_cmds.iter().map(String::as_str)).chain(["DATA\r\n"]).collect();
        if let Err(e) = client.send(batch.as_bytes(), wait(t.mail)).await {
            return tx.broken(synthetic::client_failure(&e, &host, "MAIL FROM"), Stage::Mail);
        }
    }
    match exchange(client, pipelined, &mail, wait(t.mail)).await {
        Ok(r) => tx.mail = Some(r),
        Err(e) => return tx.broken(synthetic::client_failure(&e, &host, "MAIL FROM"), Stage::Mail),
    }
    let mail_ok = tx.mail.as_ref().is_some_and(|r| r.class() == 2);
    if !mail_ok && !pipelined {
        return tx.finish();
    }
    for cmd in &rcpt_cmds {
        match exchange(client, pipelined, cmd, wait(t.rcpt)).await {
            Ok(r) => tx.rcpt.push(r),
            Err(e) => return tx.broken(synthetic::client_failure(&e, &host, "RCPT TO"), Stage::Rcpt),
        }
    }
    let any_accepted = tx.rcpt.iter().any(|r| r.class() == 2);
    if !pipelined && !any_accepted {
        return tx.finish();
    }
    let data = match exchange(client, pipelined, "DATA\r\n", wait(t.data)).await {
        Ok(r) => r,
        Err(e) => return tx.broken(synthetic::client_failure(&e, &host, "DATA"), Stage::Data),
    };
    if data.code != 354 {
        tx.end = Some((data, Stage::Data));
        return tx.finish();
    }
    if !mail_ok || !any_accepted {
        // Pipelined DATA went through although nothing can be delivered: end it empty.
        if let Err(e) = client.send(b".\r\n", wait(t.data)).await {
            return tx.broken(synthetic::client_failure(&e, &host, "DATA"), Stage::Data);
        }
        return match client.read_reply(wait(t.end_of_data)).await {
            Ok(_) => {
                tx.ended = true;
                tx.finish()
            }
            Err(e) => tx.broken(synthetic::client_failure(&e, &host, "the end of DATA"), Stage::EndOfData),
        };
    }
    if let Err(e) = client.send_blocks(&wire.bytes, wait(t.data)).await {
        return tx.broken(synthetic::client_failure(&e, &host, "the message body"), Stage::Data);
    }
    match client.read_reply(wait(t.end_of_data)).await {
        Ok(r) => {
            tx.end = Some((r, Stage::EndOfData));
            tx.ended = true;
        }
        Err(e) => return tx.broken(synthetic::client_failure(&e, &host, "the end of DATA"), Stage::EndOfData),
    }
    tx.finish()
}

/// The replies of one transaction, turned into one reply per recipient at the end.
struct Transaction {
    /// Indices into `meta.recipients` of the recipients tried, in RCPT order.
    indices: Vec<usize>,
    mail: Option<Reply>,
    /// RCPT replies received so far, in order.
    rcpt: Vec<Reply>,
    /// The reply that decides for accepted recipients (DATA refusal or end of data).
    end: Option<(Reply, Stage)>,
    /// Set when the connection failed: the reply for everyone without a better one.
    failure: Option<(Reply, Stage)>,
    /// The server answered the final dot: the transaction is over on its side too.
    ended: bool,
}

impl Transaction {
    fn new(indices: Vec<usize>) -> Self {
        Transaction { indices, mail: None, rcpt: Vec::new(), end: None, failure: None, ended: false }
    }

    fn broken(mut self, reply: Reply, stage: Stage) -> (Vec<RcptReply>, bool, bool) {
        self.failure = Some((reply, stage));
        self.finish()
    }

    /// MAIL refused: everyone gets that. Otherwise a refused RCPT keeps its reply, and the
    /// accepted ones get the DATA or end-of-data reply; a broken connection fills the gaps.
    fn finish(self) -> (Vec<RcptReply>, bool, bool) {
        let closing = |r: &Reply| r.code == 421;
        let broken = self.failure.is_some()
            || self.mail.as_ref().is_some_and(closing)
            || self.rcpt.iter().any(closing)
            || self.end.as_ref().is_some_and(|(r, _)| closing(r));
        let fallback = self.failure.clone().unwrap_or_else(|| {
            (synthetic::no_final_reply(), Stage::EndOfData)
        });
        let replies = self
            .indices
            .iter()
            .enumerate()
            .map(|(k, &index)| {
                let (reply, stage) = match (&self.mail, self.rcpt.get(k)) {
                    (None, _) => fallback.clone(),
                    (Some(m), _) if m.class() != 2 => (m.clone(), Stage::Mail),
                    (Some(_), None) => fallback.clone(),
                    (Some(_), Some(r)) if r.class() != 2 => (r.clone(), Stage::Rcpt),
                    (Some(_), Some(_)) => self.end.clone().unwrap_or_else(|| fallback.clone()),
                };
                RcptReply { index, reply, stage }
            })
            .collect();
        (replies, broken, self.ended)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> Reply {
        Reply::parse(s).unwrap()
    }

    #[test]
    fn mail_refusal_applies_to_everyone() {
        let mut tx = Transaction::new(vec![0, 2]);
        tx.mail = Some(r("550 5.7.1 sender blocked"));
        tx.rcpt = vec![r("503 5.5.1 no"), r("503 5.5.1 no")];
        let (replies, broken, _) = tx.finish();
        assert!(!broken);
        assert!(replies.iter().all(|x| x.reply.code == 550 && x.stage == Stage::Mail));
        assert_eq!(replies.iter().map(|x| x.index).collect::<Vec<_>>(), [0, 2]);
    }

    #[test]
    fn rcpt_replies_stay_and_data_decides_for_the_accepted() {
        let mut tx = Transaction::new(vec![0, 1, 2]);
        tx.mail = Some(r("250 ok"));
        tx.rcpt = vec![r("250 ok"), r("550 5.1.1 unknown"), r("451 4.7.1 later")];
        tx.end = Some((r("250 2.0.0 queued"), Stage::EndOfData));
        let (replies, _, _) = tx.finish();
        let got: Vec<(u16, Stage)> = replies.iter().map(|x| (x.reply.code, x.stage)).collect();
        assert_eq!(got, [(250, Stage::EndOfData), (550, Stage::Rcpt), (451, Stage::Rcpt)]);
    }

    #[test]
    fn a_broken_connection_fills_the_gaps() {
        let mut tx = Transaction::new(vec![0, 1, 2]);
        tx.mail = Some(r("250 ok"));
        tx.rcpt = vec![r("550 5.1.1 unknown"), r("250 ok")];
        let (replies, broken, _) = tx.broken(r("421 4.4.2 gone"), Stage::Rcpt);
        assert!(broken);
        let got: Vec<u16> = replies.iter().map(|x| x.reply.code).collect();
        assert_eq!(got, [550, 421, 421]);
    }
}
