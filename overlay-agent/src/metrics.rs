//! Prometheus metrics: the datapath counters (read from the pinned per-CPU
//! map at scrape time, summed over CPUs) and the agent's own.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{
        counter::{ConstCounter, Counter as PromCounter},
        family::Family,
        gauge::Gauge,
        histogram::Histogram,
    },
    registry::Registry,
};

use overlay_common::{Counter, Totals};

use crate::{
    bpffs::MAP_LAYOUT_VERSION,
    maps::{DatapathMaps, MapsError},
};

/// Everything `/metrics` serves, and what `/readyz` answers from.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Nodes programmed, by mode (`vxlan`, `direct`, `unreachable`).
    pub peers: Family<[(&'static str, &'static str); 1], Gauge>,
    /// Valid nodes left out of the datapath (not servable as configured).
    pub nodes_rejected: Gauge,
    /// Peers the datapath should hold but could not take, by reason
    /// (`map_full`, `map_write`, `route_refused`).
    pub peers_not_programmed: Family<[(&'static str, &'static str); 1], Gauge>,
    /// Nodes (or manifests) that could not be read as a node at all.
    pub nodes_invalid: Gauge,
    pub reconcile_seconds: Histogram,
    pub watch_restarts: PromCounter,
    ready: Arc<AtomicBool>,
}

impl Metrics {
    /// `pin_root` is the agent's pin root: the counters are read from there.
    pub fn new(pin_root: &Path) -> Self {
        let mut registry = Registry::with_prefix("overlay");
        let peers = Family::<[(&'static str, &'static str); 1], Gauge>::default();
        registry.register("peers", "Remote nodes programmed into the datapath, by forwarding mode", peers.clone());
        let nodes_rejected = Gauge::default();
        registry.register(
            "nodes_rejected",
            "Valid nodes left out of the datapath because they cannot be served as configured (outside Network, \
             overlapping pod CIDR, duplicate address, other VNI or backend, not subnet-managed; see the log and events)",
            nodes_rejected.clone(),
        );
        let peers_not_programmed = Family::<[(&'static str, &'static str); 1], Gauge>::default();
        registry.register(
            "peers_not_programmed",
            "Remote nodes that should be in the datapath but are not, by reason: map_full (PEERS or ROUTES is full: \
             more nodes than the datapath holds), map_write (another map error), route_refused (the kernel refused \
             the route); retried every 5 s, see the log",
            peers_not_programmed.clone(),
        );
        let nodes_invalid = Gauge::default();
        registry.register(
            "nodes_invalid",
            "Nodes (or manifests) skipped because they could not be read as a node (missing or malformed pod CIDR, \
             address or flannel annotations; see the log)",
            nodes_invalid.clone(),
        );
        let build_info = Family::<[(&'static str, String); 2], Gauge>::default();
        registry.register("build_info", "Always 1: the agent's version and the pinned map layout it uses", build_info.clone());
        build_info
            .get_or_create(&[("version", env!("CARGO_PKG_VERSION").to_owned()), ("map_layout", format!("v{MAP_LAYOUT_VERSION}"))])
            .set(1);
        let reconcile_seconds = Histogram::new([0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]);
        registry.register(
            "reconcile_duration_seconds",
            "Time from a node change to the datapath holding it (desired state, diff, maps and routes)",
            reconcile_seconds.clone(),
        );
        let watch_restarts = PromCounter::default();
        registry.register(
            "watch_restarts",
            "Times the Node watch failed and was restarted with backoff",
            watch_restarts.clone(),
        );
        registry.register_collector(Box::new(DatapathCounters { pin_root: pin_root.to_owned() }));
        Self { registry, peers, nodes_rejected, peers_not_programmed, nodes_invalid, reconcile_seconds, watch_restarts, ready: Arc::default() }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Marks the initial sync as applied to the datapath.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

/// The datapath's per-CPU counters, read from the pinned map on each
/// scrape so they keep counting across agent restarts.
#[derive(Debug)]
struct DatapathCounters {
    pin_root: std::path::PathBuf,
}

/// One metric family of datapath counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatapathFamily {
    /// Name after `overlay_` and before `_total`.
    pub name: &'static str,
    /// The label that tells the family's counters apart.
    pub label: &'static str,
    pub help: &'static str,
}

const PACKETS: DatapathFamily = DatapathFamily {
    name: "datapath_packets",
    label: "path",
    help: "Packets the programs on the underlay interface handled, each counted once per program by what it did: \
           encap (egress or the fast path, encapsulated for a VXLAN peer), direct (egress, to a direct-mode peer unencapsulated), \
           decap (ingress, valid VXLAN decapsulated), pass (either way, not ours: left untouched)",
};
const BYTES: DatapathFamily = DatapathFamily {
    name: "datapath_bytes",
    label: "path",
    help: "Bytes of the packets in overlay_datapath_packets_total (encap and decap: of the inner packet)",
};
const FASTPATH_PACKETS: DatapathFamily = DatapathFamily {
    name: "datapath_fastpath_packets",
    label: "direction",
    help: "Packets the fast path (--forward bpf) forwarded past the kernel's forward path: out (a local pod's veth \
           straight to the underlay; also counted as encap when it encapsulated them, or by the underlay's egress as \
           direct), in (the underlay's ingress, or merged the agent's GRO device, straight into a local pod; also \
           counted as decap when it was decapsulated), gro_in (lone TCP segments decapsulated at TC and sent to the \
           GRO device to be merged) and gro_returned (merged packets the fast path leaves to the kernel, returned to \
           the underlay's ingress; also counted there as pass)",
};
const FASTPATH_BYTES: DatapathFamily = DatapathFamily {
    name: "datapath_fastpath_bytes",
    label: "direction",
    help: "Bytes of the packets in overlay_datapath_fastpath_packets_total",
};
const EVENTS: DatapathFamily = DatapathFamily {
    name: "datapath_events",
    label: "event",
    help: "Other datapath events: icmp_frag_needed (ICMP fragmentation-needed replies the datapath sent for DF \
           packets too big for the tunnel), mismatched_port (VXLAN from a known node to the other well-known port, \
           4789 vs 8472, passed on undecapsulated; the agent logs a warning), segmented (segments of pods' own \
           tunnels' GSO packets, cut on the agent's segmentation device, then encapsulated)",
};
const DROPS: DatapathFamily = DatapathFamily {
    name: "datapath_drops",
    label: "reason",
    help: "Packets the datapath dropped, by reason (overlay-agent inspect lists what each means)",
};

/// Every datapath family, in the order `/metrics` serves them.
pub const DATAPATH_FAMILIES: [DatapathFamily; 6] = [PACKETS, BYTES, FASTPATH_PACKETS, FASTPATH_BYTES, EVENTS, DROPS];

/// The families and label values a counter is exported under: its
/// packets, then its bytes when they are exported.
pub fn families_of(counter: Counter) -> (DatapathFamily, Option<DatapathFamily>, &'static str) {
    match counter {
        Counter::Encap | Counter::Direct | Counter::Decap | Counter::Pass => (PACKETS, Some(BYTES), counter.name()),
        Counter::FastpathOut => (FASTPATH_PACKETS, Some(FASTPATH_BYTES), "out"),
        Counter::FastpathIn => (FASTPATH_PACKETS, Some(FASTPATH_BYTES), "in"),
        Counter::GroIn | Counter::GroReturned => (FASTPATH_PACKETS, Some(FASTPATH_BYTES), counter.name()),
        Counter::IcmpFragNeeded | Counter::MismatchedPort | Counter::Segmented => (EVENTS, None, counter.name()),
    }
}

/// Every datapath sample: family, label value, value. All zero while the
/// maps do not exist yet, so every family and label is there from the
/// first scrape.
pub fn datapath_samples(totals: &Totals) -> Vec<(DatapathFamily, &'static str, u64)> {
    let mut samples = Vec::new();
    for &counter in Counter::ALL {
        let (packets, bytes, label) = families_of(counter);
        samples.push((packets, label, totals.packets(counter)));
        if let Some(bytes) = bytes {
            samples.push((bytes, label, totals.bytes(counter)));
        }
    }
    for (reason, packets) in totals.drops_by_reason() {
        samples.push((DROPS, reason.name(), packets));
    }
    samples
}

impl Collector for DatapathCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let totals = match DatapathMaps::open(&self.pin_root).map(|maps| maps.counters_total()) {
            Ok(Ok(totals)) => totals,
            // No datapath yet: every counter reads 0 rather than missing.
            Ok(Err(_)) | Err(MapsError::Open { .. }) => Totals::default(),
        };
        let samples = datapath_samples(&totals);
        for family in DATAPATH_FAMILIES {
            let counter_type = ConstCounter::new(0u64).metric_type();
            let mut encoder = encoder.encode_descriptor(family.name, family.help, None, counter_type)?;
            for (_, label, value) in samples.iter().filter(|(f, ..)| *f == family) {
                let labels = [(family.label, *label)];
                ConstCounter::new(*value).encode(encoder.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datapath_families_are_there_before_the_maps_and_do_not_overlap() {
        let text = Metrics::new(Path::new("/nonexistent")).encode();
        for family in DATAPATH_FAMILIES {
            assert!(text.contains(&format!("# HELP overlay_{} ", family.name)), "{text}");
        }
        for line in [
            "overlay_datapath_packets_total{path=\"encap\"} 0",
            "overlay_datapath_packets_total{path=\"pass\"} 0",
            "overlay_datapath_fastpath_packets_total{direction=\"out\"} 0",
            "overlay_datapath_events_total{event=\"icmp_frag_needed\"} 0",
            "overlay_datapath_events_total{event=\"mismatched_port\"} 0",
            "overlay_datapath_events_total{event=\"segmented\"} 0",
            "overlay_datapath_drops_total{reason=\"spoofed_inner\"} 0",
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
        // The path label holds only what the underlay programs did.
        let paths: Vec<_> = text.lines().filter(|l| l.starts_with("overlay_datapath_packets_total{")).collect();
        assert_eq!(paths.len(), 4, "{paths:?}");
        assert!(!text.contains("path=\"fastpath"), "{text}");
        assert!(!text.contains("path=\"mismatched_port\""), "{text}");
        let drops = text.lines().filter(|l| l.starts_with("overlay_datapath_drops_total{")).count();
        assert_eq!(drops, overlay_common::DropReason::COUNT);
    }

    #[test]
    fn samples_read_every_slot() {
        let mut totals = Totals::default();
        for slot in 0..overlay_common::COUNTER_SLOTS {
            totals.add(slot, &overlay_common::Tally { packets: slot as u64 + 1, bytes: 0 });
        }
        let samples = datapath_samples(&totals);
        let packets: u64 = samples.iter().filter(|(f, ..)| f.name.ends_with("_packets") || f.name == "datapath_events" || f.name == "datapath_drops").map(|s| s.2).sum();
        let n = overlay_common::COUNTER_SLOTS as u64;
        assert_eq!(packets, n * (n + 1) / 2, "every slot exported exactly once");
    }

    #[test]
    fn build_info_names_the_version_and_map_layout() {
        let text = Metrics::new(Path::new("/nonexistent")).encode();
        let expected = format!("overlay_build_info{{version=\"{}\",map_layout=\"v{MAP_LAYOUT_VERSION}\"}} 1", env!("CARGO_PKG_VERSION"));
        assert!(text.contains(&expected), "{expected} missing:\n{text}");
    }

    #[test]
    fn agent_metrics_are_exposed() {
        let metrics = Metrics::new(Path::new("/nonexistent"));
        metrics.peers.get_or_create(&[("mode", "vxlan")]).set(3);
        metrics.watch_restarts.inc();
        let text = metrics.encode();
        assert!(text.contains("overlay_peers{mode=\"vxlan\"} 3"), "{text}");
        assert!(text.contains("overlay_watch_restarts_total 1"), "{text}");
        assert!(text.contains("overlay_reconcile_duration_seconds_bucket"), "{text}");
    }
}
