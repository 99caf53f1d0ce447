//! Types shared by the overlay eBPF programs (`overlay-ebpf`) and the agent.
//!
//! Every map key and value is `#[repr(C)]` with explicit padding so that the
//! kernel, the agent and `bpftool map dump` all agree on one layout. No
//! `bool`, enum or `Option` appears in a map type: modes and flags are plain
//! integers with named constants below. The two `#[repr(u8)]` enums,
//! [`Counter`] and [`DropReason`], only number the slots of `COUNTERS`.
//!
//! IPv4 addresses are stored as `[u8; 4]` in network byte order, exactly as
//! they appear on the wire, so the datapath compares them without swapping.
#![no_std]

/// File names of the pinned maps under the agent's bpffs root.
pub mod map_names {
    /// LPM trie, remote pod CIDR (`Key<[u8; 4]>`) → [`crate::Route`].
    pub const ROUTES: &str = "ROUTES";
    /// Underlay IPv4 address → [`crate::Peer`]: the nodes we accept tunnel
    /// traffic from.
    pub const PEERS: &str = "PEERS";
    /// Single-entry array holding this node's [`crate::Config`].
    pub const CONFIG: &str = "CONFIG";
    /// Per-CPU array of [`crate::Tally`], one slot per [`crate::Counter`]
    /// and [`crate::DropReason`].
    pub const COUNTERS: &str = "COUNTERS";
    /// Hash, local pod MAC (`[u8; 6]`) → [`crate::PodPort`]: the pods the
    /// fast path serves, and the veth each sits behind.
    pub const POD_PORTS: &str = "POD_PORTS";
    /// LRU hash of [`crate::SocketKey`]: local pod sockets that talk
    /// through the kernel (to Services and beyond), whose replies the fast
    /// path leaves to the kernel so conntrack can undo its NAT.
    pub const KERNEL_SOCKETS: &str = "KERNEL_SOCKETS";

    /// Every pinned map, in the order `inspect` prints them.
    pub const ALL: [&str; 6] = [CONFIG, PEERS, ROUTES, POD_PORTS, KERNEL_SOCKETS, COUNTERS];
}

/// How many remote nodes the datapath holds: the capacity of `ROUTES` and
/// `PEERS`, which take one entry per remote node. 65,536 is every /24 pod
/// CIDR of a /8 Network (flannel's largest usual layout), over three times
/// the 20,000 nodes the agent is measured with, and beyond the 5,000 nodes
/// Kubernetes is tested to. `PEERS` is preallocated: about 5 MiB of kernel
/// memory per node at this size whatever the cluster's size (measured with
/// `bpftool map show`, see docs/benchmarks/scale.md); `ROUTES` grows with
/// its entries. A node beyond it is left out and reported, never half
/// programmed (the agent's `apply`).
pub const MAX_PEERS: usize = 65_536;

/// Names of the programs in the eBPF object.
pub mod program_names {
    /// TC egress on the underlay interface: encapsulates packets to remote pod CIDRs.
    pub const TC_EGRESS: &str = "overlay_tc_egress";
    /// XDP on the underlay interface: validates and decapsulates tunnel traffic.
    pub const XDP_INGRESS: &str = "overlay_xdp_ingress";
    /// TC ingress variant of the decapsulation, for interfaces without XDP.
    pub const TC_INGRESS: &str = "overlay_tc_ingress";
    /// TC ingress on each pod's veth and on the pod bridge: the fast path's
    /// outbound half (`--forward bpf`).
    pub const TC_POD: &str = "overlay_tc_pod";

    /// TC egress on each pod's veth (`--forward bpf`): records the sockets
    /// the kernel's path delivered to, so their replies stay on it.
    pub const TC_POD_DELIVERED: &str = "overlay_tc_pod_delivered";

    /// TC ingress on the segmentation device's receiving end (`ovl-seg1`):
    /// encapsulates the segments of a pod tunnel's GSO packets.
    pub const TC_SEGMENTED: &str = "overlay_tc_segmented";

    /// TC ingress on the GRO device's receiving end (`ovl-gro1`): delivers
    /// the TCP segments GRO merged there into the pods, or returns them to
    /// the kernel's path at the underlay's ingress.
    pub const TC_GRO: &str = "overlay_tc_gro";

    /// Every program, in load order.
    pub const ALL: [&str; 7] = [TC_EGRESS, XDP_INGRESS, TC_INGRESS, TC_POD, TC_POD_DELIVERED, TC_SEGMENTED, TC_GRO];
}

/// Outer Ethernet (14) + IPv4 (20) + UDP (8) + VXLAN (8): what encapsulation
/// adds to an inner IPv4 packet, and so what the pod MTU gives up.
pub const VXLAN_OVERHEAD: u32 = 50;
/// flannel's default VXLAN port (the Linux kernel's historical default).
pub const DEFAULT_VXLAN_PORT: u16 = 8472;
/// IANA's VXLAN port (RFC 7348).
pub const IANA_VXLAN_PORT: u16 = 4789;
/// flannel's default VNI.
pub const DEFAULT_VNI: u32 = 1;
/// The `skb->mark` with which our programs hand a packet to the
/// underlay's ingress for the kernel's path: a merged packet
/// `overlay_tc_gro` does not deliver, a tunnel datagram split and
/// decapsulated on the segmentation device that the fast path does not
/// deliver (both checked before they were decapsulated), and, behind TC
/// decapsulation, the datapath's own ICMP "fragmentation needed" reply.
/// There `overlay_tc_ingress` passes it to the kernel's path unchecked and
/// clears the mark before anything else sees it. A packet from the wire
/// or from a pod arrives with mark 0 (crossing namespaces clears it); only
/// a program in the node's own namespace could set it. Bits 0x4000 and
/// 0x8000, which kube-proxy uses, are clear.
pub const KERNEL_PATH_MARK: u32 = 0x6f76_0001;
/// The `skb->mark` with which the datapath's own tunnel packets that are
/// redirected to the underlay (the fast path's, and a pod tunnel's
/// segments encapsulated on the segmentation device) meet its egress
/// program, which clears it: only they, among the tunnel datagrams for a
/// peer that the node forwards, are the datapath's (`forwarded_tunnel`).
/// Unforgeable as [`KERNEL_PATH_MARK`] is.
pub const OWN_TUNNEL_MARK: u32 = 0x6f76_0002;

/// [`Config::xdp_decap`]: TC ingress decapsulates and judges bare packets;
/// XDP, if attached, passes every frame to it untouched.
pub const DECAP_HOOK_TC: u16 = 0;
/// [`Config::xdp_decap`]: XDP decapsulates and judges bare packets; TC
/// ingress takes every bare packet for one XDP judged (or decapsulated).
pub const DECAP_HOOK_XDP: u16 = 1;
/// [`Config::xdp_decap`], on the way from TC to XDP: XDP judges bare
/// packets and decapsulates nothing; TC ingress decapsulates and judges
/// bare packets too (XDP may have passed one unjudged just before).
pub const DECAP_HOOK_TO_XDP: u16 = 2;
/// [`Config::xdp_decap`], on the way from XDP to TC: XDP judges bare
/// packets and decapsulates nothing; TC ingress decapsulates and takes
/// bare packets for judged (XDP may have decapsulated one just before).
/// Held until nothing XDP decapsulated can still be on its way.
pub const DECAP_HOOK_FROM_XDP: u16 = 3;

/// [`Route::mode`]: reach the CIDR through a VXLAN tunnel to the node.
pub const ROUTE_MODE_VXLAN: u8 = 1;
/// [`Route::mode`]: forward unencapsulated to the node (host-gw).
pub const ROUTE_MODE_DIRECT: u8 = 2;
/// [`Route::mode`]: cannot be served (host-gw with a router in between);
/// the kernel route is `unreachable`, so senders get an ICMP error.
pub const ROUTE_MODE_UNREACHABLE: u8 = 3;

/// [`Route::reason`]: the backend is vxlan without direct routing, whatever
/// the path to the node; such a peer sends to our pods only encapsulated.
pub const ROUTE_REASON_BACKEND: u8 = 1;
/// [`Route::reason`]: the node is on-link (`ip route get` has no gateway).
pub const ROUTE_REASON_ON_LINK: u8 = 2;
/// [`Route::reason`]: a gateway lies between us and the node.
pub const ROUTE_REASON_GATEWAY: u8 = 3;
/// [`Route::reason`]: the kernel has no route to the node on the underlay
/// (host-gw, or vxlan with direct routing).
pub const ROUTE_REASON_NO_ROUTE: u8 = 4;

/// Value of the `ROUTES` map: how to reach one remote pod CIDR.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Route {
    /// Underlay address of the node that owns the CIDR.
    pub node_ip: [u8; 4],
    /// The node's VTEP MAC, used as the inner destination MAC so flannel
    /// nodes accept our frames.
    pub vtep_mac: [u8; 6],
    /// One of `ROUTE_MODE_*`.
    pub mode: u8,
    /// Why this mode: one of `ROUTE_REASON_*`.
    pub reason: u8,
    /// The kernel route's next hop toward the node: the node itself when
    /// it is on-link, else the gateway in between.
    pub next_hop: [u8; 4],
}

/// Value of the `PEERS` map (keyed by the peer's underlay IPv4 address):
/// a node we accept tunnel traffic from, and the pod CIDR its inner source
/// addresses must fall in.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Peer {
    /// The peer's pod CIDR network address.
    pub pod_cidr: [u8; 4],
    /// The peer's pod CIDR prefix length.
    pub pod_prefix_len: u32,
}

/// Value of the `POD_PORTS` map (keyed by a local pod's MAC): the pod's
/// host-side veth on the pod bridge, where the agent has attached the fast
/// path. A pod in this map is fast both ways: its packets to remote pods
/// leave from that veth's ingress, and packets for it are redirected into
/// its namespace through the veth (`bpf_redirect_peer`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PodPort {
    /// Index of the host-side veth.
    pub ifindex: u32,
}

/// Key of the `KERNEL_SOCKETS` map: one local pod socket, as the packets it
/// sends carry it (address, port and protocol as on the wire).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SocketKey {
    /// The pod's IPv4 address.
    pub addr: [u8; 4],
    /// The pod's TCP, UDP or SCTP port, network byte order.
    pub port: [u8; 2],
    /// IPPROTO_TCP, IPPROTO_UDP or IPPROTO_SCTP.
    pub proto: u8,
    /// Explicit padding; always zero.
    pub _pad: u8,
}

/// This node's datapath configuration: entry 0 of the `CONFIG` array.
/// A zero `enabled` means the agent has not configured the datapath yet, and
/// the programs pass everything untouched.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Config {
    /// Non-zero once the agent has written a complete configuration.
    pub enabled: u32,
    /// VXLAN network identifier (host byte order).
    pub vni: u32,
    /// This node's underlay IPv4 address: outer source and the only outer
    /// destination we decapsulate.
    pub node_ip: [u8; 4],
    /// VXLAN UDP destination port (host byte order).
    pub vxlan_port: u16,
    /// Which hook decapsulates, and judges bare packets' sources: one of
    /// `DECAP_HOOK_*`. TC ingress cannot tell a packet XDP decapsulated
    /// from one that arrived bare, so behind XDP it leaves that judgement
    /// to XDP; the two handover stages let a restart move between the
    /// hooks without a packet meeting a hook that misjudges it.
    pub xdp_decap: u16,
    /// This node's VTEP MAC: inner source MAC on encapsulation and the inner
    /// destination MAC flannel peers send to us.
    pub vtep_mac: [u8; 6],
    /// Explicit padding; always zero.
    pub _pad1: u16,
    /// Index of the underlay interface.
    pub underlay_ifindex: u32,
    /// Largest inner packet that fits the underlay once encapsulated.
    pub inner_mtu: u32,
    /// This node's own pod CIDR network address.
    pub pod_cidr: [u8; 4],
    /// This node's own pod CIDR prefix length.
    pub pod_prefix_len: u32,
    /// Index of the pod bridge while the fast path (`--forward bpf`) is
    /// attached to it; 0 otherwise. Inbound packets for local pods are
    /// redirected to it.
    pub pod_bridge_ifindex: u32,
    /// The underlay interface's MTU: the largest packet a direct peer takes.
    pub underlay_mtu: u32,
    /// The pod bridge's MAC (the pods' gateway) while the fast path is on:
    /// frames from pods to it are the ones to route.
    pub pod_bridge_mac: [u8; 6],
    /// Explicit padding; always zero.
    pub _pad2: u16,
    /// Index of the segmentation device's sending end (`ovl-seg0`), or 0
    /// without it: GSO packets of a pod's own tunnel, which
    /// `bpf_skb_adjust_room` will not encapsulate again, are redirected
    /// there so the kernel segments them before they are encapsulated.
    pub seg_ifindex: u32,
    /// Index of the GRO device's sending end (`ovl-gro0`), or 0 without
    /// it. Non-zero: a lone TCP segment the underlay's TC ingress
    /// decapsulated for a local pod is redirected there, the receiving
    /// end's NAPI merges the segments (GRO), and `overlay_tc_gro` decides
    /// once per merged packet what the fast path decides per packet
    /// otherwise.
    pub gro_ifindex: u32,
    /// The pod bridge's own IPv4 address in this node's pod CIDR (the
    /// pods' gateway) while the fast path is on, else zero. A pod's packet
    /// from it is the kernel's to judge, which drops it as a martian (one
    /// of the node's own addresses arriving on an interface): forwarded,
    /// the pod would speak for its node.
    pub pod_bridge_ip: [u8; 4],
}

/// Declares a `#[repr(u8)]` enum whose variants number the slots of the
/// `COUNTERS` map, with `ALL` (every variant, in slot order), `name()` (the
/// label `inspect` and `/metrics` print) and `description()` (the variant's
/// doc comment, which is the metric's help). One line per variant is all a
/// new reason or counter takes.
macro_rules! slot_enum {
    (
        $(#[$meta:meta])*
        pub enum $enum:ident {
            $( $(#[doc = $doc:literal])* $variant:ident = $name:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[repr(u8)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $enum {
            $( $(#[doc = $doc])* $variant, )+
        }

        impl $enum {
            /// Every variant, in slot order (`ALL[i] as usize == i`).
            pub const ALL: &'static [Self] = &[ $( Self::$variant, )+ ];
            /// How many variants there are.
            pub const COUNT: usize = Self::ALL.len();

            /// The label `inspect` and `/metrics` print.
            pub const fn name(self) -> &'static str {
                match self { $( Self::$variant => $name, )+ }
            }

            /// What it counts (the variant's doc comment).
            pub const fn description(self) -> &'static str {
                match self { $( Self::$variant => concat!($($doc),*), )+ }.trim_ascii()
            }
        }
    };
}

slot_enum! {
    /// Why the datapath dropped a packet. Each reason has its own slot in
    /// the `COUNTERS` map (after the [`Counter`] slots, see
    /// [`DropReason::slot`]); `inspect` and `overlay_datapath_drops_total`
    /// list them all. To add one: a line here, and the code that returns it.
    pub enum DropReason {
        /// Tunnel packet shorter than its headers.
        Truncated = "truncated",
        /// VXLAN flags without the I bit, or reserved bits set.
        BadFlags = "bad_flags",
        /// VXLAN with a VNI other than ours.
        WrongVni = "wrong_vni",
        /// Tunnel traffic whose outer source is not a known node.
        UnknownSource = "unknown_source",
        /// Inner source outside the sending node's pod CIDR.
        SpoofedInner = "spoofed_inner",
        /// Outer IPv4 header of tunnel traffic not as a node sends it: not
        /// version 4, options, a fragment, a wrong header checksum, or
        /// lengths that disagree with the frame (total length past its
        /// end, UDP length not the rest of the packet or too short for the
        /// inner packet); or a frame under more than four stacked priority
        /// tags (VLAN ID 0), which no sender stacks.
        BadOuter = "bad_outer",
        /// Tunnel payload that is not IPv4, or not addressed to a pod of
        /// this node.
        BadInner = "bad_inner",
        /// A kernel helper failed (adjust room, redirect, ...).
        HelperError = "helper_error",
        /// Unencapsulated on the underlay, from one of our own pods, or for
        /// our pods from a pod, or the node, of a peer we reach by VXLAN:
        /// neither ever arrives so, so it is forged (a host on the underlay
        /// claiming a pod's or that node's address).
        BareTunnelSource = "bare_tunnel_source",
        /// Decapsulated with the outer header marked Congestion
        /// Experienced while the inner packet is not ECN-capable (RFC 6040
        /// §4.2: the congestion cannot be signalled, so the packet is
        /// dropped, as the kernel's vxlan device does).
        EcnNotEct = "ecn_not_ect",
        /// A segment of a pod tunnel's GSO packet, arriving at the agent's
        /// segmentation device (`ovl-seg1`), with no VXLAN route for its
        /// destination (the route went away while the kernel segmented
        /// it), or something other than the datapath sent there.
        SegmentNoRoute = "segment_no_route",
        /// Came out of the agent's GRO device (`ovl-gro1`) while the
        /// datapath had no configuration to deliver or return it with.
        GroUnconfigured = "gro_unconfigured",
        /// Longer than the tunnel MTU at the underlay's egress: with DF set,
        /// and not answered with "fragmentation needed" because RFC 1122
        /// §3.2.2 forbids it (an ICMP error, a fragment past the first, or
        /// a header too short to quote; the kernel drops these unanswered
        /// too); or without DF, from a socket that fragments at the
        /// interface's MTU rather than the route's (IP_PMTUDISC_OMIT or
        /// _INTERFACE, a raw socket), which nothing at this hook can
        /// fragment and the underlay would drop unseen.
        TooBig = "too_big",
        /// VXLAN for a peer's tunnel port that this node forwards rather
        /// than sends (a pod's own datagrams, through the pod bridge):
        /// masqueraded on the way out, it would reach the peer from this
        /// node's address and be decapsulated as this node's, inner
        /// source and all, so any pod could speak for every pod of its
        /// node and for the node.
        ForwardedTunnel = "forwarded_tunnel",
    }
}

slot_enum! {
    /// What the datapath counts besides drops: one slot of the `COUNTERS`
    /// map each, holding packets and bytes. Each packet is counted once per
    /// program that handled it; the metric family of each is in the agent's
    /// `metrics.rs` and in the README.
    pub enum Counter {
        /// Underlay egress, or the fast path: encapsulated into VXLAN for
        /// a peer.
        Encap = "encap",
        /// Underlay egress: to a direct-mode peer, left to the kernel
        /// route unencapsulated.
        Direct = "direct",
        /// Underlay ingress: valid VXLAN, decapsulated.
        Decap = "decap",
        /// Underlay egress or ingress: not ours, passed on untouched.
        Pass = "pass",
        /// Fast path, out: from a local pod's veth straight to the
        /// underlay (also counted as `encap` when it encapsulated the
        /// packet; to a direct-mode peer the underlay's egress counts it
        /// as `direct`).
        FastpathOut = "fastpath_out",
        /// Fast path, in: from the underlay's ingress straight into a local
        /// pod (also counted as `decap` when it was decapsulated, at TC or
        /// XDP; a pod packet that arrived bare, host-gw's or a direct
        /// peer's, is counted here only), or from the GRO device, merged,
        /// into a local pod (its segments counted as `gro_in`).
        FastpathIn = "fastpath_in",
        /// ICMP fragmentation-needed replies sent for too-big DF packets.
        IcmpFragNeeded = "icmp_frag_needed",
        /// VXLAN from a known node to the other well-known port (4789 vs
        /// 8472), passed on (also counted as `pass`); the agent warns.
        MismatchedPort = "mismatched_port",
        /// A segment of a GSO packet of a pod's own tunnel (which
        /// `bpf_skb_adjust_room` will not encapsulate as one), cut by the
        /// kernel on the agent's segmentation device, then encapsulated
        /// (also counted as `encap`) and sent to the underlay.
        Segmented = "segmented",
        /// Fast path, in: a lone TCP segment decapsulated at the
        /// underlay's TC ingress (also counted there as `decap`), sent to
        /// the agent's GRO device to be merged with the segments that
        /// follow it.
        GroIn = "gro_in",
        /// Fast path, in: a packet merged on the GRO device that the fast
        /// path does not deliver (the kernel's to carry: see
        /// `fastpath_in`), returned to the underlay's ingress and passed
        /// to the kernel's path there (also counted as `pass`).
        GroReturned = "gro_returned",
    }
}

/// Number of slots in the `COUNTERS` map: every [`Counter`], then every
/// [`DropReason`].
pub const COUNTER_SLOTS: usize = Counter::COUNT + DropReason::COUNT;

impl Counter {
    /// This counter's index in the `COUNTERS` map.
    pub const fn slot(self) -> u32 {
        self as u32
    }
}

impl DropReason {
    /// This reason's index in the `COUNTERS` map.
    pub const fn slot(self) -> u32 {
        (Counter::COUNT + self as usize) as u32
    }
}

/// Value of one `COUNTERS` slot, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Tally {
    pub packets: u64,
    /// Bytes of those packets as the program saw them (for encapsulation
    /// and decapsulation: of the inner packet).
    pub bytes: u64,
}

impl Tally {
    /// Adds `other` (summing per-CPU copies).
    pub fn add(&mut self, other: &Self) {
        self.packets += other.packets;
        self.bytes += other.bytes;
    }
}

/// The `COUNTERS` map summed over CPUs, as the agent reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Totals {
    pub slots: [Tally; COUNTER_SLOTS],
}

impl Default for Totals {
    fn default() -> Self {
        Self { slots: [Tally::default(); COUNTER_SLOTS] }
    }
}

impl Totals {
    /// Packets counted under `counter`.
    pub fn packets(&self, counter: Counter) -> u64 {
        self.slots[counter.slot() as usize].packets
    }

    /// Bytes counted under `counter`.
    pub fn bytes(&self, counter: Counter) -> u64 {
        self.slots[counter.slot() as usize].bytes
    }

    /// Packets dropped for `reason`.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.slots[reason.slot() as usize].packets
    }

    /// Adds one slot's value (`slot` as in [`Counter::slot`] or
    /// [`DropReason::slot`]); slots past the end are ignored.
    pub fn add(&mut self, slot: usize, value: &Tally) {
        if let Some(total) = self.slots.get_mut(slot) {
            total.add(value);
        }
    }

    /// Every drop, with its reason, in slot order.
    pub fn drops_by_reason(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL.iter().map(|&reason| (reason, self.drops(reason)))
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all impls): #[repr(C)], only integer and byte-array fields,
    // explicit padding, so every bit pattern is valid.
    unsafe impl aya::Pod for super::Route {}
    unsafe impl aya::Pod for super::Peer {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::Tally {}
    unsafe impl aya::Pod for super::PodPort {}
    unsafe impl aya::Pod for super::SocketKey {}
}

#[cfg(test)]
mod tests {
    use core::mem::{align_of, size_of};

    use super::*;

    // The kernel side reads these with fixed offsets; a layout change must be
    // deliberate (and bump the pin directory version).
    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<Route>(), 16);
        assert_eq!(align_of::<Route>(), 1);
        assert_eq!(size_of::<Peer>(), 8);
        assert_eq!(size_of::<PodPort>(), 4);
        assert_eq!(size_of::<SocketKey>(), 8);
        assert_eq!(size_of::<Config>(), 68);
        assert_eq!(size_of::<Tally>(), 16);
    }

    #[test]
    fn slots_follow_the_enums() {
        for (i, counter) in Counter::ALL.iter().enumerate() {
            assert_eq!(counter.slot() as usize, i);
            assert!(!counter.description().is_empty(), "{counter:?}");
        }
        for (i, reason) in DropReason::ALL.iter().enumerate() {
            assert_eq!(reason.slot() as usize, Counter::COUNT + i);
            assert!(!reason.description().is_empty(), "{reason:?}");
        }
        assert_eq!(DropReason::ALL.last().unwrap().slot() as usize, COUNTER_SLOTS - 1);
        assert_eq!(DropReason::SpoofedInner.name(), "spoofed_inner");
        assert_eq!(Counter::IcmpFragNeeded.description(), "ICMP fragmentation-needed replies sent for too-big DF packets.");
    }

    #[test]
    fn totals_sum_per_slot() {
        let mut total = Totals::default();
        let one = Tally { packets: 1, bytes: 100 };
        total.add(Counter::Decap.slot() as usize, &one);
        total.add(Counter::Decap.slot() as usize, &one);
        total.add(DropReason::WrongVni.slot() as usize, &one);
        total.add(COUNTER_SLOTS, &one);
        assert_eq!((total.packets(Counter::Decap), total.bytes(Counter::Decap)), (2, 200));
        assert_eq!(total.drops(DropReason::WrongVni), 1);
        assert_eq!(total.drops_by_reason().map(|(_, n)| n).sum::<u64>(), 1);
    }
}
