//! Which Rust toolchain builds the eBPF programs.
//!
//! Shared, std-only, by `cargo xtask setup` (which installs what is missing)
//! and by overlay-agent's build.rs (which builds with what it finds, as a
//! build-dependency), so the two always agree.
//!
//! The programs need `-Z build-std=core` for `bpfel-unknown-none`, hence a
//! toolchain that ships the standard library sources (`rust-src`), plus
//! `bpf-linker` built against an LLVM that matches that toolchain's.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

/// Env var forcing a rustup toolchain name for the eBPF build.
pub const OVERLAY_EBPF_TOOLCHAIN: &str = "OVERLAY_EBPF_TOOLCHAIN";
/// rustup name under which Debian's Rust (`/usr`) is linked.
pub const DEBIAN_TOOLCHAIN: &str = "debian-web";
/// Where Debian's rust-web-src puts the library sources.
const DEBIAN_SYSROOT: &str = "/usr";

/// A toolchain that can build the programs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EbpfToolchain {
    /// rustup toolchain name, passed to `rustup run`.
    pub name: String,
    /// Whether the build needs `RUSTC_BOOTSTRAP=1` (a stable toolchain
    /// standing in for nightly to get `-Z build-std`).
    pub needs_bootstrap: bool,
    /// Why this one was chosen, for humans.
    pub reason: String,
}

/// What is missing for an eBPF build, and how to get it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    /// One line per missing piece.
    pub problems: Vec<String>,
    /// Commands that fix it on this kind of machine.
    pub fix: Vec<String>,
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "no toolchain can build the eBPF programs:")?;
        for problem in &self.problems {
            writeln!(f, "  - {problem}")?;
        }
        writeln!(f, "fix it with `cargo xtask setup` (as root), or by hand:")?;
        for command in &self.fix {
            writeln!(f, "  {command}")?;
        }
        Ok(())
    }
}

/// The commands that install the Debian route (rustc-web 1.96 + LLVM 22).
pub fn debian_install_commands() -> Vec<String> {
    vec![
        "apt-get update".to_owned(),
        "apt-get install -y rustc-web cargo-web rust-web-src llvm-22-dev".to_owned(),
        "LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --version 0.13.0 --no-default-features --features llvm-22".to_owned(),
        format!("rustup toolchain link {DEBIAN_TOOLCHAIN} {DEBIAN_SYSROOT}"),
    ]
}

/// The commands for the usual laptop route.
pub fn nightly_install_commands() -> Vec<String> {
    vec![
        "rustup toolchain install nightly --component rust-src".to_owned(),
        "cargo install bpf-linker".to_owned(),
    ]
}

/// Finds a toolchain that can build the programs, in this order:
/// `$OVERLAY_EBPF_TOOLCHAIN`, rustup's nightly with rust-src, Debian's
/// rustc-web linked into rustup as `debian-web`.
pub fn detect() -> Result<EbpfToolchain, Missing> {
    let mut problems = Vec::new();
    let linker = find_bpf_linker();
    if linker.is_none() {
        problems.push("bpf-linker is not on PATH nor in ~/.cargo/bin".to_owned());
    }
    let installed = rustup_toolchains();
    if installed.is_none() {
        problems.push("rustup is not installed".to_owned());
    }
    let installed = installed.unwrap_or_default();

    let mut chosen = None;
    if let Ok(name) = env::var(OVERLAY_EBPF_TOOLCHAIN) {
        if has_rust_src(&name) {
            chosen = Some(EbpfToolchain {
                needs_bootstrap: !name.starts_with("nightly"),
                reason: format!("{OVERLAY_EBPF_TOOLCHAIN}={name}"),
                name,
            });
        } else {
            problems.push(format!(
                "{OVERLAY_EBPF_TOOLCHAIN}={name}, but that toolchain has no rust-src"
            ));
        }
    } else {
        let nightly = installed.iter().find(|t| t.starts_with("nightly"));
        match nightly {
            Some(nightly) if has_rust_src(nightly) => {
                chosen = Some(EbpfToolchain {
                    name: "nightly".to_owned(),
                    needs_bootstrap: false,
                    reason: format!("rustup's {nightly} has rust-src"),
                });
            }
            Some(nightly) => problems.push(format!("rustup's {nightly} has no rust-src")),
            None => problems.push("rustup has no nightly toolchain".to_owned()),
        }
        if chosen.is_none() {
            if installed.iter().any(|t| t == DEBIAN_TOOLCHAIN) && has_rust_src(DEBIAN_TOOLCHAIN) {
                chosen = Some(EbpfToolchain {
                    name: DEBIAN_TOOLCHAIN.to_owned(),
                    needs_bootstrap: true,
                    reason: format!(
                        "rustup's nightly cannot build core; Debian's rustc-web ships rust-src \
                         (linked as `{DEBIAN_TOOLCHAIN}`, built with RUSTC_BOOTSTRAP=1)"
                    ),
                });
            } else {
                problems.push(format!(
                    "no `{DEBIAN_TOOLCHAIN}` toolchain with rust-src (Debian's rustc-web + rust-web-src)"
                ));
            }
        }
    }

    match (chosen, linker) {
        (Some(toolchain), Some(_)) => Ok(toolchain),
        (_, _) => {
            let debian = Path::new("/etc/debian_version").exists();
            Err(Missing {
                problems,
                fix: if debian {
                    debian_install_commands()
                } else {
                    nightly_install_commands()
                },
            })
        }
    }
}

/// `bpf-linker` on PATH, or in cargo's bin directory (which a fresh root
/// shell may not have on PATH yet).
pub fn find_bpf_linker() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = env::var_os("PATH")
        .map(|p| env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.push(cargo_bin_dir());
    dirs.into_iter()
        .map(|d| d.join("bpf-linker"))
        .find(|p| p.is_file())
}

/// `$CARGO_HOME/bin`, defaulting to `~/.cargo/bin`.
pub fn cargo_bin_dir() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

/// Names of the installed rustup toolchains, without the host triple.
fn rustup_toolchains() -> Option<Vec<String>> {
    let out = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(|full| {
                // "nightly-x86_64-unknown-linux-gnu" → "nightly"; custom names stay.
                full.split_once("-x86_64-")
                    .or_else(|| full.split_once("-aarch64-"))
                    .map_or(full, |(name, _)| name)
                    .to_owned()
            })
            .collect(),
    )
}

/// Whether `rustup run <toolchain>` has the library sources `-Z build-std` needs.
fn has_rust_src(toolchain: &str) -> bool {
    let Ok(out) = Command::new("rustup")
        .args(["run", toolchain, "rustc", "--print", "sysroot"])
        // Never let rustup try to download a toolchain it lacks.
        .env("RUSTUP_AUTO_INSTALL", "0")
        .output()
    else {
        return false;
    };
    if !out.status.success() {
        return false;
    }
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    sysroot
        .join("lib/rustlib/src/rust/library/core/Cargo.toml")
        .is_file()
}
