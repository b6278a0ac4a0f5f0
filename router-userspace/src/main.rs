//! `router`: the daemon and its CLI.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use router::{
    api::{ReloadReply, StatusReply, client, path_segment},
    cli::render,
    config::DEFAULT_CONTROL_SOCKET,
    daemon,
};

#[derive(Parser)]
#[command(
    name = "router",
    version,
    about = "XDP load balancer for GPU inference replicas"
)]
struct Cli {
    /// Control socket of the daemon.
    #[arg(long, global = true, default_value = DEFAULT_CONTROL_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: load (or adopt) the pinned XDP datapath, attach it,
    /// serve the control socket. Stopping the daemon leaves the datapath
    /// forwarding on the last weights; the next daemon takes it over.
    Daemon {
        #[arg(long, required_unless_present_any = ["cleanup", "prepare_for"])]
        config: Option<PathBuf>,
        /// Where the program, maps and links are pinned (bpffs); overrides
        /// `[daemon] pin_path`.
        #[arg(long)]
        pin_path: Option<PathBuf>,
        /// Detach the pinned datapath from every interface and remove every
        /// pinned object, then exit (established connections are reset).
        #[arg(long)]
        cleanup: bool,
        /// As root, before a daemon that runs as USER (a name or uid): make
        /// pin_path (created if missing) and everything pinned under it
        /// USER's, then exit. The systemd unit runs it as ExecStartPre=+.
        #[arg(long, value_name = "USER", conflicts_with = "cleanup")]
        prepare_for: Option<String>,
    },
    /// Serve this host's GPU readings (NVML) over HTTP/JSON for remote routers.
    Agent {
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0:9400")]
        listen: std::net::SocketAddr,
        /// File holding the bearer token every request must carry.
        #[arg(long)]
        token_file: PathBuf,
        /// libnvidia-ml to load instead of the system one.
        #[arg(long)]
        nvml_library: Option<PathBuf>,
        /// Serve HTTPS with this certificate chain (PEM); needs --tls-key.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The certificate's private key (PEM); needs --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
    /// Services, backends, weights and counters.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Pin a backend's weight, or hand it back to the policy.
    Weight {
        #[command(subcommand)]
        command: WeightCommand,
    },
    /// Services: VIP, backends, health, saturation, traffic and cost.
    Services {
        #[arg(long)]
        json: bool,
    },
    /// Backends (of one service, or all): weight and why, telemetry, health,
    /// live flows, datapath latency and cost.
    Backends {
        service: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Live view of services and backends; keys drain and undrain. Without a
    /// terminal it prints the backends table every refresh instead.
    Top {
        /// Seconds between refreshes.
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        refresh: std::time::Duration,
        /// Without a terminal: stop after this many tables (0: until killed).
        #[arg(long, default_value_t = 0)]
        count: u64,
    },
    /// Weight 0 for new connections to a backend; established ones finish,
    /// or are ended once the deadline passes.
    Drain {
        service: String,
        backend: String,
        /// End the backend's remaining flows after this long (e.g. 30s, 5m).
        #[arg(long, allow_hyphen_values = true, value_parser = parse_duration)]
        deadline: Option<std::time::Duration>,
    },
    /// Undo `drain`: the backend slow-starts back to its weight.
    Undrain { service: String, backend: String },
    /// Pools (of one service, or all): shares, room, traffic, fallbacks,
    /// cost and time to first byte.
    Pools {
        service: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Change a pool at run time (kept across reloads and restarts).
    Pool {
        #[command(subcommand)]
        command: PoolCommand,
    },
    /// Move a canary pool to all unmatched clients, or take it out.
    Canary {
        #[command(subcommand)]
        command: CanaryCommand,
    },
    /// Re-read the daemon's config file and apply all of it, or none of it.
    Reload {
        #[arg(long)]
        json: bool,
    },
    /// Config file commands.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// On a backend of DSR services: strip the router's IPIP/GUE headers
    /// in XDP (for kernels without the ipip or fou modules).
    Decap {
        #[command(subcommand)]
        command: DecapCommand,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
}

#[derive(Subcommand)]
enum DecapCommand {
    /// Load and pin the decap program on an interface (again: update its addresses).
    Attach {
        #[arg(long)]
        interface: String,
        /// Outer destination to accept, IPv4 or IPv6 (repeatable);
        /// default: the interface's IPv4 and global IPv6 addresses.
        #[arg(long = "address")]
        addresses: Vec<std::net::IpAddr>,
        /// GUE port accepted besides IPIP; 0 for IPIP only.
        #[arg(long, default_value_t = router_common::dsr::DEFAULT_GUE_PORT)]
        gue_port: u16,
        #[arg(long, default_value = router::decap::DEFAULT_DECAP_PIN_PATH)]
        pin_path: PathBuf,
    },
    /// Detach and unpin it.
    Detach {
        #[arg(long)]
        interface: String,
        #[arg(long, default_value = router::decap::DEFAULT_DECAP_PIN_PATH)]
        pin_path: PathBuf,
    },
    /// Interfaces with the program, their addresses and counters.
    Status {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = router::decap::DEFAULT_DECAP_PIN_PATH)]
        pin_path: PathBuf,
    },
}

fn decap_command(command: DecapCommand) -> Result<()> {
    match command {
        DecapCommand::Attach {
            interface,
            addresses,
            gue_port,
            pin_path,
        } => println!(
            "{}",
            router::decap::attach(&router::decap::AttachOptions {
                interface,
                addresses,
                gue_port,
                pin_path,
            })?
        ),
        DecapCommand::Detach {
            interface,
            pin_path,
        } => println!("{}", router::decap::detach(&pin_path, &interface)?),
        DecapCommand::Status { json, pin_path } => {
            let all = router::decap::status(&pin_path)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else if all.is_empty() {
                println!("decap is attached to no interface");
            } else {
                for s in all {
                    let addrs: Vec<String> = s.addresses.iter().map(|a| a.to_string()).collect();
                    let gue = if s.gue_port == 0 {
                        "ipip".to_string()
                    } else {
                        format!("ipip, gue {}", s.gue_port)
                    };
                    println!(
                        "{}: {} ({gue}): {} decapsulated, {} passed",
                        s.interface,
                        addrs.join(", "),
                        s.decapsulated,
                        s.passed
                    );
                }
            }
        }
    }
    Ok(())
}

/// A command-line value clap could read but the CLI refuses.
#[derive(Debug, thiserror::Error)]
enum ArgError {
    #[error("malformed duration {input:?} ({source}); use e.g. 30s, 5m, 1h")]
    Duration {
        input: String,
        #[source]
        source: humantime::DurationError,
    },
    #[error("weight must not be negative, got {0}")]
    NegativeWeight(i64),
    #[error("weight {0} is too large (at most {max})", max = u32::MAX)]
    WeightTooLarge(i64),
    #[error("weight must be a whole number, got {0:?}")]
    NotAWeight(String),
}

fn parse_duration(s: &str) -> Result<std::time::Duration, ArgError> {
    humantime::parse_duration(s).map_err(|source| ArgError::Duration {
        input: s.to_owned(),
        source,
    })
}

fn parse_weight(s: &str) -> Result<u32, ArgError> {
    match s.parse::<i64>() {
        Ok(n) if n < 0 => Err(ArgError::NegativeWeight(n)),
        Ok(n) => u32::try_from(n).map_err(|_| ArgError::WeightTooLarge(n)),
        Err(_) => Err(ArgError::NotAWeight(s.to_owned())),
    }
}

#[derive(Subcommand)]
enum WeightCommand {
    /// Pin the weight (0 or more; 100 is an idle capacity-1.0 replica).
    Set {
        service: String,
        backend: String,
        #[arg(allow_hyphen_values = true, value_parser = parse_weight)]
        weight: u32,
    },
    /// Let the policy (or the config's weight) decide again.
    Auto { service: String, backend: String },
}

#[derive(Subcommand)]
enum PoolCommand {
    /// Set a pool's share of unmatched clients; the other pools keep their
    /// proportions and the total stays 100.
    Set {
        service: String,
        pool: String,
        /// Percent, 0 to 100.
        #[arg(long)]
        share: u32,
    },
}

#[derive(Subcommand)]
enum CanaryCommand {
    /// Share 100: every unmatched client goes to the pool.
    Promote { service: String, pool: String },
    /// Share 0: the pool takes no unmatched clients (segments and
    /// fallbacks still reach it).
    Rollback { service: String, pool: String },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config file (syntax, values, and this host's interfaces).
    Check {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn drain(
    socket: &std::path::Path,
    method: &str,
    service: &str,
    backend: &str,
    deadline: Option<std::time::Duration>,
) -> Result<()> {
    let mut path = format!("{}/drain", backend_path(service, backend));
    if let Some(d) = deadline {
        path.push_str(&format!("?deadline_secs={}", d.as_secs()));
    }
    let body = client::request(socket, method, &path).await?;
    println!("{}", String::from_utf8_lossy(&body));
    Ok(())
}

/// One line: every pool's share after the change.
async fn set_pool_share(
    socket: &std::path::Path,
    service: &str,
    pool: &str,
    share: u32,
) -> Result<()> {
    let path = format!(
        "/v1/services/{}/pools/{}/share/{share}",
        path_segment(service),
        path_segment(pool)
    );
    let body = client::request(socket, "POST", &path).await?;
    let shares: Vec<(String, u32)> =
        serde_json::from_slice(&body).context("decoding the daemon's pool shares")?;
    let list: Vec<String> = shares.iter().map(|(n, s)| format!("{n} {s}%")).collect();
    println!("{service}: {}", list.join(", "));
    Ok(())
}

fn daemon_command(
    config: Option<PathBuf>,
    pin_path: Option<PathBuf>,
    cleanup: bool,
    prepare_for: Option<String>,
    socket: &std::path::Path,
) -> Result<()> {
    if !cleanup && prepare_for.is_none() {
        let config = config.context("--config is required")?;
        return daemon::run(&config, &daemon::DaemonOptions { pin_path });
    }
    // The config, when given, only names the pin path and control socket:
    // cleaning up must work even when the host no longer fits it, and
    // preparing runs before the network the host check needs may be up.
    let cfg = config
        .as_deref()
        .map(router::config::Config::load)
        .transpose()?;
    let pin_path = pin_path
        .or_else(|| cfg.as_ref().map(|c| c.daemon.pin_path.clone()))
        .unwrap_or_else(|| router::config::DEFAULT_PIN_PATH.into());
    if let Some(user) = prepare_for {
        println!("{}", daemon::prepare_for(&pin_path, &user)?);
        return Ok(());
    }
    let socket = cfg
        .as_ref()
        .map_or(socket, |c| c.daemon.control_socket.as_path());
    println!("{}", daemon::cleanup(&pin_path, socket)?);
    Ok(())
}

fn backend_path(service: &str, backend: &str) -> String {
    format!(
        "/v1/services/{}/backends/{}",
        path_segment(service),
        path_segment(backend)
    )
}

fn run(cli: Cli) -> Result<()> {
    let command = match cli.command {
        // Not inside a runtime: the daemon starts its own once it has
        // dropped capabilities, which only works while it has one thread.
        Command::Daemon {
            config,
            pin_path,
            cleanup,
            prepare_for,
        } => return daemon_command(config, pin_path, cleanup, prepare_for, &cli.socket),
        Command::Decap { command } => return decap_command(command),
        other => other,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        match command {
            Command::Daemon { .. } | Command::Decap { .. } => {
                anyhow::bail!("handled before the runtime starts")
            }
            Command::Agent {
                listen,
                token_file,
                nvml_library,
                tls_cert,
                tls_key,
            } => {
                let token = std::fs::read_to_string(&token_file)
                    .with_context(|| format!("reading token file {}", token_file.display()))?;
                let tls = match (tls_cert, tls_key) {
                    (Some(cert), Some(key)) => Some(router::tls::server_config(&cert, &key)?),
                    _ => None,
                };
                let opts = router::agent::AgentOptions {
                    listen,
                    token: token.trim().to_string(),
                    library: nvml_library,
                    tls,
                };
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .context("SIGTERM handler")?;
                let shutdown = async move {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                };
                router::agent::serve(opts, shutdown).await
            }
            Command::Status { json } => {
                let body = client::request(&cli.socket, "GET", "/v1/status").await?;
                let reply: StatusReply =
                    serde_json::from_slice(&body).context("decoding the daemon's status")?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&reply)?);
                } else {
                    print!("{}", render::render(&reply));
                }
                Ok(())
            }
            Command::Weight { command } => {
                let (method, path) = match &command {
                    WeightCommand::Set {
                        service,
                        backend,
                        weight,
                    } => (
                        "POST",
                        format!("{}/weight/{weight}", backend_path(service, backend)),
                    ),
                    WeightCommand::Auto { service, backend } => (
                        "DELETE",
                        format!("{}/weight", backend_path(service, backend)),
                    ),
                };
                let body = client::request(&cli.socket, method, &path).await?;
                println!("{}", String::from_utf8_lossy(&body));
                Ok(())
            }
            Command::Drain {
                service,
                backend,
                deadline,
            } => drain(&cli.socket, "POST", &service, &backend, deadline).await,
            Command::Undrain { service, backend } => {
                drain(&cli.socket, "DELETE", &service, &backend, None).await
            }
            Command::Services { json } => {
                let body = client::request(&cli.socket, "GET", "/v1/services").await?;
                let services: Vec<router::api::views::ServiceView> =
                    serde_json::from_slice(&body).context("decoding the daemon's services")?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&services)?);
                } else {
                    print!("{}", render::render_services(&services));
                }
                Ok(())
            }
            Command::Backends { service, json } => {
                let path = match &service {
                    Some(s) => format!("/v1/services/{}/backends", path_segment(s)),
                    None => "/v1/backends".to_string(),
                };
                let body = client::request(&cli.socket, "GET", &path).await?;
                let backends: Vec<router::api::views::BackendView> =
                    serde_json::from_slice(&body).context("decoding the daemon's backends")?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&backends)?);
                } else {
                    print!("{}", render::render_backends(&backends));
                }
                Ok(())
            }
            Command::Top { refresh, count } => {
                use std::io::IsTerminal;
                if std::io::stdout().is_terminal() {
                    return router::cli::top::run(&cli.socket, refresh).await;
                }
                let mut shown = 0;
                loop {
                    let body = client::request(&cli.socket, "GET", "/v1/backends").await?;
                    let backends: Vec<router::api::views::BackendView> =
                        serde_json::from_slice(&body).context("decoding the daemon's backends")?;
                    println!("{}", render::render_backends(&backends));
                    shown += 1;
                    if count != 0 && shown >= count {
                        return Ok(());
                    }
                    tokio::time::sleep(refresh).await;
                }
            }
            Command::Completions { shell } => {
                use clap::CommandFactory;
                clap_complete::generate(
                    shell,
                    &mut Cli::command(),
                    "router",
                    &mut std::io::stdout(),
                );
                Ok(())
            }
            Command::Pools { service, json } => {
                let path = match &service {
                    Some(s) => format!("/v1/services/{}/pools", path_segment(s)),
                    None => "/v1/pools".to_string(),
                };
                let body = client::request(&cli.socket, "GET", &path).await?;
                let pools: Vec<router::api::views::PoolView> =
                    serde_json::from_slice(&body).context("decoding the daemon's pools")?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&pools)?);
                } else {
                    print!("{}", render::render_pools(&pools));
                }
                Ok(())
            }
            Command::Pool {
                command:
                    PoolCommand::Set {
                        service,
                        pool,
                        share,
                    },
            } => set_pool_share(&cli.socket, &service, &pool, share).await,
            Command::Canary { command } => match command {
                CanaryCommand::Promote { service, pool } => {
                    set_pool_share(&cli.socket, &service, &pool, 100).await
                }
                CanaryCommand::Rollback { service, pool } => {
                    set_pool_share(&cli.socket, &service, &pool, 0).await
                }
            },
            Command::Reload { json } => {
                let body = client::request(&cli.socket, "POST", "/v1/reload").await?;
                let reply: ReloadReply = serde_json::from_slice(&body)?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&reply)?);
                } else {
                    println!("{}", reply.message);
                }
                Ok(())
            }
            Command::Config {
                command: ConfigCommand::Check { file, json },
            } => {
                let cfg = daemon::load_for_host(&file)?;
                let host = daemon::host_plan(&cfg, &cfg.daemon.pin_path)
                    .context("checking what the datapath needs from this host")?;
                let backends = cfg.services.iter().map(|s| s.backends.len()).sum::<usize>();
                let discovered: Vec<String> = cfg
                    .services
                    .iter()
                    .filter_map(|s| {
                        s.discovery.as_ref().map(|d| {
                            format!(
                                "service {}: backends from the EndpointSlices of Kubernetes \
                                 Service {}/{}",
                                s.name, d.namespace, d.service
                            )
                        })
                    })
                    .collect();
                if json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "file": file.display().to_string(),
                            "ok": true,
                            "services": cfg.services.iter().map(|s| &s.name).collect::<Vec<_>>(),
                            "backends": backends,
                            "discovered": discovered,
                            "host": host,
                        })
                    );
                } else {
                    println!(
                        "{}: ok ({} services, {} backends)",
                        file.display(),
                        cfg.services.len(),
                        backends
                    );
                    for line in discovered.iter().chain(&host) {
                        println!("  {line}");
                    }
                }
                Ok(())
            }
        }
    })
}
