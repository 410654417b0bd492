//! DKIM signing (RFC 6376; Ed25519 per RFC 8463).
//!
//! A message is signed once, by the MTA, on its first delivery attempt: the
//! `DKIM-Signature:` headers go into `meta.prepend_headers`, which the delivery prepends on
//! the wire and the spool keeps with every reschedule, so retries send the same bytes and
//! never sign again. The signature covers exactly what is sent: the prepended headers that
//! were there before, then the spooled message.
//!
//! [`DkimPolicy`] decides which domain signs (pure; the edge uses it to refuse unsignable
//! mail at ingestion), the key ring holds every key parsed once at start-up, and the
//! cryptography (mail-auth on aws-lc-rs) runs on the blocking pool, at most
//! `max_parallel_signing` at a time.

mod config;
mod keys;
mod policy;
mod sign;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use sluice_rules::Reply;
use sluice_spool::MessageMeta;
use tokio::sync::Semaphore;

pub use config::{DkimConfig, DkimKeyConfig, Fallback, TenantDkimConfig};
pub use keys::{DnsRecord, KeyAlgorithm, KeyError, PrivateKey};
pub use policy::{Decision, DkimPolicy, HeaderFacts, SIGNED_HEADERS};
pub use sign::SignError;

use crate::synthetic;
use sign::KeyRing;

/// Why DKIM signing could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DkimError {
    /// A configuration value is invalid (the message names the key).
    #[error("invalid configuration: dkim.{0}")]
    Config(String),
    #[error("dkim.keys[{index}].private_key: {source}")]
    Key { index: usize, source: KeyError },
    #[error("dkim.keys[{index}].private_key: the key cannot sign: {reason}")]
    Unusable { index: usize, reason: String },
}

/// The MTA's signer: policy, keys and the bounded pool the cryptography runs on.
pub struct DkimSigning {
    policy: DkimPolicy,
    keys: KeyRing,
    permits: Arc<Semaphore>,
    /// No keys and no refusals: nothing to look at, every message goes out as it is.
    inert: bool,
    /// Signatures being computed right now, and the most there ever were at once (two
    /// atomic operations per message: cheap enough to keep in production, and what proves
    /// the bound holds; also the gauge `sluice_dkim_signing_in_progress`).
    in_flight: AtomicUsize,
    most_in_flight: AtomicUsize,
}

/// One message being signed on the blocking pool; counted while it lives.
struct Signing<'a>(&'a DkimSigning);

impl Signing<'_> {
    fn start(signer: &DkimSigning) -> Signing<'_> {
        let now = signer.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        signer.most_in_flight.fetch_max(now, Ordering::SeqCst);
        metrics::gauge!("sluice_dkim_signing_in_progress").increment(1.0);
        Signing(signer)
    }
}

impl Drop for Signing<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        metrics::gauge!("sluice_dkim_signing_in_progress").decrement(1.0);
    }
}

impl DkimSigning {
    /// Validates `config` and reads every key file. Fails on the first bad key, naming it.
    pub fn load(config: &DkimConfig) -> Result<DkimSigning, DkimError> {
        config.validate().map_err(DkimError::Config)?;
        let keys = KeyRing::load(config)?;
        let policy = DkimPolicy::from_config(config);
        let inert = keys.is_empty() && !policy.may_refuse();
        Ok(DkimSigning {
            policy,
            keys,
            permits: Arc::new(Semaphore::new(config.max_parallel_signing)),
            inert,
            in_flight: AtomicUsize::new(0),
            most_in_flight: AtomicUsize::new(0),
        })
    }

    /// Signs nothing (no `[dkim]` keys configured).
    pub fn disabled() -> DkimSigning {
        DkimSigning {
            policy: DkimPolicy::from_config(&DkimConfig::default()),
            keys: KeyRing::empty(),
            permits: Arc::new(Semaphore::new(1)),
            inert: true,
            in_flight: AtomicUsize::new(0),
            most_in_flight: AtomicUsize::new(0),
        }
    }

    /// The most messages that were ever being signed at the same time (never more than
    /// `max_parallel_signing`).
    pub fn most_parallel_signing(&self) -> usize {
        self.most_in_flight.load(Ordering::SeqCst)
    }

    pub fn policy(&self) -> &DkimPolicy {
        &self.policy
    }

    /// The whole decision and the cryptography, synchronously: the `DKIM-Signature:`
    /// header lines to prepend to `message`, `Ok(None)` when it goes out unsigned, or
    /// `Err(reason)` when policy refuses it. For benchmarks and tools; the MTA uses the
    /// same steps with the cryptography on the blocking pool.
    pub fn sign_message(&self, tenant: &str, message: &[u8]) -> Result<Option<String>, String> {
        let facts = HeaderFacts::read(message);
        match self.policy.decide(tenant, &facts) {
            Decision::Unsigned => Ok(None),
            Decision::Refuse(reason) => Err(reason),
            Decision::Sign { domain } => self.keys.sign(&domain, &facts, &[message]).map(Some).map_err(|e| e.to_string()),
        }
    }

    /// Signs a leased message unless it was signed before (it then carries its signature in
    /// `prepend_headers`) or policy says unsigned. The caller hands `meta` back to the
    /// spool with the attempt's outcome, which stores the signature for every retry.
    ///
    /// `Err` is the reply every pending recipient gets instead of an attempt: `550 5.7.1`
    /// when policy refuses the message, `451 4.3.0` when signing failed (a local problem
    /// worth retrying once an operator fixed it).
    pub(crate) async fn sign_once(self: &Arc<Self>, meta: &mut MessageMeta, body: &Bytes) -> Result<(), Reply> {
        if self.inert || already_signed(meta.prepend_headers.as_deref()) {
            return Ok(());
        }
        // Only the header section is parsed: cheap enough for the reactor.
        let facts = HeaderFacts::read(body);
        let domain = match self.policy.decide(&meta.tenant, &facts) {
            Decision::Unsigned => {
                metrics::counter!("sluice_dkim_messages_total", "result" => "unsigned").increment(1);
                return Ok(());
            }
            Decision::Refuse(reason) => {
                metrics::counter!("sluice_dkim_messages_total", "result" => "refused").increment(1);
                return Err(synthetic::dkim_refused(&reason));
            }
            Decision::Sign { domain } => domain,
        };
        let permit = self.permits.clone().acquire_owned().await.expect("the signing semaphore is never closed");
        let this = self.clone();
        // Earlier prepended lines, each ending in exactly one CRLF as the wire has them
        // (mail-auth reads each chunk as whole header lines, then the body).
        let prepend = meta
            .prepend_headers
            .as_deref()
            .map(|p| p.trim_end_matches(['\r', '\n']))
            .filter(|p| !p.is_empty())
            .map(|p| format!("{p}\r\n"));
        let body = body.clone();
        let signed = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let _counted = Signing::start(&this);
            let chunks: Vec<&[u8]> = match &prepend {
                Some(p) => vec![p.as_bytes(), &body],
                None => vec![&body],
            };
            this.keys.sign(&domain, &facts, &chunks).map(|sig| sig + prepend.as_deref().unwrap_or(""))
        })
        .await;
        match signed {
            Ok(Ok(headers)) => {
                metrics::counter!("sluice_dkim_messages_total", "result" => "signed").increment(1);
                meta.prepend_headers = Some(headers);
                Ok(())
            }
            Ok(Err(e)) => {
                metrics::counter!("sluice_dkim_messages_total", "result" => "failed").increment(1);
                tracing::error!(id = %meta.id, error = %e, "DKIM signing failed; the message is retried later");
                Err(synthetic::dkim_failed(e))
            }
            Err(e) => {
                tracing::warn!(id = %meta.id, error = %e, "DKIM signing was interrupted; the message is retried later");
                Err(synthetic::dkim_interrupted())
            }
        }
    }
}

/// Whether the prepended headers already hold a signature made on an earlier attempt.
fn already_signed(prepend: Option<&str>) -> bool {
    prepend.is_some_and(|p| p.lines().any(|l| l.len() >= 15 && l.as_bytes()[..15].eq_ignore_ascii_case(b"dkim-signature:")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_spool::{now_ms, MessageId, Recipient};

    fn meta(tenant: &str) -> MessageMeta {
        let now = now_ms();
        MessageMeta {
            id: MessageId::new(),
            queue: "dest.test".into(),
            tenant: tenant.into(),
            mail_from: "news@brand.example".into(),
            recipients: vec![Recipient::pending("a@dest.test")],
            x_message_id: "X".into(),
            smtp_id: "<m@brand.example>".into(),
            categories: Vec::new(),
            custom_args: Default::default(),
            ip_pool: None,
            created_at: now,
            due_at: now,
            expires_at: now + 3_600_000,
            attempts: 0,
            last_reply: None,
            prepend_headers: None,
        }
    }

    /// A signer with one RSA-2048 key for brand.example (RSA: the slow signature, so
    /// signatures overlap whenever the pool lets them).
    fn signer(dir: &std::path::Path, max_parallel_signing: usize) -> Arc<DkimSigning> {
        let pem = dir.join(format!("k{max_parallel_signing}.pem"));
        PrivateKey::generate(KeyAlgorithm::Rsa, 2048).unwrap().write_new(&pem).unwrap();
        let config = DkimConfig {
            keys: vec![DkimKeyConfig { domain: "brand.example".into(), selector: "s1".into(), private_key: pem, tenants: vec![] }],
            max_parallel_signing,
            ..DkimConfig::default()
        };
        Arc::new(DkimSigning::load(&config).unwrap())
    }

    /// Signs `n` messages at once from as many tasks; returns how many came out signed.
    async fn sign_many(signer: &Arc<DkimSigning>, n: usize) -> usize {
        let body = Bytes::from_static(b"From: News <news@brand.example>\r\nTo: a@dest.test\r\nSubject: s\r\n\r\nbody\r\n");
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let (signer, body) = (signer.clone(), body.clone());
                tokio::spawn(async move {
                    let mut m = meta("apikey:any");
                    signer.sign_once(&mut m, &body).await.unwrap();
                    already_signed(m.prepend_headers.as_deref())
                })
            })
            .collect();
        let mut signed = 0;
        for t in tasks {
            signed += usize::from(t.await.unwrap());
        }
        signed
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn at_most_max_parallel_signing_signatures_run_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let one = signer(dir.path(), 1);
        assert_eq!(sign_many(&one, 48).await, 48);
        assert_eq!(one.most_parallel_signing(), 1, "max_parallel_signing = 1 lets one signature run at a time");
        let three = signer(dir.path(), 3);
        assert_eq!(sign_many(&three, 48).await, 48);
        assert!((1..=3).contains(&three.most_parallel_signing()), "{}", three.most_parallel_signing());
        assert_eq!(three.in_flight.load(Ordering::SeqCst), 0, "every signature is counted out again");
    }

    #[test]
    fn the_in_flight_count_sees_overlapping_signatures() {
        let s = DkimSigning::disabled();
        let a = Signing::start(&s);
        let b = Signing::start(&s);
        assert_eq!(s.in_flight.load(Ordering::SeqCst), 2);
        drop((a, b));
        let _c = Signing::start(&s);
        assert_eq!((s.in_flight.load(Ordering::SeqCst), s.most_parallel_signing()), (1, 2));
    }

    #[test]
    fn recognises_an_earlier_signature() {
        assert!(already_signed(Some("DKIM-Signature: v=1; a=rsa-sha256;\r\n\tb=abc\r\n")));
        assert!(already_signed(Some("X-Other: 1\r\ndkim-signature: v=1\r\n")));
        assert!(!already_signed(Some("X-Other: 1\r\n")));
        assert!(!already_signed(None));
        assert!(!already_signed(Some("X: ééééééééé")));
    }
}
