//! `overlay-bench --profile`: where the CPU goes on the 1-stream TCP test.
//!
//! For each (underlay, variant) it runs the bench's 1-stream TCP test while
//! `perf record -e cpu-clock -g` samples the measuring CPU (every tool is
//! pinned there, and veth hands packets on in the sender's context, so the
//! whole path runs there), then folds the stacks and draws a flame graph
//! with `inferno`, and tabulates kernel functions by self and inclusive
//! samples. Outputs, in the output directory, per `<underlay>-<variant>`:
//! `.folded` (folded stacks, kernel frames marked `_[k]`), `.svg` (the
//! flame graph), and `summary.md` for all of them.

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

/// Processes whose samples are the packets' path: the tools (client and
/// server are both iperf3; the packet path runs in their context) and the
/// softirq threads that take over under load.
fn on_the_path(comm: &str) -> bool {
    comm.starts_with("iperf3") || comm.starts_with("ksoftirqd")
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
    /// Received during the profile: Gbit/s and Gbit (a busy machine's
    /// figure, to turn samples into CPU per Gbit, not a result).
    pub gbps: f64,
    pub gbits: f64,
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

    /// CPU-ms per Gbit received that `samples` stand for.
    fn ms_per_gbit(&self, samples: u64) -> f64 {
        if self.gbits > 0.0 { samples as f64 / 1e6 / self.gbits } else { 0.0 }
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
pub fn run(config: &Config, out: &Path) -> Result<usize, String> {
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
        let name = format!("{}-{}", underlay.key(), variant.key());
        let data = std::env::temp_dir().join(format!("{}-{name}.perf.data", config.prefix));
        let json = recorded_iperf3(ends, config, &data).map_err(|e| format!("{name}: {e}"))?;
        let received = &json["end"]["sum_received"];
        let folded = fold(&data);
        let _ = std::fs::remove_file(&data);
        let folded = others_summarised(&folded.map_err(|e| format!("{name}: {e}"))?);
        std::fs::write(out.join(format!("{name}.folded")), &folded).map_err(|e| format!("writing {name}.folded: {e}"))?;
        flame_graph(&folded, &out.join(format!("{name}.svg")), &format!("{} on the {}: 1-stream TCP, CPU {}", variant.label(), underlay.label(), config.cpu.map_or("all".to_owned(), |c| c.to_string())))
            .map_err(|e| format!("{name}.svg: {e}"))?;
        let mut profile = Profile::from_folded(&folded);
        profile.underlay = underlay.key().to_owned();
        profile.variant = variant.key().to_owned();
        profile.gbps = received["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9;
        profile.gbits = received["bytes"].as_f64().unwrap_or(0.0) * 8.0 / 1e9;
        eprintln!(
            "bench: profiled {name}: {:.0} CPU-ms sampled, {:.0} on the path, {:.2} Gbit/s",
            profile.samples as f64 / 1e6, profile.path_samples as f64 / 1e6, profile.gbps
        );
        if profile.path_samples == 0 {
            return Err(format!("{name}: perf recorded no samples of iperf3 or ksoftirqd on the CPU"));
        }
        profiles.push(profile);
    }
    drop(labs);
    let summary = render_summary(&profiles, config, &load_before, &loadavg());
    std::fs::write(out.join("summary.md"), summary).map_err(|e| format!("writing summary.md: {e}"))?;
    Ok(profiles.len())
}

/// The bench's 1-stream TCP test, its client run by `perf record -e
/// cpu-clock -g` sampling the measuring CPU (all CPUs if unpinned). perf
/// starts the client only once its events are enabled, and stops with it,
/// so the profile covers the test and nothing else; perf itself stays off
/// the measuring CPU where there is another (the client pins itself).
fn recorded_iperf3(ends: &Endpoints, config: &Config, data: &Path) -> Result<serde_json::Value, String> {
    let ip = ends.server_ip.to_string();
    let _server = server(&ends.server, "iperf3", &["-s", "-1", "-B", &ip], IPERF3_PORT, true, ends.cpu)?;
    let mut client = tool(&ends.client, "iperf3", ends.cpu);
    client.args(["-c", &ip, "-t", &config.seconds.to_string(), "-J", "--connect-timeout", "3000", "-P", "1"]);
    if let Some(window) = &config.tcp_window {
        client.args(["-w", window]);
    }
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
pub fn render_summary(profiles: &[Profile], config: &Config, load_before: &str, load_after: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Profiles: 1-stream TCP, `perf record -e cpu-clock -g`\n");
    let _ = writeln!(
        s,
        "Written by `cargo xtask bench --profile`. Each profile is one {} s iperf3 run (client and server pinned to CPU {}{}), sampled every {} µs of CPU time on that CPU. Load average {load_before} before, {load_after} after. Shares are of the samples of the packets' path (processes iperf3 and ksoftirqd); CPU-ms per Gbit turns samples into the bench's unit with the Gbit received during the profile (a figure from a profiled run: compare, do not quote). Flame graphs: `<underlay>-<variant>.svg`; folded stacks: `<underlay>-<variant>.folded`.\n",
        config.seconds,
        config.cpu.map_or("all".to_owned(), |c| c.to_string()),
        config.tcp_window.as_ref().map_or_else(String::new, |w| format!("; socket buffers fixed at {w}, iperf3 `-w`")),
        PERIOD_NS / 1000
    );
    for underlay in Underlay::KINDS {
        let of: Vec<&Profile> = profiles.iter().filter(|p| p.underlay == underlay.key()).collect();
        if of.is_empty() {
            continue;
        }
        let _ = writeln!(s, "## {}\n", underlay.label());
        let _ = writeln!(s, "| variant | Gbit/s during the profile | CPU-ms sampled | on the path | other processes | path CPU-ms per Gbit |");
        let _ = writeln!(s, "|---|---|---|---|---|---|");
        for p in &of {
            let others: Vec<String> = {
                let mut o: Vec<(&String, &u64)> = p.by_comm.iter().filter(|(c, _)| !on_the_path(c)).collect();
                o.sort_by(|a, b| b.1.cmp(a.1));
                o.iter().take(3).map(|(c, n)| format!("{c} {:.1} %", **n as f64 * 100.0 / p.samples.max(1) as f64)).collect()
            };
            let _ = writeln!(
                s,
                "| `{}` | {:.2} | {:.0} | {:.0} | {} | {:.1} |",
                p.variant,
                p.gbps,
                p.samples as f64 / 1e6,
                p.path_samples as f64 / 1e6,
                if others.is_empty() { "—".to_owned() } else { others.join(", ") },
                p.ms_per_gbit(p.path_samples)
            );
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
            let total = |n: &str| of.iter().map(|p| p.ms_per_gbit(p.inclusive_samples.get(n).copied().unwrap_or(0))).sum::<f64>();
            total(b).total_cmp(&total(a)).then(a.cmp(b))
        });
        let _ = writeln!(
            s,
            "\n### Kernel functions side by side\n\nInclusive CPU-ms per Gbit (share of the path's samples), then self. Rows: every variant's top {TOP} by inclusive samples.\n"
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
                        format!("{:.1} ({:.1} %); self {:.1} %", p.ms_per_gbit(inc), p.share(inc), p.share(own))
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
