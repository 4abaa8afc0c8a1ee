//! The domain weft answers for (`weave.local.` by default) and the rules for names in it:
//! validation, qualification of short names, case folding. Pure.

use std::fmt;
use std::str::FromStr;

/// The default domain, as Weave's.
pub const DEFAULT_DOMAIN: &str = "weave.local.";

/// A name cannot be registered.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{0:?} is not a valid DNS name (labels of 1-63 letters, digits, '-' or '_')")]
    Invalid(String),
    #[error("{name:?} is not in the domain {domain} (use NAME or NAME.{domain})")]
    NotInDomain { name: String, domain: String },
}

/// A domain: lower case, fully qualified (with the trailing dot).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Domain(String);

impl Default for Domain {
    fn default() -> Domain {
        Domain(DEFAULT_DOMAIN.to_owned())
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Domain {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Domain, NameError> {
        let fqdn = absolute(s);
        if !valid(&fqdn) || fqdn == "." {
            return Err(NameError::Invalid(s.to_owned()));
        }
        Ok(Domain(fqdn.to_ascii_lowercase()))
    }
}

/// `name` with a trailing dot.
fn absolute(name: &str) -> String {
    if name.ends_with('.') { name.to_owned() } else { format!("{name}.") }
}

/// Whether an absolute name is well formed: at most 253 characters, labels of 1-63 letters,
/// digits, '-' or '_' (Docker and Kubernetes names use both).
fn valid(fqdn: &str) -> bool {
    let Some(body) = fqdn.strip_suffix('.') else { return false };
    body.len() <= 253
        && body.split('.').all(|l| {
            (1..=63).contains(&l.len())
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

impl Domain {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether a lower-case absolute name is the domain or under it.
    pub fn contains(&self, lname: &str) -> bool {
        lname == self.0
            || lname.strip_suffix(self.0.as_str()).is_some_and(|head| head.ends_with('.'))
    }

    /// The absolute name to register for `name`: a single label is put in the domain
    /// (`db` → `db.weave.local.`), a longer name must already be in it. The spelling is kept.
    pub fn qualify(&self, name: &str) -> Result<String, NameError> {
        let trimmed = name.trim_end_matches('.');
        let fqdn =
            if trimmed.contains('.') { absolute(trimmed) } else { format!("{trimmed}.{}", self.0) };
        if trimmed.is_empty() || !valid(&fqdn) {
            return Err(NameError::Invalid(name.to_owned()));
        }
        let lower = fqdn.to_ascii_lowercase();
        if !self.contains(&lower) || lower == self.0 {
            return Err(NameError::NotInDomain { name: name.to_owned(), domain: self.0.clone() });
        }
        Ok(fqdn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Domain {
        s.parse().unwrap()
    }

    #[test]
    fn domain_with_or_without_the_dot_and_in_any_case() {
        assert_eq!(d("foo.bar"), d("foo.bar."));
        assert_eq!(d("Foo.BAR.").as_str(), "foo.bar.");
        assert!("".parse::<Domain>().is_err());
        assert!(".".parse::<Domain>().is_err());
        assert!("a..b".parse::<Domain>().is_err());
        assert!("bad name".parse::<Domain>().is_err());
    }

    #[test]
    fn contains_needs_a_label_boundary() {
        let dom = d("weave.local");
        assert!(dom.contains("a.weave.local."));
        assert!(dom.contains("a.sub.weave.local."));
        assert!(dom.contains("weave.local."));
        assert!(!dom.contains("aweave.local."));
        assert!(!dom.contains("weave.local.com."));
    }

    #[test]
    fn qualify_short_names_and_keep_spelling() {
        let dom = d("weave.local");
        assert_eq!(dom.qualify("SeeOne").unwrap(), "SeeOne.weave.local.");
        assert_eq!(dom.qualify("db.weave.local").unwrap(), "db.weave.local.");
        assert_eq!(dom.qualify("x.Sub.Weave.Local.").unwrap(), "x.Sub.Weave.Local.");
        assert!(matches!(dom.qualify("db.example.com"), Err(NameError::NotInDomain { .. })));
        assert!(matches!(dom.qualify("weave.local"), Err(NameError::NotInDomain { .. })));
        assert!(matches!(dom.qualify(""), Err(NameError::Invalid(_))));
        assert!(matches!(dom.qualify("a b"), Err(NameError::Invalid(_))));
        assert!(matches!(dom.qualify(&"x".repeat(64)), Err(NameError::Invalid(_))));
    }
}
