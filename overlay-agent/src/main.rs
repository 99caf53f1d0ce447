//! `overlay-agent`: the node agent's command line.

use std::path::PathBuf;

use anyhow::Context as _;
use aya::programs::XdpMode;
use clap::{Parser, Subcommand, ValueEnum};
use overlay_agent::datapath::{Datapath, DecapHook};

mod inspect;
mod run;

#[derive(Parser)]
#[command(version, about = "overlay: a flannel-compatible pod network in eBPF")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load and attach the datapath, then keep its maps and routes in step
    /// with the cluster's nodes until SIGTERM/Ctrl-C. Stopping leaves the
    /// datapath in place (pinned), so traffic keeps flowing until the next
    /// agent takes over.
    Run(RunArgs),
    /// Remove the datapath on purpose: detach the programs, remove the pins
    /// and the routes the agent installed, and the subnet.env file.
    Cleanup {
        /// The agent's pin directory.
        #[arg(long, default_value = DEFAULT_BPFFS_ROOT)]
        bpffs_root: PathBuf,
        /// The subnet.env the agent wrote (removed if present).
        #[arg(long, default_value = DEFAULT_SUBNET_FILE)]
        subnet_file: PathBuf,
        /// Leave subnet.env alone (e.g. when rolling back to flannel, whose
        /// flanneld has written its own).
        #[arg(long)]
        keep_subnet_file: bool,
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

const DEFAULT_BPFFS_ROOT: &str = "/sys/fs/bpf/overlay";
const DEFAULT_SUBNET_FILE: &str = "/run/flannel/subnet.env";

#[derive(clap::Args)]
struct RunArgs {
    /// This node's name; defaults to $NODE_NAME, then the hostname.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Read Node manifests (YAML or JSON) from this directory, watched,
    /// instead of the Kubernetes API.
    #[arg(long, conflicts_with = "kubeconfig")]
    nodes_dir: Option<PathBuf>,
    /// flannel's etcd mode: read the network config and every node's subnet
    /// lease from these etcd endpoints (comma-separated), watch them, and
    /// hold this node's own lease as flanneld does, instead of Node objects.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["nodes_dir", "net_conf"])]
    etcd_endpoints: Vec<String>,
    /// Where flannel's keys live in etcd (`<prefix>/config`,
    /// `<prefix>/subnets/`).
    #[arg(long, default_value = overlay_agent::etcd_source::DEFAULT_PREFIX)]
    etcd_prefix: String,
    /// CA certificate (PEM) to verify etcd's TLS certificate.
    #[arg(long)]
    etcd_cafile: Option<PathBuf>,
    /// Client certificate (PEM) for etcd, with --etcd-keyfile.
    #[arg(long)]
    etcd_certfile: Option<PathBuf>,
    /// Client key (PEM) for etcd, with --etcd-certfile.
    #[arg(long)]
    etcd_keyfile: Option<PathBuf>,
    /// Watch Nodes through the API server in this kubeconfig. Without it
    /// (and without --nodes-dir) the in-cluster service account is used.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// flannel's net-conf.json (Network, SubnetLen, Backend {Type, VNI,
    /// Port, DirectRouting}). Sets the backend (instead of --backend,
    /// --vni, --port, --direct-routing), refuses pod CIDRs outside
    /// Network, and enables writing --subnet-file.
    #[arg(long)]
    net_conf: Option<PathBuf>,
    /// Where to write flannel's subnet.env for its CNI plugin (needs
    /// --net-conf).
    #[arg(long, default_value = DEFAULT_SUBNET_FILE)]
    subnet_file: PathBuf,
    /// Underlay interface; defaults to the default-route interface.
    #[arg(long)]
    iface: Option<String>,
    /// Address to advertise and tunnel from, instead of our Node's InternalIP.
    #[arg(long)]
    public_ip: Option<std::net::Ipv4Addr>,
    /// How remote pod CIDRs are reached: vxlan (default), or host-gw (plain
    /// forwarding; every node must be on one L2 segment).
    #[arg(long, value_enum)]
    backend: Option<Backend>,
    /// With vxlan: forward without encapsulation to peers that are on-link
    /// (flannel's DirectRouting), VXLAN to the others.
    #[arg(long)]
    direct_routing: bool,
    /// VXLAN network identifier (default 1, as flannel's).
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..(1 << 24)))]
    vni: Option<u32>,
    /// VXLAN UDP port: 8472 (default; flannel, Linux) or 4789 (IANA).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    port: Option<u16>,
    /// Pin directory for this agent's maps and links.
    #[arg(long, default_value = DEFAULT_BPFFS_ROOT)]
    bpffs_root: PathBuf,
    /// Where decapsulation hooks in. `auto` picks what measured fastest
    /// for the underlay's driver (docs/datapath.md): TC ingress on veth
    /// underlays (container-based nodes) and with host-gw, native XDP on
    /// other drivers (NICs, virtio), TC ingress where XDP cannot attach.
    /// The log and `inspect` say which.
    #[arg(long, value_enum, default_value_t = Decap::Auto)]
    decap: Decap,
    /// How packets from local pods to remote pods leave this node: through
    /// the kernel's forward path (kernel), or handed by our program on the
    /// pod bridge straight to the underlay (bpf), which skips the node's
    /// netfilter FORWARD and POSTROUTING hooks for that traffic.
    #[arg(long, value_enum, default_value_t = Forward::Kernel)]
    forward: Forward,
    /// The bridge local pods sit behind (flannel's CNI plugin: cni0), where
    /// `--forward bpf` attaches once it exists.
    #[arg(long, default_value = "cni0")]
    pod_bridge: String,
    /// Address for /healthz, /readyz and /metrics.
    #[arg(long, default_value = "0.0.0.0:9472")]
    metrics_addr: std::net::SocketAddr,
}

#[derive(Clone, Copy, ValueEnum)]
enum Backend {
    Vxlan,
    HostGw,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Forward {
    /// The kernel routes pod traffic (`<podCIDR> via <node IP>`); our
    /// programs encapsulate at the underlay's egress.
    Kernel,
    /// Our program on the pod bridge's ingress forwards it (TTL, VXLAN,
    /// `bpf_redirect_neigh` to the underlay); what it cannot take goes on
    /// to the kernel routes.
    Bpf,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Decap {
    /// Measured choice per interface (see `run --help`).
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

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match Cli::parse().command {
        Command::Run(args) => run::run(args),
        Command::Inspect { bpffs_root } => inspect::inspect(&bpffs_root),
        Command::Cleanup { bpffs_root, subnet_file, keep_subnet_file } => {
            cleanup(&bpffs_root, (!keep_subnet_file).then_some(subnet_file.as_path()))
        }
        Command::Check { iface, bpffs_root, decap } => check(&iface, bpffs_root, decap.into()),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // The whole cause chain on one line, without a backtrace: this is
            // what an operator reads.
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn cleanup(root: &std::path::Path, subnet_file: Option<&std::path::Path>) -> anyhow::Result<()> {
    let layout = overlay_agent::bpffs::PinLayout::new(root);
    let interfaces = layout.linked_interfaces();
    Datapath::remove_pins(root).with_context(|| format!("removing the pins under {}", root.display()))?;
    println!("detached from {} and removed the pins under {}", if interfaces.is_empty() { "no interface".to_owned() } else { interfaces.join(", ") }, root.display());
    let removed = overlay_agent::routes::remove_owned().context("removing the agent's routes")?;
    println!("removed {removed} routes (proto {})", overlay_agent::routes::ROUTE_PROTO);
    let Some(subnet_file) = subnet_file else { return Ok(()) };
    match std::fs::remove_file(subnet_file) {
        Ok(()) => println!("removed {}", subnet_file.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", subnet_file.display())),
    }
    Ok(())
}

fn check(iface: &str, root: Option<PathBuf>, hook: DecapHook) -> anyhow::Result<()> {
    let root = root.unwrap_or_else(|| {
        PathBuf::from(format!("{}/overlay-check-{}", overlay_agent::bpffs::BPFFS_MOUNT, std::process::id()))
    });
    let result = check_in(iface, &root, hook);
    let cleanup = Datapath::remove_pins(&root).context("cleaning up the check's pins");
    result.and(cleanup)
}

fn check_in(iface: &str, root: &std::path::Path, hook: DecapHook) -> anyhow::Result<()> {
    let mut datapath = Datapath::load(root).context("loading the datapath")?;
    datapath
        .attach(iface, hook, false)
        .with_context(|| format!("attaching to {iface}"))?;
    println!("attached to {iface} ({hook:?}); maps pinned under {}", root.display());
    println!("{:<22} {:>6} {:<10} {:>12}", "PROGRAM", "ID", "TYPE", "VERIFIED");
    for p in datapath.programs() {
        let verified = p.verified_instructions.map_or("-".to_owned(), |n| format!("{n} insns"));
        println!("{:<22} {:>6} {:<10} {:>12}", p.name, p.id, p.kind, verified);
    }
    for name in overlay_common::map_names::ALL {
        println!("map {name:<10} {}", datapath.layout().map(name).display());
    }
    println!("detaching and removing pins");
    Ok(())
}
