//! The loaded keys and the CPU part of signing: one `DKIM-Signature:` header per key of the
//! signing domain, relaxed/relaxed, over the headers the message has.

use std::collections::HashMap;
use std::sync::Arc;

use aws_lc_rs::digest::{Context, SHA256};
use mail_auth::common::crypto::{Algorithm, DkimKey, HashOutput, Sha256, SigningKey};
use mail_auth::common::headers::{HeaderWriter, Writable, Writer};
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

    /// The body hash (`bh=`), through a buffer: mail-auth's relaxed canonicalisation writes
    /// the body a byte at a time, and one aws-lc digest update per byte cost more than the
    /// Ed25519 signature itself (measured by the dkim_sign bench: 60 µs → see
    /// docs/benchmarks.md for the numbers after this change).
    fn hash(&self, data: impl Writable) -> HashOutput {
        let mut hasher = BufferedSha256 { context: Context::new(&SHA256), buffer: Vec::with_capacity(HASH_BUFFER) };
        data.write(&mut hasher);
        hasher.context.update(&hasher.buffer);
        HashOutput::Digest(hasher.context.finish())
    }
}

const HASH_BUFFER: usize = 16 * 1024;

/// SHA-256 fed in blocks of up to `HASH_BUFFER` bytes however small the writes are.
struct BufferedSha256 {
    context: Context,
    buffer: Vec<u8>,
}

impl Writer for BufferedSha256 {
    #[inline]
    fn write(&mut self, data: &[u8]) {
        // The common case, one byte: a push, not a memmove call.
        if let [byte] = data {
            if self.buffer.len() < HASH_BUFFER {
                self.buffer.push(*byte);
                return;
            }
        }
        if self.buffer.len() + data.len() > HASH_BUFFER {
            self.context.update(&self.buffer);
            self.buffer.clear();
            if data.len() >= HASH_BUFFER {
                self.context.update(data);
                return;
            }
        }
        self.buffer.extend_from_slice(data);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffered_hashing_equals_hashing_at_once() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let expected = aws_lc_rs::digest::digest(&SHA256, &data);
        // Writes of every size: single bytes, odd sizes, and writes larger than the buffer.
        let mut hasher = BufferedSha256 { context: Context::new(&SHA256), buffer: Vec::new() };
        let mut rest = &data[..];
        for size in [1usize, 1, 7, 300, HASH_BUFFER - 5, 3, HASH_BUFFER * 2 + 1, 1].iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let n = (*size).min(rest.len());
            hasher.write(&rest[..n]);
            rest = &rest[n..];
        }
        hasher.context.update(&hasher.buffer);
        assert_eq!(hasher.context.finish().as_ref(), expected.as_ref());
    }
}
