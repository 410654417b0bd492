//! A small authoritative DNS responder for tests and local runs: MX (including the null MX
//! `0 .`), A, AAAA and TXT records held in memory, answered over UDP and TCP on one port.
//!
//! Written on `hickory_resolver::proto` rather than with hickory-server because a test
//! server needs no zone files, SOA bookkeeping or catalog: a map lookup per query is all.
//! Records can be changed while it runs. Unknown names get NXDOMAIN, known names without
//! the asked type get NODATA; both carry an SOA so resolvers cache them per its TTL.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use hickory_resolver::proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, AAAA, MX, SOA, TXT};
use hickory_resolver::proto::rr::{Name, RData, Record};
pub use hickory_resolver::proto::rr::RecordType;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;

/// A name that is not a valid DNS name.
#[derive(Debug, thiserror::Error)]
#[error("invalid DNS name {name:?}: {reason}")]
pub struct InvalidName {
    pub name: String,
    pub reason: String,
}

/// The records being served, keyed by lower-case FQDN.
struct Zone {
    records: HashMap<(String, RecordType), Vec<RData>>,
    servfail: HashSet<String>,
    ttl: u32,
}

impl Zone {
    fn knows(&self, name: &str) -> bool {
        self.records.keys().any(|(n, _)| n == name)
    }
}

/// A running test DNS server. Stops when dropped.
pub struct TestDns {
    addr: SocketAddr,
    zone: Arc<RwLock<Zone>>,
    queries: Arc<AtomicU64>,
    asked: Asked,
    cancel: CancellationToken,
}

/// Queries answered, per lower-case FQDN and type.
type Asked = Arc<Mutex<HashMap<(String, RecordType), u64>>>;

/// `name` as a lower-case FQDN with a trailing dot, checked to be a valid DNS name.
fn fqdn(name: &str) -> Result<(String, Name), InvalidName> {
    let mut s = name.trim().to_ascii_lowercase();
    if !s.ends_with('.') {
        s.push('.');
    }
    let parsed = Name::from_ascii(&s).map_err(|e| InvalidName { name: name.to_string(), reason: e.to_string() })?;
    Ok((s, parsed))
}

impl TestDns {
    /// Starts a server on 127.0.0.1 with a free port.
    pub async fn start() -> io::Result<TestDns> {
        TestDns::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await
    }

    /// Starts a server on `addr` (UDP and TCP on the same port). With port 0 a free port is
    /// chosen; if TCP cannot get the port UDP got, another one is tried.
    pub async fn bind(addr: SocketAddr) -> io::Result<TestDns> {
        let mut last_err = None;
        for _ in 0..16 {
            let udp = UdpSocket::bind(addr).await?;
            let bound = udp.local_addr()?;
            match TcpListener::bind(bound).await {
                Ok(tcp) => return Ok(TestDns::serve(udp, tcp)),
                Err(e) if addr.port() == 0 => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("no free port for UDP and TCP")))
    }

    fn serve(udp: UdpSocket, tcp: TcpListener) -> TestDns {
        let addr = udp.local_addr().expect("bound socket has an address");
        let zone = Arc::new(RwLock::new(Zone { records: HashMap::new(), servfail: HashSet::new(), ttl: 60 }));
        let queries = Arc::new(AtomicU64::new(0));
        let asked = Asked::default();
        let cancel = CancellationToken::new();
        let responder = Responder { zone: zone.clone(), queries: queries.clone(), asked: asked.clone() };
        tokio::spawn(serve_udp(udp, responder.clone(), cancel.clone()));
        tokio::spawn(serve_tcp(tcp, responder, cancel.clone()));
        TestDns { addr, zone, queries, asked, cancel }
    }

    /// Where the server listens (UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many queries were answered so far.
    pub fn query_count(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }

    /// How many queries for `name` and `rtype` were answered so far (e.g. to see that a
    /// resolver cached an answer).
    pub fn queries_for(&self, name: &str, rtype: RecordType) -> u64 {
        let Ok((key, _)) = fqdn(name) else { return 0 };
        self.asked.lock().expect("query log lock").get(&(key, rtype)).copied().unwrap_or(0)
    }

    /// The TTL given to every record and negative answer from now on (default 60 s).
    pub fn set_ttl(&self, seconds: u32) {
        self.zone.write().expect("zone lock").ttl = seconds;
    }

    fn add(&self, name: &str, rdata: RData) -> Result<(), InvalidName> {
        let (key, _) = fqdn(name)?;
        let rtype = rdata.record_type();
        self.zone.write().expect("zone lock").records.entry((key, rtype)).or_default().push(rdata);
        Ok(())
    }

    /// Adds an MX record `domain. MX preference exchange.`.
    pub fn add_mx(&self, domain: &str, preference: u16, exchange: &str) -> Result<(), InvalidName> {
        let (_, exchange) = fqdn(exchange)?;
        self.add(domain, RData::MX(MX::new(preference, exchange)))
    }

    /// Adds the null MX `domain. MX 0 .` (RFC 7505: the domain accepts no mail).
    pub fn add_null_mx(&self, domain: &str) -> Result<(), InvalidName> {
        self.add(domain, RData::MX(MX::new(0, Name::root())))
    }

    /// Adds an A or AAAA record, depending on the address family.
    pub fn add_ip(&self, name: &str, ip: IpAddr) -> Result<(), InvalidName> {
        match ip {
            IpAddr::V4(v4) => self.add_a(name, v4),
            IpAddr::V6(v6) => self.add_aaaa(name, v6),
        }
    }

    pub fn add_a(&self, name: &str, ip: Ipv4Addr) -> Result<(), InvalidName> {
        self.add(name, RData::A(A(ip)))
    }

    pub fn add_aaaa(&self, name: &str, ip: Ipv6Addr) -> Result<(), InvalidName> {
        self.add(name, RData::AAAA(AAAA(ip)))
    }

    /// Adds a TXT record; long text is split into the 255-byte strings DNS requires.
    pub fn add_txt(&self, name: &str, text: &str) -> Result<(), InvalidName> {
        let mut parts = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let mut cut = rest.len().min(255);
            while !rest.is_char_boundary(cut) {
                cut -= 1;
            }
            parts.push(rest[..cut].to_string());
            rest = &rest[cut..];
        }
        if parts.is_empty() {
            parts.push(String::new());
        }
        self.add(name, RData::TXT(TXT::new(parts)))
    }

    /// Removes every record of `name`: it answers NXDOMAIN from now on.
    pub fn remove(&self, name: &str) -> Result<(), InvalidName> {
        let (key, _) = fqdn(name)?;
        self.zone.write().expect("zone lock").records.retain(|(n, _), _| *n != key);
        Ok(())
    }

    /// Makes queries for `name` fail with SERVFAIL (a broken authoritative server), or
    /// answer normally again.
    pub fn set_servfail(&self, name: &str, fail: bool) -> Result<(), InvalidName> {
        let (key, _) = fqdn(name)?;
        let mut zone = self.zone.write().expect("zone lock");
        if fail {
            zone.servfail.insert(key);
        } else {
            zone.servfail.remove(&key);
        }
        Ok(())
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

#[derive(Clone)]
struct Responder {
    zone: Arc<RwLock<Zone>>,
    queries: Arc<AtomicU64>,
    asked: Asked,
}

impl Responder {
    /// The wire-format answer to a wire-format query; `None` for garbage (dropped, as a
    /// real server would). `max_len` truncates UDP answers that do not fit.
    fn answer(&self, packet: &[u8], max_len: Option<usize>) -> Option<Vec<u8>> {
        let query = Message::from_vec(packet).ok()?;
        if query.metadata.message_type != MessageType::Query {
            return None;
        }
        self.queries.fetch_add(1, Ordering::Relaxed);
        let mut resp = Message::response(query.metadata.id, query.metadata.op_code);
        resp.metadata.authoritative = true;
        resp.metadata.recursion_desired = query.metadata.recursion_desired;
        resp.metadata.recursion_available = true;
        resp.add_queries(query.queries.iter().cloned());
        if let Some(edns) = &query.edns {
            let mut e = Edns::new();
            e.set_max_payload(edns.max_payload().max(512));
            resp.set_edns(e);
        }
        match (query.metadata.op_code, query.queries.first()) {
            (OpCode::Query, Some(q)) => {
                let mut name = q.name.to_lowercase().to_ascii();
                if !name.ends_with('.') {
                    name.push('.');
                }
                *self.asked.lock().expect("query log lock").entry((name, q.query_type)).or_insert(0) += 1;
                self.fill(&mut resp, &q.name, q.query_type)
            }
            _ => resp.metadata.response_code = ResponseCode::NotImp,
        }
        let mut bytes = resp.to_vec().ok()?;
        let limit = max_len.map(|l| l.max(query.max_payload() as usize));
        if limit.is_some_and(|l| bytes.len() > l) {
            // Too big for UDP: say so, and the resolver asks again over TCP.
            bytes = resp.truncate().to_vec().ok()?;
        }
        Some(bytes)
    }

    fn fill(&self, resp: &mut Message, qname: &Name, qtype: RecordType) {
        let zone = self.zone.read().expect("zone lock");
        let mut key = qname.to_lowercase().to_ascii();
        if !key.ends_with('.') {
            key.push('.');
        }
        if zone.servfail.contains(&key) {
            resp.metadata.response_code = ResponseCode::ServFail;
            return;
        }
        if let Some(rdatas) = zone.records.get(&(key.clone(), qtype)) {
            for rdata in rdatas {
                resp.add_answer(Record::from_rdata(qname.clone(), zone.ttl, rdata.clone()));
            }
            return;
        }
        if !zone.knows(&key) {
            resp.metadata.response_code = ResponseCode::NXDomain;
        }
        // NXDOMAIN or NODATA: the SOA tells resolvers how long to cache the negative answer.
        let soa = SOA::new(Name::root(), Name::root(), 1, 3600, 600, 86400, zone.ttl);
        resp.add_authority(Record::from_rdata(qname.clone(), zone.ttl, RData::SOA(soa)));
    }
}

async fn serve_udp(socket: UdpSocket, responder: Responder, cancel: CancellationToken) {
    let mut buf = vec![0u8; 65_535];
    loop {
        let (len, peer) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                // ICMP errors from earlier replies surface here on some systems; keep serving.
                Err(_) => continue,
            },
            _ = cancel.cancelled() => return,
        };
        if let Some(reply) = responder.answer(&buf[..len], Some(512)) {
            let _ = socket.send_to(&reply, peer).await;
        }
    }
}

async fn serve_tcp(listener: TcpListener, responder: Responder, cancel: CancellationToken) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => continue,
            },
            _ = cancel.cancelled() => return,
        };
        let (responder, cancel) = (responder.clone(), cancel.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = serve_tcp_connection(stream, responder) => {}
                _ = cancel.cancelled() => {}
            }
        });
    }
}

/// DNS over TCP: each message is preceded by its length as two bytes (RFC 1035 §4.2.2).
async fn serve_tcp_connection(mut stream: TcpStream, responder: Responder) -> io::Result<()> {
    loop {
        let len = stream.read_u16().await? as usize;
        let mut packet = vec![0u8; len];
        stream.read_exact(&mut packet).await?;
        if let Some(reply) = responder.answer(&packet, None) {
            stream.write_u16(reply.len() as u16).await?;
            stream.write_all(&reply).await?;
        }
    }
}
