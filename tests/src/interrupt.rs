//! Cleanup when a test process is interrupted (Ctrl-C, SIGTERM, SIGHUP).
//!
//! The guards' `Drop` runs when a test passes, fails or panics, but not when
//! a signal ends the process. So every namespace and directory guard also
//! registers what it owns here, and the first registration installs a
//! handler that, on such a signal, kills the process's descendants (agents,
//! servers, tools: they hold namespaces and pins), deletes the registered
//! namespaces, removes the registered directories (pins included), and
//! exits with 130. A program with its own handler (`overlay-lab`,
//! `overlay-bench`, which stop and let their guards drop) installs it
//! before its first guard, and this one then stands aside.

use std::{
    collections::{BTreeMap, HashMap},
    io::Write as _,
    path::PathBuf,
    process::Command,
    sync::{
        Mutex, MutexGuard, Once, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

/// What a guard owns.
pub(crate) enum Owned {
    Namespace(String),
    Directory(PathBuf),
    /// Podman containers with this label (`key=value`): podman's conmon
    /// runs them outside this process's tree, so killing descendants
    /// leaves them.
    PodmanContainers(String),
}

/// Removes every podman container labelled `label`, running or not.
pub(crate) fn remove_podman_containers(label: &str) {
    let Ok(listed) = Command::new("podman").args(["ps", "-aq", "--filter", &format!("label={label}")]).output() else { return };
    let ids: Vec<String> = String::from_utf8_lossy(&listed.stdout).split_whitespace().map(str::to_owned).collect();
    if !ids.is_empty() {
        let _ = Command::new("podman").args(["rm", "-f", "-t", "0"]).args(&ids).output();
    }
}

static OWNED: Mutex<BTreeMap<u64, Owned>> = Mutex::new(BTreeMap::new());
static NEXT: AtomicU64 = AtomicU64::new(0);
static HANDLER: Once = Once::new();

/// An entry of the register, removed when its guard, having cleaned up,
/// drops it.
pub(crate) struct Registration(u64);

impl Drop for Registration {
    fn drop(&mut self) {
        owned().remove(&self.0);
    }
}

/// Registers `what` until the returned registration drops.
pub(crate) fn register(what: Owned) -> Registration {
    HANDLER.call_once(|| {
        // Fails where the program installed its own: it cleans up itself.
        let _ = ctrlc::set_handler(on_interrupt);
    });
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    owned().insert(id, what);
    Registration(id)
}

fn owned() -> MutexGuard<'static, BTreeMap<u64, Owned>> {
    OWNED.lock().unwrap_or_else(PoisonError::into_inner)
}

fn on_interrupt() {
    // Written to the descriptor itself: `eprintln!` in a thread a test
    // spawned (this handler's) goes to that test's captured output.
    let _ = writeln!(std::io::stderr(), "interrupted: removing the containers, namespaces, pins and directories this test process made");
    kill_descendants();
    // Give the killed a moment to exit and release what they held.
    std::thread::sleep(Duration::from_millis(200));
    let owned = std::mem::take(&mut *owned());
    for what in owned.values() {
        if let Owned::PodmanContainers(label) = what {
            remove_podman_containers(label);
        }
    }
    for what in owned.values() {
        if let Owned::Namespace(name) = what {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
    // The newest first: a directory made inside another goes before it.
    for what in owned.values().rev() {
        if let Owned::Directory(path) = what {
            let _ = std::fs::remove_dir_all(path);
        }
    }
    std::process::exit(130);
}

/// SIGKILLs every process below this one (children, and theirs).
fn kill_descendants() {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            children.entry(ppid).or_default().push(pid);
        }
    }
    let mut pending = vec![std::process::id()];
    while let Some(parent) = pending.pop() {
        for &child in children.get(&parent).into_iter().flatten() {
            // SAFETY: a plain signal to a process below this one.
            unsafe { libc::kill(child as i32, libc::SIGKILL) };
            pending.push(child);
        }
    }
}
