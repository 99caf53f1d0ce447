//! Typed handles on the pinned maps, opened from their pins so the agent
//! and `inspect` (which runs while the agent is stopped) read them alike.

use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray};
use overlay_common::{Config, Counters, Peer, Route, map_names};

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("opening pinned map {path} (is the agent's --bpffs-root right, and has it run once?)")]
    Open {
        path: PathBuf,
        #[source]
        source: MapError,
    },
}

pub struct DatapathMaps {
    pub config: Array<MapData, Config>,
    pub peers: HashMap<MapData, [u8; 4], Peer>,
    pub routes: LpmTrie<MapData, [u8; 4], Route>,
    pub counters: PerCpuArray<MapData, Counters>,
}

impl DatapathMaps {
    /// Opens the four maps pinned under `root`.
    pub fn open(root: &Path) -> Result<Self, MapsError> {
        fn open<T: TryFrom<Map, Error = MapError>>(root: &Path, name: &str) -> Result<T, MapsError> {
            let path = root.join(name);
            let err = |source| MapsError::Open { path: path.clone(), source };
            let data = MapData::from_pin(&path).map_err(err)?;
            T::try_from(Map::from_map_data(data).map_err(err)?).map_err(err)
        }
        Ok(Self {
            config: open(root, map_names::CONFIG)?,
            peers: open(root, map_names::PEERS)?,
            routes: open(root, map_names::ROUTES)?,
            counters: open(root, map_names::COUNTERS)?,
        })
    }

    /// The counters summed over all CPUs.
    pub fn counters_total(&self) -> Result<Counters, MapError> {
        let per_cpu = self.counters.get(&0, 0)?;
        let mut t = Counters::default();
        for c in per_cpu.iter() {
            let Counters {
                encap_packets, encap_bytes, direct_packets, decap_packets, decap_bytes, pass_packets,
                icmp_frag_needed, drop_truncated, drop_bad_flags, drop_wrong_vni, drop_unknown_source,
                drop_spoofed_inner, drop_bad_outer, drop_bad_inner, mismatched_port, drop_helper_error,
            } = *c;
            t.encap_packets += encap_packets;
            t.encap_bytes += encap_bytes;
            t.direct_packets += direct_packets;
            t.decap_packets += decap_packets;
            t.decap_bytes += decap_bytes;
            t.pass_packets += pass_packets;
            t.icmp_frag_needed += icmp_frag_needed;
            t.drop_truncated += drop_truncated;
            t.drop_bad_flags += drop_bad_flags;
            t.drop_wrong_vni += drop_wrong_vni;
            t.drop_unknown_source += drop_unknown_source;
            t.drop_spoofed_inner += drop_spoofed_inner;
            t.drop_bad_outer += drop_bad_outer;
            t.drop_bad_inner += drop_bad_inner;
            t.mismatched_port += mismatched_port;
            t.drop_helper_error += drop_helper_error;
        }
        Ok(t)
    }
}
