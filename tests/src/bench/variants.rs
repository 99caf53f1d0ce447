//! What each variant is and what it sets up: the lab of [`crate::lab`]
//! built as flannel's backend, as real flanneld, or with our agent and its
//! flags; one lab per distinct setup, and the two ends each variant is
//! measured between.

use std::{cell::Cell, collections::BTreeMap};

use super::{Config, check_interrupted, measurement::Endpoints};
use crate::lab::{Lab, LabSpec, Underlay};

/// What is being compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Variant {
    /// iperf3 between the nodes' own underlay addresses, no BPF anywhere.
    Raw,
    /// flannel's host-gw backend: kernel routes, no BPF.
    KernelHostGw,
    /// flannel's vxlan backend: the kernel vxlan device `flannel.1`.
    KernelVxlan,
    /// Our VXLAN datapath with the agent's default flags (`--decap auto`,
    /// TC on the lab's veths; `--forward bpf`, the fast path).
    Vxlan,
    /// Our host-gw backend with the agent's default flags (`--decap auto`,
    /// TC hook; `--forward bpf`).
    HostGw,
    /// Design comparison: our VXLAN decapsulating at TC ingress.
    VxlanTc,
    /// Design comparison: our VXLAN decapsulating in generic XDP.
    VxlanXdpGeneric,
    /// Design comparison: our host-gw with the native XDP hook.
    HostGwXdp,
    /// Design comparison: our VXLAN, encapsulating in the pod-side fast
    /// path (`--forward bpf`) instead of at the underlay's egress.
    VxlanBpfForward,
    /// Design comparison: our host-gw with the pod-side fast path
    /// (`bpf_redirect_neigh`) instead of kernel routes.
    HostGwBpfForward,
    /// Design comparison: our VXLAN with the fast path and decapsulation at
    /// TC, so nothing is copied into veth's XDP ring (and nothing is GROed).
    VxlanTcBpfForward,
    /// Design comparison: our VXLAN decapsulating in native XDP, with the
    /// fast path (as by default): the `auto` choice on a NIC, measured on
    /// the lab's veths, where XDP copies every frame.
    VxlanXdp,
    /// flannel's vxlan backend run by real flanneld (etcd mode, the lab's
    /// etcd) instead of programmed by the lab: the check that
    /// [`Variant::KernelVxlan`]'s imitation measures what flannel users run.
    KernelVxlanFlanneld,
}

/// The variants of issue 6, in its order.
pub const DEFAULT_VARIANTS: [Variant; 5] =
    [Variant::Raw, Variant::KernelHostGw, Variant::KernelVxlan, Variant::Vxlan, Variant::HostGw];

/// Ratios are to this variant: what flannel users run today.
pub const BASELINE: Variant = Variant::KernelVxlan;

/// How a variant's lab is built. Variants with the same setup share a lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Setup {
    /// Both nodes programmed as flannel's backend does, no agent, no BPF.
    Flannel { backend: &'static str },
    /// Both nodes run real flanneld (vxlan, etcd mode), no agent, no BPF.
    Flanneld,
    /// Both nodes run our agent.
    Ours { backend: &'static str, decap: &'static str, forward: &'static str },
}

impl Variant {
    pub const ALL: [Self; 13] = [
        Self::Raw, Self::KernelHostGw, Self::KernelVxlan, Self::Vxlan, Self::HostGw,
        Self::VxlanTc, Self::VxlanXdpGeneric, Self::HostGwXdp, Self::VxlanBpfForward, Self::HostGwBpfForward,
        Self::VxlanTcBpfForward, Self::VxlanXdp, Self::KernelVxlanFlanneld,
    ];

    /// The name used on the command line and in results.json.
    pub fn key(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::KernelHostGw => "kernel-host-gw",
            Self::KernelVxlan => "kernel-vxlan",
            Self::Vxlan => "vxlan",
            Self::HostGw => "host-gw",
            Self::VxlanTc => "vxlan-tc",
            Self::VxlanXdpGeneric => "vxlan-xdp-generic",
            Self::HostGwXdp => "host-gw-xdp",
            Self::VxlanBpfForward => "vxlan-bpf-forward",
            Self::HostGwBpfForward => "host-gw-bpf-forward",
            Self::VxlanTcBpfForward => "vxlan-tc-bpf-forward",
            Self::VxlanXdp => "vxlan-xdp",
            Self::KernelVxlanFlanneld => "kernel-vxlan-flanneld",
        }
    }

    pub fn from_key(key: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.key() == key)
    }

    /// A short label for tables and the chart.
    pub fn label(self) -> &'static str {
        match self {
            Self::Raw => "raw underlay",
            Self::KernelHostGw => "kernel host-gw",
            Self::KernelVxlan => "kernel vxlan (flannel)",
            Self::Vxlan => "ours: VXLAN",
            Self::HostGw => "ours: host-gw",
            Self::VxlanTc => "ours: VXLAN, TC decap",
            Self::VxlanXdpGeneric => "ours: VXLAN, generic XDP",
            Self::HostGwXdp => "ours: host-gw, XDP hook",
            Self::VxlanBpfForward => "ours: VXLAN, BPF forward",
            Self::HostGwBpfForward => "ours: host-gw, BPF forward",
            Self::VxlanTcBpfForward => "ours: VXLAN, TC decap, BPF forward",
            Self::VxlanXdp => "ours: VXLAN, native XDP",
            Self::KernelVxlanFlanneld => "kernel vxlan (real flanneld)",
        }
    }

    /// What runs, for the report.
    pub fn description(self) -> &'static str {
        match self {
            Self::Raw => "node eth0 to node eth0 at the underlay MTU, no BPF attached: the ceiling",
            Self::KernelHostGw => "pod to pod over `<podCIDR> via <node IP>` kernel routes, as flannel's host-gw backend; no BPF",
            Self::KernelVxlan => "pod to pod over the kernel vxlan device `flannel.1`, programmed as flannel's vxlan backend does; no BPF",
            Self::Vxlan => "pod to pod, our agent with `--backend vxlan` and default flags (`--decap auto --forward bpf`)",
            Self::HostGw => "pod to pod, our agent with `--backend host-gw` and default flags (`--decap auto --forward bpf`)",
            Self::VxlanTc => "pod to pod, our agent with `--backend vxlan --decap tc`",
            Self::VxlanXdpGeneric => "pod to pod, our agent with `--backend vxlan --decap xdp-generic`",
            Self::HostGwXdp => "pod to pod, our agent with `--backend host-gw --decap xdp`",
            Self::VxlanBpfForward => "pod to pod, our agent with `--backend vxlan --decap auto --forward bpf`",
            Self::HostGwBpfForward => "pod to pod, our agent with `--backend host-gw --decap auto --forward bpf`",
            Self::VxlanTcBpfForward => "pod to pod, our agent with `--backend vxlan --decap tc --forward bpf`",
            Self::VxlanXdp => "pod to pod, our agent with `--backend vxlan --decap xdp` (and the default `--forward bpf`)",
            Self::KernelVxlanFlanneld => "pod to pod over the kernel vxlan device `flannel.1`, created and programmed by real flanneld v0.28.10 (etcd mode); no BPF",
        }
    }

    pub(super) fn setup(self) -> Setup {
        match self {
            // Node to node never touches the pod routes, so the raw
            // underlay shares the lab that has no BPF and no tunnel device.
            Self::Raw | Self::KernelHostGw => Setup::Flannel { backend: "host-gw" },
            Self::KernelVxlan => Setup::Flannel { backend: "vxlan" },
            Self::Vxlan => Setup::Ours { backend: "vxlan", decap: "auto", forward: "bpf" },
            Self::HostGw => Setup::Ours { backend: "host-gw", decap: "auto", forward: "bpf" },
            Self::VxlanTc => Setup::Ours { backend: "vxlan", decap: "tc", forward: "kernel" },
            Self::VxlanXdpGeneric => Setup::Ours { backend: "vxlan", decap: "xdp-generic", forward: "kernel" },
            Self::HostGwXdp => Setup::Ours { backend: "host-gw", decap: "xdp", forward: "kernel" },
            Self::VxlanBpfForward => Setup::Ours { backend: "vxlan", decap: "auto", forward: "bpf" },
            Self::HostGwBpfForward => Setup::Ours { backend: "host-gw", decap: "auto", forward: "bpf" },
            Self::VxlanTcBpfForward => Setup::Ours { backend: "vxlan", decap: "tc", forward: "bpf" },
            Self::VxlanXdp => Setup::Ours { backend: "vxlan", decap: "xdp", forward: "bpf" },
            Self::KernelVxlanFlanneld => Setup::Flanneld,
        }
    }
}

/// One lab per distinct (underlay, setup), all up for the whole run:
/// switching between variants costs nothing, so rounds can interleave them.
pub(crate) struct Labs {
    labs: Vec<((Underlay, Setup), Lab)>,
    /// Whether the kernel vxlan labs' `flannel.1` are up (see [`Labs::ready_for`]).
    kernel_tunnels_up: Cell<bool>,
}

impl Labs {
    pub(super) fn of(&self, underlay: Underlay, variant: Variant) -> &Lab {
        &self.labs.iter().find(|(k, _)| *k == (underlay, variant.setup())).expect("a lab per underlay and setup").1
    }

    /// Readies the labs for measuring `variant`: the kernel vxlan labs'
    /// `flannel.1` are up only while kernel vxlan itself is measured.
    /// Their UDP sockets make GRO look for a tunnel socket for every UDP
    /// packet on the machine, in every namespace, which a node running
    /// anything else would not do ([`Lab::set_flannel_vxlan_up`]). Brought
    /// up again, a lab must carry a ping both ways before it is measured.
    pub(super) fn ready_for(&self, variant: Variant) -> Result<(), String> {
        let up = variant == Variant::KernelVxlan;
        if self.kernel_tunnels_up.get() == up {
            return Ok(());
        }
        for ((underlay, setup), lab) in &self.labs {
            if *setup != Variant::KernelVxlan.setup() {
                continue;
            }
            lab.set_flannel_vxlan_up(up).map_err(|e| format!("kernel vxlan lab on the {} underlay: {e}", underlay.key()))?;
            let (a, b) = (&lab.nodes[0].pods[0], &lab.nodes[1].pods[0]);
            if up && !(Lab::ping(&a.ns, b.ip) && Lab::ping(&b.ns, a.ip)) {
                return Err(format!("kernel vxlan lab on the {} underlay: pods do not reach each other after flannel.1 came up again", underlay.key()));
            }
        }
        self.kernel_tunnels_up.set(up);
        Ok(())
    }
}

pub(super) fn start_labs(config: &Config) -> Result<Labs, String> {
    let mut keys: Vec<(Underlay, Setup)> =
        config.underlays.iter().flat_map(|&u| config.variants.iter().map(move |v| (u, v.setup()))).collect();
    keys.sort();
    keys.dedup();
    let mut labs = Vec::new();
    for (n, (underlay, setup)) in keys.iter().enumerate() {
        check_interrupted(config)?;
        eprintln!("bench: starting lab {}/{} ({} underlay, {setup:?})", n + 1, keys.len(), underlay.key());
        let lab = start_lab(*underlay, *setup, config, n)?;
        labs.push(((*underlay, *setup), lab));
    }
    Ok(Labs { labs, kernel_tunnels_up: Cell::new(true) })
}

/// Every (underlay, variant) measured, with its endpoints, underlay by
/// underlay in the order given.
pub(super) fn subjects(config: &Config, labs: &Labs) -> Vec<(Underlay, Variant, Endpoints)> {
    config
        .underlays
        .iter()
        .flat_map(|&u| config.variants.iter().map(move |&v| (u, v)))
        .map(|(u, v)| (u, v, endpoints(v, labs.of(u, v), config.cpu)))
        .collect()
}

fn start_lab(underlay: Underlay, setup: Setup, config: &Config, n: usize) -> Result<Lab, String> {
    let mut spec = LabSpec::new(config.agent.clone());
    spec.underlay = underlay;
    spec.nodes = 2;
    spec.pods_per_node = 1;
    spec.prefix = format!("{}-{n}", config.prefix);
    match setup {
        Setup::Flannel { backend } => {
            spec.flannel_nodes = 2;
            spec.flannel_backend = backend.to_owned();
        }
        Setup::Flanneld => {
            spec.flannel_nodes = 2;
            spec.real_flannel = true;
        }
        Setup::Ours { backend, decap, forward } => {
            spec.backend = backend.to_owned();
            spec.decap = decap.to_owned();
            spec.forward = forward.to_owned();
        }
    }
    Lab::start(spec).map_err(|e| format!("lab for {setup:?} on the {} underlay failed to start: {e}", underlay.key()))
}

fn endpoints(variant: Variant, lab: &Lab, cpu: Option<usize>) -> Endpoints {
    let (a, b) = (&lab.nodes[0], &lab.nodes[1]);
    if variant == Variant::Raw {
        Endpoints { client: a.ns.name().to_owned(), server: b.ns.name().to_owned(), server_ip: b.ip, cpu }
    } else {
        Endpoints { client: a.pods[0].ns.name().to_owned(), server: b.pods[0].ns.name().to_owned(), server_ip: b.pods[0].ip, cpu }
    }
}

/// The hook our agent on node 1 says it attached (`hook=...` in its log).
pub(super) fn attached_hook(lab: &Lab) -> Option<String> {
    let log = lab.agent_log(0);
    let line = log.lines().find(|l| l.contains("datapath attached"))?;
    let hook = line.split_whitespace().find_map(|w| w.strip_prefix("hook="))?;
    Some(hook.to_owned())
}

/// Our counters summed over both nodes (only the non-zero ones).
pub(super) fn datapath_counters(lab: &Lab) -> BTreeMap<String, u64> {
    let mut total = BTreeMap::new();
    for node in &lab.nodes {
        let Ok(maps) = overlay_agent::maps::DatapathMaps::open(&node.pin_root) else { continue };
        let Ok(counters) = maps.counters_total() else { continue };
        for &counter in overlay_common::Counter::ALL {
            *total.entry(format!("{}_packets", counter.name())).or_insert(0) += counters.packets(counter);
            *total.entry(format!("{}_bytes", counter.name())).or_insert(0) += counters.bytes(counter);
        }
        for (reason, packets) in counters.drops_by_reason() {
            *total.entry(format!("drop_{}", reason.name())).or_insert(0) += packets;
        }
        // Both of the fast path's halves, under the name the checks and
        // the results use.
        *total.entry("fastpath_packets".to_owned()).or_insert(0) +=
            counters.packets(overlay_common::Counter::FastpathOut) + counters.packets(overlay_common::Counter::FastpathIn);
    }
    total.retain(|_, v| *v > 0);
    total
}
