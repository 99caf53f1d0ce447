//! The etcd node source, as flanneld's etcd subnet manager
//! (`pkg/subnet/etcd/` in flannel v0.28.10): the network config at
//! `<prefix>/config`, one lease per node at `<prefix>/subnets/a.b.c.d-NN`
//! holding `{"PublicIP":…,"PublicIPv6":null,"BackendType":"vxlan",
//! "BackendData":{"VNI":1,"VtepMAC":…}}` attached to an etcd lease of 24 h.
//!
//! Our own lease is acquired and renewed exactly as flanneld does it, so
//! flanneld nodes see us and we see them: reuse the lease that carries our
//! PublicIP, else the subnet in our previous subnet.env, else a random one of
//! the first 100 free subnets between SubnetMin and SubnetMax, created only
//! if the key does not exist yet (a transaction on its revision); renewal
//! grants a fresh 24 h lease and re-puts the value 60 min before expiry.
//! Where flanneld exits when its lease is deleted, we put it back: the
//! datapath must not stop. But only while the key is free or still ours
//! (its PublicIP ours; a transaction on the revision we read): a subnet
//! another node took once ours was gone is never overwritten, and the
//! source stops with [`EtcdSourceError::SubnetTaken`], as flanneld would.
//! No free subnet for us stops it too ([`EtcdSourceError::OutOfSubnets`]),
//! as flanneld exits.
//!
//! Every lease (ours included) becomes a Node object and goes through the
//! one Node → [`NodeInfo`] translation, so the same validation and
//! rejection rules apply. A watch from the listed revision follows the
//! changes (expired leases arrive as deletes) and resumes from the last
//! revision seen after a disconnect; while etcd is unreachable the agent
//! keeps the datapath as it is.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity, PutOptions, TlsOptions,
    Txn, TxnOp, WatchOptions,
};
use ipnetwork::Ipv4Network;
use k8s_openapi::api::core::v1::Node;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    netconf::{self, NetConf},
    node::{self, NodeError, NodeInfo},
    report::Chain,
};

/// flanneld's `--etcd-prefix` default.
pub const DEFAULT_PREFIX: &str = "/coreos.com/network";
/// flanneld's `subnetTTL`.
pub const LEASE_TTL: Duration = Duration::from_secs(24 * 3600);
/// flanneld's `--subnet-lease-renew-margin` default (60 minutes).
pub const RENEW_MARGIN: Duration = Duration::from_secs(3600);
/// flanneld's `raceRetries`: attempts to create a subnet another node may
/// take at the same moment.
const RACE_RETRIES: usize = 10;
/// flanneld picks at random among at most this many free subnets.
const CANDIDATES: usize = 100;
/// Pause between attempts while etcd is unreachable.
const RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum EtcdSourceError {
    #[error("reading --etcd-{what} {path}")]
    TlsFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--etcd-certfile and --etcd-keyfile go together; give both or neither")]
    HalfIdentity,
    #[error("connecting to etcd at {endpoints}")]
    Connect {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("etcd request")]
    Request(#[from] etcd_client::Error),
    #[error("no network config at {key}: put flannel's net-conf JSON there, e.g. etcdctl put {key} '{{\"Network\":\"10.244.0.0/16\",\"Backend\":{{\"Type\":\"vxlan\"}}}}'")]
    NoConfig { key: String },
    #[error("{key}: {reason}")]
    BadConfig { key: String, reason: String },
    #[error("no free /{len} subnet left between SubnetMin {min} and SubnetMax {max}: other nodes lease them all; stopping as flanneld does. Remove a stale lease (etcdctl del <prefix>/subnets/<subnet>) or widen Network, SubnetMin or SubnetMax in the net-conf, then start the agent again")]
    OutOfSubnets { len: u8, min: Ipv4Addr, max: Ipv4Addr },
    #[error("other nodes took the subnet we picked {RACE_RETRIES} times in a row")]
    Race,
    #[error("our subnet lease {lease} now belongs to another node (PublicIP {holder}); not overwriting it, and stopping as flanneld does. Restarted, the agent acquires a free subnet; pods on this node keep addresses of the lost one until they are recreated")]
    SubnetTaken { lease: String, holder: String },
}

/// Why a lease in etcd cannot be used (it is reported; its node keeps what
/// was last read of it, or stays out if it never could be read).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    #[error("{key}: not a subnet key (flannel's a.b.c.d-NN)")]
    BadKey { key: String },
    #[error("{key}: value is not a JSON object of flannel lease attributes: {reason}")]
    BadValue { key: String, reason: String },
    #[error("{key}: no PublicIP")]
    NoPublicIp { key: String },
    #[error("lease {key}")]
    Node {
        key: String,
        #[source]
        source: NodeError,
    },
}

/// How to reach etcd (flanneld's `--etcd-*` flags).
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl EtcdOptions {
    /// An `https://` endpoint: the agent expects etcd to speak TLS.
    fn https(&self) -> bool {
        self.endpoints.iter().any(|e| e.starts_with("https://"))
    }

    /// What explains a failure to talk to etcd with these options.
    pub fn failure_hints(&self) -> FailureHints {
        FailureHints { https: self.https(), client_cert: self.cert_file.is_some() }
    }
}

/// What a failure to talk to etcd means and what to do about it, where the
/// agent can tell: a warning's `hint`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FailureHints {
    https: bool,
    /// The agent has a client certificate (`--etcd-certfile`).
    client_cert: bool,
}

impl FailureHints {
    /// For any failure: a TLS failure's meaning ([`tls_diagnosis`]).
    pub fn hint(self, err: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
        tls_diagnosis(err, self.client_cert)
    }

    /// Before etcd has answered at all. Over TLS 1.3 a server that refuses
    /// the client's certificate closes the connection after the handshake,
    /// often before its alert is read: a connection closed by every
    /// endpoint before any answer, with TLS on, is most likely that.
    pub fn hint_before_any_answer(self, err: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
        let closed = || {
            let text = Chain(err).to_string().to_lowercase();
            ["connection closed", "connection reset", "broken pipe"].iter().any(|c| text.contains(c))
        };
        self.hint(err).or_else(|| (self.https && closed()).then_some(
            "etcd closed the TLS connection before answering: where it requires client certificates (--client-cert-auth), give one signed by a CA in its --trusted-ca-file with --etcd-certfile and --etcd-keyfile",
        ))
    }
}

/// The network config as flanneld completes it: net-conf plus the range
/// leases are taken from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    pub net_conf: NetConf,
    pub subnet_min: Ipv4Addr,
    pub subnet_max: Ipv4Addr,
}

impl NetworkConfig {
    /// Parses `<prefix>/config` and fills SubnetMin/SubnetMax as flannel's
    /// `CheckNetworkConfig` does.
    pub fn parse(text: &str) -> Result<Self, String> {
        let net_conf = NetConf::parse_text(text)?;
        let raw = netconf::lowercase_keys(serde_json::from_str(text).map_err(|e| e.to_string())?);
        if net_conf.subnet_len < net_conf.network.prefix() + 2 {
            return Err("network must be able to accommodate at least four subnets (SubnetLen ≥ Network prefix + 2)".into());
        }
        let size = 1u32 << (32 - net_conf.subnet_len);
        let mask = u32::MAX << (32 - net_conf.subnet_len);
        let network = net_conf.network.network().to_bits();
        let last = network | !u32::MAX.checked_shl(32 - u32::from(net_conf.network.prefix())).unwrap_or(0);
        let bound = |field: &str, default: u32| -> Result<Ipv4Addr, String> {
            let Some(value) = raw.get(field) else { return Ok(Ipv4Addr::from(default)) };
            let text = value.as_str().ok_or_else(|| format!("{field} is not a string"))?;
            let ip: Ipv4Addr = text.parse().map_err(|_| format!("{field} {text:?} is not an IPv4 address"))?;
            if !net_conf.network.contains(ip) {
                return Err(format!("{field} {ip} is not in the range of the Network {}", net_conf.network));
            }
            if ip.to_bits() & mask != ip.to_bits() {
                return Err(format!("{field} {ip} is not on a SubnetLen boundary"));
            }
            Ok(ip)
        };
        let subnet_min = bound("subnetmin", network + size)?;
        let subnet_max = bound("subnetmax", last + 1 - size)?;
        if subnet_min > subnet_max {
            // No subnet to lease; flanneld would say every one is taken.
            return Err(format!("SubnetMin {subnet_min} is above SubnetMax {subnet_max}, so no subnet can be leased: set SubnetMin at or below SubnetMax"));
        }
        Ok(Self { net_conf, subnet_min, subnet_max })
    }

    fn compatible(&self, subnet: Ipv4Network) -> bool {
        subnet.prefix() == self.net_conf.subnet_len
            && (self.subnet_min..=self.subnet_max).contains(&subnet.network())
    }
}

/// How often the connection to etcd is pinged. No more often than etcd's
/// `--grpc-keepalive-min-time` (5 s by default) allows: etcd answers
/// pings that come faster with GOAWAY (`too_many_pings`) and closes the
/// connection, every watch and request on it failing every few seconds.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a ping may go unanswered before the connection is dropped.
pub const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects (lazily: requests fail, and are retried, while etcd is down).
pub async fn connect(options: &EtcdOptions) -> Result<Client, EtcdSourceError> {
    let read = |what, path: &Path| {
        std::fs::read(path).map_err(|source| EtcdSourceError::TlsFile { what, path: path.to_owned(), source })
    };
    // Keepalives notice a silent member (cut off, not dead: a dead one's
    // connection is reset at once) within KEEP_ALIVE_INTERVAL +
    // KEEP_ALIVE_TIMEOUT, so the watch moves on to another endpoint;
    // require-leader cancels a watch on a member cut off from the quorum,
    // which would otherwise go silent.
    let mut connect = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_keep_alive(KEEP_ALIVE_INTERVAL, KEEP_ALIVE_TIMEOUT)
        .with_keep_alive_while_idle(true)
        .with_require_leader(true);
    // Any TLS file asks for TLS, so a lone --etcd-keyfile is refused
    // below rather than ignored.
    if options.https() || options.ca_file.is_some() || options.cert_file.is_some() || options.key_file.is_some() {
        let mut config = TlsOptions::new();
        if let Some(ca) = &options.ca_file {
            config = config.ca_certificate(Certificate::from_pem(read("cafile", ca)?));
        }
        match (&options.cert_file, &options.key_file) {
            (Some(cert), Some(key)) => config = config.identity(Identity::from_pem(read("certfile", cert)?, read("keyfile", key)?)),
            (None, None) => {}
            _ => return Err(EtcdSourceError::HalfIdentity),
        }
        connect = connect.with_tls(config);
    }
    Client::connect(&options.endpoints, Some(connect))
        .await
        .map_err(|source| EtcdSourceError::Connect { endpoints: options.endpoints.join(","), source })
}

/// The TLS alerts with which etcd refuses the agent's client certificate
/// (or its absence).
const REFUSAL_ALERTS: [rustls::AlertDescription; 7] = {
    use rustls::AlertDescription as A;
    [A::BadCertificate, A::CertificateRequired, A::UnknownCA, A::CertificateUnknown, A::CertificateExpired, A::CertificateRevoked, A::AccessDenied]
};

/// What a TLS failure talking to etcd means and what to do, where it is
/// one: the server's certificate not trusted, or ours refused. Read from
/// the TLS library's own error in `err`'s chain. `client_cert` says
/// whether the agent has a client certificate (`--etcd-certfile`).
fn tls_diagnosis(err: &(dyn std::error::Error + 'static), client_cert: bool) -> Option<&'static str> {
    use rustls::Error as E;
    let mut cause = Some(err);
    while let Some(e) = cause {
        let tls = e
            .downcast_ref::<E>()
            .or_else(|| e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()).and_then(|inner| inner.downcast_ref::<E>()));
        match tls {
            Some(E::InvalidCertificate(_)) => {
                return Some("etcd's server certificate is not one the agent trusts: give the CA that signed it with --etcd-cafile (flanneld's --etcd-cafile), and an endpoint address or name the certificate names");
            }
            Some(E::AlertReceived(alert)) if REFUSAL_ALERTS.contains(alert) => return Some(client_certificate_refused(client_cert)),
            _ => {}
        }
        // The same alert, met while reading, reaches us as text only (an
        // io::Error around rustls's message, which names it as Debug does).
        let text = e.to_string();
        if let Some(alert) = text.split("received fatal alert: ").nth(1)
            && REFUSAL_ALERTS.iter().any(|refusal| alert.starts_with(&format!("{refusal:?}")))
        {
            return Some(client_certificate_refused(client_cert));
        }
        // etcd-client's error names no source: what failed below a gRPC
        // status or the transport is reached through them.
        cause = match e.downcast_ref::<etcd_client::Error>() {
            Some(etcd_client::Error::GRpcStatus(status)) => Some(status as &(dyn std::error::Error + 'static)),
            Some(etcd_client::Error::TransportError(transport)) => Some(transport as &(dyn std::error::Error + 'static)),
            _ => e.source(),
        };
    }
    None
}

fn client_certificate_refused(client_cert: bool) -> &'static str {
    if client_cert {
        "etcd refused the agent's client certificate: --etcd-certfile must be signed by a CA in etcd's --trusted-ca-file, and current"
    } else {
        "etcd requires a client certificate: give one signed by a CA in etcd's --trusted-ca-file with --etcd-certfile and --etcd-keyfile"
    }
}

/// Connects and reads the network config, waiting (as flanneld does) while
/// etcd is unreachable or the config is not written yet; a config that is
/// there but wrong is an error.
pub async fn connect_and_read_config(options: &EtcdOptions) -> Result<(Client, NetworkConfig), EtcdSourceError> {
    let mut client = connect(options).await?;
    loop {
        match read_config(&mut client, &options.prefix).await {
            Ok(config) => {
                info!(endpoints = %options.endpoints.join(","), prefix = %options.prefix, subnet_min = %config.subnet_min, subnet_max = %config.subnet_max, "read the network config from etcd");
                return Ok((client, config));
            }
            Err(err @ EtcdSourceError::BadConfig { .. }) => return Err(err),
            Err(err) => {
                let hint = options.failure_hints().hint_before_any_answer(&err);
                warn!(error = %Chain(&err), hint, "waiting for etcd's network config");
            }
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// Reads `<prefix>/config`.
pub async fn read_config(client: &mut Client, prefix: &str) -> Result<NetworkConfig, EtcdSourceError> {
    let key = format!("{prefix}/config");
    let response = client.get(key.as_str(), None).await?;
    let kv = response.kvs().first().ok_or_else(|| EtcdSourceError::NoConfig { key: key.clone() })?;
    let text = String::from_utf8_lossy(kv.value());
    NetworkConfig::parse(&text).map_err(|reason| EtcdSourceError::BadConfig { key, reason })
}

/// flannel's key for a subnet: `a.b.c.d-NN`.
pub fn subnet_key(subnet: Ipv4Network) -> String {
    format!("{}-{}", subnet.network(), subnet.prefix())
}

/// The IPv4 subnet in a lease key (`a.b.c.d-NN`, optionally followed by
/// flannel's `&<IPv6 subnet>`, which we do not serve).
pub fn parse_subnet_key(name: &str) -> Option<Ipv4Network> {
    let v4 = name.split('&').next()?;
    let (ip, prefix) = v4.rsplit_once('-')?;
    Ipv4Network::new(ip.parse().ok()?, prefix.parse().ok()?).ok()
}

/// A lease (its key's last component and its value) as a Node object,
/// translated by [`NodeInfo::from_node`]: the subnet is its pod CIDR, the
/// attributes are flannel's annotations.
pub fn lease_to_node(name: &str, key_name: &str, value: &[u8]) -> Result<NodeInfo, LeaseError> {
    let key = key_name.to_owned();
    let subnet = key_name.split('&').next().unwrap_or_default();
    let (ip, prefix) = subnet.rsplit_once('-').ok_or_else(|| LeaseError::BadKey { key: key.clone() })?;
    if ip.parse::<Ipv4Addr>().is_err() || prefix.parse::<u8>().is_err() {
        return Err(LeaseError::BadKey { key });
    }
    let bad = |reason: String| LeaseError::BadValue { key: key.clone(), reason };
    let value: serde_json::Value = serde_json::from_slice(value).map_err(|e| bad(e.to_string()))?;
    if !value.is_object() {
        return Err(bad("not an object".into()));
    }
    // Go's JSON decoding matches keys case-insensitively.
    let attrs = netconf::lowercase_keys(value);
    let public_ip = attrs
        .get("publicip")
        .and_then(|v| v.as_str())
        .ok_or_else(|| LeaseError::NoPublicIp { key: key.clone() })?;
    let mut annotations = BTreeMap::from([
        (node::ANNOTATION_PUBLIC_IP.to_owned(), public_ip.to_owned()),
        (node::ANNOTATION_KUBE_SUBNET_MANAGER.to_owned(), "true".to_owned()),
    ]);
    if let Some(kind) = attrs.get("backendtype").and_then(|v| v.as_str()) {
        annotations.insert(node::ANNOTATION_BACKEND_TYPE.to_owned(), kind.to_owned());
    }
    if let Some(data) = attrs.get("backenddata").filter(|d| !d.is_null()) {
        // flanneld cannot decode such a lease's attributes either; read
        // as missing keys, it would have programmed the peer with a VTEP
        // MAC made up from its address and no VNI.
        if !data.is_object() {
            return Err(bad(format!("BackendData is {data}, not an object like {{\"VNI\":1,\"VtepMAC\":\"12:c6:65:89:b4:e3\"}}")));
        }
        // Back to flannel's own key spelling for the annotation's parser.
        let data = serde_json::json!({
            "VNI": data.get("VNI").or_else(|| data.get("vni")),
            "VtepMAC": data.get("VtepMAC").or_else(|| data.get("vtepmac")).or_else(|| data.get("VtepMac")),
        });
        annotations.insert(node::ANNOTATION_BACKEND_DATA.to_owned(), data.to_string());
    }
    let node: Node = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"podCIDR": format!("{ip}/{prefix}")},
    }))
    .map_err(|e| bad(e.to_string()))?;
    NodeInfo::from_node(&node).map_err(|source| LeaseError::Node { key, source })
}

impl LeaseError {
    /// The lease's key (its last component, `a.b.c.d-NN`).
    pub fn key(&self) -> &str {
        match self {
            Self::BadKey { key } | Self::BadValue { key, .. } | Self::NoPublicIp { key } | Self::Node { key, .. } => key,
        }
    }
}

/// The lease value flanneld writes (`json.Marshal(LeaseAttrs)`).
pub fn lease_value(public_ip: Ipv4Addr, backend_type: &str, vni: u32, vtep_mac: [u8; 6]) -> String {
    let mut attrs = serde_json::json!({"PublicIP": public_ip.to_string(), "PublicIPv6": null, "BackendType": backend_type});
    if backend_type == "vxlan" {
        attrs["BackendData"] = serde_json::json!({"VNI": node::lease_vni(vni), "VtepMAC": node::format_mac(vtep_mac)});
    }
    attrs.to_string()
}

/// What the source tells the agent: every usable node (ours under our
/// node name, the others under their lease key), and the leases skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub nodes: Vec<NodeInfo>,
    pub invalid: Vec<LeaseError>,
}

/// What this node advertises.
#[derive(Debug, Clone)]
pub struct OwnAttrs {
    pub node_name: String,
    pub public_ip: Ipv4Addr,
    pub backend_type: String,
    pub vni: u32,
    /// flanneld's `subnet.env` from a previous run: its subnet is tried
    /// before a random one, as flanneld does.
    pub previous_subnet: Option<Ipv4Network>,
}

/// Our lease, as last written.
#[derive(Debug, Clone)]
struct OwnLease {
    key_name: String,
    value: String,
    renew_at: tokio::time::Instant,
}

/// The source: owns our lease and follows everyone's, sending a snapshot
/// whenever the set changes.
pub struct EtcdSource {
    client: Client,
    prefix: String,
    config: NetworkConfig,
    attrs: OwnAttrs,
    own: Option<OwnLease>,
    /// Every lease under `<prefix>/subnets/`, by the key's last component.
    leases: BTreeMap<String, Vec<u8>>,
    /// The revision the leases are current to; a watch resumes after it.
    revision: i64,
    last_sent: Option<Snapshot>,
    /// How a failure is explained in the warning.
    hints: FailureHints,
}

impl EtcdSource {
    pub fn new(client: Client, prefix: &str, config: NetworkConfig, attrs: OwnAttrs) -> Self {
        Self {
            client,
            prefix: prefix.trim_end_matches('/').to_owned(),
            config,
            attrs,
            own: None,
            leases: BTreeMap::new(),
            revision: 0,
            last_sent: None,
            hints: FailureHints::default(),
        }
    }

    /// How the client connects ([`EtcdOptions::failure_hints`]), for the
    /// warnings' hints.
    pub fn with_failure_hints(mut self, hints: FailureHints) -> Self {
        self.hints = hints;
        self
    }

    fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.prefix)
    }

    /// Runs [`Self::run`] as a task; snapshots arrive on the receiver, and
    /// the error that stopped the source, if one did, last.
    pub fn spawn(self) -> mpsc::Receiver<Result<Snapshot, EtcdSourceError>> {
        let (sender, receiver) = mpsc::channel(16);
        tokio::spawn(self.run(sender));
        receiver
    }

    /// Runs until the receiver goes away. Every etcd failure is logged and
    /// retried; nothing is sent meanwhile, so the datapath stays as it is.
    /// Our subnet taken by another node, or no free subnet for us, is sent,
    /// and ends the source: flanneld exits on both, and neither is etcd
    /// failing (retrying would only repeat it until someone acts).
    pub async fn run(mut self, snapshots: mpsc::Sender<Result<Snapshot, EtcdSourceError>>) {
        loop {
            match self.serve(&snapshots).await {
                Err(err @ (EtcdSourceError::SubnetTaken { .. } | EtcdSourceError::OutOfSubnets { .. })) => {
                    let _ = snapshots.send(Err(err)).await;
                    return;
                }
                Err(err) => {
                    let hint = self.hints.hint(&err);
                    warn!(error = %Chain(&err), hint, revision = self.revision, "etcd unreachable or failing; keeping the datapath as it is and retrying");
                }
                Ok(()) => {}
            }
            if snapshots.is_closed() {
                return;
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    async fn serve(&mut self, snapshots: &mpsc::Sender<Result<Snapshot, EtcdSourceError>>) -> Result<(), EtcdSourceError> {
        if self.own.is_none() {
            self.acquire().await?;
        }
        if self.revision == 0 {
            self.list().await?;
        }
        self.check_own_lease()?;
        // Our lease gone without our seeing it go (deleted or expired while
        // we were not watching, its event compacted away), or seen to go
        // but not written back (that write failed): written again now, not
        // at the next renewal, up to a day away. Meanwhile the other nodes
        // would drop their routes to us, and another node could take our
        // subnet, whose addresses our pods keep.
        if self.own.as_ref().is_some_and(|own| !self.leases.contains_key(&own.key_name)) {
            warn!("our subnet lease is missing from etcd; writing it again (flanneld would exit here)");
            self.renew().await?;
        }
        self.send(snapshots).await;
        let options = WatchOptions::new().with_prefix().with_start_revision(self.revision + 1);
        let mut watch = self.client.watch(self.subnets_prefix(), Some(options)).await?;
        loop {
            let renew_at = self.own.as_ref().map(|o| o.renew_at).unwrap_or_else(tokio::time::Instant::now);
            tokio::select! {
                message = watch.message() => {
                    let Some(response) = message? else {
                        return Err(etcd_client::Error::WatchError("the watch stream ended".into()).into());
                    };
                    if response.compact_revision() != 0 {
                        // Fell behind the compaction horizon: list again.
                        warn!(compact_revision = response.compact_revision(), "the lease watch fell behind etcd's compaction; listing again");
                        self.revision = 0;
                        return Ok(());
                    }
                    if response.canceled() {
                        return Err(etcd_client::Error::WatchError(format!("watch canceled: {}", response.cancel_reason())).into());
                    }
                    let mut own_deleted = false;
                    for event in response.events() {
                        let Some(kv) = event.kv() else { continue };
                        let name = String::from_utf8_lossy(kv.key()).trim_start_matches(&self.subnets_prefix()).to_owned();
                        self.revision = self.revision.max(kv.mod_revision());
                        match event.event_type() {
                            EventType::Put => { self.leases.insert(name, kv.value().to_vec()); }
                            EventType::Delete => {
                                own_deleted |= self.own.as_ref().is_some_and(|o| o.key_name == name);
                                self.leases.remove(&name);
                            }
                        }
                    }
                    if let Some(header) = response.header() {
                        self.revision = self.revision.max(header.revision());
                    }
                    if own_deleted {
                        warn!("our subnet lease was deleted or expired; writing it again (flanneld would exit here)");
                        self.renew().await?;
                    }
                    self.check_own_lease()?;
                    self.send(snapshots).await;
                }
                () = tokio::time::sleep_until(renew_at) => self.renew().await?,
                () = snapshots.closed() => return Ok(()),
            }
        }
    }

    /// Lists every lease and the revision they are current to.
    async fn list(&mut self) -> Result<(), EtcdSourceError> {
        let response = self.client.get(self.subnets_prefix(), Some(GetOptions::new().with_prefix())).await?;
        let prefix = self.subnets_prefix();
        self.leases = response
            .kvs()
            .iter()
            .map(|kv| (String::from_utf8_lossy(kv.key()).trim_start_matches(&prefix).to_owned(), kv.value().to_vec()))
            .collect();
        self.revision = response.header().map_or(0, |h| h.revision());
        Ok(())
    }

    /// flanneld's `AcquireLease`.
    async fn acquire(&mut self) -> Result<(), EtcdSourceError> {
        for _ in 0..RACE_RETRIES {
            self.list().await?;
            let leases: Vec<(String, Option<NodeInfo>)> = self
                .leases
                .iter()
                .map(|(name, value)| (name.clone(), lease_to_node(name, name, value).ok()))
                .collect();
            // Reuse the lease that carries our address.
            if let Some((name, info)) = leases.iter().find(|(_, n)| n.as_ref().is_some_and(|n| n.node_ip == self.attrs.public_ip)) {
                let info = info.as_ref().expect("found by its address");
                if self.config.compatible(info.pod_cidr) {
                    info!(lease = %name, "found the lease for our address; reusing it");
                    // Keep the VtepMAC it advertises (a flanneld node taken
                    // over keeps its peers' neighbour and FDB entries valid).
                    let mac = info.vtep_mac.unwrap_or_else(|| crate::desired::default_vtep_mac(self.attrs.public_ip));
                    self.own = Some(self.own_lease(name.clone(), mac));
                    return self.renew().await;
                }
                info!(lease = %name, "the lease for our address does not fit the network config; deleting it");
                self.client.delete(format!("{}{name}", self.subnets_prefix()), None).await?;
                continue;
            }
            let taken: Vec<Ipv4Network> = self.leases.keys().filter_map(|k| parse_subnet_key(k)).collect();
            let free = |subnet: &Ipv4Network| !taken.iter().any(|t| t.overlaps(*subnet));
            let subnet = match self.attrs.previous_subnet.filter(|s| self.config.compatible(*s) && free(s)) {
                Some(previous) => {
                    info!(subnet = %previous, "reusing the subnet of our previous subnet.env");
                    previous
                }
                None => self.pick_free(&taken)?,
            };
            let name = subnet_key(subnet);
            let mac = crate::desired::default_vtep_mac(self.attrs.public_ip);
            let own = self.own_lease(name.clone(), mac);
            let key = format!("{}{name}", self.subnets_prefix());
            if let Some(ttl) = self.put_if_unchanged(&key, &own.value, 0).await? {
                info!(lease = %name, "allocated a subnet lease");
                // As the watch will say: the first snapshot holds our own
                // node, and our lease does not read as missing.
                self.leases.insert(name, own.value.clone().into_bytes());
                self.own = Some(OwnLease { renew_at: renew_at(ttl), ..own });
                return Ok(());
            }
        }
        Err(EtcdSourceError::Race)
    }

    fn own_lease(&self, key_name: String, vtep_mac: [u8; 6]) -> OwnLease {
        OwnLease {
            key_name,
            value: lease_value(self.attrs.public_ip, &self.attrs.backend_type, self.attrs.vni, vtep_mac),
            renew_at: tokio::time::Instant::now(),
        }
    }

    /// flanneld's `allocateSubnet`: a random one of the first free subnets.
    fn pick_free(&self, taken: &[Ipv4Network]) -> Result<Ipv4Network, EtcdSourceError> {
        let len = self.config.net_conf.subnet_len;
        let step = 1u32 << (32 - len);
        let (min, max) = (self.config.subnet_min.to_bits(), self.config.subnet_max.to_bits());
        let candidates: Vec<Ipv4Network> = (0..)
            .map_while(|i: u32| i.checked_mul(step).and_then(|o| min.checked_add(o)).filter(|ip| *ip <= max))
            .filter_map(|ip| Ipv4Network::new(Ipv4Addr::from(ip), len).ok())
            .filter(|s| !taken.iter().any(|t| t.overlaps(*s)))
            .take(CANDIDATES)
            .collect();
        if candidates.is_empty() {
            return Err(EtcdSourceError::OutOfSubnets { len, min: self.config.subnet_min, max: self.config.subnet_max });
        }
        Ok(candidates[random_index(candidates.len())])
    }

    /// flanneld's `RenewLease` (`updateSubnet`): a fresh lease of the full
    /// TTL, and the value put again under it; but only over a key that is
    /// free or still ours, unchanged since it was read (a transaction on
    /// its revision, 0 for no key), so a node that took the subnet in
    /// between keeps it.
    async fn renew(&mut self) -> Result<(), EtcdSourceError> {
        let Some(own) = self.own.clone() else { return Ok(()) };
        let key = format!("{}{}", self.subnets_prefix(), own.key_name);
        for _ in 0..RACE_RETRIES {
            let current = self.client.get(key.as_str(), None).await?;
            let read_at = match current.kvs().first() {
                Some(kv) => {
                    self.check_lease_is_ours(&own.key_name, kv.value())?;
                    kv.mod_revision()
                }
                None => 0,
            };
            // None: written by someone since we read it; read it again.
            if let Some(ttl) = self.put_if_unchanged(&key, &own.value, read_at).await? {
                info!(lease = %own.key_name, ttl_s = ttl, "subnet lease written");
                // As the watch will say: a snapshot sent before its
                // event arrives keeps our own node.
                self.leases.insert(own.key_name.clone(), own.value.clone().into_bytes());
                self.own = Some(OwnLease { renew_at: renew_at(ttl), ..own });
                return Ok(());
            }
        }
        Err(EtcdSourceError::Race)
    }

    /// Puts `value` at `key` under a fresh lease of flanneld's TTL if the
    /// key is still at `read_at` (its mod_revision; 0 for no key) and
    /// returns the lease's TTL; `None`, the unused lease revoked, when
    /// someone wrote the key since.
    async fn put_if_unchanged(&mut self, key: &str, value: &str, read_at: i64) -> Result<Option<i64>, EtcdSourceError> {
        let grant = self.client.lease_grant(LEASE_TTL.as_secs() as i64, None).await?;
        let put = TxnOp::put(key, value, Some(PutOptions::new().with_lease(grant.id())));
        let txn = Txn::new().when([Compare::mod_revision(key, CompareOp::Equal, read_at)]).and_then([put]);
        let written = self.client.txn(txn).await.map(|response| response.succeeded());
        if !matches!(written, Ok(true)) {
            let _ = self.client.lease_revoke(grant.id()).await;
        }
        Ok(written?.then_some(grant.ttl()))
    }

    /// Our key, as last listed or watched, holds our lease (or none, which
    /// the watch's delete event renews).
    fn check_own_lease(&self) -> Result<(), EtcdSourceError> {
        let Some(own) = &self.own else { return Ok(()) };
        match self.leases.get(&own.key_name) {
            Some(value) => self.check_lease_is_ours(&own.key_name, value),
            None => Ok(()),
        }
    }

    /// A lease is ours when it advertises our PublicIP (a value flanneld
    /// wrote for this node reads as ours too); anything else, unreadable
    /// included, is another node's.
    fn check_lease_is_ours(&self, key_name: &str, value: &[u8]) -> Result<(), EtcdSourceError> {
        let holder = lease_to_node(key_name, key_name, value).map(|node| node.node_ip);
        match holder {
            Ok(ip) if ip == self.attrs.public_ip => Ok(()),
            Ok(ip) => Err(EtcdSourceError::SubnetTaken { lease: key_name.to_owned(), holder: ip.to_string() }),
            Err(_) => Err(EtcdSourceError::SubnetTaken {
                lease: key_name.to_owned(),
                holder: format!("unreadable: {}", String::from_utf8_lossy(value)),
            }),
        }
    }

    /// Translates every lease and sends the result if it changed.
    async fn send(&mut self, snapshots: &mpsc::Sender<Result<Snapshot, EtcdSourceError>>) {
        let own_name = self.own.as_ref().map(|o| o.key_name.as_str());
        let mut snapshot = Snapshot { nodes: Vec::new(), invalid: Vec::new() };
        for (key_name, value) in &self.leases {
            let name = if Some(key_name.as_str()) == own_name { &self.attrs.node_name } else { key_name };
            match lease_to_node(name, key_name, value) {
                Ok(node) => snapshot.nodes.push(node),
                Err(err) => snapshot.invalid.push(err),
            }
        }
        if self.last_sent.as_ref() != Some(&snapshot) {
            self.last_sent = Some(snapshot.clone());
            let _ = snapshots.send(Ok(snapshot)).await;
        }
    }
}

fn renew_at(ttl_s: i64) -> tokio::time::Instant {
    let ttl = Duration::from_secs(ttl_s.max(0) as u64);
    tokio::time::Instant::now() + ttl.saturating_sub(RENEW_MARGIN).max(RETRY)
}

/// Uniform enough for spreading subnet picks: the clock's nanoseconds mixed
/// with our pid (flanneld uses math/rand seeded from the clock).
fn random_index(len: usize) -> usize {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let mut x = (nanos as u64) ^ (u64::from(std::process::id()) << 32);
    // splitmix64
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    (x % len as u64) as usize
}

/// The subnet in flannel's `subnet.env` (`FLANNEL_SUBNET=10.244.1.1/24`).
pub fn previous_subnet(subnet_env: &Path) -> Option<Ipv4Network> {
    let text = std::fs::read_to_string(subnet_env).ok()?;
    let value = text.lines().find_map(|l| l.strip_prefix("FLANNEL_SUBNET="))?;
    let net: Ipv4Network = value.trim().parse().ok()?;
    Ipv4Network::new(net.network(), net.prefix()).ok()
}

#[cfg(test)]
mod tests {

    #[test]
    fn tls_failures_are_told_apart_whether_typed_or_text() {
        use std::io::{Error as IoError, ErrorKind};
        let untrusted = IoError::new(ErrorKind::InvalidData, rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer));
        assert!(tls_diagnosis(&untrusted, true).is_some_and(|h| h.contains("--etcd-cafile")));
        let refused = IoError::new(ErrorKind::InvalidData, rustls::Error::AlertReceived(rustls::AlertDescription::BadCertificate));
        assert!(tls_diagnosis(&refused, true).is_some_and(|h| h.contains("refused the agent's client certificate")));
        // Met while reading: rustls's message as text.
        let text = IoError::new(ErrorKind::InvalidData, "received fatal alert: BadCertificate");
        assert!(tls_diagnosis(&text, false).is_some_and(|h| h.contains("requires a client certificate")));
        let unrelated = IoError::new(ErrorKind::ConnectionRefused, "connection refused");
        assert_eq!(tls_diagnosis(&unrelated, false), None);
        // Below etcd-client's own error, which names no source.
        let wrapped = EtcdSourceError::Request(etcd_client::Error::IoError(IoError::new(ErrorKind::InvalidData, "received fatal alert: CertificateRequired")));
        assert!(tls_diagnosis(&wrapped, false).is_some());
        // Every refusal is told apart in rustls's own words too.
        for alert in REFUSAL_ALERTS {
            let text = IoError::new(ErrorKind::InvalidData, rustls::Error::AlertReceived(alert).to_string());
            assert!(tls_diagnosis(&text, true).is_some(), "{text}");
        }
        let other = IoError::new(ErrorKind::InvalidData, rustls::Error::AlertReceived(rustls::AlertDescription::HandshakeFailure).to_string());
        assert_eq!(tls_diagnosis(&other, true), None);
    }

    #[test]
    fn a_closed_connection_is_blamed_on_tls_only_before_any_answer_and_only_over_tls() {
        use std::io::{Error as IoError, ErrorKind};
        let options = |endpoint: &str| EtcdOptions { endpoints: vec![endpoint.to_owned()], prefix: "/coreos.com/network".to_owned(), ca_file: None, cert_file: None, key_file: None };
        let closed = IoError::new(ErrorKind::ConnectionReset, "Connection reset by peer");
        let https = options("https://127.0.0.1:2379").failure_hints();
        assert!(https.hint_before_any_answer(&closed).is_some_and(|h| h.contains("closed the TLS connection")));
        assert_eq!(https.hint(&closed), None);
        assert_eq!(options("http://127.0.0.1:2379").failure_hints().hint_before_any_answer(&closed), None);
        let refused = IoError::new(ErrorKind::ConnectionRefused, "connection refused");
        assert_eq!(https.hint_before_any_answer(&refused), None);
    }

    use super::*;

    /// Half an identity is refused before any file is read or any
    /// connection made, with plain-http endpoints too (where a lone
    /// `--etcd-keyfile` was ignored before).
    #[tokio::test]
    async fn half_a_client_identity_is_refused_even_without_tls_endpoints() {
        for (cert, key) in [(Some("/nonexistent/cert.pem"), None), (None, Some("/nonexistent/key.pem"))] {
            let options = EtcdOptions {
                endpoints: vec!["http://127.0.0.1:2379".to_owned()],
                prefix: "/coreos.com/network".to_owned(),
                ca_file: None,
                cert_file: cert.map(PathBuf::from),
                key_file: key.map(PathBuf::from),
            };
            assert!(matches!(connect(&options).await, Err(EtcdSourceError::HalfIdentity)), "{cert:?} {key:?}");
        }
    }

    #[test]
    fn config_fills_the_subnet_range_as_flannel_does() {
        let config = NetworkConfig::parse(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        assert_eq!((config.subnet_min, config.subnet_max), ("10.244.1.0".parse().unwrap(), "10.244.255.0".parse().unwrap()));
        let config = NetworkConfig::parse(r#"{"network":"10.5.0.0/16","SubnetLen":26,"SubnetMin":"10.5.4.0"}"#).unwrap();
        assert_eq!((config.subnet_min, config.subnet_max), ("10.5.4.0".parse().unwrap(), "10.5.255.192".parse().unwrap()));
        assert!(NetworkConfig::parse(r#"{"Network":"10.5.0.0/16","SubnetMin":"10.6.0.0"}"#).unwrap_err().contains("range of the Network"));
        assert!(NetworkConfig::parse(r#"{"Network":"10.5.0.0/16","SubnetMax":"10.5.3.7"}"#).unwrap_err().contains("boundary"));
        assert!(NetworkConfig::parse(r#"{"Network":"10.5.0.0/16","SubnetLen":17}"#).unwrap_err().contains("four subnets"));
        let reversed = NetworkConfig::parse(r#"{"Network":"10.5.0.0/16","SubnetMin":"10.5.9.0","SubnetMax":"10.5.8.0"}"#).unwrap_err();
        assert!(reversed.contains("SubnetMin 10.5.9.0 is above SubnetMax 10.5.8.0"), "{reversed}");
    }

    #[test]
    fn a_flanneld_lease_reads_as_a_node() {
        let value = br#"{"PublicIP":"192.168.77.13","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}}"#;
        let node = lease_to_node("10.244.3.0-24", "10.244.3.0-24", value).unwrap();
        assert_eq!(node.pod_cidr, "10.244.3.0/24".parse().unwrap());
        assert_eq!(node.node_ip, Ipv4Addr::new(192, 168, 77, 13));
        assert_eq!((node.vni, node.vtep_mac), (Some(1), Some([0x12, 0xc6, 0x65, 0x89, 0xb4, 0xe3])));
        assert_eq!(node.backend_type.as_deref(), Some("vxlan"));
        assert!(node.kube_subnet_managed);
        // host-gw leases carry no BackendData; an IPv6 half is ignored.
        let node = lease_to_node("n", "10.244.4.0-24&fd00:0:0:4::-64", br#"{"PublicIP":"192.168.77.14","BackendType":"host-gw"}"#).unwrap();
        assert_eq!((node.pod_cidr, node.vtep_mac), ("10.244.4.0/24".parse().unwrap(), None));
        // Our own value reads back as what we advertise.
        let ours = lease_value(Ipv4Addr::new(192, 168, 77, 11), "vxlan", 1, [0x0e, 0, 192, 168, 77, 11]);
        let node = lease_to_node("node1", "10.244.1.0-24", ours.as_bytes()).unwrap();
        assert_eq!((node.name.as_str(), node.vtep_mac), ("node1", Some([0x0e, 0, 192, 168, 77, 11])));
        assert_eq!(parse_subnet_key(&subnet_key(node.pod_cidr)), Some(node.pod_cidr));
    }

    #[test]
    fn bad_leases_are_named_with_the_reason() {
        let err = |key: &str, value: &[u8]| Chain(&lease_to_node(key, key, value).unwrap_err()).to_string();
        assert!(err("garbage", b"{}").contains("not a subnet key"));
        assert!(err("10.244.5.0-24", b"not json").contains("not a JSON object"));
        assert!(err("10.244.5.0-24", br#"{"BackendType":"vxlan"}"#).contains("no PublicIP"));
        assert!(err("10.244.5.7-24", br#"{"PublicIP":"192.168.0.1"}"#).contains("use 10.244.5.0/24"));
        let e = err("10.244.5.0-24", br#"{"PublicIP":"192.168.0.1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"zz"}}"#);
        assert!(e.contains("VtepMAC"), "{e}");
        for data in [r#""x""#, "[1]", "7"] {
            let e = err("10.244.5.0-24", format!(r#"{{"PublicIP":"192.168.0.1","BackendType":"vxlan","BackendData":{data}}}"#).as_bytes());
            assert!(e.contains(&format!("BackendData is {data}, not an object")), "{e}");
        }
    }

    #[test]
    fn previous_subnet_comes_from_subnet_env() {
        let path = std::env::temp_dir().join(format!("overlay-subnet-env-{}", std::process::id()));
        std::fs::write(&path, "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1450\n").unwrap();
        assert_eq!(previous_subnet(&path), Some("10.244.7.0/24".parse().unwrap()));
        std::fs::remove_file(&path).unwrap();
        assert_eq!(previous_subnet(&path), None);
    }
}
