//! Test fixtures shared by the unit tests of [`crate::desired`] and
//! [`crate::reconciler`]: a node as a node source reads it, and this
//! node's settings.

use crate::{
    desired::{Backend, LocalSettings},
    node::NodeInfo,
};

/// A subnet-managed node with no backend annotations, whose address (the
/// published one and its InternalIP) is `ip`.
pub(crate) fn node(name: &str, cidr: &str, ip: [u8; 4]) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        pod_cidr: cidr.parse().unwrap(),
        node_ip: ip.into(),
        backend_type: None,
        vni: None,
        vtep_mac: None,
        kube_subnet_managed: true,
        internal_ip: Some(ip.into()),
        public_ip_overwrite: None,
    }
}

/// The settings of node `a`: VXLAN (VNI 1, port 8472) on an underlay of
/// index 2 and MTU 1500, no pod bridge, no cluster `Network`.
pub(crate) fn local() -> LocalSettings {
    LocalSettings {
        node_name: "a".into(),
        backend: Backend::Vxlan,
        direct_routing: false,
        vni: 1,
        vxlan_port: 8472,
        underlay_ifindex: 2,
        underlay_mtu: 1500,
        pod_bridge_ifindex: 0,
        pod_bridge_mac: [0; 6],
        pod_bridge_addresses: Vec::new(),
        xdp_decap: false,
        seg_ifindex: 0,
        gro_ifindex: 0,
        public_ip: None,
        iface_address: None,
        network: None,
    }
}
