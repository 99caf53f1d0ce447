//! Where decapsulation hooks in: the one place that decides it, before
//! anything is attached (a fallback after a failed attachment would race
//! the kernel's release of what it undid).

use aya::programs::XdpMode;

use crate::{datapath::DecapHook, desired::Backend};

/// What `--decap` asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecapRequest {
    /// The measured choice (docs/datapath.md).
    Auto,
    Xdp(XdpMode),
    Tc,
}

/// What is known about the interface before attaching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HookFacts<'a> {
    pub backend: Backend,
    /// The interface's driver (`ethtool -i`), when the kernel said.
    pub driver: Option<&'a str>,
    /// Another XDP program (not one in our own pinned link) is attached:
    /// XDP cannot attach beside it.
    pub xdp_taken: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HookError {
    #[error(
        "--decap xdp: another XDP program is attached to {iface} (another agent's --bpffs-root, or another tool); \
         detach it, or use --decap tc or --decap auto"
    )]
    XdpTaken { iface: String },
}

/// The decap hook, and why, for the log.
pub fn choose_decap_hook(request: DecapRequest, facts: HookFacts<'_>, iface: &str) -> Result<(DecapHook, &'static str), HookError> {
    Ok(match (request, facts.backend, facts.xdp_taken) {
        (DecapRequest::Tc, _, _) => (DecapHook::TcIngress, "asked for"),
        (DecapRequest::Xdp(_), _, true) => return Err(HookError::XdpTaken { iface: iface.to_owned() }),
        (DecapRequest::Xdp(mode), _, false) => (DecapHook::Xdp(mode), "asked for"),
        // Measured (docs/datapath.md): with host-gw, where no tunnel traffic
        // arrives, the lighter TC hook costs plain forwarding less.
        (DecapRequest::Auto, Backend::HostGw, _) => (DecapHook::TcIngress, "host-gw: TC costs plain forwarding least"),
        (DecapRequest::Auto, Backend::Vxlan, true) => (DecapHook::TcIngress, "another XDP program is attached to the interface"),
        // Measured (docs/benchmarks/profiles/): XDP on a veth turns GSO off
        // on its peer, so 64 KB frames are segmented before they reach us,
        // and copies every frame into a page of its own
        // (`skb_pp_cow_data`); TC takes GSO frames whole, without a copy.
        (DecapRequest::Auto, Backend::Vxlan, false) if facts.driver == Some("veth") => {
            (DecapHook::TcIngress, "vxlan on a veth underlay: XDP there would copy every frame and turn the peer's GSO off")
        }
        // On a NIC or virtio, native XDP decapsulates on the driver's own
        // buffers before GRO, so GRO aggregates the inner TCP.
        (DecapRequest::Auto, Backend::Vxlan, false) => {
            (DecapHook::Xdp(XdpMode::Default), "vxlan on a NIC: native XDP decapsulates before GRO")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_picks_per_driver() {
        let facts = |backend, driver| HookFacts { backend, driver, xdp_taken: false };
        let hook = |f| choose_decap_hook(DecapRequest::Auto, f, "eth0").map(|(h, _)| h);
        assert_eq!(hook(facts(Backend::Vxlan, Some("veth"))), Ok(DecapHook::TcIngress));
        assert_eq!(hook(facts(Backend::Vxlan, Some("virtio_net"))), Ok(DecapHook::Xdp(XdpMode::Default)));
        assert_eq!(hook(facts(Backend::Vxlan, Some("mlx5_core"))), Ok(DecapHook::Xdp(XdpMode::Default)));
        // Driver unknown: native XDP, where the kernel allows it.
        assert_eq!(hook(facts(Backend::Vxlan, None)), Ok(DecapHook::Xdp(XdpMode::Default)));
        for driver in [Some("veth"), Some("virtio_net"), None] {
            assert_eq!(hook(facts(Backend::HostGw, driver)), Ok(DecapHook::TcIngress));
        }
    }

    #[test]
    fn auto_avoids_a_taken_xdp_hook_and_an_explicit_request_is_refused() {
        let facts = |backend, xdp_taken| HookFacts { backend, driver: Some("ixgbe"), xdp_taken };
        let hook = |request, f| choose_decap_hook(request, f, "eth0").map(|(h, _)| h);
        assert_eq!(hook(DecapRequest::Auto, facts(Backend::Vxlan, false)), Ok(DecapHook::Xdp(XdpMode::Default)));
        assert_eq!(hook(DecapRequest::Auto, facts(Backend::Vxlan, true)), Ok(DecapHook::TcIngress));
        assert_eq!(hook(DecapRequest::Auto, facts(Backend::HostGw, false)), Ok(DecapHook::TcIngress));
        assert_eq!(hook(DecapRequest::Tc, facts(Backend::Vxlan, true)), Ok(DecapHook::TcIngress));
        assert!(matches!(hook(DecapRequest::Xdp(XdpMode::Skb), facts(Backend::Vxlan, true)), Err(HookError::XdpTaken { .. })));
    }
}
