//! `cargo xtask setup`: make this machine able to build and test overlay.
//!
//! Idempotent: every step checks before it acts. As root on Debian it
//! installs what is missing; elsewhere it prints the commands to run.

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

use crate::toolchain::{self, DEBIAN_TOOLCHAIN, EbpfToolchain};

/// Commands the tests and the lab run, and the Debian package for each.
const TEST_TOOLS: [(&str, &str); 12] = [
    ("ethtool", "ethtool"),
    ("ping", "iputils-ping"),
    ("ip", "iproute2"),
    ("nsenter", "util-linux"),
    ("bpftool", "bpftool"),
    ("iperf3", "iperf3"),
    ("tcpdump", "tcpdump"),
    ("tshark", "tshark"),
    ("sockperf", "sockperf"),
    // A Service's DNAT and kube-proxy's INVALID drop, played in the lab.
    ("iptables", "iptables"),
    // The real control plane's store (and flannel's etcd mode's).
    ("etcd", "etcd-server"),
    // The agent's etcd client (etcd-client) compiles etcd's .proto files.
    ("protoc", "protobuf-compiler"),
];

/// Makes sure an eBPF toolchain and the test tools are present, and says
/// which toolchain the build will use.
pub fn setup() -> anyhow::Result<EbpfToolchain> {
    let is_root = effective_uid() == 0;
    let debian = Path::new("/etc/debian_version").exists();
    let can_install = is_root && debian;

    let missing_tools: Vec<_> = TEST_TOOLS
        .iter()
        .filter(|(cmd, _)| !on_path(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();

    let chosen = match toolchain::detect() {
        Ok(chosen) => chosen,
        Err(missing) if can_install => {
            eprintln!("setup: {}", missing.to_string().trim_end());
            eprintln!("setup: installing the Debian eBPF toolchain (rustc-web 1.96 + LLVM 22)");
            install_debian_toolchain()?;
            toolchain::detect().map_err(|m| anyhow::anyhow!("still missing after install: {m}"))?
        }
        Err(missing) => bail!("{missing}"),
    };

    if !missing_tools.is_empty() {
        if can_install {
            eprintln!("setup: installing test tools: {}", missing_tools.join(" "));
            apt_install(&missing_tools)?;
        } else {
            eprintln!(
                "setup: the tests need these packages: {} (apt-get install -y {})",
                missing_tools.join(" "),
                missing_tools.join(" ")
            );
        }
    }
    eprintln!("setup: eBPF toolchain `{}`: {}", chosen.name, chosen.reason);
    Ok(chosen)
}

fn install_debian_toolchain() -> anyhow::Result<()> {
    let has_src = Path::new("/usr/lib/rustlib/src/rust/library/core/Cargo.toml").is_file();
    let has_llvm = Path::new("/usr/lib/llvm-22/bin/llvm-config").is_file();
    if !has_src || !has_llvm {
        apt_install(&["rustc-web", "cargo-web", "rust-web-src", "llvm-22-dev"])?;
    }
    if toolchain::find_bpf_linker().is_none() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        run(Command::new(cargo)
            .args([
                "install", "bpf-linker", "--version", "0.13.0",
                "--no-default-features", "--features", "llvm-22",
            ])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"))?;
    }
    let linked = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.starts_with(DEBIAN_TOOLCHAIN)))
        .unwrap_or(false);
    if !linked {
        run(Command::new("rustup").args(["toolchain", "link", DEBIAN_TOOLCHAIN, "/usr"]))?;
    }
    Ok(())
}

fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("setup: running {cmd:?}");
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn on_path(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
        || ["/usr/sbin", "/sbin"].iter().any(|d| Path::new(d).join(cmd).is_file())
}

fn effective_uid() -> u32 {
    // No libc dependency in xtask: `id -u` answers the same question.
    Command::new("id")
        .arg("-u")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(u32::MAX)
}
