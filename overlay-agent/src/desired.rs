//! Nodes → the state the datapath should hold, and the diff between two
//! such states. Pure functions: no kernel, no I/O.

use std::{collections::BTreeMap, net::Ipv4Addr};

use ipnetwork::Ipv4Network;
use overlay_common::{Config, ROUTE_MODE_VXLAN, VXLAN_OVERHEAD};

use crate::node::NodeInfo;

/// This node's settings, from the command line and the interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalSettings {
    pub node_name: String,
    pub vni: u32,
    pub vxlan_port: u16,
    pub underlay_ifindex: u32,
    pub underlay_mtu: u32,
    /// `--public-ip`, overriding what our own Node says.
    pub public_ip: Option<Ipv4Addr>,
}

/// One remote node as programmed into the datapath.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PeerState {
    pub pod_cidr: Ipv4Network,
    pub node_ip: Ipv4Addr,
    pub vtep_mac: [u8; 6],
    pub mode: u8,
}

/// Everything the datapath should hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    pub config: Config,
    pub local_pod_cidr: Ipv4Network,
    pub inner_mtu: u32,
    /// Keyed by pod CIDR: the LPM key, and what routes are keyed by.
    pub peers: BTreeMap<Ipv4Network, PeerState>,
}

/// A node left out of the datapath, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("node {node}: {reason}; it is left out of the datapath")]
pub struct Rejected {
    pub node: String,
    pub reason: String,
}

/// Why no state can be computed yet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    #[error("no Node named {0:?} (our own node) among the nodes; waiting for it (check --node-name)")]
    NoLocalNode(String),
}

/// A stable, locally administered VTEP MAC derived from the node address,
/// for nodes that advertise none: `0e:00:<node ip>`.
pub fn default_vtep_mac(node_ip: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = node_ip.octets();
    [0x0e, 0x00, a, b, c, d]
}

/// Computes the desired state. Peers that cannot be served (overlapping
/// CIDR, duplicate address, other VNI or backend) are rejected one by one;
/// the rest of the cluster is still programmed.
pub fn desired(local: &LocalSettings, nodes: &[NodeInfo]) -> Result<(Desired, Vec<Rejected>), NotReady> {
    let me = nodes
        .iter()
        .find(|n| n.name == local.node_name)
        .ok_or_else(|| NotReady::NoLocalNode(local.node_name.clone()))?;
    let node_ip = local.public_ip.unwrap_or(me.node_ip);
    let vtep_mac = me.vtep_mac.unwrap_or_else(|| default_vtep_mac(node_ip));
    let inner_mtu = local.underlay_mtu.saturating_sub(VXLAN_OVERHEAD);
    let config = Config {
        enabled: 1,
        vni: local.vni,
        node_ip: node_ip.octets(),
        vxlan_port: local.vxlan_port,
        vtep_mac,
        underlay_ifindex: local.underlay_ifindex,
        inner_mtu,
        pod_cidr: me.pod_cidr.network().octets(),
        pod_prefix_len: u32::from(me.pod_cidr.prefix()),
        ..Config::default()
    };

    let mut rejected = Vec::new();
    let mut peers: BTreeMap<Ipv4Network, PeerState> = BTreeMap::new();
    let mut taken: BTreeMap<Ipv4Addr, &str> = BTreeMap::new();
    let mut cidr_owner: Vec<(Ipv4Network, &str)> = vec![(me.pod_cidr, me.name.as_str())];
    taken.insert(node_ip, &me.name);
    let mut others: Vec<&NodeInfo> = nodes.iter().filter(|n| n.name != local.node_name).collect();
    others.sort_by(|a, b| a.name.cmp(&b.name));
    for node in others {
        let reject = |reason: String| Rejected { node: node.name.clone(), reason };
        if let Some(backend) = node.backend_type.as_deref().filter(|b| *b != "vxlan") {
            rejected.push(reject(format!("backend-type {backend:?} is not served by this agent's vxlan backend")));
            continue;
        }
        if let Some(vni) = node.vni.filter(|v| *v != local.vni) {
            rejected.push(reject(format!("its VNI {vni} differs from ours ({}); set --vni to match the cluster", local.vni)));
            continue;
        }
        if let Some((cidr, owner)) = cidr_owner.iter().find(|(c, _)| overlaps(*c, node.pod_cidr)) {
            rejected.push(reject(format!("pod CIDR {} overlaps {cidr} of node {owner}", node.pod_cidr)));
            continue;
        }
        if let Some(owner) = taken.get(&node.node_ip) {
            rejected.push(reject(format!("address {} is already used by node {owner}", node.node_ip)));
            continue;
        }
        taken.insert(node.node_ip, &node.name);
        cidr_owner.push((node.pod_cidr, &node.name));
        peers.insert(
            node.pod_cidr,
            PeerState {
                pod_cidr: node.pod_cidr,
                node_ip: node.node_ip,
                vtep_mac: node.vtep_mac.unwrap_or_else(|| default_vtep_mac(node.node_ip)),
                mode: ROUTE_MODE_VXLAN,
            },
        );
    }
    Ok((Desired { config, local_pod_cidr: me.pod_cidr, inner_mtu, peers }, rejected))
}

fn overlaps(a: Ipv4Network, b: Ipv4Network) -> bool {
    a.contains(b.network()) || b.contains(a.network())
}

/// One step that turns the applied peers into the desired ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Remove a peer that is gone, or whose entry changes key.
    Remove(PeerState),
    /// Add a new peer or update one in place.
    Upsert(PeerState),
}

/// Removals first (so a CIDR moving between nodes never has two owners),
/// then additions and updates. Unchanged peers produce nothing.
pub fn diff(applied: &BTreeMap<Ipv4Network, PeerState>, desired: &BTreeMap<Ipv4Network, PeerState>) -> Vec<Change> {
    let removals = applied
        .iter()
        .filter(|(cidr, _)| !desired.contains_key(cidr))
        .map(|(_, p)| Change::Remove(*p));
    let upserts = desired
        .iter()
        .filter(|(cidr, p)| applied.get(cidr) != Some(p))
        .map(|(_, p)| Change::Upsert(*p));
    removals.chain(upserts).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, cidr: &str, ip: [u8; 4]) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            pod_cidr: cidr.parse().unwrap(),
            node_ip: ip.into(),
            backend_type: None,
            vni: None,
            vtep_mac: None,
        }
    }

    fn local() -> LocalSettings {
        LocalSettings {
            node_name: "a".into(),
            vni: 1,
            vxlan_port: 8472,
            underlay_ifindex: 2,
            underlay_mtu: 1500,
            public_ip: None,
        }
    }

    #[test]
    fn builds_config_and_peers() {
        let nodes = [node("a", "10.244.1.0/24", [192, 168, 0, 1]), node("b", "10.244.2.0/24", [192, 168, 0, 2])];
        let (d, rejected) = desired(&local(), &nodes).unwrap();
        assert!(rejected.is_empty());
        assert_eq!(d.inner_mtu, 1450);
        assert_eq!(d.config.node_ip, [192, 168, 0, 1]);
        assert_eq!(d.config.pod_prefix_len, 24);
        assert_eq!(d.peers.len(), 1);
        let b = d.peers.values().next().unwrap();
        assert_eq!(b.node_ip, Ipv4Addr::new(192, 168, 0, 2));
        assert_eq!(b.vtep_mac, [0x0e, 0, 192, 168, 0, 2]);
    }

    #[test]
    fn waits_for_its_own_node() {
        let nodes = [node("b", "10.244.2.0/24", [192, 168, 0, 2])];
        assert_eq!(desired(&local(), &nodes), Err(NotReady::NoLocalNode("a".into())));
    }

    #[test]
    fn rejects_bad_peers_but_keeps_the_rest() {
        let mut other_vni = node("e", "10.244.5.0/24", [192, 168, 0, 5]);
        other_vni.vni = Some(7);
        let nodes = [
            node("a", "10.244.1.0/24", [192, 168, 0, 1]),
            node("b", "10.244.2.0/24", [192, 168, 0, 2]),
            node("c", "10.244.2.0/25", [192, 168, 0, 3]),
            node("d", "10.244.4.0/24", [192, 168, 0, 2]),
            other_vni,
        ];
        let (d, rejected) = desired(&local(), &nodes).unwrap();
        assert_eq!(d.peers.len(), 1);
        let names: Vec<_> = rejected.iter().map(|r| r.node.as_str()).collect();
        assert_eq!(names, ["c", "d", "e"]);
        assert!(rejected[0].reason.contains("overlaps 10.244.2.0/24 of node b"), "{}", rejected[0]);
        assert!(rejected[1].reason.contains("already used by node b"));
        assert!(rejected[2].reason.contains("--vni"));
    }

    #[test]
    fn diff_removes_before_adding_and_skips_unchanged() {
        let p = |cidr: &str, last: u8| PeerState {
            pod_cidr: cidr.parse().unwrap(),
            node_ip: Ipv4Addr::new(192, 168, 0, last),
            vtep_mac: [0; 6],
            mode: ROUTE_MODE_VXLAN,
        };
        let applied = BTreeMap::from([(p("10.0.1.0/24", 1).pod_cidr, p("10.0.1.0/24", 1)), (p("10.0.2.0/24", 2).pod_cidr, p("10.0.2.0/24", 2))]);
        let desired = BTreeMap::from([(p("10.0.2.0/24", 2).pod_cidr, p("10.0.2.0/24", 2)), (p("10.0.3.0/24", 3).pod_cidr, p("10.0.3.0/24", 9))]);
        assert_eq!(diff(&applied, &desired), [Change::Remove(p("10.0.1.0/24", 1)), Change::Upsert(p("10.0.3.0/24", 9))]);
        assert!(diff(&desired, &desired).is_empty());
    }
}
