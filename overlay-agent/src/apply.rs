//! Applying a [`Desired`] state to the maps and the kernel's routes.
//!
//! Order matters so the datapath is never half-programmed: a new peer gets
//! its `PEERS` entry (we accept its traffic), then its `ROUTES` entry (we
//! encapsulate toward it), then its kernel route (traffic starts flowing);
//! removal runs the other way round. A peer whose programming fails (a
//! full map: more nodes than the datapath holds; a route the kernel
//! refused) is rolled back and reported; the others go on. Such peers are
//! tried again with every full apply, and stay listed in
//! [`Applied::not_programmed`] until they are in.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use aya::maps::{MapError, lpm_trie::Key};
use ipnetwork::Ipv4Network;
use overlay_common::{Config, Peer, Route};

use crate::{
    report::WithCauses as _,
    desired::{Change, Desired, PeerState, diff},
    maps::DatapathMaps,
    routes::{self, RouteError},
};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("writing map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error(
        "peer {cidr} via {node_ip} is not programmed, so this node does not reach it: map {map} is full ({capacity} \
         entries, one per remote node); the cluster has more nodes than the datapath holds. Remove nodes, or run a \
         build whose overlay_common::MAX_PEERS is larger"
    )]
    MapFull {
        cidr: Ipv4Network,
        node_ip: Ipv4Addr,
        map: &'static str,
        capacity: u32,
    },
    #[error("peer {cidr} via {node_ip}: writing map {map}")]
    PeerMap {
        cidr: Ipv4Network,
        node_ip: Ipv4Addr,
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("peer {cidr} via {node_ip}")]
    Route {
        cidr: Ipv4Network,
        node_ip: Ipv4Addr,
        #[source]
        source: RouteError,
    },
    #[error(transparent)]
    Routes(#[from] RouteError),
    #[error("reading which routes the previous map layout recorded")]
    Record {
        #[source]
        source: crate::maps::MapsError,
    },
}

/// What one [`Applier::apply`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub added_or_updated: usize,
    pub removed: usize,
    pub config_changed: bool,
    /// Every peer of the desired state that is not in the datapath (rolled
    /// back, or never written), whether it failed in this apply or an
    /// earlier one and has not been written since, by pod CIDR.
    pub not_programmed: Vec<PeerFailure>,
    /// Time spent on the diff and the maps, and on the kernel routes.
    pub maps_time: Duration,
    pub routes_time: Duration,
}

/// Why a peer is not in the datapath.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FailureKind {
    /// `PEERS` or `ROUTES` is full.
    MapFull,
    /// Another error writing a map.
    MapWrite,
    /// The kernel refused the route.
    RouteRefused,
}

impl FailureKind {
    pub const ALL: [Self; 3] = [Self::MapFull, Self::MapWrite, Self::RouteRefused];

    /// The `reason` label of `overlay_peers_not_programmed`.
    pub const fn label(self) -> &'static str {
        match self {
            Self::MapFull => "map_full",
            Self::MapWrite => "map_write",
            Self::RouteRefused => "route_refused",
        }
    }
}

/// A peer of the desired state the datapath does not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerFailure {
    pub peer: PeerState,
    pub kind: FailureKind,
    /// What went wrong and what to do, with its causes.
    pub message: String,
}

pub struct Applier {
    maps: DatapathMaps,
    iface: String,
    config: Option<Config>,
    applied: BTreeMap<Ipv4Network, PeerState>,
    /// Desired peers not in `applied` because writing them failed.
    not_programmed: BTreeMap<Ipv4Network, PeerFailure>,
    /// The preferred source the kernel routes were last written with
    /// ([`addressing`]); `None` until the first apply, and after
    /// [`Self::routes_missing`] found one gone: the apply then rewrites
    /// them all (routes from an earlier run, or an older agent, may carry
    /// another source).
    route_source: Option<Option<Ipv4Addr>>,
    /// The nexthop objects our routes go through, and which route uses which.
    nexthops: routes::Nexthops,
    /// Our routes that only older map layouts record, removed once the
    /// programs are attached ([`Self::remove_older_layouts_routes`]).
    older_layouts_routes: Vec<Ipv4Network>,
}

/// How this node's addresses serve the datapath and its routes, from one
/// look at them (every apply asks): CONFIG as the datapath needs it, and
/// the preferred source of our routes.
///
/// When the advertised address is on the node (a secondary one, say), it
/// is both CONFIG's `node_ip`, the tunnel's own address (the outer source,
/// and the only outer destination decapsulated), and the routes' source:
/// host traffic to remote pods leaves with the address peers know us by,
/// and over VXLAN they accept a node's own traffic only from that address,
/// or from its pods'.
///
/// One advertised from behind a NAT (`--public-ip`, `public-ip-overwrite`)
/// is not on the node. The NAT turns what peers send to it into the
/// underlay's own address, and what the node sends from that address into
/// the advertised one, so the underlay's (first) address is `node_ip`, as
/// flannel's vxlan device has the interface's address as its `local`.
/// That address would reach peers as an inner source they do not know us
/// by (`spoofed_inner`), so the routes' source is an address of this node
/// in its pod CIDR (the pod bridge's), as flannel's routes through
/// `flannel.1` leave with that device's address; without one, the kernel
/// chooses. What is published stays the advertised address (the desired
/// state's).
fn addressing(desired: &Config, iface: &str) -> (Config, Option<Ipv4Addr>) {
    let advertised = Ipv4Addr::from(desired.node_ip);
    let local = crate::iface::local_ipv4_addresses().unwrap_or_default();
    if local.contains(&advertised) {
        return (*desired, Some(advertised));
    }
    let config = match crate::iface::ipv4_addresses(iface).ok().and_then(|own| own.first().copied()) {
        Some(own) => Config { node_ip: own.octets(), ..*desired },
        None => *desired,
    };
    let pod_cidr = u8::try_from(desired.pod_prefix_len).ok().and_then(|len| Ipv4Network::new(desired.pod_cidr.into(), len).ok());
    let source = pod_cidr.and_then(|cidr| local.into_iter().find(|address| cidr.contains(*address)));
    (config, source)
}

impl Applier {
    /// Takes over the maps as they are pinned (possibly from an earlier run)
    /// and finds the kernel routes this root's agent installed that no
    /// map entry accounts for any more, for
    /// [`Self::remove_older_layouts_routes`] to remove.
    ///
    /// The routes' protocol number alone does not make a route ours:
    /// another agent with another pin root in this namespace (a lab, a
    /// test) or another tool may use it too. Only a route whose destination
    /// is recorded in this root's `ROUTES` maps is ours: the current
    /// layout's entries are kept (`applied`), and the older layouts' (an
    /// upgrade) name the routes to remove, as `cleanup` does.
    pub fn new(mut maps: DatapathMaps, iface: &str) -> Result<Self, ApplyError> {
        let mut applied = BTreeMap::new();
        for entry in maps.routes.iter() {
            let (key, route) = entry.map_err(|source| ApplyError::Map { map: "ROUTES", source })?;
            let Ok(cidr) = Ipv4Network::new(key.data().into(), key.prefix_len() as u8) else {
                continue;
            };
            let peer = PeerState {
                pod_cidr: cidr,
                node_ip: route.node_ip.into(),
                vtep_mac: route.vtep_mac,
                mode: route.mode,
                reason: route.reason,
                next_hop: route.next_hop.into(),
            };
            applied.insert(cidr, peer);
        }
        forget_orphaned_peers(&mut maps, &applied)?;
        let recorded: BTreeSet<Ipv4Network> = DatapathMaps::older_layouts_route_destinations(maps.layout().root())
            .map_err(|source| ApplyError::Record { source })?
            .into_iter()
            .filter(|c| !applied.contains_key(c))
            .collect();
        let older_layouts_routes: Vec<Ipv4Network> = if recorded.is_empty() {
            Vec::new()
        } else {
            routes::with_our_protocol()?.into_iter().filter(|c| recorded.contains(c)).collect()
        };
        // The routes of the current layout's entries, and the nexthops they
        // go through, stay as they are until the first apply replaces them.
        let nexthops = routes::Nexthops::adopt(|c| applied.contains_key(c))?;
        let config = maps.config.get(&0, 0).ok().filter(|c| c.enabled != 0);
        Ok(Self { maps, iface: iface.to_owned(), config, applied, route_source: None, not_programmed: BTreeMap::new(), nexthops, older_layouts_routes })
    }

    /// Removes the routes that only older map layouts record (see
    /// [`Self::new`]), once this agent's programs are attached: until then
    /// they are the running datapath's, and a start that fails (XDP taken,
    /// a verifier that refuses the new programs) leaves them serving. Then
    /// the nexthops of ours that no route leads to (a crash before their
    /// route, routes deleted while we were down); not fatal, they only cost
    /// kernel memory, and the next start tries again.
    pub fn remove_older_layouts_routes(&mut self) -> Result<(), ApplyError> {
        let stale = std::mem::take(&mut self.older_layouts_routes);
        if let Some((cidr, reason)) = routes::remove_all(&mut self.nexthops, &stale)?.into_iter().next() {
            return Err(ApplyError::Routes(RouteError::Refused { request: format!("route del {cidr}"), reason }));
        }
        match routes::remove_orphaned_nexthops() {
            Ok(removed) if removed.is_empty() => {}
            Ok(removed) => tracing::info!(count = removed.len(), ids = ?removed, "removed nexthops of ours that no route used (left by a crash, or by routes deleted while the agent was down)"),
            Err(err) => tracing::warn!(error = %crate::report::Chain(&err), "looking for nexthops of ours that no route uses; leaving them"),
        }
        Ok(())
    }

    /// Whether the kernel lost a route of a peer this agent applied, and
    /// if so makes the next [`Self::apply`] write every route again. The
    /// kernel deletes routes without a notification when their preferred
    /// source address goes, even when it comes back before the agent hears
    /// of either, so only a look at the routes themselves tells.
    pub fn routes_missing(&mut self) -> Result<bool, RouteError> {
        if self.applied.is_empty() {
            return Ok(false);
        }
        let present: BTreeSet<Ipv4Network> = routes::with_our_protocol()?.into_iter().collect();
        let missing = self.applied.keys().any(|cidr| !present.contains(cidr));
        if missing {
            // A route source the next apply does not recognise makes it
            // write every route again.
            self.route_source = None;
        }
        Ok(missing)
    }

    pub fn maps(&self) -> &DatapathMaps {
        &self.maps
    }

    /// For the maps this stage does not own (`POD_PORTS`).
    pub fn maps_mut(&mut self) -> &mut DatapathMaps {
        &mut self.maps
    }

    /// The underlay interface the routes use.
    pub fn iface(&self) -> &str {
        &self.iface
    }

    /// Brings maps and routes to `desired`.
    pub fn apply(&mut self, desired: &Desired) -> Result<Applied, ApplyError> {
        let start = Instant::now();
        let mut report = Applied::default();
        let mtu_changed = self.config.map(|c| c.inner_mtu) != Some(desired.inner_mtu);
        let (config, source) = addressing(&desired.config, &self.iface);
        let source_changed = self.route_source != Some(source);
        // Written between the peers' map entries and their routes (see
        // `upsert_peers`).
        let new_config = (self.config != Some(config)).then_some(config);
        report.config_changed = new_config.is_some();
        let mut changes = diff(&self.applied, &desired.peers);
        if mtu_changed || source_changed {
            // Every route carries the MTU and the source: reinstall the
            // unchanged ones too.
            changes.extend(
                desired
                    .peers
                    .values()
                    .filter(|p| self.applied.get(&p.pod_cidr) == Some(p))
                    .map(|p| Change::Upsert(*p)),
            );
        }
        let (removals, upserts): (Vec<PeerState>, Vec<PeerState>) = changes.into_iter().fold(
            (Vec::new(), Vec::new()),
            |(mut removals, mut upserts), change| {
                match change {
                    Change::Remove(peer) => removals.push(peer),
                    Change::Upsert(peer) => upserts.push(peer),
                }
                (removals, upserts)
            },
        );
        report.removed = self.remove_peers(&removals, &mut report.routes_time)?;
        let claimed: BTreeSet<Ipv4Addr> = desired.peers.values().map(|p| p.node_ip).collect();
        let failed = self.upsert_peers(&upserts, &|addr| claimed.contains(&addr), new_config, desired.inner_mtu, source, &mut report.routes_time)?;
        self.route_source = Some(source);
        // Failures of peers no longer desired, or desired as they are, are moot.
        let applied = &self.applied;
        self.not_programmed.retain(|cidr, _| desired.peers.get(cidr).is_some_and(|p| applied.get(cidr) != Some(p)));
        report.maps_time = start.elapsed().saturating_sub(report.routes_time);
        report.added_or_updated = upserts.len() - failed;
        report.not_programmed = self.not_programmed.values().cloned().collect();
        Ok(report)
    }

    /// Brings only the peers under `touched` to `desired`: what one node's
    /// event changed, in O(touched) instead of a walk over every peer. A
    /// change of CONFIG (the MTU is in every route) takes [`Self::apply`].
    pub fn apply_touched(&mut self, desired: &Desired, touched: &[Ipv4Network]) -> Result<Applied, ApplyError> {
        let (config, source) = addressing(&desired.config, &self.iface);
        if self.config != Some(config) || self.route_source != Some(source) {
            return self.apply(desired);
        }
        let start = Instant::now();
        let mut report = Applied::default();
        let mut removals = Vec::new();
        let mut upserts = Vec::new();
        for cidr in touched {
            match (self.applied.get(cidr), desired.peers.get(cidr)) {
                (Some(old), None) => removals.push(*old),
                (old, Some(new)) if old != Some(new) => upserts.push(*new),
                _ => {
                    // A peer that had failed, now gone or back as it is.
                    self.not_programmed.remove(cidr);
                }
            }
        }
        report.removed = self.remove_peers(&removals, &mut report.routes_time)?;
        // Asked only when a CIDR moves to another address: one walk then.
        let claimed = |addr: Ipv4Addr| desired.peers.values().any(|p| p.node_ip == addr);
        let failed = self.upsert_peers(&upserts, &claimed, None, desired.inner_mtu, source, &mut report.routes_time)?;
        report.maps_time = start.elapsed().saturating_sub(report.routes_time);
        report.added_or_updated = upserts.len() - failed;
        report.not_programmed = self.not_programmed.values().cloned().collect();
        Ok(report)
    }

    /// Removes peers: kernel routes first (traffic stops being sent), then
    /// `ROUTES` and `PEERS` (we stop encapsulating and accepting).
    fn remove_peers(&mut self, peers: &[PeerState], routes_time: &mut Duration) -> Result<usize, ApplyError> {
        let cidrs: Vec<Ipv4Network> = peers.iter().map(|p| p.pod_cidr).collect();
        let started = Instant::now();
        let failed = routes::remove_all(&mut self.nexthops, &cidrs)?;
        *routes_time += started.elapsed();
        if let Some((cidr, reason)) = failed.into_iter().next() {
            let peer = peers.iter().find(|p| p.pod_cidr == cidr).expect("failed CIDR is one of ours");
            return Err(ApplyError::Route {
                cidr,
                node_ip: peer.node_ip,
                source: RouteError::Refused { request: format!("route del {cidr}"), reason },
            });
        }
        for peer in peers {
            let key = Key::new(u32::from(peer.pod_cidr.prefix()), peer.pod_cidr.network().octets());
            ignore_missing(self.maps.routes.remove(&key)).map_err(|source| ApplyError::Map { map: "ROUTES", source })?;
            ignore_missing(self.maps.peers.remove(&peer.node_ip.octets()))
                .map_err(|source| ApplyError::Map { map: "PEERS", source })?;
            self.applied.remove(&peer.pod_cidr);
            self.not_programmed.remove(&peer.pod_cidr);
        }
        Ok(peers.len())
    }

    /// Adds or updates peers: `PEERS` (we accept their traffic), `ROUTES`
    /// (we encapsulate toward them), then `config` when it changes, then
    /// their kernel routes (traffic starts flowing). A peer whose map
    /// entries cannot be written (a full map) gets no route, and what was
    /// written for it is undone; a peer whose route the kernel refuses gets
    /// its map entries back as they were ([`Self::roll_back`]). The
    /// failures go to `self.not_programmed`;
    /// returns how many.
    ///
    /// CONFIG goes between: enabling the programs before `PEERS` holds a
    /// peer drops its tunnel traffic as `unknown_source` (at an agent's
    /// first start, migrating a flannel node under traffic, replies to its
    /// pods were lost so); a route that takes traffic before CONFIG
    /// enables the programs sends it unencapsulated.
    ///
    /// `claimed` holds the node address of every desired peer: an address
    /// a moved CIDR leaves behind may be another peer's new one in the
    /// same batch (B .12→.13 while C .13→.14), and must stay.
    fn upsert_peers(
        &mut self,
        peers: &[PeerState],
        claimed: &dyn Fn(Ipv4Addr) -> bool,
        config: Option<Config>,
        mtu: u32,
        source: Option<Ipv4Addr>,
        routes_time: &mut Duration,
    ) -> Result<usize, ApplyError> {
        let mut written = Vec::with_capacity(peers.len());
        let mut failures = 0;
        for peer in peers {
            match self.write_peer(peer, claimed) {
                Ok(()) => written.push(*peer),
                Err(error) => {
                    let kind = match error {
                        ApplyError::MapFull { .. } => FailureKind::MapFull,
                        _ => FailureKind::MapWrite,
                    };
                    self.fail(*peer, kind, &error);
                    failures += 1;
                }
            }
        }
        if let Some(config) = config {
            self.maps.config.set(0, config, 0).map_err(|source| ApplyError::Map { map: "CONFIG", source })?;
            self.config = Some(config);
        }
        let started = Instant::now();
        let refused = routes::replace_all(&mut self.nexthops, &written, &self.iface, mtu, source)?;
        *routes_time += started.elapsed();
        for peer in &written {
            if !refused.iter().any(|r| r.peer.pod_cidr == peer.pod_cidr) {
                self.applied.insert(peer.pod_cidr, *peer);
                self.not_programmed.remove(&peer.pod_cidr);
            }
        }
        for refusal in &refused {
            let peer = refusal.peer;
            self.roll_back(peer, refusal.ours_remains);
            let error = ApplyError::Route {
                cidr: peer.pod_cidr,
                node_ip: peer.node_ip,
                source: RouteError::Refused { request: format!("route replace {}", peer.pod_cidr), reason: refusal.reason.clone() },
            };
            self.fail(*peer, FailureKind::RouteRefused, &error);
            failures += 1;
        }
        Ok(failures)
    }

    /// Puts the map entries `wanted` was written over back to what the
    /// kernel's routes still carry, once the kernel refused its route
    /// (which then is as it was): an updated peer whose route of ours
    /// remains gets its old `ROUTES` and `PEERS` entries back; a new peer,
    /// or one whose route of ours is gone (another tool's took its place),
    /// leaves the maps and the applied state, and is written again once
    /// its route can be. Half of an update left in place would encapsulate
    /// toward the new node while the kernel routes toward the old one, and
    /// accept the new address's traffic with no route leading there. The
    /// other peers of the batch are in `applied` already, so an address one
    /// of them took stays theirs.
    fn roll_back(&mut self, wanted: &PeerState, ours_remains: bool) {
        let previous = self.applied.get(&wanted.pod_cidr).copied();
        if !ours_remains {
            self.applied.remove(&wanted.pod_cidr);
        }
        let _ = match previous.filter(|_| ours_remains) {
            Some(previous) => self.maps.routes.insert(&route_key(previous.pod_cidr), route_entry(&previous), 0),
            None => self.maps.routes.remove(&route_key(wanted.pod_cidr)),
        };
        let holder = |address: Ipv4Addr| self.applied.values().find(|p| p.node_ip == address).copied();
        let restore = [Some(wanted.node_ip), previous.map(|p| p.node_ip)];
        for address in restore.into_iter().flatten() {
            let _ = match holder(address) {
                Some(peer) => self.maps.peers.insert(address.octets(), peer_entry(&peer), 0),
                None => self.maps.peers.remove(&address.octets()),
            };
        }
    }

    fn fail(&mut self, peer: PeerState, kind: FailureKind, error: &ApplyError) {
        let message = error.to_string_with_causes();
        self.not_programmed.insert(peer.pod_cidr, PeerFailure { peer, kind, message });
    }

    /// Writes one peer's `PEERS` and `ROUTES` entries, or, when either
    /// write fails, leaves both maps as they were.
    fn write_peer(&mut self, peer: &PeerState, claimed: &dyn Fn(Ipv4Addr) -> bool) -> Result<(), ApplyError> {
        let (cidr, node_ip) = (peer.pod_cidr, peer.node_ip);
        let map_error = |map: &'static str, capacity: u32| {
            move |source: MapError| {
                if is_full(&source) {
                    ApplyError::MapFull { cidr, node_ip, map, capacity }
                } else {
                    ApplyError::PeerMap { cidr, node_ip, map, source }
                }
            }
        };
        // The CIDR moved to another node address that no peer takes over:
        // stop accepting the old one (first, so a full PEERS has room).
        let left_behind = self
            .applied
            .get(&cidr)
            .filter(|old| old.node_ip != node_ip && !claimed(old.node_ip))
            .map(|old| old.node_ip.octets())
            .and_then(|addr| Some((addr, self.maps.peers.get(&addr, 0).ok()?)));
        if let Some((addr, _)) = left_behind {
            let _ = self.maps.peers.remove(&addr);
        }
        let overwritten = self.maps.peers.get(&node_ip.octets(), 0).ok();
        let undo = |maps: &mut DatapathMaps| {
            match overwritten {
                Some(previous) => {
                    let _ = maps.peers.insert(node_ip.octets(), previous, 0);
                }
                None => {
                    let _ = maps.peers.remove(&node_ip.octets());
                }
            }
            if let Some((addr, entry)) = left_behind {
                let _ = maps.peers.insert(addr, entry, 0);
            }
        };
        if let Err(source) = self.maps.peers.insert(node_ip.octets(), peer_entry(peer), 0) {
            undo(&mut self.maps);
            return Err(map_error("PEERS", self.maps.peers_capacity)(source));
        }
        if let Err(source) = self.maps.routes.insert(&route_key(cidr), route_entry(peer), 0) {
            undo(&mut self.maps);
            return Err(map_error("ROUTES", self.maps.routes_capacity)(source));
        }
        Ok(())
    }
}

/// Whether a map write failed because the map holds as many entries as
/// it can: a hash map says `E2BIG`, an LPM trie `ENOSPC`.
fn is_full(error: &MapError) -> bool {
    match error {
        MapError::SyscallError(error) => matches!(error.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC)),
        _ => false,
    }
}

/// Makes `PEERS` match the adopted `ROUTES`: a crash between writing one
/// and the other (either order) leaves an entry accepting a node no route
/// accounts for, or a route whose node's traffic is refused. The state is
/// rebuilt from `ROUTES`, so `PEERS` follows it.
fn forget_orphaned_peers(maps: &mut DatapathMaps, applied: &BTreeMap<Ipv4Network, PeerState>) -> Result<(), ApplyError> {
    let map_err = |source| ApplyError::Map { map: "PEERS", source };
    let wanted: BTreeMap<[u8; 4], Peer> = applied
        .values()
        .map(|p| (p.node_ip.octets(), peer_entry(p)))
        .collect();
    let present: Vec<([u8; 4], Peer)> = maps.peers.iter().collect::<Result<_, _>>().map_err(map_err)?;
    for (addr, peer) in &present {
        if wanted.get(addr) != Some(peer) {
            ignore_missing(maps.peers.remove(addr)).map_err(map_err)?;
        }
    }
    for (addr, peer) in &wanted {
        if !present.iter().any(|(a, p)| a == addr && p == peer) {
            maps.peers.insert(addr, peer, 0).map_err(map_err)?;
        }
    }
    Ok(())
}

/// A peer's `PEERS` entry: the pod CIDR its node may source.
fn peer_entry(peer: &PeerState) -> Peer {
    Peer { pod_cidr: peer.pod_cidr.network().octets(), pod_prefix_len: u32::from(peer.pod_cidr.prefix()) }
}

/// A peer's `ROUTES` entry.
fn route_entry(peer: &PeerState) -> Route {
    Route {
        node_ip: peer.node_ip.octets(),
        vtep_mac: peer.vtep_mac,
        mode: peer.mode,
        reason: peer.reason,
        next_hop: peer.next_hop.octets(),
    }
}

fn route_key(cidr: Ipv4Network) -> Key<[u8; 4]> {
    Key::new(u32::from(cidr.prefix()), cidr.network().octets())
}

fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}
