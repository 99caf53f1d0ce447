//! `cargo xtask scale`: build the agent (release) and run the agent-scale
//! benchmark (`overlay-tests`' `overlay-scale` binary): N Nodes through the
//! test API server, time to the maps, update latency, memory.

use std::process::Command;

#[derive(clap::Args)]
pub struct ScaleArgs {
    /// Arguments for the benchmark: --nodes N (5000), --updates N (200),
    /// --poll-pause-us N (0), --out FILE (e.g. docs/benchmarks/scale.md),
    /// --agent-log FILE (keeps the agent's log, which times each update's stages).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

pub fn scale(args: &ScaleArgs) -> anyhow::Result<()> {
    crate::cargo(&["build", "--release", "--package", "overlay-agent", "--package", "overlay-tests", "--bin", "overlay-agent", "--bin", "overlay-scale"])?;
    let root = crate::workspace_root();
    crate::run_harness(
        Command::new(root.join("target/release/overlay-scale"))
            .arg("--agent")
            .arg(root.join("target/release/overlay-agent"))
            .args(&args.args),
        "scale benchmark",
    )
}
