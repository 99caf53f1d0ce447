//! `cargo xtask bench`: build the agent and the bench in release mode, then
//! run the benchmark (`overlay-tests`' `overlay-bench` binary) with the
//! arguments given, untouched: the bench binary alone declares its flags
//! (`cargo xtask bench --help` prints them), so the two cannot drift.
//! `--underlay nic` is the one xtask reads: that underlay is a VM's NICs, so
//! the bench runs inside a VM xtask boots (`vmtest::bench`).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail};

#[derive(clap::Args)]
// `--help` belongs to overlay-bench, which knows the flags.
#[command(disable_help_flag = true)]
pub struct BenchArgs {
    /// Arguments for overlay-bench: --quick, --repeats N, --seconds S,
    /// --variants a,b, --underlay wire|container|both|nic, --cpu N|all,
    /// --out DIR, --render results.json, --profile (see --help).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

pub fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    let root = crate::workspace_root();
    // Measuring wants optimised user space; the eBPF programs are always
    // built in release mode by overlay-agent's build script.
    crate::cargo(&["build", "--release", "--package", "overlay-agent", "--package", "overlay-tests", "--bins"])?;
    if let Some(out) = nic_underlay_out(&args.args, &root)? {
        // The NIC underlay is a VM's NICs: the bench runs in that VM.
        let mut argv = vec![
            root.join("target/release/overlay-bench").display().to_string(),
            "--agent".to_owned(),
            root.join("target/release/overlay-agent").display().to_string(),
            "--root".to_owned(),
            root.display().to_string(),
        ];
        argv.extend(without_out(&args.args));
        argv.extend(["--out".to_owned(), out.display().to_string()]);
        return crate::vmtest::bench(argv, &out, NIC_BENCH_TIMEOUT);
    }
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

/// How long the NIC underlay's VM may take: boot, labs through an emulated
/// verifier, and the rounds (a default run took 20 min on 2026-12-02).
const NIC_BENCH_TIMEOUT: Duration = Duration::from_secs(150 * 60);

/// With `--underlay nic` (and not `--render`, which measures nothing): the
/// directory the bench writes, made absolute (the VM shares it writable):
/// `--out`, or the bench's default for the run (`target/bench-quick` with
/// `--quick`, `docs/benchmarks/profiles` with `--profile`,
/// `docs/benchmarks/nic` otherwise).
fn nic_underlay_out(args: &[String], root: &Path) -> anyhow::Result<Option<PathBuf>> {
    let value = |flag: &str| {
        args.iter().enumerate().find_map(|(i, a)| {
            a.strip_prefix(&format!("{flag}=")).map(str::to_owned).or_else(|| (a == flag).then(|| args.get(i + 1).cloned()).flatten())
        })
    };
    if value("--underlay").as_deref() != Some("nic") || args.iter().any(|a| a == "--render" || a.starts_with("--render=")) {
        return Ok(None);
    }
    let has = |flag: &str| args.iter().any(|a| a == flag);
    let out = match value("--out") {
        Some(out) => std::env::current_dir().context("the current directory")?.join(out),
        None if has("--quick") => root.join("target/bench-quick"),
        None if has("--profile") => root.join("docs/benchmarks/profiles"),
        None => root.join("docs/benchmarks/nic"),
    };
    Ok(Some(out))
}

/// `args` without `--out DIR` / `--out=DIR`.
fn without_out(args: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut words = args.iter();
    while let Some(word) = words.next() {
        if word == "--out" {
            words.next();
        } else if !word.starts_with("--out=") {
            out.push(word.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn nic_underlay_runs_in_the_vm_into_an_absolute_out() {
        let root = Path::new("/w");
        assert_eq!(nic_underlay_out(&words("--underlay wire"), root).unwrap(), None);
        assert_eq!(nic_underlay_out(&words("--quick"), root).unwrap(), None);
        assert_eq!(nic_underlay_out(&words("--underlay nic --render r.json"), root).unwrap(), None);
        assert_eq!(nic_underlay_out(&words("--underlay nic"), root).unwrap(), Some(PathBuf::from("/w/docs/benchmarks/nic")));
        assert_eq!(nic_underlay_out(&words("--underlay=nic --quick"), root).unwrap(), Some(PathBuf::from("/w/target/bench-quick")));
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(nic_underlay_out(&words("--out x --underlay nic"), root).unwrap(), Some(cwd.join("x")));
        assert_eq!(without_out(&words("--out x --underlay nic --out=y --quick")), words("--underlay nic --quick"));
    }
}
