//! Loading the eBPF programs, pinning their maps and attaching them to the
//! underlay interface.
//!
//! # Minimum kernel version
//!
//! 5.13: `bpf_skb_adjust_room` with `BPF_F_ADJ_ROOM_ENCAP_L2_ETH`. TC
//! programs attach through TCX on 6.6 and later, through a clsact qdisc
//! before that.
//!
//! The datapath outlives the agent. TCX links (6.6) and XDP links (5.9)
//! are pinned, and a restarted agent swaps its programs into them without
//! a gap. Before 6.6 the TC programs are clsact filters, which cannot be
//! pinned but stay until deleted: each role has a fixed priority and
//! handle ([`clsact`]), where a restarted agent replaces the program in
//! place, and its pin path holds an empty directory marking the attachment
//! for the pin-based bookkeeping (and `cleanup`).

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::Array,
    programs::{
        Program, ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
        xdp::XdpLink,
    },
    util::KernelVersion,
};
use overlay_common::{Config, map_names, program_names};

use crate::{
    bpffs::{self, LinkRole, PinLayout},
    clsact::{self, ClsactError},
    object,
};

/// Where the decapsulation program hooks into the underlay interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecapHook {
    /// XDP in the given mode (the default, `XdpMode::Default`, lets the
    /// kernel prefer native XDP).
    Xdp(XdpMode),
    /// TC ingress: veth underlays, host-gw, or where XDP is taken
    /// ([`crate::hook`]).
    TcIngress,
}

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error(
        "this overlay-agent was built without its eBPF programs (no eBPF toolchain at build time); \
         run `cargo xtask setup` and rebuild"
    )]
    NoPrograms,
    #[error(
        "no permission to load BPF programs: run as root, or grant CAP_BPF, CAP_NET_ADMIN and \
         CAP_PERFMON (CAP_SYS_ADMIN on kernels before 5.8)"
    )]
    NoPermission,
    #[error(transparent)]
    Bpffs(#[from] bpffs::BpffsError),
    #[error("loading the eBPF object (maps pinned under {root})")]
    Load {
        root: PathBuf,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error(
        "the map pinned at {path} is {pinned}, but this agent's programs use {expected}: pins of another build \
         under the same layout version; stop the agent that left them and run `overlay-agent cleanup` on its \
         --bpffs-root (pod traffic stops until the agent starts again)"
    )]
    PinnedMapShape { path: PathBuf, pinned: String, expected: String },
    #[error("reading the map pinned at {path}")]
    PinnedMapInfo {
        path: PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("the eBPF object has no program {0}; agent and programs are out of step")]
    MissingProgram(&'static str),
    #[error("the kernel verifier rejected program {name}; its log:\n{verifier_log}\n")]
    Verifier {
        name: &'static str,
        verifier_log: String,
        #[source]
        source: io::Error,
    },
    #[error("program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("interface {0:?} does not exist in this network namespace (check --iface)")]
    UnknownInterface(String),
    #[error("attaching {name} to {iface}")]
    Attach {
        name: &'static str,
        iface: String,
        #[source]
        source: ProgramError,
    },
    #[error("removing pin {path}")]
    Unpin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("pinning link {path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("swapping our program into the pinned link {path}")]
    Swap {
        path: PathBuf,
        #[source]
        source: ProgramError,
    },
    #[error("opening the pinned link {path}")]
    PinnedLink {
        path: PathBuf,
        #[source]
        source: LinkError,
    },
    #[error(
        "{program} is no longer attached to {iface} (detached by someone; an interface made again under its name \
         is attached to again by itself); restart the agent, which attaches it again"
    )]
    NotAttached { program: &'static str, iface: String },
    #[error("interface {0:?} the datapath was attached to is gone; the agent attaches to it again when it is back")]
    InterfaceGone(String),
    #[error("asking the kernel what is attached to {iface}")]
    Query {
        iface: String,
        #[source]
        source: io::Error,
    },
    #[error("the clsact filters of {iface}")]
    Clsact {
        iface: String,
        #[source]
        source: ClsactError,
    },
}

/// The loaded programs and their pinned maps.
pub struct Datapath {
    ebpf: Ebpf,
    layout: PinLayout,
    maps_adopted: bool,
}

/// How one attachment was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkOutcome {
    /// Attached fresh and pinned.
    Attached,
    /// A pinned link was found and the new program swapped into it
    /// atomically (`BPF_LINK_UPDATE`): no packet saw a gap.
    Swapped,
    /// Attached, but the kernel cannot pin this kind of attachment
    /// (netlink TC before 6.6, netlink XDP before 5.9): it lasts as long as
    /// this process.
    NotPinnable,
}

/// What [`Datapath::attach`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachReport {
    pub egress: LinkOutcome,
    pub decap: LinkOutcome,
    /// Pins of attachments this agent no longer wants (another decap hook,
    /// another interface, an older map layout), removed after the new
    /// programs were in place.
    pub removed: Vec<PathBuf>,
}

/// What `inspect`-style output shows about one loaded program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramSummary {
    pub name: &'static str,
    pub id: u32,
    pub kind: &'static str,
    pub verified_instructions: Option<u32>,
}

/// One map's shape as `bpftool map show` would name it.
fn shape(map_type: u32, key: u32, value: u32, max: u32) -> String {
    format!("type {map_type}, key {key} B, value {value} B, {max} entries")
}

/// Refuses pinned maps whose kind, key, value or capacity differ from the
/// embedded object's definition of the same name.
fn check_pinned_shapes(layout: &PinLayout) -> Result<(), DatapathError> {
    let Ok(object) = aya_obj::Object::parse(object::EBPF_OBJECT) else {
        // The loader reports an unparsable object with its own error.
        return Ok(());
    };
    for name in map_names::ALL {
        let path = layout.map(name);
        let Some(def) = object.maps.get(name) else { continue };
        if !path.exists() {
            continue;
        }
        let info = aya::maps::MapInfo::from_pin(&path)
            .map_err(|source| DatapathError::PinnedMapInfo { path: path.clone(), source })?;
        let pinned_type = info.map_type().map(|t| t as u32).unwrap_or(u32::MAX);
        let pinned = shape(pinned_type, info.key_size(), info.value_size(), info.max_entries());
        let expected = shape(def.map_type(), def.key_size(), def.value_size(), def.max_entries());
        if pinned != expected {
            return Err(DatapathError::PinnedMapShape { path, pinned, expected });
        }
    }
    Ok(())
}

impl Datapath {
    /// Loads the programs, passing each through the kernel's verifier, and
    /// creates (or reopens) the maps pinned under `root` (see
    /// [`PinLayout`]).
    pub fn load(root: &Path) -> Result<Self, DatapathError> {
        if !object::has_programs() {
            return Err(DatapathError::NoPrograms);
        }
        if !may_load_bpf() {
            return Err(DatapathError::NoPermission);
        }
        // Every signal is blocked on this thread while the kernel is asked
        // to load anything: a signal pending for the loading thread makes
        // the verifier give up with EAGAIN, and not only ours. aya's
        // feature probes (small programs it loads once per process, inside
        // `EbpfLoader::load`) take EAGAIN for "unsupported", and the
        // object then fails to relocate (`SectionNotFound` in
        // `overlay_tc_pod`): load.rs's tests, whose child processes exiting
        // send SIGCHLD, failed so. A process-wide signal goes to another
        // thread meanwhile, or waits the milliseconds until the load is done.
        let _blocked = SignalsBlocked::on_this_thread();
        let layout = PinLayout::new(root);
        // A newer layout's maps are a newer agent's running datapath (a
        // rollback): nothing may be pinned beside them or swapped in.
        layout.refuse_newer_layout()?;
        bpffs::prepare_root(&layout.maps_dir())?;
        let maps_adopted = map_names::ALL.iter().all(|name| layout.map(name).exists());
        // aya reuses a pinned map whatever its shape, so pins left under this
        // layout version by a build with other sizes would be misread (a
        // shorter COUNTERS loses the last reasons' counts, a smaller value
        // is read past its end): refuse them before anything attaches.
        check_pinned_shapes(&layout)?;
        let mut loader = EbpfLoader::new();
        for name in map_names::ALL {
            let _: &mut EbpfLoader<'_> = loader.map_pin_path(name, layout.map(name));
        }
        let mut ebpf = loader
            .load(object::EBPF_OBJECT)
            .map_err(|source| DatapathError::Load { root: root.to_owned(), source: Box::new(source) })?;
        for name in program_names::ALL {
            let program = ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingProgram(name))?;
            let loaded = match program {
                Program::SchedClassifier(p) => retry_interrupted_load(|| p.load()),
                Program::Xdp(p) => retry_interrupted_load(|| p.load()),
                _ => return Err(DatapathError::MissingProgram(name)),
            };
            loaded.map_err(|source| match source {
                ProgramError::LoadError { io_error, verifier_log } => DatapathError::Verifier {
                    name,
                    verifier_log: verifier_log.to_string(),
                    source: io_error,
                },
                source => DatapathError::Program { name, source },
            })?;
        }
        Ok(Self { ebpf, layout, maps_adopted })
    }

    /// Whether every map was already pinned (an agent ran here before), so
    /// the maps already hold the cluster's state.
    pub fn maps_adopted(&self) -> bool {
        self.maps_adopted
    }

    /// Whether CONFIG is configured. Pinned maps that are not were left by
    /// a start that stopped before it carried an older layout's state into
    /// them (killed while the verifier ran, say): the carry writes CONFIG
    /// last, so configured means a whole state.
    pub fn configured(&self) -> bool {
        self.ebpf
            .map(map_names::CONFIG)
            .and_then(|map| Array::<_, Config>::try_from(map).ok())
            .and_then(|config| config.get(&0, 0).ok())
            .is_some_and(|config| config.enabled != 0)
    }

    pub fn layout(&self) -> &PinLayout {
        &self.layout
    }

    /// The underlying aya object, for map access.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Attaches encapsulation (TC egress) and decapsulation to `iface` and
    /// pins the links, so they outlive this process. Where a pinned link
    /// exists, the new program replaces the old one inside it atomically.
    /// Attachments this agent no longer wants (the other decap hook,
    /// another interface) are removed last; map pins of older layouts
    /// stay for [`Self::remove_older_layouts`].
    /// With `fast_path` (`--forward bpf`), the fast path's own
    /// attachments (the bridge and the pods' veths, see
    /// [`Self::attach_pod_fast_path`]) are kept, and the decapsulation's TC
    /// program is attached beside XDP for the fast path's inbound half. A
    /// fresh attachment is undone if a later one fails.
    pub fn attach(&mut self, iface: &str, hook: DecapHook, fast_path: bool) -> Result<AttachReport, DatapathError> {
        self.attach_with_handover(iface, hook, fast_path, || {})
    }

    /// [`Self::attach`], running `handover` once every program of the new
    /// hook is attached and before those of the other hook are removed:
    /// where the pinned CONFIG hands decapsulation from one hook to the
    /// other while both are there (see `Config::xdp_decap`). Not run if
    /// attaching fails.
    pub fn attach_with_handover(
        &mut self,
        iface: &str,
        hook: DecapHook,
        fast_path: bool,
        handover: impl FnOnce(),
    ) -> Result<AttachReport, DatapathError> {
        if crate::iface::interface_index(iface).is_none() {
            return Err(DatapathError::UnknownInterface(iface.to_owned()));
        }
        let needs_clsact = needs_clsact();
        if needs_clsact {
            // Already present is fine; a real failure shows up in attach.
            let _ = tc::qdisc_add_clsact(iface);
        }
        let decap_role = match hook {
            DecapHook::Xdp(_) => LinkRole::DecapXdp,
            DecapHook::TcIngress => LinkRole::DecapTc,
        };
        let egress = self.attach_role(iface, LinkRole::TcEgress, hook)?;
        let decap = match self.attach_role(iface, decap_role, hook) {
            Ok(decap) => decap,
            Err(err) => {
                if egress == LinkOutcome::Attached {
                    // Never leave the interface half-programmed.
                    self.undo_fresh(iface, LinkRole::TcEgress);
                }
                return Err(err);
            }
        };
        // The fast path's inbound half runs at TC ingress; with XDP
        // decapsulating, that program is attached as well, after XDP.
        let deliver_at_tc = fast_path && decap_role == LinkRole::DecapXdp;
        if deliver_at_tc && let Err(err) = self.attach_role(iface, LinkRole::DecapTc, hook) {
            for (role, outcome) in [(LinkRole::TcEgress, egress), (decap_role, decap)] {
                if outcome == LinkOutcome::Attached {
                    self.undo_fresh(iface, role);
                }
            }
            return Err(err);
        }
        handover();
        let mut unwanted: Vec<PathBuf> = LinkRole::ALL
            .into_iter()
            .filter(|role| *role != LinkRole::TcEgress && *role != decap_role)
            .filter(|role| !(deliver_at_tc && *role == LinkRole::DecapTc))
            .map(|role| self.layout.link(iface, role))
            .collect();
        for other in self.layout.linked_interfaces().into_iter().filter(|i| i != iface) {
            // The device pairs' programs are the agent's to keep or remove
            // with the devices (see `device_pair`).
            if LinkRole::DEVICE_PAIRS.iter().any(|role| self.layout.link(&other, *role).exists()) {
                continue;
            }
            // The fast path's attachments (the bridge and its ports) are
            // kept while it is wanted; its own sync prunes them.
            if fast_path && self.layout.link(&other, LinkRole::PodFastPath).exists() {
                let roles = LinkRole::ALL
                    .into_iter()
                    .filter(|role| *role != LinkRole::PodFastPath && *role != LinkRole::PodDelivered);
                unwanted.extend(roles.map(|role| self.layout.link(&other, role)));
                continue;
            }
            unwanted.extend(LinkRole::ALL.map(|role| self.layout.link(&other, role)));
            unwanted.push(self.layout.links_dir().join(other));
        }
        if needs_clsact {
            // Filters are not pins: delete those of unwanted roles (and any
            // stacked by agents before fixed priorities) on every interface
            // whose markers are about to go.
            let keep_here: Vec<LinkRole> = [Some(LinkRole::TcEgress), (decap_role == LinkRole::DecapTc || deliver_at_tc).then_some(LinkRole::DecapTc)]
                .into_iter()
                .flatten()
                .collect();
            let mut interfaces = self.layout.linked_interfaces();
            if !interfaces.iter().any(|i| i == iface) {
                interfaces.push(iface.to_owned());
            }
            for other in interfaces {
                let keep: Vec<LinkRole> = if other == iface {
                    keep_here.clone()
                } else if let Some(role) = LinkRole::DEVICE_PAIRS.into_iter().find(|role| self.layout.link(&other, *role).exists()) {
                    vec![role]
                } else if fast_path && self.layout.link(&other, LinkRole::PodFastPath).exists() {
                    // The bridge has the fast path's filter; a pod's veth
                    // also the one recording what the kernel delivers to
                    // its pod (the filter that keeps DNATed replies on the
                    // kernel's path), which must not lapse until the
                    // fast path's sync attaches it again.
                    [LinkRole::PodFastPath, LinkRole::PodDelivered]
                        .into_iter()
                        .filter(|role| self.layout.link(&other, *role).exists())
                        .collect()
                } else {
                    Vec::new()
                };
                delete_clsact_filters(&other, &keep)?;
            }
        }
        let mut removed = Vec::new();
        for path in unwanted {
            if !path.exists() {
                continue;
            }
            // Only what the agent creates: pins, and its own directories
            // once they hold nothing else.
            let left = if path.parent() == Some(&self.layout.links_dir()) {
                remove_link_dir(&path)?
            } else if path.is_dir() {
                remove_map_dir(&path)?
            } else {
                remove_pin(&path).map(|()| Vec::new())?
            };
            if left.is_empty() {
                removed.push(path);
            }
        }
        Ok(AttachReport { egress, decap, removed })
    }

    /// Removes the map directories of older layouts (an upgrade's), once
    /// the routes they record are gone
    /// ([`crate::apply::Applier::remove_older_layouts_routes`]): until
    /// then they are those routes' only record, which a start that fails
    /// or dies after its attach must find again. Returns the directories
    /// removed whole.
    pub fn remove_older_layouts(&self) -> Result<Vec<PathBuf>, DatapathError> {
        let mut removed = Vec::new();
        for dir in self.layout.stale_map_dirs() {
            if remove_map_dir(&dir)?.is_empty() {
                removed.push(dir);
            }
        }
        Ok(removed)
    }

    /// Attaches the fast path's program (TC ingress) to `iface`, the pod
    /// bridge or one of its ports, and pins the link, or swaps the program
    /// into the pinned link. Packets it does not take go on untouched, so
    /// attaching it never cuts a path.
    pub fn attach_pod_fast_path(&mut self, iface: &str) -> Result<LinkOutcome, DatapathError> {
        if crate::iface::interface_index(iface).is_none() {
            return Err(DatapathError::UnknownInterface(iface.to_owned()));
        }
        if needs_clsact() {
            let _ = tc::qdisc_add_clsact(iface);
        }
        self.attach_role(iface, LinkRole::PodFastPath, DecapHook::TcIngress)
    }

    /// Attaches the fast path to a pod's veth: first what records the
    /// sockets the kernel delivers to the pod (TC egress), then the out
    /// half (TC ingress), so the pod is never fast one way while its
    /// NATed connections go unrecorded. Undoes the first if the second
    /// fails.
    pub fn attach_pod_port(&mut self, iface: &str) -> Result<LinkOutcome, DatapathError> {
        if crate::iface::interface_index(iface).is_none() {
            return Err(DatapathError::UnknownInterface(iface.to_owned()));
        }
        if needs_clsact() {
            let _ = tc::qdisc_add_clsact(iface);
        }
        let delivered = self.attach_role(iface, LinkRole::PodDelivered, DecapHook::TcIngress)?;
        self.attach_role(iface, LinkRole::PodFastPath, DecapHook::TcIngress).inspect_err(|_| {
            if delivered == LinkOutcome::Attached {
                self.undo_fresh(iface, LinkRole::PodDelivered);
            }
        })
    }

    /// Attaches `role`'s program (TC ingress) to `iface`, the receiving end
    /// of one of the agent's device pairs, and pins the link, or swaps the
    /// program into the pinned link.
    pub fn attach_device_pair(&mut self, iface: &str, role: LinkRole) -> Result<LinkOutcome, DatapathError> {
        if crate::iface::interface_index(iface).is_none() {
            return Err(DatapathError::UnknownInterface(iface.to_owned()));
        }
        if needs_clsact() {
            let _ = tc::qdisc_add_clsact(iface);
        }
        self.attach_role(iface, role, DecapHook::TcIngress)
    }

    /// Removes the pins of the links to `iface`. They belong to the
    /// interface that had this name before: the kernel detached them if it
    /// is gone, and if it lives on under another name, removing them is
    /// what detaches our programs from it.
    pub fn forget_links(&mut self, iface: &str) -> Result<(), DatapathError> {
        remove_link_dir(&self.layout.links_dir().join(iface)).map(drop)
    }

    /// Removes a device pair's program from `iface`, its receiving end (its
    /// pin, and before TCX its filter).
    pub fn detach_device_pair(&mut self, iface: &str) -> Result<(), DatapathError> {
        delete_clsact_filters(iface, &[])?;
        remove_link_dir(&self.layout.links_dir().join(iface)).map(drop)
    }

    /// Detaches the fast path from `iface` (a pod's veth that is gone or
    /// being left) by removing its pins.
    pub fn detach_pod_fast_path(&mut self, iface: &str) -> Result<(), DatapathError> {
        delete_clsact_filters(iface, &[])?;
        remove_link_dir(&self.layout.links_dir().join(iface)).map(drop)
    }

    /// Interfaces holding a pinned fast-path attachment.
    pub fn pod_fast_path_interfaces(&self) -> Vec<String> {
        self.layout
            .linked_interfaces()
            .into_iter()
            .filter(|i| self.layout.link(i, LinkRole::PodFastPath).exists())
            .collect()
    }

    fn attach_role(&mut self, iface: &str, role: LinkRole, hook: DecapHook) -> Result<LinkOutcome, DatapathError> {
        let name = role_program(role);
        let pin = self.layout.link(iface, role);
        if role != LinkRole::DecapXdp && needs_clsact() {
            return self.attach_clsact(iface, role, &pin);
        }
        if pin.exists() {
            match self.swap_into_pinned(role, &pin) {
                Ok(()) => return Ok(LinkOutcome::Swapped),
                // The interface was recreated (ENOLINK) or the pin is not a
                // link of this kind: it holds nothing worth keeping.
                Err(err) if swap_failure_is_stale(&err) => remove_pin(&pin)?,
                Err(err) => return Err(err),
            }
        }
        let attach_err = |source| attach_error(name, iface, source);
        let link: Result<FdLink, _> = match role {
            LinkRole::DecapXdp => {
                let DecapHook::Xdp(mode) = hook else { unreachable!("XDP role only for the XDP hook") };
                let program = self.xdp(name)?;
                let id = program.attach(iface, mode).map_err(attach_err)?;
                let link = program.take_link(id).map_err(attach_err)?;
                FdLink::try_from(link).map_err(|_| ())
            }
            // Every other role is a TC program.
            _ => {
                let attach_type = if matches!(role, LinkRole::TcEgress | LinkRole::PodDelivered) {
                    TcAttachType::Egress
                } else {
                    TcAttachType::Ingress
                };
                let program = self.classifier(name)?;
                let id = program.attach(iface, attach_type).map_err(attach_err)?;
                let link = program.take_link(id).map_err(attach_err)?;
                FdLink::try_from(link).map_err(|_| ())
            }
        };
        let Ok(link) = link else {
            // A netlink attachment: aya detaches it when this process ends.
            return Ok(LinkOutcome::NotPinnable);
        };
        if let Some(dir) = pin.parent() {
            fs::create_dir_all(dir).map_err(|source| DatapathError::Pin { path: pin.clone(), source })?;
        }
        // Dropping the pinned link's fd leaves it attached: the pin holds it.
        link.pin(&pin).map_err(|source| DatapathError::Pin {
            path: pin.clone(),
            source: io::Error::other(source),
        })?;
        Ok(LinkOutcome::Attached)
    }

    /// Before TCX: attaches `role`'s program as the clsact filter at its
    /// fixed priority and handle, or replaces the program in that filter
    /// atomically when a filter of ours is already there, and marks it with
    /// an empty directory at `pin`. The filter stays after this process.
    fn attach_clsact(&mut self, iface: &str, role: LinkRole, pin: &Path) -> Result<LinkOutcome, DatapathError> {
        let name = role_program(role);
        let (direction, attach_type) = match role {
            LinkRole::TcEgress | LinkRole::PodDelivered => (clsact::Direction::Egress, TcAttachType::Egress),
            _ => (clsact::Direction::Ingress, TcAttachType::Ingress),
        };
        let priority = clsact::priority(role);
        let handle = TcHandle::from(clsact::FILTER_HANDLE);
        let ifindex = crate::iface::interface_index(iface).ok_or_else(|| DatapathError::UnknownInterface(iface.to_owned()))?;
        let clsact_err = |source| DatapathError::Clsact { iface: iface.to_owned(), source };
        let existing = clsact::filters(ifindex, direction).map_err(clsact_err)?;
        let ours = existing.iter().find(|f| f.priority == priority && f.handle == clsact::FILTER_HANDLE);
        let attach_err = |source| attach_error(name, iface, source);
        let program = self.classifier(name)?;
        let (id, outcome) = match ours {
            Some(filter) if filter.name.as_deref() == Some(name) => {
                let link = SchedClassifierLink::attached(iface, attach_type, priority, handle, None)
                    .map_err(|e| attach_err(ProgramError::IOError(e)))?;
                (program.attach_to_link(link).map_err(attach_err)?, LinkOutcome::Swapped)
            }
            Some(filter) => {
                return Err(clsact_err(ClsactError::Occupied {
                    iface: iface.to_owned(),
                    direction,
                    priority,
                    handle: clsact::FILTER_HANDLE,
                    found: filter.name.clone().unwrap_or_else(|| "a filter of another kind".to_owned()),
                    program: name,
                }));
            }
            None => {
                let options = TcAttachOptions::Netlink(NlOptions { priority, handle, classid: None });
                (program.attach_with_options(iface, attach_type, options).map_err(attach_err)?, LinkOutcome::Attached)
            }
        };
        // The link's Drop would delete the filter; it must outlive us, and
        // the next agent finds it by priority and handle.
        std::mem::forget(program.take_link(id).map_err(attach_err)?);
        fs::create_dir_all(pin).map_err(|source| DatapathError::Pin { path: pin.to_owned(), source })?;
        Ok(outcome)
    }

    /// Undoes a fresh attachment: its pin (or clsact marker) and, before
    /// TCX, its filter.
    fn undo_fresh(&self, iface: &str, role: LinkRole) {
        let _ = remove_pin(&self.layout.link(iface, role));
        if role != LinkRole::DecapXdp && needs_clsact() {
            let direction = if matches!(role, LinkRole::TcEgress | LinkRole::PodDelivered) { clsact::Direction::Egress } else { clsact::Direction::Ingress };
            if let Some(ifindex) = crate::iface::interface_index(iface) {
                let _ = clsact::delete(ifindex, direction, clsact::priority(role), clsact::FILTER_HANDLE);
            }
        }
    }

    /// Whether this agent's programs still serve `iface` as
    /// [`Self::attach`] left them: encapsulation at TC egress and
    /// decapsulation at `hook`, each running the program this agent loaded
    /// (before 6.6, our filter at its priority with our program's name).
    /// The error names what is missing.
    pub fn check_attached(&self, iface: &str, hook: DecapHook) -> Result<(), DatapathError> {
        let ifindex = crate::iface::interface_index(iface).ok_or_else(|| DatapathError::InterfaceGone(iface.to_owned()))?;
        let decap = match hook {
            DecapHook::Xdp(_) => LinkRole::DecapXdp,
            DecapHook::TcIngress => LinkRole::DecapTc,
        };
        let query_err = |source| DatapathError::Query { iface: iface.to_owned(), source };
        for role in [LinkRole::TcEgress, decap] {
            let program = role_program(role);
            let ours = self.program_id(program).ok_or(DatapathError::MissingProgram(program))?;
            let attached = match role {
                LinkRole::DecapXdp => crate::iface::xdp_program_id(iface).map_err(query_err)? == Some(ours),
                _ if needs_clsact() => {
                    let direction = if role == LinkRole::TcEgress { clsact::Direction::Egress } else { clsact::Direction::Ingress };
                    clsact::filters(ifindex, direction)
                        .map_err(|source| DatapathError::Clsact { iface: iface.to_owned(), source })?
                        .iter()
                        .any(|f| f.priority == clsact::priority(role) && f.handle == clsact::FILTER_HANDLE && f.name.as_deref() == Some(program))
                }
                _ => {
                    let side = if role == LinkRole::TcEgress { TcAttachType::Egress } else { TcAttachType::Ingress };
                    let (_, programs) = SchedClassifier::query_tcx(iface, side).map_err(|e| query_err(io::Error::other(e)))?;
                    programs.iter().any(|p| p.id() == ours)
                }
            };
            if !attached {
                return Err(DatapathError::NotAttached { program, iface: iface.to_owned() });
            }
        }
        Ok(())
    }

    /// The kernel's id of one of our loaded programs.
    fn program_id(&self, name: &str) -> Option<u32> {
        match self.ebpf.program(name)? {
            Program::SchedClassifier(p) => p.info().ok().map(|i| i.id()),
            Program::Xdp(p) => p.info().ok().map(|i| i.id()),
            _ => None,
        }
    }

    /// Deletes the clsact filters of ours from `iface` (nothing on kernels
    /// with TCX, where removing the pins detaches): `cleanup` and `check`
    /// call it for every interface with pins, before removing them.
    pub fn detach_clsact(iface: &str) -> Result<(), DatapathError> {
        delete_clsact_filters(iface, &[])
    }

    /// Before TCX: the programs of our clsact filters on `iface` (a running
    /// datapath's, or one left behind), which an attach would take over.
    /// None with TCX, where attachments go beside each other, or when the
    /// interface is gone.
    pub fn clsact_filters_of_ours(iface: &str) -> Result<Vec<String>, DatapathError> {
        if !needs_clsact() {
            return Ok(Vec::new());
        }
        let Some(ifindex) = crate::iface::interface_index(iface) else { return Ok(Vec::new()) };
        let mut names = Vec::new();
        for direction in [clsact::Direction::Ingress, clsact::Direction::Egress] {
            let filters = clsact::filters(ifindex, direction).map_err(|source| DatapathError::Clsact { iface: iface.to_owned(), source })?;
            names.extend(filters.into_iter().filter(clsact::Filter::is_ours).filter_map(|f| f.name));
        }
        Ok(names)
    }

    /// Replaces the program inside the pinned link at `pin` with ours.
    fn swap_into_pinned(&mut self, role: LinkRole, pin: &Path) -> Result<(), DatapathError> {
        let name = role_program(role);
        let swap_err = |source| DatapathError::Swap { path: pin.to_owned(), source };
        let link_err = |source| DatapathError::PinnedLink { path: pin.to_owned(), source };
        let link: FdLink = PinnedLink::from_pin(pin).map_err(link_err)?.into();
        match role {
            LinkRole::DecapXdp => {
                let link = XdpLink::try_from(link).map_err(link_err)?;
                let program = self.xdp(name)?;
                let id = program.attach_to_link(link).map_err(swap_err)?;
                drop(program.take_link(id).map_err(swap_err)?);
            }
            // Every other role is a TC program.
            _ => {
                let link = SchedClassifierLink::try_from(link).map_err(link_err)?;
                let program = self.classifier(name)?;
                let id = program.attach_to_link(link).map_err(swap_err)?;
                drop(program.take_link(id).map_err(swap_err)?);
            }
        }
        Ok(())
    }

    /// Every loaded program with its kernel id.
    pub fn programs(&self) -> Vec<ProgramSummary> {
        program_names::ALL
            .into_iter()
            .filter_map(|name| {
                let (kind, info) = match self.ebpf.program(name)? {
                    Program::SchedClassifier(p) => ("sched_cls", p.info().ok()?),
                    Program::Xdp(p) => ("xdp", p.info().ok()?),
                    _ => return None,
                };
                Some(ProgramSummary {
                    name,
                    id: info.id(),
                    kind,
                    verified_instructions: info.verified_instruction_count(),
                })
            })
            .collect()
    }

    /// Removes the current layout's map pins under `root` (`<root>/v<N>/`),
    /// and nothing else; returns what it left (not ours).
    pub fn remove_current_layout_maps(root: &Path) -> Result<Vec<PathBuf>, DatapathError> {
        remove_map_dir(&PinLayout::new(root).maps_dir())
    }

    /// Removes what the agent pins under `root`, and nothing else: the
    /// links of each role in `links/<iface>/` (which detaches the programs
    /// from their interfaces), the map directories of this layout version
    /// and older ones (`v<N>/`), then each of those directories and `root`
    /// itself once empty. A newer layout's maps are left, as not ours to
    /// read (`cleanup` refuses such a root before this). Never recurses
    /// into anything else. Maps live on while a process holds them.
    ///
    /// Refuses a `root` that is not on bpffs: pins live only there, so
    /// anything else is not ours. Returns what was left under `root`
    /// because the agent did not create it.
    pub fn remove_pins(root: &Path) -> Result<Vec<PathBuf>, DatapathError> {
        if !root.exists() {
            return Ok(Vec::new());
        }
        if !bpffs::is_bpffs(root) {
            return Err(bpffs::BpffsError::NotBpffs { path: root.to_owned() }.into());
        }
        let layout = PinLayout::new(root);
        for iface in layout.linked_interfaces() {
            remove_link_dir(&layout.links_dir().join(iface))?;
        }
        remove_dir_if_empty(&layout.links_dir())?;
        let mut map_dirs = layout.stale_map_dirs();
        map_dirs.push(layout.maps_dir());
        for dir in &map_dirs {
            remove_map_dir(dir)?;
        }
        remove_dir_if_empty(root)?;
        // Whatever remains is not ours: list it, down to the agent's own
        // directories' foreign contents.
        let children = |dir: &Path| -> Vec<PathBuf> {
            fs::read_dir(dir).map(|e| e.filter_map(Result::ok).map(|e| e.path()).collect()).unwrap_or_default()
        };
        let mut left = Vec::new();
        for entry in children(root) {
            if entry == layout.links_dir() {
                for iface_dir in children(&entry) {
                    left.extend(children(&iface_dir));
                }
            } else if map_dirs.contains(&entry) {
                left.extend(children(&entry));
            } else {
                left.push(entry);
            }
        }
        left.sort();
        left.dedup();
        Ok(left)
    }

    fn classifier(&mut self, name: &'static str) -> Result<&mut SchedClassifier, DatapathError> {
        match self.ebpf.program_mut(name) {
            Some(Program::SchedClassifier(p)) => Ok(p),
            _ => Err(DatapathError::MissingProgram(name)),
        }
    }

    fn xdp(&mut self, name: &'static str) -> Result<&mut Xdp, DatapathError> {
        match self.ebpf.program_mut(name) {
            Some(Program::Xdp(p)) => Ok(p),
            _ => Err(DatapathError::MissingProgram(name)),
        }
    }
}

/// Removes the link pins of every role from one interface's directory,
/// then the directory if nothing else is in it. Returns what is left.
fn remove_link_dir(dir: &Path) -> Result<Vec<PathBuf>, DatapathError> {
    for role in LinkRole::ALL {
        remove_pin(&dir.join(role.file_name()))?;
    }
    remove_dir_if_empty(dir)
}

/// Removes the map pins of one layout version's directory (every pin in
/// it: older layouts had other maps), then the directory. Subdirectories,
/// which the agent never creates there, are left. Returns what is left.
fn remove_map_dir(dir: &Path) -> Result<Vec<PathBuf>, DatapathError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(DatapathError::Unpin { path: dir.to_owned(), source }),
    };
    for entry in entries.filter_map(Result::ok) {
        if entry.file_type().is_ok_and(|t| !t.is_dir()) {
            remove_pin(&entry.path())?;
        }
    }
    remove_dir_if_empty(dir)
}

/// Removes a link pin, or, before TCX, the empty directory marking a
/// clsact filter of ours at that path (`rmdir`: never a directory with
/// anything in it).
fn remove_pin(path: &Path) -> Result<(), DatapathError> {
    let removed = if path.is_dir() { fs::remove_dir(path) } else { fs::remove_file(path) };
    match removed {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DatapathError::Unpin { path: path.to_owned(), source }),
    }
}

/// `rmdir`: removes `dir` only when empty. Returns `[dir]` when it is not.
fn remove_dir_if_empty(dir: &Path) -> Result<Vec<PathBuf>, DatapathError> {
    match fs::remove_dir(dir) {
        Ok(()) => Ok(Vec::new()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) if e.kind() == io::ErrorKind::DirectoryNotEmpty => Ok(vec![dir.to_owned()]),
        Err(source) => Err(DatapathError::Unpin { path: dir.to_owned(), source }),
    }
}

/// Whether TC programs attach as clsact filters (no TCX before 6.6).
fn needs_clsact() -> bool {
    KernelVersion::current().map_or(true, |v| v < KernelVersion::new(6, 6, 0))
}

/// Deletes our clsact filters on `iface`, except those of the `keep` roles;
/// nothing on kernels with TCX or when the interface is gone.
fn delete_clsact_filters(iface: &str, keep: &[LinkRole]) -> Result<(), DatapathError> {
    if !needs_clsact() {
        return Ok(());
    }
    let Some(ifindex) = crate::iface::interface_index(iface) else { return Ok(()) };
    let keep: Vec<(clsact::Direction, u16)> = keep
        .iter()
        .map(|role| {
            let direction = if matches!(role, LinkRole::TcEgress | LinkRole::PodDelivered) { clsact::Direction::Egress } else { clsact::Direction::Ingress };
            (direction, clsact::priority(*role))
        })
        .collect();
    clsact::delete_ours(ifindex, &keep)
        .map(drop)
        .map_err(|source| DatapathError::Clsact { iface: iface.to_owned(), source })
}

pub(crate) const fn role_program(role: LinkRole) -> &'static str {
    match role {
        LinkRole::TcEgress => program_names::TC_EGRESS,
        LinkRole::DecapXdp => program_names::XDP_INGRESS,
        LinkRole::DecapTc => program_names::TC_INGRESS,
        LinkRole::PodFastPath => program_names::TC_POD,
        LinkRole::PodDelivered => program_names::TC_POD_DELIVERED,
        LinkRole::SegEncap => program_names::TC_SEGMENTED,
        LinkRole::GroDeliver => program_names::TC_GRO,
    }
}

/// Whether a failed swap means the pin is useless rather than that
/// something is wrong with us.
fn swap_failure_is_stale(err: &DatapathError) -> bool {
    match err {
        DatapathError::Swap { source: ProgramError::SyscallError(e), .. } => {
            e.io_error.raw_os_error() == Some(libc::ENOLINK)
        }
        DatapathError::PinnedLink { source: LinkError::InvalidLink, .. } => true,
        _ => false,
    }
}

fn attach_error(name: &'static str, iface: &str, source: ProgramError) -> DatapathError {
    DatapathError::Attach { name, iface: iface.to_owned(), source }
}

/// Whether this process holds the capabilities BPF loading needs, read from
/// `CapEff` so the error names the cause before the kernel says EPERM.
fn may_load_bpf() -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_BPF: u32 = 39;
    let Ok(status) = fs::read_to_string("/proc/self/status") else {
        return true;
    };
    let Some(eff) = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
    else {
        return true;
    };
    eff & (1 << CAP_BPF) != 0 || eff & (1 << CAP_SYS_ADMIN) != 0
}

/// How often a program load the verifier gave up on because a signal was
/// pending is tried again (libbpf's `sys_bpf_prog_load` tries 5 times).
const LOAD_ATTEMPTS: usize = 5;

/// Loads a program, trying again while the kernel answers `EAGAIN`: the
/// verifier stops with it whenever a signal is pending for the loading
/// thread (`do_check`'s `signal_pending` test), which in a process with
/// handlers installed (tokio's, the tests' child processes exiting) is a
/// matter of timing, not of the program. aya retries only to grow the
/// verifier log.
///
/// [`Datapath::load`] also blocks signals while it loads, which keeps this
/// from happening on its thread.
fn retry_interrupted_load(mut load: impl FnMut() -> Result<(), ProgramError>) -> Result<(), ProgramError> {
    let mut attempt = 1;
    loop {
        match load() {
            Err(ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempt < LOAD_ATTEMPTS =>
            {
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// Every blockable signal blocked on the current thread, until dropped
/// (the previous mask comes back, also when a panic unwinds).
struct SignalsBlocked {
    previous: libc::sigset_t,
}

impl SignalsBlocked {
    fn on_this_thread() -> Self {
        // SAFETY: both sets are plain values initialised by sigfillset and
        // pthread_sigmask; pthread_sigmask only changes this thread's mask.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut previous: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut previous);
            Self { previous }
        }
    }
}

impl Drop for SignalsBlocked {
    fn drop(&mut self) {
        // SAFETY: restores the mask `on_this_thread` saved; the guard lives
        // in `Datapath::load`'s frame, on the thread it blocked.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &self.previous, std::ptr::null_mut());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{cell::Cell, io};

    use aya::programs::ProgramError;

    use super::{LOAD_ATTEMPTS, retry_interrupted_load};

    fn failure(errno: i32) -> ProgramError {
        ProgramError::LoadError { io_error: io::Error::from_raw_os_error(errno), verifier_log: aya_obj::VerifierLog::new(String::new()) }
    }

    /// A load the verifier gave up on for a pending signal is tried again,
    /// and succeeds; one the verifier refused is not; and a signal storm
    /// ends with the kernel's answer. (Shown failing with the load called
    /// once: the interrupted load failed with EAGAIN, seen in load.rs's
    /// tests run in parallel.)
    #[test]
    fn loads_interrupted_by_a_signal_are_tried_again() {
        let calls = Cell::new(0);
        let interrupted_twice = retry_interrupted_load(|| {
            calls.set(calls.get() + 1);
            if calls.get() <= 2 { Err(failure(libc::EAGAIN)) } else { Ok(()) }
        });
        assert!(interrupted_twice.is_ok(), "{interrupted_twice:?}");
        assert_eq!(calls.get(), 3);

        calls.set(0);
        let refused = retry_interrupted_load(|| {
            calls.set(calls.get() + 1);
            Err(failure(libc::EACCES))
        });
        assert!(matches!(refused, Err(ProgramError::LoadError { ref io_error, .. }) if io_error.raw_os_error() == Some(libc::EACCES)));
        assert_eq!(calls.get(), 1, "a verifier's refusal is final");

        calls.set(0);
        let storm = retry_interrupted_load(|| {
            calls.set(calls.get() + 1);
            Err(failure(libc::EAGAIN))
        });
        assert!(matches!(storm, Err(ProgramError::LoadError { ref io_error, .. }) if io_error.raw_os_error() == Some(libc::EAGAIN)));
        assert_eq!(calls.get(), LOAD_ATTEMPTS);
    }
}
