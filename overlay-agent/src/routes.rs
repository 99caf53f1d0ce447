//! Kernel routes toward remote pod CIDRs.
//!
//! `<podCIDR> via <node IP> dev <underlay> onlink mtu <underlay − 50>`:
//! the kernel resolves the peer's MAC, the route MTU makes the kernel do
//! PMTU discovery for forwarded pod traffic, and our TC program finds the
//! packet on the underlay's egress and encapsulates it. Our routes carry
//! their own protocol number, so stale ones are found after a restart.
//!
//! Uses `ip` (iproute2) for now; it runs in the agent's network namespace.

use std::{net::Ipv4Addr, process::Command};

use ipnetwork::Ipv4Network;

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

/// Adds or replaces the route to `cidr`.
pub fn replace(cidr: Ipv4Network, via: Ipv4Addr, iface: &str, mtu: u32) -> Result<(), RouteError> {
    ip(&[
        "route", "replace", &cidr.to_string(), "via", &via.to_string(), "dev", iface, "onlink",
        "mtu", &mtu.to_string(), "proto", ROUTE_PROTO,
    ])
    .map(drop)
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
