//! The config as written: serde shapes that accept what the TOML says,
//! before validation gives it meaning.

use std::{collections::BTreeMap, fmt, path::PathBuf};

use serde::{
    Deserialize,
    de::{self, Deserializer, SeqAccess, Visitor},
};

use super::{Protocol, Selection, XdpMode, locate::KeyPath};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) daemon: RawDaemon,
    pub(super) policy: Option<RawPolicy>,
    #[serde(default)]
    pub(super) service: Vec<RawService>,
    pub(super) bgp: Option<RawBgp>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBgp {
    pub(super) local_as: u32,
    pub(super) router_id: String,
    #[serde(default)]
    pub(super) peers: Vec<RawPeer>,
    pub(super) hold_time: Option<String>,
    pub(super) drain: Option<String>,
    pub(super) next_hop6: Option<String>,
    pub(super) gobgpd: Option<std::path::PathBuf>,
    pub(super) gobgp: Option<std::path::PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPeer {
    pub(super) address: String,
    #[serde(rename = "as")]
    pub(super) asn: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDaemon {
    pub(super) interface: StringOrList,
    #[serde(default)]
    pub(super) xdp_mode: XdpMode,
    pub(super) pin_path: Option<PathBuf>,
    pub(super) control_socket: Option<PathBuf>,
    pub(super) metrics_listen: Option<String>,
    pub(super) table_size: Option<u32>,
    pub(super) conn_table_size: Option<u32>,
    pub(super) snat_port_range: Option<String>,
    pub(super) tcp_idle_timeout: Option<String>,
    pub(super) tcp_closing_timeout: Option<String>,
    pub(super) udp_idle_timeout: Option<String>,
    #[serde(default)]
    pub(super) datapath_log: bool,
    pub(super) hash_seed: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawService {
    pub(super) name: String,
    pub(super) vip: String,
    #[serde(default)]
    pub(super) protocol: Protocol,
    #[serde(default)]
    pub(super) forwarding: RawForwarding,
    pub(super) encap: Option<Encap>,
    pub(super) gue_port: Option<u16>,
    pub(super) snat: Option<StringOrList>,
    #[serde(default)]
    pub(super) backend: Vec<RawBackend>,
    pub(super) fallback: Option<String>,
    pub(super) selection: Option<Selection>,
    #[serde(default)]
    pub(super) pool: Vec<RawPool>,
    #[serde(default)]
    pub(super) segment: Vec<RawSegment>,
    pub(super) discovery: Option<RawDiscovery>,
}

/// `discovery = { kubernetes = { … } }`: a table of sources, so another
/// kind can join without changing what is written today.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDiscovery {
    pub(super) kubernetes: Option<RawKubernetes>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKubernetes {
    pub(super) namespace: String,
    pub(super) service: String,
    pub(super) port: Option<RawPort>,
    pub(super) kubeconfig: Option<PathBuf>,
    pub(super) capacity: Option<f64>,
    pub(super) telemetry: Option<RawTelemetry>,
}

/// An EndpointSlice port by name, or a port number, as written.
pub(super) enum RawPort {
    Name(String),
    Number(i64),
}

impl<'de> Deserialize<'de> for RawPort {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RawPort;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port name (string) or number (integer)")
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawPort, E> {
                Ok(RawPort::Number(v))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawPort, E> {
                Ok(RawPort::Number(i64::try_from(v).unwrap_or(i64::MAX)))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawPort, E> {
                Ok(RawPort::Name(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPool {
    pub(super) name: String,
    pub(super) backends: Vec<String>,
    pub(super) share: Option<u32>,
    pub(super) fallback: Option<String>,
    pub(super) guard: Option<RawGuard>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGuard {
    pub(super) ttft_p99_ratio: f64,
    pub(super) min_connections: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSegment {
    pub(super) cidr: String,
    pub(super) pool: String,
}

#[derive(Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawForwarding {
    #[default]
    Nat,
    Dsr,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(super) enum Encap {
    Ipip,
    Gue,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackend {
    pub(super) name: String,
    pub(super) address: String,
    pub(super) weight: Option<u32>,
    pub(super) capacity: Option<f64>,
    pub(super) telemetry: Option<RawTelemetry>,
    pub(super) health: Option<RawHealth>,
    pub(super) cost_per_hour: Option<f64>,
    pub(super) drain: Option<bool>,
    pub(super) max_in_flight: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPolicy {
    pub(super) poll_interval: Option<String>,
    pub(super) target_utilization: Option<f64>,
    pub(super) saturation: Option<f64>,
    pub(super) hysteresis: Option<f64>,
    pub(super) saturation_confirm: Option<u32>,
    pub(super) ewma_alpha: Option<f64>,
    pub(super) slow_start: Option<String>,
    pub(super) slow_start_aggression: Option<f64>,
    pub(super) min_weight_fraction: Option<f64>,
    pub(super) max_step_fraction: Option<f64>,
    pub(super) weight_gain: Option<f64>,
    pub(super) weight_deadband: Option<f64>,
    pub(super) stale_after: Option<String>,
    pub(super) stale_decay: Option<String>,
    pub(super) stale_fraction: Option<f64>,
    pub(super) full_weight: Option<u32>,
    pub(super) signal: Option<RawSignal>,
    pub(super) speed_window: Option<String>,
    pub(super) capacity_deadband: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSignal {
    pub(super) gpu_util: Option<f64>,
    pub(super) kv_cache: Option<f64>,
    pub(super) queue: Option<f64>,
    pub(super) queue_norm: Option<f64>,
}

/// Flat on purpose: an internally tagged enum would lose the spans, and
/// errors could then name only `telemetry`, not the offending key.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTelemetry {
    pub(super) source: String,
    pub(super) device: Option<RawDevice>,
    pub(super) library: Option<PathBuf>,
    pub(super) url: Option<String>,
    pub(super) token_file: Option<PathBuf>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) format: Option<String>,
    pub(super) labels: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealth {
    pub(super) tcp: Option<bool>,
    pub(super) http_path: Option<String>,
    pub(super) interval: Option<String>,
    pub(super) timeout: Option<String>,
    pub(super) fall: Option<u32>,
    pub(super) rise: Option<u32>,
}

/// An NVML index or UUID as written.
pub(super) enum RawDevice {
    Index(u32),
    Uuid(String),
}

impl<'de> Deserialize<'de> for RawDevice {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RawDevice;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a GPU index (integer) or UUID (string)")
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawDevice, E> {
                u32::try_from(v)
                    .map(RawDevice::Index)
                    .map_err(|_| E::custom(format!("GPU index {v} is out of range")))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawDevice, E> {
                u32::try_from(v)
                    .map(RawDevice::Index)
                    .map_err(|_| E::custom(format!("GPU index {v} is out of range")))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawDevice, E> {
                Ok(RawDevice::Uuid(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

/// A string or a list of strings; `list` remembers which, so errors can
/// name `key[i]` only when there is an index to name.
pub(super) struct StringOrList {
    pub(super) items: Vec<String>,
    pub(super) list: bool,
}

impl StringOrList {
    pub(super) fn item_path(&self, base: &KeyPath, i: usize) -> KeyPath {
        if self.list {
            base.index(i)
        } else {
            base.clone()
        }
    }
}

impl<'de> Deserialize<'de> for StringOrList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StringOrList;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<StringOrList, E> {
                Ok(StringOrList {
                    items: vec![v.to_owned()],
                    list: false,
                })
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<StringOrList, A::Error> {
                let mut items = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    items.push(s);
                }
                Ok(StringOrList { items, list: true })
            }
        }
        d.deserialize_any(V)
    }
}
