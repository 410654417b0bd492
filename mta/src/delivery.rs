//! Delivering the leased messages of one destination: find a host that answers, then send
//! the messages one after another over that connection (RSET between), and when it runs
//! dry, look for more due mail to the same destination for `timeouts.idle`.
//!
//! Connection-level trouble (refused, timeout, TLS failure, a 4xx greeting or EHLO) moves
//! on to the next address and MX host; when none works, the last failure is the outcome of
//! every message. Each wait is capped by the lease: a message whose lease cannot cover a
//! transaction is released untouched.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use sluice_rules::{Reply, Stage};
use sluice_spool::{LeaseRequest, Leased, QueueFilter, RecipientState};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::body;
use crate::config::{TlsMode, SPOOL_MARGIN};
use crate::outcome::{for_all_pending, release, settle, RcptReply, Via};
use crate::route::Hop;
use crate::smtp_client::{ClientError, SmtpClient};
use crate::synthetic;
use crate::tls::server_name;
use crate::worker::Ctx;

/// Most addresses tried per connection attempt, over all MX hosts (Postfix uses 5).
const MAX_ADDRESSES: usize = 10;

/// Messages for one destination domain, leased together.
pub(crate) struct Job {
    pub domain: String,
    pub messages: VecDeque<Leased>,
}

/// An open, greeted connection.
struct Session {
    client: SmtpClient,
    via: Via,
    /// Messages attempted over it so far.
    sent: usize,
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
    let left = msg.lease.until.saturating_sub(sluice_spool::now_ms());
    Instant::now() + Duration::from_millis(left).saturating_sub(SPOOL_MARGIN)
}

fn time_left(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

pub(crate) async fn run_job(ctx: Arc<Ctx>, mut job: Job, permit: OwnedSemaphorePermit, cancel: CancellationToken) {
    let _permit = permit;
    let t = ctx.config.timeouts.clone();
    let hops = match ctx.router.hops(&job.domain).await {
        Ok(hops) => hops,
        Err(reply) => {
            for msg in job.messages.drain(..) {
                let replies = for_all_pending(&msg.meta, &reply, Stage::Connect);
                settle(&ctx, msg, replies, &Via::default()).await;
            }
            return;
        }
    };
    while let Some(first) = job.messages.front() {
        if cancel.is_cancelled() || time_left(deadline(first)) < t.setup_budget() + t.message_budget() {
            break;
        }
        let mut session = match connect(&ctx, &hops, deadline(first)).await {
            Ok(s) => s,
            Err(f) => {
                tracing::debug!(domain = %job.domain, reply = %f.reply, "no host of the destination accepted a session");
                for msg in job.messages.drain(..) {
                    let replies = for_all_pending(&msg.meta, &f.reply, f.stage);
                    settle(&ctx, msg, replies, &f.via).await;
                }
                return;
            }
        };
        let healthy = deliver_over(&ctx, &mut session, &mut job, &cancel).await;
        if healthy {
            session.client.quit(t.mail.min(Duration::from_secs(5))).await;
        }
    }
    for msg in job.messages.drain(..) {
        release(&ctx, msg).await;
    }
}

/// Sends the job's messages over `session` until they run out (and no more arrive within
/// the idle time), the connection's message limit is reached, shutdown begins, or the
/// connection breaks. Returns whether the connection is still usable.
async fn deliver_over(ctx: &Ctx, session: &mut Session, job: &mut Job, cancel: &CancellationToken) -> bool {
    let t = &ctx.config.timeouts;
    loop {
        if cancel.is_cancelled() || session.sent >= ctx.config.max_messages_per_connection {
            return true;
        }
        let Some(msg) = job.messages.pop_front() else {
            if more_for_destination(ctx, job, session.sent, cancel).await {
                continue;
            }
            return true;
        };
        let deadline = deadline(&msg);
        if time_left(deadline) < t.message_budget() {
            release(ctx, msg).await;
            continue;
        }
        // Signed before the transaction; the signature reaches the spool with the outcome.
        let mut msg = msg;
        if let Err(reply) = ctx.dkim.sign_once(&mut msg.meta, &msg.body).await {
            let replies = for_all_pending(&msg.meta, &reply, Stage::Data);
            settle(ctx, msg, replies, &Via::default()).await;
            continue;
        }
        if session.sent > 0 {
            let host = session.via.mx_host.clone().unwrap_or_default();
            match session.client.command("RSET", t.mail.min(time_left(deadline))).await {
                Ok(r) if r.class() == 2 => {}
                outcome => {
                    tracing::debug!(host, ?outcome, "RSET failed; reconnecting");
                    job.messages.push_front(msg);
                    return false;
                }
            }
        }
        let started = std::time::Instant::now();
        let (replies, broken) = transaction(ctx, session, &msg, deadline).await;
        metrics::histogram!("sluice_delivery_attempt_seconds").record(started.elapsed().as_secs_f64());
        session.sent += 1;
        settle(ctx, msg, replies, &session.via).await;
        if broken {
            return false;
        }
    }
}

/// While the connection is idle, leases due mail for the same destination so it can be
/// sent over this connection. Gives up after `timeouts.idle`, at shutdown, or as soon as
/// another job waits for a connection slot.
async fn more_for_destination(ctx: &Ctx, job: &mut Job, sent: usize, cancel: &CancellationToken) -> bool {
    let idle = ctx.config.timeouts.idle;
    let until = Instant::now() + idle;
    let domain = job.domain.clone();
    let filter: QueueFilter = Arc::new(move |q: &str| q == domain);
    loop {
        let room = ctx.config.max_messages_per_connection.saturating_sub(sent).min(ctx.config.lease_batch);
        if idle.is_zero() || room == 0 || cancel.is_cancelled() || ctx.waiting_jobs.load(Ordering::Relaxed) > 0 {
            return false;
        }
        let req = LeaseRequest { max: room, max_per_queue: room, lease_for: ctx.config.lease_for, filter: Some(filter.clone()) };
        match ctx.spool.lease(req).await {
            Ok(more) if !more.is_empty() => {
                job.messages.extend(more);
                return true;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(domain = %job.domain, error = %e, "cannot lease from the spool");
                return false;
            }
        }
        let left = time_left(until);
        if left.is_zero() {
            return false;
        }
        tokio::select! {
            _ = tokio::time::sleep(left.min(ctx.config.idle_poll)) => {}
            _ = cancel.cancelled() => return false,
        }
    }
}

/// Opens a session with the first host that takes one, in order.
async fn connect(ctx: &Ctx, hops: &[Hop], deadline: Instant) -> Result<Session, Failure> {
    let t = &ctx.config.timeouts;
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
            if tried >= MAX_ADDRESSES || time_left(deadline) < t.setup_budget() + t.message_budget() {
                break 'hops;
            }
            tried += 1;
            let addr = SocketAddr::new(ip, hop.port);
            let mut attempt = open(ctx, hop, addr, deadline, ctx.config.tls.mode != TlsMode::Disabled).await;
            if let Err(f) = &attempt {
                if f.tls_handshake && ctx.config.tls.mode == TlsMode::Opportunistic {
                    tracing::debug!(host = %hop.name, %addr, reply = %f.reply, "TLS failed; retrying in plain text");
                    attempt = open(ctx, hop, addr, deadline, false).await;
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
        let reply = lookup_failure
            .unwrap_or_else(synthetic::no_host);
        Failure { reply, stage: Stage::Connect, via: Via::default(), try_next: false, tls_handshake: false }
    }))
}

/// Connects to one address: greeting, EHLO (HELO as fallback), STARTTLS when wanted.
async fn open(ctx: &Ctx, hop: &Hop, addr: SocketAddr, deadline: Instant, use_tls: bool) -> Result<Session, Failure> {
    let t = &ctx.config.timeouts;
    let required = ctx.config.tls.mode == TlsMode::Required;
    let host = hop.name.as_str();
    let via = Via { mx_host: Some(hop.name.clone()), tls: false, local_ip: None };
    let fail = |reply: Reply, stage: Stage, try_next: bool| Failure { reply, stage, via: via.clone(), try_next, tls_handshake: false };
    let wait = |d: Duration| d.min(time_left(deadline));

    let mut client = SmtpClient::connect(addr, wait(t.connect))
        .await
        .map_err(|e| fail(synthetic::connect_failed(host, addr, e), Stage::Connect, true))?;
    metrics::counter!("sluice_smtp_connections_total").increment(1);
    let banner = client.read_reply(wait(t.banner)).await.map_err(|e| fail(synthetic::client_failure(&e, host, "the greeting"), Stage::Connect, true))?;
    match banner.class() {
        2 => {}
        4 => return Err(fail(banner, Stage::Connect, true)),
        _ => return Err(fail(banner, Stage::Connect, false)),
    }
    greet(ctx, &mut client, host, deadline).await.map_err(|(r, next)| fail(r, Stage::Ehlo, next))?;

    if use_tls && client.capabilities().starttls {
        let reply = client.command("STARTTLS", wait(t.tls)).await.map_err(|e| fail(synthetic::client_failure(&e, host, "STARTTLS"), Stage::StartTls, true))?;
        if reply.class() == 2 {
            let name = server_name(host)
                .ok_or_else(|| fail(synthetic::invalid_tls_name(host), Stage::StartTls, true))?;
            client = client.start_tls(&ctx.tls, name, wait(t.tls)).await.map_err(|e| Failure {
                tls_handshake: true,
                ..fail(synthetic::client_failure(&e, host, "the TLS handshake"), Stage::StartTls, true)
            })?;
            greet(ctx, &mut client, host, deadline).await.map_err(|(r, next)| fail(r, Stage::Ehlo, next))?;
        } else if required {
            return Err(fail(synthetic::starttls_refused(host, &reply), Stage::StartTls, true));
        }
    } else if use_tls && required {
        return Err(fail(synthetic::starttls_missing(host), Stage::StartTls, true));
    }
    let via = Via { mx_host: Some(hop.name.clone()), tls: client.is_tls(), local_ip: Some(client.local_addr().ip()) };
    Ok(Session { client, via, sent: 0 })
}

/// EHLO, or HELO when EHLO is refused with 5xx. The error carries the reply and whether
/// the next host is worth trying.
async fn greet(ctx: &Ctx, client: &mut SmtpClient, host: &str, deadline: Instant) -> Result<(), (Reply, bool)> {
    let name = &ctx.config.ehlo_hostname;
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

/// One message: MAIL, RCPT per pending recipient, DATA, body (pipelined when the server
/// allows). Returns the reply each pending recipient got, and whether the connection is
/// broken afterwards.
async fn transaction(ctx: &Ctx, session: &mut Session, msg: &Leased, deadline: Instant) -> (Vec<RcptReply>, bool) {
    let t = &ctx.config.timeouts;
    let meta = &msg.meta;
    let host = session.via.mx_host.clone().unwrap_or_default();
    let caps = session.client.capabilities().clone();
    let wait = |d: Duration| d.min(time_left(deadline));
    let rcpts: Vec<(usize, &str)> = meta
        .recipients
        .iter()
        .enumerate()
        .filter(|(_, r)| r.state == RecipientState::Pending)
        .map(|(i, r)| (i, r.address.as_str()))
        .collect();

    if rcpts.is_empty() {
        // Nothing left to send (every recipient is final): settling completes it.
        return (Vec::new(), false);
    }
    let needs_utf8 = !meta.mail_from.is_ascii() || rcpts.iter().any(|(_, a)| !a.is_ascii());
    if needs_utf8 && !caps.smtputf8 {
        let reply = synthetic::smtputf8_unsupported(&host);
        return (for_all_pending(meta, &reply, Stage::Mail), false);
    }
    let wire = body::encode_off_reactor(meta.prepend_headers.clone(), msg.body.clone()).await;
    if let Some(limit) = caps.size.filter(|&l| l > 0 && wire.message_size as u64 > l) {
        let reply = synthetic::too_large(wire.message_size, limit, &host);
        return (for_all_pending(meta, &reply, Stage::Mail), false);
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
            Ok(_) => tx.finish(),
            Err(e) => tx.broken(synthetic::client_failure(&e, &host, "the end of DATA"), Stage::EndOfData),
        };
    }
    if let Err(e) = client.send_blocks(&wire.bytes, wait(t.data)).await {
        return tx.broken(synthetic::client_failure(&e, &host, "the message body"), Stage::Data);
    }
    match client.read_reply(wait(t.end_of_data)).await {
        Ok(r) => tx.end = Some((r, Stage::EndOfData)),
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
}

impl Transaction {
    fn new(indices: Vec<usize>) -> Self {
        Transaction { indices, mail: None, rcpt: Vec::new(), end: None, failure: None }
    }

    fn broken(mut self, reply: Reply, stage: Stage) -> (Vec<RcptReply>, bool) {
        self.failure = Some((reply, stage));
        self.finish()
    }

    /// MAIL refused: everyone gets that. Otherwise a refused RCPT keeps its reply, and the
    /// accepted ones get the DATA or end-of-data reply; a broken connection fills the gaps.
    fn finish(self) -> (Vec<RcptReply>, bool) {
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
        (replies, broken)
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
        let (replies, broken) = tx.finish();
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
        let (replies, _) = tx.finish();
        let got: Vec<(u16, Stage)> = replies.iter().map(|x| (x.reply.code, x.stage)).collect();
        assert_eq!(got, [(250, Stage::EndOfData), (550, Stage::Rcpt), (451, Stage::Rcpt)]);
    }

    #[test]
    fn a_broken_connection_fills_the_gaps() {
        let mut tx = Transaction::new(vec![0, 1, 2]);
        tx.mail = Some(r("250 ok"));
        tx.rcpt = vec![r("550 5.1.1 unknown"), r("250 ok")];
        let (replies, broken) = tx.broken(r("421 4.4.2 gone"), Stage::Rcpt);
        assert!(broken);
        let got: Vec<u16> = replies.iter().map(|x| x.reply.code).collect();
        assert_eq!(got, [550, 421, 421]);
    }
}
