//! The `[rules]` section of sluice.toml.

use std::path::PathBuf;

use serde::Deserialize;

use crate::source::DEFAULT_TABLE;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RulesConfig {
    /// The rules table, in order (first match wins): files, directories (their `*.toml`
    /// files by name) and `"@default"`, the table shipped in the binary. Put your own rules
    /// before `"@default"` to override it.
    pub files: Vec<PathBuf>,
    /// Reload when a file changes (besides SIGHUP and `POST /admin/rules/reload`).
    pub watch: bool,
}

impl Default for RulesConfig {
    fn default() -> Self {
        RulesConfig { files: vec![PathBuf::from(DEFAULT_TABLE)], watch: true }
    }
}

impl RulesConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.files.is_empty() {
            return Err(format!("files: must name at least one table file (the shipped table is \"{DEFAULT_TABLE}\")"));
        }
        for (i, f) in self.files.iter().enumerate() {
            if f.as_os_str() != DEFAULT_TABLE && !f.exists() {
                return Err(format!("files: {} (files[{i}]) does not exist", f.display()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_to_the_shipped_table_and_checks_paths() {
        let c = RulesConfig::default();
        assert!(c.validate().is_ok());
        assert_eq!(c.files, [PathBuf::from("@default")]);
        let bad = RulesConfig { files: vec!["/nonexistent/rules.toml".into()], watch: false };
        assert!(bad.validate().unwrap_err().starts_with("files: /nonexistent/rules.toml"));
        assert!(RulesConfig { files: vec![], watch: true }.validate().unwrap_err().starts_with("files:"));
    }
}
