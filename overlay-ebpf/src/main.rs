//! The overlay datapath. Entry points are thin: each calls a `try_…`
//! function and turns its `Err(DropReason)` into a counted drop. The
//! reasons are listed once, in `overlay_common::DropReason`.
//!
//! - [`overlay_tc_egress`]: TC egress on the underlay; VXLAN encapsulation.
//! - [`overlay_xdp_ingress`]: XDP on the underlay; validation + decapsulation.
//! - [`overlay_tc_ingress`]: the same decapsulation at TC ingress, where
//!   `--decap auto` picks it (veth underlays, host-gw) or XDP is taken;
//!   with `--forward bpf` it also delivers straight into local pods.
//! - [`overlay_tc_pod`]: TC ingress on each pod's veth (the fast path to
//!   the underlay) and on the pod bridge (which sockets the kernel
//!   carries), with `--forward bpf`.
//! - [`overlay_tc_pod_delivered`]: TC egress on each pod's veth: which
//!   sockets the kernel delivered to, with `--forward bpf`.
//! - [`overlay_tc_segmented`]: TC ingress on the agent's segmentation
//!   device: encapsulates the segments of pods' own tunnels.
//! - [`overlay_tc_gro`]: TC ingress on the agent's GRO device: delivers
//!   the TCP segments merged there into the pods, with `--forward bpf`.
#![no_std]
#![no_main]

mod counters;
mod decap;
mod encap;
mod fastpath;
mod icmp;
mod maps;
mod packet;
mod parse;
mod vlan;

// Pure helpers, shared with the host's unit tests through the library.
use overlay_ebpf::{csum, proto, vxlan};

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

use crate::counters::count_drop;

/// Why a packet was dropped: one `COUNTERS` slot each.
pub use overlay_common::DropReason;

#[classifier]
pub fn overlay_tc_egress(ctx: TcContext) -> i32 {
    encap::try_tc_egress(&ctx).unwrap_or_else(|reason| {
        count_drop(reason, u64::from(ctx.len()));
        TC_ACT_SHOT as i32
    })
}

#[xdp]
pub fn overlay_xdp_ingress(ctx: XdpContext) -> u32 {
    decap::try_xdp_ingress(&ctx).unwrap_or_else(|reason| {
        count_drop(reason, (ctx.data_end() - ctx.data()) as u64);
        xdp_action::XDP_DROP
    })
}

#[classifier]
pub fn overlay_tc_ingress(ctx: TcContext) -> i32 {
    decap::try_tc_ingress(&ctx).unwrap_or_else(|reason| {
        count_drop(reason, u64::from(ctx.len()));
        TC_ACT_SHOT as i32
    })
}

#[classifier]
pub fn overlay_tc_pod(ctx: TcContext) -> i32 {
    fastpath::try_tc_pod(&ctx).unwrap_or_else(|reason| {
        count_drop(reason, u64::from(ctx.len()));
        TC_ACT_SHOT as i32
    })
}

#[classifier]
pub fn overlay_tc_segmented(ctx: TcContext) -> i32 {
    encap::try_tc_segmented(&ctx).unwrap_or_else(|reason| {
        count_drop(reason, u64::from(ctx.len()));
        TC_ACT_SHOT as i32
    })
}

#[classifier]
pub fn overlay_tc_pod_delivered(ctx: TcContext) -> i32 {
    fastpath::try_tc_pod_delivered(&ctx).unwrap_or_else(|reason| {
        count_drop(reason, u64::from(ctx.len()));
        TC_ACT_SHOT as i32
    })
}

#[classifier]
pub fn overlay_tc_gro(ctx: TcContext) -> i32 {
    fastpath::try_tc_gro(&ctx).unwrap_or_else(|reason| {
        count_drop(reason, u64::from(ctx.len()));
        TC_ACT_SHOT as i32
    })
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
