//! How errors reach an operator: the whole cause chain on one line, each
//! cause once.

use std::{error::Error, fmt};

/// Displays an error and its sources joined by ": ", leaving out a source
/// whose text the line already holds: our errors do not repeat their
/// source, but some libraries' errors print their cause in their message
/// and return it as `source()` too.
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut line = self.0.to_string();
        let mut source = self.0.source();
        while let Some(cause) = source {
            let text = cause.to_string();
            if !text.is_empty() && !line.contains(&text) {
                line.push_str(": ");
                line.push_str(&text);
            }
            source = cause.source();
        }
        f.write_str(&line)
    }
}

/// [`Chain`] as a method, for any error.
pub trait WithCauses {
    /// The error and its causes on one line, each once.
    fn to_string_with_causes(&self) -> String;
}

impl<E: Error + 'static> WithCauses for E {
    fn to_string_with_causes(&self) -> String {
        Chain(self).to_string()
    }
}

/// [`Chain`] for an `anyhow::Error`.
pub fn chain(err: &anyhow::Error) -> Chain<'_> {
    Chain(err.as_ref())
}

#[cfg(test)]
mod tests {
    use std::{io, path::PathBuf};

    use super::*;
    use crate::{bpffs::BpffsError, datapath::DatapathError, kube_source::KubeSourceError, manifests::ManifestError, netconf::NetConfError, routes::RouteError, rtnl::RtnlError};

    fn io_error() -> io::Error {
        io::Error::from_raw_os_error(libc::ENOENT)
    }

    /// Fails when an error's message holds the text of its own source, which
    /// `{:#}` would then print twice, or when the line [`Chain`] prints
    /// repeats a segment. Only the first link is ours to judge: below it
    /// are the libraries' errors (kube's repeat their sources, which
    /// [`Chain`] leaves out).
    fn assert_each_cause_once(err: &(dyn Error + 'static)) -> Result<(), String> {
        if let Some(source) = err.source() {
            let (outer, inner) = (err.to_string(), source.to_string());
            if outer.contains(&inner) {
                return Err(format!("{outer:?} repeats its source {inner:?}"));
            }
        }
        let line = Chain(err).to_string();
        let mut segments: Vec<&str> = line.split(": ").collect();
        let count = segments.len();
        segments.sort_unstable();
        segments.dedup();
        if segments.len() != count {
            return Err(format!("{line:?} repeats a segment"));
        }
        Ok(())
    }

    #[test]
    fn every_error_prints_each_cause_once() {
        let path = || PathBuf::from("/x");
        let json = || serde_json::from_str::<u32>("\"1\"").unwrap_err();
        let kubeconfig = kube::config::Kubeconfig::read_from("/nonexistent/kubeconfig").unwrap_err();
        let errors: Vec<Box<dyn Error>> = vec![
            Box::new(BpffsError::Mount { path: path(), source: io_error() }),
            Box::new(BpffsError::CreateDir { path: path(), source: io_error() }),
            Box::new(DatapathError::Verifier { name: "p", verifier_log: "log".into(), source: io_error() }),
            Box::new(DatapathError::Unpin { path: path(), source: io_error() }),
            Box::new(DatapathError::Pin { path: path(), source: io_error() }),
            Box::new(DatapathError::Bpffs(BpffsError::Mount { path: path(), source: io_error() })),
            Box::new(ManifestError::ReadDir { dir: path(), source: io_error() }),
            Box::new(ManifestError::Read { path: path(), source: io_error() }),
            Box::new(NetConfError::Read { path: path(), source: io_error() }),
            Box::new(NetConfError::Json { path: path(), source: json() }),
            Box::new(NetConfError::Write { path: path(), source: io_error() }),
            Box::new(KubeSourceError::Kubeconfig { path: "/x".into(), source: kubeconfig }),
            Box::new(KubeSourceError::InCluster(kube::config::InClusterError::ReadEnvironmentVariable(std::env::VarError::NotPresent))),
            Box::new(RouteError::Netlink(RtnlError::Socket(io_error()))),
            Box::new(crate::pod_ports::PodPortsError::Read { bridge: "cni0".into(), source: RtnlError::Io(io_error()) }),
            Box::new(crate::kernel_events::KernelEventsError::Socket(io_error())),
            Box::new(crate::kernel_events::KernelEventsError::Subscribe { group: 1, source: io_error() }),
            Box::new(RouteError::Netlink(RtnlError::Io(io_error()))),
            Box::new(RtnlError::Socket(io_error())),
            Box::new(RtnlError::Io(io_error())),
            Box::new(crate::apply::ApplyError::Route { cidr: "10.0.0.0/24".parse().unwrap(), node_ip: [1, 2, 3, 4].into(), source: RouteError::Netlink(RtnlError::Io(io_error())) }),
            Box::new(crate::server::serve_error("127.0.0.1:1".parse().unwrap(), io_error())),
            Box::new(crate::etcd_source::EtcdSourceError::TlsFile { what: "cafile", path: path(), source: io_error() }),
            Box::new(crate::etcd_source::lease_to_node("n", "10.0.0.1-24", br#"{"PublicIP":"192.168.0.1"}"#).unwrap_err()),
        ];
        let repeated: Vec<String> = errors.iter().filter_map(|e| assert_each_cause_once(e.as_ref()).err()).collect();
        assert!(repeated.is_empty(), "{} errors print a cause twice:\n{}", repeated.len(), repeated.join("\n"));
    }

    #[test]
    fn a_library_error_that_repeats_its_source_is_printed_once() {
        let err = kube::config::Kubeconfig::read_from("/nonexistent/kubeconfig").unwrap_err();
        let outer = KubeSourceError::Kubeconfig { path: "/nonexistent/kubeconfig".into(), source: err };
        let line = Chain(&outer).to_string();
        let cause = io_error().to_string();
        assert_eq!(line.matches(&cause).count(), 1, "{line}");
    }
}
