//! The suppression list: recipients a rule hard-bounced with `suppress = true`. The MTA adds
//! them; the edge drops later sends to them (a `dropped` event, reason "Bounced Address")
//! instead of spooling them. Kept per tenant, keyed by the lower-cased address, in the same
//! store as the spool (its own keyspace locally, omap objects in RADOS), so every edge and
//! MTA of a deployment sees the same list.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::SpoolError;

/// One suppressed recipient.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suppression {
    pub tenant: String,
    /// Lower-cased.
    pub address: String,
    /// The reply that caused it, as the remote server wrote it.
    pub reason: String,
    /// The rule that decided to suppress.
    pub rule: String,
    /// When (ms since the epoch).
    pub created_at: u64,
}

impl Suppression {
    pub fn new(tenant: &str, address: &str, reason: impl Into<String>, rule: impl Into<String>) -> Self {
        Suppression {
            tenant: tenant.to_string(),
            address: address.to_lowercase(),
            reason: reason.into(),
            rule: rule.into(),
            created_at: crate::now_ms(),
        }
    }
}

/// The storage key of (tenant, address): length-prefixed tenant, so no tenant name can make
/// two pairs collide, then the lower-cased address.
pub fn suppression_key(tenant: &str, address: &str) -> String {
    format!("{}:{tenant}{}", tenant.len(), address.to_lowercase())
}

#[async_trait]
pub trait SuppressionList: Send + Sync + 'static {
    /// Adds (or refreshes) entries durably.
    async fn suppress(&self, entries: Vec<Suppression>) -> Result<(), SpoolError>;

    /// For each address, whether it is suppressed for `tenant` (case-insensitive).
    async fn check(&self, tenant: &str, addresses: &[String]) -> Result<Vec<bool>, SpoolError>;

    /// The entry for one address, if suppressed.
    async fn get(&self, tenant: &str, address: &str) -> Result<Option<Suppression>, SpoolError>;

    /// Lifts a suppression; returns whether there was one.
    async fn remove(&self, tenant: &str, address: &str) -> Result<bool, SpoolError>;
}

pub(crate) fn encode(s: &Suppression) -> Result<Vec<u8>, SpoolError> {
    serde_json::to_vec(s).map_err(|e| SpoolError::Storage(e.to_string()))
}

pub(crate) fn decode(what: &str, v: &[u8]) -> Result<Suppression, SpoolError> {
    serde_json::from_slice(v).map_err(|e| SpoolError::Corrupt { what: format!("suppression {what}"), reason: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_per_tenant_and_case_insensitive() {
        assert_eq!(suppression_key("t", "A@Example.COM"), suppression_key("t", "a@example.com"));
        assert_ne!(suppression_key("t", "a@x"), suppression_key("u", "a@x"));
        // "ab" + "c@x" and "a" + "bc@x" must differ
        assert_ne!(suppression_key("ab", "c@x"), suppression_key("a", "bc@x"));
    }
}
