//! The idle task: every `idle.check_interval_s`, samples this host's GPUs, warns the running
//! environments whose idle stop comes within `idle.warning_before_s` (an `idle_warning`
//! event), and stops those idle for longer than their `idle_stop_after_s` (see
//! [`crate::idle_clock`] for the rule).
//!
//! Every API process runs it; the claim on the row lets only one of them stop a workspace.
//! Activity is the sum over every gateway's reports, the utilisation of the workspace's GPUs
//! (any process samples its own host's, [`crate::gpu_activity`]) and its owner's hold. While
//! any registered gateway is not fresh (its heartbeat or its activity report late), or none
//! is registered, a workspace may be busy where nobody can see it, and the task waits (logged
//! once per cause, counted in `gpugate_idle_check_waits_total`) rather than stop anything.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::activity::Activity;
use crate::config::IdlePolicy;
use crate::db::envs::EnvRow;
use crate::db::{activity, envs, gpus};
use crate::gpu_activity::Sampler;
use crate::idle_clock::{self, Clock, GpuUtilization, WaitingBecause};
use crate::lifecycle::sessions;
use crate::state::State;

/// A GPU sample older than this many idle check intervals (or host probe intervals, when
/// those are longer) is unknown (never busy).
pub const SAMPLE_FRESH_CHECKS: u64 = 3;

/// What one check did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pass {
    /// Looked at every candidate; stopped this many.
    Stopped(u64),
    /// Stopped nothing: the fleet's activity is not all known (why).
    Waiting(String),
}

/// Runs checks until `shutdown`.
pub async fn run(st: Arc<State>, mut shutdown: watch::Receiver<bool>) {
    let interval = Duration::from_secs(st.cfg.idle.check_interval_s);
    let mut waiting: Option<String> = None;
    let mut sampler = Sampler::default();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
        // Sampled here, right before the check, rather than on the (often longer) reconcile
        // interval: the check then sees a sample at most one check old. A sample is a fact
        // about this host, recorded whether or not this process may stop anything.
        sampler.sample(&st).await;
        if !st.liveness.holding() {
            continue;
        }
        match pass(&st).await {
            Ok(Pass::Waiting(why)) => {
                if waiting.as_deref() != Some(why.as_str()) {
                    tracing::warn!(cause = %why, "idle check waits: no workspace is stopped while activity is unknown");
                    waiting = Some(why);
                }
            }
            Ok(Pass::Stopped(n)) => {
                if waiting.take().is_some() {
                    tracing::info!("idle check goes on: every gateway reports again");
                }
                if n > 0 {
                    tracing::info!(stopped = n, "idle check stopped environments");
                }
            }
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "idle check failed"),
        }
    }
}

/// One check.
pub async fn pass(st: &Arc<State>) -> anyhow::Result<Pass> {
    let candidates = envs::list_idle_candidates(&st.db).await?;
    if candidates.is_empty() {
        return Ok(Pass::Stopped(0));
    }
    let (registered, unfresh) = activity::freshness(&st.db).await?;
    if registered == 0 {
        st.metrics.idle_waits.with_label_values(&["no_gateway"]).inc();
        return Ok(Pass::Waiting("no gateway is registered, so none reports activity".into()));
    }
    if !unfresh.is_empty() {
        st.metrics.idle_waits.with_label_values(&["gateway_stale"]).inc();
        let list: Vec<String> = unfresh.iter().map(|u| format!("{} ({})", u.name, u.reason)).collect();
        return Ok(Pass::Waiting(format!("activity unknown on gateway {}", list.join(", "))));
    }
    let mut stopped = 0;
    for env in candidates {
        let (_, seen) = Activity::of_env(&st.db, &env).await?;
        let (clock, _) = clock_of(st, &env, &seen, false).await?;
        match check(st, &env, clock).await {
            Ok(true) => stopped += 1,
            Ok(false) => {}
            Err(e) => tracing::warn!(env_id = %env.id, error = %format!("{e:#}"), "idle check of an environment failed"),
        }
    }
    Ok(Pass::Stopped(stopped))
}

/// Acts on one environment's clock: counts a GPU-busy keep, sends the warning when it is due,
/// stops it when the stop is due; returns whether it stopped it.
async fn check(st: &Arc<State>, env: &EnvRow, clock: Clock) -> anyhow::Result<bool> {
    if clock.waiting == Some(WaitingBecause::GpuBusy) {
        st.metrics.idle_gpu_busy_keeps.inc();
        return Ok(false);
    }
    if clock.warn_now {
        let stop_at = clock.stop_at_ms.and_then(idle_clock::at);
        let detail = serde_json::json!({
            "stop_at": stop_at,
            "idle_seconds": clock.idle_ms / 1000,
            "limit_s": env.idle_stop_after_s,
            "warning_before_s": st.cfg.idle.warning_before_s,
        });
        let start = idle_clock::at(clock.period_start_ms).unwrap_or_default();
        if crate::db::idle::warn(&st.db, &env.id, start, detail).await? {
            st.metrics.idle_warnings.inc();
            tracing::info!(env_id = %env.id, stop_at = ?stop_at, "idle warning sent");
        }
        // The stop comes a later check, its lead after the warning.
        return Ok(false);
    }
    if !clock.stop_now {
        return Ok(false);
    }
    let (st2, id) = (st.clone(), env.id.clone());
    let idle_s = clock.idle_ms / 1000;
    Ok(st.ops.run(&env.id, async move { sessions::stop_idle(&st2, &id, idle_s).await }).await?)
}

/// The idle clock of running environment `env` now, and its GPUs' last samples as the API
/// shows them. `seen`: its activity through the gateways; `activity_unknown`: some gateway's
/// activity is unknown. An environment without an idle limit gets a clock too (nothing
/// stops it: the task never looks at it).
pub async fn clock_of(
    st: &State,
    env: &EnvRow,
    seen: &Activity,
    activity_unknown: bool,
) -> Result<(Clock, Vec<GpuUtilization>), sqlx::Error> {
    let cfg = &st.cfg.idle;
    // Samples from inside workspaces come at the prober's pace, which may be the slower one.
    let fresh_s = cfg.check_interval_s.max(st.cfg.fleet.probe_interval_s).saturating_mul(SAMPLE_FRESH_CHECKS);
    let rows = gpus::utilization_of_env(&st.db, &env.id, fresh_s).await?;
    let gpu_utilization: Vec<GpuUtilization> = rows
        .iter()
        .map(|r| {
            let percent = r.utilization_pct.and_then(|p| u8::try_from(p).ok());
            GpuUtilization {
                gpu: r.id.clone(),
                percent,
                sampled_at: r.utilization_at,
                fresh: r.fresh,
                busy: r.fresh && percent.is_some_and(|p| cfg.gpu_busy(p)),
            }
        })
        .collect();
    let now_ms = gpugate_routes::now_ms();
    let busy_ms = rows.iter().map(|r| idle_clock::ms(r.busy_at)).max().unwrap_or(0);
    // Counters start with each start; unknown start counts as now (as `Activity::idle_ms`).
    let since_ms = env.running_since.map_or(now_ms, |t| idle_clock::ms(Some(t)));
    let inputs = idle_clock::Inputs {
        limit_s: u64::try_from(env.idle_stop_after_s).unwrap_or(0),
        warning_before_s: cfg.warning_before_s,
        session_open: cfg.policy == IdlePolicy::NoConnections && seen.connections_active() > 0,
        gpu_busy: gpu_utilization.iter().any(|g| g.busy),
        activity_unknown,
        last_activity_ms: seen.last_activity_ms().max(since_ms).max(busy_ms),
        held_until_ms: idle_clock::ms(env.hold_until),
        warned_ms: idle_clock::ms(env.idle_warned_at),
        now_ms,
    };
    Ok((idle_clock::clock(inputs), gpu_utilization))
}

/// Whether some gateway's activity is unknown now (stale, or none registered).
pub async fn activity_unknown(st: &State) -> Result<bool, sqlx::Error> {
    let (registered, unfresh) = activity::freshness(&st.db).await?;
    Ok(registered == 0 || !unfresh.is_empty())
}
