//! The loop against fakes: a scripted node source, a peer table in memory,
//! a fixed underlay, a publisher and host that record what they are asked.

use std::{
    cell::RefCell,
    collections::{BTreeMap, VecDeque},
    net::Ipv4Addr,
    rc::Rc,
    sync::Arc,
    time::Instant,
};

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use ipnetwork::Ipv4Network;

use super::*;
use crate::{
    desired::{Change, PeerState, UnderlayPath, diff},
    fixtures::{self, local},
    netfilter::{Changes, Logged, NetfilterError, PodTraffic, PodTrafficRules, RuleWriter},
};

#[derive(Default)]
struct FakeSource(VecDeque<SourceUpdate>);

impl NodeSource for FakeSource {
    async fn next(&mut self) -> Result<SourceUpdate, SourceEnded> {
        match self.0.pop_front() {
            Some(update) => Ok(update),
            None => std::future::pending().await,
        }
    }
}

/// The peers as the datapath holds them, and how they got there.
#[derive(Default)]
struct Table {
    peers: BTreeMap<Ipv4Network, PeerState>,
    full_applies: usize,
    touched_applies: usize,
    /// How many peers fit, as a full map would have it (`None`: any).
    capacity: Option<usize>,
    /// The kernel deleted our routes without notice.
    routes_lost: bool,
    /// The next full apply writes every route again.
    rewrite_pending: bool,
    /// Full applies that did.
    route_rewrites: usize,
}

impl Table {
    /// Writes `peer` unless the table is full.
    fn upsert(&mut self, peer: PeerState) -> bool {
        let full = self.capacity.is_some_and(|c| self.peers.len() >= c) && !self.peers.contains_key(&peer.pod_cidr);
        if !full {
            self.peers.insert(peer.pod_cidr, peer);
        }
        !full
    }

    /// What the real applier reports: every desired peer not held.
    fn not_programmed(&self, desired: &Desired) -> Vec<PeerFailure> {
        desired
            .peers
            .values()
            .filter(|p| self.peers.get(&p.pod_cidr) != Some(p))
            .map(|p| PeerFailure { peer: *p, kind: FailureKind::MapFull, message: format!("peer {}: map ROUTES is full", p.pod_cidr) })
            .collect()
    }
}

#[derive(Clone, Default)]
struct FakeWriter(Rc<RefCell<Table>>);

impl PeerWriter for FakeWriter {
    fn apply(&mut self, desired: &Desired) -> Result<Applied, ApplyError> {
        let mut table = self.0.borrow_mut();
        table.full_applies += 1;
        if std::mem::take(&mut table.rewrite_pending) {
            table.routes_lost = false;
            table.route_rewrites += 1;
        }
        let changes = diff(&table.peers, &desired.peers);
        let mut counts = (0, 0);
        for change in changes {
            match change {
                Change::Remove(peer) => {
                    table.peers.remove(&peer.pod_cidr);
                    counts.1 += 1;
                }
                Change::Upsert(peer) => counts.0 += usize::from(table.upsert(peer)),
            }
        }
        Ok(Applied { added_or_updated: counts.0, removed: counts.1, not_programmed: table.not_programmed(desired), ..Applied::default() })
    }

    fn apply_touched(&mut self, desired: &Desired, touched: &[Ipv4Network]) -> Result<Applied, ApplyError> {
        let mut table = self.0.borrow_mut();
        table.touched_applies += 1;
        let mut upserted = 0;
        for cidr in touched {
            match desired.peers.get(cidr) {
                Some(peer) => upserted += usize::from(table.upsert(*peer)),
                None => {
                    table.peers.remove(cidr);
                }
            };
        }
        Ok(Applied { added_or_updated: upserted, not_programmed: table.not_programmed(desired), ..Applied::default() })
    }

    fn routes_missing(&mut self) -> bool {
        let mut table = self.0.borrow_mut();
        table.rewrite_pending |= table.routes_lost;
        table.routes_lost
    }
}

struct FakeUnderlay {
    path: UnderlayPath,
    addresses: Vec<Ipv4Addr>,
    /// Every address of the host, the underlay's among them.
    host_addresses: Vec<Ipv4Addr>,
    /// How often the paths were asked for.
    paths_asked: usize,
}

impl Underlay for FakeUnderlay {
    fn paths(&mut self, addrs: &[Ipv4Addr]) -> Result<Paths, RouteError> {
        self.paths_asked += 1;
        Ok(addrs.iter().map(|a| (*a, self.path)).collect())
    }

    async fn changed(&mut self) -> BTreeSet<KernelEvent> {
        std::future::pending().await
    }

    fn own_addresses(&mut self) -> Result<Vec<Ipv4Addr>, String> {
        Ok(self.addresses.clone())
    }

    fn host_addresses(&mut self) -> Result<Vec<Ipv4Addr>, String> {
        Ok(self.host_addresses.clone())
    }

    fn iface(&self) -> &str {
        "eth0"
    }
}

#[derive(Default)]
struct FakePublisher {
    published: usize,
    /// The network state each publication said.
    networks: Vec<NetworkState>,
    warned: Vec<String>,
    /// Which call never answers, as a write over a black-holed API
    /// connection does not.
    unanswered: Option<PublisherCall>,
    /// Calls of the unanswered kind made so far.
    unanswered_calls: usize,
}

/// A call of the [`Publisher`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PublisherCall {
    Publish,
    WarnPeer,
}

impl FakePublisher {
    /// Never returns when `call` is the one that goes unanswered.
    async fn maybe_unanswered(&mut self, call: PublisherCall) {
        if self.unanswered == Some(call) {
            self.unanswered_calls += 1;
            std::future::pending::<()>().await;
        }
    }
}

impl Publisher for FakePublisher {
    async fn publish(&mut self, _me: &NodeInfo, _desired: &Desired, _settings: &LocalSettings, network: &NetworkState) {
        self.maybe_unanswered(PublisherCall::Publish).await;
        self.published += 1;
        self.networks.push(network.clone());
    }

    async fn warn_peer(&mut self, rejected: &Rejected, _reason: &'static str) -> Result<(), String> {
        self.maybe_unanswered(PublisherCall::WarnPeer).await;
        self.warned.push(rejected.node.clone());
        Ok(())
    }
}

#[derive(Default)]
struct FakeHost {
    applied: usize,
    /// Times the pod fast path was asked to attach again.
    pod_network_changes: usize,
    /// The pod bridge's index it then finds.
    bridge_ifindex: u32,
    /// Times it was asked to set up device pairs that went.
    device_pair_checks: usize,
    /// Times it was asked about kernel vxlan devices.
    vxlan_device_checks: usize,
    /// The GRO device's index it then has.
    gro_ifindex: u32,
    /// The underlay's new index, once it was recreated.
    underlay_ifindex: Option<u32>,
    /// Why the datapath does not serve, if it does not.
    datapath_problem: Option<String>,
    /// The masquerade and FORWARD rules, when the test keeps them, and
    /// what their reports logged.
    rules: Option<PodTrafficRules>,
    rules_logged: Rc<RefCell<Vec<Logged>>>,
}

impl Host for FakeHost {
    fn housekeeping(&mut self) {}

    fn pod_network_changed(&mut self, local: &mut LocalSettings) {
        self.pod_network_changes += 1;
        local.pod_bridge_ifindex = self.bridge_ifindex;
    }

    fn underlay_changed(&mut self, local: &mut LocalSettings) {
        if let Some(index) = self.underlay_ifindex {
            local.underlay_ifindex = index;
        }
    }

    fn device_pair_changed(&mut self, local: &mut LocalSettings) {
        self.device_pair_checks += 1;
        local.gro_ifindex = self.gro_ifindex;
    }

    fn vxlan_device_appeared(&mut self) {
        self.vxlan_device_checks += 1;
    }

    fn after_apply(&mut self, desired: &Desired) -> bool {
        self.applied += 1;
        if let Some(rules) = &mut self.rules {
            rules.keep("10.244.0.0/16".parse().unwrap(), desired.local_pod_cidr);
        }
        true
    }

    fn datapath_problem(&mut self) -> Option<String> {
        self.datapath_problem.clone()
    }

    async fn finished_work(&mut self) {
        let Some(rules) = &mut self.rules else { return std::future::pending().await };
        let checked = rules.checked().await;
        let logged = rules.report(checked);
        self.rules_logged.borrow_mut().push(logged);
    }
}

/// Rules whose check blocks until the test releases it (or 2 s pass).
struct HeldRules {
    release: std::sync::mpsc::Receiver<()>,
    checks: Arc<AtomicUsize>,
    finished: Arc<AtomicBool>,
}

impl RuleWriter for HeldRules {
    fn ensure(&mut self, _traffic: &PodTraffic) -> Result<Changes, NetfilterError> {
        self.checks.fetch_add(1, Ordering::SeqCst);
        let _ = self.release.recv_timeout(Duration::from_secs(2));
        self.finished.store(true, Ordering::SeqCst);
        Ok(Changes { masquerade_written: true, ..Changes::default() })
    }
}

type Loop = Reconciler<FakeSource, FakeWriter, FakeUnderlay, FakePublisher, FakeHost>;

/// [`fixtures::node`] behind an `Arc`, as the node sources hand nodes on.
fn node(name: &str, cidr: &str, ip: [u8; 4]) -> Arc<NodeInfo> {
    Arc::new(fixtures::node(name, cidr, ip))
}

fn new_loop(table: &FakeWriter) -> Loop {
    let underlay = FakeUnderlay { path: UnderlayPath::OnLink, addresses: vec![Ipv4Addr::new(192, 168, 0, 1)], host_addresses: vec![Ipv4Addr::new(192, 168, 0, 1), Ipv4Addr::new(10, 9, 0, 1)], paths_asked: 0 };
    let metrics = Arc::new(Metrics::new(std::path::Path::new("/nonexistent")));
    Reconciler::new(local(), FakeSource::default(), table.clone(), underlay, FakePublisher::default(), FakeHost::default(), metrics)
}

fn three() -> Vec<Arc<NodeInfo>> {
    vec![node("a", "10.244.1.0/24", [192, 168, 0, 1]), node("b", "10.244.2.0/24", [192, 168, 0, 2]), node("c", "10.244.3.0/24", [192, 168, 0, 3])]
}

/// Feeds one update and reconciles, as one turn of the loop does.
async fn step(reconciler: &mut Loop, update: SourceUpdate) -> bool {
    reconciler.handle_source(update);
    reconciler.reconcile(Instant::now()).await
}

fn events(events: Vec<NodeEvent>) -> SourceUpdate {
    SourceUpdate::Events(events)
}

fn cidrs(table: &FakeWriter) -> Vec<String> {
    table.0.borrow().peers.keys().map(ToString::to_string).collect()
}

#[tokio::test]
async fn nodes_added_changed_and_removed_reach_the_datapath_node_by_node() {
    let table = FakeWriter::default();
    let mut r = new_loop(&table);
    assert!(!step(&mut r, events(vec![NodeEvent::Upsert(node("b", "10.244.2.0/24", [192, 168, 0, 2]))])).await, "nothing before the whole set is known");
    assert!(step(&mut r, events(vec![NodeEvent::Resync { nodes: three(), invalid: vec![] }])).await);
    assert_eq!(cidrs(&table), ["10.244.2.0/24", "10.244.3.0/24"]);
    assert_eq!(r.publisher.published, 1);

    assert!(step(&mut r, events(vec![NodeEvent::Upsert(node("b", "10.244.2.0/24", [192, 168, 0, 9]))])).await);
    assert_eq!(table.0.borrow().peers[&"10.244.2.0/24".parse().unwrap()].node_ip, Ipv4Addr::new(192, 168, 0, 9));
    assert!(step(&mut r, events(vec![NodeEvent::Upsert(node("d", "10.244.4.0/24", [192, 168, 0, 4]))])).await);
    assert!(step(&mut r, events(vec![NodeEvent::Delete("c".into())])).await);
    assert_eq!(cidrs(&table), ["10.244.2.0/24", "10.244.4.0/24"]);
    let (full, touched) = (table.0.borrow().full_applies, table.0.borrow().touched_applies);
    assert_eq!((full, touched), (1, 3), "one full apply for the list, then one node at a time");

    // An update that changes nothing (a heartbeat) applies nothing.
    assert!(!step(&mut r, events(vec![NodeEvent::Upsert(node("d", "10.244.4.0/24", [192, 168, 0, 4]))])).await);
}

#[tokio::test]
/// A peer whose object turns unreadable (a typo in an annotation) keeps
/// what was last read of it, through updates and resyncs, as flannel
/// ignores an update it cannot parse; a node never read stays out.
/// (Shown failing before: the unreadable peer was removed, and its pods
/// cut off.)
async fn an_unreadable_node_keeps_its_last_state_and_is_reported_once() {
    let table = FakeWriter::default();
    let mut r = new_loop(&table);
    step(&mut r, events(vec![NodeEvent::Resync { nodes: three(), invalid: vec![] }])).await;
    let bad = InvalidNode { key: "b".into(), problem: "node b: pod CIDR \"x\" is not a valid IPv4 CIDR".into() };
    for _ in 0..3 {
        step(&mut r, events(vec![NodeEvent::Invalid(bad.clone())])).await;
        r.housekeeping();
        r.reconcile(Instant::now()).await;
    }
    assert_eq!(cidrs(&table), ["10.244.2.0/24", "10.244.3.0/24"], "the unreadable peer is served as last read");
    let reports: Vec<_> = r.first_reports.iter().filter(|p| matches!(p, Reported::InvalidNode { key, .. } if key == "b")).collect();
    assert_eq!(reports.len(), 1, "{:?}", r.first_reports);
    assert_eq!(r.metrics.nodes_invalid.get(), 1);
    // A relist that still cannot read it keeps it too; one never read
    // stays out.
    let never = InvalidNode { key: "d".into(), problem: "node d: no IPv4 pod CIDR".into() };
    let readable: Vec<_> = three().into_iter().filter(|n| n.name != "b").collect();
    step(&mut r, events(vec![NodeEvent::Resync { nodes: readable, invalid: vec![bad.clone(), never] }])).await;
    assert_eq!(cidrs(&table), ["10.244.2.0/24", "10.244.3.0/24"]);
    assert_eq!(r.metrics.nodes_invalid.get(), 2);
    // Fixed, it is read again; deleted, it goes.
    step(&mut r, events(vec![NodeEvent::Upsert(node("b", "10.244.5.0/24", [192, 168, 0, 2]))])).await;
    assert_eq!(cidrs(&table), ["10.244.3.0/24", "10.244.5.0/24"]);
    assert_eq!(r.metrics.nodes_invalid.get(), 1);
    step(&mut r, events(vec![NodeEvent::Invalid(bad), NodeEvent::Delete("b".into())])).await;
    assert_eq!(cidrs(&table), ["10.244.3.0/24"]);
}

#[tokio::test]
async fn a_rejected_peer_is_reported_once_and_evented_once() {
    let table = FakeWriter::default();
    let mut r = new_loop(&table);
    let mut nodes = three();
    nodes.push(node("d", "10.244.2.0/25", [192, 168, 0, 4]));
    step(&mut r, events(vec![NodeEvent::Resync { nodes, invalid: vec![] }])).await;
    for _ in 0..3 {
        r.housekeeping();
        r.reconcile(Instant::now()).await;
    }
    let rejections: Vec<_> = r.first_reports.iter().filter(|p| matches!(p, Reported::Rejected { node, kind: RejectKind::OverlappingCidr, .. } if node == "d")).collect();
    assert_eq!(rejections.len(), 1, "{:?}", r.first_reports);
    assert_eq!(r.publisher.warned, ["d"]);
    // Once it is fixed, it is served, and a later conflict is new again.
    step(&mut r, events(vec![NodeEvent::Upsert(node("d", "10.244.4.0/24", [192, 168, 0, 4]))])).await;
    assert_eq!(cidrs(&table), ["10.244.2.0/24", "10.244.3.0/24", "10.244.4.0/24"]);
    assert!(!r.reported.iter().any(|p| matches!(p, Reported::Rejected { .. })));
}

#[tokio::test]
async fn a_source_outage_keeps_the_state_and_is_logged_once() {
    let table = FakeWriter::default();
    let mut r = new_loop(&table);
    step(&mut r, events(vec![NodeEvent::Resync { nodes: three(), invalid: vec![] }])).await;
    for _ in 0..5 {
        step(&mut r, SourceUpdate::Outage { source: "the API", problem: "connection refused".into() }).await;
        r.housekeeping();
        r.reconcile(Instant::now()).await;
    }
    assert_eq!(cidrs(&table), ["10.244.2.0/24", "10.244.3.0/24"], "the datapath keeps every peer");
    let outages = r.first_reports.iter().filter(|p| **p == Reported::SourceOutage { source: "the API", problem: "connection refused".into() }).count();
    assert_eq!(outages, 1);
    step(&mut r, events(vec![])).await;
    assert!(r.reported.is_empty(), "back: {:?}", r.reported);
}

#[tokio::test]
async fn a_restart_adopts_the_state_and_a_relist_drops_nodes_deleted_meanwhile() {
    // The table outlives the first loop, as pinned maps outlive the agent.
    let table = FakeWriter::default();
    let mut first = new_loop(&table);
    step(&mut first, events(vec![NodeEvent::Resync { nodes: three(), invalid: vec![] }])).await;
    drop(first);
    let mut second = new_loop(&table);
    // Until the new loop has the whole set, the adopted state serves.
    second.handle_source(SourceUpdate::Outage { source: "the API", problem: "API server down".into() });
    assert!(!second.reconcile(Instant::now()).await);
    assert_eq!(cidrs(&table), ["10.244.2.0/24", "10.244.3.0/24"]);
    let mut nodes = three();
    nodes.pop();
    step(&mut second, events(vec![NodeEvent::Resync { nodes, invalid: vec![] }])).await;
    assert_eq!(cidrs(&table), ["10.244.2.0/24"], "c was deleted while no agent watched");
}

/// Our own Node there but unusable (here: no pod CIDR yet, as before the
/// controller-manager allocates one): the not-ready report says so, not
/// that the Node is missing and --node-name may be wrong.
#[tokio::test]
async fn our_own_node_unusable_is_reported_as_such_not_as_missing() {
    let table = FakeWriter::default();
    let mut r = new_loop(&table);
    let others = three().split_off(1);
    let ours = InvalidNode { key: "a".into(), problem: "node a: no IPv4 pod CIDR (spec.podCIDR is empty)".into() };
    assert!(!step(&mut r, events(vec![NodeEvent::Resync { nodes: others, invalid: vec![ours] }])).await);
    let not_ready: Vec<_> = r.first_reports.iter().filter_map(|p| if let Reported::NotReady(t) = p { Some(t.as_str()) } else { None }).collect();
    assert_eq!(
        not_ready,
        ["our own Node \"a\" cannot be used yet: node a: no IPv4 pod CIDR (spec.podCIDR is empty); waiting for it to change"],
        "{:?}",
        r.first_reports
    );
    assert!(table.0.borrow().peers.is_empty());
}

#[tokio::test]
async fn no_datapath_without_our_own_node_or_with_an_address_we_do_not_have() {
    let table = FakeWriter::default();
    let mut r = new_loop(&table);
    let others = three().split_off(1);
    assert!(!step(&mut r, events(vec![NodeEvent::Resync { nodes: others, invalid: vec![] }])).await);
    assert!(r.first_reports.iter().any(|p| matches!(p, Reported::NotReady(_))));
    assert!(!step(&mut r, events(vec![NodeEvent::Upsert(node("a", "10.244.1.0/24", [192, 168, 0, 77]))])).await);
    assert!(r.first_reports.iter().any(|p| matches!(p, Reported::OwnAddress(t) if t.contains("192.168.0.77 is not an address of eth0"))));
    assert!(table.0.borrow().peers.is_empty());
    assert!(step(&mut r, events(vec![NodeEvent::Upsert(node("a", "10.244.1.0/24", [192, 168, 0, 1]))])).await);
    assert_eq!(cidrs(&table), ["10.244.2.0/24", "10.244.3.0/24"]);
    assert!(r.reported.is_empty());
    // An InternalIP on another interface of this host (a management NIC):
    // the underlay interface's address is ours, as flanneld's --iface
    // address is. (Shown failing before: refused as not on eth0.)
    assert!(step(&mut r, events(vec![NodeEvent::Upsert(node("a", "10.244.1.0/24", [10, 9, 0, 1]))])).await);
    assert!(r.reported.is_empty(), "{:?}", r.reported);
    assert_eq!(r.state.result().unwrap().config.node_ip, [192, 168, 0, 1]);
    // And back on eth0's own address: no longer needed.
    assert!(step(&mut r, events(vec![NodeEvent::Upsert(node("a", "10.244.1.0/24", [192, 168, 0, 1]))])).await);
    assert_eq!(r.state.local().iface_address, None);
}

#[tokio::test]
async fn run_applies_what_the_source_sends_until_stopped() {
    let table = FakeWriter::default();
    let mut r = new_loop(&table);
    r.source.0.push_back(events(vec![NodeEvent::Resync { nodes: three(), invalid: vec![] }]));
    let stop = async { tokio::time::sleep(Duration::from_millis(50)).await };
    r.run(stop).await.unwrap();
    assert_eq!(cidrs(&table), ["10.244.2.0/24", "10.244.3.0/24"]);
}

#[tokio::test]
async fn a_node_event_is_applied_while_the_netfilter_check_runs() {
    let table = FakeWriter::default();
    let mut r = new_loop(&table);
    let (release, held) = std::sync::mpsc::channel();
    let (checks, finished) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
    let writer = HeldRules { release: held, checks: checks.clone(), finished: finished.clone() };
    // No re-check during the test: only a change of the rules starts one.
    r.host.rules = Some(PodTrafficRules::with_writer(true, writer, Duration::from_secs(3600)));
    let logged = r.host.rules_logged.clone();
    r.source.0.push_back(events(vec![NodeEvent::Resync { nodes: three(), invalid: vec![] }]));
    r.source.0.push_back(events(vec![NodeEvent::Upsert(node("d", "10.244.4.0/24", [192, 168, 0, 4]))]));
    let in_flight = Rc::new(RefCell::new(None));
    let seen = in_flight.clone();
    let peers = table.0.clone();
    let stop = async move {
        while !peers.borrow().peers.contains_key(&"10.244.4.0/24".parse().unwrap()) {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        *seen.borrow_mut() = Some(!finished.load(Ordering::SeqCst));
        release.send(()).unwrap();
        // The check's outcome comes back to the loop as an event.
        while logged.borrow().is_empty() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    };
    let started = Instant::now();
    r.run(stop).await.unwrap();
    assert_eq!(*in_flight.borrow(), Some(true), "node d must reach the datapath while the first check still runs, not after it");
    assert!(started.elapsed() < Duration::from_secs(2), "the check was released, not timed out: {:?}", started.elapsed());
    assert_eq!(*r.host.rules_logged.borrow(), [Logged::Written]);
    assert_eq!(checks.load(Ordering::SeqCst), 1, "two reconciles, unchanged rules: one check, no process per Node event");
}

#[tokio::test]
async fn kernel_events_reach_the_paths_and_the_pod_fast_path() {
    let table = FakeWriter::default();
    let mut r = new_loop(&table);
    r.state.set_local(LocalSettings { direct_routing: true, ..local() }, &Paths::new());
    step(&mut r, events(vec![NodeEvent::Resync { nodes: three(), invalid: vec![] }])).await;
    let b: Ipv4Network = "10.244.2.0/24".parse().unwrap();
    assert_eq!(table.0.borrow().peers[&b].mode, ROUTE_MODE_DIRECT);
    let kernel = |events: &[KernelEvent]| events.iter().copied().collect::<BTreeSet<_>>();

    // A pod joined the bridge: the host enrols it; no peer changes.
    r.handle_kernel_events(&kernel(&[KernelEvent::PodPortsChanged]));
    assert_eq!(r.host.pod_network_changes, 1);
    assert!(!r.reconcile(Instant::now()).await, "a new pod changes no peer");

    // The bridge came back: a full reconcile, even with the same index.
    let full = table.0.borrow().full_applies;
    r.handle_kernel_events(&kernel(&[KernelEvent::PodBridgeChanged]));
    assert!(r.reconcile(Instant::now()).await);
    assert_eq!((r.host.pod_network_changes, table.0.borrow().full_applies), (2, full + 1));
    // Recreated under a new index: it reaches CONFIG.
    r.host.bridge_ifindex = 7;
    r.handle_kernel_events(&kernel(&[KernelEvent::PodBridgeChanged, KernelEvent::PodPortsChanged]));
    assert!(r.reconcile(Instant::now()).await);
    assert_eq!((r.host.pod_network_changes, r.state.local().pod_bridge_ifindex), (3, 7));
    assert_eq!(r.state.result().unwrap().config.pod_bridge_ifindex, 7);

    // A device pair went: the host sets it up again, under a new index
    // that reaches CONFIG; the same index changes nothing.
    r.handle_kernel_events(&kernel(&[KernelEvent::DevicePairChanged]));
    assert_eq!(r.host.device_pair_checks, 1);
    assert!(!r.reconcile(Instant::now()).await, "the pairs as they were: nothing to write");
    r.host.gro_ifindex = 12;
    r.handle_kernel_events(&kernel(&[KernelEvent::DevicePairChanged]));
    assert!(r.reconcile(Instant::now()).await);
    assert_eq!(r.state.result().unwrap().config.gro_ifindex, 12);
    assert_eq!(r.host.pod_network_changes, 3, "the pod fast path is not asked");

    // A kernel vxlan device appeared: the host is asked, and nothing is
    // written for it.
    assert_eq!(r.host.vxlan_device_checks, 0, "asked before any vxlan device appeared");
    r.handle_kernel_events(&kernel(&[KernelEvent::VxlanDeviceAppeared]));
    assert_eq!(r.host.vxlan_device_checks, 1);
    assert!(!r.reconcile(Instant::now()).await, "a vxlan device changes nothing to write");
    assert_eq!(r.host.device_pair_checks, 2, "the device pairs are not asked");

    // The underlay changed: paths asked again, the peer goes to VXLAN; the
    // pod fast path is not asked.
    r.underlay.path = UnderlayPath::Gateway(Ipv4Addr::new(192, 168, 0, 254));
    r.handle_kernel_events(&kernel(&[KernelEvent::UnderlayChanged]));
    assert!(r.reconcile(Instant::now()).await);
    assert_eq!(table.0.borrow().peers[&b].mode, ROUTE_MODE_VXLAN);
    assert_eq!(r.host.pod_network_changes, 3);

    // The kernel deleted our routes without a word (their source address
    // went and came back between two looks): an underlay change finds them
    // gone, and the next reconcile writes every route again though no peer
    // changed.
    table.0.borrow_mut().routes_lost = true;
    r.handle_kernel_events(&kernel(&[KernelEvent::UnderlayChanged]));
    assert!(r.reconcile(Instant::now()).await, "routes gone from the kernel must be written again");
    assert_eq!((table.0.borrow().route_rewrites, table.0.borrow().routes_lost), (1, false));
    // Routes in place and paths as they were: nothing to write.
    r.handle_kernel_events(&kernel(&[KernelEvent::UnderlayChanged]));
    assert!(!r.reconcile(Instant::now()).await);
    // Another tool deleted one of ours: written again, paths not asked.
    let paths_asked = r.underlay.paths_asked;
    table.0.borrow_mut().routes_lost = true;
    r.handle_kernel_events(&kernel(&[KernelEvent::OwnRouteDeleted]));
    assert!(r.reconcile(Instant::now()).await, "a route of ours deleted must be written again");
    assert_eq!((table.0.borrow().route_rewrites, table.0.borrow().routes_lost), (2, false));
    assert_eq!(r.underlay.paths_asked, paths_asked, "a route of ours moves no path");
    // The agent's own deletion: the routes are there, nothing to write.
    r.handle_kernel_events(&kernel(&[KernelEvent::OwnRouteDeleted]));
    assert!(!r.reconcile(Instant::now()).await);
    // The underlay recreated: the host attaches to it again, and its new
    // index reaches CONFIG.
    r.host.underlay_ifindex = Some(9);
    r.handle_kernel_events(&kernel(&[KernelEvent::UnderlayChanged]));
    assert!(r.reconcile(Instant::now()).await);
    assert_eq!(r.state.result().unwrap().config.underlay_ifindex, 9);
}

#[tokio::test]
async fn etcd_snapshots_are_resyncs_and_a_stopped_etcd_source_ends_the_loop_with_its_reason() {
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    let bad = crate::etcd_source::LeaseError::NoPublicIp { key: "10.244.9.0-24".into() };
    let snapshot = crate::etcd_source::Snapshot { nodes: three().iter().map(|n| (**n).clone()).collect(), invalid: vec![bad.clone()] };
    sender.send(Ok(snapshot)).await.unwrap();
    let mut r = Reconciler::new(
        local(),
        sources::EtcdNodes::new(receiver),
        FakeWriter::default(),
        FakeUnderlay { path: UnderlayPath::OnLink, addresses: vec![Ipv4Addr::new(192, 168, 0, 1)], host_addresses: vec![Ipv4Addr::new(192, 168, 0, 1), Ipv4Addr::new(10, 9, 0, 1)], paths_asked: 0 },
        sources::LeasePublisher,
        FakeHost::default(),
        Arc::new(Metrics::new(std::path::Path::new("/nonexistent"))),
    );
    let SourceUpdate::Events(events) = r.source.next().await.unwrap() else { panic!("not events") };
    // Keyed by the lease's key, which names a peer's node: it keeps what
    // was last read of it.
    let invalid = vec![InvalidNode { key: "10.244.9.0-24".into(), problem: bad.to_string() }];
    assert_eq!(events, [NodeEvent::Resync { nodes: three(), invalid }]);

    // The task gone (the receiver's only sender): the loop ends, as the
    // agent did before the reconciler ("the etcd source stopped").
    drop(sender);
    let ended = tokio::time::timeout(Duration::from_secs(5), r.run(std::future::pending())).await.expect("the loop ended");
    assert_eq!(ended.unwrap_err().to_string(), "the node source ended: the etcd source stopped");

    // A source that stopped for a reason says it: the loop ends with it.
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    let taken = crate::etcd_source::EtcdSourceError::SubnetTaken { lease: "10.244.1.0-24".into(), holder: "192.168.77.99".into() };
    let expected = format!("the node source ended: {taken}");
    sender.send(Err(taken)).await.unwrap();
    r.source = sources::EtcdNodes::new(receiver);
    let ended = tokio::time::timeout(Duration::from_secs(5), r.run(std::future::pending())).await.expect("the loop ended");
    assert_eq!(ended.unwrap_err().to_string(), expected);
}

/// Our Node says its network is up only while the datapath serves: not
/// while the programs are not attached (yet, or any more), though the maps
/// were programmed, and again once they are. (Shown failing with the loop
/// publishing `Up` whatever the host says, as it did before it asked.)
#[tokio::test]
async fn the_network_is_published_up_only_while_the_datapath_is_attached() {
    let table = FakeWriter::default();
    let mut r = new_loop(&table);
    let detached = "overlay_tc_egress is no longer attached to eth0".to_owned();
    r.host.datapath_problem = Some(detached.clone());
    assert!(step(&mut r, events(vec![NodeEvent::Resync { nodes: three(), invalid: vec![] }])).await);
    assert_eq!(cidrs(&table), ["10.244.2.0/24", "10.244.3.0/24"], "the maps are programmed all the same");
    assert_eq!(r.publisher.networks, [NetworkState::Down(detached.clone())]);

    r.host.datapath_problem = None;
    r.housekeeping();
    assert!(r.reconcile(Instant::now()).await);
    assert_eq!(r.publisher.networks.last(), Some(&NetworkState::Up));

    // The datapath goes away: not claimed up any more, and said once.
    r.host.datapath_problem = Some(detached.clone());
    for _ in 0..3 {
        r.housekeeping();
        assert!(r.reconcile(Instant::now()).await);
        assert_eq!(r.publisher.networks.last(), Some(&NetworkState::Down(detached.clone())));
    }
    let reports = r.first_reports.iter().filter(|p| matches!(p, Reported::DatapathDown(_))).count();
    assert_eq!(reports, 2, "once per outage: {:?}", r.first_reports);
    r.host.datapath_problem = None;
    r.housekeeping();
    assert!(r.reconcile(Instant::now()).await);
    assert_eq!(r.publisher.networks.last(), Some(&NetworkState::Up));
    assert!(r.reported.is_empty(), "{:?}", r.reported);
}

/// More nodes than the datapath holds: the one left out is logged once
/// with its node's name however often it is retried, counted in
/// `overlay_peers_not_programmed{reason="map_full"}`, and taken in by the
/// next full apply once a node leaves.
#[tokio::test]
async fn a_peer_beyond_a_full_map_is_reported_once_counted_and_taken_in_later() {
    let table = FakeWriter::default();
    table.0.borrow_mut().capacity = Some(2);
    let mut r = new_loop(&table);
    let mut nodes = three();
    nodes.push(node("d", "10.244.4.0/24", [192, 168, 0, 4]));
    step(&mut r, events(vec![NodeEvent::Resync { nodes, invalid: vec![] }])).await;
    for _ in 0..3 {
        r.housekeeping();
        r.reconcile(Instant::now()).await;
    }
    assert_eq!(cidrs(&table), ["10.244.2.0/24", "10.244.3.0/24"]);
    let reports: Vec<_> = r.first_reports.iter().filter(|p| matches!(p, Reported::NotProgrammed { .. })).collect();
    assert_eq!(
        reports,
        [&Reported::NotProgrammed { pod_cidr: "10.244.4.0/24".parse().unwrap(), problem: "peer 10.244.4.0/24: map ROUTES is full".into() }],
        "{:?}",
        r.first_reports
    );
    let gauge = |r: &Loop| r.metrics.peers_not_programmed.get_or_create(&[("reason", "map_full")]).get();
    assert_eq!(gauge(&r), 1);
    assert!(r.metrics.encode().contains("overlay_peers_not_programmed{reason=\"map_full\"} 1"), "{}", r.metrics.encode());

    // A node leaves: its removal touches only its own CIDR, and the
    // housekeeping's full apply takes the one left out.
    step(&mut r, events(vec![NodeEvent::Delete("c".into())])).await;
    assert_eq!(gauge(&r), 1);
    r.housekeeping();
    r.reconcile(Instant::now()).await;
    assert_eq!(cidrs(&table), ["10.244.2.0/24", "10.244.4.0/24"]);
    assert_eq!(gauge(&r), 0);
    assert!(!r.reported.iter().any(|p| matches!(p, Reported::NotProgrammed { .. })), "{:?}", r.reported);
}

/// A publisher call that never answers (a write to the API server over a
/// connection that went black, which the kernel gives up on only after
/// ~15 min) holds nothing back: a node event that comes after it still
/// reaches the datapath, the call is made again later (retried, not
/// dropped), and the loop stops when asked. Time is paused, so the
/// loop's waits pass in no real time. (Shown failing with the loop
/// awaiting the publisher without a bound: still stuck in the first
/// publication after 10 minutes.)
#[tokio::test(start_paused = true)]
async fn a_publisher_call_that_never_answers_holds_no_event_back() {
    let e: Ipv4Network = "10.244.5.0/24".parse().unwrap();
    for call in [PublisherCall::Publish, PublisherCall::WarnPeer] {
        let table = FakeWriter::default();
        let mut r = new_loop(&table);
        r.publisher.unanswered = Some(call);
        // d overlaps b: rejected, so an event about it is recorded.
        let mut nodes = three();
        nodes.push(node("d", "10.244.2.0/25", [192, 168, 0, 4]));
        r.source.0.push_back(events(vec![NodeEvent::Resync { nodes, invalid: vec![] }]));
        r.source.0.push_back(events(vec![NodeEvent::Upsert(node("e", "10.244.5.0/24", [192, 168, 0, 5]))]));
        let stop = tokio::time::sleep(Duration::from_secs(120));
        // Far beyond any bound the loop sets itself, so a loop that waits
        // for the publisher fails the test instead of hanging it.
        let ran = tokio::time::timeout(Duration::from_secs(600), r.run(stop)).await;
        let e_applied = table.0.borrow().peers.contains_key(&e);
        assert!(
            ran.is_ok() && e_applied,
            "{call:?} never answering: run returned when stopped: {}, node e reached the datapath: {e_applied}",
            ran.is_ok()
        );
        // Retried, after a pause that doubles: at 0 s, 40 s (10 s + 30 s)
        // and 110 s (50 s + 60 s), give or take a housekeeping period;
        // without the pause, every 15 s (8 calls).
        assert!(
            (2..=4).contains(&r.publisher.unanswered_calls),
            "{call:?}: {} calls in 120 s, not 2 to 4 (retried, with pauses)",
            r.publisher.unanswered_calls
        );
        assert!(r.evented.is_empty(), "an unanswered event counts as not recorded: {:?}", r.evented);
    }
}
