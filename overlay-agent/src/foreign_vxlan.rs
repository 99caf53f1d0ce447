//! Kernel vxlan devices on our UDP port, such as the `flannel.1` a
//! migration from flannel leaves behind.
//!
//! Such a device listens on `0.0.0.0:<port>`: our programs decapsulate
//! (or drop) tunnel traffic to the node's address on the underlay, but
//! tunnel traffic to any other local address, or arriving on another
//! interface, still reaches the device's socket and is decapsulated
//! without any of our checks. So the agent refuses to start beside one,
//! and removes it only when told to (`--remove-flannel-device`), and only
//! flannel's own (`flannel.<VNI>`).

use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage},
};

use crate::rtnl::{Answer, Refused, Rtnl, RtnlError};

#[derive(Debug, thiserror::Error)]
pub enum ForeignVxlanError {
    #[error("listing links")]
    List(#[source] RtnlError),
    #[error("deleting {name}")]
    Delete {
        name: String,
        #[source]
        source: RtnlError,
    },
    #[error("the kernel refused to delete {name}: {refused}")]
    Refused { name: String, refused: Refused },
}

/// A kernel vxlan device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanDevice {
    pub name: String,
    pub index: u32,
    pub vni: Option<u32>,
    pub port: u16,
}

impl VxlanDevice {
    /// Whether flannel's vxlan backend made it (`flannel.<VNI>`).
    pub fn is_flannels(&self) -> bool {
        self.name.strip_prefix("flannel.").is_some_and(|vni| vni.parse::<u32>().is_ok())
    }
}

/// The kernel vxlan devices in this network namespace that receive on UDP
/// `port`.
pub fn on_port(port: u16) -> Result<Vec<VxlanDevice>, ForeignVxlanError> {
    let links = Rtnl::open().and_then(|mut rtnl| rtnl.links()).map_err(ForeignVxlanError::List)?;
    Ok(links.iter().filter_map(vxlan_device).filter(|d| d.port == port).collect())
}

fn vxlan_device(link: &LinkMessage) -> Option<VxlanDevice> {
    let mut name = None;
    let mut is_vxlan = false;
    let (mut vni, mut port) = (None, None);
    for attribute in &link.attributes {
        match attribute {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(InfoKind::Vxlan) => is_vxlan = true,
                        LinkInfo::Data(InfoData::Vxlan(data)) => {
                            for d in data {
                                match d {
                                    InfoVxlan::Id(id) => vni = Some(*id),
                                    InfoVxlan::Port(p) => port = Some(*p),
                                    _ => {}
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    // A device created without a port listens on the kernel's default,
    // flannel's 8472.
    is_vxlan.then(|| VxlanDevice { name: name.unwrap_or_default(), index: link.header.index, vni, port: port.unwrap_or(8472) })
}

/// Deletes `device` (as `ip link del`).
pub fn remove(device: &VxlanDevice) -> Result<(), ForeignVxlanError> {
    let mut message = LinkMessage::default();
    message.header.index = device.index;
    let answer = Rtnl::open()
        .and_then(|mut rtnl| rtnl.change(RouteNetlinkMessage::DelLink(message), 0))
        .map_err(|source| ForeignVxlanError::Delete { name: device.name.clone(), source })?;
    match answer {
        Answer::Refused(refused) if refused.errno != libc::ENODEV => {
            Err(ForeignVxlanError::Refused { name: device.name.clone(), refused })
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_flannel_vni_devices_are_flannels() {
        let device = |name: &str| VxlanDevice { name: name.to_owned(), index: 1, vni: Some(1), port: 8472 };
        assert!(device("flannel.1").is_flannels());
        assert!(device("flannel.4096").is_flannels());
        assert!(!device("flannel.x").is_flannels());
        assert!(!device("vxlan0").is_flannels());
        assert!(!device("cilium_vxlan").is_flannels());
    }
}
