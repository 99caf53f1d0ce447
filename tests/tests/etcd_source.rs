//! flannel's etcd mode (`overlay-agent run --etcd-endpoints`) against a
//! real etcd: agents hold flanneld-format leases and follow everyone's;
//! leases added, changed, deleted or expired change the peers; our own
//! lease deleted is put back, but our subnet taken by another node is
//! left to it, and no free subnet left stops the agent; etcd going away
//! leaves the datapath alone and the agents resume when it returns.

use std::time::{Duration, Instant};

use overlay_tests::{
    PinDir, agent_binary,
    etcd::{Etcd, EtcdTls},
    lab::{ChildGuard, ETCD_PREFIX, Frozen, Lab, LabSpec},
    require_root,
};

fn etcd_lab(members: usize) -> Lab {
    let mut spec = LabSpec::new(agent_binary());
    spec.etcd_members = members;
    Lab::start(spec).unwrap_or_else(|e| panic!("lab failed to start: {e}"))
}

fn etcd(lab: &Lab) -> &Etcd {
    lab.etcd.as_ref().expect("the lab's etcd")
}

fn lease_key(subnet: &str) -> String {
    format!("{ETCD_PREFIX}/subnets/{subnet}")
}

/// The value at `key`, if any.
fn lease_value(lab: &Lab, key: &str) -> Option<String> {
    etcd(lab).list(key).unwrap().into_iter().find(|l| l.0 == key).map(|l| l.1)
}

/// Writes a flanneld-format VXLAN lease for `subnet` (as flanneld names
/// it: `10.244.9.0-24`) of a node at 192.168.77.99, which no lab node is.
fn put_lease(lab: &Lab, subnet: &str, vtep_mac: &str, ttl: Option<Duration>) {
    let value = format!(r#"{{"PublicIP":"192.168.77.99","BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{vtep_mac}"}}}}"#);
    etcd(lab).put(&lease_key(subnet), &value, ttl).unwrap();
}

/// Waits until `done` holds on every agent's `inspect`, or panics with the
/// first agent's.
fn wait_for_inspect(lab: &Lab, what: &str, done: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    for i in 0..lab.nodes.len() {
        loop {
            let text = lab.inspect(i);
            if done(&text) {
                break;
            }
            assert!(Instant::now() < deadline, "{what}: not seen by node{} in 15 s:\n{text}\n{}", i + 1, lab.agent_log(i));
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Waits until every agent (flanneld's nodes are not looked at) routes to
/// the other lab nodes and to `leases` nodes that only have a lease.
fn wait_for_peers_everywhere(lab: &mut Lab, leases: usize) {
    let count = lab.nodes.len() - 1 + leases;
    let ours: Vec<usize> = (0..lab.nodes.len()).filter(|&i| !lab.nodes[i].flannel).collect();
    for i in ours {
        lab.wait_for_routes(i, count, Duration::from_secs(15)).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn agents_hold_flanneld_leases_and_reach_each_other() {
    require_root();
    let lab = etcd_lab(1);
    let leases = etcd(&lab).list(&format!("{ETCD_PREFIX}/subnets/")).unwrap();
    assert_eq!(leases.len(), lab.nodes.len(), "{leases:#?}");
    for (i, node) in lab.nodes.iter().enumerate() {
        // The subnet of the node's subnet.env, reclaimed as flanneld does.
        let key = lease_key(&format!("10.244.{}.0-24", i + 1));
        let (_, value, ttl) = leases.iter().find(|l| l.0 == key).unwrap_or_else(|| panic!("no {key}: {leases:#?}"));
        let value: serde_json::Value = serde_json::from_str(value).unwrap();
        let mac = overlay_agent::node::format_mac(lab.vtep_mac(i));
        assert_eq!(
            value,
            serde_json::json!({"PublicIP": node.ip.to_string(), "PublicIPv6": null, "BackendType": "vxlan", "BackendData": {"VNI": 1, "VtepMAC": mac}}),
            "{key}"
        );
        // flanneld's 24 h lease.
        assert!((86_400 - 120..=86_400).contains(ttl), "{key}: TTL {ttl}");
        // Written once, and known as ours from the first snapshot on.
        let log = lab.agent_log(i);
        assert!(!log.contains("missing from etcd") && !log.contains("our own node) among the nodes"), "node{}:\n{log}", i + 1);
    }
    lab.assert_all_pairs("all pairs");
}

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn leases_added_changed_deleted_or_expired_change_the_peers() {
    require_root();
    let mut lab = etcd_lab(1);

    put_lease(&lab, "10.244.9.0-24", "0a:fe:00:00:00:99", None);
    wait_for_peers_everywhere(&mut lab, 1);
    wait_for_inspect(&lab, "added lease", |t| t.contains("0a:fe:00:00:00:99"));

    put_lease(&lab, "10.244.9.0-24", "0a:fe:00:00:00:98", None);
    wait_for_inspect(&lab, "changed VtepMAC", |t| t.contains("0a:fe:00:00:00:98") && !t.contains("0a:fe:00:00:00:99"));

    etcd(&lab).delete(&lease_key("10.244.9.0-24")).unwrap();
    wait_for_peers_everywhere(&mut lab, 0);

    // A lease with host bits is named in the log and skipped.
    etcd(&lab).put(&lease_key("10.244.10.5-24"), r#"{"PublicIP":"192.168.77.98","BackendType":"vxlan"}"#, None).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lab.agent_log(0).contains("10.244.10.5-24") {
        assert!(Instant::now() < deadline, "bad lease not reported:\n{}", lab.agent_log(0));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(lab.agent_log(0).contains("use 10.244.10.0/24"), "{}", lab.agent_log(0));
    assert_eq!(lab.agent_routes(0).len(), lab.nodes.len() - 1);

    // A lease that is not renewed expires, and its peer goes. Its TTL
    // leaves every agent time to be seen holding the peer first, one
    // after the other, on a loaded machine too.
    put_lease(&lab, "10.244.11.0-24", "0a:fe:00:00:00:97", Some(Duration::from_secs(10)));
    wait_for_peers_everywhere(&mut lab, 1);
    let added = Instant::now();
    wait_for_peers_everywhere(&mut lab, 0);
    eprintln!("expired lease's peer removed {:?} after it was seen", added.elapsed());
    lab.assert_all_pairs("all pairs");
}

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn a_deleted_lease_is_put_back_and_a_taken_subnet_is_left_to_its_holder() {
    require_root();
    let mut lab = etcd_lab(1);
    let key = lease_key("10.244.1.0-24");
    let ours = lease_value(&lab, &key).unwrap_or_else(|| panic!("node1 holds no {key}"));

    // Deleted (flanneld would exit): written again, the same, and our
    // own node never leaves the agent's view meanwhile.
    let own_node_missing = |lab: &Lab| lab.agent_log(0).matches("no Node named \"node1\" (our own node)").count();
    let missing_before = own_node_missing(&lab);
    etcd(&lab).delete(&key).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while lease_value(&lab, &key).as_ref() != Some(&ours) {
        assert!(Instant::now() < deadline, "{key} not written again: {:?}\n{}", lease_value(&lab, &key), lab.agent_log(0));
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(own_node_missing(&lab), missing_before, "our node went missing:\n{}", lab.agent_log(0));
    assert!(lab.agent_running(0), "{}", lab.agent_log(0));

    // Another node's lease over ours (it took the subnet while ours was
    // gone): left alone; the agent says why and stops.
    let theirs = r#"{"PublicIP":"192.168.77.99","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0a:fe:00:00:00:99"}}"#;
    etcd(&lab).put(&key, theirs, None).unwrap();
    let status = lab.wait_for_agent_exit(0, Duration::from_secs(15)).unwrap_or_else(|e| panic!("{e}"));
    assert!(!status.success(), "{status}");
    let log = lab.agent_log(0);
    assert!(log.contains("our subnet lease 10.244.1.0-24 now belongs to another node (PublicIP 192.168.77.99)"), "{log}");
    assert_eq!(lease_value(&lab, &key).as_deref(), Some(theirs), "{log}");
    assert!(lab.agent_running(1), "node2's agent: {}", lab.agent_log(1));
}

/// Our lease gone while the agent was not watching (etcd restarted during
/// a pause, the lease deleted and the deletion compacted out of etcd's
/// history before the agent watches again):
/// the agent lists again and must write it back at once, not at its next
/// scheduled renewal a day later. Meanwhile every other node would drop its
/// routes to us, and our subnet would be free for another node to take.
#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn our_lease_gone_while_the_agent_was_not_watching_is_written_again() {
    require_root();
    let mut lab = etcd_lab(1);
    let key = lease_key("10.244.1.0-24");
    let ours = lease_value(&lab, &key).unwrap_or_else(|| panic!("node1 holds no {key}"));
    let frozen = Frozen::agent(&lab, 0);
    // etcd restarted first, so the agent's watch cannot bring the
    // deletion: its connection is gone when it wakes.
    lab.etcd.as_mut().unwrap().kill_member(0);
    lab.etcd.as_mut().unwrap().start_member(0).unwrap();
    etcd(&lab).wait_healthy(Duration::from_secs(20)).unwrap();
    etcd(&lab).delete(&key).unwrap();
    etcd(&lab).compact().unwrap();
    drop(frozen);
    let deadline = Instant::now() + Duration::from_secs(15);
    while lease_value(&lab, &key).as_ref() != Some(&ours) {
        assert!(Instant::now() < deadline, "{key} not written again in 15 s: {:?}
{}", lease_value(&lab, &key), lab.agent_log(0));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(lab.agent_running(0), "{}", lab.agent_log(0));
    assert!(lab.agent_log(0).contains("our subnet lease is missing from etcd; writing it again"), "{}", lab.agent_log(0));
    wait_for_peers_everywhere(&mut lab, 0);
}

/// No free subnet left for an agent (its lease gone, every subnet the
/// net-conf allows leased to another node): it says so and exits 1, as
/// flanneld does (shown failing before: it retried every second, logging
/// that etcd was failing, and still ran after 15 s).
#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn an_agent_finding_no_free_subnet_says_so_and_exits() {
    require_root();
    let mut lab = etcd_lab(1);
    lab.stop_agent(0);
    // Node 2 holds 10.244.2.0/24, the only subnet this config allows.
    let config = r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.2.0","SubnetMax":"10.244.2.0","Backend":{"Type":"vxlan"}}"#;
    etcd(&lab).put(&format!("{ETCD_PREFIX}/config"), config, None).unwrap();
    etcd(&lab).delete(&lease_key("10.244.1.0-24")).unwrap();
    lab.launch_agent(0).unwrap();
    let status = lab.wait_for_agent_exit(0, Duration::from_secs(15)).unwrap_or_else(|e| panic!("{e}"));
    let log = lab.agent_log(0);
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("no free /24 subnet left between SubnetMin 10.244.2.0 and SubnetMax 10.244.2.0"), "{log}");
    assert!(!log.contains("etcd unreachable"), "taken for an etcd failure:\n{log}");
    let node2 = etcd(&lab).list(&lease_key("10.244.2.0-24")).unwrap();
    assert!(node2.first().is_some_and(|lease| lease.1.contains("192.168.77.12")), "node2's lease: {node2:?}");
}

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn an_etcd_outage_keeps_the_datapath_and_the_agents_resume() {
    require_root();
    let mut lab = etcd_lab(1);
    // What the agents logged before the outage is not about it.
    let before: Vec<usize> = (0..lab.nodes.len()).map(|i| lab.agent_log(i).len()).collect();
    let (sent, received) = lab.ping_during(500, |lab| {
        lab.etcd.as_mut().unwrap().kill_member(0);
        std::thread::sleep(Duration::from_secs(3));
        lab.etcd.as_mut().unwrap().start_member(0).unwrap();
    });
    eprintln!("etcd restart: {sent} sent, {received} received");
    assert!(sent >= 400, "ping did not run: {sent}");
    assert_eq!(sent, received, "pings lost while etcd was down");
    etcd(&lab).wait_healthy(Duration::from_secs(20)).unwrap();
    for i in 0..lab.nodes.len() {
        let log = lab.agent_log(i);
        assert!(lab.agent_running(i) && log[before[i]..].contains("etcd unreachable"), "node{}: {log}", i + 1);
    }
    // The watches resumed: a lease written now reaches every agent.
    put_lease(&lab, "10.244.9.0-24", "0a:fe:00:00:00:99", None);
    wait_for_peers_everywhere(&mut lab, 1);
}

/// etcd set up as flannel's etcd deployments are: clients over TLS only,
/// with a client certificate of the cluster's CA. Agents given the CA and
/// a client certificate (`--etcd-cafile`, `--etcd-certfile`,
/// `--etcd-keyfile`, flanneld's flags) hold their leases and follow each
/// other's, beside real flanneld (with the same files); an agent given
/// no client certificate, or another CA, says what failed.
#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn agents_and_flanneld_use_an_etcd_that_requires_client_certificates() {
    require_root();
    let mut spec = LabSpec::new(agent_binary());
    spec.etcd_tls = true;
    spec.flannel_nodes = 1;
    spec.real_flannel = true;
    let mut lab = Lab::start(spec).unwrap_or_else(|e| panic!("lab failed to start: {e}"));
    assert!(etcd(&lab).endpoints().starts_with("https://"), "{}", etcd(&lab).endpoints());
    wait_for_peers_everywhere(&mut lab, 0);
    lab.assert_all_pairs("over a TLS etcd");
    let leases = etcd(&lab).list(&format!("{ETCD_PREFIX}/subnets/")).unwrap();
    assert_eq!(leases.len(), lab.nodes.len(), "one lease per node: {leases:?}");

    // Agents with the wrong files wait for etcd without touching anything,
    // and say what to give them.
    let tls = etcd(&lab).tls.clone().unwrap();
    let other = EtcdTls::make(&lab.work_dir().join("other-ca"), &["192.0.2.1".parse().unwrap()]).unwrap();
    let path = |p: &std::path::Path| p.display().to_string();
    let cases: [(&str, Vec<String>, &[&str]); 4] = [
        ("no CA", vec![], &["not one the agent trusts", "--etcd-cafile"]),
        ("another CA", vec!["--etcd-cafile".into(), path(&other.ca), "--etcd-certfile".into(), path(&tls.client_cert), "--etcd-keyfile".into(), path(&tls.client_key)], &["not one the agent trusts", "--etcd-cafile"]),
        ("no client certificate", vec!["--etcd-cafile".into(), path(&tls.ca)], &["--etcd-certfile", "--trusted-ca-file"]),
        ("another CA's client certificate", vec!["--etcd-cafile".into(), path(&tls.ca), "--etcd-certfile".into(), path(&other.client_cert), "--etcd-keyfile".into(), path(&other.client_key)], &["--etcd-certfile", "--trusted-ca-file"]),
    ];
    for (what, files, needed) in cases {
        let root = PinDir::new();
        let mut agent = ChildGuard(
            std::process::Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", lab.nodes[0].ns.name()))
                .arg(agent_binary())
                .args(["run", "--node-name", "node1", "--iface", "eth0", "--metrics-addr", "127.0.0.1:0", "--etcd-endpoints", &etcd(&lab).endpoints()])
                .arg("--bpffs-root")
                .arg(root.path())
                .args(&files)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap(),
        );
        std::thread::sleep(overlay_tests::scaled(Duration::from_secs(3)));
        assert!(agent.0.try_wait().unwrap().is_none(), "{what}: the agent must wait for etcd, not exit");
        let _ = agent.0.kill();
        let out = agent.into_inner().wait_with_output().unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        // One warning per retry, each with what that attempt met; the
        // hint must come with them.
        let warnings: Vec<&str> = log.lines().filter(|l| l.contains("waiting for etcd's network config")).collect();
        assert!(!warnings.is_empty(), "{what}: no warning:\n{log}");
        let hinted = warnings.iter().find(|w| needed.iter().all(|n| w.contains(n)));
        eprintln!("{what}: {}", hinted.unwrap_or(&warnings[0]));
        assert!(hinted.is_some(), "{what}: no warning says {needed:?}:\n{}", warnings.join("\n"));
        assert!(!root.path().exists(), "{what}: an agent waiting for etcd must pin nothing");
    }
}

/// A healthy etcd (3.4, with its default `--grpc-keepalive-min-time` of
/// 5 s) keeps every agent's connection: no warning, no watch started
/// again. A client pinging more often is told to calm down and cut off.
#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn a_healthy_etcd_keeps_every_agents_connection() {
    require_root();
    let lab = etcd_lab(1);
    std::thread::sleep(Duration::from_secs(25));
    for i in 0..lab.nodes.len() {
        let log = lab.agent_log(i);
        assert!(!log.contains("etcd unreachable"), "node{} lost etcd while it was healthy:\n{log}", i + 1);
    }
}

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn a_three_member_etcd_losing_one_member_changes_nothing() {
    require_root();
    let mut lab = etcd_lab(3);
    let (sent, received) = lab.ping_during(300, |lab| lab.etcd.as_mut().unwrap().kill_member(0));
    assert_eq!(sent, received, "pings lost when an etcd member died");
    // The quorum of two still serves, and the agents follow through it.
    put_lease(&lab, "10.244.9.0-24", "0a:fe:00:00:00:99", None);
    wait_for_peers_everywhere(&mut lab, 1);
    etcd(&lab).delete(&lease_key("10.244.9.0-24")).unwrap();
    wait_for_peers_everywhere(&mut lab, 0);
}
