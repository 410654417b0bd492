//! The loaded keys and the CPU part of signing: one `DKIM-Signature:` header per key of the
//! signing domain, relaxed/relaxed, over the headers the message has.

use std::collections::HashMap;
use std::sync::Arc;

use mail_auth::common::crypto::{Algorithm, DkimKey, Sha256, SigningKey};
use mail_auth::common::headers::{HeaderWriter, Writable};
use mail_auth::dkim::{Canonicalization, DkimSigner};

use super::config::{normalize_domain, DkimConfig};
use super::keys::{KeyAlgorithm, PrivateKey};
use super::policy::HeaderFacts;
use super::DkimError;

/// Why a message could not be signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("no DKIM key is loaded for {0} (is the MTA's [dkim] config the same as the edge's?)")]
    NoKey(String),
    #[error("DKIM signing with {selector}._domainkey.{domain} failed: {reason}")]
    Crypto { domain: String, selector: String, reason: String },
}

/// A parsed key, shared by every signature made with it: parsing an RSA key and its
/// precomputation is the expensive part, so it happens once, at start-up.
struct SharedKey(Arc<DkimKey>);

impl SigningKey for SharedKey {
    type Hasher = Sha256;

    fn sign(&self, input: impl Writable) -> mail_auth::Result<Vec<u8>> {
        self.0.sign(input)
    }

    fn algorithm(&self) -> Algorithm {
        self.0.algorithm()
    }
}

struct LoadedKey {
    domain: String,
    selector: String,
    algorithm: KeyAlgorithm,
    key: Arc<DkimKey>,
}

/// Every configured key, by signing domain, in configuration order.
pub(crate) struct KeyRing {
    by_domain: HashMap<String, Vec<LoadedKey>>,
}

impl KeyRing {
    pub fn empty() -> KeyRing {
        KeyRing { by_domain: HashMap::new() }
    }

    /// Reads and parses every key file of a validated config.
    pub fn load(config: &DkimConfig) -> Result<KeyRing, DkimError> {
        let mut by_domain: HashMap<String, Vec<LoadedKey>> = HashMap::new();
        for (index, k) in config.keys.iter().enumerate() {
            let private = PrivateKey::read(&k.private_key).map_err(|source| DkimError::Key { index, source })?;
            let key = private.signing_key().map_err(|reason| DkimError::Unusable { index, reason })?;
            let domain = normalize_domain(&k.domain);
            by_domain.entry(domain.clone()).or_default().push(LoadedKey {
                domain,
                selector: k.selector.clone(),
                algorithm: private.algorithm(),
                key: Arc::new(key),
            });
        }
        Ok(KeyRing { by_domain })
    }

    pub fn is_empty(&self) -> bool {
        self.by_domain.is_empty()
    }

    /// The `DKIM-Signature:` header lines (each ending in CRLF) for `message`, given as
    /// chunks that together are the exact bytes that will be sent, signed by every key of
    /// `domain`.
    pub fn sign(&self, domain: &str, facts: &HeaderFacts, message: &[&[u8]]) -> Result<String, SignError> {
        let keys = self.by_domain.get(domain).ok_or_else(|| SignError::NoKey(domain.to_string()))?;
        // mail-auth signs every occurrence of a listed header, and a name listed more often
        // than it occurs signs its absence: listing From once more over-signs it (and signs
        // From even in the odd message without one, as RFC 6376 §5.4 requires).
        let mut headers: Vec<&str> = facts.present.clone();
        headers.push("From");
        let mut out = String::with_capacity(keys.len() * 512);
        for k in keys {
            let started = std::time::Instant::now();
            let signature = DkimSigner::from_key(SharedKey(k.key.clone()))
                .domain(k.domain.as_str())
                .selector(k.selector.as_str())
                .headers(headers.iter().copied())
                .header_canonicalization(Canonicalization::Relaxed)
                .body_canonicalization(Canonicalization::Relaxed)
                .sign_chained(message.iter().copied())
                .map_err(|e| SignError::Crypto { domain: k.domain.clone(), selector: k.selector.clone(), reason: e.to_string() })?;
            out.push_str(&signature.to_header());
            let algorithm = match k.algorithm {
                KeyAlgorithm::Rsa => "rsa-sha256",
                KeyAlgorithm::Ed25519 => "ed25519-sha256",
            };
            metrics::counter!("sluice_dkim_signatures_total", "algorithm" => algorithm).increment(1);
            metrics::histogram!("sluice_dkim_sign_seconds", "algorithm" => algorithm).record(started.elapsed().as_secs_f64());
        }
        Ok(out)
    }
}
