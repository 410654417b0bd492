//! The `sluice.toml` configuration: one section per component, each validated by the
//! component itself. A bad file refuses to start and names the key and the reason.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

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
    /// `local` (an embedded store under data_dir) or `rados` (a Ceph pool shared by many nodes).
    pub backend: SpoolBackend,
    /// Directory of the local spool; default `<data_dir>/spool`.
    pub path: Option<PathBuf>,
    /// The Ceph cluster and pool, for `backend = "rados"`.
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
    /// The pool holding the spool; every edge and MTA of one deployment names the same pool.
    pub pool: String,
    /// The cephx user, without `client.`.
    pub user: String,
    /// A RADOS namespace inside the pool (to run several spools in one pool).
    pub namespace: Option<String>,
    /// Index shards, fixed when the pool is first used; more shards spread work over more MTAs.
    pub shards: u32,
    /// Every RADOS operation fails after this long instead of hanging on an unhealthy cluster.
    #[serde(with = "humantime_serde")]
    pub op_timeout: std::time::Duration,
    /// How long an MTA's shard locks last without renewal: the take-over time after a crash.
    #[serde(with = "humantime_serde")]
    pub shard_lease: std::time::Duration,
    /// Bodies up to this many bytes live inside their index entry (no RADOS object per
    /// message); larger ones are objects of their own.
    pub inline_body_max: usize,
}

impl Default for RadosConfig {
    fn default() -> Self {
        RadosConfig {
            conf: None,
            pool: "sluice".into(),
            user: "admin".into(),
            namespace: None,
            shards: 16,
            op_timeout: std::time::Duration::from_secs(10),
            shard_lease: std::time::Duration::from_secs(15),
            inline_body_max: 64 * 1024,
        }
    }
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
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let config = match path {
            None => Config::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
                Self::parse(&text).map_err(|e| match e {
                    ConfigError::Parse { message, .. } => ConfigError::Parse { path: path.to_path_buf(), message },
                    other => other,
                })?
            }
        };
        config.validate()?;
        Ok(config)
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
        if self.spool.backend == SpoolBackend::Rados {
            let invalid = |key: &str, reason: &str| ConfigError::Invalid { key: format!("spool.rados.{key}"), reason: reason.into() };
            if self.spool.rados.conf.is_none() {
                return Err(invalid("conf", "required with spool.backend = \"rados\": the path of the cluster's ceph.conf"));
            }
            if self.spool.rados.pool.is_empty() {
                return Err(invalid("pool", "must not be empty"));
            }
            if !(1..=4096).contains(&self.spool.rados.shards) {
                return Err(invalid("shards", "must be between 1 and 4096"));
            }
            if self.spool.rados.op_timeout.as_secs() < 1 {
                return Err(invalid("op_timeout", "must be at least 1s"));
            }
            if self.spool.rados.inline_body_max > 16 << 20 {
                return Err(invalid("inline_body_max", "must be at most 16 MiB (larger omap values strain the OSDs)"));
            }
            if self.spool.rados.shard_lease.as_secs() < 2 {
                return Err(invalid("shard_lease", "must be at least 2s"));
            }
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::Invalid { key: "data_dir".into(), reason: "must not be empty".into() });
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
