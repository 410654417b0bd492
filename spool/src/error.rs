use crate::MessageId;

/// Why a spool operation failed. Every variant says what the caller should do next.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The storage layer failed; nothing in this call was made durable.
    #[error("spool storage error: {0} (nothing from this call was stored; retry later)")]
    Storage(String),
    /// The backend is temporarily unreachable or unhealthy (e.g. a Ceph cluster below
    /// min_size or full). Callers answer 4xx/503 and retry.
    #[error("spool unavailable: {0} (retry later)")]
    Unavailable(String),
    /// The lease ran out and the message may now belong to another worker: stop touching it.
    #[error("lease on message {0} was lost (it expired and the message went back to the queue)")]
    LeaseLost(MessageId),
    /// The spool was shut down.
    #[error("spool is closed")]
    Closed,
    /// A stored record could not be decoded.
    #[error("corrupt spool record for {what}: {reason}")]
    Corrupt { what: String, reason: String },
}

impl From<fjall::Error> for SpoolError {
    fn from(e: fjall::Error) -> Self {
        SpoolError::Storage(e.to_string())
    }
}
