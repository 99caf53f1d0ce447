//! The fast path (`--forward bpf`): pod traffic forwarded by our programs,
//! both ways past the kernel's forward path, with the same wire format and
//! the same reach as the kernel routes, and what it must leave to the
//! kernel.

use std::{net::Ipv4Addr, process::Command};

use overlay_common::{Counter, Totals};
use overlay_tests::{
    NetNs, agent_binary,
    lab::{Lab, LabSpec, Topology},
    require_root,
};

fn lab(topology: Topology, backend: &str, direct_routing: bool) -> Lab {
    let mut spec = LabSpec::new(agent_binary());
    spec.topology = topology;
    spec.backend = backend.to_owned();
    spec.direct_routing = direct_routing;
    spec.forward = "bpf".to_owned();
    // Lab::start waits until every pod is enrolled in the fast path.
    Lab::start(spec).unwrap_or_else(|e| panic!("lab failed to start: {e}"))
}

fn assert_all_pairs(lab: &Lab, what: &str) {
    let (checks, failures) = lab.check_all_pairs();
    assert!(failures.is_empty(), "{what}: {} of {checks} checks failed: {failures:#?}", failures.len());
}

/// One ping with `options`, expected to fail; what it printed.
fn ping_output(from: &NetNs, options: &[&str], to: Ipv4Addr) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", from.name()))
        .args(["ping", "-c", "1", "-W", "2"])
        .args(options)
        .arg(to.to_string())
        .output()
        .expect("running ping");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

fn assert_no_drops(c: &Totals) {
    let drops: Vec<_> = c.drops_by_reason().filter(|(_, n)| *n > 0).collect();
    assert!(drops.is_empty(), "the datapath dropped packets: {drops:?}");
}

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn routed_direct_routing_all_pairs_on_the_wire_as_without_it() {
    require_root();
    let dr = lab(Topology::Routed, "vxlan", true);
    assert!(dr.agent_log(0).contains("pod fast path attached"), "{}", dr.agent_log(0));
    let before = dr.counters(0);
    assert_all_pairs(&dr, "vxlan --direct-routing --forward bpf");
    let after = dr.counters(0);
    // Node 1 sent to and received from both peers: both halves ran.
    assert!(after.packets(Counter::FastpathOut) > before.packets(Counter::FastpathOut), "out half: {after:?}");
    assert!(after.packets(Counter::FastpathIn) > before.packets(Counter::FastpathIn), "in half: {after:?}");
    assert!(after.packets(Counter::Direct) > 0 && after.packets(Counter::Encap) > 0, "{after:?}");
    assert_no_drops(&after);

    // Same wire format as the kernel path: plain to the on-link peer,
    // VXLAN to the one behind the router.
    let [to_node2_pod, to_node3_pod] = <[_; 2]>::try_from(dr.ping_on_the_wire(0, &[1, 2], &["ip.dst", "ip.ttl"])).unwrap();
    // ping's TTL 64, one hop (this node) taken off, as forwarding does.
    assert!(to_node2_pod.iter().all(|l| l.trim() == "10.244.2.11\t63"), "same subnet must be plain: {to_node2_pod:?}");
    assert!(
        to_node3_pod.iter().all(|l| l.starts_with("192.168.88.13,10.244.3.11\t64,63")),
        "cross subnet must be VXLAN to node3: {to_node3_pod:?}"
    );
}

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn host_gw_all_pairs_and_bulk_tcp() {
    require_root();
    let hgw = lab(Topology::Flat, "host-gw", false);
    assert_all_pairs(&hgw, "host-gw --forward bpf");
    let before = (hgw.counters(0).packets(Counter::FastpathOut), hgw.counters(1).packets(Counter::FastpathIn));
    let veth_tx_before = tx_bytes(&hgw.nodes[1].ns, "p1");
    // GSO super-packets one way, ACKs the other.
    let report = hgw.iperf3((0, 0), (1, 0), 2).expect("iperf3");
    let received = report["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
    assert!(received > 0.0, "{report}");
    let after = (hgw.counters(0), hgw.counters(1));
    assert!(after.0.packets(Counter::FastpathOut) > before.0 && after.1.packets(Counter::FastpathIn) > before.1, "{after:?}");
    assert_no_drops(&after.0);
    assert_no_drops(&after.1);
    // Delivered into the pod past the bridge: the pod's host-side veth did
    // not transmit the stream (bpf_redirect_peer enters the pod directly).
    let veth_tx = tx_bytes(&hgw.nodes[1].ns, "p1") - veth_tx_before;
    assert!((veth_tx as f64) < received / 10.0, "p1 sent {veth_tx} bytes of the {received} the pod received");
}

/// On the wire-like underlay (MTU-sized VXLAN frames, the lab's default),
/// TCP that the underlay's TC ingress decapsulates reaches the pod through
/// the agent's GRO device, merged: fewer, larger packets than the
/// segments that arrived, and the device pair is the agent's own.
#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn wire_tcp_reaches_the_pod_gro_merged() {
    require_root();
    let mut spec = LabSpec::new(agent_binary());
    spec.nodes = 2;
    spec.pods_per_node = 1;
    let vxlan = Lab::start(spec).unwrap_or_else(|e| panic!("lab failed to start: {e}"));
    let log = vxlan.agent_log(1);
    assert!(log.contains("fast-path delivery: TCP segments decapsulated at TC go through the GRO device"), "{log}");
    assert!(vxlan.inspect(1).contains("through the GRO device"), "{}", vxlan.inspect(1));
    let alias = vxlan.nodes[1].ns.ip(&["-j", "link", "show", "ovl-gro1"]);
    assert!(String::from_utf8_lossy(&alias.stdout).contains("overlay-agent: GRO"), "{alias:?}");
    let before = vxlan.counters(1);
    let report = vxlan.iperf3((0, 0), (1, 0), 2).expect("iperf3");
    let received = report["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
    assert!(received > 0.0, "{report}");
    let after = vxlan.counters(1);
    let segments = after.packets(Counter::FastpathIn) - before.packets(Counter::FastpathIn);
    let merged = after.packets(Counter::GroDelivered) - before.packets(Counter::GroDelivered);
    let merged_bytes = after.bytes(Counter::GroDelivered) - before.bytes(Counter::GroDelivered);
    eprintln!("{received} bytes received; {segments} packets in by the fast path, {merged} merged packets ({merged_bytes} bytes) out of the GRO device");
    // The stream went through the GRO device...
    assert!(merged_bytes as f64 > received * 0.9, "{merged_bytes} bytes of {received} through the GRO device: {after:?}");
    // ...and came out merged: on average several 1450-byte segments each.
    assert!(merged > 0 && merged_bytes / merged > 3 * 1450, "{merged} packets of {merged_bytes} bytes: not merged");
    assert!(segments > 2 * merged, "{segments} segments in, {merged} packets delivered");
    assert_no_drops(&after);
    // The receiving end's own statistics agree: it took them through its
    // NAPI (veth counts what it queued) and GRO'd them.
    let rx = rx_packets(&vxlan.nodes[1].ns, "ovl-gro1");
    assert!(rx >= merged, "ovl-gro1 received {rx} packets, the program delivered {merged}");
}

/// An interface's received packets, from `ip -s -j link`.
fn rx_packets(ns: &NetNs, iface: &str) -> u64 {
    let out = ns.ip(&["-s", "-j", "link", "show", iface]);
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
    links[0]["stats64"]["rx"]["packets"].as_u64().expect("rx packets")
}

/// An interface's transmitted bytes, from `ip -s -j link`.
fn tx_bytes(ns: &NetNs, iface: &str) -> u64 {
    let out = ns.ip(&["-s", "-j", "link", "show", iface]);
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
    links[0]["stats64"]["tx"]["bytes"].as_u64().expect("tx bytes")
}

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn what_needs_the_kernel_still_gets_it() {
    require_root();
    let vxlan = lab(Topology::Flat, "vxlan", false);
    let (n1, n2) = (&vxlan.nodes[0], &vxlan.nodes[1]);
    // A TTL about to expire: the kernel answers, from node1's pod gateway.
    let text = ping_output(&n1.pods[0].ns, &["-t", "1"], n2.pods[0].ip);
    assert!(text.contains("From 10.244.1.1") && text.contains("Time to live exceeded"), "{text}");
    // Too big for the tunnel: the kernel route (mtu 1450) sends the ICMP.
    vxlan.set_pod_mtu(0, 0, 1500);
    let text = ping_output(&n1.pods[0].ns, &["-M", "do", "-s", "1472"], n2.pods[0].ip);
    assert!(text.contains("mtu = 1450"), "{text}");
    assert!(Lab::ping(&n1.pods[0].ns, n2.pods[0].ip));
    // Node to node traffic is not ours to forward.
    assert!(Lab::ping(&n1.ns, n2.ip));
}

/// The fast path and kube-proxy together: a Service (DNAT on the client's
/// node) with its backend on another node, while every node drops what
/// conntrack calls INVALID, as kube-proxy does. The backend's replies
/// carry its pod address; they must meet the client node's conntrack,
/// which turns it back into the Service's. Pod-to-pod flows, fast both
/// ways, must not look half-seen to conntrack either.
#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn services_and_conntrack_work_across_the_fast_path() {
    require_root();
    for backend in ["vxlan", "host-gw"] {
        let lab = lab(Topology::Flat, backend, false);
        for node in &lab.nodes {
            iptables(&node.ns, &["-A", "FORWARD", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"]);
        }
        let (client, server) = (&lab.nodes[0].pods[0], &lab.nodes[1].pods[0]);
        let service = Ipv4Addr::new(10, 96, 0, 10);
        iptables(
            &lab.nodes[0].ns,
            &["-t", "nat", "-A", "PREROUTING", "-d", "10.96.0.10/32", "-p", "tcp", "--dport", "80",
              "-j", "DNAT", "--to-destination", &format!("{}:25080", server.ip)],
        );
        let before = lab.counters(0).packets(Counter::FastpathOut);
        for attempt in 0..3 {
            Lab::tcp_echo_via(&client.ns, &server.ns, server.ip, 25080 + attempt, (service, 80))
                .unwrap_or_else(|e| panic!("{backend}: through the Service, attempt {attempt}: {e}"));
            // The next attempt, a new socket, needs a DNAT rule of its own port.
            iptables(
                &lab.nodes[0].ns,
                &["-t", "nat", "-R", "PREROUTING", "1", "-d", "10.96.0.10/32", "-p", "tcp", "--dport", "80",
                  "-j", "DNAT", "--to-destination", &format!("{}:{}", server.ip, 25081 + attempt)],
            );
        }
        // Pod to pod, fast both ways, through the same INVALID drops.
        assert_all_pairs(&lab, backend);
        assert!(lab.counters(0).packets(Counter::FastpathOut) > before, "{backend}: the fast path carried nothing");
        assert_no_drops(&lab.counters(0));
        assert_no_drops(&lab.counters(1));
    }
}

fn iptables(ns: &NetNs, args: &[&str]) {
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.name()))
        .arg("iptables")
        .args(args)
        .output()
        .expect("running iptables");
    assert!(out.status.success(), "iptables {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A pod deleted and recreated with the same address (and so, with
/// flannel's bridge plugin, the same MAC) behind a new veth: its stale
/// `POD_PORTS` entry names a veth that is gone. With the agent down (no
/// sync will fix the entry), the new pod must still be reachable: the
/// fast path leaves the packet to the kernel, whose bridge finds the pod.
///
/// Not yet shown failing: against the program without the veth check
/// (`bpf_check_mtu` in `deliver_to_pod`) it passes too (2026-12-01), so
/// the blackhole issue 13 describes did not reproduce this way. Whether
/// the packet still took the fast path once the veth was gone (and what
/// `bpf_redirect_peer` does with a deleted index) is open.
#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn a_recreated_pod_with_the_same_address_is_reachable_while_the_agent_is_down() {
    require_root();
    let mut spec = LabSpec::new(agent_binary());
    spec.nodes = 2;
    spec.pods_per_node = 1;
    spec.forward = "bpf".to_owned();
    let mut lab = Lab::start(spec).unwrap_or_else(|e| panic!("lab failed to start: {e}"));
    let (client, target) = (&lab.nodes[0].pods[0], &lab.nodes[1].pods[0]);
    assert!(Lab::ping(&client.ns, target.ip), "control: the pod answers before it is recreated");
    let target_ip = target.ip;
    // Control: node 2 serves the pod on the fast path both ways (the
    // request in, the reply out), so the stale entry below is used.
    let fast = |lab: &Lab| {
        let totals = lab.counters(1);
        totals.packets(Counter::FastpathOut) + totals.packets(Counter::FastpathIn)
    };
    let fast_before = fast(&lab);
    assert!(Lab::ping(&lab.nodes[0].pods[0].ns, target_ip));
    let fast = fast(&lab) - fast_before;
    assert!(fast >= 2, "control: one ping moved node 2's fastpath_packets by {fast}, not 2 (both halves)");

    // The agent goes down; the datapath stays, POD_PORTS as it was.
    lab.stop_agent(1);
    let node = &lab.nodes[1];
    let pod = &node.pods[0];
    let link = String::from_utf8_lossy(&pod.ns.ip(&["-o", "link", "show", "eth0"]).stdout).into_owned();
    let mac = link.split("link/ether ").nth(1).and_then(|s| s.split_whitespace().next()).expect("the pod's MAC").to_owned();
    // Delete the pod's veth (its eth0 goes with it) and make the new one.
    node.ns.ip(&["link", "del", "p1"]);
    node.ns.ip(&["link", "add", "p1", "mtu", "1450", "type", "veth", "peer", "name", "eth0", "address", &mac, "netns", pod.ns.name()]);
    node.ns.ip(&["link", "set", "p1", "master", "cni0", "up"]);
    pod.ns.ip(&["addr", "add", &format!("{}/24", pod.ip), "dev", "eth0"]);
    pod.ns.ip(&["link", "set", "eth0", "mtu", "1450", "up"]);
    pod.ns.ip(&["route", "add", "default", "via", "10.244.2.1"]);

    let answered = (0..3).any(|_| Lab::ping(&lab.nodes[0].pods[0].ns, target_ip));
    assert!(answered, "the recreated pod is blackholed by its stale POD_PORTS entry:\n{}", lab.inspect(1));
}

/// A DNAT on the backend's node, as hostPort, NodePort with
/// `externalTrafficPolicy: Local` and externalIPs are: a pod on another
/// node dials the node's own address, which the node turns into its local
/// pod's. The request reaches the pod through the kernel's path (it is
/// for the node, not a pod); the pod's replies carry the pod's address to
/// a remote pod and must still meet that conntrack entry, which turns
/// their source back into the node's address.
#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn replies_of_connections_dnatted_to_a_local_pod_meet_conntrack() {
    require_root();
    for backend in ["vxlan", "host-gw"] {
        let lab = lab(Topology::Flat, backend, false);
        for node in &lab.nodes {
            iptables(&node.ns, &["-A", "FORWARD", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"]);
        }
        let (server_node, client, server) = (&lab.nodes[0], &lab.nodes[1].pods[0], &lab.nodes[0].pods[0]);
        let dnat = |rule: &[&str], port: u16| {
            let to = format!("{}:{port}", server.ip);
            let node_ip = format!("{}/32", server_node.ip);
            let mut args = rule.to_vec();
            args.extend(["-d", &node_ip, "-p", "tcp", "--dport", "30080", "-j", "DNAT", "--to-destination", &to]);
            iptables(&server_node.ns, &args);
        };
        dnat(&["-t", "nat", "-A", "PREROUTING"], 25080);
        let mut failures = Vec::new();
        for attempt in 0..3 {
            if let Err(e) = Lab::tcp_echo_via(&client.ns, &server.ns, server.ip, 25080 + attempt, (server_node.ip, 30080)) {
                failures.push(format!("attempt {attempt}: {e}"));
            }
            dnat(&["-t", "nat", "-R", "PREROUTING", "1"], 25081 + attempt);
        }
        assert!(failures.is_empty(), "{backend}: through node1's address: {failures:#?}");
        // The same pods, pod to pod: still fast.
        let before = lab.counters(0).packets(Counter::FastpathOut);
        Lab::tcp_echo(&client.ns, &server.ns, server.ip, 26080).unwrap_or_else(|e| panic!("{backend}: pod to pod: {e}"));
        assert!(lab.counters(0).packets(Counter::FastpathOut) > before, "{backend}: pod to pod left the fast path");
        assert_no_drops(&lab.counters(0));
    }
}
