//! Atomic changes to a connection entry's flags. Entries are shared by
//! every CPU: a flow's two directions are usually handled on two CPUs, and
//! the end of a flow is decided from either side (see `inflight`). A plain
//! read-modify-write could put back a bit another CPU just cleared, and so
//! count a flow's end twice; these are BPF atomic fetch operations.
//!
//! The BPF target's `core` has no `fetch_or` (it declares no
//! compare-and-swap), so these call the compiler's atomic intrinsics. The
//! default (v1) instruction set that bpf-linker generates has 64-bit fetch
//! atomics only, so they act on the 8-byte word that holds `flags` in its
//! low half (little-endian) and `stamp_us` in its high half; the masks
//! leave the high half as it is, and the operation is atomic for both.

use core::{
    intrinsics::{AtomicOrdering, atomic_and, atomic_or},
    mem::offset_of,
};

use router_common::ConnEntry;

const FLAGS_AT: usize = offset_of!(ConnEntry, flags);
const _: () = {
    assert!(
        FLAGS_AT.is_multiple_of(8),
        "the flags word must be 8-aligned"
    );
    assert!(offset_of!(ConnEntry, stamp_us) == FLAGS_AT + 4);
    assert!(
        cfg!(target_endian = "little"),
        "flags must be the word's low half"
    );
};

#[inline(always)]
fn word(e: &mut ConnEntry) -> *mut u64 {
    // From the whole entry, so the pointer may cover `stamp_us` too.
    // SAFETY: FLAGS_AT + 8 is within the 64-byte, 8-aligned entry.
    unsafe {
        (e as *mut ConnEntry)
            .cast::<u8>()
            .add(FLAGS_AT)
            .cast::<u64>()
    }
}

/// Sets `bits`; returns the flags as they were.
#[inline(always)]
pub fn set(e: &mut ConnEntry, bits: u32) -> u32 {
    // SAFETY: an aligned word inside a live map value or stack slot; every
    // change to flags that can race goes through here.
    unsafe { atomic_or::<u64, u64, { AtomicOrdering::SeqCst }>(word(e), bits as u64) as u32 }
}

/// Sets `bit`; whether this call set it. Of CPUs that race to set it,
/// exactly one sees it clear.
#[inline(always)]
pub fn first_to_set(e: &mut ConnEntry, bit: u32) -> bool {
    set(e, bit) & bit == 0
}

/// Clears `bit`; whether this call cleared it. Of CPUs that race to clear
/// it, exactly one sees it set.
#[inline(always)]
pub fn first_to_clear(e: &mut ConnEntry, bit: u32) -> bool {
    clear(e, bit) & bit != 0
}

/// Clears `bits`; returns the flags as they were.
#[inline(always)]
pub fn clear(e: &mut ConnEntry, bits: u32) -> u32 {
    // SAFETY: as in `set`.
    unsafe { atomic_and::<u64, u64, { AtomicOrdering::SeqCst }>(word(e), !(bits as u64)) as u32 }
}
