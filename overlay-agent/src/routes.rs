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

/// The `ip` command (without the leading `ip`) that adds or replaces the
/// route toward `peer`'s pod CIDR.
fn replace_command(peer: &PeerState, iface: &str, vxlan_mtu: u32) -> String {
    let cidr = peer.pod_cidr;
    match peer.mode {
        ROUTE_MODE_UNREACHABLE => format!("route replace unreachable {cidr} proto {ROUTE_PROTO}"),
        ROUTE_MODE_DIRECT => format!("route replace {cidr} via {} dev {iface} proto {ROUTE_PROTO}", peer.node_ip),
        _ => format!(
            "route replace {cidr} via {} dev {iface} onlink mtu {vxlan_mtu} proto {ROUTE_PROTO}",
            peer.next_hop
        ),
    }
}

/// Adds or replaces the routes toward `peers` in one `ip -batch`, so
/// thousands of nodes cost one process, not thousands. Returns the peers
/// whose route failed, with iproute2's reason; the others are in place.
pub fn replace_all<'a>(
    peers: &'a [PeerState],
    iface: &str,
    vxlan_mtu: u32,
) -> Result<Vec<(&'a PeerState, String)>, RouteError> {
    let commands: Vec<String> = peers.iter().map(|p| replace_command(p, iface, vxlan_mtu)).collect();
    let failed = batch(&commands)?;
    Ok(failed.into_iter().map(|(line, reason)| (&peers[line], reason)).collect())
}

/// Removes our routes to `cidrs` in one `ip -batch`; a missing route is not
/// an error. Returns the CIDRs whose route could not be removed.
pub fn remove_all(cidrs: &[Ipv4Network]) -> Result<Vec<(Ipv4Network, String)>, RouteError> {
    let commands: Vec<String> = cidrs.iter().map(|c| format!("route del {c} proto {ROUTE_PROTO}")).collect();
    let failed = batch(&commands)?;
    Ok(failed
        .into_iter()
        .filter(|(_, reason)| !reason.contains("No such process"))
        .map(|(line, reason)| (cidrs[line], reason))
        .collect())
}

/// Runs `commands` through `ip -force -batch -` and returns the indices of
/// the commands that failed, with their error text.
fn batch(commands: &[String]) -> Result<Vec<(usize, String)>, RouteError> {
    if commands.is_empty() {
        return Ok(Vec::new());
    }
    let script: String = commands.iter().map(|c| format!("{c}\n")).collect();
    let out = ip_batch(&["-force", "-batch", "-"], script)?;
    Ok(batch_failures(&String::from_utf8_lossy(&out.stderr), commands.len()))
}

/// Runs `ip <args>` with `script` on its stdin, collecting its output.
/// stdin is fed from another thread: with thousands of lines, `ip` fills
/// its output pipe before it has read all its input, and a writer that
/// waits for the input to drain first would deadlock with it.
fn ip_batch(args: &[&str], script: String) -> Result<std::process::Output, RouteError> {
    let mut child = Command::new("ip")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(RouteError::Spawn)?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let writer = std::thread::spawn(move || stdin.write_all(script.as_bytes()));
    let out = child.wait_with_output().map_err(RouteError::Spawn)?;
    writer.join().expect("the stdin writer does not panic").map_err(RouteError::Spawn)?;
    Ok(out)
}

/// Parses iproute2's `-force -batch` stderr: each failure's message lines
/// are followed by `Command failed -:<line>`.
fn batch_failures(stderr: &str, commands: usize) -> Vec<(usize, String)> {
    let mut failures = Vec::new();
    let mut message: Vec<&str> = Vec::new();
    for line in stderr.lines() {
        if let Some(number) = line.strip_prefix("Command failed -:") {
            if let Ok(n) = number.trim().parse::<usize>()
                && (1..=commands).contains(&n)
            {
                failures.push((n - 1, message.join(" ")));
            }
            message.clear();
        } else {
            message.push(line.trim());
        }
    }
    failures
}

/// How the kernel reaches each address (`ip route get`, one batch).
pub fn paths(iface: &str, addrs: &[Ipv4Addr]) -> Result<BTreeMap<Ipv4Addr, UnderlayPath>, RouteError> {
    let mut paths: BTreeMap<Ipv4Addr, UnderlayPath> = addrs.iter().map(|a| (*a, UnderlayPath::NoRoute)).collect();
    if addrs.is_empty() {
        return Ok(paths);
    }
    let script: String = addrs.iter().map(|a| format!("route get {a}\n")).collect();
    // A failed lookup (no route) prints nothing for its line; -force goes on.
    let out = ip_batch(&["-j", "-force", "-batch", "-"], script)?;
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

/// Destinations of every route we own.
pub fn owned() -> Result<Vec<Ipv4Network>, RouteError> {
    let text = ip(&["-j", "route", "show", "proto", ROUTE_PROTO])?;
    let routes: Vec<serde_json::Value> = serde_json::from_str(text.trim()).unwrap_or_default();
    Ok(routes
        .iter()
        .filter_map(|r| r.get("dst")?.as_str()?.parse::<Ipv4Network>().ok())
        .collect())
}

/// A digest of what decides the kernel's paths to the nodes: IPv4
/// addresses, policy rules and routes (ours excluded, since every apply
/// changes them). Cheap to take every second; the full per-node `route get`
/// batch runs only when it changes.
pub fn underlay_fingerprint() -> Result<u64, RouteError> {
    use std::hash::{Hash as _, Hasher as _};
    let out = ip_batch(&["-4", "-batch", "-"], "addr show\nrule show\nroute show table all\n".to_owned())?;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // Our own routes, and counters that move without meaning anything.
        if !line.contains(&format!("proto {ROUTE_PROTO}")) && !line.contains("valid_lft") {
            line.hash(&mut hasher);
        }
    }
    Ok(hasher.finish())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_failures_are_matched_to_their_commands() {
        let stderr = "Error: Nexthop has invalid gateway.\nCommand failed -:2\nRTNETLINK answers: No such process\nCommand failed -:4\n";
        assert_eq!(
            batch_failures(stderr, 4),
            [(1, "Error: Nexthop has invalid gateway.".to_owned()), (3, "RTNETLINK answers: No such process".to_owned())]
        );
        assert!(batch_failures("", 3).is_empty());
    }
}
