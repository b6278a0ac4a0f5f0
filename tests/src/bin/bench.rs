//! Benchmarks of the router. `bench [datapath|all] [--quick] [--out DIR]`.
//!
//! Results go in `bench/` at the workspace root, or in `target/bench-quick/`
//! with `--quick`, so smoke runs never overwrite recorded results. The
//! benchmarks assert nothing about speed: the exit status is non-zero only on
//! errors. Needs root (BPF, network namespaces).

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Result, bail};
use router_tests::{
    bench_control,
    bench_datapath::{self, Settings},
    synflood,
};

const USAGE: &str = "usage: bench [datapath|control|synflood|all] [--quick] [--out DIR]

  datapath   ns/packet of the XDP program through BPF_PROG_TEST_RUN, against XDP_PASS
  control    control plane: Maglev rebuild time for 10 to 10,000 backends
  synflood   a SYN flood from spoofed sources against a small connection table
  all        every suite (default)
  --quick    5 short runs; results go in target/bench-quick/ instead of bench/
  --out DIR  write the results to DIR instead";

enum Suite {
    Datapath,
    Control,
    Synflood,
    All,
}

fn workspace_root() -> PathBuf {
    // tests/ is one level below the workspace root.
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    let mut suite = None;
    let mut quick = false;
    let mut out = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "datapath" if suite.is_none() => suite = Some(Suite::Datapath),
            "all" if suite.is_none() => suite = Some(Suite::All),
            "control" if suite.is_none() => suite = Some(Suite::Control),
            "synflood" if suite.is_none() => suite = Some(Suite::Synflood),
            "--quick" => quick = true,
            "--out" => match args.next() {
                Some(d) => out = Some(PathBuf::from(d)),
                None => bail!("--out needs a directory\n\n{USAGE}"),
            },
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => bail!("unexpected argument {other:?}\n\n{USAGE}"),
        }
    }
    let out = out.unwrap_or_else(|| {
        let root = workspace_root();
        if quick {
            root.join("target").join("bench-quick")
        } else {
            root.join("bench")
        }
    });
    let settings = if quick {
        Settings::quick(out)
    } else {
        Settings::full(out)
    };
    match suite.unwrap_or(Suite::All) {
        Suite::Datapath => bench_datapath::run_datapath(&settings),
        Suite::Control => bench_control::run_control(quick, &settings.out_dir),
        Suite::Synflood => synflood::run_bench(quick, &settings.out_dir),
        Suite::All => {
            bench_datapath::run_datapath(&settings)?;
            bench_control::run_control(quick, &settings.out_dir)?;
            synflood::run_bench(quick, &settings.out_dir)
        }
    }
}
