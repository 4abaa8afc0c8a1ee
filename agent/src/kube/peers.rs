//! The Kubernetes peer source: the other Nodes' InternalIPs become the mesh's
//! `Source::Kubernetes` targets, restated whole on every change of the Node list (added,
//! removed, changed addresses), next to the user's own targets.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::api::NodeInfo;
use crate::mesh::Mesh;
use crate::mesh::maker::Source;

/// The address a Node is dialled at: its first IPv4 InternalIP, else its first one (one
/// target per Node, so a dual-stack Node is not dialled twice).
pub fn node_address(node: &NodeInfo) -> Option<IpAddr> {
    node.internal_ips.iter().find(|ip| ip.is_ipv4()).or(node.internal_ips.first()).copied()
}

/// The mesh targets for a Node list: every other Node's address (with the port when it is
/// not the default, since all agents of a cluster listen on the same one).
pub fn targets(nodes: &[NodeInfo], me: &str, port: u16) -> BTreeSet<String> {
    nodes
        .iter()
        .filter(|n| n.name != me)
        .filter_map(node_address)
        .map(|ip| {
            if port == crate::mesh::DEFAULT_PORT {
                ip.to_string()
            } else {
                SocketAddr::new(ip, port).to_string()
            }
        })
        .collect()
}

/// Follows the Node list until shutdown. `nodes` is `None` until the first full list.
pub async fn run(
    mesh: Mesh,
    mut nodes: watch::Receiver<Option<Vec<NodeInfo>>>,
    me: String,
    port: u16,
    shutdown: CancellationToken,
) {
    let mut last: Option<BTreeSet<String>> = None;
    loop {
        let list = nodes.borrow_and_update().clone();
        if let Some(list) = list {
            let want = targets(&list, &me, port);
            if last.as_ref() != Some(&want) {
                let added: Vec<&String> =
                    want.iter().filter(|t| last.as_ref().is_none_or(|l| !l.contains(*t))).collect();
                let removed: Vec<&String> =
                    last.iter().flatten().filter(|t| !want.contains(*t)).collect();
                info!(nodes = list.len(), ?added, ?removed, "Kubernetes peers from the Node list");
                mesh.set_targets(Source::Kubernetes, want.clone());
                last = Some(want);
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = nodes.changed() => if changed.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, ips: &[&str]) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            internal_ips: ips.iter().map(|s| s.parse().expect("ip")).collect(),
        }
    }

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn other_nodes_become_targets() {
        let nodes = vec![
            node("a", &["10.0.0.1"]),
            node("b", &["fd00::2", "10.0.0.2"]),
            node("c", &["fd00::3"]),
            node("d", &[]),
        ];
        assert_eq!(targets(&nodes, "a", 6783), set(&["10.0.0.2", "fd00::3"]));
        assert_eq!(targets(&nodes, "b", 7000), set(&["10.0.0.1:7000", "[fd00::3]:7000"]));
    }

    #[test]
    fn changes_follow_the_list() {
        let mut nodes = vec![node("a", &["10.0.0.1"]), node("b", &["10.0.0.2"])];
        assert_eq!(targets(&nodes, "a", 6783), set(&["10.0.0.2"]));
        nodes.push(node("c", &["10.0.0.3"]));
        assert_eq!(targets(&nodes, "a", 6783), set(&["10.0.0.2", "10.0.0.3"]));
        nodes[1].internal_ips = vec!["10.0.0.22".parse().expect("ip")];
        assert_eq!(targets(&nodes, "a", 6783), set(&["10.0.0.22", "10.0.0.3"]));
        nodes.remove(2);
        assert_eq!(targets(&nodes, "a", 6783), set(&["10.0.0.22"]));
    }
}
