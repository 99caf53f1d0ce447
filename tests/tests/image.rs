//! The agent's container image: built by `deploy/build-image.sh` from
//! `deploy/Containerfile` with no registry, holding the agent and the
//! commands it runs and nothing more, then run with podman as every agent
//! of a lab, which must forward all pairs.
//!
//! This machine's podman needs two things spelled out: runc (crun 1.8
//! refuses this host's hybrid cgroup layout, "cgroups in hybrid mode not
//! supported"), and rlimits within the caller's hard limits (podman's
//! default `nofile` of 1048576 is above them, and raising a limit is
//! refused: "error setting rlimits for ready process ... operation not
//! permitted").

use std::{os::unix::fs::PermissionsExt as _, path::Path, process::Command};

use overlay_tests::{
    agent_binary,
    lab::{Lab, LabSpec},
    require_root,
};

/// Removes the test's image on drop.
struct Image(String);

impl Drop for Image {
    fn drop(&mut self) {
        let _ = Command::new("podman").args(["rmi", "--force", &self.0]).output();
    }
}

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn the_image_builds_without_a_registry_and_runs_as_the_labs_agents() {
    require_root();
    assert!(
        Command::new("podman").arg("--version").output().is_ok_and(|o| o.status.success()),
        "podman is missing: run `cargo xtask setup`"
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root");
    let image = Image(format!("localhost/overlay-agent:test-{}", std::process::id()));
    let out = Command::new(root.join("deploy/build-image.sh"))
        .arg("--agent")
        .arg(agent_binary())
        .args(["--tag", &image.0])
        .output()
        .expect("running deploy/build-image.sh");
    let said = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "deploy/build-image.sh failed:\n{said}");
    // The agent and the commands it runs (nft, iptables-nft and
    // iptables-legacy), nothing more: routes, links and the pod bridge's
    // FDB go over rtnetlink, so no ip or bridge.
    let staged = root.join("target/image/rootfs");
    let mut commands: Vec<String> = ["usr/local/bin", "usr/sbin", "usr/bin", "sbin", "bin"]
        .into_iter()
        .filter_map(|dir| std::fs::read_dir(staged.join(dir)).ok())
        .flatten()
        .map(|entry| entry.expect("a staged file").file_name().to_string_lossy().into_owned())
        .collect();
    commands.sort();
    assert_eq!(
        commands,
        [
            "iptables-legacy", "iptables-legacy-restore", "iptables-legacy-save", "iptables-nft", "iptables-nft-restore",
            "iptables-nft-save", "nft", "overlay-agent", "xtables-legacy-multi", "xtables-nft-multi",
        ],
        "the commands in {}",
        staged.display()
    );
    let size = Command::new("podman").args(["image", "inspect", "--format", "{{.Size}}", &image.0]).output().unwrap();
    eprintln!("image {} built: {} bytes (a debug agent, stripped)", image.0, String::from_utf8_lossy(&size.stdout).trim());

    let mut spec = LabSpec::new(agent_binary());
    spec.nodes = 2;
    spec.pods_per_node = 1;
    spec.net_conf = true;
    // The lab runs `nsenter --net=<node> <agent> run …`; this agent is
    // podman, whose host network is then the node's namespace. The lab's
    // work directory (manifests, net-conf.json, subnet.env) and bpffs are
    // shared at the same paths.
    // The agents' containers, should any outlive the lab (dropped after it).
    let _containers = overlay_tests::PodmanContainers::new(format!("overlay-test={}", spec.prefix));
    let work = std::env::temp_dir().join(&spec.prefix);
    // In the lab's work directory, which the lab removes however it ends;
    // until it starts, this guard does.
    let _work = overlay_tests::TempDir::at(work.clone());
    std::fs::create_dir_all(&work).unwrap();
    let wrapper = work.join("agent.sh");
    // Below this machine's limits (nofile 20000 here); lowering is allowed.
    let (nofile, nproc) = (4096, 1024);
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec podman --runtime runc run --rm --name \"{prefix}-$(cat /proc/sys/kernel/random/uuid | cut -c1-8)\" \
             --label overlay-test={prefix} --ulimit nofile={nofile}:{nofile} --ulimit nproc={nproc}:{nproc} \
             --network=host --privileged -v /sys/fs/bpf:/sys/fs/bpf -v {work}:{work} {image} \"$@\"\n",
            prefix = spec.prefix,
            work = work.display(),
            image = image.0,
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    spec.agent = wrapper.clone();
    let lab = Lab::start(spec).unwrap_or_else(|e| panic!("lab with the image's agents failed to start: {e}"));

    let running = Command::new("podman")
        .args(["ps", "--filter", &format!("label=overlay-test={}", lab.spec().prefix), "--format", "{{.Image}}"])
        .output()
        .unwrap();
    let running = String::from_utf8_lossy(&running.stdout);
    assert_eq!(running.lines().filter(|l| l.contains(&image.0)).count(), 2, "both agents must run in the image:\n{running}");
    lab.assert_all_pairs("with the image's agents");
    let table = lab.nodes[0].ns.exec("nft", &["list", "table", "ip", "overlay"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("masquerade"), "the image's nft must have written the masquerade table");
}
