//! Kernel routes toward remote pod CIDRs.
//!
//! - VXLAN peers: `<podCIDR> via <next hop> dev <underlay> onlink mtu
//!   <underlay − 50>`, the next hop being the node itself or the gateway
//!   toward it. The kernel resolves the next hop's MAC, the route MTU makes
//!   it do PMTU discovery for forwarded pod traffic, and our TC program
//!   finds the packet on the underlay's egress and encapsulates it.
//! - Direct peers (host-gw, DirectRouting): `<podCIDR> via <node IP> dev
//!   <underlay>`, forwarded by the kernel as is.
//! - Peers host-gw cannot reach: `unreachable <podCIDR>`, so senders get
//!   an ICMP error instead of a black hole.
//!
//! Our routes carry their own protocol number, so stale ones are found
//! after a restart.
//!
//! Routes are listed, looked up, added and removed over rtnetlink
//! ([`crate::rtnl`]), in the agent's network namespace: no process is
//! started. When to look the paths up again is for
//! [`crate::kernel_events`] to say.

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_REPLACE};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    route::{RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteMetric, RouteProtocol, RouteScope, RouteType},
};
use overlay_common::{ROUTE_MODE_DIRECT, ROUTE_MODE_UNREACHABLE};

use crate::{
    desired::{Paths, PeerState, UnderlayPath},
    rtnl::{Answer, Refused, Rtnl, RtnlError},
};

/// `proto` of the routes we own (`ip route show proto 157`).
pub const ROUTE_PROTO: &str = "157";
/// The same, as netlink carries it.
pub const ROUTE_PROTO_ID: u8 = 157;

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error(transparent)]
    Netlink(#[from] RtnlError),
    #[error("{request}: {reason}")]
    Refused { request: String, reason: Refused },
}

/// The `RTM_NEWROUTE` that adds or replaces the route toward `peer`'s pod
/// CIDR: what `ip route replace` sends for the routes in the module doc.
fn replace_message(peer: &PeerState, ifindex: u32, vxlan_mtu: u32) -> RouteMessage {
    let mut route = route_to(peer.pod_cidr);
    route.header.protocol = RouteProtocol::from(ROUTE_PROTO_ID);
    route.header.scope = RouteScope::Universe;
    match peer.mode {
        ROUTE_MODE_UNREACHABLE => route.header.kind = RouteType::Unreachable,
        ROUTE_MODE_DIRECT => {
            route.header.kind = RouteType::Unicast;
            route.attributes.push(RouteAttribute::Gateway(RouteAddress::Inet(peer.node_ip)));
            route.attributes.push(RouteAttribute::Oif(ifindex));
        }
        _ => {
            route.header.kind = RouteType::Unicast;
            route.header.flags = RouteFlags::Onlink;
            route.attributes.push(RouteAttribute::Gateway(RouteAddress::Inet(peer.next_hop)));
            route.attributes.push(RouteAttribute::Oif(ifindex));
            route.attributes.push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(vxlan_mtu)]));
        }
    }
    route
}

/// A main-table IPv4 route message for `cidr`, to be filled in.
fn route_to(cidr: Ipv4Network) -> RouteMessage {
    let mut route = RouteMessage::default();
    route.header.address_family = AddressFamily::Inet;
    route.header.destination_prefix_length = cidr.prefix();
    route.header.table = RouteHeader::RT_TABLE_MAIN;
    route.attributes.push(RouteAttribute::Destination(RouteAddress::Inet(cidr.network())));
    route
}

/// Adds or replaces the routes toward `peers` over one netlink socket, one
/// request each, so a single change costs no process and thousands cost
/// one socket. Returns the peers whose route the kernel refused, with its
/// reason; the others are in place.
pub fn replace_all<'a>(
    peers: &'a [PeerState],
    iface: &str,
    vxlan_mtu: u32,
) -> Result<Vec<(&'a PeerState, Refused)>, RouteError> {
    if peers.is_empty() {
        return Ok(Vec::new());
    }
    let Some(ifindex) = crate::iface::interface_index(iface) else {
        let refused = Refused { errno: libc::ENODEV, message: Some(format!("Cannot find device {iface:?}")) };
        return Ok(peers.iter().map(|p| (p, refused.clone())).collect());
    };
    let mut rtnl = Rtnl::open()?;
    let mut failed = Vec::new();
    for peer in peers {
        let message = RouteNetlinkMessage::NewRoute(replace_message(peer, ifindex, vxlan_mtu));
        if let Answer::Refused(refused) = rtnl.change(message, NLM_F_CREATE | NLM_F_REPLACE)? {
            failed.push((peer, refused));
        }
    }
    Ok(failed)
}

/// Removes our routes to `cidrs` (as `ip route del CIDR proto 157`); a
/// missing route is not an error. Returns the CIDRs whose route could not
/// be removed.
pub fn remove_all(cidrs: &[Ipv4Network]) -> Result<Vec<(Ipv4Network, Refused)>, RouteError> {
    if cidrs.is_empty() {
        return Ok(Vec::new());
    }
    let mut rtnl = Rtnl::open()?;
    let mut failed = Vec::new();
    for cidr in cidrs {
        let mut route = route_to(*cidr);
        route.header.protocol = RouteProtocol::from(ROUTE_PROTO_ID);
        // Any scope and type: only the destination and our protocol match.
        route.header.scope = RouteScope::NoWhere;
        route.header.kind = RouteType::Unspec;
        match rtnl.change(RouteNetlinkMessage::DelRoute(route), 0)? {
            Answer::Refused(refused) if refused.errno != libc::ESRCH => failed.push((*cidr, refused)),
            _ => {}
        }
    }
    Ok(failed)
}

/// How the kernel reaches each address, as `ip route get` answers it: one
/// `RTM_GETROUTE` each over one netlink socket. A route with a gateway is
/// [`UnderlayPath::Gateway`] whatever its device; one without, out of
/// `iface`, is [`UnderlayPath::OnLink`]; anything else (no route, another
/// device, a local address) is [`UnderlayPath::NoRoute`].
pub fn paths(iface: &str, addrs: &[Ipv4Addr]) -> Result<Paths, RouteError> {
    let mut paths = Paths::new();
    if addrs.is_empty() {
        return Ok(paths);
    }
    let ifindex = crate::iface::interface_index(iface);
    let mut rtnl = Rtnl::open()?;
    for addr in addrs {
        let mut query = route_to(Ipv4Network::from(*addr));
        query.header.table = RouteHeader::RT_TABLE_UNSPEC;
        let path = match rtnl.get_route(query)? {
            Answer::Route(route) => path_of(&route, ifindex),
            Answer::Done | Answer::Refused(_) => UnderlayPath::NoRoute,
        };
        paths.insert(*addr, path);
    }
    Ok(paths)
}

/// The path a route the kernel answered describes (see [`paths`]).
fn path_of(route: &RouteMessage, ifindex: Option<u32>) -> UnderlayPath {
    let gateway = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(RouteAddress::Inet(gw)) => Some(*gw),
        _ => None,
    });
    let oif = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(index) => Some(*index),
        _ => None,
    });
    match (gateway, oif) {
        (Some(gw), _) => UnderlayPath::Gateway(gw),
        (None, Some(oif)) if Some(oif) == ifindex => UnderlayPath::OnLink,
        _ => UnderlayPath::NoRoute,
    }
}

/// Destinations of every route we own: the main table's IPv4 routes of
/// our protocol (as `ip route show proto 157`).
pub fn owned() -> Result<Vec<Ipv4Network>, RouteError> {
    let routes = Rtnl::open()?.routes()?;
    Ok(routes.iter().filter(|route| is_ours_in_main(route)).filter_map(destination).collect())
}

fn is_ours_in_main(route: &RouteMessage) -> bool {
    let table = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Table(table) => Some(*table),
        _ => None,
    });
    route.header.protocol == RouteProtocol::from(ROUTE_PROTO_ID)
        && table.unwrap_or(u32::from(route.header.table)) == u32::from(RouteHeader::RT_TABLE_MAIN)
}

/// The destination of an IPv4 route (`0.0.0.0/0` when it carries none).
fn destination(route: &RouteMessage) -> Option<Ipv4Network> {
    let address = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(address)) => Some(*address),
        _ => None,
    });
    Ipv4Network::new(address.unwrap_or(Ipv4Addr::UNSPECIFIED), route.header.destination_prefix_length).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_answers_a_route_look_up_over_netlink() {
        // Read-only, in whatever namespace the test runs: loopback is
        // reached out of lo with no gateway.
        let lo = paths("lo", &[Ipv4Addr::LOCALHOST]).unwrap();
        assert_eq!(lo[&Ipv4Addr::LOCALHOST], UnderlayPath::OnLink);
        assert_eq!(paths("eth-none", &[Ipv4Addr::LOCALHOST]).unwrap()[&Ipv4Addr::LOCALHOST], UnderlayPath::NoRoute);
    }

    #[test]
    fn ours_are_the_main_tables_routes_of_our_protocol() {
        let route = |protocol: u8, table: u8, extended_table: Option<u32>| {
            let mut route = route_to("10.244.2.0/24".parse().unwrap());
            route.header.protocol = RouteProtocol::from(protocol);
            route.header.table = table;
            if let Some(table) = extended_table {
                route.attributes.push(RouteAttribute::Table(table));
            }
            route
        };
        assert!(is_ours_in_main(&route(157, 254, None)));
        assert!(is_ours_in_main(&route(157, 254, Some(254))));
        assert!(!is_ours_in_main(&route(157, 255, None)), "local table");
        assert!(!is_ours_in_main(&route(157, 252, Some(1000))), "a table past 255");
        assert!(!is_ours_in_main(&route(4, 254, None)), "another protocol");
        assert_eq!(destination(&route(157, 254, None)), Some("10.244.2.0/24".parse().unwrap()));
        let mut default = RouteMessage::default();
        default.header.address_family = AddressFamily::Inet;
        assert_eq!(destination(&default), Some("0.0.0.0/0".parse().unwrap()));
    }

    #[test]
    fn the_kernel_lists_routes_over_netlink() {
        // Read-only, in whatever namespace the test runs: none of ours
        // outside a lab's namespaces, and the listing itself succeeds.
        let routes = Rtnl::open().unwrap().routes().unwrap();
        assert!(routes.iter().all(|r| r.header.address_family == AddressFamily::Inet));
        assert!(routes.iter().any(|r| r.header.table == 255), "the local table lists loopback");
        owned().unwrap();
    }

    #[test]
    fn the_protocol_number_and_its_text_agree() {
        assert_eq!(ROUTE_PROTO, ROUTE_PROTO_ID.to_string());
    }

    #[test]
    fn a_route_with_a_gateway_is_routed_and_one_without_is_on_link_only_out_of_the_underlay() {
        let answer = |attributes: Vec<RouteAttribute>| {
            let mut route = RouteMessage::default();
            route.attributes = attributes;
            route
        };
        let gw = Ipv4Addr::new(192, 168, 0, 254);
        let via = answer(vec![
            RouteAttribute::Gateway(RouteAddress::Inet(gw)),
            RouteAttribute::Oif(9),
        ]);
        assert_eq!(path_of(&via, Some(2)), UnderlayPath::Gateway(gw));
        assert_eq!(
            path_of(&answer(vec![RouteAttribute::Oif(2)]), Some(2)),
            UnderlayPath::OnLink
        );
        assert_eq!(
            path_of(&answer(vec![RouteAttribute::Oif(1)]), Some(2)),
            UnderlayPath::NoRoute
        );
        assert_eq!(
            path_of(&answer(vec![RouteAttribute::Oif(2)]), None),
            UnderlayPath::NoRoute
        );
    }

    #[test]
    fn each_mode_gets_the_route_ip_would_send() {
        let peer = |mode| PeerState {
            pod_cidr: "10.244.2.0/24".parse().unwrap(),
            node_ip: Ipv4Addr::new(192, 168, 0, 2),
            vtep_mac: [0; 6],
            mode,
            reason: 0,
            next_hop: Ipv4Addr::new(192, 168, 0, 254),
        };
        let vxlan = replace_message(&peer(overlay_common::ROUTE_MODE_VXLAN), 2, 1450);
        assert_eq!(vxlan.header.destination_prefix_length, 24);
        assert_eq!(vxlan.header.protocol, RouteProtocol::from(157));
        assert_eq!(vxlan.header.kind, RouteType::Unicast);
        assert_eq!(vxlan.header.flags, RouteFlags::Onlink);
        assert!(
            vxlan
                .attributes
                .contains(&RouteAttribute::Gateway(RouteAddress::Inet(Ipv4Addr::new(
                    192, 168, 0, 254
                ))))
        );
        assert!(
            vxlan
                .attributes
                .contains(&RouteAttribute::Metrics(vec![RouteMetric::Mtu(1450)]))
        );
        let direct = replace_message(&peer(ROUTE_MODE_DIRECT), 2, 1450);
        assert_eq!(direct.header.flags, RouteFlags::empty());
        assert!(
            direct
                .attributes
                .contains(&RouteAttribute::Gateway(RouteAddress::Inet(Ipv4Addr::new(
                    192, 168, 0, 2
                ))))
        );
        assert!(direct.attributes.contains(&RouteAttribute::Oif(2)));
        assert!(
            !direct
                .attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Metrics(_)))
        );
        let unreachable = replace_message(&peer(ROUTE_MODE_UNREACHABLE), 2, 1450);
        assert_eq!(unreachable.header.kind, RouteType::Unreachable);
        assert_eq!(
            unreachable.attributes,
            [RouteAttribute::Destination(RouteAddress::Inet(
                Ipv4Addr::new(10, 244, 2, 0)
            ))]
        );
    }
}
