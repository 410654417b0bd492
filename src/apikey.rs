//! `sluice apikey`: keys are shown once and configured only as SHA-256 hashes.

use std::path::Path;

use clap::Subcommand;
use rand::distr::{Alphanumeric, SampleString};
use sluice_edge::auth::hash_key;

#[derive(Subcommand)]
pub enum ApiKeyCommand {
    /// Generate a new key; prints it once, with the config lines that accept it.
    New {
        /// The tenant name the key belongs to.
        #[arg(long, default_value = "default")]
        name: String,
    },
    /// Print the SHA-256 of an existing key, for `[[api_keys]] sha256 = ...`.
    Hash { key: String },
}

pub fn generate() -> String {
    let mut rng = rand::rng();
    format!("SG.{}.{}", Alphanumeric.sample_string(&mut rng, 22), Alphanumeric.sample_string(&mut rng, 43))
}

pub fn run(cmd: ApiKeyCommand) -> anyhow::Result<()> {
    match cmd {
        ApiKeyCommand::New { name } => {
            let key = generate();
            println!("API key (shown once, store it safely): {key}");
            println!();
            println!("Add to sluice.toml:");
            println!("[[api_keys]]\nname = {name:?}\nsha256 = \"{}\"", hash_key(&key));
        }
        ApiKeyCommand::Hash { key } => println!("{}", hash_key(&key)),
    }
    Ok(())
}

/// For zero-config runs: a key generated on first start and kept in `data_dir` (mode 0600)
/// so the operator can read it back; configured `[[api_keys]]` replace it.
pub fn quickstart_key(data_dir: &Path) -> anyhow::Result<(String, bool)> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join("quickstart-api-key");
    if let Ok(k) = std::fs::read_to_string(&path) {
        return Ok((k.trim().to_string(), false));
    }
    let key = generate();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    writeln!(f, "{key}")?;
    f.sync_all()?;
    Ok((key, true))
}
