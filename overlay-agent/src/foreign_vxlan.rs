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
//!
//! One that appears while the agent runs is dealt with the same way
//! ([`AppearedDevices`]): flanneld (v0.28 at least) watches its device and
//! makes it again as soon as it is deleted, so on a node where flanneld
//! still runs (a migration that starts the agent before stopping flanneld,
//! as the guide's steps allow) `flannel.1` comes back until flanneld stops.
//! Only a device that comes back is deleted again: one that appears on a
//! node where the agent deleted none is flanneld starting anew (a node
//! rolled back to flannel), and is only reported.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

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
    /// Whether flannel's vxlan backend made it: flannel names its device
    /// after its VNI (`flannel.<VNI>`), so a device of another VNI under
    /// such a name is another tool's.
    pub fn is_flannels(&self) -> bool {
        flannel_device_vni(&self.name).is_some_and(|named| self.vni == Some(named))
    }
}

/// The VNI a name of flannel's vxlan device (`flannel.<VNI>`) carries.
pub fn flannel_device_vni(name: &str) -> Option<u32> {
    name.strip_prefix("flannel.")?.parse().ok()
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

/// The first wait before deleting flannel's device again, once deleted:
/// flanneld, while it runs, makes it again at once, and deleting it at
/// once each time would keep both processes busy.
pub const REMOVAL_BACKOFF_FIRST: Duration = Duration::from_secs(5);
/// The longest wait between two deletions (the wait doubles each time the
/// device comes back): how long `flannel.1` may outlive flanneld.
pub const REMOVAL_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// What to do about a kernel vxlan device on our port that appeared while
/// the agent runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appeared {
    /// flannel's, come back after the agent deleted it
    /// (`--remove-flannel-device`): delete it now.
    Remove(VxlanDevice),
    /// flannel's, to be deleted once the wait since the last deletion is
    /// over (asked again at the loop's housekeeping).
    Wait(VxlanDevice),
    /// Not ours to delete: say so, once while it stays.
    Report(VxlanDevice),
}

/// Kernel vxlan devices on our UDP port that appear after the agent
/// started: which to delete, when, and which only to report.
#[derive(Debug)]
pub struct AppearedDevices {
    /// `--remove-flannel-device`.
    remove_flannels: bool,
    /// No deletion before this (the backoff); `None` until the agent has
    /// deleted flannel's device once.
    next_removal: Option<Instant>,
    /// The wait after the next deletion.
    backoff: Duration,
    /// Devices reported, by name and index, while they stay.
    reported: BTreeSet<(String, u32)>,
    /// A device of flannel's waits for its deletion.
    pending: bool,
}

impl AppearedDevices {
    pub fn new(remove_flannels: bool) -> Self {
        Self { remove_flannels, next_removal: None, backoff: REMOVAL_BACKOFF_FIRST, reported: BTreeSet::new(), pending: false }
    }

    /// A flannel device was just deleted (at start, or by [`Self::decide`]):
    /// the next deletion waits.
    pub fn removed(&mut self, now: Instant) {
        self.next_removal = Some(now + self.backoff);
        self.backoff = (self.backoff * 2).min(REMOVAL_BACKOFF_MAX);
    }

    /// Whether a device waits for its deletion (the loop's housekeeping
    /// then asks again).
    pub fn pending(&self) -> bool {
        self.pending
    }

    /// What to do about `devices`, the vxlan devices on our port now. A
    /// device reported before and still there is not reported again.
    pub fn decide(&mut self, devices: Vec<VxlanDevice>, now: Instant) -> Vec<Appeared> {
        self.reported.retain(|(name, index)| devices.iter().any(|d| &d.name == name && d.index == *index));
        self.pending = false;
        let mut actions = Vec::new();
        for device in devices {
            let came_back = device.is_flannels() && self.remove_flannels && self.next_removal.is_some();
            if came_back {
                if self.next_removal.is_some_and(|after| now < after) {
                    self.pending = true;
                    actions.push(Appeared::Wait(device));
                } else {
                    self.removed(now);
                    actions.push(Appeared::Remove(device));
                }
            } else if self.reported.insert((device.name.clone(), device.index)) {
                actions.push(Appeared::Report(device));
            }
        }
        actions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flannel(index: u32) -> VxlanDevice {
        VxlanDevice { name: "flannel.1".to_owned(), index, vni: Some(1), port: 8472 }
    }

    #[test]
    fn flannels_device_coming_back_is_deleted_again_after_a_growing_wait() {
        let start = Instant::now();
        let mut devices = AppearedDevices::new(true);
        // Deleted at start; flanneld makes it again at once.
        devices.removed(start);
        assert_eq!(devices.decide(vec![flannel(7)], start), vec![Appeared::Wait(flannel(7))]);
        assert!(devices.pending());
        let first = start + REMOVAL_BACKOFF_FIRST;
        assert_eq!(devices.decide(vec![flannel(7)], first), vec![Appeared::Remove(flannel(7))]);
        assert!(!devices.pending());
        // Back again: the wait has doubled.
        assert_eq!(devices.decide(vec![flannel(8)], first + REMOVAL_BACKOFF_FIRST), vec![Appeared::Wait(flannel(8))]);
        let second = first + REMOVAL_BACKOFF_FIRST * 2;
        assert_eq!(devices.decide(vec![flannel(8)], second), vec![Appeared::Remove(flannel(8))]);
        // Gone: nothing to do, nothing pending.
        assert_eq!(devices.decide(Vec::new(), second), Vec::new());
        assert!(!devices.pending());
        // The wait stops growing at its maximum.
        let mut now = second;
        for _ in 0..10 {
            now += REMOVAL_BACKOFF_MAX;
            assert_eq!(devices.decide(vec![flannel(9)], now), vec![Appeared::Remove(flannel(9))]);
        }
        assert_eq!(devices.decide(vec![flannel(9)], now + REMOVAL_BACKOFF_MAX - Duration::from_millis(1)), vec![Appeared::Wait(flannel(9))]);
    }

    #[test]
    fn devices_not_ours_to_delete_are_reported_once_while_they_stay() {
        let now = Instant::now();
        let other = VxlanDevice { name: "vxlan0".to_owned(), index: 5, vni: Some(42), port: 8472 };
        // Another's device, with or without the flag; flannel's without it.
        let mut with_flag = AppearedDevices::new(true);
        assert_eq!(with_flag.decide(vec![other.clone()], now), vec![Appeared::Report(other.clone())]);
        assert_eq!(with_flag.decide(vec![other.clone()], now), Vec::new());
        assert!(!with_flag.pending());
        // flannel's with the flag, where the agent deleted none: flanneld
        // starting anew (a node rolled back), not a device coming back.
        let mut rolled_back = AppearedDevices::new(true);
        assert_eq!(rolled_back.decide(vec![flannel(7)], now), vec![Appeared::Report(flannel(7))]);
        assert_eq!(rolled_back.decide(vec![flannel(7)], now + REMOVAL_BACKOFF_MAX), Vec::new());
        let mut without_flag = AppearedDevices::new(false);
        assert_eq!(without_flag.decide(vec![flannel(7), other.clone()], now), vec![Appeared::Report(flannel(7)), Appeared::Report(other.clone())]);
        assert_eq!(without_flag.decide(vec![flannel(7)], now), Vec::new());
        // Gone and made again (a new index): reported again.
        assert_eq!(without_flag.decide(Vec::new(), now), Vec::new());
        assert_eq!(without_flag.decide(vec![flannel(11)], now), vec![Appeared::Report(flannel(11))]);
    }

    #[test]
    fn only_flannel_vni_devices_are_flannels() {
        let device = |name: &str, vni: u32| VxlanDevice { name: name.to_owned(), index: 1, vni: Some(vni), port: 8472 };
        assert!(device("flannel.1", 1).is_flannels());
        assert!(device("flannel.4096", 4096).is_flannels());
        // Named like flannel's, but not after its own VNI: not flannel's.
        // (Shown failing before: any number passed.)
        assert!(!device("flannel.1", 7).is_flannels());
        assert!(!device("flannel.x", 1).is_flannels());
        assert!(!device("vxlan0", 1).is_flannels());
        assert!(!device("cilium_vxlan", 1).is_flannels());
    }
}
