//! Why a table was rejected: every problem with its `file:line`.

use std::fmt;

use crate::source::{Location, ReadError};

/// One problem in a table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub location: Location,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

/// A table that cannot be used. Nothing was changed: the table in use keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("{}", list(.0))]
    Invalid(Vec<Diagnostic>),
}

fn list(d: &[Diagnostic]) -> String {
    let mut out = format!("the rules table has {} problem{}:", d.len(), if d.len() == 1 { "" } else { "s" });
    for x in d {
        out.push_str("\n  ");
        out.push_str(&x.to_string());
    }
    out
}

impl TableError {
    /// The problems, for tools that show them one per line.
    pub fn diagnostics(&self) -> Vec<String> {
        match self {
            TableError::Read(e) => vec![e.to_string()],
            TableError::Invalid(d) => d.iter().map(ToString::to_string).collect(),
        }
    }
}
