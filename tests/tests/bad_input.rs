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
use overlay_tests::{NetNs, PinDir, agent_binary, require_root};

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
fn users_directory() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(overlay_tests::unique_name("overlay-users-"));
    fs::create_dir_all(dir.join("photos")).unwrap();
    fs::write(dir.join("notes.txt"), "mine").unwrap();
    fs::write(dir.join("photos/cat.jpg"), "meow").unwrap();
    // Names the agent uses, which here are still the user's.
    fs::create_dir_all(dir.join("v2")).unwrap();
    fs::write(dir.join("v2/ROUTES"), "not a map").unwrap();
    dir
}

fn assert_users_files_intact(dir: &Path) {
    assert_eq!(fs::read_to_string(dir.join("notes.txt")).ok().as_deref(), Some("mine"), "{} lost the user's files", dir.display());
    assert_eq!(fs::read_to_string(dir.join("photos/cat.jpg")).ok().as_deref(), Some("meow"));
    assert_eq!(fs::read_to_string(dir.join("v2/ROUTES")).ok().as_deref(), Some("not a map"));
}

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn cleanup_refuses_a_directory_not_on_bpffs_and_deletes_nothing() {
    require_root();
    let ns = NetNs::new();
    let dir = users_directory();
    let out = agent_in(&ns, &["cleanup", "--keep-subnet-file", "--bpffs-root", dir.to_str().unwrap()]);
    let said = text(&out);
    let intact = std::panic::catch_unwind(|| assert_users_files_intact(&dir));
    let _ = fs::remove_dir_all(&dir);
    intact.unwrap();
    assert_eq!(out.status.code(), Some(1), "cleanup of a non-bpffs directory must fail:\n{said}");
    assert!(said.contains("not on a BPF filesystem"), "{said}");
}

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn check_refuses_a_directory_not_on_bpffs_and_deletes_nothing() {
    require_root();
    let ns = NetNs::new();
    let dir = users_directory();
    let out = agent_in(&ns, &["check", "--iface", "lo", "--bpffs-root", dir.to_str().unwrap()]);
    let said = text(&out);
    let intact = std::panic::catch_unwind(|| assert_users_files_intact(&dir));
    let _ = fs::remove_dir_all(&dir);
    intact.unwrap();
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("not on a BPF filesystem"), "{said}");
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
}
