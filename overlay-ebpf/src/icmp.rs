//! ICMP "fragmentation needed" (type 3, code 4) for DF packets that will
//! not fit the underlay once encapsulated (RFC 1191), so path-MTU discovery
//! works through the overlay instead of black-holing.
//!
//! The kernel route's MTU (underlay − 50) already makes the kernel answer
//! for forwarded traffic; this covers packets that reach the underlay's
//! egress anyway (a route without that MTU, raw sockets, PMTU probing).
//! The too-big packet is rewritten in place into the reply and sent back
//! in through the underlay's ingress, where the stack routes it to the
//! sender like any ICMP arriving from the network.

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, TC_ACT_SHOT},
    helpers::generated::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};
use overlay_common::Counter;

use crate::{DropReason, counters::count, csum, parse::ETH_P_IP};

const IPPROTO_ICMP: u8 = 1;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
/// The original IPv4 header plus the first 8 bytes of its payload.
const QUOTE_LEN: usize = 28;
const ICMP_LEN: usize = 8 + QUOTE_LEN;
const REPLY_LEN: usize = EthHdr::LEN + Ipv4Hdr::LEN + ICMP_LEN;

/// Whether the IPv4 header has DF set.
#[inline(always)]
pub fn dont_fragment(ip: &Ipv4Hdr) -> bool {
    ip.frags[0] & 0x40 != 0
}

/// Turns the too-big packet into a frag-needed reply carrying `mtu` and
/// redirects it into the underlay's ingress. Never answers an ICMP
/// destination-unreachable (RFC 1122 §3.2.2): those are dropped.
#[inline(always)]
pub fn reply_frag_needed(ctx: &TcContext, mtu: u32) -> Result<i32, DropReason> {
    let eth: [u8; EthHdr::LEN] = ctx.load(0).map_err(|_| DropReason::Truncated)?;
    let quote: [u8; QUOTE_LEN] = ctx.load(EthHdr::LEN).map_err(|_| DropReason::Truncated)?;
    if quote[9] == IPPROTO_ICMP && quote[20] == ICMP_DEST_UNREACH {
        return Ok(TC_ACT_SHOT as i32);
    }
    let reply = frag_needed_frame(&eth, &quote, mtu);
    let too_big_len = u64::from(ctx.len());
    // SAFETY: the helpers take the raw __sk_buff this context wraps.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, REPLY_LEN as u32, 0) } != 0 {
        return Err(DropReason::HelperError);
    }
    ctx.store(0, &reply, 0).map_err(|_| DropReason::HelperError)?;
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    count(Counter::IcmpFragNeeded, too_big_len);
    Ok(unsafe { bpf_redirect(ifindex, u64::from(BPF_F_INGRESS)) } as i32)
}

/// The whole reply frame: MACs swapped, the original destination as the
/// source (a local source would be refused on ingress as a martian), the
/// original sender as the destination.
#[inline(always)]
fn frag_needed_frame(eth: &[u8; EthHdr::LEN], quote: &[u8; QUOTE_LEN], mtu: u32) -> [u8; REPLY_LEN] {
    let mut f = [0u8; REPLY_LEN];
    f[0..6].copy_from_slice(&eth[6..12]);
    f[6..12].copy_from_slice(&eth[0..6]);
    f[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
    let ip = EthHdr::LEN;
    f[ip] = 0x45;
    f[ip + 2..ip + 4].copy_from_slice(&((Ipv4Hdr::LEN + ICMP_LEN) as u16).to_be_bytes());
    f[ip + 8] = 64;
    f[ip + 9] = IPPROTO_ICMP;
    f[ip + 12..ip + 16].copy_from_slice(&quote[16..20]);
    f[ip + 16..ip + 20].copy_from_slice(&quote[12..16]);
    let ip_csum = csum::compute(&f, ip, Ipv4Hdr::LEN);
    f[ip + 10..ip + 12].copy_from_slice(&ip_csum.to_be_bytes());
    let icmp = ip + Ipv4Hdr::LEN;
    f[icmp] = ICMP_DEST_UNREACH;
    f[icmp + 1] = ICMP_FRAG_NEEDED;
    f[icmp + 6..icmp + 8].copy_from_slice(&(mtu as u16).to_be_bytes());
    f[icmp + 8..].copy_from_slice(quote);
    let icmp_csum = csum::compute(&f, icmp, ICMP_LEN);
    f[icmp + 2..icmp + 4].copy_from_slice(&icmp_csum.to_be_bytes());
    f
}

