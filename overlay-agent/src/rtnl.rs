//! Requests to the kernel over rtnetlink, one at a time on a synchronous
//! socket: what `ip route get|replace|del`, `ip link show`, `ip route show`
//! and `bridge fdb show` send, without starting a process. Messages are built and parsed by
//! `netlink-packet-route`; the socket is `netlink-sys`.

use std::{io, ops::ControlFlow};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    link::LinkMessage,
    neighbour::{NeighbourAttribute, NeighbourMessage},
    route::RouteMessage,
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

#[derive(Debug, thiserror::Error)]
pub enum RtnlError {
    #[error("opening a netlink socket")]
    Socket(#[source] io::Error),
    #[error("talking to the kernel over netlink")]
    Io(#[source] io::Error),
    #[error("decoding the kernel's netlink answer: {0}")]
    Decode(String),
}

/// The kernel's refusal of one request: its errno, and the message of its
/// extended acknowledgement when it gave one (what `ip` prints as
/// `Error: …`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", match message {
    Some(message) => format!("{message} ({})", io::Error::from_raw_os_error(*errno)),
    None => io::Error::from_raw_os_error(*errno).to_string(),
})]
pub struct Refused {
    /// A positive errno (`libc::ESRCH`, …).
    pub errno: i32,
    pub message: Option<String>,
}

/// What the kernel answered to one request.
#[derive(Debug)]
pub enum Answer {
    /// The request was carried out (for requests sent with an ACK).
    Done,
    /// The answer to a query (`RTM_GETROUTE` answers with a route).
    Route(RouteMessage),
    Refused(Refused),
}

/// A connected rtnetlink socket.
pub struct Rtnl {
    socket: Socket,
    sequence: u32,
    buf: Vec<u8>,
}

/// `NLMSGERR_ATTR_MSG`: the extended ack's text.
const NLMSGERR_ATTR_MSG: u16 = 1;

impl Rtnl {
    pub fn open() -> Result<Self, RtnlError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(RtnlError::Socket)?;
        socket.bind_auto().map_err(RtnlError::Socket)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(RtnlError::Socket)?;
        // Errors carry only the request's header rather than the whole
        // request echoed back, then the kernel's text. Best effort: a
        // kernel without either still answers, with the errno alone.
        let _ = socket
            .set_cap_ack(true)
            .and_then(|()| socket.set_ext_ack(true));
        Ok(Self {
            socket,
            sequence: 0,
            buf: vec![0; 64 * 1024],
        })
    }

    /// Asks for a route (`RTM_GETROUTE`, as `ip route get`).
    pub fn get_route(&mut self, query: RouteMessage) -> Result<Answer, RtnlError> {
        self.request(RouteNetlinkMessage::GetRoute(query), NLM_F_REQUEST)
    }

    /// Sends a change (`RTM_NEWROUTE`, `RTM_DELROUTE`) with `flags` added to
    /// `NLM_F_REQUEST | NLM_F_ACK`, and waits for its acknowledgement.
    pub fn change(
        &mut self,
        message: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Answer, RtnlError> {
        self.request(message, NLM_F_REQUEST | NLM_F_ACK | flags)
    }

    /// Every link in this network namespace, with its attributes (as `ip
    /// -d link show`).
    pub fn links(&mut self) -> Result<Vec<LinkMessage>, RtnlError> {
        let answers = self.dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))?;
        Ok(answers
            .into_iter()
            .filter_map(|answer| match answer {
                RouteNetlinkMessage::NewLink(link) => Some(link),
                _ => None,
            })
            .collect())
    }

    /// Every IPv4 route of every table (as `ip -4 route show table all`).
    pub fn routes(&mut self) -> Result<Vec<RouteMessage>, RtnlError> {
        self.routes_of(AddressFamily::Inet)
    }

    /// Every route of `family` in every table (as `ip -6 route show table
    /// all` for IPv6).
    pub fn routes_of(&mut self, family: AddressFamily) -> Result<Vec<RouteMessage>, RtnlError> {
        let mut query = RouteMessage::default();
        query.header.address_family = family;
        let answers = self.dump(RouteNetlinkMessage::GetRoute(query))?;
        Ok(answers
            .into_iter()
            .filter_map(|answer| match answer {
                RouteNetlinkMessage::NewRoute(route) => Some(route),
                _ => None,
            })
            .collect())
    }

    /// The forwarding database of the bridge with index `bridge`: the
    /// entries of its ports, and the ports' own (as `bridge fdb show br
    /// BRIDGE`).
    pub fn bridge_fdb(&mut self, bridge: u32) -> Result<Vec<NeighbourMessage>, RtnlError> {
        let mut query = NeighbourMessage::default();
        query.header.family = AddressFamily::Bridge;
        query.attributes.push(NeighbourAttribute::Controller(bridge));
        let answers = self.dump(RouteNetlinkMessage::GetNeighbour(query))?;
        Ok(answers
            .into_iter()
            .filter_map(|answer| match answer {
                RouteNetlinkMessage::NewNeighbour(entry) => Some(entry),
                _ => None,
            })
            .collect())
    }

    /// Sends a dump request and collects its answers up to `NLMSG_DONE`.
    fn dump(&mut self, message: RouteNetlinkMessage) -> Result<Vec<RouteNetlinkMessage>, RtnlError> {
        self.send(message, NLM_F_REQUEST | NLM_F_DUMP)?;
        let mut answers = Vec::new();
        loop {
            let size = self.socket.recv(&mut &mut self.buf[..], 0).map_err(RtnlError::Io)?;
            let mut offset = 0;
            while offset < size {
                let answer = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[offset..size])
                    .map_err(|e| RtnlError::Decode(e.to_string()))?;
                let length = answer.header.length as usize;
                if length == 0 {
                    break;
                }
                offset += length.next_multiple_of(4);
                if answer.header.sequence_number != self.sequence {
                    continue;
                }
                match answer.payload {
                    NetlinkPayload::InnerMessage(inner) => answers.push(inner),
                    NetlinkPayload::Done(_) => return Ok(answers),
                    NetlinkPayload::Error(error) if error.code.is_some() => {
                        return Err(RtnlError::Io(io::Error::from_raw_os_error(error.raw_code().abs())));
                    }
                    _ => {}
                }
            }
        }
    }

    fn send(&mut self, message: RouteNetlinkMessage, flags: u16) -> Result<(), RtnlError> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.sequence;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
        packet.finalize();
        let mut out = vec![0; packet.buffer_len()];
        packet.serialize(&mut out);
        self.socket.send(&out, 0).map_err(RtnlError::Io)?;
        Ok(())
    }

    fn request(&mut self, message: RouteNetlinkMessage, flags: u16) -> Result<Answer, RtnlError> {
        self.send(message, flags)?;
        loop {
            let size = self
                .socket
                .recv(&mut &mut self.buf[..], 0)
                .map_err(RtnlError::Io)?;
            let mut offset = 0;
            while offset < size {
                let bytes = &self.buf[offset..size];
                let answer = NetlinkMessage::<RouteNetlinkMessage>::deserialize(bytes)
                    .map_err(|e| RtnlError::Decode(e.to_string()))?;
                let length = answer.header.length as usize;
                if length == 0 {
                    break;
                }
                offset += length.next_multiple_of(4);
                if answer.header.sequence_number != self.sequence {
                    // A late answer to an earlier request.
                    continue;
                }
                return match answer.payload {
                    NetlinkPayload::Error(error) if error.code.is_none() => Ok(Answer::Done),
                    NetlinkPayload::Error(error) => Ok(Answer::Refused(Refused {
                        errno: error.raw_code().abs(),
                        message: extack_message(&error.header),
                    })),
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(route)) => {
                        Ok(Answer::Route(route))
                    }
                    other => Err(RtnlError::Decode(format!("unexpected answer {other:?}"))),
                };
            }
        }
    }
}

/// A nexthop object as the kernel holds it (`ip nexthop show id N`): the
/// fields our routes use. `netlink-packet-route` 0.34 has no nexthop
/// messages (only `RTA_NH_ID` on routes), so `RTM_{NEW,DEL,GET}NEXTHOP` are
/// built and read here by hand: `struct nhmsg` and three attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Nexthop {
    pub id: u32,
    pub protocol: u8,
    pub gateway: Option<std::net::Ipv4Addr>,
    pub oif: Option<u32>,
    pub onlink: bool,
}

/// Nexthop object messages (linux/rtnetlink.h), which netlink-packet-route
/// does not model; [`crate::kernel_events`] matches the notifications too.
pub(crate) const RTM_NEWNEXTHOP: u16 = 104;
pub(crate) const RTM_DELNEXTHOP: u16 = 105;
const RTM_GETNEXTHOP: u16 = 106;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NHA_ID: u16 = 1;
const NHA_GROUP: u16 = 2;
const NHA_OIF: u16 = 5;
const NHA_GATEWAY: u16 = 6;
/// `RTNH_F_ONLINK` in `nhmsg.nh_flags`.
const RTNH_F_ONLINK: u32 = 4;

/// Every nexthop object in the namespace (`ip nexthop show`), and the ids
/// that nexthop groups hold (a group's members are in use).
#[derive(Debug, Default)]
pub struct NexthopTable {
    /// The nexthops [`parse_nexthop`] reads; groups among them have no
    /// gateway.
    pub nexthops: Vec<Nexthop>,
    pub grouped: Vec<u32>,
}

/// The members of a group nexthop (`NHA_GROUP`: `struct nexthop_grp`, 8
/// bytes each, the id first).
fn group_members(payload: &[u8]) -> Vec<u32> {
    let mut members = Vec::new();
    let mut rest = payload.get(8..).unwrap_or_default();
    while rest.len() >= 4 {
        let length = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
        if length < 4 || length > rest.len() {
            break;
        }
        if kind == NHA_GROUP {
            members.extend(rest[4..length].chunks_exact(8).map(|entry| u32::from_ne_bytes(entry[..4].try_into().expect("4 bytes"))));
        }
        rest = rest.get(length.next_multiple_of(4)..).unwrap_or_default();
    }
    members
}

/// `struct nhmsg` then its attributes.
fn nexthop_payload(family: u8, protocol: u8, flags: u32, attributes: &[(u16, &[u8])]) -> Vec<u8> {
    let mut out = vec![family, 0, protocol, 0];
    out.extend_from_slice(&flags.to_ne_bytes());
    for (kind, value) in attributes {
        let length = 4 + value.len();
        out.extend_from_slice(&(length as u16).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(value);
        out.resize(out.len().next_multiple_of(4), 0);
    }
    out
}

/// Reads an `RTM_NEWNEXTHOP` payload; `None` if it is not an IPv4 one.
fn parse_nexthop(payload: &[u8]) -> Option<Nexthop> {
    let (header, mut rest) = (payload.get(..8)?, &payload[8..]);
    let mut nexthop = Nexthop {
        id: 0,
        protocol: header[2],
        gateway: None,
        oif: None,
        onlink: u32::from_ne_bytes(header[4..8].try_into().ok()?) & RTNH_F_ONLINK != 0,
    };
    while rest.len() >= 4 {
        let length = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
        if length < 4 || length > rest.len() {
            break;
        }
        let value = &rest[4..length];
        match (kind, value.len()) {
            (NHA_ID, 4) => nexthop.id = u32::from_ne_bytes(value.try_into().ok()?),
            (NHA_OIF, 4) => nexthop.oif = Some(u32::from_ne_bytes(value.try_into().ok()?)),
            (NHA_GATEWAY, 4) => nexthop.gateway = Some(<[u8; 4]>::try_from(value).ok()?.into()),
            _ => {}
        }
        rest = rest.get(length.next_multiple_of(4)..).unwrap_or_default();
    }
    (nexthop.id != 0).then_some(nexthop)
}

impl Rtnl {
    /// Creates nexthop `id` (`ip nexthop add id ID via GW dev OIF [onlink]
    /// proto PROTOCOL`), with `NLM_F_EXCL`: an existing one is never
    /// replaced, the kernel answers `EEXIST`.
    pub fn add_nexthop(&mut self, id: u32, protocol: u8, gateway: std::net::Ipv4Addr, oif: u32, onlink: bool) -> Result<Answer, RtnlError> {
        let flags = if onlink { RTNH_F_ONLINK } else { 0 };
        let payload = nexthop_payload(
            libc::AF_INET as u8,
            protocol,
            flags,
            &[(NHA_ID, &id.to_ne_bytes()), (NHA_OIF, &oif.to_ne_bytes()), (NHA_GATEWAY, &gateway.octets())],
        );
        let flags = NLM_F_REQUEST | NLM_F_ACK | netlink_packet_core::NLM_F_CREATE | netlink_packet_core::NLM_F_EXCL;
        self.raw_request(RTM_NEWNEXTHOP, flags, &payload).map(|(answer, _)| answer)
    }

    /// Deletes nexthop `id` (`ip nexthop del id ID`); the kernel deletes
    /// every route using it with it.
    pub fn delete_nexthop(&mut self, id: u32) -> Result<Answer, RtnlError> {
        let payload = nexthop_payload(0, 0, 0, &[(NHA_ID, &id.to_ne_bytes())]);
        self.raw_request(RTM_DELNEXTHOP, NLM_F_REQUEST | NLM_F_ACK, &payload).map(|(answer, _)| answer)
    }

    /// Nexthop `id` (`ip nexthop get id ID`), `None` if there is none.
    pub fn nexthop(&mut self, id: u32) -> Result<Option<Nexthop>, RtnlError> {
        let payload = nexthop_payload(0, 0, 0, &[(NHA_ID, &id.to_ne_bytes())]);
        match self.raw_request(RTM_GETNEXTHOP, NLM_F_REQUEST, &payload)? {
            (_, Some(nexthop)) => Ok(Some(nexthop)),
            (Answer::Refused(refused), None) if refused.errno == libc::ENOENT || refused.errno == libc::ESRCH => Ok(None),
            (Answer::Refused(refused), None) => Err(RtnlError::Io(io::Error::from_raw_os_error(refused.errno))),
            (_, None) => Err(RtnlError::Decode(format!("no answer to the query of nexthop {id}"))),
        }
    }

    /// Every nexthop object (`ip nexthop show`), with the members of groups.
    pub fn nexthops(&mut self) -> Result<NexthopTable, RtnlError> {
        let payload = nexthop_payload(0, 0, 0, &[]);
        self.send_raw(RTM_GETNEXTHOP, NLM_F_REQUEST | NLM_F_DUMP, &payload)?;
        let mut table = NexthopTable::default();
        self.read_replies(|kind, body| match kind {
            NLMSG_DONE => ControlFlow::Break(Ok(())),
            NLMSG_ERROR if body.len() >= 4 => {
                let errno = error_code(body);
                // A kernel without nexthop objects has none.
                ControlFlow::Break(if errno == libc::EOPNOTSUPP || errno == libc::EINVAL || errno == libc::EAFNOSUPPORT {
                    Ok(())
                } else {
                    Err(RtnlError::Io(io::Error::from_raw_os_error(errno)))
                })
            }
            RTM_NEWNEXTHOP => {
                table.grouped.extend(group_members(body));
                table.nexthops.extend(parse_nexthop(body));
                ControlFlow::Continue(())
            }
            _ => ControlFlow::Continue(()),
        })?;
        Ok(table)
    }

    fn send_raw(&mut self, kind: u16, flags: u16, payload: &[u8]) -> Result<(), RtnlError> {
        self.sequence = self.sequence.wrapping_add(1);
        let mut out = Vec::with_capacity(16 + payload.len());
        out.extend_from_slice(&((16 + payload.len()) as u32).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&flags.to_ne_bytes());
        out.extend_from_slice(&self.sequence.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.extend_from_slice(payload);
        self.socket.send(&out, 0).map_err(RtnlError::Io)?;
        Ok(())
    }

    /// Sends one hand-built request and reads its answer: an
    /// acknowledgement or refusal, or (to a query) a nexthop.
    fn raw_request(&mut self, kind: u16, flags: u16, payload: &[u8]) -> Result<(Answer, Option<Nexthop>), RtnlError> {
        self.send_raw(kind, flags, payload)?;
        self.read_replies(|kind, body| {
            ControlFlow::Break(match kind {
                NLMSG_ERROR if body.len() >= 4 => {
                    let errno = error_code(body);
                    if errno == 0 {
                        Ok((Answer::Done, None))
                    } else {
                        Ok((Answer::Refused(Refused { errno, message: extack_message(&body[4..]) }), None))
                    }
                }
                RTM_NEWNEXTHOP => Ok((Answer::Done, parse_nexthop(body))),
                other => Err(RtnlError::Decode(format!("unexpected answer of type {other}"))),
            })
        })
    }

    /// Reads the replies to the request just sent by [`Self::send_raw`]
    /// (messages of other sequence numbers are skipped), handing each
    /// message's type and body to `on_reply` until it breaks with the result.
    fn read_replies<T>(
        &mut self,
        mut on_reply: impl FnMut(u16, &[u8]) -> ControlFlow<Result<T, RtnlError>>,
    ) -> Result<T, RtnlError> {
        loop {
            let size = self.socket.recv(&mut &mut self.buf[..], 0).map_err(RtnlError::Io)?;
            let mut offset = 0;
            while offset + 16 <= size {
                let message = &self.buf[offset..size];
                let length = u32::from_ne_bytes(message[0..4].try_into().expect("4 bytes")) as usize;
                let kind = u16::from_ne_bytes([message[4], message[5]]);
                let sequence = u32::from_ne_bytes(message[8..12].try_into().expect("4 bytes"));
                if length < 16 || length > message.len() {
                    return Err(RtnlError::Decode(format!("a netlink message of length {length} in {} bytes", message.len())));
                }
                offset += length.next_multiple_of(4);
                if sequence != self.sequence {
                    continue;
                }
                if let ControlFlow::Break(result) = on_reply(kind, &message[16..length]) {
                    return result;
                }
            }
        }
    }
}

/// The errno of an `NLMSG_ERROR` body (at least 4 bytes; 0 is an
/// acknowledgement), as a positive number.
fn error_code(body: &[u8]) -> i32 {
    i32::from_ne_bytes(body[0..4].try_into().expect("4 bytes")).abs()
}

/// The text of an extended acknowledgement: after the (capped) request
/// header come attributes, `NLMSGERR_ATTR_MSG` holding a C string.
fn extack_message(payload: &[u8]) -> Option<String> {
    const HEADER: usize = 16;
    let mut rest = payload.get(HEADER..)?;
    while rest.len() >= 4 {
        let length = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
        let kind = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
        if length < 4 || length > rest.len() {
            return None;
        }
        if kind == NLMSGERR_ATTR_MSG {
            let text = &rest[4..length];
            let text = text.split(|b| *b == 0).next().unwrap_or_default();
            let text = String::from_utf8_lossy(text)
                .trim()
                .trim_end_matches('.')
                .to_owned();
            return (!text.is_empty()).then_some(text);
        }
        rest = rest.get(length.next_multiple_of(4)..).unwrap_or_default();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nexthop_message_reads_back_as_written() {
        let gateway = std::net::Ipv4Addr::new(192, 168, 0, 2);
        let payload = nexthop_payload(
            libc::AF_INET as u8,
            157,
            RTNH_F_ONLINK,
            &[(NHA_ID, &7u32.to_ne_bytes()), (NHA_OIF, &3u32.to_ne_bytes()), (NHA_GATEWAY, &gateway.octets())],
        );
        assert_eq!(payload.len(), 8 + 3 * 8);
        assert_eq!(
            parse_nexthop(&payload),
            Some(Nexthop { id: 7, protocol: 157, gateway: Some(gateway), oif: Some(3), onlink: true })
        );
        assert_eq!(parse_nexthop(&payload[..8]), None, "no id");
    }

    #[test]
    fn a_groups_members_are_read() {
        let mut entries = Vec::new();
        for id in [0x4000_0001u32, 9] {
            entries.extend_from_slice(&id.to_ne_bytes());
            entries.extend_from_slice(&[1, 0, 0, 0]);
        }
        let payload = nexthop_payload(0, 0, 0, &[(NHA_ID, &8u32.to_ne_bytes()), (NHA_GROUP, &entries)]);
        assert_eq!(group_members(&payload), [0x4000_0001, 9]);
        let single = nexthop_payload(libc::AF_INET as u8, 157, 0, &[(NHA_ID, &7u32.to_ne_bytes())]);
        assert!(group_members(&single).is_empty());
    }

    #[test]
    fn extack_text_is_read_after_the_request_header() {
        let mut payload = vec![0u8; 16];
        let text = b"Nexthop has invalid gateway.\0";
        payload.extend_from_slice(&((4 + text.len()) as u16).to_ne_bytes());
        payload.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        payload.extend_from_slice(text);
        assert_eq!(
            extack_message(&payload).as_deref(),
            Some("Nexthop has invalid gateway")
        );
        assert_eq!(extack_message(&payload[..16]), None);
        let refused = Refused {
            errno: libc::EINVAL,
            message: Some("Nexthop has invalid gateway".into()),
        };
        assert!(
            refused
                .to_string()
                .starts_with("Nexthop has invalid gateway (Invalid argument"),
            "{refused}"
        );
    }
}
