//! The BPF filesystem that pins live on.

use std::{
    ffi::CString,
    io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

/// Where bpffs is conventionally mounted.
pub const BPFFS_MOUNT: &str = "/sys/fs/bpf";
/// `BPF_FS_MAGIC` from `linux/magic.h`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error("mounting bpffs at {path}: {source} (the agent needs CAP_SYS_ADMIN to mount it; or mount it yourself: `mount -t bpf bpf {path}`)")]
    Mount { path: PathBuf, source: io::Error },
    #[error("{path} is not on a BPF filesystem: pins must live on bpffs (choose a --bpffs-root under {BPFFS_MOUNT})")]
    NotBpffs { path: PathBuf },
    #[error("creating pin directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
}

/// Whether `path` is on a bpffs mount.
pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid NUL-terminated path and a properly sized out-parameter.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut stat) };
    rc == 0 && stat.f_type == BPF_FS_MAGIC
}

/// Mounts bpffs at [`BPFFS_MOUNT`] when `root` lives under it and nothing is
/// mounted there yet, then creates `root`. Returns whether `root` was created.
pub fn prepare_root(root: &Path) -> Result<bool, BpffsError> {
    let mount = Path::new(BPFFS_MOUNT);
    if root.starts_with(mount) && !is_bpffs(mount) {
        mount_bpffs(mount)?;
    }
    // The nearest existing ancestor tells which filesystem `root` will be on.
    let existing = root.ancestors().find(|p| p.exists()).unwrap_or(root);
    if !is_bpffs(existing) {
        return Err(BpffsError::NotBpffs { path: root.to_owned() });
    }
    let existed = root.is_dir();
    std::fs::create_dir_all(root).map_err(|source| BpffsError::CreateDir {
        path: root.to_owned(),
        source,
    })?;
    Ok(!existed)
}

fn mount_bpffs(path: &Path) -> Result<(), BpffsError> {
    let err = |source| BpffsError::Mount { path: path.to_owned(), source };
    std::fs::create_dir_all(path).map_err(err)?;
    let target = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: all pointers are valid NUL-terminated strings.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(())
}
