//! The fast path (`--forward bpf`), both ways past the kernel's forward path.
//!
//! **Out, TC ingress on the pod bridge.** A packet from a local pod to a remote pod CIDR reaches the bridge's
//! ingress addressed to the bridge (the pods' gateway). Here it is forwarded
//! the way the kernel would, minus the kernel's forward path: the TTL is
//! decremented, VXLAN peers get the packet encapsulated, and
//! `bpf_redirect_neigh` hands it to the underlay's egress with the next hop
//! the agent resolved, the kernel filling in the MAC addresses.
//!
//! Whatever needs the kernel's judgement goes on untouched to the kernel
//! route, which the agent installs either way: TTL about to expire, IPv4
//! options, a packet too big for the path (the kernel sends the ICMP), a
//! peer without a usable next hop, and anything that is not IPv4 unicast
//! to a remote pod CIDR.
//!
//! **In, TC ingress on the underlay** (after decapsulation, or as it came
//! from a direct peer): a packet for a local pod is looked up in the FIB
//! the way forwarding would; when the kernel would send it out of the pod
//! bridge to a resolved neighbour, it gets those MAC addresses and its TTL
//! decremented and is redirected to the bridge's egress. Anything else (no
//! neighbour yet, too big for the bridge, a local address) goes on to the
//! kernel.

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, TC_ACT_SHOT, bpf_fib_lookup, bpf_redir_neigh, bpf_redir_neigh__bindgen_ty_1},
    btf_maps::lpm_trie::Key,
    helpers::generated::{bpf_fib_lookup as fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    programs::TcContext,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr};
use overlay_common::{Config, ROUTE_MODE_DIRECT, ROUTE_MODE_VXLAN, Route};

use crate::{
    Drop,
    counters::count,
    encap::encapsulate,
    maps::{POD_PORTS, ROUTES, config},
    packet::ptr_at,
    parse::{ETH_P_IP, IPPROTO_UDP, OUTER_IP_OFF, in_cidr},
};

const AF_INET: u32 = 2;
/// `skb->pkt_type` of a frame addressed to this host (`PACKET_HOST`).
const PACKET_HOST: u32 = 0;
const IPPROTO_TCP: u8 = 6;
const UDP_HDR_LEN: u32 = 8;

#[inline(always)]
pub fn try_tc_pod(ctx: &TcContext) -> Result<i32, Drop> {
    let pass = Ok(TC_ACT_OK as i32);
    let Some(cfg) = config() else {
        return pass;
    };
    // Only frames the bridge passed up for routing; a promiscuous bridge
    // also passes up frames between other hosts, which are not ours to
    // forward.
    // SAFETY: reading a field of the context's own sk_buff.
    if unsafe { (*ctx.skb.skb).pkt_type } != PACKET_HOST {
        return pass;
    }
    crate::linearize(ctx, OUTER_IP_OFF + Ipv4Hdr::LEN + TcpHdr::LEN);
    let Ok(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return pass;
    };
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return pass;
    }
    let Ok(ip) = ptr_at::<Ipv4Hdr>(ctx, OUTER_IP_OFF) else {
        return pass;
    };
    // SAFETY: ptr_at checked the bounds.
    let ip = unsafe { &mut *ip };
    if ip.vihl != 0x45 || ip.ttl <= 1 {
        return pass;
    }
    let Some(route) = ROUTES.get(&Key::new(32, ip.dst_addr)) else {
        return pass;
    };
    let route = *route;
    if route.next_hop == [0; 4] {
        return pass;
    }
    let path_mtu = match route.mode {
        ROUTE_MODE_VXLAN => cfg.inner_mtu,
        ROUTE_MODE_DIRECT => cfg.underlay_mtu,
        _ => return pass,
    };
    let inner_len = ctx.len() - EthHdr::LEN as u32;
    if !fits(ctx, ip, inner_len, path_mtu) {
        return pass;
    }

    decrement_ttl(ip);
    if route.mode == ROUTE_MODE_VXLAN {
        encapsulate(ctx, cfg, &route, inner_len, ip.tos)?;
    }
    count(|c| c.fastpath_packets += 1);
    redirect_to_underlay(cfg, &route)
}

/// Whether the packet, or each segment of a GSO packet, fits `path_mtu`.
/// Segments carry the same IPv4 and transport headers as the super-packet.
#[inline(always)]
fn fits(ctx: &TcContext, ip: &Ipv4Hdr, inner_len: u32, path_mtu: u32) -> bool {
    // SAFETY: reading a field of the context's own sk_buff.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    if gso_size == 0 {
        return inner_len <= path_mtu;
    }
    let l4_len = match ip.proto {
        IPPROTO_TCP => match ptr_at::<TcpHdr>(ctx, OUTER_IP_OFF + Ipv4Hdr::LEN) {
            // SAFETY: ptr_at checked the bounds.
            Ok(tcp) => u32::from(unsafe { (*tcp).doff() }) * 4,
            Err(_) => return false,
        },
        IPPROTO_UDP => UDP_HDR_LEN,
        _ => return false,
    };
    Ipv4Hdr::LEN as u32 + l4_len + gso_size <= path_mtu
}

/// What forwarding does to the IPv4 header: TTL down by one, the checksum
/// updated incrementally (RFC 1624: HC' = ~(~HC + ~m + m')).
#[inline(always)]
fn decrement_ttl(ip: &mut Ipv4Hdr) {
    let old = u16::from_be_bytes([ip.ttl, ip.proto]);
    let new = old - 0x0100;
    let mut sum = u32::from(!u16::from_be_bytes(ip.check)) + u32::from(!old) + u32::from(new);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    ip.ttl -= 1;
    ip.check = (!(sum as u16)).to_be_bytes();
}

/// Hands the packet to the underlay's egress toward `route.next_hop`; the
/// neighbour subsystem supplies the MAC addresses (and resolves them first
/// if it has to).
#[inline(always)]
fn redirect_to_underlay(cfg: &Config, route: &Route) -> Result<i32, Drop> {
    let mut next_hop = bpf_redir_neigh {
        nh_family: AF_INET,
        __bindgen_anon_1: bpf_redir_neigh__bindgen_ty_1 { ipv4_nh: u32::from_ne_bytes(route.next_hop) },
    };
    // SAFETY: the helper reads `size_of::<bpf_redir_neigh>()` bytes of
    // `next_hop`, which lives on this stack frame.
    let action = unsafe {
        bpf_redirect_neigh(cfg.underlay_ifindex, &mut next_hop, size_of::<bpf_redir_neigh>() as i32, 0)
    };
    if action == i64::from(TC_ACT_SHOT) {
        return Err(Drop::HelperError);
    }
    Ok(action as i32)
}

/// The inbound half: hands a packet for a local pod straight to the pod
/// bridge, or returns `None` to leave it to the kernel. Runs at the
/// underlay's TC ingress once any tunnel header is gone.
#[inline(always)]
pub fn deliver_to_pod(ctx: &TcContext, cfg: &Config) -> Option<i32> {
    if cfg.pod_bridge_ifindex == 0 {
        return None;
    }
    // SAFETY: reading fields of the context's own sk_buff.
    let (pkt_type, ingress_ifindex) = unsafe { ((*ctx.skb.skb).pkt_type, (*ctx.skb.skb).ingress_ifindex) };
    if pkt_type != PACKET_HOST {
        return None;
    }
    crate::linearize(ctx, OUTER_IP_OFF + Ipv4Hdr::LEN);
    let eth = ptr_at::<EthHdr>(ctx, 0).ok()?;
    // SAFETY (raw reads and writes below): ptr_at checked the bounds.
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return None;
    }
    let ip = unsafe { &mut *ptr_at::<Ipv4Hdr>(ctx, OUTER_IP_OFF).ok()? };
    if ip.vihl != 0x45 || ip.ttl <= 1 || !in_cidr(ip.dst_addr, cfg.pod_cidr, cfg.pod_prefix_len) {
        return None;
    }
    // SAFETY: all-zero is a valid bpf_fib_lookup (plain integers and unions).
    let mut fib: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    fib.family = AF_INET as u8;
    fib.l4_protocol = ip.proto;
    fib.ifindex = ingress_ifindex;
    fib.__bindgen_anon_2.tos = ip.tos;
    fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(ip.src_addr);
    fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(ip.dst_addr);
    // tot_len 0: the kernel checks this skb (GSO-aware) against the
    // egress MTU itself.
    // SAFETY: the helper reads and writes `size_of::<bpf_fib_lookup>()`
    // bytes of `fib`, which lives on this stack frame.
    let rc = unsafe {
        fib_lookup(ctx.skb.skb.cast(), &mut fib, size_of::<bpf_fib_lookup>() as i32, 0)
    };
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) || fib.ifindex != cfg.pod_bridge_ifindex {
        return None;
    }
    decrement_ttl(ip);
    let eth = unsafe { &mut *eth };
    eth.dst_addr = fib.dmac;
    eth.src_addr = fib.smac;
    count(|c| c.fastpath_packets += 1);
    // SAFETY: the value is copied out at once, before anything could
    // delete the entry; the helpers take plain integers (flags 0: the
    // peer's ingress, or the bridge's egress).
    let action = match unsafe { POD_PORTS.get(&fib.dmac) }.map(|port| port.ifindex) {
        Some(veth) => unsafe { bpf_redirect_peer(veth, 0) },
        None => unsafe { bpf_redirect(fib.ifindex, 0) },
    };
    Some(action as i32)
}
