//! Personalization substitutions (`"substitutions": {"-name-": "Ada"}`): every occurrence
//! of a key in the subject, the header values and the content is replaced by its value.

use std::borrow::Cow;
use std::collections::BTreeMap;

use aho_corasick::{AhoCorasick, MatchKind};

/// The substitutions of one personalization, compiled once and applied to every text.
pub struct Substitutions {
    /// `None` when there is nothing to replace.
    matcher: Option<(AhoCorasick, Vec<String>)>,
}

impl Substitutions {
    /// Compiles the table. Empty keys are skipped (the validator rejects them).
    ///
    /// One left-to-right pass with the longest key winning, so a value is never itself
    /// substituted again and `-name-` does not eat the start of `-name-full-`.
    pub fn new(table: Option<&BTreeMap<String, String>>) -> Self {
        let pairs: Vec<(&String, &String)> = table.into_iter().flatten().filter(|(k, _)| !k.is_empty()).collect();
        if pairs.is_empty() {
            return Substitutions { matcher: None };
        }
        let matcher = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(pairs.iter().map(|(k, _)| k.as_str()))
            .expect("a few thousand literal keys are within aho-corasick's limits");
        Substitutions { matcher: Some((matcher, pairs.iter().map(|(_, v)| (*v).clone()).collect())) }
    }

    pub fn apply<'a>(&self, text: &'a str) -> Cow<'a, str> {
        match &self.matcher {
            Some((ac, values)) if ac.is_match(text) => Cow::Owned(ac.replace_all(text, values)),
            _ => Cow::Borrowed(text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn replaces_every_occurrence_in_one_pass() {
        let t = table(&[("-name-", "Ada"), ("-name-full-", "Ada Lovelace"), ("-x-", "-name-")]);
        let s = Substitutions::new(Some(&t));
        assert_eq!(s.apply("Hi -name-, -name-full-! -x-"), "Hi Ada, Ada Lovelace! -name-");
        assert!(matches!(s.apply("nothing here"), Cow::Borrowed(_)));
    }

    #[test]
    fn no_table_changes_nothing() {
        let s = Substitutions::new(None);
        assert_eq!(s.apply("-name-"), "-name-");
        let empty = table(&[("", "x")]);
        assert_eq!(Substitutions::new(Some(&empty)).apply("abc"), "abc");
    }
}
