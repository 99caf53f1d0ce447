//! The BPF filesystem that pins live on.

use std::{
    ffi::CString,
    io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

/// Where bpffs is conventionally mounted.
pub const BPFFS_MOUNT: &str = "/sys/fs/bpf";
/// `BPF_FS_MAGIC` from `linux/magic.h`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error("mounting bpffs at {path} (the agent needs CAP_SYS_ADMIN to mount it; or mount it yourself: `mount -t bpf bpf {path}`)")]
    Mount {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not on a BPF filesystem: pins must live on bpffs (choose a --bpffs-root under {BPFFS_MOUNT})")]
    NotBpffs { path: PathBuf },
    #[error("creating pin directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{dir} holds the maps of map layout v{version}, newer than this agent's v{MAP_LAYOUT_VERSION}: a newer \
         agent's datapath is still attached and serving from them, and this agent cannot tell what they record, so \
         it leaves them, their links and their routes as they are and does not start. Roll forward to the newer \
         release again; or run that release's `overlay-agent cleanup --bpffs-root {root}` first (pod traffic to other \
         nodes then stops until this agent has reconciled); or remove {dir} deliberately (pod traffic to other nodes \
         then stops until this agent has reconciled, and the routes the newer layout recorded for nodes gone since stay)"
    )]
    NewerLayout { dir: PathBuf, version: u32, root: PathBuf },
    #[error(
        "{dir} holds the maps of map layout v{version}, newer than this agent's v{MAP_LAYOUT_VERSION}: the datapath \
         under {root} is a newer agent's, and only the newer release knows what its layout pins and records (this one \
         would remove the pins that record its routes, and leave the routes), so nothing is removed. Run the newer \
         release's `overlay-agent cleanup --bpffs-root {root}`, which removes the older layouts' pins and routes too"
    )]
    NewerLayoutCleanup { dir: PathBuf, version: u32, root: PathBuf },
}

/// Whether `path` is on a bpffs mount.
pub fn is_bpffs(path: &Path) -> bool {
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid NUL-terminated path and a properly sized out-parameter.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut stat) };
    rc == 0 && stat.f_type == BPF_FS_MAGIC
}

/// Mounts bpffs at [`BPFFS_MOUNT`] when `root` lives under it and nothing is
/// mounted there yet, then creates `root`. Returns whether `root` was created.
pub fn prepare_root(root: &Path) -> Result<bool, BpffsError> {
    let mount = Path::new(BPFFS_MOUNT);
    if root.starts_with(mount) && !is_bpffs(mount) {
        mount_bpffs(mount)?;
    }
    // The nearest existing ancestor tells which filesystem `root` will be on.
    let existing = root.ancestors().find(|p| p.exists()).unwrap_or(root);
    if !is_bpffs(existing) {
        return Err(BpffsError::NotBpffs { path: root.to_owned() });
    }
    let existed = root.is_dir();
    std::fs::create_dir_all(root).map_err(|source| BpffsError::CreateDir {
        path: root.to_owned(),
        source,
    })?;
    Ok(!existed)
}

/// Whether pins under a root outlive the process that makes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Persistence {
    /// On the host's bpffs (or one that stays mounted after we exit).
    Host,
    /// Only in this process's mount namespace; why, for the message.
    Ephemeral(String),
}

/// Tells, before anything is mounted or pinned, whether pins under `root`
/// would outlive this process. They would not when this process has a
/// mount namespace of its own (as under `ip netns exec`) and either the
/// agent would have to mount bpffs itself there, or the bpffs it would pin
/// to is another than the one the host (PID 1) sees at that path.
pub fn pin_persistence(root: &Path) -> Persistence {
    let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    let (own, host) = (ns("self"), ns("1"));
    if own.is_none() || own == host {
        // The host's mount namespace (or a container started as PID 1's
        // sibling cannot be told apart): whatever we mount stays.
        return Persistence::Host;
    }
    let existing = root.ancestors().find(|p| p.exists()).unwrap_or(root);
    if !is_bpffs(existing) {
        if root.starts_with(BPFFS_MOUNT) {
            return Persistence::Ephemeral(format!(
                "{BPFFS_MOUNT} is not mounted in this process's own mount namespace, and a bpffs the agent mounted there would be private to it"
            ));
        }
        return Persistence::Host;
    }
    let device = |path: &Path| std::fs::metadata(path).ok().map(|m| std::os::unix::fs::MetadataExt::dev(&m));
    let host_view = Path::new("/proc/1/root").join(existing.strip_prefix("/").unwrap_or(existing));
    match (device(existing), device(&host_view)) {
        (Some(ours), Some(hosts)) if ours == hosts => Persistence::Host,
        // A container that does not see the host's root through PID 1
        // (its own PID namespace): trust a bpffs someone mounted for us.
        (Some(_), None) => Persistence::Host,
        _ => Persistence::Ephemeral(format!(
            "the bpffs at {} is private to this process's mount namespace, not the host's",
            existing.display()
        )),
    }
}

fn mount_bpffs(path: &Path) -> Result<(), BpffsError> {
    let err = |source| BpffsError::Mount { path: path.to_owned(), source };
    std::fs::create_dir_all(path).map_err(err)?;
    let target = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: all pointers are valid NUL-terminated strings.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            c"mode=0700".as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(())
}

/// Version of the map layout under a pin root. Bump it whenever a shared
/// type in `overlay-common` changes size or meaning: the kernel reuses a
/// pinned map without checking that it still fits, so a new layout must get
/// new pins (and the old ones are removed once the new programs run).
pub const MAP_LAYOUT_VERSION: u32 = 10;

/// Where everything of one agent lives on bpffs:
///
/// ```text
/// <root>/v10/{CONFIG,PEERS,ROUTES,POD_PORTS,KERNEL_SOCKETS,COUNTERS}   maps (versioned layout)
/// <root>/links/<underlay>/{tc_egress,decap_xdp,decap_tc}   attachments
/// <root>/links/<pod bridge>/pod_fastpath   the fast path (--forward bpf)
/// <root>/links/<pod veth>/{pod_fastpath,pod_delivered}
/// <root>/links/ovl-seg1/seg_encap   pod tunnels' segments encapsulated (VXLAN)
/// <root>/links/ovl-gro1/gro_deliver   merged TCP delivered (VXLAN at TC, --forward bpf)
/// ```
///
/// Links are not versioned: a new agent swaps its programs into the pinned
/// links in place, whatever map layout the old programs used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinLayout {
    root: PathBuf,
}

/// One attachment of the datapath to an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkRole {
    /// Encapsulation, TC egress.
    TcEgress,
    /// Decapsulation at XDP.
    DecapXdp,
    /// Decapsulation at TC ingress.
    DecapTc,
    /// The pod-side fast path, TC ingress on the pod bridge and its ports.
    PodFastPath,
    /// TC egress on each pod's veth: what the kernel delivered to a pod.
    PodDelivered,
    /// TC ingress on the segmentation device's receiving end: the segments
    /// of pod tunnels' GSO packets encapsulated.
    SegEncap,
    /// TC ingress on the GRO device's receiving end: merged TCP delivered
    /// into pods, or returned to the underlay's ingress.
    GroDeliver,
}

impl LinkRole {
    pub const ALL: [Self; 7] =
        [Self::TcEgress, Self::DecapXdp, Self::DecapTc, Self::PodFastPath, Self::PodDelivered, Self::SegEncap, Self::GroDeliver];
    /// The programs at the receiving ends of the agent's own device pairs
    /// (see `device_pair`), kept or removed with their devices.
    pub const DEVICE_PAIRS: [Self; 2] = [Self::SegEncap, Self::GroDeliver];

    /// The pin's file name.
    pub const fn file_name(self) -> &'static str {
        match self {
            Self::TcEgress => "tc_egress",
            Self::DecapXdp => "decap_xdp",
            Self::DecapTc => "decap_tc",
            Self::PodFastPath => "pod_fastpath",
            Self::PodDelivered => "pod_delivered",
            Self::SegEncap => "seg_encap",
            Self::GroDeliver => "gro_deliver",
        }
    }
}

impl PinLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of the current map layout.
    pub fn maps_dir(&self) -> PathBuf {
        self.root.join(format!("v{MAP_LAYOUT_VERSION}"))
    }

    /// The pin of one map (`bpftool map dump pinned <this>`).
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    /// The map directories under the root, `v<N>/` of any version, with
    /// their versions.
    fn map_dirs(&self) -> Vec<(u32, PathBuf)> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter_map(|p| {
                let version = p.file_name()?.to_str()?.strip_prefix('v')?.parse::<u32>().ok()?;
                Some((version, p))
            })
            .collect()
    }

    /// Map directories of older layout versions, left by older agents: an
    /// upgrade's to read and to remove once the new programs run. Never a
    /// newer layout's: see [`Self::newer_map_dir`].
    pub fn stale_map_dirs(&self) -> Vec<PathBuf> {
        self.map_dirs().into_iter().filter(|(v, _)| *v < MAP_LAYOUT_VERSION).map(|(_, p)| p).collect()
    }

    /// The newest map directory of a layout newer than this agent's, if
    /// any: a newer agent ran here (this one is a rollback), and its
    /// programs still serve from those maps. This agent does not know that
    /// layout, so it can neither carry nor read what it records.
    pub fn newer_map_dir(&self) -> Option<(u32, PathBuf)> {
        self.map_dirs().into_iter().filter(|(v, _)| *v > MAP_LAYOUT_VERSION).max_by_key(|(v, _)| *v)
    }

    /// Refuses a root that holds a newer layout's maps (see
    /// [`Self::newer_map_dir`]): starting would swap programs with empty
    /// maps into the newer datapath's links, delete the routes its layout
    /// recorded and remove its pins.
    pub fn refuse_newer_layout(&self) -> Result<(), BpffsError> {
        match self.newer_map_dir() {
            Some((version, dir)) => Err(BpffsError::NewerLayout { dir, version, root: self.root.clone() }),
            None => Ok(()),
        }
    }

    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    /// The pin of one attachment to `iface`.
    pub fn link(&self, iface: &str, role: LinkRole) -> PathBuf {
        self.links_dir().join(iface).join(role.file_name())
    }

    /// Interfaces that have pinned attachments.
    pub fn linked_interfaces(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.links_dir()) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        names
    }
}

/// Every map layout version this agent knows, with what it pins: each
/// map's kind, key size, value size and capacity, as the embedded eBPF
/// object defines them (see `layout_fingerprint` in the tests). A layout
/// change without a new version fails `every_map_layout_change_bumps_the_version`:
/// bump [`MAP_LAYOUT_VERSION`] and add the new line here.
///
/// History: v2 was first
/// assigned with a 40-byte CONFIG and without POD_PORTS and KERNEL_SOCKETS,
/// which were added later under the same version (issue 13). The line for
/// v2 is main's layout as of 2026-12-01.
#[cfg(test)]
const LAYOUTS: &[(u32, &str)] = &[(
    2,
    "CONFIG type=2 key=4 value=56 max=1; COUNTERS type=6 key=4 value=136 max=1; \
     KERNEL_SOCKETS type=9 key=8 value=1 max=65536; PEERS type=1 key=4 value=8 max=16384; \
     POD_PORTS type=1 key=6 value=4 max=4096; ROUTES type=11 key=8 value=16 max=16384",
), (
    // v3: COUNTERS became one slot per counter and drop reason (16).
    3,
    "CONFIG type=2 key=4 value=56 max=1; COUNTERS type=6 key=4 value=16 max=16; \
     KERNEL_SOCKETS type=9 key=8 value=1 max=65536; PEERS type=1 key=4 value=8 max=16384; \
     POD_PORTS type=1 key=6 value=4 max=4096; ROUTES type=11 key=8 value=16 max=16384",
), (
    // v4: two more drop reasons (bare_tunnel_source, ecn_not_ect); Config's
    // padding became xdp_decap (a meaning, not a size, so not seen here).
    4,
    "CONFIG type=2 key=4 value=56 max=1; COUNTERS type=6 key=4 value=16 max=18; \
     KERNEL_SOCKETS type=9 key=8 value=1 max=65536; PEERS type=1 key=4 value=8 max=16384; \
     POD_PORTS type=1 key=6 value=4 max=4096; ROUTES type=11 key=8 value=16 max=16384",
), (
    // v5: ROUTES and PEERS hold 65,536 nodes (overlay_common::MAX_PEERS),
    // not 16,384: a cluster of 20,000 nodes fits.
    5,
    "CONFIG type=2 key=4 value=56 max=1; COUNTERS type=6 key=4 value=16 max=18; \
     KERNEL_SOCKETS type=9 key=8 value=1 max=65536; PEERS type=1 key=4 value=8 max=65536; \
     POD_PORTS type=1 key=6 value=4 max=4096; ROUTES type=11 key=8 value=16 max=65536",
), (
    // v6: Config gained seg_ifindex (60 bytes); a counter (segmented) and a
    // drop reason (segment_no_route).
    6,
    "CONFIG type=2 key=4 value=60 max=1; COUNTERS type=6 key=4 value=16 max=20; \
     KERNEL_SOCKETS type=9 key=8 value=1 max=65536; PEERS type=1 key=4 value=8 max=65536; \
     POD_PORTS type=1 key=6 value=4 max=4096; ROUTES type=11 key=8 value=16 max=65536",
), (
    // v7: Config gained gro_ifindex (64 bytes); two counters
    // (gro_in, gro_returned) and a drop reason (gro_unconfigured).
    7,
    "CONFIG type=2 key=4 value=64 max=1; COUNTERS type=6 key=4 value=16 max=23; \
     KERNEL_SOCKETS type=9 key=8 value=1 max=65536; PEERS type=1 key=4 value=8 max=65536; \
     POD_PORTS type=1 key=6 value=4 max=4096; ROUTES type=11 key=8 value=16 max=65536",
), (
    // v8: a drop reason (too_big).
    8,
    "CONFIG type=2 key=4 value=64 max=1; COUNTERS type=6 key=4 value=16 max=24; \
     KERNEL_SOCKETS type=9 key=8 value=1 max=65536; PEERS type=1 key=4 value=8 max=65536; \
     POD_PORTS type=1 key=6 value=4 max=4096; ROUTES type=11 key=8 value=16 max=65536",
), (
    // v9: a drop reason (forwarded_tunnel).
    9,
    "CONFIG type=2 key=4 value=64 max=1; COUNTERS type=6 key=4 value=16 max=25; \
     KERNEL_SOCKETS type=9 key=8 value=1 max=65536; PEERS type=1 key=4 value=8 max=65536; \
     POD_PORTS type=1 key=6 value=4 max=4096; ROUTES type=11 key=8 value=16 max=65536",
), (
    // v10: Config gained pod_bridge_ip (68 bytes); xdp_decap names one of
    // four DECAP_HOOK_* stages, and XDP acts only in the three not TC's.
    10,
    "CONFIG type=2 key=4 value=68 max=1; COUNTERS type=6 key=4 value=16 max=25; \
     KERNEL_SOCKETS type=9 key=8 value=1 max=65536; PEERS type=1 key=4 value=8 max=65536; \
     POD_PORTS type=1 key=6 value=4 max=4096; ROUTES type=11 key=8 value=16 max=65536",
)];

#[cfg(test)]
mod tests {
    use super::*;

    /// The pinned maps as the embedded eBPF object defines them, sorted by
    /// name: what must not change under one layout version.
    fn layout_fingerprint() -> String {
        assert!(
            crate::object::has_programs(),
            "this build has no eBPF object to read the map layout from: run the tests with `cargo xtask test`"
        );
        let object = aya_obj::Object::parse(crate::object::EBPF_OBJECT).expect("parsing the embedded eBPF object");
        let mut names: Vec<&str> = overlay_common::map_names::ALL.to_vec();
        names.sort_unstable();
        names
            .iter()
            .map(|name| {
                let map = object.maps.get(*name).unwrap_or_else(|| panic!("the eBPF object has no map {name}"));
                format!(
                    "{name} type={} key={} value={} max={}",
                    map.map_type(),
                    map.key_size(),
                    map.value_size(),
                    map.max_entries()
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    #[test]
    fn every_map_layout_change_bumps_the_version() {
        let current = layout_fingerprint();
        let normalise = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
        let known = LAYOUTS.iter().find(|(v, _)| *v == MAP_LAYOUT_VERSION).map(|(_, l)| normalise(l));
        assert_eq!(
            known.as_deref(),
            Some(normalise(&current).as_str()),
            "the pinned maps' layout is not the one recorded for v{MAP_LAYOUT_VERSION}: a new layout needs a new \
             MAP_LAYOUT_VERSION (pinned maps of the old one would be reused and misread), and a line for it in \
             LAYOUTS:\n    ({}, \"{current}\")",
            MAP_LAYOUT_VERSION + 1
        );
        let mut versions: Vec<u32> = LAYOUTS.iter().map(|(v, _)| *v).collect();
        versions.dedup();
        assert_eq!(versions.len(), LAYOUTS.len(), "one line per version in LAYOUTS");
        let distinct: std::collections::BTreeSet<String> = LAYOUTS.iter().map(|(_, l)| normalise(l)).collect();
        assert_eq!(distinct.len(), LAYOUTS.len(), "two versions with the same layout in LAYOUTS");
    }

    #[test]
    fn layout_paths() {
        let layout = PinLayout::new("/sys/fs/bpf/overlay");
        assert_eq!(layout.map("ROUTES"), Path::new("/sys/fs/bpf/overlay/v10/ROUTES"));
        assert_eq!(
            layout.link("eth0", LinkRole::DecapXdp),
            Path::new("/sys/fs/bpf/overlay/links/eth0/decap_xdp")
        );
    }

    #[test]
    fn stale_map_dirs_are_older_versions_only() {
        let dir = std::env::temp_dir().join(format!("overlay-layout-{}", std::process::id()));
        let current = format!("v{MAP_LAYOUT_VERSION}");
        let (newer, newest) = (format!("v{}", MAP_LAYOUT_VERSION + 1), format!("v{}", MAP_LAYOUT_VERSION + 2));
        for sub in ["v0", "v2", current.as_str(), newer.as_str(), newest.as_str(), "links", "vx"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let layout = PinLayout::new(&dir);
        let mut stale = layout.stale_map_dirs();
        stale.sort();
        let found = layout.newer_map_dir();
        let refused = layout.refuse_newer_layout();
        std::fs::remove_dir_all(&dir).unwrap();
        // A newer layout's maps are a newer agent's running datapath (a
        // rollback): never stale, never removed.
        assert_eq!(stale, vec![dir.join("v0"), dir.join("v2")]);
        assert_eq!(found, Some((MAP_LAYOUT_VERSION + 2, dir.join(&newest))));
        match refused {
            Err(BpffsError::NewerLayout { dir: refused, version, .. }) => {
                assert_eq!((refused, version), (dir.join(&newest), MAP_LAYOUT_VERSION + 2));
            }
            other => panic!("a root with a newer layout must be refused: {other:?}"),
        }
    }

    #[test]
    fn a_root_with_older_layouts_only_is_not_refused() {
        let dir = std::env::temp_dir().join(format!("overlay-layout-older-{}", std::process::id()));
        let current = format!("v{MAP_LAYOUT_VERSION}");
        for sub in ["v2", current.as_str(), "links"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let layout = PinLayout::new(&dir);
        let (found, refused) = (layout.newer_map_dir(), layout.refuse_newer_layout());
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(found, None);
        assert!(refused.is_ok(), "{refused:?}");
    }
}
