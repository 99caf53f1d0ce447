//! The agent's own veth pairs in the node's namespace: a sending end the
//! datapath redirects packets to (`bpf_redirect` to its egress), and a
//! receiving end where one of our programs (TC ingress) takes what the
//! kernel made of them on the way. Two exist, each with its module:
//! [`crate::seg_device`] (the kernel segments what crosses it) and
//! [`crate::gro_device`] (the kernel merges what crosses it).
//!
//! A pair carries no address and never routes: the kernel sends it
//! nothing (IPv6 address generation is off), and the receiving end's
//! program hands every frame on or drops it at TC ingress, ahead of the IP
//! layer. Its alias marks it as the agent's: the agent reuses a pair it
//! made (a restart loses nothing), removes it with `cleanup`, and never
//! touches a device of that name it did not make. The kernel takes no
//! alias with the request that creates a link, so both ends are created
//! in the agent's device group ([`PAIR_GROUP`]), which it does take: a
//! pair the agent made and was stopped before marking is known by that,
//! and made again. Everything is asked of
//! the kernel over rtnetlink and the ethtool ioctl, without starting a
//! process.

use std::{
    collections::VecDeque,
    io,
    time::{Duration, Instant},
};

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{
        AfSpecInet6, AfSpecUnspec, In6AddrGenMode, InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo,
        LinkMessage,
    },
};

use tracing::{info, warn};

use overlay_common::Config;

use crate::{
    bpffs::LinkRole,
    datapath::{Datapath, DatapathError, LinkOutcome},
    desired::LocalSettings,
    iface,
    report::WithCauses as _,
    rtnl::{Answer, Refused, Rtnl, RtnlError},
};

/// One of the agent's veth pairs.
#[derive(Debug)]
pub struct DevicePair {
    /// What the pair is, as the log and errors name it.
    pub what: &'static str,
    /// What the datapath does with it, for the log once it is set up.
    pub purpose: &'static str,
    /// What the datapath does without it, for the log when it cannot be
    /// set up.
    pub without: &'static str,
    /// The end the datapath redirects to.
    pub send_end: &'static str,
    /// The end whose TC ingress runs `program`.
    pub receive_end: &'static str,
    /// The alias marking both ends as the agent's (`ip link` shows it).
    pub alias: &'static str,
    /// The program at the receiving end.
    pub program: LinkRole,
    /// Features set on the sending end (`ethtool -k` names, on or off).
    pub send_features: &'static [(&'static str, bool)],
    /// Features set on the receiving end.
    pub receive_features: &'static [(&'static str, bool)],
    /// One queue per online CPU of the node (at most 64) on both ends, so
    /// that flows redirected on different CPUs (each to the queue its hash
    /// picks) do not share one NAPI; otherwise one.
    pub queue_per_cpu: bool,
}

/// The MTU of both ends: what a veth allows, so no packet the datapath
/// redirects is too long for them.
const MTU: u32 = 65535;

/// The device group (`ip link … group`) both ends are created in, with
/// the request that creates them. 0x6f76, "ov".
pub const PAIR_GROUP: u32 = 0x6f76;

/// What holds a pair's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holder {
    /// Nothing: the sending end does not exist.
    Nobody,
    /// The agent: both ends carry its alias.
    Agent,
    /// The agent, stopped between creating the pair and marking it: a
    /// veth pair of each other, both ends in its group, neither with
    /// another alias.
    AgentCutShort,
    /// Someone else.
    Another,
}

#[derive(Debug, thiserror::Error)]
pub enum DevicePairError {
    #[error("{name} exists but is not the agent's (its alias is not {alias:?}); rename or delete it to let the agent create its {what}")]
    NotOurs { name: &'static str, alias: &'static str, what: &'static str },
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
    #[error("{action} {program} at {iface}")]
    Program {
        action: &'static str,
        program: &'static str,
        iface: &'static str,
        #[source]
        source: Box<DatapathError>,
    },
}

/// Which of the agent's device pairs: each has its field in `CONFIG` (and
/// in the settings it is written from) for its sending end's index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PairKind {
    /// [`crate::seg_device`].
    Segmentation,
    /// [`crate::gro_device`].
    Gro,
}

impl PairKind {
    pub const ALL: [Self; 2] = [Self::Segmentation, Self::Gro];

    pub fn pair(self) -> &'static DevicePair {
        match self {
            Self::Segmentation => &crate::seg_device::SEGMENTATION,
            Self::Gro => &crate::gro_device::GRO,
        }
    }

    /// Its sending end's index as `config` holds it.
    pub fn index_in(self, mut config: Config) -> u32 {
        *self.in_config(&mut config)
    }

    /// Its sending end's index in `CONFIG`, to write.
    pub fn in_config(self, config: &mut Config) -> &mut u32 {
        match self {
            Self::Segmentation => &mut config.seg_ifindex,
            Self::Gro => &mut config.gro_ifindex,
        }
    }

    /// The same in the settings `CONFIG` is computed from.
    pub fn in_settings(self, settings: &mut LocalSettings) -> &mut u32 {
        match self {
            Self::Segmentation => &mut settings.seg_ifindex,
            Self::Gro => &mut settings.gro_ifindex,
        }
    }
}

impl DevicePair {
    /// Both ends, in the order packets cross them.
    pub const fn device_names(&self) -> [&'static str; 2] {
        [self.send_end, self.receive_end]
    }

    /// Whether the pair whose sending end was set up with index
    /// `send_ifindex` is still there and up (0: not set up, nothing to
    /// miss): veth drops what it sends while either end is down.
    pub fn still_serves(&self, send_ifindex: u32) -> bool {
        send_ifindex == 0 || (self.still_there(send_ifindex) && self.device_names().into_iter().all(iface::is_up))
    }

    /// Whether the pair whose sending end was set up with index
    /// `send_ifindex` still exists, up or down.
    pub fn still_there(&self, send_ifindex: u32) -> bool {
        iface::interface_index(self.send_end) == Some(send_ifindex) && iface::interface_index(self.receive_end).is_some()
    }

    /// Sets the pair up where the datapath uses it (`wanted`), or removes
    /// the agent's own where it does not, and says in the log which
    /// (`"<what>: <purpose>"` once set up). Returns the sending end's
    /// index, for `CONFIG`, or 0 without it; where setting it up failed,
    /// the error, for the caller to report with [`Self::without`] (once:
    /// the agent tries again).
    pub fn settle(&self, datapath: &mut Datapath, wanted: bool) -> Result<u32, DevicePairError> {
        if !wanted {
            match self.remove(Some(datapath)) {
                Ok(true) => info!(device = self.send_end, "removed the {}, which the datapath no longer uses", self.what),
                Ok(false) => {}
                Err(err) => warn!(error = %err.to_string_with_causes(), "cannot remove the {}", self.what),
            }
            return Ok(0);
        }
        let (send_ifindex, outcome) = self.set_up(datapath)?;
        info!(devices = %self.device_names().join(" -> "), send_ifindex, ?outcome, "{}: {}", self.what, self.purpose);
        Ok(send_ifindex)
    }

    /// Creates the pair (or reuses the agent's own), sets its features, and
    /// attaches its program; returns the sending end's index. On failure
    /// nothing the call created is left behind.
    pub fn set_up(&self, datapath: &mut Datapath) -> Result<(u32, LinkOutcome), DevicePairError> {
        let mut rtnl = open()?;
        let existed = match self.holder(&mut rtnl)? {
            Holder::Agent => true,
            Holder::Another => {
                // A pin left from a pair of ours that someone replaced
                // serves nothing.
                let _ = datapath.detach_device_pair(self.receive_end);
                return Err(self.not_ours());
            }
            Holder::AgentCutShort => {
                info!(devices = %self.device_names().join(" -> "), "the {} of an agent stopped while it made it: making it again", self.what);
                let _ = datapath.detach_device_pair(self.receive_end);
                self.delete(&mut rtnl)?;
                self.create(&mut rtnl)?;
                false
            }
            Holder::Nobody => {
                self.create(&mut rtnl)?;
                false
            }
        };
        let configured = self.configure(&mut rtnl).and_then(|send_ifindex| {
            let outcome = datapath.attach_device_pair(self.receive_end, self.program).map_err(self.program_error("attaching"))?;
            Ok((send_ifindex, outcome))
        });
        if configured.is_err() && !existed {
            let _ = datapath.detach_device_pair(self.receive_end);
            let _ = self.delete(&mut rtnl);
        }
        configured
    }

    /// Removes the pair and its program's pins when the agent made it.
    /// Returns whether there was one of ours to remove; a device of that
    /// name the agent did not make is left, with an error saying so.
    pub fn remove(&self, datapath: Option<&mut Datapath>) -> Result<bool, DevicePairError> {
        if let Some(datapath) = datapath {
            datapath.detach_device_pair(self.receive_end).map_err(self.program_error("detaching"))?;
        }
        let mut rtnl = open()?;
        match self.holder(&mut rtnl)? {
            Holder::Agent | Holder::AgentCutShort => self.delete(&mut rtnl).map(|()| true),
            Holder::Another => Err(self.not_ours()),
            Holder::Nobody => Ok(false),
        }
    }

    /// Wraps a failure to attach or detach the pair's program.
    fn program_error(&self, action: &'static str) -> impl FnOnce(DatapathError) -> DevicePairError {
        let (program, iface) = (crate::datapath::role_program(self.program), self.receive_end);
        move |source| DevicePairError::Program { action, program, iface, source: Box::new(source) }
    }

    fn not_ours(&self) -> DevicePairError {
        DevicePairError::NotOurs { name: self.send_end, alias: self.alias, what: self.what }
    }

    /// What holds the pair's names (see [`Holder`]).
    fn holder(&self, rtnl: &mut Rtnl) -> Result<Holder, DevicePairError> {
        let links = rtnl.links().map_err(|source| DevicePairError::Netlink { what: "links".to_owned(), source })?;
        // Each end, if it exists.
        let end = |name: &str| links.iter().find(|l| l.attributes.iter().any(|a| matches!(a, LinkAttribute::IfName(n) if n == name)));
        let alias = |link: &LinkMessage| {
            link.attributes.iter().find_map(|a| match a {
                LinkAttribute::IfAlias(alias) => Some(alias.clone()),
                _ => None,
            })
        };
        let group = |link: &LinkMessage| {
            link.attributes.iter().find_map(|a| match a {
                LinkAttribute::Group(group) => Some(*group),
                _ => None,
            })
        };
        // A veth whose peer (IFLA_LINK) is `peer`.
        let veth_of = |link: &LinkMessage, peer: &LinkMessage| {
            let veth = link.attributes.iter().any(|a| {
                matches!(a, LinkAttribute::LinkInfo(infos) if infos.contains(&LinkInfo::Kind(InfoKind::Veth)))
            });
            veth && link.attributes.iter().any(|a| matches!(a, LinkAttribute::Link(index) if *index == peer.header.index))
        };
        let Some(send) = end(self.send_end) else { return Ok(Holder::Nobody) };
        let Some(receive) = end(self.receive_end) else { return Ok(Holder::Another) };
        let ends = [send, receive];
        Ok(if ends.iter().all(|l| alias(l).as_deref() == Some(self.alias)) {
            Holder::Agent
        } else if veth_of(send, receive)
            && veth_of(receive, send)
            && ends.iter().all(|l| group(l) == Some(PAIR_GROUP) && alias(l).is_none_or(|a| a.is_empty() || a == self.alias))
        {
            Holder::AgentCutShort
        } else {
            Holder::Another
        })
    }

    /// Creates the pair in the agent's group and marks both ends ours
    /// (`RTM_NEWLINK` takes no alias), or leaves nothing.
    fn create(&self, rtnl: &mut Rtnl) -> Result<(), DevicePairError> {
        let mut common = vec![LinkAttribute::Mtu(MTU), LinkAttribute::Group(PAIR_GROUP)];
        if self.queue_per_cpu {
            // The node's CPUs, not the agent's share of them (a DaemonSet's
            // CPU limit): packets arrive on every CPU.
            // SAFETY: sysconf only reads a system value.
            let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
            let queues = online.clamp(1, 64) as u32;
            common.extend([LinkAttribute::NumTxQueues(queues), LinkAttribute::NumRxQueues(queues)]);
        }
        let mut peer = LinkMessage::default();
        peer.attributes = [vec![LinkAttribute::IfName(self.receive_end.to_owned())], common.clone()].concat();
        let mut pair = LinkMessage::default();
        pair.attributes = [
            vec![LinkAttribute::IfName(self.send_end.to_owned())],
            common,
            vec![LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Veth), LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer)))])],
        ]
        .concat();
        let what = format!("create the veth pair {}, {}", self.send_end, self.receive_end);
        change(rtnl, RouteNetlinkMessage::NewLink(pair), NLM_F_CREATE | NLM_F_EXCL, &what)?;
        let marked = self.device_names().iter().try_for_each(|&name| {
            let index = iface::interface_index(name).ok_or(DevicePairError::Vanished(name))?;
            change(rtnl, set_link(index, vec![LinkAttribute::IfAlias(self.alias.to_owned())]), 0, &format!("set the alias of {name}"))?;
            // No IPv6 link-local address, so the kernel sends nothing
            // through the pair (best effort: a kernel without IPv6 refuses
            // the mode).
            let no_addrgen = LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(vec![AfSpecInet6::AddrGenMode(In6AddrGenMode::None)])]);
            let _ = change(rtnl, set_link(index, vec![no_addrgen]), 0, "turn IPv6 address generation off");
            Ok(())
        });
        if marked.is_err() {
            let _ = self.delete(rtnl);
        }
        marked
    }

    /// Each end's features as the datapath needs them.
    fn features(&self) -> [(&'static str, &'static [(&'static str, bool)]); 2] {
        [(self.send_end, self.send_features), (self.receive_end, self.receive_features)]
    }

    /// An end and one of its features that someone changed since the pair
    /// was set up (`ethtool -K`), with the feature's state now; `None`
    /// when all are as the datapath needs them, or cannot be read.
    pub fn feature_changed(&self) -> Option<(&'static str, &'static str, bool)> {
        self.features()
            .into_iter()
            .find_map(|(name, features)| iface::feature_not_as_wanted(name, features).ok().flatten().map(|(f, on)| (name, f, on)))
    }

    /// Sets each end's features as the datapath needs them.
    pub fn set_features(&self) -> Result<(), DevicePairError> {
        for (name, features) in self.features() {
            iface::set_features(name, features).map_err(|source| DevicePairError::Features {
                name,
                features: features.iter().map(|(f, on)| format!("{f} {}", if *on { "on" } else { "off" })).collect::<Vec<_>>().join(", "),
                source,
            })?;
        }
        Ok(())
    }

    /// Features and state; returns the sending end's index.
    fn configure(&self, rtnl: &mut Rtnl) -> Result<u32, DevicePairError> {
        self.set_features()?;
        // The receiving end first: veth drops what it sends while its peer
        // is down.
        for name in [self.receive_end, self.send_end] {
            let index = iface::interface_index(name).ok_or(DevicePairError::Vanished(name))?;
            let mut up = set_link(index, Vec::new());
            if let RouteNetlinkMessage::SetLink(link) = &mut up {
                link.header.flags = LinkFlags::Up;
                link.header.change_mask = LinkFlags::Up;
            }
            change(rtnl, up, 0, &format!("set {name} up"))?;
        }
        iface::interface_index(self.send_end).ok_or(DevicePairError::Vanished(self.send_end))
    }

    /// Deletes the pair (deleting one end deletes both).
    fn delete(&self, rtnl: &mut Rtnl) -> Result<(), DevicePairError> {
        let index = iface::interface_index(self.send_end).ok_or(DevicePairError::Vanished(self.send_end))?;
        let mut link = LinkMessage::default();
        link.header.index = index;
        change(rtnl, RouteNetlinkMessage::DelLink(link), 0, &format!("delete {}", self.send_end))
    }
}

/// How often the agent sets one pair's features again: at most
/// [`Self::PER_WINDOW`] times in [`Self::WINDOW`]. A tool that turns a
/// feature back on every link change (a network manager applying its own
/// settings) would otherwise ping-pong with the agent at netlink speed, a
/// warning and, for GRO, a NAPI toggle under traffic each round. Past the
/// budget the agent leaves the features as the tool set them, says so, and
/// sets them again at the first link change or resync once the oldest
/// repair has left the window.
#[derive(Debug, Default)]
pub struct FeatureRepairs {
    /// When the features were set again, oldest first, within the window.
    recent: VecDeque<Instant>,
}

impl FeatureRepairs {
    pub const PER_WINDOW: usize = 5;
    pub const WINDOW: Duration = Duration::from_secs(60);

    /// Whether the features may be set again at `now`; counts it if so.
    pub fn allow(&mut self, now: Instant) -> bool {
        while self.recent.front().is_some_and(|&at| now.saturating_duration_since(at) >= Self::WINDOW) {
            self.recent.pop_front();
        }
        if self.recent.len() >= Self::PER_WINDOW {
            return false;
        }
        self.recent.push_back(now);
        true
    }

    /// Takes back the repair [`Self::allow`] counted last: the kernel
    /// refused it, which is no other tool's doing.
    pub fn refused(&mut self) {
        self.recent.pop_back();
    }

    /// How long from `now` until [`Self::allow`] says yes again.
    pub fn wait(&self, now: Instant) -> Duration {
        match self.recent.front() {
            Some(&oldest) if self.recent.len() >= Self::PER_WINDOW => Self::WINDOW.saturating_sub(now.saturating_duration_since(oldest)),
            _ => Duration::ZERO,
        }
    }
}

fn open() -> Result<Rtnl, DevicePairError> {
    Rtnl::open().map_err(|source| DevicePairError::Netlink { what: "links".to_owned(), source })
}

/// Sends one change and turns a refusal into an error saying `what`.
fn change(rtnl: &mut Rtnl, message: RouteNetlinkMessage, flags: u16, what: &str) -> Result<(), DevicePairError> {
    match rtnl.change(message, flags) {
        Ok(Answer::Refused(source)) => Err(DevicePairError::Refused { what: what.to_owned(), source }),
        Ok(_) => Ok(()),
        Err(source) => Err(DevicePairError::Netlink { what: what.to_owned(), source }),
    }
}

/// `RTM_SETLINK` of the link with index `index`, with `attributes`.
fn set_link(index: u32, attributes: Vec<LinkAttribute>) -> RouteNetlinkMessage {
    let mut link = LinkMessage::default();
    link.header.index = index;
    link.attributes = attributes;
    RouteNetlinkMessage::SetLink(link)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_repairs_stop_past_the_budget_and_resume_as_the_window_moves() {
        let start = Instant::now();
        let mut repairs = FeatureRepairs::default();
        let second = |s: u64| start + Duration::from_secs(s);
        for s in 0..FeatureRepairs::PER_WINDOW as u64 {
            assert!(repairs.allow(second(s)), "repair {s} is within the budget");
        }
        assert!(!repairs.allow(second(10)), "one more within the minute is not");
        assert_eq!(repairs.wait(second(10)), Duration::from_secs(50), "until the first leaves the window");
        assert!(!repairs.allow(second(59)));
        assert!(repairs.allow(second(60)), "the first left the window");
        assert!(!repairs.allow(second(60)), "and one only");
        assert_eq!(repairs.wait(second(60)), Duration::from_secs(1));
        assert!(repairs.allow(second(200)), "a quiet while later");
        assert_eq!(repairs.wait(second(200)), Duration::ZERO);
        for s in 201..201 + FeatureRepairs::PER_WINDOW as u64 {
            assert!(repairs.allow(second(s)));
            repairs.refused();
        }
        assert!(repairs.allow(second(210)), "refused repairs do not count");
    }
}
