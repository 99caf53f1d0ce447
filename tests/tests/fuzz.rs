//! The adversarial suite: generated frames through `BPF_PROG_TEST_RUN`,
//! judged by an oracle that knows what the datapath must do, not what it
//! does.
//!
//! Every case is a mutation of a valid frame (VXLAN from a peer for the
//! ingress programs, a pod's packet for the pod program) or a raw frame
//! with a pod source, built from its own 64-bit seed. The oracle allows
//! exactly three outcomes:
//! - **delivered** byte for byte as the valid decapsulation (or forwarding)
//!   of that frame would be, with no drop counted;
//! - **dropped** with exactly one drop reason counted;
//! - **passed untouched**, no drop counted, and only for frames that are
//!   neither tunnel traffic for us nor pod-sourced.
//!
//! The model below is the specification (RFC 7348, RFC 6040, the checks
//! docs/datapath.md promises). Open defects the programs still have are
//! listed in [`KNOWN_DEFECTS`]: while a defect is listed, its frames may
//! also show the current behaviour, and the run prints how often that
//! happened. `cargo xtask fuzz --strict` drops the exemptions.
//!
//! Run size and seed: `OVERLAY_FUZZ_CASES` (default 20,000, what CI runs),
//! `OVERLAY_FUZZ_SEED` (default fixed), `OVERLAY_FUZZ_STRICT=1`; `cargo
//! xtask fuzz [--cases N] [--seed S] [--strict]` sets them. Case seeds that
//! once failed are kept in `tests/fuzz-regressions.txt` and run first.

use std::collections::BTreeMap;

use aya::{
    maps::{Array, HashMap, LpmTrie, MapData, lpm_trie::Key},
    programs::{Program, TestRun as _, TestRunOptions},
};
use overlay_agent::{datapath::Datapath, maps::DatapathMaps};
use overlay_common::{Config, Counter, Peer, PodPort, ROUTE_MODE_DIRECT, ROUTE_MODE_VXLAN, ROUTE_REASON_BACKEND, ROUTE_REASON_ON_LINK, Route, SocketKey, map_names, program_names};
use overlay_tests::{
    PinDir,
    frames::{self, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_DROP, XDP_PASS, checksum, eth, udp},
    require_root,
};

const ME: [u8; 4] = [192, 168, 77, 11];
/// A VXLAN peer, pod CIDR 10.244.2.0/24.
const PEER: [u8; 4] = [192, 168, 77, 12];
/// A direct (host-gw) peer, pod CIDR 10.244.3.0/24: its pods' packets
/// arrive unencapsulated, legitimately.
const DIRECT_PEER: [u8; 4] = [192, 168, 77, 13];
const UNKNOWN_NODE: [u8; 4] = [192, 168, 77, 99];
const OUR_PODS: ([u8; 4], u32) = ([10, 244, 1, 0], 24);
const PEER_PODS: ([u8; 4], u32) = ([10, 244, 2, 0], 24);
const DIRECT_PODS: ([u8; 4], u32) = ([10, 244, 3, 0], 24);
const VNI: u32 = 1;
const PORT: u16 = 8472;
const INNER_MTU: usize = 1450;
const UNDERLAY_MTU: usize = 1500;
const MY_VTEP: [u8; 6] = [0x0e, 0, 192, 168, 77, 11];
const PEER_VTEP: [u8; 6] = [0x0e, 0, 192, 168, 77, 12];
const NIC_MAC: [u8; 6] = [2, 0, 0, 0, 0, 11];
const PEER_NIC_MAC: [u8; 6] = [2, 0, 0, 0, 0, 12];
const BRIDGE_MAC: [u8; 6] = [2, 0, 0, 0, 1, 1];
/// The pod bridge's own address: a pod's packet from it is the kernel's.
const BRIDGE_IP: [u8; 4] = [10, 244, 1, 1];
/// Enrolled on the interface test runs see frames arrive on (lo, index 1).
const POD_MAC: [u8; 6] = [2, 0, 0, 0, 1, 11];

/// Open defects of the programs, each with what it lets through. While
/// listed (with its name in the model's judgement), a frame it covers may
/// show the current behaviour instead of the specified one; remove the
/// entry with the fix. Empty since issue 13's (outer version and lengths,
/// pod sources bare on the underlay, corrupt headers on the fast path,
/// ECN, fragments) were fixed.
const KNOWN_DEFECTS: &[(&str, &str)] = &[];

// ---------------------------------------------------------------- frames

fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, tos: u8, payload: &[u8]) -> Vec<u8> {
    frames::ipv4(src, dst, proto, tos, 0x1234, true, payload)
}

fn set_ipv4_checksum(ip: &mut [u8]) {
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let ihl = ihl.clamp(20, ip.len());
    ip[10] = 0;
    ip[11] = 0;
    let c = checksum(&ip[..ihl]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
}

fn in_cidr(addr: [u8; 4], (net, len): ([u8; 4], u32)) -> bool {
    let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
    u32::from_be_bytes(addr) & mask == u32::from_be_bytes(net) & mask
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn addr(b: &[u8], at: usize) -> Option<[u8; 4]> {
    b.get(at..at + 4).map(|s| s.try_into().unwrap())
}

// ------------------------------------------------------------- generator

/// splitmix64: tiny, seedable, and good enough to spread cases.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len())]
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }
}

/// `rng.pick` over values some of which are drawn from `rng` themselves.
macro_rules! pick {
    ($rng:ident, [$($option:expr),* $(,)?]) => {{
        let options = [$($option),*];
        $rng.pick(&options)
    }};
}

fn host_in(rng: &mut Rng, (net, _): ([u8; 4], u32)) -> [u8; 4] {
    [net[0], net[1], net[2], pick!(rng, [0, 1, 11, 12, 200, 255])]
}

fn some_address(rng: &mut Rng) -> [u8; 4] {
    match rng.below(9) {
        0 => host_in(rng, OUR_PODS),
        1 => host_in(rng, PEER_PODS),
        2 => host_in(rng, DIRECT_PODS),
        3 => pick!(rng, [ME, PEER, DIRECT_PEER, UNKNOWN_NODE]),
        4 => [10, 244, 9, 9],
        5 => [10, 96, 0, 10],
        6 => [255, 255, 255, 255],
        _ => [rng.byte(), rng.byte(), rng.byte(), rng.byte()],
    }
}

/// An inner (pod) IPv4 packet: UDP, TCP, ICMP or anything, sometimes with
/// options or as a fragment, any TOS.
fn pod_packet(rng: &mut Rng, src: [u8; 4], dst: [u8; 4], max_len: usize) -> Vec<u8> {
    let proto = pick!(rng, [17, 17, 6, 6, 1, 47, rng.byte()]);
    let payload_len = match rng.below(4) {
        0 => rng.below(16),
        1 => rng.below(200),
        _ => max_len.saturating_sub(28 + rng.below(4)).min(max_len),
    };
    let l4 = match proto {
        17 => udp(pick!(rng, [40000, 53, 8472, 4789]), pick!(rng, [7, 53, 8472, 4789]), &rng.bytes(payload_len)),
        6 => {
            let payload = rng.bytes(payload_len);
            // Flags from the payload's first byte, so that the generator's
            // draws (and the kept regressions' frames) stay as they were:
            // PSH+ACK, ACK, SYN (a flow's first packet) or SYN+ACK.
            let flags = payload.first().map_or(0x18, |b| [0x18, 0x10, 0x02, 0x12][usize::from(b % 4)]);
            let mut t = vec![0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0];
            t.extend(payload);
            t
        }
        1 => {
            let icmp = rng.bytes(payload_len + 8);
            // One in four, by the first byte (so the draws stay as they
            // were): an ICMP error from `src` about a packet `dst` sent it.
            if icmp[0].is_multiple_of(4) { icmp_error_from(&icmp, src, dst) } else { icmp }
        }
        _ => rng.bytes(payload_len + 8),
    };
    let tos = rng.byte();
    let mut ip = ipv4(src, dst, proto, tos, &l4);
    if rng.chance(10) {
        // Options: NOPs, or garbage.
        let words = 1 + rng.below(10);
        let opts = if rng.chance(50) { vec![1u8; words * 4] } else { rng.bytes(words * 4) };
        ip.splice(20..20, opts);
        ip[0] = 0x40 | (5 + words as u8);
        let len = ip.len() as u16;
        ip[2..4].copy_from_slice(&len.to_be_bytes());
    }
    if rng.chance(10) {
        // A fragment: first (MF), middle or last (an offset).
        let frag: u16 = pick!(rng, [0x2000, 0x2000 | 0x00b9, 0x00b9, 0x1fff, 0x4000 | 0x2000]);
        ip[6..8].copy_from_slice(&frag.to_be_bytes());
    }
    set_ipv4_checksum(&mut ip);
    ip
}

/// An ICMP error from `src` quoting a packet `dst` sent it, drawn from
/// `bytes` (at least 8): the error's type, the quoted protocol (UDP, TCP,
/// ICMP or SCTP) and ports, and now and then a quote about another
/// address, with options, with a fragment offset, or cut short.
fn icmp_error_from(bytes: &[u8], src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let b = |i: usize| bytes.get(i).copied().unwrap_or(0);
    let quoted_to = if b(3).is_multiple_of(10) { [10, 244, 9, 9] } else { src };
    let mut quote = ipv4(dst, quoted_to, [17, 6, 1, 132][usize::from(b(2) % 4)], 0, &[b(4), b(5), b(6), b(7), 0, 8, 0, 0]);
    if b(1).is_multiple_of(10) {
        quote[0] = 0x46;
        quote.splice(20..20, [1, 1, 1, 1]);
    }
    if b(1) % 10 == 1 {
        quote[6..8].copy_from_slice(&0x00b9u16.to_be_bytes());
    }
    if b(1) % 10 == 2 {
        quote.truncate(usize::from(b(6)) % quote.len());
    }
    let mut icmp = vec![[3, 11, 12, 4, 5][usize::from(b(0) / 4 % 5)], 0, 0, 0, 0, 0, 0, 0];
    icmp.extend(quote);
    icmp
}

/// A valid VXLAN frame from `PEER` (or, now and then, from the direct
/// peer or with the sender's own address as the inner source).
fn valid_vxlan(rng: &mut Rng) -> Vec<u8> {
    let (outer_src, src_pods) = if rng.chance(85) { (PEER, PEER_PODS) } else { (DIRECT_PEER, DIRECT_PODS) };
    let inner_src = if rng.chance(90) { host_in(rng, src_pods) } else { outer_src };
    let inner_dst = host_in(rng, OUR_PODS);
    let inner = pod_packet(rng, inner_src, inner_dst, INNER_MTU);
    let vni = VNI.to_be_bytes();
    let mut vx = vec![0x08, 0, 0, 0, vni[1], vni[2], vni[3], 0];
    vx.extend_from_slice(&eth(MY_VTEP, PEER_VTEP, 0x0800, &inner));
    let outer = ipv4(outer_src, ME, 17, pick!(rng, [0, 0, 1, 2, 3, rng.byte()]), &udp(50000 + rng.below(1000) as u16, PORT, &vx));
    let mut frame = eth(NIC_MAC, PEER_NIC_MAC, 0x0800, &outer);
    frame[14 + 6] = pick!(rng, [0, 0x40]);
    set_ipv4_checksum(&mut frame[14..34]);
    frame
}

/// Rewrites one header field of a VXLAN frame to a value chosen to sit on
/// a check's edge (or anywhere).
fn mutate_vxlan_field(rng: &mut Rng, f: &mut Vec<u8>) {
    let len = f.len();
    let set = |f: &mut Vec<u8>, at: usize, bytes: &[u8]| {
        if at + bytes.len() <= f.len() {
            f[at..at + bytes.len()].copy_from_slice(bytes);
        }
    };
    match rng.below(24) {
        0 => set(f, 12, &pick!(rng, [0x0800u16, 0x86dd, 0x8100, 0x0806, 0x88a8, rng.next() as u16]).to_be_bytes()),
        1 => set(f, 14, &[pick!(rng, [0x45, 0x46, 0x44, 0x40, 0x4f, 0x55, 0x65, 0x05, rng.byte()])]),
        2 => set(f, 15, &[pick!(rng, [0, 1, 2, 3, 0xb8, 0xbb, rng.byte()])]),
        3 => {
            let tot = be16(f, 16).unwrap_or(0);
            let v = pick!(rng, [0, 20, 27, 49, tot.wrapping_sub(1), tot.wrapping_add(1), tot.wrapping_add(50), (len - 14) as u16, 0xffff]);
            set(f, 16, &v.to_be_bytes());
        }
        4 => set(f, 20, &pick!(rng, [0u16, 0x4000, 0x2000, 0x0001, 0x00b9, 0x1fff, 0x8000, rng.next() as u16]).to_be_bytes()),
        5 => set(f, 22, &[pick!(rng, [0, 1, 255])]),
        6 => set(f, 23, &[pick!(rng, [17, 6, 1, 0, 136, rng.byte()])]),
        7 => set(f, 24, &rng.bytes(2)),
        8 => set(f, 26, &pick!(rng, [PEER, DIRECT_PEER, UNKNOWN_NODE, ME, [0, 0, 0, 0], [10, 244, 2, 11]])),
        9 => set(f, 30, &pick!(rng, [ME, PEER, [192, 168, 77, 255], [255, 255, 255, 255], [224, 0, 0, 1]])),
        10 => set(f, 34, &rng.bytes(2)),
        11 => set(f, 36, &pick!(rng, [PORT, 4789, 8473, 0, rng.next() as u16]).to_be_bytes()),
        12 => {
            let ulen = be16(f, 38).unwrap_or(0);
            let v = pick!(rng, [0, 7, 8, 15, 16, ulen.wrapping_sub(1), ulen.wrapping_add(1), 0xffff]);
            set(f, 38, &v.to_be_bytes());
        }
        13 => set(f, 40, &rng.bytes(2)),
        14 => set(f, 42, &[pick!(rng, [0x08, 0x00, 0x0c, 0x88, 0x09, 0x48, 0x80, rng.byte()])]),
        15 => {
            let at = pick!(rng, [43, 44, 45, 49]);
            set(f, at, &[pick!(rng, [1, 0x80, rng.byte()])]);
        }
        16 => set(f, 46, &pick!(rng, [[0, 0, 2], [0, 0, 0], [0xff, 0xff, 0xff], [1, 0, 1], [rng.byte(), rng.byte(), rng.byte()]])),
        17 => set(f, 50, &rng.bytes(6)),
        18 => set(f, 62, &pick!(rng, [0x0800u16, 0x86dd, 0x0806, 0x8100, 0x0000, rng.next() as u16]).to_be_bytes()),
        19 => set(f, 64, &[pick!(rng, [0x45, 0x46, 0x65, 0x44, 0x05, rng.byte()])]),
        20 => set(f, 65, &[rng.byte()]),
        21 => {
            let a = match rng.below(6) {
                0 => host_in(rng, OUR_PODS),
                1 => host_in(rng, DIRECT_PODS),
                2 => UNKNOWN_NODE,
                3 => DIRECT_PEER,
                4 => [10, 244, 9, 9],
                _ => [rng.byte(), rng.byte(), rng.byte(), rng.byte()],
            };
            set(f, 76, &a);
        }
        22 => {
            let a = match rng.below(5) {
                0 => host_in(rng, PEER_PODS),
                1 => ME,
                2 => [10, 96, 0, 10],
                3 => [255, 255, 255, 255],
                _ => [rng.byte(), rng.byte(), rng.byte(), rng.byte()],
            };
            set(f, 80, &a);
        }
        _ => {
            // Any byte, anywhere.
            let at = rng.below(len);
            f[at] ^= 1 << rng.below(8);
        }
    }
}

/// Outer IPv4 options: the header grows, everything behind it moves.
fn add_outer_options(rng: &mut Rng, f: &mut Vec<u8>) {
    if f.len() < 34 {
        return;
    }
    let words = 1 + rng.below(10);
    f.splice(34..34, vec![1u8; words * 4]);
    f[14] = 0x40 | (5 + words as u8);
    let tot = (f.len() - 14) as u16;
    f[16..18].copy_from_slice(&tot.to_be_bytes());
    set_ipv4_checksum(&mut f[14..]);
}

/// A frame from the underlay that is not encapsulated but carries a pod's
/// address (or anything else) as its source.
fn raw_frame(rng: &mut Rng) -> Vec<u8> {
    let src = match rng.below(5) {
        0 | 1 => host_in(rng, PEER_PODS),
        2 => host_in(rng, DIRECT_PODS),
        3 => host_in(rng, OUR_PODS),
        _ => some_address(rng),
    };
    let dst = match rng.below(4) {
        0 | 1 => host_in(rng, OUR_PODS),
        2 => ME,
        _ => some_address(rng),
    };
    let ip = pod_packet(rng, src, dst, UNDERLAY_MTU);
    eth(NIC_MAC, PEER_NIC_MAC, 0x0800, &ip)
}

/// A frame a local pod sends on its veth.
fn pod_frame(rng: &mut Rng) -> Vec<u8> {
    let src = match rng.below(20) {
        0..17 => host_in(rng, OUR_PODS),
        17 => BRIDGE_IP,
        _ => some_address(rng),
    };
    let dst = match rng.below(6) {
        0 | 1 => host_in(rng, PEER_PODS),
        2 | 3 => host_in(rng, DIRECT_PODS),
        _ => some_address(rng),
    };
    let max = if in_cidr(dst, PEER_PODS) { INNER_MTU } else { UNDERLAY_MTU };
    let slack = rng.below(3);
    let ip = pod_packet(rng, src, dst, max + slack);
    let src_mac = if rng.chance(90) { POD_MAC } else { pick!(rng, [[2, 0, 0, 0, 1, 12], NIC_MAC]) };
    let dst_mac = if rng.chance(90) { BRIDGE_MAC } else { pick!(rng, [[0xff; 6], [2, 0, 0, 0, 1, 12]]) };
    let mut f = eth(dst_mac, src_mac, 0x0800, &ip);
    if rng.chance(15) {
        mutate_pod_field(rng, &mut f);
    }
    f
}

fn mutate_pod_field(rng: &mut Rng, f: &mut [u8]) {
    let len = f.len();
    match rng.below(8) {
        0 => f[12..14].copy_from_slice(&pick!(rng, [0x86ddu16, 0x0806, 0x8100, rng.next() as u16]).to_be_bytes()),
        1 => f[14] = pick!(rng, [0x44, 0x46, 0x65, 0x05, rng.byte()]),
        2 => f[22] = pick!(rng, [0, 1, 2, 255]),
        3 => f[16..18].copy_from_slice(&pick!(rng, [0u16, 20, 0xffff, (len - 15) as u16]).to_be_bytes()),
        4 => f[24] ^= 1 << rng.below(8), // a corrupt header checksum
        _ => {
            let at = rng.below(len);
            f[at] ^= 1 << rng.below(8);
        }
    }
}

/// Which program a case is for, and its frame.
struct Case {
    ingress: Option<Vec<u8>>,
    pod: Vec<u8>,
}

fn generate(seed: u64) -> Case {
    let mut rng = Rng(seed);
    let ingress = match rng.below(10) {
        0 => None, // a valid frame, as it is: the control
        1 | 2 => Some(raw_frame(&mut rng)),
        _ => Some({
            let mut f = valid_vxlan(&mut rng);
            for _ in 0..1 + rng.below(3) {
                mutate_vxlan_field(&mut rng, &mut f);
            }
            if rng.chance(5) {
                add_outer_options(&mut rng, &mut f);
            }
            if rng.chance(10) {
                let keep = 14 + rng.below(f.len() - 13);
                f.truncate(keep);
            }
            if rng.chance(5) {
                let extra = rng.below(64);
                f.extend(rng.bytes(extra));
            }
            f
        }),
    };
    let ingress = ingress.or_else(|| Some(valid_vxlan(&mut Rng(seed ^ 0x5555))));
    let pod = pod_frame(&mut rng);
    // Now and then under 802.1Q tags, drawn apart so that the frames of
    // the seeds kept before stay as they were.
    let mut tagging = Rng(seed ^ 0x8021);
    let ingress = ingress.map(|f| if tagging.chance(8) { with_tags(&mut tagging, f) } else { f });
    Case { ingress, pod }
}

/// `f` under one to five 802.1Q or 802.1ad tags behind its MAC addresses:
/// mostly priority tags (VLAN ID 0, any priority), now and then one of
/// another VLAN.
fn with_tags(rng: &mut Rng, f: Vec<u8>) -> Vec<u8> {
    if f.len() < 14 {
        return f;
    }
    let mut tags = Vec::new();
    for _ in 0..1 + rng.below(5) {
        let tpid: u16 = pick!(rng, [0x8100, 0x88a8]);
        let vid = if rng.chance(85) { 0 } else { 1 + rng.below(4094) as u16 };
        let tci = (u16::from(rng.byte() & 0xf0) << 8) | vid;
        tags.extend_from_slice(&tpid.to_be_bytes());
        tags.extend_from_slice(&tci.to_be_bytes());
    }
    [&f[..12], &tags, &f[12..]].concat()
}

// ----------------------------------------------------------------- model

/// What the specification says a program must do with a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    /// Delivered (decapsulated, or forwarded by the fast path) as exactly
    /// these bytes. For the pod program's VXLAN output the outer IPv4 id,
    /// its checksum and the UDP source port are checked by rule instead.
    Deliver(Vec<u8>),
    /// Dropped, one reason counted.
    Drop,
    /// Passed on untouched.
    Pass,
    /// Either passed untouched or dropped (malformed in a way the kernel
    /// discards anyway), never delivered.
    PassOrDrop,
}

/// The specified outcome, and a known defect (with the outcome it allows)
/// when the frame is one of its.
type Judgement = (Expect, Option<(&'static str, Expect)>);

/// RFC 6040 decapsulation of the ECN field: `None` means drop.
fn ecn_decapsulate(outer_tos: u8, inner_tos: u8) -> Option<u8> {
    match (outer_tos & 3, inner_tos & 3) {
        (3, 0) => None,
        (3, _) => Some(inner_tos | 3),
        // Outer ECT(1) over inner ECT(0): ECT(1) (L4S).
        (1, 2) => Some((inner_tos & !3) | 1),
        _ => Some(inner_tos),
    }
}

/// The frame as XDP checks it: 802.1Q/802.1ad priority tags (VLAN ID 0)
/// behind the MAC addresses stripped, as the kernel would strip them,
/// up to four; `None` for a fifth (dropped). A tag of another VLAN ends
/// the stripping: that frame is passed. (TC sees tags only once the
/// kernel moved the first out of the frame, which a test run does not.)
fn as_xdp_checks_it(f: &[u8]) -> Option<Vec<u8>> {
    let mut f = f.to_vec();
    for _ in 0..4 {
        if f.len() < 16 || !matches!(be16(&f, 12), Some(0x8100 | 0x88a8)) || be16(&f, 14).unwrap() & 0x0fff != 0 {
            return Some(f);
        }
        f.drain(12..16);
    }
    if f.len() >= 16 && matches!(be16(&f, 12), Some(0x8100 | 0x88a8)) && be16(&f, 14).unwrap() & 0x0fff == 0 { None } else { Some(f) }
}

/// Incremental checksum update (RFC 1624) for one changed 16-bit word.
fn checksum_update(check: u16, old: u16, new: u16) -> u16 {
    let mut sum = u32::from(!check) + u32::from(!old) + u32::from(new);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The ingress programs (XDP and TC, fast path not delivering here).
fn expect_ingress(f: &[u8]) -> Judgement {
    let plain = |e| (e, None);
    if be16(f, 12) != Some(0x0800) || f.len() < 34 {
        return plain(Expect::Pass);
    }
    let vihl = f[14];
    let (version, ihl) = (vihl >> 4, usize::from(vihl & 0x0f) * 4);
    let src = addr(f, 26).unwrap();
    let dst = addr(f, 30).unwrap();
    let udp_at = 14 + ihl.max(20);
    // Tunnel traffic: a complete UDP header to our port at our address. A
    // fragment past the first has no UDP header: what sits there is
    // payload, whatever it reads as.
    let later_fragment = be16(f, 20).unwrap() & 0x1fff != 0;
    let to_our_port = f[23] == 17 && dst == ME && !later_fragment && f.len() >= udp_at + 8 && be16(f, udp_at + 2) == Some(PORT);
    if ihl < 20 {
        // Not a valid IPv4 header at all: the kernel discards it.
        return plain(Expect::PassOrDrop);
    }
    if !to_our_port {
        // Bare, a VXLAN peer's pod, or the peer node itself, only ever
        // reaches our pods forged (a pod may reach the node itself so: a
        // reply to the node, unmasqueraded, leaves the peer by its default
        // route); our own pods never arrive from the underlay at all.
        let forged = ((in_cidr(src, PEER_PODS) || src == PEER) && in_cidr(dst, OUR_PODS)) || in_cidr(src, OUR_PODS);
        if forged && version == 4 {
            return plain(Expect::Drop);
        }
        if version != 4 {
            return plain(Expect::PassOrDrop);
        }
        return plain(Expect::Pass);
    }
    // Tunnel traffic for us: valid, or dropped.
    let drop = plain(Expect::Drop);
    if ihl != 20 || be16(f, 20).unwrap() & 0x3fff != 0 || f.len() < 64 + 20 {
        return drop;
    }
    // A wrong header checksum: the stack would discard it.
    if checksum(&f[14..34]) != 0 {
        return drop;
    }
    let vx = &f[42..50];
    if vx[0] != 0x08 || vx[1..4] != [0, 0, 0] || vx[7] != 0 {
        return drop;
    }
    if u32::from_be_bytes([0, vx[4], vx[5], vx[6]]) != VNI {
        return drop;
    }
    let peer_pods = match src {
        PEER => PEER_PODS,
        DIRECT_PEER => DIRECT_PODS,
        _ => return drop,
    };
    if be16(f, 62) != Some(0x0800) || f[64] >> 4 != 4 {
        return drop;
    }
    let (inner_src, inner_dst) = (addr(f, 76).unwrap(), addr(f, 80).unwrap());
    if !(in_cidr(inner_src, peer_pods) || inner_src == src) || !in_cidr(inner_dst, OUR_PODS) {
        return drop;
    }
    // Our pod CIDR's network and broadcast addresses are no pod's: from
    // the tunnel they would reach the host stack.
    let host_bits = !u32::MAX.checked_shl(32 - OUR_PODS.1).unwrap_or(0);
    if [0, host_bits].contains(&(u32::from_be_bytes(inner_dst) & host_bits)) {
        return drop;
    }
    // What a valid decapsulation delivers: the inner frame behind the
    // outer MAC addresses, ECN combined per RFC 6040.
    let mut out = f[..12].to_vec();
    out.extend_from_slice(&f[62..]);
    let (outer_tos, inner_tos) = (f[15], f[65]);
    let specified = match ecn_decapsulate(outer_tos, inner_tos) {
        None => Expect::Drop,
        Some(tos) => {
            if tos != inner_tos {
                let old = u16::from_be_bytes([f[64], inner_tos]);
                let new = u16::from_be_bytes([f[64], tos]);
                let check = checksum_update(be16(f, 74).unwrap(), old, new);
                out[15] = tos;
                out[24..26].copy_from_slice(&check.to_be_bytes());
            }
            Expect::Deliver(out.clone())
        }
    };
    if version != 4 {
        return drop;
    }
    let tot = usize::from(be16(f, 16).unwrap());
    let ulen = usize::from(be16(f, 38).unwrap());
    let inner_tot = usize::from(be16(f, 66).unwrap());
    // No more after the inner packet than Ethernet padding to 60 bytes and
    // an FCS: more would be a second datagram (merged by GRO, as generic
    // XDP sees them), which decapsulating the first would lose.
    let headers = 8 + 8 + 14;
    if tot > f.len() - 14 || ulen != tot.saturating_sub(20) || ulen < headers + inner_tot || ulen > headers + inner_tot + 26 + 4 {
        return drop;
    }
    plain(specified)
}

/// The pod program on an enrolled pod's veth.
fn expect_pod(f: &[u8]) -> Judgement {
    let plain = |e| (e, None);
    if f.len() < 34 || f[..6] != BRIDGE_MAC || be16(f, 12) != Some(0x0800) {
        return plain(Expect::Pass);
    }
    let (src, dst) = (addr(f, 26).unwrap(), addr(f, 30).unwrap());
    let ttl = f[22];
    if f[14] != 0x45 || ttl <= 1 || !in_cidr(src, OUR_PODS) || src == BRIDGE_IP || f[6..12] != POD_MAC {
        return plain(Expect::Pass);
    }
    let (mtu, vxlan) = if in_cidr(dst, PEER_PODS) {
        (INNER_MTU, true)
    } else if in_cidr(dst, DIRECT_PODS) {
        (UNDERLAY_MTU, false)
    } else {
        return plain(Expect::Pass);
    };
    let inner_len = f.len() - 14;
    if inner_len > mtu {
        return plain(Expect::Pass);
    }
    if checksum(&f[14..34]) != 0 {
        // The kernel's forward path discards it; we leave it there.
        return plain(Expect::Pass);
    }
    // Forwarded: TTL down by one, checksum still valid.
    let mut ip = f[14..].to_vec();
    ip[8] -= 1;
    set_ipv4_checksum(&mut ip[..20]);
    let out = if vxlan {
        let vni = VNI.to_be_bytes();
        let mut out = f[..14].to_vec();
        let mut outer = vec![0x45, ip[1], 0, 0, 0, 0, 0, 0, 64, 17, 0, 0];
        outer[2..4].copy_from_slice(&((inner_len + 50) as u16).to_be_bytes());
        outer.extend_from_slice(&ME);
        outer.extend_from_slice(&PEER);
        out.extend_from_slice(&outer);
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&PORT.to_be_bytes());
        out.extend_from_slice(&((inner_len + 30) as u16).to_be_bytes());
        out.extend_from_slice(&[0, 0, 0x08, 0, 0, 0, vni[1], vni[2], vni[3], 0]);
        out.extend_from_slice(&PEER_VTEP);
        out.extend_from_slice(&MY_VTEP);
        out.extend_from_slice(&[0x08, 0x00]);
        out.extend_from_slice(&ip);
        out
    } else {
        let mut out = f[..14].to_vec();
        out.extend_from_slice(&ip);
        out
    };
    if be16(f, 20).unwrap() & 0x3fff != 0 {
        // A fragment: the fast path cannot see ports past the first, so
        // all fragments go the kernel's way.
        return plain(Expect::Pass);
    }
    // ICMP errors quote a header that conntrack may have to translate back
    // (a Service's NAT): the kernel's path, unless the quote shows a fast
    // flow of the pod (the packet it is about went to the pod: no options,
    // a ping's, or TCP, UDP or SCTP with ports to read and the pod's socket not
    // in KERNEL_SOCKETS, which each run starts empty).
    if f[23] == 1 && f.len() > 34 && [3, 4, 5, 11, 12].contains(&f[34]) {
        const QUOTE: usize = 42;
        let about_a_fast_flow = f.len() >= QUOTE + 20
            && f[QUOTE] == 0x45
            && f[QUOTE + 16..QUOTE + 20] == src
            && match f[QUOTE + 9] {
                1 => true,
                6 | 17 | 132 => be16(f, QUOTE + 6).unwrap() & 0x1fff == 0 && f.len() >= QUOTE + 24,
                _ => false,
            };
        if !about_a_fast_flow {
            return plain(Expect::Pass);
        }
    }
    // A flow's first packet (a TCP SYN, an SCTP INIT, an ICMP query) leaves fast only
    // where the node has resolved the pod, so that the reply can come in
    // fast; no neighbour exists in a test run. A TCP header too short to
    // say is taken for a SYN. (So fuzzing never reaches the resolved case:
    // fast_path.rs covers it with a real neighbour table.)
    let opens_a_flow = match f[23] {
        6 => f.len() < 54 || (f[47] & 0x02 != 0 && f[47] & 0x10 == 0),
        1 => f.len() > 34 && [8, 13, 15, 17].contains(&f[34]),
        // SCTP INIT, the first chunk behind the 12-byte common header.
        132 => f.len() < 47 || f[46] == 1,
        _ => false,
    };
    if opens_a_flow {
        return plain(Expect::Pass);
    }
    plain(Expect::Deliver(out))
}

// ------------------------------------------------------------------ runs

/// The drop reasons counted so far, by name. The one place that knows how
/// drops are counted: the counters' `drop_*` fields today.
fn drop_counts(maps: &DatapathMaps) -> BTreeMap<&'static str, u64> {
    let totals = maps.counters_total().expect("reading COUNTERS");
    totals.drops_by_reason().map(|(reason, n)| (reason.name(), n)).collect()
}

/// Drop reasons that moved, and by how much.
fn drops_between(before: &BTreeMap<&'static str, u64>, after: &BTreeMap<&'static str, u64>) -> Vec<(&'static str, u64)> {
    after.iter().filter(|&(name, n)| *n != before[name]).map(|(name, n)| (*name, n - before[name])).collect()
}

fn fastpath_packets(maps: &DatapathMaps) -> u64 {
    let totals = maps.counters_total().expect("reading COUNTERS");
    totals.packets(Counter::FastpathOut) + totals.packets(Counter::FastpathIn)
}

struct Fixture {
    _pins: PinDir,
    datapath: Datapath,
    maps: DatapathMaps,
    kernel_sockets: HashMap<MapData, SocketKey, u8>,
}

impl Fixture {
    fn new() -> Self {
        let pins = PinDir::new();
        let mut datapath = Datapath::load(pins.path()).expect("loading the datapath (verifier)");
        let ebpf = datapath.ebpf_mut();
        let mut config: Array<_, Config> = Array::try_from(ebpf.map_mut(map_names::CONFIG).unwrap()).unwrap();
        let cfg = Config {
            enabled: 1,
            vni: VNI,
            node_ip: ME,
            vxlan_port: PORT,
            vtep_mac: MY_VTEP,
            underlay_ifindex: 1,
            inner_mtu: INNER_MTU as u32,
            underlay_mtu: UNDERLAY_MTU as u32,
            pod_cidr: OUR_PODS.0,
            pod_prefix_len: OUR_PODS.1,
            pod_bridge_ifindex: 99,
            pod_bridge_mac: BRIDGE_MAC,
            pod_bridge_ip: BRIDGE_IP,
            ..Config::default()
        };
        config.set(0, cfg, 0).unwrap();
        let mut peers: HashMap<_, [u8; 4], Peer> = HashMap::try_from(ebpf.map_mut(map_names::PEERS).unwrap()).unwrap();
        peers.insert(PEER, Peer { pod_cidr: PEER_PODS.0, pod_prefix_len: PEER_PODS.1 }, 0).unwrap();
        peers.insert(DIRECT_PEER, Peer { pod_cidr: DIRECT_PODS.0, pod_prefix_len: DIRECT_PODS.1 }, 0).unwrap();
        let mut routes: LpmTrie<_, [u8; 4], Route> = LpmTrie::try_from(ebpf.map_mut(map_names::ROUTES).unwrap()).unwrap();
        // Plain VXLAN backend: its pods never arrive unencapsulated.
        let vxlan = Route { node_ip: PEER, vtep_mac: PEER_VTEP, mode: ROUTE_MODE_VXLAN, reason: ROUTE_REASON_BACKEND, next_hop: PEER };
        let direct = Route { node_ip: DIRECT_PEER, vtep_mac: [0; 6], mode: ROUTE_MODE_DIRECT, reason: ROUTE_REASON_ON_LINK, next_hop: DIRECT_PEER };
        routes.insert(&Key::new(PEER_PODS.1, PEER_PODS.0), vxlan, 0).unwrap();
        routes.insert(&Key::new(DIRECT_PODS.1, DIRECT_PODS.0), direct, 0).unwrap();
        let mut ports: HashMap<_, [u8; 6], PodPort> = HashMap::try_from(ebpf.map_mut(map_names::POD_PORTS).unwrap()).unwrap();
        ports.insert(POD_MAC, PodPort { ifindex: 1 }, 0).unwrap();
        let maps = DatapathMaps::open(pins.path()).unwrap();
        let sockets_pin = datapath.layout().map(map_names::KERNEL_SOCKETS);
        let kernel_sockets = HashMap::try_from(aya::maps::Map::LruHashMap(MapData::from_pin(&sockets_pin).unwrap())).unwrap();
        Self { _pins: pins, datapath, maps, kernel_sockets }
    }

    /// Runs program `name` on `frame`: its verdict and output bytes, or
    /// `None` when the kernel refuses to build a test skb from the frame
    /// (EINVAL for an IPv4 or IPv6 ethertype with a shorter header behind
    /// it; XDP still sees those frames).
    fn run(&mut self, name: &str, frame: &[u8]) -> Option<(u32, Vec<u8>)> {
        // The hook CONFIG names: XDP acts only while that is XDP, and TC
        // ingress then leaves the judging of bare packets to it.
        let mut config = self.maps.config.get(&0, 0).unwrap();
        config.xdp_decap = u16::from(name == program_names::XDP_INGRESS);
        self.maps.config.set(0, config, 0).unwrap();
        let mut out = vec![0u8; frame.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.data_out = Some(&mut out);
        let (result, is_skb) = match self.datapath.ebpf_mut().program(name).unwrap() {
            Program::Xdp(p) => (p.test_run(opts), false),
            Program::SchedClassifier(p) => (p.test_run(opts), true),
            _ => unreachable!(),
        };
        let result = match result {
            Ok(result) => result,
            Err(aya::programs::ProgramError::SyscallError(e))
                if is_skb && e.io_error.raw_os_error() == Some(libc::EINVAL) && frame.len() < 14 + 40 =>
            {
                return None;
            }
            Err(e) => panic!("BPF_PROG_TEST_RUN of {name} on {} bytes {}: {e:?}", frame.len(), hex(frame)),
        };
        out.truncate(result.data_size_out as usize);
        Some((result.return_value, out))
    }

    /// Forgets the sockets the pod program recorded, so every case starts
    /// from the same state.
    fn forget_kernel_sockets(&mut self) {
        let keys: Vec<SocketKey> = self.kernel_sockets.keys().filter_map(Result::ok).collect();
        for key in keys {
            let _ = self.kernel_sockets.remove(&key);
        }
    }
}

/// What a program did with one frame.
#[derive(Debug)]
struct Outcome {
    verdict: u32,
    out: Vec<u8>,
    drops: Vec<(&'static str, u64)>,
    fastpath: u64,
}

/// Whether `outcome` is what `expect` allows for `frame`; the reason when
/// it is not.
fn judge(program: &str, frame: &[u8], expect: &Expect, o: &Outcome) -> Result<(), String> {
    let (pass, drop, deliver) = match program {
        program_names::XDP_INGRESS => (XDP_PASS, XDP_DROP, XDP_PASS),
        program_names::TC_POD => (TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT),
        _ => (TC_ACT_OK, TC_ACT_SHOT, TC_ACT_OK),
    };
    let dropped = o.verdict == drop && o.drops.len() == 1 && o.drops[0].1 == 1;
    let passed = o.verdict == pass && o.drops.is_empty() && o.out == frame && o.fastpath == 0;
    let ok = match expect {
        Expect::Drop => dropped,
        Expect::Pass => passed,
        Expect::PassOrDrop => dropped || passed,
        Expect::Deliver(want) => {
            o.verdict == deliver
                && o.drops.is_empty()
                && (program != program_names::TC_POD || o.fastpath == 1)
                && same_delivery(program, frame, want, &o.out)
        }
    };
    if ok {
        return Ok(());
    }
    Err(format!(
        "expected {}, got verdict {} with drops {:?}, fastpath +{}, {} bytes out{}",
        match expect {
            Expect::Deliver(b) => match b.iter().zip(&o.out).position(|(w, g)| w != g) {
                Some(at) => format!("delivery of {} bytes (first difference at byte {at}: {:#04x} expected, {:#04x} got)", b.len(), b[at], o.out[at]),
                None => format!("delivery of {} bytes", b.len()),
            },
            other => format!("{other:?}"),
        },
        o.verdict,
        o.drops,
        o.fastpath,
        o.out.len(),
        if o.out != frame { " (changed)" } else { " (untouched)" },
    ))
}

/// Byte-for-byte, except the pod program's VXLAN header fields that are
/// random or hashed by design: outer IPv4 id and checksum (checked for
/// validity instead) and the UDP source port (in 49152..=65535).
fn same_delivery(program: &str, frame: &[u8], want: &[u8], got: &[u8]) -> bool {
    if want.len() != got.len() {
        return false;
    }
    if program != program_names::TC_POD || want.len() != frame.len() + 50 {
        return want == got;
    }
    let masked = |b: &[u8]| {
        let mut b = b.to_vec();
        b[18..20].fill(0);
        b[24..26].fill(0);
        b[34..36].fill(0);
        b
    };
    masked(want) == masked(got) && checksum(&got[14..34]) == 0 && be16(got, 34).unwrap() >= 49152
}

fn settings() -> (usize, u64, bool) {
    let cases = std::env::var("OVERLAY_FUZZ_CASES").ok().map(|v| v.parse().expect("OVERLAY_FUZZ_CASES: a number")).unwrap_or(20_000);
    let seed = std::env::var("OVERLAY_FUZZ_SEED")
        .ok()
        .map(|v| parse_seed(&v).expect("OVERLAY_FUZZ_SEED: a number, decimal or 0x-hex"))
        .unwrap_or(0x0e7e_1a75);
    let strict = std::env::var("OVERLAY_FUZZ_STRICT").is_ok_and(|v| v == "1");
    (cases, seed, strict)
}

fn parse_seed(v: &str) -> Option<u64> {
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}

/// Case seeds kept from failures: `tests/fuzz-regressions.txt`, one
/// 0x-hex seed per line, `#` comments.
fn regression_seeds() -> Vec<u64> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz-regressions.txt");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    text.lines()
        .map(|l| l.split('#').next().unwrap().trim())
        .filter(|l| !l.is_empty())
        .map(|l| parse_seed(l).unwrap_or_else(|| panic!("{path}: {l:?} is not a seed")))
        .collect()
}

/// Kernel log lines that report a kernel problem.
fn kernel_warnings() -> Vec<String> {
    let out = std::process::Command::new("dmesg").output().expect("running dmesg");
    assert!(out.status.success(), "dmesg failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| ["WARNING:", "BUG:", "general protection", "Oops"].iter().any(|w| l.contains(w)))
        .map(str::to_owned)
        .collect()
}

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn generated_frames_are_delivered_dropped_once_or_passed_untouched() {
    require_root();
    let (cases, seed, strict) = settings();
    let warnings_before = kernel_warnings();
    let mut f = Fixture::new();
    let mut seeder = Rng(seed);
    let seeds: Vec<u64> = regression_seeds().into_iter().chain((0..cases).map(|_| seeder.next())).collect();
    let known: BTreeMap<&str, &str> = KNOWN_DEFECTS.iter().copied().collect();
    let mut excused: BTreeMap<&str, usize> = BTreeMap::new();
    let mut failures: Vec<String> = Vec::new();
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let started = std::time::Instant::now();

    for case_seed in &seeds {
        let case = generate(*case_seed);
        // Each run: the program, the frame it is fed, the frame as it
        // checks it (what passing leaves untouched), and the judgement.
        let mut runs: Vec<(&str, Vec<u8>, Vec<u8>, Judgement)> = Vec::new();
        if let Some(frame) = case.ingress {
            let (seen, judgement) = match as_xdp_checks_it(&frame) {
                Some(seen) => (seen.clone(), expect_ingress(&seen)),
                None => (frame.clone(), (Expect::Drop, None)),
            };
            runs.push((program_names::XDP_INGRESS, frame.clone(), seen, judgement));
            let judgement = expect_ingress(&frame);
            runs.push((program_names::TC_INGRESS, frame.clone(), frame, judgement));
        }
        let judgement = expect_pod(&case.pod);
        runs.push((program_names::TC_POD, case.pod.clone(), case.pod, judgement));
        for (program, frame, seen, (expect, defect)) in runs {
            let drops_before = drop_counts(&f.maps);
            let fast_before = fastpath_packets(&f.maps);
            let Some((verdict, out)) = f.run(program, &frame) else {
                *outcomes.entry(format!("{program}: refused by the test run (too short for a test skb)")).or_default() += 1;
                continue;
            };
            let outcome = Outcome {
                verdict,
                out,
                drops: drops_between(&drops_before, &drop_counts(&f.maps)),
                fastpath: fastpath_packets(&f.maps) - fast_before,
            };
            if program == program_names::TC_POD {
                f.forget_kernel_sockets();
            }
            let label = match (&expect, outcome.drops.first()) {
                (Expect::Deliver(_), _) => "deliver".to_owned(),
                (_, Some((reason, _))) => format!("drop {reason}"),
                (e, None) => format!("{e:?}").to_lowercase(),
            };
            *outcomes.entry(format!("{program}: {label}")).or_default() += 1;
            let Err(why) = judge(program, &seen, &expect, &outcome) else { continue };
            if let Some((name, allowed)) = &defect
                && !strict
                && known.contains_key(name)
                && judge(program, &seen, allowed, &outcome).is_ok()
            {
                *excused.entry(name).or_default() += 1;
                continue;
            }
            let defect = defect.map(|(name, _)| format!(" [known defect {name}: {}]", known[name])).unwrap_or_default();
            failures.push(format!("case seed {case_seed:#018x}, {program}: {why}{defect}\n    frame: {}", hex(&frame)));
        }
    }
    let elapsed = started.elapsed();
    let warnings_after = kernel_warnings();
    let new_warnings: Vec<&String> = warnings_after.iter().filter(|w| !warnings_before.contains(w)).collect();

    eprintln!(
        "fuzz: {} cases ({} kept regressions), {} frames through {} programs in {:.1} s, seed {seed:#x}{}",
        seeds.len(),
        seeds.len() - cases,
        outcomes.values().sum::<usize>(),
        // XDP_INGRESS, TC_INGRESS and TC_POD, the programs driven above.
        3,
        elapsed.as_secs_f64(),
        if strict { ", strict" } else { "" }
    );
    for (what, n) in &outcomes {
        eprintln!("  {n:>7}  {what}");
    }
    for (name, n) in &excused {
        eprintln!("  {n:>7}  accepted only because of known defect {name}: {}", known[name]);
    }
    assert!(new_warnings.is_empty(), "the kernel warned during the run:\n{new_warnings:#?}");
    if !failures.is_empty() {
        let shown: Vec<&String> = failures.iter().take(20).collect();
        panic!(
            "{} of {} runs broke the oracle (first {}); keep a failing case seed in tests/fuzz-regressions.txt:\n{}",
            failures.len(),
            outcomes.values().sum::<usize>(),
            shown.len(),
            shown.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n")
        );
    }
    // The generator must reach every outcome, or the oracle judges little.
    for needed in [
        format!("{}: deliver", program_names::XDP_INGRESS),
        format!("{}: deliver", program_names::TC_INGRESS),
        format!("{}: deliver", program_names::TC_POD),
        format!("{}: pass", program_names::XDP_INGRESS),
        format!("{}: pass", program_names::TC_POD),
    ] {
        assert!(outcomes.get(&needed).copied().unwrap_or(0) > 0, "no case reached {needed:?}");
    }
    let drop_reasons = outcomes.keys().filter(|k| k.starts_with(program_names::XDP_INGRESS) && k.contains(": drop ")).count();
    assert!(drop_reasons >= 6, "only {drop_reasons} drop reasons reached at XDP");
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The model itself, on hand-made frames: a test of the oracle.
#[test]
fn the_model_accepts_valid_vxlan_and_refuses_forgeries() {
    let mut rng = Rng(7);
    let mut valid = valid_vxlan(&mut rng);
    valid[15] = 0; // outer Not-ECT
    set_ipv4_checksum(&mut valid[14..34]);
    let (Expect::Deliver(out), None) = expect_ingress(&valid) else { panic!("valid frame not delivered") };
    assert_eq!(out.len(), valid.len() - 50);
    let mut wrong_vni = valid.clone();
    wrong_vni[48] = 2;
    assert_eq!(expect_ingress(&wrong_vni).0, Expect::Drop);
    let mut bad_checksum = valid.clone();
    bad_checksum[24] ^= 1;
    assert_eq!(expect_ingress(&bad_checksum).0, Expect::Drop, "a wrong outer header checksum");
    let mut ce = valid.clone();
    ce[15] = 3;
    set_ipv4_checksum(&mut ce[14..34]);
    ce[65] = 0;
    assert_eq!(expect_ingress(&ce).0, Expect::Drop, "CE into Not-ECT");
    ce[65] = 2;
    set_ipv4_checksum(&mut ce[64..84]);
    let (Expect::Deliver(out), _) = expect_ingress(&ce) else { panic!("CE into ECT(0) is delivered") };
    assert_eq!(out[15] & 3, 3, "CE copied inward");
    assert_eq!(checksum(&out[14..34]), 0, "inner checksum updated");
    let raw = eth(NIC_MAC, PEER_NIC_MAC, 0x0800, &ipv4([10, 244, 2, 5], [10, 244, 1, 5], 17, 0, &udp(1, 2, b"x")));
    assert_eq!(expect_ingress(&raw).0, Expect::Drop, "a VXLAN peer's pod source, unencapsulated");
    let reply = eth(NIC_MAC, PEER_NIC_MAC, 0x0800, &ipv4([10, 244, 2, 5], ME, 1, 0, &[0; 8]));
    assert_eq!(expect_ingress(&reply).0, Expect::Pass, "a VXLAN peer's pod answering this node, unmasqueraded");
    let own = eth(NIC_MAC, PEER_NIC_MAC, 0x0800, &ipv4([10, 244, 1, 5], ME, 1, 0, &[0; 8]));
    assert_eq!(expect_ingress(&own).0, Expect::Drop, "one of our own pods, from the underlay");
    let mut ect1 = valid.clone();
    ect1[15] = 1;
    set_ipv4_checksum(&mut ect1[14..34]);
    ect1[65] = 2;
    set_ipv4_checksum(&mut ect1[64..84]);
    let (Expect::Deliver(out), _) = expect_ingress(&ect1) else { panic!("ECT(1) over ECT(0) is delivered") };
    assert_eq!(out[15] & 3, 1, "ECT(1) copied inward over ECT(0)");
    assert_eq!(checksum(&out[14..34]), 0, "inner checksum updated");
    // XDP strips priority tags and checks what is inside; another VLAN's
    // frame it leaves as it is; a fifth priority tag is too many.
    let tagged = |f: &[u8], tcis: &[u16]| [&f[..12], &tcis.iter().flat_map(|t| [0x81, 0x00, (t >> 8) as u8, *t as u8]).collect::<Vec<u8>>(), &f[12..]].concat();
    assert_eq!(as_xdp_checks_it(&tagged(&own, &[0xe000, 0x0000])), Some(own.clone()));
    let vlan = tagged(&own, &[0x0000, 0x0064]);
    assert_eq!(as_xdp_checks_it(&vlan), Some(tagged(&own, &[0x0064])));
    assert_eq!(as_xdp_checks_it(&tagged(&own, &[0; 4])), Some(own.clone()));
    assert_eq!(as_xdp_checks_it(&tagged(&own, &[0; 5])), None);
    let mut long = valid.clone();
    long[16..18].copy_from_slice(&((valid.len() - 14 + 1) as u16).to_be_bytes());
    set_ipv4_checksum(&mut long[14..34]);
    assert_eq!(expect_ingress(&long).0, Expect::Drop, "outer total length past the frame");
    let mut v6 = valid.clone();
    v6[14] = 0x65;
    assert_eq!(expect_ingress(&v6).0, Expect::Drop, "outer version 6 behind ethertype IPv4");
    let direct = eth(NIC_MAC, PEER_NIC_MAC, 0x0800, &ipv4([10, 244, 3, 5], [10, 244, 1, 5], 17, 0, &udp(1, 2, b"x")));
    assert_eq!(expect_ingress(&direct).0, Expect::Pass, "a direct peer's pod, as host-gw sends it");
}
