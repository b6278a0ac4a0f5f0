//! IPv6 services: DSR only, one address family per service, no pools,
//! segments or discovery; SNAT stays IPv4.

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

#[test]
fn an_ipv6_nat_service_is_refused_at_forwarding() {
    let text = BASE.replace("198.18.100.1:8000", "[2001:db8::1]:8000");
    let err = parse(&text).unwrap_err();
    assert_eq!(err.key(), Some("service[0].forwarding"));
    assert!(
        err.to_string().ends_with(
            "service[0].forwarding: an IPv6 service forwards by DSR (forwarding = \"dsr\"); \
             NAT over IPv6 is not built"
        ),
        "{err}"
    );
    // Written out, it is found at its line.
    assert_err(
        &text.replace("snat = ", "forwarding = \"nat\"\nsnat = "),
        7,
        "service[0].forwarding",
        "NAT over IPv6 is not built",
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

#[test]
fn ipv6_snat_addresses_stay_refused() {
    assert_err(
        &replace_line(7, r#"snat = "2001:db8::1""#),
        7,
        "service[0].snat",
        "is an IPv6 address: SNAT addresses",
    );
}
