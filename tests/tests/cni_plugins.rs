//! Pods plumbed by the real CNI plugins flannel's CNI plugin hands its
//! work to (`bridge` with `host-local` IPAM, from
//! containernetworking/plugins, built by `cargo xtask setup`), with the
//! configuration flannel's plugin makes from the agent's subnet.env and
//! deploy/overlay.yaml's `cni-conf.json`, instead of the lab's own
//! plumbing. flannel's CNI plugin itself cannot be built here (the Go
//! module proxy refuses `github.com/flannel-io/cni-plugin`), so its one
//! step, turning subnet.env into the bridge plugin's configuration, is
//! done by [`delegate_conf`] the way its `flannel_linux.go` does.

use std::{
    collections::BTreeMap,
    io::Write as _,
    process::{Command, Stdio},
    time::Duration,
};

use overlay_common::Counter;
use overlay_tests::{
    NetNs, TempDir, agent_binary, cni_plugins_dir,
    lab::{Lab, LabSpec, deploy_manifest},
    require_root,
};
use serde_json::Value;

/// The `delegate` of deploy/overlay.yaml's CNI configuration (what the
/// DaemonSet installs as /etc/cni/net.d/10-flannel.conflist).
fn manifest_delegate() -> Value {
    let text = std::fs::read_to_string(deploy_manifest()).unwrap();
    for document in serde_norway::Deserializer::from_str(&text) {
        let object: Value = serde::Deserialize::deserialize(document).unwrap();
        if object["kind"] == "ConfigMap" {
            let conflist: Value = serde_json::from_str(object["data"]["cni-conf.json"].as_str().unwrap()).unwrap();
            let flannel = conflist["plugins"].as_array().unwrap().iter().find(|p| p["type"] == "flannel").unwrap().clone();
            return flannel["delegate"].clone();
        }
    }
    panic!("no ConfigMap with cni-conf.json in deploy/overlay.yaml");
}

/// What flannel's CNI plugin passes to `bridge`: the manifest's
/// delegate, completed from subnet.env as its `flannel_linux.go` does
/// (name, type bridge, ipMasq the opposite of FLANNEL_IPMASQ, mtu,
/// isGateway, host-local IPAM over FLANNEL_SUBNET's network with a route
/// to FLANNEL_NETWORK). host-local keeps its leases in `data_dir`, not the
/// machine's /var/lib/cni.
fn delegate_conf(subnet_env: &str, data_dir: &std::path::Path) -> Value {
    let env: BTreeMap<&str, &str> = subnet_env.lines().filter_map(|l| l.split_once('=')).collect();
    let mut conf = manifest_delegate();
    let object = conf.as_object_mut().unwrap();
    object.insert("cniVersion".into(), "1.0.0".into());
    object.insert("name".into(), "cbr0".into());
    object.entry("type").or_insert("bridge".into());
    object.entry("ipMasq").or_insert((env["FLANNEL_IPMASQ"] != "true").into());
    object.entry("mtu").or_insert(env["FLANNEL_MTU"].parse::<u32>().unwrap().into());
    object.entry("isGateway").or_insert(true.into());
    // FLANNEL_SUBNET names the gateway (`10.244.1.1/24`); the plugin
    // takes its network, as Go's net.ParseCIDR gives it.
    let subnet: ipnetwork::Ipv4Network = env["FLANNEL_SUBNET"].parse().unwrap();
    let subnet = format!("{}/{}", subnet.network(), subnet.prefix());
    object.insert(
        "ipam".into(),
        serde_json::json!({
            "type": "host-local",
            "ranges": [[{"subnet": subnet}]],
            "routes": [{"dst": env["FLANNEL_NETWORK"]}],
            "dataDir": data_dir,
        }),
    );
    conf
}

/// Runs the bridge plugin (`command` ADD or DEL) in node `i`'s namespace
/// for the pod namespace `pod`; its JSON result for ADD.
fn bridge(lab: &Lab, i: usize, command: &str, pod: &NetNs, conf: &Value) -> Value {
    let plugins = cni_plugins_dir().unwrap_or_else(|e| panic!("{e}"));
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.nodes[i].ns.name()))
        .arg(plugins.join("bridge"))
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", pod.name())
        .env("CNI_NETNS", format!("/run/netns/{}", pod.name()))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", &plugins)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(conf.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "bridge {command} on node{} failed: {stdout}\n{}", i + 1, String::from_utf8_lossy(&out.stderr));
    if command == "ADD" { serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("bridge ADD answered {stdout}: {e}")) } else { Value::Null }
}

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn pods_the_real_bridge_plugin_plumbs_from_our_subnet_env_reach_each_other_on_the_fast_path() {
    require_root();
    let mut spec = LabSpec::new(agent_binary());
    spec.pods_per_node = 0;
    // The agents write subnet.env, as deployed.
    spec.net_conf = true;
    let lab = Lab::start(spec).unwrap_or_else(|e| panic!("lab failed to start: {e}"));
    let data_dir = TempDir::new("ovcni");
    let mut pods = Vec::new();
    for i in 0..2 {
        let subnet_env = std::fs::read_to_string(lab.subnet_file(i)).unwrap();
        let conf = delegate_conf(&subnet_env, &data_dir.path().join(format!("node{}", i + 1)));
        let pod = NetNs::new();
        let result = bridge(&lab, i, "ADD", &pod, &conf);
        let address = result["ips"][0]["address"].as_str().unwrap_or_else(|| panic!("no address in {result}"));
        let ip: std::net::Ipv4Addr = address.split('/').next().unwrap().parse().unwrap();
        let subnet: ipnetwork::Ipv4Network = subnet_env.lines().find_map(|l| l.strip_prefix("FLANNEL_SUBNET=")).unwrap().parse().unwrap();
        assert!(subnet.contains(ip), "node{}'s pod got {ip}, outside its FLANNEL_SUBNET {subnet}", i + 1);
        pods.push((pod, ip, conf));
    }
    // The agents see the new ports on cni0 and enrol them.
    std::thread::sleep(Duration::from_secs(1));
    let before = (lab.counters(0).packets(Counter::FastpathOut), lab.counters(1).packets(Counter::FastpathIn));
    assert!(Lab::ping(&pods[0].0, pods[1].1), "node1's pod to node2's pod:\n{}\n{}", lab.agent_log(0), lab.inspect(0));
    assert!(Lab::ping(&pods[1].0, pods[0].1), "node2's pod to node1's pod:\n{}\n{}", lab.agent_log(1), lab.inspect(1));
    let after = (lab.counters(0).packets(Counter::FastpathOut), lab.counters(1).packets(Counter::FastpathIn));
    assert!(after.0 > before.0 && after.1 > before.1, "the fast path carried nothing between the plugin's pods: {before:?} -> {after:?}\n{}", lab.inspect(0));
    // The plugin's DEL takes the pod's veth off cni0; the other pod is
    // still reached from the node's side.
    for (i, (pod, _, conf)) in pods.iter().enumerate() {
        bridge(&lab, i, "DEL", pod, conf);
    }
}
