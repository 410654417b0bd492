//! The RADOS spool: one queue in a replicated Ceph pool, shared by every edge and MTA process.
//!
//! - Edges keep bodies up to `inline_body_max` inside their index entry; larger bodies are
//!   objects of their own, written first (asynchronously, all in flight at once). Then the
//!   batch's index entries go to one index shard in a single omap write. Index writes to a
//!   shard are group-committed: entries that arrive while a write is in flight go out
//!   together in the next one. `enqueue` returns only after RADOS acknowledged the
//!   replicated writes.
//! - MTA processes own shards ([`shards`]) and lease from their own shards only; leasing moves
//!   index entries to the lease deadline (so a dead worker's messages come back by
//!   themselves), rescheduling moves them to the next attempt, completing removes them. Each
//!   of these is one atomic omap write that also asserts the shard lock.
//! - A sweeper removes orphans in the shards a process owns: body objects whose index entry
//!   is gone (a crash between writing the body and the index, or between removing them), and
//!   index entries whose body object is gone (only after data loss or a bug, since the body is
//!   written first: logged as an error and counted).
//!
//! The layout is in [`layout`]; all `unsafe` is in [`client`].

mod client;
mod ffi;
mod layout;
mod shards;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};

pub use client::{join_shutdowns, ConnectOptions, RadosError};
use client::{OmapQuery, Rados, WriteOp};
use layout::*;
use shards::Ownership;

use crate::spool::{Lease, LeaseRequest, Leased, Spool, SpoolCounts};
use crate::suppression::{self, suppression_key, Suppression, SuppressionList};
use crate::{now_ms, Message, MessageId, MessageMeta, SpoolError};

impl From<RadosError> for SpoolError {
    fn from(e: RadosError) -> Self {
        if e.is_unavailable() {
            SpoolError::Unavailable(e.to_string())
        } else {
            SpoolError::Storage(e.to_string())
        }
    }
}

/// Options for [`RadosSpool::open`].
#[derive(Clone, Debug)]
pub struct RadosSpoolOptions {
    /// ceph.conf of the cluster (its keyring is found through it).
    pub conf: PathBuf,
    pub pool: String,
    /// The cephx user, without `client.`.
    pub user: String,
    /// A RADOS namespace inside the pool, to run several independent spools in one pool.
    pub namespace: Option<String>,
    /// Number of index shards; used only when the spool is first created in the pool.
    pub shards: u32,
    /// Timeout of every RADOS operation: an unhealthy or full cluster fails writes after this
    /// long (the edge answers 4xx/503) instead of hanging.
    pub op_timeout: Duration,
    /// Take part in delivery: own shards and lease from them (MTA role). Edge-only processes
    /// only enqueue.
    pub own_shards: bool,
    /// How long a shard lock lasts without renewal: the time to take over a dead worker's shards.
    pub shard_lease: Duration,
    /// How often the sweeper looks for orphaned objects (0 = never).
    pub sweep_interval: Duration,
    /// An orphaned body is removed only when it is older than this (longer than any enqueue).
    pub orphan_age: Duration,
    /// Bodies up to this size live inside their index entry (one batched omap write per
    /// request, no object per message); larger ones are objects of their own.
    pub inline_body_max: usize,
}

impl RadosSpoolOptions {
    pub fn new(conf: impl Into<PathBuf>, pool: impl Into<String>) -> Self {
        RadosSpoolOptions {
            conf: conf.into(),
            pool: pool.into(),
            user: "admin".into(),
            namespace: None,
            shards: 16,
            op_timeout: Duration::from_secs(10),
            own_shards: true,
            shard_lease: Duration::from_secs(15),
            sweep_interval: Duration::from_secs(600),
            orphan_age: Duration::from_secs(600),
            inline_body_max: 64 * 1024,
        }
    }
}

struct LeaseState {
    token: u64,
    shard: u32,
    /// The index key while leased (due = the lease deadline).
    key: String,
    until: u64,
    body_len: u64,
    /// The body when it lives in the index entry (rewritten with it on reschedule).
    inline_body: Option<bytes::Bytes>,
}

struct IndexRequest {
    entries: Vec<(Vec<u8>, Vec<u8>)>,
    done: oneshot::Sender<Result<(), SpoolError>>,
}

/// An owner's change to its shard (reschedule, complete): batched with the others waiting
/// into one fenced write.
struct SettleRequest {
    rm: Vec<Vec<u8>>,
    set: Vec<(Vec<u8>, Vec<u8>)>,
    done: oneshot::Sender<Result<(), SpoolError>>,
}

struct Inner {
    rados: Rados,
    shards: u32,
    ownership: Option<Ownership>,
    leases: Mutex<HashMap<MessageId, LeaseState>>,
    /// Serializes this process's read-modify-write of a shard's index (lease vs complete).
    shard_locks: Vec<tokio::sync::Mutex<()>>,
    /// Per-shard group committers for edge index writes.
    committers: Vec<mpsc::Sender<IndexRequest>>,
    /// Per-shard group committers for the owner's reschedules and completions.
    settlers: Vec<mpsc::Sender<SettleRequest>>,
    cursor: Mutex<usize>,
    opts: RadosSpoolOptions,
}

pub struct RadosSpool {
    inner: Arc<Inner>,
    background: Vec<tokio::task::JoinHandle<()>>,
    stop: tokio_util_like::Stop,
}

/// A tiny stop signal (this crate does not depend on tokio-util).
mod tokio_util_like {
    use std::sync::Arc;
    use tokio::sync::watch;
    #[derive(Clone)]
    pub struct Stop(Arc<watch::Sender<bool>>);
    impl Stop {
        pub fn new() -> Self {
            Stop(Arc::new(watch::channel(false).0))
        }
        pub fn stop(&self) {
            self.0.send_replace(true);
        }
        pub async fn stopped(&self) {
            let mut rx = self.0.subscribe();
            let _ = rx.wait_for(|s| *s).await;
        }
    }
}

impl RadosSpool {
    /// Connects, creates the layout if the pool is new, and (for MTA processes) takes its
    /// share of shards before returning.
    pub async fn open(opts: RadosSpoolOptions) -> Result<RadosSpool, SpoolError> {
        let copts = ConnectOptions {
            conf: opts.conf.clone(),
            user: opts.user.clone(),
            pool: opts.pool.clone(),
            namespace: opts.namespace.clone(),
            op_timeout: opts.op_timeout,
        };
        let rados = tokio::task::spawn_blocking(move || Rados::connect(&copts))
            .await
            .map_err(|e| SpoolError::Storage(e.to_string()))?
            .map_err(|e| SpoolError::Unavailable(format!("cannot connect to the Ceph cluster: {e}")))?;
        let shards = shard_count(&rados, opts.shards).await?;
        let ownership = opts.own_shards.then(|| {
            let cookie = format!("{}-{}-{:08x}", hostname(), std::process::id(), rand::random::<u32>());
            Ownership::new(rados.clone(), shards, cookie, opts.shard_lease)
        });
        let mut committers = Vec::new();
        let mut background = Vec::new();
        for shard in 0..shards {
            let (tx, rx) = mpsc::channel(1024);
            committers.push(tx);
            background.push(tokio::spawn(commit_index(rados.clone(), shard, rx)));
        }
        let (settlers, settle_rx): (Vec<_>, Vec<_>) = (0..shards).map(|_| mpsc::channel::<SettleRequest>(4096)).unzip();
        let inner = Arc::new(Inner {
            rados,
            shards,
            ownership,
            leases: Mutex::new(HashMap::new()),
            shard_locks: (0..shards).map(|_| tokio::sync::Mutex::new(())).collect(),
            committers,
            settlers,
            cursor: Mutex::new(0),
            opts,
        });
        if inner.ownership.is_some() {
            for (shard, rx) in settle_rx.into_iter().enumerate() {
                background.push(tokio::spawn(settle(inner.clone(), shard as u32, rx)));
            }
        }
        let stop = tokio_util_like::Stop::new();
        if let Some(own) = &inner.ownership {
            let taken = own.tick(&|s| inner.in_flight(s)).await;
            inner.recover_shards(taken).await;
            background.push(tokio::spawn(maintain(inner.clone(), stop.clone())));
        }
        tracing::info!(pool = %inner.opts.pool, shards, owned = inner.ownership.as_ref().map(|o| o.owned_count()), "rados spool: opened");
        Ok(RadosSpool { inner, background, stop })
    }

    /// Stops the background work and hands every owned shard back (call at shutdown, after
    /// in-flight deliveries finished).
    pub async fn close(&self) {
        self.stop.stop();
        if let Some(own) = &self.inner.ownership {
            own.release_all().await;
        }
    }

    /// Fault injection for tests: stop renewing shard locks, as a hung or partitioned process
    /// would. The locks run out and other processes take the shards over.
    pub fn stop_renewing(&self) {
        self.stop.stop();
    }

    /// Shards this process owns (for tests and operators).
    pub fn owned_shards(&self) -> Vec<u32> {
        self.inner.ownership.as_ref().map(|o| o.leasable()).unwrap_or_default()
    }

    pub fn shard_count(&self) -> u32 {
        self.inner.shards
    }

    /// Removes orphans in the shards this process owns; returns (bodies removed, entries removed).
    pub async fn sweep(&self) -> Result<(usize, usize), SpoolError> {
        self.inner.sweep().await
    }
}

impl Drop for RadosSpool {
    fn drop(&mut self) {
        self.stop.stop();
        for t in &self.background {
            t.abort();
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "host".into())
}

/// Reads the shard count, creating `sluice.meta` (exclusively) if this pool is new.
async fn shard_count(rados: &Rados, wanted: u32) -> Result<u32, SpoolError> {
    let q = [OmapQuery { start_after: String::new(), prefix: "shards".into(), max: 1 }];
    for _ in 0..2 {
        match rados.omap_get(META_OBJECT, &q).await {
            Ok(pages) => {
                if let Some((_, v)) = pages[0].entries.first() {
                    return std::str::from_utf8(v)
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .ok_or_else(|| SpoolError::Corrupt { what: META_OBJECT.into(), reason: "bad shard count".into() });
                }
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
        let op = WriteOp::new().create(true).omap_set(vec![(b"shards".to_vec(), wanted.to_string().into_bytes())]);
        match rados.write(META_OBJECT, op).await {
            Ok(()) => return Ok(wanted),
            Err(e) if e.errno == libc::EEXIST => continue, // another process created it first
            Err(e) => return Err(e.into()),
        }
    }
    Err(SpoolError::Storage(format!("could not read or create {META_OBJECT}")))
}

/// Group commit of edge index writes to one shard.
async fn commit_index(rados: Rados, shard: u32, mut rx: mpsc::Receiver<IndexRequest>) {
    let oid = shard_object(shard);
    while let Some(first) = rx.recv().await {
        let mut reqs = vec![first];
        while reqs.len() < 512 {
            match rx.try_recv() {
                Ok(r) => reqs.push(r),
                Err(_) => break,
            }
        }
        let entries: Vec<(Vec<u8>, Vec<u8>)> = reqs.iter_mut().flat_map(|r| std::mem::take(&mut r.entries)).collect();
        let started = Instant::now();
        let n = entries.len();
        let result = rados.write(&oid, WriteOp::new().omap_set(entries)).await;
        metrics::histogram!("sluice_spool_commit_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("sluice_spool_commit_messages").record((n / 3) as f64);
        for r in reqs {
            let _ = r.done.send(result.clone().map_err(SpoolError::from));
        }
    }
}

/// Group commit of an owner's reschedules and completions on one shard: everything waiting
/// goes out in one fenced write.
async fn settle(inner: Arc<Inner>, shard: u32, mut rx: mpsc::Receiver<SettleRequest>) {
    while let Some(first) = rx.recv().await {
        let mut reqs = vec![first];
        while reqs.len() < 1024 {
            match rx.try_recv() {
                Ok(r) => reqs.push(r),
                Err(_) => break,
            }
        }
        let mut rm = Vec::new();
        let mut set = Vec::new();
        for r in &mut reqs {
            rm.append(&mut r.rm);
            set.append(&mut r.set);
        }
        let result = {
            let _guard = inner.shard_locks[shard as usize].lock().await;
            inner.owner_write(shard, WriteOp::new().omap_rm(rm).omap_set(set)).await
        };
        for r in reqs {
            let _ = r.done.send(match &result {
                Ok(()) => Ok(()),
                Err(SpoolError::Unavailable(e)) => Err(SpoolError::Unavailable(e.clone())),
                Err(e) => Err(SpoolError::Storage(e.to_string())),
            });
        }
    }
}

/// Background: renew and rebalance shards; sweep orphans now and then.
async fn maintain(inner: Arc<Inner>, stop: tokio_util_like::Stop) {
    let own = inner.ownership.as_ref().expect("maintain runs only for owners");
    let tick = inner.opts.shard_lease / 4;
    let mut last_sweep = Instant::now();
    loop {
        tokio::select! {
            _ = stop.stopped() => return,
            _ = tokio::time::sleep(tick) => {}
        }
        let taken = own.tick(&|s| inner.in_flight(s)).await;
        inner.recover_shards(taken).await;
        let every = inner.opts.sweep_interval;
        if !every.is_zero() && last_sweep.elapsed() >= every {
            last_sweep = Instant::now();
            match inner.sweep().await {
                Ok((b, e)) if b + e > 0 => tracing::info!(bodies = b, entries = e, "rados spool: removed orphans"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "rados spool: sweep failed"),
            }
        }
    }
}

impl Inner {
    fn in_flight(&self, shard: u32) -> usize {
        let now = now_ms();
        let leases = self.leases.lock().expect("leases");
        leases.values().filter(|l| l.shard == shard && l.until > now).count()
    }

    fn cookie(&self) -> &str {
        self.ownership.as_ref().map(|o| o.cookie.as_str()).unwrap_or("")
    }

    /// A fenced write to a shard this process owns.
    async fn owner_write(&self, shard: u32, op: WriteOp) -> Result<(), SpoolError> {
        let Some(own) = &self.ownership else {
            return Err(SpoolError::Storage("this process does not own shards (edge role)".into()));
        };
        if !own.owns(shard) {
            return Err(SpoolError::Unavailable(format!("shard {shard} is not owned by this process")));
        }
        let op = WriteOp::new().assert_locked(OWNER_LOCK, self.cookie()).then(op);
        match self.rados.write(&shard_object(shard), op).await {
            Ok(()) => Ok(()),
            // The lock is gone or someone else's: stop touching this shard.
            Err(e) if e.errno == libc::EBUSY || e.errno == libc::ENOENT => {
                own.mark_lost(shard);
                Err(SpoolError::Unavailable(format!("lost ownership of shard {shard}")))
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn enqueue(&self, batch: Vec<Message>) -> Result<(), SpoolError> {
        // One shard per batch: its index entries land in one atomic write, all or nothing.
        let shard = rand::random::<u32>() % self.shards;
        let inline_max = self.opts.inline_body_max;
        let bodies = batch.iter().filter(|m| m.body.len() > inline_max).map(|m| {
            let oid = body_object(shard, m.meta.id);
            let op = WriteOp::new().write_full(m.body.clone());
            let rados = self.rados.clone();
            async move { rados.write(&oid, op).await }
        });
        for r in futures::future::join_all(bodies).await {
            r?;
        }
        let token = ulid::Ulid::new().to_string().into_bytes();
        let mut entries = Vec::with_capacity(batch.len() * 3);
        for m in &batch {
            let key = index_key(&m.meta.queue, m.meta.due_at, m.meta.id);
            let value = IndexValue {
                attempts: m.meta.attempts,
                leased: false,
                body_len: m.body.len() as u64,
                meta: m.meta.clone(),
                body: (m.body.len() <= inline_max).then(|| m.body.clone()),
            };
            entries.push((key.clone().into_bytes(), value.encode()?));
            entries.push((id_key(m.meta.id).into_bytes(), key.into_bytes()));
            entries.push((dir_key(&m.meta.queue).into_bytes(), token.clone()));
            if m.meta.attempts > 0 {
                entries.push((retry_key(m.meta.id).into_bytes(), Vec::new()));
            }
            if m.body.len() > inline_max {
                entries.push((body_key(m.meta.id).into_bytes(), Vec::new()));
            }
        }
        let (done, answer) = oneshot::channel();
        self.committers[shard as usize].send(IndexRequest { entries, done }).await.map_err(|_| SpoolError::Closed)?;
        answer.await.map_err(|_| SpoolError::Closed)?
    }

    async fn lease(&self, req: &LeaseRequest) -> Result<Vec<Leased>, SpoolError> {
        let Some(own) = &self.ownership else { return Ok(Vec::new()) };
        let mut shards = own.leasable();
        if shards.is_empty() {
            return Ok(Vec::new());
        }
        let start = {
            let mut c = self.cursor.lock().expect("cursor");
            *c = c.wrapping_add(1);
            *c % shards.len()
        };
        shards.rotate_left(start);
        let mut out = Vec::new();
        for shard in shards {
            if out.len() >= req.max {
                break;
            }
            match self.lease_shard(shard, req, req.max - out.len()).await {
                Ok(got) => out.extend(got),
                Err(SpoolError::Unavailable(e)) if !out.is_empty() => {
                    tracing::warn!(shard, error = %e, "rados spool: lease from shard failed");
                }
                Err(e) => return Err(e),
            }
        }
        // Bodies that are not inline, all in flight at once.
        let reads = out.iter().map(|(shard, lease, value): &(u32, Lease, IndexValue)| {
            let rados = self.rados.clone();
            let oid = body_object(*shard, lease.id);
            let len = value.body_len as usize;
            let inline = value.body.clone();
            async move {
                match inline {
                    Some(body) => Ok(body),
                    None => rados.read(&oid, len).await,
                }
            }
        });
        let bodies = futures::future::join_all(reads).await;
        let mut leased = Vec::with_capacity(out.len());
        for ((_shard, lease, value), body) in out.into_iter().zip(bodies) {
            match body {
                Ok(body) => leased.push(Leased { lease, meta: value.meta, body }),
                Err(e) if e.is_not_found() => {
                    tracing::error!(id = %lease.id, "rados spool: index entry without body, removing it");
                    metrics::counter!("sluice_spool_orphans_removed_total", "kind" => "entry").increment(1);
                    let _ = self.remove_entry(&lease).await;
                }
                Err(e) => {
                    // Leave it leased; it comes back when the lease runs out.
                    tracing::warn!(id = %lease.id, error = %e, "rados spool: body read failed");
                }
            }
        }
        // Within a shard entries come oldest first; across shards, order them here.
        leased.sort_by_key(|l| (l.meta.due_at, l.meta.id));
        Ok(leased)
    }

    async fn lease_shard(&self, shard: u32, req: &LeaseRequest, want: usize) -> Result<Vec<(u32, Lease, IndexValue)>, SpoolError> {
        let oid = shard_object(shard);
        let _guard = self.shard_locks[shard as usize].lock().await;
        let dir = self.rados.omap_get(&oid, &[OmapQuery { start_after: "q".into(), prefix: "q".into(), max: 100_000 }]).await?;
        let mut queues: Vec<(String, Vec<u8>)> = dir[0]
            .entries
            .iter()
            .filter_map(|(k, v)| Some((std::str::from_utf8(k).ok()?.strip_prefix('q')?.to_string(), v.clone())))
            .filter(|(q, _)| req.filter.as_ref().is_none_or(|f| f(q)))
            .collect();
        if queues.is_empty() {
            return Ok(Vec::new());
        }
        let rot = rand::random::<u32>() as usize % queues.len();
        queues.rotate_left(rot);
        let now = now_ms();
        let until = now + req.lease_for.as_millis() as u64;
        let per_queue = req.max_per_queue.min(want).max(1);
        let mut picked: Vec<(String, IndexValue)> = Vec::new();
        let mut empty: Vec<(String, Vec<u8>)> = Vec::new();
        for chunk in queues.chunks(64) {
            if picked.len() >= want {
                break;
            }
            let queries: Vec<OmapQuery> = chunk
                .iter()
                .map(|(q, _)| OmapQuery { start_after: queue_prefix(q), prefix: queue_prefix(q), max: per_queue as u64 })
                .collect();
            let pages = self.rados.omap_get(&oid, &queries).await?;
            for ((queue, token), page) in chunk.iter().zip(pages) {
                if page.entries.is_empty() {
                    empty.push((queue.clone(), token.clone()));
                    continue;
                }
                for (k, v) in page.entries {
                    if picked.len() >= want {
                        break;
                    }
                    let Some(key) = parse_index_key(&k) else { continue };
                    if key.due > now {
                        break; // sorted by due: nothing later in this queue is due
                    }
                    let value = IndexValue::decode(&v)?;
                    if value.meta.id != key.id || value.meta.queue != key.queue {
                        return Err(SpoolError::Corrupt { what: format!("index entry {}", String::from_utf8_lossy(&k)), reason: "key and value disagree".into() });
                    }
                    picked.push((String::from_utf8_lossy(&k).into_owned(), value));
                }
            }
        }
        // Forget empty queues, unless an edge added to them meanwhile (the token changed).
        for (queue, token) in empty {
            let op = WriteOp::new().omap_cmp_eq(dir_key(&queue).into_bytes(), token).omap_rm(vec![dir_key(&queue).into_bytes()]);
            let _ = self.owner_write(shard, op).await;
        }
        if picked.is_empty() {
            return Ok(Vec::new());
        }
        let mut rm = Vec::with_capacity(picked.len());
        let mut set = Vec::with_capacity(picked.len() * 2);
        let mut out = Vec::with_capacity(picked.len());
        for (old_key, mut value) in picked {
            let id = value.meta.id;
            let key = index_key(&value.meta.queue, until, id);
            value.leased = true;
            rm.push(old_key.into_bytes());
            set.push((key.clone().into_bytes(), value.encode()?));
            set.push((id_key(id).into_bytes(), key.clone().into_bytes()));
            set.push((lease_key(id).into_bytes(), key.clone().into_bytes()));
            out.push((key, value));
        }
        self.owner_write(shard, WriteOp::new().omap_rm(rm).omap_set(set)).await?;
        let mut leases = self.leases.lock().expect("leases");
        Ok(out
            .into_iter()
            .map(|(key, value)| {
                let token = rand::random::<u64>();
                let id = value.meta.id;
                leases.insert(id, LeaseState { token, shard, key, until, body_len: value.body_len, inline_body: value.body.clone() });
                (shard, Lease { id, token, until }, value)
            })
            .collect())
    }

    /// Takes the lease out of the table if it is still current.
    fn take_lease(&self, lease: &Lease) -> Result<LeaseState, SpoolError> {
        let mut leases = self.leases.lock().expect("leases");
        match leases.get(&lease.id) {
            Some(l) if l.token == lease.token => Ok(leases.remove(&lease.id).expect("present")),
            _ => Err(SpoolError::LeaseLost(lease.id)),
        }
    }

    /// Runs a fenced write for a held lease; on failure the lease is put back unless the
    /// shard was lost (then the caller learns the lease is gone).
    async fn write_for_lease(
        &self,
        lease: &Lease,
        held: LeaseState,
        rm: Vec<Vec<u8>>,
        set: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> Result<(), SpoolError> {
        let shard = held.shard;
        let (done, answer) = oneshot::channel();
        let result = match self.settlers[shard as usize].send(SettleRequest { rm, set, done }).await {
            Ok(()) => answer.await.unwrap_or(Err(SpoolError::Closed)),
            Err(_) => Err(SpoolError::Closed),
        };
        match result {
            Ok(()) => Ok(()),
            Err(_) if !self.ownership.as_ref().is_some_and(|o| o.owns(shard)) => Err(SpoolError::LeaseLost(lease.id)),
            Err(e) => {
                self.leases.lock().expect("leases").insert(lease.id, held);
                Err(e)
            }
        }
    }

    async fn reschedule(&self, lease: &Lease, meta: MessageMeta) -> Result<(), SpoolError> {
        let held = self.take_lease(lease)?;
        let key = index_key(&meta.queue, meta.due_at, meta.id);
        let attempts = meta.attempts;
        let value = IndexValue { attempts, leased: false, body_len: held.body_len, meta, body: held.inline_body.clone() };
        let mut rm = vec![held.key.clone().into_bytes(), lease_key(lease.id).into_bytes()];
        let mut set = vec![(key.clone().into_bytes(), value.encode()?), (id_key(lease.id).into_bytes(), key.into_bytes())];
        if attempts > 0 {
            set.push((retry_key(lease.id).into_bytes(), Vec::new()));
        } else {
            rm.push(retry_key(lease.id).into_bytes());
        }
        self.write_for_lease(lease, held, rm, set).await
    }

    async fn complete(&self, lease: &Lease) -> Result<(), SpoolError> {
        let held = self.take_lease(lease)?;
        let shard = held.shard;
        let inline = held.inline_body.is_some();
        let rm = vec![
            held.key.clone().into_bytes(),
            id_key(lease.id).into_bytes(),
            lease_key(lease.id).into_bytes(),
            retry_key(lease.id).into_bytes(),
            body_key(lease.id).into_bytes(),
        ];
        self.write_for_lease(lease, held, rm, Vec::new()).await?;
        if inline {
            return Ok(());
        }
        // The index no longer refers to the body; if this fails the sweeper removes it.
        match self.rados.remove(&body_object(shard, lease.id)).await {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => tracing::warn!(id = %lease.id, error = %e, "rados spool: body removal failed; the sweeper will retry"),
        }
        Ok(())
    }

    async fn remove_entry(&self, lease: &Lease) -> Result<(), SpoolError> {
        let held = self.take_lease(lease)?;
        let rm = vec![
            held.key.clone().into_bytes(),
            id_key(lease.id).into_bytes(),
            lease_key(lease.id).into_bytes(),
            retry_key(lease.id).into_bytes(),
            body_key(lease.id).into_bytes(),
        ];
        self.write_for_lease(lease, held, rm, Vec::new()).await
    }

    /// After taking a shard over: the previous owner's leases are void (its writes are fenced),
    /// so their messages become due now instead of when those leases would have run out.
    async fn recover_shard(&self, shard: u32) -> Result<usize, SpoolError> {
        let oid = shard_object(shard);
        let mut recovered = 0;
        let mut after = "l".to_string();
        loop {
            let page = self.rados.omap_get(&oid, &[OmapQuery { start_after: after.clone(), prefix: "l".into(), max: 500 }]).await?.remove(0);
            let _guard = self.shard_locks[shard as usize].lock().await;
            let ours: std::collections::HashSet<MessageId> = self.leases.lock().expect("leases").keys().copied().collect();
            let stale: Vec<(Vec<u8>, Vec<u8>)> = page
                .entries
                .iter()
                .filter(|(k, _)| {
                    std::str::from_utf8(k).ok().and_then(|s| s[1..].parse::<MessageId>().ok()).is_some_and(|id| !ours.contains(&id))
                })
                .cloned()
                .collect();
            if !stale.is_empty() {
                let ikeys: Vec<Vec<u8>> = stale.iter().map(|(_, v)| v.clone()).collect();
                let values = self.rados.omap_get_by_keys(&oid, &ikeys).await?;
                let now = now_ms();
                let mut rm: Vec<Vec<u8>> = stale.iter().map(|(k, _)| k.clone()).collect();
                let mut set = Vec::new();
                for (old_key, v) in values {
                    let mut value = IndexValue::decode(&v)?;
                    value.leased = false;
                    let key = index_key(&value.meta.queue, now, value.meta.id);
                    set.push((id_key(value.meta.id).into_bytes(), key.clone().into_bytes()));
                    set.push((key.into_bytes(), value.encode()?));
                    rm.push(old_key);
                    recovered += 1;
                }
                self.owner_write(shard, WriteOp::new().omap_rm(rm).omap_set(set)).await?;
            }
            match page.entries.last() {
                Some((k, _)) if page.more => after = String::from_utf8_lossy(k).into_owned(),
                _ => break,
            }
        }
        if recovered > 0 {
            tracing::info!(shard, recovered, "rados spool: the previous owner's leased messages are due again");
            metrics::counter!("sluice_spool_leases_recovered_total").increment(recovered as u64);
        }
        Ok(recovered)
    }

    async fn recover_shards(&self, shards: Vec<u32>) {
        for shard in shards {
            if let Err(e) = self.recover_shard(shard).await {
                tracing::warn!(shard, error = %e, "rados spool: could not recover the previous owner's leases");
            }
        }
    }

    async fn get(&self, id: MessageId) -> Result<Option<MessageMeta>, SpoolError> {
        let lookups = (0..self.shards).map(|shard| {
            let rados = self.rados.clone();
            async move {
                let oid = shard_object(shard);
                let found = match rados.omap_get_by_keys(&oid, &[id_key(id).into_bytes()]).await {
                    Ok(f) => f,
                    Err(e) if e.is_not_found() => return Ok(None),
                    Err(e) => return Err(SpoolError::from(e)),
                };
                let Some((_, key)) = found.into_iter().next() else { return Ok(None) };
                let vals = rados.omap_get_by_keys(&oid, &[key]).await?;
                match vals.into_iter().next() {
                    Some((_, v)) => Ok(Some(IndexValue::decode(&v)?.meta)),
                    None => Ok(None),
                }
            }
        });
        for r in futures::future::join_all(lookups).await {
            if let Some(meta) = r? {
                return Ok(Some(meta));
            }
        }
        Ok(None)
    }

    /// Counts by state without reading message values: index entries (`i` keys), in-flight
    /// leases (`l` values name the lease deadline) and retries (`d` keys).
    async fn counts(&self) -> Result<SpoolCounts, SpoolError> {
        let now = now_ms();
        let scans = (0..self.shards).map(|shard| {
            let rados = self.rados.clone();
            async move {
                let oid = shard_object(shard);
                let entries = match count_keys(&rados, &oid, 'i').await {
                    Ok(n) => n,
                    Err(e) if e.is_not_found() => return Ok(SpoolCounts::default()),
                    Err(e) => return Err(SpoolError::from(e)),
                };
                let mut live_leases = std::collections::HashSet::new();
                let mut after = "l".to_string();
                loop {
                    let page = rados.omap_get(&oid, &[OmapQuery { start_after: after.clone(), prefix: "l".into(), max: 1000 }]).await?.remove(0);
                    for (k, v) in &page.entries {
                        if parse_index_key(v).is_some_and(|ik| ik.due > now) {
                            live_leases.insert(k[1..].to_vec());
                        }
                    }
                    match page.entries.last() {
                        Some((k, _)) if page.more => after = String::from_utf8_lossy(k).into_owned(),
                        _ => break,
                    }
                }
                let mut retries_not_leased = 0u64;
                let mut after = "d".to_string();
                loop {
                    let page = rados.omap_keys(&oid, &after, 1000).await?;
                    let mut done = !page.more;
                    for (k, _) in &page.entries {
                        if k.first() != Some(&b'd') {
                            done = true;
                            break;
                        }
                        if !live_leases.contains(&k[1..]) {
                            retries_not_leased += 1;
                        }
                    }
                    match page.entries.last() {
                        Some((k, _)) if !done => after = String::from_utf8_lossy(k).into_owned(),
                        _ => break,
                    }
                }
                let leased = live_leases.len() as u64;
                Ok(SpoolCounts { queued: entries.saturating_sub(leased), deferred: retries_not_leased, leased })
            }
        });
        let mut total = SpoolCounts::default();
        for r in futures::future::join_all(scans).await {
            let c = r?;
            total.queued += c.queued;
            total.deferred += c.deferred;
            total.leased += c.leased;
        }
        Ok(total)
    }

    /// Removes orphans older than `orphan_age` in the shards this process owns; returns
    /// (bodies removed, index entries removed).
    async fn sweep(&self) -> Result<(usize, usize), SpoolError> {
        let Some(own) = &self.ownership else { return Ok((0, 0)) };
        let cutoff = now_ms().saturating_sub(self.opts.orphan_age.as_millis() as u64);
        let bodies = self.sweep_bodies(own, cutoff).await?;
        let mut entries = 0;
        for shard in own.owned() {
            entries += self.sweep_entries(shard, cutoff).await?;
        }
        Ok((bodies, entries))
    }

    /// Body objects without an `m` key: the edge died between writing the body and the
    /// index, or a completion between removing the index entry and the body.
    async fn sweep_bodies(&self, own: &Ownership, cutoff: u64) -> Result<usize, SpoolError> {
        let rados = self.rados.clone();
        let names = tokio::task::spawn_blocking(move || rados.list_objects(BODY_PREFIX))
            .await
            .map_err(|e| SpoolError::Storage(e.to_string()))??;
        let mut by_shard: BTreeMap<u32, Vec<MessageId>> = BTreeMap::new();
        for name in names {
            if let Some((shard, id)) = parse_body_object(&name) {
                if own.owns(shard) && id.timestamp_ms() < cutoff {
                    by_shard.entry(shard).or_default().push(id);
                }
            }
        }
        let mut removed = 0;
        for (shard, ids) in by_shard {
            for chunk in ids.chunks(512) {
                let keys: Vec<Vec<u8>> = chunk.iter().map(|id| id_key(*id).into_bytes()).collect();
                let present: std::collections::HashSet<Vec<u8>> =
                    self.rados.omap_get_by_keys(&shard_object(shard), &keys).await?.into_iter().map(|(k, _)| k).collect();
                let removals = chunk.iter().filter(|id| !present.contains(id_key(**id).as_bytes())).map(|id| {
                    let rados = self.rados.clone();
                    let oid = body_object(shard, *id);
                    async move { rados.remove(&oid).await }
                });
                for r in futures::future::join_all(removals).await {
                    match r {
                        Ok(()) => removed += 1,
                        Err(e) if e.is_not_found() => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        metrics::counter!("sluice_spool_orphans_removed_total", "kind" => "body").increment(removed as u64);
        Ok(removed)
    }

    /// Index entries whose body object is gone. The edge writes the body before the index, so
    /// this happens only after data loss or a bug: each one is logged as an error and counted.
    /// Scans the `o` keys (keys only), checks a page of bodies at once, and removes the dead
    /// entries in one fenced write.
    async fn sweep_entries(&self, shard: u32, cutoff: u64) -> Result<usize, SpoolError> {
        let oid = shard_object(shard);
        let mut removed = 0;
        let mut after = "o".to_string();
        loop {
            let page = match self.rados.omap_keys(&oid, &after, 1000).await {
                Ok(p) => p,
                Err(e) if e.is_not_found() => return Ok(0),
                Err(e) => return Err(e.into()),
            };
            let mut done = !page.more;
            let mut old = Vec::new();
            for (k, _) in &page.entries {
                if k.first() != Some(&b'o') {
                    done = true;
                    break;
                }
                // Younger entries may belong to an enqueue still in flight: leave them alone.
                match std::str::from_utf8(&k[1..]).ok().and_then(|s| s.parse::<MessageId>().ok()) {
                    Some(id) if id.timestamp_ms() < cutoff => old.push(id),
                    _ => {}
                }
            }
            let checks = old.iter().map(|id| {
                let rados = self.rados.clone();
                let body = body_object(shard, *id);
                async move { rados.exists(&body).await }
            });
            let mut missing = Vec::new();
            for (id, exists) in old.iter().zip(futures::future::join_all(checks).await) {
                if !exists? {
                    missing.push(*id);
                }
            }
            if !missing.is_empty() {
                removed += self.remove_dead_entries(shard, &missing).await?;
            }
            match page.entries.last() {
                Some((k, _)) if !done => after = String::from_utf8_lossy(k).into_owned(),
                _ => break,
            }
        }
        Ok(removed)
    }

    async fn remove_dead_entries(&self, shard: u32, ids: &[MessageId]) -> Result<usize, SpoolError> {
        let oid = shard_object(shard);
        let _guard = self.shard_locks[shard as usize].lock().await;
        // Read again under the lock: a completion removes the index entry first and the body
        // after it, so an entry still listed now really lost its body.
        let mut keys: Vec<Vec<u8>> = ids.iter().map(|id| body_key(*id).into_bytes()).collect();
        keys.extend(ids.iter().map(|id| id_key(*id).into_bytes()));
        let found: HashMap<Vec<u8>, Vec<u8>> = self.rados.omap_get_by_keys(&oid, &keys).await?.into_iter().collect();
        let leased: std::collections::HashSet<MessageId> = self.leases.lock().expect("leases").keys().copied().collect();
        let mut rm = Vec::new();
        let mut dead = 0;
        for id in ids {
            if !found.contains_key(body_key(*id).as_bytes()) || leased.contains(id) {
                continue;
            }
            if let Some(ikey) = found.get(id_key(*id).as_bytes()) {
                rm.push(ikey.clone());
            }
            rm.extend([id_key(*id), lease_key(*id), retry_key(*id), body_key(*id)].map(String::into_bytes));
            tracing::error!(%id, shard, "rados spool: index entry whose body object is missing (data loss or a bug); removing the entry, the message cannot be delivered");
            dead += 1;
        }
        if dead > 0 {
            self.owner_write(shard, WriteOp::new().omap_rm(rm)).await?;
            metrics::counter!("sluice_spool_orphans_removed_total", "kind" => "entry").increment(dead as u64);
        }
        Ok(dead)
    }
}

/// Counts the omap keys of `oid` that start with `prefix`, reading keys only.
async fn count_keys(rados: &Rados, oid: &str, prefix: char) -> Result<u64, RadosError> {
    let mut n = 0;
    let mut after = prefix.to_string();
    loop {
        let page = rados.omap_keys(oid, &after, 1000).await?;
        for (k, _) in &page.entries {
            if k.first() != Some(&(prefix as u8)) {
                return Ok(n);
            }
            n += 1;
        }
        match page.entries.last() {
            Some((k, _)) if page.more => after = String::from_utf8_lossy(k).into_owned(),
            _ => return Ok(n),
        }
    }
}

#[async_trait]
impl Spool for RadosSpool {
    async fn enqueue(&self, batch: Vec<Message>) -> Result<(), SpoolError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.inner.enqueue(batch).await
    }

    async fn lease(&self, req: LeaseRequest) -> Result<Vec<Leased>, SpoolError> {
        self.inner.lease(&req).await
    }

    async fn reschedule(&self, lease: &Lease, meta: MessageMeta) -> Result<(), SpoolError> {
        if meta.id != lease.id {
            return Err(SpoolError::Storage(format!("reschedule of {} with the metadata of {}", lease.id, meta.id)));
        }
        self.inner.reschedule(lease, meta).await
    }

    async fn complete(&self, lease: &Lease) -> Result<(), SpoolError> {
        self.inner.complete(lease).await
    }

    async fn get(&self, id: MessageId) -> Result<Option<MessageMeta>, SpoolError> {
        self.inner.get(id).await
    }

    async fn counts(&self) -> Result<SpoolCounts, SpoolError> {
        self.inner.counts().await
    }

    fn backend(&self) -> &'static str {
        "rados"
    }
}

/// The suppression list in omap objects shared by every process of the deployment; works
/// for edge-only processes too (no shard ownership involved).
#[async_trait]
impl SuppressionList for RadosSpool {
    async fn suppress(&self, entries: Vec<Suppression>) -> Result<(), SpoolError> {
        let mut by_object: BTreeMap<String, Vec<(Vec<u8>, Vec<u8>)>> = BTreeMap::new();
        for e in &entries {
            let key = suppression_key(&e.tenant, &e.address);
            by_object.entry(suppression_object(&key)).or_default().push((key.into_bytes(), suppression::encode(e)?));
        }
        let writes = by_object.into_iter().map(|(oid, kvs)| {
            let rados = self.inner.rados.clone();
            async move { rados.write(&oid, WriteOp::new().create(false).omap_set(kvs)).await }
        });
        for r in futures::future::join_all(writes).await {
            r?;
        }
        Ok(())
    }

    async fn check(&self, tenant: &str, addresses: &[String]) -> Result<Vec<bool>, SpoolError> {
        let keys: Vec<String> = addresses.iter().map(|a| suppression_key(tenant, a)).collect();
        let mut by_object: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
        for k in &keys {
            by_object.entry(suppression_object(k)).or_default().push(k.clone().into_bytes());
        }
        let reads = by_object.into_iter().map(|(oid, ks)| {
            let rados = self.inner.rados.clone();
            async move {
                match rados.omap_get_by_keys(&oid, &ks).await {
                    Ok(found) => Ok(found.into_iter().map(|(k, _)| k).collect::<Vec<_>>()),
                    Err(e) if e.is_not_found() => Ok(Vec::new()),
                    Err(e) => Err(SpoolError::from(e)),
                }
            }
        });
        let mut present = std::collections::HashSet::new();
        for r in futures::future::join_all(reads).await {
            present.extend(r?);
        }
        Ok(keys.iter().map(|k| present.contains(k.as_bytes())).collect())
    }

    async fn get(&self, tenant: &str, address: &str) -> Result<Option<Suppression>, SpoolError> {
        let key = suppression_key(tenant, address);
        match self.inner.rados.omap_get_by_keys(&suppression_object(&key), &[key.clone().into_bytes()]).await {
            Ok(found) => found.into_iter().next().map(|(_, v)| suppression::decode(&key, &v)).transpose(),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn remove(&self, tenant: &str, address: &str) -> Result<bool, SpoolError> {
        if SuppressionList::get(self, tenant, address).await?.is_none() {
            return Ok(false);
        }
        let key = suppression_key(tenant, address);
        let op = WriteOp::new().omap_rm(vec![key.clone().into_bytes()]);
        self.inner.rados.write(&suppression_object(&key), op).await?;
        Ok(true)
    }
}
