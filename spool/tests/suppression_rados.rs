//! The suppression conformance suite against the RADOS backend, on the real Ceph cluster the
//! test command starts (`SLUICE_CEPH_CONF`). Each case runs in a namespace of its own.
#![cfg(feature = "rados")]

use std::sync::Arc;
use std::time::Duration;

use sluice_spool::{RadosSpool, RadosSpoolOptions, Suppression, SuppressionList};

fn options(namespace: &str, own_shards: bool) -> RadosSpoolOptions {
    let conf = std::env::var("SLUICE_CEPH_CONF").expect(
        "SLUICE_CEPH_CONF is not set: the RADOS tests need the Ceph cluster that scripts/test.sh starts \\
         (or start one with scripts/ceph-cluster.sh start and export SLUICE_CEPH_CONF=<printed path>)",
    );
    let pool = std::env::var("SLUICE_CEPH_POOL").unwrap_or_else(|_| "sluice".into());
    let mut o = RadosSpoolOptions::new(conf, pool);
    o.namespace = Some(namespace.to_string());
    o.shards = 2;
    o.own_shards = own_shards;
    o.op_timeout = Duration::from_secs(10);
    o
}

async fn fresh() -> Arc<dyn SuppressionList> {
    let ns = format!("suppression-{}", ulid::Ulid::new());
    Arc::new(RadosSpool::open(options(&ns, true)).await.expect("open rados spool"))
}

sluice_spool::suppression_conformance_tests!(fresh());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mta_suppresses_and_an_edge_process_sees_it() {
    let ns = format!("suppression-shared-{}", ulid::Ulid::new());
    let mta = RadosSpool::open(options(&ns, true)).await.unwrap();
    let edge = RadosSpool::open(options(&ns, false)).await.unwrap();
    mta.suppress(vec![Suppression::new("t", "gone@example.com", "550 5.1.1", "r")]).await.unwrap();
    assert_eq!(edge.check("t", &["Gone@Example.com".to_string()]).await.unwrap(), [true]);
    mta.close().await;
}
