//! One SMTP connection to the sink: the server side of RFC 5321 with PIPELINING (RFC 2920)
//! and STARTTLS (RFC 3207), commands parsed by smtp-proto.
//!
//! Replies are collected and written when the client's pipelined commands are used up (or
//! before the sink waits), so a pipelined MAIL/RCPT/DATA group is answered with one write,
//! as a production server does.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use smtp_proto::request::receiver::{DataReceiver, RequestReceiver};
use smtp_proto::{
    EhloResponse, Request, EXT_8BIT_MIME, EXT_ENHANCED_STATUS_CODES, EXT_PIPELINING, EXT_SIZE,
    EXT_SMTP_UTF8, EXT_START_TLS,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::scenario::{Envelope, ReplySpec, Stage};
use super::{ReceivedMessage, Shared};

/// How long the sink waits for the client's next bytes (RFC 5321 §4.5.3.2.7 suggests 5 min).
const CLIENT_IDLE: Duration = Duration::from_secs(300);
/// How long a reply write or a TLS handshake may take.
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// How a pass over one stream ended.
enum End {
    Closed,
    StartTls,
}

/// What the session does after a command.
enum Flow {
    Continue,
    Data,
    Close,
    StartTls,
}

struct Transaction {
    mail_from: String,
    rcpt_to: Vec<String>,
}

struct Session {
    id: u64,
    peer: SocketAddr,
    shared: Arc<Shared>,
    tls: bool,
    helo: Option<String>,
    txn: Option<Transaction>,
    /// MAIL commands on this connection so far (for the per-connection limit).
    mails: u32,
    delivered: u64,
    /// Replies not yet written.
    out: Vec<u8>,
}

pub(crate) async fn serve(mut tcp: TcpStream, peer: SocketAddr, id: u64, shared: Arc<Shared>) -> io::Result<()> {
    let _ = tcp.set_nodelay(true);
    let mut s = Session { id, peer, shared, tls: false, helo: None, txn: None, mails: 0, delivered: 0, out: Vec::new() };
    // Held until the connection ends: it counts toward the IP's open connections.
    let _slot = match s.shared.limiter.admit_connection(peer.ip()) {
        Ok(slot) => slot,
        Err(refusal) => {
            let refusal = refusal.clone();
            s.refuse(Stage::Connect, &refusal);
            flush(&mut tcp, &mut s.out).await?;
            return Ok(());
        }
    };
    let banner = ReplySpec::new(220, format!("{} ESMTP sluice-load sink", s.shared.config.hostname));
    let sent = respond(&s.shared, &mut s.out, &mut tcp, Stage::Connect, &Envelope::default(), banner).await?;
    flush(&mut tcp, &mut s.out).await?;
    match sent {
        Some(r) if r.is_positive() => {}
        _ => return Ok(()),
    }
    if let End::StartTls = s.run(&mut tcp).await? {
        let acceptor = s.shared.tls.clone().expect("STARTTLS is only accepted when configured");
        let mut tls = tokio::time::timeout(IO_TIMEOUT, acceptor.accept(tcp))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        s.tls = true;
        s.helo = None;
        s.txn = None;
        s.shared.count(|st| st.tls_connections += 1);
        s.run(&mut tls).await?;
    }
    Ok(())
}

/// Decides the reply at `stage` from the scenario, waits the stage's latency and the rule's
/// delay, and queues the reply in `out`. Returns the reply, or `None` when the scenario
/// hangs up.
async fn respond<S: AsyncWrite + Unpin>(
    shared: &Shared,
    out: &mut Vec<u8>,
    stream: &mut S,
    stage: Stage,
    env: &Envelope<'_>,
    normal: ReplySpec,
) -> io::Result<Option<ReplySpec>> {
    let action = shared.scenario().decide(stage, env);
    let wait = match (shared.config.latency.at(stage), action.delay) {
        (Some(a), Some(b)) => Some(a + b),
        (a, b) => a.or(b),
    };
    if let Some(d) = wait {
        // What was answered before the wait reaches the client before it.
        flush(stream, out).await?;
        tokio::time::sleep(d).await;
    }
    if action.disconnect {
        // Earlier replies of the pipeline were due before this one; then hang up.
        flush(stream, out).await?;
        return Ok(None);
    }
    let reply = action.reply.unwrap_or(normal);
    queue(out, &reply);
    shared.count(|s| *s.replies.entry((stage, reply.code)).or_insert(0) += 1);
    Ok(Some(reply))
}

fn queue(out: &mut Vec<u8>, reply: &ReplySpec) {
    out.extend_from_slice(reply.to_wire().as_bytes());
}

async fn flush<S: AsyncWrite + Unpin>(stream: &mut S, out: &mut Vec<u8>) -> io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    tokio::time::timeout(IO_TIMEOUT, async {
        stream.write_all(out).await?;
        stream.flush().await
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "reply write timed out"))??;
    out.clear();
    Ok(())
}

fn reply(code: u16, text: &str) -> ReplySpec {
    ReplySpec::new(code, text)
}

/// A DataReceiver that also recognises a dot on the very first line. smtp-proto's receiver
/// starts as if in the middle of a line, so it would miss `.` (an empty message) or `..x`
/// directly after DATA; feeding it the CRLF that ended the DATA command fixes that.
fn data_receiver() -> DataReceiver {
    let mut rx = DataReceiver::new();
    let mut scratch = Vec::new();
    rx.ingest(&mut b"\r\n".iter(), &mut scratch);
    rx
}

impl Session {
    /// Serves commands on `stream` until the client quits, the connection drops, or STARTTLS
    /// was accepted (then bytes the client pipelined after STARTTLS are discarded, RFC 3207).
    async fn run<S: AsyncRead + AsyncWrite + Unpin>(&mut self, stream: &mut S) -> io::Result<End> {
        let mut receiver = RequestReceiver::default();
        let mut data: Option<(DataReceiver, Vec<u8>, bool)> = None;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // Everything the client pipelined is answered: send the replies before waiting.
            flush(stream, &mut self.out).await?;
            let n = match tokio::time::timeout(CLIENT_IDLE, stream.read(&mut buf)).await {
                Ok(r) => r?,
                Err(_) => {
                    queue(&mut self.out, &reply(421, "4.4.2 Idle timeout, closing connection"));
                    flush(stream, &mut self.out).await?;
                    return Ok(End::Closed);
                }
            };
            if n == 0 {
                return Ok(End::Closed);
            }
            let mut bytes = buf[..n].iter();
            loop {
                if let Some((rx, body, too_big)) = &mut data {
                    let done = rx.ingest(&mut bytes, body);
                    if body.len() > self.shared.config.max_message_bytes {
                        *too_big = true;
                        body.clear();
                    }
                    if !done {
                        break;
                    }
                    let (_, body, too_big) = data.take().expect("in data mode");
                    if let Flow::Close = self.end_of_data(stream, body, too_big).await? {
                        flush(stream, &mut self.out).await?;
                        return Ok(End::Closed);
                    }
                    continue;
                }
                let request = match receiver.ingest(&mut bytes) {
                    Ok(r) => r.into_owned(),
                    Err(smtp_proto::Error::NeedsMoreData { .. }) => break,
                    Err(e) => {
                        queue(&mut self.out, &reply(500, &format!("5.5.2 Syntax error: {e:?}")));
                        continue;
                    }
                };
                match self.command(stream, request).await? {
                    Flow::Continue => {}
                    Flow::Data => data = Some((data_receiver(), Vec::new(), false)),
                    Flow::Close => {
                        flush(stream, &mut self.out).await?;
                        return Ok(End::Closed);
                    }
                    Flow::StartTls => {
                        flush(stream, &mut self.out).await?;
                        return Ok(End::StartTls);
                    }
                }
            }
        }
    }

    fn ehlo_reply(&self) -> ReplySpec {
        let config = &self.shared.config;
        let mut ehlo = EhloResponse::new(config.hostname.as_str());
        ehlo.capabilities = EXT_8BIT_MIME | EXT_ENHANCED_STATUS_CODES | EXT_SMTP_UTF8 | EXT_SIZE;
        ehlo.size = config.max_message_bytes;
        if config.pipelining {
            ehlo.capabilities |= EXT_PIPELINING;
        }
        if self.shared.tls.is_some() && !self.tls {
            ehlo.capabilities |= EXT_START_TLS;
        }
        let mut out = Vec::new();
        ehlo.write(&mut out).expect("writing to a Vec cannot fail");
        String::from_utf8_lossy(&out).parse().expect("smtp-proto writes well-formed EHLO replies")
    }

    fn count_command(&self, stage: Stage) {
        self.shared.count(|s| *s.commands.entry(stage).or_insert(0) += 1);
    }

    /// Queues a refusal by the limits and counts it.
    fn refuse(&mut self, stage: Stage, refusal: &ReplySpec) {
        queue(&mut self.out, refusal);
        self.shared.count(|s| {
            s.limited += 1;
            *s.replies.entry((stage, refusal.code)).or_insert(0) += 1;
        });
    }

    async fn command<S: AsyncWrite + Unpin>(&mut self, stream: &mut S, request: Request<String>) -> io::Result<Flow> {
        let shared = self.shared.clone();
        let max_bytes = shared.config.max_message_bytes;
        match request {
            Request::Ehlo { host } | Request::Lhlo { host } => {
                let normal = self.ehlo_reply();
                self.greet(stream, host, normal).await
            }
            Request::Helo { host } => {
                let normal = reply(250, &shared.config.hostname);
                self.greet(stream, host, normal).await
            }
            Request::StartTls => {
                self.count_command(Stage::StartTls);
                if self.tls || shared.tls.is_none() {
                    queue(&mut self.out, &reply(502, "5.5.1 STARTTLS not available"));
                    return Ok(Flow::Continue);
                }
                let normal = reply(220, "2.0.0 Ready to start TLS");
                let sent = respond(&shared, &mut self.out, stream, Stage::StartTls, &Envelope::default(), normal).await?;
                Ok(match sent {
                    None => Flow::Close,
                    Some(r) if r.is_positive() => Flow::StartTls,
                    Some(r) => closes(&r),
                })
            }
            Request::Mail { from } => {
                self.count_command(Stage::Mail);
                if self.helo.is_none() {
                    queue(&mut self.out, &reply(503, "5.5.1 Send EHLO first"));
                    return Ok(Flow::Continue);
                }
                if self.txn.is_some() {
                    queue(&mut self.out, &reply(503, "5.5.1 Nested MAIL command"));
                    return Ok(Flow::Continue);
                }
                if from.size > max_bytes {
                    queue(&mut self.out, &reply(552, "5.3.4 Message size exceeds fixed maximum message size"));
                    return Ok(Flow::Continue);
                }
                self.mails += 1;
                if let Err(refusal) = shared.limiter.admit_message(self.peer.ip(), self.mails) {
                    let refusal = refusal.clone();
                    self.refuse(Stage::Mail, &refusal);
                    return Ok(closes(&refusal));
                }
                let env = Envelope { sender: Some(&from.address), recipients: &[] };
                let sent = respond(&shared, &mut self.out, stream, Stage::Mail, &env, reply(250, "2.1.0 Ok")).await?;
                Ok(match sent {
                    None => Flow::Close,
                    Some(r) if r.is_positive() => {
                        self.txn = Some(Transaction { mail_from: from.address, rcpt_to: Vec::new() });
                        Flow::Continue
                    }
                    Some(r) => closes(&r),
                })
            }
            Request::Rcpt { to } => {
                self.count_command(Stage::Rcpt);
                let Some(txn) = &mut self.txn else {
                    queue(&mut self.out, &reply(503, "5.5.1 Need MAIL before RCPT"));
                    return Ok(Flow::Continue);
                };
                let rcpt = [to.address];
                let env = Envelope { sender: Some(&txn.mail_from), recipients: &rcpt };
                let sent = respond(&shared, &mut self.out, stream, Stage::Rcpt, &env, reply(250, "2.1.5 Ok")).await?;
                let [address] = rcpt;
                Ok(match sent {
                    None => Flow::Close,
                    Some(r) if r.is_positive() => {
                        txn.rcpt_to.push(address);
                        Flow::Continue
                    }
                    Some(r) => closes(&r),
                })
            }
            Request::Data => {
                self.count_command(Stage::Data);
                let Some(txn) = &self.txn else {
                    queue(&mut self.out, &reply(503, "5.5.1 Need MAIL before DATA"));
                    return Ok(Flow::Continue);
                };
                if txn.rcpt_to.is_empty() {
                    // RFC 2920: with pipelining, DATA after only failed RCPTs must be refused.
                    queue(&mut self.out, &reply(554, "5.5.1 No valid recipients"));
                    return Ok(Flow::Continue);
                }
                let env = Envelope { sender: Some(&txn.mail_from), recipients: &txn.rcpt_to };
                let normal = reply(354, "End data with <CR><LF>.<CR><LF>");
                let sent = respond(&shared, &mut self.out, stream, Stage::Data, &env, normal).await?;
                Ok(match sent {
                    None => Flow::Close,
                    Some(r) if r.code == 354 => Flow::Data,
                    Some(r) => {
                        self.txn = None;
                        closes(&r)
                    }
                })
            }
            Request::Rset => {
                self.txn = None;
                shared.count(|s| s.rsets += 1);
                queue(&mut self.out, &reply(250, "2.0.0 Ok"));
                Ok(Flow::Continue)
            }
            Request::Noop { .. } => {
                queue(&mut self.out, &reply(250, "2.0.0 Ok"));
                Ok(Flow::Continue)
            }
            Request::Quit => {
                queue(&mut self.out, &reply(221, "2.0.0 Bye"));
                Ok(Flow::Close)
            }
            _ => {
                queue(&mut self.out, &reply(502, "5.5.1 Command not implemented"));
                Ok(Flow::Continue)
            }
        }
    }

    /// EHLO, HELO or LHLO: a new session state (RFC 5321 §4.1.4: like RSET).
    async fn greet<S: AsyncWrite + Unpin>(&mut self, stream: &mut S, host: String, normal: ReplySpec) -> io::Result<Flow> {
        self.count_command(Stage::Ehlo);
        self.txn = None;
        let sent = respond(&self.shared, &mut self.out, stream, Stage::Ehlo, &Envelope::default(), normal).await?;
        Ok(match sent {
            None => Flow::Close,
            Some(r) if r.is_positive() => {
                self.helo = Some(host);
                Flow::Continue
            }
            Some(r) => closes(&r),
        })
    }

    async fn end_of_data<S: AsyncWrite + Unpin>(&mut self, stream: &mut S, body: Vec<u8>, too_big: bool) -> io::Result<Flow> {
        let txn = self.txn.take().expect("data mode needs a transaction");
        if too_big {
            queue(&mut self.out, &reply(552, "5.3.4 Message size exceeds fixed maximum message size"));
            return Ok(Flow::Continue);
        }
        self.delivered += 1;
        let queued = reply(250, &format!("2.0.0 Ok: queued as {}.{}", self.id, self.delivered));
        let env = Envelope { sender: Some(&txn.mail_from), recipients: &txn.rcpt_to };
        let sent = respond(&self.shared, &mut self.out, stream, Stage::EndOfData, &env, queued).await?;
        Ok(match sent {
            None => Flow::Close,
            Some(r) if r.is_positive() => {
                self.shared.record(ReceivedMessage {
                    connection: self.id,
                    peer: self.peer,
                    tls: self.tls,
                    helo: self.helo.clone().unwrap_or_default(),
                    mail_from: txn.mail_from,
                    rcpt_to: txn.rcpt_to,
                    data: Bytes::from(body),
                    at: std::time::Instant::now(),
                });
                Flow::Continue
            }
            Some(r) => closes(&r),
        })
    }
}

/// A 421 reply means the server closes the connection (RFC 5321 §3.8).
fn closes(reply: &ReplySpec) -> Flow {
    if reply.code == 421 {
        Flow::Close
    } else {
        Flow::Continue
    }
}
