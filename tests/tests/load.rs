//! Loading: every program passes this kernel's verifier, attaches to and
//! detaches from a veth in a throwaway namespace, its maps are pinned with
//! BTF so `bpftool map dump` prints field names, and its links are pinned
//! so a new agent swaps its programs in place.

use aya::{
    maps::{Array, HashMap, LpmTrie, lpm_trie::Key},
    programs::{TcAttachType, XdpMode},
};
use overlay_agent::{
    bpffs::{LinkRole, PinLayout},
    datapath::{Datapath, DatapathError, DecapHook, LinkOutcome},
};
use overlay_common::{Config, Peer, ROUTE_MODE_VXLAN, Route, map_names, program_names};
use overlay_tests::{NetNs, PinDir, agent_binary, require_root, stdout, tc_program_ids};

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn every_program_passes_the_verifier() {
    require_root();
    let pins = PinDir::new();
    let datapath = Datapath::load(pins.path()).expect("loading the datapath");
    let programs = datapath.programs();
    let names: Vec<_> = programs.iter().map(|p| p.name).collect();
    assert_eq!(names, program_names::ALL);
    for program in &programs {
        let verified = program.verified_instructions.unwrap_or(0);
        assert!(verified > 0, "{} reports no verified instructions", program.name);
        // The kernel itself lists it.
        let shown = stdout("bpftool", &["prog", "show", "id", &program.id.to_string()]);
        assert!(shown.contains(program.kind), "bpftool: {shown}");
    }
    for name in map_names::ALL {
        assert!(datapath.layout().map(name).exists(), "map {name} is not pinned");
    }
}

/// Ids of the programs the kernel reports attached to `iface`: TC through
/// TCX or clsact filters, XDP through `bpftool net show`.
fn attached_program_ids(iface: &str) -> Vec<u32> {
    let mut ids = Vec::new();
    for ty in [TcAttachType::Ingress, TcAttachType::Egress] {
        ids.extend(tc_program_ids(iface, ty));
    }
    let net = stdout("bpftool", &["net", "show", "dev", iface]);
    ids.extend(
        net.lines()
            .filter(|l| l.contains("driver id") || l.contains("generic id"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u32>().ok()),
    );
    ids.sort_unstable();
    ids
}

fn attach_and_detach(hook: DecapHook, decap_program: &str) {
    let ns = NetNs::new();
    ns.veth_pair("ul0", "ul1");
    let pins = PinDir::new();
    let _inside = ns.enter();
    let mut datapath = Datapath::load(pins.path()).expect("loading the datapath");
    assert!(attached_program_ids("ul0").is_empty());
    let report = datapath.attach("ul0", hook, false).expect("attaching");
    assert_eq!((report.egress, report.decap), (LinkOutcome::Attached, LinkOutcome::Attached));

    let id_of = |datapath: &Datapath, name: &str| datapath.programs().iter().find(|p| p.name == name).unwrap().id;
    let mut expected = vec![id_of(&datapath, program_names::TC_EGRESS), id_of(&datapath, decap_program)];
    expected.sort_unstable();
    assert_eq!(attached_program_ids("ul0"), expected);
    let progs = stdout("bpftool", &["prog", "show"]);
    for id in &expected {
        assert!(progs.contains(&format!("{id}: ")), "bpftool prog show lacks {id}:\n{progs}");
    }

    // The agent exits: the pinned links keep the programs attached.
    drop(datapath);
    assert_eq!(attached_program_ids("ul0"), expected, "programs must stay attached after the loader is gone");

    // A new agent swaps its programs into the same links: still exactly
    // two attachments, now running the new programs.
    let mut next = Datapath::load(pins.path()).expect("loading again");
    assert!(next.maps_adopted());
    let report = next.attach("ul0", hook, false).expect("attaching again");
    assert_eq!((report.egress, report.decap), (LinkOutcome::Swapped, LinkOutcome::Swapped));
    let mut swapped = vec![id_of(&next, program_names::TC_EGRESS), id_of(&next, decap_program)];
    swapped.sort_unstable();
    assert_ne!(swapped, expected, "a new load has new program ids");
    assert_eq!(attached_program_ids("ul0"), swapped);
    drop(next);

    // What `cleanup` does: before TCX the filters are not held by pins.
    Datapath::detach_clsact("ul0").expect("deleting the clsact filters");
    Datapath::remove_pins(pins.path()).expect("removing the pins");
    // A bpf_link lives until its last fd closes; a process another test is
    // forking at this moment holds a copy until it execs, so allow a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while !attached_program_ids("ul0").is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(attached_program_ids("ul0").is_empty(), "still attached 2 s after the pins were removed");
}

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn changing_the_decap_hook_replaces_the_old_attachment() {
    require_root();
    let ns = NetNs::new();
    ns.veth_pair("ul0", "ul1");
    let pins = PinDir::new();
    let layout = PinLayout::new(pins.path());
    let _inside = ns.enter();
    Datapath::load(pins.path()).unwrap().attach("ul0", DecapHook::Xdp(XdpMode::Default), false).unwrap();
    assert!(layout.link("ul0", LinkRole::DecapXdp).exists());
    let mut tc = Datapath::load(pins.path()).unwrap();
    let report = tc.attach("ul0", DecapHook::TcIngress, false).unwrap();
    assert_eq!((report.egress, report.decap), (LinkOutcome::Swapped, LinkOutcome::Attached));
    assert_eq!(report.removed, [layout.link("ul0", LinkRole::DecapXdp)]);
    let ids: Vec<u32> = ["overlay_tc_egress", "overlay_tc_ingress"]
        .iter()
        .map(|n| tc.programs().iter().find(|p| p.name == *n).unwrap().id)
        .collect();
    let mut ids = ids;
    ids.sort_unstable();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while attached_program_ids("ul0") != ids && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(attached_program_ids("ul0"), ids, "XDP must be gone, TC egress and ingress attached");
}

/// Before TCX (6.6) the TC programs are clsact filters, which outlive the
/// agent without a pin: a restarted agent must replace its own filter
/// rather than stack another beside it, and `cleanup` must delete them.
/// (On TCX kernels the same holds through the pinned links.)
#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn restarts_keep_one_tc_program_per_side_and_cleanup_removes_them() {
    require_root();
    let ns = NetNs::new();
    ns.veth_pair("ul0", "ul1");
    let pins = PinDir::new();
    let _inside = ns.enter();
    let mut last_ids = Vec::new();
    let mut outcomes = Vec::new();
    // The first agent and two restarts.
    for _ in 0..3 {
        let mut datapath = Datapath::load(pins.path()).expect("loading the datapath");
        let report = datapath.attach("ul0", DecapHook::TcIngress, false).expect("attaching");
        outcomes.push((report.egress, report.decap));
        let id_of = |name: &str| datapath.programs().iter().find(|p| p.name == name).unwrap().id;
        last_ids = vec![id_of(program_names::TC_INGRESS), id_of(program_names::TC_EGRESS)];
    }
    let ingress = tc_program_ids("ul0", TcAttachType::Ingress);
    let egress = tc_program_ids("ul0", TcAttachType::Egress);
    let filters = stdout("tc", &["filter", "show", "dev", "ul0", "ingress"]) + &stdout("tc", &["filter", "show", "dev", "ul0", "egress"]);
    assert_eq!(
        (ingress, egress),
        (vec![last_ids[0]], vec![last_ids[1]]),
        "after two restarts: exactly the last agent's program on each side\n{filters}"
    );
    let (fresh, swapped) = ((LinkOutcome::Attached, LinkOutcome::Attached), (LinkOutcome::Swapped, LinkOutcome::Swapped));
    assert_eq!(outcomes, [fresh, swapped, swapped], "a restart replaces the program in place");

    let out = std::process::Command::new(agent_binary())
        .args(["cleanup", "--keep-subnet-file", "--bpffs-root"])
        .arg(pins.path())
        .output()
        .expect("running overlay-agent cleanup");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "cleanup failed: {printed}{}", String::from_utf8_lossy(&out.stderr));
    assert!(printed.contains("detached from ul0"), "{printed}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while !attached_program_ids("ul0").is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let filters = stdout("tc", &["filter", "show", "dev", "ul0", "ingress"]) + &stdout("tc", &["filter", "show", "dev", "ul0", "egress"]);
    assert!(attached_program_ids("ul0").is_empty(), "still attached after cleanup:\n{filters}");
}

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn attach_and_detach_xdp_on_veth() {
    require_root();
    attach_and_detach(DecapHook::Xdp(XdpMode::Default), program_names::XDP_INGRESS);
}

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn attach_and_detach_tc_ingress_on_veth() {
    require_root();
    attach_and_detach(DecapHook::TcIngress, program_names::TC_INGRESS);
}

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn unknown_interface_is_named_and_nothing_attaches() {
    require_root();
    let ns = NetNs::new();
    let pins = PinDir::new();
    let _inside = ns.enter();
    let mut datapath = Datapath::load(pins.path()).expect("loading the datapath");
    let err = datapath
        .attach("nosuch0", DecapHook::Xdp(XdpMode::Default), false)
        .expect_err("attaching to a missing interface");
    assert!(matches!(err, DatapathError::UnknownInterface(ref i) if i == "nosuch0"), "{err}");
    assert!(err.to_string().contains("--iface"), "{err}");
}

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn pinned_maps_dump_with_btf_field_names() {
    require_root();
    let pins = PinDir::new();
    let mut datapath = Datapath::load(pins.path()).expect("loading the datapath");
    let ebpf = datapath.ebpf_mut();

    let mut config: Array<_, Config> =
        Array::try_from(ebpf.map_mut(map_names::CONFIG).unwrap()).unwrap();
    config
        .set(0, Config { enabled: 1, vni: 1, vxlan_port: 8472, ..Config::default() }, 0)
        .unwrap();
    let mut routes: LpmTrie<_, [u8; 4], Route> =
        LpmTrie::try_from(ebpf.map_mut(map_names::ROUTES).unwrap()).unwrap();
    let route = Route { node_ip: [192, 0, 2, 2], vtep_mac: [2, 0, 0, 0, 0, 2], mode: ROUTE_MODE_VXLAN, reason: 1, next_hop: [192, 0, 2, 1] };
    routes.insert(&Key::new(24, [10, 244, 2, 0]), route, 0).unwrap();
    let mut peers: HashMap<_, [u8; 4], Peer> =
        HashMap::try_from(ebpf.map_mut(map_names::PEERS).unwrap()).unwrap();
    peers.insert([192, 0, 2, 2], Peer { pod_cidr: [10, 244, 2, 0], pod_prefix_len: 24 }, 0).unwrap();

    let dump = |name: &str| {
        let path = PinLayout::new(pins.path()).map(name);
        stdout("bpftool", &["map", "dump", "pinned", path.to_str().unwrap()])
    };
    let fields: [(&str, &[&str]); 4] = [
        (map_names::CONFIG, &["\"enabled\": 1", "\"vni\": 1", "\"vxlan_port\": 8472", "\"vtep_mac\""]),
        (map_names::ROUTES, &["\"prefix_len\": 24", "\"node_ip\"", "\"vtep_mac\"", "\"mode\": 1", "\"reason\": 1", "\"next_hop\""]),
        (map_names::PEERS, &["\"pod_cidr\"", "\"pod_prefix_len\": 24"]),
        (map_names::COUNTERS, &["\"packets\"", "\"bytes\"", "\"cpu\""]),
    ];
    for (map, expected) in fields {
        let text = dump(map);
        for field in expected {
            assert!(text.contains(field), "{map} dump lacks {field}:\n{text}");
        }
    }
}

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn without_bpf_privileges_the_agent_says_what_it_needs() {
    require_root();
    let pins = PinDir::new();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--"])
        .arg(agent_binary())
        .args(["check", "--iface", "lo", "--bpffs-root"])
        .arg(pins.path())
        .output()
        .expect("running setpriv");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no permission to load BPF programs: run as root, or grant CAP_BPF"), "{stderr}");
    assert!(!pins.path().exists(), "nothing may be created without permission");
}

/// One map as an older agent pinned it: name, `bpftool map create` kind,
/// key and value size, capacity, flags.
type PinnedMap = (&'static str, &'static str, u32, u32, u32, u32);

/// Map layout v3 (overlay-agent's LAYOUTS): `COUNTERS` had 16 slots,
/// before `bare_tunnel_source` and `ecn_not_ect`.
const V3_MAPS: [PinnedMap; 6] = [
    (map_names::CONFIG, "array", 4, 56, 1, 0),
    (map_names::COUNTERS, "percpu_array", 4, 16, 16, 0),
    (map_names::KERNEL_SOCKETS, "lru_hash", 8, 1, 65536, 0),
    (map_names::PEERS, "hash", 4, 8, 16384, 0),
    (map_names::POD_PORTS, "hash", 6, 4, 4096, 0),
    (map_names::ROUTES, "lpm_trie", 8, 16, 16384, 1),
];

/// Map layout v4: `COUNTERS` of 18 slots; `ROUTES` and `PEERS` still held
/// 16,384 nodes.
const V4_MAPS: [PinnedMap; 6] = [
    (map_names::CONFIG, "array", 4, 56, 1, 0),
    (map_names::COUNTERS, "percpu_array", 4, 16, 18, 0),
    (map_names::KERNEL_SOCKETS, "lru_hash", 8, 1, 65536, 0),
    (map_names::PEERS, "hash", 4, 8, 16384, 0),
    (map_names::POD_PORTS, "hash", 6, 4, 4096, 0),
    (map_names::ROUTES, "lpm_trie", 8, 16, 16384, 1),
];

/// The pins an older release left under `<root>/v<version>/`, made with
/// bpftool as that agent pinned them: the new agent loads beside them,
/// its programs run on the new layout's maps (checked by their
/// capacities), and the old directory is removed once they are attached.
fn upgrade_from(version: u32, maps: &[PinnedMap]) {
    let ns = NetNs::new();
    ns.veth_pair("ul0", "ul1");
    let pins = PinDir::new();
    let old = pins.path().join(format!("v{version}"));
    make_pins(&old, maps);
    let _inside = ns.enter();
    let mut datapath = Datapath::load(pins.path()).expect("loading beside the previous layout's pins");
    datapath.attach("ul0", DecapHook::TcIngress, false).expect("attaching");
    let layout = PinLayout::new(pins.path());
    for name in map_names::ALL {
        assert!(layout.map(name).exists(), "no {} after the upgrade", layout.map(name).display());
    }
    assert!(!old.exists(), "the v{version} pins are still there: {:?}", std::fs::read_dir(&old).map(|d| d.count()));
    for (name, capacity) in [
        (map_names::COUNTERS, overlay_common::COUNTER_SLOTS),
        (map_names::PEERS, overlay_common::MAX_PEERS),
        (map_names::ROUTES, overlay_common::MAX_PEERS),
    ] {
        let shown = stdout("bpftool", &["map", "show", "pinned", layout.map(name).to_str().unwrap()]);
        assert!(shown.contains(&format!("max_entries {capacity} ")), "{name} is not the new layout's: {shown}");
    }
}

/// From v3 pins, two layouts back. (Shown failing with the same pins
/// made under the current version's directory, what a layout change
/// without a new version looks like: the old directory stays, and aya
/// reused a pinned COUNTERS of 16 slots where the programs index 18:
/// now refused, see `pinned_maps_of_another_shape_under_this_version_are_refused`.)
#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn an_agent_upgrades_from_the_v3_map_layouts_pins() {
    require_root();
    upgrade_from(3, &V3_MAPS);
}

/// From the previous release's v4 pins, whose `ROUTES` and `PEERS` held
/// 16,384 nodes: the agent must not keep using them (a cluster beyond
/// 16,384 nodes would not fit).
#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn an_agent_upgrades_from_the_previous_map_layouts_pins() {
    require_root();
    upgrade_from(4, &V4_MAPS);
}

/// Creates `maps` in `dir` with bpftool, as an older agent pinned them.
fn make_pins(dir: &std::path::Path, maps: &[PinnedMap]) {
    std::fs::create_dir_all(dir).unwrap();
    for &(name, kind, key, value, entries, flags) in maps {
        let (key, value, entries, flags) = (key.to_string(), value.to_string(), entries.to_string(), flags.to_string());
        let path = dir.join(name);
        let out = std::process::Command::new("bpftool")
            .args(["map", "create"])
            .arg(&path)
            .args(["type", kind, "key", &key, "value", &value, "entries", &entries, "name", name, "flags", &flags])
            .output()
            .expect("running bpftool");
        assert!(out.status.success(), "bpftool map create {name}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// Pins of another shape under the current layout version (a layout
/// change that forgot its version bump, or a mixed-up build): aya would
/// reuse them and the programs would misread them, so the load refuses,
/// naming the map, its shape and what to do, and leaves the pins as they
/// were.
#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn pinned_maps_of_another_shape_under_this_version_are_refused() {
    require_root();
    let pins = PinDir::new();
    let layout = PinLayout::new(pins.path());
    let current = layout.map(map_names::PEERS).parent().unwrap().to_owned();
    make_pins(&current, &V4_MAPS);
    let err = match Datapath::load(pins.path()) {
        Ok(_) => panic!("the load accepted a PEERS of 16,384 entries where the programs hold {}", overlay_common::MAX_PEERS),
        Err(err) => overlay_agent::report::Chain(&err).to_string(),
    };
    let peers = layout.map(map_names::PEERS);
    assert!(err.contains(&format!("the map pinned at {}", peers.display())), "{err}");
    assert!(err.contains("16384 entries") && err.contains("overlay-agent cleanup"), "{err}");
    for name in map_names::ALL {
        assert!(layout.map(name).exists(), "{} was removed by a refused load", layout.map(name).display());
    }
}
