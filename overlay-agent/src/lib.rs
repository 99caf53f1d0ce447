//! The overlay node agent as a library: the binary (`main.rs`) and the
//! integration tests (`tests/`) drive the same code.
//!
//! The agent is a pipeline, top to bottom, each stage testable on its own:
//!
//! 1. node source: [`manifests`] (a directory of Node manifests) or
//!    [`kube_source`] (a watch of the API server's Nodes) or [`etcd_source`]
//!    (flannel's etcd mode), read through the one Node →
//!    [`node::NodeInfo`] translation;
//! 2. desired state: [`desired::desired`], kept up to date node by node by
//!    [`desired::DesiredState`];
//! 3. diff: [`desired::diff`];
//! 4. apply: [`apply::Applier`] writes the pinned [`maps`] and the kernel
//!    [`routes`].
//!
//! [`reconciler`] is the event loop that runs them, with the node source,
//! the datapath, the underlay and the publisher behind traits (unit-tested
//! against fakes). [`cli`] is the command line. [`datapath`] loads and
//! attaches the eBPF programs underneath; [`kernel_events`] says when what
//! the agent reads from the kernel (paths to the nodes, the pod bridge's
//! ports) has changed.
//!
//! The rest, by concern. The datapath: [`object`] (the embedded eBPF
//! object), [`hook`] (which decapsulation hook), [`clsact`] (TC filters on
//! kernels without TCX), [`bpffs`] (the filesystem the pins live on),
//! [`carry`] (an upgrade from the previous map layout, carried). The
//! kernel around it: [`rtnl`] (rtnetlink requests), [`iface`] (facts about
//! the underlay interface), [`pod_ports`] (the pod bridge's ports, for the
//! fast path), [`foreign_vxlan`] (kernel vxlan devices on our port),
//! [`netfilter`] (masquerade and FORWARD rules). flannel's files:
//! [`netconf`] (`net-conf.json`, `subnet.env`). Operating it: [`metrics`],
//! [`server`] (`/healthz`, `/readyz`, `/metrics`), [`preflight`]
//! (`kernel-check`), [`report`] (an error's causes on one line).
//!
//! Where things are handled, one file each:
//!
//! - a node event (a node added, changed, deleted or unreadable, from any
//!   source): [`reconciler::Reconciler::handle_source`], in
//!   `reconciler/mod.rs`;
//! - a kernel event ([`kernel_events::KernelEvent`]: the underlay's paths,
//!   the pod bridge, its ports, the agent's device pairs):
//!   [`reconciler::Reconciler::handle_kernel_events`],
//!   in the same file (what counts as one is decided in `kernel_events.rs`);
//! - a drop reason: [`overlay_common::DropReason`], in
//!   `overlay-common/src/lib.rs`, the one list of reasons with their labels
//!   and meanings, which `inspect` and `/metrics` walk; the programs return
//!   one from their `try_…` functions and `overlay-ebpf/src/main.rs` counts
//!   it.

pub mod apply;
pub mod bpffs;
pub mod carry;
pub mod cli;
pub mod clsact;
pub mod datapath;
pub mod desired;
pub mod device_pair;
pub mod etcd_source;
#[cfg(test)]
mod fixtures;
pub mod foreign_vxlan;
pub mod gro_device;
pub mod hook;
pub mod iface;
pub mod kernel_events;
pub mod kube_source;
pub mod manifests;
pub mod maps;
pub mod metrics;
pub mod netconf;
pub mod netfilter;
pub mod node;
pub mod object;
pub mod pod_ports;
pub mod report;
pub mod preflight;
pub mod reconciler;
pub mod routes;
pub mod rtnl;
pub mod seg_device;
pub mod server;
