//! The real node sources and publishers: a directory of Node manifests,
//! the Kubernetes API, and flannel's etcd.

use std::{cell::RefCell, collections::BTreeMap, rc::Rc, sync::Arc, time::Duration};

use tokio::sync::mpsc;
use futures::{FutureExt as _, StreamExt as _, stream::BoxStream};
use k8s_openapi::api::core::v1::Node;
use kube::runtime::watcher;
use tracing::{info, warn};

use super::{InvalidNode, NetworkState, NodeEvent, NodeSource, Publisher, SourceEnded, SourceUpdate};
use crate::{
    desired::{Backend, Desired, LocalSettings, Rejected},
    etcd_source::{EtcdSourceError, Snapshot},
    kube_source::{self, NetworkCondition, NodeCache},
    manifests::ManifestDir,
    metrics::Metrics,
    node::{self, NodeInfo},
    report::{Chain, WithCauses as _},
};

/// How often the nodes directory is looked at; changes land within this.
const POLL: Duration = Duration::from_millis(200);
/// Watch events taken in one batch: a relist of thousands of nodes is
/// applied once, not node by node.
const MAX_BATCH: usize = 100_000;

/// A polled directory of Node manifests: every change is a
/// [`NodeEvent::Resync`] of the whole directory.
pub struct ManifestSource {
    dir: ManifestDir,
    poll: tokio::time::Interval,
    failing: bool,
}

/// A whole listing as one resync: the nodes, and each entry that did not
/// translate as an invalid node, keyed by the name of the node it stands
/// for where `name_of` knows it (so that node keeps what was last read of
/// it), else by its message.
fn resync<E: std::error::Error + 'static>(nodes: Vec<NodeInfo>, errors: &[E], name_of: impl Fn(&E) -> Option<String>) -> SourceUpdate {
    let nodes = nodes.into_iter().map(Arc::new).collect();
    let invalid = errors
        .iter()
        .map(|e| {
            let problem = Chain(e).to_string();
            InvalidNode { key: name_of(e).unwrap_or_else(|| problem.clone()), problem }
        })
        .collect();
    SourceUpdate::Events(vec![NodeEvent::Resync { nodes, invalid }])
}

impl ManifestSource {
    pub fn new(dir: ManifestDir) -> Self {
        Self { dir, poll: tokio::time::interval(POLL), failing: false }
    }
}

impl NodeSource for ManifestSource {
    async fn next(&mut self) -> Result<SourceUpdate, SourceEnded> {
        loop {
            self.poll.tick().await;
            match self.dir.scan_if_changed() {
                Ok(Some(scan)) => {
                    self.failing = false;
                    // A manifest that stops parsing keeps its last good
                    // state in the scan itself.
                    return Ok(resync(scan.nodes, &scan.errors, |_| None));
                }
                Ok(None) if std::mem::take(&mut self.failing) => return Ok(SourceUpdate::Events(Vec::new())),
                Ok(None) => {}
                Err(err) => {
                    self.failing = true;
                    return Ok(SourceUpdate::Outage { source: "the nodes directory", problem: Chain(&err).to_string() });
                }
            }
        }
    }
}

/// The Kubernetes source, in the log.
const WATCH: &str = "Nodes through the API (watch)";

type WatchItem = Result<watcher::Event<Node>, watcher::Error>;

/// Nodes through the API server: kube-runtime's watcher (which resumes
/// from its last resource version, or relists), translated into per-node
/// events. A relist arrives as one [`NodeEvent::Resync`].
pub struct KubeSource {
    watch: BoxStream<'static, WatchItem>,
    cache: NodeCache,
    own_name: String,
    /// Our own Node as last seen, for [`KubePublisher`].
    own: Rc<RefCell<Option<Node>>>,
    metrics: Arc<Metrics>,
    /// A watch error that came after events in the same batch.
    outage: Option<String>,
}

impl KubeSource {
    pub fn new(client: kube::Client, own_name: &str, metrics: Arc<Metrics>) -> (Self, KubePublisher) {
        Self::from_stream(kube_source::node_watcher(client.clone()).boxed(), own_name, metrics, kube_source::Publisher::new(client, own_name))
    }

    fn from_stream(watch: BoxStream<'static, WatchItem>, own_name: &str, metrics: Arc<Metrics>, publisher: kube_source::Publisher) -> (Self, KubePublisher) {
        let own = Rc::new(RefCell::new(None));
        let source = Self { watch, cache: NodeCache::new(own_name), own_name: own_name.to_owned(), own: own.clone(), metrics, outage: None };
        (source, KubePublisher { publisher, own, written: None })
    }

    /// One watcher event → the node events it means, if any (kubelet's
    /// heartbeats mean none).
    fn translate(&mut self, event: watcher::Event<Node>, out: &mut Vec<NodeEvent>) {
        let name = match &event {
            watcher::Event::Apply(node) | watcher::Event::Delete(node) => node.metadata.name.clone(),
            _ => None,
        };
        let deleted = matches!(event, watcher::Event::Delete(_));
        let init_done = matches!(event, watcher::Event::InitDone);
        let changed = self.cache.handle(event);
        if name.as_deref() == Some(self.own_name.as_str()) || init_done {
            *self.own.borrow_mut() = self.cache.own().cloned();
        }
        if !changed {
            return;
        }
        if init_done {
            let invalid = self.cache.invalid_named().into_iter().map(|(key, e)| InvalidNode { key, problem: Chain(&e).to_string() }).collect();
            out.push(NodeEvent::Resync { nodes: self.cache.nodes(), invalid });
            return;
        }
        let Some(name) = name else { return };
        if deleted {
            out.push(NodeEvent::Delete(name));
            return;
        }
        match self.cache.get(&name) {
            Some(Ok(node)) => out.push(NodeEvent::Upsert(node)),
            Some(Err(e)) => out.push(NodeEvent::Invalid(InvalidNode { key: name, problem: Chain(&e).to_string() })),
            None => {}
        }
    }
}

impl NodeSource for KubeSource {
    async fn next(&mut self) -> Result<SourceUpdate, SourceEnded> {
        if let Some(problem) = self.outage.take() {
            return Ok(SourceUpdate::Outage { source: WATCH, problem });
        }
        let mut events = Vec::new();
        let mut item = self.watch.next().await;
        // Take everything already waiting.
        for _ in 0..MAX_BATCH {
            match item {
                None => return Err(SourceEnded("the Node watch ended".to_owned())),
                Some(Err(err)) => {
                    self.metrics.watch_restarts.inc();
                    let problem = format!("{} (retrying with backoff)", err.to_string_with_causes());
                    if events.is_empty() {
                        return Ok(SourceUpdate::Outage { source: WATCH, problem });
                    }
                    self.outage = Some(problem);
                    break;
                }
                Some(Ok(event)) => self.translate(event, &mut events),
            }
            match self.watch.next().now_or_never() {
                Some(next) => item = next,
                None => break,
            }
        }
        Ok(SourceUpdate::Events(events))
    }
}

/// Publishes our Node's annotations and condition, and events about peers.
pub struct KubePublisher {
    publisher: kube_source::Publisher,
    own: Rc<RefCell<Option<Node>>>,
    /// What we last wrote: until the watch brings it back, our Node as last
    /// seen still lacks it, and each reconcile meanwhile would write it
    /// again.
    written: Option<Unechoed<NodeWrite>>,
}

/// The annotations and the condition one write set.
type NodeWrite = (BTreeMap<String, String>, Option<NetworkCondition>);

/// A write to our Node that the watch has not brought back yet: what was
/// written, and the version of our Node seen when it was.
#[derive(Debug, PartialEq)]
struct Unechoed<T> {
    seen: Option<String>,
    written: T,
}

impl<T: PartialEq> Unechoed<T> {
    /// Whether writing `what` now, with our Node at version `seen`, would
    /// repeat this write before its echo: same content, no newer Node.
    fn repeated_by(memo: Option<&Self>, seen: Option<&String>, what: &T) -> bool {
        memo.is_some_and(|m| m.seen.as_ref() == seen && &m.written == what)
    }
}

impl Publisher for KubePublisher {
    async fn publish(&mut self, _me: &NodeInfo, desired: &Desired, settings: &LocalSettings, network: &NetworkState) {
        let wanted = node::flannel_annotations(settings.backend.flannel_name(), &desired.config);
        let (seen, missing, condition) = {
            let own = self.own.borrow();
            let Some(own) = own.as_ref() else { return };
            (
                own.metadata.resource_version.clone(),
                node::missing_annotations(own, &wanted),
                kube_source::network_condition_update(own, *network == NetworkState::Up),
            )
        };
        if missing.is_empty() && condition.is_none() {
            return;
        }
        let write: NodeWrite = (missing, condition);
        if Unechoed::repeated_by(self.written.as_ref(), seen.as_ref(), &write) {
            return;
        }
        let problem = match network {
            NetworkState::Down(problem) => Some(problem.as_str()),
            NetworkState::Up => None,
        };
        let (missing, condition) = &write;
        match self.publisher.publish(missing, condition.map(|c| (c, problem))).await {
            Ok(()) => {
                if !missing.is_empty() {
                    info!(annotations = ?missing, "published our tunnel endpoint on our Node");
                }
                if let Some(condition) = condition {
                    info!(?condition, "set our Node's NetworkUnavailable condition");
                }
                self.written = Some(Unechoed { seen, written: write });
            }
            Err(err) => warn!(error = %err.to_string_with_causes(), "publishing our Node's annotations and NetworkUnavailable condition; will retry"),
        }
    }

    async fn warn_peer(&mut self, rejected: &Rejected, reason: &'static str) -> Result<(), String> {
        let own_name = self.publisher.node_name().to_owned();
        self.publisher
            .warn(&rejected.node, reason, format!("{} (reported by overlay-agent on {own_name})", rejected.reason))
            .await
            .map_err(|e| e.to_string_with_causes())
    }
}

/// The manifest directory cannot publish: it says, once, what our Node must
/// carry.
#[derive(Default)]
pub struct LogPublisher {
    logged: Option<String>,
}

impl Publisher for LogPublisher {
    async fn publish(&mut self, me: &NodeInfo, desired: &Desired, settings: &LocalSettings, _network: &NetworkState) {
        let advertised = me.vtep_mac == Some(desired.config.vtep_mac) && me.vni == Some(desired.config.vni);
        if settings.backend != Backend::Vxlan || advertised {
            return;
        }
        let wanted = node::flannel_annotations(settings.backend.flannel_name(), &desired.config);
        let text: Vec<String> = wanted.iter().map(|(k, v)| format!("{k}='{v}'")).collect();
        let text = text.join(" ");
        if self.logged.as_ref() != Some(&text) {
            // flannel peers can only reach us through what our Node says.
            warn!(node = %me.name, "our Node does not advertise our VTEP; flannel nodes cannot send to us until it carries: {text}");
            self.logged = Some(text);
        }
    }

    async fn warn_peer(&mut self, _rejected: &Rejected, _reason: &'static str) -> Result<(), String> {
        // No API to record events in; the log has said it.
        Ok(())
    }
}

/// flannel's etcd mode: the snapshots of every lease that
/// [`crate::etcd_source::EtcdSource`]'s task sends (it holds our lease and
/// watches everyone's), each a [`NodeEvent::Resync`]. The task logs etcd's
/// failures itself and retries, sending nothing meanwhile, so an outage
/// leaves the datapath as it is.
pub struct EtcdNodes {
    snapshots: mpsc::Receiver<Result<Snapshot, EtcdSourceError>>,
}

impl EtcdNodes {
    /// `snapshots` from [`crate::etcd_source::EtcdSource::spawn`].
    pub fn new(snapshots: mpsc::Receiver<Result<Snapshot, EtcdSourceError>>) -> Self {
        Self { snapshots }
    }
}

impl NodeSource for EtcdNodes {
    async fn next(&mut self) -> Result<SourceUpdate, SourceEnded> {
        match self.snapshots.recv().await {
            // A peer's node is named by its lease's key.
            Some(Ok(snapshot)) => Ok(resync(snapshot.nodes, &snapshot.invalid, |e| Some(e.key().to_owned()))),
            Some(Err(err)) => Err(SourceEnded(Chain(&err).to_string())),
            None => Err(SourceEnded("the etcd source stopped".to_owned())),
        }
    }
}

/// flannel's etcd mode publishes nothing here: our lease, which the
/// source's task holds, is what peers read.
#[derive(Default)]
pub struct LeasePublisher;

impl Publisher for LeasePublisher {
    async fn publish(&mut self, _me: &NodeInfo, _desired: &Desired, _settings: &LocalSettings, _network: &NetworkState) {}

    async fn warn_peer(&mut self, _rejected: &Rejected, _reason: &'static str) -> Result<(), String> {
        // No API to record events in; the log has said it.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{NetworkCondition, Unechoed};

    /// A write is not repeated while our Node is still the version it was
    /// written against; a newer Node (the echo, or anyone's change), or
    /// other content, is decided afresh.
    #[test]
    fn a_write_is_repeated_only_once_our_node_moved_on() {
        let v1 = Some("41".to_owned());
        let v2 = Some("42".to_owned());
        let memo = Unechoed { seen: v1.clone(), written: NetworkCondition::Available };
        assert!(Unechoed::repeated_by(Some(&memo), v1.as_ref(), &NetworkCondition::Available));
        assert!(!Unechoed::repeated_by(Some(&memo), v2.as_ref(), &NetworkCondition::Available));
        assert!(!Unechoed::repeated_by(Some(&memo), v1.as_ref(), &NetworkCondition::Unavailable));
        assert!(!Unechoed::repeated_by(None, v1.as_ref(), &NetworkCondition::Available));
    }
}
