//! Next hops shared by the flows to one backend (`NEXT_HOPS`): a new flow
//! takes its backend's hop without a FIB lookup while the generation holds,
//! looks its own up when it is longer than the shared hop was checked for,
//! and every flow looks its own up while the host routes per flow.

use router_testkit::{
    packet::{Packet, TCP_ACK, TCP_PSH, TCP_SYN, addr},
    xdp_fixture::*,
};

use super::VIP;

const BACKEND: &str = "198.18.0.11";
const MOVED_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0b, 0x99];

/// Gives the backend a new link-layer address behind the program's back:
/// no generation bump, as if the daemon had not seen the change yet. Only
/// a FIB lookup made after this sees the new address.
fn move_backend(f: &Fixture, mac: [u8; 6]) {
    let mac = mac.map(|b| format!("{b:02x}")).join(":");
    f.ns.ip(&format!(
        "neigh replace {BACKEND} lladdr {mac} dev fx0 nud permanent"
    ))
    .unwrap();
}

/// Keeps this test's thread on one CPU: `NEXT_HOPS` is per CPU, and a
/// thread that moved between two SYNs would meet another CPU's (empty)
/// share of it and look its hop up, whatever the test says of sharing.
fn stay_on_one_cpu() {
    // SAFETY: sched_setaffinity(2) on this thread (pid 0) with a cpu_set_t
    // that lives across the call.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let cpu = libc::sched_getcpu().max(0) as usize;
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "pinning the test thread to CPU {cpu}"
        );
    }
}

/// The destination MAC a client's SYN from `port` leaves with.
fn syn_dmac(f: &mut Fixture, port: u16) -> [u8; 6] {
    let syn = Packet::tcp(
        std::net::SocketAddrV4::new("198.18.0.2".parse().unwrap(), port),
        addr(VIP),
        TCP_SYN,
    )
    .with_macs(LB_MAC, CLIENT_MAC);
    let (verdict, out) = f.run(&syn.build());
    assert_eq!(verdict, XDP_TX, "SYN from port {port}");
    out[0..6].try_into().unwrap()
}

#[test]
fn new_flows_share_their_backends_next_hop_until_the_generation_changes() {
    stay_on_one_cpu();
    let mut f = Fixture::new(&[service("llama", VIP, 6, &[1])]);
    assert_eq!(
        syn_dmac(&mut f, 40000),
        backend_mac(0),
        "first flow looks up"
    );
    move_backend(&f, MOVED_MAC);
    assert_eq!(
        syn_dmac(&mut f, 40001),
        backend_mac(0),
        "a second flow takes the first one's hop: no lookup of its own"
    );
    f.dp.bump_fib_generation().unwrap();
    assert_eq!(
        syn_dmac(&mut f, 40002),
        MOVED_MAC,
        "a new generation looks up again"
    );
}

#[test]
fn while_the_host_routes_per_flow_every_new_flow_looks_its_own_hop_up() {
    stay_on_one_cpu();
    let mut f = Fixture::new(&[service("llama", VIP, 6, &[1])]);
    f.dp.set_per_flow_next_hops(true).unwrap();
    assert!(f.dp.per_flow_next_hops());
    assert_eq!(syn_dmac(&mut f, 40000), backend_mac(0));
    move_backend(&f, MOVED_MAC);
    assert_eq!(syn_dmac(&mut f, 40001), MOVED_MAC, "its own lookup");
    move_backend(&f, backend_mac(0));
    assert_eq!(syn_dmac(&mut f, 40002), backend_mac(0), "its own lookup");
    // Sharing again: from the next lookup on.
    f.dp.set_per_flow_next_hops(false).unwrap();
    assert_eq!(syn_dmac(&mut f, 40003), backend_mac(0));
    move_backend(&f, MOVED_MAC);
    assert_eq!(syn_dmac(&mut f, 40004), backend_mac(0), "shared again");
}

#[test]
fn a_first_packet_longer_than_the_shared_hop_was_checked_for_looks_its_own_up() {
    stay_on_one_cpu();
    let mut f = Fixture::new(&[service("llama", VIP, 6, &[1])]);
    // A 40-byte SYN: the route's MTU was checked for 40 bytes only.
    assert_eq!(syn_dmac(&mut f, 40000), backend_mac(0));
    move_backend(&f, MOVED_MAC);
    // A flow picked up mid-stream whose first packet carries data.
    let data = Packet::tcp(addr("198.18.0.2:40001"), addr(VIP), TCP_ACK | TCP_PSH)
        .with_macs(LB_MAC, CLIENT_MAC)
        .with_payload(&[b'x'; 600]);
    let (verdict, out) = f.run(&data.build());
    assert_eq!(verdict, XDP_TX);
    assert_eq!(
        &out[0..6],
        &MOVED_MAC,
        "longer than checked: its own lookup"
    );
    // That lookup now covers 640 bytes for every flow to the backend.
    move_backend(&f, backend_mac(0));
    let (verdict, out) = f.run(
        &Packet::tcp(addr("198.18.0.2:40002"), addr(VIP), TCP_ACK | TCP_PSH)
            .with_macs(LB_MAC, CLIENT_MAC)
            .with_payload(&[b'x'; 500])
            .build(),
    );
    assert_eq!(verdict, XDP_TX);
    assert_eq!(
        &out[0..6],
        &MOVED_MAC,
        "shorter than the last lookup: shared"
    );
}
