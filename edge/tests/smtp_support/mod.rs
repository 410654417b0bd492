//! Shared helpers for the SMTP relay tests: a server on 127.0.0.1:0 over a temporary
//! `LocalSpool`, a raw line-oriented client, and a TLS client that trusts the test certificate.
#![allow(dead_code)] // each test binary uses a different subset

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use sluice_edge::smtp::{SmtpConfig, SmtpServer, SmtpUser};
use sluice_edge::{auth::hash_key, ApiKeyConfig, ApiKeys, Ingest};
use sluice_events::EventLog;
use sluice_spool::{LeaseRequest, Leased, LocalSpool, LocalSpoolOptions, Spool};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

/// The API key accepted by test servers (tenant `apikey:acme`).
pub const API_KEY: &str = "SG.test-key-for-the-smtp-relay";
/// A configured SMTP user (tenant `smtp:billing`).
pub const USER: &str = "billing";
pub const PASSWORD: &str = "correct horse battery staple";
pub const HOSTNAME: &str = "relay.test";

/// A generous bound on every network wait in the tests, so a broken server fails the test
/// instead of hanging it. It is never used to judge speed.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// A quick-start configuration for tests.
pub fn config() -> SmtpConfig {
    SmtpConfig {
        hostname: HOSTNAME.into(),
        users: vec![SmtpUser { name: USER.into(), password_sha256: hash_key(PASSWORD) }],
        ..SmtpConfig::default()
    }
}

pub fn api_keys() -> Arc<ApiKeys> {
    Arc::new(ApiKeys::from_config(&[ApiKeyConfig { name: "acme".into(), sha256: hash_key(API_KEY) }]).unwrap())
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub spool: Arc<dyn Spool>,
    pub cancel: CancellationToken,
    pub task: JoinHandle<std::io::Result<()>>,
    /// The server's certificate when it was given one (see [`start`]).
    pub certificate: Option<CertificateDer<'static>>,
    _dir: tempfile::TempDir,
}

/// Starts a server with a certificate for `relay.test` written to PEM files (so TLS clients
/// can trust it) over a fresh local spool.
pub async fn start(config: SmtpConfig) -> TestServer {
    start_with(config, None, true).await
}

/// Starts a server that generates its own self-signed certificate.
pub async fn start_self_signed(config: SmtpConfig) -> TestServer {
    start_with(config, None, false).await
}

/// Starts a server; `spool` replaces the local spool (e.g. one that fails).
pub async fn start_with(mut config: SmtpConfig, spool: Option<Arc<dyn Spool>>, cert_files: bool) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let spool = match spool {
        Some(spool) => spool,
        None => Arc::new(LocalSpool::open(LocalSpoolOptions::new(dir.path().join("spool"))).unwrap()),
    };
    let mut certificate = None;
    if cert_files {
        let generated = rcgen::generate_simple_self_signed(vec![HOSTNAME.to_string()]).unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, generated.cert.pem()).unwrap();
        std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap();
        config.tls_cert = Some(cert);
        config.tls_key = Some(key);
        certificate = Some(generated.cert.der().clone());
    }
    let ingest = Ingest::new(spool.clone(), EventLog::disabled(), Duration::from_secs(3600));
    let server = SmtpServer::new(config, ingest, api_keys()).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cancel = CancellationToken::new();
    let task = tokio::spawn({
        let cancel = cancel.clone();
        async move { server.serve(listener, cancel).await }
    });
    TestServer { addr, spool, cancel, task, certificate, _dir: dir }
}

impl TestServer {
    /// Every message in the spool, leased (sorted by envelope sender, then first recipient).
    pub async fn messages(&self) -> Vec<Leased> {
        let mut leased = self.spool.lease(LeaseRequest::new(100_000, Duration::from_secs(600))).await.unwrap();
        leased.sort_by(|a, b| {
            (&a.meta.mail_from, &a.meta.recipients[0].address).cmp(&(&b.meta.mail_from, &b.meta.recipients[0].address))
        });
        leased
    }

    /// Connects and reads the greeting.
    pub async fn connect(&self) -> Client<TcpStream> {
        let mut client = Client::new(TcpStream::connect(self.addr).await.unwrap());
        let greeting = client.reply().await;
        assert!(greeting.starts_with("220 relay.test "), "greeting: {greeting}");
        client
    }

    /// Connects, says EHLO, and upgrades with STARTTLS, trusting only the test certificate.
    /// Returns the TLS client and the EHLO reply given before TLS.
    pub async fn connect_tls(&self) -> (Client<TlsStream<TcpStream>>, String) {
        let mut client = self.connect().await;
        let ehlo = client.cmd("EHLO client.test").await;
        assert_code(&client.cmd("STARTTLS").await, "220 2.0.0");
        (client.start_tls(self.certificate.clone().expect("server started with certificate files")).await, ehlo)
    }

    pub async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(IO_TIMEOUT, self.task).await.expect("serve returns after cancel").unwrap().unwrap();
    }
}

/// A line-oriented SMTP client over any stream.
pub struct Client<S> {
    io: BufReader<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    pub fn new(io: S) -> Self {
        Client { io: BufReader::new(io) }
    }

    /// The stream, for tests that read and write it separately (nothing may be buffered).
    pub fn into_inner(self) -> S {
        assert!(self.io.buffer().is_empty(), "unread replies in the buffer");
        self.io.into_inner()
    }

    /// Writes raw bytes (several commands at once when pipelining).
    pub async fn send(&mut self, raw: impl AsRef<[u8]>) {
        let io = self.io.get_mut();
        tokio::time::timeout(IO_TIMEOUT, async {
            io.write_all(raw.as_ref()).await?;
            io.flush().await
        })
        .await
        .expect("write timed out")
        .unwrap();
    }

    /// Reads one complete reply; the lines of a multi-line reply are joined with `\n`.
    pub async fn reply(&mut self) -> String {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let n =
                tokio::time::timeout(IO_TIMEOUT, self.io.read_line(&mut line)).await.expect("reply timed out").unwrap();
            assert!(n > 0, "connection closed while waiting for a reply (got {lines:?})");
            assert!(line.ends_with("\r\n"), "reply line without CRLF: {line:?}");
            let line = line.trim_end().to_string();
            let last = line.as_bytes().get(3) != Some(&b'-');
            lines.push(line);
            if last {
                return lines.join("\n");
            }
        }
    }

    /// Sends one command line and reads its reply.
    pub async fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n")).await;
        self.reply().await
    }

    /// Asserts that the server closed the connection (after any replies already read).
    pub async fn expect_closed(&mut self) {
        let mut rest = Vec::new();
        let read =
            tokio::time::timeout(IO_TIMEOUT, self.io.read_to_end(&mut rest)).await.expect("server did not close");
        // A reset after close is fine too; what matters is that nothing more was said.
        if read.is_ok() {
            assert!(rest.is_empty(), "unexpected data before close: {:?}", String::from_utf8_lossy(&rest));
        }
    }

    /// Sends a whole message: MAIL, RCPTs, DATA and the data (which must end with CRLF),
    /// checking each reply; returns the reply to the final dot.
    pub async fn send_message(&mut self, from: &str, to: &[&str], data: &str) -> String {
        assert_code(&self.cmd(&format!("MAIL FROM:<{from}>")).await, "250 2.1.0");
        for rcpt in to {
            assert_code(&self.cmd(&format!("RCPT TO:<{rcpt}>")).await, "250 2.1.5");
        }
        assert_code(&self.cmd("DATA").await, "354");
        self.send(format!("{data}.\r\n")).await;
        self.reply().await
    }
}

impl Client<TcpStream> {
    /// Completes a STARTTLS the server has accepted, trusting only `root`.
    pub async fn start_tls(self, root: CertificateDer<'static>) -> Client<TlsStream<TcpStream>> {
        assert!(self.io.buffer().is_empty(), "the server said more after 220 Ready to start TLS");
        let tcp = self.io.into_inner();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(root).unwrap();
        let config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        let tls = tokio::time::timeout(
            IO_TIMEOUT,
            TlsConnector::from(Arc::new(config)).connect(ServerName::try_from(HOSTNAME).unwrap(), tcp),
        )
        .await
        .expect("TLS handshake timed out")
        .expect("TLS handshake");
        Client::new(tls)
    }
}

/// Asserts that `reply` starts with `prefix` (e.g. `"250 2.1.5"`).
#[track_caller]
pub fn assert_code(reply: &str, prefix: &str) {
    assert!(reply.starts_with(prefix), "expected a reply starting with {prefix:?}, got {reply:?}");
}

/// The body of a leased message as text.
pub fn body_text(message: &Leased) -> String {
    String::from_utf8(message.body.to_vec()).expect("UTF-8 test message")
}

/// The value of the first header `name` of a stored message.
pub fn header(message: &Leased, name: &str) -> Option<String> {
    let parsed = mail_parser::MessageParser::new().parse_headers(&message.body[..])?;
    let value = parsed.headers_raw().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim().to_string());
    value
}

/// A message as a client would send it.
pub fn sample_message(subject: &str) -> String {
    format!(
        "From: App <app@example.org>\r\nTo: someone@example.net\r\nSubject: {subject}\r\n\r\nHello from the test.\r\n"
    )
}
