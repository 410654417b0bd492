//! SMTP replies exactly as the remote server wrote them.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

/// An RFC 3463 enhanced status code. Subject and detail keep up to three digits, so vendor
/// codes such as Microsoft's `5.7.606` survive (smtp-proto stores them in a `u8`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EnhancedCode {
    pub class: u8,
    pub subject: u16,
    pub detail: u16,
}

impl EnhancedCode {
    pub fn new(class: u8, subject: u16, detail: u16) -> Self {
        EnhancedCode { class, subject, detail }
    }

    /// Parses `d.ddd.ddd` at the start of `s`, followed by whitespace or nothing; returns the
    /// code and the rest of `s`. Byte by byte: the normalizer calls it on every reply line.
    pub fn parse_prefix(s: &str) -> Option<(EnhancedCode, &str)> {
        let b = s.as_bytes();
        let class = match b.first()? {
            c @ (b'2' | b'4' | b'5') => c - b'0',
            _ => return None,
        };
        if b.get(1) != Some(&b'.') {
            return None;
        }
        let (subject, n) = digits(&b[2..])?;
        let dot = 2 + n;
        if b.get(dot) != Some(&b'.') {
            return None;
        }
        let (detail, n) = digits(&b[dot + 1..])?;
        let rest = &s[dot + 1 + n..];
        if !rest.chars().next().is_none_or(char::is_whitespace) {
            return None;
        }
        Some((EnhancedCode { class, subject, detail }, rest.trim_start()))
    }
}

/// The number of 1–3 ASCII digits at the start of `b`, and how many there are; `None` for
/// none or more than three.
fn digits(b: &[u8]) -> Option<(u16, usize)> {
    let n = b.iter().take(4).take_while(|c| c.is_ascii_digit()).count();
    if n == 0 || n > 3 {
        return None;
    }
    Some((b[..n].iter().fold(0u16, |v, d| v * 10 + u16::from(d - b'0')), n))
}

impl FromStr for EnhancedCode {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let mut parts = s.split('.');
        let (Some(c), Some(sub), Some(det), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(());
        };
        let digits = |p: &str, max: usize| !p.is_empty() && p.len() <= max && p.bytes().all(|b| b.is_ascii_digit());
        if c.len() != 1 || !matches!(c, "2" | "4" | "5") || !digits(sub, 3) || !digits(det, 3) {
            return Err(());
        }
        Ok(EnhancedCode { class: c.parse().map_err(|_| ())?, subject: sub.parse().map_err(|_| ())?, detail: det.parse().map_err(|_| ())? })
    }
}

impl fmt::Display for EnhancedCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

/// The SMTP stage a reply answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Connect,
    Ehlo,
    StartTls,
    Mail,
    Rcpt,
    Data,
    EndOfData,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Connect => "connect",
            Stage::Ehlo => "ehlo",
            Stage::StartTls => "starttls",
            Stage::Mail => "mail",
            Stage::Rcpt => "rcpt",
            Stage::Data => "data",
            Stage::EndOfData => "end_of_data",
        }
    }
}

impl FromStr for Stage {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.to_ascii_lowercase().replace('-', "_").as_str() {
            "connect" | "banner" => Stage::Connect,
            "ehlo" | "helo" => Stage::Ehlo,
            "starttls" | "tls" => Stage::StartTls,
            "mail" | "mail_from" => Stage::Mail,
            "rcpt" | "rcpt_to" => Stage::Rcpt,
            "data" => Stage::Data,
            "end_of_data" | "eod" | "dot" => Stage::EndOfData,
            other => return Err(format!("unknown SMTP stage {other:?}; expected connect, ehlo, starttls, mail, rcpt, data or end_of_data")),
        })
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ReplyError {
    #[error("empty reply")]
    Empty,
    #[error("reply line {0:?} does not start with a three-digit code")]
    NoCode(String),
    #[error("reply lines carry different codes ({0} and {1})")]
    MixedCodes(u16, u16),
}

/// One complete SMTP reply: the code, the enhanced code as written on the first line, and
/// every line as received (without CRLF). Nothing is lost, so rules can match on anything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub enhanced: Option<EnhancedCode>,
    pub lines: Vec<String>,
    /// True for replies sluice made up for a failure that had no reply (timeout, refused...).
    pub synthetic: bool,
}

fn split_code(line: &str) -> Option<(u16, &str)> {
    let b = line.as_bytes();
    if b.len() < 3 || !b[..3].iter().all(u8::is_ascii_digit) || !(b'2'..=b'5').contains(&b[0]) {
        return None;
    }
    if b.len() > 3 && b[3] != b' ' && b[3] != b'-' {
        return None;
    }
    let code = line[..3].parse().ok()?;
    Some((code, line.get(4..).unwrap_or("")))
}

/// One line without its code, separator and enhanced code, trimmed.
fn line_text(line: &str) -> &str {
    let rest = split_code(line).map(|(_, r)| r).unwrap_or(line);
    let rest = match EnhancedCode::parse_prefix(rest) {
        Some((_, tail)) => tail,
        None => rest,
    };
    rest.trim()
}

impl Reply {
    /// Builds a reply from raw lines (`250-first`, ..., `250 last`).
    pub fn from_lines<S: Into<String>>(lines: impl IntoIterator<Item = S>) -> Result<Reply, ReplyError> {
        let lines: Vec<String> = lines.into_iter().map(|l| l.into().trim_end_matches(['\r', '\n']).to_string()).collect();
        let first = lines.first().ok_or(ReplyError::Empty)?;
        let (code, rest) = split_code(first).ok_or_else(|| ReplyError::NoCode(first.clone()))?;
        for l in &lines[1..] {
            let (c, _) = split_code(l).ok_or_else(|| ReplyError::NoCode(l.clone()))?;
            if c != code {
                return Err(ReplyError::MixedCodes(code, c));
            }
        }
        let enhanced = EnhancedCode::parse_prefix(rest).map(|(e, _)| e).filter(|e| e.class as u16 == code / 100);
        Ok(Reply { code, enhanced, lines, synthetic: false })
    }

    /// Parses a single-line reply such as `550 5.1.1 user unknown`.
    pub fn parse(line: &str) -> Result<Reply, ReplyError> {
        Reply::from_lines(line.split('\n').filter(|l| !l.trim().is_empty()))
    }

    /// A reply for a failure where the remote side said nothing (timeout, refused, TLS or
    /// DNS failure), so it can go through the same rules as real replies.
    pub fn synthetic(code: u16, enhanced: EnhancedCode, text: &str) -> Reply {
        Reply { code, enhanced: Some(enhanced), lines: vec![format!("{code} {enhanced} {text}")], synthetic: true }
    }

    /// The reply class digit (2, 3, 4 or 5).
    pub fn class(&self) -> u8 {
        (self.code / 100) as u8
    }

    /// The text with codes removed and lines joined by single spaces: `550-5.1.1 The email
    /// account...\r\n550-5.1.1 try again...` becomes `The email account... try again...`.
    /// This is what rules' text patterns are matched against.
    pub fn text(&self) -> String {
        self.normalized_text().into_owned()
    }

    /// [`Reply::text`] without allocating for the common one-line reply.
    pub fn normalized_text(&self) -> Cow<'_, str> {
        let mut parts = self.lines.iter().map(|l| line_text(l)).filter(|t| !t.is_empty());
        let Some(first) = parts.next() else { return Cow::Borrowed("") };
        let Some(second) = parts.next() else { return Cow::Borrowed(first) };
        let mut out = String::with_capacity(self.lines.iter().map(String::len).sum());
        out.push_str(first);
        for t in std::iter::once(second).chain(parts) {
            out.push(' ');
            out.push_str(t);
        }
        Cow::Owned(out)
    }
}

impl fmt::Display for Reply {
    /// One line: `550 5.1.1 text of all lines`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code)?;
        if let Some(e) = self.enhanced {
            write!(f, " {e}")?;
        }
        let t = self.text();
        if !t.is_empty() {
            write!(f, " {t}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_three_digit_enhanced_codes() {
        let r = Reply::parse("550 5.7.606 Access denied, banned sending IP [1.2.3.4]").unwrap();
        assert_eq!(r.enhanced, Some(EnhancedCode::new(5, 7, 606)));
        assert_eq!(r.text(), "Access denied, banned sending IP [1.2.3.4]");
    }

    #[test]
    fn multi_line_replies_are_joined_without_prefixes() {
        let r = Reply::from_lines([
            "550-5.1.1 The email account that you tried to reach does not exist. Please try",
            "550-5.1.1 double-checking the recipient's email address for typos or",
            "550 5.1.1 https://support.google.com/mail/?p=NoSuchUser a1si123 - gsmtp",
        ])
        .unwrap();
        assert_eq!(r.code, 550);
        assert_eq!(r.enhanced.unwrap().to_string(), "5.1.1");
        assert_eq!(
            r.text(),
            "The email account that you tried to reach does not exist. Please try double-checking the recipient's email address for typos or https://support.google.com/mail/?p=NoSuchUser a1si123 - gsmtp"
        );
        assert!(r.to_string().starts_with("550 5.1.1 The email account"));
    }

    #[test]
    fn rejects_garbage_and_mismatched_codes() {
        assert_eq!(Reply::parse(""), Err(ReplyError::Empty));
        assert!(matches!(Reply::parse("hello"), Err(ReplyError::NoCode(_))));
        assert!(matches!(Reply::from_lines(["250-a", "550 b"]), Err(ReplyError::MixedCodes(250, 550))));
    }

    #[test]
    fn enhanced_code_must_match_reply_class() {
        assert_eq!(Reply::parse("450 5.1.1 odd").unwrap().enhanced, None);
        assert_eq!(Reply::parse("250 ok 1.2.3").unwrap().enhanced, None);
    }
}
