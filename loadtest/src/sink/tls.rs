//! The sink's STARTTLS certificate: self-signed, made at start-up.

use std::sync::Arc;

use rustls::crypto::aws_lc_rs;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot generate the sink's self-signed certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("cannot build the sink's TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A TLS acceptor with a fresh self-signed certificate for `hostname` (and `localhost`,
/// `127.0.0.1`), plus that certificate so clients can be told to trust it.
pub fn self_signed_acceptor(hostname: &str) -> Result<(TlsAcceptor, CertificateDer<'static>), TlsSetupError> {
    let names = vec![hostname.to_string(), "localhost".to_string(), "127.0.0.1".to_string()];
    let certified = rcgen::generate_simple_self_signed(names)?;
    let cert = certified.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der()));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)?;
    Ok((TlsAcceptor::from(Arc::new(config)), cert))
}
