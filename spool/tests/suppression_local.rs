//! The suppression conformance suite against the local (fjall) backend, plus persistence.

use std::sync::Arc;

use sluice_spool::{LocalSpool, LocalSpoolOptions, Suppression, SuppressionList};

async fn fresh() -> Arc<dyn SuppressionList> {
    // Leaked on purpose: the directory must outlive the spool, which lives until the test ends.
    let dir = Box::leak(Box::new(tempfile::tempdir().unwrap()));
    Arc::new(LocalSpool::open(LocalSpoolOptions::new(dir.path())).unwrap())
}

sluice_spool::suppression_conformance_tests!(fresh());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suppressions_survive_reopening_the_spool() {
    let dir = tempfile::tempdir().unwrap();
    {
        let spool = LocalSpool::open(LocalSpoolOptions::new(dir.path())).unwrap();
        spool.suppress(vec![Suppression::new("t", "gone@example.com", "550 5.1.1 no", "r")]).await.unwrap();
    }
    let spool = LocalSpool::open(LocalSpoolOptions::new(dir.path())).unwrap();
    assert_eq!(spool.check("t", &["gone@example.com".to_string()]).await.unwrap(), [true]);
}
