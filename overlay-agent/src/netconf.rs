//! flannel's network configuration (`net-conf.json`) and the
//! `subnet.env` file flannel's CNI plugin reads.
//!
//! A cluster migrating from flannel keeps its `kube-flannel-cfg` ConfigMap:
//! the same file configures our agent.

use std::{
    io::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use ipnetwork::Ipv4Network;
use serde::Deserialize;

use crate::desired::Backend;

/// What `net-conf.json` says, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConf {
    /// The cluster's pod network; every node's pod CIDR lies inside it.
    pub network: Ipv4Network,
    /// flannel's `SubnetLen`. Kubernetes allocates the pod CIDRs, so this is
    /// only checked against them.
    pub subnet_len: u8,
    pub backend: Backend,
    pub vni: u32,
    pub port: u16,
    pub direct_routing: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum NetConfError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not valid JSON")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {key}")]
    Field {
        path: PathBuf,
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The file as flannel's Go code decodes it: keys match case-insensitively,
/// so they are lowercased before this is filled.
#[derive(Debug, Deserialize)]
struct RawNetConf {
    network: Option<String>,
    #[serde(rename = "subnetlen")]
    subnet_len: Option<u8>,
    #[serde(rename = "enableipv4")]
    enable_ipv4: Option<bool>,
    #[serde(rename = "enableipv6")]
    enable_ipv6: Option<bool>,
    backend: Option<RawBackend>,
}

#[derive(Debug, Deserialize)]
struct RawBackend {
    #[serde(rename = "type")]
    kind: Option<String>,
    vni: Option<u32>,
    port: Option<u16>,
    #[serde(rename = "directrouting")]
    direct_routing: Option<bool>,
    gbp: Option<bool>,
}

impl NetConf {
    pub fn read(path: &Path) -> Result<Self, NetConfError> {
        let text = std::fs::read_to_string(path).map_err(|source| NetConfError::Read { path: path.to_owned(), source })?;
        Self::parse(&text).map_err(|e| match e {
            ParseError::Json(source) => NetConfError::Json { path: path.to_owned(), source },
            ParseError::Field { key, source } => NetConfError::Field { path: path.to_owned(), key, source },
            ParseError::Invalid(what) => NetConfError::Invalid { path: path.to_owned(), what },
        })
    }

    /// Parses net-conf JSON held somewhere other than a file (flannel's
    /// etcd mode keeps it at `<prefix>/config`); the error says what is wrong.
    pub fn parse_text(text: &str) -> Result<Self, String> {
        Self::parse(text).map_err(|e| match e {
            ParseError::Json(source) => format!("not valid JSON: {source}"),
            ParseError::Field { key, source } => format!("{key}: {source}"),
            ParseError::Invalid(what) => what,
        })
    }

    fn parse(text: &str) -> Result<Self, ParseError> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(ParseError::Json)?;
        // The path names the key that has the wrong type, in flannel's
        // spelling (the keys were lowercased to match as Go does).
        let raw: RawNetConf = serde_path_to_error::deserialize(lowercase_keys(value)).map_err(|e| {
            let key = e.path().iter().map(|segment| flannel_key(&segment.to_string())).collect::<Vec<_>>().join(".");
            ParseError::Field { key, source: e.into_inner() }
        })?;
        let invalid = |what: String| ParseError::Invalid(what);
        if raw.enable_ipv4 == Some(false) {
            return Err(invalid("EnableIPv4 is false: overlay serves IPv4 pod networks only".into()));
        }
        if raw.enable_ipv6 == Some(true) {
            return Err(invalid("EnableIPv6 is true: overlay does not serve IPv6 pod networks yet; set it to false".into()));
        }
        let network_text = raw.network.ok_or_else(|| invalid("no \"Network\" (the cluster's pod CIDR, e.g. \"10.244.0.0/16\")".into()))?;
        let network: Ipv4Network = network_text
            .parse()
            .map_err(|e| invalid(format!("Network {network_text:?} is not an IPv4 CIDR: {e}")))?;
        if network.network() != network.ip() {
            return Err(invalid(format!(
                "Network {network} has host bits set; use {}/{}",
                network.network(),
                network.prefix()
            )));
        }
        // flannel's default: /24, or two bits longer than a network smaller than /22.
        let default_len = if network.prefix() < 22 { 24 } else { network.prefix() + 2 };
        let subnet_len = raw.subnet_len.unwrap_or(default_len);
        if subnet_len < network.prefix() || subnet_len > 30 {
            return Err(invalid(format!(
                "SubnetLen {subnet_len} must lie between the Network's prefix /{} and 30",
                network.prefix()
            )));
        }
        let backend = raw.backend.unwrap_or(RawBackend {
            kind: None,
            vni: None,
            port: None,
            direct_routing: None,
            gbp: None,
        });
        // flannel lowercases it too.
        let kind = backend.kind.as_deref().unwrap_or("vxlan").to_ascii_lowercase();
        let backend_kind = match kind.as_str() {
            "vxlan" => Backend::Vxlan,
            "host-gw" => Backend::HostGw,
            other => {
                return Err(invalid(format!(
                    "Backend.Type {other:?} is not supported; overlay implements \"vxlan\" and \"host-gw\""
                )));
            }
        };
        if backend.gbp == Some(true) {
            return Err(invalid("Backend.GBP (VXLAN group policy) is not supported; remove it".into()));
        }
        let vni = backend.vni.unwrap_or(overlay_common::DEFAULT_VNI);
        if vni >= 1 << 24 {
            return Err(invalid(format!("Backend.VNI {vni} does not fit VXLAN's 24 bits")));
        }
        // flannel's 0 means "the kernel's default", which is 8472.
        let port = match backend.port {
            None | Some(0) => overlay_common::DEFAULT_VXLAN_PORT,
            Some(port) => port,
        };
        let direct_routing = backend.direct_routing.unwrap_or(false);
        if direct_routing && backend_kind == Backend::HostGw {
            return Err(invalid("Backend.DirectRouting applies to vxlan only; host-gw always routes directly".into()));
        }
        Ok(Self { network, subnet_len, backend: backend_kind, vni, port, direct_routing })
    }

    /// Why `pod_cidr` cannot belong to this cluster, if it cannot.
    pub fn check_pod_cidr(&self, pod_cidr: Ipv4Network) -> Result<(), String> {
        crate::desired::check_pod_cidr(self.network, pod_cidr)
    }
}

enum ParseError {
    Json(serde_json::Error),
    Field { key: String, source: serde_json::Error },
    Invalid(String),
}

/// A lowercased key as flannel's documentation spells it.
fn flannel_key(lowercase: &str) -> String {
    const KEYS: [&str; 9] = ["Network", "SubnetLen", "EnableIPv4", "EnableIPv6", "Backend", "Type", "VNI", "Port", "DirectRouting"];
    KEYS.iter().find(|k| k.eq_ignore_ascii_case(lowercase)).map_or_else(|| lowercase.to_owned(), |k| (*k).to_owned())
}

pub(crate) fn lowercase_keys(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(map) => {
            map.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), lowercase_keys(v))).collect()
        }
        other => other,
    }
}

/// The contents of flannel's `subnet.env` for this node.
///
/// `ip_masq` says whether the agent masquerades traffic leaving the
/// cluster (flannel's `--ip-masq`). flannel's CNI plugin gives the bridge
/// plugin `ipMasq = !FLANNEL_IPMASQ`: when the agent does not, the bridge
/// plugin masquerades each pod's traffic to anything outside the node's
/// own pod subnet (pod-to-pod across nodes included), as with flanneld.
pub fn subnet_env(network: Ipv4Network, pod_cidr: Ipv4Network, mtu: u32, ip_masq: bool) -> String {
    let first = Ipv4Addr::from(u32::from(pod_cidr.network()) + 1);
    format!(
        "FLANNEL_NETWORK={network}\nFLANNEL_SUBNET={first}/{}\nFLANNEL_MTU={mtu}\nFLANNEL_IPMASQ={ip_masq}\n",
        pod_cidr.prefix()
    )
}

/// Writes `contents` to `path` through a temporary file and a rename, so
/// the CNI plugin never reads half a file. Unchanged contents are not
/// rewritten.
pub fn write_atomically(path: &Path, contents: &str) -> Result<bool, NetConfError> {
    if std::fs::read_to_string(path).is_ok_and(|old| old == contents) {
        return Ok(false);
    }
    let err = |source| NetConfError::Write { path: path.to_owned(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp).map_err(err)?;
    file.write_all(contents.as_bytes()).map_err(err)?;
    file.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NetConf, String> {
        NetConf::parse(text).map_err(|e| match e {
            ParseError::Json(e) => e.to_string(),
            ParseError::Field { key, source } => format!("{key}: {source}"),
            ParseError::Invalid(what) => what,
        })
    }

    #[test]
    fn reads_flannels_default_config() {
        let conf = parse(r#"{"Network": "10.244.0.0/16", "EnableNFTables": false, "Backend": {"Type": "vxlan"}}"#).unwrap();
        assert_eq!(conf.network, "10.244.0.0/16".parse().unwrap());
        assert_eq!((conf.subnet_len, conf.backend, conf.vni, conf.port, conf.direct_routing), (24, Backend::Vxlan, 1, 8472, false));
    }

    #[test]
    fn keys_match_case_insensitively_as_in_go() {
        let conf = parse(r#"{"network": "10.0.0.0/8", "SUBNETLEN": 26, "backend": {"type": "vxlan", "vni": 4096, "Port": 4789, "directRouting": true}}"#).unwrap();
        assert_eq!((conf.subnet_len, conf.vni, conf.port, conf.direct_routing), (26, 4096, 4789, true));
    }

    #[test]
    fn bad_configs_say_what_to_fix() {
        for (text, needle) in [
            (r#"{"Backend": {"Type": "vxlan"}}"#, "no \"Network\""),
            (r#"{"Network": "10.244.0.1/16"}"#, "use 10.244.0.0/16"),
            (r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "wireguard"}}"#, "\"wireguard\" is not supported"),
            (r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw", "DirectRouting": true}}"#, "vxlan only"),
            (r#"{"Network": "10.244.0.0/16", "EnableIPv6": true}"#, "IPv6"),
            (r#"{"Network": "10.244.0.0/16", "SubnetLen": 8}"#, "SubnetLen 8"),
            (r#"{"Network": "10.244.0.0/16", "Backend": {"VNI": 16777216}}"#, "24 bits"),
            (r#"{"Network": "10.244.0.0/16""#, "EOF"),
            (r#"{"Network": "10.244.0.0/16", "Backend": {"VNI": "1"}}"#, "Backend.VNI: invalid type: string \"1\""),
            (r#"{"Network": "10.244.0.0/16", "Backend": {"Port": 70000}}"#, "Backend.Port: invalid value: integer `70000`"),
            (r#"{"Network": "10.244.0.0/16", "SubnetLen": "24"}"#, "SubnetLen: invalid type"),
            (r#"{"Network": 10}"#, "Network: invalid type"),
        ] {
            let err = parse(text).expect_err(text);
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn backend_type_matches_case_insensitively_as_in_flannel() {
        let conf = parse(r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "VXLAN"}}"#).unwrap();
        assert_eq!(conf.backend, Backend::Vxlan);
        let conf = parse(r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "Host-GW"}}"#).unwrap();
        assert_eq!(conf.backend, Backend::HostGw);
    }

    #[test]
    fn pod_cidrs_outside_the_network_are_refused() {
        let conf = parse(r#"{"Network": "10.244.0.0/16"}"#).unwrap();
        assert!(conf.check_pod_cidr("10.244.7.0/24".parse().unwrap()).is_ok());
        assert!(conf.check_pod_cidr("10.245.7.0/24".parse().unwrap()).unwrap_err().contains("outside the cluster Network 10.244.0.0/16"));
        assert!(conf.check_pod_cidr("10.244.0.0/15".parse().unwrap()).is_err());
    }

    #[test]
    fn subnet_env_matches_flannels() {
        let env = subnet_env("10.244.0.0/16".parse().unwrap(), "10.244.1.0/24".parse().unwrap(), 1450, true);
        assert_eq!(env, "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n");
        let env = subnet_env("10.244.0.0/16".parse().unwrap(), "10.244.1.0/24".parse().unwrap(), 1450, false);
        assert!(env.ends_with("FLANNEL_IPMASQ=false\n"), "{env}");
    }
}
