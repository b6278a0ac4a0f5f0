//! The table fingerprint: a hash of everything that decides which backend
//! a new Maglev flow gets on this node, i.e. the flow hash's key and every
//! service's live tables, share buckets and segments, with backends named
//! by address (the ids are this node's own). Ingress nodes behind ECMP
//! must place a flow alike wherever it lands; equal fingerprints say they
//! do. Least-loaded picks depend on each node's own in-flight counts and
//! are not covered, beyond the tables they fall back on.

use std::{
    hash::Hasher,
    net::{IpAddr, SocketAddr},
};

use fnv::FnvHasher;
use router_common::MAX_BACKENDS;

use super::{Datapath, state::ServiceState};

/// Marks a slot whose id names no backend of the service (an empty table).
const NO_BACKEND: u8 = 0;
const BACKEND: u8 = 1;

/// An address's bytes: 4 for IPv4 (as before IPv6 services), 16 for IPv6.
fn write_ip(h: &mut FnvHasher, ip: IpAddr) {
    match ip {
        IpAddr::V4(a) => h.write(&a.octets()),
        IpAddr::V6(a) => h.write(&a.octets()),
    }
}

fn write_table(h: &mut FnvHasher, table: &[u32], addr_of: &[Option<SocketAddr>]) {
    for &id in table {
        match addr_of.get(id as usize).copied().flatten() {
            Some(a) => {
                h.write_u8(BACKEND);
                write_ip(h, a.ip());
                h.write_u16(a.port());
            }
            None => h.write_u8(NO_BACKEND),
        }
    }
}

fn write_service(h: &mut FnvHasher, st: &ServiceState) -> Option<()> {
    // By id, as the tables hold them.
    let mut addr_of = vec![None; MAX_BACKENDS as usize];
    for b in &st.spec.backends {
        if let Some(slot) = st
            .backend_ids
            .get(&b.name)
            .and_then(|id| addr_of.get_mut(*id as usize))
        {
            *slot = Some(b.address);
        }
    }
    write_ip(h, st.spec.vip.ip());
    h.write_u16(st.spec.vip.port());
    h.write_u8(st.spec.proto);
    h.write_u32(st.spec.selection.code());
    write_table(h, st.live_table()?, &addr_of);
    for p in &st.pooled.pools {
        h.write(p.name.as_bytes());
        h.write_u8(0xff);
        write_table(h, p.live_table()?, &addr_of);
    }
    if !st.pooled.pools.is_empty() {
        h.write(st.pooled.live_shares()?);
    }
    for ((net, len), pool) in &st.pooled.segments {
        h.write(&net.octets());
        h.write_u8(*len);
        h.write_u32(*pool);
    }
    Some(())
}

impl Datapath {
    /// 16 hex digits; None until every service's live tables are known
    /// (after the first apply).
    pub fn table_fingerprint(&self) -> Option<String> {
        let mut h = FnvHasher::default();
        h.write_u32(self.flow_hash_key[0]);
        h.write_u32(self.flow_hash_key[1]);
        h.write_u32(self.opts.table_size);
        // By VIP, not by name or id: what a packet is matched on.
        let mut services: Vec<&ServiceState> = self.services.values().collect();
        services.sort_by_key(|s| (s.spec.vip.ip(), s.spec.vip.port(), s.spec.proto));
        for st in services {
            write_service(&mut h, st)?;
        }
        Some(format!("{:016x}", h.finish()))
    }
}
