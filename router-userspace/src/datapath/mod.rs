//! The datapath module owns the loaded XDP program and is the only writer of
//! its maps. It turns a desired state (services, backends, weights) into map
//! contents with one rule: a packet never sees a half-written table. Each
//! service's Maglev table is double-buffered; a change is written into the
//! idle half and published by replacing the service's map value, whose
//! `active_table` word flips both halves at once.
//!
//! A datapath is either owned by this process (`load`: detached and freed
//! with it; fixtures and benchmarks) or pinned (`open_pinned`: the program,
//! its maps and links live on bpffs and outlive the daemon, and a new daemon
//! adopts them and swaps in its program without a moment without one).

mod adopt;
mod batch;
mod conn_table;
mod counters;
mod filter;
mod fingerprint;
mod keys;
mod latency;
mod load;
pub mod pinning;
mod pools;
mod snat6;
mod spec;
mod state;

use std::{collections::BTreeMap, path::PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapError},
    pin::PinError,
    programs::{
        ProgramError, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
};
use router_common::{
    FIB_GEN_PER_FLOW, MAX_BACKENDS, MAX_SERVICES,
    v6::{TAIL_DSR, TAIL_NAT6, TAIL_V6},
};

pub use adopt::AdoptedRoute;
pub use conn_table::{ConnScan, ConnTable};
pub use counters::{BackendStatus, Counters, DatapathStatus, ServiceStatus, Spill};
pub use latency::{BackendLatency, Histogram, LATENCY_CONNECT, LATENCY_FIRST_BYTE};
pub use load::{Correction, LoadCounters, LoadSnapshot};
pub use pinning::{PinDir, Removed};
pub use spec::{
    BackendRole, BackendSpec, Forwarding, LoadOptions, PoolSpec, SegmentSpec, Selection,
    ServiceSpec, flow_hash_key_of_seed,
};
pub use state::SCAN_LIMIT;
use state::ServiceState;

/// The compiled `router` XDP object.
pub static ROUTER_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/router"));
/// The trivial XDP_PASS object (benchmark reference, veth peers).
pub static XDP_PASS_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp-pass"));
/// The `decap` program for backends of DSR services (see `decap`).
pub static DECAP_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/decap"));

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
    #[error("reading the XDP object's map definitions: {0}")]
    Object(String),
    #[error(
        "pin_path {}: not on a BPF filesystem ({found}); the daemon mounts one itself only at an \
         empty parent directory of pin_path: mount one first (mount -t bpf bpf /sys/fs/bpf) or \
         choose a pin_path under one",
        path.display()
    )]
    NotBpffs { path: PathBuf, found: String },
    #[error("{}: {source}", path.display())]
    PinIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "pinned map {map} does not fit this daemon: {detail}; a pinned map is never re-created \
         under a running datapath: run `router daemon --cleanup` first (it detaches and resets \
         every connection: not hitless)"
    )]
    PinnedMap { map: String, detail: String },
    #[error(
        "daemon.hash_seed: the datapath pinned under {} hashes flows with another key; nothing \
         was attached. Remove hash_seed to keep the pinned key, or run `router daemon \
         --cleanup` first to start over with this one (it detaches and resets every \
         connection: not hitless)",
        .0.display()
    )]
    HashSeedMismatch(PathBuf),
    #[error("drawing the flow hash's secret (getrandom): {0}")]
    Random(#[source] std::io::Error),
    #[error(
        "the datapath pinned under {} was written by a router whose map layout is {}, this one's \
         is {want}; it cannot read those entries: run `router daemon --cleanup` with the \
         router that pinned it, or with this one (it detaches and resets every connection: \
         not hitless)",
        dir.display(),
        have.map_or_else(|| "older than layout stamps".to_string(), |v| v.to_string())
    )]
    LayoutMismatch {
        dir: PathBuf,
        have: Option<u32>,
        want: u32,
    },
    #[error(
        "pin_path {}: holds {} that this daemon does not pin ({}); nothing was removed or \
         changed: check pin_path",
        path.display(),
        if found.len() == 1 { "an entry" } else { "entries" },
        found.join(", ")
    )]
    ForeignPins { path: PathBuf, found: Vec<String> },
    #[error("pinned link {}: {detail}", path.display())]
    PinnedLink { path: PathBuf, detail: String },
    /// This process cannot create or write pins at pin_path (a daemon
    /// that runs as its own user, not root), with what to change.
    #[error("pin_path {}: {detail}", path.display())]
    PinAccess { path: PathBuf, detail: String },
    #[error("pinning {what}: {source}")]
    Pin {
        what: String,
        #[source]
        source: PinError,
    },
    #[error(
        "XDP on {0} was attached without a BPF link (netlink), which cannot be pinned; \
         remove it with `ip link set dev {0} xdp off` and start again"
    )]
    NotPinnable(String),
    #[error("XDP link: {0}")]
    Link(#[from] LinkError),
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
    links: Vec<(String, Attachment)>,
    fib_gen: u32,
    /// Where the objects are pinned; `None` for an owned datapath.
    pins: Option<PinDir>,
    /// Map contents left by an earlier daemon, named by the first apply.
    adopted: Option<adopt::PinnedState>,
    /// The in-flight counters, mapped once and shared with the scanner.
    load: std::sync::Arc<LoadCounters>,
    /// Least-loaded services with more backends than this draw two choices.
    scan_limit: usize,
    /// The flow hash's secret (see `router_common::flow_hash`).
    flow_hash_key: [u32; 2],
}

enum Attachment {
    /// Detached when the program is dropped.
    Owned(XdpLinkId),
    /// Held by its pin; this process keeps no reference.
    Pinned,
}

/// `max_entries` set at load time, by map name.
fn sized_maps(opts: &LoadOptions) -> Result<[(&'static str, u32); 6], DatapathError> {
    if opts.table_size < 2 {
        return Err(DatapathError::TableSize(opts.table_size));
    }
    let tables = MAX_SERVICES
        .checked_mul(2)
        .and_then(|n| n.checked_mul(opts.table_size))
        .ok_or(DatapathError::TableSize(opts.table_size))?;
    Ok([
        ("MAGLEV_TABLES", tables),
        ("CONNS", opts.conn_table_size),
        // DSR flows have one entry each and share the setting: a node
        // that serves both kinds holds up to this many of each.
        ("DSR_FLOWS", opts.conn_table_size),
        ("DSR_FLOWS6", opts.conn_table_size),
        // Both directions of an IPv6 NAT flow, as `CONNS` holds IPv4's.
        ("NAT6_CONNS", opts.conn_table_size),
        (
            "HALF_OPEN",
            router_common::half_open_table_size(opts.conn_table_size),
        ),
    ])
}

/// Load-time settings in the program's own types (u32 where the options
/// hold a bool or u16).
struct Globals {
    log: u32,
    ephemeral_min: u32,
    ephemeral_max: u32,
    flow_hash_key: [u32; 2],
}

impl Globals {
    fn of(opts: &LoadOptions, flow_hash_key: [u32; 2]) -> Self {
        Self {
            log: u32::from(opts.datapath_log),
            ephemeral_min: u32::from(opts.ephemeral_ports.0),
            ephemeral_max: u32::from(opts.ephemeral_ports.1),
            flow_hash_key,
        }
    }
}

/// A fresh flow-hash secret from the kernel's random pool.
fn new_flow_hash_key() -> Result<[u32; 2], DatapathError> {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into `bytes`,
    // which lives for the call.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        return Err(DatapathError::Random(std::io::Error::last_os_error()));
    }
    let (a, b) = bytes.split_at(4);
    let word = |w: &[u8]| u32::from_ne_bytes([w[0], w[1], w[2], w[3]]);
    Ok([word(a), word(b)])
}

/// The loader with every load-time setting.
fn loader<'a>(
    opts: &'a LoadOptions,
    globals: &'a Globals,
    sized: &[(&'static str, u32)],
) -> EbpfLoader<'a> {
    let mut loader = EbpfLoader::new();
    loader
        .override_global("TABLE_SIZE", &opts.table_size, true)
        .override_global("TCP_IDLE_NS", &opts.tcp_idle_ns, true)
        .override_global("TCP_CLOSING_NS", &opts.tcp_closing_ns, true)
        .override_global("UDP_IDLE_NS", &opts.udp_idle_ns, true)
        .override_global("DATAPATH_LOG", &globals.log, true)
        .override_global("EPHEMERAL_PORT_MIN", &globals.ephemeral_min, true)
        .override_global("EPHEMERAL_PORT_MAX", &globals.ephemeral_max, true)
        .override_global("FLOW_HASH_KEY0", &globals.flow_hash_key[0], true)
        .override_global("FLOW_HASH_KEY1", &globals.flow_hash_key[1], true);
    for (name, size) in sized {
        loader.map_max_entries(name, *size);
    }
    loader
}

/// Loads the programs `router` tail-calls (`router_dsr` for IPv4 DSR
/// services, `router_v6` for IPv6 frames, and `router_nat6`, which
/// `router_v6` tail-calls for IPv6 NAT) and puts each at its index of
/// `TAIL_CALLS` (a pinned array's old programs are replaced in the same
/// writes).
fn install_tail_calls(ebpf: &mut Ebpf) -> Result<(), DatapathError> {
    for (name, index) in [
        ("router_dsr", TAIL_DSR),
        ("router_v6", TAIL_V6),
        ("router_nat6", TAIL_NAT6),
    ] {
        let program: &mut Xdp = ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingMap(name))?
            .try_into()?;
        program.load()?;
        let fd = program
            .fd()?
            .try_clone()
            .map_err(|e| DatapathError::PinIo {
                path: name.into(),
                source: e,
            })?;
        let mut array = aya::maps::ProgramArray::try_from(
            ebpf.map_mut("TAIL_CALLS")
                .ok_or(DatapathError::MissingMap("TAIL_CALLS"))?,
        )
        .map_err(map_err("TAIL_CALLS"))?;
        array.set(index, &fd, 0).map_err(map_err("TAIL_CALLS"))?;
    }
    Ok(())
}

impl Datapath {
    /// Loads the program and creates its maps; attaches nothing. Everything
    /// goes away with the returned value.
    pub fn load(opts: LoadOptions) -> Result<Self, DatapathError> {
        let sized = sized_maps(&opts)?;
        let key = match opts.flow_hash_key {
            Some(k) => k,
            None => new_flow_hash_key()?,
        };
        let globals = Globals::of(&opts, key);
        let ebpf = loader(&opts, &globals, &sized).load(ROUTER_OBJ)?;
        Self::finish_load(ebpf, opts, None, key)
    }

    /// Loads the program against the maps pinned under `dir`, creating and
    /// pinning the ones that are not there yet. Pinned maps must fit the
    /// program exactly (type, key and value size, entries, flags), or this
    /// refuses with the map and the difference: re-creating one would lose
    /// its state, and for `CONNS` reset every connection. Returns whether
    /// an earlier datapath was found; its state is adopted by the first
    /// `apply`. Nothing is attached or replaced yet.
    pub fn open_pinned(opts: LoadOptions, dir: &PinDir) -> Result<(Self, bool), DatapathError> {
        let sized = sized_maps(&opts)?;
        let layouts = pinning::pinned_layouts(ROUTER_OBJ, &sized)?;
        dir.create()?;
        let adopted = pinning::check_pinned(dir, &layouts)?;
        pinning::check_layout_stamp(dir, &adopted)?;
        // The pinned secret, so every flow hashes as it did before the
        // restart; a new one only for maps created now.
        let key = match (opts.flow_hash_key, adopted.contains("FLOW_HASH_KEY")) {
            (Some(k), true) => {
                // Re-keying would move every flow that misses the
                // connection table, and desynchronise this node from the
                // others that share its seed: refuse, before anything is
                // attached.
                if pinning::pinned_flow_hash_key(dir)? != k {
                    return Err(DatapathError::HashSeedMismatch(dir.root().to_path_buf()));
                }
                k
            }
            (Some(k), false) => k,
            (None, true) => pinning::pinned_flow_hash_key(dir)?,
            (None, false) => new_flow_hash_key()?,
        };
        let globals = Globals::of(&opts, key);
        let mut loader = loader(&opts, &globals, &sized);
        for l in &layouts {
            loader.map_pin_path(&l.name, dir.map(&l.name));
        }
        let ebpf = loader.load(ROUTER_OBJ)?;
        let mut dp = Self::finish_load(ebpf, opts, Some(dir.clone()), key)?;
        // The services are what the rest is read through: with them
        // pinned there is a datapath to adopt (maps created just now read
        // as empty, which is what they hold).
        let found = adopted.contains("SERVICES");
        if found {
            dp.adopted = Some(dp.read_pinned_state()?);
        }
        Ok((dp, found))
    }

    fn finish_load(
        mut ebpf: Ebpf,
        opts: LoadOptions,
        pins: Option<PinDir>,
        flow_hash_key: [u32; 2],
    ) -> Result<Self, DatapathError> {
        let program: &mut Xdp = ebpf
            .program_mut("router")
            .ok_or(DatapathError::MissingMap("router program"))?
            .try_into()?;
        program.load()?;
        install_tail_calls(&mut ebpf)?;
        let load = std::sync::Arc::new(load::map(&ebpf)?);
        let mut dp = Self {
            ebpf,
            opts,
            services: BTreeMap::new(),
            retired_backends: Vec::new(),
            filter: vec![0; router_common::ADDR_FILTER_SIZE as usize],
            links: Vec::new(),
            fib_gen: 0,
            pins,
            adopted: None,
            load,
            scan_limit: SCAN_LIMIT,
            flow_hash_key: [0; 2],
        };
        // A pinned generation counts on, so no cached next hop can match
        // a generation it was not resolved under.
        dp.fib_gen = dp.fib_gen_map()?.get(&0, 0).map_err(map_err("FIB_GEN"))?;
        dp.bump_fib_generation()?;
        // Stamped on every load: maps just created get it, adopted ones
        // hold it already (`check_layout_stamp`).
        let mut layout: Array<_, u32> = Array::try_from(
            dp.ebpf
                .map_mut("LAYOUT")
                .ok_or(DatapathError::MissingMap("LAYOUT"))?,
        )
        .map_err(map_err("LAYOUT"))?;
        layout
            .set(0, router_common::LAYOUT_VERSION, 0)
            .map_err(map_err("LAYOUT"))?;
        let mut key_map: Array<_, u32> = Array::try_from(
            dp.ebpf
                .map_mut("FLOW_HASH_KEY")
                .ok_or(DatapathError::MissingMap("FLOW_HASH_KEY"))?,
        )
        .map_err(map_err("FLOW_HASH_KEY"))?;
        for (i, w) in (0u32..).zip(flow_hash_key) {
            key_map.set(i, w, 0).map_err(map_err("FLOW_HASH_KEY"))?;
        }
        dp.flow_hash_key = flow_hash_key;
        Ok(dp)
    }

    /// The flow hash's secret this datapath's program was loaded with.
    pub fn flow_hash_key(&self) -> [u32; 2] {
        self.flow_hash_key
    }

    pub fn options(&self) -> &LoadOptions {
        &self.opts
    }

    /// Sets the largest least-loaded service that is scanned in full
    /// (`SCAN_LIMIT` unless changed; at most `MAX_SCAN_MEMBERS`); takes
    /// effect at the next apply. The datapath benchmark compares both picks
    /// at equal sizes with it.
    pub fn set_scan_limit(&mut self, limit: usize) {
        self.scan_limit = limit.min(router_common::selection::MAX_SCAN_MEMBERS as usize);
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

    /// Attaches to `interface`. A pinned datapath pins the link, or, when
    /// an earlier daemon left one there, atomically replaces that link's
    /// program with this one (bpf_link_update): packets never meet an
    /// interface without a program. `mode` applies only to a new link.
    /// Returns whether an existing link was taken over.
    pub fn attach(&mut self, interface: &str, mode: XdpMode) -> Result<bool, DatapathError> {
        let Some(pins) = self.pins.clone() else {
            let link = self.program_mut()?.attach(interface, mode)?;
            self.links
                .push((interface.to_string(), Attachment::Owned(link)));
            return Ok(false);
        };
        let path = pins.link(interface);
        if path.exists() {
            let old = PinnedLink::from_pin(&path).map_err(|e| DatapathError::PinnedLink {
                path: path.clone(),
                detail: e.to_string(),
            })?;
            let old = XdpLink::try_from(FdLink::from(old))?;
            let program = self.program_mut()?;
            match program.attach_to_link(old) {
                Ok(id) => {
                    // The pin holds the link; this process needs no fd of it.
                    drop(program.take_link(id)?);
                    self.links.push((interface.to_string(), Attachment::Pinned));
                    return Ok(true);
                }
                // The interface was deleted (and maybe re-created) since:
                // the old link is defunct; a new one takes its place.
                Err(ProgramError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::ENOLINK) =>
                {
                    pinning::remove_link(&pins, interface)?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        let program = self.program_mut()?;
        let id = program.attach(interface, mode)?;
        let link = program.take_link(id)?;
        let fd = FdLink::try_from(link)
            .map_err(|_| DatapathError::NotPinnable(interface.to_string()))?;
        fd.pin(&path).map_err(|source| DatapathError::Pin {
            what: format!("the XDP link of {interface}"),
            source,
        })?;
        self.links.push((interface.to_string(), Attachment::Pinned));
        Ok(false)
    }

    /// Completes a pinned start once every configured interface is
    /// attached: links left on interfaces no longer configured are
    /// detached, this program replaces the pinned one, and pinned maps this
    /// program does not declare (dropped by an upgrade) are removed. Returns
    /// what was removed, for the log.
    pub fn finish_pinning(&mut self) -> Result<Vec<String>, DatapathError> {
        let Some(pins) = self.pins.clone() else {
            return Ok(Vec::new());
        };
        let mut removed = Vec::new();
        let attached = self.attached_interfaces();
        for iface in pins.linked_interfaces()? {
            if !attached.contains(&iface) {
                pinning::remove_link(&pins, &iface)?;
                removed.push(format!("link on {iface}"));
            }
        }
        let next = pins.program_next();
        if next.exists() {
            std::fs::remove_file(&next).map_err(|source| DatapathError::PinIo {
                path: next.clone(),
                source,
            })?;
        }
        self.program_mut()?
            .pin(&next)
            .map_err(|source| DatapathError::Pin {
                what: "the XDP program".into(),
                source,
            })?;
        // A rename replaces the old pin in one step.
        std::fs::rename(&next, pins.program()).map_err(|source| DatapathError::PinIo {
            path: pins.program(),
            source,
        })?;
        let declared = pinning::pinned_layouts(ROUTER_OBJ, &sized_maps(&self.opts)?)?;
        for name in pins.pinned_maps()? {
            if !declared.iter().any(|l| l.name == name) {
                let path = pins.map(&name);
                std::fs::remove_file(&path)
                    .map_err(|source| DatapathError::PinIo { path, source })?;
                removed.push(format!("map {name}"));
            }
        }
        Ok(removed)
    }

    /// The VIP addresses of services that have a backend to send a new
    /// flow to (weight above 0): what a node may announce.
    pub fn serving_vips(&self) -> std::collections::BTreeSet<std::net::IpAddr> {
        self.services
            .values()
            .filter(|st| st.spec.backends.iter().any(|b| b.weight > 0))
            .map(|st| st.spec.vip.ip())
            .collect()
    }

    /// Where the datapath is pinned, if it is.
    pub fn pins(&self) -> Option<&PinDir> {
        self.pins.as_ref()
    }

    /// Detaches an owned datapath from every interface (the maps go with
    /// the program on drop). A pinned one stays: see `pinning::remove_all`.
    pub fn detach_all(&mut self) -> Result<(), DatapathError> {
        let (owned, pinned): (Vec<_>, Vec<_>) = std::mem::take(&mut self.links)
            .into_iter()
            .partition(|(_, l)| matches!(l, Attachment::Owned(_)));
        self.links = pinned;
        let program = self.program_mut()?;
        for (_, link) in owned {
            if let Attachment::Owned(id) = link {
                program.detach(id)?;
            }
        }
        Ok(())
    }

    pub fn attached_interfaces(&self) -> Vec<String> {
        self.links.iter().map(|(i, _)| i.clone()).collect()
    }

    /// A lookup and a same-value update through an open map fd: what the
    /// daemon does for its whole life, used to find which capabilities
    /// this kernel asks for them.
    pub fn probe_map_access(&mut self) -> Result<(), DatapathError> {
        let gen_now = self.fib_gen;
        let mut map = self.fib_gen_map()?;
        map.get(&0, 0).map_err(map_err("FIB_GEN"))?;
        map.set(0, gen_now, 0).map_err(map_err("FIB_GEN"))
    }

    fn fib_gen_map(&mut self) -> Result<Array<&mut aya::maps::MapData, u32>, DatapathError> {
        Array::try_from(
            self.ebpf
                .map_mut("FIB_GEN")
                .ok_or(DatapathError::MissingMap("FIB_GEN"))?,
        )
        .map_err(map_err("FIB_GEN"))
    }

    /// Invalidates every cached next hop: called when routes or neighbours change.
    pub fn bump_fib_generation(&mut self) -> Result<(), DatapathError> {
        let per_flow = self.fib_gen & FIB_GEN_PER_FLOW != 0;
        self.set_fib_generation(next_fib_gen(self.fib_gen, per_flow))
    }

    /// Whether every flow looks its own next hop up (see
    /// `FIB_GEN_PER_FLOW`), as last set.
    pub fn per_flow_next_hops(&self) -> bool {
        self.fib_gen & FIB_GEN_PER_FLOW != 0
    }

    /// Makes every flow look its own next hop up (`per_flow`), or flows to
    /// a backend share its hop, and invalidates every cached next hop.
    pub fn set_per_flow_next_hops(&mut self, per_flow: bool) -> Result<(), DatapathError> {
        self.set_fib_generation(next_fib_gen(self.fib_gen, per_flow))
    }

    fn set_fib_generation(&mut self, fib_gen: u32) -> Result<(), DatapathError> {
        self.fib_gen = fib_gen;
        self.fib_gen_map()?
            .set(0, fib_gen, 0)
            .map_err(map_err("FIB_GEN"))
    }
}

/// The `FIB_GEN` value after `current`: the generation counted on (never 0,
/// so a value is never the "nothing cached" one) with the per-flow bit
/// set as asked.
fn next_fib_gen(current: u32, per_flow: bool) -> u32 {
    let generation = ((current & !FIB_GEN_PER_FLOW).wrapping_add(1) & !FIB_GEN_PER_FLOW).max(1);
    generation | if per_flow { FIB_GEN_PER_FLOW } else { 0 }
}

#[cfg(test)]
mod fib_gen_tests {
    use router_common::FIB_GEN_PER_FLOW;

    use super::next_fib_gen;

    #[test]
    fn a_generation_counts_on_keeps_clear_of_zero_and_carries_the_per_flow_bit() {
        assert_eq!(next_fib_gen(0, false), 1);
        assert_eq!(next_fib_gen(7, false), 8);
        assert_eq!(next_fib_gen(7, true), 8 | FIB_GEN_PER_FLOW);
        assert_eq!(next_fib_gen(8 | FIB_GEN_PER_FLOW, false), 9);
        // The generation wraps inside its 31 bits, past 0.
        assert_eq!(next_fib_gen(FIB_GEN_PER_FLOW - 1, false), 1);
        assert_eq!(next_fib_gen(u32::MAX, true), 1 | FIB_GEN_PER_FLOW);
    }
}
