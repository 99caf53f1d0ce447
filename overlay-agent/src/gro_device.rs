//! The agent's GRO device: a veth pair in the node's namespace
//! (`ovl-gro0` ↔ `ovl-gro1`) through which the fast path delivers the TCP
//! segments it decapsulated at TC.
//!
//! Why: on an underlay that carries MTU-sized frames (a wire, VMs, NICs),
//! GRO on the node's interface cannot merge VXLAN for a port without a
//! socket, and TC decapsulation runs after it, so every 1450-byte segment
//! would go through the pod's stack alone. Redirected to `ovl-gro0`'s
//! egress instead, the segments are queued to `ovl-gro1`'s NAPI (veth has
//! one without XDP once GRO is on, since 5.13: "veth: allow enabling NAPI
//! even without XDP"), where `napi_gro_receive` merges them; the
//! `overlay_tc_gro` program at `ovl-gro1`'s TC ingress then hands each
//! merged packet to the pod with `bpf_redirect_peer`. No XDP is attached,
//! so veth copies nothing.
//!
//! veth queues to the peer's NAPI only what it may: with TSO on at the
//! sending end, only local sockets' packets go there
//! (`veth_skb_is_eligible_for_gro`), so TSO is off on `ovl-gro0`. The
//! datapath sends it only packets that are not GSO.
//!
//! The pair carries no address and never routes: the kernel sends it
//! nothing (IPv6 address generation is off), and `ovl-gro1` hands every
//! frame on or drops it at TC ingress, ahead of the IP layer (so
//! `rp_filter` and netfilter never see them there). Its alias marks it as
//! the agent's: the agent reuses a pair it made (a restart loses nothing),
//! removes it with `cleanup`, and never touches a device of that name it
//! did not make.

use std::{io, process::Command};

use aya::util::KernelVersion;

use tracing::{info, warn};

use crate::{
    datapath::{Datapath, DatapathError, DecapHook, LinkOutcome},
    desired::Backend,
    iface,
    report::WithCauses as _,
};

/// The sending end, in the node's namespace: the underlay's TC ingress
/// redirects decapsulated TCP segments to its egress.
pub const SEND_END: &str = "ovl-gro0";
/// The receiving end: GRO on, and `overlay_tc_gro` at its TC ingress.
pub const RECEIVE_END: &str = "ovl-gro1";
/// Both ends, in the order packets cross them.
pub const DEVICE_NAMES: [&str; 2] = [SEND_END, RECEIVE_END];
/// The alias marking both ends as the agent's (`ip link` shows it).
pub const ALIAS: &str = "overlay-agent: GRO for decapsulated pod traffic";
/// The MTU of both ends: what a veth allows, so no packet the fast path
/// delivers is too long for them (it checked the pod's MTU already).
const MTU: &str = "65535";

#[derive(Debug, thiserror::Error)]
pub enum GroDeviceError {
    #[error("Linux {found} has no GRO on a veth without XDP (5.13 and later have it)")]
    KernelTooOld { found: String },
    #[error("{name} exists but is not the agent's (its alias is not {ALIAS:?}); rename or delete it to let the agent create its GRO device")]
    NotOurs { name: &'static str },
    #[error("`ip {args}` failed: {stderr}")]
    Ip { args: String, stderr: String },
    #[error("running `ip {args}`")]
    Spawn {
        args: String,
        #[source]
        source: io::Error,
    },
    #[error("setting {feature} on {name}")]
    Feature {
        name: &'static str,
        feature: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{name} does not keep GRO on, so the veth has no NAPI to merge in")]
    GroOff { name: &'static str },
    #[error("{0} vanished while the agent set it up")]
    Vanished(&'static str),
    #[error("attaching the delivery program to {RECEIVE_END}")]
    Attach(#[source] DatapathError),
}

/// How the fast path hands decapsulated packets to local pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Every packet straight into the pod (`bpf_redirect_peer`).
    Direct,
    /// Lone TCP segments through the GRO device, whose sending end has
    /// this index; the rest straight into the pod.
    ThroughGro { send_ifindex: u32, outcome: LinkOutcome },
}

impl Delivery {
    /// The value of `Config::gro_ifindex`.
    pub fn config_ifindex(self) -> u32 {
        match self {
            Self::Direct => 0,
            Self::ThroughGro { send_ifindex, .. } => send_ifindex,
        }
    }
}

/// Picks the fast path's delivery, sets it up and says in the log which
/// it is. The GRO device serves when the fast path is on
/// (`fast_path`) and VXLAN is decapsulated at TC (after the underlay's
/// GRO); with XDP decapsulating, the underlay's own GRO merges the inner
/// TCP already. Where it cannot be set up, delivery is direct, as before
/// the GRO device existed.
pub fn settle(datapath: &mut Datapath, fast_path: bool, hook: DecapHook, backend: Backend) -> Delivery {
    if !(fast_path && hook == DecapHook::TcIngress && backend == Backend::Vxlan) {
        match remove(Some(datapath)) {
            Ok(true) => info!(device = SEND_END, "removed the GRO device, which this configuration does not use"),
            Ok(false) => {}
            Err(err) => warn!(error = %err.to_string_with_causes(), "cannot remove the GRO device"),
        }
        if fast_path {
            info!(?hook, "fast-path delivery: straight into the pod (bpf_redirect_peer); no GRO device with this decapsulation hook and backend");
        }
        return Delivery::Direct;
    }
    match set_up(datapath) {
        Ok(delivery) => {
            info!(devices = %DEVICE_NAMES.join(" -> "), ?delivery, "fast-path delivery: TCP segments decapsulated at TC go through the GRO device, which merges them, then into the pod; the rest straight into the pod");
            delivery
        }
        Err(err) => {
            warn!(error = %err.to_string_with_causes(), "cannot set up the GRO device; fast-path delivery: straight into the pod (bpf_redirect_peer), without GRO for tunnel traffic");
            Delivery::Direct
        }
    }
}

/// Sets up delivery through the GRO device: creates the pair (or reuses
/// the agent's own), sets its features, and attaches `overlay_tc_gro`.
/// On failure nothing the call created is left behind.
pub fn set_up(datapath: &mut Datapath) -> Result<Delivery, GroDeviceError> {
    let kernel = KernelVersion::current().ok();
    if kernel.is_some_and(|v| v < KernelVersion::new(5, 13, 0)) {
        return Err(GroDeviceError::KernelTooOld { found: kernel.map(|v| v.to_string()).unwrap_or_default() });
    }
    let existed = match ours()? {
        Some(true) => true,
        Some(false) => return Err(GroDeviceError::NotOurs { name: SEND_END }),
        None => {
            create()?;
            false
        }
    };
    let configured = configure().and_then(|send_ifindex| {
        let outcome = datapath.attach_gro_delivery(RECEIVE_END).map_err(GroDeviceError::Attach)?;
        Ok(Delivery::ThroughGro { send_ifindex, outcome })
    });
    if configured.is_err() && !existed {
        let _ = datapath.detach_gro_delivery(RECEIVE_END);
        let _ = ip(&["link", "del", SEND_END]);
    }
    configured
}

/// Removes the GRO device and its delivery's pins when the agent made it.
/// Returns whether there was one of ours to remove.
pub fn remove(datapath: Option<&mut Datapath>) -> Result<bool, GroDeviceError> {
    if let Some(datapath) = datapath {
        datapath.detach_gro_delivery(RECEIVE_END).map_err(GroDeviceError::Attach)?;
    }
    match ours()? {
        Some(true) => ip(&["link", "del", SEND_END]).map(|_| true),
        Some(false) => Err(GroDeviceError::NotOurs { name: SEND_END }),
        None => Ok(false),
    }
}

/// Whether the sending end exists (`None`: no) and carries our alias.
/// Both ends must: a pair of ours is made with the alias on both.
fn ours() -> Result<Option<bool>, GroDeviceError> {
    if iface::interface_index(SEND_END).is_none() {
        return Ok(None);
    }
    let alias = |name: &str| -> Result<Option<String>, GroDeviceError> {
        let out = ip(&["-j", "link", "show", "dev", name])?;
        let links: serde_json::Value = serde_json::from_slice(&out).unwrap_or_default();
        Ok(links.get(0).and_then(|l| l.get("ifalias")).and_then(|a| a.as_str()).map(str::to_owned))
    };
    let send = alias(SEND_END)?;
    let receive = if iface::interface_index(RECEIVE_END).is_some() { alias(RECEIVE_END)? } else { None };
    Ok(Some(send.as_deref() == Some(ALIAS) && receive.as_deref() == Some(ALIAS)))
}

/// Creates the pair and marks it ours (`ip link add` takes no alias), or
/// leaves nothing.
fn create() -> Result<(), GroDeviceError> {
    ip(&["link", "add", SEND_END, "mtu", MTU, "type", "veth", "peer", "name", RECEIVE_END, "mtu", MTU])?;
    let marked = DEVICE_NAMES.iter().try_for_each(|name| {
        ip(&["link", "set", "dev", name, "alias", ALIAS])?;
        // No IPv6 link-local address, so the kernel sends nothing through
        // the pair (best effort: a kernel without IPv6 refuses the mode).
        let _ = ip(&["link", "set", "dev", name, "addrgenmode", "none"]);
        Ok(())
    });
    if marked.is_err() {
        let _ = ip(&["link", "del", SEND_END]);
    }
    marked
}

/// Features and state; returns the sending end's index.
fn configure() -> Result<u32, GroDeviceError> {
    let feature = |name, feature, source| GroDeviceError::Feature { name, feature, source };
    // Only then does veth queue forwarded packets to the peer's NAPI.
    iface::set_ethtool_flag(SEND_END, iface::EthtoolFlag::Tso, false).map_err(|e| feature(SEND_END, "tso off", e))?;
    iface::set_ethtool_flag(RECEIVE_END, iface::EthtoolFlag::Gro, true).map_err(|e| feature(RECEIVE_END, "gro on", e))?;
    if !iface::ethtool_flag(RECEIVE_END, iface::EthtoolFlag::Gro).map_err(|e| feature(RECEIVE_END, "gro", e))? {
        return Err(GroDeviceError::GroOff { name: RECEIVE_END });
    }
    // The receiving end first: the sending end drops while its peer is down.
    ip(&["link", "set", "dev", RECEIVE_END, "up"])?;
    ip(&["link", "set", "dev", SEND_END, "up"])?;
    iface::interface_index(SEND_END).ok_or(GroDeviceError::Vanished(SEND_END))
}

fn ip(args: &[&str]) -> Result<Vec<u8>, GroDeviceError> {
    let joined = || args.join(" ");
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| GroDeviceError::Spawn { args: joined(), source })?;
    if !out.status.success() {
        return Err(GroDeviceError::Ip { args: joined(), stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned() });
    }
    Ok(out.stdout)
}
