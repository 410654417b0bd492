//! Shard ownership: which MTA process may lease from which index shard.
//!
//! There is no coordinator. Every MTA process heartbeats into `sluice.workers`, counts the
//! live processes, and aims to own its fair share (`ceil(shards / live)`) of the shards by
//! taking RADOS cls_lock exclusive locks with a duration. It renews its locks well before
//! they run out; when a process dies its locks expire and the others take the shards over.
//! When a process joins, the others notice their share shrank and hand shards back: a shard
//! being handed back is first drained (no new leases, in-flight leases finished) and only
//! then unlocked, so no message is delivered twice by the hand-over.
//!
//! Every write to a shard by its owner carries `assert_locked`, so a process that lost a
//! lock (paused, partitioned) cannot change the shard any more.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use rand::seq::SliceRandom;

use super::client::{OmapQuery, Rados, WriteOp};
use super::layout::{shard_object, OWNER_LOCK, WORKERS_OBJECT};
use crate::now_ms;

#[derive(Default)]
struct ShardState {
    draining: bool,
    /// Last successful lock or renewal (ms since epoch).
    renewed_at: u64,
}

pub struct Ownership {
    rados: Rados,
    shards: u32,
    /// Identifies this process's locks (and its heartbeat).
    pub cookie: String,
    lease: Duration,
    owned: Mutex<BTreeMap<u32, ShardState>>,
}

impl Ownership {
    pub fn new(rados: Rados, shards: u32, cookie: String, lease: Duration) -> Self {
        Ownership { rados, shards, cookie, lease, owned: Mutex::new(BTreeMap::new()) }
    }

    /// Shards this process may lease from now.
    pub fn leasable(&self) -> Vec<u32> {
        self.owned.lock().expect("ownership").iter().filter(|(_, s)| !s.draining).map(|(k, _)| *k).collect()
    }

    /// Every shard this process holds, draining ones included.
    pub fn owned(&self) -> Vec<u32> {
        self.owned.lock().expect("ownership").keys().copied().collect()
    }

    pub fn owns(&self, shard: u32) -> bool {
        self.owned.lock().expect("ownership").contains_key(&shard)
    }

    pub fn owned_count(&self) -> usize {
        self.owned.lock().expect("ownership").len()
    }

    /// A write to the shard was fenced: somebody else owns it now.
    pub fn mark_lost(&self, shard: u32) {
        if self.owned.lock().expect("ownership").remove(&shard).is_some() {
            tracing::warn!(shard, "rados spool: lost ownership of shard");
            metrics::counter!("sluice_spool_shards_lost_total").increment(1);
        }
    }

    /// One round: heartbeat, renew, drop expired, take or hand back shards.
    /// `in_flight(shard)` tells how many leases this process holds on a shard. Returns the
    /// shards taken over in this round.
    pub async fn tick(&self, in_flight: &(dyn Fn(u32) -> usize + Sync)) -> Vec<u32> {
        let mut taken = Vec::new();
        let now = now_ms();
        let lease_ms = self.lease.as_millis() as u64;
        let live = match self.heartbeat(now, lease_ms).await {
            Ok(n) => n.max(1),
            Err(e) => {
                tracing::warn!(error = %e, "rados spool: heartbeat failed");
                1
            }
        };
        let target = (self.shards as usize).div_ceil(live);

        // Renew what we hold; a renewal refused with EBUSY means the lock is someone else's.
        let held: Vec<u32> = self.owned.lock().expect("ownership").keys().copied().collect();
        for shard in held {
            match self.lock(shard).await {
                Ok(()) => {
                    if let Some(s) = self.owned.lock().expect("ownership").get_mut(&shard) {
                        s.renewed_at = now;
                    }
                }
                Err(e) if e.is_busy() => self.mark_lost(shard),
                Err(e) => {
                    tracing::warn!(shard, error = %e, "rados spool: lock renewal failed");
                    let expired = self.owned.lock().expect("ownership").get(&shard).is_some_and(|s| now > s.renewed_at + lease_ms);
                    if expired {
                        self.mark_lost(shard);
                    }
                }
            }
        }

        // Hand back drained shards beyond our share; start draining the excess.
        let (active, drained): (usize, Vec<u32>) = {
            let owned = self.owned.lock().expect("ownership");
            let active = owned.values().filter(|s| !s.draining).count();
            let drained = owned.iter().filter(|(k, s)| s.draining && in_flight(**k) == 0).map(|(k, _)| *k).collect();
            (active, drained)
        };
        for shard in drained {
            let (rados, cookie) = (self.rados.clone(), self.cookie.clone());
            let oid = shard_object(shard);
            let _ = tokio::task::spawn_blocking(move || rados.unlock(&oid, OWNER_LOCK, &cookie)).await;
            self.owned.lock().expect("ownership").remove(&shard);
            tracing::info!(shard, "rados spool: handed shard back");
        }
        if active > target {
            let mut owned = self.owned.lock().expect("ownership");
            let excess: Vec<u32> = owned.iter().filter(|(_, s)| !s.draining).map(|(k, _)| *k).take(active - target).collect();
            for k in excess {
                if let Some(s) = owned.get_mut(&k) {
                    s.draining = true;
                }
            }
        }

        // Take unowned shards up to our share.
        let mut candidates: Vec<u32> = (0..self.shards).filter(|k| !self.owns(*k)).collect();
        candidates.shuffle(&mut rand::rng());
        for shard in candidates {
            if self.owned.lock().expect("ownership").values().filter(|s| !s.draining).count() >= target {
                break;
            }
            match self.lock(shard).await {
                Ok(()) => {
                    self.owned.lock().expect("ownership").insert(shard, ShardState { draining: false, renewed_at: now });
                    tracing::info!(shard, "rados spool: took ownership of shard");
                    taken.push(shard);
                }
                Err(e) if e.is_busy() => {}
                Err(e) => tracing::warn!(shard, error = %e, "rados spool: could not lock shard"),
            }
        }
        metrics::gauge!("sluice_spool_shards_owned").set(self.owned_count() as f64);
        taken
    }

    /// Releases every shard (at shutdown, after in-flight work finished).
    pub async fn release_all(&self) {
        let held: Vec<u32> = std::mem::take(&mut *self.owned.lock().expect("ownership")).into_keys().collect();
        for shard in held {
            let (rados, cookie, oid) = (self.rados.clone(), self.cookie.clone(), shard_object(shard));
            let _ = tokio::task::spawn_blocking(move || rados.unlock(&oid, OWNER_LOCK, &cookie)).await;
        }
        let op = WriteOp::new().omap_rm(vec![self.cookie.as_bytes().to_vec()]);
        let _ = self.rados.write(WORKERS_OBJECT, op).await;
    }

    async fn lock(&self, shard: u32) -> Result<(), super::client::RadosError> {
        let (rados, cookie, lease) = (self.rados.clone(), self.cookie.clone(), self.lease);
        let oid = shard_object(shard);
        let desc = format!("sluice mta {}", std::process::id());
        tokio::task::spawn_blocking(move || rados.lock_exclusive(&oid, OWNER_LOCK, &cookie, &desc, lease))
            .await
            .expect("lock task")
    }

    /// Records our heartbeat, removes long-dead entries, returns the number of live workers.
    async fn heartbeat(&self, now: u64, lease_ms: u64) -> Result<usize, super::client::RadosError> {
        let op = WriteOp::new().create(false).omap_set(vec![(self.cookie.as_bytes().to_vec(), now.to_string().into_bytes())]);
        self.rados.write(WORKERS_OBJECT, op).await?;
        let page = self
            .rados
            .omap_get(WORKERS_OBJECT, &[OmapQuery { start_after: String::new(), prefix: String::new(), max: 100_000 }])
            .await?
            .remove(0);
        let mut live = 0;
        let mut dead = Vec::new();
        for (k, v) in page.entries {
            let seen: u64 = std::str::from_utf8(&v).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
            if now.saturating_sub(seen) <= lease_ms {
                live += 1;
            } else if now.saturating_sub(seen) > 20 * lease_ms {
                dead.push(k);
            }
        }
        if !dead.is_empty() {
            let _ = self.rados.write(WORKERS_OBJECT, WriteOp::new().omap_rm(dead)).await;
        }
        Ok(live)
    }
}
