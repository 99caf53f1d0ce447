//! Per-CPU counters, one `COUNTERS` slot per [`Counter`] and per
//! [`DropReason`]. Each CPU owns its copy, so plain increments are safe.

use overlay_common::{Counter, DropReason};

use crate::maps::COUNTERS;

/// Counts one packet of `bytes` under `counter`.
#[inline(always)]
pub fn count(counter: Counter, bytes: u64) {
    add(counter.slot(), bytes);
}

/// Counts a dropped packet of `bytes` under its reason.
#[inline(always)]
pub fn count_drop(reason: DropReason, bytes: u64) {
    add(reason.slot(), bytes);
}

#[inline(always)]
fn add(slot: u32, bytes: u64) {
    if let Some(tally) = COUNTERS.get_ptr_mut(slot) {
        // SAFETY: the per-CPU slot is only touched by this CPU, and the
        // program cannot be preempted on it.
        let tally = unsafe { &mut *tally };
        tally.packets += 1;
        tally.bytes += bytes;
    }
}
