//! `overlay-agent run`: sets the node up (settings, datapath, attach) and
//! hands over to the library's event loop ([`overlay_agent::reconciler`]),
//! with the host's chores behind its [`Host`] seam: the pod fast path,
//! subnet.env, the masquerade and FORWARD rules, flannel's device.

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use aya::programs::XdpMode;
use overlay_agent::{
    apply::Applier,
    bpffs::{self, LinkRole, MAP_LAYOUT_VERSION},
    carry,
    cli::{self, Decap, Forward, RunArgs},
    datapath::{Datapath, DecapHook, LinkOutcome},
    desired::{Backend, Desired, LocalSettings},
    etcd_source::{self, EtcdSource},
    foreign_vxlan::{self, Appeared, AppearedDevices, VxlanDevice},
    hook::{DecapRequest, HookFacts, choose_decap_hook},
    iface,
    kernel_events::{KernelEvents, Watched},
    kube_source,
    manifests::ManifestDir,
    maps::DatapathMaps,
    metrics::Metrics,
    netconf::{self, NetConf},
    netfilter::PodTrafficRules,
    pod_ports,
    reconciler::{
        Host, NodeSource, Publisher, Reconciler,
        kernel::KernelUnderlay,
        sources::{EtcdNodes, KubeSource, LeasePublisher, LogPublisher, ManifestSource},
    },
    report::{Chain, WithCauses as _},
    device_pair::{DevicePairError, FeatureRepairs, PairKind},
    gro_device, seg_device, server,
};
use overlay_common::{Counter, DECAP_HOOK_FROM_XDP, DECAP_HOOK_TC, DECAP_HOOK_TO_XDP, DECAP_HOOK_XDP};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

/// How long a device pair `CONFIG` stopped naming is kept before it is
/// removed: programs that read `CONFIG` before finish in microseconds, and
/// veth's queue empties within a NAPI poll.
const RETIRED_DEVICE_DRAIN: Duration = Duration::from_millis(100);
/// How long a device pair whose setting up failed waits before it is
/// tried again: the resyncs (every 30 s) try it.
const PAIR_RETRY: Duration = Duration::from_secs(20);
/// How long a recreated underlay that could not be attached to waits
/// before the next try (each try attaches, and undoes what it attached).
const UNDERLAY_RETRY: Duration = Duration::from_secs(20);

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(run_async(args))
}

/// Where nodes come from, connected.
enum Source {
    Dir(ManifestDir),
    Kube(kube::Client),
    /// flannel's etcd mode: snapshots come from the task that holds our
    /// lease and watches everyone's.
    Etcd(tokio::sync::mpsc::Receiver<Result<etcd_source::Snapshot, etcd_source::EtcdSourceError>>),
}

async fn run_async(args: RunArgs) -> anyhow::Result<()> {
    // Before anything is touched (the flannel device, the pins, the
    // routes): a newer map layout's pins are a newer agent's datapath,
    // serving from maps this agent cannot read (a rollback).
    bpffs::PinLayout::new(&args.bpffs_root).refuse_newer_layout()?;
    let etcd_options = etcd_options(&args);
    let etcd = if args.etcd_endpoints.is_empty() { None } else { Some(etcd_source::connect_and_read_config(&etcd_options).await?) };
    let (settings, iface, subnet_file) = settings(&args, etcd.as_ref().map(|(_, config)| config.net_conf.clone()))?;
    let metrics = Arc::new(Metrics::new(&args.bpffs_root));
    let bound = server::serve(args.metrics_addr, metrics.clone()).await?;
    let source = match (&args.nodes_dir, etcd) {
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
            Source::Etcd(EtcdSource::new(client, &args.etcd_prefix, config, attrs).with_failure_hints(etcd_options.failure_hints()).spawn())
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
            Source::Kube(kube_source::client(kubeconfig.as_deref()).await?)
        }
    };

    // From here on SIGTERM (the kubelet stopping a pod that is still
    // starting) and SIGINT (Ctrl-C, a supervisor's stop signal) wait for
    // the loop, which leaves everything in place, instead of killing the
    // agent half way through loading, carrying or attaching.
    // (`tokio::signal::ctrl_c` would install its handler only once the
    // loop first polls it.)
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    // Before anything is touched: a kernel vxlan device on our port would
    // decapsulate what our programs do not see.
    let flannel_devices = foreign_vxlan_devices(settings.vxlan_port, args.remove_flannel_device)?;
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
    // A failed start removes what it created: everything under a root that
    // was not there, or was empty. A root that held anything (an older
    // layout's maps and links, say: an upgrade whose new agent cannot
    // start) is the running datapath's, and stays as it is.
    let fresh_root = match std::fs::read_dir(&args.bpffs_root) {
        Ok(mut entries) => entries.next().is_none(),
        Err(err) => err.kind() == std::io::ErrorKind::NotFound,
    };
    // Likewise this layout's maps, where a start makes them beside an
    // older layout's (an upgrade): left behind, the next start would adopt
    // them (empty, or a stale carry) instead of carrying the older state.
    let layout_existed = bpffs::PinLayout::new(&args.bpffs_root).maps_dir().exists();
    let source_kind = match source {
        Source::Dir(_) => "manifests",
        Source::Kube(_) => "kubernetes",
        Source::Etcd(_) => "etcd",
    };
    let failed_start = |err: anyhow::Error| {
        if fresh_root {
            match Datapath::remove_pins(&args.bpffs_root) {
                Ok(_) => info!(root = %args.bpffs_root.display(), "start failed; removed the pins it created"),
                Err(cleanup) => warn!(root = %args.bpffs_root.display(), error = %Chain(&cleanup), "start failed, and removing the pins it created failed too"),
            }
        } else if !layout_existed {
            match Datapath::remove_current_layout_maps(&args.bpffs_root) {
                Ok(_) => info!(root = %args.bpffs_root.display(), "start failed; removed the map pins it created beside the running datapath's"),
                Err(cleanup) => warn!(root = %args.bpffs_root.display(), error = %Chain(&cleanup), "start failed, and removing the map pins it created failed too"),
            }
        }
        err
    };
    let mut started = start(&args, &iface, settings, subnet_file, flannel_devices, bound, source_kind).map_err(failed_start)?;
    // Attach (or swap into the pinned links) before anything is applied:
    // adopted maps hold the cluster's state from the previous run, so the
    // new programs serve at once, even with the API server unreachable;
    // fresh maps are unconfigured, and unconfigured programs pass all
    // traffic. Kernel routes toward peers come only after this, so no
    // packet is routed to the underlay without its encapsulation.
    started.host.attach(&mut started.settings).map_err(failed_start)?;
    // The new programs serve from the new maps now: a failure from here on
    // leaves them (and an older layout's pins) for the next start.
    started.applier.remove_older_layouts_routes().context("removing the routes only an older map layout recorded")?;
    // Only now: an older layout's ROUTES was the record of those routes.
    for dir in started.host.datapath.remove_older_layouts().context("removing an older map layout")? {
        info!(pin = %dir.display(), "removed a map layout this agent no longer uses");
    }
    let stop = async move {
        tokio::select! {
            _ = sigterm.recv() => {}
            _ = sigint.recv() => {}
        }
    };
    match source {
        Source::Kube(client) => {
            let (source, publisher) = KubeSource::new(client, &started.settings.node_name, metrics.clone());
            drive(started, source, publisher, metrics, stop).await?;
        }
        Source::Dir(dir) => drive(started, ManifestSource::new(dir), LogPublisher::default(), metrics, stop).await?,
        // Our lease, which the source's task holds, is what we publish.
        Source::Etcd(snapshots) => drive(started, EtcdNodes::new(snapshots), LeasePublisher, metrics, stop).await?,
    }
    // Links and maps stay pinned and routes stay in place: the datapath
    // keeps forwarding until a new agent takes over (`cleanup` removes it).
    info!("stopping; the datapath stays in place");
    Ok(())
}

/// What [`start`] set up: the loop's writer and host, and the settings
/// the attachment settled.
struct Started {
    settings: LocalSettings,
    applier: Applier,
    host: NodeHost,
    /// After an upgrade from the previous map layout: its sockets map, to
    /// carry once the pods' veths run the new programs.
    late_sockets: Option<carry::LateSockets>,
}

async fn drive<S: NodeSource, P: Publisher>(started: Started, source: S, publisher: P, metrics: Arc<Metrics>, stop: impl Future<Output = ()>) -> anyhow::Result<()> {
    let Started { mut settings, applier, mut host, late_sockets } = started;
    // Subscribed before the first look at the pod bridge: nothing changes
    // unheard in between.
    let watched = Watched {
        underlay: applier.iface().to_owned(),
        pod_bridge: host.pod_fast_path.as_ref().map(|f| f.bridge.clone()),
        device_pairs: PairKind::ALL.iter().flat_map(|kind| kind.pair().device_names()).map(str::to_owned).collect(),
    };
    let events = KernelEvents::spawn(watched).context("subscribing to the kernel's link, address and route changes")?;
    let underlay = KernelUnderlay::new(applier.iface(), events);
    // CONFIG is written by the first reconcile, which follows.
    host.attach_pod_fast_path(&mut settings);
    // The old programs on the pods' veths recorded sockets in the old map
    // until just now (see `carry::LateSockets`).
    if let Some(late_sockets) = late_sockets {
        match late_sockets.carry() {
            Ok(added) => info!(kernel_sockets = added, "carried the sockets the previous map layout's programs recorded after the carry"),
            Err(err) => warn!(
                error = %err.to_string_with_causes(),
                "could not carry the sockets the previous map layout's programs recorded after the carry; a connection they opened through a Service may need a retry"
            ),
        }
    }
    let mut reconciler = Reconciler::new(settings, source, applier, underlay, publisher, host, metrics);
    reconciler.run(stop).await.map_err(anyhow::Error::from)
}

/// Loads the datapath and adopts the pinned state, up to attaching the
/// programs (the caller attaches): everything a failed start must undo.
fn start(args: &RunArgs, iface: &str, settings: LocalSettings, subnet_file: Option<PathBuf>, flannel_devices: Vec<VxlanDevice>, bound: std::net::SocketAddr, source_kind: &str) -> anyhow::Result<Started> {
    let datapath = Datapath::load(&args.bpffs_root).context("loading the datapath")?;
    // An upgrade from the previous map layout: its state goes into the new
    // maps before the new programs are swapped in, so they serve at once
    // and its routes stay (see `carry`); also into pinned maps a stopped
    // start left unconfigured (`Datapath::configured`).
    let mut late_sockets = None;
    if !datapath.maps_adopted() || !datapath.configured() {
        match carry::previous_layout(&args.bpffs_root) {
            Ok(None) => {}
            Ok(Some((carried, late))) => {
                late_sockets = Some(late);
                info!(
                    from = format!("v{}", carry::FROM),
                    to = format!("v{MAP_LAYOUT_VERSION}"),
                    config = carried.config,
                    peers = carried.peers,
                    routes = carried.routes,
                    pod_ports = carried.pod_ports,
                    kernel_sockets = carried.kernel_sockets,
                    "carried the previous map layout's state into the new maps"
                );
            }
            Err(err) => warn!(
                error = %err.to_string_with_causes(),
                "could not carry the previous map layout's state, so the new programs carry no pod traffic to other nodes until the first reconcile fills their maps (a previous map not as that layout pinned it: nothing carried; a failed write: what was written before it stays)"
            ),
        }
    }
    let maps = DatapathMaps::open(&args.bpffs_root)?;
    let applier = Applier::new(maps, iface).context("adopting the pinned state")?;
    // The host's own handles on the maps it writes (POD_PORTS) and reads
    // (the counters).
    let maps = DatapathMaps::open(&args.bpffs_root)?;
    let mismatched_seen = maps.counters_total().map(|c| c.packets(Counter::MismatchedPort)).unwrap_or(0);
    let host = NodeHost {
        iface: iface.to_owned(),
        vxlan_port: settings.vxlan_port,
        network: settings.network,
        subnet_file,
        decap: args.decap,
        pod_fast_path: (args.forward == Forward::Bpf).then(|| PodFastPath { bridge: args.pod_bridge.clone(), ifindex: None, ports: BTreeMap::new() }),
        datapath,
        maps,
        reported: BTreeSet::new(),
        pod_traffic_rules: PodTrafficRules::new(args.ip_masq),
        flannel_devices,
        appeared_vxlan: None,
        remove_flannel_device: args.remove_flannel_device,
        mismatched_seen,
        decap_hook: None,
        datapath_problem: Some("not attached yet".to_owned()),
        pairs_wanted: BTreeSet::new(),
        pair_retry_after: BTreeMap::new(),
        feature_repairs: BTreeMap::new(),
        underlay_retry: UnderlayRetry::default(),
    };
    if settings.network.is_none() {
        warn!("no --net-conf: without the cluster Network, pod traffic leaving the cluster is not masqueraded, no FORWARD accept rules are installed, and a peer's pod CIDR is bounded only by the other nodes' and ranges no pod network uses (a Node with a pod CIDR over another host's address takes this node's traffic to it)");
    }
    info!(
        node = %settings.node_name,
        backend = settings.backend.flannel_name(),
        direct_routing = settings.direct_routing,
        iface = %applier.iface(),
        vni = settings.vni,
        port = settings.vxlan_port,
        network = ?settings.network,
        root = %args.bpffs_root.display(),
        maps_adopted = host.datapath.maps_adopted(),
        %bound,
        source = source_kind,
        "starting"
    );
    Ok(Started { settings, applier, host, late_sockets })
}

/// `--forward bpf`: the bridge the fast path attaches to, the bridge's
/// ifindex when it was attached (a recreated bridge has a new one), and
/// the ports (pod veths, by name and index) it is attached to.
struct PodFastPath {
    bridge: String,
    ifindex: Option<u32>,
    ports: BTreeMap<String, u32>,
}

/// The host's problems the loop logs once each, until they go away.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum HostProblem {
    NoPodBridge(String),
    PodFastPath { iface: String, problem: String },
    PodPorts(String),
    /// A device pair the datapath wants could not be set up.
    DevicePair(PairKind),
    /// Another tool keeps changing a pair's features (`FeatureRepairs`).
    DevicePairFeatures(PairKind),
}

/// Everything on the node besides the peers' maps and routes.
struct NodeHost {
    iface: String,
    vxlan_port: u16,
    network: Option<ipnetwork::Ipv4Network>,
    subnet_file: Option<PathBuf>,
    decap: Decap,
    /// `--forward bpf`: the pod bridge and where the fast path is attached.
    pod_fast_path: Option<PodFastPath>,
    datapath: Datapath,
    maps: DatapathMaps,
    reported: BTreeSet<HostProblem>,
    /// Masquerade and FORWARD accept rules (`netfilter`), kept on their own
    /// thread; dropping the host waits for a check under way.
    pod_traffic_rules: PodTrafficRules,
    /// flannel's devices to delete once our datapath serves.
    flannel_devices: Vec<VxlanDevice>,
    /// Kernel vxlan devices on our port that appear later (flanneld, still
    /// running, makes its device again), checked once our datapath serves.
    appeared_vxlan: Option<AppearedDevices>,
    /// `--remove-flannel-device`.
    remove_flannel_device: bool,
    /// The mismatched-port counter when last looked at.
    mismatched_seen: u64,
    /// Where decapsulation was attached.
    decap_hook: Option<DecapHook>,
    /// Why the datapath does not serve, as last checked (at attach, then
    /// every housekeeping): what our Node's `NetworkUnavailable` follows.
    datapath_problem: Option<String>,
    /// The device pairs the datapath uses under this run's flags (set at
    /// attach): kept set up, made again when they go.
    pairs_wanted: BTreeSet<PairKind>,
    /// When a pair whose setting up failed (and deleted what it had made,
    /// a deletion the agent hears as an event too) is tried again.
    pair_retry_after: BTreeMap<PairKind, Instant>,
    /// How often each pair's features were set again lately.
    feature_repairs: BTreeMap<PairKind, FeatureRepairs>,
    /// A recreated underlay (by its new index) that could not be attached
    /// to, and when it is tried again.
    underlay_retry: UnderlayRetry,
}

/// When attaching to a recreated underlay is tried: at once for a new
/// index, and after a failure again only once [`UNDERLAY_RETRY`] has
/// passed (every kernel event about the underlay and every housekeeping
/// asks), so a device that cannot be attached to is neither hammered nor
/// logged about at each event.
#[derive(Debug, Default)]
struct UnderlayRetry(Option<(u32, Instant)>);

#[derive(Debug, PartialEq, Eq)]
enum UnderlayAttempt {
    /// A new index: try, and log the try and its failure.
    First,
    /// The index that failed, its wait over: try quietly.
    Again,
    /// The index that failed, still waiting.
    NotYet,
}

impl UnderlayRetry {
    fn attempt(&self, index: u32, now: Instant) -> UnderlayAttempt {
        match self.0 {
            Some((failed, _)) if failed != index => UnderlayAttempt::First,
            Some((_, after)) if now < after => UnderlayAttempt::NotYet,
            Some(_) => UnderlayAttempt::Again,
            None => UnderlayAttempt::First,
        }
    }

    fn failed(&mut self, index: u32, now: Instant) {
        self.0 = Some((index, now + UNDERLAY_RETRY));
    }

    fn succeeded(&mut self) {
        self.0 = None;
    }
}

impl Host for NodeHost {
    fn housekeeping(&mut self) {
        warn_on_port_mismatch(&self.maps, self.vxlan_port, &mut self.mismatched_seen);
        self.check_datapath();
        if self.appeared_vxlan.as_ref().is_some_and(AppearedDevices::pending) {
            self.check_vxlan_devices();
        }
    }

    fn vxlan_device_appeared(&mut self) {
        self.check_vxlan_devices();
    }

    fn datapath_problem(&mut self) -> Option<String> {
        self.datapath_problem.clone()
    }

    async fn finished_work(&mut self) {
        let checked = self.pod_traffic_rules.checked().await;
        self.pod_traffic_rules.report(checked);
    }

    fn pod_network_changed(&mut self, local: &mut LocalSettings) {
        // The reconcile that follows writes any new bridge index.
        self.attach_pod_fast_path(local);
    }

    fn underlay_changed(&mut self, local: &mut LocalSettings) {
        // Gone: `check_datapath` says so (our Node's NetworkUnavailable)
        // until it is back.
        let Some(index) = iface::interface_index(&self.iface) else { return };
        if index == local.underlay_ifindex {
            // Its MTU may change any time (set after the device was made,
            // say): CONFIG's MTUs, the routes' and subnet.env follow it.
            if let Ok(mtu) = iface::mtu(&self.iface)
                && mtu != local.underlay_mtu
            {
                info!(iface = %self.iface, old_mtu = local.underlay_mtu, new_mtu = mtu, "the underlay's MTU changed");
                local.underlay_mtu = mtu;
            }
            return;
        }
        let first_try = match self.underlay_retry.attempt(index, Instant::now()) {
            UnderlayAttempt::NotYet => return,
            attempt => attempt == UnderlayAttempt::First,
        };
        if first_try {
            warn!(iface = %self.iface, old_ifindex = local.underlay_ifindex, new_ifindex = index, "the underlay was recreated; attaching to it again");
        }
        let mut settings = local.clone();
        settings.underlay_ifindex = index;
        match iface::mtu(&self.iface) {
            Ok(mtu) => settings.underlay_mtu = mtu,
            Err(err) => warn!(iface = %self.iface, error = %err, "reading the recreated underlay's MTU; keeping the one read before"),
        }
        // The pinned links are the old device's: where it lives on under
        // another name, swapping into them would leave the new one bare.
        let attached = self
            .datapath
            .forget_links(&self.iface)
            .map_err(anyhow::Error::from)
            .and_then(|()| self.attach(&mut settings))
            .and_then(|()| self.datapath_problem.clone().map_or(Ok(()), |problem| Err(anyhow::anyhow!(problem))));
        match attached {
            Ok(()) => {
                self.underlay_retry.succeeded();
                // Now, not at the reconcile that follows (which waits for
                // the node's address on it): the fast path sends there.
                let (ifindex, mtu) = (settings.underlay_ifindex, settings.underlay_mtu);
                if let Err(err) = self.change_pinned_config(|config| {
                    config.underlay_ifindex = ifindex;
                    config.underlay_mtu = mtu;
                }) {
                    warn!(error = %err.to_string_with_causes(), "cannot write the recreated underlay's index to CONFIG; the next reconcile writes it");
                }
                info!(iface = %self.iface, ifindex, "attached to the recreated underlay");
                *local = settings;
            }
            // Tried again after UNDERLAY_RETRY, at the next change of the
            // underlay or housekeeping; the index stays as it was.
            Err(err) => {
                let problem = format!("attaching to the recreated {}: {err:#}", self.iface);
                if first_try {
                    error!(error = %problem, retry_in_s = UNDERLAY_RETRY.as_secs(), "the datapath does not serve this node");
                }
                self.underlay_retry.failed(index, Instant::now());
                self.datapath_problem = Some(problem);
            }
        }
    }

    fn device_pair_changed(&mut self, local: &mut LocalSettings) {
        for kind in PairKind::ALL {
            let (pair, index) = (kind.pair(), *kind.in_settings(local));
            if !self.pairs_wanted.contains(&kind) {
                continue;
            }
            if index != 0 && pair.still_serves(index) {
                // Features someone changed (GRO turned on where segments
                // must stay apart, say) are set again.
                let Some((end, feature, on)) = pair.feature_changed() else {
                    self.reported.remove(&HostProblem::DevicePairFeatures(kind));
                    continue;
                };
                let now = Instant::now();
                let repairs = self.feature_repairs.entry(kind).or_default();
                if !repairs.allow(now) {
                    if self.reported.insert(HostProblem::DevicePairFeatures(kind)) {
                        warn!(
                            device = end,
                            feature,
                            on,
                            "another tool keeps changing the {}'s features (set again {} times within {} s); leaving them as it set them for {} s at least, then the first link change or resync sets them again (stop that tool from managing {})",
                            pair.what,
                            FeatureRepairs::PER_WINDOW,
                            FeatureRepairs::WINDOW.as_secs(),
                            repairs.wait(now).as_secs().max(1),
                            pair.device_names().join(" and "),
                        );
                    }
                    continue;
                }
                self.reported.remove(&HostProblem::DevicePairFeatures(kind));
                warn!(device = end, feature, on, "the {}'s features changed; setting them again", pair.what);
                if let Err(err) = pair.set_features() {
                    self.feature_repairs.entry(kind).or_default().refused();
                    warn!(error = %err.to_string_with_causes(), "cannot set the {}'s features again", pair.what);
                }
                continue;
            }
            if index != 0 {
                let state = if pair.still_there(index) { "is down" } else { "went" };
                warn!(device = pair.send_end, ifindex = index, "the {} {state}; setting it up again", pair.what);
                // Until the new index is written, the programs do without
                // the pair (the GRO device's segments go straight into
                // their pods; pod tunnels' GSO packets are dropped as
                // helper_error) instead of sending to a device that is gone.
                if let Err(err) = self.write_pair_indexes([(kind, 0)]) {
                    warn!(error = %err.to_string_with_causes(), "cannot clear the {}'s index in CONFIG; what the datapath sends there is lost until the next reconcile", pair.what);
                }
            } else if self.pair_retry_after.get(&kind).is_some_and(|&after| Instant::now() < after) {
                continue;
            }
            // Also where setting it up failed before (another's device had
            // its name, say): tried again when a device of that name goes,
            // and on the resyncs.
            *kind.in_settings(local) = match pair.set_up(&mut self.datapath) {
                Ok((ifindex, outcome)) => {
                    self.reported.remove(&HostProblem::DevicePair(kind));
                    self.pair_retry_after.remove(&kind);
                    info!(devices = %pair.device_names().join(" -> "), send_ifindex = ifindex, ?outcome, "{} set up again", pair.what);
                    // Now, not at the reconcile that follows: the first
                    // waits for our own Node.
                    if let Err(err) = self.write_pair_indexes([(kind, ifindex)]) {
                        warn!(error = %err.to_string_with_causes(), "cannot write the {}'s index to CONFIG; the next reconcile writes it", pair.what);
                    }
                    ifindex
                }
                Err(err) => {
                    self.pair_failed(kind, &err);
                    0
                }
            };
        }
    }

    fn after_apply(&mut self, desired: &Desired) -> bool {
        if let (Some(path), Some(network)) = (&self.subnet_file, self.network) {
            let env = netconf::subnet_env(network, desired.local_pod_cidr, desired.inner_mtu, self.pod_traffic_rules.masquerade());
            match netconf::write_atomically(path, &env) {
                Ok(true) => info!(path = %path.display(), "wrote subnet.env for flannel's CNI plugin"),
                Ok(false) => {}
                Err(err) => {
                    error!(error = %err.to_string_with_causes(), "writing subnet.env; pods cannot start until it exists");
                    return false;
                }
            }
        }
        // Masquerade and FORWARD accept rules: handed to their own thread
        // when they change, which re-checks them every few seconds. A
        // failure is logged and retried; it does not hold back the
        // datapath, which pod-to-pod traffic needs either way.
        if let Some(network) = self.network {
            self.pod_traffic_rules.keep(network, desired.local_pod_cidr);
        }
        // Our programs and routes serve now: flannel's device can go.
        let first = self.appeared_vxlan.is_none();
        let appeared = self.appeared_vxlan.get_or_insert_with(|| AppearedDevices::new(self.remove_flannel_device));
        for device in self.flannel_devices.drain(..) {
            match foreign_vxlan::remove(&device) {
                Ok(()) => {
                    info!(device = %device.name, "deleted flannel's vxlan device (--remove-flannel-device)");
                    appeared.removed(Instant::now());
                }
                Err(err) => error!(error = %err, "deleting flannel's vxlan device; delete it by hand: ip link del {}", device.name),
            }
        }
        // A device that appeared since the start's check was heard of
        // before there was anything to decide with: look now.
        if first {
            self.check_vxlan_devices();
        }
        true
    }
}

impl NodeHost {
    /// Deals with kernel vxlan devices on our port that appeared since the
    /// start (nothing before our datapath serves: the start's own check
    /// and deletion come first): flannel's is deleted again where the flag
    /// allows, after a wait that grows each time it comes back; any other
    /// is reported.
    fn check_vxlan_devices(&mut self) {
        let Some(appeared) = &mut self.appeared_vxlan else { return };
        let devices = match foreign_vxlan::on_port(self.vxlan_port) {
            Ok(devices) => devices,
            Err(err) => {
                warn!(error = %err.to_string_with_causes(), "looking for kernel vxlan devices on our UDP port; asked again at the next change");
                return;
            }
        };
        let port = self.vxlan_port;
        for action in appeared.decide(devices, Instant::now()) {
            match action {
                Appeared::Remove(device) => match foreign_vxlan::remove(&device) {
                    Ok(()) => warn!(
                        device = %device.name,
                        "flannel's vxlan device came back and was deleted again (--remove-flannel-device): flanneld still runs on this node and makes it again whenever it is deleted; stop flanneld here (the migration guide's step 2), and the agent deletes the device once more. Rolling this node back to flannel instead? Stop the agent first (the guide's \"Rolling back one node\")"
                    ),
                    Err(err) => error!(error = %err, "deleting flannel's vxlan device, which came back; delete it by hand once flanneld is stopped: ip link del {}", device.name),
                },
                Appeared::Wait(_) => {}
                Appeared::Report(device) => {
                    let what = if !device.is_flannels() {
                        "it is not flannel's, so the agent leaves it alone: delete it, or give the agent another --port"
                    } else if self.remove_flannel_device {
                        "it is flannel's, made anew on a node where the agent deleted none (flanneld started here: a node rolled back to flannel?); the agent leaves it to flanneld: finish the rollback (stop the agent, then `overlay-agent cleanup`), or stop flanneld and delete it"
                    } else {
                        "stop flanneld on this node and delete it, or restart the agent with --remove-flannel-device"
                    };
                    error!(
                        device = %device.name,
                        vni = ?device.vni,
                        port,
                        "a kernel vxlan device appeared on our UDP port: it receives on 0.0.0.0:{port} and decapsulates tunnel traffic to this node's other addresses without our checks; {what} (`ip link del {}`)",
                        device.name
                    );
                }
            }
        }
    }

    /// Asks the kernel whether our programs still serve the underlay
    /// (every housekeeping: a few netlink queries, not one per event).
    fn check_datapath(&mut self) {
        self.datapath_problem = match self.decap_hook {
            None => Some("not attached yet".to_owned()),
            Some(hook) => self.datapath.check_attached(&self.iface, hook).err().map(|e| e.to_string_with_causes()),
        };
    }

    /// Attaches the programs (or swaps them into the pinned links).
    fn attach(&mut self, settings: &mut LocalSettings) -> anyhow::Result<()> {
        let iface = self.iface.clone();
        // Settled before anything is attached: a fallback after a failed
        // attachment races the kernel's release of what was undone.
        let request = match self.decap {
            Decap::Auto => DecapRequest::Auto,
            Decap::Xdp => DecapRequest::Xdp(XdpMode::Default),
            Decap::XdpGeneric => DecapRequest::Xdp(XdpMode::Skb),
            Decap::Tc => DecapRequest::Tc,
        };
        let ours = self.datapath.layout().link(&iface, LinkRole::DecapXdp).exists();
        // One query for both questions: is XDP another's, and is ours there.
        let xdp_attached = iface::has_xdp_program(&iface);
        let xdp_taken = !ours && *xdp_attached.as_ref().map_err(|e| anyhow::anyhow!("asking whether XDP is free on {iface}: {e}"))?;
        let driver = iface::driver(&iface).ok();
        let facts = HookFacts { backend: settings.backend, driver: driver.as_deref(), xdp_taken };
        let (hook, why) = choose_decap_hook(request, facts, &iface)?;
        info!(%iface, driver = driver.as_deref().unwrap_or("unknown"), ?hook, reason = why, "decapsulation hook chosen");
        let fast_path = self.pod_fast_path.is_some();
        if !fast_path {
            // A run with `--forward bpf` before: its pinned CONFIG names the
            // pod bridge, and the programs would go on delivering into pods
            // until the first reconcile, while the attachments that keep a
            // Service's sockets on the kernel's path go now. Off first.
            self.change_pinned_config(|config| {
                config.pod_bridge_ifindex = 0;
                config.pod_bridge_mac = [0; 6];
                config.pod_bridge_ip = [0; 4];
            })
            .context("turning the fast path off in the pinned CONFIG")?;
        }
        // The hook goes into the pinned CONFIG as both hooks are attached,
        // not at the first reconcile (which waits for our own Node, however
        // long): behind XDP, TC ingress must not judge what XDP
        // decapsulated as bare packets claiming a peer's pods (it would drop
        // them), and without XDP it must judge those.
        let xdp_decap = matches!(hook, DecapHook::Xdp(_));
        // The stages need the old hook's programs on this interface beside
        // the new one's (XDP has a TC program behind it only with the fast
        // path). Where they are not (a recreated underlay: its links were
        // forgotten), TC is written before it attaches, so it judges from
        // its first packet, and XDP as soon as it is attached.
        let staged = if xdp_decap {
            fast_path || self.datapath.layout().link(&iface, LinkRole::DecapTc).exists()
        } else {
            ours && matches!(xdp_attached, Ok(true))
        };
        if !xdp_decap && !staged {
            hand_decapsulation_over(&mut self.maps, false, false);
        }
        let maps = &mut self.maps;
        let mut handed_over = false;
        let attached = self.datapath.attach_with_handover(&iface, hook, fast_path, || {
            hand_decapsulation_over(maps, xdp_decap, staged);
            handed_over = true;
        });
        // Also when a later step of the attach failed: CONFIG says so.
        if handed_over {
            settings.xdp_decap = xdp_decap;
        }
        let report = attached.with_context(|| format!("attaching to {iface}"))?;
        for removed in &report.removed {
            info!(pin = %removed.display(), "removed an attachment or map layout this agent no longer uses");
        }
        if [report.egress, report.decap].contains(&LinkOutcome::NotPinnable) {
            warn!("this kernel cannot pin the attachments (TCX needs 6.6, XDP links 5.9): the datapath detaches when the agent stops");
        }
        info!(%iface, ?hook, egress = ?report.egress, decap = ?report.decap, "datapath attached");
        self.decap_hook = Some(hook);
        self.check_datapath();
        let seg_wanted = seg_device::wanted(settings.backend);
        let gro_wanted = gro_device::wanted(fast_path, hook == DecapHook::TcIngress, settings.backend == Backend::Vxlan);
        self.pairs_wanted = PairKind::ALL
            .into_iter()
            .filter(|kind| match kind {
                PairKind::Segmentation => seg_wanted,
                PairKind::Gro => gro_wanted,
            })
            .collect();
        self.settle_device_pairs(settings);
        Ok(())
    }

    /// Sets up the device pairs this run wants and removes the others.
    /// The pinned `CONFIG` the programs read until the first reconcile
    /// rewrites it (and that waits for our own Node, however long) is the
    /// previous run's, and may name a pair these flags do without, or one
    /// that went while the agent was down: whatever the programs send to a
    /// device that is gone is lost. So `CONFIG` stops naming those first (a
    /// device about to be removed gets a moment for what is on its way
    /// through it), and learns the new indexes as soon as they exist.
    fn settle_device_pairs(&mut self, settings: &mut LocalSettings) {
        let pinned = self.maps.config.get(&0, 0).ok().filter(|c| c.enabled != 0);
        let (mut stale, mut retiring) = (Vec::new(), BTreeSet::new());
        for kind in PairKind::ALL {
            let index = pinned.map_or(0, |config| kind.index_in(config));
            let serves = index != 0 && kind.pair().still_serves(index);
            if index != 0 && (!self.pairs_wanted.contains(&kind) || !serves) {
                stale.push((kind, 0));
                if serves {
                    retiring.insert(kind);
                }
            }
        }
        let cleared = self.write_pair_indexes(stale);
        let kept = match &cleared {
            Ok(changed) => {
                if *changed && !retiring.is_empty() {
                    info!("the datapath stops using the device pairs these flags do not need");
                    std::thread::sleep(RETIRED_DEVICE_DRAIN);
                }
                BTreeSet::new()
            }
            Err(err) => {
                warn!(error = %err.to_string_with_causes(), "cannot clear device pairs' indexes in CONFIG; the pairs it names that these flags do not need stay until the next start");
                retiring
            }
        };
        for kind in PairKind::ALL {
            let index = if kept.contains(&kind) {
                0
            } else {
                match kind.pair().settle(&mut self.datapath, self.pairs_wanted.contains(&kind)) {
                    Ok(index) => index,
                    Err(err) => {
                        self.pair_failed(kind, &err);
                        0
                    }
                }
            };
            *kind.in_settings(settings) = index;
        }
        let settled = PairKind::ALL.map(|kind| (kind, *kind.in_settings(settings)));
        if cleared.is_ok()
            && let Err(err) = self.write_pair_indexes(settled)
        {
            warn!(error = %err.to_string_with_causes(), "cannot write the device pairs' indexes to CONFIG; the first reconcile writes them");
        }
    }

    /// Notes that `kind` could not be set up, and says so the first time.
    /// A failure after creating the pair deletes it, which the agent hears
    /// as a deletion: such a pair waits [`PAIR_RETRY`] before it is tried
    /// again. Another's device holding the name deletes nothing: tried
    /// again as soon as a device of that name goes.
    fn pair_failed(&mut self, kind: PairKind, err: &DevicePairError) {
        if !matches!(err, DevicePairError::NotOurs { .. }) {
            self.pair_retry_after.insert(kind, Instant::now() + PAIR_RETRY);
        }
        if self.reported.insert(HostProblem::DevicePair(kind)) {
            let pair = kind.pair();
            warn!(error = %err.to_string_with_causes(), "cannot set up the {}; {} until it can (the agent tries again)", pair.what, pair.without);
        }
    }

    /// Writes the pairs' sending-end indexes into the pinned `CONFIG` (see
    /// [`Self::change_pinned_config`]).
    fn write_pair_indexes(&mut self, indexes: impl IntoIterator<Item = (PairKind, u32)>) -> Result<bool, aya::maps::MapError> {
        self.change_pinned_config(|config| {
            for (kind, index) in indexes {
                *kind.in_config(config) = index;
            }
        })
    }

    /// Changes the pinned `CONFIG`, if it is configured (a previous run's,
    /// or this run's once reconciled); whether it changed. The next
    /// reconcile writes `CONFIG` whole, from the settings it holds by then.
    fn change_pinned_config(&mut self, change: impl FnOnce(&mut overlay_common::Config)) -> Result<bool, aya::maps::MapError> {
        let before = self.maps.config.get(&0, 0)?;
        if before.enabled == 0 {
            return Ok(false);
        }
        let mut config = before;
        change(&mut config);
        if config == before {
            return Ok(false);
        }
        self.maps.config.set(0, config, 0)?;
        Ok(true)
    }

    /// With `--forward bpf`: attaches the fast path to the pod bridge once
    /// it exists (again if it was recreated) and to each of its ports,
    /// detaches it from ports that are gone, and enrols in `POD_PORTS` the
    /// pods behind the ports it is attached to. Until then, and if anything
    /// here fails, pods are served by the kernel both ways, so this only
    /// warns. The bridge's index and MAC reach CONFIG with the reconcile
    /// that follows.
    fn attach_pod_fast_path(&mut self, settings: &mut LocalSettings) {
        let Some(fast_path) = &mut self.pod_fast_path else { return };
        let bridge = fast_path.bridge.clone();
        let waiting = HostProblem::NoPodBridge(bridge.clone());
        let Some(ifindex) = iface::interface_index(&bridge) else {
            fast_path.ifindex = None;
            fast_path.ports.clear();
            settings.pod_bridge_ifindex = 0;
            settings.pod_bridge_addresses.clear();
            if let Err(err) = pod_ports::clear(&mut self.maps) {
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
                    settings.pod_bridge_ifindex = ifindex;
                    settings.pod_bridge_mac = mac;
                    self.reported.remove(&waiting);
                    info!(%bridge, ?outcome, "pod fast path attached to the bridge; its pods are enrolled as their veths get it");
                }
                (mac, result) => {
                    let problem = match result {
                        Err(err) => err.to_string_with_causes(),
                        Ok(_) => format!("no MAC address readable for {bridge} ({mac:?})"),
                    };
                    if self.reported.insert(HostProblem::PodFastPath { iface: bridge.clone(), problem: problem.clone() }) {
                        warn!(%bridge, error = %problem, "cannot attach the pod fast path; pod traffic takes the kernel routes");
                    }
                    return;
                }
            }
        }
        // A bridge without an address of its own takes the lowest of its
        // ports' MACs, so a pod joining or leaving can change the pods'
        // gateway MAC, which the out half compares frames with.
        match iface::mac_address(&bridge) {
            Ok(mac) if mac != settings.pod_bridge_mac => {
                info!(%bridge, mac = %overlay_agent::node::format_mac(mac), "the pod bridge's MAC changed; the fast path routes frames sent to the new one");
                settings.pod_bridge_mac = mac;
            }
            Ok(_) => {}
            Err(err) => warn!(%bridge, error = %err, "cannot read the pod bridge's MAC; the fast path keeps the last one"),
        }
        // The CNI plugin gives the bridge its address with the first pod;
        // the kernel's notice of it (RTM_NEWADDR on the bridge) is a
        // `PodPortsChanged`, which brings the agent here.
        match iface::ipv4_addresses(&bridge) {
            Ok(addresses) if addresses != settings.pod_bridge_addresses => {
                info!(%bridge, ?addresses, "the pod bridge's addresses changed; pods' packets from them are left to the kernel's path");
                settings.pod_bridge_addresses = addresses;
            }
            Ok(_) => {}
            Err(err) => warn!(%bridge, error = %err, "cannot read the pod bridge's addresses; the fast path keeps the last ones"),
        }
        let fdb = match pod_ports::Fdb::read(&bridge) {
            Ok(fdb) => fdb,
            Err(err) => {
                if self.reported.insert(HostProblem::PodPorts(err.to_string_with_causes())) {
                    warn!(%bridge, error = %err.to_string_with_causes(), "cannot read the pod bridge's ports; its pods stay on the kernel's path");
                }
                return;
            }
        };
        let ports = fdb.ports();
        // Ports that are gone, or recreated under the same name.
        let underlay = self.iface.clone();
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
                    if self.reported.insert(HostProblem::PodFastPath { iface: port.clone(), problem: err.to_string_with_causes() }) {
                        warn!(%port, error = %err.to_string_with_causes(), "cannot attach the fast path to a pod veth; its pod stays on the kernel's path");
                    }
                }
            }
        }
        match pod_ports::sync(&mut self.maps, &fdb, &fast_path.ports) {
            Ok(_) => self.reported.retain(|p| !matches!(p, HostProblem::PodPorts(_))),
            Err(err) => {
                if self.reported.insert(HostProblem::PodPorts(err.to_string_with_causes())) {
                    warn!(%bridge, error = %err.to_string_with_causes(), "cannot enrol the bridge's pods; they stay on the kernel's path");
                }
            }
        }
    }
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

/// How long the pinned CONFIG holds a handover stage: far longer than a
/// packet normally takes from XDP to TC ingress (the same softirq, or the
/// backlog behind it), so none that XDP handled before the stage meets TC
/// after it. Assumed, not enforced: a packet held longer than this between
/// the two (a starved backlog) could still meet a hook that misjudges it.
const HANDOVER_STAGE: Duration = Duration::from_millis(100);

/// Writes the decapsulation hook into the pinned CONFIG (when a previous
/// run configured it) through the stage that lets no packet meet a hook
/// that misjudges it (see `Config::xdp_decap`), held while packets XDP
/// handled before may still be on their way to TC: onto XDP,
/// `DECAP_HOOK_TO_XDP` (XDP passed bare packets unjudged before; now both
/// hooks judge them, and TC decapsulates); back to TC,
/// `DECAP_HOOK_FROM_XDP` (XDP decapsulated before; now it only judges, and
/// TC decapsulates and takes bare packets for judged). Both hooks are
/// attached meanwhile; a start that changes hook takes that much longer.
/// Without `staged` (the old hook's programs are not there), the hook is
/// written at once.
fn hand_decapsulation_over(maps: &mut DatapathMaps, xdp: bool, staged: bool) {
    let Ok(before) = maps.config.get(&0, 0) else { return };
    let (stage, hook) = if xdp { (DECAP_HOOK_TO_XDP, DECAP_HOOK_XDP) } else { (DECAP_HOOK_FROM_XDP, DECAP_HOOK_TC) };
    if before.enabled == 0 || before.xdp_decap == hook {
        return;
    }
    let stages: &[u16] = match (xdp, before.xdp_decap) {
        _ if !staged => &[hook],
        // Nothing XDP decapsulated is on its way.
        (false, DECAP_HOOK_TC | DECAP_HOOK_TO_XDP) => &[hook],
        _ => &[stage, hook],
    };
    for (k, &xdp_decap) in stages.iter().enumerate() {
        if k > 0 {
            std::thread::sleep(HANDOVER_STAGE);
        }
        if let Err(err) = maps.config.set(0, overlay_common::Config { xdp_decap, ..before }, 0) {
            warn!(error = %err.to_string_with_causes(), "cannot write the decapsulation hook to CONFIG; the first reconcile writes it");
            return;
        }
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
        (None, Some(cli::Backend::HostGw)) => Backend::HostGw,
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
        pod_bridge_addresses: Vec::new(),
        // Until attach settles the hook, which happens before any reconcile
        // writes CONFIG from these settings.
        xdp_decap: false,
        // Until attach sets up the segmentation device.
        seg_ifindex: 0,
        gro_ifindex: 0,
        public_ip: args.public_ip,
        iface_address: None,
        network: netconf.as_ref().map(|c| c.network),
    };
    // subnet.env needs the cluster network, which only net-conf.json gives.
    let subnet_file = netconf.is_some().then(|| args.subnet_file.clone());
    Ok((settings, iface, subnet_file))
}

/// Known nodes tunnelling to the other well-known VXLAN port would
/// otherwise be a silent loss: say which setting to change.
fn warn_on_port_mismatch(maps: &DatapathMaps, port: u16, seen: &mut u64) {
    let Ok(counters) = maps.counters_total() else {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A recreated underlay that could not be attached to: its index is
    /// tried again only after UNDERLAY_RETRY, quietly; another new index
    /// at once, as a first try; after a success, any index at once.
    #[test]
    fn a_failed_underlay_is_tried_again_after_its_wait() {
        let now = Instant::now();
        let mut retry = UnderlayRetry::default();
        assert_eq!(retry.attempt(7, now), UnderlayAttempt::First);
        retry.failed(7, now);
        assert_eq!(retry.attempt(7, now), UnderlayAttempt::NotYet);
        assert_eq!(retry.attempt(7, now + UNDERLAY_RETRY - Duration::from_millis(1)), UnderlayAttempt::NotYet);
        assert_eq!(retry.attempt(7, now + UNDERLAY_RETRY), UnderlayAttempt::Again);
        assert_eq!(retry.attempt(8, now), UnderlayAttempt::First, "a newer device is tried at once");
        retry.failed(7, now + UNDERLAY_RETRY);
        assert_eq!(retry.attempt(7, now + UNDERLAY_RETRY), UnderlayAttempt::NotYet, "each failure waits again");
        retry.succeeded();
        assert_eq!(retry.attempt(7, now), UnderlayAttempt::First);
    }
}
