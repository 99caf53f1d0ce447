//! Whether this node's kernel can run the datapath, before the agent
//! touches anything. `overlay-agent kernel-check` asks for the deployed
//! minimum ([`DEPLOYED_MINIMUM`], 6.1): the DaemonSet runs it as an init
//! container, so a node with an older kernel keeps its pod in
//! `Init:Error` (visible in `kubectl get pods`) instead of running the
//! datapath on a kernel no test has run it on. `overlay-agent run` refuses
//! a kernel below [`DATAPATH_MINIMUM`], where the programs could not
//! encapsulate at all.

/// The oldest kernel the project tests the datapath on: Debian 12's 6.1,
/// in CI's VM stage (verifier, packets, pods' own tunnels) and
/// `cargo xtask vmtest` (restarts, whose clsact filters outlive the agent
/// as TCX links do from 6.6; the GRO device). From 5.13 to 6.0 the
/// programs are expected to work but nothing here has run them (no such
/// kernel is reachable from these machines).
pub const DEPLOYED_MINIMUM: (u32, u32) = (6, 1);

/// The oldest kernel the datapath works on at all:
/// `bpf_skb_adjust_room` with `BPF_F_ADJ_ROOM_ENCAP_L2_ETH` came in 5.13.
/// Before it the verifier rejects the programs (`bpf_check_mtu` is 5.12,
/// with a message naming a helper, not the kernel), or, on 5.12, they load
/// and then fail every encapsulation.
pub const DATAPATH_MINIMUM: (u32, u32) = (5, 13);

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("reading the kernel release")]
    Read(#[source] std::io::Error),
    #[error("kernel release {0:?} does not start with MAJOR.MINOR")]
    Unparsable(String),
    #[error("kernel {release} is older than {}.{}: {}", minimum.0, minimum.1, why_minimum(*minimum))]
    TooOld { release: String, minimum: (u32, u32) },
}

/// `MAJOR.MINOR` of a release string such as `6.18.44-fc-v857`.
pub fn major_minor(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// What a kernel below `minimum` lacks.
fn why_minimum(minimum: (u32, u32)) -> &'static str {
    if minimum > DATAPATH_MINIMUM {
        "the deployed minimum (--min): the datapath is tested from 6.1 on and expected to work untested from 5.13 (bpf_skb_adjust_room with ENCAP_L2_ETH); to run it on this kernel anyway, lower the init container's --min, to no less than 5.13"
    } else {
        "the datapath's encapsulation needs bpf_skb_adjust_room with BPF_F_ADJ_ROOM_ENCAP_L2_ETH (5.13); run the agent on Linux 5.13 or later (6.1 or later is tested)"
    }
}

/// Checks the running kernel against `minimum`; returns its release.
pub fn check_kernel(minimum: (u32, u32)) -> Result<String, KernelError> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").map_err(KernelError::Read)?;
    check_release(release.trim(), minimum)
}

/// Checks a kernel release string against `minimum`.
pub fn check_release(release: &str, minimum: (u32, u32)) -> Result<String, KernelError> {
    let version = major_minor(release).ok_or_else(|| KernelError::Unparsable(release.to_owned()))?;
    if version < minimum {
        return Err(KernelError::TooOld { release: release.to_owned(), minimum });
    }
    Ok(release.to_owned())
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
        assert!(major_minor("6.1.0-57-cloud-amd64").unwrap() >= DEPLOYED_MINIMUM);
        assert!(major_minor("6.10.3").unwrap() >= DEPLOYED_MINIMUM);
    }

    #[test]
    fn a_kernel_below_5_13_is_refused_naming_the_minimum_and_what_it_lacks() {
        let err = check_release("5.10.0-32-cloud-amd64", DATAPATH_MINIMUM).unwrap_err().to_string();
        assert!(err.starts_with("kernel 5.10.0-32-cloud-amd64 is older than 5.13: "), "{err}");
        assert!(err.contains("BPF_F_ADJ_ROOM_ENCAP_L2_ETH") && err.contains("5.13 or later"), "{err}");
        assert!(check_release("5.13.0", DATAPATH_MINIMUM).is_ok());
        assert!(check_release("6.1.0-57-cloud-amd64", DATAPATH_MINIMUM).is_ok());
        assert!(check_release("6.1.0-57-cloud-amd64", DEPLOYED_MINIMUM).is_ok());
        let deployed = check_release("5.15.0-91-generic", DEPLOYED_MINIMUM).unwrap_err().to_string();
        assert!(deployed.contains("older than 6.1") && deployed.contains("lower the init container's --min"), "{deployed}");
    }

    #[test]
    fn this_kernel_is_read() {
        assert!(check_kernel((2, 6)).is_ok());
        let err = check_kernel((999, 0)).unwrap_err().to_string();
        assert!(err.contains("older than 999.0"), "{err}");
    }
}
