//! Reload the engine when one of its files changes.
//!
//! Editors save in several steps (truncate and write, or write a temporary file and rename
//! it over the old one), so this watches the directories that hold the files, not the files
//! themselves (a rename would orphan a watch on the old inode), and waits until the events
//! stop for a moment before reloading once.

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};

use crate::engine::{Engine, Reloaded};
use crate::error::TableError;
use crate::source::DEFAULT_TABLE;

/// How long the files must stay quiet before a reload.
const SETTLE: Duration = Duration::from_millis(300);

/// Keeps watching while it lives; dropping it stops the watch.
pub struct FileWatch {
    _watcher: notify::RecommendedWatcher,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot watch the rules files for changes: {0} (reload with SIGHUP or POST /admin/rules/reload instead)")]
pub struct WatchError(#[from] notify::Error);

/// Watches the engine's files and calls `on_reload` with the result of every reload they
/// trigger. `@default` (compiled into the binary) is not watched.
pub fn watch_files(
    engine: Arc<Engine>,
    on_reload: impl Fn(Result<Reloaded, TableError>) + Send + 'static,
) -> Result<FileWatch, WatchError> {
    let targets: Vec<PathBuf> = engine
        .files()
        .iter()
        .filter(|p| p.as_os_str() != DEFAULT_TABLE)
        .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()))
        .collect();
    let (tx, rx) = mpsc::channel::<()>();
    let watched = targets.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        if event.kind.is_access() {
            return;
        }
        // A file of the table, or any file inside a table directory.
        let relevant = event.paths.iter().any(|changed| watched.iter().any(|t| changed == t || changed.parent() == Some(t.as_path())));
        if relevant {
            let _ = tx.send(());
        }
    })?;
    for t in &targets {
        let dir = if t.is_dir() { t.clone() } else { t.parent().map(PathBuf::from).unwrap_or_else(|| PathBuf::from(".")) };
        watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    }
    std::thread::Builder::new()
        .name("sluice-rules-watch".into())
        .spawn(move || {
            // Ends when the watcher (and with it the sender) is dropped.
            while rx.recv().is_ok() {
                while rx.recv_timeout(SETTLE).is_ok() {}
                on_reload(engine.reload());
            }
        })
        .map_err(|e| WatchError(notify::Error::io(e)))?;
    Ok(FileWatch { _watcher: watcher })
}
