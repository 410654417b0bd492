//! The non-text match conditions of a rule: reply codes, enhanced status code patterns and
//! SMTP stages. Each parses from the table's notation and says why when it cannot.

use std::fmt;

use crate::{EnhancedCode, Stage};

/// Reply codes: exact (`421`) or a class (`4xx`); a rule may list several.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CodePattern {
    Exact(u16),
    Class(u8),
}

impl CodePattern {
    pub fn parse(s: &str) -> Result<CodePattern, String> {
        let s = s.trim().to_ascii_lowercase();
        let b = s.as_bytes();
        let bad = || format!("reply code {s:?} must be three digits (\"421\") or a class (\"4xx\") from 2xx to 5xx");
        if b.len() != 3 || !(b'2'..=b'5').contains(&b[0]) {
            return Err(bad());
        }
        if &s[1..] == "xx" {
            return Ok(CodePattern::Class(b[0] - b'0'));
        }
        if b.iter().all(u8::is_ascii_digit) {
            return Ok(CodePattern::Exact(s.parse().map_err(|_| bad())?));
        }
        Err(bad())
    }

    pub fn matches(&self, code: u16) -> bool {
        match self {
            CodePattern::Exact(c) => *c == code,
            CodePattern::Class(c) => code / 100 == *c as u16,
        }
    }

    /// Whether every code this matches, `other` matches too.
    pub fn within(&self, other: &CodePattern) -> bool {
        match (self, other) {
            (CodePattern::Exact(a), b) => b.matches(*a),
            (CodePattern::Class(a), CodePattern::Class(b)) => a == b,
            (CodePattern::Class(_), CodePattern::Exact(_)) => false,
        }
    }
}

impl fmt::Display for CodePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CodePattern::Exact(c) => write!(f, "{c}"),
            CodePattern::Class(c) => write!(f, "{c}xx"),
        }
    }
}

/// One part of an enhanced code pattern: any value, one value, or an inclusive range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Any,
    Range(u16, u16),
}

impl Part {
    fn parse(s: &str, max_digits: usize) -> Option<Part> {
        let num = |p: &str| (!p.is_empty() && p.len() <= max_digits && p.bytes().all(|b| b.is_ascii_digit())).then(|| p.parse().ok()).flatten();
        if s == "*" || s.eq_ignore_ascii_case("x") {
            return Some(Part::Any);
        }
        match s.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                (a <= b).then_some(Part::Range(a, b))
            }
            None => num(s).map(|n| Part::Range(n, n)),
        }
    }

    fn matches(self, v: u16) -> bool {
        match self {
            Part::Any => true,
            Part::Range(a, b) => (a..=b).contains(&v),
        }
    }

    fn within(self, other: Part) -> bool {
        match (self, other) {
            (_, Part::Any) => true,
            (Part::Any, Part::Range(..)) => false,
            (Part::Range(a, b), Part::Range(c, d)) => c <= a && b <= d,
        }
    }
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Part::Any => f.write_str("*"),
            Part::Range(a, b) if a == b => write!(f, "{a}"),
            Part::Range(a, b) => write!(f, "{a}-{b}"),
        }
    }
}

/// An RFC 3463 enhanced code pattern: `5.1.1`, `4.7.*`, `5.7.606-649`, `*.7.1`. Subject and
/// detail take 1–3 digits (vendor codes such as Microsoft's 5.7.606).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EnhancedPattern {
    class: Part,
    subject: Part,
    detail: Part,
}

impl EnhancedPattern {
    pub fn parse(s: &str) -> Result<EnhancedPattern, String> {
        let bad = || {
            format!(
                "enhanced code pattern {s:?} must be class.subject.detail, each a number, \"*\" or a range \"606-649\" \
                 (class 2, 4 or 5; subject and detail up to 3 digits), e.g. \"5.1.1\", \"4.7.*\", \"5.7.606-649\""
            )
        };
        let parts: Vec<&str> = s.trim().split('.').collect();
        let [c, sub, det] = parts[..] else { return Err(bad()) };
        let class = Part::parse(c, 1).ok_or_else(bad)?;
        if let Part::Range(a, b) = class {
            if !(2..=5).contains(&a) || !(2..=5).contains(&b) || a == 3 || b == 3 {
                return Err(bad());
            }
        }
        Ok(EnhancedPattern { class, subject: Part::parse(sub, 3).ok_or_else(bad)?, detail: Part::parse(det, 3).ok_or_else(bad)? })
    }

    pub fn matches(&self, e: EnhancedCode) -> bool {
        self.class.matches(e.class as u16) && self.subject.matches(e.subject) && self.detail.matches(e.detail)
    }

    /// Whether every code this matches, `other` matches too.
    pub fn within(&self, other: &EnhancedPattern) -> bool {
        self.class.within(other.class) && self.subject.within(other.subject) && self.detail.within(other.detail)
    }
}

impl fmt::Display for EnhancedPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

/// A set of SMTP stages as a bit mask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StageSet(u8);

impl StageSet {
    pub const ALL: [Stage; 7] =
        [Stage::Connect, Stage::Ehlo, Stage::StartTls, Stage::Mail, Stage::Rcpt, Stage::Data, Stage::EndOfData];

    pub fn empty() -> Self {
        StageSet(0)
    }

    fn bit(s: Stage) -> u8 {
        1 << StageSet::ALL.iter().position(|x| *x == s).expect("every stage is listed")
    }

    pub fn insert(&mut self, s: Stage) {
        self.0 |= Self::bit(s);
    }

    pub fn contains(self, s: Stage) -> bool {
        self.0 & Self::bit(s) != 0
    }

    pub fn within(self, other: StageSet) -> bool {
        self.0 & !other.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = Stage> {
        StageSet::ALL.into_iter().filter(move |s| self.contains(*s))
    }
}

impl fmt::Display for StageSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.iter().map(Stage::as_str).collect();
        f.write_str(&names.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_exact_and_class() {
        let p = CodePattern::parse("421").unwrap();
        assert!(p.matches(421) && !p.matches(450));
        let c = CodePattern::parse("4XX").unwrap();
        assert!(c.matches(421) && c.matches(499) && !c.matches(550));
        assert!(p.within(&c) && !c.within(&p));
        for bad in ["42", "4x1", "621", "abc", "1xx", "5xxx"] {
            assert!(CodePattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn enhanced_patterns_take_three_digit_details_wildcards_and_ranges() {
        let e = |s: &str| s.parse::<EnhancedCode>().unwrap();
        let p = EnhancedPattern::parse("5.7.606-649").unwrap();
        assert!(p.matches(e("5.7.606")) && p.matches(e("5.7.649")) && !p.matches(e("5.7.650")) && !p.matches(e("4.7.606")));
        let w = EnhancedPattern::parse("4.7.*").unwrap();
        assert!(w.matches(e("4.7.650")) && w.matches(e("4.7.0")) && !w.matches(e("4.4.7")));
        let exact = EnhancedPattern::parse("5.1.1").unwrap();
        assert!(exact.matches(e("5.1.1")) && !exact.matches(e("5.1.10")));
        let any_class = EnhancedPattern::parse("*.7.1").unwrap();
        assert!(any_class.matches(e("4.7.1")) && any_class.matches(e("5.7.1")));
        assert!(exact.within(&EnhancedPattern::parse("5.1.*").unwrap()));
        assert!(p.within(&EnhancedPattern::parse("5.7.600-699").unwrap()));
        assert!(!w.within(&exact));
        assert_eq!(p.to_string(), "5.7.606-649");
        for bad in ["5.1", "5.1.1.1", "3.1.1", "5.1000.1", "5.a.1", "5.9-1.0", ""] {
            assert!(EnhancedPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn stage_sets() {
        let mut s = StageSet::empty();
        s.insert(Stage::Rcpt);
        s.insert(Stage::Data);
        assert!(s.contains(Stage::Rcpt) && !s.contains(Stage::Mail));
        let mut all = StageSet::empty();
        StageSet::ALL.iter().for_each(|x| all.insert(*x));
        assert!(s.within(all) && !all.within(s));
        assert_eq!(s.to_string(), "rcpt, data");
    }
}
