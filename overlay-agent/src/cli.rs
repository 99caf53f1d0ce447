//! The command line's types: `overlay-agent`'s subcommands and flags.
//!
//! In the library so tests read the flags from [`Cli::command`]
//! (`clap::CommandFactory`) instead of parsing `--help` text.

use std::path::PathBuf;

use aya::programs::XdpMode;
use clap::{Parser, Subcommand, ValueEnum};

use crate::datapath::DecapHook;

#[derive(Parser)]
#[command(version, about = "overlay: a flannel-compatible pod network in eBPF")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
#[expect(clippy::large_enum_variant, reason = "parsed once at start; boxing buys nothing")]
pub enum Command {
    /// Load and attach the datapath, then keep its maps and routes in step
    /// with the cluster's nodes until SIGTERM/Ctrl-C. Stopping leaves the
    /// datapath in place (pinned), so traffic keeps flowing until the next
    /// agent takes over.
    Run(RunArgs),
    /// Remove the datapath on purpose: detach the programs, remove the pins,
    /// the routes, the masquerade and FORWARD rules the agent installed,
    /// and the subnet.env file. Without a pin directory (the agent has not
    /// run on this node since boot) subnet.env and the CNI config stay:
    /// flannel writes the same files.
    Cleanup {
        /// The agent's pin directory.
        #[arg(long, default_value = DEFAULT_BPFFS_ROOT)]
        bpffs_root: PathBuf,
        /// The subnet.env the agent wrote (removed if present and the pin
        /// directory exists).
        #[arg(long, default_value = DEFAULT_SUBNET_FILE)]
        subnet_file: PathBuf,
        /// Leave subnet.env alone (e.g. when rolling back to flannel, whose
        /// flanneld has written its own).
        #[arg(long)]
        keep_subnet_file: bool,
        /// Also remove this CNI config (the DaemonSet installs
        /// /etc/cni/net.d/10-flannel.conflist) if the pin directory exists.
        /// Not when rolling back to flannel, which uses the same file.
        #[arg(long)]
        cni_conf: Option<PathBuf>,
    },
    /// Exit non-zero when this kernel is older than MIN (MAJOR.MINOR): the
    /// DaemonSet's init container, which keeps the agent off such nodes.
    KernelCheck {
        /// The oldest kernel accepted (6.1: the oldest the datapath is
        /// tested on; `run` itself needs 5.13).
        #[arg(long, default_value = "6.1")]
        min: String,
    },
    /// Print the pinned maps as tables: config, peers, routes, counters.
    /// Reads the pins, so it works while the agent is stopped.
    Inspect {
        /// The agent's pin directory.
        #[arg(long, default_value = DEFAULT_BPFFS_ROOT)]
        bpffs_root: PathBuf,
    },
    /// Load the programs through the kernel verifier, attach them to an
    /// interface, print what was loaded, then detach and remove every pin.
    /// Answers "can this node run the datapath?" without changing it.
    Check {
        /// Interface to attach to.
        #[arg(long)]
        iface: String,
        /// Pin directory for this check (removed afterwards).
        #[arg(long)]
        bpffs_root: Option<PathBuf>,
        /// Where decapsulation hooks in.
        #[arg(long, value_enum, default_value_t = Decap::Xdp)]
        decap: Decap,
    },
}

pub const DEFAULT_BPFFS_ROOT: &str = "/sys/fs/bpf/overlay";
pub const DEFAULT_SUBNET_FILE: &str = "/run/flannel/subnet.env";

#[derive(clap::Args)]
pub struct RunArgs {
    /// This node's name; defaults to $NODE_NAME, then the hostname.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Read Node manifests (YAML or JSON) from this directory, watched,
    /// instead of the Kubernetes API.
    #[arg(long, conflicts_with = "kubeconfig")]
    pub nodes_dir: Option<PathBuf>,
    /// flannel's etcd mode: read the network config and every node's subnet
    /// lease from these etcd endpoints (comma-separated), watch them, and
    /// hold this node's own lease as flanneld does, instead of Node objects.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["nodes_dir", "net_conf", "kubeconfig"])]
    pub etcd_endpoints: Vec<String>,
    /// Where flannel's keys live in etcd (`<prefix>/config`,
    /// `<prefix>/subnets/`).
    #[arg(long, default_value = crate::etcd_source::DEFAULT_PREFIX, requires = "etcd_endpoints")]
    pub etcd_prefix: String,
    /// CA certificate (PEM) to verify etcd's TLS certificate.
    #[arg(long, requires = "etcd_endpoints")]
    pub etcd_cafile: Option<PathBuf>,
    /// Client certificate (PEM) for etcd, with --etcd-keyfile.
    #[arg(long, requires = "etcd_endpoints")]
    pub etcd_certfile: Option<PathBuf>,
    /// Client key (PEM) for etcd, with --etcd-certfile.
    #[arg(long, requires = "etcd_endpoints")]
    pub etcd_keyfile: Option<PathBuf>,
    /// Watch Nodes through the API server in this kubeconfig; defaults to
    /// $KUBECONFIG unless --nodes-dir or --etcd-endpoints is given. Without either (and without
    /// --nodes-dir) the in-cluster service account is used.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// flannel's net-conf.json (Network, SubnetLen, Backend {Type, VNI,
    /// Port, DirectRouting}). Sets the backend (instead of --backend,
    /// --vni, --port, --direct-routing), refuses pod CIDRs outside
    /// Network, and enables writing --subnet-file.
    #[arg(long)]
    pub net_conf: Option<PathBuf>,
    /// Where to write flannel's subnet.env for its CNI plugin (needs
    /// --net-conf).
    #[arg(long, default_value = DEFAULT_SUBNET_FILE)]
    pub subnet_file: PathBuf,
    /// Underlay interface; defaults to the default-route interface.
    #[arg(long)]
    pub iface: Option<String>,
    /// Address to advertise and tunnel from, instead of our Node's InternalIP.
    /// Our Node's flannel.alpha.coreos.com/public-ip-overwrite annotation,
    /// where set, wins over it, as with flanneld.
    #[arg(long)]
    pub public_ip: Option<std::net::Ipv4Addr>,
    /// How remote pod CIDRs are reached: vxlan (default), or host-gw (plain
    /// forwarding; every node must be on one L2 segment).
    #[arg(long, value_enum)]
    pub backend: Option<Backend>,
    /// With vxlan: forward without encapsulation to peers that are on-link
    /// (flannel's DirectRouting), VXLAN to the others.
    #[arg(long)]
    pub direct_routing: bool,
    /// VXLAN network identifier (default 1, as flannel's).
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..(1 << 24)))]
    pub vni: Option<u32>,
    /// VXLAN UDP port: 8472 (default; flannel, Linux) or 4789 (IANA).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Option<u16>,
    /// Pin directory for this agent's maps and links.
    #[arg(long, default_value = DEFAULT_BPFFS_ROOT)]
    pub bpffs_root: PathBuf,
    /// Where decapsulation hooks in. `auto` picks what measured fastest
    /// for the underlay's driver (docs/datapath.md): TC ingress on veth
    /// underlays (container-based nodes) and with host-gw, native XDP on
    /// other drivers (NICs, virtio), TC ingress where another XDP program
    /// is attached.
    /// The log and `inspect` say which.
    #[arg(long, value_enum, default_value_t = Decap::Auto)]
    pub decap: Decap,
    /// How pod-to-pod traffic between nodes is forwarded: by our programs
    /// on each pod's veth and the underlay, past the kernel's forward path
    /// (bpf, the default: measured fastest, docs/benchmarks/results.md), or
    /// by the kernel's routes (kernel: the conservative choice, for nodes
    /// whose netfilter FORWARD/POSTROUTING rules, e.g. NetworkPolicy, must
    /// see pod-to-pod traffic). NATed and Service flows take the kernel's
    /// path either way.
    #[arg(long, value_enum, default_value_t = Forward::Bpf)]
    pub forward: Forward,
    /// The bridge local pods sit behind (flannel's CNI plugin: cni0), where
    /// `--forward bpf` attaches once it exists.
    #[arg(long, default_value = "cni0")]
    pub pod_bridge: String,
    /// Run even where the pins would die with the agent: its bpffs is
    /// private to its mount namespace (e.g. under `ip netns exec`, where
    /// the agent mounts its own). Nothing then survives a restart.
    #[arg(long)]
    pub allow_ephemeral_pins: bool,
    /// Masquerade pod traffic leaving the cluster Network to the node's
    /// address (flannel's --ip-masq); `--ip-masq=false` leaves it to the
    /// CNI plugin (subnet.env says FLANNEL_IPMASQ=false). Needs --net-conf.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub ip_masq: bool,
    /// Address for /healthz, /readyz and /metrics.
    #[arg(long, default_value = "0.0.0.0:9472")]
    pub metrics_addr: std::net::SocketAddr,
    /// Delete flannel's kernel vxlan device (`flannel.<VNI>`) on our UDP
    /// port, left by a migration from flannel, once our datapath and
    /// routes are in place, and again whenever it comes back (a flanneld
    /// still running makes it again). Without it the agent refuses to
    /// start beside one: the device decapsulates tunnel traffic without
    /// our checks.
    #[arg(long)]
    pub remove_flannel_device: bool,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Backend {
    Vxlan,
    HostGw,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Forward {
    /// The kernel routes pod traffic (`<podCIDR> via <node IP>`); our
    /// programs encapsulate at the underlay's egress.
    Kernel,
    /// Our program at the ingress of each pod's veth (and of the pod
    /// bridge) forwards it (TTL, VXLAN, `bpf_redirect_neigh` to the
    /// underlay); what it cannot take goes on to the kernel routes.
    Bpf,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Decap {
    /// The measured choice: TC ingress with host-gw, on veth underlays and
    /// where another XDP program is attached; native XDP on other drivers.
    Auto,
    /// XDP, native when the driver supports it.
    Xdp,
    /// Generic (skb) XDP.
    XdpGeneric,
    /// TC ingress.
    Tc,
}

impl From<Decap> for DecapHook {
    fn from(decap: Decap) -> Self {
        match decap {
            Decap::Auto | Decap::Xdp => Self::Xdp(XdpMode::Default),
            Decap::XdpGeneric => Self::Xdp(XdpMode::Skb),
            Decap::Tc => Self::TcIngress,
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    /// An etcd flag without `--etcd-endpoints` (an endpoints variable empty
    /// in a template) is refused, naming the missing flag, instead of the
    /// agent going on with the Kubernetes source. (Shown failing before:
    /// accepted.)
    #[test]
    fn etcd_flags_without_endpoints_are_refused() {
        for (flag, value) in [("--etcd-prefix", "/coreos.com/network"), ("--etcd-cafile", "/ca.pem"), ("--etcd-certfile", "/c.pem"), ("--etcd-keyfile", "/k.pem")] {
            let Err(error) = Cli::try_parse_from(["overlay-agent", "run", flag, value]) else { panic!("{flag} without --etcd-endpoints accepted") };
            assert!(error.to_string().contains("--etcd-endpoints"), "{flag}: {error}");
        }
        let with = Cli::try_parse_from(["overlay-agent", "run", "--etcd-endpoints", "https://127.0.0.1:2379", "--etcd-cafile", "/ca.pem"]);
        assert!(with.is_ok(), "{:?}", with.err());
    }
}
