//! The pod bridge's ports, for the fast path (`--forward bpf`).
//!
//! The fast path serves a pod once the agent has attached its program to
//! the pod's host-side veth and entered the pod's MAC in `POD_PORTS`; from
//! then on the pod's traffic to remote pods leaves from that veth, and
//! traffic for it goes straight into it (`bpf_redirect_peer`). Which MAC
//! sits behind which veth is what the bridge learned (its FDB). A pod not
//! in the map is served by the kernel both ways, as without the fast path.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    process::Command,
};

use aya::maps::MapError;
use overlay_common::PodPort;
use serde::Deserialize;

use crate::{iface, maps::DatapathMaps, node::parse_mac};

#[derive(Debug, thiserror::Error)]
pub enum PodPortsError {
    #[error("running `bridge fdb show br {bridge}` (is iproute2 installed?): {source}")]
    Spawn { bridge: String, source: io::Error },
    #[error("`bridge fdb show br {bridge}` failed: {stderr}")]
    Failed { bridge: String, stderr: String },
    #[error("reading `bridge -j fdb show` output: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("updating POD_PORTS: {0}")]
    Map(#[from] MapError),
}

/// One entry of `bridge -j fdb show`.
#[derive(Debug, Deserialize)]
struct FdbEntry {
    mac: String,
    ifname: String,
    #[serde(default)]
    master: Option<String>,
    #[serde(default)]
    flags: Vec<String>,
    #[serde(default)]
    state: String,
}

/// What a bridge knows about its ports: its forwarding database, asked of
/// the kernel in this network namespace (sysfs would show the namespace it
/// was mounted in).
pub struct Fdb {
    entries: Vec<FdbEntry>,
}

impl Fdb {
    /// `bridge -j fdb show br <bridge>`.
    pub fn read(bridge: &str) -> Result<Self, PodPortsError> {
        let out = Command::new("bridge")
            .args(["-j", "fdb", "show", "br", bridge])
            .output()
            .map_err(|source| PodPortsError::Spawn { bridge: bridge.to_owned(), source })?;
        if !out.status.success() {
            return Err(PodPortsError::Failed {
                bridge: bridge.to_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Self::parse(&String::from_utf8_lossy(&out.stdout), bridge)
    }

    /// The entries of `bridge`'s ports in `bridge -j fdb show` output.
    pub fn parse(json: &str, bridge: &str) -> Result<Self, PodPortsError> {
        let entries: Vec<FdbEntry> = serde_json::from_str(json)?;
        let entries = entries.into_iter().filter(|e| e.master.as_deref() == Some(bridge)).collect();
        Ok(Self { entries })
    }

    /// The bridge's ports: each has at least its own (permanent) entry.
    pub fn ports(&self) -> BTreeSet<String> {
        self.entries.iter().map(|e| e.ifname.clone()).collect()
    }

    /// The MACs the bridge learned on its ports, with the port's name: the
    /// dynamic unicast entries (a port's own address is `permanent`).
    pub fn learned(&self) -> BTreeMap<[u8; 6], String> {
        self.entries
            .iter()
            .filter(|e| e.state != "permanent" && !e.flags.iter().any(|f| f == "self"))
            .filter_map(|e| Some((parse_mac(&e.mac)?, e.ifname.clone())))
            .filter(|(mac, _)| mac[0] & 1 == 0)
            .collect()
    }
}

/// Makes `POD_PORTS` the pods the bridge has learned behind `enrolled`
/// ports (the veths the fast path is attached to, by name and index): new
/// and moved pods are written, the others removed. Returns how many
/// entries the map holds.
pub fn sync(maps: &mut DatapathMaps, fdb: &Fdb, enrolled: &BTreeMap<String, u32>) -> Result<usize, PodPortsError> {
    let current: BTreeMap<[u8; 6], PodPort> = maps.pod_ports.iter().filter_map(Result::ok).collect();
    let wanted = wanted_ports(&fdb.learned(), &current, enrolled, iface::interface_index);
    for (mac, port) in &wanted {
        if current.get(mac) != Some(port) {
            maps.pod_ports.insert(mac, port, 0)?;
        }
    }
    for mac in current.keys().filter(|mac| !wanted.contains_key(*mac)) {
        match maps.pod_ports.remove(mac) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e.into()),
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
        let fdb = r#"[
            {"mac":"33:33:00:00:00:01","ifname":"cni0","flags":["self"],"state":"permanent"},
            {"mac":"0a:58:0a:f4:01:0b","ifname":"veth1","flags":[],"master":"cni0","state":""},
            {"mac":"26:4c:8b:d4:17:50","ifname":"veth1","flags":[],"master":"cni0","state":"permanent"},
            {"mac":"01:00:5e:00:00:01","ifname":"veth1","flags":[],"master":"cni0","state":""},
            {"mac":"33:33:ff:d4:17:50","ifname":"veth1","flags":["self"],"state":"permanent"},
            {"mac":"0a:58:0a:f4:01:0c","ifname":"veth2","master":"cni0"},
            {"mac":"0a:58:0a:f4:09:09","ifname":"other1","flags":[],"master":"br1","state":""}
        ]"#;
        let fdb = Fdb::parse(fdb, "cni0").unwrap();
        assert_eq!(
            fdb.learned().into_iter().collect::<Vec<_>>(),
            vec![([0x0a, 0x58, 0x0a, 0xf4, 1, 0x0b], "veth1".to_owned()), ([0x0a, 0x58, 0x0a, 0xf4, 1, 0x0c], "veth2".to_owned())]
        );
        assert_eq!(fdb.ports().into_iter().collect::<Vec<_>>(), ["veth1", "veth2"]);
        assert!(Fdb::parse("not json", "cni0").is_err());
    }
}
