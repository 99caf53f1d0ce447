//! Per-CPU counters. Each CPU owns its copy, so plain increments are safe.

use overlay_common::Counters;

use crate::{Drop, maps::COUNTERS};

/// Applies `f` to this CPU's counters.
#[inline(always)]
pub fn count(f: impl FnOnce(&mut Counters)) {
    if let Some(counters) = COUNTERS.get_ptr_mut(0) {
        // SAFETY: the per-CPU slot is only touched by this CPU, and the
        // program cannot be preempted on it.
        f(unsafe { &mut *counters });
    }
}

/// Counts a dropped packet under its reason.
#[inline(always)]
pub fn count_drop(reason: Drop) {
    count(|c| {
        let field = match reason {
            Drop::Truncated => &mut c.drop_truncated,
            Drop::BadFlags => &mut c.drop_bad_flags,
            Drop::WrongVni => &mut c.drop_wrong_vni,
            Drop::UnknownSource => &mut c.drop_unknown_source,
            Drop::SpoofedInner => &mut c.drop_spoofed_inner,
            Drop::BadOuter => &mut c.drop_bad_outer,
            Drop::BadInner => &mut c.drop_bad_inner,
            Drop::HelperError => &mut c.drop_helper_error,
        };
        *field += 1;
    });
}
