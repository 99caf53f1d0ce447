//! The lab behind `cargo xtask lab`: a multi-node cluster in network
//! namespaces, proven with ping and TCP between every pair of pods.

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
};

use clap::Parser;
use overlay_tests::lab::{Lab, LabSpec, POD_MTU, Topology, UNDERLAY_MTU, Underlay, tear_down_kept};

/// Prefix of every lab's names, so `--down` finds kept labs.
const LAB_PREFIX: &str = "ovlab";

/// Set by `cargo xtask` when it runs the lab in a mount namespace of its
/// own, on a host without a bpffs at `/sys/fs/bpf` (`xtask/src/bpffs.rs`).
/// The lab's `/run/netns` entries are then mounts of that namespace only:
/// from the shell that started it they are empty files.
const XTASK_OWN_MOUNT_NAMESPACE: &str = "OVERLAY_XTASK_OWN_BPFFS";

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

#[derive(Clone, Copy, clap::ValueEnum)]
enum TopologyArg {
    Flat,
    Routed,
}

#[derive(Parser)]
#[command(about = "overlay's multi-node lab in network namespaces")]
struct Args {
    /// The overlay-agent binary to run on each node.
    #[arg(long)]
    agent: Option<PathBuf>,
    /// Number of nodes.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(2..=20))]
    nodes: u8,
    /// Pods per node.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=20))]
    pods: u8,
    /// Where decapsulation hooks in: auto, xdp, xdp-generic or tc.
    #[arg(long, default_value = "auto")]
    decap: String,
    /// How the agents forward pod traffic to remote pods: kernel (routes)
    /// or bpf (the fast path on each node's cni0).
    #[arg(long, default_value = "bpf", value_parser = ["kernel", "bpf"])]
    forward: String,
    /// Turn the last K nodes into flannel nodes. With the vxlan backend they
    /// run real flanneld (built by `cargo xtask setup`) in etcd mode against
    /// an etcd in the lab, and our agents run in etcd mode too; with
    /// --kubernetes, host-gw or --hand-programmed-flannel, flannel's kernel
    /// state is programmed by the lab as flannel does, from the Node
    /// manifests.
    #[arg(long, default_value_t = 0)]
    flannel_nodes: u8,
    /// Program the flannel nodes' flannel.1 by hand (our imitation of
    /// flanneld) instead of running real flanneld.
    #[arg(long)]
    hand_programmed_flannel: bool,
    /// The flannel nodes' backend: vxlan (kernel vxlan device) or host-gw
    /// (kernel routes).
    #[arg(long, default_value = "vxlan", value_parser = ["vxlan", "host-gw"])]
    flannel_backend: String,
    /// Underlay shape: flat (one segment) or routed (two subnets joined by
    /// a router namespace).
    #[arg(long, value_enum, default_value_t = TopologyArg::Flat)]
    topology: TopologyArg,
    /// What the links between nodes are like: wire (MTU-sized frames
    /// between nodes, GRO at the nodes, as VMs and NICs have) or container
    /// (plain veths passing 64 KB GSO frames, as kind, k3d and Docker-based
    /// nodes have).
    #[arg(long, value_enum, default_value_t = Underlay::Wire)]
    underlay: Underlay,
    /// Agents' backend: vxlan or host-gw.
    #[arg(long, default_value = "vxlan")]
    backend: String,
    /// Agents forward directly to on-link peers (vxlan backend).
    #[arg(long)]
    direct_routing: bool,
    /// Run a real control plane (etcd, kube-apiserver, kube-controller-manager
    /// in the underlay namespace): Nodes registered as kubelet does, pod CIDRs
    /// from the controller-manager, agents with --kubeconfig (a token of
    /// deploy/overlay.yaml's ServiceAccount and RBAC) and --net-conf. With
    /// --keep, the control plane ends with this command; the agents keep
    /// the datapath and retry.
    #[arg(long)]
    kubernetes: bool,
    /// Leave the lab up for poking around; `--down` removes it.
    #[arg(long)]
    keep: bool,
    /// Tear down labs left up by `--keep`, then exit.
    #[arg(long)]
    down: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.down {
        let removed = tear_down_kept(LAB_PREFIX);
        println!("lab: removed {removed} namespaces and their agents and pins");
        return ExitCode::SUCCESS;
    }
    let Some(agent) = args.agent else {
        eprintln!("lab: --agent is required (cargo xtask lab passes it)");
        return ExitCode::FAILURE;
    };
    // Ctrl-C also reaches the agents (same process group); we notice, stop
    // at the next step, and the Lab's Drop removes everything.
    let _ = ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst));

    let mut spec = LabSpec::new(agent);
    spec.nodes = args.nodes.into();
    spec.pods_per_node = args.pods.into();
    spec.decap = args.decap;
    spec.forward = args.forward;
    if args.flannel_nodes >= args.nodes {
        eprintln!("lab: --flannel-nodes must leave at least one of our nodes (got {} of {})", args.flannel_nodes, args.nodes);
        return ExitCode::FAILURE;
    }
    spec.flannel_nodes = args.flannel_nodes.into();
    spec.flannel_backend = args.flannel_backend;
    spec.topology = match args.topology {
        TopologyArg::Flat => Topology::Flat,
        TopologyArg::Routed => Topology::Routed,
    };
    spec.underlay = args.underlay;
    spec.backend = args.backend.clone();
    spec.direct_routing = args.direct_routing;
    spec.kubernetes = args.kubernetes;
    spec.real_flannel = spec.flannel_nodes > 0 && !args.kubernetes && spec.flannel_backend == "vxlan" && !args.hand_programmed_flannel;
    spec.prefix = format!("{LAB_PREFIX}{}", std::process::id() % 100_000);
    println!(
        "lab: {} nodes ({} flannel-style) x {} pods, {:?} {} underlay, MTU {UNDERLAY_MTU}, pod MTU {POD_MTU}, backend {}{}, decap {}, forward {}, nodes from {}",
        spec.nodes, spec.flannel_nodes, spec.pods_per_node, spec.topology, spec.underlay.key(), spec.backend,
        if spec.direct_routing { " with direct routing" } else { "" }, spec.decap, spec.forward,
        if spec.kubernetes { "kube-apiserver (pod CIDRs from kube-controller-manager)" } else if spec.real_flannel { "etcd (flannel's etcd mode; flannel nodes run real flanneld)" } else { "a manifest directory" }
    );
    let lab = match Lab::start(spec) {
        Ok(lab) => lab,
        Err(e) => {
            eprintln!("lab: failed to start: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(kube) = &lab.kube {
        match kube.version() {
            Ok(version) => println!(
                "lab: kube-apiserver {version} at https://{} with etcd {}; agents authenticated as ServiceAccount overlay-system/overlay-agent, authorized by deploy/overlay.yaml's RBAC",
                kube.addr,
                kube.etcd_version()
            ),
            Err(e) => println!("lab: kube-apiserver at https://{} did not say its version: {e}", kube.addr),
        }
    }
    for (i, node) in lab.nodes.iter().enumerate() {
        if node.flannel {
            let what = if lab.spec().real_flannel {
                format!("real flanneld {}, etcd mode", overlay_tests::FLANNEL_VERSION.trim())
            } else if lab.spec().flannel_backend == "host-gw" {
                "host-gw routes, as flannel programs them".to_owned()
            } else {
                "flannel.1 (kernel vxlan), as flannel programs it".to_owned()
            };
            println!("  {} ({}) pods {} on {}: {what}", node.name, node.ns.name(), node.pod_cidr, node.ip);
        } else {
            println!("  {} ({}) pods {} on {}: overlay agent, routes {:?}", node.name, node.ns.name(), node.pod_cidr, node.ip, lab.agent_routes(i));
        }
    }
    if INTERRUPTED.load(Ordering::SeqCst) {
        eprintln!("lab: interrupted; tearing down");
        return ExitCode::FAILURE;
    }
    let (checks, failures) = lab.check_all_pairs();
    println!("lab: {} of {checks} connectivity checks passed (ping + TCP between all pod pairs across nodes, host to remote pods)", checks - failures.len());
    for f in &failures {
        println!("  FAILED {f}");
    }
    println!("\n{}", lab.inspect(0));
    let ok = failures.is_empty() && !INTERRUPTED.load(Ordering::SeqCst);
    if args.keep {
        let names = lab.nodes[0].ns.name().trim_end_matches("-n1").to_owned();
        let agent = (0..lab.nodes.len()).find_map(|i| lab.agent_pid(i));
        match agent {
            // Every agent runs in the lab's mount namespace and keeps it.
            Some(pid) if std::env::var_os(XTASK_OWN_MOUNT_NAMESPACE).is_some() => println!(
                "lab: kept up (namespaces {names}-*) in a mount namespace of its own, since this host has no bpffs at /sys/fs/bpf; enter one through an agent's with `nsenter --target {pid} --mount ip netns exec <ns> sh`; tear down with `cargo xtask lab --down`"
            ),
            _ => println!("lab: kept up (namespaces {names}-*); enter one with `nsenter --net=/run/netns/<ns>`; tear down with `cargo xtask lab --down`"),
        }
        lab.leak();
    } else {
        drop(lab);
        println!("lab: torn down");
    }
    if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}
