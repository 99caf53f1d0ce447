//! A real Kubernetes control plane for the lab and the tests: etcd
//! (Debian's `etcd-server`), kube-apiserver and kube-controller-manager
//! (built from the Go module proxy by `cargo xtask setup`, at the version in
//! `tests/kubernetes-version.txt`).
//!
//! - etcd listens on loopback only, on free ports, with its own data dir.
//! - kube-apiserver serves TLS (a throwaway CA from `openssl`) on one given
//!   address, authenticates client certificates and ServiceAccount tokens
//!   (its own signing key), authorizes with RBAC only, and refuses
//!   anonymous requests.
//! - kube-controller-manager runs the node IPAM controller
//!   (`node-ipam-controller`, `--allocate-node-cidrs`), which fills
//!   `spec.podCIDR` as in real clusters, and the DaemonSet controller
//!   (`daemonset-controller`), which makes and deletes the daemon pods
//!   each node should run (nothing schedules or runs them: no kubelet, no
//!   scheduler); it serves nothing.
//!
//! Everything runs inside one network namespace when one is given (the
//! lab's underlay, so the nodes reach the API at a private address), else
//! on the caller's loopback. Dropping a [`ControlPlane`] kills and reaps
//! every process and removes its directory.

use std::{
    fs,
    future::Future,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    authentication::v1::{TokenRequest, TokenRequestSpec},
    core::v1::{Node, ServiceAccount},
    events::v1::Event,
};
use kube::{
    Api, Client, Config,
    api::{DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde_json::Value;

use crate::{NetNs, TempDir, lab::ChildGuard};


/// The kubernetes release whose binaries `cargo xtask setup` builds.
pub const KUBERNETES_VERSION: &str = include_str!("../kubernetes-version.txt");
/// The controller-manager's `--cluster-cidr` (flannel's default Network).
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// The API server's `--service-cluster-ip-range`.
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
/// The ServiceAccount issuer and audience of the tokens.
const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// Who the tests and the lab are in `managedFields`.
const FIELD_MANAGER: &str = "overlay-tests";
/// How long the API server may take to become ready (cold, on a loaded
/// 2-CPU machine).
const READY_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error(
        "{path} is missing: `cargo xtask setup` builds kube-apiserver and kube-controller-manager {version} \
         into ~/.cache/overlay (or set OVERLAY_KUBE_BIN_DIR)"
    )]
    MissingBinary { path: String, version: String },
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("{0} did not become ready in time; its log:\n{1}")]
    NotReady(String, String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Kube {
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error("{0}")]
    Other(String),
}

type Result<T, E = ControlPlaneError> = std::result::Result<T, E>;

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ControlPlaneError {
    let what = what.into();
    move |source| ControlPlaneError::Io { what, source }
}

fn kube_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> ControlPlaneError {
    let what = what.into();
    move |source| ControlPlaneError::Kube { what, source }
}

/// Where `cargo xtask setup` put the binaries.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("OVERLAY_KUBE_BIN_DIR") {
        return dir.into();
    }
    crate::overlay_cache().join(format!("kubernetes-{}", KUBERNETES_VERSION.trim())).join("bin")
}

/// A running control plane. Field order is drop order: the
/// controller-manager and the API server stop before etcd, the directory
/// goes last.
pub struct ControlPlane {
    /// Only where a test asks for it ([`ControlPlane::start_scheduler`]).
    scheduler: Option<ChildGuard>,
    controller_manager: Option<ChildGuard>,
    apiserver: Option<ChildGuard>,
    _etcd: ChildGuard,
    runtime: tokio::runtime::Runtime,
    client: Client,
    /// Where the API server listens.
    pub addr: SocketAddr,
    etcd_client_port: u16,
    netns: Option<String>,
    bin: PathBuf,
    /// Certificates, kubeconfigs, etcd's data, logs.
    dir: TempDir,
}

impl ControlPlane {
    /// Starts etcd, the API server on `api_ip` (port 6443 in a namespace of
    /// our own, a free one on the host's loopback) and the
    /// controller-manager, and waits until the API server is ready.
    pub fn start(netns: Option<&NetNs>, api_ip: Ipv4Addr, dir: &Path) -> Result<Self> {
        let bin = bin_dir();
        for name in ["kube-apiserver", "kube-controller-manager"] {
            if !bin.join(name).is_file() {
                return Err(ControlPlaneError::MissingBinary {
                    path: bin.join(name).display().to_string(),
                    version: KUBERNETES_VERSION.trim().to_owned(),
                });
            }
        }
        fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let dir = TempDir::at(dir.to_owned());
        let netns_name = netns.map(|n| n.name().to_owned());
        let port = |ip| free_port(netns_name.as_deref(), ip);
        let api_port = if netns.is_some() { 6443 } else { port(api_ip)? };
        let addr = SocketAddr::from((api_ip, api_port));
        make_certificates(dir.path(), api_ip)?;

        let (etcd_client_port, etcd_peer_port) = (port(Ipv4Addr::LOCALHOST)?, port(Ipv4Addr::LOCALHOST)?);
        let etcd = spawn(
            netns_name.as_deref(),
            Path::new("etcd"),
            &[
                "--name=overlay-test".to_owned(),
                format!("--data-dir={}", dir.path().join("etcd").display()),
                format!("--listen-client-urls=http://127.0.0.1:{etcd_client_port}"),
                format!("--advertise-client-urls=http://127.0.0.1:{etcd_client_port}"),
                format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer_port}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer_port}"),
                format!("--initial-cluster=overlay-test=http://127.0.0.1:{etcd_peer_port}"),
            ],
            &dir.path().join("etcd.log"),
        )?;
        write_kubeconfig(dir.path(), "admin", addr)?;
        write_kubeconfig(dir.path(), "controller-manager", addr)?;
        write_kubeconfig(dir.path(), "scheduler", addr)?;
        let runtime = runtime_in(netns_name.as_deref())?;
        let admin = dir.path().join("admin.kubeconfig");
        let client = block(&runtime, async move {
            let kubeconfig = Kubeconfig::read_from(&admin).map_err(|e| ControlPlaneError::Other(format!("reading {}: {e}", admin.display())))?;
            let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|e| ControlPlaneError::Other(format!("admin kubeconfig: {e}")))?;
            Client::try_from(config).map_err(kube_err("building the admin client"))
        })?;
        let mut plane = Self {
            scheduler: None,
            controller_manager: None,
            apiserver: None,
            _etcd: etcd,
            runtime,
            client,
            addr,
            etcd_client_port,
            netns: netns_name,
            bin,
            dir,
        };
        plane.start_apiserver()?;
        plane.controller_manager = Some(spawn(
            plane.netns.as_deref(),
            &plane.bin.join("kube-controller-manager"),
            &[
                format!("--kubeconfig={}", plane.dir.path().join("controller-manager.kubeconfig").display()),
                "--controllers=node-ipam-controller,daemonset-controller".to_owned(),
                "--allocate-node-cidrs=true".to_owned(),
                format!("--cluster-cidr={CLUSTER_CIDR}"),
                "--node-cidr-mask-size=24".to_owned(),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                "--leader-elect=false".to_owned(),
                // As kubeadm: each controller acts as its own ServiceAccount
                // (node-controller may patch nodes; the CM itself may not).
                "--use-service-account-credentials=true".to_owned(),
                // Serve nothing: nothing here scrapes it.
                "--secure-port=0".to_owned(),
            ],
            &plane.dir.path().join("kube-controller-manager.log"),
        )?);
        Ok(plane)
    }

    /// Starts kube-scheduler, which binds pods to nodes (as in a cluster,
    /// where a DaemonSet's pods are bound by it; the DaemonSet controller
    /// finds its pods on a node by their binding). Nothing runs them.
    pub fn start_scheduler(&mut self) -> Result<()> {
        if !self.bin.join("kube-scheduler").is_file() {
            return Err(ControlPlaneError::MissingBinary {
                path: self.bin.join("kube-scheduler").display().to_string(),
                version: KUBERNETES_VERSION.trim().to_owned(),
            });
        }
        self.scheduler = Some(spawn(
            self.netns.as_deref(),
            &self.bin.join("kube-scheduler"),
            &[
                format!("--kubeconfig={}", self.dir.path().join("scheduler.kubeconfig").display()),
                "--leader-elect=false".to_owned(),
                // Serve nothing: nothing here scrapes it.
                "--secure-port=0".to_owned(),
            ],
            &self.dir.path().join("kube-scheduler.log"),
        )?);
        Ok(())
    }

    /// Starts the API server (again) and waits until `/readyz` says ok.
    pub fn start_apiserver(&mut self) -> Result<()> {
        let d = self.dir.path();
        let file = |name: &str| d.join(name).display().to_string();
        let child = spawn(
            self.netns.as_deref(),
            &self.bin.join("kube-apiserver"),
            &[
                format!("--etcd-servers=http://127.0.0.1:{}", self.etcd_client_port),
                format!("--bind-address={}", self.addr.ip()),
                format!("--advertise-address={}", self.addr.ip()),
                format!("--secure-port={}", self.addr.port()),
                format!("--cert-dir={}", file("certs")),
                format!("--tls-cert-file={}", file("apiserver.crt")),
                format!("--tls-private-key-file={}", file("apiserver.key")),
                format!("--client-ca-file={}", file("ca.crt")),
                format!("--service-account-issuer={ISSUER}"),
                format!("--service-account-key-file={}", file("service-account.pub")),
                format!("--service-account-signing-key-file={}", file("service-account.key")),
                "--authorization-mode=RBAC".to_owned(),
                "--anonymous-auth=false".to_owned(),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                // The tests compact etcd themselves, when they mean to.
                "--etcd-compaction-interval=0".to_owned(),
                "--profiling=false".to_owned(),
                // As kubeadm and every CNI DaemonSet need.
                "--allow-privileged=true".to_owned(),
                // No endpoints for the `kubernetes` Service: nothing here
                // uses it, and the lease reconciler refuses a loopback
                // --advertise-address.
                "--endpoint-reconciler-type=none".to_owned(),
            ],
            &d.join("kube-apiserver.log"),
        )?;
        self.apiserver = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let client = self.client.clone();
            let ready = self.block(async move {
                let request = hyper::Request::get("/readyz").body(Vec::new()).expect("a valid request");
                client.request_text(request).await
            });
            if ready.is_ok_and(|text| text.trim() == "ok") {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.apiserver.as_mut().map(|c| c.0.try_wait()) {
                return Err(ControlPlaneError::NotReady(format!("kube-apiserver (exited {status})"), self.log("kube-apiserver")));
            }
            if Instant::now() > deadline {
                return Err(ControlPlaneError::NotReady("kube-apiserver".to_owned(), self.log("kube-apiserver")));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stops the API server (SIGTERM, then waits): every watch and
    /// connection ends, etcd keeps the state.
    pub fn stop_apiserver(&mut self) {
        if let Some(mut child) = self.apiserver.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.0.id() as i32, libc::SIGTERM) };
            let _ = child.0.wait();
        }
    }

    /// The last 60 lines of a component's log (`etcd`, `kube-apiserver`,
    /// `kube-controller-manager`).
    pub fn log(&self, component: &str) -> String {
        let text = fs::read_to_string(self.dir.path().join(format!("{component}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    /// Runs `future` on the control plane's runtime, whose threads live in
    /// its network namespace (so the client's sockets do too).
    pub fn block<F>(&self, future: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        block(&self.runtime, future)
    }

    /// The admin client (`system:masters`). Use it inside [`Self::block`].
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The API server's version, e.g. `v1.37.2`.
    pub fn version(&self) -> Result<String> {
        let client = self.client();
        self.block(async move { client.apiserver_version().await })
            .map(|info| info.git_version)
            .map_err(kube_err("reading /version"))
    }

    /// etcd's version, as it reports it (`etcd --version`).
    pub fn etcd_version(&self) -> String {
        Command::new("etcd")
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").trim_start_matches("etcd Version: ").to_owned())
            .unwrap_or_else(|e| format!("(etcd --version: {e})"))
    }

    /// Registers a Node as kubelet does: creates it (labels, no pod CIDR),
    /// then writes its status (addresses, `Ready`).
    pub fn register_node(&self, name: &str, ip: Ipv4Addr, annotations: Option<Value>) -> Result<()> {
        let mut node = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}},
        });
        if let Some(annotations) = annotations {
            node["metadata"]["annotations"] = annotations;
        }
        let status = serde_json::json!({"status": {
            "addresses": [{"type": "InternalIP", "address": ip.to_string()}, {"type": "Hostname", "address": name}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet is posting ready status",
                            "lastHeartbeatTime": now(), "lastTransitionTime": now()}],
        }});
        self.apply_node(node)?;
        let api = self.nodes();
        let name = name.to_owned();
        self.block(async move { api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await })
            .map(drop)
            .map_err(kube_err("writing a Node's status"))
    }

    fn nodes(&self) -> Api<Node> {
        Api::all(self.client())
    }

    /// Node `name` as the API server has it.
    pub fn get(&self, name: &str) -> Option<Value> {
        let api = self.nodes();
        let name = name.to_owned();
        self.block(async move { api.get_opt(&name).await })
            .expect("reading a Node")
            .map(|node| serde_json::to_value(node).expect("a Node serialises"))
    }

    /// Creates `node`, or if it exists, merges its metadata and spec into
    /// the stored one; then merges its `status`, if any, as kubelet would.
    pub fn apply_node(&self, node: Value) -> Result<()> {
        let mut node = node;
        let name = node["metadata"]["name"].as_str().ok_or_else(|| ControlPlaneError::Other("a Node without a name".into()))?.to_owned();
        if let Some(meta) = node["metadata"].as_object_mut() {
            for key in ["resourceVersion", "uid", "creationTimestamp", "managedFields"] {
                meta.remove(key);
            }
        }
        let status = node.as_object_mut().and_then(|o| o.remove("status"));
        let api = self.nodes();
        let (n, object) = (name.clone(), node.clone());
        let created = self.block(async move {
            let typed: Node = serde_json::from_value(object).expect("a valid Node");
            api.create(&PostParams::default(), &typed).await
        });
        match created {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 409 => {
                let api = self.nodes();
                self.block(async move { api.patch(&n, &PatchParams::default(), &Patch::Merge(&node)).await })
                    .map_err(kube_err(format!("updating Node {name}")))?;
            }
            Err(e) => return Err(kube_err(format!("creating Node {name}"))(e)),
        }
        if let Some(status) = status.filter(|s| !s.is_null()) {
            let api = self.nodes();
            let patch = serde_json::json!({"status": status});
            let n = name.clone();
            self.block(async move { api.patch_status(&n, &PatchParams::default(), &Patch::Merge(&patch)).await })
                .map_err(kube_err(format!("writing Node {name}'s status")))?;
        }
        Ok(())
    }

    /// The nodes the daemon pods labelled `app=<app>` in `namespace` are
    /// for, sorted: a DaemonSet's pods name their node in `nodeName` once
    /// bound, and in a node-affinity term on `metadata.name` from their
    /// making (what the DaemonSet controller itself goes by).
    pub fn daemon_pod_nodes(&self, namespace: &str, app: &str) -> Vec<String> {
        let api: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(self.client(), namespace);
        let params = ListParams::default().labels(&format!("app={app}"));
        let pods = self.block(async move { api.list(&params).await }).expect("listing pods");
        let mut nodes: Vec<String> = pods
            .items
            .into_iter()
            .filter(|pod| pod.metadata.deletion_timestamp.is_none())
            .filter_map(|pod| {
                let pod = serde_json::to_value(pod).expect("a Pod serialises");
                pod["spec"]["nodeName"].as_str().map(str::to_owned).or_else(|| {
                    let terms = &pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"];
                    terms.as_array()?.iter().flat_map(|t| t["matchFields"].as_array().cloned().unwrap_or_default()).find_map(|f| {
                        (f["key"] == "metadata.name").then(|| f["values"][0].as_str().map(str::to_owned)).flatten()
                    })
                })
            })
            .collect();
        nodes.sort();
        nodes
    }

    /// Removes every pod being deleted in `namespace`, as the kubelet does
    /// once the pod's containers have stopped (its final delete, with no
    /// grace period). There is no kubelet here (no container runtime), so
    /// without this a deleted daemon pod would be terminating for ever,
    /// and its DaemonSet would never make another on its node.
    pub fn finish_pod_deletions(&self, namespace: &str) {
        let api: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(self.client(), namespace);
        self.block(async move {
            let pods = api.list(&ListParams::default()).await.expect("listing pods");
            for pod in pods.items.into_iter().filter(|p| p.metadata.deletion_timestamp.is_some()) {
                let name = pod.metadata.name.unwrap_or_default();
                // Gone already (another delete won) is as good.
                let _ = api.delete(&name, &DeleteParams::default().grace_period(0)).await;
            }
        });
    }

    /// Sets (`Some`) or removes (`None`) label `key` on Node `name`, as
    /// `kubectl label` does.
    pub fn label_node(&self, name: &str, key: &str, value: Option<&str>) -> Result<()> {
        let api = self.nodes();
        let patch = serde_json::json!({"metadata": {"labels": {key: value}}});
        let n = name.to_owned();
        self.block(async move { api.patch(&n, &PatchParams::default(), &Patch::Merge(&patch)).await })
            .map(drop)
            .map_err(kube_err(format!("labelling Node {name}")))
    }

    /// Applies a strategic merge patch to DaemonSet `namespace/name`, as
    /// `kubectl patch daemonset --type=strategic` does.
    pub fn patch_daemonset(&self, namespace: &str, name: &str, patch: &Value) -> Result<()> {
        let api: Api<k8s_openapi::api::apps::v1::DaemonSet> = Api::namespaced(self.client(), namespace);
        let (n, patch) = (name.to_owned(), patch.clone());
        self.block(async move { api.patch(&n, &PatchParams::default(), &Patch::Strategic(patch)).await })
            .map(drop)
            .map_err(kube_err(format!("patching DaemonSet {namespace}/{name}")))
    }

    /// Deletes Node `name`; returns it as it was.
    pub fn delete(&self, name: &str) -> Option<Value> {
        let before = self.get(name)?;
        let api = self.nodes();
        let name = name.to_owned();
        self.block(async move { api.delete(&name, &DeleteParams::default()).await }).expect("deleting a Node");
        Some(before)
    }

    /// Waits until every Node in `names` has a pod CIDR from the
    /// controller-manager; returns them in that order.
    pub fn wait_for_pod_cidrs(&self, names: &[String], timeout: Duration) -> Result<Vec<String>> {
        let deadline = Instant::now() + timeout;
        loop {
            let cidrs: Vec<Option<String>> =
                names.iter().map(|n| self.get(n).and_then(|node| node["spec"]["podCIDR"].as_str().map(str::to_owned))).collect();
            if cidrs.iter().all(Option::is_some) {
                return Ok(cidrs.into_iter().flatten().collect());
            }
            if Instant::now() > deadline {
                return Err(ControlPlaneError::NotReady(
                    format!("pod CIDRs from kube-controller-manager ({cidrs:?} for {names:?})"),
                    self.log("kube-controller-manager"),
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every event (events.k8s.io/v1) in every namespace.
    pub fn events(&self) -> Vec<Value> {
        let api: Api<Event> = Api::all(self.client());
        self.block(async move { api.list(&ListParams::default()).await })
            .expect("listing events")
            .items
            .into_iter()
            .map(|e| serde_json::to_value(e).expect("an Event serialises"))
            .collect()
    }

    /// The reasons of the events about Node `name` that `kubectl describe
    /// node` shows: it asks the core API for events whose `involvedObject`
    /// is the Node by name, with the Node's UID or, as kubelet records
    /// them, its name as the UID.
    pub fn node_event_reasons_as_kubectl_describe_lists_them(&self, name: &str) -> Vec<String> {
        let api: Api<k8s_openapi::api::core::v1::Event> = Api::all(self.client());
        let fields = format!("involvedObject.kind=Node,involvedObject.name={name},involvedObject.uid={name}");
        self.block(async move { api.list(&ListParams::default().fields(&fields)).await })
            .expect("listing events")
            .items
            .into_iter()
            .filter_map(|e| e.reason)
            .collect()
    }

    /// Server-side applies every object of a multi-document manifest whose
    /// kind is in `kinds` (all of them when empty), for real or as a
    /// dry run; returns what the server answered, per object.
    pub fn apply_manifest(&self, path: &Path, kinds: &[&str], dry_run: bool) -> Result<Vec<Value>> {
        let text = fs::read_to_string(path).map_err(io_err(format!("reading {}", path.display())))?;
        let mut answers = Vec::new();
        for document in serde_norway::Deserializer::from_str(&text) {
            let object: Value = serde::Deserialize::deserialize(document)
                .map_err(|e| ControlPlaneError::Other(format!("{}: not YAML: {e}", path.display())))?;
            if object.is_null() {
                continue;
            }
            let kind = object["kind"].as_str().unwrap_or_default().to_owned();
            if !kinds.is_empty() && !kinds.contains(&kind.as_str()) {
                continue;
            }
            let client = self.client();
            let what = format!("applying {kind} {} from {}", object["metadata"]["name"], path.display());
            let answer = self.block(async move {
                let api_version = object["apiVersion"].as_str().unwrap_or_default();
                let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
                let gvk = GroupVersionKind::gvk(group, version, &kind);
                let (resource, capabilities) = kube::discovery::pinned_kind(&client, &gvk).await?;
                let name = object["metadata"]["name"].as_str().unwrap_or_default().to_owned();
                let api: Api<DynamicObject> = match object["metadata"]["namespace"].as_str() {
                    Some(ns) if capabilities.scope == kube::discovery::Scope::Namespaced => Api::namespaced_with(client, ns, &resource),
                    _ => Api::all_with(client, &resource),
                };
                // Strict: a field the server does not know is an error, not a warning.
                let mut params = PatchParams::apply(FIELD_MANAGER).force().validation(kube::api::ValidationDirective::Strict);
                params.dry_run = dry_run;
                api.patch(&name, &params, &Patch::Apply(&object)).await
            });
            let answer = answer.map_err(kube_err(what))?;
            answers.push(serde_json::to_value(answer).expect("an object serialises"));
        }
        Ok(answers)
    }

    /// A token for ServiceAccount `namespace/name` (a TokenRequest, valid
    /// for a day), as the kubelet mounts into a pod.
    pub fn service_account_token(&self, namespace: &str, name: &str) -> Result<String> {
        let api: Api<ServiceAccount> = Api::namespaced(self.client(), namespace);
        let name = name.to_owned();
        let request = TokenRequest {
            spec: TokenRequestSpec { audiences: vec![ISSUER.to_owned()], expiration_seconds: Some(86_400), ..Default::default() },
            ..Default::default()
        };
        self.block(async move { api.create_token_request(&name, &PostParams::default(), &request).await })
            .map_err(kube_err("requesting a ServiceAccount token"))?
            .status
            .map(|s| s.token)
            .ok_or_else(|| ControlPlaneError::Other("the TokenRequest came back without a token".into()))
    }

    /// A client authenticating with `token` (a ServiceAccount's), to use
    /// inside [`Self::block`].
    pub fn token_client(&self, token: &str) -> Result<Client> {
        let path = self.dir.path().join(format!("token-{}.kubeconfig", crate::unique_name("t")));
        self.write_token_kubeconfig(&path, token)?;
        self.block(async move {
            let kubeconfig = Kubeconfig::read_from(&path).map_err(|e| ControlPlaneError::Other(format!("reading {}: {e}", path.display())))?;
            let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|e| ControlPlaneError::Other(format!("token kubeconfig: {e}")))?;
            Client::try_from(config).map_err(kube_err("building a token client"))
        })
    }

    /// Writes something other than a Node (a ConfigMap), so etcd's revision
    /// moves past what the Node watchers have seen.
    pub fn touch(&self) -> Result<()> {
        let api: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(self.client(), "default");
        let object = serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "overlay-tests-touch"},
            "data": {"at": now()},
        });
        self.block(async move { api.patch("overlay-tests-touch", &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&object)).await })
            .map(drop)
            .map_err(kube_err("writing a ConfigMap"))
    }

    /// Writes a kubeconfig that authenticates with `token` to `path`.
    pub fn write_token_kubeconfig(&self, path: &Path, token: &str) -> Result<()> {
        let ca = self.dir.path().join("ca.crt");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: https://{}\n    certificate-authority: {}\nusers:\n- name: token\n  user:\n    token: {token}\ncontexts:\n- name: lab\n  context: {{cluster: lab, user: token}}\ncurrent-context: lab\n",
            self.addr,
            ca.display()
        );
        fs::write(path, text).map_err(io_err(format!("writing {}", path.display())))
    }

    /// Compacts etcd's history up to its current revision (what the API
    /// server does every 5 minutes by default): resourceVersions before it
    /// are gone. Returns the revision.
    pub fn compact_etcd(&self) -> Result<u64> {
        let _inside = self.netns.as_ref().map(|n| crate::enter_netns(n));
        // Any range request answers with the current revision.
        let range = etcd_post(self.etcd_client_port, "/v3/kv/range", r#"{"key":"AA=="}"#)?;
        let revision: u64 = range["header"]["revision"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .ok_or_else(|| ControlPlaneError::Other(format!("etcd named no revision: {range}")))?;
        etcd_post(self.etcd_client_port, "/v3/kv/compaction", &format!(r#"{{"revision":"{revision}","physical":true}}"#))?;
        Ok(revision)
    }
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

/// A tokio runtime whose threads all enter `netns` first.
fn runtime_in(netns: Option<&str>) -> Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(1).enable_all();
    if let Some(netns) = netns {
        let path = format!("/run/netns/{netns}");
        builder.on_thread_start(move || {
            let target = fs::File::open(&path).expect("opening the control plane's netns");
            // SAFETY: a valid namespace fd; setns only affects this thread.
            let rc = unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        });
    }
    builder.build().map_err(io_err("building the control plane's runtime"))
}

fn block<F>(runtime: &tokio::runtime::Runtime, future: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    // Spawned, so it runs on a worker thread (in the namespace), not here.
    runtime.block_on(runtime.spawn(future)).expect("the control plane's task panicked")
}

/// A port nobody listens on at `ip` (inside `netns`).
fn free_port(netns: Option<&str>, ip: Ipv4Addr) -> Result<u16> {
    let _inside = netns.map(crate::enter_netns);
    let listener = TcpListener::bind((ip, 0)).map_err(io_err(format!("finding a free port on {ip}")))?;
    Ok(listener.local_addr().map_err(io_err("reading a bound port"))?.port())
}

/// Starts `program` (inside `netns`), its output appended to `log`.
fn spawn(netns: Option<&str>, program: &Path, args: &[String], log: &Path) -> Result<ChildGuard> {
    let log = fs::OpenOptions::new().create(true).append(true).open(log).map_err(io_err(format!("opening {}", log.display())))?;
    let mut command = match netns {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{ns}")).arg(program);
            c
        }
        None => Command::new(program),
    };
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(io_err("duplicating a log file"))?)
        .stderr(log)
        .spawn()
        .map(ChildGuard)
        .map_err(io_err(format!("starting {}", program.display())))
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl").args(args).current_dir(dir).output().map_err(io_err("running openssl"))?;
    if !out.status.success() {
        return Err(ControlPlaneError::Command {
            what: format!("openssl {}", args.join(" ")),
            detail: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(())
}

/// A throwaway CA; the API server's serving certificate (for `api_ip`);
/// client certificates for the admin (`system:masters`), the
/// controller-manager and the scheduler; the ServiceAccount signing key.
fn make_certificates(dir: &Path, api_ip: Ipv4Addr) -> Result<()> {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=overlay-test-ca", "-keyout", "ca.key", "-out", "ca.crt"];
    ca.extend(ec);
    openssl(dir, &ca)?;
    let san = format!("subjectAltName=IP:{api_ip},IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc");
    let leaves = [
        ("apiserver", "/CN=kube-apiserver", "extendedKeyUsage=serverAuth", Some(san.as_str())),
        ("admin", "/O=system:masters/CN=overlay-admin", "extendedKeyUsage=clientAuth", None),
        ("controller-manager", "/CN=system:kube-controller-manager", "extendedKeyUsage=clientAuth", None),
        ("scheduler", "/CN=system:kube-scheduler", "extendedKeyUsage=clientAuth", None),
    ];
    for (name, subject, usage, san) in leaves {
        let (key, csr, crt) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.crt"));
        let mut req = vec!["req", "-new", "-subj", subject, "-keyout", &key, "-out", &csr, "-addext", usage];
        req.extend(ec);
        if let Some(san) = san {
            req.extend(["-addext", san]);
        }
        openssl(dir, &req)?;
        openssl(
            dir,
            &["x509", "-req", "-in", &csr, "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2", "-copy_extensions", "copy", "-out", &crt],
        )?;
    }
    openssl(dir, &["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-out", "service-account.key"])?;
    openssl(dir, &["pkey", "-in", "service-account.key", "-pubout", "-out", "service-account.pub"])
}

/// `<dir>/<user>.kubeconfig`, authenticating with `<user>.crt`.
fn write_kubeconfig(dir: &Path, user: &str, addr: SocketAddr) -> Result<()> {
    let path = |name: &str| dir.join(name).display().to_string();
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: https://{addr}\n    certificate-authority: {ca}\nusers:\n- name: {user}\n  user:\n    client-certificate: {crt}\n    client-key: {key}\ncontexts:\n- name: lab\n  context: {{cluster: lab, user: {user}}}\ncurrent-context: lab\n",
        ca = path("ca.crt"),
        crt = path(&format!("{user}.crt")),
        key = path(&format!("{user}.key")),
    );
    let file = dir.join(format!("{user}.kubeconfig"));
    fs::write(&file, text).map_err(io_err(format!("writing {}", file.display())))
}

/// A POST to etcd's JSON gateway on loopback; the answer's JSON.
fn etcd_post(port: u16, path: &str, body: &str) -> Result<Value> {
    let what = format!("etcd {path}");
    let mut conn = TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, port).into(), Duration::from_secs(5)).map_err(io_err(what.clone()))?;
    conn.set_read_timeout(Some(Duration::from_secs(10))).map_err(io_err(what.clone()))?;
    write!(
        conn,
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(io_err(what.clone()))?;
    let mut response = String::new();
    conn.read_to_string(&mut response).map_err(io_err(what.clone()))?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    if !head.starts_with("HTTP/1.1 200") {
        return Err(ControlPlaneError::Other(format!("{what}: {head}\n{body}")));
    }
    // The gateway answers in one piece or chunked; the JSON is the part
    // between the first `{` and the last `}`.
    let json = body.find('{').and_then(|start| body.rfind('}').map(|end| &body[start..=end])).unwrap_or("");
    serde_json::from_str(json).map_err(|e| ControlPlaneError::Other(format!("{what}: not JSON ({e}): {body}")))
}
