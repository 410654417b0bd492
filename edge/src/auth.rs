//! API keys. Only SHA-256 hashes of keys are configured and kept in memory; a presented key
//! is hashed and looked up. Shared by the HTTP API (`Authorization: Bearer`) and SMTP AUTH
//! (user `apikey`, the key as password), as SendGrid does.

use std::collections::HashMap;

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// One configured API key: `[[api_keys]] name = "billing", sha256 = "<64 hex digits>"`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// The tenant this key belongs to; appears in the spool and in events.
    pub name: String,
    /// Lower-case hex SHA-256 of the key (`sluice apikey hash KEY` prints it).
    pub sha256: String,
}

/// Who submitted a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tenant {
    pub name: String,
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("api_keys[{index}].{field}: {reason}")]
pub struct ApiKeyConfigError {
    pub index: usize,
    pub field: &'static str,
    pub reason: String,
}

#[derive(Clone, Debug, Default)]
pub struct ApiKeys {
    by_hash: HashMap<[u8; 32], Tenant>,
}

/// The lower-case hex SHA-256 of a key, as it goes into the config.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

impl ApiKeys {
    pub fn from_config(keys: &[ApiKeyConfig]) -> Result<Self, ApiKeyConfigError> {
        let mut by_hash = HashMap::new();
        for (index, k) in keys.iter().enumerate() {
            if k.name.trim().is_empty() {
                return Err(ApiKeyConfigError { index, field: "name", reason: "must not be empty".into() });
            }
            let mut h = [0u8; 32];
            hex::decode_to_slice(k.sha256.trim().to_ascii_lowercase(), &mut h).map_err(|_| ApiKeyConfigError {
                index,
                field: "sha256",
                reason: "must be 64 hex digits: the SHA-256 of the key, never the key itself (`sluice apikey hash KEY`)".into(),
            })?;
            if by_hash.insert(h, Tenant { name: k.name.clone() }).is_some() {
                return Err(ApiKeyConfigError { index, field: "sha256", reason: "the same key is configured twice".into() });
            }
        }
        Ok(ApiKeys { by_hash })
    }

    /// Adds a key known in clear (the generated quick-start key); only its hash is kept.
    pub fn insert_key(&mut self, key: &str, tenant: Tenant) {
        self.by_hash.insert(Sha256::digest(key.as_bytes()).into(), tenant);
    }

    pub fn verify(&self, presented: &str) -> Option<&Tenant> {
        let h: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        self.by_hash.get(&h)
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_only_configured_keys() {
        let keys = ApiKeys::from_config(&[ApiKeyConfig { name: "acme".into(), sha256: hash_key("SG.secret") }]).unwrap();
        assert_eq!(keys.verify("SG.secret").unwrap().name, "acme");
        assert!(keys.verify("SG.secreT").is_none());
        assert!(keys.verify("").is_none());
    }

    #[test]
    fn rejects_clear_text_keys_in_config() {
        let err = ApiKeys::from_config(&[ApiKeyConfig { name: "acme".into(), sha256: "SG.secret".into() }]).unwrap_err();
        assert_eq!((err.index, err.field), (0, "sha256"));
        assert!(err.to_string().contains("never the key itself"));
    }
}
