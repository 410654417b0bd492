//! The shared conformance suite against the RADOS backend, on the real Ceph cluster the test
//! command starts (`SLUICE_CEPH_CONF`, pool `SLUICE_CEPH_POOL` or `sluice`). Each case runs in
//! a namespace of its own.
#![cfg(feature = "rados")]

use std::sync::Arc;
use std::time::Duration;

use sluice_spool::{RadosSpool, RadosSpoolOptions, Spool};

pub fn options(namespace: &str) -> RadosSpoolOptions {
    let conf = std::env::var("SLUICE_CEPH_CONF").expect(
        "SLUICE_CEPH_CONF is not set: the RADOS tests need the Ceph cluster that scripts/test.sh starts \
         (or start one with scripts/ceph-cluster.sh start and export SLUICE_CEPH_CONF=<printed path>)",
    );
    let pool = std::env::var("SLUICE_CEPH_POOL").unwrap_or_else(|_| "sluice".into());
    let mut o = RadosSpoolOptions::new(conf, pool);
    o.namespace = Some(namespace.to_string());
    o.shards = 4;
    o.op_timeout = Duration::from_secs(10);
    o
}

/// Bodies inline in the index (the default for messages up to 64 KiB).
mod inline_bodies {
    use super::*;

    async fn fresh() -> Arc<dyn Spool> {
        let ns = format!("conformance-{}", ulid::Ulid::new());
        Arc::new(RadosSpool::open(options(&ns)).await.expect("open rados spool"))
    }

    sluice_spool::spool_conformance_tests!(fresh());
}

/// Every body an object of its own (what larger messages get).
mod body_objects {
    use super::*;

    async fn fresh() -> Arc<dyn Spool> {
        let ns = format!("conformance-objects-{}", ulid::Ulid::new());
        let mut o = options(&ns);
        o.inline_body_max = 0;
        Arc::new(RadosSpool::open(o).await.expect("open rados spool"))
    }

    sluice_spool::spool_conformance_tests!(fresh());
}
