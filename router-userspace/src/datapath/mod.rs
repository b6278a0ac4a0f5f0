//! The datapath module owns the loaded XDP program and is the only writer of
//! its maps. It turns a desired state (services, backends, weights) into map
//! contents with one rule: a packet never sees a half-written table. Each
//! service's Maglev table is double-buffered; a change is written into the
//! idle half and published by replacing the service's map value, whose
//! `active_table` word flips both halves at once.

mod conn_table;
mod counters;
mod latency;
mod spec;
mod state;

use std::collections::BTreeMap;

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapError},
    programs::{ProgramError, Xdp, XdpMode, xdp::XdpLinkId},
};
use router_common::{MAX_BACKENDS, MAX_SERVICES};

pub use conn_table::{ConnScan, ConnTable};
pub use counters::{BackendStatus, Counters, DatapathStatus, ServiceStatus};
pub use latency::{BackendLatency, Histogram, LATENCY_CONNECT, LATENCY_FIRST_BYTE};
pub use spec::{BackendSpec, LoadOptions, ServiceSpec};
use state::ServiceState;

/// The compiled `router` XDP object.
pub static ROUTER_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/router"));
/// The trivial XDP_PASS object (benchmark reference, veth peers).
pub static XDP_PASS_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp-pass"));

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the XDP object failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("XDP program error: {0}")]
    Program(#[from] ProgramError),
    #[error("BPF map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map {0} is missing from the XDP object")]
    MissingMap(&'static str),
    #[error("too many services: {0} (the datapath holds at most {MAX_SERVICES})")]
    TooManyServices(usize),
    #[error("too many backends: {0} (the datapath holds at most {MAX_BACKENDS})")]
    TooManyBackends(usize),
    #[error("table size {0} is not usable (must be a prime ≥ 2)")]
    TableSize(u32),
    #[error("counting possible CPUs for per-CPU maps: {0}")]
    Cpus(std::io::Error),
    #[error("service {service}: {reason}")]
    Spec { service: String, reason: String },
}

pub(crate) fn map_err(map: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { map, source }
}

pub struct Datapath {
    ebpf: Ebpf,
    opts: LoadOptions,
    services: BTreeMap<String, ServiceState>,
    /// Backend ids that left the live tables at the last apply. Their
    /// `BACKENDS` slots stay valid one more round, for a packet that read the
    /// previous table half just before the flip.
    retired_backends: Vec<u32>,
    filter: Vec<u32>,
    links: Vec<(String, XdpLinkId)>,
    fib_gen: u32,
}

impl Datapath {
    /// Loads the program and creates its maps; attaches nothing.
    pub fn load(opts: LoadOptions) -> Result<Self, DatapathError> {
        if opts.table_size < 2 {
            return Err(DatapathError::TableSize(opts.table_size));
        }
        let tables = MAX_SERVICES
            .checked_mul(2)
            .and_then(|n| n.checked_mul(opts.table_size))
            .ok_or(DatapathError::TableSize(opts.table_size))?;
        let log = u32::from(opts.datapath_log);
        let mut ebpf = EbpfLoader::new()
            .override_global("TABLE_SIZE", &opts.table_size, true)
            .override_global("TCP_IDLE_NS", &opts.tcp_idle_ns, true)
            .override_global("TCP_CLOSING_NS", &opts.tcp_closing_ns, true)
            .override_global("UDP_IDLE_NS", &opts.udp_idle_ns, true)
            .override_global("DATAPATH_LOG", &log, true)
            .map_max_entries("MAGLEV_TABLES", tables)
            .map_max_entries("CONNS", opts.conn_table_size)
            .map_max_entries(
                "HALF_OPEN",
                router_common::half_open_table_size(opts.conn_table_size),
            )
            .load(ROUTER_OBJ)?;
        let program: &mut Xdp = ebpf
            .program_mut("router")
            .ok_or(DatapathError::MissingMap("router program"))?
            .try_into()?;
        program.load()?;
        let mut dp = Self {
            ebpf,
            opts,
            services: BTreeMap::new(),
            retired_backends: Vec::new(),
            filter: vec![0; router_common::ADDR_FILTER_SIZE as usize],
            links: Vec::new(),
            fib_gen: 0,
        };
        dp.bump_fib_generation()?;
        Ok(dp)
    }

    pub fn options(&self) -> &LoadOptions {
        &self.opts
    }

    /// The loaded program, for attaching elsewhere or BPF_PROG_TEST_RUN.
    pub fn program_mut(&mut self) -> Result<&mut Xdp, DatapathError> {
        Ok(self
            .ebpf
            .program_mut("router")
            .ok_or(DatapathError::MissingMap("router program"))?
            .try_into()?)
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    pub fn attach(&mut self, interface: &str, mode: XdpMode) -> Result<(), DatapathError> {
        let link = self.program_mut()?.attach(interface, mode)?;
        self.links.push((interface.to_string(), link));
        Ok(())
    }

    /// Detaches from every interface (the maps go with the program on drop).
    pub fn detach_all(&mut self) -> Result<(), DatapathError> {
        let links = std::mem::take(&mut self.links);
        let program = self.program_mut()?;
        for (_, link) in links {
            program.detach(link)?;
        }
        Ok(())
    }

    pub fn attached_interfaces(&self) -> Vec<String> {
        self.links.iter().map(|(i, _)| i.clone()).collect()
    }

    /// Invalidates every cached next hop: called when routes or neighbours change.
    pub fn bump_fib_generation(&mut self) -> Result<(), DatapathError> {
        self.fib_gen = self.fib_gen.wrapping_add(1).max(1);
        let mut gen_map: Array<_, u32> = Array::try_from(
            self.ebpf
                .map_mut("FIB_GEN")
                .ok_or(DatapathError::MissingMap("FIB_GEN"))?,
        )
        .map_err(map_err("FIB_GEN"))?;
        gen_map.set(0, self.fib_gen, 0).map_err(map_err("FIB_GEN"))
    }
}
