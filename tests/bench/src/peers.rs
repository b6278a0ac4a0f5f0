//! The benchmarks' peers, all from Debian's packages: installing them with
//! apt-get when missing (idempotent, no service started), and running nginx
//! backends and HAProxy inside the benchmark's namespaces.
//!
//! Peers run in the foreground as children of the benchmark, guarded by
//! [`ChildGuard`]; their namespaces are deleted with the topology, which also
//! removes every iptables/nftables rule, conntrack entry and address the
//! benchmark set up. Installed packages stay installed.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};

use router_testkit::netns::{self, ChildGuard};

/// Debian package that provides each peer binary.
pub const NGINX: (&str, &str) = ("nginx", "nginx-light");
pub const HAPROXY: (&str, &str) = ("haproxy", "haproxy");
pub const IPTABLES: (&str, &str) = ("iptables-restore", "iptables");
pub const NFT: (&str, &str) = ("nft", "nftables");
pub const WRK: (&str, &str) = ("wrk", "wrk");

fn which(bin: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

/// Serialises installs within this process, and remembers that `apt-get
/// update` ran.
static APT: Mutex<bool> = Mutex::new(false);

/// Makes sure every `(binary, package)` is installed, installing the
/// missing packages with apt-get. Services are not started: if the host has
/// no `/usr/sbin/policy-rc.d`, one that refuses every start is put in place
/// for the install and removed afterwards.
pub fn ensure(peers: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = peers
        .iter()
        .filter(|(bin, _)| which(bin).is_none())
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    ensure!(
        which("apt-get").is_some(),
        "missing {missing:?} and apt-get is unavailable; install them by hand"
    );
    let mut updated = APT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    eprintln!("bench: installing {missing:?} with apt-get");
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let placed = if policy.exists() {
        false
    } else {
        std::fs::write(
            policy,
            "#!/bin/sh\n# router bench: no service starts during install\nexit 101\n",
        )
        .context("writing /usr/sbin/policy-rc.d")?;
        std::fs::set_permissions(
            policy,
            <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755),
        )
        .context("making /usr/sbin/policy-rc.d executable")?;
        true
    };
    let result = (|| -> Result<()> {
        if !*updated {
            apt(&["update"])?;
            *updated = true;
        }
        let mut args = vec!["install", "-y", "--no-install-recommends"];
        args.extend(&missing);
        apt(&args)
    })();
    if placed {
        let _ = std::fs::remove_file(policy);
    }
    result?;
    for (bin, pkg) in peers {
        ensure!(
            which(bin).is_some(),
            "{pkg} installed but {bin} is not on PATH"
        );
    }
    Ok(())
}

fn apt(args: &[&str]) -> Result<()> {
    let out = Command::new("apt-get")
        .args(["-q", "-o", "DPkg::Lock::Timeout=300"])
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("running apt-get {args:?}"))?;
    if !out.status.success() {
        bail!(
            "apt-get {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// One nginx (one worker process) in `ns` on `addr:port`, answering every
/// request with a 3-byte 200 and `/nginx_status` with stub_status. Access
/// logging is off, as for any benchmark of the server itself.
pub fn start_nginx(ns: &str, addr: Ipv4Addr, port: u16, dir: &Path) -> Result<ChildGuard> {
    let tag = format!("nginx-{addr}");
    let d = dir.join(&tag);
    std::fs::create_dir_all(&d)?;
    let conf = format!(
        "worker_processes 1;\n\
         daemon off;\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\n\
         worker_rlimit_nofile 65536;\n\
         events {{ worker_connections 16384; }}\n\
         http {{\n\
           access_log off;\n\
           client_body_temp_path {d}/body;\n\
           proxy_temp_path {d}/proxy;\n\
           fastcgi_temp_path {d}/fastcgi;\n\
           uwsgi_temp_path {d}/uwsgi;\n\
           scgi_temp_path {d}/scgi;\n\
           server {{\n\
             listen {addr}:{port} backlog=4096;\n\
             location = /nginx_status {{ stub_status; }}\n\
             location / {{ return 200 \"ok\\n\"; }}\n\
           }}\n\
         }}\n",
        d = d.display()
    );
    let path = d.join("nginx.conf");
    std::fs::write(&path, conf)?;
    let err = d.join("startup.log");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, "nginx", "-e"])
        .arg(&err)
        .arg("-c")
        .arg(&path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    let guard = netns::spawn_command(cmd).with_context(|| format!("starting nginx in {ns}"))?;
    netns::wait_for_tcp(ns, SocketAddr::from((addr, port)), Duration::from_secs(10))
        .with_context(|| format!("nginx on {addr}:{port} did not start"))?;
    Ok(guard)
}

/// nginx's `accepts` counter (stub_status), read from inside `ns`. Counts
/// this request too.
pub fn nginx_accepts(ns: &str, addr: Ipv4Addr, port: u16) -> Result<u64> {
    let r = netns::in_netns(ns, || {
        netns::http_get(
            SocketAddr::from((addr, port)),
            "/nginx_status",
            Duration::from_secs(5),
        )
    })??;
    // "Active connections: 1 \nserver accepts handled requests\n 5 5 5 \n..."
    r.body
        .lines()
        .nth(2)
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no accepts counter in {:?}", r.body))
}

/// HAProxy in the foreground (`-db`) in `ns` with `config`; waits until
/// `probe` accepts.
pub fn start_haproxy(ns: &str, config: &str, dir: &Path, probe: SocketAddr) -> Result<ChildGuard> {
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, config)?;
    let check = Command::new("haproxy")
        .args(["-c", "-q", "-f"])
        .arg(&path)
        .output()
        .context("running haproxy -c")?;
    ensure!(
        check.status.success(),
        "haproxy rejected its config: {}",
        String::from_utf8_lossy(&check.stderr).trim()
    );
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, "haproxy", "-db", "-f"])
        .arg(&path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    let guard = netns::spawn_command(cmd).with_context(|| format!("starting haproxy in {ns}"))?;
    netns::wait_for_tcp(ns, probe, Duration::from_secs(10))
        .with_context(|| format!("haproxy on {probe} did not start"))?;
    Ok(guard)
}

/// Runs `program args...` inside `ns` with `input` on stdin (rule loaders:
/// `iptables-restore`, `nft -f -`).
pub fn exec_with_input(ns: &str, program: &str, args: &[&str], input: &str) -> Result<()> {
    use std::io::Write as _;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, program])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    child
        .stdin
        .take()
        .context("no stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "{program} {args:?} in {ns} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// What one wrk run reported.
#[derive(Debug, Clone)]
pub struct WrkResult {
    pub requests: u64,
    pub rate: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// From the benchmark's `done()` hook (`p999_us N`); NaN without it.
    pub p999_ms: f64,
    /// Socket errors (connect, read, write, timeout) and non-2xx/3xx answers.
    pub errors: u64,
}

/// Runs `wrk -t THREADS -c CONNS -d SECS --latency -H "Connection: close"`
/// from `ns` against `url`, with an optional Lua script (e.g. one that gives
/// each thread its own server address). wrk reconnects after every
/// response the server closes, so each request is a new connection.
pub fn run_wrk(
    ns: &str,
    url: &str,
    threads: usize,
    conns: usize,
    secs: u64,
    script: Option<&Path>,
) -> Result<WrkResult> {
    let (t, c, d) = (threads.to_string(), conns.to_string(), format!("{secs}s"));
    let mut args = vec![
        "wrk",
        "-t",
        &t,
        "-c",
        &c,
        "-d",
        &d,
        "--latency",
        "-H",
        "Connection: close",
    ];
    let script_arg;
    if let Some(p) = script {
        script_arg = p.display().to_string();
        args.extend(["-s", &script_arg]);
    }
    args.push(url);
    let out = netns::exec(ns, &args)?;
    parse_wrk(&out).with_context(|| format!("parsing wrk's output:\n{out}"))
}

fn wrk_ms(v: &str) -> Option<f64> {
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => n / 1e3,
        "ms" => n,
        "s" => n * 1e3,
        "m" => n * 60e3,
        _ => return None,
    })
}

fn parse_wrk(out: &str) -> Result<WrkResult> {
    let mut r = WrkResult {
        requests: 0,
        rate: f64::NAN,
        p50_ms: f64::NAN,
        p99_ms: f64::NAN,
        p999_ms: f64::NAN,
        errors: 0,
    };
    for line in out.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v] => r.rate = v.parse()?,
            ["50%", v] => r.p50_ms = wrk_ms(v).context("p50")?,
            ["99%", v] => r.p99_ms = wrk_ms(v).context("p99")?,
            ["p999_us", v] => r.p999_ms = v.parse::<f64>()? / 1e3,
            [n, "requests", "in", ..] => r.requests = n.parse()?,
            ["Non-2xx", "or", "3xx", "responses:", n] => r.errors += n.parse::<u64>()?,
            ["Socket", "errors:", rest @ ..] => {
                // "connect 0, read 0, write 0, timeout 0"
                r.errors += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            _ => {}
        }
    }
    ensure!(r.rate.is_finite() && r.requests > 0, "no Requests/sec line");
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_output() {
        let out = "Running 2s test @ http://198.18.100.1/\n  4 threads and 16 connections\n\
            \x20 Thread Stats   Avg      Stdev     Max   +/- Stdev\n\
            \x20   Latency   812.21us  1.01ms  20.12ms   92.00%\n\
            \x20 Latency Distribution\n     50%  520.00us\n     75%  0.90ms\n     90%    1.50ms\n     99%    5.10ms\n\
            \x20 12345 requests in 2.00s, 1.50MB read\n\
            \x20 Socket errors: connect 2, read 1, write 0, timeout 3\n\
            \x20 Non-2xx or 3xx responses: 4\n\
            Requests/sec:   6172.50\nTransfer/sec:      0.75MB\np999_us 20120\n";
        let r = parse_wrk(out).unwrap();
        assert_eq!(r.requests, 12345);
        assert!((r.rate - 6172.5).abs() < 1e-9);
        assert!((r.p50_ms - 0.52).abs() < 1e-9);
        assert!((r.p99_ms - 5.1).abs() < 1e-9);
        assert_eq!(r.errors, 10);
        assert!((r.p999_ms - 20.12).abs() < 1e-9);
        assert!(parse_wrk("garbage").is_err());
    }
}
