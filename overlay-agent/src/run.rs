//! `overlay-agent run`: the pipeline, top to bottom.
//!
//! node source (manifest directory or Kubernetes watch) → desired state →
//! diff → apply (maps, routes) → publish (our Node, subnet.env, readiness).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::programs::XdpMode;
use futures::{FutureExt as _, StreamExt as _};
use overlay_agent::{
    apply::Applier,
    bpffs::{self, LinkRole},
    datapath::{Datapath, DecapHook, LinkOutcome},
    hook::{DecapRequest, HookFacts, choose_decap_hook},
    desired::{Backend, Desired, LocalSettings, NotReady, Paths, RejectKind, Rejected, desired},
    foreign_vxlan::{self, VxlanDevice},
    etcd_source::{self, EtcdSource},
    iface,
    kernel_events::{KernelEvent, KernelEvents, Watched},
    kube_source::{self, NodeCache, Publisher},
    manifests::ManifestDir,
    maps::DatapathMaps,
    metrics::Metrics,
    netconf::{self, NetConf},
    netfilter::PodTrafficRules,
    node::{self, NodeInfo},
    pod_ports,
    report::{Chain, WithCauses as _},
    routes, server,
};
use overlay_common::{Counter, ROUTE_MODE_DIRECT, ROUTE_MODE_UNREACHABLE, ROUTE_MODE_VXLAN};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::{Decap, Forward, RunArgs};

/// How often the nodes directory is looked at; changes land within this.
const POLL: Duration = Duration::from_millis(200);
/// How often an unchanged error reading the nodes directory is repeated.
const DIR_ERROR_REPEAT: Duration = Duration::from_secs(60);
/// How often the datapath counters are checked for problems to report and
/// failed writes to the API are retried.
const HOUSEKEEPING: Duration = Duration::from_secs(5);
/// Watch events taken in one batch before reconciling: a relist of
/// thousands of nodes is applied once, not node by node.
const MAX_BATCH: usize = 100_000;

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(run_async(args))
}

/// Where nodes come from.
enum Source {
    Dir(ManifestDir),
    Kube(Box<KubeNodes>),
    /// flannel's etcd mode: snapshots come from the task that holds our
    /// lease and watches everyone's (`etcd_snapshots`).
    Etcd,
}

struct KubeNodes {
    watch: futures::stream::BoxStream<'static, WatchItem>,
    cache: NodeCache,
    publisher: Publisher,
}

type WatchItem = Result<kube::runtime::watcher::Event<k8s_openapi::api::core::v1::Node>, kube::runtime::watcher::Error>;

async fn run_async(args: RunArgs) -> anyhow::Result<()> {
    let etcd = if args.etcd_endpoints.is_empty() { None } else { Some(etcd_source::connect_and_read_config(&etcd_options(&args)).await?) };
    let (settings, iface, subnet_file) = settings(&args, etcd.as_ref().map(|(_, config)| config.net_conf.clone()))?;
    let metrics = Arc::new(Metrics::new(&args.bpffs_root));
    let bound = server::serve(args.metrics_addr, metrics.clone()).await?;
    let mut etcd_snapshots = None;
    let mut source = match (&args.nodes_dir, etcd) {
        (_, Some((client, config))) => {
            let public_ip = match settings.public_ip {
                Some(ip) => ip,
                None => iface::ipv4_addresses(&iface)
                    .with_context(|| format!("reading the IPv4 addresses of {iface}"))?
                    .first()
                    .copied()
                    .with_context(|| format!("{iface} has no IPv4 address to advertise in our lease; give --public-ip"))?,
            };
            let attrs = etcd_source::OwnAttrs {
                node_name: settings.node_name.clone(),
                public_ip,
                backend_type: settings.backend.flannel_name().to_owned(),
                vni: settings.vni,
                previous_subnet: subnet_file.as_deref().and_then(etcd_source::previous_subnet),
            };
            etcd_snapshots = Some(EtcdSource::new(client, &args.etcd_prefix, config, attrs).spawn());
            Source::Etcd
        }
        (Some(dir), None) => {
            if !dir.is_dir() {
                bail!("--nodes-dir {}: not a directory", dir.display());
            }
            Source::Dir(ManifestDir::new(dir))
        }
        (None, None) => {
            // $KUBECONFIG only where no --nodes-dir was given: an exported
            // variable must not conflict with a flag the user typed.
            let kubeconfig = args.kubeconfig.clone().or_else(|| std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()).map(PathBuf::from));
            let client = kube_source::client(kubeconfig.as_deref()).await?;
            Source::Kube(Box::new(KubeNodes {
                watch: kube_source::node_watcher(client.clone()).boxed(),
                cache: NodeCache::new(&settings.node_name),
                publisher: Publisher::new(client, &settings.node_name),
            }))
        }
    };

    // From here on SIGTERM (the kubelet stopping a pod that is still
    // starting) waits for the loop, which leaves everything in place,
    // instead of killing the agent half way through attaching.
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    // Before anything is touched: a kernel vxlan device on our port would
    // decapsulate what our programs do not see.
    let mut flannel_devices = foreign_vxlan_devices(settings.vxlan_port, args.remove_flannel_device)?;
    match bpffs::pin_persistence(&args.bpffs_root) {
        bpffs::Persistence::Host => {}
        bpffs::Persistence::Ephemeral(why) if args.allow_ephemeral_pins => {
            warn!(root = %args.bpffs_root.display(), reason = %why, "the pins live in this process's own mount namespace: nothing survives a restart (the datapath dies with the agent, its routes stay behind); allowed by --allow-ephemeral-pins");
        }
        bpffs::Persistence::Ephemeral(why) => bail!(
            "--bpffs-root {}: {why}, so the pins would die with this process (a restart would cut traffic, and leave the routes without a datapath). Run the agent in the host's mount namespace (`nsenter --net=/run/netns/NAME`, not `ip netns exec`; in a pod, mount the host's /sys/fs/bpf), or pass --allow-ephemeral-pins to accept it",
            args.bpffs_root.display()
        ),
    }
    // A failed start removes what it created (the root's pins are all
    // new when its maps were not there).
    let fresh_root = !bpffs::PinLayout::new(&args.bpffs_root).maps_dir().exists();
    let source_kind = match source { Source::Dir(_) => "manifests", Source::Kube(_) => "kubernetes", Source::Etcd => "etcd" };
    let mut agent = match start(&args, &iface, settings, subnet_file, metrics, bound, source_kind) {
        Ok(agent) => agent,
        Err(err) => {
            if fresh_root {
                match Datapath::remove_pins(&args.bpffs_root) {
                    Ok(_) => info!(root = %args.bpffs_root.display(), "start failed; removed the pins it created"),
                    Err(cleanup) => warn!(root = %args.bpffs_root.display(), error = %Chain(&cleanup), "start failed, and removing the pins it created failed too"),
                }
            }
            return Err(err);
        }
    };
    // Subscribed before the first look at the pod bridge: nothing changes
    // unheard in between.
    let watched = Watched { underlay: iface.clone(), pod_bridge: agent.pod_fast_path.as_ref().map(|f| f.bridge.clone()) };
    let mut kernel_events = KernelEvents::spawn(watched).context("subscribing to the kernel's link, address and route changes")?;
    // CONFIG is written by the first reconcile, which follows.
    agent.attach_pod_fast_path();

    let mut poll = tokio::time::interval(POLL);
    let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
    let mut mismatched_seen =
        agent.applier.maps().counters_total().map(|c| c.packets(Counter::MismatchedPort)).unwrap_or(0);
    let mut nodes: Vec<Arc<NodeInfo>> = Vec::new();
    let mut synced = false;
    // The nodes directory's last read error, and when it was logged.
    let mut dir_error: Option<(String, Instant)> = None;
    loop {
        // Set when a branch wakes up, so durations leave out idle waiting.
        let started;
        let mut changed = false;
        let mut paths_changed = false;
        tokio::select! {
            _ = poll.tick(), if matches!(source, Source::Dir(_)) => {
                started = Instant::now();
                let Source::Dir(dir) = &mut source else { unreachable!() };
                match dir.scan_if_changed() {
                    Ok(Some(scan)) => {
                        if dir_error.take().is_some() {
                            info!("nodes directory readable again");
                        }
                        agent.report_invalid(scan.errors.iter().map(|e| Chain(e).to_string()).collect());
                        nodes = scan.nodes.into_iter().map(Arc::new).collect();
                        synced = true;
                        changed = true;
                    }
                    Ok(None) => {
                        if dir_error.take().is_some() {
                            info!("nodes directory readable again");
                        }
                    }
                    Err(err) => {
                        // Once per distinct error, and again each minute.
                        let text = Chain(&err).to_string();
                        if dir_error.as_ref().is_none_or(|(last, at)| *last != text || at.elapsed() >= DIR_ERROR_REPEAT) {
                            error!(error = %text, "reading the nodes directory; keeping the current state");
                            dir_error = Some((text, Instant::now()));
                        }
                    }
                }
            }
            event = next_watch_event(&mut source) => {
                started = Instant::now();
                let Source::Kube(kube) = &mut source else { unreachable!() };
                let KubeNodes { watch, cache, .. } = &mut **kube;
                let mut event = event;
                // Take everything already waiting, then reconcile once.
                for _ in 0..MAX_BATCH {
                    match event {
                        Some(Ok(event)) => changed |= cache.handle(event),
                        Some(Err(err)) => {
                            agent.metrics.watch_restarts.inc();
                            warn!(error = %err.to_string_with_causes(), "watching Nodes; retrying with backoff (the datapath keeps forwarding)");
                        }
                        None => bail!("the Node watch ended"),
                    }
                    match watch.next().now_or_never() {
                        Some(next) => event = next,
                        None => break,
                    }
                }
                if changed && cache.synced() {
                    nodes = cache.nodes();
                    agent.report_invalid(cache.invalid().iter().map(|e| Chain(e).to_string()).collect());
                }
                changed &= cache.synced();
                synced = cache.synced();
            }
            snapshot = next_etcd_snapshot(&mut etcd_snapshots) => {
                started = Instant::now();
                let Some(snapshot) = snapshot else { bail!("the etcd source stopped") };
                agent.report_invalid(snapshot.invalid.iter().map(|e| Chain(e).to_string()).collect());
                nodes = snapshot.nodes.into_iter().map(Arc::new).collect();
                synced = true;
                changed = true;
            }
            events = kernel_events.next() => {
                started = Instant::now();
                if events.contains(&KernelEvent::UnderlayChanged) {
                    paths_changed = agent.check_paths(&nodes);
                }
                if events.contains(&KernelEvent::PodBridgeChanged) || events.contains(&KernelEvent::PodPortsChanged) {
                    agent.attach_pod_fast_path();
                }
                // A new bridge's index and MAC reach CONFIG by a reconcile.
                changed = synced && events.contains(&KernelEvent::PodBridgeChanged);
            }
            _ = housekeeping.tick() => {
                started = Instant::now();
                warn_on_port_mismatch(&agent.applier, agent.settings.vxlan_port, &mut mismatched_seen);
                // Retries what failed before (API writes, events).
                changed = synced;
            }
            _ = sigterm.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
        if !(changed || paths_changed) || !synced {
            continue;
        }
        let source_time = started.elapsed();
        if changed {
            // New peers need their paths before their modes are decided.
            agent.check_new_paths(&nodes);
        }
        let paths_time = started.elapsed() - source_time;
        let Some((desired, rejected)) = agent.reconcile(&nodes, started, [source_time, paths_time]) else { continue };
        // Our programs and routes serve now: flannel's device can go.
        for device in flannel_devices.drain(..) {
            match foreign_vxlan::remove(&device) {
                Ok(()) => info!(device = %device.name, "deleted flannel's vxlan device (--remove-flannel-device)"),
                Err(err) => error!(error = %err, "deleting flannel's vxlan device; delete it by hand: ip link del {}", device.name),
            }
        }
        match &source {
            Source::Dir(_) => agent.log_missing_annotations(&nodes, &desired),
            // Our lease, which the source task holds, is what we publish.
            Source::Etcd => {}
            Source::Kube(kube) => agent.publish(&kube.cache, &kube.publisher, &desired, rejected).await,
        }
    }
    // Links and maps stay pinned and routes stay in place: the datapath
    // keeps forwarding until a new agent takes over (`cleanup` removes it).
    info!("stopping; the datapath stays in place");
    Ok(())
}

/// Loads the datapath, adopts the pinned state and attaches: everything a
/// failed start must undo.
fn start(args: &RunArgs, iface: &str, settings: LocalSettings, subnet_file: Option<PathBuf>, metrics: Arc<Metrics>, bound: std::net::SocketAddr, source_kind: &str) -> anyhow::Result<Agent> {
    let datapath = Datapath::load(&args.bpffs_root).context("loading the datapath")?;
    let maps = DatapathMaps::open(&args.bpffs_root)?;
    let applier = Applier::new(maps, iface).context("adopting the pinned state")?;
    let mut agent = Agent {
        settings,
        subnet_file,
        decap: args.decap,
        pod_fast_path: (args.forward == Forward::Bpf).then(|| PodFastPath { bridge: args.pod_bridge.clone(), ifindex: None, ports: BTreeMap::new() }),
        datapath,
        attached: None,
        applier,
        metrics,
        paths: Paths::new(),
        reported: BTreeSet::new(),
        evented: BTreeSet::new(),
        pod_traffic_rules: PodTrafficRules::new(args.ip_masq),
    };
    if agent.settings.network.is_none() {
        warn!("no --net-conf: without the cluster Network, pod traffic leaving the cluster is not masqueraded and no FORWARD accept rules are installed");
    }
    info!(
        node = %agent.settings.node_name,
        backend = agent.settings.backend.flannel_name(),
        direct_routing = agent.settings.direct_routing,
        iface = %agent.applier.iface(),
        vni = agent.settings.vni,
        port = agent.settings.vxlan_port,
        network = ?agent.settings.network,
        root = %args.bpffs_root.display(),
        maps_adopted = agent.datapath.maps_adopted(),
        %bound,
        source = source_kind,
        "starting"
    );
    // Attach (or swap into the pinned links) before anything is applied:
    // adopted maps hold the cluster's state from the previous run, so the
    // new programs serve at once, even with the API server unreachable;
    // fresh maps are unconfigured, and unconfigured programs pass all
    // traffic. Kernel routes toward peers come only after this, so no
    // packet is routed to the underlay without its encapsulation.
    agent.attach()?;
    Ok(agent)
}

/// `--forward bpf`: the bridge the fast path attaches to, the bridge's
/// ifindex when it was attached (a recreated bridge has a new one), and
/// the ports (pod veths, by name and index) it is attached to.
struct PodFastPath {
    bridge: String,
    ifindex: Option<u32>,
    ports: BTreeMap<String, u32>,
}

/// The kernel vxlan devices on `port`: an error naming them and what to
/// do, unless all are flannel's and `remove` allows deleting them (then
/// they are returned, to be deleted once our datapath serves).
fn foreign_vxlan_devices(port: u16, remove: bool) -> anyhow::Result<Vec<VxlanDevice>> {
    let devices = foreign_vxlan::on_port(port).context("looking for kernel vxlan devices on our UDP port")?;
    let describe = |d: &VxlanDevice| format!("{} (VNI {}, UDP port {})", d.name, d.vni.map_or("?".to_owned(), |v| v.to_string()), d.port);
    if let Some(other) = devices.iter().find(|d| !d.is_flannels()) {
        bail!(
            "the kernel vxlan device {} receives on our UDP port {port} and would decapsulate tunnel traffic our \
             programs do not see; it is not flannel's, so the agent leaves it alone: delete it (`ip link del {}`) or \
             choose another --port",
            describe(other),
            other.name
        );
    }
    if !remove && let Some(flannel) = devices.first() {
        bail!(
            "flannel's vxlan device {} is still here (left by a migration from flannel?): it receives on \
             0.0.0.0:{port} and decapsulates tunnel traffic to any of this node's addresses without our checks. \
             Stop flanneld, then delete it (`ip link del {}`), or start the agent with --remove-flannel-device, which \
             deletes it once our datapath and routes are in place",
            describe(flannel),
            flannel.name
        );
    }
    Ok(devices)
}

async fn next_watch_event(source: &mut Source) -> Option<WatchItem> {
    match source {
        Source::Kube(kube) => kube.watch.next().await,
        Source::Dir(_) | Source::Etcd => std::future::pending().await,
    }
}

async fn next_etcd_snapshot(snapshots: &mut Option<tokio::sync::mpsc::Receiver<etcd_source::Snapshot>>) -> Option<etcd_source::Snapshot> {
    match snapshots {
        Some(snapshots) => snapshots.recv().await,
        None => std::future::pending().await,
    }
}

/// flanneld's `--etcd-*` flags.
fn etcd_options(args: &RunArgs) -> etcd_source::EtcdOptions {
    etcd_source::EtcdOptions {
        endpoints: args.etcd_endpoints.clone(),
        prefix: args.etcd_prefix.trim_end_matches('/').to_owned(),
        ca_file: args.etcd_cafile.clone(),
        cert_file: args.etcd_certfile.clone(),
        key_file: args.etcd_keyfile.clone(),
    }
}

/// Settings from the flags and `net-conf.json`, the underlay interface, and
/// where to write `subnet.env`.
fn settings(args: &RunArgs, etcd_net_conf: Option<NetConf>) -> anyhow::Result<(LocalSettings, String, Option<PathBuf>)> {
    let node_name = match &args.node_name {
        Some(name) => name.clone(),
        None => hostname().context("--node-name not given, $NODE_NAME unset, and the hostname is unreadable")?,
    };
    let iface = match &args.iface {
        Some(iface) => iface.clone(),
        None => iface::default_route_interface()
            .context("--iface not given and there is no IPv4 default route to take it from")?,
    };
    let Some(ifindex) = iface::interface_index(&iface) else {
        bail!("--iface {iface}: no such interface in this network namespace");
    };
    let underlay_mtu = iface::mtu(&iface).with_context(|| format!("reading the MTU of {iface}"))?;
    let netconf = match etcd_net_conf {
        Some(conf) => Some(conf),
        None => args.net_conf.as_deref().map(NetConf::read).transpose()?,
    };
    if let Some(conf) = &netconf {
        let flags = [
            ("--backend", args.backend.is_some()),
            ("--vni", args.vni.is_some()),
            ("--port", args.port.is_some()),
            ("--direct-routing", args.direct_routing),
        ];
        if let Some((flag, _)) = flags.iter().find(|(_, given)| *given) {
            bail!(
                "{flag} and --net-conf both set the backend; set it in {} (Backend: Type, VNI, Port, DirectRouting) and drop the flag",
                args.net_conf.as_ref().map_or_else(|| format!("{}/config in etcd", args.etcd_prefix), |p| p.display().to_string())
            );
        }
        info!(network = %conf.network, backend = conf.backend.flannel_name(), vni = conf.vni, port = conf.port, direct_routing = conf.direct_routing, "read net-conf.json");
    }
    let backend = match (&netconf, args.backend) {
        (Some(conf), _) => conf.backend,
        (None, Some(crate::Backend::HostGw)) => Backend::HostGw,
        (None, _) => Backend::Vxlan,
    };
    if args.direct_routing && backend == Backend::HostGw {
        bail!("--direct-routing applies to --backend vxlan only; host-gw always routes directly");
    }
    let settings = LocalSettings {
        node_name,
        backend,
        direct_routing: netconf.as_ref().map_or(args.direct_routing, |c| c.direct_routing),
        vni: netconf.as_ref().map_or(args.vni.unwrap_or(overlay_common::DEFAULT_VNI), |c| c.vni),
        vxlan_port: netconf.as_ref().map_or(args.port.unwrap_or(overlay_common::DEFAULT_VXLAN_PORT), |c| c.port),
        underlay_ifindex: ifindex,
        underlay_mtu,
        pod_bridge_ifindex: 0,
        pod_bridge_mac: [0; 6],
        // Until attach settles the hook: whenever XDP may be in front, so
        // TC never drops what XDP decapsulated (see Config::xdp_decap).
        xdp_decap: !(args.decap == Decap::Tc || (args.decap == Decap::Auto && backend == Backend::HostGw)),
        public_ip: args.public_ip,
        network: netconf.as_ref().map(|c| c.network),
    };
    // subnet.env needs the cluster network, which only net-conf.json gives.
    let subnet_file = netconf.is_some().then(|| args.subnet_file.clone());
    Ok((settings, iface, subnet_file))
}

/// The agent's state between events.
struct Agent {
    settings: LocalSettings,
    subnet_file: Option<PathBuf>,
    decap: Decap,
    /// `--forward bpf`: the pod bridge and where the fast path is attached.
    pod_fast_path: Option<PodFastPath>,
    datapath: Datapath,
    /// The decap hook in use, once attached.
    attached: Option<DecapHook>,
    applier: Applier,
    metrics: Arc<Metrics>,
    /// The kernel's paths to the nodes' addresses, as last asked (those
    /// of nodes gone are dropped at the next path check).
    paths: Paths,
    /// Problems already logged, so each is logged once, not per reconcile.
    reported: BTreeSet<String>,
    /// Problems already recorded as Kubernetes events.
    evented: BTreeSet<String>,
    /// Masquerade and FORWARD accept rules (`netfilter`).
    pod_traffic_rules: PodTrafficRules,
}

impl Agent {
    /// Attaches the programs (or swaps them into the pinned links).
    fn attach(&mut self) -> anyhow::Result<()> {
        let iface = self.applier.iface().to_owned();
        // Settled before anything is attached: a fallback after a failed
        // attachment races the kernel's release of what was undone.
        let request = match self.decap {
            Decap::Auto => DecapRequest::Auto,
            Decap::Xdp => DecapRequest::Xdp(XdpMode::Default),
            Decap::XdpGeneric => DecapRequest::Xdp(XdpMode::Skb),
            Decap::Tc => DecapRequest::Tc,
        };
        let ours = self.datapath.layout().link(&iface, LinkRole::DecapXdp).exists();
        let xdp_taken = !ours && iface::has_xdp_program(&iface).with_context(|| format!("asking whether XDP is free on {iface}"))?;
        let driver = iface::driver(&iface).ok();
        let facts = HookFacts { backend: self.settings.backend, driver: driver.as_deref(), xdp_taken };
        let (hook, why) = choose_decap_hook(request, facts, &iface)?;
        info!(%iface, driver = driver.as_deref().unwrap_or("unknown"), ?hook, reason = why, "decapsulation hook chosen");
        let fast_path = self.pod_fast_path.is_some();
        let report = self.datapath.attach(&iface, hook, fast_path).with_context(|| format!("attaching to {iface}"))?;
        for removed in &report.removed {
            info!(pin = %removed.display(), "removed an attachment or map layout this agent no longer uses");
        }
        if [report.egress, report.decap].contains(&LinkOutcome::NotPinnable) {
            warn!("this kernel cannot pin the attachments (TCX needs 6.6, XDP links 5.9): the datapath detaches when the agent stops");
        }
        info!(%iface, ?hook, egress = ?report.egress, decap = ?report.decap, "datapath attached");
        self.attached = Some(hook);
        // Written to CONFIG by the next reconcile.
        self.settings.xdp_decap = matches!(hook, DecapHook::Xdp(_));
        Ok(())
    }

    /// With `--forward bpf`: attaches the fast path to the pod bridge once
    /// it exists (again if it was recreated) and to each of its ports,
    /// detaches it from ports that are gone, and enrols in `POD_PORTS` the
    /// pods behind the ports it is attached to. Until then, and if anything
    /// here fails, pods are served by the kernel both ways, so this only
    /// warns. The bridge's index and MAC reach CONFIG with the reconcile
    /// that follows.
    fn attach_pod_fast_path(&mut self) {
        let Some(fast_path) = &mut self.pod_fast_path else { return };
        let bridge = fast_path.bridge.clone();
        let waiting = format!("no pod bridge {bridge}");
        let Some(ifindex) = iface::interface_index(&bridge) else {
            fast_path.ifindex = None;
            fast_path.ports.clear();
            self.settings.pod_bridge_ifindex = 0;
            if let Err(err) = pod_ports::clear(self.applier.maps_mut()) {
                warn!(error = %err.to_string_with_causes(), "cannot empty POD_PORTS");
            }
            if self.reported.insert(waiting) {
                info!(%bridge, "no pod bridge yet (the CNI plugin creates it with the first pod); pod traffic takes the kernel routes until it appears");
            }
            return;
        };
        if fast_path.ifindex != Some(ifindex) {
            let mac = iface::mac_address(&bridge).ok();
            match (mac, self.datapath.attach_pod_fast_path(&bridge)) {
                (Some(mac), Ok(outcome)) => {
                    fast_path.ifindex = Some(ifindex);
                    fast_path.ports.clear();
                    self.settings.pod_bridge_ifindex = ifindex;
                    self.settings.pod_bridge_mac = mac;
                    self.reported.remove(&waiting);
                    info!(%bridge, ?outcome, "pod fast path attached to the bridge; its pods are enrolled as their veths get it");
                }
                (mac, result) => {
                    let problem = match result {
                        Err(err) => err.to_string_with_causes(),
                        Ok(_) => format!("no MAC address readable for {bridge} ({mac:?})"),
                    };
                    if self.reported.insert(format!("pod fast path on {bridge}: {problem}")) {
                        warn!(%bridge, error = %problem, "cannot attach the pod fast path; pod traffic takes the kernel routes");
                    }
                    return;
                }
            }
        }
        let fdb = match pod_ports::Fdb::read(&bridge) {
            Ok(fdb) => fdb,
            Err(err) => {
                if self.reported.insert(format!("POD_PORTS: {}", err.to_string_with_causes())) {
                    warn!(%bridge, error = %err.to_string_with_causes(), "cannot read the pod bridge's ports; its pods stay on the kernel's path");
                }
                return;
            }
        };
        let ports = fdb.ports();
        // Ports that are gone, or recreated under the same name.
        let underlay = self.applier.iface().to_owned();
        let stale: Vec<String> = self
            .datapath
            .pod_fast_path_interfaces()
            .into_iter()
            .filter(|i| *i != bridge && *i != underlay)
            .filter(|i| !ports.contains(i) || fast_path.ports.get(i).is_some_and(|&idx| iface::interface_index(i) != Some(idx)))
            .collect();
        for port in stale {
            fast_path.ports.remove(&port);
            if let Err(err) = self.datapath.detach_pod_fast_path(&port) {
                warn!(%port, error = %err.to_string_with_causes(), "cannot remove the fast path's pins for a gone pod veth");
            }
        }
        let new_ports: Vec<String> = ports.iter().filter(|p| !fast_path.ports.contains_key(*p)).cloned().collect();
        for port in &new_ports {
            let Some(port_index) = iface::interface_index(port) else { continue };
            match self.datapath.attach_pod_port(port) {
                Ok(_) => {
                    fast_path.ports.insert(port.clone(), port_index);
                }
                Err(err) => {
                    if self.reported.insert(format!("pod fast path on {port}: {}", err.to_string_with_causes())) {
                        warn!(%port, error = %err.to_string_with_causes(), "cannot attach the fast path to a pod veth; its pod stays on the kernel's path");
                    }
                }
            }
        }
        match pod_ports::sync(self.applier.maps_mut(), &fdb, &fast_path.ports) {
            Ok(_) => self.reported.retain(|p| !p.starts_with("POD_PORTS: ")),
            Err(err) => {
                if self.reported.insert(format!("POD_PORTS: {}", err.to_string_with_causes())) {
                    warn!(%bridge, error = %err.to_string_with_causes(), "cannot enrol the bridge's pods; they stay on the kernel's path");
                }
            }
        }
    }

    /// Asks the kernel for its paths to nodes whose address it has not
    /// been asked about yet: a single Node update costs no full re-check.
    fn check_new_paths(&mut self, nodes: &[Arc<NodeInfo>]) {
        let mut new: Vec<Ipv4Addr> = nodes.iter().map(|n| n.node_ip).filter(|a| !self.paths.contains_key(a)).collect();
        new.sort_unstable();
        new.dedup();
        match routes::paths(self.applier.iface(), &new) {
            Ok(paths) => self.paths.extend(paths),
            Err(err) => warn!(error = %err.to_string_with_causes(), "asking the kernel for paths to new nodes"),
        }
    }

    /// Re-asks the kernel for its paths to all nodes. Returns whether any
    /// changed.
    fn check_paths(&mut self, nodes: &[Arc<NodeInfo>]) -> bool {
        let addrs: Vec<Ipv4Addr> = nodes.iter().map(|n| n.node_ip).collect();
        match routes::paths(self.applier.iface(), &addrs) {
            Ok(paths) => {
                // Entries of nodes gone do not count: only what is read.
                let mut changed = false;
                for (addr, path) in &paths {
                    match self.paths.get(addr) {
                        Some(old) if old == path => {}
                        Some(_) => {
                            info!(peer = %addr, ?path, "underlay path changed; re-evaluating its mode");
                            changed = true;
                        }
                        None => changed = true,
                    }
                }
                self.paths = paths;
                changed
            }
            Err(err) => {
                warn!(error = %err.to_string_with_causes(), "asking the kernel for paths to the nodes");
                false
            }
        }
    }

    /// Logs problems with nodes once each (not on every reconcile).
    fn report_invalid(&mut self, problems: Vec<String>) {
        self.metrics.nodes_invalid.set(problems.len() as i64);
        for problem in &problems {
            if !self.reported.contains(problem) {
                warn!(problem = %problem, "bad Node manifest or object");
            }
        }
        self.reported.retain(|p| !p.starts_with("invalid:"));
        self.reported.extend(problems.into_iter().map(|p| format!("invalid:{p}")));
    }

    /// desired → diff → apply; then attach (first time) and write
    /// subnet.env. Returns the desired state, and the nodes left out, when
    /// it was applied.
    ///
    /// `stages` are the times the node source and the underlay paths took
    /// before, for the log.
    fn reconcile(&mut self, nodes: &[Arc<NodeInfo>], started: Instant, stages: [Duration; 2]) -> Option<(Desired, Vec<Rejected>)> {
        let [source_time, paths_time] = stages;
        let desired_start = Instant::now();
        let (desired, rejected) = match desired(&self.settings, nodes, &self.paths) {
            Ok(result) => result,
            Err(not_ready) => {
                let key = format!("notready:{not_ready}");
                if self.reported.insert(key) {
                    match not_ready {
                        NotReady::NoLocalNode(_) => warn!(reason = %not_ready, "datapath not configured yet"),
                        NotReady::LocalPodCidrOutsideNetwork(_) => error!(reason = %not_ready, "refusing to configure the datapath"),
                    }
                }
                return None;
            }
        };
        self.reported.retain(|k| !k.starts_with("notready:"));
        if let Err(problem) = self.check_own_address(nodes, &desired) {
            if self.reported.insert(format!("ownaddr:{problem}")) {
                error!(node = %self.settings.node_name, "{problem}");
            }
            return None;
        }
        self.reported.retain(|k| !k.starts_with("ownaddr:"));
        let mut now_rejected = BTreeSet::new();
        for r in &rejected {
            let key = format!("rejected:{r}");
            if !self.reported.contains(&key) {
                if r.kind == RejectKind::NotSubnetManaged {
                    // Normal while a node's agent starts up.
                    info!(node = %r.node, reason = %r.reason, "peer not programmed yet");
                } else {
                    warn!(node = %r.node, reason = %r.reason, "peer not served as asked");
                }
            }
            now_rejected.insert(key);
        }
        self.reported.retain(|k| !k.starts_with("rejected:"));
        self.reported.extend(now_rejected);
        self.metrics.nodes_rejected.set(rejected.len() as i64);
        let desired_time = desired_start.elapsed();

        let applied = match self.applier.apply(&desired) {
            Ok(applied) => applied,
            Err(err) => {
                error!(error = %err.to_string_with_causes(), "applying the desired state; will retry");
                return None;
            }
        };
        for failure in &applied.failed {
            error!(error = %failure, "peer not programmed");
        }
        for (mode, name) in [(ROUTE_MODE_VXLAN, "vxlan"), (ROUTE_MODE_DIRECT, "direct"), (ROUTE_MODE_UNREACHABLE, "unreachable")] {
            let count = desired.peers.values().filter(|p| p.mode == mode).count();
            self.metrics.peers.get_or_create(&[("mode", name)]).set(count as i64);
        }
        if applied.added_or_updated + applied.removed > 0 || applied.config_changed {
            let elapsed = started.elapsed();
            self.metrics.reconcile_seconds.observe(elapsed.as_secs_f64());
            info!(
                nodes = nodes.len(),
                peers = desired.peers.len(),
                upserted = applied.added_or_updated,
                removed = applied.removed,
                config_changed = applied.config_changed,
                elapsed_us = elapsed.as_micros() as u64,
                source_us = source_time.as_micros() as u64,
                paths_us = paths_time.as_micros() as u64,
                desired_us = desired_time.as_micros() as u64,
                maps_us = applied.maps_time.as_micros() as u64,
                routes_us = applied.routes_time.as_micros() as u64,
                "reconciled"
            );
        }
        if let (Some(path), Some(network)) = (&self.subnet_file, self.settings.network) {
            let env = netconf::subnet_env(network, desired.local_pod_cidr, desired.inner_mtu, self.pod_traffic_rules.masquerade());
            match netconf::write_atomically(path, &env) {
                Ok(true) => info!(path = %path.display(), "wrote subnet.env for flannel's CNI plugin"),
                Ok(false) => {}
                Err(err) => {
                    error!(error = %err.to_string_with_causes(), "writing subnet.env; pods cannot start until it exists");
                    return None;
                }
            }
        }
        if let Some(network) = self.settings.network {
            self.keep_pod_traffic_rules(network, desired.local_pod_cidr);
        }
        if !self.metrics.ready() {
            self.metrics.set_ready();
            info!(peers = desired.peers.len(), elapsed_ms = started.elapsed().as_millis() as u64, "ready: the initial sync is in the datapath");
        }
        Some((desired, rejected))
    }

    /// Our tunnel address must be one of the underlay's, or peers would
    /// send to an address this node does not answer on; unless it was set
    /// on purpose (`--public-ip`, or flannel's `public-ip-overwrite` for a
    /// node behind NAT).
    fn check_own_address(&self, nodes: &[Arc<NodeInfo>], desired: &Desired) -> Result<(), String> {
        let me = nodes.iter().find(|n| n.name == self.settings.node_name);
        if self.settings.public_ip.is_some() || me.is_some_and(|m| m.public_ip_overwrite.is_some()) {
            return Ok(());
        }
        let iface = self.applier.iface();
        let address = Ipv4Addr::from(desired.config.node_ip);
        match iface::ipv4_addresses(iface) {
            Ok(addresses) if addresses.contains(&address) => Ok(()),
            Ok(addresses) => Err(format!(
                "refusing to configure the datapath: our Node's address {address} is not an address of {iface} ({}); peers would tunnel to an address this node does not answer on. Fix our Node's InternalIP or --iface (or --node-name, if this is another node); for a node behind NAT, set {} or --public-ip",
                if addresses.is_empty() { "it has none".to_owned() } else { addresses.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ") },
                node::ANNOTATION_PUBLIC_IP_OVERWRITE,
            )),
            Err(err) => Err(format!("refusing to configure the datapath: cannot read the addresses of {iface}: {err}")),
        }
    }

    /// Masquerade and FORWARD accept rules: written when they change,
    /// re-checked every few seconds. A failure is logged and retried;
    /// it does not hold back the datapath, which pod-to-pod traffic needs
    /// either way.
    fn keep_pod_traffic_rules(&mut self, network: ipnetwork::Ipv4Network, pod_cidr: ipnetwork::Ipv4Network) {
        match self.pod_traffic_rules.keep(network, pod_cidr) {
            None => {}
            Some(Ok(changes)) => {
                self.reported.retain(|p| !p.starts_with("netfilter:"));
                if changes.any() {
                    info!(
                        masquerade = self.pod_traffic_rules.masquerade(),
                        masquerade_written = changes.masquerade_written,
                        masquerade_removed = changes.masquerade_removed,
                        forward_accept_written = ?changes.forward_written,
                        %network, %pod_cidr,
                        "pod traffic rules in place (nftables table ip overlay; iptables FORWARD -> OVERLAY-FWD)"
                    );
                }
            }
            Some(Err(err)) => {
                let problem = format!("{:#}", anyhow::Error::new(err));
                if self.reported.insert(format!("netfilter:{problem}")) {
                    error!(error = %problem, "installing the masquerade and FORWARD rules; will retry");
                }
            }
        }
    }

    /// The file source cannot publish: say what our Node must carry.
    fn log_missing_annotations(&mut self, nodes: &[Arc<NodeInfo>], desired: &Desired) {
        let Some(me) = nodes.iter().find(|n| n.name == self.settings.node_name) else { return };
        let advertised = me.vtep_mac == Some(desired.config.vtep_mac) && me.vni == Some(desired.config.vni);
        if self.settings.backend == Backend::Vxlan && !advertised {
            let wanted = node::flannel_annotations(self.settings.backend.flannel_name(), &desired.config);
            let text: Vec<String> = wanted.iter().map(|(k, v)| format!("{k}='{v}'")).collect();
            let key = format!("annotate:{}", text.join(" "));
            if self.reported.insert(key) {
                // flannel peers can only reach us through what our Node says.
                warn!(node = %me.name, "our Node does not advertise our VTEP; flannel nodes cannot send to us until it carries: {}", text.join(" "));
            }
        }
    }

    /// Publishes our Node's annotations and condition, and events for
    /// peers an operator must fix. Failures are retried at housekeeping.
    async fn publish(&mut self, cache: &NodeCache, publisher: &Publisher, desired: &Desired, rejected: Vec<Rejected>) {
        let Some(own) = cache.own() else { return };
        let wanted = node::flannel_annotations(self.settings.backend.flannel_name(), &desired.config);
        let missing = node::missing_annotations(own, &wanted);
        if !missing.is_empty() {
            match publisher.annotate(&missing).await {
                Ok(()) => info!(annotations = ?missing, "published our tunnel endpoint on our Node"),
                Err(err) => warn!(error = %err.to_string_with_causes(), "publishing our Node's annotations; will retry"),
            }
        }
        if self.attached.is_some() && !kube_source::network_marked_available(own) {
            match publisher.network_available().await {
                Ok(()) => info!("set NetworkUnavailable=False on our Node"),
                Err(err) => warn!(error = %err.to_string_with_causes(), "setting our Node's NetworkUnavailable condition; will retry"),
            }
        }
        for r in rejected {
            let Some(reason) = r.kind.event_reason() else { continue };
            let key = format!("{}:{}", r.node, r.reason);
            if self.evented.contains(&key) {
                continue;
            }
            match publisher.warn(&r.node, reason, format!("{} (reported by overlay-agent on {})", r.reason, self.settings.node_name)).await {
                Ok(()) => {
                    self.evented.insert(key);
                }
                Err(err) => warn!(error = %err.to_string_with_causes(), node = %r.node, "recording an event; will retry"),
            }
        }
    }
}

/// Known nodes tunnelling to the other well-known VXLAN port would
/// otherwise be a silent loss: say which setting to change.
fn warn_on_port_mismatch(applier: &Applier, port: u16, seen: &mut u64) {
    let Ok(counters) = applier.maps().counters_total() else {
        return;
    };
    let mismatched = counters.packets(Counter::MismatchedPort);
    if mismatched > *seen {
        let other = if port == overlay_common::IANA_VXLAN_PORT {
            overlay_common::DEFAULT_VXLAN_PORT
        } else {
            overlay_common::IANA_VXLAN_PORT
        };
        warn!(
            packets = mismatched - *seen,
            our_port = port,
            their_port = other,
            "known nodes send VXLAN to port {other} but this node uses port {port}; their traffic is not decapsulated. Use one port cluster-wide (net-conf.json Backend.Port)"
        );
    }
    *seen = mismatched;
}

fn hostname() -> anyhow::Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")?;
    Ok(name.trim().to_owned())
}
