//! `overlay-agent run`: load, attach, then follow the nodes directory.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use overlay_agent::{
    apply::Applier,
    datapath::{Datapath, DecapHook},
    desired::{Backend, LocalSettings, UnderlayPath, desired},
    iface,
    manifests::ManifestDir,
    maps::DatapathMaps,
    routes,
};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::{Decap, RunArgs};

/// How often the nodes directory is looked at; changes land within this.
const POLL: Duration = Duration::from_millis(200);
/// How often the datapath counters are checked for problems to report.
const HEALTH_CHECK: Duration = Duration::from_secs(5);

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(run_async(args))
}

async fn run_async(args: RunArgs) -> anyhow::Result<()> {
    let RunArgs { node_name, nodes_dir, iface, public_ip, backend, direct_routing, vni, port, bpffs_root, decap } = args;
    let backend = match backend {
        crate::Backend::Vxlan => Backend::Vxlan,
        crate::Backend::HostGw => Backend::HostGw,
    };
    let node_name = match node_name {
        Some(name) => name,
        None => hostname().context("--node-name not given, $NODE_NAME unset, and the hostname is unreadable")?,
    };
    let iface = match iface {
        Some(iface) => iface,
        None => iface::default_route_interface()
            .context("--iface not given and there is no IPv4 default route to take it from")?,
    };
    let Some(ifindex) = iface::interface_index(&iface) else {
        bail!("--iface {iface}: no such interface in this network namespace");
    };
    let underlay_mtu = iface::mtu(&iface).with_context(|| format!("reading the MTU of {iface}"))?;
    if !nodes_dir.is_dir() {
        bail!("--nodes-dir {}: not a directory", nodes_dir.display());
    }
    let settings = LocalSettings {
        node_name,
        backend,
        direct_routing,
        vni,
        vxlan_port: port,
        underlay_ifindex: ifindex,
        underlay_mtu,
        public_ip,
    };

    let mut datapath = Datapath::load(&bpffs_root).context("loading the datapath")?;
    // Measured (docs/datapath.md): with VXLAN, native XDP decapsulates
    // fastest; with host-gw, where no tunnel traffic arrives, the lighter
    // TC hook costs plain forwarding less. TC where XDP cannot attach.
    let hook: DecapHook = match (decap, backend) {
        (Decap::Auto, Backend::HostGw) => DecapHook::TcIngress,
        (decap, _) => decap.into(),
    };
    let (_attachment, hook) = match datapath.attach(&iface, hook) {
        Ok(attachment) => (attachment, hook),
        Err(err) if decap == Decap::Auto && matches!(hook, DecapHook::Xdp(_)) => {
            warn!(%iface, error = %format!("{err:#}"), "XDP cannot attach here; decapsulating at TC ingress");
            let attachment = datapath
                .attach(&iface, DecapHook::TcIngress)
                .with_context(|| format!("attaching to {iface}"))?;
            (attachment, DecapHook::TcIngress)
        }
        Err(err) => return Err(err).with_context(|| format!("attaching to {iface}")),
    };
    let maps = DatapathMaps::open(&bpffs_root)?;
    let mut applier = Applier::new(maps, &iface).context("adopting the pinned state")?;
    info!(node = %settings.node_name, backend = backend.flannel_name(), direct_routing, %iface, ifindex, underlay_mtu, vni, port, root = %bpffs_root.display(), ?hook, "datapath attached");

    let mut source = ManifestDir::new(&nodes_dir);
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut observed = Observed::default();
    let mut ticker = tokio::time::interval(POLL);
    let mut health = tokio::time::interval(HEALTH_CHECK);
    let mut mismatched_seen = applier.maps().counters_total().map(|c| c.mismatched_port).unwrap_or(0);
    loop {
        tokio::select! {
            _ = ticker.tick() => reconcile(&mut source, &settings, &mut applier, &mut observed),
            _ = health.tick() => warn_on_port_mismatch(&applier, port, &mut mismatched_seen),
            _ = sigterm.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    // Routes and pinned maps stay: traffic to known peers keeps its routes.
    info!("stopping");
    Ok(())
}

/// What the agent last read: the nodes and the kernel's paths to them.
#[derive(Default)]
struct Observed {
    nodes: Vec<overlay_agent::node::NodeInfo>,
    paths: BTreeMap<Ipv4Addr, UnderlayPath>,
    /// Whether `nodes` or `paths` changed since the last apply.
    dirty: bool,
    /// Polls since the last path check.
    polls: u32,
}

/// Paths are re-checked every this many polls (1 s): an underlay address or
/// route change flips a peer between direct and VXLAN within that.
const PATH_CHECK_EVERY: u32 = 5;

fn reconcile(source: &mut ManifestDir, settings: &LocalSettings, applier: &mut Applier, seen: &mut Observed) {
    let started = Instant::now();
    match source.scan_if_changed() {
        Ok(Some(scan)) => {
            for err in &scan.errors {
                warn!(error = %err, "skipping manifest");
            }
            seen.nodes = scan.nodes;
            seen.dirty = true;
            seen.polls = PATH_CHECK_EVERY; // new peers need their paths now
        }
        Ok(None) => {}
        Err(err) => {
            error!(error = %err, "reading the nodes directory; keeping the current state");
            return;
        }
    }
    seen.polls += 1;
    if seen.polls >= PATH_CHECK_EVERY {
        seen.polls = 0;
        let addrs: Vec<Ipv4Addr> = seen.nodes.iter().map(|n| n.node_ip).collect();
        match routes::paths(applier.iface(), &addrs) {
            Ok(paths) if paths != seen.paths => {
                for (addr, path) in &paths {
                    if seen.paths.get(addr).is_some_and(|old| old != path) {
                        info!(peer = %addr, ?path, "underlay path changed; re-evaluating its mode");
                    }
                }
                seen.paths = paths;
                seen.dirty = true;
            }
            Ok(_) => {}
            Err(err) => warn!(error = %err, "asking the kernel for paths to the nodes"),
        }
    }
    if !seen.dirty {
        return;
    }
    seen.dirty = false;
    let (desired, rejected) = match desired(settings, &seen.nodes, &seen.paths) {
        Ok(result) => result,
        Err(not_ready) => {
            warn!(reason = %not_ready, "datapath not configured yet");
            return;
        }
    };
    for r in &rejected {
        warn!(node = %r.node, reason = %r.reason, "peer not served as asked");
    }
    if let Some(me) = seen.nodes.iter().find(|n| n.name == settings.node_name) {
        let expected = overlay_agent::node::flannel_annotations(&desired.config);
        let advertised = me.vtep_mac == Some(desired.config.vtep_mac) && me.vni == Some(desired.config.vni);
        if settings.backend == Backend::Vxlan && !advertised {
            // flannel peers can only reach us through what our Node says.
            warn!(node = %me.name, "our Node does not advertise our VTEP; flannel nodes cannot send to us until it carries: {expected}");
        }
    }
    match applier.apply(&desired) {
        Ok(applied) => {
            for failure in &applied.failed {
                error!(error = %failure, "peer not programmed");
            }
            let direct = desired.peers.values().filter(|p| p.mode == overlay_common::ROUTE_MODE_DIRECT).count();
            info!(
                nodes = seen.nodes.len(),
                peers = desired.peers.len(),
                direct,
                upserted = applied.added_or_updated,
                removed = applied.removed,
                config_changed = applied.config_changed,
                elapsed_us = started.elapsed().as_micros() as u64,
                "reconciled"
            );
        }
        Err(err) => error!(error = %format!("{err:#}"), "applying the desired state"),
    }
}

/// Known nodes tunnelling to the other well-known VXLAN port would
/// otherwise be a silent loss: say which setting to change.
fn warn_on_port_mismatch(applier: &Applier, port: u16, seen: &mut u64) {
    let Ok(counters) = applier.maps().counters_total() else {
        return;
    };
    if counters.mismatched_port > *seen {
        let other = if port == overlay_common::IANA_VXLAN_PORT {
            overlay_common::DEFAULT_VXLAN_PORT
        } else {
            overlay_common::IANA_VXLAN_PORT
        };
        warn!(
            packets = counters.mismatched_port - *seen,
            our_port = port,
            their_port = other,
            "known nodes send VXLAN to port {other} but this node uses --port {port}; their traffic is not decapsulated. Use one port cluster-wide (flannel: Backend.Port)"
        );
    }
    *seen = counters.mismatched_port;
}

fn hostname() -> anyhow::Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")?;
    Ok(name.trim().to_owned())
}
