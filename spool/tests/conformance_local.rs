//! The shared conformance suite against the local (fjall) backend.

use std::sync::Arc;

use sluice_spool::{LocalSpool, LocalSpoolOptions, Spool};

async fn fresh() -> Arc<dyn Spool> {
    // Leaked on purpose: the directory must outlive the spool, which lives until the test ends.
    let dir = Box::leak(Box::new(tempfile::tempdir().unwrap()));
    Arc::new(LocalSpool::open(LocalSpoolOptions::new(dir.path())).unwrap())
}

sluice_spool::spool_conformance_tests!(fresh());
