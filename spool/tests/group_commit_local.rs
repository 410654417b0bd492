//! Group commit on the real local spool: enqueues that arrive together share fsyncs, and
//! everything acknowledged is in the spool when it is opened again.
//!
//! (That no caller is answered before the fsync covering its batch returned is shown with a
//! disk whose fsync can be held open, in `spool/src/local/group_commit.rs`.)

use std::sync::Arc;

use futures::future::join_all;
use sluice_spool::conformance::message;
use sluice_spool::{CommitStats, LocalSpool, LocalSpoolOptions, Spool};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_enqueues_share_fsyncs() {
    const CALLERS: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    let spool = Arc::new(LocalSpool::open(LocalSpoolOptions::new(dir.path())).unwrap());
    assert_eq!(spool.commit_stats(), CommitStats::default());

    // All requests are handed to the committer at once; the first fsync is still running
    // when the others arrive, so they are written together and synced together.
    let batches: Vec<_> = (0..CALLERS).map(|i| vec![message("example.com", &[&format!("r{i}@example.com")])]).collect();
    let ids: Vec<_> = batches.iter().map(|b| b[0].id()).collect();
    let results = join_all(batches.into_iter().map(|b| {
        let spool = spool.clone();
        async move { spool.enqueue(b).await }
    }))
    .await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");

    let stats = spool.commit_stats();
    assert_eq!(stats.messages, CALLERS as u64, "every message was committed once");
    assert!(stats.commits >= 1 && stats.commits < CALLERS as u64, "{CALLERS} enqueues took {} fsyncs", stats.commits);
    eprintln!("{CALLERS} concurrent enqueues: {} group commits", stats.commits);

    // Everything acknowledged is there after the spool is closed and opened again.
    drop(spool);
    let spool = LocalSpool::open(LocalSpoolOptions::new(dir.path())).unwrap();
    for id in ids {
        assert!(spool.get(id).await.unwrap().is_some(), "{id} acknowledged but missing after reopening");
    }
    assert_eq!(spool.counts().await.unwrap().queued, CALLERS as u64);
}
