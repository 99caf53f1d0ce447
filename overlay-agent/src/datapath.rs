//! Loading the eBPF programs, pinning their maps and attaching them to the
//! underlay interface.
//!
//! # Minimum kernel version
//!
//! 5.13: `bpf_skb_adjust_room` with `BPF_F_ADJ_ROOM_ENCAP_L2_ETH`. TC
//! programs attach through TCX on 6.6 and later, through a clsact qdisc
//! before that.
//!
//! The datapath outlives the agent where the kernel can pin its
//! attachments: TCX links (6.6) and XDP links (5.9). There a restarted
//! agent swaps its programs into the pinned links without a gap. On older
//! kernels the netlink attachments end with the agent.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        Program, ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        tc::{self, SchedClassifierLink},
        xdp::XdpLink,
    },
    util::KernelVersion,
};
use overlay_common::{map_names, program_names};

use crate::{
    bpffs::{self, LinkRole, PinLayout},
    object,
};

/// Where the decapsulation program hooks into the underlay interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecapHook {
    /// XDP in the given mode (the default, `XdpMode::Default`, lets the
    /// kernel prefer native XDP).
    Xdp(XdpMode),
    /// TC ingress, for interfaces where XDP cannot attach.
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
    #[error("the eBPF object has no program {0}; agent and programs are out of step")]
    MissingProgram(&'static str),
    #[error("the kernel verifier rejected program {name}: {source}\n{verifier_log}")]
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
    #[error("removing pin {path}: {source}")]
    Unpin { path: PathBuf, source: io::Error },
    #[error("pinning link {path}: {source}")]
    Pin { path: PathBuf, source: io::Error },
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
        let layout = PinLayout::new(root);
        bpffs::prepare_root(&layout.maps_dir())?;
        let maps_adopted = map_names::ALL.iter().all(|name| layout.map(name).exists());
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
                Program::SchedClassifier(p) => p.load(),
                Program::Xdp(p) => p.load(),
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
    /// another interface) and map pins of older layouts are removed last.
    /// With `fast_path` (`--forward bpf`), the fast path's own
    /// attachments (the bridge and the pods' veths, see
    /// [`Self::attach_pod_fast_path`]) are kept, and the decapsulation's TC
    /// program is attached beside XDP for the fast path's inbound half. A
    /// fresh attachment is undone if a later one fails.
    pub fn attach(&mut self, iface: &str, hook: DecapHook, fast_path: bool) -> Result<AttachReport, DatapathError> {
        if crate::iface::interface_index(iface).is_none() {
            return Err(DatapathError::UnknownInterface(iface.to_owned()));
        }
        let needs_clsact = KernelVersion::current().map_or(true, |v| v < KernelVersion::new(6, 6, 0));
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
                    let _ = fs::remove_file(self.layout.link(iface, LinkRole::TcEgress));
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
                    let _ = fs::remove_file(self.layout.link(iface, role));
                }
            }
            return Err(err);
        }
        let mut unwanted: Vec<PathBuf> = LinkRole::ALL
            .into_iter()
            .filter(|role| *role != LinkRole::TcEgress && *role != decap_role)
            .filter(|role| !(deliver_at_tc && *role == LinkRole::DecapTc))
            .map(|role| self.layout.link(iface, role))
            .collect();
        for other in self.layout.linked_interfaces().into_iter().filter(|i| i != iface) {
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
        unwanted.extend(self.layout.stale_map_dirs());
        let mut removed = Vec::new();
        for path in unwanted {
            let result = if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
            match result {
                Ok(()) => removed.push(path),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(DatapathError::Unpin { path, source }),
            }
        }
        Ok(AttachReport { egress, decap, removed })
    }

    /// Attaches the fast path's program (TC ingress) to `iface`, the pod
    /// bridge or one of its ports, and pins the link, or swaps the program
    /// into the pinned link. Packets it does not take go on untouched, so
    /// attaching it never cuts a path.
    pub fn attach_pod_fast_path(&mut self, iface: &str) -> Result<LinkOutcome, DatapathError> {
        if crate::iface::interface_index(iface).is_none() {
            return Err(DatapathError::UnknownInterface(iface.to_owned()));
        }
        if KernelVersion::current().map_or(true, |v| v < KernelVersion::new(6, 6, 0)) {
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
        if KernelVersion::current().map_or(true, |v| v < KernelVersion::new(6, 6, 0)) {
            let _ = tc::qdisc_add_clsact(iface);
        }
        let delivered = self.attach_role(iface, LinkRole::PodDelivered, DecapHook::TcIngress)?;
        self.attach_role(iface, LinkRole::PodFastPath, DecapHook::TcIngress).inspect_err(|_| {
            if delivered == LinkOutcome::Attached {
                let _ = fs::remove_file(self.layout.link(iface, LinkRole::PodDelivered));
            }
        })
    }

    /// Detaches the fast path from `iface` (a pod's veth that is gone or
    /// being left) by removing its pins.
    pub fn detach_pod_fast_path(&mut self, iface: &str) -> Result<(), DatapathError> {
        let dir = self.layout.links_dir().join(iface);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(DatapathError::Unpin { path: dir, source }),
        }
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
        if pin.exists() {
            match self.swap_into_pinned(role, &pin) {
                Ok(()) => return Ok(LinkOutcome::Swapped),
                // The interface was recreated (ENOLINK) or the pin is not a
                // link of this kind: it holds nothing worth keeping.
                Err(err) if swap_failure_is_stale(&err) => {
                    fs::remove_file(&pin).map_err(|source| DatapathError::Unpin { path: pin.clone(), source })?;
                }
                Err(err) => return Err(err),
            }
        }
        let attach_err = |source| attach_error(name, iface, source);
        let link: Result<FdLink, _> = match role {
            LinkRole::TcEgress | LinkRole::DecapTc | LinkRole::PodFastPath | LinkRole::PodDelivered => {
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
            LinkRole::DecapXdp => {
                let DecapHook::Xdp(mode) = hook else { unreachable!("XDP role only for the XDP hook") };
                let program = self.xdp(name)?;
                let id = program.attach(iface, mode).map_err(attach_err)?;
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

    /// Replaces the program inside the pinned link at `pin` with ours.
    fn swap_into_pinned(&mut self, role: LinkRole, pin: &Path) -> Result<(), DatapathError> {
        let name = role_program(role);
        let swap_err = |source| DatapathError::Swap { path: pin.to_owned(), source };
        let link_err = |source| DatapathError::PinnedLink { path: pin.to_owned(), source };
        let link: FdLink = PinnedLink::from_pin(pin).map_err(link_err)?.into();
        match role {
            LinkRole::TcEgress | LinkRole::DecapTc | LinkRole::PodFastPath | LinkRole::PodDelivered => {
                let link = SchedClassifierLink::try_from(link).map_err(link_err)?;
                let program = self.classifier(name)?;
                let id = program.attach_to_link(link).map_err(swap_err)?;
                drop(program.take_link(id).map_err(swap_err)?);
            }
            LinkRole::DecapXdp => {
                let link = XdpLink::try_from(link).map_err(link_err)?;
                let program = self.xdp(name)?;
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

    /// Removes every pin under `root`: the links (which detaches the
    /// programs from their interfaces), the maps of every layout version,
    /// and the directory itself. Maps live on while a process holds them.
    pub fn remove_pins(root: &Path) -> Result<(), DatapathError> {
        match fs::remove_dir_all(root) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(DatapathError::Unpin { path: root.to_owned(), source }),
        }
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

const fn role_program(role: LinkRole) -> &'static str {
    match role {
        LinkRole::TcEgress => program_names::TC_EGRESS,
        LinkRole::DecapXdp => program_names::XDP_INGRESS,
        LinkRole::DecapTc => program_names::TC_INGRESS,
        LinkRole::PodFastPath => program_names::TC_POD,
        LinkRole::PodDelivered => program_names::TC_POD_DELIVERED,
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
