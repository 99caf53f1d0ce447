//! A kernel vxlan device on our UDP port (the `flannel.1` a migration
//! leaves behind) decapsulates tunnel traffic to any local address without
//! our checks: the agent refuses to start beside it, and deletes it only
//! when told to (`--remove-flannel-device`), and only flannel's.

use std::{
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use overlay_tests::{NetNs, PinDir, TempDir, agent_binary, lab::ChildGuard, require_root};

/// A namespace with the underlay `ul0` (192.168.77.11) and a directory
/// holding this node's manifest.
struct Node {
    ns: NetNs,
    pins: PinDir,
    nodes_dir: TempDir,
}

impl Node {
    fn new() -> Self {
        let ns = NetNs::new();
        ns.veth_pair("ul0", "ul1");
        ns.ip(&["addr", "add", "192.168.77.11/24", "dev", "ul0"]);
        let nodes_dir = TempDir::new("ovfl-nodes");
        std::fs::write(
            nodes_dir.path().join("n1.yaml"),
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: n1\nspec:\n  podCIDR: 10.244.1.0/24\nstatus:\n  addresses:\n  - type: InternalIP\n    address: 192.168.77.11\n",
        )
        .unwrap();
        Self { ns, pins: PinDir::new(), nodes_dir }
    }

    fn vxlan(&self, name: &str) {
        self.ns.ip(&["link", "add", name, "type", "vxlan", "id", "1", "local", "192.168.77.11", "dev", "ul0", "dstport", "8472", "nolearning"]);
        self.ns.ip(&["link", "set", name, "up"]);
    }

    fn has_link(&self, name: &str) -> bool {
        Command::new("ip").args(["-n", self.ns.name(), "link", "show", name]).stderr(Stdio::null()).stdout(Stdio::null()).status().unwrap().success()
    }

    fn agent(&self, extra: &[&str]) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", self.ns.name()))
            .arg(agent_binary())
            .args(["run", "--node-name", "n1", "--iface", "ul0", "--metrics-addr", "127.0.0.1:0", "--nodes-dir"])
            .arg(self.nodes_dir.path())
            .arg("--bpffs-root")
            .arg(self.pins.path())
            .args(extra);
        command
    }

    /// Runs the agent and expects it to refuse: its stderr.
    fn refused(&self, extra: &[&str]) -> String {
        let out = self.agent(extra).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "the agent must refuse to start:\n{stderr}");
        assert!(!self.pins.path().exists(), "a refusing agent must pin nothing:\n{stderr}");
        stderr
    }
}

/// Waits up to 20 s for `done` while `agent` runs; panics, saying it did
/// not `what` and with its log, when it exits first or time runs out.
fn wait_while_running(agent: &mut Child, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        if let Some(status) = agent.try_wait().unwrap() {
            panic!("the agent exited ({status}) before it would {what}:\n{}", log_of(agent));
        }
        assert!(Instant::now() < deadline, "the agent did not {what} within 20 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stops `agent` with SIGTERM: how it exited, and its log.
fn stop(mut agent: Child) -> (ExitStatus, String) {
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let status = agent.wait().unwrap();
    (status, log_of(&mut agent))
}

/// What the agent wrote to its piped stderr.
fn log_of(agent: &mut Child) -> String {
    let mut log = String::new();
    std::io::Read::read_to_string(agent.stderr.as_mut().unwrap(), &mut log).unwrap();
    log
}

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn a_leftover_flannel_device_stops_the_agent_unless_it_may_remove_it() {
    require_root();
    let node = Node::new();
    node.vxlan("flannel.1");

    let stderr = node.refused(&[]);
    for needed in ["flannel.1", "8472", "ip link del flannel.1", "--remove-flannel-device"] {
        assert!(stderr.contains(needed), "the refusal must say {needed:?}:\n{stderr}");
    }
    assert!(node.has_link("flannel.1"), "refusing must leave flannel.1 alone");

    // With the flag: the agent starts, and deletes it once it serves.
    // Killed if the wait fails.
    let mut agent = ChildGuard(node.agent(&["--remove-flannel-device"]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap());
    wait_while_running(&mut agent.0, "delete flannel.1", || !node.has_link("flannel.1"));
    let (status, log) = stop(agent.into_inner());
    assert!(status.success(), "agent stopped with {status}:\n{log}");
    assert!(log.contains("deleted flannel's vxlan device"), "the deletion must be logged:\n{log}");
}

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn another_vxlan_device_on_our_port_is_never_touched() {
    require_root();
    let node = Node::new();
    node.vxlan("vx0");
    let stderr = node.refused(&["--remove-flannel-device"]);
    for needed in ["vx0", "not flannel's", "ip link del vx0", "--port"] {
        assert!(stderr.contains(needed), "the refusal must say {needed:?}:\n{stderr}");
    }
    assert!(node.has_link("vx0"), "vx0 is not ours to delete");
    // On another port it is no concern.
    node.ns.ip(&["link", "del", "vx0"]);
    node.ns.ip(&["link", "add", "vx0", "type", "vxlan", "id", "7", "dev", "ul0", "dstport", "4789"]);
    let mut agent = ChildGuard(node.agent(&[]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap());
    // Up once it has attached to the underlay (its pinned egress link).
    let attached = node.pins.path().join("links/ul0/tc_egress");
    wait_while_running(&mut agent.0, "attach beside a vxlan device on another port", || attached.exists());
    let (status, log) = stop(agent.into_inner());
    assert!(status.success(), "agent stopped with {status}:\n{log}");
}

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn flannels_device_coming_back_is_deleted_again_and_anothers_appearing_is_reported() {
    require_root();
    let node = Node::new();
    node.vxlan("flannel.1");
    let mut agent = ChildGuard(node.agent(&["--remove-flannel-device"]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap());
    wait_while_running(&mut agent.0, "delete flannel.1", || !node.has_link("flannel.1"));
    // As flanneld, still running, does at once: made again.
    node.vxlan("flannel.1");
    wait_while_running(&mut agent.0, "delete flannel.1 once more", || !node.has_link("flannel.1"));
    // Another's device on our port, appearing later: left alone.
    node.vxlan("vx0");
    std::thread::sleep(Duration::from_secs(12));
    assert!(node.has_link("vx0"), "vx0 is not ours to delete");
    let (status, log) = stop(agent.into_inner());
    assert!(status.success(), "agent stopped with {status}:\n{log}");
    assert!(log.contains("flannel's vxlan device came back and was deleted again"), "the second deletion must be logged:\n{log}");
    let report = log.lines().find(|l| l.contains("a kernel vxlan device appeared on our UDP port")).unwrap_or_else(|| panic!("vx0 must be reported:\n{log}"));
    for needed in ["vx0", "not flannel's", "ip link del vx0"] {
        assert!(report.contains(needed), "the report must say {needed:?}: {report}");
    }
}

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn flannels_device_made_anew_where_the_agent_deleted_none_is_left_to_flanneld() {
    require_root();
    let node = Node::new();
    let mut agent = ChildGuard(node.agent(&["--remove-flannel-device"]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap());
    let attached = node.pins.path().join("links/ul0/tc_egress");
    wait_while_running(&mut agent.0, "attach", || attached.exists());
    // flanneld starting on a node rolled back to flannel, beside an agent
    // not yet stopped: past the longest wait before a deletion, and a
    // housekeeping, the device is still there.
    node.vxlan("flannel.1");
    std::thread::sleep(overlay_agent::foreign_vxlan::REMOVAL_BACKOFF_FIRST * 2 + Duration::from_secs(2));
    assert!(node.has_link("flannel.1"), "the agent deleted a flannel.1 it had not deleted before");
    let (status, log) = stop(agent.into_inner());
    assert!(status.success(), "agent stopped with {status}:\n{log}");
    let report = log.lines().find(|l| l.contains("a kernel vxlan device appeared on our UDP port")).unwrap_or_else(|| panic!("flannel.1 must be reported:\n{log}"));
    for needed in ["flannel.1", "rolled back", "stop the agent"] {
        assert!(report.contains(needed), "the report must say {needed:?}: {report}");
    }
}
