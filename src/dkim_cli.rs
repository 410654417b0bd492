//! `sluice dkim`: make a signing key and print the DNS record that publishes it; and the
//! binary's DKIM glue (checking key files, the edge's admission check).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::Subcommand;
use sluice_edge::{AdmissionCheck, Refusal, Submission};
use sluice_mta::dkim::{DkimConfig, DkimKeyConfig, DkimPolicy, DkimSigning, DnsRecord, KeyAlgorithm, PrivateKey};

use crate::config::Config;

#[derive(Subcommand)]
pub enum DkimCommand {
    /// Generate a private key (RSA 2048 by default) into a new file (mode 0600), and print
    /// the DNS TXT record to publish and the config lines that use it.
    Keygen {
        /// The signing domain (`d=`), e.g. example.com.
        #[arg(long)]
        domain: String,
        /// The selector (`s=`), e.g. s2026; a new one for every new key.
        #[arg(long)]
        selector: String,
        /// An Ed25519 key (RFC 8463) instead of RSA. Many receivers cannot verify Ed25519
        /// yet: sign with both (two selectors) rather than Ed25519 alone.
        #[arg(long)]
        ed25519: bool,
        /// RSA key size: 2048, 3072 or 4096 (DNS records of 4096-bit keys are long).
        #[arg(long, default_value_t = 2048)]
        bits: usize,
        /// Directory for the key file `<selector>._domainkey.<domain>.pem`.
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    /// Print the DNS TXT record of an existing private key (e.g. one made with OpenSSL).
    Record {
        #[arg(long)]
        domain: String,
        #[arg(long)]
        selector: String,
        /// The PEM file holding the private key.
        #[arg(long)]
        private_key: PathBuf,
    },
}

pub fn run(cmd: DkimCommand) -> anyhow::Result<()> {
    match cmd {
        DkimCommand::Keygen { domain, selector, ed25519, bits, out } => {
            check_names(&domain, &selector)?;
            let algorithm = if ed25519 { KeyAlgorithm::Ed25519 } else { KeyAlgorithm::Rsa };
            let key = PrivateKey::generate(algorithm, bits)?;
            std::fs::create_dir_all(&out).with_context(|| format!("cannot create --out directory {}", out.display()))?;
            let dir = out.canonicalize().with_context(|| format!("cannot resolve --out directory {}", out.display()))?;
            let path = dir.join(format!("{selector}._domainkey.{}.pem", domain.trim_end_matches('.').to_ascii_lowercase()));
            key.write_new(&path)?;
            let size = key.rsa_bits().map(|b| format!(", {b} bits")).unwrap_or_default();
            println!("Private key ({algorithm}{size}) written to {} (mode 0600). Keep it secret and backed up.", path.display());
            print_instructions(&domain, &selector, &key, &path);
        }
        DkimCommand::Record { domain, selector, private_key } => {
            check_names(&domain, &selector)?;
            let key = PrivateKey::read(&private_key)?;
            print_instructions(&domain, &selector, &key, &private_key);
        }
    }
    Ok(())
}

fn check_names(domain: &str, selector: &str) -> anyhow::Result<()> {
    let probe = DkimConfig {
        keys: vec![DkimKeyConfig { domain: domain.into(), selector: selector.into(), private_key: "probe".into(), tenants: vec![] }],
        ..DkimConfig::default()
    };
    probe.validate().map_err(|e| anyhow::anyhow!("--{}", e.trim_start_matches("keys[0].")))
}

fn print_instructions(domain: &str, selector: &str, key: &PrivateKey, path: &Path) {
    let record = DnsRecord::new(domain, selector, key);
    println!();
    println!("Publish this DNS TXT record (values over 255 bytes are several strings in one record):");
    println!("  name:  {}", record.name);
    println!("  value: {}", record.value);
    println!("  zone file: {}", record.zone_line());
    println!();
    println!("Once `dig +short TXT {}` shows it, add the key to sluice.toml and restart the MTA:", record.name);
    println!("[[dkim.keys]]");
    println!("domain = {:?}", domain.trim_end_matches('.').to_ascii_lowercase());
    println!("selector = {selector:?}");
    println!("private_key = {:?}", path.display().to_string());
}

/// `sluice config check` also reads the key files when this node runs the MTA (an edge
/// node needs only the key domains, not the keys).
pub fn check_keys(config: &Config) -> anyhow::Result<()> {
    if config.role.runs_mta() {
        DkimSigning::load(&config.dkim)?;
    }
    Ok(())
}

/// The edge's admission check for `[dkim]`: refuses mail that policy forbids to send
/// unsigned. `None` when no tenant's mail can be refused (nothing to check).
pub fn admission(config: &DkimConfig) -> Option<AdmissionCheck> {
    let policy = DkimPolicy::from_config(config);
    if !policy.may_refuse() {
        return None;
    }
    Some(Arc::new(move |sub: &Submission| {
        policy
            .admit(&sub.tenant, &sub.body)
            .map_err(|message| Refusal { field: "from.email".into(), message })
    }))
}
