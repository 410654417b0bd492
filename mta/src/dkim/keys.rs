//! DKIM private keys: reading them from PEM files, generating new ones, and the DNS TXT
//! record that publishes each one's public half.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::{KeyPair as RsaKeyPair, KeySize};
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use base64::Engine;
use mail_auth::common::crypto::{DkimKey, Ed25519Key, RsaKey, Sha256};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer};

/// The signature algorithms sluice signs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyAlgorithm {
    /// rsa-sha256 (RFC 6376, RFC 8301: at least 1024 bits, 2048 recommended).
    Rsa,
    /// ed25519-sha256 (RFC 8463).
    Ed25519,
}

impl KeyAlgorithm {
    /// The `k=` tag of the DNS record.
    pub fn dns_tag(self) -> &'static str {
        match self {
            KeyAlgorithm::Rsa => "rsa",
            KeyAlgorithm::Ed25519 => "ed25519",
        }
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyAlgorithm::Rsa => "rsa-sha256",
            KeyAlgorithm::Ed25519 => "ed25519-sha256",
        })
    }
}

/// Why a key could not be read, generated or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read DKIM key {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("DKIM key {path} is not a PEM file: {reason}")]
    NotPem { path: PathBuf, reason: String },
    #[error("DKIM key {path} is encrypted; sluice needs it unencrypted (`openssl pkey -in KEY -out PLAIN`), readable only by sluice (mode 0600)")]
    Encrypted { path: PathBuf },
    #[error("DKIM key {path} holds a {tag:?}; sluice signs with RSA (\"RSA PRIVATE KEY\" or \"PRIVATE KEY\") or Ed25519 (\"PRIVATE KEY\") keys")]
    UnsupportedPem { path: PathBuf, tag: String },
    #[error("DKIM key {path} is neither an RSA key of 2048 to 8192 bits nor an Ed25519 key: {reason}")]
    Unusable { path: PathBuf, reason: String },
    #[error("cannot generate a {algorithm} key: {reason}")]
    Generate { algorithm: KeyAlgorithm, reason: String },
    #[error("RSA keys of {0} bits are not supported: use 2048 (the default), 3072 or 4096")]
    UnsupportedSize(usize),
    #[error("{path} already exists; sluice never overwrites a key (remove it, or choose another --out or selector)")]
    Exists { path: PathBuf },
    #[error("cannot write DKIM key {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// A private key, parsed and checked.
pub struct PrivateKey {
    algorithm: KeyAlgorithm,
    /// What the public key record publishes: SubjectPublicKeyInfo DER for RSA (the form every
    /// verifier accepts), the raw 32 bytes for Ed25519 (RFC 8463 §4).
    public_key: Vec<u8>,
    /// The private key as stored.
    der: KeyDer,
    /// RSA modulus size in bits (0 for Ed25519).
    bits: usize,
}

/// Shows the algorithm and the public key only: a private key never reaches a log.
impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrivateKey").field("algorithm", &self.algorithm).field("public_key", &self.public_key_base64()).finish()
    }
}

enum KeyDer {
    Pkcs1(Vec<u8>),
    Pkcs8(Vec<u8>),
}

impl PrivateKey {
    /// Reads a PEM file: `RSA PRIVATE KEY` (PKCS#1) or `PRIVATE KEY` (PKCS#8, RSA or Ed25519).
    pub fn read(path: &Path) -> Result<PrivateKey, KeyError> {
        let text = std::fs::read(path).map_err(|source| KeyError::Read { path: path.into(), source })?;
        let pem = pem::parse(&text).map_err(|e| KeyError::NotPem { path: path.into(), reason: e.to_string() })?;
        let unusable = |reason: String| KeyError::Unusable { path: path.into(), reason };
        match pem.tag() {
            "RSA PRIVATE KEY" => {
                let der = pem.into_contents();
                let pair = RsaKeyPair::from_der(&der).map_err(|e| unusable(e.to_string()))?;
                Self::from_rsa(&pair, KeyDer::Pkcs1(der)).map_err(unusable)
            }
            "PRIVATE KEY" => {
                let der = pem.into_contents();
                if let Ok(pair) = RsaKeyPair::from_pkcs8(&der) {
                    return Self::from_rsa(&pair, KeyDer::Pkcs8(der)).map_err(unusable);
                }
                let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der).map_err(|e| unusable(e.to_string()))?;
                Ok(PrivateKey {
                    algorithm: KeyAlgorithm::Ed25519,
                    public_key: pair.public_key().as_ref().to_vec(),
                    der: KeyDer::Pkcs8(der),
                    bits: 0,
                })
            }
            "ENCRYPTED PRIVATE KEY" => Err(KeyError::Encrypted { path: path.into() }),
            other => Err(KeyError::UnsupportedPem { path: path.into(), tag: other.to_string() }),
        }
    }

    fn from_rsa(pair: &RsaKeyPair, der: KeyDer) -> Result<PrivateKey, String> {
        let spki = pair.public_key().as_der().map_err(|e| e.to_string())?;
        Ok(PrivateKey {
            algorithm: KeyAlgorithm::Rsa,
            public_key: spki.as_ref().to_vec(),
            der,
            bits: pair.public_modulus_len() * 8,
        })
    }

    /// A new RSA key of `bits` (2048, 3072 or 4096) or a new Ed25519 key.
    pub fn generate(algorithm: KeyAlgorithm, bits: usize) -> Result<PrivateKey, KeyError> {
        let failed = |e: aws_lc_rs::error::Unspecified| KeyError::Generate { algorithm, reason: e.to_string() };
        match algorithm {
            KeyAlgorithm::Rsa => {
                let size = match bits {
                    2048 => KeySize::Rsa2048,
                    3072 => KeySize::Rsa3072,
                    4096 => KeySize::Rsa4096,
                    other => return Err(KeyError::UnsupportedSize(other)),
                };
                let pair = RsaKeyPair::generate(size).map_err(failed)?;
                let pkcs8 = pair.as_der().map_err(failed)?;
                Self::from_rsa(&pair, KeyDer::Pkcs8(pkcs8.as_ref().to_vec()))
                    .map_err(|reason| KeyError::Generate { algorithm, reason })
            }
            KeyAlgorithm::Ed25519 => {
                let pair = Ed25519KeyPair::generate().map_err(failed)?;
                // PKCS#8 v1, as `openssl genpkey -algorithm ed25519` writes it.
                let pkcs8 = pair.to_pkcs8v1().map_err(failed)?;
                Ok(PrivateKey {
                    algorithm,
                    public_key: pair.public_key().as_ref().to_vec(),
                    der: KeyDer::Pkcs8(pkcs8.as_ref().to_vec()),
                    bits: 0,
                })
            }
        }
    }

    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    /// The RSA modulus size in bits; `None` for Ed25519.
    pub fn rsa_bits(&self) -> Option<usize> {
        (self.algorithm == KeyAlgorithm::Rsa).then_some(self.bits)
    }

    /// The `p=` value of the DNS record (base64).
    pub fn public_key_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(&self.public_key)
    }

    /// The key as a PEM file (LF line endings, like OpenSSL writes).
    pub fn to_pem(&self) -> String {
        let (tag, der) = match &self.der {
            KeyDer::Pkcs1(d) => ("RSA PRIVATE KEY", d),
            KeyDer::Pkcs8(d) => ("PRIVATE KEY", d),
        };
        pem::encode_config(&pem::Pem::new(tag, der.clone()), pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF))
    }

    /// The key in the form mail-auth signs with.
    pub(crate) fn signing_key(&self) -> Result<DkimKey, String> {
        let e = |e: mail_auth::Error| e.to_string();
        match (self.algorithm, &self.der) {
            (KeyAlgorithm::Rsa, KeyDer::Pkcs1(d)) => {
                RsaKey::<Sha256>::from_key_der(PrivateKeyDer::Pkcs1(PrivatePkcs1KeyDer::from(d.as_slice()))).map(DkimKey::Rsa).map_err(e)
            }
            (KeyAlgorithm::Rsa, KeyDer::Pkcs8(d)) => {
                RsaKey::<Sha256>::from_key_der(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(d.as_slice()))).map(DkimKey::Rsa).map_err(e)
            }
            (KeyAlgorithm::Ed25519, KeyDer::Pkcs8(d)) => Ed25519Key::from_pkcs8_maybe_unchecked_der(d).map(DkimKey::Ed25519).map_err(e),
            (KeyAlgorithm::Ed25519, KeyDer::Pkcs1(_)) => Err("an Ed25519 key cannot be PKCS#1".into()),
        }
    }

    /// Writes the key as PEM to a new file, readable only by its owner (0600). Never
    /// replaces an existing file: that could destroy a key whose record is published.
    pub fn write_new(&self, path: &Path) -> Result<(), KeyError> {
        let write_err = |source: std::io::Error| KeyError::Write { path: path.into(), source };
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                KeyError::Exists { path: path.into() }
            } else {
                write_err(e)
            }
        })?;
        f.write_all(self.to_pem().as_bytes()).map_err(write_err)?;
        f.sync_all().map_err(write_err)
    }
}

/// The DNS TXT record that publishes a key: `<selector>._domainkey.<domain>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsRecord {
    /// The owner name, fully qualified (trailing dot).
    pub name: String,
    /// The record's text: `v=DKIM1; k=...; p=...`.
    pub value: String,
}

impl DnsRecord {
    pub fn new(domain: &str, selector: &str, key: &PrivateKey) -> DnsRecord {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        DnsRecord {
            name: format!("{selector}._domainkey.{domain}."),
            value: format!("v=DKIM1; k={}; p={}", key.algorithm.dns_tag(), key.public_key_base64()),
        }
    }

    /// The value as the quoted strings of a zone file: one TXT string holds at most 255
    /// bytes, so a 2048-bit RSA key needs two (resolvers join them).
    pub fn quoted_strings(&self) -> Vec<String> {
        self.value.as_bytes().chunks(255).map(|c| format!("\"{}\"", String::from_utf8_lossy(c))).collect()
    }

    /// One zone-file line, e.g. for BIND or as input to a DNS provider's API.
    pub fn zone_line(&self) -> String {
        format!("{} 3600 IN TXT ( {} )", self.name, self.quoted_strings().join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_round_trip_through_pem_files() {
        let dir = tempfile::tempdir().unwrap();
        for (alg, bits) in [(KeyAlgorithm::Rsa, 2048), (KeyAlgorithm::Ed25519, 0)] {
            let key = PrivateKey::generate(alg, bits).unwrap();
            let path = dir.path().join(format!("{}.pem", alg.dns_tag()));
            key.write_new(&path).unwrap();
            let mode = std::fs::metadata(&path).unwrap().permissions();
            assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
            let back = PrivateKey::read(&path).unwrap();
            assert_eq!(back.algorithm(), alg);
            assert_eq!(back.public_key_base64(), key.public_key_base64());
            back.signing_key().unwrap();
            assert!(matches!(key.write_new(&path), Err(KeyError::Exists { .. })), "never overwrites");
        }
    }

    #[test]
    fn rsa_public_keys_are_published_as_subject_public_key_info() {
        let key = PrivateKey::generate(KeyAlgorithm::Rsa, 2048).unwrap();
        assert_eq!(key.rsa_bits(), Some(2048));
        // Every 2048-bit SPKI starts like this in base64 (SEQUENCE, rsaEncryption OID).
        assert!(key.public_key_base64().starts_with("MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA"));
        let ed = PrivateKey::generate(KeyAlgorithm::Ed25519, 0).unwrap();
        assert_eq!(ed.public_key.len(), 32);
    }

    #[test]
    fn records_are_split_into_255_byte_strings() {
        let key = PrivateKey::generate(KeyAlgorithm::Rsa, 2048).unwrap();
        let rec = DnsRecord::new("Example.COM.", "s2026", &key);
        assert_eq!(rec.name, "s2026._domainkey.example.com.");
        assert!(rec.value.starts_with("v=DKIM1; k=rsa; p=MIIB"));
        let parts = rec.quoted_strings();
        assert_eq!(parts.len(), 2);
        assert!(parts.iter().all(|p| p.len() <= 257));
        let joined: String = parts.iter().map(|p| p.trim_matches('"')).collect();
        assert_eq!(joined, rec.value);
        assert!(rec.zone_line().starts_with("s2026._domainkey.example.com. 3600 IN TXT ( \"v=DKIM1; k=rsa; p="));
    }

    #[test]
    fn bad_files_get_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        assert!(matches!(PrivateKey::read(&dir.path().join("missing.pem")), Err(KeyError::Read { .. })));
        assert!(matches!(PrivateKey::read(&write("junk.pem", "hello")), Err(KeyError::NotPem { .. })));
        let cert = write("cert.pem", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n");
        assert!(matches!(PrivateKey::read(&cert), Err(KeyError::UnsupportedPem { .. })));
        let enc = write("enc.pem", "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n");
        assert!(matches!(PrivateKey::read(&enc), Err(KeyError::Encrypted { .. })));
        let garbage = write("garbage.pem", "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n");
        let err = PrivateKey::read(&garbage).unwrap_err();
        assert!(matches!(err, KeyError::Unusable { .. }), "{err}");
        assert!(matches!(PrivateKey::generate(KeyAlgorithm::Rsa, 1024), Err(KeyError::UnsupportedSize(1024))));
    }
}
