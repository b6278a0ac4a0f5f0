//! The `perf` process of the profiling pass: `perf record` sampling this
//! thread on the software clock, switched on only around the calls being
//! profiled, and `perf script` turning what it recorded into text.
//!
//! It only reads: it samples the benchmark's own thread and attaches
//! nothing to any interface or program.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::process::ExitStatusExt as _,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

/// Sampling frequency of `perf record`. The VM has no hardware PMU, so the
/// event is `cpu-clock`, an hrtimer; 20 kHz stays well under the kernel's
/// default `perf_event_max_sample_rate` (100 kHz) and its CPU-time cap.
pub(super) const SAMPLE_HZ: u32 = 20_000;

const SAMPLED_EVENT: &str = "cpu-clock";

/// The one line a machine without perf gets, before any minute is spent.
pub(super) fn check_available() -> Result<()> {
    let works = Command::new("perf")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ensure!(
        works,
        "`perf` is missing (`perf --version` failed): the datapath benchmark records a profile \
         with it; run `cargo xtask setup` (installs Debian's linux-perf)"
    );
    Ok(())
}

/// `perf record` attached to the calling thread, started with its events
/// off. Dropping it without [`Recording::finish`] kills perf.
pub(super) struct Recording {
    child: Child,
    ctl: ChildStdin,
    ack: BufReader<ChildStdout>,
    data: PathBuf,
    log: PathBuf,
    /// Time spent with the events on, summed over every enable/disable.
    enabled: Duration,
    since: Option<Instant>,
}

impl Recording {
    /// Starts perf on this thread, writing `<stem>.data` in `dir`. Returns
    /// once perf is attached, which `--control` acknowledges.
    pub(super) fn start(dir: &Path, stem: &str) -> Result<Self> {
        let data = dir.join(format!("{stem}.data"));
        let log = dir.join(format!("{stem}.log"));
        let stderr =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        // SAFETY: gettid has no memory effects.
        let tid = unsafe { libc::gettid() };
        // `-D -1` starts with the events off; `--control fd:0,1` takes
        // enable/disable on stdin and acknowledges each on stdout, so the
        // samples cover exactly the calls profiled and nothing of the
        // set-up around them (loading datapaths, other paths' handshakes).
        let mut child = Command::new("perf")
            .args(["record", "-e", "cpu-clock", "-g", "-F"])
            .arg(SAMPLE_HZ.to_string())
            .arg("-t")
            .arg(tid.to_string())
            .args([
                "-D",
                "-1",
                "--control",
                "fd:0,1",
                "--no-buildid",
                "-q",
                "-o",
            ])
            .arg(&data)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .context("starting perf record")?;
        keep_off_this_cpu(child.id());
        let (ctl, ack) = match (child.stdin.take(), child.stdout.take()) {
            (Some(i), Some(o)) => (i, BufReader::new(o)),
            _ => bail!("perf record started without its control pipes"),
        };
        let mut rec = Self {
            child,
            ctl,
            ack,
            data,
            log,
            enabled: Duration::ZERO,
            since: None,
        };
        // `-D -1` also switches off perf's tracking event, which records
        // the symbol of every program loaded; the SYN and first-ACK paths
        // load a fresh datapath per batch, which perf could not then name.
        rec.command("enable")?;
        rec.command(&format!("disable {SAMPLED_EVENT}"))?;
        Ok(rec)
    }

    fn command(&mut self, what: &str) -> Result<()> {
        writeln!(self.ctl, "{what}")
            .and_then(|()| self.ctl.flush())
            .with_context(|| format!("sending {what:?} to perf record"))?;
        let mut line = String::new();
        self.ack
            .read_line(&mut line)
            .with_context(|| format!("reading perf record's answer to {what:?}"))?;
        // perf writes "ack\n" with its terminating NUL, which then leads
        // the next line.
        if line.trim_matches(|c: char| c == '\0' || c.is_whitespace()) != "ack" {
            bail!(
                "perf record did not acknowledge {what:?} (it said {:?}); its log: {}",
                line.trim(),
                self.log_text()
            );
        }
        Ok(())
    }

    pub(super) fn enable(&mut self) -> Result<()> {
        self.command(&format!("enable {SAMPLED_EVENT}"))?;
        self.since = Some(Instant::now());
        Ok(())
    }

    pub(super) fn disable(&mut self) -> Result<()> {
        if let Some(t) = self.since.take() {
            self.enabled += t.elapsed();
        }
        self.command(&format!("disable {SAMPLED_EVENT}"))
    }

    /// Seconds recorded so far with the events on.
    pub(super) fn enabled_secs(&self) -> f64 {
        self.enabled.as_secs_f64()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log)
            .map(|s| s.trim().replace('\n', " / "))
            .unwrap_or_default()
    }

    /// Stops perf record and returns `perf script`'s text of its samples.
    pub(super) fn finish(mut self) -> Result<String> {
        // SIGINT is how perf record is told to write its data and exit.
        let pid = libc::pid_t::try_from(self.child.id()).context("perf's pid")?;
        // SAFETY: signals the child we spawned and still own (not reaped).
        unsafe { libc::kill(pid, libc::SIGINT) };
        let status = self.child.wait().context("waiting for perf record")?;
        // perf re-raises the SIGINT it handled once its data is written.
        let stopped = status.success() || status.signal() == Some(libc::SIGINT);
        ensure!(
            stopped,
            "perf record failed ({status}): {}",
            self.log_text()
        );
        let out = Command::new("perf")
            .arg("script")
            .arg("-i")
            .arg(&self.data)
            // Inline resolution runs addr2line per frame: minutes, for
            // nothing the grouping uses.
            .args(["--no-inline", "-F", "comm,tid,time,event,ip,sym,symoff,dso"])
            .output()
            .context("running perf script")?;
        ensure!(
            out.status.success(),
            "perf script failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        // Only reached with perf still running when a profile failed half
        // way; `finish` has reaped it otherwise, and kill then fails harmlessly.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Moves perf (which inherited the benchmark's one-CPU mask) to every other
/// online CPU, so that writing its samples does not preempt the thread it
/// samples. Best effort: on a one-CPU machine perf stays where it is.
fn keep_off_this_cpu(pid: u32) {
    // SAFETY: sysconf and sched_getcpu have no memory effects.
    let (n, here) = unsafe {
        (
            libc::sysconf(libc::_SC_NPROCESSORS_ONLN),
            libc::sched_getcpu(),
        )
    };
    let (Ok(n), Ok(here), Ok(pid)) = (
        usize::try_from(n),
        usize::try_from(here),
        libc::pid_t::try_from(pid),
    ) else {
        return;
    };
    if n < 2 {
        return;
    }
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes
    // within it; the call only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for cpu in (0..n).filter(|c| *c != here) {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// `net.core.bpf_jit_kallsyms` on while held, as it was when dropped.
/// Without it the JIT-ed program has no symbol and perf cannot tell its
/// samples from the kernel's.
pub(super) struct JitKallsyms {
    restore: Option<String>,
}

const JIT_KALLSYMS: &str = "/proc/sys/net/core/bpf_jit_kallsyms";

impl JitKallsyms {
    pub(super) fn on() -> Result<Self> {
        let was = std::fs::read_to_string(JIT_KALLSYMS)
            .with_context(|| format!("reading {JIT_KALLSYMS}"))?;
        if was.trim() == "1" {
            return Ok(Self { restore: None });
        }
        std::fs::write(JIT_KALLSYMS, "1")
            .with_context(|| format!("writing 1 to {JIT_KALLSYMS}"))?;
        Ok(Self {
            restore: Some(was.trim().to_owned()),
        })
    }
}

impl Drop for JitKallsyms {
    fn drop(&mut self) {
        if let Some(v) = &self.restore {
            let _ = std::fs::write(JIT_KALLSYMS, v);
        }
    }
}
