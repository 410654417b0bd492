//! Which domain signs a message, if any. Pure: it needs the configuration but not the
//! private keys, so an edge node without keys can refuse unsignable mail at ingestion.

use std::collections::{BTreeMap, HashMap};

use mail_parser::MessageParser;

use super::config::{normalize_domain, DkimConfig, Fallback};

/// What to do with one message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Sign with every key of this domain.
    Sign { domain: String },
    /// Send without a signature.
    Unsigned,
    /// The tenant's policy forbids sending it unsigned; the text says why, for the client.
    Refuse(String),
}

/// The headers of a message that matter for signing, read in one pass.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderFacts {
    /// The domain of the first From: address, normalised.
    pub from_domain: Option<String>,
    /// Which of [`SIGNED_HEADERS`] the message has (their canonical spelling).
    pub present: Vec<&'static str>,
}

/// The headers signed when present, From first: From is listed once more in `h=` than it
/// occurs (over-signed), so a second From: added in transit breaks the signature.
pub const SIGNED_HEADERS: [&str; 11] = [
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "MIME-Version",
    "Content-Type",
    "Reply-To",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
];

impl HeaderFacts {
    /// Reads the header section of `message` (the body is not parsed).
    pub fn read(message: &[u8]) -> HeaderFacts {
        let Some(parsed) = MessageParser::new().parse_headers(message) else {
            return HeaderFacts::default();
        };
        let from_domain = parsed
            .from()
            .and_then(|a| a.first())
            .and_then(|a| a.address())
            .and_then(|a| a.rsplit_once('@'))
            .map(|(_, d)| normalize_domain(d))
            .filter(|d| !d.is_empty());
        let mut present = Vec::new();
        for wanted in SIGNED_HEADERS {
            if parsed.headers().iter().any(|h| h.name.as_str().eq_ignore_ascii_case(wanted)) {
                present.push(wanted);
            }
        }
        HeaderFacts { from_domain, present }
    }
}

/// Who may sign as a domain: every tenant, or only those listed.
#[derive(Clone, Debug)]
enum Users {
    Everyone,
    Only(Vec<String>),
}

impl Users {
    fn allows(&self, tenant: &str) -> bool {
        match self {
            Users::Everyone => true,
            Users::Only(list) => list.iter().any(|t| t == tenant),
        }
    }
}

#[derive(Clone, Debug)]
struct TenantRule {
    fallback: Fallback,
    platform_domain: Option<String>,
}

/// The signing-domain decision, built once from `[dkim]`.
#[derive(Clone, Debug)]
pub struct DkimPolicy {
    /// Domain → who may sign as it (a union over the domain's keys).
    domains: HashMap<String, Users>,
    default: TenantRule,
    tenants: BTreeMap<String, TenantRule>,
}

impl DkimPolicy {
    /// Expects a validated config.
    pub fn from_config(config: &DkimConfig) -> DkimPolicy {
        let mut domains: HashMap<String, Users> = HashMap::new();
        for k in &config.keys {
            let entry = domains.entry(normalize_domain(&k.domain)).or_insert_with(|| Users::Only(Vec::new()));
            match (entry, k.tenants.is_empty()) {
                (e, true) => *e = Users::Everyone,
                (Users::Only(list), false) => list.extend(k.tenants.iter().cloned()),
                (Users::Everyone, false) => {}
            }
        }
        let platform = config.platform_domain.as_deref().map(normalize_domain);
        let default = TenantRule { fallback: config.fallback, platform_domain: platform.clone() };
        let tenants = config
            .tenants
            .iter()
            .map(|(name, t)| {
                let rule = TenantRule {
                    fallback: t.fallback.unwrap_or(config.fallback),
                    platform_domain: t.platform_domain.as_deref().map(normalize_domain).or_else(|| platform.clone()),
                };
                (name.clone(), rule)
            })
            .collect();
        DkimPolicy { domains, default, tenants }
    }

    /// Whether some tenant's mail can be refused (only then is an admission check needed).
    pub fn may_refuse(&self) -> bool {
        self.default.fallback == Fallback::Refuse || self.tenants.values().any(|t| t.fallback == Fallback::Refuse)
    }

    /// The From: domain signs when it, or a parent domain (still aligned under DMARC's
    /// relaxed mode), has a key the tenant may use; otherwise the tenant's fallback applies.
    pub fn decide(&self, tenant: &str, facts: &HeaderFacts) -> Decision {
        if let Some(from) = &facts.from_domain {
            let mut candidate = from.as_str();
            loop {
                if self.domains.get(candidate).is_some_and(|u| u.allows(tenant)) {
                    return Decision::Sign { domain: candidate.to_string() };
                }
                match candidate.split_once('.') {
                    // Stop before the top-level domain: nobody signs as "com".
                    Some((_, parent)) if parent.contains('.') => candidate = parent,
                    _ => break,
                }
            }
        }
        let rule = self.tenants.get(tenant).unwrap_or(&self.default);
        match (rule.fallback, &rule.platform_domain) {
            (Fallback::Unsigned, _) => Decision::Unsigned,
            (Fallback::Platform, Some(d)) => Decision::Sign { domain: d.clone() },
            // Validation requires a platform domain for this fallback.
            (Fallback::Platform, None) => Decision::Unsigned,
            (Fallback::Refuse, _) => Decision::Refuse(match &facts.from_domain {
                Some(d) => format!(
                    "The from address domain {d} has no DKIM signing key for this account, and this account may not send unsigned mail. Use a from address at a domain with a key, or ask the operator to add a key for {d}."
                ),
                None => "The message has no From address with a domain, so it cannot be DKIM-signed, and this account may not send unsigned mail.".to_string(),
            }),
        }
    }

    /// The admission check of the edge: `Err` with the client-facing reason when the
    /// message would be refused.
    pub fn admit(&self, tenant: &str, message: &[u8]) -> Result<(), String> {
        match self.decide(tenant, &HeaderFacts::read(message)) {
            Decision::Refuse(reason) => Err(reason),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dkim::config::{DkimKeyConfig, TenantDkimConfig};

    fn key(domain: &str, tenants: &[&str]) -> DkimKeyConfig {
        DkimKeyConfig {
            domain: domain.into(),
            selector: "s1".into(),
            private_key: "k.pem".into(),
            tenants: tenants.iter().map(|t| t.to_string()).collect(),
        }
    }

    fn facts(from: &str) -> HeaderFacts {
        HeaderFacts::read(format!("From: Someone <{from}>\r\nSubject: x\r\n\r\nbody\r\n").as_bytes())
    }

    fn config() -> DkimConfig {
        let mut c = DkimConfig {
            keys: vec![key("brand.example", &[]), key("esp.example.net", &[]), key("private.example", &["apikey:owner"])],
            fallback: Fallback::Platform,
            platform_domain: Some("esp.example.net".into()),
            ..DkimConfig::default()
        };
        c.tenants.insert("apikey:strict".into(), TenantDkimConfig { fallback: Some(Fallback::Refuse), platform_domain: None });
        c.tenants.insert("apikey:plain".into(), TenantDkimConfig { fallback: Some(Fallback::Unsigned), platform_domain: None });
        c.validate().unwrap();
        c
    }

    #[test]
    fn reads_from_domain_and_present_headers() {
        let f = HeaderFacts::read(
            b"Received: x\r\nfrom: \"A, B\" <a@Mail.Brand.Example.>\r\nTO: b@c.d\r\nList-Unsubscribe: <mailto:u@x>\r\n\r\nFrom: not@this.one\r\n",
        );
        assert_eq!(f.from_domain.as_deref(), Some("mail.brand.example"));
        assert_eq!(f.present, ["From", "To", "List-Unsubscribe"]);
        assert_eq!(HeaderFacts::read(b"Subject: none\r\n\r\n").from_domain, None);
    }

    #[test]
    fn the_from_domain_or_a_parent_signs_when_it_has_a_key() {
        let p = DkimPolicy::from_config(&config());
        assert_eq!(p.decide("apikey:any", &facts("a@brand.example")), Decision::Sign { domain: "brand.example".into() });
        assert_eq!(p.decide("apikey:any", &facts("a@news.brand.example")), Decision::Sign { domain: "brand.example".into() });
        // Even a strict tenant signs with its own domain's key.
        assert_eq!(p.decide("apikey:strict", &facts("a@brand.example")), Decision::Sign { domain: "brand.example".into() });
    }

    #[test]
    fn keys_restricted_to_tenants_sign_only_their_mail() {
        let p = DkimPolicy::from_config(&config());
        assert_eq!(p.decide("apikey:owner", &facts("a@private.example")), Decision::Sign { domain: "private.example".into() });
        assert_eq!(p.decide("apikey:other", &facts("a@private.example")), Decision::Sign { domain: "esp.example.net".into() });
    }

    #[test]
    fn fallbacks_apply_per_tenant() {
        let p = DkimPolicy::from_config(&config());
        assert_eq!(p.decide("apikey:any", &facts("a@unknown.example")), Decision::Sign { domain: "esp.example.net".into() });
        assert_eq!(p.decide("apikey:plain", &facts("a@unknown.example")), Decision::Unsigned);
        let Decision::Refuse(why) = p.decide("apikey:strict", &facts("a@unknown.example")) else { panic!("refused") };
        assert!(why.contains("unknown.example"), "{why}");
        assert!(p.may_refuse());
        assert!(p.admit("apikey:strict", b"From: a@unknown.example\r\n\r\nx").is_err());
        assert!(p.admit("apikey:strict", b"From: a@brand.example\r\n\r\nx").is_ok());
        assert!(p.admit("apikey:strict", b"Subject: no from\r\n\r\nx").is_err());
        assert!(!DkimPolicy::from_config(&DkimConfig::default()).may_refuse());
        assert_eq!(DkimPolicy::from_config(&DkimConfig::default()).decide("t", &facts("a@b.example")), Decision::Unsigned);
    }

    #[test]
    fn a_tenant_signs_with_its_own_platform_domain() {
        // [dkim] itself sends unsigned; two tenants sign with a reseller's platform domain
        // (written as configured, in any case and with a trailing dot)
        let mut c = config();
        c.fallback = Fallback::Unsigned;
        c.platform_domain = None;
        c.keys.push(key("reseller.example", &["apikey:reseller", "apikey:own-fallback"]));
        c.tenants.insert("apikey:reseller".into(), TenantDkimConfig { fallback: Some(Fallback::Platform), platform_domain: Some("Reseller.Example.".into()) });
        c.tenants.insert("apikey:own-fallback".into(), TenantDkimConfig { fallback: Some(Fallback::Platform), platform_domain: Some("reseller.example".into()) });
        c.validate().unwrap();
        let p = DkimPolicy::from_config(&c);
        let reseller = Decision::Sign { domain: "reseller.example".into() };
        assert_eq!(p.decide("apikey:reseller", &facts("a@unknown.example")), reseller);
        assert_eq!(p.decide("apikey:own-fallback", &facts("a@unknown.example")), reseller);
        assert_eq!(p.decide("apikey:reseller", &HeaderFacts::read(b"Subject: no from\r\n\r\nx")), reseller, "no From: the platform domain still signs");
        // the From: domain's own key comes first; other tenants keep [dkim]'s fallback
        assert_eq!(p.decide("apikey:reseller", &facts("a@brand.example")), Decision::Sign { domain: "brand.example".into() });
        assert_eq!(p.decide("apikey:someone-else", &facts("a@unknown.example")), Decision::Unsigned);
    }

    #[test]
    fn a_tenant_inherits_the_platform_fallback_with_its_own_domain() {
        let mut c = config();
        c.keys.push(key("reseller.example", &[]));
        c.tenants.insert("apikey:reseller".into(), TenantDkimConfig { fallback: None, platform_domain: Some("reseller.example".into()) });
        c.validate().unwrap();
        let p = DkimPolicy::from_config(&c);
        assert_eq!(p.decide("apikey:reseller", &facts("a@unknown.example")), Decision::Sign { domain: "reseller.example".into() });
        assert_eq!(p.decide("apikey:any", &facts("a@unknown.example")), Decision::Sign { domain: "esp.example.net".into() });
    }

    #[test]
    fn a_tenant_platform_domain_without_a_key_is_refused_naming_the_tenant() {
        let mut c = config();
        c.tenants.insert("smtp:billing".into(), TenantDkimConfig { fallback: Some(Fallback::Platform), platform_domain: Some("nokey.example".into()) });
        let e = c.validate().unwrap_err();
        assert_eq!(e, "tenants.\"smtp:billing\".platform_domain: \"nokey.example\" has no key in [[dkim.keys]]");
        // also when the tenant does not use it yet (fallback unsigned): the config is wrong either way
        let mut c = config();
        c.tenants.insert("net:10.1.2.3".into(), TenantDkimConfig { fallback: Some(Fallback::Unsigned), platform_domain: Some("nokey.example".into()) });
        assert!(c.validate().unwrap_err().starts_with("tenants.\"net:10.1.2.3\".platform_domain:"));
    }

    #[test]
    fn top_level_domains_never_match() {
        let c = DkimConfig { keys: vec![key("example", &[])], ..DkimConfig::default() };
        // "example" alone is refused by validation; even if configured, "a@x.example" must
        // not walk up to it.
        let p = DkimPolicy::from_config(&c);
        assert_eq!(p.decide("t", &facts("a@x.example")), Decision::Unsigned);
    }
}
