//! Property tests of reply normalization: what rules' text patterns see.

use proptest::prelude::*;
use sluice_rules::{EnhancedCode, Reply};

/// Reply text without line breaks and not starting with something that looks like an
/// enhanced code; words of printable ASCII and some non-ASCII.
fn text() -> impl Strategy<Value = String> {
    prop::collection::vec("[A-Za-z][A-Za-z0-9.,:;'()<>@/=?&\\[\\]-]{0,12}|[äöüéñ中文]{1,3}", 1..12).prop_map(|w| w.join(" "))
}

fn code() -> impl Strategy<Value = u16> {
    prop_oneof![200u16..=299, 400u16..=499, 500u16..=599]
}

proptest! {
    /// Continuation lines `CODE-ENH text` joined: codes gone, one space between lines.
    #[test]
    fn multi_line_replies_join_without_prefixes(code in code(), sub in 0u16..1000, det in 0u16..1000, lines in prop::collection::vec(text(), 1..6)) {
        let class = code / 100;
        let enh = format!("{class}.{sub}.{det}");
        let raw: Vec<String> = lines.iter().enumerate().map(|(i, t)| {
            let sep = if i + 1 == lines.len() { ' ' } else { '-' };
            format!("{code}{sep}{enh} {t}")
        }).collect();
        let r = Reply::from_lines(raw).unwrap();
        prop_assert_eq!(r.code, code);
        prop_assert_eq!(r.enhanced.map(|e| e.to_string()), Some(enh));
        prop_assert_eq!(r.text(), lines.join(" "));
        prop_assert_eq!(r.normalized_text(), r.text());
    }

    /// Without enhanced codes, and with the code repeated only on some lines.
    #[test]
    fn replies_without_enhanced_codes(code in code(), lines in prop::collection::vec(text(), 1..6)) {
        let raw: Vec<String> = lines.iter().enumerate().map(|(i, t)| {
            let sep = if i + 1 == lines.len() { ' ' } else { '-' };
            format!("{code}{sep}{t}")
        }).collect();
        let r = Reply::from_lines(raw).unwrap();
        prop_assert_eq!(r.text(), lines.join(" "));
    }

    /// Normalizing is idempotent: a reply rebuilt from its one-line form has the same text,
    /// code and enhanced code.
    #[test]
    fn the_one_line_form_round_trips(code in code(), sub in 0u16..1000, det in 0u16..1000, lines in prop::collection::vec(text(), 1..6)) {
        let class = code / 100;
        let raw: Vec<String> = lines.iter().enumerate().map(|(i, t)| {
            let sep = if i + 1 == lines.len() { ' ' } else { '-' };
            format!("{code}{sep}{class}.{sub}.{det} {t}")
        }).collect();
        let r = Reply::from_lines(raw).unwrap();
        let again = Reply::parse(&r.to_string()).unwrap();
        prop_assert_eq!(again.text(), r.text());
        prop_assert_eq!(again.code, r.code);
        prop_assert_eq!(again.enhanced, r.enhanced);
    }

    /// Whatever the lines contain, the normalized text has no line breaks, no leading or
    /// trailing blanks, and never panics.
    #[test]
    fn text_is_one_trimmed_line(code in code(), lines in prop::collection::vec("[ -~\t]{0,40}", 1..5)) {
        let raw: Vec<String> = lines.iter().map(|t| format!("{code} {t}")).collect();
        let r = Reply::from_lines(raw).unwrap();
        let t = r.text();
        prop_assert!(!t.contains('\n') && !t.contains('\r'));
        prop_assert_eq!(t.trim(), t.as_str());
    }
}

proptest! {
    /// The byte-level parser of a line's enhanced code agrees with the definition: the first
    /// whitespace-separated token is a whole `class.subject.detail` code.
    #[test]
    fn enhanced_code_prefix_is_a_whole_first_token(s in "([245x]|[0-9]{1,4})(\\.[0-9]{0,4}){0,3}[ ,;\\u{a0}\\u{3000}a-z.]{0,3}[a-z ]{0,6}") {
        let end = s.find(char::is_whitespace).unwrap_or(s.len());
        let want = s[..end].parse::<EnhancedCode>().ok().map(|c| (c, s[end..].trim_start()));
        prop_assert_eq!(EnhancedCode::parse_prefix(&s), want);
    }
}
