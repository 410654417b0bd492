//! Where a rules table comes from: files in order, a directory (its `*.toml` files in name
//! order), or `@default`, the table shipped inside the binary (`rules/default/`).

use std::fmt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The name that stands for the shipped default table in configs and on the command line.
pub const DEFAULT_TABLE: &str = "@default";

/// The shipped default table, in order (file name, contents).
const DEFAULT_FILES: &[(&str, &str)] = &[
    ("00-providers.toml", include_str!("../default/00-providers.toml")),
    ("05-synthetic.toml", include_str!("../default/05-synthetic.toml")),
    ("10-google.toml", include_str!("../default/10-google.toml")),
    ("11-yahoo.toml", include_str!("../default/11-yahoo.toml")),
    ("12-microsoft.toml", include_str!("../default/12-microsoft.toml")),
    ("13-apple.toml", include_str!("../default/13-apple.toml")),
    ("14-us-isps.toml", include_str!("../default/14-us-isps.toml")),
    ("15-europe.toml", include_str!("../default/15-europe.toml")),
    ("16-russia.toml", include_str!("../default/16-russia.toml")),
    ("17-china.toml", include_str!("../default/17-china.toml")),
    ("20-gateways.toml", include_str!("../default/20-gateways.toml")),
    ("30-blocklists.toml", include_str!("../default/30-blocklists.toml")),
    ("90-generic.toml", include_str!("../default/90-generic.toml")),
];

/// One file of a table: its name (for `file:line` in errors) and its text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub name: String,
    pub text: String,
}

impl Source {
    pub fn new(name: impl Into<String>, text: impl Into<String>) -> Self {
        Source { name: name.into(), text: text.into() }
    }
}

/// The shipped default table.
pub fn default_sources() -> Vec<Source> {
    DEFAULT_FILES.iter().map(|(name, text)| Source::new(format!("{DEFAULT_TABLE}/{name}"), *text)).collect()
}

/// A file or directory that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read rules file {path}: {source} (check the path in rules.files or on the command line)")]
pub struct ReadError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Reads the table named by `paths`, in order: `@default`, files, and directories (their
/// `*.toml` files sorted by name).
pub fn read_sources<P: AsRef<Path>>(paths: &[P]) -> Result<Vec<Source>, ReadError> {
    let mut out = Vec::new();
    for p in paths {
        let p = p.as_ref();
        if p.as_os_str() == DEFAULT_TABLE {
            out.extend(default_sources());
            continue;
        }
        let err = |source| ReadError { path: p.to_path_buf(), source };
        if p.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(err)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "toml") && f.is_file())
                .collect();
            files.sort();
            for f in files {
                let text = std::fs::read_to_string(&f).map_err(|source| ReadError { path: f.clone(), source })?;
                out.push(Source::new(f.display().to_string(), text));
            }
        } else {
            out.push(Source::new(p.display().to_string(), std::fs::read_to_string(p).map_err(err)?));
        }
    }
    Ok(out)
}

/// The table's version: the first 12 hex digits of a SHA-256 over the contents, in order.
/// Names do not count, so the same table deployed elsewhere keeps its version.
pub fn version_of(sources: &[Source]) -> String {
    let mut h = Sha256::new();
    for s in sources {
        // Length-prefixed, so moving text from one file to the next changes the hash.
        h.update((s.text.len() as u64).to_be_bytes());
        h.update(s.text.as_bytes());
    }
    hex::encode(&h.finalize()[..6])
}

/// A place in a table file, `file:line`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub file: String,
    pub line: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file, self.line)
    }
}

/// 1-based line of a byte offset.
pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())].iter().filter(|&&b| b == b'\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_depends_on_contents_and_order_only() {
        let a = [Source::new("a", "x = 1"), Source::new("b", "y = 2")];
        let renamed = [Source::new("c", "x = 1"), Source::new("d", "y = 2")];
        let swapped = [Source::new("b", "y = 2"), Source::new("a", "x = 1")];
        let moved = [Source::new("a", "x = 1y = 2"), Source::new("b", "")];
        assert_eq!(version_of(&a), version_of(&renamed));
        assert_ne!(version_of(&a), version_of(&swapped));
        assert_ne!(version_of(&a), version_of(&moved));
        assert_eq!(version_of(&a).len(), 12);
    }

    #[test]
    fn directories_are_read_in_name_order_and_default_is_embedded() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("20-b.toml"), "b").unwrap();
        std::fs::write(dir.path().join("10-a.toml"), "a").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let got = read_sources(&[dir.path().to_path_buf()]).unwrap();
        assert_eq!(got.iter().map(|s| s.text.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        let d = read_sources(&[DEFAULT_TABLE]).unwrap();
        assert_eq!(d, default_sources());
        assert!(d[0].name.starts_with("@default/"));
        let e = read_sources(&[dir.path().join("missing.toml")]).unwrap_err();
        assert!(e.to_string().contains("missing.toml"), "{e}");
    }

    #[test]
    fn lines_are_one_based() {
        assert_eq!(line_of("a\nb\nc", 0), 1);
        assert_eq!(line_of("a\nb\nc", 2), 2);
        assert_eq!(line_of("a\nb\nc", 99), 3);
    }
}
