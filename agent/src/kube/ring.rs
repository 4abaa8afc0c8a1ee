//! The first division of the address range in a cluster, agreed without anyone typing a
//! number. The agents race to create the ConfigMap `weft-ring` naming themselves; the API
//! server creates an object at most once, so exactly one agent wins, and every agent (the
//! winner included) reads back the same name and starts with `seed=<winner>`. Every peer
//! therefore builds the same initial ring (the winner owns the whole range and hands space
//! out on request): two different first divisions would need two different stored names,
//! which the atomic create rules out. A peer with a persisted ring ignores its init mode,
//! and `--ipalloc-init` given by hand wins over this rule.
//!
//! If `weft-ring` is missing but other Nodes are already registered in `weft-peers` (the
//! ConfigMap was deleted in a running cluster), a ring exists that this agent cannot name:
//! it starts as an observer and asks the others for space, rather than seeding a second,
//! conflicting ring.

use std::collections::BTreeMap;

use super::api::{ApiError, KubeApi, Write};
use super::registry;
use crate::identity::PeerName;
use crate::ipam::InitMode;

/// The ConfigMap (in the agent's namespace) that names the peer that seeded the ring.
pub const RING_CONFIG_MAP: &str = "weft-ring";
/// Its key holding the peer name.
const SEED_KEY: &str = "seed";
/// Its key holding the Node the seed ran on (for people).
const NODE_KEY: &str = "node";

/// The init mode and why, for the start-up log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub mode: InitMode,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(
        "ConfigMap {RING_CONFIG_MAP} has no valid `{SEED_KEY}` ({0}); fix or delete it (delete \
         it only if no weft agent holds a ring), or pass --ipalloc-init"
    )]
    Invalid(String),
}

/// Decides how this agent's IP allocation starts.
pub async fn decide(api: &dyn KubeApi, me: PeerName, node: &str) -> Result<Decision, RingError> {
    // Two rounds are enough: a lost create means the ConfigMap exists for the re-read.
    for _ in 0..2 {
        if let Some(stored) = api.get_config_map(RING_CONFIG_MAP).await? {
            return seeded_by(&stored.data, me);
        }
        let others = registry::read(api).await?.peers.into_iter().any(|(n, _)| n != node);
        if others {
            return Ok(Decision {
                mode: InitMode::Observer,
                reason: format!(
                    "ConfigMap {RING_CONFIG_MAP} is missing but other nodes are registered: \
                     joining the existing ring as an observer"
                ),
            });
        }
        let data = BTreeMap::from([
            (SEED_KEY.to_owned(), me.to_string()),
            (NODE_KEY.to_owned(), node.to_owned()),
        ]);
        if api.create_config_map(RING_CONFIG_MAP, &data).await? == Write::Done {
            return Ok(Decision {
                mode: InitMode::Seed(vec![me]),
                reason: format!(
                    "this peer created ConfigMap {RING_CONFIG_MAP} first: it seeds the ring"
                ),
            });
        }
    }
    Err(ApiError::Failed {
        verb: "get",
        resource: format!("configmaps/{RING_CONFIG_MAP}"),
        message: "it exists (create lost) but cannot be read back".into(),
    }
    .into())
}

fn seeded_by(data: &BTreeMap<String, String>, me: PeerName) -> Result<Decision, RingError> {
    let raw = data.get(SEED_KEY).ok_or_else(|| RingError::Invalid("no such key".into()))?;
    let seed: PeerName = raw.parse().map_err(|e: String| RingError::Invalid(e))?;
    let node = data.get(NODE_KEY).map(String::as_str).unwrap_or("?");
    let reason = if seed == me {
        format!("ConfigMap {RING_CONFIG_MAP} names this peer as the seed")
    } else {
        format!("ConfigMap {RING_CONFIG_MAP} names {seed} (node {node}) as the seed")
    };
    Ok(Decision { mode: InitMode::Seed(vec![seed]), reason })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::fake::FakeApi;

    fn p(n: u8) -> PeerName {
        format!("00:00:00:00:00:{n:02x}").parse().expect("peer name")
    }

    #[tokio::test]
    async fn exactly_one_agent_wins_and_all_agree() {
        let api = std::sync::Arc::new(FakeApi::default());
        let mut joins = Vec::new();
        for i in 1..=8u8 {
            let api = api.clone();
            joins.push(tokio::spawn(async move {
                decide(api.as_ref(), p(i), &format!("node-{i}")).await.expect("decide")
            }));
        }
        let mut modes = Vec::new();
        for j in joins {
            modes.push(j.await.expect("task").mode);
        }
        let first = modes[0].clone();
        let InitMode::Seed(seeds) = &first else { panic!("not a seed: {first}") };
        assert_eq!(seeds.len(), 1);
        assert!(modes.iter().all(|m| *m == first), "{modes:?}");
        let stored = api.config_map(RING_CONFIG_MAP).expect("created");
        assert_eq!(stored[SEED_KEY], seeds[0].to_string());
    }

    #[tokio::test]
    async fn an_existing_record_is_followed() {
        let api = FakeApi::default();
        let d = decide(&api, p(1), "a").await.expect("first");
        assert_eq!(d.mode, InitMode::Seed(vec![p(1)]));
        let d = decide(&api, p(2), "b").await.expect("second");
        assert_eq!(d.mode, InitMode::Seed(vec![p(1)]));
        assert!(d.reason.contains("node a"), "{}", d.reason);
    }

    #[tokio::test]
    async fn a_deleted_record_in_a_running_cluster_makes_an_observer() {
        let api = FakeApi::default();
        decide(&api, p(1), "a").await.expect("first");
        registry::register(&api, "a", p(1)).await.expect("register");
        api.delete_config_map(RING_CONFIG_MAP);
        let d = decide(&api, p(2), "b").await.expect("second");
        assert_eq!(d.mode, InitMode::Observer);
        assert!(api.config_map(RING_CONFIG_MAP).is_none(), "must not seed a second ring");
    }

    #[tokio::test]
    async fn garbage_and_rbac_errors_say_what_to_fix() {
        let api = FakeApi::default();
        api.create_config_map(RING_CONFIG_MAP, &BTreeMap::from([("seed".into(), "x".into())]))
            .await
            .expect("create");
        let e = decide(&api, p(1), "a").await.expect_err("garbage");
        assert!(e.to_string().contains("--ipalloc-init"), "{e}");
        let api = FakeApi::default();
        api.set_forbidden(true);
        let e = decide(&api, p(1), "a").await.expect_err("forbidden");
        assert!(e.to_string().contains("RBAC permission to get configmaps"), "{e}");
    }
}
