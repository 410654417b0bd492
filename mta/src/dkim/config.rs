//! The `[dkim]` configuration section: signing keys, and what happens to mail whose From:
//! domain has none.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::Deserialize;

use crate::config::is_hostname;

/// `[dkim]`: which mail is signed, with which keys.
///
/// Mail is signed by its From: domain when a key for that domain (or a parent domain, which
/// still aligns under DMARC's relaxed mode) is configured and the tenant may use it.
/// Otherwise `fallback` decides: sign with `platform_domain`, send unsigned, or refuse it at
/// the edge. `tenants` overrides the fallback per tenant.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DkimConfig {
    /// For mail whose From: domain has no key: `"unsigned"` (default), `"platform"` (sign
    /// with `platform_domain`, as SendGrid signs with its own domain by default), or
    /// `"refuse"` (the HTTP API answers 400, SMTP 550 5.7.1; nothing is queued).
    pub fallback: Fallback,
    /// The domain that signs under `fallback = "platform"`; needs at least one key below.
    pub platform_domain: Option<String>,
    /// Most signatures computed at once, each on a blocking thread (never on the reactor).
    /// Default: the number of CPUs.
    pub max_parallel_signing: usize,
    /// The signing keys. Every key of a domain signs its mail: configure an RSA and an
    /// Ed25519 key for dual signing, or the old and the new selector while rotating.
    pub keys: Vec<DkimKeyConfig>,
    /// Per-tenant overrides, keyed by tenant as it appears in events and the spool:
    /// `"apikey:<name>"`, `"smtp:<user>"` or `"net:<client ip>"`.
    pub tenants: BTreeMap<String, TenantDkimConfig>,
}

impl Default for DkimConfig {
    fn default() -> Self {
        DkimConfig {
            fallback: Fallback::Unsigned,
            platform_domain: None,
            max_parallel_signing: std::thread::available_parallelism().map_or(2, |n| n.get()),
            keys: Vec::new(),
            tenants: BTreeMap::new(),
        }
    }
}

/// What happens to mail whose From: domain has no usable key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fallback {
    /// Deliver it without a DKIM signature.
    #[default]
    Unsigned,
    /// Sign it with the platform domain's keys.
    Platform,
    /// Refuse it at ingestion with a clear error.
    Refuse,
}

/// `[[dkim.keys]]`: one private key for one domain and selector.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DkimKeyConfig {
    /// The signing domain (`d=`); its DNS holds the public key at
    /// `<selector>._domainkey.<domain>`.
    pub domain: String,
    /// The selector (`s=`).
    pub selector: String,
    /// PEM file with the private key: RSA (PKCS#1 or PKCS#8, 2048–8192 bits) or Ed25519
    /// (PKCS#8). `sluice dkim keygen` writes one. Keep it mode 0600.
    pub private_key: PathBuf,
    /// Tenants whose mail may be signed with this key because its From: is at `domain`;
    /// empty (the default) means every tenant. Restrict it on a shared platform: otherwise
    /// any tenant could send as `domain` and get a valid signature.
    #[serde(default)]
    pub tenants: Vec<String>,
}

/// `[dkim.tenants."<tenant>"]`: overrides for one tenant.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantDkimConfig {
    /// Replaces `dkim.fallback` for this tenant.
    pub fallback: Option<Fallback>,
    /// Replaces `dkim.platform_domain` for this tenant (e.g. a reseller's own domain).
    pub platform_domain: Option<String>,
}

/// A domain name as compared everywhere in DKIM: lower case, without a trailing dot.
pub(crate) fn normalize_domain(d: &str) -> String {
    d.trim().trim_end_matches('.').to_ascii_lowercase()
}

impl DkimConfig {
    /// Checks every key; the error names the key relative to `[dkim]`. Reading the key
    /// files is left to [`crate::dkim::DkimSigning::load`].
    pub fn validate(&self) -> Result<(), String> {
        if self.max_parallel_signing == 0 {
            return Err("max_parallel_signing: must be at least 1".into());
        }
        let mut seen = BTreeSet::new();
        for (i, k) in self.keys.iter().enumerate() {
            if !is_hostname(&k.domain) || !k.domain.contains('.') {
                return Err(format!("keys[{i}].domain: {:?} is not a domain name", k.domain));
            }
            if !is_hostname(&k.selector) || k.selector.contains('_') {
                return Err(format!(
                    "keys[{i}].selector: {:?} is not a valid selector (letters, digits, hyphens, dots)",
                    k.selector
                ));
            }
            if k.private_key.as_os_str().is_empty() {
                return Err(format!("keys[{i}].private_key: must name a PEM file"));
            }
            if !seen.insert((normalize_domain(&k.domain), k.selector.to_ascii_lowercase())) {
                return Err(format!(
                    "keys[{i}]: domain {:?} has selector {:?} twice; each selector names one DNS record",
                    k.domain, k.selector
                ));
            }
        }
        let has_key = |d: &str| self.keys.iter().any(|k| normalize_domain(&k.domain) == normalize_domain(d));
        let check_platform = |key: &str, fallback: Fallback, platform: Option<&String>| -> Result<(), String> {
            if fallback != Fallback::Platform {
                return Ok(());
            }
            match platform {
                None => Err(format!("{key}: \"platform\" needs a platform_domain")),
                Some(d) if !has_key(d) => {
                    Err(format!("{key}: platform_domain {d:?} has no key in [[dkim.keys]]; add one (`sluice dkim keygen`)"))
                }
                Some(_) => Ok(()),
            }
        };
        if let Some(d) = &self.platform_domain {
            if !has_key(d) {
                return Err(format!("platform_domain: {d:?} has no key in [[dkim.keys]]; add one (`sluice dkim keygen`)"));
            }
        }
        check_platform("fallback", self.fallback, self.platform_domain.as_ref())?;
        for (tenant, t) in &self.tenants {
            if let Some(d) = &t.platform_domain {
                if !has_key(d) {
                    return Err(format!("tenants.{tenant:?}.platform_domain: {d:?} has no key in [[dkim.keys]]"));
                }
            }
            let fallback = t.fallback.unwrap_or(self.fallback);
            check_platform(&format!("tenants.{tenant:?}.fallback"), fallback, t.platform_domain.as_ref().or(self.platform_domain.as_ref()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(domain: &str, selector: &str) -> DkimKeyConfig {
        DkimKeyConfig { domain: domain.into(), selector: selector.into(), private_key: "k.pem".into(), tenants: vec![] }
    }

    #[test]
    fn defaults_are_valid_and_sign_nothing() {
        let c = DkimConfig::default();
        c.validate().unwrap();
        assert_eq!(c.fallback, Fallback::Unsigned);
        assert!(c.keys.is_empty());
    }

    #[test]
    fn parses_keys_fallbacks_and_tenant_overrides() {
        let c: DkimConfig = toml::from_str(
            r#"
            fallback = "platform"
            platform_domain = "esp.example.net"
            [[keys]]
            domain = "esp.example.net"
            selector = "s1"
            private_key = "/etc/sluice/dkim/esp.pem"
            [[keys]]
            domain = "shop.example"
            selector = "ed1"
            private_key = "/etc/sluice/dkim/shop.pem"
            tenants = ["apikey:shop"]
            [tenants."apikey:strict"]
            fallback = "refuse"
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.keys[1].tenants, ["apikey:shop"]);
        assert_eq!(c.tenants["apikey:strict"].fallback, Some(Fallback::Refuse));
        assert!(toml::from_str::<DkimConfig>("fallback = \"maybe\"").is_err());
        assert!(toml::from_str::<DkimConfig>("[[keys]]\ndomain = \"a.b\"\nselector = \"s\"\nprivate_key = \"k\"\nsecret = 1").is_err());
    }

    #[test]
    fn bad_values_name_their_key() {
        let err = |f: fn(&mut DkimConfig)| {
            let mut c = DkimConfig::default();
            f(&mut c);
            c.validate().unwrap_err()
        };
        assert!(err(|c| c.max_parallel_signing = 0).starts_with("max_parallel_signing:"));
        assert!(err(|c| c.keys = vec![key("not a domain", "s1")]).starts_with("keys[0].domain:"));
        assert!(err(|c| c.keys = vec![key("example.com", "_bad")]).starts_with("keys[0].selector:"));
        assert!(err(|c| c.keys = vec![key("example.com", "s1"), key("Example.COM.", "s1")]).starts_with("keys[1]:"));
        assert!(err(|c| c.fallback = Fallback::Platform).starts_with("fallback: \"platform\" needs a platform_domain"));
        assert!(err(|c| c.platform_domain = Some("esp.example".into())).starts_with("platform_domain:"));
        let e = err(|c| {
            c.tenants.insert("apikey:x".into(), TenantDkimConfig { fallback: Some(Fallback::Platform), platform_domain: None });
        });
        assert!(e.starts_with("tenants.\"apikey:x\".fallback:"), "{e}");
    }
}
