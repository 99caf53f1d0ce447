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
//! Uses `ip` (iproute2) for now; it runs in the agent's network namespace.

use std::{
    collections::BTreeMap,
    io::Write as _,
    net::Ipv4Addr,
    process::{Command, Stdio},
};

use ipnetwork::Ipv4Network;
use overlay_common::{ROUTE_MODE_DIRECT, ROUTE_MODE_UNREACHABLE};

use crate::desired::{PeerState, UnderlayPath};

/// `proto` of the routes we own (`ip route show proto 157`).
pub const ROUTE_PROTO: &str = "157";

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
    #[error("running ip (iproute2 must be installed): {0}")]
    Spawn(std::io::Error),
}

fn ip(args: &[&str]) -> Result<String, RouteError> {
    let out = Command::new("ip").args(args).output().map_err(RouteError::Spawn)?;
    if !out.status.success() {
        return Err(RouteError::Ip {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Adds or replaces the route toward `peer`'s pod CIDR.
pub fn replace(peer: &PeerState, iface: &str, vxlan_mtu: u32) -> Result<(), RouteError> {
    let cidr = peer.pod_cidr.to_string();
    let next_hop = peer.next_hop.to_string();
    let node_ip = peer.node_ip.to_string();
    let mtu = vxlan_mtu.to_string();
    let args: Vec<&str> = match peer.mode {
        ROUTE_MODE_UNREACHABLE => vec!["route", "replace", "unreachable", &cidr, "proto", ROUTE_PROTO],
        ROUTE_MODE_DIRECT => vec!["route", "replace", &cidr, "via", &node_ip, "dev", iface, "proto", ROUTE_PROTO],
        _ => vec![
            "route", "replace", &cidr, "via", &next_hop, "dev", iface, "onlink", "mtu", &mtu, "proto", ROUTE_PROTO,
        ],
    };
    ip(&args).map(drop)
}

/// How the kernel reaches each address (`ip route get`, one batch).
pub fn paths(iface: &str, addrs: &[Ipv4Addr]) -> Result<BTreeMap<Ipv4Addr, UnderlayPath>, RouteError> {
    let mut paths: BTreeMap<Ipv4Addr, UnderlayPath> = addrs.iter().map(|a| (*a, UnderlayPath::NoRoute)).collect();
    if addrs.is_empty() {
        return Ok(paths);
    }
    let mut child = Command::new("ip")
        .args(["-j", "-force", "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(RouteError::Spawn)?;
    let script: String = addrs.iter().map(|a| format!("route get {a}\n")).collect();
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(script.as_bytes())
        .map_err(RouteError::Spawn)?;
    // A failed lookup (no route) prints nothing for its line; -force goes on.
    let out = child.wait_with_output().map_err(RouteError::Spawn)?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(answers) = serde_json::from_str::<Vec<serde_json::Value>>(line) else {
            continue;
        };
        for answer in answers {
            let Some(dst) = answer.get("dst").and_then(|d| d.as_str()?.parse::<Ipv4Addr>().ok()) else {
                continue;
            };
            let gateway = answer.get("gateway").and_then(|g| g.as_str()?.parse::<Ipv4Addr>().ok());
            let dev = answer.get("dev").and_then(|d| d.as_str());
            let path = match (gateway, dev) {
                (Some(gw), _) => UnderlayPath::Gateway(gw),
                (None, Some(dev)) if dev == iface => UnderlayPath::OnLink,
                _ => UnderlayPath::NoRoute,
            };
            paths.insert(dst, path);
        }
    }
    Ok(paths)
}

/// Removes our route to `cidr`; a missing route is not an error.
pub fn remove(cidr: Ipv4Network) -> Result<(), RouteError> {
    match ip(&["route", "del", &cidr.to_string(), "proto", ROUTE_PROTO]) {
        Ok(_) => Ok(()),
        Err(RouteError::Ip { stderr, .. }) if stderr.contains("No such process") => Ok(()),
        Err(e) => Err(e),
    }
}

/// Destinations of every route we own.
pub fn owned() -> Result<Vec<Ipv4Network>, RouteError> {
    let text = ip(&["-j", "route", "show", "proto", ROUTE_PROTO])?;
    let routes: Vec<serde_json::Value> = serde_json::from_str(text.trim()).unwrap_or_default();
    Ok(routes
        .iter()
        .filter_map(|r| r.get("dst")?.as_str()?.parse::<Ipv4Network>().ok())
        .collect())
}

/// Removes every route we own (`overlay-agent cleanup`); returns how many
/// there were.
pub fn remove_owned() -> Result<usize, RouteError> {
    let count = owned()?.len();
    if count > 0 {
        ip(&["route", "flush", "proto", ROUTE_PROTO])?;
    }
    Ok(count)
}
