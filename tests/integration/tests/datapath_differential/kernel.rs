//! Kernel access: the loaded program's runs and maps, as the sessions
//! read and seed them, and the shared mapping of `BACKEND_LOAD`.

use std::{
    collections::BTreeMap,
    os::fd::{AsFd, AsRawFd},
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray};
use router::datapath::Datapath;
use router_common::{
    Backend, BackendLoad, ConnEntry, ConnKey, LATENCY_KINDS, LatencyHistogram, MAX_BACKENDS,
    Member, Service, ServiceKey, TrafficCounters, dsr::DsrFlow, reasons, selection::member_index,
};
use router_testkit::{
    model::{self, Load, Table},
    test_run::run_packet,
};

use super::world::*;

impl Harness {
    pub(crate) fn run(&mut self, input: &[u8], ingress: u32) -> (u32, Vec<u8>) {
        run_packet(&mut self.dp, input, ingress).expect("BPF_PROG_TEST_RUN")
    }

    pub(crate) fn table(&mut self, t: Table) -> BpfHashMap<&mut MapData, ConnKey, ConnEntry> {
        let name = match t {
            Table::Conns => "CONNS",
            Table::HalfOpen => "HALF_OPEN",
        };
        BpfHashMap::try_from(self.dp.ebpf_mut().map_mut(name).expect("table")).expect(name)
    }

    pub(crate) fn dsr_flows(&mut self) -> BpfHashMap<&mut MapData, ConnKey, DsrFlow> {
        BpfHashMap::try_from(self.dp.ebpf_mut().map_mut("DSR_FLOWS").expect("DSR_FLOWS"))
            .expect("DSR_FLOWS")
    }

    pub(crate) fn dsr_entries(&mut self) -> Vec<(ConnKey, DsrFlow)> {
        self.dsr_flows()
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .expect("reading DSR_FLOWS")
    }

    pub(crate) fn entries(&mut self, t: Table) -> Vec<(ConnKey, ConnEntry)> {
        self.table(t)
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .expect("reading a table")
    }

    pub(crate) fn clear(&mut self) {
        for t in [Table::Conns, Table::HalfOpen] {
            let keys: Vec<ConnKey> = self
                .table(t)
                .keys()
                .collect::<Result<_, _>>()
                .expect("table keys");
            let mut map = self.table(t);
            for k in keys {
                map.remove(&k).expect("removing an entry");
            }
        }
        let keys: Vec<ConnKey> = self
            .dsr_flows()
            .keys()
            .collect::<Result<_, _>>()
            .expect("DSR_FLOWS keys");
        let mut map = self.dsr_flows();
        for k in keys {
            map.remove(&k).expect("removing a DSR entry");
        }
    }

    pub(crate) fn reasons(&mut self) -> Vec<u64> {
        let m: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.dp.ebpf_mut().map("REASONS").expect("REASONS"))
                .expect("REASONS");
        (0..reasons::COUNT)
            .map(|i| m.get(&i, 0).expect("reason").iter().sum())
            .collect()
    }

    pub(crate) fn traffic(&mut self, map: &str, ids: &[u32]) -> BTreeMap<u32, [u64; 4]> {
        let m: PerCpuArray<_, TrafficCounters> =
            PerCpuArray::try_from(self.dp.ebpf_mut().map(map).expect("stats")).expect("stats");
        ids.iter()
            .map(|id| {
                let mut sum = [0u64; 4];
                for c in m.get(id, 0).expect("counters").iter() {
                    sum[0] += c.packets;
                    sum[1] += c.bytes;
                    sum[2] += c.new_conns;
                    sum[3] += c.reply_packets;
                }
                (*id, sum)
            })
            .collect()
    }

    pub(crate) fn latency_counts(&mut self, backend_ids: &[u32]) -> BTreeMap<(u32, u32), u64> {
        let m: PerCpuArray<_, LatencyHistogram> =
            PerCpuArray::try_from(self.dp.ebpf_mut().map("LATENCY").expect("LATENCY"))
                .expect("LATENCY");
        let mut out = BTreeMap::new();
        for b in backend_ids {
            for kind in 0..LATENCY_KINDS {
                let n: u64 = m
                    .get(&(b * LATENCY_KINDS + kind), 0)
                    .expect("histogram")
                    .iter()
                    .map(|h| h.buckets.iter().sum::<u64>())
                    .sum();
                out.insert((*b, kind), n);
            }
        }
        out
    }

    /// The live Maglev table half of service `sid`, as the kernel reads it.
    pub(crate) fn live_table(&mut self, key: ServiceKey) -> Vec<u32> {
        let services: BpfHashMap<_, ServiceKey, Service> =
            BpfHashMap::try_from(self.dp.ebpf_mut().map("SERVICES").expect("SERVICES"))
                .expect("SERVICES");
        let svc = services.get(&key, 0).expect("service");
        let tables: Array<_, u32> = Array::try_from(
            self.dp
                .ebpf_mut()
                .map("MAGLEV_TABLES")
                .expect("MAGLEV_TABLES"),
        )
        .expect("MAGLEV_TABLES");
        let base = (svc.id * 2 + (svc.active_table & 1)) * TABLE_SIZE;
        (0..TABLE_SIZE)
            .map(|i| tables.get(&(base + i), 0).expect("slot"))
            .collect()
    }

    /// The kernel's selection, member count and live scan list of a service.
    pub(crate) fn live_members(&mut self, key: ServiceKey) -> (u32, Vec<model::Member>) {
        let services: BpfHashMap<_, ServiceKey, Service> =
            BpfHashMap::try_from(self.dp.ebpf_mut().map("SERVICES").expect("SERVICES"))
                .expect("SERVICES");
        let svc = services.get(&key, 0).expect("service");
        let members: Array<_, Member> =
            Array::try_from(self.dp.ebpf_mut().map("MEMBERS").expect("MEMBERS")).expect("MEMBERS");
        let list = (0..svc.members)
            .map(|j| {
                let m = members
                    .get(&member_index(svc.id, svc.active_table, j), 0)
                    .expect("member");
                model::Member {
                    backend_id: m.backend_id,
                    weight: m.weight,
                    max_in_flight: m.max_in_flight,
                }
            })
            .collect();
        (svc.selection, list)
    }

    /// Writes a backend slot (in use, as the daemon wrote it but for its
    /// weight and room), as an apply does before it flips the tables.
    pub(crate) fn set_backend_weight(&mut self, id: u32, slot: Backend) {
        let mut backends: Array<_, Backend> =
            Array::try_from(self.dp.ebpf_mut().map_mut("BACKENDS").expect("BACKENDS"))
                .expect("BACKENDS");
        backends.set(id, slot, 0).expect("writing a backend slot");
    }

    /// A backend's in-flight counts, read through the daemon's mapping.
    pub(crate) fn load(&self, id: u32) -> Load {
        let l = self.load.get(id);
        Load {
            opened: l.opened,
            closed: l.closed,
        }
    }

    /// Sets a backend's counts (nothing else writes them while a session
    /// is set up).
    pub(crate) fn set_load(&mut self, id: u32, l: Load) {
        self.load_seed.set(id, l);
    }
}

/// A writable shared mapping of `BACKEND_LOAD` (an mmapable array): the
/// test sets every backend's counts for each session, and a system call
/// per backend would cost more than the session's packets.
pub(crate) struct LoadSeeder {
    base: *mut BackendLoad,
}

impl LoadSeeder {
    fn bytes() -> usize {
        MAX_BACKENDS as usize * std::mem::size_of::<BackendLoad>()
    }

    pub(crate) fn map(dp: &mut Datapath) -> Self {
        let fd = match dp.ebpf_mut().map("BACKEND_LOAD") {
            Some(aya::maps::Map::Array(data)) => data.fd().as_fd().as_raw_fd(),
            _ => panic!("BACKEND_LOAD is an array"),
        };
        // SAFETY: a fresh shared mapping of the array's fd; the kernel
        // checks that the map is mmapable and the length within its size.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                Self::bytes(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap BACKEND_LOAD");
        Self { base: p.cast() }
    }

    fn set(&mut self, id: u32, l: Load) {
        assert!(id < MAX_BACKENDS);
        // SAFETY: in bounds of the mapping; the counters are u64s, 8-aligned
        // in a page-aligned mapping, only changed atomically.
        unsafe {
            let e = self.base.add(id as usize);
            AtomicU64::from_ptr(&raw mut (*e).opened).store(l.opened, Ordering::SeqCst);
            AtomicU64::from_ptr(&raw mut (*e).closed).store(l.closed, Ordering::SeqCst);
        }
    }
}

impl Drop for LoadSeeder {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping `map` made.
        unsafe { libc::munmap(self.base.cast(), Self::bytes()) };
    }
}
