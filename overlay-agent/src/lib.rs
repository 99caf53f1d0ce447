//! The overlay node agent as a library: the binary (`main.rs`) and the
//! integration tests (`tests/`) drive the same code.
//!
//! Pipeline, top to bottom (each stage testable on its own):
//! node source → desired state → diff → apply (maps, routes).
//! This crate currently holds the bottom layer, [`datapath`], which loads and
//! attaches the eBPF programs and owns their pinned maps.

pub mod bpffs;
pub mod datapath;
pub mod object;
