//! The programs live in the `overlay` binary (`src/main.rs`), built for
//! `bpfel-unknown-none` by overlay-agent's build.rs. This library target only
//! exists so the agent can name this crate as a build-dependency, which makes
//! cargo rebuild the agent when the programs change.
#![no_std]
