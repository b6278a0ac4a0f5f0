//! Reading the datapath's per-backend latency histograms (connect and first
//! byte) and the arithmetic on them that status, metrics and `router top`
//! share. Bucket `b` holds latencies below `2^b` µs (see
//! `router_common::LATENCY_BUCKETS`).

use aya::maps::PerCpuArray;
use router_common::{LATENCY_BUCKETS, LATENCY_KINDS, LatencyHistogram};
use serde::{Deserialize, Serialize};

use super::{Datapath, DatapathError, map_err};

pub use router_common::{LATENCY_CONNECT, LATENCY_FIRST_BYTE};

/// A latency histogram summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Histogram {
    /// Non-cumulative counts, `LATENCY_BUCKETS` long.
    pub buckets: Vec<u64>,
    pub sum_us: u64,
}

impl Histogram {
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Upper bound of bucket `b` in seconds; the last bucket is unbounded.
    pub fn upper_bound_seconds(b: usize) -> f64 {
        if b + 1 >= LATENCY_BUCKETS {
            f64::INFINITY
        } else {
            (1u64 << b) as f64 / 1e6
        }
    }

    /// Estimated quantile in seconds, interpolating linearly inside the
    /// bucket as Prometheus' `histogram_quantile` does; None without samples.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let mut seen = 0u64;
        for (b, &n) in self.buckets.iter().enumerate() {
            if n == 0 {
                continue;
            }
            if (seen + n) as f64 >= rank {
                let lower = if b == 0 {
                    0.0
                } else {
                    Self::upper_bound_seconds(b - 1)
                };
                let upper = Self::upper_bound_seconds(b);
                if upper.is_infinite() {
                    return Some(lower);
                }
                let within = (rank - seen as f64) / n as f64;
                return Some(lower + (upper - lower) * within.clamp(0.0, 1.0));
            }
            seen += n;
        }
        None
    }

    /// Adds `other`'s counts to these (a pool's histogram is the sum of its
    /// backends').
    pub fn add(&mut self, other: &Histogram) {
        if self.buckets.len() < other.buckets.len() {
            self.buckets.resize(other.buckets.len(), 0);
        }
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.sum_us += other.sum_us;
    }

    /// Counts gained since `earlier` (for rates over a window).
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        Histogram {
            buckets: self
                .buckets
                .iter()
                .enumerate()
                .map(|(i, n)| n.saturating_sub(earlier.buckets.get(i).copied().unwrap_or(0)))
                .collect(),
            sum_us: self.sum_us.saturating_sub(earlier.sum_us),
        }
    }
}

/// A backend's two datapath latencies.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendLatency {
    pub connect: Histogram,
    pub first_byte: Histogram,
}

impl Datapath {
    fn latency_map(
        &self,
    ) -> Result<PerCpuArray<&aya::maps::MapData, LatencyHistogram>, DatapathError> {
        PerCpuArray::try_from(
            self.ebpf
                .map("LATENCY")
                .ok_or(DatapathError::MissingMap("LATENCY"))?,
        )
        .map_err(map_err("LATENCY"))
    }

    /// One backend's histograms, summed over CPUs.
    pub fn backend_latency(&self, backend_id: u32) -> Result<BackendLatency, DatapathError> {
        let map = self.latency_map()?;
        let read = |kind: u32| -> Result<Histogram, DatapathError> {
            let mut h = Histogram {
                buckets: vec![0; LATENCY_BUCKETS],
                sum_us: 0,
            };
            let index = backend_id * LATENCY_KINDS + kind;
            for cpu in map.get(&index, 0).map_err(map_err("LATENCY"))?.iter() {
                for (sum, n) in h.buckets.iter_mut().zip(cpu.buckets.iter()) {
                    *sum += n;
                }
                h.sum_us += cpu.sum_us;
            }
            Ok(h)
        };
        Ok(BackendLatency {
            connect: read(LATENCY_CONNECT)?,
            first_byte: read(LATENCY_FIRST_BYTE)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(samples_us: &[u32]) -> Histogram {
        let mut h = Histogram {
            buckets: vec![0; LATENCY_BUCKETS],
            sum_us: 0,
        };
        for &us in samples_us {
            h.buckets[router_common::latency_bucket(us)] += 1;
            h.sum_us += u64::from(us);
        }
        h
    }

    #[test]
    fn quantiles_fall_inside_the_sample_bucket() {
        // 99 samples at 300 µs ([256, 512) µs) and one at 40 ms.
        let mut samples = vec![300u32; 99];
        samples.push(40_000);
        let h = hist(&samples);
        assert_eq!(h.count(), 100);
        let p50 = h.quantile(0.5).unwrap();
        assert!((256e-6..=512e-6).contains(&p50), "p50 {p50}");
        let p100 = h.quantile(1.0).unwrap();
        assert!((32_768e-6..=65_536e-6).contains(&p100), "max {p100}");
        assert_eq!(Histogram::default().quantile(0.5), None);
    }

    #[test]
    fn the_overflow_bucket_reports_its_lower_bound() {
        let h = hist(&[u32::MAX]);
        assert_eq!(h.quantile(0.99), Some((1u64 << 26) as f64 / 1e6));
        assert!(Histogram::upper_bound_seconds(LATENCY_BUCKETS - 1).is_infinite());
        assert_eq!(Histogram::upper_bound_seconds(10), 1024e-6);
    }

    #[test]
    fn since_subtracts_bucketwise() {
        let a = hist(&[10, 1000]);
        let b = hist(&[10, 1000, 1000, 5]);
        let d = b.since(&a);
        assert_eq!(d.count(), 2);
        assert_eq!(d.sum_us, 1005);
    }
}
