//! Key and value layouts of the local spool's keyspaces.
//!
//! `index` keys are `queue 0x00 due(u64 BE) id(16)`: one range scan per queue yields its due
//! messages oldest-first, and moving a message in time is remove-old + insert-new in one batch.
//! `index` values are `attempts(u32 BE) leased(u8)`, so opening the spool can rebuild its
//! counters (and void stale leases) from the index alone, without decoding any metadata.

use crate::MessageId;

pub fn index_key(queue: &str, due: u64, id: MessageId) -> Vec<u8> {
    let mut k = Vec::with_capacity(queue.len() + 1 + 8 + 16);
    k.extend_from_slice(queue.as_bytes());
    k.push(0);
    k.extend_from_slice(&due.to_be_bytes());
    k.extend_from_slice(&id.to_bytes());
    k
}

/// The smallest index key of `queue` with this due time (a range bound).
pub fn index_key_min(queue: &str, due: u64) -> Vec<u8> {
    index_key(queue, due, MessageId::from_bytes([0; 16]))
}

pub struct IndexKey {
    pub queue: String,
    pub due: u64,
    pub id: MessageId,
}

pub fn parse_index_key(k: &[u8]) -> Option<IndexKey> {
    if k.len() < 25 {
        return None;
    }
    let (head, id) = k.split_at(k.len() - 16);
    let (head, due) = head.split_at(head.len() - 8);
    let (queue, zero) = head.split_at(head.len() - 1);
    if zero != [0] {
        return None;
    }
    Some(IndexKey {
        queue: String::from_utf8(queue.to_vec()).ok()?,
        due: u64::from_be_bytes(due.try_into().ok()?),
        id: MessageId::from_bytes(id.try_into().ok()?),
    })
}

pub fn index_value(attempts: u32, leased: bool) -> [u8; 5] {
    let a = attempts.to_be_bytes();
    [a[0], a[1], a[2], a[3], leased as u8]
}

pub fn parse_index_value(v: &[u8]) -> (u32, bool) {
    match v {
        [a, b, c, d, l, ..] => (u32::from_be_bytes([*a, *b, *c, *d]), *l != 0),
        _ => (0, false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_keys_round_trip_and_sort_by_queue_then_due() {
        let id = MessageId::new();
        let k = index_key("gmail.com", 42, id);
        let p = parse_index_key(&k).unwrap();
        assert_eq!((p.queue.as_str(), p.due, p.id), ("gmail.com", 42, id));
        assert!(index_key("a.com", 9, id) < index_key("a.com", 10, id));
        // a queue that is a prefix of another must not interleave with it
        assert!(index_key("a.co", u64::MAX, id) < index_key("a.com", 0, id));
        assert_eq!(parse_index_value(&index_value(7, true)), (7, true));
    }
}
