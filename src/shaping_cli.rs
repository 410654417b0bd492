//! `sluice shaping ...`: look at and steer the traffic shaping of a running MTA through its
//! admin API, check shaping data, and explain which limits apply to a domain.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Subcommand;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

use crate::config::Config;

#[derive(Subcommand)]
pub enum ShapingCommand {
    /// Every path of a running MTA: ready mail, connections, rate, limits, suspensions and throttles.
    Status {
        #[command(flatten)]
        target: Target,
        /// Print the admin API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Which provider and limits apply to mail for DOMAIN (and, on a running MTA, what is
    /// suspended or throttled now).
    Explain {
        domain: String,
        /// Take this as the first MX host instead of looking it up.
        #[arg(long)]
        mx: Option<String>,
        /// The egress pool (default: the configured default pool).
        #[arg(long)]
        pool: Option<String>,
        /// Work from the config file alone, without asking a running MTA.
        #[arg(long)]
        offline: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Stop sending to a provider, from a source IP, or on one path, for a while.
    Suspend {
        #[arg(long)]
        provider: Option<String>,
        /// A source IP of the egress pools (or `default`).
        #[arg(long)]
        source: Option<String>,
        /// How long: 90s, 30m, 4h.
        #[arg(long = "for", value_parser = humantime::parse_duration)]
        duration: Duration,
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Lift suspensions and throttles (rule-made or an operator's).
    Resume {
        #[arg(long)]
        provider: Option<String>,
        #[arg(long)]
        source: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Re-read the shaping data of a running MTA (a broken file is refused, the old data stays).
    Reload {
        #[command(flatten)]
        target: Target,
    },
    /// Check the shaping data and egress pools of a config file against its rules table.
    Check {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

/// Which running sluice to talk to.
#[derive(clap::Args)]
pub struct Target {
    /// The admin API, e.g. `127.0.0.1:9025` (default: `admin.listen` of --config, or 127.0.0.1:9025).
    #[arg(long)]
    admin: Option<String>,
    /// The config file of that sluice.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

impl Target {
    fn config(&self) -> anyhow::Result<Config> {
        Ok(Config::load(self.config.as_deref())?)
    }

    fn address(&self) -> anyhow::Result<String> {
        match &self.admin {
            Some(a) => Ok(a.trim_start_matches("http://").trim_end_matches('/').to_string()),
            None => Ok(self.config()?.admin.listen.to_string()),
        }
    }
}

pub fn run(command: ShapingCommand) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("start the async runtime")?;
    rt.block_on(run_async(command))
}

async fn run_async(command: ShapingCommand) -> anyhow::Result<()> {
    match command {
        ShapingCommand::Status { target, json } => {
            let status = call(&target, Method::GET, "/admin/shaping", None).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
        }
        ShapingCommand::Explain { domain, mx, pool, offline, target } => {
            let e = if offline {
                let config = target.config()?;
                let files = config.rules.files.clone();
                let engine = tokio::task::spawn_blocking(move || sluice_rules::Engine::load(files))
                    .await?
                    .context("cannot load the rules table (section [rules])")?;
                let e = sluice_mta::explain_offline(&config.mta, Arc::new(engine), &domain, mx.as_deref(), pool.as_deref()).await?;
                serde_json::to_value(e)?
            } else {
                let mut q = format!("/admin/shaping/explain?domain={}", encode(&domain));
                if let Some(m) = &mx {
                    q.push_str(&format!("&mx={}", encode(m)));
                }
                if let Some(p) = &pool {
                    q.push_str(&format!("&pool={}", encode(p)));
                }
                call(&target, Method::GET, &q, None).await?
            };
            print_explanation(&e);
        }
        ShapingCommand::Suspend { provider, source, duration, reason, target } => {
            if provider.is_none() && source.is_none() {
                bail!("name --provider, --source, or both");
            }
            let body = json!({
                "provider": provider, "source": source,
                "duration": humantime::format_duration(duration).to_string(), "reason": reason,
            });
            let r = call(&target, Method::POST, "/admin/shaping/suspend", Some(body)).await?;
            println!("suspended {} path(s) now for {}; paths first used later are suspended too", r["suspended_paths"], r["duration"].as_str().unwrap_or(""));
        }
        ShapingCommand::Resume { provider, source, target } => {
            let r = call(&target, Method::POST, "/admin/shaping/resume", Some(json!({ "provider": provider, "source": source }))).await?;
            println!("resumed {} path(s)", r["resumed_paths"]);
        }
        ShapingCommand::Reload { target } => {
            let r = call(&target, Method::POST, "/admin/shaping/reload", None).await?;
            println!("shaping data reloaded: version {}", r["version"].as_str().unwrap_or("?"));
        }
        ShapingCommand::Check { config } => {
            let config = Config::load(config.as_deref())?;
            let files = config.rules.files.clone();
            let engine = tokio::task::spawn_blocking(move || sluice_rules::Engine::load(files))
                .await?
                .context("cannot load the rules table (section [rules])")?;
            let egress = sluice_mta::shaping::Egress::new(&config.mta.egress, &config.mta.ehlo_hostname);
            config.mta.egress.check_addresses().map_err(|e| anyhow::anyhow!("mta.{e}"))?;
            let shaping = sluice_mta::shaping::Shaping::load(config.mta.base_limits(), config.mta.shaping.clone(), egress, Arc::new(engine))?;
            let sources: Vec<String> = shaping.egress().sources().iter().map(|s| format!("{} ({})", s.id, s.ehlo)).collect();
            println!("shaping data ok: version {}, files {:?}", shaping.version(), config.mta.shaping.files);
            println!("egress sources: {}", sources.join(", "));
        }
    }
    Ok(())
}

/// Percent-encodes a query value (domains and host names need little).
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One admin API call; a non-2xx answer becomes an error with the server's message.
async fn call(target: &Target, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
    let addr = target.address()?;
    let limit = Duration::from_secs(30);
    let tcp = tokio::time::timeout(limit, tokio::net::TcpStream::connect(&addr))
        .await
        .map_err(|_| anyhow::anyhow!("no answer from the admin API at {addr} within {}s", limit.as_secs()))?
        .with_context(|| format!("cannot reach the admin API at {addr} (is sluice running? set --admin or --config)"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.context("HTTP handshake with the admin API")?;
    tokio::spawn(conn);
    let bytes = body.map(|b| b.to_string()).unwrap_or_default();
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, &addr)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(bytes)))
        .context("build the request")?;
    let resp = tokio::time::timeout(limit, sender.send_request(req))
        .await
        .map_err(|_| anyhow::anyhow!("the admin API at {addr} did not answer within {}s", limit.as_secs()))?
        .context("admin API request")?;
    let status = resp.status();
    let raw = resp.into_body().collect().await.context("read the admin API's answer")?.to_bytes();
    let value: Value = serde_json::from_slice(&raw).unwrap_or_else(|_| json!({ "error": String::from_utf8_lossy(&raw) }));
    if !status.is_success() {
        bail!("{addr}{path}: {status}: {}", value["error"].as_str().unwrap_or(&value.to_string()));
    }
    Ok(value)
}

fn rate(v: &Value) -> String {
    v.as_str().map(String::from).unwrap_or_else(|| "-".into())
}

fn print_status(s: &Value) {
    println!("shaping data {}; {} message(s) in ready queues", s["version"].as_str().unwrap_or("?"), s["ready"]);
    let paths = s["paths"].as_array().cloned().unwrap_or_default();
    if paths.is_empty() {
        println!("no paths yet (nothing has been delivered since the start)");
        return;
    }
    println!("{:<24} {:<16} {:>6} {:>6} {:>8}  {:<28} state", "provider", "source", "ready", "conns", "msg/s", "limits (conns, rate)");
    for p in paths {
        let limits = &p["limits"];
        let limit = format!("{}, {}", limits["max_connections"], rate(&limits["message_rate"]));
        let mut state = Vec::new();
        if let Some(s) = p["suspension"].as_object() {
            state.push(format!("SUSPENDED until {} by {} ({})", when(&s["until"]), s["cause"]["by"].as_str().unwrap_or(""), s["cause"]["reason"].as_str().unwrap_or("")));
        }
        if let Some(t) = p["throttle"].as_object() {
            state.push(format!("throttled until {} by {}", when(&t["until"]), t["cause"]["by"].as_str().unwrap_or("")));
        }
        for b in p["backing_off"].as_array().into_iter().flatten() {
            state.push(format!("site {} backing off until {}", b[0].as_str().unwrap_or(""), when(&b[1])));
        }
        println!(
            "{:<24} {:<16} {:>6} {:>6} {:>8}  {:<28} {}",
            p["provider"].as_str().unwrap_or(""),
            p["source"].as_str().unwrap_or(""),
            p["ready"],
            p["connections"],
            p["rate_per_second"],
            limit,
            if state.is_empty() { "ok".to_string() } else { state.join("; ") }
        );
    }
}

fn when(ms: &Value) -> String {
    let Some(ms) = ms.as_u64() else { return "?".into() };
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| ms.to_string())
}

fn print_explanation(e: &Value) {
    let provider = e["provider"].as_str().unwrap_or("");
    let how = match (e["known_provider"].as_bool().unwrap_or(false), e["mx"].as_str()) {
        (true, Some(mx)) => format!("provider {provider} (MX {mx})"),
        (true, None) => format!("provider {provider} (by its domain)"),
        (false, Some(mx)) => format!("no provider claims it (MX {mx}): shaped on its own, with the default limits"),
        (false, None) => "no provider claims it: shaped on its own, with the default limits".to_string(),
    };
    println!("{}: {how}; egress pool {}", e["domain"].as_str().unwrap_or(""), e["pool"].as_str().unwrap_or(""));
    for p in e["paths"].as_array().into_iter().flatten() {
        println!("  from {} (EHLO {}, weight {}):", p["source"].as_str().unwrap_or(""), p["ehlo"].as_str().unwrap_or(""), p["weight"]);
        let from = |key: &str| {
            p["from"].as_array().into_iter().flatten().find(|o| o["key"] == key).and_then(|o| o["from"].as_str()).unwrap_or("").to_string()
        };
        let limits = p["limits"].as_object().cloned().unwrap_or_default();
        for (key, value) in limits {
            let shown = match &value {
                Value::Null => "none".to_string(),
                Value::String(s) => s.clone(),
                v => v.to_string(),
            };
            println!("    {key:<32} {shown:<12} from {}", from(&key));
        }
        if let Some(s) = p["suspension"].as_object() {
            println!("    SUSPENDED until {} by {}: {}", when(&s["until"]), s["cause"]["by"].as_str().unwrap_or(""), s["cause"]["reason"].as_str().unwrap_or(""));
        }
        if let Some(t) = p["throttle"].as_object() {
            println!(
                "    throttled until {} by {} (to {} msg/min, {} connections): {}",
                when(&t["until"]),
                t["cause"]["by"].as_str().unwrap_or(""),
                t["messages_per_minute"],
                t["connections"],
                t["cause"]["reason"].as_str().unwrap_or("")
            );
        }
    }
}
