//! Setting up a contender's world: the router's and HAProxy's configs, the
//! mock replicas and their fake GPUs, and the front (router or HAProxy).

use std::{
    net::{SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use router_testkit::{
    daemon_proc::{Daemon, cli, router_binary, start_daemon},
    netns::{self, ChildGuard, Topology},
    replica,
};
use serde_json::Value;

use super::{
    BATCH_SLOWDOWN, Contender, HEALTH_INTERVAL_MS, KV_TOKENS, MAX_BATCH, PORT, RouterSetup,
    RoutingSettings, SELECTION_KEY_SUPPORTED, SERVICE, SNAT, SPEEDS, STEP_MS, Selection, VIP,
    Weights,
};
use crate::peers;

pub(super) fn vip() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(VIP, PORT))
}

pub(super) fn replica_addr(i: usize) -> SocketAddr {
    SocketAddr::from((netns::backend_addr(i), PORT))
}

pub(super) fn backend_name(i: usize) -> String {
    format!("gpu-{i}")
}

pub(super) fn backend_index(name: &str) -> Option<usize> {
    name.strip_prefix("gpu-")?
        .parse()
        .ok()
        .filter(|i| *i < SPEEDS.len())
}

pub(super) fn health() -> String {
    format!(
        "{{ tcp = true, http_path = \"/health\", interval = \"{HEALTH_INTERVAL_MS}ms\", \
         timeout = \"400ms\", fall = 2, rise = 2 }}"
    )
}

pub(super) fn router_config(r: RouterSetup, socket: &Path, slow_start: Duration) -> String {
    let selection = if SELECTION_KEY_SUPPORTED {
        format!("selection = \"{}\"\n", r.selection.key())
    } else {
        String::new()
    };
    let mut s = format!(
        "[daemon]\ninterface = \"{}\"\ncontrol_socket = \"{}\"\n\n\
         [policy]\n# Defaults, but slow start matched to the replicas' known warm-up.\n\
         slow_start = \"{}ms\"\n\n\
         [[service]]\nname = \"{SERVICE}\"\nvip = \"{}\"\nprotocol = \"tcp\"\nsnat = \"{SNAT}\"\n{selection}",
        netns::LB_IF,
        socket.display(),
        slow_start.as_millis(),
        vip()
    );
    for (i, speed) in SPEEDS.iter().enumerate() {
        let mut how = match r.weights {
            Weights::Equal => "weight = 100".to_owned(),
            Weights::TrueSpeeds => format!("weight = {}", (speed * 100.0).round() as u32),
            Weights::Telemetry => format!(
                "capacity = 1.0\ntelemetry = {{ source = \"prometheus\", url = \"http://{}/metrics\", format = \"vllm\" }}",
                replica_addr(i)
            ),
        };
        if r.selection == Selection::LeastLoaded && !r.polled {
            // Room: the engines' batch size, as an operator sets it from
            // the engine's own setting (vLLM --max-num-seqs). Told, not
            // learned: learning needs a queue that lasts, which a run at
            // 70% may never show.
            how.push_str(&format!("\nmax_in_flight = {}", MAX_BATCH as u32));
        }
        s.push_str(&format!(
            "\n[[service.backend]]\nname = \"{}\"\naddress = \"{}\"\n{how}\nhealth = {}\n",
            backend_name(i),
            replica_addr(i),
            health()
        ));
    }
    s
}

/// HAProxy leastconn with the same health checks, and the redispatch and
/// retries its documentation recommends so a connection to a replica that
/// just went away is retried elsewhere.
pub(super) fn haproxy_config() -> String {
    let mut s = format!(
        "global\n    # maxconn: HAProxy derives it from the file-descriptor limit.\n\n\
         defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 90s\n    timeout server 90s\n    \
         option redispatch\n    retries 3\n\n\
         frontend fe\n    bind {}\n    default_backend be\n\n\
         backend be\n    balance leastconn\n    option httpchk GET /health\n",
        vip()
    );
    for i in 0..SPEEDS.len() {
        s.push_str(&format!(
            "    server {} {} check inter {HEALTH_INTERVAL_MS} fall 2 rise 2\n",
            backend_name(i),
            replica_addr(i)
        ));
    }
    s
}

fn nvml_path(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("gpu-{i}.json"))
}

/// Starts replica `i`; `cold` = (seconds, factor) makes it that much slower
/// for its first seconds.
pub(super) fn start_replica(
    topo: &Topology,
    dir: &Path,
    i: usize,
    cold: Option<(f64, f64)>,
) -> Result<ChildGuard> {
    let state = nvml_path(dir, i);
    let _ = std::fs::remove_file(&state);
    let owned = [
        ("--max-batch", (MAX_BATCH as u32).to_string()),
        ("--step-ms", STEP_MS.to_string()),
        ("--batch-slowdown", BATCH_SLOWDOWN.to_string()),
        ("--tokens", KV_TOKENS.to_string()),
        ("--speed", SPEEDS[i].to_string()),
        ("--nvml-state", state.display().to_string()),
    ];
    let cold = cold.map(|(secs, factor)| {
        [
            ("--cold-seconds", secs.to_string()),
            ("--cold-factor", factor.to_string()),
        ]
    });
    let args: Vec<&str> = owned
        .iter()
        .chain(cold.iter().flatten())
        .flat_map(|(k, v)| [*k, v.as_str()])
        .collect();
    replica::spawn_mock_replica(
        topo.backend_ns(i),
        &backend_name(i),
        netns::backend_addr(i),
        PORT,
        &args,
    )
    .with_context(|| format!("starting replica gpu-{i}"))
}

/// The replica's SM activity (busy time × batch occupancy over the last
/// second, 0–100) from its fake NVML state file.
pub(super) fn sm_util(dir: &Path, i: usize) -> Option<f64> {
    let text = std::fs::read_to_string(nvml_path(dir, i)).ok()?;
    let v: Value = serde_json::from_str(&text).ok()?;
    v["devices"][0]["sm_util"].as_f64()
}

/// Per replica, from a status reply: `pick` of its policy entry.
pub(super) fn per_backend<T: Default + Clone>(
    st: &router::api::StatusReply,
    pick: impl Fn(&router::api::BackendPolicyStatus) -> T,
) -> Vec<T> {
    let mut out = vec![T::default(); SPEEDS.len()];
    for b in &st.policy {
        if let Some(i) = backend_index(&b.backend) {
            out[i] = pick(b);
        }
    }
    out
}

pub(super) fn set_weight(socket: &Path, i: usize, weight: u32) -> Result<()> {
    cli(
        socket,
        &[
            "weight",
            "set",
            SERVICE,
            &backend_name(i),
            &weight.to_string(),
        ],
    )
    .map(drop)
}

pub(super) enum Front {
    Router {
        daemon: Daemon,
        socket: PathBuf,
        setup: RouterSetup,
    },
    Haproxy(#[allow(dead_code)] ChildGuard),
}

impl Front {
    pub(super) fn socket(&self) -> Option<&Path> {
        match self {
            Front::Router { socket, .. } => Some(socket),
            Front::Haproxy(_) => None,
        }
    }
}

pub(super) fn start_front(
    c: Contender,
    s: &RoutingSettings,
    topo: &Topology,
    dir: &Path,
) -> Result<Front> {
    let lb = topo.lb_ns();
    match c.router() {
        Some(setup) => {
            topo.add_snat_addr()?;
            let socket = dir.join("router.sock");
            let config = dir.join("router.toml");
            let slow_start = Duration::from_secs_f64(s.cold_secs);
            std::fs::write(&config, router_config(setup, &socket, slow_start))
                .context("writing the router config")?;
            check_config(lb, &config)?;
            let daemon = start_daemon(lb, &config, &socket)?;
            Ok(Front::Router {
                daemon,
                socket,
                setup,
            })
        }
        None => {
            netns::exec(
                lb,
                &["ip", "addr", "add", &format!("{VIP}/32"), "dev", "lo"],
            )?;
            Ok(Front::Haproxy(peers::start_haproxy(
                lb,
                &haproxy_config(),
                dir,
                vip(),
            )?))
        }
    }
}

/// `router config check` in `ns`. The daemon prints why it refuses a
/// config to its own stderr, which the result would not carry; checking
/// first puts the reason (an unknown key, say) into the skip.
fn check_config(ns: &str, config: &Path) -> Result<()> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(router_binary()?)
        .args(["config", "check"])
        .arg(config)
        .output()
        .context("running router config check")?;
    if !out.status.success() {
        bail!(
            "router config check refused the config: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
