//! 802.1Q priority tags (VLAN ID 0) on the underlay.
//!
//! The kernel takes a frame under priority tags as the interface's own
//! untagged traffic: it strips one tag before TC ingress, and after TC
//! (`check_vlan_id` in `__netif_receive_skb_core`) every further VLAN-0
//! tag, then hands the IPv4 inside to `ip_rcv`. Our checks read an
//! untagged frame, so a forged packet under two priority tags (TC sees the
//! second) or one (XDP sees it) passed them and reached a pod. So both
//! hooks strip priority tags first, as the kernel would, and check what is
//! inside; a frame tagged with another VLAN ID belongs to that VLAN's
//! device (or, with none, is dropped by the kernel as another host's), and
//! is left alone.

use aya_ebpf::{
    helpers::generated::{bpf_skb_vlan_pop, bpf_xdp_adjust_head},
    programs::{TcContext, XdpContext},
};

use crate::{DropReason, packet::ptr_at};

/// 802.1Q and 802.1ad tag protocol identifiers.
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const VLAN_TAG_LEN: usize = 4;
const VLAN_VID_MASK: u16 = 0x0fff;
/// Priority tags stripped at most. More stacked ones are no sender's (a
/// priority tag stands alone), and are dropped as `bad_outer`.
const MAX_PRIORITY_TAGS: usize = 4;

/// What a frame is to the underlay's untagged traffic.
pub enum Tagging {
    /// Untagged, or its priority tags stripped: check it.
    Untagged,
    /// Tagged for a VLAN: not the underlay's untagged traffic, so not ours.
    OtherVlan,
}

/// A VLAN tag behind the MAC addresses, as XDP sees it.
#[repr(C)]
struct VlanEthHdr {
    macs: [u8; 12],
    tpid: [u8; 2],
    tci: [u8; 2],
}

#[inline(always)]
fn is_tag(ether_type: u16) -> bool {
    ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD
}

/// At XDP (native or generic, both before the kernel strips a tag): strips
/// the priority tags at the front of the frame, moving the MAC addresses
/// up.
#[inline(always)]
pub fn strip_priority_tags_xdp(ctx: &XdpContext) -> Result<Tagging, DropReason> {
    for stripped in 0..=MAX_PRIORITY_TAGS {
        let Ok(tagged) = ptr_at::<VlanEthHdr>(ctx, 0) else {
            return Ok(Tagging::Untagged);
        };
        // SAFETY (raw reads): ptr_at checked the bounds.
        let (macs, tpid, tci) = unsafe { ((*tagged).macs, u16::from_be_bytes((*tagged).tpid), u16::from_be_bytes((*tagged).tci)) };
        if !is_tag(tpid) {
            return Ok(Tagging::Untagged);
        }
        if tci & VLAN_VID_MASK != 0 {
            return Ok(Tagging::OtherVlan);
        }
        if stripped == MAX_PRIORITY_TAGS {
            return Err(DropReason::BadOuter);
        }
        // SAFETY: the helper takes the raw xdp_md this context wraps.
        if unsafe { bpf_xdp_adjust_head(ctx.ctx, VLAN_TAG_LEN as i32) } != 0 {
            return Err(DropReason::HelperError);
        }
        let macs_at = ptr_at::<[u8; 12]>(ctx, 0)?;
        // SAFETY: ptr_at checked the bounds.
        unsafe { *macs_at = macs };
    }
    Ok(Tagging::Untagged)
}

/// At TC ingress, where the kernel has already moved the first tag out of
/// the frame (`vlan_present`, `vlan_tci`): pops priority tags, each pop
/// moving the next tag in the frame, if any, into their place.
#[inline(always)]
pub fn strip_priority_tags_tc(ctx: &TcContext) -> Result<Tagging, DropReason> {
    for popped in 0..=MAX_PRIORITY_TAGS {
        // SAFETY: reading fields of the context's own sk_buff.
        let (present, tci) = unsafe { ((*ctx.skb.skb).vlan_present, (*ctx.skb.skb).vlan_tci) };
        if present == 0 {
            return Ok(Tagging::Untagged);
        }
        if tci as u16 & VLAN_VID_MASK != 0 {
            return Ok(Tagging::OtherVlan);
        }
        if popped == MAX_PRIORITY_TAGS {
            return Err(DropReason::BadOuter);
        }
        // SAFETY: plain helper call on the context's own sk_buff.
        if unsafe { bpf_skb_vlan_pop(ctx.skb.skb) } != 0 {
            return Err(DropReason::HelperError);
        }
    }
    Ok(Tagging::Untagged)
}
