//! Values that parse but mean nothing valid: addresses, names, sizes,
//! durations, port ranges, interfaces, paths.

use super::*;

#[test]
fn bad_backend_address() {
    let text = replace_line(15, r#"address = "198.18.0.300:8000""#);
    assert_eq!(
        parse(&text).unwrap_err().to_string(),
        r#"t.toml:15: service[0].backend[1].address: "198.18.0.300:8000" is not an address:port like "198.18.0.1:8000" or "[2001:db8::1]:8000""#
    );
    assert_err(
        &replace_line(11, r#"address = "198.18.0.11""#),
        11,
        "service[0].backend[0].address",
        "is not an address:port",
    );
    assert_err(
        &replace_line(11, r#"address = "198.18.0.11:0""#),
        11,
        "service[0].backend[0].address",
        "port 0",
    );
}

#[test]
fn bad_vip() {
    assert_err(
        &replace_line(6, r#"vip = "llama:8000""#),
        6,
        "service[0].vip",
        "not an address:port",
    );
    assert_err(
        &replace_line(6, r#"vip = "198.18.100.1:0""#),
        6,
        "service[0].vip",
        "port 0",
    );
    assert_err(
        &replace_line(6, r#"vip = "0.0.0.0:80""#),
        6,
        "service[0].vip",
        "not a unicast",
    );
}

#[test]
fn bad_snat() {
    assert_err(
        &replace_line(7, r#"snat = "198.18.0.999""#),
        7,
        "service[0].snat",
        "not an IPv4 address",
    );
    assert_err(
        &replace_line(7, r#"snat = ["198.18.0.1", "nope"]"#),
        7,
        "service[0].snat[1]",
        r#""nope" is not an IPv4 address"#,
    );
    assert_err(
        &replace_line(7, "snat = []"),
        7,
        "service[0].snat",
        "needs 1 to 4 addresses, got 0",
    );
    assert_err(
        &replace_line(
            7,
            r#"snat = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"]"#,
        ),
        7,
        "service[0].snat",
        "got 5",
    );
    assert_err(
        &replace_line(7, r#"snat = ["10.0.0.1", "10.0.0.1"]"#),
        7,
        "service[0].snat[1]",
        "listed twice",
    );
    assert_err(
        &replace_line(7, r#"snat = "224.0.0.1""#),
        7,
        "service[0].snat",
        "not a unicast",
    );
}

const SECOND_SERVICE: &str = r#"
[[service]]
name = "mistral"
vip = "198.18.100.2:8000"
snat = "198.18.0.1"

[[service.backend]]
name = "gpu-9"
address = "198.18.0.19:8000"
"#;

#[test]
fn duplicate_service_name() {
    let text = format!("{BASE}{}", SECOND_SERVICE.replace("mistral", "llama"));
    assert_err(
        &text,
        18,
        "service[1].name",
        "duplicate service name \"llama\" (first used at line 5)",
    );
}

#[test]
fn duplicate_vip() {
    let text = format!(
        "{BASE}{}",
        SECOND_SERVICE.replace("198.18.100.2", "198.18.100.1")
    );
    assert_err(
        &text,
        19,
        "service[1].vip",
        "198.18.100.1:8000/tcp is already used by service \"llama\"",
    );
    // Same address and port on the other protocol is a different service.
    let udp = text.replace(
        "name = \"mistral\"",
        "name = \"mistral\"\nprotocol = \"udp\"",
    );
    assert_eq!(parse(&udp).unwrap().services.len(), 2);
}

#[test]
fn duplicate_backend_name_and_address() {
    assert_err(
        &replace_line(14, r#"name = "gpu-0""#),
        14,
        "service[0].backend[1].name",
        "duplicate backend name \"gpu-0\" in service \"llama\" (first used at line 10)",
    );
    assert_err(
        &replace_line(15, r#"address = "198.18.0.11:8000""#),
        15,
        "service[0].backend[1].address",
        "already backend \"gpu-0\"",
    );
    // Backend names are per service.
    let text = format!("{BASE}{}", SECOND_SERVICE.replace("gpu-9", "gpu-0"));
    assert!(parse(&text).is_ok());
}

#[test]
fn service_without_backends() {
    let text: String = BASE.lines().take(7).map(|l| format!("{l}\n")).collect();
    assert_err(
        &text,
        4,
        "service[0].backend",
        "service \"llama\" needs at least one backend",
    );
}

#[test]
fn empty_names() {
    assert_err(
        &replace_line(5, r#"name = """#),
        5,
        "service[0].name",
        "must not be empty",
    );
    assert_err(
        &replace_line(10, r#"name = """#),
        10,
        "service[0].backend[0].name",
        "must not be empty",
    );
}

#[test]
fn table_size_checks() {
    assert_err(
        &insert_after(2, "table_size = 65536"),
        3,
        "daemon.table_size",
        "not prime (Maglev needs a prime table size; try 65537)",
    );
    assert_err(
        &insert_after(2, "table_size = 1"),
        3,
        "daemon.table_size",
        "not prime",
    );
    assert_err(
        &insert_after(2, "table_size = 199"),
        3,
        "daemon.table_size",
        "199 is below 100 x the 2 backends of service \"llama\"; use a prime >= 200, e.g. 211",
    );
    assert_err(
        &insert_after(2, "table_size = 16777259"),
        3,
        "daemon.table_size",
        "above the maximum",
    );
}

#[test]
fn default_table_size_too_small_points_at_daemon() {
    let mut text = BASE.to_owned();
    for i in 2..656 {
        text += &format!(
            "\n[[service.backend]]\nname = \"b{i}\"\naddress = \"10.{}.{}.1:80\"\n",
            i / 256,
            i % 256
        );
    }
    // The key was never written, so the daemon table's header stands in.
    assert_err(
        &text,
        1,
        "daemon.table_size",
        "65537 is below 100 x the 656 backends",
    );
}

#[test]
fn too_many_backends_overall() {
    let mut text = insert_after(2, "table_size = 204901");
    let svc = |n: usize, base: usize| {
        let mut s = format!(
            "\n[[service]]\nname = \"s{n}\"\nvip = \"198.18.200.{n}:80\"\nsnat = \"198.18.0.1\"\n"
        );
        for i in 0..2048 {
            let k = base + i;
            s += &format!(
                "[[service.backend]]\nname = \"b{i}\"\naddress = \"10.{}.{}.1:80\"\n",
                k / 256,
                k % 256
            );
        }
        s
    };
    text += &svc(1, 0);
    text += &svc(2, 2048);
    let err = parse(&text).unwrap_err();
    assert_eq!(err.key(), Some("service[2].backend[2046]"), "{err}");
    assert!(err.to_string().contains("at most 4096 backends"), "{err}");
}

#[test]
fn conn_table_size_zero() {
    assert_err(
        &insert_after(2, "conn_table_size = 0"),
        3,
        "daemon.conn_table_size",
        "greater than 0",
    );
}

#[test]
fn durations() {
    assert_err(
        &insert_after(2, r#"tcp_idle_timeout = "0s""#),
        3,
        "daemon.tcp_idle_timeout",
        "greater than 0",
    );
    assert_err(
        &insert_after(2, r#"tcp_closing_timeout = "0ms""#),
        3,
        "daemon.tcp_closing_timeout",
        "greater than 0",
    );
    assert_err(
        &insert_after(2, r#"udp_idle_timeout = "3 parsecs""#),
        3,
        "daemon.udp_idle_timeout",
        "is not a duration",
    );
    assert_err(
        &insert_after(2, "udp_idle_timeout = 30"),
        3,
        "daemon.udp_idle_timeout",
        "expected a string",
    );
}

#[test]
fn hash_seed() {
    let key = "daemon.hash_seed";
    let cfg = parse(&insert_after(2, r#"hash_seed = "5f3a9c0e12b4d7e8""#)).unwrap();
    assert_eq!(cfg.daemon.hash_seed, Some(0x5f3a_9c0e_12b4_d7e8));
    let cfg = parse(&insert_after(2, r#"hash_seed = "0x00000000000000A1""#)).unwrap();
    assert_eq!(cfg.daemon.hash_seed, Some(0xa1));
    assert_eq!(
        parse(BASE).unwrap().daemon.hash_seed,
        None,
        "random unless set"
    );
    for bad in [
        "5f3a9c0e",
        "5f3a9c0e12b4d7e8aa",
        "5f3a9c0e12b4d7eg",
        "+f3a9c0e12b4d7e8",
    ] {
        assert_err(
            &insert_after(2, &format!("hash_seed = {bad:?}")),
            3,
            key,
            "is not 16 hex digits",
        );
    }
    assert_err(
        &insert_after(2, r#"hash_seed = "0000000000000000""#),
        3,
        key,
        "must not be zero",
    );
}

#[test]
fn snat_port_range() {
    let key = "daemon.snat_port_range";
    assert_err(
        &insert_after(2, r#"snat_port_range = "10000""#),
        3,
        key,
        "is not a port range",
    );
    assert_err(
        &insert_after(2, r#"snat_port_range = "a-b""#),
        3,
        key,
        "is not a port range",
    );
    assert_err(
        &insert_after(2, r#"snat_port_range = "10000-70000""#),
        3,
        key,
        "is not a port range",
    );
    assert_err(
        &insert_after(2, r#"snat_port_range = "30000-20000""#),
        3,
        key,
        "start 30000 is above end 20000",
    );
    assert_err(
        &insert_after(2, r#"snat_port_range = "80-9000""#),
        3,
        key,
        "below 1024",
    );
    let cfg = parse(&insert_after(2, r#"snat_port_range = "1024-1024""#)).unwrap();
    assert_eq!(
        (cfg.daemon.snat_port_min, cfg.daemon.snat_port_max),
        (1024, 1024)
    );
}

#[test]
fn interfaces() {
    assert_err(
        &replace_line(2, r#"interface = """#),
        2,
        "daemon.interface",
        "must not be empty",
    );
    assert_err(
        &replace_line(2, "interface = []"),
        2,
        "daemon.interface",
        "at least one interface",
    );
    assert_err(
        &replace_line(2, r#"interface = ["eth0", ""]"#),
        2,
        "daemon.interface[1]",
        "must not be empty",
    );
    assert_err(
        &replace_line(2, r#"interface = ["eth0", "eth0"]"#),
        2,
        "daemon.interface[1]",
        "listed twice",
    );
    assert_err(
        &replace_line(2, r#"interface = "a-very-long-interface-name""#),
        2,
        "daemon.interface",
        "not a valid interface name",
    );
}

#[test]
fn paths() {
    assert_err(
        &insert_after(2, r#"pin_path = "bpf/router""#),
        3,
        "daemon.pin_path",
        "absolute path",
    );
    assert_err(
        &insert_after(2, r#"control_socket = """#),
        3,
        "daemon.control_socket",
        "must not be empty",
    );
}

#[test]
fn metrics_listen_is_an_address_or_off() {
    let cfg = parse(&insert_after(2, r#"metrics_listen = "0.0.0.0:9100""#)).unwrap();
    assert_eq!(
        cfg.daemon.metrics_listen,
        Some("0.0.0.0:9100".parse().unwrap())
    );
    let cfg = parse(&insert_after(2, r#"metrics_listen = """#)).unwrap();
    assert_eq!(cfg.daemon.metrics_listen, None);
    assert_err(
        &insert_after(2, r#"metrics_listen = "localhost""#),
        3,
        "daemon.metrics_listen",
        "not an address:port",
    );
}
