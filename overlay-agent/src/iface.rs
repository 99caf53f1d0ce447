//! Facts about the underlay interface, read in the agent's network namespace.

use std::{ffi::CString, io};

use netlink_packet_route::link::{LinkAttribute, LinkMessage, LinkXdp, XdpAttached};

use crate::rtnl::Rtnl;

/// The interface's index in the current network namespace.
pub fn interface_index(iface: &str) -> Option<u32> {
    let name = CString::new(iface).ok()?;
    // SAFETY: valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// The interface's MTU (`SIOCGIFMTU`).
pub fn mtu(iface: &str) -> io::Result<u32> {
    // SAFETY: SIOCGIFMTU fills the `ifru_mtu` member.
    ifreq(iface, libc::SIOCGIFMTU).map(|req| unsafe { req.ifr_ifru.ifru_mtu } as u32)
}

/// Whether the interface is administratively up (`SIOCGIFFLAGS`); false
/// when there is none.
pub fn is_up(iface: &str) -> bool {
    // SAFETY: SIOCGIFFLAGS fills the `ifru_flags` member.
    ifreq(iface, libc::SIOCGIFFLAGS).is_ok_and(|req| unsafe { req.ifr_ifru.ifru_flags } & libc::IFF_UP as libc::c_short != 0)
}

/// The interface's MAC address (`SIOCGIFHWADDR`). Asked of the kernel, not
/// of sysfs, which shows the namespace it was mounted in.
pub fn mac_address(iface: &str) -> io::Result<[u8; 6]> {
    let req = ifreq(iface, libc::SIOCGIFHWADDR)?;
    // SAFETY: SIOCGIFHWADDR fills the `ifru_hwaddr` member.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    Ok(std::array::from_fn(|i| data[i] as u8))
}

/// One `ifreq` ioctl on `iface` in this network namespace.
fn ifreq(iface: &str, request: libc::c_ulong) -> io::Result<libc::ifreq> {
    ifreq_with(iface, request, |_| {})
}

/// One `ifreq` ioctl on `iface`, with the request's union filled in by
/// `fill` (for requests that point the kernel at a buffer of ours).
fn ifreq_with(iface: &str, request: libc::c_ulong, fill: impl FnOnce(&mut libc::ifreq)) -> io::Result<libc::ifreq> {
    let name = CString::new(iface).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let bytes = name.as_bytes_with_nul();
    if bytes.len() > libc::IFNAMSIZ {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "interface name too long"));
    }
    // SAFETY: plain socket/ioctl with a zeroed, correctly sized ifreq.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
            *dst = *src as libc::c_char;
        }
        fill(&mut req);
        let rc = libc::ioctl(fd, request, &mut req);
        let err = io::Error::last_os_error();
        libc::close(fd);
        if rc < 0 {
            return Err(err);
        }
        Ok(req)
    }
}

/// The interface of the IPv4 default route in this network namespace
/// (`/proc/net/route` is per namespace).
pub fn default_route_interface() -> Option<String> {
    let table = std::fs::read_to_string("/proc/net/route").ok()?;
    table.lines().skip(1).find_map(|line| {
        let mut cols = line.split_whitespace();
        let iface = cols.next()?;
        let destination = cols.next()?;
        let _gateway = cols.next()?;
        let _flags = cols.next()?;
        let _refcnt = cols.next()?;
        let _use = cols.next()?;
        let _metric = cols.next()?;
        let mask = cols.next()?;
        (destination == "00000000" && mask == "00000000").then(|| iface.to_owned())
    })
}

/// The interface's driver, as `ethtool -i` names it (`veth`, `virtio_net`,
/// `mlx5_core`, …), asked of the kernel with `ETHTOOL_GDRVINFO`.
pub fn driver(iface: &str) -> io::Result<String> {
    /// `struct ethtool_drvinfo` (include/uapi/linux/ethtool.h).
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        version: [u8; 32],
        fw_version: [u8; 32],
        bus_info: [u8; 32],
        erom_version: [u8; 32],
        reserved2: [u8; 12],
        n_priv_flags: u32,
        n_stats: u32,
        testinfo_len: u32,
        eedump_len: u32,
        regdump_len: u32,
    }
    const ETHTOOL_GDRVINFO: u32 = 0x0000_0003;
    // SAFETY: all-zero is a valid DrvInfo (integers and byte arrays).
    let mut info: DrvInfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    ifreq_with(iface, SIOCETHTOOL, |req| {
        req.ifr_ifru.ifru_data = (&raw mut info).cast();
    })?;
    let name = info.driver.split(|&b| b == 0).next().unwrap_or_default();
    Ok(String::from_utf8_lossy(name).into_owned())
}

/// `SIOCETHTOOL` and the `ethtool` commands the feature functions use
/// (include/uapi/linux/ethtool.h; all there since Linux 3.x).
const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GSTRINGS: u32 = 0x0000_001b;
const ETHTOOL_GSSET_INFO: u32 = 0x0000_0037;
const ETHTOOL_GFEATURES: u32 = 0x0000_003a;
const ETHTOOL_SFEATURES: u32 = 0x0000_003b;
/// The string set naming the features (`enum ethtool_stringset`).
const ETH_SS_FEATURES: u32 = 4;
const ETH_GSTRING_LEN: usize = 32;

/// The names of the kernel's feature bits, in bit order (what `ethtool
/// -k` prints): bit numbers differ between kernel versions, names do not.
fn feature_names(iface: &str) -> io::Result<Vec<String>> {
    /// `struct ethtool_sset_info` with room for one set's count.
    #[repr(C)]
    struct SsetInfo {
        cmd: u32,
        reserved: u32,
        sset_mask: u64,
        data: [u32; 1],
    }
    let mut info = SsetInfo { cmd: ETHTOOL_GSSET_INFO, reserved: 0, sset_mask: 1 << ETH_SS_FEATURES, data: [0] };
    ifreq_with(iface, SIOCETHTOOL, |req| req.ifr_ifru.ifru_data = (&raw mut info).cast())?;
    if info.sset_mask & (1 << ETH_SS_FEATURES) == 0 {
        return Err(io::Error::new(io::ErrorKind::Unsupported, "the kernel names no features (ETH_SS_FEATURES)"));
    }
    let count = info.data[0] as usize;
    // `struct ethtool_gstrings`: cmd, string_set, len, then the names; u32
    // words keep the header aligned.
    let mut buf = vec![0u32; 3 + count * ETH_GSTRING_LEN / 4];
    buf[..3].copy_from_slice(&[ETHTOOL_GSTRINGS, ETH_SS_FEATURES, count as u32]);
    ifreq_with(iface, SIOCETHTOOL, |req| req.ifr_ifru.ifru_data = buf.as_mut_ptr().cast())?;
    let bytes: Vec<u8> = buf[3..].iter().flat_map(|word| word.to_ne_bytes()).collect();
    Ok(bytes
        .chunks(ETH_GSTRING_LEN)
        .map(|name| String::from_utf8_lossy(name.split(|&b| b == 0).next().unwrap_or_default()).into_owned())
        .collect())
}

/// Turns the named features of `iface` on or off (`ethtool -K`, by the
/// names `ethtool -k` prints), then reads them back: an error names a
/// feature the kernel does not know or would not change.
pub fn set_features(iface: &str, wanted: &[(&str, bool)]) -> io::Result<()> {
    let names = feature_names(iface)?;
    let blocks = names.len().div_ceil(32);
    let bit = |name: &str| -> io::Result<(usize, u32)> {
        let index = names.iter().position(|n| n == name).ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("the kernel has no feature {name} on {iface}"))
        })?;
        Ok((index / 32, 1 << (index % 32)))
    };
    // `struct ethtool_sfeatures`: cmd, size, then {valid, requested} per
    // block of 32 features.
    let mut set = vec![0u32; 2 + 2 * blocks];
    set[..2].copy_from_slice(&[ETHTOOL_SFEATURES, blocks as u32]);
    for &(name, on) in wanted {
        let (block, mask) = bit(name)?;
        set[2 + 2 * block] |= mask;
        if on {
            set[3 + 2 * block] |= mask;
        }
    }
    ifreq_with(iface, SIOCETHTOOL, |req| req.ifr_ifru.ifru_data = set.as_mut_ptr().cast())?;
    match first_feature_not_as_wanted(iface, &names, wanted)? {
        Some((name, on)) => Err(io::Error::other(format!("{iface} keeps {name} {}", if on { "on" } else { "off" }))),
        None => Ok(()),
    }
}

/// The first of the named features of `iface` that is not as `wanted`,
/// with its state (`ethtool -k`); `None` when all are.
pub fn feature_not_as_wanted<'a>(iface: &str, wanted: &[(&'a str, bool)]) -> io::Result<Option<(&'a str, bool)>> {
    first_feature_not_as_wanted(iface, &feature_names(iface)?, wanted)
}

/// [`feature_not_as_wanted`], with the kernel's feature `names` read.
fn first_feature_not_as_wanted<'a>(iface: &str, names: &[String], wanted: &[(&'a str, bool)]) -> io::Result<Option<(&'a str, bool)>> {
    let blocks = names.len().div_ceil(32);
    // `struct ethtool_gfeatures`: cmd, size, then {available, requested,
    // active, never_changed} per block.
    let mut get = vec![0u32; 2 + 4 * blocks];
    get[..2].copy_from_slice(&[ETHTOOL_GFEATURES, blocks as u32]);
    ifreq_with(iface, SIOCETHTOOL, |req| req.ifr_ifru.ifru_data = get.as_mut_ptr().cast())?;
    for &(name, on) in wanted {
        let index = names.iter().position(|n| n == name).ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("the kernel has no feature {name} on {iface}"))
        })?;
        let active = get[2 + 4 * (index / 32) + 2] & (1 << (index % 32)) != 0;
        if active != on {
            return Ok(Some((name, active)));
        }
    }
    Ok(None)
}

/// The interface's IPv4 addresses (`getifaddrs`).
pub fn ipv4_addresses(iface: &str) -> io::Result<Vec<std::net::Ipv4Addr>> {
    ipv4_addresses_of(|name| name == iface.as_bytes())
}

/// This node's IPv4 addresses, on every interface.
pub fn local_ipv4_addresses() -> io::Result<Vec<std::net::Ipv4Addr>> {
    ipv4_addresses_of(|_| true)
}


/// The IPv4 addresses of the interfaces whose name `wanted` accepts.
fn ipv4_addresses_of(wanted: impl Fn(&[u8]) -> bool) -> io::Result<Vec<std::net::Ipv4Addr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list freed by freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut addresses = Vec::new();
    let mut cursor = head;
    while !cursor.is_null() {
        // SAFETY: a node of the list getifaddrs returned, alive until freed.
        let entry = unsafe { &*cursor };
        // SAFETY: ifa_name is a NUL-terminated string.
        let name = unsafe { std::ffi::CStr::from_ptr(entry.ifa_name) };
        if wanted(name.to_bytes()) && !entry.ifa_addr.is_null() {
            // SAFETY: a non-null address; its family says how to read it.
            if i32::from(unsafe { (*entry.ifa_addr).sa_family }) == libc::AF_INET {
                // SAFETY: AF_INET addresses are sockaddr_in.
                let sin = unsafe { &*entry.ifa_addr.cast::<libc::sockaddr_in>() };
                addresses.push(std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            }
        }
        cursor = entry.ifa_next;
    }
    // SAFETY: the list getifaddrs returned, freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(addresses)
}

/// Whether an XDP program is attached to the interface (what `ip link`
/// shows as `xdp`), asked of the kernel over rtnetlink.
pub fn has_xdp_program(iface: &str) -> io::Result<bool> {
    Ok(xdp_attached(&link_named(iface)?))
}

/// The id of the XDP program attached to `iface`, if any (`IFLA_XDP_PROG_ID`).
pub fn xdp_program_id(iface: &str) -> io::Result<Option<u32>> {
    Ok(link_named(iface)?.attributes.iter().find_map(|a| match a {
        LinkAttribute::Xdp(xdp) => xdp.iter().find_map(|x| match x {
            LinkXdp::ProgId(id) if *id != 0 => Some(*id),
            _ => None,
        }),
        _ => None,
    }))
}

/// The kernel's description of the interface `iface`, over rtnetlink.
fn link_named(iface: &str) -> io::Result<LinkMessage> {
    let links = Rtnl::open().and_then(|mut rtnl| rtnl.links()).map_err(io::Error::other)?;
    links
        .into_iter()
        .find(|link| link.attributes.iter().any(|a| matches!(a, LinkAttribute::IfName(name) if name == iface)))
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no interface {iface} in this network namespace")))
}

/// Whether a link's `IFLA_XDP` says a program is attached in any mode.
fn xdp_attached(link: &LinkMessage) -> bool {
    link.attributes.iter().any(|a| match a {
        LinkAttribute::Xdp(xdp) => xdp.iter().any(|x| matches!(x, LinkXdp::Attached(mode) if *mode != XdpAttached::None)),
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xdp_is_attached_in_any_mode_but_none() {
        let link = |xdp: Vec<LinkXdp>| {
            let mut link = LinkMessage::default();
            link.attributes.push(LinkAttribute::Xdp(xdp));
            link
        };
        assert!(!xdp_attached(&LinkMessage::default()));
        assert!(!xdp_attached(&link(vec![LinkXdp::Attached(XdpAttached::None)])));
        for mode in [XdpAttached::Driver, XdpAttached::SocketBuffer, XdpAttached::Hardware, XdpAttached::Multiple] {
            assert!(xdp_attached(&link(vec![LinkXdp::Attached(mode), LinkXdp::ProgId(7)])), "{mode:?}");
        }
    }

    #[test]
    fn loopback_has_no_xdp_program_and_a_missing_interface_is_an_error() {
        // Read-only, in whatever namespace the test runs.
        assert!(!has_xdp_program("lo").unwrap());
        assert_eq!(has_xdp_program("no-such-if0").unwrap_err().kind(), io::ErrorKind::NotFound);
    }
}
