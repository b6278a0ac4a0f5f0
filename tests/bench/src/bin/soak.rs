//! `cargo xtask soak --minutes N`: the soak (see `router_bench::soak`) for
//! N minutes, its figures printed and written to `target/soak/report.json`;
//! with `--record`, also to `bench/soak.md` and `bench/soak.json`. Exits
//! non-zero unless no connection failed on a healthy backend. Needs root.
//! Ctrl-C stops it early; everything it created is removed either way.

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use router_bench::soak::{self, SoakOptions};
use router_testkit::fixtures::workspace_root;

const USAGE: &str =
    "usage: soak [--minutes N | --seconds N] [--seed N] [--out DIR] [--record] [--quiet]
            [--no-hard-flap] [--reuse-ports]

  --minutes N  run for N minutes (default 2; fractions allowed)
  --seconds N  run for N seconds instead (at least 10)
  --seed N     the schedule's random seed (default: from the clock)
  --out DIR    report.json and the daemons' logs (default target/soak)
  --record     also write bench/soak.md and bench/soak.json
  --quiet      no progress line every 10 s
  --no-hard-flap  never kill web-1 (no backend then resets a connection)
  --reuse-ports  clients bind their port before connecting, so 4-tuples are reused
               within seconds (a stress of the connection table's reuse handling)";

fn main() -> ExitCode {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    if let Err(e) = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst)) {
        eprintln!("soak: cannot install the Ctrl-C handler: {e}");
        return ExitCode::FAILURE;
    }
    match real_main(&stop) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("soak: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn positive(flag: &str, v: Option<String>) -> Result<f64> {
    let v = v.with_context(|| format!("{flag} needs a value\n\n{USAGE}"))?;
    let n: f64 = v
        .parse()
        .with_context(|| format!("{flag} {v:?} is not a number"))?;
    if !n.is_finite() || n <= 0.0 {
        bail!("{flag} {v:?} must be a positive number");
    }
    Ok(n)
}

fn real_main(stop: &AtomicBool) -> Result<bool> {
    // The commit the recorded page names, fixed while the tree is the one
    // just built.
    let _ = router_bench::report::source_commit();
    let root = workspace_root();
    let mut opts = SoakOptions::new(Duration::from_secs(120), root.join("target").join("soak"));
    opts.progress = true;
    let mut record = false;
    let mut args = std::env::args().skip(1);
    let mut command = vec!["cargo xtask soak".to_owned()];
    while let Some(a) = args.next() {
        match a.as_str() {
            "--minutes" => {
                let n = positive("--minutes", args.next())?;
                command.push(format!("--minutes {n}"));
                opts.duration = Duration::from_secs_f64(n * 60.0);
            }
            "--seconds" => {
                let n = positive("--seconds", args.next())?;
                command.push(format!("--seconds {n}"));
                opts.duration = Duration::from_secs_f64(n);
            }
            "--seed" => {
                let v = args.next().context("--seed needs a value")?;
                opts.seed = v
                    .parse()
                    .with_context(|| format!("--seed {v:?} is not an unsigned integer"))?;
            }
            "--out" => {
                opts.out_dir = PathBuf::from(args.next().context("--out needs a directory")?);
            }
            "--record" => {
                record = true;
                command.push("--record".into());
            }
            "--quiet" => opts.progress = false,
            "--no-hard-flap" => {
                opts.hard_flap = false;
                command.push("--no-hard-flap".into());
            }
            "--reuse-ports" => {
                opts.reuse_ports = true;
                command.push("--reuse-ports".into());
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(true);
            }
            other => bail!("unexpected argument {other:?}\n\n{USAGE}"),
        }
    }
    let load_before = load_average();
    let report = soak::run(&opts, stop)?;
    let load_after = load_average();
    print!("{}", report.summary());
    if record {
        if report.interrupted {
            bail!("not recording an interrupted run");
        }
        let bench = root.join("bench");
        let machine = format!(
            "Machine: {}; load average {load_before} before the run and {load_after} after \
             (the VM is shared with other builds, so figures are noisy).",
            machine()
        );
        let md = report.markdown(&command.join(" "), &today(), &machine);
        std::fs::write(bench.join("soak.md"), md).context("writing bench/soak.md")?;
        // The commit beside the figures, as every suite's JSON carries it.
        let mut json: serde_json::Value = serde_json::from_str(&report.to_json()?)?;
        json["commit"] = router_bench::report::source_commit().into();
        std::fs::write(
            bench.join("soak.json"),
            serde_json::to_string_pretty(&json)? + "\n",
        )
        .context("writing bench/soak.json")?;
        println!("soak: recorded in bench/soak.md and bench/soak.json");
    }
    Ok(report.passed())
}

/// The 1-minute load average.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into());
    format!("{cpus} vCPU ({model}), Linux {kernel}")
}

/// Today's date (UTC), YYYY-MM-DD, from the days since the epoch.
fn today() -> String {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400) as i64;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}
