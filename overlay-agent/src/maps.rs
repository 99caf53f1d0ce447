//! Typed handles on the pinned maps, opened from their pins so the agent
//! and `inspect` (which runs while the agent is stopped) read them alike.

use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray};
use overlay_common::{COUNTER_SLOTS, Config, Peer, PodPort, Route, Tally, Totals, map_names};

use crate::bpffs::PinLayout;

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
    /// Where they are pinned.
    layout: PinLayout,
    pub config: Array<MapData, Config>,
    pub peers: HashMap<MapData, [u8; 4], Peer>,
    pub routes: LpmTrie<MapData, [u8; 4], Route>,
    pub counters: PerCpuArray<MapData, Tally>,
    pub pod_ports: HashMap<MapData, [u8; 6], PodPort>,
    /// How many entries `PEERS` and `ROUTES` hold, as the kernel created
    /// them: what a full map's message names.
    pub peers_capacity: u32,
    pub routes_capacity: u32,
}

impl DatapathMaps {
    /// Opens the maps pinned under `root`.
    pub fn open(root: &Path) -> Result<Self, MapsError> {
        let layout = &PinLayout::new(root);
        /// The map and its capacity.
        fn open_sized<T: TryFrom<Map, Error = MapError>>(layout: &PinLayout, name: &str) -> Result<(T, u32), MapsError> {
            let path = layout.map(name);
            let err = |source| MapsError::Open { path: path.clone(), source };
            let data = MapData::from_pin(&path).map_err(err)?;
            let capacity = data.info().map_err(err)?.max_entries();
            Ok((T::try_from(Map::from_map_data(data).map_err(err)?).map_err(err)?, capacity))
        }
        fn open<T: TryFrom<Map, Error = MapError>>(layout: &PinLayout, name: &str) -> Result<T, MapsError> {
            open_sized(layout, name).map(|(map, _)| map)
        }
        let (peers, peers_capacity) = open_sized(layout, map_names::PEERS)?;
        let (routes, routes_capacity) = open_sized(layout, map_names::ROUTES)?;
        Ok(Self {
            layout: layout.clone(),
            config: open(layout, map_names::CONFIG)?,
            peers,
            routes,
            counters: open(layout, map_names::COUNTERS)?,
            pod_ports: open(layout, map_names::POD_PORTS)?,
            peers_capacity,
            routes_capacity,
        })
    }

    /// The pod CIDRs in the `ROUTES` map pinned under `root`: the
    /// destinations of the kernel routes that agent installed.
    pub fn route_destinations(root: &Path) -> Result<Vec<ipnetwork::Ipv4Network>, MapsError> {
        route_destinations_at(&PinLayout::new(root).map(map_names::ROUTES))
    }

    /// Where they are pinned.
    pub fn layout(&self) -> &PinLayout {
        &self.layout
    }

    /// The pod CIDRs in the `ROUTES` maps of the older map layouts pinned
    /// under `root` (an upgraded agent's first start, before attaching
    /// removes them; `cleanup` of a root an upgrade never took over): the
    /// destinations of the kernel routes the older agents installed. A
    /// layout whose `ROUTES` has another shape tells nothing.
    pub fn older_layouts_route_destinations(root: &Path) -> Result<Vec<ipnetwork::Ipv4Network>, MapsError> {
        let mut destinations = Vec::new();
        for dir in PinLayout::new(root).stale_map_dirs() {
            let path = dir.join(map_names::ROUTES);
            if !path.exists() {
                continue;
            }
            match route_destinations_at(&path) {
                Ok(found) => destinations.extend(found),
                Err(MapsError::Open { source: MapError::InvalidKeySize { .. } | MapError::InvalidValueSize { .. } | MapError::InvalidMapType { .. }, .. }) => {}
                Err(err) => return Err(err),
            }
        }
        Ok(destinations)
    }

    /// Every counter and drop reason, summed over all CPUs.
    pub fn counters_total(&self) -> Result<Totals, MapError> {
        let mut totals = Totals::default();
        for slot in 0..COUNTER_SLOTS {
            for tally in self.counters.get(&(slot as u32), 0)?.iter() {
                totals.add(slot, tally);
            }
        }
        Ok(totals)
    }
}

/// The map pinned at `path`, as `T` (aya checks its kind and its key and
/// value sizes).
pub fn open_pinned<T: TryFrom<Map, Error = MapError>>(path: &Path) -> Result<T, MapError> {
    T::try_from(Map::from_map_data(MapData::from_pin(path)?)?)
}

/// The keys of the `ROUTES` map pinned at `path`, as CIDRs.
fn route_destinations_at(path: &Path) -> Result<Vec<ipnetwork::Ipv4Network>, MapsError> {
    let routes: LpmTrie<MapData, [u8; 4], Route> = open_pinned(path).map_err(|source| MapsError::Open { path: path.to_owned(), source })?;
    Ok(routes
        .keys()
        .filter_map(Result::ok)
        .filter_map(|key| ipnetwork::Ipv4Network::new(key.data().into(), key.prefix_len() as u8).ok())
        .collect())
}
