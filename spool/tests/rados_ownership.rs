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

/// A message whose id (and so its enqueue) is `age` old.
fn aged_message(rcpt: &str, age: Duration) -> sluice_spool::Message {
    let mut m = message("sweep.test", &[rcpt]);
    let ts = sluice_spool::now_ms() - age.as_millis() as u64;
    m.meta.id = sluice_spool::MessageId::from_bytes(ulid::Ulid::from_parts(ts, rand::random()).to_bytes());
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweeper_removes_orphans_both_ways() {
    let ns = namespace("sweep");
    let mut o = options(&ns);
    o.orphan_age = Duration::from_secs(60);
    o.inline_body_max = 0; // bodies as objects, which is what can be orphaned
    let spool = RadosSpool::open(o).await.unwrap();
    let old = Duration::from_secs(120);
    let keep = aged_message("keep@sweep.test", old);
    let orphan_body = aged_message("body@sweep.test", old);
    let orphan_entry = aged_message("entry@sweep.test", old);
    // younger than orphan_age: could be an enqueue in flight, so the sweeper leaves them alone
    let young_body = message("sweep.test", &["young-body@sweep.test"]);
    let young_entry = message("sweep.test", &["young-entry@sweep.test"]);
    for m in [&keep, &orphan_body, &orphan_entry, &young_body, &young_entry] {
        spool.enqueue(vec![m.clone()]).await.unwrap();
    }
    let ls = |ns: &str| rados(&["-p", &pool(), "-N", ns, "ls"]);
    let objects = ls(&ns);
    let body_of = |id: sluice_spool::MessageId| objects.lines().find(|l| l.ends_with(&id.to_string())).expect("body object").to_string();
    let shard_of = |id| {
        let body = body_of(id);
        format!("sluice.shard.{}", &body["sluice.msg.".len().."sluice.msg.".len() + 4])
    };
    // bodies whose index entries vanished (the edge crashed between the two writes)
    let scratch = tempfile::tempdir().unwrap();
    for m in [&orphan_body, &young_body] {
        let shard = shard_of(m.id());
        let ikey_file = scratch.path().join("ikey");
        rados(&["-p", &pool(), "-N", &ns, "getomapval", &shard, &format!("m{}", m.id()), ikey_file.to_str().unwrap()]);
        let ikey = std::fs::read_to_string(&ikey_file).unwrap();
        assert!(ikey.starts_with("isweep.test|"), "{ikey}");
        for key in [ikey, format!("m{}", m.id()), format!("o{}", m.id())] {
            rados(&["-p", &pool(), "-N", &ns, "rmomapkey", &shard, &key]);
        }
    }
    // index entries whose bodies vanished
    for m in [&orphan_entry, &young_entry] {
        rados(&["-p", &pool(), "-N", &ns, "rm", &body_of(m.id())]);
    }

    let (bodies, entries) = spool.sweep().await.unwrap();
    assert_eq!(bodies, 1, "the old orphaned body is removed");
    assert_eq!(entries, 1, "the old entry without a body is removed");
    let after = ls(&ns);
    assert!(!after.contains(&orphan_body.id().to_string()));
    assert!(after.contains(&young_body.id().to_string()), "a young body may belong to an enqueue in flight");
    assert!(after.contains(&keep.id().to_string()), "live bodies are kept");
    assert!(spool.get(orphan_entry.id()).await.unwrap().is_none(), "the dead entry is gone");
    let keys = rados(&["-p", &pool(), "-N", &ns, "listomapkeys", &shard_of(orphan_entry.id())]);
    assert!(!keys.contains(&orphan_entry.id().to_string()), "every key of the dead entry is removed: {keys}");
    assert!(spool.get(young_entry.id()).await.unwrap().is_some(), "a young entry is left alone");
    assert!(spool.get(keep.id()).await.unwrap().is_some());
    assert_eq!(spool.sweep().await.unwrap(), (0, 0), "nothing left to sweep");

    let leased = spool.lease(LeaseRequest::new(10, Duration::from_secs(60))).await.unwrap();
    let ids: Vec<_> = leased.iter().map(|l| l.meta.id).collect();
    assert!(ids.contains(&keep.id()));
    assert!(!ids.contains(&orphan_entry.id()));
    assert!(!ids.contains(&young_entry.id()), "an entry without body is dropped, not delivered");
    assert!(spool.get(young_entry.id()).await.unwrap().is_none(), "the lease removed the entry it could not read");
    spool.close().await;
}

fn ceph(args: &[&str]) {
    let out = Command::new("ceph").arg("-c").arg(conf()).args(args).output().expect("run the ceph CLI");
    assert!(out.status.success(), "ceph {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A pool of the test's own, removed however the test ends.
struct TempPool(String);

impl Drop for TempPool {
    fn drop(&mut self) {
        let _ = Command::new("ceph")
            .arg("-c")
            .arg(conf())
            .args(["osd", "pool", "rm", &self.0, &self.0, "--yes-i-really-really-mean-it"])
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_gives_an_error_within_the_timeout_not_a_hang() {
    let full_pool = TempPool(format!("sluice-full-{}", std::process::id()));
    ceph(&["osd", "pool", "create", &full_pool.0, "8", "8"]);
    ceph(&["osd", "pool", "application", "enable", &full_pool.0, "rados"]);
    let op_timeout = Duration::from_secs(3);
    let mut o = RadosSpoolOptions::new(conf(), full_pool.0.clone());
    o.shards = 2;
    o.own_shards = false;
    o.op_timeout = op_timeout;
    let spool = RadosSpool::open(o).await.unwrap();
    // a quota the next writes exceed (the cluster flags the pool full a moment later)
    ceph(&["osd", "pool", "set-quota", &full_pool.0, "max_objects", "1"]);
    let started = Instant::now();
    let mut refusals = 0;
    while started.elapsed() < Duration::from_secs(60) && refusals < 3 {
        let attempt = Instant::now();
        let r = spool.enqueue(vec![message("full.test", &["a@full.test"])]).await;
        let took = attempt.elapsed();
        // every answer, refusal or not, within the op timeout and a margin: never a hang
        assert!(took < op_timeout + Duration::from_secs(10), "enqueue answered after {took:?}: {r:?}");
        if let Err(err) = r {
            assert!(matches!(err, SpoolError::Unavailable(_)), "a full pool is reported as unavailable: {err}");
            refusals += 1;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(refusals, 3, "writes to a full pool must fail");
    // recovers by itself once space is back
    ceph(&["osd", "pool", "set-quota", &full_pool.0, "max_objects", "0"]);
    let started = Instant::now();
    loop {
        match spool.enqueue(vec![message("full.test", &["b@full.test"])]).await {
            Ok(()) => break,
            Err(e) => assert!(started.elapsed() < Duration::from_secs(60), "did not recover: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(spool);
}
