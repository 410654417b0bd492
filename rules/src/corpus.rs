//! Corpora of real replies with the classification they should get: the table's accuracy
//! (`sluice rules eval`) and what a change would change (`sluice rules diff`).
//!
//! A corpus is a tab-separated file, one reply per line, `#` starts a comment line:
//!
//! ```text
//! # class            disposition  stage  mx                          domain     reply
//! Invalid Address    bounce       rcpt   gmail-smtp-in.l.google.com  gmail.com  550-5.1.1 The email account...\n550 5.1.1 ...
//! ```
//!
//! `-` (or nothing) means "not given". The reply's lines are separated by a literal `\n`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::{BounceClass, Context, Disposition, Outcome, Reply, Stage, Table};

/// One reply of a corpus.
#[derive(Clone, Debug)]
pub struct Entry {
    /// 1-based line in the corpus file.
    pub line: usize,
    pub expected: Option<BounceClass>,
    pub expected_disposition: Option<Disposition>,
    pub stage: Option<Stage>,
    pub mx: Option<String>,
    pub domain: Option<String>,
    pub reply: Reply,
}

impl Entry {
    pub fn context(&self) -> Context<'_> {
        Context { stage: self.stage, mx_host: self.mx.as_deref(), domain: self.domain.as_deref() }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("corpus line {line}: {reason}")]
pub struct CorpusError {
    pub line: usize,
    pub reason: String,
}

/// Parses a corpus file's text.
pub fn parse(text: &str) -> Result<Vec<Entry>, CorpusError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let err = |reason: String| CorpusError { line, reason };
        if raw.trim().is_empty() || raw.trim_start().starts_with('#') {
            continue;
        }
        let cols: Vec<&str> = raw.splitn(6, '\t').collect();
        if cols.len() != 6 {
            return Err(err(format!(
                "expected 6 tab-separated columns (class, disposition, stage, mx, domain, reply), found {}",
                cols.len()
            )));
        }
        let given = |s: &str| {
            let s = s.trim();
            (!s.is_empty() && s != "-").then(|| s.to_string())
        };
        let expected = match given(cols[0]) {
            None => None,
            Some(c) => Some(BounceClass::parse(&c).ok_or_else(|| err(format!("unknown classification {c:?}")))?),
        };
        let expected_disposition = match given(cols[1]) {
            None => None,
            Some(d) => Some(Disposition::parse(&d).ok_or_else(|| err(format!("unknown disposition {d:?}")))?),
        };
        let stage = given(cols[2]).map(|s| s.parse::<Stage>()).transpose().map_err(err)?;
        let reply = Reply::parse(&cols[5].replace("\\n", "\n")).map_err(|e| err(format!("not an SMTP reply: {e}")))?;
        out.push(Entry { line, expected, expected_disposition, stage, mx: given(cols[3]), domain: given(cols[4]), reply });
    }
    Ok(out)
}

/// One reply the table got wrong.
#[derive(Clone, Debug)]
pub struct Miss {
    pub line: usize,
    pub reply: String,
    pub expected: String,
    pub got: String,
    pub rule_id: String,
}

/// How well a table classifies a corpus.
#[derive(Clone, Debug, Default)]
pub struct Evaluation {
    /// Entries with an expected classification.
    pub total: usize,
    pub correct: usize,
    /// Entries with an expected disposition, and how many got it.
    pub dispositions: usize,
    pub dispositions_correct: usize,
    /// (expected, predicted) → count.
    pub confusion: BTreeMap<(String, String), usize>,
    pub misses: Vec<Miss>,
    /// Entries decided by the fallback layers rather than a table rule.
    pub fallback: usize,
}

impl Evaluation {
    pub fn accuracy(&self) -> f64 {
        if self.total == 0 {
            1.0
        } else {
            self.correct as f64 / self.total as f64
        }
    }

    /// The confusion matrix as text: rows are expected, columns predicted.
    pub fn matrix(&self) -> String {
        let short = |c: BounceClass| match c {
            BounceClass::InvalidAddress => "Inv",
            BounceClass::MailboxUnavailable => "Mbx",
            BounceClass::Technical => "Tec",
            BounceClass::Content => "Con",
            BounceClass::Reputation => "Rep",
            BounceClass::FrequencyOrVolume => "Frq",
            BounceClass::Unclassified => "Unc",
        };
        let mut out = format!("{:<30}", "expected \\ predicted");
        for c in BounceClass::ALL {
            write!(out, "{:>6}", short(c)).expect("string");
        }
        out.push('\n');
        for e in BounceClass::ALL {
            write!(out, "{:<30}", e.as_str()).expect("string");
            for p in BounceClass::ALL {
                let n = self.confusion.get(&(e.as_str().to_string(), p.as_str().to_string())).copied().unwrap_or(0);
                write!(out, "{:>6}", if n == 0 { ".".to_string() } else { n.to_string() }).expect("string");
            }
            out.push('\n');
        }
        out
    }
}

/// Classifies every entry with `table` (without counting hits) and scores it.
pub fn evaluate(table: &Table, entries: &[Entry]) -> Evaluation {
    let mut ev = Evaluation::default();
    for e in entries {
        let (winner, o) = table.decide(&e.reply, &e.context());
        if winner.is_none() {
            ev.fallback += 1;
        }
        let mut wrong = Vec::new();
        if let Some(want) = e.expected {
            ev.total += 1;
            *ev.confusion.entry((want.as_str().to_string(), o.classification.as_str().to_string())).or_default() += 1;
            if want == o.classification {
                ev.correct += 1;
            } else {
                wrong.push((want.as_str().to_string(), o.classification.as_str().to_string()));
            }
        }
        if let Some(want) = e.expected_disposition {
            ev.dispositions += 1;
            if want == o.disposition {
                ev.dispositions_correct += 1;
            } else {
                wrong.push((want.as_str().to_string(), o.disposition.as_str().to_string()));
            }
        }
        if !wrong.is_empty() {
            let (expected, got): (Vec<String>, Vec<String>) = wrong.into_iter().unzip();
            ev.misses.push(Miss { line: e.line, reply: e.reply.to_string(), expected: expected.join(", "), got: got.join(", "), rule_id: o.rule_id });
        }
    }
    ev
}

/// A reply two tables decide differently.
#[derive(Clone, Debug)]
pub struct Change {
    pub line: usize,
    pub reply: String,
    pub old: Outcome,
    pub new: Outcome,
}

/// What differs in a decision, in words (empty when nothing does).
pub fn differences(old: &Outcome, new: &Outcome) -> Vec<String> {
    let mut d = Vec::new();
    if old.rule_id != new.rule_id {
        d.push(format!("rule {} → {}", old.rule_id, new.rule_id));
    }
    if old.classification != new.classification {
        d.push(format!("classification {} → {}", old.classification, new.classification));
    }
    if old.reason != new.reason {
        d.push(format!("reason {} → {}", old.reason, new.reason));
    }
    if old.disposition != new.disposition {
        d.push(format!("disposition {} → {}", old.disposition, new.disposition));
    }
    if old.disposition == Disposition::Bounce && new.disposition == Disposition::Bounce && old.bounce_type != new.bounce_type {
        d.push(format!("type {} → {}", old.bounce_type, new.bounce_type));
    }
    if old.suppress != new.suppress {
        d.push(format!("suppress {} → {}", old.suppress, new.suppress));
    }
    if old.shaping != new.shaping {
        d.push(format!("shaping {} → {}", old.shaping, new.shaping));
    }
    d
}

/// Every entry `old` and `new` decide differently.
pub fn diff(old: &Table, new: &Table, entries: &[Entry]) -> Vec<Change> {
    entries
        .iter()
        .filter_map(|e| {
            let (_, o) = old.decide(&e.reply, &e.context());
            let (_, n) = new.decide(&e.reply, &e.context());
            (!differences(&o, &n).is_empty()).then(|| Change { line: e.line, reply: e.reply.to_string(), old: o, new: n })
        })
        .collect()
}
