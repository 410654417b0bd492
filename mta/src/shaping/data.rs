//! The shaping data: limits per provider and per (provider, egress IP), in TOML files that
//! deliverability people edit like the rules table. Providers themselves are defined once, in
//! the rules data (`[[provider]]`), and only referred to here by id.
//!
//! ```toml
//! [default]                       # every path, unless a provider says otherwise
//! max_connections = 20
//!
//! [provider.yahoo]                # every egress IP sending to Yahoo
//! max_connections = 10
//! message_rate = "3000/min"
//!
//! [provider.yahoo.source."203.0.113.7"]   # this IP to Yahoo (a warming IP, say)
//! message_rate = "500/h"
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sluice_rules::Rate;

use crate::config::TlsMode;

/// The name that stands for the shipped shaping data in configs and on the command line.
pub const DEFAULT_SHAPING: &str = "@default";

const DEFAULT_FILE: &str = include_str!("../../shaping/default.toml");

/// One level of limits as written: every key optional, so the levels merge key by key.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSet {
    /// Connections open at once on the path.
    pub max_connections: Option<u32>,
    /// New connections per period on the path.
    pub connection_rate: Option<Rate>,
    /// Messages (transactions) per period on the path.
    pub message_rate: Option<Rate>,
    pub max_messages_per_connection: Option<u32>,
    pub max_recipients_per_transaction: Option<u32>,
    /// How long a connection waits for more mail before it says QUIT.
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<Duration>,
    pub tls: Option<TlsMode>,
}

impl LimitSet {
    fn validate(&self) -> Result<(), String> {
        for (key, v) in [
            ("max_connections", self.max_connections),
            ("max_messages_per_connection", self.max_messages_per_connection),
            ("max_recipients_per_transaction", self.max_recipients_per_transaction),
        ] {
            if v == Some(0) {
                return Err(format!("{key}: must be at least 1 (to stop sending, suspend the provider instead)"));
            }
        }
        Ok(())
    }

    /// `self` with every key `over` sets replaced.
    fn overlay(&mut self, over: &LimitSet) {
        macro_rules! take {
            ($($f:ident),*) => { $( if over.$f.is_some() { self.$f = over.$f.clone(); } )* };
        }
        take!(max_connections, connection_rate, message_rate, max_messages_per_connection, max_recipients_per_transaction, idle_timeout, tls);
    }
}

/// The limits in force on a path, every key decided.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Limits {
    pub max_connections: u32,
    pub connection_rate: Option<Rate>,
    pub message_rate: Option<Rate>,
    pub max_messages_per_connection: u32,
    pub max_recipients_per_transaction: u32,
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    pub tls: TlsMode,
}

/// Where the value of one limit came from, for `explain`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Origin {
    pub key: &'static str,
    /// `[mta]` (the config file), `[default]`, `[provider.X]`, `[provider.X.source."IP"]`,
    /// or `rule R` for an adaptive throttle.
    pub from: String,
}

/// Limits resolved for one (egress source, provider), with the origin of each value.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Resolved {
    pub limits: Limits,
    pub origins: Vec<Origin>,
}

/// One provider's section.
#[derive(Clone, Debug, Default, PartialEq)]
struct ProviderLimits {
    limits: LimitSet,
    /// Keyed by egress source id (its IP as written, or `default`).
    sources: BTreeMap<String, LimitSet>,
}

/// One shaping file, read.
#[derive(Clone, Debug, PartialEq)]
pub struct ShapingSource {
    pub name: String,
    pub text: String,
}

/// Why shaping data was refused.
#[derive(Debug, thiserror::Error)]
pub enum ShapingDataError {
    #[error("cannot read shaping file {path}: {source} (check mta.shaping.files)")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("shaping file {file}: {reason}")]
    Invalid { file: String, reason: String },
}

/// The merged shaping data of all files, in order (later files override earlier ones key by key).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ShapingData {
    default: LimitSet,
    providers: BTreeMap<String, ProviderLimits>,
    /// Content hash of the files, shown by the admin API after a reload.
    pub version: String,
}

/// Reads `paths` in order; `@default` is the data shipped in the binary.
pub fn read_shaping_sources<P: AsRef<Path>>(paths: &[P]) -> Result<Vec<ShapingSource>, ShapingDataError> {
    paths
        .iter()
        .map(|p| {
            let p = p.as_ref();
            if p.as_os_str() == DEFAULT_SHAPING {
                return Ok(ShapingSource { name: format!("{DEFAULT_SHAPING}/default.toml"), text: DEFAULT_FILE.to_string() });
            }
            std::fs::read_to_string(p)
                .map(|text| ShapingSource { name: p.display().to_string(), text })
                .map_err(|source| ShapingDataError::Read { path: p.to_path_buf(), source })
        })
        .collect()
}

fn invalid(file: &str, reason: impl fmt::Display) -> ShapingDataError {
    ShapingDataError::Invalid { file: file.to_string(), reason: reason.to_string() }
}

/// Deserializes one section, naming it in the error.
fn section<T: serde::de::DeserializeOwned>(file: &str, name: &str, value: toml::Value) -> Result<T, ShapingDataError> {
    T::deserialize(value).map_err(|e| invalid(file, format!("[{name}]: {}", e.message())))
}

impl ShapingData {
    /// Parses and merges `sources`. `known_provider` says whether the rules data defines a
    /// provider id: a section for an unknown one is a typo, and refused (except in the
    /// shipped data, whose sections for providers the rules do not define are skipped).
    pub fn parse(sources: &[ShapingSource], known_provider: &dyn Fn(&str) -> bool) -> Result<ShapingData, ShapingDataError> {
        let mut data = ShapingData::default();
        for src in sources {
            let file = src.name.as_str();
            let doc: toml::Table = toml::from_str(&src.text).map_err(|e| invalid(file, e))?;
            for (key, value) in doc {
                match key.as_str() {
                    "default" => {
                        let set: LimitSet = section(file, "default", value)?;
                        set.validate().map_err(|e| invalid(file, format!("[default] {e}")))?;
                        data.default.overlay(&set);
                    }
                    "provider" => {
                        let toml::Value::Table(providers) = value else {
                            return Err(invalid(file, "provider: expected tables such as [provider.google]"));
                        };
                        for (id, value) in providers {
                            // The shipped data covers the shipped providers; a rules table
                            // without one of them just does not use its limits.
                            if !known_provider(&id) && file.starts_with(DEFAULT_SHAPING) {
                                continue;
                            }
                            if !known_provider(&id) {
                                return Err(invalid(
                                    file,
                                    format!("[provider.{id}]: the rules data defines no provider {id:?} (add a [[provider]] to a rules file, or fix the id)"),
                                ));
                            }
                            let toml::Value::Table(mut table) = value else {
                                return Err(invalid(file, format!("provider.{id}: expected a table")));
                            };
                            let sources = table.remove("source");
                            let set: LimitSet = section(file, &format!("provider.{id}"), toml::Value::Table(table))?;
                            set.validate().map_err(|e| invalid(file, format!("[provider.{id}] {e}")))?;
                            let entry = data.providers.entry(id.clone()).or_default();
                            entry.limits.overlay(&set);
                            if let Some(sources) = sources {
                                let toml::Value::Table(sources) = sources else {
                                    return Err(invalid(file, format!("provider.{id}.source: expected tables such as [provider.{id}.source.\"203.0.113.7\"]")));
                                };
                                for (source, value) in sources {
                                    let name = format!("provider.{id}.source.\"{source}\"");
                                    let set: LimitSet = section(file, &name, value)?;
                                    set.validate().map_err(|e| invalid(file, format!("[{name}] {e}")))?;
                                    entry.sources.entry(source).or_default().overlay(&set);
                                }
                            }
                        }
                    }
                    other => {
                        return Err(invalid(file, format!("unknown section [{other}]; expected [default] or [provider.<id>]")));
                    }
                }
            }
        }
        data.version = version_of(sources);
        Ok(data)
    }

    /// The ids of the providers that have a section.
    pub fn provider_ids(&self) -> impl Iterator<Item = &str> {
        self.providers.keys().map(String::as_str)
    }

    /// The limits for `source` sending to `provider` (`None`: a destination no provider
    /// claims, which gets the default level only), on top of `base` (the `[mta]` config).
    pub fn resolve(&self, base: &Limits, provider: Option<&str>, source: &str) -> Resolved {
        let mut origins: Vec<Origin> = Vec::new();
        let mut limits = base.clone();
        let mut apply = |set: &LimitSet, from: String| {
            let mut set_origin = |key: &'static str| {
                origins.retain(|o| o.key != key);
                origins.push(Origin { key, from: from.clone() });
            };
            if let Some(v) = set.max_connections {
                limits.max_connections = v;
                set_origin("max_connections");
            }
            if let Some(v) = set.connection_rate {
                limits.connection_rate = Some(v);
                set_origin("connection_rate");
            }
            if let Some(v) = set.message_rate {
                limits.message_rate = Some(v);
                set_origin("message_rate");
            }
            if let Some(v) = set.max_messages_per_connection {
                limits.max_messages_per_connection = v;
                set_origin("max_messages_per_connection");
            }
            if let Some(v) = set.max_recipients_per_transaction {
                limits.max_recipients_per_transaction = v;
                set_origin("max_recipients_per_transaction");
            }
            if let Some(v) = set.idle_timeout {
                limits.idle_timeout = v;
                set_origin("idle_timeout");
            }
            if let Some(v) = set.tls {
                limits.tls = v;
                set_origin("tls");
            }
        };
        apply(&self.default, "[default]".into());
        if let Some(p) = provider.and_then(|id| self.providers.get(id).map(|p| (id, p))) {
            apply(&p.1.limits, format!("[provider.{}]", p.0));
            if let Some(set) = p.1.sources.get(source) {
                apply(set, format!("[provider.{}.source.\"{source}\"]", p.0));
            }
        }
        let mut all = Vec::new();
        for key in LIMIT_KEYS {
            let from = origins.iter().find(|o| o.key == *key).map(|o| o.from.clone()).unwrap_or_else(|| "[mta]".into());
            all.push(Origin { key, from });
        }
        Resolved { limits, origins: all }
    }
}

const LIMIT_KEYS: &[&str] = &[
    "max_connections",
    "connection_rate",
    "message_rate",
    "max_messages_per_connection",
    "max_recipients_per_transaction",
    "idle_timeout",
    "tls",
];

fn version_of(sources: &[ShapingSource]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for s in sources {
        h.update(s.name.as_bytes());
        h.update([0]);
        h.update(s.text.as_bytes());
        h.update([0]);
    }
    hex::encode(&h.finalize()[..6])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Limits {
        Limits {
            max_connections: 20,
            connection_rate: None,
            message_rate: None,
            max_messages_per_connection: 100,
            max_recipients_per_transaction: 100,
            idle_timeout: Duration::from_secs(5),
            tls: TlsMode::Opportunistic,
        }
    }

    fn parse(texts: &[&str]) -> Result<ShapingData, ShapingDataError> {
        let sources: Vec<ShapingSource> =
            texts.iter().enumerate().map(|(i, t)| ShapingSource { name: format!("f{i}.toml"), text: t.to_string() }).collect();
        ShapingData::parse(&sources, &|id| ["google", "yahoo"].contains(&id))
    }

    #[test]
    fn levels_merge_key_by_key_and_name_their_origin() {
        let data = parse(&[
            r#"
            [default]
            max_connections = 10
            [provider.yahoo]
            message_rate = "3000/min"
            max_connections = 5
            [provider.yahoo.source."203.0.113.7"]
            message_rate = "500/h"
            "#,
            r#"
            [provider.yahoo]
            tls = "required"
            "#,
        ])
        .unwrap();
        let r = data.resolve(&base(), Some("yahoo"), "203.0.113.7");
        assert_eq!(r.limits.max_connections, 5);
        assert_eq!(r.limits.message_rate.unwrap().to_string(), "500/h");
        assert_eq!(r.limits.tls, TlsMode::Required);
        assert_eq!(r.limits.max_messages_per_connection, 100);
        let from = |k: &str| r.origins.iter().find(|o| o.key == k).unwrap().from.clone();
        assert_eq!(from("message_rate"), "[provider.yahoo.source.\"203.0.113.7\"]");
        assert_eq!(from("max_connections"), "[provider.yahoo]");
        assert_eq!(from("max_messages_per_connection"), "[mta]");

        let other_ip = data.resolve(&base(), Some("yahoo"), "198.51.100.1");
        assert_eq!(other_ip.limits.message_rate.unwrap().to_string(), "3000/min");
        let unknown = data.resolve(&base(), None, "198.51.100.1");
        assert_eq!((unknown.limits.max_connections, unknown.limits.message_rate), (10, None));
    }

    #[test]
    fn mistakes_are_refused_with_the_file_and_the_section() {
        let err = |t: &str| parse(&[t]).unwrap_err().to_string();
        assert!(err("[provider.gogle]\nmax_connections = 1").contains("f0.toml: [provider.gogle]: the rules data defines no provider"));
        assert!(err("[provider.google]\nmax_conections = 1").contains("[provider.google]: unknown field `max_conections`"));
        assert!(err("[default]\nmax_connections = 0").contains("[default] max_connections: must be at least 1"));
        assert!(err("[default]\nmessage_rate = \"fast\"").contains("rate \"fast\""));
        assert!(err("[defaults]\nmax_connections = 1").contains("unknown section [defaults]"));
        assert!(err("[provider.google.source.\"1.2.3.4\"]\nidle_timeout = \"soon\"").contains("[provider.google.source.\"1.2.3.4\"]"));
        assert!(err("not toml").contains("f0.toml"));
    }

    #[test]
    fn the_shipped_data_parses_against_the_shipped_providers() {
        let table = sluice_rules::compile(&sluice_rules::default_sources()).unwrap();
        let sources = read_shaping_sources(&[DEFAULT_SHAPING]).unwrap();
        let data = ShapingData::parse(&sources, &|id| table.providers().index_of(id).is_some()).unwrap();
        for id in ["google", "yahoo", "microsoft"] {
            assert!(data.provider_ids().any(|p| p == id), "the shipped data has limits for {id}");
        }
    }
}
