//! Reply classification: every SMTP reply (and every connection-level failure, as a synthetic
//! reply) goes through a [`Classify`] implementation, whose [`Outcome`] decides whether the
//! recipient is delivered, retried or bounced, how the bounce is classified, whether the
//! address is suppressed, and what shaping action applies to the sending path.
//!
//! The decisions live in a data-driven [`Table`] (TOML files, first match wins, see
//! docs/rules.md), compiled once and served by an [`Engine`] that reloads it without locking
//! readers. Replies no rule matches fall back to [`Builtin`] (RFC 3463, then RFC 5321).
//!
//! This crate knows nothing about sockets: it sees reply lines and a [`Context`].

mod builtin;
mod compile;
mod config;
pub mod corpus;
mod engine;
mod error;
mod outcome;
pub mod pattern;
pub mod provider;
mod rate;
mod reply;
mod source;
mod table;
mod watch;

pub use builtin::{Builtin, FallbackLayer};
pub use config::RulesConfig;
pub use engine::{Engine, Reloaded};
pub use error::{Diagnostic, TableError};
pub use outcome::{BounceClass, BounceType, Disposition, Outcome, ShapingAction, Threshold};
pub use provider::{Provider, Providers};
pub use rate::Rate;
pub use reply::{EnhancedCode, Reply, ReplyError, Stage};
pub use source::{default_sources, read_sources, version_of, Location, ReadError, Source, DEFAULT_TABLE};
pub use table::{Candidate, Decider, Example, Explanation, Rule, Table, TextPattern};
pub use watch::{watch_files, FileWatch, WatchError};

/// Compiles a table from in-memory sources (for tools; the MTA uses an [`Engine`]).
pub fn compile(sources: &[Source]) -> Result<Table, TableError> {
    compile::compile(sources, &table::HitCounters::default())
}

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
/// reply to every recipient. The outcome names the rule and the table version that decided.
pub trait Classify: Send + Sync {
    fn classify(&self, reply: &Reply, ctx: &Context<'_>) -> Outcome;

    /// The id of the provider (from the table's `[[provider]]` data) behind a destination:
    /// by MX host first, else by recipient domain. Traffic shaping groups paths by it.
    fn provider_of(&self, _mx_host: Option<&str>, _domain: Option<&str>) -> Option<String> {
        None
    }

    /// Whether the table defines a provider with this id.
    fn has_provider(&self, _id: &str) -> bool {
        false
    }
}
