//! The generator's SMTP client: one connection, reused for several messages, with
//! PIPELINING (MAIL, RCPT and DATA in one write), optional STARTTLS and AUTH PLAIN.
//!
//! Written by hand rather than with mail-send because the generator must pipeline the
//! envelope, classify every reply (per recipient) for the error breakdown, and write shared
//! body buffers without copying them; that is a small state machine.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{aws_lc_rs, verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufStream};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::workload::{Draft, Factory};

/// Where and how to inject over SMTP.
#[derive(Clone, Debug)]
pub struct SmtpTarget {
    pub addr: SocketAddr,
    /// The EHLO name.
    pub helo: String,
    /// Upgrade with STARTTLS (fails when the server does not offer it).
    pub starttls: bool,
    /// The name sent in TLS SNI (certificates are not verified: test servers are self-signed).
    pub tls_name: String,
    /// AUTH PLAIN with this user and password.
    pub auth: Option<(String, String)>,
    /// Messages per connection before QUIT and a new connection.
    pub messages_per_connection: u32,
    /// Limit of every network wait.
    pub timeout: Duration,
}

/// Why a message or a connection failed, as a short class for the error breakdown
/// (`rcpt 550 5.1.1`, `connect: connection refused`, `timeout at data`).
pub type ErrorClass = String;

/// What became of one message.
#[derive(Debug, Default)]
pub struct MessageResult {
    pub acked: bool,
    /// Errors seen (a refused recipient of an accepted message is one, the failure of the
    /// message another).
    pub errors: Vec<ErrorClass>,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Io for T {}

struct Reply {
    code: u16,
    /// Every line without the code and separator.
    lines: Vec<String>,
}

impl Reply {
    fn class(&self, stage: &str) -> ErrorClass {
        let first = self.lines.first().map(String::as_str).unwrap_or("");
        let esc = first.split_whitespace().next().filter(|t| {
            let parts: Vec<&str> = t.split('.').collect();
            parts.len() == 3 && parts.iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        });
        match esc {
            Some(esc) => format!("{stage} {} {esc}", self.code),
            None => format!("{stage} {}", self.code),
        }
    }

    fn positive(&self) -> bool {
        (200..400).contains(&self.code)
    }
}

/// An open SMTP session, ready for MAIL.
struct Session {
    stream: BufStream<Box<dyn Io>>,
    pipelining: bool,
    sent: u32,
}

/// A client that opens connections as needed.
pub struct SmtpSender {
    target: Arc<SmtpTarget>,
    factory: Arc<Factory>,
    tls: TlsConnector,
    session: Option<Session>,
}

fn io_class(stage: &str, e: &io::Error) -> ErrorClass {
    if e.kind() == io::ErrorKind::TimedOut {
        format!("timeout at {stage}")
    } else {
        format!("{stage}: {}", e.kind().to_string().to_lowercase())
    }
}

async fn timed<T>(limit: Duration, f: impl std::future::Future<Output = io::Result<T>>) -> io::Result<T> {
    tokio::time::timeout(limit, f).await.map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "timed out"))?
}

impl Session {
    async fn read_reply(&mut self, limit: Duration) -> io::Result<Reply> {
        let mut lines = Vec::new();
        let mut line = String::new();
        loop {
            line.clear();
            let n = timed(limit, self.stream.read_line(&mut line)).await?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed by the server"));
            }
            let l = line.trim_end();
            let code: u16 = l
                .get(..3)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("malformed reply line {l:?}")))?;
            lines.push(l.get(4..).unwrap_or("").to_string());
            if l.as_bytes().get(3) != Some(&b'-') {
                return Ok(Reply { code, lines });
            }
        }
    }

    async fn command(&mut self, line: &str, limit: Duration) -> io::Result<Reply> {
        timed(limit, async {
            self.stream.write_all(line.as_bytes()).await?;
            self.stream.flush().await
        })
        .await?;
        self.read_reply(limit).await
    }
}

impl SmtpSender {
    pub fn new(target: Arc<SmtpTarget>, factory: Arc<Factory>) -> SmtpSender {
        SmtpSender { tls: tls_connector(), target, factory, session: None }
    }

    /// Connects, reads the banner, says EHLO, and does STARTTLS and AUTH when configured.
    async fn connect(&self) -> Result<Session, ErrorClass> {
        let t = &self.target;
        let tcp = timed(t.timeout, TcpStream::connect(t.addr)).await.map_err(|e| io_class("connect", &e))?;
        let _ = tcp.set_nodelay(true);
        let mut s = Session { stream: BufStream::new(Box::new(tcp) as Box<dyn Io>), pipelining: false, sent: 0 };
        let banner = s.read_reply(t.timeout).await.map_err(|e| io_class("banner", &e))?;
        if !banner.positive() {
            return Err(banner.class("connect"));
        }
        let mut ehlo = self.ehlo(&mut s).await?;
        if t.starttls {
            if !ehlo.lines.iter().any(|l| l.eq_ignore_ascii_case("STARTTLS")) {
                return Err("starttls: not offered".into());
            }
            let r = s.command("STARTTLS\r\n", t.timeout).await.map_err(|e| io_class("starttls", &e))?;
            if r.code != 220 {
                return Err(r.class("starttls"));
            }
            let name = ServerName::try_from(t.tls_name.clone()).map_err(|_| format!("starttls: bad TLS name {:?}", t.tls_name))?;
            let inner = s.stream.into_inner();
            let tls = timed(t.timeout, self.tls.connect(name, inner)).await.map_err(|e| io_class("tls", &e))?;
            s = Session { stream: BufStream::new(Box::new(tls) as Box<dyn Io>), pipelining: false, sent: 0 };
            ehlo = self.ehlo(&mut s).await?;
        }
        if let Some((user, pass)) = &t.auth {
            let token = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{pass}"));
            let r = s.command(&format!("AUTH PLAIN {token}\r\n"), t.timeout).await.map_err(|e| io_class("auth", &e))?;
            if r.code != 235 {
                return Err(r.class("auth"));
            }
        }
        s.pipelining = ehlo.lines.iter().any(|l| l.eq_ignore_ascii_case("PIPELINING"));
        Ok(s)
    }

    async fn ehlo(&self, s: &mut Session) -> Result<Reply, ErrorClass> {
        let r = s.command(&format!("EHLO {}\r\n", self.target.helo), self.target.timeout).await.map_err(|e| io_class("ehlo", &e))?;
        if r.code != 250 {
            return Err(r.class("ehlo"));
        }
        Ok(r)
    }

    /// Sends one message, connecting first when needed. `sent_micros` goes into X-Load-Sent.
    pub async fn send(&mut self, draft: &Draft, sent_micros: u64) -> MessageResult {
        let mut session = match self.session.take() {
            Some(s) => s,
            None => match self.connect().await {
                Ok(s) => s,
                Err(e) => return MessageResult { acked: false, errors: vec![e] },
            },
        };
        let parts = self.factory.smtp_message(draft, sent_micros);
        let (result, keep) = self.transaction(&mut session, draft, &parts).await;
        session.sent += 1;
        if keep && session.sent < self.target.messages_per_connection {
            self.session = Some(session);
        } else if keep {
            // Polite QUIT; the reply does not matter.
            let _ = session.command("QUIT\r\n", Duration::from_secs(1).min(self.target.timeout)).await;
        }
        result
    }

    /// One transaction; returns the result and whether the connection can be reused.
    async fn transaction(&self, s: &mut Session, draft: &Draft, parts: &[Bytes]) -> (MessageResult, bool) {
        let limit = self.target.timeout;
        let mut result = MessageResult::default();
        let mail = format!("MAIL FROM:<{}>\r\n", self.factory.workload().sender);
        let rcpts: Vec<String> = draft.recipients.iter().map(|r| format!("RCPT TO:<{r}>\r\n")).collect();
        let fail = |mut result: MessageResult, class: ErrorClass| {
            result.errors.push(class);
            (result, false)
        };
        // The envelope: pipelined in one write, or one command at a time.
        let (mail_reply, rcpt_replies, data_reply) = if s.pipelining {
            let mut envelope = String::with_capacity(64 * (rcpts.len() + 2));
            envelope.push_str(&mail);
            rcpts.iter().for_each(|r| envelope.push_str(r));
            envelope.push_str("DATA\r\n");
            let sent = timed(limit, async {
                s.stream.write_all(envelope.as_bytes()).await?;
                s.stream.flush().await
            })
            .await;
            if let Err(e) = sent {
                return fail(result, io_class("mail", &e));
            }
            // After a 421 the server hangs up: the remaining replies never come.
            let mail_reply = match s.read_reply(limit).await {
                Ok(r) if r.code == 421 => return fail(result, r.class("mail")),
                Ok(r) => r,
                Err(e) => return fail(result, io_class("mail", &e)),
            };
            let mut rcpt_replies = Vec::new();
            for _ in &rcpts {
                match s.read_reply(limit).await {
                    Ok(r) if r.code == 421 => return fail(result, r.class("rcpt")),
                    Ok(r) => rcpt_replies.push(r),
                    Err(e) => return fail(result, io_class("rcpt", &e)),
                }
            }
            let data_reply = match s.read_reply(limit).await {
                Ok(r) => r,
                Err(e) => return fail(result, io_class("data", &e)),
            };
            (mail_reply, rcpt_replies, Some(data_reply))
        } else {
            let mail_reply = match s.command(&mail, limit).await {
                Ok(r) => r,
                Err(e) => return fail(result, io_class("mail", &e)),
            };
            let mut rcpt_replies = Vec::new();
            if mail_reply.positive() {
                for r in &rcpts {
                    match s.command(r, limit).await {
                        Ok(reply) => rcpt_replies.push(reply),
                        Err(e) => return fail(result, io_class("rcpt", &e)),
                    }
                }
            }
            let data_reply = if rcpt_replies.iter().any(Reply::positive) {
                match s.command("DATA\r\n", limit).await {
                    Ok(r) => Some(r),
                    Err(e) => return fail(result, io_class("data", &e)),
                }
            } else {
                None
            };
            (mail_reply, rcpt_replies, data_reply)
        };
        let closing = |r: &Reply| r.code == 421;
        if !mail_reply.positive() {
            result.errors.push(mail_reply.class("mail"));
            return (result, !closing(&mail_reply) && !data_reply.as_ref().is_some_and(closing));
        }
        for r in rcpt_replies.iter().filter(|r| !r.positive()) {
            result.errors.push(r.class("rcpt"));
        }
        if rcpt_replies.iter().any(closing) {
            return (result, false);
        }
        let data_reply = match data_reply {
            Some(r) if r.code == 354 => r,
            Some(r) => {
                if rcpt_replies.iter().any(Reply::positive) {
                    result.errors.push(r.class("data"));
                }
                let keep = !closing(&r);
                // A server that refused DATA may still hold the transaction.
                let reset = keep && s.command("RSET\r\n", limit).await.is_ok();
                return (result, reset);
            }
            None => {
                let reset = s.command("RSET\r\n", limit).await.is_ok();
                return (result, reset);
            }
        };
        debug_assert_eq!(data_reply.code, 354);
        let sent = timed(limit, async {
            for p in parts {
                s.stream.write_all(p).await?;
            }
            s.stream.write_all(b".\r\n").await?;
            s.stream.flush().await
        })
        .await;
        if let Err(e) = sent {
            return fail(result, io_class("data", &e));
        }
        match s.read_reply(limit).await {
            Ok(r) if r.positive() => {
                result.acked = true;
                (result, true)
            }
            Ok(r) => {
                let keep = !closing(&r);
                result.errors.push(r.class("end_of_data"));
                (result, keep)
            }
            Err(e) => fail(result, io_class("end_of_data", &e)),
        }
    }

    /// Ends the session politely.
    pub async fn close(&mut self) {
        if let Some(mut s) = self.session.take() {
            let _ = s.command("QUIT\r\n", Duration::from_secs(1).min(self.target.timeout)).await;
        }
    }
}

/// TLS without certificate verification: the servers under test are self-signed. The
/// handshake signatures are still checked, so the session is encrypted to whoever presented
/// the certificate.
fn tls_connector() -> TlsConnector {
    let provider = Arc::new(aws_lc_rs::default_provider());
    let config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("aws-lc-rs supports the default TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
