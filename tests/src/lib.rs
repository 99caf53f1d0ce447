//! Helpers for the integration tests: throwaway network namespaces, veth
//! pairs, bpffs pin directories and temporary directories, each owned by a
//! guard whose `Drop` removes it, so a failing or panicking test leaves
//! nothing behind; an interrupted one neither (`interrupt`).
//!
//! Every name carries the test process id and a counter, so tests can run in
//! parallel and next to a developer's own namespaces.

pub mod apiserver;
pub mod bench;
pub mod control_plane;
pub mod etcd;
pub mod frames;
mod interrupt;
pub mod lab;

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process: `<prefix>-<pid>-<n>`. Kept short because
/// interface names are limited to 15 bytes.
pub fn unique_name(prefix: &str) -> String {
    format!(
        "{prefix}{}-{}",
        std::process::id() % 100_000,
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

/// The flannel release the lab's real flannel nodes run; `xtask/src/gotools.rs`
/// builds it from the same file.
pub const FLANNEL_VERSION: &str = include_str!("../flannel-version.txt");

/// Real flanneld, as `cargo xtask setup` builds and caches it
/// (`~/.cache/overlay/flanneld-<version>/bin/flanneld`).
pub fn flanneld_binary() -> Result<PathBuf, String> {
    let version = FLANNEL_VERSION.trim();
    let path = overlay_cache().join(format!("flanneld-{version}")).join("bin/flanneld");
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!("{} is missing: run `cargo xtask setup`, which builds flanneld {version}", path.display()))
    }
}

/// Where `cargo xtask setup` caches what it builds and downloads:
/// `~/.cache/overlay` (or `$XDG_CACHE_HOME/overlay`).
pub(crate) fn overlay_cache() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(&std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache"))
        .join("overlay")
}

/// The CNI plugins release `cargo xtask setup` builds (`bridge`,
/// `host-local`, `portmap`).
pub const CNI_PLUGINS_VERSION: &str = include_str!("../cni-plugins-version.txt");

/// The directory of the CNI plugins `cargo xtask setup` built (the
/// plugins' `CNI_PATH`).
pub fn cni_plugins_dir() -> Result<PathBuf, String> {
    let version = CNI_PLUGINS_VERSION.trim();
    let dir = overlay_cache().join(format!("cni-plugins-{version}")).join("bin");
    if dir.join("bridge").is_file() && dir.join("host-local").is_file() {
        Ok(dir)
    } else {
        Err(format!("{} has no bridge and host-local plugins: run `cargo xtask setup`, which builds the CNI plugins {version}", dir.display()))
    }
}

/// flannel's own manifest (`Documentation/kube-flannel.yml`) of the
/// flannel release the lab runs, from the Go module `cargo xtask setup`
/// downloads to build flanneld.
pub fn flannel_manifest() -> Result<PathBuf, String> {
    let version = FLANNEL_VERSION.trim();
    let path = overlay_cache().join("go/mod/github.com/flannel-io").join(format!("flannel@{version}")).join("Documentation/kube-flannel.yml");
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!("{} is missing: run `cargo xtask setup`, which downloads flannel {version}'s module", path.display()))
    }
}

/// The `overlay-agent` binary next to this test binary (`target/<profile>/`).
/// `cargo xtask test` builds it before running the tests.
pub fn agent_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
    let agent = profile_dir.join("overlay-agent");
    assert!(
        agent.is_file(),
        "{} is missing: run the tests with `cargo xtask test`, which builds it first",
        agent.display()
    );
    agent
}

/// Whether the privileged tests can run. Prefer `#[ignore = "needs root:
/// ..."]` with [`require_root`]: a test that returns early here reports
/// "ok" without having run.
pub fn privileged() -> bool {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must run the privileged tests: run as root"
    );
    eprintln!("skipping: this test needs root (network namespaces, BPF); run `sudo -E cargo xtask test`");
    false
}

/// For tests marked `#[ignore = "needs root: ..."]`: run with
/// `--include-ignored` (as `cargo xtask test` does as root) they must not
/// pass without root, so they fail here, saying why.
pub fn require_root() {
    // SAFETY: geteuid cannot fail.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test needs root (network namespaces, BPF): run `sudo -E cargo xtask test`"
    );
}

/// How much slower than real hardware this machine runs:
/// `OVERLAY_TEST_TIME_SCALE` (default 1), which `cargo xtask vmtest` sets
/// in a VM (10 under emulation, where loading the programs through the
/// verifier alone takes tens of seconds; 2 with KVM).
pub fn time_scale() -> u32 {
    std::env::var("OVERLAY_TEST_TIME_SCALE").ok().and_then(|s| s.parse::<u32>().ok()).unwrap_or(1).max(1)
}

/// `timeout` stretched by [`time_scale`]. Waits for something to become
/// ready are stretched; a figure a test asserts is not, except a
/// throughput floor whose test says why (`vxlan_lab.rs`'s iperf3 test).
pub fn scaled(timeout: std::time::Duration) -> std::time::Duration {
    timeout * time_scale()
}

/// Ids of the TC programs attached to one side of `iface` in the current
/// network namespace, however they attach: TCX links (6.6 and later)
/// through the kernel's query, and clsact `bpf` filters (before 6.6) as
/// `tc filter show` lists them.
pub fn tc_program_ids(iface: &str, side: aya::programs::TcAttachType) -> Vec<u32> {
    use aya::programs::{SchedClassifier, TcAttachType};
    let mut ids: Vec<u32> = SchedClassifier::query_tcx(iface, side)
        .map(|(_, infos)| infos.iter().map(|i| i.id()).collect())
        .unwrap_or_default();
    let side = if side == TcAttachType::Ingress { "ingress" } else { "egress" };
    let filters = stdout("tc", &["filter", "show", "dev", iface, side]);
    for line in filters.lines().filter(|l| l.contains(" bpf ")) {
        let mut words = line.split_whitespace();
        while let Some(word) = words.next() {
            if word == "id"
                && let Some(id) = words.next().and_then(|w| w.parse().ok())
            {
                ids.push(id);
            }
        }
    }
    ids.sort_unstable();
    ids
}

/// A network namespace's IPv4 counters (`/proc/net/snmp`, `/proc/net/netstat`).
#[derive(Debug, Clone, Copy)]
pub struct IpCounters {
    /// `Ip: InReceives`: packets IP took in (after any GRO).
    pub in_receives: f64,
    /// `IpExt: InOctets`.
    pub in_octets: f64,
    /// `Ip: OutRequests`: packets IP was asked to send (before GSO).
    pub out_requests: f64,
    /// `IpExt: OutOctets`.
    pub out_octets: f64,
}

impl IpCounters {
    /// Reads the counters of the named namespace (`/run/netns/<ns>`).
    pub fn read(ns: &str) -> Result<Self, String> {
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .args(["cat", "/proc/net/snmp", "/proc/net/netstat"])
            .output()
            .map_err(|e| format!("reading {ns}'s IP counters: {e}"))?;
        Self::parse(&String::from_utf8_lossy(&out.stdout)).ok_or_else(|| format!("{ns}'s /proc/net/snmp or netstat lacks the IP counters"))
    }

    /// The counters in the text of both files, where each table is a line
    /// of names and then a line of values, both led by the table's name
    /// (`Ip:`, `IpExt:`).
    pub fn parse(text: &str) -> Option<Self> {
        let field = |prefix: &str, name: &str| proc_net_field(text, prefix, name);
        Some(Self {
            in_receives: field("Ip:", "InReceives")?,
            in_octets: field("IpExt:", "InOctets")?,
            out_requests: field("Ip:", "OutRequests")?,
            out_octets: field("IpExt:", "OutOctets")?,
        })
    }

    /// What the counters grew by since `earlier`.
    pub fn since(self, earlier: Self) -> Self {
        Self {
            in_receives: self.in_receives - earlier.in_receives,
            in_octets: self.in_octets - earlier.in_octets,
            out_requests: self.out_requests - earlier.out_requests,
            out_octets: self.out_octets - earlier.out_octets,
        }
    }
}

/// Field `name` of table `table` (`Ip:`, `TcpExt:`...) in the text of
/// /proc/net/snmp or /proc/net/netstat, where each table is a line of
/// names and then a line of values, both led by the table's name.
pub fn proc_net_field(text: &str, table: &str, name: &str) -> Option<f64> {
    let mut rows = text.lines().filter(|l| l.split_whitespace().next() == Some(table));
    let (names, values) = (rows.next()?, rows.next()?);
    let at = names.split_whitespace().position(|n| n == name)?;
    values.split_whitespace().nth(at)?.parse().ok()
}

/// The first connection `listener` takes within `timeout`, blocking as
/// usual: bounded, so that a server thread whose client never connects
/// ends (with `TimedOut`) instead of hanging the test and keeping its
/// socket, and with it the namespace, alive.
pub fn accept_within(listener: &std::net::TcpListener, timeout: std::time::Duration) -> std::io::Result<std::net::TcpStream> {
    listener.set_nonblocking(true)?;
    let deadline = std::time::Instant::now() + timeout;
    let conn = loop {
        match listener.accept() {
            Ok((conn, _)) => break conn,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if std::time::Instant::now() >= deadline {
                    return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no connection within {timeout:?}")));
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => return Err(e),
        }
    };
    conn.set_nonblocking(false)?;
    Ok(conn)
}

/// Runs a command and returns its output, panicking with the command line
/// and stderr when it fails.
pub fn run(program: &str, args: &[&str]) -> Output {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("spawning {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {} failed ({}): {}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Runs a command and returns its stdout as text.
pub fn stdout(program: &str, args: &[&str]) -> String {
    String::from_utf8_lossy(&run(program, args).stdout).into_owned()
}

/// A network namespace that is deleted on drop.
pub struct NetNs {
    name: String,
    _registered: interrupt::Registration,
}

impl NetNs {
    pub fn new() -> Self {
        Self::with_name(unique_name("ovt"))
    }

    /// A namespace with a chosen (unique) name.
    pub fn with_name(name: String) -> Self {
        let _registered = interrupt::register(interrupt::Owned::Namespace(name.clone()));
        let _ = run("ip", &["netns", "add", &name]);
        let ns = Self { name, _registered };
        let _ = ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> Output {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Runs a program inside the namespace (network namespace only; the
    /// mount namespace, and so /sys/fs/bpf, stays the host's).
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        let net = format!("--net=/run/netns/{}", self.name);
        let mut full = vec![net.as_str(), program];
        full.extend_from_slice(args);
        run("nsenter", &full)
    }

    /// Moves the calling thread into the namespace until the guard drops.
    pub fn enter(&self) -> NetNsEntered {
        enter_netns(&self.name)
    }

    /// Creates a veth pair `a`/`b` inside the namespace, both up.
    pub fn veth_pair(&self, a: &str, b: &str) {
        let _ = self.ip(&["link", "add", a, "type", "veth", "peer", "name", b]);
        let _ = self.ip(&["link", "set", a, "up"]);
        let _ = self.ip(&["link", "set", b, "up"]);
    }
}

impl Default for NetNs {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes every interface in it, and with
        // them every program attachment.
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Moves the calling thread into the named namespace (`/run/netns/<name>`)
/// until the guard drops.
pub fn enter_netns(name: &str) -> NetNsEntered {
    let original = File::open("/proc/thread-self/ns/net").expect("opening current netns");
    let target = File::open(format!("/run/netns/{name}")).expect("opening test netns");
    // SAFETY: valid namespace fds; setns only affects this thread.
    let rc = unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    NetNsEntered { original }
}

/// While alive, the thread is inside a [`NetNs`].
pub struct NetNsEntered {
    original: File,
}

impl Drop for NetNsEntered {
    fn drop(&mut self) {
        // SAFETY: valid namespace fd.
        let rc = unsafe { libc::setns(self.original.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 && !std::thread::panicking() {
            panic!("returning to the original netns: {}", std::io::Error::last_os_error());
        }
    }
}

/// Waits until something listens on TCP `port` in the namespace `ns`
/// (`ss`), for up to `timeout` stretched by [`scaled`]: a server just
/// spawned needs a moment to listen, longer on a loaded or emulated CPU.
pub fn wait_for_tcp_listener(ns: &str, port: u16, timeout: std::time::Duration) -> Result<(), String> {
    let deadline = std::time::Instant::now() + scaled(timeout);
    let filter = format!("sport = :{port}");
    loop {
        let out = Command::new("ip").args(["netns", "exec", ns, "ss", "-Hltn", &filter]).output().map_err(|e| format!("running ss: {e}"))?;
        if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(format!("nothing listens on TCP port {port} in {ns} after {:?}", scaled(timeout)));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Sends `frames` (whole Ethernet frames) out of `iface` in `ns` through a
/// packet socket, in order; returns when the first was handed to the kernel.
pub fn send_frames(ns: &NetNs, iface: &str, frames: &[impl AsRef<[u8]>]) -> std::time::Instant {
    let _inside = ns.enter();
    let name = std::ffi::CString::new(iface).expect("interface name");
    // SAFETY: plain socket calls on a descriptor this function owns, with a
    // zeroed, correctly sized sockaddr_ll and frames that outlive them.
    unsafe {
        let ifindex = libc::if_nametoindex(name.as_ptr());
        assert_ne!(ifindex, 0, "no {iface} in {}", ns.name());
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
        let mut address: libc::sockaddr_ll = std::mem::zeroed();
        address.sll_family = libc::AF_PACKET as u16;
        address.sll_ifindex = ifindex as i32;
        address.sll_halen = 6;
        let sent = std::time::Instant::now();
        for frame in frames {
            let frame = frame.as_ref();
            address.sll_addr[..6].copy_from_slice(&frame[..6]);
            let rc = libc::sendto(fd, frame.as_ptr().cast(), frame.len(), 0, (&raw const address).cast(), size_of::<libc::sockaddr_ll>() as u32);
            let err = std::io::Error::last_os_error();
            if rc != frame.len() as isize {
                libc::close(fd);
                panic!("sending a frame from {iface}: {err}");
            }
        }
        libc::close(fd);
        sent
    }
}

/// The podman containers labelled `label` (`key=value`), removed on drop
/// and on an interrupt (podman's conmon runs them outside this process's
/// tree, where killing descendants does not reach).
pub struct PodmanContainers {
    label: String,
    _registered: interrupt::Registration,
}

impl PodmanContainers {
    pub fn new(label: String) -> Self {
        let _registered = interrupt::register(interrupt::Owned::PodmanContainers(label.clone()));
        Self { label, _registered }
    }
}

impl Drop for PodmanContainers {
    fn drop(&mut self) {
        interrupt::remove_podman_containers(&self.label);
    }
}

/// A directory removed with everything in it on drop: when the test
/// passes, when it fails, and when the setup that made it fails halfway.
pub struct TempDir {
    path: PathBuf,
    _registered: interrupt::Registration,
}

impl TempDir {
    /// Creates `<system temp dir>/<prefix><unique>`.
    pub fn new(prefix: &str) -> Self {
        let dir = Self::at(std::env::temp_dir().join(unique_name(prefix)));
        std::fs::create_dir_all(&dir.path).unwrap_or_else(|e| panic!("creating {}: {e}", dir.path.display()));
        dir
    }

    /// Owns `path`, which its user creates (or has created).
    pub fn at(path: PathBuf) -> Self {
        let _registered = interrupt::register(interrupt::Owned::Directory(path.clone()));
        Self { path, _registered }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// One map as an older agent pinned it: name, `bpftool map create` kind,
/// key and value size, capacity, flags.
pub type PinnedMap = (&'static str, &'static str, u32, u32, u32, u32);

/// Map layout v9, the one just before this (`overlay_agent::carry::FROM`):
/// `CONFIG` of 64 bytes (no `pod_bridge_ip`).
pub const V9_MAPS: [PinnedMap; 6] = [
    (overlay_common::map_names::CONFIG, "array", 4, 64, 1, 0),
    (overlay_common::map_names::COUNTERS, "percpu_array", 4, 16, 25, 0),
    (overlay_common::map_names::KERNEL_SOCKETS, "lru_hash", 8, 1, 65536, 0),
    (overlay_common::map_names::PEERS, "hash", 4, 8, 65536, 0),
    (overlay_common::map_names::POD_PORTS, "hash", 6, 4, 4096, 0),
    (overlay_common::map_names::ROUTES, "lpm_trie", 8, 16, 65536, 1),
];

/// Creates `maps` in `dir` with bpftool, as an older agent pinned them.
pub fn make_pins(dir: &Path, maps: &[PinnedMap]) {
    std::fs::create_dir_all(dir).unwrap();
    for &(name, kind, key, value, entries, flags) in maps {
        let (key, value, entries, flags) = (key.to_string(), value.to_string(), entries.to_string(), flags.to_string());
        let path = dir.join(name);
        let out = Command::new("bpftool")
            .args(["map", "create"])
            .arg(&path)
            .args(["type", kind, "key", &key, "value", &value, "entries", &entries, "name", name, "flags", &flags])
            .output()
            .expect("running bpftool");
        assert!(out.status.success(), "bpftool map create {name}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// A pin directory under /sys/fs/bpf, removed with its pins on drop.
pub struct PinDir(TempDir);

impl PinDir {
    pub fn new() -> Self {
        Self::at(Path::new(overlay_agent::bpffs::BPFFS_MOUNT).join(unique_name("overlay-test-")))
    }

    /// Owns `path` (created later by whoever pins there).
    pub fn at(path: PathBuf) -> Self {
        Self(TempDir::at(path))
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Default for PinDir {
    fn default() -> Self {
        Self::new()
    }
}
