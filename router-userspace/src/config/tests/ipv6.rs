//! IPv6 services: DSR or NAT, one address family per service (VIP,
//! backends and SNAT addresses), placed by Maglev, no pools, segments or
//! discovery.

use super::*;
use crate::datapath::Forwarding;

/// BASE as an IPv6 DSR service: lines 6 (VIP), 7 (forwarding, encap),
/// 12 (gpu-0's address) and 16 (gpu-1's).
fn v6_base() -> String {
    BASE.replace(
        r#"vip = "198.18.100.1:8000""#,
        r#"vip = "[2001:db8::1]:8000""#,
    )
    .replace(
        r#"snat = "198.18.0.1""#,
        "forwarding = \"dsr\"\nencap = \"ipip\"",
    )
    .replace("198.18.0.11:8000", "[2001:db8::11]:8000")
    .replace("198.18.0.12:8000", "[2001:db8::12]:8000")
}

#[test]
fn an_ipv6_dsr_service_parses_with_ipv6_backends() {
    let cfg = parse(&v6_base()).unwrap();
    let svc = &cfg.services[0];
    assert_eq!(svc.vip, "[2001:db8::1]:8000".parse().unwrap());
    assert_eq!(svc.forwarding, Forwarding::Ipip);
    assert_eq!(svc.selection, Selection::Maglev);
    assert_eq!(
        svc.backends[1].address,
        "[2001:db8::12]:8000".parse().unwrap()
    );
    let gue = parse(&v6_base().replace("encap = \"ipip\"", "encap = \"gue\"")).unwrap();
    assert_eq!(gue.services[0].forwarding, Forwarding::Gue { port: 6080 });
    // Beside an IPv4 NAT service.
    let both = format!(
        "{}\n[[service]]\nname = \"v4\"\nvip = \"198.18.100.2:8000\"\nsnat = \"198.18.0.1\"\n\n\
         [[service.backend]]\nname = \"a\"\naddress = \"198.18.0.11:8000\"\n",
        v6_base()
    );
    assert_eq!(parse(&both).unwrap().services.len(), 2);
}

#[test]
fn the_same_address_and_port_in_both_families_are_two_services() {
    let text = format!(
        "{}\n[[service]]\nname = \"v4\"\nvip = \"198.18.100.1:8000\"\nsnat = \"198.18.0.1\"\n\n\
         [[service.backend]]\nname = \"a\"\naddress = \"198.18.0.11:8000\"\n",
        v6_base()
    );
    assert!(parse(&text).is_ok());
    let dup = format!(
        "{}\n[[service]]\nname = \"again\"\nvip = \"[2001:db8::1]:8000\"\nforwarding = \"dsr\"\n\
         encap = \"gue\"\n\n[[service.backend]]\nname = \"a\"\naddress = \"[2001:db8::11]:8000\"\n",
        v6_base()
    );
    assert_err(
        &dup,
        20,
        "service[1].vip",
        "[2001:db8::1]:8000/tcp is already used by service \"llama\"",
    );
}

#[test]
fn a_service_of_mixed_families_is_refused_at_the_backend() {
    let text = v6_base().replace("[2001:db8::12]:8000", "198.18.0.5:80");
    assert_eq!(
        parse(&text).unwrap_err().to_string(),
        "t.toml:16: service[0].backend[1].address: 198.18.0.5:80 is IPv4 but the service's \
         VIP is IPv6; a service's VIP and backends are one family"
    );
    assert_err(
        &replace_line(11, r#"address = "[2001:db8::11]:8000""#),
        11,
        "service[0].backend[0].address",
        "[2001:db8::11]:8000 is IPv6 but the service's VIP is IPv4",
    );
}

/// BASE as an IPv6 NAT service: lines 6 (VIP), 7 (snat), 11 (gpu-0's
/// address) and 15 (gpu-1's).
fn nat6_base() -> String {
    BASE.replace("198.18.100.1:8000", "[2001:db8::1]:8000")
        .replace(r#"snat = "198.18.0.1""#, r#"snat = "2001:db8::a""#)
        .replace("198.18.0.11:8000", "[2001:db8::11]:8000")
        .replace("198.18.0.12:8000", "[2001:db8::12]:8000")
}

#[test]
fn an_ipv6_nat_service_parses_with_ipv6_snat_addresses() {
    let cfg = parse(&nat6_base()).unwrap();
    let svc = &cfg.services[0];
    assert_eq!(svc.forwarding, Forwarding::Nat);
    assert_eq!(svc.snat, ["2001:db8::a".parse::<IpAddr>().unwrap()]);
    assert_eq!(svc.selection, Selection::Maglev);
    // Written out, and with several addresses.
    let text = nat6_base().replace(
        r#"snat = "2001:db8::a""#,
        "forwarding = \"nat\"\nsnat = [\"2001:db8::a\", \"2001:db8:1::b\"]",
    );
    assert_eq!(parse(&text).unwrap().services[0].snat.len(), 2);
    // A telemetry-driven backend does not make it place by load: nothing
    // counts an IPv6 flow in flight.
    let text = insert_after_in(
        &nat6_base(),
        11,
        "telemetry = { source = \"prometheus\", format = \"vllm\", url = \"http://[2001:db8::11]:8000/metrics\" }",
    );
    assert_eq!(
        parse(&text).unwrap().services[0].selection,
        Selection::Maglev
    );
}

/// `text` with `line` inserted after 1-based line `n`.
fn insert_after_in(text: &str, n: usize, line: &str) -> String {
    let mut lines: Vec<&str> = text.lines().collect();
    lines.insert(n, line);
    lines.join("\n") + "\n"
}

#[test]
fn a_snat_address_of_the_other_family_is_refused() {
    assert_err(
        &nat6_base().replace(r#""2001:db8::a""#, r#""198.18.0.1""#),
        7,
        "service[0].snat",
        "198.18.0.1 is IPv4 but the service's VIP is IPv6; a service's SNAT addresses are of \
         its VIP's family",
    );
    assert_err(
        &nat6_base().replace(r#""2001:db8::a""#, r#"["2001:db8::a", "198.18.0.1"]"#),
        7,
        "service[0].snat[1]",
        "198.18.0.1 is IPv4 but the service's VIP is IPv6",
    );
    assert_err(
        &replace_line(7, r#"snat = "2001:db8::a""#),
        7,
        "service[0].snat",
        "2001:db8::a is IPv6 but the service's VIP is IPv4",
    );
    assert_err(
        &nat6_base().replace(r#""2001:db8::a""#, r#""nope""#),
        7,
        "service[0].snat",
        r#""nope" is not an IPv6 address"#,
    );
}

#[test]
fn ipv6_snat_addresses_backends_cannot_answer_to_are_refused() {
    for (addr, fragment) in [
        ("::", "not a unicast"),
        ("ff02::1", "not a unicast"),
        ("fe80::1", "not a unicast"),
        ("::1", "cannot be a SNAT address"),
        ("::ffff:198.18.0.1", "cannot be a SNAT address"),
        (
            "2001:db8::a%eth0",
            "a scope (%…) has no place in a SNAT address",
        ),
    ] {
        let text = nat6_base().replace("2001:db8::a", addr);
        assert_err(&text, 7, "service[0].snat", fragment);
    }
}

#[test]
fn least_loaded_is_refused_on_an_ipv6_service() {
    for base in [nat6_base(), v6_base()] {
        let text = insert_after_in(&base, 7, r#"selection = "least_loaded""#);
        assert_err(
            &text,
            8,
            "service[0].selection",
            "placement by load (least_loaded) is IPv4 only; an IPv6 service places by Maglev",
        );
    }
    let text = insert_after_in(&nat6_base(), 7, r#"selection = "maglev""#);
    assert!(parse(&text).is_ok());
}

#[test]
fn an_ipv6_snat_address_must_be_on_an_interface() {
    let host = |name: &str| -> Option<Vec<IpAddr>> {
        (name == "eth0").then(|| vec!["2001:db8::a".parse().unwrap()])
    };
    parse(&nat6_base()).unwrap().check_host(&host).unwrap();
    let err = parse(&nat6_base().replace("2001:db8::a", "2001:db8::b"))
        .unwrap()
        .check_host(&host)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "t.toml:7: service[0].snat: SNAT address 2001:db8::b is not configured on eth0"
    );
}

#[test]
fn pools_segments_and_discovery_are_refused_on_an_ipv6_service() {
    let pooled = format!(
        "{}\n[[service.pool]]\nname = \"p\"\nbackends = [\"gpu-0\", \"gpu-1\"]\nshare = 100\n",
        v6_base()
    );
    assert_err(&pooled, 18, "service[0].pool", "pools are IPv4 only");
    let segmented = format!(
        "{}\n[[service.segment]]\ncidr = \"10.0.0.0/8\"\npool = \"p\"\n",
        v6_base()
    );
    assert_err(
        &segmented,
        18,
        "service[0].segment",
        "segments are IPv4 only",
    );
    let discovered: String = v6_base()
        .lines()
        .take(8)
        .map(|l| format!("{l}\n"))
        .collect::<String>()
        + "discovery = { kubernetes = { namespace = \"ml\", service = \"llama\" } }\n";
    assert_err(
        &discovered,
        9,
        "service[0].discovery",
        "discovery lists IPv4 endpoints only",
    );
}

#[test]
fn a_fallback_of_the_other_family_is_refused() {
    // `fallback` on line 9, in the IPv6 service's own table.
    let text = format!(
        "{}\n[[service]]\nname = \"v4\"\nvip = \"198.18.100.2:8000\"\n\
         forwarding = \"dsr\"\nencap = \"ipip\"\n\n[[service.backend]]\nname = \"a\"\n\
         address = \"198.18.0.11:8000\"\n",
        v6_base().replacen("encap = \"ipip\"", "encap = \"ipip\"\nfallback = \"v4\"", 1)
    );
    assert_err(
        &text,
        9,
        "service[0].fallback",
        "must be of this service's address family",
    );
}

#[test]
fn ipv6_addresses_that_cannot_be_served_are_refused() {
    for (vip, fragment) in [
        ("[::]:8000", "not a unicast"),
        ("[ff02::1]:8000", "not a unicast"),
        ("[fe80::1]:8000", "not a unicast"),
        ("[2001:db8::1%2]:8000", "a scope (%…)"),
        ("[2001:db8::1]:0", "port 0"),
    ] {
        let text = v6_base().replace("[2001:db8::1]:8000", vip);
        assert_err(&text, 6, "service[0].vip", fragment);
    }
}
