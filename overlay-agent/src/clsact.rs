//! The datapath's TC filters on kernels without TCX (before 6.6).
//!
//! There the TC programs hang off a clsact qdisc as `cls_bpf` filters,
//! which the kernel cannot pin. They do outlive the agent (a netlink filter
//! stays until someone deletes it), so each role has a fixed priority and
//! handle: a restarted agent finds its filter there by priority, handle and
//! program name and replaces the program in it atomically, instead of
//! stacking a new filter beside it, and `cleanup` finds them to delete them.
//! Filters of ours elsewhere (stacked by agents before this scheme, at
//! kernel-chosen priorities) are deleted once ours is in place. A filter of
//! anyone else at our priority is never touched: attaching then fails.

use std::io;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    RouteNetlinkMessage,
    tc::{TcAttribute, TcFilterBpfOption, TcHandle, TcMessage, TcOption},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use overlay_common::program_names;

use crate::bpffs::LinkRole;

/// The filter handle of every filter of ours (one per priority).
pub const FILTER_HANDLE: u32 = 1;

/// The fixed priority of each role's filter. Distinct per role, away from
/// 1 (where other tools put theirs) and from the kernel's automatic
/// choices (49152 and below it, one step per filter).
pub const fn priority(role: LinkRole) -> u16 {
    match role {
        LinkRole::TcEgress => 20310,
        LinkRole::DecapTc => 20311,
        LinkRole::PodFastPath => 20312,
        LinkRole::PodDelivered => 20314,
        LinkRole::SegEncap => 20315,
        LinkRole::GroDeliver => 20316,
        // XDP is never a clsact filter; kept distinct all the same.
        LinkRole::DecapXdp => 20313,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClsactError {
    #[error("talking to the kernel over netlink")]
    Netlink(#[source] io::Error),
    #[error("decoding the kernel's netlink answer: {0}")]
    Decode(String),
    #[error(
        "{direction} priority {priority} handle {handle:#x} on {iface} holds a filter that is not ours \
         ({found:?}); overlay uses that priority for {program}: remove that filter \
         (`tc filter del dev {iface} {direction} pref {priority}`) or free the interface"
    )]
    Occupied {
        iface: String,
        direction: Direction,
        priority: u16,
        handle: u32,
        found: String,
        program: &'static str,
    },
}

/// Which side of the clsact qdisc.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        })
    }
}

impl Direction {
    fn parent(self) -> TcHandle {
        TcHandle {
            major: 0xffff,
            minor: match self {
                Self::Ingress => TcHandle::MIN_INGRESS,
                Self::Egress => TcHandle::MIN_EGRESS,
            },
        }
    }
}

/// One `cls_bpf` filter as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub priority: u16,
    pub handle: u32,
    /// The program name the filter was created with (`TCA_BPF_NAME`), if
    /// it is a bpf filter.
    pub name: Option<String>,
}

impl Filter {
    /// Whether it runs one of overlay's programs.
    pub fn is_ours(&self) -> bool {
        self.name.as_deref().is_some_and(|n| program_names::ALL.contains(&n))
    }
}

/// The filters on one side of `ifindex`'s clsact qdisc (none without one).
pub fn filters(ifindex: u32, direction: Direction) -> Result<Vec<Filter>, ClsactError> {
    let mut query = TcMessage::default();
    query.header.index = ifindex as i32;
    query.header.parent = direction.parent();
    let answers = request(RouteNetlinkMessage::GetTrafficFilter(query), NLM_F_REQUEST | NLM_F_DUMP)?;
    let mut found = Vec::new();
    for message in answers {
        let RouteNetlinkMessage::NewTrafficFilter(filter) = message else { continue };
        let handle = u32::from(filter.header.handle.major) << 16 | u32::from(filter.header.handle.minor);
        if handle == 0 {
            // The classifier instance itself, listed before its filters.
            continue;
        }
        let name = filter.attributes.iter().find_map(|a| match a {
            TcAttribute::Options(options) => options.iter().find_map(|o| match o {
                TcOption::Bpf(TcFilterBpfOption::ProgName(name)) => Some(name.clone()),
                _ => None,
            }),
            _ => None,
        });
        found.push(Filter { priority: (filter.header.info >> 16) as u16, handle, name });
    }
    Ok(found)
}

/// Deletes the filter at `priority`/`handle`; one already gone is fine.
pub fn delete(ifindex: u32, direction: Direction, priority: u16, handle: u32) -> Result<(), ClsactError> {
    let mut message = TcMessage::default();
    message.header.index = ifindex as i32;
    message.header.parent = direction.parent();
    message.header.handle = TcHandle { major: (handle >> 16) as u16, minor: handle as u16 };
    message.header.info = u32::from(priority) << 16 | u32::from((libc::ETH_P_ALL as u16).to_be());
    match request(RouteNetlinkMessage::DelTrafficFilter(message), NLM_F_REQUEST | NLM_F_ACK) {
        Ok(_) => Ok(()),
        Err(ClsactError::Netlink(e)) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Deletes every filter of ours on both sides of `ifindex` except those at
/// `keep` (side, priority). Returns how many it deleted.
pub fn delete_ours(ifindex: u32, keep: &[(Direction, u16)]) -> Result<usize, ClsactError> {
    let mut deleted = 0;
    for direction in [Direction::Ingress, Direction::Egress] {
        for filter in filters(ifindex, direction)? {
            let kept = keep.contains(&(direction, filter.priority)) && filter.handle == FILTER_HANDLE;
            if filter.is_ours() && !kept {
                delete(ifindex, direction, filter.priority, filter.handle)?;
                deleted += 1;
            }
        }
    }
    Ok(deleted)
}

/// Sends one request and collects the answers (all parts of a dump).
fn request(message: RouteNetlinkMessage, flags: u16) -> Result<Vec<RouteNetlinkMessage>, ClsactError> {
    let mut socket = Socket::new(NETLINK_ROUTE).map_err(ClsactError::Netlink)?;
    socket.bind_auto().map_err(ClsactError::Netlink)?;
    socket.connect(&SocketAddr::new(0, 0)).map_err(ClsactError::Netlink)?;
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = 1;
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
    packet.finalize();
    let mut out = vec![0; packet.buffer_len()];
    packet.serialize(&mut out);
    socket.send(&out, 0).map_err(ClsactError::Netlink)?;
    let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
    let mut buf = vec![0u8; 64 * 1024];
    let mut answers = Vec::new();
    loop {
        let size = socket.recv(&mut &mut buf[..], 0).map_err(ClsactError::Netlink)?;
        let mut offset = 0;
        while offset < size {
            let answer = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[offset..size])
                .map_err(|e| ClsactError::Decode(e.to_string()))?;
            let length = answer.header.length as usize;
            if length == 0 {
                return Ok(answers);
            }
            offset += length.next_multiple_of(4);
            match answer.payload {
                NetlinkPayload::Done(_) => return Ok(answers),
                NetlinkPayload::Error(error) if error.code.is_none() => return Ok(answers),
                NetlinkPayload::Error(error) => {
                    return Err(ClsactError::Netlink(io::Error::from_raw_os_error(error.raw_code().abs())));
                }
                NetlinkPayload::InnerMessage(inner) => {
                    answers.push(inner);
                    if !dump {
                        return Ok(answers);
                    }
                }
                _ => {}
            }
        }
    }
}
