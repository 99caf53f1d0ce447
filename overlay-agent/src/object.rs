//! The eBPF object built by `build.rs` and embedded in the binary.

/// The compiled `overlay-ebpf` programs (ELF with BTF). Empty when the agent
/// was built without an eBPF toolchain (see `build.rs`).
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/overlay"));

/// Whether this binary carries real programs rather than the placeholder.
pub fn has_programs() -> bool {
    !EBPF_OBJECT.is_empty()
}
