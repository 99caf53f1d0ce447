//! Recognising and validating VXLAN addressed to this node.

use network_types::{eth::EthHdr, ip::Ipv4Hdr, udp::UdpHdr};
use aya_ebpf::btf_maps::lpm_trie::Key;
use overlay_common::{
    Config, Counter, DEFAULT_VXLAN_PORT, IANA_VXLAN_PORT, Peer, ROUTE_MODE_VXLAN, ROUTE_REASON_BACKEND, Route,
};

use crate::{DropReason, counters::count, csum, maps::{PEERS, ROUTES}, packet::{Packet, ptr_at}, proto::{IP_MF_OFFSET, IP_OFFSET}};

pub use crate::{
    proto::{ETH_P_IP, IPPROTO_UDP, VXLAN_FLAG_I},
    vxlan::ENCAP_LEN,
};
/// The ECN field of the IPv4 TOS byte (RFC 3168) and its values.
const ECN_MASK: u8 = 0x03;
const ECN_NOT_ECT: u8 = 0x00;
const ECN_ECT_1: u8 = 0x01;
const ECN_ECT_0: u8 = 0x02;
const ECN_CE: u8 = 0x03;

pub const OUTER_IP_OFF: usize = EthHdr::LEN;
pub const OUTER_UDP_OFF: usize = OUTER_IP_OFF + Ipv4Hdr::LEN;
pub const VXLAN_OFF: usize = OUTER_UDP_OFF + UdpHdr::LEN;
pub const INNER_ETH_OFF: usize = VXLAN_OFF + 8;
pub const INNER_IP_OFF: usize = INNER_ETH_OFF + EthHdr::LEN;

/// What to do with a received packet.
pub enum Rx {
    /// Not VXLAN for this node: leave it alone.
    NotOurs,
    /// Valid VXLAN from a known node: strip [`ENCAP_LEN`] bytes after the
    /// outer Ethernet header.
    Decap,
    /// Tunnel datagrams for this node that the underlay's GRO merged into
    /// one GSO packet (see [`merged_datagrams`]): to be split again and
    /// then checked and decapsulated one by one.
    Merged,
}

/// Whether `addr` lies in `net/prefix_len`.
#[inline(always)]
pub fn in_cidr(addr: [u8; 4], net: [u8; 4], prefix_len: u32) -> bool {
    let mask = u32::MAX.checked_shl(32 - prefix_len.min(32)).unwrap_or(0);
    u32::from_be_bytes(addr) & mask == u32::from_be_bytes(net) & mask
}

/// Classifies a packet arriving on the underlay. Anything that is not UDP to
/// our port at our address is [`Rx::NotOurs`]; from there on every check
/// that fails is a drop with its reason.
#[inline(always)]
pub fn classify_rx(ctx: &impl Packet, cfg: &Config) -> Result<Rx, DropReason> {
    let Ok(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Ok(Rx::NotOurs);
    };
    // SAFETY (all raw reads below): ptr_at checked the bounds.
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return Ok(Rx::NotOurs);
    }
    let Ok(ip) = ptr_at::<Ipv4Hdr>(ctx, OUTER_IP_OFF) else {
        return Ok(Rx::NotOurs);
    };
    // SAFETY: ptr_at checked the bounds.
    if unsafe { (*ip).proto != IPPROTO_UDP || (*ip).dst_addr != cfg.node_ip } {
        return Ok(Rx::NotOurs);
    }
    // A fragment after the first has no UDP header: what sits where one
    // would is payload, not a port, and no tunnel packet of ours (a first
    // fragment on our port is refused below). The stack reassembles it.
    // SAFETY: ptr_at checked the bounds.
    if u16::from_be_bytes(unsafe { (*ip).frags }) & IP_OFFSET != 0 {
        return Ok(Rx::NotOurs);
    }
    // UDP for this node, perhaps our tunnel: everything below reads as far
    // as the inner IPv4 header (the UDP header behind the longest options
    // too), and the pull invalidates `ip`.
    ctx.make_linear(INNER_IP_OFF + Ipv4Hdr::LEN);
    let Ok(ip) = ptr_at::<Ipv4Hdr>(ctx, OUTER_IP_OFF) else {
        return Ok(Rx::NotOurs);
    };
    let ip = unsafe { &*ip };
    let ihl = usize::from(ip.vihl & 0x0f);
    if ihl != 5 {
        // Options move the UDP header; look at it only to decide whether
        // this was meant for our tunnel.
        let Ok(udp) = ptr_at::<UdpHdr>(ctx, OUTER_IP_OFF + ihl * 4) else {
            return Ok(Rx::NotOurs);
        };
        return if u16::from_be_bytes(unsafe { (*udp).dst }) == cfg.vxlan_port {
            Err(DropReason::BadOuter)
        } else {
            Ok(Rx::NotOurs)
        };
    }
    let Ok(udp) = ptr_at::<UdpHdr>(ctx, OUTER_UDP_OFF) else {
        return Ok(Rx::NotOurs);
    };
    let dport = u16::from_be_bytes(unsafe { (*udp).dst });
    if dport != cfg.vxlan_port {
        // A known node tunnelling to the other well-known port: its port
        // setting differs from ours. Counted so the agent can say so; the
        // packet goes on (the stack answers port unreachable).
        if (dport == IANA_VXLAN_PORT || dport == DEFAULT_VXLAN_PORT) && PEERS.get_ptr(ip.src_addr).is_some() {
            count(Counter::MismatchedPort, (ctx.end() - ctx.start()) as u64);
        }
        return Ok(Rx::NotOurs);
    }

    // Addressed to our tunnel: validate everything.
    if ip.vihl >> 4 != 4 {
        // Behind ethertype IPv4, anything but version 4 is not a header
        // any node sent (the stack would discard it).
        return Err(DropReason::BadOuter);
    }
    if u16::from_be_bytes(ip.frags) & IP_MF_OFFSET != 0 {
        // A fragment (MF set or non-zero offset): we never reassemble.
        return Err(DropReason::BadOuter);
    }
    // SAFETY: Ipv4Hdr is 20 bytes of plain integers and byte arrays.
    if !csum::ipv4_header_valid(unsafe { &*(ip as *const Ipv4Hdr).cast::<[u8; Ipv4Hdr::LEN]>() }) {
        // A header checksum the stack (`ip_rcv`) would discard: no node
        // sent it so, and its addresses and lengths cannot be trusted.
        return Err(DropReason::BadOuter);
    }
    let vxlan = unsafe { *ptr_at::<[u8; 8]>(ctx, VXLAN_OFF)? };
    let inner_eth = ptr_at::<EthHdr>(ctx, INNER_ETH_OFF)?;
    let inner_ip = unsafe { &*ptr_at::<Ipv4Hdr>(ctx, INNER_IP_OFF)? };
    if !lengths_agree(ctx, ip, unsafe { &*udp }, inner_ip) {
        return Err(DropReason::BadOuter);
    }
    // Before a merged packet goes to be split: GRO merges only datagrams
    // of one outer flow, so one look-up speaks for all of them, and a
    // stranger's cost no software segmentation.
    let Some(peer) = PEERS.get_ptr(ip.src_addr) else {
        return Err(DropReason::UnknownSource);
    };
    if merged_datagrams(ctx, inner_ip) {
        return Ok(Rx::Merged);
    }
    if vxlan[0] != VXLAN_FLAG_I || vxlan[1] != 0 || vxlan[2] != 0 || vxlan[3] != 0 || vxlan[7] != 0 {
        return Err(DropReason::BadFlags);
    }
    let vni = u32::from_be_bytes([0, vxlan[4], vxlan[5], vxlan[6]]);
    if vni != cfg.vni {
        return Err(DropReason::WrongVni);
    }
    let peer: &Peer = unsafe { &*peer };
    if u16::from_be(unsafe { (*inner_eth).ether_type }) != ETH_P_IP || inner_ip.vihl >> 4 != 4 {
        return Err(DropReason::BadInner);
    }
    // The sender may only speak for its own pods, or for itself (host
    // traffic leaves a node with its underlay address as source).
    if !in_cidr(inner_ip.src_addr, peer.pod_cidr, peer.pod_prefix_len)
        && inner_ip.src_addr != ip.src_addr
    {
        return Err(DropReason::SpoofedInner);
    }
    if !is_pod_address(inner_ip.dst_addr, cfg) {
        return Err(DropReason::BadInner);
    }
    match ip.tos & ECN_MASK {
        ECN_CE => propagate_ce(ctx)?,
        ECN_ECT_1 => propagate_ect_1(ctx)?,
        _ => {}
    }
    Ok(Rx::Decap)
}

/// What may follow the inner packet in a tunnel datagram: Ethernet's
/// padding of a short inner frame to 60 bytes, and a frame check sequence
/// a sender left on.
const MAX_INNER_TRAILER: usize = (60 - EthHdr::LEN - Ipv4Hdr::LEN) + 4;

/// Whether the outer IPv4 total length fits the frame, the UDP length is
/// the rest of the IPv4 packet, and it holds VXLAN, the inner Ethernet
/// header and the whole inner packet (as `udp_rcv` and the inner `ip_rcv`
/// would insist) and no more than [`MAX_INNER_TRAILER`] bytes after it.
/// More would be a second datagram: generic XDP runs after GRO and sees a
/// packet of datagrams the underlay merged (see [`merged_datagrams`]) as
/// one long datagram, whose lengths GRO rewrote to cover them all, and
/// decapsulated as one it would reach the pod as its first datagram
/// alone. A GSO super-packet's lengths are rewritten per segment (and cut
/// to 16 bits past 64 KiB), so only the first check applies.
#[inline(always)]
fn lengths_agree(ctx: &impl Packet, ip: &Ipv4Hdr, udp: &UdpHdr, inner_ip: &Ipv4Hdr) -> bool {
    let total = usize::from(u16::from_be_bytes(ip.tot_len));
    if OUTER_IP_OFF + total > ctx.len() {
        return false;
    }
    if ctx.is_gso() {
        return true;
    }
    let udp_len = usize::from(u16::from_be_bytes(udp.len));
    let inner_total = usize::from(u16::from_be_bytes(inner_ip.tot_len));
    let headers = INNER_IP_OFF - OUTER_UDP_OFF;
    udp_len + Ipv4Hdr::LEN == total && udp_len >= headers + inner_total && udp_len <= headers + inner_total + MAX_INNER_TRAILER
}

/// Whether a GSO packet on our port is several tunnel datagrams that the
/// underlay's GRO merged (UDP GRO: `rx-udp-gro-forwarding` or
/// `rx-gro-list` on, for datagrams that carry a UDP checksum, as kernel
/// vxlan devices send by default), rather than one tunnel packet around a
/// GSO inner packet (what a veth passes whole from a sender's TSO). Each
/// segment of a merged packet is a whole datagram, so its size covers the
/// first datagram's VXLAN header and inner packet; the segment size of a
/// tunnel packet around a GSO inner packet is the inner MSS, less than the
/// inner packet. Decapsulated as one packet, a merged one would lose only
/// its first datagram's tunnel headers and carry the others' inside its
/// payload. An inner total length of 0 (BIG TCP past 64 KiB) is the
/// latter kind. Inner SCTP GSO (a kernel vxlan peer's, passed whole by a
/// veth) has the segment size `GSO_BY_FRAGS` (0xffff) and counts as
/// merged: split on the segmentation device, it comes out as the same
/// tunnel datagrams, each decapsulated as any other.
#[inline(always)]
fn merged_datagrams(ctx: &impl Packet, inner_ip: &Ipv4Hdr) -> bool {
    let segment = ctx.gso_size();
    let inner_total = u32::from(u16::from_be_bytes(inner_ip.tot_len));
    segment != 0 && inner_total != 0 && segment >= inner_total
}

/// RFC 6040 §4.2 on decapsulation with the outer header marked CE: an
/// ECN-capable inner packet gets CE too (its checksum updated), a
/// not-ECN-capable one is dropped.
#[inline(always)]
fn propagate_ce(ctx: &impl Packet) -> Result<(), DropReason> {
    let inner = ptr_at::<Ipv4Hdr>(ctx, INNER_IP_OFF)?;
    // SAFETY (raw reads and writes): ptr_at checked the bounds.
    let inner = unsafe { &mut *inner };
    match inner.tos & ECN_MASK {
        ECN_NOT_ECT => Err(DropReason::EcnNotEct),
        ECN_CE => Ok(()),
        _ => {
            // The 16-bit word holding version/IHL and TOS changes.
            let old = u16::from_be_bytes([inner.vihl, inner.tos]);
            inner.check = csum::replace16(inner.check, old, old | u16::from(ECN_CE));
            inner.tos |= ECN_CE;
            Ok(())
        }
    }
}

/// RFC 6040 §4.2 (and the kernel's `INET_ECN_decapsulate`, `IP_ECN_set_ect1`) on
/// decapsulation with the outer header ECT(1): an ECT(0) inner packet
/// becomes ECT(1) (its checksum updated), so L4S marking set on the way
/// survives; any other inner codepoint stays.
#[inline(always)]
fn propagate_ect_1(ctx: &impl Packet) -> Result<(), DropReason> {
    let inner = ptr_at::<Ipv4Hdr>(ctx, INNER_IP_OFF)?;
    // SAFETY (raw reads and writes): ptr_at checked the bounds.
    let inner = unsafe { &mut *inner };
    if inner.tos & ECN_MASK == ECN_ECT_0 {
        let old = u16::from_be_bytes([inner.vihl, inner.tos]);
        let tos = (inner.tos & !ECN_MASK) | ECN_ECT_1;
        inner.check = csum::replace16(inner.check, old, u16::from_be_bytes([inner.vihl, tos]));
        inner.tos = tos;
    }
    Ok(())
}

/// Whether `addr` can be one of this node's pods: in our pod CIDR, and
/// neither its network nor its broadcast address (the host's, which the
/// tunnel must not reach).
#[inline(always)]
pub fn is_pod_address(addr: [u8; 4], cfg: &Config) -> bool {
    let host_mask = u32::MAX.checked_shr(cfg.pod_prefix_len.min(32)).unwrap_or(0);
    let host = u32::from_be_bytes(addr) & host_mask;
    in_cidr(addr, cfg.pod_cidr, cfg.pod_prefix_len) && (host_mask < 3 || (host != 0 && host != host_mask))
}

/// For a packet that is not tunnel traffic: drops an unencapsulated
/// IPv4 packet whose source is one of our own pods (they sit behind the
/// pod bridge, never on the underlay), or that is for our pods and whose
/// source is a pod, or the node itself, of a peer that only ever sends to
/// our pods encapsulated (and checked against `PEERS`; see
/// [`arrives_only_encapsulated`]): either was forged by a host on the
/// underlay. Direct-mode peers' pods and nodes arrive unencapsulated and
/// pass.
#[inline(always)]
pub fn reject_bare_tunnel_source(ctx: &impl Packet, cfg: &Config) -> Result<(), DropReason> {
    let Ok(eth) = ptr_at::<EthHdr>(ctx, 0) else { return Ok(()) };
    // SAFETY (raw reads): ptr_at checked the bounds.
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return Ok(());
    }
    let Ok(ip) = ptr_at::<Ipv4Hdr>(ctx, OUTER_IP_OFF) else { return Ok(()) };
    let ip = unsafe { &*ip };
    // Our own pods sit behind the pod bridge: from the underlay, their
    // address is forged, whatever the destination.
    if in_cidr(ip.src_addr, cfg.pod_cidr, cfg.pod_prefix_len) {
        return Err(DropReason::BareTunnelSource);
    }
    // A peer's pod may reach the node itself bare (a reply to this node,
    // unmasqueraded, leaves the peer by its default route), never our pods.
    if !in_cidr(ip.dst_addr, cfg.pod_cidr, cfg.pod_prefix_len) {
        return Ok(());
    }
    // A node routes to our pods through its tunnel too, so its own
    // packets for them (an ICMP error about one of their packets, a
    // host-network client) arrive encapsulated as well.
    match ROUTES.get(&Key::new(32, ip.src_addr)).or_else(|| route_of_node(ip.src_addr)) {
        Some(route) if arrives_only_encapsulated(route) => Err(DropReason::BareTunnelSource),
        _ => Ok(()),
    }
}

/// The route to the pods of the peer node at `node_ip`, if it is one.
#[inline(always)]
pub fn route_of_node(node_ip: [u8; 4]) -> Option<&'static Route> {
    // SAFETY: the map value is read at once.
    let pod_cidr = unsafe { (*PEERS.get_ptr(&node_ip)?).pod_cidr };
    ROUTES.get(&Key::new(32, pod_cidr))
}

/// Whether the pods behind `route` only ever reach us encapsulated: the
/// backend is VXLAN without direct routing, so no node sends to another
/// node's pods unencapsulated. Under DirectRouting each side picks its
/// mode from its own view of the underlay, so a peer we reach by VXLAN
/// (a gateway in between from here) may still send to us directly.
#[inline(always)]
pub fn arrives_only_encapsulated(route: &Route) -> bool {
    route.mode == ROUTE_MODE_VXLAN && route.reason == ROUTE_REASON_BACKEND
}
