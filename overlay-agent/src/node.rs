//! Kubernetes `Node` → what the datapath needs to know about that node.
//!
//! Written once: the manifest directory source and the Kubernetes watcher
//! both feed [`NodeInfo::from_node`].

use std::{collections::BTreeMap, net::Ipv4Addr};

use ipnetwork::Ipv4Network;
use k8s_openapi::api::core::v1::Node;
use serde::Deserialize;

/// flannel's annotation prefix (`--kube-annotation-prefix` default).
pub const ANNOTATION_PREFIX: &str = "flannel.alpha.coreos.com/";
pub const ANNOTATION_PUBLIC_IP: &str = "flannel.alpha.coreos.com/public-ip";
pub const ANNOTATION_PUBLIC_IP_OVERWRITE: &str = "flannel.alpha.coreos.com/public-ip-overwrite";
pub const ANNOTATION_BACKEND_TYPE: &str = "flannel.alpha.coreos.com/backend-type";
pub const ANNOTATION_BACKEND_DATA: &str = "flannel.alpha.coreos.com/backend-data";
pub const ANNOTATION_KUBE_SUBNET_MANAGER: &str = "flannel.alpha.coreos.com/kube-subnet-manager";

/// One node, as the datapath sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// The node's IPv4 pod CIDR.
    pub pod_cidr: Ipv4Network,
    /// Underlay address: tunnel endpoint and direct-routing next hop.
    pub node_ip: Ipv4Addr,
    /// flannel's `backend-type`, when annotated.
    pub backend_type: Option<String>,
    /// VNI from flannel's `backend-data`, when annotated.
    pub vni: Option<u32>,
    /// VTEP MAC from flannel's `backend-data`, when annotated.
    pub vtep_mac: Option<[u8; 6]>,
    /// `kube-subnet-manager: "true"`: flannel (and we) program only such
    /// peers, since only they advertise a tunnel endpoint of their own.
    pub kube_subnet_managed: bool,
    /// The `InternalIP` status address.
    pub internal_ip: Option<Ipv4Addr>,
    /// The `public-ip-overwrite` annotation, set by an operator.
    pub public_ip_overwrite: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum NodeError {
    #[error("the Node has no metadata.name")]
    NoName,
    #[error("node {node}: no IPv4 pod CIDR in spec.podCIDR/spec.podCIDRs (has the controller-manager allocated one? --allocate-node-cidrs)")]
    NoPodCidr { node: String },
    #[error("node {node}: pod CIDR {value:?} is not a valid IPv4 CIDR: {reason}")]
    BadPodCidr { node: String, value: String, reason: String },
    #[error("node {node}: pod CIDR {value} has host bits set; use {network}")]
    PodCidrNotNetwork { node: String, value: Ipv4Network, network: Ipv4Network },
    #[error("node {node}: no address: set status.addresses InternalIP or the {ANNOTATION_PUBLIC_IP} annotation")]
    NoAddress { node: String },
    #[error("node {node}: {field} {value:?} is not an IPv4 address")]
    BadAddress { node: String, field: &'static str, value: String },
    #[error("node {node}: annotation {ANNOTATION_BACKEND_DATA} is not {{\"VNI\":N,\"VtepMAC\":\"xx:xx:xx:xx:xx:xx\"}}: {reason}")]
    BadBackendData { node: String, reason: String },
}

/// flannel's `backend-data` for vxlan.
#[derive(Debug, Deserialize)]
struct BackendData {
    #[serde(rename = "VNI")]
    vni: Option<u32>,
    #[serde(rename = "VtepMAC")]
    vtep_mac: Option<String>,
}

impl NodeInfo {
    /// Reads what the datapath needs from a Node object.
    pub fn from_node(node: &Node) -> Result<Self, NodeError> {
        let name = node.metadata.name.clone().ok_or(NodeError::NoName)?;
        let annotations = node.metadata.annotations.as_ref();
        let annotation = |key: &str| annotations.and_then(|a| a.get(key)).map(String::as_str);

        let spec = node.spec.as_ref();
        let cidrs = spec
            .and_then(|s| s.pod_cidrs.clone())
            .filter(|c| !c.is_empty())
            .or_else(|| spec.and_then(|s| s.pod_cidr.clone()).map(|c| vec![c]))
            .unwrap_or_default();
        let mut pod_cidr = None;
        for value in &cidrs {
            if value.contains(':') {
                continue; // IPv6: not served yet.
            }
            let parsed: Ipv4Network = value.parse().map_err(|e: ipnetwork::IpNetworkError| {
                NodeError::BadPodCidr { node: name.clone(), value: value.clone(), reason: e.to_string() }
            })?;
            let network = Ipv4Network::new(parsed.network(), parsed.prefix()).expect("prefix already valid");
            if network.ip() != parsed.ip() {
                return Err(NodeError::PodCidrNotNetwork { node: name, value: parsed, network });
            }
            pod_cidr = Some(network);
            break;
        }
        let pod_cidr = pod_cidr.ok_or_else(|| NodeError::NoPodCidr { node: name.clone() })?;

        let parse_ip = |field: &'static str, value: &str| {
            value.parse::<Ipv4Addr>().map_err(|_| NodeError::BadAddress {
                node: name.clone(),
                field,
                value: value.to_owned(),
            })
        };
        let internal_ip = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP")
            .find_map(|a| a.address.parse::<Ipv4Addr>().ok());
        let public_ip_overwrite = annotation(ANNOTATION_PUBLIC_IP_OVERWRITE)
            .map(|v| parse_ip("annotation public-ip-overwrite", v))
            .transpose()?;
        let node_ip = if let Some(ip) = public_ip_overwrite {
            ip
        } else if let Some(v) = annotation(ANNOTATION_PUBLIC_IP) {
            parse_ip("annotation public-ip", v)?
        } else {
            internal_ip.ok_or_else(|| NodeError::NoAddress { node: name.clone() })?
        };

        let (vni, vtep_mac) = match annotation(ANNOTATION_BACKEND_DATA) {
            None | Some("null" | "") => (None, None),
            Some(raw) => {
                let bad = |reason: String| NodeError::BadBackendData { node: name.clone(), reason };
                let data: BackendData = serde_json::from_str(raw).map_err(|e| bad(e.to_string()))?;
                let mac = data
                    .vtep_mac
                    .map(|m| parse_mac(&m).ok_or_else(|| bad(format!("VtepMAC {m:?} is not a MAC address"))))
                    .transpose()?;
                (data.vni, mac)
            }
        };
        Ok(Self {
            backend_type: annotation(ANNOTATION_BACKEND_TYPE).map(str::to_owned),
            name,
            pod_cidr,
            node_ip,
            vni,
            vtep_mac,
            kube_subnet_managed: annotation(ANNOTATION_KUBE_SUBNET_MANAGER) == Some("true"),
            internal_ip,
            public_ip_overwrite,
        })
    }
}

/// The VNI as flanneld's lease attributes hold it: a uint16
/// (`vxlanLeaseAttrs`), so flanneld writes a VNI above 65535 cut to its
/// low 16 bits, and skips a lease whose number does not fit ("error
/// decoding subnet lease JSON"). Leases (annotations, etcd) carry it so.
pub fn lease_vni(vni: u32) -> u32 {
    vni & 0xffff
}

/// The flannel annotations this node publishes so flannel nodes (and our
/// own) can reach it, exactly as flanneld writes them.
pub fn flannel_annotations(backend_type: &str, config: &overlay_common::Config) -> BTreeMap<String, String> {
    let backend_data = if backend_type == "vxlan" {
        format!("{{\"VNI\":{},\"VtepMAC\":\"{}\"}}", lease_vni(config.vni), format_mac(config.vtep_mac))
    } else {
        "null".to_owned()
    };
    BTreeMap::from([
        (ANNOTATION_BACKEND_TYPE.to_owned(), backend_type.to_owned()),
        (ANNOTATION_BACKEND_DATA.to_owned(), backend_data),
        (ANNOTATION_PUBLIC_IP.to_owned(), Ipv4Addr::from(config.node_ip).to_string()),
        (ANNOTATION_KUBE_SUBNET_MANAGER.to_owned(), "true".to_owned()),
    ])
}

/// The annotations in `wanted` that `node` lacks or carries with another
/// value.
pub fn missing_annotations(node: &Node, wanted: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let have = node.metadata.annotations.as_ref();
    wanted
        .iter()
        .filter(|(k, v)| have.and_then(|a| a.get(*k)) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: [u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(json: serde_json::Value) -> Node {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn reads_cidr_address_and_flannel_annotations() {
        let n = node(serde_json::json!({
            "metadata": {"name": "n1", "annotations": {
                ANNOTATION_BACKEND_TYPE: "vxlan",
                ANNOTATION_BACKEND_DATA: "{\"VNI\":1,\"VtepMAC\":\"12:c6:65:89:b4:e3\"}",
            }},
            "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00::/64"]},
            "status": {"addresses": [{"type": "Hostname", "address": "n1"}, {"type": "InternalIP", "address": "192.168.1.10"}]},
        }));
        let info = NodeInfo::from_node(&n).unwrap();
        assert_eq!(info.pod_cidr, "10.244.1.0/24".parse().unwrap());
        assert_eq!(info.node_ip, Ipv4Addr::new(192, 168, 1, 10));
        assert_eq!(info.vni, Some(1));
        assert_eq!(info.vtep_mac, Some([0x12, 0xc6, 0x65, 0x89, 0xb4, 0xe3]));
        assert_eq!(info.backend_type.as_deref(), Some("vxlan"));
    }

    #[test]
    fn public_ip_annotations_override_internal_ip() {
        let n = node(serde_json::json!({
            "metadata": {"name": "n1", "annotations": {
                ANNOTATION_PUBLIC_IP: "192.0.2.1",
                ANNOTATION_PUBLIC_IP_OVERWRITE: "192.0.2.2",
            }},
            "spec": {"podCIDR": "10.244.1.0/24"},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.10"}]},
        }));
        assert_eq!(NodeInfo::from_node(&n).unwrap().node_ip, Ipv4Addr::new(192, 0, 2, 2));
    }

    #[test]
    fn bad_nodes_are_named_with_what_to_fix() {
        let no_addr = node(serde_json::json!({"metadata": {"name": "a"}, "spec": {"podCIDR": "10.244.1.0/24"}}));
        assert_eq!(NodeInfo::from_node(&no_addr), Err(NodeError::NoAddress { node: "a".into() }));
        let no_cidr = node(serde_json::json!({"metadata": {"name": "b"}, "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.1"}]}}));
        assert_eq!(NodeInfo::from_node(&no_cidr), Err(NodeError::NoPodCidr { node: "b".into() }));
        let bad_cidr = node(serde_json::json!({"metadata": {"name": "c"}, "spec": {"podCIDR": "10.244.1.0/33"}}));
        assert!(matches!(NodeInfo::from_node(&bad_cidr), Err(NodeError::BadPodCidr { .. })));
        let host_bits = node(serde_json::json!({"metadata": {"name": "d"}, "spec": {"podCIDR": "10.244.1.5/24"}}));
        let err = NodeInfo::from_node(&host_bits).unwrap_err();
        assert!(err.to_string().contains("use 10.244.1.0/24"), "{err}");
        let bad_data = node(serde_json::json!({
            "metadata": {"name": "e", "annotations": {ANNOTATION_BACKEND_DATA: "{\"VNI\":1,\"VtepMAC\":\"zz\"}"}},
            "spec": {"podCIDR": "10.244.1.0/24"},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.1"}]},
        }));
        assert!(matches!(NodeInfo::from_node(&bad_data), Err(NodeError::BadBackendData { .. })));
    }

    #[test]
    fn annotations_to_publish_read_back_as_the_same_node() {
        let config = overlay_common::Config {
            vni: 1,
            vtep_mac: [0x0e, 0, 192, 168, 1, 10],
            node_ip: [192, 168, 1, 10],
            ..Default::default()
        };
        let annotations = flannel_annotations("vxlan", &config);
        let n = node(serde_json::json!({
            "metadata": {"name": "n1", "annotations": annotations},
            "spec": {"podCIDR": "10.244.1.0/24"},
        }));
        let info = NodeInfo::from_node(&n).unwrap();
        assert_eq!((info.vni, info.vtep_mac, info.node_ip), (Some(1), Some(config.vtep_mac), Ipv4Addr::new(192, 168, 1, 10)));
        assert_eq!(info.backend_type.as_deref(), Some("vxlan"));
        assert!(info.kube_subnet_managed);
        assert!(missing_annotations(&n, &annotations).is_empty());
        let mut moved = config;
        moved.node_ip = [192, 168, 1, 11];
        let wanted = flannel_annotations("vxlan", &moved);
        assert_eq!(missing_annotations(&n, &wanted).into_keys().collect::<Vec<_>>(), [ANNOTATION_PUBLIC_IP]);
        assert_eq!(flannel_annotations("host-gw", &config)[ANNOTATION_BACKEND_DATA], "null");
    }

    /// flanneld's lease attributes hold the VNI as a uint16: it writes a
    /// VNI above 65535 cut to its low 16 bits, and skips a lease whose
    /// number does not fit ("error decoding subnet lease JSON"). So we
    /// write it as flanneld does. (Shown failing before: "VNI":70000.)
    #[test]
    fn a_vni_past_16_bits_is_published_as_flanneld_writes_it() {
        let config = overlay_common::Config { vni: 70_000, vtep_mac: [0x0e, 0, 192, 168, 1, 10], ..Default::default() };
        assert_eq!(flannel_annotations("vxlan", &config)[ANNOTATION_BACKEND_DATA], r#"{"VNI":4464,"VtepMAC":"0e:00:c0:a8:01:0a"}"#);
        let lease: serde_json::Value = serde_json::from_str(&crate::etcd_source::lease_value(Ipv4Addr::new(192, 168, 1, 10), "vxlan", 70_000, config.vtep_mac)).unwrap();
        assert_eq!(lease["BackendData"]["VNI"], 4464);
    }

    #[test]
    fn mac_round_trip() {
        assert_eq!(parse_mac("0e:00:c0:a8:01:0a").map(format_mac).as_deref(), Some("0e:00:c0:a8:01:0a"));
        assert_eq!(parse_mac("0e:00:c0"), None);
        assert_eq!(parse_mac("0e:00:c0:a8:01:0a:ff"), None);
    }
}
