//! The datapath's maps. All are BTF-defined so `bpftool map dump` prints
//! field names; the agent pins them by name under its bpffs root.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use overlay_common::{COUNTER_SLOTS, Config, Peer, PodPort, Route, SocketKey, Tally};

/// Remote pod CIDR → how to reach it. One entry per remote node, like
/// PEERS: both hold [`overlay_common::MAX_PEERS`].
#[btf_map]
pub static ROUTES: LpmTrie<[u8; 4], Route, { overlay_common::MAX_PEERS }> = LpmTrie::new();

/// Underlay address of every known node → the pod CIDR it may source.
#[btf_map]
pub static PEERS: HashMap<[u8; 4], Peer, { overlay_common::MAX_PEERS }> = HashMap::new();

/// Local pod MAC → its host-side veth, learned by the agent from the pod
/// bridge's FDB (`--forward bpf`).
#[btf_map]
pub static POD_PORTS: HashMap<[u8; 6], PodPort, 4096> = HashMap::new();

/// Local pod sockets whose traffic takes the kernel's path (to anything
/// but a remote pod: Services, the outside). Their replies must meet
/// conntrack, which undoes the Service's NAT, so the fast path leaves them
/// to the kernel. LRU: idle sockets age out.
#[btf_map]
pub static KERNEL_SOCKETS: LruHashMap<SocketKey, u8, 65536> = LruHashMap::new();

/// This node's configuration (one entry).
#[btf_map]
pub static CONFIG: Array<Config, 1> = Array::new();

/// Per-CPU counters: one slot per `Counter`, then one per `DropReason`.
#[btf_map]
pub static COUNTERS: PerCpuArray<Tally, COUNTER_SLOTS> = PerCpuArray::new();

/// When a mergeable TCP segment (one without PSH, with payload) last went
/// to the GRO device, on any CPU, by the coarse monotonic clock
/// (`bpf_ktime_get_coarse_ns`, fine to a tick), or 0 before anything
/// looked ([`crate::fastpath::note_mergeable_sent_to_gro_device`]).
/// Runtime state of the loaded programs only: not pinned, so not part of
/// the map layout; a restart starts it afresh, which reads as "not yet
/// known to be quiet".
#[btf_map]
pub static GRO_MERGEABLE_SENT_AT: Array<u64, 1> = Array::new();

/// This node's configuration, once the agent has written a complete one.
#[inline(always)]
pub fn config() -> Option<&'static Config> {
    CONFIG.get(0).filter(|c| c.enabled != 0)
}
