//! `cargo xtask lab`: build the agent and load the datapath into a
//! throwaway network namespace, printing what the kernel accepted.
//!
//! Everything it creates (namespace, veths, pins) is removed on success,
//! on failure and on Ctrl-C.

use std::process::Command;

use anyhow::{Context as _, bail};

#[derive(clap::Args)]
pub struct LabArgs {
    /// Where decapsulation hooks in: xdp, xdp-generic or tc.
    #[arg(long, default_value = "xdp")]
    decap: String,
}

/// A network namespace deleted on drop (with every interface in it).
struct LabNetns(String);

impl LabNetns {
    fn create(name: String) -> anyhow::Result<Self> {
        ip(&["netns", "add", &name])?;
        Ok(Self(name))
    }
}

impl Drop for LabNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        eprintln!("lab: removed namespace {}", self.0);
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new("ip").args(args).status().context("running ip")?;
    if !status.success() {
        bail!("ip {} failed ({status})", args.join(" "));
    }
    Ok(())
}

pub fn lab(args: &LabArgs) -> anyhow::Result<()> {
    crate::cargo(&["build", "--package", "overlay-agent"])?;
    // Ctrl-C reaches the whole foreground process group: the agent stops,
    // its failure returns here, and the guard below cleans up.
    ctrlc::set_handler(|| eprintln!("lab: interrupted, cleaning up"))
        .context("installing the Ctrl-C handler")?;

    let ns = LabNetns::create(format!("ovl-lab-{}", std::process::id()))?;
    ip(&["-n", &ns.0, "link", "add", "ul0", "type", "veth", "peer", "name", "ul1"])?;
    ip(&["-n", &ns.0, "link", "set", "ul0", "up"])?;
    ip(&["-n", &ns.0, "link", "set", "ul1", "up"])?;
    eprintln!("lab: namespace {} with veth ul0<->ul1", ns.0);

    let agent = crate::workspace_root().join("target/debug/overlay-agent");
    let status = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.0))
        .arg(&agent)
        .args(["check", "--iface", "ul0", "--decap", &args.decap])
        .status()
        .context("running overlay-agent check")?;
    if !status.success() {
        bail!("overlay-agent check failed ({status})");
    }
    Ok(())
}
