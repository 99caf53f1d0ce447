//! Internet checksums (RFC 1071) and their incremental update (RFC 1624),
//! the one place the programs compute or patch one. Pure functions over
//! bytes, so the host tests them (`cargo test -p overlay-ebpf --lib`).

/// Folds a 32-bit one's-complement sum into 16 bits.
#[inline(always)]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// The checksum of `len` bytes of `bytes` from `start` (`len` even): what
/// goes in the checksum field when that field reads zero, and zero when
/// the bytes, field included, are intact.
#[inline(always)]
pub fn compute<const N: usize>(bytes: &[u8; N], start: usize, len: usize) -> u16 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < len {
        sum += u32::from(u16::from_be_bytes([bytes[start + i], bytes[start + i + 1]]));
        i += 2;
    }
    !fold(sum)
}

/// A checksum field after one 16-bit word it covers changed from `old` to
/// `new` (RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m')), as the kernel's
/// `l3_csum_replace` does.
#[inline(always)]
pub const fn replace16(check: [u8; 2], old: u16, new: u16) -> [u8; 2] {
    let sum = !u16::from_be_bytes(check) as u32 + !old as u32 + new as u32;
    (!fold(sum)).to_be_bytes()
}

/// Whether a 20-byte IPv4 header (no options) carries a correct checksum.
#[inline(always)]
pub fn ipv4_header_valid(header: &[u8; 20]) -> bool {
    compute(header, 0, 20) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 1071's example header, from Wikipedia's worked IPv4 checksum.
    const HEADER: [u8; 20] = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8,
        0x00, 0xc7,
    ];

    #[test]
    fn computes_and_verifies_an_ipv4_header() {
        assert!(ipv4_header_valid(&HEADER));
        let mut zeroed = HEADER;
        zeroed[10..12].fill(0);
        assert_eq!(compute(&zeroed, 0, 20), 0xb861);
        let mut corrupt = HEADER;
        corrupt[8] ^= 1;
        assert!(!ipv4_header_valid(&corrupt));
    }

    #[test]
    fn replace_matches_recomputing() {
        // TTL 64 -> 63, and the ECN field to CE, on every TTL and TOS.
        for ttl in 1..=255u8 {
            for tos in [0u8, 1, 2, 3, 0xb8, 0xbe] {
                let mut h = HEADER;
                h[1] = tos;
                h[8] = ttl;
                h[10..12].fill(0);
                let c = compute(&h, 0, 20);
                h[10..12].copy_from_slice(&c.to_be_bytes());
                let mut dec = h;
                dec[8] = ttl - 1;
                dec[10..12].copy_from_slice(&replace16(h[10..12].try_into().unwrap(), u16::from_be_bytes([ttl, h[9]]), u16::from_be_bytes([ttl - 1, h[9]])));
                assert!(ipv4_header_valid(&dec), "ttl {ttl} tos {tos}");
                let mut ce = h;
                ce[1] = tos | 3;
                ce[10..12].copy_from_slice(&replace16(h[10..12].try_into().unwrap(), u16::from_be_bytes([h[0], tos]), u16::from_be_bytes([h[0], tos | 3])));
                assert!(ipv4_header_valid(&ce), "ttl {ttl} tos {tos}");
            }
        }
    }

    #[test]
    fn fold_carries_twice() {
        assert_eq!(fold(0x0001_ffff), 0x0001);
        assert_eq!(fold(0xffff_ffff), 0xffff);
    }
}
