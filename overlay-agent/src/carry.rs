//! An upgrade across one map layout version without a gap: what the
//! previous layout's pinned maps hold is carried into the new layout's
//! fresh maps before the new programs are swapped in.
//!
//! Why: the new agent swaps its programs into the pinned links at once (so
//! that a restart serves even with the API server unreachable), and on a
//! new layout those programs read new, empty maps. Empty, they carried no
//! pod traffic to other nodes, and the old layout's routes were deleted as
//! no current entry accounted for them, until the first reconcile, which
//! waits for the node list and the agent's own Node. Carried, the new
//! programs serve the same peers, pods and kernel-path sockets from the
//! first packet, the routes stay as they are (the carried `ROUTES` records
//! them as this layout's), and the first reconcile corrects whatever
//! changed meanwhile, as after any restart. The old programs on the pods'
//! veths keep recording the kernel's sockets in the old map until the
//! fast path replaces them, so those are carried once more then
//! ([`LateSockets`]).
//!
//! Only the layout just before this one is carried, and only a map whose
//! kind and sizes are what that layout pinned: its entries mean the same
//! here ([`FROM`] says what changed). Counters start again from zero (a
//! counter reset, as Prometheus handles). From any older layout, or where
//! a map is not as expected, the new maps start empty as before, and the
//! log says why.

use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, LpmTrie, MapData, MapError, lpm_trie::Key};
use overlay_common::{Config, Peer, PodPort, Route, SocketKey, map_names};

use crate::{
    bpffs::{MAP_LAYOUT_VERSION, PinLayout},
    maps::{DatapathMaps, MapsError, open_pinned},
};

/// The layout carried from: v9, whose `CONFIG` value lacked this one's
/// last field (`pod_bridge_ip`, see [`config_from_previous`]), and whose
/// `COUNTERS`, `PEERS`, `ROUTES`, `POD_PORTS` and `KERNEL_SOCKETS` are
/// this one's. A new layout version must say what changed since this one
/// (`carries_from_the_layout_just_before`).
pub const FROM: u32 = 9;

/// The previous layout's `CONFIG` value: this layout's [`Config`] up to,
/// not with, its last field.
pub type PreviousConfig = [u8; PREVIOUS_CONFIG_LEN];
const PREVIOUS_CONFIG_LEN: usize = std::mem::offset_of!(Config, pod_bridge_ip);
const _: () = assert!(PREVIOUS_CONFIG_LEN == 64 && size_of::<Config>() == PREVIOUS_CONFIG_LEN + 4);

/// The previous layout's `CONFIG` as this layout's: field for field, with
/// `pod_bridge_ip` zero (the fast path then forwards as the previous
/// programs did) until the first reconcile writes it.
pub fn config_from_previous(old: &PreviousConfig) -> Config {
    let mut config = Config::default();
    // SAFETY: `Config` is `#[repr(C)]` plain data without implicit padding
    // (overlay-common's tests), and its first bytes are the previous
    // layout's CONFIG, field for field.
    unsafe { std::ptr::copy_nonoverlapping(old.as_ptr(), (&raw mut config).cast::<u8>(), PREVIOUS_CONFIG_LEN) };
    config
}

/// This layout's `CONFIG` as the previous layout held it (for tests that
/// pin a previous agent's maps).
pub fn config_to_previous(config: &Config) -> PreviousConfig {
    let mut old = [0u8; PREVIOUS_CONFIG_LEN];
    // SAFETY: as in `config_from_previous`, the other way.
    unsafe { std::ptr::copy_nonoverlapping((&raw const *config).cast::<u8>(), old.as_mut_ptr(), PREVIOUS_CONFIG_LEN) };
    old
}

#[derive(Debug, thiserror::Error)]
pub enum CarryError {
    #[error("opening the previous layout's map {path}")]
    OpenOld {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("reading the previous layout's map {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("opening this layout's map {path}")]
    OpenNew {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("writing this layout's map {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("the previous layout's {dir} has no {missing}: a layout left half removed, nothing of it is carried")]
    Incomplete { dir: PathBuf, missing: &'static str },
}

/// What was carried, for the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Carried {
    pub config: bool,
    pub peers: usize,
    pub routes: usize,
    pub pod_ports: usize,
    pub kernel_sockets: usize,
}

/// The previous layout's `KERNEL_SOCKETS`, held open after the carry.
///
/// The old programs on the pods' veths and the pod bridge go on recording
/// the kernel's sockets there until the new programs replace them (the
/// fast path's first sync, after the underlay's attachment has removed
/// the old pins): a socket first seen in between would be missing from the
/// new map, and its replies, left out of conntrack, could come in fast.
/// [`LateSockets::carry`] copies those once the new programs run.
#[derive(Debug)]
pub struct LateSockets {
    old: HashMap<MapData, SocketKey, u8>,
    root: PathBuf,
}

impl LateSockets {
    /// Adds to this layout's `KERNEL_SOCKETS` the sockets the previous
    /// layout's map holds and it lacks; returns how many.
    pub fn carry(self) -> Result<usize, CarryError> {
        let path = PinLayout::new(&self.root).map(map_names::KERNEL_SOCKETS);
        let mut new: HashMap<MapData, SocketKey, u8> =
            open_pinned(&path).map_err(|source| CarryError::OpenNew { path: path.clone(), source })?;
        // The old map's pins are gone by now: named for what it was.
        let old_path = self.root.join(format!("v{FROM}")).join(map_names::KERNEL_SOCKETS);
        let old: Vec<SocketKey> =
            self.old.keys().collect::<Result<_, _>>().map_err(|source| CarryError::Read { path: old_path, source })?;
        let mut added = 0;
        for socket in old {
            if new.get(&socket, 0).is_err() {
                new.insert(socket, 0, 0).map_err(|source| CarryError::Write { path: path.clone(), source })?;
                added += 1;
            }
        }
        Ok(added)
    }
}

/// The previous layout's state, read whole before anything is written.
struct OldState {
    config: Option<Config>,
    peers: Vec<([u8; 4], Peer)>,
    routes: Vec<(u32, [u8; 4], Route)>,
    pod_ports: Vec<([u8; 6], PodPort)>,
    kernel_sockets: Vec<SocketKey>,
    /// `KERNEL_SOCKETS` itself, for [`LateSockets`].
    sockets_map: HashMap<MapData, SocketKey, u8>,
}

/// Carries the state pinned under `<root>/v<FROM>/` into this layout's
/// maps under `root`, which the caller has just created (empty). Returns
/// `None` where there is nothing to carry (no such directory: a first
/// start, or an upgrade from an older layout); an error where that
/// directory lacks a map or holds one not as v9 pinned it. With what was
/// carried comes the old `KERNEL_SOCKETS`, to carry again what the old
/// programs record until the new ones replace them ([`LateSockets`]).
pub fn previous_layout(root: &Path) -> Result<Option<(Carried, LateSockets)>, CarryError> {
    let old_dir = root.join(format!("v{FROM}"));
    if FROM + 1 != MAP_LAYOUT_VERSION || !old_dir.exists() {
        return Ok(None);
    }
    if let Some(missing) = map_names::ALL.iter().find(|name| !old_dir.join(name).exists()) {
        return Err(CarryError::Incomplete { dir: old_dir, missing });
    }
    let old = read_old(&old_dir)?;
    let carried = write_new(root, &old)?;
    Ok(Some((carried, LateSockets { old: old.sockets_map, root: root.to_owned() })))
}

fn read_old(dir: &Path) -> Result<OldState, CarryError> {
    let path = |name: &str| dir.join(name);
    // aya checks each map's kind and key and value sizes on opening: a
    // map not as v9 pinned it is refused here, before anything is written.
    let open_err = |name: &str| {
        let path = path(name);
        move |source| CarryError::OpenOld { path, source }
    };
    let read_err = |name: &str| {
        let path = path(name);
        move |source| CarryError::Read { path, source }
    };
    let config: Array<MapData, PreviousConfig> = open_pinned(&path(map_names::CONFIG)).map_err(open_err(map_names::CONFIG))?;
    let peers: HashMap<MapData, [u8; 4], Peer> = open_pinned(&path(map_names::PEERS)).map_err(open_err(map_names::PEERS))?;
    let routes: LpmTrie<MapData, [u8; 4], Route> = open_pinned(&path(map_names::ROUTES)).map_err(open_err(map_names::ROUTES))?;
    let pod_ports: HashMap<MapData, [u8; 6], PodPort> = open_pinned(&path(map_names::POD_PORTS)).map_err(open_err(map_names::POD_PORTS))?;
    let sockets: HashMap<MapData, SocketKey, u8> =
        open_pinned(&path(map_names::KERNEL_SOCKETS)).map_err(open_err(map_names::KERNEL_SOCKETS))?;

    let config = config_from_previous(&config.get(&0, 0).map_err(read_err(map_names::CONFIG))?);
    Ok(OldState {
        config: (config.enabled != 0).then_some(config),
        peers: peers.iter().collect::<Result<_, _>>().map_err(read_err(map_names::PEERS))?,
        routes: routes
            .iter()
            .map(|entry| entry.map(|(key, route)| (key.prefix_len(), key.data(), route)))
            .collect::<Result<_, _>>()
            .map_err(read_err(map_names::ROUTES))?,
        pod_ports: pod_ports.iter().collect::<Result<_, _>>().map_err(read_err(map_names::POD_PORTS))?,
        kernel_sockets: sockets.keys().collect::<Result<_, _>>().map_err(read_err(map_names::KERNEL_SOCKETS))?,
        sockets_map: sockets,
    })
}

fn write_new(root: &Path, old: &OldState) -> Result<Carried, CarryError> {
    let layout = PinLayout::new(root);
    let write_err = |name: &str| {
        let path = layout.map(name);
        move |source| CarryError::Write { path, source }
    };
    let mut maps = DatapathMaps::open(root).map_err(|MapsError::Open { path, source }| CarryError::OpenNew { path, source })?;
    let sockets_path = layout.map(map_names::KERNEL_SOCKETS);
    let mut sockets: HashMap<MapData, SocketKey, u8> =
        open_pinned(&sockets_path).map_err(|source| CarryError::OpenNew { path: sockets_path.clone(), source })?;
    for (key, peer) in &old.peers {
        maps.peers.insert(key, peer, 0).map_err(write_err(map_names::PEERS))?;
    }
    for (prefix_len, data, route) in &old.routes {
        maps.routes.insert(&Key::new(*prefix_len, *data), route, 0).map_err(write_err(map_names::ROUTES))?;
    }
    for (mac, port) in &old.pod_ports {
        maps.pod_ports.insert(mac, port, 0).map_err(write_err(map_names::POD_PORTS))?;
    }
    for socket in &old.kernel_sockets {
        sockets.insert(socket, 0, 0).map_err(write_err(map_names::KERNEL_SOCKETS))?;
    }
    // Last: a configured CONFIG is what makes the programs act on the rest.
    if let Some(old_config) = &old.config {
        maps.config.set(0, old_config, 0).map_err(write_err(map_names::CONFIG))?;
    }
    Ok(Carried {
        config: old.config.is_some(),
        peers: old.peers.len(),
        routes: old.routes.len(),
        pod_ports: old.pod_ports.len(),
        kernel_sockets: old.kernel_sockets.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The previous layout's CONFIG keeps every field it had, and gets the
    /// new one as zero.
    #[test]
    fn a_previous_config_is_carried_field_for_field() {
        let config = Config {
            enabled: 1,
            vni: 7,
            node_ip: [192, 168, 77, 12],
            vxlan_port: 8472,
            xdp_decap: 1,
            vtep_mac: [2, 3, 4, 5, 6, 7],
            underlay_ifindex: 3,
            inner_mtu: 1450,
            pod_cidr: [10, 244, 2, 0],
            pod_prefix_len: 24,
            pod_bridge_ifindex: 9,
            underlay_mtu: 1500,
            pod_bridge_mac: [8, 9, 10, 11, 12, 13],
            seg_ifindex: 11,
            gro_ifindex: 12,
            pod_bridge_ip: [10, 244, 2, 1],
            ..Config::default()
        };
        let old = config_to_previous(&config);
        assert_eq!(old.len(), 64, "v9's CONFIG value");
        assert_eq!(config_from_previous(&old), Config { pod_bridge_ip: [0; 4], ..config });
    }

    /// A layout bump must look at what this module carries: from the
    /// layout just before, whose differences [`FROM`] describes.
    #[test]
    fn carries_from_the_layout_just_before() {
        assert_eq!(
            FROM + 1,
            MAP_LAYOUT_VERSION,
            "MAP_LAYOUT_VERSION moved: say in carry.rs what changed since v{FROM} and carry from v{}",
            MAP_LAYOUT_VERSION - 1
        );
    }
}
