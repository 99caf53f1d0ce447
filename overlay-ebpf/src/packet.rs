//! The one place the programs touch packet memory: a bounds-checked pointer
//! into the linear packet data, for both TC and XDP contexts.

use aya_ebpf::programs::{TcContext, XdpContext};

use crate::DropReason;

/// A program context with direct packet access.
pub trait Packet {
    /// Start of the linear packet data.
    fn start(&self) -> usize;
    /// One past the end of the linear packet data.
    fn end(&self) -> usize;
    /// The whole packet's length, linear data or not.
    fn len(&self) -> usize;
    /// A GSO super-packet's segment size (0 for a single packet): the
    /// payload each segment carries past the headers GSO repeats.
    fn gso_size(&self) -> u32;
    /// Whether this is a GSO super-packet, whose IPv4 and UDP lengths are
    /// rewritten per segment (and truncated to 16 bits above 64 KiB).
    #[inline(always)]
    fn is_gso(&self) -> bool {
        self.gso_size() != 0
    }
    /// Makes the first `len` bytes linear where they are not (an skb may
    /// hold them in fragments), so [`ptr_at`] can reach them; packet
    /// pointers taken before must be taken again. Only as far as the
    /// headers a program reads: pulling payload into the head costs a copy
    /// and often a new head.
    fn make_linear(&self, len: usize);
}

impl Packet for TcContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
    #[inline(always)]
    fn len(&self) -> usize {
        TcContext::len(self) as usize
    }
    #[inline(always)]
    fn gso_size(&self) -> u32 {
        // SAFETY: reading a field of the context's own sk_buff.
        unsafe { (*self.skb.skb).gso_size }
    }
    #[inline(always)]
    fn make_linear(&self, len: usize) {
        if self.data() + len > self.data_end() && TcContext::len(self) as usize >= len {
            // Failure leaves the skb as it was; ptr_at then reports it short.
            let _ = self.pull_data(len as u32);
        }
    }
}

impl Packet for XdpContext {
    #[inline(always)]
    fn start(&self) -> usize {
        self.data()
    }
    #[inline(always)]
    fn end(&self) -> usize {
        self.data_end()
    }
    #[inline(always)]
    fn len(&self) -> usize {
        self.data_end() - self.data()
    }
    /// Native XDP sees frames before GRO; generic XDP, after it, has no
    /// GSO size to read.
    #[inline(always)]
    fn gso_size(&self) -> u32 {
        0
    }
    /// An XDP frame's first buffer is linear.
    #[inline(always)]
    fn make_linear(&self, _len: usize) {}
}

/// A pointer to a `T` at `offset`, or [`DropReason::Truncated`] when the packet is
/// too short. The check is written the way the verifier can follow it: the
/// pointer arithmetic and the comparison with `end` use the same registers.
#[inline(always)]
pub fn ptr_at<T>(ctx: &impl Packet, offset: usize) -> Result<*mut T, DropReason> {
    let start = ctx.start();
    let end = ctx.end();
    if start + offset + size_of::<T>() > end {
        return Err(DropReason::Truncated);
    }
    Ok((start + offset) as *mut T)
}
