//! Requests to the kernel over rtnetlink, one at a time on a synchronous
//! socket: what `ip route get|replace|del`, `ip link show`, `ip route show`
//! and `bridge fdb show` send, without starting a process. Messages are built and parsed by
//! `netlink-packet-route`; the socket is `netlink-sys`.

use std::io;

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
        let mut query = RouteMessage::default();
        query.header.address_family = AddressFamily::Inet;
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
