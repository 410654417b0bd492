//! The spool: where an accepted message lives until every recipient has a final outcome.
//!
//! The spool is a *pull queue*. Edges [`Spool::enqueue`] messages durably (the caller may
//! acknowledge its client only after `enqueue` returned); MTA workers [`Spool::lease`] due
//! messages for a bounded time, then either [`Spool::complete`] them or
//! [`Spool::reschedule`] them for a later attempt. A lease that runs out puts the message
//! back in the queue, so a worker that dies loses nothing.
//!
//! Every backend implements the same [`Spool`] trait and passes the same conformance suite
//! (`conformance` feature): [`LocalSpool`] (fjall, one machine) and, behind the `rados` feature,
//! the Ceph RADOS backend shared by many nodes.

mod error;
mod local;
mod model;
mod spool;
mod suppression;

#[cfg(feature = "rados")]
pub mod rados;

#[cfg(feature = "conformance")]
pub mod conformance;
#[cfg(feature = "conformance")]
pub mod suppression_conformance;

pub use error::SpoolError;
pub use local::{CommitStats, LocalSpool, LocalSpoolOptions};
pub use model::{now_ms, Message, MessageId, MessageMeta, Recipient, RecipientState};
#[cfg(feature = "rados")]
pub use rados::{RadosSpool, RadosSpoolOptions};
pub use spool::{Lease, LeaseRequest, Leased, QueueFilter, Spool, SpoolCounts};
pub use suppression::{suppression_key, Suppression, SuppressionList};
