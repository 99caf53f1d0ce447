//! ICMP "fragmentation needed" (type 3, code 4) for DF packets that will
//! not fit the underlay once encapsulated (RFC 1191), so path-MTU discovery
//! works through the overlay instead of black-holing.
//!
//! The kernel route's MTU (underlay − 50) already makes the kernel answer
//! for forwarded traffic; this covers packets that reach the underlay's
//! egress anyway (a route without that MTU, raw sockets, PMTU probing).
//! The too-big packet is rewritten in place into the reply and sent back
//! in through the underlay's ingress (marked for the kernel's path,
//! [`KERNEL_PATH_MARK`], behind TC decapsulation), where the stack routes
//! it to the sender like any ICMP arriving from the network.

use aya_ebpf::{
    bindings::BPF_F_INGRESS,
    helpers::generated::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};
use overlay_common::{Config, Counter, DECAP_HOOK_XDP, KERNEL_PATH_MARK};

use crate::{
    DropReason,
    counters::count,
    csum,
    proto::{ETH_P_IP, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, IP_OFFSET, IPPROTO_ICMP, is_icmp_error},
};

/// Longest quote: an IPv4 header with 40 bytes of options, and the first 8
/// bytes of its payload (RFC 792).
const MAX_QUOTE_LEN: usize = 60 + 8;
const MAX_ICMP_LEN: usize = 8 + MAX_QUOTE_LEN;
const MAX_REPLY_LEN: usize = EthHdr::LEN + Ipv4Hdr::LEN + MAX_ICMP_LEN;

/// Whether the IPv4 header has DF set.
#[inline(always)]
pub fn dont_fragment(ip: &Ipv4Hdr) -> bool {
    ip.frags[0] & 0x40 != 0
}

/// Turns the too-big packet into a frag-needed reply carrying `mtu` and
/// redirects it into the underlay's ingress. The reply quotes the whole
/// IPv4 header, options included, and 8 bytes of payload. Never answers an
/// ICMP error or a fragment past the first (RFC 1122 §3.2.2): those are
/// dropped as [`DropReason::TooBig`], as is a header too short to be one.
#[inline(always)]
pub fn reply_frag_needed(ctx: &TcContext, cfg: &Config) -> Result<i32, DropReason> {
    let mtu = cfg.inner_mtu;
    let eth: [u8; EthHdr::LEN] = ctx.load(0).map_err(|_| DropReason::Truncated)?;
    // The packet is longer than the tunnel MTU, so the longest quote is there.
    let mut quote: [u8; MAX_QUOTE_LEN] = ctx.load(EthHdr::LEN).map_err(|_| DropReason::Truncated)?;
    let header_len = usize::from(quote[0] & 0x0f) * 4;
    if header_len < Ipv4Hdr::LEN {
        return Err(DropReason::TooBig);
    }
    let quote_len = header_len + 8;
    let Some(&l4_first) = quote.get(header_len) else {
        return Err(DropReason::TooBig);
    };
    if (quote[9] == IPPROTO_ICMP && is_icmp_error(l4_first)) || u16::from_be_bytes([quote[6], quote[7]]) & IP_OFFSET != 0 {
        return Err(DropReason::TooBig);
    }
    // Past the quote: zeros, which leave the checksum as it is and are
    // trimmed off below.
    let mut i = 0;
    while i < MAX_QUOTE_LEN {
        if i >= quote_len {
            quote[i] = 0;
        }
        i += 1;
    }
    let reply = frag_needed_frame(&eth, &quote, quote_len, mtu);
    let too_big_len = u64::from(ctx.len());
    // SAFETY: the helpers take the raw __sk_buff this context wraps.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, MAX_REPLY_LEN as u32, 0) } != 0 {
        return Err(DropReason::HelperError);
    }
    ctx.store(0, &reply, 0).map_err(|_| DropReason::HelperError)?;
    let reply_len = (EthHdr::LEN + Ipv4Hdr::LEN + 8 + quote_len) as u32;
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, reply_len, 0) } != 0 {
        return Err(DropReason::HelperError);
    }
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // Behind TC decapsulation, marked so that the ingress program passes it
    // to the kernel's path unjudged: the reply comes from the too-big
    // packet's destination, which for a sender in our pod CIDR (the pod
    // bridge's address) is a remote pod, and a remote pod unencapsulated
    // on the underlay is taken for a forged one. Behind XDP nothing would
    // judge it (native XDP never sees a packet sent in so; the TC program
    // behind XDP judges no sources) and, with `--forward kernel`, no TC
    // program is there to clear a mark.
    if cfg.xdp_decap != DECAP_HOOK_XDP {
        ctx.set_mark(KERNEL_PATH_MARK);
    }
    count(Counter::IcmpFragNeeded, too_big_len);
    Ok(unsafe { bpf_redirect(ifindex, u64::from(BPF_F_INGRESS)) } as i32)
}

/// The whole reply frame (zero-padded past `quote_len` bytes of quote):
/// MACs swapped, the original destination as the source (a local source
/// would be refused on ingress as a martian), the original sender as the
/// destination.
#[inline(always)]
fn frag_needed_frame(eth: &[u8; EthHdr::LEN], quote: &[u8; MAX_QUOTE_LEN], quote_len: usize, mtu: u32) -> [u8; MAX_REPLY_LEN] {
    let mut f = [0u8; MAX_REPLY_LEN];
    f[0..6].copy_from_slice(&eth[6..12]);
    f[6..12].copy_from_slice(&eth[0..6]);
    f[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
    let ip = EthHdr::LEN;
    f[ip] = 0x45;
    f[ip + 2..ip + 4].copy_from_slice(&((Ipv4Hdr::LEN + 8 + quote_len) as u16).to_be_bytes());
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
    let icmp_csum = csum::compute(&f, icmp, MAX_ICMP_LEN);
    f[icmp + 2..icmp + 4].copy_from_slice(&icmp_csum.to_be_bytes());
    f
}
