//! A multi-node cluster in network namespaces, shared by `cargo xtask lab`
//! and the integration tests.
//!
//! ```text
//!   pod ─ cni0 (10.244.i.1/24) ─ node i: eth0 192.168.77.(10+i)/24 ─┐
//!                                                                   br0 (underlay namespace)
//!   pod ─ cni0 (10.244.j.1/24) ─ node j: eth0 192.168.77.(10+j)/24 ─┘
//! ```
//!
//! Each node runs its own `overlay-agent run` (entered with `nsenter --net`,
//! so it shares the host's bpffs) against one shared nodes directory, with
//! its own pin root. Pods are namespaces behind a veth on the node's `cni0`
//! bridge, as flannel's CNI plugin sets them up. Dropping a [`Lab`] stops
//! the agents and removes namespaces, manifests and pins.
//!
//! With [`Underlay::Nic`], inside a VM xtask booted, each node's `eth0` is
//! one of the VM's virtio-net NICs instead, joined to the other node's by a
//! QEMU hub rather than `br0`.
//!
//! With [`LabSpec::kubernetes`], a real control plane
//! ([`crate::control_plane`]) in the underlay namespace serves the Nodes
//! instead, and the pod CIDRs (hence the pods' addresses) are the ones its
//! controller-manager allocates.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{NetNs, PinDir, TempDir, control_plane::ControlPlane, etcd::{Etcd, EtcdTls}, run};

/// What an agent logs once its initial sync is in the datapath.
pub const READY_LOG: &str = "ready: the initial sync is in the datapath";

/// Underlay MTU of the lab's veths (Ethernet default).
pub const UNDERLAY_MTU: u32 = 1500;
/// Pod MTU: the underlay minus VXLAN's 50 bytes.
pub const POD_MTU: u32 = UNDERLAY_MTU - overlay_common::VXLAN_OVERHEAD;

/// What to build.
#[derive(Debug, Clone)]
pub struct LabSpec {
    pub nodes: usize,
    pub pods_per_node: usize,
    /// Path to the `overlay-agent` binary.
    pub agent: PathBuf,
    /// `--decap` passed to every agent.
    pub decap: String,
    /// `--forward` passed to every agent: `kernel` or `bpf` (the fast path
    /// on the nodes' `cni0`).
    pub forward: String,
    /// Prefix of every name the lab creates.
    pub prefix: String,
    /// One underlay segment, or two joined by a router.
    pub topology: Topology,
    /// The agents' `--backend` (`vxlan` or `host-gw`), also advertised in
    /// the manifests' `backend-type`.
    pub backend: String,
    /// The agents' `--direct-routing`.
    pub direct_routing: bool,
    /// How many nodes (the last ones) are programmed by the kernel alone,
    /// exactly as flannel's backend does, instead of by our agent.
    pub flannel_nodes: usize,
    /// Run a real control plane ([`ControlPlane`]: etcd, kube-apiserver at
    /// [`API_ADDR`] and kube-controller-manager, in the underlay namespace),
    /// register the Nodes there as kubelet does, take their pod CIDRs from
    /// the controller-manager, and run the agents with `--kubeconfig` (a
    /// token of deploy/overlay.yaml's ServiceAccount) and `--net-conf`,
    /// instead of a manifest directory.
    pub kubernetes: bool,
    /// flannel's etcd mode: run an etcd cluster of this many members in the
    /// underlay namespace (at [`ETCD_FIRST_IP`] and up) and the agents with
    /// `--etcd-endpoints`; 0 for the other sources. Each node's subnet.env
    /// names its lab pod CIDR, so agents reclaim it as flanneld does.
    pub etcd_members: usize,
    /// The lab's etcd (at least one member) serves clients over TLS, to
    /// clients with a certificate of its CA only; the agents and flanneld
    /// get `--etcd-cafile`, `--etcd-certfile` and `--etcd-keyfile`.
    pub etcd_tls: bool,
    /// The flannel nodes run real flanneld ([`crate::flanneld_binary`]) in
    /// etcd mode against the lab's etcd (at least one member), with our
    /// agents in etcd mode too, instead of the hand-programmed `flannel.1`.
    pub real_flannel: bool,
    /// The flannel nodes' backend: `vxlan` (the kernel vxlan device
    /// `flannel.1`) or `host-gw` (plain routes via the peers' node IPs).
    pub flannel_backend: String,
    /// What the links between the nodes are like.
    pub underlay: Underlay,
    /// Run the agents with flannel's `net-conf.json` and `--subnet-file`,
    /// as deployed (which also installs the masquerade and FORWARD rules),
    /// instead of `--backend`/`--direct-routing`. Implied by `kubernetes`.
    pub net_conf: bool,
    /// An "outside" namespace beyond the cluster, at [`OUTSIDE_ADDR`],
    /// which every node routes to through the underlay.
    pub outside: bool,
    /// Extra arguments for every agent's `run`.
    pub agent_args: Vec<String>,
}

impl LabSpec {
    pub fn new(agent: PathBuf) -> Self {
        Self {
            nodes: 3,
            pods_per_node: 2,
            agent,
            decap: "auto".to_owned(),
            // The agent's default.
            forward: "bpf".to_owned(),
            // Not `ovlab`: `cargo xtask lab -- --down` removes every
            // `ovlab*` lab, and must not pull one out from under a test.
            prefix: crate::unique_name("ovtest"),
            flannel_nodes: 0,
            flannel_backend: "vxlan".to_owned(),
            topology: Topology::Flat,
            backend: "vxlan".to_owned(),
            direct_routing: false,
            kubernetes: false,
            underlay: Underlay::Wire,
            net_conf: false,
            outside: false,
            agent_args: Vec::new(),
            etcd_members: 0,
            etcd_tls: false,
            real_flannel: false,
        }
    }
}

/// What the links between the nodes are like: the two kinds of underlay a
/// pod network meets, which favour different datapaths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum Underlay {
    /// Like a wire between VMs or NICs: the underlay's bridge ports have
    /// TSO/GSO off (MTU-sized frames between nodes) and a packet queue, and
    /// the nodes' `eth0` have GRO on, as NICs do.
    Wire,
    /// Like kind, k3d or other Docker-based nodes: plain veths with their
    /// default features, so 64 KB GSO frames pass from node to node whole,
    /// and no GRO is forced on.
    Container,
    /// A VM's NICs: each node's `eth0` is a virtio-net NIC of the VM the lab
    /// runs in (native XDP, GRO at the driver), joined to the other node's
    /// by QEMU's hub: MTU-sized frames and no offloads. Only inside a VM
    /// xtask boots with NIC pairs ([`NIC_MAC_PREFIX`]): `cargo xtask bench
    /// --underlay nic`'s, and the VM stage's (`nic_underlay.rs`); two nodes
    /// per lab, one pair each.
    Nic,
}

/// The first four bytes of the MAC of every NIC xtask gives its VMs
/// (`xtask/src/vmtest.rs`); then the pair's number and the end (1 or 2). A
/// lab with the NIC underlay takes only NICs with this prefix.
pub const NIC_MAC_PREFIX: [u8; 4] = [0x52, 0x54, 0x00, 0x0f];

impl Underlay {
    /// The underlays a lab builds from veths on any machine (`--underlay
    /// both`); [`Underlay::Nic`] needs the bench's VM.
    pub const ALL: [Self; 2] = [Self::Wire, Self::Container];
    /// Every underlay a report may hold.
    pub const KINDS: [Self; 3] = [Self::Wire, Self::Container, Self::Nic];

    /// The name on the command line and in results.json.
    pub fn key(self) -> &'static str {
        match self {
            Self::Wire => "wire",
            Self::Container => "container",
            Self::Nic => "nic",
        }
    }

    pub fn from_key(key: &str) -> Option<Self> {
        Self::KINDS.into_iter().find(|u| u.key() == key)
    }

    /// A short label for headings.
    pub fn label(self) -> &'static str {
        match self {
            Self::Wire => "wire-like underlay",
            Self::Container => "container-style underlay",
            Self::Nic => "VM NIC underlay",
        }
    }

    /// What the lab builds, for reports.
    pub fn description(self) -> &'static str {
        match self {
            Self::Wire => "wire-like, as between VMs or NICs: TSO/GSO off on the underlay bridge ports, so frames between nodes are MTU-sized; a packet queue (`pfifo`, 1000) on them, as a switch buffers; GRO on at the nodes' `eth0`, as on NICs",
            Self::Container => "container-style, as kind, k3d and Docker-based nodes have: plain veths on the underlay bridge with their default features (64 KB GSO frames pass from node to node whole, `noqueue`), GRO left at veth's default (off)",
            Self::Nic => "a VM's NICs, as between VMs: each node's `eth0` is a virtio-net NIC (native XDP, GRO on, as the driver has it) of a QEMU VM (Debian's 6.1 kernel, emulated: TCG), joined to the other node's by QEMU's hub, which passes MTU-sized frames and offers no offloads (no checksum offload, no TSO: the sender's TCP sends MTU-sized segments)",
        }
    }
}

/// The underlay's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// Every node on one segment, 192.168.77.0/24.
    Flat,
    /// The first half of the nodes on 192.168.77.0/24, the rest on
    /// 192.168.88.0/24, joined by a router namespace (`.1` on both).
    Routed,
}

/// The underlay subnets' third octet and bridge names.
const SUBNETS: [(u8, &str); 2] = [(77, "br0"), (88, "br1")];

/// Where kube-apiserver listens in a `kubernetes` lab: an address of the
/// underlay namespace on the first segment, reachable from every node and
/// from nothing outside the lab.
pub const API_ADDR: &str = "192.168.77.2:6443";

/// A host outside the cluster (TEST-NET-3, never routed on the internet),
/// on a `lo` of the outside namespace.
pub const OUTSIDE_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The outside namespace's leg on the first underlay segment: a host on
/// the nodes' segment that is not a node.
pub const OUTSIDE_GATEWAY: &str = "192.168.77.254";
/// deploy/overlay.yaml, whose RBAC the agents of a `kubernetes` lab run with.
pub fn deploy_manifest() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/overlay.yaml")
}

/// The objects of deploy/overlay.yaml the lab applies: the agents' identity
/// and its RBAC (no kubelet runs the DaemonSet here).
pub const RBAC_KINDS: [&str; 6] = ["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"];

/// The first etcd member's address in an etcd lab (the next members take
/// the following addresses), on the underlay's first segment.
pub const ETCD_FIRST_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 3);

/// The network config an etcd lab writes at `/coreos.com/network/config`.
pub const ETCD_PREFIX: &str = "/coreos.com/network";

/// The agents' `--metrics-addr` (each in its own node namespace).
pub const METRICS_PORT: u16 = 9472;

/// What [`Lab::ping_throughout`] saw.
#[derive(Debug)]
pub struct PingRun {
    /// Whether ping was still running when `during` had returned.
    pub ran_throughout: bool,
    /// Echo requests sent.
    pub transmitted: u32,
    /// Distinct requests answered.
    pub replies: u32,
    /// Sequence numbers of requests without a reply, but for the last one.
    pub unanswered: Vec<u32>,
}

pub struct LabPod {
    pub ns: NetNs,
    pub ip: Ipv4Addr,
}

pub struct LabNode {
    pub name: String,
    /// Programmed as flannel does (kernel vxlan device or host-gw routes,
    /// per [`LabSpec::flannel_backend`]) rather than by our agent.
    pub flannel: bool,
    pub ip: Ipv4Addr,
    pub pod_cidr: String,
    pub pin_root: PathBuf,
    pub pods: Vec<LabPod>,
    pub ns: NetNs,
    /// Flags for this node's agent alone, after the lab's
    /// ([`LabSpec::agent_args`]); read whenever the agent starts.
    pub agent_args: Vec<String>,
    log: PathBuf,
}

/// A running lab. Field order is drop order: agents stop before their
/// namespaces go, then the pins, then the work directory (logs last).
pub struct Lab {
    /// Real flanneld per flannel node of a `real_flannel` lab.
    flanneld: Vec<Option<ChildGuard>>,
    agents: Vec<Option<Child>>,
    /// The control plane of a `kubernetes` lab.
    pub kube: Option<ControlPlane>,
    /// The etcd cluster of an etcd lab.
    pub etcd: Option<Etcd>,
    pub nodes: Vec<LabNode>,
    /// The router joining the two subnets of a routed topology.
    pub router: Option<NetNs>,
    /// The host beyond the cluster ([`LabSpec::outside`]).
    pub outside: Option<NetNs>,
    pub underlay: NetNs,
    pub nodes_dir: PathBuf,
    spec: LabSpec,
    _pins: PinDir,
    /// Manifests, kubeconfigs, agent logs.
    work_dir: TempDir,
}

/// `nsenter --net=/run/netns/<ns> <program> <args>`, returning success.
fn ns_ok(ns: &NetNs, program: &str, args: &[&str]) -> bool {
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.name()))
        .arg(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Lab {
    /// Builds the namespaces, writes the manifests and starts the agents,
    /// waiting until every agent has programmed its routes.
    pub fn start(mut spec: LabSpec) -> Result<Self, String> {
        if spec.real_flannel || spec.etcd_tls {
            spec.etcd_members = spec.etcd_members.max(1);
        }
        // Before anything is created: a spec the NICs cannot carry, or no
        // free pair, leaves nothing behind.
        let nics = if spec.underlay == Underlay::Nic { Some(claim_nic_pair(&spec)?) } else { None };
        let work_dir = TempDir::at(std::env::temp_dir().join(&spec.prefix));
        let nodes_dir = work_dir.path().join("nodes");
        fs::create_dir_all(&nodes_dir).map_err(|e| format!("creating {}: {e}", nodes_dir.display()))?;
        let pins = PinDir::at(Path::new(overlay_agent::bpffs::BPFFS_MOUNT).join(&spec.prefix));
        let underlay = NetNs::with_name(format!("{}-ul", spec.prefix));
        for (_, bridge) in SUBNETS {
            let _ = underlay.ip(&["link", "add", bridge, "type", "bridge"]);
            let _ = underlay.ip(&["link", "set", bridge, "up"]);
        }
        // The underlay is a switch: no iptables on what it bridges. Once
        // anything on the machine has loaded br_netfilter, every new
        // namespace's bridges call iptables' FORWARD for each frame
        // (`br_nf_forward_ip`, a fifth of the path in the bench's
        // profiles, for every variant alike). Per namespace since 5.3;
        // absent (and nothing to do) without the module.
        let _ = Command::new("ip")
            .args(["netns", "exec", underlay.name(), "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0"])
            .stderr(Stdio::null())
            .status();
        let router = (spec.topology == Topology::Routed).then(|| Self::make_router(&spec, &underlay));

        let (kube, pod_cidrs) = if spec.kubernetes {
            let (kube, cidrs) = Self::start_control_plane(&spec, &underlay, work_dir.path())?;
            (Some(kube), cidrs)
        } else {
            (None, (1..=spec.nodes).map(|i| format!("10.244.{i}.0/24")).collect())
        };
        let mut nodes = Vec::new();
        for (i, pod_cidr) in (1..=spec.nodes).zip(pod_cidrs) {
            let nic = nics.as_ref().map(|pair| pair[i - 1].as_str());
            nodes.push(Self::make_node(&spec, &underlay, i, nic, &pins, pod_cidr)?);
        }
        let etcd = match spec.etcd_members {
            0 => None,
            members => {
                let ips: Vec<Ipv4Addr> = (0..members as u32).map(|k| Ipv4Addr::from(ETCD_FIRST_IP.to_bits() + k)).collect();
                for ip in &ips {
                    let _ = underlay.ip(&["addr", "add", &format!("{ip}/24"), "dev", SUBNETS[0].1]);
                }
                let etcd = if spec.etcd_tls {
                    Etcd::start_tls(&underlay, &ips, work_dir.path().to_owned())?
                } else {
                    Etcd::start(&underlay, &ips, work_dir.path().to_owned())?
                };
                let config = serde_json::json!({
                    "Network": crate::control_plane::CLUSTER_CIDR,
                    "Backend": {"Type": spec.backend, "DirectRouting": spec.direct_routing},
                });
                etcd.put(&format!("{ETCD_PREFIX}/config"), &config.to_string(), None)?;
                Some(etcd)
            }
        };
        let outside = spec.outside.then(|| Self::make_outside(&spec, &underlay, &nodes, router.as_ref()));
        let flanneld = nodes.iter().map(|_| None).collect();
        let mut lab = Self { flanneld, agents: Vec::new(), kube, etcd, nodes, router, outside, underlay, nodes_dir, spec, _pins: pins, work_dir };
        if let Some(kube) = &lab.kube {
            // The agents' identity and permissions: exactly deploy/overlay.yaml's.
            kube.apply_manifest(&deploy_manifest(), &RBAC_KINDS, false).map_err(|e| e.to_string())?;
            let token = kube.service_account_token("overlay-system", "overlay-agent").map_err(|e| e.to_string())?;
            kube.write_token_kubeconfig(&lab.kubeconfig_path(), &token).map_err(|e| e.to_string())?;
        }
        if lab.uses_net_conf() {
            let net_conf = serde_json::json!({
                "Network": crate::control_plane::CLUSTER_CIDR,
                "Backend": {"Type": lab.spec.backend, "DirectRouting": lab.spec.direct_routing},
            });
            fs::write(lab.net_conf_path(), net_conf.to_string()).map_err(|e| format!("writing net-conf.json: {e}"))?;
        }
        for i in 0..lab.nodes.len() {
            if lab.etcd.is_some() {
                let env = format!("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.{}.1/24\nFLANNEL_MTU={POD_MTU}\nFLANNEL_IPMASQ=false\n", i + 1);
                fs::write(lab.subnet_file(i), env).map_err(|e| format!("writing subnet.env: {e}"))?;
            }
            lab.write_manifest(i);
        }
        for i in 0..lab.nodes.len() {
            if lab.nodes[i].flannel && lab.spec.real_flannel {
                lab.flanneld[i] = Some(ChildGuard(lab.spawn_flanneld(i)?));
                lab.agents.push(None);
            } else if lab.nodes[i].flannel {
                lab.program_flannel_node(i)?;
                lab.agents.push(None);
            } else {
                let agent = lab.spawn_agent(i)?;
                lab.agents.push(Some(agent));
            }
        }
        let peers = lab.nodes.len() - 1;
        for i in 0..lab.nodes.len() {
            if !lab.nodes[i].flannel {
                lab.wait_for_routes(i, peers, Duration::from_secs(20))?;
            }
        }
        for i in 0..lab.nodes.len() {
            if lab.flanneld[i].is_some() {
                lab.wait_for_flanneld(i, peers, Duration::from_secs(30))?;
            }
        }
        if lab.spec.forward == "bpf" {
            lab.wait_for_fast_path(Duration::from_secs(15))?;
        }
        Ok(lab)
    }

    /// Waits until every agent has enrolled all its pods in the fast path
    /// (`POD_PORTS`, as `inspect` lists it), `timeout` stretched by
    /// [`crate::scaled`]. A bridge learns a pod's MAC from the pod's
    /// frames, so each pod first says hello to its gateway.
    pub fn wait_for_fast_path(&self, timeout: Duration) -> Result<(), String> {
        for node in self.nodes.iter().filter(|n| !n.flannel) {
            for pod in &node.pods {
                let gateway = Ipv4Addr::from(pod.ip.to_bits() & !0xff | 1);
                if !Self::ping(&pod.ns, gateway) {
                    return Err(format!("{} cannot reach its gateway {gateway}", pod.ip));
                }
            }
        }
        let deadline = Instant::now() + crate::scaled(timeout);
        for (i, node) in self.nodes.iter().enumerate().filter(|(_, n)| !n.flannel) {
            loop {
                let text = self.inspect(i);
                let enrolled = text
                    .split("POD_PORTS")
                    .nth(1)
                    .map_or(0, |t| t.split("\n\n").next().unwrap_or("").lines().count().saturating_sub(2));
                if enrolled >= node.pods.len() {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!("{} enrolled {enrolled} of {} pods in the fast path:\n{text}", node.name, node.pods.len()));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        Ok(())
    }

    /// Starts the control plane in the underlay namespace, registers every
    /// node's Node object as its kubelet would (InternalIP, no pod CIDR;
    /// flannel nodes with the annotations flanneld publishes), and returns
    /// the pod CIDRs the controller-manager allocated, in node order.
    fn start_control_plane(spec: &LabSpec, underlay: &NetNs, work_dir: &Path) -> Result<(ControlPlane, Vec<String>), String> {
        let api_ip = API_ADDR.split(':').next().expect("host:port");
        let _ = underlay.ip(&["addr", "add", &format!("{api_ip}/24"), "dev", SUBNETS[0].1]);
        let kube = ControlPlane::start(Some(underlay), api_ip.parse().expect("valid address"), &work_dir.join("control-plane"))
            .map_err(|e| e.to_string())?;
        let names: Vec<String> = (1..=spec.nodes).map(|i| format!("node{i}")).collect();
        for (i, name) in (1..=spec.nodes).zip(&names) {
            let ip = Self::node_ip(spec, i);
            let annotations = (i > spec.nodes - spec.flannel_nodes).then(|| {
                let mac = overlay_agent::node::format_mac(Self::flannel_vtep_mac(i - 1));
                serde_json::json!({
                    "flannel.alpha.coreos.com/backend-type": spec.flannel_backend,
                    "flannel.alpha.coreos.com/backend-data":
                        if spec.flannel_backend == "host-gw" { "null".to_owned() } else { format!("{{\"VNI\":1,\"VtepMAC\":\"{mac}\"}}") },
                    "flannel.alpha.coreos.com/public-ip": ip.to_string(),
                    "flannel.alpha.coreos.com/kube-subnet-manager": "true",
                })
            });
            kube.register_node(name, ip, annotations).map_err(|e| e.to_string())?;
        }
        let cidrs = kube.wait_for_pod_cidrs(&names, Duration::from_secs(90)).map_err(|e| e.to_string())?;
        Ok((kube, cidrs))
    }

    /// Node `i`'s underlay address (1-based).
    fn node_ip(spec: &LabSpec, i: usize) -> Ipv4Addr {
        let second_half = spec.topology == Topology::Routed && i > spec.nodes.div_ceil(2);
        Ipv4Addr::new(192, 168, SUBNETS[usize::from(second_half)].0, 10 + i as u8)
    }

    /// Node `i`: its namespace, `eth0` on the underlay (a veth into the
    /// underlay's bridge, or `nic`, moved in), `cni0` and its pods.
    /// Node `i`'s (from 1) veth into the underlay: `eth0` in its namespace
    /// (with `mac`, or veth's random one), port `n<i>` on its segment's
    /// bridge; then set up.
    fn plug_into_underlay(spec: &LabSpec, underlay: &NetNs, ns: &NetNs, i: usize, mac: Option<&str>) {
        let second_half = spec.topology == Topology::Routed && i > spec.nodes.div_ceil(2);
        let bridge = SUBNETS[usize::from(second_half)].1;
        let port = format!("n{i}");
        let address: &[&str] = match mac {
            Some(mac) => &["address", mac],
            None => &[],
        };
        let peer = [&["link", "add", port.as_str(), "type", "veth", "peer", "name", "eth0"][..], address, &["netns", ns.name()]].concat();
        let _ = underlay.ip(&peer);
        let _ = underlay.ip(&["link", "set", &port, "master", bridge, "up"]);
        if spec.underlay == Underlay::Wire {
            wire_like(underlay, &port);
        }
        Self::set_up_underlay_link(spec, ns, i);
    }

    /// Node `i`'s `eth0`: its address, MTU, route and features.
    fn set_up_underlay_link(spec: &LabSpec, ns: &NetNs, i: usize) {
        let second_half = spec.topology == Topology::Routed && i > spec.nodes.div_ceil(2);
        let octet = SUBNETS[usize::from(second_half)].0;
        let ip = Self::node_ip(spec, i);
        let _ = ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
        let _ = ns.ip(&["link", "set", "eth0", "mtu", &UNDERLAY_MTU.to_string(), "up"]);
        if spec.topology == Topology::Routed {
            let _ = ns.ip(&["route", "add", "default", "via", &format!("192.168.{octet}.1")]);
        }
        // Wire-like: GRO on, as on a physical NIC (veth defaults to off): it
        // aggregates what XDP decapsulated before the stack forwards it to
        // the pod. A container's veth keeps its default.
        if spec.underlay == Underlay::Wire {
            let _ = run("ip", &["netns", "exec", ns.name(), "ethtool", "-K", "eth0", "gro", "on"]);
        }
    }

    /// Deletes node `i`'s (from 0) `eth0` and makes it again as the lab
    /// made it, under a new index but with its MAC (the neighbours' entries
    /// stay right): a NIC whose driver was reloaded, a bond made again.
    /// Veth underlays only.
    pub fn recreate_underlay_link(&self, i: usize) {
        let ns = &self.nodes[i].ns;
        let link = String::from_utf8_lossy(&ns.ip(&["-o", "link", "show", "eth0"]).stdout).into_owned();
        let mac = link.split("link/ether ").nth(1).and_then(|s| s.split_whitespace().next()).unwrap_or_else(|| panic!("eth0's MAC: {link}")).to_owned();
        let out = ns.ip(&["link", "del", "eth0"]);
        assert!(out.status.success(), "deleting node {}'s eth0: {}", i + 1, String::from_utf8_lossy(&out.stderr));
        Self::plug_into_underlay(&self.spec, &self.underlay, ns, i + 1, Some(&mac));
    }

    fn make_node(spec: &LabSpec, underlay: &NetNs, i: usize, nic: Option<&str>, pins: &PinDir, pod_cidr: String) -> Result<LabNode, String> {
        let ns = NetNs::with_name(format!("{}-n{i}", spec.prefix));
        // Pods are numbered inside the node's /24: gateway .1, pods .11, .12, …
        let base: Ipv4Addr = pod_cidr
            .strip_suffix("/24")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| format!("node{i}'s pod CIDR {pod_cidr} is not a /24"))?;
        let in_cidr = |host: u32| Ipv4Addr::from(base.to_bits() + host);
        if let Some(nic) = nic {
            // Back in the VM's own namespace when the node's is deleted.
            let moved = Command::new("ip")
                .args(["link", "set", nic, "netns", ns.name(), "name", "eth0"])
                .output()
                .map_err(|e| format!("running ip: {e}"))?;
            if !moved.status.success() {
                return Err(format!("moving NIC {nic} into {}: {}", ns.name(), String::from_utf8_lossy(&moved.stderr).trim()));
            }
            Self::set_up_underlay_link(spec, &ns, i);
        } else {
            Self::plug_into_underlay(spec, underlay, &ns, i, None);
        }
        let _ = run("ip", &["netns", "exec", ns.name(), "sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        let gateway = in_cidr(1).to_string();
        let _ = ns.ip(&["link", "add", "cni0", "type", "bridge"]);
        let _ = ns.ip(&["addr", "add", &format!("{gateway}/24"), "dev", "cni0"]);
        let _ = ns.ip(&["link", "set", "cni0", "mtu", &POD_MTU.to_string(), "up"]);
        let mut pods = Vec::new();
        for j in 1..=spec.pods_per_node {
            let pod = NetNs::with_name(format!("{}-n{i}p{j}", spec.prefix));
            let pod_ip = in_cidr(10 + j as u32);
            let veth = format!("p{j}");
            let _ = ns.ip(&["link", "add", &veth, "mtu", &POD_MTU.to_string(), "type", "veth", "peer", "name", "eth0", "netns", pod.name()]);
            let _ = ns.ip(&["link", "set", &veth, "master", "cni0", "up"]);
            let _ = pod.ip(&["addr", "add", &format!("{pod_ip}/24"), "dev", "eth0"]);
            let _ = pod.ip(&["link", "set", "eth0", "mtu", &POD_MTU.to_string(), "up"]);
            let _ = pod.ip(&["route", "add", "default", "via", &gateway]);
            pods.push(LabPod { ns: pod, ip: pod_ip });
        }
        Ok(LabNode {
            name: format!("node{i}"),
            flannel: i > spec.nodes - spec.flannel_nodes,
            ip: Self::node_ip(spec, i),
            pod_cidr,
            pin_root: pins.path().join(format!("node{i}")),
            pods,
            log: std::env::temp_dir().join(&spec.prefix).join(format!("node{i}.log")),
            ns,
            agent_args: Vec::new(),
        })
    }

    /// The outside namespace: a leg on the first underlay segment
    /// ([`OUTSIDE_GATEWAY`]) and [`OUTSIDE_ADDR`], with routes between it
    /// and every node (through the router for the second segment). It has
    /// no route to the pod network: only masqueraded pod traffic can get a
    /// reply.
    fn make_outside(spec: &LabSpec, underlay: &NetNs, nodes: &[LabNode], router: Option<&NetNs>) -> NetNs {
        let outside = NetNs::with_name(format!("{}-out", spec.prefix));
        let _ = underlay.ip(&["link", "add", "out", "type", "veth", "peer", "name", "eth0", "netns", outside.name()]);
        let _ = underlay.ip(&["link", "set", "out", "master", SUBNETS[0].1, "up"]);
        wire_like(underlay, "out");
        let _ = outside.ip(&["addr", "add", &format!("{OUTSIDE_GATEWAY}/24"), "dev", "eth0"]);
        let _ = outside.ip(&["link", "set", "eth0", "up"]);
        let _ = outside.ip(&["addr", "add", &format!("{OUTSIDE_ADDR}/32"), "dev", "lo"]);
        let beyond = format!("{OUTSIDE_ADDR}/32");
        if let Some(router) = router {
            let _ = outside.ip(&["route", "add", &format!("192.168.{}.0/24", SUBNETS[1].0), "via", "192.168.77.1"]);
            let _ = router.ip(&["route", "add", &beyond, "via", OUTSIDE_GATEWAY]);
        }
        for node in nodes.iter().filter(|n| n.ip.octets()[2] == SUBNETS[0].0) {
            let _ = node.ns.ip(&["route", "add", &beyond, "via", OUTSIDE_GATEWAY]);
        }
        outside
    }

    /// Whether the agents run with `net-conf.json` (see [`LabSpec::net_conf`]).
    fn uses_net_conf(&self) -> bool {
        self.spec.kubernetes || self.spec.net_conf
    }

    /// A router namespace with a leg on each underlay subnet (`.1`).
    fn make_router(spec: &LabSpec, underlay: &NetNs) -> NetNs {
        let router = NetNs::with_name(format!("{}-rt", spec.prefix));
        for (leg, (octet, bridge)) in SUBNETS.iter().enumerate() {
            let port = format!("r{leg}");
            let inside = format!("leg{leg}");
            let _ = underlay.ip(&["link", "add", &port, "type", "veth", "peer", "name", &inside, "netns", router.name()]);
            let _ = underlay.ip(&["link", "set", &port, "master", bridge, "up"]);
            if spec.underlay == Underlay::Wire {
                wire_like(underlay, &port);
            }
            let _ = router.ip(&["addr", "add", &format!("192.168.{octet}.1/24"), "dev", &inside]);
            let _ = router.ip(&["link", "set", &inside, "up"]);
        }
        let _ = run("ip", &["netns", "exec", router.name(), "sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        router
    }

    /// The manifest file of node `i`.
    pub fn manifest_path(&self, i: usize) -> PathBuf {
        self.nodes_dir.join(format!("{}.yaml", self.nodes[i].name))
    }

    /// The VTEP MAC node `i` advertises: our agent's default for our nodes,
    /// an unrelated locally administered one for flannel nodes (so the test
    /// proves annotations are honoured, not guessed).
    pub fn vtep_mac(&self, i: usize) -> [u8; 6] {
        let node = &self.nodes[i];
        // Real flanneld picks its own; our agents keep what a lease says.
        if let Some(mac) = self.lease_vtep_mac(i) {
            return mac;
        }
        if node.flannel {
            Self::flannel_vtep_mac(i)
        } else {
            overlay_agent::desired::default_vtep_mac(node.ip)
        }
    }

    fn flannel_vtep_mac(i: usize) -> [u8; 6] {
        [0x0a, 0xfe, 0, 0, 0, i as u8 + 1]
    }

    /// (Re)writes node `i`'s Node manifest, with flannel's annotations as
    /// flanneld (or our agent) publishes them.
    pub fn write_manifest(&self, i: usize) {
        let node = &self.nodes[i];
        let mac = overlay_agent::node::format_mac(self.vtep_mac(i));
        let backend = if node.flannel { &self.spec.flannel_backend } else { &self.spec.backend };
        let (backend, data) = if backend == "host-gw" {
            ("host-gw", "null".to_owned())
        } else {
            ("vxlan", format!("{{\"VNI\":1,\"VtepMAC\":\"{mac}\"}}"))
        };
        let yaml = format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  annotations:\n    flannel.alpha.coreos.com/backend-type: {backend}\n    flannel.alpha.coreos.com/backend-data: '{data}'\n    flannel.alpha.coreos.com/public-ip: {ip}\n    flannel.alpha.coreos.com/kube-subnet-manager: \"true\"\nspec:\n  podCIDR: {cidr}\n  podCIDRs: [{cidr}]\nstatus:\n  addresses:\n  - type: InternalIP\n    address: {ip}\n  - type: Hostname\n    address: {name}\n",
            name = node.name,
            cidr = node.pod_cidr,
            ip = node.ip,
        );
        // Write-then-rename so the agent never reads half a file.
        let tmp = self.nodes_dir.join(format!(".{}.tmp", node.name));
        fs::write(&tmp, yaml).expect("writing manifest");
        fs::rename(&tmp, self.manifest_path(i)).expect("renaming manifest");
    }

    /// Node `i` as kubelet and the controller-manager write it (pod CIDR,
    /// addresses, `Ready`). Our agents
    /// publish their flannel annotations themselves; flannel nodes get them
    /// as flanneld would have published them.
    pub fn node_object(&self, i: usize) -> serde_json::Value {
        let node = &self.nodes[i];
        let mut object = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": node.name, "labels": {"kubernetes.io/hostname": node.name}},
            "spec": {"podCIDR": node.pod_cidr, "podCIDRs": [node.pod_cidr]},
            "status": {
                "addresses": [{"type": "InternalIP", "address": node.ip.to_string()}, {"type": "Hostname", "address": node.name}],
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
            },
        });
        if node.flannel {
            let mac = overlay_agent::node::format_mac(self.vtep_mac(i));
            object["metadata"]["annotations"] = serde_json::json!({
                "flannel.alpha.coreos.com/backend-type": "vxlan",
                "flannel.alpha.coreos.com/backend-data": format!("{{\"VNI\":1,\"VtepMAC\":\"{mac}\"}}"),
                "flannel.alpha.coreos.com/public-ip": node.ip.to_string(),
                "flannel.alpha.coreos.com/kube-subnet-manager": "true",
            });
        }
        object
    }

    pub fn kubeconfig_path(&self) -> PathBuf {
        self.work_dir.path().join("kubeconfig")
    }

    pub fn net_conf_path(&self) -> PathBuf {
        self.work_dir.path().join("net-conf.json")
    }

    /// The subnet.env node `i`'s agent writes when it runs with net-conf.json.
    pub fn subnet_file(&self, i: usize) -> PathBuf {
        self.work_dir.path().join(format!("{}-subnet.env", self.nodes[i].name))
    }

    /// `GET path` from node `i`'s agent (/healthz, /readyz, /metrics):
    /// the status code and body.
    pub fn agent_http(&self, i: usize, path: &str) -> Result<(u16, String), String> {
        let _inside = self.nodes[i].ns.enter();
        let mut conn = TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, METRICS_PORT).into(), Duration::from_secs(2))
            .map_err(|e| format!("connecting to the agent of {}: {e}", self.nodes[i].name))?;
        conn.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
        write!(conn, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").map_err(|e| e.to_string())?;
        let mut response = String::new();
        conn.read_to_string(&mut response).map_err(|e| e.to_string())?;
        let status = response
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("not an HTTP response: {response}"))?;
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        Ok((status, body))
    }

    /// The VtepMAC in node `i`'s lease, in an etcd lab.
    fn lease_vtep_mac(&self, i: usize) -> Option<[u8; 6]> {
        let etcd = self.etcd.as_ref()?;
        let key = format!("{ETCD_PREFIX}/subnets/{}-{}", self.nodes[i].pod_cidr.split('/').next()?, 24);
        let leases = etcd.list(&key).ok()?;
        let value: serde_json::Value = serde_json::from_str(&leases.first()?.1).ok()?;
        overlay_agent::node::parse_mac(value["BackendData"]["VtepMAC"].as_str()?)
    }

    /// Where flanneld of node `i` logs.
    pub fn flanneld_log_path(&self, i: usize) -> PathBuf {
        self.work_dir.path().join(format!("{}-flanneld.log", self.nodes[i].name))
    }

    /// Starts real flanneld on node `i`, in etcd mode against the lab's
    /// etcd, on eth0, without masquerading (the lab's traffic stays inside
    /// the pod network), writing the subnet.env the lab seeded (so it
    /// reclaims the lab's pod CIDR, as flanneld does on restart).
    fn spawn_flanneld(&self, i: usize) -> Result<Child, String> {
        let etcd = self.etcd.as_ref().ok_or("real flanneld needs the lab's etcd")?;
        let binary = crate::flanneld_binary()?;
        let log_path = self.flanneld_log_path(i);
        let log = fs::File::create(&log_path).map_err(|e| format!("creating {}: {e}", log_path.display()))?;
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.nodes[i].ns.name()))
            .arg(&binary)
            .arg(format!("--etcd-endpoints={}", etcd.endpoints()))
            .args(etcd.tls.iter().flat_map(EtcdTls::client_flags))
            .arg(format!("--etcd-prefix={ETCD_PREFIX}"))
            .args(["--iface=eth0", "--ip-masq=false"])
            .arg(format!("--subnet-file={}", self.subnet_file(i).display()))
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", binary.display()))
    }

    /// Waits until flanneld on node `i` has a route to each of `peers`
    /// through flannel.1.
    fn wait_for_flanneld(&mut self, i: usize, peers: usize, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            // flanneld creates flannel.1 once it holds its lease: until then
            // `ip route show dev flannel.1` fails (no such device), which
            // here means no routes yet.
            let out = Command::new("ip")
                .args(["-n", self.nodes[i].ns.name(), "route", "show", "dev", "flannel.1"])
                .stderr(Stdio::null())
                .output()
                .map_err(|e| format!("running ip: {e}"))?;
            let routes = String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains(" via ")).count();
            if routes == peers {
                return Ok(());
            }
            if let Some(Some(child)) = self.flanneld.get_mut(i)
                && let Ok(Some(status)) = child.0.try_wait()
            {
                return Err(format!("flanneld on {} exited ({status}):\n{}", self.nodes[i].name, fs::read_to_string(self.flanneld_log_path(i)).unwrap_or_default()));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "flanneld on {} has {routes} of {peers} routes after {timeout:?}:\n{}",
                    self.nodes[i].name,
                    fs::read_to_string(self.flanneld_log_path(i)).unwrap_or_default()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Programs flannel node `i` from the Node manifests exactly as
    /// flannel's backend does. vxlan: `flannel.1` (VNI 1, port 8472,
    /// learning off) with the advertised VtepMAC and `<podCIDR>.0/32`, and
    /// per peer a permanent neighbour, an FDB entry and an onlink route.
    /// host-gw: per peer `<podCIDR> via <node IP> dev eth0`.
    fn program_flannel_node(&self, i: usize) -> Result<(), String> {
        let scan = overlay_agent::manifests::scan(&self.nodes_dir).map_err(|e| e.to_string())?;
        let me = scan.nodes.iter().find(|n| n.name == self.nodes[i].name).ok_or("own manifest missing")?;
        let ns = &self.nodes[i].ns;
        if self.spec.flannel_backend == "host-gw" {
            for peer in scan.nodes.iter().filter(|n| n.name != me.name) {
                let _ = ns.ip(&["route", "replace", &peer.pod_cidr.to_string(), "via", &peer.node_ip.to_string(), "dev", "eth0"]);
            }
            return Ok(());
        }
        let mac = overlay_agent::node::format_mac(me.vtep_mac.ok_or("no VtepMAC annotated")?);
        let _ = ns.ip(&["link", "add", "flannel.1", "address", &mac, "type", "vxlan", "id", "1", "local", &me.node_ip.to_string(), "dev", "eth0", "dstport", "8472", "nolearning"]);
        let _ = ns.ip(&["addr", "add", &format!("{}/32", me.pod_cidr.network()), "dev", "flannel.1"]);
        self.program_flannel_vxlan_peers(i, &scan)
    }

    /// Brings flannel node `i`'s `flannel.1` up and gives it, per peer,
    /// the neighbour, FDB entry and route flannel's vxlan backend programs.
    /// Every step replaces, so it also restores a device that was down
    /// (which lost its routes and neighbours).
    fn program_flannel_vxlan_peers(&self, i: usize, scan: &overlay_agent::manifests::Scan) -> Result<(), String> {
        let ns = &self.nodes[i].ns;
        let _ = ns.ip(&["link", "set", "flannel.1", "mtu", &POD_MTU.to_string(), "up"]);
        for peer in scan.nodes.iter().filter(|n| n.name != self.nodes[i].name) {
            let gw = peer.pod_cidr.network().to_string();
            let peer_mac = overlay_agent::node::format_mac(peer.vtep_mac.ok_or("peer without VtepMAC")?);
            let _ = ns.ip(&["neigh", "replace", &gw, "lladdr", &peer_mac, "dev", "flannel.1", "nud", "permanent"]);
            let _ = ns.exec("bridge", &["fdb", "replace", &peer_mac, "dev", "flannel.1", "dst", &peer.node_ip.to_string(), "self", "permanent"]);
            let _ = ns.ip(&["route", "replace", &peer.pod_cidr.to_string(), "via", &gw, "dev", "flannel.1", "onlink"]);
        }
        Ok(())
    }

    /// Takes the hand-programmed `flannel.1` of every flannel node down,
    /// or brings it up again with its neighbours, FDB entries and routes
    /// (the kernel deletes a down device's routes and neighbours; that
    /// is all programming it again restores). Down, the device closes its
    /// UDP socket. While any UDP tunnel socket is open on the machine, GRO
    /// looks one up for every UDP packet a NAPI receives
    /// (`udp_encap_needed_key` is one switch for all namespaces), so the
    /// bench keeps the kernel vxlan labs' devices down while it measures
    /// anything else, as nodes running anything else would not have them.
    /// Not for real flanneld's nodes, whose devices flanneld owns.
    pub fn set_flannel_vxlan_up(&self, up: bool) -> Result<(), String> {
        if self.spec.real_flannel || self.spec.flannel_backend != "vxlan" {
            return Ok(());
        }
        for i in (0..self.nodes.len()).filter(|&i| self.nodes[i].flannel) {
            if up {
                let scan = overlay_agent::manifests::scan(&self.nodes_dir).map_err(|e| e.to_string())?;
                self.program_flannel_vxlan_peers(i, &scan)?;
            } else {
                let _ = self.nodes[i].ns.ip(&["link", "set", "flannel.1", "down"]);
            }
        }
        Ok(())
    }

    /// Migrates flannel node `i` to our agent with flanneld stopped first
    /// (flannel's pod leaves the node, then ours starts): start the agent
    /// with `--remove-flannel-device` (its program takes over receiving,
    /// its routes replace flannel's, then it deletes `flannel.1`).
    pub fn convert_to_overlay(&mut self, i: usize) -> Result<(), String> {
        // Stopping flanneld leaves its device, neighbours and routes, which
        // keep forwarding until the agent takes over; its lease stays in
        // etcd, and the agent reuses it (same VtepMAC).
        self.stop_flanneld(i)?;
        self.start_agent_on_flannel_node(i)?;
        if self.spec.flannel_backend == "vxlan" {
            self.wait_for_no_flannel_device(i, Duration::from_secs(10))?;
        }
        self.nodes[i].flannel = false;
        Ok(())
    }

    /// Rolls node `i`, migrated to our agent, back to real flanneld the
    /// way the migration guide's "Rolling back one node" says: the agent
    /// leaves the node first (its datapath stays, pinned, and keeps
    /// forwarding), then flanneld starts again (its device, neighbours,
    /// FDB entries and routes replace ours), then `overlay-agent cleanup
    /// --keep-subnet-file` removes what is left of ours.
    pub fn roll_back_to_flannel(&mut self, i: usize) -> Result<(), String> {
        // Not the other way round: a running agent puts its routes back
        // over flanneld's, which flanneld writes only as leases change, so
        // the cleanup would leave the node with no route to its peers.
        self.stop_agent(i);
        self.flanneld[i] = Some(ChildGuard(self.spawn_flanneld(i)?));
        let peers = self.nodes.len() - 1;
        self.wait_for_flanneld(i, peers, crate::scaled(Duration::from_secs(30)))?;
        let node = &self.nodes[i];
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", node.ns.name()))
            .arg(&self.spec.agent)
            .args(["cleanup", "--keep-subnet-file", "--bpffs-root"])
            .arg(&node.pin_root)
            .output()
            .map_err(|e| format!("running overlay-agent cleanup: {e}"))?;
        if !out.status.success() {
            return Err(format!("overlay-agent cleanup on {} failed ({}):\n{}", node.name, out.status, String::from_utf8_lossy(&out.stderr)));
        }
        self.nodes[i].flannel = true;
        Ok(())
    }

    /// Starts our agent on flannel node `i` (`--remove-flannel-device`), as
    /// the migration guide's step 3 does, whether or not flanneld still
    /// runs there, and waits for its routes to every peer.
    pub fn start_agent_on_flannel_node(&mut self, i: usize) -> Result<(), String> {
        let agent = self.spawn_agent(i)?;
        self.agents[i] = Some(agent);
        let peers = self.nodes.len() - 1;
        self.wait_for_routes(i, peers, Duration::from_secs(10))
    }

    /// Stops real flanneld on node `i` as the kubelet stops a pod
    /// (SIGTERM, then SIGKILL after its grace period), leaving whatever it
    /// made in the kernel.
    pub fn stop_flanneld(&mut self, i: usize) -> Result<(), String> {
        let Some(guard) = self.flanneld[i].take() else { return Ok(()) };
        let mut child = guard.into_inner();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Ok(());
                }
            }
        }
    }

    /// Waits until node `i` has no `flannel.1`.
    pub fn wait_for_no_flannel_device(&self, i: usize, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + crate::scaled(timeout);
        while self.nodes[i].ns.ip(&["-o", "link", "show", "type", "vxlan"]).stdout.windows(9).any(|w| w == b"flannel.1") {
            if Instant::now() > deadline {
                let flanneld = fs::read_to_string(self.flanneld_log_path(i)).unwrap_or_default();
                return Err(format!(
                    "{} still has flannel.1 after {timeout:?}; agent log:\n{}\nflanneld log (if it ran):\n{flanneld}",
                    self.nodes[i].name,
                    self.agent_log(i)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn spawn_agent(&self, i: usize) -> Result<Child, String> {
        let node = &self.nodes[i];
        // Appending: a restarted agent's log follows its predecessor's.
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .map_err(|e| format!("opening {}: {e}", node.log.display()))?;
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", node.ns.name()))
            .arg(&self.spec.agent)
            .args(["run", "--node-name", &node.name, "--iface", "eth0", "--decap", &self.spec.decap])
            .args(["--forward", &self.spec.forward])
            .arg(format!("--metrics-addr=127.0.0.1:{METRICS_PORT}"))
            .arg("--bpffs-root")
            .arg(&node.pin_root)
            // A flannel node being migrated still has flannel.1.
            .args(node.flannel.then_some("--remove-flannel-device"));
        if let Some(etcd) = &self.etcd {
            // The network config (backend included) comes from etcd.
            command.args(["--etcd-endpoints", &etcd.endpoints()]).arg("--subnet-file").arg(self.subnet_file(i));
            command.args(etcd.tls.iter().flat_map(EtcdTls::client_flags));
        } else if self.spec.kubernetes {
            command.arg("--kubeconfig").arg(self.kubeconfig_path());
        } else {
            command.arg("--nodes-dir").arg(&self.nodes_dir);
        }
        if self.etcd.is_some() {
            // The backend is etcd's network config's.
        } else if self.uses_net_conf() {
            command.arg("--net-conf").arg(self.net_conf_path()).arg("--subnet-file").arg(self.subnet_file(i));
        } else {
            command.args(["--backend", &self.spec.backend]).args(self.spec.direct_routing.then_some("--direct-routing"));
        }
        command.args(&self.spec.agent_args).args(&node.agent_args);
        command
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.spec.agent.display()))
    }

    /// Routes the agent of node `i` has installed (`proto 157`).
    pub fn agent_routes(&self, i: usize) -> Vec<String> {
        let out = self.nodes[i].ns.ip(&["route", "show", "proto", overlay_agent::routes::ROUTE_PROTO]);
        String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
    }

    /// Waits until node `i` has `count` agent routes.
    pub fn wait_for_routes(&mut self, i: usize, count: usize, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + crate::scaled(timeout);
        loop {
            if self.agent_routes(i).len() == count {
                return Ok(());
            }
            if let Some(status) = self.agent_exit(i) {
                return Err(format!("agent of {} exited ({status}):\n{}", self.nodes[i].name, self.agent_log(i)));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} has {:?} agent routes, expected {count}; agent log:\n{}",
                    self.nodes[i].name,
                    self.agent_routes(i),
                    self.agent_log(i)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The agent's log so far.
    pub fn agent_log(&self, i: usize) -> String {
        fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }

    /// `overlay-agent inspect` for node `i`.
    pub fn inspect(&self, i: usize) -> String {
        // In the node's namespace, as an operator on the node runs it.
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.nodes[i].ns.name()))
            .arg(&self.spec.agent)
            .arg("inspect")
            .arg("--bpffs-root")
            .arg(&self.nodes[i].pin_root)
            .output()
            .expect("running inspect");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }

    /// Every pod, with the index of its node.
    pub fn pods(&self) -> impl Iterator<Item = (usize, &LabPod)> {
        self.nodes.iter().enumerate().flat_map(|(i, n)| n.pods.iter().map(move |p| (i, p)))
    }

    /// One ping from `from` to `to`.
    pub fn ping(from: &NetNs, to: Ipv4Addr) -> bool {
        ns_ok(from, "ping", &["-c", "1", "-W", "2", "-q", &to.to_string()])
    }

    /// A TCP connection from `from` to `to_ip` inside `to`: the server echoes
    /// 64 KiB back, which crosses the tunnel as several full segments.
    pub fn tcp_echo(from: &NetNs, to: &NetNs, to_ip: Ipv4Addr, port: u16) -> Result<(), String> {
        Self::tcp_echo_via(from, to, to_ip, port, (to_ip, port))
    }

    /// [`Self::tcp_echo`], the client dialling `dial` (a Service address
    /// that NAT turns into `to_ip:port`).
    pub fn tcp_echo_via(from: &NetNs, to: &NetNs, to_ip: Ipv4Addr, port: u16, dial: (Ipv4Addr, u16)) -> Result<(), String> {
        let listener = {
            let _inside = to.enter();
            TcpListener::bind((to_ip, port)).map_err(|e| format!("bind {to_ip}:{port}: {e}"))?
        };
        let server = std::thread::spawn(move || -> std::io::Result<()> {
            let mut conn = crate::accept_within(&listener, Duration::from_secs(5))?;
            conn.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut buf = vec![0u8; 65536];
            conn.read_exact(&mut buf)?;
            conn.write_all(&buf)
        });
        let result = (|| {
            let _inside = from.enter();
            let mut conn = TcpStream::connect_timeout(&dial.into(), Duration::from_secs(3))
                .map_err(|e| format!("connect {}:{}: {e}", dial.0, dial.1))?;
            conn.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
            let sent: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
            conn.write_all(&sent).map_err(|e| format!("send: {e}"))?;
            let mut back = vec![0u8; sent.len()];
            conn.read_exact(&mut back).map_err(|e| format!("receive: {e}"))?;
            if back != sent {
                return Err("echoed bytes differ".to_owned());
            }
            Ok(())
        })();
        match server.join() {
            Ok(Ok(())) => result,
            Ok(Err(e)) => result.and(Err(format!("server: {e}"))),
            Err(_) => result.and(Err("server panicked".to_owned())),
        }
    }

    /// [`Self::check_all_pairs`], failing the test with every failed check
    /// and `what` was being checked; the number of checks.
    pub fn assert_all_pairs(&self, what: &str) -> usize {
        let (checks, failures) = self.check_all_pairs();
        assert!(failures.is_empty(), "{what}: {} of {checks} checks failed: {failures:#?}", failures.len());
        checks
    }

    /// Ping and TCP between every pair of pods on different nodes, and
    /// from every node to every remote pod. Returns the failures.
    pub fn check_all_pairs(&self) -> (usize, Vec<String>) {
        let mut checks = 0;
        let mut failures = Vec::new();
        let mut port = 20000;
        for (a_node, a) in self.pods() {
            for (b_node, b) in self.pods() {
                if a_node == b_node {
                    continue;
                }
                checks += 2;
                if !Self::ping(&a.ns, b.ip) {
                    failures.push(format!("ping {} -> {}", a.ip, b.ip));
                }
                port += 1;
                if let Err(e) = Self::tcp_echo(&a.ns, &b.ns, b.ip, port) {
                    failures.push(format!("tcp {} -> {}: {e}", a.ip, b.ip));
                }
            }
        }
        for (i, node) in self.nodes.iter().enumerate() {
            for (b_node, b) in self.pods() {
                if b_node != i {
                    checks += 1;
                    if !Self::ping(&node.ns, b.ip) {
                        failures.push(format!("ping {} (host) -> {}", node.name, b.ip));
                    }
                }
            }
        }
        (checks, failures)
    }

    /// Pings node `to`'s first pod from node `from`'s first pod, for each
    /// `to`, while capturing on `from`'s underlay (ICMP and our VXLAN
    /// port). Returns, per `to`, tshark's `fields` (tab-separated) of every
    /// frame that names that pod, VXLAN decoded, so an encapsulated frame
    /// lists outer and inner values; each list holds at least one frame.
    pub fn ping_on_the_wire(&self, from: usize, to: &[usize], fields: &[&str]) -> Vec<Vec<String>> {
        let node = &self.nodes[from];
        let pcap = self.work_dir().join(format!("underlay-{from}.pcap"));
        let capture = Capture::start(&node.ns, "eth0", &["icmp", "or", "udp", "port", "8472"], &pcap);
        for &peer in to {
            assert!(Self::ping(&node.pods[0].ns, self.nodes[peer].pods[0].ip), "ping to node {} failed", peer + 1);
        }
        capture.stop();
        let mut args = vec!["-r", pcap.to_str().expect("UTF-8 path"), "-d", "udp.port==8472,vxlan", "-T", "fields"];
        for field in fields {
            args.extend(["-e", field]);
        }
        let rows = crate::stdout("tshark", &args);
        to.iter()
            .map(|&peer| {
                let ip = self.nodes[peer].pods[0].ip.to_string();
                let frames: Vec<String> = rows.lines().filter(|l| l.contains(&ip)).map(str::to_owned).collect();
                assert!(!frames.is_empty(), "no frame to {ip} captured:\n{rows}");
                frames
            })
            .collect()
    }

    /// Sets the MTU of pod `j` on node `i`, on both ends of its veth (to
    /// play a pod whose MTU ignores the tunnel).
    pub fn set_pod_mtu(&self, i: usize, j: usize, mtu: u32) {
        let mtu = mtu.to_string();
        let _ = self.nodes[i].ns.ip(&["link", "set", &format!("p{}", j + 1), "mtu", &mtu]);
        let _ = self.nodes[i].pods[j].ns.ip(&["link", "set", "eth0", "mtu", &mtu]);
    }

    /// Runs iperf3 for `seconds` from pod `from` (node, pod) to pod `to`,
    /// returning iperf3's JSON report.
    pub fn iperf3(&self, from: (usize, usize), to: (usize, usize), seconds: u32) -> Result<serde_json::Value, String> {
        let server_pod = &self.nodes[to.0].pods[to.1];
        let client_pod = &self.nodes[from.0].pods[from.1];
        let server = ChildGuard(
            Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", server_pod.ns.name()))
                .args(["iperf3", "-s", "-1", "-B", &server_pod.ip.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("starting iperf3 server: {e}"))?,
        );
        crate::wait_for_tcp_listener(server_pod.ns.name(), 5201, Duration::from_secs(10))?;
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", client_pod.ns.name()))
            .args(["iperf3", "-c", &server_pod.ip.to_string(), "-t", &seconds.to_string(), "-J"])
            .output()
            .map_err(|e| format!("running iperf3: {e}"))?;
        drop(server);
        serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("iperf3 output is not JSON ({e}): {}", String::from_utf8_lossy(&out.stderr)))
    }

    /// Stops node `i`'s agent (SIGTERM, then wait).
    pub fn stop_agent(&mut self, i: usize) {
        if let Some(mut child) = self.agents.get_mut(i).and_then(Option::take) {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            // An agent that does not exit (one left stopped, or hung) is
            // killed, so no test or teardown waits on it for ever.
            let deadline = Instant::now() + crate::scaled(Duration::from_secs(20));
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }

    /// Pings every 10 ms from pod (node 0, pod 0) to pod (node 1, pod 0)
    /// from before `during` starts until a second after it returns, however
    /// long it takes (agent restarts under emulation take minutes), and
    /// returns what it saw. Every echo request but the last was sent while
    /// `during` ran or in that second; the last is sent as ping is stopped
    /// (SIGINT), which does not wait for its reply, so it is not judged.
    pub fn ping_throughout(&mut self, during: impl FnOnce(&mut Self)) -> PingRun {
        let mut ping = ChildGuard(
            Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", self.nodes[0].pods[0].ns.name()))
                .args(["ping", "-n", "-i", "0.01", "-W", "1", &self.nodes[1].pods[0].ip.to_string()])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("starting ping"),
        );
        let stdout = ping.0.stdout.take().expect("ping's stdout");
        let reader = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap_or_default());
        // Its first request is out before `during` starts.
        std::thread::sleep(Duration::from_millis(100));
        during(self);
        std::thread::sleep(Duration::from_secs(1));
        // Without a count ping stops only on a signal or an error.
        let ran_throughout = matches!(ping.0.try_wait(), Ok(None));
        // SAFETY: signalling our own child; SIGINT makes ping print its summary.
        unsafe { libc::kill(ping.0.id() as i32, libc::SIGINT) };
        let _ = ping.0.wait();
        let text = reader.join().expect("reading ping's output");
        let transmitted: u32 = text
            .lines()
            .find_map(|l| l.split_once(" packets transmitted").and_then(|(n, _)| n.trim().parse().ok()))
            .unwrap_or_else(|| panic!("ping printed no summary: {text}"));
        let mut replied = std::collections::BTreeSet::new();
        for line in text.lines().filter(|l| l.contains(" bytes from ") && !l.contains("DUP!")) {
            if let Some(seq) = line.split_whitespace().find_map(|w| w.strip_prefix("icmp_seq=")?.parse::<u32>().ok()) {
                replied.insert(seq);
            }
        }
        let unanswered = (1..transmitted).filter(|seq| !replied.contains(seq)).collect();
        PingRun { ran_throughout, transmitted, replies: replied.len() as u32, unanswered }
    }

    /// Pings every 10 ms from pod (node 0, pod 0) to pod (node 1, pod 0)
    /// while `during` runs; returns (transmitted, received).
    pub fn ping_during(&mut self, count: u32, during: impl FnOnce(&mut Self)) -> (u32, u32) {
        let ping = ChildGuard(
            Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", self.nodes[0].pods[0].ns.name()))
                .args(["ping", "-i", "0.01", "-c", &count.to_string(), "-W", "1", "-q", &self.nodes[1].pods[0].ip.to_string()])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("starting ping"),
        );
        // Killed if `during` panics.
        during(self);
        let out = ping.into_inner().wait_with_output().expect("waiting for ping");
        let text = String::from_utf8_lossy(&out.stdout);
        let summary = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or_else(|| panic!("ping printed no summary: {text}"));
        let number_before = |needle: &str| -> u32 {
            let idx = summary.find(needle).unwrap_or_else(|| panic!("{summary}"));
            summary[..idx].trim_end().rsplit([' ', ',']).next().unwrap().parse().unwrap()
        };
        (number_before(" packets transmitted"), number_before(" received"))
    }

    /// Kills node `i`'s agent with SIGKILL, as a crash or an OOM kill
    /// would: it gets no chance to clean up.
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut child) = self.agents.get_mut(i).and_then(Option::take) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts node `i`'s agent again and waits until it reports ready
    /// (its initial sync applied to the datapath), `timeout` stretched by
    /// [`crate::scaled`] (loading through the verifier is most of it).
    pub fn start_agent(&mut self, i: usize, timeout: Duration) -> Result<(), String> {
        let readies = self.agent_log(i).matches(READY_LOG).count();
        let agent = self.spawn_agent(i)?;
        self.agents[i] = Some(agent);
        let timeout = crate::scaled(timeout);
        let deadline = Instant::now() + timeout;
        while self.agent_log(i).matches(READY_LOG).count() == readies {
            if let Some(status) = self.agent_exit(i) {
                return Err(format!("agent of {} exited ({status}):\n{}", self.nodes[i].name, self.agent_log(i)));
            }
            if Instant::now() > deadline {
                return Err(format!("agent of {} not ready after {timeout:?}:\n{}", self.nodes[i].name, self.agent_log(i)));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Starts node `i`'s agent again without waiting for it to be ready
    /// (it cannot be while the API server is down).
    pub fn launch_agent(&mut self, i: usize) -> Result<(), String> {
        let agent = self.spawn_agent(i)?;
        self.agents[i] = Some(agent);
        Ok(())
    }

    /// How node `i`'s agent exited, if it was started and has exited.
    fn agent_exit(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        match self.agents.get_mut(i) {
            Some(Some(child)) => child.try_wait().ok().flatten(),
            _ => None,
        }
    }

    /// Whether node `i`'s agent is running (started and not exited).
    pub fn agent_running(&mut self, i: usize) -> bool {
        matches!(self.agents.get(i), Some(Some(_))) && self.agent_exit(i).is_none()
    }

    /// Waits up to `timeout` (stretched by [`crate::scaled`]) for node
    /// `i`'s agent to exit on its own, and returns how it exited.
    pub fn wait_for_agent_exit(&mut self, i: usize, timeout: Duration) -> Result<std::process::ExitStatus, String> {
        let deadline = Instant::now() + crate::scaled(timeout);
        if !matches!(self.agents.get(i), Some(Some(_))) {
            return Err(format!("{} runs no agent", self.nodes[i].name));
        }
        loop {
            if let Some(status) = self.agent_exit(i) {
                return Ok(status);
            }
            if Instant::now() > deadline {
                return Err(format!("agent of {} still runs after {timeout:?}:\n{}", self.nodes[i].name, self.agent_log(i)));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The process id of node `i`'s agent, while it runs.
    pub fn agent_pid(&self, i: usize) -> Option<u32> {
        self.agents.get(i)?.as_ref().map(Child::id)
    }

    /// The datapath counters of node `i`, summed over CPUs, read from its
    /// pins (so they are readable with or without a running agent).
    pub fn counters(&self, i: usize) -> overlay_common::Totals {
        overlay_agent::maps::DatapathMaps::open(&self.nodes[i].pin_root)
            .expect("opening the pinned maps")
            .counters_total()
            .expect("reading the counters")
    }

    /// Keeps everything up after the process exits (for `lab --keep`).
    pub fn leak(self) {
        std::mem::forget(self);
    }

    /// What the lab was built from.
    pub fn spec(&self) -> &LabSpec {
        &self.spec
    }

    /// What agents started from now on run with (another `--forward`, say,
    /// as an operator changing the DaemonSet's flags).
    pub fn spec_mut(&mut self) -> &mut LabSpec {
        &mut self.spec
    }

    pub fn work_dir(&self) -> &Path {
        self.work_dir.path()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for i in 0..self.agents.len() {
            self.stop_agent(i);
        }
    }
}

/// A tcpdump capture inside a namespace, written to a pcap file.
pub struct Capture {
    tcpdump: ChildGuard,
    /// tcpdump's stderr, where it says it listens and reports its counts.
    stderr: std::io::BufReader<std::process::ChildStderr>,
}

impl Capture {
    /// Starts capturing and returns once tcpdump says it is listening.
    pub fn start(ns: &NetNs, iface: &str, filter: &[&str], pcap: &Path) -> Self {
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", ns.name()))
            // Immediate mode and packet-buffered output: every packet
            // tcpdump takes from the kernel is in the file at once. The
            // lab judges headers only: a short snapshot length gives
            // tcpdump's 2 MB ring room for over a thousand packets instead
            // of 8 of 256 KB, so a burst sent while tcpdump waits for the
            // CPU is kept, not dropped.
            .args(["tcpdump", "--immediate-mode", "-s", "1024", "-i", iface, "-n", "-U", "-w"])
            .arg(pcap)
            .args(filter)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting tcpdump");
        let stderr = child.stderr.take().expect("tcpdump stderr");
        let mut capture = Self { tcpdump: ChildGuard(child), stderr: std::io::BufReader::new(stderr) };
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut capture.stderr, &mut line);
        assert!(line.contains("listening on"), "tcpdump did not start: {line}");
        capture
    }

    /// tcpdump's process id (to signal it).
    pub fn pid(&self) -> i32 {
        self.tcpdump.0.id() as i32
    }

    /// Stops the capture once tcpdump has written every packet the kernel
    /// queued for it, and waits until the file is complete.
    ///
    /// SIGINT alone loses the packets still queued in tcpdump's socket (a
    /// packet that crossed the interface just before the caller's last
    /// ping returned, say, when tcpdump has not had the CPU since), so
    /// first tcpdump is asked for its counts (SIGUSR1) until it has
    /// captured all the kernel says its filter received. On `lo` the
    /// kernel counts each packet twice (libpcap keeps one copy), and a
    /// full ring counts what it dropped, so a count that stayed the same
    /// over five answers (tcpdump answers only when it runs, and reads its
    /// ring between answers) ends the wait too. Bounded in time as well.
    pub fn stop(mut self) {
        const STILL_ANSWERS: u32 = 5;
        let pid = self.pid();
        let deadline = Instant::now() + crate::scaled(Duration::from_secs(5));
        let (mut last_captured, mut still) = (None, 0);
        loop {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid, libc::SIGUSR1) };
            let Some((captured, received)) = self.counts() else { break };
            still = if last_captured == Some(captured) { still + 1 } else { 0 };
            if captured >= received || still + 1 >= STILL_ANSWERS || Instant::now() > deadline {
                break;
            }
            last_captured = Some(captured);
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: signalling our own child; SIGINT makes tcpdump flush.
        unsafe { libc::kill(pid, libc::SIGINT) };
        let _ = self.tcpdump.0.wait();
    }

    /// The next counts tcpdump reports on stderr: packets it captured
    /// (written) and packets its filter received in the kernel (queued,
    /// read or not). `None` once tcpdump has gone. tcpdump prints them on
    /// one line (`tcpdump: 3 packets captured, 5 packets received by
    /// filter, 0 packets dropped by kernel`), or one per line with `-v`.
    fn counts(&mut self) -> Option<(u64, u64)> {
        let mut report = String::new();
        while !report.contains("dropped by kernel") {
            if std::io::BufRead::read_line(&mut self.stderr, &mut report).ok()? == 0 {
                return None;
            }
        }
        let count = |what: &str| {
            report.split([',', '\n']).find(|part| part.contains(what)).and_then(|part| {
                part.trim_start_matches("tcpdump:").split_whitespace().next()?.parse::<u64>().ok()
            })
        };
        Some((count(" captured")?, count("received by filter")?))
    }
}

/// Two NICs of one of the VM's pairs ([`NIC_MAC_PREFIX`]) still in this
/// namespace, end 1 first: the [`Underlay::Nic`] lab's two nodes. A lab
/// takes a pair nobody took (its NICs return here when its nodes'
/// namespaces go, possibly renamed, so they are found by MAC).
fn claim_nic_pair(spec: &LabSpec) -> Result<[String; 2], String> {
    if spec.nodes != 2 || spec.topology != Topology::Flat || spec.outside || spec.kubernetes || spec.etcd_members > 0 {
        return Err("the nic underlay joins two nodes by one NIC pair: 2 nodes, flat topology, no outside, control plane or etcd (those live on the underlay's bridge, which the NICs are not on)".to_owned());
    }
    let mut ends: Vec<(u8, u8, String)> = Vec::new();
    for entry in fs::read_dir("/sys/class/net").map_err(|e| format!("listing /sys/class/net: {e}"))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Ok(address) = fs::read_to_string(entry.path().join("address")) else { continue };
        let bytes: Vec<u8> = address.trim().split(':').filter_map(|b| u8::from_str_radix(b, 16).ok()).collect();
        if bytes.len() == 6 && bytes[..4] == NIC_MAC_PREFIX {
            ends.push((bytes[4], bytes[5], name));
        }
    }
    ends.sort();
    for (pair, end, name) in &ends {
        if *end != 1 {
            continue;
        }
        if let Some((_, _, other)) = ends.iter().find(|(p, e, _)| p == pair && *e == 2) {
            return Ok([name.clone(), other.clone()]);
        }
    }
    Err(format!(
        "the nic underlay needs a free pair of NICs with MACs {}:<pair>:01 and :02, which only the VMs xtask boots have (`cargo xtask bench --underlay nic`, `cargo xtask vmtest --test nic_underlay`; {} such NICs here)",
        NIC_MAC_PREFIX.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":"),
        ends.len()
    ))
}

/// Makes an underlay port behave like a switch port on a wire.
///
/// - MTU-sized frames: veth would otherwise pass 64 KB GSO packets from
///   node to node, which flatters any path that never segments
///   (docs/datapath.md).
/// - A packet queue: with GRO or XDP on the node's eth0, veth delivers
///   through a 256-entry ring, and with veth's default `noqueue` a full
///   ring drops. Four TCP streams lost 100 000 packets in 4 s that way
///   and measured the ring, not the path. With a qdisc, veth (6.16+) stops
///   the queue instead, as a switch buffers.
fn wire_like(underlay: &NetNs, port: &str) {
    let _ = run(
        "ip",
        &["netns", "exec", underlay.name(), "ethtool", "-K", port, "tso", "off", "gso", "off",
          "tx-udp_tnl-segmentation", "off", "tx-udp_tnl-csum-segmentation", "off"],
    );
    let _ = run("ip", &["netns", "exec", underlay.name(), "tc", "qdisc", "replace", "dev", port, "root", "pfifo", "limit", "1000"]);
}

/// Kills and reaps a child process on drop.
pub struct ChildGuard(pub Child);

impl ChildGuard {
    /// The child, no longer killed on drop (to wait for its output, say).
    pub fn into_inner(self) -> Child {
        let this = std::mem::ManuallyDrop::new(self);
        // SAFETY: `this` is never used or dropped again, so the child is
        // moved out exactly once.
        unsafe { std::ptr::read(&this.0) }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Removes everything a kept lab (`--keep`) left: namespaces, agents and
/// pins whose names start with `prefix`.
pub fn tear_down_kept(prefix: &str) -> usize {
    let _ = Command::new("pkill").args(["-TERM", "-f", &format!("bpffs-root {}/{prefix}", overlay_agent::bpffs::BPFFS_MOUNT)]).status();
    // flanneld and etcd of an etcd lab name the lab's work directory.
    let _ = Command::new("pkill").args(["-TERM", "-f", &format!("{}/{prefix}", std::env::temp_dir().display())]).status();
    std::thread::sleep(Duration::from_millis(300));
    let list = Command::new("ip").args(["netns", "list"]).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    let mut removed = 0;
    for name in list.lines().filter_map(|l| l.split_whitespace().next()).filter(|n| n.starts_with(prefix)) {
        if Command::new("ip").args(["netns", "del", name]).status().is_ok_and(|s| s.success()) {
            removed += 1;
        }
    }
    if let Ok(entries) = fs::read_dir(overlay_agent::bpffs::BPFFS_MOUNT) {
        for e in entries.flatten().filter(|e| e.file_name().to_string_lossy().starts_with(prefix)) {
            let _ = fs::remove_dir_all(e.path());
        }
    }
    if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
        for e in entries.flatten().filter(|e| e.file_name().to_string_lossy().starts_with(prefix)) {
            let _ = fs::remove_dir_all(e.path());
        }
    }
    removed
}

/// A node's agent stopped (`SIGSTOP`) until this is dropped (`SIGCONT`),
/// as a loaded node delays it: what happens meanwhile reaches it as one
/// batch. Declared after the lab, it resumes the agent before the lab
/// stops it, also when a test fails meanwhile (a stopped agent never
/// answers SIGTERM).
pub struct Frozen(i32);

impl Frozen {
    pub fn agent(lab: &Lab, i: usize) -> Self {
        let pid = lab.agent_pid(i).expect("the agent runs") as i32;
        // SAFETY: plain signal to our own child; Drop resumes it.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        Self(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // SAFETY: plain signal to our own child.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}
