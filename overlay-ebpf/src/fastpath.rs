//! The fast path (`--forward bpf`): pod-to-pod traffic forwarded by us,
//! both ways, past the kernel's forward path.
//!
//! **Out: TC ingress on each local pod's host-side veth**, where the agent
//! attaches it: ahead of the bridge and of netfilter's bridge hooks, so no
//! Service NAT has happened yet. A frame from the pod to its gateway (the
//! bridge's MAC), for a remote pod CIDR in `ROUTES`, is forwarded the way
//! the kernel would: TTL decremented, encapsulated for a VXLAN peer, and
//! handed by `bpf_redirect_neigh` to the underlay's egress toward the
//! route's next hop, the neighbour table supplying the MACs.
//!
//! **In: TC ingress on the underlay** (after decapsulation, or as it came
//! from a direct peer). A packet from a remote pod for a local pod is
//! looked up in the FIB the way forwarding would; when the kernel would
//! send it out of the pod bridge to a resolved neighbour that is a pod in
//! `POD_PORTS`, it gets those MACs and its TTL decremented, and goes
//! straight into the pod's namespace (`bpf_redirect_peer` through the
//! pod's veth). A lone TCP segment decapsulated at TC goes through the
//! agent's GRO device first ([`to_gro_device`]), and that decision is
//! made once per merged packet ([`try_tc_gro`]).
//!
//! **Conntrack stays consistent.** On each node a flow is either fast both
//! ways or seen by the kernel both ways, never half: conntrack would call
//! the other half INVALID, and kube-proxy drops INVALID packets.
//! - Only pod-to-pod packets are fast, and only for pods in `POD_PORTS`
//!   (which the agent fills only for veths where the out half is attached):
//!   the same condition decides both ways.
//! - A local pod socket that talks through the kernel's path (to a
//!   Service, the outside, or before its pod was enrolled) goes into
//!   `KERNEL_SOCKETS`, recorded both at the veth (before any NAT) and at
//!   the bridge's own ingress (which only the kernel's path reaches; with
//!   `br_netfilter` a Service's NAT happens before it). Such a socket stays
//!   the kernel's both ways, so conntrack undoes the Service's NAT on its
//!   replies: a remote backend's reply carries the backend pod's address
//!   and would otherwise pass for pod-to-pod traffic. The map is an LRU of
//!   65,536 sockets per node.
//!
//! **Left to the kernel**, which keeps its routes: TTL about to expire,
//! IPv4 options, packets too big for the path (the kernel sends the
//! ICMP), neighbours not yet resolved, and everything else. A flow whose
//! reply could not come in fast (the node has no neighbour entry for the
//! pod) does not leave fast either ([`opens_a_flow`]).

use aya_ebpf::{
    bindings::{
        BPF_F_INGRESS, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, TC_ACT_SHOT, bpf_fib_lookup, bpf_redir_neigh,
        bpf_redir_neigh__bindgen_ty_1,
    },
    btf_maps::lpm_trie::Key,
    helpers::generated::{
        bpf_check_mtu, bpf_fib_lookup as fib_lookup, bpf_ktime_get_coarse_ns, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer,
    },
    programs::TcContext,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr};
use overlay_common::{Config, Counter, KERNEL_PATH_MARK, ROUTE_MODE_DIRECT, ROUTE_MODE_VXLAN, Route, SocketKey};

use crate::{
    DropReason,
    counters::count,
    csum,
    encap::{Encapsulated, encapsulate, mark_own_tunnel_packet, to_segmentation},
    maps::{GRO_MERGEABLE_SENT_AT, KERNEL_SOCKETS, POD_PORTS, ROUTES, config},
    packet::{Packet as _, ptr_at},
    parse::{OUTER_IP_OFF, arrives_only_encapsulated, in_cidr, route_of_node},
    proto::{
        ETH_P_IP, IP_MF_OFFSET, IP_OFFSET, IPPROTO_ICMP, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, SCTP_CHUNK_INIT, is_icmp_error,
        is_icmp_query,
    },
};

const AF_INET: u32 = 2;
/// `skb->pkt_type` of a frame addressed to this host (`PACKET_HOST`).
pub const PACKET_HOST: u32 = 0;
const UDP_HDR_LEN: u32 = 8;
/// The transport header, behind an IPv4 header without options.
const L4_OFF: usize = OUTER_IP_OFF + Ipv4Hdr::LEN;
/// The header an ICMP error quotes, behind the ICMP header (RFC 792).
const QUOTE_OFF: usize = L4_OFF + 8;
/// The quoted header without options and the ports of its transport header.
const QUOTE_END: usize = QUOTE_OFF + Ipv4Hdr::LEN + 4;

#[inline(always)]
pub fn try_tc_pod(ctx: &TcContext) -> Result<i32, DropReason> {
    let pass = Ok(TC_ACT_OK as i32);
    let Some(cfg) = config() else {
        return pass;
    };
    if cfg.pod_bridge_ifindex == 0 {
        return pass;
    }
    ctx.make_linear(OUTER_IP_OFF + Ipv4Hdr::LEN + TcpHdr::LEN);
    make_icmp_quote_linear(ctx);
    // SAFETY: reading a field of the context's own sk_buff.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if ifindex == cfg.pod_bridge_ifindex {
        record_kernel_socket(ctx, cfg);
        return pass;
    }
    let Ok(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return pass;
    };
    // SAFETY (raw reads): ptr_at checked the bounds.
    let (dst_mac, src_mac) = unsafe { ((*eth).dst_addr, (*eth).src_addr) };
    // Only frames to the gateway are routed; the rest is the bridge's.
    if dst_mac != cfg.pod_bridge_mac || u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return pass;
    }
    let Ok(ip) = ptr_at::<Ipv4Hdr>(ctx, OUTER_IP_OFF) else {
        return pass;
    };
    // SAFETY: ptr_at checked the bounds.
    let ip = unsafe { &mut *ip };
    // Only a pod's own address: the bridge's is the node's (see
    // `Config::pod_bridge_ip`).
    if !in_cidr(ip.src_addr, cfg.pod_cidr, cfg.pod_prefix_len) || ip.src_addr == cfg.pod_bridge_ip {
        return pass;
    }
    if ip.vihl != 0x45 {
        // With options, the kernel's path. To a Service or beyond, the
        // socket's replies (which may carry none) must meet conntrack
        // too, where the NAT is undone, as below.
        if ROUTES.get(&Key::new(32, ip.dst_addr)).is_none()
            && let Some(socket) = socket_at(ctx, ip, ip.src_addr, 0)
        {
            remember(&socket);
        }
        return pass;
    }
    if ip.ttl <= 1 {
        return pass;
    }
    // A corrupt header is the kernel's to discard, as forwarding would.
    if needs_conntrack(ctx, ip, LocalPod::Source) || !header_intact(ip) {
        return pass;
    }
    let socket = socket_at(ctx, ip, ip.src_addr, 0);
    let Some(route) = ROUTES.get(&Key::new(32, ip.dst_addr)) else {
        // To a Service or beyond: the kernel's path, and its replies too.
        if let Some(socket) = socket {
            remember(&socket);
        }
        return pass;
    };
    let route = *route;
    // The pod must be one the agent enrolled on this very veth, so that
    // the in half serves it too, and the socket one the kernel does not
    // already carry.
    // SAFETY: the map value is copied out at once.
    if unsafe { POD_PORTS.get(&src_mac) }.map(|port| port.ifindex) != Some(ifindex)
        || route.next_hop == [0; 4]
        || socket.is_some_and(|socket| KERNEL_SOCKETS.get_ptr(&socket).is_some())
    {
        return pass;
    }
    // A flow's first packet leaves fast only where its reply can come in
    // fast, which takes the node's neighbour entry for the pod. Without one
    // (never made, or collected) the reply would take the kernel's forward
    // path, whose conntrack, never having seen the request, calls it
    // INVALID; kube-proxy drops those. Left to the kernel, the request
    // makes conntrack's entry (and the bridge's ingress records the
    // socket), so the flow stays the kernel's both ways, and the kernel
    // resolves the pod when the reply comes.
    if opens_a_flow(ctx, ip) && !replies_come_in_fast(ctx, cfg, ip, &src_mac) {
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
    let encapsulated = if route.mode == ROUTE_MODE_VXLAN { Some(encapsulate(ctx, cfg, &route, inner_len, ip.tos)?) } else { None };
    count(Counter::FastpathOut, u64::from(inner_len));
    match encapsulated {
        // A pod tunnel's GSO packet: cut first, then each segment is
        // encapsulated and sent toward the same next hop.
        Some(Encapsulated::NeedsSegmenting) => return to_segmentation(cfg),
        Some(Encapsulated::Done) => mark_own_tunnel_packet(ctx),
        None => {}
    }
    redirect_to_underlay(cfg, &route)
}

/// At the pod bridge's own ingress, which only the kernel's path reaches
/// (fast packets leave from the veths): a local pod's socket seen here is
/// the kernel's from now on, both ways. Under `br_netfilter` a Service's
/// NAT has already happened here, so this is where its sockets are caught;
/// so are sockets from before the pod was enrolled.
#[inline(always)]
fn record_kernel_socket(ctx: &TcContext, cfg: &Config) {
    let Ok(eth) = ptr_at::<EthHdr>(ctx, 0) else { return };
    // SAFETY (raw reads): ptr_at checked the bounds.
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return;
    }
    let Ok(ip) = ptr_at::<Ipv4Hdr>(ctx, OUTER_IP_OFF) else { return };
    let ip = unsafe { &*ip };
    if !in_cidr(ip.src_addr, cfg.pod_cidr, cfg.pod_prefix_len) {
        return;
    }
    if let Some(socket) = socket_at(ctx, ip, ip.src_addr, 0) {
        remember(&socket);
    }
}

/// At TC egress of each enrolled pod's host-side veth: every packet here
/// was delivered by the kernel's path, since `bpf_redirect_peer` (the in
/// half) enters the pod past this hook. The pod's socket it is for is the
/// kernel's from now on, both ways, before the pod can answer. This is
/// what keeps replies of connections NATed to a local pod (hostPort,
/// NodePort with `externalTrafficPolicy: Local`, externalIPs: requests to
/// the node's own address that conntrack turned into the pod's) on the
/// kernel's path, where conntrack undoes that NAT.
#[inline(always)]
pub fn try_tc_pod_delivered(ctx: &TcContext) -> Result<i32, DropReason> {
    let pass = Ok(TC_ACT_OK as i32);
    let Some(cfg) = config() else {
        return pass;
    };
    if cfg.pod_bridge_ifindex == 0 {
        return pass;
    }
    ctx.make_linear(L4_OFF + 4);
    let Ok(eth) = ptr_at::<EthHdr>(ctx, 0) else { return pass };
    // SAFETY (raw reads): ptr_at checked the bounds.
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return pass;
    }
    let Ok(ip) = ptr_at::<Ipv4Hdr>(ctx, OUTER_IP_OFF) else { return pass };
    let ip = unsafe { &*ip };
    // With options too: the pod's reply to it may carry none.
    if !in_cidr(ip.dst_addr, cfg.pod_cidr, cfg.pod_prefix_len) {
        return pass;
    }
    if let Some(socket) = socket_at(ctx, ip, ip.dst_addr, 2) {
        remember(&socket);
    }
    pass
}

/// Which end of a packet is the local pod: its source (the out half) or
/// its destination (the in half).
#[derive(Clone, Copy)]
enum LocalPod {
    Source,
    Destination,
}

/// Whether the packet needs conntrack's own handling, so neither half may
/// take it: a fragment (conntrack reassembles, and a non-first fragment
/// has no ports: one datagram must not go two ways), or an ICMP error
/// about a flow conntrack carries ([`error_needs_conntrack`]).
#[inline(always)]
fn needs_conntrack(ctx: &TcContext, ip: &Ipv4Hdr, local: LocalPod) -> bool {
    if u16::from_be_bytes(ip.frags) & IP_MF_OFFSET != 0 {
        return true;
    }
    if ip.proto != IPPROTO_ICMP {
        return false;
    }
    // SAFETY: ptr_at checked the bounds.
    match ptr_at::<u8>(ctx, L4_OFF).map(|t| unsafe { *t }) {
        Ok(icmp_type) => is_icmp_error(icmp_type) && error_needs_conntrack(ctx, ip, local),
        // Too short to say: the kernel's.
        Err(_) => true,
    }
}

/// Whether an ICMP error is about a flow conntrack carries, judged from
/// the header it quotes: the packet it is about, which went the other way
/// (from the local pod, when the error is for it; to it, when the error
/// is its own). Conntrack translates that quote back through the flow's
/// NAT (a Service's DNAT, a hostPort's), so such errors are the kernel's;
/// the flow is then a socket in `KERNEL_SOCKETS`, as its other packets
/// are. An error about a fast flow is fast too: conntrack never saw the
/// flow, calls the error INVALID, and kube-proxy drops it (a client would
/// wait for its timeout instead of learning that a port is closed or a
/// pod gone, and traceroute would see no hop). A quote that cannot be
/// read, has options, is not about the local pod, or about a protocol
/// whose sockets are not recorded, is left to the kernel.
#[inline(always)]
fn error_needs_conntrack(ctx: &TcContext, ip: &Ipv4Hdr, local: LocalPod) -> bool {
    let Ok(quote) = ptr_at::<Ipv4Hdr>(ctx, QUOTE_OFF) else { return true };
    // SAFETY: ptr_at checked the bounds.
    let quote = unsafe { &*quote };
    let (pod, quoted_pod, port_off) = match local {
        LocalPod::Destination => (ip.dst_addr, quote.src_addr, 0),
        LocalPod::Source => (ip.src_addr, quote.dst_addr, 2),
    };
    if quote.vihl != 0x45 || quoted_pod != pod {
        return true;
    }
    match quote.proto {
        // A query's flow (ping): no Service or hostPort translates ICMP.
        IPPROTO_ICMP => false,
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            if u16::from_be_bytes(quote.frags) & IP_OFFSET != 0 {
                return true;
            }
            // SAFETY: ptr_at checked the bounds.
            let Ok(port) = ptr_at::<[u8; 2]>(ctx, QUOTE_OFF + Ipv4Hdr::LEN + port_off).map(|p| unsafe { *p }) else {
                return true;
            };
            KERNEL_SOCKETS.get_ptr(&SocketKey { addr: pod, port, proto: quote.proto, _pad: 0 }).is_some()
        }
        _ => true,
    }
}

/// Whether the packet (IPv4 without options) is an ICMP error.
#[inline(always)]
fn is_icmp_error_packet(ctx: &TcContext, ip: &Ipv4Hdr) -> bool {
    // SAFETY: ptr_at checked the bounds.
    ip.proto == IPPROTO_ICMP && ptr_at::<u8>(ctx, L4_OFF).is_ok_and(|t| is_icmp_error(unsafe { *t }))
}

/// Makes an ICMP message linear as far as the ports of the header an error
/// quotes. Only ICMP: its messages are short, where pulling that far in a
/// bulk flow's packet would move payload into its head.
#[inline(always)]
fn make_icmp_quote_linear(ctx: &TcContext) {
    // SAFETY: ptr_at checked the bounds.
    if ptr_at::<Ipv4Hdr>(ctx, OUTER_IP_OFF).is_ok_and(|ip| unsafe { (*ip).proto } == IPPROTO_ICMP) {
        ctx.make_linear(QUOTE_END);
    }
}

/// Whether the packet is one conntrack starts a flow's entry with and its
/// reply alone would be INVALID to it: a TCP SYN, an SCTP INIT, or an ICMP
/// query.
#[inline(always)]
fn opens_a_flow(ctx: &TcContext, ip: &Ipv4Hdr) -> bool {
    match ip.proto {
        IPPROTO_TCP => match ptr_at::<TcpHdr>(ctx, L4_OFF) {
            // SAFETY: ptr_at checked the bounds.
            Ok(tcp) => unsafe { (*tcp).syn() != 0 && (*tcp).ack() == 0 },
            // Too short to say: taken for one, so the neighbour check
            // decides as for a SYN.
            Err(_) => true,
        },
        // SAFETY: ptr_at checked the bounds.
        IPPROTO_ICMP => match ptr_at::<u8>(ctx, L4_OFF).map(|t| unsafe { *t }) {
            Ok(icmp_type) => is_icmp_query(icmp_type),
            Err(_) => true,
        },
        // The first chunk's type, behind the 12-byte common header.
        // SAFETY: ptr_at checked the bounds.
        IPPROTO_SCTP => match ptr_at::<u8>(ctx, L4_OFF + 12).map(|t| unsafe { *t }) {
            Ok(chunk) => chunk == SCTP_CHUNK_INIT,
            Err(_) => true,
        },
        _ => false,
    }
}

/// Whether the in half would deliver the reply to this packet from pod
/// `src_mac` straight into the pod: the kernel's FIB, asked as the in half
/// asks it, sends it out of the pod bridge to a resolved neighbour with
/// that MAC.
#[inline(always)]
fn replies_come_in_fast(ctx: &TcContext, cfg: &Config, ip: &Ipv4Hdr, src_mac: &[u8; 6]) -> bool {
    let mut fib_slot = core::mem::MaybeUninit::uninit();
    to_pod_bridge(ctx, cfg, &mut fib_slot, cfg.underlay_ifindex, ip, ip.dst_addr, ip.src_addr)
        .is_some_and(|fib| fib.dmac == *src_mac)
}

/// The kernel's FIB asked for a packet of `ip`'s protocol and TOS from
/// `src` to `dst`, arriving on `ifindex`, as forwarding would ask it: the
/// answer when it goes out of the pod bridge to a resolved neighbour.
/// tot_len stays 0: the kernel checks the skb (GSO-aware) against the
/// egress MTU itself.
#[inline(always)]
fn to_pod_bridge<'a>(
    ctx: &TcContext,
    cfg: &Config,
    slot: &'a mut core::mem::MaybeUninit<FibParams>,
    ifindex: u32,
    ip: &Ipv4Hdr,
    src: [u8; 4],
    dst: [u8; 4],
) -> Option<&'a mut bpf_fib_lookup> {
    let fib = FibParams::zeroed(slot);
    fib.family = AF_INET as u8;
    fib.l4_protocol = ip.proto;
    fib.ifindex = ifindex;
    fib.__bindgen_anon_2.tos = ip.tos;
    fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src);
    fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    // SAFETY: the helper reads and writes `size_of::<bpf_fib_lookup>()`
    // bytes of `fib`, which lives on this stack frame.
    let rc = unsafe { fib_lookup(ctx.skb.skb.cast(), fib, size_of::<bpf_fib_lookup>() as i32, 0) };
    (rc == i64::from(BPF_FIB_LKUP_RET_SUCCESS) && fib.ifindex == cfg.pod_bridge_ifindex).then_some(fib)
}

/// Adds a socket to `KERNEL_SOCKETS` (a full map forgets the one idle
/// longest).
#[inline(always)]
fn remember(socket: &SocketKey) {
    if KERNEL_SOCKETS.get_ptr(socket).is_none() {
        let _ = KERNEL_SOCKETS.insert(socket, &0, 0);
    }
}

/// The local pod socket of a TCP, UDP or SCTP packet (each begins with
/// the two ports): `addr` with the port at `port_off` in the transport
/// header (0: source, 2: destination). kube-proxy translates these three.
/// The ports of a packet with IPv4 options are read past them.
#[inline(always)]
fn socket_at(ctx: &TcContext, ip: &Ipv4Hdr, addr: [u8; 4], port_off: usize) -> Option<SocketKey> {
    if ip.proto != IPPROTO_TCP && ip.proto != IPPROTO_UDP && ip.proto != IPPROTO_SCTP {
        return None;
    }
    if u16::from_be_bytes(ip.frags) & IP_OFFSET != 0 {
        // A non-first fragment: what sits where the ports would is data.
        return None;
    }
    let port = if ip.vihl == 0x45 {
        // SAFETY: ptr_at checked the bounds.
        unsafe { *ptr_at::<[u8; 2]>(ctx, L4_OFF + port_off).ok()? }
    } else {
        let header_len = usize::from(ip.vihl & 0x0f) * 4;
        if ip.vihl >> 4 != 4 || header_len < Ipv4Hdr::LEN {
            return None;
        }
        ctx.load::<[u8; 2]>(OUTER_IP_OFF + header_len + port_off).ok()?
    };
    Some(SocketKey { addr, port, proto: ip.proto, _pad: 0 })
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
/// updated incrementally.
#[inline(always)]
fn decrement_ttl(ip: &mut Ipv4Hdr) {
    let old = u16::from_be_bytes([ip.ttl, ip.proto]);
    ip.check = csum::replace16(ip.check, old, old - 0x0100);
    ip.ttl -= 1;
}

/// Whether an option-less IPv4 header's checksum is right (`ip_rcv`
/// discards the packet otherwise).
#[inline(always)]
fn header_intact(ip: &Ipv4Hdr) -> bool {
    // SAFETY: Ipv4Hdr is 20 bytes of plain integers and byte arrays.
    csum::ipv4_header_valid(unsafe { &*(ip as *const Ipv4Hdr).cast::<[u8; Ipv4Hdr::LEN]>() })
}

/// `bpf_fib_lookup` (64 bytes, 4-byte aligned) on an 8-byte boundary, so
/// it can be zeroed with eight 8-byte stores.
#[repr(C, align(8))]
struct FibParams(bpf_fib_lookup);

impl FibParams {
    const WORDS: usize = size_of::<bpf_fib_lookup>() / 8;

    /// Zeroes `slot` in place and returns its `bpf_fib_lookup`.
    /// `core::mem::zeroed()` compiled to a call of the object's `memset`,
    /// a byte-at-a-time loop (about 330 instructions per packet); volatile
    /// stores cannot be merged back into that call.
    #[inline(always)]
    fn zeroed(slot: &mut core::mem::MaybeUninit<Self>) -> &mut bpf_fib_lookup {
        const { assert!(size_of::<bpf_fib_lookup>() == FibParams::WORDS * 8) };
        let words = slot.as_mut_ptr().cast::<u64>();
        for i in 0..Self::WORDS {
            // SAFETY: `i < WORDS` keeps each store inside `slot`, which is
            // 8-byte aligned.
            unsafe { words.add(i).write_volatile(0) };
        }
        // SAFETY: every byte was just written, and all-zero is a valid
        // bpf_fib_lookup (plain integers and unions).
        &mut unsafe { slot.assume_init_mut() }.0
    }
}

/// Hands the packet to the underlay's egress toward `route.next_hop`; the
/// neighbour subsystem supplies the MAC addresses (and resolves them first
/// if it has to).
#[inline(always)]
pub fn redirect_to_underlay(cfg: &Config, route: &Route) -> Result<i32, DropReason> {
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
        return Err(DropReason::HelperError);
    }
    Ok(action as i32)
}

/// Where the in half meets a packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// At the underlay's TC ingress, once any tunnel header is gone;
    /// `decapsulated` says whether there was one (its inner source was
    /// then checked against the sending peer).
    Underlay { decapsulated: bool },
    /// At the receiving end of one of the agent's devices, decapsulated
    /// and checked, and arrived at the underlay for this host: at the GRO
    /// device's, merged from segments the underlay's TC ingress
    /// decapsulated; at the segmentation device's, a tunnel datagram split
    /// from ones the underlay's GRO merged, decapsulated there.
    AgentDevice,
}

/// The in half: hands a packet for a local pod straight into the pod, or
/// returns `None` to leave it to the kernel, untouched. Unencapsulated, a
/// pod of a plain-VXLAN peer never qualifies (the underlay's ingress drops
/// it as forged).
#[inline(always)]
pub fn deliver_to_pod(ctx: &TcContext, cfg: &Config, arrival: Arrival) -> Option<i32> {
    if cfg.pod_bridge_ifindex == 0 {
        return None;
    }
    // SAFETY: reading fields of the context's own sk_buff.
    let (pkt_type, ingress_ifindex) = unsafe { ((*ctx.skb.skb).pkt_type, (*ctx.skb.skb).ingress_ifindex) };
    let (decapsulated, fib_ifindex) = match arrival {
        Arrival::Underlay { decapsulated } => {
            if pkt_type != PACKET_HOST {
                return None;
            }
            (decapsulated, ingress_ifindex)
        }
        // Looked up as the kernel's path would see it: from the underlay
        // (whose policy routes and forwarding setting apply, not the
        // device's). The device took the frame for another host's (its
        // destination MAC is the underlay's), so its type is set below.
        Arrival::AgentDevice => (true, cfg.underlay_ifindex),
    };
    ctx.make_linear(L4_OFF + 4);
    make_icmp_quote_linear(ctx);
    let eth = ptr_at::<EthHdr>(ctx, 0).ok()?;
    // SAFETY (raw reads and writes below): ptr_at checked the bounds.
    if u16::from_be(unsafe { (*eth).ether_type }) != ETH_P_IP {
        return None;
    }
    let ip = unsafe { &mut *ptr_at::<Ipv4Hdr>(ctx, OUTER_IP_OFF).ok()? };
    if ip.vihl != 0x45 || ip.ttl <= 1 || !in_cidr(ip.dst_addr, cfg.pod_cidr, cfg.pod_prefix_len) {
        return None;
    }
    if needs_conntrack(ctx, ip, LocalPod::Destination) || !header_intact(ip) {
        return None;
    }
    // Pod-to-pod only: from a remote pod CIDR, and not a reply to a socket
    // whose traffic the kernel carries (see the module's doc). An ICMP
    // error about a fast flow may also come from a remote node itself
    // (time exceeded, host unreachable), from its underlay address: it is
    // judged by the route to that node's pods.
    let source = match ROUTES.get(&Key::new(32, ip.src_addr)) {
        Some(route) => route,
        None if is_icmp_error_packet(ctx, ip) => route_of_node(ip.src_addr)?,
        None => return None,
    };
    if !decapsulated && arrives_only_encapsulated(source) {
        return None;
    }
    if let Some(socket) = socket_at(ctx, ip, ip.dst_addr, 2)
        && KERNEL_SOCKETS.get_ptr(&socket).is_some()
    {
        return None;
    }
    let mut fib_slot = core::mem::MaybeUninit::uninit();
    let fib = to_pod_bridge(ctx, cfg, &mut fib_slot, fib_ifindex, ip, ip.src_addr, ip.dst_addr)?;
    // SAFETY: the map value is copied out at once.
    let veth = unsafe { POD_PORTS.get(&fib.dmac) }.map(|port| port.ifindex)?;
    // A deleted pod's entry outlives its veth until the agent's next sync
    // (for good while the agent is down), and a new pod with the same
    // address has the same MAC: a veth that no longer exists leaves the
    // packet to the kernel, whose bridge has learned the new port.
    let mut mtu = 0u32;
    // SAFETY: plain helper call; `mtu` lives on this stack frame.
    if unsafe { bpf_check_mtu(ctx.skb.skb.cast(), veth, &mut mtu, 0, 0) } < 0 {
        return None;
    }
    // `bpf_redirect_peer` keeps the type, and the pod's IP layer drops a
    // frame for another host.
    if arrival == Arrival::AgentDevice && ctx.change_type(PACKET_HOST).is_err() {
        return None;
    }
    decrement_ttl(ip);
    let eth = unsafe { &mut *eth };
    eth.dst_addr = fib.dmac;
    eth.src_addr = fib.smac;
    count(Counter::FastpathIn, u64::from(ctx.len()));
    // SAFETY: plain helper call; into the veth's peer, the pod's eth0.
    Some(unsafe { bpf_redirect_peer(veth, 0) } as i32)
}

/// Sends a TCP segment just decapsulated at the underlay's TC ingress, for
/// a pod of this node, to the GRO device (`ovl-gro0`'s egress), or returns
/// `None` where it goes on as before. The receiving end's NAPI merges the
/// segments of a flow (GRO, as the kernel's vxlan device gets from its
/// socket), and [`try_tc_gro`] decides once per merged packet what
/// [`deliver_to_pod`] decides per packet. Only the cheap tests are made
/// here, per segment; what fails the rest there goes back to the kernel's
/// path. A GSO packet (a veth underlay passes them whole) is merged
/// already, and would be cut on the sending end (whose TSO is off, so
/// veth hands the segments to the NAPI) for nothing: it is delivered
/// directly.
#[inline(always)]
pub fn to_gro_device(ctx: &TcContext, cfg: &Config) -> Option<i32> {
    if cfg.gro_ifindex == 0 || cfg.pod_bridge_ifindex == 0 {
        return None;
    }
    // SAFETY: reading fields of the context's own sk_buff.
    let (pkt_type, gso_size) = unsafe { ((*ctx.skb.skb).pkt_type, (*ctx.skb.skb).gso_size) };
    if pkt_type != PACKET_HOST || gso_size != 0 {
        return None;
    }
    // SAFETY: ptr_at checked the bounds.
    let ip = unsafe { &*ptr_at::<Ipv4Hdr>(ctx, OUTER_IP_OFF).ok()? };
    if ip.proto != IPPROTO_TCP || ip.vihl != 0x45 || !in_cidr(ip.dst_addr, cfg.pod_cidr, cfg.pod_prefix_len) {
        return None;
    }
    match tcp_segment_kind(ctx, ip) {
        TcpSegmentKind::BareAck => return None,
        TcpSegmentKind::Pushing if gro_device_quiet() => return None,
        TcpSegmentKind::Pushing => {}
        TcpSegmentKind::Mergeable => note_mergeable_sent_to_gro_device(),
    }
    count(Counter::GroIn, u64::from(ctx.len()));
    // SAFETY: plain helper call; to the GRO device's egress.
    Some(unsafe { bpf_redirect(cfg.gro_ifindex, 0) } as i32)
}

/// What a TCP segment is to GRO ([`tcp_segment_kind`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum TcpSegmentKind {
    /// No payload, and neither FIN nor RST: an ACK, a window update or a
    /// SYN. GRO never merges one (`tcp_gro_receive` takes a segment only
    /// with 1 to MSS bytes of payload), so through the GRO device it would
    /// pay a device transmit and a NAPI pass for nothing: every ACK of a
    /// stream this node sends. Delivered straight, it can reach its pod
    /// before data of its own flow that GRO still holds, which TCP takes
    /// as it takes any reordering (a segment without payload is not
    /// queued, and its window update is kept against older ones by
    /// sequence). FIN and RST keep their place behind such data.
    BareAck,
    /// Payload and PSH: the end of what its sender wrote at once, a
    /// request or a reply. GRO merges it only as the last of a train, and
    /// delivers it at once (PSH flushes), so with nothing of its flow in
    /// the GRO device the device's transmit and NAPI pass would only delay
    /// it ([`gro_device_quiet`]).
    Pushing,
    /// Anything else: what GRO merges and may hold until its NAPI poll
    /// ends (and past it, up to a jiffy, when the poll used its budget).
    Mergeable,
}

/// What the TCP segment (IPv4 without options) is to GRO. A header past
/// the linear part is [`TcpSegmentKind::Mergeable`].
#[inline(always)]
fn tcp_segment_kind(ctx: &TcContext, ip: &Ipv4Hdr) -> TcpSegmentKind {
    let Ok(tcp) = ptr_at::<TcpHdr>(ctx, OUTER_IP_OFF + Ipv4Hdr::LEN) else {
        return TcpSegmentKind::Mergeable;
    };
    // SAFETY: ptr_at checked the bounds.
    let tcp = unsafe { &*tcp };
    let headers = Ipv4Hdr::LEN + usize::from(tcp.doff()) * 4;
    let payload = usize::from(u16::from_be_bytes(ip.tot_len)) > headers;
    if !payload && tcp.fin() == 0 && tcp.rst() == 0 {
        TcpSegmentKind::BareAck
    } else if payload && tcp.psh() != 0 {
        TcpSegmentKind::Pushing
    } else {
        TcpSegmentKind::Mergeable
    }
}

/// How long the GRO device must have been sent nothing mergeable, by any
/// CPU, before a pushing segment may pass it by. A heuristic bound, not a
/// guarantee: GRO itself holds a merged packet past its NAPI poll at most
/// a jiffy (and only when the poll used its budget at HZ >= 1000), but a
/// segment can wait in the device's ring, before GRO, for as long as its
/// NAPI waits to run (handed to a starved ksoftirqd). The coarse clock
/// adds up to a tick.
const GRO_QUIET_NS: u64 = 50_000_000;

/// Whether the GRO device has been sent nothing mergeable
/// ([`TcpSegmentKind::Mergeable`]), by any CPU, for at least
/// [`GRO_QUIET_NS`]: nothing of any flow then waits there to merge, and a
/// pushing segment delivered straight overtakes nothing of its own flow.
/// All CPUs, not this one: a flow's segments can reach the underlay on
/// several CPUs (a bridge's or switch's queue is drained by whichever CPU
/// holds it); judged per CPU, `fast_path.rs`'s bulk test had segments
/// reordered. Pushing segments sent to the device while it is not quiet
/// do not count: GRO delivers them at once, and a request-response flow's
/// next segment comes after the reply to the last. So a ping-pong that
/// outlives a bulk transfer passes the device by 50 ms after the bulk
/// ended. Left: a flow that sends pushing segments back to back can have
/// one overtaken at the moment the device turns quiet, if the one before
/// it still waits in the device's ring (TCP takes it as any reordering).
#[inline(always)]
fn gro_device_quiet() -> bool {
    let Some(sent_at) = GRO_MERGEABLE_SENT_AT.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: a u64 of the map, which other CPUs write too: read and
    // written whole through the pointer, never referenced.
    let sent = unsafe { sent_at.read_volatile() };
    // SAFETY: plain helper call. Read after the map value, so that `now`
    // is never older than a time another CPU stored before it.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if sent == 0 {
        // Loaded just now: what the previous programs sent is unknown.
        // SAFETY: as above.
        unsafe { sent_at.write_volatile(now) };
        return false;
    }
    // Saturating: a time another CPU stored after `now` was read is not
    // a wrap-around to "long ago".
    now.saturating_sub(sent) >= GRO_QUIET_NS
}

/// Records that a mergeable segment goes to the GRO device now
/// ([`GRO_MERGEABLE_SENT_AT`]), writing the shared value only when the
/// coarse clock has moved: once a tick while segments flow, so that its
/// cache line stays shared among the CPUs. A race between CPUs leaves a
/// time at most a tick old, within [`GRO_QUIET_NS`]'s margin.
#[inline(always)]
pub fn note_mergeable_sent_to_gro_device() {
    if let Some(sent_at) = GRO_MERGEABLE_SENT_AT.get_ptr_mut(0) {
        // SAFETY: plain helper call; the map value as in `gro_device_quiet`.
        unsafe {
            let now = bpf_ktime_get_coarse_ns();
            if sent_at.read_volatile() != now {
                sent_at.write_volatile(now);
            }
        }
    }
}

/// At TC ingress of the GRO device's receiving end (`ovl-gro1`): a merged
/// packet (or a segment nothing merged with) goes into its pod as
/// [`deliver_to_pod`] would take it from the underlay; what it would not
/// take returns to the underlay's ingress, marked
/// ([`overlay_common::KERNEL_PATH_MARK`]), where the kernel's path takes it
/// as it would have taken the segments: from the underlay, through
/// conntrack and the kernel's routes.
#[inline(always)]
pub fn try_tc_gro(ctx: &TcContext) -> Result<i32, DropReason> {
    let cfg = config().ok_or(DropReason::GroUnconfigured)?;
    if let Some(action) = deliver_to_pod(ctx, cfg, Arrival::AgentDevice) {
        return Ok(action);
    }
    count(Counter::GroReturned, u64::from(ctx.len()));
    return_to_kernel_path(ctx, cfg)
}

/// Hands a packet decapsulated and checked on one of the agent's devices
/// back to the underlay's ingress, marked ([`KERNEL_PATH_MARK`]), where
/// `overlay_tc_ingress` passes it to the kernel's path.
#[inline(always)]
pub fn return_to_kernel_path(ctx: &TcContext, cfg: &Config) -> Result<i32, DropReason> {
    ctx.set_mark(KERNEL_PATH_MARK);
    // SAFETY: plain helper call; to the underlay's ingress.
    let action = unsafe { bpf_redirect(cfg.underlay_ifindex, u64::from(BPF_F_INGRESS)) };
    if action == i64::from(TC_ACT_SHOT) {
        return Err(DropReason::HelperError);
    }
    Ok(action as i32)
}
