//! What changed in the kernel, as it happens.
//!
//! A task owns an rtnetlink socket subscribed to the kernel's
//! notifications (links, IPv4 addresses, routes, rules and nexthops, and
//! neighbours, which carry the bridges' forwarding databases) and turns
//! each into at most one [`KernelEvent`] for the agent's event loop, which
//! then reads what it needs (paths to the nodes, the pod bridge's ports)
//! itself. The messages only say *that* something changed: the loop's
//! reads stay the one source of truth, so a message missed or misread
//! costs time, never correctness.
//!
//! Notifications can be lost: the kernel drops them when the socket's
//! receive buffer is full, and says so (`ENOBUFS`). Then, at start (for
//! what changed before the subscription), and every [`RESYNC`] as a
//! safety net, the task sends every event, and the loop re-reads
//! everything.

use std::{collections::BTreeSet, io, time::Duration};

use netlink_packet_core::{NetlinkBuffer, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
    neighbour::NeighbourAttribute,
    route::RouteProtocol,
};
use netlink_sys::{Socket, protocols::NETLINK_ROUTE};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::mpsc,
    task::JoinHandle,
};
use tracing::{debug, warn};

use crate::{
    iface,
    routes::ROUTE_PROTO_ID,
    rtnl::{RTM_DELNEXTHOP, RTM_NEWNEXTHOP},
};

/// How often every event is sent whether or not the kernel said anything:
/// the safety net under lost notifications.
pub const RESYNC: Duration = Duration::from_secs(30);
/// How long the task waits before reopening a socket that failed.
const REOPEN_DELAY: Duration = Duration::from_secs(1);
/// The socket's receive buffer: bursts (a relist's routes, many pods at
/// once) fit without an overflow.
const RECEIVE_BUFFER: usize = 4 << 20;
/// Events waiting for the loop. When full, the task stops reading, the
/// kernel's buffer fills, and the overflow becomes a resync.
const CHANNEL: usize = 16;

/// Where a nexthop notification's `nhmsg.nh_protocol` is: after the
/// 16-byte netlink header, family and scope.
const NEXTHOP_PROTOCOL_OFFSET: usize = 16 + 2;

/// The rtnetlink multicast groups the task joins (`RTNLGRP_*`).
const GROUPS: [u32; 6] = [
    libc::RTNLGRP_LINK,
    libc::RTNLGRP_NEIGH,
    libc::RTNLGRP_IPV4_IFADDR,
    libc::RTNLGRP_IPV4_ROUTE,
    libc::RTNLGRP_IPV4_RULE,
    libc::RTNLGRP_NEXTHOP,
];

/// Something the agent reads from the kernel may have changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KernelEvent {
    /// An IPv4 address, rule, nexthop or route other than ours, or the
    /// underlay link itself, changed: the kernel's paths to the nodes may
    /// have.
    UnderlayChanged,
    /// The pod bridge appeared, went, or was recreated (a new index): the
    /// fast path must attach to it again and CONFIG learn its index.
    PodBridgeChanged,
    /// A port joined or left the pod bridge, the bridge learned or forgot
    /// a MAC behind one, its own MAC changed (a bridge without an address
    /// of its own takes its ports' lowest), or an IPv4 address of its own
    /// came or went: who is on the fast path, or which frames it routes,
    /// may have changed.
    PodPortsChanged,
    /// A device of the agent's device pairs was deleted, taken down or
    /// otherwise changed (its features, say): the datapath may be
    /// redirecting packets to a device that is gone or that no longer does
    /// to them what the datapath needs.
    DevicePairChanged,
    /// A kernel vxlan device was made or changed: one on our UDP port
    /// would decapsulate tunnel traffic our programs do not see
    /// (`foreign_vxlan`).
    VxlanDeviceAppeared,
    /// A route or nexthop object of ours (protocol 157) was deleted: by
    /// the agent itself, or by another tool (`ip route flush proto 157`, a
    /// network manager pruning routes it does not know), whose deletion
    /// cuts the pods behind it off until the route is written again.
    OwnRouteDeleted,
}

impl KernelEvent {
    pub const ALL: [Self; 6] = [
        Self::UnderlayChanged,
        Self::PodBridgeChanged,
        Self::PodPortsChanged,
        Self::DevicePairChanged,
        Self::VxlanDeviceAppeared,
        Self::OwnRouteDeleted,
    ];
}

#[derive(Debug, thiserror::Error)]
pub enum KernelEventsError {
    #[error("opening an rtnetlink socket for the kernel's notifications")]
    Socket(#[source] io::Error),
    #[error("joining rtnetlink multicast group {group}")]
    Subscribe {
        group: u32,
        #[source]
        source: io::Error,
    },
}

/// The links whose changes matter, by name (their indexes change when
/// they are recreated).
#[derive(Debug, Clone)]
pub struct Watched {
    /// The underlay interface (`--iface`).
    pub underlay: String,
    /// The pod bridge, with `--forward bpf`.
    pub pod_bridge: Option<String>,
    /// The ends of the agent's device pairs (`device_pair.rs`), whose
    /// every change is [`KernelEvent::DevicePairChanged`].
    pub device_pairs: Vec<String>,
}

/// The receiving end: [`KernelEvents::next`] is the event loop's arm.
/// Dropping it stops the task.
pub struct KernelEvents {
    events: mpsc::Receiver<KernelEvent>,
    task: JoinHandle<()>,
}

impl KernelEvents {
    /// Subscribes in this network namespace (before returning, so an agent
    /// that cannot subscribe fails at start), then starts the task on the
    /// current tokio runtime. Its first events are all of them: whatever
    /// changed before the subscription is read again.
    pub fn spawn(watched: Watched) -> Result<Self, KernelEventsError> {
        Self::spawn_with_resync(watched, RESYNC)
    }

    /// [`Self::spawn`] with another safety-net period.
    pub fn spawn_with_resync(watched: Watched, resync: Duration) -> Result<Self, KernelEventsError> {
        let socket = subscribe()?;
        let (sender, events) = mpsc::channel(CHANNEL);
        let task = tokio::spawn(listen(socket, Classifier::new(watched), sender, resync));
        Ok(Self { events, task })
    }

    /// Waits for the next event, then takes every other one already
    /// waiting: a burst of notifications becomes one read each.
    pub async fn next(&mut self) -> BTreeSet<KernelEvent> {
        let Some(first) = self.events.recv().await else {
            // The task only ends when this side is dropped.
            return std::future::pending().await;
        };
        let mut events = BTreeSet::from([first]);
        while let Ok(event) = self.events.try_recv() {
            events.insert(event);
        }
        events
    }
}

impl Drop for KernelEvents {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A non-blocking rtnetlink socket in the groups of [`GROUPS`].
fn subscribe() -> Result<AsyncFd<Socket>, KernelEventsError> {
    let mut socket = Socket::new(NETLINK_ROUTE).map_err(KernelEventsError::Socket)?;
    socket.bind_auto().map_err(KernelEventsError::Socket)?;
    for group in GROUPS {
        socket.add_membership(group).map_err(|source| KernelEventsError::Subscribe { group, source })?;
    }
    // Best effort: a smaller buffer only overflows sooner, into a resync.
    let _ = socket.set_rx_buf_sz(RECEIVE_BUFFER);
    socket.set_non_blocking(true).map_err(KernelEventsError::Socket)?;
    // SAFETY: the socket owns its descriptor and closes it only when
    // dropped, which the AsyncFd that owns the socket does last.
    unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }.map_err(|err| KernelEventsError::Socket(err.into()))
}

/// The task: reads notifications as they come, sends what they mean.
async fn listen(mut socket: AsyncFd<Socket>, mut classifier: Classifier, sender: mpsc::Sender<KernelEvent>, resync: Duration) {
    let mut timer = tokio::time::interval_at(tokio::time::Instant::now() + resync, resync);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut buf = vec![0u8; 64 * 1024];
    let mut events: BTreeSet<KernelEvent> = KernelEvent::ALL.into();
    loop {
        for event in std::mem::take(&mut events) {
            if sender.send(event).await.is_err() {
                return;
            }
        }
        tokio::select! {
            _ = timer.tick() => {
                classifier.refresh();
                events.extend(KernelEvent::ALL);
            }
            ready = socket.readable() => {
                let mut guard = match ready {
                    Ok(guard) => guard,
                    Err(err) => {
                        warn!(error = %err, "waiting for the kernel's notifications; reopening the socket");
                        socket = reopen().await;
                        classifier.refresh();
                        events.extend(KernelEvent::ALL);
                        continue;
                    }
                };
                // Everything queued, then back to waiting.
                loop {
                    match guard.try_io(|socket| socket.get_ref().recv(&mut &mut buf[..], 0)) {
                        Ok(Ok(size)) => classifier.read(&buf[..size], &mut events),
                        Ok(Err(err)) if err.raw_os_error() == Some(libc::ENOBUFS) => {
                            debug!("the kernel dropped notifications (socket buffer full); re-reading everything");
                            classifier.refresh();
                            events.extend(KernelEvent::ALL);
                        }
                        Ok(Err(err)) if err.kind() == io::ErrorKind::Interrupted => {}
                        Ok(Err(err)) => {
                            warn!(error = %err, "reading the kernel's notifications; reopening the socket");
                            drop(guard);
                            socket = reopen().await;
                            classifier.refresh();
                            events.extend(KernelEvent::ALL);
                            break;
                        }
                        // Drained: readiness is cleared.
                        Err(_would_block) => break,
                    }
                }
            }
        }
    }
}

/// A new subscription, retried until the kernel grants one.
async fn reopen() -> AsyncFd<Socket> {
    loop {
        tokio::time::sleep(REOPEN_DELAY).await;
        match subscribe() {
            Ok(socket) => return socket,
            Err(err) => warn!(error = %crate::report::Chain(&err), "resubscribing to the kernel's notifications; retrying"),
        }
    }
}

/// Turns notifications into events; follows the watched links' indexes.
#[derive(Debug)]
struct Classifier {
    watched: Watched,
    underlay: Option<u32>,
    pod_bridge: Option<u32>,
    /// The pod bridge's MAC as its last notification gave it.
    pod_bridge_mac: Option<Vec<u8>>,
}

impl Classifier {
    fn new(watched: Watched) -> Self {
        let mut classifier = Self { watched, underlay: None, pod_bridge: None, pod_bridge_mac: None };
        classifier.refresh();
        classifier
    }

    /// Asks the kernel for the watched links' indexes again (after
    /// notifications may have been lost).
    fn refresh(&mut self) {
        self.underlay = iface::interface_index(&self.watched.underlay);
        self.pod_bridge = self.watched.pod_bridge.as_deref().and_then(iface::interface_index);
    }

    /// The events of every message in one datagram. A message that cannot
    /// be decoded counts as every event.
    fn read(&mut self, datagram: &[u8], events: &mut BTreeSet<KernelEvent>) {
        let mut offset = 0;
        while offset < datagram.len() {
            let Ok(header) = NetlinkBuffer::new_checked(&datagram[offset..]) else {
                debug!("a truncated rtnetlink notification; re-reading everything");
                events.extend(KernelEvent::ALL);
                return;
            };
            let (length, kind) = (header.length() as usize, header.message_type());
            let message = &datagram[offset..offset + length];
            offset += length.next_multiple_of(4);
            // Nexthop objects (routes may use them) are not modelled by
            // netlink-packet-route: their type is enough, and `nhmsg`'s
            // protocol (its third byte) sets ours apart. Ours change with
            // every apply, as our routes do; were they to move the underlay,
            // every node update would bring a look-up of every node's path.
            // One of ours deleted takes its routes with it, unannounced.
            if matches!(kind, RTM_NEWNEXTHOP | RTM_DELNEXTHOP) {
                if message.get(NEXTHOP_PROTOCOL_OFFSET) != Some(&ROUTE_PROTO_ID) {
                    events.insert(KernelEvent::UnderlayChanged);
                } else if kind == RTM_DELNEXTHOP {
                    events.insert(KernelEvent::OwnRouteDeleted);
                }
                continue;
            }
            match NetlinkMessage::<RouteNetlinkMessage>::deserialize(message) {
                Ok(NetlinkMessage { payload: NetlinkPayload::InnerMessage(inner), .. }) => events.extend(self.classify(&inner)),
                Ok(_) => {}
                Err(err) => {
                    debug!(error = %err, kind, "an rtnetlink notification that does not decode; re-reading everything");
                    events.extend(KernelEvent::ALL);
                }
            }
        }
    }

    /// What one notification means for the agent, if anything.
    fn classify(&mut self, message: &RouteNetlinkMessage) -> Option<KernelEvent> {
        use RouteNetlinkMessage as M;
        let underlay = |changed: bool| changed.then_some(KernelEvent::UnderlayChanged);
        match message {
            // The pod bridge's own: the fast path leaves pods' packets from
            // its addresses to the kernel (`Config::pod_bridge_ip`).
            M::NewAddress(address) | M::DelAddress(address)
                if address.header.family == AddressFamily::Inet && self.pod_bridge == Some(address.header.index) =>
            {
                Some(KernelEvent::PodPortsChanged)
            }
            M::NewAddress(address) | M::DelAddress(address) => underlay(address.header.family == AddressFamily::Inet),
            // Ours change with every apply, and follow from the paths; one
            // deleted is checked for (the agent's own deletions too: one
            // dump of our routes per batch of them).
            M::NewRoute(route) | M::DelRoute(route) if route.header.address_family != AddressFamily::Inet => None,
            M::DelRoute(route) if route.header.protocol == RouteProtocol::from(ROUTE_PROTO_ID) => Some(KernelEvent::OwnRouteDeleted),
            M::NewRoute(route) | M::DelRoute(route) => underlay(route.header.protocol != RouteProtocol::from(ROUTE_PROTO_ID)),
            M::NewRule(rule) | M::DelRule(rule) => underlay(rule.header.family == AddressFamily::Inet),
            // The pod bridge's forwarding entries (AF_BRIDGE); ARP entries
            // (AF_INET) and other bridges' entries change nothing we read.
            M::NewNeighbour(entry) | M::DelNeighbour(entry) => {
                let bridge = self.pod_bridge?;
                (entry.header.family == AddressFamily::Bridge
                    && entry.attributes.contains(&NeighbourAttribute::Controller(bridge)))
                .then_some(KernelEvent::PodPortsChanged)
            }
            M::NewLink(link) => self.link(link, true),
            M::DelLink(link) => self.link(link, false),
            _ => None,
        }
    }

    fn link(&mut self, link: &LinkMessage, present: bool) -> Option<KernelEvent> {
        let index = link.header.index;
        let name = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(name) => Some(name.as_str()),
            _ => None,
        });
        // A bridge's per-port messages (AF_BRIDGE) carry the port's index
        // and the bridge as master, as do its ports' own.
        let master = link.attributes.iter().find_map(|a| match a {
            LinkAttribute::Controller(master) => Some(*master),
            _ => None,
        });
        if link.header.interface_family != AddressFamily::Bridge
            && let Some(bridge) = &self.watched.pod_bridge
            && (name == Some(bridge.as_str()) || (name.is_none() && Some(index) == self.pod_bridge))
        {
            let now = present.then_some(index);
            let mac = link.attributes.iter().find_map(|a| match a {
                LinkAttribute::Address(mac) => Some(mac.clone()),
                _ => None,
            });
            if now != self.pod_bridge {
                self.pod_bridge = now;
                self.pod_bridge_mac = mac;
                return Some(KernelEvent::PodBridgeChanged);
            }
            // Its MAC, the pods' gateway address, follows its ports' (the
            // lowest) unless set: the fast path routes frames sent to it.
            if mac.is_some() && mac != self.pod_bridge_mac {
                self.pod_bridge_mac = mac;
                return Some(KernelEvent::PodPortsChanged);
            }
            // Its other state (up, down, features) changes no port.
            return None;
        }
        if master.is_some() && master == self.pod_bridge {
            return Some(KernelEvent::PodPortsChanged);
        }
        if present && link.header.interface_family != AddressFamily::Bridge && is_vxlan(link) {
            return Some(KernelEvent::VxlanDeviceAppeared);
        }
        // Their deletion, an end taken down (veth drops what it sends
        // then), or their features changed (`ethtool -K`: the kernel
        // notifies it as a link change). The agent's own setting up of a
        // pair notifies too: by the time the loop hears of it the pair is
        // up, serving and as configured, which is what the agent asks.
        if name.is_some_and(|name| self.watched.device_pairs.iter().any(|end| end == name)) {
            return Some(KernelEvent::DevicePairChanged);
        }
        if name == Some(self.watched.underlay.as_str()) || Some(index) == self.underlay {
            self.underlay = present.then_some(index);
            return Some(KernelEvent::UnderlayChanged);
        }
        None
    }
}

/// Whether the link is a kernel vxlan device (its link info's kind).
fn is_vxlan(link: &LinkMessage) -> bool {
    link.attributes.iter().any(|a| matches!(a, LinkAttribute::LinkInfo(infos) if infos.contains(&LinkInfo::Kind(InfoKind::Vxlan))))
}

#[cfg(test)]
mod tests {
    use netlink_packet_route::{
        address::AddressMessage,
        link::LinkFlags,
        neighbour::NeighbourMessage,
        route::{RouteMessage, RouteType},
        rule::RuleMessage,
    };

    use super::*;

    const UNDERLAY: u32 = 2;
    const BRIDGE: u32 = 3;

    fn classifier() -> Classifier {
        Classifier {
            watched: Watched {
                underlay: "eth0".to_owned(),
                pod_bridge: Some("cni0".to_owned()),
                device_pairs: vec!["ovl-gro0".to_owned(), "ovl-gro1".to_owned()],
            },
            underlay: Some(UNDERLAY),
            pod_bridge: Some(BRIDGE),
            pod_bridge_mac: None,
        }
    }

    fn link(family: AddressFamily, index: u32, name: Option<&str>, master: Option<u32>) -> LinkMessage {
        let mut link = LinkMessage::default();
        link.header.interface_family = family;
        link.header.index = index;
        link.attributes.extend(name.map(|n| LinkAttribute::IfName(n.to_owned())));
        link.attributes.extend(master.map(LinkAttribute::Controller));
        link
    }

    fn route(protocol: u8) -> RouteNetlinkMessage {
        let mut route = RouteMessage::default();
        route.header.address_family = AddressFamily::Inet;
        route.header.protocol = RouteProtocol::from(protocol);
        route.header.kind = RouteType::Unicast;
        RouteNetlinkMessage::NewRoute(route)
    }

    fn fdb_entry(family: AddressFamily, master: u32) -> NeighbourMessage {
        let mut entry = NeighbourMessage::default();
        entry.header.family = family;
        entry.header.ifindex = 7;
        entry.attributes.push(NeighbourAttribute::Controller(master));
        entry
    }

    #[test]
    fn addresses_rules_and_routes_but_ours_move_the_underlay() {
        let mut c = classifier();
        let mut address = AddressMessage::default();
        address.header.family = AddressFamily::Inet;
        assert_eq!(c.classify(&RouteNetlinkMessage::DelAddress(address.clone())), Some(KernelEvent::UnderlayChanged));
        address.header.index = BRIDGE;
        assert_eq!(c.classify(&RouteNetlinkMessage::NewAddress(address.clone())), Some(KernelEvent::PodPortsChanged), "the pod bridge's");
        address.header.family = AddressFamily::Inet6;
        assert_eq!(c.classify(&RouteNetlinkMessage::NewAddress(address)), None, "IPv6 is not our underlay");
        let mut rule = RuleMessage::default();
        rule.header.family = AddressFamily::Inet;
        assert_eq!(c.classify(&RouteNetlinkMessage::NewRule(rule)), Some(KernelEvent::UnderlayChanged));
        assert_eq!(c.classify(&route(4)), Some(KernelEvent::UnderlayChanged), "a static route");
        assert_eq!(c.classify(&route(ROUTE_PROTO_ID)), None, "our own routes");
        let RouteNetlinkMessage::NewRoute(ours) = route(ROUTE_PROTO_ID) else { unreachable!() };
        assert_eq!(c.classify(&RouteNetlinkMessage::DelRoute(ours)), Some(KernelEvent::OwnRouteDeleted), "one of ours deleted");
    }

    #[test]
    fn the_pod_bridges_forwarding_entries_move_its_ports_and_nothing_else_does() {
        let mut c = classifier();
        let learned = RouteNetlinkMessage::NewNeighbour(fdb_entry(AddressFamily::Bridge, BRIDGE));
        assert_eq!(c.classify(&learned), Some(KernelEvent::PodPortsChanged));
        let forgotten = RouteNetlinkMessage::DelNeighbour(fdb_entry(AddressFamily::Bridge, BRIDGE));
        assert_eq!(c.classify(&forgotten), Some(KernelEvent::PodPortsChanged));
        let other_bridge = RouteNetlinkMessage::NewNeighbour(fdb_entry(AddressFamily::Bridge, 9));
        assert_eq!(c.classify(&other_bridge), None);
        let arp = RouteNetlinkMessage::NewNeighbour(fdb_entry(AddressFamily::Inet, BRIDGE));
        assert_eq!(c.classify(&arp), None);
        let mut kernel_forward = classifier();
        kernel_forward.watched.pod_bridge = None;
        kernel_forward.pod_bridge = None;
        assert_eq!(kernel_forward.classify(&learned), None, "without --forward bpf no bridge is watched");
    }

    #[test]
    fn links_joining_or_leaving_the_pod_bridge_move_its_ports() {
        let mut c = classifier();
        // `ip link add` of a veth: not a port yet.
        assert_eq!(c.classify(&RouteNetlinkMessage::NewLink(link(AddressFamily::Unspec, 7, Some("veth1"), None))), None);
        // `ip link set veth1 master cni0`, then the bridge's own message.
        let joined = RouteNetlinkMessage::NewLink(link(AddressFamily::Unspec, 7, Some("veth1"), Some(BRIDGE)));
        assert_eq!(c.classify(&joined), Some(KernelEvent::PodPortsChanged));
        let port_info = RouteNetlinkMessage::NewLink(link(AddressFamily::Bridge, 7, Some("veth1"), Some(BRIDGE)));
        assert_eq!(c.classify(&port_info), Some(KernelEvent::PodPortsChanged));
        // Leaving: the bridge says which port left.
        let left = RouteNetlinkMessage::DelLink(link(AddressFamily::Bridge, 7, Some("veth1"), Some(BRIDGE)));
        assert_eq!(c.classify(&left), Some(KernelEvent::PodPortsChanged));
        // Another bridge's port.
        let elsewhere = RouteNetlinkMessage::NewLink(link(AddressFamily::Unspec, 8, Some("veth9"), Some(9)));
        assert_eq!(c.classify(&elsewhere), None);
    }

    #[test]
    fn the_pod_bridge_is_followed_by_name_through_recreation() {
        let mut c = classifier();
        // Its own state changes (up, carrier): nothing to re-attach.
        let same = RouteNetlinkMessage::NewLink(link(AddressFamily::Unspec, BRIDGE, Some("cni0"), None));
        assert_eq!(c.classify(&same), None);
        let gone = RouteNetlinkMessage::DelLink(link(AddressFamily::Unspec, BRIDGE, Some("cni0"), None));
        assert_eq!(c.classify(&gone), Some(KernelEvent::PodBridgeChanged));
        assert_eq!(c.pod_bridge, None);
        // Entries of the old index no longer count.
        let stale = RouteNetlinkMessage::NewNeighbour(fdb_entry(AddressFamily::Bridge, BRIDGE));
        assert_eq!(c.classify(&stale), None);
        let back = RouteNetlinkMessage::NewLink(link(AddressFamily::Unspec, 11, Some("cni0"), None));
        assert_eq!(c.classify(&back), Some(KernelEvent::PodBridgeChanged));
        assert_eq!(c.pod_bridge, Some(11));
        let learned = RouteNetlinkMessage::NewNeighbour(fdb_entry(AddressFamily::Bridge, 11));
        assert_eq!(c.classify(&learned), Some(KernelEvent::PodPortsChanged));
    }

    #[test]
    fn the_pod_bridges_mac_changing_moves_its_ports() {
        let mut c = classifier();
        let with_mac = |mac: [u8; 6]| {
            let mut message = link(AddressFamily::Unspec, BRIDGE, Some("cni0"), None);
            message.attributes.push(LinkAttribute::Address(mac.to_vec()));
            RouteNetlinkMessage::NewLink(message)
        };
        assert_eq!(c.classify(&with_mac([2, 0, 0, 0, 0, 9])), Some(KernelEvent::PodPortsChanged), "first seen");
        assert_eq!(c.classify(&with_mac([2, 0, 0, 0, 0, 9])), None, "the same MAC: up, down, features");
        // A port with a lower MAC joined: the bridge took it.
        assert_eq!(c.classify(&with_mac([2, 0, 0, 0, 0, 1])), Some(KernelEvent::PodPortsChanged));
    }

    #[test]
    fn the_underlay_link_moves_the_underlay() {
        let mut c = classifier();
        let down = RouteNetlinkMessage::NewLink(link(AddressFamily::Unspec, UNDERLAY, Some("eth0"), None));
        assert_eq!(c.classify(&down), Some(KernelEvent::UnderlayChanged));
        let other = RouteNetlinkMessage::NewLink(link(AddressFamily::Unspec, 5, Some("eth1"), None));
        assert_eq!(c.classify(&other), None);
    }

    #[test]
    fn a_vxlan_device_made_or_changed_is_an_event_and_its_deletion_is_not() {
        let mut c = classifier();
        let vxlan = |present: bool, kind: InfoKind| {
            let mut message = link(AddressFamily::Unspec, 12, Some("flannel.1"), None);
            message.attributes.push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(kind)]));
            if present { RouteNetlinkMessage::NewLink(message) } else { RouteNetlinkMessage::DelLink(message) }
        };
        assert_eq!(c.classify(&vxlan(true, InfoKind::Vxlan)), Some(KernelEvent::VxlanDeviceAppeared));
        assert_eq!(c.classify(&vxlan(false, InfoKind::Vxlan)), None);
        assert_eq!(c.classify(&vxlan(true, InfoKind::Veth)), None);
    }

    #[test]
    fn any_change_of_a_device_pair_is_an_event() {
        let mut c = classifier();
        for end in ["ovl-gro0", "ovl-gro1"] {
            let mut up = link(AddressFamily::Unspec, 9, Some(end), None);
            up.header.flags = LinkFlags::Up;
            assert_eq!(c.classify(&RouteNetlinkMessage::NewLink(up)), Some(KernelEvent::DevicePairChanged), "{end} changed (its features, say)");
            let down = RouteNetlinkMessage::NewLink(link(AddressFamily::Unspec, 9, Some(end), None));
            assert_eq!(c.classify(&down), Some(KernelEvent::DevicePairChanged), "{end} down");
            let gone = RouteNetlinkMessage::DelLink(link(AddressFamily::Unspec, 9, Some(end), None));
            assert_eq!(c.classify(&gone), Some(KernelEvent::DevicePairChanged), "{end} deleted");
        }
        let other = RouteNetlinkMessage::DelLink(link(AddressFamily::Unspec, 9, Some("ovl-gro2"), None));
        assert_eq!(c.classify(&other), None);
    }

    #[test]
    fn a_datagram_is_read_message_by_message_and_garbage_rereads_everything() {
        let mut c = classifier();
        let mut datagram = Vec::new();
        for message in [route(4), RouteNetlinkMessage::NewNeighbour(fdb_entry(AddressFamily::Bridge, BRIDGE))] {
            let mut packet = NetlinkMessage::from(message);
            packet.finalize();
            let mut bytes = vec![0; packet.buffer_len()];
            packet.serialize(&mut bytes);
            datagram.extend_from_slice(&bytes);
        }
        let mut events = BTreeSet::new();
        c.read(&datagram, &mut events);
        assert_eq!(events, BTreeSet::from([KernelEvent::UnderlayChanged, KernelEvent::PodPortsChanged]));
        // A nexthop object, by its type alone.
        let mut nexthop = vec![0u8; 24];
        nexthop[..4].copy_from_slice(&24u32.to_ne_bytes());
        nexthop[4..6].copy_from_slice(&RTM_NEWNEXTHOP.to_ne_bytes());
        let mut events = BTreeSet::new();
        c.read(&nexthop, &mut events);
        assert_eq!(events, BTreeSet::from([KernelEvent::UnderlayChanged]));
        // Ours (protocol 157) move nothing; one deleted took its routes.
        nexthop[NEXTHOP_PROTOCOL_OFFSET] = ROUTE_PROTO_ID;
        for (kind, expected) in [(RTM_NEWNEXTHOP, BTreeSet::new()), (RTM_DELNEXTHOP, BTreeSet::from([KernelEvent::OwnRouteDeleted]))] {
            nexthop[4..6].copy_from_slice(&kind.to_ne_bytes());
            let mut events = BTreeSet::new();
            c.read(&nexthop, &mut events);
            assert_eq!(events, expected, "our nexthop, message type {kind}");
        }
        let mut events = BTreeSet::new();
        c.read(&[1, 2, 3], &mut events);
        assert_eq!(events, BTreeSet::from(KernelEvent::ALL));
    }
}
