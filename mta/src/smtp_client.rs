//! A thin SMTP client that keeps every reply exactly as the server wrote it.
//!
//! Written by hand because the rules engine needs the raw lines: smtp-proto squeezes
//! enhanced codes such as `5.7.606` into a `u8`, and mail-send's `send()` stops at the first
//! rejected recipient and drops the DATA reply. This client only moves bytes and frames
//! replies; the delivery logic decides what to send.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::BytesMut;
use rustls_pki_types::ServerName;
use sluice_rules::{Reply, ReplyError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_util::either::Either;

/// Longest reply line accepted (RFC 5321 allows 512 octets; real servers send more).
const MAX_LINE: usize = 8 * 1024;
/// Most lines in one reply (long EHLO lists stay far below).
const MAX_LINES: usize = 200;
/// Size of the blocks the message body is written in, each with its own timeout.
const WRITE_BLOCK: usize = 64 * 1024;

/// Why talking to the server failed without a reply to show for it.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("timed out after {}s", .0.as_secs_f64())]
    Timeout(Duration),
    #[error("connection closed by the server")]
    Closed,
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("malformed reply: {0}")]
    Malformed(String),
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
}

impl From<ReplyError> for ClientError {
    fn from(e: ReplyError) -> Self {
        ClientError::Malformed(e.to_string())
    }
}

/// What the server advertised in its EHLO reply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    pub pipelining: bool,
    pub starttls: bool,
    /// `SIZE n`; `Some(0)` means advertised without a limit.
    pub size: Option<u64>,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    pub enhanced_status_codes: bool,
}

impl Capabilities {
    /// Reads the keywords of an EHLO reply (every line after the first, RFC 5321 §4.1.1.1).
    pub fn from_ehlo(reply: &Reply) -> Capabilities {
        let mut caps = Capabilities::default();
        for line in reply.lines.iter().skip(1) {
            let mut words = line.get(4..).unwrap_or("").split_whitespace();
            let keyword = words.next().unwrap_or("").to_ascii_uppercase();
            match keyword.as_str() {
                "PIPELINING" => caps.pipelining = true,
                "STARTTLS" => caps.starttls = true,
                "SIZE" => caps.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                "8BITMIME" => caps.eight_bit_mime = true,
                "SMTPUTF8" => caps.smtputf8 = true,
                "ENHANCEDSTATUSCODES" => caps.enhanced_status_codes = true,
                _ => {}
            }
        }
        caps
    }
}

type Stream = Either<TcpStream, TlsStream<TcpStream>>;

/// One SMTP connection.
pub struct SmtpClient {
    stream: Stream,
    /// Bytes read but not yet framed into a reply (pipelined replies arrive together).
    rbuf: BytesMut,
    local: SocketAddr,
    peer: SocketAddr,
    caps: Capabilities,
}

async fn within<T>(timeout: Duration, f: impl std::future::Future<Output = Result<T, ClientError>>) -> Result<T, ClientError> {
    tokio::time::timeout(timeout, f).await.unwrap_or(Err(ClientError::Timeout(timeout)))
}

impl SmtpClient {
    /// Opens a TCP connection (the greeting is read separately with [`read_reply`]).
    ///
    /// [`read_reply`]: SmtpClient::read_reply
    pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<SmtpClient, ClientError> {
        Self::connect_from(addr, None, timeout).await
    }

    /// [`SmtpClient::connect`] from the local address `source` (an egress IP); `None` lets
    /// the OS choose.
    pub async fn connect_from(addr: SocketAddr, source: Option<IpAddr>, timeout: Duration) -> Result<SmtpClient, ClientError> {
        let tcp = within(timeout, async {
            Ok(match source {
                None => TcpStream::connect(addr).await?,
                Some(ip) => {
                    let sock = if ip.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
                    sock.bind(SocketAddr::new(ip, 0))?;
                    sock.connect(addr).await?
                }
            })
        })
        .await?;
        tcp.set_nodelay(true)?;
        let local = tcp.local_addr()?;
        Ok(SmtpClient { stream: Either::Left(tcp), rbuf: BytesMut::with_capacity(4096), local, peer: addr, caps: Capabilities::default() })
    }

    /// The local address of the connection (the sending IP).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    pub fn is_tls(&self) -> bool {
        matches!(self.stream, Either::Right(_))
    }

    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// Reads one complete reply (all its lines), waiting at most `timeout` for all of it.
    pub async fn read_reply(&mut self, timeout: Duration) -> Result<Reply, ClientError> {
        let deadline = Instant::now() + timeout;
        let mut lines: Vec<String> = Vec::new();
        loop {
            while let Some(pos) = self.rbuf.iter().position(|&b| b == b'\n') {
                let raw = self.rbuf.split_to(pos + 1);
                let line = String::from_utf8_lossy(&raw).trim_end_matches(['\r', '\n']).to_string();
                let last = line.len() == 3 || line.as_bytes().get(3) == Some(&b' ');
                if line.len() < 3 || !line.as_bytes()[..3].iter().all(u8::is_ascii_digit) {
                    return Err(ClientError::Malformed(format!("{line:?} does not start with a reply code")));
                }
                lines.push(line);
                if last {
                    return Ok(Reply::from_lines(lines)?);
                }
                if lines.len() >= MAX_LINES {
                    return Err(ClientError::Malformed(format!("reply longer than {MAX_LINES} lines")));
                }
            }
            if self.rbuf.len() > MAX_LINE {
                return Err(ClientError::Malformed(format!("reply line longer than {MAX_LINE} bytes")));
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            let n = match tokio::time::timeout(remaining, self.stream.read_buf(&mut self.rbuf)).await {
                Ok(r) => r?,
                Err(_) => return Err(ClientError::Timeout(timeout)),
            };
            if n == 0 {
                return Err(ClientError::Closed);
            }
        }
    }

    /// Writes `bytes` and flushes, within `timeout`.
    pub async fn send(&mut self, bytes: &[u8], timeout: Duration) -> Result<(), ClientError> {
        let stream = &mut self.stream;
        within(timeout, async {
            stream.write_all(bytes).await?;
            stream.flush().await?;
            Ok(())
        })
        .await
    }

    /// Writes a long payload in blocks, each within `timeout_per_block`.
    pub async fn send_blocks(&mut self, bytes: &[u8], timeout_per_block: Duration) -> Result<(), ClientError> {
        for block in bytes.chunks(WRITE_BLOCK) {
            let stream = &mut self.stream;
            within(timeout_per_block, async { Ok(stream.write_all(block).await?) }).await?;
        }
        let stream = &mut self.stream;
        within(timeout_per_block, async { Ok(stream.flush().await?) }).await
    }

    /// Sends one command line (CRLF added) and reads its reply.
    pub async fn command(&mut self, line: &str, timeout: Duration) -> Result<Reply, ClientError> {
        let mut cmd = Vec::with_capacity(line.len() + 2);
        cmd.extend_from_slice(line.as_bytes());
        cmd.extend_from_slice(b"\r\n");
        self.send(&cmd, timeout).await?;
        self.read_reply(timeout).await
    }

    /// EHLO; on a 2xx reply the advertised capabilities replace the old ones.
    pub async fn ehlo(&mut self, hostname: &str, timeout: Duration) -> Result<Reply, ClientError> {
        let reply = self.command(&format!("EHLO {hostname}"), timeout).await?;
        if reply.class() == 2 {
            self.caps = Capabilities::from_ehlo(&reply);
        }
        Ok(reply)
    }

    /// HELO, for servers that refuse EHLO: no extensions.
    pub async fn helo(&mut self, hostname: &str, timeout: Duration) -> Result<Reply, ClientError> {
        let reply = self.command(&format!("HELO {hostname}"), timeout).await?;
        self.caps = Capabilities::default();
        Ok(reply)
    }

    /// The TLS handshake after the server answered `220` to STARTTLS. Capabilities are
    /// forgotten: the caller must send EHLO again (RFC 3207 §4.2).
    pub async fn start_tls(self, connector: &TlsConnector, server_name: ServerName<'static>, timeout: Duration) -> Result<SmtpClient, ClientError> {
        if !self.rbuf.is_empty() {
            // Anything sent before the handshake could have been injected by a man in the middle.
            return Err(ClientError::Malformed("server sent data after its STARTTLS reply".into()));
        }
        let Either::Left(tcp) = self.stream else {
            return Err(ClientError::Malformed("STARTTLS on a connection that already uses TLS".into()));
        };
        let tls = match tokio::time::timeout(timeout, connector.connect(server_name, tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return Err(ClientError::Tls(e)),
            Err(_) => return Err(ClientError::Timeout(timeout)),
        };
        Ok(SmtpClient { stream: Either::Right(tls), rbuf: BytesMut::with_capacity(4096), local: self.local, peer: self.peer, caps: Capabilities::default() })
    }

    /// Says QUIT, waits briefly for the answer and for the server to close (RFC 5321
    /// §4.1.1.10: it closes after its reply), so the connection is gone on both sides when
    /// this returns and a server's per-IP connection count is down again. Errors do not
    /// matter any more.
    pub async fn quit(mut self, timeout: Duration) {
        if self.command("QUIT", timeout).await.is_ok() {
            let mut scratch = [0u8; 512];
            let stream = &mut self.stream;
            let _ = within(timeout, async {
                while stream.read(&mut scratch).await? > 0 {}
                Ok(())
            })
            .await;
        }
        let _ = within(timeout, async { Ok(self.stream.shutdown().await?) }).await;
    }

    /// Bytes received but not yet read as a reply.
    #[cfg(test)]
    fn buffered(&self) -> usize {
        self.rbuf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// A server that writes `script` once a client connects, then keeps the socket open.
    async fn scripted(script: &'static [u8]) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            s.write_all(script).await.unwrap();
            let mut sink = vec![0u8; 1024];
            while s.read(&mut sink).await.map(|n| n > 0).unwrap_or(false) {}
        });
        addr
    }

    const T: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn frames_pipelined_and_multi_line_replies_exactly() {
        let addr = scripted(b"220 mx ready\r\n250-mx\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 STARTTLS\r\n550-5.7.606 Access denied\r\n550 5.7.606 banned [1.2.3.4]\r\n").await;
        let mut c = SmtpClient::connect(addr, T).await.unwrap();
        assert_eq!(c.read_reply(T).await.unwrap().code, 220);
        let ehlo = c.read_reply(T).await.unwrap();
        let caps = Capabilities::from_ehlo(&ehlo);
        assert!(caps.pipelining && caps.starttls && !caps.smtputf8);
        assert_eq!(caps.size, Some(1000));
        let r = c.read_reply(T).await.unwrap();
        assert_eq!(r.lines, ["550-5.7.606 Access denied", "550 5.7.606 banned [1.2.3.4]"]);
        assert_eq!(r.enhanced.unwrap().detail, 606);
        assert_eq!(c.buffered(), 0);
    }

    #[tokio::test]
    async fn garbage_closed_and_silent_servers_are_errors() {
        let addr = scripted(b"hello there\r\n").await;
        let mut c = SmtpClient::connect(addr, T).await.unwrap();
        assert!(matches!(c.read_reply(T).await, Err(ClientError::Malformed(_))));

        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            drop(s);
        });
        let mut c = SmtpClient::connect(addr, T).await.unwrap();
        assert!(matches!(c.read_reply(T).await, Err(ClientError::Closed)));

        let addr = scripted(b"").await;
        let mut c = SmtpClient::connect(addr, T).await.unwrap();
        assert!(matches!(c.read_reply(Duration::from_millis(50)).await, Err(ClientError::Timeout(_))));
    }
}
