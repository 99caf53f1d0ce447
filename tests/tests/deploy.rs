//! `deploy/overlay.yaml` passes a client-side schema check (no kubectl or
//! API server here): every document decodes into its Kubernetes type, no
//! field is unknown to that type (a typo would be silently dropped by the
//! API server), and what the manifests promise matches the agent: flags it
//! accepts, the probe port and paths it serves, the RBAC it needs, the
//! net-conf.json it parses.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use clap::{CommandFactory as _, Parser as _};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Namespace, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
    },
    serde::{Serialize, de::DeserializeOwned},
};
use overlay_agent::cli::Cli;
use serde_json::Value;

/// The long flags `overlay-agent <command>` accepts, from its definition.
fn long_flags(command: &str) -> BTreeSet<String> {
    let cli = Cli::command();
    let sub = cli.find_subcommand(command).unwrap_or_else(|| panic!("overlay-agent has no subcommand {command}"));
    sub.get_arguments().filter_map(|a| a.get_long()).map(|l| format!("--{l}")).collect()
}

/// `args` parse as the agent's command line would (flags and values).
fn assert_parses(args: &[String]) {
    let argv = std::iter::once("overlay-agent".to_owned()).chain(args.iter().cloned());
    if let Err(err) = Cli::try_parse_from(argv) {
        panic!("overlay-agent {} is refused: {err}", args.join(" "));
    }
}

fn manifests() -> Vec<Value> {
    manifests_in("overlay.yaml")
}

fn manifests_in(file: &str) -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| {
            let value: serde_norway::Value = serde::Deserialize::deserialize(doc).expect("YAML document");
            serde_json::to_value(value).expect("YAML as JSON")
        })
        .collect()
}

/// Paths in `original` that the typed round trip lost: fields the type
/// does not know.
fn unknown_fields(original: &Value, round_trip: &Value, at: &str, out: &mut Vec<String>) {
    match (original, round_trip) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                match b.get(key) {
                    Some(other) => unknown_fields(value, other, &format!("{at}.{key}"), out),
                    None => out.push(format!("{at}.{key}")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                unknown_fields(x, y, &format!("{at}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn strict<T: DeserializeOwned + Serialize>(doc: &Value) -> T {
    let kind = doc["kind"].as_str().unwrap_or("?");
    let typed: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{kind}: {e}"));
    let mut unknown = Vec::new();
    unknown_fields(doc, &serde_json::to_value(&typed).unwrap(), kind, &mut unknown);
    assert!(unknown.is_empty(), "fields unknown to {kind}: {unknown:?}");
    typed
}

#[test]
fn every_document_is_a_valid_object_of_its_kind() {
    let docs = manifests();
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ConfigMap", "DaemonSet"]);
    for doc in &docs {
        match doc["kind"].as_str().unwrap() {
            "Namespace" => drop(strict::<Namespace>(doc)),
            "ServiceAccount" => drop(strict::<ServiceAccount>(doc)),
            "ClusterRole" => drop(strict::<ClusterRole>(doc)),
            "ClusterRoleBinding" => drop(strict::<ClusterRoleBinding>(doc)),
            "Role" => drop(strict::<Role>(doc)),
            "RoleBinding" => drop(strict::<RoleBinding>(doc)),
            "ConfigMap" => drop(strict::<ConfigMap>(doc)),
            "DaemonSet" => drop(strict::<DaemonSet>(doc)),
            other => panic!("unexpected kind {other}"),
        }
    }
}

#[test]
fn the_schema_check_catches_a_misspelt_field() {
    let mut docs = manifests();
    let ds = docs.iter_mut().find(|d| d["kind"] == "DaemonSet").unwrap();
    ds["spec"]["template"]["spec"]["hostNetwrk"] = Value::Bool(true);
    let result = std::panic::catch_unwind(|| strict::<DaemonSet>(ds));
    assert!(result.is_err(), "a misspelt field must be reported");
}

fn find<T: DeserializeOwned + Serialize>(kind: &str) -> T {
    strict(manifests().iter().find(|d| d["kind"] == kind).unwrap())
}

#[test]
fn the_daemonset_matches_what_the_agent_needs() {
    let ds: DaemonSet = find("DaemonSet");
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.service_account_name.as_deref(), Some("overlay-agent"));
    let agent = pod.containers.iter().find(|c| c.name == "agent").unwrap();
    assert_eq!(agent.security_context.as_ref().and_then(|s| s.privileged), Some(true));
    let env = agent.env.as_ref().unwrap();
    let node_name = env.iter().find(|e| e.name == "NODE_NAME").expect("NODE_NAME");
    assert_eq!(
        node_name.value_from.as_ref().and_then(|v| v.field_ref.as_ref()).map(|f| f.field_path.as_str()),
        Some("spec.nodeName")
    );

    // Every flag is one `overlay-agent run` accepts.
    let args = agent.args.as_ref().unwrap();
    assert_eq!(args[0], "run");
    assert_parses(args);
    let known = long_flags("run");
    let mut flags = BTreeMap::new();
    for arg in &args[1..] {
        let (flag, value) = arg.split_once('=').unwrap_or((arg, ""));
        assert!(known.contains(flag), "overlay-agent run has no {flag}");
        flags.insert(flag.to_owned(), value.to_owned());
    }
    let port: i32 = flags["--metrics-addr"].rsplit(':').next().unwrap().parse().unwrap();
    // The migration guide starts this DaemonSet on nodes flanneld still
    // serves: without the flag the agent refuses to start beside
    // flannel.1 (flannel_interop.rs migrates a node with it).
    assert!(flags.contains_key("--remove-flannel-device"), "the DaemonSet's agent cannot take over a flannel node: {args:?}");

    // Probes hit the agent's endpoints on its port.
    for (probe, path) in [(&agent.liveness_probe, "/healthz"), (&agent.readiness_probe, "/readyz")] {
        let get = probe.as_ref().and_then(|p| p.http_get.as_ref()).expect("httpGet probe");
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(get.port, k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(port));
    }

    // Mounts: bpffs (shared with the host, so pins outlive the pod), the
    // subnet.env directory, and the config the flags point at.
    let mounts: BTreeMap<&str, &str> = agent
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .map(|m| (m.mount_path.as_str(), m.name.as_str()))
        .collect();
    let volumes = pod.volumes.as_ref().unwrap();
    let host_path = |name: &str| volumes.iter().find(|v| v.name == name).and_then(|v| v.host_path.as_ref()).map(|h| h.path.clone());
    assert_eq!(host_path(mounts["/sys/fs/bpf"]).as_deref(), Some("/sys/fs/bpf"));
    let bpffs = agent.volume_mounts.as_ref().unwrap().iter().find(|m| m.mount_path == "/sys/fs/bpf").unwrap();
    assert_eq!(bpffs.mount_propagation.as_deref(), Some("Bidirectional"));
    assert!(flags["--bpffs-root"].starts_with("/sys/fs/bpf/"));
    assert_eq!(host_path(mounts["/run/flannel"]).as_deref(), Some("/run/flannel"));
    assert_eq!(flags["--subnet-file"], "/run/flannel/subnet.env");
    let conf_dir = Path::new(&flags["--net-conf"]).parent().unwrap().to_str().unwrap();
    let conf_volume = volumes.iter().find(|v| v.name == mounts[conf_dir]).unwrap();
    assert_eq!(conf_volume.config_map.as_ref().map(|c| c.name.as_str()), Some("overlay-cfg"));
}

#[test]
fn the_configmap_holds_a_net_conf_the_agent_accepts() {
    let cm: ConfigMap = find("ConfigMap");
    let data = cm.data.unwrap();
    let dir = overlay_tests::TempDir::new("netconf");
    let path = dir.path().join("net-conf.json");
    std::fs::write(&path, &data["net-conf.json"]).unwrap();
    let conf = overlay_agent::netconf::NetConf::read(&path);
    let conf = conf.unwrap();
    assert_eq!(conf.network.to_string(), "10.244.0.0/16");
    let cni: Value = serde_json::from_str(&data["cni-conf.json"]).expect("cni-conf.json is JSON");
    assert_eq!(cni["plugins"][0]["type"], "flannel");
}

#[test]
fn rbac_grants_what_the_agent_calls_and_binds_its_service_account() {
    let role: ClusterRole = find("ClusterRole");
    let allows = |group: &str, resource: &str, verb: &str| {
        role.rules.iter().flatten().any(|r| {
            r.api_groups.iter().flatten().any(|g| g == group)
                && r.resources.iter().flatten().any(|x| x == resource)
                && r.verbs.iter().any(|v| v == verb)
        })
    };
    for verb in ["get", "list", "watch"] {
        assert!(allows("", "nodes", verb), "nodes {verb}");
    }
    // flannel's RBAC: annotations go through the status subresource too.
    assert!(!allows("", "nodes", "patch"), "the agent patches only nodes/status");
    assert!(allows("", "nodes/status", "patch"));
    // Events only in `default`, where a Node's go: a Role there.
    assert!(!allows("events.k8s.io", "events", "create"), "events in every namespace");
    let events: Role = find("Role");
    assert_eq!(events.metadata.namespace.as_deref(), Some("default"));
    assert!(events.rules.iter().flatten().any(|r| r.api_groups.iter().flatten().any(|g| g == "events.k8s.io")
        && r.resources.iter().flatten().any(|x| x == "events")
        && r.verbs.iter().any(|v| v == "create")));
    let binding: ClusterRoleBinding = find("ClusterRoleBinding");
    assert_eq!(binding.role_ref.name, "overlay-agent");
    let subject = &binding.subjects.unwrap()[0];
    assert_eq!((subject.kind.as_str(), subject.name.as_str(), subject.namespace.as_deref()), ("ServiceAccount", "overlay-agent", Some("overlay-system")));
    let binding: RoleBinding = find("RoleBinding");
    assert_eq!((binding.metadata.namespace.as_deref(), binding.role_ref.kind.as_str(), binding.role_ref.name.as_str()), (Some("default"), "Role", "overlay-agent-events"));
    let subject = &binding.subjects.unwrap()[0];
    assert_eq!((subject.kind.as_str(), subject.name.as_str(), subject.namespace.as_deref()), ("ServiceAccount", "overlay-agent", Some("overlay-system")));
}

#[test]
fn a_kernel_check_keeps_the_agent_off_nodes_it_cannot_run_on() {
    let ds: DaemonSet = find("DaemonSet");
    let pod = ds.spec.unwrap().template.spec.unwrap();
    let agent = pod.containers.iter().find(|c| c.name == "agent").unwrap();
    let inits = pod.init_containers.as_ref().expect("init containers");
    let check = inits.iter().find(|c| c.name == "kernel-check").expect("a kernel-check init container");
    assert_eq!(check.image, agent.image, "the check runs the agent's own image");
    let args = check.args.as_ref().unwrap();
    assert_eq!(args[0], "kernel-check");
    let out = std::process::Command::new(overlay_tests::agent_binary()).args(args).output().unwrap();
    assert!(out.status.success(), "this (6.1+) kernel must pass: {}", String::from_utf8_lossy(&out.stderr));
    // The gate is the oldest kernel the project tests on (Debian 12's 6.1,
    // the VM stage's), no newer: a node with it runs the agent.
    let min = &args[args.iter().position(|a| a == "--min").expect("--min") + 1];
    let gate = overlay_agent::preflight::major_minor(min).expect("MAJOR.MINOR");
    assert_eq!(gate, overlay_agent::preflight::DEPLOYED_MINIMUM, "--min {min}");
    assert!(overlay_agent::preflight::check_release("6.1.0-57-cloud-amd64", gate).is_ok(), "--min {min} keeps the agent off Debian 12's 6.1, which the VM stage tests");
    let mut too_new = args.clone();
    too_new.splice(1.., ["--min".to_owned(), "999.0".to_owned()]);
    let out = std::process::Command::new(overlay_tests::agent_binary()).args(&too_new).output().unwrap();
    assert!(!out.status.success(), "an older kernel than --min must fail the init container");
    // The flannel CNI plugin image flannel v0.28.9's manifest names.
    for init in inits.iter().filter(|c| c.name.starts_with("install-cni")) {
        assert_eq!(init.image.as_deref(), Some("ghcr.io/flannel-io/flannel-cni-plugin:v1.9.1-flannel3"));
    }
    // iptables' lock is the host's, shared with kube-proxy and Docker.
    let lock = agent.volume_mounts.as_ref().unwrap().iter().find(|m| m.mount_path == "/run/xtables.lock").expect("xtables lock");
    let volume = pod.volumes.as_ref().unwrap().iter().find(|v| v.name == lock.name).unwrap();
    assert_eq!(volume.host_path.as_ref().map(|h| h.path.as_str()), Some("/run/xtables.lock"));
}

#[test]
fn the_uninstall_daemonset_runs_cleanup_on_the_hosts_state() {
    let docs = manifests_in("uninstall.yaml");
    assert_eq!(docs.len(), 1);
    let uninstall: DaemonSet = strict(&docs[0]);
    let installed: DaemonSet = find("DaemonSet");
    let installed_pod = installed.spec.unwrap().template.spec.unwrap();
    let agent = installed_pod.containers.iter().find(|c| c.name == "agent").unwrap();
    let pod = uninstall.spec.unwrap().template.spec.unwrap();
    let cleanup = pod.init_containers.as_ref().unwrap().iter().find(|c| c.name == "cleanup").expect("a cleanup init container");
    assert_eq!(cleanup.image, agent.image);
    assert_eq!(cleanup.security_context.as_ref().and_then(|s| s.privileged), Some(true));
    let args = cleanup.args.as_ref().unwrap();
    assert_eq!(args[0], "cleanup");
    assert_parses(args);
    let known = long_flags("cleanup");
    let flags: BTreeMap<&str, &str> = args[1..].iter().map(|a| a.split_once('=').unwrap_or((a, ""))).collect();
    for flag in flags.keys() {
        assert!(known.contains(*flag), "overlay-agent cleanup has no {flag}");
    }
    // The same pins, subnet.env and CNI config the agent's DaemonSet uses.
    let agent_args = agent.args.as_ref().unwrap();
    assert!(agent_args.contains(&format!("--bpffs-root={}", flags["--bpffs-root"])));
    assert!(agent_args.contains(&format!("--subnet-file={}", flags["--subnet-file"])));
    let install_cni = installed_pod.init_containers.as_ref().unwrap().iter().find(|c| c.name == "install-cni").unwrap();
    assert_eq!(install_cni.command.as_ref().unwrap().last().map(String::as_str), Some(flags["--cni-conf"]));
    let volumes = pod.volumes.as_ref().unwrap();
    let host_path_of = |mount_path: &str| {
        let mount = cleanup.volume_mounts.as_ref().unwrap().iter().find(|m| m.mount_path == mount_path).unwrap_or_else(|| panic!("no mount at {mount_path}"));
        volumes.iter().find(|v| v.name == mount.name).and_then(|v| v.host_path.as_ref()).map(|h| h.path.clone())
    };
    assert_eq!(host_path_of("/sys/fs/bpf").as_deref(), Some("/sys/fs/bpf"), "the host's bpffs");
    assert_eq!(host_path_of("/run/flannel").as_deref(), Some("/run/flannel"));
    assert_eq!(host_path_of("/etc/cni/net.d").as_deref(), Some("/etc/cni/net.d"));
}
