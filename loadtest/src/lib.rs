//! sluice's test and load infrastructure: a mock remote MX ([`sink::Sink`]) whose replies
//! follow a [`sink::Scenario`], and a small authoritative DNS server ([`dns::TestDns`]) so
//! the MTA's MX resolution can be exercised without the Internet.

pub mod dns;
pub mod sink;
