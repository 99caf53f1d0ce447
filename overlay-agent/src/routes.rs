//! Kernel routes toward remote pod CIDRs.
//!
//! - VXLAN peers: `<podCIDR> via <next hop> dev <underlay> onlink mtu
//!   <underlay − 50>`, the next hop being the node itself or the gateway
//!   toward it. The kernel resolves the next hop's MAC, the route MTU makes
//!   it do PMTU discovery for forwarded pod traffic, and our TC program
//!   finds the packet on the underlay's egress and encapsulates it.
//! - Direct peers (host-gw, DirectRouting): `<podCIDR> via <node IP> dev
//!   <underlay>`, forwarded by the kernel as is.
//! - Peers host-gw cannot reach: `unreachable <podCIDR>`, so senders get
//!   an ICMP error instead of a black hole.
//! - The unicast routes carry `src <advertised IP>` when the address we
//!   advertise is one of this node's: host traffic to remote pods then
//!   leaves with it even when it is a secondary address (the kernel would
//!   pick the interface's primary one), and a peer accepts a node's own
//!   traffic from the tunnel only with the address it knows the node by.
//!
//! Our routes carry their own protocol number, which sets them apart from
//! the kernel's and most tools' routes; which of them are this agent's is
//! recorded in its pinned `ROUTES` map (another agent with another pin
//! root, or another tool, may use the same number).
//!
//! Routes are listed, looked up, added and removed over rtnetlink
//! ([`crate::rtnl`]), in the agent's network namespace: no process is
//! started. When to look the paths up again is for
//! [`crate::kernel_events`] to say.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::Ipv4Addr,
};

use ipnetwork::Ipv4Network;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteMetric, RouteProtocol, RouteScope, RouteType},
};
use overlay_common::{ROUTE_MODE_DIRECT, ROUTE_MODE_UNREACHABLE};

use crate::{
    desired::{Paths, PeerState, UnderlayPath},
    rtnl::{Answer, Refused, Rtnl, RtnlError},
};

/// `proto` of the routes we install (`ip route show proto 157`).
pub const ROUTE_PROTO: &str = "157";
/// The same, as netlink carries it.
pub const ROUTE_PROTO_ID: u8 = 157;

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error(transparent)]
    Netlink(#[from] RtnlError),
    #[error("{request}: {reason}")]
    Refused { request: String, reason: Refused },
}

/// The `RTM_NEWROUTE` that adds or replaces the route toward `peer`'s pod
/// CIDR through `nexthop` (the object [`nexthop_key`] describes; none for
/// an unreachable route). The MTU and the preferred source stay on the
/// route: they are the route's, not the next hop's.
fn replace_message(peer: &PeerState, nexthop: Option<u32>, vxlan_mtu: u32, source: Option<Ipv4Addr>) -> RouteMessage {
    let mut route = route_to(peer.pod_cidr);
    route.header.protocol = RouteProtocol::from(ROUTE_PROTO_ID);
    route.header.scope = RouteScope::Universe;
    match (peer.mode, nexthop) {
        (ROUTE_MODE_UNREACHABLE, _) | (_, None) => route.header.kind = RouteType::Unreachable,
        (ROUTE_MODE_DIRECT, Some(id)) => {
            route.header.kind = RouteType::Unicast;
            route.attributes.push(RouteAttribute::NhId(id));
        }
        (_, Some(id)) => {
            route.header.kind = RouteType::Unicast;
            route.attributes.push(RouteAttribute::NhId(id));
            route.attributes.push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(vxlan_mtu)]));
        }
    }
    if let (RouteType::Unicast, Some(source)) = (route.header.kind, source) {
        route.attributes.push(RouteAttribute::PrefSource(RouteAddress::Inet(source)));
    }
    route
}

/// What the next hop of `peer`'s route is: `via <next hop> dev <underlay>
/// onlink` over VXLAN, `via <node IP> dev <underlay>` direct, none for an
/// unreachable route.
fn nexthop_key(peer: &PeerState, ifindex: u32) -> Option<NexthopKey> {
    match peer.mode {
        ROUTE_MODE_UNREACHABLE => None,
        ROUTE_MODE_DIRECT => Some(NexthopKey { gateway: peer.node_ip, oif: ifindex, onlink: false }),
        _ => Some(NexthopKey { gateway: peer.next_hop, oif: ifindex, onlink: true }),
    }
}

/// A nexthop object's content: what routes through it share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NexthopKey {
    pub gateway: Ipv4Addr,
    pub oif: u32,
    pub onlink: bool,
}

impl NexthopKey {
    /// The id tried first for this content: the same across restarts, so
    /// an agent finds its own again; spread over the id space so another
    /// tool's ids (small ones, as `ip nexthop add id 1`) rarely collide.
    pub fn first_id(&self) -> u32 {
        let mut hash: u32 = 0x811c_9dc5;
        for byte in self.gateway.octets().into_iter().chain(self.oif.to_ne_bytes()).chain([u8::from(self.onlink)]) {
            hash = (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193);
        }
        (hash & 0x7fff_ffff) | 0x4000_0000
    }
}

impl NexthopKey {
    /// The content of `nexthop` when it is provably one an overlay agent
    /// created: our protocol, an IPv4 gateway on a device, and the id our
    /// hash gives for exactly that content. See [`remove_orphaned_nexthops`].
    pub fn of_ours(nexthop: &crate::rtnl::Nexthop) -> Option<Self> {
        let key = Self { gateway: nexthop.gateway?, oif: nexthop.oif?, onlink: nexthop.onlink };
        (nexthop.protocol == ROUTE_PROTO_ID && key.first_id() == nexthop.id).then_some(key)
    }
}

/// How many ids after [`NexthopKey::first_id`] are tried before the route is
/// refused: each taken one is another tool's or another root's.
const NEXTHOP_PROBES: u32 = 64;

/// The nexthop objects (kernel >= 5.3) this root's routes use, one per
/// distinct next hop, and which routes use which.
///
/// Why objects: a route with its own gateway gets its own `fib_info`, and
/// the kernel's `fib_info` hash covers the device but not the gateway, so
/// every route of ours lands in one bucket and each insert compares with
/// all before it (quadratic: 58.7 s for 20,000). A route through a nexthop
/// object is hashed by the object's id.
///
/// Ownership: an id is ours only if this process created it (`NLM_F_EXCL`,
/// so never another's), or a route whose destination this root recorded
/// (its `ROUTES` map) uses it and it carries our protocol. Any other id
/// that is taken is skipped, never adopted nor deleted. A nexthop is
/// deleted (which deletes every route using it) only once no route of ours
/// uses it. Nexthops no route leads to (a crash between creating one and
/// its route) are for [`remove_orphaned_nexthops`].
#[derive(Debug, Default)]
pub struct Nexthops {
    by_key: HashMap<NexthopKey, u32>,
    ours: HashMap<u32, NexthopKey>,
    route_nexthop: HashMap<Ipv4Network, u32>,
    users: HashMap<u32, usize>,
    /// Ours that no route uses: what [`Self::collect`] looks at, so an
    /// update costs no walk over every nexthop.
    idle: HashSet<u32>,
}

impl Nexthops {
    /// Takes over the nexthops the main table's routes of our protocol use
    /// whose destination `recorded` says is this root's (an earlier run's).
    pub fn adopt(recorded: impl Fn(&Ipv4Network) -> bool) -> Result<Self, RouteError> {
        let mut rtnl = Rtnl::open()?;
        let mut table = Self::default();
        for route in rtnl.routes()?.iter().filter(|route| is_ours_in_main(route)) {
            let (Some(destination), Some(id)) = (destination(route), nexthop_id(route)) else { continue };
            if !recorded(&destination) {
                continue;
            }
            if let std::collections::hash_map::Entry::Vacant(slot) = table.ours.entry(id) {
                let Some(nexthop) = rtnl.nexthop(id)? else { continue };
                let (Some(gateway), Some(oif)) = (nexthop.gateway, nexthop.oif) else { continue };
                if nexthop.protocol != ROUTE_PROTO_ID {
                    continue;
                }
                let key = NexthopKey { gateway, oif, onlink: nexthop.onlink };
                slot.insert(key);
                table.by_key.entry(key).or_insert(id);
            }
            table.assign(destination, Some(id));
        }
        Ok(table)
    }

    /// The ids of the nexthops this table holds as ours.
    pub fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.ours.keys().copied()
    }

    /// The id of our nexthop with `key`'s content, created if there is none.
    fn obtain(&mut self, rtnl: &mut Rtnl, key: NexthopKey) -> Result<Result<u32, Refused>, RouteError> {
        if let Some(id) = self.by_key.get(&key) {
            return Ok(Ok(*id));
        }
        let mut id = key.first_id();
        let mut last = None;
        for _ in 0..NEXTHOP_PROBES {
            match rtnl.add_nexthop(id, ROUTE_PROTO_ID, key.gateway, key.oif, key.onlink)? {
                Answer::Done | Answer::Route(_) => {
                    self.ours.insert(id, key);
                    self.by_key.insert(key, id);
                    // Until its route is in: a refused route leaves it to collect.
                    self.idle.insert(id);
                    return Ok(Ok(id));
                }
                Answer::Refused(refused) if refused.errno == libc::EEXIST => {
                    // Ours with another content, another root's, another
                    // tool's: not for this route.
                    last = Some(refused);
                }
                Answer::Refused(refused) => return Ok(Err(refused)),
            }
            id = if id == u32::MAX { 0x4000_0000 } else { id + 1 };
        }
        let refused = last.expect("at least one probe");
        Ok(Err(Refused {
            errno: refused.errno,
            message: Some(format!("nexthop ids {:#x}..+{NEXTHOP_PROBES} are all taken by others", key.first_id())),
        }))
    }

    /// Records that the route to `destination` now uses `id` (or none).
    fn assign(&mut self, destination: Ipv4Network, id: Option<u32>) {
        let old = match id {
            Some(id) => {
                *self.users.entry(id).or_default() += 1;
                self.idle.remove(&id);
                self.route_nexthop.insert(destination, id)
            }
            None => self.route_nexthop.remove(&destination),
        };
        if let Some(old) = old
            && let Some(users) = self.users.get_mut(&old)
        {
            *users = users.saturating_sub(1);
            if *users == 0 {
                self.idle.insert(old);
            }
        }
    }

    /// Forgets `id`: the kernel no longer has it (it deletes a device's
    /// nexthops, and their routes, with the device).
    fn forget(&mut self, id: u32) {
        self.idle.remove(&id);
        if let Some(key) = self.ours.remove(&id)
            && self.by_key.get(&key) == Some(&id)
        {
            self.by_key.remove(&key);
        }
    }

    /// Deletes our nexthops no route of ours uses any more. One the kernel
    /// refuses to delete stays ours, to be tried again next time.
    pub fn collect(&mut self, rtnl: &mut Rtnl) -> Result<(), RouteError> {
        let unused: Vec<u32> = self
            .idle
            .iter()
            .copied()
            .filter(|id| self.ours.contains_key(id) && self.users.get(id).copied().unwrap_or(0) == 0)
            .collect();
        for id in unused {
            match rtnl.delete_nexthop(id)? {
                Answer::Refused(refused) if refused.errno != libc::ENOENT && refused.errno != libc::ESRCH => continue,
                _ => {}
            }
            self.forget(id);
            self.users.remove(&id);
        }
        Ok(())
    }
}

/// Deletes the nexthops an agent left behind: provably ours (see below)
/// and used by no route of any table, IPv4 or IPv6, and by no nexthop
/// group. An agent leaves them when it crashes between creating a nexthop
/// and installing its route (nothing records a nexthop but its routes), or
/// when its routes were deleted while it was down (by hand, or with their
/// device's address); [`Nexthops::adopt`] only finds nexthops through
/// routes, so nothing else would ever remove them. Runs at start (the
/// applier's) and in `cleanup`. Returns the ids deleted.
///
/// Why deleting these is safe, though nothing recorded them:
/// - **Ours.** A nexthop counts only if its protocol is ours (157) *and*
///   its id is exactly [`NexthopKey::first_id`] of its own gateway, device
///   and onlink flag, a 31-bit hash with bit 30 set. Another tool would
///   have to pick our protocol and that very id; one that uses 157 with
///   ids of its own choosing (`ip nexthop add id 7 ... proto 157`) or our
///   id with its own protocol is never touched. The ids an agent probes
///   after a taken one (`first_id + 1`, ...) are not provable, so a crash
///   right after such a probe leaves its nexthop behind: rare (it needs a
///   taken id), and left rather than guessed at.
/// - **Unused.** Deleting a nexthop deletes the routes through it, so only
///   nexthops nothing uses go: a provable one still in use (another root's
///   agent in the same namespace, whose route goes through it, or a group
///   of any tool) stays.
/// - **Another root's.** Another agent in the same namespace (another pin
///   root) hashes content the same way, so its unused nexthops count as
///   ours too. Deleting one costs it nothing: its next route through that
///   next hop finds the nexthop gone and creates it again
///   ([`replace_all`]'s second attempt). The one case not covered is a
///   route it adds between our look and our delete (microseconds, at our
///   start or cleanup), which would go with the nexthop; one agent per
///   network namespace, as deployed, has no such neighbour.
pub fn remove_orphaned_nexthops() -> Result<Vec<u32>, RouteError> {
    let mut rtnl = Rtnl::open()?;
    let table = rtnl.nexthops()?;
    let candidates: Vec<u32> = table.nexthops.iter().filter(|n| NexthopKey::of_ours(n).is_some()).map(|n| n.id).collect();
    if candidates.is_empty() {
        return Ok(Vec::new());
    }
    let mut used: HashSet<u32> = table.grouped.into_iter().collect();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        used.extend(rtnl.routes_of(family)?.iter().filter_map(nexthop_id));
    }
    let mut removed = Vec::new();
    for id in candidates.into_iter().filter(|id| !used.contains(id)) {
        match rtnl.delete_nexthop(id)? {
            Answer::Refused(refused) if refused.errno == libc::ENOENT || refused.errno == libc::ESRCH => {}
            Answer::Refused(reason) => return Err(RouteError::Refused { request: format!("nexthop del id {id}"), reason }),
            _ => removed.push(id),
        }
    }
    Ok(removed)
}

/// The nexthop object a route uses, if any (`nhid N`).
fn nexthop_id(route: &RouteMessage) -> Option<u32> {
    route.attributes.iter().find_map(|a| match a {
        RouteAttribute::NhId(id) => Some(*id),
        _ => None,
    })
}

/// A main-table IPv4 route message for `cidr`, to be filled in.
fn route_to(cidr: Ipv4Network) -> RouteMessage {
    let mut route = RouteMessage::default();
    route.header.address_family = AddressFamily::Inet;
    route.header.destination_prefix_length = cidr.prefix();
    route.header.table = RouteHeader::RT_TABLE_MAIN;
    route.attributes.push(RouteAttribute::Destination(RouteAddress::Inet(cidr.network())));
    route
}

/// Adds or replaces the routes toward `peers` over one netlink socket, one
/// request each, so a single change costs no process and thousands cost
/// one socket; each goes through a nexthop object of `nexthops` (created
/// when its next hop is new) and carries `source` as its preferred source,
/// if given (it must be one of this node's addresses). Nexthops no route
/// uses any more are deleted after. Returns the peers whose route the
/// kernel refused (or another's route at their pod CIDR kept out), with
/// the reason and whether a route of ours remains there; the others are
/// in place.
pub fn replace_all<'a>(
    nexthops: &mut Nexthops,
    peers: &'a [PeerState],
    iface: &str,
    vxlan_mtu: u32,
    source: Option<Ipv4Addr>,
) -> Result<Vec<RefusedRoute<'a>>, RouteError> {
    if peers.is_empty() {
        return Ok(Vec::new());
    }
    let Some(ifindex) = crate::iface::interface_index(iface) else {
        let refused = Refused { errno: libc::ENODEV, message: Some(format!("Cannot find device {iface:?}")) };
        return Ok(peers.iter().map(|peer| RefusedRoute { peer, reason: refused.clone(), ours_remains: false }).collect());
    };
    let mut rtnl = Rtnl::open()?;
    let at_our_keys = main_table_routes_at_our_keys(&mut rtnl)?;
    let mut refusals: Vec<(&'a PeerState, Refused)> = Vec::new();
    for peer in peers {
        // The kernel's replace matches on prefix, TOS and metric alone,
        // whatever the protocol: it would take over a connected or another
        // tool's route to the same prefix. Such a route is left, and the
        // peer waits for it to go; where none is, the route is created
        // exclusively, so one added meanwhile is not replaced either.
        let flags = match at_our_keys.get(&peer.pod_cidr) {
            Some(there) if !there.may_be_replaced_for(peer) => {
                refusals.push((peer, not_ours_in_the_way(peer.pod_cidr, there.protocol)));
                continue;
            }
            Some(_) => NLM_F_CREATE | NLM_F_REPLACE,
            None => NLM_F_CREATE | NLM_F_EXCL,
        };
        // A second try when the first went through a nexthop the kernel
        // deleted meanwhile (with its device, or by hand).
        for attempt in 0..2 {
            let nexthop = match nexthop_key(peer, ifindex) {
                None => None,
                Some(key) => match nexthops.obtain(&mut rtnl, key)? {
                    Ok(id) => Some(id),
                    Err(refused) => {
                        refusals.push((peer, refused));
                        break;
                    }
                },
            };
            let message = RouteNetlinkMessage::NewRoute(replace_message(peer, nexthop, vxlan_mtu, source));
            match rtnl.change(message, flags)? {
                // Another's, added since the look.
                Answer::Refused(Refused { errno: libc::EEXIST, .. }) if flags & NLM_F_EXCL != 0 => {
                    refusals.push((peer, not_ours_in_the_way(peer.pod_cidr, RouteProtocol::Unspec)));
                }
                Answer::Refused(refused) => {
                    if let Some(id) = nexthop.filter(|_| attempt == 0)
                        && rtnl.nexthop(id)?.is_none()
                    {
                        nexthops.forget(id);
                        continue;
                    }
                    refusals.push((peer, refused));
                }
                _ => nexthops.assign(peer.pod_cidr, nexthop),
            }
            break;
        }
    }
    nexthops.collect(&mut rtnl)?;
    // A refused replace leaves the route that was there; a route of ours
    // there before is one still.
    let ours = RouteProtocol::from(ROUTE_PROTO_ID);
    Ok(refusals
        .into_iter()
        .map(|(peer, reason)| RefusedRoute {
            peer,
            reason,
            ours_remains: at_our_keys.get(&peer.pod_cidr).is_some_and(|there| there.protocol == ours),
        })
        .collect())
}

/// A peer whose route [`replace_all`] could not write.
#[derive(Debug)]
pub struct RefusedRoute<'a> {
    pub peer: &'a PeerState,
    pub reason: Refused,
    /// Whether a route of ours to the peer's pod CIDR is in place (the one
    /// an update was to replace), or none is (another's is in the way, or
    /// there was none).
    pub ours_remains: bool,
}

/// A main-table route where one of ours would go.
struct RouteAtOurKey {
    protocol: RouteProtocol,
    gateway: Option<Ipv4Addr>,
    oif: Option<u32>,
}

impl RouteAtOurKey {
    /// Ours (this root's or another's), or flannel's toward the same peer
    /// (`proto boot`): out of its vxlan device `flannel.<VNI>`, or
    /// (host-gw, DirectRouting) via the peer's node. Flannel's are replaced in place
    /// when a node migrates (docs/migrate-from-flannel.md), so its pods
    /// lose nothing; any other route (a connected one, another tool's) is
    /// not the agent's to change.
    fn may_be_replaced_for(&self, peer: &PeerState) -> bool {
        if self.protocol == RouteProtocol::from(ROUTE_PROTO_ID) {
            return true;
        }
        // flanneld writes its routes with vishvananda/netlink's default
        // protocol, `boot` (as `ip route add` does by default: those
        // cannot be told apart); `static`, a routing daemon's and the
        // kernel's are someone else's.
        self.protocol == RouteProtocol::Boot
            && (self.gateway == Some(peer.node_ip)
                || self.oif.and_then(interface_name).is_some_and(|name| crate::foreign_vxlan::flannel_device_vni(&name).is_some()))
    }
}

/// The main table's IPv4 routes that an `NLM_F_REPLACE` of one of ours
/// would match (TOS 0, metric 0: ours carry neither), by destination.
fn main_table_routes_at_our_keys(rtnl: &mut Rtnl) -> Result<BTreeMap<Ipv4Network, RouteAtOurKey>, RouteError> {
    Ok(rtnl
        .routes()?
        .iter()
        .filter(|route| table_of(route) == u32::from(RouteHeader::RT_TABLE_MAIN) && route.header.tos == 0)
        .filter(|route| !route.attributes.iter().any(|a| matches!(a, RouteAttribute::Priority(metric) if *metric != 0)))
        .filter_map(|route| {
            let gateway = route.attributes.iter().find_map(|a| match a {
                RouteAttribute::Gateway(RouteAddress::Inet(gateway)) => Some(*gateway),
                _ => None,
            });
            let oif = route.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(index) => Some(*index),
                _ => None,
            });
            Some((destination(route)?, RouteAtOurKey { protocol: route.header.protocol, gateway, oif }))
        })
        .collect())
}

/// The name of the interface with index `index`, if there is one.
fn interface_name(index: u32) -> Option<String> {
    let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer holds IF_NAMESIZE bytes, as if_indextoname needs.
    let found = unsafe { libc::if_indextoname(index, name.as_mut_ptr()) };
    if found.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    Some(unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }.to_string_lossy().into_owned())
}

/// Why a peer's route is not written: `protocol`'s route (unknown:
/// `Unspec`) holds its place.
fn not_ours_in_the_way(cidr: Ipv4Network, protocol: RouteProtocol) -> Refused {
    let whose = match protocol {
        RouteProtocol::Unspec => String::new(),
        RouteProtocol::Kernel => " (proto kernel: an address on this node is in that subnet)".to_owned(),
        other => format!(" (proto {})", u8::from(other)),
    };
    Refused {
        errno: libc::EEXIST,
        message: Some(format!(
            "the main table has a route to {cidr} that the agent did not make{whose}; it is left alone, and the peer's route is written once it goes (remove it, or give that node a pod CIDR no route here uses)"
        )),
    }
}

/// Removes our routes to `cidrs` (as `ip route del CIDR proto 157`); a
/// missing route is not an error. Then deletes the nexthops of `nexthops`
/// no route of ours uses any more. Returns the CIDRs whose route could not
/// be removed.
pub fn remove_all(nexthops: &mut Nexthops, cidrs: &[Ipv4Network]) -> Result<Vec<(Ipv4Network, Refused)>, RouteError> {
    if cidrs.is_empty() {
        return Ok(Vec::new());
    }
    let mut rtnl = Rtnl::open()?;
    let mut failed = Vec::new();
    for cidr in cidrs {
        let mut route = route_to(*cidr);
        route.header.protocol = RouteProtocol::from(ROUTE_PROTO_ID);
        // Any scope and type: only the destination and our protocol match.
        route.header.scope = RouteScope::NoWhere;
        route.header.kind = RouteType::Unspec;
        match rtnl.change(RouteNetlinkMessage::DelRoute(route), 0)? {
            Answer::Refused(refused) if refused.errno != libc::ESRCH => failed.push((*cidr, refused)),
            _ => nexthops.assign(*cidr, None),
        }
    }
    nexthops.collect(&mut rtnl)?;
    Ok(failed)
}

/// How the kernel reaches each address, as `ip route get` answers it: one
/// `RTM_GETROUTE` each over one netlink socket. A route with a gateway is
/// [`UnderlayPath::Gateway`] whatever its device; one without, out of
/// `iface`, is [`UnderlayPath::OnLink`]; anything else (no route, another
/// device, a local address) is [`UnderlayPath::NoRoute`].
pub fn paths(iface: &str, addrs: &[Ipv4Addr]) -> Result<Paths, RouteError> {
    let mut paths = Paths::new();
    if addrs.is_empty() {
        return Ok(paths);
    }
    let ifindex = crate::iface::interface_index(iface);
    let mut rtnl = Rtnl::open()?;
    for addr in addrs {
        let mut query = route_to(Ipv4Network::from(*addr));
        query.header.table = RouteHeader::RT_TABLE_UNSPEC;
        let path = match rtnl.get_route(query)? {
            Answer::Route(route) => path_of(&route, ifindex),
            Answer::Done | Answer::Refused(_) => UnderlayPath::NoRoute,
        };
        paths.insert(*addr, path);
    }
    Ok(paths)
}

/// The path a route the kernel answered describes (see [`paths`]).
fn path_of(route: &RouteMessage, ifindex: Option<u32>) -> UnderlayPath {
    let gateway = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(RouteAddress::Inet(gw)) => Some(*gw),
        _ => None,
    });
    let oif = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(index) => Some(*index),
        _ => None,
    });
    match (gateway, oif) {
        (Some(gw), _) => UnderlayPath::Gateway(gw),
        (None, Some(oif)) if Some(oif) == ifindex => UnderlayPath::OnLink,
        _ => UnderlayPath::NoRoute,
    }
}

/// Destinations of the main table's IPv4 routes of our protocol (as `ip
/// route show proto 157`). Not all ours: another agent's in the same
/// namespace (another pin root) or another tool's carry the same number,
/// so callers remove only those whose destination their own root
/// recorded (its `ROUTES` maps).
pub fn with_our_protocol() -> Result<Vec<Ipv4Network>, RouteError> {
    let routes = Rtnl::open()?.routes()?;
    Ok(routes.iter().filter(|route| is_ours_in_main(route)).filter_map(destination).collect())
}

fn is_ours_in_main(route: &RouteMessage) -> bool {
    route.header.protocol == RouteProtocol::from(ROUTE_PROTO_ID) && table_of(route) == u32::from(RouteHeader::RT_TABLE_MAIN)
}

/// A route's table (the attribute, where the header's byte cannot hold it).
fn table_of(route: &RouteMessage) -> u32 {
    let table = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Table(table) => Some(*table),
        _ => None,
    });
    table.unwrap_or(u32::from(route.header.table))
}

/// The destination of an IPv4 route (`0.0.0.0/0` when it carries none).
fn destination(route: &RouteMessage) -> Option<Ipv4Network> {
    let address = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(address)) => Some(*address),
        _ => None,
    });
    Ipv4Network::new(address.unwrap_or(Ipv4Addr::UNSPECIFIED), route.header.destination_prefix_length).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Flannel's routes (vishvananda/netlink's default, `proto boot`) to a
    /// peer's pod CIDR via the peer's node, or out of `flannel.<VNI>`, are
    /// replaced in place when a node migrates; an operator's `proto
    /// static` route, a routing daemon's or one out of a device merely
    /// named like flannel's is not the agent's to change. (Shown failing
    /// before: the static and bird routes read as replaceable.)
    #[test]
    fn only_flannels_own_routes_are_taken_over() {
        let peer = PeerState {
            pod_cidr: "10.244.2.0/24".parse().unwrap(),
            node_ip: Ipv4Addr::new(192, 168, 0, 2),
            vtep_mac: [0; 6],
            mode: overlay_common::ROUTE_MODE_VXLAN,
            reason: 0,
            next_hop: Ipv4Addr::new(192, 168, 0, 2),
        };
        let at = |protocol: RouteProtocol, gateway: [u8; 4]| RouteAtOurKey { protocol, gateway: Some(gateway.into()), oif: None };
        assert!(at(RouteProtocol::Boot, [192, 168, 0, 2]).may_be_replaced_for(&peer), "flannel's host-gw route");
        assert!(at(RouteProtocol::from(ROUTE_PROTO_ID), [192, 168, 0, 9]).may_be_replaced_for(&peer), "ours");
        for (protocol, why) in [(RouteProtocol::Static, "an operator's proto static"), (RouteProtocol::Bird, "a routing daemon's"), (RouteProtocol::Kernel, "a connected one")] {
            assert!(!at(protocol, [192, 168, 0, 2]).may_be_replaced_for(&peer), "{why}");
        }
        assert!(!at(RouteProtocol::Boot, [192, 168, 0, 9]).may_be_replaced_for(&peer), "via another node");
        let flannels = |name: &str| crate::foreign_vxlan::flannel_device_vni(name).is_some();
        assert!(flannels("flannel.1") && flannels("flannel.4096"));
        assert!(!flannels("flannel.foo") && !flannels("flannel.") && !flannels("flannel1"));
    }

    #[test]
    fn the_kernel_answers_a_route_look_up_over_netlink() {
        // Read-only, in whatever namespace the test runs: loopback is
        // reached out of lo with no gateway.
        let lo = paths("lo", &[Ipv4Addr::LOCALHOST]).unwrap();
        assert_eq!(lo[&Ipv4Addr::LOCALHOST], UnderlayPath::OnLink);
        assert_eq!(paths("eth-none", &[Ipv4Addr::LOCALHOST]).unwrap()[&Ipv4Addr::LOCALHOST], UnderlayPath::NoRoute);
    }

    #[test]
    fn ours_are_the_main_tables_routes_of_our_protocol() {
        let route = |protocol: u8, table: u8, extended_table: Option<u32>| {
            let mut route = route_to("10.244.2.0/24".parse().unwrap());
            route.header.protocol = RouteProtocol::from(protocol);
            route.header.table = table;
            if let Some(table) = extended_table {
                route.attributes.push(RouteAttribute::Table(table));
            }
            route
        };
        assert!(is_ours_in_main(&route(157, 254, None)));
        assert!(is_ours_in_main(&route(157, 254, Some(254))));
        assert!(!is_ours_in_main(&route(157, 255, None)), "local table");
        assert!(!is_ours_in_main(&route(157, 252, Some(1000))), "a table past 255");
        assert!(!is_ours_in_main(&route(4, 254, None)), "another protocol");
        assert_eq!(destination(&route(157, 254, None)), Some("10.244.2.0/24".parse().unwrap()));
        let mut default = RouteMessage::default();
        default.header.address_family = AddressFamily::Inet;
        assert_eq!(destination(&default), Some("0.0.0.0/0".parse().unwrap()));
    }

    #[test]
    fn the_kernel_lists_routes_over_netlink() {
        // Read-only, in whatever namespace the test runs: none of ours
        // outside a lab's namespaces, and the listing itself succeeds.
        let routes = Rtnl::open().unwrap().routes().unwrap();
        assert!(routes.iter().all(|r| r.header.address_family == AddressFamily::Inet));
        assert!(routes.iter().any(|r| r.header.table == 255), "the local table lists loopback");
        with_our_protocol().unwrap();
    }

    #[test]
    fn the_protocol_number_and_its_text_agree() {
        assert_eq!(ROUTE_PROTO, ROUTE_PROTO_ID.to_string());
    }

    #[test]
    fn a_route_with_a_gateway_is_routed_and_one_without_is_on_link_only_out_of_the_underlay() {
        let answer = |attributes: Vec<RouteAttribute>| {
            let mut route = RouteMessage::default();
            route.attributes = attributes;
            route
        };
        let gw = Ipv4Addr::new(192, 168, 0, 254);
        let via = answer(vec![
            RouteAttribute::Gateway(RouteAddress::Inet(gw)),
            RouteAttribute::Oif(9),
        ]);
        assert_eq!(path_of(&via, Some(2)), UnderlayPath::Gateway(gw));
        assert_eq!(
            path_of(&answer(vec![RouteAttribute::Oif(2)]), Some(2)),
            UnderlayPath::OnLink
        );
        assert_eq!(
            path_of(&answer(vec![RouteAttribute::Oif(1)]), Some(2)),
            UnderlayPath::NoRoute
        );
        assert_eq!(
            path_of(&answer(vec![RouteAttribute::Oif(2)]), None),
            UnderlayPath::NoRoute
        );
    }

    #[test]
    fn each_mode_gets_a_route_through_its_nexthop_object() {
        let peer = |mode| PeerState {
            pod_cidr: "10.244.2.0/24".parse().unwrap(),
            node_ip: Ipv4Addr::new(192, 168, 0, 2),
            vtep_mac: [0; 6],
            mode,
            reason: 0,
            next_hop: Ipv4Addr::new(192, 168, 0, 254),
        };
        let vxlan_peer = peer(overlay_common::ROUTE_MODE_VXLAN);
        assert_eq!(
            nexthop_key(&vxlan_peer, 2),
            Some(NexthopKey { gateway: Ipv4Addr::new(192, 168, 0, 254), oif: 2, onlink: true })
        );
        let vxlan = replace_message(&vxlan_peer, Some(7), 1450, None);
        assert!(!vxlan.attributes.iter().any(|a| matches!(a, RouteAttribute::PrefSource(_))), "no source given");
        assert_eq!(vxlan.header.destination_prefix_length, 24);
        assert_eq!(vxlan.header.protocol, RouteProtocol::from(157));
        assert_eq!(vxlan.header.kind, RouteType::Unicast);
        assert!(vxlan.attributes.contains(&RouteAttribute::NhId(7)));
        assert!(!vxlan.attributes.iter().any(|a| matches!(a, RouteAttribute::Gateway(_) | RouteAttribute::Oif(_))), "the nexthop's");
        assert!(vxlan.attributes.contains(&RouteAttribute::Metrics(vec![RouteMetric::Mtu(1450)])));
        let direct_peer = peer(ROUTE_MODE_DIRECT);
        assert_eq!(
            nexthop_key(&direct_peer, 2),
            Some(NexthopKey { gateway: Ipv4Addr::new(192, 168, 0, 2), oif: 2, onlink: false })
        );
        let direct = replace_message(&direct_peer, Some(8), 1450, None);
        assert!(direct.attributes.contains(&RouteAttribute::NhId(8)));
        assert!(!direct.attributes.iter().any(|a| matches!(a, RouteAttribute::Metrics(_))));
        let source = Ipv4Addr::new(192, 168, 0, 21);
        for mode in [overlay_common::ROUTE_MODE_VXLAN, ROUTE_MODE_DIRECT] {
            let route = replace_message(&peer(mode), Some(9), 1450, Some(source));
            assert!(route.attributes.contains(&RouteAttribute::PrefSource(RouteAddress::Inet(source))), "mode {mode}");
        }
        let unreachable_peer = peer(ROUTE_MODE_UNREACHABLE);
        assert_eq!(nexthop_key(&unreachable_peer, 2), None);
        let unreachable = replace_message(&unreachable_peer, None, 1450, Some(source));
        assert_eq!(unreachable.header.kind, RouteType::Unreachable);
        assert_eq!(
            unreachable.attributes,
            [RouteAttribute::Destination(RouteAddress::Inet(
                Ipv4Addr::new(10, 244, 2, 0)
            ))]
        );
    }

    #[test]
    fn a_nexthop_is_provably_ours_only_with_our_protocol_and_the_id_of_its_content() {
        let key = NexthopKey { gateway: Ipv4Addr::new(192, 168, 0, 2), oif: 2, onlink: true };
        let nexthop = crate::rtnl::Nexthop { id: key.first_id(), protocol: 157, gateway: Some(key.gateway), oif: Some(2), onlink: true };
        assert_eq!(NexthopKey::of_ours(&nexthop), Some(key));
        assert_eq!(NexthopKey::of_ours(&crate::rtnl::Nexthop { protocol: 4, ..nexthop }), None, "another protocol");
        assert_eq!(NexthopKey::of_ours(&crate::rtnl::Nexthop { id: key.first_id() + 1, ..nexthop }), None, "a probed id is not provable");
        assert_eq!(NexthopKey::of_ours(&crate::rtnl::Nexthop { onlink: false, ..nexthop }), None, "other content");
        assert_eq!(NexthopKey::of_ours(&crate::rtnl::Nexthop { gateway: None, ..nexthop }), None, "a group or blackhole");
    }

    #[test]
    fn a_next_hops_first_id_is_stable_nonzero_and_differs_by_content() {
        let key = NexthopKey { gateway: Ipv4Addr::new(192, 168, 0, 2), oif: 2, onlink: true };
        assert_eq!(key.first_id(), key.first_id());
        assert!(key.first_id() >= 0x4000_0000);
        assert_ne!(key.first_id(), NexthopKey { onlink: false, ..key }.first_id());
        assert_ne!(key.first_id(), NexthopKey { gateway: Ipv4Addr::new(192, 168, 0, 3), ..key }.first_id());
    }
}
