//! A mock ISP described in a TOML file: how it presents itself, how long it takes to answer,
//! what it limits per client IP, and its rules (which replies, for what share of the mail).
//! The files of the providers shipped with sluice-load live in `loadtest/scenarios/`.
//!
//! ```toml
//! hostname = "mx.gmail.load.test"
//! starttls = true
//! [latency]
//! end_of_data = "15ms"
//! [limits]
//! max_connections = 50
//! message_rate = "2000/s"
//! [[rules]]
//! stage = "rcpt"
//! percent = 1.0
//! reply = "550 5.1.1 The email account that you tried to reach does not exist."
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::limits::Limits;
use super::scenario::{Latency, Rule, Scenario};
use super::SinkConfig;

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("cannot read the provider profile {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
}

/// One provider's behaviour; every key is optional (the default accepts everything at once).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Profile {
    /// The name in the banner, the EHLO reply and the STARTTLS certificate.
    pub hostname: String,
    /// Offer STARTTLS (self-signed certificate).
    pub starttls: bool,
    /// Advertise PIPELINING.
    pub pipelining: bool,
    /// Advertised as SIZE; larger messages get 552.
    pub max_message_bytes: usize,
    /// Time taken before each reply, per stage.
    pub latency: Latency,
    /// Per-client-IP limits, enforced with 421.
    pub limits: Limits,
    /// Replies other than the normal ones, first match wins (see [`Rule`]).
    pub rules: Vec<Rule>,
    /// Seeds the `percent` draws (repeatable runs); random by default.
    pub seed: Option<u64>,
}

impl Default for Profile {
    fn default() -> Self {
        Profile {
            hostname: "mx.load.test".into(),
            starttls: false,
            pipelining: true,
            max_message_bytes: 50 << 20,
            latency: Latency::default(),
            limits: Limits::default(),
            rules: Vec::new(),
            seed: None,
        }
    }
}

/// The profiles shipped with sluice-load, by file name.
const BUILTIN: [(&str, &str); 4] = [
    ("gmail.toml", include_str!("../../scenarios/gmail.toml")),
    ("yahoo.toml", include_str!("../../scenarios/yahoo.toml")),
    ("microsoft.toml", include_str!("../../scenarios/microsoft.toml")),
    ("other.toml", include_str!("../../scenarios/other.toml")),
];

impl Profile {
    /// Parses a profile; `origin` names it in errors (a path or a built-in name).
    pub fn parse(text: &str, origin: &str) -> Result<Profile, ProfileError> {
        let invalid = |message: String| ProfileError::Invalid { origin: origin.to_string(), message };
        let profile: Profile = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        profile.validate().map_err(invalid)?;
        Ok(profile)
    }

    pub fn load(path: &Path) -> Result<Profile, ProfileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Read { path: path.to_path_buf(), source })?;
        Profile::parse(&text, &path.display().to_string())
    }

    /// A profile shipped with sluice-load (`gmail.toml`, `yahoo.toml`, `microsoft.toml`,
    /// `other.toml`).
    pub fn builtin(name: &str) -> Option<Profile> {
        let (_, text) = BUILTIN.iter().find(|(n, _)| *n == name)?;
        Some(Profile::parse(text, name).expect("the built-in profiles are valid"))
    }

    /// The names of the built-in profiles.
    pub fn builtin_names() -> impl Iterator<Item = &'static str> {
        BUILTIN.iter().map(|(n, _)| *n)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.hostname.trim().is_empty() {
            return Err("hostname: must not be empty".into());
        }
        if self.max_message_bytes < 1024 {
            return Err("max_message_bytes: must be at least 1024".into());
        }
        self.limits.validate().map_err(|e| format!("limits.{e}"))?;
        self.scenario().validate()
    }

    pub fn scenario(&self) -> Scenario {
        Scenario { rules: self.rules.clone(), seed: self.seed }
    }

    /// The sink configuration for this profile (messages are not kept in memory).
    pub fn sink_config(&self) -> SinkConfig {
        SinkConfig {
            hostname: self.hostname.clone(),
            starttls: self.starttls,
            pipelining: self.pipelining,
            max_message_bytes: self.max_message_bytes,
            record_messages: false,
            scenario: self.scenario(),
            latency: self.latency.clone(),
            limits: self.limits.clone(),
            tracker: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::Stage;

    #[test]
    fn builtin_profiles_parse_and_carry_realistic_replies() {
        for name in Profile::builtin_names() {
            let p = Profile::builtin(name).unwrap();
            assert!(!p.rules.is_empty(), "{name} has rules");
        }
        let texts = |name: &str| -> String {
            Profile::builtin(name).unwrap().rules.iter().filter_map(|r| r.reply.as_ref()).map(|r| r.lines.join(" ")).collect()
        };
        assert!(texts("gmail.toml").contains("4.7.28"));
        assert!(texts("gmail.toml").contains("5.1.1"));
        assert!(texts("yahoo.toml").contains("TSS04"));
        assert!(texts("microsoft.toml").contains("S3150"));
    }

    #[test]
    fn a_profile_file_sets_every_part() {
        let p = Profile::parse(
            r#"
hostname = "mx.example.test"
starttls = true
[latency]
end_of_data = "15ms"
[limits]
max_connections = 5
message_rate = "100/s"
[[rules]]
stage = "rcpt"
percent = 2.5
reply = "550 5.1.1 no such user"
"#,
            "inline",
        )
        .unwrap();
        assert!(p.starttls);
        assert_eq!(p.latency.at(Stage::EndOfData), Some(std::time::Duration::from_millis(15)));
        assert_eq!(p.latency.at(Stage::Rcpt), None);
        assert_eq!(p.limits.max_connections, Some(5));
        assert_eq!(p.rules[0].percent, Some(2.5));
        let config = p.sink_config();
        assert!(!config.record_messages);
        assert_eq!(config.scenario.rules.len(), 1);
    }

    #[test]
    fn bad_profiles_name_the_file_and_key() {
        let err = Profile::parse("hostname = \"x\"\ncolour = 1\n", "x.toml").unwrap_err().to_string();
        assert!(err.starts_with("x.toml:") && err.contains("colour"), "{err}");
        let err = Profile::parse("[[rules]]\nstage = \"rcpt\"\npercent = 70.0\n[[rules]]\nstage = \"rcpt\"\npercent = 40.0\n", "p")
            .unwrap_err()
            .to_string();
        assert!(err.contains("rules[1].percent") && err.contains("more than 100"), "{err}");
        let err = Profile::parse("[limits]\nmessage_rate = \"fast\"\n", "p").unwrap_err().to_string();
        assert!(err.contains("N/period"), "{err}");
        let err = Profile::parse("[[rules]]\nstage = \"rcpt\"\nreply = \"hello\"\n", "p").unwrap_err().to_string();
        assert!(err.contains("must start with a code"), "{err}");
    }
}
