//! The Kubernetes node source, end to end: real agents (the real kube
//! client and kube-runtime watcher inside) against the test API server in
//! `overlay_tests::apiserver`, which speaks list/watch/patch as a
//! kube-apiserver does (resourceVersions, bookmarks, 410 Gone). No real
//! kube-apiserver can be installed on these machines.

use std::time::{Duration, Instant};

use overlay_tests::{
    agent_binary,
    lab::{Lab, LabSpec},
    require_root,
};
use serde_json::Value;

fn kube_lab(nodes: usize) -> Lab {
    let mut spec = LabSpec::new(agent_binary());
    spec.nodes = nodes;
    spec.pods_per_node = 1;
    spec.kubernetes = true;
    Lab::start(spec).unwrap_or_else(|e| panic!("lab failed to start: {e}"))
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn annotation(node: &Value, key: &str) -> Option<String> {
    node["metadata"]["annotations"][format!("flannel.alpha.coreos.com/{key}")].as_str().map(str::to_owned)
}

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn agents_publish_their_node_and_follow_adds_updates_and_deletes() {
    require_root();
    let mut lab = kube_lab(3);
    let api = lab.api.as_ref().unwrap();

    // Each agent published flannel's annotations and the condition.
    for i in 0..3 {
        let node = api.get(&lab.nodes[i].name).unwrap();
        assert_eq!(annotation(&node, "backend-type").as_deref(), Some("vxlan"), "{node}");
        assert_eq!(annotation(&node, "kube-subnet-manager").as_deref(), Some("true"));
        assert_eq!(annotation(&node, "public-ip"), Some(lab.nodes[i].ip.to_string()));
        let mac = overlay_agent::node::format_mac(lab.vtep_mac(i));
        assert_eq!(annotation(&node, "backend-data"), Some(format!("{{\"VNI\":1,\"VtepMAC\":\"{mac}\"}}")));
        let conditions = node["status"]["conditions"].as_array().unwrap();
        let network = conditions.iter().find(|c| c["type"] == "NetworkUnavailable").expect("NetworkUnavailable set");
        assert_eq!((network["status"].as_str(), network["reason"].as_str()), (Some("False"), Some("OverlayIsUp")));
        assert!(conditions.iter().any(|c| c["type"] == "Ready"), "kubelet's conditions must survive the patch");
        let env = std::fs::read_to_string(lab.subnet_file(i)).unwrap();
        assert_eq!(
            env,
            format!("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.{}.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n", i + 1)
        );
        assert_eq!(lab.agent_http(i, "/readyz").unwrap().0, 200);
    }
    let (checks, failures) = lab.check_all_pairs();
    assert!(failures.is_empty(), "{} of {checks} checks failed: {failures:?}", failures.len());

    // Delete node3: its peers drop it.
    let node3 = api.delete("node3").unwrap();
    lab.wait_for_routes(0, 1, Duration::from_secs(5)).unwrap();
    lab.wait_for_routes(1, 1, Duration::from_secs(5)).unwrap();
    assert!(!lab.inspect(0).contains("10.244.3.0/24"), "{}", lab.inspect(0));

    // Node3 comes back (as a re-registered kubelet would, without
    // annotations): its agent publishes again and the peers re-add it.
    let mut fresh = node3.clone();
    fresh["metadata"].as_object_mut().unwrap().remove("annotations");
    lab.api.as_ref().unwrap().apply(fresh);
    lab.wait_for_routes(0, 2, Duration::from_secs(10)).unwrap();
    lab.wait_for_routes(1, 2, Duration::from_secs(10)).unwrap();
    assert!(Lab::ping(&lab.nodes[0].pods[0].ns, lab.nodes[2].pods[0].ip));

    // An update that moves node2's advertised VTEP MAC (say, flannel's
    // random one carried over): node2's agent keeps it, and node1 follows.
    lab.stop_agent(1);
    let api = lab.api.as_ref().unwrap();
    let mut node2 = api.get("node2").unwrap();
    node2["metadata"]["annotations"]["flannel.alpha.coreos.com/backend-data"] =
        Value::String("{\"VNI\":1,\"VtepMAC\":\"0a:58:0a:f4:02:01\"}".into());
    api.apply(node2);
    lab.start_agent(1, Duration::from_secs(20)).unwrap();
    wait_until("node1 to use node2's new VtepMAC", Duration::from_secs(5), || lab.inspect(0).contains("0a:58:0a:f4:02:01"));
    assert!(lab.inspect(1).contains("vtep 0a:58:0a:f4:02:01"), "node2 must keep its annotated VtepMAC:\n{}", lab.inspect(1));
    let api = lab.api.as_ref().unwrap();
    assert_eq!(annotation(&api.get("node2").unwrap(), "backend-data").as_deref(), Some("{\"VNI\":1,\"VtepMAC\":\"0a:58:0a:f4:02:01\"}"));
    assert!(Lab::ping(&lab.nodes[0].pods[0].ns, lab.nodes[1].pods[0].ip));

    let metrics = lab.agent_http(0, "/metrics").unwrap().1;
    assert!(metrics.contains("overlay_peers{mode=\"vxlan\"} 2"), "{metrics}");
    assert!(metrics.contains("overlay_datapath_packets_total{path=\"encap\"}"), "{metrics}");
    assert!(metrics.contains("overlay_reconcile_duration_seconds_count"), "{metrics}");
}

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn nodes_deleted_while_the_agent_was_down_are_removed_after_restart() {
    require_root();
    let mut lab = kube_lab(3);
    lab.stop_agent(0);
    lab.api.as_ref().unwrap().delete("node3");
    assert_eq!(lab.agent_routes(0).len(), 2, "the stopped agent's routes stay until it is back");
    lab.start_agent(0, Duration::from_secs(20)).unwrap();
    // Ready means the initial list has been applied: node3 is gone already.
    assert_eq!(lab.agent_routes(0).len(), 1, "stale route left: {:?}", lab.agent_routes(0));
    let inspect = lab.inspect(0);
    assert!(!inspect.contains("10.244.3.0/24") && !inspect.contains("192.168.77.13"), "stale map entries:\n{inspect}");
    assert!(Lab::ping(&lab.nodes[0].pods[0].ns, lab.nodes[1].pods[0].ip));
}

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn cut_and_expired_watches_resume_and_miss_nothing() {
    require_root();
    let mut lab = kube_lab(3);
    let api = lab.api.as_ref().unwrap();

    // Cut every watch mid-stream and change the cluster at once.
    api.cut_watches();
    let node3 = api.delete("node3").unwrap();
    lab.wait_for_routes(0, 1, Duration::from_secs(10)).unwrap();
    lab.wait_for_routes(1, 1, Duration::from_secs(10)).unwrap();

    // Expire the history: watchers get 410 Gone and must relist.
    let api = lab.api.as_ref().unwrap();
    let lists_before = api.requests().iter().filter(|r| r.is_list()).count();
    api.compact();
    api.apply(node3);
    lab.wait_for_routes(0, 2, Duration::from_secs(15)).unwrap();
    lab.wait_for_routes(1, 2, Duration::from_secs(15)).unwrap();
    let api = lab.api.as_ref().unwrap();
    let lists_after = api.requests().iter().filter(|r| r.is_list()).count();
    assert!(lists_after >= lists_before + 2, "both agents must relist after 410 ({lists_before} -> {lists_after} lists)");
    let metrics = lab.agent_http(0, "/metrics").unwrap().1;
    let restarts = metric_value(&metrics, "overlay_watch_restarts_total");
    assert!(restarts.is_some_and(|n| n >= 1.0), "the 410 counts as a watch restart ({restarts:?}):\n{metrics}");
    let (checks, failures) = lab.check_all_pairs();
    assert!(failures.is_empty(), "{} of {checks} checks failed: {failures:?}", failures.len());
}

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn an_api_outage_during_traffic_and_an_agent_restart_loses_nothing() {
    require_root();
    let mut lab = kube_lab(3);
    let mut node3 = None;
    let (sent, received) = lab.ping_during(500, |lab| {
        std::thread::sleep(Duration::from_millis(300));
        lab.api.as_ref().unwrap().set_down(true);
        // While the API is down: node1's agent crashes and restarts (it
        // cannot list; it must adopt its pinned state), and node3 is deleted.
        lab.kill_agent(0);
        lab.launch_agent(0).unwrap();
        node3 = lab.api.as_ref().unwrap().delete("node3");
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(lab.agent_routes(0).len(), 2, "without the API nothing changes");
        assert_eq!(lab.agent_http(0, "/healthz").unwrap().0, 200);
        assert_eq!(lab.agent_http(0, "/readyz").unwrap().0, 503, "not ready before the initial sync");
        lab.api.as_ref().unwrap().set_down(false);
    });
    eprintln!("ping every 10 ms through the outage: {received}/{sent} received");
    assert_eq!((sent, received), (500, 500), "packets lost during the outage");
    let node3 = node3.expect("node3 existed");

    // Missed while down, applied after the relist.
    lab.wait_for_routes(0, 1, Duration::from_secs(40)).unwrap();
    lab.wait_for_routes(1, 1, Duration::from_secs(40)).unwrap();
    wait_until("node1 ready", Duration::from_secs(40), || lab.agent_http(0, "/readyz").is_ok_and(|(s, _)| s == 200));
    let metrics = lab.agent_http(1, "/metrics").unwrap().1;
    let restarts = metric_value(&metrics, "overlay_watch_restarts_total");
    assert!(restarts.is_some_and(|n| n >= 1.0), "the outage counts as watch restarts ({restarts:?}):\n{metrics}");
    lab.api.as_ref().unwrap().apply(node3);
    lab.wait_for_routes(0, 2, Duration::from_secs(10)).unwrap();
}

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn pod_cidrs_outside_the_network_are_refused_with_an_event() {
    require_root();
    let mut lab = kube_lab(2);
    let api = lab.api.as_ref().unwrap();
    let mut stray = lab.node_object(1);
    stray["metadata"]["name"] = "stray".into();
    stray["spec"]["podCIDR"] = "10.99.0.0/24".into();
    stray["spec"]["podCIDRs"] = serde_json::json!(["10.99.0.0/24"]);
    stray["status"]["addresses"][0]["address"] = "192.168.77.99".into();
    stray["metadata"]["annotations"] = serde_json::json!({
        "flannel.alpha.coreos.com/kube-subnet-manager": "true",
        "flannel.alpha.coreos.com/backend-type": "vxlan",
        "flannel.alpha.coreos.com/backend-data": "{\"VNI\":1,\"VtepMAC\":\"0a:00:00:00:00:99\"}",
    });
    api.apply(stray);
    wait_until("a warning event about node stray", Duration::from_secs(10), || {
        lab.api.as_ref().unwrap().events().iter().any(|e| e["regarding"]["name"] == "stray" && e["reason"] == "PodCIDROutsideNetwork")
    });
    let event = lab.api.as_ref().unwrap().events().into_iter().find(|e| e["regarding"]["name"] == "stray").unwrap();
    assert_eq!(event["type"], "Warning");
    assert!(event["note"].as_str().unwrap().contains("outside the cluster Network 10.244.0.0/16"), "{event}");
    assert!(lab.agent_log(0).contains("node=stray"), "the log must name it too:\n{}", lab.agent_log(0));
    assert_eq!(lab.agent_routes(0).len(), 1, "the stray node must not be programmed");
    assert!(lab.wait_for_routes(0, 1, Duration::from_millis(10)).is_ok());
}

/// The value of an unlabelled metric in Prometheus' text format; `None`
/// when it is missing, so a check cannot pass on its absence.
fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.split_whitespace().next()?.parse().ok())
}

#[test]
fn metric_values_are_read_not_guessed() {
    let text = "# TYPE overlay_watch_restarts counter\noverlay_watch_restarts_total 3\noverlay_watch_restarts_total_x 9\n";
    assert_eq!(metric_value(text, "overlay_watch_restarts_total"), Some(3.0));
    assert_eq!(metric_value("", "overlay_watch_restarts_total"), None, "a missing metric is not a value");
}
