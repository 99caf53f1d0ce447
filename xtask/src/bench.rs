//! `cargo xtask bench`: build the agent and the bench in release mode, then
//! run the benchmark (`overlay-tests`' `overlay-bench` binary).

use std::{path::PathBuf, process::Command};

use anyhow::Context as _;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Smoke test: 1 round of 1 s per test, written to target/bench-quick
    /// unless --out says otherwise. Proves every variant moves traffic; the
    /// figures mean nothing.
    #[arg(long)]
    quick: bool,
    /// Rounds (default 5); every test runs once per variant in each.
    #[arg(long)]
    repeats: Option<usize>,
    /// Seconds per test (default 4).
    #[arg(long)]
    seconds: Option<u32>,
    /// Where results.md, results.json and results.svg go (default
    /// docs/benchmarks). A full run of the default variants into the
    /// default directory also updates the README's summary line.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Comma-separated variants (default raw,kernel-host-gw,kernel-vxlan,
    /// vxlan,host-gw); design comparisons add vxlan-tc, vxlan-xdp-generic,
    /// host-gw-xdp, vxlan-bpf-forward, host-gw-bpf-forward, vxlan-tc-bpf-forward.
    #[arg(long)]
    variants: Option<String>,
    /// The CPU the tools run on and whose time is accounted (default: the
    /// last), or `all` for no pinning.
    #[arg(long)]
    cpu: Option<String>,
    /// Measure nothing: re-render results.md and results.svg from this
    /// results.json.
    #[arg(long)]
    render: Option<PathBuf>,
}

pub fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    let root = crate::workspace_root();
    let default_out = root.join("docs/benchmarks");
    let out = match &args.out {
        Some(out) => std::path::absolute(out).context("resolving --out")?,
        None if args.quick => root.join("target/bench-quick"),
        None => default_out.clone(),
    };
    // Measuring wants optimised user space; the eBPF programs are always
    // built in release mode by overlay-agent's build script.
    crate::cargo(&["build", "--release", "--package", "overlay-agent", "--package", "overlay-tests", "--bins"])?;
    let mut cmd = Command::new(root.join("target/release/overlay-bench"));
    cmd.arg("--agent").arg(root.join("target/release/overlay-agent")).arg("--out").arg(&out);
    if args.quick {
        cmd.arg("--quick");
    }
    if let Some(repeats) = args.repeats {
        cmd.args(["--repeats", &repeats.to_string()]);
    }
    if let Some(seconds) = args.seconds {
        cmd.args(["--seconds", &seconds.to_string()]);
    }
    if let Some(variants) = &args.variants {
        cmd.args(["--variants", variants]);
    }
    if let Some(cpu) = &args.cpu {
        cmd.args(["--cpu", cpu]);
    }
    if let Some(render) = &args.render {
        cmd.arg("--render").arg(std::path::absolute(render).context("resolving --render")?);
    }
    // The README quotes the project's reference run only.
    if out == default_out && !args.quick && args.variants.is_none() {
        cmd.arg("--readme").arg(root.join("README.md"));
    }
    crate::run_harness(&mut cmd, "bench")
}
