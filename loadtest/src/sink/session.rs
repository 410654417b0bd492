//! One SMTP connection to the sink: the server side of RFC 5321 with PIPELINING (RFC 2920)
//! and STARTTLS (RFC 3207), commands parsed by smtp-proto.

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
    delivered: u64,
}

pub(crate) async fn serve(mut tcp: TcpStream, peer: SocketAddr, id: u64, shared: Arc<Shared>) -> io::Result<()> {
    let mut s = Session { id, peer, shared, tls: false, helo: None, txn: None, delivered: 0 };
    let banner = ReplySpec::new(220, format!("{} ESMTP sluice-load sink", s.shared.config.hostname));
    match respond(&s.shared, &mut tcp, Stage::Connect, &Envelope::default(), banner).await? {
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

/// Decides the reply at `stage` from the scenario, waits its delay and sends it. Returns
/// the reply sent, or `None` when the scenario hangs up.
async fn respond<S: AsyncWrite + Unpin>(
    shared: &Shared,
    stream: &mut S,
    stage: Stage,
    env: &Envelope<'_>,
    normal: ReplySpec,
) -> io::Result<Option<ReplySpec>> {
    let action = shared.scenario().decide(stage, env);
    if let Some(d) = action.delay {
        tokio::time::sleep(d).await;
    }
    if action.disconnect {
        return Ok(None);
    }
    let reply = action.reply.unwrap_or(normal);
    write_reply(stream, &reply).await?;
    shared.count(|s| *s.replies.entry((stage, reply.code)).or_insert(0) += 1);
    Ok(Some(reply))
}

async fn write_reply<S: AsyncWrite + Unpin>(stream: &mut S, reply: &ReplySpec) -> io::Result<()> {
    let wire = reply.to_wire();
    tokio::time::timeout(IO_TIMEOUT, async {
        stream.write_all(wire.as_bytes()).await?;
        stream.flush().await
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "reply write timed out"))?
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
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match tokio::time::timeout(CLIENT_IDLE, stream.read(&mut buf)).await {
                Ok(r) => r?,
                Err(_) => {
                    write_reply(stream, &reply(421, "4.4.2 Idle timeout, closing connection")).await?;
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
                        return Ok(End::Closed);
                    }
                    continue;
                }
                let request = match receiver.ingest(&mut bytes) {
                    Ok(r) => r.into_owned(),
                    Err(smtp_proto::Error::NeedsMoreData { .. }) => break,
                    Err(e) => {
                        write_reply(stream, &reply(500, &format!("5.5.2 Syntax error: {e:?}"))).await?;
                        continue;
                    }
                };
                match self.command(stream, request).await? {
                    Flow::Continue => {}
                    Flow::Data => data = Some((data_receiver(), Vec::new(), false)),
                    Flow::Close => return Ok(End::Closed),
                    Flow::StartTls => return Ok(End::StartTls),
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

    /// Sends `normal` unless the scenario says otherwise; maps the outcome to a flow.
    async fn answer<S: AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        stage: Stage,
        env: &Envelope<'_>,
        normal: ReplySpec,
    ) -> io::Result<Option<ReplySpec>> {
        respond(&self.shared, stream, stage, env, normal).await
    }

    async fn command<S: AsyncWrite + Unpin>(&mut self, stream: &mut S, request: Request<String>) -> io::Result<Flow> {
        let shared = self.shared.clone();
        let max_bytes = shared.config.max_message_bytes;
        match request {
            Request::Ehlo { host } | Request::Lhlo { host } => self.greet(stream, host, self.ehlo_reply()).await,
            Request::Helo { host } => {
                let normal = reply(250, &shared.config.hostname);
                self.greet(stream, host, normal).await
            }
            Request::StartTls => {
                self.count_command(Stage::StartTls);
                if self.tls || shared.tls.is_none() {
                    write_reply(stream, &reply(502, "5.5.1 STARTTLS not available")).await?;
                    return Ok(Flow::Continue);
                }
                let sent = self.answer(stream, Stage::StartTls, &Envelope::default(), reply(220, "2.0.0 Ready to start TLS")).await?;
                Ok(match sent {
                    None => Flow::Close,
                    Some(r) if r.is_positive() => Flow::StartTls,
                    Some(r) => closes(&r),
                })
            }
            Request::Mail { from } => {
                self.count_command(Stage::Mail);
                if self.helo.is_none() {
                    write_reply(stream, &reply(503, "5.5.1 Send EHLO first")).await?;
                    return Ok(Flow::Continue);
                }
                if self.txn.is_some() {
                    write_reply(stream, &reply(503, "5.5.1 Nested MAIL command")).await?;
                    return Ok(Flow::Continue);
                }
                if from.size > max_bytes {
                    write_reply(stream, &reply(552, "5.3.4 Message size exceeds fixed maximum message size")).await?;
                    return Ok(Flow::Continue);
                }
                let env = Envelope { sender: Some(&from.address), recipients: &[] };
                let sent = self.answer(stream, Stage::Mail, &env, reply(250, "2.1.0 Ok")).await?;
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
                let Some(txn) = &self.txn else {
                    write_reply(stream, &reply(503, "5.5.1 Need MAIL before RCPT")).await?;
                    return Ok(Flow::Continue);
                };
                let rcpt = [to.address];
                let env = Envelope { sender: Some(&txn.mail_from), recipients: &rcpt };
                let sent = self.answer(stream, Stage::Rcpt, &env, reply(250, "2.1.5 Ok")).await?;
                let [address] = rcpt;
                Ok(match sent {
                    None => Flow::Close,
                    Some(r) if r.is_positive() => {
                        self.txn.as_mut().expect("transaction checked above").rcpt_to.push(address);
                        Flow::Continue
                    }
                    Some(r) => closes(&r),
                })
            }
            Request::Data => {
                self.count_command(Stage::Data);
                let Some(txn) = &self.txn else {
                    write_reply(stream, &reply(503, "5.5.1 Need MAIL before DATA")).await?;
                    return Ok(Flow::Continue);
                };
                if txn.rcpt_to.is_empty() {
                    // RFC 2920: with pipelining, DATA after only failed RCPTs must be refused.
                    write_reply(stream, &reply(554, "5.5.1 No valid recipients")).await?;
                    return Ok(Flow::Continue);
                }
                let env = Envelope { sender: Some(&txn.mail_from), recipients: &txn.rcpt_to };
                let sent = self.answer(stream, Stage::Data, &env, reply(354, "End data with <CR><LF>.<CR><LF>")).await?;
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
                write_reply(stream, &reply(250, "2.0.0 Ok")).await?;
                Ok(Flow::Continue)
            }
            Request::Noop { .. } => {
                write_reply(stream, &reply(250, "2.0.0 Ok")).await?;
                Ok(Flow::Continue)
            }
            Request::Quit => {
                write_reply(stream, &reply(221, "2.0.0 Bye")).await?;
                Ok(Flow::Close)
            }
            _ => {
                write_reply(stream, &reply(502, "5.5.1 Command not implemented")).await?;
                Ok(Flow::Continue)
            }
        }
    }

    /// EHLO, HELO or LHLO: a new session state (RFC 5321 §4.1.4: like RSET).
    async fn greet<S: AsyncWrite + Unpin>(&mut self, stream: &mut S, host: String, normal: ReplySpec) -> io::Result<Flow> {
        self.count_command(Stage::Ehlo);
        self.txn = None;
        let sent = self.answer(stream, Stage::Ehlo, &Envelope::default(), normal).await?;
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
            write_reply(stream, &reply(552, "5.3.4 Message size exceeds fixed maximum message size")).await?;
            return Ok(Flow::Continue);
        }
        self.delivered += 1;
        let queued = reply(250, &format!("2.0.0 Ok: queued as {}.{}", self.id, self.delivered));
        let env = Envelope { sender: Some(&txn.mail_from), recipients: &txn.rcpt_to };
        let sent = self.answer(stream, Stage::EndOfData, &env, queued).await?;
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
