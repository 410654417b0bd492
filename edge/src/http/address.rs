//! Syntax checks for the strings that end up in the SMTP envelope and in headers.
//!
//! Written by hand on purpose: general RFC 5322 parsers accept quoted local parts,
//! comments and address literals, which an SMTP envelope cannot carry as is and SendGrid
//! rejects anyway. sluice accepts the plain `dot-atom@host.domain` form every mail
//! provider uses (ASCII, as SendGrid requires).

/// Whether `addr` is a plain `local@domain.tld` address.
pub fn is_valid_email(addr: &str) -> bool {
    if addr.len() > 254 {
        return false;
    }
    let Some((local, domain)) = addr.rsplit_once('@') else { return false };
    is_dot_atom(local) && local.len() <= 64 && is_hostname(domain)
}

/// RFC 5322 dot-atom: atext runs separated by single dots.
fn is_dot_atom(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|atom| {
            !atom.is_empty()
                && atom.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b))
        })
}

/// A DNS host name with at least two labels (`example.com`), letters, digits and hyphens.
fn is_hostname(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    let labels: Vec<&str> = s.split('.').collect();
    s.len() <= 253
        && labels.len() >= 2
        && labels.iter().all(|l| {
            (1..=63).contains(&l.len())
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// CR or LF would let a value end its header line and start another (header injection).
pub fn has_line_break(s: &str) -> bool {
    s.bytes().any(|b| b == b'\r' || b == b'\n')
}

/// RFC 5322 field name: printable ASCII except the colon.
pub fn is_header_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| (33..=126).contains(&b) && b != b':')
}

/// RFC 2045 token (the parts of `type/subtype` and parameter names).
pub fn is_mime_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| (33..=126).contains(&b) && !b"()<>@,;:\\\"/[]?=".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_addresses() {
        for a in ["a@example.com", "first.last+tag@mail.example.co.uk", "x_y-z@a-b.io", "o'brien@example.org"] {
            assert!(is_valid_email(a), "{a}");
        }
    }

    #[test]
    fn rejects_what_an_envelope_cannot_carry() {
        for a in [
            "",
            "plain",
            "@example.com",
            "a@",
            "a@localhost",
            "a b@example.com",
            "a@exa mple.com",
            "<a@example.com>",
            "A <a@example.com>",
            "a..b@example.com",
            ".a@example.com",
            "a@-example.com",
            "a@example..com",
            "\"q\"@example.com",
            "a@example.com\r\nRCPT TO:<x@y.z>",
            "ü@example.com",
            "a@exämple.com",
            "a,b@example.com",
        ] {
            assert!(!is_valid_email(a), "{a:?}");
        }
        assert!(!is_valid_email(&format!("{}@example.com", "a".repeat(65))));
    }

    #[test]
    fn header_names_and_tokens() {
        assert!(is_header_name("X-Campaign"));
        assert!(!is_header_name("X Campaign"));
        assert!(!is_header_name("X:Y"));
        assert!(!is_header_name(""));
        assert!(is_mime_token("vnd.ms-excel"));
        assert!(!is_mime_token("text/plain"));
        assert!(has_line_break("a\nb") && has_line_break("a\rb") && !has_line_break("a b"));
    }
}
