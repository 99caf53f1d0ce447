//! The agent's GRO device: a veth pair in the node's namespace
//! (`ovl-gro0` → `ovl-gro1`) through which TCP decapsulated at the
//! underlay's TC ingress reaches the pods, merged.
//!
//! Why: the kernel's vxlan device gets GRO from its UDP socket, so the
//! pod's TCP and everything on the way (forwarding, the bridge, conntrack)
//! run once per 64 KB. Decapsulated at TC, after the underlay's GRO (which
//! merges nothing for a UDP port without a socket), each 1,450-byte
//! segment would be delivered on its own, and on an underlay that hands
//! over MTU-sized frames (a NIC without XDP, a bridge that segments) that
//! per-segment delivery was most of our extra cost (see
//! docs/benchmarks/profiles/).
//!
//! So with the fast path on and VXLAN decapsulated at TC, the underlay's
//! program decapsulates and checks each lone TCP segment for a local pod
//! and redirects it to `ovl-gro0`'s egress. Its TSO is off, which makes
//! veth queue it to the peer's NAPI, and GRO is on at `ovl-gro1`, so that
//! NAPI exists (Linux ≥ 5.13) and merges the segments of each flow.
//! `overlay_tc_gro` at `ovl-gro1`'s TC ingress then decides, once per
//! merged packet, what the fast path decides per packet otherwise (FIB
//! look-up, `POD_PORTS`, `KERNEL_SOCKETS`, MTU, TTL, MACs) and delivers it
//! into the pod with `bpf_redirect_peer`. What the fast path would leave
//! to the kernel goes back to the underlay's ingress, marked, and the
//! kernel's path takes it from there as it would have taken the segments.
//!
//! GSO packets (a veth underlay passes them whole) and everything but TCP
//! are delivered as before, straight from the underlay's ingress; on such
//! an underlay a lone segment of a flow that otherwise arrives in GSO
//! packets can reach its pod after a GSO packet sent after it (TCP puts
//! them in order). One queue per CPU, so flows spread as they arrive.
//!
//! The pair itself (creation, reuse, removal) is [`crate::device_pair`]'s.

use crate::{
    bpffs::LinkRole,
    device_pair::DevicePair,
};

/// The GRO device.
pub const GRO: DevicePair = DevicePair {
    what: "GRO device",
    purpose: "TCP decapsulated at TC is merged there, then delivered into pods once per merged packet",
    without: "TCP decapsulated at TC is delivered segment by segment",
    send_end: "ovl-gro0",
    receive_end: "ovl-gro1",
    alias: "overlay-agent: merges decapsulated TCP for pods",
    program: LinkRole::GroDeliver,
    // With any TSO on at the sender, veth takes a packet as merged already
    // and skips the peer's NAPI (`veth_skb_is_eligible_for_gro`). Every
    // one exists since Linux 4.7.
    send_features: &[
        ("tx-tcp-segmentation", false),
        ("tx-tcp-ecn-segmentation", false),
        ("tx-tcp-mangleid-segmentation", false),
        ("tx-tcp6-segmentation", false),
    ],
    receive_features: &[("rx-gro", true)],
    queue_per_cpu: true,
};

/// Whether the datapath delivers through the GRO device: the fast path is
/// on and VXLAN is decapsulated at TC ingress (at XDP, on a NIC, the
/// driver's GRO merges the inner TCP already).
pub const fn wanted(fast_path: bool, decap_at_tc: bool, vxlan: bool) -> bool {
    fast_path && decap_at_tc && vxlan
}
