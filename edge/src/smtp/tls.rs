//! The certificate for `STARTTLS`: loaded from PEM files, or generated at startup.

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::TlsAcceptor;

use super::{SmtpConfig, SmtpSetupError};

/// Where the server's certificate came from (logged at startup).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertificateSource {
    /// `tls_cert` / `tls_key` from the configuration.
    Files,
    /// Generated at startup for `hostname` because no files were configured.
    SelfSigned,
}

/// Builds the TLS acceptor from `tls_cert`/`tls_key`, or from a fresh self-signed certificate.
pub(crate) fn acceptor(config: &SmtpConfig) -> Result<(TlsAcceptor, CertificateSource), SmtpSetupError> {
    let (chain, key, source) = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => (load_chain(cert)?, load_key(key)?, CertificateSource::Files),
        _ => {
            let (chain, key) = self_signed(&config.hostname)?;
            (chain, key, CertificateSource::SelfSigned)
        }
    };
    // Name the provider explicitly: with more than one compiled in, the implicit default panics.
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let server = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key))
        .map_err(|e| SmtpSetupError::Tls(format!("the certificate and key cannot be used: {e}")))?;
    Ok((TlsAcceptor::from(Arc::new(server)), source))
}

fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, SmtpSetupError> {
    let fail = |reason: String| SmtpSetupError::Tls(format!("tls_cert {}: {reason}", path.display()));
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|e| fail(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(e.to_string()))?;
    if chain.is_empty() {
        return Err(fail("no CERTIFICATE section found (expected a PEM certificate chain)".into()));
    }
    Ok(chain)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, SmtpSetupError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        SmtpSetupError::Tls(format!(
            "tls_key {}: {e} (expected a PEM PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY section)",
            path.display()
        ))
    })
}

fn self_signed(hostname: &str) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), SmtpSetupError> {
    let generated = rcgen::generate_simple_self_signed(vec![hostname.to_string()])
        .map_err(|e| SmtpSetupError::Tls(format!("generating a self-signed certificate for {hostname}: {e}")))?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(generated.signing_key.serialize_der()));
    Ok((vec![generated.cert.der().clone()], key))
}
