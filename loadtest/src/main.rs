//! `sluice-load`: the load generator, the mock ISPs, the test DNS server, ledger comparison
//! and the benchmark harness.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use sluice_load::dns::TestDns;
use sluice_load::gen::{self, GenConfig, HttpTarget, Pace, SizeMix, SmtpTarget, Stop, Target, Weighted, Workload};
use sluice_load::ledger;
use sluice_load::sink::{Fleet, FleetConfig, Profile, Scenario, Sink, SinkConfig};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "sluice-load", version, about = "Load generator, mock ISPs, test DNS and benchmark harness for sluice")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Inject mail over SMTP or the SendGrid v3 HTTP API and report throughput and latency.
    Gen(GenArgs),
    /// Mock ISPs: SMTP servers that answer per a provider profile and count what arrives.
    Sink(SinkArgs),
    /// An authoritative DNS server (UDP and TCP) for the test domains.
    Dns(DnsArgs),
    /// Ledgers of message ids.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
    /// The benchmark: sluice (and Postfix) between the generator and the mock ISPs.
    Bench(sluice_load::bench::BenchArgs),
}

#[derive(Args)]
struct GenArgs {
    /// Inject over SMTP to this address; repeat it to spread the connections over several
    /// (e.g. edge nodes), round-robin.
    #[arg(long, value_name = "ADDR", conflicts_with = "http", required_unless_present = "http")]
    smtp: Vec<SocketAddr>,
    /// Inject over the SendGrid v3 API (`POST /v3/mail/send`) at this address; repeat it to
    /// spread the connections over several.
    #[arg(long, value_name = "ADDR")]
    http: Vec<SocketAddr>,
    /// API key for HTTP (`Authorization: Bearer`).
    #[arg(long, env = "SLUICE_API_KEY", default_value = "")]
    api_key: String,
    /// HTTP: messages (personalizations) per request.
    #[arg(long, default_value_t = 1)]
    personalizations: u32,
    /// SMTP: upgrade each connection with STARTTLS.
    #[arg(long)]
    starttls: bool,
    /// SMTP: AUTH PLAIN as USER:PASSWORD (sluice: `apikey:<API key>`).
    #[arg(long, value_name = "USER:PASSWORD")]
    auth: Option<String>,
    /// SMTP: the EHLO name.
    #[arg(long, default_value = "gen.load.test")]
    helo: String,
    /// SMTP: the TLS server name (SNI).
    #[arg(long, default_value = "localhost")]
    tls_name: String,
    /// SMTP: messages per connection before reconnecting.
    #[arg(long, default_value_t = 100)]
    messages_per_connection: u32,
    /// Connections.
    #[arg(short, long, default_value_t = 16)]
    concurrency: usize,
    /// Open loop: send this many messages per second (latency from the intended send time).
    /// Without it: closed loop, as fast as the connections allow.
    #[arg(long)]
    rate: Option<f64>,
    /// Measured messages to send (after the warm-up).
    #[arg(long, conflicts_with = "duration")]
    count: Option<u64>,
    /// Measure for this long instead of a count (e.g. 30s).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Send for this long first, left out of the results.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    warmup: Duration,
    /// Message size or weighted mix: `5k`, `2k:60,20k:30,100k:10` (k = 1000 bytes).
    #[arg(long, default_value = "5k")]
    size: SizeMix,
    /// Attachments per message.
    #[arg(long, default_value_t = 0)]
    attachments: u32,
    /// Size of each attachment before base64.
    #[arg(long, default_value = "10k", value_parser = gen::parse_size)]
    attachment_size: usize,
    /// Recipients per message (all at one domain).
    #[arg(long, default_value_t = 1)]
    recipients: u32,
    /// Recipient domains and weights from a fleet: `realistic`, `accept-all` or a fleet file.
    #[arg(long, default_value = "realistic")]
    fleet: String,
    /// Recipient domains by weight instead of the fleet's: `gmail.load.test=40` (repeat).
    #[arg(long, value_name = "DOMAIN=WEIGHT")]
    domain: Vec<String>,
    #[arg(long, default_value = "load@gen.load.test")]
    sender: String,
    /// Names this run in the Message-IDs (default: random).
    #[arg(long)]
    run_id: Option<String>,
    /// Write the Message-ID of every acknowledged message to this file.
    #[arg(long)]
    ledger: Option<PathBuf>,
    /// Limit of every network wait.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    timeout: Duration,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(short, long)]
    quiet: bool,
}

#[derive(Args)]
struct SinkArgs {
    /// Serve a fleet of providers: `realistic`, `accept-all` or a fleet file. Without it, one
    /// sink on --listen.
    #[arg(long)]
    fleet: Option<String>,
    /// With --fleet: the port for every provider (instead of the fleet file's).
    #[arg(long)]
    port: Option<u16>,
    /// With --fleet: where DKIM keys are looked up (instead of the fleet file's `dns`).
    #[arg(long)]
    dns: Option<SocketAddr>,
    /// Seed the percentage draws of the rules, for repeatable runs (with --fleet, provider i
    /// gets SEED + i).
    #[arg(long)]
    seed: Option<u64>,
    /// Write the Message-ID of every accepted message to this file.
    #[arg(long)]
    ledger: Option<PathBuf>,
    /// Write the final report as JSON to this file on exit.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Log the counters this often.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    report_every: Duration,
    /// Single sink: where to listen.
    #[arg(long, default_value = "127.0.0.1:2525")]
    listen: SocketAddr,
    /// Single sink: its behaviour (a profile file or a built-in name such as `gmail.toml`).
    /// Without it, recipients whose local part starts with `bounce` get 550 5.1.1, `defer` 451.
    #[arg(long)]
    profile: Option<String>,
    /// Single sink: name in the banner, EHLO reply and certificate.
    #[arg(long)]
    hostname: Option<String>,
    /// Single sink: offer STARTTLS with a self-signed certificate.
    #[arg(long)]
    starttls: bool,
    /// Single sink: accept every recipient.
    #[arg(long)]
    accept_all: bool,
}

#[derive(Args)]
struct DnsArgs {
    /// Where to listen (default: the fleet's `dns`, or 127.0.0.1:5300).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Answer for a fleet's domains: `realistic`, `accept-all` or a fleet file.
    #[arg(long)]
    fleet: Option<String>,
    /// `domain=host`: an MX record (preferences 10, 20, ... in the order given per domain);
    /// `domain=.` is a null MX.
    #[arg(long, value_name = "DOMAIN=HOST")]
    mx: Vec<String>,
    /// `name=ip`: an A or AAAA record.
    #[arg(long = "a", value_name = "NAME=IP")]
    addresses: Vec<String>,
    /// `name=text`: a TXT record (e.g. a DKIM key).
    #[arg(long, value_name = "NAME=TEXT")]
    txt: Vec<String>,
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// Compare what the generator sent with what the sinks received: missing, duplicated and
    /// unexpected ids. Exits with 1 unless the ledgers match.
    Compare {
        sent: PathBuf,
        received: PathBuf,
        /// Print the full comparison as JSON.
        #[arg(long)]
        json: bool,
        /// Ids listed per problem in the text summary.
        #[arg(long, default_value_t = 10)]
        examples: usize,
    },
}

fn split_pair<'a>(flag: &str, s: &'a str) -> Result<(&'a str, &'a str)> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok((k, v)),
        _ => bail!("--{flag} {s:?}: expected NAME=VALUE"),
    }
}

/// Cancelled on Ctrl-C or SIGTERM.
fn shutdown_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        t.cancel();
    });
    token
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let result = match Cli::parse().command {
        Command::Gen(args) => run_gen(args).await,
        Command::Sink(args) => run_sink(args).await,
        Command::Dns(args) => run_dns(args).await,
        Command::Ledger { command: LedgerCommand::Compare { sent, received, json, examples } } => {
            compare(sent, received, json, examples)
        }
        Command::Bench(args) => sluice_load::bench::run(args, shutdown_signal()).await.map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sluice-load: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run_gen(a: GenArgs) -> Result<ExitCode> {
    let domains = if a.domain.is_empty() {
        FleetConfig::from_arg(&a.fleet)?.domain_weights()
    } else {
        a.domain
            .iter()
            .map(|d| {
                let (domain, weight) = split_pair("domain", d)?;
                let weight: f64 = weight.parse().with_context(|| format!("--domain {d:?}: {weight:?} is not a number"))?;
                Ok((domain.to_string(), weight))
            })
            .collect::<Result<Vec<_>>>()?
    };
    let domains = Weighted::new(domains).context("--domain: give at least one domain with a weight above zero")?;
    let mut targets: Vec<Target> = if !a.smtp.is_empty() {
        let auth = a
            .auth
            .map(|s| s.split_once(':').map(|(u, p)| (u.to_string(), p.to_string())).context("--auth: expected USER:PASSWORD"))
            .transpose()?;
        a.smtp
            .iter()
            .map(|addr| {
                Target::Smtp(SmtpTarget {
                    addr: *addr,
                    helo: a.helo.clone(),
                    starttls: a.starttls,
                    tls_name: a.tls_name.clone(),
                    auth: auth.clone(),
                    messages_per_connection: a.messages_per_connection,
                    timeout: a.timeout,
                })
            })
            .collect()
    } else if !a.http.is_empty() {
        if a.api_key.is_empty() {
            bail!("--http needs --api-key (or SLUICE_API_KEY)");
        }
        a.http
            .iter()
            .map(|addr| {
                Target::Http(HttpTarget { addr: *addr, api_key: a.api_key.clone(), personalizations: a.personalizations, timeout: a.timeout })
            })
            .collect()
    } else {
        bail!("give --smtp ADDR or --http ADDR");
    };
    let more = targets.split_off(1);
    let config = GenConfig {
        target: targets.remove(0),
        pace: a.rate.map_or(Pace::Closed, |rate| Pace::Open { rate }),
        concurrency: a.concurrency,
        stop: match (a.count, a.duration) {
            (_, Some(d)) => Stop::Duration(d),
            (n, None) => Stop::Count(n.unwrap_or(10_000)),
        },
        warmup: a.warmup,
        workload: Workload {
            sizes: a.size,
            attachments: a.attachments,
            attachment_bytes: a.attachment_size,
            recipients: a.recipients,
            domains,
            sender: a.sender,
            run_id: a.run_id.unwrap_or_else(Workload::new_run_id),
        },
        ledger: a.ledger,
        progress: !a.quiet && !a.json,
    };
    let report = gen::run_spread(config, more, shutdown_signal()).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.text());
    }
    Ok(if report.messages.acknowledged > 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

async fn run_sink(a: SinkArgs) -> Result<ExitCode> {
    let cancel = shutdown_signal();
    let Some(fleet_arg) = a.fleet else {
        let mut config = match &a.profile {
            Some(p) => {
                let path = std::path::Path::new(p);
                let profile = if path.exists() { Profile::load(path)? } else { Profile::builtin(p).with_context(|| format!("--profile {p}: no such file or built-in profile"))? };
                profile.sink_config()
            }
            None => SinkConfig {
                record_messages: false,
                scenario: if a.accept_all { Scenario::accept_all() } else { Scenario::standard() },
                ..SinkConfig::default()
            },
        };
        if let Some(h) = a.hostname {
            config.hostname = h;
        }
        config.starttls |= a.starttls;
        if a.seed.is_some() {
            config.scenario.seed = a.seed;
        }
        if let Some(l) = &a.ledger {
            config.tracker = Some(std::sync::Arc::new(sluice_load::sink::Tracker::new().with_ledger(ledger::Ledger::create(l)?)));
        }
        let sink = Sink::bind(a.listen, config).await?;
        eprintln!("sluice-load: sink listening on {}", sink.addr());
        let mut tick = tokio::time::interval(a.report_every);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {
                    let s = sink.stats();
                    tracing::info!(connections = s.connections, messages = s.messages, duplicates = s.duplicates, limited = s.limited, "sink");
                }
            }
        }
        sink.shutdown();
        sink.tracker().flush()?;
        let s = sink.stats();
        let t = sink.tracker().report();
        println!(
            "connections {} messages {} recipients {} duplicates {} limited {}\nend to end: {}",
            s.connections,
            s.messages,
            s.recipients,
            s.duplicates,
            s.limited,
            t.end_to_end.line()
        );
        if let Some(path) = a.report {
            std::fs::write(&path, serde_json::to_vec_pretty(&t)?).with_context(|| format!("writing {}", path.display()))?;
        }
        return Ok(ExitCode::SUCCESS);
    };
    let mut fleet_config = FleetConfig::from_arg(&fleet_arg)?;
    if let Some(p) = a.port {
        fleet_config.port = p;
    }
    if a.seed.is_some() {
        fleet_config.seed = a.seed;
    }
    let options = sluice_load::sink::FleetOptions { ledger: a.ledger, dns: a.dns, record_messages: false };
    let fleet = Fleet::start(fleet_config, options).await?;
    for (p, s) in fleet.sinks() {
        eprintln!("sluice-load: {} on {} ({}; domains {})", p.name, s.addr(), p.mx_host(), p.domains.join(", "));
    }
    let mut tick = tokio::time::interval(a.report_every);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {
                let r = fleet.report();
                tracing::info!(messages = r.messages, unique = r.tracker.unique, duplicates = r.tracker.duplicates, p99_ms = r.tracker.end_to_end.p99_ms, "fleet");
            }
        }
    }
    fleet.shutdown();
    fleet.tracker().flush()?;
    let report = fleet.report();
    print!("{}", report.text());
    if let Some(path) = a.report {
        std::fs::write(&path, serde_json::to_vec_pretty(&report)?).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn run_dns(a: DnsArgs) -> Result<ExitCode> {
    let fleet = a.fleet.as_deref().map(FleetConfig::from_arg).transpose()?;
    let listen = a.listen.or(fleet.as_ref().map(|f| f.dns)).unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 5300)));
    let dns = TestDns::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    if let Some(f) = &fleet {
        f.add_records(&dns)?;
    }
    let mut next_pref = std::collections::HashMap::<String, u16>::new();
    for m in &a.mx {
        let (domain, host) = split_pair("mx", m)?;
        if host == "." {
            dns.add_null_mx(domain)?;
        } else {
            let pref = next_pref.entry(domain.to_ascii_lowercase()).or_insert(0);
            *pref += 10;
            dns.add_mx(domain, *pref, host)?;
        }
    }
    for r in &a.addresses {
        let (name, ip) = split_pair("a", r)?;
        let ip: IpAddr = ip.parse().with_context(|| format!("--a {r:?}: {ip:?} is not an IP address"))?;
        dns.add_ip(name, ip)?;
    }
    for t in &a.txt {
        let (name, text) = split_pair("txt", t)?;
        dns.add_txt(name, text)?;
    }
    eprintln!("sluice-load: DNS server on {} (UDP and TCP); Ctrl-C to stop", dns.addr());
    shutdown_signal().cancelled().await;
    Ok(ExitCode::SUCCESS)
}

fn compare(sent: PathBuf, received: PathBuf, json: bool, examples: usize) -> Result<ExitCode> {
    let c = ledger::compare_files(&sent, &received)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&c)?);
    } else {
        println!("{}", c.summary(examples));
    }
    Ok(if c.is_clean() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
