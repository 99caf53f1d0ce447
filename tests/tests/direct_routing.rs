//! host-gw and DirectRouting: forwarding without encapsulation where the
//! underlay allows it, VXLAN where it doesn't, decided per peer from the
//! kernel's own view of the underlay.

use std::time::{Duration, Instant};

use overlay_tests::{
    agent_binary,
    lab::{Lab, LabSpec, Topology},
    require_root, stdout,
};

fn lab(topology: Topology, backend: &str, direct_routing: bool) -> Lab {
    let mut spec = LabSpec::new(agent_binary());
    spec.topology = topology;
    spec.backend = backend.to_owned();
    spec.direct_routing = direct_routing;
    Lab::start(spec).unwrap_or_else(|e| panic!("lab failed to start: {e}"))
}

/// The ROUTES line of `inspect` for a pod CIDR.
fn route_line(lab: &Lab, node: usize, cidr: &str) -> String {
    let text = lab.inspect(node);
    text.lines()
        .find(|l| l.trim_start().starts_with(cidr) && (l.contains("vxlan") || l.contains("direct") || l.contains("NONE")))
        .unwrap_or_else(|| panic!("no route for {cidr} in inspect:\n{text}"))
        .to_owned()
}

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn routed_topology_all_pairs_with_vxlan_and_with_direct_routing() {
    require_root();
    let vxlan = lab(Topology::Routed, "vxlan", false);
    vxlan.assert_all_pairs("vxlan");
    assert!(route_line(&vxlan, 0, "10.244.2.0/24").contains("vxlan"));
    drop(vxlan);

    let dr = lab(Topology::Routed, "vxlan", true);
    dr.assert_all_pairs("vxlan --direct-routing");
    let same_subnet = route_line(&dr, 0, "10.244.2.0/24");
    assert!(same_subnet.contains("direct") && same_subnet.contains("on-link"), "{same_subnet}");
    let across = route_line(&dr, 0, "10.244.3.0/24");
    assert!(across.contains("vxlan") && across.contains("gateway 192.168.77.1 in between"), "{across}");
}

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn host_gw_on_one_segment_all_pairs() {
    require_root();
    let hgw = lab(Topology::Flat, "host-gw", false);
    hgw.assert_all_pairs("host-gw");
    let line = route_line(&hgw, 0, "10.244.3.0/24");
    assert!(line.contains("direct") && line.contains("on-link"), "{line}");
}

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn host_gw_reports_a_peer_behind_a_router_and_keeps_serving_the_others() {
    require_root();
    let hgw = lab(Topology::Routed, "host-gw", false);
    let (n1, n2, n3) = (&hgw.nodes[0], &hgw.nodes[1], &hgw.nodes[2]);
    // Same segment: served.
    assert!(Lab::ping(&n1.pods[0].ns, n2.pods[0].ip));
    Lab::tcp_echo(&n1.pods[0].ns, &n2.pods[0].ns, n2.pods[0].ip, 25001).expect("tcp on the same segment");
    // Behind the router: refused loudly, not black-holed.
    let route = stdout("ip", &["-n", n1.ns.name(), "route", "show", "10.244.3.0/24"]);
    assert!(route.starts_with("unreachable 10.244.3.0/24"), "{route}");
    let err = Lab::tcp_echo(&n1.pods[0].ns, &n3.pods[0].ns, n3.pods[0].ip, 25002).expect_err("no path");
    assert!(err.contains("No route to host"), "{err}");
    // ... and said so, naming the peer, in inspect and in the log.
    let line = route_line(&hgw, 0, "10.244.3.0/24");
    assert!(line.contains("NONE") && line.contains("host-gw cannot cross gateway 192.168.77.1"), "{line}");
    let log = hgw.agent_log(0);
    assert!(log.contains("node=node3") && log.contains("host-gw cannot reach it: gateway 192.168.77.1"), "{log}");
}

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn capture_shows_same_subnet_traffic_plain_and_cross_subnet_traffic_encapsulated() {
    require_root();
    let dr = lab(Topology::Routed, "vxlan", true);
    // Encapsulated frames list the outer and the inner address.
    let [to_node2_pod, to_node3_pod] = <[_; 2]>::try_from(dr.ping_on_the_wire(0, &[1, 2], &["ip.dst", "udp.dstport"])).unwrap();
    assert!(to_node2_pod.iter().all(|l| l.trim() == "10.244.2.11"), "same subnet must be plain: {to_node2_pod:?}");
    assert!(
        to_node3_pod.iter().all(|l| l.starts_with("192.168.88.13,10.244.3.11") && l.ends_with("8472")),
        "cross subnet must be VXLAN to node3: {to_node3_pod:?}"
    );
    let counters = dr.inspect(0);
    let count = |name: &str| -> u64 {
        counters.lines().find(|l| l.split_whitespace().next() == Some(name)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0)
    };
    assert!(count("direct") > 0 && count("encap") > 0, "{counters}");
}

/// Waits until `inspect` on node `i` shows `cidr` with `expected` in its line.
fn wait_for_mode(lab: &Lab, i: usize, cidr: &str, expected: &str) -> Duration {
    let started = Instant::now();
    loop {
        let line = route_line(lab, i, cidr);
        if line.contains(expected) {
            return started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(5), "still `{line}`, expected {expected}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn a_router_appearing_flips_a_peer_to_vxlan_and_back_without_restarting() {
    require_root();
    let dr = lab(Topology::Flat, "vxlan", true);
    let (n1, n2) = (&dr.nodes[0], &dr.nodes[1]);
    wait_for_mode(&dr, 0, "10.244.2.0/24", "on-link");
    // node3 (which forwards) becomes the gateway between node1 and node2.
    let _ = n1.ns.ip(&["route", "add", "192.168.77.12/32", "via", "192.168.77.13"]);
    let took = wait_for_mode(&dr, 0, "10.244.2.0/24", "gateway 192.168.77.13 in between");
    eprintln!("mode flipped to vxlan {took:?} after the route appeared");
    assert!(Lab::ping(&n1.pods[0].ns, n2.pods[0].ip), "traffic through the new gateway");
    let _ = n1.ns.ip(&["route", "del", "192.168.77.12/32"]);
    wait_for_mode(&dr, 0, "10.244.2.0/24", "on-link");
    assert!(Lab::ping(&n1.pods[0].ns, n2.pods[0].ip));
    assert!(dr.agent_log(0).contains("underlay path changed"), "{}", dr.agent_log(0));
}
