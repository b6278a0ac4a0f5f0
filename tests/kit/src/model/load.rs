//! Placement: each backend's in-flight count and the least-loaded pick
//! that reads it.
//!
//! Counting. `BACKEND_LOAD` holds, per backend id below `MAX_BACKENDS`,
//! how many flows were opened and how many closed; in flight is the
//! difference, and a difference that reads negative is 0. A flow is
//! counted when it is created (one more `opened`, and `CONN_COUNTED` on
//! its forward entry) unless the packet that opened it carries RST: that
//! flow is over as it starts. It is uncounted once (one more `closed`, the
//! bit cleared) when it ends, and only the forward entry's bit counts:
//!
//! - a RST in either direction, on the entry it rides;
//! - a FIN that makes its entry closing when the flow's other direction is
//!   already closing (for a forward entry, the entry at its reply key, if
//!   it is the flow's own; for a reply entry, the forward entry at its
//!   client's key, if that entry still translates to this reply key);
//! - a SYN that starts a new connection on a live entry's key.
//!
//! A packet never uncounts an expired entry, whichever direction the end
//! comes from: the daemon's table scan counts every expired entry as gone
//! and corrects the count itself, so an end counted here as well would be
//! counted twice. Nor does a FIN that finds its entry closing already.
//!
//! Picking. A least-loaded service places a fresh flow (a TCP SYN, any
//! new UDP flow) on the best of its backends: a weight of 0 is never better
//! than anything and anything with weight is better than it; then a
//! backend with room (fewer in flight than its `max_in_flight`, or no
//! limit: 0) is better than one without; then the smaller
//! `(in_flight + 1) / weight` as a fixed-point quotient,
//! `floor((in_flight + 1) · 2^32 / weight)`, with counts above 2^31 − 2
//! taken as that.
//! With a scan list, every member is compared, weighed and limited by its
//! list entry, in list order from the member at `hash % n` round to the
//! one before it; weight-0 members are passed over and the first of
//! equals wins. Without one, two candidates come from its live Maglev
//! table, at `hash` and at `second_choice(hash)`, each weighed and limited
//! by its `BACKENDS` slot (weight 0 when the slot is not in use); the
//! second wins only when it is another backend and strictly better, and a
//! winner of weight 0 means no backend. Every other new flow goes where
//! the Maglev table sends it.

use router_common::{
    CONN_COUNTED, ConnKey, MAX_BACKENDS, NO_BACKEND,
    flow_hash::second_choice,
    selection::{MAX_SCAN_MEMBERS, SELECT_LEAST_LOADED},
};

use super::{
    Model, Service,
    nat::Tuple,
    tables::{Table, conn_key, owned_by, reply_key_of},
};

/// One backend's counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Load {
    pub opened: u64,
    pub closed: u64,
}

impl Load {
    /// Flows open now: the difference, or 0 where it reads negative (as a
    /// signed 64-bit number).
    pub fn in_flight(&self) -> u64 {
        let n = self.opened.wrapping_sub(self.closed);
        if (n as i64) < 0 { 0 } else { n }
    }
}

/// Every backend's counts, by id; ids past the array count nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loads(Vec<Load>);

impl Default for Loads {
    fn default() -> Self {
        Self(vec![Load::default(); MAX_BACKENDS as usize])
    }
}

impl Loads {
    pub fn get(&self, id: u32) -> Load {
        self.0.get(id as usize).copied().unwrap_or_default()
    }

    pub fn in_flight(&self, id: u32) -> u64 {
        self.get(id).in_flight()
    }

    /// Sets a backend's counts (as a session starts).
    pub fn set(&mut self, id: u32, l: Load) {
        if let Some(c) = self.0.get_mut(id as usize) {
            *c = l;
        }
    }

    fn open(&mut self, id: u32) {
        if let Some(l) = self.0.get_mut(id as usize) {
            l.opened = l.opened.wrapping_add(1);
        }
    }

    fn close(&mut self, id: u32) {
        if let Some(l) = self.0.get_mut(id as usize) {
            l.closed = l.closed.wrapping_add(1);
        }
    }
}

/// A backend as a pick weighs it.
#[derive(Clone, Copy, Debug)]
struct Cand {
    in_flight: u64,
    weight: u32,
    max_in_flight: u32,
}

impl Cand {
    fn room(&self) -> bool {
        self.max_in_flight == 0 || self.in_flight < u64::from(self.max_in_flight)
    }
}

/// What decides between two candidates.
#[derive(Clone, Copy, PartialEq, Eq)]
enum By {
    Weight,
    Room,
    Score,
}

/// Whether `a` is a strictly better pick than `b`, and what said so
/// (module docs: weight 0, then room, then `(n + 1) / w`).
fn better(a: Cand, b: Cand) -> (bool, By) {
    match (a.weight, b.weight) {
        (0, _) => return (false, By::Weight),
        (_, 0) => return (true, By::Weight),
        _ => {}
    }
    if a.room() != b.room() {
        return (a.room(), By::Room);
    }
    let score = |c: Cand| ((c.in_flight.min((1 << 31) - 2) + 1) << 32) / u64::from(c.weight);
    (score(a) < score(b), By::Score)
}

impl Model {
    /// The backend a new flow of `svc` with flow hash `hash` goes to
    /// (`NO_BACKEND`: none). `fresh`: the flow starts with this packet.
    pub(super) fn select(&mut self, svc: &Service, hash: u32, fresh: bool) -> u32 {
        let maglev = |h: u32| svc.table[(h % self.cfg.table_size) as usize];
        if !fresh || svc.selection != SELECT_LEAST_LOADED {
            self.trail.push(if svc.selection == SELECT_LEAST_LOADED {
                "least-loaded service: picked up mid-stream, placed by Maglev"
            } else {
                "placed by Maglev"
            });
            return maglev(hash);
        }
        if !svc.members.is_empty() {
            return self.scan(svc, hash);
        }
        let (a, b) = (maglev(hash), maglev(second_choice(hash)));
        let cand = |id: u32| match self.cfg.backends.get(&id) {
            Some(s) => Cand {
                in_flight: self.loads.in_flight(id),
                weight: s.weight,
                max_in_flight: s.max_in_flight,
            },
            None => Cand {
                in_flight: self.loads.in_flight(id),
                weight: 0,
                max_in_flight: 0,
            },
        };
        let (ca, cb) = (cand(a), cand(b));
        let (wa, wb) = (ca.weight, cb.weight);
        let (b_better, by) = better(cb, ca);
        if by == By::Room && b != a && b != NO_BACKEND {
            self.trail.push(if b_better {
                "two choices: room decides, the second has it"
            } else {
                "two choices: room decides, the first has it"
            });
        }
        let (pick, w) = if a == NO_BACKEND && b == NO_BACKEND {
            self.trail.push("two choices: an empty table, no backend");
            return NO_BACKEND;
        } else if b == NO_BACKEND || b == a {
            self.trail.push(if b == a {
                "two choices: the same backend twice"
            } else {
                "two choices: no second backend"
            });
            (a, wa)
        } else if b_better {
            self.trail.push("two choices: the second is less loaded");
            (b, wb)
        } else {
            self.trail.push("two choices: the first is no worse");
            (a, wa)
        };
        if w == 0 {
            self.trail
                .push("two choices: the pick's slot has weight 0, no backend");
            return NO_BACKEND;
        }
        pick
    }

    /// Every member compared, from the member at `hash % n` round the
    /// list; the first of equals wins.
    fn scan(&mut self, svc: &Service, hash: u32) -> u32 {
        let n = svc.members.len().min(MAX_SCAN_MEMBERS as usize);
        let start = hash as usize % n;
        let mut best: Option<(u32, Cand)> = None;
        let (mut ties, mut by_room) = (false, false);
        for m in svc.members[start..n].iter().chain(&svc.members[..start]) {
            if m.weight == 0 {
                self.trail.push("scan: a member of weight 0 passed over");
                continue;
            }
            let this = Cand {
                in_flight: self.loads.in_flight(m.backend_id),
                weight: m.weight,
                max_in_flight: m.max_in_flight,
            };
            match best {
                Some((_, b)) => {
                    let (wins, by) = better(this, b);
                    by_room |= by == By::Room;
                    if wins {
                        best = Some((m.backend_id, this));
                    } else {
                        ties |= !better(b, this).0;
                    }
                }
                None => best = Some((m.backend_id, this)),
            }
        }
        if by_room {
            self.trail.push("scan: room decided between members");
        }
        self.trail.push(match best {
            None => "scan: no member, no backend",
            Some((_, b)) if !b.room() => "scan: no member has room, the least loaded",
            Some(_) if ties => "scan: equals met, the earlier kept",
            Some(_) => "scan: one least loaded",
        });
        best.map_or(NO_BACKEND, |(id, _)| id)
    }

    /// Counts a new flow on `backend_id` (see the module docs: not when a
    /// RST opened it); returns the flag its forward entry carries.
    pub(super) fn count_new(&mut self, backend_id: u32, rst: bool) -> u32 {
        if rst {
            self.trail.push("a flow opened by a RST is not counted");
            return 0;
        }
        self.trail.push("new flow counted");
        self.loads.open(backend_id);
        CONN_COUNTED
    }

    /// Ends the count of the flow whose forward entry is at `key` in
    /// `table`, if it is a counted forward entry; `why` names the end.
    pub(super) fn release(&mut self, table: Table, key: &ConnKey, why: &'static str) {
        let Some(e) = self.tables.map_mut(table).get_mut(key) else {
            return;
        };
        if e.is_reply() || e.flags & CONN_COUNTED == 0 {
            self.trail.push("end of a flow not counted");
            return;
        }
        e.flags &= !CONN_COUNTED;
        let id = e.backend_id;
        self.loads.close(id);
        self.trail.push(why);
    }

    /// A packet with FIN or RST rode the entry at `at` in `table` and made
    /// it closing (or is a RST): ends the flow if that was its last word.
    pub(super) fn on_close(&mut self, table: Table, at: &ConnKey, rst: bool) {
        let e = self.tables.map(table)[at];
        if !e.is_reply() {
            if rst {
                self.release(table, at, "uncounted: a RST from the client");
                return;
            }
            match self.tables.lookup(&reply_key_of(e.to, at.proto)) {
                None => self.trail.push("FIN from the client, the reply entry gone"),
                Some(r) if !owned_by(r, at) => self
                    .trail
                    .push("FIN from the client, the reply key another's"),
                Some(r) if !r.closing() => self
                    .trail
                    .push("FIN from the client, the backend's side open"),
                Some(_) => self.release(table, at, "uncounted: FIN from both, the client last"),
            }
            return;
        }
        // The count is on the forward entry, at the client's key.
        let fkey = conn_key(
            Tuple {
                src_addr: e.to.dst_addr,
                dst_addr: e.to.src_addr,
                src_port: e.to.dst_port,
                dst_port: e.to.src_port,
            },
            at.proto,
        );
        let ftable = if self.tables.conns.contains_key(&fkey) {
            Table::Conns
        } else if self.tables.half_open.contains_key(&fkey) {
            Table::HalfOpen
        } else {
            self.trail
                .push("end from the backend, the forward entry gone");
            return;
        };
        let f = self.tables.map(ftable)[&fkey];
        // Only this flow's own: the client's key may have opened another
        // flow since, to another backend pair.
        if f.is_reply() || reply_key_of(f.to, at.proto) != *at {
            self.trail
                .push("end from the backend, the client's key another flow's");
            return;
        }
        if !rst && !f.closing() {
            self.trail
                .push("FIN from the backend, the client's side open");
            return;
        }
        if self.cfg.timeouts.expired(ftable, &f, at.proto) {
            self.trail
                .push("end from the backend, the forward entry expired: the daemon's to uncount");
            return;
        }
        self.release(
            ftable,
            &fkey,
            if rst {
                "uncounted: a RST from the backend"
            } else {
                "uncounted: FIN from both, the backend last"
            },
        );
    }
}
