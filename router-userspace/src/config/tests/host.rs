//! Checks against the host the daemon runs on, and located errors for
//! checks made after parsing.

use super::*;

fn host(name: &str) -> Option<Vec<IpAddr>> {
    let addrs: Vec<IpAddr> = match name {
        "eth0" => vec![
            Ipv4Addr::new(198, 18, 0, 1).into(),
            Ipv4Addr::new(198, 18, 0, 2).into(),
            "2001:db8::a".parse().unwrap(),
        ],
        "eth1" => vec![Ipv4Addr::new(10, 0, 0, 1).into()],
        _ => return None,
    };
    Some(addrs)
}

#[test]
fn check_host_ok() {
    parse(BASE).unwrap().check_host(&host).unwrap();
    let two_armed = replace_line(2, r#"interface = ["eth1", "eth0"]"#);
    parse(&two_armed).unwrap().check_host(&host).unwrap();
}

#[test]
fn check_host_missing_interface() {
    let err = parse(&replace_line(2, r#"interface = "eth7""#))
        .unwrap()
        .check_host(&host)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"t.toml:2: daemon.interface: interface "eth7" does not exist on this host"#
    );
    let err = parse(&replace_line(
        2,
        "interface = [\n  \"eth0\",\n  \"eth7\",\n]",
    ))
    .unwrap()
    .check_host(&host)
    .unwrap_err();
    assert_eq!(err.line(), Some(4), "{err}");
    assert_eq!(err.key(), Some("daemon.interface[1]"));
}

#[test]
fn check_host_snat_not_on_interface() {
    let err = parse(&replace_line(7, r#"snat = "198.18.0.9""#))
        .unwrap()
        .check_host(&host)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "t.toml:7: service[0].snat: SNAT address 198.18.0.9 is not configured on eth0"
    );
    let err = parse(&replace_line(7, r#"snat = ["198.18.0.1", "10.0.0.1"]"#))
        .unwrap()
        .check_host(&host)
        .unwrap_err();
    assert_eq!(err.key(), Some("service[0].snat[1]"));
    assert_eq!(err.line(), Some(7));
}

#[test]
fn error_at_for_later_checks() {
    let cfg = parse(BASE).unwrap();
    // Defaulted key: reported at the enclosing table.
    let err = cfg.error_at("daemon.snat_port_range", "overlaps the ephemeral range");
    assert_eq!(
        err.to_string(),
        "t.toml:1: daemon.snat_port_range: overlaps the ephemeral range"
    );
    assert_eq!(
        cfg.error_at("service[0].backend[1].address", "x").line(),
        Some(15)
    );
    assert_eq!(cfg.error_at("service[0].backend[1]", "x").line(), Some(13));
}

#[test]
fn key_path_round_trip() {
    for s in [
        "daemon",
        "daemon.interface[1]",
        "service[0].backend[12].address",
        "a[1][2].b",
    ] {
        assert_eq!(KeyPath::parse(s).to_string(), s);
    }
}
