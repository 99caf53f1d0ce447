//! Packet bytes for the tests that build their own frames (`packets.rs`,
//! `fuzz.rs`, `forged_traffic.rs`): the Internet checksum and Ethernet,
//! IPv4 and UDP headers in front of a payload.

/// What the programs return under `BPF_PROG_TEST_RUN` (`xdp_action`,
/// `TC_ACT_*` in the kernel's uapi).
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

/// The Internet checksum (RFC 1071) of `bytes`, an odd last byte padded
/// with zero.
pub fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 packet: a 20-byte header (TTL 64, identification `id`, the
/// don't-fragment bit when `dont_fragment`, a valid checksum) and `payload`.
pub fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, tos: u8, id: u16, dont_fragment: bool, payload: &[u8]) -> Vec<u8> {
    let flags = if dont_fragment { 0x40 } else { 0 };
    let mut h = vec![0x45, tos, 0, 0, 0, 0, flags, 0, 64, proto, 0, 0];
    h[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    h[4..6].copy_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// A UDP datagram without a checksum (0, which IPv4 allows).
pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::with_capacity(8 + payload.len());
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

/// An Ethernet frame.
pub fn eth(dst: [u8; 6], src: [u8; 6], ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut e = Vec::with_capacity(14 + payload.len());
    e.extend_from_slice(&dst);
    e.extend_from_slice(&src);
    e.extend_from_slice(&ether_type.to_be_bytes());
    e.extend_from_slice(payload);
    e
}
