//! Judging one connection: whether its failure is expected (see the
//! parent module), and `outcomes.csv`.

use std::time::Instant;

use super::SYN_RETRY;
use crate::soak::{
    BACKENDS, HARD_FLAP, Timeline,
    traffic::{Outcome, Via},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Class {
    Completed,
    Healthy,
    Injected,
    Unattributed,
}

impl Class {
    pub(super) fn name(self) -> &'static str {
        match self {
            Class::Completed => "completed",
            Class::Healthy => "failed on a healthy backend",
            Class::Injected => "failed on an injected fault",
            Class::Unattributed => "failed, unattributed",
        }
    }
}

pub(super) fn classify(o: &Outcome, tl: &Timeline) -> Class {
    if o.error.is_none() {
        return Class::Completed;
    }
    // When the fault must have struck for it to explain this failure. A
    // connect is decided by its first SYN (or the retransmit a second
    // later): a dead backend's host answers it with a reset at once, so a
    // connect that only timed out seconds later was not refused by a kill
    // that came after its SYNs. An open connection can be cut at any time.
    let until = if o.connect.is_none() {
        o.end.min(o.start + SYN_RETRY)
    } else {
        o.end
    };
    match &o.backend {
        None => Class::Unattributed,
        Some(b)
            if b == BACKENDS[HARD_FLAP].name
                && tl.hard_down.iter().any(|w| w.overlaps(o.start, until)) =>
        {
            Class::Injected
        }
        Some(_) => Class::Healthy,
    }
}

/// `o` reused the 4-tuple of `previous`, which a backend had refused or
/// reset: the datapath may still hold that flow's entries.
pub(super) fn reused_after_reset(
    previous: &Outcome,
    o: &Outcome,
    at: &dyn Fn(Instant) -> f64,
) -> String {
    format!(
        "reused the 4-tuple of a connection that {} refused or reset {:.1} s earlier (t={:.1}s): \
         a SYN on that 4-tuple meets the old flow's connection-table entries",
        previous.backend.as_deref().unwrap_or("a backend"),
        o.start
            .saturating_duration_since(previous.end)
            .as_secs_f64(),
        at(previous.start)
    )
}

/// One line per connection, in start order, for a look at what happened
/// when: start and end (seconds into the run), kind, backend, how it was
/// attributed, connect time, class and error.
pub(crate) fn outcomes_csv(t0: Instant, outcomes: &[Outcome], tl: &Timeline) -> String {
    let at = |t: Instant| t.saturating_duration_since(t0).as_secs_f64();
    let mut sorted: Vec<&Outcome> = outcomes.iter().collect();
    sorted.sort_by_key(|o| o.start);
    let mut s = String::from("start_s,end_s,kind,port,backend,via,connect_ms,class,error\n");
    for o in sorted {
        let via = match &o.via {
            Via::Answer => "answer".to_owned(),
            Via::ConnTable(reply) => format!("conn_table: {reply}"),
            Via::Nothing => "nothing".to_owned(),
            Via::LookupFailed(_) => "lookup_failed".to_owned(),
        };
        s.push_str(&format!(
            "{:.3},{:.3},{},{},{},\"{}\",{},{},\"{}\"\n",
            at(o.start),
            at(o.end),
            o.kind.name(),
            o.port.map_or(String::new(), |p| p.to_string()),
            o.backend.as_deref().unwrap_or(""),
            via.replace('"', "'"),
            o.connect.map_or(String::new(), |c| format!(
                "{:.1}",
                c.as_secs_f64() * 1000.0
            )),
            classify(o, tl).name(),
            o.error.as_deref().unwrap_or("").replace('"', "'")
        ));
    }
    s
}
