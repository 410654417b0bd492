//! `sluice-load`: run the test SMTP sink or the test DNS server by hand.

use std::net::{IpAddr, SocketAddr};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use sluice_load::dns::TestDns;
use sluice_load::sink::{Scenario, Sink, SinkConfig};

#[derive(Parser)]
#[command(name = "sluice-load", about = "Mock MX and test DNS server for sluice")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// An SMTP server that accepts mail and logs it. Recipients whose local part starts with
    /// `bounce` get 550 5.1.1, with `defer` 451 4.7.1.
    Sink {
        #[arg(long, default_value = "127.0.0.1:2525")]
        listen: SocketAddr,
        /// Name in the banner, EHLO reply and certificate.
        #[arg(long, default_value = "sink.test")]
        hostname: String,
        /// Offer STARTTLS with a self-signed certificate.
        #[arg(long)]
        starttls: bool,
        /// Accept every recipient (no bounce/defer prefixes).
        #[arg(long)]
        accept_all: bool,
    },
    /// An authoritative DNS server (UDP and TCP) answering from the records given.
    Dns {
        #[arg(long, default_value = "127.0.0.1:5300")]
        listen: SocketAddr,
        /// `domain=host`: an MX record (preferences 10, 20, ... in the order given per domain);
        /// `domain=.` is a null MX.
        #[arg(long, value_name = "DOMAIN=HOST")]
        mx: Vec<String>,
        /// `name=ip`: an A or AAAA record.
        #[arg(long = "a", value_name = "NAME=IP")]
        addresses: Vec<String>,
        /// `name=text`: a TXT record.
        #[arg(long, value_name = "NAME=TEXT")]
        txt: Vec<String>,
    },
}

fn split_pair<'a>(flag: &str, s: &'a str) -> Result<(&'a str, &'a str)> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok((k, v)),
        _ => bail!("--{flag} {s:?}: expected NAME=VALUE"),
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,sluice_load=debug".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Sink { listen, hostname, starttls, accept_all } => {
            let scenario = if accept_all { Scenario::accept_all() } else { Scenario::standard() };
            let config = SinkConfig { hostname, starttls, record_messages: false, scenario, ..SinkConfig::default() };
            let sink = Sink::bind(listen, config).await?;
            tracing::info!(addr = %sink.addr(), "sink listening; Ctrl-C to stop");
            tokio::signal::ctrl_c().await?;
            let s = sink.stats();
            tracing::info!(connections = s.connections, messages = s.messages, recipients = s.recipients, "sink stopped");
        }
        Command::Dns { listen, mx, addresses, txt } => {
            let dns = TestDns::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
            let mut next_pref = std::collections::HashMap::<String, u16>::new();
            for m in &mx {
                let (domain, host) = split_pair("mx", m)?;
                if host == "." {
                    dns.add_null_mx(domain)?;
                } else {
                    let pref = next_pref.entry(domain.to_ascii_lowercase()).or_insert(0);
                    *pref += 10;
                    dns.add_mx(domain, *pref, host)?;
                }
            }
            for a in &addresses {
                let (name, ip) = split_pair("a", a)?;
                let ip: IpAddr = ip.parse().with_context(|| format!("--a {a:?}: {ip:?} is not an IP address"))?;
                dns.add_ip(name, ip)?;
            }
            for t in &txt {
                let (name, text) = split_pair("txt", t)?;
                dns.add_txt(name, text)?;
            }
            tracing::info!(addr = %dns.addr(), "DNS server listening (UDP and TCP); Ctrl-C to stop");
            tokio::signal::ctrl_c().await?;
        }
    }
    Ok(())
}
