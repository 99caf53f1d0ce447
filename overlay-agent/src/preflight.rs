//! `overlay-agent kernel-check`: whether this node's kernel can run the
//! datapath as deployed, before the agent touches anything. The DaemonSet
//! runs it as an init container, so a node with an older kernel keeps its
//! pod in `Init:Error` (visible in `kubectl get pods`) instead of running
//! an agent that would detach its datapath on every restart.

/// Kernels that pin TC links (TCX), so the datapath outlives the agent.
pub const DEPLOYED_MINIMUM: (u32, u32) = (6, 6);

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("reading the kernel release")]
    Read(#[source] std::io::Error),
    #[error("kernel release {0:?} does not start with MAJOR.MINOR")]
    Unparsable(String),
    #[error("kernel {release} is older than {}.{}: {why}", minimum.0, minimum.1)]
    TooOld { release: String, minimum: (u32, u32), why: &'static str },
}

/// `MAJOR.MINOR` of a release string such as `6.18.44-fc-v857`.
pub fn major_minor(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Checks the running kernel against `minimum`; returns its release.
pub fn check_kernel(minimum: (u32, u32)) -> Result<String, KernelError> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").map_err(KernelError::Read)?.trim().to_owned();
    let version = major_minor(&release).ok_or_else(|| KernelError::Unparsable(release.clone()))?;
    if version < minimum {
        return Err(KernelError::TooOld {
            release,
            minimum,
            why: "the datapath needs pinned TCX links (6.6) to survive agent restarts, and bpf_skb_adjust_room with ENCAP_L2_ETH (5.13) at all",
        });
    }
    Ok(release)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_compare_by_major_and_minor() {
        assert_eq!(major_minor("6.18.44-fc-v857"), Some((6, 18)));
        assert_eq!(major_minor("5.15.0-91-generic"), Some((5, 15)));
        assert_eq!(major_minor("6.6"), Some((6, 6)));
        assert_eq!(major_minor("garbage"), None);
        assert!(major_minor("5.15.0-91-generic").unwrap() < DEPLOYED_MINIMUM);
        assert!(major_minor("6.10.3").unwrap() >= DEPLOYED_MINIMUM);
    }

    #[test]
    fn this_kernel_is_read() {
        assert!(check_kernel((2, 6)).is_ok());
        let err = check_kernel((999, 0)).unwrap_err().to_string();
        assert!(err.contains("older than 999.0"), "{err}");
    }
}
