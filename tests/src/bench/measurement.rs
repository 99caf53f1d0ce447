//! Running the tools and reading the machine: iperf3 and sockperf between
//! a variant's two ends (pinned and niced), the CPU time `/proc/stat`
//! accounts around each client, and what the report says about the
//! machine.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::{Config, Meta, Metric, Record, Variant, check_interrupted};
use crate::{
    IpCounters,
    lab::{ChildGuard, Underlay},
};

/// One program run that yields one or more metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Test {
    Tcp1,
    Tcp4,
    UdpPingPong,
    TcpPingPong,
    Udp64,
}

impl Test {
    pub(super) const ALL: [Self; 5] = [Self::Tcp1, Self::Tcp4, Self::UdpPingPong, Self::TcpPingPong, Self::Udp64];

    pub(super) fn key(self) -> &'static str {
        match self {
            Self::Tcp1 => "tcp1",
            Self::Tcp4 => "tcp4",
            Self::UdpPingPong => "udp-pp",
            Self::TcpPingPong => "tcp-pp",
            Self::Udp64 => "udp64",
        }
    }
}

/// CPU time spent, from /proc/stat: one CPU's line, or the summary line of
/// all CPUs (seconds summed over them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuTimes {
    pub user: f64,
    pub system: f64,
    pub softirq: f64,
    pub irq: f64,
}

impl CpuTimes {
    pub fn now(cpu: Option<usize>) -> Result<Self, String> {
        let text = std::fs::read_to_string("/proc/stat").map_err(|e| format!("reading /proc/stat: {e}"))?;
        let name = cpu.map_or_else(|| "cpu".to_owned(), |n| format!("cpu{n}"));
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name.as_str()))
            .ok_or_else(|| format!("/proc/stat has no `{name}` line"))?;
        let fields: Vec<f64> = line.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
        if fields.len() < 7 {
            return Err(format!("/proc/stat: `{name}` has too few fields: {line:?}"));
        }
        let hz = clock_ticks_per_second();
        Ok(Self {
            user: (fields[0] + fields[1]) / hz,
            system: fields[2] / hz,
            irq: fields[5] / hz,
            softirq: fields[6] / hz,
        })
    }

    pub(super) fn since(self, earlier: Self) -> Self {
        Self {
            user: self.user - earlier.user,
            system: self.system - earlier.system,
            softirq: self.softirq - earlier.softirq,
            irq: self.irq - earlier.irq,
        }
    }

    /// The kernel's share: what the packets cost.
    pub fn kernel(&self) -> f64 {
        self.system + self.softirq + self.irq
    }
}

/// Clock ticks of kernel time (`stime`, field 15) in a `/proc/<pid>/stat`
/// line; the command name (field 2) may hold spaces and parentheses.
fn kernel_ticks_of(stat: &str) -> Option<u64> {
    // After "pid (comm) ", field 3 (state) is the first; stime is the 13th.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(12)?.parse().ok()
}

/// Seconds of kernel time process `pid` has spent so far.
fn kernel_seconds_of(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(kernel_ticks_of(&stat)? as f64 / clock_ticks_per_second())
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// The pid of `ksoftirqd/<cpu>`, the thread that takes the CPU's softirq
/// work over once the kernel defers it.
fn ksoftirqd_of(cpu: usize) -> Option<u32> {
    let name = format!("ksoftirqd/{cpu}");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
        (comm.trim_end() == name).then_some(pid)
    })
}

/// Kernel seconds of the children this process has reaped so far.
fn reaped_children_kernel_seconds() -> f64 {
    // SAFETY: getrusage writes one rusage into the zeroed struct given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    usage.ru_stime.tv_sec as f64 + usage.ru_stime.tv_usec as f64 / 1e6
}

/// How a test's kernel time on the pinned CPU split between the receiving
/// tool, the sending one and that CPU's `ksoftirqd` (shares of their sum).
/// With tick-based accounting, softirq work counts to the task it ran
/// inside: this says whether the path ran inside the receiver's `read` or
/// split (docs/benchmarks/profiles/2026-12-05-path-context).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct PathShares {
    pub(super) receiver: f64,
    pub(super) sender: f64,
    pub(super) ksoftirqd: f64,
}

impl PathShares {
    /// The shares of three processes' kernel seconds, when they account
    /// for at least [`Self::COVERAGE`] of `cpu_kernel`, the kernel time
    /// the pinned CPU spent meanwhile. A kernel with
    /// `CONFIG_IRQ_TIME_ACCOUNTING` charges softirq work to no task, and
    /// the three then hold too little of it to say where the path ran.
    fn of(receiver: f64, sender: f64, ksoftirqd: f64, cpu_kernel: f64) -> Option<Self> {
        let total = receiver + sender + ksoftirqd;
        (total > 0.0 && total >= Self::COVERAGE * cpu_kernel)
            .then(|| Self { receiver: receiver / total, sender: sender / total, ksoftirqd: ksoftirqd / total })
    }

    const COVERAGE: f64 = 0.8;
}

/// The two ends of a measurement.
pub(super) struct Endpoints {
    pub(super) client: String,
    pub(super) server: String,
    pub(super) server_ip: Ipv4Addr,
    /// The CPU both ends run on, if pinned.
    pub(super) cpu: Option<usize>,
}

/// A flake (a server slow to listen on a loaded machine) should not cost a
/// long run; a real failure shows twice and stops it.
pub(super) fn measure_with_retry(
    test: Test,
    underlay: Underlay,
    variant: Variant,
    ends: &Endpoints,
    round: usize,
    config: &Config,
) -> Result<Record, String> {
    match measure(test, underlay, variant, ends, round, config) {
        Ok(record) => Ok(record),
        Err(first) => {
            check_interrupted(config)?;
            eprintln!("bench: {} {} ({}) failed, retrying once: {first}", test.key(), variant.key(), underlay.key());
            std::thread::sleep(Duration::from_secs(1));
            measure(test, underlay, variant, ends, round, config)
                .map_err(|e| format!("{} on {} ({} underlay) failed twice: {e}", test.key(), variant.key(), underlay.key()))
        }
    }
}

fn measure(test: Test, underlay: Underlay, variant: Variant, ends: &Endpoints, round: usize, config: &Config) -> Result<Record, String> {
    let seconds = config.seconds;
    let mut values = BTreeMap::new();
    let mut extra = BTreeMap::new();
    let (cpu, wall) = match test {
        Test::Tcp1 | Test::Tcp4 => {
            let streams = if test == Test::Tcp1 { "1" } else { "4" };
            let client_before = IpCounters::read(&ends.client)?;
            let server_before = IpCounters::read(&ends.server)?;
            let mut args = vec!["-P", streams];
            if let Some(window) = &config.tcp_window {
                args.extend(["-w", window.as_str()]);
            }
            let Iperf3Run { json, cpu, wall, shares } = iperf3(ends, &args, seconds, Shares::Record)?;
            let sent = IpCounters::read(&ends.client)?.since(client_before);
            let got = IpCounters::read(&ends.server)?.since(server_before);
            let received = &json["end"]["sum_received"];
            let bits = received["bytes"].as_f64().ok_or("iperf3: no end.sum_received.bytes")? * 8.0;
            let gbps = received["bits_per_second"].as_f64().ok_or("iperf3: no end.sum_received.bits_per_second")? / 1e9;
            let key = if test == Test::Tcp1 { Metric::Tcp1 } else { Metric::Tcp4 };
            values.insert(key.key().to_owned(), gbps);
            if test == Test::Tcp1 {
                values.insert(Metric::CpuPerGbit.key().to_owned(), cpu.kernel() * 1e3 / (bits / 1e9));
            }
            extra.insert("retransmits".to_owned(), json["end"]["sum_sent"]["retransmits"].as_f64().unwrap_or(0.0));
            // How many bytes each trip through the path carried: the CPU
            // per Gbit is mostly a cost per packet over this size.
            extra.insert("sender_bytes_per_ip_packet".to_owned(), sent.out_octets / sent.out_requests.max(1.0));
            extra.insert("receiver_bytes_per_ip_packet".to_owned(), got.in_octets / got.in_receives.max(1.0));
            extra.insert("receiver_packets_back_per_mb".to_owned(), got.out_requests / (got.in_octets / 1e6).max(1e-6));
            if let Some(shares) = shares {
                extra.insert("receiver_share_of_kernel_time".to_owned(), shares.receiver);
                extra.insert("sender_share_of_kernel_time".to_owned(), shares.sender);
                extra.insert("ksoftirqd_share_of_kernel_time".to_owned(), shares.ksoftirqd);
            }
            (cpu, wall)
        }
        Test::Udp64 => {
            let Iperf3Run { json, cpu, wall, .. } = iperf3(ends, &["-u", "-l", "64", "-b", "0"], seconds, Shares::Skip)?;
            let sum = &json["end"]["sum"];
            let sent = sum["packets"].as_f64().ok_or("iperf3 -u: no end.sum.packets")?;
            let lost = sum["lost_packets"].as_f64().ok_or("iperf3 -u: no end.sum.lost_packets")?;
            let secs = sum["seconds"].as_f64().filter(|s| *s > 0.0).ok_or("iperf3 -u: no end.sum.seconds")?;
            let received = sent - lost;
            values.insert(Metric::Udp64Rate.key().to_owned(), received / secs / 1e3);
            values.insert(Metric::CpuPerPacket.key().to_owned(), cpu.kernel() * 1e6 / received);
            extra.insert("sent_packets".to_owned(), sent);
            extra.insert("lost_packets".to_owned(), lost);
            (cpu, wall)
        }
        Test::UdpPingPong | Test::TcpPingPong => {
            let tcp = test == Test::TcpPingPong;
            let (p50, p99, observations, cpu, wall) = sockperf_ping_pong(ends, tcp, seconds)?;
            let (k50, k99) = if tcp { (Metric::TcpRttP50, Metric::TcpRttP99) } else { (Metric::UdpRttP50, Metric::UdpRttP99) };
            values.insert(k50.key().to_owned(), p50);
            values.insert(k99.key().to_owned(), p99);
            extra.insert("observations".to_owned(), observations);
            (cpu, wall)
        }
    };
    if let Some((key, value)) = values.iter().find(|(_, v)| !(v.is_finite() && **v > 0.0)) {
        return Err(format!("{key} came out as {value}: no traffic moved"));
    }
    Ok(Record {
        round,
        underlay: underlay.key().to_owned(),
        variant: variant.key().to_owned(),
        test: test.key().to_owned(),
        values,
        extra,
        cpu,
        wall,
    })
}

/// `nsenter --net=/run/netns/<ns> <program>`.
fn in_ns(ns: &str, program: &str) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{ns}")).arg(program);
    cmd
}

/// The nice level of the measuring tools: the machines are shared with
/// compilers, and ahead of them the packets' own cost shows.
pub const TOOL_NICE: &str = "-10";

/// A measuring tool in `ns`, at [`TOOL_NICE`], on the pinned CPU if any.
pub(super) fn tool(ns: &str, program: &str, cpu: Option<usize>) -> Command {
    let mut cmd = in_ns(ns, "nice");
    cmd.args(["-n", TOOL_NICE]);
    if let Some(cpu) = cpu {
        cmd.args(["taskset", "-c", &cpu.to_string()]);
    }
    cmd.arg(program);
    cmd
}

pub(super) fn ping(ns: &str, to: Ipv4Addr) -> bool {
    in_ns(ns, "ping")
        .args(["-c", "3", "-i", "0.2", "-W", "2", "-q", &to.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Starts a server in `ns` and waits until it listens on `port` (a fixed
/// sleep is either slow or, on a loaded machine, too short).
pub(super) fn server(ns: &str, program: &str, args: &[&str], port: u16, tcp: bool, cpu: Option<usize>) -> Result<ChildGuard, String> {
    let child = tool(ns, program, cpu)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting {program}: {e}"))?;
    let guard = ChildGuard(child);
    let deadline = Instant::now() + Duration::from_secs(5);
    let filter = format!("sport = :{port}");
    loop {
        let out = in_ns(ns, "ss")
            .args([if tcp { "-Hltn" } else { "-Hlun" }, &filter])
            .output()
            .map_err(|e| format!("running ss: {e}"))?;
        if !out.stdout.is_empty() {
            return Ok(guard);
        }
        if Instant::now() > deadline {
            return Err(format!("{program} in {ns} is not listening on port {port} after 5 s"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a client, sampling the CPU (the pinned one, or all) right around it.
fn timed_client(mut cmd: Command, cpu: Option<usize>) -> Result<(Output, CpuTimes, f64), String> {
    let before = CpuTimes::now(cpu)?;
    let started = Instant::now();
    let out = cmd.output().map_err(|e| format!("running {cmd:?}: {e}"))?;
    let wall = started.elapsed().as_secs_f64();
    let cpu = CpuTimes::now(cpu)?.since(before);
    Ok((out, cpu, wall))
}

pub(super) const IPERF3_PORT: u16 = 5201;
const SOCKPERF_PORT: u16 = 11111;

/// What an iperf3 run gives: its JSON, the CPU time around the client, the
/// wall time, and (asked for, pinned, where every process could be read)
/// how the kernel time split between the ends.
struct Iperf3Run {
    json: serde_json::Value,
    cpu: CpuTimes,
    wall: f64,
    shares: Option<PathShares>,
}

/// Whether an iperf3 run reads where its kernel time went ([`PathShares`]):
/// only the 1-stream TCP test's are recorded, and finding `ksoftirqd`
/// scans `/proc`.
#[derive(Clone, Copy, PartialEq)]
enum Shares {
    Record,
    Skip,
}

fn iperf3(ends: &Endpoints, args: &[&str], seconds: u32, wanted: Shares) -> Result<Iperf3Run, String> {
    let ip = ends.server_ip.to_string();
    let server = server(&ends.server, "iperf3", &["-s", "-1", "-B", &ip], IPERF3_PORT, true, ends.cpu)?;
    // nsenter, nice and taskset each exec the next: the child is iperf3.
    let server_pid = server.0.id();
    let softirq_pid = ends.cpu.filter(|_| wanted == Shares::Record).and_then(ksoftirqd_of);
    let kernel_seconds = || {
        let softirq = kernel_seconds_of(softirq_pid?)?;
        Some((kernel_seconds_of(server_pid)?, softirq, reaped_children_kernel_seconds()))
    };
    let before = kernel_seconds();
    let mut cmd = tool(&ends.client, "iperf3", ends.cpu);
    cmd.args(["-c", &ip, "-t", &seconds.to_string(), "-J", "--connect-timeout", "3000"]).args(args);
    let (out, cpu, wall) = timed_client(cmd, ends.cpu)?;
    // The server exits once the test is over, but stays readable until its
    // guard reaps it.
    let after = kernel_seconds();
    let shares = before.zip(after).and_then(|((server0, softirq0, client0), (server1, softirq1, client1))| {
        PathShares::of(server1 - server0, client1 - client0, softirq1 - softirq0, cpu.kernel())
    });
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("iperf3 printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stderr)))?;
    if let Some(error) = json["error"].as_str() {
        return Err(format!("iperf3: {error}"));
    }
    Ok(Iperf3Run { json, cpu, wall, shares })
}

/// sockperf ping-pong; returns the round trip's median and p99 in µs and
/// the number of observations.
fn sockperf_ping_pong(ends: &Endpoints, tcp: bool, seconds: u32) -> Result<(f64, f64, f64, CpuTimes, f64), String> {
    let ip = ends.server_ip.to_string();
    let port = SOCKPERF_PORT.to_string();
    let mut server_args = vec!["sr", "-i", &ip, "-p", &port];
    let mut client_args = vec!["pp", "-i", &ip, "-p", &port, "-m", "64", "--full-rtt", "-t"];
    let secs = seconds.to_string();
    client_args.push(&secs);
    if tcp {
        server_args.push("--tcp");
        client_args.push("--tcp");
    }
    let _server = server(&ends.server, "sockperf", &server_args, SOCKPERF_PORT, tcp, ends.cpu)?;
    let mut cmd = tool(&ends.client, "sockperf", ends.cpu);
    cmd.args(&client_args);
    let (out, cpu, wall) = timed_client(cmd, ends.cpu)?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        return Err(format!("sockperf pp failed ({}): {text}", out.status));
    }
    let (p50, p99, observations) = parse_sockperf(&text).ok_or_else(|| format!("sockperf printed no percentiles: {text}"))?;
    Ok((p50, p99, observations, cpu, wall))
}

/// Reads `---> percentile 50.000 = 12.345` and `Total N observations` from
/// sockperf's summary.
pub fn parse_sockperf(text: &str) -> Option<(f64, f64, f64)> {
    let percentile = |p: &str| {
        text.lines().find_map(|l| {
            let rest = l.split("percentile ").nth(1)?;
            let (name, value) = rest.split_once('=')?;
            (name.trim() == p).then(|| value.trim().parse::<f64>().ok()).flatten()
        })
    };
    let observations = text.lines().find_map(|l| {
        let rest = l.split("Total ").nth(1)?;
        rest.split_whitespace().next()?.parse::<f64>().ok()
    })?;
    Some((percentile("50.000")?, percentile("99.000")?, observations))
}

pub(super) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn command_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or_default().trim().to_owned())
        .unwrap_or_default()
}

pub(super) fn machine_meta() -> Meta {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim().to_owned()))
        .unwrap_or_else(|| "unknown".to_owned());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let kb: f64 = m.lines().next()?.split_whitespace().nth(1)?.parse().ok()?;
            Some(format!("{:.1} GiB", kb / 1024.0 / 1024.0))
        })
        .unwrap_or_default();
    let sockperf = command_line("sockperf", &["--version"]);
    Meta {
        date: command_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        kernel: command_line("uname", &["-rv"]),
        cpu_model,
        cpus: std::thread::available_parallelism().map_or(0, usize::from),
        memory,
        tools: format!("{}, {}", command_line("iperf3", &["--version"]), sockperf.trim_end_matches(['\n'])),
        commit: command_line("git", &["describe", "--always", "--dirty"]),
        ..Meta::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOCKPERF: &str = "sockperf: [Total Run] RunTime=1.001 sec; Warm up time=400 msec; SentMessages=16115; ReceivedMessages=16114
sockperf: \u{1b}[2;35mTotal 7273 observations\u{1b}[0m; each percentile contains 72.73 observations
sockperf: ---> <MAX> observation = 2921.493
sockperf: ---> percentile 99.999 = 2921.493
sockperf: ---> percentile 99.000 =  122.110
sockperf: ---> percentile 50.000 =   73.458
sockperf: ---> <MIN> observation =   28.311
";

    #[test]
    fn ip_counters_are_read_by_name() {
        let text = "Ip: Forwarding DefaultTTL InReceives OutRequests\nIp: 2 64 101560 92338\nIcmp: InMsgs\nIcmp: 3\n\
                    TcpExt: SyncookiesSent\nTcpExt: 0\nIpExt: InNoRoutes InOctets OutOctets\nIpExt: 0 706276919 36245862\n";
        let c = IpCounters::parse(text).unwrap();
        assert_eq!((c.in_receives, c.out_requests, c.in_octets, c.out_octets), (101560.0, 92338.0, 706276919.0, 36245862.0));
        assert!(IpCounters::parse("Ip: InReceives\nIp: 1\n").is_none());
    }

    #[test]
    fn a_process_kernel_time_is_read_past_a_command_with_spaces_and_parentheses() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime ...
        let stat = "4242 (iperf3 (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 12 345 0 0 10 -10 1 0 99 0";
        assert_eq!(kernel_ticks_of(stat), Some(345));
        assert_eq!(kernel_ticks_of("4242 (iperf3) S 1"), None);
        let shares = PathShares::of(6.0, 2.0, 2.0, 11.0).unwrap();
        assert_eq!((shares.receiver, shares.sender, shares.ksoftirqd), (0.6, 0.2, 0.2));
        assert!(PathShares::of(0.0, 0.0, 0.0, 0.0).is_none(), "no kernel time: no shares");
        assert!(PathShares::of(3.0, 2.0, 2.0, 10.0).is_none(), "softirq time charged to no task: the shares would mislead");
    }

    #[test]
    fn sockperf_summary_gives_median_p99_and_count() {
        assert_eq!(parse_sockperf(SOCKPERF), Some((73.458, 122.110, 7273.0)));
        assert_eq!(parse_sockperf("sockperf: ERROR"), None);
    }
}
