//! One SMTP session: reads commands with smtp-proto, answers them, and hands each accepted
//! message to the ingest path.
//!
//! Input is processed as it arrives: every complete command in the read buffer is answered
//! in order and the replies are written together once the buffer is drained, which is what
//! PIPELINING (RFC 2920) asks of a server. The session state lives in [`Session`]; the
//! connection-level state (read buffer, partial lines) lives in [`Session::run`], so that
//! STARTTLS drops everything read in plain text before the handshake.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sluice_spool::SpoolError;
use smtp_proto::request::receiver::{
    DataReceiver, DummyDataReceiver, DummyLineReceiver, LineReceiver, RequestReceiver, MAX_LINE_LENGTH,
};
use smtp_proto::{EhloResponse, Error as ParseError, MailFrom, RcptTo, Request};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::auth::{AuthStep, Exchange, Mechanism};
use super::message::{self, ContentError, Trace};
use super::relay::{relay_decision, RelayDecision};
use super::reply::{self, Reply};
use super::Shared;
use crate::Submission;

/// How much is read from the socket at once.
const READ_BUFFER: usize = 8 * 1024;
/// Replies are written early when a client pipelines this much without reading.
const MAX_PENDING_REPLIES: usize = 64 * 1024;
/// Messages at least this large are prepared on a blocking thread, off the reactor.
const PREPARE_OFF_REACTOR: usize = 64 * 1024;

/// Serves one accepted connection until the client quits, a limit closes it, or shutdown.
pub(crate) async fn serve_connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    cancel: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let command_timeout = shared.config.command_timeout;
    let mut session = Session::new(shared.clone(), peer, cancel);
    let mut plain = stream;
    match session.run(&mut plain, true).await {
        Ok(Flow::StartTls) => match timeout(command_timeout, shared.tls.accept(plain)).await {
            Ok(Ok(mut tls)) => {
                let (_, conn) = tls.get_ref();
                let description = format!(
                    "using {:?} with cipher {:?}",
                    conn.protocol_version().unwrap_or(rustls::ProtocolVersion::Unknown(0)),
                    conn.negotiated_cipher_suite().map(|s| s.suite()).unwrap_or(rustls::CipherSuite::Unknown(0)),
                );
                metrics::counter!("sluice_smtp_starttls_total").increment(1);
                session.tls_started(description);
                if let Err(e) = session.run(&mut tls, false).await {
                    debug!(%peer, error = %e, "smtp session ended with an I/O error");
                }
                let _ = timeout(Duration::from_secs(5), tls.shutdown()).await;
            }
            Ok(Err(e)) => debug!(%peer, error = %e, "smtp STARTTLS handshake failed"),
            Err(_) => debug!(%peer, "smtp STARTTLS handshake timed out"),
        },
        Ok(_) => {
            let _ = timeout(Duration::from_secs(5), plain.shutdown()).await;
        }
        Err(e) => debug!(%peer, error = %e, "smtp session ended with an I/O error"),
    }
}

/// What the connection does after a step.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    Close,
    StartTls,
}

/// What the next bytes from the client are.
enum Mode {
    Command,
    /// The rest of a command line that was too long.
    DiscardLine(DummyLineReceiver),
    /// Message data after `354`, until the final dot.
    Data {
        receiver: DataReceiver,
        body: Vec<u8>,
        lines: LineLength,
        deadline: Instant,
    },
    /// Message data that will be refused (too big, a line too long): read to the final dot,
    /// keep nothing, then say why.
    DiscardData {
        receiver: DummyDataReceiver,
        refusal: Refusal,
        deadline: Instant,
    },
    /// The chunk of a refused `BDAT`.
    DiscardChunk(DummyDataReceiver),
    /// A line of an AUTH exchange.
    Auth {
        exchange: Exchange,
        line: LineReceiver<()>,
    },
}

/// Why the data of a message is being discarded.
#[derive(Clone, Copy)]
enum Refusal {
    TooBig,
    /// The number of the first line (1-based) longer than `max_line_length`.
    LongLine(usize),
}

/// Follows the length of the current line of message data across reads. A lone CR or LF
/// ends a line too: they become CRLF when the message is stored.
struct LineLength {
    max: usize,
    current: usize,
    /// Lines ended so far.
    ended: usize,
    after_cr: bool,
}

impl LineLength {
    fn new(max: usize) -> Self {
        LineLength { max, current: 0, ended: 0, after_cr: false }
    }

    /// Takes the next bytes of (dot-unstuffed) data; returns the number of the first line
    /// found longer than `max`.
    fn feed(&mut self, bytes: &[u8]) -> Option<usize> {
        for &b in bytes {
            match b {
                b'\r' => {
                    self.ended += 1;
                    self.current = 0;
                    self.after_cr = true;
                }
                b'\n' => {
                    if !self.after_cr {
                        self.ended += 1;
                    }
                    self.current = 0;
                    self.after_cr = false;
                }
                _ => {
                    self.after_cr = false;
                    self.current += 1;
                    if self.current > self.max {
                        return Some(self.ended + 1);
                    }
                }
            }
        }
        None
    }
}

struct Helo {
    name: String,
    extended: bool,
}

/// A mail transaction: from MAIL to the end of DATA (or RSET).
struct Transaction {
    mail_from: String,
    recipients: Vec<String>,
    smtputf8: bool,
}

struct Session {
    shared: Arc<Shared>,
    peer: SocketAddr,
    cancel: CancellationToken,
    /// Protocol and cipher once STARTTLS completed.
    tls: Option<String>,
    helo: Option<Helo>,
    /// The tenant of a successful AUTH.
    authenticated: Option<String>,
    transaction: Option<Transaction>,
    /// Error replies sent so far (see `max_errors`).
    errors: u32,
}

impl Session {
    fn new(shared: Arc<Shared>, peer: SocketAddr, cancel: CancellationToken) -> Self {
        Session { shared, peer, cancel, tls: None, helo: None, authenticated: None, transaction: None, errors: 0 }
    }

    /// RFC 3207: after the handshake the client starts over with EHLO, and nothing learned
    /// in plain text (including any authentication) carries over.
    fn tls_started(&mut self, description: String) {
        self.tls = Some(description);
        self.helo = None;
        self.authenticated = None;
        self.transaction = None;
    }

    fn hostname(&self) -> &str {
        &self.shared.config.hostname
    }

    /// Runs the protocol on `io` until the session ends or STARTTLS was accepted.
    async fn run<S: AsyncRead + AsyncWrite + Unpin>(&mut self, io: &mut S, greet: bool) -> std::io::Result<Flow> {
        let mut out = Vec::with_capacity(1024);
        if greet {
            out.extend_from_slice(format!("220 {} ESMTP sluice\r\n", self.hostname()).as_bytes());
        }
        let mut requests = RequestReceiver::default();
        let mut mode = Mode::Command;
        let mut input = vec![0u8; READ_BUFFER];
        loop {
            // Everything read so far is answered: send the replies.
            self.write(io, &mut out).await?;

            let idle = self.transaction.is_none() && !matches!(mode, Mode::Data { .. } | Mode::DiscardData { .. });
            if idle && self.cancel.is_cancelled() {
                reply::closing(self.hostname(), [4, 3, 2], "Service shutting down, try again later").write(&mut out);
                self.write(io, &mut out).await?;
                return Ok(Flow::Close);
            }

            let (wait, timeout_text) = match &mode {
                Mode::Data { deadline, .. } | Mode::DiscardData { deadline, .. } => (
                    deadline.saturating_duration_since(Instant::now()).min(self.shared.config.command_timeout),
                    "Timeout exceeded while receiving message data",
                ),
                _ => (self.shared.config.command_timeout, "Timeout exceeded waiting for a command"),
            };
            let read = timeout(wait, io.read(&mut input));
            let result = if self.cancel.is_cancelled() {
                read.await
            } else {
                tokio::select! {
                    result = read => result,
                    // Re-check at the top whether the session is between transactions.
                    _ = self.cancel.cancelled() => continue,
                }
            };
            let n = match result {
                Err(_elapsed) => {
                    metrics::counter!("sluice_smtp_timeouts_total").increment(1);
                    reply::closing(self.hostname(), [4, 4, 2], timeout_text).write(&mut out);
                    let _ = self.write(io, &mut out).await;
                    return Ok(Flow::Close);
                }
                Ok(Err(e)) => return Err(e),
                Ok(Ok(0)) => return Ok(Flow::Close),
                Ok(Ok(n)) => n,
            };

            let mut bytes = input[..n].iter();
            while bytes.len() > 0 {
                match self.step(&mut mode, &mut requests, &mut bytes, &mut out).await {
                    Flow::Continue => {}
                    // STARTTLS: whatever else was read in plain text is dropped with `input`
                    // (CVE-2011-0411: commands injected before the handshake).
                    flow => {
                        if flow == Flow::StartTls && bytes.len() > 0 {
                            metrics::counter!("sluice_smtp_starttls_injection_discarded_total").increment(1);
                            warn!(peer = %self.peer, bytes = bytes.len(), "discarded plain text sent after STARTTLS");
                        }
                        self.write(io, &mut out).await?;
                        return Ok(flow);
                    }
                }
                if out.len() >= MAX_PENDING_REPLIES {
                    self.write(io, &mut out).await?;
                }
            }
        }
    }

    async fn write<S: AsyncWrite + Unpin>(&self, io: &mut S, out: &mut Vec<u8>) -> std::io::Result<()> {
        if out.is_empty() {
            return Ok(());
        }
        let written = timeout(self.shared.config.command_timeout, async {
            io.write_all(out).await?;
            io.flush().await
        })
        .await;
        out.clear();
        match written {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the client stopped reading replies")),
        }
    }

    /// Consumes the next piece of input in `mode`.
    async fn step(
        &mut self,
        mode: &mut Mode,
        requests: &mut RequestReceiver,
        bytes: &mut std::slice::Iter<'_, u8>,
        out: &mut Vec<u8>,
    ) -> Flow {
        match mode {
            Mode::Command => match requests.ingest(bytes) {
                Ok(request) => {
                    let request = request.into_owned();
                    self.command(request, mode, out).await
                }
                Err(ParseError::NeedsMoreData { .. }) => Flow::Continue,
                Err(ParseError::ResponseTooLong) => {
                    *mode = Mode::DiscardLine(DummyLineReceiver::default());
                    self.reply(out, reply::LINE_TOO_LONG)
                }
                Err(e) => self.reply(out, parse_error(e)),
            },
            Mode::DiscardLine(receiver) => {
                if receiver.ingest(bytes) {
                    *mode = Mode::Command;
                }
                Flow::Continue
            }
            Mode::Data { receiver, body, lines, deadline } => {
                let start = body.len();
                let complete = receiver.ingest(bytes, body);
                let refusal = if body.len() > self.shared.config.max_message_bytes {
                    Some(Refusal::TooBig)
                } else {
                    lines.feed(&body[start..]).map(Refusal::LongLine)
                };
                if let Some(refusal) = refusal {
                    // The final dot may already have been consumed.
                    if complete {
                        *mode = Mode::Command;
                        return self.refuse_data(refusal, out);
                    }
                    let receiver = DummyDataReceiver::new_data(receiver);
                    *mode = Mode::DiscardData { receiver, refusal, deadline: *deadline };
                    return Flow::Continue;
                }
                if !complete {
                    return Flow::Continue;
                }
                let body = std::mem::take(body);
                *mode = Mode::Command;
                self.end_of_data(body, out).await
            }
            Mode::DiscardData { receiver, refusal, .. } => {
                if !receiver.ingest(bytes) {
                    return Flow::Continue;
                }
                let refusal = *refusal;
                *mode = Mode::Command;
                self.refuse_data(refusal, out)
            }
            Mode::DiscardChunk(receiver) => {
                if receiver.ingest(bytes) {
                    *mode = Mode::Command;
                }
                Flow::Continue
            }
            Mode::Auth { exchange, line } => {
                if !line.ingest(bytes) {
                    return Flow::Continue;
                }
                let exchange = exchange.clone();
                let text = std::mem::take(&mut line.buf);
                *mode = Mode::Command;
                if text.len() >= MAX_LINE_LENGTH {
                    return self.reply(out, reply::AUTH_LINE_TOO_LONG);
                }
                if text == b"*" {
                    return self.reply(out, reply::AUTH_CANCELLED);
                }
                let step = exchange.respond(&String::from_utf8_lossy(&text));
                self.auth_step(step, mode, out)
            }
        }
    }

    /// Writes a reply and counts errors: after `max_errors` the session is closed.
    fn reply(&mut self, out: &mut Vec<u8>, reply: Reply) -> Flow {
        reply.write(out);
        if reply.is_error() {
            self.errors += 1;
            if self.errors >= self.shared.config.max_errors {
                metrics::counter!("sluice_smtp_sessions_closed_for_errors_total").increment(1);
                reply::closing(self.hostname(), [4, 7, 0], "Too many errors").write(out);
                return Flow::Close;
            }
        }
        Flow::Continue
    }

    async fn command(&mut self, request: Request<String>, mode: &mut Mode, out: &mut Vec<u8>) -> Flow {
        match request {
            Request::Ehlo { host } => self.helo(host, true, out),
            Request::Helo { host } => self.helo(host, false, out),
            Request::Mail { from } => self.mail(from, out),
            Request::Rcpt { to } => self.rcpt(to, out),
            Request::Data => self.data(mode, out),
            Request::Auth { mechanism, initial_response } => self.auth(mechanism, &initial_response, mode, out),
            Request::StartTls => self.starttls(out),
            Request::Rset => {
                self.transaction = None;
                self.reply(out, reply::OK)
            }
            Request::Noop { .. } => self.reply(out, reply::OK),
            Request::Quit => {
                reply::BYE.write(out);
                Flow::Close
            }
            Request::Vrfy { .. } => self.reply(out, reply::CANNOT_VRFY),
            Request::Expn { .. } => self.reply(out, reply::EXPN_NOT_IMPLEMENTED),
            Request::Help { .. } => self.reply(out, reply::HELP),
            Request::Bdat { chunk_size, .. } => {
                // Skip the chunk so that its bytes are not read as commands.
                *mode = Mode::DiscardChunk(DummyDataReceiver::new_bdat(chunk_size));
                self.reply(out, reply::BDAT_NOT_IMPLEMENTED)
            }
            Request::Lhlo { .. } => self.reply(out, reply::UNRECOGNIZED),
            Request::Etrn { .. } | Request::Atrn { .. } | Request::Burl { .. } => {
                self.reply(out, reply::NOT_IMPLEMENTED)
            }
        }
    }

    fn helo(&mut self, name: String, extended: bool, out: &mut Vec<u8>) -> Flow {
        self.transaction = None;
        self.helo = Some(Helo { name, extended });
        if !extended {
            return self.reply(out, Reply::with_text(250, [2, 0, 0], self.hostname().to_string()));
        }
        let mut ehlo = EhloResponse::new(self.hostname());
        ehlo.capabilities = smtp_proto::EXT_PIPELINING
            | smtp_proto::EXT_SIZE
            | smtp_proto::EXT_8BIT_MIME
            | smtp_proto::EXT_SMTP_UTF8
            | smtp_proto::EXT_ENHANCED_STATUS_CODES;
        ehlo.size = self.shared.config.max_message_bytes;
        if self.tls.is_none() {
            ehlo.capabilities |= smtp_proto::EXT_START_TLS;
        }
        if self.auth_offered() {
            ehlo.capabilities |= smtp_proto::EXT_AUTH;
            ehlo.auth_mechanisms = smtp_proto::AUTH_PLAIN | smtp_proto::AUTH_LOGIN;
        }
        let mut reply = Vec::with_capacity(256);
        ehlo.write(&mut reply).expect("writing to a Vec cannot fail");
        // smtp-proto's first line carries a fixed text; greet the client by name instead.
        let first_line_end = reply.windows(2).position(|w| w == b"\r\n").map_or(0, |p| p + 2);
        let client = self.helo.as_ref().map_or("", |h| h.name.as_str());
        out.extend_from_slice(
            format!("250-{} Hello {client} [{}]\r\n", self.hostname(), self.peer.ip().to_canonical()).as_bytes(),
        );
        out.extend_from_slice(&reply[first_line_end..]);
        Flow::Continue
    }

    fn auth_offered(&self) -> bool {
        self.tls.is_some() || !self.shared.config.auth_requires_tls
    }

    fn relay(&self) -> RelayDecision {
        relay_decision(self.authenticated.as_deref(), self.peer.ip(), &self.shared.config.relay_networks)
    }

    fn mail(&mut self, from: MailFrom<String>, out: &mut Vec<u8>) -> Flow {
        if self.helo.is_none() {
            return self.reply(out, reply::NEED_HELO);
        }
        if self.transaction.is_some() {
            return self.reply(out, reply::NESTED_MAIL);
        }
        if let Some(param) = unsupported_mail_parameter(&from) {
            return self
                .reply(out, Reply::with_text(555, [5, 5, 4], format!("MAIL parameter {param} is not supported")));
        }
        let max = self.shared.config.max_message_bytes;
        if from.size > max {
            return self.reply(
                out,
                Reply::with_text(
                    552,
                    [5, 3, 4],
                    format!("Message size exceeds fixed maximum message size ({max} bytes)"),
                ),
            );
        }
        let smtputf8 = from.flags & smtp_proto::MAIL_SMTPUTF8 != 0;
        if !from.address.is_empty() {
            if !from.address.is_ascii() && !smtputf8 {
                return self.reply(out, reply::NEEDS_SMTPUTF8);
            }
            if !is_valid_mailbox(&from.address) {
                return self.reply(out, reply::BAD_SENDER_SYNTAX);
            }
        }
        self.transaction = Some(Transaction { mail_from: from.address, recipients: Vec::new(), smtputf8 });
        self.reply(out, reply::SENDER_OK)
    }

    fn rcpt(&mut self, to: RcptTo<String>, out: &mut Vec<u8>) -> Flow {
        let Some(transaction) = &self.transaction else {
            return self.reply(out, reply::NEED_MAIL);
        };
        // The relay policy is applied here, per recipient, rather than at MAIL: like Postfix
        // (smtpd_delay_reject = yes), because some clients handle a refused MAIL badly and
        // because the refusal is then logged with the recipient it was for. The code is RFC
        // 4954's 530 5.7.0 rather than Postfix's "554 5.7.1 Relay access denied": the
        // client can fix it by authenticating, and the reply says so. Each refusal counts
        // towards `max_errors`, so a client probing for an open relay is cut off.
        if self.relay() == RelayDecision::AuthenticationRequired {
            metrics::counter!("sluice_smtp_relay_denied_total").increment(1);
            info!(peer = %self.peer, rcpt = %to.address, "smtp relay refused: not authenticated and not from a relay network");
            return self.reply(out, reply::AUTH_REQUIRED);
        }
        if !to.address.is_ascii() && !transaction.smtputf8 {
            return self.reply(out, reply::NEEDS_SMTPUTF8);
        }
        if !is_valid_mailbox(&to.address) {
            return self.reply(out, reply::BAD_RECIPIENT_SYNTAX);
        }
        let max = self.shared.config.max_recipients;
        let transaction = self.transaction.as_mut().expect("checked above");
        if !transaction.recipients.contains(&to.address) {
            if transaction.recipients.len() >= max {
                return self.reply(out, reply::TOO_MANY_RECIPIENTS);
            }
            transaction.recipients.push(to.address);
        }
        self.reply(out, reply::RECIPIENT_OK)
    }

    fn data(&mut self, mode: &mut Mode, out: &mut Vec<u8>) -> Flow {
        match &self.transaction {
            None => return self.reply(out, reply::NEED_MAIL),
            Some(t) if t.recipients.is_empty() => return self.reply(out, reply::NEED_RCPT),
            Some(_) => {}
        }
        let mut receiver = DataReceiver::new();
        // The receiver recognises the terminating dot only after a CRLF it has seen itself,
        // but the data starts right after the DATA line's CRLF: feed it one so that an
        // empty message (".") ends at once and a leading ".." is unstuffed.
        let mut primed = Vec::new();
        receiver.ingest(&mut b"\r\n".iter(), &mut primed);
        *mode = Mode::Data {
            receiver,
            body: Vec::with_capacity(16 * 1024),
            lines: LineLength::new(self.shared.config.max_line_length),
            deadline: Instant::now() + self.shared.config.data_timeout,
        };
        out.extend_from_slice(b"354 End data with <CR><LF>.<CR><LF>\r\n");
        Flow::Continue
    }

    /// The final dot of a message whose data was discarded: nothing is queued.
    fn refuse_data(&mut self, refusal: Refusal, out: &mut Vec<u8>) -> Flow {
        self.transaction = None;
        let (reason, reply) = match refusal {
            Refusal::TooBig => {
                let max = self.shared.config.max_message_bytes;
                let text = format!("Message too big for system (the limit is {max} bytes)");
                ("too_big", Reply::with_text(552, [5, 3, 4], text))
            }
            Refusal::LongLine(line) => {
                let max = self.shared.config.max_line_length;
                let text = format!(
                    "Line {line} of the message is longer than {max} bytes (RFC 5321 allows 998); \
                     encode long lines as quoted-printable or base64. The message was not queued"
                );
                ("line_too_long", Reply::with_text(550, [5, 6, 0], text))
            }
        };
        metrics::counter!("sluice_smtp_messages_rejected_total", "reason" => reason).increment(1);
        info!(peer = %self.peer, reason = %reply.text, "smtp message refused");
        self.reply(out, reply)
    }

    /// The final dot arrived: prepare the message, make it durable, and only then say 250.
    async fn end_of_data(&mut self, data: Vec<u8>, out: &mut Vec<u8>) -> Flow {
        let Some(transaction) = self.transaction.take() else {
            return self.reply(out, reply::NEED_MAIL);
        };
        // Every recipient passed the relay policy at RCPT, and nothing that changes it (AUTH,
        // STARTTLS) is allowed inside a transaction; decided once more so that no path
        // through the session can skip it.
        let tenant = match self.relay() {
            RelayDecision::Allowed { tenant } => tenant,
            RelayDecision::AuthenticationRequired => return self.reply(out, reply::AUTH_REQUIRED),
        };
        let queue_id = ulid::Ulid::new().to_string();
        let trace = Trace {
            helo: self.helo.as_ref().map(|h| h.name.clone()).unwrap_or_default(),
            extended: self.helo.as_ref().is_some_and(|h| h.extended),
            client_ip: self.peer.ip(),
            hostname: self.shared.config.hostname.clone(),
            tls: self.tls.clone(),
            authenticated: self.authenticated.is_some(),
            recipients: transaction.recipients.clone(),
            queue_id: queue_id.clone(),
        };
        let large = data.len() >= PREPARE_OFF_REACTOR;
        let prepare = move || message::prepare(&data, &trace, time::OffsetDateTime::now_utc());
        let prepared = if large {
            match tokio::task::spawn_blocking(prepare).await {
                Ok(prepared) => prepared,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                // The runtime is shutting down.
                Err(_) => return self.reply(out, reply::LOCAL_ERROR),
            }
        } else {
            prepare()
        };
        let prepared = match prepared {
            Ok(p) => p,
            Err(e @ ContentError::SmtpApi(_)) => {
                metrics::counter!("sluice_smtp_messages_rejected_total", "reason" => "content").increment(1);
                return self.reply(out, Reply::with_text(550, [5, 6, 0], e.to_string()));
            }
        };
        let recipients = transaction.recipients.len();
        let submission = Submission {
            tenant,
            mail_from: transaction.mail_from,
            recipients: transaction.recipients,
            body: prepared.body,
            smtp_id: prepared.smtp_id,
            categories: prepared.categories,
            custom_args: prepared.custom_args,
            ip_pool: prepared.ip_pool,
            send_at: prepared.send_at,
        };
        if let Err(refusal) = self.shared.ingest.admit(&submission) {
            metrics::counter!("sluice_smtp_messages_rejected_total", "reason" => "policy").increment(1);
            info!(peer = %self.peer, tenant = %submission.tenant, reason = %refusal.message, "smtp message refused by policy");
            return self.reply(out, Reply::with_text(550, [5, 7, 1], refusal.message));
        }
        let tenant = submission.tenant.clone();
        // Bounded like every other wait; a spool that hangs gets the same answer as one that
        // fails (the client retries; at worst the message is queued twice, never lost).
        let accepted =
            timeout(self.shared.config.command_timeout, self.shared.ingest.accept(&queue_id, vec![submission]))
                .await
                .unwrap_or_else(|_| {
                    Err(SpoolError::Unavailable("no answer from the spool within command_timeout".into()))
                });
        match accepted {
            Ok(_) => {
                metrics::counter!("sluice_smtp_messages_accepted_total").increment(1);
                // Every accepted message is in the event log (`processed`); a log line per
                // message on top of it costs a formatted write on the hot path.
                debug!(peer = %self.peer, %tenant, queue_id, recipients, "smtp message queued");
                self.reply(out, Reply::with_text(250, [2, 0, 0], format!("Ok: queued as {queue_id}")))
            }
            Err(SpoolError::Unavailable(reason)) => {
                warn!(peer = %self.peer, %reason, "smtp message refused with 451: the spool is unavailable");
                metrics::counter!("sluice_smtp_messages_rejected_total", "reason" => "spool_unavailable").increment(1);
                self.reply(out, reply::SPOOL_UNAVAILABLE)
            }
            Err(e) => {
                warn!(peer = %self.peer, error = %e, "smtp message refused with 451: the spool failed");
                metrics::counter!("sluice_smtp_messages_rejected_total", "reason" => "spool_error").increment(1);
                self.reply(out, reply::LOCAL_ERROR)
            }
        }
    }

    fn starttls(&mut self, out: &mut Vec<u8>) -> Flow {
        if self.tls.is_some() {
            return self.reply(out, reply::ALREADY_TLS);
        }
        reply::READY_FOR_TLS.write(out);
        Flow::StartTls
    }

    fn auth(&mut self, mechanism: u64, initial_response: &str, mode: &mut Mode, out: &mut Vec<u8>) -> Flow {
        if !self.helo.as_ref().is_some_and(|h| h.extended) {
            return self.reply(out, reply::NEED_EHLO);
        }
        if self.authenticated.is_some() {
            return self.reply(out, reply::ALREADY_AUTHENTICATED);
        }
        if self.transaction.is_some() {
            return self.reply(out, reply::AUTH_IN_TRANSACTION);
        }
        if !self.auth_offered() {
            return self.reply(out, reply::AUTH_NEEDS_TLS);
        }
        let mechanism = match mechanism {
            smtp_proto::AUTH_PLAIN => Mechanism::Plain,
            smtp_proto::AUTH_LOGIN => Mechanism::Login,
            _ => return self.reply(out, reply::UNKNOWN_MECHANISM),
        };
        let step = Exchange::start(mechanism, initial_response);
        self.auth_step(step, mode, out)
    }

    fn auth_step(&mut self, step: AuthStep, mode: &mut Mode, out: &mut Vec<u8>) -> Flow {
        match step {
            AuthStep::Challenge { challenge, next } => {
                *mode = Mode::Auth { exchange: next, line: LineReceiver::new(()) };
                out.extend_from_slice(format!("334 {challenge}\r\n").as_bytes());
                Flow::Continue
            }
            AuthStep::Credentials { user, password } => match self.shared.credentials.verify(&user, &password) {
                Some(tenant) => {
                    info!(peer = %self.peer, %tenant, "smtp client authenticated");
                    self.authenticated = Some(tenant);
                    self.reply(out, reply::AUTH_OK)
                }
                None => {
                    metrics::counter!("sluice_smtp_auth_failures_total").increment(1);
                    info!(peer = %self.peer, %user, "smtp authentication failed");
                    self.reply(out, reply::BAD_CREDENTIALS)
                }
            },
            AuthStep::Malformed(why) => {
                self.reply(out, Reply::with_text(501, [5, 5, 2], format!("Invalid authentication response: {why}")))
            }
        }
    }
}

/// The reply for a command smtp-proto could not parse.
fn parse_error(error: ParseError) -> Reply {
    match error {
        ParseError::UnknownCommand => reply::UNRECOGNIZED,
        ParseError::InvalidSenderAddress => reply::BAD_SENDER_SYNTAX,
        ParseError::InvalidRecipientAddress => reply::BAD_RECIPIENT_SYNTAX,
        ParseError::SyntaxError { syntax } => {
            Reply::with_text(501, [5, 5, 2], format!("Syntax error, expected: {syntax}"))
        }
        ParseError::InvalidParameter { param } => {
            Reply::with_text(501, [5, 5, 4], format!("Invalid {param} parameter"))
        }
        ParseError::UnsupportedParameter { param } => {
            Reply::with_text(555, [5, 5, 4], format!("Parameter {param} is not supported"))
        }
        ParseError::ResponseTooLong => reply::LINE_TOO_LONG,
        ParseError::NeedsMoreData { .. } | ParseError::InvalidResponse { .. } => reply::UNRECOGNIZED,
    }
}

/// MAIL parameters smtp-proto understands but this server does not offer; accepting them
/// would promise behaviour (binary bodies, REQUIRETLS, future release, ...) it does not have.
fn unsupported_mail_parameter(from: &MailFrom<String>) -> Option<&'static str> {
    let flags = from.flags;
    if flags & smtp_proto::MAIL_BODY_BINARYMIME != 0 {
        Some("BODY=BINARYMIME")
    } else if flags & smtp_proto::MAIL_REQUIRETLS != 0 {
        Some("REQUIRETLS")
    } else if flags & smtp_proto::MAIL_CONPERM != 0 {
        Some("CONPERM")
    } else if from.hold_for != 0 || from.hold_until != 0 {
        Some("HOLDFOR/HOLDUNTIL")
    } else if from.by != 0 {
        Some("BY")
    } else if from.mtrk.is_some() {
        Some("MTRK")
    } else {
        None
    }
}

/// `local@domain` where the domain is a host name (address literals are not relayed).
fn is_valid_mailbox(address: &str) -> bool {
    let Some((local, domain)) = address.rsplit_once('@') else { return false };
    !local.is_empty()
        && !domain.is_empty()
        && domain.len() <= 255
        && domain.trim_end_matches('.').split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_alphanumeric() || c == '-' || c == '_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_length_is_followed_across_reads_and_line_endings() {
        let mut lines = LineLength::new(4);
        assert_eq!(lines.feed(b"abcd\r\nab"), None);
        // The line started in the previous read goes on: "ab" + "cd" is 4, then "e" is 5.
        assert_eq!(lines.feed(b"cd"), None);
        assert_eq!(lines.feed(b"e"), Some(2));
        // A lone LF or CR ends a line too (they are stored as CRLF).
        let mut lines = LineLength::new(4);
        assert_eq!(lines.feed(b"1234\n1234\r1234\r\n\r\n1234"), None);
        assert_eq!(lines.feed(b"5"), Some(5));
        let mut lines = LineLength::new(998);
        assert_eq!(lines.feed(&[b'x'; 998]), None);
        assert_eq!(lines.feed(b"\r\n"), None);
        assert_eq!(lines.feed(&[b'y'; 999]), Some(2));
    }

    #[test]
    fn mailboxes_need_a_host_name() {
        assert!(is_valid_mailbox("a@example.com"));
        assert!(is_valid_mailbox("\"a b\"@example.com"));
        assert!(is_valid_mailbox("δοκιμή@παράδειγμα.δοκιμή"));
        assert!(!is_valid_mailbox("a@"));
        assert!(!is_valid_mailbox("a"));
        assert!(!is_valid_mailbox("a@[192.0.2.1]"));
        assert!(!is_valid_mailbox("a@exa mple.com"));
        assert!(!is_valid_mailbox("a@-x.com"));
        assert!(!is_valid_mailbox("a@x..com"));
    }
}
