//! The real kernel behind the loop's seams: [`Applier`] writes the maps and
//! routes, [`KernelUnderlay`] answers for the underlay.

use std::{collections::BTreeSet, net::Ipv4Addr};

use ipnetwork::Ipv4Network;

use super::{PeerWriter, Underlay};
use crate::{
    apply::{Applied, ApplyError, Applier},
    desired::{Desired, Paths},
    kernel_events::{KernelEvent, KernelEvents},
    routes::{self, RouteError},
};

impl PeerWriter for Applier {
    fn apply(&mut self, desired: &Desired) -> Result<Applied, ApplyError> {
        Applier::apply(self, desired)
    }

    fn apply_touched(&mut self, desired: &Desired, touched: &[Ipv4Network]) -> Result<Applied, ApplyError> {
        Applier::apply_touched(self, desired, touched)
    }

    fn routes_missing(&mut self) -> bool {
        Applier::routes_missing(self).unwrap_or_else(|err| {
            tracing::warn!(error = %crate::report::Chain(&err), "asking the kernel for our routes; trusting they are there");
            false
        })
    }
}

/// The underlay interface, its addresses and the kernel's routes; what
/// changes in the kernel comes from its rtnetlink notifications
/// ([`KernelEvents`], whose task also sends every kind now and then as the
/// safety net).
pub struct KernelUnderlay {
    iface: String,
    events: KernelEvents,
}

impl KernelUnderlay {
    /// `events` subscribed before the agent first looks at what they
    /// report on: nothing changes unheard in between.
    pub fn new(iface: &str, events: KernelEvents) -> Self {
        Self { iface: iface.to_owned(), events }
    }
}

impl Underlay for KernelUnderlay {
    fn paths(&mut self, addrs: &[Ipv4Addr]) -> Result<Paths, RouteError> {
        routes::paths(&self.iface, addrs)
    }

    async fn changed(&mut self) -> BTreeSet<KernelEvent> {
        self.events.next().await
    }

    fn own_addresses(&mut self) -> Result<Vec<Ipv4Addr>, String> {
        crate::iface::ipv4_addresses(&self.iface).map_err(|e| e.to_string())
    }

    fn host_addresses(&mut self) -> Result<Vec<Ipv4Addr>, String> {
        crate::iface::local_ipv4_addresses().map_err(|e| e.to_string())
    }

    fn iface(&self) -> &str {
        &self.iface
    }
}
