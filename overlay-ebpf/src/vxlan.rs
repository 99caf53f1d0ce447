//! The headers encapsulation puts in front of an inner IPv4 packet, as one
//! `#[repr(C)]` struct laid out exactly as on the wire (RFC 7348 §5).

use network_types::{eth::EthHdr, ip::Ipv4Hdr, udp::UdpHdr};
use overlay_common::{Config, Route};

use crate::{csum, proto};

/// The VXLAN header (RFC 7348 §5).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct VxlanHdr {
    /// Flags: only [`proto::VXLAN_FLAG_I`].
    pub flags: u8,
    pub reserved1: [u8; 3],
    /// VXLAN network identifier, network byte order.
    pub vni: [u8; 3],
    pub reserved2: u8,
}

/// Outer IPv4 (no options) + UDP + VXLAN + inner Ethernet, behind the
/// outer Ethernet header.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EncapHeaders {
    pub ip: Ipv4Hdr,
    pub udp: UdpHdr,
    pub vxlan: VxlanHdr,
    pub inner_eth: EthHdr,
}

/// What encapsulation inserts after the outer Ethernet header.
pub const ENCAP_LEN: usize = size_of::<EncapHeaders>();
const _: () = assert!(ENCAP_LEN == 20 + 8 + 8 + 14, "EncapHeaders must be the 50 bytes on the wire, unpadded");

impl EncapHeaders {
    /// The headers for `inner_len` bytes of inner IPv4 packet with TOS
    /// `tos` toward `route`'s node, from UDP source port `sport`, with IPv4
    /// identification `ip_id`.
    #[inline(always)]
    pub fn new(cfg: &Config, route: &Route, inner_len: u32, tos: u8, sport: u16, ip_id: u16) -> Self {
        // GSO packets can exceed 64 KiB; segmentation rewrites both lengths
        // per segment, so truncating here is harmless.
        let ip_len = (inner_len + ENCAP_LEN as u32) as u16;
        let vni = cfg.vni.to_be_bytes();
        let mut headers = Self {
            // IPv4: no options, no DF (like the kernel vxlan device's
            // default), TTL 64, inner TOS copied so ECN and DSCP survive.
            ip: Ipv4Hdr {
                vihl: 0x45,
                tos,
                tot_len: ip_len.to_be_bytes(),
                id: ip_id.to_be_bytes(),
                frags: [0, 0],
                ttl: 64,
                proto: proto::IPPROTO_UDP,
                check: [0, 0],
                src_addr: cfg.node_ip,
                dst_addr: route.node_ip,
            },
            // UDP, checksum 0: a non-zero one cannot survive GSO from BPF.
            udp: UdpHdr {
                src: sport.to_be_bytes(),
                dst: cfg.vxlan_port.to_be_bytes(),
                len: (ip_len - Ipv4Hdr::LEN as u16).to_be_bytes(),
                check: [0, 0],
            },
            vxlan: VxlanHdr { flags: proto::VXLAN_FLAG_I, reserved1: [0; 3], vni: [vni[1], vni[2], vni[3]], reserved2: 0 },
            // Inner Ethernet: flannel nodes accept only frames to their VtepMAC.
            inner_eth: EthHdr { dst_addr: route.vtep_mac, src_addr: cfg.vtep_mac, ether_type: proto::ETH_P_IP.to_be() },
        };
        // SAFETY: Ipv4Hdr is 20 bytes of plain integers and byte arrays.
        let ip_bytes = unsafe { &*(&raw const headers.ip).cast::<[u8; Ipv4Hdr::LEN]>() };
        headers.ip.check = csum::compute(ip_bytes, 0, Ipv4Hdr::LEN).to_be_bytes();
        headers
    }

    /// The headers as bytes on the wire.
    #[inline(always)]
    pub fn as_bytes(&self) -> &[u8; ENCAP_LEN] {
        // SAFETY: #[repr(C)] of byte-sized fields and one u16 at an even
        // offset (36), 50 bytes without padding (asserted above).
        unsafe { &*(self as *const Self).cast::<[u8; ENCAP_LEN]>() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_rfc7348_vxlan_on_the_wire() {
        let cfg = Config { vni: 0x0a0b0c, node_ip: [192, 168, 77, 11], vxlan_port: 8472, vtep_mac: [0x0e, 0, 1, 2, 3, 4], ..Config::default() };
        let route = Route { node_ip: [192, 168, 77, 12], vtep_mac: [0x0e, 0, 5, 6, 7, 8], mode: 1, reason: 1, next_hop: [192, 168, 77, 12] };
        let h = EncapHeaders::new(&cfg, &route, 1000, 0xb9, 50000, 0x1234);
        let b = h.as_bytes();
        assert_eq!(b[0..2], [0x45, 0xb9], "version, IHL, TOS copied");
        assert_eq!(u16::from_be_bytes([b[2], b[3]]), 1050, "outer total length");
        assert_eq!(b[4..10], [0x12, 0x34, 0, 0, 64, 17], "id, no DF, TTL 64, UDP");
        assert!(csum::ipv4_header_valid(b[0..20].try_into().unwrap()), "outer IPv4 checksum");
        assert_eq!(b[12..20], [192, 168, 77, 11, 192, 168, 77, 12]);
        assert_eq!(b[20..28], [0xc3, 0x50, 0x21, 0x18, 0x04, 0x06, 0, 0], "ports, UDP length 1030, checksum 0");
        assert_eq!(b[28..36], [0x08, 0, 0, 0, 0x0a, 0x0b, 0x0c, 0], "I flag, VNI");
        assert_eq!(b[36..50], [0x0e, 0, 5, 6, 7, 8, 0x0e, 0, 1, 2, 3, 4, 0x08, 0x00], "VtepMACs, IPv4");
    }
}
