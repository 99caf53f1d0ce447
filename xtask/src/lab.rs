//! `cargo xtask lab`: build the agent and the lab, then run the multi-node
//! lab (`overlay-tests`' `overlay-lab` binary) with these arguments.

use std::process::Command;

#[derive(clap::Args)]
pub struct LabArgs {
    /// Arguments for the lab: --nodes N, --pods N, --decap auto|xdp|xdp-generic|tc,
    /// --forward kernel|bpf, --topology flat|routed, --underlay wire|container, --backend vxlan|host-gw,
    /// --direct-routing, --flannel-nodes K (the last K nodes run flannel),
    /// --flannel-backend vxlan|host-gw, --hand-programmed-flannel,
    /// --kubernetes (a real control plane), --keep (leave it up), --down
    /// (remove kept labs). `overlay-lab --help` says more.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

pub fn lab(args: &LabArgs) -> anyhow::Result<()> {
    crate::cargo(&["build", "--package", "overlay-agent", "--package", "overlay-tests", "--bins"])?;
    let root = crate::workspace_root();
    crate::run_harness(
        Command::new(root.join("target/debug/overlay-lab"))
            .arg("--agent")
            .arg(root.join("target/debug/overlay-agent"))
            .args(&args.args),
        "lab",
    )
}
