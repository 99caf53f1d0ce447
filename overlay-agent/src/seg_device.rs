//! The agent's segmentation device: a veth pair in the node's namespace
//! (`ovl-seg0` → `ovl-seg1`) through which GSO packets of a pod's own
//! tunnel (VXLAN, Geneve, GRE or IPIP inside a pod) are cut into segments
//! before we encapsulate them.
//!
//! Why: such a packet is marked encapsulated (`skb->encapsulation`, its
//! GSO type carries `SKB_GSO_UDP_TUNNEL` or the like), and
//! `bpf_skb_adjust_room` refuses to encapsulate it again (-EALREADY): the
//! kernel records one level of tunnel headers only. Encapsulated without
//! them, segmentation would copy the pod's tunnel headers with the
//! super-packet's lengths. flannel's kernel vxlan device carries these
//! packets because its features lack tunnel segmentation, so the kernel
//! segments them in software before the device encapsulates.
//!
//! The same here: where encapsulation meets such a packet (the underlay's
//! TC egress, or the fast path's out half), the datapath redirects it to
//! `ovl-seg0`'s egress, whose features lack every tunnel segmentation
//! offload (`NETIF_F_GSO_ENCAP_ALL`), so `validate_xmit_skb` segments it in
//! software; veth hands each segment to `ovl-seg1`, where
//! `overlay_tc_segmented` (TC ingress) encapsulates it as a single packet
//! and redirects it to the underlay's egress. GRO is off on `ovl-seg1`, so
//! nothing merges the segments again.
//!
//! The device also splits tunnel datagrams for this node that the
//! underlay's GRO merged into one UDP GSO packet: a NIC with
//! `rx-udp-gro-forwarding` or `rx-gro-list` on merges VXLAN that carries a
//! UDP checksum (kernel vxlan devices, flannel's included, send one by
//! default), and TC decapsulation sees the merged packet, which it cannot
//! decapsulate as one. `ovl-seg0` lacks UDP and fraglist segmentation too,
//! so each datagram reaches `ovl-seg1` alone and is decapsulated there.
//!
//! The pair itself (creation, reuse, removal) is [`crate::device_pair`]'s.

use crate::{
    bpffs::LinkRole,
    desired::Backend,
    device_pair::DevicePair,
};

/// The segmentation device.
pub const SEGMENTATION: DevicePair = DevicePair {
    what: "segmentation device",
    purpose: "pod tunnels' GSO packets are segmented there, then encapsulated; tunnel datagrams the underlay's GRO merged are split there, then decapsulated",
    without: "GSO packets of pods' own tunnels, and tunnel datagrams the underlay's GRO merged, are dropped (helper_error)",
    send_end: "ovl-seg0",
    receive_end: "ovl-seg1",
    alias: "overlay-agent: segments pod tunnels' GSO packets",
    program: LinkRole::SegEncap,
    // Without every tunnel segmentation offload (`NETIF_F_GSO_ENCAP_ALL`,
    // as `ethtool -k` names them; every one exists since Linux 4.7), the
    // sending end's egress segments a pod tunnel's GSO packet.
    send_features: &[
        ("tx-udp_tnl-segmentation", false),
        ("tx-udp_tnl-csum-segmentation", false),
        ("tx-gre-segmentation", false),
        ("tx-gre-csum-segmentation", false),
        ("tx-ipxip4-segmentation", false),
        ("tx-ipxip6-segmentation", false),
        // And without UDP segmentation (Linux 4.18) or fraglist GSO (5.6),
        // it splits the tunnel datagrams the underlay's GRO merged
        // (`rx-udp-gro-forwarding`, `rx-gro-list`) before they are
        // decapsulated one by one.
        ("tx-udp-segmentation", false),
        ("tx-gso-list", false),
    ],
    // GRO would merge the segments again (veth has a NAPI once it is on).
    receive_features: &[("rx-gro", false)],
    queue_per_cpu: false,
};

/// Whether encapsulation needs the segmentation device: the VXLAN backend.
pub fn wanted(backend: Backend) -> bool {
    backend == Backend::Vxlan
}
