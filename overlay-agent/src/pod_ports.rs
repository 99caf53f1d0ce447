//! The pod bridge's ports, for the fast path (`--forward bpf`).
//!
//! The fast path serves a pod once the agent has attached its program to
//! the pod's host-side veth and entered the pod's MAC in `POD_PORTS`; from
//! then on the pod's traffic to remote pods leaves from that veth, and
//! traffic for it goes straight into it (`bpf_redirect_peer`). Which MAC
//! sits behind which veth is what the bridge learned (its FDB). A pod not
//! in the map is served by the kernel both ways, as without the fast path.

use std::collections::{BTreeMap, BTreeSet};

use aya::maps::MapError;
use netlink_packet_route::{
    link::{LinkAttribute, LinkMessage},
    neighbour::{NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState},
};
use overlay_common::PodPort;

use crate::{
    iface,
    maps::DatapathMaps,
    rtnl::{Rtnl, RtnlError},
};

#[derive(Debug, thiserror::Error)]
pub enum PodPortsError {
    #[error("reading the ports and forwarding database of bridge {bridge}")]
    Read {
        bridge: String,
        #[source]
        source: RtnlError,
    },
    #[error("no bridge {0} in this network namespace")]
    NoBridge(String),
    #[error("updating POD_PORTS")]
    Map(#[from] MapError),
}

/// What a bridge knows about its ports, asked of the kernel over rtnetlink
/// in this network namespace (sysfs would show the namespace it was
/// mounted in): which links are its ports, and its forwarding database.
#[derive(Debug, Default)]
pub struct Fdb {
    /// Port names, by index.
    ports: BTreeMap<u32, String>,
    /// Learned unicast MACs, with the index of the port behind which.
    learned: BTreeMap<[u8; 6], u32>,
}

impl Fdb {
    /// The links and the forwarding database of `bridge` (as `ip link show
    /// master BRIDGE` and `bridge fdb show br BRIDGE`).
    pub fn read(bridge: &str) -> Result<Self, PodPortsError> {
        let read = |source| PodPortsError::Read { bridge: bridge.to_owned(), source };
        let mut rtnl = Rtnl::open().map_err(read)?;
        let links = rtnl.links().map_err(read)?;
        let index = links
            .iter()
            .find(|link| link_name(link) == Some(bridge))
            .map(|link| link.header.index)
            .ok_or_else(|| PodPortsError::NoBridge(bridge.to_owned()))?;
        let entries = rtnl.bridge_fdb(index).map_err(read)?;
        Ok(Self::from_kernel(index, &links, &entries))
    }

    /// The ports of the bridge with index `bridge` among `links`, and what
    /// it learned behind them among `entries`: the dynamic unicast entries
    /// of its own database (a port's own address is permanent, and entries
    /// flagged `self` are the port device's, not the bridge's).
    fn from_kernel(bridge: u32, links: &[LinkMessage], entries: &[NeighbourMessage]) -> Self {
        let ports: BTreeMap<u32, String> = links
            .iter()
            .filter(|link| link.attributes.contains(&LinkAttribute::Controller(bridge)))
            .filter_map(|link| Some((link.header.index, link_name(link)?.to_owned())))
            .collect();
        let learned = entries
            .iter()
            .filter(|e| e.attributes.contains(&NeighbourAttribute::Controller(bridge)))
            .filter(|e| e.header.state != NeighbourState::Permanent && !e.header.flags.contains(NeighbourFlags::Own))
            .filter(|e| ports.contains_key(&e.header.ifindex))
            .filter_map(|e| {
                let mac = e.attributes.iter().find_map(|a| match a {
                    NeighbourAttribute::LinkLayerAddress(mac) => <[u8; 6]>::try_from(mac.as_slice()).ok(),
                    _ => None,
                })?;
                (mac[0] & 1 == 0).then_some((mac, e.header.ifindex))
            })
            .collect();
        Self { ports, learned }
    }

    /// The bridge's ports, by name.
    pub fn ports(&self) -> BTreeSet<String> {
        self.ports.values().cloned().collect()
    }

    /// The MACs the bridge learned on its ports, with the port's name.
    pub fn learned(&self) -> BTreeMap<[u8; 6], String> {
        self.learned.iter().filter_map(|(mac, index)| Some((*mac, self.ports.get(index)?.clone()))).collect()
    }
}

fn link_name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.as_str()),
        _ => None,
    })
}

/// Makes `POD_PORTS` the pods the bridge has learned behind `enrolled`
/// ports (the veths the fast path is attached to, by name and index): new
/// and moved pods are written, the others removed. Returns how many
/// entries the map holds.
pub fn sync(maps: &mut DatapathMaps, fdb: &Fdb, enrolled: &BTreeMap<String, u32>) -> Result<usize, PodPortsError> {
    let current: BTreeMap<[u8; 6], PodPort> = maps.pod_ports.iter().filter_map(Result::ok).collect();
    let wanted = wanted_ports(&fdb.learned(), &current, enrolled, iface::interface_index);
    // Departed pods first: in a full map their entries are the room the
    // new ones need, and a failed write below must not keep them for ever.
    for mac in current.keys().filter(|mac| !wanted.contains_key(*mac)) {
        match maps.pod_ports.remove(mac) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e.into()),
        }
    }
    for (mac, port) in &wanted {
        if current.get(mac) != Some(port) {
            maps.pod_ports.insert(mac, port, 0)?;
        }
    }
    Ok(wanted.len())
}

/// The `POD_PORTS` entries to hold: MACs the bridge learned behind an
/// enrolled port, and entries already held whose port is still enrolled
/// and still the same interface. The bridge forgets a MAC after its ageing
/// time (300 s) without frames from it, and a pod whose traffic all takes
/// the fast path sends no frame through the bridge: its entry lives as
/// long as its veth, not as long as the bridge remembers it.
fn wanted_ports(
    learned: &BTreeMap<[u8; 6], String>,
    current: &BTreeMap<[u8; 6], PodPort>,
    enrolled: &BTreeMap<String, u32>,
    index_of: impl Fn(&str) -> Option<u32>,
) -> BTreeMap<[u8; 6], PodPort> {
    // A veth recreated under the same name is not the one we attached to.
    let live = |port: &str, ifindex: u32| index_of(port) == Some(ifindex);
    let mut wanted: BTreeMap<[u8; 6], PodPort> = learned
        .iter()
        .filter_map(|(mac, port)| {
            let ifindex = *enrolled.get(port)?;
            live(port, ifindex).then_some((*mac, PodPort { ifindex }))
        })
        .collect();
    for (mac, port) in current {
        let still_enrolled = enrolled.iter().any(|(name, &ifindex)| ifindex == port.ifindex && live(name, ifindex));
        // Learned elsewhere (moved, or on a port not enrolled): the bridge knows better.
        if still_enrolled && !learned.contains_key(mac) {
            wanted.insert(*mac, *port);
        }
    }
    wanted
}

/// Empties `POD_PORTS`, when the fast path's bridge is gone.
pub fn clear(maps: &mut DatapathMaps) -> Result<(), PodPortsError> {
    let macs: Vec<[u8; 6]> = maps.pod_ports.keys().filter_map(Result::ok).collect();
    for mac in macs {
        match maps.pod_ports.remove(&mac) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enrolled_pods_outlive_the_bridges_memory_but_not_their_veth() {
        const POD: [u8; 6] = [0x0a, 0x58, 0x0a, 0xf4, 1, 0x0b];
        const OTHER: [u8; 6] = [0x0a, 0x58, 0x0a, 0xf4, 1, 0x0c];
        let enrolled = BTreeMap::from([("veth1".to_owned(), 7), ("veth2".to_owned(), 8)]);
        let indexes = |name: &str| match name {
            "veth1" => Some(7),
            "veth2" => Some(8),
            _ => None,
        };
        let current = BTreeMap::from([(POD, PodPort { ifindex: 7 })]);
        // The bridge aged the MAC out: all its traffic took the fast path.
        let aged = wanted_ports(&BTreeMap::new(), &current, &enrolled, indexes);
        assert_eq!(aged, current, "an aged-out FDB entry must not unenrol a pod whose veth is still there");
        // Learned: as learned.
        let learned = BTreeMap::from([(OTHER, "veth2".to_owned())]);
        let both = wanted_ports(&learned, &current, &enrolled, indexes);
        assert_eq!(both, BTreeMap::from([(POD, PodPort { ifindex: 7 }), (OTHER, PodPort { ifindex: 8 })]));
        // Moved to another port: the bridge's word wins.
        let moved = BTreeMap::from([(POD, "veth2".to_owned())]);
        assert_eq!(wanted_ports(&moved, &current, &enrolled, indexes), BTreeMap::from([(POD, PodPort { ifindex: 8 })]));
        // The veth is gone, or recreated under its name with a new index.
        let gone = BTreeMap::from([("veth2".to_owned(), 8)]);
        assert!(wanted_ports(&BTreeMap::new(), &current, &gone, indexes).is_empty());
        let recreated = |name: &str| (name == "veth1").then_some(9);
        assert!(wanted_ports(&BTreeMap::new(), &current, &enrolled, recreated).is_empty());
    }

    #[test]
    fn only_macs_learned_on_ports_count() {
        const BRIDGE: u32 = 3;
        let link = |index: u32, name: &str, master: Option<u32>| {
            let mut link = LinkMessage::default();
            link.header.index = index;
            link.attributes.push(LinkAttribute::IfName(name.to_owned()));
            link.attributes.extend(master.map(LinkAttribute::Controller));
            link
        };
        let links = [
            link(2, "eth0", None),
            link(BRIDGE, "cni0", None),
            link(4, "veth1", Some(BRIDGE)),
            link(5, "veth2", Some(BRIDGE)),
            link(6, "other1", Some(9)),
        ];
        // As the kernel dumps them for `bridge fdb show br cni0`.
        let entry = |ifindex: u32, mac: [u8; 6], state: NeighbourState, flags: NeighbourFlags, master: Option<u32>| {
            let mut entry = NeighbourMessage::default();
            entry.header.ifindex = ifindex;
            entry.header.state = state;
            entry.header.flags = flags;
            entry.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
            entry.attributes.extend(master.map(NeighbourAttribute::Controller));
            entry
        };
        let (master, own) = (NeighbourFlags::Controller, NeighbourFlags::Own);
        let entries = [
            entry(BRIDGE, [0x33, 0x33, 0, 0, 0, 1], NeighbourState::Permanent, own, None),
            entry(4, [0x0a, 0x58, 0x0a, 0xf4, 1, 0x0b], NeighbourState::Reachable, master, Some(BRIDGE)),
            entry(4, [0x26, 0x4c, 0x8b, 0xd4, 0x17, 0x50], NeighbourState::Permanent, master, Some(BRIDGE)),
            entry(4, [0x01, 0x00, 0x5e, 0, 0, 1], NeighbourState::Reachable, master, Some(BRIDGE)),
            entry(4, [0x33, 0x33, 0xff, 0xd4, 0x17, 0x50], NeighbourState::Permanent, own, None),
            // Aged past its time but not yet removed: still learned.
            entry(5, [0x0a, 0x58, 0x0a, 0xf4, 1, 0x0c], NeighbourState::Stale, master, Some(BRIDGE)),
            entry(6, [0x0a, 0x58, 0x0a, 0xf4, 9, 9], NeighbourState::Reachable, master, Some(9)),
        ];
        let fdb = Fdb::from_kernel(BRIDGE, &links, &entries);
        assert_eq!(
            fdb.learned().into_iter().collect::<Vec<_>>(),
            vec![([0x0a, 0x58, 0x0a, 0xf4, 1, 0x0b], "veth1".to_owned()), ([0x0a, 0x58, 0x0a, 0xf4, 1, 0x0c], "veth2".to_owned())]
        );
        assert_eq!(fdb.ports().into_iter().collect::<Vec<_>>(), ["veth1", "veth2"]);
    }
}
