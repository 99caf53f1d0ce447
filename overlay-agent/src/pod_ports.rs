//! The pod bridge's ports, for the fast path's last hop (`--forward bpf`).
//!
//! The bridge learns which port each pod's MAC sits behind. The agent
//! copies what it learned into `POD_PORTS`, so the inbound fast path can
//! skip the bridge and redirect straight into the pod (`bpf_redirect_peer`
//! through the pod's host-side veth). A pod missing from the map is only
//! slower: its packets go through the bridge.

use std::{collections::BTreeMap, process::Command};

use aya::maps::MapError;
use overlay_common::PodPort;
use serde::Deserialize;

use crate::{iface, maps::DatapathMaps, node::parse_mac};

#[derive(Debug, thiserror::Error)]
pub enum PodPortsError {
    #[error("running `bridge fdb show br {bridge}` (is iproute2 installed?): {source}")]
    Spawn { bridge: String, source: std::io::Error },
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

/// The MACs the bridge learned on its ports, with the port's name: the
/// dynamic unicast entries (a port's own address is `permanent`, the
/// device's multicast entries are `self`).
pub fn learned(fdb_json: &str, bridge: &str) -> Result<BTreeMap<[u8; 6], String>, PodPortsError> {
    let entries: Vec<FdbEntry> = serde_json::from_str(fdb_json)?;
    Ok(entries
        .into_iter()
        .filter(|e| e.master.as_deref() == Some(bridge) && e.state != "permanent" && !e.flags.iter().any(|f| f == "self"))
        .filter_map(|e| Some((parse_mac(&e.mac)?, e.ifname)))
        .filter(|(mac, _)| mac[0] & 1 == 0)
        .collect())
}

/// Asks the kernel for the bridge's forwarding database.
fn read_fdb(bridge: &str) -> Result<String, PodPortsError> {
    let out = Command::new("bridge")
        .args(["-j", "fdb", "show", "br", bridge])
        .output()
        .map_err(|source| PodPortsError::Spawn { bridge: bridge.to_owned(), source })?;
    if !out.status.success() {
        return Err(PodPortsError::Failed { bridge: bridge.to_owned(), stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned() });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Makes `POD_PORTS` what the bridge has learned now: new and moved pods
/// are written, entries for MACs the bridge forgot are removed. Returns
/// how many entries the map holds.
pub fn sync(maps: &mut DatapathMaps, bridge: &str) -> Result<usize, PodPortsError> {
    let wanted: BTreeMap<[u8; 6], PodPort> = learned(&read_fdb(bridge)?, bridge)?
        .into_iter()
        .filter_map(|(mac, port)| Some((mac, PodPort { ifindex: iface::interface_index(&port)? })))
        .collect();
    let current: BTreeMap<[u8; 6], PodPort> = maps.pod_ports.iter().filter_map(Result::ok).collect();
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

/// Empties `POD_PORTS`, when the fast path is off or its bridge is gone.
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
        let ports = learned(fdb, "cni0").unwrap();
        assert_eq!(
            ports.into_iter().collect::<Vec<_>>(),
            vec![([0x0a, 0x58, 0x0a, 0xf4, 1, 0x0b], "veth1".to_owned()), ([0x0a, 0x58, 0x0a, 0xf4, 1, 0x0c], "veth2".to_owned())]
        );
        assert!(learned("not json", "cni0").is_err());
    }
}
