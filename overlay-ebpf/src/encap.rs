//! VXLAN encapsulation at TC egress of the underlay interface.
//!
//! The kernel has already routed the packet (`<podCIDR> via <next hop> dev
//! <underlay>`) and resolved the next hop's MAC, so the existing Ethernet
//! header becomes the outer one. We insert outer IPv4 + UDP + VXLAN + inner
//! Ethernet behind it, flagged so GSO segments the result as UDP tunnel
//! packets (`SKB_GSO_UDP_TUNNEL`) with the inner MSS unchanged.
//!
//! A pod tunnel's GSO packet cannot be encapsulated as one: it goes through
//! the agent's segmentation device first (`to_segmentation`), and each
//! segment is encapsulated at that device's TC ingress (`try_tc_segmented`).

use aya_ebpf::{
    bindings::{
        BPF_ADJ_ROOM_ENCAP_L2_SHIFT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_ENCAP_L2_ETH,
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO,
        TC_ACT_OK,
    },
    btf_maps::lpm_trie::Key,
    helpers::generated::{bpf_get_hash_recalc, bpf_get_prandom_u32, bpf_redirect},
    programs::TcContext,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};
use overlay_common::{Config, Counter, OWN_TUNNEL_MARK, ROUTE_MODE_VXLAN, Route};

use crate::{
    DropReason,
    counters::count,
    decap,
    fastpath::redirect_to_underlay,
    icmp,
    maps::{PEERS, ROUTES, config},
    packet::{Packet as _, ptr_at},
    parse::{ENCAP_LEN, ETH_P_IP, IPPROTO_UDP, OUTER_IP_OFF, in_cidr},
    vxlan::EncapHeaders,
};

/// `bpf_skb_adjust_room`'s answer to encapsulating a packet already marked
/// encapsulated (`include/uapi/asm-generic/errno.h`).
const EALREADY: i32 = 114;

/// First port of the IANA ephemeral range (RFC 6335), where outer source
/// ports are spread.
const SPORT_MIN: u32 = 49152;
const SPORT_RANGE: u64 = 65536 - SPORT_MIN as u64;

const ADJ_ROOM_ENCAP_FLAGS: u64 = (BPF_F_ADJ_ROOM_FIXED_GSO
    | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4
    | BPF_F_ADJ_ROOM_ENCAP_L4_UDP
    | BPF_F_ADJ_ROOM_ENCAP_L2_ETH) as u64
    | ((EthHdr::LEN as u64) << BPF_ADJ_ROOM_ENCAP_L2_SHIFT);

#[inline(always)]
pub fn try_tc_egress(ctx: &TcContext) -> Result<i32, DropReason> {
    let Some(cfg) = config() else {
        return Ok(TC_ACT_OK as i32);
    };
    ctx.make_linear(OUTER_IP_OFF + Ipv4Hdr::LEN);
    let Ok(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Ok(TC_ACT_OK as i32);
    };
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return Ok(TC_ACT_OK as i32);
    }
    let Ok(ip) = ptr_at::<Ipv4Hdr>(ctx, OUTER_IP_OFF) else {
        return Ok(TC_ACT_OK as i32);
    };
    let ip = unsafe { &*ip };
    let (src, dst, tos) = (ip.src_addr, ip.dst_addr, ip.tos);
    let Some(route) = ROUTES.get(&Key::new(32, dst)) else {
        if ip.proto == IPPROTO_UDP && is_our_tunnel_port(ctx, cfg) {
            // The datapath's own were counted (`encap`, `segmented`) when
            // they were encapsulated.
            // SAFETY: reading a field of the context's own sk_buff.
            if unsafe { (*ctx.skb.skb).mark } == OWN_TUNNEL_MARK {
                ctx.set_mark(0);
                return Ok(TC_ACT_OK as i32);
            }
            if forwarded_to_a_peers_tunnel(ctx, cfg, src, dst) {
                return Err(DropReason::ForwardedTunnel);
            }
            // This node's own sockets (a kernel vxlan device left from
            // flannel, say): not ours to count.
            if src == cfg.node_ip {
                return Ok(TC_ACT_OK as i32);
            }
        }
        count(Counter::Pass, u64::from(ctx.len()));
        return Ok(TC_ACT_OK as i32);
    };
    if route.mode != ROUTE_MODE_VXLAN {
        // Direct peers are served by the kernel route alone.
        count(Counter::Direct, u64::from(ctx.len()));
        return Ok(TC_ACT_OK as i32);
    }
    let route = *route;

    let inner_len = ctx.len() - EthHdr::LEN as u32;
    // GSO packets are cut to the route's MSS later; only a single packet
    // can be too big for the tunnel.
    let is_gso = unsafe { (*ctx.skb.skb).gso_size } != 0;
    if !is_gso && inner_len > cfg.inner_mtu {
        if icmp::dont_fragment(ip) {
            return icmp::reply_frag_needed(ctx, cfg);
        }
        // Without DF: from a socket that fragments at the interface's MTU,
        // not the route's (IP_PMTUDISC_OMIT or _INTERFACE, a raw socket).
        // The kernel fragmented before this hook, and no program here can;
        // encapsulated, it would not fit the underlay, which would lose it
        // unseen.
        return Err(DropReason::TooBig);
    }
    match encapsulate(ctx, cfg, &route, inner_len, tos)? {
        Encapsulated::Done => Ok(TC_ACT_OK as i32),
        Encapsulated::NeedsSegmenting => to_segmentation(cfg),
    }
}

/// What [`encapsulate`] did.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Encapsulated {
    /// The packet carries our tunnel headers.
    Done,
    /// Untouched: a GSO packet of a pod's own tunnel, which must be cut
    /// into segments before each is encapsulated ([`to_segmentation`]).
    NeedsSegmenting,
}

/// Hands a pod tunnel's GSO packet (or tunnel datagrams the underlay's GRO
/// merged) to the egress of the agent's segmentation device (`ovl-seg0`),
/// whose features lack tunnel and UDP segmentation offload, so the kernel
/// cuts it into segments in software before the veth carries them
/// (`validate_xmit_skb`), as its own vxlan device does before it
/// encapsulates. Each segment arrives at `ovl-seg1`'s TC ingress, where
/// [`try_tc_segmented`] encapsulates (or decapsulates) it. Without the
/// device (it could not be set up), the packet is dropped as before.
#[inline(always)]
pub fn to_segmentation(cfg: &Config) -> Result<i32, DropReason> {
    if cfg.seg_ifindex == 0 {
        return Err(DropReason::HelperError);
    }
    // SAFETY: plain helper call; flags 0: the device's egress.
    Ok(unsafe { bpf_redirect(cfg.seg_ifindex, 0) } as i32)
}

/// TC ingress on `ovl-seg1`: one segment of a pod tunnel's GSO packet (or
/// a tunnel datagram to decapsulate, see [`decap::try_tc_split_datagram`]),
/// as [`to_segmentation`] sent it, with the Ethernet header it had then (the
/// route's next hop, or with the fast path the pod's gateway frame, TTL
/// already decremented). Encapsulated for the peer of its route (a single
/// packet: `encapsulate`'s path without tunnel metadata) and handed to the
/// underlay's egress, whose program passes our own VXLAN untouched.
#[inline(always)]
pub fn try_tc_segmented(ctx: &TcContext) -> Result<i32, DropReason> {
    let Some(cfg) = config() else {
        return Err(DropReason::SegmentNoRoute);
    };
    ctx.make_linear(OUTER_IP_OFF + Ipv4Hdr::LEN);
    let eth = ptr_at::<EthHdr>(ctx, 0).map_err(|_| DropReason::SegmentNoRoute)?;
    // SAFETY (raw reads): ptr_at checked the bounds.
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return Err(DropReason::SegmentNoRoute);
    }
    let ip = ptr_at::<Ipv4Hdr>(ctx, OUTER_IP_OFF).map_err(|_| DropReason::SegmentNoRoute)?;
    let (dst, tos, proto) = unsafe { ((*ip).dst_addr, (*ip).tos, (*ip).proto) };
    // UDP for this node is a tunnel datagram the underlay's GRO had merged
    // (a pod tunnel's segment is for a remote pod).
    if proto == IPPROTO_UDP && dst == cfg.node_ip {
        return decap::try_tc_split_datagram(ctx, cfg);
    }
    let route = match ROUTES.get(&Key::new(32, dst)) {
        Some(route) if route.mode == ROUTE_MODE_VXLAN => *route,
        _ => return Err(DropReason::SegmentNoRoute),
    };
    let inner_len = ctx.len() - EthHdr::LEN as u32;
    if encapsulate(ctx, cfg, &route, inner_len, tos)? == Encapsulated::NeedsSegmenting {
        // Still a GSO packet: the device did not segment it.
        return Err(DropReason::HelperError);
    }
    count(Counter::Segmented, u64::from(inner_len));
    mark_own_tunnel_packet(ctx);
    if route.next_hop == [0; 4] {
        // Only the kernel's path sends such routes here, and it already
        // wrote the next hop's MACs.
        // SAFETY: plain helper call; flags 0: the underlay's egress.
        return Ok(unsafe { bpf_redirect(cfg.underlay_ifindex, 0) } as i32);
    }
    redirect_to_underlay(cfg, &route)
}

/// Whether a UDP datagram for our tunnel port, from `src` to `dst` and
/// not the datapath's own ([`OWN_TUNNEL_MARK`]), is one this node forwards
/// to a peer that the peer's tunnel would take from the wrong speaker
/// ([`DropReason::ForwardedTunnel`]):
/// - from its address or pod CIDR: a pod's own (masqueraded to our
///   address on the way out), which the peer would take as ours, with
///   whatever inner source the pod chose;
/// - from the pod bridge, whatever its source: a pod's, written whole
///   through a raw socket, that claims another node's address as its
///   outer source (which `rp_filter` lets through unless strict), and the
///   peer would take as that node's. Known only with the fast path, which
///   names the bridge (`Config::pod_bridge_ifindex`).
///
/// Transit tunnel traffic between two other nodes, which comes in from
/// the underlay, passes; so does what this node's own sockets send (no
/// interface it came in on).
#[inline(always)]
fn forwarded_to_a_peers_tunnel(ctx: &TcContext, cfg: &Config, src: [u8; 4], dst: [u8; 4]) -> bool {
    // SAFETY: reading a field of the context's own sk_buff.
    let came_in = unsafe { (*ctx.skb.skb).ingress_ifindex };
    came_in != 0
        && (src == cfg.node_ip
            || in_cidr(src, cfg.pod_cidr, cfg.pod_prefix_len)
            || came_in == cfg.pod_bridge_ifindex)
        && PEERS.get_ptr(&dst).is_some()
}

/// Marks one of the datapath's own tunnel packets, about to be redirected
/// to the underlay's egress, as its own there ([`OWN_TUNNEL_MARK`]).
#[inline(always)]
pub fn mark_own_tunnel_packet(ctx: &TcContext) {
    ctx.set_mark(OWN_TUNNEL_MARK);
}

/// Whether the UDP packet behind an option-less IPv4 header goes to our
/// VXLAN port.
#[inline(always)]
fn is_our_tunnel_port(ctx: &TcContext, cfg: &Config) -> bool {
    // SAFETY: ptr_at checked the bounds.
    ptr_at::<[u8; 4]>(ctx, OUTER_IP_OFF + Ipv4Hdr::LEN)
        .is_ok_and(|ports| u16::from_be_bytes(unsafe { [(*ports)[2], (*ports)[3]] }) == cfg.vxlan_port)
}

/// Puts outer IPv4 + UDP + VXLAN + inner Ethernet in front of the inner
/// IPv4 packet (of `inner_len` bytes, behind the Ethernet header at offset
/// 0), flagged so GSO cuts a super-packet into UDP tunnel segments with the
/// inner MSS unchanged. The Ethernet header stays in front, now the outer one.
#[inline(always)]
pub fn encapsulate(ctx: &TcContext, cfg: &Config, route: &Route, inner_len: u32, tos: u8) -> Result<Encapsulated, DropReason> {
    // The same flow always hashes the same, so it keeps one source port.
    let hash = unsafe { bpf_get_hash_recalc(ctx.skb.skb) };
    let sport = (SPORT_MIN + ((u64::from(hash) * SPORT_RANGE) >> 32) as u32) as u16;
    let ip_id = unsafe { bpf_get_prandom_u32() } as u16;

    match ctx.adjust_room(ENCAP_LEN as i32, BPF_ADJ_ROOM_MAC, ADJ_ROOM_ENCAP_FLAGS) {
        Ok(()) => {}
        // A pod's own tunnel packet (its VXLAN, Geneve or GRE device left
        // `skb->encapsulation` set: the inner checksum is left to offload):
        // the helper records one level of tunnel headers only, and refuses
        // before it changes anything. A single packet needs none recorded:
        // the offload's checksum offsets count from the buffer's head,
        // which the room made in front leaves in place. A GSO super-packet
        // does: segmentation would copy the pod's tunnel headers with the
        // super-packet's lengths, so it is segmented first.
        Err(e) if e == -i64::from(EALREADY) => {
            if ctx.is_gso() {
                return Ok(Encapsulated::NeedsSegmenting);
            }
            ctx.adjust_room(ENCAP_LEN as i32, BPF_ADJ_ROOM_MAC, 0)
                .map_err(|_| DropReason::HelperError)?;
        }
        Err(_) => return Err(DropReason::HelperError),
    }
    let headers = EncapHeaders::new(cfg, route, inner_len, tos, sport, ip_id);
    ctx.store(OUTER_IP_OFF, headers.as_bytes(), 0)
        .map_err(|_| DropReason::HelperError)?;
    count(Counter::Encap, u64::from(inner_len));
    Ok(Encapsulated::Done)
}
