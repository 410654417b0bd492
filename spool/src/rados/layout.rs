//! How the spool is laid out in a RADOS pool. Documented in docs/architecture.md.
//!
//! Objects:
//! - `sluice.meta`: omap `shards` = the number of index shards (fixed when the pool is first used).
//! - `sluice.workers`: omap, one key per live MTA process (its lock cookie) → heartbeat time.
//! - `sluice.shard.NNNN`: one index shard. Its omap holds
//!   - `i<queue>|<due, 16 hex>|<id>` → [`IndexValue`]: the queue index, sorted by queue, then
//!     due time, then id, so one prefix scan yields a queue's due messages oldest first;
//!   - `m<id>` → the message's current `i` key (to find a message by id);
//!   - `q<queue>` → a token rewritten on every insert: the shard's queue directory;
//!   - `l<id>` → the `i` key of a leased message: the shard's in-flight list, so a new owner
//!     finds a dead owner's leases without scanning the whole index;
//!   - `d<id>` → empty, for messages tried at least once (retries), so counting by state needs
//!     no value reads;
//!   - `o<id>` → empty, for messages whose body is an object of its own (not inline), so the
//!     sweeper finds the entries to check without reading values.
//!
//!   The shard's owner holds the exclusive cls_lock `sluice-owner` on this object.
//! - `sluice.msg.NNNN.<id>`: a message body too large to live inline in its index entry, NNNN
//!   its index shard.
//! - `sluice.suppressions.NN`: the suppression list, [`SUPPRESSION_SHARDS`] objects; omap
//!   [`crate::suppression_key`] → JSON [`crate::Suppression`], the object chosen by a hash of
//!   the key so one hot object does not take every bounce of a deployment.

use crate::{MessageId, MessageMeta, SpoolError};

pub const META_OBJECT: &str = "sluice.meta";
pub const WORKERS_OBJECT: &str = "sluice.workers";
pub const BODY_PREFIX: &str = "sluice.msg.";
pub const OWNER_LOCK: &str = "sluice-owner";

/// Objects the suppression list is spread over (fixed: changing it would hide entries).
pub const SUPPRESSION_SHARDS: u32 = 16;

/// The object holding a suppression key: FNV-1a of the key (written out here because the
/// hash must never change between versions, which std's hasher does not promise).
pub fn suppression_object(key: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in key.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("sluice.suppressions.{:02}", h % SUPPRESSION_SHARDS)
}

pub fn shard_object(shard: u32) -> String {
    format!("sluice.shard.{shard:04}")
}

pub fn body_object(shard: u32, id: MessageId) -> String {
    format!("{BODY_PREFIX}{shard:04}.{id}")
}

/// Parses `sluice.msg.NNNN.<id>`.
pub fn parse_body_object(name: &str) -> Option<(u32, MessageId)> {
    let rest = name.strip_prefix(BODY_PREFIX)?;
    let (shard, id) = rest.split_once('.')?;
    Some((shard.parse().ok()?, id.parse().ok()?))
}

pub fn queue_prefix(queue: &str) -> String {
    format!("i{queue}|")
}

pub fn index_key(queue: &str, due: u64, id: MessageId) -> String {
    format!("i{queue}|{due:016x}|{id}")
}

pub struct IndexKey {
    pub queue: String,
    pub due: u64,
    pub id: MessageId,
}

pub fn parse_index_key(k: &[u8]) -> Option<IndexKey> {
    let s = std::str::from_utf8(k).ok()?.strip_prefix('i')?;
    let mut parts = s.rsplitn(3, '|');
    let id = parts.next()?.parse().ok()?;
    let due = u64::from_str_radix(parts.next()?, 16).ok()?;
    let queue = parts.next()?.to_string();
    Some(IndexKey { queue, due, id })
}

pub fn id_key(id: MessageId) -> String {
    format!("m{id}")
}

pub fn lease_key(id: MessageId) -> String {
    format!("l{id}")
}

pub fn retry_key(id: MessageId) -> String {
    format!("d{id}")
}

pub fn body_key(id: MessageId) -> String {
    format!("o{id}")
}

pub fn dir_key(queue: &str) -> String {
    format!("q{queue}")
}

/// The value of an `i` key: a fixed header, the message metadata as JSON, and the body when
/// it is small enough to live in the index (see `RadosSpoolOptions::inline_body_max`): then
/// enqueue, lease and complete need no per-message object operation at all.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexValue {
    pub attempts: u32,
    pub leased: bool,
    pub body_len: u64,
    pub meta: MessageMeta,
    /// The body, when stored inline; otherwise it is the object `sluice.msg.NNNN.<id>`.
    pub body: Option<bytes::Bytes>,
}

// attempts u32, leased u8, body_len u64, inline u8, meta_len u32 (all big-endian)
const HEADER: usize = 4 + 1 + 8 + 1 + 4;

impl IndexValue {
    pub fn encode(&self) -> Result<Vec<u8>, SpoolError> {
        let meta = serde_json::to_vec(&self.meta).map_err(|e| SpoolError::Storage(e.to_string()))?;
        let inline = self.body.as_ref().map(|b| b.len()).unwrap_or(0);
        let mut v = Vec::with_capacity(HEADER + meta.len() + inline);
        v.extend_from_slice(&self.attempts.to_be_bytes());
        v.push(self.leased as u8);
        v.extend_from_slice(&self.body_len.to_be_bytes());
        v.push(self.body.is_some() as u8);
        v.extend_from_slice(&(meta.len() as u32).to_be_bytes());
        v.extend_from_slice(&meta);
        if let Some(b) = &self.body {
            v.extend_from_slice(b);
        }
        Ok(v)
    }

    pub fn decode(v: &[u8]) -> Result<IndexValue, SpoolError> {
        let corrupt = |reason: String| SpoolError::Corrupt { what: "rados index value".into(), reason };
        if v.len() < HEADER {
            return Err(corrupt(format!("{} bytes", v.len())));
        }
        let meta_len = u32::from_be_bytes(v[14..18].try_into().expect("4 bytes")) as usize;
        let meta_end = HEADER.checked_add(meta_len).filter(|e| *e <= v.len()).ok_or_else(|| corrupt("truncated".into()))?;
        let inline = v[13] != 0;
        Ok(IndexValue {
            attempts: u32::from_be_bytes(v[0..4].try_into().expect("4 bytes")),
            leased: v[4] != 0,
            body_len: u64::from_be_bytes(v[5..13].try_into().expect("8 bytes")),
            meta: serde_json::from_slice(&v[HEADER..meta_end]).map_err(|e| corrupt(e.to_string()))?,
            body: inline.then(|| bytes::Bytes::copy_from_slice(&v[meta_end..])),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_sort_by_due() {
        let id = MessageId::new();
        let k = index_key("mx.example.com", 0x1234, id);
        let p = parse_index_key(k.as_bytes()).unwrap();
        assert_eq!((p.queue.as_str(), p.due, p.id), ("mx.example.com", 0x1234, id));
        assert!(index_key("a.com", 9, id) < index_key("a.com", 10, id));
        assert!(k.starts_with(&queue_prefix("mx.example.com")));
        assert_eq!(parse_body_object(&body_object(7, id)), Some((7, id)));
    }
}
