//! `overlay-agent inspect`: the pinned maps as readable tables.

use std::{net::Ipv4Addr, path::Path};

use anyhow::Context as _;
use overlay_agent::{
    bpffs::{LinkRole, PinLayout},
    device_pair::PairKind,
    maps::DatapathMaps,
    node::format_mac,
};
use overlay_common::{
    Counter,
    ROUTE_MODE_DIRECT, ROUTE_MODE_UNREACHABLE, ROUTE_MODE_VXLAN, ROUTE_REASON_BACKEND, ROUTE_REASON_GATEWAY,
    ROUTE_REASON_NO_ROUTE, ROUTE_REASON_ON_LINK,
};

pub fn inspect(root: &Path) -> anyhow::Result<()> {
    let maps = DatapathMaps::open(root)?;
    let config = maps.config.get(&0, 0).context("reading CONFIG")?;
    println!("CONFIG ({})", root.display());
    if config.enabled == 0 {
        println!("  not configured yet: the programs pass all traffic");
    } else {
        println!(
            "  tunnel address {}  vni {}  port {}  vtep {}  pod cidr {}/{}  inner mtu {}  ifindex {}",
            Ipv4Addr::from(config.node_ip),
            config.vni,
            config.vxlan_port,
            format_mac(config.vtep_mac),
            Ipv4Addr::from(config.pod_cidr),
            config.pod_prefix_len,
            config.inner_mtu,
            config.underlay_ifindex
        );
        match config.pod_bridge_ifindex {
            0 => println!("  fast path: off (pod traffic takes the kernel's forward path)"),
            index => println!(
                "  fast path: on, pod bridge ifindex {index}, {} (--forward bpf)",
                match config.pod_bridge_ip {
                    [0, 0, 0, 0] => "no address of it in the pod CIDR known".to_owned(),
                    ip => format!("its address {} left to the kernel as a pod's source", Ipv4Addr::from(ip)),
                }
            ),
        }
        println!(
            "  decapsulation: {}",
            match config.xdp_decap {
                overlay_common::DECAP_HOOK_TC => "TC ingress (XDP, if attached, passes every frame)".to_owned(),
                overlay_common::DECAP_HOOK_XDP => "XDP (the fast path's TC ingress behind it, if any, takes bare packets for judged)".to_owned(),
                overlay_common::DECAP_HOOK_TO_XDP => "handing over to XDP: XDP judges bare packets, TC decapsulates and judges too".to_owned(),
                overlay_common::DECAP_HOOK_FROM_XDP => "handing back to TC: XDP judges bare packets, TC decapsulates".to_owned(),
                other => format!("unknown stage {other}"),
            }
        );
        match config.seg_ifindex {
            0 => println!("  pods' own tunnels: single packets only (no segmentation device: their GSO packets are dropped as helper_error)"),
            index => println!(
                "  pods' own tunnels: GSO packets segmented on the segmentation device ({}, ifindex {index}), then encapsulated",
                overlay_agent::seg_device::SEGMENTATION.device_names().join(" -> ")
            ),
        }
        if config.pod_bridge_ifindex != 0 {
            match config.gro_ifindex {
                0 => println!("  fast path, in: every packet straight into its pod (bpf_redirect_peer)"),
                index => println!(
                    "  fast path, in: TCP decapsulated at TC merged on the GRO device ({}, ifindex {index}), then into its pod once per merged packet; TCP with PSH (requests, replies) straight when nothing mergeable went there for 50 ms; the rest straight into its pod",
                    overlay_agent::gro_device::GRO.device_names().join(" -> ")
                ),
            }
        }
        // Only a stopped agent leaves CONFIG naming a pair that went.
        for kind in PairKind::ALL {
            let (pair, index) = (kind.pair(), kind.index_in(config));
            if !pair.still_serves(index) {
                println!(
                    "  !! {} is not here (ifindex {index}): what the datapath sends to the {} is lost until the agent runs and sets it up again",
                    pair.send_end, pair.what
                );
            }
        }
    }

    print_attachments(&PinLayout::new(root));

    println!("\nPEERS (tunnel traffic accepted from)");
    println!("  {:<16} {:<18}", "NODE IP", "POD CIDR");
    let mut peers: Vec<_> = maps.peers.iter().filter_map(Result::ok).collect();
    peers.sort_by_key(|(ip, _)| *ip);
    for (ip, peer) in peers {
        println!("  {:<16} {:<18}", Ipv4Addr::from(ip).to_string(), format!("{}/{}", Ipv4Addr::from(peer.pod_cidr), peer.pod_prefix_len));
    }

    println!("\nROUTES (remote pod CIDRs)");
    println!("  {:<18} {:<16} {:<18} {:<8} WHY", "POD CIDR", "NODE IP", "VTEP MAC", "MODE");
    let mut routes: Vec<_> = maps.routes.iter().filter_map(Result::ok).collect();
    routes.sort_by_key(|(k, _)| (k.data(), k.prefix_len()));
    for (key, route) in routes {
        let mode = match route.mode {
            ROUTE_MODE_VXLAN => "vxlan",
            ROUTE_MODE_DIRECT => "direct",
            ROUTE_MODE_UNREACHABLE => "NONE",
            _ => "unknown",
        };
        let next_hop = Ipv4Addr::from(route.next_hop);
        let why = match (route.mode, route.reason) {
            (ROUTE_MODE_UNREACHABLE, ROUTE_REASON_GATEWAY) => {
                format!("host-gw cannot cross gateway {next_hop}; routed unreachable (use --backend vxlan --direct-routing)")
            }
            (ROUTE_MODE_UNREACHABLE, _) => "host-gw has no on-link path to it; routed unreachable".to_owned(),
            (_, ROUTE_REASON_BACKEND) => format!("backend vxlan (next hop {next_hop})"),
            (_, ROUTE_REASON_ON_LINK) => "on-link".to_owned(),
            (_, ROUTE_REASON_GATEWAY) => format!("gateway {next_hop} in between"),
            (_, ROUTE_REASON_NO_ROUTE) => "no underlay route to it; trying on-link".to_owned(),
            _ => String::new(),
        };
        println!(
            "  {:<18} {:<16} {:<18} {:<8} {why}",
            format!("{}/{}", Ipv4Addr::from(key.data()), key.prefix_len()),
            Ipv4Addr::from(route.node_ip).to_string(),
            format_mac(route.vtep_mac),
            mode
        );
    }

    let mut ports: Vec<_> = maps.pod_ports.iter().filter_map(Result::ok).collect();
    if !ports.is_empty() {
        println!("\nPOD_PORTS (local pods the fast path delivers to directly)");
        println!("  {:<18} IFINDEX", "POD MAC");
        ports.sort_by_key(|(_, port)| port.ifindex);
        for (mac, port) in ports {
            println!("  {:<18} {}", format_mac(mac), port.ifindex);
        }
    }

    let totals = maps.counters_total().context("reading COUNTERS")?;
    println!("\nCOUNTERS (all CPUs)");
    println!("  {:<18} {:>12} {:>14}", "COUNTER", "PACKETS", "BYTES");
    for &counter in Counter::ALL {
        println!("  {:<18} {:>12} {:>14}", counter.name(), totals.packets(counter), totals.bytes(counter));
    }
    println!("\nDROPS (all CPUs)");
    println!("  {:<18} {:>12}  WHY", "REASON", "PACKETS");
    for (reason, packets) in totals.drops_by_reason() {
        println!("  {:<18} {packets:>12}  {}", reason.name(), reason.description());
    }
    Ok(())
}

/// The pinned attachments, per interface: which hook decapsulates (what
/// `--decap auto` chose) and where the fast path runs. Kernels that cannot
/// pin TC links (before 6.6) show only the XDP ones.
fn print_attachments(layout: &PinLayout) {
    let interfaces = layout.linked_interfaces();
    if interfaces.is_empty() {
        return;
    }
    println!("\nATTACHMENTS (pinned links)");
    for iface in interfaces {
        let roles: Vec<&str> = LinkRole::ALL
            .into_iter()
            .filter(|role| layout.link(&iface, *role).exists())
            .map(|role| match role {
                LinkRole::TcEgress => "encapsulation at TC egress",
                LinkRole::DecapXdp => "decapsulation at XDP",
                LinkRole::DecapTc => "decapsulation (and fast-path delivery) at TC ingress",
                LinkRole::PodFastPath => "fast path at TC ingress",
                LinkRole::PodDelivered => "kernel-delivered sockets recorded at TC egress",
                LinkRole::SegEncap => "pod tunnels' segments encapsulated at TC ingress",
                LinkRole::GroDeliver => "merged TCP delivered into pods at TC ingress",
            })
            .collect();
        println!("  {iface:<16} {}", roles.join("; "));
    }
}
