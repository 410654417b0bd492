//! Mailbox providers, defined in the rules data: which MX hosts and which recipient domains
//! belong to whom. Rules are scoped to a provider; traffic shaping keys its paths by the same
//! provider ids, so both read these definitions.

use std::collections::HashMap;

/// Keys are host name suffixes from our own table, not attacker-chosen: a fast hash is safe.
type Index = HashMap<String, usize, foldhash::fast::RandomState>;

/// One provider (`[[provider]]` in a table file).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Provider {
    /// Stable id used by rules (`provider = "google"`) and by traffic shaping.
    pub id: String,
    pub name: String,
    /// MX host suffixes: `google.com` covers `gmail-smtp-in.l.google.com`.
    pub mx_suffixes: Vec<String>,
    /// Recipient domain suffixes: `gmail.com`, `yahoo.co.uk`.
    pub domain_suffixes: Vec<String>,
}

/// How a provider was recognised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via<'a> {
    /// The MX host ends with this suffix.
    Mx(&'a str),
    /// The recipient domain ends with this suffix.
    Domain(&'a str),
}

/// All providers of a table, indexed for lookups by host name suffix.
#[derive(Clone, Debug, Default)]
pub struct Providers {
    list: Vec<Provider>,
    by_mx: Index,
    by_domain: Index,
}

/// Lower-cases and drops a trailing dot, borrowing when there is nothing to change.
fn normalize(name: &str) -> std::borrow::Cow<'_, str> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(name.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(name)
    }
}

/// The longest suffix of `name`, on a label boundary, that `index` knows.
fn lookup<'a>(index: &'a Index, name: &str) -> Option<(usize, &'a str)> {
    let name = normalize(name);
    let mut rest: &str = &name;
    loop {
        if let Some((k, v)) = index.get_key_value(rest) {
            return Some((*v, k.as_str()));
        }
        rest = rest.split_once('.')?.1;
    }
}

impl Providers {
    /// Indexes `list`. A suffix claimed by two providers is an error naming both.
    pub fn new(list: Vec<Provider>) -> Result<Providers, String> {
        let mut by_mx = Index::default();
        let mut by_domain = Index::default();
        for (i, p) in list.iter().enumerate() {
            for (index, suffixes, what) in [(&mut by_mx, &p.mx_suffixes, "MX suffix"), (&mut by_domain, &p.domain_suffixes, "domain suffix")] {
                for s in suffixes {
                    let key = normalize(s).trim_start_matches('.').to_string();
                    if key.is_empty() {
                        return Err(format!("provider {:?}: an empty {what}", p.id));
                    }
                    if let Some(other) = index.insert(key.clone(), i) {
                        if other != i {
                            return Err(format!("provider {:?}: {what} {key:?} is already claimed by provider {:?}", p.id, list[other].id));
                        }
                    }
                }
            }
        }
        Ok(Providers { list, by_mx, by_domain })
    }

    pub fn list(&self) -> &[Provider] {
        &self.list
    }

    pub fn get(&self, index: usize) -> &Provider {
        &self.list[index]
    }

    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.list.iter().position(|p| p.id == id)
    }

    /// The provider behind a destination: by MX host first (a Google Workspace domain has its
    /// own name but Google's MX), else by recipient domain.
    pub fn identify(&self, mx_host: Option<&str>, domain: Option<&str>) -> Option<usize> {
        self.identify_via(mx_host, domain).map(|(i, _)| i)
    }

    /// [`Providers::identify`], and how.
    pub fn identify_via(&self, mx_host: Option<&str>, domain: Option<&str>) -> Option<(usize, Via<'_>)> {
        if let Some(found) = mx_host.and_then(|h| lookup(&self.by_mx, h)) {
            return Some((found.0, Via::Mx(found.1)));
        }
        domain.and_then(|d| lookup(&self.by_domain, d)).map(|(i, s)| (i, Via::Domain(s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(id: &str, mx: &[&str], domains: &[&str]) -> Provider {
        Provider {
            id: id.into(),
            name: id.into(),
            mx_suffixes: mx.iter().map(|s| s.to_string()).collect(),
            domain_suffixes: domains.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn mx_wins_over_domain_and_suffixes_respect_labels() {
        let ps = Providers::new(vec![p("google", &["google.com"], &["gmail.com"]), p("yahoo", &["yahoodns.net"], &["yahoo.com", "aol.com"])]).unwrap();
        assert_eq!(ps.identify(Some("Gmail-SMTP-IN.l.google.com."), None), Some(0));
        assert_eq!(ps.identify(Some("aspmx.l.google.com"), Some("customer.example")), Some(0));
        assert_eq!(ps.identify(None, Some("aol.com")), Some(1));
        assert_eq!(ps.identify(Some("mx.other.net"), Some("yahoo.com")), Some(1), "domain when the MX is unknown");
        assert_eq!(ps.identify(Some("notgoogle.com"), None), None, "suffixes end on a label boundary");
        assert_eq!(ps.identify(None, None), None);
        assert_eq!(ps.identify_via(Some("mta5.am0.yahoodns.net"), None), Some((1, Via::Mx("yahoodns.net"))));
    }

    #[test]
    fn the_longest_suffix_wins_whatever_the_label_counts() {
        let ps = Providers::new(vec![p("short", &["example.net"], &["co.uk"]), p("long", &["mx.eu.example.net"], &["big.co.uk"])]).unwrap();
        assert_eq!(ps.identify(Some("a.b.mx.eu.example.net"), None), Some(1));
        assert_eq!(ps.identify(Some("mx.eu.example.net"), None), Some(1));
        assert_eq!(ps.identify(Some("eu.example.net"), None), Some(0));
        assert_eq!(ps.identify(Some("example.net"), None), Some(0));
        assert_eq!(ps.identify(Some("net"), None), None, "fewer labels than any suffix");
        assert_eq!(ps.identify(None, Some("mail.big.co.uk")), Some(1));
        assert_eq!(ps.identify(None, Some("small.co.uk")), Some(0));
        assert_eq!(Providers::new(vec![]).unwrap().identify(Some("a.b"), Some("c.d")), None);
    }

    #[test]
    fn a_suffix_belongs_to_one_provider() {
        let e = Providers::new(vec![p("a", &["x.net"], &[]), p("b", &["X.net"], &[])]).unwrap_err();
        assert!(e.contains("already claimed by provider \"a\""), "{e}");
    }
}
