//! `cargo xtask bench`: build the agent and the bench in release mode, then
//! run the benchmark (`overlay-tests`' `overlay-bench` binary) with the
//! arguments given, untouched: the bench binary alone declares its flags
//! (`cargo xtask bench --help` prints them), so the two cannot drift.

use std::process::Command;

use anyhow::{Context as _, bail};

#[derive(clap::Args)]
// `--help` belongs to overlay-bench, which knows the flags.
#[command(disable_help_flag = true)]
pub struct BenchArgs {
    /// Arguments for overlay-bench: --quick, --repeats N, --seconds S,
    /// --variants a,b, --underlay wire|container|both, --cpu N|all,
    /// --out DIR, --render results.json, --profile (see --help).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

pub fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    let root = crate::workspace_root();
    // Measuring wants optimised user space; the eBPF programs are always
    // built in release mode by overlay-agent's build script.
    crate::cargo(&["build", "--release", "--package", "overlay-agent", "--package", "overlay-tests", "--bins"])?;
    // overlay-bench handles Ctrl-C itself (its guards clean up the labs);
    // xtask waits for it rather than dying first.
    ctrlc::set_handler(|| {}).context("installing the Ctrl-C handler")?;
    // Run from the caller's directory, so relative --out and --render mean
    // what they say; --root gives the bench its defaults (docs/benchmarks,
    // README.md) in the workspace.
    let status = Command::new(root.join("target/release/overlay-bench"))
        .arg("--agent")
        .arg(root.join("target/release/overlay-agent"))
        .arg("--root")
        .arg(&root)
        .args(&args.args)
        .status()
        .context("running the bench")?;
    if !status.success() {
        bail!("the bench failed ({status})");
    }
    Ok(())
}
