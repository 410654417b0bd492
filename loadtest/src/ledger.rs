//! Ledgers: text files with one message id per line. The generator writes the ids the server
//! acknowledged (250 after DATA, 202 for every personalization of a request); the sinks write
//! the ids they accepted. Comparing the two shows lost and duplicated mail.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

use crate::stamp::normalize_id;

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("cannot create the ledger {path}: {source} (check that the directory exists and is writable)")]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot write the ledger {path}: {source} (is the disk full?)")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot read the ledger {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
}

/// An append-only ledger file, shared by the tasks that acknowledge or receive mail.
pub struct Ledger {
    path: PathBuf,
    out: Mutex<BufWriter<File>>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger").field("path", &self.path).finish()
    }
}

impl Ledger {
    /// Creates (or truncates) the file at `path`.
    pub fn create(path: impl AsRef<Path>) -> Result<Ledger, LedgerError> {
        let path = path.as_ref().to_path_buf();
        let file = File::create(&path).map_err(|source| LedgerError::Create { path: path.clone(), source })?;
        Ok(Ledger { path, out: Mutex::new(BufWriter::with_capacity(256 * 1024, file)) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends ids (normalized: no angle brackets). Buffered; see [`flush`](Self::flush).
    pub fn record<'a>(&self, ids: impl IntoIterator<Item = &'a str>) -> Result<(), LedgerError> {
        let mut out = self.out.lock().expect("ledger lock");
        for id in ids {
            writeln!(out, "{}", normalize_id(id)).map_err(|source| self.write_error(source))?;
        }
        Ok(())
    }

    /// Writes what is buffered to the file.
    pub fn flush(&self) -> Result<(), LedgerError> {
        self.out.lock().expect("ledger lock").flush().map_err(|source| self.write_error(source))
    }

    fn write_error(&self, source: io::Error) -> LedgerError {
        LedgerError::Write { path: self.path.clone(), source }
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::error!(error = %e, "ledger not fully written");
        }
    }
}

/// Reads a ledger: one id per line, empty lines skipped, ids normalized.
pub fn read(path: impl AsRef<Path>) -> Result<Vec<String>, LedgerError> {
    let path = path.as_ref();
    let err = |source| LedgerError::Read { path: path.to_path_buf(), source };
    let file = File::open(path).map_err(err)?;
    let mut ids = Vec::new();
    for line in BufReader::new(file).lines() {
        let line = line.map_err(err)?;
        let id = normalize_id(&line);
        if !id.is_empty() {
            ids.push(id.to_string());
        }
    }
    Ok(ids)
}

/// What a sent ledger and a received ledger say together.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Comparison {
    /// Lines in the sent ledger.
    pub sent: u64,
    /// Lines in the received ledger.
    pub received: u64,
    /// Sent ids received at least once.
    pub delivered: u64,
    /// Sent but never received, in sent order.
    pub missing: Vec<String>,
    /// Received more than once: the id and how often, in order of first receipt.
    pub duplicates: Vec<(String, u64)>,
    /// Received but never sent (another run's mail, or a corrupted id), in order of receipt.
    pub unexpected: Vec<String>,
    /// Ids the sent ledger lists more than once (the generator reused an id).
    pub sent_twice: Vec<String>,
}

impl Comparison {
    /// No mail lost, none delivered twice, nothing foreign.
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.duplicates.is_empty() && self.unexpected.is_empty() && self.sent_twice.is_empty()
    }

    /// A short human summary with up to `examples` ids of each problem.
    pub fn summary(&self, examples: usize) -> String {
        let mut out = format!(
            "sent {}, received {}, delivered {} ({:.3}%), missing {}, duplicates {}, unexpected {}",
            self.sent,
            self.received,
            self.delivered,
            if self.sent == 0 { 100.0 } else { self.delivered as f64 * 100.0 / self.sent as f64 },
            self.missing.len(),
            self.duplicates.len(),
            self.unexpected.len()
        );
        if !self.sent_twice.is_empty() {
            out.push_str(&format!(", ids sent twice {}", self.sent_twice.len()));
        }
        let mut list = |title: &str, items: Vec<String>| {
            if !items.is_empty() {
                out.push_str(&format!("\n{title}:"));
                for i in items.iter().take(examples) {
                    out.push_str(&format!("\n  {i}"));
                }
                if items.len() > examples {
                    out.push_str(&format!("\n  ... and {} more", items.len() - examples));
                }
            }
        };
        list("missing", self.missing.clone());
        list("duplicates", self.duplicates.iter().map(|(id, n)| format!("{id} ({n} times)")).collect());
        list("unexpected", self.unexpected.clone());
        list("sent twice", self.sent_twice.clone());
        out
    }
}

/// Compares what was sent with what was received.
pub fn compare<S: AsRef<str>, R: AsRef<str>>(sent: &[S], received: &[R]) -> Comparison {
    let mut sent_count: HashMap<&str, u64> = HashMap::with_capacity(sent.len());
    let mut sent_twice = Vec::new();
    for id in sent {
        let n = sent_count.entry(id.as_ref()).or_insert(0);
        *n += 1;
        if *n == 2 {
            sent_twice.push(id.as_ref().to_string());
        }
    }
    let mut received_count: HashMap<&str, u64> = HashMap::with_capacity(received.len());
    let mut first_seen = Vec::new();
    let mut unexpected = Vec::new();
    for id in received {
        let id = id.as_ref();
        let n = received_count.entry(id).or_insert(0);
        *n += 1;
        if *n == 1 {
            first_seen.push(id);
            if !sent_count.contains_key(id) {
                unexpected.push(id.to_string());
            }
        }
    }
    let mut missing = Vec::new();
    let mut delivered = 0;
    let mut listed = std::collections::HashSet::new();
    for id in sent {
        let id = id.as_ref();
        if !listed.insert(id) {
            continue;
        }
        if received_count.contains_key(id) {
            delivered += 1;
        } else {
            missing.push(id.to_string());
        }
    }
    let duplicates = first_seen
        .into_iter()
        .filter_map(|id| {
            let n = received_count[id];
            (n > 1).then(|| (id.to_string(), n))
        })
        .collect();
    Comparison {
        sent: sent.len() as u64,
        received: received.len() as u64,
        delivered,
        missing,
        duplicates,
        unexpected,
        sent_twice,
    }
}

/// Reads both files and compares them.
pub fn compare_files(sent: impl AsRef<Path>, received: impl AsRef<Path>) -> Result<Comparison, LedgerError> {
    Ok(compare(&read(sent)?, &read(received)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_missing_duplicates_and_unexpected() {
        let sent = ["a", "b", "c", "d"];
        let received = ["b", "a", "b", "x", "b", "d", "d"];
        let c = compare(&sent, &received);
        assert_eq!((c.sent, c.received, c.delivered), (4, 7, 3));
        assert_eq!(c.missing, ["c"]);
        assert_eq!(c.duplicates, [("b".to_string(), 3), ("d".to_string(), 2)]);
        assert_eq!(c.unexpected, ["x"]);
        assert!(c.sent_twice.is_empty());
        assert!(!c.is_clean());
    }

    #[test]
    fn identical_ledgers_in_any_order_are_clean() {
        let c = compare(&["1", "2", "3"], &["3", "1", "2"]);
        assert!(c.is_clean(), "{c:?}");
        assert_eq!(c.delivered, 3);
        assert!(c.summary(5).contains("delivered 3 (100.000%)"));
    }

    #[test]
    fn ids_sent_twice_are_reported_once() {
        let c = compare(&["a", "a", "a"], &["a"]);
        assert_eq!(c.sent_twice, ["a"]);
        assert_eq!(c.delivered, 1);
        assert!(c.missing.is_empty());
    }

    #[test]
    fn files_round_trip_with_normalized_ids() {
        let dir = tempfile::tempdir().unwrap();
        let sent = dir.path().join("sent");
        let ledger = Ledger::create(&sent).unwrap();
        ledger.record(["<a@x>", "b@x"]).unwrap();
        drop(ledger);
        std::fs::write(dir.path().join("recv"), "a@x\n\n <b@x> \n").unwrap();
        assert_eq!(read(&sent).unwrap(), ["a@x", "b@x"]);
        assert!(compare_files(&sent, dir.path().join("recv")).unwrap().is_clean());
        let err = read(dir.path().join("nope")).unwrap_err().to_string();
        assert!(err.contains("cannot read the ledger"), "{err}");
    }

    #[test]
    fn summary_lists_examples_and_counts_the_rest() {
        let sent: Vec<String> = (0..10).map(|i| i.to_string()).collect();
        let c = compare(&sent, &["0"]);
        let s = c.summary(2);
        assert!(s.contains("missing 9"), "{s}");
        assert!(s.contains("... and 7 more"), "{s}");
    }
}
