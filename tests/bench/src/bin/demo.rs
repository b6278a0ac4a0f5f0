//! `cargo xtask run`: the router working, end to end, in a throwaway
//! topology of network namespaces. It starts the real daemon on
//! examples/demo.toml, opens batches of short HTTP connections to the VIP,
//! and prints how they split across the backends next to the weights; then
//! it shifts the weights with `router reload` and shows new connections
//! follow while a long-lived stream stays on its backend. Everything it
//! creates is removed on exit or Ctrl-C.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};
use router_testkit::{
    daemon_proc::{ScratchDir, cli, start_daemon, status},
    fixtures::workspace_root,
    netns::{self, Topology},
};

const VIP: &str = "198.18.100.1:8000";
const NAMES: [&str; 3] = ["gpu-0", "gpu-1", "gpu-2"];

fn main() -> ExitCode {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    if let Err(e) = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst)) {
        eprintln!("demo: cannot install Ctrl-C handler: {e}");
        return ExitCode::FAILURE;
    }
    match run(&stop) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn batch(topo: &Topology, n: usize) -> Result<BTreeMap<String, usize>> {
    let vip: SocketAddr = VIP.parse()?;
    let bodies = netns::in_netns(topo.client_ns(), move || -> Result<Vec<String>> {
        (0..n)
            .map(|_| Ok(netns::http_get(vip, "/", Duration::from_secs(5))?.body))
            .collect()
    })??;
    let mut counts = BTreeMap::new();
    for b in bodies {
        *counts.entry(b).or_insert(0) += 1;
    }
    Ok(counts)
}

fn print_split(title: &str, counts: &BTreeMap<String, usize>, weights: &[u32; 3]) {
    let total: usize = counts.values().sum();
    let wsum: u32 = weights.iter().sum();
    println!("\n{title}: {total} connections");
    println!(
        "  {:<8} {:>7} {:>10} {:>12}  ",
        "backend", "weight", "expected", "observed"
    );
    for (name, w) in NAMES.iter().zip(weights) {
        let got = *counts.get(*name).unwrap_or(&0);
        let share = 100.0 * got as f64 / total.max(1) as f64;
        let expected = 100.0 * f64::from(*w) / f64::from(wsum.max(1));
        let bar = "#".repeat((share / 2.0).round() as usize);
        println!("  {name:<8} {w:>7} {expected:>9.1}% {share:>11.1}%  {bar}");
    }
}

fn with_weights(template: &str, weights: &[u32; 3]) -> Result<String> {
    let mut doc: toml_edit::DocumentMut = template.parse().context("parsing demo.toml")?;
    let backends = doc["service"][0]["backend"]
        .as_array_of_tables_mut()
        .context("demo.toml has no [[service.backend]]")?;
    for (b, w) in backends.iter_mut().zip(weights) {
        b["weight"] = toml_edit::value(i64::from(*w));
    }
    Ok(doc.to_string())
}

fn run(stop: &AtomicBool) -> Result<()> {
    let template_path = workspace_root().join("examples/demo.toml");
    let template = std::fs::read_to_string(&template_path)
        .with_context(|| format!("reading {}", template_path.display()))?;
    let socket = PathBuf::from("/run/router/demo.sock");

    println!("Building the demo topology: client, load balancer (lb0, XDP), 3 HTTP backends…");
    let topo = Topology::one_arm(3)?;
    let mut servers = Vec::new();
    for (i, name) in NAMES.iter().enumerate() {
        servers.push(netns::spawn_http_backend(
            topo.backend_ns(i),
            name,
            netns::backend_addr(i),
            8000,
        )?);
        netns::wait_for_tcp(
            topo.lb_ns(),
            SocketAddr::new(netns::backend_addr(i).into(), 8000),
            Duration::from_secs(5),
        )?;
    }
    let dir = ScratchDir::new("demo")?;
    let config = dir.0.join("demo.toml");
    let weights = [100, 200, 500];
    std::fs::write(&config, with_weights(&template, &weights)?)?;
    println!("Starting `router daemon --config examples/demo.toml` in the LB namespace…");
    let daemon = start_daemon(topo.lb_ns(), &config, &socket)?;

    for round in 1..=2 {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let counts = batch(&topo, 800)?;
        print_split(
            &format!("Round {round}, weights 100:200:500"),
            &counts,
            &weights,
        );
    }

    // A long-lived stream opened before the weight change.
    let vip: SocketAddr = VIP.parse()?;
    let stream = netns::in_netns(topo.client_ns(), || -> Result<TcpStream> {
        let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /stream?seconds=4&interval_ms=200 HTTP/1.0\r\n\r\n")?;
        Ok(s)
    })??;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    line.clear();
    reader.read_line(&mut line)?;
    let stream_owner = line.trim().to_string();
    println!("\nA streaming response (like an LLM's tokens) started on {stream_owner}.");

    let shifted = [500, 200, 100];
    std::fs::write(&config, with_weights(&template, &shifted)?)?;
    println!(
        "Shifting weights to 500:200:100 with `router reload`: {}",
        cli(&socket, &["reload"])?.trim()
    );
    if !stop.load(Ordering::SeqCst) {
        let counts = batch(&topo, 800)?;
        print_split("After the change, weights 500:200:100", &counts, &shifted);
    }
    let mut kept = 1;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            break;
        }
        if line.trim() != stream_owner {
            bail!("the stream moved from {stream_owner} to {}", line.trim());
        }
        kept += 1;
    }
    println!(
        "The stream stayed on {stream_owner} for all {kept} chunks: established flows are pinned."
    );

    let st = status(&socket)?;
    println!("\n`router status`:\n{}", router::cli::render::render(&st));
    daemon.stop(Duration::from_secs(10))?;
    println!("Daemon stopped and detached; removing the namespaces.");
    drop(servers);
    drop(topo);
    Ok(())
}
