//! Bad input, and what the agent answers: it refuses with a message naming
//! what is wrong, changes nothing it did not create, and keeps what worked.
//! The table of these answers is docs/bad-input.md.

use std::{fs, path::Path, process::Output};

use aya::maps::lpm_trie::Key;
use overlay_agent::{
    bpffs::PinLayout,
    datapath::{Datapath, DecapHook},
    maps::DatapathMaps,
};
use overlay_common::{ROUTE_MODE_VXLAN, Route};
use overlay_tests::{NetNs, PinDir, TempDir, agent_binary, require_root};

/// Runs `overlay-agent <args>` inside `ns`'s network namespace.
fn agent_in(ns: &NetNs, args: &[&str]) -> Output {
    std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.name()))
        .arg(agent_binary())
        .args(args)
        .output()
        .expect("running overlay-agent")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A user's directory, not on bpffs, with files and a subdirectory.
fn users_directory() -> TempDir {
    let guard = TempDir::new("overlay-users-");
    let dir = guard.path();
    fs::create_dir_all(dir.join("photos")).unwrap();
    fs::write(dir.join("notes.txt"), "mine").unwrap();
    fs::write(dir.join("photos/cat.jpg"), "meow").unwrap();
    // Names the agent uses, which here are still the user's.
    fs::create_dir_all(dir.join("v2")).unwrap();
    fs::write(dir.join("v2/ROUTES"), "not a map").unwrap();
    guard
}

fn assert_users_files_intact(dir: &Path) {
    assert_eq!(fs::read_to_string(dir.join("notes.txt")).ok().as_deref(), Some("mine"), "{} lost the user's files", dir.display());
    assert_eq!(fs::read_to_string(dir.join("photos/cat.jpg")).ok().as_deref(), Some("meow"));
    assert_eq!(fs::read_to_string(dir.join("v2/ROUTES")).ok().as_deref(), Some("not a map"));
}

/// The agent run with `args` and a user's directory, not on bpffs, as its
/// `--bpffs-root`: it must fail saying so, and leave the user's files.
fn assert_refused_outside_bpffs(args: &[&str]) {
    let ns = NetNs::new();
    let dir = users_directory();
    let out = agent_in(&ns, &[args, &["--bpffs-root", dir.path().to_str().unwrap()]].concat());
    let said = text(&out);
    assert_users_files_intact(dir.path());
    assert_eq!(out.status.code(), Some(1), "{} on a non-bpffs directory must fail:\n{said}", args[0]);
    assert!(said.contains("not on a BPF filesystem"), "{said}");
}

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn cleanup_refuses_a_directory_not_on_bpffs_and_deletes_nothing() {
    require_root();
    assert_refused_outside_bpffs(&["cleanup", "--keep-subnet-file"]);
}

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn check_refuses_a_directory_not_on_bpffs_and_deletes_nothing() {
    require_root();
    assert_refused_outside_bpffs(&["check", "--iface", "lo"]);
}

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn cleanup_removes_only_what_the_agent_created_and_only_its_routes() {
    require_root();
    let ns = NetNs::new();
    ns.veth_pair("ul0", "ul1");
    ns.ip(&["addr", "add", "192.0.2.1/24", "dev", "ul0"]);
    let pins = PinDir::new();
    let root = pins.path();
    {
        let _inside = ns.enter();
        let mut datapath = Datapath::load(root).expect("loading the datapath");
        datapath.attach("ul0", DecapHook::TcIngress, false).expect("attaching");
    }
    // Someone else's things beside ours on the same bpffs root.
    fs::create_dir_all(root.join("theirs/inner")).unwrap();
    fs::create_dir_all(root.join("links/ul0/extra")).unwrap();
    // One route of this root (its destination is in this root's ROUTES),
    // one of another agent's root in the same namespace.
    let mut maps = DatapathMaps::open(root).unwrap();
    let route = Route { node_ip: [192, 0, 2, 2], vtep_mac: [2, 0, 0, 0, 0, 2], mode: ROUTE_MODE_VXLAN, reason: 0, next_hop: [192, 0, 2, 2] };
    maps.routes.insert(&Key::new(24, [10, 244, 9, 0]), route, 0).unwrap();
    drop(maps);
    for cidr in ["10.244.9.0/24", "10.99.0.0/24"] {
        ns.ip(&["route", "add", cidr, "via", "192.0.2.2", "dev", "ul0", "onlink", "proto", "157"]);
    }
    // Another tool's nftables table under the name of the agent's own.
    // (Shown failing before: cleanup deleted any table of that name.)
    let out = ns.exec("nft", &["add table ip overlay; add chain ip overlay theirs { type filter hook input priority 0; }"]);
    assert!(out.status.success(), "{}", text(&out));

    let out = agent_in(&ns, &["cleanup", "--keep-subnet-file", "--bpffs-root", root.to_str().unwrap()]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("removed 1 routes"), "{said}");
    let routes = String::from_utf8_lossy(&ns.ip(&["route", "show", "proto", "157"]).stdout).into_owned();
    assert!(!routes.contains("10.244.9.0/24"), "this root's route remains:\n{routes}");
    assert!(routes.contains("10.99.0.0/24"), "another root's route was removed:\n{routes}");
    let layout = PinLayout::new(root);
    assert!(!layout.maps_dir().exists(), "maps remain");
    assert!(!layout.link("ul0", overlay_agent::bpffs::LinkRole::TcEgress).exists(), "links remain");
    assert!(root.join("theirs/inner").is_dir(), "another's directory was removed");
    assert!(root.join("links/ul0/extra").is_dir(), "another's directory among the links was removed");
    assert!(said.contains("theirs"), "cleanup must say what it left: {said}");
    let table = std::process::Command::new("nsenter").arg(format!("--net=/run/netns/{}", ns.name())).args(["nft", "list", "table", "ip", "overlay"]).output().unwrap();
    assert!(table.status.success() && text(&table).contains("chain theirs"), "another tool's table was removed ({}):\n{said}", text(&table));
    assert!(said.contains("left the nftables table ip overlay: not the agent's (it has the chain theirs)"), "{said}");
}

/// The uninstall DaemonSet runs `cleanup` on every node, also on nodes the
/// agent never served (flannel's, in a cluster half migrated): there
/// subnet.env and the CNI config are flannel's, the same files, and must
/// stay. No pin root means the agent has not run here since boot.
#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn cleanup_where_the_agent_never_ran_leaves_flannels_subnet_file_and_cni_config() {
    require_root();
    let ns = NetNs::new();
    let pins = PinDir::new();
    let root = pins.path().join("never-ran-here");
    let files = TempDir::new("flannel-files");
    let (subnet, cni) = (files.path().join("subnet.env"), files.path().join("10-flannel.conflist"));
    fs::write(&subnet, "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n").unwrap();
    fs::write(&cni, "{\"name\": \"cbr0\"}\n").unwrap();
    let out = agent_in(
        &ns,
        &["cleanup", "--bpffs-root", root.to_str().unwrap(), "--subnet-file", subnet.to_str().unwrap(), "--cni-conf", cni.to_str().unwrap()],
    );
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(subnet.exists() && cni.exists(), "cleanup removed flannel's files on a node the agent never ran on:\n{said}");
    assert!(said.contains("left") && said.contains("subnet.env") && said.contains("10-flannel.conflist"), "cleanup must say what it left and why:\n{said}");
    assert!(!root.exists(), "cleanup made the root:\n{said}");
}

/// An `overlay-agent run` in a namespace of its own, killed on drop.
struct RunningAgent {
    child: std::process::Child,
    log: std::path::PathBuf,
    _log_dir: TempDir,
}

impl RunningAgent {
    /// `overlay-agent run --node-name me --iface ul0 ...` in `ns`, entered
    /// with `nsenter --net` (the host's bpffs) or, with `netns_exec`, with
    /// `ip netns exec` (a mount namespace of its own).
    fn start(ns: &NetNs, root: &Path, nodes_dir: &Path, extra: &[&str], netns_exec: bool) -> Self {
        // In a directory of its own, which an interrupt removes too.
        let log_dir = TempDir::new("overlay-agent-log-");
        let log = log_dir.path().join("agent.log");
        let mut command = if netns_exec {
            let mut c = std::process::Command::new("ip");
            c.args(["netns", "exec", ns.name()]);
            c
        } else {
            let mut c = std::process::Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{}", ns.name()));
            c
        };
        let child = command
            .arg(agent_binary())
            .args(["run", "--node-name", "me", "--iface", "ul0", "--metrics-addr", "127.0.0.1:0", "--bpffs-root"])
            .arg(root)
            .arg("--nodes-dir")
            .arg(nodes_dir)
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting the agent");
        Self { child, log, _log_dir: log_dir }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log holds `needle`; false at the deadline.
    fn wait_for(&self, needle: &str, secs: u64) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        while std::time::Instant::now() < deadline {
            if self.log().contains(needle) {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        false
    }

    /// The exit code, if it exits within `secs`.
    fn exit_code(&mut self, secs: u64) -> Option<i32> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        None
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A temporary nodes directory, removed on drop.
struct NodesDir(TempDir);

impl NodesDir {
    fn new() -> Self {
        Self(TempDir::new("overlay-nodes-"))
    }

    fn path(&self) -> &Path {
        self.0.path()
    }

    fn node(&self, name: &str, cidr: &str, ip: &str) {
        let yaml = format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  annotations: {{flannel.alpha.coreos.com/kube-subnet-manager: \"true\"}}\nspec: {{podCIDR: {cidr}}}\nstatus: {{addresses: [{{type: InternalIP, address: {ip}}}]}}\n"
        );
        fs::write(self.path().join(format!("{name}.yaml")), yaml).unwrap();
    }
}

/// A namespace with the underlay `ul0` (192.0.2.1/24) and a nodes
/// directory holding this node ("me") and one peer.
fn one_node(my_ip: &str) -> (NetNs, NodesDir) {
    let ns = NetNs::new();
    ns.veth_pair("ul0", "ul1");
    ns.ip(&["addr", "add", "192.0.2.1/24", "dev", "ul0"]);
    let nodes = NodesDir::new();
    nodes.node("me", "10.244.1.0/24", my_ip);
    nodes.node("peer", "10.244.2.0/24", "192.0.2.2");
    (ns, nodes)
}

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn our_address_not_on_the_interface_is_refused_loudly() {
    require_root();
    let (ns, nodes) = one_node("192.0.2.99");
    let pins = PinDir::new();
    let agent = RunningAgent::start(&ns, pins.path(), nodes.path(), &[], false);
    assert!(agent.wait_for("192.0.2.99 is not an address of ul0", 20), "no refusal:\n{}", agent.log());
    std::thread::sleep(std::time::Duration::from_millis(500));
    let routes = String::from_utf8_lossy(&ns.ip(&["route", "show", "proto", "157"]).stdout).into_owned();
    assert!(routes.is_empty(), "nothing may be programmed for a node that is not us: {routes}");
    assert!(!agent.log().contains("ready: the initial sync"), "{}", agent.log());
    drop(agent);

    // The same address as a deliberate overwrite (a node behind NAT).
    let pins = PinDir::new();
    let agent = RunningAgent::start(&ns, pins.path(), nodes.path(), &["--public-ip", "192.0.2.99"], false);
    assert!(agent.wait_for("ready: the initial sync", 20), "{}", agent.log());
}

/// Our Node's InternalIP on another interface of this node (a management
/// NIC), with the underlay (`--iface`) a data network: the agent takes
/// the underlay's address as ours, as flanneld takes its `--iface`
/// address, says so, and programs the datapath; routes leave from that
/// address. (Shown failing before: refused as not an address of ul0, so a
/// flannel cluster migrating with `--iface` never came up.)
#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn an_internal_ip_on_another_interface_of_the_node_takes_the_underlays_address() {
    require_root();
    let (ns, nodes) = one_node("198.51.100.7");
    ns.veth_pair("mgmt0", "mgmt1");
    ns.ip(&["addr", "add", "198.51.100.7/24", "dev", "mgmt0"]);
    let pins = PinDir::new();
    let agent = RunningAgent::start(&ns, pins.path(), nodes.path(), &[], false);
    assert!(agent.wait_for("ready: the initial sync", 20), "{}", agent.log());
    assert!(agent.log().contains("advertising and tunnelling from the underlay interface's address instead"), "{}", agent.log());
    let routes = String::from_utf8_lossy(&ns.ip(&["route", "show", "proto", "157"]).stdout).into_owned();
    assert!(routes.contains("10.244.2.0/24") && routes.contains("src 192.0.2.1"), "{routes}");
}

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn pins_that_would_die_with_the_agent_are_refused_unless_allowed() {
    require_root();
    let (ns, nodes) = one_node("192.0.2.1");
    let pins = PinDir::new();
    // `ip netns exec` gives the agent a mount namespace of its own, where
    // /sys/fs/bpf is not mounted: a bpffs the agent mounted would die with it.
    let mut agent = RunningAgent::start(&ns, pins.path(), nodes.path(), &[], true);
    assert_eq!(agent.exit_code(20), Some(1), "the agent must refuse:\n{}", agent.log());
    assert!(agent.log().contains("--allow-ephemeral-pins"), "{}", agent.log());
    drop(agent);
    let agent = RunningAgent::start(&ns, pins.path(), nodes.path(), &["--allow-ephemeral-pins"], true);
    assert!(agent.wait_for("ready: the initial sync", 20), "{}", agent.log());
    assert!(agent.log().contains("nothing survives"), "the agent must warn:\n{}", agent.log());
}

/// One node whose XDP a first root's agent holds (asked for explicitly:
/// on a veth `auto` would pick TC anyway), running; its pins, then it.
fn one_node_with_xdp_taken() -> (NetNs, NodesDir, PinDir, RunningAgent) {
    let (ns, nodes) = one_node("192.0.2.1");
    let first = PinDir::new();
    let agent = RunningAgent::start(&ns, first.path(), nodes.path(), &["--decap", "xdp"], false);
    assert!(agent.wait_for("ready: the initial sync", 20), "{}", agent.log());
    (ns, nodes, first, agent)
}

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn the_decap_hook_is_settled_before_anything_is_attached() {
    require_root();
    let (ns, nodes, _first, a) = one_node_with_xdp_taken();
    assert!(a.log().contains("hook=Xdp"), "{}", a.log());
    // A second root on the same interface: XDP is taken, so auto picks TC,
    // for that reason, without trying XDP first.
    for _ in 0..5 {
        let second = PinDir::new();
        let b = RunningAgent::start(&ns, second.path(), nodes.path(), &[], false);
        assert!(b.wait_for("datapath attached", 20), "{}", b.log());
        let log = b.log();
        assert!(log.contains("hook=TcIngress"), "{log}");
        assert!(log.contains("another XDP program is attached"), "{log}");
        assert!(!log.contains("XDP cannot attach here"), "the choice must come before any attachment:\n{log}");
    }
    // Asked for XDP explicitly, the second root is refused, and a failed
    // start leaves no pins behind.
    let second = PinDir::new();
    let mut b = RunningAgent::start(&ns, second.path(), nodes.path(), &["--decap", "xdp"], false);
    assert_eq!(b.exit_code(20), Some(1), "{}", b.log());
    assert!(!second.path().exists(), "a failed start left {} behind:\n{}", second.path().display(), b.log());
}

/// A failed start on a root that held an older map layout's pins (an
/// upgrade whose new agent cannot start: a verifier that refuses it, XDP
/// taken) leaves them: until the new agent's programs run they are the
/// running datapath's. (Shown failing before: the start took the root for
/// a fresh one, its current layout's directory being new, and removed
/// everything under it, the older layout's maps too.)
#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn a_failed_start_leaves_an_older_layouts_pins_alone() {
    require_root();
    let (ns, nodes, _first, _a) = one_node_with_xdp_taken();
    let upgraded = PinDir::new();
    let older = upgraded.path().join("v5");
    overlay_tests::make_pins(&older, &[(overlay_common::map_names::CONFIG, "array", 4, 56, 1, 0)]);
    // XDP is the first root's: asked for it, this start fails.
    let mut b = RunningAgent::start(&ns, upgraded.path(), nodes.path(), &["--decap", "xdp"], false);
    assert_eq!(b.exit_code(20), Some(1), "{}", b.log());
    assert!(older.join(overlay_common::map_names::CONFIG).exists(), "a failed start removed the older layout's pins:\n{}", b.log());
    // The maps it made for its own layout go: left, the next start would
    // adopt them instead of carrying the older layout's state.
    let made = PinLayout::new(upgraded.path()).maps_dir();
    assert!(!made.exists(), "a failed start left {}:\n{}", made.display(), b.log());
}

/// A failed start on a root whose older map layout records routes (an
/// upgrade whose new agent cannot start, its layout's state not carried)
/// leaves those routes: until the new agent's programs run, they are the
/// running datapath's. Here the first root's agent, holding XDP, runs the
/// route the older layout records. (Shown failing before: the start removed
/// the routes it found only older layouts recording, then failed.)
#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn a_failed_start_leaves_the_routes_an_older_layout_records() {
    require_root();
    let (ns, nodes, _first, a) = one_node_with_xdp_taken();
    let route = || String::from_utf8_lossy(&ns.ip(&["route", "show", "proto", "157"]).stdout).into_owned();
    let deadline = std::time::Instant::now() + overlay_tests::scaled(std::time::Duration::from_secs(10));
    while !route().contains("10.244.2.0/24") {
        assert!(std::time::Instant::now() < deadline, "the first agent routes no peer:\n{}", a.log());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let upgraded = PinDir::new();
    let older = upgraded.path().join("v5");
    let routes_map = overlay_tests::V9_MAPS.into_iter().find(|m| m.0 == overlay_common::map_names::ROUTES).unwrap();
    overlay_tests::make_pins(&older, &[routes_map]);
    let mut recorded: aya::maps::LpmTrie<aya::maps::MapData, [u8; 4], Route> =
        overlay_agent::maps::open_pinned(&older.join(overlay_common::map_names::ROUTES)).unwrap();
    let route_to_peer = Route { node_ip: [192, 0, 2, 2], vtep_mac: [0; 6], mode: ROUTE_MODE_VXLAN, reason: overlay_common::ROUTE_REASON_BACKEND, next_hop: [192, 0, 2, 2] };
    recorded.insert(&Key::new(24, [10, 244, 2, 0]), route_to_peer, 0).unwrap();
    // XDP is the first root's: asked for it, this start fails.
    let mut b = RunningAgent::start(&ns, upgraded.path(), nodes.path(), &["--decap", "xdp"], false);
    assert_eq!(b.exit_code(20), Some(1), "{}", b.log());
    assert!(route().contains("10.244.2.0/24"), "a failed start removed the route:\n{}", b.log());
}

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn a_missing_nodes_directory_is_reported_once() {
    require_root();
    let (ns, nodes) = one_node("192.0.2.1");
    let pins = PinDir::new();
    let agent = RunningAgent::start(&ns, pins.path(), nodes.path(), &[], false);
    assert!(agent.wait_for("ready: the initial sync", 20), "{}", agent.log());
    fs::remove_dir_all(nodes.path()).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(3));
    let log = agent.log();
    let reports = log.matches("reading the nodes directory").count();
    assert_eq!(reports, 1, "the error must be logged once, not every poll:\n{log}");
    fs::create_dir_all(nodes.path()).unwrap();
    nodes.node("me", "10.244.1.0/24", "192.0.2.1");
    assert!(agent.wait_for("nodes directory readable again", 5), "{}", agent.log());
}

/// Needs no root: the agent stops at the missing nodes directory, before
/// anything privileged. Run as root (as `cargo xtask test` does), it runs
/// as nobody without capabilities all the same: it names the host's `lo`,
/// and must not be able to touch it should that order ever change.
#[test]
fn an_exported_kubeconfig_does_not_conflict_with_nodes_dir() {
    let mut command = std::process::Command::new("setpriv");
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        command.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "--"]).arg(agent_binary());
    } else {
        command = std::process::Command::new(agent_binary());
    }
    let out = command
        .env("KUBECONFIG", "/nonexistent/kubeconfig")
        .args(["run", "--node-name", "me", "--iface", "lo", "--metrics-addr", "127.0.0.1:0", "--nodes-dir", "/nonexistent/nodes"])
        .output()
        .expect("running overlay-agent");
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(!said.contains("--kubeconfig"), "a flag the user never typed must not be blamed:\n{said}");
    assert!(said.contains("--nodes-dir /nonexistent/nodes: not a directory"), "{said}");
}
