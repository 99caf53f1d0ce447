//! `cargo xtask scale`: how the agent copes with a large cluster.
//!
//! One agent in a throwaway namespace watches the test API server holding
//! N Nodes (default 5,000). Measured: time from the agent's start until all
//! N are in its ROUTES map (and routed), time from a Node update in the API
//! server to the changed map entry, and the agent's resident memory. A
//! benchmark, not a test: it reports, it does not assert.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use aya::maps::{LpmTrie, Map, MapData, lpm_trie::Key};
use overlay_common::Route;
use clap::Parser;
use overlay_tests::{NetNs, PinDir, apiserver::ApiServer, lab::ChildGuard};
use serde_json::{Value, json};

#[derive(Parser)]
struct Args {
    /// The overlay-agent binary (`cargo xtask scale` passes the release build).
    #[arg(long)]
    agent: PathBuf,
    /// Nodes in the cluster.
    #[arg(long, default_value_t = 5000)]
    nodes: u32,
    /// Single-node updates to time (enough for a p99: 200 puts two
    /// samples above it).
    #[arg(long, default_value_t = 200)]
    updates: u32,
    /// Write the report (markdown) here as well as to stdout.
    #[arg(long)]
    out: Option<PathBuf>,
    /// How the benchmark waits for an update to reach the map: 0 polls
    /// without pause (one CPU busy the whole time, taken from the agent
    /// and the API server on a small machine), N sleeps N µs between
    /// looks (the figure then carries up to that much more).
    #[arg(long, default_value_t = 0)]
    poll_pause_us: u64,
    /// Keep the agent's log (its "reconciled" lines time each stage of
    /// each update) here, to find where the slowest updates went.
    #[arg(long)]
    agent_log: Option<PathBuf>,
}

/// Peer `k` (1-based): pod CIDR 10.(k/256).(k%256).0/24, address on the
/// node's /16 so every peer is on-link.
fn peer(k: u32, ip: Ipv4Addr) -> Value {
    let cidr = format!("10.{}.{}.0/24", k / 256, k % 256);
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": format!("node{k}"),
            "annotations": {
                "flannel.alpha.coreos.com/backend-type": "vxlan",
                "flannel.alpha.coreos.com/backend-data": format!("{{\"VNI\":1,\"VtepMAC\":\"0e:00:{:02x}:{:02x}:00:01\"}}", k / 256, k % 256),
                "flannel.alpha.coreos.com/public-ip": ip.to_string(),
                "flannel.alpha.coreos.com/kube-subnet-manager": "true",
            },
        },
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
        "status": {
            "addresses": [{"type": "InternalIP", "address": ip.to_string()}],
            "conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": "2026-11-22T00:00:00Z"}],
        },
    })
}

/// Peer `k`'s address in its `generation` (0 at the start, then one per
/// update of it): 172.16.0.0/12 holds the node and every peer, on-link,
/// 16 generations of up to 65,534 peers.
fn peer_ip(k: u32, generation: u32) -> Ipv4Addr {
    assert!(k < 0xffff, "at most 65,534 peers");
    Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 0)) + ((generation % 16) << 16) + k + 1)
}

fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// How long the agent's threads have waited, runnable, for a CPU, summed
/// (`/proc/PID/task/*/schedstat`, its second field, in ns): what a busy
/// machine adds to an update, as opposed to work the agent does.
fn runqueue_wait(pid: u32) -> Duration {
    runqueue_wait_but(pid, None)
}

/// [`runqueue_wait`] of `pid`'s threads but `except` (a thread id).
fn runqueue_wait_but(pid: u32, except: Option<u32>) -> Duration {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|task| except.is_none_or(|tid| task.file_name().to_str() != Some(&tid.to_string())));
    let ns: u64 = tasks
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(ns)
}

fn main() {
    let args = Args::parse();
    // The machine is shared: the load says what else ran.
    let load_average = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    let load_at_start = load_average();
    let ns = NetNs::new();
    ns.veth_pair("eth0", "peer0");
    let _ = ns.ip(&["addr", "add", "172.16.0.1/12", "dev", "eth0"]);
    let pins = PinDir::new();
    let work_dir = overlay_tests::TempDir::new("ovscale");
    let work = work_dir.path().to_owned();

    let api = ApiServer::start(Some(&ns), SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    api.write_kubeconfig(&work.join("kubeconfig")).expect("kubeconfig");
    std::fs::write(work.join("net-conf.json"), r#"{"Network": "10.0.0.0/8", "Backend": {"Type": "vxlan"}}"#).unwrap();
    let mut me = peer(0, Ipv4Addr::new(172, 16, 0, 1));
    me["metadata"]["name"] = "me".into();
    api.apply(me);
    let built = Instant::now();
    for k in 1..=args.nodes {
        api.apply(peer(k, peer_ip(k, 0)));
    }
    eprintln!("scale: {} Nodes in the API server ({:.1} s to create)", args.nodes, built.elapsed().as_secs_f64());

    let log = work.join("agent.log");
    let started = Instant::now();
    let agent: Child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.name()))
        .arg(&args.agent)
        .args(["run", "--node-name", "me", "--iface", "eth0", "--metrics-addr", "127.0.0.1:9472"])
        .arg("--kubeconfig")
        .arg(work.join("kubeconfig"))
        .arg("--net-conf")
        .arg(work.join("net-conf.json"))
        .arg("--subnet-file")
        .arg(work.join("subnet.env"))
        .arg("--bpffs-root")
        .arg(pins.path())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("starting the agent");
    let pid = agent.id();
    let _agent = ChildGuard(agent);

    // Until the ROUTES map holds every peer.
    let deadline = Instant::now() + Duration::from_secs(120);
    let (maps_dir, routes_map) = loop {
        if let Some(found) = open_routes(pins.path()) {
            break found;
        }
        assert!(Instant::now() < deadline, "the agent never created its maps:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(5));
    };
    let all_in_maps = loop {
        let count = routes_map.keys().count();
        if count >= args.nodes as usize {
            break started.elapsed();
        }
        assert!(Instant::now() < deadline, "only {count} of {} peers in ROUTES after 120 s:\n{}", args.nodes, std::fs::read_to_string(&log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(2));
    };
    let routes = loop {
        let out = ns.ip(&["route", "show", "proto", "157"]);
        let count = String::from_utf8_lossy(&out.stdout).lines().count();
        if count >= args.nodes as usize {
            break started.elapsed();
        }
        assert!(Instant::now() < deadline, "only {count} kernel routes after 120 s");
        std::thread::sleep(Duration::from_millis(20));
    };
    let agent_log = std::fs::read_to_string(&log).unwrap_or_default();
    let reconcile_us: Option<u64> = agent_log
        .lines()
        .find(|l| l.contains("reconciled") && l.contains(&format!("upserted={}", args.nodes)))
        .and_then(|l| l.split("elapsed_us=").nth(1)?.split_whitespace().next()?.parse().ok());
    let (rss_synced, _) = rss_kib(pid);

    // One Node update at a time: a new address for node k, timed until
    // its ROUTES entry carries it.
    let mut latencies = Vec::new();
    // (latency, when written, node, the agent's and the API server's CPU
    // waits): to find the slowest in the agent's log, and why.
    let mut slowest = Vec::new();
    for u in 0..args.updates {
        let k = 1 + (u * 97) % args.nodes;
        let mut node = api.get(&format!("node{k}")).expect("node");
        let old_ip = node["status"]["addresses"][0]["address"].as_str().and_then(|a| a.parse::<Ipv4Addr>().ok()).expect("node address");
        // The next generation: another address on the same /12.
        let new_ip = peer_ip(k, ((u32::from(old_ip) - u32::from(Ipv4Addr::new(172, 16, 0, 0))) >> 16) + 1);
        node["metadata"]["annotations"]["flannel.alpha.coreos.com/public-ip"] = new_ip.to_string().into();
        node["status"]["addresses"][0]["address"] = new_ip.to_string().into();
        let key = Key::new(24, [10, (k / 256) as u8, (k % 256) as u8, 0]);
        let waited_before = runqueue_wait(pid);
        // This process's other threads: the API server's.
        let me = std::process::id();
        let api_waited_before = runqueue_wait_but(me, Some(me));
        let t0 = Instant::now();
        let written_at = std::time::SystemTime::now();
        api.apply(node);
        loop {
            if routes_map.get(&key, 0).is_ok_and(|r| Ipv4Addr::from(r.node_ip) == new_ip) {
                latencies.push(t0.elapsed());
                let api_waited = runqueue_wait_but(me, Some(me)).saturating_sub(api_waited_before);
                slowest.push((t0.elapsed(), written_at, k, runqueue_wait(pid).saturating_sub(waited_before), api_waited));
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "update of node{k} never reached the map");
            if args.poll_pause_us == 0 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(args.poll_pause_us));
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    latencies.sort();
    slowest.sort_by_key(|s| std::cmp::Reverse(s.0));
    for (latency, at, k, waited, api_waited) in slowest.iter().take(5) {
        let at = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        eprintln!(
            "scale: slow update: node{k} written at {}.{:06} (Unix time) took {:.2} ms; meanwhile the agent's threads waited for a CPU {:.2} ms, the API server's {:.2} ms",
            at.as_secs(),
            at.subsec_micros(),
            latency.as_secs_f64() * 1e3,
            waited.as_secs_f64() * 1e3,
            api_waited.as_secs_f64() * 1e3
        );
    }
    // How long the agent's and the API server's threads waited for a CPU
    // during each update: what a busy machine adds.
    let spread = |mut waits: Vec<Duration>| {
        waits.sort();
        match waits.last() {
            Some(max) => format!(
                "{:.2} ms, {:.2} / {:.2} ms",
                waits[waits.len() / 2].as_secs_f64() * 1e3,
                waits[((waits.len() - 1) as f64 * 0.99).round() as usize].as_secs_f64() * 1e3,
                max.as_secs_f64() * 1e3
            ),
            None => "-".to_owned(),
        }
    };
    let cpu_wait = spread(slowest.iter().map(|s| s.3).collect());
    let api_cpu_wait = spread(slowest.iter().map(|s| s.4).collect());
    // The agent's own account of each update: event in hand → applied.
    let agent_log = std::fs::read_to_string(&log).unwrap_or_default();
    let update_lines: Vec<&str> = agent_log.lines().filter(|l| l.contains("reconciled") && l.contains("upserted=1 ")).collect();
    // The median of one `<field>=` (µs) of the agent's "reconciled" lines, in ms.
    let median_ms = |field: &str| {
        let mut us: Vec<u64> = update_lines
            .iter()
            .filter_map(|l| l.split(&format!(" {field}=")).nth(1)?.split_whitespace().next()?.parse().ok())
            .collect();
        us.sort_unstable();
        us.get(us.len() / 2).map_or("-".to_owned(), |us| format!("{:.2}", *us as f64 / 1e3))
    };
    let agent_median = median_ms("elapsed_us");
    let stages = ["source_us", "checks_us", "maps_us", "routes_us"].map(median_ms).join(" / ");
    // The 99th percentile of each stage, in ms: where the agent's tail is.
    let p99_ms = |field: &str| {
        let mut us: Vec<u64> = update_lines
            .iter()
            .filter_map(|l| l.split(&format!(" {field}=")).nth(1)?.split_whitespace().next()?.parse().ok())
            .collect();
        us.sort_unstable();
        if us.is_empty() {
            return "-".to_owned();
        }
        format!("{:.2}", us[((us.len() - 1) as f64 * 0.99).round() as usize] as f64 / 1e3)
    };
    let stages_p99 = ["source_us", "checks_us", "maps_us", "routes_us"].map(p99_ms).join(" / ");
    // The agent's own p99 and maximum (event in hand → applied), in ms.
    let mut agent_us: Vec<u64> = update_lines
        .iter()
        .filter_map(|l| l.split(" elapsed_us=").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect();
    agent_us.sort_unstable();
    let agent_tail = match agent_us.last() {
        Some(max) => format!("{:.2} / {:.2}", agent_us[((agent_us.len() - 1) as f64 * 0.99).round() as usize] as f64 / 1e3, *max as f64 / 1e3),
        None => "-".to_owned(),
    };
    let pick = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    let (rss_end, hwm) = rss_kib(pid);
    // The kernel memory of the maps that grow with the cluster, as bpftool
    // reports it (memlock).
    let memlock = |name: &str| {
        let pin = maps_dir.join(name);
        let out = Command::new("bpftool").args(["map", "show", "pinned"]).arg(&pin).output();
        let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
        let field = |key: &str| text.split_whitespace().skip_while(|w| *w != key).nth(1).map(str::to_owned);
        let bytes: Option<f64> = field("memlock").and_then(|b| b.trim_end_matches('B').parse().ok());
        format!(
            "{name} ({} of {} entries): {}",
            args.nodes,
            field("max_entries").unwrap_or_else(|| "?".into()),
            bytes.map_or("?".to_owned(), |b| format!("{:.2} MiB", b / 1048576.0)),
        )
    };
    let waiting = match args.poll_pause_us {
        0 => "polling the map without pause (--poll-pause-us 0)".to_owned(),
        us => format!("polling the map every {us} µs (--poll-pause-us {us})"),
    };
    let map_memory = [overlay_common::map_names::PEERS, overlay_common::map_names::ROUTES].map(memlock).join("; ");

    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let report = format!(
        "# Agent scale\n\n\
         `cargo xtask scale` (tests/src/bin/overlay-scale.rs): one agent (release build) watching the test API server \
         (`tests/src/apiserver.rs`, real kube client and watcher in the agent) that holds {nodes} Nodes, all on-link VXLAN peers. \
         Kernel {kernel}, {cpus} CPUs, shared machine: load average {load_at_start} at the start, {load_at_end} at the end. \
         Waiting for each update: {waiting}.\n\n\
         | measure | result | target |\n|---|---|---|\n\
         | agent start → all {nodes} peers in the ROUTES map | {all:.2} s | |\n\
         | agent start → all {nodes} kernel routes installed | {routes:.2} s | < 2 s (20,000 nodes) |\n\
         | the agent's own reconcile of the initial list (desired, diff, maps, kernel routes) | {reconcile} | |\n\
         | one Node update → its ROUTES entry, median of {updates} | {p50:.2} ms | < 10 ms |\n\
         | one Node update → its ROUTES entry, p99 / max | {p99:.2} / {max:.2} ms | p99 ≤ 5 ms (5,000 nodes) |\n\
         | of which inside the agent (watch event in hand → maps and route applied), median | {agent_median} ms | |\n\
         | inside the agent, p99 / max | {agent_tail} ms | |\n\
         | the agent's threads waiting for a CPU during one update (schedstat), median, p99 / max | {cpu_wait} | |\n\
         | the API server's threads (in the benchmark) waiting for a CPU during one update, median, p99 / max | {api_cpu_wait} | |\n\
         | inside the agent by stage, medians: event, paths and desired state / checks / maps / kernel route | {stages} ms | |\n\
         | inside the agent by stage, p99 of each | {stages_p99} ms | |\n\
         | agent RSS after the initial sync / after the updates / peak | {rss_synced:.1} / {rss_end:.1} / {hwm:.1} MiB | < 64 MiB (20,000 nodes) |\n\
         | kernel memory of the maps (bpftool memlock) | {map_memory} | |\n\n\
         The start time includes loading and verifying the eBPF programs and the paged list (500 per page).\n",
        nodes = args.nodes,
        kernel = kernel.trim(),
        load_at_end = load_average(),
        all = all_in_maps.as_secs_f64(),
        routes = routes.as_secs_f64(),
        reconcile = reconcile_us.map_or("-".to_owned(), |us| format!("{:.2} s", us as f64 / 1e6)),
        updates = latencies.len(),
        p50 = pick(0.5).as_secs_f64() * 1e3,
        p99 = pick(0.99).as_secs_f64() * 1e3,
        max = latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        rss_synced = rss_synced as f64 / 1024.0,
        rss_end = rss_end as f64 / 1024.0,
        hwm = hwm as f64 / 1024.0,
    );
    println!("{report}");
    if let Some(keep) = &args.agent_log {
        std::fs::copy(&log, keep).expect("copying the agent's log");
        eprintln!("scale: the agent's log is in {}", keep.display());
    }
    if let Some(out) = &args.out {
        std::fs::write(out, &report).expect("writing the report");
        eprintln!("scale: wrote {}", out.display());
    }
}

type RoutesMap = LpmTrie<MapData, [u8; 4], Route>;

/// The `ROUTES` map the agent pinned under `root`, and its directory:
/// whichever map layout version the agent uses (`<root>/v<N>/`), so the
/// benchmark also drives an agent of an earlier layout (a baseline). The
/// `ROUTES` entry has kept its shape across versions.
fn open_routes(root: &std::path::Path) -> Option<(PathBuf, RoutesMap)> {
    let dir = std::fs::read_dir(root)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('v') && n[1..].parse::<u32>().is_ok()))?;
    let data = MapData::from_pin(dir.join(overlay_common::map_names::ROUTES)).ok()?;
    let routes = LpmTrie::try_from(Map::from_map_data(data).ok()?).ok()?;
    Some((dir, routes))
}
