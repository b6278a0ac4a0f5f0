//! The daemon and CLI facing bad input: a config that fails validation
//! attaches nothing and changes nothing; a CLI without a daemon says so.

use std::{process::Command, time::Duration};

use router_testkit::{
    daemon_proc::{ScratchDir, cli, one_arm_config, router_binary, start_daemon},
    netns::{self, Topology},
};

fn backends() -> Vec<(String, String, u32)> {
    vec![("b0".into(), "198.18.0.11:8000".into(), 100)]
}

/// Runs `router daemon` in the LB namespace; returns (exit ok, stderr).
fn daemon_once(topo: &Topology, config: &std::path::Path) -> (bool, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", topo.lb_ns()])
        .arg(router_binary().unwrap())
        .args(["daemon", "--config"])
        .arg(config)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `router.toml:N:` for the first line of `text` containing `needle`.
fn at_line(text: &str, needle: &str) -> String {
    let n = text.lines().position(|l| l.contains(needle)).unwrap() + 1;
    format!("router.toml:{n}:")
}

fn xdp_attached(topo: &Topology) -> bool {
    netns::exec(topo.lb_ns(), &["ip", "link", "show", topo.lb_if()])
        .unwrap()
        .contains("xdp")
}

#[test]
fn invalid_configs_are_refused_before_anything_is_attached() {
    let topo = Topology::one_arm(1).unwrap();
    let dir = ScratchDir::new("badcfg").unwrap();
    let socket = dir.0.join("router.sock");
    let good = one_arm_config(
        &socket,
        topo.lb_if(),
        "198.18.100.1:8000",
        netns::LB_ADDR,
        &backends(),
    );

    let unknown = good.replace(
        "protocol = \"tcp\"",
        "protocol = \"tcp\"\ncolour = \"blue\"",
    );
    let cases = [
        // (what, config text, fragments the error must contain)
        (
            "SNAT address not on the interface",
            good.replace("snat = \"198.18.0.1\"", "snat = \"198.18.0.77\""),
            vec![
                at_line(&good, "snat ="),
                "service[0].snat".into(),
                "198.18.0.77".into(),
            ],
        ),
        (
            "interface that does not exist",
            good.replace(
                &format!("interface = \"{}\"", topo.lb_if()),
                "interface = \"nope0\"",
            ),
            vec![
                at_line(&good, "interface ="),
                "daemon.interface".into(),
                "nope0".into(),
            ],
        ),
        (
            "unknown key",
            unknown.clone(),
            vec![at_line(&unknown, "colour"), "service[0].colour".into()],
        ),
        (
            "bad backend address",
            good.replace("198.18.0.11:8000", "198.18.0.300:8000"),
            vec![
                at_line(&good, "address ="),
                "service[0].backend[0].address".into(),
                "198.18.0.300:8000".into(),
            ],
        ),
        (
            "SNAT range overlapping the host's ephemeral ports",
            good.replace(
                "[daemon]\n",
                "[daemon]\nsnat_port_range = \"30000-40000\"\n",
            ),
            vec![
                "router.toml:2:".into(),
                "daemon.snat_port_range".into(),
                "ip_local_port_range".into(),
            ],
        ),
    ];
    for (what, text, fragments) in cases {
        let path = dir.0.join("router.toml");
        std::fs::write(&path, &text).unwrap();
        let (ok, stderr) = daemon_once(&topo, &path);
        assert!(!ok, "{what}: daemon must exit non-zero");
        for f in &fragments {
            assert!(
                stderr.contains(f.as_str()),
                "{what}: error lacks {f:?}: {stderr}"
            );
        }
        assert!(!xdp_attached(&topo), "{what}: XDP must not be attached");
        assert!(!socket.exists(), "{what}: no control socket may be left");
    }
}

#[test]
fn cli_without_a_daemon_prints_one_clear_line() {
    let dir = ScratchDir::new("nodaemon").unwrap();
    let socket = dir.0.join("absent.sock");
    for args in [&["status"][..], &["status", "--json"], &["reload"]] {
        let err = cli(&socket, args).unwrap_err().to_string();
        assert!(err.contains("daemon is not running"), "{args:?}: {err}");
        let stderr_lines = err.rsplit(": ").next().unwrap().lines().count();
        assert_eq!(stderr_lines, 1, "{args:?}: {err}");
    }
}

#[test]
fn reload_with_an_invalid_config_changes_nothing() {
    let topo = Topology::one_arm(1).unwrap();
    let dir = ScratchDir::new("reload").unwrap();
    let socket = dir.0.join("router.sock");
    let config = dir.0.join("router.toml");
    let good = one_arm_config(
        &socket,
        topo.lb_if(),
        "198.18.100.1:8000",
        netns::LB_ADDR,
        &backends(),
    );
    std::fs::write(&config, &good).unwrap();
    let daemon = start_daemon(topo.lb_ns(), &config, &socket).unwrap();
    let before: serde_json::Value =
        serde_json::from_str(&cli(&socket, &["status", "--json"]).unwrap()).unwrap();

    std::fs::write(&config, good.replace("weight = 100", "weight = -5")).unwrap();
    let err = cli(&socket, &["reload"]).unwrap_err().to_string();
    assert!(err.contains("service[0].backend[0].weight"), "{err}");

    let after: serde_json::Value =
        serde_json::from_str(&cli(&socket, &["status", "--json"]).unwrap()).unwrap();
    assert_eq!(
        before["datapath"]["services"],
        after["datapath"]["services"]
    );
    assert_eq!(after["last_reload"]["ok"], false);
    assert!(xdp_attached(&topo));
    let status = daemon.stop(Duration::from_secs(10)).unwrap();
    assert!(status.success());
}

#[test]
fn weight_and_drain_overrides_through_the_cli() {
    let topo = Topology::one_arm(2).unwrap();
    let dir = ScratchDir::new("override").unwrap();
    let socket = dir.0.join("router.sock");
    let config = dir.0.join("router.toml");
    let backends = vec![
        ("b0".to_string(), "198.18.0.11:8000".to_string(), 100),
        ("b1".to_string(), "198.18.0.12:8000".to_string(), 100),
    ];
    std::fs::write(
        &config,
        one_arm_config(
            &socket,
            topo.lb_if(),
            "198.18.100.1:8000",
            netns::LB_ADDR,
            &backends,
        ),
    )
    .unwrap();
    let daemon = start_daemon(topo.lb_ns(), &config, &socket).unwrap();
    let backend = |name: &str| -> (u32, String, u32) {
        let st: serde_json::Value =
            serde_json::from_str(&cli(&socket, &["status", "--json"]).unwrap()).unwrap();
        let p = st["policy"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["backend"] == name)
            .unwrap()
            .clone();
        let dp = st["datapath"]["services"][0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == name)
            .unwrap()
            .clone();
        (
            p["weight"].as_u64().unwrap() as u32,
            p["mode"].as_str().unwrap().to_string(),
            dp["weight"].as_u64().unwrap() as u32,
        )
    };
    assert_eq!(backend("b0"), (100, "pinned".into(), 100));

    cli(&socket, &["weight", "set", "llama", "b0", "7"]).unwrap();
    assert_eq!(backend("b0"), (7, "manual".into(), 7), "applied at once");

    cli(&socket, &["drain", "llama", "b1"]).unwrap();
    assert_eq!(backend("b1"), (0, "drain".into(), 0));
    cli(&socket, &["undrain", "llama", "b1"]).unwrap();
    assert_eq!(backend("b1"), (100, "pinned".into(), 100));

    cli(&socket, &["weight", "auto", "llama", "b0"]).unwrap();
    assert_eq!(backend("b0"), (100, "pinned".into(), 100));

    // Unknown names and a negative weight: one clear error, nothing changes.
    let err = cli(&socket, &["weight", "set", "llama", "nope", "5"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("has no backend named \"nope\""), "{err}");
    let err = cli(&socket, &["drain", "gemma", "b0"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("no service named \"gemma\""), "{err}");
    assert!(cli(&socket, &["weight", "set", "llama", "b0", "-5"]).is_err());
    assert_eq!(backend("b0"), (100, "pinned".into(), 100));

    // Overrides survive a reload of the same config.
    cli(&socket, &["drain", "llama", "b1"]).unwrap();
    cli(&socket, &["reload"]).unwrap();
    assert_eq!(backend("b1"), (0, "drain".into(), 0));
    assert!(daemon.stop(Duration::from_secs(10)).unwrap().success());
}
