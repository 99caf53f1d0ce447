//! The benchmark behind `cargo xtask bench`: every variant of pod
//! networking built side by side in the lab of [`crate::lab`], measured
//! interleaved so that a shared, noisy machine drifts under all of them
//! alike, and reported as medians, spreads and ratios to flannel's kernel
//! vxlan device.
//!
//! - [`run`] builds one lab per distinct setup (kept up for the whole run)
//!   and measures round after round: in each round every test runs once per
//!   variant, with the variant order rotated by one from round to round.
//! - [`Report`] is what a run produced; it is written as JSON, and the
//!   markdown table ([`render_markdown`]) and the SVG chart
//!   ([`render_svg`]) are derived from it alone, so they can be regenerated
//!   from `results.json`.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

pub mod profile;

use crate::lab::{ChildGuard, Lab, LabSpec, POD_MTU, UNDERLAY_MTU, Underlay};

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
enum Setup {
    /// Both nodes programmed as flannel's backend does, no agent, no BPF.
    Flannel { backend: &'static str },
    /// Both nodes run real flanneld (vxlan, etcd mode), no agent, no BPF.
    Flanneld,
    /// Both nodes run our agent.
    Ours { backend: &'static str, decap: &'static str, forward: &'static str },
}

impl Variant {
    pub const ALL: [Self; 12] = [
        Self::Raw, Self::KernelHostGw, Self::KernelVxlan, Self::Vxlan, Self::HostGw,
        Self::VxlanTc, Self::VxlanXdpGeneric, Self::HostGwXdp, Self::VxlanBpfForward, Self::HostGwBpfForward,
        Self::VxlanTcBpfForward, Self::KernelVxlanFlanneld,
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
            Self::KernelVxlanFlanneld => "pod to pod over the kernel vxlan device `flannel.1`, created and programmed by real flanneld v0.28.10 (etcd mode); no BPF",
        }
    }

    fn setup(self) -> Setup {
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
            Self::KernelVxlanFlanneld => Setup::Flanneld,
        }
    }
}

/// Whether more or less of a metric is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

/// One reported figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    Tcp1,
    Tcp4,
    UdpRttP50,
    UdpRttP99,
    TcpRttP50,
    TcpRttP99,
    Udp64Rate,
    CpuPerGbit,
    CpuPerPacket,
}

impl Metric {
    pub const ALL: [Self; 9] = [
        Self::Tcp1, Self::Tcp4, Self::Udp64Rate, Self::UdpRttP50, Self::UdpRttP99,
        Self::TcpRttP50, Self::TcpRttP99, Self::CpuPerGbit, Self::CpuPerPacket,
    ];

    pub fn key(self) -> &'static str {
        match self {
            Self::Tcp1 => "tcp_1_gbps",
            Self::Tcp4 => "tcp_4_gbps",
            Self::UdpRttP50 => "udp_rtt_p50_us",
            Self::UdpRttP99 => "udp_rtt_p99_us",
            Self::TcpRttP50 => "tcp_rtt_p50_us",
            Self::TcpRttP99 => "tcp_rtt_p99_us",
            Self::Udp64Rate => "udp64_kpps",
            Self::CpuPerGbit => "cpu_ms_per_gbit",
            Self::CpuPerPacket => "cpu_us_per_packet",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Tcp1 => "TCP throughput, 1 stream",
            Self::Tcp4 => "TCP throughput, 4 streams",
            Self::UdpRttP50 => "UDP ping-pong round trip, median",
            Self::UdpRttP99 => "UDP ping-pong round trip, p99",
            Self::TcpRttP50 => "TCP ping-pong round trip, median",
            Self::TcpRttP99 => "TCP ping-pong round trip, p99",
            Self::Udp64Rate => "64-byte UDP packets received",
            Self::CpuPerGbit => "CPU per Gbit (TCP, 1 stream)",
            Self::CpuPerPacket => "CPU per packet (64-byte UDP)",
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Self::Tcp1 | Self::Tcp4 => "Gbit/s",
            Self::UdpRttP50 | Self::UdpRttP99 | Self::TcpRttP50 | Self::TcpRttP99 => "µs",
            Self::Udp64Rate => "kpps",
            Self::CpuPerGbit => "CPU-ms/Gbit",
            Self::CpuPerPacket => "CPU-µs/pkt",
        }
    }

    pub fn better(self) -> Better {
        match self {
            Self::Tcp1 | Self::Tcp4 | Self::Udp64Rate => Better::Higher,
            _ => Better::Lower,
        }
    }

    /// Formats a value with as many decimals as its size deserves.
    pub fn format(self, value: f64) -> String {
        let decimals = match value.abs() {
            v if v >= 100.0 => 0,
            v if v >= 10.0 => 1,
            _ => 2,
        };
        format!("{value:.decimals$}")
    }
}

/// One program run that yields one or more metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Test {
    Tcp1,
    Tcp4,
    UdpPingPong,
    TcpPingPong,
    Udp64,
}

impl Test {
    const ALL: [Self; 5] = [Self::Tcp1, Self::Tcp4, Self::UdpPingPong, Self::TcpPingPong, Self::Udp64];

    fn key(self) -> &'static str {
        match self {
            Self::Tcp1 => "tcp1",
            Self::Tcp4 => "tcp4",
            Self::UdpPingPong => "udp-pp",
            Self::TcpPingPong => "tcp-pp",
            Self::Udp64 => "udp64",
        }
    }
}

/// CPU time spent, from /proc/stat: one CPU's line, or the summary line of
/// all CPUs (seconds summed over them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuTimes {
    pub user: f64,
    pub system: f64,
    pub softirq: f64,
    pub irq: f64,
}

impl CpuTimes {
    pub fn now(cpu: Option<usize>) -> Result<Self, String> {
        let text = std::fs::read_to_string("/proc/stat").map_err(|e| format!("reading /proc/stat: {e}"))?;
        let name = cpu.map_or_else(|| "cpu".to_owned(), |n| format!("cpu{n}"));
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name.as_str()))
            .ok_or_else(|| format!("/proc/stat has no `{name}` line"))?;
        let fields: Vec<f64> = line.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
        if fields.len() < 7 {
            return Err(format!("/proc/stat: `{name}` has too few fields: {line:?}"));
        }
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        Ok(Self {
            user: (fields[0] + fields[1]) / hz,
            system: fields[2] / hz,
            irq: fields[5] / hz,
            softirq: fields[6] / hz,
        })
    }

    fn since(self, earlier: Self) -> Self {
        Self {
            user: self.user - earlier.user,
            system: self.system - earlier.system,
            softirq: self.softirq - earlier.softirq,
            irq: self.irq - earlier.irq,
        }
    }

    /// The kernel's share: what the packets cost.
    pub fn kernel(&self) -> f64 {
        self.system + self.softirq + self.irq
    }
}

fn wire_key() -> String {
    Underlay::Wire.key().to_owned()
}

/// One test of one variant in one round.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub round: usize,
    /// The underlay's key ([`Underlay::key`]); reports from before there
    /// were two underlays measured the wire-like one.
    #[serde(default = "wire_key")]
    pub underlay: String,
    pub variant: String,
    pub test: String,
    /// Metric key → value.
    pub values: BTreeMap<String, f64>,
    /// Side figures that are not compared (retransmits, packets sent, ...).
    #[serde(default)]
    pub extra: BTreeMap<String, f64>,
    /// CPU the machine spent while the client ran.
    pub cpu: CpuTimes,
    /// How long the client ran, seconds.
    pub wall: f64,
}

/// A variant as it ran.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VariantInfo {
    /// The underlay's key ([`Underlay::key`]).
    #[serde(default = "wire_key")]
    pub underlay: String,
    pub key: String,
    pub label: String,
    pub description: String,
    /// The hook our agent reported attaching (from its log), if ours.
    pub hook: Option<String>,
    /// Our datapath's counters after the run, summed over both nodes, if
    /// ours: evidence that our programs carried the traffic.
    #[serde(default)]
    pub counters: BTreeMap<String, u64>,
}

/// Where and how the run happened.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Meta {
    pub date: String,
    pub kernel: String,
    pub cpu_model: String,
    pub cpus: usize,
    pub memory: String,
    pub load_before: String,
    pub load_after: String,
    pub tools: String,
    pub commit: String,
    pub command: String,
    pub repeats: usize,
    pub seconds: u32,
    pub quick: bool,
    pub underlay_mtu: u32,
    pub pod_mtu: u32,
    /// Wall time of the whole run, seconds.
    pub duration: f64,
    /// The nice level the tools ran at.
    #[serde(default)]
    pub tool_nice: String,
    /// The CPU every tool was pinned to, if any.
    #[serde(default)]
    pub pinned_cpu: Option<usize>,
}

impl Report {
    /// The underlays measured, in the order they were given.
    pub fn underlays(&self) -> Vec<Underlay> {
        let mut out = Vec::new();
        for v in &self.variants {
            if let Some(u) = Underlay::from_key(&v.underlay)
                && !out.contains(&u)
            {
                out.push(u);
            }
        }
        out
    }

    /// The part of the report measured on `underlay`: statistics, ratios
    /// and tables of one underlay never mix in the other's records.
    pub fn for_underlay(&self, underlay: Underlay) -> Report {
        let key = underlay.key();
        Report {
            meta: self.meta.clone(),
            variants: self.variants.iter().filter(|v| v.underlay == key).cloned().collect(),
            records: self.records.iter().filter(|r| r.underlay == key).cloned().collect(),
            background: self.background.clone(),
        }
    }
}

/// Everything a run produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub meta: Meta,
    pub variants: Vec<VariantInfo>,
    pub records: Vec<Record>,
    /// The machine's CPU over an idle window of the test length, once per
    /// round: what other load (and our idle agents) cost in the meantime.
    pub background: Vec<CpuTimes>,
}

/// What to run.
pub struct Config {
    /// The `overlay-agent` binary.
    pub agent: PathBuf,
    pub variants: Vec<Variant>,
    /// Every variant is measured on each of these underlays, all in one
    /// interleaved schedule.
    pub underlays: Vec<Underlay>,
    pub repeats: usize,
    pub seconds: u32,
    pub quick: bool,
    /// Prefix of every namespace and pin directory created.
    pub prefix: String,
    /// Pin every tool to this CPU and account CPU time on it alone.
    pub cpu: Option<usize>,
    /// Set from a signal handler: stop at the next step and clean up.
    pub interrupted: &'static AtomicBool,
    /// The command line, for the report.
    pub command: String,
}

/// The two ends of a measurement.
struct Endpoints {
    client: String,
    server: String,
    server_ip: Ipv4Addr,
    /// The CPU both ends run on, if pinned.
    cpu: Option<usize>,
}

/// Builds the labs, measures, tears down.
pub fn run(config: &Config) -> Result<Report, String> {
    let started = Instant::now();
    let mut meta = machine_meta();
    meta.load_before = loadavg();
    meta.command = config.command.clone();
    meta.repeats = config.repeats;
    meta.seconds = config.seconds;
    meta.quick = config.quick;
    meta.underlay_mtu = UNDERLAY_MTU;
    meta.pod_mtu = POD_MTU;
    meta.tool_nice = TOOL_NICE.to_owned();
    meta.pinned_cpu = config.cpu;

    let labs = start_labs(config)?;
    let subjects = subjects(config, &labs);
    for (underlay, v, ends) in &subjects {
        // Also resolves neighbours before anything is timed.
        if !ping(&ends.client, ends.server_ip) {
            return Err(format!(
                "{} on the {} underlay: {} cannot reach {}; the lab is broken, nothing measured",
                v.key(),
                underlay.key(),
                ends.client,
                ends.server_ip
            ));
        }
    }

    let mut records = Vec::new();
    let mut background = Vec::new();
    for round in 0..config.repeats {
        check_interrupted(config)?;
        let before = CpuTimes::now(config.cpu)?;
        std::thread::sleep(Duration::from_secs(config.seconds.into()));
        background.push(CpuTimes::now(config.cpu)?.since(before));
        for test in Test::ALL {
            // Both underlays' variants share the rotation: one schedule.
            for k in 0..subjects.len() {
                let (underlay, variant, ends) = &subjects[(round + k) % subjects.len()];
                check_interrupted(config)?;
                let record = measure_with_retry(test, *underlay, *variant, ends, round, config)?;
                eprintln!(
                    "bench: round {}/{} {:<7} {:<9} {:<20} {}",
                    round + 1,
                    config.repeats,
                    test.key(),
                    underlay.key(),
                    variant.key(),
                    record.values.iter().map(|(k, v)| format!("{k}={v:.2}")).collect::<Vec<_>>().join(" ")
                );
                records.push(record);
            }
        }
    }

    let variants = subjects
        .iter()
        .map(|(underlay, v, _)| {
            let lab = labs.of(*underlay, *v);
            let ours = matches!(v.setup(), Setup::Ours { .. });
            VariantInfo {
                underlay: underlay.key().to_owned(),
                key: v.key().to_owned(),
                label: v.label().to_owned(),
                description: v.description().to_owned(),
                hook: ours.then(|| attached_hook(lab)).flatten(),
                counters: if ours { datapath_counters(lab) } else { BTreeMap::new() },
            }
        })
        .collect();
    drop(labs);
    meta.load_after = loadavg();
    meta.duration = started.elapsed().as_secs_f64();
    Ok(Report { meta, variants, records, background })
}

fn check_interrupted(config: &Config) -> Result<(), String> {
    if config.interrupted.load(Ordering::SeqCst) {
        return Err("interrupted".to_owned());
    }
    Ok(())
}

/// One lab per distinct (underlay, setup), all up for the whole run:
/// switching between variants costs nothing, so rounds can interleave them.
pub(crate) struct Labs(Vec<((Underlay, Setup), Lab)>);

impl Labs {
    fn of(&self, underlay: Underlay, variant: Variant) -> &Lab {
        &self.0.iter().find(|(k, _)| *k == (underlay, variant.setup())).expect("a lab per underlay and setup").1
    }
}

fn start_labs(config: &Config) -> Result<Labs, String> {
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
    Ok(Labs(labs))
}

/// Every (underlay, variant) measured, with its endpoints, underlay by
/// underlay in the order given.
fn subjects(config: &Config, labs: &Labs) -> Vec<(Underlay, Variant, Endpoints)> {
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
fn attached_hook(lab: &Lab) -> Option<String> {
    let log = lab.agent_log(0);
    let line = log.lines().find(|l| l.contains("datapath attached"))?;
    let hook = line.split_whitespace().find_map(|w| w.strip_prefix("hook="))?;
    Some(hook.to_owned())
}

/// Our counters summed over both nodes (only the non-zero ones).
fn datapath_counters(lab: &Lab) -> BTreeMap<String, u64> {
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

/// A flake (a server slow to listen on a loaded machine) should not cost a
/// long run; a real failure shows twice and stops it.
fn measure_with_retry(
    test: Test,
    underlay: Underlay,
    variant: Variant,
    ends: &Endpoints,
    round: usize,
    config: &Config,
) -> Result<Record, String> {
    match measure(test, underlay, variant, ends, round, config) {
        Ok(record) => Ok(record),
        Err(first) => {
            check_interrupted(config)?;
            eprintln!("bench: {} {} ({}) failed, retrying once: {first}", test.key(), variant.key(), underlay.key());
            std::thread::sleep(Duration::from_secs(1));
            measure(test, underlay, variant, ends, round, config)
                .map_err(|e| format!("{} on {} ({} underlay) failed twice: {e}", test.key(), variant.key(), underlay.key()))
        }
    }
}

fn measure(test: Test, underlay: Underlay, variant: Variant, ends: &Endpoints, round: usize, config: &Config) -> Result<Record, String> {
    let seconds = config.seconds;
    let mut values = BTreeMap::new();
    let mut extra = BTreeMap::new();
    let (cpu, wall) = match test {
        Test::Tcp1 | Test::Tcp4 => {
            let streams = if test == Test::Tcp1 { "1" } else { "4" };
            let (json, cpu, wall) = iperf3(ends, &["-P", streams], seconds)?;
            let received = &json["end"]["sum_received"];
            let bits = received["bytes"].as_f64().ok_or("iperf3: no end.sum_received.bytes")? * 8.0;
            let gbps = received["bits_per_second"].as_f64().ok_or("iperf3: no end.sum_received.bits_per_second")? / 1e9;
            let key = if test == Test::Tcp1 { Metric::Tcp1 } else { Metric::Tcp4 };
            values.insert(key.key().to_owned(), gbps);
            if test == Test::Tcp1 {
                values.insert(Metric::CpuPerGbit.key().to_owned(), cpu.kernel() * 1e3 / (bits / 1e9));
            }
            extra.insert("retransmits".to_owned(), json["end"]["sum_sent"]["retransmits"].as_f64().unwrap_or(0.0));
            (cpu, wall)
        }
        Test::Udp64 => {
            let (json, cpu, wall) = iperf3(ends, &["-u", "-l", "64", "-b", "0"], seconds)?;
            let sum = &json["end"]["sum"];
            let sent = sum["packets"].as_f64().ok_or("iperf3 -u: no end.sum.packets")?;
            let lost = sum["lost_packets"].as_f64().ok_or("iperf3 -u: no end.sum.lost_packets")?;
            let secs = sum["seconds"].as_f64().filter(|s| *s > 0.0).ok_or("iperf3 -u: no end.sum.seconds")?;
            let received = sent - lost;
            values.insert(Metric::Udp64Rate.key().to_owned(), received / secs / 1e3);
            values.insert(Metric::CpuPerPacket.key().to_owned(), cpu.kernel() * 1e6 / received);
            extra.insert("sent_packets".to_owned(), sent);
            extra.insert("lost_packets".to_owned(), lost);
            (cpu, wall)
        }
        Test::UdpPingPong | Test::TcpPingPong => {
            let tcp = test == Test::TcpPingPong;
            let (p50, p99, observations, cpu, wall) = sockperf_ping_pong(ends, tcp, seconds)?;
            let (k50, k99) = if tcp { (Metric::TcpRttP50, Metric::TcpRttP99) } else { (Metric::UdpRttP50, Metric::UdpRttP99) };
            values.insert(k50.key().to_owned(), p50);
            values.insert(k99.key().to_owned(), p99);
            extra.insert("observations".to_owned(), observations);
            (cpu, wall)
        }
    };
    if let Some((key, value)) = values.iter().find(|(_, v)| !(v.is_finite() && **v > 0.0)) {
        return Err(format!("{key} came out as {value}: no traffic moved"));
    }
    Ok(Record {
        round,
        underlay: underlay.key().to_owned(),
        variant: variant.key().to_owned(),
        test: test.key().to_owned(),
        values,
        extra,
        cpu,
        wall,
    })
}

/// `nsenter --net=/run/netns/<ns> <program>`.
fn in_ns(ns: &str, program: &str) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{ns}")).arg(program);
    cmd
}

/// The nice level of the measuring tools: the machines are shared with
/// compilers, and ahead of them the packets' own cost shows.
pub const TOOL_NICE: &str = "-10";

/// A measuring tool in `ns`, at [`TOOL_NICE`], on the pinned CPU if any.
fn tool(ns: &str, program: &str, cpu: Option<usize>) -> Command {
    let mut cmd = in_ns(ns, "nice");
    cmd.args(["-n", TOOL_NICE]);
    if let Some(cpu) = cpu {
        cmd.args(["taskset", "-c", &cpu.to_string()]);
    }
    cmd.arg(program);
    cmd
}

fn ping(ns: &str, to: Ipv4Addr) -> bool {
    in_ns(ns, "ping")
        .args(["-c", "3", "-i", "0.2", "-W", "2", "-q", &to.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Starts a server in `ns` and waits until it listens on `port` (a fixed
/// sleep is either slow or, on a loaded machine, too short).
fn server(ns: &str, program: &str, args: &[&str], port: u16, tcp: bool, cpu: Option<usize>) -> Result<ChildGuard, String> {
    let child = tool(ns, program, cpu)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting {program}: {e}"))?;
    let guard = ChildGuard(child);
    let deadline = Instant::now() + Duration::from_secs(5);
    let filter = format!("sport = :{port}");
    loop {
        let out = in_ns(ns, "ss")
            .args([if tcp { "-Hltn" } else { "-Hlun" }, &filter])
            .output()
            .map_err(|e| format!("running ss: {e}"))?;
        if !out.stdout.is_empty() {
            return Ok(guard);
        }
        if Instant::now() > deadline {
            return Err(format!("{program} in {ns} is not listening on port {port} after 5 s"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a client, sampling the CPU (the pinned one, or all) right around it.
fn timed_client(mut cmd: Command, cpu: Option<usize>) -> Result<(Output, CpuTimes, f64), String> {
    let before = CpuTimes::now(cpu)?;
    let started = Instant::now();
    let out = cmd.output().map_err(|e| format!("running {cmd:?}: {e}"))?;
    let wall = started.elapsed().as_secs_f64();
    let cpu = CpuTimes::now(cpu)?.since(before);
    Ok((out, cpu, wall))
}

const IPERF3_PORT: u16 = 5201;
const SOCKPERF_PORT: u16 = 11111;

fn iperf3(ends: &Endpoints, args: &[&str], seconds: u32) -> Result<(serde_json::Value, CpuTimes, f64), String> {
    let ip = ends.server_ip.to_string();
    let _server = server(&ends.server, "iperf3", &["-s", "-1", "-B", &ip], IPERF3_PORT, true, ends.cpu)?;
    let mut cmd = tool(&ends.client, "iperf3", ends.cpu);
    cmd.args(["-c", &ip, "-t", &seconds.to_string(), "-J", "--connect-timeout", "3000"]).args(args);
    let (out, cpu, wall) = timed_client(cmd, ends.cpu)?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("iperf3 printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stderr)))?;
    if let Some(error) = json["error"].as_str() {
        return Err(format!("iperf3: {error}"));
    }
    Ok((json, cpu, wall))
}

/// sockperf ping-pong; returns the round trip's median and p99 in µs and
/// the number of observations.
fn sockperf_ping_pong(ends: &Endpoints, tcp: bool, seconds: u32) -> Result<(f64, f64, f64, CpuTimes, f64), String> {
    let ip = ends.server_ip.to_string();
    let port = SOCKPERF_PORT.to_string();
    let mut server_args = vec!["sr", "-i", &ip, "-p", &port];
    let mut client_args = vec!["pp", "-i", &ip, "-p", &port, "-m", "64", "--full-rtt", "-t"];
    let secs = seconds.to_string();
    client_args.push(&secs);
    if tcp {
        server_args.push("--tcp");
        client_args.push("--tcp");
    }
    let _server = server(&ends.server, "sockperf", &server_args, SOCKPERF_PORT, tcp, ends.cpu)?;
    let mut cmd = tool(&ends.client, "sockperf", ends.cpu);
    cmd.args(&client_args);
    let (out, cpu, wall) = timed_client(cmd, ends.cpu)?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!("sockperf pp failed ({}): {text}", out.status));
    }
    let (p50, p99, observations) = parse_sockperf(&text).ok_or_else(|| format!("sockperf printed no percentiles: {text}"))?;
    Ok((p50, p99, observations, cpu, wall))
}

/// Reads `---> percentile 50.000 = 12.345` and `Total N observations` from
/// sockperf's summary.
pub fn parse_sockperf(text: &str) -> Option<(f64, f64, f64)> {
    let percentile = |p: &str| {
        text.lines().find_map(|l| {
            let rest = l.split("percentile ").nth(1)?;
            let (name, value) = rest.split_once('=')?;
            (name.trim() == p).then(|| value.trim().parse::<f64>().ok()).flatten()
        })
    };
    let observations = text.lines().find_map(|l| {
        let rest = l.split("Total ").nth(1)?;
        rest.split_whitespace().next()?.parse::<f64>().ok()
    })?;
    Some((percentile("50.000")?, percentile("99.000")?, observations))
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn command_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or_default().trim().to_owned())
        .unwrap_or_default()
}

fn machine_meta() -> Meta {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim().to_owned()))
        .unwrap_or_else(|| "unknown".to_owned());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let kb: f64 = m.lines().next()?.split_whitespace().nth(1)?.parse().ok()?;
            Some(format!("{:.1} GiB", kb / 1024.0 / 1024.0))
        })
        .unwrap_or_default();
    let sockperf = command_line("sockperf", &["--version"]);
    Meta {
        date: command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        kernel: command_line("uname", &["-rv"]),
        cpu_model,
        cpus: std::thread::available_parallelism().map_or(0, usize::from),
        memory,
        tools: format!("{}, {}", command_line("iperf3", &["--version"]), sockperf.trim_end_matches(['\n'])),
        commit: command_line("git", &["describe", "--always", "--dirty"]),
        ..Meta::default()
    }
}

// ---------------------------------------------------------------------------
// Statistics.

/// Median and spread of one metric of one variant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

/// The median of `values`, or `None` when there are none.
fn median_of(values: impl Iterator<Item = f64>) -> Option<f64> {
    let mut values: Vec<f64> = values.collect();
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    Some(median(&values))
}

pub fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 }
}

impl Report {
    /// The value of `metric` for `variant`, per round.
    pub fn samples(&self, variant: &str, metric: Metric) -> BTreeMap<usize, f64> {
        self.records
            .iter()
            .filter(|r| r.variant == variant)
            .filter_map(|r| r.values.get(metric.key()).map(|v| (r.round, *v)))
            .collect()
    }

    pub fn stat(&self, variant: &str, metric: Metric) -> Option<Stat> {
        let mut values: Vec<f64> = self.samples(variant, metric).into_values().collect();
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        Some(Stat { median: median(&values), min: values[0], max: values[values.len() - 1], n: values.len() })
    }

    /// `variant` over `base`, paired by round: the median of the per-round
    /// ratios, with their min and max. Both ran minutes apart at most in a
    /// round, so a shared machine's drift between rounds cancels; a ratio
    /// of medians would mix a quiet round of one with a loaded one of the
    /// other.
    pub fn paired_ratio(&self, variant: &str, base: &str, metric: Metric) -> Option<Stat> {
        let base = self.samples(base, metric);
        let mut ratios: Vec<f64> = self
            .samples(variant, metric)
            .into_iter()
            .filter_map(|(round, v)| base.get(&round).map(|b| v / b))
            .collect();
        if ratios.is_empty() {
            return None;
        }
        ratios.sort_by(f64::total_cmp);
        Some(Stat { median: median(&ratios), min: ratios[0], max: ratios[ratios.len() - 1], n: ratios.len() })
    }

    /// The headline ratio: the median of the per-round ratios.
    pub fn ratio(&self, variant: &str, base: &str, metric: Metric) -> Option<f64> {
        self.paired_ratio(variant, base, metric).map(|r| r.median)
    }

    fn has(&self, variant: Variant) -> bool {
        self.variants.iter().any(|v| v.key == variant.key())
    }

    fn rounds(&self) -> usize {
        self.records.iter().map(|r| r.round + 1).max().unwrap_or(0)
    }

    /// How many CPUs the CPU figures cover: the pinned one, or all.
    fn accounted_cpus(&self) -> f64 {
        if self.meta.pinned_cpu.is_some() { 1.0 } else { self.meta.cpus.max(1) as f64 }
    }

    /// The background CPU share of the machine, median over rounds.
    fn background_share(&self) -> Option<f64> {
        median_of(
            self
                .background
                .iter()
                .map(|c| c.kernel() / (f64::from(self.meta.seconds) * self.accounted_cpus())),
        )
    }

    /// User-space CPU during the iperf3 tests, as a share of the machine:
    /// our tools use little of it, so it is mostly other jobs' load.
    fn user_share_during_tests(&self) -> Option<f64> {
        median_of(
            self
                .records
                .iter()
                .filter(|r| r.test != Test::UdpPingPong.key() && r.test != Test::TcpPingPong.key() && r.wall > 0.0)
                .map(|r| r.cpu.user / (r.wall * self.accounted_cpus())),
        )
    }

    fn background_user_share(&self) -> Option<f64> {
        median_of(
            self
                .background
                .iter()
                .map(|c| c.user / (f64::from(self.meta.seconds) * self.accounted_cpus())),
        )
    }
}

/// Checks a finished report: every variant produced every metric, every
/// value positive, and our variants' counters show our programs carried
/// traffic. Returns what is missing.
pub fn problems(report: &Report) -> Vec<String> {
    report
        .underlays()
        .into_iter()
        .flat_map(|u| problems_of_one_underlay(&report.for_underlay(u)).into_iter().map(move |p| format!("{} underlay: {p}", u.key())))
        .collect()
}

fn problems_of_one_underlay(report: &Report) -> Vec<String> {
    let mut problems = Vec::new();
    for v in &report.variants {
        for metric in Metric::ALL {
            match report.stat(&v.key, metric) {
                None => problems.push(format!("{}: no {}", v.key, metric.key())),
                Some(s) if !(s.min > 0.0 && s.max.is_finite()) => {
                    problems.push(format!("{}: {} is {:?}", v.key, metric.key(), s));
                }
                Some(_) => {}
            }
        }
        let counter = |name: &str| v.counters.get(name).copied().unwrap_or(0);
        match Variant::from_key(&v.key).map(Variant::setup) {
            Some(Setup::Ours { backend: "vxlan", .. }) if counter("encap_packets") == 0 || counter("decap_packets") == 0 => {
                problems.push(format!("{}: our counters show no VXLAN traffic: {:?}", v.key, v.counters));
            }
            Some(Setup::Ours { backend: "host-gw", .. }) if counter("direct_packets") == 0 => {
                problems.push(format!("{}: our counters show no direct traffic: {:?}", v.key, v.counters));
            }
            _ => {}
        }
        match Variant::from_key(&v.key).map(Variant::setup) {
            Some(Setup::Ours { forward: "bpf", .. }) if counter("fastpath_packets") == 0 => {
                problems.push(format!("{}: our counters show no fast-path traffic: {:?}", v.key, v.counters));
            }
            _ => {}
        }
        let drops: u64 = v.counters.iter().filter(|(k, _)| k.starts_with("drop_")).map(|(_, v)| v).sum();
        if drops > 0 {
            problems.push(format!("{}: our datapath dropped packets: {:?}", v.key, v.counters));
        }
    }
    problems
}

// ---------------------------------------------------------------------------
// Markdown.

fn ratio_text(r: f64) -> String {
    format!("{r:.2}×")
}

/// The results page: machine, method, absolute figures, ratios, targets.
pub fn render_markdown(report: &Report) -> String {
    let m = &report.meta;
    let mut s = String::new();
    let _ = writeln!(s, "# Benchmark results\n");
    let _ = writeln!(
        s,
        "Written by `cargo xtask bench`{}; rerun it to update this page. How the numbers are taken and what they mean: [README.md](README.md).\n",
        if m.quick { " in quick mode (1 s, smoke test only: do not quote these figures)" } else { "" }
    );
    let _ = writeln!(s, "- **When:** {} (commit `{}`), {:.0} min of wall time.", m.date, m.commit, m.duration / 60.0);
    let _ = writeln!(s, "- **Machine:** Linux {}; {} × {}; {} RAM. Tools: {}.", m.kernel, m.cpus, m.cpu_model, m.memory, m.tools);
    let scope = match m.pinned_cpu {
        Some(cpu) => format!("CPU {cpu} (the one the tools ran on)"),
        None => "the machine".to_owned(),
    };
    let background = report.background_share().map_or_else(String::new, |share| {
        format!(
            " In an idle window of {} s per round, {scope} spent a median {:.0} % of its time in the kernel and {:.0} % in user space on other work (other jobs, our idle agents).",
            m.seconds,
            share * 100.0,
            report.background_user_share().unwrap_or(0.0) * 100.0
        )
    });
    let during = report.user_share_during_tests().map_or_else(String::new, |share| {
        format!(" While iperf3 ran, user-space time (ours is small) took a median {:.0} % of {scope}.", share * 100.0)
    });
    let _ = writeln!(
        s,
        "- **Other load:** load average (1, 5, 15 min) {} before, {} after.{background}{during}",
        m.load_before, m.load_after
    );
    let _ = writeln!(
        s,
        "- **Lab:** the `cargo xtask lab` code: two nodes in network namespaces on a veth/bridge underlay, **underlay MTU {}**; one pod per node behind a `cni0` bridge, **pod MTU {}** in every pod variant. Underlays: {}.",
        m.underlay_mtu,
        m.pod_mtu,
        report.underlays().iter().map(|u| format!("**{}** ({})", u.label(), u.description())).collect::<Vec<_>>().join("; ")
    );
    let pinning = match m.pinned_cpu {
        Some(cpu) => format!(
            "Every tool, client and server, runs on CPU {cpu} at nice {}; veth hands packets on in the sender's context, so all of a test's packet processing runs there too, and throughput is the inverse of the path's CPU cost. CPU cost is CPU {cpu}'s system + softirq + irq time (from `/proc/stat`) while the client ran, per Gbit or packet received.",
            m.tool_nice
        ),
        None => format!(
            "The tools run unpinned at nice {}. CPU cost is the system + softirq + irq time of all CPUs (from `/proc/stat`) while the client ran, per Gbit or packet received: the whole machine's kernel time, so other load inflates it for every variant.",
            m.tool_nice
        ),
    };
    let _ = writeln!(
        s,
        "- **Method:** {} round(s) of {} s per test. Each round runs every test once per variant{}, the order rotated by one each round, so drift in the machine's load falls on all variants alike. Figures are medians over rounds, with the min–max spread; ratios are paired by round, within one underlay. {pinning}\n",
        report.rounds(),
        m.seconds,
        if report.underlays().len() > 1 {
            " and underlay: both underlays' labs are up for the whole run and share one interleaved schedule (not one after the other)"
        } else {
            ""
        },
    );

    for underlay in report.underlays() {
        let _ = writeln!(s, "## {}\n", capitalised(underlay.label()));
        let _ = writeln!(s, "{}.\n", capitalised(underlay.description()));
        render_underlay_markdown(&mut s, &report.for_underlay(underlay), underlay);
    }
    let _ = writeln!(s, "\n## Chart\n\n![ratios to kernel vxlan](results.svg)\n\nRaw data: [results.json](results.json).");
    s
}

fn capitalised(text: &str) -> String {
    let mut chars = text.chars();
    chars.next().map(|c| c.to_uppercase().chain(chars).collect()).unwrap_or_default()
}

/// The tables of one underlay: variants, absolute figures, ratios, targets.
fn render_underlay_markdown(s: &mut String, report: &Report, underlay: Underlay) {
    let base = BASELINE.key();
    let _ = writeln!(s, "### Variants\n");
    let _ = writeln!(s, "| variant | what runs | our hook, our counters after the run |");
    let _ = writeln!(s, "|---|---|---|");
    for v in &report.variants {
        let evidence = match &v.hook {
            Some(hook) => {
                let c = |k: &str| v.counters.get(k).copied().unwrap_or(0);
                format!(
                    "`{hook}`; encap {}, decap {}, direct {}, fast path {} packets",
                    c("encap_packets"),
                    c("decap_packets"),
                    c("direct_packets"),
                    c("fastpath_packets")
                )
            }
            None => "—".to_owned(),
        };
        let _ = writeln!(s, "| {} (`{}`) | {} | {evidence} |", v.label, v.key, v.description);
    }

    let header: Vec<&str> = report.variants.iter().map(|v| v.label.as_str()).collect();
    let _ = writeln!(s, "\n### Absolute figures\n\nMedian, and the min–max over rounds below it.\n");
    let _ = writeln!(s, "| metric | {} |", header.join(" | "));
    let _ = writeln!(s, "|---|{}", "---|".repeat(header.len()));
    for metric in Metric::ALL {
        let cells: Vec<String> = report
            .variants
            .iter()
            .map(|v| match report.stat(&v.key, metric) {
                Some(st) => format!("**{}**<br>{}–{}", metric.format(st.median), metric.format(st.min), metric.format(st.max)),
                None => "—".to_owned(),
            })
            .collect();
        let arrow = if metric.better() == Better::Higher { "↑" } else { "↓" };
        let _ = writeln!(s, "| {} ({}) {arrow} | {} |", metric.label(), metric.unit(), cells.join(" | "));
    }

    if report.has(BASELINE) {
        let _ = writeln!(
            s,
            "\n### Ratios to flannel's kernel vxlan\n\nEach round gives a ratio (the variant's figure over kernel vxlan's figure in the same round); shown is their median, and below it their min–max. ↑ above 1 is better, ↓ below 1 is better.\n"
        );
        let _ = writeln!(s, "| metric | {} |", header.join(" | "));
        let _ = writeln!(s, "|---|{}", "---|".repeat(header.len()));
        for metric in Metric::ALL {
            let cells: Vec<String> = report
                .variants
                .iter()
                .map(|v| {
                    match report.paired_ratio(&v.key, base, metric) {
                        Some(_) if v.key == base => "1×".to_owned(),
                        Some(r) => format!("**{}**<br>{:.2}–{:.2}", ratio_text(r.median), r.min, r.max),
                        None => "—".to_owned(),
                    }
                })
                .collect();
            let arrow = if metric.better() == Better::Higher { "↑" } else { "↓" };
            let _ = writeln!(s, "| {} {arrow} | {} |", metric.label(), cells.join(" | "));
        }
    }

    let targets = targets(report, underlay);
    if !targets.is_empty() {
        let _ = writeln!(s, "\n### Targets of issue 12\n\nTargets, not test assertions.\n");
        let _ = writeln!(s, "| target | measured | |");
        let _ = writeln!(s, "|---|---|---|");
        for t in targets {
            let _ = writeln!(s, "| {} | {} | {} |", t.what, t.measured, if t.met { "met" } else { "**not met**" });
        }
    }
    let _ = writeln!(s);
}

struct Target {
    what: String,
    measured: String,
    met: bool,
}

/// Issue 12's targets for `underlay` (default flags; medians of paired
/// ratios), and how close every variant comes to the raw underlay.
fn targets(report: &Report, underlay: Underlay) -> Vec<Target> {
    let mut out = Vec::new();
    let mut ratio_target = |variant: Variant, base: Variant, metric: Metric, goal: f64| {
        if !(report.has(variant) && report.has(base)) {
            return;
        }
        let Some(r) = report.ratio(variant.key(), base.key(), metric) else { return };
        let at_least = metric.better() == Better::Higher;
        out.push(Target {
            what: format!(
                "{} {} {} {:.2}× {}",
                variant.label(),
                metric.label(),
                if at_least { "≥" } else { "≤" },
                goal,
                base.label()
            ),
            measured: ratio_text(r),
            met: if at_least { r >= goal } else { r <= goal },
        });
    };
    match underlay {
        Underlay::Container => {
            ratio_target(Variant::Vxlan, Variant::KernelVxlan, Metric::Tcp1, 1.1);
            ratio_target(Variant::Vxlan, Variant::KernelVxlan, Metric::Tcp4, 1.1);
            ratio_target(Variant::Vxlan, Variant::KernelVxlan, Metric::UdpRttP50, 0.85);
        }
        Underlay::Wire => {
            ratio_target(Variant::Vxlan, Variant::KernelVxlan, Metric::Tcp1, 1.0);
            ratio_target(Variant::Vxlan, Variant::KernelVxlan, Metric::Tcp4, 1.0);
            ratio_target(Variant::Vxlan, Variant::KernelVxlan, Metric::CpuPerGbit, 1.0);
            ratio_target(Variant::Vxlan, Variant::KernelVxlan, Metric::UdpRttP50, 0.85);
            ratio_target(Variant::Vxlan, Variant::KernelVxlan, Metric::TcpRttP50, 0.85);
            ratio_target(Variant::Vxlan, Variant::KernelVxlan, Metric::Udp64Rate, 1.2);
        }
    }
    ratio_target(Variant::HostGw, Variant::KernelHostGw, Metric::Tcp1, 1.05);
    ratio_target(Variant::HostGw, Variant::KernelHostGw, Metric::Tcp4, 1.05);
    if report.has(Variant::Raw) {
        for v in report.variants.iter().filter(|v| v.key != Variant::Raw.key()) {
            if let Some(r) = report.ratio(&v.key, Variant::Raw.key(), Metric::Tcp1) {
                out.push(Target {
                    what: format!("{} within reach of the raw underlay (TCP, 1 stream)", v.label),
                    measured: format!("{} of raw", ratio_text(r)),
                    // "Within reach": no more than a fifth below the ceiling.
                    met: r >= 0.8,
                });
            }
        }
    }
    out
}

/// The README's one-line summary (between the bench-summary markers).
pub fn summary_line(report: &Report) -> String {
    let m = &report.meta;
    let per_underlay: Vec<String> = report
        .underlays()
        .into_iter()
        .map(|u| format!("on the **{}**, {}", u.label(), summary_of_one_underlay(&report.for_underlay(u))))
        .collect();
    format!(
        "Benchmark of {} ({} interleaved rounds, Linux {}, {} vCPUs): {}. Full results: [docs/benchmarks/results.md](docs/benchmarks/results.md).",
        m.date.split_whitespace().next().unwrap_or_default(),
        report.rounds(),
        m.kernel.split_whitespace().next().unwrap_or_default(),
        m.cpus,
        per_underlay.join("; ")
    )
}

fn summary_of_one_underlay(report: &Report) -> String {
    let pick = |v: Variant, base: Variant, metric: Metric| report.ratio(v.key(), base.key(), metric).map(ratio_text);
    let figure = |v: Variant, metric: Metric| {
        report.stat(v.key(), metric).map(|s| format!("{} {}", metric.format(s.median), metric.unit())).unwrap_or_default()
    };
    let mut parts = Vec::new();
    if let Some(r) = pick(Variant::Vxlan, Variant::KernelVxlan, Metric::Tcp1) {
        parts.push(format!(
            "single-stream TCP over our VXLAN runs at **{r}** the speed of flannel's kernel vxlan device ({} vs {})",
            figure(Variant::Vxlan, Metric::Tcp1),
            figure(Variant::KernelVxlan, Metric::Tcp1)
        ));
    }
    if let Some(r) = pick(Variant::Vxlan, Variant::KernelVxlan, Metric::UdpRttP50) {
        parts.push(format!("its UDP round trip takes **{r}** the time"));
    }
    if let Some(r) = pick(Variant::HostGw, Variant::KernelHostGw, Metric::Tcp1) {
        parts.push(format!("our host-gw runs at **{r}** the speed of kernel host-gw routes"));
    }
    if let Some(r) = pick(Variant::KernelVxlan, Variant::Raw, Metric::Tcp1) {
        parts.push(format!("kernel vxlan itself reaches {r} of the raw underlay"));
    }
    parts.join(", ")
}

pub const SUMMARY_START: &str = "<!-- bench-summary -->";
pub const SUMMARY_END: &str = "<!-- /bench-summary -->";

/// Replaces what is between the bench-summary markers of a README.
pub fn update_readme(path: &Path, line: &str) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let (Some(start), Some(end)) = (text.find(SUMMARY_START), text.find(SUMMARY_END)) else {
        return Err(format!(
            "{} has no `{SUMMARY_START}` … `{SUMMARY_END}` markers; add them where the summary belongs",
            path.display()
        ));
    };
    if end < start {
        return Err(format!("{}: `{SUMMARY_END}` comes before `{SUMMARY_START}`", path.display()));
    }
    let updated = format!("{}{SUMMARY_START}\n{line}\n{}", &text[..start], &text[end..]);
    std::fs::write(path, updated).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Writes results.json, results.md and results.svg into `dir`.
pub fn write_outputs(report: &Report, dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let json = serde_json::to_string_pretty(report).map_err(|e| e.to_string())?;
    for (name, text) in [("results.json", json + "\n"), ("results.md", render_markdown(report)), ("results.svg", render_svg(report))] {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    Ok(())
}

/// Reads a results.json written by [`write_outputs`].
pub fn read_report(path: &Path) -> Result<Report, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{} is not a bench report: {e}", path.display()))
}

// ---------------------------------------------------------------------------
// The chart.

/// Colours per variant, fixed so a variant looks the same in every chart.
fn colour(variant: &str) -> &'static str {
    match Variant::from_key(variant) {
        Some(Variant::Raw) => "#9e9e9e",
        Some(Variant::KernelHostGw) => "#80cbc4",
        Some(Variant::KernelVxlan) => "#f4a261",
        Some(Variant::Vxlan) => "#1d4ed8",
        Some(Variant::HostGw) => "#0f766e",
        Some(Variant::VxlanTc) => "#60a5fa",
        Some(Variant::VxlanXdpGeneric) => "#a78bfa",
        Some(Variant::HostGwXdp) => "#34d399",
        Some(Variant::VxlanBpfForward) => "#1e3a8a",
        Some(Variant::HostGwBpfForward) => "#064e3b",
        Some(Variant::VxlanTcBpfForward) => "#7c3aed",
        Some(Variant::KernelVxlanFlanneld) => "#e76f51",
        None => "#444444",
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Horizontal grouped bars: one group per metric, one bar per variant, its
/// length the ratio to kernel vxlan (the dashed line), a whisker for the
/// min–max over rounds, and the absolute median written at its end.
pub fn render_svg(report: &Report) -> String {
    let mut charts = Vec::new();
    let mut height = 0.0;
    for underlay in report.underlays() {
        let (chart, h) = render_underlay_svg(&report.for_underlay(underlay), underlay);
        // Nested: each underlay's chart keeps its own coordinates.
        charts.push(chart.replacen("<svg ", &format!(r#"<svg y="{height:.1}" "#), 1));
        height += h;
    }
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"1000\" height=\"{height:.1}\" viewBox=\"0 0 1000 {height:.1}\">\n{}</svg>\n",
        charts.concat()
    )
}

/// One underlay's chart, and its height.
fn render_underlay_svg(report: &Report, underlay: Underlay) -> (String, f64) {
    const WIDTH: f64 = 1000.0;
    const LABEL_X: f64 = 250.0;
    const PLOT_X0: f64 = 260.0;
    const PLOT_X1: f64 = 800.0;
    const BAR: f64 = 15.0;
    const ROW: f64 = 19.0;
    const GROUP_HEAD: f64 = 24.0;
    const GROUP_GAP: f64 = 12.0;
    const SECTION_HEAD: f64 = 48.0;

    let base = BASELINE.key();
    let has_base = report.variants.iter().any(|v| v.key == base);
    // Normalised to the baseline's median; without it, to the first variant.
    let norm_key = if has_base { base.to_owned() } else { report.variants.first().map(|v| v.key.clone()).unwrap_or_default() };
    let norm_label = report.variants.iter().find(|v| v.key == norm_key).map(|v| v.label.clone()).unwrap_or_default();

    let mut max_ratio: f64 = 1.5;
    for metric in Metric::ALL {
        for v in &report.variants {
            if let Some(pair) = report.paired_ratio(&v.key, &norm_key, metric) {
                max_ratio = max_ratio.max(pair.max);
            }
        }
    }
    let max_ratio = (max_ratio * 2.0).ceil() / 2.0;
    let scale = (PLOT_X1 - PLOT_X0) / max_ratio;
    let x = |ratio: f64| PLOT_X0 + ratio.min(max_ratio) * scale;

    let sections = [
        (Better::Higher, "Throughput and packet rate — longer is better"),
        (Better::Lower, "Latency and CPU cost — shorter is better"),
    ];
    let rows = report.variants.len() as f64;
    let groups_in = |b: Better| Metric::ALL.iter().filter(|m| m.better() == b).count() as f64;
    let top = 84.0;
    let height = top
        + sections.iter().map(|(b, _)| SECTION_HEAD + groups_in(*b) * (GROUP_HEAD + rows * ROW + GROUP_GAP)).sum::<f64>()
        + 40.0;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="20" y="28" font-size="18" font-weight="bold">overlay benchmark, {}: each variant as a multiple of {} (dashed line, 1×)</text>"#,
        escape(underlay.label()),
        escape(&norm_label)
    );
    let m = &report.meta;
    let _ = writeln!(
        s,
        r##"<text x="20" y="50" fill="#444">{} · Linux {} · {} vCPUs · {} interleaved rounds × {} s per test{}</text><text x="20" y="68" fill="#444">Bar: median of the per-round ratios (whisker: their min–max). Text: the variant's absolute median, then that ratio.</text>"##,
        escape(&m.date),
        escape(m.kernel.split_whitespace().next().unwrap_or_default()),
        m.cpus,
        report.rounds(),
        m.seconds,
        if m.quick { " · QUICK MODE" } else { "" }
    );

    let mut y = top;
    for (better, title) in sections {
        let _ = writeln!(s, r#"<text x="20" y="{:.1}" font-size="15" font-weight="bold">{}</text>"#, y + 16.0, escape(title));
        y += SECTION_HEAD;
        let section_top = y;
        let section_height = groups_in(better) * (GROUP_HEAD + rows * ROW + GROUP_GAP);
        // Grid lines every 0.5×, the 1× line dashed and dark.
        let mut tick = 0.0;
        while tick <= max_ratio + 1e-9 {
            let gx = x(tick);
            let (stroke, dash) = if (tick - 1.0).abs() < 1e-9 { ("#333", r#" stroke-dasharray="5,3""#) } else { ("#e5e5e5", "") };
            let _ = writeln!(
                s,
                r#"<line x1="{gx:.1}" y1="{:.1}" x2="{gx:.1}" y2="{:.1}" stroke="{stroke}"{dash}/>"#,
                section_top - 4.0,
                section_top + section_height - GROUP_GAP
            );
            let _ = writeln!(s, r##"<text x="{gx:.1}" y="{:.1}" text-anchor="middle" fill="#666" font-size="10">{tick}×</text>"##, section_top - 8.0);
            tick += 0.5;
        }
        for metric in Metric::ALL.into_iter().filter(|m| m.better() == better) {
            let _ = writeln!(
                s,
                r#"<text x="20" y="{:.1}" font-weight="bold">{} ({})</text>"#,
                y + 16.0,
                escape(metric.label()),
                escape(metric.unit())
            );
            y += GROUP_HEAD;
            for v in &report.variants {
                let cy = y + ROW / 2.0;
                let _ = writeln!(s, r#"<text x="{LABEL_X}" y="{:.1}" text-anchor="end">{}</text>"#, cy + 4.0, escape(&v.label));
                if let (Some(st), Some(pair)) = (report.stat(&v.key, metric), report.paired_ratio(&v.key, &norm_key, metric)) {
                    let (r, lo, hi) = (pair.median, pair.min, pair.max);
                    let _ = writeln!(
                        s,
                        r#"<rect x="{PLOT_X0}" y="{:.1}" width="{:.1}" height="{BAR}" fill="{}"/>"#,
                        cy - BAR / 2.0,
                        (x(r) - PLOT_X0).max(1.0),
                        colour(&v.key)
                    );
                    let _ = writeln!(
                        s,
                        r#"<line x1="{:.1}" y1="{cy:.1}" x2="{:.1}" y2="{cy:.1}" stroke="black" stroke-width="1.2"/><line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="black"/><line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="black"/>"#,
                        x(lo), x(hi),
                        x(lo), cy - 4.0, x(lo), cy + 4.0,
                        x(hi), cy - 4.0, x(hi), cy + 4.0
                    );
                    // Green when better than the baseline by more than 3 %,
                    // red when worse by as much, grey in between.
                    let gain = if better == Better::Higher { r } else { 1.0 / r };
                    let tone = if v.key == norm_key { "#444" } else if gain > 1.03 { "#15803d" } else if gain < 0.97 { "#b91c1c" } else { "#444" };
                    let _ = writeln!(
                        s,
                        // A white halo keeps the text legible where it crosses the 1× line.
                        r#"<text x="{:.1}" y="{:.1}" stroke="white" stroke-width="3" paint-order="stroke"><tspan font-weight="bold">{}</tspan> <tspan fill="{tone}">{}</tspan></text>"#,
                        x(r.max(hi)) + 6.0,
                        cy + 4.0,
                        escape(&format!("{} {}", metric.format(st.median), metric.unit())),
                        if v.key == norm_key { "= 1×".to_owned() } else { ratio_text(r) }
                    );
                }
                y += ROW;
            }
            y += GROUP_GAP;
        }
    }
    let _ = writeln!(
        s,
        r##"<text x="20" y="{:.1}" fill="#666" font-size="11">Ratio text: green = better than {} by more than 3 %, red = worse by more than 3 %. Source: results.json next to this chart, written by cargo xtask bench.</text>"##,
        y + 14.0,
        escape(&norm_label)
    );
    let _ = writeln!(s, "</svg>");
    (s, height)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOCKPERF: &str = "sockperf: [Total Run] RunTime=1.001 sec; Warm up time=400 msec; SentMessages=16115; ReceivedMessages=16114
sockperf: \u{1b}[2;35mTotal 7273 observations\u{1b}[0m; each percentile contains 72.73 observations
sockperf: ---> <MAX> observation = 2921.493
sockperf: ---> percentile 99.999 = 2921.493
sockperf: ---> percentile 99.000 =  122.110
sockperf: ---> percentile 50.000 =   73.458
sockperf: ---> <MIN> observation =   28.311
";

    #[test]
    fn sockperf_summary_gives_median_p99_and_count() {
        assert_eq!(parse_sockperf(SOCKPERF), Some((73.458, 122.110, 7273.0)));
        assert_eq!(parse_sockperf("sockperf: ERROR"), None);
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(&[1.0, 2.0, 9.0]), 2.0);
        assert_eq!(median(&[1.0, 2.0, 4.0, 9.0]), 3.0);
    }

    fn record(round: usize, variant: Variant, gbps: f64) -> Record {
        Record {
            round,
            underlay: "wire".to_owned(),
            variant: variant.key().to_owned(),
            test: "tcp1".to_owned(),
            values: BTreeMap::from([(Metric::Tcp1.key().to_owned(), gbps)]),
            extra: BTreeMap::new(),
            cpu: CpuTimes::default(),
            wall: 1.0,
        }
    }

    #[test]
    fn ratios_are_paired_by_round() {
        let info = |v: Variant| VariantInfo {
            underlay: "wire".to_owned(),
            key: v.key().to_owned(),
            label: v.label().to_owned(),
            description: String::new(),
            hook: None,
            counters: BTreeMap::new(),
        };
        let report = Report {
            meta: Meta::default(),
            variants: vec![info(Variant::KernelVxlan), info(Variant::Vxlan)],
            records: vec![
                record(0, Variant::KernelVxlan, 4.0),
                record(0, Variant::Vxlan, 6.0),
                record(1, Variant::KernelVxlan, 2.0),
                record(1, Variant::Vxlan, 4.0),
                record(2, Variant::KernelVxlan, 5.0),
                record(2, Variant::Vxlan, 5.0),
            ],
            background: Vec::new(),
        };
        let stat = report.stat("vxlan", Metric::Tcp1).unwrap();
        assert_eq!((stat.median, stat.min, stat.max, stat.n), (5.0, 4.0, 6.0, 3));
        // Per round: 1.5, 2.0, 1.0; a ratio of medians would say 5/4.
        assert_eq!(report.ratio("vxlan", "kernel-vxlan", Metric::Tcp1), Some(1.5));
        let pair = report.paired_ratio("vxlan", "kernel-vxlan", Metric::Tcp1).unwrap();
        assert_eq!((pair.min, pair.max, pair.n), (1.0, 2.0, 3));
        let markdown = render_markdown(&report);
        assert!(markdown.contains("**1.50×**<br>1.00–2.00"), "{markdown}");
        assert!(render_svg(&report).contains("1.50×"));
    }

    #[test]
    fn each_underlay_has_its_own_figures_ratios_and_sections() {
        let info = |u: &str, v: Variant| VariantInfo {
            underlay: u.to_owned(),
            key: v.key().to_owned(),
            label: v.label().to_owned(),
            description: String::new(),
            hook: None,
            counters: BTreeMap::new(),
        };
        let on = |u: &str, mut r: Record| {
            r.underlay = u.to_owned();
            r
        };
        let report = Report {
            meta: Meta::default(),
            variants: vec![
                info("wire", Variant::KernelVxlan),
                info("wire", Variant::Vxlan),
                info("container", Variant::KernelVxlan),
                info("container", Variant::Vxlan),
            ],
            records: vec![
                record(0, Variant::KernelVxlan, 4.0),
                record(0, Variant::Vxlan, 3.0),
                on("container", record(0, Variant::KernelVxlan, 8.0)),
                on("container", record(0, Variant::Vxlan, 2.0)),
            ],
            background: Vec::new(),
        };
        assert_eq!(report.underlays(), vec![Underlay::Wire, Underlay::Container]);
        assert_eq!(report.for_underlay(Underlay::Wire).ratio("vxlan", "kernel-vxlan", Metric::Tcp1), Some(0.75));
        assert_eq!(report.for_underlay(Underlay::Container).ratio("vxlan", "kernel-vxlan", Metric::Tcp1), Some(0.25));
        let markdown = render_markdown(&report);
        assert!(markdown.contains("## Wire-like underlay") && markdown.contains("## Container-style underlay"), "{markdown}");
        assert!(markdown.contains("**0.75×**") && markdown.contains("**0.25×**"), "{markdown}");
        let summary = summary_line(&report);
        assert!(summary.contains("wire-like underlay**, single-stream TCP over our VXLAN runs at **0.75×**"), "{summary}");
        assert!(summary.contains("container-style underlay**, single-stream TCP over our VXLAN runs at **0.25×**"), "{summary}");
        // A report from before the underlay field reads as the wire-like one.
        let old: Record = serde_json::from_str(r#"{"round":0,"variant":"vxlan","test":"tcp1","values":{},"cpu":{"user":0,"system":0,"softirq":0,"irq":0},"wall":1}"#).unwrap();
        assert_eq!(old.underlay, "wire");
    }

    #[test]
    fn readme_summary_is_replaced_between_the_markers_only() {
        let path = std::env::temp_dir().join(crate::unique_name("ovbench-readme"));
        std::fs::write(&path, format!("intro\n{SUMMARY_START}\nold\n{SUMMARY_END}\nrest\n")).unwrap();
        update_readme(&path, "new line").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), format!("intro\n{SUMMARY_START}\nnew line\n{SUMMARY_END}\nrest\n"));
        std::fs::write(&path, "no markers\n").unwrap();
        assert!(update_readme(&path, "x").unwrap_err().contains("markers"));
        let _ = std::fs::remove_file(&path);
    }
}
