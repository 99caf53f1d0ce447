//! Rendering a report: results.md ([`render_markdown`]), results.svg
//! ([`render_svg`]), results.json ([`write_outputs`], [`read_report`]) and
//! the README's summary line ([`summary_line`], [`update_readme`]). All are
//! derived from the [`Report`] alone, so they can be regenerated from
//! results.json.

use std::{fmt::Write as _, path::Path};

use super::{BASELINE, Better, Metric, Report, Variant, VariantInfo};
use crate::lab::Underlay;

fn ratio_text(r: f64) -> String {
    format!("{r:.2}×")
}

/// The results page: machine, method, absolute figures, ratios, targets.
/// `guide` is the link to the bench's guide (docs/benchmarks/README.md)
/// from where the page is written ([`guide_link`]).
pub fn render_markdown(report: &Report, guide: &str) -> String {
    let m = &report.meta;
    let mut s = String::new();
    let _ = writeln!(s, "# Benchmark results\n");
    let _ = writeln!(
        s,
        "Written by `cargo xtask bench`{}; rerun it to update this page. How the numbers are taken and what they mean: [README.md]({guide}).\n",
        if m.quick { " in quick mode (1 s, smoke test only: do not quote these figures)" } else { "" }
    );
    let _ = writeln!(s, "- **When:** {} (commit `{}`), {:.0} min of wall time.", m.date, m.commit, m.duration / 60.0);
    let _ = writeln!(s, "- **Machine:** Linux {}; {} × {}; {} RAM. Tools: {}.", m.kernel, m.cpus, m.cpu_model, m.memory, m.tools);
    let scope = match m.pinned_cpu {
        Some(cpu) => format!("CPU {cpu} (the one the tools ran on)"),
        None => "the machine".to_owned(),
    };
    let background = report.background_share().map_or_else(String::new, |share| {
        format!(
            " In an idle window of {} s per round, {scope} spent a median {:.0} % of its time in the kernel and {:.0} % in user space on other work (other jobs, our idle agents).",
            m.seconds,
            share * 100.0,
            report.background_user_share().unwrap_or(0.0) * 100.0
        )
    });
    let during = report.user_share_during_tests().map_or_else(String::new, |share| {
        format!(" While iperf3 ran, user-space time (ours is small) took a median {:.0} % of {scope}.", share * 100.0)
    });
    let _ = writeln!(
        s,
        "- **Other load:** load average (1, 5, 15 min) {} before, {} after.{background}{during}",
        m.load_before, m.load_after
    );
    let _ = writeln!(
        s,
        "- **Lab:** the `cargo xtask lab` code: two nodes in network namespaces joined by the underlay, **underlay MTU {}**; one pod per node behind a `cni0` bridge, **pod MTU {}** in every pod variant. Underlays: {}.",
        m.underlay_mtu,
        m.pod_mtu,
        report.underlays().iter().map(|u| format!("**{}** ({})", u.label(), u.description())).collect::<Vec<_>>().join("; ")
    );
    let pinning = match m.pinned_cpu {
        Some(cpu) => format!(
            "Every tool, client and server, runs on CPU {cpu} at nice {}; veth hands packets on in the sender's context, so all of a test's packet processing runs there too, and throughput is the inverse of the path's CPU cost. CPU cost is CPU {cpu}'s system + softirq + irq time (from `/proc/stat`) while the client ran, per Gbit or packet received.",
            m.tool_nice
        ),
        None => format!(
            "The tools run unpinned at nice {}. CPU cost is the system + softirq + irq time of all CPUs (from `/proc/stat`) while the client ran, per Gbit or packet received: the whole machine's kernel time, so other load inflates it for every variant.",
            m.tool_nice
        ),
    };
    let _ = writeln!(
        s,
        "- **Method:** {} round(s) of {} s per test{}. Each round runs every test once per variant{}, the order rotated by one each round, so drift in the machine's load falls on all variants alike. Figures are medians over rounds, with the min–max spread; ratios are paired by round, within one underlay. {pinning}\n",
        report.rounds(),
        m.seconds,
        m.tcp_window.as_ref().map_or_else(String::new, |w| format!(
            ", **TCP socket buffers fixed at {w}** on both ends (iperf3 `-w`; a design comparison, not the run of record: by default the kernel autotunes them)"
        )),
        if report.underlays().len() > 1 {
            " and underlay: both underlays' labs are up for the whole run and share one interleaved schedule (not one after the other)"
        } else {
            ""
        },
    );

    for underlay in report.underlays() {
        let _ = writeln!(s, "## {}\n", capitalised(underlay.label()));
        let _ = writeln!(s, "{}.\n", capitalised(underlay.description()));
        render_underlay_markdown(&mut s, &report.for_underlay(underlay), underlay);
    }
    let _ = writeln!(s, "\n## Chart\n\n![ratios to kernel vxlan](results.svg)\n\nRaw data: [results.json](results.json).");
    s
}

fn capitalised(text: &str) -> String {
    let mut chars = text.chars();
    chars.next().map(|c| c.to_uppercase().chain(chars).collect()).unwrap_or_default()
}

/// The tables of one underlay: variants, absolute figures, ratios, targets.
fn render_underlay_markdown(s: &mut String, report: &Report, underlay: Underlay) {
    let base = BASELINE.key();
    let _ = writeln!(s, "### Variants\n");
    let _ = writeln!(s, "| variant | what runs | our hook, our counters after the run |");
    let _ = writeln!(s, "|---|---|---|");
    for v in &report.variants {
        let evidence = match &v.hook {
            Some(hook) => {
                let c = |k: &str| v.counters.get(k).copied().unwrap_or(0);
                format!(
                    "`{hook}`; encap {}, decap {}, direct {}, fast path {} packets",
                    c("encap_packets"),
                    c("decap_packets"),
                    c("direct_packets"),
                    c("fastpath_packets")
                )
            }
            None => "—".to_owned(),
        };
        let _ = writeln!(s, "| {} (`{}`) | {} | {evidence} |", v.label, v.key, v.description);
    }

    let _ = writeln!(s, "\n### Absolute figures\n\nMedian, and the min–max over rounds below it.\n");
    metric_table(s, report, |metric| format!("{} ({})", metric.label(), metric.unit()), |v, metric| match report.stat(&v.key, metric) {
        Some(st) => format!("**{}**<br>{}–{}", metric.format(st.median), metric.format(st.min), metric.format(st.max)),
        None => "—".to_owned(),
    });

    packet_sizes(s, report);

    if report.has(BASELINE) {
        let _ = writeln!(
            s,
            "\n### Ratios to flannel's kernel vxlan\n\nEach round gives a ratio (the variant's figure over kernel vxlan's figure in the same round); shown is their median, and below it their min–max. ↑ above 1 is better, ↓ below 1 is better.\n"
        );
        metric_table(s, report, |metric| metric.label().to_owned(), |v, metric| match report.paired_ratio(&v.key, base, metric) {
            Some(_) if v.key == base => "1×".to_owned(),
            Some(r) => format!("**{}**<br>{:.2}–{:.2}", ratio_text(r.median), r.min, r.max),
            None => "—".to_owned(),
        });
    }

    let targets = targets(report, underlay);
    if !targets.is_empty() {
        let _ = writeln!(s, "\n### Targets of issue 12\n\nTargets, not test assertions.\n");
        let _ = writeln!(s, "| target | measured | |");
        let _ = writeln!(s, "|---|---|---|");
        for t in targets {
            let _ = writeln!(s, "| {} | {} | {} |", t.what, t.measured, if t.met { "met" } else { "**not met**" });
        }
    }
    let _ = writeln!(s);
}

/// The 1-stream TCP test's packets as the two pods' IP layers counted them
/// (a figure from reports that have it): how many bytes one trip through
/// the path carried each way, which the CPU per Gbit divides among.
fn packet_sizes(s: &mut String, report: &Report) {
    const ROWS: [(&str, &str); 3] = [
        ("sender_bytes_per_ip_packet", "bytes per IP packet the sender's TCP sent"),
        ("receiver_bytes_per_ip_packet", "bytes per IP packet the receiver's IP took in (after any GRO)"),
        ("receiver_packets_back_per_mb", "packets the receiver sent back (ACKs) per MB received"),
    ];
    let any = report.variants.iter().any(|v| report.extra_stat(&v.key, "tcp1", ROWS[0].0).is_some());
    if !any {
        return;
    }
    let shares = has_path_shares(report);
    let _ = writeln!(
        s,
        "\n**The packets of the 1-stream TCP test**, from the pods' own IPv4 counters (`/proc/net/snmp`, `/proc/net/netstat`){}: each packet pays the path once, so a path that hands the receiving pod wire-sized segments instead of merged ones pays it per segment. Median over rounds.\n",
        if shares { "; the last row from the kernel time the processes were charged (`/proc/<pid>/stat`, `getrusage`)" } else { "" }
    );
    let header: Vec<&str> = report.variants.iter().map(|v| v.label.as_str()).collect();
    let _ = writeln!(s, "| | {} |", header.join(" | "));
    let _ = writeln!(s, "|---|{}", "---|".repeat(header.len()));
    for (key, label) in ROWS {
        let cells: Vec<String> = report
            .variants
            .iter()
            .map(|v| report.extra_stat(&v.key, "tcp1", key).map_or_else(|| "—".to_owned(), |st| format!("{:.0}", st.median)))
            .collect();
        let _ = writeln!(s, "| {label} | {} |", cells.join(" | "));
    }
    if shares {
        path_contexts(s, report);
    }
}

/// The receiver's share of the path's kernel time, as recorded for the
/// 1-stream TCP test where the tools were pinned ([`path_contexts`]).
const RECEIVER_SHARE: &str = "receiver_share_of_kernel_time";

fn has_path_shares(report: &Report) -> bool {
    report.variants.iter().any(|v| report.extra_stat(&v.key, "tcp1", RECEIVER_SHARE).is_some())
}

/// Where the 1-stream TCP test's path ran, round by round: with both ends
/// on one CPU it runs inside whichever task raised or met its work, split
/// between the sender's `write`, the receiver's `read` and `ksoftirqd`, or
/// almost wholly inside the receiver's `read`, which costs more for the
/// same datapath (docs/benchmarks/profiles/2026-12-05-path-context). A
/// paired ratio of two rounds that ran differently says as much about
/// that as about the paths.
fn path_contexts(s: &mut String, report: &Report) {
    let cells: Vec<String> = report
        .variants
        .iter()
        .map(|v| {
            report.extra_stat(&v.key, "tcp1", RECEIVER_SHARE).map_or_else(
                || "—".to_owned(),
                |st| format!("{:.0} %<br>{:.0}–{:.0} %", st.median * 100.0, st.min * 100.0, st.max * 100.0),
            )
        })
        .collect();
    let _ = writeln!(
        s,
        "| share of the kernel time of the two iperf3 and `ksoftirqd` spent in the receiving iperf3 (median, min–max over rounds; about 40 % when the path ran split, over 80 % when it ran inside the receiver's `read`) | {} |",
        cells.join(" | ")
    );
}

/// A table of a row per metric (named by `row`, with an arrow for which
/// way is better) and a column per variant, each cell from `cell`.
fn metric_table(s: &mut String, report: &Report, row: impl Fn(Metric) -> String, cell: impl Fn(&VariantInfo, Metric) -> String) {
    let header: Vec<&str> = report.variants.iter().map(|v| v.label.as_str()).collect();
    let _ = writeln!(s, "| metric | {} |", header.join(" | "));
    let _ = writeln!(s, "|---|{}", "---|".repeat(header.len()));
    for metric in Metric::ALL {
        let cells: Vec<String> = report.variants.iter().map(|v| cell(v, metric)).collect();
        let arrow = if metric.better() == Better::Higher { "↑" } else { "↓" };
        let _ = writeln!(s, "| {} {arrow} | {} |", row(metric), cells.join(" | "));
    }
}

struct Target {
    what: String,
    measured: String,
    met: bool,
}

impl Target {
    /// A ratio `r` against its `goal` (`at_least`: the ratio must reach it;
    /// otherwise stay under it).
    ///
    /// Printed with two decimals, or as many more (up to six) as it takes
    /// for a ratio that is not its goal not to print as the goal.
    fn ratio(what: String, r: f64, goal: f64, at_least: bool) -> Self {
        let mut digits = 2;
        while digits < 6 && r != goal && format!("{r:.digits$}") == format!("{goal:.digits$}") {
            digits += 1;
        }
        Self { what, measured: format!("{r:.digits$}×"), met: if at_least { r >= goal } else { r <= goal } }
    }
}

/// Issue 12's targets for `underlay` (default flags; medians of paired
/// ratios), and how close every variant comes to the raw underlay.
fn targets(report: &Report, underlay: Underlay) -> Vec<Target> {
    let mut out = Vec::new();
    let mut ratio_target = |variant: Variant, base: Variant, metric: Metric, goal: f64| {
        if !(report.has(variant) && report.has(base)) {
            return;
        }
        let Some(r) = report.ratio(variant.key(), base.key(), metric) else { return };
        let at_least = metric.better() == Better::Higher;
        let what = format!("{} {} {} {:.2}× {}", variant.label(), metric.label(), if at_least { "≥" } else { "≤" }, goal, base.label());
        out.push(Target::ratio(what, r, goal, at_least));
    };
    match underlay {
        Underlay::Container => {
            ratio_target(Variant::Vxlan, Variant::KernelVxlan, Metric::Tcp1, 1.1);
            ratio_target(Variant::Vxlan, Variant::KernelVxlan, Metric::Tcp4, 1.1);
            ratio_target(Variant::Vxlan, Variant::KernelVxlan, Metric::UdpRttP50, 0.85);
        }
        // A VM's NICs are the wire-like underlay's real thing.
        Underlay::Wire | Underlay::Nic => {
            ratio_target(Variant::Vxlan, Variant::KernelVxlan, Metric::Tcp1, 1.0);
            ratio_target(Variant::Vxlan, Variant::KernelVxlan, Metric::Tcp4, 1.0);
            ratio_target(Variant::Vxlan, Variant::KernelVxlan, Metric::CpuPerGbit, 1.0);
            ratio_target(Variant::Vxlan, Variant::KernelVxlan, Metric::UdpRttP50, 0.85);
            ratio_target(Variant::Vxlan, Variant::KernelVxlan, Metric::TcpRttP50, 0.85);
            ratio_target(Variant::Vxlan, Variant::KernelVxlan, Metric::Udp64Rate, 1.2);
        }
    }
    ratio_target(Variant::HostGw, Variant::KernelHostGw, Metric::Tcp1, 1.05);
    ratio_target(Variant::HostGw, Variant::KernelHostGw, Metric::Tcp4, 1.05);
    if report.has(Variant::Raw) {
        for v in report.variants.iter().filter(|v| v.key != Variant::Raw.key()) {
            if let Some(r) = report.ratio(&v.key, Variant::Raw.key(), Metric::Tcp1) {
                out.push(Target {
                    what: format!("{} within reach of the raw underlay (TCP, 1 stream)", v.label),
                    measured: format!("{} of raw", ratio_text(r)),
                    // "Within reach": no more than a fifth below the ceiling.
                    met: r >= 0.8,
                });
            }
        }
    }
    out
}

/// The README's one-line summary (between the bench-summary markers).
pub fn summary_line(report: &Report) -> String {
    let m = &report.meta;
    let per_underlay: Vec<String> = report
        .underlays()
        .into_iter()
        .map(|u| format!("on the **{}**, {}", u.label(), summary_of_one_underlay(&report.for_underlay(u))))
        .collect();
    format!(
        "Benchmark of {} ({} interleaved rounds, Linux {}, {} vCPUs): {}. Full results: [docs/benchmarks/results.md](docs/benchmarks/results.md).",
        m.date.split_whitespace().next().unwrap_or_default(),
        report.rounds(),
        m.kernel.split_whitespace().next().unwrap_or_default(),
        m.cpus,
        per_underlay.join("; ")
    )
}

fn summary_of_one_underlay(report: &Report) -> String {
    let pick = |v: Variant, base: Variant, metric: Metric| report.ratio(v.key(), base.key(), metric).map(ratio_text);
    let figure = |v: Variant, metric: Metric| {
        report.stat(v.key(), metric).map(|s| format!("{} {}", metric.format(s.median), metric.unit())).unwrap_or_default()
    };
    let mut parts = Vec::new();
    if let Some(r) = pick(Variant::Vxlan, Variant::KernelVxlan, Metric::Tcp1) {
        parts.push(format!(
            "single-stream TCP over our VXLAN runs at **{r}** the speed of flannel's kernel vxlan device ({} vs {})",
            figure(Variant::Vxlan, Metric::Tcp1),
            figure(Variant::KernelVxlan, Metric::Tcp1)
        ));
    }
    if let Some(r) = pick(Variant::Vxlan, Variant::KernelVxlan, Metric::UdpRttP50) {
        parts.push(format!("its UDP round trip takes **{r}** the time"));
    }
    if let Some(r) = pick(Variant::HostGw, Variant::KernelHostGw, Metric::Tcp1) {
        parts.push(format!("our host-gw runs at **{r}** the speed of kernel host-gw routes"));
    }
    if let Some(r) = pick(Variant::KernelVxlan, Variant::Raw, Metric::Tcp1) {
        parts.push(format!("kernel vxlan itself reaches {r} of the raw underlay"));
    }
    parts.join(", ")
}

pub const SUMMARY_START: &str = "<!-- bench-summary -->";
pub const SUMMARY_END: &str = "<!-- /bench-summary -->";

/// Replaces what is between the bench-summary markers of a README.
pub fn update_readme(path: &Path, line: &str) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let (Some(start), Some(end)) = (text.find(SUMMARY_START), text.find(SUMMARY_END)) else {
        return Err(format!(
            "{} has no `{SUMMARY_START}` … `{SUMMARY_END}` markers; add them where the summary belongs",
            path.display()
        ));
    };
    if end < start {
        return Err(format!("{}: `{SUMMARY_END}` comes before `{SUMMARY_START}`", path.display()));
    }
    let updated = format!("{}{SUMMARY_START}\n{line}\n{}", &text[..start], &text[end..]);
    std::fs::write(path, updated).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Writes results.json, results.md and results.svg into `dir`; results.md
/// links to the guide in `guide_dir` (the workspace's docs/benchmarks).
pub fn write_outputs(report: &Report, dir: &Path, guide_dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
    let guide = guide_link(&canonical(dir), &canonical(guide_dir));
    let json = serde_json::to_string_pretty(report).map_err(|e| e.to_string())?;
    for (name, text) in [("results.json", json + "\n"), ("results.md", render_markdown(report, &guide)), ("results.svg", render_svg(report))] {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    Ok(())
}

/// The link from a page in `dir` to the guide, `guide_dir`/README.md:
/// relative where `dir` is `guide_dir` or below it (a design run's
/// subdirectory), so it holds in the repository and on GitHub; the
/// guide's absolute path elsewhere (`--out /tmp/…`).
pub fn guide_link(dir: &Path, guide_dir: &Path) -> String {
    match dir.strip_prefix(guide_dir) {
        Ok(below) => "../".repeat(below.components().count()) + "README.md",
        Err(_) => guide_dir.join("README.md").display().to_string(),
    }
}

/// Reads a results.json written by [`write_outputs`].
pub fn read_report(path: &Path) -> Result<Report, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{} is not a bench report: {e}", path.display()))
}

// ---------------------------------------------------------------------------
// The chart.

/// Colours per variant, fixed so a variant looks the same in every chart.
fn colour(variant: &str) -> &'static str {
    match Variant::from_key(variant) {
        Some(Variant::Raw) => "#9e9e9e",
        Some(Variant::KernelHostGw) => "#80cbc4",
        Some(Variant::KernelVxlan) => "#f4a261",
        Some(Variant::Vxlan) => "#1d4ed8",
        Some(Variant::HostGw) => "#0f766e",
        Some(Variant::VxlanTc) => "#60a5fa",
        Some(Variant::VxlanXdpGeneric) => "#a78bfa",
        Some(Variant::HostGwXdp) => "#34d399",
        Some(Variant::VxlanBpfForward) => "#1e3a8a",
        Some(Variant::HostGwBpfForward) => "#064e3b",
        Some(Variant::VxlanTcBpfForward) => "#7c3aed",
        Some(Variant::VxlanXdp) => "#db2777",
        Some(Variant::KernelVxlanFlanneld) => "#e76f51",
        None => "#444444",
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Horizontal grouped bars: one group per metric, one bar per variant, its
/// length the ratio to kernel vxlan (the dashed line), a whisker for the
/// min–max over rounds, and the absolute median written at its end.
pub fn render_svg(report: &Report) -> String {
    let mut charts = Vec::new();
    let mut height = 0.0;
    for underlay in report.underlays() {
        let (chart, h) = render_underlay_svg(&report.for_underlay(underlay), underlay);
        // Nested: each underlay's chart keeps its own coordinates.
        charts.push(chart.replacen("<svg ", &format!(r#"<svg y="{height:.1}" "#), 1));
        height += h;
    }
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"1000\" height=\"{height:.1}\" viewBox=\"0 0 1000 {height:.1}\">\n{}</svg>\n",
        charts.concat()
    )
}

/// One underlay's chart, and its height.
fn render_underlay_svg(report: &Report, underlay: Underlay) -> (String, f64) {
    const WIDTH: f64 = 1000.0;
    const LABEL_X: f64 = 250.0;
    const PLOT_X0: f64 = 260.0;
    const PLOT_X1: f64 = 800.0;
    const BAR: f64 = 15.0;
    const ROW: f64 = 19.0;
    const GROUP_HEAD: f64 = 24.0;
    const GROUP_GAP: f64 = 12.0;
    const SECTION_HEAD: f64 = 48.0;

    let base = BASELINE.key();
    let has_base = report.variants.iter().any(|v| v.key == base);
    // Normalised to the baseline's median; without it, to the first variant.
    let norm_key = if has_base { base.to_owned() } else { report.variants.first().map(|v| v.key.clone()).unwrap_or_default() };
    let norm_label = report.variants.iter().find(|v| v.key == norm_key).map(|v| v.label.clone()).unwrap_or_default();

    let mut max_ratio: f64 = 1.5;
    for metric in Metric::ALL {
        for v in &report.variants {
            if let Some(pair) = report.paired_ratio(&v.key, &norm_key, metric) {
                max_ratio = max_ratio.max(pair.max);
            }
        }
    }
    let max_ratio = (max_ratio * 2.0).ceil() / 2.0;
    let scale = (PLOT_X1 - PLOT_X0) / max_ratio;
    let x = |ratio: f64| PLOT_X0 + ratio.min(max_ratio) * scale;

    let sections = [
        (Better::Higher, "Throughput and packet rate — longer is better"),
        (Better::Lower, "Latency and CPU cost — shorter is better"),
    ];
    let rows = report.variants.len() as f64;
    let groups_in = |b: Better| Metric::ALL.iter().filter(|m| m.better() == b).count() as f64;
    let top = 84.0;
    let height = top
        + sections.iter().map(|(b, _)| SECTION_HEAD + groups_in(*b) * (GROUP_HEAD + rows * ROW + GROUP_GAP)).sum::<f64>()
        + 40.0;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="20" y="28" font-size="18" font-weight="bold">overlay benchmark, {}: each variant as a multiple of {} (dashed line, 1×)</text>"#,
        escape(underlay.label()),
        escape(&norm_label)
    );
    let m = &report.meta;
    let _ = writeln!(
        s,
        r##"<text x="20" y="50" fill="#444">{} · Linux {} · {} vCPUs · {} interleaved rounds × {} s per test{}</text><text x="20" y="68" fill="#444">Bar: median of the per-round ratios (whisker: their min–max). Text: the variant's absolute median, then that ratio.</text>"##,
        escape(&m.date),
        escape(m.kernel.split_whitespace().next().unwrap_or_default()),
        m.cpus,
        report.rounds(),
        m.seconds,
        if m.quick { " · QUICK MODE" } else { "" }
    );

    let mut y = top;
    for (better, title) in sections {
        let _ = writeln!(s, r#"<text x="20" y="{:.1}" font-size="15" font-weight="bold">{}</text>"#, y + 16.0, escape(title));
        y += SECTION_HEAD;
        let section_top = y;
        let section_height = groups_in(better) * (GROUP_HEAD + rows * ROW + GROUP_GAP);
        // Grid lines every 0.5×, the 1× line dashed and dark.
        let mut tick = 0.0;
        while tick <= max_ratio + 1e-9 {
            let gx = x(tick);
            let (stroke, dash) = if (tick - 1.0).abs() < 1e-9 { ("#333", r#" stroke-dasharray="5,3""#) } else { ("#e5e5e5", "") };
            let _ = writeln!(
                s,
                r#"<line x1="{gx:.1}" y1="{:.1}" x2="{gx:.1}" y2="{:.1}" stroke="{stroke}"{dash}/>"#,
                section_top - 4.0,
                section_top + section_height - GROUP_GAP
            );
            let _ = writeln!(s, r##"<text x="{gx:.1}" y="{:.1}" text-anchor="middle" fill="#666" font-size="10">{tick}×</text>"##, section_top - 8.0);
            tick += 0.5;
        }
        for metric in Metric::ALL.into_iter().filter(|m| m.better() == better) {
            let _ = writeln!(
                s,
                r#"<text x="20" y="{:.1}" font-weight="bold">{} ({})</text>"#,
                y + 16.0,
                escape(metric.label()),
                escape(metric.unit())
            );
            y += GROUP_HEAD;
            for v in &report.variants {
                let cy = y + ROW / 2.0;
                let _ = writeln!(s, r#"<text x="{LABEL_X}" y="{:.1}" text-anchor="end">{}</text>"#, cy + 4.0, escape(&v.label));
                if let (Some(st), Some(pair)) = (report.stat(&v.key, metric), report.paired_ratio(&v.key, &norm_key, metric)) {
                    let (r, lo, hi) = (pair.median, pair.min, pair.max);
                    let _ = writeln!(
                        s,
                        r#"<rect x="{PLOT_X0}" y="{:.1}" width="{:.1}" height="{BAR}" fill="{}"/>"#,
                        cy - BAR / 2.0,
                        (x(r) - PLOT_X0).max(1.0),
                        colour(&v.key)
                    );
                    let _ = writeln!(
                        s,
                        r#"<line x1="{:.1}" y1="{cy:.1}" x2="{:.1}" y2="{cy:.1}" stroke="black" stroke-width="1.2"/><line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="black"/><line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="black"/>"#,
                        x(lo), x(hi),
                        x(lo), cy - 4.0, x(lo), cy + 4.0,
                        x(hi), cy - 4.0, x(hi), cy + 4.0
                    );
                    // Green when better than the baseline by more than 3 %,
                    // red when worse by as much, grey in between.
                    let gain = if better == Better::Higher { r } else { 1.0 / r };
                    let tone = if v.key == norm_key { "#444" } else if gain > 1.03 { "#15803d" } else if gain < 0.97 { "#b91c1c" } else { "#444" };
                    let _ = writeln!(
                        s,
                        // A white halo keeps the text legible where it crosses the 1× line.
                        r#"<text x="{:.1}" y="{:.1}" stroke="white" stroke-width="3" paint-order="stroke"><tspan font-weight="bold">{}</tspan> <tspan fill="{tone}">{}</tspan></text>"#,
                        x(r.max(hi)) + 6.0,
                        cy + 4.0,
                        escape(&format!("{} {}", metric.format(st.median), metric.unit())),
                        if v.key == norm_key { "= 1×".to_owned() } else { ratio_text(r) }
                    );
                }
                y += ROW;
            }
            y += GROUP_GAP;
        }
    }
    let _ = writeln!(
        s,
        r##"<text x="20" y="{:.1}" fill="#666" font-size="11">Ratio text: green = better than {} by more than 3 %, red = worse by more than 3 %. Source: results.json next to this chart, written by cargo xtask bench.</text>"##,
        y + 14.0,
        escape(&norm_label)
    );
    let _ = writeln!(s, "</svg>");
    (s, height)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ratio that rounds to its goal is printed with the digits that
    /// tell which side of it the ratio is on; the verdict and the figure
    /// never seem to disagree (the run of record of 2026-12-04 printed
    /// "1.20×, not met" for a 64-byte rate goal of 1.20×).
    /// Each round's split of the 1-stream test's kernel time shows as its
    /// median and range, so rounds that ran the path inside the
    /// receiver's `read` stand out beside those that ran it split.
    #[test]
    fn where_the_path_ran_shows_per_variant_with_its_range() {
        use std::collections::BTreeMap;

        use crate::bench::{Meta, Record, VariantInfo};
        let variant = |key: &str| VariantInfo {
            underlay: "wire".into(),
            key: key.into(),
            label: key.into(),
            description: String::new(),
            hook: None,
            counters: BTreeMap::new(),
        };
        let record = |key: &str, round: usize, share: Option<f64>| Record {
            round,
            underlay: "wire".into(),
            variant: key.into(),
            test: "tcp1".into(),
            values: BTreeMap::new(),
            extra: [("sender_bytes_per_ip_packet".to_owned(), 60000.0)]
                .into_iter()
                .chain(share.map(|v| ("receiver_share_of_kernel_time".to_owned(), v)))
                .collect(),
            cpu: Default::default(),
            wall: 1.0,
        };
        let report = Report {
            meta: Meta::default(),
            variants: vec![variant("kernel-vxlan"), variant("vxlan")],
            records: vec![
                record("kernel-vxlan", 0, Some(0.40)),
                record("kernel-vxlan", 1, Some(0.90)),
                record("kernel-vxlan", 2, Some(0.41)),
                record("vxlan", 0, None),
            ],
            background: Vec::new(),
        };
        let mut s = String::new();
        packet_sizes(&mut s, &report);
        assert!(s.contains("spent in the receiving iperf3"), "{s}");
        assert!(s.contains("| 41 %<br>40–90 % | — |"), "{s}");
        // The table's intro names the sources of its rows: the share is
        // not one of the pods' IP counters.
        let intro = s.lines().find(|line| line.starts_with("**The packets of the 1-stream TCP test**")).unwrap_or_default();
        assert!(intro.contains("the last row from the kernel time"), "{intro}");
        let without_shares = Report { records: vec![record("kernel-vxlan", 0, None), record("vxlan", 0, None)], ..report };
        let mut s = String::new();
        packet_sizes(&mut s, &without_shares);
        assert!(!s.contains("spent in the receiving iperf3") && !s.contains("the last row"), "{s}");
    }

    #[test]
    fn a_target_missed_by_less_than_the_rounding_shows_by_how_much() {
        let short = Target::ratio("rate".into(), 1.1996, 1.2, true);
        assert_eq!((short.measured.as_str(), short.met), ("1.1996×", false));
        let over = Target::ratio("cpu".into(), 1.0031, 1.0, false);
        assert_eq!((over.measured.as_str(), over.met), ("1.003×", false));
        let met = Target::ratio("rtt".into(), 0.7412, 0.85, false);
        assert_eq!((met.measured.as_str(), met.met), ("0.74×", true));
        let exact = Target::ratio("rate".into(), 1.2, 1.2, true);
        assert_eq!((exact.measured.as_str(), exact.met), ("1.20×", true));
    }

    #[test]
    fn readme_summary_is_replaced_between_the_markers_only() {
        let dir = crate::TempDir::new("ovbench-readme");
        let path = dir.path().join("README.md");
        std::fs::write(&path, format!("intro\n{SUMMARY_START}\nold\n{SUMMARY_END}\nrest\n")).unwrap();
        update_readme(&path, "new line").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), format!("intro\n{SUMMARY_START}\nnew line\n{SUMMARY_END}\nrest\n"));
        std::fs::write(&path, "no markers\n").unwrap();
        assert!(update_readme(&path, "x").unwrap_err().contains("markers"));
    }
}
