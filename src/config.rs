//! The `sluice.toml` configuration: one section per component, each validated by the
//! component itself. A bad file refuses to start and names the key and the reason.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use sluice_edge::ApiKeyConfig;

/// Which parts of sluice this process runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Edge (HTTP + SMTP ingestion) and MTA (delivery) in one process.
    #[default]
    All,
    /// Ingestion only: accept mail into the spool.
    Edge,
    /// Delivery only: pull from the spool and deliver.
    Mta,
}

impl Role {
    pub fn runs_edge(self) -> bool {
        matches!(self, Role::All | Role::Edge)
    }
    pub fn runs_mta(self) -> bool {
        matches!(self, Role::All | Role::Mta)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the local spool, the event log and generated files live.
    pub data_dir: PathBuf,
    /// What this process runs (the `--role` flag overrides it).
    pub role: Role,
    pub spool: SpoolConfig,
    pub events: EventsConfig,
    pub admin: AdminConfig,
    /// API keys accepted by the HTTP API and by SMTP AUTH (user `apikey`).
    pub api_keys: Vec<ApiKeyConfig>,
    pub http: sluice_edge::http::HttpConfig,
    pub smtp: sluice_edge::smtp::SmtpConfig,
    pub mta: sluice_mta::MtaConfig,
    /// The reply-classification table (docs/rules.md).
    pub rules: sluice_rules::RulesConfig,
    /// DKIM signing keys and the policy for mail without a key (used by the MTA to sign and
    /// by the edge to refuse unsignable mail).
    pub dkim: sluice_mta::dkim::DkimConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./sluice-data"),
            role: Role::All,
            spool: SpoolConfig::default(),
            events: EventsConfig::default(),
            admin: AdminConfig::default(),
            api_keys: Vec::new(),
            http: Default::default(),
            smtp: Default::default(),
            mta: Default::default(),
            rules: Default::default(),
            dkim: Default::default(),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// The backend, pool and conf in one setting (what `serve --spool` sets):
    /// `rados://POOL?conf=/etc/ceph/ceph.conf[&user=NAME][&namespace=NS]`, or `local`.
    /// Use it instead of `backend` + `rados.conf` + `rados.pool`.
    pub url: Option<String>,
    /// `local` (an embedded store under data_dir, the default) or `rados` (a Ceph pool shared
    /// by many nodes).
    pub backend: Option<SpoolBackend>,
    /// Directory of the local spool; default `<data_dir>/spool`.
    pub path: Option<PathBuf>,
    /// The Ceph cluster and pool, for the RADOS backend.
    pub rados: RadosConfig,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpoolBackend {
    #[default]
    Local,
    Rados,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RadosConfig {
    /// The cluster's ceph.conf (its keyring is found through it).
    pub conf: Option<PathBuf>,
    /// The pool holding the spool (default `sluice`); every edge and MTA of one deployment
    /// names the same pool.
    pub pool: Option<String>,
    /// The cephx user, without `client.` (default `admin`).
    pub user: Option<String>,
    /// A RADOS namespace inside the pool (to run several spools in one pool).
    pub namespace: Option<String>,
    /// Index shards, fixed when the pool is first used; more shards spread work over more MTAs.
    pub shards: u32,
    /// Every RADOS operation fails after this long instead of hanging on an unhealthy cluster.
    #[serde(with = "humantime_serde")]
    pub op_timeout: Duration,
    /// How long an MTA's shard locks last without renewal: the take-over time after a crash.
    #[serde(with = "humantime_serde")]
    pub shard_lease: Duration,
    /// Bodies up to this many bytes live inside their index entry (no RADOS object per
    /// message); larger ones are objects of their own.
    pub inline_body_max: usize,
    /// How often an MTA sweeps its shards for orphans (0s = never).
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// Only orphans older than this are removed: longer than any enqueue can take.
    #[serde(with = "humantime_serde")]
    pub orphan_age: Duration,
}

impl Default for RadosConfig {
    fn default() -> Self {
        RadosConfig {
            conf: None,
            pool: None,
            user: None,
            namespace: None,
            shards: 16,
            op_timeout: Duration::from_secs(10),
            shard_lease: Duration::from_secs(15),
            inline_body_max: 64 * 1024,
            sweep_interval: Duration::from_secs(600),
            orphan_age: Duration::from_secs(600),
        }
    }
}

/// Where the spool lives, with `spool.url` or the separate keys resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpoolTarget {
    Local,
    Rados(RadosTarget),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RadosTarget {
    pub conf: PathBuf,
    pub pool: String,
    pub user: String,
    pub namespace: Option<String>,
}

/// The parts of a spool URL; user and namespace are optional.
#[derive(Debug, PartialEq, Eq)]
enum SpoolUrl {
    Local,
    Rados { pool: String, conf: PathBuf, user: Option<String>, namespace: Option<String> },
}

const SPOOL_URL_FORMS: &str = "rados://POOL?conf=/etc/ceph/ceph.conf (optionally &user=NAME&namespace=NS), or local";

/// Parses a spool URL (`spool.url`, `serve --spool`); the error says what is wrong.
fn parse_spool_url(text: &str) -> Result<SpoolUrl, String> {
    if text == "local" {
        return Ok(SpoolUrl::Local);
    }
    let url = url::Url::parse(text).map_err(|e| format!("{text:?} is not a spool URL ({e}); expected {SPOOL_URL_FORMS}"))?;
    if url.scheme() != "rados" {
        return Err(format!("unknown spool scheme {:?}; expected {SPOOL_URL_FORMS}", url.scheme()));
    }
    let pool = url.host_str().unwrap_or_default();
    if pool.is_empty() {
        return Err(format!("{text:?} names no pool; expected {SPOOL_URL_FORMS}"));
    }
    if !url.username().is_empty() || url.password().is_some() || url.port().is_some() || !matches!(url.path(), "" | "/") || url.fragment().is_some() {
        return Err(format!("{text:?}: only a pool and the query parameters conf, user and namespace are allowed; expected {SPOOL_URL_FORMS}"));
    }
    let (mut conf, mut user, mut namespace) = (None, None, None);
    for (key, value) in url.query_pairs() {
        let slot = match &*key {
            "conf" => &mut conf,
            "user" => &mut user,
            "namespace" => &mut namespace,
            other => return Err(format!("unknown parameter {other:?} in {text:?}; expected {SPOOL_URL_FORMS}")),
        };
        if value.is_empty() {
            return Err(format!("parameter {key} is empty in {text:?}"));
        }
        if slot.replace(value.into_owned()).is_some() {
            return Err(format!("parameter {key} given twice in {text:?}"));
        }
    }
    let conf = conf.ok_or_else(|| format!("{text:?} has no conf parameter (the path of the cluster's ceph.conf); expected {SPOOL_URL_FORMS}"))?;
    Ok(SpoolUrl::Rados { pool: pool.to_string(), conf: PathBuf::from(conf), user, namespace })
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// The JSONL event log; default `<data_dir>/events.jsonl`.
    pub path: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Where `/metrics` and `/healthz` are served. Keep it private.
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig { listen: "127.0.0.1:9025".parse().expect("literal") }
    }
}

/// A configuration error: which key, and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config key {key}: {reason}")]
    Invalid { key: String, reason: String },
}

impl Config {
    /// Reads and validates a config file (or the defaults).
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let config = Self::read(path)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads a config file without validating it (to apply command-line overrides first).
    pub fn read(path: Option<&Path>) -> Result<Config, ConfigError> {
        Ok(match path {
            None => Config::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
                Self::parse(&text).map_err(|e| match e {
                    ConfigError::Parse { message, .. } => ConfigError::Parse { path: path.to_path_buf(), message },
                    other => other,
                })?
            }
        })
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse { path: PathBuf::new(), message: e.to_string() })
    }

    /// Runs every component's own validation and prefixes its key with the section name.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn section(name: &str, r: Result<(), String>) -> Result<(), ConfigError> {
            r.map_err(|msg| match msg.split_once(": ") {
                Some((key, reason)) => ConfigError::Invalid { key: format!("{name}.{key}"), reason: reason.to_string() },
                None => ConfigError::Invalid { key: name.to_string(), reason: msg },
            })
        }
        section("http", self.http.validate())?;
        section("smtp", self.smtp.validate())?;
        section("mta", self.mta.validate())?;
        section("rules", self.rules.validate())?;
        section("dkim", self.dkim.validate())?;
        sluice_edge::ApiKeys::from_config(&self.api_keys)
            .map_err(|e| ConfigError::Invalid { key: format!("api_keys[{}].{}", e.index, e.field), reason: e.reason })?;
        if let SpoolTarget::Rados(_) = self.spool_target()? {
            let r = &self.spool.rados;
            let invalid = |key: &str, reason: &str| ConfigError::Invalid { key: format!("spool.rados.{key}"), reason: reason.into() };
            if !(1..=4096).contains(&r.shards) {
                return Err(invalid("shards", "must be between 1 and 4096"));
            }
            if r.op_timeout.as_secs() < 1 {
                return Err(invalid("op_timeout", "must be at least 1s"));
            }
            if r.inline_body_max > 16 << 20 {
                return Err(invalid("inline_body_max", "must be at most 16 MiB (larger omap values strain the OSDs)"));
            }
            if r.shard_lease.as_secs() < 2 {
                return Err(invalid("shard_lease", "must be at least 2s"));
            }
            if !r.sweep_interval.is_zero() && r.sweep_interval < Duration::from_secs(60) {
                return Err(invalid("sweep_interval", "must be 0s (never sweep) or at least 1m: a sweep lists every body object of the pool"));
            }
            if r.orphan_age < Duration::from_secs(60) || r.orphan_age < 10 * r.op_timeout {
                return Err(invalid(
                    "orphan_age",
                    "must be at least 1m and 10 × op_timeout: younger objects may belong to an enqueue still in flight",
                ));
            }
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::Invalid { key: "data_dir".into(), reason: "must not be empty".into() });
        }
        Ok(())
    }

    /// The spool this config names: `spool.url`, or `spool.backend` with `[spool.rados]`.
    /// Names the key that is missing, malformed or contradicts another.
    pub fn spool_target(&self) -> Result<SpoolTarget, ConfigError> {
        let invalid = |key: &str, reason: String| ConfigError::Invalid { key: key.into(), reason };
        let s = &self.spool;
        let r = &s.rados;
        if let Some(text) = &s.url {
            let parsed = parse_spool_url(text).map_err(|e| invalid("spool.url", e))?;
            let also = |key: &str, set: bool| match set {
                true => Err(invalid(key, "set together with spool.url, which already names the spool: keep one of them".into())),
                false => Ok(()),
            };
            also("spool.backend", s.backend.is_some())?;
            also("spool.rados.conf", r.conf.is_some())?;
            also("spool.rados.pool", r.pool.is_some())?;
            return match parsed {
                SpoolUrl::Local => {
                    also("spool.rados.user", r.user.is_some())?;
                    also("spool.rados.namespace", r.namespace.is_some())?;
                    Ok(SpoolTarget::Local)
                }
                SpoolUrl::Rados { pool, conf, user, namespace } => {
                    also("spool.rados.user", user.is_some() && r.user.is_some())?;
                    also("spool.rados.namespace", namespace.is_some() && r.namespace.is_some())?;
                    Ok(SpoolTarget::Rados(RadosTarget {
                        conf,
                        pool,
                        user: user.or_else(|| r.user.clone()).unwrap_or_else(|| "admin".into()),
                        namespace: namespace.or_else(|| r.namespace.clone()),
                    }))
                }
            };
        }
        match s.backend.unwrap_or_default() {
            SpoolBackend::Local => {
                if r.conf.is_some() {
                    return Err(invalid(
                        "spool.rados.conf",
                        "set, but the spool is local (spool.backend is not \"rados\"): add spool.backend = \"rados\", or name the spool in one key with spool.url = \"rados://POOL?conf=PATH\", or remove it".into(),
                    ));
                }
                Ok(SpoolTarget::Local)
            }
            SpoolBackend::Rados => {
                let conf = r.conf.clone().ok_or_else(|| {
                    invalid("spool.rados.conf", "required with spool.backend = \"rados\": the path of the cluster's ceph.conf".into())
                })?;
                let pool = r.pool.clone().unwrap_or_else(|| "sluice".into());
                if pool.is_empty() {
                    return Err(invalid("spool.rados.pool", "must not be empty".into()));
                }
                if r.user.as_ref().is_some_and(|u| u.is_empty()) {
                    return Err(invalid("spool.rados.user", "must not be empty".into()));
                }
                Ok(SpoolTarget::Rados(RadosTarget {
                    conf,
                    pool,
                    user: r.user.clone().unwrap_or_else(|| "admin".into()),
                    namespace: r.namespace.clone(),
                }))
            }
        }
    }

    /// Applies `serve --spool URL`: it names the spool and replaces what the file says about
    /// backend, pool and conf (user and namespace from the file still apply unless the URL
    /// names them).
    pub fn set_spool_url(&mut self, text: &str) -> Result<(), ConfigError> {
        let parsed = parse_spool_url(text).map_err(|reason| ConfigError::Invalid { key: "--spool".into(), reason })?;
        let s = &mut self.spool;
        s.url = None;
        s.rados.conf = None;
        s.rados.pool = None;
        match parsed {
            SpoolUrl::Local => s.backend = Some(SpoolBackend::Local),
            SpoolUrl::Rados { pool, conf, user, namespace } => {
                s.backend = Some(SpoolBackend::Rados);
                s.rados.conf = Some(conf);
                s.rados.pool = Some(pool);
                s.rados.user = user.or(s.rados.user.take());
                s.rados.namespace = namespace.or(s.rados.namespace.take());
            }
        }
        Ok(())
    }

    pub fn spool_path(&self) -> PathBuf {
        self.spool.path.clone().unwrap_or_else(|| self.data_dir.join("spool"))
    }

    pub fn events_path(&self) -> PathBuf {
        self.events.path.clone().unwrap_or_else(|| self.data_dir.join("events.jsonl"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(text: &str) -> Result<SpoolTarget, ConfigError> {
        let config = Config::parse(text)?;
        config.validate()?;
        config.spool_target()
    }

    /// The key a config error names (and its reason, for the message checks).
    fn invalid(r: Result<SpoolTarget, ConfigError>) -> (String, String) {
        match r {
            Err(ConfigError::Invalid { key, reason }) => (key, reason),
            other => panic!("expected a config error naming a key, got {other:?}"),
        }
    }

    fn rados(pool: &str, conf: &str, user: &str, namespace: Option<&str>) -> SpoolTarget {
        SpoolTarget::Rados(RadosTarget {
            conf: conf.into(),
            pool: pool.into(),
            user: user.into(),
            namespace: namespace.map(str::to_string),
        })
    }

    #[test]
    fn one_spool_url_names_backend_pool_and_conf() {
        assert_eq!(target("").unwrap(), SpoolTarget::Local);
        assert_eq!(target("[spool]\nurl = \"local\"").unwrap(), SpoolTarget::Local);
        assert_eq!(
            target("[spool]\nurl = \"rados://mail?conf=/etc/ceph/ceph.conf\"").unwrap(),
            rados("mail", "/etc/ceph/ceph.conf", "admin", None)
        );
        assert_eq!(
            target("[spool]\nurl = \"rados://Mail_2.x?conf=/etc/ceph/my%20ceph.conf&user=sluice&namespace=prod\"").unwrap(),
            rados("Mail_2.x", "/etc/ceph/my ceph.conf", "sluice", Some("prod"))
        );
        // user and namespace may also come from [spool.rados]
        assert_eq!(
            target("[spool]\nurl = \"rados://mail?conf=c.conf\"\n[spool.rados]\nuser = \"sluice\"\nnamespace = \"ns\"\nshards = 8").unwrap(),
            rados("mail", "c.conf", "sluice", Some("ns"))
        );
        // the separate keys still work
        assert_eq!(
            target("[spool]\nbackend = \"rados\"\n[spool.rados]\nconf = \"/c\"").unwrap(),
            rados("sluice", "/c", "admin", None)
        );
    }

    #[test]
    fn bad_spool_urls_name_the_key_and_the_problem() {
        for (url, says) in [
            ("ceph://mail?conf=/c", "unknown spool scheme \"ceph\""),
            ("rados://?conf=/c", "names no pool"),
            ("rados://mail", "no conf parameter"),
            ("rados://mail?conf=", "parameter conf is empty"),
            ("rados://mail?conf=/a&conf=/b", "parameter conf given twice"),
            ("rados://mail?conf=/c&pool=x", "unknown parameter \"pool\""),
            ("rados://mail/sub?conf=/c", "only a pool"),
            ("rados://u@mail?conf=/c", "only a pool"),
            ("rados://mail:6789?conf=/c", "only a pool"),
            ("/etc/ceph/ceph.conf", "is not a spool URL"),
            ("locall", "is not a spool URL"),
        ] {
            let (key, reason) = invalid(target(&format!("[spool]\nurl = \"{url}\"")));
            assert_eq!(key, "spool.url", "{url}");
            assert!(reason.contains(says), "{url}: {reason}");
            assert!(reason.contains("rados://POOL?conf=") || says.starts_with("parameter"), "{url}: says what is expected: {reason}");
        }
    }

    #[test]
    fn spool_url_and_separate_keys_do_not_mix() {
        let url = "[spool]\nurl = \"rados://mail?conf=/c\"\n";
        for (extra, key) in [
            ("backend = \"rados\"\n", "spool.backend"),
            ("[spool.rados]\nconf = \"/other\"\n", "spool.rados.conf"),
            ("[spool.rados]\npool = \"other\"\n", "spool.rados.pool"),
        ] {
            let (k, reason) = invalid(target(&format!("{url}{extra}")));
            assert_eq!(k, key);
            assert!(reason.contains("spool.url"), "{reason}");
        }
        let (k, _) = invalid(target("[spool]\nurl = \"rados://mail?conf=/c&user=a\"\n[spool.rados]\nuser = \"b\"\n"));
        assert_eq!(k, "spool.rados.user");
        let (k, _) = invalid(target("[spool]\nurl = \"local\"\n[spool.rados]\nnamespace = \"n\"\n"));
        assert_eq!(k, "spool.rados.namespace");
    }

    #[test]
    fn a_ceph_conf_without_the_rados_backend_refuses_to_start() {
        // it used to be ignored silently, leaving the node on a local spool
        let (key, reason) = invalid(target("[spool.rados]\nconf = \"/etc/ceph/ceph.conf\"\npool = \"mail\""));
        assert_eq!(key, "spool.rados.conf");
        assert!(reason.contains("spool.backend = \"rados\"") && reason.contains("spool.url"), "{reason}");
        let (key, _) = invalid(target("[spool]\nbackend = \"local\"\n[spool.rados]\nconf = \"/c\""));
        assert_eq!(key, "spool.rados.conf");
        let (key, reason) = invalid(target("[spool]\nbackend = \"rados\""));
        assert_eq!(key, "spool.rados.conf");
        assert!(reason.contains("required"), "{reason}");
    }

    #[test]
    fn the_spool_flag_replaces_the_files_backend_pool_and_conf() {
        let file = "[spool]\nbackend = \"rados\"\n[spool.rados]\nconf = \"/old.conf\"\npool = \"old\"\nuser = \"sluice\"\nshards = 8";
        let mut config = Config::parse(file).unwrap();
        config.set_spool_url("rados://new?conf=/new.conf").unwrap();
        config.validate().unwrap();
        assert_eq!(config.spool_target().unwrap(), rados("new", "/new.conf", "sluice", None));
        assert_eq!(config.spool.rados.shards, 8, "other [spool.rados] keys still apply");

        let mut config = Config::parse(file).unwrap();
        config.set_spool_url("local").unwrap();
        config.validate().unwrap();
        assert_eq!(config.spool_target().unwrap(), SpoolTarget::Local);

        // the flag also overrides a spool.url in the file, and fixes a stray conf
        let mut config = Config::parse("[spool]\nurl = \"local\"\n[spool.rados]\nconf = \"/x\"").unwrap();
        config.set_spool_url("rados://p?conf=/c&user=u").unwrap();
        config.validate().unwrap();
        assert_eq!(config.spool_target().unwrap(), rados("p", "/c", "u", None));

        let mut config = Config::default();
        match config.set_spool_url("rados://p") {
            Err(ConfigError::Invalid { key, reason }) => {
                assert_eq!(key, "--spool");
                assert!(reason.contains("no conf parameter"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rados_timings_are_validated() {
        let base = "[spool]\nurl = \"rados://p?conf=/c\"\n[spool.rados]\n";
        for (keys, key) in [
            ("sweep_interval = \"30s\"", "spool.rados.sweep_interval"),
            ("orphan_age = \"30s\"", "spool.rados.orphan_age"),
            ("op_timeout = \"10s\"\norphan_age = \"90s\"", "spool.rados.orphan_age"),
            ("shard_lease = \"1s\"", "spool.rados.shard_lease"),
            ("shards = 0", "spool.rados.shards"),
        ] {
            let (k, _) = invalid(target(&format!("{base}{keys}")));
            assert_eq!(k, key, "{keys}");
        }
        assert!(target(&format!("{base}sweep_interval = \"0s\"\norphan_age = \"2m\"\nop_timeout = \"4s\"")).is_ok());
    }

    #[test]
    fn the_example_config_parses_and_is_valid() {
        let config = Config::parse(include_str!("../docs/sluice.example.toml")).unwrap();
        config.validate().unwrap();
        assert_eq!(config.spool_target().unwrap(), SpoolTarget::Local);
    }
}
