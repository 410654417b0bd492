//! Reply classification: every SMTP reply (and every connection-level failure, as a synthetic
//! reply) goes through a [`Classify`] implementation, whose [`Outcome`] decides whether the
//! recipient is delivered, retried or bounced, how the bounce is classified, whether the
//! address is suppressed, and what shaping action applies to the sending path.
//!
//! This crate knows nothing about sockets: it sees reply lines and a [`Context`].

mod builtin;
mod outcome;
mod reply;

pub use builtin::Builtin;
pub use outcome::{BounceClass, Disposition, Outcome, ShapingAction};
pub use reply::{EnhancedCode, Reply, ReplyError, Stage};

/// Where a reply came from, for rules scoped to a provider or an SMTP stage.
#[derive(Clone, Copy, Debug, Default)]
pub struct Context<'a> {
    pub stage: Option<Stage>,
    /// The MX host that answered, if a connection was made.
    pub mx_host: Option<&'a str>,
    /// The recipient domain.
    pub domain: Option<&'a str>,
}

/// A reply classifier. Implementations must be cheap to call: the MTA calls this for every
/// reply to every recipient.
pub trait Classify: Send + Sync {
    fn classify(&self, reply: &Reply, ctx: &Context<'_>) -> Outcome;
    /// An identifier of the table in use (a content hash), written into events.
    fn version(&self) -> &str;
}
