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

/// BASE as an IPv6 DSR service (its VIP on line 6).
fn v6_services() -> String {
    BASE.replace("198.18.100.1:8000", "[2001:db8::1]:8000")
        .replace(
            "snat = \"198.18.0.1\"",
            "forwarding = \"dsr\"\nencap = \"ipip\"",
        )
        .replace("198.18.0.11:8000", "[2001:db8::11]:8000")
        .replace("198.18.0.12:8000", "[2001:db8::12]:8000")
}

#[test]
fn an_ipv6_vip_needs_an_ipv6_next_hop() {
    let with = format!("{}\n{BGP}\nnext_hop6 = \"2001:db8::2\"\n", v6_services());
    let b = parse(&with).unwrap().bgp.unwrap();
    assert_eq!(b.next_hop6, Some("2001:db8::2".parse().unwrap()));
    // Without IPv6 services it is optional, and absent by default.
    assert_eq!(parse(&with_bgp(BGP)).unwrap().bgp.unwrap().next_hop6, None);

    let without = format!("{}\n{BGP}\n", v6_services());
    let err = parse(&without).unwrap_err();
    assert_eq!(err.key(), Some("bgp.next_hop6"));
    assert!(
        err.to_string().contains(
            "bgp.next_hop6: service \"llama\" listens on IPv6 ([2001:db8::1]:8000): its /128 \
             path needs an IPv6 next hop"
        ),
        "{err}"
    );
    assert!(!err.to_string().contains('\n'), "one line: {err}");
    let line = BASE.lines().count() + 3 + 4;
    for (bad, fragment) in [
        ("198.18.0.1", "is not an IPv6 address"),
        ("fe80::1", "cannot be a next hop"),
        ("::", "cannot be a next hop"),
    ] {
        assert_err(
            &format!("{}\n{BGP}\nnext_hop6 = \"{bad}\"\n", v6_services()),
            line,
            "bgp.next_hop6",
            fragment,
        );
    }
}
