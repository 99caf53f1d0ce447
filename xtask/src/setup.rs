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
    match ensure_flanneld() {
        Ok(path) => eprintln!("setup: flanneld {FLANNEL_VERSION}: {}", path.display()),
        // The lab's flannel nodes and the interop tests need it; everything
        // else does not, so this does not stop setup.
        Err(err) => eprintln!("setup: WARNING: cannot build flanneld {FLANNEL_VERSION}: {err:#}"),
    }
    eprintln!("setup: eBPF toolchain `{}`: {}", chosen.name, chosen.reason);
    Ok(chosen)
}

/// The flannel release the lab's flannel nodes and the interop tests run
/// (`tests/src/lib.rs` has the same constant).
pub const FLANNEL_VERSION: &str = "v0.28.10";
const FLANNEL_MODULE: &str = "github.com/flannel-io/flannel";

/// Builds flanneld from the flannel module at [`FLANNEL_VERSION`], once per
/// machine, into `~/.cache/overlay/flanneld-<version>/flanneld`.
///
/// Not `go install module@version`: flannel's main package imports the
/// tencent-vpc backend, whose dependency
/// `github.com/tencentcloud/tencentcloud-sdk-go/tencentcloud/vpc@v1.3.188`
/// the Go module proxy refuses (403, "This module version is not
/// available"). So the build is a scratch module holding flannel's own
/// main.go without that one import, with flannel's go.mod and go.sum; every
/// other backend (vxlan, host-gw, ...) is flannel's code as released.
fn ensure_flanneld() -> anyhow::Result<std::path::PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is unset")?;
    let dir = Path::new(&home).join(".cache/overlay").join(format!("flanneld-{FLANNEL_VERSION}"));
    let binary = dir.join("flanneld");
    if binary.is_file() {
        return Ok(binary);
    }
    let go = ["/usr/local/go/bin/go", "/usr/lib/go/bin/go"]
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.is_file())
        .or_else(|| on_path("go").then(|| "go".into()))
        .context("no Go toolchain (install Go 1.24 or later)")?;
    let started = std::time::Instant::now();
    let module = format!("{FLANNEL_MODULE}@{FLANNEL_VERSION}");
    run(Command::new(&go).args(["mod", "download", &module]))?;
    let cache = Command::new(&go).args(["env", "GOMODCACHE"]).output().context("go env GOMODCACHE")?;
    let source = Path::new(String::from_utf8_lossy(&cache.stdout).trim()).join(&module);
    let scratch = dir.join("src");
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let main = std::fs::read_to_string(source.join("main.go")).with_context(|| format!("reading {}/main.go", source.display()))?;
    let main: String = main.lines().filter(|l| !l.contains("pkg/backend/tencentvpc")).map(|l| format!("{l}\n")).collect();
    std::fs::write(scratch.join("main.go"), main)?;
    let go_mod = std::fs::read_to_string(source.join("go.mod"))?;
    let go_mod = go_mod.replacen(&format!("module {FLANNEL_MODULE}"), "module overlay.invalid/flanneld", 1);
    std::fs::write(scratch.join("go.mod"), go_mod)?;
    std::fs::copy(source.join("go.sum"), scratch.join("go.sum"))?;
    run(Command::new(&go).args(["mod", "edit", &format!("-require={module}")]).current_dir(&scratch))?;
    let partial = dir.join("flanneld.partial");
    run(Command::new(&go)
        .args(["build", "-mod=mod", "-o"])
        .arg(&partial)
        .arg(format!("-ldflags=-X {FLANNEL_MODULE}/pkg/version.Version={FLANNEL_VERSION}"))
        .arg(".")
        .current_dir(&scratch))?;
    std::fs::rename(&partial, &binary)?;
    eprintln!("setup: built flanneld {FLANNEL_VERSION} in {:.0?}", started.elapsed());
    Ok(binary)
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
