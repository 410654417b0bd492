//! The test bench: a TestDns, a Sink, a temporary LocalSpool, an event log file, and an MTA
//! configured to use them.

#![allow(dead_code)] // each test file uses a different part of the bench

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use sluice_events::EventLog;
use sluice_load::dns::TestDns;
use sluice_load::sink::{Sink, SinkConfig};
use sluice_mta::{Mta, MtaConfig};
use sluice_rules::{Builtin, Classify, Context, Outcome, Reply, Stage};
use sluice_spool::{now_ms, LocalSpool, LocalSpoolOptions, Message, MessageId, MessageMeta, Recipient, Spool};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Upper bound for waiting on something that should happen; never a timing assertion.
pub const WAIT: Duration = Duration::from_secs(30);

/// A classifier that remembers what it saw and delegates to the built-in rules.
#[derive(Default)]
pub struct Recording {
    pub seen: Mutex<Vec<Seen>>,
}

#[derive(Clone, Debug)]
pub struct Seen {
    pub reply: Reply,
    pub stage: Option<Stage>,
    pub mx_host: Option<String>,
    pub domain: Option<String>,
}

impl Classify for Recording {
    fn classify(&self, reply: &Reply, ctx: &Context<'_>) -> Outcome {
        self.seen.lock().unwrap().push(Seen {
            reply: reply.clone(),
            stage: ctx.stage,
            mx_host: ctx.mx_host.map(String::from),
            domain: ctx.domain.map(String::from),
        });
        Builtin.classify(reply, ctx)
    }
}

pub struct Bench {
    pub dns: TestDns,
    pub sink: Sink,
    pub spool: Arc<dyn Spool>,
    /// The same spool, as the suppression list it also is.
    pub local: Arc<LocalSpool>,
    pub events: EventLog,
    pub events_path: PathBuf,
    pub classifier: Arc<Recording>,
    _dir: tempfile::TempDir,
}

/// A running MTA.
pub struct Running {
    pub cancel: CancellationToken,
    pub waker: Arc<tokio::sync::Notify>,
    handle: JoinHandle<()>,
}

impl Running {
    /// Cancels and waits until `run` returned.
    pub async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(WAIT, self.handle).await.expect("MTA stops after cancel").unwrap();
    }
}

impl Bench {
    pub async fn new(sink: SinkConfig) -> Bench {
        let dir = tempfile::tempdir().unwrap();
        let local = Arc::new(LocalSpool::open(LocalSpoolOptions::new(dir.path().join("spool"))).unwrap());
        let spool: Arc<dyn Spool> = local.clone();
        let events_path = dir.path().join("events.jsonl");
        let events = EventLog::open(&events_path).await.unwrap();
        Bench {
            dns: TestDns::start().await.unwrap(),
            sink: Sink::start(sink).await.unwrap(),
            spool,
            local,
            events,
            events_path,
            classifier: Arc::new(Recording::default()),
            _dir: dir,
        }
    }

    /// `domain` has one MX, `mx.<domain>`, at 127.0.0.1 (where the sink listens).
    pub fn mx_to_sink(&self, domain: &str) {
        self.dns.add_mx(domain, 10, &format!("mx.{domain}")).unwrap();
        self.dns.add_a(&format!("mx.{domain}"), Ipv4Addr::LOCALHOST).unwrap();
    }

    /// An MTA configuration pointing at the bench's DNS and the sink's port, with retries
    /// far in the future unless a test shortens them.
    pub fn config(&self) -> MtaConfig {
        let mut c = MtaConfig {
            ehlo_hostname: "mta.test".into(),
            max_concurrent_deliveries: 4,
            lease_batch: 50,
            max_messages_per_connection: 10,
            idle_poll: Duration::from_millis(50),
            port: self.sink.addr().port(),
            ..MtaConfig::default()
        };
        c.resolver.nameservers = vec![self.dns.addr()];
        c.resolver.timeout = Duration::from_secs(2);
        c.resolver.attempts = 1;
        c.retry.initial = Duration::from_secs(3600);
        c.timeouts.idle = Duration::ZERO;
        c
    }

    pub fn start(&self, config: MtaConfig) -> Running {
        let mta = Mta::new(config, self.spool.clone(), self.events.clone(), self.classifier.clone()).unwrap();
        Self::run(mta)
    }

    /// Starts an MTA that DKIM-signs with `dkim`.
    pub fn start_with_dkim(&self, config: MtaConfig, dkim: sluice_mta::dkim::DkimSigning) -> Running {
        let mta = Mta::new(config, self.spool.clone(), self.events.clone(), self.classifier.clone()).unwrap();
        Self::run(mta.with_dkim(Arc::new(dkim)))
    }

    /// Runs an MTA a test built itself.
    pub fn run(mta: Mta) -> Running {
        let waker = mta.waker();
        let cancel = CancellationToken::new();
        let handle = tokio::spawn(mta.run(cancel.clone()));
        Running { cancel, waker, handle }
    }

    /// Enqueues a message to `rcpts` (all at `domain`) and returns its id.
    pub async fn enqueue(&self, domain: &str, rcpts: &[&str], body: &str) -> MessageId {
        let msg = message(domain, rcpts, body);
        let id = msg.meta.id;
        self.spool.enqueue(vec![msg]).await.unwrap();
        id
    }

    /// Waits until the event log holds at least `n` events and returns them all.
    pub async fn events(&self, n: usize) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let text = std::fs::read_to_string(&self.events_path).unwrap_or_default();
            let events: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
            if events.len() >= n || tokio::time::Instant::now() > deadline {
                assert!(events.len() >= n, "expected {n} events, got {events:?}");
                return events;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The one event for `email`.
    pub async fn event_for(&self, n: usize, email: &str) -> Value {
        let all = self.events(n).await;
        let mut mine: Vec<Value> = all.into_iter().filter(|e| e["email"] == email).collect();
        assert_eq!(mine.len(), 1, "one event for {email}: {mine:?}");
        mine.remove(0)
    }

    pub async fn meta(&self, id: MessageId) -> Option<MessageMeta> {
        self.spool.get(id).await.unwrap()
    }
}

pub fn message(domain: &str, rcpts: &[&str], body: &str) -> Message {
    let now = now_ms();
    Message {
        meta: MessageMeta {
            id: MessageId::new(),
            queue: domain.to_string(),
            tenant: "test".into(),
            mail_from: "sender@origin.test".into(),
            recipients: rcpts.iter().map(|r| Recipient::pending(*r)).collect(),
            x_message_id: "XMSG".into(),
            smtp_id: "<m1@origin.test>".into(),
            categories: Vec::new(),
            custom_args: Default::default(),
            ip_pool: None,
            created_at: now,
            due_at: now,
            expires_at: now + 72 * 3_600_000,
            attempts: 0,
            last_reply: None,
            prepend_headers: None,
        },
        body: Bytes::from(body.to_string()),
    }
}

/// A UDP port with nothing behind it (a DNS server that is down).
pub async fn dead_udp_port() -> SocketAddr {
    let s = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.local_addr().unwrap()
}

pub fn loopback(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}
