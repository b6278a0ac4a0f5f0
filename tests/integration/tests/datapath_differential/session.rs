//! Running a session through the kernel and the model, and comparing.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Instant,
};

use proptest::{prelude::*, test_runner::TestCaseError};
use router_common::{
    CONN_AWAIT_ANY, CONN_AWAIT_REQUEST, CONN_AWAIT_RESPONSE, CONN_AWAIT_SYNACK, CONN_CLOSING,
    CONN_COUNTED, CONN_REPLY, ConnKey, reasons,
};
use router_testkit::{
    model::{self, Entry, Load, Model, Table, Traffic, nat},
    packet::checksums_valid,
};

use super::{
    inputs::{flow_key, pick},
    strategies::*,
    world::*,
};

impl World {
    /// Runs a session. A failure is a failure, even when the session ran
    /// past `MAX_SESSION` (its seeded ages may then have crossed a timeout,
    /// so the kernel's clock decided something): the message says so, and
    /// nothing is rerun until it passes.
    pub(crate) fn run_session(&mut self, s: &Session) -> Result<(), TestCaseError> {
        let start = Instant::now();
        match self.run_once(s) {
            Err(e) if start.elapsed() >= MAX_SESSION => Err(TestCaseError::fail(format!(
                "{e}\n(the session took {:?}, longer than the clock margins allow: a stalled \
                 machine can make the kernel expire what the model keeps)",
                start.elapsed()
            ))),
            r => r,
        }
    }

    /// Every watched backend's counts at the start of session `s`.
    pub(crate) fn start_loads(&self, s: &Session) -> BTreeMap<u32, Load> {
        let mut out: BTreeMap<u32, Load> = self
            .backend_ids
            .iter()
            .map(|id| {
                let n = s.loads.pattern.map_or(0, |p| {
                    router_common::flow_hash::second_choice(p ^ id.wrapping_mul(0x9e37_79b9)) % 4
                });
                (
                    *id,
                    Load {
                        opened: u64::from(n),
                        closed: 0,
                    },
                )
            })
            .collect();
        for (i, seed) in &s.loads.each {
            let l = match *seed {
                LoadSeed::Flows { n, churn } => Load {
                    opened: u64::from(n) + u64::from(churn) * 1000,
                    closed: u64::from(churn) * 1000,
                },
                LoadSeed::Negative { by } => Load {
                    opened: 3,
                    closed: 3 + u64::from(by),
                },
                LoadSeed::Huge { extra } => Load {
                    opened: u64::from(u32::MAX) + u64::from(extra),
                    closed: 0,
                },
            };
            out.insert(pick(&self.backend_ids, *i), l);
        }
        out
    }

    fn run_once(&mut self, s: &Session) -> Result<(), TestCaseError> {
        self.use_weights(s.weights, s.slots.unwrap_or(s.weights));
        self.fx.clear();
        let mut m = Model::new(self.cfg().clone());
        for (id, l) in self.start_loads(s) {
            self.fx.set_load(id, l);
            m.loads.set(id, l);
        }
        let mut loads_before: Vec<Load> =
            self.backend_ids.iter().map(|id| m.loads.get(*id)).collect();
        let now = coarse_now_ns();
        let seeded = self.seed_entries(s);
        for (t, key, e) in &seeded {
            // A key lives in one place per table; seeds overwrite.
            m.tables.map_mut(*t).insert(*key, *e);
            self.fx
                .table(*t)
                .insert(key, e.to_kernel(key, now), 0)
                .expect("seeding an entry");
        }
        for (key, e) in self.seed_dsr(s) {
            m.dsr.insert(key, e);
            self.fx
                .dsr_flows()
                .insert(key, e.to_kernel(now), 0)
                .expect("seeding a DSR entry");
        }
        // Traffic and latency counters are read per CPU, a system call per
        // backend: only the large service's when the session can reach it
        // (a flow to it, or an entry seeded with one of its backends). A
        // backend's counters move only for an entry that names it.
        let big = &self.ids[BIG].1;
        let reaches_big = s.flows.iter().any(|f| flow_key(self, f).1 == Some(BIG))
            || seeded.iter().any(|(_, _, e)| big.contains(&e.backend_id));
        let watched: Vec<u32> = self
            .backend_ids
            .iter()
            .copied()
            .filter(|id| reaches_big || !big.contains(id))
            .collect();
        let before = self.counters_before(&watched);
        let mut want_traffic: Vec<Traffic> = Vec::new();
        let mut want_latency: Vec<(u32, u32)> = Vec::new();
        let mut trace = String::new();
        let mut reasons_before = self.fx.reasons();

        // Scripts run as their packets, one step each.
        let steps: Vec<Step> = s
            .steps
            .iter()
            .flat_map(|step| match step {
                Step::Script { flow, script } => script
                    .packets(*flow)
                    .into_iter()
                    .map(Step::Packet)
                    .collect(),
                other => vec![other.clone()],
            })
            .collect();
        for (i, step) in steps.iter().enumerate() {
            let p = match step {
                Step::Evict { flow, reply, table } => {
                    let (key, _) = flow_key(self, &pick(&s.flows, *flow));
                    // A DSR flow has one entry, wherever the step aims.
                    if !*reply && m.dsr.remove(&key).is_some() {
                        self.fx.dsr_flows().remove(&key).expect("evicting");
                        trace.push_str(&format!("#{i} evict DSR_FLOWS {}\n", show_key(&key)));
                        continue;
                    }
                    let k = if *reply {
                        match m.tables.get(*table, &key).filter(|e| !e.is_reply()) {
                            Some(e) => model::tables::reply_key_of(e.to, key.proto),
                            None => continue,
                        }
                    } else {
                        key
                    };
                    if m.tables.map_mut(*table).remove(&k).is_some() {
                        self.fx.table(*table).remove(&k).expect("evicting");
                        trace.push_str(&format!("#{i} evict {table:?} {}\n", show_key(&k)));
                    }
                    continue;
                }
                Step::Packet(p) => p,
                Step::Script { .. } => unreachable!("scripts were expanded"),
            };
            let frame = self.frame(&m, s, p);
            let ingress = if p.other_arm {
                self.fx.arm1
            } else {
                self.fx.arm0
            };
            let want = m.step(&frame, ingress);
            let (verdict, out) = self.fx.run(&frame, ingress);
            self.packets += 1;
            // The in-flight counts, kernel against model: what moved (for
            // the trace) and what differs.
            let mut moved = Vec::new();
            let mut load_diff = Vec::new();
            for (id, before) in self.backend_ids.iter().zip(loads_before.iter_mut()) {
                let (got, want) = (self.fx.load(*id), m.loads.get(*id));
                if got != *before {
                    moved.push(format!(
                        " backend {id} opened {}{:+} closed {}{:+}",
                        before.opened,
                        got.opened.wrapping_sub(before.opened) as i64,
                        before.closed,
                        got.closed.wrapping_sub(before.closed) as i64
                    ));
                    *before = got;
                }
                if got != want {
                    load_diff.push(format!(
                        "backend {id}: kernel opened {} closed {}, model opened {} closed {}",
                        got.opened, got.closed, want.opened, want.closed
                    ));
                }
            }
            let reasons_after = self.fx.reasons();
            let got_reasons: Vec<u32> = (0..reasons::COUNT)
                .flat_map(|r| {
                    let d = reasons_after[r as usize] - reasons_before[r as usize];
                    std::iter::repeat_n(r, d as usize)
                })
                .collect();
            reasons_before = reasons_after;
            trace.push_str(&format!(
                "#{i} {p:?}\n   in  {}\n   out {}\n   verdict {verdict} reasons {:?}; model: {}\n",
                hex(&frame),
                hex(&out),
                names(&got_reasons),
                m.trail.join(", ")
            ));
            if !moved.is_empty() {
                trace.push_str(&format!("   load (kernel):{}\n", moved.join(";")));
            }
            let ctx = || format!("session {:?}\ntrace:\n{trace}", s);
            prop_assert_eq!(verdict, want.verdict, "packet #{}: verdict\n{}", i, ctx());
            prop_assert_eq!(
                hex(&out),
                hex(&want.frame),
                "packet #{}: output bytes\n{}",
                i,
                ctx()
            );
            let mut want_reasons = want.reasons.clone();
            want_reasons.sort_unstable();
            prop_assert_eq!(
                names(&got_reasons),
                names(&want_reasons),
                "packet #{}: reason counters\n{}",
                i,
                ctx()
            );
            prop_assert!(
                load_diff.is_empty(),
                "packet #{}: in-flight counts (BACKEND_LOAD) differ:\n  {}\n{}",
                i,
                load_diff.join("\n  "),
                ctx()
            );
            let encapsulated = m.trail.iter().any(|t| t.starts_with("dsr:"));
            if encapsulated && want.traffic.is_some() {
                prop_assert!(
                    model::dsr::outer_checksum_right(&out),
                    "packet #{}: outer header checksum wrong\n{}",
                    i,
                    ctx()
                );
            }
            let rewritten = want.traffic.is_some() && !encapsulated;
            if rewritten && input_checksums_right(&frame) {
                prop_assert!(
                    output_checksums_right(&out),
                    "packet #{}: output checksums wrong\n{}",
                    i,
                    ctx()
                );
                if plain_lengths(&out) {
                    prop_assert!(
                        checksums_valid(&out),
                        "packet #{}: output checksums wrong (packet::checksums_valid)\n{}",
                        i,
                        ctx()
                    );
                }
            }
            for r in names(&got_reasons)
                .into_iter()
                .chain(m.trail.iter().copied())
            {
                *self.tally.entry(r).or_default() += 1;
            }
            want_traffic.extend(want.traffic);
            want_latency.extend(want.latency.iter().copied());
        }

        let ctx = || format!("session {:?}\ntrace:\n{trace}", s);
        for t in [Table::Conns, Table::HalfOpen] {
            let mut got = BTreeMap::new();
            for (k, e) in self.fx.entries(t) {
                let e = Entry::from_kernel(&k, &e).map_err(|err| {
                    TestCaseError::fail(format!("{t:?} at {}: {err}\n{}", show_key(&k), ctx()))
                })?;
                got.insert(show_key(&k), show_entry(&e));
            }
            let want: BTreeMap<String, String> = m
                .tables
                .map(t)
                .iter()
                .map(|(k, e)| (show_key(k), show_entry(e)))
                .collect();
            if got != want {
                return Err(TestCaseError::fail(format!(
                    "table {t:?} at the end differs (kernel vs model):\n{}{}",
                    table_diff(&got, &want),
                    ctx()
                )));
            }
        }

        let mut got = BTreeMap::new();
        for (k, f) in self.fx.dsr_entries() {
            let e = model::dsr::DsrEntry::from_kernel(&f).map_err(|err| {
                TestCaseError::fail(format!("DSR_FLOWS at {}: {err}\n{}", show_key(&k), ctx()))
            })?;
            got.insert(show_key(&k), format!("{e:?}"));
        }
        let want: BTreeMap<String, String> = m
            .dsr
            .iter()
            .map(|(k, e)| {
                (
                    show_key(k),
                    format!("{:?}", model::dsr::DsrEntry { age: 0, ..*e }),
                )
            })
            .collect();
        if got != want {
            return Err(TestCaseError::fail(format!(
                "DSR_FLOWS at the end differs (kernel vs model):\n{}{}",
                table_diff(&got, &want),
                ctx()
            )));
        }

        let after = self.read_counters(&watched);
        for (before, after, by_service) in [
            (&before.services, &after.services, true),
            (&before.backends, &after.backends, false),
        ] {
            let got: BTreeMap<u32, [u64; 4]> = after
                .iter()
                .map(|(id, a)| {
                    let b = before[id];
                    (*id, [a[0] - b[0], a[1] - b[1], a[2] - b[2], a[3] - b[3]])
                })
                .filter(|(_, d)| *d != [0; 4])
                .collect();
            let mut want: BTreeMap<u32, [u64; 4]> = BTreeMap::new();
            for t in &want_traffic {
                let id = if by_service {
                    t.service_id
                } else {
                    t.backend_id
                };
                let watched = if by_service {
                    &self.service_ids
                } else {
                    &watched
                };
                if !watched.contains(&id) {
                    continue;
                }
                let c = want.entry(id).or_default();
                c[0] += 1;
                c[1] += t.bytes;
                c[2] += u64::from(t.new_conn);
                c[3] += u64::from(t.reply);
            }
            prop_assert_eq!(
                got,
                want,
                "{} traffic counters\n{}",
                if by_service { "service" } else { "backend" },
                ctx()
            );
        }
        let got: BTreeMap<(u32, u32), u64> = after
            .latency
            .iter()
            .map(|(k, a)| (*k, a - before.latency[k]))
            .filter(|(_, d)| *d != 0)
            .collect();
        let mut want: BTreeMap<(u32, u32), u64> = BTreeMap::new();
        for k in want_latency {
            if watched.contains(&k.0) {
                *want.entry(k).or_default() += 1;
            }
        }
        prop_assert_eq!(got, want, "latency sample counts\n{}", ctx());
        self.fx.clear();
        self.sessions += 1;
        let mut known = before;
        known.merge(after);
        self.counters = Some(known);
        Ok(())
    }

    /// Traffic and latency counters of the services and of `backends`.
    fn read_counters(&mut self, backends: &[u32]) -> Counters {
        Counters {
            services: self.fx.traffic("SERVICE_STATS", &self.service_ids),
            backends: self.fx.traffic("BACKEND_STATS", backends),
            latency: self.fx.latency_counts(backends),
        }
    }

    /// The counters as a session starts: as the last session that passed
    /// left them (only packets move them), read for backends it did not
    /// read. A failed session leaves nothing to go by.
    fn counters_before(&mut self, backends: &[u32]) -> Counters {
        let Some(mut known) = self.counters.take() else {
            return self.read_counters(backends);
        };
        let missing: Vec<u32> = backends
            .iter()
            .copied()
            .filter(|id| !known.backends.contains_key(id))
            .collect();
        if !missing.is_empty() {
            let read = Counters {
                services: BTreeMap::new(),
                backends: self.fx.traffic("BACKEND_STATS", &missing),
                latency: self.fx.latency_counts(&missing),
            };
            known.merge(read);
        }
        known
    }
}

/// Per-CPU counters summed: service and backend traffic, latency samples
/// per (backend, kind).
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) services: BTreeMap<u32, [u64; 4]>,
    pub(crate) backends: BTreeMap<u32, [u64; 4]>,
    pub(crate) latency: BTreeMap<(u32, u32), u64>,
}

impl Counters {
    fn merge(&mut self, newer: Counters) {
        self.services.extend(newer.services);
        self.backends.extend(newer.backends);
        self.latency.extend(newer.latency);
    }
}

fn show_addr(a: u32, port: u16) -> String {
    format!("{}:{}", ip_of(a), u16::from_be(port))
}

pub(crate) fn show_key(k: &ConnKey) -> String {
    format!(
        "{} > {} proto {}",
        show_addr(k.src_addr, k.src_port),
        show_addr(k.dst_addr, k.dst_port),
        k.proto
    )
}

/// An entry's compared fields (not its age), readably.
pub(crate) fn show_entry(e: &Entry) -> String {
    let flags: Vec<&str> = [
        (CONN_REPLY, "reply"),
        (CONN_CLOSING, "closing"),
        (CONN_AWAIT_SYNACK, "await-synack"),
        (CONN_AWAIT_REQUEST, "await-request"),
        (CONN_AWAIT_RESPONSE, "await-response"),
        (CONN_COUNTED, "counted"),
    ]
    .iter()
    .filter(|(bit, _)| e.flags & bit != 0)
    .map(|(_, name)| *name)
    .collect();
    let unknown = e.flags & !(CONN_REPLY | CONN_CLOSING | CONN_AWAIT_ANY | CONN_COUNTED);
    format!(
        "to {} > {}, service {} backend {}, [{}]{}, hop gen {} if {} {}",
        show_addr(e.to.src_addr, e.to.src_port),
        show_addr(e.to.dst_addr, e.to.dst_port),
        e.service_id,
        e.backend_id,
        flags.join(" "),
        if unknown != 0 {
            format!(" +{unknown:#x}")
        } else {
            String::new()
        },
        e.hop.fib_gen,
        e.hop.ifindex,
        hex(&e.hop.dmac),
    ) + &format!("/{}", hex(&e.hop.smac))
}

/// The keys where two tables differ, one line each.
pub(crate) fn table_diff(
    kernel: &BTreeMap<String, String>,
    model: &BTreeMap<String, String>,
) -> String {
    let keys: BTreeSet<&String> = kernel.keys().chain(model.keys()).collect();
    let mut out = String::new();
    for k in keys {
        match (kernel.get(k), model.get(k)) {
            (Some(a), Some(b)) if a == b => {}
            (Some(a), Some(b)) => {
                out.push_str(&format!("  {k}\n    kernel: {a}\n    model:  {b}\n"))
            }
            (Some(a), None) => out.push_str(&format!("  {k}\n    kernel only: {a}\n")),
            (None, Some(b)) => out.push_str(&format!("  {k}\n    model only: {b}\n")),
            (None, None) => {}
        }
    }
    out
}

/// Whether a frame the model translates came with right checksums. For an
/// ICMP error: the outer and quoted IPv4 headers and the ICMP message, and
/// when the frame holds exactly its datagram, the quoted TCP or UDP
/// checksum too if the quote holds all it covers.
pub(crate) fn input_checksums_right(frame: &[u8]) -> bool {
    match model::parse::ipv4(frame) {
        Ok(ip) => match model::parse::transport(frame, &ip) {
            Ok(l4) => nat::checksums_right(frame, l4.proto),
            Err(model::parse::Refusal::Icmp) => {
                model::icmp::checksums_right(frame)
                    && (!plain_lengths(frame) || checksums_valid(frame))
            }
            Err(_) => false,
        },
        Err(_) => false,
    }
}

/// The same for a translated frame (TCP, UDP, or an ICMP error).
pub(crate) fn output_checksums_right(out: &[u8]) -> bool {
    if out[23] == 1 {
        model::icmp::checksums_right(out)
    } else {
        nat::checksums_right(out, out[23])
    }
}

/// Whether the datagram fills the frame and the UDP length fills the
/// datagram: what `packet::checksums_valid` assumes.
pub(crate) fn plain_lengths(f: &[u8]) -> bool {
    let tot = usize::from(u16::from_be_bytes([f[16], f[17]]));
    tot + 14 == f.len()
        && (f[23] != 17 || usize::from(u16::from_be_bytes([f[38], f[39]])) + 20 == tot)
}

pub(crate) fn hex(b: &[u8]) -> String {
    // Every packet's trace line holds two frames: no allocation per byte.
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(char::from(DIGITS[usize::from(x >> 4)]));
        s.push(char::from(DIGITS[usize::from(x & 0x0f)]));
    }
    s
}

pub(crate) fn names(r: &[u32]) -> Vec<&'static str> {
    r.iter().map(|i| reasons::NAMES[*i as usize]).collect()
}
