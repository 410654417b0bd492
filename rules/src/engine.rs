//! The engine the MTA holds: the current table behind an `ArcSwap`, so classifying never
//! locks and never sees a table that is half loaded. Reloading reads and fully compiles the
//! new table (every example must pass) before one atomic swap; a bad table is rejected and
//! the old one keeps serving.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::compile::compile;
use crate::error::TableError;
use crate::source::{read_sources, Source};
use crate::table::{HitCounters, Table};
use crate::{Classify, Context, Outcome, Reply};

/// What a successful reload did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reloaded {
    pub version: Arc<str>,
    pub previous: Arc<str>,
    pub rules: usize,
}

impl Reloaded {
    pub fn changed(&self) -> bool {
        self.version != self.previous
    }
}

pub struct Engine {
    current: ArcSwap<Table>,
    /// The files (or directories, or `@default`) the table is read from, in order.
    files: Vec<PathBuf>,
    hits: Arc<HitCounters>,
    /// One reload at a time, so a slow older reload cannot overwrite a newer table.
    reloading: Mutex<()>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("files", &self.files).field("version", &self.version()).finish()
    }
}

impl Engine {
    /// Reads and compiles the table from `files` (paths, directories, `@default`).
    pub fn load(files: Vec<PathBuf>) -> Result<Engine, TableError> {
        let sources = read_sources(&files)?;
        let hits = Arc::new(HitCounters::default());
        let table = compile(&sources, &hits)?;
        Ok(Engine { current: ArcSwap::from_pointee(table), files, hits, reloading: Mutex::new(()) })
    }

    /// An engine over in-memory sources (tests, tools); `reload` re-reads nothing.
    pub fn from_sources(sources: &[Source]) -> Result<Engine, TableError> {
        let hits = Arc::new(HitCounters::default());
        let table = compile(sources, &hits)?;
        Ok(Engine { current: ArcSwap::from_pointee(table), files: Vec::new(), hits, reloading: Mutex::new(()) })
    }

    /// Re-reads the files and swaps the new table in if it is valid. Blocking (file reads and
    /// regex compilation): call it off the async reactor.
    pub fn reload(&self) -> Result<Reloaded, TableError> {
        let _one_at_a_time = self.reloading.lock().expect("reload lock poisoned");
        let sources = read_sources(&self.files)?;
        self.install(&sources)
    }

    /// Compiles `sources` and swaps them in if valid (what `reload` does after reading).
    pub fn reload_from(&self, sources: &[Source]) -> Result<Reloaded, TableError> {
        let _one_at_a_time = self.reloading.lock().expect("reload lock poisoned");
        self.install(sources)
    }

    fn install(&self, sources: &[Source]) -> Result<Reloaded, TableError> {
        let table = compile(sources, &self.hits)?;
        let reloaded = Reloaded { version: table.version().clone(), previous: self.version(), rules: table.rules().len() };
        self.current.store(Arc::new(table));
        Ok(reloaded)
    }

    /// The table in use now. Keep it only briefly: a reload does not change it.
    pub fn table(&self) -> Arc<Table> {
        self.current.load_full()
    }

    pub fn version(&self) -> Arc<str> {
        self.current.load().version().clone()
    }

    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Hits per rule id (and per fallback layer) since the engine was created; counters
    /// survive reloads.
    pub fn hits(&self) -> Vec<(String, u64)> {
        self.hits.snapshot()
    }
}

impl Classify for Engine {
    fn classify(&self, reply: &Reply, ctx: &Context<'_>) -> Outcome {
        self.current.load().classify(reply, ctx)
    }

    fn provider_of(&self, mx_host: Option<&str>, domain: Option<&str>) -> Option<String> {
        self.current.load().provider_of(mx_host, domain)
    }

    fn has_provider(&self, id: &str) -> bool {
        self.current.load().has_provider(id)
    }
}
