//! Backends' in-flight counts (`BACKEND_LOAD`) seen from userspace: read
//! for status, metrics and the policy, and corrected from the connection
//! table scan. The program counts a flow when it starts and when it ends
//! (RST, FIN both ways); a flow that vanishes without an end (LRU
//! eviction, expiry, a drain deadline, entries a restart adopted) would
//! stay counted forever, so the scan finds such drift and adds the
//! missing closes.
//!
//! The array is memory-mapped (`BPF_F_MMAPABLE`): the program changes it
//! only with atomic adds, and so must this module. A map update through
//! the syscall would overwrite the program's concurrent adds.

use std::{
    collections::BTreeMap,
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::{Map, MapError};
use router_common::{BackendLoad, MAX_BACKENDS};

use super::{Datapath, DatapathError};

/// A shared mapping of `BACKEND_LOAD`. Every access is atomic, so it may be
/// used from any thread (the scanner corrects while status reads).
pub struct LoadCounters {
    base: NonNull<BackendLoad>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory that is only read and written
// through atomic operations, and it lives until `drop` unmaps it.
unsafe impl Send for LoadCounters {}
// SAFETY: as above.
unsafe impl Sync for LoadCounters {}

impl Drop for LoadCounters {
    fn drop(&mut self) {
        // SAFETY: `base` and `bytes()` are exactly what `mmap` returned.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.bytes()) };
    }
}

/// One backend's counts at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadSnapshot {
    pub opened: u64,
    pub closed: u64,
}

impl LoadSnapshot {
    pub fn in_flight(&self) -> u64 {
        BackendLoad {
            opened: self.opened,
            closed: self.closed,
        }
        .in_flight()
    }
}

/// What one reconciliation did to one backend's count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Correction {
    /// Closes added for flows that vanished without an end.
    pub leaked: u64,
    /// Opens added where more ends than starts were counted (an end raced a
    /// start, or a correction met a late FIN).
    pub overcounted: u64,
}

impl Correction {
    pub fn add(&mut self, other: &Correction) {
        self.leaked = self.leaked.saturating_add(other.leaked);
        self.overcounted = self.overcounted.saturating_add(other.overcounted);
    }
}

impl LoadCounters {
    fn bytes(&self) -> usize {
        self.len * std::mem::size_of::<BackendLoad>()
    }

    /// Maps the array behind `fd` (a `BACKEND_LOAD` of `MAX_BACKENDS` entries).
    fn map(fd: impl AsFd) -> std::io::Result<Self> {
        let len = MAX_BACKENDS as usize;
        let bytes = len * std::mem::size_of::<BackendLoad>();
        // SAFETY: a fresh shared mapping of a BPF array map fd; the kernel
        // checks that the map is mmapable and `bytes` within its size.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_fd().as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let base = NonNull::new(p.cast::<BackendLoad>())
            .ok_or_else(|| std::io::Error::other("mmap returned null"))?;
        Ok(Self { base, len })
    }

    fn counter(&self, id: u32, closed: bool) -> Option<&AtomicU64> {
        if id as usize >= self.len {
            return None;
        }
        // SAFETY: `id` is in bounds; BackendLoad is two u64s, 8-aligned
        // (page-aligned mapping), and the memory lives as long as `self`.
        unsafe {
            let e = self.base.as_ptr().add(id as usize);
            let field = if closed {
                &raw mut (*e).closed
            } else {
                &raw mut (*e).opened
            };
            Some(AtomicU64::from_ptr(field))
        }
    }

    /// A backend's counts (zero for an id out of range).
    pub fn get(&self, id: u32) -> LoadSnapshot {
        // Closed first: a flow that starts and ends between the two reads
        // then shows as open, never as a negative count.
        let closed = self
            .counter(id, true)
            .map_or(0, |c| c.load(Ordering::SeqCst));
        let opened = self
            .counter(id, false)
            .map_or(0, |c| c.load(Ordering::SeqCst));
        LoadSnapshot { opened, closed }
    }

    pub fn in_flight(&self, id: u32) -> u64 {
        self.get(id).in_flight()
    }

    fn add(&self, id: u32, closed: bool, n: u64) {
        if let Some(c) = self.counter(id, closed) {
            c.fetch_add(n, Ordering::SeqCst);
        }
    }

    /// Sets a backend's in-flight count to zero (its slot is being reused)
    /// by adding closes, so both counters keep counting up.
    pub fn clear(&self, id: u32) {
        let n = self.in_flight(id);
        self.add(id, true, n);
    }

    /// Brings each backend's count in line with `live` (flows the scan
    /// found counted and unexpired, per backend id), given the counts read
    /// just before the scan (`before`) and just after it (`after`).
    ///
    /// The scan is not instantaneous: flows open and end while it runs. So
    /// a correction is made only where it is certain. Every flow counted at
    /// `before` that still lives at `after` was seen, and flows opened
    /// meanwhile may or may not have been. The leak at `before` is thus at
    /// least `opened(before) − closed(after) − live`, and where even
    /// `opened(after) − closed(before) − live` is negative, at least that
    /// many closes too many were counted. Anything in between is left for
    /// the next scan, which sees a quieter moment. No correction overshoots.
    pub fn reconcile(
        &self,
        before: &BTreeMap<u32, LoadSnapshot>,
        after: &BTreeMap<u32, LoadSnapshot>,
        live: &BTreeMap<u32, u64>,
    ) -> BTreeMap<u32, Correction> {
        let mut out = BTreeMap::new();
        for (id, b) in before {
            let Some(a) = after.get(id) else { continue };
            let live = i128::from(live.get(id).copied().unwrap_or(0));
            let lower = i128::from(b.opened) - i128::from(a.closed) - live;
            let upper = i128::from(a.opened) - i128::from(b.closed) - live;
            let c = if lower > 0 {
                let n = u64::try_from(lower).unwrap_or(u64::MAX);
                self.add(*id, true, n);
                Correction {
                    leaked: n,
                    overcounted: 0,
                }
            } else if upper < 0 {
                let n = u64::try_from(-upper).unwrap_or(u64::MAX);
                self.add(*id, false, n);
                Correction {
                    leaked: 0,
                    overcounted: n,
                }
            } else {
                continue;
            };
            out.insert(*id, c);
        }
        out
    }

    /// Every id's counts, for the ids given.
    pub fn snapshot(&self, ids: impl IntoIterator<Item = u32>) -> BTreeMap<u32, LoadSnapshot> {
        ids.into_iter().map(|id| (id, self.get(id))).collect()
    }
}

/// A mapping of the loaded program's in-flight counters.
pub(super) fn map(ebpf: &aya::Ebpf) -> Result<LoadCounters, DatapathError> {
    {
        let name = "BACKEND_LOAD";
        let fd = match ebpf.map(name) {
            Some(Map::Array(data)) => data.fd().as_fd().try_clone_to_owned(),
            _ => return Err(DatapathError::MissingMap(name)),
        };
        let syscall = |call: &'static str, io_error: std::io::Error| DatapathError::Map {
            map: name,
            source: MapError::SyscallError(aya::sys::SyscallError { call, io_error }),
        };
        let fd = fd.map_err(|e| syscall("dup", e))?;
        LoadCounters::map(fd).map_err(|e| syscall("mmap", e))
    }
}

impl Datapath {
    /// The in-flight counters (see `LoadCounters`).
    pub fn load_counters(&self) -> std::sync::Arc<LoadCounters> {
        self.load.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An anonymous shared mapping standing in for the map's.
    fn counters() -> LoadCounters {
        let len = MAX_BACKENDS as usize;
        let bytes = len * std::mem::size_of::<BackendLoad>();
        // SAFETY: a fresh anonymous mapping, zero-filled by the kernel.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        LoadCounters {
            base: NonNull::new(p.cast()).unwrap(),
            len,
        }
    }

    fn snap(opened: u64, closed: u64) -> LoadSnapshot {
        LoadSnapshot { opened, closed }
    }

    #[test]
    fn a_leak_seen_before_and_after_is_closed() {
        let c = counters();
        c.add(1, false, 10);
        c.add(1, true, 3);
        // 7 counted, 4 found: 3 vanished without an end.
        let before = BTreeMap::from([(1, snap(10, 3))]);
        let got = c.reconcile(&before, &before, &BTreeMap::from([(1, 4)]));
        assert_eq!(got[&1].leaked, 3);
        assert_eq!(c.in_flight(1), 4);
    }

    #[test]
    fn flows_that_end_during_the_scan_are_not_taken_for_leaks() {
        let c = counters();
        c.add(2, false, 10);
        c.add(2, true, 5);
        // Two flows ended during the scan and were not found: no leak is certain.
        let got = c.reconcile(
            &BTreeMap::from([(2, snap(10, 3))]),
            &BTreeMap::from([(2, snap(10, 5))]),
            &BTreeMap::from([(2, 5)]),
        );
        assert!(got.is_empty(), "{got:?}");
    }

    #[test]
    fn flows_that_start_during_the_scan_are_not_taken_for_overcounts() {
        let c = counters();
        // 3 counted before; 2 more opened during the scan and were found.
        let got = c.reconcile(
            &BTreeMap::from([(0, snap(3, 0))]),
            &BTreeMap::from([(0, snap(5, 0))]),
            &BTreeMap::from([(0, 5)]),
        );
        assert!(got.is_empty(), "{got:?}");
    }

    #[test]
    fn more_ends_than_starts_are_put_right() {
        let c = counters();
        c.add(3, false, 4);
        c.add(3, true, 4);
        // Counted 0, but 2 live flows were found: two ends were counted twice.
        let s = BTreeMap::from([(3, snap(4, 4))]);
        let got = c.reconcile(&s, &s, &BTreeMap::from([(3, 2)]));
        assert_eq!(got[&3].overcounted, 2);
        assert_eq!(c.in_flight(3), 2);
    }

    #[test]
    fn clear_zeroes_the_count_and_counters_only_grow() {
        let c = counters();
        c.add(0, false, 9);
        c.add(0, true, 2);
        c.clear(0);
        assert_eq!(c.in_flight(0), 0);
        assert_eq!(c.get(0), snap(9, 9));
    }
}
