//! The SMTP relay for legacy applications.
//!
//! Applications that cannot call the HTTP API submit mail here, as they would to SendGrid's
//! `smtp.sendgrid.net`: EHLO, optionally STARTTLS and AUTH (user `apikey` with an API key as
//! password, or a configured user), then MAIL/RCPT/DATA. Clients from `relay_networks` may
//! relay without authenticating; everyone else must authenticate (never an open relay).
//! A message is answered `250` only once [`Ingest::accept`] made it durable.
//!
//! Commands are parsed by smtp-proto; this module holds the policy and the session logic:
//! [`config`] (the `[smtp]` section), [`relay`] (who may send), `session` (the protocol),
//! `auth` (PLAIN/LOGIN), `message` (trace headers, `X-SMTPAPI`), `tls` (the certificate).

pub mod config;
pub mod relay;

mod auth;
mod message;
mod reply;
mod session;
mod tls;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use config::{SmtpConfig, SmtpUser};
pub use relay::{relay_decision, RelayDecision};
pub use tls::CertificateSource;

use crate::{ApiKeys, Ingest};

/// Why the SMTP relay could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SmtpSetupError {
    /// A configuration key is invalid; the text starts with the key (relative to `[smtp]`).
    #[error("{0}")]
    Config(String),
    /// The TLS certificate or key could not be loaded or generated.
    #[error("{0}")]
    Tls(String),
}

/// What every session of one server shares.
pub(crate) struct Shared {
    pub config: SmtpConfig,
    pub ingest: Ingest,
    pub credentials: auth::Credentials,
    pub tls: TlsAcceptor,
}

/// The SMTP relay server.
pub struct SmtpServer {
    shared: Arc<Shared>,
    certificate: CertificateSource,
}

impl SmtpServer {
    /// Validates `config` and prepares TLS: loads `tls_cert`/`tls_key`, or generates a
    /// self-signed certificate for `hostname` when neither is set.
    pub fn new(config: SmtpConfig, ingest: Ingest, api_keys: Arc<ApiKeys>) -> Result<SmtpServer, SmtpSetupError> {
        config.validate().map_err(SmtpSetupError::Config)?;
        let (tls, certificate) = tls::acceptor(&config)?;
        if certificate == CertificateSource::SelfSigned {
            info!(
                hostname = %config.hostname,
                "smtp: generated a self-signed certificate for STARTTLS; set smtp.tls_cert and smtp.tls_key to use a trusted one"
            );
        }
        if !config.auth_requires_tls {
            warn!("smtp: auth_requires_tls = false, passwords and API keys may cross the network in clear text");
        }
        let credentials = auth::Credentials::new(&config.users, api_keys);
        Ok(SmtpServer { shared: Arc::new(Shared { config, ingest, credentials, tls }), certificate })
    }

    /// Where the STARTTLS certificate came from.
    pub fn certificate_source(&self) -> CertificateSource {
        self.certificate
    }

    pub fn config(&self) -> &SmtpConfig {
        &self.shared.config
    }

    /// Accepts connections on `listener` until `cancel` fires. Then it stops accepting,
    /// lets sessions finish the transaction in progress (each answers `421` once it is
    /// between transactions), waits at most `shutdown_timeout` for them, and returns.
    pub async fn serve(&self, listener: TcpListener, cancel: CancellationToken) -> std::io::Result<()> {
        let config = &self.shared.config;
        info!(listen = %listener.local_addr()?, hostname = %config.hostname, "smtp relay listening");
        let slots = Arc::new(Semaphore::new(config.max_connections));
        let mut sessions = JoinSet::new();
        loop {
            let accepted = tokio::select! {
                _ = cancel.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            // Reap finished sessions so the set does not grow with every connection.
            while sessions.try_join_next().is_some() {}
            let (stream, peer) = match accepted {
                Ok(connection) => connection,
                Err(e) => {
                    // E.g. out of file descriptors: pause instead of spinning, then go on.
                    warn!(error = %e, "smtp: accepting a connection failed");
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
            };
            metrics::counter!("sluice_smtp_connections_total").increment(1);
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                metrics::counter!("sluice_smtp_connections_refused_total").increment(1);
                let busy = format!("421 4.7.0 {} Too many connections, try again later\r\n", config.hostname);
                // A fresh socket's send buffer is empty, so this cannot block; if it fails the
                // client just sees the connection close.
                let _ = stream.try_write(busy.as_bytes());
                continue;
            };
            let shared = self.shared.clone();
            let cancel = cancel.clone();
            sessions.spawn(async move {
                let _slot = slot;
                let _active = ActiveSession::start();
                session::serve_connection(shared, stream, peer, cancel).await;
            });
        }
        drop(listener);
        let open = sessions.len();
        if open > 0 {
            info!(open, "smtp relay stopped accepting; waiting for sessions to finish their transactions");
        }
        let drained =
            tokio::time::timeout(config.shutdown_timeout, async { while sessions.join_next().await.is_some() {} })
                .await;
        if drained.is_err() {
            warn!(
                remaining = sessions.len(),
                "smtp sessions still open after shutdown_timeout; dropping their connections (their clients retry)"
            );
            sessions.shutdown().await;
        }
        Ok(())
    }
}

/// Counts a session in `sluice_smtp_sessions_active` for as long as it lives, including when
/// its task is aborted at shutdown.
struct ActiveSession;

impl ActiveSession {
    fn start() -> Self {
        metrics::gauge!("sluice_smtp_sessions_active").increment(1.0);
        ActiveSession
    }
}

impl Drop for ActiveSession {
    fn drop(&mut self) {
        metrics::gauge!("sluice_smtp_sessions_active").decrement(1.0);
    }
}
