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
    carry::{self, CarryError},
    datapath::{Datapath, DatapathError, DecapHook, LinkOutcome},
};
use overlay_common::{Config, Peer, ROUTE_MODE_VXLAN, Route, SocketKey, map_names, program_names};
use overlay_tests::{NetNs, NetNsEntered, PinDir, PinnedMap, TempDir, V9_MAPS, agent_binary, make_pins, require_root, stdout, tc_program_ids};

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

/// Signals aimed at the loading thread, hundreds a second (a busy agent's
/// or the tests' child processes exiting send such bursts), do not fail
/// the load: the verifier gives up with EAGAIN whenever a signal is
/// pending for the thread, five times in a row under such a burst.
#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn loading_survives_a_signal_storm() {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };
    extern "C" fn ignore(_: libc::c_int) {}
    require_root();
    // SAFETY: a handler that does nothing, for a signal nothing else in
    // this process uses.
    unsafe { libc::signal(libc::SIGUSR2, ignore as *const () as libc::sighandler_t) };
    // SAFETY: plain call.
    let loader = unsafe { libc::pthread_self() };
    let stop = Arc::new(AtomicBool::new(false));
    let storm = std::thread::spawn({
        let stop = stop.clone();
        move || {
            let mut sent = 0u32;
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: the loading thread outlives this one (joined below).
                unsafe { libc::pthread_kill(loader, libc::SIGUSR2) };
                sent += 1;
                std::thread::sleep(std::time::Duration::from_micros(20));
            }
            sent
        }
    });
    let pins = PinDir::new();
    let loaded = Datapath::load(pins.path());
    stop.store(true, Ordering::Relaxed);
    let sent = storm.join().unwrap();
    assert!(sent > 50, "only {sent} signals were sent while loading");
    loaded.unwrap_or_else(|e| panic!("loading under {sent} signals: {e:?}"));
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

/// A namespace with the veth pair `ul0`/`ul1`, a pin directory, and the
/// thread inside the namespace. Bound in this order, they drop as a
/// test's own locals would: the thread leaves first, the namespace goes
/// last.
fn underlay() -> (NetNs, PinDir, NetNsEntered) {
    let ns = NetNs::new();
    ns.veth_pair("ul0", "ul1");
    let pins = PinDir::new();
    let inside = ns.enter();
    (ns, pins, inside)
}

/// The kernel's id of `datapath`'s program `name`.
fn program_id(datapath: &Datapath, name: &str) -> u32 {
    datapath.programs().iter().find(|p| p.name == name).unwrap().id
}

/// Waits up to 2 s (stretched by `scaled`, as in the VM stage) for `done`.
/// A bpf_link lives until its last fd closes; a process another test is
/// forking at this moment holds a copy until it execs, so a detach may
/// take a moment to show.
fn settle(mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + overlay_tests::scaled(std::time::Duration::from_secs(2));
    while !done() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `tc filter show` of `iface`'s ingress and egress, for messages.
fn tc_filters(iface: &str) -> String {
    stdout("tc", &["filter", "show", "dev", iface, "ingress"]) + &stdout("tc", &["filter", "show", "dev", iface, "egress"])
}

fn attach_and_detach(hook: DecapHook, decap_program: &str) {
    let (_ns, pins, _inside) = underlay();
    let mut datapath = Datapath::load(pins.path()).expect("loading the datapath");
    assert!(attached_program_ids("ul0").is_empty());
    let report = datapath.attach("ul0", hook, false).expect("attaching");
    assert_eq!((report.egress, report.decap), (LinkOutcome::Attached, LinkOutcome::Attached));

    let mut expected = vec![program_id(&datapath, program_names::TC_EGRESS), program_id(&datapath, decap_program)];
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
    let mut swapped = vec![program_id(&next, program_names::TC_EGRESS), program_id(&next, decap_program)];
    swapped.sort_unstable();
    assert_ne!(swapped, expected, "a new load has new program ids");
    assert_eq!(attached_program_ids("ul0"), swapped);
    drop(next);

    // What `cleanup` does: before TCX the filters are not held by pins.
    Datapath::detach_clsact("ul0").expect("deleting the clsact filters");
    Datapath::remove_pins(pins.path()).expect("removing the pins");
    settle(|| attached_program_ids("ul0").is_empty());
    assert!(attached_program_ids("ul0").is_empty(), "still attached 2 s after the pins were removed");
}

#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn changing_the_decap_hook_replaces_the_old_attachment() {
    require_root();
    let (_ns, pins, _inside) = underlay();
    let layout = PinLayout::new(pins.path());
    Datapath::load(pins.path()).unwrap().attach("ul0", DecapHook::Xdp(XdpMode::Default), false).unwrap();
    assert!(layout.link("ul0", LinkRole::DecapXdp).exists());
    let mut tc = Datapath::load(pins.path()).unwrap();
    let report = tc.attach("ul0", DecapHook::TcIngress, false).unwrap();
    assert_eq!((report.egress, report.decap), (LinkOutcome::Swapped, LinkOutcome::Attached));
    assert_eq!(report.removed, [layout.link("ul0", LinkRole::DecapXdp)]);
    let mut ids: Vec<u32> = ["overlay_tc_egress", "overlay_tc_ingress"].iter().map(|n| program_id(&tc, n)).collect();
    ids.sort_unstable();
    settle(|| attached_program_ids("ul0") == ids);
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
    let (_ns, pins, _inside) = underlay();
    let mut last_ids = Vec::new();
    let mut outcomes = Vec::new();
    // The first agent and two restarts.
    for _ in 0..3 {
        let mut datapath = Datapath::load(pins.path()).expect("loading the datapath");
        let report = datapath.attach("ul0", DecapHook::TcIngress, false).expect("attaching");
        outcomes.push((report.egress, report.decap));
        last_ids = vec![program_id(&datapath, program_names::TC_INGRESS), program_id(&datapath, program_names::TC_EGRESS)];
    }
    let ingress = tc_program_ids("ul0", TcAttachType::Ingress);
    let egress = tc_program_ids("ul0", TcAttachType::Egress);
    let filters = tc_filters("ul0");
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
    settle(|| attached_program_ids("ul0").is_empty());
    let filters = tc_filters("ul0");
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

/// Map layout v5: `ROUTES` and `PEERS` of 65,536 nodes; `CONFIG` of 56
/// bytes and `COUNTERS` of 18 slots, before the segmentation device's
/// `seg_ifindex`, `segmented` and `segment_no_route`.
const V5_MAPS: [PinnedMap; 6] = [
    (map_names::CONFIG, "array", 4, 56, 1, 0),
    (map_names::COUNTERS, "percpu_array", 4, 16, 18, 0),
    (map_names::KERNEL_SOCKETS, "lru_hash", 8, 1, 65536, 0),
    (map_names::PEERS, "hash", 4, 8, 65536, 0),
    (map_names::POD_PORTS, "hash", 6, 4, 4096, 0),
    (map_names::ROUTES, "lpm_trie", 8, 16, 65536, 1),
];

/// The pins an older release left under `<root>/v<version>/`, made with
/// bpftool as that agent pinned them: the new agent loads beside them,
/// its programs run on the new layout's maps (checked by their
/// capacities), and the old directory, the record of the routes it made,
/// stays through the attach and is removed after (as `run` does once it
/// removed those routes).
fn upgrade_from(version: u32, maps: &[PinnedMap]) {
    let (_ns, pins, _inside) = underlay();
    let old = pins.path().join(format!("v{version}"));
    make_pins(&old, maps);
    let mut datapath = Datapath::load(pins.path()).expect("loading beside the previous layout's pins");
    datapath.attach("ul0", DecapHook::TcIngress, false).expect("attaching");
    let layout = PinLayout::new(pins.path());
    for name in map_names::ALL {
        assert!(layout.map(name).exists(), "no {} after the upgrade", layout.map(name).display());
    }
    assert!(old.exists(), "the attach removed the v{version} pins");
    assert_eq!(datapath.remove_older_layouts().expect("removing the older layout"), std::slice::from_ref(&old));
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

/// From v4 pins, whose `ROUTES` and `PEERS` held 16,384 nodes: the agent
/// must not keep using them (a cluster beyond 16,384 nodes would not fit).
#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn an_agent_upgrades_from_the_v4_map_layouts_pins() {
    require_root();
    upgrade_from(4, &V4_MAPS);
}

/// From the previous release's v5 pins, whose `CONFIG` had no
/// `seg_ifindex` and `COUNTERS` 18 slots.
#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn an_agent_upgrades_from_the_previous_map_layouts_pins() {
    require_root();
    upgrade_from(5, &V5_MAPS);
}

/// The previous layout's pins with one map not as v9 pinned it (here
/// `ROUTES` with 32-byte values): nothing is carried, not even the maps
/// read before it (an entry of `PEERS`), the error names the map, and the
/// new maps stay empty for the first reconcile to fill. The agent logs it
/// and starts as without a previous layout.
#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn previous_layout_pins_of_another_shape_are_not_carried() {
    require_root();
    let pins = PinDir::new();
    let old = pins.path().join(format!("v{}", carry::FROM));
    let mut maps = V9_MAPS;
    let routes = maps.iter_mut().find(|m| m.0 == map_names::ROUTES).unwrap();
    routes.3 = 32;
    make_pins(&old, &maps);
    let mut old_peers: HashMap<aya::maps::MapData, [u8; 4], Peer> = overlay_agent::maps::open_pinned(&old.join(map_names::PEERS)).unwrap();
    old_peers.insert([10, 244, 2, 0], Peer { pod_cidr: [10, 244, 2, 0], pod_prefix_len: 24 }, 0).unwrap();
    let datapath = Datapath::load(pins.path()).expect("loading beside the previous layout's pins");
    assert!(!datapath.maps_adopted());
    match carry::previous_layout(pins.path()) {
        Err(CarryError::OpenOld { path, .. }) => assert_eq!(path, old.join(map_names::ROUTES)),
        other => panic!("carrying from a mis-shaped ROUTES: {other:?}"),
    }
    let maps = overlay_agent::maps::DatapathMaps::open(pins.path()).unwrap();
    assert_eq!(maps.peers.keys().count(), 0, "PEERS was carried in part");
    assert_eq!(maps.config.get(&0, 0).unwrap().enabled, 0);
}

/// Sockets the previous layout's programs record after the carry (they
/// run on the pods' veths until the agent's fast path replaces them, after
/// the start has removed the old pins) reach the new
/// `KERNEL_SOCKETS` when the agent carries them late. (Shown failing with
/// a late carry that carried nothing: the late socket was missing.)
#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn sockets_the_previous_layout_records_after_the_carry_are_carried_late() {
    require_root();
    let pins = PinDir::new();
    let old = pins.path().join(format!("v{}", carry::FROM));
    make_pins(&old, &V9_MAPS);
    let socket = |last: u8| SocketKey { addr: [10, 244, 1, last], port: 443u16.to_be_bytes(), proto: 6, _pad: 0 };
    let mut old_sockets: HashMap<aya::maps::MapData, SocketKey, u8> =
        overlay_agent::maps::open_pinned(&old.join(map_names::KERNEL_SOCKETS)).unwrap();
    old_sockets.insert(socket(5), 0, 0).unwrap();
    let _datapath = Datapath::load(pins.path()).expect("loading beside the previous layout's pins");
    let (carried, late_sockets) = carry::previous_layout(pins.path()).unwrap().expect("a previous layout to carry");
    assert_eq!(carried.kernel_sockets, 1);
    // An old program records a socket; then the old pins go (its map
    // lives on in the programs, here in `old_sockets`).
    old_sockets.insert(socket(6), 0, 0).unwrap();
    std::fs::remove_dir_all(&old).unwrap();
    assert_eq!(late_sockets.carry().unwrap(), 1, "sockets carried late");
    let new_sockets: HashMap<aya::maps::MapData, SocketKey, u8> =
        overlay_agent::maps::open_pinned(&PinLayout::new(pins.path()).map(map_names::KERNEL_SOCKETS)).unwrap();
    let mut held: Vec<SocketKey> = new_sockets.keys().map(Result::unwrap).collect();
    held.sort_by_key(|s| s.addr);
    assert_eq!(held, vec![socket(5), socket(6)]);
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
    // This layout's maps, but a PEERS of v4's 16,384 entries.
    let mut maps = V5_MAPS;
    maps[0].3 = size_of::<Config>() as u32;
    maps[1].4 = overlay_common::COUNTER_SLOTS as u32;
    maps[3].4 = 16384;
    make_pins(&current, &maps);
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

/// Whether TC programs attach as clsact filters here (no TCX before 6.6).
fn clsact_kernel() -> bool {
    use aya::util::KernelVersion;
    KernelVersion::current().map_or(true, |v| v < KernelVersion::new(6, 6, 0))
}

/// A pod's veth whose second attachment (the fast path's, TC ingress)
/// fails after the first (TC egress, what the kernel delivers) was made:
/// the first is undone, its filter or link and its pin (before 6.6 an
/// empty marker directory) alike, and a later attempt starts clean.
/// (Shown failing on 6.1 against the undo that removed the pin with
/// `remove_file`: the marker and the egress filter stayed.)
#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn a_pod_veth_attachment_that_fails_half_way_leaves_nothing_behind() {
    require_root();
    let ns = NetNs::new();
    ns.veth_pair("pv0", "pv1");
    let pins = PinDir::new();
    let layout = PinLayout::new(pins.path());
    let _inside = ns.enter();
    let mut datapath = Datapath::load(pins.path()).expect("loading the datapath");
    // Make the fast path's attachment fail: before TCX, another tool's
    // filter where ours goes; with TCX, something that is not a link at
    // its pin.
    let fast_path_pin = layout.link("pv0", LinkRole::PodFastPath);
    let block = || {
        if clsact_kernel() {
            overlay_tests::run("tc", &["qdisc", "add", "dev", "pv0", "clsact"]);
            let priority = overlay_agent::clsact::priority(LinkRole::PodFastPath).to_string();
            overlay_tests::run("tc", &["filter", "add", "dev", "pv0", "ingress", "pref", &priority, "handle", "1", "protocol", "all", "matchall", "action", "pass"]);
        } else {
            std::fs::create_dir_all(&fast_path_pin).unwrap();
        }
    };
    block();
    let err = datapath.attach_pod_port("pv0").expect_err("attaching beside a blocked fast path");
    let delivered_pin = layout.link("pv0", LinkRole::PodDelivered);
    settle(|| tc_program_ids("pv0", TcAttachType::Egress).is_empty());
    let filters = stdout("tc", &["filter", "show", "dev", "pv0", "egress"]);
    assert!(!delivered_pin.exists(), "the undone attachment's pin remains: {} (after: {})", delivered_pin.display(), overlay_agent::report::Chain(&err));
    assert!(tc_program_ids("pv0", TcAttachType::Egress).is_empty(), "the undone attachment is still attached:\n{filters}");

    // Unblocked, the next attempt attaches both, once each.
    if clsact_kernel() {
        overlay_tests::run("tc", &["filter", "del", "dev", "pv0", "ingress"]);
    } else {
        std::fs::remove_dir(&fast_path_pin).unwrap();
    }
    assert_eq!(datapath.attach_pod_port("pv0").expect("attaching once unblocked"), LinkOutcome::Attached);
    assert_eq!(tc_program_ids("pv0", TcAttachType::Ingress), [program_id(&datapath, program_names::TC_POD)]);
    assert_eq!(tc_program_ids("pv0", TcAttachType::Egress), [program_id(&datapath, program_names::TC_POD_DELIVERED)]);
}

/// With the fast path, a restarted agent's attach to the underlay keeps
/// what it attached to the pods' veths (before 6.6 clsact filters, which
/// no pin holds): the filter recording what the kernel delivers to a pod
/// must not lapse until the fast path's sync swaps the new programs in,
/// and that sync must replace each in place, not stack another. (Shown
/// failing on 6.1 against the attach that kept only the fast path's
/// filter on every other interface: the veth's egress was empty.)
#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn a_restart_keeps_each_pod_veth_attachment_once() {
    require_root();
    let (ns, pins, _inside) = underlay();
    ns.veth_pair("pv0", "pv1");
    let ids = |datapath: &Datapath| {
        (vec![program_id(datapath, program_names::TC_POD)], vec![program_id(datapath, program_names::TC_POD_DELIVERED)])
    };
    let on_veth = || (tc_program_ids("pv0", TcAttachType::Ingress), tc_program_ids("pv0", TcAttachType::Egress));
    let filters = || tc_filters("pv0");
    let mut first = Datapath::load(pins.path()).expect("loading the datapath");
    first.attach("ul0", DecapHook::TcIngress, true).expect("attaching");
    assert_eq!(first.attach_pod_port("pv0").expect("attaching to the pod's veth"), LinkOutcome::Attached);
    let first_ids = ids(&first);
    assert_eq!(on_veth(), first_ids, "{}", filters());
    drop(first);

    let mut restarted = Datapath::load(pins.path()).expect("loading again");
    restarted.attach("ul0", DecapHook::TcIngress, true).expect("attaching again");
    assert_eq!(on_veth(), first_ids, "the restarted agent's attach changed the pod veth's programs:\n{}", filters());
    assert_eq!(restarted.attach_pod_port("pv0").expect("attaching to the pod's veth again"), LinkOutcome::Swapped);
    assert_eq!(on_veth(), ids(&restarted), "after the restart: exactly the new agent's programs, once each side:\n{}", filters());
}

/// What the agent's Node condition follows: whether its programs still
/// serve the underlay. Attached, they do; one detached by someone else
/// (before 6.6 its filter deleted, with TCX its link unpinned), or the
/// interface gone, and the check says which.
#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn the_attachment_check_sees_a_program_detached_behind_the_agents_back() {
    require_root();
    let (ns, pins, _inside) = underlay();
    let layout = PinLayout::new(pins.path());
    let mut datapath = Datapath::load(pins.path()).expect("loading the datapath");
    for hook in [DecapHook::TcIngress, DecapHook::Xdp(XdpMode::Skb)] {
        datapath.attach("ul0", hook, false).expect("attaching");
        datapath.check_attached("ul0", hook).unwrap_or_else(|e| panic!("{hook:?}: attached, yet: {}", overlay_agent::report::Chain(&e)));
    }
    let hook = DecapHook::Xdp(XdpMode::Skb);
    if clsact_kernel() {
        overlay_tests::run("tc", &["filter", "del", "dev", "ul0", "egress"]);
    } else {
        std::fs::remove_file(layout.link("ul0", LinkRole::TcEgress)).unwrap();
    }
    let mut checked = datapath.check_attached("ul0", hook);
    settle(|| {
        checked = datapath.check_attached("ul0", hook);
        checked.is_err()
    });
    match checked {
        Err(DatapathError::NotAttached { program, ref iface }) => assert_eq!((program, iface.as_str()), (program_names::TC_EGRESS, "ul0")),
        other => panic!("the egress program was detached, yet: {other:?}"),
    }
    ns.ip(&["link", "del", "ul0"]);
    assert!(matches!(datapath.check_attached("ul0", hook), Err(DatapathError::InterfaceGone(_))));
}

/// Below 5.13 (`preflight::DATAPATH_MINIMUM`) `run` stops before touching
/// anything and names the kernel, the minimum and what is missing, where
/// it would otherwise fail in the verifier on a helper the kernel lacks
/// (`bpf_check_mtu` is 5.12), or, on 5.12, encapsulate nothing. On such a
/// kernel (`cargo xtask vmtest --kernel 5.10 --test load -- older_than`)
/// its own release is refused; on a newer one the agent runs in a mount
/// namespace of its own with an old kernel's release bind-mounted over
/// `/proc/sys/kernel/osrelease`, which is all it reads.
#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn run_refuses_a_kernel_older_than_5_13_before_touching_anything() {
    require_root();
    let real = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap().trim().to_owned();
    let old = overlay_agent::preflight::major_minor(&real).unwrap() < overlay_agent::preflight::DATAPATH_MINIMUM;
    let release = if old { real.clone() } else { "5.10.0-32-cloud-amd64".to_owned() };
    let ns = NetNs::new();
    ns.veth_pair("ul0", "ul1");
    ns.ip(&["addr", "add", "192.168.77.11/24", "dev", "ul0"]);
    let pins = PinDir::new();
    let work = TempDir::new("overlay-oldkernel-");
    let nodes = work.path().join("nodes");
    std::fs::create_dir_all(&nodes).unwrap();
    let fake_release = work.path().join("osrelease");
    std::fs::write(&fake_release, format!("{release}\n")).unwrap();
    let agent = agent_binary();
    let mut command = std::process::Command::new("nsenter");
    command.arg(format!("--net=/run/netns/{}", ns.name()));
    if !old {
        command.args(["unshare", "--mount", "--propagation", "private", "sh", "-c", r#"mount --bind "$0" /proc/sys/kernel/osrelease && exec "$@""#]);
        command.arg(&fake_release);
    }
    command
        .arg(&agent)
        .args(["run", "--node-name", "node1", "--iface", "ul0", "--backend", "vxlan", "--metrics-addr", "127.0.0.1:0", "--nodes-dir"])
        .arg(&nodes)
        .arg("--bpffs-root")
        .arg(pins.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = command.spawn().expect("starting the agent");
    let deadline = std::time::Instant::now() + overlay_tests::scaled(std::time::Duration::from_secs(10));
    let exited = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let out = child.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let status = exited.unwrap_or_else(|| panic!("the agent kept running on a kernel reporting {release} (real: {real}):\n{said}"));
    assert_eq!(status.code(), Some(1), "{said}");
    let expected = format!("error: kernel {release} is older than 5.13: ");
    assert!(said.contains(&expected) && said.contains("BPF_F_ADJ_ROOM_ENCAP_L2_ETH"), "expected `{expected}...`, got:\n{said}");
    assert!(!pins.path().exists(), "the agent pinned under {} before refusing", pins.path().display());
    let _inside = ns.enter();
    assert_eq!(attached_program_ids("ul0"), Vec::<u32>::new(), "the agent attached to ul0 before refusing");
}

/// `check` on an interface a datapath serves leaves that datapath's
/// attachments as they were. Before TCX (6.6) its programs are the clsact
/// filters `check`'s own would replace (same priority and handle), so it
/// refuses, saying why; with TCX its links go beside them and away again.
/// (Shown failing on 6.1 before the refusal: `check` swapped its programs,
/// with their empty maps, into the running filters, then deleted them.)
#[test]
#[ignore = "needs root: run `cargo xtask test` as root"]
fn check_leaves_a_running_datapath_on_its_interface_as_it_was() {
    require_root();
    let (_ns, pins, _inside) = underlay();
    let mut datapath = Datapath::load(pins.path()).expect("loading the datapath");
    datapath.attach("ul0", DecapHook::TcIngress, false).expect("attaching");
    let running = attached_program_ids("ul0");
    assert_eq!(running.len(), 2, "{}", tc_filters("ul0"));
    let check_pins = PinDir::new();
    // Spawned from this thread, so inside the namespace.
    let out = std::process::Command::new(agent_binary())
        .args(["check", "--iface", "ul0", "--decap", "tc", "--bpffs-root"])
        .arg(check_pins.path())
        .output()
        .expect("running overlay-agent check");
    let said = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if clsact_kernel() {
        assert_eq!(out.status.code(), Some(1), "{said}");
        assert!(said.contains("ul0 already carries the datapath's filters"), "{said}");
    } else {
        assert!(out.status.success(), "{said}");
    }
    settle(|| attached_program_ids("ul0") == running);
    assert_eq!(attached_program_ids("ul0"), running, "check changed the attachments it found:\n{said}\n{}", tc_filters("ul0"));
    assert!(!check_pins.path().exists(), "check left its pins");
}
