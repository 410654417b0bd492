//! The systems under test as child processes: sluice with a generated config, and a
//! throwaway Postfix instance (its own config and queue directories under the run's work
//! directory, never the system's /etc/postfix) relaying to the same mock ISPs.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::sink::FleetConfig;

/// The spool a sluice run uses.
#[derive(Clone, Debug)]
pub enum SpoolChoice {
    Local,
    Rados { conf: PathBuf, pool: String, namespace: String },
}

impl SpoolChoice {
    pub fn name(&self) -> &'static str {
        match self {
            SpoolChoice::Local => "local",
            SpoolChoice::Rados { .. } => "rados",
        }
    }
}

/// One DKIM signing key made for a benchmark run.
#[derive(Clone, Debug)]
pub struct DkimKey {
    pub domain: String,
    pub selector: String,
    pub private_key: PathBuf,
    /// `<selector>._domainkey.<domain>` and its TXT value, to publish in the test DNS.
    pub record_name: String,
    pub record_value: String,
}

/// How one sluice process of a benchmark is set up.
#[derive(Clone, Debug)]
pub struct SluiceSetup {
    pub spool: SpoolChoice,
    /// `edge` or `mta`; `None` runs both in one process (`all`).
    pub role: Option<&'static str>,
    /// Sign every message with these keys (all of one domain): `fallback = "platform"` with
    /// that domain, so mail whose From: has no key of its own is signed too.
    pub dkim: Vec<DkimKey>,
}

impl SluiceSetup {
    pub fn new(spool: SpoolChoice) -> SluiceSetup {
        SluiceSetup { spool, role: None, dkim: Vec::new() }
    }
}

/// Makes a signing key with `sluice dkim keygen` (RSA-2048, or Ed25519) into `dir`, and reads
/// the DNS record it prints.
pub async fn dkim_keygen(binary: &Path, dir: &Path, domain: &str, selector: &str, ed25519: bool) -> Result<DkimKey> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut command = Command::new(binary);
    command.args(["dkim", "keygen", "--domain", domain, "--selector", selector, "--out"]).arg(dir);
    if ed25519 {
        command.arg("--ed25519");
    }
    let out = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .context("sluice dkim keygen did not finish within 60 s")?
        .with_context(|| format!("cannot run {} dkim keygen", binary.display()))?;
    if !out.status.success() {
        bail!("sluice dkim keygen failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |key: &str| text.lines().find_map(|l| l.trim_start().strip_prefix(key)).map(|v| v.trim().to_string());
    let (Some(record_name), Some(record_value)) = (field("name:"), field("value:")) else {
        bail!("sluice dkim keygen printed no DNS record (name:/value: lines): {text}");
    };
    Ok(DkimKey {
        domain: domain.to_string(),
        selector: selector.to_string(),
        private_key: dir.canonicalize()?.join(format!("{selector}._domainkey.{domain}.pem")),
        record_name,
        record_value,
    })
}

/// A running `sluice serve`.
pub struct Sluice {
    child: Child,
    pub pid: u32,
    /// The edge's listeners (`None` for `role = "mta"`).
    pub http: Option<SocketAddr>,
    pub smtp: Option<SocketAddr>,
    pub log: PathBuf,
}

/// sluice's config for a benchmark: ephemeral listeners, the test DNS, the mock ISPs' port,
/// production defaults for everything else.
pub fn sluice_config(dir: &Path, api_key: &str, mx_port: u16, dns: SocketAddr, setup: &SluiceSetup) -> String {
    let hash = hex::encode(Sha256::digest(api_key.as_bytes()));
    let role = setup.role.map(|r| format!("role = \"{r}\"\n")).unwrap_or_default();
    let mut dkim = String::new();
    if let Some(first) = setup.dkim.first() {
        dkim.push_str(&format!("\n[dkim]\nfallback = \"platform\"\nplatform_domain = \"{}\"\n", first.domain));
        for k in &setup.dkim {
            dkim.push_str(&format!(
                "\n[[dkim.keys]]\ndomain = \"{}\"\nselector = \"{}\"\nprivate_key = \"{}\"\n",
                k.domain,
                k.selector,
                k.private_key.display()
            ));
        }
    }
    let spool = match &setup.spool {
        SpoolChoice::Local => "[spool]\nbackend = \"local\"\n".to_string(),
        SpoolChoice::Rados { conf, pool, namespace } => format!(
            "[spool]\nbackend = \"rados\"\n\n[spool.rados]\nconf = \"{}\"\npool = \"{pool}\"\nnamespace = \"{namespace}\"\n",
            conf.display()
        ),
    };
    format!(
        r#"data_dir = "{dir}"
{role}
{spool}
[admin]
listen = "127.0.0.1:0"

[[api_keys]]
name = "bench"
sha256 = "{hash}"

[http]
listen = "127.0.0.1:0"

[smtp]
listen = "127.0.0.1:0"
hostname = "sluice.bench.test"

[mta]
ehlo_hostname = "sluice.bench.test"
port = {mx_port}

[mta.resolver]
nameservers = ["{dns}"]
{dkim}"#,
        dir = dir.display()
    )
}

impl Sluice {
    /// Starts `binary serve` with `config` in `dir`, and waits for its ready line.
    pub async fn start(binary: &Path, dir: &Path, config: &str) -> Result<Sluice> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let config_path = dir.join("sluice.toml");
        std::fs::write(&config_path, config)?;
        let log = dir.join("sluice.log");
        let mut child = Command::new(binary)
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(&log)?))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot run {} (build it with `cargo build --release -p sluice`)", binary.display()))?;
        let pid = child.id().context("sluice exited at once")?;
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        let ready = tokio::time::timeout(Duration::from_secs(120), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(rest) = line.strip_prefix("sluice: ready (") {
                    return Ok(Some(rest.trim_end_matches(')').to_string()));
                }
            }
            Ok::<_, std::io::Error>(None)
        })
        .await;
        let fields = match ready {
            Ok(Ok(Some(fields))) => fields,
            _ => {
                let _ = child.start_kill();
                bail!("sluice did not get ready; see {}", log.display());
            }
        };
        // Keep draining stdout so sluice never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let addrs: HashMap<&str, &str> = fields.split(' ').filter_map(|kv| kv.split_once('=')).collect();
        let addr = |name: &str| -> Result<SocketAddr> {
            addrs.get(name).and_then(|a| a.parse().ok()).with_context(|| format!("no {name} address in sluice's ready line {fields:?}"))
        };
        let edge = addrs.contains_key("smtp");
        Ok(Sluice {
            pid,
            http: if edge { Some(addr("http")?) } else { None },
            smtp: if edge { Some(addr("smtp")?) } else { None },
            log,
            child,
        })
    }

    /// The SMTP listener of an edge.
    pub fn smtp(&self) -> SocketAddr {
        self.smtp.expect("an edge listens on SMTP")
    }

    /// The HTTP listener of an edge.
    pub fn http(&self) -> SocketAddr {
        self.http.expect("an edge listens on HTTP")
    }

    /// SIGTERM, then SIGKILL after 60 s.
    pub async fn stop(mut self) -> Result<()> {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        match tokio::time::timeout(Duration::from_secs(60), self.child.wait()).await {
            Ok(status) => {
                let status = status?;
                if !status.success() {
                    tracing::warn!(%status, log = %self.log.display(), "sluice exited with an error");
                }
            }
            Err(_) => {
                self.child.kill().await?;
                tracing::warn!("sluice did not stop within 60 s of SIGTERM; killed");
            }
        }
        Ok(())
    }
}

/// A throwaway Postfix instance.
pub struct Postfix {
    config_dir: PathBuf,
    pub master_pid: u32,
    pub smtp: SocketAddr,
    pub version: String,
}

/// Postfix's services, all outside a chroot (the queue directory is private to this run).
const MASTER_CF: &str = "\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
";

impl Postfix {
    pub fn available() -> bool {
        Path::new("/usr/sbin/postfix").exists() && Path::new("/usr/sbin/postconf").exists()
    }

    /// Configures and starts an instance in `dir` that accepts mail on `smtp` from loopback
    /// and relays each fleet domain to its provider's address on the fleet's port.
    pub async fn start(dir: &Path, smtp: SocketAddr, fleet: &FleetConfig, mx_port: u16) -> Result<Postfix> {
        let etc = dir.join("etc");
        let queue = dir.join("queue");
        let data = dir.join("data");
        for d in [&etc, &queue, &data] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let chown = |p: &Path| -> Result<()> {
            let status = std::process::Command::new("chown").arg("postfix:postfix").arg(p).status()?;
            if !status.success() {
                bail!("cannot chown {} to postfix (is the postfix user present?)", p.display());
            }
            Ok(())
        };
        chown(&data)?;
        let mut transport = String::new();
        for p in &fleet.providers {
            for d in &p.domains {
                transport.push_str(&format!("{d} smtp:[{}]:{mx_port}\n", p.address));
            }
        }
        std::fs::write(etc.join("transport"), transport)?;
        let main_cf = format!(
            "# A throwaway Postfix for sluice-load bench: relays the test domains to the mock ISPs.
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench.test
mydomain = bench.test
myorigin = $myhostname
mydestination =
local_recipient_maps =
relay_domains =
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_peername_lookup = no
smtpd_tls_security_level = none
smtp_tls_security_level = none
transport_maps = texthash:{etc}/transport
maillog_file = {dir}/maillog
maillog_file_prefixes = {dir}
biff = no
",
            queue = queue.display(),
            data = data.display(),
            etc = etc.display(),
            dir = dir.display(),
        );
        std::fs::write(etc.join("main.cf"), main_cf)?;
        let master_cf = format!("{} inet  n       -       n       -       -       smtpd\n{MASTER_CF}", smtp);
        std::fs::write(etc.join("master.cf"), master_cf)?;
        let out = std::process::Command::new("/usr/sbin/postfix").arg("-c").arg(&etc).arg("start").output()?;
        if !out.status.success() {
            // Postfix prints its reasons only to a terminal (or syslog): ask again through
            // script(1) to see them.
            let why = std::process::Command::new("script")
                .arg("-qc")
                .arg(format!("/usr/sbin/postfix -c {} check", etc.display()))
                .arg("/dev/null")
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default();
            bail!("postfix did not start: {} {why}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let pid_file = queue.join("pid/master.pid");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let master_pid = loop {
            if let Some(pid) = std::fs::read_to_string(&pid_file).ok().and_then(|s| s.trim().parse::<u32>().ok()) {
                if tokio::net::TcpStream::connect(smtp).await.is_ok() {
                    break pid;
                }
            }
            if tokio::time::Instant::now() > deadline {
                bail!("postfix did not listen on {smtp} within 30 s; see {}/maillog", dir.display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let version = std::process::Command::new("/usr/sbin/postconf")
            .args(["-d", "-h", "mail_version"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        Ok(Postfix { config_dir: etc, master_pid, smtp, version })
    }

    /// `postfix stop` (and `abort` if that fails).
    pub fn stop(self) {
        let run = |cmd: &str| {
            std::process::Command::new("/usr/sbin/postfix")
                .arg("-c")
                .arg(&self.config_dir)
                .arg(cmd)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        if !run("stop") {
            run("abort");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sluice_configs_use_the_key_hash_and_the_spool() {
        let dns = "127.0.0.1:5300".parse().unwrap();
        let c = sluice_config(Path::new("/tmp/x"), "k", 2600, dns, &SluiceSetup::new(SpoolChoice::Local));
        assert!(c.contains(&hex::encode(Sha256::digest(b"k"))));
        assert!(c.contains("port = 2600"));
        assert!(c.contains("nameservers = [\"127.0.0.1:5300\"]"));
        assert!(c.contains("backend = \"local\""));
        let parsed: toml::Value = toml::from_str(&c).unwrap();
        assert!(parsed.get("role").is_none() && parsed.get("dkim").is_none(), "{c}");
        let rados = SpoolChoice::Rados { conf: "/c/ceph.conf".into(), pool: "sluice".into(), namespace: "b1".into() };
        let setup = SluiceSetup { role: Some("edge"), ..SluiceSetup::new(rados) };
        let c = sluice_config(Path::new("/tmp/x"), "k", 1, "127.0.0.1:1".parse().unwrap(), &setup);
        assert!(c.contains("[spool.rados]") && c.contains("namespace = \"b1\""));
        let parsed: toml::Value = toml::from_str(&c).unwrap();
        assert_eq!(parsed["spool"]["backend"].as_str(), Some("rados"));
        assert_eq!(parsed["role"].as_str(), Some("edge"));
    }

    #[test]
    fn dkim_setups_sign_everything_with_the_platform_domain() {
        let key = |selector: &str| DkimKey {
            domain: "dkim.bench.test".into(),
            selector: selector.into(),
            private_key: format!("/k/{selector}.pem").into(),
            record_name: String::new(),
            record_value: String::new(),
        };
        let setup = SluiceSetup { dkim: vec![key("rsa"), key("ed")], ..SluiceSetup::new(SpoolChoice::Local) };
        let c = sluice_config(Path::new("/tmp/x"), "k", 1, "127.0.0.1:1".parse().unwrap(), &setup);
        let parsed: toml::Value = toml::from_str(&c).unwrap();
        let dkim = &parsed["dkim"];
        assert_eq!(dkim["fallback"].as_str(), Some("platform"));
        assert_eq!(dkim["platform_domain"].as_str(), Some("dkim.bench.test"));
        let keys = dkim["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[1]["selector"].as_str(), Some("ed"));
        assert_eq!(keys[1]["private_key"].as_str(), Some("/k/ed.pem"));
    }
}
