//! The agent's event loop: node events → desired state → maps and routes →
//! publication, with everything it talks to behind a trait, so the loop is
//! tested against fakes (`tests.rs`), as kube-rs's controller-rs tests its
//! reconciler.
//!
//! | seam | trait | the real one |
//! |---|---|---|
//! | where nodes come from | [`NodeSource`] | [`sources::ManifestSource`], [`sources::KubeSource`], [`sources::EtcdNodes`] |
//! | the datapath's maps and kernel routes | [`PeerWriter`] | [`crate::apply::Applier`] |
//! | the kernel's paths to the nodes, and its notifications | [`Underlay`] | [`kernel::KernelUnderlay`] ([`crate::kernel_events`]) |
//! | what our own node advertises | [`Publisher`] | [`sources::KubePublisher`], [`sources::LogPublisher`], [`sources::LeasePublisher`] |
//! | the rest of the host (subnet.env, netfilter, pod fast path, device pairs) | [`Host`] | the binary's `run.rs` |
//!
//! Where each event is handled: node events in [`Reconciler::handle_source`],
//! kernel events (rtnetlink notifications: the underlay's paths, the pod
//! bridge and its ports, the agent's device pairs) in
//! [`Reconciler::handle_kernel_events`], the
//! periodic safety net in [`Reconciler::housekeeping`]; all end in
//! [`Reconciler::reconcile`].

pub mod kernel;
pub mod sources;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    future::Future,
    net::Ipv4Addr,
    sync::Arc,
    time::{Duration, Instant},
};

use ipnetwork::Ipv4Network;
use overlay_common::{ROUTE_MODE_DIRECT, ROUTE_MODE_UNREACHABLE, ROUTE_MODE_VXLAN};
use tracing::{error, info, warn};

use crate::{
    apply::{Applied, ApplyError, FailureKind, PeerFailure},
    desired::{Desired, DesiredState, LocalSettings, NotReady, Paths, RejectKind, Rejected, Touched},
    metrics::Metrics,
    node::NodeInfo,
    routes::RouteError,
};
pub use crate::kernel_events::KernelEvent;

/// How often the datapath counters are checked and what failed (API
/// writes, peers the kernel refused) is retried.
pub const HOUSEKEEPING: Duration = Duration::from_secs(5);
/// How often an unchanged outage of the node source is logged again.
const OUTAGE_REPEAT: Duration = Duration::from_secs(60);
/// How long one reconcile's publication (our Node's patch, then the events
/// about peers) may take before the loop gives up on what is left of it
/// until the next reconcile. The loop handles nothing else meanwhile (no
/// kernel event, node update or stop), and a write over an API connection
/// that went black would otherwise hold it until the kernel gives up on the
/// connection (~15 min). A healthy API server answers a single-object write
/// within 1 s (the Kubernetes SLO for mutating calls, 99th percentile), so
/// 10 s means one that is not answering, not one that is slow.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long publication pauses after a call went unanswered, doubling with
/// each further one up to [`PUBLISH_BACKOFF_MAX`]: retried with every
/// housekeeping reconcile, an API server that does not answer would hold
/// the loop for [`PUBLISH_TIMEOUT`] in every 15 s; with the pause, 10 s in
/// every 40 s at first and in every 310 s at most.
pub const PUBLISH_BACKOFF_MIN: Duration = Duration::from_secs(30);
pub const PUBLISH_BACKOFF_MAX: Duration = Duration::from_secs(300);

/// One change a node source reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeEvent {
    /// Every node, replacing what was known: a (re)list, a rescan. Nodes
    /// missing from it are gone (deleted while the source was not
    /// watching), but for those `invalid` names, which keep what was
    /// last read of them.
    Resync { nodes: Vec<Arc<NodeInfo>>, invalid: Vec<InvalidNode> },
    /// A node added or changed.
    Upsert(Arc<NodeInfo>),
    /// A node whose object can no longer be read (a typo in an annotation,
    /// a lease value a tool mangled): it keeps what was last read of it,
    /// as flannel ignores an update it cannot parse, so a typo does not
    /// cut a running peer off; one never read stays out until it can be.
    Invalid(InvalidNode),
    /// A node deleted, by name.
    Delete(String),
}

/// A node (or manifest) that could not be read as a node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct InvalidNode {
    /// The node's name, or what else identifies it (a file, the problem).
    pub key: String,
    pub problem: String,
}

/// What a node source has next.
#[derive(Debug)]
pub enum SourceUpdate {
    /// Changes, in order; possibly none (the source is readable again).
    Events(Vec<NodeEvent>),
    /// The source cannot be read (API server down, directory gone): the
    /// datapath keeps what it has. A watch-based source resumes by itself
    /// (from its last resource version or revision, or with a relist that
    /// it reports as [`NodeEvent::Resync`]).
    Outage {
        /// What could not be read, for the log: "the nodes directory".
        source: &'static str,
        problem: String,
    },
}

/// The node source stopped for good.
#[derive(Debug, thiserror::Error)]
#[error("the node source ended: {0}")]
pub struct SourceEnded(pub String);

/// Where nodes come from: a directory of manifests, the Kubernetes API,
/// etcd. The first update that counts is a [`NodeEvent::Resync`]: nothing
/// is programmed before the whole set is known.
pub trait NodeSource {
    /// Waits for the next update. A source batches what is already waiting
    /// (a relist of thousands of nodes arrives as one `Resync`).
    fn next(&mut self) -> impl Future<Output = Result<SourceUpdate, SourceEnded>>;
}

/// The datapath's peer entries and kernel routes.
pub trait PeerWriter {
    /// Brings everything to `desired` (a full diff).
    fn apply(&mut self, desired: &Desired) -> Result<Applied, ApplyError>;
    /// Brings only the peers under `touched` to `desired`: what one node's
    /// event changes, without walking the cluster.
    fn apply_touched(&mut self, desired: &Desired, touched: &[Ipv4Network]) -> Result<Applied, ApplyError>;
    /// Whether a route of an applied peer is gone from the kernel (deleted
    /// without a notification, see [`crate::apply::Applier::routes_missing`]);
    /// if so, the next apply writes every route again. This is also how
    /// routes come back after our own address went and returned: the
    /// kernel deleted those whose preferred source it was. A look that
    /// fails counts as no; the next underlay change, or the 30 s resync,
    /// looks again.
    fn routes_missing(&mut self) -> bool {
        false
    }
}

/// The kernel's view of the underlay.
pub trait Underlay {
    /// The kernel's path to each of `addrs`.
    fn paths(&mut self, addrs: &[Ipv4Addr]) -> Result<Paths, RouteError>;
    /// Resolves with what may have changed in the kernel, batched: the
    /// underlay's addresses, rules or routes (the loop then re-asks the
    /// paths to every node), the pod bridge or its ports (the host attaches
    /// the fast path again). This is where kernel events come in; the real
    /// one also sends every kind now and then, as a safety net under lost
    /// notifications.
    fn changed(&mut self) -> impl Future<Output = BTreeSet<KernelEvent>>;
    /// The underlay interface's IPv4 addresses.
    fn own_addresses(&mut self) -> Result<Vec<Ipv4Addr>, String>;
    /// This host's IPv4 addresses, on every interface.
    fn host_addresses(&mut self) -> Result<Vec<Ipv4Addr>, String>;
    /// The underlay interface's name, for messages.
    fn iface(&self) -> &str;
}

/// Whether this node's pod network serves, as our Node is to say
/// (`NetworkUnavailable`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkState {
    /// The maps hold the desired state and the programs are attached.
    Up,
    /// The programs are not attached (any more): why.
    Down(String),
}

/// What our own node advertises, and warnings about peers.
pub trait Publisher {
    /// Makes our node advertise `desired` (flannel's annotations) and
    /// `network` (available or not). Failures are logged by the publisher
    /// and retried with the next reconcile. The loop drops a call still
    /// unanswered after [`PUBLISH_TIMEOUT`] and retries it likewise, so it
    /// must be cancel-safe: remember a write only once it is answered.
    fn publish(&mut self, me: &NodeInfo, desired: &Desired, settings: &LocalSettings, network: &NetworkState) -> impl Future<Output = ()>;
    /// Records a warning about a peer an operator must fix (a Kubernetes
    /// event). `Ok` means recorded: it is not asked again. Bounded by
    /// [`PUBLISH_TIMEOUT`] as [`Publisher::publish`] is.
    fn warn_peer(&mut self, rejected: &Rejected, reason: &'static str) -> impl Future<Output = Result<(), String>>;
}

/// The rest of the host, outside the loop's concern but driven by it.
pub trait Host {
    /// Every [`HOUSEKEEPING`]: the host's periodic checks.
    fn housekeeping(&mut self);
    /// The pod bridge or its ports may have changed: attach the pod fast
    /// path (again). May change the settings (the bridge's index and MAC).
    fn pod_network_changed(&mut self, local: &mut LocalSettings);
    /// The underlay changed (an address, a route, the link itself): when
    /// it was recreated (a new index under its name: a driver reloaded, a
    /// bond made again), attach to it again. May change the settings (its
    /// index and MTU, the hook's and the pairs' settings).
    fn underlay_changed(&mut self, local: &mut LocalSettings);
    /// A device of the agent's device pairs was deleted or changed (or may
    /// have been: every resync asks too): set up again any that the
    /// datapath uses and that is gone or down or could not be set up
    /// before, and set again the features of one whose features changed.
    /// May change the settings (the pairs' indexes).
    fn device_pair_changed(&mut self, local: &mut LocalSettings);
    /// A kernel vxlan device was made or changed (or may have been: every
    /// resync asks too): one on our UDP port is deleted where the agent
    /// may (flannel's, `--remove-flannel-device`), reported otherwise.
    fn vxlan_device_appeared(&mut self);
    /// After each applied reconcile: subnet.env, masquerade and FORWARD
    /// rules, flannel's device. `false` when the node is not ready to serve
    /// pods yet (subnet.env could not be written): the reconcile is retried.
    fn after_apply(&mut self, desired: &Desired) -> bool;
    /// Why the datapath does not serve this node (its programs are not
    /// attached to the underlay, or no longer), or `None` when it does.
    /// Asked before each publication: our Node says the network is up
    /// only while it is.
    fn datapath_problem(&mut self) -> Option<String>;
    /// Resolves when work the host runs off the loop's thread (the
    /// netfilter check) has finished, once its outcome is handled (logged);
    /// never, by default. The loop waits for it beside its events, so such
    /// work holds no event back. Must be cancel-safe: the loop drops it
    /// when another event comes first.
    fn finished_work(&mut self) -> impl Future<Output = ()> {
        std::future::pending()
    }
}

/// Problems the loop logs once each, until they go away. Typed, so each
/// kind is cleared without looking at message texts.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reported {
    /// A node that cannot be read; held in the loop's map of invalid nodes
    /// (by key), listed here for the record of first reports.
    InvalidNode { key: String, problem: String },
    NotReady(String),
    OwnAddress(String),
    Rejected { node: String, kind: RejectKind, reason: String },
    /// A peer the datapath could not take (a full map, a refused route).
    NotProgrammed { pod_cidr: Ipv4Network, problem: String },
    SourceOutage { source: &'static str, problem: String },
    DatapathDown(String),
}

/// The loop's state between events.
pub struct Reconciler<S, W, U, P, H> {
    pub source: S,
    pub writer: W,
    pub underlay: U,
    pub publisher: P,
    pub host: H,
    metrics: Arc<Metrics>,
    state: DesiredState,
    /// The kernel's paths to the nodes' addresses, as last asked.
    paths: Paths,
    /// Nodes that could not be read, by key: each logged once per problem.
    invalid: BTreeMap<String, String>,
    reported: BTreeSet<Reported>,
    /// Rejections already recorded as events (node, reason).
    evented: BTreeSet<(String, String)>,
    /// After a publication the API server did not answer: when the next
    /// may start, and the pause that led there ([`PUBLISH_BACKOFF_MIN`]).
    publish_paused_until: Option<tokio::time::Instant>,
    publish_backoff: Duration,
    /// Whether the source delivered the whole set of nodes yet.
    synced: bool,
    /// What changed since the last applied reconcile.
    pending: Touched,
    outage_logged_at: Option<Instant>,
    /// Every first report, in order, for the tests.
    #[cfg(test)]
    first_reports: Vec<Reported>,
}

impl<S: NodeSource, W: PeerWriter, U: Underlay, P: Publisher, H: Host> Reconciler<S, W, U, P, H> {
    pub fn new(local: LocalSettings, source: S, writer: W, underlay: U, publisher: P, host: H, metrics: Arc<Metrics>) -> Self {
        Self {
            source,
            writer,
            underlay,
            publisher,
            host,
            metrics,
            state: DesiredState::new(local),
            paths: Paths::new(),
            invalid: BTreeMap::new(),
            reported: BTreeSet::new(),
            evented: BTreeSet::new(),
            publish_paused_until: None,
            publish_backoff: Duration::ZERO,
            synced: false,
            pending: Touched::Nothing,
            outage_logged_at: None,
            #[cfg(test)]
            first_reports: Vec::new(),
        }
    }

    pub fn state(&self) -> &DesiredState {
        &self.state
    }

    /// Runs until `stop` resolves (SIGTERM, Ctrl-C) or the source ends.
    /// Stopping leaves everything in place.
    pub async fn run(&mut self, stop: impl Future<Output = ()>) -> Result<(), SourceEnded> {
        let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
        let mut stop = std::pin::pin!(stop);
        loop {
            // Set when a branch wakes up, so durations leave out idle waiting.
            let started;
            tokio::select! {
                update = self.source.next() => {
                    started = Instant::now();
                    self.handle_source(update?);
                }
                events = self.underlay.changed() => {
                    started = Instant::now();
                    self.handle_kernel_events(&events);
                }
                _ = housekeeping.tick() => {
                    started = Instant::now();
                    self.housekeeping();
                }
                () = self.host.finished_work() => {
                    started = Instant::now();
                }
                () = &mut stop => return Ok(()),
            }
            self.reconcile(started).await;
        }
    }

    /// Takes what the node source reported.
    pub fn handle_source(&mut self, update: SourceUpdate) {
        let events = match update {
            SourceUpdate::Outage { source, problem } => {
                let key = Reported::SourceOutage { source, problem: problem.clone() };
                // Once per distinct problem, and again each minute.
                let repeat = self.outage_logged_at.is_some_and(|at| at.elapsed() >= OUTAGE_REPEAT);
                if self.report(key) || repeat {
                    error!(error = %problem, "reading {source}; keeping the current state (the datapath keeps forwarding)");
                    self.outage_logged_at = Some(Instant::now());
                }
                return;
            }
            SourceUpdate::Events(events) => events,
        };
        if let Some(Reported::SourceOutage { source, .. }) = self.reported.iter().find(|r| matches!(r, Reported::SourceOutage { .. })) {
            info!("{source} readable again");
            self.reported.retain(|r| !matches!(r, Reported::SourceOutage { .. }));
            self.outage_logged_at = None;
        }
        for event in events {
            let touched = match event {
                NodeEvent::Resync { mut nodes, invalid } => {
                    self.synced = true;
                    for unreadable in &invalid {
                        if let Some(last) = self.state.nodes().get(&unreadable.key).filter(|_| !nodes.iter().any(|n| n.name == unreadable.key)) {
                            nodes.push(last.clone());
                        }
                    }
                    self.ask_new_paths(nodes.iter().map(|n| n.node_ip));
                    let invalid = invalid.into_iter().map(|i| (i.key, i.problem)).collect();
                    self.set_invalid(invalid);
                    self.state.replace_all(nodes, &self.paths)
                }
                NodeEvent::Upsert(node) => {
                    self.ask_new_paths([node.node_ip]);
                    self.clear_invalid(&node.name);
                    self.state.upsert(node, &self.paths)
                }
                NodeEvent::Invalid(invalid) => {
                    let mut all = self.invalid.clone();
                    all.insert(invalid.key.clone(), invalid.problem);
                    self.set_invalid(all);
                    Touched::Nothing
                }
                NodeEvent::Delete(name) => {
                    self.clear_invalid(&name);
                    self.state.remove(&name, &self.paths)
                }
            };
            self.pending = merge(std::mem::replace(&mut self.pending, Touched::Nothing), touched);
        }
    }

    /// Takes what the kernel said may have changed.
    pub fn handle_kernel_events(&mut self, events: &BTreeSet<KernelEvent>) {
        if events.contains(&KernelEvent::UnderlayChanged) {
            self.ask_host_about_the_underlay();
            self.handle_underlay_change();
        }
        // An address that went and came back between two looks left no
        // trace but the routes the kernel deleted with it; another tool
        // deleting ours (or a nexthop of ours, which takes its routes
        // along unannounced) leaves its notification.
        if (events.contains(&KernelEvent::UnderlayChanged) || events.contains(&KernelEvent::OwnRouteDeleted))
            && self.writer.routes_missing()
        {
            // While our own address is missing nothing is applied (the
            // loop said why once): no line per resync meanwhile.
            if !self.reported.iter().any(|r| matches!(r, Reported::OwnAddress(_))) {
                info!("routes of ours are gone from the kernel (deleted by another tool, or by the kernel with their source address or nexthop); writing them again");
            }
            self.pending = Touched::All;
        }
        let bridge_changed = events.contains(&KernelEvent::PodBridgeChanged);
        if bridge_changed || events.contains(&KernelEvent::PodPortsChanged) {
            let mut local = self.state.local().clone();
            self.host.pod_network_changed(&mut local);
            let touched = self.state.set_local(local, &self.paths);
            self.pending = merge(std::mem::replace(&mut self.pending, Touched::Nothing), touched);
        }
        if bridge_changed {
            // A new bridge's index and MAC reach CONFIG by a full reconcile.
            self.pending = Touched::All;
        }
        if events.contains(&KernelEvent::VxlanDeviceAppeared) {
            self.host.vxlan_device_appeared();
        }
        if events.contains(&KernelEvent::DevicePairChanged) {
            let mut local = self.state.local().clone();
            self.host.device_pair_changed(&mut local);
            // A new index reaches CONFIG by the reconcile that follows.
            let touched = self.state.set_local(local, &self.paths);
            self.pending = merge(std::mem::replace(&mut self.pending, Touched::Nothing), touched);
        }
    }

    /// Lets the host attach to a recreated underlay and follow its MTU;
    /// what it changes in the settings reaches CONFIG by the reconcile that
    /// follows.
    fn ask_host_about_the_underlay(&mut self) {
        let mut local = self.state.local().clone();
        self.host.underlay_changed(&mut local);
        let touched = self.state.set_local(local, &self.paths);
        self.pending = merge(std::mem::replace(&mut self.pending, Touched::Nothing), touched);
    }

    /// The underlay may have changed: re-asks the paths to every node.
    pub fn handle_underlay_change(&mut self) {
        let addrs: Vec<Ipv4Addr> = self.state.nodes().values().map(|n| n.node_ip).collect();
        match self.underlay.paths(&addrs) {
            Ok(paths) => {
                // Entries of nodes gone do not count: only what is read.
                let changed = paths.iter().any(|(addr, path)| self.paths.get(addr) != Some(path));
                for (addr, path) in &paths {
                    if self.paths.get(addr).is_some_and(|old| old != path) {
                        info!(peer = %addr, ?path, "underlay path changed; re-evaluating its mode");
                    }
                }
                self.paths = paths;
                if changed {
                    let touched = self.state.recompute(&self.paths);
                    self.pending = merge(std::mem::replace(&mut self.pending, Touched::Nothing), touched);
                }
            }
            Err(err) => warn!(error = %crate::report::Chain(&err), "asking the kernel for paths to the nodes"),
        }
    }

    /// The periodic safety net: the host's chores, and a full diff that
    /// retries what failed before.
    pub fn housekeeping(&mut self) {
        self.host.housekeeping();
        // A recreated underlay whose attaching failed is tried again.
        self.ask_host_about_the_underlay();
        // Paths of addresses no node has any more.
        if self.paths.len() > self.state.nodes().len() {
            let current: HashSet<Ipv4Addr> = self.state.nodes().values().map(|n| n.node_ip).collect();
            self.paths.retain(|addr, _| current.contains(addr));
        }
        self.pending = Touched::All;
    }

    /// Asks the kernel for its paths to addresses not asked about yet: a
    /// single node's update costs no full re-check.
    fn ask_new_paths(&mut self, addrs: impl IntoIterator<Item = Ipv4Addr>) {
        let mut new: Vec<Ipv4Addr> = addrs.into_iter().filter(|a| !self.paths.contains_key(a)).collect();
        if new.is_empty() {
            return;
        }
        new.sort_unstable();
        new.dedup();
        match self.underlay.paths(&new) {
            Ok(paths) => self.paths.extend(paths),
            Err(err) => warn!(error = %crate::report::Chain(&err), "asking the kernel for paths to new nodes"),
        }
    }

    fn set_invalid(&mut self, invalid: BTreeMap<String, String>) {
        for (key, problem) in &invalid {
            if self.invalid.get(key) != Some(problem) {
                let kept = if self.state.nodes().contains_key(key) { "kept as last read" } else { "left out until it can be read" };
                warn!(problem = %problem, "bad Node manifest or object; {kept}");
                #[cfg(test)]
                self.first_reports.push(Reported::InvalidNode { key: key.clone(), problem: problem.clone() });
            }
        }
        self.metrics.nodes_invalid.set(invalid.len() as i64);
        self.invalid = invalid;
    }

    fn clear_invalid(&mut self, key: &str) {
        if self.invalid.remove(key).is_some() {
            self.metrics.nodes_invalid.set(self.invalid.len() as i64);
        }
    }

    /// Records a problem; `true` the first time (log it then).
    fn report(&mut self, problem: Reported) -> bool {
        let first = self.reported.insert(problem.clone());
        #[cfg(test)]
        if first {
            self.first_reports.push(problem);
        }
        first
    }

    /// desired → apply → host → publish, when anything is pending and the
    /// source has delivered the whole set of nodes. Returns whether the
    /// state was applied.
    pub async fn reconcile(&mut self, started: Instant) -> bool {
        if !self.synced || self.pending == Touched::Nothing {
            return false;
        }
        self.settle_iface_address();
        // The event, the paths of new nodes, and the desired state's update.
        let source_time = started.elapsed();
        let our_address = match self.state.result() {
            Ok(desired) => Ipv4Addr::from(desired.config.node_ip),
            Err(not_ready) => {
                let unusable = match not_ready {
                    NotReady::NoLocalNode(name) => self.invalid.get(name).map(|problem| (name, problem)),
                    _ => None,
                };
                let not_ready = match unusable {
                    Some((name, problem)) => NotReady::LocalNodeUnusable { name: name.clone(), problem: problem.clone() },
                    None => not_ready.clone(),
                };
                if self.report(Reported::NotReady(not_ready.to_string())) {
                    match not_ready {
                        NotReady::NoLocalNode(_) | NotReady::LocalNodeUnusable { .. } => {
                            warn!(reason = %not_ready, "datapath not configured yet")
                        }
                        NotReady::LocalPodCidrOutsideNetwork(_) => error!(reason = %not_ready, "refusing to configure the datapath"),
                    }
                }
                return false;
            }
        };
        self.reported.retain(|r| !matches!(r, Reported::NotReady(_)));
        if let Err(problem) = self.check_own_address(our_address) {
            if self.report(Reported::OwnAddress(problem.clone())) {
                error!(node = %self.state.local().node_name, "{problem}");
            }
            return false;
        }
        self.reported.retain(|r| !matches!(r, Reported::OwnAddress(_)));
        let rejected: Vec<Rejected> = self.state.rejected().cloned().collect();
        let current: BTreeSet<Reported> = rejected
            .iter()
            .map(|r| Reported::Rejected { node: r.node.clone(), kind: r.kind, reason: r.reason.clone() })
            .collect();
        for r in &rejected {
            if self.report(Reported::Rejected { node: r.node.clone(), kind: r.kind, reason: r.reason.clone() }) {
                if r.kind == RejectKind::NotSubnetManaged {
                    // Normal while a node's agent starts up.
                    info!(node = %r.node, reason = %r.reason, "peer not programmed yet");
                } else {
                    warn!(node = %r.node, reason = %r.reason, "peer not served as asked");
                }
            }
        }
        self.reported.retain(|r| !matches!(r, Reported::Rejected { .. }) || current.contains(r));
        self.metrics.nodes_rejected.set(rejected.len() as i64);
        let checks_time = started.elapsed() - source_time;

        // Asked before the borrow of the desired state below; the maps'
        // writes do not change it.
        let network = match self.host.datapath_problem() {
            None => {
                if self.reported.iter().any(|r| matches!(r, Reported::DatapathDown(_))) {
                    info!("the datapath serves this node again");
                }
                self.reported.retain(|r| !matches!(r, Reported::DatapathDown(_)));
                NetworkState::Up
            }
            Some(problem) => {
                self.reported.retain(|r| !matches!(r, Reported::DatapathDown(p) if *p != problem));
                if self.report(Reported::DatapathDown(problem.clone())) {
                    error!(error = %problem, "the datapath does not serve this node; not published as available until it does");
                }
                NetworkState::Down(problem)
            }
        };
        let Ok(full) = self.state.result() else { unreachable!("checked above") };
        let result = match std::mem::replace(&mut self.pending, Touched::Nothing) {
            Touched::Peers(cidrs) => self.writer.apply_touched(full, &cidrs),
            Touched::All | Touched::Nothing => self.writer.apply(full),
        };
        let applied = match result {
            Ok(applied) => applied,
            Err(err) => {
                error!(error = %crate::report::Chain(&err), "applying the desired state; will retry");
                self.pending = Touched::All;
                return false;
            }
        };
        self.report_not_programmed(&applied.not_programmed);
        let Ok(full) = self.state.result() else { unreachable!("checked above") };
        if applied.added_or_updated + applied.removed > 0 || applied.config_changed {
            for (mode, name) in [(ROUTE_MODE_VXLAN, "vxlan"), (ROUTE_MODE_DIRECT, "direct"), (ROUTE_MODE_UNREACHABLE, "unreachable")] {
                let count = full.peers.values().filter(|p| p.mode == mode).count();
                self.metrics.peers.get_or_create(&[("mode", name)]).set(count as i64);
            }
            let elapsed = started.elapsed();
            self.metrics.reconcile_seconds.observe(elapsed.as_secs_f64());
            info!(
                nodes = self.state.nodes().len(),
                peers = full.peers.len(),
                upserted = applied.added_or_updated,
                removed = applied.removed,
                config_changed = applied.config_changed,
                elapsed_us = elapsed.as_micros() as u64,
                source_us = source_time.as_micros() as u64,
                checks_us = checks_time.as_micros() as u64,
                maps_us = applied.maps_time.as_micros() as u64,
                routes_us = applied.routes_time.as_micros() as u64,
                "reconciled"
            );
        }
        if !self.host.after_apply(full) {
            self.pending = Touched::All;
            return false;
        }
        if !self.metrics.ready() {
            self.metrics.set_ready();
            info!(peers = full.peers.len(), elapsed_ms = started.elapsed().as_millis() as u64, "ready: the initial sync is in the datapath");
        }
        // One bound for all of the publication: the loop waits for nothing
        // else meanwhile. What is not answered in time is not remembered
        // as done (the publisher's memo of its last write, `evented`), so
        // the next reconcile (the housekeeping's, at the latest) retries it.
        let now = tokio::time::Instant::now();
        if self.publish_paused_until.is_some_and(|until| now < until) {
            return true;
        }
        let deadline = now + PUBLISH_TIMEOUT;
        let mut answering = true;
        if let Some(me) = self.state.me() {
            let publish = self.publisher.publish(me, full, self.state.local(), &network);
            if tokio::time::timeout_at(deadline, publish).await.is_err() {
                let pause = self.pause_publication(now);
                warn!(
                    "publishing our Node's annotations and NetworkUnavailable condition: no answer from the API server within {}s; will retry in {}s",
                    PUBLISH_TIMEOUT.as_secs(),
                    pause.as_secs()
                );
                answering = false;
            }
        }
        for r in &rejected {
            let Some(reason) = r.kind.event_reason() else { continue };
            let key = (r.node.clone(), r.reason.clone());
            if self.evented.contains(&key) {
                continue;
            }
            // An API server that did not answer the last call would make
            // each further one wait out the deadline too: the events left
            // are retried with the next reconcile.
            if !answering {
                break;
            }
            match tokio::time::timeout_at(deadline, self.publisher.warn_peer(r, reason)).await {
                Ok(Ok(())) => {
                    self.evented.insert(key);
                }
                Ok(Err(err)) => warn!(error = %err, node = %r.node, "recording an event; will retry"),
                Err(_) => {
                    let pause = self.pause_publication(now);
                    warn!(
                        node = %r.node,
                        "recording an event: no answer from the API server within {}s; will retry in {}s, with the events not recorded yet",
                        PUBLISH_TIMEOUT.as_secs(),
                        pause.as_secs()
                    );
                    answering = false;
                }
            }
        }
        if answering {
            self.publish_backoff = Duration::ZERO;
            self.publish_paused_until = None;
        }
        true
    }

    /// Pauses publication after a call that went unanswered (from `now`,
    /// when the publication began); the pause.
    fn pause_publication(&mut self, now: tokio::time::Instant) -> Duration {
        self.publish_backoff = (self.publish_backoff * 2).clamp(PUBLISH_BACKOFF_MIN, PUBLISH_BACKOFF_MAX);
        self.publish_paused_until = Some(now + PUBLISH_TIMEOUT + self.publish_backoff);
        self.publish_backoff
    }

    /// Logs each peer the datapath does not hold once per problem, with
    /// its node's name, and counts them by reason.
    fn report_not_programmed(&mut self, failures: &[PeerFailure]) {
        let key = |f: &PeerFailure| Reported::NotProgrammed { pod_cidr: f.peer.pod_cidr, problem: f.message.clone() };
        let current: BTreeSet<Reported> = failures.iter().map(key).collect();
        self.reported.retain(|r| !matches!(r, Reported::NotProgrammed { .. }) || current.contains(r));
        let first: Vec<&PeerFailure> = failures.iter().filter(|f| self.report(key(f))).collect();
        if !first.is_empty() {
            // Failures are rare: one walk over the nodes to name them.
            let names: HashMap<Ipv4Network, &str> =
                self.state.nodes().values().map(|n| (n.pod_cidr, n.name.as_str())).collect();
            for failure in first {
                let node = names.get(&failure.peer.pod_cidr).copied().unwrap_or("?");
                error!(node, error = %failure.message, "peer not programmed; retried every {}s", HOUSEKEEPING.as_secs());
            }
        }
        for kind in FailureKind::ALL {
            let count = failures.iter().filter(|f| f.kind == kind).count();
            self.metrics.peers_not_programmed.get_or_create(&[("reason", kind.label())]).set(count as i64);
        }
    }

    /// Where our Node's InternalIP is not on the underlay interface but is
    /// another of this host's addresses, we advertise the interface's
    /// first address, as flanneld advertises its `--iface` address (a
    /// cluster migrating from flannel with `--iface` on a data network
    /// knows us by it); `LocalSettings::iface_address`. An InternalIP that
    /// is no address of this host (another node's Node: a wrong
    /// `--node-name`) changes nothing, and `check_own_address` refuses it.
    fn settle_iface_address(&mut self) {
        let local = self.state.local();
        let internal_ip = match self.state.me() {
            Some(me) if local.public_ip.is_none() && me.public_ip_overwrite.is_none() => me.internal_ip,
            _ => None,
        };
        let wanted = internal_ip.and_then(|internal| {
            let on_iface = self.underlay.own_addresses().ok()?;
            if on_iface.contains(&internal) || !self.underlay.host_addresses().ok()?.contains(&internal) {
                return None;
            }
            on_iface.first().copied()
        });
        if wanted == local.iface_address {
            return;
        }
        if let (Some(address), Some(internal)) = (wanted, internal_ip) {
            info!(
                %address, %internal, iface = %self.underlay.iface(),
                "our Node's InternalIP is on another interface of this host: advertising and tunnelling from the underlay interface's address instead, as flanneld does with --iface"
            );
        }
        let local = LocalSettings { iface_address: wanted, ..local.clone() };
        let touched = self.state.set_local(local, &self.paths);
        self.pending = merge(std::mem::replace(&mut self.pending, Touched::Nothing), touched);
    }

    /// Our tunnel address must be one of the underlay's, or peers would
    /// send to an address this node does not answer on; unless it was set
    /// on purpose (`--public-ip`, or flannel's `public-ip-overwrite` for a
    /// node behind NAT).
    fn check_own_address(&mut self, address: Ipv4Addr) -> Result<(), String> {
        let local = self.state.local();
        if local.public_ip.is_some() || self.state.me().is_some_and(|m| m.public_ip_overwrite.is_some()) {
            return Ok(());
        }
        let iface = self.underlay.iface().to_owned();
        match self.underlay.own_addresses() {
            Ok(addresses) if addresses.contains(&address) => Ok(()),
            Ok(addresses) => Err(format!(
                "refusing to configure the datapath: our Node's address {address} is not an address of {iface} ({}); peers would tunnel to an address this node does not answer on. Fix our Node's InternalIP or --iface (or --node-name, if this is another node); for a node behind NAT, set {} or --public-ip",
                if addresses.is_empty() { "it has none".to_owned() } else { addresses.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ") },
                crate::node::ANNOTATION_PUBLIC_IP_OVERWRITE,
            )),
            Err(err) => Err(format!("refusing to configure the datapath: cannot read the addresses of {iface}: {err}")),
        }
    }
}

/// What two successive updates touched together.
fn merge(a: Touched, b: Touched) -> Touched {
    match (a, b) {
        (Touched::All, _) | (_, Touched::All) => Touched::All,
        (Touched::Nothing, other) | (other, Touched::Nothing) => other,
        (Touched::Peers(mut a), Touched::Peers(b)) => {
            a.extend(b);
            a.sort_unstable();
            a.dedup();
            Touched::Peers(a)
        }
    }
}
