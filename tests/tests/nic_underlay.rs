//! The NIC underlay (`Underlay::Nic`): each node's `eth0` a virtio-net NIC
//! of a VM, joined to the other node's by QEMU's hub. With default flags
//! the agent decapsulates VXLAN there with native XDP, before the driver's
//! GRO, so GRO merges the inner TCP that the wire carried in MTU-sized
//! frames, and the fast path hands the merged packets to the pod. This is
//! why `--decap auto` picks XDP on a NIC (overlay-agent/src/hook.rs), and
//! what the bench's NIC underlay measures (docs/benchmarks/README.md).
//!
//! Only a VM has the NICs: `cargo xtask test` runs this in its VM stage,
//! whose VM gets a NIC pair, and leaves it out of the host run (`--skip`,
//! so it is neither run nor reported there).

use overlay_common::Counter;
use overlay_tests::{
    IpCounters, agent_binary,
    lab::{Lab, LabSpec, POD_MTU, Underlay},
    require_root,
};

/// The name is what `cargo xtask test` skips on the host (see the module's
/// doc); keep them in step.
#[test]
#[ignore = "needs root and a VM's NIC pair: `cargo xtask test` runs it in its VM stage"]
fn default_flags_decapsulate_before_gro_on_a_vm_nic() {
    require_root();
    let mut spec = LabSpec::new(agent_binary());
    spec.underlay = Underlay::Nic;
    spec.nodes = 2;
    spec.pods_per_node = 1;
    let lab = Lab::start(spec).expect("lab on a NIC pair");
    let log = lab.agent_log(1);
    let attached = log.lines().find(|l| l.contains("datapath attached")).unwrap_or_else(|| panic!("no attachment in the log:\n{log}"));
    assert!(attached.contains("hook=Xdp"), "--decap auto on virtio_net should pick native XDP: {attached}");

    let receiver = lab.nodes[1].pods[0].ns.name().to_owned();
    let before = IpCounters::read(&receiver).expect("the receiving pod's counters");
    let decap_before = lab.counters(1).packets(Counter::Decap);
    let report = lab.iperf3((0, 0), (1, 0), 3).expect("iperf3 pod to pod across the NICs");
    let got = IpCounters::read(&receiver).expect("the receiving pod's counters").since(before);
    let bytes = report["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
    assert!(bytes > 1e6, "iperf3 moved {bytes} bytes: {report}");

    // The wire carries at most POD_MTU bytes of inner packet per frame;
    // GRO before the pod makes the packets its IP takes in several times
    // that. TC decapsulation (after GRO, which has nothing to merge for a
    // UDP port without a socket) leaves them at POD_MTU at most.
    let per_packet = got.in_octets / got.in_receives;
    assert!(
        per_packet > 3.0 * f64::from(POD_MTU),
        "the receiving pod took in {per_packet:.0} bytes per IP packet ({} packets): GRO did not merge what XDP decapsulated",
        got.in_receives
    );
    let counters = lab.counters(1);
    let decapsulated = counters.packets(Counter::Decap) - decap_before;
    assert!(decapsulated as f64 > got.in_receives, "{decapsulated} frames decapsulated for {} merged packets", got.in_receives);
    assert!(counters.packets(Counter::FastpathIn) > 0, "the fast path delivered nothing to the pod");
}
