//! Pools in the running daemon: their views, share changes by operators
//! and by rollback guards, and the saved shares. Every change goes one
//! way: the control loop takes it, the datapath is written at once, and
//! the shares are saved; a change the datapath refuses is undone whole.

use anyhow::Result;
use tracing::{info, warn};

use super::{
    overrides_file,
    state::{DaemonState, measurer},
};
use crate::{
    api::{
        OverrideError,
        views::{self, PoolView},
    },
    datapath::{DatapathStatus, Histogram},
};

/// A pool's first-byte histogram: its backends' summed.
fn pool_first_byte(st: &DatapathStatus, service: &str, backends: &[String]) -> Histogram {
    let mut h = Histogram::default();
    for s in st.services.iter().filter(|s| s.name == service) {
        for b in s.backends.iter().filter(|b| backends.contains(&b.name)) {
            h.add(&b.latency.first_byte);
        }
    }
    h
}

impl DaemonState {
    pub fn pool_views(&self) -> Result<Vec<PoolView>> {
        let (_, backends, st) = self.views()?;
        Ok(views::pools(&st, &backends))
    }

    /// Sets a pool's share at once; `by` says who asked, for the log line.
    pub fn set_pool_share(
        &mut self,
        service: &str,
        pool: &str,
        share: u32,
        by: &str,
    ) -> std::result::Result<Vec<(String, u32)>, OverrideError> {
        let now = self.started.elapsed();
        let ctl = self.ctl.as_mut().ok_or(OverrideError::NotRunning)?;
        let before = ctl.pool_shares().clone();
        let shares = ctl.set_pool_share(&self.config, service, pool, share)?;
        let (specs, _) = ctl.decide(now, &self.config, &measurer(&self.dp, &self.scan));
        if let Err(e) = self.dp.apply(&specs) {
            if let Some(c) = self.ctl.as_mut() {
                c.restore_pool_shares(&self.config, before);
            }
            return Err(OverrideError::Datapath(e));
        }
        self.persist_pool_shares();
        self.publish_metrics(true);
        let list = shares
            .iter()
            .map(|(n, s)| format!("{n} {s}%"))
            .collect::<Vec<_>>()
            .join(", ");
        info!(service, pool, "{by}: shares now {list}");
        Ok(shares)
    }

    pub(super) fn persist_pool_shares(&self) {
        let Some(ctl) = self.ctl.as_ref() else { return };
        let path = overrides_file::pools_path_for(&self.config.daemon.control_socket);
        if let Err(e) = overrides_file::save_pool_shares(&path, ctl.pool_shares()) {
            warn!("saving pool shares: {e:#}; a restarted daemon would not keep them");
        }
    }

    /// Runs the rollback guards on the datapath's latest histograms and
    /// rolls back every pool whose guard tripped.
    pub(super) fn check_guards(&mut self, st: &DatapathStatus) {
        let Some(ctl) = self.ctl.as_mut() else { return };
        let cfg = &self.config;
        let first_byte = |service: &str, pool: &str| {
            cfg.services
                .iter()
                .find(|s| s.name == service)
                .and_then(|s| s.pools.iter().find(|p| p.name == pool))
                .map(|p| pool_first_byte(st, service, &p.backends))
                .unwrap_or_default()
        };
        let trips = ctl.check_guards(cfg, &first_byte);
        for t in trips {
            let why = format!(
                "guard rollback (first-byte p99 {:.1} ms against {:.1} ms over {} connections)",
                t.p99_ms, t.others_p99_ms, t.connections
            );
            if let Err(e) = self.set_pool_share(&t.service, &t.pool, 0, &why) {
                warn!(service = %t.service, pool = %t.pool, "guard rollback refused: {e}");
            }
        }
    }
}
