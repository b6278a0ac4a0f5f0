//! The soak's fault injectors: weight churn through the control API, daemon
//! restarts (SIGTERM and kill -9 in turn), and the two flapping backends.
//! Each records what it did in the shared timeline, which is what failures
//! are later judged against.

use std::{
    net::SocketAddr,
    sync::atomic::Ordering,
    thread,
    time::{Duration, Instant},
};

use router::api::{client::ClientError, path_segment};

use super::{Api, BACKENDS, Ctx, HARD_FLAP, HEALTH_FLAP, Restart, Rng, SoakOptions, Window, lock};
use router_testkit::{netns, replica};

/// The largest weight churn sets (config weights are 100).
const MAX_WEIGHT: u32 = 200;
/// How often the flap thread looks at the daemon's view of a flapping backend.
const OBSERVE_EVERY: Duration = Duration::from_millis(250);

/// What the weight churn did.
#[derive(Clone, Debug, Default)]
pub(crate) struct ChurnStats {
    pub ticks: u64,
    /// Ticks that ran later than a whole period behind schedule.
    pub late_ticks: u64,
    pub set: u64,
    pub auto: u64,
    /// Requests that found no daemon: it was being restarted.
    pub daemon_down: u64,
    pub errors: u64,
    pub first_errors: Vec<String>,
}

/// A random `weight set` (1..=200) or `weight auto` on a random backend
/// every `every`, through `router::api::client::request`.
pub(crate) fn churn(ctx: &Ctx<'_>, every: Duration, seed: u64) -> ChurnStats {
    let mut st = ChurnStats::default();
    let api = match Api::new(&ctx.lab().socket()) {
        Ok(a) => a,
        Err(e) => {
            ctx.fail(format!("weight churn: {e:#}"));
            return st;
        }
    };
    let mut rng = Rng::new(seed ^ 0xc0ff_ee00);
    let mut next = Instant::now() + every;
    loop {
        ctx.sleep_until(next);
        if ctx.ending() {
            return st;
        }
        next += every;
        let now = Instant::now();
        if now > next {
            // Behind by a whole period (a slow answer): skip, don't burst.
            st.late_ticks += 1;
            next = now + every;
        }
        st.ticks += 1;
        let b = &BACKENDS[rng.below(BACKENDS.len() as u32) as usize];
        let base = format!(
            "/v1/services/{}/backends/{}/weight",
            path_segment(b.service.name()),
            path_segment(b.name)
        );
        let set = rng.below(10) < 7;
        let result = if set {
            let w = 1 + rng.below(MAX_WEIGHT);
            api.call("POST", &format!("{base}/{w}"))
        } else {
            api.call("DELETE", &base)
        };
        match result {
            Ok(_) => {
                if set {
                    st.set += 1;
                } else {
                    st.auto += 1;
                }
                ctx.live.weight_changes.fetch_add(1, Ordering::Relaxed);
            }
            Err(ClientError::NotRunning(_) | ClientError::Io { .. } | ClientError::Http(_))
                if ctx.restarting.load(Ordering::SeqCst) =>
            {
                st.daemon_down += 1;
            }
            Err(e) => {
                st.errors += 1;
                if st.first_errors.len() < 10 {
                    st.first_errors.push(format!(
                        "t={:.1}s {} {base}: {e}",
                        ctx.at(now),
                        if set { "POST" } else { "DELETE" }
                    ));
                }
            }
        }
    }
}

/// Restarts the daemon every `restart_every`: SIGTERM first, then kill -9,
/// in turn. Between the old daemon's end and the new one's start the
/// datapath runs alone for `restart_down` (plus the new daemon's start-up).
pub(crate) fn restarts(ctx: &Ctx<'_>, opts: &SoakOptions) {
    let lab = ctx.lab();
    let mut rng = Rng::new(opts.seed ^ 0x5eed_0001);
    let mut next = ctx.t0 + opts.restart_every;
    // A restart needs a few seconds of traffic after it to be judged.
    let last = ctx.t0 + opts.duration.saturating_sub(Duration::from_secs(3));
    for n in 0.. {
        ctx.sleep_until(next);
        if ctx.ending() || next > last {
            return;
        }
        next += opts.restart_every;
        let kill = n % 2 == 1;
        ctx.restarting.store(true, Ordering::SeqCst);
        let Some(old) = lock(&lab.daemon).take() else {
            ctx.fail("restart: no daemon to restart".into());
            return;
        };
        let from = Instant::now();
        let (signal, exit, clean_exit) = if kill {
            // ChildGuard's drop is SIGKILL and reap.
            drop(old);
            ("SIGKILL", "killed".to_owned(), true)
        } else {
            match old.stop(Duration::from_secs(10)) {
                Ok(status) => ("SIGTERM", status.to_string(), status.success()),
                Err(e) => ("SIGTERM", format!("{e:#}"), false),
            }
        };
        // A little jitter so restarts do not line up with the other faults.
        let down = opts.restart_down + Duration::from_millis(u64::from(rng.below(500)));
        thread::sleep(down.saturating_sub(from.elapsed()));
        let log = lab.daemon_log(lab.daemons_started.load(Ordering::Relaxed));
        let new = match lab.start_daemon() {
            Ok(d) => d,
            Err(e) => {
                ctx.fail(format!("restart {}: {e:#}", n + 1));
                ctx.restarting.store(false, Ordering::SeqCst);
                return;
            }
        };
        let up = Instant::now();
        *lock(&lab.daemon) = Some(new);
        ctx.restarting.store(false, Ordering::SeqCst);
        let adopted = std::fs::read_to_string(&log)
            .is_ok_and(|l| l.contains("adopting the datapath pinned under"));
        lock(&ctx.timeline).restarts.push(Restart {
            signal,
            down: Window { from, to: Some(up) },
            exit,
            clean_exit,
            adopted,
        });
    }
}

/// The two flapping backends. The health flap switches the replica's
/// `/health` to 503 for `health_flap_every`, then back for as long; the
/// hard flap kills the fixture backend every `hard_flap_every` and starts it
/// again `hard_flap_down` later. Both are left healthy when the soak ends.
pub(crate) fn flaps(ctx: &Ctx<'_>, opts: &SoakOptions) {
    let lab = ctx.lab();
    let health_addr = SocketAddr::new(netns::backend_addr(HEALTH_FLAP).into(), super::BACKEND_PORT);
    let api = match Api::new(&lab.socket()) {
        Ok(a) => a,
        Err(e) => {
            ctx.fail(format!("flaps: {e:#}"));
            return;
        }
    };
    let mut next_health = ctx.t0 + Duration::from_secs(2);
    let mut health_failing = false;
    let mut health_seen = false;
    let mut next_kill = ctx.t0 + Duration::from_secs(7);
    let mut restart_at: Option<Instant> = None;
    let mut hard_seen = false;
    let mut next_look = Instant::now();
    let set_health = |fail: bool| {
        netns::in_netns(lab.client_ns(), || {
            replica::control(health_addr, &format!(r#"{{"fail_health": {fail}}}"#))
        })
        .and_then(|r| r)
    };
    while !ctx.ending() {
        let now = Instant::now();
        if now >= next_health {
            next_health += opts.health_flap_every;
            let fail = !health_failing;
            if let Err(e) = set_health(fail) {
                ctx.fail(format!("health flap: {e:#}"));
                break;
            }
            health_failing = fail;
            let mut tl = lock(&ctx.timeline);
            if fail {
                tl.health_failing.push(Window::open(Instant::now()));
                health_seen = false;
            } else if let Some(w) = tl.health_failing.last_mut() {
                w.to = Some(Instant::now());
            }
        }
        if opts.hard_flap && restart_at.is_none() && now >= next_kill {
            next_kill += opts.hard_flap_every;
            // The window opens before the kill: clients see its effects
            // before this thread could note the time after it.
            lock(&ctx.timeline)
                .hard_down
                .push(Window::open(Instant::now()));
            drop(lock(&lab.backends[HARD_FLAP]).take());
            restart_at = Some(Instant::now() + opts.hard_flap_down);
            hard_seen = false;
        }
        if let Some(at) = restart_at
            && now >= at
        {
            if let Err(e) = restart_hard_flapped(ctx) {
                ctx.fail(format!("hard flap: {e:#}"));
                break;
            }
            restart_at = None;
        }
        // The daemon's view, so the report can say the flaps were noticed.
        if now >= next_look
            && ((health_failing && !health_seen) || (restart_at.is_some() && !hard_seen))
        {
            next_look = now + OBSERVE_EVERY;
            if let Ok(views) = api.backends() {
                let unhealthy = |name: &str| {
                    views
                        .iter()
                        .any(|v| v.name == name && v.healthy == Some(false))
                };
                let mut tl = lock(&ctx.timeline);
                if health_failing && !health_seen && unhealthy(BACKENDS[HEALTH_FLAP].name) {
                    health_seen = true;
                    tl.health_flaps_seen += 1;
                }
                if restart_at.is_some() && !hard_seen && unhealthy(BACKENDS[HARD_FLAP].name) {
                    hard_seen = true;
                    tl.hard_flaps_seen += 1;
                }
            }
        }
        thread::sleep(Duration::from_millis(20));
    }
    // Leave both healthy, so the last connections meet no fault.
    if health_failing {
        if let Err(e) = set_health(false) {
            ctx.fail(format!("health flap: {e:#}"));
        }
        if let Some(w) = lock(&ctx.timeline).health_failing.last_mut() {
            w.to = Some(Instant::now());
        }
    }
    if restart_at.is_some()
        && let Err(e) = restart_hard_flapped(ctx)
    {
        ctx.fail(format!("hard flap: {e:#}"));
    }
}

/// Starts the hard-flapped backend again and closes its down window once it
/// accepts connections.
fn restart_hard_flapped(ctx: &Ctx<'_>) -> anyhow::Result<()> {
    let lab = ctx.lab();
    let guard = lab.start_backend(HARD_FLAP)?;
    *lock(&lab.backends[HARD_FLAP]) = Some(guard);
    if let Some(w) = lock(&ctx.timeline).hard_down.last_mut() {
        w.to = Some(Instant::now());
    }
    Ok(())
}
