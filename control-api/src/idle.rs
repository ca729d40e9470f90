//! The idle task: every `idle.check_interval_s`, stops the running environments that have been
//! idle for longer than their `idle_stop_after_s` (see [`crate::activity`] for the rule).
//!
//! Every API process runs it; the claim on the row lets only one of them stop a workspace.
//! Without a readable route table there is no signal, and nothing is stopped.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::activity::Activity;
use crate::db::{envs, ports};
use crate::lifecycle::sessions;
use crate::state::State;

/// Runs checks until `shutdown`.
pub async fn run(st: Arc<State>, mut shutdown: watch::Receiver<bool>) {
    let interval = Duration::from_secs(st.cfg.idle.check_interval_s);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
        if !st.liveness.holding() {
            continue;
        }
        match pass(&st).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(stopped = n, "idle check stopped environments"),
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "idle check failed"),
        }
    }
}

/// One check; returns how many environments it stopped.
pub async fn pass(st: &Arc<State>) -> anyhow::Result<u64> {
    let candidates = envs::list_idle_candidates(&st.db).await?;
    if candidates.is_empty() {
        return Ok(0);
    }
    let table = match st.table.get() {
        Ok(t) if t.counter_file().is_some() => t,
        Ok(_) => {
            tracing::warn!("idle check skipped: the route table has no counters file");
            return Ok(0);
        }
        Err(e) => {
            tracing::warn!(error = %e, "idle check skipped: route table unavailable");
            return Ok(0);
        }
    };
    let policy = st.cfg.idle.policy;
    let mut stopped = 0;
    for env in candidates {
        let held = ports::env_ports(st.db.pool(), &env.id).await?;
        let idle_ms = Activity::read(&table, &env.id, &held).idle_ms(policy, env.running_since, gpugate_routes::now_ms());
        let limit_ms = u64::try_from(env.idle_stop_after_s).unwrap_or(u64::MAX).saturating_mul(1000);
        if idle_ms < limit_ms {
            continue;
        }
        let (st2, id) = (st.clone(), env.id.clone());
        let idle_s = idle_ms / 1000;
        match st.ops.run(st, &env.id, async move { sessions::stop_idle(&st2, &id, idle_s).await }).await {
            Ok(true) => stopped += 1,
            Ok(false) => {}
            Err(e) => tracing::warn!(env_id = %env.id, error = %e, "stopping an idle environment failed"),
        }
    }
    Ok(stopped)
}
