//! The benchmark behind `cargo xtask bench`: every variant of pod
//! networking built side by side in the lab of [`crate::lab`], measured
//! interleaved so that a shared, noisy machine drifts under all of them
//! alike, and reported as medians, spreads and ratios to flannel's kernel
//! vxlan device.
//!
//! - [`run`] builds one lab per distinct setup (kept up for the whole run)
//!   and measures round after round: in each round every test runs once per
//!   variant, with the variant order rotated by one from round to round.
//! - [`Report`] is what a run produced; it is written as JSON, and the
//!   markdown table ([`render_markdown`]) and the SVG chart
//!   ([`render_svg`]) are derived from it alone, so they can be regenerated
//!   from `results.json`.
//!
//! By concern, one module each: [`variants`] (what each variant is and
//! sets up), [`measurement`] (running the tools, reading `/proc/stat`),
//! [`statistics`] (medians, paired ratios, the check of a finished run),
//! [`render`] (results.md, .json and .svg, the README line) and
//! [`profile`] (`--profile`: where the CPU goes). This file holds the
//! report's types and the interleaved schedule.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

pub mod measurement;
pub mod profile;
pub mod render;
pub mod statistics;
pub mod variants;

pub use measurement::{CpuTimes, TOOL_NICE, parse_sockperf};
pub use render::{SUMMARY_END, SUMMARY_START, read_report, render_markdown, render_svg, summary_line, update_readme, write_outputs};
pub use statistics::{Stat, median, problems};
pub use variants::{BASELINE, DEFAULT_VARIANTS, Variant};

use crate::lab::{POD_MTU, UNDERLAY_MTU, Underlay};
use measurement::{Test, loadavg, machine_meta, measure_with_retry, ping};
use variants::{Setup, attached_hook, datapath_counters, start_labs, subjects};

/// Whether more or less of a metric is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

/// One reported figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    Tcp1,
    Tcp4,
    UdpRttP50,
    UdpRttP99,
    TcpRttP50,
    TcpRttP99,
    Udp64Rate,
    CpuPerGbit,
    CpuPerPacket,
}

impl Metric {
    pub const ALL: [Self; 9] = [
        Self::Tcp1, Self::Tcp4, Self::Udp64Rate, Self::UdpRttP50, Self::UdpRttP99,
        Self::TcpRttP50, Self::TcpRttP99, Self::CpuPerGbit, Self::CpuPerPacket,
    ];

    pub fn key(self) -> &'static str {
        match self {
            Self::Tcp1 => "tcp_1_gbps",
            Self::Tcp4 => "tcp_4_gbps",
            Self::UdpRttP50 => "udp_rtt_p50_us",
            Self::UdpRttP99 => "udp_rtt_p99_us",
            Self::TcpRttP50 => "tcp_rtt_p50_us",
            Self::TcpRttP99 => "tcp_rtt_p99_us",
            Self::Udp64Rate => "udp64_kpps",
            Self::CpuPerGbit => "cpu_ms_per_gbit",
            Self::CpuPerPacket => "cpu_us_per_packet",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Tcp1 => "TCP throughput, 1 stream",
            Self::Tcp4 => "TCP throughput, 4 streams",
            Self::UdpRttP50 => "UDP ping-pong round trip, median",
            Self::UdpRttP99 => "UDP ping-pong round trip, p99",
            Self::TcpRttP50 => "TCP ping-pong round trip, median",
            Self::TcpRttP99 => "TCP ping-pong round trip, p99",
            Self::Udp64Rate => "64-byte UDP packets received",
            Self::CpuPerGbit => "CPU per Gbit (TCP, 1 stream)",
            Self::CpuPerPacket => "CPU per packet (64-byte UDP)",
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Self::Tcp1 | Self::Tcp4 => "Gbit/s",
            Self::UdpRttP50 | Self::UdpRttP99 | Self::TcpRttP50 | Self::TcpRttP99 => "µs",
            Self::Udp64Rate => "kpps",
            Self::CpuPerGbit => "CPU-ms/Gbit",
            Self::CpuPerPacket => "CPU-µs/pkt",
        }
    }

    pub fn better(self) -> Better {
        match self {
            Self::Tcp1 | Self::Tcp4 | Self::Udp64Rate => Better::Higher,
            _ => Better::Lower,
        }
    }

    /// Formats a value with as many decimals as its size deserves.
    pub fn format(self, value: f64) -> String {
        let decimals = match value.abs() {
            v if v >= 100.0 => 0,
            v if v >= 10.0 => 1,
            _ => 2,
        };
        format!("{value:.decimals$}")
    }
}

fn wire_key() -> String {
    Underlay::Wire.key().to_owned()
}

/// One test of one variant in one round.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub round: usize,
    /// The underlay's key ([`Underlay::key`]); reports from before there
    /// were two underlays measured the wire-like one.
    #[serde(default = "wire_key")]
    pub underlay: String,
    pub variant: String,
    pub test: String,
    /// Metric key → value.
    pub values: BTreeMap<String, f64>,
    /// Side figures that are not compared (retransmits, packets sent, ...).
    #[serde(default)]
    pub extra: BTreeMap<String, f64>,
    /// CPU the machine spent while the client ran.
    pub cpu: CpuTimes,
    /// How long the client ran, seconds.
    pub wall: f64,
}

/// A variant as it ran.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VariantInfo {
    /// The underlay's key ([`Underlay::key`]).
    #[serde(default = "wire_key")]
    pub underlay: String,
    pub key: String,
    pub label: String,
    pub description: String,
    /// The hook our agent reported attaching (from its log), if ours.
    pub hook: Option<String>,
    /// Our datapath's counters after the run, summed over both nodes, if
    /// ours: evidence that our programs carried the traffic.
    #[serde(default)]
    pub counters: BTreeMap<String, u64>,
}

/// Where and how the run happened.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Meta {
    pub date: String,
    pub kernel: String,
    pub cpu_model: String,
    pub cpus: usize,
    pub memory: String,
    pub load_before: String,
    pub load_after: String,
    pub tools: String,
    pub commit: String,
    pub command: String,
    pub repeats: usize,
    pub seconds: u32,
    pub quick: bool,
    pub underlay_mtu: u32,
    pub pod_mtu: u32,
    /// Wall time of the whole run, seconds.
    pub duration: f64,
    /// The nice level the tools ran at.
    #[serde(default)]
    pub tool_nice: String,
    /// The CPU every tool was pinned to, if any.
    #[serde(default)]
    pub pinned_cpu: Option<usize>,
    /// The TCP tests' fixed socket buffers (iperf3 `-w`), if not autotuned.
    #[serde(default)]
    pub tcp_window: Option<String>,
}

impl Report {
    /// The underlays measured, in the order they were given.
    pub fn underlays(&self) -> Vec<Underlay> {
        let mut out = Vec::new();
        for v in &self.variants {
            if let Some(u) = Underlay::from_key(&v.underlay)
                && !out.contains(&u)
            {
                out.push(u);
            }
        }
        out
    }

    /// The part of the report measured on `underlay`: statistics, ratios
    /// and tables of one underlay never mix in the other's records.
    pub fn for_underlay(&self, underlay: Underlay) -> Report {
        let key = underlay.key();
        Report {
            meta: self.meta.clone(),
            variants: self.variants.iter().filter(|v| v.underlay == key).cloned().collect(),
            records: self.records.iter().filter(|r| r.underlay == key).cloned().collect(),
            background: self.background.clone(),
        }
    }
}

/// Everything a run produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub meta: Meta,
    pub variants: Vec<VariantInfo>,
    pub records: Vec<Record>,
    /// The machine's CPU over an idle window of the test length, once per
    /// round: what other load (and our idle agents) cost in the meantime.
    pub background: Vec<CpuTimes>,
}

/// What to run.
pub struct Config {
    /// The `overlay-agent` binary.
    pub agent: PathBuf,
    pub variants: Vec<Variant>,
    /// Every variant is measured on each of these underlays, all in one
    /// interleaved schedule.
    pub underlays: Vec<Underlay>,
    pub repeats: usize,
    pub seconds: u32,
    pub quick: bool,
    /// Prefix of every namespace and pin directory created.
    pub prefix: String,
    /// Pin every tool to this CPU and account CPU time on it alone.
    pub cpu: Option<usize>,
    /// Set from a signal handler: stop at the next step and clean up.
    pub interrupted: &'static AtomicBool,
    /// The command line, for the report.
    pub command: String,
    /// Fixed TCP socket buffers (iperf3 `-w`) instead of autotuning.
    pub tcp_window: Option<String>,
}

/// Builds the labs, measures, tears down.
pub fn run(config: &Config) -> Result<Report, String> {
    let started = Instant::now();
    let mut meta = machine_meta();
    meta.load_before = loadavg();
    meta.command = config.command.clone();
    meta.repeats = config.repeats;
    meta.seconds = config.seconds;
    meta.quick = config.quick;
    meta.underlay_mtu = UNDERLAY_MTU;
    meta.pod_mtu = POD_MTU;
    meta.tool_nice = TOOL_NICE.to_owned();
    meta.pinned_cpu = config.cpu;
    meta.tcp_window = config.tcp_window.clone();

    let labs = start_labs(config)?;
    let subjects = subjects(config, &labs);
    for (underlay, v, ends) in &subjects {
        // Also resolves neighbours before anything is timed.
        if !ping(&ends.client, ends.server_ip) {
            return Err(format!(
                "{} on the {} underlay: {} cannot reach {}; the lab is broken, nothing measured",
                v.key(),
                underlay.key(),
                ends.client,
                ends.server_ip
            ));
        }
    }

    let mut records = Vec::new();
    let mut background = Vec::new();
    for round in 0..config.repeats {
        check_interrupted(config)?;
        let before = CpuTimes::now(config.cpu)?;
        std::thread::sleep(Duration::from_secs(config.seconds.into()));
        background.push(CpuTimes::now(config.cpu)?.since(before));
        for test in Test::ALL {
            // Both underlays' variants share the rotation: one schedule.
            for k in 0..subjects.len() {
                let (underlay, variant, ends) = &subjects[(round + k) % subjects.len()];
                check_interrupted(config)?;
                labs.ready_for(*variant)?;
                let record = measure_with_retry(test, *underlay, *variant, ends, round, config)?;
                eprintln!(
                    "bench: round {}/{} {:<7} {:<9} {:<20} {}",
                    round + 1,
                    config.repeats,
                    test.key(),
                    underlay.key(),
                    variant.key(),
                    record.values.iter().map(|(k, v)| format!("{k}={v:.2}")).collect::<Vec<_>>().join(" ")
                );
                records.push(record);
            }
        }
    }

    let variants = subjects
        .iter()
        .map(|(underlay, v, _)| {
            let lab = labs.of(*underlay, *v);
            let ours = matches!(v.setup(), Setup::Ours { .. });
            VariantInfo {
                underlay: underlay.key().to_owned(),
                key: v.key().to_owned(),
                label: v.label().to_owned(),
                description: v.description().to_owned(),
                hook: ours.then(|| attached_hook(lab)).flatten(),
                counters: if ours { datapath_counters(lab) } else { BTreeMap::new() },
            }
        })
        .collect();
    drop(labs);
    meta.load_after = loadavg();
    meta.duration = started.elapsed().as_secs_f64();
    Ok(Report { meta, variants, records, background })
}

fn check_interrupted(config: &Config) -> Result<(), String> {
    if config.interrupted.load(Ordering::SeqCst) {
        return Err("interrupted".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(round: usize, variant: Variant, gbps: f64) -> Record {
        Record {
            round,
            underlay: "wire".to_owned(),
            variant: variant.key().to_owned(),
            test: "tcp1".to_owned(),
            values: BTreeMap::from([(Metric::Tcp1.key().to_owned(), gbps)]),
            extra: BTreeMap::new(),
            cpu: CpuTimes::default(),
            wall: 1.0,
        }
    }

    fn variant_info(underlay: &str, v: Variant) -> VariantInfo {
        VariantInfo {
            underlay: underlay.to_owned(),
            key: v.key().to_owned(),
            label: v.label().to_owned(),
            description: String::new(),
            hook: None,
            counters: BTreeMap::new(),
        }
    }

    #[test]
    fn ratios_are_paired_by_round() {
        let info = |v: Variant| variant_info("wire", v);
        let report = Report {
            meta: Meta::default(),
            variants: vec![info(Variant::KernelVxlan), info(Variant::Vxlan)],
            records: vec![
                record(0, Variant::KernelVxlan, 4.0),
                record(0, Variant::Vxlan, 6.0),
                record(1, Variant::KernelVxlan, 2.0),
                record(1, Variant::Vxlan, 4.0),
                record(2, Variant::KernelVxlan, 5.0),
                record(2, Variant::Vxlan, 5.0),
            ],
            background: Vec::new(),
        };
        let stat = report.stat("vxlan", Metric::Tcp1).unwrap();
        assert_eq!((stat.median, stat.min, stat.max, stat.n), (5.0, 4.0, 6.0, 3));
        // Per round: 1.5, 2.0, 1.0; a ratio of medians would say 5/4.
        assert_eq!(report.ratio("vxlan", "kernel-vxlan", Metric::Tcp1), Some(1.5));
        let pair = report.paired_ratio("vxlan", "kernel-vxlan", Metric::Tcp1).unwrap();
        assert_eq!((pair.min, pair.max, pair.n), (1.0, 2.0, 3));
        let markdown = render_markdown(&report, "README.md");
        assert!(markdown.contains("**1.50×**<br>1.00–2.00"), "{markdown}");
        assert!(render_svg(&report).contains("1.50×"));
    }

    #[test]
    fn packet_sizes_show_as_medians_only_where_recorded() {
        let info = |v: Variant| variant_info("wire", v);
        let sized = |round, variant, received: f64| {
            let mut r = record(round, variant, 1.0);
            r.extra = BTreeMap::from([
                ("sender_bytes_per_ip_packet".to_owned(), 60000.0),
                ("receiver_bytes_per_ip_packet".to_owned(), received),
                ("receiver_packets_back_per_mb".to_owned(), 8.0),
            ]);
            r
        };
        let mut report = Report {
            meta: Meta::default(),
            variants: vec![info(Variant::KernelVxlan), info(Variant::Vxlan)],
            records: vec![record(0, Variant::KernelVxlan, 1.0), record(0, Variant::Vxlan, 1.0)],
            background: Vec::new(),
        };
        assert!(!render_markdown(&report, "README.md").contains("The packets of the 1-stream TCP test"));
        report.records = vec![
            sized(0, Variant::KernelVxlan, 57000.0),
            sized(0, Variant::Vxlan, 1448.0),
            sized(1, Variant::Vxlan, 1450.0),
            sized(2, Variant::Vxlan, 9000.0),
        ];
        let markdown = render_markdown(&report, "README.md");
        assert!(
            markdown.contains("| bytes per IP packet the receiver's IP took in (after any GRO) | 57000 | 1450 |"),
            "{markdown}"
        );
        assert!(markdown.contains("| packets the receiver sent back (ACKs) per MB received | 8 | 8 |"), "{markdown}");
    }

    #[test]
    fn each_underlay_has_its_own_figures_ratios_and_sections() {
        let info = variant_info;
        let on = |u: &str, mut r: Record| {
            r.underlay = u.to_owned();
            r
        };
        let report = Report {
            meta: Meta::default(),
            variants: vec![
                info("wire", Variant::KernelVxlan),
                info("wire", Variant::Vxlan),
                info("container", Variant::KernelVxlan),
                info("container", Variant::Vxlan),
            ],
            records: vec![
                record(0, Variant::KernelVxlan, 4.0),
                record(0, Variant::Vxlan, 3.0),
                on("container", record(0, Variant::KernelVxlan, 8.0)),
                on("container", record(0, Variant::Vxlan, 2.0)),
            ],
            background: Vec::new(),
        };
        assert_eq!(report.underlays(), vec![Underlay::Wire, Underlay::Container]);
        assert_eq!(report.for_underlay(Underlay::Wire).ratio("vxlan", "kernel-vxlan", Metric::Tcp1), Some(0.75));
        assert_eq!(report.for_underlay(Underlay::Container).ratio("vxlan", "kernel-vxlan", Metric::Tcp1), Some(0.25));
        let markdown = render_markdown(&report, "README.md");
        assert!(markdown.contains("## Wire-like underlay") && markdown.contains("## Container-style underlay"), "{markdown}");
        assert!(markdown.contains("**0.75×**") && markdown.contains("**0.25×**"), "{markdown}");
        let summary = summary_line(&report);
        assert!(summary.contains("wire-like underlay**, single-stream TCP over our VXLAN runs at **0.75×**"), "{summary}");
        assert!(summary.contains("container-style underlay**, single-stream TCP over our VXLAN runs at **0.25×**"), "{summary}");
        // A report from before the underlay field reads as the wire-like one.
        let old: Record = serde_json::from_str(r#"{"round":0,"variant":"vxlan","test":"tcp1","values":{},"cpu":{"user":0,"system":0,"softirq":0,"irq":0},"wall":1}"#).unwrap();
        assert_eq!(old.underlay, "wire");
    }
    #[test]
    fn a_results_page_links_to_the_guide_from_wherever_it_is_written() {
        use std::path::Path;
        let guide = Path::new("/w/docs/benchmarks");
        assert_eq!(render::guide_link(guide, guide), "README.md");
        assert_eq!(render::guide_link(&guide.join("nic"), guide), "../README.md");
        assert_eq!(render::guide_link(&guide.join("profiles/x"), guide), "../../README.md");
        assert_eq!(render::guide_link(Path::new("/tmp/bench"), guide), "/w/docs/benchmarks/README.md");

        // Written into a design run's subdirectory, the link reaches the
        // guide (it used to name a README beside the page, which does not
        // exist).
        let root = crate::TempDir::new("overlay-bench-guide");
        let guide_dir = root.path().join("docs/benchmarks");
        std::fs::create_dir_all(&guide_dir).unwrap();
        std::fs::write(guide_dir.join("README.md"), "the guide").unwrap();
        let page_dir = guide_dir.join("design-run");
        let report = Report { meta: Meta::default(), variants: Vec::new(), records: Vec::new(), background: Vec::new() };
        write_outputs(&report, &page_dir, &guide_dir).unwrap();
        let page = std::fs::read_to_string(page_dir.join("results.md")).unwrap();
        let link = page.split("[README.md](").nth(1).and_then(|rest| rest.split(')').next()).expect("a link to the guide");
        let target = std::fs::canonicalize(page_dir.join(link)).unwrap_or_else(|e| panic!("{link} from {}: {e}", page_dir.display()));
        assert_eq!(target, std::fs::canonicalize(guide_dir.join("README.md")).unwrap());
    }
}
