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
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpoolBackend {
    #[default]
    Local,
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
        sluice_edge::ApiKeys::from_config(&self.api_keys)
            .map_err(|e| ConfigError::Invalid { key: format!("api_keys[{}].{}", e.index, e.field), reason: e.reason })?;
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
