//! Reading the per-CPU counters and the live tables into a status snapshot.

use aya::{
    Pod,
    maps::{PerCpuArray, PerCpuValues},
};
use router_common::{LATENCY_KINDS, LatencyHistogram, TrafficCounters, reasons};
use serde::{Deserialize, Serialize};

use super::{Datapath, DatapathError, map_err};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
    pub new_conns: u64,
    pub reply_packets: u64,
}

impl Counters {
    fn add(&mut self, c: &TrafficCounters) {
        self.packets += c.packets;
        self.bytes += c.bytes;
        self.new_conns += c.new_conns;
        self.reply_packets += c.reply_packets;
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    /// Datapath slot: indexes BACKENDS and the per-backend counters.
    pub id: u32,
    pub name: String,
    #[serde(default)]
    pub role: super::BackendRole,
    pub address: String,
    pub weight: u32,
    /// Flows in flight at which a least-loaded pick sees no room (0: none).
    #[serde(default)]
    pub max_in_flight: u32,
    /// Slots this backend owns in the live Maglev table.
    pub slots: u32,
    pub counters: Counters,
    /// Connect and first-byte latency measured in the datapath.
    pub latency: super::BackendLatency,
    /// Flows open now, as the datapath counts them for least-loaded picks.
    #[serde(default)]
    pub in_flight: u64,
    /// Flows ended, cumulative (the datapath's ends and the scan's
    /// corrections for flows that vanished without one).
    #[serde(default)]
    pub flows_closed: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub vip: String,
    pub protocol: String,
    pub snat: Vec<String>,
    pub table_size: u32,
    /// `maglev` or `least_loaded`.
    #[serde(default)]
    pub selection: String,
    pub counters: Counters,
    pub backends: Vec<BackendStatus>,
    /// Pools, in the datapath's index order (empty: unpooled).
    #[serde(default)]
    pub pools: Vec<String>,
    /// New connections a pool handed down its fallback chain, by target.
    #[serde(default)]
    pub spills: Vec<Spill>,
}

/// New connections pool `from` handed to pool `to` (see `SPILLS`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spill {
    pub from: String,
    pub to: String,
    pub connections: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DatapathStatus {
    pub interfaces: Vec<String>,
    pub services: Vec<ServiceStatus>,
    /// Per-reason packet counts, by `router_common::reasons::NAMES`.
    pub reasons: Vec<(String, u64)>,
}

impl Datapath {
    fn zero_per_cpu<T: Pod + Default>(
        &mut self,
        map: &'static str,
        index: u32,
    ) -> Result<(), DatapathError> {
        let ncpus = aya::util::nr_cpus().map_err(|(_, e)| DatapathError::Cpus(e))?;
        let zeros =
            PerCpuValues::try_from(vec![T::default(); ncpus]).map_err(DatapathError::Cpus)?;
        let mut m: PerCpuArray<_, T> = PerCpuArray::try_from(
            self.ebpf
                .map_mut(map)
                .ok_or(DatapathError::MissingMap(map))?,
        )
        .map_err(map_err(map))?;
        m.set(index, zeros, 0).map_err(map_err(map))
    }

    /// Zeroes a backend slot's counters and histograms before the slot is
    /// reused, so a new backend never inherits another's traffic.
    pub(super) fn reset_backend_stats(&mut self, backend_id: u32) -> Result<(), DatapathError> {
        self.zero_per_cpu::<TrafficCounters>("BACKEND_STATS", backend_id)?;
        for kind in 0..LATENCY_KINDS {
            self.zero_per_cpu::<LatencyHistogram>("LATENCY", backend_id * LATENCY_KINDS + kind)?;
        }
        Ok(())
    }

    /// Zeroes a service id's spill counters before a new pooled service
    /// takes the id (or its pools change), so it never inherits another's.
    pub(super) fn reset_spills(&mut self, sid: u32) -> Result<(), DatapathError> {
        use router_common::pools::{MAX_POOLS, spill_index};
        for from in 0..MAX_POOLS {
            for to in 0..MAX_POOLS {
                self.zero_per_cpu::<u64>("SPILLS", spill_index(sid, from, to))?;
            }
        }
        Ok(())
    }

    fn traffic(&self, map: &'static str, index: u32) -> Result<Counters, DatapathError> {
        let stats: PerCpuArray<_, TrafficCounters> =
            PerCpuArray::try_from(self.ebpf.map(map).ok_or(DatapathError::MissingMap(map))?)
                .map_err(map_err(map))?;
        let mut sum = Counters::default();
        for c in stats.get(&index, 0).map_err(map_err(map))?.iter() {
            sum.add(c);
        }
        Ok(sum)
    }

    pub fn reason_counts(&self) -> Result<Vec<(String, u64)>, DatapathError> {
        let stats: PerCpuArray<_, u64> = PerCpuArray::try_from(
            self.ebpf
                .map("REASONS")
                .ok_or(DatapathError::MissingMap("REASONS"))?,
        )
        .map_err(map_err("REASONS"))?;
        let mut out = Vec::with_capacity(reasons::COUNT as usize);
        for (i, name) in reasons::NAMES.iter().enumerate() {
            let v: u64 = stats
                .get(&(i as u32), 0)
                .map_err(map_err("REASONS"))?
                .iter()
                .sum();
            out.push(((*name).to_string(), v));
        }
        Ok(out)
    }

    /// Every non-zero spill counter of service `sid`, whose pools are `pools`.
    fn spills(&self, sid: u32, pools: &[super::PoolSpec]) -> Result<Vec<Spill>, DatapathError> {
        if pools.is_empty() {
            return Ok(Vec::new());
        }
        let map: PerCpuArray<_, u64> = PerCpuArray::try_from(
            self.ebpf
                .map("SPILLS")
                .ok_or(DatapathError::MissingMap("SPILLS"))?,
        )
        .map_err(map_err("SPILLS"))?;
        let mut out = Vec::new();
        for (from, fp) in pools.iter().enumerate() {
            for (to, tp) in pools.iter().enumerate() {
                let index = router_common::pools::spill_index(sid, from as u32, to as u32);
                let n: u64 = map.get(&index, 0).map_err(map_err("SPILLS"))?.iter().sum();
                if n > 0 {
                    out.push(Spill {
                        from: fp.name.clone(),
                        to: tp.name.clone(),
                        connections: n,
                    });
                }
            }
        }
        Ok(out)
    }

    pub fn status(&self) -> Result<DatapathStatus, DatapathError> {
        let mut services = Vec::new();
        for st in self.services.values() {
            let mut backends = Vec::new();
            for b in &st.spec.backends {
                let id = st.backend_ids[&b.name];
                let load = self.load.get(id);
                let slots = st
                    .live_table()
                    .map(|t| t.iter().filter(|x| **x == id).count() as u32)
                    .unwrap_or(0);
                backends.push(BackendStatus {
                    id,
                    name: b.name.clone(),
                    role: b.role,
                    address: b.address.to_string(),
                    weight: b.weight,
                    max_in_flight: b.max_in_flight,
                    slots,
                    counters: self.traffic("BACKEND_STATS", id)?,
                    latency: self.backend_latency(id)?,
                    in_flight: load.in_flight(),
                    flows_closed: load.closed,
                });
            }
            services.push(ServiceStatus {
                name: st.spec.name.clone(),
                vip: st.spec.vip.to_string(),
                protocol: match st.spec.proto {
                    router_common::PROTO_TCP => "tcp".into(),
                    router_common::PROTO_UDP => "udp".into(),
                    p => p.to_string(),
                },
                snat: st.spec.snat.iter().map(|a| a.to_string()).collect(),
                table_size: self.opts.table_size,
                selection: st.spec.selection.as_str().into(),
                counters: self.traffic("SERVICE_STATS", st.id)?,
                backends,
                pools: st.spec.pools.iter().map(|p| p.name.clone()).collect(),
                spills: self.spills(st.id, &st.spec.pools)?,
            });
        }
        Ok(DatapathStatus {
            interfaces: self.attached_interfaces(),
            services,
            reasons: self.reason_counts()?,
        })
    }
}
