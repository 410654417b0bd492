//! sluice's test and load infrastructure:
//!
//! - [`gen`]: the load generator (SendGrid v3 HTTP and SMTP clients, closed and open loop,
//!   a workload of sizes, attachments and provider-weighted recipient domains) and its report;
//! - [`sink`]: mock ISPs, SMTP servers whose replies, latency and per-IP limits follow a
//!   scenario ([`sink::Profile`] files), several of them run together as a [`sink::Fleet`];
//! - [`dns`]: a small authoritative DNS server ([`dns::TestDns`]) so sluice resolves MX as in
//!   production;
//! - [`ledger`]: files of message ids (what the generator got acknowledged, what the sinks
//!   received) and their comparison;
//! - [`bench`]: the benchmark harness behind `scripts/bench.sh`.

pub mod bench;
pub mod dns;
pub mod gen;
pub mod ledger;
pub mod sink;
pub mod stamp;
pub mod stats;
