//! `[bgp]`.

use std::time::Duration;

use super::*;

const BGP: &str = "[bgp]\nlocal_as = 65001\nrouter_id = \"198.18.0.1\"\n\
                   peers = [{ address = \"198.18.0.254\", as = 65000 }]";

fn with_bgp(text: &str) -> String {
    format!("{BASE}\n{text}\n")
}

/// Line of `[bgp]` in `with_bgp`'s text, 1-based.
fn bgp_line() -> usize {
    BASE.lines().count() + 2
}

#[test]
fn a_bgp_section_parses_with_its_defaults() {
    let cfg = parse(&with_bgp(BGP)).unwrap();
    let b = cfg.bgp.expect("[bgp]");
    assert_eq!(b.local_as, 65001);
    assert_eq!(b.router_id.to_string(), "198.18.0.1");
    assert_eq!(b.peers.len(), 1);
    assert_eq!(b.peers[0].asn, 65000);
    assert_eq!(b.hold_time, Duration::from_secs(9));
    assert_eq!(b.drain, Duration::from_secs(5));
    assert!(parse(BASE).unwrap().bgp.is_none());
}

#[test]
fn bgp_bad_input_names_the_key() {
    let no_peers = with_bgp("[bgp]\nlocal_as = 65001\nrouter_id = \"198.18.0.1\"\npeers = []");
    assert_err(
        &no_peers,
        bgp_line() + 3,
        "bgp.peers",
        "needs at least one peer",
    );
    assert_err(
        &with_bgp(&BGP.replace("local_as = 65001", "local_as = 0")),
        bgp_line() + 1,
        "bgp.local_as",
        "above 0",
    );
    assert_err(
        &with_bgp(&BGP.replace("198.18.0.1", "not-an-address")),
        bgp_line() + 2,
        "bgp.router_id",
        "not-an-address",
    );
    assert_err(
        &with_bgp(&format!("{BGP}\nhold_time = \"2s\"")),
        bgp_line() + 4,
        "bgp.hold_time",
        "3 s to 65535 s",
    );
    assert_err(
        &with_bgp(&BGP.replace("as = 65000", "as = 0")),
        bgp_line() + 3,
        "bgp.peers[0].as",
        "above 0",
    );
}
