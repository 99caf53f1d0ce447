//! The benchmark behind `cargo xtask bench`: every variant side by side in
//! the lab, measured interleaved, written as markdown, JSON and SVG.

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
};

use clap::Parser;
use overlay_tests::{
    bench::{self, BASELINE, Config, DEFAULT_VARIANTS, Variant, profile},
    lab::Underlay,
};

/// Prefix of every namespace and pin directory a run creates; distinct from
/// the lab's, so `cargo xtask lab -- --down` never touches a running bench.
const BENCH_PREFIX: &str = "ovbench";

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Which underlays to measure.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum UnderlayArg {
    Wire,
    Container,
    Both,
    Nic,
}

impl UnderlayArg {
    fn underlays(self) -> Vec<Underlay> {
        match self {
            Self::Wire => vec![Underlay::Wire],
            Self::Container => vec![Underlay::Container],
            Self::Both => Underlay::ALL.to_vec(),
            Self::Nic => vec![Underlay::Nic],
        }
    }
}

#[derive(Parser)]
#[command(about = "overlay's benchmark: kernel vxlan, host-gw and our datapath side by side, interleaved")]
struct Args {
    /// The overlay-agent binary to run on our nodes.
    #[arg(long)]
    agent: Option<PathBuf>,
    /// The workspace: default --out directories are inside it, and a full
    /// run of the defaults rewrites its README's summary line.
    #[arg(long, default_value = ".")]
    root: PathBuf,
    /// Smoke test: 1 round of 1 s per test (unless --repeats/--seconds say
    /// otherwise). Proves every variant moves traffic; the figures mean
    /// nothing.
    #[arg(long)]
    quick: bool,
    /// Rounds; every test runs once per variant in each.
    #[arg(long)]
    repeats: Option<usize>,
    /// Seconds per test.
    #[arg(long)]
    seconds: Option<u32>,
    /// For design comparisons: the TCP tests' socket buffers, fixed on
    /// both ends (iperf3 `-w`, e.g. `256K`), instead of the kernel's
    /// autotuning. With autotuning, megabytes wait in the receiver's queue
    /// between the sender's copy and the receiver's (both on the one
    /// measuring CPU), so both copies miss the CPU's caches by an amount
    /// that varies from run to run; a window that fits the cache leaves the
    /// path's own cost to decide. Not for the run of record.
    #[arg(long, value_name = "SIZE")]
    tcp_window: Option<String>,
    /// Comma-separated variants (default raw, kernel-host-gw, kernel-vxlan,
    /// vxlan, host-gw); for design comparisons also vxlan-tc,
    /// vxlan-xdp-generic, host-gw-xdp, vxlan-bpf-forward,
    /// host-gw-bpf-forward, vxlan-tc-bpf-forward, vxlan-xdp;
    /// kernel-vxlan-flanneld (kernel-vxlan run by real flanneld). With --profile: profiled
    /// in addition to kernel-vxlan and vxlan.
    #[arg(long, value_delimiter = ',')]
    variants: Option<Vec<String>>,
    /// The underlay(s): wire (MTU-sized frames between nodes, GRO at the
    /// nodes, as VMs and NICs have), container (plain veths passing 64 KB
    /// GSO frames, as kind, k3d and Docker-based nodes have), or both, in
    /// one interleaved schedule; or nic, a VM's virtio-net NICs joined by
    /// QEMU's hub (the wire-like underlay's real thing, with native XDP):
    /// `cargo xtask bench --underlay nic` boots a QEMU VM with NIC pairs and
    /// runs the bench in it, into docs/benchmarks/nic by default.
    #[arg(long, value_enum, default_value_t = UnderlayArg::Both)]
    underlay: UnderlayArg,
    /// The CPU every tool runs on (and whose time is accounted), or `all`
    /// for no pinning. Default: the last CPU. On one CPU a ping-pong is a
    /// context switch; across this VM's vCPUs it is a wake-up that took
    /// 35–260 µs instead of 13 µs, at random.
    #[arg(long, default_value = "last")]
    cpu: String,
    /// Directory for results.md, results.json and results.svg (default
    /// docs/benchmarks; with --quick, target/bench-quick; with --profile,
    /// docs/benchmarks/profiles). A full run of the default variants on
    /// both underlays into the default directory also rewrites the
    /// README's summary line.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Rewrite the summary between the bench-summary markers of this
    /// README (default: the workspace's, after a full default run).
    #[arg(long)]
    readme: Option<PathBuf>,
    /// Instead of the benchmark: profile the 1-stream TCP test (or the one
    /// --profile-test names) with
    /// `perf record -e cpu-clock -g` on the measuring CPU, for kernel-vxlan
    /// and vxlan plus --variants, on each --underlay; writes flame graphs,
    /// folded stacks and top-N kernel functions to --out.
    #[arg(long)]
    profile: bool,
    /// With --profile: the test to profile, tcp (the 1-stream TCP test,
    /// costs per Gbit) or udp64 (the 64-byte UDP packet-rate test, costs
    /// per packet; files `<underlay>-<variant>-udp64.*` and
    /// summary-udp64.md; --tcp-window applies to tcp only).
    #[arg(long, value_enum, default_value_t = profile::ProfiledTest::Tcp1, requires = "profile")]
    profile_test: profile::ProfiledTest,
    /// Measure nothing: re-render results.md and results.svg in --out from
    /// this results.json.
    #[arg(long)]
    render: Option<PathBuf>,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    // The guide every results page links to, and the run of record's home.
    let benchmarks = args.root.join("docs/benchmarks");
    let default_out = if args.profile {
        benchmarks.join("profiles")
    } else if args.quick {
        args.root.join("target/bench-quick")
    } else if args.underlay == UnderlayArg::Nic {
        benchmarks.join("nic")
    } else {
        benchmarks.clone()
    };
    let out = args.out.clone().unwrap_or(default_out);
    if let Some(json) = &args.render {
        let report = bench::read_report(json)?;
        bench::write_outputs(&report, &out, &benchmarks)?;
        if let Some(readme) = &args.readme {
            bench::update_readme(readme, &bench::summary_line(&report))?;
        }
        println!("bench: rendered {} into {}", json.display(), out.display());
        return Ok(());
    }
    let agent = args.agent.clone().ok_or("--agent is required (cargo xtask bench passes it)")?;
    let mut variants = Vec::new();
    let given = args.variants.clone();
    let keys: Vec<String> = match (&given, args.profile) {
        (_, true) => profile::DEFAULT_VARIANTS.iter().map(|v| v.key().to_owned()).chain(given.clone().unwrap_or_default()).collect(),
        (Some(keys), false) => keys.clone(),
        (None, false) => DEFAULT_VARIANTS.iter().map(|v| v.key().to_owned()).collect(),
    };
    for key in &keys {
        let variant = Variant::from_key(key).ok_or_else(|| {
            format!(
                "--variants: unknown variant `{key}`; choose from {}",
                Variant::ALL.map(Variant::key).join(", ")
            )
        })?;
        if !variants.contains(&variant) {
            variants.push(variant);
        }
    }
    if !variants.contains(&BASELINE) {
        eprintln!("bench: note: without {} in --variants the report has no ratios to it", BASELINE.key());
    }
    if let Some(window) = &args.tcp_window
        && !tcp_window_valid(window)
    {
        return Err(format!("--tcp-window {window}: not a size like 131072, 256K or 1M"));
    }
    let repeats = args.repeats.unwrap_or(if args.quick { 1 } else { 5 });
    let seconds = args.seconds.unwrap_or(if args.quick { 1 } else { 4 });
    if repeats == 0 || seconds == 0 {
        return Err("--repeats and --seconds must be at least 1".to_owned());
    }
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let cpu = match args.cpu.as_str() {
        "all" => None,
        "last" => Some(cpus - 1),
        n => match n.parse::<usize>() {
            Ok(n) if n < cpus => Some(n),
            _ => return Err(format!("--cpu {n}: not `all`, `last` or a CPU number below {cpus}")),
        },
    };
    // Ctrl-C also reaches the agents and the tools (same process group); we
    // notice, stop at the next step, and the labs' guards remove everything.
    let _ = ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst));
    let config = Config {
        agent,
        variants,
        underlays: args.underlay.underlays(),
        repeats,
        seconds,
        quick: args.quick,
        prefix: format!("{BENCH_PREFIX}{}", std::process::id() % 100_000),
        cpu,
        interrupted: &INTERRUPTED,
        command: command_line(),
        tcp_window: args.tcp_window.clone(),
    };
    if args.profile {
        let test = args.profile_test;
        eprintln!(
            "bench: profiling {} on {} underlay(s), {seconds} s of {} each",
            config.variants.iter().map(|v| v.key()).collect::<Vec<_>>().join(", "),
            config.underlays.len(),
            test.label()
        );
        let written = profile::run(&config, test, &out)?;
        println!("bench: wrote {written} profiles and {} to {}", profile::summary_name(test), out.display());
        return Ok(());
    }
    eprintln!(
        "bench: {} variants × {} underlay(s) × {repeats} rounds × 5 tests × {seconds} s ({}; {})",
        config.variants.len(),
        config.underlays.len(),
        config.variants.iter().map(|v| v.key()).collect::<Vec<_>>().join(", "),
        config.underlays.iter().map(|u| u.key()).collect::<Vec<_>>().join(", ")
    );
    let report = bench::run(&config)?;
    bench::write_outputs(&report, &out, &benchmarks)?;
    println!("{}", bench::render_markdown(&report, "docs/benchmarks/README.md"));
    println!("bench: wrote results.md, results.json and results.svg to {}", out.display());
    // The README quotes the project's reference run only.
    let reference_run =
        args.out.is_none() && !args.quick && given.is_none() && args.underlay == UnderlayArg::Both && args.tcp_window.is_none();
    let readme = args.readme.clone().or_else(|| reference_run.then(|| args.root.join("README.md")));
    if let Some(readme) = &readme {
        bench::update_readme(readme, &bench::summary_line(&report))?;
        println!("bench: updated the summary in {}", readme.display());
    }
    let problems = bench::problems(&report);
    if !problems.is_empty() {
        return Err(format!("the run is incomplete:\n  {}", problems.join("\n  ")));
    }
    Ok(())
}

/// Whether `window` is a size iperf3's `-w` takes: digits, then K, M or G
/// at most.
fn tcp_window_valid(window: &str) -> bool {
    let digits = window.trim_end_matches(['K', 'M', 'G', 'k', 'm', 'g']);
    window.len() - digits.len() <= 1 && !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) && digits != "0"
}

/// The command line for the report, without the paths xtask adds.
fn command_line() -> String {
    let mut words = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--agent" || arg == "--root" {
            args.next();
        } else if !arg.starts_with("--agent=") && !arg.starts_with("--root=") {
            words.push(arg);
        }
    }
    words.join(" ")
}

#[cfg(test)]
mod tests {
    use super::tcp_window_valid;

    #[test]
    fn tcp_window_takes_iperf3_sizes_only() {
        for ok in ["131072", "256K", "1M", "2g"] {
            assert!(tcp_window_valid(ok), "{ok}");
        }
        for bad in ["", "K", "0", "256KK", "-1", "1.5M", "256 K", "256KB"] {
            assert!(!tcp_window_valid(bad), "{bad}");
        }
    }
}
