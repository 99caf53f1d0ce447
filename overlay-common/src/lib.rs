//! Types shared by the overlay eBPF programs (`overlay-ebpf`) and the agent.
//!
//! Every map key and value is `#[repr(C)]` with explicit padding so that the
//! kernel, the agent and `bpftool map dump` all agree on one layout. No
//! `bool`, enum or `Option` appears in a map type: modes and flags are plain
//! integers with named constants below.
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
    /// Per-CPU single-entry array of [`crate::Counters`].
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

    /// Every program, in load order.
    pub const ALL: [&str; 4] = [TC_EGRESS, XDP_INGRESS, TC_INGRESS, TC_POD];
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

/// [`Route::mode`]: reach the CIDR through a VXLAN tunnel to the node.
pub const ROUTE_MODE_VXLAN: u8 = 1;
/// [`Route::mode`]: forward unencapsulated to the node (host-gw).
pub const ROUTE_MODE_DIRECT: u8 = 2;
/// [`Route::mode`]: cannot be served (host-gw with a router in between);
/// the kernel route is `unreachable`, so senders get an ICMP error.
pub const ROUTE_MODE_UNREACHABLE: u8 = 3;

/// [`Route::reason`]: the backend is vxlan without direct routing.
pub const ROUTE_REASON_BACKEND: u8 = 1;
/// [`Route::reason`]: the node is on-link (`ip route get` has no gateway).
pub const ROUTE_REASON_ON_LINK: u8 = 2;
/// [`Route::reason`]: a gateway lies between us and the node.
pub const ROUTE_REASON_GATEWAY: u8 = 3;
/// [`Route::reason`]: the kernel has no route to the node on the underlay.
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
    /// The pod's TCP or UDP port, network byte order.
    pub port: [u8; 2],
    /// IPPROTO_TCP or IPPROTO_UDP.
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
    /// Explicit padding; always zero.
    pub _pad0: u16,
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
}

/// Datapath counters, one copy per CPU in the `COUNTERS` map. The field names
/// are what `bpftool map dump` and `overlay-agent inspect` print.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Counters {
    /// Packets encapsulated into VXLAN.
    pub encap_packets: u64,
    /// Bytes of inner packets encapsulated.
    pub encap_bytes: u64,
    /// Packets forwarded to a peer without encapsulation (direct mode).
    pub direct_packets: u64,
    /// VXLAN packets decapsulated and delivered.
    pub decap_packets: u64,
    /// Bytes of inner packets decapsulated.
    pub decap_bytes: u64,
    /// Packets that were not ours and went on untouched.
    pub pass_packets: u64,
    /// ICMP fragmentation-needed replies sent for too-big DF packets.
    pub icmp_frag_needed: u64,
    /// Dropped: tunnel packet shorter than its headers.
    pub drop_truncated: u64,
    /// Dropped: VXLAN flags without the I bit, or reserved bits set.
    pub drop_bad_flags: u64,
    /// Dropped: VXLAN with a VNI other than ours.
    pub drop_wrong_vni: u64,
    /// Dropped: outer source is not a known node.
    pub drop_unknown_source: u64,
    /// Dropped: inner source outside the sending node's pod CIDR.
    pub drop_spoofed_inner: u64,
    /// Dropped: outer IPv4 with options or fragmented.
    pub drop_bad_outer: u64,
    /// Dropped: tunnel payload that is not IPv4, or not addressed to this
    /// node's pod CIDR.
    pub drop_bad_inner: u64,
    /// Passed on, not decapsulated: VXLAN from a known node to the other
    /// well-known port (4789 vs 8472). The agent warns: the ports differ.
    pub mismatched_port: u64,
    /// Dropped: a kernel helper failed (adjust room, redirect, ...).
    pub drop_helper_error: u64,
    /// Packets the fast path (`--forward bpf`) forwarded past the kernel's
    /// forward path: from local pods straight to the underlay (each also
    /// counted as `encap_packets` or, at the underlay's egress,
    /// `direct_packets`), and from the underlay straight to the pod bridge.
    pub fastpath_packets: u64,
}

impl Counters {
    /// Every counter with its name, in declaration order: the one list that
    /// summing and printing share, so a new counter cannot be missed.
    pub fn fields(&self) -> [(&'static str, u64); 17] {
        let Self {
            encap_packets, encap_bytes, direct_packets, decap_packets, decap_bytes, pass_packets,
            icmp_frag_needed, drop_truncated, drop_bad_flags, drop_wrong_vni, drop_unknown_source,
            drop_spoofed_inner, drop_bad_outer, drop_bad_inner, mismatched_port, drop_helper_error,
            fastpath_packets,
        } = *self;
        [
            ("encap_packets", encap_packets),
            ("encap_bytes", encap_bytes),
            ("direct_packets", direct_packets),
            ("decap_packets", decap_packets),
            ("decap_bytes", decap_bytes),
            ("pass_packets", pass_packets),
            ("icmp_frag_needed", icmp_frag_needed),
            ("drop_truncated", drop_truncated),
            ("drop_bad_flags", drop_bad_flags),
            ("drop_wrong_vni", drop_wrong_vni),
            ("drop_unknown_source", drop_unknown_source),
            ("drop_spoofed_inner", drop_spoofed_inner),
            ("drop_bad_outer", drop_bad_outer),
            ("drop_bad_inner", drop_bad_inner),
            ("mismatched_port", mismatched_port),
            ("drop_helper_error", drop_helper_error),
            ("fastpath_packets", fastpath_packets),
        ]
    }

    /// Adds `other` field by field (summing per-CPU copies).
    pub fn add(&mut self, other: &Self) {
        let Self {
            encap_packets, encap_bytes, direct_packets, decap_packets, decap_bytes, pass_packets,
            icmp_frag_needed, drop_truncated, drop_bad_flags, drop_wrong_vni, drop_unknown_source,
            drop_spoofed_inner, drop_bad_outer, drop_bad_inner, mismatched_port, drop_helper_error,
            fastpath_packets,
        } = self;
        for (field, value) in [
            encap_packets, encap_bytes, direct_packets, decap_packets, decap_bytes, pass_packets,
            icmp_frag_needed, drop_truncated, drop_bad_flags, drop_wrong_vni, drop_unknown_source,
            drop_spoofed_inner, drop_bad_outer, drop_bad_inner, mismatched_port, drop_helper_error,
            fastpath_packets,
        ]
        .into_iter()
        .zip(other.fields())
        {
            *field += value.1;
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all impls): #[repr(C)], only integer and byte-array fields,
    // explicit padding, so every bit pattern is valid.
    unsafe impl aya::Pod for super::Route {}
    unsafe impl aya::Pod for super::Peer {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::Counters {}
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
        assert_eq!(size_of::<Config>(), 56);
        assert_eq!(size_of::<Counters>(), 17 * 8);
    }

    #[test]
    fn counters_add_every_field_in_order() {
        let mut total = Counters::default();
        let one = Counters { encap_packets: 1, drop_helper_error: 2, mismatched_port: 3, ..Counters::default() };
        total.add(&one);
        total.add(&one);
        let fields = total.fields();
        assert_eq!(fields[0], ("encap_packets", 2));
        assert_eq!(fields[14], ("mismatched_port", 6));
        assert_eq!(fields[15], ("drop_helper_error", 4));
        assert_eq!(fields.iter().map(|f| f.1).sum::<u64>(), 12);
    }
}
