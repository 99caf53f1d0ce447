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
//! The pair carries no address and never routes: the kernel sends it
//! nothing (IPv6 address generation is off), and `ovl-seg1` hands every
//! frame on or drops it at TC ingress, ahead of the IP layer. Its alias
//! marks it as the agent's: the agent reuses a pair it made (a restart
//! loses nothing), removes it with `cleanup`, and never touches a device
//! of that name it did not make. Everything is asked of the kernel over
//! rtnetlink and the ethtool ioctl, without starting a process.

use std::io;

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{
        AfSpecInet6, AfSpecUnspec, In6AddrGenMode, InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo,
        LinkMessage,
    },
};
use tracing::{info, warn};

use crate::{
    datapath::{Datapath, DatapathError, LinkOutcome},
    desired::Backend,
    iface,
    report::WithCauses as _,
    rtnl::{Answer, Refused, Rtnl, RtnlError},
};

/// The sending end: the datapath redirects pod tunnels' GSO packets to
/// its egress.
pub const SEND_END: &str = "ovl-seg0";
/// The receiving end: `overlay_tc_segmented` at its TC ingress.
pub const RECEIVE_END: &str = "ovl-seg1";
/// Both ends, in the order packets cross them.
pub const DEVICE_NAMES: [&str; 2] = [SEND_END, RECEIVE_END];
/// The alias marking both ends as the agent's (`ip link` shows it).
pub const ALIAS: &str = "overlay-agent: segments pod tunnels' GSO packets";
/// The MTU of both ends: what a veth allows, so no segment is too long
/// for them (its size is the pod tunnel's).
const MTU: u32 = 65535;
/// The sending end's features that would let a pod tunnel's GSO packet
/// through unsegmented (`NETIF_F_GSO_ENCAP_ALL`, as `ethtool -k` names
/// them; every one exists since Linux 4.7).
const TUNNEL_SEGMENTATION: [&str; 6] = [
    "tx-udp_tnl-segmentation",
    "tx-udp_tnl-csum-segmentation",
    "tx-gre-segmentation",
    "tx-gre-csum-segmentation",
    "tx-ipxip4-segmentation",
    "tx-ipxip6-segmentation",
];

#[derive(Debug, thiserror::Error)]
pub enum SegDeviceError {
    #[error("{name} exists but is not the agent's (its alias is not {ALIAS:?}); rename or delete it to let the agent create its segmentation device")]
    NotOurs { name: &'static str },
    #[error("asking the kernel about {what}")]
    Netlink {
        what: String,
        #[source]
        source: RtnlError,
    },
    #[error("the kernel refused to {what}")]
    Refused {
        what: String,
        #[source]
        source: Refused,
    },
    #[error("setting {features} on {name}")]
    Features {
        name: &'static str,
        features: String,
        #[source]
        source: io::Error,
    },
    #[error("{0} vanished while the agent set it up")]
    Vanished(&'static str),
    #[error("attaching the encapsulation of segments to {RECEIVE_END}")]
    Attach(#[source] DatapathError),
}

/// Sets up the segmentation device where encapsulation needs it (the VXLAN
/// backend), or removes the agent's own where it does not, and says in the
/// log which. Returns the value of `Config::seg_ifindex`: the sending
/// end's index, or 0 (a pod tunnel's GSO packets are then dropped as
/// `helper_error`, as before the device existed).
pub fn settle(datapath: &mut Datapath, backend: Backend) -> u32 {
    if backend != Backend::Vxlan {
        match remove(Some(datapath)) {
            Ok(true) => info!(device = SEND_END, "removed the segmentation device, which this backend does not use"),
            Ok(false) => {}
            Err(err) => warn!(error = %err.to_string_with_causes(), "cannot remove the segmentation device"),
        }
        return 0;
    }
    match set_up(datapath) {
        Ok((send_ifindex, outcome)) => {
            info!(devices = %DEVICE_NAMES.join(" -> "), send_ifindex, ?outcome, "segmentation device: pod tunnels' GSO packets are segmented there, then encapsulated");
            send_ifindex
        }
        Err(err) => {
            warn!(error = %err.to_string_with_causes(), "cannot set up the segmentation device; GSO packets of pods' own tunnels will be dropped (helper_error)");
            0
        }
    }
}

/// Creates the pair (or reuses the agent's own), sets its features, and
/// attaches `overlay_tc_segmented`; returns the sending end's index. On
/// failure nothing the call created is left behind.
pub fn set_up(datapath: &mut Datapath) -> Result<(u32, LinkOutcome), SegDeviceError> {
    let mut rtnl = open()?;
    let existed = match ours(&mut rtnl)? {
        Some(true) => true,
        Some(false) => {
            // A pin left from a pair of ours that someone replaced serves
            // nothing.
            let _ = datapath.detach_seg_encap(RECEIVE_END);
            return Err(SegDeviceError::NotOurs { name: SEND_END });
        }
        None => {
            create(&mut rtnl)?;
            false
        }
    };
    let configured = configure(&mut rtnl).and_then(|send_ifindex| {
        let outcome = datapath.attach_seg_encap(RECEIVE_END).map_err(SegDeviceError::Attach)?;
        Ok((send_ifindex, outcome))
    });
    if configured.is_err() && !existed {
        let _ = datapath.detach_seg_encap(RECEIVE_END);
        let _ = delete(&mut rtnl);
    }
    configured
}

/// Removes the segmentation device and its program's pins when the agent
/// made it. Returns whether there was one of ours to remove; a device of
/// that name the agent did not make is left, with an error saying so.
pub fn remove(datapath: Option<&mut Datapath>) -> Result<bool, SegDeviceError> {
    if let Some(datapath) = datapath {
        datapath.detach_seg_encap(RECEIVE_END).map_err(SegDeviceError::Attach)?;
    }
    let mut rtnl = open()?;
    match ours(&mut rtnl)? {
        Some(true) => delete(&mut rtnl).map(|()| true),
        Some(false) => Err(SegDeviceError::NotOurs { name: SEND_END }),
        None => Ok(false),
    }
}

fn open() -> Result<Rtnl, SegDeviceError> {
    Rtnl::open().map_err(|source| SegDeviceError::Netlink { what: "links".to_owned(), source })
}

/// Whether the sending end exists (`None`: no) and both ends carry our
/// alias (a pair of ours is made with the alias on both).
fn ours(rtnl: &mut Rtnl) -> Result<Option<bool>, SegDeviceError> {
    let links = rtnl.links().map_err(|source| SegDeviceError::Netlink { what: "links".to_owned(), source })?;
    let alias_of = |name: &str| -> Option<Option<String>> {
        let link = links.iter().find(|l| l.attributes.iter().any(|a| matches!(a, LinkAttribute::IfName(n) if n == name)))?;
        Some(link.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfAlias(alias) => Some(alias.clone()),
            _ => None,
        }))
    };
    let Some(send) = alias_of(SEND_END) else { return Ok(None) };
    let receive = alias_of(RECEIVE_END).flatten();
    Ok(Some(send.as_deref() == Some(ALIAS) && receive.as_deref() == Some(ALIAS)))
}

/// Sends one change and turns a refusal into an error saying `what`.
fn change(rtnl: &mut Rtnl, message: RouteNetlinkMessage, flags: u16, what: &str) -> Result<(), SegDeviceError> {
    match rtnl.change(message, flags) {
        Ok(Answer::Refused(source)) => Err(SegDeviceError::Refused { what: what.to_owned(), source }),
        Ok(_) => Ok(()),
        Err(source) => Err(SegDeviceError::Netlink { what: what.to_owned(), source }),
    }
}

/// Creates the pair and marks both ends ours (`RTM_NEWLINK` takes no
/// alias), or leaves nothing.
fn create(rtnl: &mut Rtnl) -> Result<(), SegDeviceError> {
    let mut peer = LinkMessage::default();
    peer.attributes = vec![LinkAttribute::IfName(RECEIVE_END.to_owned()), LinkAttribute::Mtu(MTU)];
    let mut pair = LinkMessage::default();
    pair.attributes = vec![
        LinkAttribute::IfName(SEND_END.to_owned()),
        LinkAttribute::Mtu(MTU),
        LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Veth), LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer)))]),
    ];
    change(rtnl, RouteNetlinkMessage::NewLink(pair), NLM_F_CREATE | NLM_F_EXCL, &format!("create the veth pair {SEND_END}, {RECEIVE_END}"))?;
    let marked = DEVICE_NAMES.iter().try_for_each(|&name| {
        let index = iface::interface_index(name).ok_or(SegDeviceError::Vanished(name))?;
        change(rtnl, set_link(index, vec![LinkAttribute::IfAlias(ALIAS.to_owned())]), 0, &format!("set the alias of {name}"))?;
        // No IPv6 link-local address, so the kernel sends nothing through
        // the pair (best effort: a kernel without IPv6 refuses the mode).
        let no_addrgen = LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(vec![AfSpecInet6::AddrGenMode(In6AddrGenMode::None)])]);
        let _ = change(rtnl, set_link(index, vec![no_addrgen]), 0, "turn IPv6 address generation off");
        Ok(())
    });
    if marked.is_err() {
        let _ = delete(rtnl);
    }
    marked
}

/// Features and state; returns the sending end's index.
fn configure(rtnl: &mut Rtnl) -> Result<u32, SegDeviceError> {
    let off: Vec<(&str, bool)> = TUNNEL_SEGMENTATION.iter().map(|&f| (f, false)).collect();
    iface::set_features(SEND_END, &off).map_err(|source| SegDeviceError::Features {
        name: SEND_END,
        features: TUNNEL_SEGMENTATION.join(" off, ") + " off",
        source,
    })?;
    // GRO would merge the segments again (veth has a NAPI once it is on).
    iface::set_features(RECEIVE_END, &[("rx-gro", false)])
        .map_err(|source| SegDeviceError::Features { name: RECEIVE_END, features: "rx-gro off".to_owned(), source })?;
    // The receiving end first: veth drops what it sends while its peer is
    // down.
    for name in [RECEIVE_END, SEND_END] {
        let index = iface::interface_index(name).ok_or(SegDeviceError::Vanished(name))?;
        let mut up = set_link(index, Vec::new());
        if let RouteNetlinkMessage::SetLink(link) = &mut up {
            link.header.flags = LinkFlags::Up;
            link.header.change_mask = LinkFlags::Up;
        }
        change(rtnl, up, 0, &format!("set {name} up"))?;
    }
    iface::interface_index(SEND_END).ok_or(SegDeviceError::Vanished(SEND_END))
}

/// `RTM_SETLINK` of the link with index `index`, with `attributes`.
fn set_link(index: u32, attributes: Vec<LinkAttribute>) -> RouteNetlinkMessage {
    let mut link = LinkMessage::default();
    link.header.index = index;
    link.attributes = attributes;
    RouteNetlinkMessage::SetLink(link)
}

/// Deletes the pair (deleting one end deletes both).
fn delete(rtnl: &mut Rtnl) -> Result<(), SegDeviceError> {
    let index = iface::interface_index(SEND_END).ok_or(SegDeviceError::Vanished(SEND_END))?;
    let mut link = LinkMessage::default();
    link.header.index = index;
    change(rtnl, RouteNetlinkMessage::DelLink(link), 0, &format!("delete {SEND_END}"))
}
