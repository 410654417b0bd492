//! sluice's delivery workers.
//!
//! [`Mta::run`] leases due messages from the spool, groups them by destination domain,
//! resolves where each domain's mail goes (routes, smart host or MX), and delivers over
//! SMTP with a client that keeps every reply line. Every reply, and every failure that had
//! none (refused, timeout, TLS, DNS), is classified by the rules engine; the outcome decides
//! per recipient: delivered, retried with backoff, or bounced. Events go to the event log.
//! Messages are DKIM-signed once, on their first attempt ([`dkim`]).

mod body;
mod config;
mod delivery;
pub mod dkim;
mod outcome;
mod route;
pub mod shaping;
pub mod smtp_client;
pub mod synthetic;
mod tls;
mod worker;

pub use config::{MtaConfig, ResolverSettings, RetrySettings, Timeouts, TlsMode, TlsSettings};
pub use worker::{explain_offline, Mta, MtaControl, MtaSetupError};
