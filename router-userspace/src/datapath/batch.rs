//! Reading a whole hash map with `BPF_MAP_LOOKUP_BATCH`, which aya 0.14
//! does not wrap.
//!
//! Walking a hash map key by key (`BPF_MAP_GET_NEXT_KEY`, aya's `iter()`)
//! starts over from the first bucket whenever the cursor's key was deleted
//! in between, and the datapath deletes entries all the time (promotions,
//! LRU evictions, expiry): under churn a scan of a large table restarts
//! again and again, meets entries twice and may never finish. A batch
//! lookup's cursor is a bucket index instead, which deletion cannot
//! invalidate: every bucket is read once, each entry at most once.

use std::{
    io,
    mem::{MaybeUninit, size_of},
    os::fd::{AsRawFd, BorrowedFd},
};

use aya::Pod;

/// Kernel command number of `BPF_MAP_LOOKUP_BATCH` (uapi `enum bpf_cmd`).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// The kernel's internal "not supported" errno, which the batch calls
/// return for map types without them.
const ENOTSUPP: i32 = 524;

/// Entries asked for per call; the kernel returns whole buckets, so this
/// only bounds the buffers (grown on `ENOSPC`, a bucket larger than it).
const FIRST_CHUNK: usize = 1024;
const MAX_CHUNK: usize = 1 << 20;

/// The `batch` member of uapi `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Calls `each` once for every entry of the hash map behind `fd`
/// (`K`/`V` its key and value types). Entries inserted or deleted while it
/// runs may or may not be seen; none is seen twice. `Unsupported` when
/// the kernel has no batch operations for the map (before 5.6).
pub fn for_each<K: Pod, V: Pod>(
    fd: BorrowedFd<'_>,
    mut each: impl FnMut(&K, &V),
) -> io::Result<()> {
    let mut chunk = FIRST_CHUNK;
    let mut keys: Vec<MaybeUninit<K>> = Vec::new();
    let mut values: Vec<MaybeUninit<V>> = Vec::new();
    // Hash maps take a u32 bucket index as the cursor.
    let mut cursor: Option<u32> = None;
    let mut next: u32 = 0;
    loop {
        keys.resize_with(chunk, MaybeUninit::uninit);
        values.resize_with(chunk, MaybeUninit::uninit);
        let mut attr = BatchAttr {
            in_batch: cursor.as_ref().map_or(0, |c| std::ptr::from_ref(c) as u64),
            out_batch: std::ptr::from_mut(&mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` is the kernel's batch layout; the key and value
        // buffers hold `count` elements of the map's key and value sizes
        // (the caller's `K` and `V`), and the cursors are u32s that outlive
        // the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                std::ptr::from_mut(&mut attr),
                size_of::<BatchAttr>() as u32,
            )
        };
        let err = (rc < 0).then(io::Error::last_os_error);
        let done = match err.as_ref().and_then(io::Error::raw_os_error) {
            None => false,
            // The last batch: `count` says how many it still holds.
            Some(libc::ENOENT) => true,
            // One bucket holds more entries than the buffers: grow them
            // and read the same bucket again.
            Some(libc::ENOSPC) if chunk < MAX_CHUNK => {
                chunk *= 2;
                continue;
            }
            Some(libc::EINVAL | ENOTSUPP | libc::EOPNOTSUPP) => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "BPF_MAP_LOOKUP_BATCH is not supported for this map",
                ));
            }
            Some(_) => return Err(err.unwrap_or_else(io::Error::last_os_error)),
        };
        let filled = (attr.count as usize).min(chunk);
        for (k, v) in keys.iter().zip(&values).take(filled) {
            // SAFETY: the kernel wrote the first `filled` keys and values,
            // and any bit pattern is a valid `Pod`.
            each(unsafe { k.assume_init_ref() }, unsafe {
                v.assume_init_ref()
            });
        }
        if done {
            return Ok(());
        }
        cursor = Some(next);
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeMap,
        os::fd::{AsFd, FromRawFd, OwnedFd},
    };

    use aya::maps::{HashMap, IterableMap, Map, MapData};

    use super::*;

    /// A fresh LRU hash map of u32 → u64 (needs CAP_BPF; tests run as root).
    fn lru_map(max_entries: u32) -> HashMap<MapData, u32, u64> {
        #[repr(C)]
        #[derive(Default)]
        struct CreateAttr {
            map_type: u32,
            key_size: u32,
            value_size: u32,
            max_entries: u32,
            map_flags: u32,
        }
        const BPF_MAP_CREATE: libc::c_long = 0;
        const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
        let mut attr = CreateAttr {
            map_type: BPF_MAP_TYPE_LRU_HASH,
            key_size: 4,
            value_size: 8,
            max_entries,
            ..CreateAttr::default()
        };
        // SAFETY: a create command with its attribute struct.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_CREATE,
                std::ptr::from_mut(&mut attr),
                size_of::<CreateAttr>() as u32,
            )
        };
        assert!(fd >= 0, "BPF_MAP_CREATE: {}", io::Error::last_os_error());
        // SAFETY: the kernel just returned this descriptor to us.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let data = MapData::from_fd(fd).unwrap();
        HashMap::try_from(Map::from_map_data(data).unwrap()).unwrap()
    }

    #[test]
    fn every_entry_once_even_while_entries_are_deleted() {
        const N: u32 = 5_000;
        let mut map = lru_map(2 * N);
        for k in 0..N {
            map.insert(k, u64::from(k) * 3, 0).unwrap();
        }
        let fd = map.map().fd().as_fd().try_clone_to_owned().unwrap();
        let mut seen: BTreeMap<u32, u32> = BTreeMap::new();
        // Delete entries while the walk is under way, as the datapath does
        // all the time: every even key just visited (a key-by-key walk's
        // cursor, from which it would start over and meet the odd ones
        // again) and the key 2,500 above each visited one.
        for_each(fd.as_fd(), |k: &u32, v: &u64| {
            assert_eq!(*v, u64::from(*k) * 3);
            *seen.entry(*k).or_default() += 1;
            if k.is_multiple_of(2) {
                let _ = map.remove(k);
            }
            let _ = map.remove(&(k + N / 2));
        })
        .unwrap();
        assert!(seen.values().all(|&n| n == 1), "an entry was seen twice");
        // Whatever was never deleted before its bucket was read was seen.
        assert!((0..N / 2).all(|k| seen.contains_key(&k)));
        assert!(seen.len() < N as usize, "the deletions took effect");
    }

    #[test]
    fn an_empty_map_and_one_larger_than_a_chunk() {
        let empty = lru_map(16);
        let mut n = 0;
        for_each(empty.map().fd().as_fd(), |_: &u32, _: &u64| n += 1).unwrap();
        assert_eq!(n, 0);
        let mut big = lru_map(8 * FIRST_CHUNK as u32);
        for k in 0..(3 * FIRST_CHUNK as u32 + 7) {
            big.insert(k, 1, 0).unwrap();
        }
        let mut keys = Vec::new();
        for_each(big.map().fd().as_fd(), |k: &u32, _: &u64| keys.push(*k)).unwrap();
        keys.sort_unstable();
        assert_eq!(keys, (0..(3 * FIRST_CHUNK as u32 + 7)).collect::<Vec<_>>());
    }
}
