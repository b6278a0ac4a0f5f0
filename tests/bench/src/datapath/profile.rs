//! Where a path's time goes inside the `router` program: `perf script`
//! text parsed into call chains, each sample inside the program put in one
//! named part, and the parts as shares of the sampled time.
//!
//! It knows the program only by the `_router` suffix of its JIT symbol, so
//! it holds whatever the program's functions are called; the parts are
//! named after the kernel's map, socket, FIB and clock functions.

use std::collections::BTreeMap;

/// What a sample inside the program was doing, by the kernel function it
/// had called (or the program itself).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Part {
    LruInsert,
    HashLookup,
    LruDelete,
    SocketLookup,
    FibLookup,
    Clock,
    Subprograms,
    Own,
    Other,
}

impl Part {
    pub(super) const ALL: [Part; 9] = [
        Part::LruInsert,
        Part::HashLookup,
        Part::LruDelete,
        Part::SocketLookup,
        Part::FibLookup,
        Part::Clock,
        Part::Subprograms,
        Part::Own,
        Part::Other,
    ];

    pub(super) fn name(self) -> &'static str {
        match self {
            Part::LruInsert => "LRU insert",
            Part::HashLookup => "hash lookup",
            Part::LruDelete => "LRU delete",
            Part::SocketLookup => "socket lookup",
            Part::FibLookup => "FIB lookup",
            Part::Clock => "clock",
            Part::Subprograms => "BPF subprograms",
            Part::Own => "program's own instructions",
            Part::Other => "other",
        }
    }

    pub(super) fn key(self) -> &'static str {
        match self {
            Part::LruInsert => "lru_insert",
            Part::HashLookup => "hash_lookup",
            Part::LruDelete => "lru_delete",
            Part::SocketLookup => "socket_lookup",
            Part::FibLookup => "fib_lookup",
            Part::Clock => "clock",
            Part::Subprograms => "bpf_subprograms",
            Part::Own => "own_instructions",
            Part::Other => "other",
        }
    }

    /// The part a kernel function belongs to, whichever frame below the
    /// program it is; `None` for functions no part names.
    fn of_kernel_function(sym: &str) -> Option<Part> {
        let lru = sym.contains("lru");
        if lru && sym.contains("update_elem") || sym == "prealloc_lru_pop" {
            return Some(Part::LruInsert);
        }
        if sym.starts_with("bpf_lru_pop") {
            return Some(Part::LruInsert);
        }
        if lru && sym.contains("delete_elem")
            || sym == "htab_lru_push_free"
            || sym.starts_with("bpf_lru_push")
        {
            return Some(Part::LruDelete);
        }
        if sym == "lookup_nulls_elem_raw"
            || sym == "lookup_elem_raw"
            || sym.starts_with("__htab_map_lookup")
            || sym.starts_with("htab_") && sym.contains("lookup")
        {
            return Some(Part::HashLookup);
        }
        if sym.starts_with("bpf_xdp_sk") && sym.contains("lookup")
            || sym.starts_with("bpf_sk_lookup")
            || sym.starts_with("bpf_skc_lookup")
            || sym.starts_with("__bpf_sk") && sym.contains("lookup")
            || sym == "bpf_sk_release"
        {
            return Some(Part::SocketLookup);
        }
        if sym.contains("fib_lookup") || sym.starts_with("fib_table_lookup") {
            return Some(Part::FibLookup);
        }
        if sym.contains("ktime") {
            return Some(Part::Clock);
        }
        None
    }
}

/// The JIT symbol of a BPF function: `bpf_prog_<tag>_<name>`.
fn is_bpf_function(sym: &str) -> bool {
    sym.starts_with("bpf_prog_")
}

fn is_router(sym: &str) -> bool {
    is_bpf_function(sym) && sym.ends_with("_router")
}

/// `bpf_prog_<16 hex>_<name>` → `bpf:<name>`: the tag changes with every
/// build of the program, the name does not.
fn stable_name(sym: &str) -> String {
    let Some(rest) = sym.strip_prefix("bpf_prog_") else {
        return sym.to_owned();
    };
    match rest.split_once('_') {
        Some((tag, name)) if tag.chars().all(|c| c.is_ascii_hexdigit()) => format!("bpf:{name}"),
        _ => sym.to_owned(),
    }
}

/// The symbol of one call-chain line, `\t<addr> <sym>+<off> (<dso>)`;
/// `[unknown]` stands without an offset. `None` for a line of another shape.
fn frame_symbol(line: &str) -> Option<&str> {
    let (addr, rest) = line.trim().split_once(' ')?;
    if !addr.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let rest = rest.trim_start();
    // The DSO is the last parenthesised field; a symbol may hold spaces.
    let sym_off = match rest.rfind(" (") {
        Some(i) if rest.ends_with(')') => &rest[..i],
        _ => rest,
    };
    let sym = match sym_off.rsplit_once('+') {
        Some((s, off)) if off.starts_with("0x") => s,
        _ => sym_off,
    };
    Some(sym.trim())
}

/// Each sample's call chain, leaf first. A sample is a header line
/// (comm, tid, time, event, unindented) and its indented frame lines; a
/// blank line or the next header ends it.
pub(super) fn samples(text: &str) -> Vec<Vec<&str>> {
    let mut all = Vec::new();
    let mut cur: Option<Vec<&str>> = None;
    for line in text.lines() {
        if line.trim().is_empty() {
            all.extend(cur.take());
        } else if line.starts_with([' ', '\t']) {
            if let (Some(chain), Some(sym)) = (cur.as_mut(), frame_symbol(line)) {
                chain.push(sym);
            }
        } else {
            all.extend(cur.replace(Vec::new()));
        }
    }
    all.extend(cur);
    all
}

/// The part of one sample and the frame the program had called (itself
/// for its own instructions), or `None` when the sample is not inside the
/// program. The part is decided by the first frame from that callee down
/// to the leaf that a part names, so a helper reached through a wrapper or
/// a BPF subprogram counts as that helper; what no part names counts as the
/// subprogram when the callee is one, else as other.
pub(super) fn classify<'a>(chain: &[&'a str]) -> Option<(Part, &'a str)> {
    let at = chain.iter().position(|s| is_router(s))?;
    if at == 0 {
        return Some((Part::Own, chain[0]));
    }
    let callee = chain[at - 1];
    let part = chain[..at]
        .iter()
        .rev()
        .find_map(|s| Part::of_kernel_function(s))
        .unwrap_or(if is_bpf_function(callee) {
            Part::Subprograms
        } else {
            Part::Other
        });
    Some((part, callee))
}

/// The samples of one path.
#[derive(Debug, Default)]
pub(super) struct Profile {
    /// Every sample perf took while the path was being called.
    pub(super) samples: u64,
    /// Those inside the program.
    pub(super) in_program: u64,
    pub(super) parts: BTreeMap<Part, u64>,
    /// In-program samples by the frame the program had called.
    pub(super) callees: BTreeMap<String, u64>,
    /// Seconds of calls sampled.
    pub(super) secs: f64,
}

impl Profile {
    pub(super) fn from_script(text: &str, secs: f64) -> Self {
        let mut p = Profile {
            secs,
            ..Profile::default()
        };
        for chain in samples(text) {
            p.samples += 1;
            if let Some((part, callee)) = classify(&chain) {
                p.in_program += 1;
                *p.parts.entry(part).or_default() += 1;
                let name = if part == Part::Own {
                    "(own instructions)".to_owned()
                } else {
                    stable_name(callee)
                };
                *p.callees.entry(name).or_default() += 1;
            }
        }
        p
    }

    pub(super) fn count(&self, part: Part) -> u64 {
        self.parts.get(&part).copied().unwrap_or(0)
    }

    /// `part`'s share of the in-program samples, 0 with none.
    pub(super) fn share(&self, part: Part) -> f64 {
        if self.in_program == 0 {
            return 0.0;
        }
        self.count(part) as f64 / self.in_program as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `perf script` of this suite's profiling pass (kernel 6.18, perf 6.1,
    /// `ROUTER_BENCH_KEEP_PERF_SCRIPT`), trimmed to at most two samples per
    /// (function the program called, leaf) pair of the SYN, first-ACK and
    /// established paths, two of them outside the program.
    const FIXTURE: &str = include_str!("testdata/perf-script.txt");
    const FIXTURE_SAMPLES: u64 = 95;
    const FIXTURE_IN_PROGRAM: u64 = 93;
    /// Counted by hand from the fixture's call chains.
    const FIXTURE_PARTS: [(Part, u64); 9] = [
        (Part::LruInsert, 14),
        (Part::HashLookup, 9),
        (Part::LruDelete, 9),
        (Part::SocketLookup, 16),
        (Part::FibLookup, 22),
        (Part::Clock, 14),
        (Part::Subprograms, 4),
        (Part::Own, 2),
        (Part::Other, 3),
    ];

    #[test]
    fn parses_frame_lines() {
        assert_eq!(
            frame_symbol("\tffffffff8123 htab_lru_map_update_elem+0x1a ([kernel.kallsyms])"),
            Some("htab_lru_map_update_elem")
        );
        assert_eq!(
            frame_symbol("\t    7f00 [unknown] ([unknown])"),
            Some("[unknown]")
        );
        assert_eq!(
            frame_symbol("\t  55d0 std::io::Write::write_all+0x10 (/x/bench)"),
            Some("std::io::Write::write_all")
        );
        assert_eq!(
            frame_symbol("\t  55d0 <a as b>::c+0x10 (/x/bench)"),
            Some("<a as b>::c")
        );
        assert_eq!(frame_symbol("bench 1 [001] 1.0: 50000 cpu-clock:"), None);
    }

    #[test]
    fn splits_samples_on_headers_and_blank_lines() {
        let text = "b 1 1.0: 1 cpu-clock:\n\t1 f+0x1 (k)\n\t2 g+0x2 (k)\n\n\
                    b 1 1.1: 1 cpu-clock:\n\t3 h+0x3 (k)\n\
                    b 1 1.2: 1 cpu-clock:\n";
        assert_eq!(samples(text), vec![vec!["f", "g"], vec!["h"], vec![]]);
    }

    #[test]
    fn classifies_by_the_function_the_program_called() {
        let r = "bpf_prog_0123456789abcdef_router";
        let c = |chain: &[&'static str]| classify(chain).map(|(p, _)| p);
        assert_eq!(c(&[r, "bpf_test_run"]), Some(Part::Own));
        assert_eq!(
            c(&["bpf_lru_pop_free", "htab_lru_map_update_elem", r]),
            Some(Part::LruInsert)
        );
        assert_eq!(c(&["lookup_nulls_elem_raw", r]), Some(Part::HashLookup));
        assert_eq!(c(&["htab_lru_map_delete_elem", r]), Some(Part::LruDelete));
        assert_eq!(
            c(&["__inet_lookup_established", "bpf_xdp_skc_lookup_tcp", r]),
            Some(Part::SocketLookup)
        );
        assert_eq!(c(&["bpf_sk_release", r]), Some(Part::SocketLookup));
        assert_eq!(
            c(&["fib_table_lookup", "bpf_xdp_fib_lookup", r]),
            Some(Part::FibLookup)
        );
        assert_eq!(c(&["read_tsc", "bpf_ktime_get_ns", r]), Some(Part::Clock));
        // Through a subprogram: its own instructions, or the helper it called.
        let sub = "bpf_prog_fedcba9876543210_scan_member";
        assert_eq!(c(&[sub, r]), Some(Part::Subprograms));
        assert_eq!(
            c(&["lookup_nulls_elem_raw", sub, r]),
            Some(Part::HashLookup)
        );
        assert_eq!(c(&["memcpy", r]), Some(Part::Other));
        // Not inside the program.
        assert_eq!(c(&["bpf_test_run", "bpf_prog_test_run_xdp"]), None);
        assert_eq!(c(&["bpf_prog_0123456789abcdef_xdp_pass"]), None);
        assert_eq!(c(&[]), None);
    }

    #[test]
    fn names_bpf_functions_without_their_tag() {
        assert_eq!(
            stable_name("bpf_prog_fedcba9876543210_scan_member"),
            "bpf:scan_member"
        );
        assert_eq!(
            stable_name("bpf_prog_fedcba9876543210_memset"),
            "bpf:memset"
        );
        assert_eq!(
            stable_name("htab_lru_map_update_elem"),
            "htab_lru_map_update_elem"
        );
    }

    #[test]
    fn groups_a_captured_profile() {
        let p = Profile::from_script(FIXTURE, 1.0);
        assert_eq!(p.samples, FIXTURE_SAMPLES);
        assert_eq!(p.in_program, FIXTURE_IN_PROGRAM);
        let total: u64 = Part::ALL.iter().map(|x| p.count(*x)).sum();
        assert_eq!(total, p.in_program);
        let shares: f64 = Part::ALL.iter().map(|x| p.share(*x)).sum();
        assert!((shares - 1.0).abs() < 1e-9);
        for (part, n) in FIXTURE_PARTS {
            assert_eq!(p.count(part), n, "{}", part.name());
        }
    }
}
