//! Protocol numbers and header constants the programs share, in one place.

/// Ethertype of IPv4.
pub const ETH_P_IP: u16 = 0x0800;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;
/// The SCTP chunk that opens an association (RFC 9260 §3.3.2).
pub const SCTP_CHUNK_INIT: u8 = 1;
/// The VXLAN "I" flag: the VNI field is valid (RFC 7348 §5).
pub const VXLAN_FLAG_I: u8 = 0x08;
/// IPv4 "more fragments" flag and fragment offset, in the flags-and-offset word.
pub const IP_MF_OFFSET: u16 = 0x3fff;
/// IPv4 fragment offset alone.
pub const IP_OFFSET: u16 = 0x1fff;
/// ICMP error types (RFC 792, RFC 1812): each quotes the header of the
/// packet it is about, and none may be answered by another (RFC 1122).
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_SOURCE_QUENCH: u8 = 4;
pub const ICMP_REDIRECT: u8 = 5;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAMETER_PROBLEM: u8 = 12;
/// Code of "fragmentation needed and DF set" under [`ICMP_DEST_UNREACH`].
pub const ICMP_FRAG_NEEDED: u8 = 4;

/// ICMP queries conntrack starts an entry with (its `valid_new`): echo,
/// timestamp, information and address mask requests. Their replies alone
/// are INVALID to it.
pub const ICMP_ECHO: u8 = 8;
pub const ICMP_TIMESTAMP: u8 = 13;
pub const ICMP_INFO_REQUEST: u8 = 15;
pub const ICMP_ADDRESS: u8 = 17;

/// Whether an ICMP message of `icmp_type` is a query conntrack starts an
/// entry with.
#[inline(always)]
pub const fn is_icmp_query(icmp_type: u8) -> bool {
    matches!(icmp_type, ICMP_ECHO | ICMP_TIMESTAMP | ICMP_INFO_REQUEST | ICMP_ADDRESS)
}

/// Whether an ICMP message of `icmp_type` is an error.
#[inline(always)]
pub const fn is_icmp_error(icmp_type: u8) -> bool {
    matches!(icmp_type, ICMP_DEST_UNREACH | ICMP_SOURCE_QUENCH | ICMP_REDIRECT | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM)
}
