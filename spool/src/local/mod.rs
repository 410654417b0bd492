//! The local spool: an embedded fjall database in one directory, owned by one process.
//!
//! Keyspaces: `meta` (id → JSON [`MessageMeta`]), `body` (id → raw message, key-value
//! separated so large bodies stay out of the LSM's compactions), `index` (see [`keys`]) and
//! `suppressions` ([`suppression_key`] → JSON [`Suppression`]).
//!
//! Enqueues go through a group committer ([`group_commit`]): batches that arrive while an
//! fsync is in flight share the next one, and every caller is answered only after the fsync
//! covering its batch returned. Leases, reschedules and completions are written without an
//! fsync: after a crash they are at worst replayed (a redelivery), never lost, because this
//! process owns the spool and voids every lease when it opens it again.

mod group_commit;
mod keys;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, KvSeparationOptions, PersistMode};

use crate::spool::{Lease, LeaseRequest, Leased, Spool, SpoolCounts};
use crate::suppression::{self, suppression_key, Suppression, SuppressionList};
use crate::{now_ms, Message, MessageId, MessageMeta, SpoolError};
pub use group_commit::CommitStats;
use group_commit::{CommitTarget, GroupCommitter};
use keys::{index_key, index_key_min, index_value, parse_index_key, parse_index_value};

/// Options for [`LocalSpool::open`].
#[derive(Clone, Debug)]
pub struct LocalSpoolOptions {
    pub path: PathBuf,
    /// Most messages written by one group commit.
    pub max_batch_messages: usize,
    /// Most body bytes written by one group commit.
    pub max_batch_bytes: usize,
    /// Block cache size in bytes.
    pub cache_bytes: u64,
}

impl LocalSpoolOptions {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        LocalSpoolOptions {
            path: path.into(),
            max_batch_messages: 2048,
            max_batch_bytes: 64 << 20,
            cache_bytes: 64 << 20,
        }
    }
}

pub struct LocalSpool {
    store: Arc<Store>,
    committer: GroupCommitter,
}

/// The database and the in-memory bookkeeping derived from it.
pub(crate) struct Store {
    db: Database,
    meta: Keyspace,
    body: Keyspace,
    index: Keyspace,
    suppressions: Keyspace,
    /// Whether the suppression list has ever had an entry: until then the edge's check per
    /// request is answered without touching the database.
    any_suppressed: std::sync::atomic::AtomicBool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Every queue with at least one index entry.
    queues: BTreeMap<String, QueueInfo>,
    /// The queue the last lease stopped at; the next lease starts after it (round-robin).
    cursor: Option<String>,
    /// Live (or expired but not yet re-leased) leases. Only this process uses the spool, so
    /// leases need not be persisted: opening the spool voids them all.
    leases: HashMap<MessageId, LeaseState>,
    /// Index entries, including leased ones.
    entries: u64,
    /// Index entries with attempts > 0, including leased ones.
    retry_entries: u64,
}

struct QueueInfo {
    entries: u64,
    /// No live index entry of this queue is due before this time. Lease scans start here,
    /// so they never walk the tombstones that leased and completed messages leave at the
    /// head of the queue (an LSM keeps them until compaction). Inserts and reschedules with
    /// an earlier due time lower it.
    next_due: u64,
}

struct LeaseState {
    token: u64,
    until: u64,
    queue: String,
    attempts: u32,
}

impl LocalSpool {
    /// Opens (or creates) the spool at `opts.path`, voiding the leases of any previous
    /// process: their messages are due again immediately.
    pub fn open(opts: LocalSpoolOptions) -> Result<Self, SpoolError> {
        std::fs::create_dir_all(&opts.path).map_err(|e| {
            SpoolError::Storage(format!("cannot create spool directory {}: {e}", opts.path.display()))
        })?;
        let db = Database::builder(&opts.path).cache_size(opts.cache_bytes).open()?;
        let meta = db.keyspace("meta", KeyspaceCreateOptions::default)?;
        let body = db.keyspace("body", || {
            KeyspaceCreateOptions::default().with_kv_separation(Some(KvSeparationOptions::default()))
        })?;
        let index = db.keyspace("index", KeyspaceCreateOptions::default)?;
        let suppressions = db.keyspace("suppressions", KeyspaceCreateOptions::default)?;
        let any_suppressed = std::sync::atomic::AtomicBool::new(suppressions.first_key_value().is_some());
        let store = Arc::new(Store { db, meta, body, index, suppressions, any_suppressed, state: Mutex::new(State::default()) });
        store.recover()?;
        let committer = GroupCommitter::start(store.clone(), opts.max_batch_messages, opts.max_batch_bytes);
        Ok(LocalSpool { store, committer })
    }

    /// How many group commits (fsyncs) have made how many enqueued messages durable since
    /// the spool was opened.
    pub fn commit_stats(&self) -> CommitStats {
        self.committer.stats()
    }
}

impl CommitTarget for Store {
    fn insert_batch(&self, batch: &[Message]) -> Result<(), SpoolError> {
        Store::insert_batch(self, batch)
    }
    fn sync(&self) -> Result<(), SpoolError> {
        Store::sync(self)
    }
}

impl Store {
    /// Rebuilds the queue directory and counters from the index and voids stale leases.
    fn recover(&self) -> Result<(), SpoolError> {
        let now = now_ms();
        let mut state = self.state.lock().expect("spool state poisoned");
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncAll));
        let mut voided = 0u64;
        for kv in self.index.iter() {
            let (k, v) = kv.into_inner()?;
            let Some(key) = parse_index_key(&k) else {
                return Err(SpoolError::Corrupt { what: "index key".into(), reason: format!("{k:?}") });
            };
            let (attempts, leased) = parse_index_value(&v);
            let mut due = key.due;
            if leased {
                batch.remove(&self.index, k.to_vec());
                batch.insert(&self.index, index_key(&key.queue, now, key.id), index_value(attempts, false));
                due = now;
                voided += 1;
            }
            let q = state.queues.entry(key.queue).or_insert(QueueInfo { entries: 0, next_due: u64::MAX });
            q.entries += 1;
            q.next_due = q.next_due.min(due);
            state.entries += 1;
            if attempts > 0 {
                state.retry_entries += 1;
            }
        }
        batch.commit()?;
        if voided > 0 {
            tracing::info!(voided, "spool: returned messages leased by a previous process to the queue");
        }
        tracing::info!(messages = state.entries, queues = state.queues.len(), "spool: opened");
        Ok(())
    }

    /// Writes a batch of new messages without syncing; the group committer syncs after.
    fn insert_batch(&self, msgs: &[Message]) -> Result<(), SpoolError> {
        let mut batch = self.db.batch().durability(Some(PersistMode::Buffer));
        for m in msgs {
            let id = m.meta.id.to_bytes();
            let meta = serde_json::to_vec(&m.meta).map_err(|e| SpoolError::Storage(e.to_string()))?;
            batch.insert(&self.meta, id, meta);
            batch.insert(&self.body, id, m.body.to_vec());
            batch.insert(&self.index, index_key(&m.meta.queue, m.meta.due_at, m.meta.id), index_value(m.meta.attempts, false));
        }
        // The directory is updated under the same lock as the write so a concurrent lease
        // never sees entries its bookkeeping does not know about.
        let mut state = self.state.lock().expect("spool state poisoned");
        batch.commit()?;
        for m in msgs {
            let q = state.queues.entry(m.meta.queue.clone()).or_insert(QueueInfo { entries: 0, next_due: u64::MAX });
            q.entries += 1;
            q.next_due = q.next_due.min(m.meta.due_at);
            state.entries += 1;
            if m.meta.attempts > 0 {
                state.retry_entries += 1;
            }
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), SpoolError> {
        Ok(self.db.persist(PersistMode::SyncAll)?)
    }

    fn lease(&self, req: &LeaseRequest) -> Result<Vec<Leased>, SpoolError> {
        let now = now_ms();
        let until = now + req.lease_for.as_millis() as u64;
        let mut picked: Vec<(Vec<u8>, String, MessageId, u32)> = Vec::new();
        let mut leases = Vec::new();
        {
            let mut state = self.state.lock().expect("spool state poisoned");
            let State { queues, cursor, .. } = &mut *state;
            // Round-robin: the queues after the cursor, then the rest.
            let start = cursor.clone();
            let order: Vec<String> = match &start {
                Some(c) => queues
                    .range::<str, _>((std::ops::Bound::Excluded(c.as_str()), std::ops::Bound::Unbounded))
                    .chain(queues.range::<str, _>((std::ops::Bound::Unbounded, std::ops::Bound::Included(c.as_str()))))
                    .filter(|(_, q)| q.next_due <= now)
                    .map(|(name, _)| name.clone())
                    .collect(),
                None => queues.iter().filter(|(_, q)| q.next_due <= now).map(|(n, _)| n.clone()).collect(),
            };
            for name in order {
                if picked.len() >= req.max {
                    break;
                }
                if let Some(f) = &req.filter {
                    if !f(&name) {
                        continue;
                    }
                }
                let want = req.max_per_queue.min(req.max - picked.len());
                let from = queues.get(&name).map(|q| q.next_due).unwrap_or(0);
                // Bounded above by `now` as well: past it lie the tombstones of recently
                // completed leases, which an unbounded scan would walk through every time.
                let range = index_key_min(&name, from)..index_key_min(&name, now + 1);
                let mut next_due = now + 1;
                for (got, kv) in self.index.range(range).enumerate() {
                    let (k, v) = kv.into_inner()?;
                    let key = parse_index_key(&k)
                        .ok_or_else(|| SpoolError::Corrupt { what: "index key".into(), reason: format!("{k:?}") })?;
                    if got == want {
                        next_due = key.due;
                        break;
                    }
                    picked.push((k.to_vec(), name.clone(), key.id, parse_index_value(&v).0));
                }
                if let Some(q) = queues.get_mut(&name) {
                    // Leased entries move to `until`, later than anything left behind.
                    q.next_due = next_due;
                }
                *cursor = Some(name);
            }
            if picked.is_empty() {
                return Ok(Vec::new());
            }
            let mut batch = self.db.batch().durability(Some(PersistMode::Buffer));
            for (old_key, queue, id, attempts) in &picked {
                let token = rand::random::<u64>();
                batch.remove(&self.index, old_key.clone());
                batch.insert(&self.index, index_key(queue, until, *id), index_value(*attempts, true));
                state.leases.insert(*id, LeaseState { token, until, queue: queue.clone(), attempts: *attempts });
                leases.push(Lease { id: *id, token, until });
            }
            batch.commit()?;
        }
        // The messages are ours now; read them without holding the lock.
        let mut out = Vec::with_capacity(leases.len());
        for lease in leases {
            let key = lease.id.to_bytes();
            let (Some(meta), Some(body)) = (self.meta.get(key)?, self.body.get(key)?) else {
                // An index entry without a message: drop the entry rather than fail every lease.
                tracing::error!(id = %lease.id, "spool: index entry without message, removing it");
                self.forget(&lease)?;
                continue;
            };
            let meta: MessageMeta = serde_json::from_slice(&meta)
                .map_err(|e| SpoolError::Corrupt { what: format!("meta of {}", lease.id), reason: e.to_string() })?;
            out.push(Leased { lease, meta, body: Bytes::from(body.to_vec()) });
        }
        Ok(out)
    }

    /// Checks that `lease` is still the current lease of its message and takes it out of the
    /// lease table.
    fn take_lease(state: &mut State, lease: &Lease) -> Result<LeaseState, SpoolError> {
        match state.leases.get(&lease.id) {
            Some(l) if l.token == lease.token => Ok(state.leases.remove(&lease.id).expect("present")),
            _ => Err(SpoolError::LeaseLost(lease.id)),
        }
    }

    fn reschedule(&self, lease: &Lease, meta: MessageMeta) -> Result<(), SpoolError> {
        if meta.id != lease.id {
            return Err(SpoolError::Storage(format!("reschedule of {} with the metadata of {}", lease.id, meta.id)));
        }
        let encoded = serde_json::to_vec(&meta).map_err(|e| SpoolError::Storage(e.to_string()))?;
        let mut state = self.state.lock().expect("spool state poisoned");
        let held = Self::take_lease(&mut state, lease)?;
        let mut batch = self.db.batch().durability(Some(PersistMode::Buffer));
        batch.remove(&self.index, index_key(&held.queue, held.until, lease.id));
        batch.insert(&self.index, index_key(&held.queue, meta.due_at, lease.id), index_value(meta.attempts, false));
        batch.insert(&self.meta, lease.id.to_bytes(), encoded);
        if let Err(e) = batch.commit() {
            state.leases.insert(lease.id, held);
            return Err(e.into());
        }
        if held.attempts == 0 && meta.attempts > 0 {
            state.retry_entries += 1;
        } else if held.attempts > 0 && meta.attempts == 0 {
            state.retry_entries -= 1;
        }
        if let Some(q) = state.queues.get_mut(&held.queue) {
            q.next_due = q.next_due.min(meta.due_at);
        }
        Ok(())
    }

    fn complete(&self, lease: &Lease) -> Result<(), SpoolError> {
        let mut state = self.state.lock().expect("spool state poisoned");
        let held = Self::take_lease(&mut state, lease)?;
        let mut batch = self.db.batch().durability(Some(PersistMode::Buffer));
        batch.remove(&self.index, index_key(&held.queue, held.until, lease.id));
        batch.remove(&self.meta, lease.id.to_bytes());
        batch.remove(&self.body, lease.id.to_bytes());
        if let Err(e) = batch.commit() {
            state.leases.insert(lease.id, held);
            return Err(e.into());
        }
        Self::drop_entry(&mut state, &held);
        Ok(())
    }

    /// Removes the index entry of a lease whose message is missing.
    fn forget(&self, lease: &Lease) -> Result<(), SpoolError> {
        let mut state = self.state.lock().expect("spool state poisoned");
        let Ok(held) = Self::take_lease(&mut state, lease) else { return Ok(()) };
        self.index.remove(index_key(&held.queue, held.until, lease.id))?;
        Self::drop_entry(&mut state, &held);
        Ok(())
    }

    fn drop_entry(state: &mut State, held: &LeaseState) {
        state.entries -= 1;
        if held.attempts > 0 {
            state.retry_entries -= 1;
        }
        if let Some(q) = state.queues.get_mut(&held.queue) {
            q.entries -= 1;
            if q.entries == 0 {
                state.queues.remove(&held.queue);
            }
        }
    }

    fn counts(&self) -> SpoolCounts {
        let now = now_ms();
        let state = self.state.lock().expect("spool state poisoned");
        let live = state.leases.values().filter(|l| l.until > now);
        let (mut leased, mut leased_retries) = (0u64, 0u64);
        for l in live {
            leased += 1;
            if l.attempts > 0 {
                leased_retries += 1;
            }
        }
        SpoolCounts {
            queued: state.entries - leased,
            deferred: state.retry_entries - leased_retries,
            leased,
        }
    }
}

/// Runs blocking storage work off the async reactor.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SpoolError> + Send + 'static,
) -> Result<T, SpoolError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| SpoolError::Storage(format!("spool task failed: {e}")))?
}

#[async_trait]
impl Spool for LocalSpool {
    async fn enqueue(&self, batch: Vec<Message>) -> Result<(), SpoolError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.committer.submit(batch).await
    }

    async fn lease(&self, req: LeaseRequest) -> Result<Vec<Leased>, SpoolError> {
        let store = self.store.clone();
        blocking(move || store.lease(&req)).await
    }

    // Reschedule and complete are unsynced writes into the memtable and the journal's buffer:
    // microseconds, cheaper inline than a hand-off to the blocking pool for every message.
    async fn reschedule(&self, lease: &Lease, meta: MessageMeta) -> Result<(), SpoolError> {
        self.store.reschedule(lease, meta)
    }

    async fn complete(&self, lease: &Lease) -> Result<(), SpoolError> {
        self.store.complete(lease)
    }

    async fn get(&self, id: MessageId) -> Result<Option<MessageMeta>, SpoolError> {
        let store = self.store.clone();
        blocking(move || {
            let Some(v) = store.meta.get(id.to_bytes())? else { return Ok(None) };
            serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| SpoolError::Corrupt { what: format!("meta of {id}"), reason: e.to_string() })
        })
        .await
    }

    async fn counts(&self) -> Result<SpoolCounts, SpoolError> {
        Ok(self.store.counts())
    }

    fn backend(&self) -> &'static str {
        "local"
    }
}

#[async_trait]
impl SuppressionList for LocalSpool {
    async fn suppress(&self, entries: Vec<Suppression>) -> Result<(), SpoolError> {
        if entries.is_empty() {
            return Ok(());
        }
        let store = self.store.clone();
        blocking(move || {
            // Synced: a hard bounce is rare next to a message, and a lost entry means one
            // more send to an address known to be dead.
            let mut batch = store.db.batch().durability(Some(PersistMode::SyncData));
            for e in &entries {
                batch.insert(&store.suppressions, suppression_key(&e.tenant, &e.address), suppression::encode(e)?);
            }
            batch.commit()?;
            store.any_suppressed.store(true, std::sync::atomic::Ordering::Release);
            Ok(())
        })
        .await
    }

    async fn check(&self, tenant: &str, addresses: &[String]) -> Result<Vec<bool>, SpoolError> {
        if !self.store.any_suppressed.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(vec![false; addresses.len()]);
        }
        let store = self.store.clone();
        let keys: Vec<String> = addresses.iter().map(|a| suppression_key(tenant, a)).collect();
        blocking(move || keys.iter().map(|k| Ok(store.suppressions.contains_key(k)?)).collect()).await
    }

    async fn get(&self, tenant: &str, address: &str) -> Result<Option<Suppression>, SpoolError> {
        let store = self.store.clone();
        let key = suppression_key(tenant, address);
        blocking(move || match store.suppressions.get(&key)? {
            Some(v) => suppression::decode(&key, &v).map(Some),
            None => Ok(None),
        })
        .await
    }

    async fn remove(&self, tenant: &str, address: &str) -> Result<bool, SpoolError> {
        let store = self.store.clone();
        let key = suppression_key(tenant, address);
        blocking(move || {
            let existed = store.suppressions.contains_key(&key)?;
            let mut batch = store.db.batch().durability(Some(PersistMode::SyncData));
            batch.remove(&store.suppressions, key);
            batch.commit()?;
            Ok(existed)
        })
        .await
    }
}
