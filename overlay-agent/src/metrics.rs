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
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        histogram::Histogram,
    },
    registry::Registry,
};

use crate::maps::{DatapathMaps, MapsError};

/// Everything `/metrics` serves, and what `/readyz` answers from.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Nodes programmed, by mode (`vxlan`, `direct`, `unreachable`).
    pub peers: Family<[(&'static str, &'static str); 1], Gauge>,
    /// Nodes known but not programmed (invalid or rejected).
    pub nodes_rejected: Gauge,
    pub reconcile_seconds: Histogram,
    pub watch_restarts: Counter,
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
            "Nodes known but left out of the datapath (invalid, or not servable as configured; see the log)",
            nodes_rejected.clone(),
        );
        let reconcile_seconds = Histogram::new([0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]);
        registry.register(
            "reconcile_duration_seconds",
            "Time from a node change to the datapath holding it (desired state, diff, maps and routes)",
            reconcile_seconds.clone(),
        );
        let watch_restarts = Counter::default();
        registry.register(
            "watch_restarts",
            "Times the Node watch failed and was restarted with backoff",
            watch_restarts.clone(),
        );
        registry.register_collector(Box::new(DatapathCounters { pin_root: pin_root.to_owned() }));
        Self { registry, peers, nodes_rejected, reconcile_seconds, watch_restarts, ready: Arc::default() }
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

/// A counter's metric name and label, from its field name in
/// [`overlay_common::Counters`].
pub fn metric_for(field: &'static str) -> (&'static str, &'static str, &'static str) {
    if let Some(reason) = field.strip_prefix("drop_") {
        return ("datapath_drops", "reason", reason);
    }
    if let Some(path) = field.strip_suffix("_packets") {
        return ("datapath_packets", "path", path);
    }
    if field == "mismatched_port" {
        // Packets from known nodes to the other well-known VXLAN port.
        return ("datapath_packets", "path", field);
    }
    if let Some(path) = field.strip_suffix("_bytes") {
        return ("datapath_bytes", "path", path);
    }
    ("datapath_events", "event", field)
}

const HELP: [(&str, &str); 4] = [
    ("datapath_drops", "Packets the datapath dropped, by reason"),
    ("datapath_packets", "Packets through the datapath, by path (encap, direct, decap, pass, fastpath, mismatched_port)"),
    ("datapath_bytes", "Bytes through the datapath, by path"),
    ("datapath_events", "Other datapath events (icmp_frag_needed: ICMP too-big replies sent)"),
];

impl Collector for DatapathCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let totals = match DatapathMaps::open(&self.pin_root).map(|maps| maps.counters_total()) {
            Ok(Ok(totals)) => totals,
            // No datapath yet: nothing to report rather than a failed scrape.
            Ok(Err(_)) | Err(MapsError::Open { .. }) => return Ok(()),
        };
        let fields = totals.fields();
        for (metric, help) in HELP {
            let counter_type = ConstCounter::new(0u64).metric_type();
            let mut family = encoder.encode_descriptor(metric, help, None, counter_type)?;
            for (field, value) in fields {
                let (name, label, label_value) = metric_for(field);
                if name == metric {
                    let labels = [(label, label_value)];
                    ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_has_a_metric() {
        let names: Vec<_> = overlay_common::Counters::default()
            .fields()
            .iter()
            .map(|(field, _)| metric_for(field))
            .collect();
        assert!(names.contains(&("datapath_drops", "reason", "spoofed_inner")));
        assert!(names.contains(&("datapath_packets", "path", "encap")));
        assert!(names.contains(&("datapath_packets", "path", "mismatched_port")));
        assert!(names.contains(&("datapath_bytes", "path", "decap")));
        assert!(names.contains(&("datapath_events", "event", "icmp_frag_needed")));
        assert!(names.iter().all(|(metric, ..)| HELP.iter().any(|(m, _)| m == metric)));
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
