//! `overlay-agent`: the node agent's command line.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser as _;
use overlay_agent::{
    cli::{Cli, Command},
    datapath::{Datapath, DecapHook},
};

mod inspect;
mod run;

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match Cli::parse().command {
        // Before anything is touched: below 5.13 the datapath cannot
        // encapsulate (preflight::DATAPATH_MINIMUM).
        Command::Run(args) => overlay_agent::preflight::check_kernel(overlay_agent::preflight::DATAPATH_MINIMUM)
            .map_err(anyhow::Error::from)
            .and_then(|_| run::run(args)),
        Command::Inspect { bpffs_root } => inspect::inspect(&bpffs_root),
        Command::Cleanup { bpffs_root, subnet_file, keep_subnet_file, cni_conf } => {
            // subnet.env and the CNI config are flannel's files too: where no
            // pin root says the agent ran since boot (a node flannel serves,
            // in a cluster half migrated), they are flannel's and stay.
            let ran_here = bpffs_root.exists();
            let subnet_file = (!keep_subnet_file).then_some(subnet_file.as_path());
            let cni_conf = cni_conf.as_deref();
            if !ran_here {
                let shared: Vec<String> = subnet_file.into_iter().chain(cni_conf).map(|p| p.display().to_string()).collect();
                if !shared.is_empty() {
                    println!(
                        "left {}: no pins under {}, so the agent has not run on this node since it booted, and these \
                         files are not its own (flannel writes the same ones)",
                        shared.join(" and "),
                        bpffs_root.display()
                    );
                }
            }
            cleanup(&bpffs_root, subnet_file.filter(|_| ran_here), cni_conf.filter(|_| ran_here))
        }
        Command::KernelCheck { min } => kernel_check(&min),
        Command::Check { iface, bpffs_root, decap } => check(&iface, bpffs_root, decap.into()),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            // The whole cause chain on one line, without a backtrace: this is
            // what an operator reads.
            eprintln!("error: {}", overlay_agent::report::chain(&err));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Removes one agent's datapath: the routes whose destinations are in the
/// root's `ROUTES` maps, this layout's and older ones' (so another root's
/// routes in the same namespace stay), its device pairs and netfilter
/// rules, subnet.env and the CNI config, and the pins under the root last:
/// they are what tells a cleanup run again after a failure (an init
/// container restarted) that the agent ran here, and which interfaces and
/// routes were its own. A root not on bpffs, or holding a newer map
/// layout's pins, is refused before anything is touched.
fn cleanup(root: &std::path::Path, subnet_file: Option<&std::path::Path>, cni_conf: Option<&std::path::Path>) -> anyhow::Result<()> {
    use overlay_agent::{bpffs, maps::DatapathMaps, routes};
    if root.exists() && !bpffs::is_bpffs(root) {
        return Err(bpffs::BpffsError::NotBpffs { path: root.to_owned() }.into());
    }
    let layout = bpffs::PinLayout::new(root);
    // Only the newer release knows what its layout pins and records; every
    // release's cleanup knows the layouts before it, so the newer one's
    // cleanup removes everything, where this one would leave its routes.
    if let Some((version, dir)) = layout.newer_map_dir() {
        return Err(bpffs::BpffsError::NewerLayoutCleanup { dir, version, root: root.to_owned() }.into());
    }
    let interfaces = layout.linked_interfaces();
    let current = layout.map(overlay_common::map_names::ROUTES);
    let mut records = Vec::new();
    let mut ours = Vec::new();
    if current.exists() {
        ours = DatapathMaps::route_destinations(root).context("reading which routes this root installed")?;
        records.push(current);
    }
    // An older layout's ROUTES is the only record of the routes its agent
    // installed where no newer agent took the root over (an upgrade whose
    // agent never started), and it goes with the pins below: read it first.
    let older: Vec<_> = layout.stale_map_dirs().into_iter().map(|dir| dir.join(overlay_common::map_names::ROUTES)).filter(|p| p.exists()).collect();
    if !older.is_empty() {
        ours.extend(DatapathMaps::older_layouts_route_destinations(root).context("reading which routes the older map layouts under this root installed")?);
        records.extend(older);
    }
    if records.is_empty() {
        println!("no ROUTES map under {}: no route can be told to be this root's, so none is removed", root.display());
        records.push(layout.map(overlay_common::map_names::ROUTES));
    }
    let installed: Vec<_> = routes::with_our_protocol().context("listing the agent's routes")?.into_iter().filter(|c| ours.contains(c)).collect();
    // The nexthops our recorded routes use are ours; they go once their
    // routes are gone.
    let mut nexthops = routes::Nexthops::adopt(|c| ours.contains(c)).context("listing the agent's nexthops")?;
    let nexthop_count = nexthops.ids().count();
    if let Some((cidr, refused)) = routes::remove_all(&mut nexthops, &installed).context("removing the agent's routes")?.into_iter().next() {
        anyhow::bail!("removing the route to {cidr}: {refused}");
    }
    println!(
        "removed {} routes (proto {}, destinations in {}) and the {nexthop_count} nexthops they used",
        installed.len(),
        routes::ROUTE_PROTO,
        records.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    );
    // Those no route leads to any more: left by a crash before their route,
    // or by routes deleted while the agent was down.
    let orphans = routes::remove_orphaned_nexthops().context("removing the agent's nexthops no route uses")?;
    if !orphans.is_empty() {
        println!("removed {} nexthops of ours that no route used", orphans.len());
    }
    // Before TCX the TC programs are clsact filters, which no pin holds.
    for iface in &interfaces {
        Datapath::detach_clsact(iface).with_context(|| format!("detaching from {iface}"))?;
    }
    // The device pairs, when this root's programs used them.
    for pair in overlay_agent::device_pair::PairKind::ALL.map(overlay_agent::device_pair::PairKind::pair) {
        use overlay_agent::device_pair::DevicePairError;
        if !interfaces.iter().any(|i| i == pair.receive_end) {
            continue;
        }
        match pair.remove(None) {
            Ok(true) => println!("removed the {} {}", pair.what, pair.device_names().join(", ")),
            Ok(false) => {}
            // Someone else's device under that name: never ours to remove.
            Err(err @ DevicePairError::NotOurs { .. }) => println!("left {}: {err}", pair.send_end),
            Err(err) => return Err(err).with_context(|| format!("removing the {}", pair.what)),
        }
    }
    let rules = overlay_agent::netfilter::remove().context("removing the masquerade and FORWARD rules")?;
    if let Some(what) = &rules.foreign_table {
        println!("left the nftables table ip {}: not the agent's ({what})", overlay_agent::netfilter::NFT_TABLE);
    }
    println!(
        "removed {} and the FORWARD accept rules from {}",
        if rules.masquerade_table { "the nftables table ip overlay" } else { "no nftables table" },
        if rules.forward.is_empty() { "no iptables".to_owned() } else { rules.forward.iter().map(|v| format!("iptables-{v}")).collect::<Vec<_>>().join(", ") }
    );
    for file in subnet_file.into_iter().chain(cni_conf) {
        remove_file_if_present(file)?;
    }
    let left = Datapath::remove_pins(root).with_context(|| format!("removing the pins under {}", root.display()))?;
    let detached = if interfaces.is_empty() { "no interface".to_owned() } else { interfaces.join(", ") };
    println!("detached from {detached} and removed the pins under {}", root.display());
    if !left.is_empty() {
        let left: Vec<String> = left.iter().map(|p| p.display().to_string()).collect();
        println!("left what the agent did not create: {}", left.join(", "));
    }
    Ok(())
}

fn remove_file_if_present(path: &std::path::Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => println!("removed {}", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
    }
    Ok(())
}

fn kernel_check(min: &str) -> anyhow::Result<()> {
    let minimum = overlay_agent::preflight::major_minor(min)
        .with_context(|| format!("--min {min:?}: expected MAJOR.MINOR, e.g. 6.6"))?;
    let release = overlay_agent::preflight::check_kernel(minimum)?;
    println!("kernel {release}: at least {min}");
    Ok(())
}

/// `check` pins into a directory of its own: a fresh one, never an
/// existing one (a running agent's root would lose its datapath), and
/// removes only what it pinned there.
fn check(iface: &str, root: Option<PathBuf>, hook: DecapHook) -> anyhow::Result<()> {
    let root = root.unwrap_or_else(|| {
        PathBuf::from(format!("{}/overlay-check-{}", overlay_agent::bpffs::BPFFS_MOUNT, std::process::id()))
    });
    if root.exists() && !overlay_agent::bpffs::is_bpffs(&root) {
        return Err(overlay_agent::bpffs::BpffsError::NotBpffs { path: root }.into());
    }
    if root.exists() {
        anyhow::bail!(
            "--bpffs-root {} already exists: check needs a directory of its own on bpffs (it removes its pins afterwards); name one that does not exist, or leave the flag out",
            root.display()
        );
    }
    // Before TCX our filters sit at fixed priorities: check's would replace
    // a running datapath's (and its detach delete them).
    let running = Datapath::clsact_filters_of_ours(iface).context("looking for the datapath's filters")?;
    if !running.is_empty() {
        anyhow::bail!(
            "{iface} already carries the datapath's filters ({}): on this kernel (no TCX before 6.6) check would replace them, and so the running datapath; run check on a node or interface without the agent, or `cleanup` first",
            running.join(", ")
        );
    }
    let result = check_in(iface, &root, hook);
    let detach = Datapath::detach_clsact(iface).context("detaching the check's filters");
    let cleanup = Datapath::remove_pins(&root).context("cleaning up the check's pins").map(drop).and(detach);
    result.and(cleanup)
}

fn check_in(iface: &str, root: &std::path::Path, hook: DecapHook) -> anyhow::Result<()> {
    let mut datapath = Datapath::load(root).context("loading the datapath")?;
    datapath
        .attach(iface, hook, false)
        .with_context(|| format!("attaching to {iface}"))?;
    println!("attached to {iface} ({hook:?}); maps pinned under {}", root.display());
    println!("{:<22} {:>6} {:<10} {:>12}", "PROGRAM", "ID", "TYPE", "VERIFIED");
    for p in datapath.programs() {
        let verified = p.verified_instructions.map_or("-".to_owned(), |n| format!("{n} insns"));
        println!("{:<22} {:>6} {:<10} {:>12}", p.name, p.id, p.kind, verified);
    }
    for name in overlay_common::map_names::ALL {
        println!("map {name:<10} {}", datapath.layout().map(name).display());
    }
    println!("detaching and removing pins");
    Ok(())
}
