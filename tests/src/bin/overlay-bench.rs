//! The benchmark behind `cargo xtask bench`: every variant side by side in
//! the lab, measured interleaved, written as markdown, JSON and SVG.

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
};

use clap::Parser;
use overlay_tests::bench::{self, BASELINE, Config, DEFAULT_VARIANTS, Variant};

/// Prefix of every namespace and pin directory a run creates; distinct from
/// the lab's, so `cargo xtask lab -- --down` never touches a running bench.
const BENCH_PREFIX: &str = "ovbench";

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

#[derive(Parser)]
#[command(about = "overlay's benchmark: kernel vxlan, host-gw and our datapath side by side, interleaved")]
struct Args {
    /// The overlay-agent binary to run on our nodes.
    #[arg(long)]
    agent: Option<PathBuf>,
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
    /// Comma-separated variants: raw, kernel-host-gw, kernel-vxlan, vxlan,
    /// host-gw, and for design comparisons vxlan-tc, vxlan-xdp-generic,
    /// host-gw-xdp.
    #[arg(long, value_delimiter = ',', default_values_t = DEFAULT_VARIANTS.map(|v| v.key().to_owned()))]
    variants: Vec<String>,
    /// The CPU every tool runs on (and whose time is accounted), or `all`
    /// for no pinning. Default: the last CPU. On one CPU a ping-pong is a
    /// context switch; across this VM's vCPUs it is a wake-up that took
    /// 35–260 µs instead of 13 µs, at random.
    #[arg(long, default_value = "last")]
    cpu: String,
    /// Directory for results.md, results.json and results.svg.
    #[arg(long, default_value = "docs/benchmarks")]
    out: PathBuf,
    /// Also rewrite the summary between the bench-summary markers of this
    /// README.
    #[arg(long)]
    readme: Option<PathBuf>,
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
    if let Some(json) = &args.render {
        let report = bench::read_report(json)?;
        bench::write_outputs(&report, &args.out)?;
        if let Some(readme) = &args.readme {
            bench::update_readme(readme, &bench::summary_line(&report))?;
        }
        println!("bench: rendered {} into {}", json.display(), args.out.display());
        return Ok(());
    }
    let agent = args.agent.ok_or("--agent is required (cargo xtask bench passes it)")?;
    let mut variants = Vec::new();
    for key in &args.variants {
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
        repeats,
        seconds,
        quick: args.quick,
        prefix: format!("{BENCH_PREFIX}{}", std::process::id() % 100_000),
        cpu,
        interrupted: &INTERRUPTED,
        command: std::env::args().skip(1).filter(|a| !a.starts_with('/')).collect::<Vec<_>>().join(" "),
    };
    eprintln!(
        "bench: {} variants × {repeats} rounds × 5 tests × {seconds} s ({})",
        config.variants.len(),
        config.variants.iter().map(|v| v.key()).collect::<Vec<_>>().join(", ")
    );
    let report = bench::run(&config)?;
    bench::write_outputs(&report, &args.out)?;
    println!("{}", bench::render_markdown(&report));
    println!("bench: wrote results.md, results.json and results.svg to {}", args.out.display());
    if let Some(readme) = &args.readme {
        bench::update_readme(readme, &bench::summary_line(&report))?;
        println!("bench: updated the summary in {}", readme.display());
    }
    let problems = bench::problems(&report);
    if !problems.is_empty() {
        return Err(format!("the run is incomplete:\n  {}", problems.join("\n  ")));
    }
    Ok(())
}
