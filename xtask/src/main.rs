//! `cargo xtask`: everything that is not a plain cargo command.
//!
//! - `setup`: install what the eBPF build and the tests need (idempotent).
//! - `build`: build the workspace with the real eBPF programs.
//! - `test`: setup, then every test (the README's test command; CI runs it),
//!   and load.rs, packets.rs and pod_tunnels.rs on Debian's 6.1 kernel under QEMU.
//! - `fuzz`: the adversarial suite at full size (`tests/tests/fuzz.rs`).
//! - `lab`: setup, build, then the multi-node lab (see `tests/src/lab.rs`).
//! - `bench`: setup, release build, then the benchmark (`tests/src/bench.rs`
//!   and its modules in `tests/src/bench/`).
//! - `vmtest`: the privileged integration tests on other kernels, under QEMU.
//! - `lint`: clippy over the user-space crates.
//! - `run`: build, then run the agent with the given arguments.

mod bench;
mod bpffs;
mod gotools;
mod lab;
mod scale;
mod setup;
mod vmtest;

use std::process::{Command, ExitCode};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "overlay's developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the eBPF toolchain and test tools that are missing (as root),
    /// or print the commands to do so. Says which toolchain it chose and why.
    Setup,
    /// Build the default members, with the eBPF programs embedded in the agent.
    Build {
        /// Build in release mode.
        #[arg(long)]
        release: bool,
    },
    /// The adversarial suite alone, at full size: generated frames through
    /// the programs under BPF_PROG_TEST_RUN, judged by the model in
    /// tests/tests/fuzz.rs (`cargo xtask test` runs 20,000 cases of it).
    Fuzz {
        /// Generated cases; each sends one frame through the pod program
        /// and, for most, one through both ingress programs.
        #[arg(long, default_value_t = 100_000)]
        cases: u64,
        /// Seed of the run (decimal or 0x-hex); each case gets its own seed
        /// from it, printed when the case fails.
        #[arg(long)]
        seed: Option<String>,
        /// Judge known open defects too (KNOWN_DEFECTS in the suite).
        #[arg(long)]
        strict: bool,
    },
    /// Run setup, then all tests (unit and real-kernel integration tests).
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build everything, start a multi-node cluster in network namespaces
    /// (one agent per node), prove all-pairs pod connectivity, tear down.
    Lab(lab::LabArgs),
    /// Agent scale benchmark: 5,000 Nodes through the test API server into
    /// the maps; update latency; memory (docs/benchmarks/scale.md).
    Scale(scale::ScaleArgs),
    /// Benchmark raw underlay, kernel host-gw, flannel's kernel vxlan and our
    /// datapath side by side, interleaved; writes docs/benchmarks/.
    Bench(bench::BenchArgs),
    /// Boot each kernel under QEMU (Debian's 6.1 cloud kernel by default)
    /// and run the privileged integration tests inside it, per kernel.
    Vmtest(vmtest::VmTestArgs),
    /// Clippy over the user-space crates, warnings denied.
    Lint,
    /// Build everything, then run the agent on this machine with these
    /// arguments (e.g. `cargo xtask run -- inspect`). Run it inside a lab
    /// namespace, not on a machine whose network matters.
    Run {
        /// Arguments for overlay-agent.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    let command = Cli::parse().command;
    if matches!(command, Task::Test { .. } | Task::Lab(_) | Task::Scale(_) | Task::Bench(_)) {
        match bpffs::run_with_own_bpffs_if_missing() {
            Ok(None) => {}
            Ok(Some(code)) => return code,
            Err(err) => {
                eprintln!("xtask: error: {err:#}");
                return ExitCode::FAILURE;
            }
        }
    }
    let result = match command {
        Task::Setup => setup::setup().map(drop),
        Task::Build { release } => setup::setup().and_then(|_| build(release)),
        Task::Test { args } => setup::setup().and_then(|_| test(&args)),
        Task::Fuzz { cases, seed, strict } => setup::setup().and_then(|_| fuzz(cases, seed.as_deref(), strict)),
        Task::Lab(args) => setup::setup().and_then(|_| lab::lab(&args)),
        Task::Scale(args) => setup::setup().and_then(|_| scale::scale(&args)),
        Task::Bench(args) => setup::setup().and_then(|_| bench::bench(&args)),
        Task::Vmtest(args) => setup::setup().and_then(|_| vmtest::vmtest(&args)),
        Task::Lint => lint(),
        Task::Run { args } => setup::setup().and_then(|_| run_agent(&args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one of the tests crate's harnesses (lab, bench, scale) and waits.
/// The harnesses handle Ctrl-C themselves (their guards clean up), so
/// xtask ignores it rather than dying before them.
fn run_harness(command: &mut Command, what: &str) -> anyhow::Result<()> {
    use anyhow::Context as _;
    ctrlc::set_handler(|| {}).context("installing the Ctrl-C handler")?;
    let status = command.current_dir(workspace_root()).status().with_context(|| format!("running the {what}"))?;
    if !status.success() {
        anyhow::bail!("the {what} failed ({status})");
    }
    Ok(())
}

/// `cargo <args>` from the workspace root, with the real eBPF build required.
fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(&cargo)
        .args(args)
        .current_dir(workspace_root())
        .env("OVERLAY_EBPF_BUILD", "require")
        .status()
        .with_context(|| format!("running {cargo}"))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn build(release: bool) -> anyhow::Result<()> {
    let mut args = vec!["build"];
    if release {
        args.push("--release");
    }
    cargo(&args)
}

fn test(extra: &[String]) -> anyhow::Result<()> {
    // The lab tests run the agent binary; `cargo test` alone does not build it.
    cargo(&["build"])?;
    let mut args = vec!["test", "--"];
    // Root-only tests are `#[ignore = "needs root: ..."]`, so a plain
    // `cargo test` reports them as ignored, never as passed. As root, and
    // under CI (where they then fail unless root), all of them run.
    if setup::effective_uid() == 0 || std::env::var_os("CI").is_some() {
        args.push("--include-ignored");
    }
    args.extend(extra.iter().map(String::as_str));
    // They need what only the VM has (kernel modules the CI host's kernel
    // lacks, a VM's NICs: tests/tests/pod_tunnels.rs, nic_underlay.rs say
    // why), so they cannot pass here, whatever else the arguments ask for
    // (`-- --nocapture`, a filter).
    for (test, why) in vmtest::VM_ONLY_TESTS {
        args.extend(["--skip", test]);
        eprintln!("xtask: {test} is left to the VM stage ({why})");
    }
    cargo(&args)?;
    // The eBPF crate is no default member (it builds for bpfel); its pure
    // helpers' unit tests run on the host.
    if extra.is_empty() {
        cargo(&["test", "--package", "overlay-ebpf", "--lib"])?;
    }
    // The clsact fallback and the verifier of an older kernel, every full
    // run: load.rs, packets.rs and pod_tunnels.rs on Debian's 6.1 under QEMU.
    if extra.is_empty() {
        vmtest::ci()
    } else {
        eprintln!("xtask: test arguments given, so the VM stage (load, packets, pod_tunnels, nic_underlay on Debian's 6.1) is skipped; `cargo xtask vmtest` runs it");
        Ok(())
    }
}

fn fuzz(cases: u64, seed: Option<&str>, strict: bool) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut command = Command::new(&cargo);
    command
        // The generated cases need root, so libtest marks them ignored:
        // without --include-ignored this ran only the model's own test and
        // said ok.
        .args(["test", "--package", "overlay-tests", "--test", "fuzz", "--", "--include-ignored", "--nocapture"])
        .current_dir(workspace_root())
        .env("OVERLAY_EBPF_BUILD", "require")
        .env("OVERLAY_FUZZ_CASES", cases.to_string())
        .env("OVERLAY_FUZZ_STRICT", if strict { "1" } else { "0" });
    if let Some(seed) = seed {
        command.env("OVERLAY_FUZZ_SEED", seed);
    }
    let status = command.status().with_context(|| format!("running {cargo}"))?;
    if !status.success() {
        bail!("the fuzz suite failed ({status})");
    }
    Ok(())
}

fn run_agent(args: &[String]) -> anyhow::Result<()> {
    cargo(&["build", "--package", "overlay-agent"])?;
    let agent = workspace_root().join("target/debug/overlay-agent");
    let status = Command::new(&agent)
        .args(args)
        .status()
        .with_context(|| format!("running {}", agent.display()))?;
    if !status.success() {
        bail!("overlay-agent exited with {status}");
    }
    Ok(())
}

fn lint() -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(cargo)
        .args(["clippy", "--all-targets", "--", "-D", "warnings"])
        .current_dir(workspace_root())
        // Lints the user-space code; the eBPF crate builds in `build`/`test`.
        .env("OVERLAY_EBPF_BUILD", "skip")
        .status()?;
    if !status.success() {
        bail!("clippy found problems");
    }
    Ok(())
}

/// The workspace root (xtask lives one level below it).
fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_owned()
}
