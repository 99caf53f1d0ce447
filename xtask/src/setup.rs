//! `cargo xtask setup`: make this machine able to build and test overlay.
//!
//! Idempotent: every step checks before it acts. As root on Debian it
//! installs what is missing; elsewhere it prints the commands to run.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use overlay_toolchain::{self as toolchain, DEBIAN_TOOLCHAIN, EbpfToolchain};

use crate::gotools;

/// Commands the tests and the lab run, and the Debian package for each.
const TEST_TOOLS: [(&str, &str); 17] = [
    ("ethtool", "ethtool"),
    ("ping", "iputils-ping"),
    ("ip", "iproute2"),
    ("nsenter", "util-linux"),
    ("bpftool", "bpftool"),
    ("iperf3", "iperf3"),
    ("tcpdump", "tcpdump"),
    ("tshark", "tshark"),
    ("sockperf", "sockperf"),
    // A Service's DNAT and kube-proxy's INVALID drop, played in the lab;
    // the agent's FORWARD accept rules (iptables-nft, iptables-legacy).
    ("iptables", "iptables"),
    // `cargo xtask bench --profile`: cpu-clock samples with kernel stacks.
    ("perf", "linux-perf"),
    // The agent's masquerade table.
    ("nft", "nftables"),
    // tests/tests/image.rs runs the agent's image; with runc, as crun
    // refuses hybrid cgroup hosts.
    ("podman", "podman"),
    ("runc", "runc"),
    // The real control plane's store (and flannel's etcd mode's), and its certificates and keys.
    ("etcd", "etcd-server"),
    // The agent's etcd client (etcd-client) compiles etcd's .proto files.
    ("protoc", "protobuf-compiler"),
    ("openssl", "openssl"),
];

/// One of protobuf's own .proto files, which etcd's import.
const PROTOBUF_INCLUDES: &str = "/usr/include/google/protobuf/descriptor.proto";

/// Makes sure an eBPF toolchain and the test tools are present, and says
/// which toolchain the build will use.
pub fn setup() -> anyhow::Result<EbpfToolchain> {
    let is_root = effective_uid() == 0;
    let debian = Path::new("/etc/debian_version").exists();
    let can_install = is_root && debian;

    let mut missing_tools: Vec<_> = TEST_TOOLS
        .iter()
        .filter(|(cmd, _)| !on_path(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    // etcd's .proto files import protobuf's own (descriptor.proto, …), which
    // Debian ships apart from protoc; a machine without them fails the
    // agent's build in etcd-client's build script.
    if !Path::new(PROTOBUF_INCLUDES).exists() {
        missing_tools.push("libprotobuf-dev");
    }

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
    if can_install {
        setup_vm()?;
    } else if !vm_ready() {
        eprintln!("setup: `cargo xtask vmtest` needs root on Debian to install QEMU, busybox-static, kmod, virtiofsd and Debian's {VM_KERNEL_PACKAGE}");
    }
    match gotools::find_go() {
        Some(go) => {
            let bin = gotools::kubernetes(&go).context("building kube-apiserver, kube-controller-manager and kube-scheduler")?;
            eprintln!("setup: kubernetes {} control plane in {}", gotools::KUBERNETES_VERSION.trim(), bin.display());
            let bin = gotools::flanneld(&go).with_context(|| format!("building flanneld {}", gotools::FLANNEL_VERSION.trim()))?;
            eprintln!("setup: flanneld {} in {}", gotools::FLANNEL_VERSION.trim(), bin.display());
            let bin = gotools::cni_plugins(&go).with_context(|| format!("building the CNI plugins {}", gotools::CNI_PLUGINS_VERSION.trim()))?;
            eprintln!("setup: CNI plugins {} (bridge, host-local, portmap) in {}", gotools::CNI_PLUGINS_VERSION.trim(), bin.display());
        }
        None => eprintln!(
            "setup: no `go` (on PATH or /usr/local/go/bin): the Kubernetes tests and `lab --kubernetes` need kube-apiserver, \
             the flannel interop tests and `lab --flannel-nodes` need flanneld, both built from the Go module proxy; \
             install Go >= 1.26 from https://go.dev/dl/ and run `cargo xtask setup` again"
        ),
    }
    eprintln!("setup: eBPF toolchain `{}`: {}", chosen.name, chosen.reason);
    Ok(chosen)
}

/// Debian's meta-package for the kernel `cargo xtask vmtest` boots by
/// default: the cloud kernel of the release this machine runs (6.1 on
/// bookworm).
pub const VM_KERNEL_PACKAGE: &str = "linux-image-cloud-amd64";
/// Where Debian's busybox-static installs busybox.
pub const BUSYBOX: &str = "/bin/busybox";
/// The virtiofsd release `setup` builds (Debian 12 does not package it).
const VIRTIOFSD_VERSION: &str = "1.14.0";
/// Debian packages the VM tests need: QEMU, a static busybox for the
/// initramfs, kmod's depmod for the kernel's module index, and the
/// libraries virtiofsd builds against; xz for the compressed modules of
/// newer kernels (6.12), which busybox's `insmod` cannot read.
const VM_PACKAGES: [(&str, &str); 6] = [
    ("/usr/bin/qemu-system-x86_64", "qemu-system-x86"),
    (BUSYBOX, "busybox-static"),
    ("/usr/sbin/depmod", "kmod"),
    ("/usr/bin/xz", "xz-utils"),
    ("/usr/include/seccomp.h", "libseccomp-dev"),
    ("/usr/include/cap-ng.h", "libcap-ng-dev"),
];

/// `~/.cache/overlay/vmtest`: kernels, initramfs images, virtiofsd.
pub fn vm_cache_dir() -> PathBuf {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/overlay/vmtest")
}

pub fn virtiofsd_binary() -> PathBuf {
    vm_cache_dir().join(format!("virtiofsd-{VIRTIOFSD_VERSION}/bin/virtiofsd"))
}

/// Where the default kernel's package is extracted; its name is kept in
/// `default-kernel` next to it.
fn kernels_dir() -> PathBuf {
    vm_cache_dir().join("kernels")
}

/// The `vmlinuz` of the default VM kernel, as extracted by `setup`.
pub fn default_vm_kernel() -> anyhow::Result<PathBuf> {
    let marker = kernels_dir().join("default-kernel");
    let package = fs::read_to_string(&marker)
        .with_context(|| format!("reading {} (run `cargo xtask setup` as root)", marker.display()))?;
    vmlinuz_in(&kernels_dir().join(package.trim()))
}

fn vm_ready() -> bool {
    VM_PACKAGES.iter().all(|(file, _)| Path::new(file).exists())
        && virtiofsd_binary().is_file()
        && default_vm_kernel().is_ok()
}

/// Installs what `cargo xtask vmtest` needs, each step only when missing:
/// the Debian packages, virtiofsd (from crates.io), and the default kernel,
/// downloaded with `apt-get download` and extracted into the cache rather
/// than installed, so the host's boot setup is never touched.
fn setup_vm() -> anyhow::Result<()> {
    let missing: Vec<&str> = VM_PACKAGES.iter().filter(|(file, _)| !Path::new(file).exists()).map(|(_, pkg)| *pkg).collect();
    if !missing.is_empty() {
        eprintln!("setup: installing for the VM tests: {}", missing.join(" "));
        apt_install(&missing)?;
    }
    if !virtiofsd_binary().is_file() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let root = vm_cache_dir().join(format!("virtiofsd-{VIRTIOFSD_VERSION}"));
        run(Command::new(cargo)
            .args(["install", "virtiofsd", "--locked", "--version", VIRTIOFSD_VERSION, "--root"])
            .arg(&root))?;
    }
    let package = kernel_package()?;
    extract_kernel(&package, &[])?;
    fs::write(kernels_dir().join("default-kernel"), format!("{package}\n"))?;
    Ok(())
}

/// Downloads `package` (a versioned `linux-image-*`) with `apt-get
/// download` and the given apt options, extracts it into the cache and
/// indexes its modules; once. Returns the extracted tree.
fn extract_kernel(package: &str, apt_options: &[String]) -> anyhow::Result<PathBuf> {
    let tree = kernels_dir().join(package);
    let complete = tree.join(".complete");
    if complete.exists() {
        return Ok(tree);
    }
    eprintln!("setup: extracting {package} into {} for the VM tests", tree.display());
    let download = kernels_dir().join("download");
    let _ = fs::remove_dir_all(&download);
    let _ = fs::remove_dir_all(&tree);
    fs::create_dir_all(&download)?;
    run(Command::new("apt-get").args(apt_options).args(["download", "-q", package]).current_dir(&download))?;
    let deb = fs::read_dir(&download)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download {package} left no .deb"))?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))?;
    let modules = tree.join("lib/modules");
    for version in fs::read_dir(&modules).with_context(|| format!("reading {}", modules.display()))? {
        let version = version?.file_name();
        run(Command::new("/usr/sbin/depmod").arg("-b").arg(&tree).arg(&version))?;
    }
    fs::remove_dir_all(&download)?;
    fs::write(&complete, "")?;
    Ok(tree)
}

/// A Debian cloud kernel `cargo xtask vmtest --kernel NAME` fetches by
/// name, from Debian's archive through apt lists of its own (so the
/// host's apt sources stay as they are).
struct DebianKernel {
    name: &'static str,
    /// `deb` lines of the suites that carry it.
    sources: &'static str,
    /// The meta-package that depends on the current versioned kernel.
    meta_package: &'static str,
    note: &'static str,
}

const DEBIAN_KERNELS: [DebianKernel; 3] = [
    DebianKernel {
        name: "6.1",
        sources: "deb http://deb.debian.org/debian bookworm main\ndeb http://deb.debian.org/debian-security bookworm-security main\n",
        meta_package: "linux-image-cloud-amd64",
        note: "Debian 12's kernel, the default",
    },
    DebianKernel {
        name: "6.12",
        sources: "deb http://deb.debian.org/debian-security bookworm-security main\n",
        meta_package: "linux-image-6.12-cloud-amd64",
        note: "Debian 13's kernel, as Debian 12 carries it",
    },
    DebianKernel {
        name: "5.10",
        sources: "deb http://deb.debian.org/debian bullseye main\ndeb http://deb.debian.org/debian-security bullseye-security main\n",
        meta_package: "linux-image-cloud-amd64",
        note: "Debian 11's kernel, below the datapath's 5.13",
    },
];

/// The names `--kernel` takes besides paths, for messages.
pub fn debian_kernel_names() -> String {
    DEBIAN_KERNELS.iter().map(|k| format!("{} ({})", k.name, k.note)).collect::<Vec<_>>().join("; ")
}

/// The `vmlinuz` of Debian's cloud kernel `name` (`6.1`, `6.12`, `5.10`),
/// downloaded and extracted into the cache the first time, or `None` for
/// a name not in [`DEBIAN_KERNELS`].
pub fn debian_kernel(name: &str) -> anyhow::Result<Option<PathBuf>> {
    let Some(kernel) = DEBIAN_KERNELS.iter().find(|k| k.name == name) else { return Ok(None) };
    let apt_dir = vm_cache_dir().join("apt").join(kernel.name);
    let lists = apt_dir.join("lists");
    fs::create_dir_all(lists.join("partial"))?;
    fs::create_dir_all(apt_dir.join("cache/archives/partial"))?;
    fs::create_dir_all(apt_dir.join("sources.list.d"))?;
    fs::write(apt_dir.join("sources.list"), kernel.sources)?;
    let options: Vec<String> = [
        format!("Dir::Etc::SourceList={}", apt_dir.join("sources.list").display()),
        format!("Dir::Etc::SourceParts={}", apt_dir.join("sources.list.d").display()),
        format!("Dir::State::Lists={}", lists.display()),
        format!("Dir::Cache={}", apt_dir.join("cache").display()),
        // apt's unprivileged `_apt` user cannot write under root's home.
        "APT::Sandbox::User=root".to_owned(),
    ]
    .into_iter()
    .flat_map(|o| ["-o".to_owned(), o])
    .collect();
    let depends = |options: &[String]| -> Option<String> {
        let output = Command::new("apt-cache").args(options).args(["depends", kernel.meta_package]).output().ok()?;
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .find_map(|l| l.trim().strip_prefix("Depends: "))
            .map(|p| p.trim().to_owned())
            .filter(|p| p.starts_with("linux-image-"))
    };
    let package = match depends(&options) {
        Some(package) if kernels_dir().join(&package).join(".complete").exists() => package,
        _ => {
            run(Command::new("apt-get").args(&options).args(["update", "-q"]))?;
            depends(&options).with_context(|| {
                format!("{} in {} names no linux-image package", kernel.meta_package, kernel.sources.trim().replace('\n', ", "))
            })?
        }
    };
    let tree = extract_kernel(&package, &options)?;
    vmlinuz_in(&tree).map(Some)
}

/// The `boot/vmlinuz-*` of an extracted kernel package.
fn vmlinuz_in(tree: &Path) -> anyhow::Result<PathBuf> {
    let boot = tree.join("boot");
    let entries = fs::read_dir(&boot).with_context(|| format!("reading {}", boot.display()))?;
    entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("vmlinuz-")))
        .with_context(|| format!("no vmlinuz-* in {}", boot.display()))
}

/// The versioned package `VM_KERNEL_PACKAGE` currently depends on
/// (`linux-image-6.1.0-NN-cloud-amd64`).
fn kernel_package() -> anyhow::Result<String> {
    let output = Command::new("apt-cache")
        .args(["depends", VM_KERNEL_PACKAGE])
        .output()
        .context("running apt-cache depends")?;
    let text = String::from_utf8_lossy(&output.stdout);
    let found = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .map(|p| p.trim().to_owned())
        .filter(|p| p.starts_with("linux-image-"));
    match found {
        Some(package) => Ok(package),
        None => {
            // Offline with a kernel already extracted: keep using it.
            let marker = kernels_dir().join("default-kernel");
            if let Ok(package) = fs::read_to_string(&marker) {
                return Ok(package.trim().to_owned());
            }
            bail!("apt-cache depends {VM_KERNEL_PACKAGE} names no linux-image package (run apt-get update)")
        }
    }
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

pub(crate) fn run(cmd: &mut Command) -> anyhow::Result<()> {
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

pub(crate) fn effective_uid() -> u32 {
    // No libc dependency in xtask: `id -u` answers the same question.
    Command::new("id")
        .arg("-u")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(u32::MAX)
}
