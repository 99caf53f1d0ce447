//! Loading the eBPF programs, pinning their maps and attaching them to the
//! underlay interface.
//!
//! # Minimum kernel version
//!
//! 5.13: `bpf_skb_adjust_room` with `BPF_F_ADJ_ROOM_ENCAP_L2_ETH`. TC
//! programs attach through TCX on 6.6 and later, through a clsact qdisc
//! before that.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{
        Program, ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
        tc::{self, SchedClassifierLinkId},
        xdp::XdpLinkId,
    },
    util::KernelVersion,
};
use overlay_common::{map_names, program_names};

use crate::{bpffs, object};

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
}

/// The loaded programs and their pinned maps.
pub struct Datapath {
    ebpf: Ebpf,
}

/// Programs attached to one interface; pass it back to [`Datapath::detach`].
#[derive(Debug)]
pub struct Attachment {
    iface: String,
    egress: SchedClassifierLinkId,
    decap: DecapLink,
}

#[derive(Debug)]
enum DecapLink {
    Xdp(XdpLinkId),
    Tc(SchedClassifierLinkId),
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
    /// creates (or reopens) the maps pinned under `root`.
    pub fn load(root: &Path) -> Result<Self, DatapathError> {
        if !object::has_programs() {
            return Err(DatapathError::NoPrograms);
        }
        if !may_load_bpf() {
            return Err(DatapathError::NoPermission);
        }
        bpffs::prepare_root(root)?;
        let mut loader = EbpfLoader::new();
        for name in map_names::ALL {
            let _: &mut EbpfLoader<'_> = loader.map_pin_path(name, root.join(name));
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
        Ok(Self { ebpf })
    }

    /// The underlying aya object, for map access.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Attaches encapsulation (TC egress) and decapsulation to `iface`.
    /// Nothing stays attached if any step fails.
    pub fn attach(&mut self, iface: &str, hook: DecapHook) -> Result<Attachment, DatapathError> {
        if crate::iface::interface_index(iface).is_none() {
            return Err(DatapathError::UnknownInterface(iface.to_owned()));
        }
        let needs_clsact = KernelVersion::current().map_or(true, |v| v < KernelVersion::new(6, 6, 0));
        if needs_clsact {
            // Already present is fine; a real failure shows up in attach.
            let _ = tc::qdisc_add_clsact(iface);
        }
        let egress = self
            .classifier(program_names::TC_EGRESS)?
            .attach(iface, TcAttachType::Egress)
            .map_err(|source| attach_error(program_names::TC_EGRESS, iface, source))?;
        let decap = match hook {
            DecapHook::Xdp(mode) => self
                .xdp(program_names::XDP_INGRESS)?
                .attach(iface, mode)
                .map(DecapLink::Xdp)
                .map_err(|source| attach_error(program_names::XDP_INGRESS, iface, source)),
            DecapHook::TcIngress => self
                .classifier(program_names::TC_INGRESS)?
                .attach(iface, TcAttachType::Ingress)
                .map(DecapLink::Tc)
                .map_err(|source| attach_error(program_names::TC_INGRESS, iface, source)),
        };
        let decap = match decap {
            Ok(decap) => decap,
            Err(err) => {
                // Never leave the interface half-programmed.
                let _ = self.classifier(program_names::TC_EGRESS)?.detach(egress);
                return Err(err);
            }
        };
        Ok(Attachment { iface: iface.to_owned(), egress, decap })
    }

    /// Detaches everything [`Self::attach`] attached.
    pub fn detach(&mut self, attachment: Attachment) -> Result<(), DatapathError> {
        let Attachment { iface, egress, decap } = attachment;
        let iface = iface.as_str();
        let detach_err = |name| move |source| attach_error(name, iface, source);
        self.classifier(program_names::TC_EGRESS)?
            .detach(egress)
            .map_err(detach_err(program_names::TC_EGRESS))?;
        match decap {
            DecapLink::Xdp(id) => self
                .xdp(program_names::XDP_INGRESS)?
                .detach(id)
                .map_err(detach_err(program_names::XDP_INGRESS)),
            DecapLink::Tc(id) => self
                .classifier(program_names::TC_INGRESS)?
                .detach(id)
                .map_err(detach_err(program_names::TC_INGRESS)),
        }
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

    /// Removes the map pins and the pin directory. The maps themselves live
    /// on while this `Datapath` holds them.
    pub fn remove_pins(root: &Path) -> Result<(), DatapathError> {
        for name in map_names::ALL {
            let path = root.join(name);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(DatapathError::Unpin { path, source }),
            }
        }
        match fs::remove_dir(root) {
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
