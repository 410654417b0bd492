//! RADOS-specific behaviour on the real cluster: shard ownership, take-over, fencing,
//! orphan sweeping, and errors (not hangs) when the cluster cannot take writes.
#![cfg(feature = "rados")]

use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

use sluice_spool::conformance::message;
use sluice_spool::{LeaseRequest, RadosSpool, RadosSpoolOptions, Spool, SpoolError};

fn conf() -> String {
    std::env::var("SLUICE_CEPH_CONF").expect("SLUICE_CEPH_CONF is not set: run scripts/test.sh, which starts a Ceph cluster")
}

fn pool() -> String {
    std::env::var("SLUICE_CEPH_POOL").unwrap_or_else(|_| "sluice".into())
}

fn options(ns: &str) -> RadosSpoolOptions {
    let mut o = RadosSpoolOptions::new(conf(), pool());
    o.namespace = Some(ns.to_string());
    o.shards = 8;
    o.shard_lease = Duration::from_secs(2);
    o
}

fn namespace(name: &str) -> String {
    format!("{name}-{}", ulid::Ulid::new())
}

fn rados(args: &[&str]) -> String {
    let out = Command::new("rados").arg("-c").arg(conf()).args(args).output().expect("run the rados CLI");
    assert!(out.status.success(), "rados {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_share_shards_and_take_over_a_dead_workers_shards() {
    let ns = namespace("ownership");
    let a = RadosSpool::open(options(&ns)).await.unwrap();
    assert_eq!(a.owned_shards().len(), 8, "a lone worker owns every shard");
    let b = RadosSpool::open(options(&ns)).await.unwrap();
    // a hands shards back as it notices b; b picks them up
    wait_until("an even split", Duration::from_secs(30), || a.owned_shards().len() == 4 && b.owned_shards().len() == 4).await;
    let owned_a: HashSet<u32> = a.owned_shards().into_iter().collect();
    let owned_b: HashSet<u32> = b.owned_shards().into_iter().collect();
    assert!(owned_a.is_disjoint(&owned_b), "no shard has two owners");

    // b leases messages for a long time, then dies without releasing anything
    for i in 0..40 {
        b.enqueue(vec![message("takeover.test", &[&format!("{i}@takeover.test")])]).await.unwrap();
    }
    let held_by_b = b.lease(LeaseRequest::new(100, Duration::from_secs(600))).await.unwrap();
    assert!(!held_by_b.is_empty(), "b leased from its shards");
    drop(b);
    // its locks run out and a takes its shards over...
    wait_until("take-over", Duration::from_secs(30), || a.owned_shards().len() == 8).await;
    // ...and b's in-flight messages come back at once, not when b's 10-minute leases would end
    let mut got = HashSet::new();
    let start = Instant::now();
    while got.len() < 40 {
        assert!(start.elapsed() < Duration::from_secs(30), "only {} of 40 messages came back", got.len());
        for l in a.lease(LeaseRequest::new(100, Duration::from_secs(60))).await.unwrap() {
            got.insert(l.meta.id);
            a.complete(&l.lease).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for l in &held_by_b {
        assert!(got.contains(&l.meta.id));
    }
    a.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_lost_its_shard_cannot_touch_it() {
    let ns = namespace("fencing");
    let a = RadosSpool::open(options(&ns)).await.unwrap();
    let m = message("fence.test", &["x@fence.test"]);
    a.enqueue(vec![m.clone()]).await.unwrap();
    let held = a.lease(LeaseRequest::new(10, Duration::from_secs(1))).await.unwrap().remove(0);

    // a hangs: it stops renewing; b starts and takes every shard once a's locks ran out
    a.stop_renewing();
    let b = RadosSpool::open(options(&ns)).await.unwrap();
    wait_until("b owns everything", Duration::from_secs(30), || b.owned_shards().len() == 8).await;

    // a wakes up and tries to finish its work: fenced
    let err = a.complete(&held.lease).await.unwrap_err();
    assert!(matches!(err, SpoolError::LeaseLost(_)), "{err}");
    // the message was not lost: b leases it once a's lease ran out
    let mut got = Vec::new();
    let start = Instant::now();
    while got.is_empty() && start.elapsed() < Duration::from_secs(20) {
        got = b.lease(LeaseRequest::new(10, Duration::from_secs(60))).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].meta.id, m.id());
    assert_eq!(got[0].body, m.body);
    b.complete(&got[0].lease).await.unwrap();
    assert!(b.get(m.id()).await.unwrap().is_none());
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweeper_removes_orphans_both_ways() {
    let ns = namespace("sweep");
    let mut o = options(&ns);
    o.orphan_age = Duration::ZERO;
    o.inline_body_max = 0; // bodies as objects, which is what can be orphaned
    let spool = RadosSpool::open(o).await.unwrap();
    let keep = message("sweep.test", &["keep@sweep.test"]);
    let orphan_body = message("sweep.test", &["body@sweep.test"]);
    let orphan_entry = message("sweep.test", &["entry@sweep.test"]);
    spool.enqueue(vec![keep.clone()]).await.unwrap();
    spool.enqueue(vec![orphan_body.clone()]).await.unwrap();
    spool.enqueue(vec![orphan_entry.clone()]).await.unwrap();
    let objects = rados(&["-p", &pool(), "-N", &ns, "ls"]);
    let body_of = |id: &str| objects.lines().find(|l| l.ends_with(id)).expect("body object").to_string();
    // a body whose index entries vanished (crash between the two writes)
    let shard_of_body = body_of(&orphan_body.id().to_string());
    let shard = &shard_of_body["sluice.msg.".len().."sluice.msg.".len() + 4];
    let shard_obj = format!("sluice.shard.{shard}");
    let ikey = rados(&["-p", &pool(), "-N", &ns, "getomapval", &shard_obj, &format!("m{}", orphan_body.id())]);
    assert!(!ikey.is_empty());
    rados(&["-p", &pool(), "-N", &ns, "rmomapkey", &shard_obj, &format!("m{}", orphan_body.id())]);
    // an index entry whose body vanished
    rados(&["-p", &pool(), "-N", &ns, "rm", &body_of(&orphan_entry.id().to_string())]);

    let (bodies, _) = spool.sweep().await.unwrap();
    assert_eq!(bodies, 1, "the orphaned body is removed");
    let after = rados(&["-p", &pool(), "-N", &ns, "ls"]);
    assert!(!after.contains(&orphan_body.id().to_string()));
    assert!(after.contains(&keep.id().to_string()), "live bodies are kept");

    let leased = spool.lease(LeaseRequest::new(10, Duration::from_secs(60))).await.unwrap();
    let ids: Vec<_> = leased.iter().map(|l| l.meta.id).collect();
    assert!(ids.contains(&keep.id()));
    assert!(!ids.contains(&orphan_entry.id()), "an entry without body is dropped, not delivered");
    spool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_gives_an_error_within_the_timeout_not_a_hang() {
    let full_pool = format!("sluice-full-{}", std::process::id());
    let ceph = |args: &[&str]| {
        let out = Command::new("ceph").arg("-c").arg(conf()).args(args).output().expect("run the ceph CLI");
        assert!(out.status.success(), "ceph {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    ceph(&["osd", "pool", "create", &full_pool, "8", "8"]);
    ceph(&["osd", "pool", "application", "enable", &full_pool, "rados"]);
    let mut o = RadosSpoolOptions::new(conf(), full_pool.clone());
    o.shards = 2;
    o.own_shards = false;
    o.op_timeout = Duration::from_secs(3);
    let spool = RadosSpool::open(o).await.unwrap();
    // a quota the next writes exceed (the cluster flags the pool full a moment later)
    ceph(&["osd", "pool", "set-quota", &full_pool, "max_objects", "1"]);
    let started = Instant::now();
    let mut last = Ok(());
    while started.elapsed() < Duration::from_secs(60) {
        last = spool.enqueue(vec![message("full.test", &["a@full.test"])]).await;
        if last.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let err = last.expect_err("writes to a full pool must fail");
    assert!(matches!(err, SpoolError::Unavailable(_)), "a full pool is reported as unavailable: {err}");
    // recovers by itself once space is back
    ceph(&["osd", "pool", "set-quota", &full_pool, "max_objects", "0"]);
    let started = Instant::now();
    loop {
        match spool.enqueue(vec![message("full.test", &["b@full.test"])]).await {
            Ok(()) => break,
            Err(e) => assert!(started.elapsed() < Duration::from_secs(60), "did not recover: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(spool);
    ceph(&["osd", "pool", "rm", &full_pool, &full_pool, "--yes-i-really-really-mean-it"]);
}
