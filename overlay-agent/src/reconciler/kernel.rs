//! The real kernel behind the loop's seams: [`Applier`] writes the maps and
//! routes, [`KernelUnderlay`] answers for the underlay.

use std::{net::Ipv4Addr, time::Duration};

use ipnetwork::Ipv4Network;
use tracing::warn;

use super::{PeerWriter, Underlay};
use crate::{
    apply::{Applied, ApplyError, Applier},
    desired::{Desired, Paths},
    report::WithCauses as _,
    routes::{self, RouteError},
};

/// How often the underlay is looked at: an address or route change flips
/// a peer between direct and VXLAN within this.
const PATH_CHECK: Duration = Duration::from_secs(1);

impl PeerWriter for Applier {
    fn apply(&mut self, desired: &Desired) -> Result<Applied, ApplyError> {
        Applier::apply(self, desired)
    }

    fn apply_touched(&mut self, desired: &Desired, touched: &[Ipv4Network]) -> Result<Applied, ApplyError> {
        Applier::apply_touched(self, desired, touched)
    }
}

/// The underlay interface, its addresses and the kernel's routes.
pub struct KernelUnderlay {
    iface: String,
    poll: tokio::time::Interval,
    /// [`routes::underlay_fingerprint`] when the paths were last all asked.
    fingerprint: Option<u64>,
    /// The fingerprint being taken, off the loop's thread (`ip` prints
    /// every route, which takes a while with thousands of ours): kept here
    /// so an event that wins the `select!` does not lose it.
    taking: Option<tokio::task::JoinHandle<Result<u64, RouteError>>>,
}

impl KernelUnderlay {
    pub fn new(iface: &str) -> Self {
        Self { iface: iface.to_owned(), poll: tokio::time::interval(PATH_CHECK), fingerprint: None, taking: None }
    }
}

impl Underlay for KernelUnderlay {
    fn paths(&mut self, addrs: &[Ipv4Addr]) -> Result<Paths, RouteError> {
        routes::paths(&self.iface, addrs)
    }

    async fn changed(&mut self) {
        loop {
            let taking = match &mut self.taking {
                Some(taking) => taking,
                None => {
                    self.poll.tick().await;
                    self.taking.insert(tokio::task::spawn_blocking(routes::underlay_fingerprint))
                }
            };
            let result = taking.await;
            self.taking = None;
            match result {
                Ok(Ok(fingerprint)) if Some(fingerprint) == self.fingerprint => {}
                Ok(Ok(fingerprint)) => {
                    self.fingerprint = Some(fingerprint);
                    return;
                }
                Ok(Err(err)) => warn!(error = %err.to_string_with_causes(), "reading the underlay's addresses and routes"),
                Err(err) => warn!(error = %err, "reading the underlay's addresses and routes"),
            }
        }
    }

    fn own_addresses(&mut self) -> Result<Vec<Ipv4Addr>, String> {
        crate::iface::ipv4_addresses(&self.iface).map_err(|e| e.to_string())
    }

    fn iface(&self) -> &str {
        &self.iface
    }
}
