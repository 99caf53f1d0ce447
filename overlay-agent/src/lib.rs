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

pub mod apply;
pub mod bpffs;
pub mod cli;
pub mod clsact;
pub mod datapath;
pub mod desired;
pub mod etcd_source;
#[cfg(test)]
mod fixtures;
pub mod foreign_vxlan;
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
pub mod server;
