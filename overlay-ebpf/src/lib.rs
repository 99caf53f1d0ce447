//! The programs live in the `overlay` binary (`src/main.rs`), built for
//! `bpfel-unknown-none` by overlay-agent's build.rs. This library target
//! exists so the agent can name this crate as a build-dependency (which
//! makes cargo rebuild the agent when the programs change), and holds the
//! pure helpers the programs share, which the host unit-tests:
//! `cargo test -p overlay-ebpf --lib`.
#![cfg_attr(not(test), no_std)]

pub mod csum;
pub mod proto;
pub mod vxlan;
