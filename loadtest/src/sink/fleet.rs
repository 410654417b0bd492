//! Several mock ISPs in one process. Each provider listens on its own loopback address, all
//! on the same port, because sluice contacts every MX host on one port (`mta.port`) exactly
//! as in production; the test DNS maps each provider's domains to its MX host and address.
//! All providers share one [`Tracker`], so a message delivered twice is noticed even when
//! the copies went to different providers.

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::profile::{Profile, ProfileError};
use super::tracker::{DkimSampler, Tracker, TrackerReport};
use super::{Sink, SinkError, SinkStats, Stage};
use crate::dns::{InvalidName, TestDns};
use crate::ledger::{Ledger, LedgerError};

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("cannot read the fleet file {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
    #[error(transparent)]
    Profile(#[from] ProfileError),
    #[error("provider {provider}: {source}")]
    Sink { provider: String, source: SinkError },
    #[error("cannot find one port free on every provider address ({0}); pick another `port`")]
    NoCommonPort(String),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("{0}")]
    Dkim(String),
}

/// A fleet file (see `loadtest/scenarios/fleet.toml`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    /// The port every provider listens on, each on its own address: sluice's `mta.port`.
    /// 0 picks a free one (the same on every address).
    pub port: u16,
    /// Where `sluice-load dns` answers, and where the sinks look up DKIM keys.
    pub dns: SocketAddr,
    /// Share of received messages (0 to 1) whose DKIM signatures are verified.
    pub dkim_sample: f64,
    /// Seeds the `percent` draws of every provider (the i-th provider gets `seed + i`),
    /// replacing the profiles' own seeds: repeatable runs of a whole fleet.
    pub seed: Option<u64>,
    pub providers: Vec<ProviderConfig>,
    /// The directory profile paths are relative to (the fleet file's).
    #[serde(skip)]
    pub base_dir: Option<PathBuf>,
}

/// One mock ISP of a fleet.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// A short name for reports (`gmail`).
    pub name: String,
    /// The loopback address it listens on (one per provider).
    pub address: IpAddr,
    /// Its MX host name; default `mx.<name>.load.test`.
    #[serde(default)]
    pub mx: Option<String>,
    /// The recipient domains it serves.
    pub domains: Vec<String>,
    /// Its share of the generated recipients, relative to the other providers' weights.
    #[serde(default = "one")]
    pub weight: f64,
    /// Its behaviour: a profile file (relative to the fleet file) or the name of a built-in
    /// one (`gmail.toml`, ...). Without it, the provider accepts everything at once.
    #[serde(default)]
    pub profile: Option<String>,
}

fn one() -> f64 {
    1.0
}

/// Defaults of the keys a fleet file leaves out (the providers must be given).
impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            port: 2525,
            dns: SocketAddr::from(([127, 0, 0, 1], 5300)),
            dkim_sample: 0.0,
            seed: None,
            providers: Vec::new(),
            base_dir: None,
        }
    }
}

const REALISTIC: &str = include_str!("../../scenarios/fleet.toml");

impl ProviderConfig {
    pub fn mx_host(&self) -> String {
        self.mx.clone().unwrap_or_else(|| format!("mx.{}.load.test", self.name))
    }
}

impl FleetConfig {
    /// `realistic` (the providers of `scenarios/fleet.toml` with their profiles) or
    /// `accept-all` (the same providers and domains, accepting everything at once).
    pub fn builtin(name: &str) -> Option<FleetConfig> {
        let mut fleet = FleetConfig::parse(REALISTIC, "built-in fleet").expect("the built-in fleet is valid");
        match name {
            "realistic" => Some(fleet),
            "accept-all" => {
                for p in &mut fleet.providers {
                    p.profile = None;
                }
                fleet.dkim_sample = 0.0;
                Some(fleet)
            }
            _ => None,
        }
    }

    /// A built-in fleet name or a path to a fleet file.
    pub fn from_arg(arg: &str) -> Result<FleetConfig, FleetError> {
        match FleetConfig::builtin(arg) {
            Some(f) => Ok(f),
            None => FleetConfig::load(Path::new(arg)),
        }
    }

    pub fn load(path: &Path) -> Result<FleetConfig, FleetError> {
        let text = std::fs::read_to_string(path).map_err(|source| FleetError::Read { path: path.to_path_buf(), source })?;
        let mut fleet = FleetConfig::parse(&text, &path.display().to_string())?;
        fleet.base_dir = path.parent().map(Path::to_path_buf);
        Ok(fleet)
    }

    pub fn parse(text: &str, origin: &str) -> Result<FleetConfig, FleetError> {
        let invalid = |message: String| FleetError::Invalid { origin: origin.to_string(), message };
        let fleet: FleetConfig = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        fleet.validate().map_err(invalid)?;
        Ok(fleet)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.providers.is_empty() {
            return Err("providers: a fleet needs at least one provider".into());
        }
        if !(0.0..=1.0).contains(&self.dkim_sample) {
            return Err(format!("dkim_sample: {} must be between 0 and 1", self.dkim_sample));
        }
        let (mut names, mut addresses, mut domains) = (HashSet::new(), HashSet::new(), HashSet::new());
        for (i, p) in self.providers.iter().enumerate() {
            let key = |k: &str| format!("providers[{i}].{k}");
            if p.name.is_empty() || !names.insert(p.name.clone()) {
                return Err(format!("{}: {:?} is empty or used twice", key("name"), p.name));
            }
            if !p.address.is_loopback() {
                return Err(format!("{}: {} is not a loopback address; mock ISPs stay on this machine", key("address"), p.address));
            }
            if !addresses.insert(p.address) {
                return Err(format!("{}: {} is used by two providers; each needs its own", key("address"), p.address));
            }
            if p.domains.is_empty() {
                return Err(format!("{}: a provider needs at least one domain", key("domains")));
            }
            for d in &p.domains {
                if !crate::gen::is_test_domain(d) {
                    return Err(format!("{}: {d:?} is not under .test, .example, .invalid or .localhost", key("domains")));
                }
                if !domains.insert(d.to_ascii_lowercase()) {
                    return Err(format!("{}: {d:?} is served by two providers", key("domains")));
                }
            }
            if !(p.weight >= 0.0 && p.weight.is_finite()) {
                return Err(format!("{}: {} must be zero or more", key("weight"), p.weight));
            }
        }
        if self.providers.iter().all(|p| p.weight == 0.0) {
            return Err("providers: at least one provider needs a weight above zero".into());
        }
        Ok(())
    }

    /// The profile of every provider, in order.
    pub fn profiles(&self) -> Result<Vec<Profile>, FleetError> {
        self.providers
            .iter()
            .map(|p| match &p.profile {
                None => Ok(Profile { hostname: p.mx_host(), ..Profile::default() }),
                Some(name) => {
                    let path = self.base_dir.as_deref().map(|b| b.join(name)).unwrap_or_else(|| PathBuf::from(name));
                    if path.exists() {
                        return Ok(Profile::load(&path)?);
                    }
                    Profile::builtin(name).ok_or_else(|| FleetError::Invalid {
                        origin: format!("provider {}", p.name),
                        message: format!(
                            "profile: {} does not exist and is not a built-in profile ({})",
                            path.display(),
                            Profile::builtin_names().collect::<Vec<_>>().join(", ")
                        ),
                    })
                }
            })
            .collect()
    }

    /// `(domain, weight)` for the generator: each provider's weight split evenly over its
    /// domains.
    pub fn domain_weights(&self) -> Vec<(String, f64)> {
        self.providers
            .iter()
            .flat_map(|p| p.domains.iter().map(move |d| (d.clone(), p.weight / p.domains.len() as f64)))
            .collect()
    }

    /// Adds the MX and A records of every provider to `dns`.
    pub fn add_records(&self, dns: &TestDns) -> Result<(), InvalidName> {
        for p in &self.providers {
            let mx = p.mx_host();
            for d in &p.domains {
                dns.add_mx(d, 10, &mx)?;
            }
            dns.add_ip(&mx, p.address)?;
        }
        Ok(())
    }
}

/// Options of a running fleet that are not part of the fleet file.
#[derive(Clone, Debug, Default)]
pub struct FleetOptions {
    /// Write every received Message-ID here.
    pub ledger: Option<PathBuf>,
    /// Where the DKIM keys are looked up, instead of the file's `dns`.
    pub dns: Option<SocketAddr>,
    /// Keep every message in memory (tests).
    pub record_messages: bool,
}

/// The providers of a fleet, running.
pub struct Fleet {
    config: FleetConfig,
    sinks: Vec<Sink>,
    tracker: Arc<Tracker>,
    port: u16,
}

/// Counts of replies by class at one stage.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReplyClasses {
    pub accepted: u64,
    pub deferred: u64,
    pub rejected: u64,
}

impl ReplyClasses {
    fn at(stats: &SinkStats, stage: Stage) -> ReplyClasses {
        ReplyClasses {
            accepted: stats.replies_at(stage, 200..400),
            deferred: stats.replies_at(stage, 400..500),
            rejected: stats.replies_at(stage, 500..600),
        }
    }
}

/// One provider's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ProviderReport {
    pub name: String,
    pub address: String,
    pub connections: u64,
    pub tls_connections: u64,
    /// Messages accepted (250 after DATA).
    pub messages: u64,
    pub recipients: u64,
    pub duplicates: u64,
    /// Connections and messages refused by the per-IP limits (421).
    pub limited: u64,
    pub connect: ReplyClasses,
    pub mail: ReplyClasses,
    pub rcpt: ReplyClasses,
    pub end_of_data: ReplyClasses,
}

impl ProviderReport {
    fn of(name: &str, address: String, s: &SinkStats) -> ProviderReport {
        ProviderReport {
            name: name.to_string(),
            address,
            connections: s.connections,
            tls_connections: s.tls_connections,
            messages: s.messages,
            recipients: s.recipients,
            duplicates: s.duplicates,
            limited: s.limited,
            connect: ReplyClasses::at(s, Stage::Connect),
            mail: ReplyClasses::at(s, Stage::Mail),
            rcpt: ReplyClasses::at(s, Stage::Rcpt),
            end_of_data: ReplyClasses::at(s, Stage::EndOfData),
        }
    }
}

/// Everything the fleet knows.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct FleetReport {
    pub providers: Vec<ProviderReport>,
    /// Accepted messages over all providers.
    pub messages: u64,
    pub tracker: TrackerReport,
}

impl FleetReport {
    /// A plain-text table for people.
    pub fn text(&self) -> String {
        let mut out = format!(
            "{:<12} {:>8} {:>10} {:>6} {:>8}   {:>22}   {:>22}\n",
            "provider", "conns", "accepted", "dups", "limited", "rcpt ok/defer/reject", "data ok/defer/reject"
        );
        for p in &self.providers {
            out.push_str(&format!(
                "{:<12} {:>8} {:>10} {:>6} {:>8}   {:>22}   {:>22}\n",
                p.name,
                p.connections,
                p.messages,
                p.duplicates,
                p.limited,
                format!("{}/{}/{}", p.rcpt.accepted, p.rcpt.deferred, p.rcpt.rejected),
                format!("{}/{}/{}", p.end_of_data.accepted, p.end_of_data.deferred, p.end_of_data.rejected),
            ));
        }
        let t = &self.tracker;
        out.push_str(&format!(
            "unique {} duplicates {} without Message-ID {}\nend to end: {}\n",
            t.unique,
            t.duplicates,
            t.without_message_id,
            t.end_to_end.line()
        ));
        if t.dkim.checked + t.dkim.skipped > 0 {
            let d = &t.dkim;
            out.push_str(&format!(
                "DKIM sample: checked {} pass {} fail {} temperror {} unsigned {} skipped {}\n",
                d.checked, d.pass, d.fail, d.temperror, d.unsigned, d.skipped
            ));
        }
        out
    }
}

impl Fleet {
    pub async fn start(config: FleetConfig, options: FleetOptions) -> Result<Fleet, FleetError> {
        config.validate().map_err(|message| FleetError::Invalid { origin: "fleet".into(), message })?;
        let profiles = config.profiles()?;
        let mut tracker = Tracker::new();
        if let Some(path) = &options.ledger {
            tracker = tracker.with_ledger(Ledger::create(path)?);
        }
        if config.dkim_sample > 0.0 {
            let dns = options.dns.unwrap_or(config.dns);
            tracker = tracker.with_dkim(DkimSampler::new(dns, config.dkim_sample).map_err(FleetError::Dkim)?);
        }
        let tracker = Arc::new(tracker);
        let mut last_error = String::new();
        // With port 0 the first provider picks a port and the others must get the same one
        // on their addresses; another program may hold it there, so try a few.
        for _ in 0..(if config.port == 0 { 20 } else { 1 }) {
            let mut port = config.port;
            let mut sinks = Vec::new();
            let mut failed = None;
            for (i, (p, profile)) in config.providers.iter().zip(&profiles).enumerate() {
                let mut sink_config = profile.sink_config();
                if let Some(seed) = config.seed {
                    sink_config.scenario.seed = Some(seed.wrapping_add(i as u64));
                }
                sink_config.tracker = Some(tracker.clone());
                sink_config.record_messages = options.record_messages;
                match Sink::bind(SocketAddr::new(p.address, port), sink_config).await {
                    Ok(sink) => {
                        port = sink.addr().port();
                        sinks.push(sink);
                    }
                    Err(SinkError::Bind { addr, source }) if source.kind() == io::ErrorKind::AddrInUse && config.port == 0 => {
                        failed = Some(format!("{addr}: {source}"));
                        break;
                    }
                    Err(source) => return Err(FleetError::Sink { provider: p.name.clone(), source }),
                }
            }
            match failed {
                None => return Ok(Fleet { config, sinks, tracker, port }),
                Some(e) => last_error = e,
            }
        }
        Err(FleetError::NoCommonPort(last_error))
    }

    pub fn config(&self) -> &FleetConfig {
        &self.config
    }

    /// The port every provider listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn tracker(&self) -> &Arc<Tracker> {
        &self.tracker
    }

    /// Each provider with its sink.
    pub fn sinks(&self) -> impl Iterator<Item = (&ProviderConfig, &Sink)> {
        self.config.providers.iter().zip(&self.sinks)
    }

    pub fn sink(&self, name: &str) -> Option<&Sink> {
        self.sinks().find(|(p, _)| p.name == name).map(|(_, s)| s)
    }

    pub fn report(&self) -> FleetReport {
        let providers: Vec<ProviderReport> =
            self.sinks().map(|(p, s)| ProviderReport::of(&p.name, s.addr().to_string(), &s.stats())).collect();
        FleetReport { messages: providers.iter().map(|p| p.messages).sum(), providers, tracker: self.tracker.report() }
    }

    /// Stops every provider.
    pub fn shutdown(&self) {
        for s in &self.sinks {
            s.shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_fleets_load_with_their_profiles() {
        let realistic = FleetConfig::builtin("realistic").unwrap();
        assert_eq!(realistic.providers.len(), 4);
        assert_eq!(realistic.profiles().unwrap().len(), 4);
        let accept = FleetConfig::builtin("accept-all").unwrap();
        assert!(accept.profiles().unwrap().iter().all(|p| p.rules.is_empty()));
        let weights: f64 = realistic.domain_weights().iter().map(|(_, w)| w).sum();
        assert!((weights - 100.0).abs() < 1e-9);
        assert!(FleetConfig::builtin("nope").is_none());
    }

    #[test]
    fn invalid_fleets_name_the_key() {
        let base = |extra: &str| format!("port = 0\n[[providers]]\nname = \"a\"\naddress = \"127.0.0.2\"\ndomains = [\"a.test\"]\n{extra}");
        let err = |text: &str| FleetConfig::parse(text, "f.toml").unwrap_err().to_string();
        assert!(err(&base("[[providers]]\nname = \"b\"\naddress = \"127.0.0.2\"\ndomains = [\"b.test\"]\n")).contains("providers[1].address"));
        assert!(err(&base("[[providers]]\nname = \"b\"\naddress = \"127.0.0.3\"\ndomains = [\"a.test\"]\n")).contains("served by two"));
        assert!(err(&base("[[providers]]\nname = \"b\"\naddress = \"10.0.0.1\"\ndomains = [\"b.test\"]\n")).contains("not a loopback"));
        assert!(err(&base("[[providers]]\nname = \"b\"\naddress = \"127.0.0.3\"\ndomains = [\"gmail.com\"]\n")).contains("not under .test"));
        assert!(err("port = 1\n").contains("at least one provider"));
        let realistic = FleetConfig::builtin("realistic").unwrap();
        let provider = ProviderConfig { profile: Some("nope.toml".into()), ..realistic.providers[0].clone() };
        let missing = FleetConfig { providers: vec![provider], ..realistic };
        assert!(missing.profiles().unwrap_err().to_string().contains("not a built-in profile"));
    }
}
