//! A network namespace's IP and TCP counters, as `nstat -az` names them
//! (`IpForwDatagrams`, `TcpRetransSegs`, `TcpExtTCPSynRetrans`,
//! `TcpExtListenDrops`...), read from `/proc/net/snmp` and
//! `/proc/net/netstat` inside the namespace, and the difference between two
//! readings. This module only reads; it never changes a namespace.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};

use router_testkit::netns;

/// One reading: counter name → value. Signed fields (`TcpMaxConn` is -1)
/// and anything else that is not a `u64` are left out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Netstat(pub BTreeMap<String, u64>);

impl Netstat {
    /// Parses the text of `/proc/net/snmp` and `/proc/net/netstat` (either,
    /// or both one after the other). Each group is a pair of lines, names
    /// then values, both led by the group's tag (`Tcp:`, `TcpExt:`); a
    /// counter's name is the tag without its colon followed by the field,
    /// as nstat writes it. A pair whose tags or lengths disagree is skipped.
    pub fn parse(text: &str) -> Netstat {
        let mut out = BTreeMap::new();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        for pair in lines.windows(2) {
            let (mut names, mut values) = (pair[0].split_whitespace(), pair[1].split_whitespace());
            let (Some(tag), Some(vtag)) = (names.next(), values.next()) else {
                continue;
            };
            let Some(group) = tag.strip_suffix(':') else {
                continue;
            };
            // A names line's second word is a name, a values line's a number.
            let names: Vec<&str> = names.collect();
            let values: Vec<&str> = values.collect();
            if tag != vtag
                || names.len() != values.len()
                || names.first().is_none_or(|n| n.parse::<i64>().is_ok())
                || values.first().is_none_or(|v| v.parse::<i64>().is_err())
            {
                continue;
            }
            for (name, value) in names.iter().zip(values) {
                if let Ok(v) = value.parse::<u64>() {
                    out.insert(format!("{group}{name}"), v);
                }
            }
        }
        Netstat(out)
    }

    /// Reads `ns`'s counters. `/proc/thread-self/net` is the calling
    /// thread's namespace (`/proc/self/net` would be the process's).
    pub fn read(ns: &str) -> Result<Netstat> {
        let text = netns::in_netns(ns, || -> std::io::Result<String> {
            let mut s = std::fs::read_to_string("/proc/thread-self/net/snmp")?;
            s.push_str(&std::fs::read_to_string("/proc/thread-self/net/netstat")?);
            Ok(s)
        })?
        .with_context(|| format!("reading /proc/net/snmp and /proc/net/netstat in {ns}"))?;
        Ok(Netstat::parse(&text))
    }

    /// One counter, 0 when absent.
    pub fn get(&self, name: &str) -> u64 {
        self.0.get(name).copied().unwrap_or(0)
    }

    /// Every counter's growth since `before` (counters that went down, such
    /// as gauges like `TcpCurrEstab`, count as 0).
    pub fn since(&self, before: &Netstat) -> Netstat {
        Netstat(
            self.0
                .iter()
                .map(|(k, v)| (k.clone(), v.saturating_sub(before.get(k))))
                .collect(),
        )
    }

    /// Adds `other`'s counters to these (summing over namespaces).
    pub fn add(&mut self, other: &Netstat) {
        for (k, v) in &other.0 {
            *self.0.entry(k.clone()).or_default() += v;
        }
    }

    /// The non-zero counters that say where a packet or a connection was
    /// lost or delayed (retransmits, drops, overflows, rejects, failures,
    /// resets), with the ones that count what was carried (opens,
    /// forwarded datagrams): what a report needs, not all ~200.
    pub fn telling(&self) -> BTreeMap<String, u64> {
        const WORDS: [&str; 15] = [
            "Retrans", "Drop", "Overflow", "Fail", "Reject", "Err", "PAWS", "Timeout", "ReqQ",
            "Opens", "Forw", "NoRoutes", "Discard", "Rst", "Redirect",
        ];
        self.0
            .iter()
            .filter(|(k, v)| **v > 0 && WORDS.iter().any(|w| k.contains(w)))
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured in a benchmark client namespace on kernel 6.18 (`cat
    /// /proc/net/snmp /proc/net/netstat`), cut to a few groups and fields.
    const SAMPLE: &str = "\
Ip: Forwarding DefaultTTL InReceives InHdrErrors InAddrErrors ForwDatagrams OutNoRoutes
Ip: 1 64 120443 0 0 88210 3
Icmp: InMsgs InErrors
Icmp: 0 0
Tcp: RtoAlgorithm RtoMin RtoMax MaxConn ActiveOpens PassiveOpens AttemptFails EstabResets CurrEstab InSegs OutSegs RetransSegs InErrs OutRsts
Tcp: 1 200 120000 -1 20113 0 2 0 16 100552 100733 41 0 7
Udp: InDatagrams NoPorts
Udp: 0 0
TcpExt: SyncookiesSent SyncookiesRecv ListenOverflows ListenDrops TCPSynRetrans TCPReqQFullDrop PAWSEstab
TcpExt: 0 0 0 0 38 0 1
IpExt: InNoRoutes InTruncatedPkts InOctets
IpExt: 0 0 9922712
";

    #[test]
    fn parses_snmp_and_netstat_as_nstat_names_them() {
        let n = Netstat::parse(SAMPLE);
        assert_eq!(n.get("IpForwDatagrams"), 88210);
        assert_eq!(n.get("TcpActiveOpens"), 20113);
        assert_eq!(n.get("TcpRetransSegs"), 41);
        assert_eq!(n.get("TcpExtTCPSynRetrans"), 38);
        assert_eq!(n.get("TcpExtPAWSEstab"), 1);
        assert_eq!(n.get("IpExtInOctets"), 9_922_712);
        assert_eq!(n.get("TcpCurrEstab"), 16);
        // -1 is no counter; an absent one reads 0.
        assert!(!n.0.contains_key("TcpMaxConn"));
        assert_eq!(n.get("TcpExtNoSuchThing"), 0);
        // Only pairs of lines with one tag: no "Tcp: ... TcpExt:" mixes.
        assert!(n.0.keys().all(|k| !k.contains(':')));
    }

    #[test]
    fn skips_mismatched_or_truncated_pairs() {
        let n = Netstat::parse(
            "Tcp: ActiveOpens RetransSegs\nTcp: 5\nTcpExt: TCPSynRetrans\nTcpExt: 2\nIp: Forwarding\n",
        );
        assert_eq!(n.get("TcpActiveOpens"), 0, "lengths disagree");
        assert_eq!(n.get("TcpExtTCPSynRetrans"), 2);
        assert_eq!(n.0.len(), 1, "{n:?}");
        assert_eq!(Netstat::parse(""), Netstat::default());
    }

    #[test]
    fn deltas_sums_and_the_telling_counters() {
        let before = Netstat::parse(SAMPLE);
        let after = Netstat::parse(
            &SAMPLE
                .replace(
                    "1 200 120000 -1 20113 0 2 0 16",
                    "1 200 120000 -1 30113 0 2 0 3",
                )
                .replace("0 0 0 0 38 0 1", "0 0 0 0 45 0 1"),
        );
        let d = after.since(&before);
        assert_eq!(d.get("TcpActiveOpens"), 10_000);
        assert_eq!(d.get("TcpExtTCPSynRetrans"), 7);
        assert_eq!(
            d.get("TcpCurrEstab"),
            0,
            "a gauge that fell is 0, not a wrap"
        );
        let mut sum = d.clone();
        sum.add(&d);
        assert_eq!(sum.get("TcpExtTCPSynRetrans"), 14);
        let t = d.telling();
        assert_eq!(
            t.into_iter().collect::<Vec<_>>(),
            [
                ("TcpActiveOpens".to_owned(), 10_000),
                ("TcpExtTCPSynRetrans".to_owned(), 7)
            ]
        );
    }
}
