//! The `sluice` binary: runs the edge and/or the MTA (`sluice serve`) and the operators'
//! tools (`sluice apikey`, `sluice dkim`, `sluice config check`, `sluice rules ...`,
//! `sluice shaping ...`).

mod apikey;
mod config;
mod dkim_cli;
mod rules_cli;
mod rules_reload;
mod serve;
mod shaping_admin;
mod shaping_cli;
mod telemetry;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "sluice", version, about = "A high-throughput mail transfer agent with a replicated spool")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Accept mail over HTTP and SMTP and deliver it. With no config file: local spool under
    /// ./sluice-data, HTTP on 127.0.0.1:8025, SMTP on 127.0.0.1:2525, metrics on 127.0.0.1:9025.
    Serve {
        /// A sluice.toml file (see docs/sluice.example.toml).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Run only part of sluice (overrides `role` in the config).
        #[arg(long, value_enum)]
        role: Option<config::Role>,
        /// Where the local spool and event log live (overrides `data_dir`).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// The spool in one setting (overrides `spool.url`, `spool.backend`, `spool.rados.conf`
        /// and `spool.rados.pool`): `rados://POOL?conf=/etc/ceph/ceph.conf` (optionally
        /// `&user=NAME&namespace=NS`), or `local`.
        #[arg(long, value_name = "URL")]
        spool: Option<String>,
    },
    /// Create or hash API keys for the `[[api_keys]]` config section.
    Apikey {
        #[command(subcommand)]
        command: apikey::ApiKeyCommand,
    },
    /// Generate DKIM keys and print the DNS records that publish them.
    Dkim {
        #[command(subcommand)]
        command: dkim_cli::DkimCommand,
    },
    /// Check, explain, evaluate and compare reply-classification tables (docs/rules.md).
    Rules {
        #[command(subcommand)]
        command: rules_cli::RulesCommand,
    },
    /// Traffic shaping of a running MTA: status, suspend, resume, explain (docs/shaping.md).
    Shaping {
        #[command(subcommand)]
        command: shaping_cli::ShapingCommand,
    },
    /// Check a config file and exit: prints the first bad key and why.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a sluice.toml.
    Check { file: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config, role, data_dir, spool } => serve::run(config, role, data_dir, spool),
        Command::Apikey { command } => apikey::run(command),
        Command::Dkim { command } => dkim_cli::run(command),
        Command::Rules { command } => rules_cli::run(command),
        Command::Shaping { command } => shaping_cli::run(command),
        Command::Config { command: ConfigCommand::Check { file } } => config::Config::load(Some(&file))
            .map_err(anyhow::Error::from)
            .and_then(|c| dkim_cli::check_keys(&c))
            .map(|_| println!("{}: ok", file.display())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice: {e:#}");
            ExitCode::FAILURE
        }
    }
}
