//! Which peer runs on which Node, kept in the ConfigMap `weft-peers` so that it outlives
//! agents and Nodes: a deleted Node's space can be reclaimed even if every agent restarted
//! since, and a Node whose agent came back with a new peer name (its state was wiped) gives
//! up the old name's space.
//!
//! Keys (ConfigMap keys allow `[-._a-zA-Z0-9]`):
//! - `<node name>` → the peer name of the agent running there now;
//! - `retired-<peer name with '-' for ':'>` → the Node it ran on: a peer name that Node's
//!   agent replaced. Its space is reclaimed, then the key is removed.
//!
//! Each agent writes only its own Node's key (and the retired key for its own previous
//! name); removals are done by the one agent holding the reclaim Lease. All writes are
//! compare-and-swap on the resourceVersion.

use std::collections::BTreeMap;

use super::api::{ApiError, KubeApi, Stored, Write};
use crate::identity::PeerName;

/// The ConfigMap (in the agent's namespace) mapping Nodes to peer names.
pub const PEERS_CONFIG_MAP: &str = "weft-peers";
const RETIRED_PREFIX: &str = "retired-";

/// The registry as read, with the version to compare against.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Registry {
    /// Node → peer registered there now.
    pub peers: BTreeMap<String, PeerName>,
    /// Retired peer → the Node it ran on.
    pub retired: BTreeMap<PeerName, String>,
    /// `None` while the ConfigMap does not exist.
    pub version: Option<String>,
    /// Entries that do not parse (kept as they are, reported once by the caller).
    pub unparsed: BTreeMap<String, String>,
}

/// What one registration changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Registered {
    /// This Node already named this peer.
    Unchanged,
    /// First registration of this Node.
    New,
    /// This Node named another peer before, now retired (its space will be reclaimed).
    Replaced(PeerName),
}

fn retired_key(peer: PeerName) -> String {
    format!("{RETIRED_PREFIX}{}", peer.to_string().replace(':', "-"))
}

impl Registry {
    fn parse(stored: Stored) -> Registry {
        let mut reg = Registry { version: Some(stored.version), ..Registry::default() };
        for (k, v) in stored.data {
            let parsed = match k.strip_prefix(RETIRED_PREFIX) {
                Some(p) => p.replace('-', ":").parse::<PeerName>().map(|p| {
                    reg.retired.insert(p, v.clone());
                }),
                None => v.parse::<PeerName>().map(|p| {
                    reg.peers.insert(k.clone(), p);
                }),
            };
            if parsed.is_err() {
                reg.unparsed.insert(k, v);
            }
        }
        reg
    }

    fn data(&self) -> BTreeMap<String, String> {
        let mut data = self.unparsed.clone();
        data.extend(self.peers.iter().map(|(n, p)| (n.clone(), p.to_string())));
        data.extend(self.retired.iter().map(|(p, n)| (retired_key(*p), n.clone())));
        data
    }

    /// Whether `peer` is some Node's current peer (never reclaimed then).
    pub fn is_current(&self, peer: PeerName) -> bool {
        self.peers.values().any(|p| *p == peer)
    }
}

pub async fn read(api: &dyn KubeApi) -> Result<Registry, ApiError> {
    Ok(api.get_config_map(PEERS_CONFIG_MAP).await?.map(Registry::parse).unwrap_or_default())
}

/// Writes `reg` if the ConfigMap is still at the version `reg` was read at.
pub async fn write(api: &dyn KubeApi, reg: &Registry) -> Result<Write, ApiError> {
    match &reg.version {
        Some(v) => api.replace_config_map(PEERS_CONFIG_MAP, &reg.data(), v).await,
        None => api.create_config_map(PEERS_CONFIG_MAP, &reg.data()).await,
    }
}

/// Records that `me` runs on `node`; a different peer registered there before is retired.
pub async fn register(api: &dyn KubeApi, node: &str, me: PeerName) -> Result<Registered, ApiError> {
    loop {
        let mut reg = read(api).await?;
        let outcome = match reg.peers.get(node) {
            Some(p) if *p == me => return Ok(Registered::Unchanged),
            Some(old) => Registered::Replaced(*old),
            None => Registered::New,
        };
        if let Registered::Replaced(old) = outcome {
            reg.retired.insert(old, node.to_owned());
        }
        reg.peers.insert(node.to_owned(), me);
        // A retired name that is this peer again (--name reused) is not to be reclaimed.
        reg.retired.remove(&me);
        if write(api, &reg).await? == Write::Done {
            return Ok(outcome);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::fake::FakeApi;

    fn p(n: u8) -> PeerName {
        format!("00:00:00:00:00:{n:02x}").parse().expect("peer name")
    }

    #[tokio::test]
    async fn registration_survives_and_a_new_identity_retires_the_old() {
        let api = FakeApi::default();
        assert_eq!(register(&api, "a", p(1)).await.expect("reg"), Registered::New);
        assert_eq!(register(&api, "b", p(2)).await.expect("reg"), Registered::New);
        assert_eq!(register(&api, "a", p(1)).await.expect("reg"), Registered::Unchanged);
        assert_eq!(register(&api, "a", p(3)).await.expect("reg"), Registered::Replaced(p(1)));
        let reg = read(&api).await.expect("read");
        assert_eq!(reg.peers.get("a"), Some(&p(3)));
        assert_eq!(reg.peers.get("b"), Some(&p(2)));
        assert_eq!(reg.retired.get(&p(1)).map(String::as_str), Some("a"));
        let raw = api.config_map(PEERS_CONFIG_MAP).expect("stored");
        assert_eq!(raw["retired-00-00-00-00-00-01"], "a");
        assert_eq!(raw["a"], "00:00:00:00:00:03");
    }

    #[tokio::test]
    async fn concurrent_registrations_all_land() {
        let api = std::sync::Arc::new(FakeApi::default());
        let joins: Vec<_> = (1..=10u8)
            .map(|i| {
                let api = api.clone();
                tokio::spawn(async move { register(api.as_ref(), &format!("n{i}"), p(i)).await })
            })
            .collect();
        for j in joins {
            j.await.expect("task").expect("register");
        }
        assert_eq!(read(api.as_ref()).await.expect("read").peers.len(), 10);
    }

    #[tokio::test]
    async fn foreign_entries_are_kept() {
        let api = FakeApi::default();
        api.create_config_map(PEERS_CONFIG_MAP, &BTreeMap::from([("x".into(), "junk".into())]))
            .await
            .expect("create");
        register(&api, "a", p(1)).await.expect("reg");
        assert_eq!(api.config_map(PEERS_CONFIG_MAP).expect("stored")["x"], "junk");
    }
}
