//! Who this agent is: a 48-bit peer name (printed like a MAC address, as in Weave) generated at
//! random once and persisted in the state directory, and a nickname (the hostname by default).
//! Never derived from machine-id or DMI data: cloned machines must not collide.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::addr::Mac;
use crate::store::{Op, Store, StoreError, Table};

/// A peer name: 48 bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct PeerName(u64);

impl PeerName {
    pub const MAX: u64 = (1 << 48) - 1;

    pub fn new(v: u64) -> Option<PeerName> {
        (v <= Self::MAX).then_some(PeerName(v))
    }

    pub fn get(self) -> u64 {
        self.0
    }

    /// A random name: locally administered, unicast (usable as the bridge MAC).
    pub fn random() -> PeerName {
        let v: u64 = rand::random::<u64>() & Self::MAX;
        PeerName((v | (0x02 << 40)) & !(0x01 << 40))
    }

    /// The name as a MAC address (the bridge's MAC).
    pub fn mac(self) -> Mac {
        let b = self.0.to_be_bytes();
        Mac([b[2], b[3], b[4], b[5], b[6], b[7]])
    }
}

impl fmt::Display for PeerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.mac().fmt(f)
    }
}

impl From<PeerName> for String {
    fn from(p: PeerName) -> String {
        p.to_string()
    }
}

impl TryFrom<String> for PeerName {
    type Error = String;
    fn try_from(s: String) -> Result<PeerName, String> {
        s.parse()
    }
}

impl FromStr for PeerName {
    type Err = String;
    /// `aa:bb:cc:dd:ee:ff`, or a shortened form where `::` stands for zero groups (`::1`).
    fn from_str(s: &str) -> Result<PeerName, String> {
        let bad = || {
            format!(
                "{s:?} is not a peer name (six hex bytes like 8a:3e:3e:3e:3e:3e, or a short form like ::1)"
            )
        };
        let groups: Vec<&str> = if let Some((head, tail)) = s.split_once("::") {
            if tail.contains("::") {
                return Err(bad());
            }
            let h: Vec<&str> = head.split(':').filter(|g| !g.is_empty()).collect();
            let t: Vec<&str> = tail.split(':').filter(|g| !g.is_empty()).collect();
            if h.len() + t.len() > 5 {
                return Err(bad());
            }
            let mut g = h;
            g.extend(std::iter::repeat_n("0", 6 - g.len() - t.len()));
            g.extend(t);
            g
        } else {
            s.split(':').collect()
        };
        if groups.len() != 6 {
            return Err(bad());
        }
        let mut v = 0u64;
        for g in groups {
            if g.is_empty() || g.len() > 2 {
                return Err(bad());
            }
            v = (v << 8) | u64::from(u8::from_str_radix(g, 16).map_err(|_| bad())?);
        }
        Ok(PeerName(v))
    }
}

/// This agent's identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub name: PeerName,
    pub nickname: String,
}

const PEER_NAME_KEY: &str = "peer_name";

/// The persisted name, or `--name` (which replaces the persisted one), or a new random name.
/// Returns the name and whether it differs from the persisted one (a different peer: state
/// tied to the old name must not be reused).
pub fn load_or_create(
    store: &Store,
    flag: Option<PeerName>,
) -> Result<(PeerName, bool), StoreError> {
    let persisted: Option<PeerName> = store.get(Table::Meta, PEER_NAME_KEY)?;
    let name = flag.or(persisted).unwrap_or_else(PeerName::random);
    if persisted != Some(name) {
        store.write(&[Op::put(Table::Meta, PEER_NAME_KEY, &name)?])?;
    }
    Ok((name, persisted.is_some_and(|p| p != name)))
}

/// The hostname, for the default nickname.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "weft".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print() {
        let p: PeerName = "8a:3e:3e:3e:3e:3e".parse().unwrap();
        assert_eq!(p.to_string(), "8a:3e:3e:3e:3e:3e");
        assert_eq!("::1".parse::<PeerName>().unwrap().get(), 1);
        assert_eq!("1::".parse::<PeerName>().unwrap().get(), 1 << 40);
        assert_eq!("aa::2:3".parse::<PeerName>().unwrap().to_string(), "aa:00:00:00:02:03");
        for bad in ["", "1:2:3", "1:2:3:4:5:6:7", "zz::", "100::", "1::2::3"] {
            assert!(bad.parse::<PeerName>().is_err(), "{bad}");
        }
    }

    #[test]
    fn random_names_are_local_unicast() {
        for _ in 0..100 {
            let m = PeerName::random().mac().0;
            assert_eq!(m[0] & 0x03, 0x02);
        }
    }

    #[test]
    fn the_name_persists_and_the_flag_wins() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (first, changed) = load_or_create(&store, None).unwrap();
        assert!(!changed);
        assert_eq!(load_or_create(&store, None).unwrap(), (first, false));
        let other: PeerName = "::9".parse().unwrap();
        assert_eq!(load_or_create(&store, Some(other)).unwrap(), (other, true));
        assert_eq!(load_or_create(&store, None).unwrap(), (other, false));
    }
}
