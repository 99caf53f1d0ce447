//! The bpffs the tests, labs and benches pin under.
//!
//! Their agents pin under `/sys/fs/bpf`, as on a node, and refuse a
//! directory that is not a bpffs (their pins would not outlive them). Most
//! machines have one mounted there at boot (systemd does it); where none
//! is, the task runs itself again in a mount namespace of its own with a
//! bpffs mounted there. Every process it starts inherits it, and it goes
//! away with the task: the host's mounts are not touched.

use std::{
    path::Path,
    process::{Command, ExitCode},
};

use anyhow::{Context as _, bail};

const BPFFS: &str = "/sys/fs/bpf";
/// `BPF_FS_MAGIC` from `linux/magic.h`, as `stat -f` prints it.
const BPF_FS_MAGIC: &str = "cafe4a11";
/// Set in the task run again, so it does not try twice.
const IN_OWN_MOUNT_NAMESPACE: &str = "OVERLAY_XTASK_OWN_BPFFS";

fn mounted() -> bool {
    Command::new("stat")
        .args(["-f", "-c", "%t", BPFFS])
        .output()
        .is_ok_and(|out| out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == BPF_FS_MAGIC)
}

/// `None` where `/sys/fs/bpf` is a bpffs (or cannot be made one here: not
/// root, which the privileged tests report themselves); otherwise the exit
/// code of this task run again with one of its own.
pub fn run_with_own_bpffs_if_missing() -> anyhow::Result<Option<ExitCode>> {
    let root = Command::new("id").arg("-u").output().is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0");
    if mounted() || !root || !Path::new(BPFFS).is_dir() {
        return Ok(None);
    }
    if std::env::var_os(IN_OWN_MOUNT_NAMESPACE).is_some() {
        bail!("{BPFFS} is still not a bpffs after mounting one in this task's own mount namespace");
    }
    eprintln!("xtask: {BPFFS} is not a bpffs here; running in a mount namespace of its own with one mounted there (the host's mounts stay as they are)");
    let exe = std::env::current_exe().context("finding xtask's own executable")?;
    // The task handles Ctrl-C itself (its guards clean up); this process
    // only waits for it.
    ctrlc::set_handler(|| {}).context("installing the Ctrl-C handler")?;
    let status = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "sh", "-c", &format!("mount -t bpf bpf {BPFFS} && exec \"$0\" \"$@\"")])
        .arg(&exe)
        .args(std::env::args_os().skip(1))
        .env(IN_OWN_MOUNT_NAMESPACE, "1")
        .status()
        .context("running `unshare` (util-linux)")?;
    Ok(Some(ExitCode::from(status.code().map_or(1, |code| u8::try_from(code).unwrap_or(1)))))
}
