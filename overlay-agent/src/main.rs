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
#[expect(clippy::large_enum_variant, reason = "parsed once at start; boxing buys nothing")]
enum Command {
    /// Load and attach the datapath, then keep its maps and routes in step
    /// with the cluster's nodes until SIGTERM/Ctrl-C. Stopping leaves the
    /// datapath in place (pinned), so traffic keeps flowing until the next
    /// agent takes over.
    Run(RunArgs),
    /// Remove the datapath on purpose: detach the programs, remove the pins,
    /// the routes, the masquerade and FORWARD rules the agent installed,
    /// and the subnet.env file.
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
        /// Also remove this CNI config (the DaemonSet installs
        /// /etc/cni/net.d/10-flannel.conflist). Not when rolling back to
        /// flannel, which uses the same file.
        #[arg(long)]
        cni_conf: Option<PathBuf>,
    },
    /// Exit non-zero when this kernel is older than MIN (MAJOR.MINOR): the
    /// DaemonSet's init container, which keeps the agent off such nodes.
    KernelCheck {
        /// The oldest kernel accepted.
        #[arg(long, default_value = "6.6")]
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
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["nodes_dir", "net_conf", "kubeconfig"])]
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
    /// Watch Nodes through the API server in this kubeconfig; defaults to
    /// $KUBECONFIG unless --nodes-dir or --etcd-endpoints is given. Without either (and without
    /// --nodes-dir) the in-cluster service account is used.
    #[arg(long)]
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
    /// How pod-to-pod traffic between nodes is forwarded: by our programs
    /// on each pod's veth and the underlay, past the kernel's forward path
    /// (bpf, the default: measured fastest, docs/benchmarks/results.md), or
    /// by the kernel's routes (kernel: the conservative choice, for nodes
    /// whose netfilter FORWARD/POSTROUTING rules, e.g. NetworkPolicy, must
    /// see pod-to-pod traffic). NATed and Service flows take the kernel's
    /// path either way.
    #[arg(long, value_enum, default_value_t = Forward::Bpf)]
    forward: Forward,
    /// The bridge local pods sit behind (flannel's CNI plugin: cni0), where
    /// `--forward bpf` attaches once it exists.
    #[arg(long, default_value = "cni0")]
    pod_bridge: String,
    /// Run even where the pins would die with the agent: its bpffs is
    /// private to its mount namespace (e.g. under `ip netns exec`, where
    /// the agent mounts its own). Nothing then survives a restart.
    #[arg(long)]
    allow_ephemeral_pins: bool,
    /// Masquerade pod traffic leaving the cluster Network to the node's
    /// address (flannel's --ip-masq); `--ip-masq=false` leaves it to the
    /// CNI plugin (subnet.env says FLANNEL_IPMASQ=false). Needs --net-conf.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    ip_masq: bool,
    /// Address for /healthz, /readyz and /metrics.
    #[arg(long, default_value = "0.0.0.0:9472")]
    metrics_addr: std::net::SocketAddr,
    /// Delete flannel's kernel vxlan device (`flannel.<VNI>`) on our UDP
    /// port, left by a migration from flannel, once our datapath and
    /// routes are in place. Without it the agent refuses to start beside
    /// one: the device decapsulates tunnel traffic without our checks.
    #[arg(long)]
    remove_flannel_device: bool,
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
        Command::Cleanup { bpffs_root, subnet_file, keep_subnet_file, cni_conf } => {
            cleanup(&bpffs_root, (!keep_subnet_file).then_some(subnet_file.as_path()))
                .and_then(|()| remove_cni_conf(cni_conf.as_deref()))
        }
        Command::KernelCheck { min } => kernel_check(&min),
        Command::Check { iface, bpffs_root, decap } => check(&iface, bpffs_root, decap.into()),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // The whole cause chain on one line, without a backtrace: this is
            // what an operator reads.
            eprintln!("error: {}", overlay_agent::report::chain(&err));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Removes one agent's datapath: the routes whose destinations are in the
/// root's `ROUTES` map (so another root's routes in the same namespace
/// stay), the pins under the root, and subnet.env. A root not on bpffs is
/// refused before anything is touched.
fn cleanup(root: &std::path::Path, subnet_file: Option<&std::path::Path>) -> anyhow::Result<()> {
    use overlay_agent::{bpffs, maps::DatapathMaps, routes};
    if root.exists() && !bpffs::is_bpffs(root) {
        return Err(bpffs::BpffsError::NotBpffs { path: root.to_owned() }.into());
    }
    let layout = bpffs::PinLayout::new(root);
    let interfaces = layout.linked_interfaces();
    let ours = if layout.map(overlay_common::map_names::ROUTES).exists() {
        DatapathMaps::route_destinations(root).context("reading which routes this root installed")?
    } else {
        println!("no ROUTES map under {}: no route can be told to be this root's, so none is removed", root.display());
        Vec::new()
    };
    let installed: Vec<_> = routes::owned().context("listing the agent's routes")?.into_iter().filter(|c| ours.contains(c)).collect();
    if let Some((cidr, refused)) = routes::remove_all(&installed).context("removing the agent's routes")?.into_iter().next() {
        anyhow::bail!("removing the route to {cidr}: {refused}");
    }
    println!("removed {} routes (proto {}, destinations in {})", installed.len(), routes::ROUTE_PROTO, layout.map(overlay_common::map_names::ROUTES).display());
    // Before TCX the TC programs are clsact filters, which no pin holds.
    for iface in &interfaces {
        Datapath::detach_clsact(iface).with_context(|| format!("detaching from {iface}"))?;
    }
    let left = Datapath::remove_pins(root).with_context(|| format!("removing the pins under {}", root.display()))?;
    let detached = if interfaces.is_empty() { "no interface".to_owned() } else { interfaces.join(", ") };
    println!("detached from {detached} and removed the pins under {}", root.display());
    if !left.is_empty() {
        let left: Vec<String> = left.iter().map(|p| p.display().to_string()).collect();
        println!("left what the agent did not create: {}", left.join(", "));
    }
    let rules = overlay_agent::netfilter::remove().context("removing the masquerade and FORWARD rules")?;
    println!(
        "removed {} and the FORWARD accept rules from {}",
        if rules.masquerade_table { "the nftables table ip overlay" } else { "no nftables table" },
        if rules.forward.is_empty() { "no iptables".to_owned() } else { rules.forward.iter().map(|v| format!("iptables-{v}")).collect::<Vec<_>>().join(", ") }
    );
    let Some(subnet_file) = subnet_file else { return Ok(()) };
    match std::fs::remove_file(subnet_file) {
        Ok(()) => println!("removed {}", subnet_file.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", subnet_file.display())),
    }
    Ok(())
}

fn remove_cni_conf(path: Option<&std::path::Path>) -> anyhow::Result<()> {
    let Some(path) = path else { return Ok(()) };
    match std::fs::remove_file(path) {
        Ok(()) => println!("removed {}", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
    }
    Ok(())
}

fn kernel_check(min: &str) -> anyhow::Result<()> {
    let minimum = overlay_agent::preflight::major_minor(min)
        .with_context(|| format!("--min {min:?}: expected MAJOR.MINOR, e.g. 6.6"))?;
    let release = overlay_agent::preflight::check_kernel(minimum)?;
    println!("kernel {release}: at least {min}");
    Ok(())
}

/// `check` pins into a directory of its own: a fresh one, never an
/// existing one (a running agent's root would lose its datapath), and
/// removes only what it pinned there.
fn check(iface: &str, root: Option<PathBuf>, hook: DecapHook) -> anyhow::Result<()> {
    let root = root.unwrap_or_else(|| {
        PathBuf::from(format!("{}/overlay-check-{}", overlay_agent::bpffs::BPFFS_MOUNT, std::process::id()))
    });
    if root.exists() && !overlay_agent::bpffs::is_bpffs(&root) {
        return Err(overlay_agent::bpffs::BpffsError::NotBpffs { path: root }.into());
    }
    if root.exists() {
        anyhow::bail!(
            "--bpffs-root {} already exists: check needs a directory of its own on bpffs (it removes its pins afterwards); name one that does not exist, or leave the flag out",
            root.display()
        );
    }
    let result = check_in(iface, &root, hook);
    let detach = Datapath::detach_clsact(iface).context("detaching the check's filters");
    let cleanup = Datapath::remove_pins(&root).context("cleaning up the check's pins").map(drop).and(detach);
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
