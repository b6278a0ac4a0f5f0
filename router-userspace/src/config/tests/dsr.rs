//! `forwarding = "dsr"`, `encap` and `gue_port`.

use super::*;
use crate::datapath::Forwarding;

const DSR_IPIP: &str = "forwarding = \"dsr\"\nencap = \"ipip\"";

#[test]
fn dsr_services_parse_with_their_encapsulation_and_place_by_maglev() {
    let cfg = parse(&replace_line(7, DSR_IPIP)).unwrap();
    let svc = &cfg.services[0];
    assert_eq!(svc.forwarding, Forwarding::Ipip);
    assert!(svc.snat.is_empty());
    assert_eq!(svc.selection, Selection::Maglev);

    let gue = parse(&replace_line(7, "forwarding = \"dsr\"\nencap = \"gue\"")).unwrap();
    assert_eq!(gue.services[0].forwarding, Forwarding::Gue { port: 6080 });
    let port = parse(&replace_line(
        7,
        "forwarding = \"dsr\"\nencap = \"gue\"\ngue_port = 7000",
    ))
    .unwrap();
    assert_eq!(port.services[0].forwarding, Forwarding::Gue { port: 7000 });
    // A NAT service is as before.
    assert_eq!(parse(BASE).unwrap().services[0].forwarding, Forwarding::Nat);
}

#[test]
fn dsr_bad_input_names_the_key() {
    assert_err(
        &replace_line(7, "forwarding = \"dsr\""),
        7,
        "service[0].forwarding",
        "needs encap = \"ipip\" or \"gue\"",
    );
    assert_err(
        &insert_after(7, "encap = \"gue\""),
        8,
        "service[0].encap",
        "encap applies to forwarding = \"dsr\"",
    );
    assert_err(
        &insert_after(7, DSR_IPIP),
        7,
        "service[0].snat",
        "leave snat out",
    );
    assert_err(
        &replace_line(
            7,
            "forwarding = \"dsr\"\nencap = \"ipip\"\nselection = \"least_loaded\"",
        ),
        9,
        "service[0].selection",
        "use maglev",
    );
    assert_err(
        &replace_line(7, "forwarding = \"dsr\"\nencap = \"ipip\"\ngue_port = 7000"),
        9,
        "service[0].gue_port",
        "applies to encap = \"gue\"",
    );
    assert_err(
        &replace_line(7, "forwarding = \"dsr\"\nencap = \"gue\"\ngue_port = 0"),
        9,
        "service[0].gue_port",
        "must be 1 to 65535",
    );
    assert_err(
        &replace_line(7, "encap = \"tunnel\""),
        7,
        "service[0].encap",
        "unknown variant `tunnel`",
    );
}

#[test]
fn a_nat_service_without_snat_is_refused() {
    let err = parse(&replace_line(7, "")).unwrap_err().to_string();
    assert!(
        err.contains("service[0].snat") && err.contains("needs 1 to 4 addresses, got 0"),
        "{err}"
    );
}
