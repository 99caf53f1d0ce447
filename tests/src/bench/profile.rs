//! `overlay-bench --profile`: where the CPU goes on the 1-stream TCP test,
//! or (`--profile-test udp64`) on the 64-byte UDP packet-rate test.
//!
//! For each (underlay, variant) it runs the chosen bench test while
//! `perf record -e cpu-clock -g` samples the measuring CPU (every tool is
//! pinned there, and veth hands packets on in the sender's context, so the
//! whole path runs there), then folds the stacks and draws a flame graph
//! with `inferno`, and tabulates kernel functions by self and inclusive
//! samples. Outputs, in the output directory, per `<underlay>-<variant>`:
//! `.folded` (folded stacks, kernel frames marked `_[k]`), `.svg` (the
//! flame graph), and `summary.md` for all of them. The UDP test's files
//! are named `<underlay>-<variant>-udp64` and its summary
//! `summary-udp64.md`, so both tests' profiles can share a directory.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::Path,
    process::{Command, Stdio},
};

use inferno::collapse::{Collapse as _, perf};

use super::{
    Config, Variant, check_interrupted,
    measurement::{Endpoints, IPERF3_PORT, loadavg, ping, server, tool},
    variants::{start_labs, subjects},
};
use crate::lab::Underlay;

/// What `--profile` covers besides any `--variants`: the baseline and our
/// default.
pub const DEFAULT_VARIANTS: [Variant; 2] = [Variant::KernelVxlan, Variant::Vxlan];

/// The sampling period: cpu-clock every 250 µs of CPU time. inferno weighs
/// each stack by perf's period, so folded counts are CPU-nanoseconds.
const PERIOD_NS: u64 = 250_000;

/// Rows in each top-N table.
const TOP: usize = 25;

/// Which of the bench's tests a profile records (`--profile-test`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ProfiledTest {
    /// The 1-stream TCP throughput test: the cost per Gbit.
    #[default]
    #[value(name = "tcp")]
    Tcp1,
    /// The 64-byte UDP packet-rate test (`iperf3 -u -l 64 -b 0`): the
    /// cost per packet, where the per-packet work of our programs shows
    /// that a 64 KB TCP packet hides.
    Udp64,
}

impl ProfiledTest {
    /// What the summary and the flame graphs call it.
    pub fn label(self) -> &'static str {
        match self {
            Self::Tcp1 => "1-stream TCP",
            Self::Udp64 => "64-byte UDP packets",
        }
    }

    /// The suffix of its file names: none for TCP (as before there was a
    /// choice), `-udp64` for UDP.
    fn suffix(self) -> &'static str {
        match self {
            Self::Tcp1 => "",
            Self::Udp64 => "-udp64",
        }
    }

    /// iperf3's client arguments for the test, as the bench runs it.
    fn client_args(self) -> &'static [&'static str] {
        match self {
            Self::Tcp1 => &["-P", "1"],
            Self::Udp64 => &["-u", "-l", "64", "-b", "0"],
        }
    }

    /// The iperf3 client's arguments after `-c <server>`: the test's
    /// own, and `--tcp-window` for TCP only (the bench's UDP test has no
    /// socket-buffer setting either).
    fn iperf3_args(self, config: &Config) -> Vec<String> {
        let mut args: Vec<String> = ["-t", &config.seconds.to_string(), "-J", "--connect-timeout", "3000"].map(str::to_owned).to_vec();
        args.extend(self.client_args().iter().map(|a| (*a).to_owned()));
        if let Some(window) = config.tcp_window.as_ref().filter(|_| self == Self::Tcp1) {
            args.extend(["-w".to_owned(), window.clone()]);
        }
        args
    }

    /// A profile's file stem: `<underlay>-<variant>`, and `-udp64` for
    /// the UDP test.
    fn file_stem(self, underlay: &str, variant: &str) -> String {
        format!("{underlay}-{variant}{}", self.suffix())
    }

    /// The unit of work the costs are given per, the CPU unit they are
    /// in, and nanoseconds per that CPU unit.
    fn cost_unit(self) -> (&'static str, &'static str, f64) {
        match self {
            Self::Tcp1 => ("Gbit", "CPU-ms", 1e6),
            Self::Udp64 => ("packet", "CPU-µs", 1e3),
        }
    }

    /// How fast the test ran, from iperf3's JSON: Gbit/s or kpps
    /// received, and the work received (Gbit or packets).
    fn received(self, json: &serde_json::Value) -> Result<(f64, f64), String> {
        match self {
            Self::Tcp1 => {
                let received = &json["end"]["sum_received"];
                let gbps = received["bits_per_second"].as_f64().ok_or("iperf3: no end.sum_received.bits_per_second")? / 1e9;
                let gbits = received["bytes"].as_f64().ok_or("iperf3: no end.sum_received.bytes")? * 8.0 / 1e9;
                Ok((gbps, gbits))
            }
            Self::Udp64 => {
                let sum = &json["end"]["sum"];
                let sent = sum["packets"].as_f64().ok_or("iperf3 -u: no end.sum.packets")?;
                let lost = sum["lost_packets"].as_f64().ok_or("iperf3 -u: no end.sum.lost_packets")?;
                let seconds = sum["seconds"].as_f64().filter(|s| *s > 0.0).ok_or("iperf3 -u: no end.sum.seconds")?;
                let packets = (sent - lost).max(0.0);
                Ok((packets / seconds / 1e3, packets))
            }
        }
    }

    /// The unit of the rate received: Gbit/s or kpps.
    fn rate_unit(self) -> &'static str {
        match self {
            Self::Tcp1 => "Gbit/s",
            Self::Udp64 => "kpps",
        }
    }
}

/// Processes whose samples are the packets' path: the tools (client and
/// server are both iperf3; the packet path runs in their context) and the
/// softirq threads that take over under load.
fn on_the_path(comm: &str) -> bool {
    comm.starts_with("iperf3") || comm.starts_with("ksoftirqd")
}

/// Where a sample of the path ran. Client and server share one CPU, and
/// veth hands a packet on in the sender's context, so the path's softirq
/// work runs inside whichever task raised or met it: the sending iperf3's
/// `write`, the receiving one's `read` (the window updates it sends let the
/// sender's next packets through within it), `ksoftirqd` once the kernel
/// defers the work, or an interrupt's exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathContext {
    Read = 0,
    Write = 1,
    Ksoftirqd = 2,
    Elsewhere = 3,
}

impl PathContext {
    pub const ALL: [Self; 4] = [Self::Read, Self::Write, Self::Ksoftirqd, Self::Elsewhere];

    fn of(comm: &str, kernel_frames: &[&str]) -> Self {
        if comm.starts_with("ksoftirqd") {
            Self::Ksoftirqd
        } else if kernel_frames.contains(&"ksys_read") {
            Self::Read
        } else if kernel_frames.contains(&"ksys_write") {
            Self::Write
        } else {
            Self::Elsewhere
        }
    }

    fn heading(self) -> &'static str {
        match self {
            Self::Read => "in `read` (the receiving iperf3)",
            Self::Write => "in `write` (the sending iperf3)",
            Self::Ksoftirqd => "in `ksoftirqd`",
            Self::Elsewhere => "elsewhere (interrupts' softirqs, other calls)",
        }
    }
}

/// One profile's figures.
#[derive(Debug, Default)]
pub struct Profile {
    pub underlay: String,
    pub variant: String,
    /// CPU-ns sampled on the CPU, all processes (a sample weighs
    /// [`PERIOD_NS`]); the other counts are CPU-ns too.
    pub samples: u64,
    /// CPU-ns of processes on the packets' path.
    pub path_samples: u64,
    /// Samples per process name (all processes).
    pub by_comm: BTreeMap<String, u64>,
    /// Kernel function → samples where it is the leaf (path only).
    pub self_samples: BTreeMap<String, u64>,
    /// Kernel function → samples whose stack contains it (path only).
    pub inclusive_samples: BTreeMap<String, u64>,
    /// The path's samples by the context it ran in, indexed by
    /// [`PathContext`] (in [`PathContext::ALL`]'s order).
    pub by_context: [u64; PathContext::ALL.len()],
    /// The test profiled.
    pub test: ProfiledTest,
    /// Received during the profile: Gbit/s and Gbit for TCP, kpps and
    /// packets for UDP (a busy machine's figure, to turn samples into CPU
    /// per Gbit or per packet, not a result).
    pub rate: f64,
    pub work: f64,
}

impl Profile {
    /// Reads folded stacks (`comm;frame;...;leaf count`); kernel frames
    /// carry inferno's `_[k]` mark, which is dropped from the names.
    pub fn from_folded(folded: &str) -> Self {
        let mut p = Self::default();
        for line in folded.lines() {
            let Some((stack, count)) = line.rsplit_once(' ') else { continue };
            let Ok(count) = count.parse::<u64>() else { continue };
            let mut frames = stack.split(';');
            let mut comm = frames.next().unwrap_or_default();
            if comm == "[other load]" {
                comm = frames.next().unwrap_or_default();
            }
            p.samples += count;
            *p.by_comm.entry(comm.to_owned()).or_default() += count;
            if !on_the_path(comm) {
                continue;
            }
            p.path_samples += count;
            let kernel: Vec<&str> = frames.filter_map(|f| f.strip_suffix("_[k]")).collect();
            let context = PathContext::of(comm, &kernel);
            p.by_context[context as usize] += count;
            if let Some(leaf) = stack.rsplit(';').next().and_then(|f| f.strip_suffix("_[k]")) {
                *p.self_samples.entry(leaf.to_owned()).or_default() += count;
            }
            let distinct: BTreeSet<&str> = kernel.into_iter().collect();
            for f in distinct {
                *p.inclusive_samples.entry(f.to_owned()).or_default() += count;
            }
        }
        p
    }

    fn share(&self, samples: u64) -> f64 {
        if self.path_samples == 0 { 0.0 } else { samples as f64 * 100.0 / self.path_samples as f64 }
    }

    /// The CPU per unit of work received (CPU-ms per Gbit, CPU-µs per
    /// packet) that `samples` stand for.
    fn cost(&self, samples: u64) -> f64 {
        let (_, _, ns) = self.test.cost_unit();
        if self.work > 0.0 { samples as f64 / ns / self.work } else { 0.0 }
    }

    fn top(map: &BTreeMap<String, u64>, n: usize) -> Vec<(&str, u64)> {
        let mut rows: Vec<(&str, u64)> = map.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        rows.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        rows.truncate(n);
        rows
    }
}

/// Profiles every (underlay, variant) of `config` and writes the outputs to
/// `out`; returns how many profiles it wrote.
pub fn run(config: &Config, test: ProfiledTest, out: &Path) -> Result<usize, String> {
    if Command::new("perf").arg("--version").output().is_err() {
        return Err("`perf` is not installed: run `cargo xtask setup` (it installs Debian's linux-perf)".to_owned());
    }
    std::fs::create_dir_all(out).map_err(|e| format!("creating {}: {e}", out.display()))?;
    let labs = start_labs(config)?;
    let subjects = subjects(config, &labs);
    for (underlay, v, ends) in &subjects {
        if !ping(&ends.client, ends.server_ip) {
            return Err(format!("{} on the {} underlay: {} cannot reach {}", v.key(), underlay.key(), ends.client, ends.server_ip));
        }
    }
    let load_before = loadavg();
    let mut profiles = Vec::new();
    for (underlay, variant, ends) in &subjects {
        check_interrupted(config)?;
        labs.ready_for(*variant)?;
        let name = test.file_stem(underlay.key(), variant.key());
        let data = std::env::temp_dir().join(format!("{}-{name}.perf.data", config.prefix));
        let json = recorded_iperf3(ends, config, test, &data).map_err(|e| format!("{name}: {e}"))?;
        let received = test.received(&json).map_err(|e| format!("{name}: {e}"));
        let folded = fold(&data);
        let _ = std::fs::remove_file(&data);
        let folded = others_summarised(&folded.map_err(|e| format!("{name}: {e}"))?);
        std::fs::write(out.join(format!("{name}.folded")), &folded).map_err(|e| format!("writing {name}.folded: {e}"))?;
        flame_graph(&folded, &out.join(format!("{name}.svg")), &format!("{} on the {}: {}, CPU {}", variant.label(), underlay.label(), test.label(), config.cpu.map_or("all".to_owned(), |c| c.to_string())))
            .map_err(|e| format!("{name}.svg: {e}"))?;
        let mut profile = Profile::from_folded(&folded);
        profile.underlay = underlay.key().to_owned();
        profile.variant = variant.key().to_owned();
        profile.test = test;
        (profile.rate, profile.work) = received?;
        eprintln!(
            "bench: profiled {name}: {:.0} CPU-ms sampled, {:.0} on the path, {:.2} {}",
            profile.samples as f64 / 1e6,
            profile.path_samples as f64 / 1e6,
            profile.rate,
            test.rate_unit()
        );
        if profile.path_samples == 0 {
            return Err(format!("{name}: perf recorded no samples of iperf3 or ksoftirqd on the CPU"));
        }
        profiles.push(profile);
    }
    drop(labs);
    let summary = render_summary(&profiles, config, test, &load_before, &loadavg());
    let summary_name = summary_name(test);
    std::fs::write(out.join(&summary_name), summary).map_err(|e| format!("writing {summary_name}: {e}"))?;
    Ok(profiles.len())
}

/// The bench's `test`, its client run by `perf record -e cpu-clock -g`
/// sampling the measuring CPU (all CPUs if unpinned). perf
/// starts the client only once its events are enabled, and stops with it,
/// so the profile covers the test and nothing else; perf itself stays off
/// the measuring CPU where there is another (the client pins itself).
fn recorded_iperf3(ends: &Endpoints, config: &Config, test: ProfiledTest, data: &Path) -> Result<serde_json::Value, String> {
    let ip = ends.server_ip.to_string();
    let _server = server(&ends.server, "iperf3", &["-s", "-1", "-B", &ip], IPERF3_PORT, true, ends.cpu)?;
    let mut client = tool(&ends.client, "iperf3", ends.cpu);
    client.args(["-c", &ip]).args(test.iperf3_args(config));
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let mut cmd = match config.cpu.and_then(|c| (0..cpus).find(|&o| o != c)) {
        Some(other) => {
            let mut c = Command::new("taskset");
            c.args(["-c", &other.to_string(), "perf"]);
            c
        }
        None => Command::new("perf"),
    };
    cmd.args(["record", "-e", "cpu-clock", "-c", &PERIOD_NS.to_string(), "-g", "-q", "-o"]).arg(data);
    match config.cpu {
        Some(c) => cmd.args(["-C", &c.to_string()]),
        None => cmd.arg("-a"),
    };
    cmd.arg("--").arg(client.get_program()).args(client.get_args());
    let out = cmd.stdin(Stdio::null()).output().map_err(|e| format!("running perf record: {e}"))?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        format!("perf record / iperf3 printed no JSON ({e}; {}): {}", out.status, String::from_utf8_lossy(&out.stderr))
    })?;
    if let Some(error) = json["error"].as_str() {
        return Err(format!("iperf3: {error}"));
    }
    Ok(json)
}

/// The summary's file name: `summary.md` for TCP, `summary-udp64.md`.
pub fn summary_name(test: ProfiledTest) -> String {
    format!("summary{}.md", test.suffix())
}

/// `perf script` of `data`, folded by inferno with kernel frames marked.
fn fold(data: &Path) -> Result<String, String> {
    let script = Command::new("perf")
        .args(["script", "-i"])
        .arg(data)
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("running perf script: {e}"))?;
    if !script.status.success() {
        return Err(format!("perf script failed ({})", script.status));
    }
    let mut options = perf::Options::default();
    options.annotate_kernel = true;
    let mut folded = Vec::new();
    perf::Folder::from(options)
        .collapse(&script.stdout[..], &mut folded)
        .map_err(|e| format!("folding perf script's output: {e}"))?;
    String::from_utf8(folded).map_err(|e| format!("folded stacks are not UTF-8: {e}"))
}

/// Keeps the stacks of the packets' path and folds every other process
/// (other jobs on the shared machine) into one frame per process name under
/// `[other load]`: the flame graph still shows how much CPU they took, and
/// the files stay small.
fn others_summarised(folded: &str) -> String {
    let mut others: BTreeMap<String, u64> = BTreeMap::new();
    let mut kept = String::new();
    for line in folded.lines() {
        let comm = line.split(';').next().unwrap_or_default();
        let count = line.rsplit_once(' ').and_then(|(_, c)| c.parse::<u64>().ok());
        match count {
            Some(count) if !on_the_path(comm) => {
                *others.entry(comm.to_owned()).or_default() += count;
            }
            _ => {
                kept.push_str(line);
                kept.push('\n');
            }
        }
    }
    for (comm, count) in others {
        let _ = writeln!(kept, "[other load];{comm} {count}");
    }
    kept
}

fn flame_graph(folded: &str, path: &Path, title: &str) -> Result<(), String> {
    let mut options = inferno::flamegraph::Options::default();
    options.title = title.to_owned();
    options.count_name = "CPU-ns".to_owned();
    let file = std::fs::File::create(path).map_err(|e| e.to_string())?;
    inferno::flamegraph::from_lines(&mut options, folded.lines(), std::io::BufWriter::new(file)).map_err(|e| e.to_string())
}

/// summary.md: per underlay, the path's cost per variant, the functions
/// side by side, and each variant's top-N.
pub fn render_summary(profiles: &[Profile], config: &Config, test: ProfiledTest, load_before: &str, load_after: &str) -> String {
    let (work, cpu_unit, _) = test.cost_unit();
    let per = format!("{cpu_unit} per {work}");
    let mut s = String::new();
    let _ = writeln!(s, "# Profiles: {}, `perf record -e cpu-clock -g`\n", test.label());
    let _ = writeln!(
        s,
        "Written by `cargo xtask bench --profile{}`. Each profile is one {} s iperf3 run (`{}`; client and server pinned to CPU {}{}), sampled every {} µs of CPU time on that CPU. Load average {load_before} before, {load_after} after. Shares are of the samples of the packets' path (processes iperf3 and ksoftirqd); {per} turns samples into the bench's unit with the {work}s received during the profile (a figure from a profiled run: compare, do not quote). Flame graphs: `<underlay>-<variant>{suffix}.svg`; folded stacks: `<underlay>-<variant>{suffix}.folded`.\n",
        match test {
            ProfiledTest::Tcp1 => "",
            ProfiledTest::Udp64 => " --profile-test udp64",
        },
        config.seconds,
        test.client_args().join(" "),
        config.cpu.map_or("all".to_owned(), |c| c.to_string()),
        config
            .tcp_window
            .as_ref()
            .filter(|_| test == ProfiledTest::Tcp1)
            .map_or_else(String::new, |w| format!("; socket buffers fixed at {w}, iperf3 `-w`")),
        PERIOD_NS / 1000,
        suffix = test.suffix(),
    );
    for underlay in Underlay::KINDS {
        let of: Vec<&Profile> = profiles.iter().filter(|p| p.underlay == underlay.key()).collect();
        if of.is_empty() {
            continue;
        }
        let _ = writeln!(s, "## {}\n", underlay.label());
        let _ = writeln!(s, "| variant | {} received during the profile | CPU-ms sampled | on the path | other processes | path {per} |", test.rate_unit());
        let _ = writeln!(s, "|---|---|---|---|---|---|");
        for p in &of {
            let others: Vec<String> = {
                let mut o: Vec<(&String, &u64)> = p.by_comm.iter().filter(|(c, _)| !on_the_path(c)).collect();
                o.sort_by(|a, b| b.1.cmp(a.1));
                o.iter().take(3).map(|(c, n)| format!("{c} {:.1} %", **n as f64 * 100.0 / p.samples.max(1) as f64)).collect()
            };
            let _ = writeln!(
                s,
                "| `{}` | {:.2} | {:.0} | {:.0} | {} | {:.2} |",
                p.variant,
                p.rate,
                p.samples as f64 / 1e6,
                p.path_samples as f64 / 1e6,
                if others.is_empty() { "—".to_owned() } else { others.join(", ") },
                p.cost(p.path_samples)
            );
        }
        let _ = writeln!(
            s,
            "\n### Where the path ran\n\nShare of the path's samples by the context it ran in. Client and server share the CPU, so the path runs inside whichever of them raised or met its work; a run whose path ran mostly inside the receiver's `read` and one split between `read`, `write` and `ksoftirqd` can differ in cost for the same datapath: compare profiles of one kind.\n"
        );
        let _ = writeln!(s, "| variant | {} |", PathContext::ALL.map(PathContext::heading).join(" | "));
        let _ = writeln!(s, "|---|{}", "---|".repeat(PathContext::ALL.len()));
        for p in &of {
            let cells: Vec<String> = p.by_context.iter().map(|n| format!("{:.1} %", p.share(*n))).collect();
            let _ = writeln!(s, "| `{}` | {} |", p.variant, cells.join(" | "));
        }
        // The union of every variant's top inclusive functions, side by side.
        let mut names: Vec<&str> = Vec::new();
        for p in &of {
            for (name, _) in Profile::top(&p.inclusive_samples, TOP) {
                if !names.contains(&name) {
                    names.push(name);
                }
            }
        }
        names.sort_by(|a, b| {
            let total = |n: &str| of.iter().map(|p| p.cost(p.inclusive_samples.get(n).copied().unwrap_or(0))).sum::<f64>();
            total(b).total_cmp(&total(a)).then(a.cmp(b))
        });
        let _ = writeln!(
            s,
            "\n### Kernel functions side by side\n\nInclusive {per} (share of the path's samples), then self. Rows: every variant's top {TOP} by inclusive samples.\n"
        );
        let _ = writeln!(s, "| function | {} |", of.iter().map(|p| format!("`{}`", p.variant)).collect::<Vec<_>>().join(" | "));
        let _ = writeln!(s, "|---|{}", "---|".repeat(of.len()));
        for name in names {
            let cells: Vec<String> = of
                .iter()
                .map(|p| {
                    let inc = p.inclusive_samples.get(name).copied().unwrap_or(0);
                    let own = p.self_samples.get(name).copied().unwrap_or(0);
                    if inc == 0 {
                        "—".to_owned()
                    } else {
                        format!("{:.2} ({:.1} %); self {:.1} %", p.cost(inc), p.share(inc), p.share(own))
                    }
                })
                .collect();
            let _ = writeln!(s, "| `{name}` | {} |", cells.join(" | "));
        }
        for p in &of {
            let _ = writeln!(s, "\n### `{}`: top {TOP} kernel functions\n", p.variant);
            let _ = writeln!(s, "| by self samples | self % | by inclusive samples | inclusive % |");
            let _ = writeln!(s, "|---|---|---|---|");
            let own = Profile::top(&p.self_samples, TOP);
            let inc = Profile::top(&p.inclusive_samples, TOP);
            for i in 0..own.len().max(inc.len()) {
                let cell = |rows: &[(&str, u64)]| {
                    rows.get(i).map_or(("".to_owned(), "".to_owned()), |(n, c)| (format!("`{n}`"), format!("{:.1}", p.share(*c))))
                };
                let (a, b) = cell(&own);
                let (c, d) = cell(&inc);
                let _ = writeln!(s, "| {a} | {b} | {c} | {d} |");
            }
        }
        let _ = writeln!(s);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-round wire-like configuration on CPU 1, 8 s per profile.
    fn wire_config(tcp_window: Option<&str>) -> Config {
        static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        Config {
            agent: "overlay-agent".into(),
            variants: Vec::new(),
            underlays: vec![Underlay::Wire],
            repeats: 1,
            seconds: 8,
            quick: false,
            prefix: "t".to_owned(),
            cpu: Some(1),
            interrupted: &STOP,
            command: String::new(),
            tcp_window: tcp_window.map(str::to_owned),
        }
    }

    #[test]
    fn folded_stacks_give_self_and_inclusive_kernel_samples_of_the_path() {
        let folded = "iperf3;write;entry_SYSCALL_64_[k];tcp_sendmsg_[k];skb_copy_[k] 3\n\
                      iperf3;entry_SYSCALL_64_[k];tcp_sendmsg_[k] 2\n\
                      ksoftirqd/1;net_rx_action_[k];tcp_sendmsg_[k];memcpy_[k] 1\n\
                      rustc;llvm::foo 10\n";
        let p = Profile::from_folded(folded);
        assert_eq!((p.samples, p.path_samples), (16, 6));
        assert_eq!(p.self_samples.get("skb_copy"), Some(&3));
        assert_eq!(p.self_samples.get("tcp_sendmsg"), Some(&2));
        assert_eq!(p.inclusive_samples.get("tcp_sendmsg"), Some(&6));
        assert_eq!(p.inclusive_samples.get("entry_SYSCALL_64"), Some(&5));
        assert_eq!(p.self_samples.get("write"), None, "user frames are not kernel functions");
        assert_eq!(p.by_comm.get("rustc"), Some(&10));
    }

    #[test]
    fn the_udp_test_is_costed_per_packet_received_and_written_apart() {
        let json = serde_json::json!({"end": {"sum": {"packets": 1000.0, "lost_packets": 100.0, "seconds": 2.0}}});
        assert_eq!(ProfiledTest::Udp64.received(&json), Ok((0.45, 900.0)), "kpps and packets received, the lost ones left out");
        assert!(ProfiledTest::Udp64.received(&serde_json::json!({"end": {"sum_received": {"bytes": 1.0}}})).is_err());
        let tcp = serde_json::json!({"end": {"sum_received": {"bits_per_second": 8e9, "bytes": 4e9}}});
        assert_eq!(ProfiledTest::Tcp1.received(&tcp), Ok((8.0, 32.0)));

        let mut p = Profile::from_folded("iperf3;udp_sendmsg_[k] 1800000\nksoftirqd/1;bpf_prog_1_overlay_tc_ingress 900000\n");
        (p.test, p.underlay, p.variant, p.rate, p.work) = (ProfiledTest::Udp64, "wire".to_owned(), "vxlan".to_owned(), 0.45, 900.0);
        // 2.7 ms of the path over 900 packets.
        assert!((p.cost(p.path_samples) - 3.0).abs() < 1e-9);
        let config = wire_config(Some("256K"));
        let summary = render_summary(&[p], &config, ProfiledTest::Udp64, "0", "0");
        assert!(summary.starts_with("# Profiles: 64-byte UDP packets"), "{summary}");
        assert!(summary.contains("`cargo xtask bench --profile --profile-test udp64`"), "{summary}");
        assert!(summary.contains("| variant | kpps received during the profile |") && summary.contains("path CPU-µs per packet |"), "{summary}");
        assert!(summary.contains("| `vxlan` | 0.45 | 3 | 3 | — | 3.00 |"), "{summary}");
        assert!(summary.contains("`-u -l 64 -b 0`") && !summary.contains("iperf3 `-w`"), "the window is TCP's: {summary}");
        assert_eq!((summary_name(ProfiledTest::Tcp1), summary_name(ProfiledTest::Udp64)), ("summary.md".to_owned(), "summary-udp64.md".to_owned()));
        assert_eq!(
            (ProfiledTest::Tcp1.file_stem("wire", "vxlan"), ProfiledTest::Udp64.file_stem("wire", "vxlan")),
            ("wire-vxlan".to_owned(), "wire-vxlan-udp64".to_owned()),
            "TCP keeps the names it had; UDP's stand apart"
        );
        assert_eq!(ProfiledTest::Udp64.iperf3_args(&config).join(" "), "-t 8 -J --connect-timeout 3000 -u -l 64 -b 0", "no -w for UDP");
        assert_eq!(ProfiledTest::Tcp1.iperf3_args(&config).join(" "), "-t 8 -J --connect-timeout 3000 -P 1 -w 256K");
    }

    #[test]
    fn the_summary_says_in_which_context_the_path_ran() {
        let folded = "iperf3;read;entry_SYSCALL_64_[k];ksys_read_[k];tcp_recvmsg_[k];net_rx_action_[k] 6\n\
                      iperf3;write;entry_SYSCALL_64_[k];ksys_write_[k];tcp_sendmsg_[k] 2\n\
                      ksoftirqd/1;run_ksoftirqd_[k];net_rx_action_[k] 1\n\
                      iperf3;select;asm_sysvec_apic_timer_interrupt_[k];handle_softirqs_[k] 1\n\
                      rustc;llvm::foo 10\n";
        let mut p = Profile::from_folded(folded);
        assert_eq!(p.by_context, [6, 2, 1, 1], "read, write, ksoftirqd, elsewhere; other processes are not the path");
        (p.underlay, p.variant, p.work) = ("wire".to_owned(), "vxlan".to_owned(), 1.0);
        let config = wire_config(None);
        let summary = render_summary(&[p], &config, ProfiledTest::Tcp1, "0", "0");
        assert!(summary.contains("### Where the path ran"), "{summary}");
        assert!(summary.contains("| `vxlan` | 60.0 % | 20.0 % | 10.0 % | 10.0 % |"), "{summary}");
    }

    #[test]
    fn other_processes_become_one_frame_each_and_still_count() {
        let folded = "iperf3;tcp_sendmsg_[k] 2\n\
                      rustc;a;b 3\n\
                      rustc;c 4\n\
                      opt cgu.1;d 1\n";
        let kept = others_summarised(folded);
        assert_eq!(kept, "iperf3;tcp_sendmsg_[k] 2\n[other load];opt cgu.1 1\n[other load];rustc 7\n");
        let p = Profile::from_folded(&kept);
        assert_eq!((p.samples, p.path_samples), (10, 2));
        assert_eq!(p.by_comm.get("rustc"), Some(&7));
    }
}
