//! Rebuilds the programs when bpf-linker changes (a new LLVM can change the
//! emitted object). Not finding it is fine here: this crate's library target
//! is also compiled for the host as a build-dependency of overlay-agent.
fn main() {
    if let Ok(bpf_linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", bpf_linker.display());
    }
}
