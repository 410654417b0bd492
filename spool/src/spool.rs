//! The `Spool` trait every backend implements.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::{Message, MessageId, MessageMeta, SpoolError};

/// Decides whether a worker wants messages from a queue right now. The MTA uses it to skip
/// destinations that are throttled or suspended, so their backlog never blocks the others.
pub type QueueFilter = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// What a worker asks for when it leases.
#[derive(Clone)]
pub struct LeaseRequest {
    /// At most this many messages in total.
    pub max: usize,
    /// At most this many from any one queue, so one big backlog cannot fill the whole lease.
    pub max_per_queue: usize,
    /// How long the worker may hold them before they return to the queue.
    pub lease_for: Duration,
    /// Only queues for which this returns true are leased from (all when `None`).
    pub filter: Option<QueueFilter>,
}

impl LeaseRequest {
    pub fn new(max: usize, lease_for: Duration) -> Self {
        LeaseRequest { max, max_per_queue: max, lease_for, filter: None }
    }
}

/// Proof that a worker holds a message. Presented to `complete` and `reschedule`; refused
/// with [`SpoolError::LeaseLost`] once the lease ran out and the message was leased again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub id: MessageId,
    /// Distinguishes this lease from every other lease of the same message.
    pub token: u64,
    /// When the lease runs out (ms since epoch).
    pub until: u64,
}

/// A leased message.
#[derive(Clone, Debug)]
pub struct Leased {
    pub lease: Lease,
    pub meta: MessageMeta,
    pub body: Bytes,
}

/// Counts by state, for operators and the queue-depth metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SpoolCounts {
    /// Messages waiting in the queue (due now or later), including retries.
    pub queued: u64,
    /// Of `queued`, those that have been tried at least once (retries).
    pub deferred: u64,
    /// Messages currently leased to a worker (in flight).
    pub leased: u64,
}

#[async_trait]
pub trait Spool: Send + Sync + 'static {
    /// Stores every message of the batch durably, or none of them. When this returns `Ok`,
    /// the messages survive a crash of this process (and, for replicated backends, the loss
    /// of a storage node); only then may the caller acknowledge its client.
    async fn enqueue(&self, batch: Vec<Message>) -> Result<(), SpoolError>;

    /// Leases messages whose due time has passed: oldest due first within a queue, queues
    /// visited round-robin.
    async fn lease(&self, req: LeaseRequest) -> Result<Vec<Leased>, SpoolError>;

    /// Puts a leased message back with updated metadata (`meta.due_at` is the next attempt;
    /// recipients, attempts, last reply and prepended headers are taken from `meta`).
    async fn reschedule(&self, lease: &Lease, meta: MessageMeta) -> Result<(), SpoolError>;

    /// Removes a leased message: every recipient has a final outcome.
    async fn complete(&self, lease: &Lease) -> Result<(), SpoolError>;

    /// Reads a message's metadata, leased or not (for operators and tests).
    async fn get(&self, id: MessageId) -> Result<Option<MessageMeta>, SpoolError>;

    async fn counts(&self) -> Result<SpoolCounts, SpoolError>;

    /// Short backend name for logs and metrics (`local`, `rados`).
    fn backend(&self) -> &'static str;
}
