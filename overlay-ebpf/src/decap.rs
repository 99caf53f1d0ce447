//! Decapsulation, at TC ingress (`--decap auto` on veths) or at XDP
//! (`auto` on NICs).
//!
//! Either way the inner IPv4 packet is handed to the kernel's stack with the
//! outer Ethernet addresses, so it is routed to the pod like any packet that
//! arrived for this host (the flannel model: pods sit behind `cni0`).

use aya_ebpf::{
    bindings::{BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_OK, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, xdp_action},
    helpers::generated::bpf_xdp_adjust_head,
    programs::{TcContext, XdpContext},
};
use network_types::eth::EthHdr;
use overlay_common::{Config, Counter, DECAP_HOOK_FROM_XDP, DECAP_HOOK_TC, DECAP_HOOK_XDP, KERNEL_PATH_MARK};

use crate::{
    DropReason,
    counters::count,
    encap::to_segmentation,
    fastpath::{Arrival, PACKET_HOST, deliver_to_pod, note_mergeable_sent_to_gro_device, return_to_kernel_path, to_gro_device},
    maps::config,
    packet::{Packet as _, ptr_at},
    parse::{ENCAP_LEN, OUTER_UDP_OFF, Rx, classify_rx, reject_bare_tunnel_source},
    vlan::{Tagging, strip_priority_tags_tc, strip_priority_tags_xdp},
};

#[inline(always)]
pub fn try_xdp_ingress(ctx: &XdpContext) -> Result<u32, DropReason> {
    let Some(cfg) = config() else {
        return Ok(xdp_action::XDP_PASS);
    };
    // Attached, but not the hook CONFIG names: TC ingress decapsulates
    // and judges everything (see `Config::xdp_decap`).
    if cfg.xdp_decap == DECAP_HOOK_TC {
        return Ok(xdp_action::XDP_PASS);
    }
    if let Tagging::OtherVlan = strip_priority_tags_xdp(ctx)? {
        count(Counter::Pass, (ctx.end() - ctx.start()) as u64);
        return Ok(xdp_action::XDP_PASS);
    }
    match classify_rx(ctx, cfg)? {
        // Handing over: judged, and left to TC to decapsulate.
        Rx::Decap | Rx::Merged if cfg.xdp_decap != DECAP_HOOK_XDP => return Ok(xdp_action::XDP_PASS),
        Rx::Decap => {}
        Rx::NotOurs => {
            reject_bare_tunnel_source(ctx, cfg)?;
            count(Counter::Pass, (ctx.end() - ctx.start()) as u64);
            return Ok(xdp_action::XDP_PASS);
        }
        // XDP has no GSO size to tell one by (generic XDP, after GRO, sees
        // a merged packet as one long datagram, which `classify_rx` refuses
        // as `bad_outer`).
        Rx::Merged => return Err(DropReason::HelperError),
    }
    let outer = unsafe { *ptr_at::<EthHdr>(ctx, 0)? };
    // SAFETY: the helper takes the raw xdp_md this context wraps.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, ENCAP_LEN as i32) } != 0 {
        return Err(DropReason::HelperError);
    }
    // The inner Ethernet header now leads; give it the outer addresses so
    // the stack sees a frame for this host.
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    unsafe {
        (*eth).dst_addr = outer.dst_addr;
        (*eth).src_addr = outer.src_addr;
    }
    count(Counter::Decap, (ctx.end() - ctx.start()) as u64);
    Ok(xdp_action::XDP_PASS)
}

#[inline(always)]
pub fn try_tc_ingress(ctx: &TcContext) -> Result<i32, DropReason> {
    let Some(cfg) = config() else {
        return Ok(TC_ACT_OK as i32);
    };
    // Handed back for the kernel's path (see `KERNEL_PATH_MARK`): a merged
    // packet the GRO device returned or a split datagram, both checked
    // before they were decapsulated, or our own frag-needed reply.
    // SAFETY: reading a field of the context's own sk_buff.
    if unsafe { (*ctx.skb.skb).mark } == KERNEL_PATH_MARK {
        ctx.set_mark(0);
        count(Counter::Pass, u64::from(ctx.len()));
        return Ok(TC_ACT_OK as i32);
    }
    // Behind XDP too: XDP saw a tag the NIC had not stripped, and what
    // TC sees of a frame XDP passed as another VLAN's is that VLAN's.
    if let Tagging::OtherVlan = strip_priority_tags_tc(ctx)? {
        count(Counter::Pass, u64::from(ctx.len()));
        return Ok(TC_ACT_OK as i32);
    }
    // The IPv4 header of every packet; `classify_rx` makes a tunnel's
    // inner headers linear once it knows the packet is UDP for this node.
    // Pulling that far for every packet would move payload into the head
    // of each TCP packet (whose linear part ends with its header): a copy
    // and often a new head, for host-gw and DirectRouting pod traffic and
    // the node's own.
    ctx.make_linear(OUTER_UDP_OFF);
    match classify_rx(ctx, cfg)? {
        Rx::Decap => {}
        Rx::NotOurs => {
            // Behind XDP, this may be a packet XDP decapsulated (and checked).
            let xdp_in_front = matches!(cfg.xdp_decap, DECAP_HOOK_XDP | DECAP_HOOK_FROM_XDP);
            if let Some(action) = deliver_to_pod(ctx, cfg, Arrival::Underlay { decapsulated: xdp_in_front }) {
                return Ok(action);
            }
            if !xdp_in_front {
                reject_bare_tunnel_source(ctx, cfg)?;
            }
            count(Counter::Pass, u64::from(ctx.len()));
            return Ok(TC_ACT_OK as i32);
        }
        // Split on the segmentation device; each datagram comes back to
        // `try_tc_split_datagram`, which takes it for this host's. One
        // merged from frames for another host (flooded to us) is not: the
        // kernel drops those.
        Rx::Merged => {
            // SAFETY: reading a field of the context's own sk_buff.
            if unsafe { (*ctx.skb.skb).pkt_type } != PACKET_HOST {
                count(Counter::Pass, u64::from(ctx.len()));
                return Ok(TC_ACT_OK as i32);
            }
            // Its datagrams reach the GRO device only once split, from
            // the CPU's backlog: a pushing segment of their flow that
            // arrived unmerged meanwhile must not take the device for
            // quiet and overtake them.
            note_mergeable_sent_to_gro_device();
            return to_segmentation(cfg);
        }
    }
    strip_tunnel(ctx)?;
    let delivered = to_gro_device(ctx, cfg).or_else(|| deliver_to_pod(ctx, cfg, Arrival::Underlay { decapsulated: true }));
    Ok(delivered.unwrap_or(TC_ACT_OK as i32))
}

/// Removes the tunnel headers [`classify_rx`] accepted, keeping the outer
/// Ethernet header in front.
#[inline(always)]
fn strip_tunnel(ctx: &TcContext) -> Result<(), DropReason> {
    // FIXED_GSO: a GSO super-packet (veth hands them over whole) keeps its
    // inner MSS; without it the kernel grows gso_size by 50 and segments
    // come out larger than the pod MTU.
    ctx.adjust_room(-(ENCAP_LEN as i32), BPF_ADJ_ROOM_MAC, u64::from(BPF_F_ADJ_ROOM_FIXED_GSO))
        .map_err(|_| DropReason::HelperError)?;
    count(Counter::Decap, u64::from(ctx.len()));
    Ok(())
}

/// TC ingress on `ovl-seg1`, for one tunnel datagram of a GSO packet the
/// underlay's GRO had merged ([`Rx::Merged`]), split again by the kernel
/// on the segmentation device (whose features lack UDP segmentation):
/// checked and decapsulated as at the underlay's ingress. What the fast
/// path does not deliver returns to the underlay's ingress, marked as the
/// GRO device's returns are ([`KERNEL_PATH_MARK`]), for the kernel's path.
#[inline(always)]
pub fn try_tc_split_datagram(ctx: &TcContext, cfg: &Config) -> Result<i32, DropReason> {
    // `ovl-seg1` took the frame for another host's (its destination MAC is
    // the underlay's); `to_gro_device` wants it for this one.
    ctx.change_type(PACKET_HOST).map_err(|_| DropReason::HelperError)?;
    match classify_rx(ctx, cfg)? {
        Rx::Decap => {}
        // Not split (the device segments UDP in software), or not ours.
        Rx::NotOurs | Rx::Merged => return Err(DropReason::HelperError),
    }
    strip_tunnel(ctx)?;
    if let Some(action) = to_gro_device(ctx, cfg).or_else(|| deliver_to_pod(ctx, cfg, Arrival::AgentDevice)) {
        return Ok(action);
    }
    return_to_kernel_path(ctx, cfg)
}
