//! Zeroing without the BPF `memset`. LLVM lowers `Default`, `mem::zeroed`
//! and zeroed padding of a 4-aligned struct to a call of the compiler's BPF
//! `memset`, a loop that stores one byte per iteration (52 iterations for a
//! `bpf_fib_lookup` parameter block). Eight volatile 8-byte stores are what
//! the loop should have been. The value is zeroed in place: moving it out by
//! value lets LLVM turn the copy back into a `memset` call.

use core::mem::{MaybeUninit, align_of, size_of};

/// Stack slot for a 64-byte value, 8-aligned so it can be zeroed in words.
#[repr(C, align(8))]
pub union Slot64<T: Copy> {
    value: T,
    words: [u64; 8],
}

/// Zeroes `slot` and returns the all-zero value in it.
#[inline(always)]
pub fn zeroed64<T: Copy>(slot: &mut MaybeUninit<Slot64<T>>) -> &mut T {
    const {
        assert!(size_of::<T>() == 64 && align_of::<T>() <= 8);
    }
    let p = slot.as_mut_ptr().cast::<u64>();
    for i in 0..8 {
        // SAFETY: `p` points at the 64 bytes of `slot`, 8-aligned.
        unsafe { p.add(i).write_volatile(0) };
    }
    // SAFETY: every byte of the slot is now zero, a valid value of `T` for
    // the plain-data types this is used with (map values, helper parameters).
    unsafe { &mut *slot.as_mut_ptr().cast::<T>() }
}
