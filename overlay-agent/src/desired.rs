//! Nodes → the state the datapath should hold, and the diff between two
//! such states. Pure functions: no kernel, no I/O.

use std::{
    borrow::Borrow,
    cmp::Ordering,
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
};

use ipnetwork::Ipv4Network;
use overlay_common::{
    Config, ROUTE_MODE_DIRECT, ROUTE_MODE_UNREACHABLE, ROUTE_MODE_VXLAN, ROUTE_REASON_BACKEND,
    ROUTE_REASON_GATEWAY, ROUTE_REASON_NO_ROUTE, ROUTE_REASON_ON_LINK, VXLAN_OVERHEAD,
};

use crate::node::NodeInfo;

/// How remote pod CIDRs are reached (flannel's `Backend.Type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// VXLAN to every peer, or with `direct_routing` only to peers that are
    /// not on-link.
    Vxlan,
    /// Plain forwarding to every peer; peers behind a router cannot be
    /// served.
    HostGw,
}

impl Backend {
    /// flannel's `backend-type` annotation value.
    pub fn flannel_name(self) -> &'static str {
        match self {
            Self::Vxlan => "vxlan",
            Self::HostGw => "host-gw",
        }
    }
}

/// How the kernel reaches a peer's underlay address, as `ip route get`
/// answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum UnderlayPath {
    /// Directly on the underlay interface's segment.
    OnLink,
    /// Through this gateway.
    Gateway(Ipv4Addr),
    /// No route, or only through another interface.
    NoRoute,
}

/// The kernel's path to each node address asked about.
pub type Paths = HashMap<Ipv4Addr, UnderlayPath>;

/// This node's settings, from the command line and the interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalSettings {
    pub node_name: String,
    pub backend: Backend,
    /// flannel's `DirectRouting`: on-link peers are reached without VXLAN.
    pub direct_routing: bool,
    pub vni: u32,
    pub vxlan_port: u16,
    pub underlay_ifindex: u32,
    pub underlay_mtu: u32,
    /// The pod bridge's index while the fast path is attached to it, else 0.
    pub pod_bridge_ifindex: u32,
    /// The pod bridge's MAC while the fast path is attached to it.
    pub pod_bridge_mac: [u8; 6],
    /// The pod bridge's IPv4 addresses while the fast path is attached to
    /// it: the one in our pod CIDR becomes
    /// [`overlay_common::Config::pod_bridge_ip`].
    pub pod_bridge_addresses: Vec<Ipv4Addr>,
    /// Whether XDP is the decapsulation hook, in front of TC ingress (see
    /// [`overlay_common::Config::xdp_decap`]).
    pub xdp_decap: bool,
    /// The segmentation device's sending end (see
    /// [`overlay_common::Config::seg_ifindex`]), else 0.
    pub seg_ifindex: u32,
    /// The GRO device's sending end (see
    /// [`overlay_common::Config::gro_ifindex`]), else 0.
    pub gro_ifindex: u32,
    /// `--public-ip`, overriding what our own Node says.
    pub public_ip: Option<Ipv4Addr>,
    /// The underlay interface's first address, where our Node's InternalIP
    /// is another interface's address of this host (a management NIC,
    /// with `--iface` naming the data network): what flanneld advertises
    /// (its `--iface` address), so what a migrating cluster's peers know
    /// us by. Kept up to date by the reconciler; `None` otherwise.
    pub iface_address: Option<Ipv4Addr>,
    /// The cluster's pod network (net-conf.json `Network`), when known:
    /// pod CIDRs outside it are refused.
    pub network: Option<Ipv4Network>,
}

/// One remote node as programmed into the datapath.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PeerState {
    pub pod_cidr: Ipv4Network,
    pub node_ip: Ipv4Addr,
    pub vtep_mac: [u8; 6],
    /// One of `ROUTE_MODE_*`.
    pub mode: u8,
    /// One of `ROUTE_REASON_*`.
    pub reason: u8,
    /// The kernel route's next hop: the node when on-link, else the gateway.
    pub next_hop: Ipv4Addr,
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

/// A node that cannot be served as asked, and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, thiserror::Error)]
#[error("node {node}: {reason}")]
pub struct Rejected {
    pub node: String,
    pub kind: RejectKind,
    pub reason: String,
}

/// Why a node was left out (or, for host-gw, routed `unreachable`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RejectKind {
    NotSubnetManaged,
    OutsideNetwork,
    OtherBackend,
    OtherVni,
    OverlappingCidr,
    DuplicateAddress,
    NotOnLink,
    CidrHoldsNodeAddress,
    AddressInPodCidr,
    ReservedPodCidr,
}

impl RejectKind {
    /// The Kubernetes event reason, for the kinds an operator must act on.
    pub fn event_reason(self) -> Option<&'static str> {
        match self {
            // Normal while a node's agent starts up.
            Self::NotSubnetManaged => None,
            Self::OutsideNetwork => Some("PodCIDROutsideNetwork"),
            Self::OtherBackend => Some("BackendMismatch"),
            Self::OtherVni => Some("VNIMismatch"),
            Self::OverlappingCidr => Some("PodCIDROverlap"),
            Self::DuplicateAddress => Some("DuplicateNodeAddress"),
            Self::NotOnLink => Some("HostGwPeerNotOnLink"),
            Self::CidrHoldsNodeAddress => Some("PodCIDRHoldsNodeAddress"),
            Self::AddressInPodCidr => Some("NodeAddressInPodCIDR"),
            Self::ReservedPodCidr => Some("PodCIDRReserved"),
        }
    }
}

/// Why no state can be computed yet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    #[error("no Node named {0:?} (our own node) among the nodes; waiting for it (check --node-name)")]
    NoLocalNode(String),
    /// Our own Node is there but could not be read (the loop's invalid
    /// nodes name it): what is wrong with it, not a --node-name to check.
    #[error("our own Node {name:?} cannot be used yet: {problem}; waiting for it to change")]
    LocalNodeUnusable { name: String, problem: String },
    #[error("our own node: {0}")]
    LocalPodCidrOutsideNetwork(String),
}

/// A stable, locally administered VTEP MAC derived from the node address,
/// for nodes that advertise none: `0e:00:<node ip>`.
pub fn default_vtep_mac(node_ip: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = node_ip.octets();
    [0x0e, 0x00, a, b, c, d]
}

/// Why `pod_cidr` cannot belong to a cluster whose pod network is `network`.
pub fn check_pod_cidr(network: Ipv4Network, pod_cidr: Ipv4Network) -> Result<(), String> {
    if pod_cidr.prefix() < network.prefix() || !network.contains(pod_cidr.network()) {
        return Err(format!(
            "pod CIDR {pod_cidr} lies outside the cluster Network {network} (net-conf.json); fix the node's spec.podCIDR or the controller-manager's --cluster-cidr"
        ));
    }
    Ok(())
}

/// Computes the desired state. Peers that cannot be served (overlapping
/// CIDR, duplicate address, other VNI or backend) are rejected one by one;
/// the rest of the cluster is still programmed.
///
/// `nodes` may be shared (`Arc<NodeInfo>`): a cluster's worth of nodes is
/// not copied for every event. [`DesiredState`] keeps the same result up
/// to date node by node.
pub fn desired<N: Borrow<NodeInfo>>(
    local: &LocalSettings,
    nodes: &[N],
    paths: &Paths,
) -> Result<(Desired, Vec<Rejected>), NotReady> {
    let me = nodes
        .iter()
        .map(Borrow::borrow)
        .find(|n| n.name == local.node_name)
        .ok_or_else(|| NotReady::NoLocalNode(local.node_name.clone()))?;
    let (config, inner_mtu) = local_config(local, me)?;
    let node_ip = Ipv4Addr::from(config.node_ip);

    let mut rejected = Vec::new();
    // Collected in the order decided (below) and put in CIDR order once at the end:
    // building the map in one go costs a fraction of thousands of inserts.
    let mut peers: Vec<(Ipv4Network, PeerState)> = Vec::with_capacity(nodes.len());
    let mut taken: HashMap<Ipv4Addr, &str> = HashMap::with_capacity(nodes.len());
    let mut cidr_owners = CidrOwners::default();
    cidr_owners.insert(me.pod_cidr, &me.name);
    taken.insert(node_ip, &me.name);
    let mut others: Vec<&NodeInfo> = nodes.iter().map(Borrow::borrow).filter(|n| n.name != local.node_name).collect();
    // Where two nodes claim one address (or overlapping pod CIDRs), the one
    // whose kubelet reports the address as its InternalIP wins over one
    // that claims it by annotation only (`public-ip-overwrite`,
    // `public-ip`: a node's own credentials may set either, so a node
    // could otherwise take a live node's address by name order); then
    // name order.
    others.sort_by_key(|n| (n.internal_ip != Some(n.node_ip), n.name.as_str()));
    // Every node address the datapath knows (ours and each candidate
    // peer's, the first in that order where two share one), by address.
    let checked: Vec<(&NodeInfo, Result<(), Rejected>)> = others.into_iter().map(|n| (n, check_peer(local, n))).collect();
    // Every candidate's pod CIDR, ours among them, for the addresses
    // claimed by annotation over an InternalIP (`check_annotated_address`).
    let candidate_cidrs: HashMap<(u32, u8), &str> = std::iter::once(me)
        .chain(checked.iter().filter(|(_, check)| check.is_ok()).map(|(n, _)| *n))
        .map(|n| (cidr_key(n.pod_cidr), n.name.as_str()))
        .collect();
    let checked: Vec<(&NodeInfo, Result<(), Rejected>)> =
        checked.into_iter().map(|(n, check)| (n, check.and_then(|()| check_annotated_address(n, &candidate_cidrs)))).collect();
    let mut addresses: BTreeMap<Ipv4Addr, &str> = BTreeMap::from([(node_ip, me.name.as_str())]);
    for (node, _) in checked.iter().filter(|(_, check)| check.is_ok()) {
        addresses.entry(node.node_ip).or_insert(&node.name);
    }
    for (node, check) in checked {
        if let Err(rejection) = check {
            rejected.push(rejection);
            continue;
        }
        let reject = |kind: RejectKind, reason: String| Rejected { node: node.name.clone(), kind, reason };
        // Its route would take that node's underlay traffic (the tunnel's
        // own among it) into a tunnel to this one.
        if let Some((address, owner)) = addresses.range(node.pod_cidr.network()..=node.pod_cidr.broadcast()).next() {
            rejected.push(reject(RejectKind::CidrHoldsNodeAddress, format!(
                "pod CIDR {} holds the address {address} of node {owner}; left out of the datapath (fix the node's spec.podCIDR, or bound pod CIDRs with a net-conf Network that holds no node address)",
                node.pod_cidr
            )));
            continue;
        }
        if let Some((cidr, owner)) = cidr_owners.overlapping(node.pod_cidr) {
            rejected.push(reject(RejectKind::OverlappingCidr, format!(
                "pod CIDR {} overlaps {cidr} of node {owner}; left out of the datapath",
                node.pod_cidr
            )));
            continue;
        }
        if let Some(owner) = taken.get(&node.node_ip) {
            rejected.push(reject(RejectKind::DuplicateAddress, format!(
                "address {} is already used by node {owner}; left out of the datapath",
                node.node_ip
            )));
            continue;
        }
        taken.insert(node.node_ip, &node.name);
        cidr_owners.insert(node.pod_cidr, &node.name);
        let (peer, unreachable) = peer_state(local, node, paths);
        rejected.extend(unreachable);
        peers.push((node.pod_cidr, peer));
    }
    // Reported in name order, whatever order they were decided in.
    rejected.sort_by(|a, b| a.node.cmp(&b.node));
    // The pod CIDRs are disjoint by now: no key is lost.
    let peers = peers.into_iter().collect();
    Ok((Desired { config, local_pod_cidr: me.pod_cidr, inner_mtu, peers }, rejected))
}

/// CONFIG and the inner MTU, from our own node and the settings.
fn local_config(local: &LocalSettings, me: &NodeInfo) -> Result<(Config, u32), NotReady> {
    if let Some(network) = local.network {
        check_pod_cidr(network, me.pod_cidr).map_err(NotReady::LocalPodCidrOutsideNetwork)?;
    }
    // Our own `public-ip` annotation is our output, not our input: an
    // address change must not be masked by what we published before.
    // The overwrite annotation wins over --public-ip, as flanneld's lease
    // takes it: peers read it from our Node, so it is what they tunnel to.
    let node_ip = me
        .public_ip_overwrite
        .or(local.public_ip)
        .or(local.iface_address)
        .or(me.internal_ip)
        .unwrap_or(me.node_ip);
    let vtep_mac = me.vtep_mac.unwrap_or_else(|| default_vtep_mac(node_ip));
    let inner_mtu = match local.backend {
        Backend::Vxlan => local.underlay_mtu.saturating_sub(VXLAN_OVERHEAD),
        Backend::HostGw => local.underlay_mtu,
    };
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
        pod_bridge_ifindex: local.pod_bridge_ifindex,
        pod_bridge_mac: local.pod_bridge_mac,
        underlay_mtu: local.underlay_mtu,
        xdp_decap: u16::from(local.xdp_decap),
        seg_ifindex: local.seg_ifindex,
        gro_ifindex: local.gro_ifindex,
        pod_bridge_ip: local
            .pod_bridge_addresses
            .iter()
            .find(|address| local.pod_bridge_ifindex != 0 && me.pod_cidr.contains(**address))
            .map_or([0; 4], Ipv4Addr::octets),
        ..Config::default()
    };
    Ok((config, inner_mtu))
}

/// IPv4 ranges no pod network uses (RFC 6890), with why, for a pod CIDR
/// that nothing else bounds (no net-conf `Network`). Not `240.0.0.0/4`:
/// some clusters take their pod addresses from it.
const RESERVED_RANGES: [([u8; 4], u8, &str); 4] = [
    ([0, 0, 0, 0], 8, "\"this network\""),
    ([127, 0, 0, 0], 8, "loopback"),
    ([169, 254, 0, 0], 16, "link-local, where clouds serve instance metadata"),
    ([224, 0, 0, 0], 4, "multicast"),
];

/// What a peer must satisfy on its own, whatever the other nodes say:
/// subnet-managed, inside the Network, our backend and VNI.
fn check_peer(local: &LocalSettings, node: &NodeInfo) -> Result<(), Rejected> {
    let reject = |kind: RejectKind, reason: String| Rejected { node: node.name.clone(), kind, reason };
    if !node.kube_subnet_managed {
        return Err(reject(RejectKind::NotSubnetManaged, format!(
            "does not carry {}: \"true\", so it advertises no tunnel endpoint yet (its agent publishes it once running); left out of the datapath",
            crate::node::ANNOTATION_KUBE_SUBNET_MANAGER
        )));
    }
    if let Some(Err(why)) = local.network.map(|network| check_pod_cidr(network, node.pod_cidr)) {
        return Err(reject(RejectKind::OutsideNetwork, format!("{why}; left out of the datapath")));
    }
    // Without a Network nothing else bounds it: a route to a range no pod
    // network uses would take this node's own traffic there (a cloud's
    // metadata service among it) into the tunnel. A Network is the
    // operator's choice of range.
    let reserved = RESERVED_RANGES.iter().map(|(network, prefix, what)| (Ipv4Network::new((*network).into(), *prefix).expect("a prefix of at most 32"), *what));
    if let Some((range, what)) = reserved.into_iter().filter(|_| local.network.is_none()).find(|(range, _)| range.overlaps(node.pod_cidr)) {
        return Err(reject(RejectKind::ReservedPodCidr, format!(
            "pod CIDR {} overlaps {range} ({what}), which no pod network uses; left out of the datapath (fix the node's spec.podCIDR, or bound pod CIDRs with a net-conf Network)",
            node.pod_cidr
        )));
    }
    // Nor a route to the node's own subnet through the node, which would
    // take the underlay's traffic.
    if node.pod_cidr.contains(node.node_ip) {
        return Err(reject(RejectKind::CidrHoldsNodeAddress, format!(
            "pod CIDR {} holds the node's own address {}; left out of the datapath (fix the node's spec.podCIDR, or bound pod CIDRs with a net-conf Network)",
            node.pod_cidr, node.node_ip
        )));
    }
    let ours = local.backend.flannel_name();
    if let Some(backend) = node.backend_type.as_deref().filter(|b| *b != ours) {
        return Err(reject(RejectKind::OtherBackend, format!(
            "backend-type {backend:?} differs from ours ({ours:?}); left out of the datapath (use one backend cluster-wide)"
        )));
    }
    // A lease holds a VNI past 16 bits cut to them (`node::lease_vni`).
    if let Some(vni) = node.vni.filter(|v| *v != local.vni && *v != crate::node::lease_vni(local.vni)) {
        return Err(reject(RejectKind::OtherVni, format!(
            "its VNI {vni} differs from ours ({}); left out of the datapath (set --vni to match the cluster)",
            local.vni
        )));
    }
    Ok(())
}

/// A Node whose address comes from its annotations (`public-ip-overwrite`
/// or `public-ip`) over its InternalIP must not claim an address inside
/// another candidate's pod CIDR (`cidrs`, ours among them): `desired`
/// leaves out the holder of a pod CIDR that holds a node's address, the
/// controller-manager assigned that CIDR, and the annotation is the
/// node's own word (its kubelet's credentials may set it). Such an
/// address is not where the node's own traffic goes (its InternalIP is),
/// so the holder's route takes nothing of it. A node without an
/// InternalIP (an etcd lease's, whose subnet and address the node wrote
/// alike) is left to that rule: there the address may be the node's real
/// one, whose traffic the holder's route would take.
fn check_annotated_address(node: &NodeInfo, cidrs: &HashMap<(u32, u8), &str>) -> Result<(), Rejected> {
    let Some(internal_ip) = node.internal_ip.filter(|ip| *ip != node.node_ip) else {
        return Ok(());
    };
    let holder = enclosing_keys(u32::from(node.node_ip), 33)
        .find_map(|key| cidrs.get(&key).filter(|holder| **holder != node.name).map(|holder| (key.1, key.0, *holder)));
    match holder {
        None => Ok(()),
        Some((prefix, network, holder)) => Err(Rejected {
            node: node.name.clone(),
            kind: RejectKind::AddressInPodCidr,
            reason: format!(
                "address {}, from its annotations over its InternalIP {internal_ip}, lies in pod CIDR {}/{prefix} of node {holder}; left out of the datapath (fix its {} or {} annotation)",
                node.node_ip,
                Ipv4Addr::from(network),
                crate::node::ANNOTATION_PUBLIC_IP_OVERWRITE,
                crate::node::ANNOTATION_PUBLIC_IP,
            ),
        }),
    }
}

/// An accepted peer's entry, and its rejection when host-gw cannot reach
/// it (it is then routed `unreachable`).
fn peer_state(local: &LocalSettings, node: &NodeInfo, paths: &Paths) -> (PeerState, Option<Rejected>) {
    let path = paths.get(&node.node_ip).copied().unwrap_or(UnderlayPath::NoRoute);
    let (mode, reason, next_hop) = peer_mode(local, node.node_ip, path);
    let unreachable = (mode == ROUTE_MODE_UNREACHABLE).then(|| {
        let why = match path {
            UnderlayPath::Gateway(gw) => format!("gateway {gw} lies between us and {}", node.node_ip),
            _ => format!("no route to {} on the underlay", node.node_ip),
        };
        Rejected {
            node: node.name.clone(),
            kind: RejectKind::NotOnLink,
            reason: format!(
                "host-gw cannot reach it: {why}; its pod CIDR {} is routed `unreachable` (use --backend vxlan --direct-routing)",
                node.pod_cidr
            ),
        }
    });
    let peer = PeerState {
        pod_cidr: node.pod_cidr,
        node_ip: node.node_ip,
        vtep_mac: node.vtep_mac.unwrap_or_else(|| default_vtep_mac(node.node_ip)),
        mode,
        reason,
        next_hop,
    };
    (peer, unreachable)
}

/// A peer's mode, the reason for it, and the kernel route's next hop.
fn peer_mode(local: &LocalSettings, node_ip: Ipv4Addr, path: UnderlayPath) -> (u8, u8, Ipv4Addr) {
    match (local.backend, local.direct_routing, path) {
        (Backend::HostGw, _, UnderlayPath::OnLink) | (Backend::Vxlan, true, UnderlayPath::OnLink) => {
            (ROUTE_MODE_DIRECT, ROUTE_REASON_ON_LINK, node_ip)
        }
        (Backend::HostGw, _, UnderlayPath::Gateway(gw)) => (ROUTE_MODE_UNREACHABLE, ROUTE_REASON_GATEWAY, gw),
        (Backend::HostGw, _, UnderlayPath::NoRoute) => (ROUTE_MODE_UNREACHABLE, ROUTE_REASON_NO_ROUTE, node_ip),
        (Backend::Vxlan, false, UnderlayPath::OnLink) => (ROUTE_MODE_VXLAN, ROUTE_REASON_BACKEND, node_ip),
        (Backend::Vxlan, false, UnderlayPath::Gateway(gw)) => (ROUTE_MODE_VXLAN, ROUTE_REASON_BACKEND, gw),
        (Backend::Vxlan, true, UnderlayPath::Gateway(gw)) => (ROUTE_MODE_VXLAN, ROUTE_REASON_GATEWAY, gw),
        // Under plain VXLAN the reason is the backend whatever the path:
        // the datapath reads it as "sends to our pods only encapsulated"
        // (`arrives_only_encapsulated`), and drops bare packets claiming
        // such a peer. Under DirectRouting the peer judges its own path.
        (Backend::Vxlan, false, UnderlayPath::NoRoute) => (ROUTE_MODE_VXLAN, ROUTE_REASON_BACKEND, node_ip),
        (Backend::Vxlan, true, UnderlayPath::NoRoute) => (ROUTE_MODE_VXLAN, ROUTE_REASON_NO_ROUTE, node_ip),
    }
}

/// Pairwise disjoint CIDRs with their owners, ordered by first address, so
/// an overlap is found in O(log n): two CIDRs overlap only by one holding
/// the other, so either a held CIDR starts inside the new one, or the one
/// starting last before it reaches into it. A cluster of thousands of nodes
/// is checked in milliseconds.
#[derive(Default)]
struct CidrOwners<'a> {
    by_start: BTreeMap<u32, (Ipv4Network, &'a str)>,
}

impl<'a> CidrOwners<'a> {
    fn overlapping(&self, cidr: Ipv4Network) -> Option<(Ipv4Network, &'a str)> {
        let start = u32::from(cidr.network());
        let end = u32::from(cidr.broadcast());
        // One look-up when nothing overlaps, the usual case: the CIDR
        // starting last up to our end either starts inside ours, or is the
        // one starting last before it.
        let (&last_start, &(held, owner)) = self.by_start.range(..=end).next_back()?;
        if last_start >= start {
            // Some start inside ours: name the first.
            return self.by_start.range(start..=end).next().map(|(_, found)| *found);
        }
        (u32::from(held.broadcast()) >= start).then_some((held, owner))
    }

    fn insert(&mut self, cidr: Ipv4Network, owner: &'a str) {
        self.by_start.insert(u32::from(cidr.network()), (cidr, owner));
    }
}

/// Which peers an update of [`DesiredState`] may have changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Touched {
    /// Nothing the datapath holds.
    Nothing,
    /// Only the entries under these pod CIDRs (added, changed or removed).
    Peers(Vec<Ipv4Network>),
    /// Anything: CONFIG, or peers beyond the node that changed (a conflict
    /// resolved, the settings, the underlay paths, our own node).
    All,
}

/// The cluster's nodes and the desired state computed from them, kept up
/// to date node by node: the same result as [`desired`] over all nodes,
/// without recomputing it over thousands of nodes for every event.
///
/// A node's update costs O(log n) unless it touches a conflict (its old or
/// new pod CIDR overlaps, or its address equals, that of another node that
/// passes [`check_peer`], ours included): which node then wins depends on
/// the others, in name order, so everything is recomputed. Conflicts are
/// misconfigurations, reported as such; the usual event is one node's
/// address or annotations changing.
#[derive(Debug)]
pub struct DesiredState {
    local: LocalSettings,
    nodes: BTreeMap<String, std::sync::Arc<NodeInfo>>,
    computed: Result<Computed, NotReady>,
}

#[derive(Debug)]
struct Computed {
    desired: Desired,
    /// At most one per node, by node name: the order [`desired`] reports.
    rejected: BTreeMap<String, Rejected>,
    /// Pod CIDRs (first address, prefix) of the peers that pass
    /// [`check_peer`], with how many hold each: the candidates for a
    /// conflict.
    candidate_cidrs: BTreeMap<(u32, u8), u32>,
    candidate_addrs: BTreeMap<Ipv4Addr, u32>,
}

impl DesiredState {
    pub fn new(local: LocalSettings) -> Self {
        let computed = Err(NotReady::NoLocalNode(local.node_name.clone()));
        Self { local, nodes: BTreeMap::new(), computed }
    }

    pub fn local(&self) -> &LocalSettings {
        &self.local
    }

    /// The nodes, by name.
    pub fn nodes(&self) -> &BTreeMap<String, std::sync::Arc<NodeInfo>> {
        &self.nodes
    }

    /// Our own node, when known.
    pub fn me(&self) -> Option<&NodeInfo> {
        self.nodes.get(&self.local.node_name).map(|n| &**n)
    }

    /// The desired state, or why there is none yet.
    pub fn result(&self) -> Result<&Desired, &NotReady> {
        self.computed.as_ref().map(|c| &c.desired)
    }

    /// The nodes left out (or routed `unreachable`), in name order.
    pub fn rejected(&self) -> impl Iterator<Item = &Rejected> {
        self.computed.iter().flat_map(|c| c.rejected.values())
    }

    /// Replaces every node (a relist, a rescan) and recomputes.
    pub fn replace_all(&mut self, nodes: impl IntoIterator<Item = std::sync::Arc<NodeInfo>>, paths: &Paths) -> Touched {
        self.nodes = nodes.into_iter().map(|n| (n.name.clone(), n)).collect();
        self.recompute(paths)
    }

    /// New settings (the pod bridge appeared, the decap hook settled).
    pub fn set_local(&mut self, local: LocalSettings, paths: &Paths) -> Touched {
        if local == self.local {
            return Touched::Nothing;
        }
        self.local = local;
        self.recompute(paths)
    }

    /// Recomputes everything: the underlay paths changed, or a conflict.
    pub fn recompute(&mut self, paths: &Paths) -> Touched {
        let nodes: Vec<&NodeInfo> = self.nodes.values().map(|n| &**n).collect();
        self.computed = desired(&self.local, &nodes, paths).map(|(desired, rejected)| {
            let mut candidate_cidrs = BTreeMap::new();
            let mut candidate_addrs = BTreeMap::new();
            for node in nodes.iter().filter(|n| n.name != self.local.node_name && check_peer(&self.local, n).is_ok()) {
                *candidate_cidrs.entry(cidr_key(node.pod_cidr)).or_insert(0) += 1;
                *candidate_addrs.entry(node.node_ip).or_insert(0) += 1;
            }
            let rejected = rejected.into_iter().map(|r| (r.node.clone(), r)).collect();
            Computed { desired, rejected, candidate_cidrs, candidate_addrs }
        });
        Touched::All
    }

    /// A node added or changed.
    pub fn upsert(&mut self, node: std::sync::Arc<NodeInfo>, paths: &Paths) -> Touched {
        let name = node.name.clone();
        self.update(&name, Some(node), paths)
    }

    /// A node deleted.
    pub fn remove(&mut self, name: &str, paths: &Paths) -> Touched {
        self.update(name, None, paths)
    }

    fn update(&mut self, name: &str, new: Option<std::sync::Arc<NodeInfo>>, paths: &Paths) -> Touched {
        let old = match &new {
            Some(node) => self.nodes.insert(name.to_owned(), node.clone()),
            None => self.nodes.remove(name),
        };
        if old.as_deref() == new.as_deref() {
            return Touched::Nothing;
        }
        if name == self.local.node_name {
            return self.recompute(paths);
        }
        let Ok(computed) = &mut self.computed else {
            // No state without our own node; nothing to keep up to date.
            return Touched::Nothing;
        };
        let local = &self.local;
        let old = old.filter(|n| check_peer(local, n).is_ok());
        if let Some(old) = &old {
            computed.forget_candidate(old);
        }
        let me = &computed.desired;
        let our_ip = Ipv4Addr::from(me.config.node_ip);
        let conflict = |node: &NodeInfo| {
            computed.overlaps_candidate(node.pod_cidr)
                || computed.candidate_addrs.contains_key(&node.node_ip)
                || me.local_pod_cidr.contains(node.pod_cidr.network())
                || node.pod_cidr.contains(me.local_pod_cidr.network())
                || node.node_ip == our_ip
                // A pod CIDR holding a node's address, or an address in one.
                || node.pod_cidr.contains(our_ip)
                || computed.candidate_addrs.range(node.pod_cidr.network()..=node.pod_cidr.broadcast()).next().is_some()
                || computed.overlaps_candidate(Ipv4Network::from(node.node_ip))
                || me.local_pod_cidr.contains(node.node_ip)
        };
        let new_candidate = new.as_deref().filter(|n| check_peer(local, n).is_ok());
        if old.as_deref().is_some_and(conflict) || new_candidate.is_some_and(conflict) {
            return self.recompute(paths);
        }
        // No other node competes for the old or the new CIDR and address:
        // the old entry was this node's, and the new one is.
        let mut touched = Vec::with_capacity(2);
        computed.rejected.remove(name);
        if let Some(old) = &old {
            computed.desired.peers.remove(&old.pod_cidr);
            touched.push(old.pod_cidr);
        }
        if let Some(node) = new.as_deref() {
            match check_peer(local, node) {
                Err(rejection) => {
                    computed.rejected.insert(name.to_owned(), rejection);
                }
                Ok(()) => {
                    *computed.candidate_cidrs.entry(cidr_key(node.pod_cidr)).or_insert(0) += 1;
                    *computed.candidate_addrs.entry(node.node_ip).or_insert(0) += 1;
                    let (peer, unreachable) = peer_state(local, node, paths);
                    if let Some(rejection) = unreachable {
                        computed.rejected.insert(name.to_owned(), rejection);
                    }
                    computed.desired.peers.insert(node.pod_cidr, peer);
                    if !touched.contains(&node.pod_cidr) {
                        touched.push(node.pod_cidr);
                    }
                }
            }
        }
        Touched::Peers(touched)
    }
}

impl Computed {
    fn forget_candidate(&mut self, node: &NodeInfo) {
        let key = cidr_key(node.pod_cidr);
        if let Some(count) = self.candidate_cidrs.get_mut(&key) {
            *count -= 1;
            if *count == 0 {
                self.candidate_cidrs.remove(&key);
            }
        }
        if let Some(count) = self.candidate_addrs.get_mut(&node.node_ip) {
            *count -= 1;
            if *count == 0 {
                self.candidate_addrs.remove(&node.node_ip);
            }
        }
    }

    /// Whether a candidate's pod CIDR overlaps `cidr`: one starts inside
    /// it, or one holds it (at most one look-up per shorter prefix).
    fn overlaps_candidate(&self, cidr: Ipv4Network) -> bool {
        let (start, end) = (u32::from(cidr.network()), u32::from(cidr.broadcast()));
        if self.candidate_cidrs.range((start, 0)..=(end, 32)).next().is_some() {
            return true;
        }
        enclosing_keys(start, cidr.prefix()).any(|key| self.candidate_cidrs.contains_key(&key))
    }
}

fn cidr_key(cidr: Ipv4Network) -> (u32, u8) {
    (u32::from(cidr.network()), cidr.prefix())
}

/// The [`cidr_key`]s of the CIDRs of prefix below `below` (at most 33)
/// that hold `address`, shortest first.
fn enclosing_keys(address: u32, below: u8) -> impl Iterator<Item = (u32, u8)> {
    (0..below).map(move |prefix| (address & u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0), prefix))
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
/// then additions and updates. Unchanged peers produce nothing. Both maps
/// are walked once side by side, both being in CIDR order, so thousands of
/// unchanged peers cost no look-ups.
pub fn diff(applied: &BTreeMap<Ipv4Network, PeerState>, desired: &BTreeMap<Ipv4Network, PeerState>) -> Vec<Change> {
    let mut removals = Vec::new();
    let mut upserts = Vec::new();
    let mut old = applied.values().peekable();
    let mut new = desired.values().peekable();
    loop {
        let order = match (old.peek(), new.peek()) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some(o), Some(n)) => o.pod_cidr.cmp(&n.pod_cidr),
        };
        match order {
            Ordering::Less => removals.extend(old.next().map(|p| Change::Remove(*p))),
            Ordering::Greater => upserts.extend(new.next().map(|p| Change::Upsert(*p))),
            Ordering::Equal => {
                let (o, n) = (old.next(), new.next());
                if o != n {
                    upserts.extend(n.map(|p| Change::Upsert(*p)));
                }
            }
        }
    }
    removals.extend(upserts);
    removals
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{local, node};

    fn on_link(nodes: &[NodeInfo]) -> Paths {
        nodes.iter().map(|n| (n.node_ip, UnderlayPath::OnLink)).collect()
    }

    #[test]
    fn builds_config_and_peers() {
        let nodes = [node("a", "10.244.1.0/24", [192, 168, 0, 1]), node("b", "10.244.2.0/24", [192, 168, 0, 2])];
        let (d, rejected) = desired(&local(), &nodes, &on_link(&nodes)).unwrap();
        assert!(rejected.is_empty());
        assert_eq!(d.inner_mtu, 1450);
        assert_eq!(d.config.node_ip, [192, 168, 0, 1]);
        assert_eq!(d.config.pod_prefix_len, 24);
        assert_eq!(d.peers.len(), 1);
        let b = d.peers.values().next().unwrap();
        assert_eq!(b.node_ip, Ipv4Addr::new(192, 168, 0, 2));
        assert_eq!(b.vtep_mac, [0x0e, 0, 192, 168, 0, 2]);
    }

    /// CONFIG names the pod bridge's address in our pod CIDR (not one
    /// outside it, which `in_cidr` already leaves to the kernel), and only
    /// while the fast path is attached to the bridge.
    #[test]
    fn config_names_the_pod_bridges_address_in_our_pod_cidr() {
        let nodes = [node("a", "10.244.1.0/24", [192, 168, 0, 1])];
        let mut settings = local();
        settings.pod_bridge_addresses = vec![Ipv4Addr::new(169, 254, 1, 1), Ipv4Addr::new(10, 244, 1, 1)];
        let config = |settings: &LocalSettings| desired(settings, &nodes, &on_link(&nodes)).unwrap().0.config;
        assert_eq!(config(&settings).pod_bridge_ip, [0; 4], "fast path off");
        settings.pod_bridge_ifindex = 7;
        assert_eq!(config(&settings).pod_bridge_ip, [10, 244, 1, 1]);
        settings.pod_bridge_addresses.truncate(1);
        assert_eq!(config(&settings).pod_bridge_ip, [0; 4], "none in the pod CIDR");
    }

    /// A node that claims another node's address only by annotation
    /// (`public-ip-overwrite`, or `public-ip`: its own kubelet's credentials
    /// may set either) does not take it from the node whose kubelet reports
    /// it as its InternalIP, whatever their names: the claimant is left
    /// out, not its victim, whose pods stay reachable. (Shown failing
    /// before: the name that sorted first won, and the victim was cut off.)
    #[test]
    fn an_address_claimed_by_annotation_does_not_take_it_from_the_node_whose_internal_ip_it_is() {
        let mut claimant = node("b", "10.244.2.0/24", [192, 168, 0, 9]);
        claimant.public_ip_overwrite = Some(Ipv4Addr::new(192, 168, 0, 3));
        claimant.node_ip = Ipv4Addr::new(192, 168, 0, 3);
        let nodes = [node("a", "10.244.1.0/24", [192, 168, 0, 1]), claimant, node("c", "10.244.3.0/24", [192, 168, 0, 3])];
        let (d, rejected) = desired(&local(), &nodes, &on_link(&nodes)).unwrap();
        assert_eq!(d.peers.keys().copied().collect::<Vec<_>>(), ["10.244.3.0/24".parse::<Ipv4Network>().unwrap()]);
        assert_eq!(rejected.iter().map(|r| (r.node.as_str(), r.kind)).collect::<Vec<_>>(), [("b", RejectKind::DuplicateAddress)]);
        assert!(rejected[0].reason.contains("already used by node c"), "{}", rejected[0]);
    }

    #[test]
    fn waits_for_its_own_node() {
        let nodes = [node("b", "10.244.2.0/24", [192, 168, 0, 2])];
        assert_eq!(desired(&local(), &nodes, &on_link(&nodes)), Err(NotReady::NoLocalNode("a".into())));
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
        let (d, rejected) = desired(&local(), &nodes, &on_link(&nodes)).unwrap();
        assert_eq!(d.peers.len(), 1);
        let names: Vec<_> = rejected.iter().map(|r| r.node.as_str()).collect();
        assert_eq!(names, ["c", "d", "e"]);
        assert!(rejected[0].reason.contains("overlaps 10.244.2.0/24 of node b"), "{}", rejected[0]);
        assert!(rejected[1].reason.contains("already used by node b"));
        assert!(rejected[2].reason.contains("--vni"));
    }

    #[test]
    fn only_subnet_managed_peers_inside_the_network_are_programmed() {
        let mut unmanaged = node("u", "10.244.9.0/24", [192, 168, 0, 9]);
        unmanaged.kube_subnet_managed = false;
        let nodes = [
            node("a", "10.244.1.0/24", [192, 168, 0, 1]),
            node("b", "10.244.2.0/24", [192, 168, 0, 2]),
            node("o", "10.99.2.0/24", [192, 168, 0, 3]),
            unmanaged,
        ];
        let settings = LocalSettings { network: Some("10.244.0.0/16".parse().unwrap()), ..local() };
        let (d, rejected) = desired(&settings, &nodes, &on_link(&nodes)).unwrap();
        assert_eq!(d.peers.keys().map(ToString::to_string).collect::<Vec<_>>(), ["10.244.2.0/24"]);
        assert_eq!(rejected.iter().map(|r| r.node.as_str()).collect::<Vec<_>>(), ["o", "u"]);
        assert!(rejected[0].reason.contains("outside the cluster Network 10.244.0.0/16"), "{}", rejected[0]);
        assert!(rejected[1].reason.contains("kube-subnet-manager"), "{}", rejected[1]);

        let outside = [node("a", "10.1.1.0/24", [192, 168, 0, 1])];
        assert!(matches!(desired(&settings, &outside, &on_link(&outside)), Err(NotReady::LocalPodCidrOutsideNetwork(_))));
    }

    #[test]
    fn our_address_comes_from_flags_overwrite_or_internal_ip_never_our_own_annotation() {
        let mut me = node("a", "10.244.1.0/24", [192, 168, 0, 1]);
        me.node_ip = Ipv4Addr::new(10, 9, 9, 9); // what we published earlier
        me.internal_ip = Some(Ipv4Addr::new(192, 168, 0, 7));
        let nodes = [me.clone()];
        let ip = |settings: &LocalSettings, nodes: &[NodeInfo]| Ipv4Addr::from(desired(settings, nodes, &Paths::new()).unwrap().0.config.node_ip);
        assert_eq!(ip(&local(), &nodes), Ipv4Addr::new(192, 168, 0, 7));
        me.public_ip_overwrite = Some(Ipv4Addr::new(203, 0, 113, 1));
        assert_eq!(ip(&local(), &[me.clone()]), Ipv4Addr::new(203, 0, 113, 1));
        // The overwrite wins over --public-ip, as with flanneld (its
        // lease takes the annotation): what peers read from our Node is
        // what we use. (Shown failing before: the flag won here, while
        // every peer tunnelled to the overwrite.)
        let flag = LocalSettings { public_ip: Some(Ipv4Addr::new(198, 51, 100, 1)), ..local() };
        assert_eq!(ip(&flag, &[me.clone()]), Ipv4Addr::new(203, 0, 113, 1));
        me.public_ip_overwrite = None;
        assert_eq!(ip(&flag, &[me]), Ipv4Addr::new(198, 51, 100, 1));
    }

    /// A peer whose pod CIDR holds its own node's address (a pod CIDR set
    /// to the node subnet by hand, in a manifest, without a net-conf
    /// Network to bound it): its route would take the underlay's traffic
    /// for that whole range, the tunnel's own among it. Rejected by name.
    /// (Shown failing before: it was programmed.)
    #[test]
    fn a_pod_cidr_holding_its_nodes_own_address_is_rejected() {
        let nodes = [node("a", "10.244.1.0/24", [192, 168, 0, 1]), node("b", "192.168.0.0/16", [192, 168, 0, 2]), node("c", "10.244.3.0/24", [192, 168, 0, 3])];
        let (d, rejected) = desired(&local(), &nodes, &on_link(&nodes)).unwrap();
        assert_eq!(d.peers.keys().copied().collect::<Vec<_>>(), ["10.244.3.0/24".parse::<Ipv4Network>().unwrap()]);
        assert_eq!(rejected.len(), 1, "{rejected:?}");
        assert_eq!(rejected[0].kind, RejectKind::CidrHoldsNodeAddress);
        assert!(rejected[0].to_string().contains("node b: pod CIDR 192.168.0.0/16 holds the node's own address 192.168.0.2"), "{}", rejected[0]);
    }

    /// Without a net-conf `Network` nothing else bounds a peer's pod CIDR:
    /// one in a range no pod network uses (link-local, where clouds serve
    /// instance metadata and credentials at 169.254.169.254; loopback;
    /// "this network"; multicast) would take this node's own
    /// traffic there into a tunnel to the peer. Rejected by name. (Shown
    /// failing before: four of the five were programmed; the fifth holds
    /// the nodes' addresses and was left out for that.)
    #[test]
    fn a_pod_cidr_in_a_range_no_pod_network_uses_is_rejected() {
        let nodes = [
            node("a", "10.244.1.0/24", [192, 168, 0, 1]),
            node("b", "169.254.169.254/32", [192, 168, 0, 2]),
            node("c", "127.0.0.0/24", [192, 168, 0, 3]),
            node("d", "0.0.0.0/8", [192, 168, 0, 4]),
            node("e", "224.0.0.0/24", [192, 168, 0, 5]),
            node("f", "128.0.0.0/1", [192, 168, 0, 6]),
            node("g", "10.244.7.0/24", [192, 168, 0, 7]),
            // Some clusters take pod addresses from 240.0.0.0/4.
            node("h", "240.1.0.0/24", [192, 168, 0, 8]),
        ];
        let (d, rejected) = desired(&local(), &nodes, &on_link(&nodes)).unwrap();
        assert_eq!(d.peers.keys().map(ToString::to_string).collect::<Vec<_>>(), ["10.244.7.0/24", "240.1.0.0/24"]);
        let said: Vec<String> = rejected.iter().map(ToString::to_string).collect();
        assert_eq!(rejected.iter().map(|r| (r.node.as_str(), r.kind)).collect::<Vec<_>>(), ["b", "c", "d", "e", "f"].map(|n| (n, RejectKind::ReservedPodCidr)), "{said:?}");
        assert!(said[0].contains("node b: pod CIDR 169.254.169.254/32 overlaps 169.254.0.0/16 (link-local"), "{said:?}");
    }

    /// A peer whose pod CIDR holds another node's address, ours or a
    /// peer's (a pod CIDR set by hand, or a Network that overlaps the node
    /// subnet): its route would take that node's underlay traffic, the
    /// tunnel's own among it, into a tunnel to the peer. Rejected, naming
    /// the node whose address it holds. (Shown failing before: both were
    /// programmed.)
    #[test]
    fn a_pod_cidr_holding_another_nodes_address_is_rejected() {
        let nodes = [
            node("a", "10.244.1.0/24", [192, 168, 0, 1]),
            node("b", "192.168.1.0/24", [10, 1, 0, 2]),
            node("c", "10.244.3.0/24", [192, 168, 1, 3]),
            node("d", "192.168.0.0/28", [10, 1, 0, 4]),
        ];
        let (d, rejected) = desired(&local(), &nodes, &on_link(&nodes)).unwrap();
        assert_eq!(d.peers.keys().copied().collect::<Vec<_>>(), ["10.244.3.0/24".parse::<Ipv4Network>().unwrap()]);
        let said: Vec<String> = rejected.iter().map(ToString::to_string).collect();
        assert!(rejected.iter().all(|r| r.kind == RejectKind::CidrHoldsNodeAddress), "{said:?}");
        assert!(said[0].contains("node b: pod CIDR 192.168.1.0/24 holds the address 192.168.1.3 of node c"), "{said:?}");
        assert!(said[1].contains("node d: pod CIDR 192.168.0.0/28 holds the address 192.168.0.1 of node a"), "{said:?}");
        assert_eq!(said.len(), 2);
    }

    /// An address a Node claims by annotation over its InternalIP
    /// (`public-ip-overwrite`, `public-ip`: its own kubelet's credentials
    /// may set either) inside another node's pod CIDR, a peer's or ours,
    /// leaves out the claimant, not the CIDR's holder: else one patched
    /// Node would cut any other node out of every node's datapath. (Shown
    /// failing before: b was left out, and x and y were served.)
    #[test]
    fn an_annotated_address_inside_a_pod_cidr_leaves_out_its_claimant() {
        let claim = |mut n: NodeInfo, address: [u8; 4]| {
            n.node_ip = address.into();
            n.public_ip_overwrite = Some(address.into());
            n
        };
        let nodes = [
            node("a", "10.244.1.0/24", [192, 168, 0, 1]),
            node("b", "10.244.2.0/24", [192, 168, 0, 2]),
            claim(node("x", "10.244.3.0/24", [192, 168, 0, 3]), [10, 244, 2, 7]),
            claim(node("y", "10.244.4.0/24", [192, 168, 0, 4]), [10, 244, 1, 9]),
        ];
        let (d, rejected) = desired(&local(), &nodes, &on_link(&nodes)).unwrap();
        assert_eq!(d.peers.keys().copied().collect::<Vec<_>>(), ["10.244.2.0/24".parse::<Ipv4Network>().unwrap()]);
        let said: Vec<String> = rejected.iter().map(ToString::to_string).collect();
        assert_eq!(rejected.iter().map(|r| (r.node.as_str(), r.kind)).collect::<Vec<_>>(), [("x", RejectKind::AddressInPodCidr), ("y", RejectKind::AddressInPodCidr)], "{said:?}");
        assert!(said[0].contains("node x: address 10.244.2.7, from its annotations over its InternalIP 192.168.0.3, lies in pod CIDR 10.244.2.0/24 of node b"), "{said:?}");
        assert!(said[1].contains("node y: address 10.244.1.9, from its annotations over its InternalIP 192.168.0.4, lies in pod CIDR 10.244.1.0/24 of node a"), "{said:?}");
        // Without an InternalIP (an etcd lease's), the address may be the
        // node's real one: the holder is left out, as for an InternalIP.
        let lease = |n: NodeInfo| NodeInfo { internal_ip: None, ..n };
        let leases = [nodes[0].clone(), nodes[1].clone(), lease(nodes[2].clone())];
        let (d, rejected) = desired(&local(), &leases, &on_link(&leases)).unwrap();
        assert_eq!(d.peers.keys().copied().collect::<Vec<_>>(), ["10.244.3.0/24".parse::<Ipv4Network>().unwrap()]);
        assert_eq!(rejected.iter().map(|r| (r.node.as_str(), r.kind)).collect::<Vec<_>>(), [("b", RejectKind::CidrHoldsNodeAddress)]);
    }

    /// Past 16 bits, a peer's published VNI is ours as flanneld writes it
    /// (its low 16 bits; `node::lease_vni`): the same VNI, not another.
    /// (Shown failing before: every flannel peer was rejected.)
    #[test]
    fn a_vni_past_16_bits_matches_its_flannel_lease_form() {
        let settings = LocalSettings { vni: 70_000, ..local() };
        let mut nodes = [node("a", "10.244.1.0/24", [192, 168, 0, 1]), node("b", "10.244.2.0/24", [192, 168, 0, 2]), node("c", "10.244.3.0/24", [192, 168, 0, 3])];
        nodes[1].vni = Some(4464);
        nodes[2].vni = Some(4465);
        let (d, rejected) = desired(&settings, &nodes, &on_link(&nodes)).unwrap();
        assert_eq!(d.peers.keys().copied().collect::<Vec<_>>(), ["10.244.2.0/24".parse::<Ipv4Network>().unwrap()]);
        assert_eq!(rejected.iter().map(|r| (r.node.as_str(), r.kind)).collect::<Vec<_>>(), [("c", RejectKind::OtherVni)]);
    }

    #[test]
    fn each_peer_gets_its_mode_from_the_underlay_path() {
        let nodes = [
            node("a", "10.244.1.0/24", [192, 168, 0, 1]),
            node("b", "10.244.2.0/24", [192, 168, 0, 2]),
            node("c", "10.244.3.0/24", [192, 168, 1, 3]),
        ];
        let gw = Ipv4Addr::new(192, 168, 0, 254);
        let paths = Paths::from([
            (Ipv4Addr::new(192, 168, 0, 2), UnderlayPath::OnLink),
            (Ipv4Addr::new(192, 168, 1, 3), UnderlayPath::Gateway(gw)),
        ]);
        let modes = |settings: &LocalSettings| {
            let (d, rejected) = desired(settings, &nodes, &paths).unwrap();
            let modes: Vec<_> = d.peers.values().map(|p| (p.mode, p.reason, p.next_hop)).collect();
            (modes, rejected, d.inner_mtu)
        };
        let b = Ipv4Addr::new(192, 168, 0, 2);

        let (vxlan, rejected, mtu) = modes(&local());
        assert_eq!(vxlan, [(ROUTE_MODE_VXLAN, ROUTE_REASON_BACKEND, b), (ROUTE_MODE_VXLAN, ROUTE_REASON_BACKEND, gw)]);
        assert!(rejected.is_empty());
        assert_eq!(mtu, 1450);

        let (direct_routing, _, _) = modes(&LocalSettings { direct_routing: true, ..local() });
        assert_eq!(direct_routing, [(ROUTE_MODE_DIRECT, ROUTE_REASON_ON_LINK, b), (ROUTE_MODE_VXLAN, ROUTE_REASON_GATEWAY, gw)]);

        let (host_gw, rejected, mtu) = modes(&LocalSettings { backend: Backend::HostGw, ..local() });
        assert_eq!(host_gw, [(ROUTE_MODE_DIRECT, ROUTE_REASON_ON_LINK, b), (ROUTE_MODE_UNREACHABLE, ROUTE_REASON_GATEWAY, gw)]);
        assert_eq!(mtu, 1500, "host-gw adds no header");
        assert_eq!(rejected.len(), 1);
        assert!(rejected[0].to_string().contains("node c: host-gw cannot reach it: gateway 192.168.0.254"), "{}", rejected[0]);
        assert!(rejected[0].reason.contains("--direct-routing"));
    }

    /// A peer with no underlay route (a path query that failed, a route
    /// out of another device) is routed on-link; under plain VXLAN its
    /// reason stays the backend, which tells the datapath that the peer
    /// sends to our pods only encapsulated, so bare packets claiming it
    /// are forged. (Shown failing before: `NO_ROUTE` under plain VXLAN let
    /// them through, onto the fast path.) Under DirectRouting the peer may
    /// still send to us directly.
    #[test]
    fn a_peer_without_an_underlay_route_keeps_its_backend_reason_under_plain_vxlan() {
        let nodes = [node("a", "10.244.1.0/24", [192, 168, 0, 1]), node("d", "10.244.4.0/24", [192, 168, 2, 4])];
        let d = Ipv4Addr::new(192, 168, 2, 4);
        let mode = |settings: &LocalSettings| {
            let (desired, _) = desired(settings, &nodes, &Paths::new()).unwrap();
            desired.peers.values().map(|p| (p.mode, p.reason, p.next_hop)).next().unwrap()
        };
        assert_eq!(mode(&local()), (ROUTE_MODE_VXLAN, ROUTE_REASON_BACKEND, d));
        assert_eq!(mode(&LocalSettings { direct_routing: true, ..local() }), (ROUTE_MODE_VXLAN, ROUTE_REASON_NO_ROUTE, d));
        assert_eq!(mode(&LocalSettings { backend: Backend::HostGw, ..local() }), (ROUTE_MODE_UNREACHABLE, ROUTE_REASON_NO_ROUTE, d));
    }

    #[test]
    fn overlaps_are_found_inside_around_and_not_beside() {
        let mut owners = CidrOwners::default();
        owners.insert("10.244.2.0/24".parse().unwrap(), "b");
        owners.insert("10.244.8.0/22".parse().unwrap(), "c");
        let hit = |c: &str| owners.overlapping(c.parse().unwrap()).map(|(_, o)| o);
        assert_eq!(hit("10.244.2.128/25"), Some("b"), "inside");
        assert_eq!(hit("10.244.0.0/16"), Some("b"), "around");
        assert_eq!(hit("10.244.10.0/24"), Some("c"), "inside a larger one");
        assert_eq!(hit("10.244.3.0/24"), None, "beside");
        assert_eq!(hit("10.244.12.0/24"), None, "just after");
        assert_eq!(hit("10.244.1.0/24"), None, "just before");
    }

    /// The incremental state equals [`desired`] over all nodes after every
    /// one of thousands of random changes, on a small universe of names,
    /// CIDRs (nested and equal ones among them) and addresses, so that
    /// conflicts come and go; and the touched CIDRs account for every
    /// entry that changed.
    #[test]
    fn incremental_state_equals_the_full_computation_after_random_changes() {
        let cidrs = ["10.244.1.0/24", "10.244.2.0/24", "10.244.2.0/25", "10.244.2.128/25", "10.244.0.0/16", "10.244.3.0/24", "10.99.0.0/24", "10.244.4.0/24", "192.168.0.4/30"];
        let gw = Ipv4Addr::new(192, 168, 0, 254);
        let paths = Paths::from([
            (Ipv4Addr::new(192, 168, 0, 1), UnderlayPath::OnLink),
            (Ipv4Addr::new(192, 168, 0, 2), UnderlayPath::OnLink),
            (Ipv4Addr::new(192, 168, 0, 3), UnderlayPath::Gateway(gw)),
        ]);
        let settings = [
            LocalSettings { network: Some("10.244.0.0/16".parse().unwrap()), ..local() },
            LocalSettings { backend: Backend::HostGw, ..local() },
            LocalSettings { direct_routing: true, ..local() },
        ];
        for (round, settings) in settings.iter().enumerate() {
            let mut rng = fastrand::Rng::with_seed(round as u64);
            let mut state = DesiredState::new(settings.clone());
            let mut applied: BTreeMap<Ipv4Network, PeerState> = BTreeMap::new();
            for step in 0..3000 {
                let name = ["a", "b", "c", "d", "e", "f"][rng.usize(..6)];
                let touched = if rng.u8(..5) == 0 {
                    state.remove(name, &paths)
                } else {
                    let mut n = node(name, cidrs[rng.usize(..cidrs.len())], [192, 168, 0, rng.u8(1..6)]);
                    n.kube_subnet_managed = rng.u8(..8) != 0;
                    n.vni = (rng.u8(..8) == 0).then_some(7);
                    n.backend_type = (rng.u8(..8) == 0).then(|| "host-gw".to_owned());
                    n.vtep_mac = (rng.bool()).then_some([2, 0, 0, 0, 0, rng.u8(..)]);
                    // Some claim their address by annotation only.
                    if rng.u8(..6) == 0 {
                        n.node_ip = Ipv4Addr::new(192, 168, 0, rng.u8(1..6));
                        n.public_ip_overwrite = Some(n.node_ip);
                    }
                    state.upsert(std::sync::Arc::new(n), &paths)
                };
                let nodes: Vec<&NodeInfo> = state.nodes().values().map(|n| &**n).collect();
                let full = desired(settings, &nodes, &paths);
                let incremental = state.result().cloned().map_err(Clone::clone).map(|d| (d, state.rejected().cloned().collect::<Vec<_>>()));
                assert_eq!(incremental, full, "round {round}, step {step}: {name} changed");
                let Ok((full, _)) = full else { continue };
                match touched {
                    Touched::All => applied = full.peers.clone(),
                    Touched::Nothing => {}
                    Touched::Peers(cidrs) => {
                        for cidr in cidrs {
                            match full.peers.get(&cidr) {
                                Some(peer) => applied.insert(cidr, *peer),
                                None => applied.remove(&cidr),
                            };
                        }
                    }
                }
                assert_eq!(applied, full.peers, "round {round}, step {step}: the touched CIDRs miss a change of {name}");
            }
        }
    }

    #[test]
    fn diff_removes_before_adding_and_skips_unchanged() {
        let p = |cidr: &str, last: u8| PeerState {
            pod_cidr: cidr.parse().unwrap(),
            node_ip: Ipv4Addr::new(192, 168, 0, last),
            vtep_mac: [0; 6],
            mode: ROUTE_MODE_VXLAN,
            reason: ROUTE_REASON_BACKEND,
            next_hop: Ipv4Addr::new(192, 168, 0, last),
        };
        let applied = BTreeMap::from([(p("10.0.1.0/24", 1).pod_cidr, p("10.0.1.0/24", 1)), (p("10.0.2.0/24", 2).pod_cidr, p("10.0.2.0/24", 2))]);
        let desired = BTreeMap::from([(p("10.0.2.0/24", 2).pod_cidr, p("10.0.2.0/24", 2)), (p("10.0.3.0/24", 3).pod_cidr, p("10.0.3.0/24", 9))]);
        assert_eq!(diff(&applied, &desired), [Change::Remove(p("10.0.1.0/24", 1)), Change::Upsert(p("10.0.3.0/24", 9))]);
        assert!(diff(&desired, &desired).is_empty());
    }

    #[test]
    fn diff_walks_both_sides_like_looking_each_peer_up() {
        // Interleaved keys, some only on one side, some changed.
        let p = |k: u32, hop: u8| PeerState {
            pod_cidr: Ipv4Network::new(Ipv4Addr::from(0x0a00_0000 + (k << 8)), 24).unwrap(),
            node_ip: Ipv4Addr::new(192, 168, 0, 1),
            vtep_mac: [0; 6],
            mode: ROUTE_MODE_VXLAN,
            reason: ROUTE_REASON_BACKEND,
            next_hop: Ipv4Addr::new(192, 168, 0, hop),
        };
        let applied: BTreeMap<_, _> = (0..40).filter(|k| k % 3 != 0).map(|k| (p(k, 1).pod_cidr, p(k, 1))).collect();
        let desired: BTreeMap<_, _> = (0..40).filter(|k| k % 4 != 0).map(|k| (p(k, 1).pod_cidr, p(k, 1 + u8::from(k % 5 == 0)))).collect();
        let removals = applied.iter().filter(|(c, _)| !desired.contains_key(c)).map(|(_, p)| Change::Remove(*p));
        let upserts = desired.iter().filter(|(c, p)| applied.get(c) != Some(p)).map(|(_, p)| Change::Upsert(*p));
        assert_eq!(diff(&applied, &desired), removals.chain(upserts).collect::<Vec<_>>());
        assert_eq!(diff(&BTreeMap::new(), &desired).len(), desired.len());
        assert_eq!(diff(&applied, &BTreeMap::new()).len(), applied.len());
    }
}
