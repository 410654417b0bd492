//! Egress: the source IPs mail leaves from, grouped in named pools. A message names its pool
//! (`ip_pool_name` over HTTP, `ip_pool` in SMTP's `X-SMTPAPI` header), or gets its tenant's
//! pool, or the default one; within a pool, each message picks a source by weight.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use rand::Rng;
use serde::Deserialize;
use sluice_spool::MessageMeta;

use crate::config::is_hostname;

/// `[mta.egress]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EgressConfig {
    /// The pool for mail that names none and whose tenant has none; default: the only pool,
    /// or, without pools, one source that lets the OS choose the address.
    pub default_pool: Option<String>,
    /// Named pools of source IPs.
    pub pools: BTreeMap<String, PoolConfig>,
    /// Tenant (`apikey:<name>`, `smtp:<user>`, ...) → its default pool.
    pub tenants: BTreeMap<String, String>,
}

/// `[mta.egress.pools.NAME]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub sources: Vec<SourceConfig>,
}

/// One source IP of a pool.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// The local address connections are made from (it must be an address of this machine).
    pub ip: IpAddr,
    /// The EHLO name for this IP: the name its PTR record points to. Default: `mta.ehlo_hostname`.
    pub ehlo: Option<String>,
    /// Share of the pool's mail, relative to the other sources (default 1).
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// Where connections come from.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Source {
    /// The IP as text, or `default` for the unbound source; keys shaping data and metrics.
    pub id: Arc<str>,
    /// The address to bind before connecting; `None` lets the OS choose.
    pub bind: Option<IpAddr>,
    pub ehlo: String,
}

#[derive(Debug)]
struct Pool {
    sources: Vec<(Arc<Source>, u32)>,
    total_weight: u32,
}

/// The pools, ready to choose from.
#[derive(Debug)]
pub struct Egress {
    pools: HashMap<String, Pool>,
    default_pool: String,
    tenants: HashMap<String, String>,
}

/// The id of the source that lets the OS choose the address.
pub const DEFAULT_SOURCE: &str = "default";

impl EgressConfig {
    /// Checks every key; errors name the key relative to `[mta.egress]`.
    pub fn validate(&self) -> Result<(), String> {
        let mut ehlo_of: HashMap<IpAddr, (&str, String)> = HashMap::new();
        for (name, pool) in &self.pools {
            if pool.sources.is_empty() {
                return Err(format!("egress.pools.{name}.sources: a pool needs at least one source"));
            }
            for (i, s) in pool.sources.iter().enumerate() {
                let key = format!("egress.pools.{name}.sources[{i}]");
                if s.weight == 0 {
                    return Err(format!("{key}.weight: must be at least 1 (remove the source to stop using it)"));
                }
                if let Some(e) = &s.ehlo {
                    if !is_hostname(e) {
                        return Err(format!("{key}.ehlo: {e:?} is not a valid host name"));
                    }
                }
                let ehlo = s.ehlo.clone().unwrap_or_default();
                if let Some((other, prev)) = ehlo_of.insert(s.ip, (name.as_str(), ehlo.clone())) {
                    if prev != ehlo {
                        return Err(format!("{key}.ehlo: {} has another EHLO name in pool {other:?}; one IP has one name", s.ip));
                    }
                }
            }
        }
        if let Some(d) = &self.default_pool {
            if !self.pools.contains_key(d) {
                return Err(format!("egress.default_pool: no pool named {d:?} (defined: {})", names(&self.pools)));
            }
        } else if self.pools.len() > 1 {
            return Err(format!("egress.default_pool: several pools are defined ({}); say which one is the default", names(&self.pools)));
        }
        for (tenant, pool) in &self.tenants {
            if !self.pools.contains_key(pool) {
                return Err(format!("egress.tenants.\"{tenant}\": no pool named {pool:?} (defined: {})", names(&self.pools)));
            }
        }
        Ok(())
    }

    /// Checks that every source IP is an address of this machine (bind fails otherwise).
    pub fn check_addresses(&self) -> Result<(), String> {
        for (name, pool) in &self.pools {
            for (i, s) in pool.sources.iter().enumerate() {
                std::net::TcpListener::bind(SocketAddr::new(s.ip, 0)).map_err(|e| {
                    format!("egress.pools.{name}.sources[{i}].ip: cannot send from {}: {e} (is it an address of this machine?)", s.ip)
                })?;
            }
        }
        Ok(())
    }
}

fn names<V>(m: &BTreeMap<String, V>) -> String {
    if m.is_empty() {
        return "none".into();
    }
    m.keys().map(|k| format!("{k:?}")).collect::<Vec<_>>().join(", ")
}

impl Egress {
    /// Builds the pools of a validated config. Without pools there is one, `default`, with
    /// one source that binds nothing.
    pub fn new(config: &EgressConfig, ehlo_hostname: &str) -> Egress {
        let mut shared: HashMap<IpAddr, Arc<Source>> = HashMap::new();
        let mut pools = HashMap::new();
        for (name, pool) in &config.pools {
            let sources: Vec<(Arc<Source>, u32)> = pool
                .sources
                .iter()
                .map(|s| {
                    let source = shared
                        .entry(s.ip)
                        .or_insert_with(|| {
                            Arc::new(Source {
                                id: s.ip.to_string().into(),
                                bind: Some(s.ip),
                                ehlo: s.ehlo.clone().unwrap_or_else(|| ehlo_hostname.to_string()),
                            })
                        })
                        .clone();
                    (source, s.weight)
                })
                .collect();
            let total_weight = sources.iter().map(|(_, w)| w).sum();
            pools.insert(name.clone(), Pool { sources, total_weight });
        }
        let default_pool = match (&config.default_pool, config.pools.keys().next()) {
            (Some(d), _) => d.clone(),
            (None, Some(only)) => only.clone(),
            (None, None) => {
                let source = Arc::new(Source { id: DEFAULT_SOURCE.into(), bind: None, ehlo: ehlo_hostname.to_string() });
                pools.insert(DEFAULT_SOURCE.to_string(), Pool { sources: vec![(source, 1)], total_weight: 1 });
                DEFAULT_SOURCE.to_string()
            }
        };
        let tenants = config.tenants.iter().map(|(t, p)| (t.clone(), p.clone())).collect();
        Egress { pools, default_pool, tenants }
    }

    /// The pool a message uses: the one it names if it exists, else its tenant's, else the
    /// default. Returns the pool's name and whether the message named a pool that does not exist.
    pub fn pool_of(&self, meta: &MessageMeta) -> (&str, bool) {
        let named = meta.ip_pool.as_deref().filter(|p| !p.is_empty());
        if let Some((name, _)) = named.and_then(|p| self.pools.get_key_value(p)) {
            return (name, false);
        }
        let fallback = self.tenants.get(&meta.tenant).unwrap_or(&self.default_pool);
        (fallback.as_str(), named.is_some())
    }

    /// A source of `pool`, chosen by weight.
    pub fn choose(&self, pool: &str) -> Arc<Source> {
        let pool = self.pools.get(pool).unwrap_or_else(|| &self.pools[&self.default_pool]);
        if pool.sources.len() == 1 {
            return pool.sources[0].0.clone();
        }
        let mut pick = rand::rng().random_range(0..pool.total_weight);
        for (source, w) in &pool.sources {
            if pick < *w {
                return source.clone();
            }
            pick -= w;
        }
        pool.sources[pool.sources.len() - 1].0.clone()
    }

    /// Every source of every pool, once.
    pub fn sources(&self) -> Vec<Arc<Source>> {
        let mut all: Vec<Arc<Source>> = Vec::new();
        for pool in self.pools.values() {
            for (s, _) in &pool.sources {
                if !all.iter().any(|a| a.id == s.id) {
                    all.push(s.clone());
                }
            }
        }
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// The sources of one pool with their weights (for `explain`).
    pub fn pool_sources(&self, pool: &str) -> Vec<(Arc<Source>, u32)> {
        self.pools.get(pool).map(|p| p.sources.clone()).unwrap_or_default()
    }

    pub fn default_pool(&self) -> &str {
        &self.default_pool
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(toml_text: &str) -> EgressConfig {
        toml::from_str(toml_text).unwrap()
    }

    fn meta(pool: Option<&str>, tenant: &str) -> MessageMeta {
        MessageMeta {
            id: sluice_spool::MessageId::new(),
            queue: "example.com".into(),
            tenant: tenant.into(),
            mail_from: String::new(),
            recipients: Vec::new(),
            x_message_id: String::new(),
            smtp_id: String::new(),
            categories: Vec::new(),
            custom_args: Default::default(),
            ip_pool: pool.map(String::from),
            created_at: 0,
            due_at: 0,
            expires_at: 0,
            attempts: 0,
            last_reply: None,
            prepend_headers: None,
        }
    }

    const TWO_POOLS: &str = r#"
        default_pool = "bulk"
        [pools.bulk]
        sources = [{ ip = "127.0.0.2", ehlo = "a.example.com", weight = 3 }, { ip = "127.0.0.3", ehlo = "b.example.com" }]
        [pools.transactional]
        sources = [{ ip = "127.0.0.4" }]
        [tenants]
        "apikey:shop" = "transactional"
    "#;

    #[test]
    fn a_message_gets_its_pool_its_tenants_or_the_default() {
        let c = config(TWO_POOLS);
        c.validate().unwrap();
        let e = Egress::new(&c, "mta.example.com");
        assert_eq!(e.pool_of(&meta(Some("transactional"), "x")), ("transactional", false));
        assert_eq!(e.pool_of(&meta(None, "apikey:shop")), ("transactional", false));
        assert_eq!(e.pool_of(&meta(None, "apikey:other")), ("bulk", false));
        assert_eq!(e.pool_of(&meta(Some("nonexistent"), "apikey:other")), ("bulk", true));
        assert_eq!(e.choose("transactional").ehlo, "mta.example.com", "the EHLO name defaults to mta.ehlo_hostname");
    }

    #[test]
    fn sources_are_chosen_by_weight() {
        let e = Egress::new(&config(TWO_POOLS), "mta.example.com");
        let n = 20_000;
        let a = (0..n).filter(|_| &*e.choose("bulk").id == "127.0.0.2").count();
        // weight 3 of 4: 75%; 20,000 draws stay within a few tenths of a percent of it
        let share = a as f64 / n as f64;
        assert!((0.72..0.78).contains(&share), "share of the weight-3 source: {share}");
        assert_eq!(e.sources().len(), 3);
    }

    #[test]
    fn without_pools_one_unbound_source() {
        let e = Egress::new(&EgressConfig::default(), "mta.example.com");
        let s = e.choose(e.default_pool());
        assert_eq!((&*s.id, s.bind, s.ehlo.as_str()), (DEFAULT_SOURCE, None, "mta.example.com"));
    }

    #[test]
    fn mistakes_name_their_key() {
        let err = |t: &str| config(t).validate().unwrap_err();
        assert!(err(r#"default_pool = "nope""#).starts_with("egress.default_pool: no pool named \"nope\""));
        assert!(err("[pools.a]\nsources = []").starts_with("egress.pools.a.sources:"));
        assert!(err("[pools.a]\nsources = [{ ip = \"127.0.0.2\", weight = 0 }]").starts_with("egress.pools.a.sources[0].weight:"));
        assert!(err("[pools.a]\nsources = [{ ip = \"127.0.0.2\" }]\n[pools.b]\nsources = [{ ip = \"127.0.0.3\" }]")
            .starts_with("egress.default_pool: several pools"));
        assert!(err("[pools.a]\nsources = [{ ip = \"127.0.0.2\" }]\n[tenants]\n\"apikey:x\" = \"b\"").starts_with("egress.tenants.\"apikey:x\""));
        assert!(err(
            "default_pool = \"a\"\n[pools.a]\nsources = [{ ip = \"127.0.0.2\", ehlo = \"x.example\" }]\n[pools.b]\nsources = [{ ip = \"127.0.0.2\", ehlo = \"y.example\" }]"
        )
        .contains("one IP has one name"));
        assert!(toml::from_str::<EgressConfig>("[pools.a]\nsources = [{ ip = \"not-an-ip\" }]").is_err());
    }

    #[test]
    fn an_address_of_another_machine_is_refused() {
        let c = config("[pools.a]\nsources = [{ ip = \"192.0.2.77\" }]");
        c.validate().unwrap();
        let e = c.check_addresses().unwrap_err();
        assert!(e.starts_with("egress.pools.a.sources[0].ip: cannot send from 192.0.2.77"), "{e}");
        config("[pools.a]\nsources = [{ ip = \"127.0.0.2\" }]").check_addresses().unwrap();
    }
}
