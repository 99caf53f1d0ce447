//! The Kubernetes node source, as flannel's `--kube-subnet-mgr`: a
//! kube-runtime watcher on Nodes feeding the same Node → [`NodeInfo`]
//! translation as the manifest directory, and the publication of our own
//! Node (flannel's annotations and the `NetworkUnavailable` condition).

use std::{collections::BTreeMap, path::Path, sync::Arc};

use k8s_openapi::api::core::v1::{Node, ObjectReference};
use kube::{
    Api, Client, Config, Resource as _,
    api::{Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        events::{Event as K8sEvent, EventType, Recorder, Reporter},
        watcher,
    },
};

use crate::node::{NodeError, NodeInfo};

/// Who we are in `managedFields` and events.
pub const FIELD_MANAGER: &str = "overlay-agent";
/// The condition's reason once our datapath is up (flannel's is
/// `FlannelIsUp`).
pub const NETWORK_UP_REASON: &str = "OverlayIsUp";
/// The condition's reason once our datapath no longer serves.
pub const NETWORK_DOWN_REASON: &str = "OverlayIsDown";

#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error("reading kubeconfig {path}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no Kubernetes configuration: not running in a cluster (KUBERNETES_SERVICE_HOST is unset) and no --kubeconfig; \
         give --kubeconfig PATH, or --nodes-dir DIR to read Node manifests from a directory"
    )]
    NotInCluster,
    #[error("in-cluster configuration")]
    InCluster(#[source] kube::config::InClusterError),
    #[error("building the Kubernetes client")]
    Client(#[source] kube::Error),
}

/// A client from `--kubeconfig`, or the pod's service account in-cluster.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubeSourceError> {
    let config = match kubeconfig {
        Some(path) => {
            let err = |source| KubeSourceError::Kubeconfig { path: path.display().to_string(), source };
            let kubeconfig = Kubeconfig::read_from(path).map_err(err)?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(err)?
        }
        None if std::env::var_os("KUBERNETES_SERVICE_HOST").is_none() => return Err(KubeSourceError::NotInCluster),
        None => Config::incluster().map_err(KubeSourceError::InCluster)?,
    };
    // No read timeout (kube's default): it would apply to every connection
    // of the client, the Node watch's too, whose long polls may carry
    // nothing for up to 290 s on a quiet cluster (the watcher has its own
    // idle timeout). The loop bounds its writes instead
    // (`reconciler::PUBLISH_TIMEOUT`); dropping an unanswered request closes
    // its connection (HTTP/1), so a retry opens a new one.
    Client::try_from(config).map_err(KubeSourceError::Client)
}

/// The watcher on all Nodes, with kube-runtime's default backoff
/// (exponential, 800 ms to 30 s) between failed attempts.
pub fn node_watcher(client: Client) -> impl futures::Stream<Item = Result<watcher::Event<Node>, watcher::Error>> + Send {
    use kube::runtime::WatchStreamExt as _;
    watcher(Api::<Node>::all(client), watcher::Config::default()).default_backoff()
}

/// The cluster's nodes as the watcher last described them.
///
/// Level-triggered: a (re)list replaces the whole set at `InitDone`, so
/// nodes deleted while we were not watching (agent down, watch expired)
/// drop out and their entries are removed from the datapath.
#[derive(Debug)]
pub struct NodeCache {
    own_name: String,
    /// Shared with each reconcile, which then costs no copy of the cluster.
    nodes: BTreeMap<String, Result<Arc<NodeInfo>, NodeError>>,
    /// Nodes listed so far during a relist.
    relisting: Option<BTreeMap<String, Result<Arc<NodeInfo>, NodeError>>>,
    own: Option<Node>,
    synced: bool,
}

impl NodeCache {
    pub fn new(own_name: &str) -> Self {
        Self { own_name: own_name.to_owned(), nodes: BTreeMap::new(), relisting: None, own: None, synced: false }
    }

    /// Takes one watcher event. Returns whether the node set, as the
    /// datapath sees it, changed: kubelet's status heartbeats do not.
    pub fn handle(&mut self, event: watcher::Event<Node>) -> bool {
        match event {
            watcher::Event::Init => {
                self.relisting = Some(BTreeMap::new());
                false
            }
            watcher::Event::InitApply(node) => {
                let (name, info) = self.translate(node);
                if let Some(list) = self.relisting.as_mut() {
                    list.insert(name, info);
                }
                false
            }
            watcher::Event::InitDone => {
                let listed = self.relisting.take().unwrap_or_default();
                let changed = listed != self.nodes || !self.synced;
                self.nodes = listed;
                self.synced = true;
                changed
            }
            watcher::Event::Apply(node) => {
                let (name, info) = self.translate(node);
                self.nodes.insert(name, info.clone()) != Some(info)
            }
            watcher::Event::Delete(node) => {
                let name = node.metadata.name.unwrap_or_default();
                if name == self.own_name {
                    self.own = None;
                }
                self.nodes.remove(&name).is_some()
            }
        }
    }

    fn translate(&mut self, mut node: Node) -> (String, Result<Arc<NodeInfo>, NodeError>) {
        let name = node.metadata.name.clone().unwrap_or_default();
        let info = NodeInfo::from_node(&node).map(Arc::new);
        if name == self.own_name {
            node.metadata.managed_fields = None;
            self.own = Some(node);
        }
        (name, info)
    }

    /// Whether a complete list has been received since start.
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// The nodes the datapath can use.
    pub fn nodes(&self) -> Vec<Arc<NodeInfo>> {
        self.nodes.values().filter_map(|n| n.as_ref().ok()).cloned().collect()
    }

    /// Why the other nodes cannot be used.
    pub fn invalid(&self) -> Vec<NodeError> {
        self.nodes.values().filter_map(|n| n.as_ref().err()).cloned().collect()
    }

    /// One node by name: what it translated to.
    pub fn get(&self, name: &str) -> Option<Result<Arc<NodeInfo>, NodeError>> {
        self.nodes.get(name).cloned()
    }

    /// Why the other nodes cannot be used, by node name.
    pub fn invalid_named(&self) -> Vec<(String, NodeError)> {
        self.nodes.iter().filter_map(|(name, n)| Some((name.clone(), n.as_ref().err()?.clone()))).collect()
    }

    /// Our own Node object, as last seen.
    pub fn own(&self) -> Option<&Node> {
        self.own.as_ref()
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

/// Writes to our own Node, and events about any Node.
#[derive(Clone)]
pub struct Publisher {
    api: Api<Node>,
    name: String,
    recorder: Recorder,
}

impl Publisher {
    pub fn new(client: Client, node_name: &str) -> Self {
        let reporter = Reporter { controller: FIELD_MANAGER.to_owned(), instance: Some(node_name.to_owned()) };
        Self { api: Api::all(client.clone()), name: node_name.to_owned(), recorder: Recorder::new(client, reporter) }
    }

    /// Our Node's name.
    pub fn node_name(&self) -> &str {
        &self.name
    }

    /// Writes what our Node is to say, in one strategic merge patch (one
    /// write, so one echo from the watch): `annotations` (other
    /// annotations are left alone) and, if given, the `NetworkUnavailable`
    /// condition, `False` once the network is up, as flannel does, `True`
    /// with `problem` when it no longer is (merged by condition type, so
    /// kubelet's conditions stay). Through the status subresource, as
    /// flannel does: the node status strategy keeps metadata changes, so
    /// `nodes/status` patch is all the RBAC this needs, and no agent can
    /// change a Node's spec.
    pub async fn publish(
        &self,
        annotations: &BTreeMap<String, String>,
        condition: Option<(NetworkCondition, Option<&str>)>,
    ) -> Result<(), kube::Error> {
        let mut patch = serde_json::json!({});
        if !annotations.is_empty() {
            patch["metadata"] = serde_json::json!({"annotations": annotations});
        }
        if let Some((condition, problem)) = condition {
            let now = k8s_openapi::jiff::Timestamp::now().to_string();
            let (status, reason, message) = match condition {
                NetworkCondition::Available => ("False", NETWORK_UP_REASON, "overlay agent has programmed this node's datapath".to_owned()),
                NetworkCondition::Unavailable => (
                    "True",
                    NETWORK_DOWN_REASON,
                    format!("overlay agent's datapath does not serve this node: {}", problem.unwrap_or("unknown")),
                ),
            };
            patch["status"] = serde_json::json!({"conditions": [{
                "type": "NetworkUnavailable",
                "status": status,
                "reason": reason,
                "message": message,
                "lastTransitionTime": now,
                "lastHeartbeatTime": now,
            }]});
        }
        self.api
            .patch_status(&self.name, &PatchParams::apply(FIELD_MANAGER), &Patch::Strategic(&patch))
            .await
            .map(drop)
    }

    /// Records a warning event about Node `node`, for `kubectl describe node`.
    pub async fn warn(&self, node: &str, reason: &str, note: String) -> Result<(), kube::Error> {
        let reference = ObjectReference {
            api_version: Some(Node::api_version(&()).into_owned()),
            kind: Some(Node::kind(&()).into_owned()),
            name: Some(node.to_owned()),
            // As kubelet records a Node's events: `kubectl describe node`
            // looks them up by the Node's UID or by its name as the UID,
            // and an event with neither is not listed.
            uid: Some(node.to_owned()),
            ..ObjectReference::default()
        };
        let event = K8sEvent {
            type_: EventType::Warning,
            reason: reason.to_owned(),
            note: Some(note),
            action: "Programming".to_owned(),
            secondary: None,
        };
        self.recorder.publish(&event, &reference).await
    }
}

/// What our Node's `NetworkUnavailable` condition is to say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkCondition {
    /// `False`: the network is up.
    Available,
    /// `True`: it is not.
    Unavailable,
}

/// The `NetworkUnavailable` condition to write on `node` for a network
/// that is up (`network_up`) or not, if it does not say so already: up,
/// unless it says `False` for our reason; down, only where it says the
/// network is available (a condition never set, or set `True` by anyone,
/// is left as it is).
pub fn network_condition_update(node: &Node, network_up: bool) -> Option<NetworkCondition> {
    let condition = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .find(|c| c.type_ == "NetworkUnavailable");
    let says_available = condition.is_some_and(|c| c.status == "False");
    let ours = condition.is_some_and(|c| c.reason.as_deref() == Some(NETWORK_UP_REASON));
    match (network_up, says_available) {
        (true, true) if ours => None,
        (true, _) => Some(NetworkCondition::Available),
        (false, true) => Some(NetworkCondition::Unavailable),
        (false, false) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, cidr: &str, ip: &str, heartbeat: &str) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "annotations": {"flannel.alpha.coreos.com/kube-subnet-manager": "true"}},
            "spec": {"podCIDR": cidr},
            "status": {
                "addresses": [{"type": "InternalIP", "address": ip}],
                "conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": heartbeat}],
            },
        }))
        .unwrap()
    }

    #[test]
    fn a_relist_replaces_the_set_and_drops_vanished_nodes() {
        let mut cache = NodeCache::new("a");
        assert!(!cache.handle(watcher::Event::Init));
        assert!(!cache.handle(watcher::Event::InitApply(node("a", "10.244.1.0/24", "192.168.0.1", "2026-01-01T00:00:00Z"))));
        assert!(!cache.handle(watcher::Event::InitApply(node("b", "10.244.2.0/24", "192.168.0.2", "2026-01-01T00:00:00Z"))));
        assert!(!cache.synced());
        assert!(cache.handle(watcher::Event::InitDone));
        assert!(cache.synced());
        assert_eq!(cache.nodes().len(), 2);
        assert!(cache.own().is_some());

        // b vanished while the watch was down: the relist must drop it.
        cache.handle(watcher::Event::Init);
        cache.handle(watcher::Event::InitApply(node("a", "10.244.1.0/24", "192.168.0.1", "2026-01-01T00:00:00Z")));
        assert_eq!(cache.nodes().len(), 2, "the old set serves until the list is complete");
        assert!(cache.handle(watcher::Event::InitDone));
        assert_eq!(cache.nodes().iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), ["a"]);
    }

    #[test]
    fn heartbeats_change_nothing_but_addresses_do() {
        let mut cache = NodeCache::new("a");
        cache.handle(watcher::Event::Init);
        cache.handle(watcher::Event::InitApply(node("b", "10.244.2.0/24", "192.168.0.2", "2026-01-01T00:00:00Z")));
        cache.handle(watcher::Event::InitDone);
        assert!(!cache.handle(watcher::Event::Apply(node("b", "10.244.2.0/24", "192.168.0.2", "2026-01-01T00:00:10Z"))));
        assert!(cache.handle(watcher::Event::Apply(node("b", "10.244.2.0/24", "192.168.0.9", "2026-01-01T00:00:20Z"))));
        assert!(cache.handle(watcher::Event::Delete(node("b", "10.244.2.0/24", "192.168.0.9", "2026-01-01T00:00:30Z"))));
        assert!(!cache.handle(watcher::Event::Delete(node("b", "10.244.2.0/24", "192.168.0.9", "2026-01-01T00:00:30Z"))));
        assert!(cache.is_empty());
    }

    #[test]
    fn the_network_condition_follows_the_datapath_and_leaves_others_alone() {
        let with = |condition: Option<(&str, &str)>| {
            let mut n = node("a", "10.244.1.0/24", "192.168.0.1", "2026-01-01T00:00:00Z");
            if let Some((status, reason)) = condition {
                let c = serde_json::from_value(serde_json::json!({"type": "NetworkUnavailable", "status": status, "reason": reason})).unwrap();
                n.status.as_mut().unwrap().conditions.as_mut().unwrap().push(c);
            }
            n
        };
        let up = |n: &Node| network_condition_update(n, true);
        let down = |n: &Node| network_condition_update(n, false);
        assert_eq!(up(&with(None)), Some(NetworkCondition::Available));
        assert_eq!(up(&with(Some(("True", "NoRouteCreated")))), Some(NetworkCondition::Available));
        assert_eq!(up(&with(Some(("False", "FlannelIsUp")))), Some(NetworkCondition::Available), "ours replaces flannel's");
        assert_eq!(up(&with(Some(("False", NETWORK_UP_REASON)))), None, "already said");
        assert_eq!(down(&with(Some(("False", NETWORK_UP_REASON)))), Some(NetworkCondition::Unavailable));
        assert_eq!(down(&with(Some(("False", "FlannelIsUp")))), Some(NetworkCondition::Unavailable), "no longer true");
        assert_eq!(down(&with(None)), None, "never said available");
        assert_eq!(down(&with(Some(("True", NETWORK_DOWN_REASON)))), None, "already said");
        assert_eq!(down(&with(Some(("True", "NoRouteCreated")))), None);
    }

    #[test]
    fn invalid_nodes_are_kept_with_their_reason() {
        let mut cache = NodeCache::new("a");
        cache.handle(watcher::Event::Init);
        cache.handle(watcher::Event::InitApply(node("bad", "10.244.2.5/24", "192.168.0.2", "2026-01-01T00:00:00Z")));
        cache.handle(watcher::Event::InitDone);
        assert!(cache.nodes().is_empty());
        assert!(cache.invalid()[0].to_string().contains("use 10.244.2.0/24"));
    }
}
