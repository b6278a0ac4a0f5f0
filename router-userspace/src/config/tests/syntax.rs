//! TOML syntax and serde errors: unknown keys, wrong types, missing keys.

use super::*;

#[test]
fn syntax_error_has_line() {
    let err = parse(&replace_line(6, r#"vip = "198.18.100.1:8000"#)).unwrap_err();
    assert!(matches!(err, ConfigError::Syntax { .. }), "{err}");
    assert_eq!(err.line(), Some(6), "{err}");
    assert!(!err.to_string().contains('\n'), "{err}");
}

#[test]
fn unknown_key_top_level() {
    assert_err(
        &format!("bogus = 1\n{BASE}"),
        1,
        "bogus",
        "unknown field `bogus`",
    );
}

#[test]
fn unknown_key_in_daemon() {
    assert_err(
        &insert_after(2, "inteface = \"eth1\""),
        3,
        "daemon.inteface",
        "unknown field",
    );
}

#[test]
fn unknown_key_in_service() {
    assert_err(
        &insert_after(7, "sticky = true"),
        8,
        "service[0].sticky",
        "unknown field",
    );
}

#[test]
fn unknown_key_in_backend() {
    assert_err(
        &insert_after(15, "wieght = 5"),
        16,
        "service[0].backend[1].wieght",
        "unknown field `wieght`",
    );
}

#[test]
fn missing_required_keys() {
    assert_err(
        &replace_line(2, ""),
        1,
        "daemon",
        "missing field `interface`",
    );
    assert_err(
        &replace_line(7, ""),
        4,
        "service[0].snat",
        "needs 1 to 4 addresses, got 0",
    );
    assert_err(
        &replace_line(11, ""),
        9,
        "service[0].backend[0]",
        "missing field `address`",
    );
    let no_daemon: String = BASE.lines().skip(3).map(|l| format!("{l}\n")).collect();
    let err = parse(&no_daemon).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("t.toml:1: missing field `daemon`"),
        "{err}"
    );
}

#[test]
fn wrong_types() {
    assert_err(
        &insert_after(15, "weight = \"heavy\""),
        16,
        "service[0].backend[1].weight",
        "expected u32",
    );
    assert_err(
        &insert_after(15, "weight = -1"),
        16,
        "service[0].backend[1].weight",
        "expected u32",
    );
    assert_err(
        &replace_line(2, "interface = 3"),
        2,
        "daemon.interface",
        "a string or a list",
    );
    assert_err(
        &replace_line(2, "interface = [\"eth0\", 3]"),
        2,
        "daemon.interface[1]",
        "expected a string",
    );
}

#[test]
fn unknown_enum_values() {
    assert_err(
        &insert_after(2, "xdp_mode = \"hw\""),
        3,
        "daemon.xdp_mode",
        "unknown variant `hw`",
    );
    assert_err(
        &insert_after(7, "protocol = \"sctp\""),
        8,
        "service[0].protocol",
        "unknown variant `sctp`",
    );
    assert_err(
        &insert_after(7, "forwarding = \"tunnel\""),
        8,
        "service[0].forwarding",
        "unknown variant `tunnel`",
    );
    assert_err(
        &insert_after(7, "selection = \"random\""),
        8,
        "service[0].selection",
        "unknown variant `random`, expected `maglev` or `least_loaded`",
    );
}

#[test]
fn selection_defaults_by_how_weights_are_decided() {
    let cfg = parse(BASE).unwrap();
    assert_eq!(
        cfg.services[0].selection,
        Selection::Maglev,
        "static weights"
    );
    let telemetry = insert_after(13, "telemetry = { source = \"nvml\", device = 0 }");
    let cfg = parse(&telemetry).unwrap();
    assert_eq!(
        cfg.services[0].selection,
        Selection::LeastLoaded,
        "any telemetry-driven backend"
    );
    // Static weights may still be placed by load: sed on the static weights.
    let cfg = parse(&insert_after(7, "selection = \"least_loaded\"")).unwrap();
    assert_eq!(cfg.services[0].selection, Selection::LeastLoaded);
    assert_eq!(cfg.services[0].backends[0].pinned(), Some(100));
    let text = insert_after(7, "selection = \"maglev\"");
    let text = text.replacen(
        "address = \"198.18.0.12:8000\"",
        "address = \"198.18.0.12:8000\"\ntelemetry = { source = \"nvml\", device = 0 }",
        1,
    );
    assert_eq!(
        parse(&text).unwrap().services[0].selection,
        Selection::Maglev
    );
}

#[test]
fn max_in_flight_must_leave_room() {
    let cfg = parse(&with_backend0("max_in_flight = 8")).unwrap();
    assert_eq!(cfg.services[0].backends[0].max_in_flight, Some(8));
    assert_err(
        &with_backend0("max_in_flight = 0"),
        12,
        "service[0].backend[0].max_in_flight",
        "no room ever",
    );
    assert_err(
        &with_backend0("max_in_flight = -3"),
        12,
        "service[0].backend[0].max_in_flight",
        "invalid value",
    );
}
